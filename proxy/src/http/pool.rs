//! The pools of mutual-TLS connections from this sidecar to one remote sidecar: no handshake per
//! request. HTTP/2 requests (and every request where `http.h2_upgrade` is set) share HTTP/2
//! connections; a connection carrying `pool_streams_per_connection` requests makes the pool open
//! another, up to `pool_max_connections`. HTTP/1.1 requests travel as HTTP/1.1, as Istio's
//! sidecars carry them by default (`h2UpgradePolicy: DO_NOT_UPGRADE`), each on a connection lent
//! to it alone (`http::idle`): no HTTP/2 framing, header compression and stream bookkeeping on
//! either sidecar. At most `pool_max_connections` x `pool_streams_per_connection` of them are in
//! flight (so at most that many connections are open); more share the HTTP/2 connections.
//! Connections made for other expected identities (a policy reload changed them) are not reused;
//! closed ones are dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use keycard_config::SpiffeId;

use super::body::Body;
use super::idle::{self, Idle, SendError};
use crate::outbound::{ConfigCache, DialError, Route, dial};
use crate::sidecar::Shared;

/// ALPN of pooled connections: the inbound sidecar serves HTTP/2 on them without sniffing.
pub const ALPN_H2: &[u8] = b"istio-h2";
/// ALPN of pooled HTTP/1.1 connections, and of a dedicated one for an upgrade (WebSocket).
pub const ALPN_H1: &[u8] = b"istio-http/1.1";

/// A pooled HTTP/1.1 connection waits at most this long for its next request, and at most half
/// this sidecar's own `idle_timeout` (the remote's is likely the same, an hour by default): a
/// connection the remote closes while a request is on its way fails that request.
const H1_IDLE: Duration = Duration::from_secs(90);

/// What the pool knows of an HTTP/1.1 connection.
pub struct H1Conn {
    /// The remote sidecar's verified identity.
    pub peer: Option<SpiffeId>,
    expected: Vec<SpiffeId>,
}

/// An HTTP/1.1 connection lent to one request; back to the pool with the response body.
pub type H1Lease = idle::Lease<H1Conn>;

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
    h1: Arc<Idle<H1Conn>>,
    h1_tls: ConfigCache,
    /// HTTP/1.1 requests in flight on connections of their own, at most `h1_cap`: so at most that
    /// many HTTP/1.1 connections are ever open, idle ones included.
    h1_inflight: Arc<AtomicUsize>,
    h1_cap: usize,
}

/// A place among the HTTP/1.1 requests in flight, given back when dropped (after the response
/// body).
pub struct H1Slot(Arc<AtomicUsize>);

impl Drop for H1Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(remote: SocketAddr, max_conns: usize, per_conn: usize, idle_timeout: Duration) -> Self {
        Self {
            remote,
            label: remote.to_string(),
            max_conns: max_conns.max(1),
            per_conn: per_conn.max(1),
            conns: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            tls: ConfigCache::new(ALPN_H2),
            h1: Idle::new(H1_IDLE.min(idle_timeout / 2)),
            h1_tls: ConfigCache::new(ALPN_H1),
            h1_inflight: Arc::default(),
            h1_cap: max_conns.max(1).saturating_mul(per_conn.max(1)),
        }
    }

    /// A place for one more HTTP/1.1 request on a connection of its own; `None` when the pool's
    /// HTTP/1.1 connections are all taken (the request then shares an HTTP/2 one).
    pub fn h1_slot(&self) -> Option<H1Slot> {
        if self.h1_inflight.fetch_add(1, Ordering::Relaxed) >= self.h1_cap {
            self.h1_inflight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(H1Slot(self.h1_inflight.clone()))
    }

    /// Sends an HTTP/1.1 request on a connection of its own, reused from an earlier request where
    /// one made for the route's identities waits idle.
    pub async fn send_h1(
        &self,
        shared: &Arc<Shared>,
        route: &Route,
        req: http::Request<Body>,
    ) -> Result<(http::Response<Incoming>, H1Lease), SendError<DialError>> {
        let fits = |c: &H1Conn| c.expected == route.expected;
        // Boxed: the dial and handshake are large and rare, and unboxed they would size (and be
        // moved with) every request's future.
        self.h1.send(req, fits, || Box::pin(self.open_h1(shared, route))).await
    }

    async fn open_h1(
        &self,
        shared: &Arc<Shared>,
        route: &Route,
    ) -> Result<(http1::SendRequest<Body>, H1Conn), DialError> {
        let (stream, peer) = dial(shared, self.remote, route, &self.h1_tls).await?;
        let (send, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(DialError::Http1)?;
        // Ends when the remote closes, the pool lets it go (idle too long, or dropped), or the
        // drain deadline passes.
        self.run(shared, "http/1.1", conn);
        Ok((send, H1Conn { peer, expected: route.expected.clone() }))
    }

    /// A slot on a live connection, opening one when every connection is busy (or none is up).
    pub async fn lease(&self, shared: &Arc<Shared>, route: &Route) -> Result<Lease, DialError> {
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

    async fn open(&self, shared: &Arc<Shared>, route: &Route) -> Result<Arc<Conn>, DialError> {
        let (stream, peer) = dial(shared, self.remote, route, &self.tls).await?;
        let (send, conn) = http2::Builder::new(super::SpawnBoxed)
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(DialError::Http2)?;
        // Ends when the remote closes, every handle is dropped (pool gone, requests done), or
        // the drain deadline passes.
        self.run(shared, "h2", conn);
        Ok(Arc::new(Conn { send, peer, expected: route.expected.clone(), inflight: AtomicUsize::new(0) }))
    }

    /// Counts a connection just opened and drives it on its own task until it ends or the drain
    /// deadline passes.
    fn run<C>(&self, shared: &Shared, protocol: &str, conn: C)
    where
        C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        shared.metrics.pool_opened.with_label_values(&[&self.label, protocol]).inc();
        let kill = shared.drain.clone();
        shared.tracker.spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(error = %e, "pooled connection ended") },
                () = crate::cancel::cancelled(&kill) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_places_are_bounded_and_come_back_when_dropped() {
        let pool = Pool::new("127.0.0.1:1".parse().unwrap(), 2, 3, Duration::from_secs(60));
        let mut taken: Vec<_> =
            (0..6).map(|i| pool.h1_slot().unwrap_or_else(|| panic!("place {i}"))).collect();
        assert!(pool.h1_slot().is_none(), "a seventh place past 2 x 3");
        assert!(pool.h1_slot().is_none(), "a refused place takes nothing");
        drop(taken.pop());
        let again = pool.h1_slot();
        assert!(again.is_some(), "a dropped place is free again");
        assert!(pool.h1_slot().is_none());
    }
}
