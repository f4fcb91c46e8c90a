//! Horizontal scaling through the provisioner: starting nodes (and waiting
//! for their first heartbeats), draining them (weight 0 for new data, stop
//! once their blocks are freed), and scaling to a node count.

use std::collections::BTreeSet;
use std::time::Instant;

use std::sync::Arc;
use std::time::Duration;

use super::rightsize::{self, Action, Limits};
use super::Shared;

/// Why nodes were not added.
#[derive(Debug, thiserror::Error)]
pub(super) enum AddError {
    /// No provisioner, or it could not start any node (e.g. at its limit).
    #[error("{0}")]
    NoRoom(String),
    /// Nodes were started but did not report in time.
    #[error("{0}")]
    Timeout(String),
}
use crate::api::{EventKind, ScaleResponse};

impl Shared {
    fn provisioned(&self) -> Vec<String> {
        self.provisioner
            .as_ref()
            .map(|p| p.list().into_iter().map(|n| n.node_id).collect())
            .unwrap_or_default()
    }

    /// Starts `k` nodes through the provisioner and waits for their first
    /// heartbeats. Returns the ids of the nodes that came up; an error when
    /// none could be started or they did not report in time.
    pub(super) async fn add_nodes(&self, k: usize, why: &str) -> Result<Vec<String>, AddError> {
        let Some(prov) = self.provisioner.clone() else {
            return Err(AddError::NoRoom(
                "this controller has no provisioner (`pollen up --nodes N` runs one)".into(),
            ));
        };
        let mut started = Vec::new();
        for _ in 0..k {
            let p = prov.clone();
            match tokio::task::spawn_blocking(move || p.start_node()).await {
                Ok(Ok(n)) => {
                    self.cluster().scale_event(
                        EventKind::Scale,
                        Some(&n.node_id),
                        format!("starting node {} ({why})", n.node_id),
                    );
                    started.push(n.node_id);
                }
                Ok(Err(e)) => {
                    self.cluster().scale_event(
                        EventKind::Error,
                        None,
                        format!("cannot add a node ({why}): {e}"),
                    );
                    if started.is_empty() {
                        return Err(AddError::NoRoom(e.to_string()));
                    }
                    break;
                }
                Err(e) => return Err(AddError::NoRoom(format!("provisioner task failed: {e}"))),
            }
        }
        if !self.wait_for_nodes(&started, self.node_start_timeout).await {
            let msg = format!(
                "new node(s) {} sent no heartbeat within {} ms",
                started.join(", "),
                self.node_start_timeout.as_millis()
            );
            self.cluster().scale_event(EventKind::Error, None, msg.clone());
            return Err(AddError::Timeout(msg));
        }
        for id in &started {
            self.cluster().scale_event(EventKind::Scale, Some(id), format!("node {id} is up ({why})"));
        }
        Ok(started)
    }

    /// Starts draining `node_id`; only nodes the provisioner started can be
    /// drained (it stops them at the end).
    pub(super) fn drain(&self, node_id: &str, why: &str) -> Result<(), String> {
        if self.provisioner.is_none() {
            return Err("this controller has no provisioner to stop drained nodes".into());
        }
        if !self.provisioned().iter().any(|id| id == node_id) {
            return Err(format!("node {node_id} was not started by the provisioner; stop it yourself"));
        }
        self.cluster().start_drain(node_id, why, Instant::now())
    }

    /// Starts or drains nodes until `n` live nodes take new data.
    pub(super) async fn scale_to(&self, n: usize) -> Result<ScaleResponse, String> {
        if n == 0 {
            return Err("a cluster keeps at least one node".into());
        }
        let _one_at_a_time = self.scaling.lock().await;
        let open = self.cluster().open_nodes();
        let mut resp = ScaleResponse::default();
        if n > open.len() {
            resp.started = self
                .add_nodes(n - open.len(), &format!("scale to {n} nodes"))
                .await
                .map_err(|e| e.to_string())?;
        } else if n < open.len() {
            let mut candidates: Vec<String> =
                self.provisioned().into_iter().filter(|id| open.contains(id)).collect();
            for _ in n..open.len() {
                let Some(id) = self.cluster().least_used(&candidates) else { break };
                candidates.retain(|c| c != &id);
                self.drain(&id, &format!("scale to {n} nodes"))?;
                resp.draining.push(id);
            }
            if resp.draining.len() < open.len() - n {
                self.cluster().scale_event(
                    EventKind::Error,
                    None,
                    format!(
                        "scale to {n} nodes: only {} node(s) were started by the provisioner and can be drained",
                        resp.draining.len()
                    ),
                );
            }
        }
        resp.open_nodes = self.cluster().open_nodes().len();
        Ok(resp)
    }

    /// Runs the rightsizing policy when it is due and applies its decision:
    /// cores change on the next heartbeat reply, nodes are added in the
    /// background, drains start at once.
    pub(super) fn rightsize(self: &Arc<Self>) {
        let (table, core_throughput) = {
            let c = self.cluster();
            (c.policy().scaling.clone(), c.policy().allocation.core_throughput)
        };
        if !table.enabled {
            return;
        }
        let now = Instant::now();
        {
            let mut at = self.rightsized.lock().unwrap_or_else(|p| p.into_inner());
            let due = at.0.is_none_or(|t| now - t >= Duration::from_millis(table.interval_ms));
            let cooled = at.1.is_none_or(|t| now - t >= Duration::from_millis(table.cooldown_ms));
            if !due || !cooled {
                return;
            }
            at.0 = Some(now);
        }
        // A scale-up or registration in progress changes the picture: wait for it.
        let Ok(busy) = self.scaling.try_lock() else { return };
        drop(busy);
        let provisioned = self.provisioned();
        let can_add = self
            .provisioner
            .as_ref()
            .is_some_and(|p| p.limit().is_none_or(|m| p.list().iter().filter(|n| n.running).count() < m));
        let view = self.cluster().scaling_view(&provisioned);
        let lim = Limits {
            table: &table,
            core_throughput,
            min_nodes: table.min_nodes.unwrap_or(self.min_nodes),
            can_add,
        };
        let Some(d) = rightsize::decide(&view, lim) else { return };
        let why = format!("rightsizing: {}", d.reason);
        let acted = match d.action {
            Action::SetCores { node_id, cores } => self.cluster().set_polling_cores(&node_id, cores, &why),
            Action::Drain { node_id } => self.drain(&node_id, &why),
            Action::AddNode => {
                let me = self.clone();
                tokio::spawn(async move {
                    let _one_at_a_time = me.scaling.lock().await;
                    // add_nodes records the outcome as events.
                    let _ = me.add_nodes(1, &why).await;
                });
                Ok(())
            }
        };
        match acted {
            Ok(()) => self.rightsized.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(Instant::now()),
            Err(e) => {
                self.cluster().scale_event(EventKind::Error, None, format!("rightsizing could not act: {e}"))
            }
        }
    }

    /// Adopts jobs that live nodes report but the controller does not hold
    /// (after a controller restart): their hints come from the node.
    pub(super) async fn adopt_jobs(&self) {
        self.deregister_owed().await;
        let found = self.cluster().unadopted(Instant::now(), 16);
        for (name, node_id, addr) in found {
            let secret = self.cluster_secret.clone();
            let job = name.clone();
            let hints =
                tokio::task::spawn_blocking(move || super::nodeops::job_hints(&addr, &job, secret.as_ref()))
                    .await;
            match hints {
                Ok(Ok(h)) => {
                    self.cluster().adopt_job(&name, &node_id, h);
                }
                Ok(Err(e)) => {
                    tracing::debug!(job = %name, error = %e, "cannot adopt a job yet");
                    self.cluster().hold_off_adoption(&name);
                }
                Err(e) => tracing::warn!(error = %e, "adoption task failed"),
            }
        }
    }

    /// Deregisters the jobs owed to metadata nodes that are up again (a
    /// failed call is tried again on a later sweep).
    async fn deregister_owed(&self) {
        let due = self.cluster().deregistrations_due(Instant::now(), 16);
        for (name, node_id, addr, nodes) in due {
            let secret = self.cluster_secret.clone();
            let job = name.clone();
            let asked: BTreeSet<u16> = nodes.keys().copied().collect();
            let done = tokio::task::spawn_blocking(move || {
                super::nodeops::deregister(&addr, &job, &nodes, secret.as_ref())
            })
            .await;
            match done {
                Ok(Ok(d)) => self.cluster().deregistration_done(&name, &node_id, d.as_ref(), &asked),
                Ok(Err(e)) => {
                    tracing::debug!(job = %name, error = %e, "owed deregistration failed; tried again");
                    self.cluster().deregistration_failed(&name, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deregistration task failed");
                    self.cluster().deregistration_failed(&name, Instant::now());
                }
            }
        }
    }

    /// Stops the draining nodes whose blocks are all freed (or that died)
    /// and forgets them.
    pub(super) async fn stop_drained(&self) {
        let ready = self.cluster().drained();
        let Some(prov) = self.provisioner.clone() else { return };
        for id in ready {
            let p = prov.clone();
            let node = id.clone();
            let message = match tokio::task::spawn_blocking(move || p.stop_node(&node)).await {
                Ok(Ok(())) => format!("node {id} drained: its blocks are freed; stopped"),
                Ok(Err(e)) => format!("node {id} drained; stopping it failed: {e}"),
                Err(e) => format!("node {id} drained; the stop task failed: {e}"),
            };
            self.cluster().forget(&id, message);
        }
        // Provisioned nodes down for long (crashed, or unreachable) are
        // forgotten and their process stopped: they no longer hold a slot.
        let provisioned = self.provisioned();
        let long_down = self.cluster().long_down(&provisioned, Instant::now());
        for (id, grace) in long_down {
            let p = prov.clone();
            let node = id.clone();
            let stopped = match tokio::task::spawn_blocking(move || p.stop_node(&node)).await {
                Ok(Ok(())) => "its process is stopped".to_string(),
                Ok(Err(e)) => format!("stopping its process failed: {e}"),
                Err(e) => format!("the stop task failed: {e}"),
            };
            let message = format!(
                "node {id} was down for over {} ms: forgotten ({stopped}); its slot is free",
                grace.as_millis()
            );
            self.cluster().forget(&id, message);
        }
    }
}
