//! What the sidecar has seen arrive, kept for the operator tools: who connects to which port with
//! or without mutual TLS (`keycard status`: is it safe to go STRICT?), and which principal was
//! allowed which port, method and path (`keycard policy suggest`). Served as `/debug/traffic`.
//!
//! A bounded table (at most [`MAX_FLOWS`] keys; further new keys are counted as dropped), each key
//! with a total and per-minute counts over the last [`WINDOW_MINUTES`] minutes. One short lock per
//! connection and per request, never per byte.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use keycard_config::SpiffeId;
use serde::Serialize;

pub const WINDOW_MINUTES: usize = 15;
pub const MAX_FLOWS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A connection accepted on an inbound port (before authorization).
    Connection,
    /// An authorization decision for a TCP connection.
    Tcp,
    /// An authorization decision for an HTTP request.
    Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Key {
    pub kind: Kind,
    /// The workload port (what `ports` and `portLevelMtls` name).
    pub port: u16,
    /// The verified peer's principal (`cluster.local/ns/x/sa/y`); `None` for plaintext.
    pub principal: Option<String>,
    /// Plaintext peers are told apart by address; mutual-TLS peers by principal only.
    pub source_ip: Option<IpAddr>,
    pub method: Option<String>,
    /// [`path_pattern`] of the normalised path.
    pub path: Option<String>,
    /// `None` for [`Kind::Connection`].
    pub allowed: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    #[serde(flatten)]
    pub key: Key,
    pub total: u64,
    /// Over the last [`WINDOW_MINUTES`] minutes.
    pub recent: u64,
    pub first_seen: i64,
    pub last_seen: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub now: i64,
    pub window_minutes: usize,
    pub flows: Vec<Flow>,
    /// New keys refused because the table was full.
    pub dropped: u64,
}

#[derive(Debug, Default)]
pub struct Observed {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// foldhash, seeded per process: recording an HTTP request here cost about 10,000 instructions
    /// with SipHash, 1,800 with it (callgrind, of ~120,000 per request); the table is capped at
    /// `MAX_FLOWS`, so colliding keys cannot grow it.
    flows: HashMap<Key, Stats, foldhash::fast::RandomState>,
    dropped: u64,
}

#[derive(Debug)]
struct Stats {
    total: u64,
    first_seen: i64,
    last_seen: i64,
    /// Per-minute counts, indexed by minute modulo the window, with the minute each belongs to.
    minutes: [(i64, u32); WINDOW_MINUTES],
}

impl Observed {
    pub fn connection(&self, port: u16, principal: Option<&SpiffeId>, ip: IpAddr) {
        self.add(Key {
            kind: Kind::Connection,
            port,
            principal: principal.map(|p| p.principal().to_owned()),
            source_ip: principal.is_none().then_some(ip),
            method: None,
            path: None,
            allowed: None,
        });
    }

    /// A decision; `request` is the method and normalised path of an HTTP request.
    pub fn decision(
        &self,
        port: u16,
        principal: Option<&SpiffeId>,
        ip: IpAddr,
        request: Option<(&str, &str)>,
        allowed: bool,
    ) {
        self.add(Key {
            kind: if request.is_some() { Kind::Request } else { Kind::Tcp },
            port,
            principal: principal.map(|p| p.principal().to_owned()),
            source_ip: principal.is_none().then_some(ip),
            method: request.map(|(m, _)| m.to_owned()),
            path: request.map(|(_, p)| path_pattern(p)),
            allowed: Some(allowed),
        });
    }

    fn add(&self, key: Key) {
        let now = now();
        let Ok(mut inner) = self.inner.lock() else { return };
        let full = inner.flows.len() >= MAX_FLOWS;
        match inner.flows.get_mut(&key) {
            Some(stats) => stats.bump(now),
            None if full => inner.dropped += 1,
            None => {
                let mut stats =
                    Stats { total: 0, first_seen: now, last_seen: now, minutes: [(0, 0); WINDOW_MINUTES] };
                stats.bump(now);
                inner.flows.insert(key, stats);
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = now();
        let Ok(inner) = self.inner.lock() else {
            return Snapshot { now, window_minutes: WINDOW_MINUTES, flows: Vec::new(), dropped: 0 };
        };
        let current = now / 60;
        let mut flows: Vec<Flow> = inner
            .flows
            .iter()
            .map(|(key, s)| Flow {
                key: key.clone(),
                total: s.total,
                recent: s
                    .minutes
                    .iter()
                    .filter(|(minute, _)| current - minute < WINDOW_MINUTES as i64)
                    .map(|(_, n)| u64::from(*n))
                    .sum(),
                first_seen: s.first_seen,
                last_seen: s.last_seen,
            })
            .collect();
        flows.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(b.total.cmp(&a.total)));
        Snapshot { now, window_minutes: WINDOW_MINUTES, flows, dropped: inner.dropped }
    }
}

impl Stats {
    fn bump(&mut self, now: i64) {
        self.total += 1;
        self.last_seen = now;
        let minute = now / 60;
        let slot = &mut self.minutes[minute.rem_euclid(WINDOW_MINUTES as i64) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 = slot.1.saturating_add(1);
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The path as a suggested rule would name it: a one-segment path exactly (`/productpage`),
/// anything deeper by its first segment (`/details/0` → `/details/*`), so the ids in paths do not
/// each become a rule.
pub fn path_pattern(path: &str) -> String {
    let rest = path.strip_prefix('/').unwrap_or(path);
    match rest.split_once('/') {
        Some((first, _)) if !first.is_empty() => format!("/{first}/*"),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_generalise_below_their_first_segment() {
        assert_eq!(path_pattern("/productpage"), "/productpage");
        assert_eq!(path_pattern("/"), "/");
        assert_eq!(path_pattern("/details/0"), "/details/*");
        assert_eq!(path_pattern("/api/v1/x"), "/api/*");
        assert_eq!(path_pattern("/details/"), "/details/*");
    }

    #[test]
    fn the_table_is_bounded_and_counts_what_it_drops() {
        let o = Observed::default();
        for i in 0..(MAX_FLOWS + 10) {
            o.decision(80, None, IpAddr::from([10, 0, 0, 1]), Some(("GET", &format!("/p{i}"))), true);
        }
        o.decision(80, None, IpAddr::from([10, 0, 0, 1]), Some(("GET", "/p0")), true);
        let s = o.snapshot();
        assert_eq!((s.flows.len(), s.dropped), (MAX_FLOWS, 10));
        let p0 = s.flows.iter().find(|f| f.key.path.as_deref() == Some("/p0")).unwrap();
        assert_eq!((p0.total, p0.recent), (2, 2));
    }
}
