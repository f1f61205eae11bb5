//! The certificate profiles keycard issues, per the X.509-SVID specification.
//!
//! Leaves: empty subject with a critical SAN holding exactly one URI (the SPIFFE ID), key usage
//! critical with digitalSignature only, EKU serverAuth + clientAuth, cA=false, NotBefore a little in
//! the past for clock skew, NotAfter clamped to the issuer's. Signing certificates: cA=true,
//! keyCertSign + cRLSign, the trust domain ID as URI SAN, and no name constraints (rustls' verifier
//! rejects every certificate below a URI name constraint).

use std::net::IpAddr;

use keycard_config::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// How far NotBefore is set in the past, so peers with slow clocks accept a fresh certificate.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("{name:?} cannot go in a certificate: {source}")]
    BadName { name: String, source: rcgen::Error },
    #[error("the random source failed")]
    Random,
}

/// The self-signed root of a trust domain.
pub fn root(
    td: &TrustDomain,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<CertificateParams, ProfileError> {
    signing(td, "keycard root CA", IsCa::Ca(BasicConstraints::Unconstrained), lifetime, now, None)
}

/// The intermediate that signs leaves; it may sign no further CA (path length 0).
pub fn intermediate(
    td: &TrustDomain,
    lifetime: Duration,
    now: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
) -> Result<CertificateParams, ProfileError> {
    let ca = IsCa::Ca(BasicConstraints::Constrained(0));
    signing(td, "keycard intermediate CA", ca, lifetime, now, Some(issuer_not_after))
}

/// Extra names a leaf may carry besides its SPIFFE ID (the CA's own server certificate needs a
/// DNS name or IP that HTTPS clients such as curl check).
#[derive(Debug, Clone, Default)]
pub struct ExtraNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// A leaf X.509-SVID for `id`.
pub fn leaf(
    id: &SpiffeId,
    ttl: Duration,
    now: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
    extra: &ExtraNames,
) -> Result<CertificateParams, ProfileError> {
    let mut p = CertificateParams::default();
    // An empty subject makes rcgen mark the SAN extension critical (RFC 5280 4.1.2.6).
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![uri(id.as_str())?];
    for dns in &extra.dns {
        let name =
            dns.clone().try_into().map_err(|source| ProfileError::BadName { name: dns.clone(), source })?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    p.subject_alt_names.extend(extra.ips.iter().copied().map(SanType::IpAddress));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial()?);
    p.not_before = now - CLOCK_SKEW;
    p.not_after = (now + ttl).min(issuer_not_after);
    Ok(p)
}

fn signing(
    td: &TrustDomain,
    common_name: &str,
    is_ca: IsCa,
    lifetime: Duration,
    now: OffsetDateTime,
    issuer_not_after: Option<OffsetDateTime>,
) -> Result<CertificateParams, ProfileError> {
    let mut p = CertificateParams::default();
    let serial = serial()?;
    // A short tag from the random serial keeps two CAs of one trust domain from sharing a subject,
    // which would make path building try the wrong issuer (and report a bad signature instead of
    // an unknown CA), and keeps the roots of a rotation apart.
    let tag: String = serial.to_bytes().iter().take(3).map(|b| format!("{b:02x}")).collect();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "keycard");
    p.distinguished_name.push(DnType::CommonName, format!("{common_name} {td} {tag}"));
    p.subject_alt_names = vec![uri(&td.id_uri())?];
    p.is_ca = is_ca;
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = issuer_not_after.is_some();
    p.serial_number = Some(serial);
    p.not_before = now - CLOCK_SKEW;
    let not_after = now + lifetime;
    p.not_after = issuer_not_after.map_or(not_after, |limit| not_after.min(limit));
    Ok(p)
}

fn uri(s: &str) -> Result<SanType, ProfileError> {
    let name =
        s.to_owned().try_into().map_err(|source| ProfileError::BadName { name: s.to_owned(), source })?;
    Ok(SanType::URI(name))
}

/// 16 random bytes with the top bit clear, so the DER integer is positive and at most 16 bytes.
fn serial() -> Result<SerialNumber, ProfileError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| ProfileError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6;
    Ok(SerialNumber::from_slice(&bytes))
}
