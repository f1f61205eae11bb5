//! PeerAuthentication resolved as Istio does: mesh (root namespace, no selector) → namespace (no
//! selector) → workload (selector matching its labels) → `portLevelMtls`. `UNSET` inherits; with
//! several policies at one level the oldest wins; with none at all the mode is PERMISSIVE. A
//! root-namespace policy with a selector is ignored, as in Istio.

use std::collections::BTreeMap;

use serde::Serialize;

use super::model::MtlsMode;

/// One compiled PeerAuthentication.
#[derive(Debug, Clone, Serialize)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub origin: super::Origin,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// Unix seconds of `creationTimestamp`, if given.
    pub created: Option<i64>,
    /// Position among everything loaded: breaks ties, earlier counts as older.
    pub order: usize,
}

/// The mode in force for one port, and which policy set it (for `config_dump` and `explain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveMode {
    pub mode: MtlsMode,
    /// `default` when no policy set it, else `namespace/name` (with `:port` for a port-level one).
    pub source: String,
}

/// The three levels that apply to one workload, chosen once per policy load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResolvedPeerAuth {
    pub mesh: Option<PeerAuth>,
    pub namespace: Option<PeerAuth>,
    pub workload: Option<PeerAuth>,
}

impl ResolvedPeerAuth {
    pub fn resolve(all: &[PeerAuth], root_ns: &str, ns: &str, labels: &BTreeMap<String, String>) -> Self {
        let oldest = |it: Vec<&PeerAuth>| -> Option<PeerAuth> {
            it.into_iter().min_by_key(|p| (p.created.unwrap_or(i64::MAX), p.order)).cloned()
        };
        let mesh = oldest(all.iter().filter(|p| p.namespace == root_ns && p.selector.is_none()).collect());
        let namespace = oldest(all.iter().filter(|p| p.namespace == ns && p.selector.is_none()).collect());
        let workload = oldest(
            // A root-namespace policy with a selector reaches no other namespace's workloads.
            all.iter()
                .filter(|p| p.namespace == ns && p.selector.as_ref().is_some_and(|sel| selects(sel, labels)))
                .collect(),
        );
        Self { mesh, namespace, workload }
    }

    /// The mode for `port`.
    pub fn mode_for(&self, port: u16) -> EffectiveMode {
        let mut out = EffectiveMode { mode: MtlsMode::Permissive, source: "default".into() };
        for p in [&self.mesh, &self.namespace, &self.workload].into_iter().flatten() {
            if p.mode != MtlsMode::Unset {
                out = EffectiveMode { mode: p.mode, source: format!("{}/{}", p.namespace, p.name) };
            }
        }
        if let Some(w) = &self.workload
            && let Some(mode) = w.port_modes.get(&port).filter(|m| **m != MtlsMode::Unset)
        {
            out = EffectiveMode { mode: *mode, source: format!("{}/{}:{port}", w.namespace, w.name) };
        }
        out
    }
}

/// `matchLabels` semantics: every selector label present with the same value.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
