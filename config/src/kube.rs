//! Workloads described by Kubernetes manifests, read so the policy tools can check selectors and
//! port protocols against what will run: the pod templates of Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, Jobs and CronJobs, bare Pods, and the Services that select them
//! (whose port names and `appProtocol` say what a port carries, as in Istio).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::policy::LoadError;
use crate::policy::load::yaml_error;
use crate::sidecar::Protocol;

/// One workload: what a selector and a port-level rule see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ports: Vec<WorkloadPort>,
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadPort {
    pub port: u16,
    pub name: Option<String>,
    pub protocol: Protocol,
}

const POD_TEMPLATE_KINDS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"];

/// The workloads of one YAML text (documents of other kinds are passed over). Ports take their
/// protocol from a Service in the same text that selects the workload and targets the port, else
/// from the container port's name (Istio's port-name convention), else detection (`auto`).
pub fn workloads(text: &str, file: &Path) -> Result<Vec<Workload>, LoadError> {
    let docs: Vec<Option<Value>> =
        serde_saphyr::from_multiple(text).map_err(|e| yaml_error(&e, text, file))?;
    let docs: Vec<Value> = docs.into_iter().flatten().flat_map(list_items).collect();
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    let mut out = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let pod = match kind {
            "Pod" => doc,
            "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"],
            k if POD_TEMPLATE_KINDS.contains(&k) => &doc["spec"]["template"],
            _ => continue,
        };
        let namespace = str_of(&doc["metadata"]["namespace"]).unwrap_or("default").to_owned();
        let labels = string_map(&pod["metadata"]["labels"]);
        let ports = pod_ports(pod, &labels, &namespace, &services);
        out.push(Workload {
            kind: kind.to_owned(),
            namespace,
            name: str_of(&doc["metadata"]["name"]).unwrap_or("?").to_owned(),
            labels,
            service_account: str_of(&pod["spec"]["serviceAccountName"])
                .or_else(|| str_of(&pod["spec"]["serviceAccount"]))
                .unwrap_or("default")
                .to_owned(),
            ports,
            file: file.to_owned(),
        });
    }
    Ok(out)
}

/// A `kind: List` (what `kubectl get -o yaml` prints for several objects) is its items.
fn list_items(doc: Value) -> Vec<Value> {
    match (doc["kind"].as_str(), doc.get("items")) {
        (Some("List"), Some(Value::Array(items))) => items.clone(),
        _ => vec![doc],
    }
}

fn pod_ports(
    pod: &Value,
    labels: &BTreeMap<String, String>,
    namespace: &str,
    services: &[&Value],
) -> Vec<WorkloadPort> {
    let containers = pod["spec"]["containers"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut ports: Vec<WorkloadPort> = Vec::new();
    for p in containers.iter().flat_map(|c| c["ports"].as_array().map(Vec::as_slice).unwrap_or_default()) {
        let Some(port) = p["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok()) else { continue };
        if p["protocol"].as_str().is_some_and(|proto| proto != "TCP") || ports.iter().any(|w| w.port == port)
        {
            continue;
        }
        let name = str_of(&p["name"]).map(str::to_owned);
        let from_service = services
            .iter()
            .filter(|s| str_of(&s["metadata"]["namespace"]).unwrap_or("default") == namespace)
            .filter(|s| {
                let sel = string_map(&s["spec"]["selector"]);
                !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .flat_map(|s| s["spec"]["ports"].as_array().map(Vec::as_slice).unwrap_or_default())
            .find(|sp| match &sp["targetPort"] {
                Value::Number(n) => n.as_u64() == Some(u64::from(port)),
                Value::String(t) => name.as_deref() == Some(t.as_str()) || t == &port.to_string(),
                _ => sp["port"].as_u64() == Some(u64::from(port)),
            })
            .and_then(service_port_protocol);
        let protocol = from_service.unwrap_or_else(|| Protocol::resolve(None, name.as_deref()));
        ports.push(WorkloadPort { port, name, protocol });
    }
    ports
}

/// Istio's protocol selection for a Service port: `appProtocol`, then the port name.
fn service_port_protocol(sp: &Value) -> Option<Protocol> {
    if let Some(app) = str_of(&sp["appProtocol"]) {
        return Some(match app {
            "kubernetes.io/h2c" => Protocol::Http2,
            other => Protocol::from_port_name(other),
        });
    }
    str_of(&sp["name"]).map(Protocol::from_port_name)
}

fn str_of(v: &Value) -> Option<&str> {
    v.as_str()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKINFO: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: details, labels: {app: details}}
spec:
  selector: {app: details}
  ports: [{port: 9080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  selector: {app: db}
  ports: [{port: 5432, targetPort: pg, appProtocol: tcp}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: details-v1}
spec:
  template:
    metadata: {labels: {app: details, version: v1}}
    spec:
      serviceAccountName: bookinfo-details
      containers:
        - name: details
          ports: [{containerPort: 9080}, {containerPort: 9090, name: grpc-admin}, {containerPort: 53, protocol: UDP}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: data}
spec:
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: pg, ports: [{containerPort: 5432, name: pg}]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: other}
data: {a: b}
"#;

    #[test]
    fn pod_templates_become_workloads_with_port_protocols_from_their_services() {
        let w = workloads(BOOKINFO, Path::new("bookinfo.yaml")).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].name.as_str(), w[0].namespace.as_str()), ("details-v1", "default"));
        assert_eq!(w[0].service_account, "bookinfo-details");
        assert_eq!(w[0].labels.get("version").map(String::as_str), Some("v1"));
        let protocols: Vec<(u16, Protocol)> = w[0].ports.iter().map(|p| (p.port, p.protocol)).collect();
        // 9080 by the Service's port name; 9090 by its own name; UDP is not a port policies see.
        assert_eq!(protocols, [(9080, Protocol::Http), (9090, Protocol::Grpc)]);
        // A named targetPort, and appProtocol over the (absent) name.
        assert_eq!((w[1].namespace.as_str(), w[1].ports[0].protocol), ("data", Protocol::Tcp));
        assert_eq!(w[1].service_account, "default");
    }

    #[test]
    fn broken_yaml_names_its_line() {
        let err = workloads("kind: Pod\nmetadata: {name: [\n", Path::new("x.yaml")).unwrap_err();
        assert_eq!(err.file, Path::new("x.yaml"));
        assert!(err.line >= 2, "{err}");
    }
}
