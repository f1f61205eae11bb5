//! Istio security policy: loading (multi-document YAML, errors with file, line and field), the
//! PeerAuthentication resolution, RequestAuthentication's JWT rules and the authorization engine.
//!
//! [`PolicySet::load`] reads files and directories into checked, compiled policies;
//! [`PolicySet::for_workload`] picks what applies to one workload (namespace, root namespace and
//! `selector.matchLabels`, as Istio does).

pub mod authz;
pub mod destination;
pub mod explain;
pub mod lint;
pub mod load;
pub mod model;
pub mod peerauth;
pub mod requestauth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_saphyr::Spanned;

use self::authz::{Action, AuthzPolicy, Condition, ConditionKey, OperationMatch, Pattern, Rule, SourceMatch};
pub use self::destination::{DestPool, DestRule, DestTls, Destination, Destinations, Tier};
pub use self::load::LoadError;
use self::load::{Object, Resource, spanned_error};
use self::model::{AuthorizationPolicySpec, PeerAuthenticationSpec, S};
use self::peerauth::{PeerAuth, ResolvedPeerAuth};
pub use self::requestauth::{JwtRule, RequestAuthn};

/// Istio's default root namespace: its policies apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The annotation that makes an AuthorizationPolicy report without enforcing.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Where a resource was read: its file and the line of its `metadata.name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: u64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Everything loaded from the policy files.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicySet {
    pub peer_auth: Vec<PeerAuth>,
    pub authz: Vec<AuthzPolicy>,
    pub request_authn: Vec<RequestAuthn>,
    pub dest_rules: Vec<DestRule>,
    /// Fields accepted but not acted on (traffic management in DestinationRules, a `jwksUri` next to
    /// `jwks`), with location.
    pub warnings: Vec<String>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// What applies to one workload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadPolicy {
    pub peer_auth: ResolvedPeerAuth,
    pub authz: Vec<AuthzPolicy>,
    /// The rules of every RequestAuthentication that applies, in load order.
    pub jwt_rules: Vec<JwtRule>,
    /// The DestinationRules its upstreams may take theirs from.
    pub destinations: Destinations,
}

impl WorkloadPolicy {
    pub fn authz_refs(&self) -> Vec<&AuthzPolicy> {
        self.authz.iter().collect()
    }

    /// Whether any rule has a `request.headers[...]` condition (else a request's headers need
    /// not be collected for the engine).
    pub fn reads_request_headers(&self) -> bool {
        self.authz
            .iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.when)
            .any(|c| matches!(c.key, authz::ConditionKey::Request(authz::RequestKey::Header(_))))
    }
}

impl PolicySet {
    /// Reads every `*.yaml` / `*.yml` file of each path (directories non-recursively, in name
    /// order). The first error stops the load: a policy set is applied whole or not at all.
    pub fn load(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut files = Vec::new();
        for path in paths {
            if path.is_dir() {
                files.extend(yaml_files(path).map_err(|e| io_error(path, &e))?);
            } else {
                files.push(path.clone());
            }
        }
        let mut set = Self::default();
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(|e| io_error(file, &e))?;
            set.add_text(&text, file)?;
        }
        set.files = files;
        Ok(set)
    }

    /// Adds the resources of one YAML text; `file` names it in errors.
    pub fn add_text(&mut self, text: &str, file: &Path) -> Result<(), LoadError> {
        self.add_resources(load::parse_documents(text, file)?, text, file)
    }

    /// Adds the Istio resources of a text that may hold other kinds too (a directory of
    /// manifests); returns what it passed over. The resources of a file with an error are not added.
    pub fn add_manifest(&mut self, text: &str, file: &Path) -> Result<Vec<load::Skipped>, LoadError> {
        let (resources, skipped) = load::parse_manifest(text, file)?;
        let mut staged = self.clone();
        staged.add_resources(resources, text, file)?;
        staged.files.push(file.to_owned());
        *self = staged;
        Ok(skipped)
    }

    fn add_resources(&mut self, resources: Vec<Resource>, text: &str, file: &Path) -> Result<(), LoadError> {
        for resource in resources {
            let order = self.peer_auth.len() + self.authz.len() + self.dest_rules.len();
            let cx = Cx { file, text };
            match resource {
                Resource::PeerAuthentication(o) => self.peer_auth.push(cx.peer_auth(o, order)?),
                Resource::AuthorizationPolicy(o) => self.authz.push(cx.authz(o)?),
                Resource::RequestAuthentication(o) => {
                    let (authn, warnings) = cx.request_authn(o)?;
                    self.request_authn.push(authn);
                    self.warnings.extend(warnings);
                }
                Resource::DestinationRule(o) => {
                    let (rule, warnings) = cx.dest_rule(*o)?;
                    self.dest_rules.push(rule);
                    self.warnings.extend(warnings);
                }
            }
        }
        Ok(())
    }

    /// The policies that apply to a workload in `namespace` with `labels`.
    pub fn for_workload(
        &self,
        root_ns: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> WorkloadPolicy {
        let applies = |ns: &str, selector: &Option<BTreeMap<String, String>>| {
            (ns == namespace || ns == root_ns)
                && selector.as_ref().is_none_or(|s| peerauth::selects(s, labels))
        };
        WorkloadPolicy {
            peer_auth: ResolvedPeerAuth::resolve(&self.peer_auth, root_ns, namespace, labels),
            authz: self.authz.iter().filter(|p| applies(&p.namespace, &p.selector)).cloned().collect(),
            jwt_rules: self
                .request_authn
                .iter()
                .filter(|r| applies(&r.namespace, &r.selector))
                .flat_map(|r| r.rules.iter().cloned())
                .collect(),
            destinations: Destinations::for_workload(&self.dest_rules, root_ns, namespace, labels),
        }
    }
}

/// The `*.yaml` / `*.yml` files of a directory (not recursive), in name order.
pub fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    found.sort();
    Ok(found)
}

fn io_error(path: &Path, e: &std::io::Error) -> LoadError {
    LoadError { file: path.to_owned(), line: 0, column: 0, field: None, message: format!("cannot read: {e}") }
}

/// Compiles resources of one file, with its text at hand for error lines.
struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Cx<'_> {
    fn err<T>(&self, at: &Spanned<T>, message: impl Into<String>) -> LoadError {
        spanned_error(self.file, self.text, at, message)
    }

    fn namespace(&self, md: &model::Metadata) -> String {
        md.namespace.clone().unwrap_or_else(|| "default".into())
    }

    fn origin(&self, md: &model::Metadata) -> Origin {
        Origin { file: self.file.to_owned(), line: md.name.referenced.line() }
    }

    fn peer_auth(&self, o: Object<PeerAuthenticationSpec>, order: usize) -> Result<PeerAuth, LoadError> {
        let selector = o.spec.selector.map(|s| s.match_labels);
        if let Some(ports) = &o.spec.port_level_mtls
            && selector.is_none()
        {
            return Err(self.err(ports, "portLevelMtls needs a workload selector, as in Istio"));
        }
        Ok(PeerAuth {
            namespace: self.namespace(&o.metadata),
            name: o.metadata.name.value.clone(),
            origin: self.origin(&o.metadata),
            selector,
            mode: o.spec.mtls.map(|m| m.mode).unwrap_or_default(),
            port_modes: o
                .spec
                .port_level_mtls
                .map(|p| p.value.into_iter().map(|(port, m)| (port, m.mode)).collect())
                .unwrap_or_default(),
            created: o.metadata.creation_timestamp.as_deref().and_then(parse_timestamp),
            order,
        })
    }

    fn authz(&self, o: Object<AuthorizationPolicySpec>) -> Result<AuthzPolicy, LoadError> {
        let spec = o.spec;
        if let Some(t) = spec.target_ref.as_ref().or(spec.target_refs.as_ref()) {
            return Err(self.err(t, "targetRef is not supported: keycard applies policies by selector"));
        }
        if let Some(p) = &spec.provider {
            return Err(self.err(p, "provider (CUSTOM authorization) is not supported"));
        }
        let action = match &spec.action {
            None => Action::Allow,
            Some(at) => match at.value.as_str() {
                "ALLOW" => Action::Allow,
                "DENY" => Action::Deny,
                "AUDIT" => Action::Audit,
                "CUSTOM" => {
                    return Err(self.err(at, "action CUSTOM (external authorization) is not supported"));
                }
                other => {
                    return Err(
                        self.err(at, format!("unknown action `{other}`: expected ALLOW, DENY, AUDIT"))
                    );
                }
            },
        };
        let dry_run = match o.metadata.annotations.get(DRY_RUN_ANNOTATION) {
            None => false,
            Some(v) if v.value == "false" => false,
            Some(v) if v.value == "true" => true,
            Some(v) => {
                let msg = format!(
                    "annotation {DRY_RUN_ANNOTATION} must be \"true\" or \"false\", not {:?}",
                    v.value
                );
                return Err(self.err(v, msg));
            }
        };
        let rules = spec.rules.iter().map(|r| self.rule(r)).collect::<Result<Vec<_>, _>>()?;
        let namespace = self.namespace(&o.metadata);
        let origin = self.origin(&o.metadata);
        let name = o.metadata.name.value;
        let rule_ids = (0..rules.len()).map(|i| authz::RuleId::new(&namespace, &name, i)).collect();
        Ok(AuthzPolicy {
            namespace,
            origin,
            name,
            action,
            selector: spec.selector.map(|s| s.match_labels),
            dry_run,
            rule_count: rules.len(),
            rules,
            rule_ids,
        })
    }

    fn rule(&self, r: &model::Rule) -> Result<Rule, LoadError> {
        let from = r
            .from
            .iter()
            .map(|f| {
                let s = &f.source;
                Ok(SourceMatch {
                    principals: self.patterns(&s.principals)?,
                    not_principals: self.patterns(&s.not_principals)?,
                    request_principals: self.patterns(&s.request_principals)?,
                    not_request_principals: self.patterns(&s.not_request_principals)?,
                    namespaces: self.patterns(&s.namespaces)?,
                    not_namespaces: self.patterns(&s.not_namespaces)?,
                    ip_blocks: self.nets(&s.ip_blocks)?,
                    not_ip_blocks: self.nets(&s.not_ip_blocks)?,
                    remote_ip_blocks: self.nets(&s.remote_ip_blocks)?,
                    not_remote_ip_blocks: self.nets(&s.not_remote_ip_blocks)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let to =
            r.to.iter()
                .map(|t| {
                    let o = &t.operation;
                    Ok(OperationMatch {
                        hosts: self.patterns_by(&o.hosts, Pattern::parse_host)?,
                        not_hosts: self.patterns_by(&o.not_hosts, Pattern::parse_host)?,
                        ports: self.ports(&o.ports)?,
                        not_ports: self.ports(&o.not_ports)?,
                        methods: self.patterns(&o.methods)?,
                        not_methods: self.patterns(&o.not_methods)?,
                        paths: self.patterns_by(&o.paths, Pattern::parse_path)?,
                        not_paths: self.patterns_by(&o.not_paths, Pattern::parse_path)?,
                    })
                })
                .collect::<Result<Vec<_>, LoadError>>()?;
        let when = r.when.iter().map(|c| self.condition(c)).collect::<Result<Vec<_>, _>>()?;
        Ok(Rule { from, to, when })
    }

    fn condition(&self, c: &model::Condition) -> Result<Condition, LoadError> {
        let key = ConditionKey::parse(&c.key.value)
            .ok_or_else(|| self.err(&c.key, format!("unsupported condition key `{}`", c.key.value)))?;
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(self.err(&c.key, "a condition needs values or notValues"));
        }
        let is_ip =
            matches!(key, ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp);
        if key == ConditionKey::DestinationPort {
            self.ports(&c.values)?;
            self.ports(&c.not_values)?;
        }
        let (nets, not_nets) = if is_ip {
            (self.nets(&c.values)?.unwrap_or_default(), self.nets(&c.not_values)?.unwrap_or_default())
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Condition {
            key,
            values: if is_ip { Vec::new() } else { self.patterns(&c.values)?.unwrap_or_default() },
            not_values: if is_ip { Vec::new() } else { self.patterns(&c.not_values)?.unwrap_or_default() },
            nets,
            not_nets,
        })
    }

    /// An empty list is the same as an absent one.
    fn patterns(&self, values: &[S]) -> Result<Option<Vec<Pattern>>, LoadError> {
        self.patterns_by(values, Pattern::parse)
    }

    fn patterns_by(
        &self,
        values: &[S],
        parse: fn(&str) -> Result<Pattern, String>,
    ) -> Result<Option<Vec<Pattern>>, LoadError> {
        if values.is_empty() {
            return Ok(None);
        }
        values.iter().map(|v| parse(&v.value).map_err(|m| self.err(v, m))).collect::<Result<_, _>>().map(Some)
    }

    fn nets(&self, values: &[S]) -> Result<Option<Vec<ipnet::IpNet>>, LoadError> {
        if values.is_empty() {
            return Ok(None);
        }
        values
            .iter()
            .map(|v| {
                let s = v.value.as_str();
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| self.err(v, format!("{s:?} is not an IP address or CIDR block")))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn ports(&self, values: &[S]) -> Result<Option<Vec<u16>>, LoadError> {
        if values.is_empty() {
            return Ok(None);
        }
        values
            .iter()
            .map(|v| {
                v.value.parse::<u16>().map_err(|_| self.err(v, format!("{:?} is not a port number", v.value)))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

fn parse_timestamp(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[cfg(test)]
mod tests;
