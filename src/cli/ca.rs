//! `keycard ca ...`: init, issue, token, serve, inspect.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use keycard_ca::k8s::ServiceAccountTokens;
use keycard_ca::profile::ExtraNames;
use keycard_ca::server::ServeOptions;
use keycard_ca::store::{self, InitOptions};
use keycard_config::certinfo::{self, CertInfo};
use keycard_config::pem::{certs_from_file, certs_to_pem};
use keycard_config::{SpiffeId, TrustDomain};
use serde::Serialize;
use time::OffsetDateTime;

use super::{Output, human_remaining, parse_duration, print_json};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA: a root and an intermediate that signs leaves (or adopt a plug-in CA).
    Init(InitArgs),
    /// Issue an X.509-SVID for a service account, key made here, into a directory.
    Issue(IssueArgs),
    /// Mint a bootstrap token that lets one service account get its first certificate.
    Token(TokenArgs),
    /// Serve the CA's HTTPS API: CSR signing (token or mTLS), trust bundle, metrics.
    Serve(ServeArgs),
    /// Describe the certificates in a PEM file.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Trust domain, e.g. cluster.local.
    #[arg(long)]
    trust_domain: TrustDomain,
    /// Directory for the CA's files (created 0700).
    #[arg(long)]
    dir: PathBuf,
    /// Root lifetime.
    #[arg(long, default_value = "10y", value_parser = parse_duration)]
    root_ttl: time::Duration,
    /// Intermediate lifetime (cut at the root's expiry).
    #[arg(long, default_value = "1y", value_parser = parse_duration)]
    intermediate_ttl: time::Duration,
    /// Adopt an existing CA from a directory in Istio's cacerts layout (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, optional cert-chain.pem) instead of making one.
    #[arg(long, value_name = "DIR")]
    from_existing: Option<PathBuf>,
    /// Replace a CA already in --dir.
    #[arg(long, conflicts_with = "keep_existing")]
    force: bool,
    /// When --dir already holds a CA, keep it and succeed (for init steps that run on every start).
    #[arg(long)]
    keep_existing: bool,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Kubernetes namespace of the workload.
    #[arg(long)]
    ns: String,
    /// Service account of the workload.
    #[arg(long)]
    sa: String,
    /// Directory to write cert.pem (leaf, intermediate, root), key.pem (0600) and bundle.pem.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    ttl: time::Duration,
    /// Extra DNS name or IP address in the certificate (for non-mesh HTTPS clients).
    #[arg(long = "san")]
    sans: Vec<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, required_unless_present = "for_")]
    ns: Option<String>,
    #[arg(long, required_unless_present = "for_")]
    sa: Option<String>,
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: time::Duration,
    /// Write the token to this file (0600) instead of stdout.
    #[arg(long, conflicts_with = "for_")]
    out: Option<PathBuf>,
    /// Mint one token per `NS/SA` (repeatable) into --out-dir, as files named `NS.SA` (0600),
    /// with a copy of the trust bundle (`bundle.pem`) beside them.
    #[arg(long = "for", value_name = "NS/SA", requires = "out_dir", conflicts_with_all = ["ns", "sa"])]
    for_: Vec<String>,
    /// Directory for the tokens of --for (created if missing).
    #[arg(long, requires = "for_")]
    out_dir: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Lifetime of issued certificates when the request names none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    default_ttl: time::Duration,
    /// Longest lifetime a caller may ask for; longer requests are cut to it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_ttl: time::Duration,
    /// Extra DNS name or IP for the CA's own server certificate (localhost and the listen IP are
    /// always included).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Also accept Kubernetes service-account tokens from this issuer (the `iss` of the cluster's
    /// tokens: `kubectl get --raw /.well-known/openid-configuration`), as bootstrap credentials
    /// for `ns/<namespace>/sa/<service account>`.
    #[arg(long, requires = "k8s_jwks", value_name = "ISSUER")]
    k8s_issuer: Option<String>,
    /// The cluster's key set (`kubectl get --raw /openid/v1/jwks`), reloaded when the file changes.
    #[arg(long, requires = "k8s_issuer", value_name = "FILE")]
    k8s_jwks: Option<PathBuf>,
    /// The audience a service-account token must carry (the pod's projected token asks for it).
    #[arg(long, default_value = keycard_ca::k8s::DEFAULT_AUDIENCE, value_name = "AUDIENCE")]
    k8s_audience: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// PEM file with one or more certificates.
    file: PathBuf,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

pub fn run(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Init(a) => init(a),
        CaCommand::Issue(a) => issue(a),
        CaCommand::Token(a) => token(a),
        CaCommand::Serve(a) => serve(a),
        CaCommand::Inspect(a) => inspect(a),
    }?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InitReport {
    trust_domain: String,
    dir: PathBuf,
    bundle: PathBuf,
    chain: Vec<CertInfo>,
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let existing = if a.keep_existing && a.dir.join(store::BUNDLE).exists() {
        let ca = store::load(&a.dir, now)?;
        if ca.authority.trust_domain() != &a.trust_domain {
            anyhow::bail!(
                "{} holds a CA for {}, not {}",
                a.dir.display(),
                ca.authority.trust_domain(),
                a.trust_domain
            );
        }
        Some(ca)
    } else {
        None
    };
    let ca = match (existing, &a.from_existing) {
        (Some(ca), _) => ca,
        (None, Some(src)) => store::init_from_existing(&a.dir, src, &a.trust_domain, a.force, now)?,
        (None, None) => {
            let opts = InitOptions {
                trust_domain: a.trust_domain.clone(),
                root_lifetime: a.root_ttl,
                intermediate_lifetime: a.intermediate_ttl,
                force: a.force,
            };
            store::init(&a.dir, &opts, now)?
        }
    };
    let chain = certinfo::describe_all(ca.authority.ca_chain(), now)?;
    let report = InitReport {
        trust_domain: a.trust_domain.to_string(),
        bundle: a.dir.join(store::BUNDLE),
        dir: a.dir,
        chain,
    };
    if a.output == Output::Json {
        return print_json(&report);
    }
    println!("CA for trust domain {} ready in {}", report.trust_domain, report.dir.display());
    for c in &report.chain {
        println!("  {:<12} {}  (expires {})", c.kind, c.subject, human_remaining(c.expires_in_seconds));
    }
    println!("  trust bundle {}", report.bundle.display());
    Ok(())
}

#[derive(Serialize)]
struct IssueReport {
    spiffe_id: String,
    serial: String,
    not_after: String,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

fn issue(a: IssueArgs) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let ca = store::load(&a.dir, now)?;
    let id = SpiffeId::from_k8s(ca.authority.trust_domain(), &a.ns, &a.sa)?;
    let key = rcgen::KeyPair::generate().context("cannot make a key")?;
    let issued = ca.authority.issue(&id, &key, a.ttl, now, &extra_names(&a.sans))?;
    store::create_dir(&a.out)?;
    let (cert, key_path, bundle) = (a.out.join("cert.pem"), a.out.join("key.pem"), a.out.join("bundle.pem"));
    store::write_private(&key_path, key.serialize_pem().as_bytes())?;
    store::write_public(&cert, certs_to_pem(&issued.chain).as_bytes())?;
    store::write_public(&bundle, certs_to_pem(ca.authority.bundle().roots()).as_bytes())?;
    let report = IssueReport {
        spiffe_id: id.to_string(),
        serial: issued.serial,
        not_after: certinfo::rfc3339(issued.not_after),
        cert,
        key: key_path,
        bundle,
    };
    if a.output == Output::Json {
        return print_json(&report);
    }
    println!("issued {} (serial {}, expires {})", report.spiffe_id, report.serial, report.not_after);
    println!("  cert   {}", report.cert.display());
    println!("  key    {} (0600)", report.key.display());
    println!("  bundle {}", report.bundle.display());
    Ok(())
}

#[derive(Serialize)]
struct TokenReport {
    spiffe_id: String,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
}

fn token(a: TokenArgs) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let ca = store::load(&a.dir, now)?;
    if let Some(out_dir) = &a.out_dir {
        store::create_dir(out_dir)?;
        let mut reports = Vec::new();
        for pair in &a.for_ {
            let (ns, sa) = pair.split_once('/').with_context(|| format!("--for {pair:?}: want NS/SA"))?;
            let id = SpiffeId::from_k8s(ca.authority.trust_domain(), ns, sa)?;
            let token = ca.tokens.mint(&id, now.unix_timestamp(), a.ttl.whole_seconds())?;
            let path = out_dir.join(format!("{ns}.{sa}"));
            store::write_private(&path, format!("{token}\n").as_bytes())?;
            reports.push(TokenReport {
                spiffe_id: id.to_string(),
                expires_at: certinfo::rfc3339(now + a.ttl),
                file: Some(path),
                token: None,
            });
        }
        // What a sidecar needs besides its token: the trust bundle, to verify the CA.
        store::write_public(&out_dir.join(store::BUNDLE), &std::fs::read(a.dir.join(store::BUNDLE))?)?;
        if a.output == Output::Json {
            return print_json(&reports);
        }
        for r in &reports {
            println!("token for {} written to {} (expires {})", r.spiffe_id, path_str(&r.file), r.expires_at);
        }
        return Ok(());
    }
    let (Some(ns), Some(sa)) = (&a.ns, &a.sa) else { anyhow::bail!("--ns and --sa are required") };
    let id = SpiffeId::from_k8s(ca.authority.trust_domain(), ns, sa)?;
    let token = ca.tokens.mint(&id, now.unix_timestamp(), a.ttl.whole_seconds())?;
    let expires_at = certinfo::rfc3339(now + a.ttl);
    if let Some(path) = &a.out {
        store::write_private(path, format!("{token}\n").as_bytes())?;
    }
    let report = TokenReport {
        spiffe_id: id.to_string(),
        expires_at,
        file: a.out.clone(),
        token: a.out.is_none().then_some(token),
    };
    match (a.output, &report.token) {
        (Output::Json, _) => print_json(&report)?,
        (Output::Text, Some(token)) => println!("{token}"),
        (Output::Text, None) => {
            println!(
                "token for {} written to {} (expires {})",
                report.spiffe_id,
                path_str(&a.out),
                report.expires_at
            )
        }
    }
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let ca = store::load(&a.dir, OffsetDateTime::now_utc())?;
    let mut names = extra_names(&a.sans);
    names.dns.insert(0, "localhost".into());
    if !a.listen.ip().is_unspecified() {
        names.ips.push(a.listen.ip());
    }
    let kubernetes = match (a.k8s_issuer, a.k8s_jwks) {
        (Some(issuer), Some(jwks)) => {
            let td = ca.authority.trust_domain().clone();
            let tokens = ServiceAccountTokens::load(issuer, a.k8s_audience, jwks, td)
                .context("--k8s-jwks: cannot use the cluster's key set")?;
            Some(std::sync::Arc::new(tokens))
        }
        _ => None,
    };
    let opts = ServeOptions {
        default_ttl: a.default_ttl,
        max_ttl: a.max_ttl,
        server_names: names,
        kubernetes,
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        let k8s_issuer = opts.kubernetes.as_ref().map(|k| k.issuer().to_owned());
        tracing::info!(trust_domain = %ca.authority.trust_domain(), listen = %addr, ?k8s_issuer, "keycard CA serving");
        let registry = prometheus::Registry::new();
        keycard_ca::server::serve(listener, ca, opts, registry, shutdown_signal()).await?;
        tracing::info!("keycard CA stopped");
        Ok(())
    })
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let certs = certs_from_file(&a.file)?;
    let infos = certinfo::describe_all(&certs, OffsetDateTime::now_utc())?;
    if a.output == Output::Json {
        return print_json(&infos);
    }
    for (i, c) in infos.iter().enumerate() {
        print_cert(i, infos.len(), c);
    }
    Ok(())
}

pub fn print_cert(i: usize, n: usize, c: &CertInfo) {
    let crit = |critical: bool| if critical { " (critical)" } else { "" };
    println!("Certificate {} of {n} ({})", i + 1, c.kind);
    if let Some(id) = &c.spiffe_id {
        println!("  SPIFFE ID:     {id}");
    }
    println!("  Subject:       {}", if c.subject.is_empty() { "(empty)" } else { &c.subject });
    println!("  Issuer:        {}", c.issuer);
    println!("  Serial:        {}", c.serial);
    println!("  Not before:    {}", c.not_before);
    println!("  Not after:     {} (expires {})", c.not_after, human_remaining(c.expires_in_seconds));
    println!("  Public key:    {}", c.public_key);
    println!("  Signature:     {}", c.signature_algorithm);
    let path_len = c.path_len.map(|p| format!(", pathlen:{p}")).unwrap_or_default();
    println!("  Basic constr.: CA:{}{path_len}", c.is_ca);
    println!("  Key usage:     {}{}", c.key_usage.join(", "), crit(c.key_usage_critical));
    if !c.extended_key_usage.is_empty() {
        println!("  Ext key usage: {}", c.extended_key_usage.join(", "));
    }
    let sans: Vec<String> = c
        .uri_sans
        .iter()
        .map(|u| format!("URI:{u}"))
        .chain(c.dns_sans.iter().map(|d| format!("DNS:{d}")))
        .chain(c.ip_sans.iter().map(|ip| format!("IP:{ip}")))
        .collect();
    if !sans.is_empty() {
        println!("  SANs:          {}{}", sans.join(", "), crit(c.san_critical));
    }
    println!("  SHA-256:       {}", c.sha256_fingerprint);
}

fn extra_names(sans: &[String]) -> ExtraNames {
    let mut names = ExtraNames::default();
    for san in sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => names.ips.push(ip),
            Err(_) => names.dns.push(san.clone()),
        }
    }
    names
}

fn path_str(p: &Option<PathBuf>) -> String {
    p.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
