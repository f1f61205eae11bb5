//! The systems under test, each started fresh from its own configuration in the run's work
//! directory: `direct` (no proxy), `floor` (two plain TCP forwarders), keycard's sidecar pair at L4
//! and L7, and the peers in the same sidecar-pair shape with TLS 1.3 mutual TLS and the same EC
//! P-256 SPIFFE certificates: HAProxy (`mode tcp`, `mode http`), nginx (`stream`, `http`), stunnel.
//!
//! Every system listens on a `front` port the client connects to, forwards through an "outbound"
//! process to an "inbound" process on a `mid` port, and on to the shared backend.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Direct,
    Floor,
    KeycardL4,
    KeycardL7,
    HaproxyTcp,
    HaproxyHttp,
    NginxStream,
    NginxHttp,
    Stunnel,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Direct,
        Kind::Floor,
        Kind::KeycardL4,
        Kind::KeycardL7,
        Kind::HaproxyTcp,
        Kind::HaproxyHttp,
        Kind::NginxStream,
        Kind::NginxHttp,
        Kind::Stunnel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Floor => "floor",
            Kind::KeycardL4 => "keycard-l4",
            Kind::KeycardL7 => "keycard-l7",
            Kind::HaproxyTcp => "haproxy-tcp",
            Kind::HaproxyHttp => "haproxy-http",
            Kind::NginxStream => "nginx-stream",
            Kind::NginxHttp => "nginx-http",
            Kind::Stunnel => "stunnel",
        }
    }

    /// A sidecar pair with mutual TLS that is not keycard: what "best peer" is taken over.
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            Kind::HaproxyTcp | Kind::HaproxyHttp | Kind::NginxStream | Kind::NginxHttp | Kind::Stunnel
        )
    }

    pub fn is_keycard(self) -> bool {
        matches!(self, Kind::KeycardL4 | Kind::KeycardL7)
    }

    /// One line on what it is, for the results table.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Direct => "client → backend",
            Kind::Floor => "two HAProxy `mode tcp` forwarders, no TLS",
            Kind::KeycardL4 => "keycard pair, `protocol: tcp`, mTLS + L4 authorization",
            Kind::KeycardL7 => "keycard pair, `protocol: http`, mTLS + per-request authorization, pooled",
            Kind::HaproxyTcp => "HAProxy pair, `mode tcp`, mTLS",
            Kind::HaproxyHttp => "HAProxy pair, `mode http`, mTLS, `http-reuse always`",
            Kind::NginxStream => "nginx pair, `stream`, mTLS",
            Kind::NginxHttp => "nginx pair, `http`, mTLS, upstream keepalive",
            Kind::Stunnel => "stunnel pair, mTLS",
        }
    }

    /// The external program it needs, if any.
    pub fn program(self) -> Option<&'static str> {
        match self {
            Kind::Floor | Kind::HaproxyTcp | Kind::HaproxyHttp => Some("haproxy"),
            Kind::NginxStream | Kind::NginxHttp => Some("nginx"),
            Kind::Stunnel => Some("stunnel4"),
            _ => None,
        }
    }
}

/// What every system is built from.
pub struct Env {
    pub work: PathBuf,
    pub keycard: PathBuf,
    pub backend: SocketAddr,
    pub certs: Certs,
    pub ports: Ports,
    /// The open-file limit the systems inherit (their connection limits are set to fit it).
    pub fd_limit: u64,
}

/// The two identities of each pair, made by `keycard ca issue` (EC P-256 keys).
pub struct Certs {
    /// `spiffe://cluster.local/ns/bench/sa/client`: the outbound side.
    pub client: PathBuf,
    /// `spiffe://cluster.local/ns/bench/sa/server`: the inbound side, with the DNS name
    /// `server.bench.local` too, so peers that check the server's name (nginx) can verify it.
    pub server: PathBuf,
    pub bundle: PathBuf,
}

pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

impl Certs {
    /// A CA in `dir/ca` and the two identities beside it.
    pub fn make(keycard: &Path, dir: &Path) -> anyhow::Result<Self> {
        let ca = dir.join("ca");
        run(Command::new(keycard)
            .args(["ca", "init", "--trust-domain", "cluster.local", "--force", "--dir"])
            .arg(&ca))?;
        let issue = |sa: &str, extra: &[&str]| -> anyhow::Result<PathBuf> {
            let out = dir.join(sa);
            run(Command::new(keycard)
                .args(["ca", "issue", "--ns", "bench", "--sa", sa, "--ttl", "240h", "--dir"])
                .arg(&ca)
                .arg("--out")
                .arg(&out)
                .args(extra))?;
            // HAProxy wants the chain and the key in one file.
            let both = [fs::read(out.join("cert.pem"))?, fs::read(out.join("key.pem"))?].concat();
            write_private(&out.join("both.pem"), &both)?;
            Ok(out)
        };
        let client = issue("client", &[])?;
        let server = issue("server", &["--san", "server.bench.local"])?;
        Ok(Self { bundle: client.join("bundle.pem"), client, server })
    }
}

/// Loopback ports below the kernel's ephemeral range, so that no outgoing connection of the run
/// can be handed one of them between our check and the system's bind.
pub struct Ports {
    next: u16,
}

impl Ports {
    pub fn new(start: u16) -> Self {
        Self { next: start }
    }

    pub fn take(&mut self) -> anyhow::Result<u16> {
        while self.next < 32_000 {
            let p = self.next;
            self.next += 1;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return Ok(p);
            }
        }
        bail!("no free loopback port left below 32000")
    }
}

/// A started system: where the client connects and the processes to measure.
pub struct Running {
    pub kind: Kind,
    pub front: SocketAddr,
    /// The two sidecars (outbound, inbound); empty for `direct`.
    pub sidecars: Vec<(String, Child)>,
}

impl Running {
    pub fn pids(&self) -> Vec<u32> {
        self.sidecars.iter().map(|(_, c)| c.id()).collect()
    }

    /// SIGTERM, then SIGKILL after two seconds.
    pub fn stop(mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for (_, c) in &self.sidecars {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for (_, c) in &mut self.sidecars {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `kind` in `dir` and waits until a request goes through it.
pub fn start(kind: Kind, env: &mut Env, dir: &Path) -> anyhow::Result<Running> {
    fs::create_dir_all(dir)?;
    if kind == Kind::Direct {
        return Ok(Running { kind, front: env.backend, sidecars: Vec::new() });
    }
    let front = SocketAddr::from(([127, 0, 0, 1], env.ports.take()?));
    let mid = SocketAddr::from(([127, 0, 0, 1], env.ports.take()?));
    let backend = env.backend;
    let sidecars = match kind {
        Kind::Direct => Vec::new(),
        Kind::Floor | Kind::HaproxyTcp | Kind::HaproxyHttp => {
            let out = haproxy(kind, Side::Out, front, mid, &env.certs, env.fd_limit);
            let inb = haproxy(kind, Side::In, mid, backend, &env.certs, env.fd_limit);
            vec![spawn_haproxy(dir, "outbound", &out)?, spawn_haproxy(dir, "inbound", &inb)?]
        }
        Kind::NginxStream | Kind::NginxHttp => vec![
            spawn_nginx(
                dir,
                "outbound",
                &nginx(kind, Side::Out, (front, mid), &env.certs, &dir.join("outbound"), env.fd_limit),
            )?,
            spawn_nginx(
                dir,
                "inbound",
                &nginx(kind, Side::In, (mid, backend), &env.certs, &dir.join("inbound"), env.fd_limit),
            )?,
        ],
        Kind::Stunnel => vec![
            spawn_stunnel(
                dir,
                "outbound",
                &stunnel(Side::Out, front, mid, &env.certs, &dir.join("outbound")),
            )?,
            spawn_stunnel(
                dir,
                "inbound",
                &stunnel(Side::In, mid, backend, &env.certs, &dir.join("inbound")),
            )?,
        ],
        Kind::KeycardL4 | Kind::KeycardL7 => {
            let protocol = if kind == Kind::KeycardL4 { "tcp" } else { "http" };
            fs::write(dir.join("policies.yaml"), KEYCARD_POLICIES)?;
            let mut extra = || -> anyhow::Result<[u16; 3]> {
                Ok([env.ports.take()?, env.ports.take()?, env.ports.take()?])
            };
            let out = keycard_config(Side::Out, protocol, front, mid, &env.certs, extra()?);
            let inb = keycard_config(Side::In, protocol, mid, backend, &env.certs, extra()?);
            vec![
                spawn_keycard(&env.keycard, dir, "outbound", &out)?,
                spawn_keycard(&env.keycard, dir, "inbound", &inb)?,
            ]
        }
    };
    let mut running = Running { kind, front, sidecars };
    if let Err(e) = wait_ready(&mut running, dir) {
        running.stop();
        return Err(e);
    }
    Ok(running)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Out,
    In,
}

/// Until one request goes through, or 15 s; a sidecar that exits fails at once with its log.
fn wait_ready(r: &mut Running, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        for (name, c) in &mut r.sidecars {
            if let Ok(Some(status)) = c.try_wait() {
                let log = fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                bail!("{} {name} exited ({status}):\n{}", r.kind.name(), tail(&log, 2000));
            }
        }
        let attempt = crate::load::connect(r.front).and_then(|mut s| {
            use std::io::Write as _;
            s.write_all(b"GET /1k HTTP/1.1\r\nHost: backend\r\n\r\n")?;
            crate::load::read_response(&mut s, &mut buf)
        });
        match attempt {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "{} did not carry a request within 15 s: {e} (logs in {})",
                    r.kind.name(),
                    dir.display()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn spawn_logged(mut cmd: Command, dir: &Path, name: &str) -> anyhow::Result<(String, Child)> {
    let log = fs::File::create(dir.join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    Ok((name.to_owned(), child))
}

fn spawn_haproxy(dir: &Path, name: &str, config: &str) -> anyhow::Result<(String, Child)> {
    let path = dir.join(format!("{name}.cfg"));
    fs::write(&path, config)?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    spawn_logged(cmd, dir, name)
}

fn spawn_nginx(dir: &Path, name: &str, config: &str) -> anyhow::Result<(String, Child)> {
    let prefix = dir.join(name);
    fs::create_dir_all(prefix.join("logs"))?;
    let path = prefix.join("nginx.conf");
    fs::write(&path, config)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p").arg(&prefix).arg("-c").arg(&path).args(["-e", "stderr"]);
    spawn_logged(cmd, dir, name)
}

fn spawn_stunnel(dir: &Path, name: &str, config: &str) -> anyhow::Result<(String, Child)> {
    let path = dir.join(format!("{name}.conf"));
    fs::write(&path, config)?;
    let mut cmd = Command::new("stunnel4");
    cmd.arg(&path);
    spawn_logged(cmd, dir, name)
}

fn spawn_keycard(keycard: &Path, dir: &Path, name: &str, config: &str) -> anyhow::Result<(String, Child)> {
    let path = dir.join(format!("{name}.yaml"));
    fs::write(&path, config)?;
    let mut cmd = Command::new(keycard);
    cmd.args(["--log-format", "json", "proxy", "--config"]).arg(&path);
    spawn_logged(cmd, dir, name)
}

fn haproxy(
    kind: Kind,
    side: Side,
    listen: SocketAddr,
    to: SocketAddr,
    certs: &Certs,
    fd_limit: u64,
) -> String {
    // HAProxy refuses to start when maxconn needs more descriptors than it may open.
    let maxconn = (fd_limit.saturating_sub(100) / 2).min(60_000);
    let mode = if kind == Kind::HaproxyHttp { "http" } else { "tcp" };
    let tls = kind != Kind::Floor;
    let bundle = certs.bundle.display();
    let mut bind = format!("bind {listen}");
    let mut server = format!("server s {to}");
    if tls && side == Side::In {
        let _ = write!(
            bind,
            " ssl crt {} ca-file {bundle} verify required ssl-min-ver TLSv1.3",
            certs.server.join("both.pem").display()
        );
    }
    if tls && side == Side::Out {
        let _ = write!(
            server,
            " ssl crt {} ca-file {bundle} verify required ssl-min-ver TLSv1.3",
            certs.client.join("both.pem").display()
        );
    }
    let reuse = if mode == "http" { "  http-reuse always\n" } else { "" };
    format!(
        "global\n  maxconn {maxconn}\n\ndefaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n  timeout http-keep-alive 600s\n\n\
         frontend f\n  {bind}\n  default_backend b\n\nbackend b\n{reuse}  {server}\n"
    )
}

fn nginx(
    kind: Kind,
    side: Side,
    (listen, to): (SocketAddr, SocketAddr),
    certs: &Certs,
    prefix: &Path,
    fd_limit: u64,
) -> String {
    let bundle = certs.bundle.display();
    let (cert, key) = match side {
        Side::Out => (certs.client.join("cert.pem"), certs.client.join("key.pem")),
        Side::In => (certs.server.join("cert.pem"), certs.server.join("key.pem")),
    };
    let (cert, key) = (cert.display(), key.display());
    let head = format!(
        "worker_processes auto;\nworker_rlimit_nofile {fd_limit};\ndaemon off;\npid {}/nginx.pid;\n\
         events {{ worker_connections {}; }}\n",
        prefix.display(),
        fd_limit.saturating_sub(100)
    );
    let server_tls = format!(
        "ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;\n    \
         ssl_verify_client on; ssl_client_certificate {bundle}; ssl_verify_depth 3;"
    );
    let client_tls = format!(
        "proxy_ssl_certificate {cert}; proxy_ssl_certificate_key {key}; proxy_ssl_protocols TLSv1.3;\n    \
         proxy_ssl_trusted_certificate {bundle}; proxy_ssl_verify on; proxy_ssl_verify_depth 3;\n    \
         proxy_ssl_name server.bench.local; proxy_ssl_session_reuse on;"
    );
    if kind == Kind::NginxStream {
        let body = match side {
            Side::Out => {
                format!("listen {listen};\n    proxy_pass {to};\n    proxy_ssl on;\n    {client_tls}")
            }
            Side::In => format!("listen {listen} ssl;\n    {server_tls}\n    proxy_pass {to};"),
        };
        return format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n{head}\
             stream {{\n  server {{\n    {body}\n  }}\n}}\n"
        );
    }
    let (listen_line, upstream_scheme, tls) = match side {
        Side::Out => (format!("listen {listen};"), "https", client_tls),
        Side::In => (format!("listen {listen} ssl;"), "http", server_tls),
    };
    let upstream_tls = if side == Side::Out { tls.clone() } else { String::new() };
    let listen_tls = if side == Side::In { tls } else { String::new() };
    format!(
        "{head}http {{\n  keepalive_requests 1000000;\n  keepalive_timeout 600s;\n\
         \x20 upstream next {{ server {to}; keepalive 64; keepalive_requests 1000000; keepalive_timeout 600s; }}\n\
         \x20 server {{\n    {listen_line}\n    {listen_tls}\n    location / {{\n\
         \x20     proxy_pass {upstream_scheme}://next;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
         \x20     {upstream_tls}\n    }}\n  }}\n}}\n"
    )
}

fn stunnel(side: Side, listen: SocketAddr, to: SocketAddr, certs: &Certs, prefix: &Path) -> String {
    let (dir, client, require) = match side {
        Side::Out => (&certs.client, "yes", ""),
        Side::In => (&certs.server, "no", "requireCert = yes\n"),
    };
    format!(
        "foreground = yes\npid =\noutput = {}.log\n\n[pair]\nclient = {client}\naccept = {listen}\nconnect = {to}\n\
         cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n{require}sslVersionMin = TLSv1.3\n",
        prefix.display(),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        certs.bundle.display()
    )
}

/// STRICT mTLS mesh-wide and one ALLOW by principal: what a user of keycard deploys.
const KEYCARD_POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: bench}
spec:
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/bench/sa/client]}}]
";

fn keycard_config(
    side: Side,
    protocol: &str,
    listen: SocketAddr,
    to: SocketAddr,
    certs: &Certs,
    extra: [u16; 3],
) -> String {
    let (sa, dir) = match side {
        Side::Out => ("client", &certs.client),
        Side::In => ("server", &certs.server),
    };
    let traffic = match side {
        Side::Out => format!(
            "outbound:\n  - {{listen: {listen}, remote: {to}, identities: [{SERVER_ID}], protocol: {protocol}}}\n"
        ),
        Side::In => {
            format!("inbound:\n  - {{port: 8080, listen: {listen}, app: {to}, protocol: {protocol}}}\n")
        }
    };
    format!(
        "workload: {{trust_domain: cluster.local, namespace: bench, service_account: {sa}}}\n\
         identity:\n  files: {{cert: {}, key: {}, bundle: {}}}\n{traffic}\
         policy: {{paths: [policies.yaml]}}\nadmin: 127.0.0.1:{}\nmetrics: 127.0.0.1:{}\nreadiness: 127.0.0.1:{}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        dir.join("bundle.pem").display(),
        extra[0],
        extra[1],
        extra[2]
    )
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(data)?;
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The version line of each program used, for the results.
pub fn versions(keycard: &Path) -> Vec<(String, String)> {
    // The first line that names the program (stunnel prints a banner first), else the first line.
    let first_line = |cmd: &mut Command| -> String {
        let name = cmd.get_program().to_string_lossy().trim_end_matches('4').to_lowercase();
        let name = name.rsplit('/').next().unwrap_or("").to_owned();
        cmd.output()
            .map(|o| {
                let text = String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned();
                let mut lines = text.lines().map(str::trim);
                let first = lines.clone().next().unwrap_or("");
                lines.find(|l| l.to_lowercase().contains(&name)).unwrap_or(first).to_owned()
            })
            .unwrap_or_else(|e| format!("not available: {e}"))
    };
    vec![
        ("keycard".into(), first_line(Command::new(keycard).arg("--version"))),
        ("haproxy".into(), first_line(Command::new("haproxy").arg("-v"))),
        ("nginx".into(), first_line(Command::new("nginx").arg("-v"))),
        ("stunnel4".into(), first_line(Command::new("stunnel4").arg("-version"))),
    ]
}
