//! Path normalisation: request paths come from peers. It never panics, a normalised path is
//! absolute with no dot segments, and normalising it again changes nothing.

#![no_main]

use keycard_config::http::{PathNormalization, normalize_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        let Ok(out) = normalize_path(path, mode) else { continue };
        if mode == PathNormalization::None || out == "*" {
            continue;
        }
        assert!(out.starts_with('/'), "{path:?} -> {out:?}");
        assert!(!out.split('/').any(|s| s == "." || s == ".."), "{path:?} -> {out:?}");
        assert_eq!(normalize_path(&out, mode).as_deref(), Ok(out.as_str()), "{path:?} ({mode:?})");
    }
});
