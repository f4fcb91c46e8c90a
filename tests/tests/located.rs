//! Objects whose blocks sit on other storage nodes (protocol version 2):
//! node numbers kept in the data directory, a metadata node that names
//! blocks on another node, a client that reads and writes them there, and a
//! metadata log of format version 1 replayed by today's node.

use std::process::{Command, Stdio};

use dataplane::client::{Client, Job, PutOptions};
use dataplane::node::{NetBackend, Node, NodeConfig, NodeError};
use dataplane::proto::{
    flags, tier, BlockId, BlockKey, DirEntry, JobHints, Location, ObjectMeta, Opcode, Status,
};
use pollen_tests::proc::{pollen_bin, NodeProc};
use pollen_tests::{bytes, node_config, raw_request as raw, TierDir};

const BS: usize = 4096;

fn args<'a>(number: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--cores", "2", "--block-size", "4KiB", "--dram-gb", "0.004", "--node-number", number];
    v.extend_from_slice(extra);
    v
}

/// A metadata node (number 1, with a data directory) and a storage node
/// (number 2), as `pollen node` processes; an object's blocks are put on
/// both, read back byte for byte, read by id on the node that holds them,
/// and freed on both by a delete.
#[test]
fn an_object_spread_over_two_nodes_is_put_read_and_deleted() {
    let dir = TierDir::new("located-two");
    let data = dir.0.display().to_string();
    let meta = NodeProc::start(&args("1", &["--data-dir", &data]));
    let store = NodeProc::start(&args("2", &[]));

    let mut c = Client::connect(meta.addr).unwrap();
    assert_eq!(c.node_number(), 1, "NodeInfo carries the node number");
    c.set_node_addrs([(2, store.addr)]);
    assert!(c.set_put_nodes(&[1, 2, 3]).is_err(), "node 3 has no address");
    c.set_put_nodes(&[1, 2]).unwrap();
    let job = c.register_job("spread", JobHints::default()).unwrap();

    // 9 blocks and a bit, over 2 nodes × 2 cores: both nodes hold blocks.
    let data1 = bytes(9 * BS + 123, 7);
    c.put_buffer(&job, "big", &data1, PutOptions::default()).unwrap();
    let m = c.lookup(&job, "big").unwrap();
    assert_eq!(m.blocks.len(), 10);
    let on = |n: u16| m.blocks.iter().filter(|l| l.node == n).count();
    // Round-robin over the four connections, node 1's cores first.
    assert_eq!((on(1), on(2)), (6, 4), "{m:?}");
    assert_eq!(c.get_buffer(&job, "big").unwrap(), data1);

    // The blocks on node 2 really are there: read by id from node 2 itself.
    let mut direct = Client::connect(store.addr).unwrap();
    assert_eq!(direct.node_number(), 2);
    for (i, l) in m.blocks.iter().enumerate().filter(|(_, l)| l.node == 2) {
        let want = &data1[i * BS..((i + 1) * BS).min(data1.len())];
        assert_eq!(direct.read_block(l.block, 0, BlockKey::TO_END).unwrap(), want, "block {i}");
    }

    // A second client reads the object through the metadata node too.
    let mut other = Client::connect(meta.addr).unwrap();
    other.set_node_addrs([(2, store.addr)]);
    assert_eq!(other.get_buffer(&job, "big").unwrap(), data1);
    // Without node 2's address the read fails with a clear error.
    let mut blind = Client::connect(meta.addr).unwrap();
    let e = blind.get_buffer(&job, "big").unwrap_err().to_string();
    assert!(e.contains("node 2") && e.contains("set_node_addrs"), "{e}");

    // A delete-after-read object spread over both nodes is gone after its read.
    let data2 = bytes(3 * BS, 8);
    let once = PutOptions { delete_after_read: true, ..PutOptions::default() };
    c.put_buffer(&job, "once", &data2, once).unwrap();
    let m2 = c.lookup(&job, "once").unwrap();
    assert_eq!(c.get_buffer(&job, "once").unwrap(), data2);
    assert_eq!(c.lookup(&job, "once").unwrap_err().status(), Some(Status::NotFound));

    // Deleting frees the blocks on both nodes: on node 1 by the metadata
    // node, on node 2 by the client (the Delete answer lists them).
    c.delete(&job, "big").unwrap();
    let mut home = Client::connect(meta.addr).unwrap();
    for l in m.blocks.iter().chain(&m2.blocks) {
        let node = if l.node == 1 { &mut home } else { &mut direct };
        // Frees of other cores' blocks land shortly after the answer: poll.
        let t = std::time::Instant::now();
        loop {
            match node.read_block(l.block, 0, 1) {
                Err(e) if e.status() == Some(Status::NotFound) => break,
                r => assert!(t.elapsed().as_secs() < 10, "{l:?} still readable: {r:?}"),
            }
            std::thread::yield_now();
        }
    }

    // An empty object names no node at all.
    c.put_buffer(&job, "empty", b"", PutOptions::default()).unwrap();
    assert!(c.lookup(&job, "empty").unwrap().blocks.is_empty());
    assert_eq!(c.get_buffer(&job, "empty").unwrap(), b"");
    drop((meta, store));
}

/// The metadata node takes locations on nodes it does not know as they are
/// (it cannot check them), answers Lookup with every location, refuses a
/// PERSIST object with a flash block elsewhere (it could not be marked),
/// and answers Delete with the blocks the client must free.
#[test]
fn put_object_keeps_remote_locations_and_delete_returns_them() {
    for net in [NetBackend::Epoll, NetBackend::Uring] {
        let n = Node::start(NodeConfig { node_number: Some(4), ..node_config(1, net, BS, 16) }).unwrap();
        assert_eq!(n.node_number(), 4);
        let mut c = Client::connect(n.addr()).unwrap();
        let job = c.register_job("j", JobHints::default()).unwrap();
        let local = c.alloc_block(&job, 0).unwrap();
        c.write_block(local, 0, &[1u8; BS]).unwrap();
        let far = |node, b| Location { node, block: BlockId(b) };
        let m = ObjectMeta {
            size: 3 * BS as u64,
            flags: 0,
            blocks: vec![far(9, 77), Location { node: 4, block: local }, far(300, 1 << 48)],
        };
        let mut body = Vec::new();
        m.encode(&mut body);
        assert_eq!(raw(n.addr(), Opcode::PutObject, 0, b"j/x", &body).0, Status::Ok as u16);
        assert_eq!(c.lookup(&job, "x").unwrap(), m);

        let p = ObjectMeta { size: 10, flags: flags::PERSIST, blocks: vec![far(9, 1 << 56)] };
        let mut body = Vec::new();
        p.encode(&mut body);
        let (st, msg) = raw(n.addr(), Opcode::PutObject, flags::PERSIST, b"j/p", &body);
        assert_eq!(st, Status::Malformed as u16);
        assert!(String::from_utf8_lossy(&msg).contains("PERSIST"), "{}", String::from_utf8_lossy(&msg));

        let (st, body) = raw(n.addr(), Opcode::Delete, 0, b"j/x", &[]);
        assert_eq!(st, Status::Ok as u16);
        let mut r = dataplane::proto::Reader::new(&body);
        let remote = dataplane::proto::decode_locations(&mut r, 10).unwrap();
        assert_eq!(remote, vec![far(9, 77), far(300, 1 << 48)], "the blocks on other nodes, in object order");
        let t = std::time::Instant::now();
        while c.read_block(local, 0, 1).is_ok() {
            assert!(t.elapsed().as_secs() < 10, "the local block was not freed");
            std::thread::yield_now();
        }
        // A directory's delete answers an empty body.
        c.create_dir(&job, "d").unwrap();
        assert_eq!(raw(n.addr(), Opcode::Delete, 0, b"j/d", &[]), (Status::Ok as u16, vec![]));
        n.shutdown();
    }
}

/// DeregisterJob's answer (the job id and the PERSIST objects' blocks on
/// other nodes) must fit the node's body limit, node table included: a job
/// whose list would not fit is refused with 6 and left registered; once it
/// keeps fewer blocks elsewhere it deregisters, with the whole list.
#[test]
fn a_deregister_answer_past_the_body_limit_is_refused() {
    let cfg = NodeConfig { node_number: Some(4), max_body: BS, ..node_config(1, NetBackend::Epoll, BS, 16) };
    let n = Node::start(cfg).unwrap();
    let mut c = Client::connect(n.addr()).unwrap();
    c.register_job("j", JobHints::default()).unwrap();
    // Each on its own node: 256 nodes, the most one list names.
    let wide: Vec<Location> =
        (0..256).map(|i| Location { node: 10 + i, block: BlockId(u64::from(i)) }).collect();
    // 150 more blocks on the first 150 of those nodes.
    let more: Vec<Location> =
        (0..150).map(|i| Location { node: 10 + i, block: BlockId(1000 + u64::from(i)) }).collect();
    for (path, blocks) in [("j/wide", &wide), ("j/more", &more)] {
        let meta =
            ObjectMeta { size: (blocks.len() * BS) as u64, flags: flags::PERSIST, blocks: blocks.clone() };
        let mut body = Vec::new();
        meta.encode(&mut body);
        assert!(body.len() <= BS);
        assert_eq!(
            raw(n.addr(), Opcode::PutObject, flags::PERSIST, path.as_bytes(), &body).0,
            Status::Ok as u16
        );
    }
    // 406 blocks: fewer than an object may have at this limit (453), but
    // with the 256-node table the answer takes 4 + 518 + 406 x 9 bytes.
    let (st, msg) = raw(n.addr(), Opcode::DeregisterJob, 0, b"j", &[]);
    assert_eq!(st, Status::TooLarge as u16, "{}", String::from_utf8_lossy(&msg));
    assert!(String::from_utf8_lossy(&msg).contains("delete some first"), "{}", String::from_utf8_lossy(&msg));
    let job = c.job("j").expect("still registered");
    assert_eq!(c.lookup(&job, "more").unwrap().blocks, more);
    // The client would free the listed blocks on their nodes; none run here.
    assert_eq!(raw(n.addr(), Opcode::Delete, 0, b"j/more", &[]).0, Status::Ok as u16);
    let (st, body) = raw(n.addr(), Opcode::DeregisterJob, 0, b"j", &[]);
    assert_eq!(st, Status::Ok as u16, "{}", String::from_utf8_lossy(&body));
    assert!(body.len() <= BS);
    assert_eq!(body[..4], job.id.to_le_bytes());
    let mut r = dataplane::proto::Reader::new(&body[4..]);
    assert_eq!(dataplane::proto::decode_locations(&mut r, 1000).unwrap(), wide);
    n.shutdown();
}

/// The node number is kept in the data directory: a restart without a
/// number keeps it, another number is refused, by the library and by
/// `pollen node`, with an error that says which number the directory has.
#[test]
fn the_node_number_is_kept_in_the_data_directory() {
    let dir = TierDir::new("located-number");
    let cfg = |number| NodeConfig {
        node_number: number,
        data_dir: Some(dir.0.clone()),
        ..node_config(1, NetBackend::Epoll, BS, 16)
    };
    let n = Node::start(cfg(Some(7))).unwrap();
    assert_eq!(Client::connect(n.addr()).unwrap().node_number(), 7);
    n.shutdown();
    assert_eq!(std::fs::read_to_string(dir.file("node-number")).unwrap(), "7\n");
    let n = Node::start(cfg(None)).unwrap();
    assert_eq!((n.node_number(), Client::connect(n.addr()).unwrap().node_number()), (7, 7));
    n.shutdown();
    match Node::start(cfg(Some(8))) {
        Err(e @ NodeError::NodeNumber { asked: 8, kept: 7, .. }) => {
            assert!(e.to_string().contains("--node-number 7"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a contradicting node number was accepted"),
    }

    let data = dir.0.display().to_string();
    let out = Command::new(pollen_bin())
        .args(["node", "--port", "0", "--no-pin", "--controller", "http://127.0.0.1:9", "--cores", "1"])
        .args(["--block-size", "4KiB", "--dram-gb", "0.004", "--data-dir", &data, "--node-number", "9"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "pollen node started with a contradicting number");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to node number 7"), "{err}");

    // A node without a data directory and without a number is node 0.
    let n = Node::start(node_config(1, NetBackend::Epoll, BS, 16)).unwrap();
    assert_eq!(Client::connect(n.addr()).unwrap().node_number(), 0);
    n.shutdown();
}

/// A metadata log written by the code before node numbers (format version
/// 1, `tests/fixtures/meta-v1`) replays on today's node: the job with its id
/// and hints, the directory, the empty object, the DRAM object as `data
/// unavailable` (its blocks were this node's, so a restart lost them), the
/// deleted object gone. The file is rewritten as version 2, and later
/// changes survive a restart on it.
#[test]
fn a_version_1_metadata_log_replays() {
    let dir = TierDir::new("located-v1");
    std::fs::create_dir_all(dir.file("meta")).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/meta-v1/core-0.log");
    std::fs::copy(&fixture, dir.file("meta/core-0.log")).unwrap();
    let cfg = || NodeConfig {
        node_number: Some(3),
        data_dir: Some(dir.0.clone()),
        ..node_config(1, NetBackend::Epoll, 64 << 10, 16)
    };
    let n = Node::start(cfg()).unwrap();
    let header = std::fs::read(dir.file("meta/core-0.log")).unwrap();
    assert_eq!(&header[0..8], b"PLNMETA\0");
    assert_eq!(u32::from_le_bytes(header[8..12].try_into().unwrap()), 2, "rewritten as version 2");

    let check = |c: &mut Client| {
        let job = c.job("v1job").unwrap();
        assert_eq!(job.id, 1);
        assert_eq!((job.hints.max_workers, job.hints.capacity), (7, 1 << 20));
        let dir_entry = DirEntry { name: "d".into(), is_dir: true, size: 0, flags: 0 };
        assert_eq!(c.enumerate(&job, "").unwrap()[0], dir_entry);
        let names: Vec<String> = c.enumerate(&job, "d").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["dram", "empty"]);
        assert_eq!(c.lookup(&job, "d/empty").unwrap().size, 0);
        assert_eq!(c.lookup(&job, "d/dram").unwrap_err().status(), Some(Status::DataUnavailable));
        assert_eq!(c.lookup(&job, "gone").unwrap_err().status(), Some(Status::NotFound));
        job
    };
    let mut c = Client::connect(n.addr()).unwrap();
    let job = check(&mut c);
    c.put_buffer(&job, "new", b"after", PutOptions { tier: Some(tier::DRAM), ..PutOptions::default() })
        .unwrap();
    let m = c.lookup(&job, "new").unwrap();
    assert!(m.blocks.iter().all(|l| l.node == 3), "{m:?}");
    drop(c);
    n.shutdown();

    let n = Node::start(cfg()).unwrap();
    let mut c = Client::connect(n.addr()).unwrap();
    check(&mut c);
    assert_eq!(c.lookup(&job, "new").unwrap_err().status(), Some(Status::DataUnavailable), "a DRAM object");
    n.shutdown();
}

/// `Place` draws a job's blocks by the weight map the metadata node holds
/// (`Node::set_job_weights`), and a client that knows other nodes puts
/// there: 1000 blocks of one job over three nodes, in proportion to the
/// weights within generous bounds; a node of weight 0 gets none.
#[test]
fn blocks_of_a_job_spread_by_its_weights() {
    // 1024 blocks per core: room for every block of the job on any one node.
    let cfg =
        |number| NodeConfig { node_number: Some(number), ..node_config(2, NetBackend::Epoll, BS, 1024) };
    let meta = Node::start(cfg(1)).unwrap();
    let two = Node::start(cfg(2)).unwrap();
    let three = Node::start(cfg(3)).unwrap();
    let mut c = Client::connect(meta.addr()).unwrap();
    let job = c.register_job("w", JobHints::default()).unwrap();

    // Without a weight map every block stays on the metadata node.
    assert_eq!(c.place(&job, 5).unwrap(), vec![1; 5]);
    let other = Job { name: "nope".into(), ..job.clone() };
    assert_eq!(c.place(&other, 1).unwrap_err().status(), Some(Status::NotFound));
    assert_eq!(c.place(&job, 0).unwrap_err().status(), Some(Status::Malformed));

    // Node 4 has weight 0 and no address: drawing it would fail the puts.
    let weights = [(1, 0.2), (2, 0.5), (3, 0.3), (4, 0.0)];
    assert!(meta.set_job_weights("w", &[(1, 1.5)]).is_err(), "weights are in [0, 1]");
    meta.set_job_weights("w", &weights).unwrap();
    assert_eq!(meta.job_weights("w").unwrap(), weights);
    c.set_node_addrs([(2, two.addr()), (3, three.addr())]);
    let mut objects = Vec::new();
    for i in 0..40 {
        let data = bytes(25 * BS, 100 + i);
        c.put_buffer(&job, &format!("o{i}"), &data, PutOptions::default()).unwrap();
        objects.push(data);
    }
    let mut count = std::collections::HashMap::new();
    for i in 0..40 {
        for l in c.lookup(&job, &format!("o{i}")).unwrap().blocks {
            *count.entry(l.node).or_insert(0u32) += 1;
        }
    }
    assert_eq!(count.values().sum::<u32>(), 1000);
    assert_eq!(count.get(&4), None);
    // Expected 200, 500, 300; one standard deviation is 13 to 16 blocks.
    for (node, want) in [(1u16, 200i64), (2, 500), (3, 300)] {
        let got = count.get(&node).copied().unwrap_or(0) as i64;
        assert!((got - want).abs() <= 80, "node {node}: {got} blocks, expected about {want} ({count:?})");
    }
    for (i, data) in objects.iter().enumerate().step_by(7) {
        assert_eq!(&c.get_buffer(&job, &format!("o{i}")).unwrap(), data, "object {i}");
    }
    // A map with no weight above 0 leaves nowhere to put.
    meta.set_job_weights("w", &[(2, 0.0)]).unwrap();
    let e = c.put_buffer(&job, "none", &[1; 10], PutOptions::default()).unwrap_err();
    assert_eq!(e.status(), Some(Status::NoCapacity), "{e}");
    // Without the map, puts go to the metadata node again.
    meta.remove_job_weights("w");
    c.put_buffer(&job, "home", &bytes(3 * BS, 9), PutOptions::default()).unwrap();
    assert!(c.lookup(&job, "home").unwrap().blocks.iter().all(|l| l.node == 1));
    for n in [meta, two, three] {
        n.shutdown();
    }
}

/// A storage node killed with SIGKILL and declared dead
/// (`Node::set_dead_nodes`): a lookup of an object with a block there
/// answers `data unavailable` at once, objects without one stay readable,
/// new puts go to live nodes only, a put naming the dead node is refused,
/// older dead sets are ignored, and a node that leaves the set is used again.
#[test]
fn dead_nodes_answer_data_unavailable_at_once() {
    let meta = Node::start(NodeConfig { node_number: Some(1), ..node_config(2, NetBackend::Epoll, BS, 256) })
        .unwrap();
    let store = NodeProc::start(&args("2", &[]));
    let mut c = Client::connect(meta.addr()).unwrap();
    c.set_node_addrs([(2, store.addr)]);
    let job = c.register_job("d", JobHints::default()).unwrap();
    meta.set_job_weights("d", &[(1, 0.5), (2, 0.5)]).unwrap();
    let spread = bytes(20 * BS, 1);
    c.put_buffer(&job, "spread", &spread, PutOptions::default()).unwrap();
    let m = c.lookup(&job, "spread").unwrap();
    assert!(m.blocks.iter().any(|l| l.node == 2) && m.blocks.iter().any(|l| l.node == 1), "{m:?}");
    c.set_put_nodes(&[1]).unwrap();
    let home = bytes(5 * BS, 2);
    c.put_buffer(&job, "home", &home, PutOptions::default()).unwrap();
    c.set_put_nodes(&[]).unwrap();

    drop(store.kill());
    assert_eq!(meta.dead_nodes(), (None, vec![]));
    assert!(meta.set_dead_nodes(7, &[2]));
    assert_eq!(meta.dead_nodes(), (Some(7), vec![2]));
    let t = std::time::Instant::now();
    let e = c.get_buffer(&job, "spread").unwrap_err();
    assert_eq!(e.status(), Some(Status::DataUnavailable), "{e}");
    assert!(e.to_string().contains("node 2"), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "answered at once, not after a timeout");
    assert_eq!(c.get_buffer(&job, "home").unwrap(), home, "objects on live nodes stay readable");

    // New puts go to live nodes: Place leaves node 2 out.
    for i in 0..5 {
        c.put_buffer(&job, &format!("new{i}"), &bytes(8 * BS, 10 + i), PutOptions::default()).unwrap();
        let m = c.lookup(&job, &format!("new{i}")).unwrap();
        assert!(m.blocks.iter().all(|l| l.node == 1), "{m:?}");
    }
    assert!(c.place(&job, 100).unwrap().iter().all(|&n| n == 1));
    // A put naming a block on the dead node is refused; so is Place when
    // every weighted node is dead.
    let m = ObjectMeta { size: 1, flags: 0, blocks: vec![Location { node: 2, block: BlockId(5) }] };
    let mut body = Vec::new();
    m.encode(&mut body);
    let (st, msg) = raw(meta.addr(), Opcode::PutObject, 0, b"d/x", &body);
    assert_eq!(st, Status::DataUnavailable as u16, "{}", String::from_utf8_lossy(&msg));
    meta.set_job_weights("d", &[(2, 1.0)]).unwrap();
    assert_eq!(c.place(&job, 1).unwrap_err().status(), Some(Status::DataUnavailable));

    // An older set is ignored; a newer one without node 2 brings it back.
    assert!(!meta.set_dead_nodes(6, &[]));
    assert_eq!(c.lookup(&job, "spread").unwrap_err().status(), Some(Status::DataUnavailable));
    assert!(meta.set_dead_nodes(8, &[]));
    assert!(c.lookup(&job, "spread").unwrap().blocks.iter().any(|l| l.node == 2));
    assert_eq!(c.place(&job, 3).unwrap(), vec![2; 3]);
    meta.shutdown();
}
