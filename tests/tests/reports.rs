//! A node's reports (the heartbeat body) show namespace changes without
//! waiting for more traffic: job summaries are published before an idle
//! core parks, also when a change is applied after the metadata log's
//! commit, a pass after the request.

use std::time::{Duration, Instant};

use dataplane::client::{Client, PutOptions};
use dataplane::node::{NetBackend, Node};
use dataplane::proto::JobHints;
use pollen_tests::TierDir;

const BS: usize = 4096;

/// Polls the node's report (no request to the node meanwhile) until `f`
/// holds, for at most 5 s.
fn wait_report(n: &Node, what: &str, f: impl Fn(&dataplane::report::NodeReport) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f(&n.report()) {
        assert!(Instant::now() < deadline, "the report never showed {what}: {:?}", n.report().jobs);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn changes_show_in_reports(durable: bool) {
    let dir = TierDir::new("reports");
    let cfg = dataplane::node::NodeConfig {
        data_dir: durable.then(|| dir.0.clone()),
        ..pollen_tests::node_config(1, NetBackend::Epoll, BS, 64)
    };
    let n = Node::start(cfg).expect("node");
    let mut c = Client::connect(n.addr()).expect("connect");
    let job = c.register_job("seen", JobHints::default()).expect("register");
    wait_report(&n, "the registered job", |r| r.jobs.iter().any(|j| j.name == "seen" && j.registered));
    c.put_buffer(&job, "obj", &[7u8; 3 * BS], PutOptions::default()).expect("put");
    wait_report(&n, "the object", |r| {
        r.jobs.iter().any(|j| j.name == "seen" && j.objects == 1 && j.bytes == 3 * BS as u64)
    });
    n.shutdown();
}

#[test]
fn changes_show_in_reports_in_memory() {
    changes_show_in_reports(false);
}

#[test]
fn changes_show_in_reports_with_the_metadata_log() {
    changes_show_in_reports(true);
}
