use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::json;

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

struct Cluster {
    key: EcdsaKeyPair,
    _dir: tempfile::TempDir,
    jwks: PathBuf,
}

impl Cluster {
    fn new() -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, jwks_of(&key, "k1")).unwrap();
        Self { key, _dir: dir, jwks }
    }

    fn tokens(&self) -> ServiceAccountTokens {
        let td = TrustDomain::parse("cluster.local").unwrap();
        ServiceAccountTokens::load(ISSUER.into(), DEFAULT_AUDIENCE.into(), self.jwks.clone(), td).unwrap()
    }

    fn sign(&self, claims: serde_json::Value) -> String {
        sign_with(&self.key, "k1", &claims)
    }
}

fn jwks_of(key: &EcdsaKeyPair, kid: &str) -> String {
    let point = key.public_key().as_ref();
    let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
    json!({"keys": [{"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"}]})
        .to_string()
}

fn sign_with(key: &EcdsaKeyPair, kid: &str, claims: &serde_json::Value) -> String {
    let header = B64.encode(json!({"alg": "ES256", "kid": kid}).to_string());
    let input = format!("{header}.{}", B64.encode(claims.to_string()));
    let sig = key.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// A projected token as kubelet makes it.
fn projected(ns: &str, sa: &str, exp: i64) -> serde_json::Value {
    json!({
        "aud": ["keycard-ca"], "exp": exp, "iat": exp - 3600, "nbf": exp - 3600, "iss": ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "pod": {"name": "p-1", "uid": "u1"},
                          "serviceaccount": {"name": sa, "uid": "u2"}}
    })
}

#[test]
fn a_projected_token_proves_its_service_account() {
    let c = Cluster::new();
    let id = c.tokens().verify(&c.sign(projected("shop", "cart", 10_000)), 9_000).unwrap();
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/cart");

    // The kubernetes.io claim alone is enough; a `sub` that disagrees with it is refused.
    let mut only_claim = projected("shop", "cart", 10_000);
    only_claim.as_object_mut().unwrap().remove("sub");
    assert_eq!(c.tokens().verify(&c.sign(only_claim), 9_000).unwrap(), id);
    let mut forged = projected("shop", "cart", 10_000);
    forged["sub"] = json!("system:serviceaccount:kube-system:admin");
    assert!(matches!(c.tokens().verify(&c.sign(forged), 9_000), Err(K8sTokenError::Inconsistent { .. })));
}

#[test]
fn tokens_for_others_old_or_without_expiry_are_refused() {
    let c = Cluster::new();
    let t = c.tokens();
    let reason = |claims: serde_json::Value| match t.verify(&c.sign(claims), 9_000) {
        Err(K8sTokenError::Jwt(e)) => e.reason(),
        other => panic!("{other:?}"),
    };
    let mut aud = projected("a", "b", 10_000);
    aud["aud"] = json!(["https://kubernetes.default.svc"]);
    assert_eq!(reason(aud), "audience_mismatch");
    let mut iss = projected("a", "b", 10_000);
    iss["iss"] = json!("https://other-cluster");
    assert_eq!(reason(iss), "issuer_mismatch");
    assert_eq!(reason(projected("a", "b", 8_000)), "expired");

    let mut legacy = projected("a", "b", 0);
    legacy.as_object_mut().unwrap().remove("exp");
    assert_eq!(t.verify(&c.sign(legacy), 9_000), Err(K8sTokenError::NoExpiry));
    let mut user = projected("a", "b", 10_000);
    user.as_object_mut().unwrap().remove("kubernetes.io");
    user["sub"] = json!("alice");
    assert!(matches!(t.verify(&c.sign(user), 9_000), Err(K8sTokenError::NoServiceAccount(_))));

    let other = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let foreign = sign_with(&other, "k1", &projected("a", "b", 10_000));
    assert!(matches!(t.verify(&foreign, 9_000), Err(K8sTokenError::Jwt(JwtError::BadSignature))));
}

#[test]
fn the_key_set_is_reloaded_when_its_file_changes_and_a_bad_file_keeps_the_old_keys() {
    let c = Cluster::new();
    let t = c.tokens();
    let rotated = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let token = sign_with(&rotated, "k2", &projected("a", "b", 10_000));
    assert!(t.verify(&token, 9_000).is_err(), "not yet published");
    // One byte longer, so the change shows even where modification times are coarse.
    std::fs::write(&c.jwks, jwks_of(&rotated, "k2") + "\n").unwrap();
    assert!(t.verify(&token, 9_000).is_ok(), "published keys are picked up without a restart");

    std::fs::write(&c.jwks, "{not json").unwrap();
    assert!(t.verify(&token, 9_000).is_ok(), "a broken file keeps the last good keys");
}
