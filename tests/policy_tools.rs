//! `keycard policy check` on policy sets with each foot-gun (and a clean and a broken one), and
//! `policy explain` against the lab's policies, and `policy route` over DestinationRules in several
//! namespaces.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::keycard;
use serde_json::Value;

const DATA: &str = "tests/data/policy-lint";

fn check(files: &[&str]) -> (i32, Value) {
    let mut cmd = keycard();
    cmd.args(["policy", "check", "-o", "json"]);
    for f in files {
        cmd.args(["-f", f]);
    }
    let out = cmd.output().unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), report)
}

/// `(code, file, line)` of every finding.
fn findings(report: &Value) -> Vec<(String, String, u64)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_owned(),
                f["file"].as_str().unwrap().to_owned(),
                f["line"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn each_footgun_is_reported_with_its_code_file_and_line_and_warnings_exit_3() {
    let workloads = format!("{DATA}/workloads.yaml");
    let cases: &[(&str, &[(&str, u64)])] = &[
        ("kc101-deny-permissive.yaml", &[("KC101", 10)]),
        ("kc102-http-on-tcp.yaml", &[("KC102", 5)]),
        ("kc103-prefix.yaml", &[("KC103", 5)]),
        ("kc104-selector.yaml", &[("KC104", 5)]),
        ("kc105-shadowed.yaml", &[("KC105", 13), ("KC105", 27)]),
        ("kc106-root-selector.yaml", &[("KC106", 5)]),
        ("kc109-port-level-tls.yaml", &[("KC109", 6), ("KC104", 28)]),
    ];
    for (file, want) in cases {
        let path = format!("{DATA}/{file}");
        let (code, report) = check(&[&path, &workloads]);
        assert_eq!(code, 3, "{file}: warnings only exit 3: {report}");
        let got = findings(&report);
        let want: Vec<(String, String, u64)> =
            want.iter().map(|(c, l)| ((*c).to_owned(), path.clone(), *l)).collect();
        assert_eq!(got, want, "{file}: {report:#}");
        assert_eq!(report["workloads"], 2, "the Deployments in workloads.yaml are the known workloads");
    }
}

#[test]
fn the_lints_that_need_workloads_stay_quiet_without_them() {
    // Without manifests nothing says 5432 is TCP or which labels exist.
    for file in ["kc102-http-on-tcp.yaml", "kc104-selector.yaml"] {
        let (code, report) = check(&[&format!("{DATA}/{file}")]);
        assert_eq!((code, findings(&report)), (0, vec![]), "{file}");
    }
    // KC101 still judges by the policy's own scope.
    let (code, report) = check(&[&format!("{DATA}/kc101-deny-permissive.yaml")]);
    assert_eq!(code, 3);
    assert!(
        report["findings"][0]["message"]
            .as_str()
            .unwrap()
            .contains("PERMISSIVE (set by istio-system/default)")
    );
}

#[test]
fn a_clean_set_exits_0_and_an_error_exits_1_with_file_line_and_field() {
    let (code, report) = check(&[&format!("{DATA}/clean.yaml"), &format!("{DATA}/workloads.yaml")]);
    assert_eq!((code, findings(&report)), (0, vec![]), "{report}");
    assert_eq!(report["resources"], 3);
    // The lab's policies are clean too.
    let (code, report) = check(&["deploy/bookinfo/policies.yaml"]);
    assert_eq!((code, findings(&report)), (0, vec![]), "{report}");

    let (code, report) = check(&[&format!("{DATA}/broken.yaml"), &format!("{DATA}/clean.yaml")]);
    assert_eq!(code, 1);
    let e = &report["errors"][0];
    assert_eq!(
        (e["file"].as_str(), e["line"].as_u64()),
        (Some("tests/data/policy-lint/broken.yaml"), Some(8))
    );
    assert!(e["message"].as_str().unwrap().contains("unknown field `principal`"), "{e}");
    // The other file was still read and checked.
    assert_eq!(report["resources"], 3);

    // A directory: every file as one set, and the broken one makes it exit 1. Together, clean.yaml's
    // mesh-wide STRICT is older (read first) than kc101's PERMISSIVE, which is then the one ignored,
    // so the DENY is no longer bypassable.
    let (code, report) = check(&[DATA]);
    assert_eq!(code, 1);
    let got = findings(&report);
    let codes: std::collections::BTreeSet<&str> = got.iter().map(|f| f.0.as_str()).collect();
    for c in ["KC102", "KC103", "KC104", "KC105", "KC106"] {
        assert!(codes.contains(c), "{c} missing from {codes:?}");
    }
    assert!(!codes.contains("KC101"), "{got:?}");
    let shadowed_mesh = ("KC105".to_owned(), format!("{DATA}/kc101-deny-permissive.yaml"), 4);
    assert!(got.contains(&shadowed_mesh), "{got:?}");
}

#[test]
fn stdin_and_text_output() {
    let mut child = keycard()
        .args(["policy", "check", "-f", "-", "-f", &format!("{DATA}/workloads.yaml")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let text = std::fs::read_to_string(format!("{DATA}/kc103-prefix.yaml")).unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.starts_with("<stdin>:5: warning KC103: AuthorizationPolicy shop/web-from-shop:"),
        "{stdout}"
    );
    assert!(stdout.contains("write \"cluster.local/ns/shop/*\""), "{stdout}");
}

fn explain(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_keycard"))
        .args(["policy", "explain", "-f", "deploy/bookinfo/policies.yaml", "-o", "json"])
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap(), v)
}

#[test]
fn explain_names_the_mode_the_policies_considered_and_the_deciding_rule() {
    let details = ["--workload", "default/details", "--labels", "app=details", "--port", "9080"];
    let pp = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
    let (code, v) =
        explain(&[&details[..], &["--from", pp, "--method", "GET", "--path", "/details/0"]].concat());
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["rule"]["policy"], "details-viewer");
    assert_eq!(
        (v["mtls"]["mode"].as_str(), v["mtls"]["source"].as_str()),
        (Some("STRICT"), Some("istio-system/default"))
    );
    let names: Vec<&str> =
        v["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["deny-all", "details-viewer"]);
    assert_eq!(v["policies"][0]["outcome"], "has no rules: matches nothing");

    // The wrong method: the rule's `to.methods` is what fails.
    let (code, v) =
        explain(&[&details[..], &["--from", pp, "--method", "DELETE", "--path", "/details/0"]].concat());
    assert_eq!((code, v["reason"].as_str()), (1, Some("no_matching_allow")));
    assert_eq!(v["policies"][1]["rules"][0]["why"], "to.methods does not match");

    // A path that normalises onto an allowed one is judged after normalisation, as the sidecar does.
    let (code, v) = explain(&[&details[..], &["--from", pp, "--path", "/x/../details/0"]].concat());
    assert_eq!(code, 0, "{v:#}");

    // A plaintext peer never reaches the policies on a STRICT port.
    let (code, v) = explain(&[&details[..], &["--plaintext"]].concat());
    assert_eq!(
        (code, v["reason"].as_str(), v["protocol"].as_str()),
        (1, Some("plaintext_in_strict"), Some("tcp"))
    );

    // A TCP connection cannot match an ALLOW rule with methods.
    let (code, v) = explain(&[&details[..], &["--from", pp, "--protocol", "tcp"]].concat());
    assert_eq!(code, 1);
    assert!(v["policies"][1]["rules"][0]["why"].as_str().unwrap().contains("HTTP-only"), "{v:#}");

    // Labels matter: without them the workload-selected viewer does not apply.
    let (code, v) =
        explain(&["--workload", "default/details", "--port", "9080", "--from", pp, "--path", "/details/0"]);
    assert_eq!(code, 1);
    assert_eq!(v["policies"].as_array().unwrap().len(), 1, "{v:#}");
}

const ROUTE_RULES: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: default}
spec:
  host: details
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/bookinfo-details"]}
    portLevelSettings:
    - port: {number: 9080}
      connectionPool:
        tcp: {connectTimeout: 250ms}
        http: {h2UpgradePolicy: UPGRADE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details-private, namespace: default}
spec:
  host: details.default.svc.cluster.local
  exportTo: ["."]
  trafficPolicy:
    tls: {mode: DISABLE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh, namespace: istio-system}
spec:
  host: "*.cluster.local"
"#;

fn route(workload: &str, host: &str, port: u16, json: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, ROUTE_RULES).unwrap();
    let mut cmd = keycard();
    cmd.args(["policy", "route", "-f"]).arg(&file);
    cmd.args(["--workload", workload, "--host", host, "--port", &port.to_string()]);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `policy route` names the rule a workload's sidecar applies to an upstream, where it came from,
/// and what the port's level sets (nothing inherited from the host-wide level).
#[test]
fn policy_route_names_the_destination_rule_and_what_it_sets_per_port() {
    let host = "details.default.svc.cluster.local";
    let v: Value = serde_json::from_str(&route("default/productpage", host, 9080, true)).unwrap();
    let rule = &v["rule"];
    // The first of two rules for the host in the workload's namespace, the short host made whole.
    assert_eq!((rule["name"].as_str(), rule["tier"].as_str()), (Some("details"), Some("workload")), "{v}");
    assert_eq!(rule["host"], host);
    assert!(rule["origin"].as_str().is_some_and(|o| o.ends_with("rules.yaml:3")), "{v}");
    assert_eq!((rule["port_level"].as_bool(), rule["tls"].is_null()), (Some(true), true), "{v}");
    assert_eq!(rule["pool"]["h2_upgrade"], true);
    let v: Value = serde_json::from_str(&route("default/productpage", host, 9443, true)).unwrap();
    assert_eq!(
        v["rule"]["tls"]["subject_alt_names"][0],
        "spiffe://cluster.local/ns/default/sa/bookinfo-details"
    );
    assert!(v["rule"]["pool"].is_null(), "{v}");

    // From another namespace: the service's namespace's exported rule; the private one is not seen.
    let text = route("shop/web", host, 9443, false);
    assert!(text.contains("rule       default/details ("), "{text}");
    assert!(text.contains("from the service's namespace, exported to the workload's"), "{text}");
    assert!(
        text.contains("tls        ISTIO_MUTUAL: spiffe://cluster.local/ns/default/sa/bookinfo-details"),
        "{text}"
    );
    // The root namespace's wildcard for another service; nothing for a host outside the cluster.
    let v: Value =
        serde_json::from_str(&route("shop/web", "ratings.default.svc.cluster.local", 9080, true)).unwrap();
    assert_eq!((v["rule"]["name"].as_str(), v["rule"]["tier"].as_str()), (Some("mesh"), Some("root")), "{v}");
    let text = route("shop/web", "api.example.com", 443, false);
    assert!(text.contains("rule       none applies"), "{text}");
}
