//! Kernel TLS: after rustls has done a mesh connection's handshake, the kernel takes over its
//! records (`setsockopt(TCP_ULP, "tls")`, then the traffic keys and sequence numbers for each
//! direction), so an L4 connection is spliced between the peer and the app like plaintext, an
//! HTTP one is read and written as plaintext by hyper ([`KernelStream`], [`ClientStream`]), and
//! rustls' buffers and AEAD state are let go.
//!
//! - [`probe`] runs once at start on a loopback connection: is the `tls` module there, and which
//!   TLS 1.3 cipher suites does it take? Where it is not (this build machine's kernel, most
//!   containers without the module loaded on the host), no connection goes to the kernel (keycard's
//!   own record layer takes them, [`crate::records`], unless `tls.user_records: off`).
//! - [`KernelTls::hand_over`] moves one connection whose handshake is done. The handshake must
//!   have been read record by record ([`crate::buffers::ReadAhead::record_exact`]) so that no
//!   ciphertext past it has left the socket; plaintext rustls already decrypted, and bytes a
//!   sniffer holds, come back as `early` bytes for the forwarder to deliver first.
//! - A client waits for the server's session tickets before it hands over ([`await_tickets`]),
//!   forwarding through rustls meanwhile: TLS 1.3 servers send them a round trip after the
//!   handshake, and a ticket that reaches the kernel instead is lost to rustls' session cache, so
//!   every next connection would pay a full handshake (with keycard on both sides, five of six
//!   connections resume).
//! - Once the kernel has the keys, records that are not application data reach user space only
//!   through `recvmsg` with a control message ([`read_control`]): `close_notify` is an end of
//!   stream, a late `NewSessionTicket` is dropped, a `KeyUpdate` or any other alert ends the
//!   connection (the kernel this was written for cannot take new keys). [`send_close_notify`]
//!   ends our direction as rustls would.
//! - [`offer`] is the sidecar's side: the probe at start, each connection offered and counted.
//!
//! Trade-offs: the keys are handed to the kernel, which holds them for the connection's life.
//! rustls' key type zeroes itself when dropped; the kernel-parameter structs built from it here
//! are plain arrays on the stack and are not zeroed. The kernel does not rekey, so a direction is
//! closed before it reaches TLS 1.3's limit of 2^24.5 AES-GCM records under one key
//! ([`RECORD_LIMIT`]).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::os::fd::AsRawFd;

use bytes::Bytes;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, TlsGetRecordType, recvmsg, setsockopt};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::buffers::ReadAhead;

mod client;
pub mod offer;
mod stream;

pub use client::ClientStream;
pub use stream::KernelStream;

/// Records one direction may send under one key before the connection is closed: below
/// TLS 1.3's AES-GCM limit of 2^24.5 (RFC 8446 §5.5), which rustls would meet with a KeyUpdate.
pub const RECORD_LIMIT: u64 = 1 << 24;

/// Why a read fails when TCP ends without the peer's `close_notify`, as rustls reports it.
pub const TRUNCATED: &str = "the peer closed the connection without sending TLS close_notify";

/// The TLS 1.3 cipher suites the kernel took at the probe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelTls {
    pub aes_128_gcm: bool,
    pub aes_256_gcm: bool,
    pub chacha20_poly1305: bool,
}

/// Why the kernel cannot take connections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    #[error("the kernel offers no tls ULP (module not built or not loaded): {0}")]
    NoUlp(io::Error),
    #[error("the kernel's tls ULP took none of the TLS 1.3 cipher suites")]
    NoCipher,
    #[error("the loopback probe connection failed: {0}")]
    Loopback(io::Error),
}

/// Asks the kernel, on throwaway loopback connections, whether it does TLS and with which suites.
pub fn probe() -> Result<KernelTls, ProbeError> {
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ProbeError::Loopback)?;
    let addr = listener.local_addr().map_err(ProbeError::Loopback)?;
    // One connection per suite: a socket's TLS parameters are set once.
    let connected = || -> Result<(StdStream, StdStream), ProbeError> {
        let c = StdStream::connect(addr).map_err(ProbeError::Loopback)?;
        let (s, _) = listener.accept().map_err(ProbeError::Loopback)?;
        Ok((c, s))
    };
    let mut found = KernelTls::default();
    let zero = Secrets { key: &[0; 32], iv: &[0; 12], seq: 0 };
    for (suite, slot) in [
        (Suite::Aes128Gcm, &mut found.aes_128_gcm),
        (Suite::Aes256Gcm, &mut found.aes_256_gcm),
        (Suite::Chacha20Poly1305, &mut found.chacha20_poly1305),
    ] {
        let (c, _s) = connected()?;
        setsockopt(&c, TcpUlp::default(), b"tls").map_err(|e| ProbeError::NoUlp(e.into()))?;
        let info = crypto_info(suite, &zero);
        *slot = setsockopt(&c, TcpTlsTx, &info).is_ok() && setsockopt(&c, TcpTlsRx, &info).is_ok();
        let _ = c.shutdown(Shutdown::Both);
    }
    if found == KernelTls::default() {
        return Err(ProbeError::NoCipher);
    }
    Ok(found)
}

impl KernelTls {
    /// The suites as text, for the start-up line and the admin API.
    pub fn describe(&self) -> String {
        let names = [
            (self.aes_128_gcm, "TLS13_AES_128_GCM_SHA256"),
            (self.aes_256_gcm, "TLS13_AES_256_GCM_SHA384"),
            (self.chacha20_poly1305, "TLS13_CHACHA20_POLY1305_SHA256"),
        ];
        names.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
    }

    fn takes(&self, suite: Suite) -> bool {
        match suite {
            Suite::Aes128Gcm => self.aes_128_gcm,
            Suite::Aes256Gcm => self.aes_256_gcm,
            Suite::Chacha20Poly1305 => self.chacha20_poly1305,
        }
    }

    /// Moves a connection whose handshake is done to the kernel (see the module doc). `sniffed`
    /// is plaintext already read off the connection and not yet delivered. A connection the
    /// kernel cannot take comes back untouched with the reason.
    pub fn hand_over<S: Handshaken>(&self, stream: S, sniffed: Bytes) -> Result<Offloaded, Declined<S>> {
        let common = stream.common();
        let suite = common.negotiated_cipher_suite().and_then(|s| match s.suite() {
            _ if common.protocol_version() != Some(ProtocolVersion::TLSv1_3) => None,
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Suite::Aes128Gcm),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Suite::Aes256Gcm),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Suite::Chacha20Poly1305),
            _ => None,
        });
        let Some(suite) = suite.filter(|s| self.takes(*s)) else {
            return Err(Declined::Kept(stream, sniffed, Refused::Cipher));
        };
        if common.wants_write() || !stream.io().at_record_boundary() {
            return Err(Declined::Kept(stream, sniffed, Refused::Buffered));
        }
        // The ULP first: it changes nothing until keys are set, and the kernel takes only an
        // established connection, so one whose peer already sent FIN (a short exchange, its
        // close_notify and FIN queued behind the handshake) stays in user space, which reads them.
        if let Err(e) = setsockopt(stream.io().get_ref(), TcpUlp::default(), b"tls") {
            let refused =
                if e == nix::errno::Errno::ENOTCONN { Refused::NotEstablished } else { Refused::Setup };
            return Err(Declined::Kept(stream, sniffed, refused));
        }
        let (tcp, conn, early) = take_apart(stream, sniffed);
        let secrets = conn.dangerous_extract_secrets().map_err(|e| Declined::Lost(e.to_string()))?;
        let (Some(tx), Some(rx)) = (Secrets::of(&secrets.tx), Secrets::of(&secrets.rx)) else {
            return Err(Declined::Lost("the negotiated suite's secrets have another shape".into()));
        };
        setsockopt(&tcp, TcpTlsTx, &crypto_info(suite, &tx))
            .and_then(|()| setsockopt(&tcp, TcpTlsRx, &crypto_info(suite, &rx)))
            .map_err(|e| Declined::Lost(io::Error::from(e).to_string()))?;
        Ok(Offloaded { tcp, early })
    }
}

/// A handshaken stream taken apart for a hand-over: its socket, its connection, and the plaintext
/// to deliver first: `sniffed`, then what rustls decrypted from the records it read (none when
/// the handshake was read record by record, but kept whatever the reason).
pub(crate) fn take_apart<S: Handshaken>(
    stream: S,
    sniffed: Bytes,
) -> (TcpStream, rustls::Connection, Vec<u8>) {
    let (io, mut conn) = stream.into_parts();
    let mut early = sniffed.to_vec();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = io::Read::read(&mut conn.reader(), &mut chunk) {
        early.extend_from_slice(&chunk[..n]);
    }
    (io.into_inner(), conn, early)
}

/// A TLS stream whose handshake rustls has done over a [`ReadAhead`], as the kernel needs it.
pub trait Handshaken: Sized {
    fn io(&self) -> &ReadAhead<TcpStream>;
    fn common(&self) -> &rustls::CommonState;
    fn into_parts(self) -> (ReadAhead<TcpStream>, rustls::Connection);
}

/// tokio-rustls' server and client streams differ only in their connection's type.
macro_rules! handshaken {
    ($stream:ty, $side:ident) => {
        impl Handshaken for $stream {
            fn io(&self) -> &ReadAhead<TcpStream> {
                self.get_ref().0
            }
            fn common(&self) -> &rustls::CommonState {
                self.get_ref().1
            }
            fn into_parts(self) -> (ReadAhead<TcpStream>, rustls::Connection) {
                let (io, conn) = self.into_inner();
                (io, rustls::Connection::$side(conn))
            }
        }
    };
}
handshaken!(tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>, Server);
handshaken!(tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>, Client);

/// A connection the kernel has: `tcp` carries plaintext both ways; `early` is plaintext read off
/// the connection before the hand-over, to deliver first.
pub struct Offloaded {
    pub tcp: TcpStream,
    pub early: Vec<u8>,
}

/// A connection the kernel did not take.
pub enum Declined<S> {
    /// rustls keeps it, untouched, with the sniffed bytes given, for the reason given.
    Kept(S, Bytes, Refused),
    /// The hand-over failed after rustls gave up its keys: the connection cannot go on.
    Lost(String),
}

/// Why a connection was not handed to the kernel (the `result` of
/// `keycard_tls_offload_total{direction, result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `tls.kernel_offload: off`.
    Off,
    /// The start-up probe found no kernel TLS.
    Unavailable,
    /// The negotiated suite is not one the kernel took (or not TLS 1.3).
    Cipher,
    /// rustls held bytes to send, or had read into a record that the kernel cannot finish.
    Buffered,
    /// The peer had already closed its direction (the kernel takes only established
    /// connections).
    NotEstablished,
    /// The kernel refused the ULP for another reason.
    Setup,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Unavailable => "unavailable",
            Self::Cipher => "cipher",
            Self::Buffered => "buffered",
            Self::NotEstablished => "not_established",
            Self::Setup => "setup_failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// One direction's traffic key, IV and next record sequence number.
struct Secrets<'a> {
    key: &'a [u8],
    iv: &'a [u8],
    seq: u64,
}

impl<'a> Secrets<'a> {
    fn of((seq, secrets): &'a (u64, ConnectionTrafficSecrets)) -> Option<Self> {
        let (key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return None,
        };
        (iv.len() == 12).then_some(Self { key, iv, seq: *seq })
    }
}

/// The kernel's parameters for `suite`. For AES-GCM the 12-byte TLS 1.3 IV is the kernel's 4-byte
/// salt and 8-byte IV; ChaCha20-Poly1305 takes all 12 as its IV. Short keys are zero-padded (only
/// the probe's zero key is ever short).
fn crypto_info(suite: Suite, s: &Secrets<'_>) -> TlsCryptoInfo {
    fn fill<const N: usize>(src: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        let n = src.len().min(N);
        out[..n].copy_from_slice(&src[..n]);
        out
    }
    let rec_seq = s.seq.to_be_bytes();
    let info = |cipher_type| libc::tls_crypto_info { version: libc::TLS_1_3_VERSION, cipher_type };
    match suite {
        Suite::Aes128Gcm => TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
            info: info(libc::TLS_CIPHER_AES_GCM_128),
            iv: fill(&s.iv[4..]),
            key: fill(s.key),
            salt: fill(&s.iv[..4]),
            rec_seq,
        }),
        Suite::Aes256Gcm => TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
            info: info(libc::TLS_CIPHER_AES_GCM_256),
            iv: fill(&s.iv[4..]),
            key: fill(s.key),
            salt: fill(&s.iv[..4]),
            rec_seq,
        }),
        Suite::Chacha20Poly1305 => {
            TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: fill(s.iv),
                key: fill(s.key),
                salt: [],
                rec_seq,
            })
        }
    }
}

/// How long a client forwards through rustls at most while it waits for the server's tickets
/// (a server that sends none and no data either is handed over after this).
pub const TICKET_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// What [`await_tickets`] moved through rustls, and whether the connection may go on to the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Waited {
    /// Bytes from the app to the server.
    pub up: u64,
    /// Bytes from the server to the app.
    pub down: u64,
    /// The server ended its direction (close_notify, read by rustls): the kernel must not take
    /// the connection, whose end it would not see.
    pub server_closed: bool,
}

enum Event {
    Sent,
    AppEof,
    Received(usize),
    ServerClosed,
    Settled,
}

/// A client's first moments after its handshake, through rustls: the app's bytes go up, the
/// server's come down, until the server's session tickets arrived (rustls stores them for the
/// next connection), the server's first data arrived (tickets precede it), the app ended its
/// direction, or `limit` passed. The reader stays record-exact, so the connection can then be
/// handed over at a record boundary.
pub async fn await_tickets(
    tls: &mut tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>,
    app: &mut TcpStream,
    limit: std::time::Duration,
) -> io::Result<Waited> {
    use std::pin::Pin;
    use std::task::Poll;

    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

    let mut waited = Waited::default();
    let before = tls.get_ref().1.tls13_tickets_received();
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let (mut up, mut down) = (crate::buffers::take(false), crate::buffers::take(false));
    let (mut up_at, mut up_len) = (0, 0);
    let result = loop {
        let event = std::future::poll_fn(|cx| {
            // App to server: read a chunk, then write it all to rustls.
            if up_at == up_len {
                let mut rb = ReadBuf::new(&mut up);
                match Pin::new(&mut *app).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(Event::AppEof)),
                    Poll::Ready(Ok(())) => (up_at, up_len) = (0, rb.filled().len()),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            while up_at < up_len {
                match Pin::new(&mut *tls).poll_write(cx, &up[up_at..up_len]) {
                    Poll::Ready(Ok(n)) => up_at += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
                if up_at == up_len {
                    waited.up += up_len as u64;
                    return Poll::Ready(Ok(Event::Sent));
                }
            }
            // Server to app: rustls reads and processes records (tickets too) until plaintext.
            let mut rb = ReadBuf::new(&mut down);
            match Pin::new(&mut *tls).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(Event::ServerClosed)),
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(Event::Received(rb.filled().len()))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if tls.get_ref().1.tls13_tickets_received() > before || deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Event::Settled));
            }
            Poll::Pending
        })
        .await;
        match event {
            Ok(Event::Sent) => {
                if let Err(e) = tls.flush().await {
                    break Err(e);
                }
            }
            Ok(Event::Received(n)) => {
                waited.down += n as u64;
                break app.write_all(&down[..n]).await;
            }
            Ok(Event::ServerClosed) => {
                waited.server_closed = true;
                break Ok(());
            }
            Ok(Event::AppEof | Event::Settled) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    crate::buffers::give_back(up);
    crate::buffers::give_back(down);
    result.map(|()| waited)
}

/// A record that is not application data, read from a kernel-TLS socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    /// The peer's `close_notify`: the end of its direction.
    CloseNotify,
    /// A record to drop (a `NewSessionTicket`).
    Skipped,
    /// Application data after all (the splice failed for another reason): deliver it.
    Data(Vec<u8>),
    /// Nothing there yet.
    WouldBlock,
}

/// Why a kernel-TLS connection must end (the `reason` of its access line).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the peer sent alert {0}")]
    Alert(u8),
    #[error("the peer sent a KeyUpdate, which the kernel cannot follow")]
    KeyUpdate,
    #[error("the peer sent a post-handshake message of type {0}")]
    Handshake(u8),
    #[error("record type {0}")]
    RecordType(u8),
    #[error("reading the record failed: {0}")]
    Io(io::Error),
}

/// Reads the record at the head of a kernel-TLS socket with its type (a splice refuses records
/// that are not application data with `EINVAL`, leaving them queued). The record is read into a
/// lent 16 KiB buffer: a TLS 1.3 record's plaintext is at most 2^14 bytes.
pub fn read_control(tcp: &TcpStream) -> Result<Control, ControlError> {
    let mut body = crate::buffers::take(false);
    let read = read_record(tcp, &mut body);
    let out = classify(read, &body);
    crate::buffers::give_back(body);
    out
}

fn read_record(tcp: &TcpStream, body: &mut [u8]) -> io::Result<(usize, Option<TlsGetRecordType>)> {
    let mut space = nix::cmsg_space!(u8);
    tcp.try_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(body)];
        let msg = recvmsg::<()>(tcp.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT)?;
        let kind = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::TlsGetRecordType(t) => Some(t),
                _ => None,
            })
        });
        Ok((msg.bytes, kind))
    })
}

fn classify(
    read: io::Result<(usize, Option<TlsGetRecordType>)>,
    body: &[u8],
) -> Result<Control, ControlError> {
    let (n, kind) = match read {
        Ok(x) => x,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Control::WouldBlock),
        Err(e) => return Err(ControlError::Io(e)),
    };
    let body = &body[..n];
    Ok(match record(kind, body)? {
        Record::Data => Control::Data(body.to_vec()),
        Record::CloseNotify => Control::CloseNotify,
        Record::Skipped => Control::Skipped,
    })
}

/// What a record read from a kernel-TLS socket is, by the type the kernel gave with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Application data (or no type: a socket whose peer sent nothing else).
    Data,
    /// The peer's `close_notify`.
    CloseNotify,
    /// To drop: a `NewSessionTicket` or a `ChangeCipherSpec`.
    Skipped,
}

fn record(kind: Option<TlsGetRecordType>, body: &[u8]) -> Result<Record, ControlError> {
    match kind {
        None | Some(TlsGetRecordType::ApplicationData) => Ok(Record::Data),
        Some(TlsGetRecordType::Alert) => match body.get(1) {
            Some(0) => Ok(Record::CloseNotify),
            Some(d) => Err(ControlError::Alert(*d)),
            None => Err(ControlError::Alert(255)),
        },
        Some(TlsGetRecordType::Handshake) => match body.first() {
            // NewSessionTicket.
            Some(4) => Ok(Record::Skipped),
            Some(24) => Err(ControlError::KeyUpdate),
            Some(t) => Err(ControlError::Handshake(*t)),
            None => Err(ControlError::Handshake(0)),
        },
        Some(TlsGetRecordType::ChangeCipherSpec) => Ok(Record::Skipped),
        Some(TlsGetRecordType::Unknown(t)) => Err(ControlError::RecordType(t)),
        Some(_) => Err(ControlError::RecordType(0)),
    }
}

/// Sends `close_notify` on a kernel-TLS socket (an alert record, the type given in a control
/// message), as rustls does before it shuts down writing.
pub async fn send_close_notify(tcp: &TcpStream) -> io::Result<()> {
    loop {
        std::future::poll_fn(|cx| tcp.poll_write_ready(cx)).await?;
        match try_close_notify(tcp) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// [`send_close_notify`] once the socket is writable: `WouldBlock` where it was not after all.
pub fn try_close_notify(tcp: &TcpStream) -> io::Result<()> {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then the record type,
    // padded to the alignment of size_t: CMSG_LEN(1) and CMSG_SPACE(1), laid out by hand so
    // the crate stays free of unsafe code (socket2 takes the control bytes as a slice).
    const WORD: usize = std::mem::size_of::<usize>();
    const HEADER: usize = WORD + 2 * std::mem::size_of::<libc::c_int>();
    const LEN: usize = HEADER + 1;
    const SPACE: usize = LEN.div_ceil(WORD) * WORD;
    let mut control = [0u8; SPACE];
    control[..WORD].copy_from_slice(&LEN.to_ne_bytes());
    control[WORD..WORD + 4].copy_from_slice(&libc::SOL_TLS.to_ne_bytes());
    control[WORD + 4..HEADER].copy_from_slice(&libc::TLS_SET_RECORD_TYPE.to_ne_bytes());
    control[HEADER] = 21; // alert
    // Level warning, description close_notify.
    let alert = [IoSlice::new(&[1, 0])];
    let msg = socket2::MsgHdr::new().with_buffers(&alert).with_control(&control);
    tcp.try_io(Interest::WRITABLE, || socket2::SockRef::from(tcp).sendmsg(&msg, 0)).map(|_| ())
}

#[cfg(test)]
pub(crate) mod tests;
