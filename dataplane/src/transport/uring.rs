//! io_uring transport: one ring per core serves the core's listeners, its
//! connections and its waker.
//!
//! - Listeners: one multishot accept each.
//! - Receiving: one multishot receive per connection into buffers the kernel
//!   picks from a provided-buffer ring registered at start. A buffer goes back
//!   to the ring as soon as the sink has seen its bytes; while a connection is
//!   paused its receive is cancelled and buffers that still arrive are held, in
//!   order, until reading resumes.
//! - Sending: at most one send in flight per connection. Its output belongs
//!   to the transport until the completion arrives; output queued meanwhile
//!   waits in a second one. Output with storage read buffers spliced in
//!   (`Output`) goes out as one gathering `sendmsg`, the data straight from
//!   the buffer the device filled. `flush` submits every queued send in one
//!   system call.
//! - Waking: a multishot poll on the core's eventfd.
//! - Storage: flash and disk engines may run on the same ring
//!   (`shared_ring`); their completions (user data with bit 63 set) go to
//!   `EventSink::storage`, so one completion queue wakes the core for both.
//! - Closing: the receive stays armed to discard input; once the last send
//!   completes the write side is shut, and the connection dies at the peer's
//!   EOF or a deadline (`CloseTimeouts`), checked at each poll.
//!
//! Every submission carries user data naming (kind, connection, generation),
//! and a connection is freed only once none of its operations can complete any
//! more, so a completion never lands on a reused id.
//!
//! Needs Linux 6.0 (multishot receive with a provided-buffer ring); `probe`
//! checks before a node picks this backend.

use std::io;
use std::mem;
use std::net::TcpListener;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use nix::libc;
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{self, sockopt, Shutdown};
use slab::Slab;

use super::{CloseList, CloseTimeouts, ConnId, EventSink, Output, Transport};
use crate::node::NetBackend;

const SQ_ENTRIES: u32 = 1024;
/// Room for a burst of completions; the kernel buffers any overflow (NODROP).
const CQ_ENTRIES: u32 = 8192;
/// Completions (and held buffers) handled per poll, so a pass stays bounded.
const CQE_BUDGET: usize = 1024;
/// Completions copied out of the ring at a time.
const CQE_BATCH: usize = 256;
/// The provided-buffer group; each transport has its own ring, so one id.
const BGID: u16 = 0;
/// Size of one receive buffer.
const RX_BUF_SIZE: usize = 32 << 10;
/// The largest single send submitted (the length field is 32 bits).
const MAX_SEND: usize = 1 << 30;
/// Pieces in one gathering send (header, data, header, data, …).
const MAX_IOV: usize = 64;
/// How long dropping a transport waits for cancelled operations to finish.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// Fixed-file and fixed-buffer table slots reserved for storage engines on
/// this ring (`FlashEngine::open_on`): engine `i` of a core takes slot `i`.
pub const STORAGE_SLOTS: u32 = 4;

/// Operation kinds in the top byte of user data.
mod op {
    pub const ACCEPT: u8 = 1;
    pub const RECV: u8 = 2;
    pub const SEND: u8 = 3;
    pub const WAKE: u8 = 4;
    /// A cancel aimed at a connection's receive.
    pub const CANCEL_RECV: u8 = 5;
    /// Any other cancel; its result does not matter.
    pub const CANCEL: u8 = 6;
}

const GEN_MASK: u32 = 0x00ff_ffff;

/// (kind, id, generation) packed as kind:8 | generation:24 | id:32.
fn user_data(kind: u8, id: usize, gen: u32) -> u64 {
    debug_assert!(id <= u32::MAX as usize);
    (u64::from(kind) << 56) | (u64::from(gen & GEN_MASK) << 32) | (id as u64 & 0xffff_ffff)
}

fn decode(ud: u64) -> (u8, usize, u32) {
    ((ud >> 56) as u8, (ud & 0xffff_ffff) as usize, (ud >> 32) as u32 & GEN_MASK)
}

/// Errors that mean "try again", not "the ring is broken".
fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME))
}

/// Reports whether this kernel (and its sandbox) supports everything the
/// transport uses. `Err` says what is missing.
pub fn probe() -> Result<(), String> {
    let mut ring = build_ring(8, 16).map_err(|e| {
        format!("cannot create an io_uring ({e}); kernel.io_uring_disabled or a seccomp policy may forbid it")
    })?;
    let params = ring.params();
    if !params.is_feature_nodrop() || !params.is_feature_ext_arg() {
        return Err("kernel too old: io_uring lacks NODROP or EXT_ARG (Linux 5.11)".into());
    }
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| format!("io_uring opcode probe failed: {e}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("io_uring lacks IORING_OP_{name}"));
        }
    }
    // Multishot receive into a provided-buffer ring (Linux 6.0; multishot
    // accept is 5.19) has no opcode of its own: try one on a socket pair.
    probe_multishot_recv(&mut ring)
}

fn probe_multishot_recv(ring: &mut IoUring) -> Result<(), String> {
    let bufs = BufRing::new(64, 2).map_err(|e| format!("cannot map a buffer ring: {e}"))?;
    bufs.register(ring, BGID).map_err(|e| format!("cannot register a provided-buffer ring: {e}"))?;
    let (a, b) = socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::Stream,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), BGID).build().user_data(1);
    // SAFETY: the receive writes only into `bufs`' buffers; below we wait for
    // its final completion before `bufs` is dropped, or leak `bufs`.
    if unsafe { ring.submission().push(&recv) }.is_err() {
        return Err("io_uring submission queue full".into());
    }
    let first = match nix::unistd::write(&b, b"x") {
        Err(_) => None,
        Ok(_) => wait_one(ring, Duration::from_secs(1)),
    };
    let mut finished = first.is_some_and(|(_, flags)| !cqueue::more(flags));
    let verdict = match first {
        None => Err("multishot receive did not complete (needs Linux 6.0)".into()),
        Some((res, flags)) if res == 1 && cqueue::buffer_select(flags).is_some() => {
            if cqueue::more(flags) {
                Ok(())
            } else {
                Err("kernel does not keep a multishot receive armed (needs Linux 6.0)".into())
            }
        }
        Some((res, _)) if res < 0 => Err(format!(
            "multishot receive with provided buffers failed: {} (needs Linux 6.0)",
            io::Error::from_raw_os_error(-res)
        )),
        Some((res, flags)) => {
            Err(format!("unexpected multishot receive completion (result {res}, flags {flags:#x})"))
        }
    };
    // Ending the socket ends the receive; wait for its last completion so the
    // kernel is done with `bufs` before they are unmapped.
    let _ = socket::shutdown(a.as_raw_fd(), Shutdown::Both);
    let deadline = Instant::now() + Duration::from_secs(1);
    while !finished && Instant::now() < deadline {
        match wait_one(ring, Duration::from_millis(100)) {
            Some((_, flags)) => finished = !cqueue::more(flags),
            None => {
                let c = opcode::AsyncCancel::new(1).build().user_data(2);
                // SAFETY: a cancel request carries no buffer.
                let _ = unsafe { ring.submission().push(&c) };
            }
        }
    }
    if !finished {
        mem::forget(bufs);
        return Err("io_uring multishot receive could not be cancelled".into());
    }
    let _ = ring.submitter().unregister_buf_ring(BGID);
    drop(bufs);
    verdict
}

/// Waits up to `timeout` for a completion for user data 1; returns its
/// (result, flags).
fn wait_one(ring: &mut IoUring, timeout: Duration) -> Option<(i32, u32)> {
    let deadline = Instant::now() + timeout;
    loop {
        for e in ring.completion() {
            if e.user_data() == 1 {
                return Some((e.result(), e.flags()));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let ts = types::Timespec::from(deadline - now);
        let args = types::SubmitArgs::new().timespec(&ts);
        if let Err(e) = ring.submitter().submit_with_args(1, &args) {
            if !transient(&e) {
                return None;
            }
        }
    }
}

fn build_ring(sq: u32, cq: u32) -> io::Result<IoUring> {
    // Cooperative task running: completions are run when we enter the
    // kernel (which the TASKRUN flag tells us to do) instead of interrupting
    // the polling thread. Submit-all keeps one bad SQE from stalling a batch.
    let preferred = IoUring::builder()
        .setup_cqsize(cq)
        .setup_submit_all()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(sq);
    match preferred {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder().setup_cqsize(cq).build(sq),
        r => r,
    }
}

/// Anonymous, page-aligned memory that the kernel reads or writes on our
/// behalf. The owner makes sure no operation still uses it when it drops.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        let nz = NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh private anonymous mapping aliases no Rust object.
        let p = unsafe {
            mmap_anonymous(None, nz, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE)
        }
        .map_err(io::Error::from)?;
        Ok(Region { ptr: p.cast(), len })
    }

    /// Keeps the mapping for the rest of the process.
    fn leak(&mut self) {
        self.len = 0;
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.len == 0 {
            return; // leaked
        }
        // SAFETY: this range was mapped by `new` and nothing refers to it any
        // more (the owner waited for, or leaked instead of dropping, users).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// The kernel's `struct io_uring_buf`: one slot of a provided-buffer ring.
/// Slot 0's `resv` doubles as the ring's tail.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const NIL: u16 = u16::MAX;

/// Buffers a paused connection received but has not delivered yet, as a
/// FIFO linked through `BufRing::next`.
#[derive(Clone, Copy)]
struct Held {
    head: u16,
    tail: u16,
    count: u16,
}

impl Held {
    const EMPTY: Held = Held { head: NIL, tail: NIL, count: 0 };
}

/// A provided-buffer ring: `count` buffers of `size` bytes that multishot
/// receives fill. Buffer ids index both the ring slots and the data.
struct BufRing {
    ring: Region,
    data: Region,
    size: usize,
    count: usize,
    tail: u16,
    /// Buffers held back for paused connections.
    held: usize,
    next: Box<[u16]>,
    lens: Box<[u32]>,
}

impl BufRing {
    fn new(size: usize, count: usize) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 1 << 15 || size == 0 || size > u32::MAX as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad receive buffer pool shape"));
        }
        let data_len = size
            .checked_mul(count)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "receive buffer pool too large"))?;
        let mut b = BufRing {
            ring: Region::new(count * mem::size_of::<RawBuf>())?,
            data: Region::new(data_len)?,
            size,
            count,
            tail: 0,
            held: 0,
            next: vec![NIL; count].into_boxed_slice(),
            lens: vec![0; count].into_boxed_slice(),
        };
        for bid in 0..count {
            b.recycle(bid as u16);
        }
        Ok(b)
    }

    fn register(&self, ring: &IoUring, bgid: u16) -> io::Result<()> {
        // SAFETY: `self.ring` is page aligned and holds `count` slots; it
        // stays mapped until the io_uring is gone: owners drop (or leak) the
        // buffer ring only after the ring has no operation using it, and
        // declare the ring first so it is closed first.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.ring.ptr.as_ptr() as u64,
                self.count as u16,
                bgid,
                0,
            )
        }
    }

    /// Buffers the kernel can pick right now, give or take completions not
    /// reaped yet.
    fn available(&self) -> usize {
        self.count - self.held
    }

    fn valid(&self, bid: u16, len: usize) -> bool {
        (bid as usize) < self.count && len <= self.size
    }

    /// Bytes of buffer `bid`, which a completion just handed us.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!(self.valid(bid, len));
        // SAFETY: the range lies inside `data`; the kernel gave buffer `bid`
        // to us with its completion and writes it again only after `recycle`
        // publishes it, which needs `&mut self` and so ends this borrow.
        unsafe { std::slice::from_raw_parts(self.data.ptr.as_ptr().add(bid as usize * self.size), len) }
    }

    /// Gives buffer `bid` back to the kernel.
    fn recycle(&mut self, bid: u16) {
        if bid as usize >= self.count {
            debug_assert!(false, "buffer id {bid} out of range");
            return;
        }
        let slot = self.tail as usize & (self.count - 1);
        let base = self.ring.ptr.as_ptr().cast::<RawBuf>();
        // SAFETY: `slot < count`, so the slot lies inside `ring`. The kernel
        // reads only slots between its head and the published tail, which
        // excludes this one until the store below. Fields are written through
        // raw pointers so no reference covers slot 0's `resv` (the tail the
        // kernel reads concurrently).
        unsafe {
            let e = base.add(slot);
            std::ptr::addr_of_mut!((*e).addr)
                .write(self.data.ptr.as_ptr() as u64 + (bid as usize * self.size) as u64);
            std::ptr::addr_of_mut!((*e).len).write(self.size as u32);
            std::ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the aligned u16 `resv` of slot 0, inside `ring`
        // for as long as `self` lives; the kernel only reads it, atomically.
        let tail = unsafe { AtomicU16::from_ptr(std::ptr::addr_of_mut!((*base).resv)) };
        tail.store(self.tail, Ordering::Release);
    }

    fn hold(&mut self, h: &mut Held, bid: u16, len: usize) {
        debug_assert!(self.valid(bid, len));
        self.next[bid as usize] = NIL;
        self.lens[bid as usize] = len as u32;
        if h.count == 0 {
            h.head = bid;
        } else {
            self.next[h.tail as usize] = bid;
        }
        h.tail = bid;
        h.count += 1;
        self.held += 1;
    }

    fn unhold(&mut self, h: &mut Held) -> Option<(u16, usize)> {
        if h.count == 0 {
            return None;
        }
        let bid = h.head;
        h.head = self.next[bid as usize];
        h.count -= 1;
        if h.count == 0 {
            *h = Held::EMPTY;
        }
        self.held -= 1;
        Some((bid, self.lens[bid as usize] as usize))
    }

    /// Returns every held buffer of `h` to the kernel, discarding its bytes.
    fn release(&mut self, h: &mut Held) {
        while let Some((bid, _)) = self.unhold(h) {
            self.recycle(bid);
        }
    }
}

struct Conn {
    fd: OwnedFd,
    gen: u32,
    /// The core wants input (`set_reading`).
    reading: bool,
    /// Close requested: input is discarded, sending finishes, then our
    /// write side is shut.
    closing: bool,
    /// Our write side is shut (the close's output is all out); waiting for
    /// the peer's EOF.
    wr_shut: bool,
    /// The peer finished sending; reported once held bytes are delivered.
    eof: bool,
    /// `EventSink::peer_closed` delivered.
    eof_reported: bool,
    /// Beyond use (error, peer gone, or close done). Freed, and reported
    /// closed, once no operation of it can complete any more.
    dead: bool,
    /// `shutdown(2)` of both directions done (the connection is dead).
    shut: bool,
    recv_armed: bool,
    recv_cancelled: bool,
    send_armed: bool,
    send_cancelled: bool,
    /// Length of the send in flight.
    send_len: usize,
    /// Output being sent: from byte `off` on it is not confirmed yet. While
    /// a send is in flight the kernel reads it, so nothing touches it.
    out: Output,
    off: usize,
    /// Output queued while a send was in flight.
    queued: Output,
    /// The gathering send's message and pieces, at a stable address while
    /// the kernel reads them (made on first use).
    msg: Option<Box<SendMsg>>,
    held: Held,
    /// In `pending`.
    listed: bool,
    /// In `dirty`.
    dirty: bool,
    /// In `free`.
    freeing: bool,
    /// While closing: when the close stops waiting, and its slot in `closes`.
    deadline: Option<Instant>,
    close_slot: usize,
}

impl Conn {
    fn new(fd: OwnedFd, gen: u32) -> Conn {
        Conn {
            fd,
            gen,
            reading: true,
            closing: false,
            wr_shut: false,
            eof: false,
            eof_reported: false,
            dead: false,
            shut: false,
            recv_armed: false,
            recv_cancelled: false,
            send_armed: false,
            send_cancelled: false,
            send_len: 0,
            out: Output::new(),
            off: 0,
            queued: Output::new(),
            msg: None,
            held: Held::EMPTY,
            listed: false,
            dirty: false,
            freeing: false,
            deadline: None,
            close_slot: 0,
        }
    }

    fn unsent(&self) -> usize {
        self.out.len() - self.off + self.queued.len()
    }
}

/// A `sendmsg`'s header and its pieces, filled before each gathering send.
struct SendMsg {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_IOV],
}

impl SendMsg {
    fn new() -> Box<SendMsg> {
        // SAFETY: both are plain C structs for which all-zero is valid
        // (null pointers, zero lengths).
        unsafe { Box::new(mem::zeroed()) }
    }
}

/// The ring and the number of operations that may still post a completion.
struct Ring {
    ring: IoUring,
    inflight: usize,
}

impl Ring {
    /// Queues `e` for the next submission; false if the queue stays full.
    ///
    /// # Safety
    /// Every buffer `e` points to must stay valid, and untouched by us where
    /// the kernel writes it, until the operation's final completion.
    unsafe fn push(&mut self, e: &squeue::Entry) -> bool {
        // SAFETY: forwarded from the caller.
        if unsafe { self.ring.submission().push(e) }.is_err() {
            // Full: hand what is queued to the kernel and try once more.
            if self.ring.submit().is_err() {
                return false;
            }
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(e) }.is_err() {
                return false;
            }
        }
        self.inflight += 1;
        true
    }

    fn cancel(&mut self, target: u64, kind: u8, id: usize, gen: u32) -> bool {
        let e = opcode::AsyncCancel::new(target).build().user_data(user_data(kind, id, gen));
        // SAFETY: a cancel request carries no buffer.
        unsafe { self.push(&e) }
    }

    /// One operation will post no more completions.
    fn done(&mut self) {
        debug_assert!(self.inflight > 0);
        self.inflight = self.inflight.saturating_sub(1);
    }
}

struct Listener {
    sock: TcpListener,
    armed: bool,
    /// Out of its `SO_REUSEPORT` group (`set_accepting`): not armed again.
    paused: bool,
}

/// Used while dropping, when nobody listens any more.
struct NullSink;

impl EventSink for NullSink {
    fn accepted(&mut self, _: ConnId) {}
    fn received(&mut self, _: ConnId, _: &[u8]) {}
    fn peer_closed(&mut self, _: ConnId) {}
    fn drained(&mut self, _: ConnId) {}
    fn closed(&mut self, _: ConnId) {}
    /// Dropping: the engines drained their I/O before the transport went
    /// (`Core::run`), or leak their buffers for what is left.
    fn storage(&mut self, _: u64, _: i32) {}
}

/// One core's network: its listeners, connections and waker on one ring.
///
/// Not `Send` (it holds raw mappings), and rightly so: io_uring runs a
/// request's completion work in the thread that submitted it, so the
/// transport must be polled by the thread that uses it — the core's.
pub struct UringTransport {
    // Declared first so the ring closes before the memory it used goes.
    ring: Ring,
    bufs: BufRing,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    max_conns: usize,
    next_gen: u32,
    waker_fd: RawFd,
    waker_armed: bool,
    /// Connections to look at again at the next poll: held bytes to deliver,
    /// a receive to re-arm once buffers are back, a push that found the
    /// submission queue full.
    pending: Vec<ConnId>,
    /// Connections with output to submit.
    dirty: Vec<ConnId>,
    /// Dead connections with nothing in flight, freed at the next poll.
    free: Vec<ConnId>,
    /// Connections with a close under way.
    closes: CloseList,
    /// Closes past their deadline, found by `CloseList::expire` (reused).
    expired: Vec<ConnId>,
    timeouts: CloseTimeouts,
    /// Reused list storage, so passes do not allocate.
    spare: Vec<ConnId>,
    cqes: Vec<cqueue::Entry>,
    /// Dropping: arm nothing new.
    stopping: bool,
}

impl UringTransport {
    /// `waker_fd` is an eventfd the core's peers write to wake a parked poll.
    /// Received bytes land in a pool of 32 KiB buffers shared by all
    /// connections and returned as soon as the core has seen them: `2 *
    /// rx_buf` worth, at least 256 buffers (8 MiB) and at most 512.
    pub fn new(
        listeners: Vec<TcpListener>,
        waker_fd: RawFd,
        max_conns: usize,
        rx_buf: usize,
    ) -> io::Result<Self> {
        let count = (2 * rx_buf / RX_BUF_SIZE).next_power_of_two().clamp(256, 512);
        Self::with_buffers(listeners, waker_fd, max_conns, RX_BUF_SIZE, count)
    }

    /// Like `new`, with an explicit receive pool: `count` (a power of two up
    /// to 32768) buffers of `size` bytes.
    pub fn with_buffers(
        listeners: Vec<TcpListener>,
        waker_fd: RawFd,
        max_conns: usize,
        size: usize,
        count: usize,
    ) -> io::Result<Self> {
        if max_conns == 0 || max_conns > u32::MAX as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "max_conns must be 1..=2^32-1"));
        }
        let ring = build_ring(SQ_ENTRIES, CQ_ENTRIES)?;
        if !ring.params().is_feature_nodrop() || !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks NODROP or EXT_ARG"));
        }
        let bufs = BufRing::new(size, count)?;
        bufs.register(&ring, BGID)?;
        // Room for storage engines' files and buffer pools; without it they
        // fall back to plain descriptors and buffers (`open_on`).
        if let Err(error) = ring
            .submitter()
            .register_files_sparse(STORAGE_SLOTS)
            .and_then(|()| ring.submitter().register_buffers_sparse(STORAGE_SLOTS))
        {
            tracing::debug!(%error, "no sparse file/buffer tables for storage on the network ring");
        }
        let mut ls = Vec::with_capacity(listeners.len());
        for l in listeners {
            // The ring waits for connections; a blocking socket lets it park
            // the accept instead of completing it with EAGAIN.
            l.set_nonblocking(false)?;
            ls.push(Listener { sock: l, armed: false, paused: false });
        }
        // Accepts and the waker's poll are armed by the first `poll`, so
        // every request is submitted from the thread that polls.
        Ok(UringTransport {
            ring: Ring { ring, inflight: 0 },
            bufs,
            listeners: ls,
            conns: Slab::with_capacity(max_conns.min(1024)),
            max_conns,
            next_gen: 0,
            waker_fd,
            waker_armed: false,
            pending: Vec::new(),
            dirty: Vec::new(),
            free: Vec::new(),
            closes: CloseList::new(),
            expired: Vec::new(),
            timeouts: CloseTimeouts::DEFAULT,
            spare: Vec::new(),
            cqes: Vec::with_capacity(CQE_BATCH),
            stopping: false,
        })
    }

    #[cfg(test)]
    pub(super) fn set_close_timeouts(&mut self, t: CloseTimeouts) {
        self.timeouts = t;
    }

    /// Arms the listeners' accepts and the waker's poll where they ended.
    fn arm_fixed(&mut self) {
        if self.stopping {
            return;
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if !l.armed && !l.paused {
                let e = opcode::AcceptMulti::new(types::Fd(l.sock.as_raw_fd()))
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
                    .user_data(user_data(op::ACCEPT, i, 0));
                // SAFETY: an accept carries no buffer (no peer address asked).
                l.armed = unsafe { self.ring.push(&e) };
            }
        }
        if !self.waker_armed {
            let e = opcode::PollAdd::new(types::Fd(self.waker_fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(op::WAKE, 0, 0));
            // SAFETY: a poll carries no buffer.
            self.waker_armed = unsafe { self.ring.push(&e) };
        }
    }

    fn touch(pending: &mut Vec<ConnId>, c: &mut Conn, id: ConnId) {
        if !c.listed {
            c.listed = true;
            pending.push(id);
        }
    }

    /// Brings `id`'s operations in line with its state: arms or cancels its
    /// receive, moves a close along (shut our side once output is out, die
    /// at the peer's EOF), tears a dead connection down. Queues SQEs;
    /// submits nothing.
    fn advance(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if !c.dead && c.closing {
            // Input after a close request is never delivered.
            self.bufs.release(&mut c.held);
            if !c.wr_shut && !c.send_armed && c.unsent() == 0 {
                // Output is out: the peer sees EOF right after our last byte.
                // Then linger for the peer's EOF (closing with input unread
                // would send a reset that can destroy those last bytes in the
                // peer's kernel).
                c.wr_shut = true;
                if c.eof || socket::shutdown(c.fd.as_raw_fd(), Shutdown::Write).is_err() {
                    c.dead = true;
                } else {
                    let d = Instant::now() + self.timeouts.linger;
                    c.deadline = Some(d);
                    self.closes.note(d);
                }
            } else if c.wr_shut && c.eof {
                c.dead = true;
            }
        }
        if c.dead {
            self.bufs.release(&mut c.held);
            c.queued.clear();
            if !c.send_armed {
                c.out.clear();
                c.off = 0;
            }
            if !c.shut {
                c.shut = true;
                // Ends a parked receive or send at once (they complete with
                // EOF or EPIPE); the cancels below are belt and braces.
                let _ = socket::shutdown(c.fd.as_raw_fd(), Shutdown::Both);
            }
            if c.recv_armed && !c.recv_cancelled {
                c.recv_cancelled = self.ring.cancel(user_data(op::RECV, id, c.gen), op::CANCEL, id, c.gen);
            }
            if c.send_armed && !c.send_cancelled {
                c.send_cancelled = self.ring.cancel(user_data(op::SEND, id, c.gen), op::CANCEL, id, c.gen);
            }
            if (c.recv_armed && !c.recv_cancelled) || (c.send_armed && !c.send_cancelled) {
                Self::touch(&mut self.pending, c, id);
            }
            if !c.recv_armed && !c.send_armed && !c.freeing {
                c.freeing = true;
                self.free.push(id);
            }
            return;
        }
        // A closing connection keeps receiving, to discard what the peer
        // still sends.
        let want = !c.eof && (c.reading || c.closing);
        if want && !c.recv_armed {
            let e = opcode::RecvMulti::new(types::Fd(c.fd.as_raw_fd()), BGID).build().user_data(user_data(
                op::RECV,
                id,
                c.gen,
            ));
            // SAFETY: the receive writes only into provided buffers, which
            // `self.bufs` keeps mapped until the ring has nothing in flight.
            if self.bufs.available() > 0 && unsafe { self.ring.push(&e) } {
                c.recv_armed = true;
                c.recv_cancelled = false;
            } else {
                Self::touch(&mut self.pending, c, id);
            }
        } else if !want && c.recv_armed && !c.recv_cancelled {
            if self.ring.cancel(user_data(op::RECV, id, c.gen), op::CANCEL_RECV, id, c.gen) {
                c.recv_cancelled = true;
            } else {
                Self::touch(&mut self.pending, c, id);
            }
        }
    }

    /// Where new output for `conn` goes (marked for the next flush), or
    /// `None` when it is to be dropped: the connection is gone or its
    /// write side shut, or there is nothing to send.
    fn output_of(&mut self, conn: ConnId, nothing: bool) -> Option<&mut Output> {
        let c = self.conns.get_mut(conn)?;
        if c.dead || c.wr_shut || nothing {
            return None;
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(conn);
        }
        // While a send is in flight the kernel reads `out`: queue behind it.
        Some(if c.send_armed || !c.queued.is_empty() { &mut c.queued } else { &mut c.out })
    }

    /// Queues a send for every connection with output and none in flight.
    fn push_sends(&mut self) {
        let mut work = mem::take(&mut self.spare);
        mem::swap(&mut work, &mut self.dirty);
        for &id in &work {
            let Some(c) = self.conns.get_mut(id) else { continue };
            c.dirty = false;
            if c.dead || c.send_armed {
                continue;
            }
            if c.off == c.out.len() {
                c.out.clear();
                c.off = 0;
                c.out.append(&mut c.queued);
            }
            if c.off == c.out.len() {
                continue;
            }
            let fd = types::Fd(c.fd.as_raw_fd());
            let (e, len) = if !c.out.has_bufs() {
                let len = (c.out.len() - c.off).min(MAX_SEND);
                let mut at = std::ptr::null();
                c.out.gather(c.off, len, 1, |p| at = p.as_ptr());
                (opcode::Send::new(fd, at, len as u32).flags(libc::MSG_NOSIGNAL).build(), len)
            } else {
                let m = c.msg.get_or_insert_with(SendMsg::new);
                let mut n = 0;
                let len = c.out.gather(c.off, MAX_SEND, MAX_IOV, |p| {
                    m.iov[n] = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() };
                    n += 1;
                });
                m.hdr.msg_iov = m.iov.as_mut_ptr();
                m.hdr.msg_iovlen = n as _;
                let hdr: *const libc::msghdr = &m.hdr;
                (opcode::SendMsg::new(fd, hdr).flags(libc::MSG_NOSIGNAL as u32).build(), len)
            };
            let e = e.user_data(user_data(op::SEND, id, c.gen));
            // SAFETY: the send reads `len` bytes of `c.out` from `off` (its
            // byte stream and the read buffers spliced in), and a gathering
            // send also `c.msg`, boxed at a stable address. While `send_armed`
            // is set nothing writes, grows, swaps or clears `c.out` or
            // `c.msg` (new output goes to `c.queued`), and the connection —
            // with its buffers — is freed only after the send's completion; a
            // dropped transport waits for it or leaks the memory.
            if unsafe { self.ring.push(&e) } {
                c.send_armed = true;
                c.send_cancelled = false;
                c.send_len = len;
            } else {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
        work.clear();
        self.spare = work;
    }

    /// Revisits pending connections: delivers held bytes of resumed ones,
    /// re-arms receives, retries pushes. Returns events delivered.
    fn run_pending(&mut self, sink: &mut dyn EventSink, budget: &mut usize) -> usize {
        self.arm_fixed();
        let mut n = 0;
        let mut work = mem::take(&mut self.spare);
        mem::swap(&mut work, &mut self.pending);
        for &id in &work {
            let Some(c) = self.conns.get_mut(id) else { continue };
            c.listed = false;
            n += self.deliver_held(id, sink, budget);
            n += self.report_eof(id, sink);
            self.advance(id);
        }
        work.clear();
        self.spare = work;
        n
    }

    fn deliver_held(&mut self, id: ConnId, sink: &mut dyn EventSink, budget: &mut usize) -> usize {
        let mut n = 0;
        while let Some(c) = self.conns.get_mut(id) {
            if !c.reading || c.dead || c.closing || c.held.count == 0 {
                break;
            }
            if *budget == 0 {
                Self::touch(&mut self.pending, c, id);
                break;
            }
            let Some((bid, len)) = self.bufs.unhold(&mut c.held) else { break };
            sink.received(id, self.bufs.bytes(bid, len));
            self.bufs.recycle(bid);
            *budget -= 1;
            n += 1;
        }
        n
    }

    /// Tells the sink the peer finished sending, once every byte it sent
    /// has been delivered.
    fn report_eof(&mut self, id: ConnId, sink: &mut dyn EventSink) -> usize {
        let Some(c) = self.conns.get_mut(id) else { return 0 };
        if !c.eof || c.eof_reported || c.dead || c.closing || !c.reading || c.held.count > 0 {
            return 0;
        }
        c.eof_reported = true;
        sink.peer_closed(id);
        1
    }

    /// Ends closes past their deadline; returns `timeout` shortened to the
    /// next deadline.
    fn expire_closes(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let conns = &self.conns;
        let deadline = |id| {
            let c: &Conn = conns.get(id)?;
            debug_assert!(c.closing && (c.dead || c.deadline.is_some()));
            c.deadline.filter(|_| !c.dead)
        };
        let mut expired = std::mem::take(&mut self.expired);
        let timeout = self.closes.expire(timeout, deadline, &mut expired);
        for id in expired.drain(..) {
            let Some(c) = self.conns.get_mut(id) else { continue };
            tracing::debug!(conn = id, shut = c.wr_shut, unsent = c.unsent(), "close timed out");
            c.dead = true;
            self.advance(id);
        }
        self.expired = expired;
        timeout
    }

    /// Frees connections that finished dying and reports them closed.
    fn free_dead(&mut self, sink: &mut dyn EventSink) -> usize {
        let mut n = 0;
        let mut work = mem::take(&mut self.spare);
        mem::swap(&mut work, &mut self.free);
        for &id in &work {
            if let Some(c) = self.conns.try_remove(id) {
                debug_assert!(c.dead && !c.recv_armed && !c.send_armed && c.held.count == 0);
                if c.closing {
                    if let Some(moved) = self.closes.remove(c.close_slot) {
                        self.conns[moved].close_slot = c.close_slot;
                    }
                }
                drop(c); // closes the socket
                sink.closed(id);
                n += 1;
            }
        }
        work.clear();
        self.spare = work;
        n
    }

    /// Submits queued SQEs and, if `wait` allows, waits for a completion.
    fn enter(&mut self, wait: Option<Duration>) -> io::Result<()> {
        let r = match wait {
            Some(d) if d.is_zero() => {
                let sq = self.ring.ring.submission();
                let needed = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
                drop(sq);
                if !needed {
                    return Ok(());
                }
                self.ring.ring.submit()
            }
            None => self.ring.ring.submit_and_wait(1),
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Handles up to `budget` completions; returns events delivered.
    fn reap(&mut self, sink: &mut dyn EventSink, budget: &mut usize) -> usize {
        let mut n = 0;
        while *budget > 0 {
            let mut batch = mem::take(&mut self.cqes);
            batch.clear();
            batch.extend(self.ring.ring.completion().take((*budget).min(CQE_BATCH)));
            if batch.is_empty() {
                self.cqes = batch;
                break;
            }
            *budget -= batch.len();
            for e in &batch {
                n += self.complete(e, sink);
            }
            batch.clear();
            self.cqes = batch;
        }
        n
    }

    fn complete(&mut self, e: &cqueue::Entry, sink: &mut dyn EventSink) -> usize {
        if crate::storage::flash::tag::is_storage(e.user_data()) {
            sink.storage(e.user_data(), e.result());
            return 1;
        }
        let (kind, id, gen) = decode(e.user_data());
        let (res, flags) = (e.result(), e.flags());
        let more = cqueue::more(flags);
        match kind {
            op::ACCEPT => {
                if !more {
                    // Re-armed at the next poll.
                    self.ring.done();
                    if let Some(l) = self.listeners.get_mut(id) {
                        l.armed = false;
                    }
                }
                if res >= 0 {
                    self.accepted(res, sink)
                } else {
                    let paused = self.listeners.get(id).is_some_and(|l| l.paused);
                    // Dropping shuts the listeners down, which may end their
                    // accepts with EINVAL before the cancel does.
                    if res != -libc::ECANCELED && !paused && !self.stopping {
                        // EMFILE and friends: keep serving the connections we have.
                        let error = io::Error::from_raw_os_error(-res);
                        tracing::warn!(listener = id, %error, "accept failed");
                    }
                    1
                }
            }
            op::RECV => self.received(id, gen, res, flags, sink),
            op::SEND => self.sent(id, gen, res, sink),
            op::WAKE => {
                if !more {
                    self.ring.done();
                    self.waker_armed = false;
                }
                let mut b = [0u8; 8];
                // SAFETY: reads 8 bytes into a local array from the core's
                // eventfd (non-blocking), clearing its counter.
                let _ = unsafe { libc::read(self.waker_fd, b.as_mut_ptr().cast(), 8) };
                1
            }
            op::CANCEL_RECV => {
                self.ring.done();
                // Not found or already running: if the receive still runs for
                // a connection that should not read, cancel again.
                if res < 0 {
                    if let Some(c) = self.conns.get_mut(id).filter(|c| c.gen == gen) {
                        if c.recv_armed && c.recv_cancelled {
                            c.recv_cancelled = false;
                            Self::touch(&mut self.pending, c, id);
                        }
                    }
                }
                0
            }
            op::CANCEL => {
                self.ring.done();
                0
            }
            _ => {
                debug_assert!(false, "unknown completion kind {kind}");
                0
            }
        }
    }

    fn accepted(&mut self, raw: i32, sink: &mut dyn EventSink) -> usize {
        // SAFETY: the kernel installed descriptor `raw` for this completion;
        // nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if self.stopping {
            return 0;
        }
        if self.conns.len() >= self.max_conns {
            tracing::warn!(max = self.max_conns, "connection limit reached; refusing");
            return 1; // dropping `fd` closes it
        }
        if let Err(e) = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1) & GEN_MASK;
        let id = self.conns.insert(Conn::new(fd, gen));
        sink.accepted(id);
        self.advance(id);
        1
    }

    fn received(&mut self, id: ConnId, gen: u32, res: i32, flags: u32, sink: &mut dyn EventSink) -> usize {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.ring.done();
        }
        let Some(c) = self.conns.get_mut(id).filter(|c| c.gen == gen) else {
            // Cannot happen (ids outlive their operations), but a buffer is
            // never lost.
            debug_assert!(false, "receive completion for a freed connection");
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            return 0;
        };
        if !more {
            c.recv_armed = false;
            c.recv_cancelled = false;
        }
        if res > 0 {
            let len = res as usize;
            match bid {
                Some(b) if self.bufs.valid(b, len) => {
                    if c.dead || c.closing {
                        self.bufs.recycle(b);
                    } else if !c.reading || c.held.count > 0 {
                        // Paused, or older bytes still wait: keep the order.
                        self.bufs.hold(&mut c.held, b, len);
                        if c.reading {
                            Self::touch(&mut self.pending, c, id);
                        }
                    } else {
                        sink.received(id, self.bufs.bytes(b, len));
                        self.bufs.recycle(b);
                    }
                }
                _ => {
                    debug_assert!(false, "receive completion without a valid buffer");
                    if let Some(b) = bid {
                        self.bufs.recycle(b);
                    }
                    c.dead = true;
                }
            }
        } else {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            match -res {
                0 => c.eof = true,
                // Out of buffers: re-armed once some are back (see `advance`).
                // Cancelled: paused. The data stays in the socket.
                libc::ENOBUFS | libc::ECANCELED | libc::EAGAIN | libc::EINTR => {}
                _ => c.dead = true,
            }
        }
        self.advance(id);
        1 + self.report_eof(id, sink)
    }

    fn sent(&mut self, id: ConnId, gen: u32, res: i32, sink: &mut dyn EventSink) -> usize {
        self.ring.done();
        let Some(c) = self.conns.get_mut(id).filter(|c| c.gen == gen) else {
            debug_assert!(false, "send completion for a freed connection");
            return 0;
        };
        debug_assert!(c.send_armed);
        c.send_armed = false;
        c.send_cancelled = false;
        let had = c.unsent();
        if res > 0 {
            c.off += (res as usize).min(c.send_len);
        } else if res != -libc::EAGAIN && res != -libc::EINTR {
            // EPIPE, ECONNRESET, cancelled after death, or a zero-byte send.
            c.dead = true;
        }
        if c.off >= c.out.len() {
            c.out.clear();
            c.off = 0;
            c.out.append(&mut c.queued);
        }
        let left = c.unsent();
        if !c.dead && left > 0 && !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
        let drained = !c.dead && !c.closing && had > 0 && left == 0;
        self.advance(id);
        if drained {
            sink.drained(id);
        }
        1
    }
}

impl Transport for UringTransport {
    fn backend(&self) -> NetBackend {
        NetBackend::Uring
    }

    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<usize> {
        let mut budget = CQE_BUDGET;
        let timeout = self.expire_closes(timeout);
        let mut n = self.run_pending(sink, &mut budget);
        n += self.free_dead(sink);
        self.push_sends();
        let wait = if n > 0 || budget == 0 { Some(Duration::ZERO) } else { timeout };
        self.enter(wait)?;
        n += self.reap(sink, &mut budget);
        n += self.free_dead(sink);
        Ok(n)
    }

    fn send(&mut self, conn: ConnId, buf: &mut Vec<u8>) {
        match self.output_of(conn, buf.is_empty()) {
            Some(dst) => dst.append_bytes(buf),
            None => buf.clear(),
        }
    }

    fn send_output(&mut self, conn: ConnId, out: &mut Output) {
        match self.output_of(conn, out.is_empty()) {
            Some(dst) => dst.append(out),
            None => out.clear(),
        }
    }

    fn unsent(&self, conn: ConnId) -> usize {
        self.conns.get(conn).filter(|c| !c.dead).map_or(0, Conn::unsent)
    }

    fn set_accepting(&mut self, on: bool, _: &mut dyn EventSink) -> io::Result<usize> {
        let Some(l) = self.listeners.first_mut() else { return Ok(0) };
        if l.paused != on {
            return Ok(0);
        }
        if !on && l.armed {
            // Its completion (ECANCELED, or what the shutdown ends it with)
            // clears `armed`; a paused listener is not armed again.
            self.ring.cancel(user_data(op::ACCEPT, 0, 0), op::CANCEL, 0, 0);
        }
        super::set_listening(&self.listeners[0].sock, on)?;
        self.listeners[0].paused = !on;
        // Resumed: armed again at the next poll.
        Ok(0)
    }

    fn set_reading(&mut self, conn: ConnId, on: bool) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.reading == on {
            return;
        }
        c.reading = on;
        if on && (c.held.count > 0 || (c.eof && !c.eof_reported)) {
            Self::touch(&mut self.pending, c, conn);
        }
        self.advance(conn);
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
        self.advance(conn);
    }

    fn shared_ring(&mut self) -> Option<&mut IoUring> {
        Some(&mut self.ring.ring)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push_sends();
        if self.ring.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for UringTransport {
    fn drop(&mut self) {
        // Cancel everything and wait for the last completions, so the kernel
        // is done with our buffers before they are freed.
        self.stopping = true;
        for i in 0..self.listeners.len() {
            // Out of LISTEN now, whatever the ring does: a cancelled accept
            // (or one the cancel missed) holds the socket open until the
            // kernel frees the request, and an abandoned ring frees its
            // requests in a worker after we return. `shutdown(2)` ends the
            // listening synchronously (and completes the accept).
            let _ = super::set_listening(&self.listeners[i].sock, false);
            if self.listeners[i].armed {
                self.ring.cancel(user_data(op::ACCEPT, i, 0), op::CANCEL, 0, 0);
            }
        }
        if self.waker_armed {
            self.ring.cancel(user_data(op::WAKE, 0, 0), op::CANCEL, 0, 0);
        }
        let ids: Vec<ConnId> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(id) {
                c.dead = true;
            }
            self.advance(id);
        }
        let deadline = Instant::now() + DROP_GRACE;
        let mut sink = NullSink;
        while self.ring.inflight > 0 && Instant::now() < deadline {
            let mut budget = usize::MAX;
            self.run_pending(&mut sink, &mut budget);
            if self.enter(Some(Duration::from_millis(50))).is_err() {
                break;
            }
            self.reap(&mut sink, &mut budget);
        }
        self.free_dead(&mut sink);
        if self.ring.inflight > 0 {
            tracing::error!(
                inflight = self.ring.inflight,
                "io_uring operations outlived the transport; leaking their buffers"
            );
            // The kernel may still read send buffers and write receive
            // buffers: keep both alive for the rest of the process.
            mem::forget(mem::take(&mut self.conns));
            self.bufs.data.leak();
        } else {
            let _ = self.ring.ring.submitter().unregister_buf_ring(BGID);
        }
    }
}
