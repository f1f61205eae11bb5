//! Live inbound connections, so a policy reload can re-evaluate each one and close those no
//! longer allowed, and a drain can wait for them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keycard_config::SpiffeId;
use tokio_util::sync::CancellationToken;

/// What authorization needs to decide again about a live connection.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    pub source_ip: IpAddr,
    pub principal: Option<SpiffeId>,
    pub destination_ip: IpAddr,
    pub port: u16,
    pub sni: Option<String>,
    /// Served as HTTP: authorized per request, so a reload re-checks only the mTLS mode.
    pub http: bool,
}

#[derive(Debug, Default)]
pub struct LiveConns {
    next: AtomicU64,
    map: Mutex<HashMap<u64, (Arc<ConnFacts>, CancellationToken)>>,
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    live: Arc<LiveConns>,
    id: u64,
}

impl LiveConns {
    /// Registers a live connection; the connection may keep `facts` too (one copy, shared).
    pub fn register(self: &Arc<Self>, facts: Arc<ConnFacts>, cancel: CancellationToken) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, (facts, cancel));
        }
        Registration { live: self.clone(), id }
    }

    /// Cancels every connection for which `denied` returns the deciding policy; returns those.
    pub fn close_denied(&self, denied: impl Fn(&ConnFacts) -> Option<String>) -> Vec<String> {
        let Ok(m) = self.map.lock() else { return Vec::new() };
        m.values()
            .filter_map(|(facts, cancel)| {
                let policy = denied(facts)?;
                cancel.cancel();
                Some(policy)
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.map.lock() {
            m.remove(&self.id);
        }
    }
}
