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
}

pub fn run(a: ProxyArgs, log_control: keycard_proxy::admin::LogControl) -> anyhow::Result<ExitCode> {
    let cfg = SidecarConfig::load(&a.config)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    runtime.block_on(async {
        let mut sidecar = Sidecar::bind(cfg, prometheus::Registry::new()).await?;
        sidecar.set_log_control(log_control);
        let addrs = sidecar.addrs().clone();
        tracing::info!(?addrs, "keycard sidecar listening");
        let reload = sidecar.reload_trigger();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading policy");
                reload.notify_one();
            }
        });
        sidecar.run(super::ca::shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}
