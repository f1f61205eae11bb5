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

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::SpiffeId;

/// Istio's name for one rule: `ns[NS]-policy[NAME]-rule[N]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleId {
    pub namespace: String,
    pub policy: String,
    pub rule: usize,
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ns[{}]-policy[{}]-rule[{}]", self.namespace, self.policy, self.rule)
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
    pub action: Action,
    /// `None`: every workload of the namespace (or of the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub dry_run: bool,
    #[serde(skip)]
    pub rules: Vec<Rule>,
    /// For `config_dump` and `policy explain`.
    pub rule_count: usize,
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
    /// Any `request.*` key: HTTP only.
    Request(String),
}

impl ConditionKey {
    pub fn parse(key: &str) -> Option<Self> {
        Some(match key {
            "source.ip" => Self::SourceIp,
            "remote.ip" => Self::RemoteIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "connection.sni" => Self::ConnectionSni,
            k if k.starts_with("request.headers[") && k.ends_with(']') => Self::Request(k.to_owned()),
            k if k.starts_with("request.auth.") => Self::Request(k.to_owned()),
            _ => return None,
        })
    }

    fn is_ip(&self) -> bool {
        matches!(self, Self::SourceIp | Self::RemoteIp | Self::DestinationIp)
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let stars = s.matches('*').count();
        Ok(match (s, stars) {
            ("*", _) => Self::Any,
            (_, 0) => Self::Exact(s.to_owned()),
            (_, 1) if s.ends_with('*') => Self::Prefix(s[..s.len() - 1].to_owned()),
            (_, 1) if s.starts_with('*') => Self::Suffix(s[1..].to_owned()),
            _ => return Err(format!("{s:?}: `*` is allowed only alone, at the start or at the end")),
        })
    }

    /// Whether `value` matches; an absent value (a plaintext peer's identity) matches nothing.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
            Self::Any => !v.is_empty(),
        }
    }
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
    pub host: String,
    pub method: String,
    /// Normalised path, no query or fragment.
    pub path: String,
    pub request_principal: Option<String>,
    pub headers: BTreeMap<String, String>,
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
        self.rule.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string)
    }
}

impl Denied {
    pub fn policy_label(&self) -> String {
        self.rule.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string)
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
    RuleId { namespace: p.namespace.clone(), policy: p.name.clone(), rule }
}

fn rule_matches(rule: &Rule, action: Action, attrs: &Attributes<'_>) -> bool {
    let tcp = attrs.http.is_none();
    if tcp && action != Action::Deny && rule_has_http_fields(rule) {
        return false;
    }
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, attrs));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, attrs));
    let when = rule.when.iter().all(|c| condition_matches(c, attrs));
    from && to && when
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

fn source_matches(s: &SourceMatch, a: &Attributes<'_>) -> bool {
    let principal = a.source_principal.map(SpiffeId::principal);
    let namespace = a.source_principal.and_then(|id| id.k8s()).map(|k| k.namespace);
    let in_net = |n: &IpNet| n.contains(&a.source_ip);
    let mut ok = field(&s.principals, |p| p.matches(principal))
        && not_field(&s.not_principals, |p| p.matches(principal))
        && field(&s.namespaces, |p| p.matches(namespace))
        && not_field(&s.not_namespaces, |p| p.matches(namespace))
        && field(&s.ip_blocks, in_net)
        && not_field(&s.not_ip_blocks, in_net)
        && field(&s.remote_ip_blocks, in_net)
        && not_field(&s.not_remote_ip_blocks, in_net);
    if let Some(http) = a.http {
        let rp = http.request_principal.as_deref();
        ok = ok
            && field(&s.request_principals, |p| p.matches(rp))
            && not_field(&s.not_request_principals, |p| p.matches(rp));
    }
    ok
}

fn operation_matches(o: &OperationMatch, a: &Attributes<'_>) -> bool {
    let port = |p: &u16| *p == a.destination_port;
    let mut ok = field(&o.ports, port) && not_field(&o.not_ports, port);
    if let Some(http) = a.http {
        let host = Some(http.host.as_str());
        let method = Some(http.method.as_str());
        let path = Some(http.path.as_str());
        ok = ok
            && field(&o.hosts, |p| p.matches(host))
            && not_field(&o.not_hosts, |p| p.matches(host))
            && field(&o.methods, |p| p.matches(method))
            && not_field(&o.not_methods, |p| p.matches(method))
            && field(&o.paths, |p| p.matches(path))
            && not_field(&o.not_paths, |p| p.matches(path));
    }
    ok
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
    let value: Option<&str> = match &c.key {
        ConditionKey::SourceNamespace => a.source_principal.and_then(|id| id.k8s()).map(|k| k.namespace),
        ConditionKey::SourcePrincipal => a.source_principal.map(SpiffeId::principal),
        ConditionKey::DestinationPort => {
            port = a.destination_port.to_string();
            Some(port.as_str())
        }
        ConditionKey::ConnectionSni => a.sni,
        ConditionKey::Request(key) => match a.http {
            Some(http) => request_value(http, key),
            // Only DENY rules get here without HTTP: their HTTP-only conditions are dropped.
            None => return true,
        },
        _ => None,
    };
    let values_ok = c.values.is_empty() || c.values.iter().any(|p| p.matches(value));
    values_ok && !c.not_values.iter().any(|p| p.matches(value))
}

fn request_value<'a>(http: &'a HttpAttributes, key: &str) -> Option<&'a str> {
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        return http.headers.get(&name.to_ascii_lowercase()).map(String::as_str);
    }
    match key {
        "request.auth.principal" => http.request_principal.as_deref(),
        _ => key
            .strip_prefix("request.auth.claims[")
            .and_then(|k| k.strip_suffix(']'))
            .and_then(|claim| http.claims.get(claim))
            .and_then(|v| v.first())
            .map(String::as_str),
    }
}

#[cfg(test)]
mod tests;
