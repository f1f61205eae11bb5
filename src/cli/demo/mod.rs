//! `keycard demo`: Istio's Bookinfo security lab on loopback, in a minute, with no Docker.
//!
//! A CA (`keycard ca serve`) and one sidecar per workload (`keycard proxy`) run as child processes
//! of this one, configured by files written to a work directory a person can read; the four
//! Bookinfo apps run in this process. Each sidecar gets its identity from the CA with a bootstrap
//! token (key made in the sidecar, never sent), and all of them load the lab's policies
//! (`deploy/bookinfo/policies.yaml`). Then every flow is driven for real and judged by what the
//! deciding sidecar recorded: its access line (found by the request id) or its list of refused
//! handshakes (found by the caller's address).

mod mesh;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use super::Output;
use crate::bookinfo::App;
use mesh::Mesh;

const TRUST_DOMAIN: &str = "cluster.local";
/// The policies of the lab, the same file the compose mesh mounts.
const POLICIES: &str = include_str!("../../../deploy/bookinfo/policies.yaml");
/// How long the mesh may take to come up (every sidecar holding a certificate).
const READY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stay up after the flows, until Ctrl-C, to poke at the mesh by hand.
    #[arg(long)]
    keep_running: bool,
    /// Work directory for the CA, configs, tokens and logs (kept afterwards). Default: a temporary
    /// directory, removed on exit.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Apply these Istio policies instead of the lab's (deploy/bookinfo/policies.yaml). The flows
    /// still expect the lab's outcomes, so the table shows what the change lets through or stops.
    #[arg(long, value_name = "FILE")]
    policies: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// One workload of the mesh: a service account, a sidecar and (except for the ingress and the
/// intruder's client) an app.
struct Workload {
    key: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    app: Option<App>,
    /// Keys of the workloads this one calls through its sidecar.
    calls: &'static [&'static str],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        key: "ingress",
        namespace: "istio-system",
        service_account: "istio-ingressgateway-service-account",
        app: None,
        calls: &["productpage"],
    },
    Workload {
        key: "productpage",
        namespace: "default",
        service_account: "bookinfo-productpage",
        app: Some(App::Productpage),
        calls: &["details", "reviews", "ratings"],
    },
    Workload {
        key: "details",
        namespace: "default",
        service_account: "bookinfo-details",
        app: Some(App::Details),
        calls: &[],
    },
    Workload {
        key: "reviews",
        namespace: "default",
        service_account: "bookinfo-reviews",
        app: Some(App::Reviews),
        calls: &["ratings"],
    },
    Workload {
        key: "ratings",
        namespace: "default",
        service_account: "bookinfo-ratings",
        app: Some(App::Ratings),
        calls: &[],
    },
    // A workload with a valid mesh identity that no policy allows anywhere.
    Workload {
        key: "sleep",
        namespace: "default",
        service_account: "sleep",
        app: None,
        calls: &["details", "productpage"],
    },
];

/// The service port every Bookinfo app listens on, as policies and metrics name it.
const SERVICE_PORT: u16 = 9080;

fn workload(key: &str) -> &'static Workload {
    WORKLOADS.iter().find(|w| w.key == key).expect("a workload of the table")
}

fn spiffe_id(w: &Workload) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", w.namespace, w.service_account)
}

/// Where one workload's sidecar listens.
#[derive(Debug, Clone)]
struct Ports {
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
    /// The sidecar's inbound listener (what peers dial) and the app behind it.
    inbound: Option<(SocketAddr, SocketAddr)>,
    /// Outbound listeners by the key of the workload they lead to.
    outbound: BTreeMap<&'static str, SocketAddr>,
}

#[derive(Debug, Clone, Copy)]
enum How {
    /// The caller's app sends plaintext HTTP to its own sidecar, which carries it over mTLS.
    Sidecar { from: &'static str, to: &'static str },
    /// Plaintext straight at the target's sidecar, no identity.
    Plaintext { to: &'static str },
    /// Mutual TLS with a certificate for `claims` from a CA the mesh does not trust.
    Forged { claims: &'static str, to: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "status")]
enum Expect {
    Status(u16),
    Refused,
}

struct Flow {
    who: &'static str,
    method: &'static str,
    path: &'static str,
    how: How,
    expect: Expect,
    why: &'static str,
}

fn flows() -> Vec<Flow> {
    use How::*;
    let flow = |who, method, path, how, expect, why| Flow { who, method, path, how, expect, why };
    vec![
        flow(
            "outside → ingress → productpage",
            "GET",
            "/productpage",
            Sidecar { from: "ingress", to: "productpage" },
            Expect::Status(200),
            "the page, built from details, reviews and ratings over mTLS",
        ),
        flow(
            "productpage → details",
            "GET",
            "/details/0",
            Sidecar { from: "productpage", to: "details" },
            Expect::Status(200),
            "details-viewer allows productpage",
        ),
        flow(
            "productpage → reviews",
            "GET",
            "/reviews/0",
            Sidecar { from: "productpage", to: "reviews" },
            Expect::Status(200),
            "reviews-viewer allows productpage",
        ),
        flow(
            "reviews → ratings",
            "GET",
            "/ratings/0",
            Sidecar { from: "reviews", to: "ratings" },
            Expect::Status(200),
            "ratings-viewer allows reviews",
        ),
        flow(
            "productpage → details",
            "DELETE",
            "/details/0",
            Sidecar { from: "productpage", to: "details" },
            Expect::Status(403),
            "details-viewer allows GET only",
        ),
        flow(
            "productpage → ratings",
            "GET",
            "/ratings/0",
            Sidecar { from: "productpage", to: "ratings" },
            Expect::Status(403),
            "only reviews may call ratings",
        ),
        flow(
            "sleep (valid identity) → details",
            "GET",
            "/details/0",
            Sidecar { from: "sleep", to: "details" },
            Expect::Status(403),
            "a mesh identity is not a permission",
        ),
        flow(
            "sleep (valid identity) → productpage",
            "GET",
            "/productpage",
            Sidecar { from: "sleep", to: "productpage" },
            Expect::Status(403),
            "only the ingress may call productpage",
        ),
        flow(
            "intruder (plaintext) → details",
            "GET",
            "/details/0",
            Plaintext { to: "details" },
            Expect::Refused,
            "STRICT: no plaintext",
        ),
        flow(
            "intruder (plaintext) → ratings",
            "GET",
            "/ratings/0",
            Plaintext { to: "ratings" },
            Expect::Refused,
            "STRICT: no plaintext",
        ),
        flow(
            "intruder (forged productpage cert) → details",
            "GET",
            "/details/0",
            Forged { claims: "productpage", to: "details" },
            Expect::Refused,
            "a certificate the mesh CA did not sign",
        ),
    ]
}

/// What happened to one flow, as the deciding sidecar saw it.
#[derive(Debug, Serialize)]
struct Outcome {
    flow: String,
    request: String,
    expected: Expect,
    got: Got,
    ok: bool,
    /// Whether the hop into the deciding sidecar was mutual TLS.
    mtls: Option<bool>,
    /// The caller's identity as the deciding sidecar verified it.
    caller: Option<String>,
    /// The rule that decided, or why the connection was refused.
    decided_by: String,
    why: &'static str,
    /// For the ingress flow: the status of each call the page made.
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
enum Got {
    Status(u16),
    Refused(String),
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(demo(a))
}

async fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let (_temp, dir) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (None, std::fs::canonicalize(d)?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("keycard-demo-").tempdir()?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let text = a.output == Output::Text;
    let say = |s: &str| {
        if text {
            eprintln!("{s}");
        }
    };
    say(&format!("keycard demo: Bookinfo on loopback, files in {}", dir.display()));
    let policies = match &a.policies {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        None => POLICIES.to_owned(),
    };
    let mut mesh = Mesh::start(&dir, &policies, &say).await?;
    say("running the flows");
    let mut outcomes = Vec::new();
    for (i, flow) in flows().iter().enumerate() {
        outcomes.push(mesh.drive(i, flow).await);
    }
    let all_ok = outcomes.iter().all(|o| o.ok);
    match a.output {
        Output::Json => super::print_json(&serde_json::json!({
            "ok": all_ok,
            "dir": dir,
            "flows": outcomes,
            "endpoints": mesh.endpoints(),
        }))?,
        Output::Text => {
            print!("{}", table(&outcomes));
            println!();
            print!("{}", mesh.try_it(a.keep_running));
            if all_ok {
                println!("\nevery flow behaved as the policies say");
            } else {
                let bad = outcomes.iter().filter(|o| !o.ok).count();
                println!(
                    "\n{bad} flow(s) did NOT behave as expected (marked ✗); logs are in {}",
                    dir.display()
                );
            }
        }
    }
    if a.keep_running {
        say("running until Ctrl-C");
        super::ca::shutdown_signal().await;
    }
    mesh.stop().await;
    if !all_ok && a.dir.is_none() && !a.keep_running {
        // The logs explain a failure: keep them.
        if let Some(t) = _temp {
            let kept = t.keep();
            eprintln!("kept {} for inspection", kept.display());
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `cluster.local/ns/default/sa/x`: the form policies' `principals` use.
fn principal(id: &str) -> String {
    id.strip_prefix("spiffe://").unwrap_or(id).to_owned()
}

fn decided_by(access: &Value) -> String {
    let policy = access["policy"].as_str().unwrap_or("-");
    match (access["decision"].as_str(), access["reason"].as_str(), policy) {
        (Some("deny"), Some("no_matching_allow"), _) => "no ALLOW rule matches (deny-all)".into(),
        (_, _, "none" | "-") => "no policy applies".into(),
        _ => policy.to_owned(),
    }
}

/// `details 200, reviews 200 (ratings 200)` from the productpage's JSON.
fn page_summary(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return "not JSON".into() };
    let status = |v: &Value| v["status"].as_u64().map_or_else(|| "no answer".to_owned(), |s| s.to_string());
    format!(
        "details {}, reviews {} (ratings {})",
        status(&v["details"]),
        status(&v["reviews"]),
        status(&v["reviews"]["body"]["ratings"])
    )
}

fn page_all_ok(summary: &str) -> bool {
    summary == "details 200, reviews 200 (ratings 200)"
}

fn table(outcomes: &[Outcome]) -> String {
    let headers = [
        "",
        "#",
        "flow",
        "request",
        "expected",
        "got",
        "mTLS",
        "caller, as the callee verified it",
        "decided by",
    ];
    let rows: Vec<[String; 9]> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let got = match &o.got {
                Got::Status(s) => match &o.page {
                    Some(page) => format!("{s}: {page}"),
                    None => s.to_string(),
                },
                Got::Refused(_) => "refused".into(),
            };
            let expected = match o.expected {
                Expect::Status(s) => s.to_string(),
                Expect::Refused => "refused".into(),
            };
            let mtls = match o.mtls {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            [
                if o.ok { "✓" } else { "✗" }.into(),
                (i + 1).to_string(),
                o.flow.clone(),
                o.request.clone(),
                expected,
                got,
                mtls.into(),
                // The trust domain is the same for every caller: leave it out to keep lines short.
                o.caller
                    .as_deref()
                    .map_or("-", |c| c.strip_prefix(&format!("{TRUST_DOMAIN}/")).unwrap_or(c))
                    .into(),
                o.decided_by.clone(),
            ]
        })
        .collect();
    let mut widths = headers.map(|h| h.chars().count());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(l, "{cell}{}  ", " ".repeat(w - cell.chars().count()));
        }
        let _ = writeln!(s, "{}", l.trim_end());
    };
    line(&headers.map(String::from));
    for r in &rows {
        line(r);
    }
    s
}
