//! A TCP connection's accounting: Istio's TCP labels and counters, resolved when the connection
//! opens and bumped once when it closes, and `keycard_active_connections` around its forwarding.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use keycard_config::SpiffeId;
use tokio_util::sync::CancellationToken;

use super::{Direction, Shared};

impl Shared {
    /// Istio's TCP labels for a connection, in [`crate::metrics::TCP_LABELS`] order.
    pub fn tcp_labels(
        &self,
        d: Direction,
        src: Option<&SpiffeId>,
        dst: Option<&SpiffeId>,
        mtls: bool,
    ) -> Vec<String> {
        let principal = |id: Option<&SpiffeId>| id.map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let ns = |id: Option<&SpiffeId>| {
            id.and_then(|i| i.k8s()).map_or_else(|| "unknown".to_owned(), |k| k.namespace.to_owned())
        };
        vec![
            if d == Direction::Inbound { "destination" } else { "source" }.to_owned(),
            principal(src),
            principal(dst),
            ns(src),
            ns(dst),
            if mtls { "mutual_tls" } else { "none" }.to_owned(),
            "-".to_owned(),
        ]
    }

    /// Counts a connection refused before any byte moved (opened and closed at once).
    pub fn refuse_tcp(&self, labels: &[String]) {
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.metrics.tcp_opened.with_label_values(&l).inc();
        self.metrics.tcp_closed.with_label_values(&l).inc();
    }

    /// Forwards a set-up connection's legs until it ends (`forward::Legs::forward`), counted in
    /// `keycard_active_connections` from now until the returned future completes or is dropped.
    /// Made outside the `async` block that awaits it: a block keeps a slot for each value it
    /// captures, so capturing the legs would keep them beside their forwarding.
    pub fn forward<D, U>(&self, legs: crate::forward::Legs<D, U>, cancel: CancellationToken) -> Forwarding
    where
        D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.active.inc();
        Forwarding {
            legs: legs.forward(self.limits.idle_timeout, cancel),
            active: self.metrics.active.clone(),
        }
    }

    /// Counts an opened connection; the returned counters take its close and bytes.
    pub fn open_tcp(&self, labels: &[String]) -> TcpCounters {
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.metrics.tcp_opened.with_label_values(&l).inc();
        TcpCounters {
            closed: self.metrics.tcp_closed.with_label_values(&l),
            sent: self.metrics.tcp_sent.with_label_values(&l),
            received: self.metrics.tcp_received.with_label_values(&l),
        }
    }
}

/// A connection's forwarding ([`Shared::forward`]), counted in `keycard_active_connections` while
/// it lives.
pub struct Forwarding {
    legs: Pin<Box<dyn Future<Output = crate::forward::Totals> + Send>>,
    active: prometheus::IntGauge,
}

impl Future for Forwarding {
    type Output = crate::forward::Totals;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.legs.as_mut().poll(cx)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// An open connection's TCP counters, looked up when it opens and bumped once when it closes (per
/// connection, not per chunk): a long connection keeps three handles, not its labels' strings.
pub struct TcpCounters {
    closed: prometheus::IntCounter,
    sent: prometheus::IntCounter,
    received: prometheus::IntCounter,
}

impl TcpCounters {
    /// Counts the close and the bytes: `sent` to the downstream, `recv` from it.
    pub fn finish(self, sent: u64, recv: u64) {
        self.closed.inc();
        self.sent.inc_by(sent);
        self.received.inc_by(recv);
    }
}
