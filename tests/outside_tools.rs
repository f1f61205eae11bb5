//! What keycard issues is accepted by tools we did not write: `openssl verify` for both TLS
//! purposes, the `spiffe` package from PyPI as an X.509-SVID, and curl + openssl driving
//! `keycard ca serve` (key and CSR made by openssl, renewal with curl's client certificate).
//!
//! A missing tool skips loudly here and fails under CI (KEYCARD_REQUIRE_OUTSIDE_TOOLS=1).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempCa, free_ports, path, skip_or_fail};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
        || Command::new(tool).arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn python() -> String {
    std::env::var("KEYCARD_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn have_python_spiffe() -> bool {
    Command::new(python())
        .args(["-c", "import spiffe"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Splits a PEM chain file into the leaf and the rest.
fn split_chain(chain: &Path, dir: &Path) -> (String, String) {
    let pem = std::fs::read_to_string(chain).unwrap();
    let marker = "-----END CERTIFICATE-----\n";
    let end = pem.find(marker).unwrap() + marker.len();
    let (leaf, rest) = (dir.join("leaf.pem"), dir.join("untrusted.pem"));
    std::fs::write(&leaf, &pem[..end]).unwrap();
    std::fs::write(&rest, &pem[end..]).unwrap();
    (path(&leaf).to_owned(), path(&rest).to_owned())
}

fn openssl_verify(purpose: &str, bundle: &Path, untrusted: &str, leaf: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-purpose", purpose, "-CAfile", path(bundle), "-untrusted", untrusted, leaf])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn openssl_verifies_issued_svids_for_client_and_server_use() {
    if !have("openssl") && skip_or_fail("openssl") {
        return;
    }
    let ca = TempCa::new("cluster.local");
    let certs = ca.issue("default", "productpage", &[]);
    let (leaf, untrusted) = split_chain(&certs.join("cert.pem"), &certs);
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl_verify(purpose, &ca.bundle(), &untrusted, &leaf);
        assert!(ok, "openssl verify -purpose {purpose}: {out}");
    }
    // And openssl refuses the same leaf against another CA's bundle: the check can fail.
    let other = TempCa::new("cluster.local");
    let (ok, out) = openssl_verify("sslclient", &other.bundle(), &untrusted, &leaf);
    assert!(!ok, "another CA's bundle must not verify: {out}");
}

const PY_PARSE: &str = r#"
import sys
from spiffe.svid.x509_svid import X509Svid
svid = X509Svid.parse(open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read())
print(svid.spiffe_id)
print(len(svid.cert_chain))
"#;

#[test]
fn the_pypi_spiffe_package_parses_issued_svids() {
    if !have_python_spiffe() && skip_or_fail("the spiffe package from PyPI (pip install spiffe)") {
        return;
    }
    let ca = TempCa::new("cluster.local");
    let certs = ca.issue("bookinfo", "bookinfo-ratings", &[]);
    let out = Command::new(python())
        .args(["-c", PY_PARSE, path(&certs.join("cert.pem")), path(&certs.join("key.pem"))])
        .output()
        .unwrap();
    assert!(out.status.success(), "spiffe refused the SVID: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"));
    assert_eq!(lines.next(), Some("3"));
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn curl_and_openssl_drive_ca_serve_through_issuance_and_renewal() {
    if !(have("curl") && have("openssl")) && skip_or_fail("curl and openssl") {
        return;
    }
    let ca = TempCa::new("cluster.local");
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let child = common::keycard()
        .args(["ca", "serve", "--dir", path(&ca.dir), "--listen", &listen])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut serve = Serve(child);
    let base = format!("https://127.0.0.1:{port}");
    let bundle = path(&ca.bundle()).to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = curl(&["--cacert", &bundle, &format!("{base}/v1/bundle")]);
        if code == 200 {
            assert!(body.contains("BEGIN CERTIFICATE"));
            break;
        }
        assert!(Instant::now() < deadline, "ca serve did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }

    // openssl makes the key and the CSR; the key never leaves this directory.
    let work = ca.tmp.path();
    let (key, csr) = (work.join("w.key"), work.join("w.csr"));
    let status = Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-subj", "/CN=ignored-by-the-ca", "-keyout", path(&key), "-out", path(&csr)])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let token = common::ok(&["ca", "token", "--dir", path(&ca.dir), "--ns", "default", "--sa", "details"]);
    let request = serde_json::json!({ "csr": std::fs::read_to_string(&csr).unwrap() }).to_string();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let sign_url = format!("{base}/v1/sign");
    let (code, body) = curl(&["--cacert", &bundle, "-H", &auth, "--data-binary", &request, &sign_url]);
    assert_eq!(code, 200, "{body}");
    let resp: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["spiffe_id"], "spiffe://cluster.local/ns/default/sa/details");
    let chain = work.join("chain.pem");
    std::fs::write(&chain, resp["chain"].as_str().unwrap()).unwrap();
    let (leaf, untrusted) = split_chain(&chain, work);
    let (ok, out) = openssl_verify("sslclient", &ca.bundle(), &untrusted, &leaf);
    assert!(ok, "{out}");

    // Renewal: curl presents the certificate it just got; no token.
    let (code, body) = curl(&[
        "--cacert",
        &bundle,
        "--cert",
        path(&chain),
        "--key",
        path(&key),
        "--data-binary",
        &request,
        &sign_url,
    ]);
    assert_eq!(code, 200, "{body}");
    let renewed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(renewed["spiffe_id"], "spiffe://cluster.local/ns/default/sa/details");
    assert_ne!(renewed["serial"], resp["serial"]);

    // Without either credential: refused, with the reason in the body.
    let (code, body) = curl(&["--cacert", &bundle, "--data-binary", &request, &sign_url]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("missing_credentials"), "{body}");
    let (code, metrics) = curl(&["--cacert", &bundle, &format!("{base}/metrics")]);
    assert_eq!(code, 200);
    assert!(metrics.contains("keycard_ca_certificates_issued_total{auth=\"mtls\"} 1"), "{metrics}");
    assert!(
        metrics.contains("keycard_ca_requests_refused_total{reason=\"missing_credentials\"} 1"),
        "{metrics}"
    );

    // SIGTERM stops it cleanly.
    let pid = serve.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            assert!(status.success(), "ca serve exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "ca serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
