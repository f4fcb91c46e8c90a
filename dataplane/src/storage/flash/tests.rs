//! Engine tests on temporary files (and on a loop device when running as
//! root). Runs that need io_uring are skipped, saying why, where the kernel
//! or sandbox forbids it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use io_uring::{opcode, IoUring};
use nix::libc;
use proptest::prelude::*;

use super::*;
use crate::proto::{tier, BlockId, Status};
use crate::storage::StorageError;

/// A directory removed on drop, on a file system that supports O_DIRECT.
pub(super) struct TestDir(PathBuf);

impl TestDir {
    pub(super) fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let leaf =
            format!("pollen-flash-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let mut base = std::env::temp_dir();
        if !supports_direct(&base) {
            base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        }
        let d = base.join(leaf);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn supports_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(format!("pollen-direct-probe-{}", std::process::id()));
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

macro_rules! need_uring {
    () => {
        if let Err(e) = super::ring::build(4, false, false) {
            eprintln!("skipping: io_uring unavailable: {e}");
            return;
        }
    };
}

fn cfg(block_size: u32, queue_depth: u32) -> FlashConfig {
    let mut c = FlashConfig::new(tier::FLASH, 3, block_size);
    c.policy.queue_depth = queue_depth;
    c
}

fn file(dir: &TestDir, name: &str, size: u64) -> Backing {
    prepare_backing(&dir.path().join(name), Some(size)).unwrap()
}

fn whole(b: &Backing) -> Region {
    Region { index: 0, start: 0, len: b.size }
}

type Done = (u64, Result<Completion, StorageError>);

/// Polls until `n` completions arrived; a request that never completes
/// fails the test instead of hanging it.
fn collect(e: &mut FlashEngine, n: usize) -> Vec<Done> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        e.poll_completions(|t, r| out.push((t, r)));
        if out.len() >= n {
            assert_eq!(out.len(), n, "more completions than requests");
            return out;
        }
        assert!(Instant::now() < deadline, "storage requests hang: {} of {n} completed", out.len());
        e.wait(Duration::from_millis(5));
    }
}

fn one(e: &mut FlashEngine) -> Result<Completion, StorageError> {
    collect(e, 1).pop().unwrap().1
}

fn written(r: Result<Completion, StorageError>) -> Result<u32, StorageError> {
    match r? {
        Completion::Written { len } => Ok(len),
        c => panic!("expected a write completion, got {c:?}"),
    }
}

fn bytes(r: Result<Completion, StorageError>) -> Result<Vec<u8>, StorageError> {
    match r? {
        Completion::Read(b) => Ok(b.to_vec()),
        c => panic!("expected a read completion, got {c:?}"),
    }
}

fn write(e: &mut FlashEngine, id: BlockId, off: u32, data: &[u8]) -> Result<u32, StorageError> {
    e.submit_write(7, id, off, data)?;
    written(one(e))
}

fn append(e: &mut FlashEngine, id: BlockId, data: &[u8]) -> Result<u32, StorageError> {
    e.submit_append(7, id, data)?;
    written(one(e))
}

fn read(e: &mut FlashEngine, id: BlockId, off: u32, len: u32) -> Result<Vec<u8>, StorageError> {
    e.submit_read(7, id, off, len)?;
    bytes(one(e))
}

fn persist(e: &mut FlashEngine, id: BlockId) -> Result<(), StorageError> {
    e.mark_persistent(7, id)?;
    match one(e)? {
        Completion::Persisted => Ok(()),
        c => panic!("expected a persist completion, got {c:?}"),
    }
}

/// Deterministic bytes, different per seed.
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn write_append_read_free() {
    need_uring!();
    let dir = TestDir::new("basic");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(16384, 8)).unwrap();
    assert!(e.open_report().formatted);
    let id = e.alloc(9).unwrap();
    assert_eq!((id.tier(), id.core()), (tier::FLASH, 3));
    assert_eq!(write(&mut e, id, 0, b"hello"), Ok(5));
    assert_eq!(append(&mut e, id, b" world"), Ok(11));
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"hello world");
    assert_eq!(read(&mut e, id, 6, 3).unwrap(), b"wor");
    assert_eq!(read(&mut e, id, 11, 10).unwrap(), b"");
    assert_eq!(read(&mut e, id, 12, 1), Err(StorageError::PastData { offset: 12, len: 11 }));
    assert_eq!(write(&mut e, id, 20, b"x"), Err(StorageError::PastData { offset: 20, len: 11 }));
    assert!(matches!(e.submit_write(1, id, 16380, b"0123456"), Err(StorageError::PastBlockEnd { .. })));
    assert!(matches!(e.submit_append(1, id, &[0; 16380]), Err(StorageError::PastBlockEnd { .. })));
    assert_eq!(e.usage().tier.blocks_used, 1);
    e.free(id).unwrap();
    assert_eq!(e.free(id), Err(StorageError::NotFound));
    assert_eq!(e.submit_read(1, id, 0, 1), Err(StorageError::NotFound));
    assert_eq!(e.usage().tier.blocks_used, 0);
    // Foreign ids.
    assert_eq!(
        e.submit_read(1, BlockId::new(tier::DRAM, 3, id.generation(), 0), 0, 1),
        Err(StorageError::NotFound)
    );
    assert_eq!(
        e.submit_read(1, BlockId::new(tier::FLASH, 4, id.generation(), 0), 0, 1),
        Err(StorageError::NotFound)
    );
    assert!(!e.has_work());
}

#[test]
fn odd_sizes_and_unaligned_offsets() {
    need_uring!();
    let dir = TestDir::new("odd");
    let b = file(&dir, "t", 1 << 20);
    let bs = 16384u32;
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(bs, 8)).unwrap();
    let id = e.alloc(1).unwrap();
    let mut model: Vec<u8> = Vec::new();
    // (offset, length): inside one sector, across one boundary, whole
    // sectors at odd offsets, overwrites that keep bytes on both sides of
    // the same sector, ending exactly on boundaries.
    let steps = [
        (0u32, 1u32),
        (1, 3),
        (4, 4091),
        (4095, 2),
        (4097, 5000),
        (100, 7),
        (4090, 10),
        (0, 4096),
        (9097, 7287),
        (8191, 1),
        (12000, 100),
        (1, 16383),
        (5, 5),
    ];
    for (k, &(off, len)) in steps.iter().enumerate() {
        let data = pattern(k as u64 + 1, len as usize);
        let got = write(&mut e, id, off, &data);
        let end = (off + len) as usize;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        assert_eq!(got, Ok(model.len() as u32), "step {k}: write {len} at {off}");
        assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), model, "step {k}");
        // A ragged read inside.
        let (ro, rl) = (off / 2, len.max(3));
        let want = &model[ro as usize..(ro + rl).min(model.len() as u32) as usize];
        assert_eq!(read(&mut e, id, ro, rl).unwrap(), want, "step {k}: read {rl} at {ro}");
    }
    // Appends of odd sizes from an odd length.
    let id2 = e.alloc(1).unwrap();
    let mut m2 = Vec::new();
    for (k, n) in [1usize, 4095, 1, 4097, 3, 8000].into_iter().enumerate() {
        let data = pattern(100 + k as u64, n);
        m2.extend_from_slice(&data);
        assert_eq!(append(&mut e, id2, &data), Ok(m2.len() as u32));
    }
    assert_eq!(read(&mut e, id2, 0, u32::MAX).unwrap(), m2);
    // The first block was not disturbed.
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), model);
}

#[test]
fn requests_on_one_block_keep_their_order() {
    need_uring!();
    let dir = TestDir::new("order");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(16384, 16)).unwrap();
    let id = e.alloc(1).unwrap();
    let other = e.alloc(1).unwrap();
    // Everything submitted before any completion is reaped.
    e.submit_write(1, id, 0, &[b'a'; 5000]).unwrap();
    e.submit_read(2, id, 0, u32::MAX).unwrap();
    e.submit_append(3, id, &[b'b'; 100]).unwrap();
    e.submit_read(4, id, 4990, 20).unwrap();
    e.submit_write(5, id, 4999, b"XY").unwrap();
    e.submit_write(6, other, 0, b"independent").unwrap();
    e.submit_read(7, id, 4998, 4).unwrap();
    e.submit_write(8, id, 9000, b"hole").unwrap();
    let mut got = collect(&mut e, 8);
    got.sort_by_key(|d| d.0);
    let mut it = got.into_iter().map(|d| d.1);
    assert_eq!(written(it.next().unwrap()), Ok(5000));
    assert_eq!(bytes(it.next().unwrap()).unwrap(), vec![b'a'; 5000]);
    assert_eq!(written(it.next().unwrap()), Ok(5100));
    let mut want = vec![b'a'; 10];
    want.extend_from_slice(&[b'b'; 10]);
    assert_eq!(bytes(it.next().unwrap()).unwrap(), want);
    assert_eq!(written(it.next().unwrap()), Ok(5100));
    assert_eq!(written(it.next().unwrap()), Ok(11));
    assert_eq!(bytes(it.next().unwrap()).unwrap(), b"aXYb");
    assert_eq!(written(it.next().unwrap()), Err(StorageError::PastData { offset: 9000, len: 5100 }));
}

#[test]
fn full_tier_is_no_capacity() {
    need_uring!();
    let dir = TestDir::new("full");
    // Superblock, one header sector, then 4 KiB blocks: 30 fit in 128 KiB.
    let b = file(&dir, "t", 128 << 10);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(4096, 4)).unwrap();
    let total = e.usage().tier.blocks_total;
    assert_eq!(total, 30);
    let ids: Vec<BlockId> = (0..total).map(|_| e.alloc(2).unwrap()).collect();
    assert_eq!(e.alloc(2), Err(StorageError::NoCapacity));
    assert_eq!(StorageError::NoCapacity.status(), Status::NoCapacity);
    for (k, id) in ids.iter().enumerate() {
        write(&mut e, *id, 0, &pattern(k as u64, 4096)).unwrap();
    }
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(read(&mut e, *id, 0, u32::MAX).unwrap(), pattern(k as u64, 4096));
    }
    assert_eq!(e.usage().tier.blocks_used, total);
    e.free(ids[7]).unwrap();
    let again = e.alloc(2).unwrap();
    assert_eq!(again.index(), ids[7].index());
    assert_ne!(again, ids[7]);
    assert_eq!(e.alloc(2), Err(StorageError::NoCapacity));
}

#[test]
fn a_full_queue_is_busy_until_completions_are_delivered() {
    need_uring!();
    let dir = TestDir::new("busy");
    let b = file(&dir, "t", 1 << 20);
    let mut c = cfg(4096, 2);
    c.buffers = 3;
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"data").unwrap();
    e.submit_read(1, id, 0, 4).unwrap();
    e.submit_read(2, id, 0, 4).unwrap();
    assert_eq!(e.submit_read(3, id, 0, 4), Err(StorageError::Busy));
    assert_eq!(e.mark_persistent(3, id), Err(StorageError::Busy));
    assert!(matches!(e.write_buffer(0, 4), Err(StorageError::Busy)));
    let held: Vec<_> = collect(&mut e, 2).into_iter().map(|d| d.1.unwrap()).collect();
    // Queue slots are back; buffers: two held reads of three.
    e.submit_read(3, id, 0, 4).unwrap();
    assert_eq!(e.submit_read(4, id, 0, 4), Err(StorageError::Busy), "no buffer left");
    let third = one(&mut e).unwrap();
    drop(held);
    drop(third);
    // A reserved write buffer holds a queue slot until submitted or dropped.
    let mut wb = e.write_buffer(1, 3).unwrap();
    wb.as_mut_slice().copy_from_slice(b"XYZ");
    e.submit_read(5, id, 0, 4).unwrap();
    assert_eq!(e.submit_read(6, id, 0, 4), Err(StorageError::Busy));
    e.submit_write_buf(8, id, 1, wb).unwrap();
    let got = collect(&mut e, 2);
    assert!(got.iter().all(|d| d.1.is_ok()));
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"dXYZ");
    let dropped = e.write_buffer(0, 10).unwrap();
    drop(dropped);
    e.submit_read(9, id, 0, 1).unwrap();
    e.submit_read(10, id, 1, 1).unwrap();
    assert_eq!(collect(&mut e, 2).len(), 2);
}

#[test]
fn streamed_appends_through_registered_buffers() {
    need_uring!();
    let dir = TestDir::new("wbuf");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(16384, 8)).unwrap();
    let id = e.alloc(1).unwrap();
    let mut model = Vec::new();
    for (k, n) in [3000usize, 5000, 1, 4096].into_iter().enumerate() {
        let data = pattern(k as u64, n);
        let mut wb = e.append_buffer(id, n as u32).unwrap();
        wb.as_mut_slice().copy_from_slice(&data);
        e.submit_append_buf(1, id, wb).unwrap();
        model.extend_from_slice(&data);
        assert_eq!(written(one(&mut e)), Ok(model.len() as u32));
    }
    // Two appends queued before either runs: the second's bytes move to
    // where the first one ends.
    let (a, c) = (pattern(50, 10), pattern(51, 20));
    let mut wa = e.append_buffer(id, 10).unwrap();
    wa.as_mut_slice().copy_from_slice(&a);
    let mut wc = e.append_buffer(id, 20).unwrap();
    wc.as_mut_slice().copy_from_slice(&c);
    e.submit_append_buf(1, id, wa).unwrap();
    e.submit_append_buf(2, id, wc).unwrap();
    assert_eq!(collect(&mut e, 2).len(), 2);
    model.extend_from_slice(&a);
    model.extend_from_slice(&c);
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), model);
}

#[test]
fn injected_io_errors_surface_as_errors() {
    need_uring!();
    let dir = TestDir::new("inject");
    let b = file(&dir, "t", 1 << 20);
    let mut c = cfg(8192, 4);
    c.buffers = 4;
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"kept").unwrap();
    e.inject_error(libc::EIO);
    let err = write(&mut e, id, 4, b"lost").unwrap_err();
    assert_eq!(err, StorageError::Io { errno: libc::EIO });
    assert_eq!(err.status(), Status::Internal);
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"kept", "a failed write leaves the length");
    // An error in the read half of a read-modify-write.
    e.inject_error(libc::EIO);
    assert!(matches!(write(&mut e, id, 2, b"zz"), Err(StorageError::Io { .. })));
    e.inject_error(libc::ENOSPC);
    let err = write(&mut e, id, 4, b"full").unwrap_err();
    assert_eq!(err.status(), Status::NoCapacity);
    e.inject_error(libc::EIO);
    assert_eq!(read(&mut e, id, 0, 4), Err(StorageError::Io { errno: libc::EIO }));
    // EAGAIN is retried, not reported.
    e.inject_error(libc::EAGAIN);
    assert_eq!(read(&mut e, id, 0, 4).unwrap(), b"kept");
    assert_eq!(e.usage().errors, 4);
    // Every buffer came back: as many reads as buffers can be held at once.
    for t in 0..4 {
        e.submit_read(t, id, 0, 4).unwrap();
    }
    let held = collect(&mut e, 4);
    assert!(held.iter().all(|d| d.1.is_ok()));
}

/// Polls until the engine has nothing in flight or queued (header
/// flushes included); fails the test instead of hanging.
fn settle(e: &mut FlashEngine) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.has_work() {
        assert!(Instant::now() < deadline, "the engine never settles");
        e.poll_completions(|t, r| panic!("no request was pending: {t} {r:?}"));
        e.wait(Duration::from_millis(5));
    }
}

/// Freeing a persistent block clears its header entry; a failed write of
/// that sector is retried, and the slot is reused only once the cleared
/// entry is on disk: a crash then does not bring the block back. When
/// every attempt fails, the slot stays out of use until the sector is
/// written (here: by the clean close).
#[test]
fn a_failed_header_clear_is_retried_before_the_slot_is_reused() {
    need_uring!();
    let dir = TestDir::new("hdr-retry");
    let b = file(&dir, "t", 3 * 4096);
    let c = cfg(4096, 4);
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    assert_eq!(e.usage().tier.blocks_total, 1);
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"persistent").unwrap();
    persist(&mut e, id).unwrap();
    e.inject_header_error(libc::EIO);
    e.free(id).unwrap();
    settle(&mut e);
    assert_eq!(e.usage().errors, 1, "the injected failure happened");
    let again = e.alloc(1).expect("the clear was written on a retry: the slot is free");
    e.crash();
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    assert!(e.recovered_persistent().is_empty(), "a freed persistent block came back after a crash");
    assert_eq!(e.submit_read(1, again, 0, 1), Err(StorageError::NotFound));

    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"persistent").unwrap();
    persist(&mut e, id).unwrap();
    for _ in 0..super::engine::HDR_WRITE_ATTEMPTS {
        e.inject_header_error(libc::EIO);
    }
    e.free(id).unwrap();
    settle(&mut e);
    assert_eq!(e.usage().errors, u64::from(super::engine::HDR_WRITE_ATTEMPTS));
    assert_eq!(e.alloc(1), Err(StorageError::NoCapacity), "its entry is not cleared on disk");
    drop(e);
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    assert!(e.recovered_persistent().is_empty(), "the clean close wrote the cleared entry");
    e.alloc(1).unwrap();
}

/// A failed header write is flushed again only after a backoff that
/// doubles per failure in a row (`hdr_retry_delay`), never on the very
/// next pass: passes before the retry is due start nothing and block on
/// nothing, the engine stays parkable and says when the retry is due (the
/// core's bound on a parked sleep), and the write that follows the
/// injected failures clears the entry, so the slot is reused.
#[test]
fn a_failed_header_write_is_retried_after_a_backoff() {
    need_uring!();
    use super::engine::{hdr_retry_delay, HDR_RETRY_BASE, HDR_RETRY_MAX, HDR_WRITE_ATTEMPTS};
    assert_eq!(hdr_retry_delay(1), HDR_RETRY_BASE);
    assert_eq!(hdr_retry_delay(2), HDR_RETRY_BASE * 2);
    assert_eq!(hdr_retry_delay(3), HDR_RETRY_BASE * 4);
    assert_eq!(hdr_retry_delay(u8::MAX), HDR_RETRY_MAX, "capped");

    let dir = TestDir::new("hdr-backoff");
    let b = file(&dir, "t", 3 * 4096);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(4096, 4)).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"persistent").unwrap();
    persist(&mut e, id).unwrap();
    assert_eq!(e.retry_due(), None);
    let fails = HDR_WRITE_ATTEMPTS - 1;
    for _ in 0..fails {
        e.inject_header_error(libc::EIO);
    }
    e.free(id).unwrap();

    // (failures so far, the retry's due time) while one is pending.
    let mut pending: Option<(u64, Instant)> = None;
    let mut waits = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.has_work() {
        assert!(Instant::now() < deadline, "the header write never went through");
        let before = Instant::now();
        e.poll_completions(|t, r| panic!("no request was pending: {t} {r:?}"));
        let after = Instant::now();
        let errors = e.usage().errors;
        match (pending, e.retry_due()) {
            (Some((n, due)), Some(d)) if errors == n => {
                assert_eq!(d, due, "the pending retry's time does not move");
                assert!(e.can_park(), "nothing in flight: the core may park until the retry is due");
            }
            (Some((n, due)), _) => {
                assert!(after >= due, "the retry after failure {n} started before it was due");
                assert!(errors == n || errors == n + 1);
                pending = None;
            }
            (None, _) => {}
        }
        if pending.is_none() {
            if let Some(due) = e.retry_due() {
                // A new failure: its retry waits `hdr_retry_delay(failures)` from the failure.
                let n = errors;
                let wait = hdr_retry_delay(n as u8);
                assert!(due >= before + wait && due <= after + wait, "failure {n}: retry due in {wait:?}");
                waits.push(wait);
                pending = Some((n, due));
            }
        }
        e.wait(Duration::from_millis(1));
        std::thread::yield_now();
    }
    assert_eq!(e.usage().errors, u64::from(fails), "every injected failure happened, then the write passed");
    assert_eq!(waits, (1..=fails).map(hdr_retry_delay).collect::<Vec<_>>(), "one backoff per failure");
    assert_eq!(e.retry_due(), None);
    let again = e.alloc(1).expect("the clear was written on a retry: the slot is free");
    e.crash();
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(4096, 4)).unwrap();
    assert!(e.recovered_persistent().is_empty(), "a freed persistent block came back after a crash");
    assert_eq!(e.submit_read(1, again, 0, 1), Err(StorageError::NotFound));
}

/// A failed header write still waiting for its retry when the region
/// closes: the clean close writes the sector itself.
#[test]
fn the_clean_close_writes_a_sector_waiting_for_its_retry() {
    need_uring!();
    let dir = TestDir::new("hdr-backoff-close");
    let b = file(&dir, "t", 3 * 4096);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(4096, 4)).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"persistent").unwrap();
    persist(&mut e, id).unwrap();
    e.inject_header_error(libc::EIO);
    e.free(id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.retry_due().is_none() {
        assert!(Instant::now() < deadline, "the injected failure never happened");
        e.poll_completions(|t, r| panic!("no request was pending: {t} {r:?}"));
        e.wait(Duration::from_millis(1));
    }
    assert!(e.has_work(), "the retry is pending");
    drop(e);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(4096, 4)).unwrap();
    assert!(e.recovered_persistent().is_empty(), "the clean close wrote the cleared entry");
    e.alloc(1).unwrap();
}

#[test]
fn short_transfers_are_finished() {
    need_uring!();
    let dir = TestDir::new("short");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(65536, 4)).unwrap();
    let id = e.alloc(1).unwrap();
    let data = pattern(3, 40000);
    e.inject_short(4096);
    e.inject_short(8192);
    assert_eq!(write(&mut e, id, 0, &data), Ok(40000));
    e.inject_short(12288);
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), data);
    // Short off a sector boundary: only the end of a file does that, and
    // direct I/O cannot go on from there.
    e.inject_short(100);
    assert_eq!(read(&mut e, id, 0, u32::MAX), Err(StorageError::Io { errno: libc::EIO }));
    assert_eq!(read(&mut e, id, 1, 10).unwrap(), &data[1..11]);
}

#[test]
fn a_file_truncated_underneath_fails_reads_without_hanging() {
    need_uring!();
    let dir = TestDir::new("trunc");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(65536, 4)).unwrap();
    let ids: Vec<BlockId> = std::iter::from_fn(|| e.alloc(1).ok()).collect();
    let last = *ids.last().unwrap();
    write(&mut e, last, 0, &pattern(1, 65536)).unwrap();
    // Cut the file in the middle of the last block.
    let f = std::fs::OpenOptions::new().write(true).open(e.path()).unwrap();
    f.set_len((1 << 20) - 32768).unwrap();
    let r = read(&mut e, last, 0, u32::MAX);
    assert_eq!(r, Err(StorageError::Io { errno: libc::EIO }));
    // Writes extend the file again; the engine carries on.
    assert_eq!(write(&mut e, last, 0, &pattern(2, 65536)), Ok(65536));
    assert_eq!(read(&mut e, last, 0, u32::MAX).unwrap(), pattern(2, 65536));
}

#[test]
fn freeing_a_block_with_io_in_flight_defers_reuse() {
    need_uring!();
    let dir = TestDir::new("freeing");
    let b = file(&dir, "t", 3 * 4096);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(4096, 4)).unwrap();
    assert_eq!(e.usage().tier.blocks_total, 1);
    let id = e.alloc(1).unwrap();
    e.submit_write(1, id, 0, b"in flight").unwrap();
    e.submit_read(2, id, 0, u32::MAX).unwrap();
    e.free(id).unwrap();
    assert_eq!(e.alloc(1), Err(StorageError::NoCapacity), "slot busy until its I/O drains");
    let got = collect(&mut e, 2);
    assert!(got.iter().any(|d| d.0 == 1 && d.1.is_ok()), "accepted before the free");
    let again = e.alloc(1).unwrap();
    assert_ne!(again, id);
    assert_eq!(read(&mut e, again, 0, u32::MAX).unwrap(), b"");
}

#[test]
fn restart_keeps_persistent_blocks_and_drops_the_rest() {
    need_uring!();
    let dir = TestDir::new("restart");
    let b = file(&dir, "t", 4 << 20);
    let c = cfg(65536, 8);
    let (eph, per, per2) = {
        let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
        let eph = e.alloc(5).unwrap();
        write(&mut e, eph, 0, b"ephemeral").unwrap();
        let per = e.alloc(6).unwrap();
        write(&mut e, per, 0, &pattern(9, 70000 - 65536 + 1000)).unwrap();
        persist(&mut e, per).unwrap();
        // Written after being marked: the entry follows the length.
        append(&mut e, per, b"tail").unwrap();
        let per2 = e.alloc(6).unwrap();
        write(&mut e, per2, 0, b"second").unwrap();
        persist(&mut e, per2).unwrap();
        (eph, per, per2)
    };
    let mut want = pattern(9, 70000 - 65536 + 1000);
    want.extend_from_slice(b"tail");
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    let rep = e.open_report();
    assert!(!rep.formatted && rep.was_clean && rep.recovered == 2 && rep.corrupt_entries == 0, "{rep:?}");
    let mut rec = e.recovered_persistent().to_vec();
    rec.sort();
    assert_eq!(rec, vec![(per, 6, want.len() as u32), (per2, 6, 6)]);
    assert_eq!(read(&mut e, per, 0, u32::MAX).unwrap(), want);
    assert_eq!(e.submit_read(1, eph, 0, 1), Err(StorageError::NotFound), "ephemeral blocks do not survive");
    assert_eq!(e.usage().tier.blocks_used, 2);
    // Every other slot is free; none hands out an id of the last run.
    let fresh: Vec<BlockId> = std::iter::from_fn(|| e.alloc(1).ok()).collect();
    assert!(fresh.iter().all(|f| *f != eph && *f != per));
    assert!(fresh.iter().any(|f| f.index() == eph.index()));
    assert_eq!(e.submit_read(1, eph, 0, 1), Err(StorageError::NotFound), "stale id after reuse");
    // Freeing a persistent block clears its entry.
    e.free(per2).unwrap();
    drop(e);
    let e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    assert_eq!(e.recovered_persistent(), &[(per, 6, want.len() as u32)]);
    assert_eq!(e.open_report().epoch, 3);
}

#[test]
fn a_crash_keeps_persistent_blocks_and_says_so() {
    need_uring!();
    let dir = TestDir::new("crash");
    let b = file(&dir, "t", 1 << 20);
    let c = cfg(16384, 4);
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"durable").unwrap();
    persist(&mut e, id).unwrap();
    e.crash();
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    assert!(!e.open_report().was_clean);
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"durable");
}

#[test]
fn a_mismatched_configuration_is_refused() {
    need_uring!();
    let dir = TestDir::new("mismatch");
    let b = file(&dir, "t", 1 << 20);
    drop(FlashEngine::open(&b, whole(&b), &cfg(16384, 4)).unwrap());
    let err = FlashEngine::open(&b, whole(&b), &cfg(65536, 4)).err().unwrap();
    assert!(err.to_string().contains("block size 16384, configured 65536"), "{err}");
    assert!(err.to_string().contains("--reformat-tiers"), "the error names the option: {err}");
    let smaller = Region { index: 0, start: 0, len: 512 << 10 };
    let err = FlashEngine::open(&b, smaller, &cfg(16384, 4)).err().unwrap();
    assert!(
        err.to_string().contains("formatted with region (index, start, length) (0, 0, 1048576)"),
        "{err}"
    );
    let mut disk = cfg(16384, 4);
    disk.tier = tier::DISK;
    let err = FlashEngine::open(&b, whole(&b), &disk).err().unwrap();
    assert!(err.to_string().contains("formatted with tier 1, configured 2"), "{err}");
    // A refused open wrote nothing: the region opens as it was formatted.
    let e = FlashEngine::open(&b, whole(&b), &cfg(16384, 4)).unwrap();
    assert!(!e.open_report().formatted && e.open_report().was_clean);
    drop(e);
    // A damaged superblock is never formatted over without being asked.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b.path).unwrap();
        f.write_all_at(b"X", 100).unwrap();
    }
    let err = FlashEngine::open(&b, whole(&b), &cfg(16384, 4)).err().unwrap();
    assert!(err.to_string().contains("corrupt superblock"), "{err}");
    // What a corrupt region holds cannot be told: keeping PERSIST blocks
    // means not formatting over it; discarding them is asked explicitly.
    let mut re = cfg(65536, 4);
    re.reformat = Reformat::KeepPersist;
    let err = FlashEngine::open(&b, whole(&b), &re).err().unwrap();
    assert!(err.to_string().contains("corrupt") && err.to_string().contains("--discard-persist"), "{err}");
    re.reformat = Reformat::DiscardPersist;
    let e = FlashEngine::open(&b, whole(&b), &re).unwrap();
    assert!(e.open_report().formatted);
    assert_eq!(e.block_size(), 65536);
}

/// A region's own superblock of other settings counts its PERSIST blocks
/// even when the walk of the earlier layout from the file's start stops
/// early (at a corrupt region 0).
#[test]
fn reformat_counts_a_region_s_own_persistent_blocks_behind_a_corrupt_one() {
    need_uring!();
    let dir = TestDir::new("reformat-own");
    let b = file(&dir, "t", 2 << 20);
    let halves = b.regions(2).unwrap();
    let mut engines: Vec<FlashEngine> =
        halves.iter().map(|r| FlashEngine::open(&b, *r, &cfg(16384, 4)).unwrap()).collect();
    let id = engines[1].alloc(1).unwrap();
    write(&mut engines[1], id, 0, b"kept").unwrap();
    persist(&mut engines[1], id).unwrap();
    drop(engines);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b.path).unwrap();
        f.write_all_at(b"X", 100).unwrap();
    }
    let mut other = cfg(65536, 4);
    other.reformat = Reformat::KeepPersist;
    let err = FlashEngine::check_open(&b, halves[0], &other).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    let err = FlashEngine::check_open(&b, halves[1], &other).unwrap_err();
    assert!(err.to_string().contains("1 persistent (PERSIST) block"), "{err}");
    // Refused opens wrote nothing: region 1 still opens with its settings.
    let mut e = FlashEngine::open(&b, halves[1], &cfg(16384, 4)).unwrap();
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"kept");
}

/// `Reformat`: a region made with other settings is formatted when asked,
/// unless it holds persistent blocks and only `KeepPersist` was asked; a
/// region that opens as it is keeps its blocks whatever is asked.
#[test]
fn reformat_keeps_persistent_blocks_unless_told() {
    need_uring!();
    let dir = TestDir::new("reformat");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(16384, 4)).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"kept").unwrap();
    persist(&mut e, id).unwrap();
    drop(e);
    let mut keep = cfg(16384, 4);
    keep.reformat = Reformat::KeepPersist;
    let mut e = FlashEngine::open(&b, whole(&b), &keep).unwrap();
    assert!(!e.open_report().formatted, "same settings: nothing to reformat");
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"kept");
    drop(e);
    // Two regions now (two cores): both overlap the old one and its block.
    let halves = b.regions(2).unwrap();
    let mut two = cfg(16384, 4);
    two.reformat = Reformat::KeepPersist;
    for r in &halves {
        let err = FlashEngine::check_open(&b, *r, &two).unwrap_err();
        assert!(err.to_string().contains("1 persistent (PERSIST) block"), "{err}");
        assert!(FlashEngine::open(&b, *r, &two).is_err());
    }
    let mut never = cfg(16384, 4);
    never.reformat = Reformat::Never;
    let err = FlashEngine::check_open(&b, halves[1], &never).unwrap_err();
    assert!(err.to_string().contains("lies inside region 0"), "{err}");
    two.reformat = Reformat::DiscardPersist;
    for r in &halves {
        FlashEngine::check_open(&b, *r, &two).unwrap();
    }
    let mut engines: Vec<FlashEngine> =
        halves.iter().map(|r| FlashEngine::open(&b, *r, &two).unwrap()).collect();
    assert!(engines.iter().all(|e| e.open_report().formatted && e.recovered_persistent().is_empty()));
    assert_eq!(read(&mut engines[0], id, 0, u32::MAX).unwrap_err(), StorageError::NotFound);
}

#[test]
fn sqpoll_mode_serves_requests() {
    need_uring!();
    let dir = TestDir::new("sqpoll");
    let b = file(&dir, "t", 1 << 20);
    let mut c = cfg(16384, 8);
    c.sqpoll = true;
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    // What this kernel does with SQPOLL, asked directly: the engine runs
    // it when allowed, and says why not when refused.
    let u = e.usage();
    let allowed: std::io::Result<IoUring> = IoUring::builder().setup_sqpoll(10).build(4);
    match allowed {
        Ok(_) => {
            assert!(e.mode().sqpoll(), "{u:?}");
            assert_eq!(u.refused, None);
        }
        Err(err) => {
            assert!(!e.mode().sqpoll(), "{u:?}");
            let why = u.refused.as_deref().unwrap_or_default();
            assert!(why.starts_with("sqpoll refused: "), "{err}: {u:?}");
        }
    }
    let id = e.alloc(1).unwrap();
    for k in 0..20u64 {
        let data = pattern(k, 1000 + k as usize * 300);
        write(&mut e, id, 0, &data).unwrap();
        assert_eq!(read(&mut e, id, 0, data.len() as u32).unwrap(), data);
    }
}

#[test]
fn two_engines_share_a_ring_with_the_network() {
    need_uring!();
    let dir = TestDir::new("shared");
    let b = file(&dir, "t", 8 << 20);
    let regions = b.regions(2).unwrap();
    let mut ring: IoUring = IoUring::builder().build(64).unwrap();
    ring.submitter().register_files_sparse(4).unwrap();
    ring.submitter().register_buffers_sparse(4).unwrap();
    let mut fc = cfg(16384, 8);
    fc.iopoll = false;
    let mut dc = fc.clone();
    dc.tier = tier::DISK;
    dc.policy = TierPolicy::DISK;
    let mut flash = FlashEngine::open_on(&b, regions[0], &fc, &ring, RingSlots { file: 0, buf: 0 }).unwrap();
    let mut disk = FlashEngine::open_on(&b, regions[1], &dc, &ring, RingSlots { file: 1, buf: 1 }).unwrap();
    assert!(flash.usage().registered && disk.usage().registered);
    let (f, d) = (flash.alloc(1).unwrap(), disk.alloc(1).unwrap());
    assert_eq!(d.tier(), tier::DISK);
    flash.submit_write(1, f, 3, b"on flash").unwrap();
    disk.submit_write(2, d, 4093, b"on disk").unwrap();
    // A network operation on the same ring (kind 1 in the top byte).
    let nop = opcode::Nop::new().build().user_data(1 << 56 | 42);
    // SAFETY: a no-op carries no buffer.
    unsafe { ring.submission().push(&nop).unwrap() };
    let mut got = Vec::new();
    let mut network = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "shared ring hangs");
        flash.push_submissions(&mut ring.submission());
        disk.push_submissions(&mut ring.submission());
        ring.submit_and_wait(1).unwrap();
        let cqes: Vec<_> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in cqes {
            if !tag::is_storage(ud) {
                assert_eq!(ud, 1 << 56 | 42);
                network += 1;
            } else if tag::engine(ud) == tier::FLASH {
                flash.complete(ud, res);
            } else {
                assert_eq!(tag::engine(ud), tier::DISK);
                disk.complete(ud, res);
            }
        }
        flash.deliver(|t, r| got.push((t, written(r))));
        disk.deliver(|t, r| got.push((t, written(r))));
    }
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        vec![
            (1, Err(StorageError::PastData { offset: 3, len: 0 })),
            (2, Err(StorageError::PastData { offset: 4093, len: 0 }))
        ]
    );
    assert_eq!(network, 1);
    // Now valid writes and a read back through the shared ring.
    flash.submit_write(3, f, 0, b"on flash").unwrap();
    disk.submit_write(4, d, 0, &pattern(4, 5000)).unwrap();
    let mut out = Vec::new();
    for step in 0..2 {
        if step == 1 {
            flash.submit_read(5, f, 3, 5).unwrap();
            disk.submit_read(6, d, 4093, 10).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = out.len() + 2;
        while out.len() < want {
            assert!(Instant::now() < deadline, "shared ring hangs");
            flash.push_submissions(&mut ring.submission());
            disk.push_submissions(&mut ring.submission());
            ring.submit_and_wait(1).unwrap();
            let cqes: Vec<_> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                match tag::engine(ud) {
                    tier::FLASH => flash.complete(ud, res),
                    _ => disk.complete(ud, res),
                }
            }
            flash.deliver(|t, r| out.push((t, r.unwrap())));
            disk.deliver(|t, r| out.push((t, r.unwrap())));
        }
    }
    out.sort_by_key(|o| o.0);
    match (&out[2].1, &out[3].1) {
        (Completion::Read(a), Completion::Read(b)) => {
            assert_eq!(&a[..], b"flash");
            assert_eq!(&b[..], &pattern(4, 5000)[4093..4103]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn forced_iopoll_runs_two_rings_and_never_hangs() {
    need_uring!();
    let dir = TestDir::new("iopoll");
    let b = file(&dir, "t", 1 << 20);
    super::engine::FORCE_IOPOLL.with(|f| f.set(true));
    let e = FlashEngine::open(&b, whole(&b), &cfg(16384, 4));
    super::engine::FORCE_IOPOLL.with(|f| f.set(false));
    let mut e = e.unwrap();
    if !e.mode().iopoll() {
        eprintln!("skipping: kernel refused an IOPOLL ring ({})", e.mode());
        return;
    }
    let id = e.alloc(1).unwrap();
    // The device may not poll (then the data I/O fails, as an error), but
    // the header write-back goes through the second, interrupt-driven ring.
    for r in [write(&mut e, id, 0, b"polled").map(|_| ()), read(&mut e, id, 0, u32::MAX).map(|_| ())] {
        match r {
            Ok(()) => {}
            Err(StorageError::Io { errno: libc::EOPNOTSUPP }) => {
                eprintln!("polled I/O on a device that cannot poll")
            }
            Err(other) => panic!("{other}"),
        }
    }
    persist(&mut e, id).unwrap();
    drop(e);
    let e = FlashEngine::open(&b, whole(&b), &cfg(16384, 4)).unwrap();
    assert!(e.open_report().was_clean);
    assert_eq!(e.recovered_persistent().len(), 1);
}

#[test]
fn completions_wake_a_registered_eventfd() {
    need_uring!();
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let dir = TestDir::new("waker");
    let b = file(&dir, "t", 1 << 20);
    let mut c = cfg(16384, 4);
    c.iopoll = false;
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
    e.register_waker(std::os::fd::AsRawFd::as_raw_fd(&efd)).unwrap();
    let id = e.alloc(1).unwrap();
    e.submit_write(1, id, 0, b"wake").unwrap();
    let mut got = Vec::new();
    e.poll_completions(|t, r| got.push((t, r)));
    // Without polling the engine again, the completion signals the eventfd.
    let deadline = Instant::now() + Duration::from_secs(10);
    while efd.read().is_err() {
        assert!(Instant::now() < deadline, "no wake-up");
        std::thread::sleep(Duration::from_millis(1));
    }
    if got.is_empty() {
        got = collect(&mut e, 1);
    }
    assert_eq!(written(got.pop().unwrap().1), Ok(4));
}

/// `can_park`: idle engines allow it; with work, only a registered waker
/// on interrupt-driven completions does, and never with polled I/O.
#[test]
fn parking_needs_a_waker_for_the_io_in_flight() {
    need_uring!();
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let dir = TestDir::new("can-park");
    let b = file(&dir, "t", 1 << 20);
    let mut c = cfg(16384, 4);
    c.iopoll = false;
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    assert!(e.can_park(), "an idle engine");
    let id = e.alloc(1).unwrap();
    e.submit_write(1, id, 0, b"x").unwrap();
    assert!(!e.can_park(), "submitted but not in the ring");
    let n = e.poll_completions(|_, _| {});
    if e.has_work() {
        assert!(!e.can_park(), "no waker: the completion would signal nothing");
    }
    collect(&mut e, 1 - n);
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
    e.register_waker(std::os::fd::AsRawFd::as_raw_fd(&efd)).unwrap();
    e.submit_write(2, id, 0, b"y").unwrap();
    let n = e.poll_completions(|_, _| {});
    if e.has_work() {
        assert!(e.can_park(), "in the ring, with a waker");
    }
    collect(&mut e, 1 - n);
    assert!(e.can_park());
    drop(e);
    super::engine::FORCE_IOPOLL.with(|f| f.set(true));
    let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
    super::engine::FORCE_IOPOLL.with(|f| f.set(false));
    e.register_waker(std::os::fd::AsRawFd::as_raw_fd(&efd)).unwrap();
    let id = e.alloc(1).unwrap();
    e.submit_write(3, id, 0, b"z").unwrap();
    let n = e.poll_completions(|_, _| {});
    if e.has_work() {
        assert!(!e.can_park(), "polled completions signal nothing");
    }
    collect(&mut e, 1 - n);
}

#[test]
fn read_buffers_outlive_the_engine() {
    need_uring!();
    let dir = TestDir::new("outlive");
    let b = file(&dir, "t", 1 << 20);
    let mut e = FlashEngine::open(&b, whole(&b), &cfg(16384, 4)).unwrap();
    let id = e.alloc(1).unwrap();
    write(&mut e, id, 0, b"still here").unwrap();
    e.submit_read(1, id, 6, 4).unwrap();
    let Completion::Read(buf) = one(&mut e).unwrap() else { panic!() };
    drop(e);
    assert_eq!(&buf[..], b"here");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Writes, appends and reads at random offsets and sizes, several
    /// submitted before any completes, read back as a model says.
    #[test]
    fn read_after_write(
        bs_shift in 0u32..3,
        batches in prop::collection::vec(
            prop::collection::vec((0u8..3, 0usize..3, any::<u32>(), any::<u32>()), 1..6),
            1..12,
        ),
    ) {
        if super::ring::build(4, false, false).is_err() {
            return Ok(());
        }
        let bs = 4096u32 << (bs_shift * 2);
        let dir = TestDir::new("prop");
        let b = file(&dir, "t", 8 * bs as u64 + (1 << 20));
        let mut c = cfg(bs, 8);
        c.policy.max_request = 8192;
        let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
        let ids: Vec<BlockId> = (0..3).map(|_| e.alloc(1).unwrap()).collect();
        let mut model: Vec<Vec<u8>> = vec![Vec::new(); 3];
        let mut seed = 0u64;
        for batch in batches {
            // Expected outcome of each request, in submission order.
            let mut expect: Vec<Result<Vec<u8>, StorageError>> = Vec::new();
            let mut expect_len: Vec<Option<u32>> = Vec::new();
            for (op, blk, x, y) in batch {
                let m = &mut model[blk];
                let t = expect.len() as u64;
                seed += 1;
                match op {
                    0 => {
                        // Write at an offset inside the data (or at its end).
                        let off = x % (m.len() as u32 + 1);
                        let len = y % (bs - off + 1);
                        let data = pattern(seed, len as usize);
                        e.submit_write(t, ids[blk], off, &data).unwrap();
                        let end = (off + len) as usize;
                        if m.len() < end { m.resize(end, 0); }
                        m[off as usize..end].copy_from_slice(&data);
                        expect.push(Ok(Vec::new()));
                        expect_len.push(Some(m.len() as u32));
                    }
                    1 => {
                        let room = bs - m.len() as u32;
                        let len = y % (room.min(3 * 4096) + 1);
                        let data = pattern(seed, len as usize);
                        e.submit_append(t, ids[blk], &data).unwrap();
                        m.extend_from_slice(&data);
                        expect.push(Ok(Vec::new()));
                        expect_len.push(Some(m.len() as u32));
                    }
                    _ => {
                        let off = x % (m.len() as u32 + 2);
                        let len = if y % 5 == 0 { u32::MAX } else { y % (bs + 1) };
                        e.submit_read(t, ids[blk], off, len).unwrap();
                        if off as usize > m.len() {
                            expect.push(Err(StorageError::PastData { offset: off, len: m.len() as u32 }));
                        } else {
                            let end = (off as u64 + len as u64).min(m.len() as u64) as usize;
                            expect.push(Ok(m[off as usize..end].to_vec()));
                        }
                        expect_len.push(None);
                    }
                }
            }
            let mut got = collect(&mut e, expect.len());
            got.sort_by_key(|d| d.0);
            for (t, r) in got {
                let t = t as usize;
                match (expect_len[t], r) {
                    (Some(len), r) => prop_assert_eq!(written(r), Ok(len), "request {}", t),
                    (None, r) => prop_assert_eq!(bytes(r), expect[t].clone(), "request {}", t),
                }
            }
        }
        for (blk, id) in ids.iter().enumerate() {
            prop_assert_eq!(read(&mut e, *id, 0, u32::MAX).unwrap(), model[blk].clone());
        }
    }
}

/// A loop device over a file, detached on drop.
struct LoopDev {
    dev: PathBuf,
    file: PathBuf,
    _dir: TestDir,
}

impl LoopDev {
    /// `None` (with the reason printed) unless running as root with a
    /// working `losetup`.
    fn attach(size: u64) -> Option<LoopDev> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping loop device test: not root");
            return None;
        }
        let dir = TestDir::new("loop");
        let file = dir.path().join("backing");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let out = match Command::new("losetup").arg("-f").arg("--show").arg(&file).output() {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                eprintln!(
                    "skipping loop device test: losetup: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("skipping loop device test: losetup: {e}");
                return None;
            }
        };
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDev { dev, file, _dir: dir })
    }

    /// Shrinks the backing file and tells the loop driver.
    fn shrink(&self, size: u64) {
        std::fs::OpenOptions::new().write(true).open(&self.file).unwrap().set_len(size).unwrap();
        let st = Command::new("losetup").arg("-c").arg(&self.dev).status().unwrap();
        assert!(st.success());
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn on_a_loop_device() {
    need_uring!();
    let Some(lo) = LoopDev::attach(64 << 20) else { return };
    let b = prepare_backing(&lo.dev, None).unwrap();
    assert!(b.block_device);
    assert_eq!(b.size, 64 << 20);
    assert!(prepare_backing(&lo.dev, Some(128 << 20)).is_err(), "larger than the device");
    let regions = b.regions(2).unwrap();
    let c = cfg(65536, 16);
    let id = {
        let mut e = FlashEngine::open(&b, regions[1], &c).unwrap();
        eprintln!("loop device mode: {}", e.mode());
        let ids: Vec<BlockId> = std::iter::from_fn(|| e.alloc(1).ok()).collect();
        for (k, id) in ids.iter().enumerate().step_by(37) {
            let data = pattern(k as u64, 1 + (k * 7919) % 65535);
            write(&mut e, *id, 0, &data).unwrap();
            assert_eq!(read(&mut e, *id, 0, u32::MAX).unwrap(), data);
        }
        write(&mut e, ids[1], 0, b"persistent on a device").unwrap();
        persist(&mut e, ids[1]).unwrap();
        ids[1]
    };
    let mut e = FlashEngine::open(&b, regions[1], &c).unwrap();
    assert_eq!(e.recovered_persistent().len(), 1);
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"persistent on a device");
    // The device shrinks under the engine: I/O past its end fails with an
    // error (ENOSPC for writes: "no capacity"), never a hang or a panic.
    let last = std::iter::from_fn(|| e.alloc(1).ok()).last().expect("free blocks");
    lo.shrink(40 << 20);
    let err = write(&mut e, last, 0, &pattern(1, 65536)).unwrap_err();
    assert!(matches!(err, StorageError::Io { .. }), "{err:?}");
    eprintln!("write past the shrunk device: {err} -> {}", err.status());
    assert_eq!(read(&mut e, id, 0, u32::MAX).unwrap(), b"persistent on a device");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Across clean and unclean restarts, exactly the persistent blocks
    /// come back, with their bytes and lengths; every other id is stale.
    #[test]
    fn restarts_keep_exactly_the_persistent(ops in prop::collection::vec((0u8..6, any::<u16>(), any::<u16>()), 1..60)) {
        if super::ring::build(4, false, false).is_err() {
            return Ok(());
        }
        let bs = 16384u32;
        let dir = TestDir::new("prop-restart");
        let b = file(&dir, "t", 512 << 10);
        let c = cfg(bs, 4);
        let mut e = Some(FlashEngine::open(&b, whole(&b), &c).unwrap());
        // (id, bytes, persistent)
        let mut live: Vec<(BlockId, Vec<u8>, bool)> = Vec::new();
        let mut gone: Vec<BlockId> = Vec::new();
        let mut seed = 0u64;
        for (op, x, y) in ops {
            seed += 1;
            let eng = e.as_mut().unwrap();
            let pick = if live.is_empty() { None } else { Some(x as usize % live.len()) };
            match (op, pick) {
                (0, _) => match eng.alloc(u64::from(x as u32)) {
                    Ok(id) => {
                        let data = pattern(seed, y as usize % bs as usize);
                        write(eng, id, 0, &data).unwrap();
                        live.push((id, data, false));
                    }
                    Err(err) => prop_assert_eq!(err, StorageError::NoCapacity),
                },
                (1, Some(i)) => {
                    let (id, _, _) = live.swap_remove(i);
                    eng.free(id).unwrap();
                    gone.push(id);
                }
                (2, Some(i)) => {
                    persist(eng, live[i].0).unwrap();
                    live[i].2 = true;
                }
                (3, Some(i)) => {
                    let room = bs as usize - live[i].1.len();
                    let data = pattern(seed, (y as usize).min(room));
                    append(eng, live[i].0, &data).unwrap();
                    live[i].1.extend_from_slice(&data);
                }
                (4 | 5, _) => {
                    let old = e.take().unwrap();
                    if op == 4 { drop(old) } else { old.crash() }
                    let mut eng = FlashEngine::open(&b, whole(&b), &c).unwrap();
                    prop_assert_eq!(eng.open_report().was_clean, op == 4);
                    gone.extend(live.iter().filter(|l| !l.2).map(|l| l.0));
                    live.retain(|l| l.2);
                    let mut want: Vec<_> = live.iter().map(|l| (l.0, l.0.index(), l.1.len() as u32)).collect();
                    let mut got: Vec<_> = eng.recovered_persistent().iter().map(|r| (r.0, r.0.index(), r.2)).collect();
                    want.sort();
                    got.sort();
                    prop_assert_eq!(got, want);
                    for l in &live {
                        prop_assert_eq!(read(&mut eng, l.0, 0, u32::MAX).unwrap(), l.1.clone());
                    }
                    e = Some(eng);
                }
                _ => {}
            }
            let eng = e.as_mut().unwrap();
            // A freed persistent block is reusable once its cleared entry is
            // on disk.
            let deadline = Instant::now() + Duration::from_secs(10);
            while eng.has_work() {
                prop_assert!(Instant::now() < deadline, "header write-back hangs");
                eng.poll_completions(|_, _| {});
                eng.wait(Duration::from_millis(5));
            }
            for g in &gone {
                prop_assert_eq!(eng.submit_read(0, *g, 0, 1), Err(StorageError::NotFound));
            }
            prop_assert_eq!(eng.usage().tier.blocks_used as usize, live.len());
        }
    }
}

/// Every submission batch size serves a burst of reads spread over blocks
/// (the rest of a burst goes in with later system calls), and a batch of
/// zero is refused at open.
#[test]
fn submission_batches_serve_a_burst() {
    need_uring!();
    let dir = TestDir::new("batches");
    let b = file(&dir, "t", 8 << 20);
    for batch in [1, 3, 64] {
        let mut c = cfg(16384, 48);
        c.policy.submit_batch = batch;
        c.iopoll = false;
        let mut e = FlashEngine::open(&b, whole(&b), &c).unwrap();
        let ids: Vec<BlockId> = (0..8).map(|_| e.alloc(1).unwrap()).collect();
        for (i, &id) in ids.iter().enumerate() {
            write(&mut e, id, 0, &pattern(i as u64, 16384)).unwrap();
        }
        for k in 0..40u64 {
            let i = (k % 8) as usize;
            e.submit_read(k, ids[i], (k as u32 % 4) * 4096, 4096).unwrap();
        }
        let mut got = collect(&mut e, 40);
        got.sort_by_key(|g| g.0);
        for (k, r) in got {
            let i = (k % 8) as usize;
            let at = (k as usize % 4) * 4096;
            assert_eq!(bytes(r).unwrap(), pattern(i as u64, 16384)[at..at + 4096], "batch {batch}, read {k}");
        }
        for id in ids {
            e.free(id).unwrap();
        }
    }
    let mut c = cfg(16384, 8);
    c.policy.submit_batch = 0;
    let err = FlashEngine::open(&b, whole(&b), &c).err().expect("a batch of 0 is refused");
    assert!(err.to_string().contains("submit batch 0"), "{err}");
}
