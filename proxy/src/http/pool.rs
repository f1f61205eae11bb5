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
use hyper_util::rt::{TokioIo, TokioTimer};
use keycard_config::SpiffeId;

use super::body::Body;
use crate::outbound::{ConfigCache, DialError, Route, dial};
use crate::sidecar::Shared;

/// ALPN of pooled connections: the inbound sidecar serves HTTP/2 on them without sniffing.
pub const ALPN_H2: &[u8] = b"istio-h2";
/// ALPN of a dedicated connection for an HTTP/1.1 upgrade (WebSocket).
pub const ALPN_H1: &[u8] = b"istio-http/1.1";

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
        let (send, conn) = http2::Builder::new(super::SpawnBoxed)
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(DialError::Http2)?;
        shared.metrics.pool_opened.with_label_values(&[&self.label]).inc();
        let kill = shared.drain.clone();
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
