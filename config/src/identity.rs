//! SPIFFE identities, exactly as the SPIFFE-ID specification defines them.
//!
//! A [`SpiffeId`] is `spiffe://<trust-domain><path>`. Nothing is folded or normalised: an ID that is
//! not already in canonical form (upper-case scheme or trust domain, percent-encoding, dot segments,
//! trailing slash, surrounding whitespace) is rejected, because two spellings of one identity would
//! let a policy written for one miss the other.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest SPIFFE ID the specification allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain. Offsets are byte positions in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("spiffe id is empty")]
    Empty,
    #[error("spiffe id is {len} bytes, more than the {MAX_ID_LEN} allowed")]
    TooLong { len: usize },
    #[error("scheme must be exactly `spiffe://`, in lower case")]
    BadScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {len} bytes, more than the {MAX_TRUST_DOMAIN_LEN} allowed")]
    TrustDomainTooLong { len: usize },
    #[error("trust domain has {found} at byte {at}: only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar { at: usize, found: Found },
    #[error("path has {found} at byte {at}: segments allow only a-z, A-Z, 0-9, '.', '-' and '_'")]
    BadPathChar { at: usize, found: Found },
    #[error("path has an empty segment at byte {at}")]
    EmptySegment { at: usize },
    #[error("path has a dot segment ('.' or '..') at byte {at}")]
    DotSegment { at: usize },
    #[error("path ends with a slash")]
    TrailingSlash,
    #[error("a kubernetes {field} must be a non-empty path segment: {source}")]
    BadK8sName {
        field: &'static str,
        #[source]
        source: Box<IdError>,
    },
}

/// A byte that is not allowed where it was found, described for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found(pub u8);

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b'\n' | b'\r' => f.write_str("a line break (read with printf, not echo)"),
            b' ' | b'\t' => f.write_str("whitespace"),
            b'%' => f.write_str("'%' (percent-encoding is not allowed)"),
            b'?' => f.write_str("'?' (a query is not allowed)"),
            b'#' => f.write_str("'#' (a fragment is not allowed)"),
            b':' => f.write_str("':' (a port is not allowed)"),
            b'@' => f.write_str("'@' (userinfo is not allowed)"),
            b'A'..=b'Z' => write!(f, "upper-case '{}' (it is rejected, not folded)", self.0 as char),
            0x21..=0x7e => write!(f, "'{}'", self.0 as char),
            other => write!(f, "byte 0x{other:02x}"),
        }
    }
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Box<str>);

impl TrustDomain {
    /// Parses a bare trust domain name (`cluster.local`, not `spiffe://cluster.local`).
    pub fn parse(name: &str) -> Result<Self, IdError> {
        check_trust_domain(name, 0)?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>`, as signing certificates carry it.
    pub fn id_uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain>[/<segment>...]`.
///
/// Invariant: `raw` passed [`SpiffeId::parse`] and `raw[SCHEME.len()..path_start]` is the trust
/// domain. Shared (`Arc`): an identity is cloned into every request's report and compared with
/// the label sets the request metrics keep, and a clone is then a count, not a copy, and equal
/// clones compare by pointer first (`PartialEq` below: `Arc`'s own shortcut needs a sized `T`, so
/// `Arc<str>` compares the text every time).
#[derive(Debug, Clone, Eq, PartialOrd, Ord)]
pub struct SpiffeId {
    raw: Arc<str>,
    path_start: usize,
}

impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        // `path_start` follows from `raw`.
        Arc::ptr_eq(&self.raw, &other.raw) || self.raw == other.raw
    }
}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.raw.hash(state);
    }
}

/// The Kubernetes form of an identity, `ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct K8sIdentity<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, accepting only the canonical form the specification allows.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::BadScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        check_trust_domain(&rest[..td_len], SCHEME.len())?;
        let path_start = SCHEME.len() + td_len;
        check_path(&s[path_start..], path_start)?;
        Ok(Self { raw: s.into(), path_start })
    }

    /// Builds `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn from_k8s(td: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, IdError> {
        for (field, value) in [("namespace", namespace), ("service account", service_account)] {
            let single_segment = match value.find('/') {
                Some(at) => Err(IdError::BadPathChar { at, found: Found(b'/') }),
                None => check_path(&format!("/{value}"), 0),
            };
            single_segment.map_err(|e| IdError::BadK8sName { field, source: Box::new(e) })?;
        }
        Self::parse(&format!("{SCHEME}{td}/ns/{namespace}/sa/{service_account}"))
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.raw[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    /// The path, empty for a trust domain's own ID, else starting with `/`.
    pub fn path(&self) -> &str {
        &self.raw[self.path_start..]
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// The ID without its scheme, as Istio writes principals: `cluster.local/ns/default/sa/x`.
    pub fn principal(&self) -> &str {
        &self.raw[SCHEME.len()..]
    }

    /// The namespace and service account when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn k8s(&self) -> Option<K8sIdentity<'_>> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                Some(K8sIdentity { namespace, service_account })
            }
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `offset` is where `td` starts in the caller's input, so errors point into what the user typed.
fn check_trust_domain(td: &str, offset: usize) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: td.len() });
    }
    match td.bytes().position(|b| !matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')) {
        Some(i) => Err(IdError::BadTrustDomainChar { at: offset + i, found: Found(td.as_bytes()[i]) }),
        None => Ok(()),
    }
}

/// `path` is empty or starts with `/`; `offset` as for [`check_trust_domain`].
fn check_path(path: &str, offset: usize) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let mut at = offset;
    for segment in path.split('/').skip(1) {
        at += 1;
        if segment.is_empty() {
            // An empty last segment is a trailing slash; anywhere else it is `//`.
            return Err(if at == offset + path.len() {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment { at }
            });
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment { at });
        }
        if let Some(i) = segment
            .bytes()
            .position(|b| !matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
        {
            return Err(IdError::BadPathChar { at: at + i, found: Found(segment.as_bytes()[i]) });
        }
        at += segment.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
