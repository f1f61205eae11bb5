//! The signing authority: an intermediate (or plug-in) CA key and certificate that issues leaf
//! X.509-SVIDs, either for a key made here (`ca issue`) or for a CSR's key (`ca serve`), in which
//! case the CA never sees the private key.

use std::sync::Arc;

use keycard_config::svid::TrustBundle;
use keycard_config::{SpiffeId, TrustDomain};
use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::profile::{self, ExtraNames, ProfileError};

/// Why a signing certificate and key cannot act as this trust domain's CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    #[error("the CA chain is empty")]
    EmptyChain,
    #[error("CA certificate {index} is not valid X.509: {detail}")]
    Malformed { index: usize, detail: String },
    #[error("the signing certificate is not a CA with keyCertSign; it cannot sign leaves")]
    NotSigningCert,
    #[error("the signing key does not match the signing certificate's public key")]
    KeyMismatch,
    #[error(
        "CA certificate {index} carries URI name constraints; rustls rejects every certificate \
         below one, so no sidecar could verify the SVIDs it signs"
    )]
    UriNameConstraints { index: usize },
    #[error("CA certificate {index} is not signed by the next certificate in the chain or by a bundle root")]
    BrokenChain { index: usize },
    #[error("the signing certificate expired at {0}")]
    Expired(String),
    #[error("the trust bundle is unusable: {0}")]
    Bundle(#[from] keycard_config::svid::BundleError),
    #[error("cannot build the certificate: {0}")]
    Profile(#[from] ProfileError),
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
}

/// Why a CSR was refused. Each maps to one `reason` label and HTTP status in the API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("the CSR is not a valid, correctly self-signed PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {requested}, but the caller authenticated as {authenticated}")]
    IdentityMismatch { requested: String, authenticated: SpiffeId },
    #[error("the CSR asks for an identity in trust domain {got}; this CA serves {expected}")]
    ForeignTrustDomain { got: String, expected: TrustDomain },
    #[error(transparent)]
    Issue(#[from] AuthorityError),
}

/// One issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: SpiffeId,
    /// The leaf, the intermediate(s), then the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

pub struct Authority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    signer_not_after: OffsetDateTime,
    /// The signing certificate, any further intermediates, then the root: appended to every leaf.
    ca_chain: Vec<CertificateDer<'static>>,
    bundle: Arc<TrustBundle>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Authority {
    /// `ca_chain` starts with the signing certificate whose key is `signer`; `roots` is the trust
    /// bundle. The chain is checked link by link up to a bundle root, so a CA that could only issue
    /// unverifiable certificates never starts.
    pub fn new(
        trust_domain: TrustDomain,
        signer: KeyPair,
        ca_chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        now: OffsetDateTime,
    ) -> Result<Self, AuthorityError> {
        let bundle = Arc::new(TrustBundle::new(trust_domain.clone(), roots)?);
        let first = ca_chain.first().ok_or(AuthorityError::EmptyChain)?;
        let parsed = ca_chain
            .iter()
            .enumerate()
            .map(|(index, der)| {
                x509_parser::parse_x509_certificate(der)
                    .map(|(_, c)| c)
                    .map_err(|e| AuthorityError::Malformed { index, detail: e.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signer_cert = &parsed[0];
        let key_cert_sign = matches!(signer_cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
        if !signer_cert.is_ca() || !key_cert_sign {
            return Err(AuthorityError::NotSigningCert);
        }
        if signer_cert.public_key().raw != signer.subject_public_key_info().as_slice() {
            return Err(AuthorityError::KeyMismatch);
        }
        let signer_not_after = signer_cert.validity().not_after.to_datetime();
        if signer_not_after <= now {
            return Err(AuthorityError::Expired(keycard_config::certinfo::rfc3339(signer_not_after)));
        }
        let root_certs = bundle
            .roots()
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c))
            .collect::<Vec<_>>();
        for (index, cert) in parsed.iter().enumerate() {
            if has_uri_name_constraints(cert) {
                return Err(AuthorityError::UriNameConstraints { index });
            }
            let self_signed_root = cert.subject() == cert.issuer() && index > 0;
            let by_next = parsed.get(index + 1).is_some_and(|next| signed_by(cert, next));
            let by_root = root_certs.iter().any(|root| signed_by(cert, root));
            if !(self_signed_root || by_next || by_root) {
                return Err(AuthorityError::BrokenChain { index });
            }
        }
        // Clients expect the chain to end in the root; plug-in chains often stop short of it.
        let ends_in_root = parsed.last().is_some_and(|c| c.subject() == c.issuer());
        let missing_root = match parsed.last() {
            Some(last) if !ends_in_root => root_certs
                .iter()
                .position(|root| signed_by(last, root))
                .map(|pos| bundle.roots()[pos].clone()),
            _ => None,
        };
        let issuer = Issuer::from_ca_cert_der(first, signer)
            .map_err(|e| AuthorityError::Malformed { index: 0, detail: e.to_string() })?;
        drop(parsed);
        let mut ca_chain = ca_chain;
        ca_chain.extend(missing_root);
        Ok(Self { trust_domain, issuer, signer_not_after, ca_chain, bundle })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    pub fn signer_not_after(&self) -> OffsetDateTime {
        self.signer_not_after
    }

    /// The signing certificate, intermediates and root, as appended to every leaf.
    pub fn ca_chain(&self) -> &[CertificateDer<'static>] {
        &self.ca_chain
    }

    /// Issues a leaf for `id` binding `public_key`. The lifetime is `ttl`, cut at the signer's
    /// expiry.
    pub fn issue(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
        extra: &ExtraNames,
    ) -> Result<Issued, AuthorityError> {
        let params = profile::leaf(id, ttl, now, self.signer_not_after, extra)?;
        let cert = params.signed_by(public_key, &self.issuer).map_err(AuthorityError::Sign)?;
        let serial = params.serial_number.as_ref().map(|s| hex_colon(&s.to_bytes())).unwrap_or_default();
        let mut chain = Vec::with_capacity(1 + self.ca_chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.ca_chain.iter().cloned());
        Ok(Issued {
            id: id.clone(),
            chain,
            serial,
            not_before: params.not_before,
            not_after: params.not_after,
        })
    }

    /// Signs a PEM CSR for the identity the caller proved. The CSR's own names are never copied;
    /// a URI SAN in it that names anything but `authenticated` is refused.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        authenticated: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, CsrError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CsrError::BadCsr(format!("no PEM CERTIFICATE REQUEST: {e}")))?;
        let csr =
            CertificateSigningRequestParams::from_der(&der).map_err(|e| CsrError::BadCsr(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            let SanType::URI(uri) = san else { continue };
            let requested = uri.as_str();
            let requested_id = SpiffeId::parse(requested)
                .map_err(|e| CsrError::BadCsr(format!("URI SAN {requested:?} is not a SPIFFE ID: {e}")))?;
            if requested_id.trust_domain_str() != self.trust_domain.as_str() {
                return Err(CsrError::ForeignTrustDomain {
                    got: requested_id.trust_domain_str().to_owned(),
                    expected: self.trust_domain.clone(),
                });
            }
            if &requested_id != authenticated {
                return Err(CsrError::IdentityMismatch {
                    requested: requested.to_owned(),
                    authenticated: authenticated.clone(),
                });
            }
        }
        Ok(self.issue(authenticated, &csr.public_key, ttl, now, &ExtraNames::default())?)
    }
}

fn signed_by(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    cert.issuer() == issuer.subject() && cert.verify_signature(Some(issuer.public_key())).is_ok()
}

fn has_uri_name_constraints(cert: &X509Certificate<'_>) -> bool {
    cert.extensions().iter().any(|ext| match ext.parsed_extension() {
        ParsedExtension::NameConstraints(nc) => nc
            .permitted_subtrees
            .iter()
            .chain(nc.excluded_subtrees.iter())
            .flatten()
            .any(|s| matches!(s.base, GeneralName::URI(_))),
        _ => false,
    })
}

pub fn hex_colon(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
