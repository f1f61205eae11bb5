//! A person-readable description of certificates, shared by `keycard ca inspect`, `spiffe verify`
//! and the sidecar's `/certs` admin endpoint (like `step certificate inspect`).

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::public_key::PublicKey;

/// What one certificate says, in the fields an operator asks about.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// `leaf`, `intermediate` or `root` (a self-issued CA).
    pub kind: &'static str,
    pub subject: String,
    pub issuer: String,
    /// Hex, colon-separated, as openssl prints it.
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// Negative once expired.
    pub expires_in_seconds: i64,
    pub spiffe_id: Option<String>,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub ip_sans: Vec<String>,
    pub san_critical: bool,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    pub key_usage: Vec<&'static str>,
    pub key_usage_critical: bool,
    pub extended_key_usage: Vec<&'static str>,
    pub public_key: String,
    pub signature_algorithm: String,
    pub sha256_fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
#[error("certificate {index} is not valid X.509: {detail}")]
pub struct InfoError {
    pub index: usize,
    pub detail: String,
}

/// Describes each DER certificate; `index` in errors is the position in `certs`.
pub fn describe_all(certs: &[impl AsRef<[u8]>], now: OffsetDateTime) -> Result<Vec<CertInfo>, InfoError> {
    certs
        .iter()
        .enumerate()
        .map(|(index, der)| describe(der.as_ref(), now).map_err(|detail| InfoError { index, detail }))
        .collect()
}

pub fn describe(der: &[u8], now: OffsetDateTime) -> Result<CertInfo, String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let (uri_sans, dns_sans, ip_sans, san_critical) = sans(&c);
    let spiffe_id = match uri_sans.as_slice() {
        [one] if one.starts_with("spiffe://") => Some(one.clone()),
        _ => None,
    };
    let bc = c.basic_constraints().ok().flatten();
    let ku = c.key_usage().ok().flatten();
    let not_after = c.validity().not_after.to_datetime();
    let kind = match (c.is_ca(), c.subject() == c.issuer()) {
        (false, _) => "leaf",
        (true, true) => "root",
        (true, false) => "intermediate",
    };
    Ok(CertInfo {
        kind,
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        serial: c.raw_serial_as_string(),
        not_before: rfc3339(c.validity().not_before.to_datetime()),
        not_after: rfc3339(not_after),
        expires_in_seconds: (not_after - now).whole_seconds(),
        spiffe_id,
        uri_sans,
        dns_sans,
        ip_sans,
        san_critical,
        is_ca: c.is_ca(),
        path_len: bc.and_then(|b| b.value.path_len_constraint),
        key_usage: ku.as_ref().map(|k| key_usage_names(k.value)).unwrap_or_default(),
        key_usage_critical: ku.is_some_and(|k| k.critical),
        extended_key_usage: eku_names(&c),
        public_key: public_key_name(&c),
        signature_algorithm: signature_name(&c),
        sha256_fingerprint: fingerprint(der),
    })
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn sans(c: &X509Certificate<'_>) -> (Vec<String>, Vec<String>, Vec<String>, bool) {
    let (mut uris, mut dns, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    let Ok(Some(san)) = c.subject_alternative_name() else {
        return (uris, dns, ips, false);
    };
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) => uris.push((*u).to_owned()),
            GeneralName::DNSName(d) => dns.push((*d).to_owned()),
            GeneralName::IPAddress(raw) => ips.push(ip_string(raw)),
            _ => {}
        }
    }
    (uris, dns, ips, san.critical)
}

fn ip_string(raw: &[u8]) -> String {
    match raw.len() {
        4 => std::net::Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]).to_string(),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(raw);
            std::net::Ipv6Addr::from(b).to_string()
        }
        _ => format!("{raw:02x?}"),
    }
}

fn key_usage_names(ku: &x509_parser::extensions::KeyUsage) -> Vec<&'static str> {
    [
        (ku.digital_signature(), "digitalSignature"),
        (ku.non_repudiation(), "nonRepudiation"),
        (ku.key_encipherment(), "keyEncipherment"),
        (ku.data_encipherment(), "dataEncipherment"),
        (ku.key_agreement(), "keyAgreement"),
        (ku.key_cert_sign(), "keyCertSign"),
        (ku.crl_sign(), "cRLSign"),
        (ku.encipher_only(), "encipherOnly"),
        (ku.decipher_only(), "decipherOnly"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

fn eku_names(c: &X509Certificate<'_>) -> Vec<&'static str> {
    let Ok(Some(eku)) = c.extended_key_usage() else { return Vec::new() };
    let e = eku.value;
    [
        (e.any, "any"),
        (e.server_auth, "serverAuth"),
        (e.client_auth, "clientAuth"),
        (e.code_signing, "codeSigning"),
        (e.email_protection, "emailProtection"),
        (e.time_stamping, "timeStamping"),
        (e.ocsp_signing, "OCSPSigning"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

fn public_key_name(c: &X509Certificate<'_>) -> String {
    match c.public_key().parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = c
                .public_key()
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| match oid.to_id_string().as_str() {
                    "1.2.840.10045.3.1.7" => "P-256".to_owned(),
                    "1.3.132.0.34" => "P-384".to_owned(),
                    "1.3.132.0.35" => "P-521".to_owned(),
                    other => other.to_owned(),
                })
                .unwrap_or_else(|| format!("{} bits", point.key_size()));
            format!("ECDSA {curve}")
        }
        Ok(PublicKey::RSA(rsa)) => format!("RSA {} bits", rsa.key_size()),
        Ok(PublicKey::DSA(_)) => "DSA".to_owned(),
        Ok(PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_)) => "GOST".to_owned(),
        Ok(PublicKey::Unknown(_)) | Err(_) => {
            match c.public_key().algorithm.algorithm.to_id_string().as_str() {
                "1.3.101.112" => "Ed25519".to_owned(),
                other => other.to_owned(),
            }
        }
    }
}

fn signature_name(c: &X509Certificate<'_>) -> String {
    match c.signature_algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.10045.4.3.2" => "ECDSA-SHA256".to_owned(),
        "1.2.840.10045.4.3.3" => "ECDSA-SHA384".to_owned(),
        "1.2.840.113549.1.1.11" => "RSA-SHA256".to_owned(),
        "1.3.101.112" => "Ed25519".to_owned(),
        other => other.to_owned(),
    }
}

pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}
