//! The sidecar's own configuration file (`keycard proxy --config sidecar.yaml`). Every field is
//! documented with its unit and default; see `deploy/examples/sidecar.yaml` for an annotated file.
//! Relative paths are relative to the configuration file's directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::identity::{SpiffeId, TrustDomain};
use crate::policy::load::{LoadError, error_at};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub workload: Workload,
    pub identity: IdentitySource,
    /// Ports of the workload that peers call: each on its own listener, or reached by capture.
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
    /// Upstreams the workload calls: the app connects in plaintext to `listen`, or to the
    /// upstream's own address when its traffic is captured.
    #[serde(default)]
    pub outbound: Vec<Upstream>,
    /// Transparent interception: where connections redirected by `keycard iptables` arrive.
    #[serde(default)]
    pub capture: Option<Capture>,
    #[serde(default)]
    pub policy: PolicySource,
    /// Admin API (config_dump, certs, handshake failures). Default 127.0.0.1:15000.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Prometheus metrics (`/stats/prometheus`, `/metrics`). Default 127.0.0.1:15020.
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    /// Readiness (`/healthz/ready`). Default 127.0.0.1:15021.
    #[serde(default = "default_readiness")]
    pub readiness: SocketAddr,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub tls: TlsSettings,
}

/// TLS handling beyond what PeerAuthentication and DestinationRules say.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Kernel TLS for mesh connections once their handshake is done: `auto` (the default) hands
    /// record encryption to the kernel where it offers the `tls` module and the negotiated cipher
    /// (probed at start), so an L4 connection's legs are spliced without entering user space and
    /// an HTTP one is read and written as plaintext; elsewhere, and with `off`, the connection
    /// goes to keycard's record layer (`user_records`), else stays with rustls.
    pub kernel_offload: KernelOffload,
    /// keycard's own record layer for mesh connections the kernel does not take: `on` (the
    /// default) takes the traffic keys out of rustls after the handshake, as for the kernel, then
    /// opens records in place (rustls' decrypter) in one buffer that an idle connection does not
    /// hold and seals them with aws-lc-rs (L4 connections, the HTTP ones this sidecar serves and
    /// its pooled HTTP ones); `off` leaves such connections with rustls' buffered connection.
    pub user_records: UserRecords,
}

/// See [`TlsSettings::user_records`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRecords {
    #[default]
    On,
    Off,
}

/// See [`TlsSettings::kernel_offload`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelOffload {
    #[default]
    Auto,
    Off,
}

/// HTTP handling (ports whose protocol is HTTP, declared or detected).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Istio's `pathNormalization`: `none`, `base` (RFC 3986, the default), `merge_slashes`,
    /// `decode_and_merge_slashes`. Policies match, and apps receive, the normalised path.
    pub path_normalization: crate::http::PathNormalization,
    /// Request headers per request; more is answered 431. Default 100 (Envoy's).
    pub max_headers: usize,
    /// Bytes of a request head (HTTP/1) or header list (HTTP/2); more is answered 431.
    /// Default 60 KiB (Envoy's `max_request_headers_kb`).
    pub max_header_bytes: usize,
    /// A request head must arrive within this. Default 10 s.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// Whole request to whole response; `0s` (the default, as in Istio) for none. Past it: 504.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Concurrent HTTP/2 streams per downstream connection. Default 100.
    pub max_concurrent_streams: u32,
    /// Mutual-TLS HTTP/2 connections per upstream sidecar. Default 4. Times
    /// `pool_streams_per_connection`: the most HTTP/1.1 requests in flight on pooled HTTP/1.1
    /// connections of their own (see `h2_upgrade`).
    pub pool_max_connections: usize,
    /// A pooled connection with this many requests in flight makes the pool open another
    /// (up to `pool_max_connections`). Default 100.
    pub pool_streams_per_connection: usize,
    /// HTTP/1.1 requests to a remote sidecar travel as HTTP/2 on the shared pooled connections
    /// (Istio's `h2UpgradePolicy: UPGRADE`). Default false: as the app sent them, each on a pooled
    /// HTTP/1.1 connection of its own (Istio's default, `DO_NOT_UPGRADE`), which costs the two
    /// sidecars less per request; HTTP/2 and gRPC requests share HTTP/2 connections either way.
    /// At most `pool_max_connections` x `pool_streams_per_connection` HTTP/1.1 requests are in
    /// flight per upstream sidecar on their own connections; more ride the HTTP/2 connections.
    /// This is the mesh-wide choice: a DestinationRule's `connectionPool.http.h2UpgradePolicy`
    /// (or `useClientProtocol: true`) for the upstream's host decides for that host.
    pub h2_upgrade: bool,
    /// A downstream HTTP/1.1 keep-alive connection whose requests come less than this apart keeps
    /// its HTTP state and buffers (about 16 KiB) between them, until no byte has moved for this
    /// long; a new or quiet connection lets go of them after every response. `0s`: always let go.
    /// Default 100 ms.
    #[serde(with = "duration")]
    pub rest_after: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            path_normalization: crate::http::PathNormalization::default(),
            max_headers: 100,
            max_header_bytes: 60 * 1024,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::ZERO,
            max_concurrent_streams: 100,
            pool_max_connections: 4,
            pool_streams_per_connection: 100,
            h2_upgrade: false,
            rest_after: Duration::from_millis(100),
        }
    }
}

/// Who this workload is.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub trust_domain: TrustDomain,
    pub namespace: String,
    pub service_account: String,
    /// Matched by policies' `selector.matchLabels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Where the workload's certificate comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum IdentitySource {
    /// From `keycard ca serve`: a key and CSR made here, a bootstrap token for the first
    /// certificate, renewal over mutual TLS at half life.
    Ca {
        /// `https://host:port` of the CA.
        url: String,
        /// File holding the bootstrap token (read when a first certificate is needed).
        token_file: PathBuf,
        /// PEM trust bundle; reloaded when it changes.
        bundle: PathBuf,
        /// Requested certificate lifetime. Default 24 h (the CA may shorten it).
        #[serde(default = "default_cert_ttl", with = "duration")]
        ttl: Duration,
    },
    /// Static files (for instance from `keycard ca issue`); reloaded when they change.
    Files { cert: PathBuf, key: PathBuf, bundle: PathBuf },
}

/// What a port carries. Istio's port-name convention (`http-web`, `grpc`, `tcp-db`, ...) picks it
/// when only a `name` is given; with neither, the protocol is detected.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes, unparsed; no detection, so server-first protocols (MySQL, SMTP) never wait.
    Tcp,
    /// HTTP/1.1 to the app (and HTTP/2 between sidecars).
    Http,
    /// HTTP/2 with prior knowledge (h2c) to the app.
    Http2,
    /// gRPC: HTTP/2 to the app, `grpc-status` in metrics.
    Grpc,
    /// Detected from the first bytes (an HTTP/1 method or the HTTP/2 preface), bounded by
    /// `limits.detect_timeout`; anything else, or nothing in time, is TCP.
    #[default]
    Auto,
}

impl Protocol {
    /// Istio's port-name convention: `<protocol>[-<suffix>]`.
    pub fn from_port_name(name: &str) -> Self {
        let head = name.split('-').next().unwrap_or_default().to_ascii_lowercase();
        match (head.as_str(), name.to_ascii_lowercase().starts_with("grpc-web")) {
            (_, true) => Self::Http,
            ("http", _) => Self::Http,
            ("http2", _) => Self::Http2,
            ("grpc", _) => Self::Grpc,
            ("tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "mqtt" | "kafka", _) => Self::Tcp,
            _ => Self::Auto,
        }
    }

    /// `declared`, else what `name` says, else detection.
    pub fn resolve(declared: Option<Self>, name: Option<&str>) -> Self {
        declared.or_else(|| name.map(Self::from_port_name)).unwrap_or_default()
    }

    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundPort {
    /// The service port, as policies (`ports`, `portLevelMtls`) name it.
    pub port: u16,
    /// Where peers connect (the sidecar's listener for this port). Without it, the port is
    /// reached through `capture.inbound` only.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The application, normally on loopback.
    pub app: SocketAddr,
    /// Istio port name (`http-web`, `grpc`, `tcp-db`): picks the protocol when none is given.
    #[serde(default)]
    pub name: Option<String>,
    /// `tcp`, `http`, `http2`, `grpc` or `auto`. Default: from `name`, else `auto`.
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

impl InboundPort {
    pub fn protocol(&self) -> Protocol {
        Protocol::resolve(self.protocol, self.name.as_deref())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Where the app connects, in plaintext. Without it, the upstream is reached through
    /// `capture.outbound` only: the app connects to `remote` and the connection is redirected.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The remote sidecar's inbound listener.
    pub remote: SocketAddr,
    /// The service host name, for DestinationRule lookup (e.g. `reviews.default.svc.cluster.local`).
    #[serde(default)]
    pub host: Option<String>,
    /// The service port, for DestinationRule `portLevelSettings`. Default: `remote`'s port.
    #[serde(default)]
    pub port: Option<u16>,
    /// SPIFFE IDs the server may present (secure naming). Empty: a DestinationRule's
    /// `subjectAltNames` for `host`, else any identity of the trust domain.
    #[serde(default)]
    pub identities: Vec<SpiffeId>,
    /// Istio port name: picks the protocol when none is given.
    #[serde(default)]
    pub name: Option<String>,
    /// HTTP protocols are carried over pooled mutual-TLS HTTP/2 connections to the remote
    /// sidecar; `tcp` is one TLS connection per app connection. Default: from `name`, else `auto`.
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

impl Upstream {
    pub fn protocol(&self) -> Protocol {
        Protocol::resolve(self.protocol, self.name.as_deref())
    }
}

/// Istio's capture ports and what happens to captured traffic nobody configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    /// Inbound TCP redirected here (Istio uses `0.0.0.0:15006`). The original destination port
    /// picks the inbound port; a port not listed goes to the app at the original destination,
    /// under the workload's PeerAuthentication and AuthorizationPolicy, with protocol `auto`.
    #[serde(default)]
    pub inbound: Option<SocketAddr>,
    /// Outbound TCP redirected here (Istio uses `127.0.0.1:15001`). The original destination
    /// picks the upstream whose `remote` it is.
    #[serde(default)]
    pub outbound: Option<SocketAddr>,
    /// Captured outbound traffic to an address no upstream names: `allow_any` forwards it as
    /// plain TCP (Istio's default), `registry_only` refuses it.
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySource {
    /// Files or directories of Istio YAML. Watched; SIGHUP also reloads.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Policies here apply mesh-wide. Default `istio-system`.
    #[serde(default = "default_root_ns")]
    pub root_namespace: String,
}

impl Default for PolicySource {
    fn default() -> Self {
        Self { paths: Vec::new(), root_namespace: default_root_ns() }
    }
}

/// Deadlines and caps. Durations are humantime strings (`10s`, `1h`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Whole TLS handshake, absolute (trickled bytes do not extend it). Default 10 s.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Waiting for a client's first bytes to tell TLS from plaintext (PERMISSIVE). Default 5 s.
    #[serde(with = "duration")]
    pub detect_timeout: Duration,
    /// Connecting to the app or a remote sidecar. Default 5 s.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed. Default 1 h.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Live connections per sidecar; beyond it new ones are closed at once. Default 10000.
    pub max_connections: usize,
    /// On SIGTERM, how long live connections may finish. Default 5 s.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// How often policy and certificate files are checked for changes. Default 1 s.
    #[serde(with = "duration")]
    pub watch_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(5),
            watch_interval: Duration::from_secs(1),
        }
    }
}

impl SidecarConfig {
    /// Reads and checks a configuration file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        let mut cfg = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.rebase(base);
        Ok(cfg)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, LoadError> {
        let cfg: Self =
            serde_saphyr::from_str(text).map_err(|e| crate::policy::load::yaml_error(&e, text, origin))?;
        let capture = cfg.capture.as_ref();
        let line_of =
            |needle: &str| text.lines().position(|l| l.contains(needle)).map_or(0, |i| i as u64 + 1);
        if let Some(p) = cfg.inbound.iter().find(|p| p.listen.is_none())
            && capture.and_then(|c| c.inbound).is_none()
        {
            let msg =
                format!("inbound port {}: `listen` is required unless `capture.inbound` is set", p.port);
            return Err(error_at(origin, text, line_of(&format!("port: {}", p.port)), 1, msg));
        }
        if let Some(u) = cfg.outbound.iter().find(|u| u.listen.is_none())
            && capture.and_then(|c| c.outbound).is_none()
        {
            let msg = format!("upstream {}: `listen` is required unless `capture.outbound` is set", u.remote);
            return Err(error_at(origin, text, line_of(&u.remote.to_string()), 1, msg));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &cfg.inbound {
            if !seen.insert(p.port) {
                let line =
                    text.lines().position(|l| l.contains(&format!("port: {}", p.port))).map_or(0, |i| i + 1);
                return Err(error_at(
                    origin,
                    text,
                    line as u64,
                    1,
                    format!("inbound port {} is listed twice", p.port),
                ));
            }
        }
        Ok(cfg)
    }

    /// The workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> Result<SpiffeId, crate::IdError> {
        SpiffeId::from_k8s(
            &self.workload.trust_domain,
            &self.workload.namespace,
            &self.workload.service_account,
        )
    }

    fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match &mut self.identity {
            IdentitySource::Ca { token_file, bundle, .. } => {
                fix(token_file);
                fix(bundle);
            }
            IdentitySource::Files { cert, key, bundle } => {
                fix(cert);
                fix(key);
                fix(bundle);
            }
        }
        self.policy.paths.iter_mut().for_each(fix);
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15020))
}
fn default_readiness() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15021))
}
fn default_root_ns() -> String {
    crate::policy::DEFAULT_ROOT_NAMESPACE.to_owned()
}
fn default_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Durations as humantime strings (`10s`, `500ms`, `1h`).
pub mod duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 10s or 1h: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotated_example_parses_and_paths_are_rebased() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/sidecar.yaml");
        let cfg = SidecarConfig::load(&path).unwrap();
        assert_eq!(
            cfg.spiffe_id().unwrap().as_str(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-details"
        );
        assert_eq!(cfg.inbound[0].port, 9080);
        assert_eq!(cfg.limits.handshake_timeout, Duration::from_secs(10));
        assert!(cfg.policy.paths[0].is_absolute() || cfg.policy.paths[0].starts_with(path.parent().unwrap()));
        let IdentitySource::Ca { ttl, .. } = cfg.identity else { panic!("ca identity") };
        assert_eq!(ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let text = "workload:\n  trust_domain: cluster.local\n  namespace: a\n  service_account: b\nidentity:\n  files: {cert: c, key: k, bundle: b}\nlimits:\n  handshake_timeout: soon\n";
        let e = SidecarConfig::parse(text, Path::new("s.yaml")).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (8, Some("handshake_timeout")), "{e}");
        let text = "workload:\n  trust_domain: Cluster.local\n  namespace: a\n  service_account: b\nidentity:\n  files: {cert: c, key: k, bundle: b}\n";
        let e = SidecarConfig::parse(text, Path::new("s.yaml")).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (2, Some("trust_domain")), "{e}");
        let text = "workload:\n  trust_domain: cluster.local\n  namespace: a\n  service_account: b\n  color: red\nidentity:\n  files: {cert: c, key: k, bundle: b}\n";
        let e = SidecarConfig::parse(text, Path::new("s.yaml")).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (5, Some("color")), "{e}");
    }

    #[test]
    fn ports_without_listeners_need_capture() {
        let head = "workload:\n  trust_domain: cluster.local\n  namespace: a\n  service_account: b\nidentity:\n  files: {cert: c, key: k, bundle: b}\n";
        let inbound = "inbound:\n  - port: 9080\n    app: 127.0.0.1:9080\n";
        let e = SidecarConfig::parse(&format!("{head}{inbound}"), Path::new("s.yaml")).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("capture.inbound"), "{e}");
        let outbound = "outbound:\n  - remote: 10.0.0.2:9080\n";
        let e = SidecarConfig::parse(&format!("{head}{outbound}"), Path::new("s.yaml")).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("capture.outbound"), "{e}");
        let capture =
            "capture: {inbound: 0.0.0.0:15006, outbound: 127.0.0.1:15001, outbound_policy: registry_only}\n";
        let cfg = SidecarConfig::parse(&format!("{head}{inbound}{outbound}{capture}"), Path::new("s.yaml"))
            .unwrap();
        let c = cfg.capture.unwrap();
        assert_eq!(c.outbound_policy, OutboundPolicy::RegistryOnly);
        assert_eq!(c.inbound, Some("0.0.0.0:15006".parse().unwrap()));
        assert!(cfg.inbound[0].listen.is_none() && cfg.outbound[0].listen.is_none());
    }
}
