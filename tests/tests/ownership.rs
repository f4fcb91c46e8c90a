//! Block ownership across a cluster: storage nodes own blocks by the job id
//! *and* the number of the job's metadata node, so two jobs with the same id
//! on different metadata nodes never free each other's blocks, and
//! deregistering a job frees its blocks on every node the client knows
//! (`FreeOwner`), PERSIST objects' blocks excepted. Nodes run in this
//! process; every request goes over TCP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dataplane::client::{Client, Job, PutOptions};
use dataplane::node::{NetBackend, Node, NodeConfig};
use dataplane::proto::{self, tier, BlockId, JobHints, Opcode, Status};
use pollen_tests::{bytes, node_config, raw_request};

const BS: usize = 4096;

fn start(number: u16) -> Node {
    Node::start(NodeConfig { node_number: Some(number), ..node_config(2, NetBackend::Epoll, BS, 256) })
        .unwrap()
}

/// Blocks in use on the node, over its cores and tiers (its report).
fn used(n: &Node) -> u64 {
    n.report().tiers.iter().map(|t| t.blocks_used).sum()
}

/// Polls the node's report until it shows `want` blocks in use (frees on
/// other cores land shortly after the answer), for at most 10 s.
fn wait_used(n: &Node, want: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used(n) != want {
        assert!(Instant::now() < deadline, "{what}: {} blocks in use, expected {want}", used(n));
        std::thread::yield_now();
    }
}

/// One raw request on a fresh connection; returns the status and body.
fn raw(addr: SocketAddr, op: Opcode, key: &[u8], body: &[u8]) -> (u16, Vec<u8>) {
    raw_request(addr, op, 0, key, body)
}

/// `BlockAlloc` of a DRAM block on the node at `addr` for job `id` of
/// metadata node `meta` (what a client of that metadata node sends).
fn alloc_raw(addr: SocketAddr, id: u32, meta: u16) -> BlockId {
    let mut key = id.to_le_bytes().to_vec();
    key.push(tier::DRAM);
    key.extend_from_slice(&meta.to_le_bytes());
    let (status, body) = raw(addr, Opcode::BlockAlloc, &key, &[]);
    assert_eq!(status, Status::Ok as u16, "{}", String::from_utf8_lossy(&body));
    BlockId(u64::from_le_bytes(body.try_into().unwrap()))
}

/// A name whose metadata core (on a node of `cores` cores) is `core`.
fn name_on_core(prefix: &str, core: usize, cores: usize) -> String {
    (0..).map(|i| format!("{prefix}{i}")).find(|n| proto::meta_core(n, cores) == core).unwrap()
}

/// Two metadata nodes hand out the same job id; both jobs keep blocks on a
/// third node. Deregistering one frees only its own blocks there: the
/// other job's objects read back byte for byte.
#[test]
fn equal_job_ids_of_two_metadata_nodes_do_not_share_blocks() {
    let (one, two, three) = (start(1), start(2), start(3));
    let addrs = [(1, one.addr()), (2, two.addr()), (3, three.addr())];
    let base3 = used(&three);

    let mut ca = Client::connect(one.addr()).unwrap();
    let mut cb = Client::connect(two.addr()).unwrap();
    ca.set_node_addrs(addrs);
    cb.set_node_addrs(addrs);
    ca.set_put_nodes(&[3]).unwrap();
    cb.set_put_nodes(&[3]).unwrap();
    let a = ca.register_job("alpha", JobHints::default()).unwrap();
    // Same metadata core, fresh nodes: the same id (the collision this fixes).
    let b_name = name_on_core("beta", proto::meta_core("alpha", 2), 2);
    let b = cb.register_job(&b_name, JobHints::default()).unwrap();
    assert_eq!(a.id, b.id, "both metadata nodes hand out the same first id");

    let da = bytes(5 * BS, 1);
    let db = bytes(7 * BS + 9, 2);
    ca.put_buffer(&a, "a", &da, PutOptions::default()).unwrap();
    cb.put_buffer(&b, "b", &db, PutOptions::default()).unwrap();
    assert!(cb.lookup(&b, "b").unwrap().blocks.iter().all(|l| l.node == 3));
    wait_used(&three, base3 + 5 + 8, "both jobs' blocks on node 3");

    ca.deregister_job(&a).unwrap();
    wait_used(&three, base3 + 8, "alpha's blocks freed on node 3, beta's kept");
    assert_eq!(cb.get_buffer(&b, "b").unwrap(), db, "beta's blocks survive alpha's deregistration");
    // A bulk free of the same job id for another metadata node frees nothing of beta's.
    let (status, _) =
        raw(three.addr(), Opcode::FreeOwner, &[&a.id.to_le_bytes()[..], &1u16.to_le_bytes()].concat(), &[]);
    assert_eq!(status, Status::Ok as u16);
    assert_eq!(cb.get_buffer(&b, "b").unwrap(), db);
    wait_used(&three, base3 + 8, "beta's blocks still there");

    cb.deregister_job(&b).unwrap();
    wait_used(&three, base3, "beta's blocks freed on node 3");
    for n in [one, two, three] {
        n.shutdown();
    }
}

/// A job with blocks on three nodes (objects spread over all three, a
/// PERSIST object, an unfinished put's blocks no object names, on every
/// node) is deregistered: every node's blocks in use return to what they
/// were before the job, but for the PERSIST object's, which reads back
/// once the job registers again.
#[test]
fn deregistering_frees_the_jobs_blocks_on_every_node_but_persist_ones() {
    let nodes = [start(1), start(2), start(3)];
    let addrs: Vec<(u16, SocketAddr)> = nodes.iter().zip(1u16..).map(|(n, i)| (i, n.addr())).collect();
    let before: Vec<u64> = nodes.iter().map(used).collect();

    let mut c = Client::connect(nodes[0].addr()).unwrap();
    c.set_node_addrs(addrs.clone());
    c.set_put_nodes(&[1, 2, 3]).unwrap();
    let job = c.register_job("spread", JobHints::default()).unwrap();
    for i in 0..4 {
        c.put_buffer(&job, &format!("o{i}"), &bytes(6 * BS + i, 10 + i as u64), PutOptions::default())
            .unwrap();
    }
    let kept = bytes(6 * BS, 99);
    let persist = PutOptions { persist: true, tier: Some(tier::DRAM), ..PutOptions::default() };
    c.put_buffer(&job, "kept", &kept, persist).unwrap();
    let kept_blocks = c.lookup(&job, "kept").unwrap().blocks;
    let kept_on = |n: u16| kept_blocks.iter().filter(|l| l.node == n).count() as u64;
    assert!((1..=3).all(|n| kept_on(n) > 0), "the PERSIST object is on all three nodes: {kept_blocks:?}");
    // Blocks allocated for the job but never put into an object, on every node.
    for (n, a) in &addrs {
        for _ in 0..3 {
            alloc_raw(*a, job.id, 1);
        }
        assert!(used(&nodes[*n as usize - 1]) > before[*n as usize - 1] + kept_on(*n) + 2, "node {n}");
    }

    c.deregister_job(&job).unwrap();
    for (i, n) in nodes.iter().enumerate() {
        let number = i as u16 + 1;
        wait_used(n, before[i] + kept_on(number), &format!("node {number} after deregistration"));
    }
    // The PERSIST object is still whole, on all three nodes.
    let again = c.register_job("spread", JobHints::default()).unwrap();
    assert_eq!(c.get_buffer(&again, "kept").unwrap(), kept);
    assert_eq!(c.lookup(&again, "o0").unwrap_err().status(), Some(Status::NotFound));

    // Deregistering again keeps the PERSIST blocks once more; deleting the
    // object frees them everywhere.
    c.deregister_job(&again).unwrap();
    let again = c.register_job("spread", JobHints::default()).unwrap();
    assert_eq!(c.get_buffer(&again, "kept").unwrap(), kept);
    c.delete(&again, "kept").unwrap();
    c.deregister_job(&again).unwrap();
    for (i, n) in nodes.iter().enumerate() {
        wait_used(n, before[i], &format!("node {} after the PERSIST object's delete", i + 1));
    }
    for n in nodes {
        n.shutdown();
    }
}

/// A node that cannot be reached keeps its blocks: the deregistration
/// still happens and the error names the node.
#[test]
fn an_unreachable_node_is_named_when_deregistering() {
    let one = start(1);
    let two = start(2);
    let mut c = Client::connect(one.addr()).unwrap();
    c.set_node_addrs([(2, two.addr())]);
    c.set_put_nodes(&[1, 2]).unwrap();
    let job: Job = c.register_job("gone", JobHints::default()).unwrap();
    c.put_buffer(&job, "x", &bytes(4 * BS, 3), PutOptions::default()).unwrap();
    let two_addr = two.addr();
    two.shutdown();
    c.set_node_addrs([(2, two_addr)]);
    let e = c.deregister_job(&job).unwrap_err().to_string();
    assert!(e.contains("node 2") && e.contains("could not be freed"), "{e}");
    assert_eq!(c.job("gone").unwrap_err().status(), Some(Status::NotFound), "deregistered all the same");
    // FreeOwner needs a 6-byte key and whole block ids.
    let (status, _) = raw(one.addr(), Opcode::FreeOwner, &[1, 0, 0, 0], &[]);
    assert_eq!(status, Status::Malformed as u16);
    let (status, _) = raw(one.addr(), Opcode::FreeOwner, &[1, 0, 0, 0, 1, 0], &[0; 5]);
    assert_eq!(status, Status::Malformed as u16);
    let (status, _) = raw(one.addr(), Opcode::FreeOwner, &[0xff, 0xff, 0xff, 0xff, 1, 0], &[]);
    assert_eq!(status, Status::Malformed as u16, "reserved job ids stay reserved");
    one.shutdown();
}
