//! Reading Istio YAML: multi-document files, dispatched on `kind` while streaming so every error
//! keeps its line, then checked and compiled into the engines' forms.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_saphyr::Spanned;

use super::model::{
    AuthorizationPolicySpec, DestinationRuleSpec, Metadata, PeerAuthenticationSpec, RequestAuthenticationSpec,
};

/// A policy file problem: file, line, the field at that line, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {}{message}", file.display(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct LoadError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub field: Option<String>,
    pub message: String,
}

/// One resource, with the line its document starts on.
#[derive(Debug, Clone)]
pub struct Object<T> {
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: T,
}

#[derive(Debug, Clone)]
pub enum Resource {
    PeerAuthentication(Object<PeerAuthenticationSpec>),
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    RequestAuthentication(Object<RequestAuthenticationSpec>),
    DestinationRule(Box<Object<DestinationRuleSpec>>),
}

const SECURITY_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const NETWORKING_VERSIONS: &[&str] =
    &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

/// A document of a kind keycard does not read (a Deployment, a Service, a VirtualService), passed
/// over by [`parse_manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub kind: String,
    pub api_version: Option<String>,
    pub line: u64,
}

/// Parses every document of one YAML text. `file` only names the source in errors.
pub fn parse_documents(text: &str, file: &Path) -> Result<Vec<Resource>, LoadError> {
    let (resources, skipped) = parse_manifest(text, file)?;
    if let Some(s) = skipped.first() {
        let msg = format!(
            "unsupported kind `{}`: keycard reads PeerAuthentication, AuthorizationPolicy, RequestAuthentication and DestinationRule",
            s.kind
        );
        return Err(error_at(file, text, s.line, 0, msg).with_field("kind"));
    }
    Ok(resources)
}

/// Like [`parse_documents`], for a directory of mixed manifests: documents of other kinds are
/// returned as [`Skipped`] instead of failing the file.
pub fn parse_manifest(text: &str, file: &Path) -> Result<(Vec<Resource>, Vec<Skipped>), LoadError> {
    let docs: Vec<Option<Document>> =
        serde_saphyr::from_multiple(text).map_err(|e| yaml_error(&e, text, file))?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for doc in docs.into_iter().flatten() {
        match doc {
            Document::Resource(r) => out.push(*r),
            Document::UnsupportedKind { kind, api_version } => {
                skipped.push(Skipped { kind: kind.value, api_version, line: kind.referenced.line() })
            }
            Document::UnsupportedVersion { api_version, kind } => {
                let allowed = if kind == "DestinationRule" { NETWORKING_VERSIONS } else { SECURITY_VERSIONS };
                let msg = format!(
                    "apiVersion `{}` is not one keycard reads for {kind}: {}",
                    api_version.value,
                    allowed.join(", ")
                );
                return Err(spanned_error(file, text, &api_version, msg));
            }
        }
    }
    Ok((out, skipped))
}

impl LoadError {
    fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }
}

/// An error at a known location, with the field read from that line of the source.
pub fn error_at(file: &Path, text: &str, line: u64, column: u64, message: impl Into<String>) -> LoadError {
    LoadError {
        file: file.to_owned(),
        line,
        column,
        field: field_on_line(text, line),
        message: message.into(),
    }
}

pub fn spanned_error<T>(file: &Path, text: &str, s: &Spanned<T>, message: impl Into<String>) -> LoadError {
    error_at(file, text, s.referenced.line(), s.referenced.column(), message)
}

/// A YAML error's message without the location prefix serde-saphyr puts in front of it.
pub fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let first = full.lines().next().unwrap_or_default();
    // "error: line 14 column 17: invalid u16" -> "invalid u16"
    first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .split_once(": ")
        .filter(|(head, _)| head.starts_with("line "))
        .map_or(first, |(_, rest)| rest)
        .to_owned()
}

pub(crate) fn yaml_error(e: &serde_saphyr::Error, text: &str, file: &Path) -> LoadError {
    let message = yaml_message(e);
    match e.location() {
        Some(loc) => error_at(file, text, loc.line(), loc.column(), message),
        None => LoadError { file: file.to_owned(), line: 0, column: 0, field: None, message },
    }
}

/// The mapping key on a 1-based line (`  ports: [80]` -> `ports`, `- key: x` -> `key`).
fn field_on_line(text: &str, line: u64) -> Option<String> {
    let l = text.lines().nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let l = l.trim_start().trim_start_matches("- ").trim_start();
    let (key, _) = l.split_once(':')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c)))
        .then(|| key.to_owned())
}

/// One YAML document. Kind and version problems are reported after parsing, where their spans
/// can still name the line (an error raised inside a visitor carries none).
enum Document {
    Resource(Box<Resource>),
    UnsupportedKind { kind: Spanned<String>, api_version: Option<String> },
    UnsupportedVersion { api_version: Spanned<String>, kind: String },
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DocumentVisitor)
    }
}

struct DocumentVisitor;

enum Spec {
    Peer(PeerAuthenticationSpec),
    Authz(AuthorizationPolicySpec),
    RequestAuthn(RequestAuthenticationSpec),
    Dest(Box<DestinationRuleSpec>),
}

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes resource with apiVersion, kind, metadata and spec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let (mut api_version, mut kind, mut metadata, mut spec) =
            (None::<Spanned<String>>, None::<String>, None, None);
        let mut unsupported = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "apiVersion" => api_version = Some(map.next_value()?),
                "kind" => {
                    let k: Spanned<String> = map.next_value()?;
                    if matches!(
                        k.value.as_str(),
                        "PeerAuthentication"
                            | "AuthorizationPolicy"
                            | "RequestAuthentication"
                            | "DestinationRule"
                    ) {
                        kind = Some(k.value);
                    } else {
                        unsupported = Some(k);
                    }
                }
                // Another kind's fields (a Deployment's metadata, a ConfigMap's data) are not ours.
                _ if unsupported.is_some() => {
                    map.next_value::<IgnoredAny>()?;
                }
                "metadata" => metadata = Some(map.next_value::<Metadata>()?),
                "spec" => {
                    spec = Some(match kind.as_deref() {
                        Some("PeerAuthentication") => Spec::Peer(map.next_value()?),
                        Some("AuthorizationPolicy") => Spec::Authz(map.next_value()?),
                        Some("RequestAuthentication") => Spec::RequestAuthn(map.next_value()?),
                        Some("DestinationRule") => Spec::Dest(map.next_value()?),
                        _ => return Err(de::Error::custom("`kind` must come before `spec`")),
                    })
                }
                "status" => {
                    map.next_value::<IgnoredAny>()?;
                }
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown field `{other}`, expected one of apiVersion, kind, metadata, spec"
                    )));
                }
            }
        }
        if let Some(kind) = unsupported {
            return Ok(Document::UnsupportedKind { kind, api_version: api_version.map(|v| v.value) });
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        let api_version = api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))?;
        let metadata = metadata.ok_or_else(|| de::Error::missing_field("metadata"))?;
        let allowed = if kind == "DestinationRule" { NETWORKING_VERSIONS } else { SECURITY_VERSIONS };
        if !allowed.contains(&api_version.value.as_str()) {
            return Ok(Document::UnsupportedVersion { api_version, kind });
        }
        let api_version = api_version.value;
        let resource = match (kind.as_str(), spec) {
            ("PeerAuthentication", Some(Spec::Peer(spec))) => {
                Resource::PeerAuthentication(Object { api_version, metadata, spec })
            }
            ("PeerAuthentication", None) => {
                Resource::PeerAuthentication(Object { api_version, metadata, spec: Default::default() })
            }
            ("AuthorizationPolicy", Some(Spec::Authz(spec))) => {
                Resource::AuthorizationPolicy(Object { api_version, metadata, spec })
            }
            ("AuthorizationPolicy", None) => {
                Resource::AuthorizationPolicy(Object { api_version, metadata, spec: Default::default() })
            }
            ("RequestAuthentication", Some(Spec::RequestAuthn(spec))) => {
                Resource::RequestAuthentication(Object { api_version, metadata, spec })
            }
            ("RequestAuthentication", None) => {
                Resource::RequestAuthentication(Object { api_version, metadata, spec: Default::default() })
            }
            ("DestinationRule", Some(Spec::Dest(spec))) => {
                Resource::DestinationRule(Box::new(Object { api_version, metadata, spec: *spec }))
            }
            ("DestinationRule", None) => return Err(de::Error::missing_field("spec")),
            _ => return Err(de::Error::custom("spec does not match kind")),
        };
        Ok(Document::Resource(Box::new(resource)))
    }
}
