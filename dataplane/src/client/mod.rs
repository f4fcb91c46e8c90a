//! The client library: Pocket's API over Pollen's wire protocol.
//!
//! A `Client` keeps one TCP connection per core of a node (opened on first
//! use, on the core's own port) so every request goes straight to the core
//! that owns its data. Object puts and gets are pipelined: up to
//! `window` requests are in flight per core, blocks of one object are spread
//! over the cores, and the next blocks' allocations ride in the same round
//! trip as the current blocks' writes.
//!
//! ```no_run
//! use dataplane::client::{Client, PutOptions};
//! use dataplane::proto::JobHints;
//!
//! let mut c = Client::connect("127.0.0.1:7400")?;
//! let job = c.register_job("wordcount", JobHints { latency_sensitive: true, ..Default::default() })?;
//! c.create_dir(&job, "shuffle")?;
//! c.put_buffer(&job, "shuffle/part-0", b"hello", PutOptions::default())?;
//! assert_eq!(c.get_buffer(&job, "shuffle/part-0")?, b"hello");
//! for e in c.enumerate(&job, "shuffle")? {
//!     println!("{} {} bytes", e.name, e.size);
//! }
//! c.deregister_job(&job)?;
//! # Ok::<(), dataplane::client::ClientError>(())
//! ```

mod conn;

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::proto::{
    self, flags, tier, BlockId, BlockKey, DirEntry, JobHints, JobInfo, NodeInfo, ObjectMeta, Opcode, Status,
};
use conn::{Conn, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error talking to {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("{status}: {message}")]
    Status { status: Status, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// The node's status code, when the node refused the request.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A registered job, as returned by `register_job` or `job`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub id: u32,
    /// The hints the job was registered with (as of `register_job` or
    /// `job`); they choose where its puts place blocks (`PutOptions::tier`).
    pub hints: JobHints,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PutOptions {
    /// Keep the object when its job is deregistered.
    pub persist: bool,
    /// Delete the object after its first complete read.
    pub delete_after_read: bool,
    /// The tier the object's blocks go to (`proto::tier`: DRAM, FLASH or
    /// DISK). `None` is the job's placement: a latency-sensitive job's
    /// blocks go to DRAM, and to flash once the core's DRAM is full (when
    /// the node has flash); other jobs' to flash when the node has it, else
    /// DRAM. With the job's `spill_over` hint a block whose tier is full goes
    /// to the next tier down; without it the put fails with `NoCapacity`.
    /// A tier the node lacks fails the put with `NotFound`.
    pub tier: Option<u8>,
}

impl PutOptions {
    fn flags(&self) -> u16 {
        (if self.persist { flags::PERSIST } else { 0 })
            | (if self.delete_after_read { flags::DELETE_AFTER_READ } else { 0 })
    }
}

pub struct Client {
    host: IpAddr,
    info: NodeInfo,
    conns: Vec<Option<Conn>>,
    timeout: Duration,
    window: usize,
    /// Next core for new blocks, so consecutive objects start on different cores.
    next_core: usize,
    /// The capability token every new connection presents (`Auth`).
    token: Option<String>,
}

/// Where an object's bytes come from or go to.
enum Source<'a> {
    Buf(&'a [u8]),
    File(&'a File),
}

impl Client {
    /// Connects to a node's main port and learns its cores and their ports.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let addrs: Vec<SocketAddr> =
            addr.to_socket_addrs().map_err(|e| ClientError::Local(format!("bad address: {e}")))?.collect();
        let addr = *addrs.first().ok_or_else(|| ClientError::Local("address resolves to nothing".into()))?;
        let timeout = Duration::from_secs(30);
        let stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(|source| ClientError::Io { addr, source })?;
        let mut first = Conn::new(stream, addr, timeout)?;
        let id = first.send(Opcode::NodeInfo, 0, &[], &[])?;
        first.flush()?;
        let body = first.expect(id)?.into_ok()?;
        let info = NodeInfo::decode(&body).map_err(|e| ClientError::Protocol(format!("node info: {e}")))?;
        Ok(Client {
            host: addr.ip(),
            conns: info.core_ports.iter().map(|_| None).collect(),
            info,
            timeout,
            window: 16,
            next_core: 0,
            token: None,
        })
    }

    pub fn node_info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn cores(&self) -> usize {
        self.info.core_ports.len()
    }

    pub fn block_size(&self) -> u64 {
        self.info.block_size as u64
    }

    /// Requests in flight per core during object puts and gets (default 16).
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// The capability token (`auth::Token::issue`) to present: each
    /// connection to a core sends it once (`Auth`) before its first request;
    /// open connections are dropped so they present the new one. A node
    /// with a cluster secret answers `unauthorized` to job requests without
    /// a valid token; one without a secret accepts any.
    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
        self.drop_all();
    }

    /// Socket timeout for every read and write (default 30 s).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
        for c in self.conns.iter_mut().flatten() {
            c.set_timeout(t);
        }
    }

    fn conn(&mut self, core: usize) -> Result<&mut Conn, ClientError> {
        if core >= self.conns.len() {
            return Err(ClientError::Protocol(format!("core {core} does not exist on this node")));
        }
        if self.conns[core].is_none() {
            let addr = SocketAddr::new(self.host, self.info.core_ports[core]);
            let s = TcpStream::connect_timeout(&addr, self.timeout)
                .map_err(|source| ClientError::Io { addr, source })?;
            let mut c = Conn::new(s, addr, self.timeout)?;
            c.set_max_body(self.info.max_body as usize);
            if let Some(t) = &self.token {
                let id = c.send(Opcode::Auth, 0, &[], t.as_bytes())?;
                c.flush()?;
                c.expect(id)?.into_ok()?;
            }
            self.conns[core] = Some(c);
        }
        Ok(self.conns[core].as_mut().expect("connected above"))
    }

    /// One request, one response, on `core`'s connection.
    fn call(
        &mut self,
        core: usize,
        op: Opcode,
        fl: u16,
        key: &[u8],
        body: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.call_flags(core, op, fl, key, body).map(|(_, body)| body)
    }

    /// `call`, also returning the response's flags.
    fn call_flags(
        &mut self,
        core: usize,
        op: Opcode,
        fl: u16,
        key: &[u8],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let r = (|| {
            let c = self.conn(core)?;
            let id = c.send(op, fl, key, body)?;
            c.flush()?;
            let resp = c.expect(id)?;
            let flags = resp.flags;
            Ok((flags, resp.into_ok()?))
        })();
        self.drop_broken(core, &r);
        r
    }

    /// A connection that failed mid-conversation, or that the node is
    /// closing, is dropped so the next call starts clean.
    fn drop_broken<T>(&mut self, core: usize, r: &Result<T, ClientError>) {
        if let Some(c) = self.conns.get_mut(core) {
            let broken = matches!(r, Err(ClientError::Io { .. } | ClientError::Protocol(_)));
            if broken || c.as_ref().is_some_and(|c| c.closing()) {
                *c = None;
            }
        }
    }

    /// After a failed multi-request exchange, replies may still be unread on
    /// any connection: start every connection afresh.
    fn drop_all(&mut self) {
        for c in &mut self.conns {
            *c = None;
        }
    }

    fn meta_core(&self, job: &str) -> usize {
        proto::meta_core(job, self.cores())
    }

    fn meta_call(
        &mut self,
        job: &str,
        op: Opcode,
        fl: u16,
        key: &[u8],
        body: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let core = self.meta_core(job);
        self.call(core, op, fl, key, body)
    }

    pub fn register_job(&mut self, name: &str, hints: JobHints) -> Result<Job, ClientError> {
        check_job_name(name)?;
        let body = self.meta_call(name, Opcode::RegisterJob, 0, name.as_bytes(), &hints.encode())?;
        Ok(Job { name: name.to_string(), id: u32_body(&body)?, hints })
    }

    /// A job registered earlier (by this or another client).
    pub fn job(&mut self, name: &str) -> Result<Job, ClientError> {
        let info = self.job_info(name)?;
        Ok(Job { name: name.to_string(), id: info.id, hints: info.hints })
    }

    pub fn job_info(&mut self, name: &str) -> Result<JobInfo, ClientError> {
        check_job_name(name)?;
        let body = self.meta_call(name, Opcode::JobInfo, 0, name.as_bytes(), &[])?;
        JobInfo::decode(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Frees the job's blocks, except those of PERSIST objects.
    pub fn deregister_job(&mut self, job: &Job) -> Result<(), ClientError> {
        self.meta_call(&job.name, Opcode::DeregisterJob, 0, job.name.as_bytes(), &[]).map(drop)
    }

    pub fn create_dir(&mut self, job: &Job, path: &str) -> Result<(), ClientError> {
        let key = path_key(job, path)?;
        self.meta_call(&job.name, Opcode::CreateDir, 0, key.as_bytes(), &[]).map(drop)
    }

    pub fn lookup(&mut self, job: &Job, name: &str) -> Result<ObjectMeta, ClientError> {
        let key = path_key(job, name)?;
        let body = self.meta_call(&job.name, Opcode::Lookup, 0, key.as_bytes(), &[])?;
        ObjectMeta::decode(&body, body.len() / 8).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Entries of a directory (`""` for the job's root), sorted by name.
    pub fn enumerate(&mut self, job: &Job, dir: &str) -> Result<Vec<DirEntry>, ClientError> {
        let key = if dir.is_empty() { job.name.clone() } else { path_key(job, dir)? };
        let core = self.meta_core(&job.name);
        let mut all = Vec::new();
        // A large directory comes in pages of at most the node's body limit.
        loop {
            let after = all.last().map_or("", |e: &DirEntry| e.name.as_str()).to_string();
            let (fl, body) = self.call_flags(core, Opcode::Enumerate, 0, key.as_bytes(), after.as_bytes())?;
            let page = proto::decode_entries(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let more = fl & flags::MORE != 0;
            if more && page.is_empty() {
                return Err(ClientError::Protocol("an empty listing page that claims more".into()));
            }
            all.extend(page);
            if !more {
                return Ok(all);
            }
        }
    }

    /// Deletes an object (freeing its blocks) or an empty directory.
    pub fn delete(&mut self, job: &Job, name: &str) -> Result<(), ClientError> {
        let key = path_key(job, name)?;
        self.meta_call(&job.name, Opcode::Delete, 0, key.as_bytes(), &[]).map(drop)
    }

    pub fn put_buffer(
        &mut self,
        job: &Job,
        name: &str,
        data: &[u8],
        opts: PutOptions,
    ) -> Result<(), ClientError> {
        self.put_object(job, name, data.len() as u64, Source::Buf(data), opts)
    }

    /// Puts a local file as object `name`; returns its size.
    pub fn put(&mut self, job: &Job, src: &Path, name: &str, opts: PutOptions) -> Result<u64, ClientError> {
        let f = File::open(src).map_err(|e| ClientError::Local(format!("open {}: {e}", src.display())))?;
        let size =
            f.metadata().map_err(|e| ClientError::Local(format!("stat {}: {e}", src.display())))?.len();
        self.put_object(job, name, size, Source::File(&f), opts)?;
        Ok(size)
    }

    pub fn get_buffer(&mut self, job: &Job, name: &str) -> Result<Vec<u8>, ClientError> {
        let meta = self.lookup(job, name)?;
        let size = usize::try_from(meta.size)
            .map_err(|_| ClientError::Local("object too large for memory".into()))?;
        let mut out = vec![0u8; size];
        self.read_blocks(&meta, |off, data| {
            out[off as usize..off as usize + data.len()].copy_from_slice(data);
            Ok(())
        })?;
        self.after_read(job, name, &meta)?;
        Ok(out)
    }

    /// Writes object `name` to a local file; returns its size.
    pub fn get(&mut self, job: &Job, name: &str, dst: &Path) -> Result<u64, ClientError> {
        let meta = self.lookup(job, name)?;
        let f =
            File::create(dst).map_err(|e| ClientError::Local(format!("create {}: {e}", dst.display())))?;
        f.set_len(meta.size).map_err(|e| ClientError::Local(format!("size {}: {e}", dst.display())))?;
        self.read_blocks(&meta, |off, data| {
            f.write_all_at(data, off).map_err(|e| ClientError::Local(format!("write {}: {e}", dst.display())))
        })?;
        self.after_read(job, name, &meta)?;
        Ok(meta.size)
    }

    fn after_read(&mut self, job: &Job, name: &str, meta: &ObjectMeta) -> Result<(), ClientError> {
        if meta.flags & flags::DELETE_AFTER_READ != 0 {
            match self.delete(job, name) {
                // Another reader got there first: the read itself succeeded.
                Err(e) if e.status() == Some(Status::NotFound) => {}
                r => r?,
            }
        }
        Ok(())
    }

    fn put_object(
        &mut self,
        job: &Job,
        name: &str,
        size: u64,
        src: Source,
        opts: PutOptions,
    ) -> Result<(), ClientError> {
        let key = path_key(job, name)?;
        let bs = self.block_size();
        let n = size.div_ceil(bs) as usize;
        let mut blocks: Vec<Option<BlockId>> = vec![None; n];
        let tier = self.placement(job, opts.tier);
        let written = self.write_blocks(job, size, &src, &mut blocks, tier);
        let result = written.and_then(|()| {
            let meta = ObjectMeta {
                size,
                flags: opts.flags(),
                blocks: blocks.iter().map(|b| b.expect("every block written")).collect(),
            };
            let mut body = Vec::with_capacity(14 + 8 * n);
            meta.encode(&mut body);
            self.meta_call(&job.name, Opcode::PutObject, opts.flags(), key.as_bytes(), &body).map(drop)
        });
        // Give back what this put allocated, unless the node may have
        // committed the object (PutObject sent, its answer lost): then the
        // blocks stay with the job and are freed when it is deregistered.
        let definite = match &result {
            Ok(()) => false,
            Err(ClientError::Status { .. } | ClientError::Local(_)) => true,
            Err(_) => blocks.iter().any(|b| b.is_none()),
        };
        if definite {
            for b in blocks.into_iter().flatten() {
                let _ = self.free_block(b);
            }
        }
        result
    }

    /// `BlockAlloc`'s tier byte for a put of `job` (Pocket's placement
    /// within a node, see `PutOptions::tier`): the tier, with
    /// `tier::SPILL` when a full tier may hand the block to the next one down.
    pub fn placement(&self, job: &Job, asked: Option<u8>) -> u8 {
        let spill = if job.hints.spill_over { tier::SPILL } else { 0 };
        let has_flash = self.info.has_tier(tier::FLASH);
        match asked {
            Some(t) => t | spill,
            // A DRAM share, the rest on flash.
            None if job.hints.latency_sensitive && has_flash => tier::DRAM | tier::SPILL,
            None if job.hints.latency_sensitive => tier::DRAM | spill,
            None if has_flash => tier::FLASH | spill,
            None => tier::DRAM | spill,
        }
    }

    /// Allocates and writes every block, spread round-robin over the cores,
    /// `window` requests in flight per core; `tier` is `BlockAlloc`'s tier byte.
    fn write_blocks(
        &mut self,
        job: &Job,
        size: u64,
        src: &Source,
        blocks: &mut [Option<BlockId>],
        tier: u8,
    ) -> Result<(), ClientError> {
        let bs = self.block_size();
        let cores = self.cores();
        let start = self.next_core;
        self.next_core = (start + blocks.len()) % cores;
        // Per core: the object's block indexes it holds, in order.
        let mut plan: Vec<Vec<usize>> = vec![Vec::new(); cores];
        for i in 0..blocks.len() {
            plan[(start + i) % cores].push(i);
        }
        let mut buf = vec![0u8; bs as usize];
        let window = self.window;
        let r = (|| {
            let mut allocated = vec![0usize; cores]; // per core: allocs sent
            let mut written = vec![0usize; cores]; // per core: writes sent
            loop {
                let mut inflight: Vec<HashMap<u64, (bool, usize)>> = vec![HashMap::new(); cores];
                // BlockAlloc's key: the job id, then the tier byte.
                let mut alloc_key = job.id.to_le_bytes().to_vec();
                alloc_key.push(tier);
                for core in 0..cores {
                    let idx = &plan[core];
                    // Writes for blocks whose ids are known...
                    let ready = (written[core]..allocated[core]).take(window).collect::<Vec<_>>();
                    for k in ready {
                        let i = idx[k];
                        let off = i as u64 * bs;
                        let len = (size - off).min(bs) as usize;
                        fill(src, off, &mut buf[..len])?;
                        let b = blocks[i].expect("allocated");
                        let key = BlockKey { block: b, offset: 0, len: len as u32 }.encode();
                        let c = self.conn(core)?;
                        let id = c.send(Opcode::BlockWrite, 0, &key, &buf[..len])?;
                        inflight[core].insert(id, (false, i));
                        written[core] = k + 1;
                    }
                    // ...and, in the same round trip, allocations for the next window.
                    let more = (allocated[core]..idx.len()).take(window).collect::<Vec<_>>();
                    for k in more {
                        let c = self.conn(core)?;
                        let id = c.send(Opcode::BlockAlloc, 0, &alloc_key, &[])?;
                        inflight[core].insert(id, (true, idx[k]));
                        allocated[core] = k + 1;
                    }
                    if !inflight[core].is_empty() {
                        self.conn(core)?.flush()?;
                    }
                }
                if inflight.iter().all(|m| m.is_empty()) {
                    return Ok(());
                }
                let mut first_err = None;
                for (core, mut pending) in inflight.into_iter().enumerate() {
                    while !pending.is_empty() {
                        let resp = self.conn(core)?.recv()?;
                        let Some((is_alloc, i)) = pending.remove(&resp.id) else {
                            return Err(ClientError::Protocol(format!("unexpected response id {}", resp.id)));
                        };
                        match resp.into_ok() {
                            Ok(body) if is_alloc => blocks[i] = Some(BlockId(u64_body(&body)?)),
                            Ok(_) => {}
                            Err(e) => first_err = first_err.or(Some(e)),
                        }
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        })();
        if r.is_err() {
            self.drop_all();
        }
        r
    }

    /// Reads every block of `meta`, `window` reads in flight per core, and
    /// hands each block's bytes to `sink` with the object offset.
    fn read_blocks(
        &mut self,
        meta: &ObjectMeta,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let bs = self.block_size();
        let cores = self.cores();
        let mut plan: Vec<Vec<usize>> = vec![Vec::new(); cores];
        for (i, b) in meta.blocks.iter().enumerate() {
            let core = b.core() as usize;
            if core >= cores {
                return Err(ClientError::Protocol(format!("block {:#x} names core {core}", b.0)));
            }
            plan[core].push(i);
        }
        let window = self.window;
        let r = (|| {
            let mut sent = vec![0usize; cores];
            loop {
                let mut inflight: Vec<HashMap<u64, usize>> = vec![HashMap::new(); cores];
                for core in 0..cores {
                    let end = (sent[core] + window).min(plan[core].len());
                    for &i in &plan[core][sent[core]..end] {
                        let key =
                            BlockKey { block: meta.blocks[i], offset: 0, len: BlockKey::TO_END }.encode();
                        let id = self.conn(core)?.send(Opcode::BlockRead, 0, &key, &[])?;
                        inflight[core].insert(id, i);
                    }
                    sent[core] = end;
                    if !inflight[core].is_empty() {
                        self.conn(core)?.flush()?;
                    }
                }
                if inflight.iter().all(|m| m.is_empty()) {
                    return Ok(());
                }
                for (core, mut pending) in inflight.into_iter().enumerate() {
                    while !pending.is_empty() {
                        let resp = self.conn(core)?.recv()?;
                        let Some(i) = pending.remove(&resp.id) else {
                            return Err(ClientError::Protocol(format!("unexpected response id {}", resp.id)));
                        };
                        let data = resp.into_ok()?;
                        let off = i as u64 * bs;
                        let want = (meta.size - off).min(bs);
                        if data.len() as u64 != want {
                            return Err(ClientError::Protocol(format!(
                                "block {i} holds {} bytes, the object needs {want}",
                                data.len()
                            )));
                        }
                        sink(off, &data)?;
                    }
                }
            }
        })();
        if r.is_err() {
            self.drop_all();
        }
        r
    }

    // Block-level access (Pocket's storage-tier API), for tools and benchmarks.

    /// Allocates a block for `job` on `core`.
    pub fn alloc_block(&mut self, job: &Job, core: usize) -> Result<BlockId, ClientError> {
        let body = self.call(core, Opcode::BlockAlloc, 0, &job.id.to_le_bytes(), &[])?;
        Ok(BlockId(u64_body(&body)?))
    }

    /// Allocates a block for `job` on `core` in tier `tier` (`proto::tier`:
    /// DRAM, FLASH or DISK). `NotFound` if the node has no such tier.
    pub fn alloc_block_on(&mut self, job: &Job, core: usize, tier: u8) -> Result<BlockId, ClientError> {
        let mut key = job.id.to_le_bytes().to_vec();
        key.push(tier);
        let body = self.call(core, Opcode::BlockAlloc, 0, &key, &[])?;
        Ok(BlockId(u64_body(&body)?))
    }

    /// Writes at `offset` (no holes); returns the block's new data length.
    pub fn write_block(&mut self, b: BlockId, offset: u32, data: &[u8]) -> Result<u32, ClientError> {
        let key = BlockKey { block: b, offset, len: data.len() as u32 }.encode();
        u32_body(&self.call(b.core() as usize, Opcode::BlockWrite, 0, &key, data)?)
    }

    pub fn append_block(&mut self, b: BlockId, data: &[u8]) -> Result<u32, ClientError> {
        let key = BlockKey { block: b, offset: 0, len: data.len() as u32 }.encode();
        u32_body(&self.call(b.core() as usize, Opcode::BlockAppend, 0, &key, data)?)
    }

    /// Up to `len` bytes from `offset` (`BlockKey::TO_END` for the rest).
    pub fn read_block(&mut self, b: BlockId, offset: u32, len: u32) -> Result<Vec<u8>, ClientError> {
        let key = BlockKey { block: b, offset, len }.encode();
        self.call(b.core() as usize, Opcode::BlockRead, 0, &key, &[])
    }

    pub fn free_block(&mut self, b: BlockId) -> Result<(), ClientError> {
        let key = BlockKey { block: b, offset: 0, len: 0 }.encode();
        self.call(b.core() as usize, Opcode::BlockFree, 0, &key, &[]).map(drop)
    }

    pub fn ping(&mut self, core: usize, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.call(core, Opcode::Ping, 0, &[], body)
    }
}

fn fill(src: &Source, off: u64, buf: &mut [u8]) -> Result<(), ClientError> {
    match src {
        Source::Buf(d) => {
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        Source::File(f) => {
            f.read_exact_at(buf, off).map_err(|e| ClientError::Local(format!("read source file: {e}")))
        }
    }
}

fn check_job_name(name: &str) -> Result<(), ClientError> {
    if name.is_empty() || name.contains('/') || name.len() > proto::MAX_KEY_LEN {
        return Err(ClientError::Local(format!("invalid job name '{name}'")));
    }
    Ok(())
}

fn path_key(job: &Job, path: &str) -> Result<String, ClientError> {
    let path = path.trim_start_matches('/');
    let key = format!("{}/{}", job.name, path);
    if path.is_empty() || key.len() > proto::MAX_KEY_LEN {
        return Err(ClientError::Local(format!("invalid object path '{path}'")));
    }
    proto::split_job_key(key.as_bytes())
        .map_err(|e| ClientError::Local(format!("invalid path '{path}': {e}")))?;
    Ok(key)
}

fn u32_body(b: &[u8]) -> Result<u32, ClientError> {
    <[u8; 4]>::try_from(b)
        .map(u32::from_le_bytes)
        .map_err(|_| ClientError::Protocol("expected a 4-byte body".into()))
}

fn u64_body(b: &[u8]) -> Result<u64, ClientError> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_le_bytes)
        .map_err(|_| ClientError::Protocol("expected an 8-byte body".into()))
}

impl Response {
    fn into_ok(self) -> Result<Vec<u8>, ClientError> {
        match self.status {
            Status::Ok => Ok(self.body),
            status => {
                Err(ClientError::Status { status, message: String::from_utf8_lossy(&self.body).into_owned() })
            }
        }
    }
}
