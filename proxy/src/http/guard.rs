//! Request smuggling guard for HTTP/1 downstream connections. hyper, given both
//! `Content-Length` and `Transfer-Encoding`, frames by the latter and closes after answering
//! (RFC 9112 allows that); Envoy instead refuses such a request. This wrapper does what Envoy
//! does: it follows the request framing on the bytes hyper reads, holds each request head until
//! it is complete, and turns a head with conflicting framing into one hyper cannot parse, so
//! hyper answers `400` and closes: one response, and nothing after the head is ever parsed.
//!
//! HTTP/2 (by its preface), upgrades and CONNECT are passed through untouched, and so is
//! anything the guard cannot follow (hyper's own parser is then the judge).

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// `n` more body bytes.
    Fixed(u64),
    /// A chunk-size line.
    ChunkSize,
    /// `n` more chunk bytes, then CRLF.
    ChunkData(u64),
    /// Trailer lines until an empty one.
    Trailers,
    /// Not following any more.
    Passthrough,
}

/// What the guard decided about a run of bytes (pure, for tests and fuzzing).
pub struct Framing {
    state: State,
    held: BytesMut,
    max_head: usize,
    max_headers: usize,
    first: bool,
    /// Heads refused so far.
    pub refused: u64,
}

impl Framing {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Self { state: State::Head, held: BytesMut::new(), max_head, max_headers, first: true, refused: 0 }
    }

    /// Whether the guard has stopped following (h2, an upgrade, a refused head): reads may
    /// then bypass it.
    pub fn passthrough(&self) -> bool {
        self.state == State::Passthrough && self.held.is_empty()
    }

    /// Feeds bytes read from the peer; appends to `out` what hyper may read now (an incomplete
    /// head or line stays held until the bytes after it come).
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) {
        self.held.extend_from_slice(input);
        let mut held = std::mem::take(&mut self.held);
        let n = self.scan(&mut held);
        out.extend_from_slice(&held.split_to(n));
        self.held = held;
    }

    /// Follows `data`, the bytes after everything scanned before, where they lie (a head with
    /// conflicting framing is poisoned in place) and returns how many of its leading bytes hyper
    /// may read now. The rest, an incomplete head, chunk-size or trailer line, must come again at
    /// the start of the next call, with the bytes that follow it.
    fn scan(&mut self, data: &mut [u8]) -> usize {
        let mut at = 0;
        loop {
            let rest = &mut data[at..];
            if rest.is_empty() {
                return at;
            }
            match self.state {
                State::Passthrough => return data.len(),
                State::Head => match self.head(rest) {
                    Some(n) => at += n,
                    None => return at,
                },
                State::Fixed(n) => {
                    let take = n.min(rest.len() as u64);
                    at += take as usize;
                    self.state = if take == n { State::Head } else { State::Fixed(n - take) };
                }
                State::ChunkSize => {
                    let Some(end) = find(rest, b"\r\n") else {
                        if rest.len() > 4096 {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return at;
                    };
                    let size = std::str::from_utf8(&rest[..end])
                        .ok()
                        .and_then(|l| l.split(';').next())
                        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
                    at += end + 2;
                    self.state = match size {
                        Some(0) => State::Trailers,
                        Some(n) => State::ChunkData(n.saturating_add(2)),
                        None => State::Passthrough,
                    };
                }
                State::ChunkData(n) => {
                    let take = n.min(rest.len() as u64);
                    at += take as usize;
                    self.state = if take == n { State::ChunkSize } else { State::ChunkData(n - take) };
                }
                State::Trailers => {
                    let Some(end) = find(rest, b"\r\n") else {
                        if rest.len() > self.max_head {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return at;
                    };
                    at += end + 2;
                    if end == 0 {
                        self.state = State::Head;
                    }
                }
            }
        }
    }

    /// A head at the start of `rest`: how many bytes it moved past (a blank line, the head; none
    /// when it stopped following), or `None` while the head is incomplete.
    fn head(&mut self, rest: &mut [u8]) -> Option<usize> {
        // Empty lines before a request line are allowed and ignored.
        if rest.starts_with(b"\r\n") {
            return Some(2);
        }
        if self.first {
            let n = rest.len().min(H2_PREFACE.len());
            if rest[..n] == H2_PREFACE[..n] {
                if n < H2_PREFACE.len() {
                    return None;
                }
                self.state = State::Passthrough;
                return Some(0);
            }
        }
        // Header slots left uninitialised (a head seldom has more than a few dozen headers);
        // on the heap only where the configured limit is above what the stack array holds.
        const ON_STACK: usize = 128;
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; ON_STACK];
        let mut heap = Vec::new();
        let slots = if self.max_headers <= ON_STACK {
            &mut stack[..self.max_headers.max(1)]
        } else {
            heap.resize_with(self.max_headers, MaybeUninit::uninit);
            &mut heap[..]
        };
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(rest, slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if rest.len() <= self.max_head => return None,
            // Too large, too many headers, not HTTP: hyper's parser answers (431 / 400).
            _ => {
                self.state = State::Passthrough;
                return Some(0);
            }
        };
        self.first = false;
        let headers: &[httparse::Header<'_>] = req.headers;
        let named = |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
        let cl = named("content-length")
            .map(|h| std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok()))
            .next();
        let te = named("transfer-encoding").next().is_some();
        let chunked = named("transfer-encoding").any(|h| {
            std::str::from_utf8(h.value).is_ok_and(|v| v.trim().to_ascii_lowercase().ends_with("chunked"))
        });
        let upgrade = req.method == Some("CONNECT") || named("upgrade").next().is_some();
        if te && cl.is_some() {
            // Conflicting framing: make the request line unparseable so hyper refuses it.
            rest[0] = b'\x01';
            self.refused += 1;
            self.state = State::Passthrough;
        } else if upgrade {
            self.state = State::Passthrough;
        } else if te {
            self.state = if chunked { State::ChunkSize } else { State::Passthrough };
        } else {
            self.state = match cl {
                Some(Some(0)) | None => State::Head,
                Some(Some(n)) => State::Fixed(n),
                Some(None) => State::Passthrough,
            };
        }
        Some(len)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a guard runs for each refused head; one per host, shared by its connections.
pub type OnRefused = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The guard around a downstream connection.
pub struct Guarded<I> {
    inner: I,
    framing: Framing,
    ready: BytesMut,
    refused: Option<OnRefused>,
}

impl<I> Guarded<I> {
    /// `on_refused` runs once per refused head (for a counter).
    pub fn new(inner: I, max_head: usize, max_headers: usize, on_refused: OnRefused) -> Self {
        Self {
            inner,
            framing: Framing::new(max_head, max_headers),
            ready: BytesMut::new(),
            refused: Some(on_refused),
        }
    }
}

impl<I> Guarded<I> {
    /// At a request boundary with nothing held: what hyper read so far ends with a whole
    /// message (or nothing was read at all). False once the guard stops following.
    pub fn at_rest(&self) -> bool {
        self.framing.state == State::Head && self.framing.held.is_empty() && self.ready.is_empty()
    }

    /// Lets go of the buffers' memory while they are empty (a connection between requests).
    pub fn shed(&mut self) {
        if self.ready.is_empty() {
            self.ready = BytesMut::new();
        }
        if self.framing.held.is_empty() {
            self.framing.held = BytesMut::new();
        }
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.framing.passthrough() {
                // Nothing left to follow (HTTP/2, upgrades).
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Read into hyper's own buffer and follow the bytes there: no copy, no buffer of ours.
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == start {
                return Poll::Ready(Ok(())); // EOF; held bytes were an incomplete head
            }
            let refused = this.framing.refused;
            if this.framing.held.is_empty() {
                let new = &mut buf.filled_mut()[start..];
                let n = this.framing.scan(new);
                // What hyper may not see yet (an incomplete head) waits for the bytes after it.
                this.framing.held.extend_from_slice(&new[n..]);
                buf.set_filled(start + n);
            } else {
                this.framing.feed(&buf.filled()[start..], &mut this.ready);
                buf.set_filled(start);
            }
            if this.framing.refused > refused
                && let Some(f) = &this.refused
            {
                f();
            }
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

super::delegate_write!(Guarded, inner);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, u64) {
        let mut f = Framing::new(64 * 1024, 100);
        let mut out = BytesMut::new();
        for c in chunks {
            f.feed(c, &mut out);
        }
        (out.to_vec(), f.refused)
    }

    #[test]
    fn honest_requests_pass_unchanged_whatever_the_split() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 1..stream.len() {
            let (out, refused) = run(&[&stream[..split], &stream[split..]]);
            assert_eq!((out.as_slice(), refused), (stream, 0), "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), (stream.to_vec(), 0));
    }

    #[test]
    fn conflicting_framing_is_poisoned_and_nothing_after_it_is_followed() {
        let attack = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, refused) = run(&[attack]);
        assert_eq!(refused, 1);
        assert_eq!(out[0], 1);
        assert_eq!(&out[1..], &attack[1..]);
        // The same attack in a later request of a keep-alive connection.
        let first = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
        let two = [first.as_slice(), attack.as_slice()].concat();
        let (out, refused) = run(&[&two]);
        assert_eq!(refused, 1);
        assert_eq!(&out[..first.len()], first);
        assert_eq!(out[first.len()], 1, "{:?}", String::from_utf8_lossy(&out));
    }

    /// Through a real socket, however the peer's writes split heads and bodies and however
    /// small hyper's reads: the bytes read are what `feed` makes of the whole stream.
    #[tokio::test]
    async fn reads_through_a_socket_match_the_framing_whatever_the_split() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let honest: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let attack: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n";
        let stream = [honest, attack].concat();
        let (want, refused) = run(&[&stream]);
        assert_eq!((want[honest.len()], refused), (1, 1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for split in [1, 20, 47, 52, 60, honest.len() + 3, honest.len() + 40, stream.len() - 2] {
            for read_size in [3, 16 * 1024] {
                let sent = stream.clone();
                let writer = tokio::spawn(async move {
                    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                    c.set_nodelay(true).unwrap();
                    c.write_all(&sent[..split]).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    c.write_all(&sent[split..]).await.unwrap();
                });
                let (sock, _) = listener.accept().await.unwrap();
                let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let c = counted.clone();
                let on_refused = std::sync::Arc::new(move || {
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                });
                let mut guarded = Guarded::new(sock, 64 * 1024, 100, on_refused);
                let mut got = Vec::new();
                let mut chunk = vec![0u8; read_size];
                loop {
                    let n = guarded.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                }
                writer.await.unwrap();
                assert_eq!(got, want, "split at {split}, reads of {read_size}");
                assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 1, "split at {split}");
            }
        }
    }

    #[test]
    fn h2_upgrades_and_garbage_pass_through() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        assert_eq!(run(&[h2]), (h2.to_vec(), 0));
        let ws =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
        assert_eq!(run(&[ws]), (ws.to_vec(), 0));
        let junk = b"\x16\x03\x01 not http at all";
        assert_eq!(run(&[junk]), (junk.to_vec(), 0));
    }
}
