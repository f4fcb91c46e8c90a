//! A node that restarts (SIGKILL, then started again on its data
//! directory) comes back with a new boot id: with a controller and three
//! numbered `pollen node` processes, the objects naming its blocks of
//! before read as `data unavailable` (7), not `not found`, after it rejoins
//! and after the metadata node restarts too, while objects written later
//! read back.

use std::collections::BTreeMap;
use std::time::Duration;

use dataplane::client::{Client, PutOptions};
use dataplane::proto::Status;
use pollen_ctl::api::{EventKind, EventsResponse, JobEntry};
use pollen_tests::control::{wait_for, Cluster, SMALL_POLICY};

fn job_entry(url: &str, name: &str) -> JobEntry {
    let resp = ureq::get(format!("{url}/v1/jobs/{name}")).call().expect("GET /v1/jobs/NAME");
    resp.into_body().read_json().expect("job JSON")
}

/// A client connected to the job's metadata node, knowing every live node
/// (none while the controller still has a restarted node's old address).
fn try_client(url: &str, name: &str) -> Option<(Client, dataplane::client::Job)> {
    let entry = job_entry(url, name);
    let mut client = Client::connect(entry.node_addr.as_str()).ok()?;
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job(name).ok()?;
    Some((client, job))
}

fn client_for(url: &str, name: &str) -> (Client, dataplane::client::Job) {
    try_client(url, name).expect("a client of the job's metadata node")
}

/// What reading `name` gives: its bytes, or the status it failed with.
fn read(client: &mut Client, job: &dataplane::client::Job, name: &str) -> Result<Vec<u8>, Option<Status>> {
    client.get_buffer(job, name).map_err(|e| e.status())
}

#[test]
fn a_restarted_node_s_earlier_blocks_read_as_unavailable_not_missing() {
    // Three numbered nodes with data directories, one core and 16 MiB each.
    let mut c = Cluster::controller(SMALL_POLICY, &[], &["--cores", "1", "--dram-gb", "0.015625"]);
    c.start_numbered(&[None, None, None], |_| Vec::new());
    let mut ctl = c.pollenctl();
    ctl.logs.extend(["n1.err", "n2.err", "n3.err"].iter().map(|f| c.dir.path().join(f)));
    let url = c.url.clone();
    let ids = ["n1", "n2", "n3"];
    let j: JobEntry = ctl.json(&["job", "register", "wide", "--lambdas", "25", "--capacity", "16MiB"]);
    let home: u16 = j.node_id.trim_start_matches('n').parse().expect("node number");
    let away = (1..=3u16).rev().find(|&n| n != home).expect("a node other than the metadata node");
    wait_for(Duration::from_secs(10), "the weight map on the metadata node", || {
        let e = job_entry(&url, "wide");
        (e.weights_applied && e.node_addrs.len() == 3).then_some(())
    });
    let (mut client, job) = client_for(&url, "wide");
    let bs = client.block_size();
    // name → (bytes, the nodes holding its blocks)
    let mut objects: BTreeMap<String, (Vec<u8>, Vec<u16>)> = BTreeMap::new();
    for k in 0..30u64 {
        let data: Vec<u8> = (0..2 * bs).map(|b| ((b + 3 * k) % 251) as u8).collect();
        let name = format!("obj-{k}");
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put");
        let on: Vec<u16> =
            client.lookup(&job, &name).expect("lookup").blocks.iter().map(|l| l.node).collect();
        objects.insert(name, (data, on));
    }
    drop(client);
    let on_away = objects.values().filter(|(_, on)| on.contains(&away)).count();
    assert!(on_away > 0 && on_away < objects.len(), "objects on node {away}: {on_away} of 30");

    // SIGKILL and an immediate restart on the same data directory: a new
    // boot id, its DRAM blocks gone.
    let away_id = ids[away as usize - 1];
    let since = {
        let e: EventsResponse = ctl.json(&["events"]);
        e.last_seq
    };
    c.sigkill(away_id);
    c.restart_node(away_id);
    wait_for(Duration::from_secs(15), "the restart seen by its boot id", || {
        let e: EventsResponse = ctl.json(&["events", "--since", &since.to_string()]);
        e.events
            .iter()
            .any(|e| {
                e.kind == EventKind::NodeRestarted
                    && e.node.as_deref() == Some(away_id)
                    && e.message.contains("boot id")
            })
            .then_some(())
    });
    // Once the metadata node has marked them, the objects with a block there
    // answer 7 (and keep answering it), the others read back.
    let check = |client: &mut Client, job: &dataplane::client::Job| -> Result<(), String> {
        for (name, (data, on)) in &objects {
            let got = read(client, job, name);
            let want_lost = on.contains(&away);
            match (&got, want_lost) {
                (Err(Some(Status::DataUnavailable)), true) => {}
                (Ok(d), false) if d == data => {}
                _ => return Err(format!("{name} on {on:?}: {:?}", got.as_ref().map(Vec::len))),
            }
        }
        Ok(())
    };
    wait_for(Duration::from_secs(15), "the restarted node's objects marked lost", || {
        let (mut client, job) = try_client(&url, "wide")?;
        check(&mut client, &job).ok()
    });
    // The node takes new blocks again once the mark is applied, and they read back.
    let (mut client, job) = client_for(&url, "wide");
    let fresh: Vec<u8> = (0..bs).map(|b| (b % 241) as u8).collect();
    let mut k = 0;
    let landed = wait_for(Duration::from_secs(15), "a new block on the restarted node", || {
        k += 1;
        let name = format!("new-{k}");
        client.put_buffer(&job, &name, &fresh, PutOptions::default()).expect("put after the restart");
        let on = client.lookup(&job, &name).expect("lookup").blocks[0].node;
        (on == away).then_some(name)
    });
    assert_eq!(read(&mut client, &job, &landed), Ok(fresh.clone()));
    check(&mut client, &job).expect("the earlier objects stay lost after the node is used again");
    drop(client);

    // The marks are in the metadata node's log: after its own SIGKILL and
    // restart, the objects on the restarted node alone still answer 7.
    let home_id = ids[home as usize - 1];
    c.sigkill(home_id);
    c.restart_node(home_id);
    let only_away: Vec<&String> =
        objects.iter().filter(|(_, (_, on))| on.iter().all(|&n| n == away)).map(|(n, _)| n).collect();
    let elsewhere: Vec<&String> = objects
        .iter()
        .filter(|(_, (_, on))| !on.contains(&home) && !on.contains(&away))
        .map(|(n, _)| n)
        .collect();
    wait_for(Duration::from_secs(20), "the metadata node back with its marks", || {
        let (mut client, job) = try_client(&url, "wide")?;
        let lost = only_away.iter().all(|n| read(&mut client, &job, n) == Err(Some(Status::DataUnavailable)));
        let kept = elsewhere.iter().all(|n| read(&mut client, &job, n).as_ref() == Ok(&objects[*n].0));
        (lost && kept).then_some(())
    });

    c.stop();
}
