//! `keycard ca ...` and `keycard spiffe ...` end to end, through the built binary.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{TempCa, fails, keycard, ok, path};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_keeps_keys_private_and_refuses_to_overwrite() {
    let ca = TempCa::new("cluster.local");
    for key in ["root-key.pem", "ca-key.pem", "token-key.pem"] {
        assert_eq!(mode(&ca.dir.join(key)), 0o600, "{key}");
    }
    assert_eq!(mode(&ca.dir), 0o700);
    let before = std::fs::read(ca.dir.join("ca-key.pem")).unwrap();
    let err = fails(&["ca", "init", "--trust-domain", "cluster.local", "--dir", path(&ca.dir)]);
    assert!(err.contains("already holds a CA") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(ca.dir.join("ca-key.pem")).unwrap(), before, "refused init must not touch keys");
    ok(&["ca", "init", "--trust-domain", "cluster.local", "--dir", path(&ca.dir), "--force"]);
    assert_ne!(std::fs::read(ca.dir.join("ca-key.pem")).unwrap(), before);
}

#[test]
fn init_reports_the_chain_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = ok(&[
        "ca",
        "init",
        "--trust-domain",
        "example.org",
        "--dir",
        path(&dir),
        "--root-ttl",
        "2y",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["trust_domain"], "example.org");
    let chain = v["chain"].as_array().unwrap();
    assert_eq!(
        chain.iter().map(|c| c["kind"].as_str().unwrap()).collect::<Vec<_>>(),
        ["intermediate", "root"]
    );
    let root_secs = chain[1]["expires_in_seconds"].as_i64().unwrap();
    assert!((729 * 86_400..=731 * 86_400).contains(&root_secs), "root lifetime {root_secs}");
    assert_eq!(chain[0]["path_len"], 0);
    assert_eq!(chain[0]["spiffe_id"], "spiffe://example.org");
}

#[test]
fn issue_writes_leaf_intermediate_root_and_a_private_key() {
    let ca = TempCa::new("cluster.local");
    let out = ca.issue("default", "productpage", &["--ttl", "2h"]);
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    let json = ok(&["ca", "inspect", path(&out.join("cert.pem")), "-o", "json"]);
    let certs: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let kinds: Vec<&str> = certs.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["leaf", "intermediate", "root"]);
    let leaf = &certs[0];
    assert_eq!(leaf["spiffe_id"], "spiffe://cluster.local/ns/default/sa/productpage");
    assert_eq!(leaf["subject"], "");
    assert_eq!(leaf["san_critical"], true);
    assert_eq!(leaf["key_usage"], serde_json::json!(["digitalSignature"]));
    assert_eq!(leaf["key_usage_critical"], true);
    assert_eq!(leaf["extended_key_usage"], serde_json::json!(["serverAuth", "clientAuth"]));
    assert_eq!(leaf["is_ca"], false);
    assert_eq!(leaf["public_key"], "ECDSA P-256");
    let secs = leaf["expires_in_seconds"].as_i64().unwrap();
    assert!((7_000..=7_200).contains(&secs), "ttl 2h, got {secs}s");
    for signing in &certs[1..] {
        assert_eq!(signing["is_ca"], true);
        assert!(signing["key_usage"].as_array().unwrap().contains(&"keyCertSign".into()));
    }
    let text = ok(&["ca", "inspect", path(&out.join("cert.pem"))]);
    assert!(text.contains("SPIFFE ID:     spiffe://cluster.local/ns/default/sa/productpage"), "{text}");
}

#[test]
fn issue_refuses_names_that_are_not_path_segments() {
    let ca = TempCa::new("cluster.local");
    let out = ca.tmp.path().join("x");
    let err =
        fails(&["ca", "issue", "--dir", path(&ca.dir), "--ns", "a/b", "--sa", "x", "--out", path(&out)]);
    assert!(err.contains("namespace"), "{err}");
    assert!(!out.exists(), "nothing is written for a refused identity");
}

#[test]
fn token_prints_a_jwt_or_writes_it_privately() {
    let ca = TempCa::new("cluster.local");
    let d = path(&ca.dir);
    let token = ok(&["ca", "token", "--dir", d, "--ns", "default", "--sa", "productpage", "--ttl", "10m"]);
    assert_eq!(token.trim().split('.').count(), 3, "{token}");
    let file = ca.tmp.path().join("token");
    ok(&["ca", "token", "--dir", d, "--ns", "default", "--sa", "productpage", "--out", path(&file)]);
    assert_eq!(mode(&file), 0o600);
    let json = ok(&["ca", "token", "--dir", d, "--ns", "default", "--sa", "reviews", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://cluster.local/ns/default/sa/reviews");
    assert!(v["token"].as_str().unwrap().starts_with("ey"));
}

#[test]
fn spiffe_parse_prints_parts_and_rejects_with_one_line() {
    let out = ok(&["spiffe", "parse", "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"]);
    assert!(
        out.contains("namespace:       default") && out.contains("service account: bookinfo-ratings"),
        "{out}"
    );
    for bad in [
        "spiffe://Cluster.local/x",
        "spiffe://td/a/../b",
        "spiffe://td/x/",
        "spiffe://td:80/x",
        "spiffe://td/%41",
    ] {
        let err = fails(&["spiffe", "parse", bad]);
        assert!(err.starts_with("keycard: invalid spiffe id"), "{err}");
    }
}

#[test]
fn spiffe_parse_reads_stdin_byte_for_byte() {
    use std::io::Write as _;
    use std::process::Stdio;
    let run = |input: &[u8]| {
        let mut child = keycard()
            .args(["spiffe", "parse", "-", "-o", "json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let good = run(b"spiffe://td/ns/a/sa/b");
    assert!(good.status.success());
    let v: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(v["service_account"], "b");
    let newline = run(b"spiffe://td/ns/a/sa/b\n");
    assert!(!newline.status.success());
    assert!(common::one_line(&newline).contains("line break"));
    let not_utf8 = run(b"spiffe://td/\xff");
    assert!(!not_utf8.status.success());
    assert!(common::one_line(&not_utf8).contains("not UTF-8"));
}

#[test]
fn spiffe_verify_accepts_a_good_svid_and_names_the_rule_otherwise() {
    let ca = TempCa::new("cluster.local");
    let certs = ca.issue("default", "productpage", &[]);
    let cert = certs.join("cert.pem");
    let (bundle, cert_s) = (ca.bundle(), path(&cert).to_owned());
    let out = ok(&["spiffe", "verify", "--bundle", path(&bundle), &cert_s]);
    assert!(out.contains("spiffe://cluster.local/ns/default/sa/productpage"), "{out}");
    ok(&[
        "spiffe",
        "verify",
        "--bundle",
        path(&bundle),
        "--id",
        "spiffe://cluster.local/ns/default/sa/productpage",
        &cert_s,
    ]);

    let err = fails(&[
        "spiffe",
        "verify",
        "--bundle",
        path(&bundle),
        "--id",
        "spiffe://cluster.local/ns/default/sa/reviews",
        &cert_s,
    ]);
    assert!(err.contains("san_mismatch"), "{err}");

    let other = TempCa::new("cluster.local");
    let err = fails(&["spiffe", "verify", "--bundle", path(&other.bundle()), &cert_s]);
    assert!(err.contains("unknown_ca"), "{err}");

    let foreign = TempCa::new("other.example");
    let err = fails(&["spiffe", "verify", "--bundle", path(&foreign.bundle()), &cert_s]);
    assert!(err.contains("unknown_ca") && err.contains("trust_domain_mismatch"), "{err}");

    // The leaf alone cannot reach the root: the intermediate is missing.
    let pem = std::fs::read_to_string(&cert).unwrap();
    let leaf_only = certs.join("leaf.pem");
    let end = pem.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    std::fs::write(&leaf_only, &pem[..end]).unwrap();
    let out = keycard()
        .args(["spiffe", "verify", "--bundle", path(&bundle), path(&leaf_only), "-o", "json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["violations"][0]["rule"], "unknown_ca");
    assert_eq!(v["spiffe_id"], "spiffe://cluster.local/ns/default/sa/productpage");
}

#[test]
fn spiffe_verify_reports_expiry() {
    let ca = TempCa::new("cluster.local");
    let certs = ca.issue("default", "short", &["--ttl", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let err = fails(&["spiffe", "verify", "--bundle", path(&ca.bundle()), path(&certs.join("cert.pem"))]);
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn a_plug_in_ca_in_istio_cacerts_layout_is_adopted() {
    let upstream = TempCa::new("cluster.local");
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    for f in ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"] {
        std::fs::copy(upstream.dir.join(f), cacerts.join(f)).unwrap();
    }
    let dir = tmp.path().join("plugged");
    ok(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--dir",
        path(&dir),
        "--from-existing",
        path(&cacerts),
    ]);
    assert!(!dir.join("root-key.pem").exists(), "a plug-in CA never holds the root key");
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    let out = tmp.path().join("svid");
    ok(&["ca", "issue", "--dir", path(&dir), "--ns", "default", "--sa", "details", "--out", path(&out)]);
    // Verified against the upstream's bundle: same trust, no new root.
    ok(&["spiffe", "verify", "--bundle", path(&upstream.bundle()), path(&out.join("cert.pem"))]);

    // A key that does not match the certificate is refused, and nothing is written.
    let stranger = TempCa::new("cluster.local");
    std::fs::copy(stranger.dir.join("ca-key.pem"), cacerts.join("ca-key.pem")).unwrap();
    let bad = tmp.path().join("bad");
    let err = fails(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--dir",
        path(&bad),
        "--from-existing",
        path(&cacerts),
    ]);
    assert!(err.contains("does not match"), "{err}");
    assert!(!bad.exists());

    std::fs::remove_file(cacerts.join("root-cert.pem")).unwrap();
    let err = fails(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--dir",
        path(&bad),
        "--from-existing",
        path(&cacerts),
    ]);
    assert!(err.contains("root-cert.pem"), "{err}");
}
