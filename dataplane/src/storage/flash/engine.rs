//! `FlashEngine`: one core's region of a flash or disk tier, driven
//! asynchronously from the core's run loop.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use nix::libc;

use super::backing::{Backing, Region};
use super::layout::{self, round_down, round_up, Decoded, Entry, Geometry, Superblock, SuperblockError};
use super::layout::{ENTRIES_PER_SECTOR, ENTRY_LEN, SECTOR};
use super::pool::{BufPool, ReadBuf, WriteBuf};
use super::rates::IoWindow;
use super::ring::{probe_iopoll, tag, IoMode, OwnRings};
use super::slots::Slots;
use crate::proto::BlockId;
use crate::storage::{is_job_owner, Owner, StorageError, TierUsage, PERSISTED_OWNER};

/// Header flushes in flight at once (each owns a staging sector).
const FLIGHTS: u32 = 4;
/// Retries of an operation that ended in EAGAIN or EINTR.
const MAX_RETRIES: u8 = 8;
/// Times in a row a header sector's flush may fail before the engine stops
/// retrying it on its own; a later change to the sector, or the clean
/// close, writes it again.
pub(super) const HDR_WRITE_ATTEMPTS: u8 = 4;
/// Wait before flushing a sector again after its `n`th failed flush in a
/// row: `HDR_RETRY_BASE` doubled per failure, at most `HDR_RETRY_MAX`. A
/// device that just failed a write (a path failover, a reset, a full
/// queue) is not asked again at once, and retries do not eat the ring's
/// slots; the core keeps polling meanwhile (the retry is due on a later
/// pass, `retry_due` bounds a parked core's sleep).
pub(super) const HDR_RETRY_BASE: Duration = Duration::from_millis(10);
pub(super) const HDR_RETRY_MAX: Duration = Duration::from_secs(1);
/// How long closing waits for I/O in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
const NO_BUF: u32 = u32::MAX;

#[cfg(test)]
thread_local! {
    /// Skip the IOPOLL probe and build an IOPOLL ring regardless (tests of
    /// the two-ring plumbing on devices that cannot poll).
    pub(super) static FORCE_IOPOLL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How a tier drives its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierPolicy {
    /// Requests accepted and not yet delivered; beyond it `submit_*`
    /// returns `Busy`.
    pub queue_depth: u32,
    /// The largest single read or write submitted; longer transfers go in
    /// pieces of this size, one after the other.
    pub max_request: u32,
    /// Data operations handed to the kernel per system call. One (fio's
    /// default too) lets the device start on a request while the core is
    /// still submitting the next ones: on the virtio disk of docs/
    /// benchmarks.md, 32 reads submitted in one call came back together
    /// ~440 µs later, one call each cut that to ~350 µs and raised QD 32
    /// IOPS by ~9%. A batch saves system calls where a device's doorbell,
    /// not its start-up, is the cost.
    pub submit_batch: u32,
}

impl TierPolicy {
    /// NVMe/SSD: deep queue, block-sized requests, each started at once.
    pub const FLASH: TierPolicy = TierPolicy { queue_depth: 64, max_request: 128 << 10, submit_batch: 1 };
    /// HDD or SATA SSD: a shallow queue (seeks), whole requests, batched.
    pub const DISK: TierPolicy = TierPolicy { queue_depth: 8, max_request: 1 << 20, submit_batch: 8 };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashConfig {
    /// `tier::FLASH` or `tier::DISK`: goes into block ids and tags the
    /// engine's completions on a shared ring.
    pub tier: u8,
    pub core: u8,
    /// A power of two, 4 KiB to 16 MiB.
    pub block_size: u32,
    pub policy: TierPolicy,
    /// Ask for a submission-polling kernel thread (`--sqpoll`).
    pub sqpoll: bool,
    /// Use polled completions if the probe finds the device supports them.
    pub iopoll: bool,
    /// Data buffers in the pool (each one block); 0 = twice the queue
    /// depth (so reads handed out can be held while as many again run),
    /// capped at 32 MiB of buffers for large blocks. A request without a
    /// free buffer is `Busy` like one beyond the queue depth.
    pub buffers: u32,
    /// What to do with a region that cannot be opened with this
    /// configuration (`--reformat-tiers`).
    pub reformat: Reformat,
}

/// Whether a region formatted with other settings (block size, core count,
/// tier size, tier, layout version), or with a corrupt superblock, is
/// formatted afresh at open (losing what it holds) or refused. A region
/// that opens as configured is never reformatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reformat {
    /// Refuse to open it (the default): the error names the option.
    #[default]
    Never,
    /// Format it, unless the earlier layout holds persistent (PERSIST)
    /// blocks there (`--reformat-tiers`).
    KeepPersist,
    /// Format it even then (`--reformat-tiers --discard-persist`).
    DiscardPersist,
}

/// The option that reformats, as the errors name it.
const REFORMAT_HINT: &str = "start the node with --reformat-tiers (reformat_tiers = true in the \
     config file) to format it afresh, losing the blocks it holds";

impl FlashConfig {
    pub fn new(tier: u8, core: u8, block_size: u32) -> FlashConfig {
        let policy = if tier == crate::proto::tier::DISK { TierPolicy::DISK } else { TierPolicy::FLASH };
        FlashConfig {
            tier,
            core,
            block_size,
            policy,
            sqpoll: false,
            iopoll: true,
            buffers: 0,
            reformat: Reformat::Never,
        }
    }
}

/// Where an engine on a shared ring puts its registered file and buffer:
/// indexes into the ring's (sparse) tables, distinct per engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSlots {
    pub file: u32,
    pub buf: u16,
}

/// What opening the region found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    /// The region was (re)formatted: nothing recovered.
    pub formatted: bool,
    /// The previous run closed cleanly.
    pub was_clean: bool,
    pub epoch: u32,
    pub recovered: usize,
    /// Header entries that were neither empty nor valid (torn writes or
    /// foreign bytes); their slots were treated as free.
    pub corrupt_entries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashUsage {
    pub tier: TierUsage,
    pub path: PathBuf,
    pub region: Region,
    pub mode: IoMode,
    /// The polling asked for (`--sqpoll`, or IOPOLL the probe found) that
    /// the kernel refused, and why: `mode` is what runs instead.
    pub refused: Option<String>,
    /// Buffers and file registered with the ring (no per-I/O page pinning).
    pub registered: bool,
    /// Slots out of generations until the next open.
    pub retired: u64,
    pub in_flight: u32,
    /// Data buffers neither in use by a request nor held by a `ReadBuf`.
    pub buffers_free: usize,
    /// Data buffers in use by a request or held by a `ReadBuf` or `WriteBuf`.
    pub buffers_in_use: usize,
    /// `WriteBuf`s not yet submitted (each holds a queue slot).
    pub writes_reserved: u32,
    /// Completions of the last second, for `IoWindow::rates`.
    pub io: IoWindow,
    /// I/O errors since the open.
    pub errors: u64,
}

/// A request's successful outcome.
#[derive(Debug)]
pub enum Completion {
    /// A write or append is on the device; the block now holds `len` bytes.
    Written { len: u32 },
    /// The bytes read, in the registered buffer they were read into.
    Read(ReadBuf),
    /// `mark_persistent`: the block's header entry is on the device.
    Persisted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Append,
    Persist,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    /// Accepted, waiting for the slot (ordering) or for its turn.
    Waiting,
    /// Read-modify-write: reading the first sector into scratch.
    HeadRead,
    /// Read-modify-write: reading the last sector into scratch.
    TailRead,
    Write,
    Read,
    /// Waiting for header sector `.0` to be durable at version `.1`.
    Header(u32, u32),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    None,
    Reader,
    Writer,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Written(u32),
    Read { start: u32, len: u32 },
    Persisted,
}

struct Req {
    seq: u32,
    token: u64,
    kind: Kind,
    phase: Phase,
    role: Role,
    slot: u32,
    gen: u32,
    /// In-block offset (an append's is set when it starts).
    off: u32,
    /// Bytes to write, or at most to read.
    len: u32,
    /// Where a write's bytes sit in `buf`.
    pos: u32,
    /// Block length when a write started.
    have: u32,
    /// Sector-aligned in-block range the request covers: `buf[0]` is the
    /// byte at `s0`.
    s0: u32,
    s1: u32,
    buf: u32,
    /// The current phase's I/O: in-block start, length, bytes done, and
    /// bytes in the operation in the ring.
    io_start: u32,
    io_len: u32,
    io_done: u32,
    issued: u32,
    in_ring: bool,
    retries: u8,
    result: Option<Result<Outcome, StorageError>>,
}

impl Req {
    fn new() -> Req {
        Req {
            seq: 0,
            token: 0,
            kind: Kind::Read,
            phase: Phase::Free,
            role: Role::None,
            slot: 0,
            gen: 0,
            off: 0,
            len: 0,
            pos: 0,
            have: 0,
            s0: 0,
            s1: 0,
            buf: NO_BUF,
            io_start: 0,
            io_len: 0,
            io_done: 0,
            issued: 0,
            in_ring: false,
            retries: 0,
            result: None,
        }
    }
}

/// Per-slot I/O bookkeeping, beside the allocator's state.
#[derive(Debug, Clone, Copy, Default)]
struct SlotIo {
    reads: u16,
    writing: bool,
    /// Requests for the slot waiting in `deferred`.
    waiting: u16,
    /// Freed persistent block: reusable once its cleared entry is durable.
    hdr_pending: bool,
}

/// Header sector states.
const QUEUED: u8 = 1;
const FLYING: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushPhase {
    Idle,
    /// fdatasync, so data the entry describes is durable before it is.
    Sync,
    /// The sector, written with RWF_DSYNC.
    Write,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    seq: u32,
    sector: u32,
    ver: u32,
    phase: FlushPhase,
    in_ring: bool,
    retries: u8,
}

/// The slot header table's write-back: a sector's contents are always
/// built from the in-memory slot state, so flushes coalesce; one flush per
/// sector at a time keeps them in order.
struct Headers {
    /// Changes made to each sector, and how many of them are on disk.
    ver: Vec<u32>,
    durable: Vec<u32>,
    state: Vec<u8>,
    /// Flushes of each sector that failed in a row.
    failures: Vec<u8>,
    dirty: VecDeque<u32>,
    /// Sectors whose flush failed, waiting to be flushed again (state
    /// `QUEUED`), and when: at most one entry per sector.
    backoff: Vec<(u32, Instant)>,
    flights: Vec<Flight>,
    free: Vec<u32>,
    ready: VecDeque<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    io: IoWindow,
    errors: u64,
}

/// One core's region of a flash or disk tier: an O_DIRECT file or device
/// range, its block allocator, registered buffers, and an io_uring of its
/// own (`open`) or a share of the core's (`open_on`).
///
/// Nothing here blocks after `open`: `submit_*` queue requests, and
/// `poll_completions` (own ring) or `push_submissions` / `complete` /
/// `deliver` (shared ring) move them along and hand results back, exactly
/// one per accepted request. `submit_*` errors (`Busy`, `NotFound`, a
/// write past the block end) mean the request was not accepted.
///
/// Requests on one block run in submission order: writes one at a time,
/// reads together between writes. Not `Send`: built and polled by the core
/// thread that owns it (io_uring runs completion work in the submitter).
pub struct FlashEngine {
    // Declared first, so the rings close before the memory they use goes.
    rings: Option<OwnRings>,
    pool: Rc<BufPool>,
    file: File,
    fixed_file: Option<u32>,
    fixed_buf: Option<u16>,
    mode: IoMode,
    tier: u8,
    core: u8,
    geo: Geometry,
    region: Region,
    path: PathBuf,
    max_request: u32,
    /// `TierPolicy::submit_batch`.
    submit_batch: usize,
    epoch: u32,
    slots: Slots,
    sio: Vec<SlotIo>,
    reqs: Vec<Req>,
    free_reqs: Vec<u32>,
    deferred: VecDeque<u32>,
    ready: VecDeque<u32>,
    done: VecDeque<u32>,
    /// Persist requests waiting for their header sector.
    hdr_waiters: Vec<u32>,
    /// Slots with a waiting request found blocked during `schedule`.
    blocked: Vec<u32>,
    hdr: Headers,
    data_in_ring: u32,
    meta_in_ring: u32,
    stats: Stats,
    recovered: Vec<(BlockId, u32, u32)>,
    report: OpenReport,
    /// Skip the clean close (tests simulate a crash).
    crashed: bool,
    /// `load` wrote the superblock: the region is this engine's to close.
    /// Until then (a refused open) closing must write nothing, or it would
    /// put this configuration's superblock over another's.
    loaded: bool,
    /// `register_waker` succeeded: interrupt-driven completions signal the
    /// core's eventfd.
    waker: bool,
    #[cfg(test)]
    inject: VecDeque<i32>,
    #[cfg(test)]
    inject_meta: VecDeque<i32>,
}

/// Where a region's header table lies, and how to read its entries.
#[derive(Debug, Clone, Copy)]
struct HeaderTable {
    /// Absolute offset in the file.
    at: u64,
    len: u64,
    slots: u32,
    block_size: u32,
}

/// What opening a region does with what it holds.
/// What a region's first sector holds, for deciding a reformat.
#[derive(Clone, Copy)]
enum Found<'a> {
    /// Nothing formatted (zeros, or the middle of an earlier layout's region).
    Nothing,
    /// A superblock whose checksum fails.
    Corrupt,
    /// A superblock of other settings.
    Superblock(&'a Superblock),
}

enum Plan {
    /// Open it as it is: its superblock matches the configuration.
    Keep(Superblock),
    /// Format it, starting at this epoch.
    Format { epoch: u32 },
}

/// Whether the region `sb` describes overlaps [start, end).
fn overlaps(sb: &Superblock, start: u64, end: u64) -> bool {
    sb.region_start < end && start < sb.region_start.saturating_add(sb.region_len)
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl FlashEngine {
    /// Opens (formatting if new) `region` of `backing` with a ring of the
    /// engine's own: IOPOLL if the device passes the probe and
    /// `cfg.iopoll`, SQPOLL if `cfg.sqpoll` and the kernel allows. Blocks
    /// (startup only): reads and rewrites the superblock and reads the
    /// header table.
    pub fn open(backing: &Backing, region: Region, cfg: &FlashConfig) -> io::Result<FlashEngine> {
        let mut e = Self::open_region(backing, region, cfg)?;
        let iopoll = e.iopoll_works(region, cfg);
        e.attach_own(cfg, iopoll)?;
        Ok(e)
    }

    /// Opens `region` for a core whose network runs on `net` (an io_uring
    /// with storage slots, `None` for other transports): on that ring when
    /// a ring of its own gains nothing — no IOPOLL (the device cannot poll,
    /// or `cfg.iopoll` is off) and no SQPOLL asked — so the core submits
    /// network and storage in one system call and polls, and sleeps on, one
    /// completion queue. Otherwise as `open`.
    pub fn open_for_core(
        backing: &Backing,
        region: Region,
        cfg: &FlashConfig,
        net: Option<(&IoUring, RingSlots)>,
    ) -> io::Result<FlashEngine> {
        let Some((ring, slots)) = net.filter(|_| !cfg.sqpoll) else {
            return Self::open(backing, region, cfg);
        };
        let mut e = Self::open_region(backing, region, cfg)?;
        if e.iopoll_works(region, cfg) {
            e.attach_own(cfg, true)?;
        } else {
            e.attach_shared(ring, slots)?;
        }
        Ok(e)
    }

    /// Whether polled completions work for this region (and are wanted).
    /// The probe reads the superblock, which `open_region` has just
    /// written: a sector a file system never wrote would be served as zeros
    /// without reaching the device, and pass for any device.
    fn iopoll_works(&self, region: Region, cfg: &FlashConfig) -> bool {
        #[cfg(test)]
        let forced = FORCE_IOPOLL.with(|f| f.get());
        #[cfg(not(test))]
        let forced = false;
        forced
            || cfg.iopoll
                && match probe_iopoll(&self.file, region.start) {
                    Ok(()) => true,
                    Err(why) => {
                        tracing::info!(path = %self.path.display(), %why, "no polled completions; interrupts it is");
                        false
                    }
                }
    }

    fn attach_own(&mut self, cfg: &FlashConfig, iopoll: bool) -> io::Result<()> {
        let entries = (cfg.policy.queue_depth + FLIGHTS + 2).next_power_of_two();
        let rings = OwnRings::new(entries, cfg.sqpoll, iopoll)?;
        match rings.data.submitter().register_files(&[self.file.as_raw_fd()]) {
            Ok(()) => self.fixed_file = Some(0),
            Err(error) => tracing::warn!(%error, "cannot register the tier's file; using its descriptor"),
        }
        self.fixed_buf = self.register_pool(&rings.data, 0, false);
        self.mode = rings.mode;
        self.rings = Some(rings);
        Ok(())
    }

    /// Opens `region` to run on `ring`, shared with the core's network: the
    /// caller pushes this engine's submissions into it
    /// (`push_submissions`), routes completions whose user data has
    /// `tag::is_storage` and `tag::engine == cfg.tier` to `complete`, and
    /// calls `deliver`. The ring needs sparse file and buffer tables
    /// (`register_files_sparse`, `register_buffers_sparse`) with room at
    /// `slots`; without them the engine falls back to plain descriptors
    /// and buffers. An IOPOLL ring cannot serve sockets, so a shared ring
    /// is never polled-completion; SQPOLL carries over.
    pub fn open_on(
        backing: &Backing,
        region: Region,
        cfg: &FlashConfig,
        ring: &IoUring,
        slots: RingSlots,
    ) -> io::Result<FlashEngine> {
        let mut e = Self::open_region(backing, region, cfg)?;
        e.attach_shared(ring, slots)?;
        Ok(e)
    }

    fn attach_shared(&mut self, ring: &IoUring, slots: RingSlots) -> io::Result<()> {
        if ring.params().is_setup_iopoll() {
            return Err(invalid_input("a shared ring cannot be IOPOLL (sockets need interrupts)".into()));
        }
        match ring.submitter().register_files_update(slots.file, &[self.file.as_raw_fd()]) {
            Ok(_) => self.fixed_file = Some(slots.file),
            Err(error) => tracing::warn!(%error, "cannot register the tier's file on the shared ring"),
        }
        self.fixed_buf = self.register_pool(ring, slots.buf, true);
        self.mode = if ring.params().is_setup_sqpoll() { IoMode::Sqpoll } else { IoMode::Interrupt };
        Ok(())
    }

    fn register_pool(&self, ring: &IoUring, at: u16, update: bool) -> Option<u16> {
        let iov = self.pool.iovec();
        if iov.iov_len > 1 << 30 {
            tracing::warn!(bytes = iov.iov_len, "buffer pool over 1 GiB: not registered");
            return None;
        }
        // SAFETY: the iovec covers the pool's arena, which stays mapped as
        // long as `self.pool` has an owner; the engine's own ring closes
        // before the pool drops (field order), and an engine on a shared
        // ring leaks the pool when it drops with I/O in flight. Nothing is
        // submitted against the registration after that.
        let r = unsafe {
            if update {
                ring.submitter().register_buffers_update(at as u32, &[iov], None)
            } else {
                ring.submitter().register_buffers(&[iov])
            }
        };
        match r {
            Ok(()) => Some(at),
            Err(error) => {
                tracing::warn!(%error, "cannot register the buffer pool (RLIMIT_MEMLOCK?); plain buffers it is");
                None
            }
        }
    }

    /// The engine for `region`, its file open and buffers allocated, the
    /// region not read yet; dropped as it is, it writes nothing.
    fn unopened(backing: &Backing, region: Region, cfg: &FlashConfig) -> io::Result<FlashEngine> {
        let bs = cfg.block_size;
        let qd = cfg.policy.queue_depth;
        if !bs.is_power_of_two() || (bs as u64) < SECTOR || bs > 16 << 20 {
            return Err(invalid_input(format!("block size {bs} is not a power of two from 4 KiB to 16 MiB")));
        }
        if cfg.tier > tag::MAX_ENGINE {
            return Err(invalid_input(format!("tier number {} does not fit the completion tag", cfg.tier)));
        }
        if qd == 0 || qd > 4096 {
            return Err(invalid_input(format!("queue depth {qd} is not 1..=4096")));
        }
        if cfg.policy.submit_batch == 0 || cfg.policy.submit_batch > 4096 {
            return Err(invalid_input(format!("submit batch {} is not 1..=4096", cfg.policy.submit_batch)));
        }
        if cfg.policy.max_request < SECTOR as u32 || !cfg.policy.max_request.is_multiple_of(SECTOR as u32) {
            return Err(invalid_input(format!(
                "request size {} is not a multiple of 4 KiB",
                cfg.policy.max_request
            )));
        }
        if !region.start.is_multiple_of(SECTOR)
            || !region.len.is_multiple_of(SECTOR)
            || region.start.checked_add(region.len).is_none_or(|end| end > backing.size)
        {
            return Err(invalid_input(format!(
                "region [{}, +{}) is not 4 KiB aligned inside the {} bytes of {}",
                region.start,
                region.len,
                backing.size,
                backing.path.display()
            )));
        }
        let geo = Geometry::for_region(region.len, bs).ok_or_else(|| {
            invalid_input(format!(
                "region of {} bytes holds no {bs}-byte block with its metadata",
                region.len
            ))
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&backing.path)
            .map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EINVAL) {
                    " (the file system does not support O_DIRECT; tmpfs does not)"
                } else {
                    ""
                };
                io::Error::new(e.kind(), format!("{}: {e}{hint}", backing.path.display()))
            })?;
        let buffers = match cfg.buffers {
            // Twice the queue depth, but no more than 32 MiB of large blocks
            // (and at least 4).
            0 => (2 * qd).min(((32 << 20) / bs).max(4)),
            n => n,
        };
        let pool = BufPool::new(bs as usize, buffers, qd, FLIGHTS)?;
        let sectors = geo.header_sectors() as usize;
        let e = FlashEngine {
            rings: None,
            pool,
            file,
            fixed_file: None,
            fixed_buf: None,
            mode: IoMode::Interrupt,
            tier: cfg.tier,
            core: cfg.core,
            geo,
            region,
            path: backing.path.clone(),
            max_request: cfg.policy.max_request,
            submit_batch: cfg.policy.submit_batch as usize,
            epoch: 0,
            slots: Slots::new(0, 0, &[]),
            sio: vec![SlotIo::default(); geo.slots as usize],
            reqs: (0..qd).map(|_| Req::new()).collect(),
            free_reqs: (0..qd).rev().collect(),
            deferred: VecDeque::with_capacity(qd as usize),
            ready: VecDeque::with_capacity(qd as usize),
            done: VecDeque::with_capacity(qd as usize),
            hdr_waiters: Vec::with_capacity(qd as usize),
            blocked: Vec::with_capacity(qd as usize),
            hdr: Headers {
                ver: vec![0; sectors],
                durable: vec![0; sectors],
                state: vec![0; sectors],
                failures: vec![0; sectors],
                dirty: VecDeque::with_capacity(sectors),
                backoff: Vec::with_capacity(sectors),
                flights: (0..FLIGHTS)
                    .map(|_| Flight {
                        seq: 0,
                        sector: 0,
                        ver: 0,
                        phase: FlushPhase::Idle,
                        in_ring: false,
                        retries: 0,
                    })
                    .collect(),
                free: (0..FLIGHTS).rev().collect(),
                ready: VecDeque::with_capacity(FLIGHTS as usize),
            },
            data_in_ring: 0,
            meta_in_ring: 0,
            stats: Stats { io: IoWindow::new(Instant::now()), errors: 0 },
            recovered: Vec::new(),
            report: OpenReport {
                formatted: false,
                was_clean: true,
                epoch: 0,
                recovered: 0,
                corrupt_entries: 0,
            },
            crashed: false,
            loaded: false,
            waker: false,
            #[cfg(test)]
            inject: VecDeque::new(),
            #[cfg(test)]
            inject_meta: VecDeque::new(),
        };
        Ok(e)
    }

    fn open_region(backing: &Backing, region: Region, cfg: &FlashConfig) -> io::Result<FlashEngine> {
        let mut e = Self::unopened(backing, region, cfg)?;
        e.load(cfg)?;
        Ok(e)
    }

    /// Whether `region` opens with `cfg` — as it is, or formatted where
    /// `cfg.reformat` allows — without writing anything. A node checks
    /// every region before its cores open them at once, so no core formats
    /// its region while another's refusal stops the start.
    pub fn check_open(backing: &Backing, region: Region, cfg: &FlashConfig) -> io::Result<()> {
        Self::unopened(backing, region, cfg)?.plan(cfg).map(|_| ())
    }

    // ---- startup and shutdown (blocking) ----

    fn abs(&self, region_off: u64) -> u64 {
        self.region.start + region_off
    }

    /// Reads the superblock and header table (or formats), recovers the
    /// persistent blocks, and records the new epoch (not clean) on disk.
    fn load(&mut self, cfg: &FlashConfig) -> io::Result<()> {
        let mut recovered = Vec::new();
        let (epoch, formatted, was_clean) = match self.plan(cfg)? {
            Plan::Keep(sb) => {
                self.report.corrupt_entries = self.read_headers(&mut recovered)?;
                (sb.epoch.wrapping_add(1).max(1), false, sb.clean)
            }
            Plan::Format { epoch } => (epoch, true, true),
        };
        if formatted {
            self.zero_headers()?;
        }
        if !was_clean {
            tracing::warn!(
                path = %self.path.display(),
                region = self.region.index,
                "tier region was not closed cleanly; persistent blocks are kept, everything else is gone"
            );
        }
        self.epoch = epoch;
        self.write_superblock(false)?;
        // From here on the region is ours: closing marks it clean.
        self.loaded = true;
        self.slots = Slots::new(self.geo.slots, epoch, &recovered);
        self.recovered = recovered
            .iter()
            .map(|(i, e)| (BlockId::new(self.tier, self.core, e.generation, *i), e.owner, e.len))
            .collect();
        self.report = OpenReport {
            formatted,
            was_clean,
            epoch,
            recovered: recovered.len(),
            corrupt_entries: self.report.corrupt_entries,
        };
        if self.report.corrupt_entries > 0 {
            tracing::warn!(
                path = %self.path.display(),
                entries = self.report.corrupt_entries,
                "corrupt block header entries ignored"
            );
        }
        Ok(())
    }

    /// Reads the superblock and decides: keep the region as it is, format
    /// it (unformatted, or `cfg.reformat` allows it), or refuse. Reads only.
    fn plan(&mut self, cfg: &FlashConfig) -> io::Result<Plan> {
        let sb_at = self.abs(0);
        // SAFETY: no I/O is in flight yet; staging sector 0 is ours.
        let sector = unsafe { self.pool.staging_mut(0) };
        self.file.read_exact_at(sector, sb_at).map_err(|e| self.ctx(e, "reading the superblock"))?;
        match Superblock::decode(sector) {
            Err(SuperblockError::Unformatted) => {
                // Never format over the middle of a region of an earlier
                // layout (another core count or size) without being asked.
                let (start, end) = (self.region.start, self.region.start + self.region.len);
                let earlier = self.earlier_layout()?;
                if let Some(sb) = earlier.iter().find(|sb| overlaps(sb, start, end)) {
                    let why = format!(
                        "{} region {}: lies inside region {} [{}, +{}) of a layout formatted with other \
                         settings (block size {}); start with those settings, or {REFORMAT_HINT}",
                        self.path.display(),
                        self.region.index,
                        sb.region_index,
                        sb.region_start,
                        sb.region_len,
                        sb.block_size
                    );
                    self.may_reformat(cfg, why, Found::Nothing)?;
                }
                Ok(Plan::Format { epoch: 1 })
            }
            Err(SuperblockError::Corrupt) => {
                let why = format!(
                    "{} region {}: corrupt superblock (checksum); refusing to format over it: {REFORMAT_HINT}",
                    self.path.display(),
                    self.region.index
                );
                self.may_reformat(cfg, why, Found::Corrupt)?;
                Ok(Plan::Format { epoch: 1 })
            }
            Ok(sb) => match self.check(&sb, cfg) {
                Ok(()) => Ok(Plan::Keep(sb)),
                Err(why) => {
                    self.may_reformat(cfg, why.to_string(), Found::Superblock(&sb))?;
                    // Keep epochs rising across a reformat, so older ids stay stale.
                    Ok(Plan::Format { epoch: sb.epoch.wrapping_add(1).max(1) })
                }
            },
        }
    }

    /// Whether `cfg` lets the region be formatted over, `why` being the
    /// reason it cannot be opened as it is and `found` what its own first
    /// sector holds.
    fn may_reformat(&mut self, cfg: &FlashConfig, why: String, found: Found<'_>) -> io::Result<()> {
        let persistent = match (cfg.reformat, found) {
            (Reformat::Never, _) => return Err(invalid_data(why)),
            (Reformat::DiscardPersist, _) => 0,
            // What a corrupt superblock's region holds cannot be known:
            // keeping PERSIST blocks means not formatting over it.
            (Reformat::KeepPersist, Found::Corrupt) => {
                return Err(invalid_data(format!(
                    "{} region {}: not reformatted: its superblock is corrupt, so whether it holds \
                     persistent (PERSIST) blocks cannot be told; add --discard-persist \
                     (discard_persist = true) to format over it anyway",
                    self.path.display(),
                    self.region.index
                )))
            }
            // The region's own superblock of other settings counts even
            // when the walk from the file's start does not reach it.
            (Reformat::KeepPersist, Found::Superblock(sb)) => {
                let (start, len) = (sb.region_start, sb.region_len);
                let walked =
                    self.earlier_layout()?.iter().any(|e| e.region_start == start && e.region_len == len);
                self.persistent_in_old_layout()? + if walked { 0 } else { self.persistent_in(sb)? }
            }
            (Reformat::KeepPersist, Found::Nothing) => self.persistent_in_old_layout()?,
        };
        match cfg.reformat {
            Reformat::Never => Err(invalid_data(why)),
            Reformat::DiscardPersist => {
                tracing::warn!(path = %self.path.display(), region = self.region.index, %why, "reformatting the tier region");
                Ok(())
            }
            Reformat::KeepPersist => match persistent {
                0 => {
                    tracing::warn!(path = %self.path.display(), region = self.region.index, %why, "reformatting the tier region");
                    Ok(())
                }
                n => Err(invalid_data(format!(
                    "{} region {}: not reformatted: the earlier layout holds {n} persistent (PERSIST) \
                     block(s) here, which --reformat-tiers keeps; start with the old settings to read \
                     them, or add --discard-persist (discard_persist = true) to destroy them too",
                    self.path.display(),
                    self.region.index
                ))),
            },
        }
    }

    /// Persistent blocks that formatting this region destroys: those of the
    /// regions of the earlier layout that overlap it (all of each such
    /// region's, wherever its blocks lie).
    fn persistent_in_old_layout(&mut self) -> io::Result<u64> {
        let (start, end) = (self.region.start, self.region.start + self.region.len);
        let mut found = 0;
        for sb in self.earlier_layout()?.iter().filter(|sb| overlaps(sb, start, end)) {
            found += self.persistent_in(sb)?;
        }
        Ok(found)
    }

    /// The superblocks of the layout the file holds, region after region
    /// from its start: every layout's region 0 starts at the start of the
    /// file and its regions follow one another. The walk stops at a missing
    /// or corrupt superblock (regions past it are not seen).
    fn earlier_layout(&mut self) -> io::Result<Vec<Superblock>> {
        let mut out = Vec::new();
        let mut at = 0u64;
        // Bounded: a layout has at most 256 regions (one per core).
        for _ in 0..=u8::MAX as usize {
            // SAFETY: no I/O is in flight yet; staging sector 0 is ours.
            let sector = unsafe { self.pool.staging_mut(0) };
            match self.file.read_exact_at(sector, at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(self.ctx(e, "reading an earlier superblock")),
            }
            let Ok(sb) = Superblock::decode(sector) else { break };
            if sb.region_start != at || sb.region_len < 2 * SECTOR || !sb.region_len.is_multiple_of(SECTOR) {
                break;
            }
            at += sb.region_len;
            out.push(sb);
        }
        Ok(out)
    }

    /// Persistent entries in the header table of the region `sb` describes.
    fn persistent_in(&mut self, sb: &Superblock) -> io::Result<u64> {
        let bs = sb.block_size;
        if !bs.is_power_of_two() || u64::from(bs) < SECTOR || sb.header_off != SECTOR {
            return Ok(0);
        }
        let header_len = round_up(u64::from(sb.slots) * ENTRY_LEN as u64, SECTOR);
        if SECTOR + header_len > sb.region_len {
            return Ok(0);
        }
        let mut found = 0;
        let table =
            HeaderTable { at: sb.region_start + SECTOR, len: header_len, slots: sb.slots, block_size: bs };
        self.scan_headers(table, "reading earlier block headers", |_, d| {
            found += u64::from(matches!(d, Decoded::Persistent(_)));
        })?;
        Ok(found)
    }

    /// Decodes every entry of a header table (`table.at` is absolute),
    /// reading it a buffer at a time.
    fn scan_headers(
        &mut self,
        table: HeaderTable,
        what: &str,
        mut f: impl FnMut(u32, Decoded),
    ) -> io::Result<()> {
        let chunk = self.pool.buf_size() as u64;
        let mut at = 0u64;
        while at < table.len {
            let n = chunk.min(table.len - at) as usize;
            // SAFETY: no I/O is in flight yet; data buffer 0 is unlent.
            let b = unsafe { self.pool.buf_mut(0, 0, n) };
            self.file.read_exact_at(b, table.at + at).map_err(|e| self.ctx(e, what))?;
            for (k, raw) in b.chunks_exact(ENTRY_LEN).enumerate() {
                let slot = (at / ENTRY_LEN as u64) as u32 + k as u32;
                if slot >= table.slots {
                    break;
                }
                f(slot, Entry::decode(raw, slot, table.block_size));
            }
            at += n as u64;
        }
        Ok(())
    }

    fn ctx(&self, e: io::Error, what: &str) -> io::Error {
        io::Error::new(e.kind(), format!("{} region {}: {what}: {e}", self.path.display(), self.region.index))
    }

    fn check(&self, sb: &Superblock, cfg: &FlashConfig) -> io::Result<()> {
        let mismatch = |what: &str, disk: String, want: String| {
            Err(invalid_data(format!(
                "{} region {}: formatted with {what} {disk}, configured {want}; start with the \
                 settings it was formatted with, or {REFORMAT_HINT}",
                self.path.display(),
                self.region.index
            )))
        };
        if sb.version != layout::VERSION {
            return mismatch("layout version", sb.version.to_string(), layout::VERSION.to_string());
        }
        if sb.block_size != cfg.block_size {
            return mismatch("block size", sb.block_size.to_string(), cfg.block_size.to_string());
        }
        if (sb.region_index, sb.region_start, sb.region_len)
            != (self.region.index, self.region.start, self.region.len)
        {
            return mismatch(
                "region (index, start, length)",
                format!("({}, {}, {})", sb.region_index, sb.region_start, sb.region_len),
                format!("({}, {}, {})", self.region.index, self.region.start, self.region.len),
            );
        }
        if (sb.slots, sb.header_off, sb.data_off) != (self.geo.slots, self.geo.header_off, self.geo.data_off)
        {
            return mismatch("slot count", sb.slots.to_string(), self.geo.slots.to_string());
        }
        if sb.tier != cfg.tier {
            return mismatch("tier", sb.tier.to_string(), cfg.tier.to_string());
        }
        Ok(())
    }

    /// Reads the header table; returns how many entries were corrupt.
    fn read_headers(&mut self, out: &mut Vec<(u32, Entry)>) -> io::Result<u32> {
        let g = self.geo;
        let table = HeaderTable {
            at: self.abs(g.header_off),
            len: g.header_len,
            slots: g.slots,
            block_size: g.block_size,
        };
        let mut corrupt = 0;
        self.scan_headers(table, "reading block headers", |slot, d| match d {
            Decoded::Empty => {}
            Decoded::Persistent(e) => out.push((slot, e)),
            Decoded::Corrupt => corrupt += 1,
        })?;
        Ok(corrupt)
    }

    fn zero_headers(&mut self) -> io::Result<()> {
        let chunk = self.pool.buf_size() as u64;
        let mut at = 0u64;
        while at < self.geo.header_len {
            let n = chunk.min(self.geo.header_len - at) as usize;
            // SAFETY: no I/O is in flight yet; data buffer 0 is unlent.
            let b = unsafe { self.pool.buf_mut(0, 0, n) };
            b.fill(0);
            self.file
                .write_all_at(b, self.abs(self.geo.header_off + at))
                .map_err(|e| self.ctx(e, "clearing block headers"))?;
            at += n as u64;
        }
        Ok(())
    }

    fn write_superblock(&mut self, clean: bool) -> io::Result<()> {
        let sb = Superblock {
            version: layout::VERSION,
            block_size: self.geo.block_size,
            slots: self.geo.slots,
            region_index: self.region.index,
            region_start: self.region.start,
            region_len: self.region.len,
            epoch: self.epoch,
            clean,
            tier: self.tier,
            header_off: self.geo.header_off,
            data_off: self.geo.data_off,
        };
        // SAFETY: called at open (nothing in flight) or at close once every
        // flush finished, so staging sector 0 is unused.
        let sector = unsafe { self.pool.staging_mut(0) };
        sb.encode(sector);
        self.file.write_all_at(sector, self.abs(0)).map_err(|e| self.ctx(e, "writing the superblock"))?;
        self.file.sync_data().map_err(|e| self.ctx(e, "syncing the superblock"))
    }

    /// Waits for I/O in flight (own ring), writes dirty headers, marks the
    /// region clean. With I/O still in flight after the grace period (or
    /// on a shared ring the engine cannot drive), leaks the buffer memory
    /// instead of unmapping it under the device, and leaves the region
    /// marked unclean.
    fn close(&mut self) {
        if self.rings.is_some() {
            let deadline = Instant::now() + CLOSE_GRACE;
            // Failed header writes waiting for a retry are not waited for:
            // `flush_headers_sync` below writes their sectors.
            while self.has_io_work() && Instant::now() < deadline {
                self.poll_completions(|_, _| {});
                if self.data_in_ring + self.meta_in_ring > 0 {
                    self.wait(Duration::from_millis(10));
                }
            }
        }
        if self.data_in_ring + self.meta_in_ring > 0 {
            tracing::error!(
                path = %self.path.display(),
                in_flight = self.data_in_ring + self.meta_in_ring,
                "closing a tier region with I/O in flight; its buffers are leaked"
            );
            std::mem::forget(self.pool.clone());
            if let Some(r) = self.rings.take() {
                std::mem::forget(r);
            }
            return;
        }
        if self.crashed || !self.loaded {
            return;
        }
        let r = self.flush_headers_sync().and_then(|()| self.write_superblock(true));
        if let Err(error) = r {
            tracing::error!(path = %self.path.display(), %error, "tier region not closed cleanly");
        }
    }

    /// Writes every header sector whose last change is not known to be on
    /// disk (queued, or a flush that failed).
    fn flush_headers_sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.hdr.dirty.clear();
        self.hdr.backoff.clear();
        for s in 0..self.geo.header_sectors() {
            self.hdr.state[s as usize] = 0;
            if self.hdr.ver[s as usize] == self.hdr.durable[s as usize] {
                continue;
            }
            self.fill_header_sector(s, 0);
            // SAFETY: nothing is in flight (checked by `close`).
            let sector = unsafe { self.pool.staging_mut(0) };
            self.file.write_all_at(sector, self.abs(self.geo.header_sector_off(s)))?;
            self.hdr.durable[s as usize] = self.hdr.ver[s as usize];
        }
        self.file.sync_data()
    }

    // ---- allocation ----

    /// The slot of a live block of this engine, or `NotFound`.
    fn slot_of(&self, id: BlockId) -> Result<u32, StorageError> {
        if id.tier() != self.tier || id.core() != self.core || !self.slots.live(id.index(), id.generation()) {
            return Err(StorageError::NotFound);
        }
        Ok(id.index())
    }

    /// The owner of a live block (`NotFound` for anything stale or foreign).
    pub fn owner_of(&self, id: BlockId) -> Result<Owner, StorageError> {
        self.slot_of(id).map(|s| self.slots.owner(s))
    }

    fn id(&self, slot: u32) -> BlockId {
        BlockId::new(self.tier, self.core, self.slots.gen(slot), slot)
    }

    pub fn alloc(&mut self, owner: Owner) -> Result<BlockId, StorageError> {
        debug_assert!(is_job_owner(owner));
        let (slot, _) = self.slots.alloc(owner).ok_or(StorageError::NoCapacity)?;
        debug_assert!(self.sio[slot as usize].reads == 0 && !self.sio[slot as usize].writing);
        Ok(self.id(slot))
    }

    /// Frees a block now: its id is stale at once. The slot is reused once
    /// I/O on it has drained and, for a persistent block, its cleared header
    /// entry is on disk. Requests still waiting on it fail `NotFound`.
    pub fn free(&mut self, id: BlockId) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        self.release(slot);
        Ok(())
    }

    fn release(&mut self, slot: u32) {
        if self.slots.begin_release(slot) {
            self.sio[slot as usize].hdr_pending = true;
            self.hdr_dirty(slot);
        }
        self.try_reuse(slot);
    }

    fn try_reuse(&mut self, slot: u32) {
        let io = self.sio[slot as usize];
        if self.slots.releasing(slot) && io.reads == 0 && !io.writing && io.waiting == 0 && !io.hdr_pending {
            self.slots.finish_release(slot);
        }
    }

    /// Frees every block `owner` allocated except those in `keep`, which
    /// pass to `PERSISTED_OWNER`. Returns how many were freed.
    pub fn free_owner(&mut self, owner: Owner, keep: &HashSet<BlockId>) -> usize {
        assert!(is_job_owner(owner), "bulk free of a reserved owner");
        let mut n = 0;
        for slot in 0..self.slots.count() {
            if self.slots.owner(slot) != owner {
                continue;
            }
            if keep.contains(&self.id(slot)) {
                self.slots.set_owner(slot, PERSISTED_OWNER);
                if self.slots.persistent(slot) {
                    self.hdr_dirty(slot);
                }
            } else {
                self.release(slot);
                n += 1;
            }
        }
        n
    }

    /// Persistent blocks found at open: (id, owner, length). Every other
    /// slot started empty.
    pub fn recovered_persistent(&self) -> &[(BlockId, u32, u32)] {
        &self.recovered
    }

    pub fn open_report(&self) -> OpenReport {
        self.report
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }

    /// The tier number in this engine's block ids.
    pub fn tier(&self) -> u8 {
        self.tier
    }

    pub fn usage(&self) -> FlashUsage {
        FlashUsage {
            tier: TierUsage {
                blocks_total: self.slots.count() as u64,
                blocks_used: self.slots.used(),
                block_size: self.geo.block_size as u64,
                huge_pages: self.pool.huge_pages(),
            },
            path: self.path.clone(),
            region: self.region,
            mode: self.mode,
            refused: self.rings.as_ref().and_then(|r| r.refused.clone()),
            registered: self.fixed_buf.is_some() && self.fixed_file.is_some(),
            retired: self.slots.retired() as u64,
            in_flight: self.data_in_ring + self.meta_in_ring,
            buffers_free: self.pool.available(),
            buffers_in_use: self.pool.in_use(),
            writes_reserved: self.pool.reserved(),
            io: self.stats.io,
            errors: self.stats.errors,
        }
    }

    // ---- submission ----

    /// A request slot (and a data buffer if `buf`), or `Busy`.
    fn take_req(&mut self, buf: bool) -> Result<u32, StorageError> {
        if self.free_reqs.len() <= self.pool.reserved() as usize {
            return Err(StorageError::Busy);
        }
        let b = if buf { self.pool.take().ok_or(StorageError::Busy)? } else { NO_BUF };
        let idx = self.free_reqs.pop().expect("checked above");
        self.init_req(idx, b);
        Ok(idx)
    }

    fn init_req(&mut self, idx: u32, buf: u32) {
        let r = &mut self.reqs[idx as usize];
        debug_assert_eq!(r.phase, Phase::Free);
        let seq = r.seq.wrapping_add(1) & tag::SEQ_MASK;
        *r = Req::new();
        r.seq = seq;
        r.buf = buf;
        r.phase = Phase::Waiting;
    }

    /// Reads `len` bytes (`u32::MAX`: to the end of the data) from
    /// `offset`. Completes with `Completion::Read`, whose buffer holds
    /// exactly the bytes (fewer than `len` at the end of the data).
    pub fn submit_read(
        &mut self,
        token: u64,
        id: BlockId,
        offset: u32,
        len: u32,
    ) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        let idx = self.take_req(true)?;
        let r = &mut self.reqs[idx as usize];
        (r.token, r.kind, r.slot, r.gen, r.off, r.len) =
            (token, Kind::Read, slot, id.generation(), offset, len);
        self.enqueue(idx);
        Ok(())
    }

    /// Writes `data` at `offset` (copied into a registered buffer now). As
    /// in DRAM: holes are refused (`PastData`, in the completion), the
    /// block's length becomes at least `offset + data.len()`.
    pub fn submit_write(
        &mut self,
        token: u64,
        id: BlockId,
        offset: u32,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        self.check_end(offset as u64 + data.len() as u64)?;
        let idx = self.take_req(true)?;
        self.fill(idx, offset % SECTOR as u32, data);
        let r = &mut self.reqs[idx as usize];
        (r.token, r.kind, r.slot, r.gen, r.off) = (token, Kind::Write, slot, id.generation(), offset);
        self.enqueue(idx);
        Ok(())
    }

    /// Appends `data` at the block's length when the request runs.
    pub fn submit_append(&mut self, token: u64, id: BlockId, data: &[u8]) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        let have = self.slots.len(slot);
        self.check_end(have as u64 + data.len() as u64)?;
        let idx = self.take_req(true)?;
        self.fill(idx, have % SECTOR as u32, data);
        let r = &mut self.reqs[idx as usize];
        (r.token, r.kind, r.slot, r.gen) = (token, Kind::Append, slot, id.generation());
        self.enqueue(idx);
        Ok(())
    }

    fn check_end(&self, end: u64) -> Result<(), StorageError> {
        if end > self.geo.block_size as u64 {
            return Err(StorageError::PastBlockEnd { end, block_size: self.geo.block_size });
        }
        Ok(())
    }

    fn fill(&mut self, idx: u32, pos: u32, data: &[u8]) {
        let r = &mut self.reqs[idx as usize];
        r.pos = pos;
        r.len = data.len() as u32;
        // SAFETY: the request owns buffer `r.buf` (just taken from the pool);
        // no I/O uses it yet.
        unsafe { self.pool.buf_mut(r.buf, pos as usize, data.len()) }.copy_from_slice(data);
    }

    /// A registered buffer for a write of `len` bytes at `offset`, to fill
    /// and pass to `submit_write_buf`; it reserves a queue slot, so that
    /// submission cannot be `Busy`.
    pub fn write_buffer(&mut self, offset: u32, len: u32) -> Result<WriteBuf, StorageError> {
        self.check_end(offset as u64 + len as u64)?;
        self.reserve_buffer(offset % SECTOR as u32, len)
    }

    /// Whether one more `WriteBuf` may be held for a body still arriving
    /// from the network: such buffers take at most half the queue's request
    /// slots and half the pool, so slow senders cannot starve the requests
    /// of others (which are never refused for want of them).
    pub fn may_reserve_for_receive(&self) -> bool {
        let next = self.pool.reserved() as usize + 1;
        next * 2 <= self.reqs.len() && next * 2 <= self.pool.count()
    }

    /// As `write_buffer`, for an append to `id`.
    pub fn append_buffer(&mut self, id: BlockId, len: u32) -> Result<WriteBuf, StorageError> {
        let slot = self.slot_of(id)?;
        let have = self.slots.len(slot);
        self.check_end(have as u64 + len as u64)?;
        self.reserve_buffer(have % SECTOR as u32, len)
    }

    fn reserve_buffer(&mut self, pos: u32, len: u32) -> Result<WriteBuf, StorageError> {
        if self.free_reqs.len() <= self.pool.reserved() as usize {
            return Err(StorageError::Busy);
        }
        let buf = self.pool.take().ok_or(StorageError::Busy)?;
        Ok(WriteBuf::new(self.pool.clone(), buf, pos, len))
    }

    /// Writes the bytes of `buf` (from `write_buffer`) at `offset`.
    pub fn submit_write_buf(
        &mut self,
        token: u64,
        id: BlockId,
        offset: u32,
        buf: WriteBuf,
    ) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        self.check_end(offset as u64 + buf.len() as u64)?;
        let idx = self.adopt(buf);
        let r = &mut self.reqs[idx as usize];
        (r.token, r.kind, r.slot, r.gen, r.off) = (token, Kind::Write, slot, id.generation(), offset);
        self.enqueue(idx);
        Ok(())
    }

    /// Appends the bytes of `buf` (from `append_buffer`).
    pub fn submit_append_buf(&mut self, token: u64, id: BlockId, buf: WriteBuf) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        self.check_end(self.slots.len(slot) as u64 + buf.len() as u64)?;
        let idx = self.adopt(buf);
        let r = &mut self.reqs[idx as usize];
        (r.token, r.kind, r.slot, r.gen) = (token, Kind::Append, slot, id.generation());
        self.enqueue(idx);
        Ok(())
    }

    fn adopt(&mut self, buf: WriteBuf) -> u32 {
        assert!(Rc::ptr_eq(&buf.pool, &self.pool), "a write buffer from another engine");
        let (b, pos, len) = buf.into_raw();
        self.pool.unreserve();
        let idx = self.free_reqs.pop().expect("write_buffer reserved a request slot");
        self.init_req(idx, b);
        let r = &mut self.reqs[idx as usize];
        (r.pos, r.len) = (pos, len);
        idx
    }

    /// Makes the block survive a restart: once its data is durable, writes
    /// its header entry (owner, generation, length) with the data synced
    /// first. Completes with `Completion::Persisted`. Later writes to the
    /// block keep the entry's length current.
    pub fn mark_persistent(&mut self, token: u64, id: BlockId) -> Result<(), StorageError> {
        let slot = self.slot_of(id)?;
        let idx = self.take_req(false)?;
        let r = &mut self.reqs[idx as usize];
        (r.token, r.kind, r.slot, r.gen) = (token, Kind::Persist, slot, id.generation());
        self.enqueue(idx);
        Ok(())
    }

    /// Starts `idx` now if nothing is ahead of it on its block, else queues
    /// it behind.
    fn enqueue(&mut self, idx: u32) {
        let slot = self.reqs[idx as usize].slot as usize;
        if self.sio[slot].waiting == 0 && self.try_start(idx) {
            return;
        }
        self.sio[slot].waiting += 1;
        self.deferred.push_back(idx);
    }

    /// Starts waiting requests in order, each once its block allows.
    fn schedule(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        self.blocked.clear();
        for _ in 0..self.deferred.len() {
            let Some(idx) = self.deferred.pop_front() else { break };
            let slot = self.reqs[idx as usize].slot;
            if self.blocked.contains(&slot) {
                self.deferred.push_back(idx);
                continue;
            }
            self.sio[slot as usize].waiting -= 1;
            if !self.try_start(idx) {
                self.sio[slot as usize].waiting += 1;
                self.deferred.push_back(idx);
                self.blocked.push(slot);
            }
        }
    }

    /// Starts request `idx` (or finishes it with an error) unless its block
    /// is busy in a conflicting way; false means "not yet".
    fn try_start(&mut self, idx: u32) -> bool {
        let r = &self.reqs[idx as usize];
        let (slot, kind) = (r.slot, r.kind);
        if !self.slots.live(slot, r.gen) {
            self.finish(idx, Err(StorageError::NotFound));
            return true;
        }
        if self.conflicts(kind, slot) {
            return false;
        }
        match kind {
            Kind::Read => self.start_read(idx),
            Kind::Write | Kind::Append => self.start_write(idx),
            Kind::Persist => self.start_persist(idx),
        }
        true
    }

    /// Whether a `kind` request on `slot` must wait for I/O already on the block.
    fn conflicts(&self, kind: Kind, slot: u32) -> bool {
        let io = self.sio[slot as usize];
        match kind {
            Kind::Read | Kind::Persist => io.writing,
            Kind::Write | Kind::Append => io.writing || io.reads > 0,
        }
    }

    fn start_read(&mut self, idx: u32) {
        let r = &mut self.reqs[idx as usize];
        let have = self.slots.len(r.slot);
        if r.off > have {
            let e = StorageError::PastData { offset: r.off, len: have };
            self.finish(idx, Err(e));
            return;
        }
        let n = r.len.min(have - r.off);
        if n == 0 {
            self.finish(idx, Ok(Outcome::Read { start: 0, len: 0 }));
            return;
        }
        r.s0 = round_down(r.off as u64, SECTOR) as u32;
        r.s1 = round_up(r.off as u64 + n as u64, SECTOR) as u32;
        r.len = n;
        r.role = Role::Reader;
        self.sio[r.slot as usize].reads += 1;
        r.phase = Phase::Read;
        (r.io_start, r.io_len, r.io_done) = (r.s0, r.s1 - r.s0, 0);
        self.ready.push_back(idx);
    }

    fn start_write(&mut self, idx: u32) {
        let bs = self.geo.block_size;
        let r = &mut self.reqs[idx as usize];
        let have = self.slots.len(r.slot);
        if r.kind == Kind::Append {
            r.off = have;
        }
        if r.off > have {
            let e = StorageError::PastData { offset: r.off, len: have };
            self.finish(idx, Err(e));
            return;
        }
        let end = r.off as u64 + r.len as u64;
        if end > bs as u64 {
            self.finish(idx, Err(StorageError::PastBlockEnd { end, block_size: bs }));
            return;
        }
        if r.len == 0 {
            self.finish(idx, Ok(Outcome::Written(have)));
            return;
        }
        let end = end as u32;
        let pos = r.off % SECTOR as u32;
        if r.pos != pos {
            // Queued behind other appends: the data landed where the block's
            // length then ended. Move it to where the sector puts it.
            let (from, len) = (r.pos as usize, r.len as usize);
            // SAFETY: the request owns its buffer and no I/O uses it yet.
            let b = unsafe { self.pool.buf_mut(r.buf, 0, bs as usize) };
            b.copy_within(from..from + len, pos as usize);
            r.pos = pos;
        }
        r.s0 = round_down(r.off as u64, SECTOR) as u32;
        r.s1 = round_up(end as u64, SECTOR) as u32;
        r.have = have;
        // Bytes after the data up to the sector end: old data (read back
        // below) or nothing, but never a previous user's bytes.
        let tail_from = (end - r.s0) as usize;
        // SAFETY: as above.
        unsafe { self.pool.buf_mut(r.buf, tail_from, (r.s1 - end) as usize) }.fill(0);
        r.role = Role::Writer;
        self.sio[r.slot as usize].writing = true;
        self.next_write_phase(idx, Phase::Waiting);
    }

    /// The read-modify-write reads a write still needs after `after`, then
    /// the write itself.
    fn next_write_phase(&mut self, idx: u32, after: Phase) {
        let r = &mut self.reqs[idx as usize];
        let end = r.off + r.len;
        let head = r.off != r.s0;
        let tail = end != r.s1 && end < r.have;
        let one_sector = r.s1 - r.s0 == SECTOR as u32;
        let next = match after {
            Phase::Waiting if head => Phase::HeadRead,
            Phase::Waiting | Phase::HeadRead if tail && !(head && one_sector) => Phase::TailRead,
            _ => Phase::Write,
        };
        r.phase = next;
        (r.io_start, r.io_len, r.io_done) = match next {
            Phase::HeadRead => (r.s0, SECTOR as u32, 0),
            Phase::TailRead => (r.s1 - SECTOR as u32, SECTOR as u32, 0),
            _ => (r.s0, r.s1 - r.s0, 0),
        };
        self.ready.push_back(idx);
    }

    fn start_persist(&mut self, idx: u32) {
        let slot = self.reqs[idx as usize].slot;
        self.slots.set_persistent(slot);
        let (sector, ver) = self.hdr_dirty(slot);
        self.reqs[idx as usize].phase = Phase::Header(sector, ver);
        self.hdr_waiters.push(idx);
    }

    /// Ends request `idx` with `result`; gives back its hold on the block
    /// and, unless it hands read data out, its buffer.
    fn finish(&mut self, idx: u32, result: Result<Outcome, StorageError>) {
        let r = &mut self.reqs[idx as usize];
        debug_assert!(!r.in_ring && r.phase != Phase::Free && r.phase != Phase::Done);
        let slot = r.slot as usize;
        match r.role {
            Role::Reader => self.sio[slot].reads -= 1,
            Role::Writer => self.sio[slot].writing = false,
            Role::None => {}
        }
        r.role = Role::None;
        let keeps_buf = matches!(result, Ok(Outcome::Read { .. }));
        if !keeps_buf && r.buf != NO_BUF {
            self.pool.give(r.buf);
            r.buf = NO_BUF;
        }
        if matches!(result, Err(StorageError::Io { .. })) {
            self.stats.errors += 1;
        }
        r.phase = Phase::Done;
        r.result = Some(result);
        self.done.push_back(idx);
        self.try_reuse(slot as u32);
    }

    // ---- header write-back ----

    /// Slot `slot`'s header entry changed; returns (sector, version) that
    /// a flush must reach for the change to be on disk.
    fn hdr_dirty(&mut self, slot: u32) -> (u32, u32) {
        let s = slot / ENTRIES_PER_SECTOR;
        let h = &mut self.hdr;
        h.ver[s as usize] = h.ver[s as usize].wrapping_add(1);
        if h.state[s as usize] & (QUEUED | FLYING) == 0 {
            h.state[s as usize] |= QUEUED;
            h.dirty.push_back(s);
        }
        (s, h.ver[s as usize])
    }

    fn fill_header_sector(&self, s: u32, staging: u32) {
        // SAFETY: the staging sector belongs to the flush (or to the closing
        // engine) filling it; no I/O uses it now.
        let out = unsafe { self.pool.staging_mut(staging) };
        for (k, e) in out.chunks_exact_mut(ENTRY_LEN).enumerate() {
            let slot = s * ENTRIES_PER_SECTOR + k as u32;
            match (slot < self.geo.slots).then(|| self.slots.entry(slot)).flatten() {
                Some(entry) => entry.encode(slot, e),
                None => e.fill(0),
            }
        }
    }

    /// Starts flushes of dirty sectors while flights are free, after
    /// queueing the failed ones whose backoff has run out.
    fn start_flushes(&mut self) {
        if !self.hdr.backoff.is_empty() {
            let now = Instant::now();
            let h = &mut self.hdr;
            let mut i = 0;
            while i < h.backoff.len() {
                let (s, due) = h.backoff[i];
                if due <= now {
                    debug_assert_eq!(h.state[s as usize], QUEUED);
                    h.backoff.swap_remove(i);
                    h.dirty.push_back(s);
                } else {
                    i += 1;
                }
            }
        }
        while !self.hdr.free.is_empty() {
            let Some(s) = self.hdr.dirty.pop_front() else { break };
            let f = self.hdr.free.pop().expect("checked above");
            self.hdr.state[s as usize] = FLYING;
            // The contents are fixed before the sync is issued: everything
            // they describe has completed, so the sync covers it.
            self.fill_header_sector(s, f);
            let fl = &mut self.hdr.flights[f as usize];
            fl.seq = fl.seq.wrapping_add(1) & tag::SEQ_MASK;
            (fl.sector, fl.ver, fl.phase, fl.retries) = (s, self.hdr.ver[s as usize], FlushPhase::Sync, 0);
            self.hdr.ready.push_back(f);
        }
    }

    fn flight_done(&mut self, f: u32, seq: u32, res: i32) {
        let Some(fl) = self.hdr.flights.get_mut(f as usize).filter(|fl| fl.seq == seq && fl.in_ring) else {
            debug_assert!(false, "stale header completion {f}/{seq}");
            return;
        };
        fl.in_ring = false;
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && fl.retries < MAX_RETRIES {
                fl.retries += 1;
                self.hdr.ready.push_back(f);
                return;
            }
            return self.flight_end(f, Err(errno));
        }
        match fl.phase {
            FlushPhase::Sync => {
                fl.phase = FlushPhase::Write;
                self.hdr.ready.push_back(f);
            }
            FlushPhase::Write if res as u64 == SECTOR => self.flight_end(f, Ok(())),
            FlushPhase::Write => {
                // A short sector write: write it all again.
                if fl.retries >= MAX_RETRIES {
                    return self.flight_end(f, Err(libc::EIO));
                }
                fl.retries += 1;
                self.hdr.ready.push_back(f);
            }
            FlushPhase::Idle => debug_assert!(false, "completion for an idle flush"),
        }
    }

    fn flight_end(&mut self, f: u32, r: Result<(), i32>) {
        let fl = self.hdr.flights[f as usize];
        let s = fl.sector as usize;
        self.hdr.flights[f as usize].phase = FlushPhase::Idle;
        self.hdr.free.push(f);
        self.hdr.state[s] = 0;
        match r {
            Ok(()) => {
                self.hdr.durable[s] = fl.ver;
                self.hdr.failures[s] = 0;
            }
            Err(errno) => {
                self.stats.errors += 1;
                self.hdr.failures[s] = self.hdr.failures[s].saturating_add(1);
                tracing::error!(
                    path = %self.path.display(),
                    sector = s,
                    attempt = self.hdr.failures[s],
                    error = %io::Error::from_raw_os_error(errno),
                    "block header write failed"
                );
            }
        }
        // Persist requests this flush covered.
        let mut i = 0;
        while i < self.hdr_waiters.len() {
            let idx = self.hdr_waiters[i];
            match self.reqs[idx as usize].phase {
                Phase::Header(sector, ver) if sector == fl.sector && ver.wrapping_sub(fl.ver) as i32 <= 0 => {
                    self.hdr_waiters.swap_remove(i);
                    let result = r.map(|()| Outcome::Persisted).map_err(|errno| StorageError::Io { errno });
                    self.finish(idx, result);
                }
                _ => i += 1,
            }
        }
        // A failed flush is retried: until the sector is on disk, the freed
        // persistent blocks in it keep their slots (`hdr_pending`), or a
        // crash could bring their old entries back over a new block.
        let retry = r.is_err() && self.hdr.failures[s] < HDR_WRITE_ATTEMPTS;
        if self.hdr.ver[s] != fl.ver || retry {
            // Changed meanwhile, or failed: flush again; after a failure,
            // once its backoff has passed (`start_flushes` queues it then).
            self.hdr.state[s] = QUEUED;
            match self.hdr.failures[s] {
                0 => self.hdr.dirty.push_back(fl.sector),
                n => {
                    let due = Instant::now() + hdr_retry_delay(n);
                    self.hdr.backoff.push((fl.sector, due));
                }
            }
        } else if r.is_err() {
            tracing::error!(
                path = %self.path.display(),
                sector = s,
                "block header sector not written after {HDR_WRITE_ATTEMPTS} attempts: its freed blocks stay \
                 out of use until the sector changes again or the region closes"
            );
        } else {
            // Clean: freed persistent blocks in it may be reused.
            let first = fl.sector * ENTRIES_PER_SECTOR;
            for slot in first..(first + ENTRIES_PER_SECTOR).min(self.geo.slots) {
                if self.sio[slot as usize].hdr_pending {
                    self.sio[slot as usize].hdr_pending = false;
                    self.try_reuse(slot);
                }
            }
        }
    }

    // ---- the ring ----

    fn file_target(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// The operation request `idx`'s current phase needs next.
    fn data_entry(&mut self, idx: u32) -> squeue::Entry {
        let r = &mut self.reqs[idx as usize];
        let n = (r.io_len - r.io_done).min(self.max_request);
        debug_assert!(n > 0 && n.is_multiple_of(SECTOR as u32));
        r.issued = n;
        let file_off = self.region.start + self.geo.block_off(r.slot) + (r.io_start + r.io_done) as u64;
        let (write, ptr) = match r.phase {
            Phase::HeadRead | Phase::TailRead => (false, self.pool.scratch_ptr(idx)),
            Phase::Read => (false, self.pool.buf_ptr(r.buf, r.io_done as usize)),
            Phase::Write => (true, self.pool.buf_ptr(r.buf, r.io_done as usize)),
            p => unreachable!("request {idx} in phase {p:?} has no I/O"),
        };
        let ud = tag::encode(self.tier, r.seq, false, idx);
        macro_rules! rw {
            ($fd:expr) => {
                match (write, self.fixed_buf) {
                    (false, Some(b)) => opcode::ReadFixed::new($fd, ptr, n, b).offset(file_off).build(),
                    (false, None) => opcode::Read::new($fd, ptr, n).offset(file_off).build(),
                    (true, Some(b)) => opcode::WriteFixed::new($fd, ptr, n, b).offset(file_off).build(),
                    (true, None) => opcode::Write::new($fd, ptr, n).offset(file_off).build(),
                }
            };
        }
        let e = match self.fixed_file {
            Some(i) => rw!(types::Fixed(i)),
            None => rw!(self.file_target()),
        };
        e.user_data(ud)
    }

    fn meta_entry(&mut self, f: u32) -> squeue::Entry {
        let fl = &mut self.hdr.flights[f as usize];
        let ud = tag::encode(self.tier, fl.seq, true, f);
        let fd = types::Fd(self.file.as_raw_fd());
        match fl.phase {
            FlushPhase::Sync => {
                opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(ud)
            }
            FlushPhase::Write => {
                let at = self.region.start + self.geo.header_sector_off(fl.sector);
                opcode::Write::new(fd, self.pool.staging_ptr(f), SECTOR as u32)
                    .offset(at)
                    .rw_flags(libc::RWF_DSYNC)
                    .build()
                    .user_data(ud)
            }
            FlushPhase::Idle => unreachable!("idle flush {f} submitted"),
        }
    }

    /// Pushes up to one submission batch (`TierPolicy::submit_batch`) of
    /// ready data operations into `sq`.
    fn push_data(&mut self, sq: &mut io_uring::SubmissionQueue<'_>) -> usize {
        let mut n = 0;
        while !sq.is_full() && n < self.submit_batch {
            let Some(idx) = self.ready.pop_front() else { break };
            let e = self.data_entry(idx);
            // SAFETY: the operation reads or writes the request's data
            // buffer or its scratch sector. The request owns both until its
            // final completion: the buffer is out of the pool's free list and
            // goes to a `ReadBuf` or back to the pool only in `finish`, which
            // runs after the last completion (`in_ring` is false); the
            // scratch sector is indexed by the request slot. The pool's
            // memory outlives the ring (field order), or is leaked by `close`
            // while anything is in flight.
            if unsafe { sq.push(&e) }.is_err() {
                self.ready.push_front(idx);
                break;
            }
            self.reqs[idx as usize].in_ring = true;
            self.data_in_ring += 1;
            n += 1;
        }
        n
    }

    fn push_meta(&mut self, sq: &mut io_uring::SubmissionQueue<'_>) -> usize {
        let mut n = 0;
        while !sq.is_full() {
            let Some(f) = self.hdr.ready.pop_front() else { break };
            let e = self.meta_entry(f);
            // SAFETY: a header write reads staging sector `f`, owned by the
            // flight until its completion (a flight is reused only after
            // `flight_end`); an fsync carries no buffer. Lifetime of the
            // memory as for data operations.
            if unsafe { sq.push(&e) }.is_err() {
                self.hdr.ready.push_front(f);
                break;
            }
            self.hdr.flights[f as usize].in_ring = true;
            self.meta_in_ring += 1;
            n += 1;
        }
        n
    }

    /// Shared ring: starts what can start and pushes one submission batch
    /// of ready operations into `sq` (as many as fit). The caller submits;
    /// `submit_on` does both for every batch ready.
    pub fn push_submissions(&mut self, sq: &mut io_uring::SubmissionQueue<'_>) -> usize {
        self.schedule();
        self.start_flushes();
        self.push_data(sq) + self.push_meta(sq)
    }

    /// Shared ring: submits everything ready, one system call per batch
    /// (`TierPolicy::submit_batch`), so the device starts on the first
    /// while the next are submitted. Returns the operations submitted.
    pub fn submit_on(&mut self, ring: &mut IoUring) -> usize {
        let mut total = 0;
        loop {
            let n = self.push_submissions(&mut ring.submission());
            if n == 0 {
                break;
            }
            total += n;
            Self::enter(ring);
            if self.ready.is_empty() && self.hdr.ready.is_empty() {
                break;
            }
        }
        total
    }

    /// Handles one completion of this engine (see `tag`). On a shared ring
    /// the core calls it; `poll_completions` does for the engine's own.
    pub fn complete(&mut self, user_data: u64, result: i32) {
        debug_assert!(tag::is_storage(user_data) && tag::engine(user_data) == self.tier);
        let (seq, meta, idx) = tag::decode(user_data);
        if meta {
            self.meta_in_ring = self.meta_in_ring.saturating_sub(1);
            #[cfg(test)]
            let result = self.inject_meta.pop_front().unwrap_or(result);
            self.flight_done(idx, seq, result);
        } else {
            self.data_in_ring = self.data_in_ring.saturating_sub(1);
            #[cfg(test)]
            let result = match self.inject.pop_front() {
                Some(v) if v < 0 => v,
                Some(short) => result.min(short),
                None => result,
            };
            self.data_done(idx, seq, result);
        }
    }

    fn data_done(&mut self, idx: u32, seq: u32, res: i32) {
        let Some(r) = self.reqs.get_mut(idx as usize).filter(|r| r.seq == seq && r.in_ring) else {
            debug_assert!(false, "stale storage completion {idx}/{seq}");
            return;
        };
        r.in_ring = false;
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && r.retries < MAX_RETRIES {
                r.retries += 1;
                self.ready.push_back(idx);
                return;
            }
            return self.io_failed(idx, errno);
        }
        let n = res as u32;
        if n == 0 || n > r.issued {
            // No progress: the file ends early (shrunk underneath us).
            return self.io_failed(idx, libc::EIO);
        }
        r.retries = 0;
        r.io_done += n;
        if r.io_done < r.io_len {
            if !r.io_done.is_multiple_of(SECTOR as u32) {
                // Only the end of a file stops a direct transfer off a
                // sector boundary, and direct I/O cannot resume there.
                return self.io_failed(idx, libc::EIO);
            }
            // Short, or the next piece of a long transfer.
            self.ready.push_back(idx);
            return;
        }
        self.phase_done(idx);
    }

    fn io_failed(&mut self, idx: u32, errno: i32) {
        let r = &self.reqs[idx as usize];
        tracing::warn!(
            path = %self.path.display(),
            slot = r.slot,
            phase = ?r.phase,
            error = %io::Error::from_raw_os_error(errno),
            "block I/O failed"
        );
        self.finish(idx, Err(StorageError::Io { errno }));
    }

    fn phase_done(&mut self, idx: u32) {
        let r = &self.reqs[idx as usize];
        match r.phase {
            Phase::Read => {
                let out = Outcome::Read { start: r.off - r.s0, len: r.len };
                self.finish(idx, Ok(out));
            }
            Phase::HeadRead | Phase::TailRead => {
                let after = r.phase;
                self.merge_old(idx);
                self.next_write_phase(idx, after);
            }
            Phase::Write => {
                let (slot, gen, end) = (r.slot, r.gen, r.off + r.len);
                let len = if self.slots.live(slot, gen) {
                    let len = self.slots.len(slot).max(end);
                    self.slots.set_len(slot, len);
                    if self.slots.persistent(slot) {
                        self.hdr_dirty(slot);
                    }
                    len
                } else {
                    r.have.max(end)
                };
                self.finish(idx, Ok(Outcome::Written(len)));
            }
            p => unreachable!("request {idx} completed I/O in phase {p:?}"),
        }
    }

    /// Copies the old bytes a read-modify-write keeps from the sector just
    /// read into scratch to the request's buffer.
    fn merge_old(&self, idx: u32) {
        let r = &self.reqs[idx as usize];
        let sector = r.io_start;
        let keep_to = r.have.min(r.s1);
        // SAFETY: the read into scratch sector `idx` completed and nothing
        // else uses it; the request owns its buffer and no I/O uses it now.
        let (old, buf) =
            unsafe { (self.pool.scratch(idx), self.pool.buf_mut(r.buf, 0, (r.s1 - r.s0) as usize)) };
        let end = r.off + r.len;
        // Kept bytes before the data, in this sector.
        if sector < r.off {
            let to = r.off.min(sector + SECTOR as u32);
            let (a, b) = ((sector - r.s0) as usize, (to - r.s0) as usize);
            buf[a..b].copy_from_slice(&old[..b - a]);
        }
        // Kept bytes after the data, in this sector.
        let from = end.max(sector);
        let to = keep_to.min(sector + SECTOR as u32);
        if from < to {
            let (a, b) = ((from - r.s0) as usize, (to - r.s0) as usize);
            let o = (from - sector) as usize;
            buf[a..b].copy_from_slice(&old[o..o + (b - a)]);
        }
    }

    /// Hands finished requests to `f` in completion order; returns how many.
    pub fn deliver(&mut self, mut f: impl FnMut(u64, Result<Completion, StorageError>)) -> usize {
        if self.done.is_empty() {
            return 0;
        }
        // One clock read per batch of completions (none per idle pass).
        let now = Instant::now();
        let mut n = 0;
        while let Some(idx) = self.done.pop_front() {
            let r = &mut self.reqs[idx as usize];
            debug_assert_eq!(r.phase, Phase::Done);
            debug_assert!(r.result.is_some());
            let result = r.result.take().unwrap_or(Err(StorageError::Busy));
            let token = r.token;
            let out = match result {
                Ok(Outcome::Read { start, len }) => {
                    let buf = std::mem::replace(&mut r.buf, NO_BUF);
                    self.stats.io.read(now, len as u64);
                    Ok(Completion::Read(ReadBuf::new(self.pool.clone(), buf, start, len)))
                }
                Ok(Outcome::Written(len)) => {
                    self.stats.io.write(now, r.len as u64);
                    Ok(Completion::Written { len })
                }
                Ok(Outcome::Persisted) => Ok(Completion::Persisted),
                Err(e) => Err(e),
            };
            debug_assert_eq!(r.buf, NO_BUF);
            r.phase = Phase::Free;
            self.free_reqs.push(idx);
            f(token, out);
            n += 1;
        }
        n
    }

    /// Requests accepted and not yet delivered, or header writes pending
    /// (a failed one waiting for its retry included).
    pub fn has_work(&self) -> bool {
        self.has_io_work() || !self.hdr.backoff.is_empty()
    }

    /// `has_work`, leaving out failed header writes waiting for their retry.
    fn has_io_work(&self) -> bool {
        self.free_reqs.len() < self.reqs.len()
            || !self.hdr.dirty.is_empty()
            || self.hdr.free.len() < FLIGHTS as usize
    }

    /// When the earliest failed header write waiting for its retry is due:
    /// nothing but a pass of the core after that instant starts it, so a
    /// parked core must wake by then.
    pub fn retry_due(&self) -> Option<Instant> {
        self.hdr.backoff.iter().map(|&(_, due)| due).min()
    }

    /// Own ring: starts what can start, submits, reaps completions, and
    /// hands finished requests to `f`. Never blocks. Returns how many
    /// requests were delivered.
    pub fn poll_completions(&mut self, f: impl FnMut(u64, Result<Completion, StorageError>)) -> usize {
        let Some(mut rings) = self.rings.take() else {
            debug_assert!(false, "poll_completions on an engine without a ring of its own");
            return self.deliver(f);
        };
        // A completion often makes the next step ready (the write after a
        // read-modify-write's read, the rest of a short transfer): go round
        // again while that happens, a bounded number of times.
        for _ in 0..4 {
            self.schedule();
            self.start_flushes();
            let mut pushed = self.push_data(&mut rings.data.submission());
            match rings.meta.as_mut() {
                // Interrupt-driven: entered to submit only.
                Some(m) => {
                    if self.push_meta(&mut m.submission()) > 0 {
                        Self::enter(m);
                    }
                }
                None => pushed += self.push_meta(&mut rings.data.submission()),
            }
            // IOPOLL finds completions only by entering; otherwise enter to
            // submit (SQPOLL's `submit` enters only to wake its thread).
            if pushed > 0 || (rings.mode.iopoll() && self.data_in_ring > 0) {
                Self::enter(&mut rings.data);
            }
            // The rest of what is ready, a batch per system call.
            while pushed > 0 && !self.ready.is_empty() {
                pushed = self.push_data(&mut rings.data.submission());
                if pushed > 0 {
                    Self::enter(&mut rings.data);
                }
            }
            let mut reaped = 0;
            for ring in std::iter::once(&mut rings.data).chain(rings.meta.as_mut()) {
                for c in ring.completion() {
                    self.complete(c.user_data(), c.result());
                    reaped += 1;
                }
            }
            if reaped == 0 {
                break;
            }
        }
        self.rings = Some(rings);
        self.deliver(f)
    }

    fn enter(ring: &mut IoUring) {
        if let Err(e) = ring.submit() {
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) {
                tracing::error!(error = %e, "storage ring submit failed");
            }
        }
    }

    /// Whether operations of this engine are in a ring (submitted, not yet
    /// completed): a completion will come, and wake a parked core unless
    /// polled (`can_park`).
    pub fn in_ring(&self) -> bool {
        self.data_in_ring + self.meta_in_ring > 0
    }

    /// Data buffers given back so far (wrapping): one more may let a
    /// request that was `Busy` for want of a buffer go.
    pub fn buffers_returned(&self) -> u64 {
        self.pool.returned()
    }

    /// Whether the engine runs on a ring shared with the core's network
    /// (`open_on`): the core pushes its submissions and routes its
    /// completions.
    pub fn is_shared(&self) -> bool {
        self.rings.is_none()
    }

    /// Own ring: makes completions signal `eventfd`, so a parked core
    /// wakes for them. Polled completions (IOPOLL) signal nothing: a core
    /// must not park while `has_work` in that mode.
    pub fn register_waker(&mut self, eventfd: std::os::fd::RawFd) -> io::Result<()> {
        let Some(rings) = self.rings.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the shared ring's owner registers its eventfd",
            ));
        };
        if let Some(m) = rings.meta.as_ref() {
            m.submitter().register_eventfd(eventfd)?;
        }
        if !rings.mode.iopoll() {
            rings.data.submitter().register_eventfd(eventfd)?;
        }
        self.waker = true;
        Ok(())
    }

    /// Whether the core may sleep now: the engine can make no progress
    /// until a completion arrives, and every operation in flight wakes a
    /// sleeping core — it completes on the shared ring the core sleeps on, or
    /// signals the registered eventfd (polled IOPOLL data reads and writes
    /// do not). Meaningful right after `poll_completions` (own ring) or
    /// `push_submissions` and `deliver` (shared ring), before anything else
    /// is submitted.
    pub fn can_park(&self) -> bool {
        // A failed header write waiting for its retry needs a pass once it
        // is due: the core parks no longer than `retry_due`.
        if !self.has_io_work() {
            return true;
        }
        // On a shared ring completions land on the ring the core sleeps on;
        // on an own ring they signal the waker, unless polled (IOPOLL).
        let signalled = match self.rings.as_ref() {
            None => true,
            Some(rings) => self.waker && !(rings.mode.iopoll() && self.data_in_ring > 0),
        };
        if !signalled {
            return false;
        }
        // Something to submit or hand back: only this core's next pass moves it.
        if !self.ready.is_empty() || !self.hdr.ready.is_empty() || !self.done.is_empty() {
            return false;
        }
        if !self.hdr.dirty.is_empty() && !self.hdr.free.is_empty() {
            return false;
        }
        // A waiting request that could start (the first on its block decides,
        // as in `schedule`).
        let startable = self.deferred.iter().enumerate().any(|(i, &idx)| {
            let r = &self.reqs[idx as usize];
            let first = !self.deferred.iter().take(i).any(|&j| self.reqs[j as usize].slot == r.slot);
            first && (!self.slots.live(r.slot, r.gen) || !self.conflicts(r.kind, r.slot))
        });
        if startable {
            return false;
        }
        // Whatever still waits, waits for an operation in a ring.
        debug_assert!(self.data_in_ring + self.meta_in_ring > 0, "engine work that nothing will complete");
        self.data_in_ring + self.meta_in_ring > 0
    }

    /// The buffer pool's index in the ring's registered-buffer table
    /// (`RingSlots::buf` on a shared ring), for fixed-buffer sends of a
    /// `ReadBuf`; `None` if registration failed.
    pub fn fixed_buffer_index(&self) -> Option<u16> {
        self.fixed_buf
    }

    /// Own ring: blocks up to `timeout` for a completion (interrupt and
    /// SQPOLL modes; IOPOLL just polls once). For tests and for parking.
    pub fn wait(&mut self, timeout: Duration) {
        let Some(rings) = self.rings.as_mut() else { return };
        if self.data_in_ring + self.meta_in_ring == 0 {
            return;
        }
        if rings.mode.iopoll() || rings.meta.is_some() {
            Self::enter(&mut rings.data);
            if let Some(m) = rings.meta.as_mut() {
                Self::enter(m);
            }
            std::thread::yield_now();
            return;
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = rings.data.submitter().submit_with_args(1, &args);
    }

    /// The next data completion fails with `errno`.
    #[cfg(test)]
    pub(super) fn inject_error(&mut self, errno: i32) {
        self.inject.push_back(-errno);
    }

    /// The next header flush completion (its sync or its write) fails with `errno`.
    #[cfg(test)]
    pub(super) fn inject_header_error(&mut self, errno: i32) {
        self.inject_meta.push_back(-errno);
    }

    /// The next data completion reports at most `bytes` done.
    #[cfg(test)]
    pub(super) fn inject_short(&mut self, bytes: i32) {
        assert!(bytes >= 0);
        self.inject.push_back(bytes);
    }

    /// Drops the engine without marking the region clean, as a crash would
    /// (I/O in flight is still waited for, so memory stays sound).
    #[cfg(test)]
    pub(super) fn crash(mut self) {
        self.crashed = true;
    }

    #[cfg(test)]
    pub(super) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// The wait before flushing a header sector again after its `failures`th
/// failed flush in a row (at least 1).
pub(super) fn hdr_retry_delay(failures: u8) -> Duration {
    debug_assert!(failures > 0);
    let doublings = u32::from(failures.saturating_sub(1)).min(16);
    HDR_RETRY_BASE.saturating_mul(1 << doublings).min(HDR_RETRY_MAX)
}

impl Drop for FlashEngine {
    fn drop(&mut self) {
        self.close();
    }
}
