//! The authorization engine: Istio's AuthorizationPolicy semantics, request attributes in, a
//! decision with evidence out.
//!
//! Order: CUSTOM is refused at load; DENY before ALLOW; with no ALLOW policy the request is
//! allowed; otherwise some ALLOW rule must match. AUDIT rules are reported without effect, and
//! policies annotated `istio.io/dry-run: "true"` are evaluated and reported, never enforced.
//! On a TCP connection (no HTTP attributes) an ALLOW rule that uses any HTTP-only field never
//! matches, and a DENY rule drops its HTTP-only fields, which widens it — as Istio does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::SpiffeId;

mod pattern;
pub use self::pattern::{PathTemplate, Pattern};

/// Istio's name for one rule: `ns[NS]-policy[NAME]-rule[N]`. Shared: every decision carries
/// one, and cloning its two strings cost an L7 request about 300 instructions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleId(Arc<RuleIdParts>);

#[derive(Debug, PartialEq, Eq, Hash, Serialize)]
struct RuleIdParts {
    namespace: String,
    policy: String,
    rule: usize,
    /// The name written out once, when the policy is compiled: every request's metric labels and
    /// access line carry it, and formatting it each time cost an L7 request 3,000 instructions.
    #[serde(skip)]
    label: String,
}

impl RuleId {
    pub fn new(namespace: &str, policy: &str, rule: usize) -> Self {
        let label = format!("ns[{namespace}]-policy[{policy}]-rule[{rule}]");
        RuleId(Arc::new(RuleIdParts {
            namespace: namespace.to_owned(),
            policy: policy.to_owned(),
            rule,
            label,
        }))
    }

    pub fn label(&self) -> &str {
        &self.0.label
    }
}

/// As `{namespace, policy, rule}`.
impl Serialize for RuleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// One compiled AuthorizationPolicy.
#[derive(Debug, Clone, Serialize)]
pub struct AuthzPolicy {
    pub namespace: String,
    pub name: String,
    pub origin: super::Origin,
    pub action: Action,
    /// `None`: every workload of the namespace (or of the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub dry_run: bool,
    #[serde(skip)]
    pub rules: Vec<Rule>,
    /// For `config_dump` and `policy explain`.
    pub rule_count: usize,
    /// The name of each rule, `rules`' order.
    #[serde(skip)]
    pub rule_ids: Vec<RuleId>,
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<Condition>,
}

/// `None` means the field was not set; a set field needs one of its values to match.
#[derive(Debug, Clone, Default)]
pub struct SourceMatch {
    pub principals: Option<Vec<Pattern>>,
    pub not_principals: Option<Vec<Pattern>>,
    pub request_principals: Option<Vec<Pattern>>,
    pub not_request_principals: Option<Vec<Pattern>>,
    pub namespaces: Option<Vec<Pattern>>,
    pub not_namespaces: Option<Vec<Pattern>>,
    pub ip_blocks: Option<Vec<IpNet>>,
    pub not_ip_blocks: Option<Vec<IpNet>>,
    pub remote_ip_blocks: Option<Vec<IpNet>>,
    pub not_remote_ip_blocks: Option<Vec<IpNet>>,
}

#[derive(Debug, Clone, Default)]
pub struct OperationMatch {
    pub hosts: Option<Vec<Pattern>>,
    pub not_hosts: Option<Vec<Pattern>>,
    pub ports: Option<Vec<u16>>,
    pub not_ports: Option<Vec<u16>>,
    pub methods: Option<Vec<Pattern>>,
    pub not_methods: Option<Vec<Pattern>>,
    pub paths: Option<Vec<Pattern>>,
    pub not_paths: Option<Vec<Pattern>>,
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<Pattern>,
    pub not_values: Vec<Pattern>,
    /// For IP keys, parsed CIDRs of `values` / `not_values`.
    pub nets: Vec<IpNet>,
    pub not_nets: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// A `request.*` key: HTTP only.
    Request(RequestKey),
}

/// The HTTP-only condition keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKey {
    /// `request.headers[NAME]`, the name lower-cased (header names match case-insensitively).
    Header(String),
    /// `request.auth.principal`: `iss/sub` of the verified JWT.
    Principal,
    /// `request.auth.audiences`: the JWT's `aud` claim.
    Audiences,
    /// `request.auth.presenter`: the JWT's `azp` claim.
    Presenter,
    /// `request.auth.claims[NAME]`, or a nested claim `request.auth.claims[a][b]`: the key under
    /// which [`HttpAttributes::claims`] stores it, nested names joined with `.` (`"a.b"`), as the
    /// JWT verifier flattens nested objects.
    Claim(String),
}

impl ConditionKey {
    /// `None` for a key keycard does not know: an unknown key is a load error, never ignored.
    pub fn parse(key: &str) -> Option<Self> {
        Some(match key {
            "source.ip" => Self::SourceIp,
            "remote.ip" => Self::RemoteIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "connection.sni" => Self::ConnectionSni,
            "request.auth.principal" => Self::Request(RequestKey::Principal),
            "request.auth.audiences" => Self::Request(RequestKey::Audiences),
            "request.auth.presenter" => Self::Request(RequestKey::Presenter),
            k => {
                if let Some(name) = k.strip_prefix("request.headers[").and_then(|n| n.strip_suffix(']')) {
                    let ok = !name.is_empty() && !name.contains(['[', ']']);
                    return ok.then(|| Self::Request(RequestKey::Header(name.to_ascii_lowercase())));
                }
                let names = bracketed(k.strip_prefix("request.auth.claims")?)?;
                Self::Request(RequestKey::Claim(names.join(".")))
            }
        })
    }

    fn is_ip(&self) -> bool {
        matches!(self, Self::SourceIp | Self::RemoteIp | Self::DestinationIp)
    }
}

impl fmt::Display for ConditionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SourceIp => f.write_str("source.ip"),
            Self::RemoteIp => f.write_str("remote.ip"),
            Self::SourceNamespace => f.write_str("source.namespace"),
            Self::SourcePrincipal => f.write_str("source.principal"),
            Self::DestinationIp => f.write_str("destination.ip"),
            Self::DestinationPort => f.write_str("destination.port"),
            Self::ConnectionSni => f.write_str("connection.sni"),
            Self::Request(RequestKey::Header(name)) => write!(f, "request.headers[{name}]"),
            Self::Request(RequestKey::Principal) => f.write_str("request.auth.principal"),
            Self::Request(RequestKey::Audiences) => f.write_str("request.auth.audiences"),
            Self::Request(RequestKey::Presenter) => f.write_str("request.auth.presenter"),
            Self::Request(RequestKey::Claim(name)) => {
                write!(f, "request.auth.claims[{}]", name.replace('.', "]["))
            }
        }
    }
}

/// `[a][b]` -> `["a", "b"]`; `None` unless the whole text is one or more non-empty bracketed names.
fn bracketed(mut text: &str) -> Option<Vec<&str>> {
    let mut names = Vec::new();
    while !text.is_empty() {
        let (name, rest) = text.strip_prefix('[')?.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        names.push(name);
        text = rest;
    }
    (!names.is_empty()).then_some(names)
}

/// What is known of a connection (and, for HTTP, of the request) when deciding.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    pub source_ip: IpAddr,
    /// The verified peer identity; `None` for plaintext.
    pub source_principal: Option<&'a SpiffeId>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// `None` on a TCP connection.
    pub http: Option<&'a HttpAttributes>,
}

/// Request attributes (filled by the L7 proxy).
#[derive(Debug, Clone, Default)]
pub struct HttpAttributes {
    /// The request authority (`:authority` or `Host`), port included when the client sent one.
    pub host: String,
    pub method: String,
    /// Normalised path, no query or fragment.
    pub path: String,
    /// `iss/sub` of the verified JWT, if the request carried one.
    pub request_principal: Option<String>,
    /// Header names lower-case.
    pub headers: BTreeMap<String, String>,
    /// The verified JWT's claims as [`crate::jwt::VerifiedJwt::claims`] gives them: scalars as
    /// strings, lists as their elements, nested objects flattened with `.` (`{"a":{"b":1}}` is
    /// `"a.b" => ["1"]`), which is what `request.auth.claims[a][b]` looks up.
    pub claims: BTreeMap<String, Vec<String>>,
}

/// The decision's evidence, whichever way it went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// AUDIT rules that matched.
    pub audited: Vec<RuleId>,
    /// Dry-run policies and what they would have decided (`true` = allow).
    pub dry_run: Vec<(String, bool)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permit {
    /// The ALLOW rule that matched; `None` when no ALLOW policy applies to the workload.
    pub rule: Option<RuleId>,
    pub evidence: Evidence,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denied {
    /// The DENY rule that matched; `None` when ALLOW policies apply and none of their rules matched.
    pub rule: Option<RuleId>,
    pub evidence: Evidence,
}

impl Permit {
    /// The `policy` label and log field.
    pub fn policy_label(&self) -> String {
        self.rule.as_ref().map_or("none", RuleId::label).to_owned()
    }
}

impl Denied {
    pub fn policy_label(&self) -> String {
        self.rule.as_ref().map_or("none", RuleId::label).to_owned()
    }

    /// `denied_by_policy` when a DENY rule matched, `no_matching_allow` otherwise.
    pub fn reason(&self) -> &'static str {
        if self.rule.is_some() { "denied_by_policy" } else { "no_matching_allow" }
    }
}

pub type Decision = Result<Permit, Denied>;

/// Decides with the policies that apply to one workload (see [`super::PolicySet::for_workload`]).
pub fn evaluate(policies: &[&AuthzPolicy], attrs: &Attributes<'_>) -> Decision {
    let mut evidence = Evidence::default();
    for p in policies.iter().filter(|p| p.dry_run) {
        let would = decide(std::slice::from_ref(p), attrs, &mut Evidence::default()).is_ok();
        evidence.dry_run.push((format!("ns[{}]-policy[{}]", p.namespace, p.name), would));
    }
    let enforced: Vec<&AuthzPolicy> = policies.iter().copied().filter(|p| !p.dry_run).collect();
    decide(&enforced, attrs, &mut evidence)
        .map_err(|rule| Denied { rule, evidence: evidence.clone() })
        .map(|rule| Permit { rule, evidence })
}

/// `Ok(allow rule)` or `Err(deny rule)`; `None` inside either when no single rule decided.
fn decide(
    policies: &[&AuthzPolicy],
    attrs: &Attributes<'_>,
    evidence: &mut Evidence,
) -> Result<Option<RuleId>, Option<RuleId>> {
    for p in policies.iter().filter(|p| p.action == Action::Audit) {
        for (i, r) in p.rules.iter().enumerate() {
            if rule_matches(r, Action::Audit, attrs) {
                evidence.audited.push(rule_id(p, i));
            }
        }
    }
    for p in policies.iter().filter(|p| p.action == Action::Deny) {
        if let Some(i) = p.rules.iter().position(|r| rule_matches(r, Action::Deny, attrs)) {
            return Err(Some(rule_id(p, i)));
        }
    }
    let allows: Vec<&&AuthzPolicy> = policies.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        return Ok(None);
    }
    for p in allows {
        if let Some(i) = p.rules.iter().position(|r| rule_matches(r, Action::Allow, attrs)) {
            return Ok(Some(rule_id(p, i)));
        }
    }
    Err(None)
}

fn rule_id(p: &AuthzPolicy, rule: usize) -> RuleId {
    p.rule_ids.get(rule).cloned().unwrap_or_else(|| RuleId::new(&p.namespace, &p.name, rule))
}

fn rule_matches(rule: &Rule, action: Action, attrs: &Attributes<'_>) -> bool {
    rule_miss(rule, action, attrs).is_none()
}

/// Why a rule did not match: the first part that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// An ALLOW or AUDIT rule with HTTP-only fields, on a TCP connection.
    HttpOnlyOnTcp,
    /// No `from` entry matched; the field that failed in the first one.
    From(&'static str),
    /// No `to` entry matched; the field that failed in the first one.
    To(&'static str),
    /// The `when` condition at this index failed.
    When(usize),
}

/// `None` when the rule matches, else the first part that failed. The one matcher: the
/// decision ([`evaluate`]) and `policy explain` both come through here.
pub fn rule_miss(rule: &Rule, action: Action, attrs: &Attributes<'_>) -> Option<Miss> {
    let tcp = attrs.http.is_none();
    if tcp && action != Action::Deny && rule_has_http_fields(rule) {
        return Some(Miss::HttpOnlyOnTcp);
    }
    if !rule.from.is_empty() && !rule.from.iter().any(|s| source_miss(s, attrs).is_none()) {
        return source_miss(&rule.from[0], attrs).map(Miss::From);
    }
    if !rule.to.is_empty() && !rule.to.iter().any(|o| operation_miss(o, attrs).is_none()) {
        return operation_miss(&rule.to[0], attrs).map(Miss::To);
    }
    rule.when.iter().position(|c| !condition_matches(c, attrs)).map(Miss::When)
}

/// Whether a rule uses anything only an HTTP request has.
pub fn rule_has_http_fields(rule: &Rule) -> bool {
    rule.from.iter().any(|s| s.request_principals.is_some() || s.not_request_principals.is_some())
        || rule.to.iter().any(|o| {
            o.hosts.is_some()
                || o.not_hosts.is_some()
                || o.methods.is_some()
                || o.not_methods.is_some()
                || o.paths.is_some()
                || o.not_paths.is_some()
        })
        || rule.when.iter().any(|c| matches!(c.key, ConditionKey::Request(_)))
}

/// A set field must match; a set `not_` field must not. HTTP-only fields are skipped (treated as
/// unset) without HTTP attributes: only DENY rules get that far with them.
fn field<T>(set: &Option<Vec<T>>, hit: impl Fn(&T) -> bool) -> bool {
    set.as_ref().is_none_or(|vals| vals.iter().any(hit))
}

fn not_field<T>(set: &Option<Vec<T>>, hit: impl Fn(&T) -> bool) -> bool {
    set.as_ref().is_none_or(|vals| !vals.iter().any(hit))
}

/// The first field of a `from` entry that fails, by its YAML name.
fn source_miss(s: &SourceMatch, a: &Attributes<'_>) -> Option<&'static str> {
    let principal = a.source_principal.map(SpiffeId::principal);
    // Parsed only for a rule that names namespaces: most name principals, and parsing the path
    // cost an L7 request about 700 instructions (callgrind).
    let namespace = || a.source_principal.and_then(|id| id.k8s()).map(|k| k.namespace);
    let in_net = |n: &IpNet| n.contains(&a.source_ip);
    // Checked in order, stopping at the first failure (the hot path: no field past it is read).
    if !field(&s.principals, |p| p.matches(principal)) {
        return Some("principals");
    }
    if !not_field(&s.not_principals, |p| p.matches(principal)) {
        return Some("notPrincipals");
    }
    if !field(&s.namespaces, |p| p.matches(namespace())) {
        return Some("namespaces");
    }
    if !not_field(&s.not_namespaces, |p| p.matches(namespace())) {
        return Some("notNamespaces");
    }
    if !field(&s.ip_blocks, in_net) {
        return Some("ipBlocks");
    }
    if !not_field(&s.not_ip_blocks, in_net) {
        return Some("notIpBlocks");
    }
    if !field(&s.remote_ip_blocks, in_net) {
        return Some("remoteIpBlocks");
    }
    if !not_field(&s.not_remote_ip_blocks, in_net) {
        return Some("notRemoteIpBlocks");
    }
    let http = a.http?;
    let rp = http.request_principal.as_deref();
    if !field(&s.request_principals, |p| p.matches(rp)) {
        return Some("requestPrincipals");
    }
    (!not_field(&s.not_request_principals, |p| p.matches(rp))).then_some("notRequestPrincipals")
}

/// The first field of a `to` entry that fails, by its YAML name.
fn operation_miss(o: &OperationMatch, a: &Attributes<'_>) -> Option<&'static str> {
    let port = |p: &u16| *p == a.destination_port;
    if !field(&o.ports, port) {
        return Some("ports");
    }
    if !not_field(&o.not_ports, port) {
        return Some("notPorts");
    }
    let http = a.http?;
    let host = http.host.as_str();
    let method = Some(http.method.as_str());
    let path = Some(http.path.as_str());
    if !field(&o.hosts, |p| p.matches_authority(host)) {
        return Some("hosts");
    }
    if !not_field(&o.not_hosts, |p| p.matches_authority(host)) {
        return Some("notHosts");
    }
    if !field(&o.methods, |p| p.matches(method)) {
        return Some("methods");
    }
    if !not_field(&o.not_methods, |p| p.matches(method)) {
        return Some("notMethods");
    }
    if !field(&o.paths, |p| p.matches(path)) {
        return Some("paths");
    }
    (!not_field(&o.not_paths, |p| p.matches(path))).then_some("notPaths")
}

fn condition_matches(c: &Condition, a: &Attributes<'_>) -> bool {
    if c.key.is_ip() {
        let ip = match c.key {
            ConditionKey::DestinationIp => a.destination_ip,
            _ => a.source_ip,
        };
        let values_ok = c.nets.is_empty() || c.nets.iter().any(|n| n.contains(&ip));
        return values_ok && !c.not_nets.iter().any(|n| n.contains(&ip));
    }
    let port;
    let values: Vec<&str> = match &c.key {
        ConditionKey::SourceNamespace => {
            a.source_principal.and_then(|id| id.k8s()).map(|k| k.namespace).into_iter().collect()
        }
        ConditionKey::SourcePrincipal => a.source_principal.map(SpiffeId::principal).into_iter().collect(),
        ConditionKey::DestinationPort => {
            port = a.destination_port.to_string();
            vec![port.as_str()]
        }
        ConditionKey::ConnectionSni => a.sni.into_iter().collect(),
        ConditionKey::Request(key) => match a.http {
            Some(http) => request_values(http, key),
            // Only DENY rules get here without HTTP: their HTTP-only conditions are dropped.
            None => return true,
        },
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => Vec::new(),
    };
    // A multi-valued attribute (a JWT claim that is a list) matches when any element does, for
    // `values` and `notValues` alike; an absent one matches no pattern.
    let hit = |p: &Pattern| values.iter().any(|v| p.matches(Some(v)));
    let values_ok = c.values.is_empty() || c.values.iter().any(hit);
    values_ok && !c.not_values.iter().any(hit)
}

fn request_values<'a>(http: &'a HttpAttributes, key: &RequestKey) -> Vec<&'a str> {
    let claim = |name: &str| -> Vec<&'a str> {
        http.claims.get(name).map(|v| v.iter().map(String::as_str).collect()).unwrap_or_default()
    };
    match key {
        RequestKey::Header(name) => http.headers.get(name).map(String::as_str).into_iter().collect(),
        RequestKey::Principal => http.request_principal.as_deref().into_iter().collect(),
        RequestKey::Audiences => claim("aud"),
        RequestKey::Presenter => claim("azp"),
        RequestKey::Claim(name) => claim(name),
    }
}

#[cfg(test)]
mod tests;
