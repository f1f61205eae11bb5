//! The X.509-SVID verifier: standard path validation to a trust bundle (rustls-webpki) **and** every
//! SPIFFE rule on the leaf, which webpki knows nothing of.
//!
//! One verifier serves `keycard spiffe verify`, the CA (renewal over mutual TLS) and the sidecar's
//! handshakes, so a certificate the CLI calls valid is one the proxy accepts. [`TrustBundle::inspect`]
//! collects every violation for a person; [`TrustBundle::verify`] returns the first for a handshake.

use std::fmt;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::identity::{IdError, SpiffeId, TrustDomain};

/// Which side of a TLS handshake the SVID is presented on; selects the EKU webpki requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Client,
    Server,
    /// Valid for at least one of the two (what `spiffe verify` checks by default).
    Any,
}

/// Why a certificate chain is not a valid X.509-SVID of the bundle's trust domain. Each variant is
/// one rule; [`SvidError::rule`] is its stable name for logs, metrics and the CLI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("no certificate was presented")]
    EmptyChain,
    #[error("certificate {index} is not valid DER X.509: {detail}")]
    Malformed { index: usize, detail: String },
    #[error("the chain does not lead to a root in the trust bundle")]
    UnknownCa,
    #[error("the certificate expired at {not_after} (unix seconds); now is {now}")]
    Expired { not_after: i64, now: i64 },
    #[error("the certificate is not valid before {not_before} (unix seconds); now is {now}")]
    NotYetValid { not_before: i64, now: i64 },
    #[error("a signature in the chain does not verify")]
    BadSignature,
    #[error("the extended key usage does not allow {0} authentication")]
    WrongPurpose(&'static str),
    #[error("path validation failed: {0}")]
    Path(String),
    #[error("the leaf has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("the leaf has {count} URI SANs; an SVID has exactly one")]
    MultipleUriSans { count: usize },
    #[error("the leaf's URI SAN {uri:?} is not a SPIFFE ID: {source}")]
    InvalidId { uri: String, source: IdError },
    #[error("the leaf's SPIFFE ID {0} has no path; only signing certificates may carry a trust domain ID")]
    RootPath(SpiffeId),
    #[error("the leaf's trust domain is {got}, the bundle's is {expected}")]
    TrustDomainMismatch { expected: TrustDomain, got: TrustDomain },
    #[error("the leaf is {got}, expected {expected}")]
    IdMismatch { expected: String, got: SpiffeId },
    #[error("the leaf has basic constraints cA=true; a leaf SVID must not be a CA")]
    LeafIsCa,
    #[error("the leaf has no key usage extension; SVIDs must carry one")]
    KeyUsageMissing,
    #[error("the leaf's key usage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("the leaf's key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("the leaf's key usage has keyCertSign, which only signing certificates may set")]
    KeyCertSign,
    #[error("the leaf's key usage has cRLSign, which only signing certificates may set")]
    CrlSign,
    #[error("the leaf's extended key usage is present without both serverAuth and clientAuth")]
    EkuIncomplete,
    #[error("the leaf has an empty subject but its subject alternative name extension is not critical")]
    SanNotCritical,
    #[error("certificate {index} in the chain signs others but is not a CA with keyCertSign")]
    SigningCertNotCa { index: usize },
}

impl SvidError {
    /// The stable name of the rule that failed.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::EmptyChain => "no_certificate",
            Self::Malformed { .. } => "malformed",
            Self::UnknownCa => "unknown_ca",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::BadSignature => "bad_signature",
            Self::WrongPurpose(_) => "wrong_purpose",
            Self::Path(_) => "path_invalid",
            Self::NoUriSan => "no_uri_san",
            Self::MultipleUriSans { .. } => "multiple_uri_sans",
            Self::InvalidId { .. } => "invalid_spiffe_id",
            Self::RootPath(_) => "root_path",
            Self::TrustDomainMismatch { .. } => "trust_domain_mismatch",
            Self::IdMismatch { .. } => "san_mismatch",
            Self::LeafIsCa => "leaf_is_ca",
            Self::KeyUsageMissing => "key_usage_missing",
            Self::KeyUsageNotCritical => "key_usage_not_critical",
            Self::NoDigitalSignature => "no_digital_signature",
            Self::KeyCertSign => "key_cert_sign",
            Self::CrlSign => "crl_sign",
            Self::EkuIncomplete => "eku_incomplete",
            Self::SanNotCritical => "san_not_critical",
            Self::SigningCertNotCa { .. } => "signing_cert_not_ca",
        }
    }
}

/// Errors building a [`TrustBundle`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("the trust bundle holds no certificate")]
    Empty,
    #[error("trust bundle certificate {index} cannot be a trust anchor: {source}")]
    BadRoot { index: usize, source: webpki::Error },
    #[error("trust bundle certificate {index} is not a CA (basic constraints cA=true is required)")]
    NotCa { index: usize },
    #[error("trust bundle certificate {index} is not valid X.509: {detail}")]
    Malformed { index: usize, detail: String },
}

/// The roots one trust domain's SVIDs chain to. Several roots are allowed, for rotation.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// The identity a verified SVID proves, and when that proof ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    pub id: SpiffeId,
    /// Unix seconds.
    pub not_after: i64,
}

/// Everything [`TrustBundle::inspect`] found: the leaf's ID when it has one, and every violation.
#[derive(Debug, Clone)]
pub struct Report {
    pub id: Option<SpiffeId>,
    pub not_after: Option<i64>,
    pub violations: Vec<SvidError>,
}

impl TrustBundle {
    pub fn new(trust_domain: TrustDomain, roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut anchors = Vec::with_capacity(roots.len());
        for (index, root) in roots.iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(root)
                .map_err(|e| BundleError::Malformed { index, detail: e.to_string() })?;
            if !cert.is_ca() {
                return Err(BundleError::NotCa { index });
            }
            let anchor = webpki::anchor_from_trusted_cert(root)
                .map_err(|source| BundleError::BadRoot { index, source })?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self { trust_domain, roots, anchors })
    }

    /// The trust domain named by the roots' own URI SAN (`spiffe://<td>`), as keycard's roots and
    /// other SPIFFE CAs write it; `None` when no root names one.
    pub fn trust_domain_of_roots(roots: &[CertificateDer<'_>]) -> Option<TrustDomain> {
        roots.iter().find_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
            uri_sans(&cert).ok()?.into_iter().find_map(|uri| {
                let id = SpiffeId::parse(uri).ok()?;
                id.path().is_empty().then(|| id.trust_domain())
            })
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Verifies `chain` (leaf first, then intermediates; a trailing root is harmless) and returns
    /// the leaf's identity, or the first rule it breaks: chain trust before leaf rules.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        purpose: Purpose,
    ) -> Result<VerifiedSvid, SvidError> {
        let report = self.inspect(chain, now, purpose);
        match (report.violations.into_iter().next(), report.id, report.not_after) {
            (Some(first), _, _) => Err(first),
            (None, Some(id), Some(not_after)) => Ok(VerifiedSvid { id, not_after }),
            // inspect() always records a violation when it could not read the ID.
            (None, _, _) => Err(SvidError::NoUriSan),
        }
    }

    /// Checks every rule and reports all that fail, for a person asking "why not?".
    pub fn inspect(&self, chain: &[CertificateDer<'_>], now: UnixTime, purpose: Purpose) -> Report {
        let mut report = Report { id: None, not_after: None, violations: Vec::new() };
        let Some(leaf_der) = chain.first() else {
            report.violations.push(SvidError::EmptyChain);
            return report;
        };
        if let Err(e) = self.verify_path(leaf_der, &chain[1..], now, purpose) {
            report.violations.push(e);
        }
        let leaf = match x509_parser::parse_x509_certificate(leaf_der) {
            Ok((_, leaf)) => leaf,
            Err(e) => {
                report.violations.retain(|v| !matches!(v, SvidError::Malformed { .. }));
                report.violations.push(SvidError::Malformed { index: 0, detail: e.to_string() });
                return report;
            }
        };
        report.not_after = Some(leaf.validity().not_after.timestamp());
        match leaf_id(&leaf) {
            Ok(id) => {
                if id.trust_domain_str() != self.trust_domain.as_str() {
                    report.violations.push(SvidError::TrustDomainMismatch {
                        expected: self.trust_domain.clone(),
                        got: id.trust_domain(),
                    });
                }
                report.id = Some(id);
            }
            Err(e) => report.violations.push(e),
        }
        report.violations.extend(leaf_rule_violations(&leaf));
        for (index, der) in chain.iter().enumerate().skip(1) {
            match x509_parser::parse_x509_certificate(der) {
                Ok((_, c)) if is_signing_cert(&c) => {}
                Ok(_) => report.violations.push(SvidError::SigningCertNotCa { index }),
                Err(e) => report.violations.push(SvidError::Malformed { index, detail: e.to_string() }),
            }
        }
        report
    }

    fn verify_path(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        purpose: Purpose,
    ) -> Result<(), SvidError> {
        let ee = EndEntityCert::try_from(leaf)
            .map_err(|e| SvidError::Malformed { index: 0, detail: e.to_string() })?;
        let check = |usage: KeyUsage| {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
        };
        let result = match purpose {
            Purpose::Client => check(KeyUsage::client_auth()),
            Purpose::Server => check(KeyUsage::server_auth()),
            Purpose::Any => check(KeyUsage::server_auth()).or_else(|_| check(KeyUsage::client_auth())),
        };
        result.map_err(|e| map_webpki(e, purpose))
    }
}

/// The SPIFFE ID in a leaf's single URI SAN, with the SAN-count, syntax and non-root-path rules.
pub fn leaf_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(leaf)?;
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::MultipleUriSans { count: many.len() }),
    };
    let id = SpiffeId::parse(uri).map_err(|source| SvidError::InvalidId { uri: uri.to_owned(), source })?;
    if id.path().is_empty() {
        return Err(SvidError::RootPath(id));
    }
    Ok(id)
}

/// The SPIFFE ID of a DER leaf, for code that already trusts the chain (the handshake verified it).
pub fn peer_id(leaf: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| SvidError::Malformed { index: 0, detail: e.to_string() })?;
    leaf_id(&cert)
}

impl VerifiedSvid {
    /// Secure naming: the identity must be one of `expected` (any, when `expected` is empty).
    pub fn expect_one_of(self, expected: &[SpiffeId]) -> Result<Self, SvidError> {
        if expected.is_empty() || expected.contains(&self.id) {
            return Ok(self);
        }
        let expected = expected.iter().map(SpiffeId::as_str).collect::<Vec<_>>().join(" or ");
        Err(SvidError::IdMismatch { expected, got: self.id })
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Server => "server",
            Self::Any => "client or server",
        })
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed { index: 0, detail: e.to_string() })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn leaf_rule_violations(leaf: &X509Certificate<'_>) -> Vec<SvidError> {
    let mut out = Vec::new();
    if leaf.is_ca() {
        out.push(SvidError::LeafIsCa);
    }
    match leaf.key_usage() {
        Ok(Some(ku)) => {
            if !ku.critical {
                out.push(SvidError::KeyUsageNotCritical);
            }
            if !ku.value.digital_signature() {
                out.push(SvidError::NoDigitalSignature);
            }
            if ku.value.key_cert_sign() {
                out.push(SvidError::KeyCertSign);
            }
            if ku.value.crl_sign() {
                out.push(SvidError::CrlSign);
            }
        }
        Ok(None) => out.push(SvidError::KeyUsageMissing),
        Err(e) => out.push(SvidError::Malformed { index: 0, detail: e.to_string() }),
    }
    if let Ok(Some(eku)) = leaf.extended_key_usage()
        && !(eku.value.any || eku.value.server_auth && eku.value.client_auth)
    {
        out.push(SvidError::EkuIncomplete);
    }
    let subject_empty = leaf.subject().iter().next().is_none();
    if subject_empty
        && let Ok(Some(san)) = leaf.subject_alternative_name()
        && !san.critical
    {
        out.push(SvidError::SanNotCritical);
    }
    out
}

fn is_signing_cert(cert: &X509Certificate<'_>) -> bool {
    let key_cert_sign = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
    cert.is_ca() && key_cert_sign
}

fn map_webpki(e: webpki::Error, purpose: Purpose) -> SvidError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => SvidError::UnknownCa,
        W::CertExpired { time, not_after } => {
            SvidError::Expired { not_after: unix(not_after), now: unix(time) }
        }
        W::CertNotValidYet { time, not_before } => {
            SvidError::NotYetValid { not_before: unix(not_before), now: unix(time) }
        }
        W::InvalidSignatureForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | W::UnsupportedSignatureAlgorithmContext(_) => SvidError::BadSignature,
        W::CaUsedAsEndEntity => SvidError::LeafIsCa,
        W::RequiredEkuNotFoundContext(_) => SvidError::WrongPurpose(match purpose {
            Purpose::Client => "client",
            Purpose::Server => "server",
            Purpose::Any => "client or server",
        }),
        other => SvidError::Path(format!("{other:?}")),
    }
}

fn unix(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
