//! The control plane as separate processes, for the tests here and in
//! `ctl/tests`: `pollen controller` and `pollen node` processes on loopback
//! ports (a [`Cluster`]), or `pollen up` with its provisioner ([`Up`]), both
//! driven through the real `pollenctl` ([`Pollenctl`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::client::{Client, Job};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pollen_ctl::api::{CoresResponse, EventsResponse, JobEntry, JobsResponse, NodeState, NodesResponse};
use pollen_ctl::local::{LocalCluster, CONTROLLER_ENV, DEFAULT_DATA_DIR};
use pollen_ctl::provision::ProvisionedNode;

use crate::proc::{pollen_bin, pollenctl_bin};

/// The heartbeat interval of every test cluster, in milliseconds.
pub const HEARTBEAT_MS: u64 = 100;

/// Controller arguments for tests that are not about failure detection: a
/// node is declared down after 10 silent heartbeats (1 s) instead of 3, so a
/// heartbeat thread stalled a few hundred ms on a loaded machine does not
/// take a live node out of the weight maps. `pollen controller` and `pollen
/// up` both take them. The controller's other timers grow with it (job
/// adoption, owed deregistrations: docs/control-plane.md, "Tests").
pub const PATIENT: [&str; 2] = ["--missed-heartbeats", "10"];

/// Allocation constants small enough that a few 16 MiB, one-core nodes are
/// a meaningful cluster: a node serves 100 MB/s, a worker drives 10 MB/s.
pub const SMALL_POLICY: &str = r#"
[allocation]
per_worker_throughput = "10MB"
default_workers = 4
default_capacity = "8MiB"
core_throughput = "100MB"
"#;

/// Rightsizing in test time: a core is assumed to serve 1 MB/s, so a few
/// MB/s of reads are far above the 50% network band and silence is far
/// below 5%; a look every 200 ms, 700 ms between decisions.
pub const RIGHTSIZING_POLICY: &str = r#"
[allocation]
per_worker_throughput = "1KB"
default_workers = 1
default_capacity = "1MiB"
core_throughput = "1MB"

[scaling]
interval_ms = 200
cooldown_ms = 700
network = { low = 0.05, high = 0.5 }
"#;

/// Kills the child on drop unless it was already reaped.
pub struct Reaper(pub Option<Child>);

impl Reaper {
    /// SIGTERM, then the exit status (within 15 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        assert!(self.0.is_some(), "not running");
        self.sigterm_and_wait().expect("process did not exit within 15 s of SIGTERM")
    }

    /// SIGTERM and up to 15 s for a clean exit, then SIGKILL; never panics
    /// (for drops while a failed test unwinds).
    pub fn stop_quietly(&mut self) {
        let _ = self.sigterm_and_wait();
    }

    /// SIGTERM, and the exit status within 15 s; None (after a SIGKILL)
    /// when it did not exit, or was not running.
    fn sigterm_and_wait(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.0.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// SIGKILL and reap: the process dies without any clean-up.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`
/// with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The URL a `pollen controller` prints first on its standard output
/// ("controller listening on http://127.0.0.1:PORT; ...").
pub fn controller_url(stdout: ChildStdout) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).expect("controller banner");
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches(';')
        .to_string()
}

/// Whether a process (already reaped when it exited) still runs.
pub fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Runs `pollenctl --controller URL` in a directory; on failure, the
/// assertion message carries the given log files.
pub struct Pollenctl {
    pub bin: PathBuf,
    pub url: String,
    pub cwd: PathBuf,
    pub logs: Vec<PathBuf>,
    /// Passed as `--admin-token-file` when set.
    pub admin_token_file: Option<PathBuf>,
}

impl Pollenctl {
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--controller", &self.url]);
        if let Some(f) = &self.admin_token_file {
            cmd.arg("--admin-token-file").arg(f);
        }
        cmd.args(args).current_dir(&self.cwd).output().expect("run pollenctl")
    }

    /// Runs pollenctl and requires success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        if !out.status.success() {
            let logs: String = self
                .logs
                .iter()
                .map(|p| format!("--- {}\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
                .collect();
            panic!(
                "pollenctl {args:?} failed\nstdout: {}\nstderr: {}\n{logs}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        }
        out
    }

    /// Runs pollenctl ARGS --json and decodes its output.
    pub fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("pollenctl {args:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs pollenctl, requires failure, and returns its standard error.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "pollenctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The job `name` as the controller holds it (`pollenctl jobs --json`).
    pub fn registered(&self, name: &str) -> JobEntry {
        let r: JobsResponse = self.json(&["jobs"]);
        r.registered
            .into_iter()
            .find(|j| j.name == name)
            .unwrap_or_else(|| panic!("job {name} not registered"))
    }

    pub fn nodes(&self) -> NodesResponse {
        self.json(&["nodes"])
    }

    pub fn events(&self) -> EventsResponse {
        self.json(&["events"])
    }

    /// Polling cores per node id, from the nodes' own reports (`cores`).
    pub fn polling(&self) -> BTreeMap<String, usize> {
        let r: CoresResponse = self.json(&["cores"]);
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for row in r.cores.iter().filter(|r| r.polling) {
            *out.entry(row.node_id.clone()).or_default() += 1;
        }
        out
    }

    /// Connections each core accepted so far, and whether it takes new ones
    /// on the shared port (the core's own report), for a one-node cluster.
    pub fn core_connections(&self) -> BTreeMap<usize, (u64, bool)> {
        let r: CoresResponse = self.json(&["cores"]);
        r.cores.iter().map(|c| (c.core, (c.connections, c.accepting))).collect()
    }

    /// Opens `n` connections with `connect` and waits until the node's
    /// report counts them; returns them (kept open) and how many each core
    /// took.
    pub fn connect_many<T>(&self, n: u64, mut connect: impl FnMut() -> T) -> (Vec<T>, Vec<u64>) {
        let before = self.core_connections();
        let conns: Vec<T> = (0..n).map(|_| connect()).collect();
        let after = wait_for(Duration::from_secs(10), "the connections in the node's report", || {
            let now = self.core_connections();
            let total: u64 =
                now.values().map(|c| c.0).sum::<u64>() - before.values().map(|c| c.0).sum::<u64>();
            (total >= n).then_some(now)
        });
        let per_core = after.iter().map(|(core, c)| c.0 - before[core].0).collect();
        (conns, per_core)
    }
}

/// `pollen controller` in `dir` (with `policy.toml` there when it exists),
/// listening on `listen` with [`HEARTBEAT_MS`] heartbeats, its standard
/// error appended to `controller.err`; returns it and its URL (from its
/// banner).
pub fn spawn_controller(dir: &Path, listen: &str, extra: &[&str]) -> (Reaper, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("controller.err"))
        .expect("log file");
    let mut cmd = Command::new(pollen_bin());
    cmd.args(["controller", "--listen", listen, "--heartbeat-ms", &HEARTBEAT_MS.to_string()]);
    if dir.join("policy.toml").exists() {
        cmd.args(["--policy", "policy.toml"]);
    }
    let mut child = cmd
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn pollen controller");
    let stdout = child.stdout.take().expect("stdout");
    let ctl = Reaper(Some(child));
    let url = controller_url(stdout);
    (ctl, url)
}

/// A controller and `pollen node` processes started by hand, in a fresh
/// directory: every process's standard error goes to `ID.err` there, so a
/// failing `pollenctl` call shows the controller's log.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub ctl: Reaper,
    pub nodes: BTreeMap<String, Reaper>,
    /// Each node's extra arguments, to start it again the same way.
    args: BTreeMap<String, Vec<String>>,
    /// Each node's extra environment variables (`start_node_env`).
    envs: BTreeMap<String, Vec<(String, String)>>,
    /// Arguments every node gets before its own (cores, DRAM, ...).
    node_base: Vec<String>,
    /// The admin token `pollenctl` presents, when the controller wants one.
    pub admin_token_file: Option<PathBuf>,
}

impl Cluster {
    /// A controller (with `policy` as its policy file and `ctl_args`) and no
    /// node yet. Nodes get `node_base` (e.g. `--cores 1 --dram-gb 0.015625`)
    /// before their own arguments.
    pub fn controller(policy: &str, ctl_args: &[&str], node_base: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("policy.toml"), policy).expect("policy file");
        let (ctl, url) = spawn_controller(dir.path(), "127.0.0.1:0", ctl_args);
        Cluster {
            dir,
            url,
            ctl,
            nodes: BTreeMap::new(),
            args: BTreeMap::new(),
            envs: BTreeMap::new(),
            node_base: node_base.iter().map(|s| s.to_string()).collect(),
            admin_token_file: None,
        }
    }

    /// Starts node `id` (loopback, free ports, no pinning, adaptive polling,
    /// [`HEARTBEAT_MS`] heartbeats to this controller) with `extra`.
    pub fn start_node(&mut self, id: &str, extra: &[&str]) {
        self.start_node_env(id, extra, &[]);
    }

    /// [`Cluster::start_node`] with environment variables `env` set for
    /// the node process (e.g. a test-only fault).
    pub fn start_node_env(&mut self, id: &str, extra: &[&str], env: &[(&str, &str)]) {
        self.args.insert(id.to_string(), extra.iter().map(|s| s.to_string()).collect());
        self.envs.insert(id.to_string(), env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        self.spawn_node(id);
    }

    /// Starts node `id` again with the arguments it was first started with
    /// (after [`Cluster::sigkill`]).
    pub fn restart_node(&mut self, id: &str) {
        assert!(self.nodes.get(id).is_none_or(|r| r.0.is_none()), "{id} still runs");
        self.spawn_node(id);
    }

    fn spawn_node(&mut self, id: &str) {
        // Appended to, so a restarted node's log follows its earlier one.
        let path = self.dir.path().join(format!("{id}.err"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("log file");
        let child = Command::new(pollen_bin())
            .args(["node", "--port", "0", "--no-pin", "--poll", "adaptive"])
            .args(["--node-id", id, "--heartbeat-ms", &HEARTBEAT_MS.to_string(), "--controller", &self.url])
            .args(&self.node_base)
            .args(&self.args[id])
            .envs(self.envs[id].iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pollen node");
        self.nodes.insert(id.to_string(), Reaper(Some(child)));
    }

    /// Nodes `n1..` numbered 1.. (`--node-number`, so the controller hands
    /// out weight maps by number), each with a data directory `nI-data` (a
    /// restart replays its metadata log) and `--role` where given (the
    /// default, `both`, where not), plus `extra(i)`; waits until all report.
    pub fn start_numbered(&mut self, roles: &[Option<&str>], extra: impl Fn(usize) -> Vec<String>) {
        for (i, role) in (1..).zip(roles) {
            let mut args = vec![
                "--node-number".to_string(),
                i.to_string(),
                "--data-dir".to_string(),
                format!("n{i}-data"),
            ];
            if let Some(role) = role {
                args.extend(["--role".to_string(), role.to_string()]);
            }
            args.extend(extra(i));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.start_node(&format!("n{i}"), &args);
        }
        self.wait_nodes_up(roles.len());
    }

    /// Waits until `n` nodes are up and have reported their tier capacity.
    pub fn wait_nodes_up(&self, n: usize) {
        wait_for(Duration::from_secs(30), "nodes up with capacity", || {
            let r = self.pollenctl().nodes();
            let ready = r
                .nodes
                .iter()
                .filter(|e| e.state == NodeState::Up && e.report.tiers.iter().any(|t| t.capacity_bytes > 0))
                .count();
            (ready == n).then_some(())
        });
    }

    /// SIGKILL node `id` (it stays in `nodes`, reaped, for a restart).
    pub fn sigkill(&mut self, id: &str) {
        self.nodes.get_mut(id).unwrap_or_else(|| panic!("no node {id}")).sigkill();
    }

    pub fn pollenctl(&self) -> Pollenctl {
        Pollenctl {
            bin: pollenctl_bin(),
            url: self.url.clone(),
            cwd: self.dir.path().to_path_buf(),
            logs: vec![self.dir.path().join("controller.err")],
            admin_token_file: self.admin_token_file.clone(),
        }
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.pollenctl().run(args)
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        self.pollenctl().ok(args)
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        self.pollenctl().json(args)
    }

    pub fn registered(&self, name: &str) -> JobEntry {
        self.pollenctl().registered(name)
    }

    pub fn events(&self) -> EventsResponse {
        self.pollenctl().events()
    }

    /// A file in the cluster's directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// DRAM in use on node `id`, from its latest report.
    pub fn used_dram(&self, id: &str) -> u64 {
        let r = self.pollenctl().nodes();
        let n = r.nodes.iter().find(|n| n.report.node_id == id).expect("node listed");
        n.report.tiers.iter().filter(|t| t.tier == "dram").map(|t| t.used_bytes).sum()
    }

    /// SIGTERM to every running node, then the controller: each must exit 0.
    pub fn stop(mut self) {
        for (id, mut n) in std::mem::take(&mut self.nodes) {
            if n.0.is_some() {
                let status = n.terminate();
                assert!(status.success(), "node {id} exited with {status}");
            }
        }
        let status = self.ctl.terminate();
        assert!(status.success(), "the controller exited with {status}");
    }
}

/// A client reading one object over and over (a few MB/s: 5 ms between
/// reads, leaving the CPUs to the nodes) on its own thread, until stopped.
pub struct ReadLoad {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl ReadLoad {
    /// Starts reading object `name` of `job`, which must be `len` bytes.
    pub fn start(mut client: Client, job: Job, name: &str, len: usize) -> ReadLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let mut reads = 0u64;
            while !flag.load(Ordering::Relaxed) {
                assert_eq!(client.get_buffer(&job, &name).expect("get under load").len(), len);
                reads += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            reads
        });
        ReadLoad { stop, thread }
    }

    /// Stops reading; returns how many reads were made.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("load thread")
    }
}

/// `pollen up ARGS` in a fresh directory with `policy.toml`, on a free
/// controller port with [`HEARTBEAT_MS`] heartbeats; stopped with SIGTERM on
/// drop, so it stops the node processes it started (a SIGKILL would orphan
/// them).
pub struct Up {
    pub proc: Reaper,
    pub dir: tempfile::TempDir,
    pub ctl: Pollenctl,
}

impl Drop for Up {
    fn drop(&mut self) {
        self.proc.stop_quietly();
    }
}

impl Up {
    /// `pollen up --policy policy.toml ARGS` (no pinning, 16 MiB of DRAM per
    /// core, a free controller port, [`HEARTBEAT_MS`] heartbeats) in a fresh
    /// directory holding `policy`.
    pub fn start(policy: &str, args: &[&str]) -> Up {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("policy.toml"), policy).expect("policy");
        let hb = HEARTBEAT_MS.to_string();
        let mut all = vec!["--policy", "policy.toml"];
        all.extend_from_slice(args);
        all.extend(["--no-pin", "--dram-gb", "0.015625", "--ctl-port", "0", "--heartbeat-ms", &hb]);
        Up::spawn(dir, &all).0
    }

    /// `pollen up ARGS` in `dir`, its output in `up.out` and `up.err` there;
    /// returns once it wrote `pollen-data/pollen.json` (which `pollenctl`
    /// run in `dir` finds it by), with what that file says.
    pub fn spawn(dir: tempfile::TempDir, args: &[&str]) -> (Up, LocalCluster) {
        Up::spawn_env(dir, args, &[])
    }

    /// [`Up::spawn`] with environment variables `env` set for `pollen up`.
    pub fn spawn_env(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> (Up, LocalCluster) {
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let child = Command::new(pollen_bin())
            .arg("up")
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .env_remove(CONTROLLER_ENV)
            .stdin(Stdio::null())
            .stdout(log("up.out"))
            .stderr(log("up.err"))
            .spawn()
            .expect("spawn pollen up");
        let ctl = Pollenctl {
            bin: pollenctl_bin(),
            url: String::new(),
            cwd: dir.path().to_path_buf(),
            logs: vec![dir.path().join("up.out"), dir.path().join("up.err")],
            admin_token_file: None,
        };
        let mut up = Up { proc: Reaper(Some(child)), dir, ctl };
        let data = up.path(DEFAULT_DATA_DIR);
        let lc = wait_for(Duration::from_secs(30), "pollen up ready (pollen.json written)", || {
            if let Ok(Some(status)) = up.proc.0.as_mut().expect("running").try_wait() {
                panic!("pollen up exited early with {status}\n{}", up.logs());
            }
            LocalCluster::read(&data).ok().flatten()
        });
        up.ctl.url = lc.controller.clone();
        (up, lc)
    }

    /// A file in the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What `pollen up` printed so far, for failure messages.
    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.path(n)).unwrap_or_default();
        format!("--- pollen up stdout\n{}--- pollen up stderr\n{}", read("up.out"), read("up.err"))
    }

    pub fn nodes(&self) -> NodesResponse {
        self.ctl.nodes()
    }

    pub fn provisioned(&self) -> Vec<ProvisionedNode> {
        let resp = ureq::get(format!("{}/v1/provisioner", self.ctl.url)).call().expect("GET /v1/provisioner");
        resp.into_body().read_json().expect("provisioner JSON")
    }

    pub fn events(&self) -> EventsResponse {
        self.ctl.events()
    }

    pub fn wait_open_nodes(&self, n: usize, what: &str) {
        wait_for(Duration::from_secs(30), what, || {
            let r = self.nodes();
            let open = r.nodes.iter().filter(|e| e.state == NodeState::Up && !e.draining).count();
            let all = r.nodes.len();
            (open == n && all == n).then_some(())
        });
    }
}
