//! The engine's side of io_uring: user-data tags that let storage and
//! network completions share one ring, the rings an engine builds for
//! itself, and the IOPOLL probe.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

/// How an engine's I/O reaches the device and comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// Submissions by `io_uring_enter`, completions by interrupt.
    Interrupt,
    /// A kernel thread polls the submission queue.
    Sqpoll,
    /// Completions are polled from the device's queues (no interrupts);
    /// the core's poll reaps them.
    Iopoll,
    /// Both.
    SqpollIopoll,
}

impl IoMode {
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Interrupt => "interrupt",
            IoMode::Sqpoll => "sqpoll",
            IoMode::Iopoll => "iopoll",
            IoMode::SqpollIopoll => "sqpoll+iopoll",
        }
    }

    pub fn iopoll(self) -> bool {
        matches!(self, IoMode::Iopoll | IoMode::SqpollIopoll)
    }

    pub fn sqpoll(self) -> bool {
        matches!(self, IoMode::Sqpoll | IoMode::SqpollIopoll)
    }

    fn of(sqpoll: bool, iopoll: bool) -> IoMode {
        match (sqpoll, iopoll) {
            (false, false) => IoMode::Interrupt,
            (true, false) => IoMode::Sqpoll,
            (false, true) => IoMode::Iopoll,
            (true, true) => IoMode::SqpollIopoll,
        }
    }
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// User-data tags.
///
/// Layout of a storage completion's 64-bit user data:
///
/// ```text
///  63  | 62..56     | 55..32            | 31   | 30..0
///  1   | engine tag | sequence (24 bit) | meta | slot in the engine's table
/// ```
///
/// Bit 63 set means "storage"; the network transport's kinds (the top byte,
/// 1..=6 in `transport::uring`) keep it clear, so a core polling one ring
/// sends each completion to its owner by that bit, and storage completions
/// to the engine named by the tag (by convention the tier number:
/// `tier::FLASH`, `tier::DISK`). The sequence number changes every time a
/// table slot is reused, so a completion can never be taken for a later
/// request's. `meta` marks the header-flush table rather than requests.
pub mod tag {
    pub const STORAGE: u64 = 1 << 63;
    pub const MAX_ENGINE: u8 = 0x7f;
    pub const SEQ_MASK: u32 = 0x00ff_ffff;
    const META: u64 = 1 << 31;

    pub fn encode(engine: u8, seq: u32, meta: bool, slot: u32) -> u64 {
        debug_assert!(engine <= MAX_ENGINE && slot < (1 << 31));
        STORAGE
            | (u64::from(engine & MAX_ENGINE) << 56)
            | (u64::from(seq & SEQ_MASK) << 32)
            | if meta { META } else { 0 }
            | u64::from(slot & 0x7fff_ffff)
    }

    /// Whether a completion belongs to a storage engine.
    pub fn is_storage(user_data: u64) -> bool {
        user_data & STORAGE != 0
    }

    /// The engine a storage completion belongs to.
    pub fn engine(user_data: u64) -> u8 {
        (user_data >> 56) as u8 & MAX_ENGINE
    }

    /// (sequence, meta, slot).
    pub fn decode(user_data: u64) -> (u32, bool, u32) {
        ((user_data >> 32) as u32 & SEQ_MASK, user_data & META != 0, user_data as u32 & 0x7fff_ffff)
    }
}

/// How long an idle SQPOLL thread spins before sleeping.
const SQPOLL_IDLE_MS: u32 = 50;

pub fn build(entries: u32, sqpoll: bool, iopoll: bool) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(entries * 2);
    if sqpoll {
        b.setup_sqpoll(SQPOLL_IDLE_MS);
    }
    if iopoll {
        b.setup_iopoll();
    }
    b.build(entries)
}

/// The rings an engine made for itself: `data` (IOPOLL when the device
/// polls), and, when `data` is IOPOLL, `meta` for what IOPOLL rings cannot
/// do (fsync; and header writes, kept with their fsyncs).
pub struct OwnRings {
    pub data: IoUring,
    pub meta: Option<IoUring>,
    pub mode: IoMode,
    /// What was asked and the kernel refused ("sqpoll refused: …"), when
    /// `mode` has less polling than asked.
    pub refused: Option<String>,
}

impl OwnRings {
    /// Builds the rings; tries SQPOLL when asked and IOPOLL when `iopoll`
    /// (the probe's verdict), falling back to what the kernel allows.
    pub fn new(entries: u32, sqpoll: bool, iopoll: bool) -> io::Result<OwnRings> {
        let mut tries = Vec::with_capacity(4);
        for t in [(sqpoll, iopoll), (false, iopoll), (sqpoll, false), (false, false)] {
            if !tries.contains(&t) {
                tries.push(t);
            }
        }
        let mut last: Option<io::Error> = None;
        for (sq, io) in tries {
            match build(entries, sq, io) {
                Ok(data) => {
                    let meta = if io { Some(build(16, false, false)?) } else { None };
                    let mut refused = None;
                    if (sq, io) != (sqpoll, iopoll) {
                        let error = last.as_ref().map(|e| e.to_string()).unwrap_or_default();
                        tracing::warn!(sqpoll = sq, iopoll = io, %error, "storage ring set up with less polling than asked");
                        let lost: Vec<&str> = [(sqpoll && !sq, "sqpoll"), (iopoll && !io, "iopoll")]
                            .into_iter()
                            .filter_map(|(lost, name)| lost.then_some(name))
                            .collect();
                        refused = Some(format!("{} refused: {error}", lost.join("+")));
                    }
                    return Ok(OwnRings { data, meta, mode: IoMode::of(sq, io), refused });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no ring")))
    }
}

/// Whether polled completions work for `file` at `offset`: one 4 KiB
/// O_DIRECT read on an IOPOLL ring. Devices without poll queues (most
/// virtual disks, loop devices) fail it with EOPNOTSUPP; a completion not
/// seen within a second counts as "no".
pub fn probe_iopoll(file: &File, offset: u64) -> Result<(), String> {
    let mut ring = build(4, false, true).map_err(|e| format!("IOPOLL ring refused: {e}"))?;
    let mut buf = crate::storage::Arena::new(4096).map_err(|e| format!("probe buffer: {e}"))?;
    let e = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_slice().as_mut_ptr(), 4096)
        .offset(offset)
        .build()
        .user_data(1);
    // SAFETY: the read writes `buf`; we wait for its completion below, or
    // leak both the ring and `buf` so nothing reuses the memory under it.
    if unsafe { ring.submission().push(&e) }.is_err() {
        return Err("submission queue full".into());
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let verdict = loop {
        // An IOPOLL ring reaps by polling inside enter (GETEVENTS, which
        // `submit` sets for such rings); with 0 wanted it does not block.
        if let Err(e) = ring.submit_and_wait(0) {
            if !matches!(e.raw_os_error(), Some(nix::libc::EINTR | nix::libc::EAGAIN | nix::libc::EBUSY)) {
                break None;
            }
        }
        if let Some(c) = ring.completion().next() {
            break Some(match c.result() {
                4096 => Ok(()),
                r if r < 0 => Err(format!("polled read failed: {}", io::Error::from_raw_os_error(-r))),
                r => Err(format!("polled read returned {r} bytes")),
            });
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::yield_now();
    };
    match verdict {
        Some(v) => v,
        None => {
            std::mem::forget(ring);
            std::mem::forget(buf);
            Err("polled read did not complete within 1 s".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tag;

    #[test]
    fn tags_round_trip_and_stay_clear_of_the_network() {
        for (engine, seq, meta, slot) in
            [(1u8, 0u32, false, 0u32), (2, 0xff_ffff, true, 0x7fff_ffff), (127, 5, false, 9)]
        {
            let ud = tag::encode(engine, seq, meta, slot);
            assert!(tag::is_storage(ud));
            assert_eq!(tag::engine(ud), engine);
            assert_eq!(tag::decode(ud), (seq, meta, slot));
        }
        // The network transport's tags: kind 1..=6 in the top byte.
        for kind in 1u64..=6 {
            assert!(!tag::is_storage(kind << 56 | 0xffff_ffff_ffff));
        }
    }
}
