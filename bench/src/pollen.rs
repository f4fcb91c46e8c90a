//! The Pollen target: an in-process one-core node (or a running one), and the
//! set-up of the blocks the load addresses, done over the raw protocol.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use dataplane::node::{NetBackend, Node, NodeConfig, PollMode};
use dataplane::proto::{
    decode_header, encode_frame, BlockId, BlockKey, Header, Limits, NodeInfo, Opcode, Status, HEADER_LEN,
};

use crate::cli::Op;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the bench needs to know about the node it measures.
pub struct PollenSetup {
    /// Job that owns the blocks (deregistered by `teardown`).
    job: String,
    main: SocketAddr,
    /// The port of the core that owns the blocks: requests take the direct path.
    pub core_addr: SocketAddr,
    /// One block per connection.
    pub blocks: Vec<BlockId>,
}

/// A node started inside the bench; its cores stop when it is dropped.
pub struct InProcNode(Node);

impl InProcNode {
    pub fn start(
        cpu: usize,
        net: NetBackend,
        spin_us: u64,
        size: usize,
        conns: usize,
    ) -> anyhow::Result<Self> {
        let block_size = size.next_power_of_two().max(64 << 10);
        let cfg = NodeConfig {
            port: 0,
            core_port_base: 0,
            cores: 1,
            pin: true,
            cpu_offset: cpu,
            poll_mode: PollMode::Adaptive,
            spin_us,
            net,
            block_size,
            // Every connection's block, with room to spare.
            dram_bytes_per_core: (block_size as u64 * (conns as u64 + 16)).max(64 << 20),
            node_id: "bench".into(),
            ..NodeConfig::default()
        };
        let node = Node::start(cfg).map_err(|e| anyhow!("starting the in-process node: {e}"))?;
        Ok(InProcNode(node))
    }

    pub fn node(&self) -> &Node {
        &self.0
    }
}

/// A blocking connection speaking the Pollen protocol one request at a time.
pub struct RawConn {
    s: TcpStream,
    next_id: u64,
    limits: Limits,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(RawConn { s, next_id: 1, limits: Limits::new(16 << 20) })
    }

    /// Sends one request and returns the body of its successful response.
    pub fn call(&mut self, op: Opcode, key: &[u8], body: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self.try_call(op, key, body)? {
            (Status::Ok, body) => Ok(body),
            (st, msg) => {
                Err(StatusError { op, status: st, message: String::from_utf8_lossy(&msg).into() }.into())
            }
        }
    }

    /// Sends one request and returns the response's status and body.
    pub fn try_call(&mut self, op: Opcode, key: &[u8], body: &[u8]) -> anyhow::Result<(Status, Vec<u8>)> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = Vec::with_capacity(HEADER_LEN + key.len() + body.len());
        encode_frame(&mut frame, &Header::request(op, 0, id, key.len(), body.len()), key, body);
        self.s.write_all(&frame).with_context(|| format!("sending {op:?}"))?;
        let mut hdr = [0u8; HEADER_LEN];
        self.s.read_exact(&mut hdr).with_context(|| format!("reading the {op:?} response"))?;
        let h = decode_header(&hdr, &self.limits, false)
            .map_err(|e| anyhow!("{op:?} response: {e}"))?
            .ok_or_else(|| anyhow!("{op:?} response: short header"))?;
        let mut rest = vec![0u8; h.key_len as usize + h.body_len as usize];
        self.s.read_exact(&mut rest).with_context(|| format!("reading the {op:?} response body"))?;
        if h.request_id != id {
            bail!("{op:?} response carries request id {}, expected {id}", h.request_id);
        }
        let status = h.status().ok_or_else(|| anyhow!("{op:?} response: unknown status {}", h.status))?;
        rest.drain(..h.key_len as usize);
        Ok((status, rest))
    }
}

#[derive(Debug)]
pub struct StatusError {
    pub op: Opcode,
    pub status: Status,
    pub message: String,
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} failed: {} ({})", self.op, self.status, self.message)
    }
}

impl std::error::Error for StatusError {}

pub fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// Registers a job, allocates one block per connection on core `core` through
/// that core's own port and, for gets, writes `size` bytes into each.
pub fn setup(
    main: SocketAddr,
    core: usize,
    op: Op,
    size: usize,
    conns: usize,
) -> anyhow::Result<PollenSetup> {
    let mut m = RawConn::connect(main)?;
    let info = NodeInfo::decode(&m.call(Opcode::NodeInfo, &[], &[])?)
        .map_err(|e| anyhow!("NodeInfo response: {e}"))?;
    if size > info.block_size as usize || size > info.max_body as usize {
        bail!(
            "--size {size} does not fit the node's block size ({}) or max body ({})",
            info.block_size,
            info.max_body
        );
    }
    let port = *info
        .core_ports
        .get(core)
        .ok_or_else(|| anyhow!("the node has {} core(s), no core {core}", info.core_ports.len()))?;
    let core_addr = SocketAddr::new(main.ip(), port);

    let job = format!("pollen-bench-{}", std::process::id());
    let id_body = m.call(Opcode::RegisterJob, job.as_bytes(), &[]).context("registering the bench job")?;
    let job_id: [u8; 4] =
        id_body.as_slice().try_into().map_err(|_| anyhow!("RegisterJob answered {} bytes", id_body.len()))?;
    let mut setup = PollenSetup { job, main, core_addr, blocks: Vec::new() };

    let result = (|| -> anyhow::Result<()> {
        let mut c = RawConn::connect(core_addr)?;
        let value = crate::wire::fill(size);
        for _ in 0..conns {
            let b = c.call(Opcode::BlockAlloc, &job_id, &[])?;
            let raw: [u8; 8] =
                b.as_slice().try_into().map_err(|_| anyhow!("BlockAlloc answered {} bytes", b.len()))?;
            let block = BlockId(u64::from_le_bytes(raw));
            if block.core() as usize != core {
                bail!("BlockAlloc on core {core}'s port returned a block of core {}", block.core());
            }
            if op == Op::Get {
                let key = BlockKey { block, offset: 0, len: size as u32 }.encode();
                let len = c.call(Opcode::BlockWrite, &key, &value)?;
                if len != (size as u32).to_le_bytes() {
                    bail!("BlockWrite of {size} bytes answered {len:?}");
                }
                // Read it back once: the measured gets must be real hits.
                let key = BlockKey { block, offset: 0, len: size as u32 }.encode();
                if c.call(Opcode::BlockRead, &key, &[])? != value {
                    bail!("block {:#x} does not read back what was written", block.0);
                }
            }
            setup.blocks.push(block);
        }
        Ok(())
    })();
    if let Err(e) = result {
        teardown(&setup);
        return Err(e.context("setting up the Pollen blocks"));
    }
    Ok(setup)
}

/// Frees the set-up's blocks when dropped.
pub struct SetupGuard(pub PollenSetup);

impl Drop for SetupGuard {
    fn drop(&mut self) {
        teardown(&self.0);
    }
}

/// Frees the bench's blocks by deregistering its job. Best effort: reports
/// a failure on stderr and carries on (the node may already be gone).
pub fn teardown(s: &PollenSetup) {
    let r = RawConn::connect(s.main).and_then(|mut c| c.call(Opcode::DeregisterJob, s.job.as_bytes(), &[]));
    if let Err(e) = r {
        eprintln!("pollen-bench: warning: could not deregister job {}: {e:#}", s.job);
    }
}
