//! A core that fails stops its whole node (docs/control-plane.md, "A core
//! that fails"): the other cores stop, the failure is kept and logged, and a
//! `pollen node` or `pollen up` process exits non-zero, so its supervisor
//! restarts it, rather than serving on with a core fewer. The failure is
//! the test-only `PollFault` (`POLLEN_TEST_FAIL_POLL`): the core's network
//! poll returns an error, or panics, once the core has executed a request.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use dataplane::client::Client;
use dataplane::node::{NetBackend, Node, NodeConfig, NodeFailure, PollFault, POLL_FAULT_ENV};
use pollen_ctl::api::NodeState;
use pollen_tests::control::{wait_for, Cluster, Up, SMALL_POLICY};
use pollen_tests::node_config;

/// How long a node may take from its core's failure to its exit: the
/// other cores finish their pass, heartbeats stop (one request at most).
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// A two-core node whose core 1 fails (`panic`: panics) on its first request.
fn failing_node(net: NetBackend, panic: bool) -> Node {
    let fault = PollFault { core: 1, after_requests: 1, panic };
    Node::start(NodeConfig { test_poll_fault: Some(fault), ..node_config(2, net, 4096, 64) }).expect("starts")
}

/// Sends core 1 a request (it may or may not answer before it fails).
fn poke_core_1(addr: SocketAddr) {
    // Connecting asks the main port for the node's info, which either core may answer.
    if let Ok(mut c) = Client::connect_timeout(addr, Duration::from_secs(5)) {
        let _ = c.ping(1, b"poke");
    }
}

fn stops_the_node(net: NetBackend, panic: bool) -> NodeFailure {
    let node = failing_node(net, panic);
    let (addr, cores) = (node.addr(), node.core_addrs());
    assert_eq!(node.failure(), None, "a node fails only once a core does");
    poke_core_1(addr);
    let failure = wait_for(EXIT_BOUND, "the node's failure", || node.failure());
    assert_eq!(failure.component, "core 1", "{failure}");
    // The failure stopped every core: wait returns it, join ends.
    assert_eq!(node.stop_handle().wait().as_ref(), Some(&failure));
    let t = Instant::now();
    assert_eq!(node.join().as_ref(), Some(&failure));
    assert!(t.elapsed() < EXIT_BOUND, "the cores took {:?} to stop", t.elapsed());
    // Core 0 stopped too: nothing listens on its port nor on the main one.
    for (a, what) in [(addr, "main port"), (cores[0], "core 0's port")] {
        assert!(TcpStream::connect(a).is_err(), "{a} ({what}) still accepts after the node stopped");
    }
    failure
}

fn a_failed_poll_stops_the_node(net: NetBackend) {
    let f = stops_the_node(net, false);
    assert!(f.reason.starts_with("network poll failed: "), "{f}");
    assert!(f.reason.contains(POLL_FAULT_ENV), "{f}");
}

fn a_panicked_core_stops_the_node(net: NetBackend) {
    let f = stops_the_node(net, true);
    assert!(f.reason.starts_with("panicked: core 1: network poll panic"), "{f}");
}

pollen_tests::on_both_backends!(a_failed_poll_stops_the_node, a_panicked_core_stops_the_node);

/// A node stopped as told has no failure.
#[test]
fn a_node_stopped_as_told_has_no_failure() {
    let node = pollen_tests::node(2, NetBackend::Epoll, 4096, 64);
    let handle = node.stop_handle();
    let waiter = std::thread::spawn(move || handle.wait());
    assert_eq!(node.shutdown(), None);
    assert_eq!(waiter.join().expect("waiter"), None);
}

/// Waits for `child` to exit within `EXIT_BOUND`.
fn exit_status(child: &mut std::process::Child, what: &str) -> ExitStatus {
    wait_for(EXIT_BOUND, what, || child.try_wait().expect("try_wait"))
}

/// `pollen node` whose core 1's poll fails: the process exits 1 within the
/// bound with the failure in its log, and the controller marks it down.
#[test]
fn a_node_process_whose_core_fails_exits_non_zero_and_goes_down() {
    for net in ["epoll", "uring"] {
        let mut c = Cluster::controller(SMALL_POLICY, &[], &["--dram-gb", "0.015625"]);
        c.start_node_env("n1", &["--cores", "2", "--net", net], &[(POLL_FAULT_ENV, "1:1")]);
        c.wait_nodes_up(1);
        let r = c.pollenctl().nodes();
        assert_eq!(r.nodes[0].report.cores.len(), 2);
        let addr: SocketAddr = r.nodes[0].report.addr.parse().expect("node address");
        let mut child = c.nodes.get_mut("n1").and_then(|r| r.0.take()).expect("n1 runs");

        let t = Instant::now();
        poke_core_1(addr);
        let status = exit_status(&mut child, "the node process to exit");
        eprintln!("{net}: the node exited {:?} after its core was poked: {status}", t.elapsed());
        assert_eq!(status.code(), Some(1), "{net}: {status}");
        let log = std::fs::read_to_string(c.path("n1.err")).expect("node log");
        let why = format!("the node stopped: core 1 failed: network poll failed: network poll error injected by {POLL_FAULT_ENV}");
        assert!(log.contains(&why), "{net}: the log does not say why:\n{log}");
        // Its heartbeats stopped with it: the controller declares it down.
        wait_for(Duration::from_secs(10), "the node down", || {
            let r = c.pollenctl().nodes();
            (r.nodes.iter().find(|n| n.report.node_id == "n1")?.state == NodeState::Down).then_some(())
        });
        c.stop();
    }
}

/// `pollen up` (controller and node in one process) whose only core
/// panics: the whole process exits 1, saying why.
#[test]
fn pollen_up_whose_core_panics_exits_non_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("policy.toml"), SMALL_POLICY).expect("policy");
    let args = [
        "--policy",
        "policy.toml",
        "--cores",
        "1",
        "--no-pin",
        "--dram-gb",
        "0.015625",
        "--ctl-port",
        "0",
        "--heartbeat-ms",
        "100",
    ];
    let (mut up, lc) = Up::spawn_env(dir, &args, &[(POLL_FAULT_ENV, "0:1:panic")]);
    let addr: SocketAddr = lc.node.parse().expect("node address");
    if let Ok(mut c) = Client::connect_timeout(addr, Duration::from_secs(5)) {
        let _ = c.ping(0, b"poke");
    }
    let mut child = up.proc.0.take().expect("pollen up runs");
    let status = exit_status(&mut child, "pollen up to exit");
    assert_eq!(status.code(), Some(1), "{status}\n{}", up.logs());
    let logs = up.logs();
    assert!(
        logs.contains("pollen: error: the node stopped: core 0 failed: panicked: core 0: network poll panic"),
        "{logs}"
    );
    // It cleaned up after itself: pollenctl no longer finds it.
    assert!(!up.path("pollen-data/pollen.json").exists(), "pollen.json left behind");
}
