//! One pod template: what a previous injection added is taken out, then the capture init step,
//! the sidecar (a native sidecar, or with `--legacy` the first container), their volumes and the
//! annotations are put in, and the sidecar's ConfigMap is made.
//!
//! Order in the pod: natively, `keycard-init` then `keycard-proxy` come first among the init
//! containers, so the app's own init containers already run with the proxy carrying their
//! traffic; with `--legacy` no proxy runs during init, so `keycard-init` goes last and the app's
//! init containers still reach the network uncaptured.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use keycard_config::sidecar::Upstream;
use serde_json::{Map, Value, json};

use super::{Options, array_at, object_at, sidecar};

pub const PROXY_NAME: &str = "keycard-proxy";
pub const INIT_NAME: &str = "keycard-init";
/// The generated ConfigMap is this plus the workload's name.
pub const CONFIG_MAP_PREFIX: &str = "keycard-sidecar-";

/// Set on every injected pod template.
pub const INJECTED_ANNOTATION: &str = "keycard.dev/injected";
/// What the injection added (JSON), and by which keycard version.
pub const STATUS_ANNOTATION: &str = "keycard.dev/status";
/// `"false"` in a pod template's annotations or labels leaves it alone (as Istio's).
const OPT_OUT: [&str; 2] = ["keycard.dev/inject", "sidecar.istio.io/inject"];
/// Marks the ConfigMaps `keycard inject` makes, so the next run replaces them.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "keycard-inject");

/// Istio's capture annotations, honoured by passing them to `keycard iptables`.
const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_OUTBOUND_CIDRS: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Istio's include-lists: `keycard iptables` captures everything that is not excluded, so only
/// `*` (Istio's default) can be honoured.
const INCLUDES: [&str; 3] = [
    "traffic.sidecar.istio.io/includeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundPorts",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
];

/// The sidecar's uid and gid: `keycard iptables` never captures its traffic.
pub const PROXY_UID: u32 = 1337;
/// Ports the sidecar itself listens on in the pod; an app port may not be one of them.
pub const SIDECAR_PORTS: [u16; 5] = [
    sidecar::ADMIN_PORT,
    sidecar::CAPTURE_OUTBOUND_PORT,
    sidecar::CAPTURE_INBOUND_PORT,
    sidecar::METRICS_PORT,
    sidecar::READINESS_PORT,
];

/// Volume names this injection owns, and where the proxy mounts them.
const CONFIG_VOLUME: &str = "keycard-sidecar";
const POLICIES_VOLUME: &str = "keycard-policies";
const BUNDLE_VOLUME: &str = "keycard-ca-bundle";
const TOKEN_VOLUME: &str = "keycard-token";
/// The init step's `/run` (iptables-legacy's `xtables.lock`), as its root is read-only.
const INIT_RUN_VOLUME: &str = "keycard-init-run";
const VOLUMES: [&str; 5] = [CONFIG_VOLUME, POLICIES_VOLUME, BUNDLE_VOLUME, TOKEN_VOLUME, INIT_RUN_VOLUME];

/// ConfigMaps the pod mounts besides its own: made once per namespace (see deploy/k8s).
pub const POLICIES_CONFIG_MAP: &str = "keycard-policies";
pub const BUNDLE_CONFIG_MAP: &str = "keycard-ca-bundle";
/// Lifetime kubelet gives the projected token (it renews it at 80%).
const TOKEN_SECONDS: u64 = 3600;

pub struct Workload<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

/// Why a pod template cannot be injected; `near` is text on the offending line, if known.
#[derive(Debug)]
pub struct PodError {
    pub message: String,
    pub near: Option<String>,
}

impl PodError {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), near: None }
    }

    fn near(mut self, text: &str) -> Self {
        self.near = Some(text.to_owned());
        self
    }
}

pub struct Injected {
    /// The ConfigMap with the sidecar's configuration, to apply with the workload.
    pub config_map: Value,
    /// Things that will not work as the user may expect, for stderr.
    pub warnings: Vec<String>,
}

/// Why a pod template is left alone, if it is.
pub fn skip_reason(template: &Map<String, Value>) -> Option<String> {
    let meta = template.get("metadata");
    for key in OPT_OUT {
        for place in ["annotations", "labels"] {
            let value = meta.and_then(|m| m.get(place)?.get(key)?.as_str());
            if value.is_some_and(|v| v.eq_ignore_ascii_case("false")) {
                return Some(format!("{place} say {key}: \"false\""));
            }
        }
    }
    let host_network = template.get("spec").and_then(|s| s.get("hostNetwork")?.as_bool());
    if host_network == Some(true) {
        // Capture rules would be installed in the node's network namespace.
        return Some("hostNetwork: true (capture would change the node's network)".into());
    }
    None
}

/// Injects keycard into `template` (a pod template, or a Pod: `metadata` + `spec`).
pub fn inject(
    template: &mut Map<String, Value>,
    w: &Workload,
    upstreams: &[Upstream],
    opts: &Options,
) -> Result<Injected, PodError> {
    let spec = template
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| PodError::new("no pod spec"))?;
    for list in ["initContainers", "containers", "volumes"] {
        if spec.get(list).is_some_and(|v| !v.is_array() && !v.is_null()) {
            return Err(PodError::new(format!("spec.{list} is not a list")).near(&format!("{list}:")));
        }
    }
    remove_previous(spec);
    let mut warnings = Vec::new();

    let meta = template.get("metadata").and_then(Value::as_object);
    let annotations = |key: &str| meta.and_then(|m| m.get("annotations")?.get(key)?.as_str());
    for key in INCLUDES {
        if let Some(v) = annotations(key).filter(|v| v.trim() != "*") {
            let msg = format!(
                "{key}: {v:?} is not supported: keycard iptables captures all but the excluded (use the exclude annotations)"
            );
            return Err(PodError::new(msg).near(key));
        }
    }
    let exclude_in = ports_annotation(annotations(EXCLUDE_INBOUND_PORTS), EXCLUDE_INBOUND_PORTS)?;
    let exclude_out = ports_annotation(annotations(EXCLUDE_OUTBOUND_PORTS), EXCLUDE_OUTBOUND_PORTS)?;
    let exclude_cidrs = cidrs_annotation(annotations(EXCLUDE_OUTBOUND_CIDRS))?;
    let (labels, service_account) = identity_facts(template);

    let spec = template
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .expect("`spec` is a mapping: checked at the top");
    let apps = spec.get("containers").and_then(Value::as_array).cloned().unwrap_or_default();
    if apps.is_empty() {
        return Err(PodError::new("the pod template has no containers"));
    }
    let first_app = apps[0].get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let ports = app_ports(&apps, &exclude_in)?;
    let pod_uid = spec.get("securityContext").and_then(|s| s.get("runAsUser")?.as_u64());
    for app in &apps {
        let uid = app.get("securityContext").and_then(|s| s.get("runAsUser")?.as_u64()).or(pod_uid);
        if uid == Some(u64::from(PROXY_UID)) {
            let name = app.get("name").and_then(Value::as_str).unwrap_or_default();
            warnings.push(format!(
                "container {name} runs as uid {PROXY_UID}, the sidecar's: its traffic is not captured"
            ));
        }
    }
    if opts.legacy && matches!(w.kind, "Job" | "CronJob") {
        warnings.push("with --legacy the proxy container keeps running, so the Job never completes".into());
    }

    let config_name = format!("{CONFIG_MAP_PREFIX}{}", w.name);
    let config = sidecar::config_yaml(
        &sidecar::Facts {
            namespace: w.namespace,
            service_account: &service_account,
            labels,
            ports: &ports,
            upstreams,
        },
        opts,
    )
    .map_err(PodError::new)?;

    let init = init_container(opts, &exclude_in, &exclude_out, &exclude_cidrs);
    let proxy = proxy_container(opts);
    if opts.legacy {
        array_at(spec, "initContainers").push(init);
        array_at(spec, "containers").insert(0, proxy);
    } else {
        let inits = array_at(spec, "initContainers");
        inits.insert(0, proxy);
        inits.insert(0, init);
    }
    array_at(spec, "volumes").extend(volumes(&config_name, opts));

    let meta = object_at(template, "metadata");
    let annotations = object_at(meta, "annotations");
    annotations.insert(INJECTED_ANNOTATION.into(), "true".into());
    let (inits, containers) =
        if opts.legacy { (vec![INIT_NAME], vec![PROXY_NAME]) } else { (vec![INIT_NAME, PROXY_NAME], vec![]) };
    let status = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "initContainers": inits,
        "containers": containers,
        "volumes": VOLUMES,
        "configMap": config_name,
        // A new configuration (another port, a new upstream) changes the pod template, so
        // `kubectl apply` rolls the pods that read it.
        "configHash": fnv1a(&config),
    });
    annotations.insert(STATUS_ANNOTATION.into(), status.to_string().into());
    if opts.legacy && !first_app.is_empty() {
        // `kubectl logs` and `exec` would otherwise pick the proxy, now the first container.
        annotations.entry("kubectl.kubernetes.io/default-container").or_insert(first_app.into());
    }

    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_name,
            "namespace": w.namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
            "annotations": {"keycard.dev/workload": format!("{}/{}", w.kind, w.name)},
        },
        "data": {sidecar::CONFIG_FILE: config},
    });
    Ok(Injected { config_map, warnings })
}

/// The pod's labels and service account (`default` when the template names none).
pub fn identity_facts(template: &Map<String, Value>) -> (BTreeMap<String, String>, String) {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let labels = template
        .get("metadata")
        .and_then(|m| m.get("labels")?.as_object())
        .map(|l| l.iter().map(|(k, v)| (k.clone(), text(v))).collect())
        .unwrap_or_default();
    let spec = template.get("spec");
    let service_account = ["serviceAccountName", "serviceAccount"]
        .iter()
        .find_map(|k| spec?.get(*k)?.as_str().filter(|s| !s.is_empty()))
        .unwrap_or("default");
    (labels, service_account.to_owned())
}

/// FNV-1a (64 bit) in hex: stable across Rust releases, unlike `DefaultHasher`; it only has to
/// notice a change, not resist forgery.
fn fnv1a(text: &str) -> String {
    let hash = text
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// `(namespace, name)` of a ConfigMap that `keycard inject` made.
pub fn generated_config_map_key(obj: &Map<String, Value>) -> Option<(String, String)> {
    if obj.get("kind").and_then(Value::as_str) != Some("ConfigMap") {
        return None;
    }
    let meta = obj.get("metadata")?;
    if meta.get("labels")?.get(MANAGED_BY.0)?.as_str() != Some(MANAGED_BY.1) {
        return None;
    }
    let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or_default();
    Some((namespace.to_owned(), meta.get("name")?.as_str()?.to_owned()))
}

/// Takes out what an earlier injection added (by name, wherever it is), so injecting again, or
/// with other options, replaces it.
fn remove_previous(spec: &mut Map<String, Value>) {
    let ours =
        |v: &Value, names: &[&str]| v.get("name").and_then(Value::as_str).is_some_and(|n| names.contains(&n));
    for key in ["initContainers", "containers"] {
        if let Some(list) = spec.get_mut(key).and_then(Value::as_array_mut) {
            list.retain(|c| !ours(c, &[INIT_NAME, PROXY_NAME]));
        }
    }
    if let Some(list) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        list.retain(|v| !ours(v, &VOLUMES));
    }
}

/// The TCP ports the app containers declare, with their names: the sidecar's inbound ports.
fn app_ports(apps: &[Value], excluded: &[u16]) -> Result<Vec<(u16, Option<String>)>, PodError> {
    let mut ports: Vec<(u16, Option<String>)> = Vec::new();
    for app in apps {
        let container = app.get("name").and_then(Value::as_str).unwrap_or_default();
        for p in app.get("ports").and_then(Value::as_array).into_iter().flatten() {
            if p.get("protocol").and_then(Value::as_str).is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let number = p.get("containerPort").and_then(Value::as_u64);
            let Some(port) = number.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) else {
                let raw = p.get("containerPort").map_or_else(|| "missing".to_owned(), Value::to_string);
                let msg = format!("container {container}: containerPort {raw} is not a port number");
                return Err(PodError::new(msg).near("containerPort"));
            };
            if SIDECAR_PORTS.contains(&port) {
                let msg =
                    format!("container {container}: port {port} is one the sidecar listens on in the pod");
                return Err(PodError::new(msg).near(&format!("containerPort: {port}")));
            }
            if ports.iter().any(|(seen, _)| *seen == port) {
                let msg = format!("container {container}: port {port} is declared twice in the pod");
                return Err(PodError::new(msg).near(&format!("containerPort: {port}")));
            }
            if !excluded.contains(&port) {
                ports.push((port, p.get("name").and_then(Value::as_str).map(str::to_owned)));
            }
        }
    }
    Ok(ports)
}

fn ports_annotation(value: Option<&str>, key: &str) -> Result<Vec<u16>, PodError> {
    let items = value.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty());
    let ports: BTreeSet<u16> = items
        .map(|s| s.parse::<u16>().map_err(|_| PodError::new(format!("{key}: {s:?} is not a port")).near(key)))
        .collect::<Result<_, _>>()?;
    Ok(ports.into_iter().collect())
}

fn cidrs_annotation(value: Option<&str>) -> Result<Vec<IpNet>, PodError> {
    let key = EXCLUDE_OUTBOUND_CIDRS;
    let items = value.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty());
    items
        .map(|s| {
            // Istio accepts a bare address as a /32 (or /128).
            let net = s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
            net.map_err(|_| PodError::new(format!("{key}: {s:?} is not a CIDR")).near(key))
        })
        .collect()
}

fn init_container(opts: &Options, exclude_in: &[u16], exclude_out: &[u16], cidrs: &[IpNet]) -> Value {
    let mut args: Vec<String> = [
        ("--inbound-port", sidecar::CAPTURE_INBOUND_PORT.to_string()),
        ("--outbound-port", sidecar::CAPTURE_OUTBOUND_PORT.to_string()),
        ("--proxy-uid", PROXY_UID.to_string()),
        ("--proxy-gid", PROXY_UID.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, v)| [flag.to_owned(), v])
    .collect();
    let join = |items: Vec<String>| items.join(",");
    for (flag, list) in [
        ("--exclude-inbound-ports", join(exclude_in.iter().map(u16::to_string).collect())),
        ("--exclude-outbound-ports", join(exclude_out.iter().map(u16::to_string).collect())),
        ("--exclude-outbound-cidrs", join(cidrs.iter().map(IpNet::to_string).collect())),
    ] {
        if !list.is_empty() {
            args.extend([flag.to_owned(), list]);
        }
    }
    json!({
        "name": INIT_NAME,
        "image": opts.init_image,
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
    })
}

fn proxy_container(opts: &Options) -> Value {
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/healthz/ready", "port": sidecar::READINESS_PORT},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let mut proxy = json!({
        "name": PROXY_NAME,
        "image": opts.image,
        "args": ["proxy", "--config", format!("{}/{}", sidecar::CONFIG_DIR, sidecar::CONFIG_FILE), "--log-format", "json"],
        "restartPolicy": "Always",
        "ports": [
            {"name": "http-envoy-prom", "containerPort": sidecar::METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": sidecar::READINESS_PORT, "protocol": "TCP"},
        ],
        // Natively, the app containers start once this succeeds: the certificate is there.
        "startupProbe": probe(1, 600),
        "readinessProbe": probe(15, 4),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": sidecar::CONFIG_DIR, "readOnly": true},
            {"name": POLICIES_VOLUME, "mountPath": sidecar::POLICIES_DIR, "readOnly": true},
            {"name": BUNDLE_VOLUME, "mountPath": sidecar::BUNDLE_DIR, "readOnly": true},
            {"name": TOKEN_VOLUME, "mountPath": sidecar::TOKEN_DIR, "readOnly": true},
        ],
    });
    if opts.legacy
        && let Some(p) = proxy.as_object_mut()
    {
        p.shift_remove("restartPolicy");
    }
    proxy
}

/// The sidecar keeps its key and certificate in memory, so it needs no writable volume.
fn volumes(config_map: &str, opts: &Options) -> Vec<Value> {
    vec![
        json!({"name": CONFIG_VOLUME, "configMap": {"name": config_map}}),
        json!({"name": POLICIES_VOLUME, "configMap": {"name": POLICIES_CONFIG_MAP}}),
        json!({"name": BUNDLE_VOLUME, "configMap": {"name": BUNDLE_CONFIG_MAP}}),
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": opts.token_audience,
            "expirationSeconds": TOKEN_SECONDS,
            "path": sidecar::TOKEN_FILE,
        }}]}}),
        json!({"name": INIT_RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    ]
}
