//! Telling HTTP from other bytes on an `auto` port: an HTTP/1 method token and a space, or the
//! HTTP/2 connection preface. Bounded by a deadline; nothing in time means TCP (so a
//! server-first protocol is delayed by the deadline, never hung).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token we wait for (`OPTIONS`, `CONNECT`, extension methods).
const MAX_METHOD: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Other,
    /// Nothing arrived before the deadline (or the peer closed).
    Timeout,
}

/// Decides from the first bytes; `None` while they could still be either.
pub fn classify(b: &[u8]) -> Option<Sniffed> {
    if b.is_empty() {
        return None;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    for (i, &c) in b.iter().enumerate().take(MAX_METHOD + 1) {
        match c {
            b' ' if i > 0 => return Some(Sniffed::Http1),
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            _ => return Some(Sniffed::Other),
        }
    }
    None
}

/// Sniffs a plaintext socket without consuming (so it can still be spliced as TCP).
pub async fn peek(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let mut buf = [0u8; 32];
    let work = async {
        let mut last = 0;
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Sniffed::Timeout,
                Ok(n) => n,
            };
            if let Some(s) = classify(&buf[..n]) {
                return s;
            }
            if n == last {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last = n;
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(Sniffed::Timeout)
}

/// Sniffs a stream that cannot be peeked (decrypted TLS): what was read is replayed by the
/// [`Rewind`] (which must have nothing to replay yet).
pub async fn read<S: AsyncRead + Unpin>(stream: &mut Rewind<S>, timeout: Duration) -> Sniffed {
    let mut buf = Vec::with_capacity(32);
    let inner = &mut stream.inner;
    let work = async {
        let mut chunk = [0u8; 32];
        loop {
            let room = 32 - buf.len();
            match inner.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => return Sniffed::Timeout,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(s) = classify(&buf) {
                return s;
            }
            if buf.len() == 32 {
                return Sniffed::Other;
            }
        }
    };
    let sniffed = tokio::time::timeout(timeout, work).await.unwrap_or(Sniffed::Timeout);
    stream.prefix = Bytes::from(buf);
    sniffed
}

/// A stream whose first bytes were already read: they are returned again first.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Nothing to replay.
    pub fn new(inner: S) -> Self {
        Self { prefix: Bytes::new(), inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Replays `prefix` before reading `inner`.
    pub fn replaying(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The bytes not yet replayed, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            if n == self.prefix.len() {
                // Let go of the storage: an emptied `Bytes` would keep it for the connection's life.
                self.prefix = Bytes::new();
            } else {
                self.prefix.advance(n);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

/// Bytes to replay are ready at once; otherwise the stream below says.
impl<S: super::server::Readiness> super::server::Readiness for Rewind<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }
}

super::delegate_write!(Rewind, inner);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_preface_and_other_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"PROPFIND /x"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"ping"), Some(Sniffed::Other));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Sniffed::Other));
        assert_eq!(classify(b" GET"), Some(Sniffed::Other));
        assert_eq!(classify(b"AAAAAAAAAAAAAAAAAAAA"), Some(Sniffed::Other));
    }
}
