//! Job namespaces (Pocket's metadata): jobs, directories and objects as
//! ordered lists of block locations (node number, block id). One
//! `Namespaces` per core holds the jobs whose name hashes to that core. It
//! never touches blocks: freeing the blocks of this node is returned to the
//! caller as an effect; blocks on other nodes are the client's to free
//! (`remote_blocks`).

pub mod cluster;
pub mod log;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use crate::proto::{flags, BlockId, DirEntry, JobHints, JobInfo, Location, ObjectMeta, Status};
use log::Record;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct MetaError {
    pub status: Status,
    pub message: String,
}

fn err(status: Status, message: impl Into<String>) -> MetaError {
    MetaError { status, message: message.into() }
}

/// The ids of the blocks in `locs` that are on node `node`.
fn on_node(node: u16, locs: &[Location]) -> impl Iterator<Item = BlockId> + '_ {
    locs.iter().filter(move |l| l.node == node).map(|l| l.block)
}

/// Blocks of this node the caller must free after a namespace change.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    None,
    Blocks(Vec<BlockId>),
    /// Free the blocks of the job's dropped objects (`drop`, by id, whatever
    /// id allocated them) and everything job `job` allocated on every core,
    /// except `keep`.
    Job {
        job: u32,
        keep: Vec<BlockId>,
        drop: Vec<BlockId>,
    },
}

enum Entry {
    Dir,
    /// An object, and whether its data was lost in a restart (its block
    /// list then holds only the blocks that survived, for freeing).
    Object(ObjectMeta, bool),
}

struct Job {
    id: u32,
    hints: JobHints,
    registered: bool,
    /// Full paths inside the job ("a", "a/b"); the root is implicit.
    entries: BTreeMap<String, Entry>,
    bytes: u64,
    objects: u64,
}

impl Job {
    fn parent_exists(&self, path: &str) -> bool {
        match path.rfind('/') {
            None => true,
            Some(i) => matches!(self.entries.get(&path[..i]), Some(Entry::Dir)),
        }
    }

    fn has_children(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.entries.range(prefix.clone()..).next().is_some_and(|(k, _)| k.starts_with(&prefix))
    }
}

/// Per-job summary for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    pub name: String,
    pub id: u32,
    pub registered: bool,
    pub objects: u64,
    pub bytes: u64,
}

/// Largest per-core job sequence number (the low 24 bits of a job id).
const MAX_JOB_SEQ: u32 = (1 << 24) - 1;

pub struct Namespaces {
    core: u8,
    /// This node's number: locations on it are its own blocks.
    node: u16,
    block_size: u64,
    next_id: u32,
    jobs: HashMap<String, Job>,
    /// Ids of registered jobs: never handed out twice at once.
    live_ids: std::collections::HashSet<u32>,
}

impl Namespaces {
    pub fn new(core: u8, block_size: u64, node: u16) -> Self {
        assert!(block_size.is_power_of_two());
        Namespaces { core, node, block_size, next_id: 1, jobs: HashMap::new(), live_ids: Default::default() }
    }

    /// The node number whose blocks this node frees itself.
    pub fn node(&self) -> u16 {
        self.node
    }

    fn job(&self, name: &str) -> Result<&Job, MetaError> {
        match self.jobs.get(name) {
            Some(j) if j.registered => Ok(j),
            _ => Err(err(Status::NotFound, format!("job '{name}' is not registered"))),
        }
    }

    fn job_mut(&mut self, name: &str) -> Result<&mut Job, MetaError> {
        match self.jobs.get_mut(name) {
            Some(j) if j.registered => Ok(j),
            _ => Err(err(Status::NotFound, format!("job '{name}' is not registered"))),
        }
    }

    /// A fresh job id: the high byte is the metadata core, the low 24 bits a
    /// sequence that wraps after 16.7M registrations, skipping live ids and
    /// storage's reserved owners.
    fn fresh_id(&mut self) -> Option<u32> {
        for _ in 0..MAX_JOB_SEQ {
            let seq = self.next_id;
            self.next_id = if seq >= MAX_JOB_SEQ { 1 } else { seq + 1 };
            let id = (self.core as u32) << 24 | seq;
            if id < crate::storage::FIRST_RESERVED_JOB_ID && !self.live_ids.contains(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Job ids are unique among registered jobs of the node. A deregistered
    /// job that kept PERSIST objects gets a fresh id when it registers again,
    /// so frees still travelling for the old id cannot touch blocks
    /// allocated under the new one (ids recur only after 16.7M registrations
    /// on one core).
    pub fn register(&mut self, name: &str, hints: JobHints) -> Result<u32, MetaError> {
        if name.contains('/') || name.is_empty() {
            return Err(err(Status::Malformed, "job names are non-empty and have no '/'"));
        }
        if self.jobs.get(name).is_some_and(|j| j.registered) {
            return Err(err(Status::Exists, format!("job '{name}' is already registered")));
        }
        let Some(id) = self.fresh_id() else {
            return Err(err(Status::NoCapacity, "every job id of this core is in use"));
        };
        self.register_as(name, id, hints);
        Ok(id)
    }

    /// Registers `name` under `id`, which is free.
    fn register_as(&mut self, name: &str, id: u32, hints: JobHints) {
        debug_assert!(!self.live_ids.contains(&id));
        self.live_ids.insert(id);
        if let Some(j) = self.jobs.get_mut(name) {
            j.id = id;
            j.registered = true;
            j.hints = hints;
            return;
        }
        let job = Job { id, hints, registered: true, entries: BTreeMap::new(), bytes: 0, objects: 0 };
        self.jobs.insert(name.to_string(), job);
    }

    /// Replays one logged mutation (see `log`). Records were logged only
    /// after they succeeded, so replaying them in order succeeds too; an
    /// error means the log does not match this code.
    pub fn apply(&mut self, rec: &Record<'_>) -> Result<(), MetaError> {
        match rec {
            Record::Register { job, id, hints } => {
                if self.jobs.get(*job).is_some_and(|j| j.registered) || self.live_ids.contains(id) {
                    return Err(err(Status::Exists, format!("job '{job}' or id {id:#x} is registered")));
                }
                if *id >> 24 != self.core as u32
                    || *id & MAX_JOB_SEQ == 0
                    || *id >= crate::storage::FIRST_RESERVED_JOB_ID
                {
                    return Err(err(Status::Malformed, format!("job id {id:#x} is not one of this core's")));
                }
                self.register_as(job, *id, *hints);
                let seq = id & MAX_JOB_SEQ;
                self.next_id = if seq >= MAX_JOB_SEQ { 1 } else { seq + 1 };
                Ok(())
            }
            Record::Deregister { job } => self.deregister(job).map(drop),
            Record::CreateDir { job, path } => self.create_dir(job, path),
            Record::Put { job, path, meta, lost: false } => self.put(job, path, meta.clone().into_owned()),
            Record::Put { job, path, meta, lost: true } => {
                // Logged when another node restarted: the object is lost from
                // then on and keeps only the blocks that survived
                // (`mark_node_lost`). Sizes and counts do not change. Like
                // `mark_node_lost`, it applies to a deregistered job's
                // (PERSIST) objects too.
                let Some(j) = self.jobs.get_mut(*job) else {
                    return Err(err(Status::NotFound, format!("job '{job}' is not known")));
                };
                if let Some(Entry::Object(m, lost)) = j.entries.get_mut(*path) {
                    *m = meta.clone().into_owned();
                    *lost = true;
                    return Ok(());
                }
                if path.is_empty() || j.entries.contains_key(*path) || !j.parent_exists(path) {
                    return Err(err(Status::Malformed, format!("lost object '{path}' does not fit")));
                }
                j.objects += 1;
                j.bytes += meta.size;
                j.entries.insert(path.to_string(), Entry::Object(meta.clone().into_owned(), true));
                Ok(())
            }
            // A deregistered job's object is deleted only by undoing its
            // PERSIST put (`remove_object`), which the record replays.
            Record::Delete { job, path } if self.jobs.get(*job).is_some_and(|j| !j.registered) => {
                match self.take_object(job, path, |_| true) {
                    Some(_) => Ok(()),
                    None => Err(err(Status::NotFound, format!("no object '{path}' in job '{job}'"))),
                }
            }
            Record::Delete { job, path } => self.delete(job, path).map(drop),
            Record::NextId { next } => {
                self.next_id = (*next).clamp(1, MAX_JOB_SEQ);
                Ok(())
            }
        }
    }

    /// The whole state as log records (a snapshot replaces the log with them).
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        let mut names: Vec<&String> = self.jobs.keys().collect();
        // Unregistered jobs first: their ids are released again before a
        // registered job that got the same id (after a wrap) is replayed.
        names.sort_by_key(|n| (self.jobs[*n].registered, *n));
        for name in names {
            let j = &self.jobs[name];
            Record::Register { job: name, id: j.id, hints: j.hints }.encode(out);
            for (path, e) in &j.entries {
                match e {
                    Entry::Dir => Record::CreateDir { job: name, path }.encode(out),
                    Entry::Object(m, lost) => {
                        Record::Put { job: name, path, meta: Cow::Borrowed(m), lost: *lost }.encode(out)
                    }
                }
            }
            if !j.registered {
                Record::Deregister { job: name }.encode(out);
            }
        }
        Record::NextId { next: self.next_id }.encode(out);
    }

    /// After a restart: every object keeps only the blocks of this node
    /// that survived (`survives`) and its blocks on other nodes, and one
    /// that lost any is marked lost (its reads answer `data unavailable`).
    /// Returns the surviving blocks of this node that objects name.
    pub fn settle_after_restart(&mut self, survives: impl Fn(BlockId) -> bool) -> Vec<BlockId> {
        let mut named = Vec::new();
        let node = self.node;
        for j in self.jobs.values_mut() {
            for e in j.entries.values_mut() {
                if let Entry::Object(m, lost) = e {
                    let before = m.blocks.len();
                    m.blocks.retain(|l| l.node != node || survives(l.block));
                    *lost |= m.blocks.len() < before;
                    named.extend(on_node(node, &m.blocks));
                }
            }
        }
        named
    }

    /// Storage node `node` restarted (a new epoch): its blocks of before are
    /// gone. Every object naming a block there drops those blocks and is
    /// lost (reads answer `data unavailable`, a delete frees only the rest).
    /// Returns each object changed, (job, path, its new meta), to log as a
    /// lost `Put` so a replay marks it again. This node's own blocks are
    /// left alone (its own restart settles them, `settle_after_restart`).
    pub fn mark_node_lost(&mut self, node: u16) -> Vec<(String, String, ObjectMeta)> {
        let mut changed = Vec::new();
        if node == self.node {
            return changed;
        }
        for (name, j) in &mut self.jobs {
            for (path, e) in &mut j.entries {
                if let Entry::Object(m, lost) = e {
                    let before = m.blocks.len();
                    m.blocks.retain(|l| l.node != node);
                    if m.blocks.len() < before {
                        *lost = true;
                        changed.push((name.clone(), path.clone(), m.clone()));
                    }
                }
            }
        }
        changed
    }

    /// Objects whose data was lost in a restart.
    pub fn lost_objects(&self) -> u64 {
        let lost = |j: &Job| j.entries.values().filter(|e| matches!(e, Entry::Object(_, true))).count();
        self.jobs.values().map(lost).sum::<usize>() as u64
    }

    /// Drops every object but PERSIST ones (and the directories that hold
    /// them). A job with nothing left is forgotten.
    pub fn deregister(&mut self, name: &str) -> Result<Release, MetaError> {
        let node = self.node;
        let job = self.job_mut(name)?;
        let mut keep = Vec::new();
        let mut drop = Vec::new();
        let mut keep_dirs = std::collections::HashSet::new();
        for (path, e) in &job.entries {
            if let Entry::Object(m, _) = e {
                if m.flags & flags::PERSIST == 0 {
                    drop.extend(on_node(node, &m.blocks));
                } else {
                    keep.extend(on_node(node, &m.blocks));
                    let mut p = path.as_str();
                    while let Some(i) = p.rfind('/') {
                        p = &p[..i];
                        keep_dirs.insert(p.to_string());
                    }
                }
            }
        }
        job.entries.retain(|path, e| match e {
            Entry::Object(m, _) => m.flags & flags::PERSIST != 0,
            Entry::Dir => keep_dirs.contains(path),
        });
        job.registered = false;
        job.objects = job.entries.values().filter(|e| matches!(e, Entry::Object(..))).count() as u64;
        job.bytes = job.entries.values().map(|e| if let Entry::Object(m, _) = e { m.size } else { 0 }).sum();
        let (id, empty) = (job.id, job.entries.is_empty());
        self.live_ids.remove(&id);
        if empty {
            self.jobs.remove(name);
        }
        Ok(Release::Job { job: id, keep, drop })
    }

    pub fn info(&self, name: &str) -> Result<JobInfo, MetaError> {
        let j = self.job(name)?;
        Ok(JobInfo { id: j.id, hints: j.hints, objects: j.objects, bytes: j.bytes })
    }

    pub fn create_dir(&mut self, name: &str, path: &str) -> Result<(), MetaError> {
        let job = self.job_mut(name)?;
        if path.is_empty() {
            return Err(err(Status::Exists, "the job root always exists"));
        }
        if job.entries.contains_key(path) {
            return Err(err(Status::Exists, format!("'{path}' exists")));
        }
        if !job.parent_exists(path) {
            return Err(err(Status::NotFound, format!("parent directory of '{path}' does not exist")));
        }
        job.entries.insert(path.to_string(), Entry::Dir);
        Ok(())
    }

    pub fn put(&mut self, name: &str, path: &str, meta: ObjectMeta) -> Result<(), MetaError> {
        let bs = self.block_size;
        let job = self.job_mut(name)?;
        if path.is_empty() {
            return Err(err(Status::Malformed, "an object needs a name"));
        }
        if meta.flags & !(flags::PERSIST | flags::DELETE_AFTER_READ) != 0 {
            return Err(err(Status::Malformed, "unknown object flags"));
        }
        if meta.blocks.len() as u64 != meta.size.div_ceil(bs) {
            return Err(err(
                Status::Malformed,
                format!(
                    "{} bytes need {} blocks, got {}",
                    meta.size,
                    meta.size.div_ceil(bs),
                    meta.blocks.len()
                ),
            ));
        }
        if job.entries.contains_key(path) {
            return Err(err(Status::Exists, format!("'{path}' exists (objects are never overwritten)")));
        }
        if !job.parent_exists(path) {
            return Err(err(Status::NotFound, format!("parent directory of '{path}' does not exist")));
        }
        job.objects += 1;
        job.bytes += meta.size;
        job.entries.insert(path.to_string(), Entry::Object(meta, false));
        Ok(())
    }

    pub fn lookup(&self, name: &str, path: &str) -> Result<&ObjectMeta, MetaError> {
        match self.job(name)?.entries.get(path) {
            Some(Entry::Object(m, false)) => Ok(m),
            Some(Entry::Object(_, true)) => Err(err(
                Status::DataUnavailable,
                format!("the data of '{path}' did not survive the node's restart (DRAM, or not PERSIST)"),
            )),
            Some(Entry::Dir) => Err(err(Status::NotFound, format!("'{path}' is a directory"))),
            None => Err(err(Status::NotFound, format!("no object '{path}'"))),
        }
    }

    /// The direct children of `dir` whose names sort after `after` (all when
    /// empty), as many as fit an encoded listing of `max_bytes`. The flag is
    /// true when entries were left out for lack of room.
    pub fn enumerate(
        &self,
        name: &str,
        dir: &str,
        after: &str,
        max_bytes: usize,
    ) -> Result<(Vec<DirEntry>, bool), MetaError> {
        use std::ops::Bound;
        let job = self.job(name)?;
        if !dir.is_empty() && !matches!(job.entries.get(dir), Some(Entry::Dir)) {
            return Err(err(Status::NotFound, format!("no directory '{dir}'")));
        }
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        // Among one directory's children, full-path order is name order.
        let start = if after.is_empty() {
            Bound::Included(prefix.clone())
        } else {
            Bound::Excluded(format!("{prefix}{after}"))
        };
        let mut out = Vec::new();
        let mut bytes = 4; // the entry count
        for (k, e) in job.entries.range::<String, _>((start, Bound::Unbounded)) {
            let Some(rest) = k.strip_prefix(&prefix) else { break };
            if rest.contains('/') {
                continue;
            }
            let size = crate::proto::ENTRY_FIXED_LEN + rest.len();
            if bytes + size > max_bytes {
                return Ok((out, true));
            }
            bytes += size;
            let (is_dir, size, flags) = match e {
                Entry::Dir => (true, 0, 0),
                Entry::Object(m, _) => (false, m.size, m.flags),
            };
            out.push(DirEntry { name: rest.to_string(), is_dir, size, flags });
        }
        Ok((out, false))
    }

    /// The blocks of object `path` that are on other nodes (none for a
    /// directory or a missing name): a client that deletes the object frees
    /// them itself, with `BlockFree` on their nodes.
    pub fn remote_blocks(&self, name: &str, path: &str) -> Vec<Location> {
        match self.jobs.get(name).and_then(|j| j.entries.get(path)) {
            Some(Entry::Object(m, _)) => m.blocks.iter().filter(|l| l.node != self.node).copied().collect(),
            _ => Vec::new(),
        }
    }

    /// The blocks on other nodes of job `name`'s `PERSIST` objects: what a
    /// deregistration keeps there. The caller of `DeregisterJob` has every
    /// other node free the job's blocks but these (`FreeOwner`).
    pub fn remote_persistent_blocks(&self, name: &str) -> Vec<Location> {
        let Some(j) = self.jobs.get(name).filter(|j| j.registered) else { return Vec::new() };
        j.entries
            .values()
            .filter_map(|e| match e {
                Entry::Object(m, _) if m.flags & flags::PERSIST != 0 => Some(m.blocks.iter()),
                _ => None,
            })
            .flatten()
            .filter(|l| l.node != self.node)
            .copied()
            .collect()
    }

    /// Deletes an object (its blocks of this node are released; see
    /// `remote_blocks` for the others) or an empty directory.
    pub fn delete(&mut self, name: &str, path: &str) -> Result<Release, MetaError> {
        self.delete_matching(name, path, None)
    }

    /// Deletes object `path` only if it is still exactly `read` (size, flags
    /// and block ids, as a `Lookup` answered it): the delete after a read of a
    /// `DELETE_AFTER_READ` object. Block ids carry a generation (never
    /// reused), so a newer object put under the same name since does not
    /// match and stays; the answer is then 1 (not found), as when the object
    /// is gone.
    pub fn delete_if(&mut self, name: &str, path: &str, read: &ObjectMeta) -> Result<Release, MetaError> {
        self.delete_matching(name, path, Some(read))
    }

    fn delete_matching(
        &mut self,
        name: &str,
        path: &str,
        read: Option<&ObjectMeta>,
    ) -> Result<Release, MetaError> {
        let node = self.node;
        let job = self.job_mut(name)?;
        match (job.entries.get(path), read) {
            (None, _) => Err(err(Status::NotFound, format!("no object or directory '{path}'"))),
            (Some(Entry::Object(m, _)), Some(read)) if m != read => Err(err(
                Status::NotFound,
                format!("'{path}' is no longer the object read (deleted and put again since)"),
            )),
            (Some(Entry::Dir), Some(_)) => {
                Err(err(Status::NotFound, format!("'{path}' is no longer the object read (now a directory)")))
            }
            (Some(Entry::Dir), None) if job.has_children(path) => {
                Err(err(Status::Malformed, format!("directory '{path}' is not empty")))
            }
            (Some(Entry::Dir), None) => {
                job.entries.remove(path);
                Ok(Release::None)
            }
            (Some(Entry::Object(..)), _) => {
                let Some(Entry::Object(m, _)) = job.entries.remove(path) else { unreachable!() };
                job.objects -= 1;
                job.bytes -= m.size;
                Ok(Release::Blocks(on_node(node, &m.blocks).collect()))
            }
        }
    }

    /// Takes object `path` back out if it still names exactly `blocks` (a
    /// put that could not be completed), also of a job deregistered since;
    /// its blocks of this node are the caller's to free.
    pub fn remove_object(&mut self, name: &str, path: &str, blocks: &[Location]) -> Option<Release> {
        self.take_object(name, path, |m| m.blocks == blocks)
    }

    /// Removes object `path` of job `name`, registered or not, if `take`
    /// says so. A deregistered job left without objects is forgotten, as
    /// `deregister` forgets one (and as a snapshot of it replays).
    fn take_object(&mut self, name: &str, path: &str, take: impl Fn(&ObjectMeta) -> bool) -> Option<Release> {
        let node = self.node;
        let job = self.jobs.get_mut(name)?;
        match job.entries.get(path) {
            Some(Entry::Object(m, _)) if take(m) => {}
            _ => return None,
        }
        let Some(Entry::Object(m, _)) = job.entries.remove(path) else { unreachable!("checked above") };
        job.objects -= 1;
        job.bytes -= m.size;
        if !job.registered && job.objects == 0 {
            self.jobs.remove(name);
        }
        Some(Release::Blocks(on_node(node, &m.blocks).collect()))
    }

    pub fn summaries(&self) -> Vec<JobSummary> {
        let mut v: Vec<_> = self
            .jobs
            .iter()
            .map(|(n, j)| JobSummary {
                name: n.clone(),
                id: j.id,
                registered: j.registered,
                objects: j.objects,
                bytes: j.bytes,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This node's number in the tests.
    const HERE: u16 = 5;

    fn ns() -> Namespaces {
        Namespaces::new(2, 64, HERE)
    }

    fn here(b: u64) -> Location {
        Location { node: HERE, block: BlockId(b) }
    }

    fn obj(size: u64, flags: u16, first: u64) -> ObjectMeta {
        ObjectMeta { size, flags, blocks: (0..size.div_ceil(64)).map(|i| here(first + i)).collect() }
    }

    #[test]
    fn register_is_unique_and_ids_carry_the_core() {
        let mut n = ns();
        let id = n.register("j", JobHints::default()).unwrap();
        assert_eq!(id >> 24, 2);
        assert_eq!(n.register("j", JobHints::default()).unwrap_err().status, Status::Exists);
        assert_eq!(n.register("a/b", JobHints::default()).unwrap_err().status, Status::Malformed);
        assert_ne!(n.register("k", JobHints::default()).unwrap(), id);
    }

    #[test]
    fn dirs_objects_enumerate_delete() {
        let mut n = ns();
        n.register("j", JobHints::default()).unwrap();
        assert_eq!(n.put("j", "d/x", obj(1, 0, 0)).unwrap_err().status, Status::NotFound);
        n.create_dir("j", "d").unwrap();
        assert_eq!(n.create_dir("j", "d").unwrap_err().status, Status::Exists);
        n.put("j", "d/x", obj(130, 0, 10)).unwrap();
        n.put("j", "top", obj(0, 0, 0)).unwrap();
        assert_eq!(n.put("j", "d/x", obj(1, 0, 0)).unwrap_err().status, Status::Exists);
        assert_eq!(
            n.put("j", "bad", ObjectMeta { size: 65, flags: 0, blocks: vec![here(1)] }).unwrap_err().status,
            Status::Malformed
        );
        assert_eq!(n.lookup("j", "d/x").unwrap().blocks.len(), 3);
        assert_eq!(n.lookup("j", "d").unwrap_err().status, Status::NotFound);
        let root: Vec<_> =
            n.enumerate("j", "", "", 1 << 20).unwrap().0.into_iter().map(|e| (e.name, e.is_dir)).collect();
        assert_eq!(root, vec![("d".to_string(), true), ("top".to_string(), false)]);
        assert_eq!(n.enumerate("j", "d", "", 1 << 20).unwrap().0[0].size, 130);
        assert_eq!(n.delete("j", "d").unwrap_err().status, Status::Malformed);
        assert_eq!(
            n.delete("j", "d/x").unwrap(),
            Release::Blocks(vec![BlockId(10), BlockId(11), BlockId(12)])
        );
        assert_eq!(n.delete("j", "d").unwrap(), Release::None);
        assert_eq!(n.info("j").unwrap().objects, 1);
    }

    #[test]
    fn delete_if_removes_only_the_object_read() {
        let mut n = ns();
        n.register("j", JobHints::default()).unwrap();
        let v1 = obj(130, flags::DELETE_AFTER_READ, 10);
        n.put("j", "m", v1.clone()).unwrap();
        // Readers A and B looked up v1; B deletes it, a writer puts v2.
        assert_eq!(
            n.delete_if("j", "m", &v1).unwrap(),
            Release::Blocks(vec![BlockId(10), BlockId(11), BlockId(12)])
        );
        let v2 = obj(130, flags::DELETE_AFTER_READ, 20);
        n.put("j", "m", v2.clone()).unwrap();
        // A's delete after its read of v1 leaves v2 alone.
        let e = n.delete_if("j", "m", &v1).unwrap_err();
        assert_eq!(e.status, Status::NotFound);
        assert!(e.message.contains("no longer the object read"), "{}", e.message);
        assert_eq!(n.lookup("j", "m").unwrap(), &v2);
        assert_eq!(n.info("j").unwrap().objects, 1);
        // Same blocks but another size or flags is another object too.
        let other_size = ObjectMeta { size: 129, ..v2.clone() };
        assert_eq!(n.delete_if("j", "m", &other_size).unwrap_err().status, Status::NotFound);
        let other_flags = ObjectMeta { flags: 0, ..v2.clone() };
        assert_eq!(n.delete_if("j", "m", &other_flags).unwrap_err().status, Status::NotFound);
        // Gone, or a directory now under the name: not found, nothing removed.
        n.create_dir("j", "d").unwrap();
        assert_eq!(n.delete_if("j", "d", &v1).unwrap_err().status, Status::NotFound);
        assert_eq!(n.delete_if("j", "nothing", &v1).unwrap_err().status, Status::NotFound);
        assert!(n.enumerate("j", "d", "", 1 << 20).is_ok(), "the directory stays");
        assert_eq!(
            n.delete_if("j", "m", &v2).unwrap(),
            Release::Blocks(vec![BlockId(20), BlockId(21), BlockId(22)])
        );
        assert_eq!(n.info("j").unwrap().objects, 0);
        assert_eq!(n.info("j").unwrap().bytes, 0);
        // A deregistered job's objects are not reachable by it.
        n.put("j", "p", obj(1, flags::PERSIST, 30)).unwrap();
        n.deregister("j").unwrap();
        assert_eq!(n.delete_if("j", "p", &obj(1, flags::PERSIST, 30)).unwrap_err().status, Status::NotFound);
    }

    proptest::proptest! {
        /// Whatever object was looked up, `delete_if` removes the one under
        /// the name exactly when it is that object, and changes nothing
        /// otherwise.
        #[test]
        fn delete_if_matches_exactly_the_object_read(
            size in 0u64..300,
            fl in 0u16..4,
            first in 0u64..1000,
            read_size in 0u64..300,
            read_fl in 0u16..4,
            read_first in 0u64..1000,
        ) {
            let mut n = ns();
            n.register("j", JobHints::default()).unwrap();
            let stored = obj(size, fl, first);
            n.put("j", "x", stored.clone()).unwrap();
            let read = obj(read_size, read_fl, read_first);
            let r = n.delete_if("j", "x", &read);
            if read == stored {
                proptest::prop_assert_eq!(r.unwrap(), Release::Blocks(stored.blocks.iter().map(|l| l.block).collect()));
                proptest::prop_assert!(n.lookup("j", "x").is_err());
                proptest::prop_assert_eq!(n.info("j").unwrap().objects, 0);
            } else {
                proptest::prop_assert_eq!(r.unwrap_err().status, Status::NotFound);
                proptest::prop_assert_eq!(n.lookup("j", "x").unwrap(), &stored);
                proptest::prop_assert_eq!(n.info("j").unwrap().bytes, size);
            }
        }
    }

    #[test]
    fn deregister_keeps_persist_objects_and_reregister_revives_them() {
        let mut n = ns();
        let id = n.register("j", JobHints::default()).unwrap();
        n.put("j", "keep", obj(64, flags::PERSIST, 100)).unwrap();
        n.put("j", "drop", obj(64, 0, 200)).unwrap();
        n.create_dir("j", "d").unwrap();
        n.create_dir("j", "d/e").unwrap();
        n.create_dir("j", "empty").unwrap();
        n.put("j", "d/e/deep", obj(64, flags::PERSIST, 300)).unwrap();
        assert_eq!(
            n.deregister("j").unwrap(),
            Release::Job { job: id, keep: vec![BlockId(300), BlockId(100)], drop: vec![BlockId(200)] }
        );
        assert_eq!(n.lookup("j", "keep").unwrap_err().status, Status::NotFound);
        let again = n.register("j", JobHints::default()).unwrap();
        assert_ne!(again, id, "a re-registered job gets a fresh id");
        assert!(n.lookup("j", "keep").is_ok());
        assert_eq!(n.lookup("j", "drop").unwrap_err().status, Status::NotFound);
        let names: Vec<_> =
            n.enumerate("j", "", "", 1 << 20).unwrap().0.into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["d", "keep"], "directories holding PERSIST objects stay");
        assert_eq!(n.enumerate("j", "d/e", "", 1 << 20).unwrap().0[0].name, "deep");
        n.put("j", "d/new", obj(1, 0, 400)).unwrap();
    }

    #[test]
    fn enumerate_pages_by_size_and_resumes_after_a_name() {
        let mut n = ns();
        n.register("j", JobHints::default()).unwrap();
        n.create_dir("j", "d").unwrap();
        n.create_dir("j", "d/b").unwrap();
        n.put("j", "d/b/inner", obj(0, 0, 0)).unwrap();
        for name in ["a", "a-1", "c", "dd"] {
            n.put("j", &format!("d/{name}"), obj(0, 0, 0)).unwrap();
        }
        // Room for the count and two 1- or 3-byte names only.
        let (page, more) = n.enumerate("j", "d", "", 4 + 2 * 13 + 4).unwrap();
        assert!(more);
        let names: Vec<_> = page.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "a-1"]);
        let (rest, more) = n.enumerate("j", "d", "a-1", 1 << 20).unwrap();
        assert!(!more);
        let names: Vec<_> = rest.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "dd"], "the subdirectory's own entries are not listed");
    }

    #[test]
    fn job_ids_wrap_past_reserved_owners_and_skip_live_ids() {
        let mut n = Namespaces::new(255, 64, HERE);
        n.register("first", JobHints::default()).unwrap(); // 0xFF000001, stays live
        n.next_id = MAX_JOB_SEQ - 2;
        assert_eq!(n.register("a", JobHints::default()).unwrap(), 0xFFFF_FFFD);
        // 0xFFFFFFFE and 0xFFFFFFFF are storage's; 0xFF000001 is live.
        assert_eq!(n.register("b", JobHints::default()).unwrap(), 0xFF00_0002);
        n.deregister("b").unwrap();
        assert_eq!(n.register("c", JobHints::default()).unwrap(), 0xFF00_0003);
    }

    #[test]
    fn deregistered_job_without_persist_objects_is_forgotten() {
        let mut n = ns();
        n.register("j", JobHints::default()).unwrap();
        n.deregister("j").unwrap();
        assert!(n.summaries().is_empty());
        assert_eq!(n.deregister("j").unwrap_err().status, Status::NotFound);
    }

    /// Replays a snapshot's records into a fresh core.
    fn from_snapshot(n: &Namespaces) -> Namespaces {
        let mut snap = Vec::new();
        n.snapshot(&mut snap);
        let mut back = Namespaces::new(n.core, n.block_size, n.node);
        replay(&mut back, &snap);
        back
    }

    /// Applies encoded records (as a log holds them) to `n`.
    fn replay(n: &mut Namespaces, mut buf: &[u8]) {
        while !buf.is_empty() {
            let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
            let rec = Record::decode(&buf[8..8 + len], log::FILE_VERSION, n.node).unwrap();
            n.apply(&rec).unwrap_or_else(|e| panic!("{rec:?}: {e}"));
            buf = &buf[8 + len..];
        }
    }

    #[test]
    fn a_snapshot_replays_to_the_same_state_and_lost_objects_stay_lost() {
        let mut n = ns();
        let id = n.register("j", JobHints { max_workers: 2, ..JobHints::default() }).unwrap();
        n.create_dir("j", "d").unwrap();
        n.put("j", "d/flash", obj(130, flags::PERSIST, 1 << 56 | 10)).unwrap();
        n.put("j", "dram", obj(64, 0, 20)).unwrap();
        n.put("j", "empty", obj(0, 0, 0)).unwrap();
        n.register("gone", JobHints::default()).unwrap();
        n.put("gone", "kept", obj(1, flags::PERSIST, 1 << 56 | 30)).unwrap();
        n.deregister("gone").unwrap();
        // After a restart only flash blocks 10 and 11 (not 12) and 30 survived.
        let survivors = [1 << 56 | 10, 1 << 56 | 11, 1 << 56 | 30].map(BlockId);
        let mut named = n.settle_after_restart(|b| survivors.contains(&b));
        named.sort();
        assert_eq!(named, survivors);
        assert_eq!(n.lost_objects(), 2, "d/flash lost a block, dram lost all");
        assert_eq!(n.lookup("j", "d/flash").unwrap_err().status, Status::DataUnavailable);
        assert_eq!(n.lookup("j", "empty").unwrap().size, 0, "an empty object loses nothing");
        let mut back = from_snapshot(&n);
        assert_eq!(back.summaries(), n.summaries());
        assert_eq!(back.info("j").unwrap(), n.info("j").unwrap());
        assert_eq!(back.info("j").unwrap().id, id);
        assert_eq!(back.lost_objects(), 2);
        assert!(
            n.summaries().iter().all(|s| s.name != "c"),
            "a deregistered job with no object is forgotten"
        );
        assert_eq!(back.enumerate("j", "d", "", 1 << 20), n.enumerate("j", "d", "", 1 << 20));
        assert_eq!(back.next_id, n.next_id);
        // Deleting a lost object frees only the blocks that survived.
        assert_eq!(
            back.delete("j", "d/flash").unwrap(),
            Release::Blocks(vec![BlockId(1 << 56 | 10), BlockId(1 << 56 | 11)])
        );
        assert!(back.register("gone", JobHints::default()).is_ok());
        assert!(back.lookup("gone", "kept").is_ok());
    }

    #[test]
    fn blocks_on_other_nodes_are_kept_and_never_released_here() {
        let mut n = ns();
        let id = n.register("j", JobHints::default()).unwrap();
        let there = |b| Location { node: 9, block: BlockId(b) };
        let mixed = |first| ObjectMeta {
            size: 192,
            flags: 0,
            blocks: vec![here(first), there(first + 1), here(first + 2)],
        };
        n.put("j", "a", mixed(10)).unwrap();
        n.put("j", "b", mixed(20)).unwrap();
        n.put("j", "p", ObjectMeta { size: 64, flags: flags::PERSIST, blocks: vec![there(30)] }).unwrap();
        assert_eq!(n.lookup("j", "a").unwrap(), &mixed(10), "lookup gives every location");
        assert_eq!(n.remote_blocks("j", "a"), vec![there(11)]);
        assert!(n.remote_blocks("j", "nothing").is_empty());
        assert_eq!(n.delete("j", "a").unwrap(), Release::Blocks(vec![BlockId(10), BlockId(12)]));
        // A restart loses block 22 here; block 21 is on node 9, not this node's to judge.
        let named = n.settle_after_restart(|b| b == BlockId(20));
        assert_eq!(named, vec![BlockId(20)]);
        assert_eq!(n.lookup("j", "b").unwrap_err().status, Status::DataUnavailable);
        assert!(n.lookup("j", "p").is_ok(), "an object wholly on another node loses nothing here");
        let back = from_snapshot(&n);
        assert_eq!(back.remote_blocks("j", "p"), vec![there(30)]);
        assert_eq!(
            n.deregister("j").unwrap(),
            Release::Job { job: id, keep: vec![], drop: vec![BlockId(20)] },
            "only this node's blocks are released"
        );
    }

    /// Another node restarted: objects naming its blocks drop them and are
    /// lost; the lost `Put` records logged for them mark the same objects
    /// again when replayed after the records that created them.
    #[test]
    fn a_restarted_node_s_blocks_are_lost_and_the_mark_replays() {
        let mut n = ns();
        n.register("j", JobHints::default()).unwrap();
        let at = |node, b| Location { node, block: BlockId(b) };
        let two = |a: Location, b: Location| ObjectMeta { size: 128, flags: 0, blocks: vec![a, b] };
        let mixed = two(here(1), at(9, 2));
        let elsewhere = two(at(7, 3), at(8, 4));
        n.put("j", "mixed", mixed.clone()).unwrap();
        n.put("j", "elsewhere", elsewhere.clone()).unwrap();
        let mut log = Vec::new();
        Record::Register { job: "j", id: n.info("j").unwrap().id, hints: JobHints::default() }
            .encode(&mut log);
        Record::Put { job: "j", path: "mixed", meta: Cow::Borrowed(&mixed), lost: false }.encode(&mut log);
        Record::Put { job: "j", path: "elsewhere", meta: Cow::Borrowed(&elsewhere), lost: false }
            .encode(&mut log);
        assert!(n.mark_node_lost(HERE).is_empty(), "this node's own blocks are its restart's business");
        let changed = n.mark_node_lost(9);
        assert_eq!(
            changed,
            vec![("j".to_string(), "mixed".to_string(), ObjectMeta { blocks: vec![here(1)], ..mixed })]
        );
        assert_eq!(n.lookup("j", "mixed").unwrap_err().status, Status::DataUnavailable);
        assert!(n.lookup("j", "elsewhere").is_ok());
        assert_eq!(n.summaries()[0].objects, 2, "a lost object is still counted");
        for (job, path, meta) in &changed {
            Record::Put { job, path, meta: Cow::Borrowed(meta), lost: true }.encode(&mut log);
        }
        let mut back = ns();
        replay(&mut back, &log);
        assert_eq!(back.lookup("j", "mixed").unwrap_err().status, Status::DataUnavailable);
        assert_eq!(back.summaries(), n.summaries());
        // Deleting it frees only this node's block, and names nothing on node 9.
        assert!(back.remote_blocks("j", "mixed").is_empty());
        assert_eq!(back.delete("j", "mixed").unwrap(), Release::Blocks(vec![BlockId(1)]));
    }

    /// Records the live code logs for deregistered jobs (a lost mark from
    /// `mark_node_lost`, the `Delete` of an undone PERSIST put) replay to
    /// the live state: the object stays lost, the undone one stays gone,
    /// and a job left with no object is forgotten on both sides.
    #[test]
    fn records_of_deregistered_jobs_replay_to_the_live_state() {
        let mut n = ns();
        let mut log = Vec::new();
        let far = |b: u64| Location { node: 9, block: BlockId(b) };
        let flash = |b: u64| here(1 << 56 | b);
        let persist = |blocks: Vec<Location>| ObjectMeta {
            size: 64 * blocks.len() as u64,
            flags: flags::PERSIST,
            blocks,
        };
        let lost_far = persist(vec![flash(1), far(2)]);
        let (kept, undone, alone) =
            (persist(vec![flash(3)]), persist(vec![flash(4)]), persist(vec![flash(5)]));
        for (job, objects) in [
            ("a", vec![("d/o", &lost_far)]),
            ("b", vec![("kept", &kept), ("undone", &undone)]),
            ("c", vec![("alone", &alone)]),
            ("live", vec![("o", &persist(vec![far(6)]))]),
        ] {
            let id = n.register(job, JobHints::default()).unwrap();
            Record::Register { job, id, hints: JobHints::default() }.encode(&mut log);
            if job == "a" {
                n.create_dir(job, "d").unwrap();
                Record::CreateDir { job, path: "d" }.encode(&mut log);
            }
            for (path, meta) in objects {
                n.put(job, path, meta.clone()).unwrap();
                Record::Put { job, path, meta: Cow::Borrowed(meta), lost: false }.encode(&mut log);
            }
            if job != "live" {
                n.deregister(job).unwrap();
                Record::Deregister { job }.encode(&mut log);
            }
        }
        // Node 9 restarts: "a"'s object (deregistered) and "live"'s are lost.
        let changed = n.mark_node_lost(9);
        assert_eq!(changed.len(), 2, "{changed:?}");
        for (job, path, meta) in &changed {
            Record::Put { job, path, meta: Cow::Borrowed(meta), lost: true }.encode(&mut log);
        }
        // Two PERSIST puts whose marks failed after their jobs were deregistered.
        for (job, path, meta) in [("b", "undone", &undone), ("c", "alone", &alone)] {
            assert!(n.remove_object(job, path, &meta.blocks).is_some(), "{job}/{path}");
            Record::Delete { job, path }.encode(&mut log);
        }
        let mut back = ns();
        replay(&mut back, &log);
        let (mut live, mut replayed) = (Vec::new(), Vec::new());
        n.snapshot(&mut live);
        back.snapshot(&mut replayed);
        assert_eq!(back.summaries(), n.summaries());
        assert_eq!(replayed, live, "the replayed state is the live state");
        assert_eq!(back.lost_objects(), 2);
        assert!(
            n.summaries().iter().all(|s| s.name != "c"),
            "a deregistered job with no object is forgotten"
        );
        for ns in [&mut n, &mut back] {
            ns.register("a", JobHints::default()).unwrap();
            assert_eq!(ns.lookup("a", "d/o").unwrap_err().status, Status::DataUnavailable);
            ns.register("b", JobHints::default()).unwrap();
            assert_eq!(ns.lookup("b", "undone").unwrap_err().status, Status::NotFound);
            assert_eq!(ns.delete("b", "kept").unwrap(), Release::Blocks(vec![BlockId(1 << 56 | 3)]));
            ns.register("c", JobHints::default()).unwrap();
            assert_eq!(ns.info("c").unwrap().objects, 0);
        }
    }
}
