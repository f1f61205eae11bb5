//! A mesh connection this sidecar opened for HTTP (a pooled connection, an upgrade's), which
//! moves from rustls to the kernel's TLS (else to keycard's own record layer, [`crate::records`])
//! by itself once it may, under hyper's reads and writes.
//!
//! A client must not hand over at once after its handshake: the server's session tickets come a
//! round trip later, and a ticket that reaches the kernel is lost to rustls' session cache (the
//! next connection would pay a full handshake). L4 connections wait for them in
//! [`super::await_tickets`] while forwarding; hyper owns an HTTP connection's reads and writes,
//! so this stream waits inside them instead: through rustls, read record by record, until the
//! tickets are in or the server's first data came (tickets precede it), then at the next read or
//! write that finds rustls with nothing to send and the reader between records, the kernel takes
//! the connection (plaintext rustls already decrypted is delivered first), or the record layer
//! where the kernel will not. A connection neither takes goes back to reading ahead with rustls
//! for good.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::offer::Moved;
#[cfg(test)]
use super::{Declined, KernelTls};
use super::{KernelStream, Offloaded};
use crate::buffers::ReadAhead;
use crate::records::RecordStream;
use crate::sidecar::{Direction, Shared};

type Tls = TlsStream<ReadAhead<TcpStream>>;
type Rustls = Box<Tls>;

/// Offers the connection to the kernel or the record layer, or (`true`: the server ended its
/// direction through rustls, so neither would see the end) only tells why it stays: the
/// kernel's or the record layer's, rustls' back (`Err(Some)`), or gone (`Err(None)`: a hand-over
/// failed half-way).
type Offer =
    Box<dyn FnOnce(Rustls, bool) -> Result<Either<Offloaded, RecordStream>, Option<Rustls>> + Send + Sync>;

pub struct ClientStream {
    state: State,
}

enum State {
    /// With rustls, waiting to move: the offer to make, the tickets rustls had at the handshake,
    /// and whether the server's data came.
    Waiting { tls: Rustls, offer: Offer, tickets: u32, data: bool },
    /// With rustls for good.
    Rustls(Rustls),
    /// With the kernel's TLS or keycard's record layer.
    Moved(Either<KernelStream, Box<RecordStream>>),
    /// The hand-over failed after rustls gave up its keys.
    Lost,
}

impl ClientStream {
    /// A connection just handshaken over `ReadAhead`: waits to move where the sidecar may offload
    /// (the handshake then was read record by record), stays with rustls where it may not.
    pub fn new(tls: TlsStream<ReadAhead<TcpStream>>, shared: &Arc<Shared>, remote: SocketAddr) -> Self {
        let tls = Box::new(tls);
        if !shared.may_take_records() {
            shared.count_no_offload(Direction::Outbound);
            return Self { state: State::Rustls(tls) };
        }
        let shared = shared.clone();
        Self::with_offer(
            tls,
            Box::new(move |tls, server_closed| {
                if server_closed {
                    shared.count_offload(Direction::Outbound, "not_established");
                    return Err(Some(tls));
                }
                match shared.take_records(Direction::Outbound, remote, *tls, Bytes::new()) {
                    Some(Moved::Kernel(kernel)) => Ok(Either::Left(kernel)),
                    Some(Moved::User(records)) => Ok(Either::Right(records)),
                    Some(Moved::Rustls(tls, _)) => Err(Some(Box::new(tls))),
                    None => Err(None),
                }
            }),
        )
    }

    /// Waits to move to `kernel`, uncounted (the kernel-TLS tests).
    #[cfg(test)]
    pub fn waiting(tls: Tls, kernel: KernelTls) -> Self {
        Self::with_offer(
            Box::new(tls),
            Box::new(move |tls, server_closed| match server_closed {
                true => Err(Some(tls)),
                false => {
                    kernel.hand_over(*tls, Bytes::new()).map(Either::Left).map_err(
                        |declined| match declined {
                            Declined::Kept(tls, ..) => Some(Box::new(tls)),
                            Declined::Lost(_) => None,
                        },
                    )
                }
            }),
        )
    }

    fn with_offer(tls: Rustls, offer: Offer) -> Self {
        let tickets = tls.get_ref().1.tls13_tickets_received();
        Self { state: State::Waiting { tls, offer, tickets, data: false } }
    }

    /// Whether the kernel has the connection.
    pub fn is_kernel(&self) -> bool {
        matches!(self.state, State::Moved(Either::Left(_)))
    }

    /// Moves the connection where it is time to, and it can be done now.
    fn settle(&mut self) {
        let State::Waiting { tls, data, tickets, .. } = &self.state else { return };
        let (io, conn) = tls.get_ref();
        let due = *data || conn.tls13_tickets_received() > *tickets;
        // Not yet: rustls still has bytes to send, or its reader is inside a record.
        if !due || conn.wants_write() || !io.at_record_boundary() {
            return;
        }
        self.offer(false);
    }

    /// Makes the offer (see [`Offer`]) and takes the state it leads to.
    fn offer(&mut self, server_closed: bool) {
        let State::Waiting { tls, offer, .. } = std::mem::replace(&mut self.state, State::Lost) else {
            return;
        };
        self.state = match offer(tls, server_closed) {
            Ok(Either::Left(kernel)) => State::Moved(Either::Left(KernelStream::new(kernel))),
            Ok(Either::Right(records)) => State::Moved(Either::Right(Box::new(records))),
            Err(Some(mut tls)) => {
                tls.get_mut().0.read_ahead_again();
                State::Rustls(tls)
            }
            Err(None) => State::Lost,
        };
    }
}

fn lost() -> io::Error {
    io::Error::other("the connection's hand-over to kernel TLS or the record layer failed")
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.settle();
        match &mut this.state {
            State::Waiting { tls, data, .. } => {
                let (before, room) = (buf.filled().len(), buf.remaining() > 0);
                let read = Pin::new(&mut **tls).poll_read(cx, buf);
                let came = matches!(read, Poll::Ready(Ok(())));
                let ended = came && room && buf.filled().len() == before;
                *data |= came && !ended;
                if ended {
                    this.offer(true);
                }
                read
            }
            State::Rustls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
            State::Moved(k) => Pin::new(k).poll_read(cx, buf),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.settle();
        match &mut this.state {
            State::Waiting { tls, .. } | State::Rustls(tls) => Pin::new(&mut **tls).poll_write(cx, data),
            State::Moved(k) => Pin::new(k).poll_write(cx, data),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.settle();
        match &mut this.state {
            State::Waiting { tls, .. } | State::Rustls(tls) => {
                Pin::new(&mut **tls).poll_write_vectored(cx, bufs)
            }
            State::Moved(k) => Pin::new(k).poll_write_vectored(cx, bufs),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.state {
            State::Waiting { tls, .. } | State::Rustls(tls) => tls.is_write_vectored(),
            State::Moved(k) => k.is_write_vectored(),
            State::Lost => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Waiting { tls, .. } | State::Rustls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            State::Moved(k) => Pin::new(k).poll_flush(cx),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Waiting { tls, .. } | State::Rustls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
            State::Moved(k) => Pin::new(k).poll_shutdown(cx),
            State::Lost => Poll::Ready(Ok(())),
        }
    }
}
