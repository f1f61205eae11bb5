//! The workload's TLS material, built once per certificate: the chain and key, the trust bundle,
//! the inbound server config (TLS 1.3, client certificate required and verified as an SVID) and
//! client configs for outbound (TLS 1.3, server checked against the expected identities).
//!
//! A [`MeshTls`] is immutable; a new certificate or bundle makes a new one, published through a
//! `watch` channel. Handshakes take the current one; live connections keep what they have.

use std::sync::Arc;

use keycard_config::svid::{Purpose, SvidError, TrustBundle};
use keycard_config::tls::{SvidClientVerifier, SvidServerVerifier};
use keycard_config::{SpiffeId, svid};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// ALPN protocols that mark mesh traffic: Istio's and keycard's own.
pub const MESH_ALPNS: &[&[u8]] =
    &[b"keycard", b"istio", b"istio-peer-exchange", b"istio-http/1.0", b"istio-http/1.1", b"istio-h2"];
/// What keycard's outbound offers.
pub const OUTBOUND_ALPN: &[u8] = b"istio";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("our own certificate is not a valid SVID of the trust bundle: {0}")]
    OwnCert(#[from] SvidError),
    #[error("our own certificate is for {got}, this workload is {want}")]
    WrongIdentity { got: SpiffeId, want: SpiffeId },
    #[error("the private key is unusable: {0}")]
    Key(rustls::Error),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

#[derive(Debug)]
pub struct MeshTls {
    pub id: SpiffeId,
    /// Leaf and intermediates, as presented in handshakes (a trailing root is dropped).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: i64,
    pub not_after: i64,
    pub bundle: Arc<TrustBundle>,
    pub server: Arc<ServerConfig>,
    /// When the certificate manager will renew this certificate (unix seconds); 0 when it is
    /// not renewed by keycard (static files).
    pub renew_at: std::sync::atomic::AtomicI64,
    certified: Arc<CertifiedKey>,
}

impl MeshTls {
    /// Validates `chain` against `bundle` and `want` (our own identity), then builds the configs.
    pub fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<TrustBundle>,
        want: &SpiffeId,
    ) -> Result<Self, TlsError> {
        let svid = bundle.verify(&chain, UnixTime::now(), Purpose::Any)?;
        if &svid.id != want {
            return Err(TlsError::WrongIdentity { got: svid.id, want: want.clone() });
        }
        let not_before = x509_parser::parse_x509_certificate(&chain[0])
            .map(|(_, c)| c.validity().not_before.timestamp())
            .unwrap_or(svid.not_after);
        let chain: Vec<CertificateDer<'static>> = chain.into_iter().filter(|c| !is_self_signed(c)).collect();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let signer = provider.key_provider.load_private_key(key.clone_key()).map_err(TlsError::Key)?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signer));
        let verifier = Arc::new(SvidClientVerifier::new(bundle.clone(), true));
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified.clone())));
        server.alpn_protocols = MESH_ALPNS.iter().map(|a| a.to_vec()).collect();
        // Lets a handshaken connection give its traffic keys to kernel TLS (crate::ktls).
        server.enable_secret_extraction = true;
        Ok(Self {
            id: svid.id,
            chain,
            key,
            not_before,
            not_after: svid.not_after,
            bundle,
            server: Arc::new(server),
            renew_at: std::sync::atomic::AtomicI64::new(0),
            certified,
        })
    }

    /// A client config presenting our SVID and accepting only `expected` (any identity of the
    /// trust domain when empty).
    pub fn client(&self, expected: Vec<SpiffeId>) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(SvidServerVerifier::new(self.bundle.clone(), expected));
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.certified.clone(),
            )));
        config.alpn_protocols = vec![OUTBOUND_ALPN.to_vec()];
        config.enable_secret_extraction = true;
        Ok(Arc::new(config))
    }

    /// Seconds from now until expiry (negative once expired).
    pub fn expires_in(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.is_ca() && c.subject() == c.issuer())
}

/// The SPIFFE ID of a verified peer, from its leaf.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs.and_then(|c| c.first()).and_then(|leaf| svid::peer_id(leaf).ok())
}
