//! RequestAuthentication: finding a JWT where the rules say (header with prefix, query
//! parameter, cookie), verifying it against the issuer's JWKS (inline, or fetched from `jwksUri`
//! with a timeout and cached), and what Istio does with the result: an invalid token is refused
//! (401), a missing one leaves the request without a principal, the token is removed before the
//! app unless `forwardOriginalToken`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keycard_config::jwt::{self, Jwks, VerifiedJwt};
use keycard_config::policy::JwtRule;

/// How long a fetched JWKS is used before it is fetched again (Istio's default refresh).
const REFRESH: Duration = Duration::from_secs(20 * 60);
/// The fetch deadline when a rule sets none.
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct AuthnError {
    pub reason: &'static str,
    pub detail: String,
}

impl AuthnError {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

/// Fetched JWKS by URI.
pub struct JwksCache {
    entries: Mutex<HashMap<String, (Instant, Arc<Jwks>)>>,
    fetching: tokio::sync::Mutex<()>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for JwksCache {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl JwksCache {
    fn cached(&self, uri: &str, fresh_only: bool) -> Option<Arc<Jwks>> {
        let entries = self.entries.lock().ok()?;
        let (at, jwks) = entries.get(uri)?;
        (!fresh_only || at.elapsed() < REFRESH).then(|| jwks.clone())
    }

    /// The JWKS at `uri`: cached, or fetched now (one fetch at a time). A failed refresh keeps
    /// using the last good document.
    pub async fn get(&self, uri: &str, timeout: Duration) -> Result<Arc<Jwks>, AuthnError> {
        if let Some(j) = self.cached(uri, true) {
            return Ok(j);
        }
        let _one = self.fetching.lock().await;
        if let Some(j) = self.cached(uri, true) {
            return Ok(j);
        }
        match self.fetch(uri, timeout).await {
            Ok(jwks) => {
                let jwks = Arc::new(jwks);
                if let Ok(mut e) = self.entries.lock() {
                    e.insert(uri.to_owned(), (Instant::now(), jwks.clone()));
                }
                Ok(jwks)
            }
            Err(e) => {
                tracing::warn!(uri, error = %e.detail, "JWKS fetch failed");
                self.cached(uri, false).ok_or(e)
            }
        }
    }

    async fn fetch(&self, uri: &str, timeout: Duration) -> Result<Jwks, AuthnError> {
        let fail = |d: String| AuthnError::new("jwks_fetch_failed", d);
        let parsed: Uri = uri.parse().map_err(|e| fail(format!("{uri}: {e}")))?;
        if parsed.scheme_str() != Some("http") {
            return Err(fail(format!("{uri}: only http:// JWKS URIs are fetched by this version")));
        }
        let work = async {
            let resp = self.client.get(parsed).await.map_err(|e| fail(format!("{uri}: {e}")))?;
            if !resp.status().is_success() {
                return Err(fail(format!("{uri}: HTTP {}", resp.status())));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| fail(format!("{uri}: {e}")))?
                .to_bytes();
            let text = std::str::from_utf8(&body).map_err(|_| fail(format!("{uri}: not UTF-8")))?;
            Jwks::parse(text).map_err(|e| fail(format!("{uri}: {e}")))
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| fail(format!("{uri}: timed out")))?
    }
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header { name: String, prefix: String },
    Param(String),
    Cookie(String),
}

/// The rule's token locations (the config fills in Istio's defaults when none are given).
fn locations(rule: &JwtRule) -> Vec<Location> {
    rule.from_headers
        .iter()
        .map(|(name, prefix)| Location::Header { name: name.clone(), prefix: prefix.clone() })
        .chain(rule.from_params.iter().cloned().map(Location::Param))
        .chain(rule.from_cookies.iter().cloned().map(Location::Cookie))
        .collect()
}

fn extract(parts: &http::request::Parts, loc: &Location) -> Option<String> {
    match loc {
        Location::Header { name, prefix } => {
            let v = parts.headers.get(name.as_str())?.to_str().ok()?;
            let rest = if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
                &v[prefix.len()..]
            } else {
                return None;
            };
            Some(rest.trim().to_owned()).filter(|t| !t.is_empty())
        }
        Location::Param(name) => parts
            .uri
            .query()?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned())
            .filter(|t| !t.is_empty()),
        Location::Cookie(name) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned()),
    }
}

/// Removes the token from where it was found (cookies are left: they carry other values).
fn strip(parts: &mut http::request::Parts, loc: &Location) {
    match loc {
        Location::Header { name, .. } => {
            parts.headers.remove(name.as_str());
        }
        Location::Param(name) => {
            let Some(q) = parts.uri.query() else { return };
            let kept: Vec<&str> =
                q.split('&').filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != name).collect();
            let path = parts.uri.path();
            let pq = if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
            let mut builder = http::uri::Parts::from(parts.uri.clone());
            if let Ok(pq) = pq.parse() {
                builder.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(builder) {
                    parts.uri = u;
                }
            }
        }
        Location::Cookie(_) => {}
    }
}

/// Authenticates a request against the workload's JWT rules: `Ok(None)` when no token is
/// present, `Ok(Some)` for a valid one, `Err` (401) for any token that does not verify.
pub async fn authenticate(
    rules: &[JwtRule],
    parts: &mut http::request::Parts,
    cache: &JwksCache,
) -> Result<Option<VerifiedJwt>, AuthnError> {
    let found = rules.iter().flat_map(locations).find_map(|loc| extract(parts, &loc).map(|t| (t, loc)));
    let Some((token, loc)) = found else { return Ok(None) };
    let issuer = jwt::issuer_of(&token).map_err(|e| AuthnError::new(e.reason(), e.to_string()))?;
    let rule = rules
        .iter()
        .find(|r| r.issuer == issuer && locations(r).contains(&loc))
        .ok_or_else(|| AuthnError::new("issuer_not_configured", format!("no rule for issuer {issuer:?}")))?;
    let fetched;
    let jwks: &Jwks = match (&rule.jwks, &rule.jwks_uri) {
        (Some(j), _) => j,
        (None, Some(uri)) => {
            fetched = cache.get(uri, rule.timeout.unwrap_or(DEFAULT_FETCH_TIMEOUT)).await?;
            &fetched
        }
        (None, None) => return Err(AuthnError::new("jwks_missing", "the rule has no JWKS")),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let verified =
        jwt::verify(&token, rule, jwks, now).map_err(|e| AuthnError::new(e.reason(), e.to_string()))?;
    if !rule.forward_original_token {
        strip(parts, &loc);
    }
    if let Some(h) = &rule.output_payload_to_header
        && let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(h.as_bytes()), HeaderValue::from_str(&verified.payload_b64))
    {
        parts.headers.insert(name, value);
    }
    for (h, claim) in &rule.output_claim_to_headers {
        let value = verified.claims.get(claim).map(|v| v.join(","));
        if let (Ok(name), Some(Ok(value))) =
            (HeaderName::from_bytes(h.as_bytes()), value.as_deref().map(HeaderValue::from_str))
        {
            parts.headers.insert(name, value);
        }
    }
    Ok(Some(verified))
}
