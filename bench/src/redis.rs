//! The Redis peer: a private `redis-server` on a free loopback port, pinned to
//! the server CPU, killed when its guard is dropped (also on error paths).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::wire::{redis_key, resp_command};

/// Generous: the start is polled (PING every 20 ms), so a long bound costs
/// nothing when redis is quick, and a loaded machine (builds beside the
/// bench's smoke test) can take seconds to schedule a new process.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Set-up commands only (PING, INFO, the preload); the load uses its own sockets.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the redis-server binary: `bin` itself when it names a path, else the
/// first match on `PATH`.
pub fn find(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| p.is_file())
}

/// A running redis-server. Dropping it kills the process and reaps it.
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    /// redis-server's stdout and stderr, shown when it fails to start; removed on drop.
    log: PathBuf,
    started: Instant,
    pub version: String,
}

impl RedisServer {
    /// Starts `bin` on a free loopback port, pinned to `cpu`, and waits until it answers PING.
    pub fn start(bin: &Path, cpu: Option<usize>) -> anyhow::Result<Self> {
        // The port is free when we look; another process could take it before
        // redis binds, so try a few times.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(bin, cpu) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("redis-server did not start")))
    }

    fn try_start(bin: &Path, cpu: Option<usize>) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port for redis")?
            .port();
        let log = std::env::temp_dir().join(format!("pollen-bench-redis-{}-{port}.log", std::process::id()));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--save", "", "--appendonly", "no", "--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let parent = nix::unistd::getpid();
        // SAFETY: the hook runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid, sched_setaffinity);
        // it does not allocate or touch memory shared with the parent's threads.
        unsafe {
            cmd.pre_exec(move || {
                // If the bench dies without running its destructors (SIGINT,
                // SIGKILL), the kernel kills redis too. The signal follows the
                // spawning thread, the bench's main thread, which outlives the guard.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
                if nix::unistd::getppid() != parent {
                    // The bench died before the line above took effect.
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                match cpu {
                    Some(cpu) => crate::pin::pin_in_child(cpu),
                    None => Ok(()),
                }
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&log);
                return Err(e).with_context(|| format!("starting {}", bin.display()));
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut server = RedisServer { child, addr, log, started: Instant::now(), version: String::new() };
        server.wait_ready()?;
        server.version = server.info_version().unwrap_or_else(|_| "unknown".into());
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `/proc/<pid>` of the server process.
    pub fn proc_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}", self.child.id()))
    }

    /// Cumulative (CPU, wall-clock) nanoseconds since start: user + system time
    /// of the whole process from /proc, in 10 ms clock ticks.
    pub fn busy(&self) -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
        Some((ticks * 10_000_000, self.started.elapsed().as_nanos() as u64))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "redis-server exited during start-up ({status}); its output ends with: {}",
                    self.log_tail()
                );
            }
            if let Ok(mut c) = self.connect() {
                if c.command(&[b"PING"]).map(|r| r == b"+PONG").unwrap_or(false) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis-server did not answer PING on {} within {:?}; its output ends with: {}",
                    self.addr,
                    START_TIMEOUT,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines redis-server wrote, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.is_empty() {
            "(nothing)".into()
        } else {
            tail
        }
    }

    fn info_version(&self) -> anyhow::Result<String> {
        let mut c = self.connect()?;
        let info = c.command(&[b"INFO", b"server"])?;
        let text = String::from_utf8_lossy(&info);
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into()))
    }

    fn connect(&self) -> anyhow::Result<RespConn> {
        let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(RespConn { r: BufReader::new(s.try_clone()?), w: s })
    }

    /// Stores `value` under every connection's key, for gets.
    pub fn preload(&self, conns: usize, value: &[u8]) -> anyhow::Result<()> {
        let mut c = self.connect()?;
        for i in 0..conns {
            let r = c.command(&[b"SET", redis_key(i).as_bytes(), value])?;
            if r != b"+OK" {
                bail!("SET {} answered {}", redis_key(i), String::from_utf8_lossy(&r));
            }
        }
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A blocking RESP connection for setup (not for measurement).
struct RespConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl RespConn {
    /// Sends a command and returns the reply: the status line (with its type
    /// byte) for `+`/`-`/`:` replies, the payload for a bulk reply.
    fn command(&mut self, parts: &[&[u8]]) -> anyhow::Result<Vec<u8>> {
        self.w.write_all(&resp_command(parts))?;
        let mut line = Vec::new();
        self.r.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            bail!("redis closed the connection");
        }
        line.truncate(line.len() - 2);
        match line.first() {
            Some(b'$') => {
                let n: i64 = std::str::from_utf8(&line[1..])?.parse()?;
                if n < 0 {
                    return Ok(Vec::new());
                }
                if n > 16 << 20 {
                    bail!("redis sent a {n}-byte reply to a setup command");
                }
                let mut v = vec![0; n as usize + 2];
                self.r.read_exact(&mut v)?;
                v.truncate(n as usize);
                Ok(v)
            }
            Some(_) => Ok(line),
            None => bail!("empty reply from redis"),
        }
    }
}
