//! The sidecar's Prometheus metrics: Istio's standard TCP metrics and labels (so existing
//! dashboards work) plus keycard's own. Registered into a registry the caller owns. Labels come
//! from bounded sets: identities, namespaces, policy rule names, typed reasons, ports.

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

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

/// Istio's request metric labels, in order.
pub const REQUEST_LABELS: &[&str] = &[
    "reporter",
    "source_principal",
    "destination_principal",
    "source_workload_namespace",
    "destination_workload_namespace",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "connection_security_policy",
    "response_flags",
];

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for request and response sizes (powers of ten).
const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

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
    /// `keycard_tls_offload_total{direction, result}`: mesh connections after their handshake,
    /// `result` `kernel` (handed to kernel TLS), `user` (to keycard's own record layer), why
    /// rustls kept it (`unavailable`, `off`, `cipher`, `buffered`, `not_established`,
    /// `setup_failed`), or `lost` (a hand-over failed after rustls gave up the keys: the
    /// connection is closed).
    pub tls_offload: IntCounterVec,
    /// `keycard_tls_offload_available`: 1 when the start-up probe found kernel TLS and
    /// `tls.kernel_offload` is `auto`.
    pub tls_offload_available: IntGauge,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub request_bytes: HistogramVec,
    pub response_bytes: HistogramVec,
    /// `keycard_protocol_detect_timeouts_total{direction}`: `auto` ports where nothing told
    /// HTTP from TCP in time (treated as TCP).
    pub detect_timeouts: IntCounterVec,
    /// `keycard_upstream_connections_opened_total{upstream,protocol}`: pooled mutual-TLS
    /// connections opened to a remote sidecar, `h2` (requests share them) or `http/1.1` (one
    /// request at a time each).
    pub pool_opened: IntCounterVec,
    /// `keycard_http_connections_total{direction}`: downstream connections served as HTTP.
    pub http_connections: IntCounterVec,
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
        let tls_offload_available = IntGauge::new(
            "keycard_tls_offload_available",
            "1 when mesh connections are handed to kernel TLS after their handshake",
        )?;
        r.register(Box::new(tls_offload_available.clone()))?;
        let histogram = |name: &str, help: &str, buckets: &[f64]| -> prometheus::Result<HistogramVec> {
            let h =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), REQUEST_LABELS)?;
            r.register(Box::new(h.clone()))?;
            Ok(h)
        };
        Ok(Self {
            requests: counter("istio_requests_total", "HTTP and gRPC requests", REQUEST_LABELS)?,
            request_duration: histogram(
                "istio_request_duration_milliseconds",
                "Request duration, first byte in to last byte out",
                DURATION_BUCKETS_MS,
            )?,
            request_bytes: histogram("istio_request_bytes", "Request body sizes", SIZE_BUCKETS)?,
            response_bytes: histogram("istio_response_bytes", "Response body sizes", SIZE_BUCKETS)?,
            detect_timeouts: counter(
                "keycard_protocol_detect_timeouts_total",
                "Auto-detected ports where no bytes told the protocol in time (served as TCP)",
                &["direction"],
            )?,
            pool_opened: counter(
                "keycard_upstream_connections_opened_total",
                "Pooled mutual-TLS connections opened to remote sidecars, by protocol (h2, http/1.1)",
                &["upstream", "protocol"],
            )?,
            tls_offload: counter(
                "keycard_tls_offload_total",
                "Mesh connections (L4 and HTTP) after their handshake: handed to kernel TLS, to keycard's record layer (user), or why rustls kept them",
                &["direction", "result"],
            )?,
            tls_offload_available,
            http_connections: counter(
                "keycard_http_connections_total",
                "Downstream connections served as HTTP",
                &["direction"],
            )?,
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
