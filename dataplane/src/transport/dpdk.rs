//! DPDK transport (cargo feature `dpdk`): each core polls its own rx/tx queue
//! pair of a DPDK port and runs a user-space TCP/IP stack (smoltcp) over it,
//! answering ARP and speaking IPv4 and TCP with the node's IP and the port's
//! MAC, so clients reach it over ordinary TCP.
//!
//! Received frames are handed to smoltcp straight from mbuf data; smoltcp
//! copies TCP payload into each connection's receive buffer, from which the
//! core parses frames in place. Outgoing segments are written by smoltcp
//! directly into freshly allocated mbufs, which go to the NIC in bursts.
//!
//! Idle waiting (adaptive mode): a DPDK queue has no file descriptor to park
//! on (without rx interrupts, which few setups have), so an idle core sleeps
//! in short, growing naps on its waker's eventfd (`IDLE_NAP_MIN` doubling to
//! `IDLE_NAP_MAX`) and checks its rx queue between naps. A wake-up from
//! another core ends a nap at once; a packet arriving during a nap waits at
//! most `IDLE_NAP_MAX`. Busy mode never naps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ffi::{Mbuf, Mempool, QueuePair};
use slab::Slab;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::{CloseList, CloseTimeouts, ConnId, EventSink, Transport};
use crate::core::waker::Waker;
use crate::node::NetBackend;

/// A connection's receive and send buffers inside the TCP stack. The receive
/// buffer bounds the advertised window (scaled past 64 KiB).
pub const RX_BUFFER: usize = 256 << 10;
pub const TX_BUFFER: usize = 256 << 10;
/// Listening sockets kept ready per port: connections a port can take in one
/// pass before new listeners are added.
const BACKLOG: usize = 4;
/// Sockets in the middle of a handshake, at most: past this no listener is
/// added, so a SYN flood cannot make a core allocate a socket per SYN.
const MAX_EMBRYONIC: usize = 64;
/// A connection whose peer acknowledges nothing for this long (a handshake
/// never completed, data never acknowledged) is aborted.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames taken from the rx queue per pass, so a flood cannot hold a core.
const RX_BUDGET: usize = 512;
/// Frames built and not yet taken by the NIC; past this the stack waits.
const TX_QUEUE: usize = 1024;
/// Bytes read from one connection per pass before others get a turn.
const READ_BUDGET: usize = 1 << 20;
/// ARP frames queued for each other core at most (see `Shared`).
const ARP_QUEUE: usize = 64;
/// Frames steered to each core and not yet taken, at most.
const STEER_QUEUE: usize = 4096;
/// Ethernet MTU plus header.
const MAX_FRAME: usize = 1514;
const IDLE_NAP_MIN: Duration = Duration::from_micros(20);
const IDLE_NAP_MAX: Duration = Duration::from_micros(500);
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// Flows on the shared port sent away from their core because it was off
/// when they opened (see `Shared::route`), at most, over the whole node (all
/// shards of `Shared::redirects`); past this a SYN for an off core is dropped
/// (its retransmission may find room).
const MAX_REDIRECTS: usize = 16 << 10;
/// A redirected flow's entry is kept at least this long, though its core
/// holds no socket for it yet (its SYN may wait in a steering queue).
const REDIRECT_GRACE: Duration = Duration::from_secs(2);
/// How often a core drops the entries of redirected flows it no longer holds.
const REDIRECT_SWEEP: Duration = Duration::from_secs(1);

/// The node-wide state the cores' transports share.
pub struct Shared {
    /// ARP frames received by one core for each other core. RSS delivers
    /// non-IP frames to one queue, but every core's stack needs the
    /// neighbours' addresses: ARP is copied to all (it is rare, and never on
    /// the request path).
    arp: Vec<Mutex<Vec<Vec<u8>>>>,
    arp_pending: Vec<AtomicBool>,
    /// Frames for core i's own port that RSS delivered to another core's
    /// queue, moved (not copied) to core i, whose stack owns the flow: a
    /// client that connects to core i's port reaches core i, as on the
    /// kernel transports. A NIC could steer these in hardware (rte_flow).
    steer: Vec<Mutex<Vec<Mbuf>>>,
    steer_pending: Vec<AtomicBool>,
    /// The node's shared (main) TCP port.
    main_port: u16,
    /// The TCP port of each core.
    core_ports: Vec<u16>,
    /// Whether each core takes new connections on the shared port (a core
    /// turned off does not, `Transport::set_accepting`). Set by the core.
    accepting: Vec<AtomicBool>,
    /// Flows on the shared port whose natural core (the one their hash or
    /// their rx queue names) was off when their SYN came: they are served
    /// by a core that was on, and every segment of theirs goes there, on
    /// whichever queue it arrives, until that core drops their entry.
    ///
    /// One shard per natural core, so no lock on the packet path is
    /// node-wide: `route` locks only the shard of a segment's natural core,
    /// which with RSS is the core whose queue the segment arrived on (on the
    /// tap, with `steer_all`, any core may take it, for that core's flows
    /// only). The other core that locks a shard is a serving core sweeping
    /// it, once a `REDIRECT_SWEEP`.
    ///
    /// Only an off core's shard takes inserts, so only it needs memory: a
    /// core turning off gives its shard room for all `MAX_REDIRECTS` before
    /// it says it is off (`set_accepting`), and `route` never allocates or
    /// frees. A shard whose core is on again is given back once empty
    /// (`fit`). All cores on, the table holds no memory.
    redirects: Vec<Mutex<Flows>>,
    /// Entries in all shards, checked against `MAX_REDIRECTS` before an
    /// insert (a SYN of a redirected flow, never a later segment).
    redirect_count: AtomicUsize,
    /// Entries per natural core (in its shard): a core with none skips its
    /// shard.
    redirected_from: Vec<AtomicUsize>,
    /// Entries per serving core: a core with none skips its sweep.
    redirected_to: Vec<AtomicUsize>,
    /// Every TCP flow goes to a core chosen by hashing its addresses and
    /// ports, whatever queue it arrived on: for devices whose queue choice
    /// is not stable per flow. The tap device is one: the kernel picks its
    /// queue from the sending socket's hash, which TCP changes after a
    /// retransmission timeout, and a flow that moved to another core's stack
    /// would be reset there. NICs hash the addresses and ports in hardware
    /// (RSS) and keep a flow on one queue: no steering but for core ports.
    steer_all: bool,
    /// Each core's waker (an eventfd), to end its idle nap when a frame is
    /// steered to it; set once the cores exist.
    wakers: std::sync::OnceLock<Vec<Arc<Waker>>>,
    /// Frames dropped before the stack: multi-segment, runt or oversized.
    pub dropped_rx: AtomicU64,
    /// Frames the stack built that found no mbuf (pool exhausted).
    pub dropped_tx: AtomicU64,
}

/// Where a received frame goes (`Shared::route`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Route {
    /// Handled by the core it arrived at.
    Stay,
    /// Handled by this core (maybe the one it arrived at).
    To(usize),
    /// Dropped.
    Drop,
}

/// One natural core's part of the redirect table (`Shared::redirects`):
/// the redirected flows whose natural core this is, by `Segment::key`.
type Flows = HashMap<u64, Redirect>;

/// Locks a shard, also one a panic poisoned while holding it: the shard
/// stays consistent (nothing that can panic runs between an entry's insert
/// or removal and its counting in or out), and skipping it would keep its
/// entries, and their places in the node-wide bound, forever.
fn lock(shard: &Mutex<Flows>) -> MutexGuard<'_, Flows> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a redirected flow goes (`Shared::redirects`).
#[derive(Clone, Copy, Debug)]
struct Redirect {
    /// The core the flow's hash or rx queue names.
    natural: usize,
    /// The core that serves it.
    target: usize,
    /// When its SYN was redirected (the last time, for a retransmission).
    since: Instant,
}

/// The parts of an IPv4 TCP segment that steering looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    peer: u32,
    src: u16,
    dst: u16,
    /// SYN without ACK: the segment opens a connection.
    syn: bool,
}

impl Segment {
    /// `None` for anything but IPv4 TCP with its ports (a later fragment
    /// carries none).
    fn parse(frame: &[u8]) -> Option<Segment> {
        if frame.len() < 14 + 20 + 4 || frame[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &frame[14..];
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ip[9] != 6 || ihl < 20 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 || ip.len() < ihl + 4 {
            return None;
        }
        Some(Segment {
            peer: u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]),
            src: u16::from_be_bytes([ip[ihl], ip[ihl + 1]]),
            dst: u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
            syn: ip.get(ihl + 13).is_some_and(|&flags| flags & 0x12 == 0x02),
        })
    }

    /// The flow's hash: the peer's address and port (our side is one
    /// address). Every input bit reaches every output bit (MurmurHash3's
    /// finaliser): Linux picks a client's ports of one parity, so a hash
    /// whose low bits ignore some port bits sent every flow to one core.
    fn hash(&self) -> u32 {
        let mut h = self.peer ^ (u32::from(self.src) << 16 | u32::from(self.dst));
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    /// The key of a flow to the shared port in `Shared::redirects`.
    fn key(&self) -> u64 {
        flow_key(self.peer, self.src)
    }
}

fn flow_key(peer: u32, port: u16) -> u64 {
    u64::from(peer) << 16 | u64::from(port)
}

impl Shared {
    pub fn new(main_port: u16, core_ports: Vec<u16>, steer_all: bool) -> Shared {
        let cores = core_ports.len();
        Shared {
            arp: (0..cores).map(|_| Mutex::new(Vec::new())).collect(),
            arp_pending: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            steer: (0..cores).map(|_| Mutex::new(Vec::new())).collect(),
            steer_pending: (0..cores).map(|_| AtomicBool::new(false)).collect(),
            main_port,
            core_ports,
            accepting: (0..cores).map(|_| AtomicBool::new(true)).collect(),
            // Every core is on: no shard needs memory (`set_accepting`).
            redirects: (0..cores).map(|_| Mutex::new(HashMap::new())).collect(),
            redirect_count: AtomicUsize::new(0),
            redirected_from: (0..cores).map(|_| AtomicUsize::new(0)).collect(),
            redirected_to: (0..cores).map(|_| AtomicUsize::new(0)).collect(),
            steer_all,
            wakers: std::sync::OnceLock::new(),
            dropped_rx: AtomicU64::new(0),
            dropped_tx: AtomicU64::new(0),
        }
    }

    /// Records the cores' wakers (eventfds that outlive the transports).
    pub fn set_wakers(&self, wakers: Vec<Arc<Waker>>) {
        let _ = self.wakers.set(wakers);
    }

    /// The core that owns a frame that arrived on core `here`'s queue: core
    /// i for TCP to core i's port; for TCP to the shared port, the flow's
    /// natural core (the one its hash names with `steer_all`, else `here`)
    /// unless the flow was redirected, or opens now while that core is off
    /// (then an on core, recorded in the natural core's shard of
    /// `redirects`); with `steer_all`, the core its hash names for other
    /// TCP; `None` for anything else (handled where it arrived).
    fn route(&self, frame: &[u8], here: usize) -> Route {
        let cores = self.core_ports.len();
        if cores < 2 {
            return Route::Stay;
        }
        let Some(seg) = Segment::parse(frame) else { return Route::Stay };
        if let Some(core) = self.core_ports.iter().position(|&p| p == seg.dst) {
            return Route::To(core);
        }
        let natural = if self.steer_all { seg.hash() as usize % cores } else { here };
        if seg.dst != self.main_port {
            return if self.steer_all { Route::To(natural) } else { Route::Stay };
        }
        let off = !self.accepting[natural].load(Ordering::Acquire);
        if !off && self.redirected_from[natural].load(Ordering::Acquire) == 0 {
            // The common case: no flow of this core's was redirected.
            return Route::To(natural);
        }
        // Only this flow's natural core's shard: with RSS, the lock of the
        // core the segment arrived on, which no other core's segments take.
        let mut shard = lock(&self.redirects[natural]);
        let key = seg.key();
        if let Some(r) = shard.get(&key).copied() {
            debug_assert_eq!(r.natural, natural, "an entry is in its natural core's shard");
            if !seg.syn || self.accepting[r.target].load(Ordering::Acquire) {
                return Route::To(r.target);
            }
            // A new connection (or a retransmitted SYN) for a core that went
            // off since: chosen again below.
            self.unrecord(&mut shard, key);
        }
        // Read again under the lock, which the core takes to set its flag
        // (`set_accepting`): off here, its shard has its room, and nothing
        // gives that back before this insert.
        let off = !self.accepting[natural].load(Ordering::Acquire);
        if !seg.syn || !off {
            return Route::To(natural);
        }
        // A connection opening at an off core: to an on core, picked by the
        // flow's hash among them (none on: the off core answers with a reset,
        // having no listener, as a kernel port with no socket would).
        let on = self.accepting.iter().filter(|a| a.load(Ordering::Acquire)).count();
        let pick = (seg.hash() as usize / cores) % on.max(1);
        let Some(target) = (0..cores).filter(|&c| self.accepting[c].load(Ordering::Acquire)).nth(pick) else {
            return Route::To(natural);
        };
        // Room in the table without growing it (documented: `capacity` is
        // what it holds without reallocating). An off core's shard has room
        // for the whole bound unless removed entries' tombstones took some
        // (`fit` rebuilds it, off this path): dropped, not grown here.
        if shard.len() >= shard.capacity() {
            self.dropped_rx.fetch_add(1, Ordering::Relaxed);
            return Route::Drop;
        }
        let since = Instant::now();
        // A place in the node-wide bound, taken before the insert (and
        // under this shard's lock, so the count and the shards agree).
        let reserved = self
            .redirect_count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_REDIRECTS).then_some(n + 1));
        if reserved.is_err() {
            // Dropped, as a full rx ring would drop it: the client retries.
            self.dropped_rx.fetch_add(1, Ordering::Relaxed);
            return Route::Drop;
        }
        let old = shard.insert(key, Redirect { natural, target, since });
        self.redirected_from[natural].fetch_add(1, Ordering::AcqRel);
        self.redirected_to[target].fetch_add(1, Ordering::AcqRel);
        // Checked once the entry is counted in: a panic here leaves the
        // shard and the counters agreeing (`lock`).
        debug_assert!(old.is_none(), "a recorded flow was removed above");
        Route::To(target)
    }

    /// Whether core `core` must not take `frame` though another core
    /// steered it there: a SYN for the shared port while `core` is off.
    fn refuses(&self, frame: &[u8], core: usize) -> bool {
        self.accepting.get(core).is_some_and(|a| !a.load(Ordering::Acquire))
            && Segment::parse(frame).is_some_and(|s| s.syn && s.dst == self.main_port)
    }

    /// Removes a redirected flow's entry (its shard is locked). On the
    /// packet path: frees nothing, even a shard left empty (`fit` does,
    /// later).
    fn unrecord(&self, shard: &mut Flows, key: u64) {
        if let Some(r) = shard.remove(&key) {
            self.forget(&r);
        }
    }

    /// Counts a removed entry out (its shard is locked).
    fn forget(&self, r: &Redirect) {
        self.redirected_from[r.natural].fetch_sub(1, Ordering::AcqRel);
        self.redirected_to[r.target].fetch_sub(1, Ordering::AcqRel);
        self.redirect_count.fetch_sub(1, Ordering::AcqRel);
    }

    /// Drops the entries of flows redirected to core `core` that it no
    /// longer holds (`live(key)` false: closed, or a handshake that failed)
    /// and that are older than `REDIRECT_GRACE`. They may be in any core's
    /// shard: each shard holding entries is locked in turn (never two at
    /// once), and fitted (`fit`): a shard it empties whose core is on is
    /// freed. That may free or allocate, once a `REDIRECT_SWEEP` and not on
    /// the rx path: acceptable there.
    fn sweep_redirects(&self, core: usize, now: Instant, live: impl Fn(u64) -> bool) {
        if self.redirected_to.get(core).is_none_or(|n| n.load(Ordering::Acquire) == 0) {
            return;
        }
        for (natural, shard) in self.redirects.iter().enumerate() {
            if self.redirected_from[natural].load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut shard = lock(shard);
            shard.retain(|&key, r| {
                let keep = r.target != core || now - r.since < REDIRECT_GRACE || live(key);
                if !keep {
                    self.forget(r);
                }
                keep
            });
            let on = self.accepting[natural].load(Ordering::Acquire);
            self.fit(&mut shard, on);
        }
    }

    /// Core `core` takes new flows of the shared port, or stops. Under its
    /// shard's lock, which every insert (`route`) takes and reads the flag
    /// under: turning off, the shard gets its room before the flag says
    /// off, so no insert allocates; turning on, an empty shard is freed
    /// and no insert comes after. Called by the core, off the packet path.
    fn set_accepting(&self, core: usize, on: bool) {
        let mut shard = lock(&self.redirects[core]);
        self.fit(&mut shard, on);
        self.accepting[core].store(on, Ordering::Release);
    }

    /// Fits core `core`'s shard to its flag (`fit`), once a
    /// `REDIRECT_SWEEP` while the shard may hold memory; whether it still
    /// does. Called by the core: frees a shard emptied on the packet path
    /// (`unrecord`), which no sweep visits.
    fn tidy(&self, core: usize) -> bool {
        let mut shard = lock(&self.redirects[core]);
        let on = self.accepting[core].load(Ordering::Acquire);
        self.fit(&mut shard, on);
        shard.capacity() > 0
    }

    /// The memory a shard needs (it is locked, `on` its core's flag): an
    /// on core's takes no inserts, and once empty it is freed; an off
    /// core's has room for the whole bound (the bound is node-wide: no
    /// shard ever holds more), so `route` inserts without growing it. One
    /// with less room, fresh or short of it (removed entries may leave
    /// tombstones that take room until the table is rebuilt), is rebuilt
    /// into a new table: `reserve` might grow it past the bound instead. A
    /// node of one core redirects nothing (`route`) and needs no table.
    fn fit(&self, shard: &mut Flows, on: bool) {
        if on {
            if shard.is_empty() && shard.capacity() > 0 {
                *shard = HashMap::new();
            }
        } else if self.core_ports.len() > 1 && shard.capacity() < MAX_REDIRECTS {
            let mut room = HashMap::with_capacity(MAX_REDIRECTS);
            room.extend(shard.drain());
            *shard = room;
        }
    }
}

/// What one core's transport is built from.
pub struct CoreNet {
    pub eal: &'static ffi::Eal,
    pub queue: QueuePair,
    pub core: usize,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// TCP ports to accept on (the main port and every core port: RSS, not
    /// the port, decides which core a connection lands on; requests reach
    /// their owner by forwarding).
    pub ports: Vec<u16>,
    pub shared: Arc<Shared>,
}

/// A received frame for the stack.
enum Frame {
    Mbuf(Mbuf),
    /// An ARP frame copied from another core.
    Copy(Vec<u8>),
}

struct RxTok(Frame);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match &self.0 {
            Frame::Mbuf(m) => f(m.data()),
            Frame::Copy(v) => f(v),
        }
    }
}

struct TxTok<'a> {
    pool: &'static Mempool,
    tx: &'a mut Vec<Mbuf>,
    scratch: &'a mut Vec<u8>,
    dropped: &'a AtomicU64,
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if let Some(mut m) = self.pool.alloc() {
            if let Some(buf) = m.append(len) {
                let r = f(buf);
                self.tx.push(m);
                return r;
            }
        }
        // No mbuf (or a frame larger than one): the stack's retransmission
        // covers the loss, as it would a drop on the wire.
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.scratch.clear();
        self.scratch.resize(len, 0);
        f(self.scratch)
    }
}

/// Whether `frame` is an IPv4 TCP segment opening a connection (SYN, no ACK).
fn is_syn(frame: &[u8]) -> bool {
    Segment::parse(frame).is_some_and(|s| s.syn)
}

/// The queue pair as smoltcp's device.
struct Nic {
    q: QueuePair,
    core: usize,
    rx: VecDeque<Mbuf>,
    burst: Vec<Mbuf>,
    tx: Vec<Mbuf>,
    scratch: Vec<u8>,
    shared: Arc<Shared>,
    arp_in: Vec<Vec<u8>>,
    steered_in: Vec<Mbuf>,
    /// Frames the stack may still take this pass.
    budget: usize,
    /// Connection requests (SYNs) the stack may take in this run: no more
    /// than there are listening sockets, which are only added between runs.
    syn_room: usize,
    /// A SYN was held back for want of a listener.
    syn_held: bool,
}

impl Nic {
    fn next_frame(&mut self) -> Option<Frame> {
        if let Some(v) = self.arp_in.pop() {
            return Some(Frame::Copy(v));
        }
        while let Some(m) = self.steered_in.pop() {
            if self.shared.refuses(m.data(), self.core) {
                // Steered here by a core that saw this one still on: the
                // client's retransmission is routed to an on core.
                self.shared.dropped_rx.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self.admit(&m) {
                self.steered_in.push(m);
                return None;
            }
            return Some(Frame::Mbuf(m));
        }
        loop {
            if self.budget == 0 {
                return None;
            }
            if self.rx.is_empty() {
                self.q.rx_burst(&mut self.burst, self.budget.min(64));
                self.rx.extend(self.burst.drain(..));
            }
            let m = self.rx.pop_front()?;
            self.budget -= 1;
            let len = m.data().len();
            // The port is set up without scatter, so a frame spans one
            // segment; anything else is malformed and dropped here.
            if m.segments() != 1 || !(14..=MAX_FRAME + 4).contains(&len) {
                self.shared.dropped_rx.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if m.data()[12..14] == ETHERTYPE_ARP && self.shared.arp.len() > 1 {
                self.fan_out_arp(m.data());
            }
            match self.shared.route(m.data(), self.core) {
                Route::To(owner) if owner != self.core => {
                    self.steer(owner, m);
                    continue;
                }
                Route::Drop => continue,
                Route::To(_) | Route::Stay => {}
            }
            if !self.admit(&m) {
                self.rx.push_front(m);
                self.budget += 1;
                return None;
            }
            return Some(Frame::Mbuf(m));
        }
    }

    /// Whether the stack may take `m` now: a SYN needs a listening socket
    /// (past them, it would be answered with a reset).
    fn admit(&mut self, m: &Mbuf) -> bool {
        if !is_syn(m.data()) {
            return true;
        }
        if self.syn_room == 0 {
            self.syn_held = true;
            return false;
        }
        self.syn_room -= 1;
        true
    }

    fn fan_out_arp(&self, frame: &[u8]) {
        for (i, q) in self.shared.arp.iter().enumerate() {
            if i == self.core {
                continue;
            }
            if let Ok(mut q) = q.lock() {
                if q.len() < ARP_QUEUE {
                    q.push(frame.to_vec());
                    self.shared.arp_pending[i].store(true, Ordering::Release);
                }
            }
        }
    }

    fn steer(&self, owner: usize, m: Mbuf) {
        let Ok(mut q) = self.shared.steer[owner].lock() else { return };
        if q.len() >= STEER_QUEUE {
            // Dropped like a full rx ring would drop it; TCP retransmits.
            self.shared.dropped_rx.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push(m);
        drop(q);
        if !self.shared.steer_pending[owner].swap(true, Ordering::AcqRel) {
            if let Some(w) = self.shared.wakers.get().and_then(|w| w.get(owner)) {
                w.wake();
            }
        }
    }

    /// Takes frames other cores received for this one.
    fn take_steered(&mut self) {
        if self.shared.steer_pending[self.core].swap(false, Ordering::AcqRel) {
            if let Ok(mut q) = self.shared.steer[self.core].lock() {
                // Oldest last: `next_frame` pops from the end.
                self.steered_in.extend(q.drain(..).rev());
            }
        }
    }

    /// Takes ARP frames other cores received for this one.
    fn take_arp(&mut self) {
        if self.shared.arp_pending[self.core].swap(false, Ordering::Acquire) {
            if let Ok(mut q) = self.shared.arp[self.core].lock() {
                self.arp_in.append(&mut q);
            }
        }
    }

    /// Hands built frames to the NIC; returns true if some are left.
    fn push_tx(&mut self) -> bool {
        if !self.tx.is_empty() {
            self.q.tx_burst(&mut self.tx);
        }
        !self.tx.is_empty()
    }
}

impl Device for Nic {
    type RxToken<'a>
        = RxTok
    where
        Self: 'a;
    type TxToken<'a>
        = TxTok<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: smoltcp::time::Instant) -> Option<(RxTok, TxTok<'_>)> {
        if self.tx.len() >= TX_QUEUE && self.push_tx() && self.tx.len() >= TX_QUEUE {
            // Answers would have nowhere to go; leave frames in the ring.
            return None;
        }
        let frame = self.next_frame()?;
        let tx = TxTok {
            pool: self.q.pool(),
            tx: &mut self.tx,
            scratch: &mut self.scratch,
            dropped: &self.shared.dropped_tx,
        };
        Some((RxTok(frame), tx))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        if self.tx.len() >= TX_QUEUE && self.push_tx() && self.tx.len() >= TX_QUEUE {
            return None;
        }
        Some(TxTok {
            pool: self.q.pool(),
            tx: &mut self.tx,
            scratch: &mut self.scratch,
            dropped: &self.shared.dropped_tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MAX_FRAME;
        c.max_burst_size = Some(64);
        c
    }
}

struct Conn {
    handle: SocketHandle,
    out: Vec<u8>,
    sent: usize,
    reading: bool,
    /// The peer's FIN was seen (and reported, unless closing).
    eof: bool,
    /// Close requested: input is discarded, output finishes, then FIN.
    closing: bool,
    /// Our FIN is queued; waiting for the peer's.
    shut: bool,
    dead: bool,
    deadline: Option<Instant>,
    close_slot: usize,
}

pub struct DpdkTransport {
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Slab<Conn>,
    /// Sockets not yet handed out as connections: listening, or in the
    /// middle of a handshake.
    listeners: Vec<(u16, SocketHandle)>,
    ports: Vec<u16>,
    /// The node's shared port (one of `ports`).
    main_port: u16,
    /// Whether the core takes new connections on the shared port
    /// (`Transport::set_accepting`): off, it keeps no listener there.
    accepting: bool,
    /// When to next drop the entries of redirected flows this core no
    /// longer holds (`Shared::sweep_redirects`), and fit its own shard.
    next_sweep: Instant,
    /// This core's shard of the redirect table may hold memory (it was
    /// turned off): fitted once a `REDIRECT_SWEEP` until it holds none
    /// (`Shared::tidy`).
    shard_held: bool,
    /// The shared-port flows this core holds, gathered for that sweep.
    live: HashSet<u64>,
    max_conns: usize,
    /// Connections with output queued since the last flush.
    dirty: Vec<ConnId>,
    /// Sockets may have news (data, state): visit every connection.
    scan: bool,
    reap: Vec<ConnId>,
    closes: CloseList,
    expired: Vec<ConnId>,
    timeouts: CloseTimeouts,
    waker: Arc<Waker>,
    epoch: Instant,
    nap: Duration,
}

fn stack_now(epoch: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(epoch.elapsed().as_micros() as i64)
}

impl DpdkTransport {
    pub fn new(net: CoreNet, waker: Arc<Waker>, max_conns: usize) -> io::Result<DpdkTransport> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if net.mac[0] & 1 != 0 || net.mac == [0; 6] {
            return Err(invalid(format!("port MAC {:02x?} is not a unicast address", net.mac)));
        }
        if net.prefix == 0 || net.prefix > 32 {
            return Err(invalid(format!("prefix length /{} is not 1..=32", net.prefix)));
        }
        let main_port = net.shared.main_port;
        let mut nic = Nic {
            q: net.queue,
            core: net.core,
            rx: VecDeque::with_capacity(64),
            burst: Vec::with_capacity(64),
            tx: Vec::with_capacity(TX_QUEUE),
            scratch: Vec::with_capacity(MAX_FRAME),
            shared: net.shared,
            arp_in: Vec::new(),
            steered_in: Vec::new(),
            budget: 0,
            syn_room: 0,
            syn_held: false,
        };
        let epoch = Instant::now();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(net.mac)));
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((net.core as u64) << 56);
        let mut iface = Interface::new(config, &mut nic, stack_now(epoch));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(net.ip.into(), net.prefix));
        });
        if let Some(gw) = net.gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gw)
                .map_err(|_| invalid(format!("cannot add a default route via {gw}")))?;
        }
        let mut ports = net.ports;
        ports.sort_unstable();
        ports.dedup();
        let mut t = DpdkTransport {
            nic,
            iface,
            sockets: SocketSet::new(Vec::new()),
            conns: Slab::with_capacity(max_conns.min(1024)),
            listeners: Vec::new(),
            ports,
            main_port,
            accepting: true,
            next_sweep: epoch + REDIRECT_SWEEP,
            shard_held: false,
            live: HashSet::new(),
            max_conns,
            dirty: Vec::new(),
            scan: false,
            reap: Vec::new(),
            closes: CloseList::new(),
            expired: Vec::new(),
            timeouts: CloseTimeouts::DEFAULT,
            waker,
            epoch,
            nap: IDLE_NAP_MIN,
        };
        t.refill_listeners();
        Ok(t)
    }

    /// Keeps `BACKLOG` listening sockets per port while connections are
    /// below the limit.
    fn refill_listeners(&mut self) {
        let embryonic = self
            .listeners
            .iter()
            .filter(|(_, h)| self.sockets.get::<tcp::Socket>(*h).state() != tcp::State::Listen)
            .count();
        if embryonic >= MAX_EMBRYONIC {
            return;
        }
        for i in 0..self.ports.len() {
            let port = self.ports[i];
            if !self.takes(port) {
                continue;
            }
            let listening = self
                .listeners
                .iter()
                .filter(|(p, h)| {
                    *p == port && self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen
                })
                .count();
            for _ in listening..BACKLOG {
                if self.conns.len() + self.listeners.len() >= self.max_conns + BACKLOG * self.ports.len() {
                    return;
                }
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
                );
                // Replies go out as soon as they are built.
                s.set_nagle_enabled(false);
                s.set_ack_delay(None);
                s.set_timeout(Some(smoltcp::time::Duration::from_millis(STALL_TIMEOUT.as_millis() as u64)));
                if s.listen(port).is_err() {
                    tracing::warn!(port, "cannot listen");
                    return;
                }
                let h = self.sockets.add(s);
                self.listeners.push((port, h));
            }
        }
    }

    /// Runs the stack: frames in, timers, segments out. Marks a scan when
    /// anything may have changed.
    fn run_stack(&mut self) {
        self.nic.take_arp();
        self.nic.take_steered();
        // Listening sockets are added between runs of the stack: a burst of
        // SYNs is taken in as many runs as it needs listeners.
        for _ in 0..8 {
            let mut room = self.listening_min();
            if room < BACKLOG {
                // Handshakes took listeners since the last refill.
                self.refill_listeners();
                room = self.listening_min();
            }
            // Zero: at the connection or handshake limit, SYNs are reset.
            self.nic.syn_room = if room == 0 { usize::MAX } else { room };
            self.nic.syn_held = false;
            let now = stack_now(self.epoch);
            if self.iface.poll(now, &mut self.nic, &mut self.sockets) == PollResult::SocketStateChanged {
                self.scan = true;
            }
            if !self.nic.syn_held {
                break;
            }
        }
    }

    /// Whether the core keeps listeners on `port`: all but the shared port
    /// while it is off.
    fn takes(&self, port: u16) -> bool {
        self.accepting || port != self.main_port
    }

    /// The fewest listening sockets of any port the core takes.
    fn listening_min(&self) -> usize {
        self.ports
            .iter()
            .filter(|&&port| self.takes(port))
            .map(|&port| {
                self.listeners
                    .iter()
                    .filter(|(p, h)| {
                        *p == port && self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen
                    })
                    .count()
            })
            .min()
            .unwrap_or(0)
    }

    /// One pass: receive, run the stack, deliver events, send. Returns the
    /// events delivered, plus one if work is left over. Frames the stack
    /// handled by itself (ARP, a reset to a stray segment, a drop) are not
    /// events: stray traffic must not keep an idle core awake.
    fn pass(&mut self, sink: &mut dyn EventSink) -> usize {
        self.nic.budget = RX_BUDGET;
        self.run_stack();
        let mut n = 0;
        if self.nic.budget == 0 {
            // Frames are left in the ring: come back without sleeping.
            n += 1;
        }
        if self.scan {
            self.scan = false;
            n += self.accept(sink);
            n += self.visit(sink);
        }
        if self.nic.push_tx() {
            n += 1;
        }
        n
    }

    /// Hands out sockets whose handshake completed; drops failed ones.
    fn accept(&mut self, sink: &mut dyn EventSink) -> usize {
        let mut n = 0;
        let mut changed = false;
        let mut i = 0;
        while i < self.listeners.len() {
            let (_, h) = self.listeners[i];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::Listen | tcp::State::SynReceived => i += 1,
                tcp::State::Established | tcp::State::CloseWait if self.conns.len() < self.max_conns => {
                    self.listeners.swap_remove(i);
                    let id = self.conns.insert(Conn {
                        handle: h,
                        out: Vec::new(),
                        sent: 0,
                        reading: true,
                        eof: false,
                        closing: false,
                        shut: false,
                        dead: false,
                        deadline: None,
                        close_slot: 0,
                    });
                    sink.accepted(id);
                    n += 1;
                    changed = true;
                }
                state => {
                    if matches!(state, tcp::State::Established | tcp::State::CloseWait) {
                        tracing::warn!(max = self.max_conns, "connection limit reached; refusing");
                        s.abort();
                        i += 1;
                        continue;
                    }
                    // Reset or timed out during the handshake, or aborted.
                    self.listeners.swap_remove(i);
                    self.sockets.remove(h);
                    changed = true;
                }
            }
        }
        if changed {
            self.refill_listeners();
        }
        n
    }

    /// Delivers input, end of input and closes of every connection, and
    /// moves queued output into the stack.
    fn visit(&mut self, sink: &mut dyn EventSink) -> usize {
        let mut n = 0;
        for (id, c) in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !c.dead && (c.reading || c.closing) {
                let mut budget = READ_BUDGET;
                while budget > 0 && s.can_recv() {
                    let closing = c.closing;
                    let got = s.recv(|buf| {
                        if !closing {
                            sink.received(id, buf);
                        }
                        (buf.len(), buf.len())
                    });
                    match got {
                        Ok(k) if k > 0 => {
                            budget = budget.saturating_sub(k);
                            n += 1;
                        }
                        _ => break,
                    }
                }
                if budget == 0 {
                    self.scan = true;
                } else if !c.eof && !s.may_recv() && s.recv_queue() == 0 && s.state() != tcp::State::Closed {
                    c.eof = true;
                    if !c.closing {
                        sink.peer_closed(id);
                        n += 1;
                    }
                }
            }
            if c.sent < c.out.len() && !c.dead {
                match s.send_slice(&c.out[c.sent..]) {
                    Ok(k) => {
                        c.sent += k;
                        // Progress: acknowledgements made room.
                        n += usize::from(k > 0);
                    }
                    Err(_) => c.dead = true,
                }
                if c.sent == c.out.len() {
                    c.out.clear();
                    c.sent = 0;
                    if !c.closing {
                        sink.drained(id);
                        n += 1;
                    }
                }
            }
            if c.closing && !c.shut && c.sent == c.out.len() && !c.dead {
                s.close();
                c.shut = true;
                let d = Instant::now() + self.timeouts.linger;
                c.deadline = Some(d);
                self.closes.note(d);
            }
            match s.state() {
                // Reset by the peer, or our close completed.
                tcp::State::Closed => c.dead = true,
                // Both FINs are acknowledged; the stack's TIME-WAIT guards
                // nothing a client needs.
                tcp::State::TimeWait => c.dead = true,
                _ => {}
            }
            if c.dead {
                self.reap.push(id);
            }
        }
        for id in std::mem::take(&mut self.reap) {
            self.drop_conn(id, sink);
            n += 1;
        }
        n
    }

    fn drop_conn(&mut self, id: ConnId, sink: &mut dyn EventSink) {
        let Some(c) = self.conns.try_remove(id) else { return };
        if c.closing {
            if let Some(moved) = self.closes.remove(c.close_slot) {
                self.conns[moved].close_slot = c.close_slot;
            }
        }
        let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
        if s.state() != tcp::State::Closed && s.state() != tcp::State::TimeWait {
            s.abort();
        }
        self.sockets.remove(c.handle);
        sink.closed(id);
        self.refill_listeners();
    }

    /// Aborts closes past their deadline; returns `timeout` shortened to the
    /// next deadline.
    fn expire_closes(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let conns = &self.conns;
        let deadline = |id| {
            let c: &Conn = conns.get(id)?;
            c.deadline.filter(|_| !c.dead)
        };
        let timeout = self.closes.expire(timeout, deadline, &mut self.expired);
        for id in self.expired.drain(..) {
            let Some(c) = self.conns.get_mut(id) else { continue };
            tracing::debug!(conn = id, shut = c.shut, unsent = c.out.len() - c.sent, "close timed out");
            // The reset goes out with the next run of the stack, before the
            // connection is dropped.
            self.sockets.get_mut::<tcp::Socket>(c.handle).abort();
            c.dead = true;
            self.scan = true;
        }
        timeout
    }

    /// Sleeps up to `d` on the waker; true if woken by it.
    fn nap(&self, d: Duration) -> io::Result<bool> {
        use nix::poll::{ppoll, PollFd, PollFlags};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.waker.as_fd(), PollFlags::POLLIN)];
        match ppoll(&mut fds, Some(nix::sys::time::TimeSpec::from_duration(d)), None) {
            Ok(n) if n > 0 && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) => {
                self.waker.drain();
                Ok(true)
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Drops, once a `REDIRECT_SWEEP`, the entries of flows redirected to
    /// this core that it no longer holds a socket for, and fits this core's
    /// own shard while it may hold memory (`Shared::tidy`).
    fn sweep_redirects(&mut self) {
        let shared = &self.nic.shared;
        let core = self.nic.core;
        let serving = shared.redirected_to[core].load(Ordering::Relaxed) != 0;
        if !serving && !self.shard_held {
            return;
        }
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + REDIRECT_SWEEP;
        if self.shard_held {
            self.shard_held = shared.tidy(core);
        }
        if !serving {
            return;
        }
        self.live.clear();
        let handles = self.conns.iter().map(|(_, c)| c.handle).chain(self.listeners.iter().map(|&(_, h)| h));
        for h in handles {
            let s = self.sockets.get::<tcp::Socket>(h);
            if let (Some(local), Some(remote)) = (s.local_endpoint(), s.remote_endpoint()) {
                let IpAddress::Ipv4(peer) = remote.addr;
                if local.port == self.main_port {
                    self.live.insert(flow_key(peer.to_bits(), remote.port));
                }
            }
        }
        let live = &self.live;
        shared.sweep_redirects(core, now, |key| live.contains(&key));
    }

    /// Mbufs of this core's pool that are out of it.
    pub fn mbufs_in_use(&self) -> u32 {
        self.nic.q.pool().in_use()
    }
}

impl Transport for DpdkTransport {
    fn backend(&self) -> NetBackend {
        NetBackend::Dpdk
    }

    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<usize> {
        self.sweep_redirects();
        let timeout = self.expire_closes(timeout);
        let n = self.pass(sink);
        if n > 0 || timeout == Some(Duration::ZERO) {
            if n > 0 {
                self.nap = IDLE_NAP_MIN;
            }
            return Ok(n);
        }
        let until = timeout.map(|t| Instant::now() + t);
        loop {
            let mut wait = self.nap;
            if let Some(d) = self.iface.poll_delay(stack_now(self.epoch), &self.sockets) {
                wait = wait.min(Duration::from_micros(d.total_micros()));
            }
            if let Some(u) = until {
                wait = wait.min(u.saturating_duration_since(Instant::now()));
            }
            let woken = self.nap(wait)?;
            self.nap = (self.nap * 2).min(IDLE_NAP_MAX);
            let n = self.pass(sink) + woken as usize;
            if n > 0 {
                self.nap = IDLE_NAP_MIN;
                return Ok(n);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(0);
            }
        }
    }

    fn send(&mut self, conn: ConnId, buf: &mut Vec<u8>) {
        let Some(c) = self.conns.get_mut(conn) else {
            buf.clear();
            return;
        };
        if c.dead || c.shut {
            buf.clear();
            return;
        }
        if c.out.is_empty() {
            std::mem::swap(&mut c.out, buf);
            c.sent = 0;
        } else {
            c.out.extend_from_slice(buf);
            buf.clear();
        }
        self.dirty.push(conn);
    }

    fn unsent(&self, conn: ConnId) -> usize {
        self.conns.get(conn).map_or(0, |c| c.out.len() - c.sent)
    }

    fn set_reading(&mut self, conn: ConnId, on: bool) {
        if let Some(c) = self.conns.get_mut(conn) {
            if on && !c.reading {
                self.scan = true;
            }
            c.reading = on;
        }
    }

    fn close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.closing || c.dead {
            return;
        }
        c.closing = true;
        let d = Instant::now() + self.timeouts.drain;
        c.deadline = Some(d);
        c.close_slot = self.closes.insert(conn, d);
        self.scan = true;
    }

    /// Off, the core leaves the shared port: other cores stop sending it
    /// new flows (`Shared::route` sends their SYNs to a core that is on),
    /// its listeners there go, and handshakes under way there are reset (as
    /// a kernel listener leaving its group resets the ones it holds); those
    /// already complete are accepted and served, as are all its connections
    /// and its own port. On, it listens there again before other cores send
    /// it new flows. Off, its shard of the redirect table is given room for
    /// the whole bound first; on, it is freed once empty (`Shared::fit`).
    fn set_accepting(&mut self, on: bool, sink: &mut dyn EventSink) -> io::Result<usize> {
        if on == self.accepting {
            return Ok(0);
        }
        self.accepting = on;
        if on {
            self.refill_listeners();
            self.nic.shared.set_accepting(self.nic.core, true);
            return Ok(0);
        }
        // Room in this core's shard for every flow redirected away from
        // it, allocated here, before other cores see it off.
        self.nic.shared.set_accepting(self.nic.core, false);
        self.shard_held = true;
        let n = self.accept(sink);
        let mut i = 0;
        while i < self.listeners.len() {
            let (port, h) = self.listeners[i];
            if port != self.main_port {
                i += 1;
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Listen {
                self.listeners.swap_remove(i);
                self.sockets.remove(h);
            } else {
                // The reset goes out with the next run of the stack; `accept`
                // then drops the socket.
                s.abort();
                i += 1;
            }
        }
        self.scan = true;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut moved = false;
        for id in self.dirty.drain(..) {
            let Some(c) = self.conns.get_mut(id) else { continue };
            if c.dead || c.sent == c.out.len() {
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            match s.send_slice(&c.out[c.sent..]) {
                Ok(k) => {
                    c.sent += k;
                    moved |= k > 0;
                }
                Err(_) => {
                    c.dead = true;
                    self.scan = true;
                }
            }
            if c.sent == c.out.len() {
                c.out.clear();
                c.sent = 0;
            } else {
                // The rest goes in as acknowledgements free room.
                self.scan = true;
            }
        }
        if moved {
            let now = stack_now(self.epoch);
            self.iface.poll_egress(now, &mut self.nic, &mut self.sockets);
        }
        self.nic.push_tx();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ethernet + IPv4 (IHL 5) + a 20-byte TCP header from `src` to `dst`.
    fn tcp_frame(peer: [u8; 4], src: u16, dst: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0xff; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&peer);
        ip.extend_from_slice(&[10, 0, 0, 2]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&src.to_be_bytes());
        f.extend_from_slice(&dst.to_be_bytes());
        f.extend_from_slice(&[0; 9]);
        f.push(flags);
        f.extend_from_slice(&[0; 6]);
        f
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const PEER: [u8; 4] = [10, 0, 0, 1];

    #[test]
    fn core_ports_and_flows_pick_their_core() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        assert_eq!(s.route(&tcp_frame(PEER, 50000, 7402, ACK), 0), Route::To(1));
        assert_eq!(s.route(&tcp_frame(PEER, 50000, 7401, ACK), 1), Route::To(0));
        assert_eq!(s.route(&tcp_frame(PEER, 50000, 7400, ACK), 1), Route::To(1), "the main port stays put");
        assert_eq!(s.route(&tcp_frame(PEER, 50000, 9000, ACK), 1), Route::Stay, "other ports stay put");
        let all = Shared::new(7400, vec![7401, 7402], true);
        let f = tcp_frame(PEER, 50000, 7400, ACK);
        let Route::To(core) = all.route(&f, 0) else { panic!("every flow has a core") };
        assert!(core < 2);
        assert_eq!(all.route(&f, 1), Route::To(core), "a flow always goes to the same core");
        let cores: HashSet<_> =
            (0..64u16).map(|p| all.route(&tcp_frame(PEER, 40000 + p, 7400, ACK), 0)).collect();
        assert_eq!(cores, HashSet::from([Route::To(0), Route::To(1)]), "flows spread over both cores");
        // Linux gives a client's connections ports of one parity.
        for n in [2usize, 3, 4] {
            let s = Shared::new(7400, (1..=n as u16).map(|i| 7400 + i).collect(), true);
            let mut per_core = vec![0; n];
            for p in 0..256u16 {
                if let Route::To(c) = s.route(&tcp_frame(PEER, 40000 + 2 * p, 7400, SYN), 0) {
                    per_core[c] += 1;
                }
            }
            assert!(
                per_core.iter().all(|&k| k > 256 / n / 2),
                "even ports spread over {n} cores: {per_core:?}"
            );
        }
        // A later fragment carries no ports: handled where it arrived.
        let mut frag = tcp_frame(PEER, 50000, 7402, ACK);
        frag[20] = 0x00;
        frag[21] = 0x10;
        assert_eq!(s.route(&frag, 0), Route::Stay);
        assert_eq!(
            Shared::new(7400, vec![7401], true).route(&f, 0),
            Route::Stay,
            "one core: nothing to steer"
        );
    }

    /// Client ports whose flows to the main port hash to `core` of two.
    fn ports_of(s: &Shared, core: usize, n: usize) -> Vec<u16> {
        (40000..).filter(|&p| s.route(&tcp_frame(PEER, p, 7400, ACK), 0) == Route::To(core)).take(n).collect()
    }

    #[test]
    fn flows_of_an_off_core_open_on_an_on_core_and_stay_there() {
        let s = Shared::new(7400, vec![7401, 7402], true);
        let mine = ports_of(&s, 1, 8);
        let others = ports_of(&s, 0, 8);
        let established = mine[0];
        s.set_accepting(1, false);
        for &p in &mine[1..] {
            // Whichever queue the SYN and the rest of the flow arrive on.
            assert_eq!(
                s.route(&tcp_frame(PEER, p, 7400, SYN), 1),
                Route::To(0),
                "a SYN for off core 1 goes to 0"
            );
            assert_eq!(
                s.route(&tcp_frame(PEER, p, 7400, SYN), 0),
                Route::To(0),
                "so does its retransmission"
            );
            assert_eq!(s.route(&tcp_frame(PEER, p, 7400, ACK), 1), Route::To(0), "and the rest of the flow");
            assert_eq!(s.route(&tcp_frame(PEER, p, 7400, ACK | 0x08), 0), Route::To(0));
        }
        // Established on core 1 before it went off: still core 1's.
        assert_eq!(s.route(&tcp_frame(PEER, established, 7400, ACK), 0), Route::To(1));
        assert_eq!(
            s.route(&tcp_frame(PEER, 50000, 7402, SYN), 0),
            Route::To(1),
            "its own port still opens there"
        );
        for &p in &others {
            assert_eq!(s.route(&tcp_frame(PEER, p, 7400, SYN), 1), Route::To(0));
        }
        assert_eq!(s.redirected_from[1].load(Ordering::Relaxed), mine.len() - 1);
        assert_eq!(s.redirected_to[0].load(Ordering::Relaxed), mine.len() - 1);
        assert_eq!(s.redirected_from[0].load(Ordering::Relaxed), 0, "core 0's own flows are not redirected");

        // On again: redirected flows stay on core 0, new ones open on 1.
        s.set_accepting(1, true);
        for &p in &mine[1..] {
            assert_eq!(s.route(&tcp_frame(PEER, p, 7400, ACK), 1), Route::To(0));
        }
        let new = (1000..)
            .map(|p| tcp_frame([10, 0, 0, 9], p, 7400, SYN))
            .find(|f| Segment::parse(f).is_some_and(|seg| seg.hash() % 2 == 1));
        assert_eq!(s.route(&new.expect("a flow of core 1"), 0), Route::To(1), "core 1 takes new flows again");

        // Core 0 off in turn: a retransmitted SYN of a flow redirected to it
        // goes back to core 1 (its natural core, now on).
        s.set_accepting(0, false);
        assert_eq!(s.route(&tcp_frame(PEER, mine[1], 7400, SYN), 0), Route::To(1));
        assert_eq!(s.route(&tcp_frame(PEER, mine[1], 7400, ACK), 0), Route::To(1));
        assert_eq!(s.redirected_from[1].load(Ordering::Relaxed), mine.len() - 2);
    }

    #[test]
    fn without_steering_the_rx_queue_is_the_natural_core() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        s.set_accepting(0, false);
        assert_eq!(s.route(&tcp_frame(PEER, 50000, 7400, SYN), 0), Route::To(1));
        assert_eq!(
            s.route(&tcp_frame(PEER, 50000, 7400, ACK), 0),
            Route::To(1),
            "RSS keeps the flow on queue 0"
        );
        assert_eq!(s.route(&tcp_frame(PEER, 50001, 7400, ACK), 0), Route::To(0), "an older flow of core 0");
        assert_eq!(s.route(&tcp_frame(PEER, 50002, 7400, SYN), 1), Route::To(1));
        // Every core off (the controller keeps one on): nobody to send it to.
        s.set_accepting(1, false);
        assert_eq!(s.route(&tcp_frame(PEER, 50003, 7400, SYN), 0), Route::To(0));
        assert!(
            s.refuses(&tcp_frame(PEER, 50003, 7400, SYN), 0),
            "an off core takes no SYN for the main port"
        );
        assert!(!s.refuses(&tcp_frame(PEER, 50003, 7400, ACK), 0));
        assert!(!s.refuses(&tcp_frame(PEER, 50003, 7401, SYN), 0), "its own port, it does");
        s.set_accepting(0, true);
        assert!(!s.refuses(&tcp_frame(PEER, 50003, 7400, SYN), 0));
    }

    #[test]
    fn redirects_are_swept_once_their_core_holds_them_no_more_and_are_bounded() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        s.set_accepting(1, false);
        for p in 0..3 {
            assert_eq!(s.route(&tcp_frame(PEER, 1000 + p, 7400, SYN), 1), Route::To(0));
        }
        let live = flow_key(u32::from_be_bytes(PEER), 1000);
        s.sweep_redirects(0, Instant::now(), |_| false);
        assert_eq!(
            s.redirected_to[0].load(Ordering::Relaxed),
            3,
            "young entries stay (their SYN may be queued)"
        );
        s.sweep_redirects(1, Instant::now() + REDIRECT_GRACE, |_| false);
        assert_eq!(s.redirected_to[0].load(Ordering::Relaxed), 3, "core 1 holds none of them");
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |k| k == live);
        assert_eq!(s.redirected_to[0].load(Ordering::Relaxed), 1, "the closed ones go");
        assert_eq!(s.redirected_from[1].load(Ordering::Relaxed), 1);
        assert_eq!(s.route(&tcp_frame(PEER, 1000, 7400, ACK), 1), Route::To(0), "the live one stays");

        let mut dropped = 0;
        for p in 0..(MAX_REDIRECTS as u32 + 10) {
            let peer = (0x0b00_0000 + p).to_be_bytes();
            match s.route(&tcp_frame(peer, 7, 7400, SYN), 1) {
                Route::Drop => dropped += 1,
                r => assert_eq!(r, Route::To(0)),
            }
        }
        assert_eq!(dropped, 11, "past the bound, SYNs for the off core are dropped, not taken there");
        assert_eq!(s.dropped_rx.load(Ordering::Relaxed), 11, "and counted");
        assert_eq!(shard_lens(&s), [0, MAX_REDIRECTS], "one off core may fill the whole bound");
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), MAX_REDIRECTS);
        assert_eq!(s.redirected_from[1].load(Ordering::Relaxed), MAX_REDIRECTS);

        // Swept, the bound has room again; the off core's shard keeps its
        // room for the whole bound.
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |k| k == live);
        assert_eq!(shard_lens(&s), [0, 1]);
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 1);
        assert_eq!(s.redirected_to[0].load(Ordering::Relaxed), 1);
        assert!(capacity(&s, 1) >= MAX_REDIRECTS);
        assert_eq!(s.route(&tcp_frame([11, 9, 9, 9], 7, 7400, SYN), 1), Route::To(0));
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_off_cores_shard_is_allocated_when_it_turns_off_and_the_packet_path_allocates_nothing() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        assert_eq!(capacities(&s), [0, 0], "all cores on: no table memory");
        let ((), reserved) = counted(|| s.set_accepting(1, false));
        let room = capacity(&s, 1);
        assert!(room >= MAX_REDIRECTS, "room for the whole bound: {room}");
        assert_eq!((reserved.allocs, reserved.frees), (1, 0), "one table, allocated as the core turns off");
        // Its size (docs/dpdk.md): a power of two of buckets past 8/7 of the
        // bound, each a key and a `Redirect` and a control byte.
        let bucket = std::mem::size_of::<(u64, Redirect)>() + 1;
        assert!(
            reserved.bytes > (MAX_REDIRECTS * bucket) as u64
                && reserved.bytes <= (2 * MAX_REDIRECTS * bucket + 64) as u64,
            "{} bytes",
            reserved.bytes
        );

        // A whole bound of SYNs from core 1's queue, and more: frames built
        // first, so only `route` is counted.
        let frames = |flags: u8| -> Vec<Vec<u8>> {
            (0..MAX_REDIRECTS as u32 + 10)
                .map(|p| tcp_frame((0x0b00_0000 + p).to_be_bytes(), 7, 7400, flags))
                .collect()
        };
        let (syns, acks) = (frames(SYN), frames(ACK));
        let ((dropped, served), allocs) = counted(|| {
            let dropped = syns.iter().filter(|f| s.route(f, 1) == Route::Drop).count();
            // The rest of each flow recorded, on core 1's queue (RSS).
            let served = acks[..MAX_REDIRECTS].iter().all(|f| s.route(f, 1) == Route::To(0));
            (dropped, served)
        });
        assert_eq!(dropped, 10, "the bound taken, the rest dropped");
        assert!(served, "every recorded flow is served by core 0");
        assert_eq!(allocs, Allocs::default(), "no allocation or free on the packet path");
        assert_eq!(shard_lens(&s), [0, MAX_REDIRECTS]);
        assert_eq!(capacity(&s, 1), room, "the shard did not grow");

        // Core 0 off and core 1 on again, with its flows still redirected:
        // its shard is kept. Each retransmitted SYN then goes back to core
        // 1, its entry removed there, and the emptied shard is not freed on
        // the packet path either.
        s.set_accepting(0, false);
        s.set_accepting(1, true);
        assert_eq!(capacity(&s, 1), room);
        let (back, removed) = counted(|| syns.iter().filter(|f| s.route(f, 1) == Route::To(1)).count());
        assert_eq!(back, syns.len());
        assert_eq!(removed, Allocs::default(), "no allocation or free on the packet path");
        assert_eq!(shard_lens(&s), [0, 0]);
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 0);
        assert_eq!(s.redirected_from[1].load(Ordering::Relaxed), 0);
        assert_eq!(s.redirected_to[0].load(Ordering::Relaxed), 0);
        // (Removed entries may leave tombstones, which lower `capacity`
        // until the table is rebuilt: why `route` checks its room.)
        assert!(capacity(&s, 1) > 0, "not freed on the packet path");
        // Its core's once-a-second tidying frees it (no sweep visits an
        // empty shard); core 0's, off, keeps its room.
        assert!(!s.tidy(1), "an on core's empty shard is freed");
        assert!(s.tidy(0));
        assert_eq!(capacity(&s, 1), 0);
        assert!(capacity(&s, 0) >= MAX_REDIRECTS);
    }

    #[test]
    fn a_shard_is_freed_once_its_core_is_on_and_it_is_empty() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        s.set_accepting(1, false);
        assert!(capacity(&s, 1) >= MAX_REDIRECTS);
        s.set_accepting(1, true);
        assert_eq!(capacities(&s), [0, 0], "on with no flow redirected: freed at once");

        // On with flows still redirected: kept until a sweep empties it.
        s.set_accepting(1, false);
        for p in 0..3 {
            assert_eq!(s.route(&tcp_frame(PEER, 1000 + p, 7400, SYN), 1), Route::To(0));
        }
        s.set_accepting(1, true);
        assert!(capacity(&s, 1) >= MAX_REDIRECTS, "its redirected flows keep it");
        let live = flow_key(u32::from_be_bytes(PEER), 1000);
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |k| k == live);
        assert_eq!(shard_lens(&s), [0, 1]);
        assert!(capacity(&s, 1) > 0);
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |_| false);
        assert_eq!(shard_lens(&s), [0, 0]);
        assert_eq!(capacities(&s), [0, 0], "the sweep that empties it frees it");
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 0);

        // A node of one core redirects nothing: no table.
        let one = Shared::new(7400, vec![7401], false);
        one.set_accepting(0, false);
        assert_eq!(capacities(&one), [0]);
    }

    #[test]
    fn a_shard_short_of_room_drops_syns_rather_than_grow_and_is_rebuilt_off_the_packet_path() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        s.set_accepting(1, false);
        // As if removed entries' tombstones had taken its room.
        *lock(&s.redirects[1]) = HashMap::with_capacity(3);
        let short = capacity(&s, 1);
        let syns: Vec<_> =
            (0..short as u32 + 3).map(|p| tcp_frame((0x0b00_0000 + p).to_be_bytes(), 7, 7400, SYN)).collect();
        let (dropped, allocs) =
            counted(|| syns[..short + 2].iter().filter(|f| s.route(f, 1) == Route::Drop).count());
        assert_eq!(dropped, 2, "past its room, SYNs are dropped");
        assert_eq!(allocs, Allocs::default(), "not grown on the packet path");
        assert_eq!(capacity(&s, 1), short);
        assert_eq!(shard_lens(&s), [0, short]);
        assert_eq!(
            s.redirect_count.load(Ordering::Relaxed),
            short,
            "a dropped SYN takes no place in the bound"
        );
        assert_eq!(s.dropped_rx.load(Ordering::Relaxed), 2);

        // The sweep rebuilds it with room for the bound, keeping its flows.
        s.sweep_redirects(0, Instant::now(), |_| false);
        assert!(capacity(&s, 1) >= MAX_REDIRECTS);
        assert_eq!(shard_lens(&s), [0, short]);
        assert_eq!(s.route(&syns[short], 1), Route::To(0));
        // So does its core's tidying.
        *lock(&s.redirects[1]) = HashMap::with_capacity(3);
        assert!(s.tidy(1));
        assert!(capacity(&s, 1) >= MAX_REDIRECTS);
        assert_eq!(s.route(&syns[short + 1], 1), Route::To(0));
    }

    #[test]
    fn a_shard_poisoned_by_a_panic_is_still_routed_and_swept() {
        let s = Shared::new(7400, vec![7401, 7402], false);
        s.set_accepting(1, false);
        for p in 0..3 {
            assert_eq!(s.route(&tcp_frame(PEER, 1000 + p, 7400, SYN), 1), Route::To(0));
        }
        let panicked = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _held = s.redirects[1].lock();
                    panic!("a panic while core 1's shard is held (expected by this test)");
                })
                .join()
        });
        assert!(panicked.is_err());
        assert!(s.redirects[1].is_poisoned());

        // Its flows still go to their serving core, new ones are redirected.
        assert_eq!(s.route(&tcp_frame(PEER, 1000, 7400, ACK), 1), Route::To(0));
        assert_eq!(s.route(&tcp_frame(PEER, 1003, 7400, SYN), 1), Route::To(0));
        assert_eq!(shard_lens(&s), [0, 4]);
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 4);
        // And the sweep drops them: the bound is whole again.
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |_| false);
        assert_eq!(shard_lens(&s), [0, 0]);
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 0);
        assert!(s.redirected_from.iter().chain(&s.redirected_to).all(|n| n.load(Ordering::Relaxed) == 0));
        s.set_accepting(1, true);
        assert_eq!(capacities(&s), [0, 0]);
    }

    /// How many entries each core's shard holds.
    fn shard_lens(s: &Shared) -> Vec<usize> {
        s.redirects.iter().map(|t| lock(t).len()).collect()
    }

    /// The entries core `core`'s shard holds without reallocating.
    fn capacity(s: &Shared, core: usize) -> usize {
        lock(&s.redirects[core]).capacity()
    }

    fn capacities(s: &Shared) -> Vec<usize> {
        (0..s.redirects.len()).map(|c| capacity(s, c)).collect()
    }

    /// This thread's allocations while `counted` runs.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Allocs {
        allocs: u64,
        bytes: u64,
        frees: i64,
    }

    /// Runs `f`, with what this thread allocated and freed meanwhile,
    /// counted by `allocation-counter` (its global allocator counts per
    /// thread): that the packet path allocates nothing is measured, not
    /// assumed.
    fn counted<T>(f: impl FnOnce() -> T) -> (T, Allocs) {
        let mut r = None;
        let info = allocation_counter::measure(|| r = Some(f()));
        let r = r.expect("the closure ran");
        let allocs = Allocs {
            allocs: info.count_total,
            bytes: info.bytes_total,
            frees: info.count_total as i64 - info.count_current,
        };
        (r, allocs)
    }

    #[test]
    fn each_natural_core_has_its_own_shard_and_one_held_blocks_no_other() {
        let s = Shared::new(7400, vec![7401, 7402, 7403], false);
        s.set_accepting(1, false);
        s.set_accepting(2, false);
        // With RSS (no steering) a flow's natural core is its queue's.
        for p in 0..4 {
            assert_eq!(s.route(&tcp_frame(PEER, 1000 + p, 7400, SYN), 1), Route::To(0));
        }
        for p in 0..3 {
            assert_eq!(s.route(&tcp_frame(PEER, 2000 + p, 7400, SYN), 2), Route::To(0));
        }
        assert_eq!(shard_lens(&s), [0, 4, 3], "each flow is recorded in its natural core's shard");
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 7);

        // Core 1's shard held (as by core 1 routing, or a sweep): core 2's
        // segments, redirected flows and new ones, are routed meanwhile.
        let held = s.redirects[1].lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let routes = [
                    s.route(&tcp_frame(PEER, 2000, 7400, ACK), 2),
                    s.route(&tcp_frame(PEER, 2100, 7400, SYN), 2),
                    s.route(&tcp_frame(PEER, 2000, 7401, ACK), 2),
                ];
                tx.send(routes).unwrap();
            });
            let routes = rx.recv_timeout(Duration::from_secs(10));
            drop(held);
            assert_eq!(
                routes.expect("core 2's segments wait for no other core's shard"),
                [Route::To(0), Route::To(0), Route::To(0)]
            );
        });
        assert_eq!(shard_lens(&s), [0, 4, 4]);

        // Core 0's sweep visits both shards that redirect to it.
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |_| false);
        assert_eq!(shard_lens(&s), [0, 0, 0]);
        assert_eq!(s.redirect_count.load(Ordering::Relaxed), 0);
        assert!(s.redirected_from.iter().chain(&s.redirected_to).all(|n| n.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn the_bound_is_node_wide_and_the_counters_exact_under_concurrent_cores() {
        let s = Shared::new(7400, vec![7401, 7402, 7403], false);
        s.set_accepting(1, false);
        s.set_accepting(2, false);
        let per_core = MAX_REDIRECTS * 3 / 4;
        let syns = |core: usize, base: u32| {
            let s = &s;
            move || {
                let mut dropped = 0;
                for p in 0..per_core as u32 {
                    let peer = (base + p).to_be_bytes();
                    match s.route(&tcp_frame(peer, 7, 7400, SYN), core) {
                        Route::Drop => dropped += 1,
                        r => assert_eq!(r, Route::To(0)),
                    }
                }
                dropped
            }
        };
        let consistent = |s: &Shared| {
            let lens = shard_lens(s);
            let count = s.redirect_count.load(Ordering::Relaxed);
            assert_eq!(lens.iter().sum::<usize>(), count);
            for (core, len) in lens.iter().enumerate() {
                assert_eq!(s.redirected_from[core].load(Ordering::Relaxed), *len);
            }
            assert_eq!(s.redirected_to[0].load(Ordering::Relaxed), count, "core 0 serves all");
            count
        };

        // Cores 1 and 2 together: past the node-wide bound, not each shard's.
        let dropped = std::thread::scope(|scope| {
            let a = scope.spawn(syns(1, 0x0b00_0000));
            let b = scope.spawn(syns(2, 0x0c00_0000));
            a.join().unwrap() + b.join().unwrap()
        });
        assert_eq!(dropped, 2 * per_core - MAX_REDIRECTS);
        assert_eq!(s.dropped_rx.load(Ordering::Relaxed), dropped as u64);
        assert_eq!(consistent(&s), MAX_REDIRECTS);

        // Again while core 0 sweeps everything it may: the counts still add up.
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let sweeper = scope.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |_| false);
                    std::thread::yield_now();
                }
            });
            let a = scope.spawn(syns(1, 0x0d00_0000));
            let b = scope.spawn(syns(2, 0x0e00_0000));
            a.join().unwrap();
            b.join().unwrap();
            stop.store(true, Ordering::Release);
            sweeper.join().unwrap();
        });
        assert!(consistent(&s) <= MAX_REDIRECTS);
        s.sweep_redirects(0, Instant::now() + REDIRECT_GRACE, |_| false);
        assert_eq!(consistent(&s), 0);
        // The off cores' shards keep their room, the on core never had one.
        let room = capacities(&s);
        assert_eq!(room[0], 0);
        assert!(room[1..].iter().all(|&c| c >= MAX_REDIRECTS), "{room:?}");
    }

    #[test]
    fn syns_are_recognised() {
        assert!(is_syn(&tcp_frame([10, 0, 0, 1], 1, 7400, 0x02)));
        assert!(!is_syn(&tcp_frame([10, 0, 0, 1], 1, 7400, 0x12)), "a SYN-ACK opens nothing here");
        assert!(!is_syn(&tcp_frame([10, 0, 0, 1], 1, 7400, 0x10)));
        assert!(!is_syn(&[0x45; 20]));
    }

    proptest! {
        /// Whatever arrives, classifying it never panics.
        #[test]
        fn classifying_any_frame_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..200), ihl in 0u8..16) {
            let mut f = frame;
            if f.len() > 14 {
                f[12] = 0x08;
                f[13] = 0x00;
                f[14] = 0x40 | ihl;
            }
            if f.len() > 23 {
                f[23] = 6;
            }
            for steer_all in [false, true] {
                let s = Shared::new(7400, vec![7401, 7402, 7403], steer_all);
                s.set_accepting(1, false);
                for here in 0..3 {
                    if let Route::To(core) = s.route(&f, here) {
                        prop_assert!(core < 3);
                    }
                    let _ = s.refuses(&f, here);
                }
            }
            let _ = is_syn(&f);
        }
    }
}
