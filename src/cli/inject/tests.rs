use std::path::Path;

use keycard_config::sidecar::SidecarConfig;
use serde_json::{Value, json};

use super::*;

fn opts() -> Options {
    Options {
        image: "keycard:dev".into(),
        init_image: "keycard-init:dev".into(),
        namespace: "default".into(),
        trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        ca_url: "https://keycard-ca.keycard-system.svc:15012".into(),
        token_audience: "keycard-ca".into(),
        cert_ttl: std::time::Duration::from_secs(3600),
        legacy: false,
    }
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

fn run(yaml: &str, opts: &Options) -> Injected {
    inject(yaml, "in.yaml", opts).unwrap_or_else(|e| panic!("{e}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect()
}

fn sidecar_config(config_map: &Value) -> SidecarConfig {
    let text = config_map["data"]["sidecar.yaml"].as_str().unwrap();
    SidecarConfig::parse(text, Path::new("sidecar.yaml")).unwrap()
}

const POD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  annotations:
    traffic.sidecar.istio.io/excludeInboundPorts: '8081'
    traffic.sidecar.istio.io/excludeOutboundIPRanges: '169.254.169.254, 10.0.0.0/8'
spec:
  serviceAccountName: web
  initContainers:
  - {name: migrate, image: app}
  containers:
  - name: app
    image: app
    ports:
    - {containerPort: 8080, name: http-web}
    - {containerPort: 8081, name: metrics}
    - {containerPort: 5353, protocol: UDP}
";

#[test]
fn a_pod_gets_the_init_step_the_native_sidecar_and_its_configuration() {
    let out = docs(&run(POD, &opts()).yaml);
    assert_eq!(out.len(), 2, "the ConfigMap, then the Pod");
    let (cm, pod) = (&out[0], &out[1]);
    assert_eq!(cm["metadata"]["name"], "keycard-sidecar-web");
    assert_eq!(cm["metadata"]["namespace"], "shop");
    assert_eq!(names(&pod["spec"]["initContainers"]), ["keycard-init", "keycard-proxy", "migrate"]);
    assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
    let init = &pod["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let flag = |f: &str| args.iter().position(|a| *a == f).map(|i| args[i + 1]);
    assert_eq!(flag("--exclude-inbound-ports"), Some("8081"));
    assert_eq!(flag("--exclude-outbound-cidrs"), Some("169.254.169.254/32,10.0.0.0/8"));
    assert_eq!(flag("--exclude-outbound-ports"), None);
    assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(pod["metadata"]["annotations"]["keycard.dev/injected"], "true");

    let cfg = sidecar_config(cm);
    assert_eq!(cfg.spiffe_id().unwrap().as_str(), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(cfg.workload.labels.get("app").map(String::as_str), Some("web"));
    // 8081 is excluded from capture and UDP is not the sidecar's: only 8080, HTTP by its name.
    let ports: Vec<(u16, String)> =
        cfg.inbound.iter().map(|p| (p.port, format!("{:?}", p.protocol()).to_lowercase())).collect();
    assert_eq!(ports, [(8080, "http".to_owned())]);
    assert_eq!(cfg.inbound[0].app.to_string(), "127.0.0.1:8080");
    let capture = cfg.capture.unwrap();
    assert_eq!(capture.inbound.unwrap().to_string(), "0.0.0.0:15006");
    assert_eq!(capture.outbound.unwrap().to_string(), "127.0.0.1:15001");
}

#[test]
fn injecting_twice_changes_nothing_and_legacy_moves_the_proxy() {
    let once = run(POD, &opts()).yaml;
    assert_eq!(run(&once, &opts()).yaml, once);

    let legacy = Options { legacy: true, ..opts() };
    let out = docs(&run(&once, &legacy).yaml);
    assert_eq!(out.len(), 2, "the old ConfigMap was replaced, not kept beside the new one");
    let pod = &out[1];
    assert_eq!(names(&pod["spec"]["initContainers"]), ["migrate", "keycard-init"]);
    assert_eq!(names(&pod["spec"]["containers"]), ["keycard-proxy", "app"]);
    assert!(pod["spec"]["containers"][0].get("restartPolicy").is_none());
    assert_eq!(pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], "app");
    let volumes = names(&pod["spec"]["volumes"]);
    assert_eq!(volumes.len(), 5, "{volumes:?}");
}

#[test]
fn a_kubectl_list_and_a_cronjob_are_injected_and_opted_out_templates_left_alone() {
    let input = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
         "spec": {"schedule": "0 1 * * *", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "OnFailure", "containers": [{"name": "job", "image": "j"}]}}}}}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "legacy-app"},
         "spec": {"template": {"metadata": {"labels": {"sidecar.istio.io/inject": "false"}},
                  "spec": {"containers": [{"name": "a", "image": "a"}]}}}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "node-agent"},
         "spec": {"template": {"spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "a"}]}}}},
    ]});
    let text = serde_saphyr::to_string(&input).unwrap();
    let injected = run(&text, &opts());
    let out = docs(&injected.yaml);
    let items = out[0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "the CronJob's ConfigMap joins the list");
    assert_eq!(items[0]["kind"], "ConfigMap");
    let job = &items[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(names(&job["initContainers"]), ["keycard-init", "keycard-proxy"]);
    assert_eq!(items[2], input["items"][1], "opted out by label");
    assert_eq!(items[3], input["items"][2], "hostNetwork pods are never captured");
    assert_eq!(injected.notes.len(), 2, "{:?}", injected.notes);
    assert_eq!(run(&injected.yaml, &opts()).yaml, injected.yaml);
}

#[test]
fn services_with_a_cluster_ip_become_upstreams_named_by_the_workloads_they_select() {
    let input = "
apiVersion: v1
kind: Service
metadata: {name: details, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: details}
  ports: [{port: 9080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 443, name: https}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: details-v1, namespace: shop}
spec:
  template:
    metadata: {labels: {app: details}}
    spec: {serviceAccountName: bookinfo-details, containers: [{name: d, image: d}]}
";
    let out = docs(&run(input, &opts()).yaml);
    let cfg = sidecar_config(&out[3]);
    assert_eq!(cfg.outbound.len(), 1, "headless: no address; kubernetes: no sidecar behind it");
    let up = &cfg.outbound[0];
    assert_eq!(up.remote.to_string(), "10.96.0.20:9080");
    assert_eq!(up.host.as_deref(), Some("details.shop.svc.cluster.local"));
    assert_eq!(up.identities[0].as_str(), "spiffe://cluster.local/ns/shop/sa/bookinfo-details");

    // The new upstream changed the configuration, so the pod template changes too (a rollout).
    let alone = input.split("---\n").last().unwrap();
    let status = |docs: &[Value]| {
        docs.last().unwrap()["spec"]["template"]["metadata"]["annotations"]["keycard.dev/status"].clone()
    };
    assert_ne!(status(&docs(&run(alone, &opts()).yaml)), status(&out));
}

#[test]
fn what_cannot_work_is_an_error_naming_the_line() {
    let err = |yaml: &str| inject(yaml, "in.yaml", &opts()).unwrap_err().to_string();
    let pod = |extra: &str, ports: &str| {
        format!(
            "kind: Pod\nmetadata:\n  name: p\n  annotations:\n    {extra}\nspec:\n  containers:\n  - name: a\n    ports: {ports}\n"
        )
    };
    let e = err(&pod("x: y", "[{containerPort: 15006}]"));
    assert!(e.starts_with("in.yaml:9: Pod/p: container a: port 15006"), "{e}");
    let e = err(&pod("x: y", "[{containerPort: 80}, {containerPort: 80}]"));
    assert!(e.contains("declared twice"), "{e}");
    let e = err(&pod("traffic.sidecar.istio.io/includeInboundPorts: '80'", "[]"));
    assert!(e.starts_with("in.yaml:5: ") && e.contains("not supported"), "{e}");
    let e = err(&pod("traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.0.0.0/33", "[]"));
    assert!(e.starts_with("in.yaml:5: ") && e.contains("not a CIDR"), "{e}");
    let twice = format!("{}---\n{}", pod("x: y", "[]"), pod("x: y", "[]"));
    assert!(err(&twice).contains("both would use ConfigMap keycard-sidecar-p"));
    assert!(err("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n").contains("no containers"));
    assert!(err("kind: Deployment\nmetadata: {}\n").contains("without metadata.name"));
    assert!(err("a: [1, 2\n").starts_with("in.yaml:1: not valid YAML"));
}
