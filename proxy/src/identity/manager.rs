//! Keeps the workload's certificate current and publishes a [`MeshTls`] per certificate.
//!
//! From the CA: a first certificate with the bootstrap token, then renewal over mutual TLS at half
//! life plus a little jitter. When the CA cannot be reached the current certificate stays in use
//! and renewal is retried with capped exponential backoff; only at expiry does the sidecar fail
//! closed (publish `None`, so handshakes are refused and readiness drops). From files: reloaded
//! when they change. The trust bundle file is reloaded when it changes, in both modes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keycard_config::pem::{certs_from_file, certs_from_pem, key_from_file, key_from_pem};
use keycard_config::sidecar::IdentitySource;
use keycard_config::svid::TrustBundle;
use keycard_config::{SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{CaClient, Credential, new_key_and_csr};
use crate::metrics::ProxyMetrics;
use crate::tls::MeshTls;

pub type TlsWatch = watch::Receiver<Option<Arc<MeshTls>>>;

/// Retry delays after a failed renewal: 1 s doubling to 30 s, each with up to 20% jitter.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct CertManager {
    source: IdentitySource,
    id: SpiffeId,
    trust_domain: TrustDomain,
    metrics: ProxyMetrics,
    poll: Duration,
    tx: watch::Sender<Option<Arc<MeshTls>>>,
}

impl CertManager {
    pub fn new(
        source: IdentitySource,
        id: SpiffeId,
        metrics: ProxyMetrics,
        poll: Duration,
    ) -> (Self, TlsWatch) {
        let (tx, rx) = watch::channel(None);
        let trust_domain = id.trust_domain();
        (Self { source, id, trust_domain, metrics, poll, tx }, rx)
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        match self.source.clone() {
            IdentitySource::Files { cert, key, bundle } => self.run_files(&cert, &key, &bundle).await,
            IdentitySource::Ca { url, token_file, bundle, ttl } => {
                self.run_ca(&url, &token_file, &bundle, ttl).await;
            }
        }
    }

    fn publish(&self, tls: Option<MeshTls>) {
        if let Some(t) = &tls {
            self.metrics.cert_expiry.set(t.not_after as f64);
            info!(src.identity = %t.id, not_after = t.not_after, "certificate in use");
        }
        self.tx.send_replace(tls.map(Arc::new));
    }

    fn load_bundle(&self, path: &Path) -> Result<Arc<TrustBundle>, String> {
        let roots = certs_from_file(path).map_err(|e| e.to_string())?;
        TrustBundle::new(self.trust_domain.clone(), roots)
            .map(Arc::new)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    async fn run_files(self, cert: &Path, key: &Path, bundle: &Path) {
        let files = [cert.to_owned(), key.to_owned(), bundle.to_owned()];
        let mut seen = None;
        loop {
            let stamp = stamps(&files);
            if Some(&stamp) != seen.as_ref() {
                seen = Some(stamp);
                let loaded = (|| -> Result<MeshTls, String> {
                    let chain = certs_from_file(cert).map_err(|e| e.to_string())?;
                    let key = key_from_file(key).map_err(|e| e.to_string())?;
                    MeshTls::build(chain, key, self.load_bundle(bundle)?, &self.id).map_err(|e| e.to_string())
                })();
                match loaded {
                    Ok(tls) => self.publish(Some(tls)),
                    Err(e) => warn!(error = %e, "certificate files unusable; keeping what is in use"),
                }
            }
            self.expire_if_due();
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Fails closed once the certificate in use has expired.
    fn expire_if_due(&self) {
        let expired = self.tx.borrow().as_ref().is_some_and(|t| t.not_after <= now());
        if expired {
            warn!("certificate expired; refusing mesh traffic until a new one arrives");
            self.tx.send_replace(None);
        }
    }

    async fn run_ca(self, url: &str, token_file: &Path, bundle_path: &Path, ttl: Duration) {
        let mut backoff = BACKOFF_START;
        let mut bundle_stamp = None;
        let mut bundle: Option<Arc<TrustBundle>> = None;
        // Renewal counts from when we received the certificate (NotBefore is backdated for
        // skew), jitter drawn once per certificate.
        let mut due = 0;
        // After a failure, the next attempt waits for this; bundle and expiry checks go on meanwhile.
        let mut retry_at = tokio::time::Instant::now();
        loop {
            // The bundle first: the CA client needs it, and a changed one rebuilds our configs.
            let stamp = stamps(&[bundle_path.to_owned()]);
            if Some(&stamp) != bundle_stamp.as_ref() {
                match self.load_bundle(bundle_path) {
                    Ok(b) => {
                        bundle_stamp = Some(stamp);
                        let current = self.tx.borrow().clone();
                        if let Some(cur) = current {
                            match MeshTls::build(cur.chain.clone(), cur.key.clone_key(), b.clone(), &self.id)
                            {
                                Ok(tls) => {
                                    tls.renew_at.store(due, std::sync::atomic::Ordering::Relaxed);
                                    self.publish(Some(tls));
                                }
                                Err(e) => {
                                    warn!(error = %e, "new trust bundle does not verify our certificate; keeping the old bundle")
                                }
                            }
                        }
                        bundle = Some(b);
                    }
                    Err(e) => warn!(error = %e, "trust bundle unusable; keeping the one in use"),
                }
            }
            let Some(b) = bundle.clone() else {
                tokio::time::sleep(self.poll).await;
                continue;
            };
            self.expire_if_due();
            let current = self.tx.borrow().clone();
            if current.is_none() {
                due = 0;
            }
            let backing_off = retry_at.saturating_duration_since(tokio::time::Instant::now());
            if !backing_off.is_zero() {
                tokio::time::sleep(backing_off.min(self.poll)).await;
                continue;
            }
            if now() < due {
                // Wake for the renewal time or the next bundle check, whichever is first.
                let wait = Duration::from_secs(u64::try_from(due - now()).unwrap_or(0)).min(self.poll);
                tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
                continue;
            }
            match self.fetch(url, token_file, &b, ttl, current.as_deref()).await {
                Ok(tls) => {
                    self.metrics.renewals.with_label_values(&["success"]).inc();
                    due = renew_at(now(), tls.not_after);
                    tls.renew_at.store(due, std::sync::atomic::Ordering::Relaxed);
                    self.publish(Some(tls));
                    backoff = BACKOFF_START;
                }
                Err(e) => {
                    self.metrics.renewals.with_label_values(&["failure"]).inc();
                    let wait = jitter(backoff, 0.2);
                    warn!(error = %e, retry_in = ?wait, "certificate request failed; keeping the current certificate");
                    retry_at = tokio::time::Instant::now() + wait;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn fetch(
        &self,
        url: &str,
        token_file: &Path,
        bundle: &Arc<TrustBundle>,
        ttl: Duration,
        current: Option<&MeshTls>,
    ) -> Result<MeshTls, String> {
        let client =
            CaClient::new(url, bundle.clone(), Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let credential = match current {
            Some(cur) => Credential::Svid { chain: cur.chain.clone(), key: cur.key.clone_key() },
            None => {
                let token = std::fs::read_to_string(token_file)
                    .map_err(|e| format!("{}: cannot read the bootstrap token: {e}", token_file.display()))?;
                Credential::Token(token.trim().to_owned())
            }
        };
        let (key, csr) = new_key_and_csr(&self.id).map_err(|e| e.to_string())?;
        let resp = client.sign(&csr, Some(ttl.as_secs()), &credential).await.map_err(|e| e.to_string())?;
        let chain: Vec<CertificateDer<'static>> =
            certs_from_pem(resp.chain.as_bytes(), "CA response").map_err(|e| e.to_string())?;
        let key: PrivateKeyDer<'static> =
            key_from_pem(key.serialize_pem().as_bytes(), "generated key").map_err(|e| e.to_string())?;
        MeshTls::build(chain, key, bundle.clone(), &self.id).map_err(|e| e.to_string())
    }
}

/// Half the remaining lifetime from `received`, plus up to 5% of it as jitter so a fleet does not
/// renew in lockstep.
fn renew_at(received: i64, not_after: i64) -> i64 {
    let life = (not_after - received).max(0);
    let jitter_secs = (life as f64 * 0.05 * random_unit()) as i64;
    received + life / 2 + jitter_secs
}

fn jitter(base: Duration, fraction: f64) -> Duration {
    base.mul_f64(1.0 + fraction * random_unit())
}

fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

fn now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Modification time and length of each file: a change of either means reload.
pub(crate) fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}
