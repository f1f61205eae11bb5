//! `keycard proxy --config sidecar.yaml`: the sidecar. SIGHUP reloads policy; SIGTERM or Ctrl-C
//! drains and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use keycard_config::sidecar::SidecarConfig;
use keycard_proxy::Sidecar;

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The sidecar configuration file (see deploy/examples/sidecar.yaml).
    #[arg(long, short)]
    config: PathBuf,
    /// Threads that carry traffic. 1 runs the whole sidecar on one thread: no work stealing or
    /// cross-thread wake-ups, the least memory. More spread a busy sidecar over cores.
    #[arg(long, env = "KEYCARD_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
}

pub fn run(a: ProxyArgs, log_control: keycard_proxy::admin::LogControl) -> anyhow::Result<ExitCode> {
    let cfg = SidecarConfig::load(&a.config)?;
    let mut builder = if a.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(a.workers.into());
        b
    };
    // Each thread's log lines (an access line per request) are written together when it parks.
    builder.on_thread_park(keycard_proxy::logging::flush).on_thread_stop(keycard_proxy::logging::release);
    let runtime = builder.enable_all().build().context("cannot start the runtime")?;
    Sidecar::run_process(&runtime, cfg, log_control, Box::pin(super::ca::shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}
