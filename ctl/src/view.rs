//! The node side of the cluster view the controller pushes on heartbeat
//! replies: the dead storage nodes and the weight maps of the jobs whose
//! namespace this node holds (`NodeCommand::SetDeadNodes`,
//! `NodeCommand::SetJobWeights`) and, on a storage node, each job's DRAM
//! share (`NodeCommand::SetDramShares`). It applies them with the `Node` APIs and
//! remembers their versions, which the node's report carries back
//! (`NodeReport::applied`), so the controller sends again only what the
//! node lacks: everything after a restart, nothing while it is in step.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use dataplane::node::Node;
use dataplane::proto::BlockId;

use crate::api::{AppliedView, NodeCommand, NodeReport};

/// Applies the view commands to one node; shared by its heartbeat's
/// report and command closures.
pub struct ViewApplier {
    node: Arc<Node>,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    weights_version: Option<u64>,
    /// The newest restart of another node applied (`NodesRestarted`).
    restarts_version: Option<u64>,
    /// Jobs with a weight map set by the controller.
    jobs: BTreeSet<String>,
    /// Ids of the owed frees applied, among those the controller still
    /// sends (reported in `frees_done` until the controller stops sending them).
    frees_done: BTreeSet<u64>,
}

/// Most owed-free ids a node remembers (the controller sends fewer per reply).
const MAX_FREES_DONE: usize = 4096;

impl ViewApplier {
    pub fn new(node: Arc<Node>) -> ViewApplier {
        ViewApplier { node, held: Mutex::new(Held::default()) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // Every change to `Held` is a plain assignment: a panic elsewhere
        // cannot leave it half-done.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's report with the view versions it holds.
    pub fn report(&self) -> NodeReport {
        let mut r = self.node.report();
        r.applied = Some(self.applied());
        r.frees_done = self.held().frees_done.iter().copied().collect();
        r
    }

    pub fn applied(&self) -> AppliedView {
        let held = self.held();
        AppliedView {
            dead_version: self.node.dead_nodes().0,
            weights_version: held.weights_version,
            restarts_version: held.restarts_version,
            dram_shares_version: self.node.dram_shares().0,
        }
    }

    /// Applies `c` if it is a view command; false for other commands.
    pub fn apply(&self, c: &NodeCommand) -> bool {
        match c {
            NodeCommand::SetDeadNodes { version, dead } => {
                if self.node.set_dead_nodes(*version, dead) {
                    tracing::info!(version, ?dead, "the controller set the dead nodes");
                } else {
                    tracing::debug!(version, "dead-node set not newer than the one held: ignored");
                }
                true
            }
            NodeCommand::SetJobWeights { version, jobs } => {
                let mut held = self.held();
                // One change of the node's view for the whole set.
                let set = jobs.iter().map(|(job, weights)| (job.as_str(), weights.as_slice()));
                let gone = held.jobs.iter().filter(|j| !jobs.contains_key(*j)).map(String::as_str);
                for (job, e) in self.node.set_job_weight_maps(set, gone) {
                    // The version is still taken: sending the same map
                    // again would fail the same way.
                    tracing::warn!(%job, error = %e, "cannot apply the controller's weight map");
                }
                held.jobs = jobs.keys().cloned().collect();
                held.weights_version = Some(*version);
                tracing::info!(version, jobs = jobs.len(), "the controller set the jobs' weight maps");
                true
            }
            NodeCommand::FreeOwners { frees } => {
                let mut held = self.held();
                // Only the ids still sent need acknowledging: the others the
                // controller has dropped.
                let sent: BTreeSet<u64> = frees.iter().map(|f| f.id).collect();
                held.frees_done.retain(|id| sent.contains(id));
                for f in frees {
                    if held.frees_done.contains(&f.id) {
                        continue;
                    }
                    let keep: Vec<BlockId> = f.keep.iter().copied().map(BlockId).collect();
                    match self.node.free_owner(f.meta_node, f.job_id, &keep) {
                        Ok(()) => tracing::info!(
                            job = %f.job,
                            job_id = f.job_id,
                            meta_node = f.meta_node,
                            kept = keep.len(),
                            "freed the blocks of a job deregistered while this node was away"
                        ),
                        // Sending it again would fail the same way: acknowledged all the same.
                        Err(e) => {
                            tracing::warn!(job = %f.job, error = %e, "cannot free an owed job's blocks")
                        }
                    }
                    if held.frees_done.len() < MAX_FREES_DONE {
                        held.frees_done.insert(f.id);
                    }
                }
                true
            }
            NodeCommand::NodesRestarted { restarts } => {
                let mut held = self.held();
                // In order, each once: a version at or below the one held was applied.
                for &(version, node) in restarts {
                    if held.restarts_version.is_some_and(|v| v >= version) {
                        continue;
                    }
                    self.node.mark_node_lost(node);
                    tracing::info!(
                        node,
                        version,
                        "node restarted: objects naming its earlier blocks are lost"
                    );
                    held.restarts_version = Some(version);
                }
                true
            }
            NodeCommand::SetDramShares { version, shares } => {
                match self.node.set_dram_shares(*version, shares) {
                    Ok(true) => tracing::info!(
                        version,
                        jobs = shares.len(),
                        "the controller set the jobs' DRAM shares"
                    ),
                    Ok(false) => {
                        tracing::debug!(version, "DRAM shares not newer than the ones held: ignored")
                    }
                    Err(e) => {
                        tracing::warn!(version, error = %e, "cannot apply the controller's DRAM shares")
                    }
                }
                true
            }
            NodeCommand::SetPollingCores { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::node::NodeConfig;
    use std::collections::BTreeMap;

    /// A weight-map set is applied in one change of the node's cluster
    /// view, whatever the number of jobs; jobs left out lose their map, a
    /// refused map leaves the others applied.
    #[test]
    fn a_weight_map_set_is_one_change_of_the_view() {
        let cfg = NodeConfig { port: 0, core_port_base: 0, cores: 1, pin: false, ..NodeConfig::default() };
        let node = Arc::new(Node::start(cfg).expect("node starts"));
        let view = ViewApplier::new(node.clone());
        let jobs: BTreeMap<String, Vec<(u16, f64)>> =
            (0..2000).map(|i| (format!("j{i}"), vec![(1, 0.5), (2, 0.5)])).collect();
        let before = node.cluster_view_changes();
        assert!(view.apply(&NodeCommand::SetJobWeights { version: 1, jobs: jobs.clone() }));
        assert_eq!(node.cluster_view_changes(), before + 1);
        assert_eq!(node.job_weights("j1999"), Some(vec![(1, 0.5), (2, 0.5)]));
        assert_eq!(view.applied().weights_version, Some(1));

        let mut next: BTreeMap<String, Vec<(u16, f64)>> = jobs.into_iter().skip(1000).collect();
        next.insert("bad".into(), vec![(1, 1.5)]);
        assert!(view.apply(&NodeCommand::SetJobWeights { version: 2, jobs: next }));
        assert_eq!(node.cluster_view_changes(), before + 2);
        assert_eq!(node.job_weights("j0"), None, "left out: dropped");
        assert_eq!(node.job_weights("bad"), None, "refused");
        assert!(node.job_weights("j999").is_some(), "kept");
        assert_eq!(view.applied().weights_version, Some(2));
        drop(view);
        if let Ok(n) = Arc::try_unwrap(node) {
            n.shutdown();
        }
    }
}
