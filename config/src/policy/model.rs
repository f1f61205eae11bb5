//! Istio's security resources as they appear in YAML (security.istio.io and networking.istio.io,
//! v1 and v1beta1): `PeerAuthentication`, `AuthorizationPolicy`, `RequestAuthentication`, and the
//! TLS and connection-pool parts of `DestinationRule`. Unknown fields are errors; strings that need
//! checking are `Spanned` so a semantic error can still name its line.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_saphyr::Spanned;

pub type S = Spanned<String>;

/// The Kubernetes object metadata keycard reads; the server-set fields of `kubectl get -o yaml`
/// output are accepted and ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, Spanned<String>>,
    /// RFC 3339; with several policies at one level, the oldest wins.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    uid: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    resource_version: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    generation: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    managed_fields: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    finalizers: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    owner_references: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    generate_name: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

// ---- PeerAuthentication ----

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<PeerMtls>,
    #[serde(default)]
    pub port_level_mtls: Option<Spanned<BTreeMap<u16, PeerMtls>>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PeerMtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// PeerAuthentication's mode. `Unset` inherits from the enclosing level.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unset => "UNSET",
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        }
    }
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- AuthorizationPolicy ----

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub target_refs: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub action: Option<S>,
    #[serde(default)]
    pub provider: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<S>,
    #[serde(default)]
    pub not_principals: Vec<S>,
    #[serde(default)]
    pub request_principals: Vec<S>,
    #[serde(default)]
    pub not_request_principals: Vec<S>,
    #[serde(default)]
    pub namespaces: Vec<S>,
    #[serde(default)]
    pub not_namespaces: Vec<S>,
    #[serde(default)]
    pub ip_blocks: Vec<S>,
    #[serde(default)]
    pub not_ip_blocks: Vec<S>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<S>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<S>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<S>,
    #[serde(default)]
    pub not_hosts: Vec<S>,
    #[serde(default)]
    pub ports: Vec<S>,
    #[serde(default)]
    pub not_ports: Vec<S>,
    #[serde(default)]
    pub methods: Vec<S>,
    #[serde(default)]
    pub not_methods: Vec<S>,
    #[serde(default)]
    pub paths: Vec<S>,
    #[serde(default)]
    pub not_paths: Vec<S>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    pub key: S,
    #[serde(default)]
    pub values: Vec<S>,
    #[serde(default)]
    pub not_values: Vec<S>,
}

// ---- RequestAuthentication ----

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub target_refs: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub jwt_rules: Vec<Spanned<JwtRule>>,
}

/// Istio's `JWTRule`. `issuer` is required and checked after parsing, so its absence names the
/// rule's line.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    #[serde(default)]
    pub issuer: Option<S>,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// An inline JWKS, as a JSON string.
    #[serde(default)]
    pub jwks: Option<S>,
    /// Istio's CRD also accepts the proto name `jwks_uri`.
    #[serde(default, alias = "jwks_uri")]
    pub jwks_uri: Option<S>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<S>,
    #[serde(default)]
    pub from_cookies: Vec<S>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_payload_to_header: Option<S>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// A protobuf duration (`"5s"`, `"1.5s"`).
    #[serde(default)]
    pub timeout: Option<S>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    pub name: S,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: S,
    pub claim: S,
}

// ---- DestinationRule (TLS settings, and how requests travel) ----

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Subsets route traffic, which keycard does not do; their TLS settings are not applied.
    #[serde(default)]
    pub subsets: Option<Spanned<IgnoredAny>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Read for how requests travel (`h2UpgradePolicy`, `useClientProtocol`) and the connect
    /// deadline; the rest of it is reported at load and ignored.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    // Traffic management keycard does not do; accepted so Istio files load, reported at load.
    #[serde(default)]
    pub load_balancer: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub outlier_detection: Option<Spanned<IgnoredAny>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: PortSelector,
    #[serde(default)]
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub load_balancer: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub outlier_detection: Option<Spanned<IgnoredAny>>,
}

/// A DestinationRule's `connectionPool`, every field Istio defines: those keycard acts on typed,
/// the others kept only with their line, to be reported.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default)]
    pub tcp: Option<TcpPool>,
    #[serde(default)]
    pub http: Option<HttpPool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPool {
    /// The deadline for TCP connections to the destination (a protobuf or humantime duration).
    #[serde(default)]
    pub connect_timeout: Option<S>,
    #[serde(default)]
    pub max_connections: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub tcp_keepalive: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub max_connection_duration: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub idle_timeout: Option<Spanned<IgnoredAny>>,
}

impl TcpPool {
    /// The fields keycard does not act on, by name, where present.
    pub fn ignored(&self) -> [(&'static str, &Option<Spanned<IgnoredAny>>); 4] {
        [
            ("maxConnections", &self.max_connections),
            ("tcpKeepalive", &self.tcp_keepalive),
            ("maxConnectionDuration", &self.max_connection_duration),
            ("idleTimeout", &self.idle_timeout),
        ]
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPool {
    #[serde(default)]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Keep the client's protocol (no upgrade to HTTP/2), whatever `h2UpgradePolicy` says.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    #[serde(default)]
    pub http1_max_pending_requests: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub http2_max_requests: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub max_requests_per_connection: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub max_retries: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub idle_timeout: Option<Spanned<IgnoredAny>>,
    #[serde(default)]
    pub max_concurrent_streams: Option<Spanned<IgnoredAny>>,
}

impl HttpPool {
    /// The fields keycard does not act on, by name, where present.
    pub fn ignored(&self) -> [(&'static str, &Option<Spanned<IgnoredAny>>); 6] {
        [
            ("http1MaxPendingRequests", &self.http1_max_pending_requests),
            ("http2MaxRequests", &self.http2_max_requests),
            ("maxRequestsPerConnection", &self.max_requests_per_connection),
            ("maxRetries", &self.max_retries),
            ("idleTimeout", &self.idle_timeout),
            ("maxConcurrentStreams", &self.max_concurrent_streams),
        ]
    }
}

/// Whether HTTP/1.1 requests to the destination travel between the sidecars as HTTP/2.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// The mesh-wide choice: the sidecar's `http.h2_upgrade`.
    #[default]
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTls {
    #[serde(default)]
    pub mode: ClientTlsMode,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<S>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub credential_name: Option<S>,
    #[serde(default)]
    pub insecure_skip_verify: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    Disable,
    Simple,
    Mutual,
    #[default]
    IstioMutual,
}

impl ClientTlsMode {
    /// As Istio's YAML spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "DISABLE",
            Self::Simple => "SIMPLE",
            Self::Mutual => "MUTUAL",
            Self::IstioMutual => "ISTIO_MUTUAL",
        }
    }
}
