//! Kernel TLS and keycard's own record layer through two real sidecars: mesh connections move
//! to the kernel after their handshake where it offers the `tls` module, else to keycard's record
//! layer (`tls.user_records: on`, the default), stay with rustls where both are off, and carry
//! the same bytes whoever has them. This build machine's kernel has no `tls` module;
//! `tests/vm/ktls.sh` runs this file under a Debian kernel that has it, with
//! `KEYCARD_REQUIRE_KTLS=1` so that a fallback there fails instead of passing. HTTP connections
//! between the sidecars move too: hyper then reads and writes plaintext through the kernel or the
//! record layer.

mod common;

use std::time::Duration;

use common::l7::*;
use common::mesh::*;
use keycard_config::sidecar::{HttpSettings, KernelOffload, Protocol, TlsSettings, UserRecords};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";

/// Whether this kernel does TLS (loudly when it does not).
fn kernel_has_tls() -> bool {
    match keycard_proxy::ktls::probe() {
        Ok(_) => true,
        Err(e) if std::env::var_os("KEYCARD_REQUIRE_KTLS").is_some() => {
            panic!("KEYCARD_REQUIRE_KTLS is set but {e}")
        }
        Err(e) => {
            eprintln!(
                "NOTE: {e}: checking keycard's record layer and the rustls fallback only (tests/vm/ktls.sh checks the kernel path)"
            );
            false
        }
    }
}

/// What `keycard_tls_offload_total`'s `result` must be for the defaults on this kernel: the
/// kernel, else keycard's record layer.
fn expected_with_auto() -> &'static str {
    if kernel_has_tls() { "kernel" } else { "user" }
}

struct Pair {
    server: Running,
    client: Running,
    _policy: tempfile::TempDir,
}

async fn pair(pki: &Pki, offload: KernelOffload) -> Pair {
    pair_with(pki, (offload, UserRecords::On), Protocol::Tcp).await
}

/// The pair with `tls.kernel_offload` and `tls.user_records` as given and the server's port
/// declared as `protocol` (the client's upstream stays TCP).
async fn pair_with(pki: &Pki, (offload, user): (KernelOffload, UserRecords), protocol: Protocol) -> Pair {
    let dir = policy_dir(STRICT);
    let mut cfg = config(SidecarSpec {
        ns: "default",
        sa: "server",
        labels: &[],
        identity: pki.files("default", "server"),
        inbound: vec![(9080, echo().await)],
        outbound: vec![],
        policy: Some(dir.path().to_owned()),
    });
    (cfg.tls.kernel_offload, cfg.tls.user_records) = (offload, user);
    cfg.inbound[0].protocol = Some(protocol);
    let server = start(cfg).await;
    let mut cfg = config(SidecarSpec {
        ns: "default",
        sa: "client",
        labels: &[],
        identity: pki.files("default", "client"),
        inbound: vec![],
        outbound: vec![(server.inbound(9080), vec![Pki::id("default", "server")])],
        policy: None,
    });
    (cfg.tls.kernel_offload, cfg.tls.user_records) = (offload, user);
    let client = start(cfg).await;
    Pair { server, client, _policy: dir }
}

/// `len` bytes through the pair to the echo app and back. `linger`: the client half-closes only
/// once every byte is back, so both sidecars have the connection before any FIN; otherwise it
/// half-closes right after sending (a short exchange whose FIN may reach the inbound sidecar
/// before its hand-over). The echo closes once it has read to the end, so the answer ends only
/// if the half-close crossed both sidecars.
async fn through(pair: &Pair, len: usize, linger: bool) -> Result<(), String> {
    let mut s = TcpStream::connect(pair.client.addrs.outbound[0]).await.map_err(|e| e.to_string())?;
    let sent: Vec<u8> = (0..len).map(|i| (i % 253) as u8 ^ (i >> 10) as u8).collect();
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; len];
    let write = async {
        w.write_all(&sent).await?;
        if !linger {
            w.shutdown().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (wrote, read) = tokio::join!(write, r.read_exact(&mut back));
    wrote.map_err(|e| format!("write: {e}"))?;
    read.map_err(|e| format!("read: {e}"))?;
    if linger {
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.map_err(|e| format!("read to the end: {e}"))?;
    if back != sent || !rest.is_empty() {
        return Err(format!("{} bytes came back for {len} sent, or changed", back.len() + rest.len()));
    }
    Ok(())
}

const SIZES: [usize; 3] = [4, 70_000, 3 * 1024 * 1024 + 1];

async fn exercise(pair: &Pair, linger: bool) {
    for len in SIZES {
        let done = tokio::time::timeout(Duration::from_secs(60), through(pair, len, linger)).await;
        assert_eq!(done, Ok(Ok(())), "{len} bytes, linger {linger}");
    }
}

fn offloads(run: &Running, direction: &str, result: &str) -> f64 {
    let series = format!("keycard_tls_offload_total{{direction=\"{direction}\",result=\"{result}\"}}");
    run.metric(&series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_l4_connections_move_to_kernel_tls_where_it_is_offered_and_carry_the_same_bytes() {
    let expected = expected_with_auto();
    let pki = Pki::new();
    let pair = pair(&pki, KernelOffload::Auto).await;
    exercise(&pair, true).await;
    // Counted when the connection is handed over (or not), before its bytes move.
    assert_eq!(offloads(&pair.client, "outbound", expected), 3.0, "{}", pair.client.metrics());
    assert_eq!(offloads(&pair.server, "inbound", expected), 3.0, "{}", pair.server.metrics());
    let available = if expected == "kernel" { 1.0 } else { 0.0 };
    assert_eq!(pair.server.metric("keycard_tls_offload_available"), available);
    let m = pair.server.metrics();
    assert_eq!(
        metric_sum(&m, "istio_tcp_received_bytes_total", &["reporter=\"destination\""]),
        SIZES.iter().sum::<usize>() as f64,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "keycard_handshake_failures_total", &[]), 0.0, "{m}");
    pair.client.shutdown().await;
    pair.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_off_rustls_keeps_every_connection() {
    let pki = Pki::new();
    let pair = pair_with(&pki, (KernelOffload::Off, UserRecords::Off), Protocol::Tcp).await;
    exercise(&pair, true).await;
    exercise(&pair, false).await;
    assert_eq!(offloads(&pair.client, "outbound", "off"), 6.0, "{}", pair.client.metrics());
    assert_eq!(offloads(&pair.server, "inbound", "off"), 6.0);
    assert_eq!(pair.client.metric("keycard_tls_offload_available"), 0.0);
    pair.client.shutdown().await;
    pair.server.shutdown().await;
}

/// `tls.kernel_offload: off` alone: keycard's record layer takes every mesh connection, whether
/// its client half-closed at once or lingered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_kernel_off_the_record_layer_takes_every_connection() {
    let pki = Pki::new();
    let pair = pair(&pki, KernelOffload::Off).await;
    exercise(&pair, true).await;
    exercise(&pair, false).await;
    assert_eq!(offloads(&pair.client, "outbound", "user"), 6.0, "{}", pair.client.metrics());
    assert_eq!(offloads(&pair.server, "inbound", "user"), 6.0, "{}", pair.server.metrics());
    let m = pair.server.metrics();
    assert_eq!(metric_sum(&m, "keycard_handshake_failures_total", &[]), 0.0, "{m}");
    pair.client.shutdown().await;
    pair.server.shutdown().await;
}

/// A client that sends and half-closes at once: its FIN may reach the inbound sidecar before
/// the hand-over, and the kernel takes only established connections; keycard's record layer
/// then takes the connection. Either way every byte and the half-close get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_exchange_gets_through_whoever_keeps_the_connection() {
    let expected = expected_with_auto();
    let pki = Pki::new();
    let pair = pair(&pki, KernelOffload::Auto).await;
    for _ in 0..5 {
        exercise(&pair, false).await;
    }
    let total = (5 * SIZES.len()) as f64;
    assert_eq!(offloads(&pair.client, "outbound", expected), total, "{}", pair.client.metrics());
    // One the kernel could not take (its peer's FIN came first) goes to the record layer.
    let mut results = vec![expected, "user"];
    results.dedup();
    let inbound: f64 = results.iter().map(|r| offloads(&pair.server, "inbound", r)).sum();
    assert_eq!(inbound, total, "{}", pair.server.metrics());
    let m = pair.server.metrics();
    assert_eq!(metric_sum(&m, "keycard_tls_offload_total", &["result=\"lost\""]), 0.0, "{m}");
    pair.client.shutdown().await;
    pair.server.shutdown().await;
}

/// On an `auto` port the inbound sidecar reads the first decrypted bytes to tell HTTP from TCP;
/// a TCP stream then goes to the kernel with those bytes (and whatever else rustls had
/// decrypted) delivered first, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_read_to_detect_the_protocol_are_delivered_before_the_kernels() {
    let expected = expected_with_auto();
    let pki = Pki::new();
    let pair = pair_with(&pki, (KernelOffload::Auto, UserRecords::On), Protocol::Auto).await;
    exercise(&pair, true).await;
    assert_eq!(offloads(&pair.server, "inbound", expected), 3.0, "{}", pair.server.metrics());
    let m = pair.server.metrics();
    assert_eq!(metric_sum(&m, "keycard_http_connections_total", &[]), 0.0, "served as TCP: {m}");
    pair.client.shutdown().await;
    pair.server.shutdown().await;
}

/// HTTP between the sidecars: each mesh connection the inbound sidecar serves as HTTP goes to the
/// kernel after its handshake where it offers TLS (else to keycard's record layer), each pooled
/// connection of the outbound sidecar too once the server's tickets are in, and hyper
/// runs both ends through them: HTTP/1.1 and HTTP/2 requests, 8 MiB bodies both ways,
/// keep-alive across requests, and the pooled connections' close_notify when the client sidecar
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_between_sidecars_is_served_on_kernel_tls_where_it_is_offered() {
    let expected = expected_with_auto();
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, STRICT, Protocol::Http, Protocol::Http).await;
    for client in [h1_client(), h2c_client()] {
        for i in 0..20 {
            let a = call(&client, mesh.outbound(), "GET", &format!("/items/{i}"), &[]).await;
            assert_eq!(a.status, 200, "{}", a.body);
            assert_eq!(field(&a.body, "target"), Some(format!("/items/{i}").as_str()), "{}", a.body);
        }
        echoes_8_mib(&client, mesh.outbound()).await;
    }
    let m = mesh.server.metrics();
    let served = metric_sum(&m, "keycard_http_connections_total", &["direction=\"inbound\""]);
    assert!(served >= 2.0, "one pooled connection per protocol at least: {m}");
    assert_eq!(offloads(&mesh.server, "inbound", expected), served, "{m}");
    let requests = metric_sum(&m, "istio_requests_total", &["response_code=\"200\""]);
    assert_eq!(requests, 42.0, "{m}");
    assert_eq!(metric_sum(&m, "keycard_handshake_failures_total", &[]), 0.0, "{m}");
    // The client's pooled connections move once the server's tickets (or first answer) came.
    let c = mesh.client.metrics();
    let opened = metric_sum(&c, "keycard_upstream_connections_opened_total", &[]);
    assert!(opened >= 2.0, "{c}");
    assert_eq!(offloads(&mesh.client, "outbound", expected), opened, "{c}");
    mesh.shutdown().await;
}

/// With `tls.kernel_offload: off` and `tls.user_records: off`, HTTP between the sidecars stays
/// with rustls at both ends (every pooled and served connection counted `off`) and carries the
/// same requests and bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_between_sidecars_stays_with_rustls_with_both_off() {
    let pki = Pki::new();
    let tls = TlsSettings { kernel_offload: KernelOffload::Off, user_records: UserRecords::Off };
    let protos = (Protocol::Http, Protocol::Http);
    let mesh =
        L7Mesh::custom_tls(&pki, STRICT, protos, inspect_app().await, HttpSettings::default(), tls).await;
    for client in [h1_client(), h2c_client()] {
        for i in 0..10 {
            let a = call(&client, mesh.outbound(), "GET", &format!("/items/{i}"), &[]).await;
            assert_eq!(a.status, 200, "{}", a.body);
        }
        echoes_8_mib(&client, mesh.outbound()).await;
    }
    let m = mesh.server.metrics();
    let served = metric_sum(&m, "keycard_http_connections_total", &["direction=\"inbound\""]);
    assert!(served >= 2.0, "{m}");
    assert_eq!(offloads(&mesh.server, "inbound", "off"), served, "{m}");
    let c = mesh.client.metrics();
    let opened = metric_sum(&c, "keycard_upstream_connections_opened_total", &[]);
    assert_eq!(offloads(&mesh.client, "outbound", "off"), opened, "{c}");
    assert_eq!(metric_sum(&c, "keycard_tls_offload_total", &["result=\"user\""]), 0.0, "{c}");
    mesh.shutdown().await;
}
