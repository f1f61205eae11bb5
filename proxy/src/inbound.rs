//! One inbound connection, top to bottom: accept → mode for the port → (detect) → mutual TLS →
//! peer SPIFFE ID → authorization → connect to the app → forward → one access event and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use keycard_config::policy::authz::{self, Attributes};
use keycard_config::policy::model::MtlsMode;
use keycard_config::sidecar::{InboundPort, Protocol};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, end_reason};
use crate::buffers::ReadAhead;
use crate::conns::{ConnFacts, Registration};
use crate::detect::{self, Detected};
use crate::forward::{self, Leg, Legs};
use crate::http::headers::xfcc_element;
use crate::http::inbound::{InboundHttp, Peer};
use crate::http::sniff::{self, Rewind, Sniffed};
use crate::ktls::KernelStream;
use crate::ktls::offer::Moved;
use crate::metrics::with_flags;
use crate::records::RecordStream;
use crate::sidecar::{Direction, Serving, Shared, TcpCounters};
use crate::tls::{MESH_ALPNS, peer_identity};

/// One inbound port: its settings and, where it may carry HTTP, its HTTP server state. Its own
/// listener and the capture listener share it.
pub struct PortHandler {
    port: InboundPort,
    http: Option<Arc<InboundHttp>>,
}

impl PortHandler {
    pub fn new(shared: &Arc<Shared>, port: InboundPort) -> Arc<Self> {
        let http = (port.protocol() != Protocol::Tcp)
            .then(|| InboundHttp::new(shared.clone(), Arc::new(port.clone())));
        Arc::new(Self { port, http })
    }

    pub fn port(&self) -> &InboundPort {
        &self.port
    }

    /// Sets up one accepted connection (detection, mutual TLS, authorization, the app's
    /// connect) and returns what serves it from then on. `local` is where the peer meant to
    /// connect: the listener's address, or the original destination of a captured connection.
    pub async fn set_up(
        &self,
        shared: &Arc<Shared>,
        tcp: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Serving> {
        match set_up(shared, &self.port, self.http.is_some(), tcp, peer, local).await {
            Ready::Done => None,
            Ready::App(conn) => Some(Box::pin(conn.forward(shared.clone()))),
            Ready::Http(conn, peer) => {
                let http = self.http.clone()?;
                Some(match conn {
                    HttpConn::Plain(tcp) => Box::pin(http.serve_conn(tcp, peer)),
                    HttpConn::Mesh(stream) => Box::pin(http.serve_conn(stream, peer)),
                })
            }
        }
    }
}

pub async fn serve(
    shared: Arc<Shared>,
    port: Arc<PortHandler>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    crate::sidecar::accept_loop(shared.clone(), listener, stop, move |tcp, peer| {
        let (shared, port) = (shared.clone(), port.clone());
        async move {
            let local = tcp.local_addr().ok()?;
            port.set_up(&shared, tcp, peer, local).await
        }
    })
    .await;
}

/// What a set-up connection goes on to (returned once, so the variants' sizes matter little).
#[allow(clippy::large_enum_variant)]
enum Ready {
    /// Refused or failed (logged and counted).
    Done,
    /// HTTP, served per request.
    Http(HttpConn, Peer),
    /// Allowed to the app, whose leg is open.
    App(ToApp),
}

/// One connection's set-up: the port's mode, detection, mutual TLS, sniffing, then the app's
/// connect for a connection that stays TCP; what serves it from then on.
async fn set_up(
    shared: &Shared,
    port: &InboundPort,
    http: bool,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Ready {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let policy = shared.policy.borrow().clone();
    let mode = policy.peer_auth.mode_for(port.port);
    let limits = &shared.limits;
    let detected = match mode.mode {
        MtlsMode::Disable => Detected::Plaintext,
        _ => detect::detect(&tcp, limits.detect_timeout).await,
    };
    let terminate = match (mode.mode, detected) {
        (MtlsMode::Disable, _) => false,
        // PERMISSIVE: a client that sends nothing may speak a server-first protocol.
        (MtlsMode::Permissive | MtlsMode::Unset, Detected::Nothing) => false,
        (_, Detected::Nothing) => {
            shared.handshake_failed(
                Direction::Inbound,
                peer,
                "timeout",
                "no bytes before the detection deadline",
            );
            return Ready::Done;
        }
        (MtlsMode::Strict, Detected::Plaintext) => {
            shared.handshake_failed(
                Direction::Inbound,
                peer,
                "plaintext_in_strict",
                "plaintext on a STRICT port",
            );
            return Ready::Done;
        }
        (MtlsMode::Strict, Detected::Tls(_)) => true,
        // PERMISSIVE: only mesh TLS (by ALPN) is ours to terminate; the rest goes to the app as is.
        (_, Detected::Tls(hello)) => hello.alpn.iter().any(|a| MESH_ALPNS.contains(&a.as_slice())),
        (_, Detected::Plaintext) => false,
    };
    if !terminate {
        shared.metrics.plaintext.with_label_values(&[&port.port.to_string()]).inc();
        shared.census(peer);
        shared.observed.connection(port.port, None, peer.ip());
        if http && plaintext_is_http(shared, port, &tcp).await {
            let peer = Peer { addr: peer, local, identity: None, xfcc: None, sni: None };
            return Ready::Http(HttpConn::Plain(tcp), peer);
        }
        let facts = ConnFacts {
            source_ip: peer.ip(),
            principal: None,
            destination_ip: local.ip(),
            port: port.port,
            sni: None,
            http: false,
        };
        return open_to_app(shared, port, Downstream::Plain(tcp), facts, peer, started).await;
    }
    let Some(tls) = shared.tls.borrow().clone() else {
        shared.handshake_failed(
            Direction::Inbound,
            peer,
            "no_certificate_loaded",
            "this sidecar has no certificate yet",
        );
        return Ready::Done;
    };
    let acceptor = TlsAcceptor::from(tls.server.clone());
    // The stream goes to the heap once, here: every later state (sniffing, HTTP, forwarding)
    // holds a pointer to it rather than a slot of its size.
    let deadline = limits.handshake_timeout;
    // Read record by record while rustls does its handshake, so that the kernel (crate::ktls) or
    // keycard's own record layer (crate::records) can take the connection after, L4 or HTTP.
    let io = if shared.may_take_records() { ReadAhead::record_exact(tcp) } else { ReadAhead::new(tcp) };
    let mut stream =
        Box::new(Rewind::new(match Box::pin(tokio::time::timeout(deadline, acceptor.accept(io))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let (reason, detail) = crate::sidecar::classify_tls_error(&e);
                shared.handshake_failed(Direction::Inbound, peer, reason, &detail);
                return Ready::Done;
            }
            Err(_) => {
                let detail = "the TLS handshake did not finish in time";
                shared.handshake_failed(Direction::Inbound, peer, "timeout", detail);
                return Ready::Done;
            }
        }));
    let (_, conn) = stream.get_ref().get_ref();
    let principal = peer_identity(conn.peer_certificates());
    shared.observed.connection(port.port, principal.as_ref(), peer.ip());
    let sni = conn.server_name().map(str::to_owned);
    let mesh_http = conn.alpn_protocol().is_some_and(|a| HTTP_ALPNS.contains(&a));
    // This hop's XFCC element, for HTTP ports only (made once per connection, not per request).
    let xfcc = principal.as_ref().filter(|_| http).and_then(|p| {
        let leaf = conn.peer_certificates()?.first()?;
        http::HeaderValue::from_str(&xfcc_element(&shared.id, leaf.as_ref(), p)).ok()
    });
    if http {
        let is_http = match port.protocol() {
            Protocol::Auto if !mesh_http => {
                let sniffed = sniff::read(&mut stream, limits.detect_timeout).await;
                if sniffed == Sniffed::Timeout {
                    shared.metrics.detect_timeouts.with_label_values(&["inbound"]).inc();
                }
                matches!(sniffed, Sniffed::Http1 | Sniffed::Http2)
            }
            _ => true,
        };
        if is_http {
            let stream = match take_records(shared, peer, stream) {
                Some(Moved::Rustls(rustls, _)) => Either::Left(rustls),
                Some(Moved::Kernel(kernel)) => Either::Right(Either::Left(KernelStream::new(kernel))),
                Some(Moved::User(records)) => Either::Right(Either::Right(Box::new(records))),
                None => return Ready::Done,
            };
            let peer = Peer { addr: peer, local, identity: principal, xfcc, sni };
            return Ready::Http(HttpConn::Mesh(stream), peer);
        }
    }
    let facts = ConnFacts {
        source_ip: peer.ip(),
        principal,
        destination_ip: local.ip(),
        port: port.port,
        sni,
        http: false,
    };
    open_to_app(shared, port, Downstream::Tls(stream), facts, peer, started).await
}

/// ALPNs by which a peer sidecar says the stream is HTTP.
const HTTP_ALPNS: &[&[u8]] = &[b"istio-h2", b"istio-http/1.1", b"istio-http/1.0", b"h2", b"http/1.1"];

/// Whether a plaintext connection on an HTTP-capable port is HTTP (declared, or sniffed).
async fn plaintext_is_http(shared: &Shared, port: &InboundPort, tcp: &TcpStream) -> bool {
    if port.protocol() != Protocol::Auto {
        return true;
    }
    match sniff::peek(tcp, shared.limits.detect_timeout).await {
        Sniffed::Http1 | Sniffed::Http2 => true,
        Sniffed::Other => false,
        Sniffed::Timeout => {
            shared.metrics.detect_timeouts.with_label_values(&["inbound"]).inc();
            false
        }
    }
}

/// A terminated mutual-TLS stream, with any bytes sniffed from it to replay.
type MeshStream = Box<Rewind<tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>>>;

/// The downstream leg: plaintext TCP (spliced to the app), or a terminated TLS stream (handed to
/// kernel TLS and spliced where the kernel takes it, else copied through keycard's record layer
/// or rustls).
enum Downstream {
    Plain(TcpStream),
    Tls(MeshStream),
}

/// An HTTP downstream connection: plaintext, or mutual TLS with rustls, the kernel's TLS or
/// keycard's own record layer.
enum HttpConn {
    Plain(TcpStream),
    Mesh(Either<MeshStream, Either<KernelStream, Box<RecordStream>>>),
}

/// Moves a handshaken mesh stream's records to the kernel or keycard's record layer, or leaves
/// them with rustls (reading ahead again, its sniffed bytes still to replay: the `Bytes` of
/// `Rustls` are empty), and counts the outcome; `None` where a hand-over failed half-way and the
/// connection is gone (logged as a refusal).
fn take_records(shared: &Shared, peer: SocketAddr, stream: MeshStream) -> Option<Moved<MeshStream>> {
    if !shared.may_take_records() {
        shared.count_no_offload(Direction::Inbound);
        return Some(Moved::Rustls(stream, bytes::Bytes::new()));
    }
    let (sniffed, tls) = stream.into_parts();
    Some(match shared.take_records(Direction::Inbound, peer, tls, sniffed)? {
        Moved::Kernel(kernel) => Moved::Kernel(kernel),
        Moved::User(records) => Moved::User(records),
        Moved::Rustls(mut tls, sniffed) => {
            tls.get_mut().0.read_ahead_again();
            Moved::Rustls(Box::new(Rewind::replaying(sniffed, tls)), bytes::Bytes::new())
        }
    })
}

/// Authorizes a connection and connects to the app: the connection to forward, or `Done` when
/// it was denied or the app could not be reached (logged and counted).
async fn open_to_app(
    shared: &Shared,
    port: &InboundPort,
    downstream: Downstream,
    facts: ConnFacts,
    peer: SocketAddr,
    started: Instant,
) -> Ready {
    let mtls = facts.principal.is_some();
    let decision = shared.authorize(&facts);
    let policy = match &decision {
        Ok(p) => p.policy_label(),
        Err(d) => d.policy_label(),
    };
    let labels = shared.tcp_labels(Direction::Inbound, facts.principal.as_ref(), Some(&shared.id), mtls);
    let event = access(shared, &facts, &policy, peer, port.app, port.port, started);
    shared.observed.decision(port.port, facts.principal.as_ref(), peer.ip(), None, decision.is_ok());
    if let Err(denied) = decision {
        shared.refuse_tcp(&with_flags(&labels, "RBAC"));
        event.log("deny", denied.reason(), "", 0, 0);
        return Ready::Done;
    }
    let app = match forward::connect(port.app, shared.limits.connect_timeout).await {
        Ok(s) => s,
        Err(_) => {
            shared.refuse_tcp(&with_flags(&labels, "UF"));
            event.log("allow", "app_unreachable", "", 0, 0);
            return Ready::Done;
        }
    };
    let legs = match downstream {
        Downstream::Plain(tcp) => Legs::Spliced(Leg::plain(tcp), Leg::plain(app)),
        Downstream::Tls(stream) => match take_records(shared, peer, stream) {
            Some(Moved::Kernel(kernel)) => Legs::Spliced(Leg::kernel_tls(kernel), Leg::plain(app)),
            Some(Moved::User(records)) => Legs::Copied(Either::Right(records), app),
            Some(Moved::Rustls(stream, _)) => Legs::Copied(Either::Left(stream), app),
            None => {
                shared.refuse_tcp(&labels);
                event.log("allow", end_reason(forward::End::Error), "", 0, 0);
                return Ready::Done;
            }
        },
    };
    let cancel = shared.drain.child_token();
    let facts = Arc::new(facts);
    let registration = shared.live.register(facts.clone(), cancel.clone());
    let counters = shared.open_tcp(&labels);
    let (app, port) = (port.app, port.port);
    Ready::App(ToApp { legs, facts, policy, peer, app, port, started, cancel, counters, registration })
}

/// A connection allowed to the app, its app leg open: all that its long life keeps.
struct ToApp {
    legs: Legs<Either<MeshStream, RecordStream>, TcpStream>,
    /// Shared with the live registry.
    facts: Arc<ConnFacts>,
    policy: String,
    peer: SocketAddr,
    app: SocketAddr,
    port: u16,
    started: Instant,
    cancel: CancellationToken,
    counters: TcpCounters,
    /// Dropped when the connection ends, which takes it out of the live registry.
    registration: Registration,
}

impl ToApp {
    /// An `async move` block, not an `async fn`, which would keep a second copy of `self`; the
    /// forwarding is made before it, so the block does not keep the legs too.
    fn forward(self, shared: Arc<Shared>) -> impl Future<Output = ()> + Send + 'static {
        let ToApp { legs, facts, policy, peer, app, port, started, cancel, counters, registration } = self;
        let forwarding = shared.forward(legs, cancel);
        async move {
            let totals = forwarding.await;
            counters.finish(totals.backward, totals.forward);
            let event = access(&shared, &facts, &policy, peer, app, port, started);
            event.log("allow", end_reason(totals.end), "", totals.backward, totals.forward);
            // Named so the block takes it: a block captures only what it uses, and a registration
            // it did not would be dropped (the connection unregistered) before the forwarding.
            drop(registration);
        }
    }
}

/// The access event of an inbound connection to the app at `app`, for workload port `port`.
fn access<'a>(
    shared: &'a Shared,
    facts: &'a ConnFacts,
    policy: &'a str,
    peer: SocketAddr,
    app: SocketAddr,
    port: u16,
    started: Instant,
) -> Access<'a> {
    Access {
        direction: Direction::Inbound,
        src_addr: peer,
        src_identity: facts.principal.as_ref(),
        dst_addr: app,
        dst_identity: Some(&shared.id),
        port,
        mtls: facts.principal.is_some(),
        policy,
        started,
    }
}

/// Decides for a connection's facts with the given policies (also used on reload).
pub fn decide(policies: &[&authz::AuthzPolicy], facts: &ConnFacts) -> authz::Decision {
    authz::evaluate(policies, &attributes(facts))
}

/// A TCP connection's attributes for the authorization engine.
pub fn attributes(facts: &ConnFacts) -> Attributes<'_> {
    Attributes {
        source_ip: facts.source_ip,
        source_principal: facts.principal.as_ref(),
        destination_ip: facts.destination_ip,
        destination_port: facts.port,
        sni: facts.sni.as_deref(),
        http: None,
    }
}
