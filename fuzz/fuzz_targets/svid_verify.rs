//! The X.509-SVID verifier on arbitrary DER (a peer controls these bytes at every handshake):
//! never panics, whatever the chain. The bundle is a fixed self-signed CA made once.

#![no_main]

use std::sync::OnceLock;

use keycard_config::svid::{Purpose, TrustBundle};
use keycard_config::{TrustDomain, svid};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};

/// A P-256 self-signed CA (cA=true, keyCertSign), `spiffe://example.org`, made with keycard.
const ROOT_PEM: &str = include_str!("../seed_root.pem");

fn bundle() -> &'static TrustBundle {
    static BUNDLE: OnceLock<TrustBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let roots =
            keycard_config::pem::certs_from_pem(ROOT_PEM.as_bytes(), "seed").expect("seed root parses");
        TrustBundle::new(TrustDomain::parse("example.org").expect("valid"), roots).expect("seed root is a CA")
    })
}

fuzz_target!(|chain: Vec<Vec<u8>>| {
    let chain: Vec<CertificateDer<'_>> =
        chain.iter().take(4).map(|c| CertificateDer::from(c.as_slice())).collect();
    let _ = bundle().inspect(&chain, UnixTime::now(), Purpose::Any);
    if let Some(leaf) = chain.first() {
        let _ = svid::peer_id(leaf);
    }
});
