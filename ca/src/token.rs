//! Bootstrap tokens: a JWT (ES256) the CA signs, binding one SPIFFE ID for a limited time.
//!
//! A sidecar presents one once, with a CSR, to get its first certificate; renewals then use that
//! certificate over mutual TLS. The token's `sub` is the only identity it can obtain. Tokens are
//! bearer credentials and may be reused until `exp` (a sidecar that restarts before its first
//! renewal needs it again); keep their lifetime short.

use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use keycard_config::{IdError, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

/// The `aud` every keycard bootstrap token carries.
pub const AUDIENCE: &str = "keycard-ca";

/// Why a token was refused. The CA API maps each to a refusal reason (`invalid_token`,
/// `expired_token`, `foreign_trust_domain`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the token is not a well-formed keycard JWT: {0}")]
    Malformed(&'static str),
    #[error("the token's signature does not verify with this CA's token key")]
    BadSignature,
    #[error("the token expired at {exp} (unix seconds)")]
    Expired { exp: i64 },
    #[error("the token is for audience {0:?}, not {AUDIENCE:?}")]
    WrongAudience(String),
    #[error("the token is for trust domain {got}; this CA serves {expected}")]
    ForeignTrustDomain { got: String, expected: TrustDomain },
    #[error("the token's subject is not a SPIFFE ID: {0}")]
    BadSubject(IdError),
}

#[derive(Debug, thiserror::Error)]
#[error("the token signing key is not a P-256 PKCS#8 key: {0}")]
pub struct TokenKeyError(String);

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// Mints and checks tokens with the CA's token key (kept in `token-key.pem`, separate from the
/// certificate signing key).
pub struct TokenAuthority {
    key: EcdsaKeyPair,
    kid: String,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl TokenAuthority {
    pub fn from_pkcs8(der: &[u8], trust_domain: TrustDomain) -> Result<Self, TokenKeyError> {
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| TokenKeyError(e.to_string()))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key().as_ref());
        let kid = B64.encode(&digest.as_ref()[..12]);
        Ok(Self { key, kid, trust_domain })
    }

    /// A token for `id`, valid from `now` (unix seconds) for `ttl_secs`.
    pub fn mint(&self, id: &SpiffeId, now: i64, ttl_secs: i64) -> Result<String, TokenKeyError> {
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| TokenKeyError("random source failed".into()))?;
        let header = Header { alg: "ES256".into(), typ: "JWT".into(), kid: self.kid.clone() };
        let claims = Claims {
            iss: self.trust_domain.id_uri(),
            sub: id.as_str().to_owned(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            jti: B64.encode(jti),
        };
        let signing_input = format!("{}.{}", encode_json(&header), encode_json(&claims));
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self.key.sign(&rng, signing_input.as_bytes()).map_err(|e| TokenKeyError(e.to_string()))?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// The identity a token proves, if it is ours, intact, unexpired and for this trust domain.
    pub fn verify(&self, token: &str, now: i64) -> Result<SpiffeId, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let header: Header = decode_json(h).ok_or(TokenError::Malformed("header"))?;
        if header.alg != "ES256" {
            return Err(TokenError::Malformed("alg must be ES256"));
        }
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed("signature encoding"))?;
        let public =
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref());
        let signing_input = &token[..h.len() + 1 + c.len()];
        public.verify(signing_input.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = decode_json(c).ok_or(TokenError::Malformed("claims"))?;
        if claims.aud != AUDIENCE {
            return Err(TokenError::WrongAudience(claims.aud));
        }
        if claims.exp <= now {
            return Err(TokenError::Expired { exp: claims.exp });
        }
        let id = SpiffeId::parse(&claims.sub).map_err(TokenError::BadSubject)?;
        if claims.iss != self.trust_domain.id_uri() || id.trust_domain_str() != self.trust_domain.as_str() {
            return Err(TokenError::ForeignTrustDomain {
                got: id.trust_domain_str().to_owned(),
                expected: self.trust_domain.clone(),
            });
        }
        Ok(id)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    serde_json::from_slice(&B64.decode(part).ok()?).ok()
}

fn encode_json<T: Serialize>(value: &T) -> String {
    // Plain structs of strings and integers always serialize.
    B64.encode(serde_json::to_vec(value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(td: &str) -> TokenAuthority {
        let key = rcgen::KeyPair::generate().unwrap();
        TokenAuthority::from_pkcs8(&key.serialize_der(), TrustDomain::parse(td).unwrap()).unwrap()
    }

    #[test]
    fn a_minted_token_proves_its_identity_until_it_expires() {
        let ta = authority("cluster.local");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap();
        let token = ta.mint(&id, 1_000, 60).unwrap();
        assert_eq!(ta.verify(&token, 1_059).unwrap(), id);
        assert_eq!(ta.verify(&token, 1_060), Err(TokenError::Expired { exp: 1_060 }));
    }

    #[test]
    fn another_cas_token_and_tampering_are_refused() {
        let ours = authority("cluster.local");
        let theirs = authority("cluster.local");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/x").unwrap();
        let token = theirs.mint(&id, 0, 60).unwrap();
        assert_eq!(ours.verify(&token, 1), Err(TokenError::BadSignature));

        let token = ours.mint(&id, 0, 60).unwrap();
        let forged_claims = B64.encode(
            br#"{"iss":"spiffe://cluster.local","sub":"spiffe://cluster.local/ns/kube-system/sa/admin","aud":"keycard-ca","iat":0,"exp":99,"jti":"x"}"#,
        );
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(ours.verify(&forged, 1), Err(TokenError::BadSignature));
        for junk in ["", "a.b", "a.b.c.d", "!!!.###.$$$"] {
            assert!(matches!(ours.verify(junk, 1), Err(TokenError::Malformed(_))), "{junk:?}");
        }
    }

    #[test]
    fn a_token_for_another_trust_domain_is_foreign() {
        let other = authority("other.example");
        let key_der = {
            // Same key, other trust domain: the signature verifies, the trust domain does not.
            let key = rcgen::KeyPair::generate().unwrap();
            key.serialize_der()
        };
        let ours =
            TokenAuthority::from_pkcs8(&key_der, TrustDomain::parse("cluster.local").unwrap()).unwrap();
        let theirs =
            TokenAuthority::from_pkcs8(&key_der, TrustDomain::parse("other.example").unwrap()).unwrap();
        let id = SpiffeId::parse("spiffe://other.example/ns/default/sa/x").unwrap();
        let token = theirs.mint(&id, 0, 60).unwrap();
        assert!(matches!(ours.verify(&token, 1), Err(TokenError::ForeignTrustDomain { .. })));
        assert!(other.verify(&token, 1).is_err());
    }
}
