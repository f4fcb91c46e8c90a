//! Rightsizing: keep each resource — the busy fraction of polling cores,
//! network throughput, capacity per tier — inside a target band. Above it:
//! turn on a polling core on the busiest node (vertical), else add a node
//! (horizontal). Below it: turn a core off, else drain the least-used node.
//!
//! [`decide`] is a pure function of the cluster view, so the policy is
//! unit-tested here; the controller runs it every `interval_ms` and records
//! each decision as an event.

use serde::Deserialize;

/// A target utilisation band, fractions of capacity.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    pub low: f64,
    pub high: f64,
}

impl Default for Band {
    fn default() -> Self {
        Band { low: 0.6, high: 0.8 }
    }
}

/// The `[scaling]` table of the policy file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingTable {
    /// Run the rightsizing policy at all.
    pub enabled: bool,
    /// How often the policy looks at the cluster.
    pub interval_ms: u64,
    /// After an action, no other for this long (new figures must arrive).
    pub cooldown_ms: u64,
    /// Nodes the policy never drains below [default: the nodes `pollen up
    /// --nodes N` started, else 1].
    pub min_nodes: Option<usize>,
    /// Mean busy fraction of the polling cores.
    pub cores: Band,
    /// Network bytes/s over the polling cores' throughput (`core_throughput` each).
    pub network: Band,
    /// Used over capacity, per tier.
    pub capacity: Band,
}

impl Default for ScalingTable {
    fn default() -> Self {
        ScalingTable {
            enabled: true,
            interval_ms: 5000,
            cooldown_ms: 10_000,
            min_nodes: None,
            cores: Band::default(),
            network: Band::default(),
            capacity: Band::default(),
        }
    }
}

impl ScalingTable {
    pub fn validate(&self) -> Result<(), String> {
        for (name, b) in [("cores", self.cores), ("network", self.network), ("capacity", self.capacity)] {
            if !(b.low.is_finite() && b.high.is_finite() && 0.0 <= b.low && b.low < b.high && b.high <= 1.0) {
                return Err(format!(
                    "scaling.{name}: need 0 <= low < high <= 1, got {} and {}",
                    b.low, b.high
                ));
            }
        }
        if self.interval_ms == 0 {
            return Err("scaling.interval_ms must be positive".into());
        }
        if self.min_nodes == Some(0) {
            return Err("scaling.min_nodes must be at least 1".into());
        }
        Ok(())
    }
}

/// One live node as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub node_id: String,
    pub draining: bool,
    /// Started by the provisioner (so it can be drained and stopped).
    pub provisioned: bool,
    pub cores_total: usize,
    /// Polling cores (including a change queued for the node).
    pub cores_active: usize,
    /// Mean busy fraction of the polling cores since the last heartbeat.
    pub busy: f64,
    /// Network bytes/s, in + out.
    pub net_rate: f64,
    pub dram_used: u64,
    pub dram_cap: u64,
    pub flash_used: u64,
    pub flash_cap: u64,
    pub blocks_used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SetCores { node_id: String, cores: usize },
    AddNode,
    Drain { node_id: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    /// Which resource, its utilisation and the band, for the event.
    pub reason: String,
}

/// What [`decide`] needs besides the nodes.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub table: &'a ScalingTable,
    /// Bytes/s one polling core serves (the allocation table's `core_throughput`).
    pub core_throughput: u64,
    pub min_nodes: usize,
    /// The provisioner can start another node.
    pub can_add: bool,
}

/// Utilisation of the open (not draining) nodes, with `drop` left out and
/// `core_delta` polling cores added (to project a change).
#[derive(Debug, Clone, Copy)]
struct Usage {
    cores: f64,
    network: f64,
    dram: Option<f64>,
    flash: Option<f64>,
}

fn usage(nodes: &[&NodeView], core_throughput: u64, core_delta: i64) -> Usage {
    let active: i64 = nodes.iter().map(|n| n.cores_active as i64).sum::<i64>() + core_delta;
    let active = active.max(1) as f64;
    let busy_cores: f64 = nodes.iter().map(|n| n.busy * n.cores_active as f64).sum();
    let net: f64 = nodes.iter().map(|n| n.net_rate).sum();
    // Summed as floats: reported sizes may add up past u64.
    let total = |f: fn(&NodeView) -> u64| nodes.iter().map(|n| f(n) as f64).sum::<f64>();
    let ratio = |used: f64, cap: f64| (cap > 0.0).then(|| used / cap);
    Usage {
        cores: busy_cores / active,
        network: net / (active * core_throughput.max(1) as f64),
        dram: ratio(total(|n| n.dram_used), total(|n| n.dram_cap)),
        flash: ratio(total(|n| n.flash_used), total(|n| n.flash_cap)),
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// One decision for the cluster as it is, or `None` when every resource is
/// in its band (or nothing can be done).
pub fn decide(nodes: &[NodeView], lim: Limits<'_>) -> Option<Decision> {
    let t = lim.table;
    let open: Vec<&NodeView> = nodes.iter().filter(|n| !n.draining).collect();
    if open.is_empty() {
        return None;
    }
    let u = usage(&open, lim.core_throughput, 0);

    // Above the band: compute first (cores, then network), then capacity.
    let hot = if u.cores > t.cores.high {
        Some(format!("cores {} busy > {}", pct(u.cores), pct(t.cores.high)))
    } else if u.network > t.network.high {
        Some(format!("network {} > {}", pct(u.network), pct(t.network.high)))
    } else {
        None
    };
    if let Some(why) = hot {
        let busiest = open.iter().filter(|n| n.cores_active < n.cores_total).max_by(|a, b| {
            (a.busy, a.net_rate).partial_cmp(&(b.busy, b.net_rate)).unwrap_or(std::cmp::Ordering::Equal)
        });
        if let Some(n) = busiest {
            return Some(Decision {
                action: Action::SetCores { node_id: n.node_id.clone(), cores: n.cores_active + 1 },
                reason: format!("{why}: one more polling core on the busiest node"),
            });
        }
        if lim.can_add {
            return Some(Decision {
                action: Action::AddNode,
                reason: format!("{why}, every core polls: add a node"),
            });
        }
        return None;
    }
    for (tier, used) in [("dram", u.dram), ("flash", u.flash)] {
        if let Some(x) = used.filter(|&x| x > t.capacity.high) {
            return lim.can_add.then(|| Decision {
                action: Action::AddNode,
                reason: format!("{tier} {} used > {}: add a node", pct(x), pct(t.capacity.high)),
            });
        }
    }

    // Below the band: only when compute and network are both under it.
    if u.cores >= t.cores.low || u.network >= t.network.low {
        return None;
    }
    let why = format!(
        "cores {} busy < {} and network {} < {}",
        pct(u.cores),
        pct(t.cores.low),
        pct(u.network),
        pct(t.network.low)
    );
    // A change must not push the figures above the band (no flapping).
    let fits = |x: Usage| {
        x.cores <= t.cores.high
            && x.network <= t.network.high
            && x.dram.is_none_or(|d| d <= t.capacity.high)
            && x.flash.is_none_or(|f| f <= t.capacity.high)
    };
    let idlest = open.iter().filter(|n| n.cores_active > 1).min_by(|a, b| {
        (a.busy, a.net_rate).partial_cmp(&(b.busy, b.net_rate)).unwrap_or(std::cmp::Ordering::Equal)
    });
    if let Some(n) = idlest {
        if fits(usage(&open, lim.core_throughput, -1)) {
            return Some(Decision {
                action: Action::SetCores { node_id: n.node_id.clone(), cores: n.cores_active - 1 },
                reason: format!("{why}: one polling core off on the idlest node"),
            });
        }
    }
    if open.len() <= lim.min_nodes {
        return None;
    }
    let least_used = open.iter().filter(|n| n.provisioned).min_by(|a, b| {
        (a.blocks_used, a.net_rate, &a.node_id)
            .partial_cmp(&(b.blocks_used, b.net_rate, &b.node_id))
            .unwrap_or(std::cmp::Ordering::Equal)
    })?;
    let rest: Vec<&NodeView> = open.iter().copied().filter(|n| n.node_id != least_used.node_id).collect();
    // Its data stays where it is until freed, so its capacity still counts.
    let mut after = usage(&rest, lim.core_throughput, 0);
    after.dram = u.dram;
    after.flash = u.flash;
    // The busy work and traffic of the drained node move to the others.
    let moved_busy = least_used.busy * least_used.cores_active as f64;
    let rest_cores: f64 = rest.iter().map(|n| n.cores_active as f64).sum::<f64>().max(1.0);
    after.cores += moved_busy / rest_cores;
    after.network += least_used.net_rate / (rest_cores * lim.core_throughput.max(1) as f64);
    if !fits(after) {
        return None;
    }
    Some(Decision {
        action: Action::Drain { node_id: least_used.node_id.clone() },
        reason: format!("{why}, one polling core per node: drain the least-used node"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cores: (usize, usize), busy: f64, net: f64, blocks: u64) -> NodeView {
        NodeView {
            node_id: id.into(),
            provisioned: true,
            cores_active: cores.0,
            cores_total: cores.1,
            busy,
            net_rate: net,
            dram_used: blocks * 65536,
            dram_cap: 1 << 30,
            blocks_used: blocks,
            ..NodeView::default()
        }
    }

    fn lim(t: &ScalingTable, can_add: bool) -> Limits<'_> {
        Limits { table: t, core_throughput: 1000, min_nodes: 1, can_add }
    }

    #[test]
    fn busy_cores_turn_on_a_core_then_add_a_node() {
        let t = ScalingTable::default();
        let nodes = [node("a", (1, 2), 0.9, 0.0, 0), node("b", (1, 1), 0.95, 0.0, 0)];
        let d = decide(&nodes, lim(&t, true)).unwrap();
        assert_eq!(d.action, Action::SetCores { node_id: "a".into(), cores: 2 }, "vertical first");
        assert!(d.reason.contains("cores 92% busy > 80%"), "{}", d.reason);
        let nodes = [node("a", (2, 2), 0.9, 0.0, 0), node("b", (1, 1), 0.95, 0.0, 0)];
        assert_eq!(decide(&nodes, lim(&t, true)).unwrap().action, Action::AddNode);
        assert_eq!(decide(&nodes, lim(&t, false)), None, "at the provisioner's limit");
    }

    #[test]
    fn network_and_capacity_above_the_band() {
        let t = ScalingTable::default();
        // 900 B/s over one core of 1000 B/s: 90%.
        let nodes = [node("a", (1, 2), 0.1, 900.0, 0)];
        assert_eq!(
            decide(&nodes, lim(&t, true)).unwrap().action,
            Action::SetCores { node_id: "a".into(), cores: 2 }
        );
        let mut full = node("a", (1, 1), 0.7, 0.0, 0);
        full.dram_used = 900;
        full.dram_cap = 1000;
        let d = decide(&[full], lim(&t, true)).unwrap();
        assert_eq!(d.action, Action::AddNode);
        assert!(d.reason.starts_with("dram 90% used"), "{}", d.reason);
    }

    #[test]
    fn idle_turns_cores_off_then_drains_the_least_used_node() {
        let t = ScalingTable::default();
        let nodes = [node("a", (2, 2), 0.0, 0.0, 5), node("b", (1, 2), 0.1, 0.0, 1)];
        assert_eq!(
            decide(&nodes, lim(&t, true)).unwrap().action,
            Action::SetCores { node_id: "a".into(), cores: 1 }
        );
        let nodes = [node("a", (1, 2), 0.0, 0.0, 5), node("b", (1, 2), 0.1, 0.0, 1)];
        let d = decide(&nodes, lim(&t, true)).unwrap();
        assert_eq!(d.action, Action::Drain { node_id: "b".into() }, "fewest blocks");
        // Never below min_nodes, never a node the provisioner did not start.
        let mut l = lim(&t, true);
        l.min_nodes = 2;
        assert_eq!(decide(&nodes, l), None);
        let mut mine = nodes.clone();
        mine[1].provisioned = false;
        assert_eq!(decide(&mine, lim(&t, true)).unwrap().action, Action::Drain { node_id: "a".into() });
    }

    #[test]
    fn in_the_band_or_would_flap_does_nothing() {
        let t = ScalingTable::default();
        assert_eq!(decide(&[node("a", (2, 2), 0.7, 0.0, 0)], lim(&t, true)), None, "in the band");
        // 50% busy on each of two nodes: below the band, but one node alone
        // would be at 100%: no drain.
        let nodes = [node("a", (1, 1), 0.5, 0.0, 0), node("b", (1, 1), 0.5, 0.0, 0)];
        assert_eq!(decide(&nodes, lim(&t, true)), None);
        // Draining nodes are not counted.
        let mut nodes = [node("a", (1, 1), 0.0, 0.0, 0), node("b", (1, 1), 0.0, 0.0, 0)];
        nodes[0].draining = true;
        assert_eq!(decide(&nodes, lim(&t, true)), None, "one open node is the minimum");
    }

    #[test]
    fn sizes_summing_past_u64_do_not_overflow() {
        let t = ScalingTable::default();
        let mut full = node("a", (1, 1), 0.7, 0.0, 0);
        (full.dram_used, full.dram_cap, full.blocks_used) = (u64::MAX, u64::MAX, u64::MAX);
        let d = decide(&[full.clone(), full], lim(&t, true)).unwrap();
        assert_eq!(d.action, Action::AddNode, "100% of the DRAM used");
    }

    #[test]
    fn bands_are_checked() {
        let mut t = ScalingTable::default();
        assert!(t.validate().is_ok());
        t.cores = Band { low: 0.8, high: 0.6 };
        assert!(t.validate().is_err());
    }
}
