//! Flash and disk writes whose body arrives over many socket reads stream
//! into the engine's registered buffers (docs/protocol.md, "Streamed
//! writes"): byte-exact read-back, clients that leave mid-body, pipelined
//! frames, refusals mid-body and back-pressure, over real sockets on every
//! network backend.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use dataplane::auth::{BlockOwner, Rights, Secret, Token};
use dataplane::client::{Client, Job, PutOptions};
use dataplane::core::STREAM_IDLE;
use dataplane::node::{NetBackend, Node, NodeConfig, TierSpec};
use dataplane::proto::{tier, BlockId, BlockKey, JobHints, Location, ObjectMeta, Opcode, Status};
use dataplane::report::TierReport;
use pollen_tests::raw::{Raw, Resp};
use pollen_tests::{bytes, start_node, TierDir};

/// One block holds one 64 KiB put.
const BS: usize = 64 << 10;
const BLOCKS: u64 = 24;

fn config(net: NetBackend, dir: &TierDir, cores: usize) -> NodeConfig {
    // Per core: the superblock and header table take a few sectors beside the blocks.
    let per_core = (BLOCKS + 2) * BS as u64 * cores as u64;
    NodeConfig {
        max_body: 2 * BS,
        flash: Some(TierSpec { path: dir.file("flash"), size: Some(per_core) }),
        disk: Some(TierSpec { path: dir.file("disk"), size: Some(per_core) }),
        ..pollen_tests::node_config(cores, net, BS, 8)
    }
}

/// The flash and disk rows of core `core`.
fn device_tiers(n: &Node, core: usize) -> Vec<TierReport> {
    n.report().tiers.into_iter().filter(|t| t.tier != "dram" && t.core == core).collect()
}

fn tier_row(n: &Node, core: usize, t: u8) -> TierReport {
    let name = if t == tier::FLASH { "flash" } else { "disk" };
    device_tiers(n, core).into_iter().find(|r| r.tier == name).expect("tier row")
}

/// Polls the node's report until `done` holds (figures are published
/// every 100 ms while a core is busy, and when it parks).
fn wait_for(n: &Node, what: &str, done: impl Fn(&Node) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(n) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", n.report().tiers);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// No request, buffer or reservation left on any flash or disk engine.
fn wait_idle(n: &Node) {
    wait_for(n, "idle engines", |n| {
        (0..n.report().cores.len()).all(|c| {
            device_tiers(n, c)
                .iter()
                .all(|t| t.in_flight == 0 && t.buffers_in_use == 0 && t.writes_reserved == 0)
        })
    });
}

fn bytes_in(n: &Node, core: usize) -> u64 {
    n.report().cores[core].bytes_in
}

/// A raw connection to core `core`'s own port.
fn connect(n: &Node, core: usize) -> Raw {
    let port = n.report().cores[core].port;
    Raw::connect(std::net::SocketAddr::new(n.addr().ip(), port))
}

/// Sends `frame` so that its body arrives in pieces: the first `first`
/// bytes, then (once the node read them) the rest in writes of 1..100
/// bytes, each flushed on its own (the socket has no delay).
fn send_split(n: &Node, core: usize, r: &mut Raw, frame: &[u8], first: usize, seed: u64) {
    let before = bytes_in(n, core);
    r.send(&frame[..first]);
    wait_for(n, "the first piece", |n| bytes_in(n, core) >= before + first as u64);
    let mut rng = seed | 1;
    let mut at = first;
    while at < frame.len() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = (1 + rng % 100) as usize;
        let end = (at + len).min(frame.len());
        r.send(&frame[at..end]);
        r.0.flush().unwrap();
        at = end;
    }
}

fn key(b: BlockId, offset: u32, len: usize) -> Vec<u8> {
    BlockKey { block: b, offset, len: len as u32 }.encode().to_vec()
}

fn expect_ok(resp: Option<Resp>, id: u64) -> Vec<u8> {
    let resp = resp.expect("an answer");
    assert_eq!(resp.header.request_id, id);
    assert_eq!(resp.header.status, Status::Ok as u16, "{}", String::from_utf8_lossy(&resp.body));
    resp.body
}

/// 64 KiB writes and appends (and an odd-sized one) on flash and disk, on
/// both cores, arriving in tiny pieces, read back byte-exact; each one
/// streamed (the tier's count moves), and the engines end idle.
fn split_writes_read_back(net: NetBackend) {
    let dir = TierDir::new("stream-split");
    let n = start_node(config(net, &dir, 2));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("split", JobHints::default()).unwrap();
    for t in [tier::FLASH, tier::DISK] {
        for core in 0..2 {
            let streamed = tier_row(&n, core, t).streamed_writes;
            let mut r = connect(&n, core);
            let b = c.alloc_block_on(&job, core, t).unwrap();
            let data = bytes(BS, 10 * u64::from(t) + core as u64);
            let frame = Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, 0, BS), &data);
            // The first read ends inside the header.
            send_split(&n, core, &mut r, &frame, 20, 7);
            assert_eq!(expect_ok(r.recv(), 1), (BS as u32).to_le_bytes());
            assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), data, "tier {t} core {core}");
            // An odd-sized write over the middle, then appends to a new block.
            let patch = bytes(5000, 99);
            let frame = Raw::frame(Opcode::BlockWrite, 0, 2, &key(b, 4097, patch.len()), &patch);
            send_split(&n, core, &mut r, &frame, 60, 8);
            assert_eq!(expect_ok(r.recv(), 2), (BS as u32).to_le_bytes());
            let mut want = data.clone();
            want[4097..4097 + patch.len()].copy_from_slice(&patch);
            let a = c.alloc_block_on(&job, core, t).unwrap();
            let mut appended = Vec::new();
            for (i, len) in [30_000usize, 1, 35_535].into_iter().enumerate() {
                let d = bytes(len, 50 + i as u64);
                appended.extend_from_slice(&d);
                let frame = Raw::frame(Opcode::BlockAppend, 0, 10 + i as u64, &key(a, 0, len), &d);
                if len > 1 {
                    send_split(&n, core, &mut r, &frame, 57, i as u64);
                } else {
                    r.send(&frame);
                }
                assert_eq!(expect_ok(r.recv(), 10 + i as u64), (appended.len() as u32).to_le_bytes());
            }
            assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), want);
            assert_eq!(c.read_block(a, 0, BlockKey::TO_END).unwrap(), appended);
            // Two writes and two appends spanned reads; the 1-byte one came whole.
            wait_for(&n, "4 streamed writes", |n| tier_row(n, core, t).streamed_writes == streamed + 4);
        }
    }
    wait_idle(&n);
    n.shutdown();
}

/// An object of several flash (and disk) blocks put as the client puts it
/// (`BlockAlloc`, a `BlockWrite` per block on the block's core, then
/// `PutObject`), the writes arriving in tiny pieces, reads back whole; so
/// do objects the client library puts itself.
fn split_object_puts(net: NetBackend) {
    let dir = TierDir::new("stream-obj");
    let n = start_node(config(net, &dir, 2));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("obj", JobHints::default()).unwrap();
    for t in [tier::FLASH, tier::DISK] {
        let size = 3 * BS + 12_345;
        let data = bytes(size, 3 + u64::from(t));
        let mut blocks = Vec::new();
        let mut conns: Vec<Raw> = (0..2).map(|core| connect(&n, core)).collect();
        for (i, chunk) in data.chunks(BS).enumerate() {
            let core = i % 2;
            let b = c.alloc_block_on(&job, core, t).unwrap();
            let frame = Raw::frame(Opcode::BlockWrite, 0, i as u64, &key(b, 0, chunk.len()), chunk);
            send_split(&n, core, &mut conns[core], &frame, 100, i as u64);
            assert_eq!(expect_ok(conns[core].recv(), i as u64), (chunk.len() as u32).to_le_bytes());
            blocks.push(Location { node: c.node_number(), block: b });
        }
        let meta = ObjectMeta { size: size as u64, flags: 0, blocks };
        let mut body = Vec::new();
        meta.encode(&mut body);
        let name = format!("split-{t}");
        conns[0].send(&Raw::frame(Opcode::PutObject, 0, 99, format!("obj/{name}").as_bytes(), &body));
        expect_ok(conns[0].recv(), 99);
        assert_eq!(c.get_buffer(&job, &name).unwrap(), data, "tier {t}");
        // The client library's own put, on the same tier.
        let whole = bytes(5 * BS + 1, 40 + u64::from(t));
        let opts = PutOptions { tier: Some(t), ..PutOptions::default() };
        c.put_buffer(&job, &format!("whole-{t}"), &whole, opts).unwrap();
        let meta = c.lookup(&job, &format!("whole-{t}")).unwrap();
        assert!(meta.blocks.iter().all(|l| l.block.tier() == t), "tier {t}");
        assert_eq!(c.get_buffer(&job, &format!("whole-{t}")).unwrap(), whole, "tier {t}");
    }
    wait_idle(&n);
    n.shutdown();
}

/// Clients that close mid-body give back every buffer and slot they held:
/// the engines' counts return to zero and the node serves others.
fn disconnect_mid_body(net: NetBackend) {
    let dir = TierDir::new("stream-gone");
    let n = start_node(config(net, &dir, 1));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("gone", JobHints::default()).unwrap();
    for t in [tier::FLASH, tier::DISK] {
        let b = c.alloc_block_on(&job, 0, t).unwrap();
        let data = bytes(BS, 5);
        let frame = Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, 0, BS), &data);
        let mut r = connect(&n, 0);
        let before = bytes_in(&n, 0);
        r.send(&frame[..BS / 2]);
        wait_for(&n, "a reserved write buffer", |n| {
            bytes_in(n, 0) >= before + (BS / 2) as u64 && tier_row(n, 0, t).writes_reserved == 1
        });
        assert_eq!(tier_row(&n, 0, t).buffers_in_use, 1);
        let abandoned = tier_row(&n, 0, t).streams_abandoned;
        drop(r);
        wait_for(&n, "the abandoned body", |n| tier_row(n, 0, t).streams_abandoned == abandoned + 1);
        wait_idle(&n);
        // The block is unchanged (empty) and writable by others.
        assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), b"");
        assert_eq!(c.write_block(b, 0, &data).unwrap(), BS as u32);
        assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), data);
    }
    // A client that half-closes mid-body is closed too, and leaks nothing.
    let b = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    let mut r = connect(&n, 0);
    r.send(&Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, 0, BS), &bytes(BS, 6))[..1000]);
    r.0.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(r.closed(), "the node closes a connection whose peer stopped mid-body");
    wait_idle(&n);
    assert_eq!(c.ping(0, b"still here").unwrap(), b"still here");
    n.shutdown();
}

/// Writes, reads, appends and pings pipelined on one connection, the
/// whole batch arriving in tiny pieces: every answer right, reads see the
/// writes before them.
fn pipelined_mix(net: NetBackend) {
    let dir = TierDir::new("stream-pipe");
    let n = start_node(config(net, &dir, 2));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("pipe", JobHints::default()).unwrap();
    let core = 1;
    let f = c.alloc_block_on(&job, core, tier::FLASH).unwrap();
    let d = c.alloc_block_on(&job, core, tier::DISK).unwrap();
    let m = c.alloc_block_on(&job, core, tier::DRAM).unwrap();
    // A flash block on the other core: forwarded whole, not streamed.
    let other = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    let (a, b2, small) = (bytes(BS, 1), bytes(BS - 3, 2), bytes(700, 3));
    let mut batch = Vec::new();
    let mut want: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut push = |id: u64, op: Opcode, k: Vec<u8>, body: &[u8], answer: Vec<u8>| {
        batch.extend_from_slice(&Raw::frame(op, 0, id, &k, body));
        want.insert(id, answer);
    };
    let len = |n: usize| (n as u32).to_le_bytes().to_vec();
    push(1, Opcode::BlockWrite, key(f, 0, BS), &a, len(BS));
    push(2, Opcode::BlockRead, key(f, 0, BlockKey::TO_END as usize), &[], a.clone());
    push(3, Opcode::Ping, Vec::new(), b"p", b"p".to_vec());
    push(4, Opcode::BlockAppend, key(d, 0, small.len()), &small, len(small.len()));
    push(5, Opcode::BlockWrite, key(f, 100, small.len()), &small, len(BS));
    push(6, Opcode::BlockRead, key(f, 100, 700), &[], small.clone());
    push(7, Opcode::BlockWrite, key(m, 0, small.len()), &small, len(small.len()));
    push(8, Opcode::BlockWrite, key(other, 0, b2.len()), &b2, len(b2.len()));
    push(9, Opcode::BlockAppend, key(d, 0, b2.len() - small.len()), &b2[small.len()..], len(b2.len()));
    push(
        10,
        Opcode::BlockRead,
        key(d, 0, BlockKey::TO_END as usize),
        &[],
        [&small[..], &b2[small.len()..]].concat(),
    );
    push(11, Opcode::BlockRead, key(other, 0, BlockKey::TO_END as usize), &[], b2.clone());
    let mut r = connect(&n, core);
    send_split(&n, core, &mut r, &batch, 1, 11);
    for _ in 0..want.len() {
        let resp = r.recv().expect("an answer");
        let id = resp.header.request_id;
        let w = want.remove(&id).unwrap_or_else(|| panic!("unexpected answer {id}"));
        assert_eq!(
            resp.header.status,
            Status::Ok as u16,
            "request {id}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.body, w, "request {id}");
    }
    wait_for(&n, "the streamed write", |n| tier_row(n, core, tier::FLASH).streamed_writes >= 1);
    wait_idle(&n);
    n.shutdown();
}

/// Requests refused before their body is in are answered at once (the
/// client has not sent the rest yet); their body is dropped as it comes,
/// without a buffer, and the frames after it are served.
fn refused_mid_body(net: NetBackend) {
    let dir = TierDir::new("stream-refused");
    let n = start_node(config(net, &dir, 1));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("refused", JobHints::default()).unwrap();
    let b = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    // Written in pieces: it streams, so the count below starts at 1.
    let mut w = connect(&n, 0);
    let frame = Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, 0, BS - 10), &bytes(BS - 10, 1));
    send_split(&n, 0, &mut w, &frame, 100, 1);
    assert_eq!(expect_ok(w.recv(), 1), ((BS - 10) as u32).to_le_bytes());
    let gone = c.alloc_block_on(&job, 0, tier::DISK).unwrap();
    c.free_block(gone).unwrap();
    let cases: [(Vec<u8>, Status); 4] = [
        // No room left in the block: `too large`.
        (Raw::frame(Opcode::BlockAppend, 0, 1, &key(b, 0, 100), &bytes(100, 2)), Status::TooLarge),
        (
            Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, BS as u32 - 50, 1000), &bytes(1000, 2)),
            Status::TooLarge,
        ),
        // A freed block.
        (Raw::frame(Opcode::BlockWrite, 0, 1, &key(gone, 0, 3000), &bytes(3000, 2)), Status::NotFound),
        // A key whose length is not the body's.
        (Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, 0, 10), &bytes(3000, 2)), Status::Malformed),
    ];
    let streamed =
        |n: &Node| tier_row(n, 0, tier::FLASH).streamed_writes + tier_row(n, 0, tier::DISK).streamed_writes;
    wait_for(&n, "the set-up write", |n| streamed(n) == 1);
    for (frame, status) in cases {
        let mut r = connect(&n, 0);
        r.send(&frame[..80]);
        let resp = r.recv().expect("answered before the body is in");
        assert_eq!(resp.header.status, status as u16, "{}", String::from_utf8_lossy(&resp.body));
        // The rest of the body, then a ping in the same write.
        let mut rest = frame[80..].to_vec();
        rest.extend_from_slice(&Raw::frame(Opcode::Ping, 0, 2, &[], b"after"));
        r.send(&rest);
        assert_eq!(expect_ok(r.recv(), 2), b"after");
    }
    assert_eq!(
        c.read_block(b, 0, BlockKey::TO_END).unwrap(),
        bytes(BS - 10, 1),
        "refused writes changed nothing"
    );
    wait_idle(&n);
    assert_eq!(streamed(&n), 1, "no refused body took a buffer");
    n.shutdown();
}

/// A body bound for another job's block on a node with tokens is refused
/// (`unauthorized`) from its key, its body dropped, the connection kept.
fn refused_by_token_mid_body(net: NetBackend) {
    let secret = Secret::new(*b"a cluster secret of 32 bytes....").unwrap();
    let dir = TierDir::new("stream-token");
    let n = start_node(NodeConfig { cluster_secret: Some(secret.clone()), ..config(net, &dir, 1) });
    let until = SystemTime::now() + Duration::from_secs(3600);
    let mut admin = Client::connect(n.addr()).unwrap();
    admin.set_token(Some(Token::issue(&secret, "a", None, Rights::ALL, until).unwrap()));
    let a: Job = admin.register_job("a", JobHints::default()).unwrap();
    let owner = BlockOwner { meta_node: admin.node_number(), job_id: a.id };
    let mut ca = Client::connect(n.addr()).unwrap();
    ca.set_token(Some(Token::issue(&secret, "a", Some(owner), Rights::READ_WRITE, until).unwrap()));
    let b = ca.alloc_block_on(&a, 0, tier::FLASH).unwrap();
    // A token for another job's blocks.
    let other = BlockOwner { meta_node: owner.meta_node, job_id: a.id + 1 };
    let token = Token::issue(&secret, "b", Some(other), Rights::READ_WRITE, until).unwrap();
    let mut r = connect(&n, 0);
    r.send(&Raw::frame(Opcode::Auth, 0, 1, &[], token.as_bytes()));
    expect_ok(r.recv(), 1);
    let frame = Raw::frame(Opcode::BlockWrite, 0, 2, &key(b, 0, BS), &bytes(BS, 9));
    r.send(&frame[..200]);
    let resp = r.recv().expect("answered before the body is in");
    assert_eq!(resp.header.status, Status::Unauthorized as u16);
    assert_eq!(tier_row(&n, 0, tier::FLASH).writes_reserved, 0);
    let mut rest = frame[200..].to_vec();
    rest.extend_from_slice(&Raw::frame(Opcode::Ping, 0, 3, &[], b"ok"));
    r.send(&rest);
    assert_eq!(expect_ok(r.recv(), 3), b"ok");
    // Without a token at all: the same.
    let mut r = connect(&n, 0);
    r.send(&frame[..200]);
    assert_eq!(r.recv().expect("answer").header.status, Status::Unauthorized as u16);
    r.send(&frame[200..]);
    assert_eq!(ca.read_block(b, 0, BlockKey::TO_END).unwrap(), b"", "nothing was written");
    assert_eq!(ca.write_block(b, 0, &bytes(BS, 9)).unwrap(), BS as u32);
    wait_idle(&n);
    n.shutdown();
}

/// More bodies arriving at once than the disk tier lends buffers for: the
/// first ones stream, the others are gathered whole (the fallback), and
/// every write completes; meanwhile another connection is served.
fn more_bodies_than_buffers(net: NetBackend) {
    let dir = TierDir::new("stream-many");
    let n = start_node(config(net, &dir, 1));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("many", JobHints::default()).unwrap();
    // The disk tier's queue depth is 8: at most 4 bodies hold its slots.
    const CONNS: usize = 10;
    let blocks: Vec<BlockId> = (0..CONNS).map(|_| c.alloc_block_on(&job, 0, tier::DISK).unwrap()).collect();
    let frames: Vec<Vec<u8>> = (0..CONNS)
        .map(|i| Raw::frame(Opcode::BlockWrite, 0, i as u64, &key(blocks[i], 0, BS), &bytes(BS, i as u64)))
        .collect();
    let row = tier_row(&n, 0, tier::DISK);
    let mut conns: Vec<Raw> = (0..CONNS).map(|_| connect(&n, 0)).collect();
    let before = bytes_in(&n, 0);
    for (r, f) in conns.iter_mut().zip(&frames) {
        r.send(&f[..1000]);
    }
    wait_for(&n, "the first pieces", |n| bytes_in(n, 0) >= before + (CONNS * 1000) as u64);
    wait_for(&n, "reserved write buffers", |n| tier_row(n, 0, tier::DISK).writes_reserved == 4);
    // The tier still serves a read of a block with nothing in it.
    assert_eq!(c.read_block(blocks[0], 0, BlockKey::TO_END).unwrap(), b"");
    for (r, f) in conns.iter_mut().zip(&frames) {
        r.send(&f[1000..]);
    }
    for (i, r) in conns.iter_mut().enumerate() {
        assert_eq!(expect_ok(r.recv(), i as u64), (BS as u32).to_le_bytes());
        assert_eq!(c.read_block(blocks[i], 0, BlockKey::TO_END).unwrap(), bytes(BS, i as u64), "write {i}");
    }
    // Gathered ones may stream the rest of their body once buffers are free again.
    wait_for(&n, "streamed and gathered writes", |n| {
        let after = tier_row(n, 0, tier::DISK);
        after.streamed_writes - row.streamed_writes >= 4 && after.stream_fallbacks > row.stream_fallbacks
    });
    wait_idle(&n);
    n.shutdown();
}

/// A client that stops sending mid-body gives back the buffer, queue slot
/// and I/O slot its body held once it was idle for the stream deadline
/// (the core, parked meanwhile, wakes to look); other clients' writes
/// still stream; when the rest arrives, the write completes gathered, is
/// answered and reads back byte-exact; the connection streams again after.
fn paused_mid_body(net: NetBackend) {
    let dir = TierDir::new("stream-pause");
    let n = start_node(config(net, &dir, 1));
    let mut c = Client::connect(n.addr()).unwrap();
    let job = c.register_job("pause", JobHints::default()).unwrap();
    for t in [tier::FLASH, tier::DISK] {
        let b = c.alloc_block_on(&job, 0, t).unwrap();
        let data = bytes(BS, 20 + u64::from(t));
        let frame = Raw::frame(Opcode::BlockWrite, 0, 1, &key(b, 0, BS), &data);
        let row = tier_row(&n, 0, t);
        let mut r = connect(&n, 0);
        let before = bytes_in(&n, 0);
        let first = 20_000;
        // Timed from before the send: the body's last byte arrives after
        // this, so it is demoted no sooner than the stream deadline by this
        // clock (less the core's pass clock, which may predate the bytes a
        // pass reads), however late the test sees it streaming.
        let paused = Instant::now();
        r.send(&frame[..first]);
        wait_for(&n, "a streaming body", |n| {
            bytes_in(n, 0) >= before + first as u64
                && tier_row(n, 0, t).streamed_writes == row.streamed_writes + 1
        });
        // While the client pauses, the body gives everything back.
        wait_for(&n, "the paused body demoted", |n| {
            let now = tier_row(n, 0, t);
            now.streams_demoted == row.streams_demoted + 1
                && now.writes_reserved == 0
                && now.buffers_in_use == 0
        });
        let early = STREAM_IDLE - Duration::from_millis(50);
        assert!(paused.elapsed() >= early, "demoted after {:?}", paused.elapsed());
        let after = tier_row(&n, 0, t);
        assert_eq!(after.streamed_writes, row.streamed_writes + 1, "the paused write had streamed");
        assert_eq!(after.streams_abandoned, row.streams_abandoned);
        // Another client's write streams meanwhile.
        let b2 = c.alloc_block_on(&job, 0, t).unwrap();
        let other = bytes(BS, 40 + u64::from(t));
        let mut r2 = connect(&n, 0);
        let f2 = Raw::frame(Opcode::BlockWrite, 0, 7, &key(b2, 0, BS), &other);
        send_split(&n, 0, &mut r2, &f2, 100, 3);
        assert_eq!(expect_ok(r2.recv(), 7), (BS as u32).to_le_bytes());
        assert_eq!(c.read_block(b2, 0, BlockKey::TO_END).unwrap(), other);
        wait_for(&n, "the other write streamed", |n| {
            tier_row(n, 0, t).streamed_writes == after.streamed_writes + 1
        });
        // The rest, in two reads: gathered (not streamed again), answered.
        let before = bytes_in(&n, 0);
        let second = first + 10_000;
        r.send(&frame[first..second]);
        wait_for(&n, "the second piece", |n| bytes_in(n, 0) >= before + (second - first) as u64);
        r.send(&frame[second..]);
        assert_eq!(expect_ok(r.recv(), 1), (BS as u32).to_le_bytes());
        assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), data, "tier {t}");
        let done = tier_row(&n, 0, t);
        assert_eq!(done.streamed_writes, after.streamed_writes + 1, "the demoted write completed gathered");
        assert_eq!(done.streams_demoted, row.streams_demoted + 1);
        // The same connection's next write streams again.
        let again = bytes(BS, 60 + u64::from(t));
        let f3 = Raw::frame(Opcode::BlockWrite, 0, 8, &key(b, 0, BS), &again);
        send_split(&n, 0, &mut r, &f3, 100, 4);
        assert_eq!(expect_ok(r.recv(), 8), (BS as u32).to_le_bytes());
        assert_eq!(c.read_block(b, 0, BlockKey::TO_END).unwrap(), again);
        wait_for(&n, "the next write streamed", |n| {
            tier_row(n, 0, t).streamed_writes == done.streamed_writes + 1
        });
        wait_idle(&n);
    }
    n.shutdown();
}

pollen_tests::on_every_backend!(
    paused_mid_body,
    split_writes_read_back,
    split_object_puts,
    disconnect_mid_body,
    pipelined_mix,
    refused_mid_body,
    refused_by_token_mid_body,
    more_bodies_than_buffers,
);
