//! The CA's Prometheus metrics, registered into a registry the caller owns (no globals, so tests
//! get isolated registries).

use prometheus::{Gauge, IntCounterVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct CaMetrics {
    /// Certificates issued, by how the caller authenticated (`token`, `kubernetes` or `mtls`).
    pub issued: IntCounterVec,
    /// Requests refused, by reason (`invalid_token`, `expired_token`, `identity_mismatch`, ...).
    pub refused: IntCounterVec,
    /// Unix seconds at which the earliest-expiring root of the bundle expires.
    pub root_expiry: Gauge,
    /// Unix seconds at which the signing (intermediate) certificate expires.
    pub intermediate_expiry: Gauge,
}

impl CaMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let issued = IntCounterVec::new(
            Opts::new(
                "keycard_ca_certificates_issued_total",
                "Certificates issued, by authentication method",
            ),
            &["auth"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new("keycard_ca_requests_refused_total", "CA requests refused, by reason"),
            &["reason"],
        )?;
        let root_expiry = Gauge::new(
            "keycard_ca_root_expiry_timestamp_seconds",
            "When the earliest-expiring trust bundle root expires (unix seconds)",
        )?;
        let intermediate_expiry = Gauge::new(
            "keycard_ca_intermediate_expiry_timestamp_seconds",
            "When the signing certificate expires (unix seconds)",
        )?;
        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(root_expiry.clone()))?;
        registry.register(Box::new(intermediate_expiry.clone()))?;
        Ok(Self { issued, refused, root_expiry, intermediate_expiry })
    }
}

/// The registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    use prometheus::Encoder as _;
    let mut buf = Vec::new();
    // Encoding only fails on a broken writer, and a Vec never breaks.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
