//! JWT verification: keys made here with aws-lc-rs, tokens signed here, one refusal reason per case.

use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _,
};
use serde_json::json;

use super::*;

pub(crate) const ISS: &str = "https://issuer.example";
pub(crate) const NOW: i64 = 1_700_000_000;

pub(crate) enum Signer {
    Rsa(&'static RsaKeyPair),
    Ec(EcdsaKeyPair, usize),
    Ed(Ed25519KeyPair),
}

/// RSA key generation is slow: one key for the whole test binary.
fn rsa_key() -> &'static RsaKeyPair {
    static KEY: OnceLock<RsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| RsaKeyPair::generate(KeySize::Rsa2048).unwrap())
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    fn rsa() -> Self {
        Self::Rsa(rsa_key())
    }

    pub(crate) fn p256() -> Self {
        Self::Ec(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(), 32)
    }

    fn p384() -> Self {
        Self::Ec(EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap(), 48)
    }

    fn ed25519() -> Self {
        Self::Ed(Ed25519KeyPair::generate().unwrap())
    }

    /// The public JWK, with `kid` when given.
    pub(crate) fn jwk(&self, kid: Option<&str>) -> Value {
        let mut jwk = match self {
            Self::Rsa(k) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                json!({"kty": "RSA", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Self::Ec(k, len) => {
                let point = k.public_key().as_ref();
                let crv = if *len == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "x": b64(&point[1..=*len]), "y": b64(&point[1 + len..])})
            }
            Self::Ed(k) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key().as_ref())}),
        };
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    fn jwks(&self, kid: Option<&str>) -> Jwks {
        Jwks::parse(&json!({"keys": [self.jwk(kid)]}).to_string()).unwrap()
    }

    pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
        let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let rng = SystemRandom::new();
        let sig = match self {
            Self::Rsa(k) => {
                let padding: &'static dyn signature::RsaEncoding = match header["alg"].as_str() {
                    Some("PS256") => &signature::RSA_PSS_SHA256,
                    Some("PS512") => &signature::RSA_PSS_SHA512,
                    Some("RS384") => &signature::RSA_PKCS1_SHA384,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(padding, &rng, signed.as_bytes(), &mut sig).unwrap();
                sig
            }
            Self::Ec(k, _) => k.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec(),
            Self::Ed(k) => k.sign(signed.as_bytes()).as_ref().to_vec(),
        };
        format!("{signed}.{}", b64(&sig))
    }

    /// A token with `alg`, kid `k1` and `claims` added to a valid `iss`/`sub`/`exp`.
    pub(crate) fn token(&self, alg: &str, claims: Value) -> String {
        let mut all = json!({"iss": ISS, "sub": "alice", "exp": NOW + 600});
        for (k, v) in claims.as_object().unwrap() {
            all[k] = v.clone();
        }
        self.sign(&json!({"alg": alg, "typ": "JWT", "kid": "k1"}), &all)
    }
}

fn rule(audiences: &[&str]) -> JwtRule {
    JwtRule {
        namespace: "default".into(),
        policy: "jwt".into(),
        issuer: ISS.into(),
        audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        jwks: None,
        jwks_uri: None,
        from_headers: Vec::new(),
        from_params: Vec::new(),
        from_cookies: Vec::new(),
        forward_original_token: false,
        output_payload_to_header: None,
        output_claim_to_headers: Vec::new(),
        timeout: None,
    }
}

#[test]
fn every_accepted_algorithm_verifies_with_its_key_type() {
    let cases: Vec<(Signer, &str)> = vec![
        (Signer::rsa(), "RS256"),
        (Signer::rsa(), "RS384"),
        (Signer::rsa(), "PS256"),
        (Signer::rsa(), "PS512"),
        (Signer::p256(), "ES256"),
        (Signer::p384(), "ES384"),
        (Signer::ed25519(), "EdDSA"),
    ];
    for (signer, alg) in cases {
        let token = signer.token(alg, json!({}));
        let v = verify(&token, &rule(&[]), &signer.jwks(Some("k1")), NOW);
        let v = v.unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!((v.issuer.as_str(), v.subject.as_str()), (ISS, "alice"), "{alg}");
        assert_eq!(v.principal, format!("{ISS}/alice"));
        assert_eq!(v.payload_b64, token.split('.').nth(1).unwrap());
    }
}

#[test]
fn each_refusal_has_its_reason() {
    let rsa = Signer::rsa();
    let ec = Signer::p256();
    let other_ec = Signer::p256();
    let rsa_jwks = rsa.jwks(Some("k1"));
    let ec_jwks = ec.jwks(Some("k1"));
    let good = |s: &Signer, alg: &str| s.token(alg, json!({}));
    let tamper = |t: String| {
        let mut parts: Vec<&str> = t.split('.').collect();
        let payload = b64(json!({"iss": ISS, "sub": "mallory", "exp": NOW + 600}).to_string().as_bytes());
        parts[1] = &payload;
        parts.join(".")
    };
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(json!({"iss": ISS, "sub": "alice"}).to_string().as_bytes())
    );
    let hmac = format!(
        "{}.{}.c2ln",
        b64(br#"{"alg":"HS256","kid":"k1"}"#),
        b64(json!({"iss": ISS}).to_string().as_bytes())
    );
    let cases: Vec<(&str, String, &Jwks, JwtRule, &str)> = vec![
        ("rs256 tampered payload", tamper(good(&rsa, "RS256")), &rsa_jwks, rule(&[]), "bad_signature"),
        ("es256 tampered payload", tamper(good(&ec, "ES256")), &ec_jwks, rule(&[]), "bad_signature"),
        ("es256 signed by another key", good(&other_ec, "ES256"), &ec_jwks, rule(&[]), "bad_signature"),
        (
            "rs256 expired past the leeway",
            rsa.token("RS256", json!({"exp": NOW - 61})),
            &rsa_jwks,
            rule(&[]),
            "expired",
        ),
        (
            "es256 expired past the leeway",
            ec.token("ES256", json!({"exp": NOW - 3600})),
            &ec_jwks,
            rule(&[]),
            "expired",
        ),
        (
            "nbf in the future",
            ec.token("ES256", json!({"nbf": NOW + 61})),
            &ec_jwks,
            rule(&[]),
            "not_yet_valid",
        ),
        (
            "other issuer",
            ec.token("ES256", json!({"iss": "https://evil"})),
            &ec_jwks,
            rule(&[]),
            "issuer_mismatch",
        ),
        (
            "no issuer",
            ec.sign(&json!({"alg": "ES256"}), &json!({"sub": "a"})),
            &ec_jwks,
            rule(&[]),
            "issuer_mismatch",
        ),
        (
            "wrong audience",
            ec.token("ES256", json!({"aud": "other"})),
            &ec_jwks,
            rule(&["svc"]),
            "audience_mismatch",
        ),
        ("no audience", good(&ec, "ES256"), &ec_jwks, rule(&["svc"]), "audience_mismatch"),
        (
            "unknown kid",
            ec.sign(&json!({"alg": "ES256", "kid": "k2"}), &json!({"iss": ISS})),
            &ec_jwks,
            rule(&[]),
            "unknown_key",
        ),
        ("ES256 token, RSA key set", good(&ec, "ES256"), &rsa_jwks, rule(&[]), "unknown_key"),
        ("ES384 claimed over a P-256 key", good(&ec, "ES384"), &ec_jwks, rule(&[]), "unknown_key"),
        ("alg none", unsigned, &ec_jwks, rule(&[]), "unsupported_algorithm"),
        ("HMAC", hmac, &ec_jwks, rule(&[]), "unsupported_algorithm"),
        ("two segments", "a.b".into(), &ec_jwks, rule(&[]), "malformed"),
        ("four segments", format!("{}.x", good(&ec, "ES256")), &ec_jwks, rule(&[]), "malformed"),
        ("padded base64", good(&ec, "ES256").replacen('.', "=.", 1), &ec_jwks, rule(&[]), "malformed"),
        (
            "payload not JSON",
            format!("{}.{}.", b64(br#"{"alg":"ES256"}"#), b64(b"[1")),
            &ec_jwks,
            rule(&[]),
            "malformed",
        ),
        ("exp not a number", ec.token("ES256", json!({"exp": "soon"})), &ec_jwks, rule(&[]), "malformed"),
        (
            "crit header",
            ec.sign(&json!({"alg": "ES256", "kid": "k1", "crit": ["b64"]}), &json!({"iss": ISS})),
            &ec_jwks,
            rule(&[]),
            "malformed",
        ),
    ];
    for (what, token, jwks, rule, reason) in cases {
        match verify(&token, &rule, jwks, NOW) {
            Ok(v) => panic!("{what}: verified as {}", v.principal),
            Err(e) => assert_eq!(e.reason(), reason, "{what}: {e}"),
        }
    }
}

#[test]
fn time_claims_have_sixty_seconds_of_leeway_and_are_optional() {
    let ec = Signer::p256();
    let jwks = ec.jwks(Some("k1"));
    let cases: &[(Value, bool)] = &[
        (json!({"exp": NOW - 60}), true),
        (json!({"exp": NOW - 61}), false),
        (json!({"exp": 1_699_999_939.5}), false),
        (json!({"nbf": NOW + 60}), true),
        (json!({"nbf": NOW + 61}), false),
        (json!({"exp": null}), false),
    ];
    for (claims, ok) in cases {
        let token = ec.token("ES256", claims.clone());
        assert_eq!(verify(&token, &rule(&[]), &jwks, NOW).is_ok(), *ok, "{claims}");
    }
    let no_exp = ec.sign(&json!({"alg": "ES256"}), &json!({"iss": ISS, "sub": "a"}));
    assert!(verify(&no_exp, &rule(&[]), &jwks, i64::MAX).is_ok(), "a token without exp does not expire");
}

#[test]
fn audiences_accept_a_string_or_any_item_of_a_list() {
    let ec = Signer::p256();
    let jwks = ec.jwks(None);
    let cases: &[(Value, &[&str], bool)] = &[
        (json!("svc"), &["svc"], true),
        (json!(["a", "svc"]), &["svc", "other"], true),
        (json!(["a", "b"]), &["svc"], false),
        (json!("anything"), &[], true),
        (json!([]), &["svc"], false),
    ];
    for (aud, accepted, ok) in cases {
        let token = ec.token("ES256", json!({ "aud": aud }));
        assert_eq!(verify(&token, &rule(accepted), &jwks, NOW).is_ok(), *ok, "{aud} against {accepted:?}");
    }
}

#[test]
fn keys_are_chosen_by_kid_else_every_key_that_fits_is_tried() {
    let (a, b) = (Signer::p256(), Signer::p256());
    let both = Jwks::parse(&json!({"keys": [a.jwk(Some("a")), b.jwk(Some("b"))]}).to_string()).unwrap();
    let unnamed = Jwks::parse(&json!({"keys": [a.jwk(None), b.jwk(None)]}).to_string()).unwrap();
    let by_b_as_b = b.sign(&json!({"alg": "ES256", "kid": "b"}), &json!({"iss": ISS}));
    let by_b_as_a = b.sign(&json!({"alg": "ES256", "kid": "a"}), &json!({"iss": ISS}));
    let by_b_no_kid = b.sign(&json!({"alg": "ES256"}), &json!({"iss": ISS}));
    let by_b_kid_c = b.sign(&json!({"alg": "ES256", "kid": "c"}), &json!({"iss": ISS}));
    let cases: &[(&str, &String, &Jwks, Result<(), &str>)] = &[
        ("kid names the signing key", &by_b_as_b, &both, Ok(())),
        ("kid names another key", &by_b_as_a, &both, Err("bad_signature")),
        ("no kid: every key tried", &by_b_no_kid, &both, Ok(())),
        ("kid, keys without kid: all tried", &by_b_kid_c, &unnamed, Ok(())),
        ("kid absent from a named set", &by_b_kid_c, &both, Err("unknown_key")),
    ];
    for (what, token, jwks, want) in cases {
        let got = verify(token, &rule(&[]), jwks, NOW).map(|_| ()).map_err(|e| e.reason());
        assert_eq!(got, *want, "{what}");
    }
}

#[test]
fn a_key_with_its_own_alg_verifies_only_that_alg() {
    let rsa = Signer::rsa();
    let mut jwk = rsa.jwk(Some("k1"));
    jwk["alg"] = json!("RS256");
    let jwks = Jwks::parse(&json!({"keys": [jwk]}).to_string()).unwrap();
    assert!(verify(&rsa.token("RS256", json!({})), &rule(&[]), &jwks, NOW).is_ok());
    let ps = verify(&rsa.token("PS256", json!({})), &rule(&[]), &jwks, NOW);
    assert_eq!(ps.map(|_| ()).map_err(|e| e.reason()), Err("unknown_key"));
}

#[test]
fn claims_flatten_lists_scalars_and_nested_objects() {
    let ec = Signer::p256();
    let token = ec.token(
        "ES256",
        json!({
            "aud": ["a", "b"], "azp": "client", "groups": ["dev", "ops"], "admin": true, "level": 3,
            "realm": {"roles": ["x", "y"], "tier": {"name": "gold"}}, "nothing": null,
        }),
    );
    let v = verify(&token, &rule(&[]), &ec.jwks(Some("k1")), NOW).unwrap();
    let get = |k: &str| v.claims.get(k).cloned().unwrap_or_default();
    let cases: &[(&str, &[&str])] = &[
        ("aud", &["a", "b"]),
        ("azp", &["client"]),
        ("groups", &["dev", "ops"]),
        ("admin", &["true"]),
        ("level", &["3"]),
        ("realm.roles", &["x", "y"]),
        ("realm.tier.name", &["gold"]),
        ("iss", &[ISS]),
        ("nothing", &[]),
        ("realm", &[]),
    ];
    for (key, want) in cases {
        assert_eq!(get(key), *want, "{key}");
    }
}

#[test]
fn the_issuer_is_read_without_verifying() {
    let ec = Signer::p256();
    assert_eq!(issuer_of(&ec.token("ES256", json!({}))).unwrap(), ISS);
    let cases: &[(String, &str)] = &[
        ("x.y".into(), "malformed"),
        (ec.sign(&json!({"alg": "ES256"}), &json!({"sub": "a"})), "malformed"),
        (ec.sign(&json!({"alg": "ES256"}), &json!({"iss": 7})), "malformed"),
    ];
    for (token, reason) in cases {
        assert_eq!(issuer_of(token).map_err(|e| e.reason()), Err(*reason), "{token}");
    }
}

#[test]
fn key_sets_keep_usable_signature_keys_and_refuse_sets_without_any() {
    let (rsa, ec, ed) = (Signer::rsa(), Signer::p384(), Signer::ed25519());
    let oct = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"});
    let enc = {
        let mut k = rsa.jwk(Some("e"));
        k["use"] = json!("enc");
        k
    };
    let mixed = json!({"keys": [rsa.jwk(Some("r")), oct, enc, ec.jwk(None), ed.jwk(Some("d"))]});
    let jwks = Jwks::parse(&mixed.to_string()).unwrap();
    assert_eq!(jwks.len(), 3, "oct and enc keys are skipped: {jwks:?}");
    let dump = serde_json::to_value(&jwks).unwrap();
    assert_eq!(dump[0]["kid"], "r");
    assert_eq!(dump[1]["kty"], "EC P-384");
    assert!(!dump.to_string().contains(rsa.jwk(None)["n"].as_str().unwrap()), "no key material in dumps");

    let short_rsa = json!({"kty": "RSA", "n": b64(&[0xc5; 128]), "e": "AQAB"});
    let bad_point = json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[1; 32])});
    let p521 = json!({"kty": "EC", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[1; 66])});
    let x25519 = json!({"kty": "OKP", "crv": "X25519", "x": b64(&[1; 32])});
    let hs_alg = {
        let mut k = rsa.jwk(None);
        k["alg"] = json!("HS256");
        k
    };
    let ec_alg_on_rsa = {
        let mut k = rsa.jwk(None);
        k["alg"] = json!("ES256");
        k
    };
    let cases: &[(&str, String, &str)] = &[
        ("not JSON", "{".into(), "not a JSON Web Key Set"),
        ("no keys field", "{}".into(), "not a JSON Web Key Set"),
        ("empty", json!({"keys": []}).to_string(), "it has no keys"),
        ("RSA under 2048 bits", json!({"keys": [short_rsa]}).to_string(), "2048 bits"),
        ("EC point of the wrong size", json!({"keys": [bad_point]}).to_string(), "wrong length"),
        ("P-521", json!({"keys": [p521]}).to_string(), "not P-256 or P-384"),
        ("X25519", json!({"keys": [x25519]}).to_string(), "not a JWK"),
        ("HMAC alg", json!({"keys": [hs_alg]}).to_string(), "not a signature algorithm"),
        ("alg that does not fit", json!({"keys": [ec_alg_on_rsa]}).to_string(), "does not fit"),
        ("unknown kty", json!({"keys": [{"kty": "XYZ"}]}).to_string(), "not a JWK"),
        (
            "bad base64",
            json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "a+b/"}]}).to_string(),
            "base64url",
        ),
    ];
    for (what, json, want) in cases {
        match Jwks::parse(json) {
            Ok(j) => panic!("{what}: parsed as {j:?}"),
            Err(e) => {
                assert_eq!(e.reason(), "invalid_jwks", "{what}");
                assert!(e.to_string().contains(want), "{what}: {e} should say {want}");
            }
        }
    }
}
