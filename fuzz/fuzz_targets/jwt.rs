//! JWKS documents and tokens come from issuers and callers: parsing either never panics.

#![no_main]

use keycard_config::jwt::{Jwks, issuer_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Jwks::parse(text);
    let _ = issuer_of(text);
});
