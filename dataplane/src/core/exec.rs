//! Executing one request on the core that owns its data. Every call appends
//! exactly one response frame to `out`.

use std::collections::HashSet;
use std::sync::Arc;

use super::ring::Msg;
use super::{PendingIo, ReplyTo, State, Undo};
use crate::meta::log::Record;
use crate::meta::MetaError;
use crate::proto::{
    self, encode_header, flags, tier, BlockId, BlockKey, Header, JobHints, ObjectMeta, Opcode, Reader,
    Status, HEADER_LEN,
};
use crate::storage::{job_owner, Completion, FlashEngine, Owner, StorageError, FIRST_RESERVED_JOB_ID};
use crate::transport::Output;

/// What executing a request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// The response frame is in `out`.
    Done,
    /// Submitted to a flash or disk engine: the response is written when
    /// I/O slot `.0` completes.
    Pending(u32),
    /// The tier's queue is full: nothing was done and nothing was written;
    /// run the request again later.
    Busy,
    /// A namespace mutation: its answer is held until its log record is
    /// durable (`commit`), then sent to `to`.
    Held,
}

/// Appends the response to a flash or disk request that completed to a
/// connection's output. Read data stays in the buffer the device filled,
/// spliced into the output so the transport sends it from there, while the
/// engine's pool has buffers to spare; otherwise it is copied and the buffer
/// goes back at once.
pub fn respond_io_out(out: &mut Output, request_id: u64, opcode: u8, r: Result<Completion, StorageError>) {
    match r {
        Ok(Completion::Read(buf)) if buf.lendable() => {
            let h = Header {
                opcode,
                flags: 0,
                status: Status::Ok as u16,
                request_id,
                key_len: 0,
                body_len: buf.len() as u32,
            };
            let bytes = out.bytes_mut();
            let start = bytes.len();
            bytes.resize(start + HEADER_LEN, 0);
            encode_header(&h, &mut bytes[start..]);
            out.push_buf(buf);
        }
        r => respond_io(out.bytes_mut(), request_id, opcode, r),
    }
}

/// Appends the response to a flash or disk request that completed (read
/// data copied: for responses that travel to another core).
pub fn respond_io(out: &mut Vec<u8>, request_id: u64, opcode: u8, r: Result<Completion, StorageError>) {
    match r {
        Ok(Completion::Written { len }) => respond(out, request_id, opcode, Status::Ok, &len.to_le_bytes()),
        Ok(Completion::Read(buf)) => respond(out, request_id, opcode, Status::Ok, buf.bytes()),
        Ok(Completion::Persisted) => respond(out, request_id, opcode, Status::Ok, &[]),
        Err(e) => respond(out, request_id, opcode, e.status(), e.to_string().as_bytes()),
    }
}

/// Appends a response frame with `body`.
pub fn respond(out: &mut Vec<u8>, request_id: u64, opcode: u8, status: Status, body: &[u8]) {
    frame(out, request_id, opcode, 0, status, |o| o.extend_from_slice(body));
}

/// Appends the answer to a frame the node cannot accept; the connection closes after it.
pub fn respond_fatal(out: &mut Vec<u8>, request_id: u64, opcode: u8, status: Status, msg: &[u8]) {
    frame(out, request_id, opcode, flags::CLOSING, status, |o| o.extend_from_slice(msg));
}

/// Appends a response frame whose body `fill` writes in place.
pub fn respond_with(
    out: &mut Vec<u8>,
    request_id: u64,
    opcode: u8,
    status: Status,
    fill: impl FnOnce(&mut Vec<u8>),
) {
    frame(out, request_id, opcode, 0, status, fill);
}

fn frame(
    out: &mut Vec<u8>,
    request_id: u64,
    opcode: u8,
    flags: u16,
    status: Status,
    fill: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    fill(out);
    let body_len = out.len() - start - HEADER_LEN;
    debug_assert!(body_len <= u32::MAX as usize);
    let h =
        Header { opcode, flags, status: status as u16, request_id, key_len: 0, body_len: body_len as u32 };
    encode_header(&h, &mut out[start..]);
}

/// The longest error message an answer carries, in bytes.
const MAX_MESSAGE: usize = 256;

/// `msg` cut to at most `MAX_MESSAGE` bytes at a character boundary (a
/// message may name a path: the body stays UTF-8).
pub(super) fn clipped(msg: &str) -> &str {
    let mut end = msg.len().min(MAX_MESSAGE);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// A failed request: its status and a message for the body.
pub(super) struct Fail(pub Status, pub String);

impl From<MetaError> for Fail {
    fn from(e: MetaError) -> Fail {
        Fail(e.status, e.message)
    }
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Fail {
        Fail(e.status(), e.to_string())
    }
}

impl From<proto::DecodeError> for Fail {
    fn from(e: proto::DecodeError) -> Fail {
        Fail(Status::Malformed, e.0.to_string())
    }
}

/// The refusal of an opcode the node's role does not serve
/// (docs/protocol.md §7, "Node roles"): namespace opcodes on a storage-only
/// node are status 5 (the request went to the wrong node: the job's metadata
/// node is elsewhere); `BlockAlloc` on a metadata-only node is status 3 (it
/// holds no blocks for others, as a full node would answer). Other block
/// opcodes run on every node: a metadata-only node holds no blocks, so they
/// answer 1, and `FreeOwner` frees nothing.
pub(super) fn refused_by_role(role: crate::node::Role, op: Opcode) -> Option<Fail> {
    if op.is_namespace() && !role.metadata() {
        let msg = format!(
            "this node is storage-only: it serves no namespace ({op:?} goes to the job's metadata node)"
        );
        return Some(Fail(Status::Malformed, msg));
    }
    if op == Opcode::BlockAlloc && !role.storage() {
        let msg =
            "this node is metadata-only: it holds no blocks for others (BlockAlloc goes to a storage node)";
        return Some(Fail(Status::NoCapacity, msg.to_string()));
    }
    None
}

/// A BlockWrite's or BlockAppend's key against its body's length: the
/// gathered path and the streamed one (`stream.rs`) give the same answers.
pub(super) fn check_block_write(op: Opcode, k: &BlockKey, body_len: usize) -> Result<(), Fail> {
    match op {
        Opcode::BlockAppend if k.offset != 0 || k.len as usize != body_len => {
            Err(malformed("BlockAppend key needs offset 0 and the body length"))
        }
        Opcode::BlockWrite if k.len as usize != body_len => {
            Err(malformed("BlockWrite key length differs from the body length"))
        }
        _ => Ok(()),
    }
}

fn malformed(msg: &str) -> Fail {
    Fail(Status::Malformed, msg.to_string())
}

impl State {
    /// Executes a request, answering into `out` now or, for flash and disk
    /// block I/O, when the device completes (to `to`).
    pub(super) fn execute(
        &mut self,
        h: &Header,
        key: &[u8],
        body: &[u8],
        out: &mut Vec<u8>,
        to: ReplyTo,
    ) -> Exec {
        let start = out.len();
        let logged = self.commit.end();
        match self.try_execute(h, key, body, out, to) {
            Ok(Exec::Done) if self.commit.end() != logged => {
                // A mutation was logged: its answer waits for the record.
                let frame = out[start..].to_vec();
                out.truncate(start);
                self.hold(self.commit.end(), to, frame);
                Exec::Held
            }
            Ok(e) => e,
            Err(Fail(status, msg)) => {
                out.truncate(start);
                respond(out, h.request_id, h.opcode, status, clipped(&msg).as_bytes());
                Exec::Done
            }
        }
    }

    fn try_execute(
        &mut self,
        h: &Header,
        key: &[u8],
        body: &[u8],
        out: &mut Vec<u8>,
        to: ReplyTo,
    ) -> Result<Exec, Fail> {
        let (id, opc) = (h.request_id, h.opcode);
        let ok = Status::Ok;
        let Some(op) = h.op() else { return Err(malformed("unknown opcode")) };
        if h.flags != 0 && op != Opcode::PutObject {
            return Err(malformed("flags are only valid on PutObject"));
        }
        if let Some(fail) = refused_by_role(self.cfg.role, op) {
            return Err(fail);
        }
        if matches!(
            op,
            Opcode::RegisterJob
                | Opcode::DeregisterJob
                | Opcode::CreateDir
                | Opcode::PutObject
                | Opcode::Delete
        ) {
            self.log_usable()?;
        }
        match op {
            Opcode::Ping => respond(out, id, opc, ok, body),
            // Answered by the connection's core before execution (`gate`).
            Opcode::Auth => return Err(Fail(Status::Internal, "Auth reached execution".into())),
            Opcode::NodeInfo => respond(out, id, opc, ok, &self.cfg.node_info),
            Opcode::RegisterJob => {
                let name = job_name(key)?;
                let hints = JobHints::decode(body)?;
                let job = self.ns.register(name, hints)?;
                self.ns_changed = true;
                self.log(Record::Register { job: name, id: job, hints });
                respond(out, id, opc, ok, &job.to_le_bytes());
            }
            Opcode::DeregisterJob => {
                no_body(body)?;
                let name = job_name(key)?;
                // Its blocks on other nodes are the caller's to free (`FreeOwner`
                // there): the answer lists those to keep, of its PERSIST objects.
                let kept = self.ns.remote_persistent_blocks(name);
                // The job id, then the list (if any): checked before anything changes.
                let answer_len = match kept.is_empty() {
                    true => Ok(4),
                    false => proto::locations_len(&kept).map(|len| 4 + len),
                };
                if !answer_len.is_ok_and(|len| len <= self.cfg.limits.max_body) {
                    let msg = format!(
                        "job '{name}' keeps {} blocks of PERSIST objects on other nodes, more than one answer \
                         of at most {} bytes lists: delete some first",
                        kept.len(),
                        self.cfg.limits.max_body
                    );
                    return Err(Fail(Status::TooLarge, msg));
                }
                let job = self.ns.info(name)?.id;
                let r = self.ns.deregister(name)?;
                self.ns_changed = true;
                self.log(Record::Deregister { job: name });
                self.release_committed(r);
                respond_with(out, id, opc, ok, |o| {
                    o.extend_from_slice(&job.to_le_bytes());
                    if !kept.is_empty() {
                        proto::encode_locations(&kept, o);
                    }
                });
            }
            Opcode::JobInfo => {
                no_body(body)?;
                let info = self.ns.info(job_name(key)?)?;
                respond_with(out, id, opc, ok, |o| info.encode(o));
            }
            Opcode::Place => {
                let name = job_name(key)?;
                let mut r = Reader::new(body);
                let n = r.u32("block count")?;
                r.end("Place's body is a 4-byte block count")?;
                let max = proto::max_blocks(self.cfg.limits.max_body);
                if n == 0 || n as usize > max {
                    return Err(Fail(Status::Malformed, format!("block count {n} is not in 1..={max}")));
                }
                self.ns.info(name)?;
                self.refresh_view();
                let here = self.ns.node();
                let Some(map) = self.view.weights.get(name).cloned() else {
                    if !self.cfg.role.storage() {
                        let msg = format!(
                            "job '{name}' has no weight map yet and this node is metadata-only: \
                             it holds no blocks for others"
                        );
                        return Err(Fail(Status::NoCapacity, msg));
                    }
                    // No weight map: the job's blocks stay on this node.
                    respond_with(out, id, opc, ok, |o| {
                        for _ in 0..n {
                            o.extend_from_slice(&here.to_le_bytes());
                        }
                    });
                    return Ok(Exec::Done);
                };
                let dead = self.view.dead.clone();
                let drawable = map.drawable(|n| dead.contains(&n));
                if drawable.is_empty() {
                    if map.entries().iter().any(|&(_, w)| w > 0.0) {
                        let msg = format!("every node with a weight for job '{name}' is dead");
                        return Err(Fail(Status::DataUnavailable, msg));
                    }
                    let msg = format!("no node has a weight above 0 in job '{name}''s weight map");
                    return Err(Fail(Status::NoCapacity, msg));
                }
                let rng = &mut self.rng;
                respond_with(out, id, opc, ok, |o| {
                    for _ in 0..n {
                        let node = drawable.pick(rng.next_unit()).unwrap_or(here);
                        o.extend_from_slice(&node.to_le_bytes());
                    }
                });
            }
            Opcode::CreateDir => {
                no_body(body)?;
                let (job, path) = proto::split_job_key(key)?;
                self.ns.create_dir(job, path)?;
                self.log(Record::CreateDir { job, path });
                respond(out, id, opc, ok, &[]);
            }
            Opcode::PutObject => {
                let (job, path) = proto::split_job_key(key)?;
                let max_blocks = body.len() / proto::LOCATION_LEN;
                let meta = ObjectMeta::decode(body, max_blocks)?;
                if meta.flags != h.flags {
                    return Err(malformed("object flags in the body differ from the header flags"));
                }
                self.check_blocks(&meta.blocks)?;
                self.refresh_view();
                if let Some((i, node)) = self.view.first_dead(&meta.blocks) {
                    let msg = format!("block {i} is on node {node}, which is dead");
                    return Err(Fail(Status::DataUnavailable, msg));
                }
                let here = self.ns.node();
                let on_device = |l: &&proto::Location| l.block.tier() != tier::DRAM;
                let is_persist = meta.flags & flags::PERSIST != 0;
                if is_persist && meta.blocks.iter().filter(on_device).any(|l| l.node != here) {
                    return Err(malformed(
                        "a PERSIST object's flash and disk blocks must be on the metadata node \
                         (blocks on other nodes cannot be marked persistent yet)",
                    ));
                }
                let persist = is_persist && meta.blocks.iter().any(|l| on_device(&l));
                if persist && self.io_free.is_empty() {
                    return Ok(Exec::Busy);
                }
                let blocks = if persist { meta.blocks.clone() } else { Vec::new() };
                let logged = self.commit.log.is_some().then(|| meta.clone());
                self.ns.put(job, path, meta)?;
                self.ns_changed = true;
                if let Some(meta) = logged {
                    self.log(Record::Put { job, path, meta: std::borrow::Cow::Owned(meta), lost: false });
                }
                if persist {
                    let undo = Undo { job: job.to_string(), path: path.to_string(), blocks };
                    return Ok(self.persist(h, undo, to));
                }
                respond(out, id, opc, ok, &[]);
            }
            Opcode::Lookup => {
                no_body(body)?;
                let (job, path) = proto::split_job_key(key)?;
                self.refresh_view();
                let meta = self.ns.lookup(job, path)?;
                if let Some((i, node)) = self.view.first_dead(&meta.blocks) {
                    let msg = format!("block {i} of '{path}' is on node {node}, which is dead");
                    return Err(Fail(Status::DataUnavailable, msg));
                }
                respond_with(out, id, opc, ok, |o| meta.encode(o));
            }
            Opcode::Enumerate => {
                let (job, path) = proto::split_job_key(key)?;
                let after = std::str::from_utf8(body).map_err(|_| malformed("resume name is not UTF-8"))?;
                let (entries, more) = self.ns.enumerate(job, path, after, self.cfg.limits.max_body)?;
                let fl = if more { flags::MORE } else { 0 };
                frame(out, id, opc, fl, ok, |o| proto::encode_entries(&entries, o));
            }
            Opcode::Delete => {
                let (job, path) = proto::split_job_key(key)?;
                // A body makes it conditional: the ObjectMeta a Lookup
                // answered (the delete after a DELETE_AFTER_READ read).
                let read = if body.is_empty() {
                    None
                } else {
                    Some(ObjectMeta::decode(body, body.len() / proto::LOCATION_LEN)?)
                };
                // Blocks on other nodes are the client's to free: they go back in the answer.
                let remote = self.ns.remote_blocks(job, path);
                let r = match &read {
                    None => self.ns.delete(job, path)?,
                    Some(read) => self.ns.delete_if(job, path, read)?,
                };
                self.ns_changed = true;
                self.log(Record::Delete { job, path });
                self.release_committed(r);
                respond_with(out, id, opc, ok, |o| {
                    if !remote.is_empty() {
                        proto::encode_locations(&remote, o);
                    }
                });
            }
            Opcode::BlockAlloc => {
                no_body(body)?;
                let mut r = Reader::new(key);
                let job = r.u32("job id")?;
                let t = if key.len() > 4 { r.u8("tier")? } else { tier::DRAM };
                let meta_node = if key.len() > 5 { r.u16("metadata node")? } else { 0 };
                r.end("BlockAlloc key is a 4-byte job id, optionally a 1-byte tier, then a 2-byte metadata node")?;
                if job >= FIRST_RESERVED_JOB_ID {
                    return Err(malformed("job ids 0xfffffffe and 0xffffffff are reserved"));
                }
                let owner = job_owner(meta_node, job);
                let (t, spill) = (t & !tier::SPILL, t & tier::SPILL != 0);
                // A DRAM share with the rest below: past the job's share,
                // straight to the next tier this node has.
                let t = match self.tier_below(t) {
                    Some(lower) if t == tier::DRAM && spill && self.holds_dram_share(owner) => lower,
                    _ => t,
                };
                let b = match self.alloc_on(t, owner) {
                    // One step down, to the next tier this node has; its
                    // answer (a block, or its own `no capacity`) is final.
                    Err(Fail(Status::NoCapacity, msg)) if spill => match self.tier_below(t) {
                        Some(lower) => self.alloc_on(lower, owner)?,
                        None => return Err(Fail(Status::NoCapacity, msg)),
                    },
                    r => r?,
                };
                debug_assert!(b.tier() == t || (spill && b.tier() > t), "allocated on tier {}", b.tier());
                respond(out, id, opc, ok, &b.0.to_le_bytes());
            }
            Opcode::BlockWrite => {
                let k = BlockKey::decode(key)?;
                check_block_write(Opcode::BlockWrite, &k, body.len())?;
                if k.block.tier() != tier::DRAM {
                    return self.submit_io(h, k, body, to);
                }
                let len = self.dram.write(k.block, k.offset, body)?;
                respond(out, id, opc, ok, &len.to_le_bytes());
            }
            Opcode::BlockAppend => {
                let k = BlockKey::decode(key)?;
                check_block_write(Opcode::BlockAppend, &k, body.len())?;
                if k.block.tier() != tier::DRAM {
                    return self.submit_io(h, k, body, to);
                }
                let len = self.dram.append(k.block, body)?;
                respond(out, id, opc, ok, &len.to_le_bytes());
            }
            Opcode::BlockRead => {
                no_body(body)?;
                let k = BlockKey::decode(key)?;
                if k.block.tier() != tier::DRAM {
                    return self.submit_io(h, k, body, to);
                }
                let data = self.dram.read(k.block, k.offset, k.len)?;
                respond(out, id, opc, ok, data);
            }
            Opcode::BlockFree => {
                no_body(body)?;
                let k = BlockKey::decode(key)?;
                if k.offset != 0 || k.len != 0 {
                    return Err(malformed("BlockFree key needs offset 0 and length 0"));
                }
                match k.block.tier() {
                    tier::DRAM => self.dram.free(k.block)?,
                    t => engine(&mut self.engines, t)?.free(k.block)?,
                }
                respond(out, id, opc, ok, &[]);
            }
            Opcode::FreeOwner => {
                let mut r = Reader::new(key);
                let job = r.u32("job id")?;
                let meta_node = r.u16("metadata node")?;
                r.end("FreeOwner key is a 4-byte job id and a 2-byte metadata node")?;
                if job >= FIRST_RESERVED_JOB_ID {
                    return Err(malformed("job ids 0xfffffffe and 0xffffffff are reserved"));
                }
                if !body.len().is_multiple_of(8) {
                    return Err(malformed("FreeOwner body is 8-byte block ids"));
                }
                // The body is bounded by the frame limit; so is this set.
                let keep: HashSet<BlockId> = body
                    .chunks_exact(8)
                    .map(|c| BlockId(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
                    .collect();
                self.free_owner_everywhere(job_owner(meta_node, job), Arc::new(keep));
                respond(out, id, opc, ok, &[]);
            }
        }
        Ok(Exec::Done)
    }

    /// Hands a flash or disk block write, append or read (checked) to its
    /// engine; the answer goes to `to` when it completes.
    fn submit_io(&mut self, h: &Header, k: BlockKey, body: &[u8], to: ReplyTo) -> Result<Exec, Fail> {
        let e = engine(&mut self.engines, k.block.tier())?;
        let Some(slot) = self.io_free.pop() else { return Ok(Exec::Busy) };
        let token = slot as u64;
        let r = match h.op() {
            Some(Opcode::BlockWrite) => e.submit_write(token, k.block, k.offset, body),
            Some(Opcode::BlockAppend) => e.submit_append(token, k.block, body),
            Some(Opcode::BlockRead) => e.submit_read(token, k.block, k.offset, k.len),
            _ => unreachable!("only block I/O is submitted"),
        };
        match r {
            Ok(()) => {
                debug_assert!(self.io[slot as usize].is_none(), "I/O slot {slot} in use");
                self.io[slot as usize] = Some(PendingIo::new(to, h.request_id, h.opcode, 1));
                Ok(Exec::Pending(slot))
            }
            Err(StorageError::Busy) => {
                self.io_free.push(slot);
                Ok(Exec::Busy)
            }
            Err(err) => {
                self.io_free.push(slot);
                Err(err.into())
            }
        }
    }

    /// A PERSIST object is committed: its owning cores mark its flash and
    /// disk blocks persistent, and the put is answered once every mark is
    /// on the device (or undone if one fails). A slot must be free.
    fn persist(&mut self, h: &Header, undo: Undo, to: ReplyTo) -> Exec {
        let mut by_core: Vec<Vec<BlockId>> = vec![Vec::new(); self.cfg.cores];
        let here = self.ns.node();
        for l in undo.blocks.iter().filter(|l| l.node == here && l.block.tier() != tier::DRAM) {
            by_core[l.block.core() as usize].push(l.block);
        }
        let cores = by_core.iter().filter(|v| !v.is_empty()).count() as u32;
        let slot = self.io_free.pop().expect("the caller checked for a free slot");
        debug_assert!(self.io[slot as usize].is_none(), "I/O slot {slot} in use");
        let mut p = PendingIo::new(to, h.request_id, h.opcode, cores);
        p.undo = Some(Box::new(undo));
        self.io[slot as usize] = Some(p);
        let me = self.cfg.id;
        for (core, blocks) in by_core.into_iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            let m = Msg::Persist { origin: me, slot, blocks };
            if core == me as usize {
                // Queued: handed to the engine on the next pass.
                self.on_message(m);
            } else if let Some(o) = self.links.out[core].as_mut() {
                o.push(m);
            }
        }
        Exec::Pending(slot)
    }

    /// Takes the node's cluster state again if it changed since this core
    /// last read it (one atomic load when it did not).
    fn refresh_view(&mut self) {
        let v = self.cfg.cluster.version();
        if v != self.view_version {
            self.view = self.cfg.cluster.snapshot();
            self.view_version = v;
        }
    }

    /// Whether `owner` already holds this core's part of its DRAM share on
    /// this node (`Node::set_dram_shares`); false for a job without one.
    fn holds_dram_share(&mut self, owner: Owner) -> bool {
        self.refresh_view();
        let Some(&bytes) = self.view.dram_shares.get(&owner) else { return false };
        let blocks = bytes.div_ceil(u64::from(self.dram.block_size()));
        self.dram.held_by(owner) >= blocks.div_ceil(self.cfg.cores as u64)
    }

    /// A block for `job` on tier `t` of this core.
    fn alloc_on(&mut self, t: u8, owner: Owner) -> Result<BlockId, Fail> {
        Ok(match t {
            tier::DRAM => self.dram.alloc(owner)?,
            t => engine(&mut self.engines, t)?.alloc(owner)?,
        })
    }

    /// The next tier down from `t` (DRAM → flash → disk) that this node has.
    fn tier_below(&self, t: u8) -> Option<u8> {
        (t.saturating_add(1)..=tier::DISK).find(|&l| self.engines.iter().any(|e| e.tier() == l))
    }

    /// Blocks an object names on this node must be able to exist here
    /// (blocks on other nodes are not checked: this node does not know them).
    fn check_blocks(&self, blocks: &[proto::Location]) -> Result<(), Fail> {
        let here = self.ns.node();
        for b in blocks.iter().filter(|l| l.node == here).map(|l| l.block) {
            let tier_here = b.tier() == tier::DRAM || self.engines.iter().any(|e| e.tier() == b.tier());
            if !tier_here || b.core() as usize >= self.cfg.cores {
                return Err(Fail(Status::Malformed, format!("block {:#x} is not on this node", b.0)));
            }
        }
        Ok(())
    }
}

/// This core's engine for tier `t` (flash or disk), or `NotFound` saying
/// the node has no such tier.
pub(super) fn engine(engines: &mut [FlashEngine], t: u8) -> Result<&mut FlashEngine, Fail> {
    match engines.iter_mut().find(|e| e.tier() == t) {
        Some(e) => Ok(e),
        None => {
            let name = match t {
                tier::FLASH => "flash",
                tier::DISK => "disk",
                _ => return Err(Fail(Status::NotFound, format!("tier {t} does not exist"))),
            };
            Err(Fail(Status::NotFound, format!("this node has no {name} tier")))
        }
    }
}

fn job_name(key: &[u8]) -> Result<&str, Fail> {
    let (job, path) = proto::split_job_key(key)?;
    if !path.is_empty() || key.ends_with(b"/") {
        return Err(malformed("a job name has no '/'"));
    }
    Ok(job)
}

fn no_body(body: &[u8]) -> Result<(), Fail> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(malformed("this opcode takes no body"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Role;

    #[test]
    fn roles_refuse_what_they_do_not_serve() {
        let namespace = [
            Opcode::RegisterJob,
            Opcode::DeregisterJob,
            Opcode::CreateDir,
            Opcode::PutObject,
            Opcode::Lookup,
            Opcode::Enumerate,
            Opcode::Delete,
            Opcode::JobInfo,
            Opcode::Place,
        ];
        let blocks = [
            Opcode::BlockWrite,
            Opcode::BlockAppend,
            Opcode::BlockRead,
            Opcode::BlockFree,
            Opcode::FreeOwner,
        ];
        let always = [Opcode::Ping, Opcode::NodeInfo, Opcode::Auth];
        for op in namespace {
            let Some(Fail(status, msg)) = refused_by_role(Role::Storage, op) else {
                panic!("a storage-only node serves {op:?}")
            };
            assert_eq!(status, Status::Malformed);
            assert!(msg.contains("this node is storage-only"), "{msg}");
            assert!(refused_by_role(Role::Metadata, op).is_none(), "{op:?}");
        }
        let Some(Fail(status, msg)) = refused_by_role(Role::Metadata, Opcode::BlockAlloc) else {
            panic!("a metadata-only node allocates blocks")
        };
        assert_eq!(status, Status::NoCapacity);
        assert!(msg.contains("metadata-only"), "{msg}");
        assert!(refused_by_role(Role::Storage, Opcode::BlockAlloc).is_none());
        for op in namespace.into_iter().chain(blocks).chain(always).chain([Opcode::BlockAlloc]) {
            assert!(refused_by_role(Role::Both, op).is_none(), "{op:?}");
        }
        for op in blocks.into_iter().chain(always) {
            assert!(refused_by_role(Role::Storage, op).is_none(), "{op:?}");
            assert!(refused_by_role(Role::Metadata, op).is_none(), "{op:?}");
        }
    }
}
