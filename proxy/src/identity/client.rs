//! An HTTPS client of `keycard ca serve`: TLS 1.3, the CA's identity checked against the trust
//! bundle (secure naming on `spiffe://<td>/ns/keycard-system/sa/keycard-ca`), one request per
//! connection, everything under one deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use keycard_config::ca_api::{self, ErrorBody, SignRequest, SignResponse};
use keycard_config::svid::TrustBundle;
use keycard_config::tls::SvidServerVerifier;
use keycard_config::{IdError, SpiffeId};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How the caller proves who it is.
#[derive(Debug)]
pub enum Credential {
    /// A bootstrap token from `keycard ca token`.
    Token(String),
    /// The caller's current SVID, to renew it (mutual TLS).
    Svid { chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static> },
    /// No credential: enough for the trust bundle, refused for signing.
    Anonymous,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("bad CA url {url:?}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("the CA's identity cannot be formed: {0}")]
    CaIdentity(#[from] IdError),
    #[error("cannot connect to the CA at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("TLS with the CA failed: {0}")]
    Tls(std::io::Error),
    #[error("bad client credential: {0}")]
    Credential(rustls::Error),
    #[error("HTTP with the CA failed: {0}")]
    Http(String),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the CA refused ({status}, {reason}): {message}")]
    Refused { status: StatusCode, reason: String, message: String },
    #[error("the CA's answer is not understood: {0}")]
    BadResponse(String),
}

#[derive(Debug, Clone)]
pub struct CaClient {
    addr: String,
    authority: String,
    server_name: ServerName<'static>,
    bundle: Arc<TrustBundle>,
    ca_id: SpiffeId,
    timeout: Duration,
}

impl CaClient {
    /// `url` is `https://host:port`; the CA must present an SVID of `bundle`'s trust domain for
    /// `ns/keycard-system/sa/keycard-ca`.
    pub fn new(url: &str, bundle: Arc<TrustBundle>, timeout: Duration) -> Result<Self, ClientError> {
        let bad = |detail: &str| ClientError::BadUrl { url: url.to_owned(), detail: detail.to_owned() };
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        let host =
            uri.host().ok_or_else(|| bad("no host"))?.trim_matches(|c| c == '[' || c == ']').to_owned();
        let port = uri.port_u16().unwrap_or(15012);
        let server_name = ServerName::try_from(host.clone()).map_err(|e| bad(&e.to_string()))?;
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
        let ca_id =
            SpiffeId::from_k8s(bundle.trust_domain(), ca_api::CA_NAMESPACE, ca_api::CA_SERVICE_ACCOUNT)?;
        let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Ok(Self { addr, authority, server_name, bundle, ca_id, timeout })
    }

    /// Asks the CA to sign `csr_pem`; `ttl_seconds` is a request the CA may shorten.
    pub async fn sign(
        &self,
        csr_pem: &str,
        ttl_seconds: Option<u64>,
        credential: &Credential,
    ) -> Result<SignResponse, ClientError> {
        let body = serde_json::to_vec(&SignRequest { csr: csr_pem.to_owned(), ttl_seconds })
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let token = match credential {
            Credential::Token(t) => Some(t.as_str()),
            Credential::Svid { .. } | Credential::Anonymous => None,
        };
        let (status, bytes) = self.request(Method::POST, ca_api::SIGN_PATH, body, token, credential).await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    /// The trust bundle the CA serves (PEM), fetched over the verified channel.
    pub async fn bundle_pem(&self) -> Result<String, ClientError> {
        let (status, bytes) =
            self.request(Method::GET, ca_api::BUNDLE_PATH, Vec::new(), None, &Credential::Anonymous).await?;
        if status != StatusCode::OK {
            return Err(refusal(status, &bytes));
        }
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
        credential: &Credential,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let work = async {
            let config = Arc::new(self.tls_config(credential)?);
            let tcp = TcpStream::connect(&self.addr)
                .await
                .map_err(|source| ClientError::Connect { addr: self.addr.clone(), source })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(config)
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(ClientError::Tls)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &self.authority)
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(token) = bearer {
                req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let req = req.body(Full::new(Bytes::from(body))).map_err(|e| ClientError::Http(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| ClientError::Timeout(self.timeout))?
    }

    fn tls_config(&self, credential: &Credential) -> Result<ClientConfig, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(SvidServerVerifier::new(self.bundle.clone(), vec![self.ca_id.clone()]));
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ClientError::Credential)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match credential {
            Credential::Token(_) | Credential::Anonymous => builder.with_no_client_auth(),
            Credential::Svid { chain, key } => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(ClientError::Credential)?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn refusal(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Refused { status, reason: body.error, message: body.message },
        Err(_) => ClientError::Refused {
            status,
            reason: "unknown".into(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        },
    }
}
