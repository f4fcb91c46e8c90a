//! Helpers shared by the multi-process tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pollen_ctl::api::{EventsResponse, NodeState, NodesResponse};
use pollen_ctl::local::{LocalCluster, CONTROLLER_ENV, DEFAULT_DATA_DIR};
use pollen_ctl::provision::ProvisionedNode;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Kills the child on drop unless it was already reaped.
pub struct Reaper(pub Option<Child>);

impl Reaper {
    /// SIGTERM, then the exit status (within 15 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("process did not exit within 15 s of SIGTERM");
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

impl Reaper {
    /// SIGTERM and up to 15 s for a clean exit, then SIGKILL; never panics
    /// (for drops while a failed test unwinds).
    pub fn stop_quietly(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL and reap: the process dies without any clean-up.
    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`
/// with `what` and the last value's description.
/// The URL a `pollen controller` prints first on its standard output
/// ("controller listening on http://127.0.0.1:PORT; ...").
pub fn controller_url(stdout: std::process::ChildStdout) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).expect("controller banner");
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches(';')
        .to_string()
}

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

/// Runs `pollenctl --controller URL` in a directory; on failure, the
/// assertion message carries the given log files.
pub struct Pollenctl {
    pub bin: &'static str,
    pub url: String,
    pub cwd: PathBuf,
    pub logs: Vec<PathBuf>,
}

impl Pollenctl {
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(self.bin)
            .args(["--controller", &self.url])
            .args(args)
            .current_dir(&self.cwd)
            .output()
            .expect("run pollenctl")
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
}

const POLLEN: &str = env!("CARGO_BIN_EXE_pollen");
const POLLENCTL: &str = env!("CARGO_BIN_EXE_pollenctl");

/// Whether a process (already reaped when it exited) still runs.
pub fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// `pollen up ARGS` in a fresh directory with `policy.toml`, on a free
/// controller port with 100 ms heartbeats; stopped with SIGTERM on drop, so
/// it stops the node processes it started (a SIGKILL would orphan them).
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
    pub fn start(policy: &str, args: &[&str]) -> Up {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("policy.toml"), policy).expect("policy");
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let child = Command::new(POLLEN)
            .args(["up", "--policy", "policy.toml"])
            .args(args)
            .args(["--no-pin", "--dram-gb", "0.015625", "--ctl-port", "0", "--heartbeat-ms", "100"])
            .current_dir(dir.path())
            .env_remove(CONTROLLER_ENV)
            .stdin(Stdio::null())
            .stdout(log("up.out"))
            .stderr(log("up.err"))
            .spawn()
            .expect("spawn pollen up");
        let mut proc = Reaper(Some(child));
        let data = dir.path().join(DEFAULT_DATA_DIR);
        let lc = wait_for(Duration::from_secs(30), "pollen up --nodes ready", || {
            if let Ok(Some(status)) = proc.0.as_mut().expect("running").try_wait() {
                panic!(
                    "pollen up exited early with {status}: {}",
                    std::fs::read_to_string(dir.path().join("up.err")).unwrap_or_default()
                );
            }
            LocalCluster::read(&data).ok().flatten()
        });
        let ctl = Pollenctl {
            bin: POLLENCTL,
            url: lc.controller,
            cwd: dir.path().to_path_buf(),
            logs: vec![dir.path().join("up.err")],
        };
        Up { proc, dir, ctl }
    }

    pub fn nodes(&self) -> NodesResponse {
        self.ctl.json(&["nodes"])
    }

    pub fn provisioned(&self) -> Vec<ProvisionedNode> {
        let resp = ureq::get(format!("{}/v1/provisioner", self.ctl.url)).call().expect("GET /v1/provisioner");
        resp.into_body().read_json().expect("provisioner JSON")
    }

    pub fn events(&self) -> EventsResponse {
        self.ctl.json(&["events"])
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
