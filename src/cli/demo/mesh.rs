//! The demo's mesh: the work directory, the CA and sidecar processes, the in-process apps, and
//! driving one flow and reading its verdict from the callee sidecar.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use keycard_config::{SpiffeId, TrustDomain};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    Expect, Flow, Got, How, Outcome, Ports, READY_DEADLINE, SERVICE_PORT, TRUST_DOMAIN, WORKLOADS, Workload,
    decided_by, page_all_ok, page_summary, principal, spiffe_id, workload,
};
use crate::bookinfo::{self, Calls};

/// The running mesh: child processes, in-process apps, and where everything listens.
pub(super) struct Mesh {
    dir: PathBuf,
    ports: BTreeMap<&'static str, Ports>,
    children: Children,
    apps: CancellationToken,
    client: bookinfo::HttpClient,
    bundle: PathBuf,
    run_id: String,
}

impl Mesh {
    pub(super) async fn start(dir: &Path, policies: &str, say: &dyn Fn(&str)) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the keycard binary")?;
        let ca_dir = dir.join("ca");
        say("  CA: keycard ca init (root + intermediate, keys 0600)");
        quiet(
            Command::new(&exe)
                .args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--force", "--dir"])
                .arg(&ca_dir),
        )?;
        std::fs::write(dir.join("policies.yaml"), policies)?;
        // Every port is held until all are chosen, so no two children are given the same one.
        let mut reserved = Reserved::default();
        let ca_addr = reserved.addr()?;
        let apps = CancellationToken::new();
        let mut ports = BTreeMap::new();
        for w in WORKLOADS {
            let app = match w.app {
                Some(_) => Some(TcpListener::bind("127.0.0.1:0").await?),
                None => None,
            };
            let p = Ports {
                admin: reserved.addr()?,
                metrics: reserved.addr()?,
                readiness: reserved.addr()?,
                inbound: match &app {
                    Some(l) => Some((reserved.addr()?, l.local_addr()?)),
                    None => None,
                },
                outbound: w
                    .calls
                    .iter()
                    .map(|c| Ok((*c, reserved.addr()?)))
                    .collect::<anyhow::Result<_>>()?,
            };
            if let (Some(kind), Some(listener)) = (w.app, app) {
                let url = |k: &str| p.outbound.get(k).map(|a| format!("http://{a}"));
                let calls =
                    Calls { details: url("details"), reviews: url("reviews"), ratings: url("ratings") };
                tokio::spawn(bookinfo::serve(kind, listener, calls, apps.clone()));
            }
            ports.insert(w.key, p);
        }
        drop(reserved);
        let mut children = Children::default();
        say(&format!("  CA: keycard ca serve on https://{ca_addr}"));
        children.spawn(
            "ca",
            Command::new(&exe)
                .args(["--log-format", "json", "ca", "serve", "--dir"])
                .arg(&ca_dir)
                .args(["--listen", &ca_addr.to_string()]),
            &dir.join("ca.log"),
        )?;
        wait_for_port(ca_addr, &mut children).await?;
        say(&format!(
            "  sidecars: {} (keycard proxy, identity from the CA by bootstrap token)",
            WORKLOADS.iter().map(|w| w.key).collect::<Vec<_>>().join(", ")
        ));
        for w in WORKLOADS {
            let wdir = dir.join(w.key);
            std::fs::create_dir_all(&wdir)?;
            quiet(
                Command::new(&exe)
                    .args(["ca", "token", "--dir"])
                    .arg(&ca_dir)
                    .args(["--ns", w.namespace, "--sa", w.service_account, "--ttl", "10m", "--out"])
                    .arg(wdir.join("token")),
            )?;
            let config = sidecar_yaml(w, &ports, dir, ca_addr);
            std::fs::write(wdir.join("sidecar.yaml"), config)?;
            children.spawn(
                w.key,
                Command::new(&exe)
                    .args(["--log-format", "json", "--log-level", "info", "proxy", "--config"])
                    .arg(wdir.join("sidecar.yaml")),
                &wdir.join("sidecar.log"),
            )?;
        }
        let mut mesh = Self {
            dir: dir.to_owned(),
            ports,
            children,
            apps,
            client: bookinfo::client(),
            bundle: ca_dir.join("bundle.pem"),
            run_id: format!("{:x}", std::process::id()),
        };
        mesh.wait_ready().await?;
        say("  mesh ready: every sidecar holds its certificate");
        Ok(mesh)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        for (key, p) in self.ports.clone() {
            let url = format!("http://{}/healthz/ready", p.readiness);
            loop {
                if let Ok((status, _)) = bookinfo::get(&self.client, &url, &[]).await
                    && status.is_success()
                {
                    break;
                }
                if let Some(exit) = self.children.exited(key) {
                    bail!("the {key} sidecar exited ({exit}):\n{}", tail(&self.log_of(key)));
                }
                if started.elapsed() > READY_DEADLINE {
                    bail!(
                        "the {key} sidecar was not ready within {READY_DEADLINE:?}:\n{}",
                        tail(&self.log_of(key))
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    fn log_of(&self, key: &str) -> PathBuf {
        self.dir.join(key).join("sidecar.log")
    }

    pub(super) async fn drive(&mut self, index: usize, flow: &Flow) -> Outcome {
        let shown = format!("{} {}", flow.method, flow.path);
        let mut out = Outcome {
            flow: flow.who.to_owned(),
            request: shown,
            expected: flow.expect,
            got: Got::Refused(String::new()),
            ok: false,
            mtls: None,
            caller: None,
            decided_by: "-".into(),
            why: flow.why,
            page: None,
        };
        let id = format!("demo-{}-{index}", self.run_id);
        // Whether the callee sidecar recorded this flow: a flow it has no record of never passes.
        let recorded = match flow.how {
            How::Sidecar { from, to } => {
                let url = format!("http://{}{}", self.ports[from].outbound[to], flow.path);
                let host = format!("{to}:{SERVICE_PORT}");
                let headers = [("x-request-id", id.as_str()), ("host", host.as_str())];
                match request(&self.client, flow.method, &url, &headers).await {
                    Ok((status, body)) => {
                        out.got = Got::Status(status);
                        if flow.path == "/productpage" && status == 200 {
                            out.page = Some(page_summary(&body));
                        }
                        self.judge_by_access_line(&mut out, to, &id).await
                    }
                    Err(e) => {
                        out.got = Got::Refused(e);
                        false
                    }
                }
            }
            How::Plaintext { to } | How::Forged { to, .. } => {
                let target = self.inbound_of(to);
                let result = match flow.how {
                    How::Forged { claims, .. } => self.forged_request(claims, to, target, flow, &id).await,
                    _ => plaintext_request(target, flow.method, flow.path, &id).await,
                };
                match result {
                    // Answered: the sidecar let it in, and its access line says on what grounds.
                    Ok((_, Some(status))) => {
                        out.got = Got::Status(status);
                        self.judge_by_access_line(&mut out, to, &id).await
                    }
                    Ok((local, None)) => {
                        out.got = Got::Refused("connection closed".into());
                        out.mtls = Some(false);
                        self.judge_by_refusal(&mut out, to, local).await
                    }
                    Err(e) => {
                        out.got = Got::Refused(e);
                        false
                    }
                }
            }
        };
        let as_expected = match (&out.got, flow.expect) {
            (Got::Status(s), Expect::Status(e)) => *s == e && out.page.as_deref().is_none_or(page_all_ok),
            (Got::Refused(_), Expect::Refused) => true,
            _ => false,
        };
        out.ok = as_expected && recorded;
        out
    }

    fn inbound_of(&self, key: &str) -> SocketAddr {
        self.ports[key].inbound.expect("an app workload").0
    }

    /// Fills identity, mTLS and rule from the target sidecar's access line for request `id`;
    /// false when there is none.
    async fn judge_by_access_line(&self, out: &mut Outcome, target: &str, id: &str) -> bool {
        let log = self.log_of(target);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let line = std::fs::read_to_string(&log).ok().and_then(|text| {
                text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| {
                    v["request_id"] == id && v["direction"] == "inbound" && v["message"] == "access"
                })
            });
            if let Some(v) = line {
                out.mtls = v["mtls"].as_bool();
                out.caller = v["src.identity"].as_str().filter(|s| *s != "-").map(principal);
                out.decided_by = decided_by(&v);
                return true;
            }
            if Instant::now() > deadline {
                out.decided_by = "(no access line found)".into();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Fills the reason from the target sidecar's refused-handshake list, matched by our
    /// address `local`; false when the sidecar did not record refusing us.
    async fn judge_by_refusal(&self, out: &mut Outcome, target: &str, local: SocketAddr) -> bool {
        let url = format!("http://{}/debug/handshake_failures", self.ports[target].admin);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Ok((_, body)) = bookinfo::get(&self.client, &url, &[]).await
                && let Ok(Value::Array(failures)) = serde_json::from_slice::<Value>(&body)
                && let Some(f) = failures.iter().find(|f| f["peer"] == local.to_string())
            {
                let reason = f["reason"].as_str().unwrap_or("?");
                out.decided_by = format!("refused: {reason}");
                if let Got::Refused(detail) = &mut out.got {
                    *detail = reason.to_owned();
                }
                return true;
            }
            if Instant::now() > deadline {
                out.decided_by = "(not in the sidecar's refusals)".into();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Mutual TLS to `target` with a certificate for `claims` from a CA made here and now (same
    /// trust domain, different root), after checking the server the way a sidecar would.
    async fn forged_request(
        &self,
        claims: &str,
        to: &str,
        target: SocketAddr,
        flow: &Flow,
        request_id: &str,
    ) -> Result<(SocketAddr, Option<u16>), String> {
        let rogue = self.dir.join("rogue-ca");
        let now = time::OffsetDateTime::now_utc();
        let opts = keycard_ca::store::InitOptions {
            trust_domain: TrustDomain::parse(TRUST_DOMAIN).map_err(|e| e.to_string())?,
            root_lifetime: time::Duration::days(1),
            intermediate_lifetime: time::Duration::days(1),
            force: true,
        };
        let ca = keycard_ca::store::init(&rogue, &opts, now).map_err(|e| e.to_string())?;
        let id = SpiffeId::parse(&spiffe_id(workload(claims))).map_err(|e| e.to_string())?;
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let issued = ca
            .authority
            .issue(&id, &key, time::Duration::hours(1), now, &Default::default())
            .map_err(|e| e.to_string())?;
        let key =
            rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
        let roots = keycard_config::pem::certs_from_file(&self.bundle).map_err(|e| e.to_string())?;
        let bundle = keycard_config::svid::TrustBundle::new(TrustDomain::parse(TRUST_DOMAIN).unwrap(), roots)
            .map_err(|e| e.to_string())?;
        let expected = SpiffeId::parse(&spiffe_id(workload(to))).map_err(|e| e.to_string())?;
        let verifier = keycard_config::tls::SvidServerVerifier::new(Arc::new(bundle), vec![expected]);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(issued.chain, key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"istio-http/1.1".to_vec()];
        let tcp = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
        let local = tcp.local_addr().map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("details.default.svc").unwrap();
        let exchange = async {
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
            let head = format!(
                "{} {} HTTP/1.1\r\nhost: {to}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n",
                flow.method, flow.path
            );
            tls.write_all(head.as_bytes()).await?;
            read_status(&mut tls).await
        };
        match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(status)) => Ok((local, status)),
            // The sidecar's alert (bad or unknown certificate) ends the exchange: refused.
            Ok(Err(_)) | Err(_) => Ok((local, None)),
        }
    }

    pub(super) fn endpoints(&self) -> Value {
        let mut sidecars = serde_json::Map::new();
        for (key, p) in &self.ports {
            sidecars.insert(
                (*key).into(),
                serde_json::json!({
                    "admin": format!("http://{}", p.admin),
                    "metrics": format!("http://{}/stats/prometheus", p.metrics),
                    "inbound": p.inbound.map(|(l, _)| l.to_string()),
                    "config": self.dir.join(key).join("sidecar.yaml"),
                    "log": self.log_of(key),
                }),
            );
        }
        serde_json::json!({
            "ingress": format!("http://{}/productpage", self.ports["ingress"].outbound["productpage"]),
            "policies": self.dir.join("policies.yaml"),
            "sidecars": sidecars,
        })
    }

    pub(super) fn try_it(&self, keep_running: bool) -> String {
        let p = &self.ports;
        // `cargo run -- demo` puts no `keycard` on PATH: name the binary that is running.
        let exe = std::env::current_exe().map_or_else(|_| "keycard".to_owned(), |e| e.display().to_string());
        let lines = [
            (
                format!("curl http://{}/productpage", p["ingress"].outbound["productpage"]),
                "through the ingress",
            ),
            (format!("{exe} certs --admin {}", p["productpage"].admin), "productpage's certificate"),
            (
                format!("{exe} status --admin {}", p["details"].admin),
                "details: modes, who connects, safe to go STRICT?",
            ),
            (
                format!(
                    "{exe} policy explain -f {} --workload default/details --labels app=details --from spiffe://cluster.local/ns/default/sa/sleep --port 9080 --path /details/0",
                    self.dir.join("policies.yaml").display()
                ),
                "why sleep is denied",
            ),
            (
                format!(
                    "curl -s http://{}/stats/prometheus | grep istio_requests_total",
                    p["details"].metrics
                ),
                "details' metrics",
            ),
            (
                format!("curl http://{}/debug/handshake_failures", p["details"].admin),
                "whom details refused, and why",
            ),
            (format!("curl -v http://{}/details/0", self.inbound_of("details")), "plaintext into STRICT"),
        ];
        let width = lines.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        let mut s = String::new();
        let _ = writeln!(s, "Try it{}:", if keep_running { "" } else { " (with --keep-running)" });
        for (cmd, what) in lines {
            let _ = writeln!(s, "  {cmd:width$}  # {what}");
        }
        let _ = writeln!(
            s,
            "  policies: {} (edit it: every sidecar reloads); configs and JSON logs: {}/<workload>/",
            self.dir.join("policies.yaml").display(),
            self.dir.display()
        );
        s
    }

    pub(super) async fn stop(self) {
        self.apps.cancel();
        self.children.stop().await;
    }
}

fn sidecar_yaml(w: &Workload, ports: &BTreeMap<&'static str, Ports>, dir: &Path, ca: SocketAddr) -> String {
    let p = &ports[w.key];
    let wdir = dir.join(w.key);
    let label = if w.key == "ingress" { "istio-ingressgateway" } else { w.key };
    let mut y = String::new();
    let _ = writeln!(y, "# {} — written by keycard demo", spiffe_id(w));
    let _ = writeln!(y, "workload:");
    let _ = writeln!(y, "  trust_domain: {TRUST_DOMAIN}");
    let _ = writeln!(y, "  namespace: {}", w.namespace);
    let _ = writeln!(y, "  service_account: {}", w.service_account);
    let _ = writeln!(y, "  labels: {{app: {label}}}");
    let _ = writeln!(y, "identity:");
    let _ = writeln!(y, "  ca:");
    let _ = writeln!(y, "    url: https://{ca}");
    let _ = writeln!(y, "    token_file: {}", wdir.join("token").display());
    let _ = writeln!(y, "    bundle: {}", dir.join("ca").join("bundle.pem").display());
    let _ = writeln!(y, "    ttl: 1h");
    if let Some((listen, app)) = p.inbound {
        let _ = writeln!(y, "inbound:");
        let _ = writeln!(y, "  - port: {SERVICE_PORT}");
        let _ = writeln!(y, "    name: http");
        let _ = writeln!(y, "    listen: {listen}");
        let _ = writeln!(y, "    app: {app}");
    }
    if !w.calls.is_empty() {
        let _ = writeln!(y, "outbound:");
        for target in w.calls {
            let t = workload(target);
            let _ = writeln!(y, "  - listen: {}", p.outbound[target]);
            let _ = writeln!(y, "    remote: {}", ports[target].inbound.expect("an app workload").0);
            let _ = writeln!(y, "    host: {target}.{}.svc.cluster.local", t.namespace);
            let _ = writeln!(y, "    port: {SERVICE_PORT}");
            let _ = writeln!(y, "    name: http");
            let _ = writeln!(y, "    identities: [{}]", spiffe_id(t));
        }
    }
    let _ = writeln!(y, "policy:");
    let _ = writeln!(y, "  paths: [{}]", dir.join("policies.yaml").display());
    let _ = writeln!(y, "  root_namespace: istio-system");
    let _ = writeln!(y, "admin: {}", p.admin);
    let _ = writeln!(y, "metrics: {}", p.metrics);
    let _ = writeln!(y, "readiness: {}", p.readiness);
    y
}

async fn request(
    client: &bookinfo::HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, bytes::Bytes), String> {
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    bookinfo::send(client, method, url, headers).await.map(|(s, b)| (s.as_u16(), b))
}

/// A plaintext HTTP request straight at a sidecar's inbound port: our address, and the status if
/// any answer came.
async fn plaintext_request(
    target: SocketAddr,
    method: &str,
    path: &str,
    id: &str,
) -> Result<(SocketAddr, Option<u16>), String> {
    let mut tcp = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {target}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), read_status(&mut tcp)).await {
        Ok(Ok(status)) => Ok((local, status)),
        Ok(Err(_)) | Err(_) => Ok((local, None)),
    }
}

/// The status code of an HTTP/1.1 response, or `None` when the stream ends first.
async fn read_status<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<u16>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..end]);
            return Ok(line.split_whitespace().nth(1).and_then(|c| c.parse().ok()));
        }
    }
}

/// Runs a short command of ours, its output swallowed unless it fails.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.env_remove("KEYCARD_LOG").output().context("cannot run keycard")?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Free loopback ports, each held until the set is dropped (a child binds it a moment later).
///
/// They come from below the kernel's ephemeral range: a port from `bind(:0)` is one the kernel may
/// also hand to any outgoing connection made in the moment between our release and the child's
/// bind, and then the child fails with "address in use".
struct Reserved {
    held: Vec<std::net::TcpListener>,
    next: u16,
    range: std::ops::Range<u16>,
}

impl Default for Reserved {
    fn default() -> Self {
        const LOWEST: u16 = 10_000;
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32_768);
        let range = LOWEST..ephemeral_low.max(LOWEST);
        // A different start per run, so demos running side by side rarely meet.
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        let span = u64::from(range.end - range.start).max(1);
        let next = range.start + u16::try_from(seed % span).unwrap_or(0);
        Self { held: Vec::new(), next, range }
    }
}

impl Reserved {
    fn addr(&mut self) -> anyhow::Result<SocketAddr> {
        let span = self.range.end - self.range.start;
        for _ in 0..span.min(2_000) {
            let port = self.next;
            self.next = if port + 1 >= self.range.end { self.range.start } else { port + 1 };
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                self.held.push(l);
                return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        // No room below the ephemeral range (an unusual port range): let the kernel choose.
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        self.held.push(l);
        Ok(addr)
    }
}

async fn wait_for_port(addr: SocketAddr, children: &mut Children) -> anyhow::Result<()> {
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if let Some(exit) = children.exited("ca") {
            bail!("the CA exited ({exit})");
        }
        if started.elapsed() > READY_DEADLINE {
            bail!("the CA did not listen on {addr} within {READY_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Child processes that end with us: SIGTERM and a wait on [`Children::stop`], SIGKILL when
/// dropped otherwise (an error or a panic on the way). Ctrl-C reaches them with the terminal's
/// process group.
#[derive(Default)]
struct Children {
    procs: Vec<(&'static str, std::process::Child)>,
}

impl Children {
    fn spawn(&mut self, name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .env_remove("KEYCARD_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.procs.push((name, child));
        Ok(())
    }

    /// How `name` ended, if it has.
    fn exited(&mut self, name: &str) -> Option<String> {
        let (_, child) = self.procs.iter_mut().find(|(n, _)| *n == name)?;
        child.try_wait().ok().flatten().map(|status| status.to_string())
    }

    async fn stop(mut self) {
        let procs = std::mem::take(&mut self.procs);
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for (_, c) in &procs {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        for (_, mut c) in procs {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
