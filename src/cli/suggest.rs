//! `keycard policy suggest`: least-privilege policy from what sidecars saw. Run the workloads in
//! PERMISSIVE (or with AUDIT / dry-run policies), then turn every allowed flow into an ALLOW rule
//! by principal, port, and for HTTP method and path (one-segment paths exactly, deeper ones by
//! their first segment: `/details/*`), plus a STRICT PeerAuthentication for the same workload.
//! Plaintext sources cannot be allowed by identity; they are listed, since STRICT refuses them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use keycard_config::sidecar::SidecarConfig;
use keycard_proxy::observe::path_pattern;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// A live sidecar's admin address; repeatable (one suggestion per workload).
    #[arg(long, required_unless_present = "access_logs")]
    admin: Vec<String>,
    /// A sidecar's JSON log (`--log-format json`): its inbound access lines; repeatable.
    #[arg(long = "access-log")]
    access_logs: Vec<PathBuf>,
    /// The sidecar configuration of a workload in the access logs (its namespace and labels make
    /// the policy's selector); repeatable.
    #[arg(long = "sidecar")]
    sidecars: Vec<PathBuf>,
    /// Write the YAML here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The workload a suggestion is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    spiffe_id: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

/// What was allowed on one port for one principal.
#[derive(Debug, Default)]
struct PortUse {
    tcp: bool,
    /// Method → path patterns.
    http: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Principal → port → use.
    allowed: BTreeMap<String, BTreeMap<u16, PortUse>>,
    /// `address -> port` of plaintext peers, with counts.
    plaintext: BTreeMap<String, u64>,
    /// Denied while observing: `principal port method path`, with counts.
    denied: BTreeMap<String, u64>,
}

impl Seen {
    fn add(&mut self, o: &Observation) {
        let Some(principal) = &o.principal else {
            *self.plaintext.entry(format!("{} -> port {}", o.source_ip, o.port)).or_default() += o.count;
            return;
        };
        if !o.allowed {
            let what = o.request.as_ref().map_or_else(|| "tcp".to_owned(), |(m, p)| format!("{m} {p}"));
            *self.denied.entry(format!("{principal} -> port {} {what}", o.port)).or_default() += o.count;
            return;
        }
        let port = self.allowed.entry(principal.clone()).or_default().entry(o.port).or_default();
        match &o.request {
            Some((method, path)) => {
                port.http.entry(method.clone()).or_default().insert(path.clone());
            }
            None => port.tcp = true,
        }
    }
}

/// One allowed or denied flow, from either source.
struct Observation {
    port: u16,
    principal: Option<String>,
    source_ip: String,
    request: Option<(String, String)>,
    allowed: bool,
    count: u64,
}

pub fn run(args: &SuggestArgs) -> anyhow::Result<ExitCode> {
    let mut seen: BTreeMap<Target, Seen> = BTreeMap::new();
    let mut sources = Vec::new();
    for admin in &args.admin {
        let [dump, traffic] =
            <[Value; 2]>::try_from(super::status::fetch(admin, &["/config_dump", "/debug/traffic"])?)
                .map_err(|_| anyhow::anyhow!("short answer"))?;
        let target = Target {
            spiffe_id: dump["workload"]["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            namespace: dump["workload"]["namespace"].as_str().unwrap_or("default").to_owned(),
            labels: serde_json::from_value(dump["workload"]["labels"].clone()).unwrap_or_default(),
        };
        let entry = seen.entry(target).or_default();
        for f in traffic["flows"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if let Some(o) = from_flow(f) {
                entry.add(&o);
            }
        }
        if traffic["dropped"].as_u64().unwrap_or(0) > 0 {
            eprintln!("keycard: {admin}: the sidecar's flow table was full; some flows were not recorded");
        }
        sources.push(format!("admin {admin}"));
    }
    let configs = args
        .sidecars
        .iter()
        .map(|p| SidecarConfig::load(p).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for log in &args.access_logs {
        let file = std::fs::File::open(log).with_context(|| format!("cannot read {}", log.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}: cannot read", log.display(), n + 1))?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if v["message"] != "access" || v["direction"] != "inbound" {
                continue;
            }
            let dst = v["dst.identity"].as_str().unwrap_or_default();
            let cfg = configs.iter().find(|c| c.spiffe_id().is_ok_and(|id| id.as_str() == dst)).with_context(|| {
                format!("{}:{}: no --sidecar config for {dst}: its namespace and labels make the policy's selector", log.display(), n + 1)
            })?;
            let o = from_access_line(&v).with_context(|| {
                format!(
                    "{}:{}: an access line without `port` (written by an older keycard?)",
                    log.display(),
                    n + 1
                )
            })?;
            let target = Target {
                spiffe_id: dst.to_owned(),
                namespace: cfg.workload.namespace.clone(),
                labels: cfg.workload.labels.clone(),
            };
            seen.entry(target).or_default().add(&o);
        }
        sources.push(format!("access log {}", log.display()));
    }
    let mut yaml = format!(
        "# Suggested by `keycard policy suggest` from {} at {}.\n# It allows exactly the flows observed; review it, then apply it.\n",
        sources.join(", "),
        time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default()
    );
    for (target, seen) in &seen {
        render(&mut yaml, target, seen)?;
    }
    match &args.out {
        Some(path) => {
            std::fs::write(path, yaml).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => print!("{yaml}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn from_flow(f: &Value) -> Option<Observation> {
    if !(f["kind"] == "tcp" || f["kind"] == "request") {
        return None;
    }
    Some(Observation {
        port: u16::try_from(f["port"].as_u64()?).ok()?,
        principal: f["principal"].as_str().map(str::to_owned),
        source_ip: f["source_ip"].as_str().unwrap_or("?").to_owned(),
        request: match (f["method"].as_str(), f["path"].as_str()) {
            (Some(m), Some(p)) => Some((m.to_owned(), p.to_owned())),
            _ => None,
        },
        allowed: f["allowed"] == true,
        count: f["total"].as_u64().unwrap_or(1),
    })
}

fn from_access_line(v: &Value) -> Option<Observation> {
    let principal = v["src.identity"]
        .as_str()
        .filter(|s| *s != "-")
        .map(|s| s.trim_start_matches("spiffe://").to_owned());
    let source_ip = v["src.addr"]
        .as_str()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip().to_string());
    Some(Observation {
        port: u16::try_from(v["port"].as_u64()?).ok()?,
        principal,
        source_ip: source_ip.unwrap_or_else(|| "?".into()),
        request: match (v["method"].as_str(), v["path"].as_str()) {
            (Some(m), Some(p)) => Some((m.to_owned(), path_pattern(p))),
            _ => None,
        },
        allowed: v["decision"] == "allow",
        count: 1,
    })
}

/// A YAML scalar: plain when it cannot be read as anything but this string, else double-quoted.
fn scalar(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain { s.to_owned() } else { serde_json::to_string(s).unwrap_or_default() }
}

fn render(out: &mut String, target: &Target, seen: &Seen) -> anyhow::Result<()> {
    if target.labels.is_empty() {
        bail!(
            "{} has no labels: a least-privilege policy needs a selector (set `workload.labels` in its sidecar config)",
            target.spiffe_id
        );
    }
    let base = target
        .labels
        .get("app")
        .cloned()
        .or_else(|| target.spiffe_id.rsplit('/').next().map(str::to_owned))
        .unwrap_or_else(|| "workload".into());
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let selector: String =
        target.labels.iter().map(|(k, v)| format!("      {}: {}\n", scalar(k), scalar(v))).collect();
    let _ = writeln!(out, "#\n# {}", target.spiffe_id);
    if !seen.plaintext.is_empty() {
        let _ = writeln!(out, "# Plaintext sources seen (no identity to allow; STRICT below refuses them):");
        for (what, n) in &seen.plaintext {
            let _ = writeln!(out, "#   {what} ({n})");
        }
    }
    if !seen.denied.is_empty() {
        let _ = writeln!(out, "# Denied while observing (not allowed below):");
        for (what, n) in &seen.denied {
            let _ = writeln!(out, "#   {what} ({n})");
        }
    }
    let _ = write!(
        out,
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  selector:\n    matchLabels:\n{selector}  mtls:\n    mode: STRICT\n",
        scalar(&format!("{base}-strict")),
        scalar(&target.namespace),
    );
    let _ = write!(
        out,
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  selector:\n    matchLabels:\n{selector}  action: ALLOW\n",
        scalar(&format!("{base}-observed")),
        scalar(&target.namespace),
    );
    if seen.allowed.is_empty() {
        // An ALLOW policy without rules allows nothing: what was observed.
        let _ = writeln!(out, "  # no mutual-TLS flow was observed: this policy allows nothing\n  rules: []");
        return Ok(());
    }
    let _ = writeln!(out, "  rules:");
    for (principal, ports) in &seen.allowed {
        let _ = writeln!(out, "  - from:\n    - source:\n        principals: [{}]\n    to:", q(principal));
        for (port, used) in ports {
            if used.tcp {
                // Any connection on the port was seen: that covers HTTP on it too.
                let _ = writeln!(out, "    - operation:\n        ports: [{}]", q(&port.to_string()));
                continue;
            }
            // Methods with the same paths share one operation.
            let mut by_paths: BTreeMap<&BTreeSet<String>, Vec<&str>> = BTreeMap::new();
            for (method, paths) in &used.http {
                by_paths.entry(paths).or_default().push(method);
            }
            for (paths, methods) in by_paths {
                let list =
                    |items: &mut dyn Iterator<Item = &str>| items.map(q).collect::<Vec<_>>().join(", ");
                let _ = writeln!(
                    out,
                    "    - operation:\n        ports: [{}]\n        methods: [{}]\n        paths: [{}]",
                    q(&port.to_string()),
                    list(&mut methods.iter().copied()),
                    list(&mut paths.iter().map(String::as_str)),
                );
            }
        }
    }
    Ok(())
}
