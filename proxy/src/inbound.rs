//! One inbound connection, top to bottom: accept → mode for the port → (detect) → mutual TLS →
//! peer SPIFFE ID → authorization → connect to the app → forward → one access event and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use keycard_config::policy::authz::{self, Attributes};
use keycard_config::policy::model::MtlsMode;
use keycard_config::sidecar::InboundPort;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, end_reason};
use crate::conns::ConnFacts;
use crate::detect::{self, Detected};
use crate::forward;
use crate::metrics::with_flags;
use crate::sidecar::{Direction, Shared};
use crate::tls::{MESH_ALPNS, peer_identity};

pub async fn serve(shared: Arc<Shared>, port: InboundPort, listener: TcpListener, stop: CancellationToken) {
    let port = Arc::new(port);
    crate::sidecar::accept_loop(shared.clone(), listener, stop, move |tcp, peer| {
        let (shared, port) = (shared.clone(), port.clone());
        async move { handle(&shared, &port, tcp, peer).await }
    })
    .await;
}

async fn handle(shared: &Shared, port: &InboundPort, tcp: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(port.listen);
    let policy = shared.policy.borrow().clone();
    let mode = policy.peer_auth.mode_for(port.port);
    let limits = &shared.limits;
    let detected = match mode.mode {
        MtlsMode::Disable => Detected::Plaintext,
        _ => detect::detect(&tcp, limits.detect_timeout).await,
    };
    let terminate = match (mode.mode, detected) {
        (MtlsMode::Disable, _) => false,
        (_, Detected::Nothing) => {
            shared.handshake_failed(
                Direction::Inbound,
                peer,
                "timeout",
                "no bytes before the detection deadline",
            );
            return;
        }
        (MtlsMode::Strict, Detected::Plaintext) => {
            shared.handshake_failed(
                Direction::Inbound,
                peer,
                "plaintext_in_strict",
                "plaintext on a STRICT port",
            );
            return;
        }
        (MtlsMode::Strict, Detected::Tls(_)) => true,
        // PERMISSIVE: only mesh TLS (by ALPN) is ours to terminate; the rest goes to the app as is.
        (_, Detected::Tls(hello)) => hello.alpn.iter().any(|a| MESH_ALPNS.contains(&a.as_slice())),
        (_, Detected::Plaintext) => false,
    };
    if !terminate {
        shared.metrics.plaintext.with_label_values(&[&port.port.to_string()]).inc();
        shared.census(peer);
        let facts = ConnFacts {
            source_ip: peer.ip(),
            principal: None,
            destination_ip: local.ip(),
            port: port.port,
            sni: None,
        };
        proxy_to_app(shared, port, Downstream::<TcpStream>::Plain(tcp), facts, peer, started).await;
        return;
    }
    let Some(tls) = shared.tls.borrow().clone() else {
        shared.handshake_failed(
            Direction::Inbound,
            peer,
            "no_certificate_loaded",
            "this sidecar has no certificate yet",
        );
        return;
    };
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let (reason, detail) = crate::sidecar::classify_tls_error(&e);
            shared.handshake_failed(Direction::Inbound, peer, reason, &detail);
            return;
        }
        Err(_) => {
            shared.handshake_failed(
                Direction::Inbound,
                peer,
                "timeout",
                "the TLS handshake did not finish in time",
            );
            return;
        }
    };
    let (_, conn) = stream.get_ref();
    let principal = peer_identity(conn.peer_certificates());
    let sni = conn.server_name().map(str::to_owned);
    let facts =
        ConnFacts { source_ip: peer.ip(), principal, destination_ip: local.ip(), port: port.port, sni };
    proxy_to_app(shared, port, Downstream::Tls(stream), facts, peer, started).await;
}

/// The downstream leg: plaintext TCP (spliced to the app) or a terminated TLS stream (copied).
enum Downstream<S> {
    Plain(TcpStream),
    Tls(S),
}

async fn proxy_to_app<S>(
    shared: &Shared,
    port: &InboundPort,
    downstream: Downstream<S>,
    facts: ConnFacts,
    peer: SocketAddr,
    started: Instant,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mtls = facts.principal.is_some();
    let decision = shared.authorize(&facts);
    let policy_label = match &decision {
        Ok(p) => p.policy_label(),
        Err(d) => d.policy_label(),
    };
    let labels = shared.tcp_labels(Direction::Inbound, facts.principal.as_ref(), Some(&shared.id), mtls);
    let event = Access {
        direction: Direction::Inbound,
        src_addr: peer,
        src_identity: facts.principal.as_ref(),
        dst_addr: port.app,
        dst_identity: Some(&shared.id),
        mtls,
        policy: &policy_label,
        started,
    };
    if let Err(denied) = decision {
        shared.record_tcp(&with_flags(&labels, "RBAC"), true);
        event.log("deny", denied.reason(), "", 0, 0);
        return;
    }
    let app = match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(port.app)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => {
            shared.record_tcp(&with_flags(&labels, "UF"), true);
            event.log("allow", "app_unreachable", "", 0, 0);
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let cancel = shared.drain.child_token();
    let _registration = shared.live.register(facts.clone(), cancel.clone());
    shared.record_tcp(&labels, false);
    shared.metrics.active.inc();
    let idle = shared.limits.idle_timeout;
    let totals = match downstream {
        Downstream::Plain(tcp) => forward::splice_pipe(tcp, app, idle, cancel).await,
        Downstream::Tls(tls) => forward::pipe(tls, app, idle, cancel).await,
    };
    shared.metrics.active.dec();
    shared.finish_tcp(&labels, totals.backward, totals.forward);
    event.log("allow", end_reason(totals.end), "", totals.backward, totals.forward);
}

/// Decides for a connection's facts with the given policies (also used on reload).
pub fn decide(policies: &[&authz::AuthzPolicy], facts: &ConnFacts) -> authz::Decision {
    authz::evaluate(
        policies,
        &Attributes {
            source_ip: facts.source_ip,
            source_principal: facts.principal.as_ref(),
            destination_ip: facts.destination_ip,
            destination_port: facts.port,
            sni: facts.sni.as_deref(),
            http: None,
        },
    )
}
