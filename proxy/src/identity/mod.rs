//! The workload's identity: a key made here, a CSR for it, and the CA client that turns the CSR into
//! an X.509-SVID (with a bootstrap token first, then renewing over mutual TLS).

mod client;
mod manager;

pub use client::{CaClient, ClientError, Credential};
pub(crate) use manager::stamps;
pub use manager::{CertManager, TlsWatch};

use keycard_config::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

/// A fresh ECDSA P-256 key and a PEM CSR for `id`, signed by that key. The key never leaves the
/// caller; the CA sees only the CSR.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().to_owned().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}
