//! Kernel TLS over real loopback sockets. Where the kernel offers no `tls` module (this build
//! machine), the tests that need it say so on stderr and pass without running, unless
//! `KEYCARD_REQUIRE_KTLS=1` (set where the kernel has it: `tests/vm/ktls.sh` runs these tests
//! under a Debian kernel in a VM), where they fail instead.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::buffers::tests::pair;
use crate::forward::{End, Leg, splice_pipe};

/// The kernel's TLS, or `None` after saying loudly why the test does not run.
fn kernel_or_skip(test: &str) -> Option<KernelTls> {
    match probe() {
        Ok(k) => Some(k),
        Err(e) if std::env::var_os("KEYCARD_REQUIRE_KTLS").is_some() => {
            panic!("{test}: KEYCARD_REQUIRE_KTLS is set but {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: {e} (tests/vm/ktls.sh runs it under a kernel that has it)");
            None
        }
    }
}

#[test]
fn the_probe_agrees_with_the_kernels_list_of_ulps() {
    let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    let has_tls = listed.split_whitespace().any(|u| u == "tls");
    match probe() {
        // The probe loads the module where it may: the list names it afterwards.
        Ok(k) => {
            let after = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
            assert!(
                after.split_whitespace().any(|u| u == "tls"),
                "probe found {k:?}, kernel lists {after:?}"
            );
            assert!(k.aes_128_gcm || k.aes_256_gcm || k.chacha20_poly1305);
            assert!(!k.describe().is_empty());
        }
        Err(ProbeError::NoUlp(e)) => {
            assert!(!has_tls, "kernel lists tls ({listed:?}) but the probe failed: {e}")
        }
        Err(e) => panic!("probe: {e}"),
    }
}

#[test]
fn the_tls13_iv_is_the_kernels_salt_then_iv_and_the_sequence_is_big_endian() {
    let iv: Vec<u8> = (1..=12).collect();
    let key = [7u8; 16];
    let s = Secrets { key: &key, iv: &iv, seq: 0x0102_0304_0506_0708 };
    match crypto_info(Suite::Aes128Gcm, &s) {
        TlsCryptoInfo::Aes128Gcm(i) => {
            assert_eq!(i.salt, [1, 2, 3, 4]);
            assert_eq!(i.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
            assert_eq!(i.key, key);
            assert_eq!(i.rec_seq, [1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(i.info.version, 0x0304);
            assert_eq!(i.info.cipher_type, 51);
        }
        _ => panic!("wrong suite"),
    }
    let key = [9u8; 32];
    let s = Secrets { key: &key, iv: &iv, seq: 3 };
    match crypto_info(Suite::Chacha20Poly1305, &s) {
        TlsCryptoInfo::Chacha20Poly1305(i) => {
            assert_eq!(i.iv.as_slice(), iv.as_slice());
            assert_eq!(i.key, key);
            assert_eq!(i.rec_seq, [0, 0, 0, 0, 0, 0, 0, 3]);
        }
        _ => panic!("wrong suite"),
    }
}

#[tokio::test]
async fn the_close_notify_control_message_is_one_the_kernel_accepts() {
    // On a plain socket the kernel checks the control message's framing and passes over a
    // SOL_TLS one, so the alert's two bytes arrive as they are: a malformed header is EINVAL.
    let (c, mut s) = pair().await;
    send_close_notify(&c).await.expect("sendmsg with the record-type control message");
    let mut got = [0u8; 2];
    s.read_exact(&mut got).await.expect("read");
    assert_eq!(got, [1, 0], "level warning, close_notify");
}

/// TLS 1.3 configs for one handshake: a self-signed `localhost` certificate, secret extraction
/// allowed, `suite` only (any when `None`).
pub(crate) fn configs(
    suite: Option<rustls::SupportedCipherSuite>,
    tickets: usize,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert: CertificateDer<'static> = made.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    let provider = Arc::new(provider);
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = tickets;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

pub(crate) type ServerTls = tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>;
pub(crate) type ClientTls = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// Both ends of one handshake over loopback, each read record by record.
pub(crate) async fn handshaken(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (ServerTls, ClientTls) {
    let (c, s) = pair().await;
    let accept = tokio_rustls::TlsAcceptor::from(server).accept(ReadAhead::record_exact(s));
    let name = ServerName::try_from("localhost").expect("name");
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, ReadAhead::record_exact(c));
    let (s, c) = tokio::join!(accept, connect);
    (s.expect("server handshake"), c.expect("client handshake"))
}

fn offloaded<S: Handshaken>(kernel: &KernelTls, stream: S) -> Offloaded {
    match kernel.hand_over(stream, Bytes::new()) {
        Ok(o) => o,
        Err(Declined::Kept(_, _, r)) => panic!("kept by rustls: {}", r.as_str()),
        Err(Declined::Lost(e)) => panic!("lost: {e}"),
    }
}

/// `len` bytes of a pattern that shows misordering.
pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

/// 3 MiB and a bit from `user` through a sidecar-shaped pair (its two forwardings, inbound then
/// outbound) to [`reversing_app`], then the half-close; checks that the app got every byte, that
/// they came back reversed, and that both forwardings carried them and ended by close_notify.
/// `what` names the case in failures.
pub(crate) async fn through_the_pair(
    user: &mut TcpStream,
    app: tokio::task::JoinHandle<Vec<u8>>,
    pair: [tokio::task::JoinHandle<crate::forward::Totals>; 2],
    what: &str,
) {
    let sent = pattern(3 * 1024 * 1024 + 333, 5);
    user.write_all(&sent).await.expect("write");
    user.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), user.read_to_end(&mut back))
        .await
        .expect("answer in time")
        .expect("read");
    let got = app.await.expect("app");
    assert!(got == sent, "{what}: the app got {} bytes, not the {} sent", got.len(), sent.len());
    assert!(back.iter().rev().eq(sent.iter()), "{what}: the answer came back changed ({} bytes)", back.len());
    let len = sent.len() as u64;
    for (side, forwarding) in ["inbound", "outbound"].into_iter().zip(pair) {
        let t = forwarding.await.expect(side);
        assert_eq!(t.end, End::Done, "{what}: {side} ended by close_notify");
        assert_eq!((t.forward, t.backward), (len, len), "{what}: {side}");
    }
}

/// An app that reads everything to EOF, then answers with what it read reversed and closes.
pub(crate) async fn reversing_app() -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("app read");
        let back: Vec<u8> = got.iter().rev().copied().collect();
        s.write_all(&back).await.expect("app write");
        got
    });
    (addr, task)
}

/// The sidecar pair's shape on kernel TLS at both ends: client → [plain | kernel TLS] ⇄
/// [kernel TLS | plain] → app; bytes both ways, half-closes carried as close_notify, for each
/// suite the kernel took.
#[tokio::test]
async fn a_pair_on_kernel_tls_carries_every_byte_and_the_half_close_each_way() {
    let Some(kernel) = kernel_or_skip("a_pair_on_kernel_tls_carries_every_byte_and_the_half_close_each_way")
    else {
        return;
    };
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let suites = [
        (kernel.aes_128_gcm, cs::TLS13_AES_128_GCM_SHA256),
        (kernel.aes_256_gcm, cs::TLS13_AES_256_GCM_SHA384),
        (kernel.chacha20_poly1305, cs::TLS13_CHACHA20_POLY1305_SHA256),
    ];
    for (_, suite) in suites.into_iter().filter(|(on, _)| *on) {
        // The server sends two tickets after the handshake: the client's kernel gets them as
        // handshake records, which must be passed over, not forwarded or fatal.
        let (server_cfg, client_cfg) = configs(Some(suite), 2);
        let (server, client) = handshaken(server_cfg, client_cfg).await;
        let (server, client) = (offloaded(&kernel, server), offloaded(&kernel, client));
        let (app_addr, app) = reversing_app().await;
        let (idle, cancel) = (Duration::from_secs(20), CancellationToken::new());
        let app_conn = TcpStream::connect(app_addr).await.expect("connect app");
        let inbound =
            tokio::spawn(splice_pipe(Leg::kernel_tls(server), Leg::plain(app_conn), idle, cancel.clone()));
        let (mut user, user_side) = pair().await;
        let outbound =
            tokio::spawn(splice_pipe(Leg::plain(user_side), Leg::kernel_tls(client), idle, cancel));

        through_the_pair(&mut user, app, [inbound, outbound], &format!("{suite:?}")).await;
    }
}

/// A kernel-TLS end talks to a rustls end as another rustls end would: its close_notify ends
/// rustls' reading cleanly, rustls' close_notify ends its own, and the tickets rustls sends
/// are passed over.
#[tokio::test]
async fn a_kernel_tls_end_and_a_rustls_end_understand_each_other() {
    let Some(kernel) = kernel_or_skip("a_kernel_tls_end_and_a_rustls_end_understand_each_other") else {
        return;
    };
    // Kernel-TLS client, rustls server (with tickets).
    let (server_cfg, client_cfg) = configs(None, 2);
    let (mut server, client) = handshaken(server_cfg, client_cfg).await;
    let client = offloaded(&kernel, client);
    let (mut user, user_side) = pair().await;
    let (idle, cancel) = (Duration::from_secs(20), CancellationToken::new());
    let outbound =
        tokio::spawn(splice_pipe(Leg::plain(user_side), Leg::kernel_tls(client), idle, cancel.clone()));
    let sent = pattern(1024 * 1024, 9);
    user.write_all(&sent).await.expect("write");
    user.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    // rustls reports a stream cut without close_notify as an error: Ok means it came.
    server.read_to_end(&mut got).await.expect("rustls reads to a close_notify");
    assert!(got == sent);
    server.write_all(b"bye").await.expect("write");
    server.shutdown().await.expect("rustls close_notify");
    let mut back = Vec::new();
    user.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"bye");
    assert_eq!(outbound.await.expect("outbound").end, End::Done);

    // Kernel-TLS server, rustls client: data the client sends in the same flight as its
    // Finished is the kernel's to decrypt.
    let (server_cfg, client_cfg) = configs(None, 0);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    client.write_all(b"early words").await.expect("write");
    client.flush().await.expect("flush");
    let server = offloaded(&kernel, server);
    let (app_addr, app) = reversing_app().await;
    let app_conn = TcpStream::connect(app_addr).await.expect("connect app");
    let inbound = tokio::spawn(splice_pipe(Leg::kernel_tls(server), Leg::plain(app_conn), idle, cancel));
    client.shutdown().await.expect("close_notify");
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.expect("rustls reads to the kernel's close_notify");
    assert_eq!(back, b"sdrow ylrae");
    assert_eq!(app.await.expect("app"), b"early words");
    assert_eq!(inbound.await.expect("inbound").end, End::Done);
}

/// A peer that closes TCP without close_notify may have cut the stream short: an error, as
/// rustls reports it, though the bytes that came are delivered.
#[tokio::test]
async fn a_stream_cut_without_close_notify_ends_in_error() {
    let Some(kernel) = kernel_or_skip("a_stream_cut_without_close_notify_ends_in_error") else {
        return;
    };
    let (server_cfg, client_cfg) = configs(None, 0);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    let server = offloaded(&kernel, server);
    let (app_addr, app) = reversing_app().await;
    let app_conn = TcpStream::connect(app_addr).await.expect("connect app");
    let (idle, cancel) = (Duration::from_secs(20), CancellationToken::new());
    let inbound = tokio::spawn(splice_pipe(Leg::kernel_tls(server), Leg::plain(app_conn), idle, cancel));
    client.write_all(b"half a story").await.expect("write");
    client.flush().await.expect("flush");
    // TCP FIN with no alert before it.
    let (io, _) = client.into_inner();
    let tcp = io.into_inner();
    socket2::SockRef::from(&tcp).shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(app.await.expect("app"), b"half a story");
    assert_eq!(inbound.await.expect("inbound").end, End::Error);
}

/// A connection whose reader read past the handshake, or whose suite the kernel did not take,
/// stays with rustls untouched and still works.
#[tokio::test]
async fn a_connection_the_kernel_cannot_take_comes_back_whole() {
    let (server_cfg, client_cfg) = configs(None, 0);
    let (c, s) = pair().await;
    let accept = tokio_rustls::TlsAcceptor::from(server_cfg).accept(ReadAhead::new(s));
    let name = ServerName::try_from("localhost").expect("name");
    let connect = tokio_rustls::TlsConnector::from(client_cfg).connect(name, ReadAhead::new(c));
    let (server, client) = tokio::join!(accept, connect);
    let (server, mut client) = (server.expect("server"), client.expect("client"));
    // Whatever the kernel offers: a reading-ahead reader is never at a known record boundary,
    // and a kernel that took no suite takes none of them.
    let everything = KernelTls { aes_128_gcm: true, aes_256_gcm: true, chacha20_poly1305: true };
    let server = match everything.hand_over(server, Bytes::from_static(b"sniffed")) {
        Err(Declined::Kept(s, sniffed, Refused::Buffered)) => {
            assert_eq!(&sniffed[..], b"sniffed");
            s
        }
        _ => panic!("a reading-ahead connection must stay with rustls"),
    };
    let mut server = match KernelTls::default().hand_over(server, Bytes::new()) {
        Err(Declined::Kept(s, _, Refused::Cipher)) => s,
        _ => panic!("no suite taken: rustls keeps it"),
    };
    client.write_all(b"still rustls").await.expect("write");
    let mut got = [0u8; 12];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"still rustls");
}

/// A client forwards through rustls until the server's tickets are in, so that rustls keeps
/// them and the next connection resumes, though this one then goes to the kernel; the server's
/// first data ends the wait too (delivered to the app) when it comes with the tickets. Plain
/// rustls: runs on any kernel.
#[tokio::test]
async fn a_client_waits_for_the_tickets_so_the_next_connection_resumes() {
    let (server_cfg, client_cfg) = configs(None, 2);
    for round in 0..3 {
        let (mut server, mut client) = handshaken(server_cfg.clone(), client_cfg.clone()).await;
        let (mut user, mut app) = pair().await;
        if round == 2 {
            // Server-first: its data follows its tickets.
            server.write_all(b"server speaks first").await.expect("write");
            server.flush().await.expect("flush");
        }
        let waited = await_tickets(&mut client, &mut app, Duration::from_secs(10)).await.expect("wait");
        assert!(client.get_ref().1.tls13_tickets_received() >= 1, "round {round}: tickets read by rustls");
        assert!(client.get_ref().0.at_record_boundary(), "round {round}: ready for the kernel");
        assert!(!waited.server_closed);
        let kind = client.get_ref().1.handshake_kind();
        if round > 0 {
            assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "round {round}");
        }
        if round == 2 {
            // Delivered to the app if it came with or before the tickets, else still rustls' to read.
            let mut got = [0u8; 19];
            match waited.down {
                19 => user.read_exact(&mut got).await.expect("read"),
                0 => client.read_exact(&mut got).await.expect("read"),
                n => panic!("{n} bytes of 19 delivered"),
            };
            assert_eq!(&got, b"server speaks first");
        }
        // Bytes from the app during the wait go up through rustls.
        user.write_all(b"up").await.expect("write");
        let waited = await_tickets(&mut client, &mut app, Duration::from_millis(200)).await.expect("wait");
        assert_eq!(waited.up, 2);
        let mut got = [0u8; 2];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"up");
    }
}

/// Both ends of a connection as [`KernelStream`]s, read and written the way hyper does: bytes
/// both ways whatever the reader's room (a one-byte reader gets a 16 KiB record in parts), the
/// client passes over the server's tickets, plaintext rustls had decrypted comes first, and
/// each shutdown is a close_notify the other end reads as the end.
#[tokio::test]
async fn kernel_streams_carry_bytes_both_ways_and_end_with_close_notify() {
    let Some(kernel) = kernel_or_skip("kernel_streams_carry_bytes_both_ways_and_end_with_close_notify")
    else {
        return;
    };
    let (server_cfg, client_cfg) = configs(None, 2);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    // Sent with rustls before the server's hand-over: the kernel decrypts it.
    client.write_all(b"first words").await.expect("write");
    client.flush().await.expect("flush");
    let mut server = KernelStream::new(offloaded(&kernel, server));
    let client = KernelStream::new(offloaded(&kernel, client));
    let mut got = [0u8; 11];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"first words");

    let up = pattern(3 * 1024 * 1024 + 7, 3);
    let down = pattern(200_000, 11);
    let (mut sr, mut sw) = tokio::io::split(server);
    let (mut cr, mut cw) = tokio::io::split(client);
    let send_up = async {
        cw.write_all(&up).await.expect("client write");
        cw.shutdown().await.expect("client close_notify");
    };
    let read_up = async {
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.expect("the server reads to the client's close_notify");
        got
    };
    let send_down = async {
        sw.write_all(&down).await.expect("server write");
        sw.shutdown().await.expect("server close_notify");
    };
    let read_down = async {
        // One byte at a time for the first record, then whole buffers.
        let mut got = vec![0u8; 20_000];
        for b in got.iter_mut() {
            let mut one = [0u8; 1];
            cr.read_exact(&mut one).await.expect("one byte");
            *b = one[0];
        }
        cr.read_to_end(&mut got).await.expect("the client reads to the server's close_notify");
        got
    };
    let (_, got_up, _, got_down) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send_up, read_up, send_down, read_down)
    })
    .await
    .expect("done in time");
    assert!(got_up == up, "the server got {} bytes, not the {} sent", got_up.len(), up.len());
    assert!(got_down == down, "the client got {} bytes, not the {} sent", got_down.len(), down.len());
    // Writing after close_notify is refused, not sent in the clear or after the end.
    let mut client = cr.unsplit(cw);
    assert!(client.write_all(b"late").await.is_err());
}

/// A peer that closes TCP without close_notify: the bytes that came are read, then the end is
/// an error (`UnexpectedEof`), as rustls reports it, so a truncated body is not taken as whole.
#[tokio::test]
async fn a_kernel_stream_cut_without_close_notify_reads_as_truncated() {
    let Some(kernel) = kernel_or_skip("a_kernel_stream_cut_without_close_notify_reads_as_truncated") else {
        return;
    };
    let (server_cfg, client_cfg) = configs(None, 0);
    let (server, mut client) = handshaken(server_cfg, client_cfg).await;
    let mut server = KernelStream::new(offloaded(&kernel, server));
    client.write_all(b"half a story").await.expect("write");
    client.flush().await.expect("flush");
    let (io, _) = client.into_inner();
    socket2::SockRef::from(io.get_ref()).shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut got = [0u8; 12];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"half a story");
    let end = server.read(&mut [0u8; 64]).await.expect_err("no close_notify: an error");
    assert_eq!(end.kind(), std::io::ErrorKind::UnexpectedEof);
}

/// A client's HTTP connection moves to the kernel by itself, inside the reads and writes of
/// whoever uses it, once the server's tickets are in: the first exchange through rustls, the
/// rest through the kernel, the bytes the same; and the tickets are rustls', so the next
/// connection resumes.
#[tokio::test]
async fn a_client_stream_moves_to_the_kernel_once_the_tickets_are_in() {
    let Some(kernel) = kernel_or_skip("a_client_stream_moves_to_the_kernel_once_the_tickets_are_in") else {
        return;
    };
    let (server_cfg, client_cfg) = configs(None, 2);
    for round in 0..2 {
        let (server, client) = handshaken(server_cfg.clone(), client_cfg.clone()).await;
        if round == 1 {
            assert_eq!(client.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        }
        let mut server = KernelStream::new(offloaded(&kernel, server));
        let mut client = ClientStream::waiting(client, kernel);
        for i in 0..3u8 {
            let ask = pattern(40_000, i);
            client.write_all(&ask).await.expect("write");
            let mut got = vec![0u8; ask.len()];
            server.read_exact(&mut got).await.expect("server read");
            assert!(got == ask, "round {round}, exchange {i}: the server got other bytes");
            server.write_all(&got[..1000]).await.expect("server write");
            let mut back = vec![0u8; 1000];
            client.read_exact(&mut back).await.expect("client read");
            assert_eq!(back, ask[..1000], "round {round}, exchange {i}");
        }
        assert!(client.is_kernel(), "round {round}: the kernel has it after the first exchange");
        client.shutdown().await.expect("close_notify");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("the server reads to the close_notify");
        assert!(rest.is_empty());
    }
}
