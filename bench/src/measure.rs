//! One benchmark run: the backend, the certificates, then for each repeat every system in turn
//! (interleaved, so slow drift of a noisy machine spreads over all of them), each measured on a
//! fresh start for the load phases and on another fresh start for the idle connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::load;
use crate::procfs::{self, Usage};
use crate::systems::{self, Certs, Env, Kind, Ports, Running};

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct Settings {
    /// The keycard binary to measure (the static musl build, as shipped in the image).
    #[arg(long, default_value = "target/x86_64-unknown-linux-musl/release/keycard")]
    pub keycard: PathBuf,
    /// Systems to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub systems: Vec<Kind>,
    /// Each measurement is repeated this many times; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Paced rates (requests per second), open loop.
    #[arg(long, value_delimiter = ',', default_values_t = [1000.0, 5000.0])]
    pub rates: Vec<f64>,
    /// Keep-alive connections for the paced and saturation runs.
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Seconds of each paced run.
    #[arg(long, default_value_t = 6.0)]
    pub paced_s: f64,
    /// Seconds of the saturation and new-connection runs.
    #[arg(long, default_value_t = 3.0)]
    pub closed_s: f64,
    /// Bytes fetched over one connection in the bulk run.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub bulk_bytes: u64,
    /// Idle connections held open through the pair for the memory-per-connection figure.
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// Where RESULTS.md, results.json and latency.svg go.
    #[arg(long, default_value = "bench")]
    pub out: PathBuf,
    /// Work directory for configs, certificates and logs (default: a fresh one under /tmp).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// A smoke run: 1 repeat, 2 s phases, 16 MB bulk, 500 idle connections.
    #[arg(long)]
    pub quick: bool,
    /// Exit non-zero when any system failed to start or any phase had errors (for CI's smoke run).
    #[serde(default)]
    #[arg(long)]
    pub strict: bool,
    /// The command line as the user typed it (filled in by the harness, for the report).
    #[arg(skip)]
    pub command: String,
    /// Why fewer idle connections were held than asked for, if so.
    #[serde(default)]
    #[arg(skip)]
    pub idle_note: Option<String>,
}

/// Everything measured for one system in one repeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub paced: Vec<Paced>,
    pub saturation_rps: Option<f64>,
    pub bulk_mb_s: Option<f64>,
    pub new_conns_per_s: Option<f64>,
    /// Bytes of resident memory per idle connection above the sidecar's own baseline, the larger
    /// of the two sidecars.
    pub idle_bytes_per_conn: Option<f64>,
    pub idle_rss_kib: Vec<(u64, u64)>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Paced {
    pub rate: f64,
    pub achieved: f64,
    pub completed: u64,
    pub failed: u64,
    /// Microseconds at p50, p90, p99, p99.9, p99.99 and max.
    pub latency_us: Vec<(f64, f64)>,
    /// CPU seconds of both sidecars together per 1,000 requests.
    pub cpu_s_per_1k: Option<f64>,
    /// Peak RSS of each sidecar (KiB) after this phase: since start, so it covers start-up too.
    pub peak_rss_kib: Vec<u64>,
    /// Anonymous RSS of each sidecar (KiB) at the end of this phase.
    #[serde(default)]
    pub anon_rss_kib: Vec<u64>,
}

pub const PERCENTILES: [f64; 6] = [50.0, 90.0, 99.0, 99.9, 99.99, 100.0];

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub settings: Settings,
    pub date: String,
    pub machine: Vec<(String, String)>,
    pub versions: Vec<(String, String)>,
    /// Per system (in run order), one sample per repeat.
    pub systems: Vec<(Kind, Vec<Sample>)>,
}

pub fn run(mut s: Settings) -> anyhow::Result<()> {
    s.command = std::env::args().collect::<Vec<_>>().join(" ");
    if s.quick {
        (s.repeats, s.paced_s, s.closed_s, s.bulk_bytes, s.idle) = (1, 2.0, 1.0, 16 * 1024 * 1024, 500);
    }
    if s.systems.is_empty() {
        s.systems = Kind::ALL.to_vec();
    }
    let keycard = std::fs::canonicalize(&s.keycard).with_context(|| {
        format!("no keycard binary at {} (build it first; see bench/README.md)", s.keycard.display())
    })?;
    for k in &s.systems {
        if let Some(p) = k.program()
            && !on_path(p)
        {
            anyhow::bail!("{} needs {p}, which is not installed (bench/run installs it)", k.name());
        }
    }
    let fd_limit = raise_fd_limit(s.idle);
    // An L4 sidecar holds two descriptors per connection; leave room for everything else.
    let idle_max = usize::try_from(fd_limit.saturating_sub(200) / 2).unwrap_or(usize::MAX);
    if s.idle > idle_max {
        s.idle_note = Some(format!(
            "{} idle connections were asked for; this machine's open-file limit is {fd_limit} and this process \
             cannot raise it (no CAP_SYS_RESOURCE), so a sidecar holding two descriptors per connection can \
             carry {idle_max}: {idle_max} were held",
            s.idle
        ));
        s.idle = idle_max;
        eprintln!("note: {}", s.idle_note.as_deref().unwrap_or_default());
    }
    let work = match &s.work {
        Some(w) => w.clone(),
        None => std::env::temp_dir().join(format!("keycard-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    eprintln!("work directory: {}", work.display());
    let certs = Certs::make(&keycard, &work.join("certs"))?;
    let mut ports = Ports::new(20_000 + (std::process::id() % 5_000) as u16);
    let backend_addr = SocketAddr::from(([127, 0, 0, 1], ports.take()?));
    let backend = Backend::start(backend_addr, &work)?;
    let mut env =
        Env { work: work.clone(), keycard: keycard.clone(), backend: backend_addr, certs, ports, fd_limit };

    let mut results = Results {
        settings: s.clone(),
        date: now(),
        machine: machine(),
        versions: systems::versions(&keycard),
        systems: s.systems.iter().map(|k| (*k, Vec::new())).collect(),
    };
    let started = Instant::now();
    for rep in 0..s.repeats {
        for (kind, samples) in &mut results.systems {
            eprintln!(
                "[{:>5.0}s] repeat {}/{}: {}",
                started.elapsed().as_secs_f64(),
                rep + 1,
                s.repeats,
                kind.name()
            );
            let sample = measure(*kind, &mut env, &s, rep);
            for e in &sample.errors {
                eprintln!("    {}: {e}", kind.name());
            }
            samples.push(sample);
        }
    }
    drop(backend);
    std::fs::create_dir_all(&s.out)?;
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(s.out.join("results.json"), json)?;
    crate::report::write(&results, &s.out)?;
    eprintln!(
        "wrote {}/RESULTS.md, results.json, latency.svg in {:.0} s",
        s.out.display(),
        started.elapsed().as_secs_f64()
    );
    let errors: usize = results.systems.iter().flat_map(|(_, v)| v).map(|x| x.errors.len()).sum();
    anyhow::ensure!(
        !s.strict || errors == 0,
        "{errors} errors during the run (listed at the end of RESULTS.md)"
    );
    Ok(())
}

fn measure(kind: Kind, env: &mut Env, s: &Settings, rep: usize) -> Sample {
    let mut sample = Sample::default();
    let dir = env.work.join(format!("{}-{rep}", kind.name()));
    match systems::start(kind, env, &dir.join("load")) {
        Ok(r) => {
            load_phases(&r, s, &mut sample);
            r.stop();
        }
        Err(e) => sample.errors.push(format!("start: {e:#}")),
    }
    match systems::start(kind, env, &dir.join("idle")) {
        Ok(r) => {
            idle_phase(&r, s, &mut sample);
            r.stop();
        }
        Err(e) => sample.errors.push(format!("start (idle): {e:#}")),
    }
    sample
}

fn usages(r: &Running) -> Vec<Usage> {
    r.pids().into_iter().map(procfs::usage).collect()
}

fn cpu(u: &[Usage]) -> f64 {
    u.iter().map(|x| x.cpu_s).sum()
}

fn load_phases(r: &Running, s: &Settings, sample: &mut Sample) {
    let conns = s.conns;
    // Warm-up: connections made, caches and pools filled; not measured.
    if let Err(e) = load::paced(r.front, conns, s.rates[0].min(1000.0), Duration::from_secs(1)) {
        sample.errors.push(format!("warm-up: {e}"));
        return;
    }
    for &rate in &s.rates {
        let before = usages(r);
        match load::paced(r.front, conns, rate, Duration::from_secs_f64(s.paced_s)) {
            Ok(run) => {
                let after = usages(r);
                let h = &run.latency;
                sample.paced.push(Paced {
                    rate,
                    achieved: run.rate(),
                    completed: run.completed,
                    failed: run.errors,
                    latency_us: crate::measure::PERCENTILES
                        .iter()
                        .map(|p| (*p, h.value_at_quantile(p / 100.0) as f64 / 1000.0))
                        .collect(),
                    cpu_s_per_1k: (!r.sidecars.is_empty() && run.completed > 0)
                        .then(|| (cpu(&after) - cpu(&before)) / run.completed as f64 * 1000.0),
                    peak_rss_kib: after.iter().map(|u| u.hwm_kib).collect(),
                    anon_rss_kib: after.iter().map(|u| u.anon_kib).collect(),
                });
                if run.errors > 0 {
                    sample.errors.push(format!("{rate} rps: {} requests failed", run.errors));
                }
            }
            Err(e) => sample.errors.push(format!("{rate} rps: {e}")),
        }
    }
    let closed = Duration::from_secs_f64(s.closed_s);
    match load::saturate(r.front, conns, closed) {
        Ok(run) => sample.saturation_rps = Some(run.rate()),
        Err(e) => sample.errors.push(format!("saturation: {e}")),
    }
    match load::bulk(r.front, s.bulk_bytes) {
        Ok(mb) => sample.bulk_mb_s = Some(mb),
        Err(e) => sample.errors.push(format!("bulk: {e}")),
    }
    match load::new_connections(r.front, conns, closed) {
        Ok(run) => {
            sample.new_conns_per_s = Some(run.rate());
            if run.errors > 0 {
                sample.errors.push(format!("new connections: {} failed", run.errors));
            }
        }
        Err(e) => sample.errors.push(format!("new connections: {e}")),
    }
}

fn idle_phase(r: &Running, s: &Settings, sample: &mut Sample) {
    if r.sidecars.is_empty() {
        return;
    }
    let before = usages(r);
    match load::idle(r.front, s.idle, 8) {
        Ok(open) => {
            // Let lazily freed buffers settle before reading.
            std::thread::sleep(Duration::from_millis(500));
            let after = usages(r);
            sample.idle_rss_kib = before.iter().zip(&after).map(|(b, a)| (b.rss_kib, a.rss_kib)).collect();
            let worst = sample.idle_rss_kib.iter().map(|(b, a)| a.saturating_sub(*b)).max().unwrap_or(0);
            sample.idle_bytes_per_conn = Some(worst as f64 * 1024.0 / open.len() as f64);
            drop(open);
        }
        Err(e) => sample.errors.push(format!("idle connections: {e}")),
    }
}

/// The backend process, stopped when dropped.
struct Backend(Child);

impl Backend {
    fn start(addr: SocketAddr, work: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(work.join("backend.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["backend", "--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while load::connect(addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the backend did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self(child))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every process of the run holds up to `idle` sockets (an L4 sidecar twice that); the systems
/// inherit the limit. Returns the limit in force.
fn raise_fd_limit(idle: usize) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = idle as u64 * 2 + 4096;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        || Path::new("/usr/sbin").join(program).is_file()
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// CPU model, core count, memory and kernel.
fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse::<u64>()
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    vec![
        ("cpu".into(), model),
        ("cores".into(), cores.to_string()),
        ("memory".into(), format!("{:.1} GiB", mem as f64 / 1024.0 / 1024.0)),
        ("kernel".into(), kernel),
    ]
}
