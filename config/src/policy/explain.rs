//! `keycard policy explain`: what the sidecar would decide for one connection or request, and why.
//! The decision is [`authz::evaluate`]'s and the mode is [`ResolvedPeerAuth::mode_for`]'s, the
//! proxy's own calls; the per-rule trace comes from the same matcher ([`authz::rule_miss`]).

use serde::Serialize;

use super::authz::{self, Action, Attributes, AuthzPolicy, Miss, Rule, RuleId};
use super::model::MtlsMode;
use super::peerauth::EffectiveMode;
use super::{Origin, WorkloadPolicy};

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub mtls: EffectiveMode,
    pub allowed: bool,
    /// `allowed_by_policy`, `no_policy`, `denied_by_policy`, `no_matching_allow`, or a refusal
    /// before authorization (`plaintext_in_strict`).
    pub reason: String,
    /// The deciding rule, when one rule decided.
    pub rule: Option<RuleId>,
    /// Every policy that applies, in evaluation order: AUDIT, DENY, ALLOW; dry-run last.
    pub policies: Vec<PolicyTrace>,
    /// A sentence for a person.
    pub summary: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyTrace {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub dry_run: bool,
    #[serde(flatten)]
    pub origin: Origin,
    /// `matched rule N`, `no rule matched`, `has no rules: matches nothing`, `not evaluated: ...`.
    pub outcome: String,
    pub rules: Vec<RuleTrace>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    pub rule: usize,
    pub matched: bool,
    /// Why it did not match (empty when it did).
    pub why: String,
}

/// Explains one connection (`attrs.http` `None`) or request to a workload. `plaintext` is a
/// connection without mutual TLS, which a STRICT port refuses before any policy is read.
pub fn explain(policy: &WorkloadPolicy, attrs: &Attributes<'_>, plaintext: bool) -> Explanation {
    let mtls = policy.peer_auth.mode_for(attrs.destination_port);
    let ordered = order(&policy.authz);
    if plaintext && mtls.mode == MtlsMode::Strict {
        let summary = format!(
            "DENY: port {} is STRICT (set by {}), so a plaintext connection is refused before any AuthorizationPolicy is read",
            attrs.destination_port, mtls.source
        );
        let policies = ordered.iter().map(|p| not_evaluated(p, "the connection is refused first")).collect();
        return Explanation {
            mtls,
            allowed: false,
            reason: "plaintext_in_strict".into(),
            rule: None,
            policies,
            summary,
        };
    }
    let decision = authz::evaluate(&policy.authz_refs(), attrs);
    let mut policies: Vec<PolicyTrace> = ordered.iter().map(|p| trace(p, attrs)).collect();
    // Policies after the decision were not reached (a DENY decides before any ALLOW is read).
    if let Err(denied) = &decision
        && let Some(rule) = &denied.rule
    {
        for t in policies.iter_mut().filter(|t| t.action == Action::Allow && !t.dry_run) {
            t.outcome = format!("not reached: {rule} denied first");
        }
    }
    let allow_count = policy.authz.iter().filter(|p| p.action == Action::Allow && !p.dry_run).count();
    let (allowed, rule) = match decision {
        Ok(p) => (true, p.rule),
        Err(d) => (false, d.rule),
    };
    let (reason, summary) = match (&rule, allowed) {
        (Some(r), true) => ("allowed_by_policy", format!("ALLOW: {r} matched")),
        (Some(r), false) => ("denied_by_policy", format!("DENY: {r} matched")),
        (None, true) => (
            "no_policy",
            "ALLOW: no ALLOW policy applies to this workload and no DENY rule matched".to_owned(),
        ),
        (None, false) => (
            "no_matching_allow",
            format!(
                "DENY: {allow_count} ALLOW polic{} apply and none matched",
                if allow_count == 1 { "y" } else { "ies" }
            ),
        ),
    };
    let reason = reason.to_owned();
    Explanation { mtls, allowed, reason, rule, policies, summary }
}

/// AUDIT, DENY, ALLOW (the engine's order), each group in load order; dry-run policies last.
fn order(all: &[AuthzPolicy]) -> Vec<&AuthzPolicy> {
    let rank = |p: &AuthzPolicy| {
        let action = match p.action {
            Action::Audit => 0,
            Action::Deny => 1,
            Action::Allow => 2,
        };
        (p.dry_run, action)
    };
    let mut out: Vec<&AuthzPolicy> = all.iter().collect();
    out.sort_by_key(|p| rank(p));
    out
}

fn not_evaluated(p: &AuthzPolicy, why: &str) -> PolicyTrace {
    policy_trace(p, format!("not evaluated: {why}"), Vec::new())
}

fn policy_trace(p: &AuthzPolicy, outcome: String, rules: Vec<RuleTrace>) -> PolicyTrace {
    PolicyTrace {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        action: p.action,
        dry_run: p.dry_run,
        origin: p.origin.clone(),
        outcome,
        rules,
    }
}

fn trace(p: &AuthzPolicy, attrs: &Attributes<'_>) -> PolicyTrace {
    let rules: Vec<RuleTrace> = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let miss = authz::rule_miss(r, p.action, attrs);
            RuleTrace {
                rule: i,
                matched: miss.is_none(),
                why: miss.map(|m| describe(m, r)).unwrap_or_default(),
            }
        })
        .collect();
    let first = rules.iter().find(|r| r.matched).map(|r| r.rule);
    let outcome = match (p.rules.is_empty(), first, p.action) {
        (true, _, _) => "has no rules: matches nothing".to_owned(),
        (_, Some(i), Action::Audit) => format!("rule {i} matched: audited, no effect on the decision"),
        (_, Some(i), _) if p.dry_run => format!("rule {i} matched (dry run: reported, not enforced)"),
        (_, Some(i), _) => format!("rule {i} matched"),
        (_, None, _) => "no rule matched".to_owned(),
    };
    policy_trace(p, outcome, rules)
}

fn describe(m: Miss, rule: &Rule) -> String {
    match m {
        Miss::HttpOnlyOnTcp => {
            "uses HTTP-only fields, which a TCP connection cannot match (an ALLOW rule never matches TCP then)".into()
        }
        Miss::From(field) if rule.from.len() > 1 => format!("no `from` entry matched (the first fails on {field})"),
        Miss::From(field) => format!("from.{field} does not match"),
        Miss::To(field) if rule.to.len() > 1 => format!("no `to` entry matched (the first fails on {field})"),
        Miss::To(field) => format!("to.{field} does not match"),
        Miss::When(i) => format!("when[{i}] ({}) does not match", rule.when.get(i).map(|c| c.key.to_string()).unwrap_or_default()),
    }
}
