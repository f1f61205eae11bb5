//! `keycard spiffe ...`: parse an ID, verify an X.509-SVID against a trust bundle.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use keycard_config::pem::certs_from_file;
use keycard_config::svid::{Purpose, SvidError, TrustBundle};
use keycard_config::{SpiffeId, TrustDomain};
use rustls_pki_types::UnixTime;
use serde::Serialize;

use super::{Output, print_json};

#[derive(Debug, Subcommand)]
pub enum SpiffeCommand {
    /// Validate a SPIFFE ID and print its parts (`-` reads it from stdin, byte for byte).
    Parse(ParseArgs),
    /// Is this certificate chain a valid X.509-SVID of the bundle's trust domain? Why not?
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct ParseArgs {
    /// The ID, or `-` for stdin (no trailing newline is stripped: use printf, not echo).
    id: String,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// PEM trust bundle (one or more roots).
    #[arg(long)]
    bundle: PathBuf,
    /// The SPIFFE ID the certificate must carry.
    #[arg(long)]
    id: Option<SpiffeId>,
    /// The trust domain, when neither --id nor the bundle's roots name it.
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
    /// Which TLS role the SVID must be valid for.
    #[arg(long, value_enum, default_value_t = PurposeArg::Any)]
    purpose: PurposeArg,
    /// PEM file: the leaf, optionally followed by its intermediates (and root).
    cert: PathBuf,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PurposeArg {
    Any,
    Client,
    Server,
}

pub fn run(cmd: SpiffeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SpiffeCommand::Parse(a) => parse(a),
        SpiffeCommand::Verify(a) => verify(a),
    }
}

#[derive(Serialize)]
struct Parsed<'a> {
    spiffe_id: &'a str,
    trust_domain: &'a str,
    path: &'a str,
    segments: Vec<&'a str>,
    principal: &'a str,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
}

fn parse(a: ParseArgs) -> anyhow::Result<ExitCode> {
    let input = if a.id == "-" {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).context("cannot read stdin")?;
        String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!("invalid spiffe id: stdin is not UTF-8 (byte {})", e.utf8_error().valid_up_to())
        })?
    } else {
        a.id
    };
    let id = SpiffeId::parse(&input).with_context(|| format!("invalid spiffe id {input:?}"))?;
    let k8s = id.k8s();
    let parsed = Parsed {
        spiffe_id: id.as_str(),
        trust_domain: id.trust_domain_str(),
        path: id.path(),
        segments: id.segments().collect(),
        principal: id.principal(),
        namespace: k8s.map(|k| k.namespace),
        service_account: k8s.map(|k| k.service_account),
    };
    if a.output == Output::Json {
        print_json(&parsed)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("spiffe id:       {}", parsed.spiffe_id);
    println!("trust domain:    {}", parsed.trust_domain);
    println!(
        "path:            {}",
        if parsed.path.is_empty() { "(none: a trust domain ID)" } else { parsed.path }
    );
    println!("principal:       {}", parsed.principal);
    if let (Some(ns), Some(sa)) = (parsed.namespace, parsed.service_account) {
        println!("namespace:       {ns}");
        println!("service account: {sa}");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Violation {
    rule: &'static str,
    message: String,
}

#[derive(Serialize)]
struct VerifyReport {
    valid: bool,
    trust_domain: String,
    spiffe_id: Option<String>,
    not_after: Option<String>,
    violations: Vec<Violation>,
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let roots = certs_from_file(&a.bundle)?;
    let chain = certs_from_file(&a.cert)?;
    let td = match (&a.trust_domain, &a.id) {
        (Some(td), _) => td.clone(),
        (None, Some(id)) => id.trust_domain(),
        (None, None) => match TrustBundle::trust_domain_of_roots(&roots) {
            Some(td) => td,
            None => bail!(
                "{}: no root names its trust domain (a spiffe://<td> URI SAN); pass --trust-domain or --id",
                a.bundle.display()
            ),
        },
    };
    let bundle = TrustBundle::new(td.clone(), roots).with_context(|| a.bundle.display().to_string())?;
    let purpose = match a.purpose {
        PurposeArg::Any => Purpose::Any,
        PurposeArg::Client => Purpose::Client,
        PurposeArg::Server => Purpose::Server,
    };
    let mut report = bundle.inspect(&chain, UnixTime::now(), purpose);
    if let (Some(want), Some(got)) = (&a.id, &report.id)
        && want != got
    {
        report.violations.push(SvidError::IdMismatch { expected: want.to_string(), got: got.clone() });
    }
    let out = VerifyReport {
        valid: report.violations.is_empty(),
        trust_domain: td.to_string(),
        spiffe_id: report.id.as_ref().map(ToString::to_string),
        not_after: report
            .not_after
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .map(keycard_config::certinfo::rfc3339),
        violations: report
            .violations
            .iter()
            .map(|v| Violation { rule: v.rule(), message: v.to_string() })
            .collect(),
    };
    let code = if out.valid { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    match (a.output, out.valid) {
        (Output::Json, _) => print_json(&out)?,
        (Output::Text, true) => {
            println!("valid X.509-SVID of trust domain {}", out.trust_domain);
            println!("  spiffe id: {}", out.spiffe_id.as_deref().unwrap_or_default());
            println!("  expires:   {}", out.not_after.as_deref().unwrap_or_default());
        }
        (Output::Text, false) => {
            let reasons: Vec<String> =
                out.violations.iter().map(|v| format!("{}: {}", v.rule, v.message)).collect();
            eprintln!("keycard: invalid X.509-SVID: {}", reasons.join("; "));
        }
    }
    Ok(code)
}
