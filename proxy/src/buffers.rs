//! Buffers for the hot path, lent per thread and held only while they hold bytes.
//!
//! [`take`] lends a buffer of one of two sizes from a small per-thread spare list and
//! [`give_back`] returns it, so a busy connection allocates nothing per chunk and an idle one holds
//! no buffer at all (10,000 idle connections cost no buffers).
//!
//! [`ReadAhead`] sits under a TLS stream: rustls reads the socket at most 4 KiB at a time, so a
//! 16 KiB record took four or five `read(2)` calls. `ReadAhead` reads up to 64 KiB in one call and
//! serves rustls' small reads from memory; its buffer goes back to the spare list as soon as it is
//! drained. (tokio's `BufReader` would do the reading, but it keeps its buffer for the connection's
//! whole life: 64 KiB per idle connection.)
//!
//! A connection that may move to kernel TLS after its handshake ([`crate::ktls`]) is read
//! record by record instead ([`ReadAhead::record_exact`]): every TLS record header, then exactly
//! its body, so when the handshake ends no byte past its last record has left the socket and the
//! kernel can take the stream from there. That costs two `read(2)` calls per handshake record;
//! [`ReadAhead::read_ahead_again`] returns a connection that stays with rustls to reading ahead.

use std::cell::RefCell;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first buffer a flow gets.
const SMALL: usize = 16 * 1024;
/// The buffer of a flow that filled its small one, and of a read ahead: four full TLS records.
const LARGE: usize = 64 * 1024;

/// Spare buffers kept per thread and size: enough for the chunks one thread has in flight at once
/// in the common case; beyond that a buffer is allocated and freed.
const SPARES_SMALL: usize = 16;
const SPARES_LARGE: usize = 8;

/// One thread's spare buffers, by size.
struct Spares {
    small: Vec<Box<[u8]>>,
    large: Vec<Box<[u8]>>,
}

thread_local! {
    static SPARES: RefCell<Spares> = const { RefCell::new(Spares { small: Vec::new(), large: Vec::new() }) };
}

/// A buffer of `LARGE` bytes if `large`, else `SMALL`.
pub fn take(large: bool) -> Box<[u8]> {
    let spare = SPARES.with(|s| {
        let mut s = s.borrow_mut();
        if large { s.large.pop() } else { s.small.pop() }
    });
    spare.unwrap_or_else(|| vec![0u8; if large { LARGE } else { SMALL }].into_boxed_slice())
}

/// Moves bytes of `held` from `at` into `out`; lets `held` go once every byte is out (plaintext a
/// stream delivers before its socket's: what rustls decrypted before a hand-over, the rest of a
/// record read for a small reader).
pub fn hand_out_held(held: &mut Vec<u8>, at: &mut usize, out: &mut ReadBuf<'_>) {
    let n = out.remaining().min(held.len() - *at);
    out.put_slice(&held[*at..*at + n]);
    *at += n;
    if *at == held.len() {
        *held = Vec::new();
        *at = 0;
    }
}

pub fn give_back(buf: Box<[u8]>) {
    SPARES.with(|s| {
        let mut s = s.borrow_mut();
        let (list, keep) =
            if buf.len() == LARGE { (&mut s.large, SPARES_LARGE) } else { (&mut s.small, SPARES_SMALL) };
        if list.len() < keep {
            list.push(buf);
        }
    });
}

/// Reads ahead of its reader (see the module doc); writes go straight through.
pub struct ReadAhead<T> {
    io: T,
    /// Bytes read from `io` and not yet handed out: buffer, start, end.
    ahead: Option<(Box<[u8]>, usize, usize)>,
    /// Record by record: where the reader is in the current record.
    exact: Option<RecordCursor>,
}

/// The length of a TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;

/// Where a record-exact reader stands: inside a header (`header_got` of its bytes seen) or
/// inside a body (`body_left` bytes still to read).
#[derive(Debug, Default, Clone, Copy)]
struct RecordCursor {
    header: [u8; RECORD_HEADER],
    header_got: usize,
    body_left: usize,
}

impl RecordCursor {
    /// How many bytes the next read may take without crossing the current header or body.
    fn next_read(&self) -> usize {
        if self.body_left > 0 { self.body_left } else { RECORD_HEADER - self.header_got }
    }

    /// Accounts for `bytes` just read (never more than [`Self::next_read`]).
    fn advance(&mut self, bytes: &[u8]) {
        if self.body_left > 0 {
            self.body_left -= bytes.len();
            return;
        }
        self.header[self.header_got..self.header_got + bytes.len()].copy_from_slice(bytes);
        self.header_got += bytes.len();
        if self.header_got == RECORD_HEADER {
            self.header_got = 0;
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_got == 0 && self.body_left == 0
    }
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        Self { io, ahead: None, exact: None }
    }

    /// Reads one TLS record at a time and never past it (see the module doc).
    pub fn record_exact(io: T) -> Self {
        Self { io, ahead: None, exact: Some(RecordCursor::default()) }
    }

    /// Back to reading ahead (a connection that stays with rustls).
    pub fn read_ahead_again(&mut self) {
        self.exact = None;
    }

    /// Every byte read from the socket was handed out and the reads stopped at a record
    /// boundary: true of a record-exact reader between records, never of one reading ahead.
    pub fn at_record_boundary(&self) -> bool {
        self.ahead.is_none() && self.exact.is_some_and(|c| c.at_boundary())
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The socket; bytes read ahead and not handed out are lost (see [`Self::at_record_boundary`]).
    pub fn into_inner(self) -> T {
        self.io
    }

    /// Copies what is buffered into `out`; returns the buffer once drained.
    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        if let Some((buf, start, end)) = &mut self.ahead {
            let n = (*end - *start).min(out.remaining());
            out.put_slice(&buf[*start..*start + n]);
            *start += n;
            if start == end
                && let Some((buf, _, _)) = self.ahead.take()
            {
                give_back(buf);
            }
        }
    }
}

/// Bytes read ahead are ready at once; otherwise the socket says.
impl<T: crate::http::server::Readiness> crate::http::server::Readiness for ReadAhead<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.ahead.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.io.poll_read_ready(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(cursor) = &mut this.exact {
            // Only bytes of the current header or body, straight into the reader's buffer.
            let want = cursor.next_read().min(out.remaining());
            let mut part = ReadBuf::new(out.initialize_unfilled_to(want));
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut part);
            let n = part.filled().len();
            if let Poll::Ready(Ok(())) = polled {
                cursor.advance(part.filled());
                out.advance(n);
            }
            return polled;
        }
        if this.ahead.is_some() {
            this.hand_out(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= LARGE {
            return Pin::new(&mut this.io).poll_read(cx, out);
        }
        let mut buf = take(true);
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                this.ahead = Some((buf, 0, n));
                this.hand_out(out);
                Poll::Ready(Ok(()))
            }
            other => {
                give_back(buf);
                other
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of real sockets on loopback.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_then_eof() {
        let (mut tx, rx) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Uneven writes, so reads see partial and joined chunks.
            for chunk in sent.chunks(12_345) {
                tx.write_all(chunk).await.expect("write");
            }
        });
        let mut r = ReadAhead::new(rx);
        let mut got = Vec::new();
        // rustls asks for about 4 KiB at a time; odd sizes check the bookkeeping.
        for size in [4096usize, 1, 4097, 333].into_iter().cycle() {
            let mut buf = vec![0u8; size];
            let n = r.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        writer.await.expect("writer");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
        assert!(r.ahead.is_none(), "a drained read-ahead holds no buffer");
    }

    #[tokio::test]
    async fn one_read_serves_many_small_ones_and_the_buffer_goes_back_when_drained() {
        let (mut tx, rx) = pair().await;
        tx.write_all(&[9u8; 40_000]).await.expect("write");
        let mut r = ReadAhead::new(rx);
        let mut buf = [0u8; 4096];
        // Wait until the first read has taken in more than it handed out.
        let mut total = r.read(&mut buf).await.expect("read");
        while r.ahead.is_none() && total < 40_000 {
            total += r.read(&mut buf).await.expect("read");
        }
        let held = r.ahead.as_ref().map_or(0, |(_, s, e)| e - s);
        assert!(held > 0, "a 4 KiB read of a 40 KB burst read ahead");
        while total < 40_000 {
            total += r.read(&mut buf).await.expect("read");
        }
        assert_eq!(total, 40_000);
        assert!(r.ahead.is_none(), "drained: the buffer went back");
    }

    /// `count` TLS-shaped records (type 23, a body of `i * 97 % 700` bytes) in one buffer.
    fn records(count: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..count {
            let len = (i * 97) % 700;
            out.extend_from_slice(&[23, 3, 3]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend((0..len).map(|j| (i + j) as u8));
        }
        out
    }

    #[tokio::test]
    async fn a_record_exact_reader_never_reads_past_the_record_it_is_in() {
        let (mut tx, rx) = pair().await;
        let data = records(40);
        // Everything is in the socket before the first read: a reading-ahead reader would take it all.
        tx.write_all(&data).await.expect("write");
        let mut r = ReadAhead::record_exact(rx);
        let mut got = Vec::new();
        for i in 0..40 {
            let len = (i * 97) % 700;
            let mut record = vec![0u8; RECORD_HEADER + len];
            let mut filled = 0;
            // A reader asking for more than the record (rustls asks for 4 KiB) gets the record only.
            while filled < record.len() {
                let mut big = [0u8; 4096];
                let n = r.read(&mut big).await.expect("read");
                assert!(n > 0 && filled + n <= record.len(), "record {i}: read {n} past its end");
                record[filled..filled + n].copy_from_slice(&big[..n]);
                filled += n;
            }
            assert!(r.exact.is_some_and(|c| c.at_boundary()), "after record {i}");
            got.extend_from_slice(&record);
        }
        assert_eq!(got, data);
        // The socket is still the reader's: nothing is held above it.
        assert!(r.at_record_boundary());
        let mut rx = r.into_inner();
        tx.write_all(b"after").await.expect("write");
        let mut after = [0u8; 5];
        rx.read_exact(&mut after).await.expect("read");
        assert_eq!(&after, b"after");
    }

    #[tokio::test]
    async fn a_reader_inside_a_record_or_reading_ahead_keeps_its_socket() {
        let (mut tx, rx) = pair().await;
        tx.write_all(&records(3)).await.expect("write");
        let mut r = ReadAhead::record_exact(rx);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).await.expect("read");
        assert!(!r.at_record_boundary(), "inside a header");
        let mut ahead = ReadAhead::new(r.into_inner());
        assert!(ahead.read(&mut two).await.expect("read") > 0);
        assert!(!ahead.at_record_boundary(), "a reading-ahead reader is never at a known boundary");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (tx, mut rx) = pair().await;
        let mut w = ReadAhead::new(tx);
        w.write_all(b"through").await.expect("write");
        w.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"through");
    }
}
