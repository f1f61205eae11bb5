//! `keycard policy check`'s lints: policy sets that load fine and still do not do what their author
//! meant. Each finding has a stable code (for CI filters and documentation), a severity, and the
//! file and line of the resource it is about.
//!
//! | code | what |
//! |---|---|
//! | KC101 | a DENY rule matching `principals` / `namespaces` where the mode is not STRICT: a plaintext peer has no identity and passes |
//! | KC102 | HTTP-only fields in a rule that applies to a TCP port: the ALLOW rule never matches, the DENY rule widens |
//! | KC103 | a principal prefix ending inside the trust domain or namespace (`cluster.local/ns/foo*` also matches `ns/foobar`) |
//! | KC104 | a selector that matches no known workload |
//! | KC105 | a policy shadowed by another: a younger PeerAuthentication at the same level, a policy behind a deny-everything or allow-everything rule |
//! | KC106 | a root-namespace PeerAuthentication with a selector: it is not mesh-wide |
//! | KC107 | a field accepted but not acted on (traffic management in a DestinationRule, ...) |
//! | KC108 | a resource keycard does not read (info) |
//! | KC109 | a DestinationRule port level without `tls` under a host-wide `tls`: that port gets the default, not the host's (port levels do not inherit) |

use std::collections::BTreeMap;

use serde::Serialize;

use super::authz::{Action, AuthzPolicy, ConditionKey, Pattern, Rule, rule_has_http_fields};
use super::model::MtlsMode;
use super::peerauth::{PeerAuth, ResolvedPeerAuth, selects};
use super::{DestRule, Origin, PolicySet};
use crate::sidecar::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub severity: Severity,
    #[serde(flatten)]
    pub origin: Origin,
    /// `AuthorizationPolicy default/name`.
    pub resource: String,
    pub message: String,
}

/// A workload the lints check selectors and ports against (from manifests or sidecar configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownWorkload {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<(u16, Protocol)>,
}

/// Lints a loaded set. With `workloads` empty, the lints that need to know what runs (KC102,
/// KC104, and KC101's per-port precision) fall back to what the policies alone say.
pub fn lint(set: &PolicySet, root_ns: &str, workloads: &[KnownWorkload]) -> Vec<Finding> {
    let mut out = Vec::new();
    let cx = Lint { set, root_ns, workloads, out: &mut out };
    cx.run();
    out.sort_by(|a, b| (&a.origin.file, a.origin.line, a.code).cmp(&(&b.origin.file, b.origin.line, b.code)));
    out
}

/// Which workloads a selector can select.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Its own namespace's; from the root namespace, the whole mesh's (security policies).
    MeshFromRoot,
    /// Its own namespace's only (DestinationRules).
    OwnNamespace,
}

struct Lint<'a> {
    set: &'a PolicySet,
    root_ns: &'a str,
    workloads: &'a [KnownWorkload],
    out: &'a mut Vec<Finding>,
}

impl Lint<'_> {
    fn run(mut self) {
        for w in &self.set.warnings {
            // "file:line: message", as the loader writes them.
            let mut parts = w.splitn(3, ':');
            let (file, line, msg) = (parts.next(), parts.next(), parts.next());
            let origin = Origin {
                file: file.unwrap_or_default().into(),
                line: line.and_then(|l| l.trim().parse().ok()).unwrap_or(0),
            };
            self.push("KC107", Severity::Warning, &origin, "", msg.unwrap_or(w).trim().to_owned());
        }
        for p in &self.set.peer_auth {
            self.peer_auth(p);
        }
        for p in &self.set.authz {
            self.authz(p);
        }
        for r in &self.set.request_authn {
            if let Some(sel) = &r.selector {
                let what = format!("RequestAuthentication {}/{}", r.namespace, r.name);
                self.selector_matches_in(&r.namespace, sel, &r.origin, &what, Reach::MeshFromRoot);
            }
        }
        for r in &self.set.dest_rules {
            self.dest_rule(r);
        }
    }

    /// KC104 for a DestinationRule's selector, and KC109.
    fn dest_rule(&mut self, r: &DestRule) {
        let what = format!("DestinationRule {}/{}", r.namespace, r.name);
        if let Some(sel) = &r.selector {
            // A DestinationRule's selector reaches no other namespace, the root namespace's
            // included.
            self.selector_matches_in(&r.namespace, sel, &r.origin, &what, Reach::OwnNamespace);
        }
        let Some(host_tls) = r.levels.iter().find(|l| l.port.is_none()).and_then(|l| l.tls.as_ref()) else {
            return;
        };
        let sans = if host_tls.subject_alt_names.is_empty() {
            String::new()
        } else {
            format!(" with subjectAltNames {}", host_tls.subject_alt_names.join(", "))
        };
        for port in r.levels.iter().filter(|l| l.tls.is_none()).filter_map(|l| l.port) {
            let msg = format!(
                "portLevelSettings for port {port} set no tls: that port gets the default (ISTIO_MUTUAL, any mesh identity), not the host-wide {}{sans}, because a port's settings replace the host's whole; repeat the tls under the port",
                host_tls.mode.as_str()
            );
            self.push("KC109", Severity::Warning, &r.origin, &what, msg);
        }
    }

    fn push(
        &mut self,
        code: &'static str,
        severity: Severity,
        origin: &Origin,
        resource: &str,
        message: String,
    ) {
        self.out.push(Finding {
            code,
            severity,
            origin: origin.clone(),
            resource: resource.to_owned(),
            message,
        });
    }

    fn peer_auth(&mut self, p: &PeerAuth) {
        let what = format!("PeerAuthentication {}/{}", p.namespace, p.name);
        if p.namespace == self.root_ns && p.selector.is_some() {
            let msg = format!(
                "a selector in the root namespace ({}) selects only workloads in that namespace: this policy is not mesh-wide; drop the selector for a mesh-wide mode, or move it to the workloads' namespace",
                self.root_ns
            );
            self.push("KC106", Severity::Warning, &p.origin, &what, msg);
        }
        if let Some(sel) = &p.selector {
            self.selector_matches_in(&p.namespace, sel, &p.origin, &what, Reach::MeshFromRoot);
        }
        let older = self.set.peer_auth.iter().find(|o| {
            o.namespace == p.namespace
                && o.selector == p.selector
                && (o.created.unwrap_or(i64::MAX), o.order) < (p.created.unwrap_or(i64::MAX), p.order)
        });
        if let Some(o) = older {
            let msg = format!(
                "ignored: {}/{} ({}) sets the same level and is older, and with several policies at one level the oldest wins",
                o.namespace, o.name, o.origin
            );
            self.push("KC105", Severity::Warning, &p.origin, &what, msg);
        }
    }

    fn authz(&mut self, p: &AuthzPolicy) {
        let what = format!("AuthorizationPolicy {}/{}", p.namespace, p.name);
        if let Some(sel) = &p.selector {
            self.selector_matches_in(&p.namespace, sel, &p.origin, &what, Reach::MeshFromRoot);
        }
        for (i, rule) in p.rules.iter().enumerate() {
            for prefix in principal_prefixes(rule) {
                if let Some(fix) = prefix_crosses_segment(prefix) {
                    let msg = format!(
                        "rule {i}: principal prefix \"{prefix}*\" also matches identities whose name only starts with it (e.g. \"{prefix}bar\"); write \"{fix}*\" to mean that namespace"
                    );
                    self.push("KC103", Severity::Warning, &p.origin, &what, msg);
                }
            }
            if p.action == Action::Deny && matches_identity(rule) {
                self.deny_on_identity(p, i, rule, &what);
            }
            if rule_has_http_fields(rule) && p.action != Action::Audit {
                self.http_fields_on_tcp(p, i, rule, &what);
            }
        }
        self.shadowed(p, &what);
    }

    /// KC104: `sel`, of a resource in `ns`, selects none of the known workloads it can reach.
    fn selector_matches_in(
        &mut self,
        ns: &str,
        sel: &BTreeMap<String, String>,
        origin: &Origin,
        what: &str,
        reach: Reach,
    ) {
        let mesh = reach == Reach::MeshFromRoot && ns == self.root_ns;
        let in_scope = |w: &KnownWorkload| match reach {
            Reach::MeshFromRoot => self.in_scope(ns, w),
            Reach::OwnNamespace => w.namespace == ns,
        };
        if self.workloads.is_empty() || self.workloads.iter().any(|w| in_scope(w) && selects(sel, &w.labels))
        {
            return;
        }
        let labels: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let msg = format!(
            "selector {} matches none of the {} known workloads in {}{}",
            labels.join(","),
            self.workloads.iter().filter(|w| in_scope(w)).count(),
            if mesh { "the mesh".to_owned() } else { format!("namespace {ns}") },
            if reach == Reach::OwnNamespace {
                " (a DestinationRule's selector reaches no other namespace)"
            } else {
                ""
            }
        );
        self.push("KC104", Severity::Warning, origin, what, msg);
    }

    fn in_scope(&self, ns: &str, w: &KnownWorkload) -> bool {
        ns == self.root_ns || w.namespace == ns
    }

    /// The known workloads a policy applies to.
    fn selected(&self, p: &AuthzPolicy) -> Vec<&KnownWorkload> {
        self.workloads
            .iter()
            .filter(|w| {
                self.in_scope(&p.namespace, w) && p.selector.as_ref().is_none_or(|s| selects(s, &w.labels))
            })
            .collect()
    }

    /// KC101: where the rule applies and the mode is not STRICT, a plaintext peer (no principal,
    /// no namespace) does not match `principals` / `namespaces`, so the DENY does not stop it.
    fn deny_on_identity(&mut self, p: &AuthzPolicy, i: usize, rule: &Rule, what: &str) {
        let rule_ports = rule_ports(rule);
        let mut weak: Vec<String> = Vec::new();
        let workloads = self.selected(p);
        if workloads.is_empty() {
            // Nothing known runs there: judge by the policy's own scope.
            let labels = p.selector.clone().unwrap_or_default();
            let ns = if p.namespace == self.root_ns { "\u{0}mesh" } else { p.namespace.as_str() };
            let resolved = ResolvedPeerAuth::resolve(&self.set.peer_auth, self.root_ns, ns, &labels);
            let ports = rule_ports.clone().unwrap_or_else(|| port_keys(&resolved));
            for port in ports {
                let m = resolved.mode_for(port);
                if m.mode != MtlsMode::Strict {
                    weak.push(format!("{} (set by {})", m.mode, m.source));
                }
            }
        } else {
            for w in workloads {
                let resolved =
                    ResolvedPeerAuth::resolve(&self.set.peer_auth, self.root_ns, &w.namespace, &w.labels);
                let ports: Vec<u16> = match &rule_ports {
                    Some(ports) => ports.clone(),
                    None if w.ports.is_empty() => port_keys(&resolved),
                    None => w.ports.iter().map(|(port, _)| *port).collect(),
                };
                for port in ports {
                    let m = resolved.mode_for(port);
                    if m.mode != MtlsMode::Strict {
                        weak.push(format!(
                            "{}/{} port {port}: {} (set by {})",
                            w.namespace, w.name, m.mode, m.source
                        ));
                    }
                }
            }
        }
        weak.dedup();
        if weak.is_empty() {
            return;
        }
        let msg = format!(
            "rule {i} denies by principals/namespaces, but mTLS is not STRICT where it applies ({}): a plaintext peer has no identity, so the rule does not match it and the connection goes through; make the mode STRICT, or also deny peers without an identity (`notPrincipals: [\"*\"]`)",
            weak.join("; ")
        );
        self.push("KC101", Severity::Warning, &p.origin, what, msg);
    }

    /// KC102: needs to know which ports are TCP, so only with known workloads.
    fn http_fields_on_tcp(&mut self, p: &AuthzPolicy, i: usize, rule: &Rule, what: &str) {
        let rule_ports = rule_ports(rule);
        let mut tcp = Vec::new();
        for w in self.selected(p) {
            for (port, protocol) in &w.ports {
                let applies = rule_ports.as_ref().is_none_or(|ports| ports.contains(port));
                if applies && *protocol == Protocol::Tcp {
                    tcp.push(format!("{}/{}:{port}", w.namespace, w.name));
                }
            }
        }
        if tcp.is_empty() {
            return;
        }
        let effect = match p.action {
            Action::Deny => {
                "the HTTP-only fields are dropped there, so the rule denies every connection that matches the rest of it"
            }
            _ => "the rule never matches a TCP connection, so it allows nothing there",
        };
        let msg = format!(
            "rule {i} uses HTTP-only fields (methods, paths, hosts, requestPrincipals, request.* conditions) and applies to TCP port(s) {}: {effect}",
            tcp.join(", ")
        );
        self.push("KC102", Severity::Warning, &p.origin, what, msg);
    }

    /// KC105: a policy that never decides, because a deny-everything or allow-everything rule in a
    /// scope covering it decides first.
    fn shadowed(&mut self, p: &AuthzPolicy, what: &str) {
        if p.action == Action::Audit {
            return;
        }
        let covering = self.set.authz.iter().find(|a| {
            !std::ptr::eq(*a, p)
                && !a.dry_run
                && (a.action == Action::Deny || (a.action == Action::Allow && p.action == Action::Allow))
                && a.rules.iter().any(is_unconditional)
                && (a.namespace == self.root_ns || a.namespace == p.namespace)
                && match (&a.selector, &p.selector) {
                    (None, _) => true,
                    (Some(a_sel), Some(p_sel)) => selects(a_sel, p_sel),
                    (Some(_), None) => false,
                }
                // Of two allow-everything policies, report only the later one.
                && !(a.action == Action::Allow && p.rules.iter().any(is_unconditional) && a.origin > p.origin)
        });
        let Some(a) = covering else { return };
        let how = match a.action {
            Action::Deny => "denies every request first",
            _ => "allows every request, so this ALLOW policy never changes a decision",
        };
        let msg = format!(
            "shadowed: {} {}/{} ({}) has a rule with no conditions and {how}",
            if a.action == Action::Deny { "DENY" } else { "ALLOW" },
            a.namespace,
            a.name,
            a.origin
        );
        self.push("KC105", Severity::Warning, &p.origin, what, msg);
    }
}

/// Port 0 (the workload-wide mode) and every port with a port-level mode.
fn port_keys(r: &ResolvedPeerAuth) -> Vec<u16> {
    let mut ports = vec![0];
    ports.extend(r.workload.iter().flat_map(|w| w.port_modes.keys().copied()));
    ports
}

/// The ports a rule is limited to; `None` when it applies to every port (no `to`, or a `to`
/// entry without `ports`).
fn rule_ports(rule: &Rule) -> Option<Vec<u16>> {
    if rule.to.is_empty() {
        return None;
    }
    rule.to.iter().map(|o| o.ports.clone()).collect::<Option<Vec<_>>>().map(|v| v.concat())
}

fn is_unconditional(r: &Rule) -> bool {
    r.from.is_empty() && r.to.is_empty() && r.when.is_empty()
}

/// Whether a rule matches on a positive identity: `principals`, `namespaces`, or a
/// `source.principal` / `source.namespace` condition's `values`.
fn matches_identity(rule: &Rule) -> bool {
    rule.from.iter().any(|s| s.principals.is_some() || s.namespaces.is_some())
        || rule.when.iter().any(|c| {
            matches!(c.key, ConditionKey::SourcePrincipal | ConditionKey::SourceNamespace)
                && !c.values.is_empty()
        })
}

/// The prefix patterns of a rule's principals (`from` and `source.principal` conditions).
fn principal_prefixes(rule: &Rule) -> Vec<&str> {
    let from = rule.from.iter().flat_map(|s| [&s.principals, &s.not_principals]).flatten().flatten();
    let when = rule
        .when
        .iter()
        .filter(|c| c.key == ConditionKey::SourcePrincipal)
        .flat_map(|c| c.values.iter().chain(&c.not_values));
    from.chain(when)
        .filter_map(|p| match p {
            Pattern::Prefix(prefix) => Some(prefix.as_str()),
            _ => None,
        })
        .collect()
}

/// For a principal prefix ending part-way through the trust domain or the namespace, the prefix
/// that stops at the segment's end.
fn prefix_crosses_segment(prefix: &str) -> Option<String> {
    if prefix.is_empty() || prefix.ends_with('/') {
        return None;
    }
    let segments: Vec<&str> = prefix.split('/').collect();
    match segments.as_slice() {
        [_] | [_, "ns", _] => Some(format!("{prefix}/")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ending_in_the_namespace_or_trust_domain_is_flagged() {
        assert_eq!(prefix_crosses_segment("cluster.local/ns/foo").as_deref(), Some("cluster.local/ns/foo/"));
        assert_eq!(prefix_crosses_segment("cluster.loc").as_deref(), Some("cluster.loc/"));
        assert_eq!(prefix_crosses_segment("cluster.local/ns/foo/"), None);
        assert_eq!(prefix_crosses_segment("cluster.local/ns/foo/sa/bookinfo-"), None);
    }
}
