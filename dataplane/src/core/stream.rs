//! Flash and disk writes whose body spans several socket reads stream into
//! the registered buffer the device reads (docs/protocol.md §6, "Streamed
//! writes"): once a `BlockWrite` or `BlockAppend` frame's header and key are
//! in, and the block is on a flash or disk tier of this core, every check
//! runs, a `WriteBuf` (a registered buffer with a reserved queue slot) is
//! taken, and each chunk the transport delivers is copied straight into it;
//! the write is submitted when the body is complete. The frame never
//! gathers in the connection's `partial` buffer, so a body is copied once
//! in user space (transport's receive buffer → registered buffer) instead of
//! twice (→ `partial` → registered buffer).
//!
//! A request refused by a check is answered at once and its body dropped as
//! it arrives, without a buffer. When the engine has no buffer or queue slot
//! free, or the block lives on another core (its engine is that core's), the
//! frame is gathered and executed whole as before.
//!
//! A body that stops arriving gives its buffer back: streamed connections
//! are listed (`Watch`) and looked at every `STREAM_CHECK_EVERY`; one whose
//! body did not move for `STREAM_IDLE` is demoted: what arrived of its frame
//! moves to `partial` and the frame completes gathered (`demote`).

use std::time::{Duration, Instant};

use super::{append_partial, exec, PendingIo, ReplyTo, State};
use crate::proto::{encode_header, tier, BlockKey, Header, Opcode, Status, HEADER_LEN};
use crate::storage::flash::WriteBuf;
use crate::storage::StorageError;
use crate::transport::ConnId;

/// A body being received outside `partial` (`Conn::stream`).
pub(super) struct Stream {
    h: Header,
    /// Body bytes still to come.
    left: usize,
    sink: Sink,
    /// `left` when the body was last looked at, and since when it is that
    /// (`Watch`); `None` until the first look.
    seen: Option<(usize, Instant)>,
}

/// A streamed body that receives nothing for this long gives back its
/// buffer, queue slot and I/O slot and completes gathered
/// (docs/protocol.md §9, "Streamed writes").
pub const STREAM_IDLE: Duration = Duration::from_secs(1);

/// How often streamed bodies are looked at: a body idle for `STREAM_IDLE`
/// is demoted at most this much later.
const STREAM_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The connections that streamed a body into a registered buffer since the
/// last look (a few: a core lends at most half a tier's queue to them), and
/// when to look next. Nothing is scanned while the list is empty.
#[derive(Default)]
pub(super) struct Watch {
    conns: Vec<ConnId>,
    next: Option<Instant>,
}

enum Sink {
    /// Into a registered buffer of the engine of tier `tier`; I/O slot
    /// `slot` is taken for the request.
    Write { key: BlockKey, tier: u8, slot: u32, buf: WriteBuf, filled: usize },
    /// The request was refused and answered: its body is dropped.
    Discard,
}

/// Why a frame is not streamed: it is gathered whole, as every frame was.
enum Gather {
    /// Not a flash or disk write of this core, or too little of it is in.
    NotAStream,
    /// The engine has no buffer or queue slot free now.
    Busy,
}

impl State {
    /// Starts streaming the frame `head` begins with (its header `h` is
    /// valid, the frame is not complete in `head`). Returns false to gather
    /// it as before; when true, all of `head` was taken.
    pub(super) fn start_stream(&mut self, id: ConnId, h: &Header, head: &[u8]) -> bool {
        debug_assert!(head.len() < h.frame_len());
        debug_assert!(self.conns[id].stream.is_none());
        let key_end = HEADER_LEN + h.key_len as usize;
        if !matches!(h.op(), Some(Opcode::BlockWrite | Opcode::BlockAppend))
            || head.len() < key_end
            || self.conns[id].demoted
        {
            // A demoted frame stays gathered: a client that pauses again
            // would hold a buffer again.
            return false;
        }
        let sink = match self.stream_sink(id, h, &head[..key_end]) {
            Ok(sink) => sink,
            Err(Gather::NotAStream) => return false,
            Err(Gather::Busy) => {
                self.stream_stats[tier_index(key_tier(&head[..key_end]))].fallbacks += 1;
                return false;
            }
        };
        if matches!(sink, Sink::Write { .. }) && !self.stream_watch.conns.contains(&id) {
            self.stream_watch.conns.push(id);
        }
        let c = &mut self.conns[id];
        c.stream = Some(Stream { h: *h, left: h.body_len as usize, sink, seen: None });
        c.frame_len = 0;
        self.feed_stream(id, &head[key_end..]);
        true
    }

    /// Every check the whole frame would get before execution, in the same
    /// order (`gate`, `block_refusal`, `try_execute`, `submit_io`), then the
    /// buffer. A refusal is answered here and its body discarded.
    fn stream_sink(&mut self, id: ConnId, h: &Header, head: &[u8]) -> Result<Sink, Gather> {
        let key = &head[HEADER_LEN..];
        // A key that does not decode, a DRAM block or one of another core:
        // gathered and handled as before (answered, or forwarded whole).
        let Ok(k) = BlockKey::decode(key) else { return Err(Gather::NotAStream) };
        if k.block.tier() == tier::DRAM || k.block.core() != self.cfg.id {
            return Err(Gather::NotAStream);
        }
        if self.gate(id, h, head) {
            // Refused by the connection's token (and answered).
            return Ok(Sink::Discard);
        }
        let claim = self.block_claim(id);
        if let Some(msg) = self.block_refusal(h, key, claim) {
            self.answer_here(id, h, Status::Unauthorized, msg);
            return Ok(Sink::Discard);
        }
        match self.reserve_write(h, k) {
            Ok(Some((slot, buf))) => {
                // Counted as a request when its body is in or abandoned (a
                // demoted one is counted when it executes gathered).
                self.stream_stats[tier_index(k.block.tier())].streamed += 1;
                Ok(Sink::Write { key: k, tier: k.block.tier(), slot, buf, filled: 0 })
            }
            Ok(None) => Err(Gather::Busy),
            Err(exec::Fail(status, msg)) => {
                self.answer_here(id, h, status, exec::clipped(&msg));
                Ok(Sink::Discard)
            }
        }
    }

    /// `try_execute`'s and `submit_io`'s checks of a flash or disk write,
    /// then an I/O slot and a registered buffer for it; `None` when either
    /// is not free now.
    fn reserve_write(&mut self, h: &Header, k: BlockKey) -> Result<Option<(u32, WriteBuf)>, exec::Fail> {
        let op = h.op();
        if h.flags != 0 {
            return Err(exec::Fail(Status::Malformed, "flags are only valid on PutObject".into()));
        }
        if let Some(op) = op {
            exec::check_block_write(op, &k, h.body_len as usize)?;
        }
        let e = exec::engine(&mut self.engines, k.block.tier())?;
        // The block must exist now (`submit_*_buf` checks again: it may be
        // freed while its body arrives).
        e.owner_of(k.block)?;
        let Some(&slot) = self.io_free.last() else { return Ok(None) };
        if !e.may_reserve_for_receive() {
            return Ok(None);
        }
        let buf = match op {
            Some(Opcode::BlockAppend) => e.append_buffer(k.block, k.len),
            _ => e.write_buffer(k.offset, k.len),
        };
        match buf {
            Ok(buf) => {
                self.io_free.pop();
                Ok(Some((slot, buf)))
            }
            Err(StorageError::Busy) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Takes what `data` holds of the connection's streamed body; submits
    /// the write (or drops a refused body) once it is complete. Returns the
    /// bytes taken: the rest belongs to the frames that follow.
    pub(super) fn feed_stream(&mut self, id: ConnId, data: &[u8]) -> usize {
        let Some(s) = self.conns[id].stream.as_mut() else { return 0 };
        let n = s.left.min(data.len());
        if let Sink::Write { buf, filled, .. } = &mut s.sink {
            buf.as_mut_slice()[*filled..*filled + n].copy_from_slice(&data[..n]);
            *filled += n;
        }
        s.left -= n;
        if s.left == 0 {
            if let Some(s) = self.conns[id].stream.take() {
                self.finish_stream(id, s);
            }
        }
        n
    }

    /// The body is in: hands the write to its engine (never `Busy`: the
    /// buffer holds a queue slot).
    fn finish_stream(&mut self, id: ConnId, s: Stream) {
        let Sink::Write { key, tier, slot, buf, filled } = s.sink else { return };
        debug_assert_eq!(filled, buf.len());
        self.requests += 1;
        let token = u64::from(slot);
        let r = match exec::engine(&mut self.engines, tier) {
            Ok(e) if s.h.op() == Some(Opcode::BlockAppend) => e.submit_append_buf(token, key.block, buf),
            Ok(e) => e.submit_write_buf(token, key.block, key.offset, buf),
            Err(exec::Fail(..)) => Err(StorageError::NotFound),
        };
        match r {
            Ok(()) => {
                let gen = self.conns[id].gen;
                debug_assert!(self.io[slot as usize].is_none(), "I/O slot {slot} in use");
                let p = PendingIo::new(ReplyTo::Local { conn: id, gen }, s.h.request_id, s.h.opcode, 1);
                self.io[slot as usize] = Some(p);
                self.conns[id].awaiting += 1;
            }
            Err(err) => {
                // The block was freed while its body arrived, say.
                self.io_free.push(slot);
                self.io_freed = true;
                let c = &mut self.conns[id];
                exec::respond_io(c.tx.bytes_mut(), s.h.request_id, s.h.opcode, Err(err));
                self.mark_dirty(id);
            }
        }
    }

    /// The connection closes: a body it was streaming gives back its
    /// buffer, queue slot and I/O slot, unsubmitted.
    pub(super) fn drop_stream(&mut self, id: ConnId) {
        let Some(s) = self.conns.get_mut(id).and_then(|c| c.stream.take()) else { return };
        if let Sink::Write { slot, tier, .. } = s.sink {
            self.requests += 1;
            self.io_free.push(slot);
            self.io_freed = true;
            self.stream_stats[tier_index(tier)].abandoned += 1;
        }
    }
}

impl State {
    /// When a parked core must wake to look at streamed bodies (`None`:
    /// none is streaming).
    pub(super) fn stream_due(&self) -> Option<Instant> {
        let w = &self.stream_watch;
        if w.conns.is_empty() {
            None
        } else {
            Some(w.next.unwrap_or_else(Instant::now))
        }
    }

    /// Demotes the streamed bodies that received nothing for `STREAM_IDLE`
    /// (looked at every `STREAM_CHECK_EVERY`; one branch per pass while no
    /// body streams). Returns how many were demoted.
    pub(super) fn demote_idle_streams(&mut self, now: Instant) -> usize {
        let w = &mut self.stream_watch;
        if w.conns.is_empty() || w.next.is_some_and(|t| now < t) {
            return 0;
        }
        w.next = Some(now + STREAM_CHECK_EVERY);
        let mut demoted = 0;
        let mut i = 0;
        while i < self.stream_watch.conns.len() {
            let id = self.stream_watch.conns[i];
            let s = self.conns.get_mut(id).and_then(|c| c.stream.as_mut());
            let Some(s) = s.filter(|s| matches!(s.sink, Sink::Write { .. })) else {
                // Complete, or closed: nothing held any more.
                self.stream_watch.conns.swap_remove(i);
                continue;
            };
            match s.seen {
                Some((left, since)) if left == s.left => {
                    if now.saturating_duration_since(since) >= STREAM_IDLE {
                        self.demote(id);
                        demoted += 1;
                        self.stream_watch.conns.swap_remove(i);
                        continue;
                    }
                }
                _ => s.seen = Some((s.left, now)),
            }
            i += 1;
        }
        demoted
    }

    /// Moves what arrived of a streamed frame (header, key, body so far)
    /// into the connection's `partial`, where the rest gathers as for any
    /// frame (its length was checked against the limits with its header),
    /// and gives back the buffer, its queue slot and the I/O slot.
    fn demote(&mut self, id: ConnId) {
        let c = &mut self.conns[id];
        let Some(s) = c.stream.take() else { return };
        let Sink::Write { key, tier, slot, mut buf, filled } = s.sink else {
            c.stream = Some(s);
            return;
        };
        debug_assert!(c.partial.is_empty());
        let frame = s.h.frame_len();
        let mut head = [0u8; HEADER_LEN];
        encode_header(&s.h, &mut head);
        // The key decoded from exactly these 16 bytes (`BlockKey::decode`).
        append_partial(&mut c.partial, &head, frame);
        append_partial(&mut c.partial, &key.encode(), frame);
        append_partial(&mut c.partial, &buf.as_mut_slice()[..filled], frame);
        c.frame_len = frame;
        c.demoted = true;
        drop(buf);
        self.io_free.push(slot);
        self.io_freed = true;
        self.stream_stats[tier_index(tier)].demoted += 1;
    }
}

/// Counts of the streaming path, published with the core's figures.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct StreamStats {
    /// Writes whose body streamed into a registered buffer.
    pub streamed: u64,
    /// Writes gathered whole because no buffer or slot was free.
    pub fallbacks: u64,
    /// Streamed bodies whose connection closed before they were complete.
    pub abandoned: u64,
    /// Streamed bodies that stopped arriving for `STREAM_IDLE` and were
    /// gathered from then on.
    pub demoted: u64,
}

impl StreamStats {
    pub(super) fn fill(&self, r: &mut crate::report::TierReport) {
        (r.streamed_writes, r.stream_fallbacks, r.streams_abandoned, r.streams_demoted) =
            (self.streamed, self.fallbacks, self.abandoned, self.demoted);
    }
}

/// Where a tier's counts are in `State::stream_stats`.
pub(super) fn tier_index(t: u8) -> usize {
    usize::from(t.min(tier::DISK))
}

/// The tier of the block a (decodable) block key names.
fn key_tier(head: &[u8]) -> u8 {
    BlockKey::decode(&head[HEADER_LEN..]).map_or(tier::DRAM, |k| k.block.tier())
}

/// Bytes missing from `partial` before its first frame's header and key are
/// in (0 when they are, or when the header is invalid: parsing answers it).
pub(super) fn head_missing(partial: &[u8], limits: &crate::proto::Limits) -> usize {
    if partial.len() < HEADER_LEN {
        return HEADER_LEN - partial.len();
    }
    match crate::proto::decode_header(partial, limits, true) {
        Ok(Some(h)) => (HEADER_LEN + h.key_len as usize).saturating_sub(partial.len()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_frame, Limits};

    /// Only the bytes that complete a header and its key are asked for.
    #[test]
    fn head_missing_counts_to_the_end_of_the_key() {
        let limits = Limits::new(1 << 20);
        let mut f = Vec::new();
        encode_frame(&mut f, &Header::request(Opcode::BlockWrite, 0, 7, 16, 1000), &[1; 16], &[2; 1000]);
        assert_eq!(head_missing(&f[..1], &limits), HEADER_LEN - 1);
        assert_eq!(head_missing(&f[..HEADER_LEN], &limits), 16);
        assert_eq!(head_missing(&f[..HEADER_LEN + 15], &limits), 1);
        assert_eq!(head_missing(&f[..HEADER_LEN + 16], &limits), 0);
        assert_eq!(head_missing(&f, &limits), 0);
        // An invalid header: nothing to wait for, parsing answers it.
        assert_eq!(head_missing(&[0xff; HEADER_LEN], &limits), 0);
    }
}
