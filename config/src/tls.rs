//! rustls certificate verifiers that accept exactly the valid X.509-SVIDs of one trust bundle.
//!
//! rustls' own WebPKI verifiers check the chain but no SPIFFE rule, and the server verifier checks
//! DNS names, which SPIFFE does not use. These wrap [`TrustBundle::verify`] instead; the server
//! verifier adds secure naming (the peer must be one of the expected SPIFFE IDs). A rejection keeps
//! its [`SvidError`] inside the rustls error, so callers can log and count the exact rule.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::SpiffeId;
use crate::svid::{Purpose, SvidError, TrustBundle};

/// Verifies client certificates of peers; `mandatory` decides whether a client may present none.
#[derive(Debug)]
pub struct SvidClientVerifier {
    bundle: Arc<TrustBundle>,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SvidClientVerifier {
    pub fn new(bundle: Arc<TrustBundle>, mandatory: bool) -> Self {
        Self { bundle, mandatory, algorithms: algorithms() }
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates);
        self.bundle.verify(&chain, now, Purpose::Client).map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a server's SVID and that it is one of the identities expected at that destination
/// (secure naming). The TLS server name is not used: SPIFFE names peers by URI SAN only.
#[derive(Debug)]
pub struct SvidServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SvidServerVerifier {
    /// `expected` empty accepts any valid SVID of the bundle's trust domain.
    pub fn new(bundle: Arc<TrustBundle>, expected: Vec<SpiffeId>) -> Self {
        Self { bundle, expected, algorithms: algorithms() }
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates);
        self.bundle
            .verify(&chain, now, Purpose::Server)
            .and_then(|svid| svid.expect_one_of(&self.expected))
            .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SVID rule behind a rustls handshake error, when one of these verifiers raised it.
pub fn svid_error(err: &rustls::Error) -> Option<&SvidError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// Keeps the SVID rule inside `Other`, so both the TLS alert (bad_certificate) and our logs are
/// right; the few rules TLS has its own alert for are mapped to it.
fn to_rustls(err: SvidError) -> rustls::Error {
    let cert_error = match err {
        SvidError::UnknownCa => CertificateError::UnknownIssuer,
        SvidError::Expired { .. } => CertificateError::Expired,
        SvidError::NotYetValid { .. } => CertificateError::NotValidYet,
        SvidError::BadSignature => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

fn chain_of<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}
