//! The polling core: one pinned thread that owns its connections, its DRAM
//! tier, the namespaces of the jobs that hash to it, and its ends of the
//! SPSC rings. The run loop is bounded per pass:
//! rings in → network poll (parse, execute or forward) → send batched replies.

mod access;
mod commit;
mod exec;
pub mod pin;
pub mod ring;
mod stream;
pub mod waker;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::meta::{JobSummary, Namespaces};
use crate::node::{PollFault, PollMode};
use crate::proto::{self, BlockKey, Header, Limits, Opcode, Status, HEADER_LEN};
use crate::report::TierReport;
use crate::storage::flash::IoWindow;
use crate::storage::{
    is_job_owner, job_owner, Completion, DramTier, FlashEngine, Owner, StorageError, TierUsage,
};
use crate::transport::{ConnId, EventSink, Output, Transport};
use exec::Exec;
use ring::{Links, Msg};
use waker::Waker;

pub use commit::MetaStart;
pub use stream::STREAM_IDLE;

/// Stop reading a connection while this many response bytes wait to be sent.
pub const TX_HIGH_WATER: usize = 4 << 20;
/// Requests one connection may have in flight on other cores; past this the
/// connection stops being parsed and read until answers come back.
pub const MAX_AWAITING: u32 = 256;
/// Messages taken from one inbound ring per pass.
const RING_BATCH: usize = 256;
/// Forwarding buffers a core keeps for reuse. A request's buffer travels to
/// the owning core, carries the response back, and returns to this pool, so
/// forwarding allocates nothing in steady state.
const FRAME_POOL: usize = 256;
/// Larger forwarding buffers are not kept (bounds the pool to 32 MiB).
const POOLED_FRAME_MAX: usize = 128 << 10;
/// Minimum interval between publications of the job list.
const PUBLISH_JOBS_EVERY: Duration = Duration::from_millis(50);
/// Flash and disk requests a core keeps in flight per engine, at most (the
/// engines' own queue depths are lower, so this bound is never the one hit).
/// Persistence marks do not take these slots: they are counted in
/// `State::marking`, so PERSIST puts holding every slot still complete.
const IO_SLOTS_PER_ENGINE: usize = 256;
/// Engine tokens of persistence marks carry this bit (request tokens are I/O
/// slot numbers), with the origin core in bits 32..40 and its slot below.
const MARK_TOKEN: u64 = 1 << 63;
/// Minimum interval between publications of the flash and disk tiers' figures.
const PUBLISH_STORAGE_EVERY: Duration = Duration::from_millis(100);
/// How long a stopping core waits for storage I/O on its network ring.
const STORAGE_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What other threads may see of a core: lock-free counters, its waker, and a
/// job list it publishes off the request path.
pub struct CoreShared {
    pub waker: Arc<Waker>,
    /// Whether the core polls (spins while idle, per its poll mode); a core
    /// turned off by the controller parks as soon as it is idle and still
    /// serves what arrives. Set by the node's management thread.
    pub polling: AtomicBool,
    /// Whether the core takes new connections on the shared port (it
    /// follows `polling`, see `Transport::set_accepting`). Set by the core.
    pub accepting: AtomicBool,
    pub parked: AtomicBool,
    pub busy_ns: AtomicU64,
    /// The CPU the core thread is pinned to; `u64::MAX` when it is not (not
    /// asked, or pinning failed).
    pub pinned_cpu: AtomicU64,
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub forwarded: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub blocks_used: AtomicU64,
    pub blocks_total: AtomicU64,
    pub huge_pages: AtomicBool,
    /// Times the core went to sleep, and how many of those with flash or
    /// disk I/O in flight (woken by its completion).
    pub parks: AtomicU64,
    pub parks_with_io: AtomicU64,
    /// The core thread's Linux thread id (0 until it runs), for tests and
    /// tools that read its CPU time.
    pub tid: AtomicU64,
    pub jobs: Mutex<Vec<JobSummary>>,
    /// The core's flash and disk regions, published off the request path.
    pub storage: Mutex<Vec<StorageFigures>>,
    /// Work handed to the core from outside its run loop (the node's
    /// management thread), taken at the start of a pass when
    /// `external_pending` is set; the sender wakes the core.
    pub external: Mutex<Vec<External>>,
    pub external_pending: AtomicBool,
}

/// Work for a core from outside the data path (`CoreShared::external`).
#[derive(Debug, Clone)]
pub enum External {
    /// Free every block of `owner` on this core, on every tier, but `keep`
    /// (a `FreeOwner` the controller owed this node, see `Node::free_owner`).
    FreeOwner { owner: Owner, keep: Arc<HashSet<proto::BlockId>> },
    /// Storage node `node` restarted with a new epoch: objects of this
    /// core's namespaces that name its blocks are lost (and logged so).
    NodeLost { node: u16 },
}

impl CoreShared {
    pub fn new() -> std::io::Result<CoreShared> {
        Ok(CoreShared {
            waker: Arc::new(Waker::new()?),
            polling: AtomicBool::new(true),
            accepting: AtomicBool::new(true),
            parked: AtomicBool::new(false),
            busy_ns: AtomicU64::new(0),
            pinned_cpu: AtomicU64::new(u64::MAX),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            blocks_used: AtomicU64::new(0),
            blocks_total: AtomicU64::new(0),
            huge_pages: AtomicBool::new(false),
            parks: AtomicU64::new(0),
            parks_with_io: AtomicU64::new(0),
            tid: AtomicU64::new(0),
            jobs: Mutex::new(Vec::new()),
            storage: Mutex::new(Vec::new()),
            external: Mutex::new(Vec::new()),
            external_pending: AtomicBool::new(false),
        })
    }

    /// Hands `work` to the core and wakes it.
    pub fn send_external(&self, work: External) {
        self.external.lock().unwrap_or_else(|p| p.into_inner()).push(work);
        self.external_pending.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// Everything a core needs to know about its node.
pub struct CoreConfig {
    pub id: u8,
    pub cores: usize,
    pub poll_mode: PollMode,
    pub spin: Duration,
    pub limits: Limits,
    /// Encoded `NodeInfo` response body.
    pub node_info: Vec<u8>,
    /// Which opcodes the node serves (`exec::refused_by_role`).
    pub role: crate::node::Role,
    /// The cluster secret: when set, connections must present a capability
    /// token (`Auth`) before job-scoped requests.
    pub secret: Option<Arc<crate::auth::Secret>>,
    /// What the controller told the node about the cluster (weight maps).
    pub cluster: Arc<crate::meta::cluster::ClusterView>,
}

#[derive(Default)]
struct Conn {
    live: bool,
    gen: u32,
    /// What the connection's capability token allows (`Auth`).
    grant: Option<access::Grant>,
    /// Received bytes not yet parsed (an incomplete frame, or input held back
    /// by backpressure). Grows with the bytes that arrive (`append_partial`),
    /// shrinks once frames are small again (`trim_partial`).
    partial: Vec<u8>,
    /// The length of the incomplete frame `partial` starts with, once its
    /// header is in (0 when not known).
    frame_len: usize,
    /// Responses produced this pass, handed to the transport after the poll
    /// (flash reads spliced in as their buffers, not copied).
    tx: Output,
    dirty: bool,
    /// A fatal frame error was answered: discard input, close after sending.
    closing: bool,
    close_requested: bool,
    /// Backpressure: stop parsing and reading until output drains.
    paused: bool,
    /// A frame could not be dispatched: a forward could not be queued
    /// (ring full or too many in flight; parsing is retried every pass), or
    /// its tier's queue or the core's I/O slots are full (`waiting_io`).
    stalled: bool,
    /// Stalled by a full storage queue: in `State::io_wait`, parsed again
    /// once storage I/O freed room.
    waiting_io: bool,
    /// Reading is switched off in the transport (while paused or stalled).
    held: bool,
    /// Bytes the transport had not sent after the last flush (an upper bound
    /// until the next one).
    unsent: usize,
    /// The peer finished sending: close once every request is answered.
    peer_closed: bool,
    /// Requests forwarded to other cores whose responses have not come back.
    awaiting: u32,
    /// A flash or disk write whose body streams into a registered buffer
    /// as it arrives, instead of gathering in `partial` (`stream`).
    stream: Option<stream::Stream>,
    /// The frame `partial` starts with streamed, stalled and was demoted:
    /// it completes gathered (cleared when a whole frame is parsed).
    demoted: bool,
}

/// Where the answer to a flash or disk request goes when it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyTo {
    /// A connection of this core.
    Local { conn: ConnId, gen: u32 },
    /// A connection of core `origin`, which forwarded the request.
    Remote { origin: u8, conn: ConnId, gen: u32 },
}

/// A flash or disk request in flight, by its engine token.
pub(crate) struct PendingIo {
    pub to: ReplyTo,
    pub request_id: u64,
    pub opcode: u8,
    /// A forwarded request's buffer, which carries the response back.
    pub frame: Option<Vec<u8>>,
    /// Completions still to come before the answer: 1 for block I/O; for a
    /// PERSIST PutObject, one per core marking its blocks.
    pub remaining: u32,
    /// The first failure among them, which is the answer.
    pub failed: Option<StorageError>,
    /// A PERSIST PutObject: the object to take back out of the namespace if
    /// its blocks cannot be made persistent.
    pub undo: Option<Box<Undo>>,
}

impl PendingIo {
    pub(crate) fn new(to: ReplyTo, request_id: u64, opcode: u8, remaining: u32) -> PendingIo {
        debug_assert!(remaining > 0);
        PendingIo { to, request_id, opcode, frame: None, remaining, failed: None, undo: None }
    }
}

/// An object committed before its blocks were marked persistent.
pub(crate) struct Undo {
    pub job: String,
    pub path: String,
    pub blocks: Vec<proto::Location>,
}

/// Blocks this core marks persistent for core `origin`'s PutObject (slot `slot`).
struct MarkJob {
    origin: u8,
    slot: u32,
    blocks: Vec<proto::BlockId>,
    /// Blocks handed to their engine so far.
    next: usize,
}

/// The marks of one `MarkJob` still on the device, and the first failure.
struct Marking {
    remaining: u32,
    failed: Option<StorageError>,
}

/// Why a connection's frame could not be dispatched (`Conn::stalled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// Its forward could not be queued: nothing wakes the core when the
    /// peer drains its ring, so it is retried every pass.
    Forward,
    /// Its tier's queue or the core's I/O slots are full (`Exec::Busy`):
    /// retried once storage I/O freed room (`State::io_wait`).
    Io,
}

/// A forwarded request that found its tier's queue full, kept in arrival order.
struct Deferred {
    origin: u8,
    conn: ConnId,
    gen: u32,
    claim: access::BlockClaim,
    frame: Vec<u8>,
}

/// The part of a core that network events act on, split from the transport
/// so the transport can call into it during `poll`.
struct State {
    cfg: CoreConfig,
    shared: Arc<CoreShared>,
    links: Links,
    dram: DramTier,
    /// Flash and disk engines of this core, at most one per tier.
    engines: Vec<FlashEngine>,
    /// Flash and disk requests in flight, indexed by engine token.
    io: Vec<Option<PendingIo>>,
    io_free: Vec<u32>,
    /// Completions taken from an engine, answered right after.
    io_done: Vec<(u64, Result<Completion, StorageError>)>,
    /// Forwarded requests waiting for room in a tier's queue; while any
    /// wait, later forwarded requests queue behind them (order is kept).
    deferred: VecDeque<Deferred>,
    /// Persistence marks to hand to the engines, in arrival order.
    marks: VecDeque<MarkJob>,
    /// Marks on the device, by (origin core, origin's I/O slot): index
    /// `origin * io.len() + slot`. An origin's slot is held until every
    /// core answered its marks, so entries never collide, and the table
    /// (sized at start) bounds marks without taking request slots: a mark
    /// waiting for a slot that requests hold would never free them.
    marking: Vec<Option<Marking>>,
    ns: Namespaces,
    ns_changed: bool,
    /// The cluster state this core last read (`cfg.cluster`), and its version.
    view: Arc<crate::meta::cluster::ClusterState>,
    view_version: u64,
    /// Random numbers for `Place`.
    rng: crate::meta::cluster::PlaceRng,
    /// The metadata log and the answers waiting for it.
    commit: commit::Commit,
    /// When tokens expire is checked against this clock, read once per
    /// receive (only on nodes with a cluster secret).
    access_now: Instant,
    conns: Vec<Conn>,
    /// Connections with output in `tx`.
    dirty: Vec<ConnId>,
    /// Connections to re-parse next pass (stalled forwards, resumed input).
    retry: Vec<ConnId>,
    /// Connections stalled by a full storage queue (`Exec::Busy`), in the
    /// order they stalled: re-parsed only once something may have freed
    /// room (`io_room_changed`), not every pass, so a core whose device
    /// holds every slot sleeps until a completion wakes it.
    io_wait: Vec<ConnId>,
    /// Storage I/O freed room since `io_wait` was last retried: requests
    /// were delivered, an I/O slot was given back.
    io_freed: bool,
    /// The engines' `buffers_returned` when `io_wait` was last retried: a
    /// read's buffer comes back when its answer is sent, not delivered.
    buffers_seen: u64,
    /// Connections that became paused or stalled this pass.
    hold: Vec<ConnId>,
    /// Connections whose reading is switched off.
    held: Vec<ConnId>,
    /// Connections handed output this pass (to refresh `Conn::unsent`).
    sent: Vec<ConnId>,
    scratch: Vec<u8>,
    /// Recycled forwarding buffers (see `FRAME_POOL`).
    frames: Vec<Vec<u8>>,
    requests: u64,
    forwarded: u64,
    /// Counts of streamed writes, by tier (`stream::tier_index`).
    stream_stats: [stream::StreamStats; 3],
    /// Streamed bodies to look at for progress (`stream::Watch`).
    stream_watch: stream::Watch,
    bytes_in: u64,
    bytes_out: u64,
    connections: u64,
}

pub struct Core<T: Transport> {
    transport: T,
    st: State,
    stop: Arc<AtomicBool>,
    peers: Arc<Vec<Arc<CoreShared>>>,
    /// Whether the core takes new connections on the shared port: it
    /// follows `CoreShared::polling` (`Transport::set_accepting`).
    accepting: bool,
    /// Tests only: the poll fails once this fault is due (`PollFault`).
    poll_fault: Option<PollFault>,
}

impl<T: Transport> Core<T> {
    pub fn new(
        cfg: CoreConfig,
        transport: T,
        links: Links,
        dram: DramTier,
        mut engines: Vec<FlashEngine>,
        stop: Arc<AtomicBool>,
        peers: Arc<Vec<Arc<CoreShared>>>,
    ) -> Self {
        let shared = peers[cfg.id as usize].clone();
        // Persistent blocks of an earlier run stay allocated, owned by no job
        // of this one: job ids start over with the node, and a new job with
        // an old id must not free them when it deregisters.
        for e in &mut engines {
            let mut by_owner: HashMap<Owner, HashSet<proto::BlockId>> = HashMap::new();
            for &(id, owner, _) in e.recovered_persistent() {
                let owner = owner as Owner;
                if is_job_owner(owner) {
                    by_owner.entry(owner).or_default().insert(id);
                }
            }
            for (owner, keep) in by_owner {
                let freed = e.free_owner(owner, &keep);
                debug_assert_eq!(freed, 0, "only recovered blocks are allocated at start");
            }
        }
        if cfg.poll_mode == PollMode::Adaptive {
            // Completions wake the core when it sleeps with I/O in flight.
            // A busy core never sleeps: it is spared the eventfd signals.
            // Those on the network's ring wake it by completing there.
            for e in engines.iter_mut().filter(|e| !e.is_shared()) {
                if let Err(error) = e.register_waker(shared.waker.fd()) {
                    tracing::warn!(core = cfg.id, %error, "storage completions cannot wake the core; it stays awake while I/O is in flight");
                }
            }
        }
        let u = dram.usage();
        shared.blocks_total.store(u.blocks_total, Ordering::Relaxed);
        shared.huge_pages.store(u.huge_pages, Ordering::Relaxed);
        // Replaced by the node's namespaces (`with_meta`) before the core runs.
        let ns = Namespaces::new(cfg.id, u.block_size, 0);
        let rng = crate::meta::cluster::PlaceRng::new(crate::meta::cluster::PlaceRng::seed_for(cfg.id));
        let io_slots = engines.len() * IO_SLOTS_PER_ENGINE;
        let cores = cfg.cores;
        Core {
            transport,
            st: State {
                cfg,
                shared,
                links,
                dram,
                engines,
                io: (0..io_slots).map(|_| None).collect(),
                marking: (0..io_slots * cores).map(|_| None).collect(),
                io_free: (0..io_slots as u32).rev().collect(),
                io_done: Vec::with_capacity(IO_SLOTS_PER_ENGINE),
                deferred: VecDeque::new(),
                marks: VecDeque::new(),
                ns,
                ns_changed: false,
                view: Arc::default(),
                view_version: 0,
                rng,
                commit: commit::Commit::default(),
                access_now: Instant::now(),
                conns: Vec::new(),
                dirty: Vec::new(),
                retry: Vec::new(),
                io_wait: Vec::new(),
                io_freed: false,
                buffers_seen: 0,
                hold: Vec::new(),
                held: Vec::new(),
                sent: Vec::new(),
                scratch: Vec::new(),
                frames: Vec::new(),
                requests: 0,
                forwarded: 0,
                stream_stats: Default::default(),
                stream_watch: Default::default(),
                bytes_in: 0,
                bytes_out: 0,
                connections: 0,
            },
            stop,
            peers,
            accepting: true,
            poll_fault: None,
        }
    }

    /// Tests only: makes the core's poll fail as `fault` says.
    pub fn with_poll_fault(mut self, fault: Option<PollFault>) -> Self {
        self.poll_fault = fault;
        self
    }

    /// The transport's poll, or the test fault once it is due.
    #[inline]
    fn poll_network(&mut self, timeout: Option<Duration>) -> std::io::Result<usize> {
        if let Some(f) = self.poll_fault {
            if self.st.requests >= f.after_requests {
                return f.trip();
            }
        }
        self.transport.poll(timeout, &mut self.st)
    }

    /// Runs until the node's stop flag is set. An error: the network poll
    /// failed and the core stopped at once (the caller stops the node:
    /// the core's connections are gone).
    pub fn run(mut self) -> Result<(), String> {
        let spin = self.st.cfg.spin;
        let busy_mode = self.st.cfg.poll_mode == PollMode::Busy;
        let mut idle_since: Option<Instant> = None;
        let mut last_jobs_publish = Instant::now();
        let mut last_storage_publish = Instant::now();
        self.st.publish_storage();
        let mut busy_ns = 0u64;
        // One clock read per pass: a pass starts when the previous one ended
        // (the clock was 7.6% of a core's time with two reads per pass).
        let mut pass = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let mut work = self.st.take_external();
            work += self.follow_polling();
            // Marks first: they complete the puts that hold I/O slots.
            work += self.st.run_marks();
            work += self.st.retry_deferred();
            work += self.st.drain_rings();
            work += self.st.retry_io_wait();
            work += self.st.retry_stalled();
            match self.poll_network(Some(Duration::ZERO)) {
                Ok(n) => work += n,
                Err(e) => return Err(self.poll_failed(e)),
            }
            work += self.st.reap_storage();
            work += self.st.run_log();
            work += self.finish_pass();

            let now = Instant::now();
            work += self.st.demote_idle_streams(now);
            // Job summaries go out at most every PUBLISH_JOBS_EVERY while
            // busy, and before an idle core parks: a change applied in the
            // last busy pass (a commit of the metadata log) must not wait
            // for the next request to be seen in the node's reports.
            if self.st.ns_changed && (work == 0 || now - last_jobs_publish >= PUBLISH_JOBS_EVERY) {
                if let Ok(mut jobs) = self.st.shared.jobs.try_lock() {
                    *jobs = self.st.ns.summaries();
                    self.st.ns_changed = false;
                    last_jobs_publish = now;
                }
            }
            let mut parked = false;
            if work > 0 {
                busy_ns += (now - pass).as_nanos() as u64;
                idle_since = None;
            } else if !busy_mode || !self.st.shared.polling.load(Ordering::Relaxed) {
                let since = *idle_since.get_or_insert(now);
                let spin = if self.st.shared.polling.load(Ordering::Relaxed) { spin } else { Duration::ZERO };
                if now - since >= spin {
                    self.park().map_err(|e| self.poll_failed(e))?;
                    idle_since = None;
                    parked = true;
                }
            }
            // The sleep is not part of the next pass.
            pass = if parked { Instant::now() } else { now };
            if !self.st.engines.is_empty() && now - last_storage_publish >= PUBLISH_STORAGE_EVERY {
                self.st.publish_storage();
                last_storage_publish = now;
            }
            self.st.publish(busy_ns);
        }
        self.drain_shared_storage();
        tracing::debug!(core = self.st.cfg.id, "core stopped");
        Ok(())
    }

    /// Logs a failed network poll; returns why the core stops. Storage I/O
    /// on the network's ring is not drained: the ring is what failed.
    fn poll_failed(&mut self, e: std::io::Error) -> String {
        tracing::error!(core = self.st.cfg.id, error = %e, "network poll failed; the core stops");
        format!("network poll failed: {e}")
    }

    /// A core turned off stops taking new connections on the shared port
    /// (and takes them again when turned on); one atomic load per pass.
    fn follow_polling(&mut self) -> usize {
        let on = self.st.shared.polling.load(Ordering::Relaxed);
        if on == self.accepting {
            return 0;
        }
        // Not retried on failure: the core serves either way.
        self.accepting = on;
        match self.transport.set_accepting(on, &mut self.st) {
            Ok(n) => {
                tracing::info!(core = self.st.cfg.id, accepting = on, "shared port");
                self.st.shared.accepting.store(on, Ordering::Relaxed);
                n + 1
            }
            Err(e) => {
                tracing::warn!(core = self.st.cfg.id, accepting = on, error = %e, "cannot change the shared port");
                1
            }
        }
    }

    /// Lets engines on the network's ring finish their I/O (and header
    /// flushes) while the ring is still there: their completions only come
    /// through the transport's poll. What is left after the grace period,
    /// an engine leaks the buffers of when it closes.
    fn drain_shared_storage(&mut self) {
        let deadline = Instant::now() + STORAGE_DRAIN_GRACE;
        while self.st.engines.iter().any(|e| e.is_shared() && e.has_work()) && Instant::now() < deadline {
            self.finish_pass();
            if let Err(e) = self.transport.poll(Some(Duration::from_millis(10)), &mut self.st) {
                tracing::error!(core = self.st.cfg.id, error = %e, "network ring failed while draining storage");
                break;
            }
            self.st.reap_storage();
        }
    }

    /// Hands produced output to the transport, applies backpressure and wakes
    /// peers that were sent messages. Returns units of work done.
    fn finish_pass(&mut self) -> usize {
        let st = &mut self.st;
        let mut work = 0;
        for id in std::mem::take(&mut st.dirty) {
            let c = &mut st.conns[id];
            c.dirty = false;
            if !c.live {
                continue;
            }
            if !c.tx.is_empty() {
                st.bytes_out += c.tx.len() as u64;
                self.transport.send_output(id, &mut c.tx);
                st.sent.push(id);
                work += 1;
            }
            if c.peer_closed && !c.closing && c.awaiting == 0 && !holds_frame(&c.partial, &st.cfg.limits) {
                // Every request the peer sent is answered: close like after
                // a fatal frame, once the answers are out.
                c.closing = true;
            }
            if c.closing && !c.close_requested {
                c.close_requested = true;
                self.transport.close(id);
            }
        }
        // This pass's answers go out first; then storage on the network's
        // ring, a batch per system call (`TierPolicy::submit_batch`), so the
        // device starts on the first operation while the next are submitted.
        let _ = self.transport.flush();
        if let Some(ring) = self.transport.shared_ring() {
            for e in st.engines.iter_mut().filter(|e| e.is_shared()) {
                work += e.submit_on(ring);
            }
        }
        for id in st.sent.drain(..) {
            st.conns[id].unsent = self.transport.unsent(id);
        }
        for id in std::mem::take(&mut st.hold) {
            let c = &mut st.conns[id];
            if c.live && (c.paused || c.stalled) && !c.held {
                c.held = true;
                self.transport.set_reading(id, false);
                st.held.push(id);
            }
        }
        // Release held connections: paused ones once their output drained,
        // stalled ones once a retry got their frames through.
        let mut i = 0;
        while i < st.held.len() {
            let id = st.held[i];
            let c = &mut st.conns[id];
            if !c.live || !c.held {
                st.held.swap_remove(i);
                continue;
            }
            if c.paused && c.tx.is_empty() && self.transport.unsent(id) == 0 {
                c.paused = false;
                c.unsent = 0;
                st.retry.push(id);
                work += 1;
            }
            if !c.paused && !c.stalled {
                c.held = false;
                self.transport.set_reading(id, true);
                st.held.swap_remove(i);
                work += 1;
            } else {
                i += 1;
            }
        }
        for (j, out) in st.links.out.iter_mut().enumerate() {
            let Some(out) = out else { continue };
            work += out.drain_overflow();
            if out.pushed {
                out.pushed = false;
                fence(Ordering::SeqCst);
                if self.peers[j].parked.load(Ordering::SeqCst) {
                    self.peers[j].waker.wake();
                }
            }
        }
        work
    }

    /// Sleeps in the transport until a network event or a wake-up; an
    /// error if the poll failed.
    fn park(&mut self) -> std::io::Result<()> {
        // Figures published on a timer would go stale while parked: a core
        // that could not publish them (a reader held the lock) runs another
        // pass rather than sleep with old figures out (tests poll them to
        // see buffers come back).
        let published = self.st.publish_storage();
        self.st.shared.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // Overflowed messages only move when this core runs: never park on them.
        let pending = self.st.links.inbound.iter().any(|c| !c.is_empty())
            || self.st.links.out.iter().flatten().any(|o| !o.overflow.is_empty())
            || !self.st.retry.is_empty()
            // Requests waiting for room in a storage queue (stalled
            // connections, deferred forwarded requests) are tried again
            // after I/O freed some: the core may sleep while an operation
            // in a ring will complete and wake it (polled ones: see below),
            // but runs another pass when room was freed and not yet tried,
            // or when nothing is in a ring to free it (slots held by
            // streamed writes' bodies or a PERSIST put's remote marks, say).
            || (!self.st.io_wait.is_empty() && self.st.io_wait_due())
            || (!self.st.deferred.is_empty() && !self.st.storage_in_ring())
            || !self.st.marks.is_empty()
            // The log's writer wakes the core when a batch is durable.
            || self.st.commit.has_work()
            // Interrupt-driven completions signal the waker, so the core may
            // sleep with such I/O in flight. A completion that lands after
            // this pass's reap (which followed the transport's drain of the
            // eventfd) leaves the eventfd readable: the poll below returns at
            // once, no wake-up is lost. Polled (IOPOLL) completions signal
            // nothing, and work an engine can move without one needs a pass.
            || !self.st.engines.iter().all(|e| e.can_park())
            || !published
            || self.stop.load(Ordering::SeqCst);
        if !pending {
            self.st.shared.parks.fetch_add(1, Ordering::Relaxed);
            if self.st.engines.iter().any(|e| e.has_work()) {
                self.st.shared.parks_with_io.fetch_add(1, Ordering::Relaxed);
            }
            // A failed header write waiting for its retry (its backoff), and
            // streamed bodies to look at for progress, need a pass once due:
            // sleep no longer than that.
            let timeout = self
                .st
                .engines
                .iter()
                .filter_map(|e| e.retry_due())
                .chain(self.st.stream_due())
                .min()
                .map(|due| due.saturating_duration_since(Instant::now()));
            let polled = self.poll_network(timeout);
            self.st.shared.parked.store(false, Ordering::SeqCst);
            polled?;
            self.finish_pass();
            return Ok(());
        }
        self.st.shared.parked.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl State {
    fn publish(&self, busy_ns: u64) {
        let s = &self.shared;
        s.busy_ns.store(busy_ns, Ordering::Relaxed);
        s.requests.store(self.requests, Ordering::Relaxed);
        s.forwarded.store(self.forwarded, Ordering::Relaxed);
        s.bytes_in.store(self.bytes_in, Ordering::Relaxed);
        s.bytes_out.store(self.bytes_out, Ordering::Relaxed);
        s.connections.store(self.connections, Ordering::Relaxed);
        let TierUsage { blocks_used, .. } = self.dram.usage();
        s.blocks_used.store(blocks_used, Ordering::Relaxed);
    }

    /// Publishes the flash and disk figures; false when skipped because a
    /// reader holds the lock.
    fn publish_storage(&self) -> bool {
        if self.engines.is_empty() {
            return true;
        }
        let Ok(mut s) = self.shared.storage.try_lock() else { return false };
        s.clear();
        s.extend(self.engines.iter().map(|e| {
            let mut f = storage_report(self.cfg.id as usize, e);
            self.stream_stats[stream::tier_index(e.tier())].fill(&mut f.row);
            f
        }));
        true
    }

    fn mark_dirty(&mut self, id: ConnId) {
        let c = &mut self.conns[id];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    fn drain_rings(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.links.inbound.len() {
            for _ in 0..RING_BATCH {
                let Ok(m) = self.links.inbound[i].pop() else { break };
                n += 1;
                match m {
                    Msg::Request { origin, conn, gen, claim, frame } if !self.deferred.is_empty() => {
                        self.deferred.push_back(Deferred { origin, conn, gen, claim, frame });
                    }
                    m => self.on_message(m),
                }
            }
        }
        n
    }

    fn on_message(&mut self, m: Msg) {
        match m {
            Msg::Request { origin, conn, gen, claim, frame } => {
                if let Err(frame) = self.run_forwarded(origin, conn, gen, claim, frame) {
                    self.deferred.push_back(Deferred { origin, conn, gen, claim, frame });
                }
            }
            Msg::Response { conn, gen, frame } => {
                if let Some(c) = self.conns.get_mut(conn) {
                    if c.live && c.gen == gen {
                        debug_assert!(c.awaiting > 0, "response for conn {conn} that awaits none");
                        c.awaiting = c.awaiting.saturating_sub(1);
                        if !c.closing {
                            c.tx.bytes_mut().extend_from_slice(&frame);
                            self.mark_dirty(conn);
                        }
                    }
                }
                // Responses come back to the core that sent the request: its buffer returns home.
                if self.frames.len() < FRAME_POOL && frame.capacity() <= POOLED_FRAME_MAX {
                    self.frames.push(frame);
                }
            }
            Msg::FreeBlocks(blocks) => {
                for b in blocks {
                    // A block already freed (e.g. by its job's deregistration) is fine.
                    if b.tier() == proto::tier::DRAM {
                        let _ = self.dram.free(b);
                    } else if let Some(e) = self.engines.iter_mut().find(|e| e.tier() == b.tier()) {
                        let _ = e.free(b);
                    }
                }
            }
            Msg::FreeJob { owner, keep } => {
                self.free_owner(owner, &keep);
            }
            Msg::Persist { origin, slot, blocks } => {
                debug_assert!(!blocks.is_empty());
                let i = origin as usize * self.io.len() + slot as usize;
                match self.marking.get_mut(i) {
                    Some(m @ None) => *m = Some(Marking { remaining: blocks.len() as u32, failed: None }),
                    _ => {
                        debug_assert!(
                            false,
                            "marks for slot {slot} of core {origin}: out of range or in use"
                        );
                        let result = Err(StorageError::Io { errno: nix::libc::EBUSY });
                        self.marks_done(origin, slot, result);
                        return;
                    }
                }
                // Run from the loop, never inside the PutObject that sent it.
                self.marks.push_back(MarkJob { origin, slot, blocks, next: 0 });
            }
            Msg::Persisted { slot, result } => {
                self.complete_io(slot as u64, result.map(|()| Completion::Persisted));
            }
        }
    }

    /// Hands queued persistence marks to the engines until a queue is full.
    /// Returns the marks handed over.
    fn run_marks(&mut self) -> usize {
        let mut n = 0;
        while let Some(mut m) = self.marks.pop_front() {
            let token = MARK_TOKEN | (u64::from(m.origin) << 32) | u64::from(m.slot);
            while m.next < m.blocks.len() {
                let b = m.blocks[m.next];
                let r = match self.engines.iter_mut().find(|e| e.tier() == b.tier()) {
                    Some(e) => e.mark_persistent(token, b),
                    None => Err(StorageError::NotFound),
                };
                match r {
                    Ok(()) => {}
                    Err(StorageError::Busy) => break,
                    // Freed meanwhile, say: counts as this block's answer.
                    Err(e) => self.complete_mark(token, Err(e)),
                }
                m.next += 1;
                n += 1;
            }
            if m.next < m.blocks.len() {
                self.marks.push_front(m);
                break;
            }
        }
        n
    }

    /// One mark of a `MarkJob` completed; the last one answers its origin.
    fn complete_mark(&mut self, token: u64, r: Result<Completion, StorageError>) {
        let (origin, slot) = ((token >> 32) as u8, token as u32);
        let i = origin as usize * self.io.len() + slot as usize;
        let Some(Some(m)) = self.marking.get_mut(i) else {
            debug_assert!(false, "mark completion for slot {slot} of core {origin}, which is not marking");
            return;
        };
        if let Err(e) = r {
            m.failed.get_or_insert(e);
        }
        debug_assert!(m.remaining > 0);
        m.remaining = m.remaining.saturating_sub(1);
        if m.remaining > 0 {
            return;
        }
        let Some(m) = self.marking[i].take() else { return };
        self.marks_done(origin, slot, m.failed.map_or(Ok(()), Err));
    }

    /// Every mark this core made for core `origin`'s PutObject (slot `slot`)
    /// is on the device, or one failed: tells the put.
    fn marks_done(&mut self, origin: u8, slot: u32, result: Result<(), StorageError>) {
        if origin == self.cfg.id {
            self.complete_io(u64::from(slot), result.map(|()| Completion::Persisted));
        } else if let Some(o) = self.links.out[origin as usize].as_mut() {
            o.push(Msg::Persisted { slot, result });
        }
    }

    /// Executes a request forwarded by core `origin` and sends the answer
    /// back, now or when its I/O completes; a block request whose block
    /// `claim` does not cover is answered `unauthorized`. Gives the frame
    /// back when the tier's queue is full.
    fn run_forwarded(
        &mut self,
        origin: u8,
        conn: ConnId,
        gen: u32,
        claim: access::BlockClaim,
        mut frame: Vec<u8>,
    ) -> Result<(), Vec<u8>> {
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        let done = match proto::decode_header(&frame, &self.cfg.limits, true) {
            Ok(Some(h)) if h.frame_len() == frame.len() => {
                let (key, body) = frame[HEADER_LEN..].split_at(h.key_len as usize);
                if let Some(msg) = self.block_refusal(&h, key, claim) {
                    exec::respond(&mut out, h.request_id, h.opcode, Status::Unauthorized, msg.as_bytes());
                    Exec::Done
                } else {
                    self.execute(&h, key, body, &mut out, ReplyTo::Remote { origin, conn, gen })
                }
            }
            _ => {
                exec::respond(
                    &mut out,
                    frame_id(&frame),
                    frame.get(3).copied().unwrap_or(0),
                    Status::Internal,
                    b"corrupt forwarded frame",
                );
                Exec::Done
            }
        };
        match done {
            Exec::Busy => {
                self.scratch = out;
                return Err(frame);
            }
            Exec::Pending(slot) => {
                if let Some(p) = self.io[slot as usize].as_mut() {
                    p.frame = Some(frame);
                }
            }
            // The held answer travels back in its own buffer.
            Exec::Held => {}
            Exec::Done => {
                frame.clear();
                frame.extend_from_slice(&out);
                if let Some(o) = self.links.out[origin as usize].as_mut() {
                    o.push(Msg::Response { conn, gen, frame });
                }
            }
        }
        self.requests += 1;
        self.scratch = out;
        Ok(())
    }

    /// Runs deferred forwarded requests in order until one is still refused.
    fn retry_deferred(&mut self) -> usize {
        let mut n = 0;
        while let Some(d) = self.deferred.pop_front() {
            if let Err(frame) = self.run_forwarded(d.origin, d.conn, d.gen, d.claim, d.frame) {
                self.deferred.push_front(Deferred { frame, ..d });
                break;
            }
            n += 1;
        }
        n
    }

    /// Moves every engine's I/O along and answers the requests that completed.
    fn reap_storage(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.engines.len() {
            let mut done = std::mem::take(&mut self.io_done);
            let e = &mut self.engines[i];
            if e.is_shared() {
                // Its completions came in through the transport's poll.
                e.deliver(|token, r| done.push((token, r)));
            } else {
                e.poll_completions(|token, r| done.push((token, r)));
            }
            for (token, r) in done.drain(..) {
                self.complete_io(token, r);
                n += 1;
            }
            self.io_done = done;
        }
        // Each delivery gave its engine request slot back (marks' too).
        self.io_freed |= n > 0;
        n
    }

    fn complete_io(&mut self, token: u64, r: Result<Completion, StorageError>) {
        if token & MARK_TOKEN != 0 {
            self.complete_mark(token, r);
            return;
        }
        let slot = token as usize;
        let Some(p) = self.io.get_mut(slot).and_then(Option::as_mut) else {
            debug_assert!(false, "completion for I/O slot {slot}, which is not in flight");
            return;
        };
        if let Err(e) = &r {
            p.failed.get_or_insert_with(|| e.clone());
        }
        debug_assert!(p.remaining > 0, "I/O slot {slot} expects no completion");
        p.remaining = p.remaining.saturating_sub(1);
        if p.remaining > 0 {
            return;
        }
        let Some(mut p) = self.io[slot].take() else { return };
        self.io_free.push(slot as u32);
        // Also reached from a ring: a PERSIST put's remote marks answered.
        self.io_freed = true;
        // A PERSIST put (or its undoing) is logged: answered once durable.
        let logged = p.undo.is_some() && self.commit.log.is_some();
        let r = match p.failed.take() {
            Some(e) => Err(e),
            None => r,
        };
        if let (Some(u), Err(e)) = (p.undo.take(), &r) {
            // The object must not outlive its promise: take it back out
            // (unless it changed meanwhile) and free its blocks, which
            // clears the marks that did land.
            tracing::warn!(job = %u.job, path = %u.path, error = %e, "PERSIST object could not be marked; put undone");
            if let Some(rel) = self.ns.remove_object(&u.job, &u.path, &u.blocks) {
                self.ns_changed = true;
                self.log(crate::meta::log::Record::Delete { job: &u.job, path: &u.path });
                self.release(rel);
            }
        }
        if logged {
            let mut frame = p.frame.take().unwrap_or_default();
            frame.clear();
            exec::respond_io(&mut frame, p.request_id, p.opcode, r);
            self.hold(self.commit.end(), p.to, frame);
            return;
        }
        match p.to {
            ReplyTo::Local { conn, gen } => {
                self.answer_local(conn, gen, |tx| exec::respond_io_out(tx, p.request_id, p.opcode, r));
            }
            ReplyTo::Remote { origin, conn, gen } => {
                let mut frame = p.frame.unwrap_or_default();
                frame.clear();
                exec::respond_io(&mut frame, p.request_id, p.opcode, r);
                if let Some(o) = self.links.out[origin as usize].as_mut() {
                    o.push(Msg::Response { conn, gen, frame });
                }
            }
        }
    }

    /// Runs the work handed to the core from outside (`CoreShared::external`):
    /// one atomic load per pass when there is none.
    fn take_external(&mut self) -> usize {
        if !self.shared.external_pending.load(Ordering::Relaxed)
            || !self.shared.external_pending.swap(false, Ordering::AcqRel)
        {
            return 0;
        }
        let work = std::mem::take(&mut *self.shared.external.lock().unwrap_or_else(|p| p.into_inner()));
        for w in &work {
            match w {
                External::FreeOwner { owner, keep } => self.free_owner(*owner, keep),
                External::NodeLost { node } => {
                    let changed = self.ns.mark_node_lost(*node);
                    if !changed.is_empty() {
                        tracing::info!(
                            core = self.cfg.id,
                            node,
                            objects = changed.len(),
                            "objects marked lost: their node restarted"
                        );
                        self.ns_changed = true;
                    }
                    for (job, path, meta) in &changed {
                        self.log(crate::meta::log::Record::Put {
                            job,
                            path,
                            meta: std::borrow::Cow::Borrowed(meta),
                            lost: true,
                        });
                    }
                }
            }
        }
        work.len()
    }

    /// Frees every block `owner` allocated on this core, on every tier, but `keep`.
    fn free_owner(&mut self, owner: Owner, keep: &HashSet<proto::BlockId>) {
        self.dram.free_owner(owner, keep);
        for e in &mut self.engines {
            e.free_owner(owner, keep);
        }
    }

    /// Frees every block `owner` allocated on every core of this node, on
    /// every tier, but `keep`: here at once, on the other cores when they
    /// take the message from their ring.
    pub(crate) fn free_owner_everywhere(&mut self, owner: Owner, keep: Arc<HashSet<proto::BlockId>>) {
        self.free_owner(owner, &keep);
        for o in self.links.out.iter_mut().flatten() {
            o.push(Msg::FreeJob { owner, keep: keep.clone() });
        }
    }

    /// Whether an engine has operations in a ring, whose completion will
    /// come (and wake a parked core, `FlashEngine::can_park`).
    fn storage_in_ring(&self) -> bool {
        self.engines.iter().any(|e| e.in_ring())
    }

    /// The engines' data buffers given back so far (wrapping).
    fn buffers_returned(&self) -> u64 {
        self.engines.iter().fold(0u64, |n, e| n.wrapping_add(e.buffers_returned()))
    }

    /// Whether storage room may have been freed since `io_wait` was last
    /// retried: requests delivered (engine request slots, core I/O slots),
    /// a slot given back otherwise (`io_freed`), or a data buffer returned
    /// (a read's answer sent, a streamed write's buffer dropped).
    fn io_room_changed(&self) -> bool {
        self.io_freed || self.buffers_returned() != self.buffers_seen
    }

    /// Whether the connections in `io_wait` are to be parsed again now:
    /// room may have been freed, or no completion will come to free it
    /// (then every pass, so nothing waits for ever).
    fn io_wait_due(&self) -> bool {
        self.io_room_changed() || !self.storage_in_ring()
    }

    /// Re-parses the connections stalled by a full storage queue, in the
    /// order they stalled, once storage may have freed room. A connection
    /// that stalls again goes back to the end of the list; one that made
    /// no progress is not work, so the core may sleep until the next
    /// completion (`park`).
    fn retry_io_wait(&mut self) -> usize {
        if self.io_wait.is_empty() || !self.io_wait_due() {
            return 0;
        }
        self.io_freed = false;
        self.buffers_seen = self.buffers_returned();
        let mut ids = std::mem::take(&mut self.io_wait);
        let mut work = 0;
        for &id in &ids {
            let c = &mut self.conns[id];
            // Closed (or closed and reused) since it stalled: nothing waits.
            if !c.live || !c.waiting_io {
                continue;
            }
            c.waiting_io = false;
            c.stalled = false;
            let before = c.partial.len();
            self.parse_partial(id);
            let c = &self.conns[id];
            if !c.waiting_io || c.partial.len() != before {
                work += 1;
            }
        }
        // Keep the list's allocation (retries stalled again pushed a new one).
        if self.io_wait.is_empty() {
            ids.clear();
            self.io_wait = ids;
        }
        work
    }

    fn retry_stalled(&mut self) -> usize {
        if self.retry.is_empty() {
            return 0;
        }
        let ids = std::mem::take(&mut self.retry);
        for &id in &ids {
            // One waiting for storage room is retried with `io_wait`.
            if self.conns[id].live && !self.conns[id].waiting_io {
                self.conns[id].stalled = false;
                self.parse_partial(id);
            }
        }
        ids.len()
    }

    fn parse_partial(&mut self, id: ConnId) {
        let mut p = std::mem::take(&mut self.conns[id].partial);
        let (used, need) = self.parse(id, &p);
        p.drain(..used);
        trim_partial(&mut p, need);
        let c = &mut self.conns[id];
        (c.partial, c.frame_len) = (p, need);
    }

    /// Parses and dispatches complete frames from `buf`. Returns the bytes
    /// consumed and the size of the incomplete frame that follows (0 if
    /// unknown), so the caller can make room for it once.
    fn parse(&mut self, id: ConnId, buf: &[u8]) -> (usize, usize) {
        let mut off = 0;
        loop {
            let c = &self.conns[id];
            if c.closing {
                return (buf.len(), 0);
            }
            if c.paused || c.stalled {
                return (off, 0);
            }
            if c.tx.len() + c.unsent >= TX_HIGH_WATER {
                self.conns[id].paused = true;
                self.hold.push(id);
                return (off, 0);
            }
            let rest = &buf[off..];
            let h = match proto::decode_header(rest, &self.cfg.limits, true) {
                Ok(None) => return (off, 0),
                Ok(Some(h)) => h,
                Err(e) => {
                    let c = &mut self.conns[id];
                    exec::respond_fatal(
                        c.tx.bytes_mut(),
                        frame_id(rest),
                        rest[3],
                        e.status(),
                        e.to_string().as_bytes(),
                    );
                    c.closing = true;
                    self.mark_dirty(id);
                    return (buf.len(), 0);
                }
            };
            let len = h.frame_len();
            if rest.len() < len {
                if self.start_stream(id, &h, rest) {
                    return (buf.len(), 0);
                }
                return (off, len);
            }
            self.conns[id].demoted = false;
            if self.gate(id, &h, &rest[..len]) {
                // Answered here: `Auth`, or a request the token does not allow.
                off += len;
                continue;
            }
            if let Err(why) = self.dispatch(id, &h, &rest[..len]) {
                self.stall(id, why);
                return (off, 0);
            }
            off += len;
        }
    }

    /// Stops parsing connection `id` (and reading it) until it is retried:
    /// next pass for a forward, once storage freed room for `Stall::Io`.
    fn stall(&mut self, id: ConnId, why: Stall) {
        let c = &mut self.conns[id];
        debug_assert!(!c.stalled && !c.waiting_io);
        c.stalled = true;
        match why {
            Stall::Forward => self.retry.push(id),
            Stall::Io => {
                c.waiting_io = true;
                if self.io_wait.is_empty() {
                    // What freed room before now, this attempt saw.
                    self.io_freed = false;
                    self.buffers_seen = self.buffers_returned();
                }
                self.io_wait.push(id);
            }
        }
        self.hold.push(id);
    }

    /// Executes a frame here or forwards it to its owner. An error when the
    /// owner's ring is full or the connection has `MAX_AWAITING` forwards in
    /// flight (the caller retries next pass), or when the frame's storage
    /// queue or the core's I/O slots are full (retried once I/O freed room).
    fn dispatch(&mut self, id: ConnId, h: &Header, frame: &[u8]) -> Result<(), Stall> {
        let (key, body) = frame[HEADER_LEN..].split_at(h.key_len as usize);
        let owner = self.owner(h, key);
        let claim = self.block_claim(id);
        if owner == self.cfg.id as usize {
            if let Some(msg) = self.block_refusal(h, key, claim) {
                self.answer_here(id, h, Status::Unauthorized, msg);
                return Ok(());
            }
            let mut tx = std::mem::take(&mut self.conns[id].tx);
            let gen = self.conns[id].gen;
            let done = self.execute(h, key, body, tx.bytes_mut(), ReplyTo::Local { conn: id, gen });
            self.conns[id].tx = tx;
            match done {
                // Parsed again once a completion (or other I/O) freed room.
                Exec::Busy => return Err(Stall::Io),
                Exec::Pending(_) | Exec::Held => self.conns[id].awaiting += 1,
                Exec::Done => self.mark_dirty(id),
            }
            self.requests += 1;
            return Ok(());
        }
        let (gen, awaiting) = (self.conns[id].gen, self.conns[id].awaiting);
        if awaiting >= MAX_AWAITING {
            return Err(Stall::Forward);
        }
        let Some(out) = self.links.out[owner].as_mut() else { return Ok(()) };
        let mut buf = self.frames.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        let m = Msg::Request { origin: self.cfg.id, conn: id, gen, claim, frame: buf };
        if let Err(m) = out.try_push(m) {
            if let Msg::Request { frame, .. } = m {
                self.frames.push(frame);
            }
            return Err(Stall::Forward);
        }
        self.conns[id].awaiting += 1;
        self.forwarded += 1;
        Ok(())
    }

    /// The core that executes a request.
    fn owner(&self, h: &Header, key: &[u8]) -> usize {
        let here = self.cfg.id as usize;
        let Some(op) = h.op() else { return here };
        if op.is_namespace() {
            return match proto::split_job_key(key) {
                Ok((job, _)) => proto::meta_core(job, self.cfg.cores),
                Err(_) => here,
            };
        }
        match op {
            Opcode::BlockWrite | Opcode::BlockAppend | Opcode::BlockRead | Opcode::BlockFree => {
                match BlockKey::decode(key) {
                    Ok(k) if (k.block.core() as usize) < self.cfg.cores => k.block.core() as usize,
                    _ => here,
                }
            }
            _ => here,
        }
    }

    /// Frees released blocks here and on their owning cores.
    fn release(&mut self, r: crate::meta::Release) {
        use crate::meta::Release;
        match r {
            Release::None => {}
            Release::Blocks(blocks) => {
                let mut by_core: Vec<Vec<proto::BlockId>> = vec![Vec::new(); self.cfg.cores];
                for b in blocks {
                    if let Some(v) = by_core.get_mut(b.core() as usize) {
                        v.push(b);
                    }
                }
                for (core, v) in by_core.into_iter().enumerate() {
                    if v.is_empty() {
                        continue;
                    }
                    if core == self.cfg.id as usize {
                        self.on_message(Msg::FreeBlocks(v));
                    } else if let Some(o) = self.links.out[core].as_mut() {
                        o.push(Msg::FreeBlocks(v));
                    }
                }
            }
            Release::Job { job, keep, drop } => {
                // By id first: covers blocks allocated under an earlier id.
                self.release(Release::Blocks(drop));
                let keep: Arc<HashSet<proto::BlockId>> = Arc::new(keep.into_iter().collect());
                self.free_owner_everywhere(job_owner(self.ns.node(), job), keep);
            }
        }
    }
}

/// A flash or disk engine's figures as its core publishes them: the report
/// row, and the completions its rates come from. The rates are computed
/// when the row is read (`at`), so they also fall while the core is parked
/// and publishes nothing.
#[derive(Debug, Clone)]
pub struct StorageFigures {
    pub row: TierReport,
    pub io: IoWindow,
}

impl StorageFigures {
    /// The row, with the rates over the second before `now`.
    pub fn at(&self, now: Instant) -> TierReport {
        let r = self.io.rates(now);
        TierReport {
            read_iops: r.read_iops,
            write_iops: r.write_iops,
            read_bytes_per_sec: r.read_bytes_per_sec,
            write_bytes_per_sec: r.write_bytes_per_sec,
            ..self.row.clone()
        }
    }
}

/// A flash or disk engine's figures (rates zero until read with `at`).
pub fn storage_report(core: usize, e: &FlashEngine) -> StorageFigures {
    let u = e.usage();
    let bs = u.tier.block_size;
    let row = TierReport {
        tier: crate::node::tier_name(e.tier()).to_string(),
        core,
        capacity_bytes: u.tier.blocks_total * bs,
        used_bytes: u.tier.blocks_used * bs,
        blocks_total: u.tier.blocks_total,
        blocks_used: u.tier.blocks_used,
        huge_pages: u.tier.huge_pages,
        path: Some(u.path.display().to_string()),
        // "interrupt, shared ring": on the core's network ring.
        mode: Some(match (e.is_shared(), &u.refused) {
            (true, _) => format!("{}, shared ring", u.mode.name()),
            // "interrupt (sqpoll refused: Operation not permitted)".
            (false, Some(why)) => format!("{} ({why})", u.mode.name()),
            (false, None) => u.mode.name().to_string(),
        }),
        io_errors: u.errors,
        in_flight: u64::from(u.in_flight),
        buffers_in_use: u.buffers_in_use as u64,
        writes_reserved: u64::from(u.writes_reserved),
        ..TierReport::default()
    };
    StorageFigures { row, io: u.io }
}

/// A connection's receive buffer larger than this is given back once the
/// frames it receives are no larger (`trim_partial`).
const PARTIAL_KEEP: usize = 128 << 10;

/// Appends received bytes to a connection's unparsed ones. The buffer grows
/// with what arrives (doubling, and never past `frame`, the length of the
/// frame being received when known): a frame's header alone reserves
/// nothing for the body it announces.
fn append_partial(buf: &mut Vec<u8>, data: &[u8], frame: usize) {
    let want = buf.len() + data.len();
    if want > buf.capacity() {
        let mut cap = (buf.capacity() * 2).max(want);
        if frame >= want {
            cap = cap.min(frame);
        }
        buf.reserve_exact(cap - buf.len());
    }
    buf.extend_from_slice(data);
}

/// Gives back a receive buffer grown for a large frame once what it holds
/// and the frame it waits for (`frame`, 0 if not known) are small again;
/// a connection that keeps sending large frames keeps its buffer.
fn trim_partial(buf: &mut Vec<u8>, frame: usize) {
    if buf.capacity() > PARTIAL_KEEP && buf.len().max(frame) <= PARTIAL_KEEP {
        buf.shrink_to(frame);
    }
}

/// Whether `buf` starts with a whole frame (parsing is paused or stalled).
fn holds_frame(buf: &[u8], limits: &Limits) -> bool {
    matches!(proto::decode_header(buf, limits, true), Ok(Some(h)) if buf.len() >= h.frame_len())
}

/// The request id of a frame whose header may be invalid (0 if unreadable).
fn frame_id(buf: &[u8]) -> u64 {
    if buf.len() >= 16 && buf[0..2] == proto::MAGIC.to_le_bytes() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[8..16]);
        u64::from_le_bytes(b)
    } else {
        0
    }
}

impl EventSink for State {
    fn accepted(&mut self, conn: ConnId) {
        if conn >= self.conns.len() {
            self.conns.resize_with(conn + 1, Conn::default);
        }
        let c = &mut self.conns[conn];
        debug_assert!(!c.live);
        let gen = c.gen.wrapping_add(1);
        *c = Conn { live: true, gen, ..Conn::default() };
        self.connections += 1;
    }

    fn received(&mut self, conn: ConnId, data: &[u8]) {
        self.bytes_in += data.len() as u64;
        self.tick_access_clock();
        let mut data = data;
        loop {
            let Some(c) = self.conns.get_mut(conn) else { return };
            if !c.live || c.closing || data.is_empty() {
                return;
            }
            if c.stream.is_some() {
                // A streamed body first; what follows it is parsed.
                debug_assert!(c.partial.is_empty());
                let n = self.feed_stream(conn, data);
                data = &data[n..];
            } else if c.partial.is_empty() {
                // The common case: parse straight from the transport's buffer.
                let (used, need) = self.parse(conn, data);
                let c = &mut self.conns[conn];
                c.frame_len = need;
                if used < data.len() && !c.closing {
                    append_partial(&mut c.partial, &data[used..], need);
                }
                trim_partial(&mut c.partial, need);
                return;
            } else {
                // Only what completes a header and key goes through
                // `partial` first: a body may stream from here.
                let head = stream::head_missing(&c.partial, &self.cfg.limits);
                let n = if head == 0 { data.len() } else { head.min(data.len()) };
                append_partial(&mut c.partial, &data[..n], c.frame_len);
                data = &data[n..];
                self.parse_partial(conn);
            }
        }
    }

    fn peer_closed(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.live {
            c.peer_closed = true;
            // `finish_pass` closes once the outstanding answers are out.
            self.mark_dirty(conn);
        }
    }

    fn drained(&mut self, _conn: ConnId) {
        // Paused connections are checked after every pass.
    }

    fn storage(&mut self, user_data: u64, result: i32) {
        let tier = crate::storage::flash::tag::engine(user_data);
        match self.engines.iter_mut().find(|e| e.tier() == tier && e.is_shared()) {
            Some(e) => e.complete(user_data, result),
            None => debug_assert!(false, "storage completion {user_data:#x} for no engine of this core"),
        }
    }

    fn closed(&mut self, conn: ConnId) {
        self.drop_stream(conn);
        if let Some(c) = self.conns.get_mut(conn) {
            let gen = c.gen;
            *c = Conn { gen, ..Conn::default() };
            self.connections = self.connections.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header announcing a 16 MiB frame reserves nothing for it; the
    /// buffer then doubles as the body arrives and stops at the frame.
    #[test]
    fn receive_buffers_grow_with_what_arrives_up_to_the_frame() {
        let frame = (16 << 20) + 40;
        let mut buf = Vec::new();
        append_partial(&mut buf, &[0; 140], frame);
        assert!(buf.capacity() < 1024, "{} bytes reserved for 140", buf.capacity());
        let chunk = vec![1u8; 65536];
        let mut grew = 0;
        while buf.len() < frame {
            let n = chunk.len().min(frame - buf.len());
            let cap = buf.capacity();
            append_partial(&mut buf, &chunk[..n], frame);
            assert!(buf.capacity() <= frame, "{} past the frame", buf.capacity());
            grew += usize::from(buf.capacity() != cap);
        }
        assert_eq!(buf.capacity(), frame);
        assert!(grew <= 20, "{grew} reallocations for one frame");
    }

    /// After a large frame the buffer is given back once small frames
    /// follow, and kept while large ones do.
    #[test]
    fn receive_buffers_shrink_after_large_frames() {
        let mut buf: Vec<u8> = Vec::with_capacity(4 << 20);
        trim_partial(&mut buf, 4 << 20);
        assert_eq!(buf.capacity(), 4 << 20, "the next frame is as large: kept");
        buf.extend_from_slice(&[0; 30]);
        trim_partial(&mut buf, 0);
        assert!(buf.capacity() <= PARTIAL_KEEP, "{}", buf.capacity());
        assert_eq!(buf, [0; 30]);
        let mut small: Vec<u8> = Vec::with_capacity(4096);
        trim_partial(&mut small, 0);
        assert_eq!(small.capacity(), 4096, "small buffers are left alone");
    }
}
