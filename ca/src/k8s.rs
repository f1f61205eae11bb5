//! Kubernetes service-account tokens as a bootstrap credential: the token kubelet projects into a
//! pod (audience `keycard-ca`, bound to the pod, expiring) proves the pod's service account, so an
//! injected sidecar needs no token minted for it by `keycard ca token`.
//!
//! A token is accepted when its signature verifies against the cluster's key set (the API
//! server's `/openid/v1/jwks`, kept in a file), `iss` is the cluster's issuer, `aud` holds our
//! audience and it has not expired (60 s leeway, as [`keycard_config::jwt`]). Its `sub`
//! (`system:serviceaccount:<ns>:<sa>`) or, failing that, its `kubernetes.io` claim names the
//! service account, and the identity is `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`. Tokens without
//! `exp` (the legacy, never-expiring Secret tokens) are refused.
//!
//! The key-set file is checked (modification time and size) on every use and reloaded when it
//! changed, so a ConfigMap update reaches the CA without a restart; a file that no longer parses
//! is reported and the last good key set stays in force.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::SystemTime;

use keycard_config::jwt::{self, Jwks, JwtError};
use keycard_config::{IdError, SpiffeId, TrustDomain};
use tracing::warn;

/// The audience a pod's projected token must carry unless `--k8s-audience` says otherwise.
pub const DEFAULT_AUDIENCE: &str = "keycard-ca";

const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// Why a service-account token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum K8sTokenError {
    /// Signature, issuer, audience, expiry or shape ([`JwtError::reason`] says which).
    #[error("service-account token refused ({reason}): {0}", reason = .0.reason())]
    Jwt(#[from] JwtError),
    #[error("service-account token refused: it has no `exp` (legacy non-expiring tokens are not accepted)")]
    NoExpiry,
    #[error(
        "service-account token refused: it names no service account (`sub` is {0:?}, not system:serviceaccount:<namespace>:<name>)"
    )]
    NoServiceAccount(String),
    #[error("service-account token refused: `sub` names {sub} but `kubernetes.io` names {claim}")]
    Inconsistent { sub: String, claim: String },
    #[error("service-account token refused: {0}")]
    BadIdentity(IdError),
}

impl K8sTokenError {
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Jwt(JwtError::Expired { .. }))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct JwksFileError {
    pub path: PathBuf,
    pub reason: String,
}

/// The cluster's issuer, the audience we accept, and its key set (reloaded when the file changes).
#[derive(Debug)]
pub struct ServiceAccountTokens {
    issuer: String,
    audiences: Vec<String>,
    trust_domain: TrustDomain,
    jwks_path: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug, Clone)]
struct Loaded {
    jwks: Jwks,
    stamp: Option<(SystemTime, u64)>,
}

impl ServiceAccountTokens {
    /// Reads the key set once; a missing or unusable file is an error here (at start), while a
    /// bad file later only keeps the previous keys.
    pub fn load(
        issuer: String,
        audience: String,
        jwks_path: PathBuf,
        trust_domain: TrustDomain,
    ) -> Result<Self, JwksFileError> {
        let loaded = read_jwks(&jwks_path)?;
        Ok(Self { issuer, audiences: vec![audience], trust_domain, jwks_path, current: RwLock::new(loaded) })
    }

    /// The `iss` of the cluster's tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The identity a pod's token proves at `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<SpiffeId, K8sTokenError> {
        let jwks = self.jwks();
        let verified = jwt::verify_for(token, &self.issuer, &self.audiences, &jwks, now)?;
        if !verified.claims.contains_key("exp") {
            return Err(K8sTokenError::NoExpiry);
        }
        // A `sub` that is there must be a service account's; only without one does the
        // `kubernetes.io` claim alone decide.
        let from_sub = match verified.subject.as_str() {
            "" => None,
            sub => match sub.strip_prefix(SUBJECT_PREFIX).and_then(|rest| rest.split_once(':')) {
                Some((ns, sa)) => Some((ns.to_owned(), sa.to_owned())),
                None => return Err(K8sTokenError::NoServiceAccount(sub.to_owned())),
            },
        };
        let claim = |name: &str| verified.claims.get(name).and_then(|v| v.first()).cloned();
        let from_claim = claim("kubernetes.io.namespace").zip(claim("kubernetes.io.serviceaccount.name"));
        let (ns, sa) = match (from_sub, from_claim) {
            (Some(s), Some(c)) if s != c => {
                return Err(K8sTokenError::Inconsistent {
                    sub: format!("{}/{}", s.0, s.1),
                    claim: format!("{}/{}", c.0, c.1),
                });
            }
            (Some(pair), _) | (None, Some(pair)) => pair,
            (None, None) => return Err(K8sTokenError::NoServiceAccount(verified.subject)),
        };
        SpiffeId::from_k8s(&self.trust_domain, &ns, &sa).map_err(K8sTokenError::BadIdentity)
    }

    /// The key set, reloaded first when the file's modification time or size changed.
    fn jwks(&self) -> Jwks {
        let stamp = stamp(&self.jwks_path);
        let cached = self.current.read().unwrap_or_else(PoisonError::into_inner).clone();
        if cached.stamp == stamp {
            return cached.jwks;
        }
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        match read_jwks(&self.jwks_path) {
            Ok(fresh) => {
                tracing::info!(file = %self.jwks_path.display(), keys = fresh.jwks.len(), "kubernetes key set reloaded");
                *guard = fresh;
            }
            Err(e) => {
                warn!(error = %e, "kubernetes key set not reloaded; keeping the previous keys");
                // Remember the bad file's stamp so it is not read again on every request.
                guard.stamp = stamp;
            }
        }
        guard.jwks.clone()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_jwks(path: &Path) -> Result<Loaded, JwksFileError> {
    let err = |reason: String| JwksFileError { path: path.to_owned(), reason };
    let stamp = stamp(path);
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let jwks = Jwks::parse(&text).map_err(|e| err(e.to_string()))?;
    Ok(Loaded { jwks, stamp })
}

#[cfg(test)]
mod tests;
