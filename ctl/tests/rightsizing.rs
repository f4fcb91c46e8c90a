//! Rightsizing end to end: `pollen up --nodes 1 --max-nodes 2 --cores 2`
//! with a small network band. Idle, the node's second core stops polling;
//! under load from a real client the controller turns it back on and then
//! adds a node; when the load stops it drains back to one node with one
//! polling core. Each step is checked in the event log and in what the
//! nodes themselves report.

use std::collections::BTreeMap;
use std::time::Duration;

use dataplane::client::{Client, PutOptions};
use pollen_ctl::api::{Event, EventKind, JobEntry};
use pollen_tests::control::{wait_for, ReadLoad, Up, PATIENT, RIGHTSIZING_POLICY};

/// Waits for an event matching `f`; on timeout, fails with the event log.
fn find(up: &Up, what: &str, f: impl Fn(&Event) -> bool) -> Event {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = up.events().events;
        if let Some(e) = events.iter().find(|e| f(e)) {
            return e.clone();
        }
        if std::time::Instant::now() > deadline {
            let log: Vec<String> =
                events.iter().map(|e| format!("{} {} {}", e.seq, e.kind, e.message)).collect();
            panic!("no event for {what} in 60 s; events:\n{}", log.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Node `node-0` alone, polling `n` cores.
fn only_node0(n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([("node-0".to_string(), n)])
}

#[test]
fn load_turns_a_core_on_and_adds_a_node_then_drains_back() {
    let mut up = Up::start(
        RIGHTSIZING_POLICY,
        &["--nodes", "1", "--max-nodes", "2", "--cores", "2", PATIENT[0], PATIENT[1]],
    );
    up.wait_open_nodes(1, "one node up");

    // Idle: the second core is turned off, by a command the node applies.
    find(&up, "an idle core turned off", |e| {
        e.kind == EventKind::Cores
            && e.message.contains("1 of 2 cores polling")
            && e.message.contains("rightsizing")
    });
    wait_for(Duration::from_secs(10), "node-0 reporting one polling core", || {
        (up.ctl.polling() == only_node0(1)).then_some(())
    });

    // Load: a client reads one 256 KiB object over and over.
    let job: JobEntry = up.ctl.json(&["job", "register", "load"]);
    let mut client = Client::connect(job.node_addr.as_str()).expect("connect");
    let j = client.job("load").expect("job on its node");
    let data = vec![42u8; 256 << 10];
    client.put_buffer(&j, "obj", &data, PutOptions::default()).expect("put");
    let before_load = up.events().last_seq;
    let load = ReadLoad::start(client, j, "obj", data.len());
    // Network (or, on a loaded machine, the cores' busy fraction) goes above its band.
    let on = find(&up, "a core turned on under load", |e| {
        e.kind == EventKind::Cores
            && e.seq > before_load
            && e.message.contains("2 of 2 cores polling")
            && e.message.contains("rightsizing")
    });
    let added = find(&up, "a node added under load", |e| {
        e.kind == EventKind::Scale && e.message.contains("is up") && e.message.contains("rightsizing")
    });
    assert!(added.seq > on.seq, "vertical before horizontal: {on:?} then {added:?}");
    up.wait_open_nodes(2, "two nodes under load");

    // The load stops: cores off, then the added node is drained and stopped.
    assert!(load.stop() > 0);
    let drained = find(&up, "the added node drained and stopped", |e| {
        e.kind == EventKind::Drain && e.message.contains("stopped") && e.seq > added.seq
    });
    let node = drained.node.clone().expect("drained node id");
    assert_ne!(node, "node-0", "the node holding the job's data is not the least used");
    up.wait_open_nodes(1, "back to one node");
    wait_for(Duration::from_secs(30), "back to one polling core", || {
        (up.ctl.polling() == only_node0(1)).then_some(())
    });
    let text = String::from_utf8_lossy(&up.ctl.ok(&["events"]).stdout).into_owned();
    assert!(text.contains("rightsizing"), "{text}");
    assert!(up.proc.terminate().success());
}

/// `pollenctl cores set` by hand (rightsizing off, so nothing undoes it):
/// the node applies it on its next heartbeat.
#[test]
fn cores_set_reaches_the_node() {
    let mut up =
        Up::start("[scaling]\nenabled = false\n", &["--nodes", "1", "--cores", "2", PATIENT[0], PATIENT[1]]);
    up.wait_open_nodes(1, "one node up");
    assert_eq!(up.ctl.polling(), only_node0(2));
    up.ctl.ok(&["cores", "set", "node-0", "1"]);
    wait_for(Duration::from_secs(10), "node-0 polling one core", || {
        (up.ctl.polling() == only_node0(1)).then_some(())
    });
    let table = String::from_utf8_lossy(&up.ctl.ok(&["cores"]).stdout).into_owned();
    assert!(table.contains("off ("), "{table}");
    up.ctl.ok(&["cores", "set", "node-0", "2"]);
    wait_for(Duration::from_secs(10), "node-0 polling two cores", || {
        (up.ctl.polling() == only_node0(2)).then_some(())
    });
    assert!(up.ctl.fails(&["cores", "set", "node-0", "3"]).contains("1..=2"));
    assert!(up.ctl.fails(&["cores", "set", "nope", "1"]).contains("404"));
    let ev = up.events();
    assert!(ev
        .events
        .iter()
        .any(|e| e.kind == EventKind::Cores && e.message.contains("asked by an operator")));
    assert!(up.proc.terminate().success());
}
