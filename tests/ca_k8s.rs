//! The CA accepts a pod's projected Kubernetes service-account token: `keycard ca serve
//! --k8s-issuer --k8s-jwks` and a `keycard proxy` that bootstraps with the token file, as an
//! injected pod does; and the refusals (audience, issuer, expiry, key, no `exp`), counted.
//!
//! The "cluster" is an RSA key (RS256, what the API server signs with), its JWKS in a file, and
//! tokens shaped like kubelet's.

mod common;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::mesh::{http_get, wait_ready};
use common::{TempCa, fails, free_ports, keycard, path};
use keycard_ca::k8s::ServiceAccountTokens;
use keycard_ca::server::ServeOptions;
use keycard_config::SpiffeId;
use keycard_proxy::identity::{CaClient, ClientError, Credential, new_key_and_csr};
use serde_json::json;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cluster's token signing key and its public key set.
struct Cluster {
    key: jsonwebtoken::EncodingKey,
    jwks: String,
}

impl Cluster {
    fn new(kid: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let (_, spki) =
            <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(&spki)
                .unwrap();
        let x509_parser::public_key::PublicKey::RSA(rsa) = spki.parsed().unwrap() else { panic!("RSA") };
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let n = rsa.modulus.iter().skip_while(|b| **b == 0).copied().collect::<Vec<u8>>();
        let jwks = json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                                    "n": b64(&n), "e": b64(rsa.exponent)}]})
        .to_string();
        // jsonwebtoken signs with a PKCS#1 key: the OCTET STRING inside rcgen's PKCS#8.
        let pkcs8 = key.serialize_der();
        let (_, info) = x509_parser::der_parser::parse_der(&pkcs8).unwrap();
        let pkcs1 = info.as_sequence().unwrap()[2].as_slice().unwrap();
        let key = jsonwebtoken::EncodingKey::from_rsa_der(pkcs1);
        Self { key, jwks }
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A projected token as kubelet writes it for a pod of `ns`/`sa`, audience `keycard-ca`.
fn projected(ns: &str, sa: &str) -> serde_json::Value {
    let t = now();
    json!({
        "aud": ["keycard-ca"], "exp": t + 3600, "iat": t, "nbf": t, "iss": ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "pod": {"name": format!("{sa}-7d4b9c-x2x"), "uid": "0f0e"},
                          "serviceaccount": {"name": sa, "uid": "1a2b"}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_bootstraps_with_its_pods_projected_token() {
    let ca = TempCa::new("cluster.local");
    let cluster = Cluster::new("k1");
    let dir = ca.tmp.path();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, &cluster.jwks).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, cluster.sign(&projected("shop", "cart"))).unwrap();

    let [ca_port, admin, metrics, ready] = free_ports(4)[..] else { unreachable!() };
    let listen = format!("127.0.0.1:{ca_port}");
    let ca_proc = keycard()
        .args(["ca", "serve", "--dir", path(&ca.dir), "--listen", &listen])
        .args(["--k8s-issuer", ISSUER, "--k8s-jwks", path(&jwks)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _ca_proc = Proc(ca_proc);
    let cfg = format!(
        "workload: {{trust_domain: cluster.local, namespace: shop, service_account: cart}}
identity:
  ca: {{url: 'https://{listen}', token_file: {t}, bundle: {b}, ttl: 1h}}
admin: 127.0.0.1:{admin}
metrics: 127.0.0.1:{metrics}
readiness: 127.0.0.1:{ready}
",
        t = path(&token),
        b = path(&ca.bundle()),
    );
    let cfg_path = dir.join("sidecar.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    // The sidecar retries the CA with backoff, so it may start first.
    let sidecar =
        keycard().args(["proxy", "--config", path(&cfg_path)]).stdout(Stdio::null()).spawn().unwrap();
    let _sidecar = Proc(sidecar);
    wait_ready(format!("127.0.0.1:{ready}").parse().unwrap()).await;
    let (code, certs) = http_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/certs").await.unwrap();
    assert_eq!(code, 200, "{certs}");
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/cart");
}

#[tokio::test]
async fn tokens_for_another_audience_issuer_time_or_key_are_refused_and_counted() {
    let ca = TempCa::new("cluster.local");
    let cluster = Cluster::new("k1");
    let jwks = ca.tmp.path().join("jwks.json");
    std::fs::write(&jwks, &cluster.jwks).unwrap();
    let loaded = keycard_ca::store::load(&ca.dir, time::OffsetDateTime::now_utc()).unwrap();
    let td = loaded.authority.trust_domain().clone();
    let bundle = loaded.authority.bundle().clone();
    let tokens = ServiceAccountTokens::load(ISSUER.into(), "keycard-ca".into(), jwks, td).unwrap();
    let bootstrap = loaded.tokens.mint(&id("default", "reviews"), now(), 60).unwrap();
    let opts = ServeOptions { kubernetes: Some(Arc::new(tokens)), ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let registry = prometheus::Registry::new();
    tokio::spawn(keycard_ca::server::serve(listener, loaded, opts, registry.clone(), std::future::pending()));
    let client = CaClient::new(&url, bundle, Duration::from_secs(5)).unwrap();
    let sign = |token: String, ns: &'static str, sa: &'static str| {
        let client = client.clone();
        async move {
            let (_key, csr) = new_key_and_csr(&id(ns, sa)).unwrap();
            client.sign(&csr, None, &Credential::Token(token)).await
        }
    };

    let ok = sign(cluster.sign(&projected("shop", "cart")), "shop", "cart").await.unwrap();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/shop/sa/cart");
    // The CA's own bootstrap tokens still work beside them.
    assert_eq!(
        sign(bootstrap, "default", "reviews").await.unwrap().spiffe_id,
        id("default", "reviews").as_str()
    );

    let with = |field: &str, value: serde_json::Value| {
        let mut claims = projected("shop", "cart");
        claims[field] = value;
        cluster.sign(&claims)
    };
    let stranger = Cluster::new("k1");
    let mut legacy = projected("shop", "cart");
    legacy.as_object_mut().unwrap().remove("exp");
    let cases = [
        (
            "wrong audience",
            with("aud", json!(["https://kubernetes.default.svc"])),
            "invalid_token",
            "audience",
        ),
        ("wrong issuer", with("iss", json!("https://other.example")), "invalid_token", "issuer"),
        ("expired", with("exp", json!(now() - 600)), "expired_token", "expired"),
        ("another key", stranger.sign(&projected("shop", "cart")), "invalid_token", "signature"),
        ("no expiry", cluster.sign(&legacy), "invalid_token", "no `exp`"),
        (
            "not a service account",
            with("sub", json!("system:node:n1")),
            "invalid_token",
            "names no service account",
        ),
    ];
    for (what, token, reason, words) in cases {
        match sign(token, "shop", "cart").await {
            Err(ClientError::Refused { status, reason: got, message }) => {
                assert_eq!((status.as_u16(), got.as_str()), (401, reason), "{what}: {message}");
                assert!(message.contains(words), "{what}: {message:?} should say {words:?}");
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }

    let m = keycard_ca::metrics::encode(&registry);
    let series = |s: &str| m.lines().find_map(|l| l.strip_prefix(s)?.trim().parse::<f64>().ok());
    assert_eq!(series("keycard_ca_certificates_issued_total{auth=\"kubernetes\"}"), Some(1.0), "{m}");
    assert_eq!(series("keycard_ca_certificates_issued_total{auth=\"token\"}"), Some(1.0), "{m}");
    assert_eq!(series("keycard_ca_requests_refused_total{reason=\"invalid_token\"}"), Some(5.0), "{m}");
    assert_eq!(series("keycard_ca_requests_refused_total{reason=\"expired_token\"}"), Some(1.0), "{m}");
}

#[test]
fn the_flags_come_together_and_a_bad_key_set_is_named() {
    let ca = TempCa::new("cluster.local");
    let out =
        keycard().args(["ca", "serve", "--dir", path(&ca.dir), "--k8s-issuer", ISSUER]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--k8s-jwks"), "{stderr}");
    let jwks = ca.tmp.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let line =
        fails(&["ca", "serve", "--dir", path(&ca.dir), "--k8s-issuer", ISSUER, "--k8s-jwks", path(&jwks)]);
    assert!(line.contains("jwks.json") && line.contains("no usable signature key"), "{line}");
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap()
}
