//! `GET /metrics`: the controller's view in the Prometheus (OpenMetrics)
//! text format, built from the same views the JSON API serves, with the
//! `prometheus-client` crate. A scrape builds a fresh registry, so label sets
//! of nodes and jobs that are gone disappear with them.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::cluster::Cluster;
use crate::api::NodeState;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeL {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoreL {
    node: String,
    core: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierL {
    node: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobL {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WeightL {
    job: String,
    node: String,
}

type F64 = Gauge<f64, AtomicU64>;

fn family<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, F64>
where
    L: Clone + std::fmt::Debug + std::hash::Hash + Eq + EncodeLabelSet + Send + Sync + 'static,
{
    let f = Family::<L, F64>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics text for the cluster as it is at `now`.
pub fn render(c: &Cluster, now: Instant) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("pollen");
    let node_up = family::<NodeL>(
        &mut reg,
        "node_up",
        "1 when the node's heartbeats arrive, 0 when it is declared dead",
    );
    let draining = family::<NodeL>(&mut reg, "node_draining", "1 while the node is drained");
    let net = family::<NodeL>(
        &mut reg,
        "node_network_bytes_per_second",
        "Network bytes/s in + out between the last two heartbeats",
    );
    let uptime = family::<NodeL>(&mut reg, "node_uptime_seconds", "The node's uptime, as it reports it");
    let heartbeat_age =
        family::<NodeL>(&mut reg, "node_heartbeat_age_seconds", "Seconds since the node's last heartbeat");
    let busy = family::<CoreL>(
        &mut reg,
        "core_busy_ratio",
        "Busy fraction of a core between the last two heartbeats",
    );
    let polling = family::<CoreL>(
        &mut reg,
        "core_polling",
        "1 when the core polls, 0 when the controller turned it off",
    );
    let bytes_in =
        family::<CoreL>(&mut reg, "core_received_bytes", "Bytes the core received since the node started");
    let bytes_out =
        family::<CoreL>(&mut reg, "core_sent_bytes", "Bytes the core sent since the node started");
    let requests =
        family::<CoreL>(&mut reg, "core_requests", "Requests the core served since the node started");
    let cap = family::<TierL>(&mut reg, "tier_capacity_bytes", "Capacity of a tier on a node");
    let used = family::<TierL>(&mut reg, "tier_used_bytes", "Bytes in use on a tier of a node");
    let job_tp = family::<JobL>(
        &mut reg,
        "job_throughput_bytes_per_second",
        "A registered job's throughput allocation",
    );
    let job_cap = family::<JobL>(&mut reg, "job_capacity_bytes", "A registered job's capacity allocation");
    let weight =
        family::<WeightL>(&mut reg, "job_weight", "A job's weight on a node (sums to 1 over live nodes)");
    let jobs = F64::default();
    reg.register("jobs", "Jobs registered through the controller", jobs.clone());
    let events = F64::default();
    reg.register(
        "events",
        "Events recorded since the controller started (the last sequence number)",
        events.clone(),
    );

    for n in c.nodes(now).nodes {
        let l = NodeL { node: n.report.node_id.clone() };
        node_up.get_or_create(&l).set(if n.state == NodeState::Up { 1.0 } else { 0.0 });
        draining.get_or_create(&l).set(if n.draining { 1.0 } else { 0.0 });
        uptime.get_or_create(&l).set(n.report.uptime_ms as f64 / 1e3);
        heartbeat_age.get_or_create(&l).set(n.last_heartbeat_ms_ago as f64 / 1e3);
        for t in &n.report.tiers {
            let l = TierL { node: n.report.node_id.clone(), tier: t.tier.clone() };
            cap.get_or_create(&l).inc_by(t.capacity_bytes as f64);
            used.get_or_create(&l).inc_by(t.used_bytes as f64);
        }
    }
    for v in c.scaling_view(&[]) {
        net.get_or_create(&NodeL { node: v.node_id }).set(v.net_rate);
    }
    for r in c.cores().cores {
        let l = CoreL { node: r.node_id.clone(), core: r.core.to_string() };
        if let Some(b) = r.busy {
            busy.get_or_create(&l).set(b);
        }
        polling.get_or_create(&l).set(if r.polling { 1.0 } else { 0.0 });
        bytes_in.get_or_create(&l).set(r.bytes_in as f64);
        bytes_out.get_or_create(&l).set(r.bytes_out as f64);
        requests.get_or_create(&l).set(r.requests as f64);
    }
    let registered = c.jobs().registered;
    jobs.set(registered.len() as f64);
    for j in registered {
        if let Some(a) = &j.allocation {
            job_tp.get_or_create(&JobL { job: j.name.clone() }).set(a.throughput as f64);
            job_cap.get_or_create(&JobL { job: j.name.clone() }).set(a.capacity as f64);
        }
        for (node, w) in &j.weights {
            weight.get_or_create(&WeightL { job: j.name.clone(), node: node.clone() }).set(*w);
        }
    }
    events.set(c.events(u64::MAX, 0).last_seq as f64);
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}
