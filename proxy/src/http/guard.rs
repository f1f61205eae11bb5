//! Request smuggling guard for HTTP/1 downstream connections. hyper, given both
//! `Content-Length` and `Transfer-Encoding`, frames by the latter and closes after answering
//! (RFC 9112 allows that); Envoy instead refuses such a request. This wrapper does what Envoy
//! does: it follows the request framing on the bytes hyper reads, holds each request head until
//! it is complete, and turns a head with conflicting framing into one hyper cannot parse, so
//! hyper answers `400` and closes: one response, and nothing after the head is ever parsed.
//!
//! HTTP/2 (by its preface), upgrades and CONNECT are passed through untouched, and so is
//! anything the guard cannot follow (hyper's own parser is then the judge).

use std::pin::Pin;
use std::task::{Context, Poll};

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

    /// Feeds bytes read from the peer; appends to `out` what hyper may read now.
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) {
        self.held.extend_from_slice(input);
        loop {
            let before = self.held.len();
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(&self.held.split());
                    return;
                }
                State::Head => {
                    if !self.head(out) {
                        return;
                    }
                }
                State::Fixed(n) => {
                    let take = (n.min(self.held.len() as u64)) as usize;
                    out.extend_from_slice(&self.held.split_to(take));
                    let left = n - take as u64;
                    self.state = if left == 0 { State::Head } else { State::Fixed(left) };
                }
                State::ChunkSize => {
                    let Some(end) = find(&self.held, b"\r\n") else {
                        if self.held.len() > 4096 {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let line = self.held.split_to(end + 2);
                    let size = std::str::from_utf8(&line[..end])
                        .ok()
                        .and_then(|l| l.split(';').next())
                        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
                    out.extend_from_slice(&line);
                    self.state = match size {
                        Some(0) => State::Trailers,
                        Some(n) => State::ChunkData(n.saturating_add(2)),
                        None => State::Passthrough,
                    };
                }
                State::ChunkData(n) => {
                    let take = (n.min(self.held.len() as u64)) as usize;
                    out.extend_from_slice(&self.held.split_to(take));
                    let left = n - take as u64;
                    self.state = if left == 0 { State::ChunkSize } else { State::ChunkData(left) };
                }
                State::Trailers => {
                    let Some(end) = find(&self.held, b"\r\n") else {
                        if self.held.len() > self.max_head {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let line = self.held.split_to(end + 2);
                    out.extend_from_slice(&line);
                    if end == 0 {
                        self.state = State::Head;
                    }
                }
            }
            if self.held.is_empty() && before == 0 {
                return;
            }
        }
    }

    /// Handles a head when complete: `true` if it moved on (bytes consumed).
    fn head(&mut self, out: &mut BytesMut) -> bool {
        // Empty lines before a request line are allowed and ignored.
        while self.held.starts_with(b"\r\n") {
            out.extend_from_slice(&self.held.split_to(2));
        }
        if self.held.is_empty() {
            return false;
        }
        if self.first {
            let n = self.held.len().min(H2_PREFACE.len());
            if self.held[..n] == H2_PREFACE[..n] {
                if n < H2_PREFACE.len() {
                    return false;
                }
                self.state = State::Passthrough;
                return true;
            }
        }
        let mut headers = vec![httparse::EMPTY_HEADER; self.max_headers.max(1)];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(&self.held) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.held.len() <= self.max_head => return false,
            // Too large, too many headers, not HTTP: hyper's parser answers (431 / 400).
            _ => {
                self.state = State::Passthrough;
                return true;
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
        let mut head = self.held.split_to(len);
        if te && cl.is_some() {
            // Conflicting framing: make the request line unparseable so hyper refuses it.
            head[0] = b'\x01';
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
        out.extend_from_slice(&head);
        true
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The guard around a downstream connection.
pub struct Guarded<I> {
    inner: I,
    framing: Framing,
    ready: BytesMut,
    refused: Option<Box<dyn Fn() + Send + Sync>>,
}

impl<I> Guarded<I> {
    /// `on_refused` runs once per refused head (for a counter).
    pub fn new(
        inner: I,
        max_head: usize,
        max_headers: usize,
        on_refused: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            inner,
            framing: Framing::new(max_head, max_headers),
            ready: BytesMut::new(),
            refused: Some(on_refused),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.ready.is_empty() && self.framing.passthrough() {
                // Nothing left to follow (HTTP/2, upgrades): no copy, no extra buffer.
                return Pin::new(&mut self.inner).poll_read(cx, buf);
            }
            if !self.ready.is_empty() {
                let n = self.ready.len().min(buf.remaining());
                buf.put_slice(&self.ready[..n]);
                self.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        return Poll::Ready(Ok(())); // EOF; held bytes were an incomplete head
                    }
                    let this = &mut *self;
                    let before = this.framing.refused;
                    this.framing.feed(got, &mut this.ready);
                    if this.framing.refused > before
                        && let Some(f) = &this.refused
                    {
                        f();
                    }
                }
                other => return other,
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
