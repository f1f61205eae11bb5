//! keycard's own TLS 1.3 record layer, for a mesh connection whose handshake rustls has done and
//! which the kernel's TLS did not take (no `tls` module: most hosts): what [`crate::ktls`] hands
//! to the kernel, done in user space. The traffic keys and sequence numbers come out of rustls
//! after the handshake exactly as for the kernel. Records are opened by rustls' own code (the
//! negotiated suite's `MessageDecrypter`: nonce, additional data, padding and the length checks
//! of RFC 8446) and sealed here with aws-lc-rs' AEAD as RFC 8446 §5.2–5.3 says (the nonce is the
//! IV XOR the sequence number, the additional data the record's header, the inner type last),
//! as rustls seals ChaCha20-Poly1305 records: rustls' AES-GCM sealing key is aws-lc's TLS 1.3
//! key, which takes its first record as sequence number 0, and a connection past its handshake
//! may be further on (a server that sent tickets). This module frames the records and decides
//! what each inner type means.
//!
//! Why not leave the connection with rustls' buffered `Connection`:
//! - records are opened in place, in one buffer the socket is read into (64 KiB per `read(2)`),
//!   and the plaintext is copied once, to the reader. rustls copies each byte into its deframer,
//!   shifts the unread rest to the front after every record, copies the plaintext into a new
//!   `Vec` and copies it again to the reader (`bench/README.md` counts the copies);
//! - an idle connection holds no buffer: the read buffer is lent ([`crate::buffers`]) only while
//!   it holds bytes, and nothing is queued to send. rustls keeps a 4 KiB deframer buffer, its
//!   handshake's leftovers and the peer's certificates for the connection's life.
//!
//! What it does with records, as [`crate::ktls::KernelStream`] does with the kernel's:
//! - application data is delivered; a `NewSessionTicket` is passed over (a client moves here only
//!   once the server's tickets are in, [`crate::ktls::await_tickets`]);
//! - the peer's `close_notify` is the end of the stream (a `user_canceled` warning is passed
//!   over); any other alert, a `KeyUpdate` (there is no traffic secret here to derive the next key
//!   from) or any other record ends the stream in error, and so does a record that fails to open;
//! - the end of TCP without `close_notify` is an error (`UnexpectedEof`), as rustls reports it;
//! - shutting down sends `close_notify` before the FIN; writes stop before [`RECORD_LIMIT`]
//!   records went out under the key, where rustls would have sent a KeyUpdate.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::Bytes;
use rustls::crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, OutboundChunks};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::ktls::{Declined, Handshaken, RECORD_LIMIT, Refused, TRUNCATED};

#[cfg(test)]
mod tests;

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// A TLS 1.3 record's largest plaintext.
const MAX_PLAIN: usize = 16 * 1024;
/// RFC 8446 §5.2: a record's ciphertext is at most 2^14 + 256 bytes.
const MAX_SEALED: usize = MAX_PLAIN + 256;
/// Records sealed by one write at most: 64 KiB of plaintext, sent in one `writev`.
const RECORDS_PER_WRITE: usize = 4;
/// Slices of one vectored write gathered into records at most (hyper writes two or three).
const MAX_SLICES: usize = 16;

/// Takes a connection whose handshake is done away from rustls (see the module doc). Its
/// handshake must have been read record by record ([`crate::buffers::ReadAhead::record_exact`]),
/// so that no ciphertext past it is left inside rustls; `sniffed` is plaintext already read off
/// the connection and not yet delivered. A connection that cannot move comes back untouched
/// with the reason.
pub fn take<S: Handshaken>(stream: S, sniffed: Bytes) -> Result<RecordStream, Declined<S>> {
    let common = stream.common();
    let suite = match common.negotiated_cipher_suite() {
        Some(SupportedCipherSuite::Tls13(suite))
            if common.protocol_version() == Some(ProtocolVersion::TLSv1_3) =>
        {
            suite
        }
        _ => return Err(Declined::Kept(stream, sniffed, Refused::Cipher)),
    };
    if common.wants_write() || !stream.io().at_record_boundary() {
        return Err(Declined::Kept(stream, sniffed, Refused::Buffered));
    }
    let (tcp, conn, early) = crate::ktls::take_apart(stream, sniffed);
    let secrets = conn.dangerous_extract_secrets().map_err(|e| Declined::Lost(e.to_string()))?;
    let ((tx_seq, tx), (rx_seq, rx)) = (secrets.tx, secrets.rx);
    let sealing = parts(tx).and_then(|(algorithm, key, iv)| {
        let key = LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).ok()?);
        Some((key, <[u8; 12]>::try_from(iv.as_ref()).ok()?))
    });
    let (Some((tx_key, tx_iv)), Some((_, rx_key, rx_iv))) = (sealing, parts(rx)) else {
        return Err(Declined::Lost("the negotiated suite's secrets have another shape".into()));
    };
    Ok(RecordStream {
        tcp,
        rx: Opening {
            key: suite.aead_alg.decrypter(rx_key, rx_iv),
            seq: rx_seq,
            buf: None,
            plain: 0..0,
            start: 0,
            end: 0,
            early,
            early_at: 0,
            state: ReadState::Open,
        },
        tx: Sealing { key: tx_key, iv: tx_iv, seq: tx_seq, queue: VecDeque::new(), at: 0, notified: false },
    })
}

/// One direction's AEAD, key and IV.
fn parts(secrets: ConnectionTrafficSecrets) -> Option<(&'static aead::Algorithm, AeadKey, Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => Some((&aead::AES_128_GCM, key, iv)),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => Some((&aead::AES_256_GCM, key, iv)),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Some((&aead::CHACHA20_POLY1305, key, iv)),
        _ => None,
    }
}

/// A mesh connection whose records keycard seals and opens itself (see the module doc), as a
/// byte stream: forwarded by [`crate::forward::pipe`] at L4, served by hyper at L7.
pub struct RecordStream {
    tcp: TcpStream,
    rx: Opening,
    tx: Sealing,
}

/// The receiving direction.
struct Opening {
    key: Box<dyn MessageDecrypter>,
    /// The next record's sequence number.
    seq: u64,
    /// What was read off the socket, lent only while it holds bytes: opened records up to
    /// `start` (the plaintext still to deliver at `plain`), records not yet opened from `start`
    /// to `end`.
    buf: Option<Box<[u8]>>,
    plain: std::ops::Range<usize>,
    start: usize,
    end: usize,
    /// Plaintext from before the hand-over, delivered first.
    early: Vec<u8>,
    early_at: usize,
    state: ReadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The peer's `close_notify` came: every read from now on is the end.
    Closed,
    /// A read failed for a reason that holds for every later read (a record that did not open,
    /// an alert, the stream cut short).
    Failed(io::ErrorKind, &'static str),
}

/// The sending direction.
struct Sealing {
    key: LessSafeKey,
    iv: [u8; 12],
    /// The next record's sequence number.
    seq: u64,
    /// Sealed records not yet written, the first from `at`.
    queue: VecDeque<Vec<u8>>,
    at: usize,
    /// Our `close_notify` is sealed: nothing may follow it.
    notified: bool,
}

impl RecordStream {
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether a read would return at once without the socket: plaintext or a whole record held,
    /// or the end of the stream known.
    pub fn holds_bytes(&self) -> bool {
        let rx = &self.rx;
        rx.early_at < rx.early.len()
            || !rx.plain.is_empty()
            || rx.state != ReadState::Open
            || rx.whole_record()
    }

    /// Records this stream sealed and opened: (sent, received), for tests.
    #[cfg(test)]
    pub fn sequence(&self) -> (u64, u64) {
        (self.tx.seq, self.rx.seq)
    }
}

impl Opening {
    fn unopened(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[self.start..self.end])
    }

    /// The unopened bytes' first record's length with its header, once its header is in.
    fn next_len(&self) -> Option<usize> {
        let head = self.unopened().get(..HEADER)?;
        Some(HEADER + usize::from(u16::from_be_bytes([head[3], head[4]])))
    }

    fn whole_record(&self) -> bool {
        self.next_len().is_some_and(|n| self.end - self.start >= n)
    }

    /// Moves held plaintext into `out`; the buffer goes back once it holds nothing.
    fn deliver(&mut self, out: &mut ReadBuf<'_>) {
        if self.early_at < self.early.len() {
            crate::buffers::hand_out_held(&mut self.early, &mut self.early_at, out);
            return;
        }
        let Some(buf) = self.buf.as_deref() else { return };
        let n = out.remaining().min(self.plain.len());
        out.put_slice(&buf[self.plain.start..self.plain.start + n]);
        self.plain.start += n;
        self.release_if_empty();
    }

    fn release_if_empty(&mut self) {
        if self.plain.is_empty() && self.start == self.end {
            if let Some(buf) = self.buf.take() {
                crate::buffers::give_back(buf);
            }
            (self.plain, self.start, self.end) = (0..0, 0, 0);
        }
    }

    /// Opens the first unopened record if it is whole: `Ok(true)` when one was opened (its
    /// plaintext, if any, at `plain`), `Ok(false)` when more bytes are needed.
    fn open_next(&mut self) -> Result<bool, (io::ErrorKind, &'static str)> {
        let Some(len) = self.next_len() else { return Ok(false) };
        let head = &self.unopened()[..HEADER];
        // TLS 1.3 seals every record after the handshake as application data, version 1.2.
        if head[0] != u8::from(ContentType::ApplicationData) || head[1..3] != [3, 3] {
            return Err((io::ErrorKind::InvalidData, "a record that is not sealed TLS 1.3 application data"));
        }
        if len - HEADER > MAX_SEALED {
            return Err((io::ErrorKind::InvalidData, "a TLS record over 2^14 + 256 bytes"));
        }
        if self.end - self.start < len {
            return Ok(false);
        }
        let Some(buf) = self.buf.as_deref_mut() else { return Ok(false) };
        let body = self.start + HEADER..self.start + len;
        self.start += len;
        let seq = self.seq;
        self.seq += 1;
        let base = buf.as_ptr() as usize;
        let sealed =
            InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, &mut buf[body]);
        let opened = self
            .key
            .decrypt(sealed, seq)
            .map_err(|_| (io::ErrorKind::InvalidData, "a TLS record that did not open (decrypt_error)"))?;
        match (opened.typ, opened.payload) {
            (ContentType::ApplicationData, payload) => {
                // Opened in place: the plaintext lies inside the record's body.
                let at = payload.as_ptr() as usize - base;
                self.plain = at..at + payload.len();
            }
            (ContentType::Alert, [_, 0]) => self.state = ReadState::Closed,
            // user_canceled: a warning that a close_notify follows.
            (ContentType::Alert, [_, 90]) => {}
            (ContentType::Alert, _) => {
                return Err((io::ErrorKind::ConnectionAborted, "the peer sent a TLS alert"));
            }
            // NewSessionTicket: too late for rustls' session cache; passed over.
            (ContentType::Handshake, [4, ..]) => {}
            (ContentType::Handshake, [24, ..]) => {
                return Err((
                    io::ErrorKind::ConnectionAborted,
                    "the peer sent a TLS KeyUpdate, which a connection past its hand-over cannot follow",
                ));
            }
            _ => return Err((io::ErrorKind::InvalidData, "an unexpected TLS record after the handshake")),
        }
        Ok(true)
    }

    /// Reads more of the socket into the buffer (lent now if none is held). `Pending` once the
    /// socket has nothing, with the buffer given back if it holds nothing; the end of TCP fails
    /// this read and every later one.
    fn fill(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let need = self.next_len().unwrap_or(HEADER);
        let buf = self.buf.get_or_insert_with(|| crate::buffers::take(true));
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if buf.len() - self.start < need {
            // The record under way would not fit: move it to the front (it is all that is left).
            buf.copy_within(self.start..self.end, 0);
            (self.end, self.start) = (self.end - self.start, 0);
        }
        loop {
            match tcp.poll_read_ready(cx) {
                Poll::Pending => {
                    self.release_if_empty();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let Some(buf) = self.buf.as_deref_mut() else { return Poll::Ready(Ok(())) };
            return Poll::Ready(match tcp.try_read(&mut buf[self.end..]) {
                Ok(0) => {
                    self.state = ReadState::Failed(io::ErrorKind::UnexpectedEof, TRUNCATED);
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, TRUNCATED))
                }
                Ok(n) => {
                    self.end += n;
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => Err(e),
            });
        }
    }
}

/// A connection that ends with its buffer lent (its last records read, the peer's `close_notify`
/// among them) gives it back, so the next connection does not allocate and zero 64 KiB.
impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            crate::buffers::give_back(buf);
        }
    }
}

impl AsyncRead for RecordStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rx = &mut this.rx;
        loop {
            if rx.early_at < rx.early.len() || !rx.plain.is_empty() {
                rx.deliver(out);
                return Poll::Ready(Ok(()));
            }
            match rx.state {
                ReadState::Open => {}
                ReadState::Closed => return Poll::Ready(Ok(())),
                ReadState::Failed(kind, why) => return Poll::Ready(Err(io::Error::new(kind, why))),
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match rx.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err((kind, why)) => {
                    rx.state = ReadState::Failed(kind, why);
                    continue;
                }
            }
            ready!(rx.fill(&this.tcp, cx))?;
        }
    }
}

impl Sealing {
    /// Seals one record of `typ` and queues it.
    fn seal(&mut self, typ: ContentType, payload: OutboundChunks<'_>) -> io::Result<()> {
        if self.seq >= RECORD_LIMIT {
            return Err(io::Error::other(
                "TLS record limit under one key reached; this connection cannot rekey",
            ));
        }
        // TLSCiphertext: header (application data, version 1.2, length), then the sealed
        // TLSInnerPlaintext (the payload, then its real type) and the tag.
        let len = payload.len() + 1 + self.key.algorithm().tag_len();
        let mut record = Vec::with_capacity(HEADER + len);
        record.extend_from_slice(&[u8::from(ContentType::ApplicationData), 3, 3]);
        record.extend_from_slice(&u16::try_from(len).map_err(io::Error::other)?.to_be_bytes());
        payload.copy_to_vec(&mut record);
        record.push(u8::from(typ));
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        let (header, inner) = record.split_at_mut(HEADER);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&*header), inner)
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        record.extend_from_slice(tag.as_ref());
        self.seq += 1;
        self.queue.push_back(record);
        Ok(())
    }

    /// Writes what is queued until nothing is or the socket is full (`Pending`).
    fn poll_send(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            ready!(tcp.poll_write_ready(cx))?;
            let mut slices = [IoSlice::new(&[]); RECORDS_PER_WRITE];
            let mut n = 0;
            for (i, record) in self.queue.iter().take(RECORDS_PER_WRITE).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &record[self.at..] } else { record });
                n += 1;
            }
            match tcp.try_write_vectored(&slices[..n]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(mut written) => {
                    while let Some(first) = self.queue.front() {
                        let left = first.len() - self.at;
                        if written < left {
                            self.at += written;
                            break;
                        }
                        written -= left;
                        self.at = 0;
                        self.queue.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    /// Seals up to [`RECORDS_PER_WRITE`] records of what `bufs` hold and sends them; what the
    /// socket does not take yet stays queued (one write's worth at most: a write first sends
    /// what an earlier one left).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let tx = &mut this.tx;
        if tx.notified {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS close_notify already sent",
            )));
        }
        ready!(tx.poll_send(&this.tcp, cx))?;
        let mut parts: [&[u8]; MAX_SLICES] = [&[]; MAX_SLICES];
        let (mut count, mut total) = (0, 0);
        for buf in bufs.iter().filter(|b| !b.is_empty()).take(MAX_SLICES) {
            let room = RECORDS_PER_WRITE * MAX_PLAIN - total;
            if room == 0 {
                break;
            }
            let part = &buf[..buf.len().min(room)];
            parts[count] = part;
            count += 1;
            total += part.len();
        }
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut rest = OutboundChunks::new(&parts[..count]);
        let mut sealed = 0;
        while !rest.is_empty() {
            let (record, after) = rest.split_at(MAX_PLAIN);
            if let Err(e) = tx.seal(ContentType::ApplicationData, record.clone()) {
                if sealed == 0 {
                    return Poll::Ready(Err(e));
                }
                break;
            }
            sealed += record.len();
            rest = after;
        }
        // What the socket does not take now goes with the next write or flush.
        if let Poll::Ready(Err(e)) = tx.poll_send(&this.tcp, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(sealed))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.poll_send(&this.tcp, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tx.notified {
            // Level warning, close_notify.
            this.tx.seal(ContentType::Alert, OutboundChunks::Single(&[1, 0]))?;
            this.tx.notified = true;
        }
        ready!(this.tx.poll_send(&this.tcp, cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
