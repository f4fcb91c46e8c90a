//! What the controller knows about the cluster, and the only code that
//! changes it. The HTTP layer reads and writes through these methods; time is
//! passed in, so every rule here is tested without sleeping.
//!
//! It holds nodes and their latest reports, the jobs registered through the
//! controller with their allocations and weight maps, and the event log.

use dataplane::meta::cluster::DramShare;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dataplane::client::Deregistered;

use super::events::{EventLog, DEFAULT_CAPACITY};
use super::owed::Owed;
use super::policy::{self, Allocation, Hints, NodeRoom, Policy, TierRoom};
use super::rightsize;
use crate::api::{
    CoreRow, CoresResponse, EventKind, EventsResponse, JobEntry, JobRow, JobsResponse, NodeCommand,
    NodeEntry, NodeReport, NodeState, NodeSummary, NodesResponse, OwedFree, TierRow, TierTotals,
    TiersResponse,
};

/// A provisioned node down for this many down-intervals is forgotten
/// ([`Cluster::long_down`]): 20 × 3 s with the default heartbeat.
pub const FORGET_DOWN_AFTER: u32 = 20;

/// Nodes the controller follows at most: a report from a new node id past
/// it ages out the node down longest (see [`Cluster::heartbeat`]) or is refused.
pub const MAX_NODES: usize = 10_000;

/// Limits on what a heartbeat may describe, checked before it is stored.
pub const MAX_NODE_ID_LEN: usize = 128;
pub const MAX_CORES: usize = 4096;
pub const MAX_TIER_REGIONS: usize = 64 * 1024;
pub const MAX_JOBS_PER_NODE: usize = 1 << 20;
/// Largest capacity or use one tier region may report (1 PiB).
pub const MAX_REGION_BYTES: u64 = 1 << 50;
/// Nodes one registration starts at most when the job does not fit.
pub const MAX_EXTRA_NODES: usize = 32;
/// Jobs the controller registers at most, and the longest job name.
pub const MAX_JOBS: usize = 100_000;
pub const MAX_JOB_NAME_LEN: usize = 200;

/// Why a job was not registered or found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("job names are 1..={MAX_JOB_NAME_LEN} bytes without '/', spaces or control characters, and not '.' or '..'")]
    BadName,
    #[error("job `{0}` is already registered")]
    Exists(String),
    #[error("no job `{0}`")]
    NotFound(String),
    #[error("no live storage node (role storage or both) to place the job on")]
    NoNodes,
    #[error("no live metadata node (role metadata or both, not draining) to hold the job's namespace")]
    NoMetadataNode,
    #[error("the controller already holds {MAX_JOBS} jobs")]
    TooMany,
    #[error("invalid hints: {0}")]
    BadHints(String),
}

/// A job registered through the controller.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub name: String,
    pub hints: Hints,
    pub alloc: Allocation,
    /// Node id → weight; nodes absent from the map have weight 0.
    pub weights: BTreeMap<String, f64>,
    /// The node holding the job's namespace.
    pub node_id: String,
    pub overcommitted: bool,
    pub registered_unix_ms: u64,
    /// Planned, not yet registered on its node.
    pub pending: bool,
}

impl JobRecord {
    /// A job placed by `packing`, homed on `node_id`, not yet registered there.
    fn planned(
        name: &str,
        hints: Hints,
        alloc: Allocation,
        packing: policy::Packing,
        node_id: &str,
    ) -> JobRecord {
        JobRecord {
            name: name.to_string(),
            hints,
            alloc,
            weights: packing.weights,
            node_id: node_id.to_string(),
            overcommitted: packing.overcommitted,
            registered_unix_ms: unix_ms(),
            pending: true,
        }
    }
}

/// What registering a planned job on its node needs.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub node_id: String,
    pub node_addr: String,
    /// Nodes like the live ones that would hold what did not fit (0 when it fits).
    pub extra_nodes: usize,
}

/// Why a heartbeat's report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("node_id must be 1..={MAX_NODE_ID_LEN} bytes of printable characters without '/' or spaces")]
    BadNodeId,
    #[error("addr `{0}` is not an ip:port address")]
    BadAddr(String),
    #[error("core {0} is reported twice")]
    DuplicateCore(usize),
    #[error("tier `{0}` of core {1} is reported twice")]
    DuplicateTier(String, usize),
    #[error("report has {0} {1}, more than the limit of {2}")]
    TooMany(usize, &'static str, usize),
    #[error("tier `{0}` of core {1} reports more than {MAX_REGION_BYTES} bytes")]
    RegionTooLarge(String, usize),
    #[error("the controller already follows {0} nodes, its limit, and none has been down long enough to be aged out")]
    TooManyNodes(usize),
}

/// A node's state change, for the caller to log (and, later, to act on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// First heartbeat from this node id.
    Joined { node_id: String, addr: String },
    /// A heartbeat from a node that was down, silent since its previous one.
    Recovered { node_id: String, silent_for: Duration },
    /// A node's counters went backwards: it restarted under the same id.
    Restarted { node_id: String },
    /// No heartbeat for `missed_heartbeats` intervals.
    Down { node_id: String, silent_for: Duration },
}

struct NodeRecord {
    report: NodeReport,
    received: Instant,
    heartbeats: u64,
    state: NodeState,
    /// Busy fraction per core id, computed when the report arrived.
    busy: BTreeMap<usize, f64>,
    /// Network bytes per second (in + out) since the previous report.
    net_rate: f64,
}

pub struct Cluster {
    heartbeat: Duration,
    missed_heartbeats: u32,
    nodes: BTreeMap<String, NodeRecord>,
    policy: Policy,
    jobs: BTreeMap<String, JobRecord>,
    events: EventLog,
    /// Nodes being drained, with when the drain started.
    draining: BTreeMap<String, Instant>,
    /// Polling cores wanted on each node (`cores set`, rightsizing), sent
    /// on every heartbeat reply until the node's report shows them: a lost
    /// reply does not lose the decision.
    polling_wanted: BTreeMap<String, usize>,
    /// Jobs deregistered recently, with when: a report sent before the node
    /// freed them must not bring them back as adopted jobs.
    deregistered: BTreeMap<String, Instant>,
    /// The cluster view pushed on heartbeat replies ([`Cluster::view_commands`]):
    /// the dead nodes' numbers with their version, and for each metadata
    /// node the weight maps of its jobs with theirs.
    dead_view: (u64, Vec<u16>),
    weights_view: BTreeMap<String, (u64, WeightMaps)>,
    /// For each storage node, the DRAM shares of the jobs placed on it, with their version.
    dram_view: BTreeMap<String, (u64, Vec<DramShare>)>,
    /// The last version handed out: versions only grow, and start from the
    /// wall clock so they grow across controller restarts too.
    last_version: u64,
    /// Frees of deregistered jobs' blocks owed to nodes that were away.
    owed: Owed,
    /// Each node's boot id as last reported (`NodeReport::boot_id`).
    boots: BTreeMap<String, u64>,
    /// For each metadata-capable node, the restarts of other nodes it has
    /// yet to apply (version → restarted node's number); the restarted
    /// node stays in the dead set while a live one has it queued.
    restarts: BTreeMap<String, BTreeMap<u64, u16>>,
    /// Numbers of nodes forgotten after they died holding blocks: they stay
    /// dead (reads of their blocks answer data unavailable) until a node
    /// with that number reports again.
    gone: BTreeSet<u16>,
    /// Nodes followed at most ([`MAX_NODES`]).
    max_nodes: usize,
    /// Owed deregistrations whose call failed, with when: tried again a
    /// down-interval later, not on every sweep.
    dereg_failed: BTreeMap<String, Instant>,
    /// When this controller started: until every live node has reported
    /// (one down-interval), it does not know them all.
    born: Instant,
}

/// Job → weight map by node number, as a metadata node applies it.
pub type WeightMaps = BTreeMap<String, Vec<(u16, f64)>>;

impl Cluster {
    pub fn new(heartbeat: Duration, missed_heartbeats: u32) -> Cluster {
        Cluster::with_policy(heartbeat, missed_heartbeats, Policy::default())
    }

    pub fn with_policy(heartbeat: Duration, missed_heartbeats: u32, policy: Policy) -> Cluster {
        assert!(!heartbeat.is_zero(), "heartbeat interval must be positive");
        assert!(missed_heartbeats > 0, "missed_heartbeats must be positive");
        Cluster {
            heartbeat,
            missed_heartbeats,
            nodes: BTreeMap::new(),
            policy,
            jobs: BTreeMap::new(),
            events: EventLog::new(DEFAULT_CAPACITY),
            draining: BTreeMap::new(),
            polling_wanted: BTreeMap::new(),
            deregistered: BTreeMap::new(),
            dead_view: (unix_ms(), Vec::new()),
            weights_view: BTreeMap::new(),
            dram_view: BTreeMap::new(),
            last_version: unix_ms(),
            owed: Owed::default(),
            boots: BTreeMap::new(),
            restarts: BTreeMap::new(),
            gone: BTreeSet::new(),
            max_nodes: MAX_NODES,
            dereg_failed: BTreeMap::new(),
            born: Instant::now(),
        }
    }

    /// Follows at most `n` nodes (tests use a small limit).
    pub fn set_max_nodes(&mut self, n: usize) {
        self.max_nodes = n.max(1);
    }

    /// Makes room for a new node at the node limit: forgets the node down
    /// longest, when it has been down for [`FORGET_DOWN_AFTER`]
    /// down-intervals, is not draining and holds no job's namespace.
    fn make_room(&mut self, for_node: &str, now: Instant) -> Result<(), ReportError> {
        if self.nodes.len() < self.max_nodes || self.nodes.contains_key(for_node) {
            return Ok(());
        }
        let grace = self.down_after() * FORGET_DOWN_AFTER;
        let oldest = self
            .nodes
            .iter()
            .filter(|(id, r)| {
                r.state == NodeState::Down
                    && now.saturating_duration_since(r.received) > grace
                    && !self.draining.contains_key(*id)
                    && !self.holds_namespaces(id)
            })
            .min_by_key(|(_, r)| r.received)
            .map(|(id, r)| (id.clone(), now.saturating_duration_since(r.received)));
        let Some((id, silent)) = oldest else { return Err(ReportError::TooManyNodes(self.max_nodes)) };
        self.forget(
            &id,
            format!(
                "node {id} was down for {} ms: forgotten to make room for node {for_node} (the controller follows {} nodes at most)",
                silent.as_millis(),
                self.max_nodes
            ),
        );
        Ok(())
    }

    /// Takes over the owed frees kept by an earlier controller (its data
    /// directory); free ids continue past theirs.
    pub fn set_owed(&mut self, owed: Owed) {
        self.last_version = self.last_version.max(owed.max_id().unwrap_or(0));
        if !owed.is_empty() {
            tracing::info!(owed = owed.len(), "frees owed to nodes, kept by an earlier controller");
        }
        self.owed = owed;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat
    }

    pub fn missed_heartbeats(&self) -> u32 {
        self.missed_heartbeats
    }

    /// How long a node may stay silent before it is declared down.
    pub fn down_after(&self) -> Duration {
        self.heartbeat * self.missed_heartbeats
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn contains(&self, node_id: &str) -> bool {
        self.nodes.contains_key(node_id)
    }

    /// Stores a node's report received at `now`, replacing the previous one.
    /// Returns the state changes it caused.
    pub fn heartbeat(&mut self, report: NodeReport, now: Instant) -> Result<Vec<Transition>, ReportError> {
        validate(&report)?;
        self.make_room(&report.node_id, now)?;
        self.gone.remove(&report.node_number);
        self.pass_versions_held(&report);
        self.acknowledge_frees(&report);
        let rebooted = self.note_boot(&report);
        let mut transitions = Vec::new();
        match self.nodes.get_mut(&report.node_id) {
            None => {
                transitions
                    .push(Transition::Joined { node_id: report.node_id.clone(), addr: report.addr.clone() });
                let busy = busy_fractions(None, &report);
                let net_rate = net_rate(None, &report);
                self.nodes.insert(
                    report.node_id.clone(),
                    NodeRecord { report, received: now, heartbeats: 1, state: NodeState::Up, busy, net_rate },
                );
            }
            Some(rec) => {
                if rec.state == NodeState::Down {
                    transitions.push(Transition::Recovered {
                        node_id: report.node_id.clone(),
                        silent_for: now.saturating_duration_since(rec.received),
                    });
                }
                let restarted = restarted(&rec.report, &report);
                if restarted {
                    transitions.push(Transition::Restarted { node_id: report.node_id.clone() });
                }

                rec.busy = busy_fractions(if restarted { None } else { Some(&rec.report) }, &report);
                rec.net_rate = net_rate(if restarted { None } else { Some(&rec.report) }, &report);
                rec.report = report;
                rec.received = now;
                rec.heartbeats += 1;
                rec.state = NodeState::Up;
            }
        }
        // A new boot id was recorded as node_restarted already (note_boot): one event, not two.
        let to_log: Vec<Transition> = transitions
            .iter()
            .filter(|t| !(rebooted && matches!(t, Transition::Restarted { .. })))
            .cloned()
            .collect();
        self.on_transitions(&to_log);
        Ok(transitions)
    }

    /// Declares down every node silent for longer than [`Cluster::down_after`].
    /// Returns the nodes that went down with this call.
    pub fn sweep(&mut self, now: Instant) -> Vec<Transition> {
        let limit = self.down_after();
        let mut out = Vec::new();
        for (id, rec) in &mut self.nodes {
            let silent_for = now.saturating_duration_since(rec.received);
            if rec.state == NodeState::Up && silent_for > limit {
                rec.state = NodeState::Down;
                out.push(Transition::Down { node_id: id.clone(), silent_for });
            }
        }
        self.on_transitions(&out);
        out
    }

    /// The state of one node, if known.
    pub fn state(&self, node_id: &str) -> Option<NodeState> {
        self.nodes.get(node_id).map(|r| r.state)
    }

    pub fn summaries(&self, now: Instant) -> Vec<NodeSummary> {
        self.nodes.values().map(|rec| summary(rec, now)).collect()
    }

    /// Tier totals over the nodes that are up.
    pub fn tier_totals(&self) -> Vec<TierTotals> {
        let live = self.nodes.values().filter(|r| r.state == NodeState::Up);
        sum_tiers(live.flat_map(|r| r.report.tiers.iter()))
    }

    /// Distinct registered job names over every known node.
    pub fn job_count(&self) -> usize {
        let names: BTreeSet<&str> = self
            .nodes
            .values()
            .flat_map(|r| r.report.jobs.iter())
            .filter(|j| j.registered)
            .map(|j| j.name.as_str())
            .collect();
        names.len()
    }

    pub fn nodes(&self, now: Instant) -> NodesResponse {
        NodesResponse {
            nodes: self
                .nodes
                .iter()
                .map(|(id, rec)| entry(rec, now, self.draining.contains_key(id)))
                .collect(),
        }
    }

    pub fn node(&self, node_id: &str, now: Instant) -> Option<NodeEntry> {
        self.nodes.get(node_id).map(|rec| entry(rec, now, self.draining.contains_key(node_id)))
    }

    pub fn cores(&self) -> CoresResponse {
        let mut cores = Vec::new();
        for (id, rec) in &self.nodes {
            let mut rows: Vec<CoreRow> = rec
                .report
                .cores
                .iter()
                .map(|c| CoreRow {
                    node_id: id.clone(),
                    node_state: rec.state,
                    core: c.core,
                    cpu: c.cpu,
                    port: c.port,
                    net: rec.report.net,
                    poll_mode: rec.report.poll_mode,
                    busy: rec.busy.get(&c.core).copied(),
                    parked: c.parked,
                    polling: c.polling,
                    accepting: c.accepting,
                    connections: c.connections,
                    requests: c.requests,
                    forwarded: c.forwarded,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                })
                .collect();
            rows.sort_by_key(|r| r.core);
            cores.extend(rows);
        }
        CoresResponse { cores }
    }

    pub fn tiers(&self) -> TiersResponse {
        let mut tiers = Vec::new();
        for (id, rec) in &self.nodes {
            let mut rows: Vec<TierRow> = rec
                .report
                .tiers
                .iter()
                .map(|t| TierRow { node_id: id.clone(), node_state: rec.state, region: t.clone() })
                .collect();
            rows.sort_by(|a, b| (&a.region.tier, a.region.core).cmp(&(&b.region.tier, b.region.core)));
            tiers.extend(rows);
        }
        TiersResponse { tiers }
    }

    pub fn jobs(&self) -> JobsResponse {
        let mut jobs: Vec<JobRow> = self
            .nodes
            .iter()
            .flat_map(|(id, rec)| {
                rec.report.jobs.iter().map(move |j| JobRow {
                    node_id: id.clone(),
                    node_state: rec.state,
                    name: j.name.clone(),
                    id: j.id,
                    registered: j.registered,
                    objects: j.objects,
                    bytes: j.bytes,
                })
            })
            .collect();
        jobs.sort_by(|a, b| (&a.name, &a.node_id).cmp(&(&b.name, &b.node_id)));
        let registered = self.jobs.values().filter(|j| !j.pending).map(|j| self.job_entry(j)).collect();
        JobsResponse { jobs, registered }
    }
}

// ---- jobs, weight maps and events --------------------------------------------

impl Cluster {
    fn is_live(&self, node_id: &str) -> bool {
        self.nodes.get(node_id).is_some_and(|r| r.state == NodeState::Up)
    }

    /// What each live storage-capable node can offer, after the reservations
    /// of every job (`except` left out, for re-packing it). Metadata-only
    /// nodes hold no blocks: they get no room, so no weight.
    fn rooms(&self, except: Option<&str>) -> Vec<NodeRoom> {
        let tp_per_core = self.policy.allocation.core_throughput;
        let mut rooms: Vec<NodeRoom> = self
            .nodes
            .iter()
            .filter(|(_, r)| r.state == NodeState::Up && r.report.role.storage())
            .map(|(id, r)| {
                let tier_cap = |name: &str| -> u64 { tier_capacity(&r.report, name) };
                NodeRoom {
                    node_id: id.clone(),
                    active: false,
                    closed: self.draining.contains_key(id),
                    throughput_cap: tp_per_core.saturating_mul(r.report.cores.len() as u64),
                    dram_cap: tier_cap("dram"),
                    flash_cap: tier_cap("flash"),
                    ..NodeRoom::default()
                }
            })
            .collect();
        for j in self.jobs.values().filter(|j| Some(j.name.as_str()) != except) {
            for room in rooms.iter_mut() {
                let w = j.weights.get(&room.node_id).copied().unwrap_or(0.0);
                if w > 0.0 {
                    room.active = true;
                    // Float to int casts saturate; so must the sums.
                    let share = |x: u64| (x as f64 * w) as u64;
                    room.throughput_reserved =
                        room.throughput_reserved.saturating_add(share(j.alloc.throughput));
                    room.dram_reserved = room.dram_reserved.saturating_add(share(j.alloc.dram));
                    room.flash_reserved = room.flash_reserved.saturating_add(share(j.alloc.flash));
                }
            }
        }
        rooms
    }

    /// What the open rooms offer: a draining node takes no new data, so
    /// its free DRAM and its flash are not the new job's.
    fn tier_room(rooms: &[NodeRoom]) -> TierRoom {
        let open = || rooms.iter().filter(|r| !r.closed);
        TierRoom {
            dram_free: open()
                .map(|r| r.dram_cap.saturating_sub(r.dram_reserved))
                .fold(0, u64::saturating_add),
            has_flash: open().any(|r| r.flash_cap > 0),
        }
    }

    /// Allocates and packs a new job over the storage-capable nodes and picks
    /// the node for its namespace: the live metadata-capable node (role
    /// `metadata` or `both`, not draining) holding the fewest jobs, then the
    /// most free DRAM. The job is recorded as pending until
    /// [`Cluster::commit_job`].
    pub fn plan_job(&mut self, name: &str, hints: Hints) -> Result<JobPlan, JobError> {
        if !valid_job_name(name) {
            return Err(JobError::BadName);
        }
        if self.jobs.contains_key(name) {
            return Err(JobError::Exists(name.to_string()));
        }
        if self.jobs.len() >= MAX_JOBS {
            return Err(JobError::TooMany);
        }
        hints.validate().map_err(JobError::BadHints)?;
        let hints = hints.normalized();
        let rooms = self.rooms(None);
        let alloc = policy::allocate(&hints, &self.policy.allocation, Self::tier_room(&rooms));
        let packing = policy::pack(&alloc, &rooms).ok_or(JobError::NoNodes)?;
        let node_id = self.metadata_home(&rooms, name).ok_or(JobError::NoMetadataNode)?;
        let node_addr = self.nodes.get(&node_id).map(|r| r.report.addr.clone()).unwrap_or_default();
        let extra_nodes =
            if packing.overcommitted { extra_nodes(&alloc, &rooms, packing.shortfall) } else { 0 };
        self.jobs.insert(name.to_string(), JobRecord::planned(name, hints, alloc, packing, &node_id));
        Ok(JobPlan { node_id, node_addr, extra_nodes })
    }

    /// The live, not draining, metadata-capable node that already holds job
    /// `name` (its PERSIST objects outlive a deregistration there, and a
    /// controller restart), else the one holding the fewest jobs, then the
    /// most free DRAM (a metadata-only node's DRAM holds no blocks: all of
    /// it counts as free).
    fn metadata_home(&self, rooms: &[NodeRoom], name: &str) -> Option<String> {
        let open = || {
            self.nodes.iter().filter(|(id, r)| {
                r.state == NodeState::Up && r.report.role.metadata() && !self.draining.contains_key(*id)
            })
        };
        if let Some((id, _)) = open().find(|(_, r)| r.report.jobs.iter().any(|j| j.name == name)) {
            return Some(id.clone());
        }
        open()
            .min_by_key(|(id, r)| {
                let homed = self.jobs.values().filter(|j| &j.node_id == *id).count();
                let free = match rooms.iter().find(|room| &room.node_id == *id) {
                    Some(room) => room.dram_cap.saturating_sub(room.dram_reserved),
                    None => tier_capacity(&r.report, "dram"),
                };
                (homed, std::cmp::Reverse(free))
            })
            .map(|(id, _)| id.clone())
    }

    pub fn job_record(&self, name: &str) -> Option<&JobRecord> {
        self.jobs.get(name)
    }

    /// The planned job is registered on its node: it becomes visible, and
    /// its allocation is recorded as events.
    pub fn commit_job(&mut self, name: &str) -> Option<JobEntry> {
        self.commit(name, false)
    }

    /// [`Cluster::commit_job`]; `adopted`: the job came from its node's
    /// report, and its one `job_registered` event says so.
    fn commit(&mut self, name: &str, adopted: bool) -> Option<JobEntry> {
        let j = self.jobs.get_mut(name)?;
        j.pending = false;
        let j = j.clone();
        // Registered again on the node that still held it: it is taken over,
        // no longer to be deregistered there.
        if self.owed.drop_dereg(name, &j.node_id) {
            self.save_owed();
        }
        let hints = if j.hints.is_empty() {
            "no hints".to_string()
        } else {
            serde_json::to_string(&j.hints).unwrap_or_default()
        };
        let message = if adopted {
            format!(
                "job {name} adopted from {}'s report (registered before this controller started, or on the node directly; {hints})",
                j.node_id
            )
        } else {
            format!("job {name} registered ({hints}); namespace on {}", j.node_id)
        };
        self.events.push(EventKind::JobRegistered, Some(&j.node_id), Some(name), message);
        let a = &j.alloc;
        self.events.push(
            EventKind::Allocation,
            None,
            Some(name),
            format!(
                "{name}: {} B/s, {} B ({} DRAM, {} flash); weights {}{}",
                a.throughput,
                a.capacity,
                a.dram,
                a.flash,
                weights_text(&j.weights),
                if j.overcommitted { " (overcommitted: live nodes lack room)" } else { "" }
            ),
        );
        Some(self.job_entry(&j))
    }

    /// Drops a planned job to plan it again (after nodes were added).
    pub fn unplan_job(&mut self, name: &str) {
        if self.jobs.get(name).is_some_and(|j| j.pending) {
            self.jobs.remove(name);
        }
    }

    /// Drops a planned job that its node refused.
    pub fn abort_job(&mut self, name: &str, why: &str) {
        if self.jobs.get(name).is_some_and(|j| j.pending) {
            self.jobs.remove(name);
            self.events.push(EventKind::Error, None, Some(name), format!("registering {name} failed: {why}"));
        }
    }

    /// Forgets a registered job; returns it (for its node).
    pub fn remove_job(&mut self, name: &str) -> Option<JobRecord> {
        if self.jobs.get(name).is_some_and(|j| j.pending) {
            return None;
        }
        self.hold_off_adoption(name);
        self.jobs.remove(name)
    }

    /// Keeps `name` from being adopted for two down-intervals: it is being
    /// deregistered, or adopting it just failed.
    pub fn hold_off_adoption(&mut self, name: &str) {
        let now = Instant::now();
        let quiet = self.down_after() * 2;
        self.deregistered.retain(|_, at| now.saturating_duration_since(*at) < quiet);
        self.deregistered.insert(name.to_string(), now);
    }

    /// Jobs a live node reports registered that the controller does not
    /// hold (it restarted, or they were registered on the node directly):
    /// (job, node id, node address). At most `limit`.
    pub fn unadopted(&self, now: Instant, limit: usize) -> Vec<(String, String, String)> {
        let quiet = self.down_after() * 2;
        let mut out = Vec::new();
        for (id, r) in self.nodes.iter().filter(|(_, r)| r.state == NodeState::Up) {
            for j in r.report.jobs.iter().filter(|j| j.registered) {
                let recent = self
                    .deregistered
                    .get(&j.name)
                    .is_some_and(|at| now.saturating_duration_since(*at) < quiet);
                if !self.jobs.contains_key(&j.name)
                    && !recent
                    && !self.owed.dereg_owed(&j.name)
                    && valid_job_name(&j.name)
                {
                    out.push((j.name.clone(), id.clone(), r.report.addr.clone()));
                    if out.len() == limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// Takes over a job a node holds, with the hints the node kept: it is
    /// allocated and packed as at registration, its namespace stays where it
    /// is. False when it is already known, or cannot be adopted now (it is
    /// then held off like a failed hints query, not retried every sweep).
    pub fn adopt_job(&mut self, name: &str, node_id: &str, hints: Hints) -> bool {
        if self.jobs.contains_key(name) {
            return false;
        }
        if self.jobs.len() >= MAX_JOBS || hints.validate().is_err() {
            self.hold_off_adoption(name);
            return false;
        }
        let hints = hints.normalized();
        let rooms = self.rooms(None);
        let alloc = policy::allocate(&hints, &self.policy.allocation, Self::tier_room(&rooms));
        let Some(packing) = policy::pack(&alloc, &rooms) else {
            self.hold_off_adoption(name);
            return false;
        };
        self.jobs.insert(name.to_string(), JobRecord::planned(name, hints, alloc, packing, node_id));
        self.commit(name, true);
        true
    }

    /// Records the outcome of a deregistration.
    pub fn record_deregistered(&mut self, name: &str, node_id: &str, outcome: &str) {
        self.hold_off_adoption(name);
        self.events.push(
            EventKind::JobDeregistered,
            Some(node_id),
            Some(name),
            format!("job {name} deregistered: {outcome}"),
        );
    }

    /// A job by name: a registered one, else one a node reports (registered
    /// directly with the node, or holding PERSIST objects), preferring a
    /// live node where the job is registered.
    pub fn job(&self, name: &str) -> Option<JobEntry> {
        if let Some(j) = self.jobs.get(name).filter(|j| !j.pending) {
            return Some(self.job_entry(j));
        }
        let mut found: Vec<(&String, &NodeRecord, bool)> = self
            .nodes
            .iter()
            .filter_map(|(id, r)| {
                r.report.jobs.iter().find(|j| j.name == name).map(|j| (id, r, j.registered))
            })
            .collect();
        found.sort_by_key(|(id, r, registered)| (r.state != NodeState::Up, !registered, (*id).clone()));
        let (id, r, _) = found.first()?;
        Some(JobEntry {
            name: name.to_string(),
            node_id: (*id).clone(),
            node_addr: r.report.addr.clone(),
            node_state: Some(r.state),
            managed: false,
            hints: Hints::default(),
            allocation: None,
            weights: BTreeMap::new(),
            overcommitted: false,
            registered_unix_ms: 0,
            node_addrs: self.node_addrs(),
            weights_applied: false,
            token: None,
            token_expiry_unix: None,
        })
    }

    /// Node number → address of the live nodes (a number two live nodes
    /// claim is left out: neither can be told apart).
    pub fn node_addrs(&self) -> BTreeMap<u16, String> {
        self.live_numbers().into_iter().map(|(n, r)| (n, r.report.addr.clone())).collect()
    }

    /// Node number → record of the live nodes, but for numbers two live nodes claim.
    fn live_numbers(&self) -> BTreeMap<u16, &NodeRecord> {
        let mut out = BTreeMap::new();
        let mut clash = BTreeSet::new();
        for r in self.nodes.values().filter(|r| r.state == NodeState::Up) {
            if out.insert(r.report.node_number, r).is_some() {
                clash.insert(r.report.node_number);
            }
        }
        for n in clash {
            out.remove(&n);
        }
        out
    }

    fn job_entry(&self, j: &JobRecord) -> JobEntry {
        // Every known node appears, with weight 0 when the job has none there.
        let weights = self
            .nodes
            .keys()
            .map(|id| {
                let w = if self.is_live(id) { j.weights.get(id).copied().unwrap_or(0.0) } else { 0.0 };
                (id.clone(), w)
            })
            .collect();
        let node = self.nodes.get(&j.node_id);
        let numbers = self.numbers_by_id();
        let want = job_weight_map(j, &numbers);
        let held = node.and_then(|r| r.report.applied).and_then(|a| a.weights_version);
        let weights_applied = match self.weights_view.get(&j.node_id) {
            Some((v, maps)) => held == Some(*v) && maps.get(&j.name).map_or(want.is_empty(), |m| *m == want),
            None => want.is_empty(),
        };
        JobEntry {
            name: j.name.clone(),
            node_id: j.node_id.clone(),
            node_addr: node.map(|r| r.report.addr.clone()).unwrap_or_default(),
            node_state: node.map(|r| r.state),
            managed: true,
            hints: j.hints.clone(),
            allocation: Some(j.alloc.clone()),
            weights,
            overcommitted: j.overcommitted,
            registered_unix_ms: j.registered_unix_ms,
            node_addrs: self.node_addrs(),
            weights_applied,
            token: None,
            token_expiry_unix: None,
        }
    }

    pub fn events(&self, since: u64, limit: usize) -> EventsResponse {
        let (events, more) = self.events.since(since, limit);
        EventsResponse { last_seq: self.events.last_seq(), events, more }
    }

    pub fn event_log(&mut self) -> &mut EventLog {
        &mut self.events
    }

    /// Records node state changes as events; a node that went down loses its
    /// weight in every job, which is spread over the job's other nodes (or
    /// the job is packed again over the live nodes).
    fn on_transitions(&mut self, transitions: &[Transition]) {
        for t in transitions {
            match t {
                Transition::Joined { node_id, addr } => {
                    self.events.push(
                        EventKind::NodeJoined,
                        Some(node_id),
                        None,
                        format!("node {node_id} joined at {addr}"),
                    );
                }
                Transition::Recovered { node_id, silent_for } => {
                    self.events.push(
                        EventKind::NodeRecovered,
                        Some(node_id),
                        None,
                        format!("node {node_id} is back after {} ms of silence", silent_for.as_millis()),
                    );
                }
                Transition::Restarted { node_id } => {
                    self.events.push(
                        EventKind::NodeRestarted,
                        Some(node_id),
                        None,
                        format!("node {node_id} restarted (its counters went backwards)"),
                    );
                }
                Transition::Down { node_id, silent_for } => {
                    self.events.push(
                        EventKind::NodeDown,
                        Some(node_id),
                        None,
                        format!(
                            "node {node_id} is dead: no heartbeat for {} ms ({} missed)",
                            silent_for.as_millis(),
                            self.missed_heartbeats
                        ),
                    );
                    self.close_node(node_id);
                }
            }
        }
    }

    /// Takes `node_id` out of every job's weight map.
    fn close_node(&mut self, node_id: &str) {
        let affected: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.weights.get(node_id).is_some_and(|&w| w > 0.0))
            .map(|j| j.name.clone())
            .collect();
        for name in affected {
            let spread = match self.jobs.get_mut(&name) {
                Some(j) => policy::drop_node(&mut j.weights, node_id),
                None => continue,
            };
            if !spread {
                let rooms = self.rooms(Some(&name));
                let packed = self.jobs.get(&name).and_then(|j| policy::pack(&j.alloc, &rooms));
                if let Some(j) = self.jobs.get_mut(&name) {
                    match packed {
                        Some(p) => {
                            j.weights = p.weights;
                            j.overcommitted = p.overcommitted;
                        }
                        None => j.weights.clear(),
                    }
                }
            }
            let text = self.jobs.get(&name).map(|j| weights_text(&j.weights)).unwrap_or_default();
            let text = if text.is_empty() { "none: no live node".to_string() } else { text };
            self.events.push(
                EventKind::Weights,
                Some(node_id),
                Some(&name),
                format!("{name}: weight 0 on {node_id}; weights now {text}"),
            );
        }
    }
}

// ---- commands and the view of the rightsizing policy ------------------------------

impl Cluster {
    /// Sets the polling cores wanted on a node, with an event: sent on its
    /// heartbeat replies until its report shows them ([`Cluster::take_commands`]).
    /// A newer count replaces one not yet applied.
    pub fn set_polling_cores(&mut self, node_id: &str, cores: usize, why: &str) -> Result<(), String> {
        let rec = self.nodes.get(node_id).ok_or_else(|| format!("no node `{node_id}`"))?;
        let total = rec.report.cores.len();
        if cores == 0 || cores > total {
            return Err(format!("node {node_id} has {total} core(s): polling cores must be 1..={total}"));
        }
        self.polling_wanted.insert(node_id.to_string(), cores);
        self.events.push(
            EventKind::Cores,
            Some(node_id),
            None,
            format!("{node_id}: {cores} of {total} cores polling ({why})"),
        );
        Ok(())
    }

    /// The commands for `node_id`'s heartbeat reply: the polling cores
    /// wanted while its latest report shows another count (dropped once it
    /// shows them, or when the node no longer has that many cores).
    pub fn take_commands(&mut self, node_id: &str) -> Vec<NodeCommand> {
        let Some(&cores) = self.polling_wanted.get(node_id) else { return Vec::new() };
        let Some(r) = self.nodes.get(node_id) else { return Vec::new() };
        let polling = r.report.cores.iter().filter(|c| c.polling).count();
        if polling == cores || cores > r.report.cores.len() {
            self.polling_wanted.remove(node_id);
            return Vec::new();
        }
        vec![NodeCommand::SetPollingCores { cores }]
    }

    /// What the rightsizing policy sees: every live node.
    pub fn scaling_view(&self, provisioned: &[String]) -> Vec<rightsize::NodeView> {
        self.nodes
            .iter()
            .filter(|(_, r)| r.state == NodeState::Up)
            .map(|(id, r)| {
                // A command not yet applied counts as applied, so the policy
                // does not ask twice.
                let queued = self.polling_wanted.get(id).copied();
                let polling: Vec<usize> =
                    r.report.cores.iter().filter(|c| c.polling).map(|c| c.core).collect();
                let active = queued.unwrap_or(polling.len()).max(1);
                let busy: Vec<f64> = polling.iter().filter_map(|c| r.busy.get(c).copied()).collect();
                // A metadata-only node's tiers hold no job data: its capacity
                // is not the cluster's (its cores and network still count).
                let stores = r.report.role.storage();
                let tier = |name: &str| -> (u64, u64) {
                    r.report
                        .tiers
                        .iter()
                        .filter(|t| stores && t.tier == name)
                        .fold((0u64, 0u64), |(u, c), t| {
                            (u.saturating_add(t.used_bytes), c.saturating_add(t.capacity_bytes))
                        })
                };
                let (dram_used, dram_cap) = tier("dram");
                let (flash_used, flash_cap) = tier("flash");
                rightsize::NodeView {
                    node_id: id.clone(),
                    draining: self.draining.contains_key(id),
                    // Rightsizing drains only what the provisioner started and draining can empty.
                    provisioned: provisioned.contains(id) && self.drainable(id),
                    cores_total: r.report.cores.len(),
                    cores_active: active,
                    busy: if busy.is_empty() { 0.0 } else { busy.iter().sum::<f64>() / busy.len() as f64 },
                    net_rate: r.net_rate,
                    dram_used,
                    dram_cap,
                    flash_used,
                    flash_cap,
                    blocks_used: r.report.tiers.iter().map(|t| t.blocks_used).fold(0, u64::saturating_add),
                }
            })
            .collect()
    }
}

// ---- draining ------------------------------------------------------------------

impl Cluster {
    pub fn is_draining(&self, node_id: &str) -> bool {
        self.draining.contains_key(node_id)
    }

    /// Live nodes that take new data, sorted by id.
    pub fn open_nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(id, r)| r.state == NodeState::Up && !self.draining.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Bytes a node holds over every tier, from its latest report.
    pub fn used_bytes(&self, node_id: &str) -> Option<u64> {
        self.nodes
            .get(node_id)
            .map(|r| r.report.tiers.iter().map(|t| t.used_bytes).fold(0, u64::saturating_add))
    }

    /// Of `candidates`, the node with the least data, then the least
    /// reserved throughput (the one cheapest to drain).
    pub fn least_used(&self, candidates: &[String]) -> Option<String> {
        let rooms = self.rooms(None);
        candidates
            .iter()
            .filter(|id| self.is_live(id) && self.drainable(id))
            .min_by_key(|id| {
                let reserved = rooms.iter().find(|r| &r.node_id == *id).map_or(0, |r| r.throughput_reserved);
                (self.used_bytes(id).unwrap_or(0), reserved, (*id).clone())
            })
            .cloned()
    }

    /// Whether draining can empty a node: not a metadata-only one (it holds
    /// no blocks, so it would be stopped at once with the namespaces of its
    /// jobs), and not one holding a live job's namespace.
    fn drainable(&self, node_id: &str) -> bool {
        self.nodes.get(node_id).is_none_or(|r| r.report.role.storage()) && !self.holds_namespaces(node_id)
    }

    /// Whether `node_id` holds the namespace of a job the controller knows
    /// (registered or being registered), or reports a registered job: once
    /// stopped, every object of those jobs would be unreachable.
    fn holds_namespaces(&self, node_id: &str) -> bool {
        self.jobs.values().any(|j| j.node_id == node_id)
            || self.nodes.get(node_id).is_some_and(|r| r.report.jobs.iter().any(|j| j.registered))
    }

    /// Starts draining a live node: weight 0 for new data (every job's map
    /// drops it), kept running until its blocks are freed.
    pub fn start_drain(&mut self, node_id: &str, why: &str, now: Instant) -> Result<(), String> {
        match self.nodes.get(node_id) {
            None => return Err(format!("no node `{node_id}`")),
            Some(r) if !r.report.role.storage() => {
                return Err(format!(
                "node {node_id} is a metadata node: it holds job namespaces, not blocks, and is not drained"
            ))
            }
            Some(_) if self.holds_namespaces(node_id) => {
                return Err(format!(
                    "node {node_id} holds the namespace of live jobs ({}): stopping it would make their \
                     objects unreachable; deregister them first",
                    self.namespaces_on(node_id).join(", ")
                ))
            }
            Some(_) => {}
        }
        if self.draining.contains_key(node_id) {
            return Err(format!("node {node_id} is already draining"));
        }
        self.draining.insert(node_id.to_string(), now);
        let used = self.used_bytes(node_id).unwrap_or(0);
        let message = if self.state(node_id) == Some(NodeState::Down) {
            // A crashed node: nothing to wait for, it is stopped and forgotten.
            format!("draining {node_id} ({why}): it is down; it is stopped and forgotten")
        } else {
            format!(
                "draining {node_id} ({why}): weight 0 for new data; waiting for its {used} bytes to be freed"
            )
        };
        self.events.push(EventKind::Drain, Some(node_id), None, message);
        self.close_node(node_id);
        Ok(())
    }

    /// Names of the jobs whose namespace `node_id` holds, at most a few.
    fn namespaces_on(&self, node_id: &str) -> Vec<String> {
        let mut names: BTreeSet<&str> =
            self.jobs.values().filter(|j| j.node_id == node_id).map(|j| j.name.as_str()).collect();
        if let Some(r) = self.nodes.get(node_id) {
            names.extend(r.report.jobs.iter().filter(|j| j.registered).map(|j| j.name.as_str()));
        }
        names.into_iter().take(8).map(str::to_string).collect()
    }

    /// Draining nodes ready to stop: no block in use in a report received
    /// after the drain started, or dead; never one holding a live job's
    /// namespace (a job registered or adopted there after the drain started).
    pub fn drained(&self) -> Vec<String> {
        self.draining
            .iter()
            .filter(|(id, _)| !self.holds_namespaces(id))
            .filter(|(id, since)| match self.nodes.get(*id) {
                None => true,
                Some(r) if r.state == NodeState::Down => true,
                Some(r) => r.received > **since && r.report.tiers.iter().all(|t| t.blocks_used == 0),
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The nodes of `provisioned` (started by the provisioner) down for
    /// longer than [`FORGET_DOWN_AFTER`] down-intervals, with that time, to
    /// be forgotten: not draining (a drain ends by itself), and holding no
    /// live job's namespace (the job would lose its node).
    pub fn long_down(&self, provisioned: &[String], now: Instant) -> Vec<(String, Duration)> {
        let grace = self.down_after() * FORGET_DOWN_AFTER;
        provisioned
            .iter()
            .filter(|id| !self.draining.contains_key(*id) && !self.holds_namespaces(id))
            .filter(|id| {
                self.nodes.get(*id).is_some_and(|r| {
                    r.state == NodeState::Down && now.saturating_duration_since(r.received) > grace
                })
            })
            .map(|id| (id.clone(), grace))
            .collect()
    }

    /// Forgets a node that was stopped on purpose, with an event.
    pub fn forget(&mut self, node_id: &str, message: String) {
        if let Some(r) = self.nodes.remove(node_id) {
            let n = r.report.node_number;
            if r.state == NodeState::Down && r.report.tiers.iter().any(|t| t.blocks_used > 0) {
                // It died holding blocks: reads of them must keep answering
                // data unavailable, not go to a node that is not there.
                self.gone.insert(n);
            }
            // Its blocks went with it; another node with its number is another node.
            if !self.nodes.values().any(|r| r.report.node_number == n) && self.owed.forget(n) > 0 {
                self.save_owed();
            }
        }
        if self.owed.forget_deregs(node_id) > 0 {
            self.save_owed();
        }
        self.draining.remove(node_id);
        self.polling_wanted.remove(node_id);
        self.weights_view.remove(node_id);
        self.restarts.remove(node_id);
        self.boots.remove(node_id);
        self.dram_view.remove(node_id);
        for j in self.jobs.values_mut() {
            j.weights.remove(node_id);
        }
        self.events.push(EventKind::Drain, Some(node_id), None, message);
    }

    /// Records a scaling decision or its outcome.
    pub fn scale_event(&mut self, kind: EventKind, node: Option<&str>, message: String) {
        self.events.push(kind, node, None, message);
    }
}

// ---- the cluster view on heartbeat replies ----------------------------------------

impl Cluster {
    /// The next version of a view: larger than every earlier one, and at
    /// least the wall clock in ms.
    fn next_version(&mut self) -> u64 {
        bump_version(&mut self.last_version)
    }

    /// A node holding a view version above every one handed out (from an
    /// earlier controller whose clock ran ahead) would ignore ours as older:
    /// versions handed out from now on go past it, for every view.
    fn pass_versions_held(&mut self, report: &NodeReport) {
        let Some(a) = report.applied else { return };
        let held = [a.dead_version, a.weights_version, a.restarts_version, a.dram_shares_version];
        if let Some(max) = held.into_iter().flatten().max() {
            self.last_version = self.last_version.max(max);
        }
    }

    /// Node id → number of the live nodes whose number is theirs alone.
    fn numbers_by_id(&self) -> BTreeMap<&str, u16> {
        self.live_numbers().into_iter().map(|(n, r)| (r.report.node_id.as_str(), n)).collect()
    }

    /// Numbers of the dead nodes, sorted; a number a live node holds is not dead.
    fn dead_numbers(&self) -> Vec<u16> {
        let live: BTreeSet<u16> =
            self.nodes.values().filter(|r| r.state == NodeState::Up).map(|r| r.report.node_number).collect();
        let mut dead: BTreeSet<u16> = self
            .nodes
            .values()
            .filter(|r| r.state == NodeState::Down)
            .map(|r| r.report.node_number)
            .chain(self.gone.iter().copied())
            .filter(|n| !live.contains(n))
            .collect();
        // A restarted node stays dead until every live metadata node has
        // marked its earlier blocks lost: no new block goes there meanwhile.
        for (id, queue) in &self.restarts {
            if self.state(id) == Some(NodeState::Up) {
                dead.extend(queue.values());
            }
        }
        dead.into_iter().collect()
    }

    /// The weight maps of the registered jobs whose namespace `node_id` holds.
    fn weight_maps_of(&self, node_id: &str) -> WeightMaps {
        let numbers = self.numbers_by_id();
        self.jobs
            .values()
            .filter(|j| !j.pending && j.node_id == node_id)
            .map(|j| (j.name.clone(), job_weight_map(j, &numbers)))
            .filter(|(_, m)| !m.is_empty())
            .collect()
    }

    /// The DRAM shares on storage node `node_id`: for each registered
    /// latency-sensitive job with flash in its allocation (larger than the
    /// DRAM it got, which may be none) and a weight on the node, its DRAM
    /// times that weight, rounded up. A job whose metadata node has not reported it
    /// yet (its id there is not known) gets its share on a later heartbeat.
    fn dram_shares_of(&self, node_id: &str) -> Vec<DramShare> {
        let mut out: Vec<DramShare> = self
            .jobs
            .values()
            .filter(|j| !j.pending && j.alloc.latency_sensitive && j.alloc.flash > 0)
            .filter_map(|j| {
                let w = j.weights.get(node_id).copied().filter(|&w| w > 0.0)?;
                let home = self.nodes.get(&j.node_id)?;
                let id = home.report.jobs.iter().find(|r| r.name == j.name && r.registered)?.id;
                let bytes = (j.alloc.dram as f64 * w.min(1.0)).ceil() as u64;
                Some(DramShare { metadata_node: home.report.node_number, job: id, bytes })
            })
            .collect();
        out.sort_unstable_by_key(|d| (d.metadata_node, d.job));
        out.dedup_by_key(|d| (d.metadata_node, d.job));
        out
    }

    /// What `node_id` lacks of the cluster view, as commands for its
    /// heartbeat reply: the dead set when its report shows another version
    /// (every live node: any of them may be a metadata node), and the weight
    /// maps of its jobs when it shows another weights version. A restarted
    /// node reports none and gets both again; a lost reply is made up for
    /// on the next heartbeat. Nodes that do not report what they applied
    /// get nothing (they would not understand it).
    pub fn view_commands(&mut self, node_id: &str) -> Vec<NodeCommand> {
        let Some(held) = self.nodes.get(node_id).and_then(|r| r.report.applied) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let dead = self.dead_numbers();
        // A node holding a newer version than ours (an earlier controller's)
        // gets a new one: past every version held ([`Cluster::pass_versions_held`]).
        if dead != self.dead_view.1 || held.dead_version.is_some_and(|v| v > self.dead_view.0) {
            let v = self.next_version();
            self.dead_view = (v, dead);
        }
        let (version, dead) = &self.dead_view;
        if held.dead_version != Some(*version) && !(held.dead_version.is_none() && dead.is_empty()) {
            out.push(NodeCommand::SetDeadNodes { version: *version, dead: dead.clone() });
        }
        if let Some(queue) = self.restarts.get(node_id).filter(|q| !q.is_empty()) {
            out.push(NodeCommand::NodesRestarted { restarts: queue.iter().map(|(&v, &n)| (v, n)).collect() });
        }
        if let Some(frees) = self.frees_for(node_id) {
            out.push(NodeCommand::FreeOwners { frees });
        }
        let maps = self.weight_maps_of(node_id);
        let empty = maps.is_empty();
        if let Some((version, jobs)) = node_view(
            &mut self.weights_view,
            &mut self.last_version,
            node_id,
            held.weights_version,
            maps,
            empty,
        ) {
            out.push(NodeCommand::SetJobWeights { version, jobs });
        }
        let shares = self.dram_shares_of(node_id);
        let empty = shares.is_empty();
        if let Some((version, shares)) = node_view(
            &mut self.dram_view,
            &mut self.last_version,
            node_id,
            held.dram_shares_version,
            shares,
            empty,
        ) {
            out.push(NodeCommand::SetDramShares { version, shares });
        }
        out
    }
}

// ---- nodes that restarted: their earlier blocks are lost --------------------------

impl Cluster {
    /// Notes `report`'s boot id. Another one than before means its node
    /// restarted: every metadata-capable node that applies the view (but
    /// the restarted one) is to mark lost the objects naming its blocks,
    /// and a restart it reports applied (`restarts_version`) is dropped
    /// from its queue.
    fn note_boot(&mut self, report: &NodeReport) -> bool {
        let id = &report.node_id;
        if let Some(v) = report.applied.and_then(|a| a.restarts_version) {
            if let Some(q) = self.restarts.get_mut(id) {
                q.retain(|&version, _| version > v);
            }
        }
        if report.boot_id == 0 {
            return false;
        }
        let before = self.boots.insert(id.clone(), report.boot_id);
        if before.is_none_or(|b| b == report.boot_id) {
            return false;
        }
        let number = report.node_number;
        let version = self.next_version();
        let told: Vec<String> = self
            .nodes
            .iter()
            .filter(|(other, r)| {
                *other != id
                    && r.report.role.metadata()
                    && r.report.applied.is_some()
                    && r.report.node_number != number
            })
            .map(|(other, _)| other.clone())
            .collect();
        for m in &told {
            self.restarts.entry(m.clone()).or_default().insert(version, number);
        }
        self.events.push(
            EventKind::NodeRestarted,
            Some(id),
            None,
            format!(
                "node {id} (number {number}) restarted with a new boot id: its blocks of before are gone; \
                 {} metadata node(s) mark the objects naming them lost (data unavailable), and it takes \
                 no new blocks until the live ones have",
                told.len()
            ),
        );
        true
    }
}

// ---- frees owed to nodes that were away at a deregistration ----------------------

impl Cluster {
    /// After job `job` was deregistered (`d`) with the client knowing the
    /// nodes `asked`: owes a `FreeOwner` to every other node the controller
    /// knows (down, or not reachable as a live node) and to those of `asked`
    /// whose free failed, each with its PERSIST blocks to keep. Returns
    /// their numbers.
    pub fn owe_frees(&mut self, job: &str, d: &Deregistered, asked: &BTreeSet<u16>) -> Vec<u16> {
        let failed: BTreeSet<u16> = d.unfreed.iter().map(|(n, _)| *n).collect();
        let known: BTreeSet<u16> = self.nodes.values().map(|r| r.report.node_number).collect();
        let owed: Vec<u16> = known
            .into_iter()
            .filter(|&n| n != d.meta_node && (!asked.contains(&n) || failed.contains(&n)))
            .collect();
        for &n in &owed {
            let keep = d.kept.iter().filter(|l| l.node == n).map(|l| l.block.0).collect();
            let id = self.next_version();
            self.owed.add(
                n,
                OwedFree { id, job: job.to_string(), job_id: d.job_id, meta_node: d.meta_node, keep },
            );
        }
        if !owed.is_empty() {
            let list: Vec<String> = owed.iter().map(u16::to_string).collect();
            self.events.push(
                EventKind::OwedFree,
                None,
                Some(job),
                format!(
                    "{job}: node(s) {} were away: their blocks of the job are freed when they report again",
                    list.join(", ")
                ),
            );
            self.save_owed();
        }
        owed
    }

    /// The frees `node_id` still owes, if it can be told (it applies the
    /// view, and its number is its own); an empty list when it acknowledges
    /// frees no longer owed, so it stops reporting them.
    fn frees_for(&self, node_id: &str) -> Option<Vec<OwedFree>> {
        let r = self.nodes.get(node_id).filter(|r| r.report.applied.is_some())?;
        let n = r.report.node_number;
        if self.numbers_by_id().get(node_id).is_none_or(|&m| m != n) {
            return None;
        }
        let frees = self.owed.for_node(n);
        (!frees.is_empty() || !r.report.frees_done.is_empty()).then_some(frees)
    }

    /// The frees `report` says its node applied are no longer owed.
    fn acknowledge_frees(&mut self, report: &NodeReport) {
        if report.frees_done.is_empty() {
            return;
        }
        let done = self.owed.acknowledge(report.node_number, &report.frees_done);
        for f in &done {
            self.events.push(
                EventKind::OwedFree,
                Some(&report.node_id),
                Some(&f.job),
                format!(
                    "{}: node {} freed the job's blocks (owed since it was away at the deregistration)",
                    f.job, report.node_id
                ),
            );
        }
        if !done.is_empty() {
            self.save_owed();
        }
    }

    /// Job `job`, deregistered through the controller, is still registered
    /// on its metadata node `node_id` (down, or its deregistration failed):
    /// it is deregistered there once the node is up, and not adopted meanwhile.
    pub fn owe_deregistration(&mut self, job: &str, node_id: &str, why: &str) {
        self.owed.add_dereg(job, node_id);
        self.events.push(
            EventKind::OwedFree,
            Some(node_id),
            Some(job),
            format!("{job}: not deregistered on {node_id} ({why}): it is, when the node is up"),
        );
        self.save_owed();
    }

    /// The owed deregistrations whose metadata node is up, with what one
    /// needs (job, node id, its address, the live nodes' addresses), at most
    /// `limit`. None in the controller's first down-interval: the live nodes
    /// it has not heard from yet would neither be freed nor owed the free.
    pub fn deregistrations_due(
        &self,
        now: Instant,
        limit: usize,
    ) -> Vec<(String, String, String, BTreeMap<u16, String>)> {
        if now.saturating_duration_since(self.born) < self.down_after() {
            return Vec::new();
        }
        let up = |id: &str| self.nodes.get(id).filter(|r| r.state == NodeState::Up);
        let waiting = |job: &str| {
            self.dereg_failed
                .get(job)
                .is_some_and(|at| now.saturating_duration_since(*at) < self.down_after())
        };
        let due: Vec<(String, String, String)> = self
            .owed
            .deregs()
            .filter(|(job, _)| !waiting(job))
            .filter_map(|(job, id)| up(id).map(|r| (job.to_string(), id.to_string(), r.report.addr.clone())))
            .take(limit)
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let addrs = self.node_addrs();
        due.into_iter().map(|(j, id, a)| (j, id, a, addrs.clone())).collect()
    }

    /// The owed deregistration of `job` failed (at `now`): it waits a
    /// down-interval before it is tried again.
    pub fn deregistration_failed(&mut self, job: &str, now: Instant) {
        let quiet = self.down_after();
        self.dereg_failed.retain(|_, at| now.saturating_duration_since(*at) < quiet);
        self.dereg_failed.insert(job.to_string(), now);
    }

    /// The owed deregistration of `job` on `node_id` was done (`d`: what
    /// was freed, `None` when the node no longer knew the job), the live
    /// nodes `asked` freeing its blocks: frees are owed to the others.
    pub fn deregistration_done(
        &mut self,
        job: &str,
        node_id: &str,
        d: Option<&Deregistered>,
        asked: &BTreeSet<u16>,
    ) {
        self.dereg_failed.remove(job);
        if !self.owed.drop_dereg(job, node_id) {
            return;
        }
        // A report sent before it was done must not bring it back.
        self.hold_off_adoption(job);
        if let Some(d) = d {
            self.owe_frees(job, d, asked);
        }
        self.events.push(
            EventKind::JobDeregistered,
            Some(node_id),
            Some(job),
            format!("job {job} deregistered on {node_id} (owed since the deregistration)"),
        );
        self.save_owed();
    }

    /// Number of frees owed, over all nodes.
    pub fn owed_frees(&self) -> usize {
        self.owed.len()
    }

    fn save_owed(&mut self) {
        if let Err(e) = self.owed.save() {
            self.events.push(EventKind::Error, None, None, format!("owed frees not kept on disk: {e}"));
        }
    }
}

/// The next view version after `last` (and not below the wall clock in
/// ms, so versions grow across controller restarts).
fn bump_version(last: &mut u64) -> u64 {
    *last = last.saturating_add(1).max(unix_ms());
    *last
}

/// One node's part of a per-node view (weight maps, DRAM shares):
/// `views[node_id]` is what the node was last given, with its version. A
/// new version when `want` differs from it, or when the node holds a
/// version above it (an earlier controller's); a node with no entry that
/// holds nothing and has nothing (`empty`) gets none. The view to send, while
/// the node's `held` version is another one.
fn node_view<T: PartialEq + Clone>(
    views: &mut BTreeMap<String, (u64, T)>,
    last_version: &mut u64,
    node_id: &str,
    held: Option<u64>,
    want: T,
    empty: bool,
) -> Option<(u64, T)> {
    let changed = match views.get(node_id) {
        Some((v, have)) => *have != want || held.is_some_and(|h| h > *v),
        None => !empty || held.is_some(),
    };
    if changed {
        let v = bump_version(last_version);
        views.insert(node_id.to_string(), (v, want));
    }
    views.get(node_id).filter(|(v, _)| held != Some(*v)).cloned()
}

/// Job `j`'s weight map by node number: its live nodes with a weight
/// above 0 and a number of their own (weights clamped to 1, which a sum's
/// rounding may pass: the node refuses a map with a weight above 1).
fn job_weight_map(j: &JobRecord, numbers: &BTreeMap<&str, u16>) -> Vec<(u16, f64)> {
    j.weights
        .iter()
        .filter(|(_, &w)| w > 0.0)
        .filter_map(|(id, &w)| numbers.get(id.as_str()).map(|&n| (n, w.min(1.0))))
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How many nodes the size of the average open node would hold the
/// `shortfall` fraction of `alloc`, in its scarcest dimension.
fn extra_nodes(alloc: &Allocation, rooms: &[NodeRoom], shortfall: f64) -> usize {
    let open: Vec<&NodeRoom> = rooms.iter().filter(|r| !r.closed).collect();
    if open.is_empty() {
        return 1;
    }
    let avg = |f: fn(&NodeRoom) -> u64| open.iter().map(|r| f(r) as f64).sum::<f64>() / open.len() as f64;
    let dims = [
        (alloc.throughput, avg(|r| r.throughput_cap)),
        (alloc.dram, avg(|r| r.dram_cap)),
        (alloc.flash, avg(|r| r.flash_cap)),
    ];
    let needed = dims
        .iter()
        .filter(|(need, _)| *need > 0)
        .map(|&(need, cap)| if cap <= 0.0 { 1.0 } else { need as f64 * shortfall / cap })
        .fold(0.0f64, f64::max);
    // A float to int cast saturates; a registration starts a bounded number of nodes.
    (needed.ceil() as usize).clamp(1, MAX_EXTRA_NODES)
}

/// Capacity of a report's regions of tier `name`.
fn tier_capacity(r: &NodeReport, name: &str) -> u64 {
    r.tiers.iter().filter(|t| t.tier == name).map(|t| t.capacity_bytes).fold(0, u64::saturating_add)
}

fn weights_text(w: &BTreeMap<String, f64>) -> String {
    w.iter().filter(|(_, &w)| w > 0.0).map(|(id, w)| format!("{id}={w:.3}")).collect::<Vec<_>>().join(" ")
}

/// Job names as the nodes take them, with a length limit.
pub fn valid_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_JOB_NAME_LEN
        && name != "."
        && name != ".."
        && name.chars().all(|c| !c.is_control() && !c.is_whitespace() && c != '/')
}

fn validate(r: &NodeReport) -> Result<(), ReportError> {
    let id_ok = !r.node_id.is_empty()
        && r.node_id.len() <= MAX_NODE_ID_LEN
        && r.node_id.chars().all(|c| !c.is_control() && !c.is_whitespace() && c != '/');
    if !id_ok {
        return Err(ReportError::BadNodeId);
    }
    if r.addr.parse::<SocketAddr>().is_err() {
        return Err(ReportError::BadAddr(r.addr.chars().take(64).collect()));
    }
    if r.cores.len() > MAX_CORES {
        return Err(ReportError::TooMany(r.cores.len(), "cores", MAX_CORES));
    }
    if r.tiers.len() > MAX_TIER_REGIONS {
        return Err(ReportError::TooMany(r.tiers.len(), "tier regions", MAX_TIER_REGIONS));
    }
    if r.jobs.len() > MAX_JOBS_PER_NODE {
        return Err(ReportError::TooMany(r.jobs.len(), "jobs", MAX_JOBS_PER_NODE));
    }
    let mut cores = HashSet::with_capacity(r.cores.len());
    for c in &r.cores {
        if !cores.insert(c.core) {
            return Err(ReportError::DuplicateCore(c.core));
        }
    }
    let mut regions = HashSet::with_capacity(r.tiers.len());
    for t in &r.tiers {
        if !regions.insert((t.tier.as_str(), t.core)) {
            return Err(ReportError::DuplicateTier(t.tier.clone(), t.core));
        }
        if t.capacity_bytes > MAX_REGION_BYTES || t.used_bytes > MAX_REGION_BYTES {
            return Err(ReportError::RegionTooLarge(t.tier.chars().take(64).collect(), t.core));
        }
    }
    Ok(())
}

/// A node restarted under the same id when its uptime or any core's
/// cumulative counters went backwards.
fn restarted(prev: &NodeReport, next: &NodeReport) -> bool {
    if next.uptime_ms < prev.uptime_ms {
        return true;
    }
    next.cores.iter().any(|c| {
        prev.cores
            .iter()
            .find(|p| p.core == c.core)
            .is_some_and(|p| c.total_ns < p.total_ns || c.busy_ns < p.busy_ns)
    })
}

/// Busy fraction per core over the interval between `prev` and `next`:
/// Δbusy_ns / Δtotal_ns. Without a previous report (first heartbeat, or a
/// restart) the interval starts when the node did. A core with no elapsed
/// time has no fraction, unless it is parked (idle the whole time).
fn busy_fractions(prev: Option<&NodeReport>, next: &NodeReport) -> BTreeMap<usize, f64> {
    let mut out = BTreeMap::new();
    for c in &next.cores {
        let (busy0, total0) = prev
            .and_then(|p| p.cores.iter().find(|pc| pc.core == c.core))
            .map(|pc| (pc.busy_ns, pc.total_ns))
            .unwrap_or((0, 0));
        let d_total = c.total_ns.saturating_sub(total0);
        let d_busy = c.busy_ns.saturating_sub(busy0);
        if d_total > 0 {
            // A node's clock reads can make busy overshoot total by a hair.
            out.insert(c.core, (d_busy as f64 / d_total as f64).clamp(0.0, 1.0));
        } else if c.parked {
            // A core publishes its counters after each pass, so one parked
            // for the whole interval shows no elapsed time: it was idle.
            out.insert(c.core, 0.0);
        }
    }
    out
}

/// Network bytes per second (in + out over every core) between two
/// reports, by the node's own uptime; without a previous one, since start.
fn net_rate(prev: Option<&NodeReport>, next: &NodeReport) -> f64 {
    let bytes = |r: &NodeReport| {
        r.cores.iter().map(|c| c.bytes_in.saturating_add(c.bytes_out)).fold(0, u64::saturating_add)
    };
    let (b0, t0) = prev.map(|p| (bytes(p), p.uptime_ms)).unwrap_or((0, 0));
    let dt = next.uptime_ms.saturating_sub(t0);
    if dt == 0 {
        return 0.0;
    }
    bytes(next).saturating_sub(b0) as f64 * 1000.0 / dt as f64
}

fn sum_tiers<'a>(regions: impl Iterator<Item = &'a crate::api::TierReport>) -> Vec<TierTotals> {
    let mut by_tier: BTreeMap<&str, TierTotals> = BTreeMap::new();
    for t in regions {
        let e = by_tier.entry(t.tier.as_str()).or_insert_with(|| TierTotals {
            tier: t.tier.clone(),
            capacity_bytes: 0,
            used_bytes: 0,
            blocks_total: 0,
            blocks_used: 0,
        });
        e.capacity_bytes = e.capacity_bytes.saturating_add(t.capacity_bytes);
        e.used_bytes = e.used_bytes.saturating_add(t.used_bytes);
        e.blocks_total = e.blocks_total.saturating_add(t.blocks_total);
        e.blocks_used = e.blocks_used.saturating_add(t.blocks_used);
    }
    by_tier.into_values().collect()
}

fn age_ms(rec: &NodeRecord, now: Instant) -> u64 {
    now.saturating_duration_since(rec.received).as_millis().min(u64::MAX as u128) as u64
}

fn summary(rec: &NodeRecord, now: Instant) -> NodeSummary {
    let r = &rec.report;
    NodeSummary {
        node_id: r.node_id.clone(),
        addr: r.addr.clone(),
        role: r.role,
        state: rec.state,
        net: r.net,
        net_fallback_reason: r.net_fallback_reason.clone(),
        poll_mode: r.poll_mode,
        block_size: r.block_size,
        cores: r.cores.len(),
        tiers: sum_tiers(r.tiers.iter()),
        jobs: r.jobs.iter().filter(|j| j.registered).count(),
        node_uptime_ms: r.uptime_ms,
        last_heartbeat_ms_ago: age_ms(rec, now),
    }
}

fn entry(rec: &NodeRecord, now: Instant, draining: bool) -> NodeEntry {
    NodeEntry {
        draining,
        state: rec.state,
        last_heartbeat_ms_ago: age_ms(rec, now),
        heartbeats: rec.heartbeats,
        report: rec.report.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CoreReport, JobReport, NetBackend, PollMode, TierReport};

    pub(super) fn core(core: usize, busy_ns: u64, total_ns: u64) -> CoreReport {
        CoreReport {
            core,
            cpu: Some(core),
            port: 7401 + core as u16,
            busy_ns,
            total_ns,
            connections: 0,
            requests: 0,
            forwarded: 0,
            bytes_in: 0,
            bytes_out: 0,
            parked: false,
            polling: true,
            accepting: true,
        }
    }

    fn tier(core: usize, used: u64) -> TierReport {
        TierReport {
            tier: "dram".into(),
            core,
            capacity_bytes: 1 << 20,
            used_bytes: used,
            blocks_total: 16,
            blocks_used: used / 65536,
            huge_pages: false,
            ..TierReport::default()
        }
    }

    pub(super) fn report(id: &str, uptime_ms: u64, cores: Vec<CoreReport>) -> NodeReport {
        let tiers = cores.iter().map(|c| tier(c.core, 65536)).collect();
        NodeReport {
            node_number: 0,
            boot_id: 0,
            node_id: id.into(),
            role: Default::default(),
            addr: "127.0.0.1:7400".into(),
            net: NetBackend::Epoll,
            net_fallback_reason: None,
            poll_mode: PollMode::Adaptive,
            block_size: 65536,
            uptime_ms,
            cores,
            tiers,
            jobs: vec![],
            applied: None,
            frees_done: Vec::new(),
        }
    }

    const HB: Duration = Duration::from_secs(1);

    #[test]
    fn busy_fraction_is_the_delta_between_heartbeats() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        // First report: 50% busy since start.
        c.heartbeat(report("n", 1000, vec![core(0, 500, 1000), core(1, 0, 1000)]), t0).unwrap();
        let rows = c.cores().cores;
        assert_eq!(rows[0].busy, Some(0.5));
        assert_eq!(rows[1].busy, Some(0.0));
        // Next: core 0 busy 900 of the last 1000 ns, core 1 idle -> 250 of 1000.
        c.heartbeat(report("n", 2000, vec![core(0, 1400, 2000), core(1, 250, 2000)]), t0 + HB).unwrap();
        let rows = c.cores().cores;
        assert_eq!(rows[0].busy, Some(0.9));
        assert_eq!(rows[1].busy, Some(0.25));
        // No time elapsed on a core: no fraction rather than a division by
        // zero, unless the core is parked, which means idle.
        let mut parked = core(1, 250, 2000);
        parked.parked = true;
        c.heartbeat(report("n", 3000, vec![core(0, 1400, 2000), parked]), t0 + 2 * HB).unwrap();
        assert_eq!(c.cores().cores[0].busy, None);
        assert_eq!(c.cores().cores[1].busy, Some(0.0));
    }

    #[test]
    fn busy_fraction_restarts_with_the_node() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report("n", 5000, vec![core(0, 4000, 5000)]), t0).unwrap();
        let tr = c.heartbeat(report("n", 100, vec![core(0, 10, 100)]), t0 + HB).unwrap();
        assert_eq!(tr, vec![Transition::Restarted { node_id: "n".into() }]);
        assert_eq!(c.cores().cores[0].busy, Some(0.1));
    }

    #[test]
    fn busy_fraction_is_clamped() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report("n", 1, vec![core(0, 1200, 1000)]), t0).unwrap();
        assert_eq!(c.cores().cores[0].busy, Some(1.0));
    }

    #[test]
    fn node_goes_down_after_missed_heartbeats_and_recovers() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let tr = c.heartbeat(report("n", 1, vec![core(0, 0, 1)]), t0).unwrap();
        assert!(matches!(&tr[..], [Transition::Joined { .. }]));
        assert!(c.sweep(t0 + 3 * HB).is_empty(), "exactly three intervals is not yet down");
        assert_eq!(c.state("n"), Some(NodeState::Up));
        let down = c.sweep(t0 + 3 * HB + Duration::from_millis(1));
        assert!(matches!(&down[..], [Transition::Down { node_id, .. }] if node_id == "n"));
        assert_eq!(c.state("n"), Some(NodeState::Down));
        assert!(c.sweep(t0 + 10 * HB).is_empty(), "down is reported once");
        assert_eq!(c.tier_totals(), vec![], "a down node's capacity does not count");
        let tr = c.heartbeat(report("n", 11_000, vec![core(0, 0, 2)]), t0 + 11 * HB).unwrap();
        assert!(matches!(&tr[..], [Transition::Recovered { silent_for, .. }] if *silent_for == 11 * HB));
        assert_eq!(c.state("n"), Some(NodeState::Up));
    }

    #[test]
    fn totals_and_jobs() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let mut r = report("a", 1, vec![core(0, 0, 1), core(1, 0, 1)]);
        r.jobs = vec![
            JobReport { name: "j1".into(), id: 1, registered: true, objects: 2, bytes: 10 },
            JobReport { name: "old".into(), id: 2, registered: false, objects: 1, bytes: 5 },
        ];
        c.heartbeat(r, t0).unwrap();
        let mut r = report("b", 1, vec![core(0, 0, 1)]);
        r.jobs = vec![JobReport { name: "j1".into(), id: 7, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(r, t0).unwrap();
        let totals = c.tier_totals();
        assert_eq!(totals.len(), 1);
        assert_eq!(totals[0].capacity_bytes, 3 << 20);
        assert_eq!(totals[0].used_bytes, 3 * 65536);
        assert_eq!(c.job_count(), 1);
        let jobs = c.jobs().jobs;
        assert_eq!(
            jobs.iter().map(|j| (j.name.as_str(), j.node_id.as_str())).collect::<Vec<_>>(),
            vec![("j1", "a"), ("j1", "b"), ("old", "a")]
        );
        let s = c.summaries(t0 + Duration::from_millis(250));
        assert_eq!(s[0].cores, 2);
        assert_eq!(s[0].jobs, 1);
        assert_eq!(s[0].last_heartbeat_ms_ago, 250);
    }

    #[test]
    fn rejects_bad_reports() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let mut r = report("", 1, vec![]);
        assert_eq!(c.heartbeat(r.clone(), t0), Err(ReportError::BadNodeId));
        r.node_id = "a/b".into();
        assert_eq!(c.heartbeat(r.clone(), t0), Err(ReportError::BadNodeId));
        r.node_id = "x".repeat(MAX_NODE_ID_LEN + 1);
        assert_eq!(c.heartbeat(r.clone(), t0), Err(ReportError::BadNodeId));
        r.node_id = "n".into();
        r.addr = "localhost".into();
        assert!(matches!(c.heartbeat(r.clone(), t0), Err(ReportError::BadAddr(_))));
        let r = report("n", 1, vec![core(0, 0, 1), core(0, 0, 1)]);
        assert_eq!(c.heartbeat(r, t0), Err(ReportError::DuplicateCore(0)));
        let mut r = report("n", 1, vec![core(0, 0, 1)]);
        r.tiers.push(r.tiers[0].clone());
        assert_eq!(c.heartbeat(r, t0), Err(ReportError::DuplicateTier("dram".into(), 0)));
        assert_eq!(c.node_count(), 0, "rejected reports are not stored");
    }
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use crate::api::AppliedView;

    const HB: Duration = Duration::from_secs(1);

    fn report(id: &str, number: u16, uptime_ms: u64, applied: Option<AppliedView>) -> NodeReport {
        let mut r =
            super::tests::report(id, uptime_ms, vec![super::tests::core(0, 0, uptime_ms * 1_000_000)]);
        r.node_number = number;
        r.addr = format!("127.0.0.1:{}", 7400 + number);
        r.applied = applied;
        r
    }

    fn weights_cmd(cmds: &[NodeCommand]) -> Option<(u64, WeightMaps)> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::SetJobWeights { version, jobs } => Some((*version, jobs.clone())),
            _ => None,
        })
    }

    fn dead_cmd(cmds: &[NodeCommand]) -> Option<(u64, Vec<u16>)> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::SetDeadNodes { version, dead } => Some((*version, dead.clone())),
            _ => None,
        })
    }

    #[test]
    fn roles_decide_the_metadata_node_and_the_weights() {
        use crate::api::Role;
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let with_role = |id: &str, n: u16, role: Role| {
            let mut r = report(id, n, 1000, Some(AppliedView::default()));
            r.role = role;
            r
        };
        c.heartbeat(with_role("m", 1, Role::Metadata), t0).unwrap();
        // Only a metadata node: nowhere to put blocks.
        assert_eq!(c.plan_job("early", Hints::default()).unwrap_err(), JobError::NoNodes);
        c.heartbeat(with_role("s1", 2, Role::Storage), t0).unwrap();
        c.heartbeat(with_role("s2", 3, Role::Storage), t0).unwrap();
        for i in 0..4 {
            let name = format!("j{i}");
            let plan = c.plan_job(&name, Hints::default()).unwrap();
            assert_eq!(plan.node_id, "m", "only m serves namespaces");
            c.commit_job(&name).unwrap();
            let w = &c.job_record(&name).unwrap().weights;
            assert!(w.get("m").copied().unwrap_or(0.0) == 0.0, "metadata-only m has a weight: {w:?}");
            let sum: f64 = w.values().sum();
            assert!((sum - 1.0).abs() < 1e-9, "weights {w:?} sum to {sum}");
        }
        // Without a live metadata-capable node, registration is refused.
        let t1 = t0 + 4 * HB;
        c.heartbeat(with_role("s1", 2, Role::Storage), t1).unwrap();
        c.heartbeat(with_role("s2", 3, Role::Storage), t1).unwrap();
        c.sweep(t1);
        assert_eq!(c.plan_job("late", Hints::default()).unwrap_err(), JobError::NoMetadataNode);
        assert_eq!(c.summaries(t1).iter().find(|n| n.node_id == "m").unwrap().role, Role::Metadata);
    }

    #[test]
    fn weight_maps_and_dead_set_go_to_the_nodes_that_lack_them() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let fresh = Some(AppliedView::default());
        for (id, n) in [("a", 1), ("b", 2), ("c", 3)] {
            c.heartbeat(report(id, n, 1000, fresh), t0).unwrap();
            assert!(c.view_commands(id).is_empty(), "nothing to send to {id} yet");
        }
        // A node that does not report what it applied gets no view commands.
        c.heartbeat(report("old", 9, 1000, None), t0).unwrap();
        assert!(c.view_commands("old").is_empty());

        let plan = c.plan_job("j", Hints::default()).unwrap();
        c.commit_job("j").unwrap();
        let w = BTreeMap::from([("a".to_string(), 0.5), ("b".to_string(), 0.25), ("c".to_string(), 0.25)]);
        c.jobs.get_mut("j").unwrap().weights = w;
        let home = plan.node_id.clone();
        let number = |id: &str| -> u16 {
            match id {
                "a" => 1,
                "b" => 2,
                _ => 3,
            }
        };
        let home_n = number(&home);

        // The job's metadata node gets the map by node number; others do not.
        let (v, maps) = weights_cmd(&c.view_commands(&home)).expect("weights for the job's node");
        assert_eq!(maps["j"], vec![(1, 0.5), (2, 0.25), (3, 0.25)]);
        assert!(!c.job("j").unwrap().weights_applied, "not applied before the node says so");
        // Until the node reports the version, the same map is sent again.
        assert_eq!(weights_cmd(&c.view_commands(&home)), Some((v, maps.clone())));
        let in_step = Some(AppliedView {
            dead_version: None,
            weights_version: Some(v),
            restarts_version: None,
            dram_shares_version: None,
        });
        c.heartbeat(report(&home, home_n, 2000, in_step), t0 + HB).unwrap();
        assert!(c.view_commands(&home).is_empty(), "in step: nothing to send");
        assert!(c.job("j").unwrap().weights_applied);

        // `c` misses three heartbeats: dead. Every live node gets the dead
        // set; the job's node gets its map without `c`.
        let victim = if home == "c" { "b" } else { "c" };
        let t1 = t0 + 4 * HB;
        for id in ["a", "b", "c"].into_iter().filter(|&id| id != victim) {
            let held = if id == home { in_step } else { fresh };
            c.heartbeat(report(id, number(id), 5000, held), t1).unwrap();
        }
        c.heartbeat(report("old", 9, 5000, None), t1).unwrap();
        c.sweep(t1);
        assert_eq!(c.state(victim), Some(NodeState::Down));
        let cmds = c.view_commands(&home);
        let (dv, dead) = dead_cmd(&cmds).expect("dead set");
        assert_eq!(dead, vec![number(victim)]);
        let (v2, maps) = weights_cmd(&cmds).expect("the job's map changed");
        assert!(v2 > v && maps["j"].iter().all(|&(n, _)| n != number(victim)), "{maps:?}");
        assert!(!c.job("j").unwrap().weights_applied);
        let other = ["a", "b", "c"].into_iter().find(|&id| id != home && id != victim).unwrap();
        let cmds = c.view_commands(other);
        assert_eq!(dead_cmd(&cmds), Some((dv, vec![number(victim)])));
        assert_eq!(weights_cmd(&cmds), None, "{other} holds no job");

        // The job's node restarts: it reports nothing applied and gets both again.
        c.heartbeat(report(&home, home_n, 10, Some(AppliedView::default())), t1 + HB).unwrap();
        let cmds = c.view_commands(&home);
        assert_eq!(dead_cmd(&cmds), Some((dv, vec![number(victim)])));
        assert_eq!(weights_cmd(&cmds).map(|(v, _)| v), Some(v2));

        // The dead node comes back: a newer, empty dead set.
        c.heartbeat(report(victim, number(victim), 9000, fresh), t1 + 2 * HB).unwrap();
        let held = Some(AppliedView {
            dead_version: Some(dv),
            weights_version: Some(v2),
            restarts_version: None,
            dram_shares_version: None,
        });
        c.heartbeat(report(&home, home_n, 1010, held), t1 + 2 * HB).unwrap();
        let (dv2, dead) = dead_cmd(&c.view_commands(&home)).expect("dead set again");
        assert!(dv2 > dv && dead.is_empty());
    }

    fn shares_cmd(cmds: &[NodeCommand]) -> Option<(u64, Vec<DramShare>)> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::SetDramShares { version, shares } => Some((*version, shares.clone())),
            _ => None,
        })
    }

    #[test]
    fn storage_nodes_get_the_dram_shares_of_jobs_with_dram_and_flash() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let fresh = Some(AppliedView::default());
        for (id, n) in [("a", 1), ("b", 2), ("c", 3)] {
            c.heartbeat(report(id, n, 1000, fresh), t0).unwrap();
        }
        let jobs = [
            ("mixed", 100u64 << 20, 300u64 << 20),
            ("dram-only", 64 << 20, 0),
            ("no-dram-left", 0, 64 << 20),
        ];
        for (name, dram, flash) in jobs {
            c.plan_job(name, Hints::default()).unwrap();
            c.commit_job(name).unwrap();
            let j = c.jobs.get_mut(name).unwrap();
            (j.alloc.dram, j.alloc.flash, j.alloc.latency_sensitive) = (dram, flash, true);
            j.weights = BTreeMap::from([("a".to_string(), 0.75), ("b".to_string(), 0.25)]);
            // Both namespaces on c, which holds no blocks of them.
            j.node_id = "c".into();
        }
        let home = "c";
        // Until the metadata node reports the job's id, no share can name it.
        assert_eq!(shares_cmd(&c.view_commands("a")), None);
        let home_n = c.nodes[home].report.node_number;
        let mut r = report(home, home_n, 2000, fresh);
        r.jobs = ["mixed", "dram-only", "no-dram-left"]
            .iter()
            .zip([7u32, 8, 9])
            .map(|(n, id)| crate::api::JobReport {
                name: n.to_string(),
                id,
                registered: true,
                objects: 0,
                bytes: 0,
            })
            .collect();
        c.heartbeat(r, t0 + HB).unwrap();

        // A job that got no DRAM has a share of none: all its blocks go to flash.
        let share = |bytes: u64| {
            vec![
                DramShare { metadata_node: home_n, job: 7, bytes },
                DramShare { metadata_node: home_n, job: 9, bytes: 0 },
            ]
        };
        let (va, got) = shares_cmd(&c.view_commands("a")).expect("a's shares");
        assert_eq!(got, share(75 << 20), "DRAM times a's weight; the DRAM-only job has no share");
        assert_eq!(shares_cmd(&c.view_commands("b")).map(|(_, s)| s), Some(share(25 << 20)));
        assert_eq!(shares_cmd(&c.view_commands("c")), None, "c has no weight for the job");
        // Sent until applied, then not again.
        assert_eq!(shares_cmd(&c.view_commands("a")).map(|(v, _)| v), Some(va));
        let held = Some(AppliedView { dram_shares_version: Some(va), ..AppliedView::default() });
        c.heartbeat(report("a", 1, 2000, held), t0 + HB).unwrap();
        assert_eq!(shares_cmd(&c.view_commands("a")), None);
        // New weights: a newer version with the new share.
        c.jobs.get_mut("mixed").unwrap().weights.insert("a".into(), 0.5);
        let (va2, got) = shares_cmd(&c.view_commands("a")).expect("new share");
        assert!(va2 > va);
        assert_eq!(got, share(50 << 20));
        // A restarted node holds none and gets them again.
        c.heartbeat(report("a", 1, 10, fresh), t0 + 2 * HB).unwrap();
        assert_eq!(shares_cmd(&c.view_commands("a")).map(|(v, _)| v), Some(va2));
    }

    #[test]
    fn a_node_holding_a_newer_dead_set_gets_a_newer_version_still() {
        let mut c = Cluster::new(HB, 3);
        let ahead = c.dead_view.0 + 1_000_000;
        let held = Some(AppliedView {
            dead_version: Some(ahead),
            weights_version: None,
            restarts_version: None,
            dram_shares_version: None,
        });
        c.heartbeat(report("a", 1, 1000, held), Instant::now()).unwrap();
        let (v, dead) = dead_cmd(&c.view_commands("a")).expect("an empty dead set, newer");
        assert!(v > ahead && dead.is_empty());
    }
}

#[cfg(test)]
mod owed_tests {
    use super::*;
    use crate::api::AppliedView;
    use dataplane::proto::{BlockId, Location};

    const HB: Duration = Duration::from_secs(1);

    fn report(id: &str, number: u16, uptime_ms: u64) -> NodeReport {
        let mut r =
            super::tests::report(id, uptime_ms, vec![super::tests::core(0, 0, uptime_ms * 1_000_000)]);
        r.node_number = number;
        r.addr = format!("127.0.0.1:{}", 7400 + number);
        r.applied = Some(AppliedView::default());
        r
    }

    fn frees(cmds: &[NodeCommand]) -> Option<Vec<OwedFree>> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::FreeOwners { frees } => Some(frees.clone()),
            _ => None,
        })
    }

    /// Nodes 1 (the job's metadata node), 2 (live, its free failed), 3
    /// (down) and 4 (live, freed): 2 and 3 are owed the free, with their
    /// PERSIST blocks to keep; each gets it on every reply until its report
    /// acknowledges it, and then an empty list once so it stops reporting.
    #[test]
    fn frees_are_owed_to_nodes_away_until_they_acknowledge_them() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        for (id, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            c.heartbeat(report(id, n, 1000), t0).unwrap();
        }
        let t1 = t0 + 4 * HB;
        for (id, n) in [("a", 1), ("b", 2), ("d", 4)] {
            c.heartbeat(report(id, n, 5000), t1).unwrap();
        }
        c.sweep(t1);
        assert_eq!(c.state("c"), Some(NodeState::Down));
        let d = Deregistered {
            job_id: 7,
            meta_node: 1,
            kept: vec![
                Location { node: 3, block: BlockId(33) },
                Location { node: 2, block: BlockId(22) },
                Location { node: 4, block: BlockId(44) },
            ],
            unfreed: vec![(2, "timed out".into())],
        };
        let asked = BTreeSet::from([2, 4]);
        assert_eq!(c.owe_frees("j", &d, &asked), vec![2, 3]);
        assert_eq!(c.owed_frees(), 2);
        assert!(frees(&c.view_commands("a")).is_none() && frees(&c.view_commands("d")).is_none());
        let to_b = frees(&c.view_commands("b")).expect("b is owed");
        assert_eq!(to_b.len(), 1);
        assert_eq!((to_b[0].job_id, to_b[0].meta_node, to_b[0].keep.clone()), (7, 1, vec![22]));
        // Down: nothing is sent. Back: sent on every reply until acknowledged.
        assert!(frees(&c.view_commands("c")).is_none());
        c.heartbeat(report("c", 3, 6000), t1 + HB).unwrap();
        let to_c = frees(&c.view_commands("c")).expect("c is owed");
        assert_eq!(to_c[0].keep, vec![33]);
        assert_eq!(frees(&c.view_commands("c")), Some(to_c.clone()));
        let mut acked = report("c", 3, 7000);
        acked.frees_done = vec![to_c[0].id];
        c.heartbeat(acked.clone(), t1 + 2 * HB).unwrap();
        assert_eq!(c.owed_frees(), 1);
        assert_eq!(frees(&c.view_commands("c")), Some(vec![]), "an empty list clears the node's acks");
        acked.frees_done.clear();
        c.heartbeat(acked, t1 + 3 * HB).unwrap();
        assert!(frees(&c.view_commands("c")).is_none());
        let events = c.events(0, usize::MAX).events;
        assert!(events.iter().any(|e| e.kind == EventKind::OwedFree && e.node.as_deref() == Some("c")));
        // A node stopped for good is owed nothing any more.
        c.forget("b", "stopped".into());
        assert_eq!(c.owed_frees(), 0);
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use crate::api::{AppliedView, Role};

    const HB: Duration = Duration::from_secs(1);

    fn report(id: &str, number: u16, boot: u64, role: Role, applied: AppliedView) -> NodeReport {
        let mut r = super::tests::report(id, 1000, vec![super::tests::core(0, 0, 1_000_000_000)]);
        r.node_number = number;
        r.boot_id = boot;
        r.role = role;
        r.addr = format!("127.0.0.1:{}", 7400 + number);
        r.applied = Some(applied);
        r
    }

    fn restarts(cmds: &[NodeCommand]) -> Option<Vec<(u64, u16)>> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::NodesRestarted { restarts } => Some(restarts.clone()),
            _ => None,
        })
    }

    fn dead(cmds: &[NodeCommand]) -> Option<Vec<u16>> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::SetDeadNodes { dead, .. } => Some(dead.clone()),
            _ => None,
        })
    }

    /// A storage node that reports a new boot id is a restart: both
    /// metadata-capable nodes are told (not the storage-only one, not the
    /// node itself), the node is dead to them until each live one reports
    /// the restart applied, and then it is not.
    #[test]
    fn a_new_boot_id_is_told_to_metadata_nodes_and_holds_the_node_dead_until_applied() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let none = AppliedView::default();
        c.heartbeat(report("m", 1, 11, Role::Metadata, none), t0).unwrap();
        c.heartbeat(report("b", 2, 22, Role::Both, none), t0).unwrap();
        c.heartbeat(report("s", 3, 33, Role::Storage, none), t0).unwrap();
        c.heartbeat(report("s", 3, 33, Role::Storage, none), t0).unwrap();
        assert!(restarts(&c.view_commands("m")).is_none(), "same boot id: no restart");
        c.heartbeat(report("s", 3, 34, Role::Storage, none), t0).unwrap();
        let to_m = restarts(&c.view_commands("m")).expect("m is told");
        assert_eq!(to_m.len(), 1);
        assert_eq!(to_m[0].1, 3);
        assert_eq!(dead(&c.view_commands("m")).unwrap_or_default(), vec![3]);
        assert_eq!(restarts(&c.view_commands("b")), Some(to_m.clone()));
        assert!(restarts(&c.view_commands("s")).is_none(), "a storage-only node holds no namespace");
        let applied = AppliedView { restarts_version: Some(to_m[0].0), ..none };
        c.heartbeat(report("m", 1, 11, Role::Metadata, applied), t0 + HB).unwrap();
        assert!(restarts(&c.view_commands("m")).is_none(), "applied: not sent again");
        assert_eq!(dead(&c.view_commands("m")).unwrap_or_default(), vec![3], "b has not applied it yet");
        c.heartbeat(report("b", 2, 22, Role::Both, applied), t0 + HB).unwrap();
        assert_eq!(
            dead(&c.view_commands("m")).unwrap_or_default(),
            Vec::<u16>::new(),
            "every live metadata node applied it"
        );
        let events = c.events(0, usize::MAX).events;
        assert!(events.iter().any(|e| e.kind == EventKind::NodeRestarted && e.message.contains("boot id")));
    }

    /// A restart seen both ways (a new boot id, counters gone backwards) is
    /// one `node_restarted` event, not two; counters alone still make one.
    #[test]
    fn a_restart_is_one_event() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let none = AppliedView::default();
        c.heartbeat(report("s", 3, 33, Role::Storage, none), t0).unwrap();
        let mut r = report("s", 3, 34, Role::Storage, none);
        r.uptime_ms = 10;
        let t = c.heartbeat(r, t0 + HB).unwrap();
        assert!(t.contains(&Transition::Restarted { node_id: "s".into() }));
        let restarted = |c: &Cluster| {
            c.events(0, usize::MAX).events.iter().filter(|e| e.kind == EventKind::NodeRestarted).count()
        };
        assert_eq!(restarted(&c), 1);
        let mut r = report("s", 3, 34, Role::Storage, none);
        r.uptime_ms = 5;
        c.heartbeat(r, t0 + 2 * HB).unwrap();
        assert_eq!(restarted(&c), 2, "counters backwards, same boot id: one more");
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;
    use crate::api::{AppliedView, JobReport, Role};

    const HB: Duration = Duration::from_secs(1);

    fn report(id: &str, number: u16, uptime_ms: u64) -> NodeReport {
        let mut r =
            super::tests::report(id, uptime_ms, vec![super::tests::core(0, 0, uptime_ms * 1_000_000)]);
        r.node_number = number;
        r.role = Role::Both;
        r.addr = format!("127.0.0.1:{}", 7400 + number);
        r.applied = Some(AppliedView::default());
        r
    }

    fn empty(mut r: NodeReport) -> NodeReport {
        for t in &mut r.tiers {
            (t.used_bytes, t.blocks_used) = (0, 0);
        }
        r
    }

    /// A `both` node holding a live job's namespace is neither drained by
    /// hand, nor a candidate of `scale` or rightsizing, nor stopped as
    /// drained once its blocks are freed.
    #[test]
    fn a_node_holding_a_live_jobs_namespace_is_not_drained() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report("a", 1, 1000), t0).unwrap();
        c.heartbeat(report("b", 2, 1000), t0).unwrap();
        let home = c.plan_job("j", Hints::default()).unwrap().node_id;
        c.commit_job("j").unwrap();
        let other = if home == "a" { "b" } else { "a" };
        let err = c.start_drain(&home, "test", t0).unwrap_err();
        assert!(err.contains("namespace") && err.contains('j'), "{err}");
        assert!(!c.is_draining(&home));
        let all = vec!["a".to_string(), "b".to_string()];
        assert_eq!(c.least_used(&all).as_deref(), Some(other));
        let view = c.scaling_view(&all);
        assert!(!view.iter().find(|n| n.node_id == home).unwrap().provisioned);
        assert!(view.iter().find(|n| n.node_id == other).unwrap().provisioned);

        // A node draining since before a job was adopted there is not
        // stopped once its blocks are freed, while the job lives.
        c.start_drain(other, "test", t0).unwrap();
        let mut r = empty(report(other, if other == "a" { 1 } else { 2 }, 2000));
        r.jobs = vec![JobReport { name: "direct".into(), id: 3, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(r.clone(), t0 + HB).unwrap();
        assert_eq!(c.drained(), Vec::<String>::new(), "it holds job `direct`'s namespace");
        r.jobs.clear();
        c.heartbeat(r, t0 + 2 * HB).unwrap();
        assert_eq!(c.drained(), vec![other.to_string()]);
    }

    /// A node that dies while draining, holding blocks, is forgotten; its
    /// number stays in the dead set (its blocks read data unavailable)
    /// until a node with that number reports again.
    #[test]
    fn a_node_forgotten_after_dying_with_blocks_stays_dead() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report("a", 1, 1000), t0).unwrap();
        c.heartbeat(report("b", 2, 1000), t0).unwrap();
        c.start_drain("b", "test", t0).unwrap();
        let t1 = t0 + 4 * HB;
        c.heartbeat(report("a", 1, 5000), t1).unwrap();
        c.sweep(t1);
        assert_eq!(c.drained(), vec!["b".to_string()], "died while draining");
        c.forget("b", "stopped".into());
        assert_eq!(c.dead_numbers(), vec![2]);
        let dead = c.view_commands("a").into_iter().find_map(|cmd| match cmd {
            NodeCommand::SetDeadNodes { dead, .. } => Some(dead),
            _ => None,
        });
        assert_eq!(dead, Some(vec![2]), "a still marks node 2's blocks unavailable");
        // A node with that number reports: it is live, not dead.
        c.heartbeat(report("b2", 2, 10), t1 + HB).unwrap();
        assert_eq!(c.dead_numbers(), Vec::<u16>::new());
        // A node that died with no block in use is forgotten with its number.
        c.start_drain("b2", "test", t1 + HB).unwrap();
        c.heartbeat(empty(report("b2", 2, 20)), t1 + 2 * HB).unwrap();
        let t2 = t1 + 6 * HB;
        c.heartbeat(report("a", 1, 9000), t2).unwrap();
        c.sweep(t2);
        c.forget("b2", "stopped".into());
        assert_eq!(c.dead_numbers(), Vec::<u16>::new());
    }

    /// Past the node limit, a report from a new node ages out the node down
    /// longest (if down long enough, not draining, holding no namespace),
    /// else it is refused; known nodes keep reporting.
    #[test]
    fn the_node_count_is_capped() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.set_max_nodes(2);
        c.heartbeat(empty(report("a", 1, 1000)), t0).unwrap();
        c.heartbeat(empty(report("b", 2, 1000)), t0).unwrap();
        let e = c.heartbeat(report("c", 3, 1000), t0).unwrap_err();
        assert!(matches!(e, ReportError::TooManyNodes(2)), "{e}");
        assert_eq!(c.node_count(), 2);
        c.heartbeat(empty(report("a", 1, 2000)), t0 + HB).unwrap();
        let grace = c.down_after() * FORGET_DOWN_AFTER;
        let t1 = t0 + grace + 2 * HB;
        c.heartbeat(empty(report("a", 1, 3000)), t1).unwrap();
        c.sweep(t1);
        assert_eq!(c.state("b"), Some(NodeState::Down));
        c.heartbeat(report("c", 3, 1000), t1).unwrap();
        assert_eq!((c.state("b"), c.state("c")), (None, Some(NodeState::Up)), "b aged out for c");
        let events = c.events(0, usize::MAX).events;
        assert!(events.iter().any(|e| e.node.as_deref() == Some("b") && e.message.contains("make room")));
        let e = c.heartbeat(report("d", 4, 1000), t1).unwrap_err();
        assert!(matches!(e, ReportError::TooManyNodes(2)), "a and c are up: {e}");
    }

    /// A provisioned node down for longer than FORGET_DOWN_AFTER
    /// down-intervals is to be forgotten (it stays listed, and holds a
    /// provisioner slot, otherwise); not one within that time, not one the
    /// provisioner did not start, not one holding a job's namespace.
    #[test]
    fn provisioned_nodes_down_for_long_are_to_be_forgotten() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        for (id, n) in [("a", 1), ("b", 2), ("c", 3)] {
            c.heartbeat(report(id, n, 1000), t0).unwrap();
        }
        let mut d = report("d", 4, 1000);
        d.jobs = vec![JobReport { name: "direct".into(), id: 3, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(d, t0).unwrap();
        let provisioned: Vec<String> = ["b", "c", "d"].map(String::from).to_vec();
        let grace = c.down_after() * FORGET_DOWN_AFTER;
        let t1 = t0 + grace - HB;
        c.heartbeat(report("c", 3, 2000), t1).unwrap();
        c.sweep(t1);
        assert_eq!(c.state("b"), Some(NodeState::Down));
        assert_eq!(c.long_down(&provisioned, t1), vec![], "down, but not for long yet");
        let t2 = t0 + grace + HB;
        c.heartbeat(report("a", 1, 3000), t2).unwrap();
        c.heartbeat(report("c", 3, 3000), t2).unwrap();
        c.sweep(t2);
        assert_eq!(c.long_down(&provisioned, t2), vec![("b".to_string(), grace)]);
        // One need not wait that long: a down node can be drained, and is done at once.
        c.start_drain("b", "test", t2).unwrap();
        assert_eq!(c.drained(), vec!["b".to_string()]);
        c.forget("b", "forgotten".into());
        assert_eq!(c.state("b"), None);
        assert_eq!(c.long_down(&provisioned, t2), vec![]);
    }
}

#[cfg(test)]
mod overflow_tests {
    use super::*;
    use crate::api::TierReport;

    const HB: Duration = Duration::from_secs(1);

    /// Hints and reported sizes near u64::MAX: absurd hints are refused,
    /// too large regions too, and sums over jobs and regions saturate
    /// instead of panicking (debug) or wrapping (release).
    #[test]
    fn huge_hints_and_sizes_neither_panic_nor_wrap() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let mut r = super::tests::report("a", 1000, vec![super::tests::core(0, 0, 1_000_000_000)]);
        c.heartbeat(r.clone(), t0).unwrap();
        let huge = Hints { peak_throughput: Some(u64::MAX), ..Hints::default() };
        assert!(matches!(c.plan_job("j", huge), Err(JobError::BadHints(m)) if m.contains("peak_throughput")));
        let huge = Hints { capacity: Some(u64::MAX), ..Hints::default() };
        assert!(matches!(c.plan_job("j", huge), Err(JobError::BadHints(_))));

        // Two jobs that reserve everything (as adopted with the largest
        // allocations) and a node whose regions add up past u64.
        for name in ["x", "y"] {
            c.plan_job(name, Hints::default()).unwrap();
            c.commit_job(name).unwrap();
            let j = c.jobs.get_mut(name).unwrap();
            (j.alloc.throughput, j.alloc.dram, j.alloc.flash) = (u64::MAX, u64::MAX, u64::MAX);
        }
        r.cores[0].bytes_in = u64::MAX;
        r.cores.push(super::tests::core(1, 0, 1_000_000_000));
        r.cores[1].bytes_out = u64::MAX;
        r.tiers = (0..20_000)
            .map(|core| TierReport {
                tier: "dram".into(),
                core,
                capacity_bytes: MAX_REGION_BYTES,
                used_bytes: MAX_REGION_BYTES,
                blocks_used: u64::MAX,
                ..TierReport::default()
            })
            .collect();
        c.heartbeat(r.clone(), t0 + HB).unwrap();
        assert_eq!(c.used_bytes("a"), Some(u64::MAX));
        let view = c.scaling_view(&[]);
        assert_eq!((view[0].dram_cap, view[0].blocks_used), (u64::MAX, u64::MAX));
        let most = Hints { capacity: Some(policy::MAX_HINT_CAPACITY), ..Hints::default() };
        let plan = c.plan_job("z", most).unwrap();
        assert!((1..=MAX_EXTRA_NODES).contains(&plan.extra_nodes), "{}", plan.extra_nodes);

        r.tiers[0].capacity_bytes = MAX_REGION_BYTES + 1;
        assert!(matches!(c.heartbeat(r, t0 + 2 * HB), Err(ReportError::RegionTooLarge(..))));
    }
}

#[cfg(test)]
mod ahead_tests {
    use super::*;
    use crate::api::{AppliedView, JobReport, Role};

    const HB: Duration = Duration::from_secs(1);

    fn report(id: &str, number: u16, boot: u64, applied: AppliedView) -> NodeReport {
        let mut r = super::tests::report(id, 1000, vec![super::tests::core(0, 0, 1_000_000_000)]);
        r.node_number = number;
        r.boot_id = boot;
        r.role = Role::Both;
        r.addr = format!("127.0.0.1:{}", 7400 + number);
        r.applied = Some(applied);
        r
    }

    /// Nodes holding view versions from an earlier controller whose clock
    /// ran ahead: a restart of another node and DRAM shares still reach
    /// them, with versions past the ones they hold.
    #[test]
    fn versions_ahead_of_the_controller_are_passed_for_every_view() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let ahead = c.last_version + 10_000_000;
        let held = AppliedView {
            dead_version: None,
            weights_version: None,
            restarts_version: Some(ahead),
            dram_shares_version: Some(ahead + 5),
        };
        c.heartbeat(report("m", 1, 11, held), t0).unwrap();
        c.heartbeat(report("s", 2, 22, AppliedView::default()), t0).unwrap();
        // s restarts: m is told, and the notice survives m's next report.
        c.heartbeat(report("s", 2, 23, AppliedView::default()), t0 + HB).unwrap();
        c.heartbeat(report("m", 1, 11, held), t0 + HB).unwrap();
        let restarts = c.view_commands("m").into_iter().find_map(|cmd| match cmd {
            NodeCommand::NodesRestarted { restarts } => Some(restarts),
            _ => None,
        });
        let restarts = restarts.expect("m is told of s's restart");
        assert!(restarts.iter().all(|&(v, n)| v > ahead && n == 2), "{restarts:?}");

        // A latency-sensitive job with DRAM and flash, weighted on m: its
        // share goes to m with a version m takes as newer.
        c.plan_job("j", Hints::default()).unwrap();
        c.commit_job("j").unwrap();
        let j = c.jobs.get_mut("j").unwrap();
        (j.alloc.dram, j.alloc.flash, j.alloc.latency_sensitive) = (64 << 20, 64 << 20, true);
        j.weights = BTreeMap::from([("m".to_string(), 1.0)]);
        j.node_id = "m".into();
        let mut r = report("m", 1, 11, held);
        r.jobs = vec![JobReport { name: "j".into(), id: 5, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(r.clone(), t0 + 2 * HB).unwrap();
        let shares = |c: &mut Cluster| {
            c.view_commands("m").into_iter().find_map(|cmd| match cmd {
                NodeCommand::SetDramShares { version, shares } => Some((version, shares)),
                _ => None,
            })
        };
        let (v, got) = shares(&mut c).expect("m's DRAM shares");
        assert!(v > ahead + 5, "version {v} is not past the {} m holds", ahead + 5);
        assert_eq!(got.len(), 1);
        // Applied: nothing more to send.
        r.applied = Some(AppliedView { dram_shares_version: Some(v), ..held });
        c.heartbeat(r, t0 + 3 * HB).unwrap();
        assert_eq!(shares(&mut c), None);
    }
}

#[cfg(test)]
mod polling_tests {
    use super::*;

    const HB: Duration = Duration::from_secs(1);

    fn report(uptime_ms: u64, polling: usize) -> NodeReport {
        let ns = uptime_ms * 1_000_000;
        let mut cores: Vec<_> = (0..4).map(|i| super::tests::core(i, 0, ns)).collect();
        for c in cores.iter_mut().skip(polling) {
            c.polling = false;
        }
        super::tests::report("n", uptime_ms, cores)
    }

    fn wanted(cmds: &[NodeCommand]) -> Option<usize> {
        cmds.iter().find_map(|c| match c {
            NodeCommand::SetPollingCores { cores } => Some(*cores),
            _ => None,
        })
    }

    /// A polling-cores decision is sent on every reply until the node's
    /// report shows it (a lost reply loses nothing), then not again; a
    /// forgotten node's decision goes with it.
    #[test]
    fn polling_cores_are_resent_until_the_report_shows_them() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report(1000, 4), t0).unwrap();
        assert_eq!(c.take_commands("n"), vec![]);
        c.set_polling_cores("n", 2, "test").unwrap();
        assert_eq!(wanted(&c.take_commands("n")), Some(2));
        // That reply was lost: the node still polls 4 cores.
        c.heartbeat(report(2000, 4), t0 + HB).unwrap();
        assert_eq!(wanted(&c.take_commands("n")), Some(2), "sent again");
        assert_eq!(c.scaling_view(&[])[0].cores_active, 2, "counted as applied by the policy");
        c.heartbeat(report(3000, 2), t0 + 2 * HB).unwrap();
        assert_eq!(c.take_commands("n"), vec![]);
        c.heartbeat(report(4000, 2), t0 + 3 * HB).unwrap();
        assert_eq!(c.take_commands("n"), vec![]);
        // Forgetting the node drops what it was to apply.
        c.set_polling_cores("n", 3, "test").unwrap();
        c.forget("n", "stopped".into());
        c.heartbeat(report(10, 4), t0 + 4 * HB).unwrap();
        assert_eq!(c.take_commands("n"), vec![]);
    }
}

#[cfg(test)]
mod small_tests {
    use super::*;
    use crate::api::{AppliedView, JobReport, Role, TierReport};

    const HB: Duration = Duration::from_secs(1);

    fn report(id: &str, number: u16, role: Role) -> NodeReport {
        let mut r = super::tests::report(id, 1000, vec![super::tests::core(0, 0, 1_000_000_000)]);
        r.node_number = number;
        r.role = role;
        r.addr = format!("127.0.0.1:{}", 7400 + number);
        r.applied = Some(AppliedView::default());
        for t in &mut r.tiers {
            (t.used_bytes, t.blocks_used) = (0, 0);
        }
        r.tiers.push(TierReport { tier: "flash".into(), capacity_bytes: 8 << 20, ..TierReport::default() });
        r
    }

    /// A draining node's free DRAM is not offered to a new job.
    #[test]
    fn a_draining_nodes_dram_is_not_offered() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report("a", 1, Role::Both), t0).unwrap();
        c.heartbeat(report("b", 2, Role::Both), t0).unwrap();
        c.start_drain("b", "test", t0).unwrap();
        let hints = Hints { latency_sensitive: Some(true), capacity: Some(4 << 20), ..Hints::default() };
        c.plan_job("j", hints).unwrap();
        let a = &c.job_record("j").unwrap().alloc;
        assert_eq!((a.dram, a.flash), (1 << 20, 3 << 20), "only a's DRAM is free for it");
    }

    /// A job that cannot be adopted (no storage node to pack it on) is held
    /// off rather than tried again on every sweep.
    #[test]
    fn a_failed_adoption_is_held_off() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let mut r = report("m", 1, Role::Metadata);
        r.jobs = vec![JobReport { name: "x".into(), id: 1, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(r, t0).unwrap();
        let now = Instant::now();
        assert_eq!(c.unadopted(now, 16).len(), 1);
        assert!(!c.adopt_job("x", "m", Hints::default()), "nowhere to pack it");
        assert_eq!(c.unadopted(now, 16), vec![], "held off");
    }

    /// An adoption is one `job_registered` event (saying it was adopted).
    #[test]
    fn an_adoption_is_one_event() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        let mut r = report("m", 1, Role::Both);
        r.jobs = vec![JobReport { name: "x".into(), id: 1, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(r, t0).unwrap();
        assert!(c.adopt_job("x", "m", Hints::default()));
        let registered: Vec<String> = c
            .events(0, usize::MAX)
            .events
            .into_iter()
            .filter(|e| e.kind == EventKind::JobRegistered)
            .map(|e| e.message)
            .collect();
        assert_eq!(registered.len(), 1, "{registered:?}");
        assert!(registered[0].contains("adopted"), "{}", registered[0]);
    }

    /// A job deregistered while its metadata node is down is not adopted
    /// when the node comes back still listing it, however late: the
    /// deregistration is owed to the node until it is done.
    #[test]
    fn a_job_deregistered_while_its_node_is_down_is_not_adopted_back() {
        let t0 = Instant::now();
        let mut c = Cluster::new(HB, 3);
        c.heartbeat(report("m", 1, Role::Metadata), t0).unwrap();
        c.heartbeat(report("s", 2, Role::Storage), t0).unwrap();
        c.plan_job("j", Hints::default()).unwrap();
        c.commit_job("j").unwrap();
        assert_eq!(c.job_record("j").unwrap().node_id, "m");
        let t1 = t0 + 10 * HB;
        c.heartbeat(report("s", 2, Role::Storage), t1).unwrap();
        c.sweep(t1);
        assert_eq!(c.state("m"), Some(NodeState::Down));
        // What the DELETE handler does with its node down.
        assert!(c.remove_job("j").is_some());
        c.owe_deregistration("j", "m", "its node is down");
        c.record_deregistered("j", "m", "node m is down");
        assert_eq!(c.deregistrations_due(t1, 16), vec![], "m is down");
        let t2 = t1 + 60 * HB;
        let mut r = report("m", 1, Role::Metadata);
        r.jobs = vec![JobReport { name: "j".into(), id: 1, registered: true, objects: 0, bytes: 0 }];
        c.heartbeat(r, t2).unwrap();
        c.heartbeat(report("s", 2, Role::Storage), t2).unwrap();
        assert_eq!(c.unadopted(t2, 16), vec![], "long past the hold-off, a deregistration is owed");
        assert_eq!(
            c.deregistrations_due(Instant::now(), 16),
            vec![],
            "not in the controller's first interval"
        );
        let due = c.deregistrations_due(t2, 16);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].0.as_str(), due[0].1.as_str(), due[0].2.as_str()), ("j", "m", "127.0.0.1:7401"));
        assert_eq!(due[0].3.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        c.deregistration_failed("j", t2);
        assert_eq!(c.deregistrations_due(t2 + HB, 16), vec![], "a failed call waits a down-interval");
        assert_eq!(c.deregistrations_due(t2 + 4 * HB, 16).len(), 1);
        c.deregistration_done("j", "m", None, &BTreeSet::from([1, 2]));
        assert_eq!(c.deregistrations_due(t2, 16), vec![], "done");
        assert_eq!(c.unadopted(Instant::now(), 16), vec![], "held off while the node's next report comes");
    }

    /// The sweeper declares a silent node down on time while adopting a job
    /// waits on a node that accepts connections but never answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_adoption_does_not_delay_failure_detection() {
        use super::super::{sweep, Controller, ControllerConfig};
        // Connections complete in the listen backlog; nothing ever answers.
        let hang = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let cfg = ControllerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            heartbeat: Duration::from_millis(100),
            missed_heartbeats: 3,
            ..ControllerConfig::default()
        };
        let ctl = Controller::bind(cfg).await.expect("bind controller");
        let shared = ctl.shared.clone();
        let mut m = report("m", 1, Role::Both);
        m.addr = hang.local_addr().expect("addr").to_string();
        m.jobs = vec![JobReport { name: "x".into(), id: 1, registered: true, objects: 0, bytes: 0 }];
        let t0 = Instant::now();
        shared.cluster().heartbeat(m, t0).unwrap();
        shared.cluster().heartbeat(report("d", 2, Role::Both), t0).unwrap();
        let sweeper = tokio::spawn(sweep(shared.clone()));
        let down_by = t0 + Duration::from_secs(2);
        // The state as the sweeper left it (no read that sweeps by itself).
        while shared.cluster().state("d") != Some(NodeState::Down) && Instant::now() < down_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let state = shared.cluster().state("d");
        sweeper.abort();
        assert_eq!(state, Some(NodeState::Down), "declared down within 2 s of its last report (300 ms due)");
    }
}
