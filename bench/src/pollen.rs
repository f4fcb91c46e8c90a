//! The Pollen target: an in-process one-core node (or a running one), and the
//! set-up of the blocks the load addresses, done over the raw protocol.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use dataplane::node::{NetBackend, Node, NodeConfig, PollMode, TierSpec};
use dataplane::proto::{
    decode_header, encode_frame, BlockId, BlockKey, Header, Limits, NodeInfo, Opcode, Status, HEADER_LEN,
};

use crate::cli::{Op, TierArg};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the bench needs to know about the node it measures.
pub struct PollenSetup {
    /// Job that owns the blocks (deregistered by `teardown`).
    job: String,
    main: SocketAddr,
    /// The port of the core that owns the blocks: requests take the direct path.
    pub core_addr: SocketAddr,
    /// One block per connection (get, put), or the working set (block workloads).
    pub blocks: Vec<BlockId>,
    /// The node's block size.
    pub block_size: usize,
}

/// Where the in-process node's blocks live.
pub struct TierPlan {
    pub tier: TierArg,
    /// The flash or disk tier's backing file, `tier_size` bytes.
    pub file: Option<std::path::PathBuf>,
    /// Bytes of the tier file; for the DRAM tier, the block workloads'
    /// working set (added to the DRAM arena).
    pub tier_size: u64,
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
        tier: &TierPlan,
    ) -> anyhow::Result<Self> {
        let block_size = size.next_power_of_two().max(64 << 10);
        let mut dram = (block_size as u64 * (conns as u64 + 16)).max(64 << 20);
        let spec = tier.file.as_ref().map(|p| TierSpec { path: p.clone(), size: Some(tier.tier_size) });
        let (mut flash, mut disk) = (None, None);
        match tier.tier {
            TierArg::Dram => dram += tier.tier_size,
            TierArg::Flash => flash = spec,
            TierArg::Disk => disk = spec,
        }
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
            // Every connection's block (and a DRAM working set), with room to spare.
            dram_bytes_per_core: dram,
            node_id: "bench".into(),
            flash,
            disk,
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

/// Registers a job and allocates blocks on tier `tier` of core `core` through
/// that core's own port: for get and put one block per connection (for gets
/// with `size` bytes written into each); for the block workloads as many
/// blocks as fit in `working_set` bytes (fewer if the tier fills first), each
/// written whole, so every read hits data and every byte of the file that the
/// workload touches has been written.
pub fn setup(
    main: SocketAddr,
    core: usize,
    op: Op,
    size: usize,
    conns: usize,
    tier: TierArg,
    working_set: u64,
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
    let block_size = info.block_size as usize;
    let mut setup = PollenSetup { job, main, core_addr, blocks: Vec::new(), block_size };
    let mut alloc_key = job_id.to_vec();
    if tier != TierArg::Dram {
        alloc_key.push(tier.byte());
    }

    let result = (|| -> anyhow::Result<()> {
        let mut c = RawConn::connect(core_addr)?;
        if op.is_block() {
            if block_size > info.max_body as usize {
                bail!("the node's block size {block_size} is above its max body {}", info.max_body);
            }
            let want = (working_set / block_size as u64).max(1);
            let value = crate::wire::fill(block_size);
            while (setup.blocks.len() as u64) < want {
                let b = match c.try_call(Opcode::BlockAlloc, &alloc_key, &[])? {
                    (Status::Ok, b) => b,
                    (Status::NoCapacity, _) if !setup.blocks.is_empty() => break,
                    (st, msg) => bail!(
                        "BlockAlloc on the {} tier failed: {st} ({})",
                        tier.name(),
                        String::from_utf8_lossy(&msg)
                    ),
                };
                let block = block_id(&b, core)?;
                setup.blocks.push(block);
                let key = BlockKey { block, offset: 0, len: block_size as u32 }.encode();
                c.call(Opcode::BlockWrite, &key, &value)?;
            }
            // Spot-check the first and the last block.
            for &block in [setup.blocks[0], setup.blocks[setup.blocks.len() - 1]].iter() {
                let key = BlockKey { block, offset: 0, len: block_size as u32 }.encode();
                if c.call(Opcode::BlockRead, &key, &[])? != value {
                    bail!("block {:#x} does not read back what was written", block.0);
                }
            }
            return Ok(());
        }
        let value = crate::wire::fill(size);
        for _ in 0..conns {
            let b = c.call(Opcode::BlockAlloc, &alloc_key, &[])?;
            let block = block_id(&b, core)?;
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

/// The block id in a `BlockAlloc` response, checked to be on `core`.
fn block_id(body: &[u8], core: usize) -> anyhow::Result<BlockId> {
    let raw: [u8; 8] = body.try_into().map_err(|_| anyhow!("BlockAlloc answered {} bytes", body.len()))?;
    let block = BlockId(u64::from_le_bytes(raw));
    if block.core() as usize != core {
        bail!("BlockAlloc on core {core}'s port returned a block of core {}", block.core());
    }
    Ok(block)
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
