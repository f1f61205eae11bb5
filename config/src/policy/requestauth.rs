//! RequestAuthentication: which JWTs a workload accepts and where it looks for them, compiled from
//! Istio's `jwtRules` with keys parsed at load and token locations defaulted as Envoy does.
//! Checking a token against a rule is [`crate::jwt`]'s job; fetching a `jwksUri` is the proxy's.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_saphyr::Spanned;

use super::Cx;
use super::load::{LoadError, Object};
use super::model::{self, RequestAuthenticationSpec, S};
use crate::jwt::Jwks;

/// The header and prefix searched when a rule names no token location (Envoy's default, which
/// Istio keeps): `Authorization: Bearer <token>`.
pub const DEFAULT_TOKEN_HEADER: (&str, &str) = ("authorization", "Bearer ");
/// The query parameter searched, after the header, when a rule names no token location.
pub const DEFAULT_TOKEN_PARAM: &str = "access_token";

/// One compiled RequestAuthentication.
#[derive(Debug, Clone, Serialize)]
pub struct RequestAuthn {
    pub namespace: String,
    pub name: String,
    pub origin: super::Origin,
    /// `None`: every workload of the namespace (or of the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Vec<JwtRule>,
}

/// One `jwtRules` entry, checked.
#[derive(Debug, Clone, Serialize)]
pub struct JwtRule {
    /// The RequestAuthentication's namespace and name, for logs.
    pub namespace: String,
    pub policy: String,
    /// The `iss` a token must carry.
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any audience.
    pub audiences: Vec<String>,
    /// The inline key set. When set, `jwks_uri` is `None`: Istio ignores `jwksUri` next to `jwks`.
    pub jwks: Option<Jwks>,
    /// Where the proxy fetches the key set (http or https).
    pub jwks_uri: Option<String>,
    /// `(lower-case header name, prefix)`: the token is the header value after the prefix, and a
    /// value without the prefix is an invalid token.
    pub from_headers: Vec<(String, String)>,
    /// Query parameters holding the token.
    pub from_params: Vec<String>,
    /// Cookies holding the token.
    pub from_cookies: Vec<String>,
    /// Keep the token in the request sent to the application (default: removed).
    pub forward_original_token: bool,
    /// Lower-case header that receives the token's payload segment (base64url JSON).
    pub output_payload_to_header: Option<String>,
    /// `(lower-case header, claim)`: copy a verified claim into a header.
    pub output_claim_to_headers: Vec<(String, String)>,
    /// How long a `jwksUri` fetch may take; `None`: the proxy's default (Istio: 5 s).
    pub timeout: Option<Duration>,
}

impl Cx<'_> {
    /// Compiles one RequestAuthentication; also returns warnings for what is accepted but unused.
    pub(super) fn request_authn(
        &self,
        o: Object<RequestAuthenticationSpec>,
    ) -> Result<(RequestAuthn, Vec<String>), LoadError> {
        let spec = o.spec;
        if let Some(t) = spec.target_ref.as_ref().or(spec.target_refs.as_ref()) {
            return Err(self.err(t, "targetRef is not supported: keycard applies policies by selector"));
        }
        let (namespace, name, origin) =
            (self.namespace(&o.metadata), o.metadata.name.value.clone(), self.origin(&o.metadata));
        let mut warnings = Vec::new();
        let rules = spec
            .jwt_rules
            .iter()
            .map(|r| self.jwt_rule(r, &namespace, &name, &mut warnings))
            .collect::<Result<Vec<_>, _>>()?;
        let selector = spec.selector.map(|s| s.match_labels);
        Ok((RequestAuthn { namespace, name, origin, selector, rules }, warnings))
    }

    fn jwt_rule(
        &self,
        at: &Spanned<model::JwtRule>,
        namespace: &str,
        policy: &str,
        warnings: &mut Vec<String>,
    ) -> Result<JwtRule, LoadError> {
        let r = &at.value;
        let issuer = match &r.issuer {
            Some(i) if !i.value.is_empty() => i.value.clone(),
            Some(i) => return Err(self.err(i, "issuer must not be empty")),
            None => return Err(self.err(at, "a jwtRule needs an issuer")),
        };
        let jwks = r
            .jwks
            .as_ref()
            .map(|j| {
                Jwks::parse(&j.value).map_err(|e| {
                    // A block scalar's span is its first content line, which names no field.
                    let mut err = self.err(j, format!("jwks: {e}"));
                    err.field.get_or_insert_with(|| "jwks".to_owned());
                    err
                })
            })
            .transpose()?;
        let jwks_uri = match (&r.jwks_uri, &jwks) {
            (Some(uri), Some(_)) => {
                warnings.push(format!(
                    "{}:{}: RequestAuthentication {namespace}/{policy}: jwksUri is ignored because jwks is set, as in Istio",
                    self.file.display(),
                    uri.referenced.line()
                ));
                None
            }
            (Some(uri), None) => Some(self.jwks_uri(uri)?),
            (None, Some(_)) => None,
            (None, None) => {
                return Err(self.err(
                    at,
                    "a jwtRule needs jwks or jwksUri: keycard does not discover keys through OpenID Connect",
                ));
            }
        };
        let from_headers = r
            .from_headers
            .iter()
            .map(|h| Ok((self.header_name(&h.name)?, h.prefix.clone())))
            .collect::<Result<Vec<_>, LoadError>>()?;
        let from_params = self.non_empty(&r.from_params, "a query parameter name")?;
        let from_cookies = self.non_empty(&r.from_cookies, "a cookie name")?;
        let defaulted = from_headers.is_empty() && from_params.is_empty() && from_cookies.is_empty();
        let (from_headers, from_params) = if defaulted {
            let (header, prefix) = DEFAULT_TOKEN_HEADER;
            (vec![(header.to_owned(), prefix.to_owned())], vec![DEFAULT_TOKEN_PARAM.to_owned()])
        } else {
            (from_headers, from_params)
        };
        let output_claim_to_headers = r
            .output_claim_to_headers
            .iter()
            .map(|c| {
                if c.claim.value.is_empty() {
                    return Err(self.err(&c.claim, "claim must not be empty"));
                }
                Ok((self.header_name(&c.header)?, c.claim.value.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JwtRule {
            namespace: namespace.to_owned(),
            policy: policy.to_owned(),
            issuer,
            audiences: r.audiences.clone(),
            jwks,
            jwks_uri,
            from_headers,
            from_params,
            from_cookies,
            forward_original_token: r.forward_original_token,
            output_payload_to_header: r
                .output_payload_to_header
                .as_ref()
                .map(|h| self.header_name(h))
                .transpose()?,
            output_claim_to_headers,
            timeout: r.timeout.as_ref().map(|t| self.timeout(t)).transpose()?,
        })
    }

    fn jwks_uri(&self, uri: &S) -> Result<String, LoadError> {
        let rest = uri.value.strip_prefix("https://").or_else(|| uri.value.strip_prefix("http://"));
        match rest {
            Some(rest)
                if !rest.is_empty() && !rest.starts_with('/') && !rest.contains(char::is_whitespace) =>
            {
                Ok(uri.value.clone())
            }
            _ => Err(self.err(uri, format!("{:?} is not an http or https URL", uri.value))),
        }
    }

    /// An HTTP field name (RFC 9110 token), lower-cased.
    fn header_name(&self, name: &S) -> Result<String, LoadError> {
        let valid = !name.value.is_empty()
            && name.value.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if valid {
            Ok(name.value.to_ascii_lowercase())
        } else {
            Err(self.err(name, format!("{:?} is not an HTTP header name", name.value)))
        }
    }

    fn non_empty(&self, values: &[S], what: &str) -> Result<Vec<String>, LoadError> {
        values
            .iter()
            .map(|v| {
                if v.value.is_empty() || v.value.contains(char::is_whitespace) {
                    Err(self.err(v, format!("{:?} is not {what}", v.value)))
                } else {
                    Ok(v.value.clone())
                }
            })
            .collect()
    }

    pub(super) fn timeout(&self, t: &S) -> Result<Duration, LoadError> {
        parse_duration(&t.value)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| self.err(t, format!("{:?} is not a positive duration such as \"5s\"", t.value)))
    }
}

/// A protobuf JSON duration (`"5s"`, `"0.5s"`) or a humantime one (`"500ms"`, `"1m"`).
fn parse_duration(s: &str) -> Option<Duration> {
    let proto = s
        .strip_suffix('s')
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .and_then(|n| n.parse::<f64>().ok())
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok());
    proto.or_else(|| humantime::parse_duration(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_protobuf_or_humantime() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("5s", Some(Duration::from_secs(5))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("0s", Some(Duration::ZERO)),
            ("500ms", Some(Duration::from_millis(500))),
            ("1m", Some(Duration::from_secs(60))),
            ("s", None),
            ("-1s", None),
            ("1e3s", None),
            ("5", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), *want, "{text:?}");
        }
    }
}
