//! Provisioners start and stop storage nodes for the controller's scaling
//! decisions. The trait is narrow (start, stop, list) so that a Kubernetes
//! provisioner can implement it later; [`LocalProvisioner`] runs
//! `pollen node` processes on this machine.
//!
//! Calls block (process start-up, waiting for an exit): the controller runs
//! them with `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a stopped node may take to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// In `dir/nodes/`: the index the next new node gets, kept across restarts.
pub const NEXT_INDEX_FILE: &str = "next-index";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot start node {node_id}: {reason}")]
    Start { node_id: String, reason: String },
    #[error("node {0} was not started by this provisioner")]
    Unknown(String),
    #[error("stopping node {node_id}: {reason}")]
    Stop { node_id: String, reason: String },
    #[error("the provisioner already runs {0} nodes, its limit")]
    Full(usize),
}

/// A node a provisioner started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionedNode {
    pub node_id: String,
    /// The process id, for a local node.
    pub pid: Option<u32>,
    /// Where the node's files and log are, for a local node.
    pub dir: Option<PathBuf>,
    /// False once the process has exited on its own.
    pub running: bool,
}

pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// Starts one storage node that reports to the controller; returns at
    /// once, before its first heartbeat.
    fn start_node(&self) -> Result<ProvisionedNode, ProvisionError>;
    /// Stops a node this provisioner started and waits for it to exit.
    fn stop_node(&self, node_id: &str) -> Result<(), ProvisionError>;
    /// The nodes this provisioner started and has not stopped.
    fn list(&self) -> Vec<ProvisionedNode>;
    /// The most nodes it runs, if it has a limit.
    fn limit(&self) -> Option<usize> {
        None
    }
}

/// Settings of [`LocalProvisioner`].
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The `pollen` binary.
    pub pollen: PathBuf,
    /// Node `i` (number i + 1) lives in `dir/nodes/node-i/` (its log
    /// `node.log`, its metadata log under `meta/`).
    pub dir: PathBuf,
    /// Where nodes send heartbeats; see [`LocalProvisioner::set_controller_url`].
    pub controller_url: String,
    pub heartbeat_ms: u64,
    /// Further `pollen node` flags (cores, DRAM, block size, ...); the
    /// provisioner sets `--node-id`, `--port 0`, `--controller` and
    /// `--heartbeat-ms` itself.
    pub node_args: Vec<String>,
    /// Nodes it runs at most.
    pub max_nodes: usize,
    /// Pin node `i`'s cores from CPU `i * cores` on (else `--no-pin`).
    pub pin: bool,
    pub cores: usize,
    /// Nodes `0..metadata_nodes` run `--role metadata`, the later ones
    /// `--role storage`; 0: every node runs `both` (no `--role`).
    pub metadata_nodes: usize,
}

impl LocalConfig {
    /// The `--role` of node `index`, if it gets one.
    pub fn role_of(&self, index: usize) -> Option<dataplane::node::Role> {
        use dataplane::node::Role;
        match self.metadata_nodes {
            0 => None,
            k if index < k => Some(Role::Metadata),
            _ => Some(Role::Storage),
        }
    }
}

/// Starts `pollen node` processes on this machine, on free ports.
#[derive(Debug)]
pub struct LocalProvisioner {
    cfg: LocalConfig,
    /// Index of the next node: ids and node numbers are never reused, since
    /// objects may still name a stopped node's blocks.
    next: std::sync::atomic::AtomicUsize,
    /// The next index an earlier run on this directory would have used
    /// (`dir/nodes/next-index`); see [`LocalProvisioner::resume_numbering`].
    floor: usize,
    url: Mutex<String>,
    children: Mutex<BTreeMap<String, (Child, PathBuf)>>,
}

impl LocalProvisioner {
    pub fn new(cfg: LocalConfig) -> LocalProvisioner {
        let url = Mutex::new(cfg.controller_url.clone());
        let floor = std::fs::read_to_string(cfg.dir.join("nodes").join(NEXT_INDEX_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
            .unwrap_or(0);
        LocalProvisioner {
            cfg,
            next: std::sync::atomic::AtomicUsize::new(0),
            floor,
            url,
            children: Mutex::new(BTreeMap::new()),
        }
    }

    /// New nodes from now on get indices past every one an earlier run on
    /// this directory used. `pollen up` starts its first nodes (indices 0,
    /// 1, ...: the same nodes on their data directories again) before
    /// calling it, so a node started later never takes the id and number of
    /// a node stopped before the restart.
    pub fn resume_numbering(&self) {
        self.next.fetch_max(self.floor, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps `next` in `dir/nodes/next-index` (a temporary file, synced, renamed).
    fn save_next(&self, next: usize) -> std::io::Result<()> {
        use std::io::Write;
        let dir = self.cfg.dir.join("nodes");
        std::fs::create_dir_all(&dir)?;
        let (path, tmp) = (dir.join(NEXT_INDEX_FILE), dir.join(format!("{NEXT_INDEX_FILE}.tmp")));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(next.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    }

    /// Sets the controller URL nodes report to, once the controller's port
    /// is known (it may be bound on port 0).
    pub fn set_controller_url(&self, url: &str) {
        *self.url.lock().unwrap_or_else(|p| p.into_inner()) = url.to_string();
    }

    fn children(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Child, PathBuf)>> {
        // Every mutation is a single insert or remove: a poisoned map is consistent.
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every node it started (on shutdown).
    pub fn stop_all(&self) {
        let ids: Vec<String> = self.children().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.stop_node(&id) {
                tracing::warn!(error = %e, "stopping a local node");
            }
        }
    }
}

impl Provisioner for LocalProvisioner {
    fn start_node(&self) -> Result<ProvisionedNode, ProvisionError> {
        let url = self.url.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut children = self.children();
        // A node that exited on its own (crashed) no longer counts: its
        // process is reaped here, and it stays listed (not running) until
        // the controller forgets it.
        let running =
            children.values_mut().map(|(c, _)| c.try_wait()).filter(|w| matches!(w, Ok(None))).count();
        if running >= self.cfg.max_nodes {
            return Err(ProvisionError::Full(self.cfg.max_nodes));
        }
        let index = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.save_next((index + 1).max(self.floor)) {
            return Err(ProvisionError::Start {
                node_id: format!("node-{index}"),
                reason: format!("keeping the next node index in {}: {e}", self.cfg.dir.display()),
            });
        }
        // Node numbers are 16 bits; 0 means "not numbered".
        let Ok(number) = u16::try_from(index + 1) else {
            return Err(ProvisionError::Full(u16::MAX as usize));
        };
        let node_id = format!("node-{index}");
        let err = |reason: String| ProvisionError::Start { node_id: node_id.clone(), reason };
        // Absolute: the node runs in this directory, and a relative
        // `--data-dir` would then name one below it.
        let dir = std::path::absolute(self.cfg.dir.join("nodes").join(&node_id))
            .map_err(|e| err(format!("the node's directory: {e}")))?;
        if url.is_empty() {
            return Err(err("no controller URL to report to".into()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let log_path = dir.join("node.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| err(format!("creating {}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(|e| err(format!("{}: {e}", log_path.display())))?;
        let role: Vec<String> =
            self.cfg.role_of(index).map(|r| vec!["--role".to_string(), r.to_string()]).unwrap_or_default();
        let pinning = if self.cfg.pin {
            vec!["--cpu-offset".to_string(), index.saturating_mul(self.cfg.cores).to_string()]
        } else {
            vec!["--no-pin".to_string()]
        };
        let child = Command::new(&self.cfg.pollen)
            .arg("node")
            .args(&self.cfg.node_args)
            .args(&pinning)
            .args(&role)
            .args(["--node-id", &node_id, "--port", "0", "--controller", &url])
            .args(["--heartbeat-ms", &self.cfg.heartbeat_ms.to_string()])
            .args(["--node-number", &number.to_string()])
            .arg("--data-dir")
            .arg(&dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| err(format!("running {}: {e}", self.cfg.pollen.display())))?;
        let pid = child.id();
        children.insert(node_id.clone(), (child, dir.clone()));
        tracing::info!(node = %node_id, pid, dir = %dir.display(), "started a local node");
        Ok(ProvisionedNode { node_id, pid: Some(pid), dir: Some(dir), running: true })
    }

    fn stop_node(&self, node_id: &str) -> Result<(), ProvisionError> {
        let (mut child, _) =
            self.children().remove(node_id).ok_or_else(|| ProvisionError::Unknown(node_id.into()))?;
        let err = |reason: String| ProvisionError::Stop { node_id: node_id.to_string(), reason };
        if child.try_wait().map_err(|e| err(e.to_string()))?.is_some() {
            return Ok(());
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            return Err(err(format!("SIGTERM: {e}")));
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if child.try_wait().map_err(|e| err(e.to_string()))?.is_some() {
                tracing::info!(node = %node_id, "stopped a local node");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        tracing::warn!(node = %node_id, "a local node ignored SIGTERM for {STOP_GRACE:?}: killed");
        Ok(())
    }

    fn limit(&self) -> Option<usize> {
        Some(self.cfg.max_nodes)
    }

    fn list(&self) -> Vec<ProvisionedNode> {
        self.children()
            .iter_mut()
            .map(|(id, (child, dir))| ProvisionedNode {
                node_id: id.clone(),
                pid: Some(child.id()),
                dir: Some(dir.clone()),
                running: matches!(child.try_wait(), Ok(None)),
            })
            .collect()
    }
}

impl Drop for LocalProvisioner {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provisioner whose "nodes" are `false`: they exit at once, like a
    /// node that crashed.
    fn provisioner(dir: &std::path::Path, max_nodes: usize) -> LocalProvisioner {
        LocalProvisioner::new(LocalConfig {
            pollen: PathBuf::from("false"),
            dir: dir.to_path_buf(),
            controller_url: "http://127.0.0.1:1".into(),
            heartbeat_ms: 100,
            node_args: vec![],
            max_nodes,
            pin: false,
            cores: 1,
            metadata_nodes: 0,
        })
    }

    #[test]
    fn a_crashed_node_no_longer_holds_a_slot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = provisioner(dir.path(), 1);
        let first = p.start_node().expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.list().iter().any(|n| n.running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(p.list(), vec![ProvisionedNode { running: false, ..first }]);
        let second = p.start_node().expect("the crashed node holds no slot");
        assert_eq!(second.node_id, "node-1");
        assert_eq!(p.list().len(), 2, "the crashed node is listed until stopped (forgotten)");
        p.stop_node("node-0").expect("stop the crashed node");
        assert_eq!(p.list().len(), 1);
    }

    #[test]
    fn new_nodes_never_take_an_earlier_runs_ids() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let p = provisioner(dir.path(), 8);
            let ids: Vec<String> = (0..3).map(|_| p.start_node().expect("start").node_id).collect();
            assert_eq!(ids, ["node-0", "node-1", "node-2"]);
        }
        let p = provisioner(dir.path(), 8);
        assert_eq!(
            p.start_node().expect("start").node_id,
            "node-0",
            "the first node again, on its directory"
        );
        p.resume_numbering();
        assert_eq!(p.start_node().expect("start").node_id, "node-3", "a new node: past every earlier one");
    }
}
