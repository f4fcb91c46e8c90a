//! The controller's policy: how a job's hints become an allocation
//! (Pocket's mapping), and how an allocation is bin-packed onto nodes as a
//! weight map. Both are pure functions of their inputs, so every rule is
//! unit-tested here; the constants come from a TOML table
//! (`pollen controller --policy FILE`), documented in `docs/control-plane.md`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::de_size_req;

/// Weights below this are treated as zero (float noise of the packing).
const EPS: f64 = 1e-9;

/// The whole policy file. Every key is optional; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub allocation: AllocTable,
    pub scaling: super::rightsize::ScalingTable,
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Policy::parse(&text).map_err(|e| format!("policy file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Policy, String> {
        let p: Policy = toml::from_str(text).map_err(|e| e.message().trim_end().to_string())?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), String> {
        let a = &self.allocation;
        if a.per_worker_throughput == 0 {
            return Err("allocation.per_worker_throughput must be positive".into());
        }
        if a.default_workers == 0 {
            return Err("allocation.default_workers must be positive".into());
        }
        if a.default_capacity == 0 {
            return Err("allocation.default_capacity must be positive".into());
        }
        if a.core_throughput == 0 {
            return Err("allocation.core_throughput must be positive".into());
        }
        self.scaling.validate()
    }
}

/// The constants of Pocket's hint mapping. Sizes and rates take a number of
/// bytes or a string with a unit (`"75MB"`, `"1GiB"`); rates are per second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocTable {
    /// Throughput one concurrent worker (lambda) is assumed to drive, bytes/s.
    /// Pocket measured about 600 Mb/s per AWS Lambda: 75 MB/s.
    #[serde(deserialize_with = "de_size_req")]
    pub per_worker_throughput: u64,
    /// Workers assumed when a job gives neither a worker count nor a peak
    /// throughput: the conservative default over-provisions.
    pub default_workers: u32,
    /// Capacity assumed when a job gives no capacity hint.
    #[serde(deserialize_with = "de_size_req")]
    pub default_capacity: u64,
    /// Throughput one polling core of a node is assumed to serve, bytes/s;
    /// a node's throughput capacity is this times its cores.
    #[serde(deserialize_with = "de_size_req")]
    pub core_throughput: u64,
}

impl Default for AllocTable {
    fn default() -> Self {
        AllocTable {
            per_worker_throughput: 75_000_000,
            default_workers: 32,
            default_capacity: 1 << 30,
            core_throughput: 1_250_000_000,
        }
    }
}

/// A job's hints as the controller API takes them; every field optional.
/// No field at all is Pocket's "no hints" case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_sensitive: Option<bool>,
    /// Maximum concurrent workers (lambdas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambdas: Option<u32>,
    /// Total capacity, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Peak throughput, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_throughput: Option<u64>,
}

/// Largest hints a job may give: beyond these, sums over jobs would lose
/// meaning (and no cluster holds them).
pub const MAX_HINT_CAPACITY: u64 = 1 << 60;
pub const MAX_HINT_THROUGHPUT: u64 = 1 << 50;
pub const MAX_HINT_LAMBDAS: u32 = 1 << 20;

impl Hints {
    /// Refuses absurd hints, saying which and the limit.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = self.capacity.filter(|&c| c > MAX_HINT_CAPACITY) {
            return Err(format!("capacity {c} is over the limit of {MAX_HINT_CAPACITY} bytes"));
        }
        if let Some(t) = self.peak_throughput.filter(|&t| t > MAX_HINT_THROUGHPUT) {
            return Err(format!("peak_throughput {t} is over the limit of {MAX_HINT_THROUGHPUT} bytes/s"));
        }
        if let Some(n) = self.lambdas.filter(|&n| n > MAX_HINT_LAMBDAS) {
            return Err(format!("lambdas {n} is over the limit of {MAX_HINT_LAMBDAS}"));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self == &Hints::default()
    }

    /// Zero values carry no information: treated as absent.
    pub fn normalized(mut self) -> Hints {
        self.lambdas = self.lambdas.filter(|&n| n > 0);
        self.capacity = self.capacity.filter(|&n| n > 0);
        self.peak_throughput = self.peak_throughput.filter(|&n| n > 0);
        self
    }
}

/// What the cluster's tiers can offer a new job, summed over live nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierRoom {
    /// DRAM not yet reserved by other jobs.
    pub dram_free: u64,
    /// Whether any live node has a flash tier.
    pub has_flash: bool,
}

/// A job's resource allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Bytes/s the job is expected to drive at peak.
    pub throughput: u64,
    /// Total bytes, `dram + flash`.
    pub capacity: u64,
    pub dram: u64,
    pub flash: u64,
    /// Whether the tier choice treated the job as latency-sensitive.
    pub latency_sensitive: bool,
    /// Which rule set each figure, for operators (e.g. "throughput: 8 lambdas x 75 MB/s").
    pub basis: Vec<String>,
}

/// Pocket's mapping from hints to throughput, capacity and tier mix.
///
/// - throughput: the peak-throughput hint; else lambdas × per-worker
///   throughput; else default workers × per-worker throughput.
/// - capacity: the capacity hint; else the default capacity.
/// - tiers: a latency-sensitive job (and a job with no hints at all, the
///   conservative default) gets DRAM up to what the cluster has free and the
///   rest on flash; when no node has flash, all of it is DRAM. Any other job
///   goes to flash when a node has it, else to DRAM.
pub fn allocate(hints: &Hints, table: &AllocTable, room: TierRoom) -> Allocation {
    let mut basis = Vec::new();
    let throughput = match (hints.peak_throughput, hints.lambdas) {
        (Some(t), _) => {
            basis.push("throughput: the peak-throughput hint".to_string());
            t
        }
        (None, Some(n)) => {
            basis.push(format!("throughput: {n} lambdas x {} B/s per lambda", table.per_worker_throughput));
            table.per_worker_throughput.saturating_mul(n as u64)
        }
        (None, None) => {
            basis.push(format!(
                "throughput: default {} workers x {} B/s per worker",
                table.default_workers, table.per_worker_throughput
            ));
            table.per_worker_throughput.saturating_mul(table.default_workers as u64)
        }
    };
    let capacity = match hints.capacity {
        Some(c) => {
            basis.push("capacity: the capacity hint".to_string());
            c
        }
        None => {
            basis.push(format!("capacity: default {} bytes", table.default_capacity));
            table.default_capacity
        }
    };
    let latency_sensitive = match hints.latency_sensitive {
        Some(ls) => ls,
        // No hints at all: the conservative default places on DRAM.
        None => hints.is_empty(),
    };
    let (dram, flash) = if latency_sensitive {
        if room.has_flash {
            let dram = capacity.min(room.dram_free);
            basis.push("tiers: latency-sensitive, DRAM first, the rest on flash".to_string());
            (dram, capacity - dram)
        } else {
            basis.push("tiers: latency-sensitive, all DRAM (no flash tier)".to_string());
            (capacity, 0)
        }
    } else if room.has_flash {
        basis.push("tiers: not latency-sensitive, flash".to_string());
        (0, capacity)
    } else {
        basis.push("tiers: not latency-sensitive, DRAM (no flash tier)".to_string());
        (capacity, 0)
    };
    debug_assert_eq!(dram + flash, capacity);
    Allocation { throughput, capacity, dram, flash, latency_sensitive, basis }
}

/// One node as the packer sees it: its capacity and what jobs reserved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRoom {
    pub node_id: String,
    /// Holds at least one job's reservation.
    pub active: bool,
    /// Being drained or dead: takes no new data.
    pub closed: bool,
    pub throughput_cap: u64,
    pub throughput_reserved: u64,
    pub dram_cap: u64,
    pub dram_reserved: u64,
    pub flash_cap: u64,
    pub flash_reserved: u64,
}

impl NodeRoom {
    /// The fraction of `alloc` this node can still take (may exceed 1).
    fn fraction(&self, alloc: &Allocation) -> f64 {
        let dims = [
            (alloc.throughput, self.throughput_cap.saturating_sub(self.throughput_reserved)),
            (alloc.dram, self.dram_cap.saturating_sub(self.dram_reserved)),
            (alloc.flash, self.flash_cap.saturating_sub(self.flash_reserved)),
        ];
        dims.iter()
            .filter(|(need, _)| *need > 0)
            .map(|&(need, spare)| spare as f64 / need as f64)
            .fold(f64::INFINITY, f64::min)
    }
}

/// Where a job's data goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Packing {
    /// Every open node, weight in [0, 1], summing to 1.
    pub weights: BTreeMap<String, f64>,
    /// The open nodes could not hold the whole allocation: the rest was
    /// spread over them in proportion to their throughput.
    pub overcommitted: bool,
    /// The fraction of the allocation that did not fit before overcommitting.
    pub shortfall: f64,
}

/// Online bin-packing of one allocation onto `nodes`: active nodes first
/// (in the order given), then the others, each taking as much of the job as
/// its spare throughput and tier capacity allow. `None` when no node is open.
pub fn pack(alloc: &Allocation, nodes: &[NodeRoom]) -> Option<Packing> {
    let open: Vec<&NodeRoom> = nodes.iter().filter(|n| !n.closed).collect();
    if open.is_empty() {
        return None;
    }
    let mut weights: BTreeMap<String, f64> = open.iter().map(|n| (n.node_id.clone(), 0.0)).collect();
    let mut remaining = 1.0f64;
    let order = open.iter().filter(|n| n.active).chain(open.iter().filter(|n| !n.active));
    for n in order {
        if remaining <= EPS {
            break;
        }
        let take = n.fraction(alloc).min(remaining);
        if take > EPS {
            *weights.get_mut(&n.node_id).expect("open node") += take;
            remaining -= take;
        }
    }
    let shortfall = remaining.max(0.0);
    let overcommitted = shortfall > EPS;
    if overcommitted {
        let caps: f64 = open.iter().map(|n| n.throughput_cap.max(1) as f64).sum();
        for n in &open {
            *weights.get_mut(&n.node_id).expect("open node") +=
                shortfall * n.throughput_cap.max(1) as f64 / caps;
        }
    }
    normalize(&mut weights);
    Some(Packing { weights, overcommitted, shortfall: if overcommitted { shortfall } else { 0.0 } })
}

/// Scales weights to sum to 1 (no-op when they are all zero), clamping
/// float noise.
pub fn normalize(weights: &mut BTreeMap<String, f64>) {
    let sum: f64 = weights.values().sum();
    if sum <= EPS {
        return;
    }
    for w in weights.values_mut() {
        *w = (*w / sum).clamp(0.0, 1.0);
        if *w < EPS {
            *w = 0.0;
        }
    }
}

/// Removes `node` from a weight map (weight 0) and spreads its weight over
/// the others in proportion to theirs. False when no other node had weight:
/// the job must be packed again.
pub fn drop_node(weights: &mut BTreeMap<String, f64>, node: &str) -> bool {
    if let Some(w) = weights.get_mut(node) {
        *w = 0.0;
    }
    let rest: f64 = weights.values().sum();
    if rest <= EPS {
        return false;
    }
    normalize(weights);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;
    const MIB: u64 = 1 << 20;

    fn table() -> AllocTable {
        AllocTable::default()
    }

    #[test]
    fn no_hints_is_the_conservative_default_on_dram() {
        let a = allocate(&Hints::default(), &table(), TierRoom { dram_free: 4 << 30, has_flash: true });
        assert_eq!(a.throughput, 32 * 75 * MB);
        assert_eq!((a.capacity, a.dram, a.flash), (1 << 30, 1 << 30, 0));
        assert!(a.latency_sensitive);
    }

    #[test]
    fn lambdas_times_per_worker_throughput() {
        let h = Hints { lambdas: Some(8), ..Hints::default() };
        let a = allocate(&h, &table(), TierRoom { dram_free: 0, has_flash: false });
        assert_eq!(a.throughput, 600 * MB);
        assert!(!a.latency_sensitive, "a hint without latency sensitivity is not latency-sensitive");
        assert_eq!((a.dram, a.flash), (1 << 30, 0), "no flash: DRAM");
        let a = allocate(&h, &table(), TierRoom { dram_free: 0, has_flash: true });
        assert_eq!((a.dram, a.flash), (0, 1 << 30), "flash when the cluster has it");
    }

    #[test]
    fn peak_throughput_beats_lambdas_and_capacity_is_split_dram_then_flash() {
        let h = Hints {
            latency_sensitive: Some(true),
            lambdas: Some(100),
            capacity: Some(512 * MIB),
            peak_throughput: Some(200 * MB),
        };
        let a = allocate(&h, &table(), TierRoom { dram_free: 100 * MIB, has_flash: true });
        assert_eq!(a.throughput, 200 * MB);
        assert_eq!((a.capacity, a.dram, a.flash), (512 * MIB, 100 * MIB, 412 * MIB));
        let a = allocate(&h, &table(), TierRoom { dram_free: 100 * MIB, has_flash: false });
        assert_eq!((a.dram, a.flash), (512 * MIB, 0), "without flash it all goes to DRAM");
    }

    fn node(id: &str, active: bool, tp_cap: u64, tp_res: u64, dram_cap: u64) -> NodeRoom {
        NodeRoom {
            node_id: id.into(),
            active,
            throughput_cap: tp_cap,
            throughput_reserved: tp_res,
            dram_cap,
            ..NodeRoom::default()
        }
    }

    fn alloc(tp: u64, dram: u64) -> Allocation {
        Allocation { throughput: tp, capacity: dram, dram, flash: 0, latency_sensitive: true, basis: vec![] }
    }

    fn sum(w: &BTreeMap<String, f64>) -> f64 {
        w.values().sum()
    }

    #[test]
    fn packs_onto_active_nodes_first() {
        let nodes =
            [node("a", false, 100, 0, 1000), node("b", true, 100, 50, 1000), node("c", false, 100, 0, 1000)];
        let p = pack(&alloc(40, 10), &nodes).unwrap();
        assert!(!p.overcommitted);
        assert_eq!(p.weights["b"], 1.0, "the active node had room for all of it");
        assert_eq!((p.weights["a"], p.weights["c"]), (0.0, 0.0));
        // 100 B/s: b has 50 spare, then a (first inactive) takes the other 50.
        let p = pack(&alloc(100, 10), &nodes).unwrap();
        assert!((p.weights["b"] - 0.5).abs() < 1e-9 && (p.weights["a"] - 0.5).abs() < 1e-9);
        assert_eq!(p.weights["c"], 0.0);
        assert!((sum(&p.weights) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn capacity_limits_a_node_share() {
        // Throughput fits on a, but a holds only a quarter of the DRAM.
        let nodes = [node("a", false, 1000, 0, 25), node("b", false, 1000, 0, 1000)];
        let p = pack(&alloc(10, 100), &nodes).unwrap();
        assert!((p.weights["a"] - 0.25).abs() < 1e-9);
        assert!((p.weights["b"] - 0.75).abs() < 1e-9);
    }

    #[test]
    fn overcommits_in_proportion_to_throughput_and_skips_closed_nodes() {
        let mut nodes = [node("a", false, 100, 100, 1000), node("b", false, 300, 300, 1000)];
        nodes[1].closed = false;
        let p = pack(&alloc(50, 10), &nodes).unwrap();
        assert!(p.overcommitted);
        assert!((p.weights["a"] - 0.25).abs() < 1e-9 && (p.weights["b"] - 0.75).abs() < 1e-9);
        nodes[0].closed = true;
        let p = pack(&alloc(50, 10), &nodes).unwrap();
        assert_eq!(p.weights.len(), 1, "closed nodes are not in the map");
        assert_eq!(p.weights["b"], 1.0);
        nodes[1].closed = true;
        assert!(pack(&alloc(50, 10), &nodes).is_none());
    }

    #[test]
    fn dropping_a_node_renormalizes_the_rest() {
        let mut w: BTreeMap<String, f64> = [("a".into(), 0.5), ("b".into(), 0.25), ("c".into(), 0.25)].into();
        assert!(drop_node(&mut w, "a"));
        assert_eq!((w["a"], w["b"], w["c"]), (0.0, 0.5, 0.5));
        let mut w: BTreeMap<String, f64> = [("a".into(), 1.0), ("b".into(), 0.0)].into();
        assert!(!drop_node(&mut w, "a"), "nothing left to spread onto");
    }

    #[test]
    fn policy_file_parses_sizes_and_refuses_unknown_keys() {
        let p =
            Policy::parse("[allocation]\nper_worker_throughput = \"10MB\"\ndefault_capacity = \"64MiB\"\n")
                .unwrap();
        assert_eq!(p.allocation.per_worker_throughput, 10 * MB);
        assert_eq!(p.allocation.default_capacity, 64 * MIB);
        assert_eq!(p.allocation.default_workers, 32);
        assert!(Policy::parse("[allocation]\nbogus = 1\n").unwrap_err().contains("bogus"));
        assert!(Policy::parse("[allocation]\ndefault_workers = 0\n").is_err());
    }
}
