//! L7: HTTP/1.1, HTTP/2 and gRPC through the sidecar. Inbound, hyper serves the decrypted stream
//! and every request is authenticated (JWT), authorized and forwarded to the app over pooled
//! connections in the protocol it expects; outbound, the app's requests travel to the remote
//! sidecar over pooled mutual-TLS connections (HTTP/1.1 as HTTP/1.1, HTTP/2 multiplexed).
//! WebSocket-style upgrades get a dedicated mutual-TLS HTTP/1.1 connection and are bridged as
//! bytes once switched.

pub mod app;
pub mod authn;
pub mod body;
pub mod guard;
pub mod headers;
pub mod idle;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod server;
pub mod sniff;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use keycard_config::SpiffeId;

use self::body::{Body, BoxError, Outcome, Tracked};
use crate::access::{Access, RequestLine};
use crate::sidecar::{Direction, Shared};

/// The executor hyper spawns its HTTP/2 tasks on (a served stream with its request's future, a
/// request's response future on a client connection): each future is boxed before it is
/// spawned. hyper's client spawns per request a value of an enum whose largest variant is the
/// whole connection (a few KB), and a future is moved whole, at that size, each time it changes
/// hands on its way into the runtime's task: boxed first, the runtime moves a pointer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpawnBoxed;

impl<F> hyper::rt::Executor<F> for SpawnBoxed
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// One request as it is reported when its response ends: a metric sample and an access event.
pub struct Exchange {
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src_identity: Option<SpiffeId>,
    pub dst_addr: SocketAddr,
    pub dst_identity: Option<SpiffeId>,
    /// The workload port policies name (inbound), the destination port (outbound).
    pub port: u16,
    pub mtls: bool,
    /// The deciding rule, `none`, or `-` where no policy is evaluated (outbound).
    pub policy: String,
    pub method: String,
    /// Normalised (inbound) or as sent (outbound), query stripped.
    pub path: String,
    pub authority: String,
    pub request_id: String,
    pub protocol: &'static str,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// The request metrics of the port or upstream the request came through.
    pub metrics: Arc<RequestMetrics>,
}

/// What decided a response, for the metric flags and the access event.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub decision: &'static str,
    pub reason: &'static str,
    /// Envoy's response flags: `-`, `RBAC`, `UF`, `UT`, `UC`, `DC`, ...
    pub flags: &'static str,
}

impl Verdict {
    pub const FORWARDED: Self = Self { decision: "allow", reason: "-", flags: "-" };
}

impl Exchange {
    /// What the request itself says; identities and the policy are the caller's to fill in.
    pub fn start(
        direction: Direction,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
        parts: &http::request::Parts,
        authority: &str,
        metrics: &Arc<RequestMetrics>,
    ) -> Self {
        Self {
            direction,
            src_addr,
            src_identity: None,
            dst_addr,
            dst_identity: None,
            port: dst_addr.port(),
            mtls: false,
            policy: "-".to_owned(),
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            authority: authority.to_owned(),
            request_id: String::new(),
            protocol: headers::request_protocol(&parts.headers),
            started: Instant::now(),
            request_bytes: Default::default(),
            metrics: metrics.clone(),
        }
    }

    fn finish(&self, shared: &Shared, status: u16, verdict: Verdict, outcome: &Outcome) {
        let flags = if outcome.complete || verdict.flags != "-" { verdict.flags } else { "DC" };
        let grpc = outcome.grpc_status.as_deref().unwrap_or("");
        let elapsed = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        if self.direction == Direction::Inbound {
            let request = Some((self.method.as_str(), self.path.as_str()));
            let allowed = verdict.decision == "allow";
            let src = self.src_identity.as_ref();
            shared.observed.decision(self.port, src, self.src_addr.ip(), request, allowed);
        }
        let key = LabelKey {
            direction: self.direction,
            src: self.src_identity.as_ref(),
            dst: self.dst_identity.as_ref(),
            protocol: self.protocol,
            status,
            grpc,
            mtls: self.mtls,
            flags,
        };
        self.metrics.with(&shared.metrics, &key, |c| {
            c.requests.inc();
            c.duration.observe(elapsed.as_secs_f64() * 1000.0);
            c.request_bytes.observe(request_bytes as f64);
            c.response_bytes.observe(outcome.bytes as f64);
        });
        RequestLine {
            access: Access {
                direction: self.direction,
                src_addr: self.src_addr,
                src_identity: self.src_identity.as_ref(),
                dst_addr: self.dst_addr,
                dst_identity: self.dst_identity.as_ref(),
                port: self.port,
                mtls: self.mtls,
                policy: &self.policy,
                started: self.started,
            },
            protocol: self.protocol,
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            status,
            grpc_status: grpc,
            request_id: &self.request_id,
            decision: verdict.decision,
            reason: verdict.reason,
            response_flags: flags,
            bytes_sent: outcome.bytes,
            bytes_recv: request_bytes,
            duration_ms: elapsed.as_millis() as u64,
        }
        .log();
    }
}

/// The request metrics' children for the label sets one port's (or upstream's) requests have
/// used, so a request finds its counters by comparing a few fields instead of hashing ten label
/// strings in prometheus' map (with its lock) and building four of them. At most `LABEL_SETS`
/// are kept (the first seen); requests with further sets go through the map.
#[derive(Default)]
pub struct RequestMetrics(Mutex<Vec<(OwnedLabelKey, Children)>>);

const LABEL_SETS: usize = 32;

/// Istio's request labels (`metrics::REQUEST_LABELS`) as one request has them.
struct LabelKey<'a> {
    direction: Direction,
    src: Option<&'a SpiffeId>,
    dst: Option<&'a SpiffeId>,
    protocol: &'static str,
    status: u16,
    grpc: &'a str,
    mtls: bool,
    flags: &'static str,
}

struct OwnedLabelKey {
    direction: Direction,
    src: Option<SpiffeId>,
    dst: Option<SpiffeId>,
    protocol: &'static str,
    status: u16,
    grpc: String,
    mtls: bool,
    flags: &'static str,
}

struct Children {
    requests: prometheus::IntCounter,
    duration: prometheus::Histogram,
    request_bytes: prometheus::Histogram,
    response_bytes: prometheus::Histogram,
}

impl LabelKey<'_> {
    fn is(&self, k: &OwnedLabelKey) -> bool {
        self.status == k.status
            && self.flags == k.flags
            && self.protocol == k.protocol
            && self.mtls == k.mtls
            && self.direction == k.direction
            && self.grpc == k.grpc
            && self.src == k.src.as_ref()
            && self.dst == k.dst.as_ref()
    }

    fn owned(&self) -> OwnedLabelKey {
        OwnedLabelKey {
            direction: self.direction,
            src: self.src.cloned(),
            dst: self.dst.cloned(),
            protocol: self.protocol,
            status: self.status,
            grpc: self.grpc.to_owned(),
            mtls: self.mtls,
            flags: self.flags,
        }
    }

    fn children(&self, m: &crate::metrics::ProxyMetrics) -> Children {
        let principal = |id: Option<&SpiffeId>| id.map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let ns = |id: Option<&SpiffeId>| {
            id.and_then(|i| i.k8s()).map_or_else(|| "unknown".to_owned(), |k| k.namespace.to_owned())
        };
        let status = self.status.to_string();
        let labels = [
            if self.direction == Direction::Inbound { "destination" } else { "source" },
            &principal(self.src),
            &principal(self.dst),
            &ns(self.src),
            &ns(self.dst),
            self.protocol,
            &status,
            self.grpc,
            if self.mtls { "mutual_tls" } else { "none" },
            self.flags,
        ];
        Children {
            requests: m.requests.with_label_values(&labels),
            duration: m.request_duration.with_label_values(&labels),
            request_bytes: m.request_bytes.with_label_values(&labels),
            response_bytes: m.response_bytes.with_label_values(&labels),
        }
    }
}

impl RequestMetrics {
    /// Runs `record` on the children for `key`.
    fn with(&self, m: &crate::metrics::ProxyMetrics, key: &LabelKey<'_>, record: impl FnOnce(&Children)) {
        let mut sets = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, c)) = sets.iter().find(|(k, _)| key.is(k)) {
            return record(c);
        }
        let c = key.children(m);
        record(&c);
        if sets.len() < LABEL_SETS {
            sets.push((key.owned(), c));
        }
    }
}

/// Hands `resp` back with a body that reports the exchange when it ends. `hold` (a pooled
/// connection lease) lives as long as the body.
pub fn respond<B>(
    shared: &Arc<Shared>,
    ex: Exchange,
    verdict: Verdict,
    resp: Response<B>,
    hold: impl Send + 'static,
) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let status = resp.status().as_u16();
    let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (parts, inner) = resp.into_parts();
    let shared = shared.clone();
    let done = Box::new(move |outcome: Outcome| {
        let _hold = hold;
        ex.finish(&shared, status, verdict, &outcome);
    });
    Response::from_parts(parts, body::boxed(Tracked::new(inner, grpc, done)))
}

/// A response made here (400, 401, 403, 503, 504), reported like any other.
pub fn local(
    shared: &Arc<Shared>,
    ex: Exchange,
    status: StatusCode,
    text: &'static str,
    verdict: Verdict,
    extra: &[(http::HeaderName, String)],
) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name.clone(), v);
        }
    }
    respond(shared, ex, verdict, resp, ())
}

/// Once both sides have switched protocols, copies bytes between them (idle deadline and drain
/// as for TCP), as a tracked task.
pub fn bridge(shared: &Arc<Shared>, downstream: OnUpgrade, upstream: OnUpgrade) {
    let cancel = shared.drain.clone();
    let idle = shared.limits.idle_timeout;
    shared.tracker.spawn(async move {
        let (Ok(a), Ok(b)) = tokio::join!(downstream, upstream) else { return };
        crate::forward::pipe(TokioIo::new(a), TokioIo::new(b), idle, cancel).await;
    });
}

/// Awaits `fut` under the request deadline (`Duration::ZERO`: none); `None` once it passed.
pub async fn within<F: std::future::Future>(deadline: Duration, fut: F) -> Option<F::Output> {
    if deadline.is_zero() { Some(fut.await) } else { tokio::time::timeout(deadline, fut).await.ok() }
}

/// `AsyncWrite` for a wrapper that only changes reads: every call goes to `$field`.
macro_rules! delegate_write {
    ($wrapper:ident, $field:ident) => {
        impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<I> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                b: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, b)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use delegate_write;

/// Counts request heads the smuggling guard refused (answered 400 by hyper).
pub fn smuggling_counter(shared: &Arc<Shared>, direction: &'static str) -> guard::OnRefused {
    let refused = shared.metrics.refused.with_label_values(&["conflicting_framing"]);
    Arc::new(move || {
        refused.inc();
        tracing::info!(
            direction,
            reason = "conflicting_framing",
            "request refused: Content-Length with Transfer-Encoding"
        );
    })
}

/// `host[:port]` of a request: the URI's authority (HTTP/2, absolute form) or `Host`.
pub fn authority_of(parts: &http::request::Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default()
}
