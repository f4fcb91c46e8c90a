//! A job deregistered while its metadata node is away is deregistered there
//! when the node is back, and never adopted meanwhile: a job spread over two
//! `pollen node` processes, its metadata node stopped (SIGSTOP: the process
//! and the job are intact, it just does not answer), the job deregistered,
//! the controller restarted on its data directory (the owed deregistration
//! is kept there), then SIGCONT: the node's first report lists the job as
//! registered; the controller deregisters it instead of adopting it, and
//! both nodes' DRAM in use returns to what it was before the job.

use std::time::Duration;

use dataplane::client::{Client, PutOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pollen_ctl::api::{DeregisterResponse, EventKind, JobEntry, JobsResponse, NodeState, NodesResponse};
use pollen_tests::control::{spawn_controller, wait_for, Cluster, Pollenctl, SMALL_POLICY};

const CTL_ARGS: &[&str] = &["--data-dir", "ctl-data"];

fn used_dram(ctl: &Pollenctl, node: &str) -> Option<u64> {
    let r: NodesResponse = ctl.json(&["nodes"]);
    let n = r.nodes.iter().find(|n| n.report.node_id == node && n.state == NodeState::Up)?;
    Some(n.report.tiers.iter().filter(|t| t.tier == "dram").map(|t| t.used_bytes).sum())
}

/// Whether `node`'s latest report lists `job` as registered.
fn reports_registered(ctl: &Pollenctl, node: &str, job: &str) -> bool {
    let r: NodesResponse = ctl.json(&["nodes"]);
    r.nodes
        .iter()
        .filter(|n| n.report.node_id == node)
        .any(|n| n.report.jobs.iter().any(|j| j.name == job && j.registered))
}

#[test]
fn a_job_deregistered_while_its_metadata_node_is_stopped_is_deregistered_there_and_not_adopted() {
    let mut c = Cluster::controller(SMALL_POLICY, CTL_ARGS, &["--cores", "1", "--dram-gb", "0.015625"]);
    c.start_numbered(&[None, None], |_| Vec::new());
    let mut ctl = c.pollenctl();
    ctl.logs.extend(["n1.err", "n2.err"].iter().map(|f| c.dir.path().join(f)));
    let ids = ["n1", "n2"];
    let before: Vec<u64> = ids.iter().map(|id| used_dram(&ctl, id).expect("up")).collect();

    let j: JobEntry = ctl.json(&["job", "register", "gone", "--lambdas", "25", "--capacity", "8MiB"]);
    let home = j.node_id.clone();
    let entry = wait_for(Duration::from_secs(10), "the weight map on the metadata node", || {
        let e = ctl.registered("gone");
        (e.weights_applied && e.node_addrs.len() == 2).then_some(e)
    });
    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job("gone").expect("job");
    let bs = client.block_size();
    for k in 0..12u64 {
        let data: Vec<u8> = (0..2 * bs).map(|b| ((b + k) % 251) as u8).collect();
        client.put_buffer(&job, &format!("obj-{k}"), &data, PutOptions::default()).expect("put");
    }
    drop(client);
    wait_for(Duration::from_secs(10), "the job's blocks in the reports", || {
        let now: Vec<Option<u64>> = ids.iter().map(|id| used_dram(&ctl, id)).collect();
        let total: u64 = now.iter().flatten().sum();
        (total >= before.iter().sum::<u64>() + 24 * bs).then_some(())
    });

    // The metadata node stops answering and is declared dead; the job is deregistered.
    let pid = Pid::from_raw(c.nodes[&home].0.as_ref().expect("running").id() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    wait_for(Duration::from_secs(10), "the stopped node declared down", || {
        used_dram(&ctl, &home).is_none().then_some(())
    });
    let d: DeregisterResponse = ctl.json(&["job", "deregister", "gone"]);
    assert!(!d.freed, "{d:?}");
    assert!(d.note.as_deref().is_some_and(|n| n.contains("when the node is up")), "{d:?}");
    let file = c.dir.path().join("ctl-data/owed-deregistrations.json");
    wait_for(Duration::from_secs(10), "the owed deregistration on disk", || {
        std::fs::read_to_string(&file).ok().filter(|t| t.contains("\"gone\"")).map(|_| ())
    });

    // A new controller on the data directory: it knows no node and no job
    // yet, and would adopt the job from the node's first report.
    assert!(c.ctl.terminate().success());
    let listen = c.url.trim_start_matches("http://").to_string();
    c.ctl = spawn_controller(c.dir.path(), &listen, CTL_ARGS).0;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    wait_for(Duration::from_secs(20), "the job deregistered on its node and its blocks freed", || {
        let dram: Vec<Option<u64>> = ids.iter().map(|id| used_dram(&ctl, id)).collect();
        let freed = dram.iter().zip(&before).all(|(now, b)| *now == Some(*b));
        (freed && !reports_registered(&ctl, &home, "gone")).then_some(())
    });
    let jobs: JobsResponse = ctl.json(&["jobs"]);
    assert!(jobs.registered.iter().all(|j| j.name != "gone"), "not adopted: {:?}", jobs.registered);
    assert!(jobs.jobs.iter().all(|j| j.name != "gone"), "gone from its node: {:?}", jobs.jobs);
    let events = ctl.events().events;
    assert!(
        !events.iter().any(|e| e.kind == EventKind::JobRegistered && e.job.as_deref() == Some("gone")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.kind == EventKind::JobDeregistered
            && e.job.as_deref() == Some("gone")
            && e.node.as_deref() == Some(home.as_str())),
        "{events:?}"
    );
    wait_for(Duration::from_secs(10), "the owed deregistration dropped from the file", || {
        std::fs::read_to_string(&file).ok().filter(|t| !t.contains("\"gone\"")).map(|_| ())
    });
    c.stop();
}
