//! Byte forwarding between two connections: both directions at once, half-close propagated (EOF
//! on one side shuts down writing on the other), an idle deadline over both directions, and a
//! cancellation token (policy reload, drain). When both legs are plaintext TCP, or TCP whose TLS
//! records the kernel seals and opens ([`crate::ktls`]), [`splice_pipe`] moves the bytes with
//! `splice(2)` through a pipe instead, without copying them into user space.
//!
//! Buffers: a direction holds a buffer only while a chunk is between its read and its write, that
//! is, only when the writer pushed back. The buffer is lent by [`crate::buffers`] and goes back as
//! soon as the chunk is written, so an idle connection holds no buffer and a busy one allocates
//! nothing per chunk. A direction starts with 16 KiB chunks and moves to 64 KiB once a read fills
//! one: a bulk flow then pays a quarter of the reads and writes (and, toward TLS, one `writev` of
//! four records), while request-sized flows never hold more than 16 KiB.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::buffers::{give_back, take};

/// Why a TCP connection to an upstream or the app was not made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed: {0}")]
    Failed(std::io::Error),
    #[error("connect timed out")]
    TimedOut,
}

/// TCP to `addr` within `timeout`, Nagle off (every leg a sidecar opens).
pub async fn connect(addr: std::net::SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(ConnectError::Failed(e)),
        Err(_) => Err(ConnectError::TimedOut),
    }
}

/// How a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Done,
    Idle,
    Cancelled,
    /// A read or write failed (reset, broken pipe).
    Error,
}

#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// Bytes from the first argument to the second.
    pub forward: u64,
    /// Bytes from the second argument to the first.
    pub backward: u64,
    pub end: End,
}

/// Copies both ways through user space (the TLS legs rustls seals and opens) until both sides
/// close, the idle deadline or `cancel`: each direction reads a chunk into a lent buffer and
/// writes it on, and shuts its writer down at its reader's EOF.
///
/// Written out like [`splice_pipe`] rather than as `async` code: the two streams are polled from
/// one future, each direction a small state machine beside them, so no stream is split into two
/// shared halves (an allocation each and a lock per read and write) and an idle connection keeps
/// no `join!` or `select!` state.
pub fn pipe<A, B>(a: A, b: B, idle: Duration, cancel: CancellationToken) -> CopyPipe<A, B> {
    CopyPipe { a, b, ways: [CopyWay::new(), CopyWay::new()], watch: Watch::new(idle, cancel) }
}

pin_project_lite::pin_project! {
    /// [`pipe`]'s future: both directions, then the watch.
    pub struct CopyPipe<A, B> {
        a: A,
        b: B,
        // `ways[0]` copies `a`'s bytes to `b`, `ways[1]` the reverse.
        ways: [CopyWay; 2],
        #[pin]
        watch: Watch,
    }
}

impl<A, B> Future for CopyPipe<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Totals;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Totals> {
        let this = self.project();
        let activity = &this.watch.activity;
        let [forward, backward] = this.ways;
        let x = forward.poll(cx, this.a, this.b, activity);
        let y = backward.poll(cx, this.b, this.a, activity);
        this.watch.poll_end(cx, both(x, y)).map(|end| Totals {
            forward: forward.moved,
            backward: backward.moved,
            end,
        })
    }
}

pin_project_lite::pin_project! {
    /// What ends a forwarded connection besides its sides closing: the idle deadline over both
    /// directions (one timer, re-armed only when it fires early) and the cancellation.
    struct Watch {
        activity: Activity,
        idle: Duration,
        #[pin]
        deadline: tokio::time::Sleep,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFutureOwned,
    }
}

impl Watch {
    fn new(idle: Duration, cancel: CancellationToken) -> Self {
        let start = Instant::now();
        Watch {
            activity: Activity { start, at: AtomicU64::new(0) },
            idle,
            deadline: tokio::time::sleep_until(start + idle),
            cancelled: cancel.cancelled_owned(),
        }
    }

    /// `done`: whether each direction ended cleanly, once both have. Until then, whether the
    /// cancellation or the idle deadline ends the connection now.
    fn poll_end(self: Pin<&mut Self>, cx: &mut Context<'_>, done: Poll<(bool, bool)>) -> Poll<End> {
        if let Poll::Ready((x, y)) = done {
            return Poll::Ready(if x && y { End::Done } else { End::Error });
        }
        let mut this = self.project();
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(End::Cancelled);
        }
        loop {
            if this.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let until = this.activity.quiet_until(*this.idle);
            if Instant::now() >= until {
                return Poll::Ready(End::Idle);
            }
            this.deadline.as_mut().reset(until);
        }
    }
}

/// Ready once both directions are, with whether each ended cleanly.
fn both(x: Poll<bool>, y: Poll<bool>) -> Poll<(bool, bool)> {
    match (x, y) {
        (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready((x, y)),
        _ => Poll::Pending,
    }
}

/// When a connection's bytes last moved, stored by its directions as they move them.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    at: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.at.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the connection reaches its idle deadline if nothing moves before.
    fn quiet_until(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.at.load(Ordering::Relaxed)) + idle
    }
}

/// How a direction's copying stopped.
enum Stop {
    Eof,
    ReadFailed,
    WriteFailed,
}

/// One direction of a copied connection.
struct CopyWay {
    state: CopyState,
    /// A chunk read and not yet wholly written: the buffer, how much is written, how much read.
    chunk: Option<(Box<[u8]>, usize, usize)>,
    /// A read filled a small buffer: this flow reads in large ones from now on.
    large: bool,
    /// Written since the last flush (a TLS writer may hold records until flushed).
    unflushed: bool,
    /// Bytes moved.
    moved: u64,
}

enum CopyState {
    Copying,
    /// Shutting the writer down after the reader's end; whether that end was clean.
    Closing(bool),
    /// Finished: whether without error.
    Done(bool),
}

impl CopyWay {
    fn new() -> Self {
        Self { state: CopyState::Copying, chunk: None, large: false, unflushed: false, moved: 0 }
    }

    /// Copies `r` to `w` until the end (then shuts `w` down, except after a failed write);
    /// ready with whether it ended without error.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W, activity: &Activity) -> Poll<bool>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            self.state = match self.state {
                CopyState::Copying => match self.poll_copy(cx, r, w, activity) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Stop::Eof) => CopyState::Closing(true),
                    Poll::Ready(Stop::ReadFailed) => CopyState::Closing(false),
                    Poll::Ready(Stop::WriteFailed) => CopyState::Done(false),
                },
                CopyState::Closing(ok) => match Pin::new(&mut *w).poll_shutdown(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => CopyState::Done(ok),
                },
                CopyState::Done(ok) => return Poll::Ready(ok),
            }
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        activity: &Activity,
    ) -> Poll<Stop>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Some((buf, pos, len)) = &mut self.chunk {
                while *pos < *len {
                    match Pin::new(&mut *w).poll_write(cx, &buf[*pos..*len]) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Stop::WriteFailed),
                        Poll::Ready(Ok(n)) => *pos += n,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let written = *len as u64;
                if let Some((buf, _, _)) = self.chunk.take() {
                    give_back(buf);
                }
                self.unflushed = true;
                self.moved += written;
                activity.touch();
            }
            let mut buf = take(self.large);
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    give_back(buf);
                    return Poll::Ready(Stop::Eof);
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.large |= n == buf.len();
                    self.chunk = Some((buf, 0, n));
                }
                Poll::Ready(Err(_)) => {
                    give_back(buf);
                    return Poll::Ready(Stop::ReadFailed);
                }
                Poll::Pending => {
                    give_back(buf);
                    // Nothing more to read for now: push out what the writer holds.
                    if self.unflushed {
                        match Pin::new(&mut *w).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(Stop::WriteFailed),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// One leg of a spliced connection.
pub struct Leg {
    tcp: TcpStream,
    /// The kernel seals and opens this leg's TLS records ([`crate::ktls`]).
    kernel_tls: bool,
    /// Plaintext already read off this leg, delivered to the other before anything else.
    early: Vec<u8>,
}

impl Leg {
    pub fn plain(tcp: TcpStream) -> Self {
        Self { tcp, kernel_tls: false, early: Vec::new() }
    }

    /// A connection handed to the kernel's TLS.
    pub fn kernel_tls(offloaded: crate::ktls::Offloaded) -> Self {
        Self { tcp: offloaded.tcp, kernel_tls: true, early: offloaded.early }
    }
}

/// A set-up connection's two legs, downstream first: spliced where both are plain TCP or kernel
/// TLS, else copied through user space (keycard's record layer, or rustls).
pub enum Legs<D, U> {
    Spliced(Leg, Leg),
    Copied(D, U),
}

impl<D, U> Legs<D, U>
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Forwards both ways ([`splice_pipe`] or [`pipe`]) until both sides close, the idle
    /// deadline or `cancel`. The future is on the heap, so a connection's own state holds a
    /// pointer to it rather than a slot of its size.
    pub fn forward(
        self,
        idle: Duration,
        cancel: CancellationToken,
    ) -> Pin<Box<dyn std::future::Future<Output = Totals> + Send>> {
        match self {
            Self::Spliced(a, b) => Box::pin(splice_pipe(a, b, idle, cancel)),
            Self::Copied(a, b) => Box::pin(pipe(a, b, idle, cancel)),
        }
    }
}

/// `splice(2)` through a pipe each way, so the bytes never enter user space. Same contract as
/// [`pipe`]: both directions, half-close, idle deadline, cancellation. A kernel-TLS leg ends its
/// direction with `close_notify`, and one that ends without it (or with another alert) is an
/// error, as rustls treats it.
///
/// Each direction is a small state machine polled by hand rather than an `async fn`: an idle
/// spliced connection is little more than this future, and as two joined `async fn`s (every
/// state's slots side by side) it was 1.8 KB; with the idle deadline and the cancellation
/// written out beside them too (a `select!` kept 0.3 KB of its own) it is 0.45 KB
/// (bench/README.md).
pub fn splice_pipe(a: Leg, b: Leg, idle: Duration, cancel: CancellationToken) -> SplicePipe {
    SplicePipe { splice: Splice::new(a, b), watch: Watch::new(idle, cancel) }
}

pin_project_lite::pin_project! {
    /// [`splice_pipe`]'s future: both directions, then the watch.
    pub struct SplicePipe {
        splice: Splice,
        #[pin]
        watch: Watch,
    }
}

impl Future for SplicePipe {
    type Output = Totals;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Totals> {
        let this = self.project();
        let done = this.splice.poll(cx, &this.watch.activity);
        let [forward, backward] = &this.splice.ways;
        this.watch.poll_end(cx, done).map(|end| Totals {
            forward: forward.moved,
            backward: backward.moved,
            end,
        })
    }
}

/// A spliced connection: `ways[0]` moves `legs[0]`'s bytes to `legs[1]`, `ways[1]` the reverse.
struct Splice {
    legs: [Leg; 2],
    ways: [Way; 2],
}

/// One direction of a spliced connection.
struct Way {
    state: WayState,
    /// Bytes moved.
    moved: u64,
    /// Records sent toward a kernel-TLS leg under its one key, counted from above.
    records: u64,
}

enum WayState {
    /// Plaintext to write first: bytes read off the source before it was spliced, or a record
    /// of data read with its type; the second field is how much is written.
    Writing(Vec<u8>, usize),
    /// Waiting for the source to be readable (where an idle connection waits; no pipe held).
    Reading,
    /// `moved` bytes went into the pipe; `left` of them are still to go out.
    Draining { pipe: Pipe, moved: usize, left: usize },
    /// Ending our writing toward the destination: `close_notify` first where it is kernel TLS
    /// (`notify` until sent), then a TCP half-close. `ok` is the direction's outcome so far.
    Closing { notify: bool, ok: bool },
    /// Finished: whether without error.
    Done(bool),
}

impl Splice {
    fn new(mut a: Leg, mut b: Leg) -> Self {
        let ways = [Way::new(std::mem::take(&mut a.early)), Way::new(std::mem::take(&mut b.early))];
        Self { legs: [a, b], ways }
    }

    /// Ready when both directions are done, with whether each ended cleanly.
    fn poll(&mut self, cx: &mut Context<'_>, activity: &Activity) -> Poll<(bool, bool)> {
        let [a, b] = &self.legs;
        let [forward, backward] = &mut self.ways;
        both(forward.poll(cx, a, b, activity), backward.poll(cx, b, a, activity))
    }
}

impl Way {
    fn new(early: Vec<u8>) -> Self {
        let state = if early.is_empty() { WayState::Reading } else { WayState::Writing(early, 0) };
        Self { state, moved: 0, records: 0 }
    }

    /// Moves bytes from `from` to `to` until the source would block (`Pending`, with `cx`'s
    /// waker in the socket's reader or writer slot) or the direction is done.
    fn poll(&mut self, cx: &mut Context<'_>, from: &Leg, to: &Leg, activity: &Activity) -> Poll<bool> {
        use nix::fcntl::{SpliceFFlags, splice};
        use tokio::io::Interest;
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let closing = |ok| WayState::Closing { notify: to.kernel_tls, ok };
        loop {
            let next = match &mut self.state {
                WayState::Done(ok) => return Poll::Ready(*ok),
                WayState::Writing(bytes, at) => {
                    if *at < bytes.len() {
                        if std::task::ready!(to.tcp.poll_write_ready(cx)).is_err() {
                            self.state = WayState::Done(false);
                            continue;
                        }
                        match to.tcp.try_write(&bytes[*at..]) {
                            Ok(n) => *at += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => self.state = WayState::Done(false),
                        }
                        continue;
                    }
                    let n = bytes.len();
                    self.wrote(n, n, activity);
                    self.after_write(to)
                }
                WayState::Reading => {
                    if std::task::ready!(from.tcp.poll_read_ready(cx)).is_err() {
                        self.state = WayState::Done(false);
                        continue;
                    }
                    // A direction holds a pipe only while bytes are in it.
                    let Ok(pipe) = Pipe::take() else {
                        self.state = closing(false);
                        continue;
                    };
                    let spliced = from.tcp.try_io(Interest::READABLE, || {
                        splice(&from.tcp, None, &pipe.w, None, SPLICE_CHUNK, flags)
                            .map_err(std::io::Error::from)
                    });
                    match spliced {
                        Ok(n) if n > 0 => WayState::Draining { pipe, moved: n, left: n },
                        other => {
                            pipe.give_back();
                            match other {
                                // The TCP stream ended without close_notify: possibly cut short.
                                Ok(_) => closing(!from.kernel_tls),
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                                // A record that is not application data heads the queue (kernel
                                // TLS refuses to splice it): read it with its type.
                                Err(e) if from.kernel_tls && e.raw_os_error() == Some(libc::EINVAL) => {
                                    use crate::ktls::Control;
                                    match crate::ktls::read_control(&from.tcp) {
                                        Ok(Control::CloseNotify) => closing(true),
                                        Ok(Control::Skipped | Control::WouldBlock) => continue,
                                        Ok(Control::Data(bytes)) => WayState::Writing(bytes, 0),
                                        Err(_) => closing(false),
                                    }
                                }
                                Err(_) => closing(false),
                            }
                        }
                    }
                }
                WayState::Draining { pipe, moved, left } => {
                    if *left > 0 {
                        if std::task::ready!(to.tcp.poll_write_ready(cx)).is_err() {
                            self.state = WayState::Done(false);
                            continue;
                        }
                        let written = to.tcp.try_io(Interest::WRITABLE, || {
                            splice(&pipe.r, None, &to.tcp, None, *left, flags).map_err(std::io::Error::from)
                        });
                        match written {
                            Ok(m) => {
                                *left -= m;
                                self.records += (m as u64).div_ceil(RECORD);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            // The pipe still holds bytes: it is closed here, never lent again.
                            Err(_) => self.state = WayState::Done(false),
                        }
                        continue;
                    }
                    let moved = *moved;
                    if let WayState::Draining { pipe, .. } =
                        std::mem::replace(&mut self.state, WayState::Reading)
                    {
                        pipe.give_back();
                    }
                    self.wrote(moved, 0, activity);
                    self.after_write(to)
                }
                WayState::Closing { notify, ok } => {
                    if *notify {
                        if std::task::ready!(to.tcp.poll_write_ready(cx)).is_err() {
                            self.state = WayState::Done(false);
                            continue;
                        }
                        match crate::ktls::try_close_notify(&to.tcp) {
                            Ok(()) => *notify = false,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => {
                                *notify = false;
                                *ok = false;
                            }
                        }
                        continue;
                    }
                    let shut = socket2::SockRef::from(&to.tcp).shutdown(std::net::Shutdown::Write);
                    WayState::Done(*ok && shut.is_ok())
                }
            };
            self.state = next;
        }
    }

    /// Counts `n` bytes delivered, `plain` of them written from user space (splices count their
    /// records as they go).
    fn wrote(&mut self, n: usize, plain: usize, activity: &Activity) {
        self.moved += n as u64;
        self.records += (plain as u64).div_ceil(RECORD);
        activity.touch();
    }

    /// Reading again, unless a kernel-TLS destination has had all the records one key may seal
    /// (this kernel cannot take new keys): then the direction fails.
    fn after_write(&self, to: &Leg) -> WayState {
        if to.kernel_tls && self.records >= crate::ktls::RECORD_LIMIT {
            return WayState::Done(false);
        }
        WayState::Reading
    }
}

/// The most one `splice` call moves: the default pipe capacity.
const SPLICE_CHUNK: usize = 64 * 1024;

/// The largest TLS record's plaintext: a kernel-TLS write of `n` bytes makes at least
/// `n / RECORD` records.
const RECORD: u64 = 16 * 1024;

/// A pipe for `splice(2)`, lent per thread like [`crate::buffers`]' buffers: taken when bytes
/// are ready to move and given back once it is empty again, so an idle spliced connection holds
/// two descriptors, not six, and a short one makes no `pipe2(2)` and four `close(2)` calls.
struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

/// Empty pipes kept per thread.
const SPARE_PIPES: usize = 16;

thread_local! {
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> std::io::Result<Self> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        use nix::fcntl::OFlag;
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { r, w })
    }

    /// Only an empty pipe may be given back: one with bytes in it is dropped (closed) instead.
    fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < SPARE_PIPES {
                p.push(self);
            }
        });
    }
}

#[cfg(test)]
mod tests;
