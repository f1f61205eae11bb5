//! HTTP/1.1 client connections lent one request at a time: the inbound sidecar's to its app
//! (`http::app`) and the outbound sidecar's to a remote sidecar (`http::pool`). A connection
//! waits among the idle ones, most recently used first, for its next request; one idle longer
//! than the timeout is closed. A request that a reused connection never took (its server had
//! closed it) goes out again, on the next idle one or a new one.
//!
//! Each connection carries what its pool needs to know of it (`M`: nothing for the app, the
//! remote's verified identity for a remote sidecar), so a request takes only a connection that
//! fits it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1};

use super::body::Body;

/// Idle connections kept per pool, at most.
const MAX_IDLE: usize = 256;

struct Waiting<M> {
    send: http1::SendRequest<Body>,
    meta: M,
    since: Instant,
}

type List<M> = Mutex<Vec<Waiting<M>>>;

/// The idle connections of one destination.
pub struct Idle<M> {
    conns: Arc<List<M>>,
    timeout: Duration,
    /// Whether the task closing long-idle connections runs (started with the first lease).
    reaper: AtomicBool,
}

/// A connection lent to one request: back among the idle ones when dropped (after the response
/// body), unless it closed or was upgraded.
pub struct Lease<M> {
    conn: Option<(http1::SendRequest<Body>, M)>,
    idle: Weak<List<M>>,
}

impl<M> Lease<M> {
    /// What the pool knows of the connection.
    pub fn meta(&self) -> Option<&M> {
        self.conn.as_ref().map(|(_, m)| m)
    }
}

impl<M> Drop for Lease<M> {
    fn drop(&mut self) {
        let (Some((send, meta)), Some(idle)) = (self.conn.take(), self.idle.upgrade()) else { return };
        if send.is_closed() {
            return;
        }
        let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(Waiting { send, meta, since: Instant::now() });
        }
    }
}

/// Why a request got no response: `E` where no connection could be made, else hyper's error.
#[derive(Debug)]
pub enum SendError<E> {
    Connect(E),
    Http(hyper::Error),
}

impl<M: Send + 'static> Idle<M> {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self { conns: Arc::default(), timeout, reaper: AtomicBool::new(false) })
    }

    /// Sends `req` on the most recently used idle connection that `fits`, else on one `connect`
    /// makes; the lease goes with the response body.
    pub async fn send<E, C, F>(
        self: &Arc<Self>,
        mut req: Request<Body>,
        fits: impl Fn(&M) -> bool,
        connect: C,
    ) -> Result<(Response<Incoming>, Lease<M>), SendError<E>>
    where
        C: FnOnce() -> F,
        F: Future<Output = Result<(http1::SendRequest<Body>, M), E>>,
    {
        while let Some((mut send, meta)) = self.take(&fits) {
            match send.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(send, meta))),
                Err(e) => req = not_taken(e).map_err(SendError::Http)?,
            }
        }
        let (mut send, meta) = connect().await.map_err(SendError::Connect)?;
        let resp = send.send_request(req).await.map_err(SendError::Http)?;
        Ok((resp, self.lease(send, meta)))
    }

    fn lease(self: &Arc<Self>, send: http1::SendRequest<Body>, meta: M) -> Lease<M> {
        self.start_reaper();
        Lease { conn: Some((send, meta)), idle: Arc::downgrade(&self.conns) }
    }

    /// The most recently used idle connection that fits and is ready for a request, dropping
    /// closed and expired ones. One still busy (its server answered before the request body
    /// ended, which is still uploading) stays for later: a request never waits behind another.
    fn take(&self, fits: impl Fn(&M) -> bool) -> Option<(http1::SendRequest<Body>, M)> {
        let mut idle = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        idle.retain(|c| !c.send.is_closed() && now.duration_since(c.since) < self.timeout);
        let ready = idle.iter().rposition(|c| c.send.is_ready() && fits(&c.meta))?;
        let w = idle.remove(ready);
        Some((w.send, w.meta))
    }

    /// Closes connections idle for longer than the timeout, every third of it, for as long as the
    /// pool exists.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let (pool, every) = (Arc::downgrade(self), (self.timeout / 3).max(Duration::from_millis(10)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let now = Instant::now();
                let mut idle = pool.conns.lock().unwrap_or_else(PoisonError::into_inner);
                idle.retain(|c| !c.send.is_closed() && now.duration_since(c.since) < pool.timeout);
            }
        });
    }
}

/// The request back from a connection that closed before taking it, or the error it failed with.
pub fn not_taken(mut e: TrySendError<Request<Body>>) -> Result<Request<Body>, hyper::Error> {
    match e.take_message() {
        Some(req) => Ok(req),
        None => Err(e.into_error()),
    }
}
