//! Transparent interception end to end, in two network namespaces this test makes (joined by a
//! veth pair): `keycard iptables` in each, a `keycard proxy` process in each running as uid 1337,
//! and apps that change nothing. Needs root, `ip`, `iptables` and `setpriv`; without them the
//! test skips loudly, and fails where KEYCARD_REQUIRE_OUTSIDE_TOOLS is set (CI, which is root).

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempCa, path, skip_or_fail};

const CLIENT_IP: &str = "10.213.0.1";
const SERVER_IP: &str = "10.213.0.2";

/// Whether this machine can run the test; says why not.
fn can_run() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        return !skip_or_fail("root (network namespaces and iptables)");
    }
    for tool in ["ip", "iptables", "setpriv"] {
        let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if found.is_err() {
            return !skip_or_fail(tool);
        }
    }
    true
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair, removed on drop.
struct Netns {
    client: String,
    server: String,
}

impl Netns {
    fn new() -> Self {
        let id = std::process::id();
        let n = Self { client: format!("kc{id}-client"), server: format!("kc{id}-server") };
        sh(&["ip", "netns", "add", &n.client]);
        sh(&["ip", "netns", "add", &n.server]);
        sh(&[
            "ip", "link", "add", "veth0", "netns", &n.client, "type", "veth", "peer", "name", "veth0",
            "netns", &n.server,
        ]);
        for (ns, ip) in [(&n.client, CLIENT_IP), (&n.server, SERVER_IP)] {
            sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "veth0"]);
            sh(&["ip", "-n", ns, "link", "set", "veth0", "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.client]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.server]).status();
    }
}

/// Runs `f` on a thread inside `ns`: sockets it makes belong to that namespace for good.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// An app on `port` in `ns` that answers any request with its name and the peer it saw.
fn app(ns: &str, port: u16) {
    let listener = in_ns(ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = format!("app-{port} peer={peer}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
}

/// One HTTP/1.1 request from inside `ns` as root: the status and body, or `None` with no answer.
fn get(ns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    in_ns(ns, move || {
        let addr: SocketAddr = addr.parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    })
}

/// Files the sidecar (uid 1337) may read: world-readable, the key its own and 0600.
fn hand_to_proxy(dir: &Path) {
    for entry in walk(dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
        if entry.file_name().is_some_and(|n| n == "key.pem") {
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o600)).unwrap();
            nix::unistd::chown(&entry, Some(1337.into()), Some(1337.into())).unwrap();
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// `keycard proxy` in `ns` as uid/gid 1337, stderr to `log`.
fn proxy(ns: &str, config: &Path, log: &Path) -> KillOnDrop {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_keycard"))
        .args(["--log-format", "json", "proxy", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_ready(ns: &str, log: &Path) {
    let started = Instant::now();
    while get(ns, "127.0.0.1:15021", "/healthz/ready").is_none_or(|(s, _)| s != 200) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sidecar in {ns} not ready:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of a metric's samples whose labels contain every `want`.
fn metric(text: &str, name: &str, want: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn captured_traffic_is_mutual_tls_end_to_end_and_exemptions_hold() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let ca = TempCa::new("cluster.local");
    let client_certs = ca.issue("default", "client", &[]);
    let server_certs = ca.issue("default", "server", &[]);
    let dir = ca.tmp.path().to_owned();
    std::fs::write(
        dir.join("strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    let files = |certs: &Path| {
        format!(
            "identity:\n  files: {{cert: {c}/cert.pem, key: {c}/key.pem, bundle: {b}}}\n",
            c = path(certs),
            b = path(&ca.bundle())
        )
    };
    let workload = |sa: &str| {
        format!("workload: {{trust_domain: cluster.local, namespace: default, service_account: {sa}}}\n")
    };
    let server_cfg = format!(
        "{}{}inbound:\n  - {{port: 8080, name: http, app: 127.0.0.1:8080}}\n  - {{port: 8081, protocol: tcp, app: 127.0.0.1:8081}}\ncapture: {{inbound: 0.0.0.0:15006}}\npolicy: {{paths: [{}]}}\n",
        workload("server"),
        files(&server_certs),
        path(&dir.join("strict.yaml"))
    );
    let server_id = "spiffe://cluster.local/ns/default/sa/server";
    let client_cfg = format!(
        "{}{}outbound:\n  - {{remote: {SERVER_IP}:8080, name: http, identities: [{server_id}]}}\n  - {{remote: {SERVER_IP}:8081, protocol: tcp, identities: [{server_id}]}}\ncapture: {{outbound: 127.0.0.1:15001, outbound_policy: allow_any}}\n",
        workload("client"),
        files(&client_certs),
    );
    std::fs::write(dir.join("server.yaml"), server_cfg).unwrap();
    std::fs::write(dir.join("client.yaml"), client_cfg).unwrap();
    hand_to_proxy(&dir);

    for port in [8080, 8081, 9000, 9001] {
        app(&ns.server, port);
    }
    // Capture in both namespaces: 9000 is exempt on both sides; 9001 only on the server side, so
    // the client captures it and, as no upstream names it, passes it through.
    let iptables = |ns: &str, extra: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_keycard"), "iptables"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "keycard iptables: {}", String::from_utf8_lossy(&out.stderr));
    };
    iptables(&ns.client, &["--exclude-outbound-ports", "9000"]);
    iptables(&ns.server, &["--exclude-inbound-ports", "9000,9001"]);
    // Idempotent: a second run leaves the same rules, once.
    iptables(&ns.client, &["--exclude-outbound-ports", "9000"]);
    let save = |ns: &str| {
        let out =
            Command::new("ip").args(["netns", "exec", ns, "iptables-save", "-t", "nat"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let rules = save(&ns.client);
    assert_eq!(rules.matches("-A OUTPUT -p tcp -j KEYCARD_OUTPUT").count(), 1, "{rules}");
    assert_eq!(rules.matches("--uid-owner 1337").count(), 1, "{rules}");

    let server_log = dir.join("server.log");
    let client_log = dir.join("client.log");
    let _server = proxy(&ns.server, &dir.join("server.yaml"), &server_log);
    let _client = proxy(&ns.client, &dir.join("client.yaml"), &client_log);
    wait_ready(&ns.server, &server_log);
    wait_ready(&ns.client, &client_log);

    // The client app dials the server's own address; both sidecars step in: the server app is
    // reached from its sidecar on loopback, on the port the client asked for.
    let http = get(&ns.client, &format!("{SERVER_IP}:8080"), "/hello").expect("an answer on 8080");
    assert_eq!(http, (200, "app-8080 peer=127.0.0.1".to_owned()));
    let tcp = get(&ns.client, &format!("{SERVER_IP}:8081"), "/").expect("an answer on 8081");
    assert_eq!(tcp, (200, "app-8081 peer=127.0.0.1".to_owned()));
    let server_metrics = get(&ns.server, "127.0.0.1:15020", "/stats/prometheus").unwrap().1;
    let mtls_from_client = [
        "connection_security_policy=\"mutual_tls\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
    ];
    assert_eq!(metric(&server_metrics, "istio_requests_total", &mtls_from_client), 1.0, "{server_metrics}");
    assert_eq!(
        metric(&server_metrics, "istio_tcp_connections_opened_total", &mtls_from_client),
        1.0,
        "{server_metrics}"
    );

    // Excluded on both sides: straight to the app, which sees the client's address.
    let direct = get(&ns.client, &format!("{SERVER_IP}:9000"), "/").expect("an answer on 9000");
    assert_eq!(direct, (200, format!("app-9000 peer={CLIENT_IP}")));
    // Captured by the client, no upstream for it: passed through as plain TCP (allow_any).
    let passed = get(&ns.client, &format!("{SERVER_IP}:9001"), "/").expect("an answer on 9001");
    assert_eq!(passed, (200, format!("app-9001 peer={CLIENT_IP}")));
    let client_metrics = || get(&ns.client, "127.0.0.1:15020", "/stats/prometheus").unwrap().1;
    let plain_out = ["reporter=\"source\"", "destination_principal=\"unknown\""];
    assert_eq!(metric(&client_metrics(), "istio_tcp_connections_opened_total", &plain_out), 1.0);

    // Loopback is left alone: no sidecar sees a connection to an app on 127.0.0.1.
    let local = in_ns(&ns.client, || TcpListener::bind("127.0.0.1:7000").unwrap());
    std::thread::spawn(move || {
        let (mut s, _) = local.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nlocal");
    });
    assert_eq!(get(&ns.client, "127.0.0.1:7000", "/"), Some((200, "local".to_owned())));
    assert_eq!(metric(&client_metrics(), "istio_tcp_connections_opened_total", &plain_out), 1.0);

    // The proxy's uid is never captured: a uid-1337 client leaves in plaintext, which the server
    // sidecar (capturing every inbound port) refuses under STRICT.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.client, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_keycard"))
        .args(["bookinfo", "get", &format!("http://{SERVER_IP}:8081/")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "uid 1337 must not be captured: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let failures = get(&ns.server, "127.0.0.1:15000", "/debug/handshake_failures").unwrap().1;
    let failures: serde_json::Value = serde_json::from_str(&failures).unwrap();
    let refused: Vec<_> = failures
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["reason"] == "plaintext_in_strict" && f["peer"].as_str().unwrap().starts_with(CLIENT_IP)
        })
        .collect();
    assert_eq!(refused.len(), 1, "{failures:#}");

    // --cleanup removes keycard's rules and nothing else; capture stops.
    iptables(&ns.client, &["--cleanup"]);
    assert!(!save(&ns.client).contains("KEYCARD"), "{}", save(&ns.client));
    assert_eq!(
        get(&ns.client, &format!("{SERVER_IP}:8081"), "/"),
        None,
        "uncaptured plaintext into STRICT must be refused"
    );
}
