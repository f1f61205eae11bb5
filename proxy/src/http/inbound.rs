//! Inbound HTTP: per request, path normalisation, JWT authentication, authorization with the
//! full operation set, then forwarding to the app over a pooled connection in the protocol the
//! port declares (or, on `auto` ports, the one the calling app used), with XFCC set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use keycard_config::SpiffeId;
use keycard_config::http::normalize_path;
use keycard_config::policy::authz::{Attributes, HttpAttributes};
use keycard_config::sidecar::{InboundPort, Protocol};
use tokio::io::{AsyncRead, AsyncWrite};

use super::app::AppPool;
use super::body::{self, Body, Counted};
use super::headers::{self, DENIED_BY, DOWNSTREAM_PROTOCOL};
use super::{Exchange, RequestMetrics, Verdict, bridge, local, respond, smuggling_counter};
use crate::conns::ConnFacts;
use crate::sidecar::{Direction, Shared};

/// Who is on the other end of one downstream connection.
pub struct Peer {
    pub addr: SocketAddr,
    pub local: SocketAddr,
    /// The verified SPIFFE ID of a mutual-TLS peer.
    pub identity: Option<SpiffeId>,
    /// This hop's XFCC element (mutual-TLS peers only).
    pub xfcc: Option<http::HeaderValue>,
    pub sni: Option<String>,
}

/// One inbound port's HTTP handling, shared by its connections (so app connections are pooled
/// across them).
pub struct InboundHttp {
    shared: Arc<Shared>,
    port: Arc<InboundPort>,
    server: Arc<super::server::Server>,
    app: Arc<AppPool>,
    metrics: Arc<RequestMetrics>,
    connections: prometheus::IntCounter,
}

impl InboundHttp {
    pub fn new(shared: Arc<Shared>, port: Arc<InboundPort>) -> Arc<Self> {
        let app = AppPool::new(port.app, shared.limits.connect_timeout, APP_IDLE_TIMEOUT);
        let server = super::server::builder(&shared.http, smuggling_counter(&shared, "inbound"));
        let metrics = Arc::default();
        let connections = shared.metrics.http_connections.with_label_values(&["inbound"]);
        Arc::new(Self { app, server, shared, port, metrics, connections })
    }

    /// Serves one downstream connection (already past mutual TLS and the mode check).
    pub fn serve_conn<I>(self: &Arc<Self>, io: I, peer: Peer) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + super::server::Readiness + Unpin + Send + Sync + 'static,
    {
        let shared = &self.shared;
        self.connections.inc();
        let kill = shared.drain.child_token();
        let facts = ConnFacts {
            source_ip: peer.addr.ip(),
            principal: peer.identity.clone(),
            destination_ip: peer.local.ip(),
            port: self.port.port,
            sni: peer.sni.clone(),
            http: true,
        };
        let registration = shared.live.register(Arc::new(facts), kill.clone());
        let (this, peer) = (self.clone(), Arc::new(peer));
        // Each request's future is boxed where it is made: hyper keeps an HTTP/2 request's
        // future in the task it spawns for the stream, and a future is moved whole, at its
        // largest state's size, each time it changes hands on the way there.
        let svc = service_fn(move |req| {
            let (this, peer) = (this.clone(), peer.clone());
            Box::pin(async move { Ok::<_, Infallible>(this.request(req, &peer).await) })
        });
        let (idle, stopping) = (shared.limits.idle_timeout, shared.stopping.clone());
        let serving = super::server::serve(self.server.clone(), io, svc, idle, stopping, kill);
        // Registered until the connection ends: a policy reload that denies it cancels `kill`.
        super::server::ServeConn::new(serving, registration)
    }

    async fn request(&self, mut req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let shared = &self.shared;
        let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let authority = super::authority_of(&parts);
        let mut ex = Exchange {
            src_identity: peer.identity.clone(),
            dst_identity: Some(shared.id.clone()),
            port: self.port.port,
            mtls: peer.identity.is_some(),
            ..Exchange::start(Direction::Inbound, peer.addr, self.port.app, &parts, &authority, &self.metrics)
        };
        // Only a mutual-TLS peer (a sidecar) may say what protocol its app used.
        let sent_as = parts.headers.remove(DOWNSTREAM_PROTOCOL).filter(|_| peer.identity.is_some());
        ex.request_id = headers::ensure_request_id(&mut parts.headers);
        let path = match normalize_path(parts.uri.path(), shared.http.path_normalization) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "request path refused");
                return local(shared, ex, StatusCode::BAD_REQUEST, "Bad Request\n", BAD_PATH, &[]);
            }
        };
        ex.path.clone_from(&path);
        let policy = shared.policy.borrow().clone();
        let jwt = match super::authn::authenticate(&policy.jwt_rules, &mut parts, &shared.jwks).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(reason = e.reason, detail = %e.detail, "JWT refused");
                let verdict = Verdict { decision: "deny", reason: e.reason, flags: "-" };
                let challenge = (
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"keycard\", error=\"invalid_token\"".to_owned(),
                );
                return local(
                    shared,
                    ex,
                    StatusCode::UNAUTHORIZED,
                    "Jwt verification fails",
                    verdict,
                    &[challenge],
                );
            }
        };
        let (request_principal, claims) = jwt.map(|v| (Some(v.principal), v.claims)).unwrap_or_default();
        let attrs = HttpAttributes {
            host: authority.to_ascii_lowercase(),
            method: parts.method.to_string(),
            path: path.clone(),
            request_principal,
            headers: if policy.reads_request_headers() {
                headers::for_policy(&parts.headers)
            } else {
                Default::default()
            },
            claims,
        };
        let decision = shared.authorize_attrs(&Attributes {
            source_ip: peer.addr.ip(),
            source_principal: peer.identity.as_ref(),
            destination_ip: peer.local.ip(),
            destination_port: self.port.port,
            sni: peer.sni.as_deref(),
            http: Some(&attrs),
        });
        match decision {
            Ok(permit) => ex.policy = permit.policy_label(),
            Err(denied) => {
                ex.policy = denied.policy_label();
                let verdict = Verdict { decision: "deny", reason: denied.reason(), flags: "RBAC" };
                let by = (DENIED_BY, ex.policy.clone());
                return local(shared, ex, StatusCode::FORBIDDEN, "RBAC: access denied", verdict, &[by]);
            }
        }
        let h2 = match self.port.protocol() {
            Protocol::Http2 | Protocol::Grpc => true,
            Protocol::Http => false,
            _ => match sent_as {
                Some(v) => v == "h2",
                None => parts.version == Version::HTTP_2,
            },
        };
        let downstream_version = parts.version;
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        headers::set_xfcc(&mut parts.headers, peer.xfcc.as_ref());
        let target = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let host = if authority.is_empty() { self.port.app.to_string() } else { authority };
        let to_h2 = h2 && !upgrade;
        // HTTP/2 carries the authority in the request itself (`:authority`); HTTP/1.1 in `Host`,
        // with only the path on the request line.
        let uri = if to_h2 {
            format!("http://{host}{target}").parse::<Uri>().ok()
        } else {
            host.parse::<Authority>().ok().and_then(|_| target.parse::<Uri>().ok())
        };
        let Some(uri) = uri else {
            return local(shared, ex, StatusCode::BAD_REQUEST, "Bad Request\n", BAD_PATH, &[]);
        };
        parts.uri = uri;
        if to_h2 {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        } else {
            parts.version = Version::HTTP_11;
            if let Ok(v) = HeaderValue::from_str(&host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let req = Request::from_parts(parts, body::boxed(Counted::new(body, ex.request_bytes.clone())));
        let sent = async {
            if to_h2 {
                self.app.send_h2(req).await.map(|resp| (resp, None))
            } else {
                self.app.send_h1(req).await.map(|(resp, lease)| (resp, Some(lease)))
            }
        };
        let timeout = shared.http.request_timeout;
        let result = if timeout.is_zero() {
            sent.await
        } else {
            match tokio::time::timeout(timeout, sent).await {
                Ok(r) => r,
                Err(_) => {
                    let v = Verdict { decision: "allow", reason: "upstream_timeout", flags: "UT" };
                    return local(
                        shared,
                        ex,
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout\n",
                        v,
                        &[],
                    );
                }
            }
        };
        match result {
            Ok((mut resp, lease)) => {
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if switching && let Some(downstream) = on_upgrade {
                    bridge(shared, downstream, hyper::upgrade::on(&mut resp));
                }
                headers::strip_hop_by_hop(resp.headers_mut(), switching);
                *resp.version_mut() = downstream_version;
                // The app connection returns to the pool once the response body has gone.
                respond(shared, ex, Verdict::FORWARDED, resp, lease)
            }
            Err(e) => {
                let flags = if e.is_connect() { "UF" } else { "UC" };
                tracing::debug!(error = %e, "app request failed");
                let v = Verdict { decision: "allow", reason: "app_unreachable", flags };
                let text = "upstream connect error or disconnect/reset before headers\n";
                local(shared, ex, StatusCode::SERVICE_UNAVAILABLE, text, v, &[])
            }
        }
    }
}

/// How long an unused HTTP/1.1 connection to the app is kept.
const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

const BAD_PATH: Verdict = Verdict { decision: "deny", reason: "bad_request", flags: "-" };
