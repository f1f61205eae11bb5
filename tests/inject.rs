//! `keycard inject` as a user runs it, on deploy/k8s/bookinfo.yaml: the pods it makes (structure,
//! the sidecar configuration parsed by the sidecar's own loader), idempotence, `--legacy`, opting
//! out, errors with a line; and the injected output plus every file in deploy/k8s accepted by
//! `kubernetes-validate --strict` (Kubernetes' own OpenAPI schemas) for 1.29 and the newest
//! version it bundles. That tool is a Python package: a missing one skips loudly here and fails
//! under CI (KEYCARD_REQUIRE_OUTSIDE_TOOLS=1, where .ci/run installs it).

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{keycard, ok, path, skip_or_fail};
use keycard_config::sidecar::SidecarConfig;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bookinfo() -> PathBuf {
    repo().join("deploy/k8s/bookinfo.yaml")
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

/// `keycard inject ARGS -f -` with `input` on stdin: (success, stdout, stderr).
fn inject_stdin(args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = keycard()
        .arg("inject")
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list.as_array().into_iter().flatten().filter(|c| c["name"] == name).collect()
}

#[test]
fn bookinfo_gets_native_sidecars_that_read_their_generated_configuration() {
    let out = docs(&ok(&["inject", "-f", path(&bookinfo())]));
    let input = docs(&std::fs::read_to_string(bookinfo()).unwrap());
    assert_eq!(by_kind(&out, "Service").len(), 4);
    assert_eq!(by_kind(&out, "ServiceAccount").len(), 4);
    let deployments = by_kind(&out, "Deployment");
    assert_eq!(deployments.len(), 4);
    assert_eq!(by_kind(&out, "ConfigMap").len(), 4, "one sidecar configuration per workload");
    for (i, doc) in out.iter().enumerate().filter(|(_, d)| d["kind"] == "Deployment") {
        let name = doc["metadata"]["name"].as_str().unwrap();
        let pod = &doc["spec"]["template"];
        let spec = &pod["spec"];
        assert_eq!(pod["metadata"]["annotations"]["keycard.dev/injected"], "true", "{name}");

        let inits: Vec<&str> =
            spec["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            inits,
            ["keycard-init", "keycard-proxy"],
            "{name}: capture first, then the sidecar, once each"
        );
        assert!(named(&spec["containers"], "keycard-proxy").is_empty(), "{name}");

        let init = &spec["initContainers"][0];
        let sc = &init["securityContext"];
        assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]), "{name}");
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!((sc["runAsUser"].as_u64(), sc["runAsNonRoot"].as_bool()), (Some(0), Some(false)));
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(init["image"], "keycard-init:dev");

        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always", "{name}: a native sidecar");
        assert_eq!(proxy["image"], "keycard:dev");
        let sc = &proxy["securityContext"];
        for (field, want) in [("runAsUser", 1337), ("runAsGroup", 1337)] {
            assert_eq!(sc[field].as_u64(), Some(want), "{name}: {field}");
        }
        for (field, want) in
            [("runAsNonRoot", true), ("readOnlyRootFilesystem", true), ("allowPrivilegeEscalation", false)]
        {
            assert_eq!(sc[field].as_bool(), Some(want), "{name}: {field}");
        }
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        for probe in ["startupProbe", "readinessProbe"] {
            assert_eq!(proxy[probe]["httpGet"]["port"].as_u64(), Some(15021), "{name}: {probe}");
            assert_eq!(proxy[probe]["httpGet"]["path"], "/healthz/ready");
        }
        let ports: Vec<u64> =
            proxy["ports"].as_array().unwrap().iter().map(|p| p["containerPort"].as_u64().unwrap()).collect();
        assert_eq!(ports, [15020, 15021]);
        assert!(proxy["resources"]["requests"]["cpu"].is_string());

        let token = named(&spec["volumes"], "keycard-token");
        let source = &token[0]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(source["audience"], "keycard-ca", "{name}");
        assert_eq!(source["expirationSeconds"].as_u64(), Some(3600));

        // The app is untouched.
        let original = input.iter().find(|d| d["metadata"]["name"] == name).unwrap();
        assert_eq!(spec["containers"], original["spec"]["template"]["spec"]["containers"], "{name}");

        // Its ConfigMap comes just before it, mounted, and the sidecar's own loader accepts it.
        let cm = &out[i - 1];
        let cm_name = format!("keycard-sidecar-{name}");
        assert_eq!(cm["metadata"]["name"], cm_name.as_str());
        assert_eq!(named(&spec["volumes"], "keycard-sidecar")[0]["configMap"]["name"], cm_name.as_str());
        let text = cm["data"]["sidecar.yaml"].as_str().unwrap();
        let cfg = SidecarConfig::parse(text, Path::new("sidecar.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let sa = spec["serviceAccountName"].as_str().unwrap();
        assert_eq!(cfg.spiffe_id().unwrap().as_str(), format!("spiffe://cluster.local/ns/default/sa/{sa}"));
        assert_eq!(
            cfg.workload.labels.get("app"),
            pod["metadata"]["labels"]["app"].as_str().map(str::to_owned).as_ref()
        );
        assert_eq!(cfg.inbound.iter().map(|p| p.port).collect::<Vec<_>>(), [9080]);
        assert!(cfg.capture.is_some());
        let token_file = match &cfg.identity {
            keycard_config::sidecar::IdentitySource::Ca { token_file, url, .. } => {
                assert_eq!(url, "https://keycard-ca.keycard-system.svc:15012");
                token_file.clone()
            }
            other => panic!("{other:?}"),
        };
        let mount = named(&proxy["volumeMounts"], "keycard-token")[0]["mountPath"].as_str().unwrap();
        assert_eq!(token_file, Path::new(mount).join("token"), "the config reads the projected token");
    }
}

#[test]
fn injecting_again_changes_nothing_and_legacy_puts_the_proxy_first() {
    let once = ok(&["inject", "-f", path(&bookinfo())]);
    let (ok_again, twice, _) = inject_stdin(&[], &once);
    assert!(ok_again);
    assert_eq!(twice, once, "inject(inject(x)) == inject(x)");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("legacy.yaml");
    ok(&["inject", "--legacy", "-f", path(&bookinfo()), "-o", path(&file)]);
    let legacy = std::fs::read_to_string(&file).unwrap();
    for doc in by_kind(&docs(&legacy), "Deployment") {
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][0]["name"], "keycard-proxy");
        assert!(spec["containers"][0].get("restartPolicy").is_none());
        assert_eq!(spec["containers"].as_array().unwrap().len(), 2);
        assert_eq!(named(&spec["initContainers"], "keycard-init").len(), 1);
        assert!(named(&spec["initContainers"], "keycard-proxy").is_empty());
    }
    let (_, legacy_twice, _) = inject_stdin(&["--legacy"], &legacy);
    assert_eq!(legacy_twice, legacy);
}

#[test]
fn an_opted_out_template_passes_through_and_broken_yaml_names_its_line() {
    let text = std::fs::read_to_string(bookinfo())
        .unwrap()
        .replacen("      labels: {app: details, version: v1}\n", "      labels: {app: details, version: v1}\n      annotations: {sidecar.istio.io/inject: \"false\"}\n", 1);
    let (success, out, stderr) = inject_stdin(&[], &text);
    assert!(success, "{stderr}");
    let out = docs(&out);
    let details = out.iter().find(|d| d["metadata"]["name"] == "details-v1").unwrap();
    let original = docs(&text).into_iter().find(|d| d["metadata"]["name"] == "details-v1").unwrap();
    assert_eq!(*details, original, "left exactly as it was");
    assert_eq!(by_kind(&out, "ConfigMap").len(), 3);
    assert!(stderr.contains("Deployment/details-v1 left alone"), "{stderr}");

    let broken =
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: a\n   image: b\n";
    let (success, out, stderr) = inject_stdin(&[], broken);
    assert!(!success && out.is_empty());
    let line = stderr.lines().find(|l| l.starts_with("keycard:")).unwrap_or_default();
    assert!(line.starts_with("keycard: <stdin>:8: not valid YAML"), "{stderr}");
}

/// kubernetes-validate: from the CI venv, a local venv, or PATH.
fn kubernetes_validate() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("KEYCARD_KUBERNETES_VALIDATE").map(PathBuf::from),
        Some(repo().join(".ci/venv/bin/kubernetes-validate")),
        Some(repo().join("target/pytools/bin/kubernetes-validate")),
        Some(PathBuf::from("kubernetes-validate")),
    ];
    candidates.into_iter().flatten().find(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn validate(tool: &Path, version: &str, files: &[PathBuf]) {
    let out = Command::new(tool)
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .args(files)
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict -k {version}:\n{report}");
    eprintln!("kubernetes-validate --strict -k {version}: {} files valid", files.len());
}

#[test]
fn injected_manifests_and_deploy_k8s_are_valid_kubernetes() {
    let Some(tool) = kubernetes_validate() else {
        if skip_or_fail("kubernetes-validate (pip install kubernetes-validate)") {
            return;
        }
        unreachable!()
    };
    // The package's version is the newest Kubernetes whose schemas it bundles.
    let bundled = Command::new(&tool).arg("--version").output().unwrap();
    let newest = String::from_utf8_lossy(&bundled.stdout).trim().to_owned();
    assert!(newest.starts_with("1."), "kubernetes-validate --version said {newest:?}");

    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("bookinfo-injected.yaml");
    let legacy = dir.path().join("bookinfo-injected-legacy.yaml");
    ok(&["inject", "-f", path(&bookinfo()), "-o", path(&native)]);
    ok(&["inject", "--legacy", "-f", path(&bookinfo()), "-o", path(&legacy)]);
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files.extend([native.clone(), legacy.clone()]);
    for version in ["1.29.0", newest.as_str()] {
        validate(&tool, version, &files);
    }
    // --legacy is for clusters without native sidecars: its output fits their schema too.
    validate(&tool, "1.27.0", &[legacy]);
}
