//! DestinationRules: what keycard reads of them (`tls`; of `connectionPool`, how HTTP/1.1 requests
//! travel and the connect deadline), and which one applies to an upstream of a workload, chosen
//! as Istio chooses:
//!
//! - a rule in the workload's own namespace first, then one in the destination service's
//!   namespace (from a `name.namespace.svc...` host) exported to the workload's namespace, then
//!   one in the root namespace exported to it; rules in other namespaces do not apply;
//! - within a namespace, the most specific host: exact, then the longest wildcard;
//! - a rule with a `workloadSelector` applies only to the workloads it selects in its own
//!   namespace, and is preferred there over a rule for the same host without one; among equals,
//!   the first loaded;
//! - a short host (`reviews`) is the service of that name in the rule's namespace
//!   (`reviews.<namespace>.svc.cluster.local`);
//! - a port's settings (`portLevelSettings`) replace the host-wide ones whole: what the port
//!   leaves out takes the defaults, not the host-wide value.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_saphyr::Spanned;

use super::load::{LoadError, Object};
use super::model::{ClientTls, ClientTlsMode, ConnectionPool, DestinationRuleSpec, H2UpgradePolicy};
use super::{Cx, peerauth};

/// The DNS domain of the cluster's services, which Istio appends to short host names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// One DestinationRule as keycard applies it.
#[derive(Debug, Clone, Serialize)]
pub struct DestRule {
    pub namespace: String,
    pub name: String,
    pub origin: super::Origin,
    /// The host as written, short names made whole.
    pub host: String,
    /// `workloadSelector.matchLabels`.
    pub selector: Option<BTreeMap<String, String>>,
    /// `exportTo`; empty means everywhere (`*`).
    pub export_to: Vec<String>,
    /// The host-wide settings (`port: None`), then each port's, as written.
    pub levels: Vec<Level>,
}

/// The settings of one level of a rule: host-wide or one port's.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub port: Option<u16>,
    pub tls: Option<DestTls>,
    pub pool: Option<DestPool>,
}

/// The TLS settings a DestinationRule gives one host (and optionally one port).
#[derive(Debug, Clone, Serialize)]
pub struct DestTls {
    pub mode: ClientTlsMode,
    pub subject_alt_names: Vec<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub sni: Option<String>,
}

/// What a DestinationRule's `connectionPool` says of how keycard reaches one host (and
/// optionally one port).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestPool {
    /// Whether HTTP/1.1 requests travel between the sidecars as HTTP/2: `UPGRADE` is true,
    /// `DO_NOT_UPGRADE` and `useClientProtocol: true` false; `None` leaves it to the sidecar's
    /// `http.h2_upgrade` (`DEFAULT`, or not said).
    pub h2_upgrade: Option<bool>,
    /// `tcp.connectTimeout`: the deadline for TCP connections to the destination.
    pub connect_timeout: Option<Duration>,
}

/// What the chosen rule says for one port: `None` where that level leaves a setting out.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub rule: &'a DestRule,
    /// Why this rule: whose namespace it came from.
    pub tier: Tier,
    /// The port's own level (`portLevelSettings`) rather than the host-wide one.
    pub port_level: bool,
    pub tls: Option<&'a DestTls>,
    pub pool: Option<&'a DestPool>,
}

/// The namespaces a workload takes DestinationRules from, in the order it looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The workload's own namespace.
    Workload,
    /// The destination service's namespace, exporting the rule to the workload's.
    Service,
    /// The root namespace, exporting the rule to the workload's.
    Root,
}

impl Tier {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Workload => "the workload's own namespace",
            Self::Service => "the service's namespace, exported to the workload's",
            Self::Root => "the root namespace, exported to the workload's",
        }
    }
}

impl DestRule {
    /// Whether a workload in `namespace` sees this rule from another namespace.
    fn exported_to(&self, namespace: &str) -> bool {
        self.export_to.is_empty()
            || self
                .export_to
                .iter()
                .any(|e| e == "*" || e == namespace || (e == "." && self.namespace == namespace))
    }

    /// The settings for `port`: its own level if the rule has one, else the host-wide one.
    fn for_port(&self, port: u16, tier: Tier) -> Destination<'_> {
        let level = self
            .levels
            .iter()
            .find(|l| l.port == Some(port))
            .or_else(|| self.levels.iter().find(|l| l.port.is_none()));
        Destination {
            rule: self,
            tier,
            port_level: level.is_some_and(|l| l.port.is_some()),
            tls: level.and_then(|l| l.tls.as_ref()),
            pool: level.and_then(|l| l.pool.as_ref()),
        }
    }
}

/// The DestinationRules that may apply to one workload's upstreams.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Destinations {
    pub namespace: String,
    pub root_namespace: String,
    /// Rules whose selector (if any) selects the workload, in load order.
    pub rules: Vec<DestRule>,
}

impl Destinations {
    /// The rules of `all` that may apply to a workload in `namespace` with `labels`.
    pub fn for_workload(
        all: &[DestRule],
        root_ns: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let rules = all
            .iter()
            .filter(|r| match &r.selector {
                None => true,
                // Selectors do not reach across namespaces.
                Some(s) => r.namespace == namespace && peerauth::selects(s, labels),
            })
            .cloned()
            .collect();
        Self { namespace: namespace.to_owned(), root_namespace: root_ns.to_owned(), rules }
    }

    /// The rule for `host` and what it says for `port`; `None` where no rule applies. A short
    /// host is the service of that name in the workload's namespace, as its DNS search path makes
    /// it.
    pub fn lookup(&self, host: &str, port: u16) -> Option<Destination<'_>> {
        let host = &resolve_host(host, &self.namespace);
        let tiers = [
            (Some(self.namespace.as_str()), Tier::Workload),
            (service_namespace(host), Tier::Service),
            (Some(self.root_namespace.as_str()), Tier::Root),
        ];
        for (i, &(tier_ns, tier)) in tiers.iter().enumerate() {
            let Some(ns) = tier_ns else { continue };
            if tiers[..i].iter().any(|(earlier, _)| *earlier == tier_ns) {
                continue;
            }
            let local = ns == self.namespace;
            let best = self
                .rules
                .iter()
                .filter(|r| r.namespace == ns && (local || r.exported_to(&self.namespace)))
                .filter_map(|r| specificity(&r.host, host).map(|s| (s, r)))
                // `min_by_key` keeps the first of equals: load order.
                .min_by_key(|(s, r)| (std::cmp::Reverse(*s), r.selector.is_none()));
            if let Some((_, rule)) = best {
                return Some(rule.for_port(port, tier));
            }
        }
        None
    }
}

/// How closely `pattern` names `host`: `None` if not at all, else larger for closer (an exact
/// name above every wildcard, a longer wildcard above a shorter one).
fn specificity(pattern: &str, host: &str) -> Option<usize> {
    if pattern == host {
        return Some(usize::MAX);
    }
    let suffix = pattern.strip_prefix('*')?;
    host.ends_with(suffix).then_some(suffix.len())
}

/// The namespace of a Kubernetes service host (`name.namespace.svc.<domain>`).
fn service_namespace(host: &str) -> Option<&str> {
    let mut labels = host.split('.');
    let (_, ns, svc) = (labels.next()?, labels.next()?, labels.next()?);
    (svc == "svc" && !ns.is_empty()).then_some(ns)
}

/// A host as Istio reads it in a rule of `namespace`: a short name (no dot, not `*`, not an IP
/// address) is that namespace's service.
fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') || host.parse::<std::net::IpAddr>().is_ok() {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}")
    }
}

impl Cx<'_> {
    pub(super) fn dest_rule(
        &self,
        o: Object<DestinationRuleSpec>,
    ) -> Result<(DestRule, Vec<String>), LoadError> {
        let (ns, name) = (self.namespace(&o.metadata), o.metadata.name.value.clone());
        let mut warnings = Vec::new();
        let mut warn = |what: &str, at: &Option<Spanned<serde::de::IgnoredAny>>| {
            if let Some(at) = at {
                warnings.push(format!(
                    "{}:{}: DestinationRule {ns}/{name}: {what} is traffic management, which keycard does not do; ignored",
                    self.file.display(),
                    at.referenced.line()
                ));
            }
        };
        warn("subsets", &o.spec.subsets);
        let mut rule = DestRule {
            origin: self.origin(&o.metadata),
            host: resolve_host(&o.spec.host, &ns),
            namespace: ns.clone(),
            name: name.clone(),
            selector: o.spec.workload_selector.map(|s| s.match_labels),
            export_to: o.spec.export_to,
            levels: Vec::new(),
        };
        let Some(tp) = o.spec.traffic_policy else { return Ok((rule, warnings)) };
        let top =
            (None, tp.tls.as_ref(), tp.connection_pool.as_ref(), &tp.load_balancer, &tp.outlier_detection);
        let ports = tp.port_level_settings.iter().map(|pl| {
            (
                Some(pl.port.number),
                pl.tls.as_ref(),
                pl.connection_pool.as_ref(),
                &pl.load_balancer,
                &pl.outlier_detection,
            )
        });
        for (port, tls, pool, load_balancer, outlier_detection) in std::iter::once(top).chain(ports) {
            if let Some(pool) = pool {
                for (field, at) in pool.tcp.iter().flat_map(|t| t.ignored()) {
                    warn(&format!("connectionPool.tcp.{field}"), at);
                }
                for (field, at) in pool.http.iter().flat_map(|h| h.ignored()) {
                    warn(&format!("connectionPool.http.{field}"), at);
                }
            }
            warn("loadBalancer", load_balancer);
            warn("outlierDetection", outlier_detection);
            rule.levels.push(Level {
                port,
                tls: tls.map(|t| self.dest_tls(t)).transpose()?,
                pool: pool.map(|p| self.dest_pool(p)).transpose()?,
            });
        }
        Ok((rule, warnings))
    }

    fn dest_tls(&self, tls: &ClientTls) -> Result<DestTls, LoadError> {
        if let Some(c) = &tls.credential_name {
            return Err(self.err(c, "credentialName (Kubernetes secrets) is not supported; use file paths"));
        }
        if let Some(skip) = tls.insecure_skip_verify.as_ref().filter(|s| s.value) {
            return Err(self.err(skip, "insecureSkipVerify: true is not supported"));
        }
        let sans = tls
            .subject_alt_names
            .iter()
            .map(|s| {
                crate::SpiffeId::parse(&s.value).map(|id| id.to_string()).or_else(|_| {
                    // Istio also accepts DNS names here; keycard's peers are named by SPIFFE ID.
                    if tls.mode == ClientTlsMode::IstioMutual {
                        Err(self.err(s, format!("{:?} is not a SPIFFE ID", s.value)))
                    } else {
                        Ok(s.value.clone())
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DestTls {
            mode: tls.mode,
            subject_alt_names: sans,
            client_certificate: tls.client_certificate.clone(),
            private_key: tls.private_key.clone(),
            ca_certificates: tls.ca_certificates.clone(),
            sni: tls.sni.clone(),
        })
    }

    fn dest_pool(&self, pool: &ConnectionPool) -> Result<DestPool, LoadError> {
        let http = pool.http.as_ref();
        let h2_upgrade = if http.and_then(|h| h.use_client_protocol) == Some(true) {
            // Istio: the client's protocol is kept and h2UpgradePolicy has no effect.
            Some(false)
        } else {
            match http.and_then(|h| h.h2_upgrade_policy) {
                Some(H2UpgradePolicy::Upgrade) => Some(true),
                Some(H2UpgradePolicy::DoNotUpgrade) => Some(false),
                Some(H2UpgradePolicy::Default) | None => None,
            }
        };
        let connect_timeout = pool
            .tcp
            .as_ref()
            .and_then(|t| t.connect_timeout.as_ref())
            .map(|t| self.timeout(t))
            .transpose()?;
        Ok(DestPool { h2_upgrade, connect_timeout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_exactly_then_by_the_longest_wildcard() {
        let host = "details.default.svc.cluster.local";
        let mut got: Vec<_> = ["*", "*.cluster.local", host, "*.default.svc.cluster.local", "*.other.local"]
            .into_iter()
            .filter_map(|p| specificity(p, host).map(|s| (s, p)))
            .collect();
        got.sort();
        let order: Vec<_> = got.into_iter().rev().map(|(_, p)| p).collect();
        assert_eq!(order, [host, "*.default.svc.cluster.local", "*.cluster.local", "*"]);
        assert_eq!(specificity("*.details.default.svc.cluster.local", host), None);
    }

    #[test]
    fn short_hosts_are_services_of_the_rules_namespace() {
        assert_eq!(resolve_host("reviews", "shop"), "reviews.shop.svc.cluster.local");
        for whole in ["reviews.shop", "*", "*.shop.svc.cluster.local", "10.0.0.1", "::1", "api.example.com"] {
            assert_eq!(resolve_host(whole, "default"), whole);
        }
        assert_eq!(service_namespace("reviews.shop.svc.cluster.local"), Some("shop"));
        assert_eq!(service_namespace("api.example.com"), None);
        assert_eq!(service_namespace("reviews"), None);
    }
}
