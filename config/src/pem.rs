//! Certificates and keys from PEM, through `rustls-pki-types`' `PemObject`, with errors that name
//! the file they came from.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: not valid PEM: {source}")]
    Parse { origin: String, source: rustls_pki_types::pem::Error },
    #[error("{origin}: holds no CERTIFICATE block")]
    NoCertificates { origin: String },
    #[error("{origin}: holds no private key block")]
    NoKey { origin: String },
}

/// Every `CERTIFICATE` block in `pem`, in order; `origin` names the source in errors.
pub fn certs_from_pem(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Parse { origin: origin.to_owned(), source })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates { origin: origin.to_owned() });
    }
    Ok(certs)
}

pub fn certs_from_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    certs_from_pem(&read(path)?, &path.display().to_string())
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn key_from_pem(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::NoKey { origin: origin.to_owned() },
        source => PemError::Parse { origin: origin.to_owned(), source },
    })
}

pub fn key_from_file(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    key_from_pem(&read(path)?, &path.display().to_string())
}

pub fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read { path: path.to_owned(), source })
}

/// PEM text for a chain of certificates, one block each.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect()
}

/// PEM text for one DER object. Encoding goes through the `pem` crate (already in the tree through
/// rcgen): `rustls-pki-types` only decodes.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
