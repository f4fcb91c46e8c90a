//! `pollen up --nodes N`: the controller's local provisioner runs the
//! storage nodes as processes; `pollenctl scale` and `drain` start and stop
//! them, and a registration that does not fit starts a node first.

use std::time::Duration;

use pollen_ctl::api::{DeregisterResponse, EventKind, JobEntry, JobsResponse, ScaleResponse};
use pollen_tests::control::{alive, wait_for, Up, PATIENT};

/// One-core nodes serve 100 MB/s; a worker drives 10 MB/s.
const POLICY: &str = r#"
[allocation]
per_worker_throughput = "10MB"
default_workers = 1
default_capacity = "1MiB"
core_throughput = "100MB"

[scaling]
enabled = false
"#;

#[test]
fn provisioner_scales_drains_and_grows_for_a_job() {
    let mut up =
        Up::start(POLICY, &["--nodes", "1", "--max-nodes", "3", "--cores", "1", PATIENT[0], PATIENT[1]]);
    up.wait_open_nodes(1, "one node up");
    assert_eq!(up.provisioned().len(), 1);

    // 15 lambdas x 10 MB/s = 150 MB/s does not fit on one 100 MB/s node:
    // registration starts a second node, waits for it, then packs over both.
    let j: JobEntry = up.ctl.json(&["job", "register", "wide", "--lambdas", "15"]);
    assert!(!j.overcommitted, "{j:?}");
    assert_eq!(j.weights.len(), 2, "{:?}", j.weights);
    let mut w: Vec<f64> = j.weights.values().copied().collect();
    w.sort_by(f64::total_cmp);
    assert!((w[0] - 1.0 / 3.0).abs() < 1e-6 && (w[1] - 2.0 / 3.0).abs() < 1e-6, "{w:?}");
    let ev = up.events();
    assert!(ev.events.iter().any(|e| e.kind == EventKind::Scale && e.message.contains("does not fit")));

    // scale --nodes 3 starts a third; a fourth is over --max-nodes.
    let r: ScaleResponse = up.ctl.json(&["scale", "--nodes", "3"]);
    assert_eq!((r.started.len(), r.open_nodes), (1, 3));
    up.wait_open_nodes(3, "three nodes up");
    let err = up.ctl.fails(&["scale", "--nodes", "4"]);
    assert!(err.contains("limit"), "{err}");

    // A node holding a live job's namespace is not drained: stopping it
    // would make every object of the job unreachable.
    let small: JobEntry = up.ctl.json(&["job", "register", "small"]);
    let home = small.node_id.clone();
    let err = up.ctl.fails(&["drain", &home]);
    assert!(err.contains("namespace") && err.contains("small"), "{err}");

    // Data on a node keeps a drained node running until the job's blocks
    // are freed; then the provisioner stops it. Of three nodes, one holds
    // no job's namespace: a client puts the object's blocks there.
    let nodes = up.nodes();
    let target = nodes
        .nodes
        .iter()
        .find(|n| n.report.node_id != home && n.report.node_id != j.node_id)
        .expect("a node holding no namespace");
    let (target_id, target_n) = (target.report.node_id.clone(), target.report.node_number);
    let data = vec![7u8; 200_000];
    {
        use dataplane::client::{Client, PutOptions};
        let mut c = Client::connect(small.node_addr.as_str()).expect("connect");
        c.set_node_addrs(small.node_addrs.iter().map(|(n, a)| (*n, a.parse().expect("address"))));
        c.set_put_nodes(&[target_n]).expect("the target node");
        let job = c.job("small").expect("job");
        c.put_buffer(&job, "obj", &data, PutOptions::default()).expect("put on the target node");
    }
    let pid = up.provisioned().iter().find(|n| n.node_id == target_id).and_then(|n| n.pid).expect("pid");
    let r: ScaleResponse = up.ctl.json(&["drain", &target_id]);
    assert_eq!(r.draining, vec![target_id.clone()]);
    let after: JobEntry = up.ctl.json(&["job", "register", "after-drain", "--lambdas", "1"]);
    assert_eq!(
        after.weights.get(&target_id).copied().unwrap_or(0.0),
        0.0,
        "a draining node takes no new data"
    );
    assert_ne!(after.node_id, target_id);
    // Still there, still serving the job, while its blocks are in use.
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(pid), "the draining node stopped with blocks in use");
    up.ctl.ok(&["get", "small", "obj", up.dir.path().join("out.bin").to_str().unwrap()]);
    assert_eq!(std::fs::read(up.dir.path().join("out.bin")).unwrap(), data);
    let d: DeregisterResponse = up.ctl.json(&["job", "deregister", "small"]);
    assert!(d.freed);
    wait_for(Duration::from_secs(20), "the drained node stopped", || (!alive(pid)).then_some(()));
    up.wait_open_nodes(2, "two nodes after the drain");
    assert!(up.events().events.iter().any(|e| e.kind == EventKind::Drain && e.message.contains("stopped")));

    // scale --nodes 1 drains the least-used node that holds no namespace;
    // with no data it stops at once.
    // The node that held after-drain's namespace is drainable once its own
    // report no longer lists the job (its next heartbeat): until then the
    // controller keeps it, so scaling down may drain nothing yet.
    let _: DeregisterResponse = up.ctl.json(&["job", "deregister", "after-drain"]);
    let r: ScaleResponse = wait_for(Duration::from_secs(10), "scale --nodes 1 drains a node", || {
        let r: ScaleResponse = up.ctl.json(&["scale", "--nodes", "1"]);
        (!r.draining.is_empty()).then_some(r)
    });
    assert_eq!((r.draining.len(), r.open_nodes), (1, 1));
    assert_ne!(r.draining[0], j.node_id, "wide's namespace stays");
    up.wait_open_nodes(1, "one node after scaling down");
    let jobs: JobsResponse = up.ctl.json(&["jobs"]);
    for j in &jobs.registered {
        let sum: f64 = j.weights.values().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{}: weights {:?}", j.name, j.weights);
    }

    // SIGTERM stops pollen up and every node it started.
    let pids: Vec<u32> = up.provisioned().iter().filter_map(|n| n.pid).collect();
    assert_eq!(pids.len(), 1);
    let status = up.proc.terminate();
    assert!(status.success(), "pollen up exited with {status}");
    for pid in pids {
        assert!(!alive(pid), "node process {pid} outlived pollen up");
    }
}

/// The local provisioner numbers its nodes (1, 2, ...); the controller hands
/// out number → address with every job, so pollenctl reads an object whose
/// blocks a client spread over both nodes.
#[test]
fn numbered_nodes_and_objects_over_several_nodes() {
    use dataplane::client::{Client, PutOptions};
    let mut up =
        Up::start(POLICY, &["--nodes", "2", "--max-nodes", "2", "--cores", "1", PATIENT[0], PATIENT[1]]);
    up.wait_open_nodes(2, "two nodes up");
    let nodes = up.nodes();
    let mut numbers: Vec<(String, u16)> =
        nodes.nodes.iter().map(|n| (n.report.node_id.clone(), n.report.node_number)).collect();
    numbers.sort();
    assert_eq!(numbers, vec![("node-0".to_string(), 1), ("node-1".to_string(), 2)]);

    let j: JobEntry = up.ctl.json(&["job", "register", "spread"]);
    assert_eq!(j.node_addrs.len(), 2, "{:?}", j.node_addrs);
    let mut c = Client::connect(j.node_addr.as_str()).expect("connect");
    c.set_node_addrs(j.node_addrs.iter().map(|(n, a)| (*n, a.parse().expect("address"))));
    c.set_put_nodes(&[1, 2]).expect("both nodes");
    let job = c.job("spread").expect("job");
    let data: Vec<u8> = (0..10 * 65536u32).map(|i| (i % 251) as u8).collect();
    c.put_buffer(&job, "obj", &data, PutOptions::default()).expect("put over two nodes");
    let meta = c.lookup(&job, "obj").expect("lookup");
    let mut on: Vec<u16> = meta.blocks.iter().map(|l| l.node).collect();
    on.sort();
    on.dedup();
    assert_eq!(on, vec![1, 2], "the object's blocks sit on both nodes");
    let out = up.dir.path().join("out.bin");
    up.ctl.ok(&["get", "spread", "obj", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(up.proc.terminate().success());
}
