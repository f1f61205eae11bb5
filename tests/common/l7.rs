//! HTTP pieces for the L7 tests: an app that reports what it received, HTTP/1.1 and h2c clients,
//! raw-socket requests, and a two-sidecar mesh with HTTP ports.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keycard_config::sidecar::{HttpSettings, Protocol, TlsSettings};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::mesh::*;

type AppBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// An HTTP app (HTTP/1.1 and h2c): `/echo` streams the request body back, `/status/N` answers
/// N, anything else answers 200 with what arrived, one `name: value` line each.
pub async fn inspect_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    Ok::<_, hyper::Error>(inspect(req))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn inspect(req: Request<Incoming>) -> Response<AppBody> {
    let path = req.uri().path().to_owned();
    if path == "/echo" {
        return Response::new(req.into_body().boxed());
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        return r;
    }
    let h = req.headers();
    let header = |n: &str| {
        h.get_all(n).iter().map(|v| v.to_str().unwrap_or("?").to_owned()).collect::<Vec<_>>().join(",")
    };
    let host = req.uri().authority().map(|a| a.to_string()).unwrap_or_else(|| header("host"));
    let mut out = format!(
        "method: {}\ntarget: {}\nversion: {:?}\nhost: {host}\n",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str()),
        req.version()
    );
    for name in h.keys() {
        out.push_str(&format!("{}: {}\n", name.as_str(), header(name.as_str())));
    }
    Response::new(full(&out))
}

fn full(s: &str) -> AppBody {
    Full::new(Bytes::from(s.to_owned())).map_err(|never| match never {}).boxed()
}

/// One field of an inspect-app answer.
pub fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn h1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// `method` `http://addr{target}` with `headers`; a missing Host defaults to the details service.
pub async fn call(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{target}"));
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        b = b.header("host", "details.default.svc.cluster.local");
    }
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(b.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("answer within 10 s")
    .expect("request succeeds");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// Writes raw bytes, reads until the peer closes (or 5 s pass): everything that came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub const DETAILS: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-details";
pub const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";

/// `details` (HTTP app behind a sidecar, port 9080) and `productpage`'s sidecar with one
/// outbound to it.
pub struct L7Mesh {
    pub server: Running,
    pub client: Running,
    pub app: SocketAddr,
    _policy: tempfile::TempDir,
}

impl L7Mesh {
    pub async fn start(pki: &Pki, policy: &str, server_proto: Protocol, client_proto: Protocol) -> Self {
        Self::with_app(pki, policy, server_proto, client_proto, inspect_app().await).await
    }

    pub async fn with_app(
        pki: &Pki,
        policy: &str,
        server_proto: Protocol,
        client_proto: Protocol,
        app: SocketAddr,
    ) -> Self {
        Self::custom(pki, policy, server_proto, client_proto, app, HttpSettings::default()).await
    }

    /// Both sidecars with `http` settings.
    pub async fn custom(
        pki: &Pki,
        policy: &str,
        server_proto: Protocol,
        client_proto: Protocol,
        app: SocketAddr,
        http: HttpSettings,
    ) -> Self {
        let protos = (server_proto, client_proto);
        Self::custom_tls(pki, policy, protos, app, http, TlsSettings::default()).await
    }

    /// Both sidecars with `http` and `tls` settings; the protocols are the server's, then the client's.
    pub async fn custom_tls(
        pki: &Pki,
        policy: &str,
        (server_proto, client_proto): (Protocol, Protocol),
        app: SocketAddr,
        http: HttpSettings,
        tls: TlsSettings,
    ) -> Self {
        let dir = policy_dir(policy);
        let mut cfg = config(SidecarSpec {
            ns: "default",
            sa: "bookinfo-details",
            labels: &[("app", "details")],
            identity: pki.files("default", "bookinfo-details"),
            inbound: vec![(9080, app)],
            outbound: vec![],
            policy: Some(dir.path().to_owned()),
        });
        cfg.inbound[0].protocol = Some(server_proto);
        (cfg.http, cfg.tls) = (http.clone(), tls.clone());
        let server = start(cfg).await;
        let expected = vec![Pki::id("default", "bookinfo-details")];
        let mut cfg = config(productpage(pki, server.inbound(9080), expected, None));
        cfg.outbound[0].protocol = Some(client_proto);
        (cfg.http, cfg.tls) = (http, tls);
        let client = start(cfg).await;
        Self { server, client, app, _policy: dir }
    }

    /// Where productpage's app sends its requests.
    pub fn outbound(&self) -> SocketAddr {
        self.client.addrs.outbound[0]
    }

    pub async fn shutdown(self) {
        self.client.shutdown().await;
        self.server.shutdown().await;
    }
}

/// productpage's sidecar: one upstream (`remote`, expecting `expected`), no inbound port.
pub fn productpage(
    pki: &Pki,
    remote: SocketAddr,
    expected: Vec<keycard_config::SpiffeId>,
    policy: Option<std::path::PathBuf>,
) -> SidecarSpec {
    SidecarSpec {
        ns: "default",
        sa: "bookinfo-productpage",
        labels: &[("app", "productpage")],
        identity: pki.files("default", "bookinfo-productpage"),
        inbound: vec![],
        outbound: vec![(remote, expected)],
        policy,
    }
}

/// productpage's sidecar with one HTTP upstream, `details.default.svc.cluster.local:9080` at
/// `remote`, reading its Istio policy from `policy` (a directory the test rewrites).
pub async fn productpage_to_details(pki: &Pki, remote: SocketAddr, policy: &std::path::Path) -> Running {
    let mut cfg = super::mesh::config(productpage(pki, remote, vec![], Some(policy.to_owned())));
    cfg.outbound[0].protocol = Some(Protocol::Http);
    cfg.outbound[0].host = Some("details.default.svc.cluster.local".into());
    cfg.outbound[0].port = Some(9080);
    start(cfg).await
}

/// Writes `text` as the only policy file of `dir` and waits (up to 10 s) until `sidecar` has
/// loaded it.
pub async fn replace_policy(sidecar: &Running, dir: &std::path::Path, text: &str) {
    let reloads = || sidecar.metric("keycard_policy_reloads_total{result=\"success\"}");
    let before = reloads();
    std::fs::write(dir.join("policy.yaml"), text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reloads() <= before {
        assert!(std::time::Instant::now() < deadline, "the new policy was never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs 8 MiB to the app's `/echo` through `out` and checks that all of it came back.
pub async fn echoes_8_mib(client: &HttpClient, out: SocketAddr) {
    let big = vec![b'k'; 8 << 20];
    let req = Request::post(format!("http://{out}/echo"))
        .header("host", "details.default.svc.cluster.local")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(back.len() == big.len() && back.iter().all(|b| *b == b'k'), "{} bytes back", back.len());
}
