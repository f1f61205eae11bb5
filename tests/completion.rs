//! `keycard completion bash|zsh|fish`: each script knows the subcommands, and bash accepts its
//! script's syntax.

mod common;

use std::process::Command;

use common::{ok, skip_or_fail};

#[test]
fn each_shell_gets_a_script_that_knows_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["completion", shell]);
        for sub in ["inject", "proxy", "iptables", "completion"] {
            assert!(script.contains(sub), "{shell} completion does not mention {sub}");
        }
    }
    let script = ok(&["completion", "bash"]);
    assert!(script.contains("--k8s-jwks"), "flags of nested subcommands too");
    if Command::new("bash").arg("--version").output().is_err() && skip_or_fail("bash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keycard.bash");
    std::fs::write(&file, script).unwrap();
    let out = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
}
