//! What the sidecar has seen arrive, kept for the operator tools: who connects to which port with
//! or without mutual TLS (`keycard status`: is it safe to go STRICT?), and which principal was
//! allowed which port, method and path (`keycard policy suggest`). Served as `/debug/traffic`.
//!
//! A bounded table (at most [`MAX_FLOWS`] keys; further new keys are counted as dropped), each key
//! with a total and per-minute counts over the last [`WINDOW_MINUTES`] minutes. One short lock per
//! connection and per request, never per byte.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
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
    /// By the hash of each key's borrowed form ([`KeyRef`]), so a request of a flow already here
    /// allocates nothing (it built three strings before); keys whose hashes collide share a
    /// bucket. foldhash, seeded per process: SipHash cost about 10,000 instructions a request
    /// (callgrind); the table is capped at `MAX_FLOWS` keys, so colliding keys cannot grow it.
    flows: HashMap<u64, Vec<(Key, Stats)>, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
    keys: usize,
    dropped: u64,
}

/// A [`Key`] as the caller has it, borrowed.
#[derive(Hash)]
struct KeyRef<'a> {
    kind: Kind,
    port: u16,
    principal: Option<&'a str>,
    source_ip: Option<IpAddr>,
    method: Option<&'a str>,
    path: Option<PathPattern<'a>>,
    allowed: Option<bool>,
}

impl KeyRef<'_> {
    fn matches(&self, k: &Key) -> bool {
        self.kind == k.kind
            && self.port == k.port
            && self.principal == k.principal.as_deref()
            && self.source_ip == k.source_ip
            && self.method == k.method.as_deref()
            && self.allowed == k.allowed
            && match (&self.path, &k.path) {
                (Some(p), Some(owned)) => p.is(owned),
                (None, None) => true,
                _ => false,
            }
    }

    fn to_key(&self) -> Key {
        Key {
            kind: self.kind,
            port: self.port,
            principal: self.principal.map(str::to_owned),
            source_ip: self.source_ip,
            method: self.method.map(str::to_owned),
            path: self.path.map(|p| p.to_string()),
            allowed: self.allowed,
        }
    }
}

/// [`path_pattern`] of a path, without building the string.
#[derive(Debug, Clone, Copy, Hash)]
enum PathPattern<'a> {
    /// The path as it is.
    Whole(&'a str),
    /// `/<first segment>/*`.
    Below(&'a str),
}

impl<'a> PathPattern<'a> {
    fn of(path: &'a str) -> Self {
        let rest = path.strip_prefix('/').unwrap_or(path);
        match rest.split_once('/') {
            Some((first, _)) if !first.is_empty() => Self::Below(first),
            _ => Self::Whole(path),
        }
    }

    fn is(&self, pattern: &str) -> bool {
        match self {
            Self::Whole(p) => pattern == *p,
            Self::Below(first) => {
                pattern.strip_prefix('/').and_then(|r| r.strip_suffix("/*")) == Some(*first)
            }
        }
    }
}

impl std::fmt::Display for PathPattern<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole(p) => f.write_str(p),
            Self::Below(first) => write!(f, "/{first}/*"),
        }
    }
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
        self.add(&KeyRef {
            kind: Kind::Connection,
            port,
            principal: principal.map(SpiffeId::principal),
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
        self.add(&KeyRef {
            kind: if request.is_some() { Kind::Request } else { Kind::Tcp },
            port,
            principal: principal.map(SpiffeId::principal),
            source_ip: principal.is_none().then_some(ip),
            method: request.map(|(m, _)| m),
            path: request.map(|(_, p)| PathPattern::of(p)),
            allowed: Some(allowed),
        });
    }

    fn add(&self, key: &KeyRef<'_>) {
        let now = now();
        let Ok(mut inner) = self.inner.lock() else { return };
        let hash = inner.hasher.hash_one(key);
        let seen = inner.flows.get_mut(&hash).and_then(|b| b.iter_mut().find(|(k, _)| key.matches(k)));
        if let Some((_, stats)) = seen {
            stats.bump(now);
        } else if inner.keys >= MAX_FLOWS {
            inner.dropped += 1;
        } else {
            let mut stats =
                Stats { total: 0, first_seen: now, last_seen: now, minutes: [(0, 0); WINDOW_MINUTES] };
            stats.bump(now);
            inner.flows.entry(hash).or_default().push((key.to_key(), stats));
            inner.keys += 1;
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
            .values()
            .flatten()
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

/// Unix seconds. Not `time::OffsetDateTime::now_utc`, which also works out the calendar date
/// (about 200 instructions a request).
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The path as a suggested rule would name it: a one-segment path exactly (`/productpage`),
/// anything deeper by its first segment (`/details/0` → `/details/*`), so the ids in paths do not
/// each become a rule.
pub fn path_pattern(path: &str) -> String {
    PathPattern::of(path).to_string()
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
    fn a_flow_is_one_key_however_often_it_is_seen() {
        let o = Observed::default();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap();
        let ip = IpAddr::from([10, 0, 0, 1]);
        for path in ["/details/0", "/details/1", "/details/2"] {
            o.decision(9080, Some(&id), ip, Some(("GET", path)), true);
        }
        o.decision(9080, Some(&id), ip, Some(("GET", "/details")), true);
        o.decision(9080, Some(&id), ip, Some(("GET", "/details/0")), false);
        o.decision(9080, Some(&id), ip, Some(("POST", "/details/0")), true);
        o.decision(9080, None, ip, Some(("GET", "/details/0")), true);
        o.decision(9080, Some(&id), ip, None, true);
        o.connection(9080, Some(&id), ip);
        o.connection(9080, Some(&id), IpAddr::from([10, 0, 0, 2]));
        let s = o.snapshot();
        let count = |f: &dyn Fn(&Key) -> bool| {
            s.flows.iter().filter(|x| f(&x.key)).map(|x| x.total).collect::<Vec<_>>()
        };
        let principal = Some("cluster.local/ns/default/sa/productpage".to_owned());
        let request = |method: &str, path: &str, allowed: bool, principal: &Option<String>| {
            let (method, path, principal) = (method.to_owned(), path.to_owned(), principal.clone());
            move |k: &Key| {
                k.kind == Kind::Request
                    && k.method.as_deref() == Some(method.as_str())
                    && k.path.as_deref() == Some(path.as_str())
                    && k.allowed == Some(allowed)
                    && k.principal == principal
            }
        };
        assert_eq!(count(&request("GET", "/details/*", true, &principal)), [3]);
        assert_eq!(count(&request("GET", "/details", true, &principal)), [1]);
        assert_eq!(count(&request("GET", "/details/*", false, &principal)), [1]);
        assert_eq!(count(&request("POST", "/details/*", true, &principal)), [1]);
        assert_eq!(count(&request("GET", "/details/*", true, &None)), [1]);
        assert_eq!(count(&|k| k.kind == Kind::Tcp), [1]);
        // A mutual-TLS peer is one flow from any address.
        assert_eq!(count(&|k| k.kind == Kind::Connection && k.source_ip.is_none()), [2]);
        assert_eq!(s.flows.len(), 7);
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
