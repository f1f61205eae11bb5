//! The request-smuggling guard follows framing on bytes a peer sends. However the bytes are
//! split, it never panics, never invents bytes, and changes nothing unless it refuses a head.

#![no_main]

use bytes::BytesMut;
use keycard_proxy::http::guard::Framing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let at = usize::from(split).min(stream.len());
    let mut f = Framing::new(8192, 32);
    let mut out = BytesMut::new();
    f.feed(&stream[..at], &mut out);
    f.feed(&stream[at..], &mut out);
    assert!(out.len() <= stream.len());
    if f.refused == 0 {
        assert_eq!(&out[..], &stream[..out.len()]);
    }
});
