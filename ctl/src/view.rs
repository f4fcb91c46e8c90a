//! The node side of the cluster view the controller pushes on heartbeat
//! replies: the dead storage nodes and the weight maps of the jobs whose
//! namespace this node holds (`NodeCommand::SetDeadNodes`,
//! `NodeCommand::SetJobWeights`). It applies them with the `Node` APIs and
//! remembers their versions, which the node's report carries back
//! (`NodeReport::applied`), so the controller sends again only what the
//! node lacks: everything after a restart, nothing while it is in step.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use dataplane::node::Node;

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
    /// Jobs with a weight map set by the controller.
    jobs: BTreeSet<String>,
}

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
        r
    }

    pub fn applied(&self) -> AppliedView {
        AppliedView { dead_version: self.node.dead_nodes().0, weights_version: self.held().weights_version }
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
                for (job, weights) in jobs {
                    if let Err(e) = self.node.set_job_weights(job, weights) {
                        // The version is still taken: sending the same map
                        // again would fail the same way.
                        tracing::warn!(%job, error = %e, "cannot apply the controller's weight map");
                    }
                }
                for gone in held.jobs.iter().filter(|j| !jobs.contains_key(*j)) {
                    self.node.remove_job_weights(gone);
                }
                held.jobs = jobs.keys().cloned().collect();
                held.weights_version = Some(*version);
                tracing::info!(version, jobs = jobs.len(), "the controller set the jobs' weight maps");
                true
            }
            NodeCommand::SetPollingCores { .. } => false,
        }
    }
}
