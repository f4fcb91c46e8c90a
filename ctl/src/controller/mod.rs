//! The control daemon: an async HTTP/JSON server (tokio + axum) over the
//! cluster state in [`cluster::Cluster`].
//!
//! Nodes push a heartbeat with their [`NodeReport`](crate::api::NodeReport)
//! every interval; the controller keeps the latest report per node, declares a
//! node down after `missed_heartbeats` silent intervals, and serves the views
//! in [`crate::api`]. It never touches a block.

pub mod cluster;
pub mod events;
mod http;
pub mod metrics;
mod nodeops;
pub mod owed;
pub mod policy;
pub mod rightsize;
mod scale;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{EventsResponse, JobEntry, NodeState, StatusResponse};
use cluster::Cluster;
use policy::Policy;

use crate::provision::Provisioner;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;
/// The longest a node may stay silent before it is declared down
/// (heartbeat interval × missed heartbeats): a day.
pub const MAX_DOWN_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How long a job's capability token is valid: a day, longer than the jobs
/// Pocket serves; `POST /v1/jobs/{name}/token` hands out a fresh one.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest request body accepted; a node report with thousands of jobs fits.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Starts and stops nodes for `scale`, `drain` and registrations that
    /// do not fit; without one, the cluster is the nodes that report.
    pub provisioner: Option<Arc<dyn Provisioner>>,
    /// How long a registration or a scale-up waits for new nodes' first heartbeats.
    pub node_start_timeout: Duration,
    /// Nodes rightsizing never drains below, unless the policy file says
    /// otherwise (`pollen up --nodes N` sets N).
    pub min_nodes: usize,
    /// Where the HTTP API listens; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The interval at which nodes are expected to send heartbeats.
    pub heartbeat: Duration,
    /// Silent intervals after which a node is declared down.
    pub missed_heartbeats: u32,
    /// Request bodies larger than this are refused with 413.
    pub max_body: usize,
    /// Hint mapping and packing constants (`--policy FILE`).
    pub policy: Policy,
    /// When set, every request needs `Authorization: Bearer TOKEN`.
    pub admin_token: Option<String>,
    /// Serve https with this configuration (`--tls-cert/--tls-key`).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// The cluster secret shared with the nodes: registration returns a
    /// capability token, and the controller's own node calls present one.
    pub cluster_secret: Option<dataplane::auth::Secret>,
    /// Lifetime of the tokens handed out for jobs.
    pub token_ttl: Duration,
    /// Where the controller keeps the frees it owes nodes (`owed-frees.json`)
    /// across its restarts; `None`: in memory only.
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            provisioner: None,
            node_start_timeout: Duration::from_secs(30),
            min_nodes: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            heartbeat: DEFAULT_HEARTBEAT,
            missed_heartbeats: DEFAULT_MISSED_HEARTBEATS,
            max_body: DEFAULT_MAX_BODY,
            policy: Policy::default(),
            admin_token: None,
            tls: None,
            cluster_secret: None,
            token_ttl: DEFAULT_TOKEN_TTL,
            data_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("invalid controller configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("controller server failed")]
    Serve(#[source] std::io::Error),
}

/// State shared by the HTTP handlers, the sweeper and [`ControllerHandle`]s.
pub(crate) struct Shared {
    cluster: Mutex<Cluster>,
    started: Instant,
    max_body: usize,
    /// Counts accepted heartbeats, so waiters wake when one arrives.
    accepted: watch::Sender<u64>,
    provisioner: Option<Arc<dyn Provisioner>>,
    node_start_timeout: Duration,
    /// One scaling operation (scale, drain, a registration that starts nodes) at a time.
    scaling: tokio::sync::Mutex<()>,
    min_nodes: usize,
    admin_token: Option<String>,
    cluster_secret: Option<dataplane::auth::Secret>,
    token_ttl: Duration,
    /// When rightsizing last looked, and last acted.
    rightsized: Mutex<(Option<Instant>, Option<Instant>)>,
}

impl Shared {
    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        // The lock is never held across an await or a panic-prone call; if a
        // handler did panic while holding it, the state is still consistent
        // (every mutation is a single assignment), so recover it.
        self.cluster.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the cluster after declaring down the nodes that are due,
    /// so every read sees exact states without waiting for the sweeper.
    fn read<T>(&self, f: impl FnOnce(&Cluster, Instant) -> T) -> T {
        let now = Instant::now();
        let mut c = self.cluster();
        c.sweep(now);
        f(&c, now)
    }

    /// Waits until every one of `ids` is up; false on timeout.
    async fn wait_for_nodes(&self, ids: &[String], timeout: Duration) -> bool {
        let mut accepted = self.accepted.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let all_up = || {
            let c = self.cluster();
            ids.iter().all(|id| c.state(id) == Some(NodeState::Up))
        };
        loop {
            if all_up() {
                return true;
            }
            match tokio::time::timeout_at(deadline, accepted.changed()).await {
                Ok(Ok(())) => continue,
                // Timed out, or the controller is gone (sender dropped).
                Ok(Err(_)) | Err(_) => return all_up(),
            }
        }
    }

    fn status(&self) -> StatusResponse {
        self.read(|c, now| {
            let nodes = c.summaries(now);
            let up = nodes.iter().filter(|n| n.state == NodeState::Up).count();
            StatusResponse {
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_ms: self.started.elapsed().as_millis() as u64,
                heartbeat_ms: c.heartbeat_interval().as_millis() as u64,
                missed_heartbeats: c.missed_heartbeats(),
                nodes_up: up,
                nodes_down: nodes.len() - up,
                nodes,
                tiers: c.tier_totals(),
                jobs: c.job_count(),
                owed_frees: c.owed_frees(),
            }
        })
    }
}

/// A bound, not yet serving, controller.
pub struct Controller {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Controller {
    /// Validates `cfg` and binds the listener; requests queue in the
    /// listen backlog until [`Controller::serve`] runs.
    pub async fn bind(cfg: ControllerConfig) -> Result<Controller, ControllerError> {
        if cfg.heartbeat.is_zero() {
            return Err(ControllerError::Config("heartbeat interval must be positive".into()));
        }
        if cfg.missed_heartbeats == 0 {
            return Err(ControllerError::Config("missed_heartbeats must be at least 1".into()));
        }
        // The down interval is multiplied further (a down node is forgotten
        // after `FORGET_DOWN_AFTER` of them): absurd values are refused
        // here, not found as an overflow later.
        let down = cfg.heartbeat.checked_mul(cfg.missed_heartbeats);
        if down.is_none_or(|d| d > MAX_DOWN_INTERVAL) {
            return Err(ControllerError::Config(format!(
                "a node would be declared down after {} ms × {} missed heartbeats: at most {} s",
                cfg.heartbeat.as_millis(),
                cfg.missed_heartbeats,
                MAX_DOWN_INTERVAL.as_secs()
            )));
        }
        if cfg.token_ttl.is_zero() {
            return Err(ControllerError::Config("the token lifetime must be positive".into()));
        }
        if cfg.max_body < 1024 {
            return Err(ControllerError::Config("max_body must be at least 1 KiB".into()));
        }
        cfg.policy.validate().map_err(ControllerError::Config)?;
        if cfg.admin_token.as_deref().is_some_and(|t| !crate::auth::valid(t)) {
            return Err(ControllerError::Config("the admin token is malformed".into()));
        }
        let owed = owed::Owed::open(cfg.data_dir.as_deref()).map_err(ControllerError::Config)?;
        let mut cluster = Cluster::with_policy(cfg.heartbeat, cfg.missed_heartbeats, cfg.policy);
        cluster.set_owed(owed);
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ControllerError::Bind { addr: cfg.listen, source })?;
        let addr =
            listener.local_addr().map_err(|source| ControllerError::Bind { addr: cfg.listen, source })?;
        let shared = Arc::new(Shared {
            cluster: Mutex::new(cluster),
            started: Instant::now(),
            max_body: cfg.max_body,
            accepted: watch::Sender::new(0),
            provisioner: cfg.provisioner,
            node_start_timeout: cfg.node_start_timeout,
            scaling: tokio::sync::Mutex::new(()),
            min_nodes: cfg.min_nodes.max(1),
            admin_token: cfg.admin_token,
            cluster_secret: cfg.cluster_secret,
            token_ttl: cfg.token_ttl,
            rightsized: Mutex::new((None, None)),
        });
        Ok(Controller { listener, addr, shared, tls: cfg.tls })
    }

    /// The address the API listens on (with the real port if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port` (`https://` with TLS), the base URL of the API.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle { shared: self.shared.clone() }
    }

    /// Serves the API until `shutdown` completes, then finishes the requests
    /// in flight and returns.
    pub async fn serve<F>(self, shutdown: F) -> Result<(), ControllerError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let sweeper = tokio::spawn(sweep(self.shared.clone()));
        tracing::info!(addr = %self.addr, "controller listening");
        let app = http::router(self.shared);
        let served = match self.tls {
            Some(cfg) => {
                let listener =
                    crate::tls::TlsListener::new(self.listener, cfg).map_err(ControllerError::Serve)?;
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await
            }
            None => axum::serve(self.listener, app).with_graceful_shutdown(shutdown).await,
        };
        sweeper.abort();
        served.map_err(ControllerError::Serve)
    }
}

/// Declares nodes down on time even when nobody reads the API, so the log
/// (and, later, recovery) reacts to a failure within a fraction of an interval.
async fn sweep(shared: Arc<Shared>) {
    let period = {
        let c = shared.cluster();
        (c.heartbeat_interval() / 4).max(Duration::from_millis(10))
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Stopping drained nodes (a SIGTERM grace per node) and adopting jobs
    // (calls to nodes) run as tasks of their own, at most one of each at a
    // time, so the sweep itself stays on time: a dead node is declared dead
    // within a fraction of an interval whatever they wait for.
    let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
    let mut adopting: Option<tokio::task::JoinHandle<()>> = None;
    let idle = |h: &Option<tokio::task::JoinHandle<()>>| h.as_ref().is_none_or(|h| h.is_finished());
    loop {
        tick.tick().await;
        shared.cluster().sweep(Instant::now());
        if idle(&stopping) {
            let s = shared.clone();
            stopping = Some(tokio::spawn(async move { s.stop_drained().await }));
        }
        if idle(&adopting) {
            let s = shared.clone();
            adopting = Some(tokio::spawn(async move { s.adopt_jobs().await }));
        }
        shared.rightsize();
    }
}

/// Read access to a running controller from the process that embeds it.
#[derive(Clone)]
pub struct ControllerHandle {
    shared: Arc<Shared>,
}

impl ControllerHandle {
    pub fn status(&self) -> StatusResponse {
        self.shared.status()
    }

    pub fn job(&self, name: &str) -> Option<JobEntry> {
        self.shared.read(|c, _| c.job(name))
    }

    pub fn events(&self, since: u64) -> EventsResponse {
        self.shared.read(|c, _| c.events(since, usize::MAX))
    }

    /// Waits until the controller has a report from `node_id`; false on timeout.
    pub async fn wait_for_node(&self, node_id: &str, timeout: Duration) -> bool {
        self.shared.wait_for_nodes(&[node_id.to_string()], timeout).await
    }
}
