//! Network backends behind one narrow trait. The core loop sees connections,
//! received bytes and a place to hand outgoing bytes; it never knows whether
//! epoll, io_uring or (later) DPDK moves them.

pub mod epoll;
pub mod uring;

#[cfg(test)]
mod tests;

use std::io;
use std::time::Duration;

/// A connection's handle inside one core's transport. Ids are reused only
/// after `EventSink::closed` has been delivered for the previous holder.
pub type ConnId = usize;

/// Receives what a `poll` observed.
pub trait EventSink {
    fn accepted(&mut self, conn: ConnId);
    /// Bytes arrived on `conn`. The slice is only valid during the call.
    fn received(&mut self, conn: ConnId, data: &[u8]);
    /// `conn`'s unsent output fell to zero after having been non-zero, seen
    /// during `poll`. Output that drains inside `flush` may not be reported,
    /// so consumers also check `Transport::unsent`.
    fn drained(&mut self, conn: ConnId);
    /// `conn` is gone (peer closed, error, or a requested close completed).
    fn closed(&mut self, conn: ConnId);
}

pub trait Transport {
    fn backend(&self) -> crate::node::NetBackend;

    /// Gathers network events and delivers them to `sink`. `timeout`:
    /// `Some(ZERO)` never blocks, `None` blocks until a network event or a
    /// wake-up of the core's waker. Returns the number of events delivered.
    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<usize>;

    /// Queues `buf`'s bytes for `conn` and leaves `buf` empty (its capacity
    /// may be swapped with a drained buffer so no allocation happens).
    /// Bytes for a closed connection are dropped.
    fn send(&mut self, conn: ConnId, buf: &mut Vec<u8>);

    /// Bytes queued for `conn` that the kernel has not taken yet.
    fn unsent(&self, conn: ConnId) -> usize;

    /// Stops or resumes reading `conn` (backpressure).
    fn set_reading(&mut self, conn: ConnId, on: bool);

    /// Closes `conn` once its queued output is written.
    fn close(&mut self, conn: ConnId);

    /// Pushes queued output to the kernel (one batch per loop pass).
    fn flush(&mut self) -> io::Result<()>;
}
