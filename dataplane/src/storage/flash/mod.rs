//! The flash and disk tiers: one `FlashEngine` per core and tier, storing
//! blocks in the core's region of a file or block device with O_DIRECT I/O
//! on io_uring, driven from the core's run loop (no threads, no blocking
//! calls after `open`). Flash and disk run the same engine with a different
//! `TierPolicy`.
//!
//! # A region on disk
//!
//! ```text
//! region start
//! | superblock   | header table                  | pad | block 0 | block 1 | ...
//! | 4 KiB        | slots x 64 B, rounded to 4 KiB |     | (each `block_size`, aligned
//! |              |                                |     |  to min(block_size, 1 MiB))
//! ```
//!
//! - The superblock (`layout::Superblock`) records the layout version,
//!   block size, slot count, region index/start/length, tier, an epoch
//!   bumped on every open, and a clean flag (cleared at open, set by a
//!   clean close), with a checksum. Opening a region formatted with another
//!   block size, size or index is refused with an error that says which.
//! - A header entry (`layout::Entry`) exists only for a *persistent* block
//!   (`mark_persistent`): owner, generation, length, checksum. Every other
//!   slot's entry is zero. Entries are written a 4 KiB sector at a time,
//!   built from memory, after an fdatasync so the data they describe is
//!   durable first, and with RWF_DSYNC. A failed sector write is retried
//!   (`HDR_WRITE_ATTEMPTS` in a row), each time after a backoff
//!   (`hdr_retry_delay`: 10 ms doubling, at most 1 s) that a later pass of
//!   the core notices, never a sleep; a freed persistent block's slot is
//!   reused only once its cleared entry is on disk, or a crash could bring
//!   the old entry back over a new block.
//!
//! # Restart
//!
//! Opening an existing region keeps the persistent blocks
//! (`recovered_persistent`: same id, owner, length and bytes) and treats
//! every other slot as free: ephemeral data is never served after a
//! restart. Generations carry the epoch in their top 8 bits and a per-run
//! counter in the low 16 (`layout::generation`), so ids from the previous
//! 255 runs are stale (`NotFound`). A slot whose counter runs out is retired
//! for the rest of the run (after 65,536 reuses) and comes back at the next
//! open.
//!
//! # Writes that are not sector aligned
//!
//! O_DIRECT moves whole 4 KiB sectors. A write whose first or last sector
//! holds bytes it does not replace reads those sectors first (into a
//! per-request scratch sector), merges, and writes the covering sectors
//! back. The block's length lives in memory (and in the header entry of a
//! persistent block), so reads return exactly the bytes written.
//!
//! # Sharing the core's ring
//!
//! `open` gives the engine its own ring (IOPOLL when the device supports
//! it — probed with one polled read — plus a small interrupt ring for the
//! fsyncs and header writes IOPOLL cannot do). `open_on` puts it on the
//! core's network ring instead: completions are told apart by the tag in
//! their user data (`ring::tag`: bit 63 = storage, bits 56..62 = the
//! engine, by convention its tier number).

mod backing;
mod engine;
mod layout;
mod pool;
mod rates;
mod ring;
mod slots;

#[cfg(test)]
mod tests;

pub use backing::{parse_spec, prepare_backing, Backing, Region};
pub use engine::{
    Completion, FlashConfig, FlashEngine, FlashUsage, OpenReport, Reformat, RingSlots, TierPolicy,
};
#[cfg(test)]
pub(crate) use pool::testing;
pub use pool::{ReadBuf, WriteBuf};
pub use rates::{IoRates, IoWindow};
pub use ring::{tag, IoMode};
