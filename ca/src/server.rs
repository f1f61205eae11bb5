//! `keycard ca serve`: the CA's HTTPS API (TLS 1.3 only). See `keycard_config::ca_api` for the
//! wire format.
//!
//! Every connection has a handshake deadline, every request a header deadline, a whole-request
//! deadline and a body size limit; the number of connections is capped. The CA presents its own
//! SVID (`spiffe://<td>/ns/keycard-system/sa/keycard-ca`, plus DNS/IP names for plain HTTPS
//! clients), reissued from its intermediate at half life.

use std::future::Future;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use keycard_config::ca_api::{self, ErrorBody, SignRequest, SignResponse};
use keycard_config::certinfo::rfc3339;
use keycard_config::pem::certs_to_pem;
use keycard_config::tls::SvidClientVerifier;
use keycard_config::{SpiffeId, svid};
use prometheus::Registry;
use rcgen::KeyPair;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::authority::CsrError;
use crate::k8s::ServiceAccountTokens;
use crate::metrics::{self, CaMetrics};
use crate::profile::ExtraNames;
use crate::store::LoadedCa;
use crate::token::TokenError;

/// Settings of `ca serve`. Durations are wall-clock.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Lifetime of a leaf when the request names none. Default 24 h.
    pub default_ttl: Duration,
    /// The longest lifetime a caller may ask for; longer requests are cut to it. Default 24 h.
    pub max_ttl: Duration,
    /// Names for the CA's own server certificate besides its SPIFFE ID.
    pub server_names: ExtraNames,
    /// TLS handshake deadline, absolute. Default 10 s.
    pub handshake_timeout: std::time::Duration,
    /// Deadline for a whole request, body included. Default 10 s.
    pub request_timeout: std::time::Duration,
    /// Connections served at once; more are closed at accept. Default 1024.
    pub max_connections: usize,
    /// Also accept Kubernetes service-account tokens (a pod's projected token) as bootstrap
    /// credentials. Default: none, only the CA's own bootstrap tokens.
    pub kubernetes: Option<Arc<ServiceAccountTokens>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            default_ttl: Duration::hours(24),
            max_ttl: Duration::hours(24),
            server_names: ExtraNames { dns: vec!["localhost".into()], ips: Vec::new() },
            handshake_timeout: std::time::Duration::from_secs(10),
            request_timeout: std::time::Duration::from_secs(10),
            max_connections: 1024,
            kubernetes: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("cannot issue the CA's own server certificate: {0}")]
    ServerCert(String),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}

/// Why a request was refused: the `reason` label and the `error` field of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    MissingCredentials,
    InvalidToken,
    ExpiredToken,
    IdentityMismatch,
    ForeignTrustDomain,
    BadCsr,
    BadRequest,
    BodyTooLarge,
    Timeout,
    Overloaded,
    NotFound,
    MethodNotAllowed,
    Internal,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing_credentials",
            Self::InvalidToken => "invalid_token",
            Self::ExpiredToken => "expired_token",
            Self::IdentityMismatch => "identity_mismatch",
            Self::ForeignTrustDomain => "foreign_trust_domain",
            Self::BadCsr => "bad_csr",
            Self::BadRequest => "bad_request",
            Self::BodyTooLarge => "body_too_large",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal => "internal",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::MissingCredentials | Self::InvalidToken | Self::ExpiredToken => StatusCode::UNAUTHORIZED,
            Self::IdentityMismatch | Self::ForeignTrustDomain => StatusCode::FORBIDDEN,
            Self::BadCsr | Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

struct State {
    ca: LoadedCa,
    opts: ServeOptions,
    metrics: CaMetrics,
    registry: Registry,
}

type Reply = Response<Full<Bytes>>;

/// Serves the CA API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    ca: LoadedCa,
    opts: ServeOptions,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let metrics = CaMetrics::register(&registry)?;
    let earliest_root = ca
        .authority
        .bundle()
        .roots()
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
        .unwrap_or_default();
    metrics.root_expiry.set(earliest_root as f64);
    metrics.intermediate_expiry.set(ca.authority.signer_not_after().unix_timestamp() as f64);

    let resolver = Arc::new(RotatingCert::new(&ca, &opts.server_names)?);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(SvidClientVerifier::new(ca.authority.bundle().clone(), false));
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let state = Arc::new(State { ca, opts, metrics, registry });
    let slots = Arc::new(Semaphore::new(state.opts.max_connections));
    let rotation = tokio::spawn(rotate_server_cert(resolver, state.clone()));
    tokio::pin!(shutdown);
    let result = loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of descriptors and similar: keep serving the connections we have.
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => break Err(ServeError::Accept(e)),
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            state.metrics.refused.with_label_values(&[Refusal::Overloaded.as_str()]).inc();
            warn!(src.addr = %peer, reason = Refusal::Overloaded.as_str(), "connection refused");
            continue;
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(state.opts.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    info!(src.addr = %peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    info!(src.addr = %peer, reason = "timeout", "tls handshake timed out");
                    return;
                }
            };
            let peer_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| svid::peer_id(leaf).ok());
            let service = hyper::service::service_fn(move |req| {
                let (state, peer_id) = (state.clone(), peer_id.clone());
                async move {
                    let timeout = state.opts.request_timeout;
                    let reply = tokio::time::timeout(timeout, handle(&state, peer_id.as_ref(), req))
                        .await
                        .unwrap_or_else(|_| {
                            refuse(&state, Refusal::Timeout, "the request did not complete in time".into())
                        });
                    Ok::<_, std::convert::Infallible>(reply)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .max_buf_size(ca_api::MAX_BODY_BYTES.max(16 * 1024))
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                info!(src.addr = %peer, error = %e, "connection ended with an error");
            }
        });
    };
    rotation.abort();
    result
}

async fn handle(state: &State, peer: Option<&SpiffeId>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::POST, ca_api::SIGN_PATH) => sign(state, peer, req).await,
        (&Method::GET, ca_api::BUNDLE_PATH) => {
            let pem = certs_to_pem(state.ca.authority.bundle().roots());
            reply(StatusCode::OK, "application/x-pem-file", pem)
        }
        (&Method::GET, ca_api::METRICS_PATH) => {
            reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::encode(&state.registry))
        }
        (&Method::GET, ca_api::HEALTH_PATH) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (_, ca_api::SIGN_PATH | ca_api::BUNDLE_PATH | ca_api::METRICS_PATH | ca_api::HEALTH_PATH) => {
            refuse(state, Refusal::MethodNotAllowed, format!("{} is not allowed on {path}", req.method()))
        }
        _ => refuse(state, Refusal::NotFound, format!("no such endpoint: {path}")),
    }
}

async fn sign(state: &State, peer: Option<&SpiffeId>, req: Request<Incoming>) -> Reply {
    let now = OffsetDateTime::now_utc();
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let body = match Limited::new(req.into_body(), ca_api::MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            let msg = format!("the body is larger than {} bytes", ca_api::MAX_BODY_BYTES);
            return refuse(state, Refusal::BodyTooLarge, msg);
        }
        Err(e) => return refuse(state, Refusal::BadRequest, format!("cannot read the body: {e}")),
    };
    let request: SignRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(state, Refusal::BadRequest, format!("the body is not a sign request: {e}")),
    };
    let (id, auth) = match (bearer, peer) {
        (Some(token), _) => match authenticate_token(state, &token, now.unix_timestamp()) {
            Ok(authenticated) => authenticated,
            Err((refusal, message)) => return refuse(state, refusal, message),
        },
        (None, Some(id)) => (id.clone(), "mtls"),
        (None, None) => {
            let msg =
                "present a bootstrap token (Authorization: Bearer) or a valid SVID as client certificate";
            return refuse(state, Refusal::MissingCredentials, msg.into());
        }
    };
    let ttl = match request.ttl_seconds {
        Some(0) => return refuse(state, Refusal::BadRequest, "ttl_seconds must be positive".into()),
        Some(secs) => Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX)).min(state.opts.max_ttl),
        None => state.opts.default_ttl,
    };
    let issued = match state.ca.authority.sign_csr(&request.csr, &id, ttl, now) {
        Ok(issued) => issued,
        Err(e) => {
            let refusal = match &e {
                CsrError::BadCsr(_) => Refusal::BadCsr,
                CsrError::IdentityMismatch { .. } => Refusal::IdentityMismatch,
                CsrError::ForeignTrustDomain { .. } => Refusal::ForeignTrustDomain,
                _ => Refusal::Internal,
            };
            return refuse(state, refusal, e.to_string());
        }
    };
    state.metrics.issued.with_label_values(&[auth]).inc();
    info!(
        src.identity = %issued.id,
        auth,
        serial = %issued.serial,
        not_after = %rfc3339(issued.not_after),
        "certificate issued"
    );
    let body = SignResponse {
        spiffe_id: issued.id.to_string(),
        chain: certs_to_pem(&issued.chain),
        bundle: certs_to_pem(state.ca.authority.bundle().roots()),
        serial: issued.serial,
        not_before: rfc3339(issued.not_before),
        not_after: rfc3339(issued.not_after),
    };
    reply(StatusCode::OK, "application/json", serde_json::to_string(&body).unwrap_or_default())
}

/// The identity a bearer token proves and how (`token` for our own bootstrap tokens, `kubernetes`
/// for a service-account token), chosen by the token's (unverified) issuer; the verification
/// that follows is what counts.
fn authenticate_token(
    state: &State,
    token: &str,
    now: i64,
) -> Result<(SpiffeId, &'static str), (Refusal, String)> {
    let ours = state.ca.authority.trust_domain().id_uri();
    let issuer = keycard_config::jwt::issuer_of(token).ok();
    if let Some(k8s) = &state.opts.kubernetes {
        if issuer.as_deref() == Some(k8s.issuer()) {
            return match k8s.verify(token, now) {
                Ok(id) => Ok((id, "kubernetes")),
                Err(e) if e.is_expired() => Err((Refusal::ExpiredToken, e.to_string())),
                Err(e) => Err((Refusal::InvalidToken, e.to_string())),
            };
        }
        if let Some(other) = issuer.filter(|iss| *iss != ours) {
            let msg = format!(
                "the token's issuer {other:?} is neither this cluster's ({:?}) nor this CA's ({ours:?})",
                k8s.issuer()
            );
            return Err((Refusal::InvalidToken, msg));
        }
    }
    match state.ca.tokens.verify(token, now) {
        Ok(id) => Ok((id, "token")),
        Err(e) => {
            let refusal = match e {
                TokenError::Expired { .. } => Refusal::ExpiredToken,
                TokenError::ForeignTrustDomain { .. } => Refusal::ForeignTrustDomain,
                _ => Refusal::InvalidToken,
            };
            Err((refusal, e.to_string()))
        }
    }
}

fn refuse(state: &State, refusal: Refusal, message: String) -> Reply {
    state.metrics.refused.with_label_values(&[refusal.as_str()]).inc();
    info!(reason = refusal.as_str(), %message, "ca request refused");
    let body = ErrorBody { error: refusal.as_str().to_owned(), message };
    reply(refusal.status(), "application/json", serde_json::to_string(&body).unwrap_or_default())
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error() == Some(24)
}

/// The CA's own server certificate, swapped at half life by [`rotate_server_cert`]; handshakes
/// read it under a short read lock.
#[derive(Debug)]
struct RotatingCert {
    current: RwLock<(Arc<CertifiedKey>, OffsetDateTime)>,
}

/// The CA's server certificate lives this long.
const SERVER_CERT_TTL: Duration = Duration::hours(24);

impl RotatingCert {
    fn new(ca: &LoadedCa, names: &ExtraNames) -> Result<Self, ServeError> {
        Ok(Self { current: RwLock::new(issue_server_cert(ca, names)?) })
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|guard| guard.0.clone())
    }
}

fn issue_server_cert(
    ca: &LoadedCa,
    names: &ExtraNames,
) -> Result<(Arc<CertifiedKey>, OffsetDateTime), ServeError> {
    let err = |e: &dyn std::fmt::Display| ServeError::ServerCert(e.to_string());
    let td = ca.authority.trust_domain();
    let id = SpiffeId::from_k8s(td, ca_api::CA_NAMESPACE, ca_api::CA_SERVICE_ACCOUNT).map_err(|e| err(&e))?;
    let key = KeyPair::generate().map_err(|e| err(&e))?;
    let now = OffsetDateTime::now_utc();
    let issued = ca.authority.issue(&id, &key, SERVER_CERT_TTL, now, names).map_err(|e| err(&e))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der).map_err(|e| err(&e))?;
    Ok((Arc::new(CertifiedKey::new(issued.chain, signer)), issued.not_after))
}

async fn rotate_server_cert(resolver: Arc<RotatingCert>, state: Arc<State>) {
    loop {
        let not_after = resolver.current.read().map(|g| g.1).unwrap_or_else(|_| OffsetDateTime::now_utc());
        let half_left = (not_after - OffsetDateTime::now_utc()) / 2;
        let wait = std::time::Duration::try_from(half_left)
            .unwrap_or_default()
            .max(std::time::Duration::from_secs(60));
        tokio::time::sleep(wait).await;
        match issue_server_cert(&state.ca, &state.opts.server_names) {
            Ok(fresh) => {
                if let Ok(mut guard) = resolver.current.write() {
                    *guard = fresh;
                }
                info!("ca server certificate renewed");
            }
            Err(e) => warn!(error = %e, "ca server certificate renewal failed; keeping the current one"),
        }
    }
}
