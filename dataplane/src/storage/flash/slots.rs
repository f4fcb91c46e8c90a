//! The block allocator of one region: per-slot owner, generation, length
//! and flags, and a FIFO free list (as `DramTier`, plus the states a slot
//! passes through while its I/O drains or its header is rewritten).

use std::collections::VecDeque;

use super::layout::{generation, Entry};
use crate::storage::Owner;

/// Owner value of a slot that holds no block.
pub const FREE: Owner = u32::MAX as Owner;

/// The block survives a restart: its header entry is (being) written.
pub const PERSIST: u8 = 1 << 0;
/// Freed, but not reusable yet: I/O still in flight or its header entry not
/// yet cleared on disk.
pub const RELEASING: u8 = 1 << 1;
/// Out of generations for this run: not reused until the next open.
pub const RETIRED: u8 = 1 << 2;

pub struct Slots {
    epoch: u32,
    owner: Vec<Owner>,
    gen: Vec<u32>,
    /// Bytes of data in each block (committed: every write counted here
    /// has completed).
    len: Vec<u32>,
    flags: Vec<u8>,
    /// Free slots, oldest first: FIFO reuse spreads generations over every
    /// slot instead of cycling one.
    free: VecDeque<u32>,
    retired: u32,
}

impl Slots {
    /// `n` slots for the run of `epoch`; `recovered` (slot, entry) are live
    /// persistent blocks from an earlier run, every other slot is free.
    pub fn new(n: u32, epoch: u32, recovered: &[(u32, Entry)]) -> Slots {
        let n_us = n as usize;
        let mut s = Slots {
            epoch,
            owner: vec![FREE; n_us],
            gen: vec![generation::first(epoch); n_us],
            len: vec![0; n_us],
            flags: vec![0; n_us],
            free: VecDeque::with_capacity(n_us),
            retired: 0,
        };
        for &(i, e) in recovered {
            let i = i as usize;
            assert!(i < n_us && s.owner[i] == FREE, "slot {i} recovered twice");
            // On disk an owner is its job id alone: recovered blocks belong
            // to no job of this run either way (`Core::new`).
            s.owner[i] = e.owner as Owner;
            s.gen[i] = e.generation;
            s.len[i] = e.len;
            s.flags[i] = PERSIST;
        }
        s.free.extend((0..n).filter(|&i| s.owner[i as usize] == FREE));
        s
    }

    pub fn count(&self) -> u32 {
        self.owner.len() as u32
    }

    pub fn used(&self) -> u64 {
        self.owner.len() as u64 - self.free.len() as u64 - self.retired as u64
    }

    pub fn retired(&self) -> u32 {
        self.retired
    }

    /// Slot `i` holds the live block of generation `gen`.
    pub fn live(&self, i: u32, gen: u32) -> bool {
        let i = i as usize;
        i < self.owner.len() && self.owner[i] != FREE && self.gen[i] == gen
    }

    pub fn alloc(&mut self, owner: Owner) -> Option<(u32, u32)> {
        debug_assert_ne!(owner, FREE);
        let i = self.free.pop_front()?;
        let u = i as usize;
        debug_assert!(self.owner[u] == FREE && self.flags[u] == 0);
        self.owner[u] = owner;
        self.len[u] = 0;
        Some((i, self.gen[u]))
    }

    /// Ends the block in slot `i`: its ids go stale at once, and the slot
    /// waits in RELEASING until `finish_release`. Returns whether the block
    /// was persistent (its header entry must be cleared first).
    pub fn begin_release(&mut self, i: u32) -> bool {
        let u = i as usize;
        debug_assert!(self.owner[u] != FREE && self.flags[u] & RELEASING == 0);
        let was_persistent = self.flags[u] & PERSIST != 0;
        self.owner[u] = FREE;
        self.len[u] = 0;
        self.flags[u] = RELEASING;
        match generation::next(self.gen[u], self.epoch) {
            Some(g) => self.gen[u] = g,
            None => self.flags[u] |= RETIRED,
        }
        was_persistent
    }

    pub fn releasing(&self, i: u32) -> bool {
        self.flags[i as usize] & RELEASING != 0
    }

    /// The slot's I/O has drained and its header is clean: reusable (or
    /// retired).
    pub fn finish_release(&mut self, i: u32) {
        let u = i as usize;
        assert!(self.flags[u] & RELEASING != 0 && self.owner[u] == FREE);
        if self.flags[u] & RETIRED != 0 {
            self.retired += 1;
            self.flags[u] = RETIRED;
            tracing::warn!(
                slot = i,
                "flash slot out of generations for this run; unused until the next open"
            );
            return;
        }
        self.flags[u] = 0;
        self.free.push_back(i);
    }

    pub fn owner(&self, i: u32) -> Owner {
        self.owner[i as usize]
    }

    pub fn set_owner(&mut self, i: u32, owner: Owner) {
        debug_assert!(self.owner[i as usize] != FREE && owner != FREE);
        self.owner[i as usize] = owner;
    }

    pub fn gen(&self, i: u32) -> u32 {
        self.gen[i as usize]
    }

    pub fn len(&self, i: u32) -> u32 {
        self.len[i as usize]
    }

    pub fn set_len(&mut self, i: u32, len: u32) {
        debug_assert!(self.owner[i as usize] != FREE);
        self.len[i as usize] = len;
    }

    pub fn persistent(&self, i: u32) -> bool {
        self.flags[i as usize] & PERSIST != 0
    }

    pub fn set_persistent(&mut self, i: u32) {
        debug_assert!(self.owner[i as usize] != FREE);
        self.flags[i as usize] |= PERSIST;
    }

    /// What slot `i`'s header entry should say: `Some` for a live
    /// persistent block, `None` (an empty entry) otherwise.
    pub fn entry(&self, i: u32) -> Option<Entry> {
        let u = i as usize;
        (self.owner[u] != FREE && self.flags[u] & PERSIST != 0).then(|| Entry {
            owner: self.owner[u] as u32,
            generation: self.gen[u],
            len: self.len[u],
            epoch: self.epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recovered_slots_are_live_and_not_free() {
        let e = Entry { owner: 4, generation: generation::first(2) + 7, len: 99, epoch: 2 };
        let mut s = Slots::new(3, 3, &[(1, e)]);
        assert!(s.live(1, e.generation));
        assert!(s.persistent(1));
        assert_eq!(s.used(), 1);
        let a = s.alloc(1).unwrap();
        let b = s.alloc(1).unwrap();
        assert_eq!((a.0, b.0), (0, 2));
        assert_eq!(a.1, generation::first(3));
        assert_eq!(s.alloc(1), None);
        // Freeing the recovered block moves it into this run's generations.
        assert!(s.begin_release(1));
        assert!(!s.live(1, e.generation));
        s.finish_release(1);
        assert_eq!(s.alloc(1), Some((1, generation::first(3))));
    }

    #[test]
    fn exhausted_slots_retire_for_the_run() {
        let mut s = Slots::new(1, 0, &[]);
        s.gen[0] = generation::first(0) | 0xfffe;
        let (i, g) = s.alloc(1).unwrap();
        s.begin_release(i);
        s.finish_release(i);
        let (_, g2) = s.alloc(1).unwrap();
        assert_eq!(g2, g + 1);
        s.begin_release(i);
        s.finish_release(i);
        assert_eq!(s.alloc(1), None);
        assert_eq!((s.retired(), s.used()), (1, 0));
        // The next run (epoch) starts the slot over.
        assert_eq!(Slots::new(1, 1, &[]).alloc(1), Some((0, generation::first(1))));
    }

    proptest! {
        /// Never two live blocks in one slot; no id is handed out twice in a
        /// run; used + free + retired = total.
        #[test]
        fn allocator_model(ops in prop::collection::vec(any::<(bool, u8)>(), 1..400)) {
            let mut s = Slots::new(8, 5, &[]);
            let mut live: Vec<(u32, u32)> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (alloc, pick) in ops {
                if alloc {
                    match s.alloc(3) {
                        Some(b) => {
                            prop_assert!(!live.iter().any(|l| l.0 == b.0));
                            prop_assert!(seen.insert(b));
                            live.push(b);
                        }
                        None => prop_assert_eq!(live.len(), 8),
                    }
                } else if !live.is_empty() {
                    let (i, g) = live.swap_remove(pick as usize % live.len());
                    prop_assert!(s.live(i, g));
                    prop_assert!(!s.begin_release(i));
                    prop_assert!(!s.live(i, g));
                    s.finish_release(i);
                }
                prop_assert_eq!(s.used() as usize, live.len());
            }
        }
    }
}
