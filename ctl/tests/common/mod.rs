//! Helpers shared by the multi-process tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

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
