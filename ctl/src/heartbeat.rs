//! The node side of the heartbeat: a plain (non-polling) management thread
//! that POSTs the node's report to the controller every interval.
//!
//! The data-plane cores never wait on it: it only calls the report function
//! (a cheap snapshot of counters the cores publish) and does its own blocking
//! HTTP. A failed heartbeat is logged and the next one is sent on schedule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{ErrorBody, HeartbeatReply, NodeCommand, NodeReport};

/// The controller route heartbeats are posted to.
pub const PATH: &str = "/v1/nodes/heartbeat";

/// While heartbeats keep failing, how often the failure is logged again.
const REWARN_AFTER: Duration = Duration::from_secs(60);

/// How a node authenticates to the controller and checks its certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// The controller's admin token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// PEM certificate(s) to trust for an https controller (else the Web PKI roots).
    pub ca: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("controller URL `{0}` must look like http://host:port or https://host:port")]
    BadUrl(String),
    #[error("controller TLS: {0}")]
    Tls(String),
    #[error("heartbeat interval must be positive")]
    ZeroInterval,
    #[error("cannot start the heartbeat thread: {0}")]
    Spawn(std::io::Error),
}

/// Counters of a running heartbeat thread.
#[derive(Debug, Default)]
pub struct HeartbeatStats {
    sent: AtomicU64,
    failed: AtomicU64,
}

impl HeartbeatStats {
    /// Heartbeats the controller accepted.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Heartbeats that failed (unreachable controller, error reply).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Owns the heartbeat thread. [`HeartbeatHandle::stop`] (or dropping the
/// handle) stops it and waits for it to exit.
pub struct HeartbeatHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<HeartbeatStats>,
}

impl HeartbeatHandle {
    pub fn stats(&self) -> &HeartbeatStats {
        &self.stats
    }

    /// Stops the thread and waits for it; a heartbeat in flight finishes or
    /// times out first (at most one interval, clamped to 0.2..5 s).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // Dropping the sender disconnects the channel, which wakes the thread.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("heartbeat thread panicked");
            }
        }
    }
}

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Starts a thread that sends `report()` to `controller_url` (e.g.
/// `http://127.0.0.1:7070`) right away and then every `interval`, on a fixed
/// schedule that does not drift with the time each request takes.
pub fn spawn<F>(
    report: F,
    controller_url: &str,
    interval: Duration,
) -> Result<HeartbeatHandle, HeartbeatError>
where
    F: Fn() -> NodeReport + Send + 'static,
{
    spawn_with_commands(
        report,
        |c: &NodeCommand| tracing::warn!(?c, "no handler for a controller command"),
        controller_url,
        interval,
        &ClientAuth::default(),
    )
}

/// As [`spawn`], and runs `apply` on the heartbeat thread for every command
/// that comes back on a reply, in order.
pub fn spawn_with_commands<F, A>(
    report: F,
    apply: A,
    controller_url: &str,
    interval: Duration,
    auth: &ClientAuth,
) -> Result<HeartbeatHandle, HeartbeatError>
where
    F: Fn() -> NodeReport + Send + 'static,
    A: Fn(&NodeCommand) + Send + 'static,
{
    if interval.is_zero() {
        return Err(HeartbeatError::ZeroInterval);
    }
    let base = controller_url.trim_end_matches('/');
    let valid = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
    if !valid {
        return Err(HeartbeatError::BadUrl(controller_url.to_string()));
    }
    let url = format!("{base}{PATH}");
    let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
    let tls = crate::tls::client_config(auth.ca.as_deref()).map_err(HeartbeatError::Tls)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .tls_config(tls)
        .build()
        .into();
    let bearer = auth.token.as_deref().map(crate::auth::bearer);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let stats = Arc::new(HeartbeatStats::default());
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("pollen-heartbeat".into())
        .spawn(move || run(report, apply, (agent, bearer), url, interval, stop_rx, &thread_stats))
        .map_err(HeartbeatError::Spawn)?;
    Ok(HeartbeatHandle { stop: Some(stop_tx), thread: Some(thread), stats })
}

fn run<F, A>(
    report: F,
    apply: A,
    (agent, bearer): (ureq::Agent, Option<String>),
    url: String,
    interval: Duration,
    stop: mpsc::Receiver<()>,
    stats: &HeartbeatStats,
) where
    F: Fn() -> NodeReport,
    A: Fn(&NodeCommand),
{
    let mut next = Instant::now();
    // When the current run of failures was last warned about; None while healthy.
    let mut failing_warned: Option<Instant> = None;
    let mut warned_interval = false;
    loop {
        match send(&agent, bearer.as_deref(), &url, &report()) {
            Ok(reply) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                for c in &reply.commands {
                    apply(c);
                }
                if failing_warned.take().is_some() {
                    tracing::info!(%url, "heartbeats reach the controller again");
                }
                if !warned_interval && interval.as_millis() as u64 > reply.heartbeat_ms {
                    tracing::warn!(
                        interval_ms = interval.as_millis() as u64,
                        controller_ms = reply.heartbeat_ms,
                        "heartbeat interval is longer than the controller expects: it may declare this node down"
                    );
                    warned_interval = true;
                }
            }
            Err(e) => {
                let n = stats.failed.fetch_add(1, Ordering::Relaxed) + 1;
                // Warn when the trouble starts and then once a minute, not every interval.
                if failing_warned.is_none_or(|at| at.elapsed() >= REWARN_AFTER) {
                    tracing::warn!(%url, error = %e, failures = n, "heartbeat failed; retrying");
                    failing_warned = Some(Instant::now());
                } else {
                    tracing::debug!(%url, error = %e, failures = n, "heartbeat failed");
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next <= now {
            // The request took longer than an interval: skip the missed slots.
            let behind = now - next;
            let skip = behind.as_nanos() / interval.as_nanos() + 1;
            next += interval * skip.min(u32::MAX as u128) as u32;
        }
        match stop.recv_timeout(next - now) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::debug!("heartbeat thread stopped");
}

fn send(
    agent: &ureq::Agent,
    bearer: Option<&str>,
    url: &str,
    report: &NodeReport,
) -> Result<HeartbeatReply, String> {
    let mut req = agent.post(url);
    if let Some(b) = bearer {
        req = req.header("Authorization", b);
    }
    let mut resp = req.send_json(report).map_err(|e| e.to_string())?;
    let status = resp.status();
    if status.is_success() {
        return resp.body_mut().read_json::<HeartbeatReply>().map_err(|e| format!("bad reply: {e}"));
    }
    let detail = resp
        .body_mut()
        .read_json::<ErrorBody>()
        .map(|b| b.error)
        .unwrap_or_else(|_| "no error message".to_string());
    Err(format!("controller answered {status}: {detail}"))
}
