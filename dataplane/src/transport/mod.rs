//! Network backends behind one narrow trait. The core loop sees connections,
//! received bytes and a place to hand outgoing bytes; it never knows whether
//! epoll, io_uring or DPDK (feature `dpdk`) moves them.

#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod epoll;
mod output;
pub mod uring;

pub use output::Output;

#[cfg(test)]
mod tests;

use std::io;
use std::time::{Duration, Instant};

/// A connection's handle inside one core's transport. Ids are reused only
/// after `EventSink::closed` has been delivered for the previous holder.
pub type ConnId = usize;

/// Backlog of the node's listeners (and of a shared listener resumed by
/// `Transport::set_accepting`).
pub const LISTEN_BACKLOG: i32 = 1024;

/// Takes a listening socket out of its `SO_REUSEPORT` group (`on` false:
/// `shutdown(SHUT_RD)` stops it listening, keeping its bound address and
/// its descriptor, so event registrations stay) or puts it back (`listen`
/// again). New connections then hash over the group's other sockets;
/// connections still queued on it when it stops are reset.
pub(crate) fn set_listening(l: &impl std::os::fd::AsFd, on: bool) -> io::Result<()> {
    let s = socket2::SockRef::from(l);
    if on {
        s.listen(LISTEN_BACKLOG)
    } else {
        s.shutdown(std::net::Shutdown::Read)
    }
}

/// Receives what a `poll` observed.
pub trait EventSink {
    fn accepted(&mut self, conn: ConnId);
    /// Bytes arrived on `conn`. The slice is only valid during the call.
    fn received(&mut self, conn: ConnId, data: &[u8]);
    /// The peer finished sending (it shut its write side, or closed): every
    /// byte it sent has been delivered, and nothing more will be. The
    /// connection stays open for output, so a client that half-closes after
    /// its requests still gets its replies; the consumer sends what it owes
    /// and then calls `Transport::close`, which it must do eventually.
    /// Delivered at most once per connection, only while reading is on, and
    /// never after `close` was requested.
    fn peer_closed(&mut self, conn: ConnId);
    /// `conn`'s unsent output fell to zero after having been non-zero, seen
    /// during `poll`. Output that drains inside `flush` may not be reported,
    /// so consumers also check `Transport::unsent`.
    fn drained(&mut self, conn: ConnId);
    /// `conn` is gone (a requested close completed, or an error or reset
    /// ended it) and its id may be reused.
    fn closed(&mut self, conn: ConnId);
    /// A storage operation on the transport's ring completed
    /// (`Transport::shared_ring`; its user data has
    /// `storage::flash::tag::is_storage`). Only consumers that put storage
    /// operations on that ring receive these.
    fn storage(&mut self, user_data: u64, result: i32) {
        debug_assert!(false, "storage completion {user_data:#x} ({result}) for a sink that submits none");
    }
}

/// Bounds on a requested close (see `Transport::close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseTimeouts {
    /// From the close request until queued output is written; covers a peer
    /// that stops reading.
    pub drain: Duration,
    /// From our end of output until the peer's EOF; covers a peer that never
    /// closes.
    pub linger: Duration,
}

impl CloseTimeouts {
    pub const DEFAULT: CloseTimeouts =
        CloseTimeouts { drain: Duration::from_secs(10), linger: Duration::from_secs(2) };
}

/// The connections whose close is under way, for their backend to check
/// deadlines in O(closing), and only once the earliest may have passed. Each
/// listed connection keeps its slot, so unlisting is O(1).
pub(crate) struct CloseList {
    ids: Vec<ConnId>,
    /// No listed deadline is earlier. Unlisting or postponing leaves it early,
    /// which costs one needless check.
    earliest: Option<Instant>,
}

impl CloseList {
    pub(crate) fn new() -> CloseList {
        CloseList { ids: Vec::new(), earliest: None }
    }

    /// Lists `id`; returns the slot its owner keeps for `remove`.
    pub(crate) fn insert(&mut self, id: ConnId, deadline: Instant) -> usize {
        self.note(deadline);
        self.ids.push(id);
        self.ids.len() - 1
    }

    /// A listed connection has a new deadline.
    pub(crate) fn note(&mut self, deadline: Instant) {
        self.earliest = Some(self.earliest.map_or(deadline, |e| e.min(deadline)));
    }

    /// Unlists the connection in `slot`. Returns the connection moved into
    /// `slot`, whose owner must record its new slot.
    pub(crate) fn remove(&mut self, slot: usize) -> Option<ConnId> {
        assert!(slot < self.ids.len(), "close slot {slot} out of range");
        self.ids.swap_remove(slot);
        if self.ids.is_empty() {
            self.earliest = None;
        }
        self.ids.get(slot).copied()
    }

    /// Once a deadline may have passed, appends to `expired` every listed
    /// connection whose deadline (`deadline(id)`; `None` for one already
    /// dying) is past and re-arms the earliest of the rest. Returns `timeout`
    /// shortened so a parked poll wakes for that earliest deadline. The
    /// caller ends the expired connections; both backends share this scan.
    pub(crate) fn expire(
        &mut self,
        timeout: Option<Duration>,
        deadline: impl Fn(ConnId) -> Option<Instant>,
        expired: &mut Vec<ConnId>,
    ) -> Option<Duration> {
        if self.ids.is_empty() {
            return timeout;
        }
        let now = Instant::now();
        if self.earliest.is_some_and(|e| e <= now) {
            let mut earliest: Option<Instant> = None;
            for &id in &self.ids {
                match deadline(id) {
                    Some(d) if d <= now => expired.push(id),
                    Some(d) => earliest = Some(earliest.map_or(d, |e| e.min(d))),
                    None => {}
                }
            }
            self.earliest = earliest;
        }
        self.wait(now, timeout)
    }

    /// `timeout`, shortened so a parked poll wakes for the earliest deadline.
    pub(crate) fn wait(&self, now: Instant, timeout: Option<Duration>) -> Option<Duration> {
        match self.earliest {
            None => timeout,
            Some(e) => {
                let d = e.saturating_duration_since(now);
                Some(timeout.map_or(d, |t| t.min(d)))
            }
        }
    }
}

pub trait Transport {
    fn backend(&self) -> crate::node::NetBackend;

    /// Gathers network events and delivers them to `sink`. `timeout`:
    /// `Some(ZERO)` never blocks, `None` blocks until a network event or a
    /// wake-up of the core's waker, or until the nearest close deadline while
    /// closes are under way. Returns the number of events delivered.
    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<usize>;

    /// Queues `buf`'s bytes for `conn` and leaves `buf` empty (its capacity
    /// may be swapped with a drained buffer so no allocation happens).
    /// Bytes for a closed connection are dropped.
    fn send(&mut self, conn: ConnId, buf: &mut Vec<u8>);

    /// Queues `out` (bytes with storage read buffers spliced in) for `conn`
    /// and leaves it empty. Backends that gather send each buffer from where
    /// it is and hold it until the kernel took its bytes; this default copies
    /// the buffers into the byte stream.
    fn send_output(&mut self, conn: ConnId, out: &mut Output) {
        self.send(conn, out.flatten());
        out.clear();
    }

    /// Bytes queued for `conn` that the kernel has not taken yet.
    fn unsent(&self, conn: ConnId) -> usize;

    /// Stops or resumes reading `conn` (backpressure).
    fn set_reading(&mut self, conn: ConnId, on: bool);

    /// Closes `conn` gracefully. Input is no longer delivered (it is read
    /// and discarded, so a peer still sending cannot stall the close, nor
    /// make the kernel answer with a reset that destroys our last bytes).
    /// Queued output is written; then our write side is shut, so the peer
    /// sees EOF right after our last byte, and the connection is closed at the
    /// peer's EOF. `CloseTimeouts` bound both waits; `closed` follows either
    /// way. Output sent after `close` may be dropped.
    fn close(&mut self, conn: ConnId);

    /// Pushes queued output to the kernel (one batch per loop pass).
    fn flush(&mut self) -> io::Result<()>;

    /// Stops (`false`) or resumes taking new connections on the node's
    /// shared port (kernel transports: listener 0, in its `SO_REUSEPORT`
    /// group with the other cores'): a core turned off leaves the group, so
    /// the kernel spreads new connections over the cores still on (DPDK: its
    /// listeners there go, and the other cores' steering sends new flows to
    /// cores that are on). Connections already accepted are served as
    /// before; the core's own port keeps listening (a client that names the
    /// core wants its state). Returns the connections accepted while pausing
    /// (those completed before it).
    fn set_accepting(&mut self, on: bool, sink: &mut dyn EventSink) -> io::Result<usize> {
        let _ = (on, sink);
        Ok(0)
    }

    /// The io_uring this transport runs on, when storage engines may share
    /// it (`FlashEngine::open_on`, at the slots `uring::STORAGE_SLOTS`
    /// reserves): the consumer pushes their submissions into its queue
    /// before `flush` or `poll`, which submit them with the network's, and
    /// gets their completions through `EventSink::storage`. A core then
    /// polls, and sleeps on, one completion queue.
    fn shared_ring(&mut self) -> Option<&mut io_uring::IoUring> {
        None
    }
}
