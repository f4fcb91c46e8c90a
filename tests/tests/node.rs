//! The node end to end over real TCP on loopback, on both network backends.

use std::collections::HashSet;

use dataplane::client::{Client, ClientError, Job, PutOptions};
use dataplane::meta::cluster::DramShare;
use dataplane::node::{NetBackend, Node, NodeConfig, TierSpec};
use dataplane::proto::{
    flags, meta_core, tier, BlockId, BlockKey, JobHints, Opcode, Status, HEADER_LEN, MAGIC,
};
use dataplane::transport::uring as uring_transport;
use pollen_tests::raw::{End, Raw};
use pollen_tests::{bytes, node, node_config, start_node, TierDir};

const BS: usize = 4096;

fn start(net: NetBackend, cores: usize, blocks: u64) -> Node {
    let n = node(cores, net, BS, blocks);
    let r = n.report();
    if net == NetBackend::Uring && uring_transport::probe().is_ok() {
        assert_eq!(r.net, NetBackend::Uring, "io_uring is available, so the node must run on it");
    }
    if net != NetBackend::Uring {
        assert_eq!(r.net, net);
    }
    n
}

fn used_blocks(n: &Node) -> u64 {
    n.report().tiers.iter().map(|t| t.blocks_used).sum()
}

/// Waits until the node's cores have applied frees sent over their rings.
fn wait_used(n: &Node, want: u64) {
    for _ in 0..200 {
        if used_blocks(n) == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(used_blocks(n), want);
}

fn objects_of_every_size(net: NetBackend) {
    let n = start(net, 2, 256);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("sizes", JobHints::default()).unwrap();
    let sizes = [0, 1, BS - 1, BS, BS + 1, 7 * BS, 33 * BS + 17];
    for (i, &size) in sizes.iter().enumerate() {
        let data = bytes(size, i as u64 + 1);
        let name = format!("obj-{size}");
        c.put_buffer(&job, &name, &data, PutOptions::default()).unwrap();
        let meta = c.lookup(&job, &name).unwrap();
        assert_eq!(meta.size, size as u64);
        assert_eq!(meta.blocks.len(), size.div_ceil(BS));
        if meta.blocks.len() >= 2 {
            let cores: HashSet<u8> = meta.blocks.iter().map(|b| b.block.core()).collect();
            assert_eq!(cores.len(), 2, "blocks of a multi-block object are spread over the cores");
        }
        assert_eq!(c.get_buffer(&job, &name).unwrap(), data, "size {size}");
    }
    let listed: Vec<_> = c.enumerate(&job, "").unwrap().into_iter().map(|e| (e.name, e.size)).collect();
    assert_eq!(listed.len(), sizes.len());
    assert!(listed.contains(&("obj-4097".to_string(), 4097)));
    n.shutdown();
}

fn files_round_trip(net: NetBackend) {
    let n = start(net, 2, 2048);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("files", JobHints::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("pollen-files-{}-{net}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("in");
    let dst = dir.join("out");
    let data = bytes(5 << 20, 42);
    std::fs::write(&src, &data).unwrap();
    c.create_dir(&job, "d").unwrap();
    assert_eq!(c.put(&job, &src, "d/five", PutOptions::default()).unwrap(), 5 << 20);
    assert_eq!(c.get(&job, "d/five", &dst).unwrap(), 5 << 20);
    assert!(std::fs::read(&dst).unwrap() == data, "5 MiB file round-trips byte for byte");
    std::fs::remove_dir_all(&dir).unwrap();
    n.shutdown();
}

fn namespace_rules(net: NetBackend) {
    let n = start(net, 2, 64);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c
        .register_job(
            "ns",
            JobHints {
                latency_sensitive: true,
                spill_over: true,
                max_workers: 4,
                capacity: 1 << 20,
                peak_throughput: 0,
            },
        )
        .unwrap();
    let st = |r: Result<(), ClientError>| r.unwrap_err().status();
    assert_eq!(c.register_job("ns", JobHints::default()).unwrap_err().status(), Some(Status::Exists));
    assert_eq!(c.job("ns").unwrap(), job);
    let hints = c.job_info("ns").unwrap().hints;
    assert!(hints.latency_sensitive && hints.spill_over, "{hints:?}");
    assert_eq!(st(c.put_buffer(&job, "nodir/x", b"1", PutOptions::default())), Some(Status::NotFound));
    c.create_dir(&job, "a").unwrap();
    c.create_dir(&job, "a/b").unwrap();
    assert_eq!(st(c.create_dir(&job, "a")), Some(Status::Exists));
    c.put_buffer(&job, "a/b/x", b"first", PutOptions::default()).unwrap();
    assert_eq!(st(c.put_buffer(&job, "a/b/x", b"second", PutOptions::default())), Some(Status::Exists));
    assert_eq!(
        c.get_buffer(&job, "a/b/x").unwrap(),
        b"first",
        "a refused overwrite leaves the object intact"
    );
    wait_used(&n, 1); // the refused put gave its block back
    assert_eq!(st(c.delete(&job, "a/b")), Some(Status::Malformed));
    assert_eq!(c.enumerate(&job, "a").unwrap()[0].name, "b");
    c.delete(&job, "a/b/x").unwrap();
    c.delete(&job, "a/b").unwrap();
    assert_eq!(c.get_buffer(&job, "a/b/x").unwrap_err().status(), Some(Status::NotFound));
    assert_eq!(c.enumerate(&job, "a/b").unwrap_err().status(), Some(Status::NotFound));
    wait_used(&n, 0);
    let other = dataplane::client::Job { name: "ghost".into(), id: 5, hints: JobHints::default() };
    assert_eq!(c.lookup(&other, "x").unwrap_err().status(), Some(Status::NotFound));
    n.shutdown();
}

fn persist_and_delete_after_read(net: NetBackend) {
    let n = start(net, 2, 64);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("p", JobHints::default()).unwrap();
    let keep = bytes(3 * BS, 1);
    c.put_buffer(&job, "keep", &keep, PutOptions { persist: true, ..Default::default() }).unwrap();
    c.put_buffer(&job, "drop", &bytes(2 * BS, 2), PutOptions::default()).unwrap();
    c.put_buffer(&job, "once", b"read me once", PutOptions { delete_after_read: true, ..Default::default() })
        .unwrap();
    // Blocks allocated but never put into an object are the job's too.
    let orphan = c.alloc_block(&job, 1).unwrap();
    wait_used(&n, 3 + 2 + 1 + 1);

    assert_eq!(c.get_buffer(&job, "once").unwrap(), b"read me once");
    assert_eq!(c.get_buffer(&job, "once").unwrap_err().status(), Some(Status::NotFound));

    c.deregister_job(&job).unwrap();
    wait_used(&n, 3);
    assert_eq!(c.read_block(orphan, 0, 1).unwrap_err().status(), Some(Status::NotFound));
    assert_eq!(
        c.lookup(&job, "keep").unwrap_err().status(),
        Some(Status::NotFound),
        "a deregistered job is gone"
    );
    let again = c.register_job("p", JobHints::default()).unwrap();
    assert_ne!(again.id, job.id, "ids are never reused");
    assert_eq!(c.get_buffer(&again, "keep").unwrap(), keep, "PERSIST survives deregistration");
    assert_eq!(c.lookup(&again, "drop").unwrap_err().status(), Some(Status::NotFound));
    n.shutdown();
}

/// Readers A and B both read v1 of a DELETE_AFTER_READ object; B deletes
/// it; a writer puts v2 under the same name; A's delete after its read must
/// not remove v2, which was never read.
fn delete_after_read_spares_a_newer_object(net: NetBackend) {
    let n = start(net, 2, 64);
    let (mut a, mut b, mut w) = (
        Client::connect(n.addr()).unwrap(),
        Client::connect(n.addr()).unwrap(),
        Client::connect(n.addr()).unwrap(),
    );
    let job = w.register_job("dar", JobHints::default()).unwrap();
    let once = PutOptions { delete_after_read: true, ..Default::default() };
    let v1 = bytes(2 * BS + 5, 11);
    w.put_buffer(&job, "msg", &v1, once).unwrap();
    // A reads v1 as `get_buffer` does (lookup, then the blocks), but stops
    // before its delete.
    let meta_a = a.lookup(&job, "msg").unwrap();
    let mut read_a = Vec::new();
    for l in &meta_a.blocks {
        read_a.extend(a.read_block(l.block, 0, BlockKey::TO_END).unwrap());
    }
    assert_eq!(read_a, v1);
    // B reads v1 in full and deletes it.
    assert_eq!(b.get_buffer(&job, "msg").unwrap(), v1);
    wait_used(&n, 0);
    let v2 = bytes(3 * BS, 12);
    w.put_buffer(&job, "msg", &v2, once).unwrap();
    let meta_v2 = w.lookup(&job, "msg").unwrap();
    assert_ne!(meta_v2, meta_a);
    // A finishes its get: v1 is already gone, which is fine for A, and v2 stays.
    a.after_read(&job, "msg", &meta_a).unwrap();
    assert_eq!(a.lookup(&job, "msg").unwrap(), meta_v2);
    wait_used(&n, 3);
    // On the wire: Delete with the stale ObjectMeta as body answers 1 and
    // changes nothing; an empty body is the unconditional Delete.
    let key = format!("{}/msg", job.name);
    let mut raw = Raw::connect(n.core_addrs()[0]);
    let mut stale = Vec::new();
    meta_a.encode(&mut stale);
    raw.send(&Raw::frame(Opcode::Delete, 0, 1, key.as_bytes(), &stale));
    let r = raw.recv().expect("response");
    assert_eq!(r.header.status, Status::NotFound as u16);
    assert!(String::from_utf8_lossy(&r.body).contains("no longer the object read"), "{:?}", r.body);
    raw.send(&Raw::frame(Opcode::Delete, 0, 2, key.as_bytes(), b"junk"));
    assert_eq!(raw.recv().expect("response").header.status, Status::Malformed as u16);
    assert_eq!(a.lookup(&job, "msg").unwrap(), meta_v2);
    // v2 reads back in full, and that read deletes it.
    assert_eq!(a.get_buffer(&job, "msg").unwrap(), v2);
    assert_eq!(b.lookup(&job, "msg").unwrap_err().status(), Some(Status::NotFound));
    wait_used(&n, 0);
    // The plain Delete is unchanged.
    w.put_buffer(&job, "plain", b"x", PutOptions::default()).unwrap();
    raw.send(&Raw::frame(Opcode::Delete, 0, 3, format!("{}/plain", job.name).as_bytes(), &[]));
    let r = raw.recv().expect("response");
    assert_eq!(r.header.status, Status::Ok as u16);
    assert!(r.body.is_empty());
    assert_eq!(w.lookup(&job, "plain").unwrap_err().status(), Some(Status::NotFound));
    n.shutdown();
}

fn capacity_exhaustion(net: NetBackend) {
    let n = start(net, 2, 8); // 16 blocks in all
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("full", JobHints::default()).unwrap();
    let a = bytes(10 * BS, 7);
    c.put_buffer(&job, "a", &a, PutOptions::default()).unwrap();
    let err = c.put_buffer(&job, "b", &bytes(10 * BS, 8), PutOptions::default()).unwrap_err();
    assert_eq!(err.status(), Some(Status::NoCapacity), "{err}");
    assert_eq!(c.lookup(&job, "b").unwrap_err().status(), Some(Status::NotFound));
    wait_used(&n, 10);
    assert_eq!(c.get_buffer(&job, "a").unwrap(), a, "existing data is intact");
    c.put_buffer(&job, "c", &bytes(6 * BS, 9), PutOptions::default()).unwrap();
    n.shutdown();
}

fn block_api(net: NetBackend) {
    let n = start(net, 2, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("blk", JobHints::default()).unwrap();
    for core in 0..2 {
        let b = c.alloc_block(&job, core).unwrap();
        assert_eq!(b.core() as usize, core);
        assert_eq!(c.write_block(b, 0, b"hello").unwrap(), 5);
        assert_eq!(c.append_block(b, b", world").unwrap(), 12);
        assert_eq!(c.write_block(b, 7, b"W").unwrap(), 12);
        assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), b"hello, World");
        assert_eq!(c.read_block(b, 7, 3).unwrap(), b"Wor");
        assert_eq!(c.write_block(b, 13, b"x").unwrap_err().status(), Some(Status::Malformed), "no holes");
        assert_eq!(c.append_block(b, &vec![0; BS]).unwrap_err().status(), Some(Status::TooLarge));
        c.free_block(b).unwrap();
        assert_eq!(c.read_block(b, 0, 1).unwrap_err().status(), Some(Status::NotFound));
        assert_eq!(c.free_block(b).unwrap_err().status(), Some(Status::NotFound));
    }
    let bogus = BlockId::new(0, 1, 0, 9999);
    assert_eq!(c.read_block(bogus, 0, 1).unwrap_err().status(), Some(Status::NotFound));
    n.shutdown();
}

/// Requests pipelined on one connection are matched by id; a request that
/// another core executes is answered after a later local one.
fn pipelined_out_of_order(net: NetBackend) {
    let n = start(net, 2, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    // A job whose namespace lives on core 1, asked about on core 0's port.
    let name = (0..).map(|i| format!("job{i}")).find(|j| meta_core(j, 2) == 1).unwrap();
    let job = c.register_job(&name, JobHints::default()).unwrap();
    c.put_buffer(&job, "x", b"abc", PutOptions::default()).unwrap();
    let mut raw = Raw::connect(n.core_addrs()[0]);
    let mut batch = Vec::new();
    let lookup_key = format!("{name}/x");
    batch.extend(Raw::frame(Opcode::Lookup, 0, 100, lookup_key.as_bytes(), &[]));
    batch.extend(Raw::frame(Opcode::Ping, 0, 101, &[], b"ping"));
    for id in 102..132u64 {
        batch.extend(Raw::frame(Opcode::Ping, 0, id, &[], &id.to_le_bytes()));
    }
    raw.send(&batch);
    let mut order = Vec::new();
    for _ in 100..132 {
        let r = raw.recv().expect("response");
        assert_eq!(r.header.status, Status::Ok as u16);
        match r.header.request_id {
            100 => assert_eq!(r.header.opcode, Opcode::Lookup as u8),
            101 => assert_eq!(r.body, b"ping"),
            id => assert_eq!(r.body, id.to_le_bytes()),
        }
        order.push(r.header.request_id);
    }
    let set: HashSet<_> = order.iter().copied().collect();
    assert_eq!(set, (100..132).collect());
    assert_ne!(order[0], 100, "the forwarded lookup is answered after local pings: {order:?}");
    assert!(n.report().cores[0].forwarded >= 1);
    n.shutdown();
}

/// A client that shuts its write side after its requests (as `nc -N` does)
/// still gets every reply, a forwarded one included, and then EOF.
fn half_close_gets_replies(net: NetBackend) {
    let n = start(net, 2, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    // A job whose namespace lives on core 1, asked about on core 0's port.
    let name = (0..).map(|i| format!("job{i}")).find(|j| meta_core(j, 2) == 1).unwrap();
    let job = c.register_job(&name, JobHints::default()).unwrap();
    c.put_buffer(&job, "x", b"abc", PutOptions::default()).unwrap();
    let forwarded_before = n.report().cores[0].forwarded;
    let mut raw = Raw::connect(n.core_addrs()[0]);
    let mut batch = Vec::new();
    for id in 0..20u64 {
        batch.extend(Raw::frame(Opcode::Ping, 0, id, &[], &id.to_le_bytes()));
    }
    // Last, so the end of input arrives while its answer is still away.
    batch.extend(Raw::frame(Opcode::Lookup, 0, 20, format!("{name}/x").as_bytes(), &[]));
    raw.send(&batch);
    raw.0.shutdown(std::net::Shutdown::Write).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..=20 {
        let r = raw.recv().expect("a reply after the client's half-close");
        assert_eq!(r.header.status, Status::Ok as u16);
        match r.header.request_id {
            20 => assert_eq!(r.header.opcode, Opcode::Lookup as u8),
            id => assert_eq!(r.body, id.to_le_bytes()),
        }
        assert!(seen.insert(r.header.request_id), "reply {} twice", r.header.request_id);
    }
    assert_eq!(seen, (0..=20).collect());
    assert!(raw.closed(), "EOF after the last reply");
    assert!(n.report().cores[0].forwarded > forwarded_before, "the lookup was forwarded");
    n.shutdown();
}

fn malformed_frames_close_only_their_connection(net: NetBackend) {
    let n = start(net, 1, 16);
    let addr = n.core_addrs()[0];
    let mut good = Raw::connect(addr);
    let ping = Raw::frame(Opcode::Ping, 0, 1, &[], b"x");
    let patch = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = ping.clone();
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Vec<u8>, Status)> = vec![
        ("bad magic", patch(&|b| b[0] = 0), Status::Malformed),
        ("bad version", patch(&|b| b[2] = 7), Status::Malformed),
        ("unknown opcode", patch(&|b| b[3] = 0x7e), Status::Malformed),
        ("unknown flag", patch(&|b| b[4] = 0x80), Status::Malformed),
        ("status in request", patch(&|b| b[6] = 1), Status::Malformed),
        ("reserved bytes", patch(&|b| b[18] = 1), Status::Malformed),
        ("key too long", patch(&|b| b[16..18].copy_from_slice(&2000u16.to_le_bytes())), Status::TooLarge),
        ("body too long", patch(&|b| b[20..24].copy_from_slice(&u32::MAX.to_le_bytes())), Status::TooLarge),
    ];
    for (what, frame, status) in cases {
        let mut bad = Raw::connect(addr);
        bad.send(&frame);
        let r = bad.recv().unwrap_or_else(|| panic!("{what}: an error reply before closing"));
        assert_eq!(r.header.status, status as u16, "{what}");
        assert_ne!(r.header.flags & flags::CLOSING, 0, "{what}");
        let want_id = if what == "bad magic" { 0 } else { 1 };
        assert_eq!(r.header.request_id, want_id, "{what}");
        let end = bad.end();
        assert!(matches!(end, End::Eof), "{what}: connection not closed: {end:?}");
        good.send(&Raw::frame(Opcode::Ping, 0, 9, &[], b"still here"));
        assert_eq!(good.recv().unwrap().body, b"still here", "{what}: others are served");
    }
    // Bad key/body in a well-formed frame: an error, and the connection stays.
    good.send(&Raw::frame(Opcode::BlockRead, 0, 10, b"short", &[]));
    assert_eq!(good.recv().unwrap().header.status, Status::Malformed as u16);
    good.send(&Raw::frame(Opcode::RegisterJob, 0, 11, b"j", &[1, 2, 3]));
    assert_eq!(good.recv().unwrap().header.status, Status::Malformed as u16);
    good.send(&Raw::frame(Opcode::Lookup, 0, 12, &[0xff, 0xfe], &[]));
    assert_eq!(good.recv().unwrap().header.status, Status::Malformed as u16);
    good.send(&Raw::frame(Opcode::BlockAlloc, flags::PERSIST, 13, &1u32.to_le_bytes(), &[]));
    assert_eq!(good.recv().unwrap().header.status, Status::Malformed as u16);
    good.send(&Raw::frame(Opcode::Ping, 0, 14, &[], b"ok"));
    assert_eq!(good.recv().unwrap().body, b"ok");
    n.shutdown();
}

fn disconnect_mid_frame(net: NetBackend) {
    let n = start(net, 2, 16);
    for core in 0..2 {
        let addr = n.core_addrs()[core];
        // Half a header, then half a body, then gone.
        let mut r = Raw::connect(addr);
        r.send(&Raw::frame(Opcode::Ping, 0, 1, &[], &[0; 100])[..10]);
        drop(r);
        let mut r = Raw::connect(addr);
        r.send(&Raw::frame(Opcode::Ping, 0, 1, &[], &[0; 100])[..HEADER_LEN + 50]);
        drop(r);
        // A forwarded request whose connection vanishes before the answer.
        let mut r = Raw::connect(addr);
        r.send(&Raw::frame(Opcode::Lookup, 0, 1, b"nobody/x", &[]));
        drop(r);
    }
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("after", JobHints::default()).unwrap();
    c.put_buffer(&job, "x", &bytes(3 * BS, 1), PutOptions::default()).unwrap();
    assert_eq!(c.get_buffer(&job, "x").unwrap(), bytes(3 * BS, 1));
    assert_eq!(MAGIC, 0x4E50);
    n.shutdown();
}

fn concurrent_clients(net: NetBackend) {
    let n = start(net, 2, 1024);
    let addr = n.addr();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).unwrap();
                let job = c.register_job(&format!("w{t}"), JobHints::default()).unwrap();
                for i in 0..20 {
                    let data = bytes(i * 1500 + t, (t * 100 + i) as u64);
                    let name = format!("o{i}");
                    c.put_buffer(&job, &name, &data, PutOptions::default()).unwrap();
                    assert_eq!(c.get_buffer(&job, &name).unwrap(), data);
                }
                c.deregister_job(&job).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_used(&n, 0);
    let r = n.report();
    assert!(r.cores.iter().all(|c| c.requests > 0), "both cores served requests");
    n.shutdown();
}

fn backpressure_large_pipelines(net: NetBackend) {
    let n = start(net, 1, 64);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("bp", JobHints::default()).unwrap();
    let b = c.alloc_block(&job, 0).unwrap();
    c.write_block(b, 0, &bytes(BS, 5)).unwrap();
    // 3000 reads of 4 KiB (~12 MiB of replies) sent before reading anything:
    // the node must stop reading, not buffer without bound, and lose nothing.
    let mut raw = Raw::connect(n.core_addrs()[0]);
    let key = BlockKey { block: b, offset: 0, len: BlockKey::TO_END }.encode();
    let mut batch = Vec::new();
    for id in 0..3000u64 {
        batch.extend(Raw::frame(Opcode::BlockRead, 0, id, &key, &[]));
    }
    let mut w = raw.0.try_clone().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut w, &batch).unwrap());
    let want = bytes(BS, 5);
    for id in 0..3000u64 {
        let r = raw.recv().expect("reply");
        assert_eq!(r.header.request_id, id);
        assert!(r.body == want);
    }
    writer.join().unwrap();
    n.shutdown();
}

/// Far more forwarded requests than a ring (4096) or a connection's
/// in-flight limit hold, answered in full: overflowed replies must not be
/// stranded when cores park.
fn forwarding_floods_are_answered(net: NetBackend) {
    let n = start(net, 2, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("flood", JobHints::default()).unwrap();
    let b = c.alloc_block(&job, 1).unwrap();
    c.write_block(b, 0, b"0123456789abcdef").unwrap();
    let mut raw = Raw::connect(n.core_addrs()[0]);
    let key = BlockKey { block: b, offset: 0, len: 16 }.encode();
    const N: u64 = 30_000;
    let mut batch = Vec::new();
    for id in 0..N {
        batch.extend(Raw::frame(Opcode::BlockRead, 0, id, &key, &[]));
    }
    let mut w = raw.0.try_clone().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut w, &batch).unwrap());
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let r = raw.recv().expect("every forwarded request is answered");
        assert_eq!(r.body, b"0123456789abcdef");
        assert!(!std::mem::replace(&mut seen[r.header.request_id as usize], true));
    }
    writer.join().unwrap();
    // Other connections are not stuck behind the flood.
    assert_eq!(c.read_block(b, 0, 4).unwrap(), b"0123");
    n.shutdown();
}

/// A failed get or an oversized request leaves the client usable.
fn client_recovers_after_errors(net: NetBackend) {
    let n = start(net, 2, 64);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("recover", JobHints::default()).unwrap();
    c.put_buffer(&job, "x", &bytes(8 * BS, 3), PutOptions::default()).unwrap();
    let meta = c.lookup(&job, "x").unwrap();
    c.free_block(meta.blocks[2].block).unwrap();
    assert_eq!(c.get_buffer(&job, "x").unwrap_err().status(), Some(Status::NotFound));
    assert_eq!(c.ping(0, b"a").unwrap(), b"a");
    assert_eq!(c.ping(1, b"b").unwrap(), b"b");
    let b = c.alloc_block(&job, 0).unwrap();
    let too_big = vec![0u8; n.config().max_body + 1];
    assert_eq!(c.write_block(b, 0, &too_big).unwrap_err().status(), Some(Status::TooLarge));
    assert_eq!(c.ping(0, b"c").unwrap(), b"c");
    n.shutdown();
}

/// A directory listing larger than the node's body limit comes in pages.
fn large_directories_page(net: NetBackend) {
    let n = start(net, 2, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("big", JobHints::default()).unwrap();
    c.create_dir(&job, "d").unwrap();
    let max_body = c.node_info().max_body as usize;
    // Each entry costs 13 bytes plus its name: enough for about three pages.
    let name_len = 200;
    let count = 3 * max_body / (13 + name_len);
    let mut want = Vec::new();
    for i in 0..count {
        let name = format!("{i:0>200}");
        c.put_buffer(&job, &format!("d/{name}"), &[], PutOptions::default()).unwrap();
        want.push(name);
    }
    let got: Vec<_> = c.enumerate(&job, "d").unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(got, want);
    n.shutdown();
}

/// A node with a flash tier of `flash_blocks` blocks per core (and DRAM),
/// on a file in `dir`.
fn start_flash(net: NetBackend, cores: usize, dir: &TierDir, flash_blocks: u64) -> Node {
    start_node(flash_cfg(net, cores, dir, flash_blocks))
}

fn flash_cfg(net: NetBackend, cores: usize, dir: &TierDir, flash_blocks: u64) -> NodeConfig {
    // Per core: the superblock and header table take a few sectors beside the blocks.
    let per_core = (flash_blocks + 4) * BS as u64;
    NodeConfig {
        flash: Some(TierSpec { path: dir.file("flash"), size: Some(per_core * cores as u64) }),
        ..node_config(cores, net, BS, 64)
    }
}

/// Random writes at random offsets and sizes into one block of `t` on
/// `core`, each followed by a random read checked against a model; then odd
/// sizes by append across sector boundaries, and the block's limits.
fn random_read_after_write(c: &mut Client, job: &Job, t: u8, core: usize) {
    let mut rng = 0x9e3779b97f4a7c15u64 ^ (u64::from(t) << 32 | core as u64);
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    let b = c.alloc_block_on(job, core, t).unwrap();
    assert_eq!((b.tier(), b.core() as usize), (t, core));
    // A model of the block, grown and overwritten like the node's.
    let mut model: Vec<u8> = Vec::new();
    for round in 0..40 {
        let off = next(model.len() as u64 + 1) as usize;
        let len = (next(BS as u64 - off as u64) as usize + 1).min(BS - off);
        let data = bytes(len, (core * 100 + round) as u64 + 1);
        let new_len = c.write_block(b, off as u32, &data).unwrap();
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&data);
        assert_eq!(new_len as usize, model.len());
        let roff = next(model.len() as u64) as usize;
        let rlen = next((model.len() - roff) as u64 + 1) as u32;
        assert_eq!(c.read_block(b, roff as u32, rlen).unwrap(), &model[roff..roff + rlen as usize]);
    }
    assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), model, "tier {t} core {core}");
    // Odd sizes by append, across sector boundaries.
    let a = c.alloc_block_on(job, core, t).unwrap();
    let mut all = Vec::new();
    for (i, len) in [1usize, 2047, 2, 511, 1000].into_iter().enumerate() {
        let d = bytes(len, 77 + i as u64);
        all.extend_from_slice(&d);
        assert_eq!(c.append_block(a, &d).unwrap() as usize, all.len());
    }
    assert_eq!(c.read_block(a, 0, BlockKey::TO_END).unwrap(), all);
    assert_eq!(c.write_block(a, all.len() as u32 + 1, b"x").unwrap_err().status(), Some(Status::Malformed));
    assert_eq!(c.append_block(a, &vec![0; BS]).unwrap_err().status(), Some(Status::TooLarge));
    c.free_block(a).unwrap();
    assert_eq!(c.read_block(a, 0, 1).unwrap_err().status(), Some(Status::NotFound));
    c.free_block(b).unwrap();
}

/// The same read-after-write on every tier of a node that has all three,
/// on both cores; the disk tier runs the flash engine with its own policy.
fn every_tier_read_after_write(net: NetBackend) {
    let dir = TierDir::new("tiers-raw");
    let cfg = NodeConfig {
        disk: Some(TierSpec { path: dir.file("disk"), size: Some(2 * 36 * BS as u64) }),
        ..flash_cfg(net, 2, &dir, 32)
    };
    let n = start_node(cfg);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("tiers", JobHints::default()).unwrap();
    for t in [tier::DRAM, tier::FLASH, tier::DISK] {
        for core in 0..2 {
            random_read_after_write(&mut c, &job, t, core);
        }
    }
    n.shutdown();
}

/// Read-after-write on the flash tier at random offsets and odd sizes,
/// on every core; a tier the node lacks is `NotFound`.
fn flash_read_after_write(net: NetBackend) {
    let dir = TierDir::new("flash-raw");
    let n = start_flash(net, 2, &dir, 32);
    // On io_uring the flash engines run on each core's network ring (this
    // file cannot poll); on epoll they have rings of their own.
    for t in n.report().tiers.iter().filter(|t| t.tier == "flash") {
        let want = if n.report().net == NetBackend::Uring { "interrupt, shared ring" } else { "interrupt" };
        assert_eq!(t.mode.as_deref(), Some(want), "{t:?}");
    }
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("flash", JobHints::default()).unwrap();
    for core in 0..2 {
        random_read_after_write(&mut c, &job, tier::FLASH, core);
    }
    // Through the main port: requests for a flash block on the other core are forwarded.
    let b = c.alloc_block_on(&job, 1, tier::FLASH).unwrap();
    let mut r = Raw::connect(n.addr());
    let key = BlockKey { block: b, offset: 0, len: 5 }.encode();
    r.send(&Raw::frame(Opcode::BlockWrite, 0, 1, &key, b"hello"));
    let key = BlockKey { block: b, offset: 0, len: BlockKey::TO_END }.encode();
    r.send(&Raw::frame(Opcode::BlockRead, 0, 2, &key, &[]));
    let mut got = [r.recv().unwrap(), r.recv().unwrap()];
    got.sort_by_key(|x| x.header.request_id);
    assert_eq!(got[0].header.status, Status::Ok as u16);
    assert_eq!((got[1].header.status, got[1].body.as_slice()), (Status::Ok as u16, &b"hello"[..]));
    // No disk tier on this node.
    let err = c.alloc_block_on(&job, 0, tier::DISK).unwrap_err();
    assert_eq!(err.status(), Some(Status::NotFound));
    assert!(err.to_string().contains("no disk tier"), "{err}");
    assert_eq!(c.alloc_block_on(&job, 0, 9).unwrap_err().status(), Some(Status::NotFound));
    n.shutdown();
}

/// A full flash tier answers `no capacity`; freeing makes room again.
fn flash_tier_fills(net: NetBackend) {
    let dir = TierDir::new("flash-full");
    let n = start_flash(net, 1, &dir, 8);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("full", JobHints::default()).unwrap();
    let total = n.report().tiers.iter().find(|t| t.tier == "flash").unwrap().blocks_total;
    assert!(total >= 1);
    let mut blocks = Vec::new();
    for _ in 0..total {
        blocks.push(c.alloc_block_on(&job, 0, tier::FLASH).unwrap());
    }
    let err = c.alloc_block_on(&job, 0, tier::FLASH).unwrap_err();
    assert_eq!(err.status(), Some(Status::NoCapacity), "{err}");
    // DRAM is unaffected.
    c.alloc_block(&job, 0).unwrap();
    c.free_block(blocks.pop().unwrap()).unwrap();
    let b = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    assert_eq!(c.write_block(b, 0, b"room").unwrap(), 4);
    n.shutdown();
}

/// Several clients on several cores write and read flash blocks at once,
/// pipelined enough to fill the engines' queues (Busy is retried, not sent).
fn flash_concurrent_clients(net: NetBackend) {
    let dir = TierDir::new("flash-conc");
    let n = start_flash(net, 2, &dir, 256);
    let addr = n.addr();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).unwrap();
                let job = c.register_job(&format!("conc-{t}"), JobHints::default()).unwrap();
                let mut mine = Vec::new();
                for i in 0..40u64 {
                    let b = c.alloc_block_on(&job, (i % 2) as usize, tier::FLASH).unwrap();
                    let d = bytes(1 + (i as usize * 97) % BS, t * 1000 + i);
                    c.write_block(b, 0, &d).unwrap();
                    mine.push((b, d));
                }
                for (b, d) in &mine {
                    assert_eq!(&c.read_block(*b, 0, BlockKey::TO_END).unwrap(), d);
                }
            })
        })
        .collect();
    // A raw pipeline of 200 writes and reads on one block through the main port.
    let mut c = Client::connect(addr).unwrap();
    let job = c.register_job("pipe", JobHints::default()).unwrap();
    let b = c.alloc_block_on(&job, 1, tier::FLASH).unwrap();
    c.write_block(b, 0, &[0u8; 64]).unwrap();
    let mut r = Raw::connect(addr);
    let mut batch = Vec::new();
    for i in 0..200u64 {
        let key = BlockKey { block: b, offset: (i % 64) as u32, len: 1 }.encode();
        batch.extend(Raw::frame(Opcode::BlockWrite, 0, 2 * i, &key, &[i as u8]));
        let key = BlockKey { block: b, offset: (i % 64) as u32, len: 1 }.encode();
        batch.extend(Raw::frame(Opcode::BlockRead, 0, 2 * i + 1, &key, &[]));
    }
    r.send(&batch);
    for _ in 0..400 {
        let resp = r.recv().expect("every pipelined request is answered");
        assert_eq!(resp.header.status, Status::Ok as u16, "{:?}", String::from_utf8_lossy(&resp.body));
        let id = resp.header.request_id;
        if id % 2 == 1 {
            // Requests on one block run in order: each read sees its write.
            assert_eq!(resp.body, [(id / 2) as u8], "request {id}");
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    n.shutdown();
}

/// A node restarted on an existing flash file starts cleanly and serves no
/// stale data: the old run's block ids are not found.
fn flash_restart(net: NetBackend) {
    let dir = TierDir::new("flash-restart");
    let n = start_flash(net, 2, &dir, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("r", JobHints::default()).unwrap();
    let mut old = Vec::new();
    for core in 0..2 {
        let b = c.alloc_block_on(&job, core, tier::FLASH).unwrap();
        c.write_block(b, 0, b"old data").unwrap();
        old.push(b);
    }
    drop(c);
    n.shutdown();

    let n = start_flash(net, 2, &dir, 16);
    let used: u64 = n.report().tiers.iter().filter(|t| t.tier == "flash").map(|t| t.blocks_used).sum();
    assert_eq!(used, 0, "ephemeral blocks do not survive a restart");
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("r", JobHints::default()).unwrap();
    for b in &old {
        assert_eq!(c.read_block(*b, 0, 1).unwrap_err().status(), Some(Status::NotFound), "{b:?}");
        assert_eq!(c.write_block(*b, 0, b"x").unwrap_err().status(), Some(Status::NotFound));
    }
    // New blocks start empty, even where they reuse the old slots.
    for core in 0..2 {
        let b = c.alloc_block_on(&job, core, tier::FLASH).unwrap();
        assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), b"");
    }
    n.shutdown();
}

/// Objects on the flash tier: a put naming the tier round-trips and its
/// blocks are flash blocks; an object whose blocks span DRAM and flash is
/// readable; deleting frees the flash blocks.
fn flash_objects(net: NetBackend) {
    let dir = TierDir::new("flash-obj");
    let n = start_flash(net, 2, &dir, 64);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("objs", JobHints::default()).unwrap();
    let flash = PutOptions { tier: Some(tier::FLASH), ..PutOptions::default() };
    let mut placed = 0u64;
    for (i, size) in [0usize, 1, BS - 1, BS + 1, 9 * BS + 123].into_iter().enumerate() {
        let data = bytes(size, 500 + i as u64);
        let name = format!("f-{size}");
        c.put_buffer(&job, &name, &data, flash).unwrap();
        let meta = c.lookup(&job, &name).unwrap();
        assert!(meta.blocks.iter().all(|b| b.block.tier() == tier::FLASH), "{meta:?}");
        placed += meta.blocks.len() as u64;
        assert_eq!(c.get_buffer(&job, &name).unwrap(), data, "size {size}");
    }
    assert!(placed >= 13, "{placed}");
    let flash_used =
        |n: &Node| n.report().tiers.iter().filter(|t| t.tier == "flash").map(|t| t.blocks_used).sum::<u64>();
    // The cores publish their figures between passes: wait for the last puts'.
    for _ in 0..200 {
        if flash_used(&n) == placed {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = flash_used(&n);
    assert_eq!(before, placed, "the report counts every block the objects name");
    c.delete(&job, &format!("f-{}", 9 * BS + 123)).unwrap();
    for _ in 0..200 {
        if flash_used(&n) == before - 10 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(flash_used(&n), before - 10, "deleting an object frees its flash blocks");

    // An object spanning tiers: block 0 in DRAM on core 0, block 1 on flash on core 1.
    let (d0, d1) = (bytes(BS, 1), bytes(100, 2));
    let b0 = c.alloc_block(&job, 0).unwrap();
    let b1 = c.alloc_block_on(&job, 1, tier::FLASH).unwrap();
    c.write_block(b0, 0, &d0).unwrap();
    c.write_block(b1, 0, &d1).unwrap();
    let here = |block| dataplane::proto::Location { node: c.node_number(), block };
    let meta =
        dataplane::proto::ObjectMeta { size: (BS + 100) as u64, flags: 0, blocks: vec![here(b0), here(b1)] };
    let mut body = Vec::new();
    meta.encode(&mut body);
    let mut r = Raw::connect(n.addr());
    r.send(&Raw::frame(Opcode::PutObject, 0, 9, b"objs/mixed", &body));
    let resp = r.recv().unwrap();
    assert_eq!(resp.header.status, Status::Ok as u16, "{}", String::from_utf8_lossy(&resp.body));
    let mut want = d0.clone();
    want.extend_from_slice(&d1);
    assert_eq!(c.get_buffer(&job, "mixed").unwrap(), want);

    // A tier the node lacks fails the put.
    let disk = PutOptions { tier: Some(tier::DISK), ..PutOptions::default() };
    let err = c.put_buffer(&job, "nodisk", b"x", disk).unwrap_err();
    assert_eq!(err.status(), Some(Status::NotFound), "{err}");
    n.shutdown();
}

fn flash_used(n: &Node) -> u64 {
    n.report().tiers.iter().filter(|t| t.tier == "flash").map(|t| t.blocks_used).sum()
}

fn wait_flash_used(n: &Node, want: u64) {
    for _ in 0..200 {
        if flash_used(n) == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(flash_used(n), want);
}

/// The blocks of a PERSIST object on flash survive a clean restart (read by
/// id: the metadata naming them becomes durable in a later issue); those of
/// other objects, and of a deleted PERSIST object, do not. Recovered blocks
/// belong to no job of the new run, and freeing one clears its mark.
fn flash_persist_survives_restart(net: NetBackend) {
    let dir = TierDir::new("flash-persist");
    let n = start_flash(net, 2, &dir, 32);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("p", JobHints::default()).unwrap();
    let flash = PutOptions { tier: Some(tier::FLASH), ..PutOptions::default() };
    let keep = PutOptions { persist: true, ..flash };
    let kept = bytes(3 * BS + 100, 1);
    c.put_buffer(&job, "kept", &kept, keep).unwrap();
    c.put_buffer(&job, "plain", &bytes(2 * BS + 5, 2), flash).unwrap();
    c.put_buffer(&job, "deleted", &bytes(2 * BS, 3), keep).unwrap();
    let (mk, mp, md) = (
        c.lookup(&job, "kept").unwrap(),
        c.lookup(&job, "plain").unwrap(),
        c.lookup(&job, "deleted").unwrap(),
    );
    c.delete(&job, "deleted").unwrap();
    wait_flash_used(&n, (mk.blocks.len() + mp.blocks.len()) as u64);
    // A PERSIST put whose block cannot be marked (freed) fails and is undone.
    let b = c.alloc_block_on(&job, 1, tier::FLASH).unwrap();
    c.free_block(b).unwrap();
    let at = dataplane::proto::Location { node: c.node_number(), block: b };
    let meta = dataplane::proto::ObjectMeta { size: 10, flags: flags::PERSIST, blocks: vec![at] };
    let mut body = Vec::new();
    meta.encode(&mut body);
    let mut r = Raw::connect(n.addr());
    r.send(&Raw::frame(Opcode::PutObject, flags::PERSIST, 7, b"p/broken", &body));
    let resp = r.recv().unwrap();
    assert_eq!(resp.header.status, Status::NotFound as u16, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(c.lookup(&job, "broken").unwrap_err().status(), Some(Status::NotFound));
    drop((c, r));
    n.shutdown();

    let n = start_flash(net, 2, &dir, 32);
    assert_eq!(flash_used(&n), mk.blocks.len() as u64, "only the PERSIST object's blocks are kept");
    let mut c = Client::connect(n.addr()).unwrap();
    let check_kept = |c: &mut Client| {
        for (i, b) in mk.blocks.iter().enumerate() {
            let want = &kept[i * BS..((i + 1) * BS).min(kept.len())];
            assert_eq!(c.read_block(b.block, 0, BlockKey::TO_END).unwrap(), want, "block {i}");
        }
    };
    check_kept(&mut c);
    for b in mp.blocks.iter().chain(&md.blocks) {
        assert_eq!(c.read_block(b.block, 0, 1).unwrap_err().status(), Some(Status::NotFound), "{b:?}");
    }
    // The same job name gets the old run's job id; deregistering it leaves
    // the recovered blocks alone.
    let again = c.register_job("p", JobHints::default()).unwrap();
    assert_eq!(again.id, job.id, "job ids start over with the node");
    c.deregister_job(&again).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    check_kept(&mut c);
    // Freeing a recovered block clears its mark: gone after the next restart.
    c.free_block(mk.blocks[0].block).unwrap();
    drop(c);
    n.shutdown();

    let n = start_flash(net, 2, &dir, 32);
    assert_eq!(flash_used(&n), mk.blocks.len() as u64 - 1);
    let mut c = Client::connect(n.addr()).unwrap();
    assert_eq!(c.read_block(mk.blocks[0].block, 0, 1).unwrap_err().status(), Some(Status::NotFound));
    assert_eq!(c.read_block(mk.blocks[1].block, 0, BlockKey::TO_END).unwrap(), &kept[BS..2 * BS]);
    n.shutdown();
}

/// A loop device over a file, detached on drop.
struct LoopDev {
    dev: String,
    file: std::path::PathBuf,
}

impl LoopDev {
    /// Attaches `file` (created with `size` bytes), or says why it cannot.
    fn attach(file: std::path::PathBuf, size: u64) -> Result<LoopDev, String> {
        // Only root attaches loop devices (losetup says so otherwise).
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if !status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")) {
            return Err("not running as root".into());
        }
        std::fs::File::create(&file).and_then(|f| f.set_len(size)).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(LoopDev { dev: String::from_utf8_lossy(&out.stdout).trim().to_string(), file })
    }

    /// Shrinks the backing file to `size` bytes and the device with it:
    /// writes past the new end fail (ENOSPC), reads there find nothing (EIO).
    fn shrink(&self, size: u64) {
        std::fs::OpenOptions::new().write(true).open(&self.file).unwrap().set_len(size).unwrap();
        let st = std::process::Command::new("losetup").args(["--set-capacity", &self.dev]).status().unwrap();
        assert!(st.success(), "losetup --set-capacity {}", self.dev);
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["--detach", &self.dev]).status();
    }
}

/// More PERSIST puts of flash objects in flight than a core has I/O slots
/// (256 per engine), pipelined on one connection per job: every put is
/// answered, later flash requests are served, and the cores go back to
/// sleep. On two cores each job's metadata core marks blocks of the other,
/// which holds its own puts. The marks used to need a slot the puts held,
/// so no put was ever answered and the core spun.
fn flash_persist_puts_past_io_slots(net: NetBackend) {
    const PUTS: usize = 270;
    for cores in [1, 2] {
        let dir = TierDir::new("flash-persist-slots");
        let n = start_flash(net, cores, &dir, PUTS as u64 + 8);
        let mut c = Client::connect(n.addr()).unwrap();
        let here = c.node_number();
        // One job per core, each job's blocks on the next core.
        let names: Vec<String> = (0..cores)
            .map(|core| (0..).map(|i| format!("p{i}")).find(|j| meta_core(j, cores) == core).unwrap())
            .collect();
        let mut batches = Vec::new();
        let mut first = Vec::new();
        for (core, name) in names.iter().enumerate() {
            let job = c.register_job(name, JobHints::default()).unwrap();
            let mut batch = Vec::new();
            for i in 0..PUTS {
                let b = c.alloc_block_on(&job, (core + 1) % cores, tier::FLASH).unwrap();
                c.write_block(b, 0, &[i as u8]).unwrap();
                if i == 0 {
                    first.push(b);
                }
                let at = dataplane::proto::Location { node: here, block: b };
                let meta = dataplane::proto::ObjectMeta { size: 1, flags: flags::PERSIST, blocks: vec![at] };
                let mut body = Vec::new();
                meta.encode(&mut body);
                let key = format!("{name}/o{i}");
                batch.extend(Raw::frame(Opcode::PutObject, flags::PERSIST, i as u64, key.as_bytes(), &body));
            }
            batches.push(batch);
        }
        let mut conns: Vec<Raw> = batches.iter().map(|_| Raw::connect(n.addr())).collect();
        for (r, batch) in conns.iter_mut().zip(&batches) {
            r.send(batch);
        }
        for (j, r) in conns.iter_mut().enumerate() {
            let mut answered = HashSet::new();
            while answered.len() < PUTS {
                let resp = r.recv().unwrap_or_else(|| {
                    panic!("{cores} cores, job {j}: {} of {PUTS} PERSIST puts answered", answered.len())
                });
                let id = resp.header.request_id;
                assert_eq!(resp.header.status, 0, "put {id}: {}", String::from_utf8_lossy(&resp.body));
                assert!(answered.insert(id), "put {id} answered twice");
            }
        }
        for (core, name) in names.iter().enumerate() {
            let job = c.job(name).unwrap();
            assert_eq!(c.lookup(&job, &format!("o{}", PUTS - 1)).unwrap().flags, flags::PERSIST);
            assert_eq!(c.read_block(first[core], 0, 1).unwrap(), [0], "core {core}");
        }
        drop((c, conns));
        for core in 0..cores {
            assert!(parks_soon(&n, core), "{cores} cores: core {core} parks once idle");
        }
        n.shutdown();
    }
}

/// A flash tier whose device fails underneath the node (a loop device
/// shrunk to its first sectors): flash requests get an error status, not a
/// hang or a panic, and the node keeps serving DRAM requests.
fn flash_device_errors_reach_the_client(net: NetBackend) {
    let dir = TierDir::new("flash-eio");
    let dev = match LoopDev::attach(dir.file("backing"), 64 * BS as u64) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: no loop device ({why})");
            return;
        }
    };
    let cfg = NodeConfig {
        flash: Some(TierSpec { path: dev.dev.clone().into(), size: None }),
        ..flash_cfg(net, 1, &dir, 0)
    };
    let n = start_node(cfg);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("eio", JobHints::default()).unwrap();
    let blocks: Vec<BlockId> = (0..4).map(|_| c.alloc_block_on(&job, 0, tier::FLASH).unwrap()).collect();
    for &b in &blocks[..2] {
        c.write_block(b, 0, b"before the failure").unwrap();
    }
    // Keep the superblock and header table; lose every block.
    dev.shrink(2 * BS as u64);
    let err = c.read_block(blocks[0], 0, BlockKey::TO_END).unwrap_err();
    assert_eq!(err.status(), Some(Status::Internal), "a read the device cannot serve: {err}");
    assert!(err.to_string().contains("I/O error"), "{err}");
    let err = c.write_block(blocks[2], 0, b"after").unwrap_err();
    assert!(matches!(err.status(), Some(Status::NoCapacity | Status::Internal)), "a failed write: {err}");
    let err = c.append_block(blocks[1], b" and after").unwrap_err();
    assert!(err.status().is_some(), "a failed append: {err}");
    let r = c.put_buffer(
        &job,
        "on-flash",
        &bytes(BS + 1, 4),
        PutOptions { tier: Some(tier::FLASH), ..PutOptions::default() },
    );
    assert!(r.unwrap_err().status().is_some(), "a put on the failed tier gets a status");
    // DRAM is unaffected.
    let data = bytes(3 * BS + 7, 5);
    let dram = PutOptions { tier: Some(tier::DRAM), ..PutOptions::default() };
    c.put_buffer(&job, "in-dram", &data, dram).unwrap();
    assert_eq!(c.get_buffer(&job, "in-dram").unwrap(), data);
    // Cores publish tier figures every 100 ms (and before parking).
    let flash_errors =
        || -> u64 { n.report().tiers.iter().filter(|t| t.tier == "flash").map(|t| t.io_errors).sum() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while flash_errors() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(flash_errors() >= 1, "I/O errors are counted in the tier's report");
    drop(c);
    n.shutdown();
}

/// Read-after-write at random offsets and sizes on flash and disk tiers
/// that are block devices (two loop devices), on both cores: the engine
/// runs on the devices directly, not on a file system's file. Root only;
/// the devices are detached when the test ends, passed or not (`LoopDev`
/// is dropped after the node).
fn loop_device_tiers_read_after_write(net: NetBackend) {
    let dir = TierDir::new("loop-raw");
    let mut devs = Vec::new();
    for name in ["flash-backing", "disk-backing"] {
        match LoopDev::attach(dir.file(name), 2 * 40 * BS as u64) {
            Ok(d) => devs.push(d),
            Err(why) => {
                eprintln!("skipped: no loop device ({why})");
                return;
            }
        }
    }
    let cfg = NodeConfig {
        flash: Some(TierSpec { path: devs[0].dev.clone().into(), size: None }),
        disk: Some(TierSpec { path: devs[1].dev.clone().into(), size: None }),
        ..flash_cfg(net, 2, &dir, 0)
    };
    let n = start_node(cfg);
    let r = n.report();
    for (tier, dev) in [("flash", &devs[0]), ("disk", &devs[1])] {
        let rows: Vec<_> = r.tiers.iter().filter(|t| t.tier == tier).collect();
        assert_eq!(rows.len(), 2, "{:?}", r.tiers);
        for t in rows {
            assert_eq!(t.path.as_deref(), Some(dev.dev.as_str()), "{t:?}");
            assert!(t.blocks_total >= 2, "{t:?}");
        }
    }
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("loop", JobHints::default()).unwrap();
    for t in [tier::FLASH, tier::DISK] {
        for core in 0..2 {
            random_read_after_write(&mut c, &job, t, core);
        }
    }
    drop(c);
    n.shutdown();
}

/// A node asked for SQPOLL (`--sqpoll`) runs its flash rings with it when
/// the kernel allows it (asked directly here), else reports that it was
/// refused and what runs instead; either way reads follow writes.
fn flash_sqpoll_read_after_write(net: NetBackend) {
    let dir = TierDir::new("flash-sqpoll");
    let n = start_node(NodeConfig { sqpoll: true, ..flash_cfg(net, 2, &dir, 32) });
    let allowed: Result<io_uring::IoUring, String> =
        io_uring::IoUring::builder().setup_sqpoll(10).build(4).map_err(|e| e.to_string());
    let rows: Vec<_> = n.report().tiers.into_iter().filter(|t| t.tier == "flash").collect();
    assert_eq!(rows.len(), 2);
    for t in &rows {
        let mode = t.mode.as_deref().unwrap_or_default();
        match &allowed {
            // A file cannot poll completions: SQPOLL alone, on a ring of the
            // engine's own (never the network's).
            Ok(_) => assert_eq!(mode, "sqpoll", "{t:?}"),
            Err(why) => assert!(mode.starts_with("interrupt (sqpoll refused: "), "{why}: {t:?}"),
        }
    }
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("sqpoll", JobHints::default()).unwrap();
    for core in 0..2 {
        random_read_after_write(&mut c, &job, tier::FLASH, core);
    }
    drop(c);
    n.shutdown();
}

fn dram_used(n: &Node) -> u64 {
    n.report().tiers.iter().filter(|t| t.tier == "dram").map(|t| t.blocks_used).sum()
}

fn dram_total(n: &Node) -> u64 {
    n.report().tiers.iter().filter(|t| t.tier == "dram").map(|t| t.blocks_total).sum()
}

/// One core with `dram_blocks` DRAM blocks and `flash_blocks` flash blocks.
fn start_small(net: NetBackend, dir: &TierDir, dram_blocks: u64, flash_blocks: u64) -> Node {
    let cfg =
        NodeConfig { dram_bytes_per_core: dram_blocks * BS as u64, ..flash_cfg(net, 1, dir, flash_blocks) };
    start_node(cfg)
}

/// Pocket's placement for a latency-sensitive job larger than DRAM: the
/// first blocks in DRAM, the rest on flash, without asking for spill-over.
fn latency_sensitive_job_fills_dram_then_flash(net: NetBackend) {
    let dir = TierDir::new("place-ls");
    let n = start_small(net, &dir, 8, 32);
    let dram = dram_total(&n);
    assert!((1..20).contains(&dram), "{dram}");
    let mut c = Client::connect(n.addr()).unwrap();
    assert!(c.node_info().has_tier(tier::FLASH) && !c.node_info().has_tier(tier::DISK));
    let hints = JobHints { latency_sensitive: true, ..JobHints::default() };
    let job = c.register_job("ls", hints).unwrap();
    let data = bytes(20 * BS + 5, 31);
    c.put_buffer(&job, "big", &data, PutOptions::default()).unwrap();
    let meta = c.lookup(&job, "big").unwrap();
    let tiers: Vec<u8> = meta.blocks.iter().map(|b| b.block.tier()).collect();
    let split = dram as usize;
    assert!(tiers[..split].iter().all(|&t| t == tier::DRAM), "{tiers:?}");
    assert!(tiers[split..].iter().all(|&t| t == tier::FLASH), "{tiers:?}");
    assert_eq!(c.get_buffer(&job, "big").unwrap(), data);
    // The job as looked up by name carries the same hints, so the same placement.
    let again = c.job("ls").unwrap();
    assert_eq!(again.hints, hints);
    assert_eq!(c.placement(&again, None), tier::DRAM | tier::SPILL);
    c.delete(&job, "big").unwrap();
    wait_used(&n, 0);
    n.shutdown();
}

/// A latency-sensitive job with a DRAM share on the node (what the
/// controller sets: its DRAM allocation times the node's weight) keeps
/// that much in DRAM and puts the rest on flash, while DRAM is still free;
/// a job without a share goes on using DRAM; a newer share replaces the
/// old, an older one is ignored.
fn dram_share_then_flash(net: NetBackend) {
    let dir = TierDir::new("place-share");
    let n = start_small(net, &dir, 16, 32);
    let mut c = Client::connect(n.addr()).unwrap();
    let hints = JobHints { latency_sensitive: true, ..JobHints::default() };
    let shared = c.register_job("shared", hints).unwrap();
    let other = c.register_job("other", hints).unwrap();
    let share = |job: &Job, blocks: u64| DramShare {
        metadata_node: n.node_number(),
        job: job.id,
        bytes: blocks * BS as u64 - 1,
    };
    assert!(n.set_dram_shares(5, &[share(&shared, 3)]).unwrap());
    assert_eq!(n.dram_shares(), (Some(5), vec![share(&shared, 3)]));

    let tiers_of = |c: &mut Client, job: &Job, name: &str| -> Vec<u8> {
        c.lookup(job, name).unwrap().blocks.iter().map(|b| b.block.tier()).collect()
    };
    let data = bytes(6 * BS, 51);
    c.put_buffer(&shared, "a", &data, PutOptions::default()).unwrap();
    // 3 blocks less a byte round up to 3 blocks of DRAM; 13 of 16 are still free.
    let want = [tier::DRAM, tier::DRAM, tier::DRAM, tier::FLASH, tier::FLASH, tier::FLASH];
    assert_eq!(tiers_of(&mut c, &shared, "a"), want);
    assert_eq!(c.get_buffer(&shared, "a").unwrap(), data);
    assert_eq!(dram_used(&n), 3);
    // No share: DRAM while it lasts.
    c.put_buffer(&other, "b", &bytes(4 * BS, 52), PutOptions::default()).unwrap();
    assert!(tiers_of(&mut c, &other, "b").iter().all(|&t| t == tier::DRAM));

    // An older version changes nothing; a newer one with a larger share does.
    assert!(!n.set_dram_shares(4, &[]).unwrap());
    assert!(n.set_dram_shares(6, &[share(&shared, 5)]).unwrap());
    c.put_buffer(&shared, "c", &bytes(3 * BS, 53), PutOptions::default()).unwrap();
    assert_eq!(tiers_of(&mut c, &shared, "c"), [tier::DRAM, tier::DRAM, tier::FLASH]);
    // Freed DRAM counts against the share no more.
    c.delete(&shared, "a").unwrap();
    wait_used(&n, 4 + 3);
    c.put_buffer(&shared, "d", &bytes(4 * BS, 54), PutOptions::default()).unwrap();
    assert_eq!(tiers_of(&mut c, &shared, "d"), [tier::DRAM, tier::DRAM, tier::DRAM, tier::FLASH]);
    // A reserved job id is refused, and the shares held stay.
    let bad = DramShare { metadata_node: 0, job: u32::MAX, bytes: 1 };
    assert!(n.set_dram_shares(7, &[bad]).is_err());
    assert_eq!(n.dram_shares().0, Some(6));
    // A share of nothing (the job got no DRAM): all on flash, DRAM free or not.
    let none = DramShare { metadata_node: n.node_number(), job: other.id, bytes: 0 };
    assert!(n.set_dram_shares(8, &[none]).unwrap());
    c.put_buffer(&other, "e", &bytes(2 * BS, 55), PutOptions::default()).unwrap();
    assert_eq!(tiers_of(&mut c, &other, "e"), [tier::FLASH, tier::FLASH]);
    n.shutdown();
}

/// A full tier: `no capacity` without spill-over, with nothing left
/// allocated and earlier data intact; with spill-over the rest goes one
/// tier down, and a tier with nothing below it still fills.
fn full_tier_spills_only_when_allowed(net: NetBackend) {
    let dir = TierDir::new("place-spill");
    let n = start_small(net, &dir, 8, 16);
    let (dram, flash) =
        (dram_total(&n), n.report().tiers.iter().find(|t| t.tier == "flash").unwrap().blocks_total);
    let mut c = Client::connect(n.addr()).unwrap();
    let strict = c.register_job("strict", JobHints::default()).unwrap();
    let spill = c.register_job("spill", JobHints { spill_over: true, ..JobHints::default() }).unwrap();
    let on_dram = PutOptions { tier: Some(tier::DRAM), ..PutOptions::default() };
    let kept = bytes(2 * BS, 40);
    c.put_buffer(&strict, "kept", &kept, on_dram).unwrap();

    // Without spill-over: no capacity, and the blocks the put took are given back.
    let big = bytes((dram as usize + 2) * BS, 41);
    let err = c.put_buffer(&strict, "big", &big, on_dram).unwrap_err();
    assert_eq!(err.status(), Some(Status::NoCapacity), "{err}");
    assert_eq!(c.lookup(&strict, "big").unwrap_err().status(), Some(Status::NotFound));
    wait_used(&n, 2);
    assert_eq!((dram_used(&n), flash_used(&n)), (2, 0), "nothing leaked, nothing spilled");
    assert_eq!(c.get_buffer(&strict, "kept").unwrap(), kept, "earlier data is intact");

    // With spill-over: the DRAM that is left, then flash.
    c.put_buffer(&spill, "big", &big, on_dram).unwrap();
    let meta = c.lookup(&spill, "big").unwrap();
    let on_flash = meta.blocks.iter().filter(|b| b.block.tier() == tier::FLASH).count() as u64;
    assert_eq!(on_flash, 4, "{meta:?}");
    assert_eq!(dram_used(&n), dram);
    assert_eq!(c.get_buffer(&spill, "big").unwrap(), big);

    // The bare protocol: the flag on a full tier answers a block one tier down.
    let b = c.alloc_block_on(&strict, 0, tier::DRAM | tier::SPILL).unwrap();
    assert_eq!(b.tier(), tier::FLASH);
    c.free_block(b).unwrap();
    let err = c.alloc_block_on(&strict, 0, tier::DRAM).unwrap_err();
    assert_eq!(err.status(), Some(Status::NoCapacity), "{err}");

    // Flash has nothing below it on this node: spill-over cannot help.
    let rest = flash - 4;
    let err = c.put_buffer(&spill, "too-big", &bytes((rest as usize + 1) * BS, 42), PutOptions::default());
    assert_eq!(err.unwrap_err().status(), Some(Status::NoCapacity));
    wait_flash_used(&n, 4);
    assert_eq!(c.get_buffer(&spill, "big").unwrap(), big, "spilled data is intact");
    drop(c);
    n.shutdown();
}

/// A job that is not latency-sensitive lands on flash when the node has
/// it, else on DRAM; a latency-sensitive job on a node without flash stays
/// in DRAM and fills it.
fn default_placement_follows_the_node(net: NetBackend) {
    let dir = TierDir::new("place-default");
    let n = start_small(net, &dir, 8, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("batch", JobHints::default()).unwrap();
    let data = bytes(3 * BS + 1, 50);
    c.put_buffer(&job, "x", &data, PutOptions::default()).unwrap();
    let meta = c.lookup(&job, "x").unwrap();
    assert!(meta.blocks.iter().all(|b| b.block.tier() == tier::FLASH), "{meta:?}");
    assert_eq!(c.get_buffer(&job, "x").unwrap(), data);
    // A put naming a tier still gets it.
    c.put_buffer(&job, "y", &data, PutOptions { tier: Some(tier::DRAM), ..PutOptions::default() }).unwrap();
    assert!(c.lookup(&job, "y").unwrap().blocks.iter().all(|b| b.block.tier() == tier::DRAM));
    drop(c);
    n.shutdown();

    let n = start(net, 2, 8);
    let mut c = Client::connect(n.addr()).unwrap();
    assert!(!c.node_info().has_tier(tier::FLASH));
    let job = c.register_job("batch", JobHints::default()).unwrap();
    c.put_buffer(&job, "x", &data, PutOptions::default()).unwrap();
    assert!(c.lookup(&job, "x").unwrap().blocks.iter().all(|b| b.block.tier() == tier::DRAM));
    assert_eq!(c.get_buffer(&job, "x").unwrap(), data);
    let ls = c.register_job("ls", JobHints { latency_sensitive: true, ..JobHints::default() }).unwrap();
    assert_eq!(c.placement(&ls, None), tier::DRAM, "no flash to spill to");
    let err = c.put_buffer(&ls, "big", &bytes(16 * BS, 51), PutOptions::default()).unwrap_err();
    assert_eq!(err.status(), Some(Status::NoCapacity), "{err}");
    wait_used(&n, 4);
    drop(c);
    n.shutdown();
}

/// CPU time (user + system, in clock ticks) thread `tid` of this process has used.
fn thread_ticks(tid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("thread stat");
    // After "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Waits up to a second for core `core` to report itself parked.
fn parks_soon(n: &Node, core: usize) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        if n.report().cores[core].parked {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// An adaptive core with no spin budget sleeps while its flash I/O is in
/// flight and is woken by the completion: a read-after-write workload
/// completes, the core parks with I/O in flight, and it is parked between
/// requests.
fn flash_io_parks_the_core(net: NetBackend) {
    let dir = TierDir::new("flash-park");
    for spin_us in [0, 1] {
        let cfg = NodeConfig { spin_us, ..flash_cfg(net, 1, &dir, 64) };
        let n = start_node(cfg);
        let mut c = Client::connect(n.addr()).unwrap();
        let job = c.register_job("park", JobHints::default()).unwrap();
        let blocks: Vec<BlockId> = (0..8).map(|_| c.alloc_block_on(&job, 0, tier::FLASH).unwrap()).collect();
        let before = n.park_counts()[0];
        let mut parked_between = 0;
        for i in 0..200usize {
            let b = blocks[i % blocks.len()];
            let off = (i * 389) % (BS - 700);
            let d = bytes(1 + (i * 131) % 600, i as u64 + 3);
            c.write_block(b, 0, &vec![0u8; off]).unwrap();
            c.write_block(b, off as u32, &d).unwrap();
            assert_eq!(c.read_block(b, off as u32, d.len() as u32).unwrap(), d, "round {i}");
            if i % 10 == 0 && parks_soon(&n, 0) {
                parked_between += 1;
            }
        }
        let after = n.park_counts()[0];
        assert_eq!(parked_between, 20, "spin {spin_us} µs: the core sleeps between requests");
        assert!(
            after.with_io > before.with_io,
            "spin {spin_us} µs: the core never slept with I/O in flight ({before:?} -> {after:?})"
        );
        n.shutdown();
    }
}

/// On the kernel transports only: over DPDK's tap device in a debug build
/// (CI's) the core is CPU-bound on the software TCP stack at this load (100%
/// busy, 9 parks in 1.5 s), so a park count says nothing there; in a
/// release build the same test over DPDK parked 1 612 times with I/O in
/// flight in 1.5 s (measured once, 79% busy).
mod queue_full {
    #[test]
    fn epoll() {
        super::disk_queue_full_lets_the_core_sleep(dataplane::node::NetBackend::Epoll)
    }

    #[test]
    fn uring() {
        super::disk_queue_full_lets_the_core_sleep(dataplane::node::NetBackend::Uring)
    }
}

/// Many more requests than the disk tier's queue depth (8) in flight from
/// several connections: those that find the queue full wait for a
/// completion instead of being parsed again every pass, so the core sleeps
/// while the disk works (it parks with I/O in flight and is far from 100%
/// busy). Every read is answered with its block's bytes, and a read that
/// follows a write of the same connection's block sees it: a waiting
/// connection's frames run in order.
fn disk_queue_full_lets_the_core_sleep(net: NetBackend) {
    const CONNS: usize = 4;
    const WINDOW: usize = 12;
    const SHARED: usize = 16;
    const LEN: usize = 512;
    let dir = TierDir::new("disk-qd");
    let blocks_total = (SHARED + CONNS) as u64;
    let cfg = NodeConfig {
        disk: Some(TierSpec { path: dir.file("disk"), size: Some((blocks_total + 8) * BS as u64) }),
        ..flash_cfg(net, 1, &dir, 8)
    };
    let n = start_node(cfg);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("qd", JobHints::default()).unwrap();
    let shared: Vec<(BlockId, Vec<u8>)> = (0..SHARED)
        .map(|i| {
            let b = c.alloc_block_on(&job, 0, tier::DISK).unwrap();
            let d = bytes(BS, 900 + i as u64);
            assert_eq!(c.write_block(b, 0, &d).unwrap() as usize, BS);
            (b, d)
        })
        .collect();
    let shared = std::sync::Arc::new(shared);
    let own: Vec<BlockId> = (0..CONNS).map(|_| c.alloc_block_on(&job, 0, tier::DISK).unwrap()).collect();
    let tid = n.core_thread_ids()[0];
    let (t0, r0, p0) = (thread_ticks(tid), n.report(), n.park_counts()[0]);
    let start = std::time::Instant::now();
    let run = std::time::Duration::from_millis(1500);
    let addr = n.core_addrs()[0];
    let threads: Vec<_> = (0..CONNS)
        .map(|t| {
            let (shared, mine) = (shared.clone(), own[t]);
            std::thread::spawn(move || {
                let mut r = Raw::connect(addr);
                // Request id → the body its answer must carry (empty: a write).
                let mut out = std::collections::HashMap::new();
                let mut next = 0u64;
                let mut written = Vec::new();
                let mut send = |r: &mut Raw, out: &mut std::collections::HashMap<u64, Vec<u8>>| {
                    let i = next as usize * 7 + t;
                    let (frame, want) = match next % 8 {
                        // A write of this connection's block, then a read of it.
                        0 => {
                            written = bytes(LEN, (t as u64) << 32 | next);
                            let key = BlockKey { block: mine, offset: 0, len: LEN as u32 }.encode();
                            (Raw::frame(Opcode::BlockWrite, 0, next, &key, &written), Vec::new())
                        }
                        1 => {
                            let key = BlockKey { block: mine, offset: 0, len: LEN as u32 }.encode();
                            (Raw::frame(Opcode::BlockRead, 0, next, &key, &[]), written.clone())
                        }
                        _ => {
                            let (b, off) = (i % SHARED, (i * LEN) % BS);
                            let len = (LEN + (i % 4) * LEN).min(BS - off);
                            let key = BlockKey { block: shared[b].0, offset: off as u32, len: len as u32 };
                            let frame = Raw::frame(Opcode::BlockRead, 0, next, &key.encode(), &[]);
                            (frame, shared[b].1[off..off + len].to_vec())
                        }
                    };
                    r.send(&frame);
                    out.insert(next, want);
                    next += 1;
                };
                for _ in 0..WINDOW {
                    send(&mut r, &mut out);
                }
                let mut answered = 0u64;
                while !out.is_empty() {
                    let resp = r.recv().expect("every request is answered");
                    let id = resp.header.request_id;
                    let want = out.remove(&id).expect("an answer to a request in flight");
                    assert_eq!(resp.header.status, Status::Ok as u16, "request {id}");
                    if !want.is_empty() {
                        assert!(resp.body == want, "read {id}: wrong bytes");
                    }
                    answered += 1;
                    if start.elapsed() < run {
                        send(&mut r, &mut out);
                    }
                }
                answered
            })
        })
        .collect();
    let answered: u64 = threads.into_iter().map(|h| h.join().expect("client thread")).sum();
    let (t1, r1, p1) = (thread_ticks(tid), n.report(), n.park_counts()[0]);
    let secs = start.elapsed().as_secs_f64();
    let busy = (r1.cores[0].busy_ns - r0.cores[0].busy_ns) as f64
        / (r1.cores[0].total_ns - r0.cores[0].total_ns) as f64;
    let with_io = p1.with_io - p0.with_io;
    eprintln!(
        "{net:?}: {answered} requests in {secs:.2} s, core busy {:.0}%, {} CPU ticks, {} parks ({with_io} with I/O in flight)",
        busy * 100.0,
        t1 - t0,
        p1.parks - p0.parks,
    );
    assert!(answered >= (CONNS * WINDOW) as u64, "{answered} requests answered");
    // Before, connections stalled by the full queue were parsed again every
    // pass and the core did not sleep while they waited: it parked under 40
    // times here (busy 99-100%). Now it sleeps for 4-7% of the requests
    // (860-2 260 parks for 20 000-35 000 requests, debug build, loaded
    // machine); a starved run answers fewer, so the bound follows the
    // requests answered. The busy fraction is not asserted: it counts the
    // time a pass is preempted, and tests share two CPUs.
    let bound = (answered / 100).max(40);
    assert!(
        with_io >= bound,
        "the core slept {with_io} times with I/O in flight for {answered} requests in {secs:.2} s (want {bound})"
    );
    drop(c);
    n.shutdown();
}

/// A node with a flash tier that has served flash I/O uses next to no CPU
/// once idle: its core sleeps instead of spinning.
fn flash_idle_core_sleeps(net: NetBackend) {
    let dir = TierDir::new("flash-idle");
    let n = start_flash(net, 1, &dir, 16);
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("idle", JobHints::default()).unwrap();
    let b = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    for i in 0..20u8 {
        c.write_block(b, 0, &[i; 100]).unwrap();
        assert_eq!(c.read_block(b, 0, 100).unwrap(), [i; 100]);
    }
    assert!(parks_soon(&n, 0), "the core parks once idle");
    let tid = n.core_thread_ids()[0];
    assert_ne!(tid, 0);
    let (t0, r0, p0) = (thread_ticks(tid), n.report(), n.park_counts()[0]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (t1, r1, p1) = (thread_ticks(tid), n.report(), n.park_counts()[0]);
    let ticks = t1 - t0;
    eprintln!("{net:?}: an idle core used {ticks} clock ticks of CPU in one second");
    // 100 ticks a second is typical; a spinning core would use them all. A
    // DPDK queue has no descriptor to sleep on: an idle DPDK core naps at
    // most 500 µs at a time and checks its queue between naps
    // (docs/dpdk.md, "Idle cores"), some 2 000 wake-ups a second: 4 ticks
    // in a debug build on a quiet machine, 6 seen under load.
    let most = if net == NetBackend::Dpdk { 15 } else { 5 };
    assert!(ticks <= most, "an idle core used {ticks} clock ticks of CPU in one second");
    let busy = (r1.cores[0].busy_ns - r0.cores[0].busy_ns) as f64
        / (r1.cores[0].total_ns - r0.cores[0].total_ns) as f64;
    assert!(busy < 0.01, "busy fraction {busy} while idle");
    assert!(p1.parks - p0.parks <= 5, "an idle core keeps waking: {p0:?} -> {p1:?}");
    assert!(r1.cores[0].parked);
    n.shutdown();
}

pollen_tests::on_every_backend!(
    objects_of_every_size,
    files_round_trip,
    namespace_rules,
    persist_and_delete_after_read,
    delete_after_read_spares_a_newer_object,
    capacity_exhaustion,
    block_api,
    pipelined_out_of_order,
    half_close_gets_replies,
    malformed_frames_close_only_their_connection,
    disconnect_mid_frame,
    concurrent_clients,
    backpressure_large_pipelines,
    forwarding_floods_are_answered,
    client_recovers_after_errors,
    large_directories_page,
    flash_read_after_write,
    every_tier_read_after_write,
    flash_tier_fills,
    flash_concurrent_clients,
    flash_restart,
    flash_objects,
    flash_io_parks_the_core,
    flash_idle_core_sleeps,
    flash_persist_survives_restart,
    flash_persist_puts_past_io_slots,
    flash_device_errors_reach_the_client,
    loop_device_tiers_read_after_write,
    flash_sqpoll_read_after_write,
    latency_sensitive_job_fills_dram_then_flash,
    dram_share_then_flash,
    full_tier_spills_only_when_allowed,
    default_placement_follows_the_node,
);

#[test]
fn reports_the_cpu_a_core_is_really_pinned_to() {
    let unpinned = node(1, NetBackend::Epoll, BS, 4);
    assert_eq!(unpinned.report().cores[0].cpu, None);
    unpinned.shutdown();
    let cfg = dataplane::node::NodeConfig {
        port: 0,
        core_port_base: 0,
        cores: 1,
        pin: true,
        cpu_offset: 0,
        net: NetBackend::Epoll,
        block_size: BS,
        dram_bytes_per_core: 4 * BS as u64,
        ..Default::default()
    };
    let pinned = Node::start(cfg).unwrap();
    assert_eq!(pinned.report().cores[0].cpu, Some(0));
    pinned.shutdown();
}

/// A node started with flash and disk files reports a region of each per
/// core, with the path and the ring's mode.
#[test]
fn a_node_reports_its_flash_and_disk_tiers() {
    let dir = TierDir::new("report");
    let cfg = NodeConfig {
        port: 0,
        core_port_base: 0,
        cores: 2,
        pin: false,
        block_size: BS,
        dram_bytes_per_core: 16 * BS as u64,
        flash: Some(TierSpec { path: dir.file("flash"), size: Some(4 << 20) }),
        disk: Some(TierSpec { path: dir.file("disk"), size: Some(2 << 20) }),
        ..NodeConfig::default()
    };
    let n = Node::start(cfg).expect("node with flash and disk starts");
    let r = n.report();
    for tier in ["flash", "disk"] {
        let rows: Vec<_> = r.tiers.iter().filter(|t| t.tier == tier).collect();
        assert_eq!(rows.len(), 2, "one {tier} region per core: {:?}", r.tiers);
        for (core, t) in rows.iter().enumerate() {
            assert_eq!(t.core, core);
            assert_eq!(t.path.as_deref(), Some(dir.file(tier).to_str().unwrap()));
            assert!(t.mode.is_some() && t.blocks_total > 0 && t.blocks_used == 0, "{t:?}");
            assert_eq!(t.capacity_bytes, t.blocks_total * BS as u64);
        }
    }
    n.shutdown();

    // A tier that cannot be opened fails the start, naming the tier and path.
    let bad = NodeConfig {
        port: 0,
        core_port_base: 0,
        cores: 1,
        pin: false,
        flash: Some(TierSpec { path: dir.file("missing-dir/flash"), size: Some(1 << 20) }),
        ..NodeConfig::default()
    };
    let err = Node::start(bad).err().expect("a flash file in a missing directory").to_string();
    assert!(err.contains("flash tier") && err.contains("missing-dir"), "{err}");
}
