//! Command-line arguments and dispatch. Each subcommand module turns arguments into calls on the
//! crates and prints the result, as text or, with `-o json`, as one JSON document.

mod bookinfo;
mod ca;
mod completion;
mod container;
mod demo;
mod inject;
mod iptables;
mod policy;
mod proxy;
mod route;
mod spiffe;
mod status;
mod suggest;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "keycard",
    version,
    about = "Zero-trust service-to-service security: SPIFFE CA and mTLS sidecar"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level filter (tracing syntax, e.g. `info` or `keycard_ca=debug`); KEYCARD_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The certificate authority: init, issue, token, serve, inspect.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// SPIFFE IDs and X.509-SVIDs: parse, verify.
    #[command(subcommand)]
    Spiffe(spiffe::SpiffeCommand),
    /// Istio security policy offline: check (lint), explain a decision, suggest from traffic.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// A live sidecar: modes per port, who connects with and without mTLS, safe to go STRICT?
    Status(status::StatusArgs),
    /// A live sidecar's certificate chain and trust bundle (like `istioctl proxy-config secret`).
    Certs(status::CertsArgs),
    /// Run the sidecar: mutual TLS in and out, PeerAuthentication and AuthorizationPolicy.
    Proxy(proxy::ProxyArgs),
    /// Istio's Bookinfo security lab on loopback: a CA, sidecars, policies, every flow checked.
    Demo(demo::DemoArgs),
    /// Install (or --cleanup) Istio-compatible REDIRECT rules capturing the workload's TCP.
    Iptables(iptables::IptablesArgs),
    /// Hold a network namespace for the sidecar, app and init step to join; exits on SIGTERM.
    Pause,
    /// Exit 0 when a sidecar (or a URL) reports ready: the image's HEALTHCHECK.
    Healthcheck(container::HealthcheckArgs),
    /// Add keycard (capture init step, sidecar, its configuration) to Kubernetes manifests.
    Inject(inject::InjectArgs),
    /// Print a shell completion script (bash, zsh or fish).
    Completion(completion::CompletionArgs),
    /// The Bookinfo apps and a one-request HTTP client, for the compose mesh.
    #[command(subcommand, hide = true)]
    Bookinfo(bookinfo::BookinfoCommand),
}

pub fn run(cli: Cli, log_control: keycard_proxy::admin::LogControl) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ca(cmd) => ca::run(cmd),
        Command::Spiffe(cmd) => spiffe::run(cmd),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Status(args) => status::status(&args),
        Command::Certs(args) => status::certs(&args),
        Command::Proxy(args) => proxy::run(args, log_control),
        Command::Demo(args) => demo::run(args),
        Command::Iptables(args) => iptables::run(args),
        Command::Pause => container::pause(),
        Command::Healthcheck(args) => container::healthcheck(args),
        Command::Inject(args) => inject::run(args),
        Command::Completion(args) => completion::run(args),
        Command::Bookinfo(cmd) => bookinfo::run(cmd),
    }
}

/// Sets up logging on stderr and returns the control `/logging` uses to change the filter.
pub fn init_logging(args: &LogArgs) -> keycard_proxy::admin::LogControl {
    let filter = std::env::var("KEYCARD_LOG").unwrap_or_else(|_| args.log_level.clone());
    keycard_proxy::logging::init(&filter, matches!(args.log_format, LogFormat::Json))
}

/// Parses `24h`, `90m`, `10y` (humantime syntax) into a `time::Duration`.
pub fn parse_duration(s: &str) -> Result<time::Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 24h or 30m: {e}"))?;
    let d = time::Duration::try_from(d).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("a duration must be positive".into());
    }
    Ok(d)
}

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `23h 59m`, `12d 3h`, or `expired 5m ago`.
pub fn human_remaining(seconds: i64) -> String {
    let (prefix, s) = if seconds < 0 { ("expired ", -seconds) } else { ("", seconds) };
    let (d, h, m) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60);
    let body = match (d, h) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    };
    if seconds < 0 { format!("{prefix}{body} ago") } else { format!("in {body}") }
}
