//! Packet buffer pools and owned packet buffers.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::{sys, DpdkError, Eal};

/// A pool of packet buffers. Pools live until the process exits: a port's
/// receive ring holds buffers of its pool for as long as the port exists,
/// and DPDK gives no way to know that none is left anywhere. A later user of
/// the same name (a node restarted in the same process) gets the same pool.
pub struct Mempool {
    ptr: NonNull<sys::rte_mempool>,
    name: String,
    size: u32,
}

// SAFETY: an rte_mempool created with default flags is multi-producer and
// multi-consumer safe; every method here is one of DPDK's thread-safe calls.
unsafe impl Send for Mempool {}
// SAFETY: as above; &Mempool only reads counters or takes buffers through
// DPDK's lock-free ring.
unsafe impl Sync for Mempool {}

static POOLS: Mutex<Vec<&'static Mempool>> = Mutex::new(Vec::new());

impl Mempool {
    /// The pool named `name`, created with `size` buffers of DPDK's default
    /// data room (2 KiB plus headroom) on NUMA `socket` if it does not exist
    /// yet. `cache` buffers per lcore are kept out of the shared ring.
    pub fn get_or_create(
        _eal: &Eal,
        name: &str,
        size: u32,
        cache: u32,
        socket: i32,
    ) -> Result<&'static Mempool, DpdkError> {
        let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.iter().find(|p| p.name == name) {
            if p.size != size {
                return Err(DpdkError::Invalid(format!(
                    "mempool {name} exists with {} buffers, not {size}",
                    p.size
                )));
            }
            return Ok(p);
        }
        if name.len() >= 26 {
            // RTE_MEMPOOL_NAMESIZE minus the "MP_" prefix DPDK adds.
            return Err(DpdkError::Invalid(format!("mempool name {name:?} is too long")));
        }
        let cname = CString::new(name).map_err(|_| DpdkError::Invalid("mempool name contains NUL".into()))?;
        let data_room = sys::RTE_MBUF_DEFAULT_BUF_SIZE as u16;
        // SAFETY: cname is a valid C string for the call; the EAL is
        // initialised (an `&Eal` exists).
        let ptr = unsafe { sys::rte_pktmbuf_pool_create(cname.as_ptr(), size, cache, 0, data_room, socket) };
        let Some(ptr) = NonNull::new(ptr) else {
            return Err(DpdkError::call(format!("rte_pktmbuf_pool_create({name}, {size} buffers)"), 0));
        };
        let pool: &'static Mempool = Box::leak(Box::new(Mempool { ptr, name: name.to_string(), size }));
        pools.push(pool);
        Ok(pool)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Buffers taken out of the pool (in rings, in flight, or held by
    /// owners). Walks every lcore's cache: not for the data path.
    pub fn in_use(&self) -> u32 {
        // SAFETY: the pool is valid for the process's lifetime.
        unsafe { sys::rte_mempool_in_use_count(self.ptr.as_ptr()) }
    }

    /// A fresh empty buffer, or `None` if the pool is exhausted.
    pub fn alloc(&self) -> Option<Mbuf> {
        // SAFETY: the pool is valid; the returned buffer (if any) is owned by
        // the caller, which `Mbuf` records.
        let m = unsafe { sys::pollen_pktmbuf_alloc(self.ptr.as_ptr()) };
        NonNull::new(m).map(|ptr| Mbuf { ptr })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.ptr.as_ptr()
    }
}

/// An owned packet buffer (possibly a chain of segments); freed back to its
/// pool when dropped, unless handed to a transmit queue.
pub struct Mbuf {
    ptr: NonNull<sys::rte_mbuf>,
}

// SAFETY: an mbuf has one owner at a time, and freeing it from any thread
// is allowed (mempools are thread safe).
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// Takes ownership of a buffer DPDK handed over (received).
    ///
    /// # Safety
    /// `ptr` must be a valid mbuf that nothing else owns.
    pub(crate) unsafe fn from_raw(ptr: NonNull<sys::rte_mbuf>) -> Mbuf {
        Mbuf { ptr }
    }

    /// Gives up ownership (to a transmit queue, which frees it once sent).
    pub(crate) fn into_raw(self) -> *mut sys::rte_mbuf {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }

    pub(crate) fn as_raw(&self) -> *mut sys::rte_mbuf {
        self.ptr.as_ptr()
    }

    /// Segments in the chain.
    pub fn segments(&self) -> u16 {
        // SAFETY: self owns a valid mbuf.
        unsafe { sys::pollen_mbuf_nb_segs(self.ptr.as_ptr()) }
    }

    /// Bytes of the whole packet, over every segment.
    pub fn packet_len(&self) -> u32 {
        // SAFETY: self owns a valid mbuf.
        unsafe { sys::pollen_mbuf_pkt_len(self.ptr.as_ptr()) }
    }

    /// The first segment's data.
    pub fn data(&self) -> &[u8] {
        // SAFETY: the first segment holds data_len initialised bytes at
        // mtod; the slice borrows self, so the buffer outlives it.
        unsafe {
            let m = self.ptr.as_ptr();
            let len = sys::pollen_mbuf_data_len(m) as usize;
            std::slice::from_raw_parts(sys::pollen_mbuf_data(m), len)
        }
    }

    /// Bytes that `append` can still add to the first segment.
    pub fn tailroom(&self) -> usize {
        // SAFETY: self owns a valid mbuf.
        unsafe { sys::pollen_mbuf_tailroom(self.ptr.as_ptr()) as usize }
    }

    /// Extends the data by `len` bytes and returns them (uninitialised
    /// contents are whatever the buffer held; they are zeroed here), or
    /// `None` if the buffer has no room.
    pub fn append(&mut self, len: usize) -> Option<&mut [u8]> {
        let len16 = u16::try_from(len).ok()?;
        if len > self.tailroom() {
            return None;
        }
        // SAFETY: self owns the mbuf exclusively (&mut); append returns a
        // pointer to len16 bytes inside its data room, or NULL.
        unsafe {
            let p = sys::pollen_pktmbuf_append(self.ptr.as_ptr(), len16);
            if p.is_null() {
                return None;
            }
            std::ptr::write_bytes(p, 0, len);
            Some(std::slice::from_raw_parts_mut(p, len))
        }
    }

    /// Shortens the first segment's data to `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        if let Ok(len) = u16::try_from(len) {
            // SAFETY: self owns the mbuf exclusively; the shim only shrinks.
            unsafe { sys::pollen_pktmbuf_trim_to(self.ptr.as_ptr(), len) };
        }
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: self owns the mbuf (ownership given away goes through
        // `into_raw`, which forgets self); it is freed exactly once.
        unsafe { sys::pollen_pktmbuf_free(self.ptr.as_ptr()) };
    }
}

impl std::fmt::Debug for Mbuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mbuf").field("len", &self.packet_len()).field("segments", &self.segments()).finish()
    }
}
