//! The durable metadata log: one append-only file per metadata core,
//! `<data_dir>/meta/core-<i>.log`. Every namespace mutation is one record;
//! records are written and fsync'd in batches (group commit) by a writer
//! thread per core, so the core never blocks on the disk: it keeps
//! executing, and answers a mutation once the writer reports its record
//! durable. On start the file is replayed into the core's namespaces; a torn
//! or corrupt tail (a record whose length or CRC does not check) is cut off
//! with a warning. When the file grows past a limit, the writer replaces it
//! with a snapshot of the namespaces (written as records too).
//!
//! The format is in `docs/metadata.md`.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use crate::proto::{DecodeError, JobHints, ObjectMeta, Reader};

/// First bytes of every log file.
pub const FILE_MAGIC: [u8; 8] = *b"PLNMETA\0";
/// The version this code writes. Version 2's Put records locate each block
/// on a node (`ObjectMeta` of protocol version 2).
pub const FILE_VERSION: u32 = 2;
/// Version 1 (Put records without node numbers) is still read: its blocks
/// are all on the local node, and the node rewrites the file as version 2.
pub const FILE_VERSION_1: u32 = 1;
/// magic 8 | version u32 | core u16 | cores u16 | block_size u32 | crc32 u32
pub const FILE_HEADER_LEN: usize = 24;
/// len u32 | crc32 u32, then `len` payload bytes.
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest record payload: a `PutObject` of the largest body a node takes
/// (`max_body` ≤ 2³¹ − 1) plus two keys.
pub const MAX_RECORD_LEN: usize = (1 << 31) + 4096;
/// Replace the log with a snapshot once it holds this many bytes.
pub const DEFAULT_SNAPSHOT_BYTES: u64 = 64 << 20;

/// Record types (the payload's first byte).
mod kind {
    pub const REGISTER: u8 = 1;
    pub const DEREGISTER: u8 = 2;
    pub const CREATE_DIR: u8 = 3;
    pub const PUT: u8 = 4;
    pub const DELETE: u8 = 5;
    pub const NEXT_ID: u8 = 6;
}

/// One namespace mutation, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// `RegisterJob` that handed out `id`.
    Register {
        job: &'a str,
        id: u32,
        hints: JobHints,
    },
    Deregister {
        job: &'a str,
    },
    CreateDir {
        job: &'a str,
        path: &'a str,
    },
    /// `PutObject`; `lost` only in snapshots: the object's data did not
    /// survive a restart and `meta.blocks` holds only the blocks that did.
    Put {
        job: &'a str,
        path: &'a str,
        meta: Cow<'a, ObjectMeta>,
        lost: bool,
    },
    /// `Delete` of an object or an empty directory (also an undone put).
    Delete {
        job: &'a str,
        path: &'a str,
    },
    /// Snapshots only: the core's next job sequence number.
    NextId {
        next: u32,
    },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_str<'a>(r: &mut Reader<'a>) -> Result<&'a str, DecodeError> {
    let n = r.u16("string length")? as usize;
    std::str::from_utf8(r.bytes(n, "string")?).map_err(|_| DecodeError("string is not UTF-8"))
}

impl<'a> Record<'a> {
    /// Appends the record (header and payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; RECORD_HEADER_LEN]);
        match self {
            Record::Register { job, id, hints } => {
                out.push(kind::REGISTER);
                put_str(out, job);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&hints.encode());
            }
            Record::Deregister { job } => {
                out.push(kind::DEREGISTER);
                put_str(out, job);
            }
            Record::CreateDir { job, path } => {
                out.push(kind::CREATE_DIR);
                put_str(out, job);
                put_str(out, path);
            }
            Record::Put { job, path, meta, lost } => {
                out.push(kind::PUT);
                put_str(out, job);
                put_str(out, path);
                out.push(*lost as u8);
                meta.encode(out);
            }
            Record::Delete { job, path } => {
                out.push(kind::DELETE);
                put_str(out, job);
                put_str(out, path);
            }
            Record::NextId { next } => {
                out.push(kind::NEXT_ID);
                out.extend_from_slice(&next.to_le_bytes());
            }
        }
        let payload = &out[start + RECORD_HEADER_LEN..];
        debug_assert!(payload.len() <= MAX_RECORD_LEN);
        let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one payload (whose CRC was checked) of a file of format
    /// `version`; a version 1 Put's blocks are placed on node `node`.
    pub fn decode(payload: &'a [u8], version: u32, node: u16) -> Result<Record<'a>, DecodeError> {
        let mut r = Reader::new(payload);
        let rec = match r.u8("record type")? {
            kind::REGISTER => {
                let job = get_str(&mut r)?;
                let id = r.u32("job id")?;
                let hints = JobHints::decode(r.bytes(JobHints::LEN, "hints")?)?;
                Record::Register { job, id, hints }
            }
            kind::DEREGISTER => Record::Deregister { job: get_str(&mut r)? },
            kind::CREATE_DIR => Record::CreateDir { job: get_str(&mut r)?, path: get_str(&mut r)? },
            kind::PUT => {
                let (job, path) = (get_str(&mut r)?, get_str(&mut r)?);
                let lost = match r.u8("lost")? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError("lost flag is not 0 or 1")),
                };
                let rest = r.rest();
                let meta = match version {
                    FILE_VERSION_1 => ObjectMeta::decode_v1(rest, node)?,
                    _ => ObjectMeta::decode(rest, rest.len() / crate::proto::LOCATION_LEN)?,
                };
                Record::Put { job, path, meta: Cow::Owned(meta), lost }
            }
            kind::DELETE => Record::Delete { job: get_str(&mut r)?, path: get_str(&mut r)? },
            kind::NEXT_ID => Record::NextId { next: r.u32("next id")? },
            _ => return Err(DecodeError("unknown record type")),
        };
        r.end("bytes after the record")?;
        Ok(rec)
    }
}

/// What the node was when it wrote a log; a log from another shape of node
/// cannot be replayed (jobs hash to cores by the core count, objects are cut
/// by the block size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogShape {
    pub core: u16,
    pub cores: u16,
    pub block_size: u32,
}

impl LogShape {
    fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        self.encode_version(FILE_VERSION)
    }

    /// The header of a file of format `version` (tests write version 1 files).
    pub fn encode_version(&self, version: u32) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&FILE_MAGIC);
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[12..14].copy_from_slice(&self.core.to_le_bytes());
        b[14..16].copy_from_slice(&self.cores.to_le_bytes());
        b[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        let crc = crc32fast::hash(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("metadata log {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("metadata log {}: {message}", path.display())]
    Refused { path: PathBuf, message: String },
}

/// A log file read at start: the records' bytes and where the valid part ends.
pub struct Recovered {
    /// The file's format version (`FILE_VERSION`, or `FILE_VERSION_1`).
    pub version: u32,
    /// Every valid record, back to back (headers included).
    pub records: Vec<u8>,
    /// Records cut off as torn or corrupt (a warning was logged).
    pub truncated_bytes: u64,
}

impl Recovered {
    /// The valid records, decoded in order; a version 1 file's blocks are
    /// placed on node `node` (this node). A record whose CRC checks but
    /// whose payload does not decode ends the iteration (it was cut off).
    pub fn iter(&self, node: u16) -> impl Iterator<Item = Record<'_>> {
        RecordIter { buf: &self.records, version: self.version, node }
    }
}

struct RecordIter<'a> {
    buf: &'a [u8],
    version: u32,
    node: u16,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Record<'a>;
    fn next(&mut self) -> Option<Record<'a>> {
        let (rec, len) = parse_one(self.buf, self.version, self.node)?;
        self.buf = &self.buf[len..];
        Some(rec)
    }
}

/// The record at the start of `buf` and its encoded length, or `None` if
/// `buf` does not start with a whole, intact, decodable record.
fn parse_one(buf: &[u8], version: u32, node: u16) -> Option<(Record<'_>, usize)> {
    if buf.len() < RECORD_HEADER_LEN {
        return None;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
    if len == 0 || len > MAX_RECORD_LEN || buf.len() - RECORD_HEADER_LEN < len {
        return None;
    }
    let payload = &buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        return None;
    }
    Some((Record::decode(payload, version, node).ok()?, RECORD_HEADER_LEN + len))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

/// The log file of metadata core `core` under `dir`.
pub fn log_path(dir: &Path, core: usize) -> PathBuf {
    dir.join(format!("core-{core}.log"))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// An exclusive lock on a log directory (`DIR/LOCK`, flock), held while a
/// node uses it: two nodes appending to the same logs would corrupt them.
pub struct DirLock {
    _file: nix::fcntl::Flock<File>,
}

/// Takes the lock on `dir` (created if missing), or says that another
/// process holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LogError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("LOCK");
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(DirLock { _file: l }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LogError::Refused {
            path,
            message: "in use by another running node (each node needs its own data directory)".into(),
        }),
        Err((_, e)) => Err(io(&path)(e.into())),
    }
}

/// Opens (creating if missing) the log of `shape.core` in `dir`, checks its
/// header against `shape`, and reads its valid records. A torn or corrupt
/// tail is truncated away (and the file synced) with a warning.
pub fn recover(dir: &Path, shape: LogShape) -> Result<(Recovered, File), LogError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = log_path(dir, shape.core as usize);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    let header = shape.encode();
    if bytes.len() < FILE_HEADER_LEN && !header.starts_with(&bytes) {
        let message = "shorter than a log header and not the start of one: not a Pollen metadata log";
        return Err(LogError::Refused { path, message: message.into() });
    }
    if bytes.len() < FILE_HEADER_LEN {
        // Missing, or torn while it was being created: nothing was logged.
        if !bytes.is_empty() {
            tracing::warn!(path = %path.display(), len = bytes.len(), "metadata log shorter than its header; starting it again");
        }
        let tmp = path.with_extension("log.new");
        write_file(&tmp, &header, &[])?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)?;
        let f = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        return Ok((Recovered { version: FILE_VERSION, records: Vec::new(), truncated_bytes: 0 }, f));
    }
    let refuse = |message: String| Err(LogError::Refused { path: path.clone(), message });
    if bytes[0..8] != FILE_MAGIC {
        return refuse("not a Pollen metadata log (bad magic)".into());
    }
    let found_crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if crc32fast::hash(&bytes[..20]) != found_crc {
        return refuse("the file header is corrupt (CRC mismatch)".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FILE_VERSION && version != FILE_VERSION_1 {
        return refuse(format!(
            "format version {version}; this node reads versions {FILE_VERSION_1} and {FILE_VERSION}"
        ));
    }
    if bytes[..FILE_HEADER_LEN] != shape.encode_version(version) {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let bs = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        return refuse(format!(
            "written by core {} of a node with {} cores and {bs}-byte blocks; this node has {} cores and \
             {}-byte blocks (start it with the same --cores and --block-size, or move the directory away)",
            u16_at(12),
            u16_at(14),
            shape.cores,
            shape.block_size
        ));
    }
    let mut off = FILE_HEADER_LEN;
    while let Some((_, len)) = parse_one(&bytes[off..], version, 0) {
        off += len;
    }
    let truncated = (bytes.len() - off) as u64;
    if truncated > 0 {
        tracing::warn!(
            path = %path.display(),
            offset = off,
            bytes = truncated,
            "metadata log ends in a torn or corrupt record; truncating it there (mutations that were never acknowledged)"
        );
        let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
        f.set_len(off as u64).and_then(|()| f.sync_all()).map_err(io(&path))?;
    }
    let f = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
    let records = bytes[FILE_HEADER_LEN..off].to_vec();
    Ok((Recovered { version, records, truncated_bytes: truncated }, f))
}

/// Replaces the log of `shape.core` in `dir` with `records` under a header
/// of the current version (a version 1 log converted at start): written to
/// a new file, synced and renamed over the old one, so a crash leaves one
/// or the other. Returns the new file, open for appending.
pub fn rewrite(dir: &Path, shape: LogShape, records: &[u8]) -> Result<File, LogError> {
    let path = log_path(dir, shape.core as usize);
    let tmp = path.with_extension("log.new");
    write_file(&tmp, &shape.encode(), records)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    OpenOptions::new().append(true).open(&path).map_err(io(&path))
}

fn write_file(path: &Path, header: &[u8], body: &[u8]) -> Result<(), LogError> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io(path))?;
    f.write_all(header).and_then(|()| f.write_all(body)).and_then(|()| f.sync_all()).map_err(io(path))
}

/// Work for the writer thread.
enum Cmd {
    /// Append these records; they end at log position `end`.
    Append { buf: Vec<u8>, end: u64 },
    /// Replace the file with these records (a snapshot of everything up to `end`).
    Replace { buf: Vec<u8>, end: u64 },
}

/// The writer's side: what it reports back to the core.
struct Shared {
    /// Log position (bytes appended since the node started) up to which
    /// every record is on the device.
    durable: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

/// A metadata core's log: records appended by the core, written and synced
/// by a writer thread. Positions are byte counts since the node started.
pub struct MetaLog {
    cmds: Option<mpsc::Sender<Cmd>>,
    /// Buffers the writer is done with, for reuse.
    spent: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Records appended since the last hand-over to the writer.
    pending: Vec<u8>,
    appended: u64,
    submitted: u64,
    /// Bytes in the file (header excluded) after the hand-overs so far.
    file_len: u64,
    snapshot_bytes: u64,
}

impl MetaLog {
    /// Starts the writer of a recovered log file. `wake` is called after
    /// each batch is durable (or the writer failed), from the writer thread.
    pub fn start(
        dir: &Path,
        shape: LogShape,
        file: File,
        file_len: u64,
        snapshot_bytes: u64,
        wake: Box<dyn Fn() + Send>,
    ) -> Result<MetaLog, LogError> {
        let (cmds, rx) = mpsc::channel::<Cmd>();
        let (spent_tx, spent) = mpsc::channel::<Vec<u8>>();
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let w = Writer { dir: dir.to_path_buf(), shape, file, shared: shared.clone(), wake, spent: spent_tx };
        let path = log_path(dir, shape.core as usize);
        let thread = std::thread::Builder::new()
            .name(format!("pollen-metalog-{}", shape.core))
            .spawn(move || w.run(rx))
            .map_err(io(&path))?;
        Ok(MetaLog {
            cmds: Some(cmds),
            spent,
            shared,
            thread: Some(thread),
            pending: Vec::new(),
            appended: 0,
            submitted: 0,
            file_len,
            snapshot_bytes: snapshot_bytes.max(1),
        })
    }

    /// Appends a record; returns the log position at its end. It is durable
    /// once `durable()` reaches that position.
    pub fn append(&mut self, rec: &Record<'_>) -> u64 {
        let before = self.pending.len();
        rec.encode(&mut self.pending);
        self.appended += (self.pending.len() - before) as u64;
        self.appended
    }

    /// The position after the last appended record.
    pub fn end(&self) -> u64 {
        self.appended
    }

    pub fn durable(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Why the log stopped accepting records, once the writer failed.
    pub fn failure(&self) -> Option<String> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(self.shared.error.lock().map(|e| e.clone().unwrap_or_default()).unwrap_or_default())
    }

    /// Records appended but not handed to the writer yet.
    pub fn has_unsubmitted(&self) -> bool {
        self.appended > self.submitted
    }

    /// Hands the appended records to the writer if it is idle (group
    /// commit: while it syncs one batch, the next accumulates). When the
    /// file has grown past the snapshot limit, `snapshot` encodes the whole
    /// state as records instead, and the writer replaces the file with it.
    /// Returns true if something was handed over.
    pub fn pump(&mut self, snapshot: impl FnOnce(&mut Vec<u8>)) -> bool {
        if !self.has_unsubmitted() || self.durable() < self.submitted || self.failure().is_some() {
            return false;
        }
        let Some(cmds) = &self.cmds else { return false };
        let mut next = self.spent.try_recv().unwrap_or_default();
        next.clear();
        let end = self.appended;
        let cmd = if self.file_len + self.pending.len() as u64 > self.snapshot_bytes {
            // The snapshot subsumes the pending records.
            snapshot(&mut next);
            self.file_len = next.len() as u64;
            self.pending.clear();
            Cmd::Replace { buf: next, end }
        } else {
            self.file_len += self.pending.len() as u64;
            Cmd::Append { buf: std::mem::replace(&mut self.pending, next), end }
        };
        self.submitted = end;
        if cmds.send(cmd).is_err() {
            self.shared.fail("the metadata log writer thread is gone".into());
        }
        true
    }
}

impl Drop for MetaLog {
    /// Hands over what is still pending (a clean stop loses nothing) and
    /// stops the writer once it has written everything.
    fn drop(&mut self) {
        if self.has_unsubmitted() && self.failure().is_none() {
            if let Some(cmds) = &self.cmds {
                let buf = std::mem::take(&mut self.pending);
                let _ = cmds.send(Cmd::Append { buf, end: self.appended });
            }
        }
        self.cmds = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn fail(&self, message: String) {
        if let Ok(mut e) = self.error.lock() {
            e.get_or_insert(message);
        }
        self.failed.store(true, Ordering::Release);
    }
}

struct Writer {
    dir: PathBuf,
    shape: LogShape,
    file: File,
    shared: Arc<Shared>,
    wake: Box<dyn Fn() + Send>,
    spent: mpsc::Sender<Vec<u8>>,
}

impl Writer {
    fn run(mut self, cmds: mpsc::Receiver<Cmd>) {
        while let Ok(cmd) = cmds.recv() {
            let (buf, end, r) = match cmd {
                Cmd::Append { buf, end } => {
                    let r = self.file.write_all(&buf).and_then(|()| self.file.sync_data());
                    let path = log_path(&self.dir, self.shape.core as usize);
                    (buf, end, r.map_err(io(&path)))
                }
                Cmd::Replace { buf, end } => {
                    let r = self.replace(&buf);
                    (buf, end, r)
                }
            };
            match r {
                Ok(()) => self.shared.durable.store(end, Ordering::Release),
                Err(e) => {
                    tracing::error!(error = %e, "metadata log write failed; namespace changes are refused from now on");
                    self.shared.fail(e.to_string());
                }
            }
            (self.wake)();
            let _ = self.spent.send(buf);
            if self.shared.failed.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// Writes the snapshot to a new file, syncs it, and renames it over the log.
    fn replace(&mut self, records: &[u8]) -> Result<(), LogError> {
        let path = log_path(&self.dir, self.shape.core as usize);
        let tmp = path.with_extension("log.new");
        write_file(&tmp, &self.shape.encode(), records)?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        tracing::info!(path = %path.display(), bytes = records.len(), "metadata log compacted into a snapshot");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{BlockId, Location};

    fn shape() -> LogShape {
        LogShape { core: 0, cores: 1, block_size: 4096 }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pollen-metalog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn sample() -> Vec<Record<'static>> {
        let at = |node, b| Location { node, block: BlockId(b) };
        let meta = ObjectMeta { size: 5000, flags: 1, blocks: vec![at(0, 7), at(3, 1 << 56 | 9)] };
        vec![
            Record::Register { job: "j", id: 1, hints: JobHints { max_workers: 3, ..JobHints::default() } },
            Record::CreateDir { job: "j", path: "d" },
            Record::Put { job: "j", path: "d/x", meta: Cow::Owned(meta), lost: false },
            Record::Delete { job: "j", path: "d/x" },
            Record::Deregister { job: "j" },
            Record::NextId { next: 42 },
        ]
    }

    #[test]
    fn records_round_trip() {
        for r in sample() {
            let mut b = Vec::new();
            r.encode(&mut b);
            let (back, len) = parse_one(&b, FILE_VERSION, 0).expect("decodes");
            assert_eq!((back, len), (r, b.len()));
        }
    }

    fn wait_durable(log: &MetaLog, pos: u64) {
        let t = std::time::Instant::now();
        while log.durable() < pos {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "log never became durable");
            std::thread::yield_now();
        }
    }

    #[test]
    fn appended_records_are_recovered_and_a_torn_tail_is_cut() {
        let dir = tmp("torn");
        let (rec, f) = recover(&dir, shape()).unwrap();
        assert!(rec.records.is_empty());
        let mut log = MetaLog::start(&dir, shape(), f, 0, 1 << 30, Box::new(|| {})).unwrap();
        let mut end = 0;
        for r in sample() {
            end = log.append(&r);
        }
        assert!(log.pump(|_| unreachable!("no snapshot below the limit")));
        wait_durable(&log, end);
        drop(log);
        // A torn record: a header promising more than is there, and garbage.
        let path = log_path(&dir, 0);
        let good = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
        drop(f);
        let (rec, _) = recover(&dir, shape()).unwrap();
        assert_eq!(rec.iter(0).collect::<Vec<_>>(), sample());
        assert_eq!(rec.truncated_bytes, 10);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "the tail was cut off the file");
        // A flipped bit in the last record: its CRC fails, it goes too.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (rec, _) = recover(&dir, shape()).unwrap();
        let want = sample();
        assert_eq!(rec.iter(0).collect::<Vec<_>>(), want[..want.len() - 1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_log_reads_with_every_block_on_this_node_and_is_rewritten() {
        let dir = tmp("v1");
        std::fs::create_dir_all(&dir).unwrap();
        // Version 1's Put: the ObjectMeta without node numbers.
        let mut put = vec![kind::PUT];
        put_str(&mut put, "j");
        put_str(&mut put, "x");
        put.push(0);
        put.extend_from_slice(&5000u64.to_le_bytes());
        put.extend_from_slice(&0u16.to_le_bytes());
        put.extend_from_slice(&2u32.to_le_bytes());
        put.extend_from_slice(&7u64.to_le_bytes());
        put.extend_from_slice(&(1u64 << 56 | 9).to_le_bytes());
        let mut file = shape().encode_version(FILE_VERSION_1).to_vec();
        Record::Register { job: "j", id: 1, hints: JobHints::default() }.encode(&mut file);
        file.extend_from_slice(&(put.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&put).to_le_bytes());
        file.extend_from_slice(&put);
        std::fs::write(log_path(&dir, 0), &file).unwrap();
        let (rec, _) = recover(&dir, shape()).unwrap();
        assert_eq!((rec.version, rec.truncated_bytes), (FILE_VERSION_1, 0));
        let at = |b| Location { node: 12, block: BlockId(b) };
        let meta = ObjectMeta { size: 5000, flags: 0, blocks: vec![at(7), at(1 << 56 | 9)] };
        let want = vec![
            Record::Register { job: "j", id: 1, hints: JobHints::default() },
            Record::Put { job: "j", path: "x", meta: Cow::Owned(meta), lost: false },
        ];
        assert_eq!(rec.iter(12).collect::<Vec<_>>(), want);
        let mut v2 = Vec::new();
        for r in &want {
            r.encode(&mut v2);
        }
        drop(rewrite(&dir, shape(), &v2).unwrap());
        let (again, _) = recover(&dir, shape()).unwrap();
        assert_eq!(again.version, FILE_VERSION);
        assert_eq!(again.iter(0).collect::<Vec<_>>(), want, "version 2 keeps the node numbers");
        std::fs::write(log_path(&dir, 0), shape().encode_version(3)).unwrap();
        let e = recover(&dir, shape()).err().expect("refused").to_string();
        assert!(e.contains("format version 3"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_is_locked_while_in_use() {
        let dir = tmp("lock");
        let l = lock_dir(&dir).unwrap();
        let e = lock_dir(&dir).err().expect("locked").to_string();
        assert!(e.contains("in use by another running node"), "{e}");
        drop(l);
        lock_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_clean_stop_writes_what_is_pending() {
        let dir = tmp("stop");
        let (_, f) = recover(&dir, shape()).unwrap();
        let mut log = MetaLog::start(&dir, shape(), f, 0, 1 << 30, Box::new(|| {})).unwrap();
        log.append(&Record::NextId { next: 5 });
        drop(log);
        let (rec, _) = recover(&dir, shape()).unwrap();
        assert_eq!(rec.iter(0).collect::<Vec<_>>(), vec![Record::NextId { next: 5 }]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_of_another_node_shape_is_refused() {
        let dir = tmp("shape");
        drop(recover(&dir, shape()).unwrap());
        let other = LogShape { cores: 1, core: 0, block_size: 8192 };
        let e = recover(&dir, other).err().expect("refused").to_string();
        assert!(e.contains("4096-byte blocks"), "{e}");
        for other in [&b"short"[..], b"something else entirely, and longer"] {
            std::fs::write(log_path(&dir, 0), other).unwrap();
            assert!(matches!(recover(&dir, shape()), Err(LogError::Refused { .. })));
        }
        // A header torn while the file was created: started again.
        std::fs::write(log_path(&dir, 0), &shape().encode()[..10]).unwrap();
        let (rec, _) = recover(&dir, shape()).unwrap();
        assert!(rec.records.is_empty());
        assert_eq!(std::fs::metadata(log_path(&dir, 0)).unwrap().len(), FILE_HEADER_LEN as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn past_the_limit_the_log_is_replaced_by_a_snapshot() {
        let dir = tmp("snap");
        let (_, f) = recover(&dir, shape()).unwrap();
        let mut log = MetaLog::start(&dir, shape(), f, 0, 100, Box::new(|| {})).unwrap();
        let mut end = 0;
        for i in 0..10 {
            end = log.append(&Record::NextId { next: i });
        }
        let snap = Record::Register { job: "only", id: 9, hints: JobHints::default() };
        assert!(log.pump(|out| snap.encode(out)));
        wait_durable(&log, end);
        assert!(!log.pump(|_| {}), "nothing left to hand over");
        let after = log.append(&Record::Deregister { job: "only" });
        assert!(log.pump(|_| unreachable!("the snapshot is below the limit")));
        wait_durable(&log, after);
        drop(log);
        let (rec, _) = recover(&dir, shape()).unwrap();
        assert_eq!(rec.iter(0).collect::<Vec<_>>(), vec![snap, Record::Deregister { job: "only" }]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
