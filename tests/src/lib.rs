//! Helpers shared by the integration tests: nodes on ephemeral loopback ports.

use dataplane::node::{NetBackend, Node, NodeConfig, PollMode};

/// A small node for tests: adaptive polling, no pinning (tests share 2 CPUs),
/// ephemeral ports, `dram_blocks` blocks of `block_size` per core.
pub fn node(cores: usize, net: NetBackend, block_size: usize, dram_blocks: u64) -> Node {
    let cfg = NodeConfig {
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
    };
    Node::start(cfg).expect("node starts")
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
