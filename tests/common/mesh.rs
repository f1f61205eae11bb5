//! A mesh in the test process: a CA on disk, SVID files, echo apps, sidecars on 127.0.0.1:0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keycard_ca::store::{self, InitOptions, LoadedCa};
use keycard_config::pem::certs_to_pem;
use keycard_config::sidecar::{
    IdentitySource, InboundPort, Limits, PolicySource, Protocol, SidecarConfig, Upstream, Workload,
};
use keycard_config::{SpiffeId, TrustDomain};
use keycard_proxy::{Addrs, Sidecar};
use prometheus::Registry;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "cluster.local";

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: LoadedCa,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            trust_domain: TrustDomain::parse(TD).unwrap(),
            root_lifetime: time::Duration::days(3650),
            intermediate_lifetime: time::Duration::days(365),
            force: false,
        };
        let ca = store::init(&dir.path().join("ca"), &opts, OffsetDateTime::now_utc()).unwrap();
        Self { dir, ca }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.ca_dir().join("bundle.pem")
    }

    /// SVID files for `ns/sa`, as `keycard ca issue` writes them.
    pub fn files(&self, ns: &str, sa: &str) -> IdentitySource {
        let out = self.dir.path().join(format!("{ns}-{sa}"));
        std::fs::create_dir_all(&out).unwrap();
        let id = SpiffeId::parse(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}")).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issued = self
            .ca
            .authority
            .issue(&id, &key, time::Duration::hours(1), OffsetDateTime::now_utc(), &Default::default())
            .unwrap();
        std::fs::write(out.join("cert.pem"), certs_to_pem(&issued.chain)).unwrap();
        std::fs::write(out.join("key.pem"), key.serialize_pem()).unwrap();
        IdentitySource::Files {
            cert: out.join("cert.pem"),
            key: out.join("key.pem"),
            bundle: self.bundle_path(),
        }
    }

    pub fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}")).unwrap()
    }
}

/// A TCP echo server; returns its address.
pub async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

pub fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn policy_dir(yaml: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("policy.yaml"), yaml).unwrap();
    d
}

pub fn limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(2),
        detect_timeout: Duration::from_secs(2),
        watch_interval: Duration::from_millis(100),
        drain_timeout: Duration::from_secs(2),
        ..Limits::default()
    }
}

pub struct SidecarSpec {
    pub ns: &'static str,
    pub sa: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub identity: IdentitySource,
    pub inbound: Vec<(u16, SocketAddr)>,
    pub outbound: Vec<(SocketAddr, Vec<SpiffeId>)>,
    pub policy: Option<PathBuf>,
}

pub fn config(s: SidecarSpec) -> SidecarConfig {
    SidecarConfig {
        workload: Workload {
            trust_domain: TrustDomain::parse(TD).unwrap(),
            namespace: s.ns.into(),
            service_account: s.sa.into(),
            labels: s.labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        },
        identity: s.identity,
        inbound: s
            .inbound
            .into_iter()
            .map(|(port, app)| InboundPort {
                port,
                listen: Some(any_addr()),
                app,
                name: None,
                protocol: Some(Protocol::Tcp),
            })
            .collect(),
        outbound: s
            .outbound
            .into_iter()
            .map(|(remote, identities)| Upstream {
                listen: Some(any_addr()),
                remote,
                host: None,
                port: None,
                identities,
                name: None,
                protocol: Some(Protocol::Tcp),
            })
            .collect(),
        capture: None,
        policy: PolicySource { paths: s.policy.into_iter().collect(), root_namespace: "istio-system".into() },
        admin: any_addr(),
        metrics: any_addr(),
        readiness: any_addr(),
        limits: limits(),
        http: Default::default(),
        tls: Default::default(),
    }
}

pub struct Running {
    pub addrs: Addrs,
    pub registry: Registry,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
    pub reload: Arc<tokio::sync::Notify>,
}

impl Running {
    pub fn inbound(&self, port: u16) -> SocketAddr {
        self.addrs.inbound.iter().find(|(p, _)| *p == port).map(|(_, a)| *a).unwrap()
    }

    pub fn metrics(&self) -> String {
        keycard_proxy::metrics::encode(&self.registry)
    }

    /// The value of one series (exact label text), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics(), series)
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

pub fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok())).unwrap_or(0.0)
}

/// Sum of every series of `name` whose labels contain all of `having`.
pub fn metric_sum(text: &str, name: &str, having: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && having.iter().all(|h| l.contains(h)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn start(cfg: SidecarConfig) -> Running {
    let registry = Registry::new();
    let sidecar = Sidecar::bind(cfg, registry.clone()).await.unwrap();
    let addrs = sidecar.addrs().clone();
    let reload = sidecar.reload_trigger();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(sidecar.run(async move {
        let _ = rx.await;
    }));
    let r = Running { addrs, registry, stop: Some(tx), task, reload };
    wait_ready(r.addrs.readiness).await;
    r
}

pub async fn wait_ready(addr: SocketAddr) {
    for _ in 0..200 {
        if http_get(addr, "/healthz/ready").await.is_some_and(|(code, _)| code == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sidecar at {addr} never became ready");
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// Sends `ping` through `addr` and expects it echoed: Ok, or why not.
pub async fn roundtrip(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    exchange(&mut s, b"ping").await
}

pub async fn exchange(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == msg => Ok(()),
        Ok(Ok(_)) => Err("wrong bytes back".into()),
        Ok(Err(e)) => Err(format!("closed: {e}")),
        Err(_) => Err("no answer in 5 s".into()),
    }
}

/// Waits until the peer closes `s` (EOF or reset), up to `within`.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
