//! Frees the controller owes nodes: a job deregistered while one of its
//! storage nodes was down or unreachable leaves its blocks there. The
//! controller keeps, per node number, the `FreeOwner`s that node has not
//! acknowledged, sends them on every heartbeat reply (`FreeOwners`) until the
//! node's report lists them in `frees_done`, and, with a data directory,
//! keeps them in `DIR/owed-frees.json` across its own restarts.
//!
//! It also keeps the deregistrations it owes metadata nodes: a job
//! deregistered while its metadata node was down, or whose deregistration
//! call failed, is deregistered there when the node is back (and never
//! adopted meanwhile); kept in `DIR/owed-deregistrations.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::api::OwedFree;

/// The file, in the controller's data directory.
pub const FILE: &str = "owed-frees.json";
/// The owed deregistrations, in the controller's data directory.
pub const DEREG_FILE: &str = "owed-deregistrations.json";
/// Most frees sent on one reply (the rest follow on later ones).
pub const MAX_PER_REPLY: usize = 256;
/// Most frees owed in all: past it the oldest are dropped (with a warning),
/// so a node that never returns cannot grow the state without bound.
pub const MAX_OWED: usize = 100_000;

/// Node number → free id → the free.
type ByNode = BTreeMap<u16, BTreeMap<u64, OwedFree>>;

/// Job name → the metadata nodes (ids) that still hold it as registered
/// after it was deregistered through the controller.
type Deregs = BTreeMap<String, BTreeSet<String>>;

#[derive(Default)]
pub struct Owed {
    by_node: ByNode,
    deregs: Deregs,
    /// Writes the lists to the data directory; `None`: in memory only.
    writer: Option<Writer>,
}

/// Writes the owed lists from a thread of its own, so the caller (holding
/// the cluster lock, on a tokio worker) never waits for the disk: a save
/// hands over a snapshot, and the writer writes the newest one it has (a
/// snapshot replaced before it was written is never written: each one holds
/// everything).
struct Writer {
    shared: Arc<(Mutex<WriterState>, Condvar)>,
}

#[derive(Default)]
struct WriterState {
    /// The snapshot to write next (frees, deregistrations) and its number.
    pending: Option<(u64, Vec<u8>, Vec<u8>)>,
    /// Number of the newest snapshot handed over, and of the newest written (or failed).
    queued: u64,
    written: u64,
    /// Write errors not yet reported to a caller (at most [`MAX_ERRORS`]).
    errors: Vec<String>,
    /// The owner is gone: write what is pending and stop.
    closed: bool,
}

const MAX_ERRORS: usize = 16;

impl Writer {
    fn start(dir: &Path) -> Result<Writer, String> {
        let shared = Arc::new((Mutex::new(WriterState::default()), Condvar::new()));
        let (frees_path, deregs_path) = (dir.join(FILE), dir.join(DEREG_FILE));
        let s = shared.clone();
        std::thread::Builder::new()
            .name("owed-writer".into())
            .spawn(move || Writer::run(&s, &frees_path, &deregs_path))
            .map_err(|e| format!("cannot start the owed-frees writer: {e}"))?;
        Ok(Writer { shared })
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(shared: &(Mutex<WriterState>, Condvar), frees_path: &Path, deregs_path: &Path) {
        let (lock, cv) = shared;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let Some((n, frees, deregs)) = st.pending.take() else {
                if st.closed {
                    return;
                }
                st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            drop(st);
            let done = write_synced(frees_path, &frees).and_then(|()| write_synced(deregs_path, &deregs));
            st = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = done {
                tracing::error!("owed frees not kept on disk: {e}");
                if st.errors.len() < MAX_ERRORS {
                    st.errors.push(e);
                }
            }
            st.written = n;
            cv.notify_all();
        }
    }
}

impl Drop for Writer {
    /// Writes what is pending, then lets the thread end.
    fn drop(&mut self) {
        let mut st = self.lock();
        st.closed = true;
        self.shared.1.notify_all();
        while st.written < st.queued {
            st = self.shared.1.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Owed {
    /// The frees kept in `dir` (none when the file does not exist yet), or
    /// in memory only without a directory.
    pub fn open(dir: Option<&Path>) -> Result<Owed, String> {
        let Some(dir) = dir else { return Ok(Owed::default()) };
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let by_node: ByNode = read_json(&path, "a list of owed frees")?;
        let deregs: Deregs = read_json(&dir.join(DEREG_FILE), "a list of owed deregistrations")?;
        if deregs.len() > MAX_OWED {
            return Err(format!("{} lists more than {MAX_OWED} jobs", dir.join(DEREG_FILE).display()));
        }
        Ok(Owed { by_node, deregs, writer: Some(Writer::start(dir)?) })
    }

    /// Owes the deregistration of `job` to metadata node `node_id` (past
    /// [`MAX_OWED`] jobs the oldest name is dropped, with a warning).
    pub fn add_dereg(&mut self, job: &str, node_id: &str) {
        self.deregs.entry(job.to_string()).or_default().insert(node_id.to_string());
        while self.deregs.len() > MAX_OWED {
            let Some((j, _)) = self.deregs.pop_first() else { break };
            tracing::warn!(job = %j, "too many owed deregistrations: one is dropped");
        }
    }

    /// Whether a deregistration of `job` is owed (to any node).
    pub fn dereg_owed(&self, job: &str) -> bool {
        self.deregs.contains_key(job)
    }

    /// The deregistrations owed: (job, metadata node id).
    pub fn deregs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.deregs.iter().flat_map(|(j, ids)| ids.iter().map(move |id| (j.as_str(), id.as_str())))
    }

    /// `job` is no longer to be deregistered on `node_id` (it was, or the
    /// node is gone); true when that removed an owed deregistration.
    pub fn drop_dereg(&mut self, job: &str, node_id: &str) -> bool {
        let Some(ids) = self.deregs.get_mut(job) else { return false };
        let removed = ids.remove(node_id);
        if ids.is_empty() {
            self.deregs.remove(job);
        }
        removed
    }

    /// Forgets the deregistrations owed to `node_id` (it was stopped for good).
    pub fn forget_deregs(&mut self, node_id: &str) -> usize {
        let mut n = 0;
        self.deregs.retain(|_, ids| {
            n += usize::from(ids.remove(node_id));
            !ids.is_empty()
        });
        n
    }

    pub fn len(&self) -> usize {
        self.by_node.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.values().all(BTreeMap::is_empty)
    }

    /// The largest free id kept (ids must grow past it after a restart).
    pub fn max_id(&self) -> Option<u64> {
        self.by_node.values().filter_map(|m| m.keys().next_back().copied()).max()
    }

    /// Owes `free` to node `node`.
    pub fn add(&mut self, node: u16, free: OwedFree) {
        self.by_node.entry(node).or_default().insert(free.id, free);
        while self.len() > MAX_OWED {
            let oldest = self.by_node.iter().filter_map(|(n, m)| m.keys().next().map(|id| (*id, *n))).min();
            let Some((id, n)) = oldest else { break };
            if let Some(f) = self.by_node.get_mut(&n).and_then(|m| m.remove(&id)) {
                tracing::warn!(node = n, job = %f.job, "too many owed frees: the oldest is dropped");
            }
        }
    }

    /// What node `node` still has to free, oldest first, at most one reply's worth.
    pub fn for_node(&self, node: u16) -> Vec<OwedFree> {
        self.by_node.get(&node).map_or_else(Vec::new, |m| m.values().take(MAX_PER_REPLY).cloned().collect())
    }

    /// Node `node` applied the frees `done`: they are no longer owed.
    /// Returns the ones this removed.
    pub fn acknowledge(&mut self, node: u16, done: &[u64]) -> Vec<OwedFree> {
        let Some(m) = self.by_node.get_mut(&node) else { return Vec::new() };
        let gone: Vec<OwedFree> = done.iter().filter_map(|id| m.remove(id)).collect();
        if m.is_empty() {
            self.by_node.remove(&node);
        }
        gone
    }

    /// Forgets what node `node` owes (it was stopped for good).
    pub fn forget(&mut self, node: u16) -> usize {
        self.by_node.remove(&node).map_or(0, |m| m.len())
    }

    /// Hands the lists to the writer, if there is a data directory: it
    /// writes each file to a temporary file, synced, renamed over the old
    /// one, the directory synced, so a crash leaves the old list or the new
    /// one. Returns without waiting for the disk; the errors of earlier
    /// writes, if any, come back here.
    pub fn save(&self) -> Result<(), String> {
        let Some(w) = &self.writer else { return Ok(()) };
        let frees = serde_json::to_vec(&self.by_node).map_err(|e| format!("encoding the owed frees: {e}"))?;
        let deregs = serde_json::to_vec(&self.deregs)
            .map_err(|e| format!("encoding the owed deregistrations: {e}"))?;
        let mut st = w.lock();
        st.queued += 1;
        st.pending = Some((st.queued, frees, deregs));
        let errors = std::mem::take(&mut st.errors);
        drop(st);
        w.shared.1.notify_all();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Waits until everything saved so far is written (or failed).
    pub fn flush(&self) {
        let Some(w) = &self.writer else { return };
        let mut st = w.lock();
        let target = st.queued;
        while st.written < target {
            st = w.shared.1.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The JSON value in `path`, the empty value when there is no such file.
fn read_json<T: serde::de::DeserializeOwned + Default>(path: &Path, what: &str) -> Result<T, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| format!("{} is not {what}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `bytes` to `path` durably: a temporary file, synced, renamed over
/// the old one, the directory synced, so a crash leaves the old or the new.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(id: u64) -> OwedFree {
        OwedFree { id, job: format!("j{id}"), job_id: id as u32, meta_node: 1, keep: vec![id * 10] }
    }

    #[test]
    fn frees_are_kept_in_the_directory_until_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut o = Owed::open(Some(dir.path())).expect("open");
        assert!(o.is_empty());
        o.add(3, free(7));
        o.add(3, free(9));
        o.add(2, free(8));
        o.save().expect("save");
        o.flush();
        let mut again = Owed::open(Some(dir.path())).expect("reopen");
        assert_eq!(again.len(), 3);
        assert_eq!(again.max_id(), Some(9));
        assert_eq!(again.for_node(3), vec![free(7), free(9)]);
        assert_eq!(again.acknowledge(3, &[9, 100]), vec![free(9)]);
        assert_eq!(again.acknowledge(2, &[8]), vec![free(8)]);
        assert_eq!(again.for_node(2), vec![]);
        again.save().expect("save");
        again.flush();
        let last = Owed::open(Some(dir.path())).expect("reopen");
        assert_eq!(last.for_node(3), vec![free(7)]);
        assert_eq!(last.len(), 1);
    }

    /// A save hands the lists over and returns: the disk is written from
    /// the writer's thread. Here the temporary file is a FIFO nobody reads,
    /// where opening it for writing blocks; the save still returns at once,
    /// and the failed write (a FIFO cannot be synced) is reported by the next
    /// save, whose write then goes through.
    #[test]
    fn saving_does_not_wait_for_the_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let tmp = dir.path().join(FILE).with_extension("json.tmp");
        let made = std::process::Command::new("mkfifo").arg(&tmp).status().expect("run mkfifo");
        assert!(made.success(), "mkfifo {}", tmp.display());
        let mut o = Owed::open(Some(dir.path())).expect("open");
        o.add(3, free(7));
        let (tx, rx) = std::sync::mpsc::channel();
        let saver = std::thread::spawn(move || {
            let r = o.save();
            let _ = tx.send(());
            (o, r)
        });
        let returned = rx.recv_timeout(std::time::Duration::from_secs(2)).is_ok();
        // Read the FIFO: whoever opened it for writing goes on.
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::open(&tmp).expect("open the FIFO"), &mut got)
            .expect("read the FIFO");
        let (o, first) = saver.join().expect("saver");
        assert!(returned, "the save waited for the disk");
        assert_eq!(first, Ok(()));
        assert_eq!(got, serde_json::to_vec(&o.by_node).expect("encode"), "the writer wrote the snapshot");
        o.flush();
        std::fs::remove_file(&tmp).expect("remove the FIFO");
        let e = o.save().expect_err("the failed write is reported");
        assert!(e.contains("cannot write"), "{e}");
        o.flush();
        assert_eq!(o.save(), Ok(()));
        o.flush();
        assert_eq!(Owed::open(Some(dir.path())).expect("reopen").for_node(3), vec![free(7)]);
    }

    #[test]
    fn deregistrations_are_kept_until_done() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut o = Owed::open(Some(dir.path())).expect("open");
        o.add_dereg("a", "m1");
        o.add_dereg("b", "m2");
        o.save().expect("save");
        o.flush();
        let mut again = Owed::open(Some(dir.path())).expect("reopen");
        assert!(again.dereg_owed("a") && again.dereg_owed("b"));
        assert_eq!(again.deregs().collect::<Vec<_>>(), vec![("a", "m1"), ("b", "m2")]);
        assert!(!again.drop_dereg("a", "m2"), "owed to another node");
        assert!(again.drop_dereg("a", "m1"));
        assert_eq!(again.forget_deregs("m2"), 1);
        again.save().expect("save");
        again.flush();
        let last = Owed::open(Some(dir.path())).expect("reopen");
        assert!(!last.dereg_owed("a") && !last.dereg_owed("b"));
    }

    #[test]
    fn a_bad_file_is_refused_and_memory_only_needs_no_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(FILE), b"not json").expect("write");
        let e = Owed::open(Some(dir.path())).err().expect("refused");
        assert!(e.contains("not a list of owed frees"), "{e}");
        let mut mem = Owed::open(None).expect("memory");
        mem.add(1, free(1));
        mem.save().expect("nothing to write");
        assert_eq!(mem.forget(1), 1);
        assert!(mem.is_empty());
    }
}
