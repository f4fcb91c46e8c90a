//! Group commit of namespace mutations: a mutation is applied at once, its
//! record goes to the core's metadata log, and its answer (and any blocks it
//! frees) waits here until the log's writer reports the record durable.
//! Nothing blocks: the core keeps serving while the writer syncs.

use std::collections::VecDeque;

use super::exec;
use super::ring::Msg;
use super::{ReplyTo, State};
use crate::meta::log::{MetaLog, Record};
use crate::meta::{Namespaces, Release};
use crate::proto::{BlockId, Status};
use crate::transport::{ConnId, Output};

/// A core's namespaces as the node starts them: replayed from the log when
/// the node has a data directory.
pub struct MetaStart {
    pub ns: Namespaces,
    pub log: Option<MetaLog>,
    /// Persistent flash or disk blocks of this core that no object names
    /// (their put or delete did not reach the log): freed at start.
    pub orphans: Vec<BlockId>,
}

impl<T: crate::transport::Transport> super::Core<T> {
    /// Gives the core its namespaces and log, before it runs.
    pub fn with_meta(mut self, meta: MetaStart) -> Self {
        for b in meta.orphans {
            if let Some(e) = self.st.engines.iter_mut().find(|e| e.tier() == b.tier()) {
                let _ = e.free(b);
            }
        }
        self.st.ns = meta.ns;
        self.st.ns_changed = true;
        self.st.commit = Commit::new(meta.log);
        self
    }
}

/// An answer waiting for the log to reach `lsn`.
pub(super) struct Held {
    lsn: u64,
    to: ReplyTo,
    frame: Vec<u8>,
}

/// The commit state of a core.
#[derive(Default)]
pub(super) struct Commit {
    pub log: Option<MetaLog>,
    held: VecDeque<Held>,
    /// Blocks freed by a mutation, once its record is durable.
    releases: VecDeque<(u64, Release)>,
}

impl Commit {
    fn new(log: Option<MetaLog>) -> Commit {
        Commit { log, ..Commit::default() }
    }

    /// The log position after the last record (0 without a log).
    pub fn end(&self) -> u64 {
        self.log.as_ref().map_or(0, MetaLog::end)
    }

    /// Something to do without waiting for the writer: records to hand
    /// over, or answers whose records are durable (the core must not park).
    pub fn has_work(&self) -> bool {
        let Some(log) = &self.log else { return false };
        let durable = log.durable();
        log.has_unsubmitted()
            || self.held.front().is_some_and(|h| h.lsn <= durable)
            || self.releases.front().is_some_and(|r| r.0 <= durable)
            || (log.failure().is_some() && !(self.held.is_empty() && self.releases.is_empty()))
    }
}

impl State {
    /// Logs a mutation that was just applied. Without a log, nothing.
    pub(super) fn log(&mut self, rec: Record<'_>) {
        if let Some(log) = self.commit.log.as_mut() {
            log.append(&rec);
        }
    }

    /// Refuses a mutation once the log has failed: it could not be made durable.
    pub(super) fn log_usable(&self) -> Result<(), exec::Fail> {
        match self.commit.log.as_ref().and_then(MetaLog::failure) {
            None => Ok(()),
            Some(e) => {
                Err(exec::Fail(Status::Internal, format!("the metadata log failed ({e}); no changes")))
            }
        }
    }

    /// Frees a mutation's blocks once its record is durable (at once
    /// without a log): a crash before that must not leave an object that
    /// names freed blocks.
    pub(super) fn release_committed(&mut self, r: Release) {
        match &self.commit.log {
            Some(log) if log.end() > log.durable() => self.commit.releases.push_back((log.end(), r)),
            _ => self.release(r),
        }
    }

    /// Keeps `frame`, the answer to a mutation, until the log reaches `lsn`.
    pub(super) fn hold(&mut self, lsn: u64, to: ReplyTo, frame: Vec<u8>) {
        debug_assert!(self.commit.held.back().is_none_or(|h| h.lsn <= lsn), "held answers out of log order");
        self.commit.held.push_back(Held { lsn, to, frame });
    }

    /// Hands new records to the writer and sends the answers (and frees
    /// the blocks) of records that became durable. Returns work done.
    pub(super) fn run_log(&mut self) -> usize {
        let Some(log) = self.commit.log.as_mut() else { return 0 };
        let ns = &self.ns;
        let mut n = log.pump(|out| ns.snapshot(out)) as usize;
        let (durable, failed) = (log.durable(), log.failure());
        while let Some(h) = self.commit.held.pop_front() {
            if h.lsn <= durable {
                self.deliver(h.to, h.frame);
            } else if let Some(e) = &failed {
                // Applied in memory, but it will not survive a restart.
                let mut frame = Vec::new();
                let (id, opcode) = (super::frame_id(&h.frame), h.frame.get(3).copied().unwrap_or(0));
                let msg = format!("the metadata log failed ({e}): the change may not survive a restart");
                exec::respond(&mut frame, id, opcode, Status::Internal, exec::clipped(&msg).as_bytes());
                self.deliver(h.to, frame);
            } else {
                self.commit.held.push_front(h);
                break;
            }
            n += 1;
        }
        while let Some((lsn, r)) = self.commit.releases.pop_front() {
            if lsn > durable && failed.is_none() {
                self.commit.releases.push_front((lsn, r));
                break;
            }
            self.release(r);
            n += 1;
        }
        n
    }

    /// Writes the answer to a request of local connection `conn` that was
    /// answered later than it was executed (I/O, log), if the connection is
    /// still the one that sent it.
    pub(super) fn answer_local(&mut self, conn: ConnId, gen: u32, write: impl FnOnce(&mut Output)) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if !c.live || c.gen != gen {
            return;
        }
        debug_assert!(c.awaiting > 0, "late answer for conn {conn} that awaits none");
        c.awaiting = c.awaiting.saturating_sub(1);
        if !c.closing {
            write(&mut c.tx);
            self.mark_dirty(conn);
        }
    }

    /// Sends an answer that was held to its connection.
    fn deliver(&mut self, to: ReplyTo, frame: Vec<u8>) {
        match to {
            ReplyTo::Local { conn, gen } => {
                self.answer_local(conn, gen, |tx| tx.bytes_mut().extend_from_slice(&frame))
            }
            ReplyTo::Remote { origin, conn, gen } => {
                if let Some(o) = self.links.out[origin as usize].as_mut() {
                    o.push(Msg::Response { conn, gen, frame });
                }
            }
        }
    }
}
