//! The client library: Pocket's API over Pollen's wire protocol.
//!
//! A `Client` keeps one TCP connection per core of a node (opened on first
//! use, on the core's own port) so every request goes straight to the core
//! that owns its data. Object puts and gets are pipelined: up to
//! `window` requests are in flight per core, blocks of one object are spread
//! over the cores, and the next blocks' allocations ride in the same round
//! trip as the current blocks' writes.
//!
//! The node a client connects to holds the namespaces (the metadata node).
//! An object's blocks may sit on other storage nodes, named by their node
//! numbers (`proto::Location`): the client reads and writes them there
//! directly, at the addresses `set_node_addrs` gives it, and puts new
//! blocks on the nodes `set_put_nodes` names (by default the metadata node
//! alone).
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
    self, flags, tier, BlockId, BlockKey, DirEntry, JobHints, JobInfo, Location, NodeInfo, ObjectMeta,
    Opcode, Reader, Status,
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

/// What [`Client::deregister_job_detailed`] did, and what it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deregistered {
    /// The job's id on its metadata node; with `meta_node`, the owner of
    /// its blocks on every storage node (`FreeOwner`).
    pub job_id: u32,
    pub meta_node: u16,
    /// Blocks of the job's PERSIST objects on nodes other than the metadata
    /// node: a `FreeOwner` to their node keeps them.
    pub kept: Vec<Location>,
    /// Nodes the client knows whose `FreeOwner` failed (node number, why).
    pub unfreed: Vec<(u16, String)>,
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
    ///
    /// With `persist`, `None` puts the blocks on the metadata node on flash
    /// (else disk) when it has it, whatever the job's hints, because only
    /// flash and disk blocks survive a node restart; blocks on other nodes
    /// (`set_put_nodes`) go to DRAM there, the one tier a PERSIST object
    /// may use on another node. A PERSIST object with a DRAM block is kept
    /// across `deregister_job` but not across a restart of that block's node.
    pub tier: Option<u8>,
}

impl PutOptions {
    fn flags(&self) -> u16 {
        (if self.persist { flags::PERSIST } else { 0 })
            | (if self.delete_after_read { flags::DELETE_AFTER_READ } else { 0 })
    }
}

/// One node's connections, one per core (opened on first use).
struct NodeConns {
    host: IpAddr,
    info: NodeInfo,
    conns: Vec<Option<Conn>>,
}

impl NodeConns {
    /// Connects to a node's main port and learns its cores and their ports,
    /// giving up after `connect` (the TCP connect and the `NodeInfo` answer).
    fn connect(addr: SocketAddr, connect: Duration) -> Result<NodeConns, ClientError> {
        let mut first = open(addr, connect)?;
        let id = first.send(Opcode::NodeInfo, 0, &[], &[])?;
        first.flush()?;
        let body = first.expect(id)?.into_ok()?;
        let info = NodeInfo::decode(&body).map_err(|e| ClientError::Protocol(format!("node info: {e}")))?;
        Ok(NodeConns { host: addr.ip(), conns: info.core_ports.iter().map(|_| None).collect(), info })
    }
}

/// A connection to `addr` whose connect, reads and writes give up after
/// `timeout`.
fn open(addr: SocketAddr, timeout: Duration) -> Result<Conn, ClientError> {
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| ClientError::Io { addr, source })?;
    Conn::new(stream, addr, timeout)
}

/// How long the client waits to connect to a node, and for the node's
/// first answer on a new connection, before the node counts as
/// unreachable (`Client::set_connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether an I/O error says the peer cannot be reached or went away
/// (refused, reset, timed out, closed mid-answer), rather than a failure of
/// the client's own machine (no descriptors, no memory, no local address).
fn peer_unreachable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | BrokenPipe
            | TimedOut
            | WouldBlock
            | UnexpectedEof
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
    )
}

/// A connection of the client: node `node` (index into `Client::nodes`), core `core`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Lane {
    node: usize,
    core: usize,
}

pub struct Client {
    /// `nodes[0]` is the node the client connected to: it holds the
    /// namespaces. Other storage nodes follow as blocks on them are used.
    nodes: Vec<NodeConns>,
    /// Node number → index in `nodes`, for the nodes connected so far.
    by_number: HashMap<u16, usize>,
    /// Where the other storage nodes are (`set_node_addrs`).
    node_addrs: HashMap<u16, SocketAddr>,
    /// Nodes new blocks go to, spread round-robin over their cores
    /// (`set_put_nodes`); empty: the metadata node.
    put_nodes: Vec<u16>,
    timeout: Duration,
    /// The bound on connecting to a node (`set_connect_timeout`).
    connect_timeout: Duration,
    window: usize,
    /// Next connection for new blocks, so consecutive objects start on different cores.
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
        Client::connect_timeout(addr, Duration::from_secs(30))
    }

    /// [`Client::connect`] giving up after `timeout` (connecting, and the
    /// node's answer to `NodeInfo`), which also becomes the client's timeout
    /// ([`Client::set_timeout`]). A zero `timeout` is refused.
    pub fn connect_timeout(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Client, ClientError> {
        if timeout.is_zero() {
            return Err(ClientError::Local("the connect timeout must be positive".into()));
        }
        let addrs: Vec<SocketAddr> =
            addr.to_socket_addrs().map_err(|e| ClientError::Local(format!("bad address: {e}")))?.collect();
        let addr = *addrs.first().ok_or_else(|| ClientError::Local("address resolves to nothing".into()))?;
        let home = NodeConns::connect(addr, timeout)?;
        let by_number = HashMap::from([(home.info.node_number, 0)]);
        Ok(Client {
            nodes: vec![home],
            by_number,
            node_addrs: HashMap::new(),
            put_nodes: Vec::new(),
            timeout,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            window: 16,
            next_core: 0,
            token: None,
        })
    }

    /// The metadata node's `NodeInfo` (the node `connect` was given).
    pub fn node_info(&self) -> &NodeInfo {
        &self.nodes[0].info
    }

    /// The metadata node's number.
    pub fn node_number(&self) -> u16 {
        self.nodes[0].info.node_number
    }

    pub fn cores(&self) -> usize {
        self.nodes[0].info.core_ports.len()
    }

    pub fn block_size(&self) -> u64 {
        self.nodes[0].info.block_size as u64
    }

    /// Where the other storage nodes are: node number → main address. Blocks
    /// on a node neither connected to nor listed here cannot be read or
    /// written. Until the controller hands these out, the caller does.
    /// Connections to nodes whose address changed are dropped.
    pub fn set_node_addrs(&mut self, addrs: impl IntoIterator<Item = (u16, SocketAddr)>) {
        self.node_addrs = addrs.into_iter().collect();
        let home = self.node_number();
        self.node_addrs.remove(&home);
        // Forget the other nodes: they reconnect at their (new) addresses on use.
        self.nodes.truncate(1);
        self.by_number.retain(|_, &mut i| i == 0);
    }

    /// The storage nodes new blocks go to, by number, spread round-robin
    /// over all their cores; each must be the metadata node or have an
    /// address (`set_node_addrs`). Empty: the metadata node alone (the
    /// default). At most 256 nodes (an object's blocks name at most 256).
    pub fn set_put_nodes(&mut self, nodes: &[u16]) -> Result<(), ClientError> {
        let mut v: Vec<u16> = Vec::with_capacity(nodes.len());
        for &n in nodes {
            if n != self.node_number() && !self.node_addrs.contains_key(&n) {
                return Err(ClientError::Local(format!("node {n} has no address (set_node_addrs)")));
            }
            if !v.contains(&n) {
                v.push(n);
            }
        }
        if v.len() > proto::MAX_NODES_PER_LIST {
            return Err(ClientError::Local("an object's blocks may be on at most 256 nodes".into()));
        }
        self.put_nodes = v;
        Ok(())
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
        for c in self.nodes.iter_mut().flat_map(|n| n.conns.iter_mut()).flatten() {
            c.set_timeout(t);
        }
    }

    /// How long connecting to a node may take: the TCP connect, and its
    /// first answer on the new connection (`NodeInfo`, or `Auth` with a
    /// token). Default [`DEFAULT_CONNECT_TIMEOUT`] (2 s), never more than
    /// the client's timeout. A storage node that does not answer within it
    /// is unreachable: a read of a block there fails with `data
    /// unavailable` (`get`, `get_buffer`). A zero timeout is refused.
    pub fn set_connect_timeout(&mut self, t: Duration) -> Result<(), ClientError> {
        if t.is_zero() {
            return Err(ClientError::Local("the connect timeout must be positive".into()));
        }
        self.connect_timeout = t;
        Ok(())
    }

    /// How long connecting to a node may take (`set_connect_timeout`).
    fn connect_bound(&self) -> Duration {
        self.connect_timeout.min(self.timeout)
    }

    /// The index in `nodes` of node `number`, connecting to it first if needed.
    fn node_index(&mut self, number: u16) -> Result<usize, ClientError> {
        if let Some(&i) = self.by_number.get(&number) {
            return Ok(i);
        }
        let Some(&addr) = self.node_addrs.get(&number) else {
            return Err(ClientError::Local(format!(
                "block on node {number}, whose address is unknown (set_node_addrs)"
            )));
        };
        let n = NodeConns::connect(addr, self.connect_bound())?;
        if n.info.node_number != number {
            return Err(ClientError::Protocol(format!(
                "{addr} is node {}, not node {number}",
                n.info.node_number
            )));
        }
        if n.info.block_size != self.nodes[0].info.block_size {
            return Err(ClientError::Protocol(format!(
                "node {number} has {}-byte blocks, the metadata node {}-byte blocks",
                n.info.block_size, self.nodes[0].info.block_size
            )));
        }
        self.nodes.push(n);
        self.by_number.insert(number, self.nodes.len() - 1);
        Ok(self.nodes.len() - 1)
    }

    fn lane_conn(&mut self, lane: Lane) -> Result<&mut Conn, ClientError> {
        let (timeout, connect, token) = (self.timeout, self.connect_bound(), self.token.as_deref());
        let Some(n) = self.nodes.get_mut(lane.node) else {
            return Err(ClientError::Local(format!("no node {} among the connected ones", lane.node)));
        };
        if lane.core >= n.conns.len() {
            let number = n.info.node_number;
            return Err(ClientError::Protocol(format!("core {} does not exist on node {number}", lane.core)));
        }
        if n.conns[lane.core].is_none() {
            let addr = SocketAddr::new(n.host, n.info.core_ports[lane.core]);
            let mut c = open(addr, connect)?;
            c.set_max_body(n.info.max_body as usize);
            if let Some(t) = token {
                let id = c.send(Opcode::Auth, 0, &[], t.as_bytes())?;
                c.flush()?;
                c.expect(id)?.into_ok()?;
            }
            c.set_timeout(timeout);
            n.conns[lane.core] = Some(c);
        }
        Ok(n.conns[lane.core].as_mut().expect("connected above"))
    }

    /// One request, one response, on `core`'s connection of the metadata node.
    fn call(
        &mut self,
        core: usize,
        op: Opcode,
        fl: u16,
        key: &[u8],
        body: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.call_lane(Lane { node: 0, core }, op, fl, key, body).map(|(_, body)| body)
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
        self.call_lane(Lane { node: 0, core }, op, fl, key, body)
    }

    /// One request, one response, on a connection; returns the response's flags and body.
    fn call_lane(
        &mut self,
        lane: Lane,
        op: Opcode,
        fl: u16,
        key: &[u8],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let r = (|| {
            let c = self.lane_conn(lane)?;
            let id = c.send(op, fl, key, body)?;
            c.flush()?;
            let resp = c.expect(id)?;
            let flags = resp.flags;
            Ok((flags, resp.into_ok()?))
        })();
        self.drop_broken(lane, &r);
        r
    }

    /// A connection that failed mid-conversation, or that the node is
    /// closing, is dropped so the next call starts clean.
    fn drop_broken<T>(&mut self, lane: Lane, r: &Result<T, ClientError>) {
        if let Some(c) = self.nodes.get_mut(lane.node).and_then(|n| n.conns.get_mut(lane.core)) {
            let broken = matches!(r, Err(ClientError::Io { .. } | ClientError::Protocol(_)));
            if broken || c.as_ref().is_some_and(|c| c.closing()) {
                *c = None;
            }
        }
    }

    /// After a failed multi-request exchange, replies may still be unread on
    /// any connection: start every connection afresh.
    fn drop_all(&mut self) {
        for c in self.nodes.iter_mut().flat_map(|n| n.conns.iter_mut()) {
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

    /// Deregisters the job and frees its blocks, except those of PERSIST
    /// objects: the metadata node frees its own; every other node this
    /// client knows (`set_node_addrs`) is told to free every block of the
    /// job but the PERSIST ones there (`FreeOwner`), including blocks that
    /// no object names (allocated by a put that never finished). A node
    /// that cannot be reached keeps them: the error says which; the job is
    /// deregistered all the same.
    pub fn deregister_job(&mut self, job: &Job) -> Result<(), ClientError> {
        let d = self.deregister_job_detailed(job)?;
        if d.unfreed.is_empty() {
            return Ok(());
        }
        let failed: Vec<String> = d.unfreed.iter().map(|(n, e)| format!("node {n}: {e}")).collect();
        Err(ClientError::Local(format!(
            "job '{}' was deregistered, but its blocks on {} other nodes could not be freed: {}",
            job.name,
            failed.len(),
            failed.join("; ")
        )))
    }

    /// As [`Client::deregister_job`], and says what is left to do: the
    /// job's owner on the storage nodes, the blocks each node must keep
    /// (PERSIST), and the nodes that could not be reached, so a caller
    /// (the controller) can send their `FreeOwner` later. `Err` only when
    /// the metadata node did not deregister the job.
    pub fn deregister_job_detailed(&mut self, job: &Job) -> Result<Deregistered, ClientError> {
        let home = self.node_number();
        let body = self.meta_call(&job.name, Opcode::DeregisterJob, 0, job.name.as_bytes(), &[])?;
        // Nodes before commit 'jobids' answered nothing: only their own blocks were theirs to free.
        if body.is_empty() {
            return Ok(Deregistered {
                job_id: job.id,
                meta_node: home,
                kept: Vec::new(),
                unfreed: Vec::new(),
            });
        }
        let id = u32_body(body.get(..4).unwrap_or(&body))?;
        let kept = if body.len() > 4 {
            let mut r = Reader::new(&body[4..]);
            proto::decode_locations(&mut r, body.len() / proto::LOCATION_LEN)
                .map_err(|e| ClientError::Protocol(format!("DeregisterJob answer: {e}")))?
        } else {
            Vec::new()
        };
        let mut key = id.to_le_bytes().to_vec();
        key.extend_from_slice(&home.to_le_bytes());
        let mut others: Vec<u16> = self.node_addrs.keys().copied().collect();
        others.sort_unstable();
        let mut unfreed = Vec::new();
        for n in others {
            let keep: Vec<u8> =
                kept.iter().filter(|l| l.node == n).flat_map(|l| l.block.0.to_le_bytes()).collect();
            let r = self
                .node_index(n)
                .and_then(|node| self.call_lane(Lane { node, core: 0 }, Opcode::FreeOwner, 0, &key, &keep));
            if let Err(e) = r {
                unfreed.push((n, e.to_string()));
            }
        }
        Ok(Deregistered { job_id: id, meta_node: home, kept, unfreed })
    }

    pub fn create_dir(&mut self, job: &Job, path: &str) -> Result<(), ClientError> {
        let key = path_key(job, path)?;
        self.meta_call(&job.name, Opcode::CreateDir, 0, key.as_bytes(), &[]).map(drop)
    }

    pub fn lookup(&mut self, job: &Job, name: &str) -> Result<ObjectMeta, ClientError> {
        let key = path_key(job, name)?;
        let body = self.meta_call(&job.name, Opcode::Lookup, 0, key.as_bytes(), &[])?;
        ObjectMeta::decode(&body, body.len() / proto::LOCATION_LEN)
            .map_err(|e| ClientError::Protocol(e.to_string()))
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

    /// Deletes an object (freeing its blocks) or an empty directory. The
    /// metadata node frees the object's blocks on itself and answers with
    /// those on other nodes, which the client frees there (`BlockFree`).
    pub fn delete(&mut self, job: &Job, name: &str) -> Result<(), ClientError> {
        self.delete_with(job, name, &[])
    }

    /// `Delete` with body `read` (empty: plain; an encoded ObjectMeta: only
    /// if the object is still that one, protocol §7).
    fn delete_with(&mut self, job: &Job, name: &str, read: &[u8]) -> Result<(), ClientError> {
        let key = path_key(job, name)?;
        let body = self.meta_call(&job.name, Opcode::Delete, 0, key.as_bytes(), read)?;
        if body.is_empty() {
            return Ok(());
        }
        let mut r = Reader::new(&body);
        let remote = proto::decode_locations(&mut r, body.len() / proto::LOCATION_LEN)
            .map_err(|e| ClientError::Protocol(format!("Delete answer: {e}")))?;
        let mut failed = Vec::new();
        for l in &remote {
            if let Err(e) = self.free_at(*l) {
                failed.push(format!("block {:#x} on node {}: {e}", l.block.0, l.node));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ClientError::Local(format!(
                "'{name}' was deleted, but {} of its blocks on other nodes could not be freed: {}",
                failed.len(),
                failed.join("; ")
            )))
        }
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

    /// The end of a get (`get`, `get_buffer` call it): if `meta`, as
    /// `lookup` answered it, has `DELETE_AFTER_READ`, deletes that object,
    /// and only that one: if another reader deleted it first, or another
    /// object was put under the name since, that is not an error and a newer
    /// object stays. For clients that read the blocks themselves
    /// (`read_block`) after a `lookup`.
    pub fn after_read(&mut self, job: &Job, name: &str, meta: &ObjectMeta) -> Result<(), ClientError> {
        if meta.flags & flags::DELETE_AFTER_READ != 0 {
            // Conditional: only the object this read looked up. Not found
            // means another reader deleted it first (a writer may have
            // put a newer object under the name since: it stays).
            let mut read =
                Vec::with_capacity(ObjectMeta::FIXED_LEN + 6 + proto::LOCATION_LEN * meta.blocks.len());
            meta.encode(&mut read);
            match self.delete_with(job, name, &read) {
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
        let mut blocks: Vec<Option<Location>> = vec![None; n];
        let written = self.write_blocks(job, size, &src, &mut blocks, opts);
        let result = written.and_then(|()| {
            let meta = ObjectMeta {
                size,
                flags: opts.flags(),
                blocks: blocks.iter().map(|b| b.expect("every block written")).collect(),
            };
            let mut body = Vec::with_capacity(ObjectMeta::FIXED_LEN + 6 + proto::LOCATION_LEN * n);
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
                let _ = self.free_at(b);
            }
        }
        result
    }

    /// Frees a block on its node.
    fn free_at(&mut self, l: Location) -> Result<(), ClientError> {
        let node = self.node_index(l.node)?;
        let key = BlockKey { block: l.block, offset: 0, len: 0 }.encode();
        let lane = Lane { node, core: l.block.core() as usize };
        self.call_lane(lane, Opcode::BlockFree, 0, &key, &[]).map(drop)
    }

    /// `BlockAlloc`'s tier byte for a put of `job` (Pocket's placement
    /// within a node, see `PutOptions::tier`): the tier, with
    /// `tier::SPILL` when a full tier may hand the block to the next one down.
    pub fn placement(&self, job: &Job, asked: Option<u8>) -> u8 {
        placement_on(&self.nodes[0].info, job, asked, Persist::No)
    }

    /// The tier byte of a `PERSIST` put's blocks on the metadata node: a
    /// restart-durable tier when the node has one (see `PutOptions::tier`).
    pub fn persist_placement(&self, job: &Job, asked: Option<u8>) -> u8 {
        placement_on(&self.nodes[0].info, job, asked, Persist::Here)
    }

    /// The connections new blocks go to: every core of every put node.
    fn put_lanes(&mut self) -> Result<Vec<Lane>, ClientError> {
        let numbers =
            if self.put_nodes.is_empty() { vec![self.node_number()] } else { self.put_nodes.clone() };
        let mut lanes = Vec::new();
        for number in numbers {
            let node = self.node_index(number)?;
            lanes.extend((0..self.nodes[node].conns.len()).map(|core| Lane { node, core }));
        }
        Ok(lanes)
    }

    /// Asks the job's metadata node where `count` new blocks of the job go
    /// (`Place`): one node number per block, drawn by the job's weight map
    /// (all the metadata node's own when the job has none).
    pub fn place(&mut self, job: &Job, count: u32) -> Result<Vec<u16>, ClientError> {
        let body = self.meta_call(&job.name, Opcode::Place, 0, job.name.as_bytes(), &count.to_le_bytes())?;
        if body.len() != 2 * count as usize {
            return Err(ClientError::Protocol(format!(
                "Place answered {} bytes for {count} blocks",
                body.len()
            )));
        }
        Ok(body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
    }

    /// The connection each of `n` new blocks of `job` is allocated on: over
    /// the put nodes' cores (`set_put_nodes`) round-robin; or, when the
    /// client knows other nodes (`set_node_addrs`) and no put nodes were
    /// set, on the nodes `Place` draws, round-robin over each node's cores;
    /// else over the metadata node's cores.
    fn assign_blocks(&mut self, job: &Job, n: usize) -> Result<Vec<Lane>, ClientError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let start = self.next_core;
        self.next_core = self.next_core.wrapping_add(n);
        if !self.put_nodes.is_empty() || self.node_addrs.is_empty() {
            let lanes = self.put_lanes()?;
            return Ok((0..n).map(|i| lanes[start.wrapping_add(i) % lanes.len()]).collect());
        }
        let count = u32::try_from(n).map_err(|_| ClientError::Local(format!("{n} blocks are too many")))?;
        let nodes = self.place(job, count)?;
        let mut next: HashMap<u16, usize> = HashMap::new();
        let mut out = Vec::with_capacity(n);
        for number in nodes {
            let node = self.node_index(number)?;
            let c = next.entry(number).or_insert(start);
            out.push(Lane { node, core: *c % self.nodes[node].conns.len() });
            *c = c.wrapping_add(1);
        }
        Ok(out)
    }

    /// Allocates and writes every block where `assign_blocks` puts it,
    /// `window` requests in flight per core; `asked` is the put's tier
    /// (placed per node, `placement`).
    fn write_blocks(
        &mut self,
        job: &Job,
        size: u64,
        src: &Source,
        blocks: &mut [Option<Location>],
        opts: PutOptions,
    ) -> Result<(), ClientError> {
        let r = self
            .assign_blocks(job, blocks.len())
            .and_then(|assign| self.write_lanes(job, size, src, blocks, opts, &assign));
        if r.is_err() {
            self.drop_all();
        }
        r
    }

    /// `write_blocks` with block *i* allocated on connection `assign[i]`.
    fn write_lanes(
        &mut self,
        job: &Job,
        size: u64,
        src: &Source,
        blocks: &mut [Option<Location>],
        opts: PutOptions,
        assign: &[Lane],
    ) -> Result<(), ClientError> {
        debug_assert_eq!(assign.len(), blocks.len());
        let bs = self.block_size();
        let (lanes, plan) = group_by_lane(assign);
        let count = lanes.len();
        // BlockAlloc's key per connection: the job id, the node's tier byte,
        // then the metadata node's number (the job id is unique on it alone).
        let home = self.node_number();
        let alloc_keys: Vec<Vec<u8>> = lanes
            .iter()
            .map(|l| {
                let info = &self.nodes[l.node].info;
                let persist = match opts.persist {
                    false => Persist::No,
                    true if info.node_number == home => Persist::Here,
                    true => Persist::Elsewhere,
                };
                alloc_key(job, placement_on(info, job, opts.tier, persist), home)
            })
            .collect();
        let numbers: Vec<u16> = lanes.iter().map(|l| self.nodes[l.node].info.node_number).collect();
        let mut buf = vec![0u8; bs as usize];
        let window = self.window;
        let mut allocated = vec![0usize; count]; // per connection: allocs sent
        let mut written = vec![0usize; count]; // per connection: writes sent
        loop {
            let mut inflight: Vec<HashMap<u64, (bool, usize)>> = vec![HashMap::new(); count];
            for (x, &lane) in lanes.iter().enumerate() {
                let idx = &plan[x];
                // Writes for blocks whose ids are known...
                let ready = (written[x]..allocated[x]).take(window).collect::<Vec<_>>();
                for k in ready {
                    let i = idx[k];
                    let off = i as u64 * bs;
                    let len = (size - off).min(bs) as usize;
                    fill(src, off, &mut buf[..len])?;
                    let b = blocks[i].expect("allocated").block;
                    let key = BlockKey { block: b, offset: 0, len: len as u32 }.encode();
                    let c = self.lane_conn(lane)?;
                    let id = c.send(Opcode::BlockWrite, 0, &key, &buf[..len])?;
                    inflight[x].insert(id, (false, i));
                    written[x] = k + 1;
                }
                // ...and, in the same round trip, allocations for the next window.
                let more = (allocated[x]..idx.len()).take(window).collect::<Vec<_>>();
                for k in more {
                    let c = self.lane_conn(lane)?;
                    let id = c.send(Opcode::BlockAlloc, 0, &alloc_keys[x], &[])?;
                    inflight[x].insert(id, (true, idx[k]));
                    allocated[x] = k + 1;
                }
                if !inflight[x].is_empty() {
                    self.lane_conn(lane)?.flush()?;
                }
            }
            if inflight.iter().all(|m| m.is_empty()) {
                return Ok(());
            }
            let mut first_err = None;
            for (x, mut pending) in inflight.into_iter().enumerate() {
                while !pending.is_empty() {
                    let resp = self.lane_conn(lanes[x])?.recv()?;
                    let Some((is_alloc, i)) = pending.remove(&resp.id) else {
                        return Err(ClientError::Protocol(format!("unexpected response id {}", resp.id)));
                    };
                    match resp.into_ok() {
                        Ok(body) if is_alloc => {
                            blocks[i] = Some(Location { node: numbers[x], block: BlockId(u64_body(&body)?) })
                        }
                        Ok(_) => {}
                        Err(e) => first_err = first_err.or(Some(e)),
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
    }

    /// Reads every block of `meta`, on whichever node holds it, `window`
    /// reads in flight per core, and hands each block's bytes to `sink`
    /// with the object offset.
    fn read_blocks(
        &mut self,
        meta: &ObjectMeta,
        sink: impl FnMut(u64, &[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let r = self.read_lanes(meta, sink);
        if r.is_err() {
            self.drop_all();
        }
        r
    }

    fn read_lanes(
        &mut self,
        meta: &ObjectMeta,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let bs = self.block_size();
        let mut assign = Vec::with_capacity(meta.blocks.len());
        for (i, l) in meta.blocks.iter().enumerate() {
            let node = self.node_index(l.node).map_err(|e| unavailable(i, l.node, e))?;
            let core = l.block.core() as usize;
            if core >= self.nodes[node].conns.len() {
                return Err(ClientError::Protocol(format!(
                    "block {:#x} names core {core}, which node {} does not have",
                    l.block.0, l.node
                )));
            }
            assign.push(Lane { node, core });
        }
        let (lanes, plan) = group_by_lane(&assign);
        let window = self.window;
        let mut sent = vec![0usize; lanes.len()];
        loop {
            let mut inflight: Vec<HashMap<u64, usize>> = vec![HashMap::new(); lanes.len()];
            for (x, &lane) in lanes.iter().enumerate() {
                let end = (sent[x] + window).min(plan[x].len());
                for &i in &plan[x][sent[x]..end] {
                    let key =
                        BlockKey { block: meta.blocks[i].block, offset: 0, len: BlockKey::TO_END }.encode();
                    let id = self
                        .lane_conn(lane)
                        .and_then(|c| c.send(Opcode::BlockRead, 0, &key, &[]))
                        .map_err(|e| unavailable(i, meta.blocks[i].node, e))?;
                    inflight[x].insert(id, i);
                }
                sent[x] = end;
                if !inflight[x].is_empty() {
                    let i = plan[x][end - 1];
                    self.lane_conn(lane)
                        .and_then(|c| c.flush())
                        .map_err(|e| unavailable(i, meta.blocks[i].node, e))?;
                }
            }
            if inflight.iter().all(|m| m.is_empty()) {
                return Ok(());
            }
            for (x, mut pending) in inflight.into_iter().enumerate() {
                while !pending.is_empty() {
                    let resp = self.lane_conn(lanes[x]).and_then(|c| c.recv()).map_err(|e| {
                        let i = pending.values().copied().min().unwrap_or(plan[x][0]);
                        unavailable(i, meta.blocks[i].node, e)
                    })?;
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
    }
}

/// A block read's failure: when block `block`'s node `node` cannot be
/// reached (`peer_unreachable`: refused, reset, timed out, closed), the
/// read fails with `data unavailable` naming the node and its address, as
/// the metadata node answers for a node the controller declared dead.
/// Other errors (the client's own: bad arguments, no local resources; a
/// node's answer; a protocol error) are kept as they are.
fn unavailable(block: usize, node: u16, e: ClientError) -> ClientError {
    match e {
        ClientError::Io { addr, source } if peer_unreachable(&source) => ClientError::Status {
            status: Status::DataUnavailable,
            message: format!("block {block} is on node {node} at {addr}, which cannot be reached: {source}"),
        },
        e => e,
    }
}

/// The distinct connections of `assign` (block *i* goes to `assign[i]`),
/// in first-use order, and per connection the block indexes it carries.
fn group_by_lane(assign: &[Lane]) -> (Vec<Lane>, Vec<Vec<usize>>) {
    let mut lanes: Vec<Lane> = Vec::new();
    let mut plan: Vec<Vec<usize>> = Vec::new();
    let mut lane_of: HashMap<Lane, usize> = HashMap::new();
    for (i, &lane) in assign.iter().enumerate() {
        let x = *lane_of.entry(lane).or_insert_with(|| {
            lanes.push(lane);
            plan.push(Vec::new());
            lanes.len() - 1
        });
        plan[x].push(i);
    }
    (lanes, plan)
}

/// Whether a put's blocks are for a `PERSIST` object, and where they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Persist {
    No,
    /// On the metadata node: its flash and disk blocks survive a restart.
    Here,
    /// On another node: only DRAM is accepted there (protocol.md §7
    /// `PutObject`), and none of it survives that node's restart.
    Elsewhere,
}

/// `BlockAlloc`'s tier byte for a put of `job` on a node described by
/// `info` (see `PutOptions::tier`).
fn placement_on(info: &NodeInfo, job: &Job, asked: Option<u8>, persist: Persist) -> u8 {
    let spill = if job.hints.spill_over { tier::SPILL } else { 0 };
    let has_flash = info.has_tier(tier::FLASH);
    match asked {
        Some(t) => t | spill,
        // A PERSIST object survives a restart only on flash or disk.
        None if persist == Persist::Here && has_flash => tier::FLASH | spill,
        None if persist == Persist::Here && info.has_tier(tier::DISK) => tier::DISK,
        None if persist == Persist::Elsewhere => tier::DRAM,
        // A DRAM share, the rest on flash.
        None if job.hints.latency_sensitive && has_flash => tier::DRAM | tier::SPILL,
        None if job.hints.latency_sensitive => tier::DRAM | spill,
        None if has_flash => tier::FLASH | spill,
        None => tier::DRAM | spill,
    }
}

impl Client {
    // Block-level access (Pocket's storage-tier API), for tools and benchmarks.

    /// Allocates a block for `job` on `core`.
    pub fn alloc_block(&mut self, job: &Job, core: usize) -> Result<BlockId, ClientError> {
        self.alloc_block_on(job, core, tier::DRAM)
    }

    /// Allocates a block for `job` on `core` in tier `tier` (`proto::tier`:
    /// DRAM, FLASH or DISK). `NotFound` if the node has no such tier.
    pub fn alloc_block_on(&mut self, job: &Job, core: usize, tier: u8) -> Result<BlockId, ClientError> {
        let key = alloc_key(job, tier, self.node_number());
        let body = self.call(core, Opcode::BlockAlloc, 0, &key, &[])?;
        Ok(BlockId(u64_body(&body)?))
    }

    /// Allocates a block for `job` on core `core` of node `node` (the
    /// metadata node or one with an address, `set_node_addrs`), in tier
    /// `tier`. It belongs to the job as its metadata node knows it: the
    /// job's deregistration frees it on every node the client knows.
    pub fn alloc_block_at(
        &mut self,
        job: &Job,
        node: u16,
        core: usize,
        tier: u8,
    ) -> Result<BlockId, ClientError> {
        let key = alloc_key(job, tier, self.node_number());
        let node = self.node_index(node)?;
        let (_, body) = self.call_lane(Lane { node, core }, Opcode::BlockAlloc, 0, &key, &[])?;
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

/// `BlockAlloc`'s key: the job id, the tier byte, and the number of the
/// job's metadata node unless it is 0 (what nodes before node numbers sent).
fn alloc_key(job: &Job, tier_byte: u8, meta_node: u16) -> Vec<u8> {
    let mut k = job.id.to_le_bytes().to_vec();
    k.push(tier_byte);
    if meta_node != 0 {
        k.extend_from_slice(&meta_node.to_le_bytes());
    }
    k
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

#[cfg(test)]
mod connect_tests {
    use super::*;

    /// A node that accepts but never answers `NodeInfo` fails the connect
    /// after its timeout, not the default 30 s.
    #[test]
    fn connect_gives_up_after_its_timeout() {
        let hang = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = hang.local_addr().expect("addr");
        let t = std::time::Instant::now();
        let e = Client::connect_timeout(addr, Duration::from_millis(200)).err().expect("no answer: an error");
        assert!(t.elapsed() < Duration::from_secs(5), "gave up after {:?}: {e}", t.elapsed());
        assert!(Client::connect_timeout(addr, Duration::ZERO).is_err(), "a zero timeout is refused");
    }

    /// A block read's I/O error is `data unavailable` when the node cannot
    /// be reached, and stays what it was when the client's own machine failed.
    #[test]
    fn unreachable_nodes_are_unavailable_and_local_failures_are_not() {
        let addr: SocketAddr = "127.0.0.1:7400".parse().expect("addr");
        let io = |kind| ClientError::Io { addr, source: std::io::Error::from(kind) };
        use std::io::ErrorKind::*;
        for kind in [ConnectionRefused, ConnectionReset, TimedOut, WouldBlock, UnexpectedEof, HostUnreachable]
        {
            let e = unavailable(3, 2, io(kind));
            assert_eq!(e.status(), Some(Status::DataUnavailable), "{kind:?}: {e}");
            assert!(e.to_string().contains("block 3 is on node 2 at 127.0.0.1:7400"), "{e}");
        }
        // EMFILE, ENOMEM, EADDRNOTAVAIL: this machine's trouble, not the node's.
        for e in [
            ClientError::Io {
                addr,
                source: std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32),
            },
            io(OutOfMemory),
            io(AddrNotAvailable),
        ] {
            let e = unavailable(0, 2, e);
            assert!(matches!(e, ClientError::Io { .. }), "{e}");
        }
        let e = unavailable(0, 2, ClientError::Local("bad".into()));
        assert!(matches!(e, ClientError::Local(_)), "{e}");
        let e = unavailable(0, 2, ClientError::Status { status: Status::NotFound, message: "x".into() });
        assert_eq!(e.status(), Some(Status::NotFound));
    }
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    fn info(tiers: &[u8]) -> NodeInfo {
        NodeInfo {
            block_size: 4096,
            max_body: 1 << 20,
            main_port: 1,
            node_number: 1,
            core_ports: vec![2],
            tiers: tiers.iter().fold(tier::bit(tier::DRAM), |b, &t| b | tier::bit(t)),
        }
    }

    fn job(latency_sensitive: bool, spill_over: bool) -> Job {
        Job {
            name: "j".into(),
            id: 1,
            hints: JobHints { latency_sensitive, spill_over, ..JobHints::default() },
        }
    }

    #[test]
    fn persist_puts_go_to_a_restart_durable_tier_on_the_metadata_node() {
        let flash = info(&[tier::FLASH]);
        let ls = job(true, false);
        // Latency-sensitive: DRAM first normally, flash for PERSIST.
        assert_eq!(placement_on(&flash, &ls, None, Persist::No), tier::DRAM | tier::SPILL);
        assert_eq!(placement_on(&flash, &ls, None, Persist::Here), tier::FLASH);
        assert_eq!(placement_on(&flash, &job(false, true), None, Persist::Here), tier::FLASH | tier::SPILL);
        assert_eq!(placement_on(&info(&[tier::DISK]), &ls, None, Persist::Here), tier::DISK);
        // No durable tier: DRAM as before (kept across deregistration only).
        assert_eq!(placement_on(&info(&[]), &ls, None, Persist::Here), tier::DRAM);
        assert_eq!(
            placement_on(&info(&[]), &job(false, true), None, Persist::Here),
            tier::DRAM | tier::SPILL
        );
        // On another node only DRAM is accepted for PERSIST, without spilling to flash.
        assert_eq!(placement_on(&flash, &job(false, true), None, Persist::Elsewhere), tier::DRAM);
        // A named tier is always kept.
        assert_eq!(placement_on(&flash, &ls, Some(tier::DRAM), Persist::Here), tier::DRAM);
    }
}
