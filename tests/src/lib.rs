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

/// A raw protocol connection for tests that need to send exact bytes.
pub mod raw {
    use std::io::{Read, Write};
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
            let mut b = [0u8; 1];
            matches!(self.0.read(&mut b), Ok(0))
        }
    }
}

/// `pollen node` as a separate process, for tests that kill it.
pub mod proc {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    /// The `pollen` binary of this build (built by `cargo test --workspace`;
    /// built here when a test runs alone with `-p pollen-tests`).
    pub fn pollen_bin() -> PathBuf {
        ctl_bin("pollen")
    }

    /// The `pollenctl` binary of this build, as [`pollen_bin`].
    pub fn pollenctl_bin() -> PathBuf {
        ctl_bin("pollenctl")
    }

    /// A binary of package pollen-ctl beside the test executable, built when
    /// missing.
    fn ctl_bin(name: &str) -> PathBuf {
        let exe = std::env::current_exe().expect("test executable");
        // target/<profile>/deps/<test> → target/<profile>/<name>
        let bin = exe.parent().and_then(|d| d.parent()).expect("target directory").join(name);
        if !bin.exists() {
            let st = Command::new(env!("CARGO"))
                .args(["build", "-p", "pollen-ctl", "--bin", name])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build");
            assert!(st.success(), "building the {name} binary failed");
        }
        assert!(bin.exists(), "no {name} binary at {}", bin.display());
        bin
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
