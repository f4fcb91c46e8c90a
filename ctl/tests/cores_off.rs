//! A core turned off stops taking new connections: a controller and a
//! two-core `pollen node` process, `pollenctl cores set n1 1`, and every new
//! connection to the node's port lands on core 0 (per-core connection counts
//! in `pollenctl cores --json`), while connections made before keep being
//! served; turned on again, core 1 takes its share again. On both kernel
//! transports (io_uring where the kernel has it).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::time::Duration;

use dataplane::client::{Client, PutOptions};
use dataplane::node::NetBackend;
use dataplane::transport::uring;
use pollen_ctl::api::NodesResponse;
use pollen_tests::control::{wait_for, Cluster, Pollenctl, PATIENT, SMALL_POLICY};

/// Connections each core accepted so far, and whether it takes new ones on
/// the shared port (the core's own report: it left the port's group, or
/// joined it again).
fn cores(ctl: &Pollenctl) -> BTreeMap<usize, (u64, bool)> {
    ctl.core_connections()
}

/// Opens `n` connections to `addr` and waits until the node's report counts
/// them; returns them (kept open) and how many each core took.
fn connect_many(ctl: &Pollenctl, addr: &str, n: u64) -> (Vec<TcpStream>, Vec<u64>) {
    ctl.connect_many(n, || TcpStream::connect(addr).expect("connect"))
}

fn run(net: NetBackend) {
    let mut c = Cluster::controller(SMALL_POLICY, &PATIENT, &["--cores", "2", "--dram-gb", "0.015625"]);
    c.start_node("n1", &["--net", &net.to_string()]);
    c.wait_nodes_up(1);
    let mut ctl = c.pollenctl();
    ctl.logs.push(c.dir.path().join("n1.err"));
    let nodes: NodesResponse = ctl.json(&["nodes"]);
    let report = &nodes.nodes[0].report;
    if net == NetBackend::Uring && uring::probe().is_ok() {
        assert_eq!(report.net, NetBackend::Uring, "io_uring is available: the node must run on it");
    }
    let addr = report.addr.clone();

    // Both cores on: the kernel spreads new connections over both.
    let (_on, spread) = connect_many(&ctl, &addr, 64);
    assert!(spread.iter().all(|&n| n > 0), "both cores take connections: {spread:?}");

    // Clients connected before core 1 goes off.
    let mut early: Vec<Client> = (0..4).map(|_| Client::connect(addr.as_str()).expect("client")).collect();

    ctl.ok(&["cores", "set", "n1", "1"]);
    wait_for(Duration::from_secs(10), "core 1 off", || (!cores(&ctl)[&1].1).then_some(()));
    let (_off, landed) = connect_many(&ctl, &addr, 64);
    assert_eq!(landed, vec![64, 0], "with core 1 off every new connection lands on core 0");
    // Connections made before still work (a core keeps what it owns).
    for (i, client) in early.iter_mut().enumerate() {
        let job = match client.job("early") {
            Ok(j) => j,
            Err(_) => client.register_job("early", Default::default()).expect("register"),
        };
        let data = vec![i as u8; 3000];
        let name = format!("o{i}");
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put on an earlier connection");
        assert_eq!(client.get_buffer(&job, &name).expect("get"), data);
    }

    // On again: core 1 takes new connections again.
    ctl.ok(&["cores", "set", "n1", "2"]);
    wait_for(Duration::from_secs(10), "core 1 on", || cores(&ctl)[&1].1.then_some(()));
    let (_again, spread) = connect_many(&ctl, &addr, 64);
    assert!(spread.iter().all(|&n| n > 0), "core 1 takes connections again: {spread:?}");

    drop(early);
    c.stop();
}

#[test]
fn an_off_core_takes_no_new_connections_on_epoll() {
    run(NetBackend::Epoll);
}

#[test]
fn an_off_core_takes_no_new_connections_on_io_uring() {
    run(NetBackend::Uring);
}
