//! Deregistration completes on a node that was away: a job spread over
//! three `pollen node` processes is deregistered while one of them is
//! stopped (SIGSTOP: the process and its blocks are intact, it just does not
//! answer, as in a partition), the controller restarts on its data
//! directory, and when the node runs again it gets the free on a heartbeat
//! reply and its DRAM in use returns to what it was, but for the job's
//! PERSIST blocks.
//!
//! Why SIGSTOP and not a restart: a restarted node's DRAM blocks are gone
//! anyway (a restart frees every block that is not PERSIST), so only a node
//! that keeps running while unreachable still holds the job's blocks.

use std::collections::BTreeMap;
use std::time::Duration;

use dataplane::client::{Client, PutOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pollen_ctl::api::{
    DeregisterResponse, EventKind, EventsResponse, JobEntry, NodeState, NodesResponse, StatusResponse,
};
use pollen_tests::control::{spawn_controller, wait_for, Cluster, Pollenctl, SMALL_POLICY};

/// The controller keeps what it owes in its data directory.
const CTL_ARGS: &[&str] = &["--data-dir", "ctl-data"];

fn used_dram(ctl: &Pollenctl, node: &str) -> Option<u64> {
    let r: NodesResponse = ctl.json(&["nodes"]);
    let n = r.nodes.iter().find(|n| n.report.node_id == node && n.state == NodeState::Up)?;
    Some(n.report.tiers.iter().filter(|t| t.tier == "dram").map(|t| t.used_bytes).sum())
}

fn job_entry(url: &str, name: &str) -> JobEntry {
    let resp = ureq::get(format!("{url}/v1/jobs/{name}")).call().expect("GET /v1/jobs/NAME");
    resp.into_body().read_json().expect("job JSON")
}

#[test]
fn a_node_stopped_during_a_deregistration_frees_the_job_when_it_runs_again() {
    // Three numbered nodes with data directories, one core and 16 MiB each.
    let mut c = Cluster::controller(SMALL_POLICY, CTL_ARGS, &["--cores", "1", "--dram-gb", "0.015625"]);
    c.start_numbered(&[None, None, None], |_| Vec::new());
    let mut ctl = c.pollenctl();
    ctl.logs.extend(["n1.err", "n2.err", "n3.err"].iter().map(|f| c.dir.path().join(f)));
    let url = c.url.clone();
    let ids = ["n1", "n2", "n3"];
    let before: Vec<u64> = ids.iter().map(|id| used_dram(&ctl, id).expect("up")).collect();

    let j: JobEntry = ctl.json(&["job", "register", "wide", "--lambdas", "25", "--capacity", "16MiB"]);
    assert!(j.weights.values().all(|&w| w >= 0.15), "the job spans the three nodes: {:?}", j.weights);
    let home: u16 = j.node_id.trim_start_matches('n').parse().expect("node number");
    let away = (1..=3u16).rev().find(|&n| n != home).expect("a node other than the metadata node");
    let entry = wait_for(Duration::from_secs(10), "the weight map on the metadata node", || {
        let e = job_entry(&url, "wide");
        (e.weights_applied && e.node_addrs.len() == 3).then_some(e)
    });
    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job("wide").expect("job");
    let bs = client.block_size();
    let mut on: BTreeMap<u16, u64> = BTreeMap::new();
    for k in 0..40u64 {
        let data: Vec<u8> = (0..2 * bs).map(|b| ((b + k) % 251) as u8).collect();
        let name = format!("obj-{k}");
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put");
        for l in client.lookup(&job, &name).expect("lookup").blocks {
            *on.entry(l.node).or_default() += 1;
        }
    }
    let kept: Vec<u8> = (0..6 * bs).map(|b| (b % 253) as u8).collect();
    client
        .put_buffer(&job, "kept", &kept, PutOptions { persist: true, ..PutOptions::default() })
        .expect("PERSIST put");
    let mut kept_on: BTreeMap<u16, u64> = BTreeMap::new();
    for l in client.lookup(&job, "kept").expect("lookup").blocks {
        *kept_on.entry(l.node).or_default() += 1;
    }
    // A block of the job that no object names, on the node that will be away.
    client.alloc_block_at(&job, away, 0, dataplane::proto::tier::DRAM).expect("alloc on the away node");
    drop(client);
    let away_id = ids[away as usize - 1];
    let on_away = on.get(&away).copied().unwrap_or(0) + kept_on.get(&away).copied().unwrap_or(0) + 1;
    assert!(on_away > 1, "the away node holds blocks of the job: {on:?}");
    let holding = before[away as usize - 1] + on_away * bs;
    wait_for(Duration::from_secs(10), "the away node's blocks in its report", || {
        (used_dram(&ctl, away_id) == Some(holding)).then_some(())
    });

    // The node stops answering (its process and blocks are intact) and is declared dead.
    let pid = Pid::from_raw(c.nodes[away_id].0.as_ref().expect("running").id() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    wait_for(Duration::from_secs(10), "the stopped node declared down", || {
        used_dram(&ctl, away_id).is_none().then_some(())
    });
    let d: DeregisterResponse = ctl.json(&["job", "deregister", "wide"]);
    assert!(d.freed && d.note.is_none(), "{d:?}");
    assert_eq!(d.owed, vec![away], "the free is owed to the stopped node");
    for (i, id) in ids.iter().enumerate() {
        let n = i as u16 + 1;
        if n == away {
            continue;
        }
        let want = before[i] + kept_on.get(&n).copied().unwrap_or(0) * bs;
        wait_for(Duration::from_secs(10), "the job's blocks freed on the live nodes", || {
            (used_dram(&ctl, id) == Some(want)).then_some(())
        });
    }

    // The controller restarts on its data directory: the owed free survives.
    assert!(c.ctl.terminate().success());
    let saved =
        std::fs::read_to_string(c.dir.path().join("ctl-data/owed-frees.json")).expect("owed frees on disk");
    assert!(saved.contains("\"wide\""), "{saved}");
    let listen = url.trim_start_matches("http://").to_string();
    c.ctl = spawn_controller(c.dir.path(), &listen, CTL_ARGS).0;
    let status: StatusResponse = ctl.json(&["status"]);
    assert_eq!(status.owed_frees, 1);

    // The node runs again: its next heartbeat reply carries the free.
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let want = before[away as usize - 1] + kept_on.get(&away).copied().unwrap_or(0) * bs;
    wait_for(Duration::from_secs(15), "the owed free applied on the node that was away", || {
        (used_dram(&ctl, away_id) == Some(want)).then_some(())
    });
    wait_for(Duration::from_secs(10), "the free acknowledged", || {
        let s: StatusResponse = ctl.json(&["status"]);
        (s.owed_frees == 0).then_some(())
    });
    let events: EventsResponse = ctl.json(&["events"]);
    assert!(
        events.events.iter().any(|e| e.kind == EventKind::OwedFree && e.node.as_deref() == Some(away_id)),
        "{:?}",
        events.events
    );
    // The file is written by the controller's writer thread, just after the change.
    wait_for(Duration::from_secs(10), "the acknowledged free dropped from the file", || {
        let saved = std::fs::read_to_string(c.dir.path().join("ctl-data/owed-frees.json"))
            .expect("owed frees on disk");
        (!saved.contains("\"wide\"")).then_some(())
    });

    // The PERSIST object reads back whole once the job registers again.
    let _: JobEntry = ctl.json(&["job", "register", "wide", "--lambdas", "25", "--capacity", "16MiB"]);
    // The node that was away is live again once the controller has heard from it since the
    // restart; until then its number is missing from the job's addresses.
    let entry = wait_for(Duration::from_secs(10), "every node in the job's addresses", || {
        let e = job_entry(&url, "wide");
        (e.node_addrs.len() == 3).then_some(e)
    });
    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job("wide").expect("job");
    assert_eq!(client.get_buffer(&job, "kept").expect("the PERSIST object"), kept);

    c.stop();
}
