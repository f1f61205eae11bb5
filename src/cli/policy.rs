//! `keycard policy check | explain | route | suggest`: the policy engine offline, on the user's YAML.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use keycard_config::SpiffeId;
use keycard_config::http::{PathNormalization, normalize_path, split_target};
use keycard_config::kube;
use keycard_config::policy::authz::{Attributes, HttpAttributes};
use keycard_config::policy::explain::{Explanation, explain};
use keycard_config::policy::lint::{Finding, KnownWorkload, Severity, lint};
use keycard_config::policy::load::Skipped;
use keycard_config::policy::{DEFAULT_ROOT_NAMESPACE, LoadError, PolicySet};
use keycard_config::sidecar::SidecarConfig;
use serde::Serialize;

use super::{Output, print_json};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load every resource, report errors with file:line and field, and lint the foot-guns.
    ///
    /// Exit status: 0 clean (notes allowed), 1 errors, 3 warnings only (2 is a usage error).
    Check(CheckArgs),
    /// What would a sidecar decide for this connection or request, and which policy decided?
    Explain(Box<ExplainArgs>),
    /// Which DestinationRule a workload's sidecar applies to one of its upstreams, and what it sets.
    Route(super::route::RouteArgs),
    /// Least-privilege AuthorizationPolicy + STRICT PeerAuthentication from observed traffic.
    Suggest(super::suggest::SuggestArgs),
}

#[derive(Debug, Args)]
pub struct Sources {
    /// Policy files or directories (`*.yaml`, `*.yml`, not recursive); `-` reads stdin. Kubernetes
    /// manifests in them (Deployments, Pods, Services, ...) say which workloads exist.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// A sidecar configuration: one more known workload (namespace, labels, ports and protocols).
    #[arg(long = "sidecar")]
    sidecars: Vec<PathBuf>,
    /// The mesh's root namespace (Istio's `istio-system`).
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    sources: Sources,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// The workload whose sidecar decides.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// The workload, `NAMESPACE/NAME` (NAME as in its manifest, or its service account).
    #[arg(long)]
    pub workload: String,
    /// The workload's pod labels (`k=v,k=v`); default: from its manifest or sidecar config.
    #[arg(long, value_parser = parse_labels)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    sources: Sources,
    /// The destination workload.
    #[command(flatten)]
    target: WorkloadArgs,
    /// The caller's verified identity (a mutual-TLS peer).
    #[arg(long, conflicts_with = "plaintext", required_unless_present = "plaintext")]
    from: Option<SpiffeId>,
    /// The caller sends plaintext (no identity).
    #[arg(long)]
    plaintext: bool,
    #[arg(long, default_value = "10.0.0.1")]
    source_ip: IpAddr,
    #[arg(long, default_value = "10.0.0.2")]
    destination_ip: IpAddr,
    /// The workload port the connection reaches (what `ports` and `portLevelMtls` name).
    #[arg(long)]
    port: u16,
    /// Default: `http` when a request field is given or the port is known to be HTTP, else `tcp`.
    #[arg(long, value_enum)]
    protocol: Option<ExplainProtocol>,
    #[arg(long)]
    method: Option<String>,
    /// Request path; normalised as the sidecar does (Istio's `base`), query dropped.
    #[arg(long)]
    path: Option<String>,
    #[arg(long)]
    host: Option<String>,
    /// A request header, `name=value`; repeatable.
    #[arg(long = "header", value_parser = parse_pair)]
    headers: Vec<(String, String)>,
    /// JSON object: the verified JWT's claims (`iss` and `sub` make the request principal).
    #[arg(long)]
    jwt_claims: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExplainProtocol {
    Tcp,
    Http,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check(a) => check(&a),
        PolicyCommand::Explain(a) => explain_cmd(&a),
        PolicyCommand::Route(a) => super::route::run(&a),
        PolicyCommand::Suggest(a) => super::suggest::run(&a),
    }
}

/// Everything read from `-f` and `--sidecar`.
pub struct Inputs {
    pub set: PolicySet,
    pub workloads: Vec<KnownWorkload>,
    pub errors: Vec<LoadError>,
    pub skipped: Vec<(PathBuf, Skipped)>,
    pub files: usize,
}

/// `--workload NAMESPACE/NAME`: its namespace, the known workload of that name (if any) and its
/// labels (`--labels`, else the known workload's).
pub fn workload<'a>(
    inputs: &'a Inputs,
    target: &'a WorkloadArgs,
) -> anyhow::Result<(&'a str, Option<&'a KnownWorkload>, BTreeMap<String, String>)> {
    let (ns, name) = target.workload.split_once('/').context("--workload must be NAMESPACE/NAME")?;
    let found = inputs.workloads.iter().find(|w| w.namespace == ns && w.name == name);
    let labels = match (&target.labels, found) {
        (Some(l), _) => l.clone(),
        (None, Some(w)) => w.labels.clone(),
        (None, None) => BTreeMap::new(),
    };
    Ok((ns, found, labels))
}

pub fn read_inputs(sources: &Sources) -> Inputs {
    let mut inputs = Inputs {
        set: PolicySet::default(),
        workloads: Vec::new(),
        errors: Vec::new(),
        skipped: Vec::new(),
        files: 0,
    };
    for (file, text) in texts(&sources.files, &mut inputs.errors) {
        inputs.files += 1;
        match inputs.set.add_manifest(&text, &file) {
            Ok(skipped) => {
                if skipped.iter().any(|s| !is_istio(s)) {
                    match kube::workloads(&text, &file) {
                        Ok(ws) => inputs.workloads.extend(ws.into_iter().map(known)),
                        Err(e) => inputs.errors.push(e),
                    }
                }
                inputs.skipped.extend(skipped.into_iter().map(|s| (file.clone(), s)));
            }
            Err(e) => inputs.errors.push(e),
        }
    }
    for path in &sources.sidecars {
        match SidecarConfig::load(path) {
            Ok(cfg) => inputs.workloads.push(KnownWorkload {
                namespace: cfg.workload.namespace.clone(),
                name: cfg.workload.service_account.clone(),
                labels: cfg.workload.labels.clone(),
                ports: cfg.inbound.iter().map(|p| (p.port, p.protocol())).collect(),
            }),
            Err(e) => inputs.errors.push(e),
        }
    }
    inputs
}

fn known(w: kube::Workload) -> KnownWorkload {
    KnownWorkload {
        namespace: w.namespace,
        name: w.name,
        labels: w.labels,
        ports: w.ports.iter().map(|p| (p.port, p.protocol)).collect(),
    }
}

fn is_istio(s: &Skipped) -> bool {
    s.api_version.as_deref().is_some_and(|v| v.contains(".istio.io/"))
}

/// The files named (directories expanded in name order, `-` as stdin), read.
fn texts(paths: &[PathBuf], errors: &mut Vec<LoadError>) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let error = |file: &Path, e: std::io::Error| LoadError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        field: None,
        message: format!("cannot read: {e}"),
    };
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            match std::io::stdin().read_to_string(&mut text) {
                Ok(_) => out.push((PathBuf::from("<stdin>"), text)),
                Err(e) => errors.push(error(path, e)),
            }
            continue;
        }
        let files = if path.is_dir() {
            match keycard_config::policy::yaml_files(path) {
                Ok(found) => found,
                Err(e) => {
                    errors.push(error(path, e));
                    continue;
                }
            }
        } else {
            vec![path.clone()]
        };
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => out.push((file, text)),
                Err(e) => errors.push(error(&file, e)),
            }
        }
    }
    out
}

#[derive(Serialize)]
struct CheckReport<'a> {
    files: usize,
    resources: usize,
    workloads: usize,
    errors: Vec<ErrorEntry>,
    findings: &'a [Finding],
}

#[derive(Serialize)]
struct ErrorEntry {
    file: PathBuf,
    line: u64,
    column: u64,
    field: Option<String>,
    message: String,
}

/// Exit status of `policy check` with warnings and no error.
const WARNINGS_ONLY: u8 = 3;

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let inputs = read_inputs(&args.sources);
    let mut findings = lint(&inputs.set, &args.sources.root_namespace, &inputs.workloads);
    for (file, s) in inputs.skipped.iter().filter(|(_, s)| is_istio(s)) {
        findings.push(Finding {
            code: "KC108",
            severity: Severity::Info,
            origin: keycard_config::policy::Origin { file: file.clone(), line: s.line },
            resource: s.kind.clone(),
            message: format!("{} is not read by keycard (security resources only); passed over", s.kind),
        });
    }
    let set = &inputs.set;
    let resources = set.peer_auth.len() + set.authz.len() + set.request_authn.len() + set.dest_rules.len();
    let warnings = findings.iter().filter(|f| f.severity == Severity::Warning).count();
    match args.output {
        Output::Json => print_json(&CheckReport {
            files: inputs.files,
            resources,
            workloads: inputs.workloads.len(),
            errors: inputs
                .errors
                .iter()
                .map(|e| ErrorEntry {
                    file: e.file.clone(),
                    line: e.line,
                    column: e.column,
                    field: e.field.clone(),
                    message: e.message.clone(),
                })
                .collect(),
            findings: &findings,
        })?,
        Output::Text => {
            for e in &inputs.errors {
                println!("{e}: error");
            }
            for f in &findings {
                let severity = match f.severity {
                    Severity::Warning => "warning",
                    Severity::Info => "note",
                };
                let resource =
                    if f.resource.is_empty() { String::new() } else { format!(" {}:", f.resource) };
                println!("{}: {severity} {}:{resource} {}", f.origin, f.code, f.message);
            }
            println!(
                "{} file(s), {resources} resource(s), {} known workload(s): {} error(s), {warnings} warning(s), {} note(s)",
                inputs.files,
                inputs.workloads.len(),
                inputs.errors.len(),
                findings.len() - warnings
            );
        }
    }
    Ok(if !inputs.errors.is_empty() {
        ExitCode::FAILURE
    } else if warnings > 0 {
        ExitCode::from(WARNINGS_ONLY)
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Serialize)]
struct ExplainReport<'a> {
    workload: String,
    labels: &'a BTreeMap<String, String>,
    port: u16,
    protocol: &'static str,
    source: String,
    #[serde(flatten)]
    explanation: &'a Explanation,
}

fn explain_cmd(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let inputs = read_inputs(&args.sources);
    if let Some(e) = inputs.errors.first() {
        bail!("{e} (fix the policy files first: `keycard policy check`)");
    }
    let (ns, found, labels) = workload(&inputs, &args.target)?;
    let known_http = found
        .and_then(|w| w.ports.iter().find(|(p, _)| *p == args.port))
        .is_some_and(|(_, proto)| proto.is_http());
    let request_given =
        args.method.is_some() || args.path.is_some() || args.host.is_some() || !args.headers.is_empty();
    let http = match args.protocol {
        Some(p) => p == ExplainProtocol::Http,
        None => request_given || known_http,
    };
    let policy = inputs.set.for_workload(&args.sources.root_namespace, ns, &labels);
    let http_attrs = if http { Some(request(args)?) } else { None };
    let attrs = Attributes {
        source_ip: args.source_ip,
        source_principal: args.from.as_ref(),
        destination_ip: args.destination_ip,
        destination_port: args.port,
        sni: None,
        http: http_attrs.as_ref(),
    };
    let e = explain(&policy, &attrs, args.plaintext);
    let source = match &args.from {
        Some(id) => id.to_string(),
        None => format!("plaintext from {}", args.source_ip),
    };
    let protocol = if http { "http" } else { "tcp" };
    match args.output {
        Output::Json => print_json(&ExplainReport {
            workload: args.target.workload.clone(),
            labels: &labels,
            port: args.port,
            protocol,
            source,
            explanation: &e,
        })?,
        Output::Text => {
            print_explanation(args, &labels, found.is_some(), protocol, &source, http_attrs.as_ref(), &e)
        }
    }
    Ok(if e.allowed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn request(args: &ExplainArgs) -> anyhow::Result<HttpAttributes> {
    let (path, _query) = split_target(args.path.as_deref().unwrap_or("/"));
    let path = normalize_path(path, PathNormalization::default())
        .map_err(|e| anyhow::anyhow!("--path {path:?}: the sidecar answers 400: {e}"))?;
    let mut attrs = HttpAttributes {
        host: args.host.clone().unwrap_or_default(),
        method: args.method.clone().unwrap_or_else(|| "GET".into()),
        path,
        headers: args.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
        ..HttpAttributes::default()
    };
    if let Some(file) = &args.jwt_claims {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON object of claims", file.display()))?;
        let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or_default();
        let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or_default();
        attrs.request_principal = Some(format!("{iss}/{sub}"));
        attrs.claims = keycard_config::jwt::flatten_claims(&claims);
    }
    Ok(attrs)
}

fn print_explanation(
    args: &ExplainArgs,
    labels: &BTreeMap<String, String>,
    known: bool,
    protocol: &str,
    source: &str,
    http: Option<&HttpAttributes>,
    e: &Explanation,
) {
    let labels_text = if labels.is_empty() {
        "no labels (pass --labels, or a manifest or --sidecar naming it, for selectors to match)".to_owned()
    } else {
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    };
    let how = if known || args.target.labels.is_some() { "" } else { " (not among the known workloads)" };
    println!("workload   {}{how}  labels: {labels_text}", args.target.workload);
    match http {
        Some(h) => println!(
            "request    {source} -> port {} {protocol}: {} {}{}",
            args.port,
            h.method,
            h.path,
            if h.host.is_empty() { String::new() } else { format!(" (host {})", h.host) }
        ),
        None => println!("connection {source} -> port {} {protocol}", args.port),
    }
    println!("mTLS mode  {} on port {} (set by {})", e.mtls.mode, args.port, e.mtls.source);
    if e.policies.is_empty() {
        println!("policies   none apply to this workload");
    } else {
        println!("policies   in evaluation order:");
    }
    for p in &e.policies {
        let dry = if p.dry_run { " (dry run)" } else { "" };
        println!(
            "  {:<6}{dry} {}/{} ({}): {}",
            format!("{:?}", p.action).to_uppercase(),
            p.namespace,
            p.name,
            p.origin,
            p.outcome
        );
        for r in p.rules.iter().filter(|r| !r.matched) {
            println!("           rule {}: {}", r.rule, r.why);
        }
    }
    println!("decision   {} ({})", e.summary, e.reason);
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',').filter(|p| !p.is_empty()).map(parse_pair).collect()
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}
