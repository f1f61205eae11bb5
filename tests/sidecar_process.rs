//! `keycard proxy` as a process: JSON access log lines, the text log without colour codes off a
//! terminal, SIGHUP reload, and drain on SIGTERM (live connections finish, new ones are refused,
//! the process exits).

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::mesh::*;
use common::{TempCa, free_ports, keycard, path};
use tokio::net::TcpStream;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `workload` and `identity` lines of a sidecar config for `default/details`, with a
/// certificate issued by `ca`.
fn details_identity(ca: &TempCa) -> String {
    let certs = ca.issue("default", "details", &[]);
    format!(
        "workload: {{trust_domain: cluster.local, namespace: default, service_account: details}}
identity:
  files: {{cert: {}, key: {}, bundle: {}}}",
        path(&certs.join("cert.pem")),
        path(&certs.join("key.pem")),
        path(&ca.bundle()),
    )
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_logs_access_as_json_reloads_on_sighup_and_drains_on_sigterm() {
    let ca = TempCa::new("cluster.local");
    let app = echo().await;
    let web = common::l7::inspect_app().await;
    let dir = ca.tmp.path();
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("pa.yaml"), "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n").unwrap();
    let [inbound, admin, metrics, ready, http_port] = free_ports(5)[..] else { unreachable!() };
    let cfg = format!(
        "{identity}
inbound:
  - {{port: 9080, listen: 127.0.0.1:{inbound}, app: {app}}}
  - {{port: 9081, name: http-web, listen: 127.0.0.1:{http_port}, app: {web}}}
policy: {{paths: [policies]}}
admin: 127.0.0.1:{admin}
metrics: 127.0.0.1:{metrics}
readiness: 127.0.0.1:{ready}
limits: {{drain_timeout: 3s, watch_interval: 1h}}
",
        identity = details_identity(&ca),
    );
    let cfg_path = dir.join("sidecar.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut child = keycard()
        .args(["--log-format", "json", "proxy", "--config", path(&cfg_path)])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc(child);
    wait_ready(format!("127.0.0.1:{ready}").parse().unwrap()).await;
    let inbound_addr: std::net::SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();

    // /logging reads and changes the filter of the running process.
    let (code, level) = http_get(admin_addr, "/logging").await.unwrap();
    assert_eq!((code, level.trim()), (200, "info"));
    let (code, level) = http_request(admin_addr, "POST", "/logging?level=keycard_proxy=debug,info").await;
    assert_eq!(code, 200, "{level}");
    assert!(level.contains("keycard_proxy=debug"), "{level}");
    let (code, err) = http_request(admin_addr, "POST", "/logging?level=%%%").await;
    assert_eq!(code, 400, "{err}");

    // One plaintext connection (PERMISSIVE), closed: one access line in JSON.
    assert_eq!(roundtrip(inbound_addr).await, Ok(()));
    let access = wait_line(&lines, |v| v["message"] == "access" && v["reason"] == "closed");
    assert_eq!(access["direction"], "inbound");
    assert_eq!(access["mtls"], false);
    assert_eq!(access["decision"], "allow");
    assert_eq!(access["src.identity"], "-");
    assert_eq!(access["dst.identity"], "spiffe://cluster.local/ns/default/sa/details");
    assert_eq!(access["bytes_recv"], 4);
    assert_eq!(access["bytes_sent"], 4);
    assert!(access["duration_ms"].is_u64());

    // An HTTP port (by its Istio name): one access line per request, query stripped.
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let (code, body) = http_get(http_addr, "/a/./b?token=secret").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let access = wait_line(&lines, |v| v["message"] == "access" && v["method"] == "GET");
    assert_eq!(access["path"], "/a/b");
    assert_eq!(access["status"], 200);
    assert_eq!(access["authority"], "x");
    assert_eq!(access["protocol"], "http");
    assert_eq!(access["policy"], "none");
    assert!(!access.to_string().contains("secret"), "the query reached the log: {access}");

    // The filter holds for access lines too (written without a tracing event in a JSON process):
    // with `keycard::access` off, a request leaves no line; back on, the next one does.
    let (code, _) = http_request(admin_addr, "POST", "/logging?level=info,keycard::access=off").await;
    assert_eq!(code, 200);
    assert_eq!(http_get(http_addr, "/quiet").await.unwrap().0, 200);
    let (code, _) = http_request(admin_addr, "POST", "/logging?level=info").await;
    assert_eq!(code, 200);
    assert_eq!(http_get(http_addr, "/loud").await.unwrap().0, 200);
    let mut quiet = false;
    wait_line(&lines, |v| {
        quiet |= v["path"] == "/quiet";
        v["message"] == "access" && v["path"] == "/loud"
    });
    assert!(!quiet, "an access line was written while the filter had them off");

    // SIGHUP reloads (the file watch is off: watch_interval 1h). Now STRICT: plaintext refused.
    std::fs::write(policies.join("pa.yaml"), "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n").unwrap();
    signal(&proc.0, "-HUP");
    wait_line(&lines, |v| v["message"] == "policy reloaded");
    assert!(roundtrip(inbound_addr).await.is_err(), "STRICT after SIGHUP");
    let (_, text) =
        http_get(format!("127.0.0.1:{metrics}").parse().unwrap(), "/stats/prometheus").await.unwrap();
    assert!(
        text.contains(
            "keycard_handshake_failures_total{direction=\"inbound\",reason=\"plaintext_in_strict\"} 1"
        ),
        "{text}"
    );

    // Back to PERMISSIVE, open a long-lived connection, then SIGTERM.
    std::fs::write(policies.join("pa.yaml"), "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n").unwrap();
    signal(&proc.0, "-HUP");
    std::thread::sleep(Duration::from_millis(300));
    let mut live = TcpStream::connect(inbound_addr).await.unwrap();
    assert_eq!(exchange(&mut live, b"before").await, Ok(()));
    signal(&proc.0, "-TERM");
    wait_line(&lines, |v| v["message"] == "draining");
    assert_eq!(
        exchange(&mut live, b"during").await,
        Ok(()),
        "a live connection keeps working while draining"
    );
    assert!(
        TcpStream::connect(inbound_addr).await.is_err() || roundtrip(inbound_addr).await.is_err(),
        "no new connections"
    );
    let mut proc = proc;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the sidecar did not exit after its drain deadline");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(closed_within(&mut live, Duration::from_secs(2)).await, "the drain deadline closes what is left");
}

fn wait_line(
    lines: &mpsc::Receiver<String>,
    mut want: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("the expected log line never came");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && want(&v)
        {
            return v;
        }
    }
}

/// A bodiless HTTP/1.0 request: (status, body).
async fn http_request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The text log format (the default) writes no colour codes where stderr is not a terminal: a
/// file, a pipe, a container's log.
#[tokio::test]
async fn the_text_log_has_no_colour_codes_off_a_terminal() {
    let ca = TempCa::new("cluster.local");
    let app = echo().await;
    let [inbound, admin, metrics, ready] = free_ports(4)[..] else { unreachable!() };
    let cfg = format!(
        "{identity}
inbound:
  - {{port: 9080, listen: 127.0.0.1:{inbound}, app: {app}}}
admin: 127.0.0.1:{admin}
metrics: 127.0.0.1:{metrics}
readiness: 127.0.0.1:{ready}
",
        identity = details_identity(&ca),
    );
    let cfg_path = ca.tmp.path().join("sidecar.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut child = keycard()
        .args(["proxy", "--config", path(&cfg_path)])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    wait_ready(format!("127.0.0.1:{ready}").parse().unwrap()).await;
    signal(&proc.0, "-TERM");
    let text: Vec<String> = BufReader::new(stderr).lines().map_while(Result::ok).collect();
    assert!(text.iter().any(|l| l.contains("INFO")), "no INFO line in the text log: {text:?}");
    assert!(!text.iter().any(|l| l.contains('\u{1b}')), "colour codes in a piped log: {text:?}");
}
