//! One anonymous memory mapping, allocated at start and never resized.

use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};

const HUGE_PAGE: usize = 2 << 20;

/// A fixed, zero-initialised, page-aligned byte arena. Huge pages (hugetlbfs)
/// are tried first when the size is a multiple of 2 MiB; otherwise normal
/// pages, with transparent huge pages requested.
pub struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    huge: bool,
}

// SAFETY: the arena is a plain owned memory region; `&Arena` only hands out
// shared slices and `&mut Arena` exclusive ones, so it is as thread-safe as a Vec<u8>.
unsafe impl Send for Arena {}

impl Arena {
    pub fn new(len: usize) -> std::io::Result<Arena> {
        let size = NonZeroUsize::new(len)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty arena"))?;
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let base = MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS | MapFlags::MAP_POPULATE;
        if len.is_multiple_of(HUGE_PAGE) {
            // SAFETY: a fresh anonymous mapping aliases no Rust object.
            if let Ok(p) = unsafe { mmap_anonymous(None, size, prot, base | MapFlags::MAP_HUGETLB) } {
                return Ok(Arena { ptr: p.cast(), len, huge: true });
            }
        }
        // SAFETY: as above.
        let p = unsafe { mmap_anonymous(None, size, prot, base) }.map_err(std::io::Error::from)?;
        // SAFETY: advice on our own fresh mapping; failure only loses the hint.
        let _ = unsafe { madvise(p, len, MmapAdvise::MADV_HUGEPAGE) };
        Ok(Arena { ptr: p.cast(), len, huge: false })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Backed by hugetlbfs pages.
    pub fn huge_pages(&self) -> bool {
        self.huge
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live mapping owned by self for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once; no slice outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}
