//! Istio policy YAML: a policy file is operator input, but a broken one must be an error, never a
//! panic that takes the sidecar down.

#![no_main]

use keycard_config::policy::PolicySet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut set = PolicySet::default();
    if set.add_text(text, std::path::Path::new("fuzz.yaml")).is_ok() {
        let wp = set.for_workload("istio-system", "default", &Default::default());
        let _ = wp.peer_auth.mode_for(80);
    }
});
