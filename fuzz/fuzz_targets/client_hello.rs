//! The ClientHello parser used for protocol detection: peers control every byte. It never panics,
//! and a prefix of a parsed hello never parses to something else.

#![no_main]

use keycard_proxy::detect::{Parse, parse_client_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Parse::Hello(_) = parse_client_hello(data) {
        for cut in 0..data.len().min(64) {
            assert!(!matches!(parse_client_hello(&data[..cut]), Parse::NotTls) || cut == 0);
        }
    }
});
