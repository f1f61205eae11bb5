//! Outbound HTTP: the app's HTTP/1.1 or h2c requests, carried to the remote sidecar over pooled
//! mutual-TLS connections (`http::pool`: HTTP/1.1 as HTTP/1.1, HTTP/2 multiplexed; upgrades over a
//! dedicated HTTP/1.1 connection).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keycard_config::sidecar::Upstream;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::body::{self, Body, Counted};
use super::headers::{self, DOWNSTREAM_PROTOCOL, XFCC};
use super::idle::SendError;
use super::pool::{ALPN_H1, Pool};
use super::{Exchange, RequestMetrics, Verdict, bridge, local, respond, smuggling_counter};
use crate::outbound::{ConfigCache, DialError, Route, dial};
use crate::sidecar::{Direction, Shared};

pub struct OutboundHttp {
    shared: Arc<Shared>,
    up: Upstream,
    route: watch::Receiver<Arc<Route>>,
    pool: Pool,
    upgrade_tls: ConfigCache,
    server: Arc<super::server::Server>,
    metrics: Arc<RequestMetrics>,
    connections: prometheus::IntCounter,
}

impl OutboundHttp {
    pub fn new(shared: Arc<Shared>, up: Upstream, route: watch::Receiver<Arc<Route>>) -> Arc<Self> {
        let s = &shared.http;
        let idle = shared.limits.idle_timeout;
        let pool = Pool::new(up.remote, s.pool_max_connections, s.pool_streams_per_connection, idle);
        let server = super::server::builder(s, smuggling_counter(&shared, "outbound"));
        let (metrics, upgrade_tls) = (Arc::default(), ConfigCache::new(ALPN_H1));
        let connections = shared.metrics.http_connections.with_label_values(&["outbound"]);
        Arc::new(Self { shared, up, route, pool, upgrade_tls, server, metrics, connections })
    }

    /// Serves one app connection.
    pub fn serve_conn(
        self: &Arc<Self>,
        app: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = app.set_nodelay(true);
        self.connections.inc();
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.request(req, peer).await) }
        });
        // A clone of the drain, not a child: nothing else cancels an outbound connection, and a
        // child costs an allocation and a lock on the drain per connection.
        let kill = self.shared.drain.clone();
        let (idle, stopping) = (self.shared.limits.idle_timeout, self.shared.stopping.clone());
        let serving = super::server::serve(self.server.clone(), app, svc, idle, stopping, kill);
        super::server::ServeConn::new(serving, ())
    }

    async fn request(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let shared = &self.shared;
        let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let downstream_version = parts.version;
        let authority = Some(super::authority_of(&parts))
            .filter(|a| !a.is_empty())
            .or_else(|| self.up.host.clone())
            .unwrap_or_else(|| self.up.remote.to_string());
        let mut ex = Exchange {
            src_identity: Some(shared.id.clone()),
            mtls: true,
            ..Exchange::start(Direction::Outbound, peer, self.up.remote, &parts, &authority, &self.metrics)
        };
        ex.request_id = headers::ensure_request_id(&mut parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        // An app cannot assert a client certificate; the inbound sidecar sets XFCC.
        parts.headers.remove(XFCC);
        let proto = if downstream_version == Version::HTTP_2 { "h2" } else { "h1" };
        parts.headers.insert(DOWNSTREAM_PROTOCOL, HeaderValue::from_static(proto));
        // The request's own path and query, kept as hyper parsed them, under `http://authority`.
        let mut target = std::mem::take(&mut parts.uri).into_parts();
        target.scheme = Some(Scheme::HTTP);
        target.authority = Authority::try_from(authority.as_str()).ok();
        if target.path_and_query.is_none() {
            target.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        parts.uri = match (target.authority.is_some(), Uri::from_parts(target)) {
            (true, Ok(u)) => u,
            _ => return local(shared, ex, StatusCode::BAD_REQUEST, "bad request target\n", BAD, &[]),
        };
        let route = self.route.borrow().clone();
        let body = body::boxed(Counted::new(body, ex.request_bytes.clone()));
        if let Some(on_upgrade) = on_upgrade {
            return self.upgrade(Request::from_parts(parts, body), on_upgrade, ex, &route, &authority).await;
        }
        // HTTP/2 requests, all of them where the route upgrades (the DestinationRule's
        // `h2UpgradePolicy`, else `http.h2_upgrade`), and HTTP/1.1 ones past the pool's HTTP/1.1
        // places share the HTTP/2 connections.
        let h1_slot = (downstream_version != Version::HTTP_2 && !route.h2_upgrade(shared))
            .then(|| self.pool.h1_slot())
            .flatten();
        let Some(h1_slot) = h1_slot else {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            let lease = match self.pool.lease(shared, &route).await {
                Ok(l) => l,
                Err(e) => return unavailable(shared, ex, &e),
            };
            ex.dst_identity = lease.peer().cloned();
            let sent = lease.send(Request::from_parts(parts, body));
            let result = super::within(shared.http.request_timeout, sent).await;
            return self.answer(ex, downstream_version, result.map(|r| r.map(|resp| (resp, lease))));
        };
        // HTTP/1.1 as the app sent it: the authority in `Host`, only the path on the request line.
        match HeaderValue::from_str(&authority) {
            Ok(host) => parts.headers.insert(header::HOST, host),
            Err(_) => return local(shared, ex, StatusCode::BAD_REQUEST, "bad request target\n", BAD, &[]),
        };
        parts.uri =
            parts.uri.path_and_query().cloned().map(Uri::from).unwrap_or_else(|| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        let sent = self.pool.send_h1(shared, &route, Request::from_parts(parts, body));
        let result = match super::within(shared.http.request_timeout, sent).await {
            Some(Err(SendError::Connect(e))) => return unavailable(shared, ex, &e),
            Some(Ok((resp, lease))) => {
                ex.dst_identity = lease.meta().and_then(|c| c.peer.clone());
                Some(Ok((resp, (lease, h1_slot))))
            }
            Some(Err(SendError::Http(e))) => Some(Err(e)),
            None => None,
        };
        self.answer(ex, downstream_version, result)
    }

    /// The response to the app: the remote's (its lease kept until its body ends), a 504 past the
    /// request deadline (`None`), or a 503 where the request failed on its connection.
    fn answer(
        &self,
        ex: Exchange,
        downstream_version: Version,
        result: Option<Result<(Response<Incoming>, impl Send + 'static), hyper::Error>>,
    ) -> Response<Body> {
        let shared = &self.shared;
        let Some(result) = result else {
            return local(
                shared,
                ex,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout\n",
                TIMEOUT,
                &[],
            );
        };
        match result {
            Ok((mut resp, lease)) => {
                headers::strip_hop_by_hop(resp.headers_mut(), false);
                *resp.version_mut() = downstream_version;
                respond(shared, ex, Verdict::FORWARDED, resp, lease)
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream request failed");
                local(shared, ex, StatusCode::SERVICE_UNAVAILABLE, RESET_TEXT, RESET, &[])
            }
        }
    }

    /// An HTTP/1.1 upgrade (WebSocket): a dedicated mutual-TLS HTTP/1.1 connection; once both
    /// sides switch, bytes are bridged.
    async fn upgrade(
        &self,
        mut req: Request<Body>,
        downstream: hyper::upgrade::OnUpgrade,
        mut ex: Exchange,
        route: &Route,
        authority: &str,
    ) -> Response<Body> {
        let shared = &self.shared;
        let (stream, peer) = match dial(shared, self.up.remote, route, &self.upgrade_tls).await {
            Ok(x) => x,
            Err(e) => return unavailable(shared, ex, &e),
        };
        ex.dst_identity = peer;
        let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
            return local(shared, ex, StatusCode::SERVICE_UNAVAILABLE, RESET_TEXT, RESET, &[]);
        };
        shared.tracker.spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        *req.version_mut() = Version::HTTP_11;
        if let Ok(v) = HeaderValue::from_str(authority) {
            req.headers_mut().insert(header::HOST, v);
        }
        match send.send_request(req).await {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    bridge(shared, downstream, hyper::upgrade::on(&mut resp));
                }
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                headers::strip_hop_by_hop(resp.headers_mut(), switching);
                respond(shared, ex, Verdict::FORWARDED, resp, ())
            }
            Err(_) => local(shared, ex, StatusCode::SERVICE_UNAVAILABLE, RESET_TEXT, RESET, &[]),
        }
    }
}

const BAD: Verdict = Verdict { decision: "deny", reason: "bad_request", flags: "-" };
const TIMEOUT: Verdict = Verdict { decision: "allow", reason: "upstream_timeout", flags: "UT" };
const RESET: Verdict = Verdict { decision: "allow", reason: "upstream_reset", flags: "UR" };
const RESET_TEXT: &str = "upstream connect error or disconnect/reset before headers\n";

/// 503 for a remote sidecar that could not be reached or did not pass mutual TLS.
fn unavailable(shared: &Arc<Shared>, ex: Exchange, e: &DialError) -> Response<Body> {
    tracing::debug!(error = %e, "cannot reach the upstream sidecar");
    let verdict = Verdict { decision: "allow", reason: e.reason(), flags: "UF" };
    local(shared, ex, StatusCode::SERVICE_UNAVAILABLE, RESET_TEXT, verdict, &[])
}
