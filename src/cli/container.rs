//! Small commands for running keycard as containers: `keycard pause` holds a pod's network
//! namespace, `keycard healthcheck` is the image's HEALTHCHECK.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The readiness URL to ask (a sidecar's `readiness` address, or a CA's /healthz).
    #[arg(long, default_value = "http://127.0.0.1:15021/healthz/ready")]
    url: String,
}

/// Waits for SIGTERM or Ctrl-C, doing nothing: the owner of a network namespace that the
/// sidecar, the app and the init step join (Kubernetes' pause container).
pub fn pause() -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(super::ca::shutdown_signal());
    Ok(ExitCode::SUCCESS)
}

/// Exit 0 when `url` answers 2xx within 3 s, 1 otherwise (with the reason on stderr).
pub fn healthcheck(a: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = crate::bookinfo::client();
        let asked = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            crate::bookinfo::get(&client, &a.url, &[]),
        )
        .await
        .context("no answer within 3s")?;
        match asked {
            Ok((status, _)) if status.is_success() => Ok(ExitCode::SUCCESS),
            Ok((status, body)) => {
                eprintln!(
                    "keycard healthcheck: {} {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&body).trim()
                );
                Ok(ExitCode::FAILURE)
            }
            Err(e) => {
                eprintln!("keycard healthcheck: {}: {e}", a.url);
                Ok(ExitCode::FAILURE)
            }
        }
    })
}
