//! What the controller tells a metadata node about the cluster: each job's
//! weight map (node number → weight), which places the job's new blocks
//! (`Place`), and the storage nodes it declared dead. Set from outside the
//! cores (`Node::set_job_weights`, `Node::set_dead_nodes`), read by
//! the cores on the request path: the state is an immutable snapshot behind
//! an `Arc`, replaced whole on every change and announced by a version
//! counter, so a core compares one atomic per request and takes the lock
//! only after a change.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Most entries a weight map may have (every possible node number).
pub const MAX_WEIGHTS: usize = 1 << 16;

/// A job's weight map: the nodes that may receive its new blocks and their
/// weights, each in [0, 1] (the controller makes them sum to 1 over live
/// nodes; only their ratios matter here).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightMap {
    entries: Vec<(u16, f64)>,
}

impl WeightMap {
    /// Checks the entries: each node once, each weight a number in [0, 1].
    pub fn new(entries: &[(u16, f64)]) -> Result<WeightMap, String> {
        if entries.len() > MAX_WEIGHTS {
            return Err(format!("a weight map has at most {MAX_WEIGHTS} entries"));
        }
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        for &(node, w) in entries {
            if !(0.0..=1.0).contains(&w) {
                return Err(format!("node {node}: weight {w} is not in [0, 1]"));
            }
            if !seen.insert(node) {
                return Err(format!("node {node} appears twice"));
            }
        }
        Ok(WeightMap { entries: entries.to_vec() })
    }

    pub fn entries(&self) -> &[(u16, f64)] {
        &self.entries
    }

    /// The nodes that can be drawn, with cumulative weights: those with a
    /// weight above 0 that `excluded` does not rule out (dead nodes).
    pub fn drawable(&self, excluded: impl Fn(u16) -> bool) -> Drawable {
        let mut nodes = Vec::with_capacity(self.entries.len());
        let mut total = 0.0;
        for &(node, w) in self.entries.iter().filter(|&&(n, w)| w > 0.0 && !excluded(n)) {
            total += w;
            nodes.push((node, total));
        }
        Drawable { nodes, total }
    }
}

/// A weight map's drawable nodes, ready for weighted random choice.
pub struct Drawable {
    /// (node, sum of the weights up to and including it).
    nodes: Vec<(u16, f64)>,
    total: f64,
}

impl Drawable {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node whose share of the total weight contains `u` ∈ [0, 1):
    /// node *i* is drawn with probability weight(*i*) / total.
    pub fn pick(&self, u: f64) -> Option<u16> {
        let x = u * self.total;
        let i = self.nodes.partition_point(|&(_, cum)| cum <= x);
        // `u` just below 1 can round onto the total: the last node then.
        self.nodes.get(i).or(self.nodes.last()).map(|&(n, _)| n)
    }
}

/// A core's random numbers for placement: SplitMix64 (one add, three
/// multiply-xorshift steps per draw; statistically sound for sampling, not
/// for secrets).
pub struct PlaceRng(u64);

impl PlaceRng {
    pub fn new(seed: u64) -> PlaceRng {
        PlaceRng(seed)
    }

    /// A seed that differs per core and per start.
    pub fn seed_for(core: u8) -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (core as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One version of the cluster state.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    /// Each job's weight map, by job name.
    pub weights: HashMap<String, Arc<WeightMap>>,
    /// The storage nodes the controller declared dead.
    pub dead: Arc<HashSet<u16>>,
    /// The version of `dead` (`None`: never set); older sets are ignored.
    pub dead_version: Option<u64>,
    /// Each job's DRAM share on this node as a storage node, in bytes, by
    /// block owner (`storage::job_owner`): a put that asks for "DRAM, the
    /// rest on the next tier" (`tier::DRAM | tier::SPILL`) goes to the next
    /// tier once the job holds its share of DRAM. Owners not listed have
    /// no share: DRAM while it lasts.
    pub dram_shares: Arc<HashMap<crate::storage::Owner, u64>>,
    /// The version of `dram_shares` (`None`: never set); older ones are ignored.
    pub dram_shares_version: Option<u64>,
}

/// One job's DRAM share on a storage node: the job (its metadata node's
/// number and its id there) and the bytes of DRAM it may hold on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DramShare {
    pub metadata_node: u16,
    pub job: u32,
    pub bytes: u64,
}

impl ClusterState {
    /// Replaces the dead set if `version` is newer than the one held;
    /// returns whether it did.
    pub fn set_dead(&mut self, version: u64, dead: &[u16]) -> bool {
        if self.dead_version.is_some_and(|v| v >= version) {
            return false;
        }
        self.dead = Arc::new(dead.iter().copied().collect());
        self.dead_version = Some(version);
        true
    }

    /// Replaces the DRAM shares if `version` is newer than the one held;
    /// returns whether it did, or why the shares are refused (a reserved
    /// job id, or a job listed twice).
    pub fn set_dram_shares(&mut self, version: u64, shares: &[DramShare]) -> Result<bool, String> {
        if self.dram_shares_version.is_some_and(|v| v >= version) {
            return Ok(false);
        }
        let mut map = HashMap::with_capacity(shares.len());
        for s in shares {
            let owner = crate::storage::job_owner(s.metadata_node, s.job);
            if !crate::storage::is_job_owner(owner) {
                return Err(format!("job id {:#x} is reserved", s.job));
            }
            if map.insert(owner, s.bytes).is_some() {
                return Err(format!(
                    "job {} of metadata node {} has two DRAM shares",
                    s.job, s.metadata_node
                ));
            }
        }
        self.dram_shares = Arc::new(map);
        self.dram_shares_version = Some(version);
        Ok(true)
    }

    /// The first location in `blocks` on a dead node, as (block index, node).
    pub fn first_dead(&self, blocks: &[crate::proto::Location]) -> Option<(usize, u16)> {
        if self.dead.is_empty() {
            return None;
        }
        blocks.iter().position(|l| self.dead.contains(&l.node)).map(|i| (i, blocks[i].node))
    }
}

/// The node's cluster state, shared by its cores.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// Bumped after every change; cores compare it with the version they hold.
    version: AtomicU64,
    current: Mutex<Arc<ClusterState>>,
}

impl ClusterView {
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current state (a lock, briefly: after `version` changed).
    pub fn snapshot(&self) -> Arc<ClusterState> {
        match self.current.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the state with `change` applied to a copy of it; returns
    /// what `change` returned.
    pub fn update<R>(&self, change: impl FnOnce(&mut ClusterState) -> R) -> R {
        let mut g = match self.current.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = ClusterState::clone(&g);
        let r = change(&mut next);
        *g = Arc::new(next);
        // Published after the new state, so a core that sees the new
        // version and then locks finds that state (or a later one).
        self.version.fetch_add(1, Ordering::AcqRel);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_maps_are_checked() {
        assert!(WeightMap::new(&[(1, 0.5), (2, 0.5)]).is_ok());
        assert!(WeightMap::new(&[]).is_ok());
        assert!(WeightMap::new(&[(1, 1.5)]).unwrap_err().contains("not in [0, 1]"));
        assert!(WeightMap::new(&[(1, -0.1)]).is_err());
        assert!(WeightMap::new(&[(1, f64::NAN)]).is_err());
        assert!(WeightMap::new(&[(1, 0.2), (1, 0.3)]).unwrap_err().contains("twice"));
    }

    #[test]
    fn draws_follow_the_weights_and_skip_zero_and_excluded_nodes() {
        let w = WeightMap::new(&[(1, 0.2), (2, 0.5), (3, 0.3), (4, 0.0), (5, 0.4)]).unwrap();
        let d = w.drawable(|n| n == 5);
        let mut rng = PlaceRng::new(42);
        let mut counts = HashMap::new();
        let n = 100_000;
        for _ in 0..n {
            *counts.entry(d.pick(rng.next_unit()).unwrap()).or_insert(0u32) += 1;
        }
        assert_eq!(counts.get(&4), None, "weight 0 is never drawn");
        assert_eq!(counts.get(&5), None, "excluded nodes are never drawn");
        for (node, p) in [(1u16, 0.2), (2, 0.5), (3, 0.3)] {
            let got = counts[&node] as f64 / n as f64;
            // 5 standard deviations at most (about 0.008 here).
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((got - p).abs() < 5.0 * sd, "node {node}: {got} vs {p}");
        }
        // The ends of [0, 1).
        assert_eq!(d.pick(0.0), Some(1));
        assert_eq!(d.pick(0.999_999_999_999), Some(3));
        assert!(w.drawable(|_| true).is_empty());
        assert_eq!(w.drawable(|_| true).pick(0.5), None);
    }

    #[test]
    fn the_view_publishes_each_change_with_a_new_version() {
        let v = ClusterView::default();
        let v0 = v.version();
        assert!(v.snapshot().weights.is_empty());
        let w = Arc::new(WeightMap::new(&[(3, 1.0)]).unwrap());
        v.update(|s| {
            s.weights.insert("j".into(), w.clone());
        });
        assert!(v.version() > v0);
        assert_eq!(v.snapshot().weights["j"], w);
        v.update(|s| {
            s.weights.remove("j");
        });
        assert!(v.snapshot().weights.is_empty());
    }

    #[test]
    fn dead_sets_apply_only_when_newer() {
        use crate::proto::{BlockId, Location};
        let mut s = ClusterState::default();
        let at = |node| Location { node, block: BlockId(0) };
        assert_eq!(s.first_dead(&[at(1), at(2)]), None);
        assert!(s.set_dead(0, &[2, 5]), "the first set applies, whatever its version");
        assert_eq!(s.first_dead(&[at(1), at(2), at(5)]), Some((1, 2)));
        assert!(!s.set_dead(0, &[]), "the same version again is ignored");
        assert_eq!(s.first_dead(&[at(5)]), Some((0, 5)));
        assert!(s.set_dead(3, &[5]));
        assert!(!s.set_dead(2, &[]), "an older version is ignored");
        assert_eq!(s.first_dead(&[at(2), at(5)]), Some((1, 5)));
        assert!(s.set_dead(4, &[]));
        assert_eq!(s.first_dead(&[at(5)]), None);
    }
}
