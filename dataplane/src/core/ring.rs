//! Messages between cores, on one bounded SPSC ring per ordered pair of cores.
//! A message carries ownership of its buffer; bytes are not copied again.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use crate::proto::BlockId;
use crate::storage::StorageError;
use crate::transport::ConnId;

pub enum Msg {
    /// A whole request frame for the receiving core to execute; the reply
    /// goes back to `origin` for connection `conn` (generation `gen`);
    /// `claim` is what the connection's token allows with blocks.
    Request { origin: u8, conn: ConnId, gen: u32, claim: super::access::BlockClaim, frame: Vec<u8> },
    /// A whole response frame for connection `conn` on the receiving core.
    Response { conn: ConnId, gen: u32, frame: Vec<u8> },
    /// Blocks of a deleted object that live on the receiving core.
    FreeBlocks(Vec<BlockId>),
    /// A job was deregistered: free the blocks of `owner` (`storage::job_owner`)
    /// on the receiving core except `keep`.
    FreeJob { owner: crate::storage::Owner, keep: Arc<HashSet<BlockId>> },
    /// Flash or disk blocks of a PERSIST object, on the receiving core: mark
    /// them persistent, then answer `Persisted` with `slot` to `origin`.
    Persist { origin: u8, slot: u32, blocks: Vec<BlockId> },
    /// Every block of a `Persist` is marked on the device, or the first
    /// failure; `slot` is the PutObject's I/O slot on the receiving core.
    Persisted { slot: u32, result: Result<(), StorageError> },
}

/// Outbound side towards one peer: the ring plus an overflow queue used only
/// for messages that must not be refused (responses, frees).
pub struct Outbox {
    pub ring: Producer<Msg>,
    pub overflow: VecDeque<Msg>,
    /// Something was pushed this pass: wake the peer if it is parked.
    pub pushed: bool,
}

impl Outbox {
    /// Pushes now or refuses (for requests, whose sender can wait).
    pub fn try_push(&mut self, m: Msg) -> Result<(), Msg> {
        if !self.overflow.is_empty() {
            return Err(m);
        }
        match self.ring.push(m) {
            Ok(()) => {
                self.pushed = true;
                Ok(())
            }
            Err(rtrb::PushError::Full(m)) => Err(m),
        }
    }

    /// Pushes now or queues behind the ring.
    pub fn push(&mut self, m: Msg) {
        if let Err(m) = self.try_push(m) {
            self.overflow.push_back(m);
        }
    }

    /// Moves queued overflow into the ring; returns how many moved.
    pub fn drain_overflow(&mut self) -> usize {
        let mut n = 0;
        while let Some(m) = self.overflow.pop_front() {
            match self.ring.push(m) {
                Ok(()) => n += 1,
                Err(rtrb::PushError::Full(m)) => {
                    self.overflow.push_front(m);
                    break;
                }
            }
        }
        if n > 0 {
            self.pushed = true;
        }
        n
    }
}

/// Ring ends of one core: `out[j]` towards core j, `inbound` from every other core.
pub struct Links {
    pub out: Vec<Option<Outbox>>,
    pub inbound: Vec<Consumer<Msg>>,
}

/// Builds the full mesh: n*(n-1) rings of `capacity` messages each.
pub fn mesh(n: usize, capacity: usize) -> Vec<Links> {
    let mut links: Vec<Links> =
        (0..n).map(|_| Links { out: (0..n).map(|_| None).collect(), inbound: Vec::new() }).collect();
    for from in 0..n {
        for to in 0..n {
            if from == to {
                continue;
            }
            let (p, c) = RingBuffer::new(capacity);
            links[from].out[to] = Some(Outbox { ring: p, overflow: VecDeque::new(), pushed: false });
            links[to].inbound.push(c);
        }
    }
    links
}
