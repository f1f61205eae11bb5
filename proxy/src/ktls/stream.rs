//! A kernel-TLS connection as a byte stream (`AsyncRead` + `AsyncWrite`), for what reads and
//! writes rather than splices: hyper, on an HTTP connection between sidecars once the kernel has
//! its keys. The kernel encrypts what is written and decrypts what is read; this type keeps the
//! rest of what rustls did for the stream:
//!
//! - every read is a `recvmsg` that asks for the record type, so a record that is not application
//!   data is seen as such: the peer's `close_notify` is the end of the stream, a `NewSessionTicket`
//!   is passed over, a `KeyUpdate` or another alert ends the stream in error;
//! - the end of TCP without `close_notify` is an error (`UnexpectedEof`), as rustls reports it;
//! - shutting down sends `close_notify` before the FIN;
//! - writes stop with an error before [`RECORD_LIMIT`] records went out under the key.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{
    ControlError, Offloaded, RECORD_LIMIT, Record, TRUNCATED, read_record, record, try_close_notify,
};

/// A TLS 1.3 record's largest plaintext.
const MAX_RECORD: usize = 16 * 1024;

pub struct KernelStream {
    tcp: TcpStream,
    /// Plaintext to deliver before the socket's: what rustls had decrypted before the hand-over,
    /// then the rest of any record read for a reader with less room than a record.
    pending: Vec<u8>,
    at: usize,
    /// The peer's `close_notify` came: every read from now on is the end.
    read_closed: bool,
    /// Records written under the key, counted high: each write ends at least one.
    records: u64,
    /// Our `close_notify` went out.
    notified: bool,
}

impl KernelStream {
    pub fn new(offloaded: Offloaded) -> Self {
        let Offloaded { tcp, early } = offloaded;
        Self { tcp, pending: early, at: 0, read_closed: false, records: 0, notified: false }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether a read would return at once with bytes this stream already holds.
    pub fn holds_bytes(&self) -> bool {
        self.at < self.pending.len()
    }

    /// Moves held bytes into `buf`.
    fn deliver(&mut self, buf: &mut ReadBuf<'_>) {
        crate::buffers::hand_out_held(&mut self.pending, &mut self.at, buf);
    }

    /// One `recvmsg` into `into`: the plaintext bytes it holds, `None` for a record passed over,
    /// an empty read at the end of the stream. `Pending` once the socket has nothing more.
    fn poll_record(&mut self, cx: &mut Context<'_>, into: &mut [u8]) -> Poll<io::Result<Option<usize>>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let (n, kind) = match read_record(&self.tcp, into) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            return Poll::Ready(match record(kind, &into[..n]) {
                Ok(Record::Data) if n == 0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, TRUNCATED)),
                Ok(Record::Data) => Ok(Some(n)),
                Ok(Record::CloseNotify) => {
                    self.read_closed = true;
                    Ok(Some(0))
                }
                Ok(Record::Skipped) => Ok(None),
                Err(e @ (ControlError::Alert(_) | ControlError::KeyUpdate)) => {
                    Err(io::Error::new(io::ErrorKind::ConnectionAborted, e))
                }
                Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            });
        }
    }
}

impl AsyncRead for KernelStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holds_bytes() {
            this.deliver(buf);
            return Poll::Ready(Ok(()));
        }
        if this.read_closed || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // A record is read whole or in parts, each with its type; a control record read in
            // parts could not be told by its first byte. So a reader with room for less than a
            // record gets it through a lent buffer, the rest held for its next read.
            if buf.remaining() >= MAX_RECORD {
                match ready!(this.poll_record(cx, buf.initialize_unfilled()))? {
                    Some(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    None => continue,
                }
            }
            let mut lent = crate::buffers::take(false);
            let got = this.poll_record(cx, &mut lent[..MAX_RECORD]);
            if let Poll::Ready(Ok(Some(n @ 1..))) = got {
                this.pending = lent[..n].to_vec();
                this.deliver(buf);
            }
            crate::buffers::give_back(lent);
            match ready!(got)? {
                Some(_) => return Poll::Ready(Ok(())),
                None => continue,
            }
        }
    }
}

impl AsyncWrite for KernelStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write()?;
        let written = Pin::new(&mut this.tcp).poll_write(cx, data);
        this.count(written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write()?;
        let written = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.count(written)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The kernel sends each record as its write ends.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.notified {
            ready!(this.tcp.poll_write_ready(cx))?;
            match try_close_notify(&this.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(()) => this.notified = true,
            }
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl KernelStream {
    /// Counts the records a write ended: each ends at least one.
    fn count(&mut self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written {
            self.records += n.div_ceil(MAX_RECORD).max(1) as u64;
        }
        written
    }

    /// Writing after `close_notify`, or past the record limit (the kernel cannot rekey), fails.
    fn before_write(&self) -> io::Result<()> {
        if self.notified {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS close_notify already sent"));
        }
        if self.records >= RECORD_LIMIT {
            return Err(io::Error::other("TLS record limit under one key reached; the kernel cannot rekey"));
        }
        Ok(())
    }
}
