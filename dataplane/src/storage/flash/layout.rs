//! The on-disk layout of one region: where the superblock, the slot header
//! table and the blocks lie, and the byte layouts of the superblock and of a
//! header entry. Pure functions; no I/O here.

use crate::proto::{fnv1a, BlockId};

/// The unit of every direct I/O: offsets and lengths are multiples of it.
pub const SECTOR: u64 = 4096;
pub const SECTOR_USIZE: usize = SECTOR as usize;
/// First 8 bytes of a formatted region.
pub const MAGIC: [u8; 8] = *b"POLLENBK";
pub const VERSION: u32 = 1;
/// Bytes of one slot header entry.
pub const ENTRY_LEN: usize = 64;
/// Header entries in one sector.
pub const ENTRIES_PER_SECTOR: u32 = (SECTOR as usize / ENTRY_LEN) as u32;
/// `state` of an entry describing a persistent block ("PRST").
const ENTRY_PERSIST: u32 = 0x5453_5250;
/// Blocks are placed at a multiple of their size from the region start, up
/// to this alignment, so device pages and erase units line up.
const MAX_DATA_ALIGN: u64 = 1 << 20;

/// Where things are inside a region (offsets relative to its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub slots: u32,
    /// The header table starts right after the superblock.
    pub header_off: u64,
    pub header_len: u64,
    pub data_off: u64,
}

impl Geometry {
    /// The most slots a region of `region_len` bytes holds, or `None` if not
    /// even one fits. `block_size` is a power of two of at least a sector.
    pub fn for_region(region_len: u64, block_size: u32) -> Option<Geometry> {
        assert!(block_size.is_power_of_two() && block_size as u64 >= SECTOR);
        let bs = block_size as u64;
        let mut n =
            (region_len.saturating_sub(SECTOR) / (bs + ENTRY_LEN as u64)).min(BlockId::MAX_INDEX as u64 + 1);
        // The estimate ignores rounding; step down until the layout fits.
        loop {
            if n == 0 {
                return None;
            }
            let g = Self::with_slots(n as u32, block_size);
            if g.end() <= region_len {
                return Some(g);
            }
            n -= 1;
        }
    }

    fn with_slots(slots: u32, block_size: u32) -> Geometry {
        let header_len = round_up(slots as u64 * ENTRY_LEN as u64, SECTOR);
        let align = (block_size as u64).min(MAX_DATA_ALIGN);
        let data_off = round_up(SECTOR + header_len, align);
        Geometry { block_size, slots, header_off: SECTOR, header_len, data_off }
    }

    /// Bytes of the region the layout uses.
    pub fn end(&self) -> u64 {
        self.data_off + self.slots as u64 * self.block_size as u64
    }

    /// Offset of slot `i`'s data, relative to the region start.
    pub fn block_off(&self, i: u32) -> u64 {
        debug_assert!(i < self.slots);
        self.data_off + i as u64 * self.block_size as u64
    }

    pub fn header_sectors(&self) -> u32 {
        (self.header_len / SECTOR) as u32
    }

    /// Offset of header sector `s`, relative to the region start.
    pub fn header_sector_off(&self, s: u32) -> u64 {
        debug_assert!(s < self.header_sectors());
        self.header_off + s as u64 * SECTOR
    }
}

pub fn round_up(v: u64, to: u64) -> u64 {
    debug_assert!(to.is_power_of_two());
    (v + to - 1) & !(to - 1)
}

pub fn round_down(v: u64, to: u64) -> u64 {
    debug_assert!(to.is_power_of_two());
    v & !(to - 1)
}

/// Sector 0 of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub block_size: u32,
    pub slots: u32,
    pub region_index: u32,
    pub region_start: u64,
    pub region_len: u64,
    /// Bumped on every open; its low 8 bits are folded into generations.
    pub epoch: u32,
    /// Set by a clean close, cleared by an open.
    pub clean: bool,
    pub tier: u8,
    pub header_off: u64,
    pub data_off: u64,
}

/// Why a sector is not a usable superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockError {
    /// No magic: never formatted (or not ours).
    Unformatted,
    /// Our magic but a bad checksum.
    Corrupt,
}

impl Superblock {
    /// Layout (little-endian): magic [8], version u32 @8, block size u32 @12,
    /// slots u32 @16, region index u32 @20, region start u64 @24, region
    /// length u64 @32, epoch u32 @40, clean u32 @44, tier u32 @48, reserved
    /// u32 @52, header offset u64 @56, data offset u64 @64, zeros, FNV-1a of
    /// bytes 0..4088 as u64 @4088.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), SECTOR_USIZE);
        out.fill(0);
        out[0..8].copy_from_slice(&MAGIC);
        put32(out, 8, self.version);
        put32(out, 12, self.block_size);
        put32(out, 16, self.slots);
        put32(out, 20, self.region_index);
        put64(out, 24, self.region_start);
        put64(out, 32, self.region_len);
        put32(out, 40, self.epoch);
        put32(out, 44, self.clean as u32);
        put32(out, 48, self.tier as u32);
        put64(out, 56, self.header_off);
        put64(out, 64, self.data_off);
        let sum = fnv1a(&out[..SECTOR_USIZE - 8]);
        put64(out, SECTOR_USIZE - 8, sum);
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        assert_eq!(b.len(), SECTOR_USIZE);
        if b[0..8] != MAGIC {
            return Err(SuperblockError::Unformatted);
        }
        if get64(b, SECTOR_USIZE - 8) != fnv1a(&b[..SECTOR_USIZE - 8]) {
            return Err(SuperblockError::Corrupt);
        }
        Ok(Superblock {
            version: get32(b, 8),
            block_size: get32(b, 12),
            slots: get32(b, 16),
            region_index: get32(b, 20),
            region_start: get64(b, 24),
            region_len: get64(b, 32),
            epoch: get32(b, 40),
            clean: get32(b, 44) == 1,
            tier: get32(b, 48) as u8,
            header_off: get64(b, 56),
            data_off: get64(b, 64),
        })
    }
}

/// A persistent block, as its header entry records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub owner: u32,
    pub generation: u32,
    pub len: u32,
    /// The epoch of the run that wrote the entry (diagnostics only).
    pub epoch: u32,
}

/// What a header entry slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// All zeros: the slot holds nothing that survives a restart.
    Empty,
    Persistent(Entry),
    /// Neither: torn or foreign bytes. Treated as empty, and counted.
    Corrupt,
}

impl Entry {
    /// Layout (little-endian, 64 bytes): state u32 @0 ("PRST"), slot index
    /// u32 @4, owner u32 @8, generation u32 @12, length u32 @16, epoch u32
    /// @20, zeros, FNV-1a of bytes 0..56 as u64 @56. A slot with nothing to
    /// keep is 64 zero bytes.
    pub fn encode(&self, slot: u32, out: &mut [u8]) {
        assert_eq!(out.len(), ENTRY_LEN);
        out.fill(0);
        put32(out, 0, ENTRY_PERSIST);
        put32(out, 4, slot);
        put32(out, 8, self.owner);
        put32(out, 12, self.generation);
        put32(out, 16, self.len);
        put32(out, 20, self.epoch);
        let sum = fnv1a(&out[..ENTRY_LEN - 8]);
        put64(out, ENTRY_LEN - 8, sum);
    }

    /// `slot` is where the entry was read from; an entry naming another slot
    /// (a misdirected write) is corrupt.
    pub fn decode(b: &[u8], slot: u32, block_size: u32) -> Decoded {
        assert_eq!(b.len(), ENTRY_LEN);
        if b.iter().all(|&x| x == 0) {
            return Decoded::Empty;
        }
        if get32(b, 0) != ENTRY_PERSIST
            || get64(b, ENTRY_LEN - 8) != fnv1a(&b[..ENTRY_LEN - 8])
            || get32(b, 4) != slot
        {
            return Decoded::Corrupt;
        }
        let e =
            Entry { owner: get32(b, 8), generation: get32(b, 12), len: get32(b, 16), epoch: get32(b, 20) };
        if e.len > block_size || e.generation > BlockId::MAX_GENERATION || e.owner == u32::MAX {
            return Decoded::Corrupt;
        }
        Decoded::Persistent(e)
    }
}

/// Generations: the low 8 bits of the open's epoch in the top 8 bits, a
/// per-run reuse counter in the low 16. Every slot starts a run at counter 0
/// of the run's epoch, so ids handed out by the previous 255 runs never
/// match an id of this run.
pub mod generation {
    use crate::proto::BlockId;

    const COUNTER_BITS: u32 = 16;
    const COUNTER_MAX: u32 = (1 << COUNTER_BITS) - 1;
    const _: () = assert!(BlockId::MAX_GENERATION == (0xff << COUNTER_BITS) | COUNTER_MAX);

    /// The first generation of a run.
    pub fn first(epoch: u32) -> u32 {
        (epoch & 0xff) << COUNTER_BITS
    }

    /// The generation after `g` in the run of `epoch`, or `None` when the
    /// slot ran out of generations for this run (it is retired until the
    /// next open). A slot last used in an earlier run (a recovered
    /// persistent block) restarts at the run's first generation.
    pub fn next(g: u32, epoch: u32) -> Option<u32> {
        if g >> COUNTER_BITS != epoch & 0xff {
            Some(first(epoch))
        } else if g & COUNTER_MAX == COUNTER_MAX {
            None
        } else {
            Some(g + 1)
        }
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_and_aligns() {
        for (len, bs) in [(64u64 << 20, 65536u32), (1 << 20, 4096), (10 << 20, 16384), (3 << 30, 1 << 20)] {
            let g = Geometry::for_region(len, bs).unwrap();
            assert!(g.end() <= len);
            assert_eq!(g.data_off % (bs as u64).min(MAX_DATA_ALIGN), 0);
            assert!(g.header_len >= g.slots as u64 * ENTRY_LEN as u64);
            assert_eq!(g.header_len % SECTOR, 0);
            // One more slot would not fit.
            assert!(Geometry::with_slots(g.slots + 1, bs).end() > len, "{len} {bs}");
        }
        assert_eq!(Geometry::for_region(8192, 4096), None);
        assert_eq!(Geometry::for_region(3 * 4096, 4096).unwrap().slots, 1);
    }

    #[test]
    fn superblock_round_trip_and_checks() {
        let sb = Superblock {
            version: VERSION,
            block_size: 65536,
            slots: 1000,
            region_index: 3,
            region_start: 1 << 30,
            region_len: 1 << 28,
            epoch: 77,
            clean: true,
            tier: 1,
            header_off: SECTOR,
            data_off: 65536 * 2,
        };
        let mut b = vec![0u8; SECTOR_USIZE];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b), Ok(sb));
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::Corrupt));
        b.fill(0);
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::Unformatted));
    }

    #[test]
    fn entry_round_trip_and_checks() {
        let e = Entry { owner: 9, generation: 0x01_0002, len: 4000, epoch: 1 };
        let mut b = [0u8; ENTRY_LEN];
        e.encode(5, &mut b);
        assert_eq!(Entry::decode(&b, 5, 4096), Decoded::Persistent(e));
        assert_eq!(Entry::decode(&b, 6, 4096), Decoded::Corrupt, "misdirected");
        assert_eq!(Entry::decode(&b, 5, 2048), Decoded::Corrupt, "longer than a block");
        b[10] ^= 0x40;
        assert_eq!(Entry::decode(&b, 5, 4096), Decoded::Corrupt);
        assert_eq!(Entry::decode(&[0u8; ENTRY_LEN], 5, 4096), Decoded::Empty);
    }

    #[test]
    fn generations_fold_the_epoch() {
        use generation::*;
        assert_eq!(first(1), 1 << 16);
        assert_eq!(first(257), first(1));
        assert_eq!(next(first(3), 3), Some(first(3) + 1));
        assert_eq!(next(first(3) | 0xffff, 3), None, "counter exhausted for this run");
        assert_eq!(next(first(2) + 40, 3), Some(first(3)), "a slot from an earlier run restarts");
        assert_eq!(first(255) | 0xffff, BlockId::MAX_GENERATION);
    }
}
