//! The sidecar assembled: listeners bound, certificate manager, policy (watched, SIGHUP-able),
//! inbound and outbound loops, admin/metrics/readiness servers, and drain on shutdown.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use keycard_config::SpiffeId;
use keycard_config::policy::model::MtlsMode;
use keycard_config::policy::{LoadError, PolicySet, WorkloadPolicy};
use keycard_config::sidecar::{HttpSettings, Limits, SidecarConfig};
use prometheus::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::conns::{ConnFacts, LiveConns};
use crate::identity::{CertManager, TlsWatch};
use crate::metrics::ProxyMetrics;
use crate::outbound::Route;

mod tcp;
pub use tcp::{Forwarding, TcpCounters};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error("the workload identity is invalid: {0}")]
    Identity(#[from] keycard_config::IdError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// One refused handshake, for `/debug/handshake_failures`.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub at: String,
    pub direction: Direction,
    pub peer: SocketAddr,
    pub reason: &'static str,
    pub detail: String,
}

/// Plaintext sources seen on PERMISSIVE/DISABLE ports (the census before going STRICT).
#[derive(Debug, Clone, Serialize)]
pub struct CensusEntry {
    pub connections: u64,
    pub last_seen: String,
}

const FAILURES_KEPT: usize = 64;
const CENSUS_MAX_SOURCES: usize = 1024;

/// State every connection task reads.
pub struct Shared {
    pub id: SpiffeId,
    pub tls: TlsWatch,
    pub policy: watch::Receiver<Arc<WorkloadPolicy>>,
    pub metrics: ProxyMetrics,
    pub limits: Limits,
    pub http: HttpSettings,
    pub jwks: crate::http::authn::JwksCache,
    pub live: Arc<LiveConns>,
    pub tracker: TaskTracker,
    /// Cancelled when a drain starts: HTTP connections finish in-flight requests and close.
    pub stopping: CancellationToken,
    /// Cancelled when a drain runs out of time: closes every live connection. Only shutdown cancels
    /// it. Connections the live registry tracks (inbound, closed alone when a policy reload denies
    /// them) wait on child tokens; every other connection waits on a clone of it (a child costs an
    /// allocation and a lock on the drain each).
    pub drain: CancellationToken,
    slots: Arc<Semaphore>,
    failures: Mutex<VecDeque<Failure>>,
    census: Mutex<BTreeMap<IpAddr, CensusEntry>>,
    /// Who connected and what was decided, for `keycard status` and `policy suggest`.
    pub observed: crate::observe::Observed,
    /// Kernel TLS for mesh connections: the suites the start-up probe found, or why not.
    pub kernel_tls: Result<crate::ktls::KernelTls, crate::ktls::Refused>,
    /// `tls.user_records: on`: mesh connections the kernel does not take move to keycard's own
    /// record layer (`crate::records`).
    pub user_records: bool,
}

impl Shared {
    /// A slot for a new connection, or `None` (closed at once, counted) when at the cap.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.refused.with_label_values(&["overloaded"]).inc();
        }
        permit
    }

    pub fn authorize(&self, facts: &ConnFacts) -> keycard_config::policy::authz::Decision {
        self.authorize_attrs(&crate::inbound::attributes(facts))
    }

    /// Decides with the policy in force and counts the decision (and audit / dry-run evidence).
    pub fn authorize_attrs(
        &self,
        attrs: &keycard_config::policy::authz::Attributes<'_>,
    ) -> keycard_config::policy::authz::Decision {
        let policy = self.policy.borrow().clone();
        let decision = keycard_config::policy::authz::evaluate(&policy.authz_refs(), attrs);
        let (label, action) = match &decision {
            Ok(p) => (p.policy_label(), "allow"),
            Err(d) => (d.policy_label(), "deny"),
        };
        self.metrics.authz.with_label_values(&[&label, action, "true"]).inc();
        let evidence = match &decision {
            Ok(p) => &p.evidence,
            Err(d) => &d.evidence,
        };
        for rule in &evidence.audited {
            self.metrics.authz.with_label_values(&[&rule.to_string(), "audit", "true"]).inc();
        }
        for (policy, would_allow) in &evidence.dry_run {
            let action = if *would_allow { "allow" } else { "deny" };
            self.metrics.authz.with_label_values(&[policy, action, "false"]).inc();
        }
        decision
    }

    pub fn handshake_failed(
        &self,
        direction: Direction,
        peer: SocketAddr,
        reason: &'static str,
        detail: &str,
    ) {
        self.metrics.handshake_failures.with_label_values(&[direction.as_str(), reason]).inc();
        info!(direction = direction.as_str(), src.addr = %peer, reason, detail, "connection refused");
        if let Ok(mut f) = self.failures.lock() {
            if f.len() == FAILURES_KEPT {
                f.pop_front();
            }
            f.push_back(Failure { at: now_rfc3339(), direction, peer, reason, detail: detail.to_owned() });
        }
    }

    pub fn census(&self, peer: SocketAddr) {
        if let Ok(mut c) = self.census.lock()
            && (c.len() < CENSUS_MAX_SOURCES || c.contains_key(&peer.ip()))
        {
            let e = c.entry(peer.ip()).or_insert(CensusEntry { connections: 0, last_seen: String::new() });
            e.connections += 1;
            e.last_seen = now_rfc3339();
        }
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.failures.lock().map(|f| f.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn census_snapshot(&self) -> BTreeMap<IpAddr, CensusEntry> {
        self.census.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// A connection's long life once it is set up (HTTP serving, forwarding), on the heap and owning
/// what it uses.
pub type Serving = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Accepts until `stop`, admitting each connection under the cap and running `set_up` for it,
/// then what that returns, as a tracked task (so a drain can wait for it).
///
/// The two run one after the other in the task, and the set-up's future (detection, handshake,
/// authorization, connects: most of a connection's code) is freed before its long life starts.
/// A task is as large as its largest state: with both in one future an idle L4 connection's
/// future was 4.7 KB for its whole life, of which its long life needs 0.2 (ARCHITECTURE.md).
pub async fn accept_loop<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
    set_up: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = Option<Serving>> + Send + 'static,
{
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off a little, keep the listener.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(permit) = shared.admit() else { continue };
        // Boxed: the task holds a pointer, which the `await` consumes (and so frees the future).
        let work = Box::pin(set_up(tcp, peer));
        shared.tracker.spawn(async move {
            let _permit = permit;
            if let Some(serving) = work.await {
                serving.await;
            }
        });
    }
}

/// The reason label and a detail line for a failed TLS handshake.
pub fn classify_tls_error(e: &std::io::Error) -> (&'static str, String) {
    use rustls::{CertificateError, Error as R};
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<R>()) else {
        return ("tls_error", e.to_string());
    };
    if let Some(svid) = keycard_config::tls::svid_error(err) {
        let reason = match svid.rule() {
            "san_mismatch" => "san_mismatch",
            "trust_domain_mismatch" => "wrong_trust_domain",
            "expired" | "not_yet_valid" => "expired",
            "unknown_ca" => "unknown_ca",
            _ => "bad_svid",
        };
        return (reason, format!("{}: {svid}", svid.rule()));
    }
    let reason = match err {
        R::NoCertificatesPresented => "no_client_cert",
        R::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        R::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired"
        }
        R::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "expired",
        R::InvalidCertificate(_) => "bad_svid",
        R::AlertReceived(rustls::AlertDescription::CertificateRequired) => "no_client_cert",
        R::AlertReceived(rustls::AlertDescription::UnknownCA) => "unknown_ca",
        R::AlertReceived(rustls::AlertDescription::CertificateExpired) => "expired",
        R::AlertReceived(rustls::AlertDescription::BadCertificate) => "bad_svid",
        R::PeerIncompatible(_) => "incompatible",
        _ => "tls_error",
    };
    (reason, err.to_string())
}

fn now_rfc3339() -> String {
    keycard_config::certinfo::rfc3339(time::OffsetDateTime::now_utc())
}

/// Where each listener ended up (useful when the config says port 0).
#[derive(Debug, Clone, Serialize)]
pub struct Addrs {
    /// Ports with their own listener, in configuration order.
    pub inbound: Vec<(u16, SocketAddr)>,
    /// Upstreams with their own listener, in configuration order.
    pub outbound: Vec<SocketAddr>,
    /// The capture listeners (`capture.inbound`, `capture.outbound`).
    pub capture_inbound: Option<SocketAddr>,
    pub capture_outbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// A status line for `/config_dump` about the last policy load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyStatus {
    pub generation: u64,
    pub loaded_at: String,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// A bound, not yet running sidecar.
pub struct Sidecar {
    pub(crate) cfg: SidecarConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Registry,
    pub(crate) addrs: Addrs,
    /// One per inbound port / upstream, `None` where it is reached by capture only.
    inbound: Vec<Option<TcpListener>>,
    outbound: Vec<Option<TcpListener>>,
    capture: [Option<TcpListener>; 2],
    admin: [TcpListener; 3],
    cert_manager: CertManager,
    policy_tx: watch::Sender<Arc<WorkloadPolicy>>,
    route_txs: Vec<watch::Sender<Arc<Route>>>,
    pub(crate) status: Arc<Mutex<PolicyStatus>>,
    reload: Arc<Notify>,
    pub(crate) log_control: Option<crate::admin::LogControl>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr).await.map_err(|source| SidecarError::Bind { addr, source })
}

/// A listener where an address is configured, with the address it got (port 0 resolved).
async fn bind_optional(
    addr: Option<SocketAddr>,
) -> Result<(Option<TcpListener>, Option<SocketAddr>), SidecarError> {
    let Some(addr) = addr else { return Ok((None, None)) };
    let l = bind(addr).await?;
    let got = l.local_addr().unwrap_or(addr);
    Ok((Some(l), Some(got)))
}

impl Sidecar {
    /// Loads policy (an invalid policy stops the start), binds every listener, and prepares the
    /// certificate manager. Nothing is served until [`Sidecar::run`].
    pub async fn bind(cfg: SidecarConfig, registry: Registry) -> Result<Self, SidecarError> {
        let id = cfg.spiffe_id()?;
        let metrics = ProxyMetrics::register(&registry)?;
        let set = PolicySet::load(&cfg.policy.paths)?;
        for w in &set.warnings {
            warn!("{w}");
        }
        let wp = set.for_workload(&cfg.policy.root_namespace, &cfg.workload.namespace, &cfg.workload.labels);
        let (policy_tx, policy_rx) = watch::channel(Arc::new(wp));
        let (cert_manager, tls) =
            CertManager::new(cfg.identity.clone(), id.clone(), metrics.clone(), cfg.limits.watch_interval);
        let mut inbound = Vec::new();
        let mut in_addrs = Vec::new();
        for p in &cfg.inbound {
            let (l, addr) = bind_optional(p.listen).await?;
            in_addrs.extend(addr.map(|a| (p.port, a)));
            inbound.push(l);
        }
        let mut outbound = Vec::new();
        let mut out_addrs = Vec::new();
        let mut route_txs = Vec::new();
        for up in &cfg.outbound {
            let (l, addr) = bind_optional(up.listen).await?;
            out_addrs.extend(addr);
            outbound.push(l);
            route_txs
                .push(watch::channel(Arc::new(Route::for_upstream(up, &policy_rx.borrow().destinations))).0);
        }
        let wanted = cfg.capture.as_ref().map_or([None, None], |c| [c.inbound, c.outbound]);
        let (capture_in, capture_in_addr) = bind_optional(wanted[0]).await?;
        let (capture_out, capture_out_addr) = bind_optional(wanted[1]).await?;
        let capture = [capture_in, capture_out];
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let admin = [bind(cfg.admin).await?, bind(cfg.metrics).await?, bind(cfg.readiness).await?];
        let addrs = Addrs {
            inbound: in_addrs,
            outbound: out_addrs,
            capture_inbound: capture_in_addr,
            capture_outbound: capture_out_addr,
            admin: local(&admin[0], cfg.admin),
            metrics: local(&admin[1], cfg.metrics),
            readiness: local(&admin[2], cfg.readiness),
        };
        let user_records = cfg.tls.user_records == keycard_config::sidecar::UserRecords::On;
        let kernel_tls = crate::ktls::offer::probe_at_start(cfg.tls.kernel_offload, user_records, &metrics);
        let shared = Arc::new(Shared {
            id,
            tls,
            policy: policy_rx,
            metrics,
            limits: cfg.limits.clone(),
            http: cfg.http.clone(),
            jwks: crate::http::authn::JwksCache::default(),
            live: Arc::default(),
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            drain: CancellationToken::new(),
            slots: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            failures: Mutex::new(VecDeque::new()),
            census: Mutex::new(BTreeMap::new()),
            observed: Default::default(),
            kernel_tls,
            user_records,
        });
        let status = PolicyStatus {
            generation: 1,
            loaded_at: now_rfc3339(),
            last_error: None,
            warnings: set.warnings.clone(),
            files: set.files.clone(),
        };
        Ok(Self {
            cfg,
            shared,
            registry,
            addrs,
            inbound,
            outbound,
            capture,
            admin,
            cert_manager,
            policy_tx,
            route_txs,
            status: Arc::new(Mutex::new(status)),
            reload: Arc::new(Notify::new()),
            log_control: None,
        })
    }

    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    /// Notify this to reload policy now (what SIGHUP does).
    pub fn reload_trigger(&self) -> Arc<Notify> {
        self.reload.clone()
    }

    /// Lets `/logging` change the log filter.
    pub fn set_log_control(&mut self, control: crate::admin::LogControl) {
        self.log_control = Some(control);
    }

    /// Serves until `shutdown` completes, then drains: stops accepting, lets live connections
    /// finish for up to `limits.drain_timeout`, closes the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        self.serve(Box::pin(shutdown)).await
    }

    /// The `keycard proxy` process on `runtime`: binds the sidecar from `cfg`, reloads policy on
    /// SIGHUP, serves until `shutdown` completes. Not generic, so the runtime's scheduler loop and
    /// every task are compiled in this crate (see `serve`).
    pub fn run_process(
        runtime: &tokio::runtime::Runtime,
        cfg: SidecarConfig,
        log_control: crate::admin::LogControl,
        shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Result<(), SidecarError> {
        let result = runtime.block_on(async move {
            let mut sidecar = Sidecar::bind(cfg, Registry::new()).await?;
            sidecar.set_log_control(log_control);
            info!(addrs = ?sidecar.addrs(), "keycard sidecar listening");
            let reload = sidecar.reload_trigger();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
                while hup.recv().await.is_some() {
                    info!("SIGHUP: reloading policy");
                    reload.notify_one();
                }
            });
            sidecar.serve(shutdown).await;
            Ok(())
        });
        // What this thread held since it last parked (a runtime with one thread runs here).
        crate::logging::release();
        result
    }

    /// `run`'s body, not generic: the sidecar's tasks are compiled in this crate, at its
    /// optimization level, whatever crate starts it (the `keycard` binary crate is built for size).
    async fn serve(self, shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) {
        let stop = CancellationToken::new();
        let shared = self.shared.clone();
        let certs = tokio::spawn(self.cert_manager.run());
        let mut tasks = Vec::new();
        let ports: Vec<_> =
            self.cfg.inbound.iter().map(|p| crate::inbound::PortHandler::new(&shared, p.clone())).collect();
        for (listener, port) in self.inbound.into_iter().zip(&ports) {
            if let Some(l) = listener {
                tasks.push(tokio::spawn(crate::inbound::serve(
                    shared.clone(),
                    port.clone(),
                    l,
                    stop.clone(),
                )));
            }
        }
        let upstreams: Vec<_> = self
            .cfg
            .outbound
            .iter()
            .zip(&self.route_txs)
            .map(|(up, tx)| crate::outbound::UpstreamHandler::new(&shared, up.clone(), tx.subscribe()))
            .collect();
        for (listener, up) in self.outbound.into_iter().zip(&upstreams) {
            if let Some(l) = listener {
                tasks.push(tokio::spawn(crate::outbound::serve(shared.clone(), up.clone(), l, stop.clone())));
            }
        }
        let [capture_in, capture_out] = self.capture;
        if let Some(l) = capture_in {
            tasks.push(tokio::spawn(crate::capture::serve_inbound(shared.clone(), ports, l, stop.clone())));
        }
        if let Some(l) = capture_out {
            let policy = self.cfg.capture.as_ref().map(|c| c.outbound_policy).unwrap_or_default();
            let serve = crate::capture::serve_outbound(shared.clone(), upstreams, policy, l, stop.clone());
            tasks.push(tokio::spawn(serve));
        }
        let view = Arc::new(crate::admin::View {
            cfg: self.cfg.clone(),
            shared: shared.clone(),
            registry: self.registry.clone(),
            status: self.status.clone(),
            log_control: self.log_control.clone(),
            routes: self.route_txs.iter().map(watch::Sender::subscribe).collect(),
        });
        let [admin, metrics, ready] = self.admin;
        tasks.push(tokio::spawn(crate::admin::serve(
            admin,
            view.clone(),
            crate::admin::Port::Admin,
            stop.clone(),
        )));
        tasks.push(tokio::spawn(crate::admin::serve(
            metrics,
            view.clone(),
            crate::admin::Port::Metrics,
            stop.clone(),
        )));
        tasks.push(tokio::spawn(crate::admin::serve(
            ready,
            view.clone(),
            crate::admin::Port::Readiness,
            stop.clone(),
        )));
        let reloader = Reloader {
            cfg: self.cfg.clone(),
            shared: shared.clone(),
            policy_tx: self.policy_tx,
            route_txs: self.route_txs,
            status: self.status.clone(),
        };
        let watcher = tokio::spawn(reloader.watch(self.reload.clone()));

        shutdown.await;
        info!(live = shared.live.len(), "draining");
        stop.cancel();
        shared.stopping.cancel();
        watcher.abort();
        shared.tracker.close();
        if tokio::time::timeout(shared.limits.drain_timeout, shared.tracker.wait()).await.is_err() {
            warn!(live = shared.live.len(), "drain deadline passed; closing the rest");
            shared.drain.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), shared.tracker.wait()).await;
        }
        certs.abort();
        for t in tasks {
            let _ = t.await;
        }
        info!("sidecar stopped");
    }
}

struct Reloader {
    cfg: SidecarConfig,
    shared: Arc<Shared>,
    policy_tx: watch::Sender<Arc<WorkloadPolicy>>,
    route_txs: Vec<watch::Sender<Arc<Route>>>,
    status: Arc<Mutex<PolicyStatus>>,
}

impl Reloader {
    /// Reloads when a policy file changes (polled) or `trigger` is notified.
    async fn watch(self, trigger: Arc<Notify>) {
        let mut seen = self.stamp();
        loop {
            tokio::select! {
                () = trigger.notified() => {}
                () = tokio::time::sleep(self.shared.limits.watch_interval) => {
                    let now = self.stamp();
                    if now == seen {
                        continue;
                    }
                }
            }
            seen = self.stamp();
            self.reload();
        }
    }

    /// Paths, modification times and sizes of the policy files (directories listed afresh).
    fn stamp(&self) -> (Vec<PathBuf>, Vec<Option<(SystemTime, u64)>>) {
        let mut files = Vec::new();
        for p in &self.cfg.policy.paths {
            match std::fs::read_dir(p) {
                Ok(entries) => files.extend(entries.filter_map(Result::ok).map(|e| e.path())),
                Err(_) => files.push(p.clone()),
            }
        }
        files.sort();
        let stamps = crate::identity::stamps(&files);
        (files, stamps)
    }

    fn reload(&self) {
        let set = match PolicySet::load(&self.cfg.policy.paths) {
            Ok(set) => set,
            Err(e) => {
                self.shared.metrics.policy_reloads.with_label_values(&["error"]).inc();
                warn!(error = %e, "policy reload rejected; the previous policy stays in force");
                if let Ok(mut s) = self.status.lock() {
                    s.last_error = Some(e.to_string());
                }
                return;
            }
        };
        let wp = Arc::new(set.for_workload(
            &self.cfg.policy.root_namespace,
            &self.cfg.workload.namespace,
            &self.cfg.workload.labels,
        ));
        self.policy_tx.send_replace(wp.clone());
        for (up, tx) in self.cfg.outbound.iter().zip(&self.route_txs) {
            tx.send_replace(Arc::new(Route::for_upstream(up, &wp.destinations)));
        }
        let refs = wp.authz_refs();
        let closed = self.shared.live.close_denied(|facts| {
            if facts.principal.is_none() && wp.peer_auth.mode_for(facts.port).mode == MtlsMode::Strict {
                return Some("peer_authentication".to_owned());
            }
            if facts.http {
                return None;
            }
            crate::inbound::decide(&refs, facts).err().map(|d| d.policy_label())
        });
        for policy in &closed {
            self.shared.metrics.closed_by_policy.with_label_values(&[policy]).inc();
        }
        self.shared.metrics.policy_reloads.with_label_values(&["success"]).inc();
        if let Ok(mut s) = self.status.lock() {
            s.generation += 1;
            s.loaded_at = now_rfc3339();
            s.last_error = None;
            s.warnings = set.warnings.clone();
            s.files = set.files.clone();
        }
        info!(closed = closed.len(), "policy reloaded");
    }
}
