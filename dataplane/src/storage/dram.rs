//! The DRAM tier of one core: a preallocated arena cut into fixed-size blocks,
//! a free list, and per-block length, generation and owner.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{Arena, StorageError, TierUsage};
use crate::proto::{tier, BlockId};

/// Who allocated a block: the job id in the low 32 bits, the number of the
/// job's metadata node in the next 16 (`job_owner`). Job ids are unique
/// per metadata node only; with the node's number, owners are unique in a
/// cluster. Node 0's owners are its job ids, as before node numbers.
pub type Owner = u64;

/// Owner value of a free slot.
const FREE: Owner = u32::MAX as Owner;
/// Owner of blocks kept by a deregistered job's PERSIST objects: no job id
/// (old or new) can free them in bulk any more, only by id.
pub const PERSISTED_OWNER: Owner = (u32::MAX - 1) as Owner;
/// Job ids 0xFFFFFFFE and 0xFFFFFFFF are never handed out (on any node):
/// as owners of node 0 they would be `PERSISTED_OWNER` and `FREE`.
pub const FIRST_RESERVED_JOB_ID: u32 = u32::MAX - 1;

/// The owner of blocks allocated for job `job` of metadata node `node`.
pub const fn job_owner(node: u16, job: u32) -> Owner {
    (node as Owner) << 32 | job as Owner
}

/// The (metadata node, job id) a [`job_owner`] was made of.
pub const fn owner_parts(o: Owner) -> (u16, u32) {
    ((o >> 32) as u16, o as u32)
}

/// Whether `o` is a job's owner (not free, not persisted).
pub const fn is_job_owner(o: Owner) -> bool {
    (o as u32) < FIRST_RESERVED_JOB_ID && o >> 48 == 0
}

pub struct DramTier {
    core: u8,
    block_size: u32,
    arena: Arena,
    /// Bytes of data in each block.
    lens: Vec<u32>,
    /// Bumped on every free, so handles to an earlier use of a slot go stale.
    gens: Vec<u32>,
    /// `job_owner` of the job that allocated the block, `PERSISTED_OWNER`, or `FREE`.
    owners: Vec<Owner>,
    /// Free slots, oldest first: FIFO reuse spreads generations over every
    /// slot instead of cycling one.
    free: VecDeque<u32>,
    /// Blocks each job owner holds (owners with none are absent): what a
    /// job's DRAM share is checked against.
    held: HashMap<Owner, u64>,
    /// Slots whose generation ran out: never handed out again.
    retired: u64,
}

/// Where a new tier's generations start: a value in [0, 2^23) that differs
/// per start (clock, process and a counter, mixed), so a block id kept from
/// before a node restarted names no block of the new start (it reads
/// `not found`) unless its slot's generation happens to match, about one
/// chance in 2^23 per slot; every slot still has at least 2^23 reuses
/// before it is retired.
fn first_generation(core: u8) -> u32 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STARTS: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos
        ^ u64::from(std::process::id()) << 32
        ^ STARTS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(core) << 56;
    // SplitMix64's finaliser: every input bit moves every output bit.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // The low 23 bits: half the generation space, so at least 2^23 reuses remain.
    (z & ((1 << 23) - 1)) as u32
}

impl DramTier {
    /// `capacity` is rounded down to whole blocks; at least one block is
    /// required. Generations start at a value of this start's own
    /// (`first_generation`).
    pub fn new(core: u8, block_size: u32, capacity: u64) -> std::io::Result<DramTier> {
        assert!(block_size.is_power_of_two());
        let n = capacity / block_size as u64;
        if n == 0 || n > BlockId::MAX_INDEX as u64 + 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "DRAM capacity {capacity} holds no {block_size}-byte block, or more than {} (use larger blocks)",
                    BlockId::MAX_INDEX as u64 + 1
                ),
            ));
        }
        let n = n as usize;
        let arena = Arena::new(n * block_size as usize)?;
        Ok(DramTier {
            core,
            block_size,
            arena,
            lens: vec![0; n],
            gens: vec![first_generation(core); n],
            owners: vec![FREE; n],
            free: (0..n as u32).collect(),
            held: HashMap::new(),
            retired: 0,
        })
    }

    pub fn usage(&self) -> TierUsage {
        TierUsage {
            blocks_total: self.lens.len() as u64,
            blocks_used: self.lens.len() as u64 - self.free.len() as u64 - self.retired,
            block_size: self.block_size as u64,
            huge_pages: self.arena.huge_pages(),
        }
    }

    /// The slot of a live block, or `NotFound` for anything stale or foreign.
    fn slot(&self, id: BlockId) -> Result<usize, StorageError> {
        let i = id.index() as usize;
        if id.tier() != tier::DRAM || id.core() != self.core || i >= self.lens.len() {
            return Err(StorageError::NotFound);
        }
        if self.owners[i] == FREE || self.gens[i] != id.generation() {
            return Err(StorageError::NotFound);
        }
        Ok(i)
    }

    /// The owner of a live block (`NotFound` for anything stale or foreign).
    pub fn owner_of(&self, id: BlockId) -> Result<Owner, StorageError> {
        self.slot(id).map(|i| self.owners[i])
    }

    fn data_mut(&mut self, i: usize) -> &mut [u8] {
        let bs = self.block_size as usize;
        &mut self.arena.as_mut_slice()[i * bs..(i + 1) * bs]
    }

    pub fn alloc(&mut self, owner: Owner) -> Result<BlockId, StorageError> {
        debug_assert!(is_job_owner(owner));
        let i = self.free.pop_front().ok_or(StorageError::NoCapacity)? as usize;
        debug_assert_eq!(self.owners[i], FREE);
        self.owners[i] = owner;
        *self.held.entry(owner).or_default() += 1;
        self.lens[i] = 0;
        Ok(BlockId::new(tier::DRAM, self.core, self.gens[i], i as u32))
    }

    /// Writes `data` at `offset`; the block's length becomes at least
    /// `offset + data.len()`. Holes are refused. Returns the new length.
    pub fn write(&mut self, id: BlockId, offset: u32, data: &[u8]) -> Result<u32, StorageError> {
        let i = self.slot(id)?;
        let end = offset as u64 + data.len() as u64;
        if end > self.block_size as u64 {
            return Err(StorageError::PastBlockEnd { end, block_size: self.block_size });
        }
        if offset > self.lens[i] {
            return Err(StorageError::PastData { offset, len: self.lens[i] });
        }
        let off = offset as usize;
        self.data_mut(i)[off..off + data.len()].copy_from_slice(data);
        self.lens[i] = self.lens[i].max(end as u32);
        Ok(self.lens[i])
    }

    pub fn append(&mut self, id: BlockId, data: &[u8]) -> Result<u32, StorageError> {
        let i = self.slot(id)?;
        let len = self.lens[i];
        self.write(id, len, data)
    }

    /// Up to `len` bytes from `offset` (`u32::MAX` = to the end of the data).
    pub fn read(&self, id: BlockId, offset: u32, len: u32) -> Result<&[u8], StorageError> {
        let i = self.slot(id)?;
        let have = self.lens[i];
        if offset > have {
            return Err(StorageError::PastData { offset, len: have });
        }
        let n = len.min(have - offset) as usize;
        let start = i * self.block_size as usize + offset as usize;
        Ok(&self.arena.as_slice()[start..start + n])
    }

    pub fn free(&mut self, id: BlockId) -> Result<(), StorageError> {
        let i = self.slot(id)?;
        self.release(i);
        Ok(())
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks `owner` holds on this core.
    pub fn held_by(&self, owner: Owner) -> u64 {
        self.held.get(&owner).copied().unwrap_or(0)
    }

    /// `owner` gives up one block (freed, or kept as persisted).
    fn unhold(&mut self, owner: Owner) {
        if let Some(n) = self.held.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&owner);
            }
        }
    }

    fn release(&mut self, i: usize) {
        debug_assert_ne!(self.owners[i], FREE);
        self.unhold(self.owners[i]);
        self.owners[i] = FREE;
        self.lens[i] = 0;
        if self.gens[i] == BlockId::MAX_GENERATION {
            self.retired += 1;
            tracing::warn!(
                core = self.core,
                slot = i,
                "block slot retired after {} reuses",
                BlockId::MAX_GENERATION
            );
            return;
        }
        self.gens[i] += 1;
        self.free.push_back(i as u32);
    }

    /// Frees every block `owner` allocated except those in `keep`, which
    /// pass to `PERSISTED_OWNER`. Returns how many were freed.
    pub fn free_owner(&mut self, owner: Owner, keep: &HashSet<BlockId>) -> usize {
        assert!(is_job_owner(owner), "bulk free of a reserved owner");
        let mut n = 0;
        for i in 0..self.owners.len() {
            if self.owners[i] != owner {
                continue;
            }
            let id = BlockId::new(tier::DRAM, self.core, self.gens[i], i as u32);
            if keep.contains(&id) {
                self.unhold(owner);
                self.owners[i] = PERSISTED_OWNER;
            } else {
                self.release(i);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tier(blocks: u64) -> DramTier {
        DramTier::new(3, 4096, blocks * 4096).unwrap()
    }

    #[test]
    fn write_append_read_free() {
        let mut t = tier(4);
        let b = t.alloc(7).unwrap();
        assert_eq!((b.core(), b.tier()), (3, tier::DRAM));
        assert_eq!(t.write(b, 0, b"hello").unwrap(), 5);
        assert_eq!(t.append(b, b" world").unwrap(), 11);
        assert_eq!(t.read(b, 0, u32::MAX).unwrap(), b"hello world");
        assert_eq!(t.read(b, 6, 3).unwrap(), b"wor");
        assert_eq!(t.read(b, 11, 10).unwrap(), b"");
        assert_eq!(t.read(b, 12, 1), Err(StorageError::PastData { offset: 12, len: 11 }));
        assert_eq!(t.write(b, 20, b"x"), Err(StorageError::PastData { offset: 20, len: 11 }));
        assert!(matches!(t.write(b, 4090, b"0123456"), Err(StorageError::PastBlockEnd { .. })));
        t.free(b).unwrap();
        assert_eq!(t.free(b), Err(StorageError::NotFound));
        assert_eq!(t.read(b, 0, 1), Err(StorageError::NotFound));
    }

    #[test]
    fn stale_handle_after_reuse_is_not_found() {
        let mut t = tier(1);
        let a = t.alloc(1).unwrap();
        t.free(a).unwrap();
        let b = t.alloc(1).unwrap();
        assert_eq!(a.index(), b.index());
        assert_ne!(a, b);
        assert_eq!(t.read(a, 0, 1), Err(StorageError::NotFound));
        assert!(t.read(b, 0, 1).is_ok());
    }

    #[test]
    fn a_slot_whose_generation_runs_out_is_retired_not_reused() {
        let mut t = tier(1);
        t.gens[0] = BlockId::MAX_GENERATION - 1;
        let first = t.alloc(1).unwrap();
        t.free(first).unwrap();
        let last = t.alloc(1).unwrap();
        assert_eq!(last.generation(), BlockId::MAX_GENERATION);
        t.free(last).unwrap();
        assert_eq!(t.alloc(1), Err(StorageError::NoCapacity), "the slot is retired");
        assert_eq!(t.read(first, 0, 0), Err(StorageError::NotFound));
        assert_eq!(t.usage().blocks_used, 0);
    }

    #[test]
    fn reuse_is_fifo_across_slots() {
        let mut t = tier(3);
        let a = t.alloc(1).unwrap();
        t.free(a).unwrap();
        assert_ne!(t.alloc(1).unwrap().index(), a.index(), "a freed slot goes to the back of the queue");
    }

    #[test]
    fn exhaustion_reports_no_capacity_and_corrupts_nothing() {
        let mut t = tier(3);
        let ids: Vec<_> = (0..3u8)
            .map(|k| {
                let b = t.alloc(1).unwrap();
                t.write(b, 0, &[k; 100]).unwrap();
                b
            })
            .collect();
        assert_eq!(t.alloc(1), Err(StorageError::NoCapacity));
        for (k, b) in ids.iter().enumerate() {
            assert_eq!(t.read(*b, 0, u32::MAX).unwrap(), &[k as u8; 100][..]);
        }
        assert_eq!(t.usage().blocks_used, 3);
    }

    #[test]
    fn a_new_start_does_not_reuse_the_last_ones_block_ids() {
        // Eight starts of the same core: their first blocks differ (the
        // same generation twice has a chance of about 28 in 2^23), and a
        // block id of one start is not found in the next.
        let mut starts: Vec<(DramTier, BlockId)> = Vec::new();
        for _ in 0..8 {
            let mut t = tier(4);
            let b = t.alloc(1).unwrap();
            assert!(b.generation() < 1 << 23, "{}", b.generation());
            starts.push((t, b));
        }
        let gens: HashSet<u32> = starts.iter().map(|(_, b)| b.generation()).collect();
        assert_eq!(gens.len(), 8, "{gens:?}");
        for w in starts.windows(2) {
            assert_eq!(w[1].0.read(w[0].1, 0, 1), Err(StorageError::NotFound));
        }
    }

    #[test]
    fn foreign_ids_are_not_found() {
        let t = tier(2);
        assert_eq!(t.read(BlockId::new(tier::DRAM, 4, 0, 0), 0, 1), Err(StorageError::NotFound));
        assert_eq!(t.read(BlockId::new(1, 3, 0, 0), 0, 1), Err(StorageError::NotFound));
        assert_eq!(t.read(BlockId::new(tier::DRAM, 3, 0, 99), 0, 1), Err(StorageError::NotFound));
    }

    #[test]
    fn owners_of_other_metadata_nodes_are_apart() {
        let mut t = tier(5);
        // Job id 5 of metadata nodes 0, 1 and 2: three owners.
        let blocks: Vec<BlockId> = (0..3u16).map(|n| t.alloc(job_owner(n, 5)).unwrap()).collect();
        assert_eq!(job_owner(0, 5), 5, "node 0's owners are its job ids");
        assert_eq!(owner_parts(job_owner(2, 5)), (2, 5));
        assert_eq!(owner_parts(job_owner(u16::MAX, u32::MAX)), (u16::MAX, u32::MAX));
        assert_eq!(t.free_owner(job_owner(1, 5), &HashSet::new()), 1);
        assert!(t.read(blocks[0], 0, 0).is_ok() && t.read(blocks[2], 0, 0).is_ok());
        assert!(t.read(blocks[1], 0, 0).is_err());
        assert!(!is_job_owner(PERSISTED_OWNER) && !is_job_owner(FREE));
        assert!(!is_job_owner(job_owner(7, FIRST_RESERVED_JOB_ID)));
        assert!(is_job_owner(job_owner(u16::MAX, FIRST_RESERVED_JOB_ID - 1)));
    }

    #[test]
    fn free_owner_keeps_the_kept() {
        let mut t = tier(5);
        let a = t.alloc(1).unwrap();
        let b = t.alloc(1).unwrap();
        let c = t.alloc(2).unwrap();
        let keep: HashSet<_> = [b].into_iter().collect();
        assert_eq!(t.free_owner(1, &keep), 1);
        assert_eq!(t.read(a, 0, 0), Err(StorageError::NotFound));
        assert!(t.read(b, 0, 0).is_ok());
        assert!(t.read(c, 0, 0).is_ok());
        // A late second bulk free of the same owner no longer touches kept blocks.
        assert_eq!(t.free_owner(1, &HashSet::new()), 0);
        assert!(t.read(b, 0, 0).is_ok());
    }

    proptest! {
        /// Each owner's count of held blocks follows allocations, frees and
        /// bulk frees (a kept block is no longer its job's).
        #[test]
        fn held_counts_follow_the_owners(ops in prop::collection::vec((0u8..4, 0u8..3, any::<u8>()), 1..200)) {
            let mut t = tier(12);
            let mut live: Vec<(BlockId, Owner)> = Vec::new();
            for (op, who, pick) in ops {
                let owner = job_owner(u16::from(who), 7);
                match op {
                    0 | 1 => if let Ok(b) = t.alloc(owner) { live.push((b, owner)) },
                    2 if !live.is_empty() => {
                        let (b, _) = live.swap_remove(pick as usize % live.len());
                        t.free(b).unwrap();
                    }
                    _ => {
                        // Bulk free of `owner`, keeping its first block if `pick` is odd.
                        let kept = live.iter().find(|&&(_, o)| o == owner).map(|&(b, _)| b).filter(|_| pick % 2 == 1);
                        let keep: HashSet<BlockId> = kept.into_iter().collect();
                        t.free_owner(owner, &keep);
                        live.retain(|&(_, o)| o != owner);
                    }
                }
                for w in 0..3u16 {
                    let o = job_owner(w, 7);
                    prop_assert_eq!(t.held_by(o), live.iter().filter(|&&(_, x)| x == o).count() as u64);
                }
            }
        }
    }

    proptest! {
        /// The allocator never hands out a live slot twice, and used + free = total.
        #[test]
        fn allocator_model(ops in prop::collection::vec(any::<(bool, u8)>(), 1..300)) {
            let mut t = tier(16);
            let mut live: Vec<BlockId> = Vec::new();
            for (alloc, pick) in ops {
                if alloc {
                    match t.alloc(9) {
                        Ok(b) => {
                            prop_assert!(!live.iter().any(|l| l.index() == b.index()));
                            t.write(b, 0, &b.0.to_le_bytes()).unwrap();
                            live.push(b);
                        }
                        Err(e) => { prop_assert_eq!(e, StorageError::NoCapacity); prop_assert_eq!(live.len(), 16); }
                    }
                } else if !live.is_empty() {
                    let b = live.swap_remove(pick as usize % live.len());
                    t.free(b).unwrap();
                }
                prop_assert_eq!(t.usage().blocks_used as usize, live.len());
                for b in &live {
                    prop_assert_eq!(t.read(*b, 0, 8).unwrap(), &b.0.to_le_bytes()[..]);
                }
            }
        }
    }
}
