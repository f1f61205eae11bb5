//! `keycard status` and `keycard certs`: a live sidecar, read through its admin API.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Output, human_remaining, print_json};

#[derive(Debug, Args)]
pub struct AdminArg {
    /// The sidecar's admin address (`admin:` in its config).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    admin: AdminArg,
    /// Handshake failures to show (newest first).
    #[arg(long, default_value_t = 5)]
    failures: usize,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(flatten)]
    admin: AdminArg,
    #[arg(short, long, value_enum, default_value_t)]
    output: CertsOutput,
    /// With `-o pem`: print the trust bundle's roots instead of the chain.
    #[arg(long)]
    bundle: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum CertsOutput {
    #[default]
    Text,
    Json,
    Pem,
}

/// GETs the admin API paths, in order, each as JSON.
pub fn fetch(admin: &str, paths: &[&str]) -> anyhow::Result<Vec<Value>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = crate::bookinfo::client();
        let mut out = Vec::new();
        for path in paths {
            let url = format!("http://{admin}{path}");
            let (status, body) =
                tokio::time::timeout(Duration::from_secs(5), crate::bookinfo::get(&client, &url, &[]))
                    .await
                    .with_context(|| format!("{url}: no answer within 5 s"))?
                    .map_err(|e| anyhow::anyhow!("{url}: {e} (is a sidecar's admin API there?)"))?;
            if !status.is_success() {
                bail!("{url}: {status}: {}", String::from_utf8_lossy(&body).trim());
            }
            out.push(serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))?);
        }
        Ok(out)
    })
}

/// One inbound port's mode and the connections it saw in the window.
#[derive(Serialize)]
struct PortStatus {
    port: u16,
    mode: String,
    mode_source: String,
    mtls_connections: u64,
    plaintext_connections: u64,
}

#[derive(Serialize)]
struct Source {
    port: u16,
    mtls: bool,
    /// The principal, or the address of a plaintext peer.
    source: String,
    connections: u64,
    last_seen: i64,
}

#[derive(Serialize)]
struct StrictVerdict {
    /// `None` when nothing arrived in the window: no evidence either way.
    safe: Option<bool>,
    reason: String,
    plaintext_sources: Vec<String>,
}

pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let paths = ["/config_dump", "/certs", "/debug/traffic", "/debug/handshake_failures"];
    let [dump, certs, traffic, failures] = <[Value; 4]>::try_from(fetch(&args.admin.admin, &paths)?)
        .map_err(|_| anyhow::anyhow!("short answer"))?;
    let window = traffic["window_minutes"].as_u64().unwrap_or(15);
    let connections: Vec<&Value> = traffic["flows"]
        .as_array()
        .map(|f| {
            f.iter().filter(|f| f["kind"] == "connection" && f["recent"].as_u64().unwrap_or(0) > 0).collect()
        })
        .unwrap_or_default();
    let ports: Vec<PortStatus> = dump["inbound"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let port = p["port"].as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(0);
            let count = |mtls: bool| {
                connections
                    .iter()
                    .filter(|c| {
                        c["port"].as_u64() == Some(u64::from(port)) && c["principal"].is_string() == mtls
                    })
                    .map(|c| c["recent"].as_u64().unwrap_or(0))
                    .sum()
            };
            PortStatus {
                port,
                mode: p["mtls_mode"].as_str().unwrap_or("?").to_owned(),
                mode_source: p["mode_source"].as_str().unwrap_or("?").to_owned(),
                mtls_connections: count(true),
                plaintext_connections: count(false),
            }
        })
        .collect();
    let sources: Vec<Source> = connections
        .iter()
        .map(|c| Source {
            port: c["port"].as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
            mtls: c["principal"].is_string(),
            source: c["principal"].as_str().or(c["source_ip"].as_str()).unwrap_or("?").to_owned(),
            connections: c["recent"].as_u64().unwrap_or(0),
            last_seen: c["last_seen"].as_i64().unwrap_or(0),
        })
        .collect();
    let plaintext: Vec<String> = sources
        .iter()
        .filter(|s| !s.mtls)
        .map(|s| format!("{} -> port {} ({} connection(s))", s.source, s.port, s.connections))
        .collect();
    let refused = recent_plaintext_refusals(&failures);
    let all_strict = !ports.is_empty() && ports.iter().all(|p| p.mode == "STRICT");
    let verdict = if all_strict {
        StrictVerdict {
            safe: Some(true),
            reason: format!(
                "already STRICT on every port ({refused} plaintext connection(s) refused among the recent handshake failures)"
            ),
            plaintext_sources: Vec::new(),
        }
    } else if !plaintext.is_empty() {
        StrictVerdict {
            safe: Some(false),
            reason: format!("{} source(s) sent plaintext in the last {window} min", plaintext.len()),
            plaintext_sources: plaintext,
        }
    } else if sources.is_empty() {
        StrictVerdict {
            safe: None,
            reason: format!("no inbound connections in the last {window} min: no evidence either way"),
            plaintext_sources: Vec::new(),
        }
    } else {
        StrictVerdict {
            safe: Some(true),
            reason: format!("every inbound connection in the last {window} min used mutual TLS"),
            plaintext_sources: Vec::new(),
        }
    };
    let mut recent_failures: Vec<Value> = failures.as_array().cloned().unwrap_or_default();
    recent_failures.reverse();
    recent_failures.truncate(args.failures);
    let policy = &dump["policy"];
    if args.output == Output::Json {
        print_json(&json!({
            "spiffe_id": dump["workload"]["spiffe_id"],
            "policy": policy,
            "certificate": {
                "spiffe_id": certs["spiffe_id"],
                "loaded": certs["loaded"],
                "expires_in_seconds": certs["expires_in_seconds"],
                "renews_in_seconds": certs["renews_in_seconds"],
                "not_after": certs["chain"][0]["not_after"],
            },
            "window_minutes": window,
            "ports": ports,
            "sources": sources,
            "safe_to_go_strict": verdict,
            "upstreams": dump["routes"],
            "handshake_failures": recent_failures,
            "dropped_flows": traffic["dropped"],
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "sidecar   {}  (admin {})",
        dump["workload"]["spiffe_id"].as_str().unwrap_or("?"),
        args.admin.admin
    );
    println!(
        "policy    generation {}, loaded {} from {} file(s); last reload error: {}",
        policy["generation"],
        policy["loaded_at"].as_str().unwrap_or("?"),
        policy["files"].as_array().map_or(0, Vec::len),
        policy["last_error"].as_str().unwrap_or("none")
    );
    if certs["loaded"] == true {
        let secs = |v: &Value| v.as_i64().map_or_else(|| "-".to_owned(), human_remaining);
        println!(
            "cert      {}: expires {} ({}), renews {}",
            certs["spiffe_id"].as_str().unwrap_or("?"),
            secs(&certs["expires_in_seconds"]),
            certs["chain"][0]["not_after"].as_str().unwrap_or("?"),
            secs(&certs["renews_in_seconds"]),
        );
    } else {
        println!("cert      none loaded yet: inbound mutual TLS is refused until the CA answers");
    }
    println!("ports     (connections in the last {window} min)");
    println!("          {:<6} {:<11} {:<32} {:>5} {:>9}", "PORT", "MODE", "SET BY", "mTLS", "PLAINTEXT");
    for p in &ports {
        println!(
            "          {:<6} {:<11} {:<32} {:>5} {:>9}",
            p.port, p.mode, p.mode_source, p.mtls_connections, p.plaintext_connections
        );
    }
    println!("sources   (inbound connections in the last {window} min)");
    if sources.is_empty() {
        println!("          none");
    }
    for s in &sources {
        let how = if s.mtls { "mTLS     " } else { "PLAINTEXT" };
        println!("          {:<6} {how} {:<52} {:>6}", s.port, s.source, s.connections);
    }
    let answer = match verdict.safe {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    println!("STRICT?   {answer}: {}", verdict.reason);
    for p in &verdict.plaintext_sources {
        println!("          still plaintext: {p}");
    }
    print_upstreams(&dump["routes"]);
    println!("failures  (recent handshake failures, newest first)");
    if recent_failures.is_empty() {
        println!("          none");
    }
    for f in &recent_failures {
        println!(
            "          {} {} {} {}: {}",
            f["at"].as_str().unwrap_or("?"),
            f["direction"].as_str().unwrap_or("?"),
            f["peer"].as_str().unwrap_or("?"),
            f["reason"].as_str().unwrap_or("?"),
            f["detail"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Each upstream's route in force (`/config_dump`'s `routes`): the DestinationRule behind it and
/// what it decided.
fn print_upstreams(routes: &Value) {
    let routes = routes.as_array().map(Vec::as_slice).unwrap_or_default();
    if routes.is_empty() {
        return;
    }
    println!("upstreams (the route in force; `keycard policy route` explains the rule's choice)");
    for r in routes {
        let host = r["host"].as_str().map(|h| format!(" ({h})")).unwrap_or_default();
        let expects = match r["expected_identities"].as_array().map(Vec::as_slice) {
            Some([]) | None => "any mesh identity".to_owned(),
            Some(ids) => ids.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
        };
        println!(
            "          {}{host}: rule {}, {} to {expects}, h2 upgrade {}, connect within {} ms",
            r["remote"].as_str().unwrap_or("?"),
            r["destination_rule"].as_str().unwrap_or("none"),
            r["tls_mode"].as_str().unwrap_or("?"),
            if r["h2_upgrade"] == true { "yes" } else { "no" },
            r["connect_timeout_ms"],
        );
    }
}

fn recent_plaintext_refusals(failures: &Value) -> usize {
    failures.as_array().map_or(0, |f| f.iter().filter(|f| f["reason"] == "plaintext_in_strict").count())
}

pub fn certs(args: &CertsArgs) -> anyhow::Result<ExitCode> {
    let [certs] = <[Value; 1]>::try_from(fetch(&args.admin.admin, &["/certs"])?)
        .map_err(|_| anyhow::anyhow!("short answer"))?;
    if certs["loaded"] != true {
        bail!("the sidecar at {} has no certificate loaded yet", args.admin.admin);
    }
    match args.output {
        CertsOutput::Json => print_json(&certs)?,
        CertsOutput::Pem => {
            let key = if args.bundle { "trust_bundle_pem" } else { "chain_pem" };
            print!("{}", certs[key].as_str().context("the sidecar sent no PEM (an older keycard?)")?);
        }
        CertsOutput::Text => {
            let secs = |v: &Value| v.as_i64().map_or_else(|| "-".to_owned(), human_remaining);
            println!(
                "{}: expires {}, renews {}",
                certs["spiffe_id"].as_str().unwrap_or("?"),
                secs(&certs["expires_in_seconds"]),
                secs(&certs["renews_in_seconds"])
            );
            for (title, key) in [("chain", "chain"), ("trust bundle", "trust_bundle")] {
                println!("{title}:");
                println!(
                    "  {:<13} {:<28} {:<21} {:<21} SPIFFE ID / SUBJECT",
                    "TYPE", "SERIAL", "NOT BEFORE", "NOT AFTER"
                );
                for c in certs[key].as_array().map(Vec::as_slice).unwrap_or_default() {
                    let serial = c["serial"].as_str().unwrap_or("?");
                    let serial = if serial.chars().count() > 26 {
                        format!("{}…", serial.chars().take(25).collect::<String>())
                    } else {
                        serial.to_owned()
                    };
                    let name = c["spiffe_id"].as_str().or(c["subject"].as_str()).unwrap_or("?");
                    println!(
                        "  {:<13} {:<28} {:<21} {:<21} {name}",
                        c["kind"].as_str().unwrap_or("?"),
                        serial,
                        c["not_before"].as_str().unwrap_or("?"),
                        c["not_after"].as_str().unwrap_or("?"),
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
