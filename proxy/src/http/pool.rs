//! The pool of mutual-TLS HTTP/2 connections from this sidecar to one remote sidecar. Requests
//! share connections (no handshake per request); a connection carrying
//! `pool_streams_per_connection` requests makes the pool open another, up to
//! `pool_max_connections`. Connections made for other expected identities (a policy reload
//! changed them) are not reused; closed ones are dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keycard_config::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::body::Body;
use crate::outbound::{ConfigCache, Route, server_name};
use crate::sidecar::{Direction, Shared};
use crate::tls::peer_identity;

/// ALPN of pooled connections: the inbound sidecar serves HTTP/2 on them without sniffing.
pub const ALPN_H2: &[u8] = b"istio-h2";
/// ALPN of a dedicated connection for an HTTP/1.1 upgrade (WebSocket).
pub const ALPN_H1: &[u8] = b"istio-http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("this sidecar has no certificate yet")]
    NoCertificate,
    #[error("cannot build the client TLS config")]
    Config,
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed ({reason}): {detail}")]
    Handshake { reason: &'static str, detail: String },
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(hyper::Error),
}

impl DialError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate_loaded",
            Self::Config => "config",
            Self::Connect(_) => "connect_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::Handshake { reason, .. } => reason,
            Self::HandshakeTimeout => "timeout",
            Self::Http2(_) => "http2_handshake",
        }
    }
}

/// Connects to `remote` and completes mutual TLS with `alpn`: the stream and the server's
/// verified SPIFFE ID. Handshake failures are counted and kept like L4 ones.
pub async fn dial(
    shared: &Shared,
    remote: SocketAddr,
    route: &Route,
    cache: &ConfigCache,
) -> Result<(TlsStream<TcpStream>, Option<SpiffeId>), DialError> {
    let tls = shared.tls.borrow().clone().ok_or(DialError::NoCertificate)?;
    let config = cache.get(&tls, &route.expected).ok_or(DialError::Config)?;
    let limits = &shared.limits;
    let tcp = match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(remote)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(DialError::Connect(e)),
        Err(_) => return Err(DialError::ConnectTimeout),
    };
    let _ = tcp.set_nodelay(true);
    let connect = TlsConnector::from(config).connect(server_name(route, remote), tcp);
    match tokio::time::timeout(limits.handshake_timeout, connect).await {
        Ok(Ok(s)) => {
            let peer = peer_identity(s.get_ref().1.peer_certificates());
            Ok((s, peer))
        }
        Ok(Err(e)) => {
            let (reason, detail) = crate::sidecar::classify_tls_error(&e);
            shared.handshake_failed(Direction::Outbound, remote, reason, &detail);
            Err(DialError::Handshake { reason, detail })
        }
        Err(_) => {
            shared.handshake_failed(
                Direction::Outbound,
                remote,
                "timeout",
                "the TLS handshake did not finish in time",
            );
            Err(DialError::HandshakeTimeout)
        }
    }
}

struct Conn {
    send: http2::SendRequest<Body>,
    peer: Option<SpiffeId>,
    expected: Vec<SpiffeId>,
    inflight: AtomicUsize,
}

/// A request slot on a pooled connection; released when dropped (after the response body).
pub struct Lease(Arc<Conn>);

impl Lease {
    /// The remote sidecar's verified identity.
    pub fn peer(&self) -> Option<&SpiffeId> {
        self.0.peer.as_ref()
    }

    pub async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Incoming>, hyper::Error> {
        let mut send = self.0.send.clone();
        send.ready().await?;
        send.send_request(req).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    remote: SocketAddr,
    label: String,
    max_conns: usize,
    per_conn: usize,
    conns: Mutex<Vec<Arc<Conn>>>,
    connecting: tokio::sync::Mutex<()>,
    tls: ConfigCache,
}

impl Pool {
    pub fn new(remote: SocketAddr, max_conns: usize, per_conn: usize) -> Self {
        Self {
            remote,
            label: remote.to_string(),
            max_conns: max_conns.max(1),
            per_conn: per_conn.max(1),
            conns: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            tls: ConfigCache::new(ALPN_H2),
        }
    }

    /// A slot on a live connection, opening one when every connection is busy (or none is up).
    pub async fn lease(&self, shared: &Shared, route: &Route) -> Result<Lease, DialError> {
        if let Some(l) = self.pick(&route.expected, false) {
            return Ok(l);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(l) = self.pick(&route.expected, false) {
            return Ok(l);
        }
        match self.open(shared, route).await {
            Ok(conn) => {
                conn.inflight.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut conns) = self.conns.lock() {
                    conns.push(conn.clone());
                }
                Ok(Lease(conn))
            }
            // A busy live connection still beats none.
            Err(e) => self.pick(&route.expected, true).ok_or(e),
        }
    }

    /// The least loaded usable connection, if it has room (or the pool is full, or `any`).
    fn pick(&self, expected: &[SpiffeId], any: bool) -> Option<Lease> {
        let mut conns = self.conns.lock().ok()?;
        conns.retain(|c| !c.send.is_closed() && c.expected == expected);
        let full = conns.len() >= self.max_conns;
        let best = conns.iter().min_by_key(|c| c.inflight.load(Ordering::Relaxed))?;
        if any || full || best.inflight.load(Ordering::Relaxed) < self.per_conn {
            best.inflight.fetch_add(1, Ordering::Relaxed);
            return Some(Lease(best.clone()));
        }
        None
    }

    async fn open(&self, shared: &Shared, route: &Route) -> Result<Arc<Conn>, DialError> {
        let (stream, peer) = dial(shared, self.remote, route, &self.tls).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(DialError::Http2)?;
        shared.metrics.pool_opened.with_label_values(&[&self.label]).inc();
        let kill = shared.drain.child_token();
        // Ends when the remote closes, every handle is dropped (pool gone, requests done), or
        // the drain deadline passes.
        shared.tracker.spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "pooled connection ended") },
                () = kill.cancelled() => {}
            }
        });
        Ok(Arc::new(Conn { send, peer, expected: route.expected.clone(), inflight: AtomicUsize::new(0) }))
    }
}
