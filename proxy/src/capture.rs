//! Transparent interception: connections that `keycard iptables` REDIRECTs arrive on the two
//! capture listeners, and the kernel's record of where they were going (`SO_ORIGINAL_DST`)
//! decides what they are. Inbound, the original port picks the inbound port; outbound, the
//! original address picks the upstream. The app changes nothing.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use keycard_config::sidecar::{InboundPort, OutboundPolicy};
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::access::{Access, end_reason};
use crate::forward::{self, ConnectError, Leg};
use crate::inbound::PortHandler;
use crate::outbound::UpstreamHandler;
use crate::sidecar::{Direction, Serving, Shared};

/// Where a redirected connection was going, as netfilter's connection tracking recorded it.
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    if tcp.local_addr()?.is_ipv4() {
        let sin = getsockopt(tcp, sockopt::OriginalDst)?;
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
    } else {
        let sin6 = getsockopt(tcp, sockopt::Ip6tOriginalDst)?;
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, sin6.sin6_scope_id)))
    }
}

/// The original destination of a connection that really was redirected; `None` for one that
/// dialled the capture port itself (serving it would loop back here).
fn redirected(
    shared: &Shared,
    tcp: &TcpStream,
    peer: SocketAddr,
    direction: Direction,
) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    match original_dst(tcp) {
        Ok(dst) if dst != local => Some(dst),
        Ok(_) | Err(_) => {
            let detail = format!("connection to the capture port {local} itself, not redirected");
            shared.handshake_failed(direction, peer, "not_redirected", &detail);
            None
        }
    }
}

/// Inbound: configured ports by service port; others made on first use (app at the original
/// destination, protocol detected) and kept.
pub async fn serve_inbound(
    shared: Arc<Shared>,
    ports: Vec<Arc<PortHandler>>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let known: HashMap<u16, Arc<PortHandler>> = ports.into_iter().map(|p| (p.port().port, p)).collect();
    let made: Arc<Mutex<HashMap<u16, Arc<PortHandler>>>> = Arc::default();
    let known = Arc::new(known);
    crate::sidecar::accept_loop(shared.clone(), listener, stop, move |tcp, peer| {
        let (shared, known, made) = (shared.clone(), known.clone(), made.clone());
        async move {
            let dst = redirected(&shared, &tcp, peer, Direction::Inbound)?;
            let handler = match known.get(&dst.port()) {
                Some(h) => h.clone(),
                None => {
                    let mut made = made.lock().ok()?;
                    made.entry(dst.port())
                        .or_insert_with(|| {
                            let port = InboundPort {
                                port: dst.port(),
                                listen: None,
                                app: dst,
                                name: None,
                                protocol: None,
                            };
                            PortHandler::new(&shared, port)
                        })
                        .clone()
                }
            };
            handler.set_up(&shared, tcp, peer, dst).await
        }
    })
    .await;
}

/// Outbound: the upstream whose `remote` is the original destination; anything else is
/// forwarded as plain TCP (`allow_any`) or refused (`registry_only`).
pub async fn serve_outbound(
    shared: Arc<Shared>,
    upstreams: Vec<Arc<UpstreamHandler>>,
    policy: OutboundPolicy,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let by_dst: Arc<HashMap<SocketAddr, Arc<UpstreamHandler>>> =
        Arc::new(upstreams.into_iter().map(|u| (u.upstream().remote, u)).collect());
    crate::sidecar::accept_loop(shared.clone(), listener, stop, move |tcp, peer| {
        let (shared, by_dst) = (shared.clone(), by_dst.clone());
        async move {
            let dst = redirected(&shared, &tcp, peer, Direction::Outbound)?;
            match (by_dst.get(&dst), policy) {
                (Some(up), _) => up.set_up(&shared, tcp, peer).await,
                (None, OutboundPolicy::AllowAny) => passthrough(&shared, tcp, peer, dst).await,
                (None, OutboundPolicy::RegistryOnly) => {
                    let detail = format!("{dst} is no configured upstream (outbound_policy: registry_only)");
                    shared.handshake_failed(Direction::Outbound, peer, "no_route", &detail);
                    None
                }
            }
        }
    })
    .await;
}

/// Istio's PassthroughCluster: bytes to the original destination, no TLS, logged and counted.
async fn passthrough(
    shared: &Arc<Shared>,
    app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Option<Serving> {
    let event = passthrough_event(shared, peer, dst, Instant::now());
    let _ = app.set_nodelay(true);
    let remote = match forward::connect(dst, shared.limits.connect_timeout).await {
        Ok(s) => s,
        Err(ConnectError::Failed(e)) => {
            event.log("fail", "connect_failed", &e.to_string(), 0, 0);
            return None;
        }
        Err(ConnectError::TimedOut) => {
            event.log("fail", "connect_timeout", "", 0, 0);
            return None;
        }
    };
    let labels = shared.tcp_labels(Direction::Outbound, Some(&shared.id), None, false);
    let counters = shared.open_tcp(&labels);
    let legs: forward::Legs<TcpStream, TcpStream> =
        forward::Legs::Spliced(Leg::plain(app), Leg::plain(remote));
    let (shared, started) = (shared.clone(), event.started);
    let forwarding = shared.forward(legs, shared.drain.clone());
    Some(Box::pin(async move {
        let t = forwarding.await;
        counters.finish(t.backward, t.forward);
        passthrough_event(&shared, peer, dst, started).log(
            "allow",
            end_reason(t.end),
            "",
            t.backward,
            t.forward,
        );
    }))
}

fn passthrough_event(shared: &Shared, peer: SocketAddr, dst: SocketAddr, started: Instant) -> Access<'_> {
    Access {
        direction: Direction::Outbound,
        src_addr: peer,
        src_identity: Some(&shared.id),
        dst_addr: dst,
        dst_identity: None,
        port: dst.port(),
        mtls: false,
        policy: "passthrough",
        started,
    }
}
