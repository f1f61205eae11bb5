//! The CA's HTTPS API as data: paths and JSON bodies, shared by the server (`keycard-ca`) and its
//! client in the sidecar (`keycard-proxy`), which do not depend on each other.
//!
//! `POST /v1/sign` takes a [`SignRequest`]. The caller authenticates with `Authorization: Bearer
//! <bootstrap token>` or, to renew, with its current SVID as the TLS client certificate. The
//! identity in the certificate comes from that authentication alone. Success is a
//! [`SignResponse`]; a refusal is an HTTP error status with an [`ErrorBody`].

use serde::{Deserialize, Serialize};

pub const SIGN_PATH: &str = "/v1/sign";
pub const BUNDLE_PATH: &str = "/v1/bundle";
pub const METRICS_PATH: &str = "/metrics";
pub const HEALTH_PATH: &str = "/healthz";

/// The CA's own identity, presented by `ca serve` and checked by its clients (secure naming).
pub const CA_NAMESPACE: &str = "keycard-system";
pub const CA_SERVICE_ACCOUNT: &str = "keycard-ca";

/// The largest request body the CA reads, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// A PKCS#10 certificate signing request, PEM. Its signature is checked; its subject and SANs
    /// are ignored except that a URI SAN naming another identity is refused.
    pub csr: String,
    /// Requested lifetime in seconds; clamped to the CA's maximum. Absent: the CA's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignResponse {
    pub spiffe_id: String,
    /// PEM: the leaf, its intermediate(s), then the root.
    pub chain: String,
    /// PEM: every root of the trust domain.
    pub bundle: String,
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable reason, as counted in `keycard_ca_requests_refused_total{reason}`.
    pub error: String,
    pub message: String,
}
