//! The SPIFFE ID parser on arbitrary input: never panics, and whatever it accepts prints back
//! byte for byte, re-parses to the same ID, and has a trust domain that parses alone.

#![no_main]

use keycard_config::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = TrustDomain::parse(s);
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
        assert!(TrustDomain::parse(id.trust_domain_str()).is_ok());
        let _ = id.k8s();
    }
});
