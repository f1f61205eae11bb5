//! keycard's record layer over real loopback sockets, against itself and against rustls.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::buffers::tests::pair;
use crate::forward::pipe;
use crate::ktls::tests::{configs, handshaken, pattern, reversing_app, through_the_pair};

fn taken<S: Handshaken>(stream: S) -> RecordStream {
    match take(stream, Bytes::new()) {
        Ok(r) => r,
        Err(Declined::Kept(_, _, r)) => panic!("kept by rustls: {}", r.as_str()),
        Err(Declined::Lost(e)) => panic!("lost: {e}"),
    }
}

async fn read_error(stream: &mut RecordStream) -> io::Error {
    let mut sink = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
    got.expect("an answer in time").expect_err("the read fails")
}

/// The sidecar pair's shape with keycard's record layer at both ends: client → [plain | records]
/// ⇄ [records | plain] → app, copied by `forward::pipe` as the sidecars do; bytes both ways and
/// the half-closes carried as close_notify, for each TLS 1.3 suite.
#[tokio::test]
async fn a_pair_on_the_record_layer_carries_every_byte_and_the_half_close_each_way() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    for suite in
        [cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256]
    {
        // The server's two tickets reach the client's record layer as handshake records, passed over.
        let (server_cfg, client_cfg) = configs(Some(suite), 2);
        let (server, client) = handshaken(server_cfg, client_cfg).await;
        let (server, client) = (taken(server), taken(client));
        let (app_addr, app) = reversing_app().await;
        let (idle, cancel) = (Duration::from_secs(20), CancellationToken::new());
        let app_conn = TcpStream::connect(app_addr).await.expect("connect app");
        let inbound = tokio::spawn(pipe(server, app_conn, idle, cancel.clone()));
        let (mut user, user_side) = pair().await;
        let outbound = tokio::spawn(pipe(user_side, client, idle, cancel));

        through_the_pair(&mut user, app, [inbound, outbound], &format!("{suite:?}")).await;
    }
}

/// A record-layer end talks to a rustls end as another rustls end would: its close_notify ends
/// rustls' reading cleanly, rustls' ends its own, tickets are passed over, and data rustls sent
/// in the flight of its Finished is the record layer's to open.
#[tokio::test]
async fn a_record_layer_end_and_a_rustls_end_understand_each_other() {
    // Record-layer client, rustls server (with tickets).
    let (server_cfg, client_cfg) = configs(None, 2);
    let (mut server, client) = handshaken(server_cfg, client_cfg).await;
    let mut client = taken(client);
    let sent = pattern(1024 * 1024, 9);
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.expect("write");
        client.shutdown().await.expect("close_notify");
        client
    });
    let mut got = Vec::new();
    // rustls reports a stream cut without close_notify as an error: Ok means it came.
    server.read_to_end(&mut got).await.expect("rustls reads to a close_notify");
    assert!(got == pattern(1024 * 1024, 9));
    let mut client = writer.await.expect("writer");
    server.write_all(b"bye").await.expect("write");
    server.shutdown().await.expect("rustls close_notify");
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.expect("reads to rustls' close_notify");
    assert_eq!(back, b"bye");
    let mut more = [0u8; 8];
    assert_eq!(client.read(&mut more).await.expect("still the end"), 0);
    assert!(client.write_all(b"x").await.is_err(), "a write after close_notify is refused");

    // Record-layer server that sent two tickets through rustls (so its first sealed record is
    // not number 0), rustls client whose first words went with its Finished.
    let (server_cfg, client_cfg) = configs(None, 2);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    client.write_all(b"early words").await.expect("write");
    client.flush().await.expect("flush");
    let mut server = taken(server);
    let mut got = [0u8; 11];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"early words");
    server.write_all(b"heard").await.expect("write");
    server.shutdown().await.expect("close_notify");
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.expect("rustls reads to the record layer's close_notify");
    assert_eq!(back, b"heard");
}

/// Small reads are served from the opened records in order, and a vectored write of many
/// slices is sealed as records of at most 16 KiB that rustls opens.
#[tokio::test]
async fn one_byte_reads_and_vectored_writes_keep_every_byte_in_order() {
    let (server_cfg, client_cfg) = configs(None, 0);
    let (mut server, client) = handshaken(server_cfg, client_cfg).await;
    let mut client = taken(client);
    let sent = pattern(40_000, 3);
    server.write_all(&sent).await.expect("write");
    server.flush().await.expect("flush");
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let mut one = [0u8; 1];
        client.read_exact(&mut one).await.expect("one byte");
        got.push(one[0]);
    }
    assert!(got == sent);
    assert!(client.rx.buf.is_none(), "a drained reader holds no buffer");

    let parts: Vec<Vec<u8>> = (0..20).map(|i| pattern(1000 + i * 997, i as u8)).collect();
    let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let want: Vec<u8> = parts.concat();
    let mut sent = 0;
    while sent < want.len() {
        // The slices not yet taken, the first cut where the last write ended.
        let mut left = Vec::new();
        let mut skip = sent;
        for s in &slices {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            left.push(IoSlice::new(&s[skip..]));
            skip = 0;
        }
        let n = client.write_vectored(&left).await.expect("vectored write");
        assert!(n > 0 && n <= RECORDS_PER_WRITE * MAX_PLAIN, "{n}");
        sent += n;
    }
    client.flush().await.expect("flush");
    let mut back = vec![0u8; want.len()];
    server.read_exact(&mut back).await.expect("rustls opens every record");
    assert!(back == want);
    assert!(client.sequence().0 >= (want.len() / MAX_PLAIN) as u64);
}

/// TCP ending without close_notify is an error, at a record boundary or inside a record, and it
/// stays one.
#[tokio::test]
async fn a_stream_cut_without_close_notify_reads_as_truncated() {
    for inside_a_record in [false, true] {
        let (server_cfg, client_cfg) = configs(None, 0);
        let (server, mut client) = handshaken(server_cfg, client_cfg).await;
        let mut server = taken(server);
        client.write_all(b"complete").await.expect("write");
        client.flush().await.expect("flush");
        let (io, conn) = client.get_mut();
        if inside_a_record {
            std::io::Write::write_all(&mut conn.writer(), &pattern(5000, 1)).expect("plaintext in");
            let mut sealed = Vec::new();
            conn.write_tls(&mut sealed).expect("sealed");
            io.write_all(&sealed[..sealed.len() / 2]).await.expect("half a record");
        }
        io.shutdown().await.expect("FIN, no close_notify");
        let mut got = [0u8; 8];
        server.read_exact(&mut got).await.expect("what came whole");
        assert_eq!(&got, b"complete");
        let e = read_error(&mut server).await;
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(read_error(&mut server).await.kind(), io::ErrorKind::UnexpectedEof);
    }
}

/// A record changed on the way does not open, and nothing after it is read.
#[tokio::test]
async fn a_tampered_record_does_not_open() {
    let (server_cfg, client_cfg) = configs(None, 0);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    let mut server = taken(server);
    let (io, conn) = client.get_mut();
    std::io::Write::write_all(&mut conn.writer(), b"to be tampered with").expect("plaintext in");
    let mut sealed = Vec::new();
    conn.write_tls(&mut sealed).expect("sealed");
    sealed[HEADER + 3] ^= 0x40;
    io.write_all(&sealed).await.expect("write");
    let e = read_error(&mut server).await;
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("did not open"), "{e}");
}

/// rustls' KeyUpdate cannot be followed without the traffic secret: the stream ends in error
/// rather than reading the next records under the wrong key. A plaintext record, or one of
/// another version, is refused before anything is opened.
#[tokio::test]
async fn a_key_update_or_a_record_that_is_not_sealed_ends_the_stream() {
    let (server_cfg, client_cfg) = configs(None, 0);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    let mut server = taken(server);
    client.get_mut().1.refresh_traffic_keys().expect("key update");
    client.write_all(b"under the next key").await.expect("write");
    client.flush().await.expect("flush");
    let e = read_error(&mut server).await;
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("KeyUpdate"), "{e}");

    for header in [[22u8, 3, 3, 0, 4], [23, 3, 1, 0, 4], [23, 3, 3, 0x41, 0x01]] {
        let (server_cfg, client_cfg) = configs(None, 0);
        let (server, mut client) = handshaken(server_cfg, client_cfg).await;
        let mut server = taken(server);
        client.get_mut().0.write_all(&header).await.expect("write");
        client.get_mut().0.write_all(&[0; 4]).await.expect("write");
        let e = read_error(&mut server).await;
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{header:?}: {e}");
    }
}

/// What the kernel path refuses the record layer refuses too: a connection whose handshake was
/// read ahead, with bytes past it possibly inside rustls, stays with rustls.
#[tokio::test]
async fn a_handshake_read_ahead_stays_with_rustls() {
    let (server_cfg, client_cfg) = configs(None, 0);
    let (c, s) = pair().await;
    let accept = tokio_rustls::TlsAcceptor::from(server_cfg).accept(crate::buffers::ReadAhead::new(s));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let connect =
        tokio_rustls::TlsConnector::from(client_cfg).connect(name, crate::buffers::ReadAhead::new(c));
    let (s, c) = tokio::join!(accept, connect);
    let (_c, s) = (c.expect("client"), s.expect("server"));
    match take(s, Bytes::new()) {
        Err(Declined::Kept(_, _, Refused::Buffered)) => {}
        Err(Declined::Kept(_, _, r)) => panic!("kept for {}", r.as_str()),
        Err(Declined::Lost(e)) => panic!("lost: {e}"),
        Ok(_) => panic!("taken although rustls may hold bytes past the handshake"),
    }
}
