//! What a node tells the controller about itself (heartbeat body).

use serde::{Deserialize, Serialize};

use crate::node::{NetBackend, PollMode, Role};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: String,
    /// The node's number in block locations (`NodeInfo::node_number`);
    /// 0 in reports from nodes that predate it.
    #[serde(default)]
    pub node_number: u16,
    /// Random per start of the node (`Node::boot_id`): another one than
    /// before means the node restarted and lost its DRAM blocks. 0 in
    /// reports from nodes that predate it.
    #[serde(default)]
    pub boot_id: u64,
    /// What the node serves; `both` in reports from nodes that predate roles.
    #[serde(default)]
    pub role: Role,
    /// Main data address, `ip:port`.
    pub addr: String,
    /// The backend actually running.
    pub net: NetBackend,
    /// Why the requested backend is not the one running, if it is not.
    pub net_fallback_reason: Option<String>,
    pub poll_mode: PollMode,
    pub block_size: u64,
    pub uptime_ms: u64,
    pub cores: Vec<CoreReport>,
    pub tiers: Vec<TierReport>,
    pub jobs: Vec<JobReport>,
    /// What the node holds of the cluster view the controller pushes on
    /// heartbeat replies; the controller sends again what it lacks (after a
    /// restart, or a lost reply). `None` from nodes that do not apply it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<AppliedView>,
    /// Ids of the owed frees (`FreeOwners` commands on heartbeat replies)
    /// the node has applied, so the controller stops sending them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frees_done: Vec<u64>,
}

/// The versions of the cluster view a node applied (`NodeReport::applied`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedView {
    /// Version of the dead-node set (`Node::set_dead_nodes`); `None` before the first.
    pub dead_version: Option<u64>,
    /// Version of the weight maps of the jobs whose namespace the node
    /// holds (`Node::set_job_weights`); `None` before the first.
    pub weights_version: Option<u64>,
    /// The newest restart of another node (`NodesRestarted`) whose blocks
    /// the node marked lost; `None` before the first.
    #[serde(default)]
    pub restarts_version: Option<u64>,
    /// Version of the jobs' DRAM shares on this node (`Node::set_dram_shares`);
    /// `None` before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dram_shares_version: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoreReport {
    pub core: usize,
    /// The CPU the core is pinned to; `None` when it runs unpinned (not
    /// requested, or the pin failed).
    pub cpu: Option<usize>,
    pub port: u16,
    /// Cumulative nanoseconds spent in passes that did work; the busy fraction
    /// over an interval is Δbusy_ns / Δtotal_ns.
    pub busy_ns: u64,
    /// Wall-clock nanoseconds since the node started (advances while parked).
    pub total_ns: u64,
    pub connections: u64,
    pub requests: u64,
    pub forwarded: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub parked: bool,
    /// Whether the core polls; the controller turns cores off (they park as
    /// soon as they are idle) and on. Reports that predate it: on.
    #[serde(default = "polling_default")]
    pub polling: bool,
    /// Whether the core takes new connections on the node's shared port: a
    /// core turned off leaves the port's `SO_REUSEPORT` group (epoll and
    /// io_uring), or drops its listeners there and has new flows steered to
    /// cores that are on (DPDK). Reports that predate it: on.
    #[serde(default = "polling_default")]
    pub accepting: bool,
}

fn polling_default() -> bool {
    true
}

/// One tier's region on one core. The fields after `huge_pages` describe
/// flash and disk tiers; they default (for DRAM, and in reports from nodes
/// that predate them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierReport {
    pub tier: String,
    pub core: usize,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks_total: u64,
    pub blocks_used: u64,
    pub huge_pages: bool,
    /// The file or device backing the tier.
    #[serde(default)]
    pub path: Option<String>,
    /// How the tier's ring runs: interrupt, sqpoll, iopoll or sqpoll+iopoll;
    /// ", shared ring" when it is the core's network ring; " (sqpoll
    /// refused: WHY)" when the kernel refused polling that was asked for.
    #[serde(default)]
    pub mode: Option<String>,
    /// Operations and bytes completed per second, over the last second
    /// before the report was made.
    #[serde(default)]
    pub read_iops: u64,
    #[serde(default)]
    pub write_iops: u64,
    #[serde(default)]
    pub read_bytes_per_sec: u64,
    #[serde(default)]
    pub write_bytes_per_sec: u64,
    /// I/O errors since the node started.
    #[serde(default)]
    pub io_errors: u64,
    /// Operations in the tier's ring (data and header sectors); registered
    /// buffers in use (by requests, read data being sent, write bodies being
    /// received); and buffers reserved for write bodies being received. All
    /// 0 when the tier is idle.
    #[serde(default)]
    pub in_flight: u64,
    #[serde(default)]
    pub buffers_in_use: u64,
    #[serde(default)]
    pub writes_reserved: u64,
    /// Writes whose body streamed into a registered buffer as it arrived;
    /// times a write that could stream found no buffer or queue slot free
    /// (it gathers meanwhile, and tries again as more of it arrives); and
    /// streamed bodies whose connection closed before they were complete
    /// (docs/protocol.md, "Streamed writes"); and streamed bodies that
    /// stopped arriving and were gathered from then on.
    #[serde(default)]
    pub streamed_writes: u64,
    #[serde(default)]
    pub stream_fallbacks: u64,
    #[serde(default)]
    pub streams_abandoned: u64,
    #[serde(default)]
    pub streams_demoted: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobReport {
    pub name: String,
    pub id: u32,
    pub registered: bool,
    pub objects: u64,
    pub bytes: u64,
}
