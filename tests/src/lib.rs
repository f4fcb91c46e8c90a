//! Helpers shared by the integration tests: nodes on ephemeral loopback ports,
//! and (`control`) controllers, node processes and `pollenctl` for the
//! control-plane tests here and in `ctl/tests`.

pub mod control;

use dataplane::node::{NetBackend, Node, NodeConfig, PollMode};

/// Defines `epoll::NAME` and `uring::NAME` tests that call `NAME(backend)`
/// of the calling module, for every NAME given.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $(#[test] fn $name() { super::$name(dataplane::node::NetBackend::Epoll) })*
        }
        mod uring {
            $(#[test] fn $name() { super::$name(dataplane::node::NetBackend::Uring) })*
        }
    };
}

/// `on_both_backends!` plus `dpdk::NAME` tests over DPDK's tap device and
/// the user-space TCP stack (feature `dpdk`; root only, skipped otherwise;
/// one DPDK node at a time, so these wait for each other). The test
/// functions must start their nodes with [`start_node`].
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::on_both_backends!($($name),*);
        #[cfg(feature = "dpdk")]
        mod dpdk {
            $(#[test] fn $name() {
                if !$crate::dpdk::available() {
                    eprintln!("skipped: DPDK tests need root and /dev/net/tun");
                    return;
                }
                super::$name(dataplane::node::NetBackend::Dpdk)
            })*
        }
    };
}

/// A small node for tests: adaptive polling, no pinning (tests share 2 CPUs),
/// ephemeral ports, `dram_blocks` blocks of `block_size` per core.
pub fn node(cores: usize, net: NetBackend, block_size: usize, dram_blocks: u64) -> Node {
    start_node(node_config(cores, net, block_size, dram_blocks))
}

/// The configuration of [`node`].
pub fn node_config(cores: usize, net: NetBackend, block_size: usize, dram_blocks: u64) -> NodeConfig {
    NodeConfig {
        port: 0,
        core_port_base: 0,
        cores,
        pin: false,
        poll_mode: PollMode::Adaptive,
        spin_us: 50,
        net,
        block_size,
        dram_bytes_per_core: dram_blocks * block_size as u64,
        max_body: block_size.max(64 << 10),
        ..NodeConfig::default()
    }
}

/// Starts a node from `cfg`. A DPDK node (`net = Dpdk`, feature `dpdk`) gets
/// the test tap device's settings (see `dpdk`) and waits for the port while
/// another test's DPDK node holds it: a process has one tap port, which
/// serves one node at a time.
pub fn start_node(#[allow(unused_mut)] mut cfg: NodeConfig) -> Node {
    #[cfg(feature = "dpdk")]
    if cfg.net == NetBackend::Dpdk {
        return dpdk::start(cfg);
    }
    Node::start(cfg).expect("node starts")
}

/// DPDK nodes for tests, without a NIC: DPDK's `net_tap` virtual device
/// creates a tap interface whose kernel side gets an address, so the
/// ordinary client reaches the node's user-space TCP stack through the
/// kernel's TCP. The subnet is a private one of the benchmarking range
/// (198.18.0.0/15), per process; nothing outside the host can reach it.
#[cfg(feature = "dpdk")]
pub mod dpdk {
    use std::net::Ipv4Addr;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use dataplane::node::{Node, NodeConfig};

    /// Whether DPDK tests can run here: they need root for the tap device.
    pub fn available() -> bool {
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
            })
            .unwrap_or(false);
        root && std::path::Path::new("/dev/net/tun").exists()
    }

    /// The tap interface's name in the kernel.
    pub fn iface() -> String {
        format!("ptap{}", std::process::id() % 100_000)
    }

    fn subnet() -> u8 {
        (std::process::id() % 250) as u8
    }

    /// The node's address on the tap subnet.
    pub fn node_ip() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, subnet(), 2)
    }

    /// The kernel side's address.
    pub fn kernel_ip() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, subnet(), 1)
    }

    /// EAL arguments: one lcore, no huge pages, no PCI scan, no files shared
    /// with other DPDK processes, and the tap device.
    pub fn eal_args() -> Vec<String> {
        [
            "--no-huge".to_string(),
            "--no-pci".into(),
            "--no-shconf".into(),
            "--no-telemetry".into(),
            "-m".into(),
            "512".into(),
            "-l".into(),
            "0".into(),
            "--log-level=*:error".into(),
            format!("--vdev=net_tap0,iface={}", iface()),
        ]
        .to_vec()
    }

    /// Fills in the DPDK settings and starts the node, waiting up to two
    /// minutes for another test's node to release the port.
    pub fn start(mut cfg: NodeConfig) -> Node {
        assert!(available(), "DPDK tests need root and /dev/net/tun (check dpdk::available first)");
        cfg.dpdk.eal_args = eal_args();
        cfg.dpdk.ip = Some((node_ip(), 24));
        cfg.dpdk.port_id = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match Node::start(cfg.clone()) {
                Ok(n) => {
                    kernel_side();
                    return n;
                }
                Err(e) if e.to_string().contains("already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("DPDK node starts: {e}"),
            }
        }
    }

    /// Gives the kernel side of the tap its address, once per process (the
    /// tap lives as long as the process's EAL).
    fn kernel_side() {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            let iface = iface();
            let addr = format!("{}/24", kernel_ip());
            for args in [vec!["addr", "add", &addr, "dev", &iface], vec!["link", "set", &iface, "up"]] {
                let out =
                    std::process::Command::new("ip").args(&args).output().expect("run ip(8) from iproute2");
                assert!(
                    out.status.success(),
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        });
    }
}

/// A fresh directory for flash and disk tier files, under the target
/// directory (O_DIRECT does not work on tmpfs, which /tmp may be); removed
/// on drop.
pub struct TierDir(pub std::path::PathBuf);

impl TierDir {
    pub fn new(name: &str) -> TierDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp")
            .join(format!("pollen-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).expect("tier dir");
        TierDir(d)
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TierDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A loopback port nothing listens on, for as long as the returned socket
/// lives: the socket is bound but not listening, so connections to the port
/// are refused, and no other test can take the port meanwhile (a listener
/// bound and dropped frees its port for whoever binds next).
pub fn refusing_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind 127.0.0.1:0");
    let port = s.local_addr().expect("local address").as_socket().expect("an IP address").port();
    assert_ne!(port, 0, "the kernel picked a port");
    (s, port)
}

/// A raw protocol connection for tests that need to send exact bytes.
pub mod raw {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use dataplane::proto::{decode_header, encode_frame, Header, Limits, Opcode, HEADER_LEN};

    pub struct Raw(pub TcpStream);

    #[derive(Debug)]
    pub struct Resp {
        pub header: Header,
        pub body: Vec<u8>,
    }

    impl Raw {
        pub fn connect(addr: SocketAddr) -> Raw {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            Raw(s)
        }

        pub fn frame(op: Opcode, flags: u16, id: u64, key: &[u8], body: &[u8]) -> Vec<u8> {
            let mut v = Vec::new();
            encode_frame(&mut v, &Header::request(op, flags, id, key.len(), body.len()), key, body);
            v
        }

        pub fn send(&mut self, bytes: &[u8]) {
            self.0.write_all(bytes).expect("send");
        }

        /// The next response, or None if the node closed the connection.
        pub fn recv(&mut self) -> Option<Resp> {
            let mut h = [0u8; HEADER_LEN];
            if self.0.read_exact(&mut h).is_err() {
                return None;
            }
            let header = decode_header(&h, &Limits::new(1 << 30), false).expect("valid response header")?;
            let mut rest = vec![0u8; header.key_len as usize + header.body_len as usize];
            self.0.read_exact(&mut rest).expect("response payload");
            Some(Resp { header, body: rest.split_off(header.key_len as usize) })
        }

        /// True when the peer has closed (EOF) within the read timeout.
        pub fn closed(&mut self) -> bool {
            matches!(self.end(), End::Eof)
        }

        /// How the connection goes on from here: what one read finds
        /// (within the read timeout). A read interrupted by a signal is
        /// retried: in a test process with a DPDK node, the tap driver's
        /// signals interrupt other threads' reads, and a socket with a read
        /// timeout is not restarted (signal(7)).
        pub fn end(&mut self) -> End {
            let mut b = [0u8; 1];
            loop {
                return match self.0.read(&mut b) {
                    Ok(0) => End::Eof,
                    Ok(_) => End::Data,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                        End::Reset
                    }
                    Err(e) => End::Other(e),
                };
            }
        }
    }

    /// What [`Raw::end`] found.
    #[derive(Debug)]
    pub enum End {
        /// The peer closed: end of input.
        Eof,
        /// The peer reset the connection.
        Reset,
        /// More bytes came.
        Data,
        /// The read timed out or failed otherwise.
        Other(std::io::Error),
    }
}

/// `pollen node` as a separate process, for tests that kill it.
pub mod proc {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::{mpsc, OnceLock};
    use std::time::Duration;

    /// The `pollen` binary, built from the current sources (see [`ctl_bin`]).
    pub fn pollen_bin() -> PathBuf {
        ctl_bin("pollen")
    }

    /// The `pollenctl` binary, as [`pollen_bin`].
    pub fn pollenctl_bin() -> PathBuf {
        ctl_bin("pollenctl")
    }

    /// A binary of package pollen-ctl, up to date with the sources: `cargo
    /// test` builds pollen-ctl's binaries only for pollen-ctl's own
    /// integration tests, so any other test (`cargo test -p pollen-tests`)
    /// would run whatever an earlier build left in the target directory.
    ///
    /// - In an integration test of pollen-ctl run by cargo, the cargo run
    ///   that built the test also built the binaries, from the same sources
    ///   and with the same features, and says where (`CARGO_BIN_EXE_*` at
    ///   run time, cargo 1.94 and later): they are used as they are.
    /// - Otherwise, once per test process, `cargo test --workspace --no-run
    ///   --test bins` (with this build's target directory, profile and
    ///   `dpdk` feature) brings them up to date. `--workspace` with a test
    ///   target resolves features as `cargo test --workspace` (README, CI)
    ///   does, so after such a run it rebuilds nothing and relinks nothing:
    ///   about half a second. Concurrent runs wait for each other on
    ///   cargo's lock (the outer `cargo test` holds none while its tests
    ///   run).
    fn ctl_bin(name: &str) -> PathBuf {
        static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();
        let bins = match BINS.get_or_init(Bins::locate) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let bin = match name {
            "pollen" => &bins.pollen,
            "pollenctl" => &bins.pollenctl,
            other => panic!("pollen-ctl has no binary {other}"),
        };
        assert!(bin.exists(), "no {name} binary at {}", bin.display());
        bin.clone()
    }

    /// Where the up-to-date binaries are.
    struct Bins {
        pollen: PathBuf,
        pollenctl: PathBuf,
    }

    impl Bins {
        fn locate() -> Result<Bins, String> {
            let exe = std::env::current_exe().map_err(|e| format!("the test executable's path: {e}"))?;
            // target/<profile>/deps/<test> (or target/<triple>/<profile>/deps/<test>).
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .ok_or_else(|| format!("{} is not in a cargo target directory", exe.display()))?;
            // Cargo (1.94 and later) runs pollen-ctl's integration tests
            // with these set, having built the binaries in the same run.
            if let (Some(pollen), Some(pollenctl)) =
                (std::env::var_os("CARGO_BIN_EXE_pollen"), std::env::var_os("CARGO_BIN_EXE_pollenctl"))
            {
                return Ok(Bins { pollen: pollen.into(), pollenctl: pollenctl.into() });
            }
            Bins::build(profile_dir)
        }

        /// `cargo test --workspace --no-run --test bins` into the test
        /// executable's target directory and profile; the binaries' paths
        /// come from cargo's messages.
        fn build(profile_dir: &Path) -> Result<Bins, String> {
            let profile = profile_dir
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("no profile directory in {}", profile_dir.display()))?;
            let up = profile_dir.parent().ok_or("no target directory")?;
            // The target directory holds `.rustc_info.json`; a directory
            // between it and the profile's is a `--target` triple.
            let (target_dir, triple) = match up.parent() {
                Some(root)
                    if !up.join(".rustc_info.json").exists() && root.join(".rustc_info.json").exists() =>
                {
                    (root, up.file_name().and_then(|n| n.to_str()))
                }
                _ => (up, None),
            };
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
            let mut cmd = Command::new(cargo);
            cmd.args(["test", "--workspace", "--no-run", "--test", "bins", "--message-format=json"])
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stdin(Stdio::null());
            match profile {
                "debug" => {}
                "release" => {
                    cmd.arg("--release");
                }
                other => {
                    cmd.args(["--profile", other]);
                }
            }
            if let Some(t) = triple {
                cmd.args(["--target", t]);
            }
            // A binary without the DPDK transport would fail the DPDK tests
            // of a `--features dpdk` run (and a dpdk build would be replaced).
            if dataplane::DPDK {
                cmd.args(["--features", "pollen-ctl/dpdk"]);
            }
            let what = format!("{cmd:?}");
            // Cargo gives a test process the variables it gives the crate
            // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Passed on, they
            // would differ from what the outer cargo's build scripts saw
            // (ring's reruns when CARGO_MANIFEST_DIR changes), and the
            // dependencies would be rebuilt for nothing.
            for (k, _) in std::env::vars_os() {
                let Some(k) = k.to_str() else { continue };
                let per_crate = ["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_MANIFEST_"]
                    .iter()
                    .any(|p| k.starts_with(p))
                    || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"]
                        .contains(&k)
                    || ["CARGO_RUSTC_CURRENT_DIR", "OUT_DIR"].contains(&k);
                if per_crate {
                    cmd.env_remove(k);
                }
            }
            let out = cmd.output().map_err(|e| format!("running {what}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building pollen-ctl's binaries for the tests failed ({}): {what}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let (mut pollen, mut pollenctl) = (None, None);
            for line in out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(m) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
                let bin = m["reason"] == "compiler-artifact"
                    && m["target"]["kind"] == serde_json::json!(["bin"])
                    && m["profile"]["test"] == false;
                let (Some(name), Some(exe)) = (m["target"]["name"].as_str(), m["executable"].as_str()) else {
                    continue;
                };
                match name {
                    "pollen" if bin => pollen = Some(PathBuf::from(exe)),
                    "pollenctl" if bin => pollenctl = Some(PathBuf::from(exe)),
                    _ => {}
                }
            }
            match (pollen, pollenctl) {
                (Some(pollen), Some(pollenctl)) => Ok(Bins { pollen, pollenctl }),
                _ => Err(format!("{what} named no pollen and pollenctl executables")),
            }
        }
    }

    /// A running `pollen node`; killed (SIGKILL) on drop.
    pub struct NodeProc {
        pub child: Child,
        pub addr: SocketAddr,
        pub stderr: mpsc::Receiver<String>,
    }

    impl NodeProc {
        /// Starts `pollen node ARGS` on free loopback ports (heartbeats go to
        /// a controller that is not there; the node does not need one) and
        /// waits until it prints its address.
        pub fn start(args: &[&str]) -> NodeProc {
            NodeProc::start_limited(args, None)
        }

        /// `start`, with the files the node writes limited to `max_file`
        /// bytes (RLIMIT_FSIZE; writes past it fail with EFBIG), to make its
        /// disk writes fail.
        pub fn start_limited(args: &[&str], max_file: Option<u64>) -> NodeProc {
            NodeProc::start_with(args, max_file, &[])
        }

        /// `start_limited`, with these environment variables set.
        pub fn start_with(args: &[&str], max_file: Option<u64>, env: &[(&str, &str)]) -> NodeProc {
            let mut cmd = Command::new(pollen_bin());
            cmd.envs(env.iter().copied());
            cmd.arg("node")
                .args(["--port", "0", "--no-pin", "--controller", "http://127.0.0.1:9"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(max) = max_file {
                use std::os::unix::process::CommandExt;
                // SAFETY: between fork and exec the closure only makes two
                // async-signal-safe system calls and touches no memory the
                // parent's other threads could hold locked.
                unsafe {
                    cmd.pre_exec(move || {
                        use nix::libc;
                        // Past the limit a write fails with EFBIG instead of killing the process.
                        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                        let lim = libc::rlimit { rlim_cur: max, rlim_max: max };
                        if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let mut child = cmd.spawn().expect("spawn pollen node");
            let (line_tx, line_rx) = mpsc::channel();
            let out = child.stdout.take().expect("stdout");
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = line_tx.send(line);
                }
            });
            let (err_tx, stderr) = mpsc::channel();
            let err = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = err_tx.send(line);
                }
            });
            // "node node-0 at 127.0.0.1:PORT (…)"
            let addr = loop {
                match line_rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(line) => {
                        if let Some(a) = line.split(" at ").nth(1).and_then(|r| r.split(' ').next()) {
                            if let Ok(a) = a.parse() {
                                break a;
                            }
                        }
                    }
                    Err(_) => {
                        let _ = child.kill();
                        let logs: Vec<String> = stderr.try_iter().collect();
                        panic!("pollen node did not start:\n{}", logs.join("\n"));
                    }
                }
            };
            NodeProc { child, addr, stderr }
        }

        /// SIGKILL, and wait for the process to be gone.
        pub fn kill(mut self) -> Vec<String> {
            self.child.kill().expect("kill pollen node");
            self.child.wait().expect("wait for pollen node");
            self.stderr.try_iter().collect()
        }

        /// Waits (up to 10 s) for a stderr line containing `needle`.
        pub fn wait_for_log(&self, needle: &str) -> Option<String> {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                match self.stderr.recv_timeout(left) {
                    Ok(line) if line.contains(needle) => return Some(line),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            None
        }
    }

    impl Drop for NodeProc {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One raw request on a fresh connection; returns the status and body.
pub fn raw_request(
    addr: std::net::SocketAddr,
    op: dataplane::proto::Opcode,
    fl: u16,
    key: &[u8],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let h = dataplane::proto::Header {
        opcode: op as u8,
        flags: fl,
        status: 0,
        request_id: 1,
        key_len: key.len() as u16,
        body_len: body.len() as u32,
    };
    let mut frame = vec![0u8; dataplane::proto::HEADER_LEN];
    dataplane::proto::encode_header(&h, &mut frame);
    frame.extend_from_slice(key);
    frame.extend_from_slice(body);
    s.write_all(&frame).unwrap();
    let mut head = [0u8; dataplane::proto::HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let status = u16::from_le_bytes([head[6], head[7]]);
    let len = u32::from_le_bytes([head[20], head[21], head[22], head[23]]) as usize;
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).unwrap();
    (status, b)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    /// The newest modification time of the Rust sources under `dir` that
    /// go into the binaries: not the test-only modules, which live in files
    /// named `tests.rs` (`#[cfg(test)] mod tests;`), nor the DPDK transport
    /// in a build without it: they change no binary (cargo does not relink
    /// one for them, and this would fail).
    fn newest_source(dir: &Path) -> SystemTime {
        let mut newest = SystemTime::UNIX_EPOCH;
        for e in std::fs::read_dir(dir).expect("a source directory").flatten() {
            let p = e.path();
            let m = e.metadata().expect("metadata of a source file");
            let t = if m.is_dir() {
                newest_source(&p)
            } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("tests.rs") && !dpdk_only(&p) {
                m.modified().expect("a modification time")
            } else {
                continue;
            };
            newest = newest.max(t);
        }
        newest
    }

    /// The DPDK transport's module, when this build leaves it out.
    fn dpdk_only(p: &Path) -> bool {
        !dataplane::DPDK && p.ends_with("transport/dpdk.rs")
    }

    /// What `proc` hands out was built after the last change to the
    /// sources it is built from: a test run never runs an old binary.
    #[test]
    fn the_binaries_are_not_older_than_their_sources() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let sources = newest_source(&root.join("ctl/src")).max(newest_source(&root.join("dataplane/src")));
        for bin in [super::proc::pollen_bin(), super::proc::pollenctl_bin()] {
            let built = bin.metadata().unwrap().modified().unwrap();
            assert!(built >= sources, "{} is older than its sources", bin.display());
        }
    }

    /// `pollen` has the DPDK transport exactly when this build has it: a
    /// `--features dpdk` test run does not get (or leave) a binary without it.
    #[test]
    fn the_binary_has_this_builds_dpdk_feature() {
        // Without --ip the node refuses DPDK before starting anything,
        // saying whether the build has it.
        let out = std::process::Command::new(super::proc::pollen_bin())
            .args(["node", "--net", "dpdk", "--port", "0", "--no-pin", "--controller", "http://127.0.0.1:9"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("pollen runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a DPDK node without an address started: {stderr}");
        let without = stderr.contains("no DPDK support");
        assert_eq!(
            !without,
            dataplane::DPDK,
            "dpdk feature in this build: {}; pollen says: {stderr}",
            dataplane::DPDK
        );
        if dataplane::DPDK {
            assert!(stderr.contains("--ip"), "{stderr}");
        }
    }
}
