//! Helpers shared by the end-to-end tests: the built binary, a fresh CA on disk, outside tools.
//! `mesh` builds sidecars in the test process.

#![allow(dead_code)]

pub mod l7;
pub mod mesh;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn keycard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keycard"))
}

/// Runs `keycard args...`, asserting success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = keycard().args(args).output().expect("keycard runs");
    assert!(out.status.success(), "keycard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `keycard args...`, asserting failure with a one-line reason on stderr; returns that line.
pub fn fails(args: &[&str]) -> String {
    let out = keycard().args(args).output().expect("keycard runs");
    assert!(
        !out.status.success(),
        "keycard {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    one_line(&out)
}

pub fn one_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("keycard:")).collect();
    assert_eq!(lines.len(), 1, "want exactly one reason line on stderr, got: {stderr}");
    lines[0].to_owned()
}

/// A CA made by `keycard ca init` in a temporary directory.
pub struct TempCa {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl TempCa {
    pub fn new(td: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ca");
        ok(&["ca", "init", "--trust-domain", td, "--dir", path(&dir)]);
        Self { tmp, dir }
    }

    pub fn issue(&self, ns: &str, sa: &str, extra: &[&str]) -> PathBuf {
        let out = self.tmp.path().join("certs").join(sa);
        let mut args =
            vec!["ca", "issue", "--dir", path(&self.dir), "--ns", ns, "--sa", sa, "--out", path(&out)];
        args.extend_from_slice(extra);
        ok(&args);
        out
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Whether an outside tool test may skip when its tool is missing. CI sets
/// KEYCARD_REQUIRE_OUTSIDE_TOOLS=1, so there a missing tool fails the test instead.
pub fn skip_or_fail(what: &str) -> bool {
    if std::env::var_os("KEYCARD_REQUIRE_OUTSIDE_TOOLS").is_some() {
        panic!("{what} is required (KEYCARD_REQUIRE_OUTSIDE_TOOLS is set) but missing");
    }
    eprintln!("SKIPPED: {what} is not installed; run .ci/run or install it to run this test");
    true
}

/// `n` distinct loopback ports for a child process to bind, from below the kernel's ephemeral range
/// so no connection made meanwhile (by this or a parallel test) is given one. Each is free when
/// chosen; a process outside the tests could still take one, which is as rare as it is visible.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
    let mut port = low + (seed % u64::from(high - low)) as u16;
    let mut held = Vec::new();
    for _ in 0..u32::from(high - low) {
        if held.len() == n {
            break;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
        port = if port + 1 >= high { low } else { port + 1 };
    }
    assert_eq!(held.len(), n, "no {n} free loopback ports below the ephemeral range");
    held.iter().map(|l| l.local_addr().expect("bound").port()).collect()
}
