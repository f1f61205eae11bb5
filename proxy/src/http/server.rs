//! Serving HTTP on one downstream connection (HTTP/1.1 with upgrades, or HTTP/2 by its preface),
//! with the limits of `http:` in the sidecar config, an idle deadline, graceful close on drain.
//!
//! An HTTP/1.1 connection that is new or quiet holds no HTTP state between requests: once hyper
//! has written and flushed every response, has no request in hand and its read found nothing
//! (at once after its first response, or after a request that came more than `http.rest_after`,
//! 100 ms by default, after the last byte; otherwise once no byte has moved for that long), the
//! connection is taken back from hyper (`into_parts`) and waits for its socket to become readable
//! with no buffer, then a fresh hyper connection serves the next request. hyper keeps an 8 KiB
//! read and an 8 KiB write buffer for a connection's whole life; an idle keep-alive client of the
//! outbound sidecar cost 25.2 KiB with them and 10.3 KiB without, 8.8 KiB with the HTTP/2 branch
//! boxed (`bench/`, 5,000 idle clients), 2.3 KiB once the read buffer hyper hands back was
//! dropped before the wait rather than after it, and 1.45 KiB once the resting future was cut
//! from 1.5 KB to 0.8 (every wait but the rest boxed, below). A busy keep-alive connection keeps hyper's
//! state: setting it up again after every response cost the outbound sidecar about 8,000
//! instructions a request (`bench/callgrind`). Between requests hyper's own state is that of a
//! new connection, so nothing is lost.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use keycard_config::sidecar::HttpSettings;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::body::Body;
use super::guard::{Guarded, OnRefused};
use super::sniff::{self, Rewind, Sniffed};
use crate::cancel::cancelled;

/// The hyper servers for downstream connections. HTTP/2 keeps h2's defences against rapid reset
/// (at most 20 pending resets, 1024 locally caused) and sends keep-alive pings.
/// One per host (an inbound port, an outbound upstream), shared by its connections.
pub struct Server {
    http1: http1::Builder,
    http2: http2::Builder<super::SpawnBoxed>,
    rest_after: Duration,
    max_head: usize,
    max_headers: usize,
    on_smuggling: OnRefused,
}

/// `on_smuggling` runs for each request refused for conflicting framing (for a counter).
pub fn builder(s: &HttpSettings, on_smuggling: OnRefused) -> Arc<Server> {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_timeout)
        .max_headers(s.max_headers)
        .max_buf_size(s.max_header_bytes.max(8192))
        .keep_alive(true);
    let mut http2 = http2::Builder::new(super::SpawnBoxed);
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.max_concurrent_streams)
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let (max_head, max_headers) = (s.max_header_bytes, s.max_headers);
    Arc::new(Server { http1, http2, rest_after: s.rest_after, max_head, max_headers, on_smuggling })
}

/// A downstream stream that can say, without reading, when a read would not block: what an
/// HTTP/1.1 connection between requests waits on. Only meaningful after a read returned
/// `Pending` (so nothing is buffered above the socket).
pub trait Readiness {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Readiness for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl<S: Readiness> Readiness for Box<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// rustls holds no plaintext once a read through it returned `Pending` (tokio-rustls reads the
/// socket until it would block and decrypts what came), so the socket's readiness is the stream's.
impl<S: Readiness> Readiness for tokio_rustls::server::TlsStream<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// The kernel holds the plaintext it has not yet handed out: the socket's readiness is the
/// stream's, once the bytes it carried over from rustls are delivered.
impl Readiness for crate::ktls::KernelStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.holds_bytes() {
            return Poll::Ready(Ok(()));
        }
        self.get_ref().poll_read_ready(cx)
    }
}

/// keycard's record layer holds plaintext or a whole record only until a read takes them; after
/// a read returned `Pending`, at most part of a record is held, and the rest comes by the socket.
impl Readiness for crate::records::RecordStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.holds_bytes() {
            return Poll::Ready(Ok(()));
        }
        self.get_ref().poll_read_ready(cx)
    }
}

/// A mesh stream with rustls, the kernel's TLS or keycard's record layer.
impl<L: Readiness, R: Readiness> Readiness for tokio_util::either::Either<L, R> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Self::Left(l) => l.poll_read_ready(cx),
            Self::Right(r) => r.poll_read_ready(cx),
        }
    }
}

/// Serves `io` until it closes, `idle` passes with no bytes either way, `stopping` asks for a
/// graceful close (in-flight requests finish), or `kill` ends it at once. Returns how many times
/// the connection rested between HTTP/1.1 requests without hyper's state.
pub async fn serve<I, S>(
    server: Arc<Server>,
    io: I,
    service: S,
    idle: Duration,
    stopping: CancellationToken,
    kill: CancellationToken,
) -> u32
where
    I: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let mut rests = 0;
    // In blocks and boxed, every wait but the rest: this future is what a resting connection
    // keeps, and it holds a slot for the largest of its waits and of anything alive across one.
    let (mut io, mut service) = {
        let mut inner = Rewind::new(io);
        // The first bytes say HTTP/2 (its preface) or HTTP/1; they are replayed to hyper. Read,
        // not waited for: after a TLS handshake they may already sit decrypted in rustls.
        let sniffed = Box::pin(async {
            // The read first: where a connection's first bytes are there already, the drain's
            // tokens are never polled, so never registered with (and removed from) their waiter
            // lists under their locks (a new L7 client connection: -440 instructions, callgrind).
            tokio::select! {
                biased;
                s = sniff::read(&mut inner, idle) => s,
                () = stopping.cancelled() => Sniffed::Timeout,
                () = kill.cancelled() => Sniffed::Timeout,
            }
        })
        .await;
        if sniffed == Sniffed::Timeout {
            return rests;
        }
        let guarded = Guarded::new(inner, server.max_head, server.max_headers, server.on_smuggling.clone());
        let io = Active { inner: guarded, leftover: Bytes::new(), activity: activity.clone() };
        activity.touch();
        if sniffed == Sniffed::Http2 {
            Box::pin(serve_http2(&server, io, service, &activity, idle, &stopping, &kill)).await;
            return rests;
        }
        (io, Tracked { inner: service, activity: activity.clone() })
    };
    // Its last request came within `rest_after` of the one before (or was pipelined behind it).
    let mut busy = false;
    loop {
        match Box::pin(work(&server, io, service, busy, &activity, idle, &stopping, &kill)).await {
            Some(rested) => (io, service) = rested,
            None => return rests,
        }
        rests += 1;
        busy = !io.leftover.is_empty();
        if !busy {
            if !wait_readable(io.inner.get_ref(), &activity, idle, &stopping, &kill).await {
                return rests;
            }
            busy = activity.quiet() < server.rest_after;
        }
    }
}

pin_project_lite::pin_project! {
    /// One downstream connection served to its end, with what must live as long as it (an
    /// inbound connection's place in the live registry): what a host's `serve_conn` hands the
    /// accept loop. A struct, not an `async` block around [`serve`], which would keep a second
    /// copy of its arguments beside it in every connection.
    pub struct ServeConn<F, K> {
        #[pin]
        serving: F,
        keep: K,
    }
}

impl<F, K> ServeConn<F, K> {
    pub fn new(serving: F, keep: K) -> Self {
        Self { serving, keep }
    }
}

impl<F: Future, K> Future for ServeConn<F, K> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().serving.poll(cx).map(drop)
    }
}

/// Serves HTTP/1.1 requests with hyper until the connection is quiet between requests, then hands
/// the stream and the service back without hyper's state (`None`: the connection ended, was
/// upgraded or drained).
#[allow(clippy::too_many_arguments)]
async fn work<I, S>(
    server: &Server,
    io: Active<I>,
    service: Tracked<S>,
    busy: bool,
    activity: &Activity,
    idle: Duration,
    stopping: &CancellationToken,
    kill: &CancellationToken,
) -> Option<(Active<I>, Tracked<S>)>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut conn = server.http1.serve_connection(TokioIo::new(io), service).with_upgrades();
    let mut graceful = false;
    // When set, the connection rests as soon as it is between requests: at once for a new or
    // quiet connection (most make one request, or few far apart), and for a busy one once no
    // byte has moved for `rest_after`.
    let mut rest_due = !busy || server.rest_after.is_zero();
    loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| match Pin::new(&mut conn).poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending if rest_due && activity.between_requests() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }) => match r {
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "http connection ended with an error");
                    return None;
                }
                Some(Ok(())) => return None,
                None => break,
            },
            () = activity.idle_for(server.rest_after), if !rest_due => rest_due = true,
            () = cancelled(stopping), if !graceful => {
                Pin::new(&mut conn).graceful_shutdown();
                graceful = true;
            }
            () = cancelled(kill) => return None,
            () = activity.idle_for(idle) => return None,
        }
    }
    // Quiet between requests: take the stream back and drop hyper's state.
    let parts = conn.into_parts()?; // `None`: upgraded, the stream is the upgrade's now
    if graceful {
        return None;
    }
    let mut io = parts.io.into_inner();
    // Not `parts.read_buf` itself: even empty, it holds hyper's whole read buffer. (Bytes read
    // but not parsed are not seen in practice: hyper parses what it holds before it reads
    // again, so this copy is a defence, not a path the tests take.)
    io.leftover =
        if parts.read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&parts.read_buf) };
    io.inner.shed();
    // The rest of `parts`, hyper's read buffer with it, is dropped here, before the rest's wait
    // (tests/resting_memory.rs).
    Some((io, parts.service))
}

/// Serves an HTTP/2 connection whole, until it closes, idles out, drains or is killed.
async fn serve_http2<I, S>(
    server: &Server,
    io: Active<I>,
    service: S,
    activity: &Activity,
    idle: Duration,
    stopping: &CancellationToken,
    kill: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = server.http2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut graceful = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
                return;
            }
            () = cancelled(stopping), if !graceful => {
                conn.as_mut().graceful_shutdown();
                graceful = true;
            }
            () = cancelled(kill) => return,
            () = activity.idle_for(idle) => return,
        }
    }
}

/// Waits until `io` is readable; false when the connection should end instead (idle deadline,
/// drain, kill, or an error on the socket).
fn wait_readable<'a, R: Readiness>(
    io: &'a R,
    activity: &Activity,
    idle: Duration,
    stopping: &'a CancellationToken,
    kill: &'a CancellationToken,
) -> Rest<'a, R> {
    // Nothing moves while it waits, so the idle deadline is one sleep from now.
    let left = idle.saturating_sub(activity.quiet());
    Rest { io, idle: tokio::time::sleep(left), stopping: stopping.cancelled(), kill: kill.cancelled() }
}

pin_project_lite::pin_project! {
    /// The wait of a resting connection, written out: a `select!` over the same four kept a
    /// slot a quarter larger in every resting connection.
    struct Rest<'a, R> {
        io: &'a R,
        #[pin]
        idle: tokio::time::Sleep,
        #[pin]
        stopping: WaitForCancellationFuture<'a>,
        #[pin]
        kill: WaitForCancellationFuture<'a>,
    }
}

impl<R: Readiness> Future for Rest<'_, R> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.project();
        if let Poll::Ready(r) = this.io.poll_read_ready(cx) {
            return Poll::Ready(r.is_ok());
        }
        let ended = this.stopping.poll(cx).is_ready()
            || this.kill.poll(cx).is_ready()
            || this.idle.poll(cx).is_ready();
        if ended { Poll::Ready(false) } else { Poll::Pending }
    }
}

/// When bytes last moved, as milliseconds since the connection started, and what the HTTP/1.1
/// connection is doing (for [`until_idle`]). Touched only from the connection's own task.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// The last read found nothing, with the guard at a message boundary (hyper then has a
    /// request in hand anyway, counted below, unless the guard has stopped following).
    parked: AtomicBool,
    /// Bytes were written since the last completed flush.
    unflushed: AtomicBool,
    /// Requests taken whose response body hyper has not yet dropped.
    in_flight: AtomicU32,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn between_requests(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// How long since a byte last moved.
    fn quiet(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Completes once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let quiet = self.quiet();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// The stream as hyper sees it: records activity on every read or write that moves bytes, and
/// whether hyper is at rest; replays what hyper had read but not parsed when it was set aside.
struct Active<I> {
    inner: Guarded<Rewind<I>>,
    leftover: Bytes,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Active<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.leftover.is_empty() {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover[..n]);
            this.leftover.advance(n);
            this.activity.parked.store(false, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let parked = r.is_pending() && this.inner.at_rest();
        this.activity.parked.store(parked, Ordering::Relaxed);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Active<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        let r = Pin::new(&mut self.inner).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.activity.unflushed.store(true, Ordering::Relaxed);
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        if r.is_ok() {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The service with its requests counted from the call until hyper drops the response body
/// (which it does once the body's end is written, or the connection fails).
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

// Generic over the body (not `Body`): with the boxed body's `dyn Error` named in these bounds,
// rustc cannot prove the connection's task `Send` for every lifetime it erases.
impl<S, B> Service<hyper::Request<Incoming>> for Tracked<S>
where
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<B>>,
{
    type Response = hyper::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::new(&self.activity);
        TrackedFuture { inner: self.inner.call(req), in_flight: Some(in_flight) }
    }
}

/// One request counted in [`Activity::in_flight`] while it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<hyper::Response<B>, E>>,
{
    type Output = Result<hyper::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = ready!(this.inner.poll(cx))?;
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(resp.map(|body| TrackedBody { inner: body, _in_flight: in_flight })))
    }
}

/// A response body that keeps its request counted until hyper drops it.
pub struct TrackedBody<B> {
    inner: B,
    _in_flight: Option<InFlight>,
}

impl<B: HttpBody + Unpin> HttpBody for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
