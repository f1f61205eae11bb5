//! `keycard policy route`: which DestinationRule a workload's sidecar applies to one of its
//! upstreams (the rule `/config_dump` shows a running sidecar using), why that one, and what it
//! sets, read offline from the user's YAML.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use keycard_config::policy::{DestPool, DestTls, Destination, Tier};
use serde::Serialize;

use super::policy::{Sources, WorkloadArgs, read_inputs, workload};
use super::{Output, print_json};

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    sources: Sources,
    /// The calling workload.
    #[command(flatten)]
    target: WorkloadArgs,
    /// The destination's whole host name, as the sidecar's upstream names it
    /// (`details.default.svc.cluster.local`).
    #[arg(long)]
    host: String,
    /// The destination's service port.
    #[arg(long)]
    port: u16,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Serialize)]
struct RouteReport<'a> {
    workload: &'a str,
    labels: &'a BTreeMap<String, String>,
    host: &'a str,
    port: u16,
    /// `None`: no rule applies (mutual TLS to any mesh identity, the sidecar's own settings).
    rule: Option<RuleReport<'a>>,
}

#[derive(Serialize)]
struct RuleReport<'a> {
    namespace: &'a str,
    name: &'a str,
    origin: String,
    host: &'a str,
    tier: Tier,
    port_level: bool,
    tls: Option<&'a DestTls>,
    pool: Option<&'a DestPool>,
}

pub fn run(args: &RouteArgs) -> anyhow::Result<ExitCode> {
    let inputs = read_inputs(&args.sources);
    if let Some(e) = inputs.errors.first() {
        bail!("{e} (fix the policy files first: `keycard policy check`)");
    }
    let (ns, _, labels) = workload(&inputs, &args.target)?;
    let policy = inputs.set.for_workload(&args.sources.root_namespace, ns, &labels);
    let dest = policy.destinations.lookup(&args.host, args.port);
    match args.output {
        Output::Json => print_json(&RouteReport {
            workload: &args.target.workload,
            labels: &labels,
            host: &args.host,
            port: args.port,
            rule: dest.map(|d| RuleReport {
                namespace: &d.rule.namespace,
                name: &d.rule.name,
                origin: d.rule.origin.to_string(),
                host: &d.rule.host,
                tier: d.tier,
                port_level: d.port_level,
                tls: d.tls,
                pool: d.pool,
            }),
        })?,
        Output::Text => print_route(args, &labels, dest.as_ref()),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_route(args: &RouteArgs, labels: &BTreeMap<String, String>, dest: Option<&Destination<'_>>) {
    let labels_text = if labels.is_empty() {
        "no labels".to_owned()
    } else {
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    };
    println!("workload   {}  labels: {labels_text}", args.target.workload);
    println!("upstream   {}:{}", args.host, args.port);
    let Some(d) = dest else {
        println!("rule       none applies: ISTIO_MUTUAL to any mesh identity, the sidecar's own settings");
        return;
    };
    let r = d.rule;
    let level =
        if d.port_level { format!("port {}'s own settings", args.port) } else { "host-wide settings".into() };
    println!(
        "rule       {}/{} ({}), host {}, from {}; {level}",
        r.namespace,
        r.name,
        r.origin,
        r.host,
        d.tier.describe()
    );
    match d.tls {
        Some(t) => {
            let sans = if t.subject_alt_names.is_empty() {
                "any mesh identity".to_owned()
            } else {
                t.subject_alt_names.join(", ")
            };
            let sni = t.sni.as_deref().map(|s| format!(", SNI {s}")).unwrap_or_default();
            println!("tls        {}: {sans}{sni}", t.mode.as_str());
        }
        None if d.port_level => println!(
            "tls        not set for the port, whose settings replace the host's whole: ISTIO_MUTUAL to any mesh identity"
        ),
        None => println!("tls        not set: ISTIO_MUTUAL to any mesh identity"),
    }
    let pool = d.pool.cloned().unwrap_or_default();
    let h2 = match pool.h2_upgrade {
        Some(true) => "UPGRADE: HTTP/1.1 requests travel as HTTP/2",
        Some(false) => "DO_NOT_UPGRADE: HTTP/1.1 requests travel as HTTP/1.1",
        None => "not set here: the sidecar's http.h2_upgrade",
    };
    println!("h2 upgrade {h2}");
    match pool.connect_timeout {
        Some(t) => println!("connect    within {}", humantime::format_duration(t)),
        None => println!("connect    not set here: the sidecar's limits.connect_timeout"),
    }
}
