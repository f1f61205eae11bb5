//! JSON Web Token verification for RequestAuthentication, pure: the key set comes parsed (inline in
//! the policy, or fetched by the proxy and parsed with [`Jwks::parse`]), the clock comes as an
//! argument, and nothing is read or fetched here.
//!
//! What is accepted is what Istio's Envoy accepts: RS256/384/512, PS256/384/512, ES256, ES384 and
//! EdDSA (Ed25519), taken from the token's `alg` and checked against the key's type (and against
//! the key's own `alg` when the JWKS gives one). `none` and HMAC are refused: a published key set
//! cannot hold a shared secret. `exp` and `nbf` are optional and, when present, checked with 60 s
//! of leeway, Envoy's default. The signature is checked before any claim, so a forged token is
//! reported as `bad_signature` and never as `expired`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::policy::JwtRule;

/// Seconds of clock skew allowed on `exp` and `nbf` (Envoy's `clock_skew_seconds` default).
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Why a token or a key set was refused. [`JwtError::reason`] is the label for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    InvalidJwks(String),
    #[error("the signature does not verify with any key that fits the token")]
    BadSignature,
    #[error("expired at {exp} (now {now}, 60 s leeway)")]
    Expired { exp: i64, now: i64 },
    #[error("not valid before {nbf} (now {now}, 60 s leeway)")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("issuer {found:?} is not the expected {expected:?}")]
    IssuerMismatch { expected: String, found: Option<String> },
    #[error("none of the token's audiences {found:?} is accepted")]
    AudienceMismatch { found: Vec<String> },
    #[error("no key in the key set for kid {kid:?} and algorithm {alg}")]
    UnknownKey { kid: Option<String>, alg: String },
    #[error("algorithm {0:?} is not accepted")]
    UnsupportedAlgorithm(String),
}

impl JwtError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::InvalidJwks(_) => "invalid_jwks",
            Self::BadSignature => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::IssuerMismatch { .. } => "issuer_mismatch",
            Self::AudienceMismatch { .. } => "audience_mismatch",
            Self::UnknownKey { .. } => "unknown_key",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
        }
    }
}

/// A parsed JSON Web Key Set: its usable signature keys, ready to verify. Cheap to clone.
///
/// Keys keycard cannot use (symmetric `oct` keys, other curves, RSA under 2048 bits, encryption
/// keys) are skipped, as Envoy skips them; a set with no usable key at all is an error.
#[derive(Clone)]
pub struct Jwks {
    keys: Arc<[Key]>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, which then is the only algorithm it verifies.
    alg: Option<Algorithm>,
    kind: KeyKind,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::{ES256, ES384, EdDSA, PS256, PS384, PS512, RS256, RS384, RS512};
        match self {
            Self::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Self::EcP256 => alg == ES256,
            Self::EcP384 => alg == ES384,
            Self::Ed25519 => alg == EdDSA,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rsa => "RSA",
            Self::EcP256 => "EC P-256",
            Self::EcP384 => "EC P-384",
            Self::Ed25519 => "OKP Ed25519",
        }
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`).
    pub fn parse(json: &str) -> Result<Self, JwtError> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set = serde_json::from_str(json)
            .map_err(|e| JwtError::InvalidJwks(format!("not a JSON Web Key Set: {e}")))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, value) in set.keys.into_iter().enumerate() {
            match Key::from_json(value) {
                Ok(key) => keys.push(key),
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() { "it has no keys".to_owned() } else { skipped.join("; ") };
            return Err(JwtError::InvalidJwks(format!("no usable signature key in the key set: {why}")));
        }
        Ok(Self { keys: keys.into() })
    }

    /// The number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys that may have signed a token with `kid` and `alg`: with a kid, the keys with that
    /// kid, or if there are none the keys without a kid; without one, every key.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<&Key> {
        let fits = |k: &&Key| k.kind.fits(alg) && k.alg.is_none_or(|a| a == alg);
        let by_kid = |want: Option<&str>| -> Vec<&Key> {
            self.keys.iter().filter(|k| k.kid.as_deref() == want).filter(fits).collect()
        };
        match kid {
            Some(kid) => {
                let named = by_kid(Some(kid));
                if named.is_empty() { by_kid(None) } else { named }
            }
            None => self.keys.iter().filter(fits).collect(),
        }
    }
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.iter().map(Key::summary)).finish()
    }
}

/// Shown as the list of keys (`kid`, type, `alg`), never their material.
impl Serialize for Jwks {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.keys.iter().map(Key::summary))
    }
}

#[derive(Debug, Serialize)]
struct KeySummary<'a> {
    kid: Option<&'a str>,
    kty: &'static str,
    alg: Option<String>,
}

impl Key {
    fn summary(&self) -> KeySummary<'_> {
        KeySummary {
            kid: self.kid.as_deref(),
            kty: self.kind.name(),
            alg: self.alg.map(|a| format!("{a:?}")),
        }
    }

    fn from_json(value: Value) -> Result<Self, String> {
        if let Some(u) = value.get("use").filter(|u| u.as_str() != Some("sig")) {
            return Err(format!("`use` is {u}, not \"sig\""));
        }
        let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("not a JWK: {e}"))?;
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(
                Algorithm::from_str(&a.to_string())
                    .ok()
                    .filter(|a| a.family() != AlgorithmFamily::Hmac)
                    .ok_or_else(|| format!("`alg` {a} is not a signature algorithm keycard accepts"))?,
            ),
        };
        let bytes = |field: &str, b64: &str| {
            URL_SAFE_NO_PAD.decode(b64).map_err(|_| format!("`{field}` is not unpadded base64url"))
        };
        let material = |r: jsonwebtoken::errors::Result<DecodingKey>| r.map_err(|e| format!("bad key: {e}"));
        let (kind, key) = match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => {
                let n = bytes("n", &p.n)?;
                let significant = n.iter().skip_while(|b| **b == 0).count();
                if significant < 256 || bytes("e", &p.e)?.is_empty() {
                    return Err("RSA keys must have at least 2048 bits".into());
                }
                (KeyKind::Rsa, material(DecodingKey::from_rsa_components(&p.n, &p.e))?)
            }
            AlgorithmParameters::EllipticCurve(p) => {
                let (kind, len) = match p.curve {
                    EllipticCurve::P256 => (KeyKind::EcP256, 32),
                    EllipticCurve::P384 => (KeyKind::EcP384, 48),
                    _ => return Err(format!("curve {:?} is not P-256 or P-384", p.curve)),
                };
                if bytes("x", &p.x)?.len() != len || bytes("y", &p.y)?.len() != len {
                    return Err("EC coordinates have the wrong length for the curve".into());
                }
                (kind, material(DecodingKey::from_ec_components(&p.x, &p.y))?)
            }
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 || bytes("x", &p.x)?.len() != 32 {
                    return Err("OKP keys must be Ed25519".into());
                }
                (KeyKind::Ed25519, material(DecodingKey::from_ed_components(&p.x))?)
            }
            AlgorithmParameters::OctetKey(_) => return Err("symmetric (oct) keys are not accepted".into()),
        };
        if let Some(a) = alg.filter(|a| !kind.fits(*a)) {
            return Err(format!("`alg` {a:?} does not fit a {} key", kind.name()));
        }
        Ok(Self { kid: jwk.common.key_id, alg, kind, key })
    }
}

/// A token that verified against a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    pub issuer: String,
    /// `sub`, empty when the token has none.
    pub subject: String,
    /// `iss/sub`: `request.auth.principal` and `requestPrincipals`.
    pub principal: String,
    /// Every claim: strings, numbers and booleans as strings, lists as their elements, nested
    /// objects flattened with `.` (`{"a":{"b":"x"}}` is `"a.b" => ["x"]`); `null` is left out.
    pub claims: BTreeMap<String, Vec<String>>,
    /// The token's payload segment (base64url JSON), for `outputPayloadToHeader`.
    pub payload_b64: String,
}

/// The unverified `iss` of a token, to pick the rule that will verify it.
pub fn issuer_of(token: &str) -> Result<String, JwtError> {
    let parts = Parts::split(token)?;
    let claims: Map<String, Value> = segment_json(parts.payload)?;
    match claims.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        Some(_) => Err(JwtError::Malformed("`iss` is not a string")),
        None => Err(JwtError::Malformed("no `iss` claim")),
    }
}

/// Verifies `token` for `rule` with `jwks` at `now_unix` (seconds since the epoch).
pub fn verify(token: &str, rule: &JwtRule, jwks: &Jwks, now_unix: i64) -> Result<VerifiedJwt, JwtError> {
    verify_for(token, &rule.issuer, &rule.audiences, jwks, now_unix)
}

/// Verifies `token` as [`verify`] does, for an issuer and audiences given directly rather than by
/// a RequestAuthentication rule (the CA's Kubernetes service-account tokens). An empty
/// `audiences` accepts any audience.
pub fn verify_for(
    token: &str,
    expected_issuer: &str,
    audiences: &[String],
    jwks: &Jwks,
    now_unix: i64,
) -> Result<VerifiedJwt, JwtError> {
    let parts = Parts::split(token)?;
    let header: Header = segment_json(parts.header)?;
    if header.crit.is_some() {
        return Err(JwtError::Malformed("`crit` header parameters are not supported"));
    }
    let alg = accepted_algorithm(&header.alg)?;
    let claims: Map<String, Value> = segment_json(parts.payload)?;

    let keys = jwks.candidates(header.kid.as_deref(), alg);
    if keys.is_empty() {
        return Err(JwtError::UnknownKey { kid: header.kid, alg: header.alg });
    }
    let message = parts.signed.as_bytes();
    let verifies =
        |k: &&Key| jsonwebtoken::crypto::verify(parts.signature, message, &k.key, alg).unwrap_or(false);
    if !keys.iter().any(verifies) {
        return Err(JwtError::BadSignature);
    }

    let issuer = match claims.get("iss") {
        Some(Value::String(iss)) if iss == expected_issuer => iss.clone(),
        other => {
            let found = other.map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
            return Err(JwtError::IssuerMismatch { expected: expected_issuer.to_owned(), found });
        }
    };
    check_audience(&claims, audiences)?;
    if let Some(exp) = numeric_date(&claims, "exp")?
        && now_unix > exp.saturating_add(CLOCK_SKEW_SECS)
    {
        return Err(JwtError::Expired { exp, now: now_unix });
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")?
        && now_unix.saturating_add(CLOCK_SKEW_SECS) < nbf
    {
        return Err(JwtError::NotYetValid { nbf, now: now_unix });
    }
    let subject = match claims.get("sub") {
        None => String::new(),
        Some(Value::String(sub)) => sub.clone(),
        Some(_) => return Err(JwtError::Malformed("`sub` is not a string")),
    };

    Ok(VerifiedJwt {
        principal: format!("{issuer}/{subject}"),
        issuer,
        subject,
        claims: flatten_claims(&claims),
        payload_b64: parts.payload.to_owned(),
    })
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// The three segments of a compact JWS.
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`, what the signature covers.
    signed: &'a str,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Result<Self, JwtError> {
        let mut it = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(JwtError::Malformed("a JWT has three dot-separated segments"));
        };
        if URL_SAFE_NO_PAD.decode(signature).is_err() {
            return Err(JwtError::Malformed("the signature is not unpadded base64url"));
        }
        let signed = &token[..header.len() + 1 + payload.len()];
        Ok(Self { header, payload, signature, signed })
    }
}

fn segment_json<T: serde::de::DeserializeOwned>(segment: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Malformed("a segment is not unpadded base64url"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| JwtError::Malformed("a segment is not the expected JSON object"))
}

fn accepted_algorithm(name: &str) -> Result<Algorithm, JwtError> {
    Algorithm::from_str(name)
        .ok()
        .filter(|a| a.family() != AlgorithmFamily::Hmac)
        .ok_or_else(|| JwtError::UnsupportedAlgorithm(name.to_owned()))
}

fn check_audience(claims: &Map<String, Value>, accepted: &[String]) -> Result<(), JwtError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let found: Vec<String> = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or(JwtError::Malformed("`aud` has a non-string item")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(JwtError::Malformed("`aud` is neither a string nor a list")),
    };
    if found.iter().any(|a| accepted.contains(a)) {
        Ok(())
    } else {
        Err(JwtError::AudienceMismatch { found })
    }
}

/// A NumericDate claim: seconds, possibly fractional (rounded down).
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    let Some(v) = claims.get(name) else { return Ok(None) };
    let secs = v.as_i64().or_else(|| {
        // Saturating: a date beyond i64 seconds is as good as never (or always).
        #[allow(clippy::cast_possible_truncation)]
        v.as_f64().filter(|f| f.is_finite()).map(|f| f.floor() as i64)
    });
    match secs {
        Some(s) => Ok(Some(s)),
        None if name == "exp" => Err(JwtError::Malformed("`exp` is not a number")),
        None => Err(JwtError::Malformed("`nbf` is not a number")),
    }
}

/// A token's claims as [`VerifiedJwt::claims`] holds them (also for `policy explain --jwt-claims`).
pub fn flatten_claims(claims: &Map<String, Value>) -> BTreeMap<String, Vec<String>> {
    let mut flat = BTreeMap::new();
    for (name, value) in claims {
        flatten(name, value, &mut flat);
    }
    flat
}

fn flatten(name: &str, value: &Value, out: &mut BTreeMap<String, Vec<String>>) {
    match value {
        Value::Null => {}
        Value::String(s) => out.entry(name.to_owned()).or_default().push(s.clone()),
        Value::Bool(_) | Value::Number(_) => out.entry(name.to_owned()).or_default().push(value.to_string()),
        Value::Array(items) => {
            for item in items {
                flatten(name, item, out);
            }
        }
        Value::Object(fields) => {
            for (key, v) in fields {
                flatten(&format!("{name}.{key}"), v, out);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
