//! The engine's I/O memory: one arena, registered with the ring as a single
//! fixed buffer, cut into
//!
//! - `count` data buffers of one block each, lent out for a request and,
//!   after a read, to the caller until its `ReadBuf` drops;
//! - one scratch sector per request slot, for the read half of a
//!   read-modify-write;
//! - one staging sector per header flush in flight.
//!
//! Everything is 4 KiB aligned (the arena is page aligned and every piece a
//! multiple of 4 KiB), as O_DIRECT needs.

use std::cell::{Cell, RefCell};
use std::io;
use std::ptr::NonNull;
use std::rc::Rc;

use super::layout::SECTOR_USIZE;
use crate::storage::Arena;

const HUGE_PAGE: usize = 2 << 20;

pub struct BufPool {
    /// Start of `arena`'s mapping. All access goes through raw pointers
    /// derived from it (never through `Arena`'s slice methods after
    /// construction), one disjoint range at a time.
    base: NonNull<u8>,
    buf_size: usize,
    count: u32,
    scratch: u32,
    staging: u32,
    /// Data buffers not lent out. Capacity `count`, so returning one never
    /// allocates.
    free: RefCell<Vec<u32>>,
    /// Request slots promised to `WriteBuf`s not yet submitted.
    reserved: Cell<u32>,
    /// Buffers given back so far (wrapping): a core with requests waiting
    /// for a buffer sees one come back, from the device or from a send.
    returned: Cell<u64>,
    arena: Arena,
}

impl BufPool {
    pub fn new(buf_size: usize, count: u32, scratch: u32, staging: u32) -> io::Result<Rc<BufPool>> {
        assert!(buf_size.is_multiple_of(SECTOR_USIZE) && buf_size > 0 && count > 0);
        let len = buf_size
            .checked_mul(count as usize)
            .and_then(|d| d.checked_add((scratch as usize + staging as usize) * SECTOR_USIZE))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffer pool too large"))?;
        // A whole number of 2 MiB pages lets the arena try hugetlbfs.
        let len = if len >= HUGE_PAGE { len.div_ceil(HUGE_PAGE) * HUGE_PAGE } else { len };
        let mut arena = Arena::new(len)?;
        let base = NonNull::new(arena.as_mut_slice().as_mut_ptr()).expect("mmap never returns null");
        Ok(Rc::new(BufPool {
            base,
            buf_size,
            count,
            scratch,
            staging,
            free: RefCell::new((0..count).rev().collect()),
            reserved: Cell::new(0),
            returned: Cell::new(0),
            arena,
        }))
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub fn huge_pages(&self) -> bool {
        self.arena.huge_pages()
    }

    /// The whole arena, for registration with a ring.
    pub fn iovec(&self) -> nix::libc::iovec {
        nix::libc::iovec { iov_base: self.base.as_ptr().cast(), iov_len: self.arena.len() }
    }

    /// Data buffers in the pool.
    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// Data buffers lent out: to requests, `ReadBuf`s and `WriteBuf`s.
    pub fn in_use(&self) -> usize {
        self.count as usize - self.available()
    }

    pub fn available(&self) -> usize {
        self.free.borrow().len()
    }

    pub fn reserved(&self) -> u32 {
        self.reserved.get()
    }

    pub fn unreserve(&self) {
        debug_assert!(self.reserved.get() > 0);
        self.reserved.set(self.reserved.get().saturating_sub(1));
    }

    /// How many buffers were given back since the pool was made (wrapping).
    pub fn returned(&self) -> u64 {
        self.returned.get()
    }

    pub fn take(&self) -> Option<u32> {
        self.free.borrow_mut().pop()
    }

    pub fn give(&self, buf: u32) {
        let mut f = self.free.borrow_mut();
        debug_assert!(buf < self.count && !f.contains(&buf), "buffer {buf} returned twice");
        debug_assert!(f.len() < f.capacity());
        f.push(buf);
        self.returned.set(self.returned.get().wrapping_add(1));
    }

    /// Address of byte `at` of data buffer `buf`.
    pub fn buf_ptr(&self, buf: u32, at: usize) -> *mut u8 {
        assert!(buf < self.count && at <= self.buf_size);
        // SAFETY: in bounds of the arena by the assertion.
        unsafe { self.base.as_ptr().add(buf as usize * self.buf_size + at) }
    }

    pub fn scratch_ptr(&self, i: u32) -> *mut u8 {
        assert!(i < self.scratch);
        let at = self.count as usize * self.buf_size + i as usize * SECTOR_USIZE;
        // SAFETY: in bounds of the arena by the assertion and `new`'s sizing.
        unsafe { self.base.as_ptr().add(at) }
    }

    pub fn staging_ptr(&self, i: u32) -> *mut u8 {
        assert!(i < self.staging);
        let at = self.count as usize * self.buf_size + (self.scratch + i) as usize * SECTOR_USIZE;
        // SAFETY: as above.
        unsafe { self.base.as_ptr().add(at) }
    }

    /// Bytes `[at, at + len)` of data buffer `buf`.
    ///
    /// # Safety
    /// The caller owns `buf` (it is neither free nor the target of an I/O in
    /// flight) and holds no other reference into that range.
    // The pool is shared (`Rc`) with the guards; exclusivity of each range
    // comes from who owns the buffer, not from the borrow of the pool.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn buf_mut(&self, buf: u32, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= self.buf_size);
        // SAFETY: in bounds; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.buf_ptr(buf, at), len) }
    }

    /// # Safety
    /// As `buf_mut`, shared: nothing writes the range meanwhile.
    pub unsafe fn buf(&self, buf: u32, at: usize, len: usize) -> &[u8] {
        assert!(at + len <= self.buf_size);
        // SAFETY: in bounds; the caller promises no writer.
        unsafe { std::slice::from_raw_parts(self.buf_ptr(buf, at), len) }
    }

    /// # Safety
    /// No I/O in flight targets scratch sector `i`, and no other reference
    /// to it is live.
    pub unsafe fn scratch(&self, i: u32) -> &[u8] {
        // SAFETY: a whole sector inside the arena; the caller promises no writer.
        unsafe { std::slice::from_raw_parts(self.scratch_ptr(i), SECTOR_USIZE) }
    }

    /// # Safety
    /// No I/O in flight uses staging sector `i`, and no other reference to
    /// it is live.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn staging_mut(&self, i: u32) -> &mut [u8] {
        // SAFETY: a whole sector inside the arena; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.staging_ptr(i), SECTOR_USIZE) }
    }
}

/// The data of a completed read, in the registered buffer the device wrote
/// it to: send it from here, no copy needed. The buffer returns to the
/// engine's pool when this drops, so hold it until the bytes are sent (a
/// zero-copy send can use `fixed_index`/`as_ptr` while holding it).
pub struct ReadBuf {
    pool: Rc<BufPool>,
    buf: u32,
    start: u32,
    len: u32,
}

impl ReadBuf {
    pub(super) fn new(pool: Rc<BufPool>, buf: u32, start: u32, len: u32) -> ReadBuf {
        debug_assert!(start as usize + len as usize <= pool.buf_size());
        ReadBuf { pool, buf, start, len }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: this guard owns `buf` (taken from the free list, the read
        // into it completed) until it drops, and hands out only shared views.
        unsafe { self.pool.buf(self.buf, self.start as usize, self.len as usize) }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether holding this buffer while a send goes out leaves the engine
    /// enough to work with: at least half its pool is free. Buffers held by
    /// slow connections must not starve every other request of I/O memory.
    pub fn lendable(&self) -> bool {
        self.pool.available() * 2 >= self.pool.count as usize
    }

    /// Returns the buffer to the pool now (the same as dropping it).
    pub fn release(self) {}
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuf").field("buf", &self.buf).field("len", &self.len).finish()
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.pool.give(self.buf);
    }
}

/// A registered buffer to put a write's bytes in before submitting it
/// (`FlashEngine::submit_write_buf`), so a put can stream from the socket
/// into the buffer the device reads. It holds a queue slot, so submitting
/// it is never `Busy`; dropped unsubmitted, it gives both back.
pub struct WriteBuf {
    pub(super) pool: Rc<BufPool>,
    buf: u32,
    /// Where the data starts in the buffer: the write's offset within its
    /// first sector, so no bytes move before the device reads them.
    pos: u32,
    len: u32,
}

impl WriteBuf {
    pub(super) fn new(pool: Rc<BufPool>, buf: u32, pos: u32, len: u32) -> WriteBuf {
        assert!(pos as usize + len as usize <= pool.buf_size());
        pool.reserved.set(pool.reserved.get() + 1);
        WriteBuf { pool, buf, pos, len }
    }

    /// The `len` bytes to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: this guard owns `buf` until it is submitted (which consumes
        // it) or dropped; `&mut self` makes the view exclusive.
        unsafe { self.pool.buf_mut(self.buf, self.pos as usize, self.len as usize) }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands the buffer (and the reservation) to the engine.
    pub(super) fn into_raw(self) -> (u32, u32, u32) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again, so the Rc moves out once.
        let _pool = unsafe { std::ptr::read(&me.pool) };
        (me.buf, me.pos, me.len)
    }
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        self.pool.give(self.buf);
        self.pool.unreserve();
    }
}

/// A pool of `count` 4 KiB buffers and a way to fill them, for tests of code
/// that holds `ReadBuf`s (the transports' gathering sends).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn pool(count: u32) -> Rc<BufPool> {
        BufPool::new(SECTOR_USIZE, count, 1, 1).expect("test buffer pool")
    }

    /// A buffer holding `data` (at most 4 KiB); `None` when the pool is dry.
    pub(crate) fn read_buf(pool: &Rc<BufPool>, data: &[u8]) -> Option<ReadBuf> {
        assert!(data.len() <= pool.buf_size());
        let b = pool.take()?;
        // SAFETY: `b` was just taken from the free list: nothing else
        // reads or writes it, and `data` fits (asserted).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), pool.buf_ptr(b, 0), data.len()) };
        Some(ReadBuf::new(pool.clone(), b, 0, data.len() as u32))
    }
}
