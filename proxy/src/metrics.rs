//! The sidecar's Prometheus metrics: Istio's standard TCP metrics and labels (so existing
//! dashboards work) plus keycard's own. Registered into a registry the caller owns. Labels come
//! from bounded sets: identities, namespaces, policy rule names, typed reasons, ports.

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};

/// Istio's TCP metric labels, in order.
pub const TCP_LABELS: &[&str] = &[
    "reporter",
    "source_principal",
    "destination_principal",
    "source_workload_namespace",
    "destination_workload_namespace",
    "connection_security_policy",
    "response_flags",
];

/// `labels` (in [`TCP_LABELS`] order) with Envoy's `response_flags` set to `flags`.
pub fn with_flags(labels: &[String], flags: &str) -> Vec<String> {
    let mut out = labels.to_vec();
    if let Some(slot) = out.last_mut() {
        *slot = flags.to_owned();
    }
    out
}

#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_sent: IntCounterVec,
    pub tcp_received: IntCounterVec,
    /// `keycard_handshake_failures_total{direction, reason}`.
    pub handshake_failures: IntCounterVec,
    /// `keycard_authz_decisions_total{policy, action, enforced}`: `action` allow/deny/audit,
    /// `enforced` false for dry-run policies.
    pub authz: IntCounterVec,
    /// `keycard_plaintext_connections_total{port}`: plaintext accepted (PERMISSIVE / DISABLE).
    pub plaintext: IntCounterVec,
    /// `keycard_connections_refused_total{reason}`: closed before any handshake (overloaded, ...).
    pub refused: IntCounterVec,
    /// Live connections closed because a policy reload no longer allows them.
    pub closed_by_policy: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub renewals: IntCounterVec,
    pub cert_expiry: Gauge,
    pub active: IntGauge,
}

impl ProxyMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let cert_expiry = Gauge::new(
            "keycard_certificate_expiry_timestamp_seconds",
            "When the workload certificate in use expires (unix seconds)",
        )?;
        r.register(Box::new(cert_expiry.clone()))?;
        let active = IntGauge::new("keycard_active_connections", "Connections being proxied now")?;
        r.register(Box::new(active.clone()))?;
        Ok(Self {
            tcp_opened: counter("istio_tcp_connections_opened_total", "TCP connections opened", TCP_LABELS)?,
            tcp_closed: counter("istio_tcp_connections_closed_total", "TCP connections closed", TCP_LABELS)?,
            tcp_sent: counter("istio_tcp_sent_bytes_total", "Bytes sent to the downstream", TCP_LABELS)?,
            tcp_received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the downstream",
                TCP_LABELS,
            )?,
            handshake_failures: counter(
                "keycard_handshake_failures_total",
                "Connections refused during TLS or mode checks, by reason",
                &["direction", "reason"],
            )?,
            authz: counter(
                "keycard_authz_decisions_total",
                "Authorization decisions by deciding policy rule",
                &["policy", "action", "enforced"],
            )?,
            plaintext: counter(
                "keycard_plaintext_connections_total",
                "Plaintext connections accepted (the census before going STRICT)",
                &["port"],
            )?,
            refused: counter(
                "keycard_connections_refused_total",
                "Connections closed at accept",
                &["reason"],
            )?,
            closed_by_policy: counter(
                "keycard_connections_closed_by_policy_total",
                "Live connections closed after a policy reload denied them",
                &["policy"],
            )?,
            policy_reloads: counter("keycard_policy_reloads_total", "Policy reloads by result", &["result"])?,
            renewals: counter(
                "keycard_certificate_renewals_total",
                "Certificate requests by result",
                &["result"],
            )?,
            cert_expiry,
            active,
        })
    }
}

/// The Prometheus text of a registry.
pub fn encode(registry: &Registry) -> String {
    use prometheus::Encoder as _;
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for I/O reasons.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
