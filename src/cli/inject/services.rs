//! Upstreams from the Services of the same input. The sidecar knows a captured outbound connection
//! only by its original destination address, so mutual TLS to a Service needs its cluster IP: a
//! Service with a `spec.clusterIP` (set in the manifest, or by the cluster when the input comes
//! from `kubectl get -o yaml`) becomes one upstream per TCP port, and the service accounts of the
//! input's injected workloads that its selector matches are the identities allowed to answer
//! (secure naming). A Service that selects none of them (the API server's `kubernetes`, one
//! without a selector, one whose pods are not in the input) may have no sidecar behind it, so it
//! is left out; like a Service without a cluster IP it is unknown to the sidecar, and calls to it
//! leave the pod as plain TCP (`outbound_policy: allow_any`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use keycard_config::SpiffeId;
use keycard_config::sidecar::Upstream;
use serde_json::{Map, Value};

use super::Options;

/// A workload's namespace, pod labels and service account, for matching selectors.
pub struct Selectable {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

/// One upstream per TCP port of each Service with a cluster IP, sorted by address.
pub fn upstreams(
    services: &[(&Map<String, Value>, String)],
    workloads: &[Selectable],
    opts: &Options,
) -> Vec<Upstream> {
    let mut out = Vec::new();
    for (svc, namespace) in services {
        let Some(spec) = svc.get("spec") else { continue };
        let Some(ip) = spec.get("clusterIP").and_then(Value::as_str).and_then(|s| s.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let name = svc.get("metadata").and_then(|m| m.get("name")?.as_str()).unwrap_or_default();
        let selector: BTreeMap<&str, &str> = spec
            .get("selector")
            .and_then(Value::as_object)
            .map(|s| s.iter().filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))).collect())
            .unwrap_or_default();
        let mut identities: Vec<SpiffeId> = workloads
            .iter()
            .filter(|w| !selector.is_empty() && w.namespace == *namespace)
            .filter(|w| selector.iter().all(|(k, v)| w.labels.get(*k).map(String::as_str) == Some(*v)))
            .filter_map(|w| SpiffeId::from_k8s(&opts.trust_domain, &w.namespace, &w.service_account).ok())
            .collect();
        if identities.is_empty() {
            continue;
        }
        identities.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        identities.dedup();
        for port in spec.get("ports").and_then(Value::as_array).into_iter().flatten() {
            if port.get("protocol").and_then(Value::as_str).is_some_and(|p| p != "TCP") {
                continue;
            }
            let Some(number) = port.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            out.push(Upstream {
                listen: None,
                remote: SocketAddr::new(ip, number),
                host: Some(format!("{name}.{namespace}.svc.{}", opts.trust_domain)),
                port: Some(number),
                identities: identities.clone(),
                name: port.get("name").and_then(Value::as_str).map(str::to_owned),
                protocol: None,
            });
        }
    }
    out.sort_by_key(|u| u.remote);
    out.dedup_by_key(|u| u.remote);
    out
}
