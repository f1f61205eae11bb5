//! The sidecar's HTTP endpoints: admin (`/config_dump`, `/certs`, `/debug/handshake_failures`,
//! `/debug/plaintext_sources`, `/logging`), metrics (`/stats/prometheus`, `/metrics`) and readiness
//! (`/healthz/ready`: 200 only with a certificate and policy loaded).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use keycard_config::certinfo;
use keycard_config::sidecar::SidecarConfig;
use prometheus::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::sidecar::{PolicyStatus, Shared};

/// Reads (`None`) or sets (`Some(filter)`) the log filter; returns the filter in force.
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub enum Port {
    Admin,
    Metrics,
    Readiness,
}

pub struct View {
    pub cfg: SidecarConfig,
    pub shared: Arc<Shared>,
    pub registry: Registry,
    pub status: Arc<Mutex<PolicyStatus>>,
    pub log_control: Option<LogControl>,
    /// Each upstream's route in force, in `cfg.outbound`'s order.
    pub routes: Vec<tokio::sync::watch::Receiver<Arc<crate::outbound::Route>>>,
}

pub async fn serve(listener: TcpListener, view: Arc<View>, port: Port, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let view = view.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let view = view.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&view, port, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn route(view: &View, port: Port, req: &Request<Incoming>) -> Reply {
    let path = req.uri().path();
    match (port, req.method(), path) {
        (Port::Metrics, &Method::GET, "/stats/prometheus" | "/metrics") => {
            text(StatusCode::OK, crate::metrics::encode(&view.registry))
        }
        (Port::Readiness, &Method::GET, "/healthz/ready") => {
            if view.shared.tls.borrow().is_some() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n".into())
            }
        }
        (Port::Admin, &Method::GET, "/config_dump") => json_reply(config_dump(view)),
        (Port::Admin, &Method::GET, "/certs") => json_reply(certs(view)),
        (Port::Admin, &Method::GET, "/debug/handshake_failures") => json_reply(json!(view.shared.failures())),
        (Port::Admin, &Method::GET, "/debug/plaintext_sources") => {
            json_reply(json!(view.shared.census_snapshot()))
        }
        (Port::Admin, &Method::GET, "/debug/traffic") => json_reply(json!(view.shared.observed.snapshot())),
        (Port::Admin, m, "/logging") if m == Method::GET || m == Method::POST => logging(view, req),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n")),
    }
}

fn config_dump(view: &View) -> serde_json::Value {
    let policy = view.shared.policy.borrow().clone();
    let ports: Vec<_> = view
        .cfg
        .inbound
        .iter()
        .map(|p| {
            let m = policy.peer_auth.mode_for(p.port);
            json!({"port": p.port, "listen": p.listen, "app": p.app, "protocol": p.protocol, "mtls_mode": m.mode, "mode_source": m.source})
        })
        .collect();
    let status = view.status.lock().map(|s| s.clone()).unwrap_or_default();
    json!({
        "workload": {"spiffe_id": view.shared.id, "namespace": view.cfg.workload.namespace, "labels": view.cfg.workload.labels},
        "inbound": ports,
        "outbound": view.cfg.outbound,
        "routes": view
            .cfg
            .outbound
            .iter()
            .zip(&view.routes)
            .map(|(up, route)| route.borrow().describe(up, &view.shared))
            .collect::<Vec<_>>(),
        "peer_authentication": policy.peer_auth,
        "authorization_policies": policy.authz,
        "policy": status,
        "live_connections": view.shared.live.len(),
        "kernel_tls": match &view.shared.kernel_tls {
            Ok(k) => json!({"used": true, "suites": k.describe()}),
            Err(why) => json!({"used": false, "why": why.as_str()}),
        },
        // Mesh connections the kernel does not take go to keycard's record layer (`records`).
        "user_records": view.shared.user_records,
    })
}

fn certs(view: &View) -> serde_json::Value {
    let now = time::OffsetDateTime::now_utc();
    match view.shared.tls.borrow().clone() {
        None => json!({"loaded": false}),
        Some(t) => json!({
            "loaded": true,
            "spiffe_id": t.id,
            "expires_in_seconds": t.expires_in(now.unix_timestamp()),
            "renews_in_seconds": match t.renew_at.load(std::sync::atomic::Ordering::Relaxed) {
                0 => None,
                at => Some(at - now.unix_timestamp()),
            },
            "chain": certinfo::describe_all(&t.chain, now).unwrap_or_default(),
            "trust_bundle": certinfo::describe_all(t.bundle.roots(), now).unwrap_or_default(),
            // Certificates only: the key never leaves the sidecar's memory.
            "chain_pem": keycard_config::pem::certs_to_pem(&t.chain),
            "trust_bundle_pem": keycard_config::pem::certs_to_pem(t.bundle.roots()),
        }),
    }
}

fn logging(view: &View, req: &Request<Incoming>) -> Reply {
    let Some(control) = &view.log_control else {
        return text(StatusCode::NOT_IMPLEMENTED, "log level control is not wired in this process\n".into());
    };
    let level = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
    let result = if req.method() == Method::POST { control(level) } else { control(None) };
    match result {
        Ok(filter) => text(StatusCode::OK, format!("{filter}\n")),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

fn json_reply(v: serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_string_pretty(&v).unwrap_or_default())));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
