//! One outbound connection: the app's plaintext in, mutual TLS (TLS 1.3, our SVID) to the remote
//! sidecar, whose SPIFFE ID must be one of those expected for the destination (secure naming).
//! A DestinationRule with `tls.mode: DISABLE` for the destination sends plaintext instead.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keycard_config::SpiffeId;
use keycard_config::policy::model::ClientTlsMode;
use keycard_config::sidecar::{Protocol, Upstream};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, end_reason};
use crate::buffers::ReadAhead;
use crate::forward::{self, ConnectError, Leg, Legs};
use crate::http::sniff::Sniffed;
use crate::ktls::ClientStream;
use crate::ktls::offer::Moved;
use crate::records::RecordStream;
use crate::sidecar::{Direction, Serving, Shared, TcpCounters};
use crate::tls::{MeshTls, OUTBOUND_ALPN, peer_identity};

/// How one upstream is reached, decided at start and on every policy reload.
#[derive(Debug, Clone)]
pub struct Route {
    pub mode: ClientTlsMode,
    pub expected: Vec<SpiffeId>,
    pub sni: Option<String>,
    /// For `SIMPLE` / `MUTUAL`: the config built from the DestinationRule's files, or why not.
    pub external: Option<Result<Arc<ClientConfig>, String>>,
    /// The DestinationRule's `h2UpgradePolicy` (`useClientProtocol`): whether HTTP/1.1 requests
    /// travel as HTTP/2; `None` leaves it to the sidecar's `http.h2_upgrade`.
    pub h2_upgrade: Option<bool>,
    /// The DestinationRule's `tcp.connectTimeout`, else the sidecar's `limits.connect_timeout`.
    pub connect_timeout: Option<Duration>,
    /// The DestinationRule in force (`namespace/name`), for `/config_dump`.
    pub rule: Option<String>,
}

impl Route {
    /// The route to `up` under the DestinationRules its workload sees (`destinations`).
    pub fn for_upstream(up: &Upstream, destinations: &keycard_config::policy::Destinations) -> Self {
        let port = up.port.unwrap_or(up.remote.port());
        let dest = up.host.as_deref().and_then(|h| destinations.lookup(h, port));
        let (tls, pool) = (dest.and_then(|d| d.tls), dest.and_then(|d| d.pool));
        let expected = if !up.identities.is_empty() {
            up.identities.clone()
        } else {
            tls.map(|d| d.subject_alt_names.iter().filter_map(|s| SpiffeId::parse(s).ok()).collect())
                .unwrap_or_default()
        };
        let mode = tls.map_or(ClientTlsMode::IstioMutual, |d| d.mode);
        let external = match (mode, tls) {
            (ClientTlsMode::Simple | ClientTlsMode::Mutual, Some(d)) => Some(external_config(d)),
            _ => None,
        };
        Self {
            mode,
            expected,
            sni: tls.and_then(|d| d.sni.clone()).or_else(|| up.host.clone()),
            external,
            h2_upgrade: pool.and_then(|p| p.h2_upgrade),
            connect_timeout: pool.and_then(|p| p.connect_timeout),
            rule: dest.map(|d| format!("{}/{}", d.rule.namespace, d.rule.name)),
        }
    }

    /// The route as `/config_dump` shows it: what the DestinationRule in force decided, and the
    /// sidecar's own settings where it decided nothing.
    pub fn describe(&self, up: &Upstream, shared: &Shared) -> serde_json::Value {
        let timeout = self.connect_timeout.unwrap_or(shared.limits.connect_timeout);
        serde_json::json!({
            "remote": up.remote,
            "host": up.host,
            "destination_rule": self.rule,
            "tls_mode": self.mode,
            "expected_identities": self.expected,
            "sni": self.sni,
            "h2_upgrade": self.h2_upgrade(shared),
            "connect_timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Whether HTTP/1.1 requests on this route travel between the sidecars as HTTP/2.
    pub fn h2_upgrade(&self, shared: &Shared) -> bool {
        self.h2_upgrade.unwrap_or(shared.http.h2_upgrade)
    }
}

/// TLS to a destination outside the mesh (`SIMPLE`), optionally with a client certificate
/// (`MUTUAL`), verified by WebPKI against the DestinationRule's `caCertificates`.
fn external_config(d: &keycard_config::policy::DestTls) -> Result<Arc<ClientConfig>, String> {
    use keycard_config::pem::{certs_from_file, key_from_file};
    let ca = d.ca_certificates.as_ref().ok_or("SIMPLE/MUTUAL needs caCertificates")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs_from_file(std::path::Path::new(ca)).map_err(|e| e.to_string())? {
        roots.add(cert).map_err(|e| format!("{ca}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match (d.mode, &d.client_certificate, &d.private_key) {
        (ClientTlsMode::Mutual, Some(cert), Some(key)) => {
            let chain = certs_from_file(std::path::Path::new(cert)).map_err(|e| e.to_string())?;
            let key = key_from_file(std::path::Path::new(key)).map_err(|e| e.to_string())?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        (ClientTlsMode::Mutual, _, _) => return Err("MUTUAL needs clientCertificate and privateKey".into()),
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Client configs are built once per certificate and route, not per connection.
pub struct ConfigCache {
    alpn: &'static [u8],
    built: Mutex<Option<Built>>,
}

struct Built {
    tls: Arc<MeshTls>,
    expected: Vec<SpiffeId>,
    config: Option<Arc<ClientConfig>>,
}

impl ConfigCache {
    /// Configs offering `alpn` (what the remote sidecar learns about the stream).
    pub fn new(alpn: &'static [u8]) -> Self {
        Self { alpn, built: Mutex::new(None) }
    }

    /// The config for the current certificate and expected identities.
    pub fn get(&self, tls: &Arc<MeshTls>, expected: &[SpiffeId]) -> Option<Arc<ClientConfig>> {
        let mut b = self.built.lock().ok()?;
        let fresh = matches!(&*b, Some(x) if Arc::ptr_eq(&x.tls, tls) && x.expected == expected);
        if !fresh {
            let config = tls.client(expected.to_vec()).ok().map(|c| {
                let mut c = (*c).clone();
                c.alpn_protocols = vec![self.alpn.to_vec()];
                Arc::new(c)
            });
            *b = Some(Built { tls: tls.clone(), expected: expected.to_vec(), config });
        }
        b.as_ref().and_then(|x| x.config.clone())
    }
}

/// The TLS server name for a route: the DestinationRule's `sni` or the host, else the address.
pub fn server_name(route: &Route, remote: SocketAddr) -> ServerName<'static> {
    route
        .sni
        .as_deref()
        .and_then(|s| ServerName::try_from(s.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(remote.ip().into()))
}

/// One upstream: its settings, its route (changed by policy reloads), TLS configs and, where it
/// may carry HTTP, the pool. Its own listener and the capture listener share it.
pub struct UpstreamHandler {
    up: Upstream,
    route: tokio::sync::watch::Receiver<Arc<Route>>,
    cache: ConfigCache,
    http: Option<Arc<crate::http::outbound::OutboundHttp>>,
}

impl UpstreamHandler {
    pub fn new(
        shared: &Arc<Shared>,
        up: Upstream,
        route: tokio::sync::watch::Receiver<Arc<Route>>,
    ) -> Arc<Self> {
        let http = (up.protocol() != Protocol::Tcp)
            .then(|| crate::http::outbound::OutboundHttp::new(shared.clone(), up.clone(), route.clone()));
        Arc::new(Self { up, route, cache: ConfigCache::new(OUTBOUND_ALPN), http })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.up
    }

    /// Sets up one connection from the app (sniffing, the connect, mutual TLS) and returns what
    /// serves it from then on.
    pub async fn set_up(&self, shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) -> Option<Serving> {
        // The route in force when the connection arrives; a reload changes later ones.
        let route = self.route.borrow().clone();
        if let Some(http) = &self.http
            && route.mode == ClientTlsMode::IstioMutual
            && wants_http(shared, &self.up, &tcp).await
        {
            let http = http.clone();
            return Some(Box::pin(http.serve_conn(tcp, peer)));
        }
        // Boxed: unboxed, the TCP set-up's future (3.2 KB, its TLS handshake) set the size of
        // this one, which the accept loop moves into a box for every connection, HTTP ones too.
        let conn = Box::pin(set_up(shared, &self.up, &route, &self.cache, tcp, peer)).await?;
        Some(Box::pin(conn.forward(shared.clone())))
    }
}

pub async fn serve(
    shared: Arc<Shared>,
    up: Arc<UpstreamHandler>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    crate::sidecar::accept_loop(shared.clone(), listener, stop, move |tcp, peer| {
        let (shared, up) = (shared.clone(), up.clone());
        async move { up.set_up(&shared, tcp, peer).await }
    })
    .await;
}

/// Whether the app's connection is HTTP: declared, or sniffed on an `auto` upstream.
async fn wants_http(shared: &Shared, up: &Upstream, app: &TcpStream) -> bool {
    match up.protocol() {
        Protocol::Tcp => false,
        Protocol::Auto => match crate::http::sniff::peek(app, shared.limits.detect_timeout).await {
            Sniffed::Http1 | Sniffed::Http2 => true,
            Sniffed::Other => false,
            Sniffed::Timeout => {
                shared.metrics.detect_timeouts.with_label_values(&["outbound"]).inc();
                false
            }
        },
        _ => true,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("this sidecar has no certificate yet")]
    NoCertificate,
    #[error("cannot build the client TLS config")]
    Config,
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed ({reason}): {detail}")]
    Handshake { reason: &'static str, detail: String },
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(hyper::Error),
    #[error("HTTP/1.1 handshake failed: {0}")]
    Http1(hyper::Error),
}

impl DialError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate_loaded",
            Self::Config => "config",
            Self::Connect(_) => "connect_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::Handshake { reason, .. } => reason,
            Self::HandshakeTimeout => "timeout",
            Self::Http2(_) => "http2_handshake",
            Self::Http1(_) => "http1_handshake",
        }
    }
}

/// TCP to `remote` under the route's connect deadline, Nagle off.
async fn connect(shared: &Shared, route: &Route, remote: SocketAddr) -> Result<TcpStream, DialError> {
    let timeout = route.connect_timeout.unwrap_or(shared.limits.connect_timeout);
    forward::connect(remote, timeout).await.map_err(|e| match e {
        ConnectError::Failed(e) => DialError::Connect(e),
        ConnectError::TimedOut => DialError::ConnectTimeout,
    })
}

/// The mesh client config (our SVID, the route's expected identities) from `cache`.
fn mesh_config(shared: &Shared, route: &Route, cache: &ConfigCache) -> Result<Arc<ClientConfig>, DialError> {
    let tls = shared.tls.borrow().clone().ok_or(DialError::NoCertificate)?;
    cache.get(&tls, &route.expected).ok_or(DialError::Config)
}

/// TLS over `tcp` under the handshake deadline: the stream and the server's SPIFFE ID (if it
/// has one). Failures are counted and kept in `/debug/handshake_failures`.
async fn handshake(
    shared: &Shared,
    remote: SocketAddr,
    route: &Route,
    config: Arc<ClientConfig>,
    io: ReadAhead<TcpStream>,
) -> Result<(TlsStream<ReadAhead<TcpStream>>, Option<SpiffeId>), DialError> {
    let connect = TlsConnector::from(config).connect(server_name(route, remote), io);
    match tokio::time::timeout(shared.limits.handshake_timeout, connect).await {
        Ok(Ok(s)) => {
            let peer = peer_identity(s.get_ref().1.peer_certificates());
            Ok((s, peer))
        }
        Ok(Err(e)) => {
            let (reason, detail) = crate::sidecar::classify_tls_error(&e);
            shared.handshake_failed(Direction::Outbound, remote, reason, &detail);
            Err(DialError::Handshake { reason, detail })
        }
        Err(_) => {
            let detail = "the TLS handshake did not finish in time";
            shared.handshake_failed(Direction::Outbound, remote, "timeout", detail);
            Err(DialError::HandshakeTimeout)
        }
    }
}

/// A mesh connection whose handshake was read record by record: through rustls until the
/// server's session tickets are in (`ktls::await_tickets`), then to kernel TLS where it takes it,
/// else to keycard's record layer (`crate::records`).
/// Also the bytes moved meanwhile; `None` where the wait failed.
async fn offload(
    shared: &Shared,
    remote: SocketAddr,
    mut app: TcpStream,
    mut stream: TlsStream<ReadAhead<TcpStream>>,
) -> Option<(RemoteLegs, crate::ktls::Waited)> {
    let waited = crate::ktls::await_tickets(&mut stream, &mut app, crate::ktls::TICKET_WAIT).await.ok()?;
    let moved = if waited.server_closed {
        // rustls read the server's close_notify: whoever took the records would not see the end.
        shared.count_offload(Direction::Outbound, "not_established");
        Moved::Rustls(stream, bytes::Bytes::new())
    } else {
        shared.take_records(Direction::Outbound, remote, stream, bytes::Bytes::new())?
    };
    let legs = match moved {
        Moved::Kernel(kernel) => Legs::Spliced(Leg::plain(app), Leg::kernel_tls(kernel)),
        Moved::User(records) => Legs::Copied(app, Either::Right(records)),
        Moved::Rustls(mut stream, _) => {
            stream.get_mut().0.read_ahead_again();
            Legs::Copied(app, Either::Left(Box::new(stream)))
        }
    };
    Some((legs, waited))
}

/// Connects to a remote sidecar and completes mutual TLS with the mesh config from `cache`
/// (whose ALPN tells the remote what the stream carries).
/// The stream moves to kernel TLS (else to keycard's record layer) by itself once the server's
/// tickets are in (`ktls::ClientStream`).
pub async fn dial(
    shared: &Arc<Shared>,
    remote: SocketAddr,
    route: &Route,
    cache: &ConfigCache,
) -> Result<(ClientStream, Option<SpiffeId>), DialError> {
    let config = mesh_config(shared, route, cache)?;
    let tcp = connect(shared, route, remote).await?;
    let io = if shared.may_take_records() { ReadAhead::record_exact(tcp) } else { ReadAhead::new(tcp) };
    let (tls, peer) = handshake(shared, remote, route, config, io).await?;
    Ok((ClientStream::new(tls, shared, remote), peer))
}

/// The legs of an outbound connection: the app's, then the remote sidecar's.
type RemoteLegs = Legs<TcpStream, Either<Box<TlsStream<ReadAhead<TcpStream>>>, RecordStream>>;

/// Connects to the remote (with mutual TLS unless the route disables it): the connection to
/// forward, or `None` where that failed (logged and counted).
async fn set_up(
    shared: &Shared,
    up: &Upstream,
    route: &Route,
    cache: &ConfigCache,
    app: TcpStream,
    peer: SocketAddr,
) -> Option<ToRemote> {
    let started = Instant::now();
    let tls = route.mode != ClientTlsMode::Disable;
    let fail = |e: &DialError| {
        access(shared, up.remote, peer, None, tls, started).log("fail", e.reason(), &e.to_string(), 0, 0)
    };
    let _ = app.set_nodelay(true);
    let remote = match connect(shared, route, up.remote).await {
        Ok(s) => s,
        Err(e) => {
            fail(&e);
            return None;
        }
    };
    // The drain itself, not a child token: nothing else cancels an outbound connection, and a
    // child costs an allocation and a lock on the drain per connection.
    let cancel = shared.drain.clone();
    if !tls {
        let labels = shared.tcp_labels(Direction::Outbound, Some(&shared.id), None, false);
        let legs = Legs::Spliced(Leg::plain(app), Leg::plain(remote));
        let counters = shared.open_tcp(&labels);
        let remote = up.remote;
        return Some(ToRemote {
            legs,
            server_id: None,
            mtls: false,
            peer,
            remote,
            started,
            cancel,
            counters,
            early: (0, 0),
        });
    }
    let config = match &route.external {
        Some(Ok(config)) => Ok(config.clone()),
        Some(Err(e)) => {
            shared.handshake_failed(Direction::Outbound, peer, "config", e);
            return None;
        }
        None => mesh_config(shared, route, cache),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            shared.handshake_failed(Direction::Outbound, peer, e.reason(), &e.to_string());
            return None;
        }
    };
    let mtls = route.external.is_none();
    // A mesh connection's handshake is read record by record, so that the kernel or keycard's
    // record layer can take it after (crate::ktls, crate::records); one to a DestinationRule's
    // external server stays with rustls.
    let io = if mtls && shared.may_take_records() {
        ReadAhead::record_exact(remote)
    } else {
        ReadAhead::new(remote)
    };
    let (stream, server_id) = match handshake(shared, up.remote, route, config, io).await {
        Ok(x) => x,
        Err(e) => {
            fail(&e);
            return None;
        }
    };
    let labels = shared.tcp_labels(Direction::Outbound, Some(&shared.id), server_id.as_ref(), mtls);
    let (legs, early) = if mtls && shared.may_take_records() {
        match offload(shared, up.remote, app, stream).await {
            Some((legs, waited)) => (legs, (waited.up, waited.down)),
            None => {
                shared.refuse_tcp(&labels);
                let conn = access(shared, up.remote, peer, server_id.as_ref(), mtls, started);
                conn.log("allow", end_reason(forward::End::Error), "", 0, 0);
                return None;
            }
        }
    } else {
        if mtls {
            shared.count_no_offload(Direction::Outbound);
        }
        (Legs::Copied(app, Either::Left(Box::new(stream))), (0, 0))
    };
    let counters = shared.open_tcp(&labels);
    Some(ToRemote { legs, server_id, mtls, peer, remote: up.remote, started, cancel, counters, early })
}

/// An outbound connection with both legs open: all that its long life keeps.
struct ToRemote {
    legs: RemoteLegs,
    server_id: Option<SpiffeId>,
    mtls: bool,
    peer: SocketAddr,
    remote: SocketAddr,
    started: Instant,
    cancel: CancellationToken,
    counters: TcpCounters,
    /// Bytes moved up and down before the legs were handed to `forward` (`ktls::await_tickets`).
    early: (u64, u64),
}

impl ToRemote {
    /// An `async move` block, not an `async fn`, which would keep a second copy of `self`; the
    /// forwarding is made before it, so the block does not keep the legs too.
    fn forward(self, shared: Arc<Shared>) -> impl Future<Output = ()> + Send + 'static {
        let ToRemote { legs, server_id, mtls, peer, remote, started, cancel, counters, early } = self;
        let forwarding = shared.forward(legs, cancel);
        async move {
            let t = forwarding.await;
            let (up_bytes, down_bytes) = (t.forward + early.0, t.backward + early.1);
            counters.finish(down_bytes, up_bytes);
            let event = access(&shared, remote, peer, server_id.as_ref(), mtls, started);
            event.log("allow", end_reason(t.end), "", down_bytes, up_bytes);
        }
    }
}

/// The access event of a connection to `remote`.
fn access<'a>(
    shared: &'a Shared,
    remote: SocketAddr,
    peer: SocketAddr,
    server_id: Option<&'a SpiffeId>,
    mtls: bool,
    started: Instant,
) -> Access<'a> {
    Access {
        direction: Direction::Outbound,
        src_addr: peer,
        src_identity: Some(&shared.id),
        dst_addr: remote,
        dst_identity: server_id,
        port: remote.port(),
        mtls,
        policy: "-",
        started,
    }
}
