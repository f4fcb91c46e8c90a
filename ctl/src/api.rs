//! The controller's HTTP/JSON API: one serde type per request and response
//! body, shared by the controller, `pollenctl` and the tests.
//!
//! Routes (all under `/v1`):
//!
//! | method | path                 | body → reply                          |
//! |--------|----------------------|---------------------------------------|
//! | POST   | `/v1/nodes/heartbeat`| [`NodeReport`] → [`HeartbeatReply`]   |
//! | GET    | `/v1/status`         | → [`StatusResponse`]                  |
//! | GET    | `/v1/nodes`          | → [`NodesResponse`]                   |
//! | GET    | `/v1/nodes/{id}`     | → [`NodeEntry`]                       |
//! | GET    | `/v1/cores`          | → [`CoresResponse`]                   |
//! | GET    | `/v1/tiers`          | → [`TiersResponse`]                   |
//! | GET    | `/v1/jobs`           | → [`JobsResponse`]                    |
//! | POST   | `/v1/jobs`           | [`RegisterJobRequest`] → [`JobEntry`] |
//! | GET    | `/v1/jobs/{name}`    | → [`JobEntry`]                        |
//! | DELETE | `/v1/jobs/{name}`    | → [`DeregisterResponse`]              |
//! | POST   | `/v1/jobs/{name}/token` | → [`JobEntry`] with a fresh token  |
//! | GET    | `/v1/events`         | `?since=SEQ&limit=N` → [`EventsResponse`] |
//! | POST   | `/v1/scale`          | [`ScaleRequest`] → [`ScaleResponse`]  |
//! | POST   | `/v1/nodes/{id}/drain` | → [`ScaleResponse`]                 |
//! | POST   | `/v1/nodes/{id}/cores` | [`SetCoresRequest`] → [`NodeEntry`] |
//! | GET    | `/v1/provisioner`    | → [`crate::provision::ProvisionedNode`] list |
//!
//! Every error is an [`ErrorBody`] with a 4xx/5xx status. Readers ignore
//! fields they do not know, so fields can be added without breaking clients.
//!
//! The last section holds the `--json` output of `pollenctl`'s data commands
//! (put, get, ls, rm), which talk to nodes rather than to the controller.

use serde::{Deserialize, Serialize};

pub use dataplane::node::{NetBackend, PollMode, Role};
pub use dataplane::report::{AppliedView, CoreReport, JobReport, NodeReport, TierReport};

/// A node's liveness as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// A heartbeat arrived within the last `missed_heartbeats` intervals.
    Up,
    /// No heartbeat for `missed_heartbeats` intervals.
    Down,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
        })
    }
}

fn yes() -> bool {
    true
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Reply to `POST /v1/nodes/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub node_id: String,
    /// The interval the controller expects between heartbeats; a node whose
    /// interval is longer is declared down between two of its heartbeats.
    pub heartbeat_ms: u64,
    /// How many silent intervals make the controller declare a node down.
    pub missed_heartbeats: u32,
    /// What the node should do, in order (absent in replies from older controllers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<NodeCommand>,
}

/// A command for a node, carried back on a heartbeat reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeCommand {
    /// Cores `0..cores` poll; the others park as soon as they are idle.
    SetPollingCores { cores: usize },
    /// The storage nodes (by node number) the controller holds dead, as of
    /// `version`; versions only grow (`Node::set_dead_nodes`). Sent to every
    /// live node whose report shows another version.
    SetDeadNodes { version: u64, dead: Vec<u16> },
    /// The weight maps (node number → weight) of every job whose namespace
    /// the node holds, replacing all earlier ones: a job not listed has no
    /// map (`Node::set_job_weights`, `Node::remove_job_weights`). Sent when
    /// the node's report shows another `weights_version`.
    SetJobWeights { version: u64, jobs: std::collections::BTreeMap<String, Vec<(u16, f64)>> },
    /// Blocks of deregistered jobs the node still holds because it was down
    /// or unreachable at the deregistration: free each owner's blocks but
    /// the kept ones (`Node::free_owner`), then list the ids in the next
    /// report's `frees_done`. Sent on every reply until acknowledged.
    FreeOwners { frees: Vec<OwedFree> },
    /// Storage nodes (by number) that restarted with a new boot id, each
    /// with a version, oldest first: a metadata node marks lost every
    /// object naming their blocks of before (`Node::mark_node_lost`) and
    /// reports the newest version it applied (`restarts_version`). Sent to
    /// each metadata-capable node until it reports them.
    NodesRestarted { restarts: Vec<(u64, u16)> },
    /// Every job's DRAM share on this storage node, replacing the earlier
    /// ones (`Node::set_dram_shares`): a latency-sensitive job's DRAM
    /// allocation times the node's weight for it. Sent when the node's
    /// report shows another `dram_shares_version`.
    SetDramShares { version: u64, shares: Vec<dataplane::meta::cluster::DramShare> },
}

/// One deregistered job's blocks a node must still free (`FreeOwners`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwedFree {
    /// Unique per controller (and growing across restarts): the report acknowledges it.
    pub id: u64,
    /// The job's name, for logs and events.
    pub job: String,
    /// The owner of the blocks: the job's id on its metadata node, and that node's number.
    pub job_id: u32,
    pub meta_node: u16,
    /// Block ids of the job's PERSIST objects on this node: not freed.
    #[serde(default)]
    pub keep: Vec<u64>,
}

/// `POST /v1/nodes/{id}/cores`: how many of the node's cores should poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetCoresRequest {
    pub cores: usize,
}

/// One tier summed over a node's cores (or over every live node in
/// [`StatusResponse::tiers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierTotals {
    pub tier: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks_total: u64,
    pub blocks_used: u64,
}

/// A node in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub node_id: String,
    /// The node's main data port, `ip:port`; clients connect here.
    pub addr: String,
    /// What the node serves (storage, metadata or both); `both` from
    /// controllers that predate roles.
    #[serde(default)]
    pub role: Role,
    pub state: NodeState,
    /// The transport the node actually runs (after any fallback).
    pub net: NetBackend,
    pub net_fallback_reason: Option<String>,
    pub poll_mode: PollMode,
    pub block_size: u64,
    pub cores: usize,
    pub tiers: Vec<TierTotals>,
    pub jobs: usize,
    pub node_uptime_ms: u64,
    /// Milliseconds since the controller received the node's last heartbeat.
    pub last_heartbeat_ms_ago: u64,
}

/// `GET /v1/status`: the cluster at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The controller's version (`pollen-ctl` crate version).
    pub version: String,
    pub uptime_ms: u64,
    pub heartbeat_ms: u64,
    pub missed_heartbeats: u32,
    pub nodes_up: usize,
    pub nodes_down: usize,
    /// Sorted by node id.
    pub nodes: Vec<NodeSummary>,
    /// Capacity and use per tier over the nodes that are up.
    pub tiers: Vec<TierTotals>,
    /// Distinct registered job names over all known nodes.
    pub jobs: usize,
    /// Frees of deregistered jobs' blocks owed to nodes that were away
    /// (sent when they report again).
    #[serde(default)]
    pub owed_frees: usize,
}

/// A node's latest report and what the controller knows about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub state: NodeState,
    /// Being drained: takes no new data, stopped once its blocks are freed.
    #[serde(default)]
    pub draining: bool,
    pub last_heartbeat_ms_ago: u64,
    /// Heartbeats received from this node since the controller started.
    pub heartbeats: u64,
    pub report: NodeReport,
}

/// `GET /v1/nodes`, sorted by node id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodesResponse {
    pub nodes: Vec<NodeEntry>,
}

/// One polling core in `GET /v1/cores`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreRow {
    pub node_id: String,
    pub node_state: NodeState,
    pub core: usize,
    /// The CPU the core is pinned to, if pinned.
    pub cpu: Option<usize>,
    pub port: u16,
    /// The network backend the node's cores run on.
    pub net: NetBackend,
    pub poll_mode: PollMode,
    /// Fraction of time the core spent working (0.0 ..= 1.0) between the
    /// node's last two heartbeats; for the first heartbeat, since the node
    /// started. `None` when no time was accounted on a running core between
    /// them; a core parked throughout counts as 0.0.
    pub busy: Option<f64>,
    pub parked: bool,
    /// Polling, or turned off by the controller (parks as soon as idle).
    #[serde(default = "yes")]
    pub polling: bool,
    /// Takes new connections on the node's shared port (a core turned off
    /// does not).
    #[serde(default = "yes")]
    pub accepting: bool,
    /// Connections the core accepted since the node started.
    pub connections: u64,
    pub requests: u64,
    pub forwarded: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// `GET /v1/cores`, sorted by node id then core.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoresResponse {
    pub cores: Vec<CoreRow>,
}

/// One tier region of one core in `GET /v1/tiers`: the node's own report of
/// it, flattened beside the node's id and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierRow {
    pub node_id: String,
    pub node_state: NodeState,
    #[serde(flatten)]
    pub region: dataplane::report::TierReport,
}

/// `GET /v1/tiers`, sorted by node id, tier, core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TiersResponse {
    pub tiers: Vec<TierRow>,
}

/// One job on one node in `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRow {
    pub node_id: String,
    pub node_state: NodeState,
    pub name: String,
    pub id: u32,
    /// False for a deregistered job that still holds PERSIST objects.
    pub registered: bool,
    pub objects: u64,
    pub bytes: u64,
}

/// `GET /v1/jobs`: what the nodes report (sorted by job name then node id)
/// and the jobs registered through the controller (sorted by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsResponse {
    pub jobs: Vec<JobRow>,
    #[serde(default)]
    pub registered: Vec<JobEntry>,
}

/// `POST /v1/jobs`: a job's name and Pocket's hints, every hint optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterJobRequest {
    pub name: String,
    #[serde(default)]
    pub hints: Hints,
}

pub use crate::controller::policy::{Allocation, Hints};

/// A job as the controller knows it (`GET /v1/jobs/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    pub name: String,
    /// The node that holds the job's namespace (its metadata), chosen by load.
    pub node_id: String,
    /// That node's data address, `ip:port`; empty when the node is unknown.
    pub node_addr: String,
    pub node_state: Option<NodeState>,
    /// False for a job the controller did not register (it learnt of it
    /// from a node's report): no hints, allocation or weights.
    pub managed: bool,
    pub hints: Hints,
    pub allocation: Option<Allocation>,
    /// Node id → weight in [0, 1]; sums to 1 over live nodes.
    pub weights: std::collections::BTreeMap<String, f64>,
    /// The live nodes could not hold the allocation: it is spread over them anyway.
    pub overcommitted: bool,
    pub registered_unix_ms: u64,
    /// Node number → data address of every live node, for clients that read
    /// blocks on nodes other than the job's (`Client::set_node_addrs`).
    #[serde(default)]
    pub node_addrs: std::collections::BTreeMap<u16, String>,
    /// The job's metadata node holds its current weight map (by node number,
    /// pushed on heartbeat replies), so `Place` draws by `weights`; false
    /// until the node's next heartbeat after a change.
    #[serde(default)]
    pub weights_applied: bool,
    /// A capability token for the job's data (read and write), when the
    /// cluster has a secret: in the reply to a registration and to
    /// `POST /v1/jobs/{name}/token` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When the token expires, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiry_unix: Option<u64>,
}

impl JobEntry {
    /// `node_addrs` as socket addresses, for `Client::set_node_addrs` (an
    /// address that does not parse is left out: its blocks cannot be reached).
    pub fn node_socket_addrs(&self) -> Vec<(u16, std::net::SocketAddr)> {
        self.node_addrs.iter().filter_map(|(n, a)| a.parse().ok().map(|a| (*n, a))).collect()
    }
}

/// `DELETE /v1/jobs/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterResponse {
    pub name: String,
    pub node_id: String,
    /// The node freed the job's blocks (all but PERSIST objects).
    pub freed: bool,
    /// Why the node did not free them, when it did not.
    pub note: Option<String>,
    /// Numbers of the nodes that were down or unreachable and still hold
    /// the job's blocks: the controller has them freed when they report
    /// again (an `owed_free` event says when).
    #[serde(default)]
    pub owed: Vec<u16>,
}

/// `POST /v1/scale`: the number of live storage nodes wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub nodes: usize,
}

/// Reply to `POST /v1/scale` and `POST /v1/nodes/{id}/drain`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScaleResponse {
    /// Nodes started, each up (heartbeat received) when the reply is sent.
    pub started: Vec<String>,
    /// Nodes now draining; each stops once its blocks are freed.
    pub draining: Vec<String>,
    /// Live nodes taking new data after this call.
    pub open_nodes: usize,
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    NodeJoined,
    NodeDown,
    NodeRecovered,
    NodeRestarted,
    JobRegistered,
    Allocation,
    Weights,
    JobDeregistered,
    Scale,
    Drain,
    Cores,
    /// A free owed to a node away at a deregistration: recorded, then done.
    OwedFree,
    Error,
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// One entry of the controller's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event, from 1.
    pub seq: u64,
    pub unix_ms: u64,
    pub kind: EventKind,
    pub node: Option<String>,
    pub job: Option<String>,
    pub message: String,
}

/// `GET /v1/events`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsResponse {
    /// The newest sequence number recorded (0 when none).
    pub last_seq: u64,
    /// The oldest events after `since`, at most `limit` (1000 by default).
    pub events: Vec<Event>,
    /// More events follow the last one listed: ask again with `since` its `seq`.
    #[serde(default)]
    pub more: bool,
}

// ---- pollenctl --json output of the data commands -------------------------

/// `pollenctl put --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PutOutput {
    pub job: String,
    pub name: String,
    pub bytes: u64,
    /// The node that stored the object (`ip:port`).
    pub node: String,
    /// True when `put` registered the job first.
    pub registered_job: bool,
    pub persist: bool,
    pub delete_after_read: bool,
    pub elapsed_ms: f64,
}

/// `pollenctl get --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetOutput {
    pub job: String,
    pub name: String,
    pub bytes: u64,
    pub node: String,
    /// Where the object was written (`-` for standard output).
    pub file: String,
    pub elapsed_ms: f64,
}

/// One entry of `pollenctl ls --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub persist: bool,
    pub delete_after_read: bool,
}

/// `pollenctl ls --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsOutput {
    pub job: String,
    /// The listed directory, relative to the job root (`""` = the root).
    pub dir: String,
    pub node: String,
    pub entries: Vec<LsEntry>,
}

/// `pollenctl rm --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmOutput {
    pub job: String,
    pub name: String,
    pub node: String,
}
