//! Capability tokens over real TCP, on every network backend (DPDK's tap
//! device too, with `--features dpdk` as root): a node with a cluster secret
//! refuses job requests without a valid token for the job.

use std::time::{Duration, Instant, SystemTime};

use dataplane::auth::{BlockOwner, Rights, Secret, Token};
use dataplane::client::{Client, ClientError, Job, PutOptions};
use dataplane::node::{NetBackend, Node, NodeConfig};
use dataplane::proto::{BlockKey, JobHints, Opcode, Status};
use pollen_tests::raw::Raw;
use pollen_tests::{bytes, node_config};

const BS: usize = 4096;

fn secret() -> Secret {
    Secret::new(*b"a cluster secret of 32 bytes....").unwrap()
}

fn start(net: NetBackend) -> Node {
    pollen_tests::start_node(NodeConfig { cluster_secret: Some(secret()), ..node_config(2, net, BS, 64) })
}

/// A token without a block owner: with `Rights::ALL` it opens every block,
/// else none.
fn token(job: &str, rights: Rights) -> String {
    Token::issue(&secret(), job, None, rights, SystemTime::now() + Duration::from_secs(3600)).unwrap()
}

/// A token for `job`'s blocks as the controller mints it (its id on the metadata node `c`).
fn job_token(c: &Client, job: &Job, rights: Rights) -> String {
    let owner = BlockOwner { meta_node: c.node_number(), job_id: job.id };
    Token::issue(&secret(), &job.name, Some(owner), rights, SystemTime::now() + Duration::from_secs(3600))
        .unwrap()
}

fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Option<Status> {
    r.unwrap_err().status()
}

fn tokens_gate_every_job_request(net: NetBackend) {
    let n = start(net);
    let mut c = Client::connect(n.addr()).unwrap();
    // Without a token: the node answers, but not for a job.
    assert_eq!(c.ping(0, b"hi").unwrap(), b"hi");
    assert_eq!(status(c.register_job("j", JobHints::default())), Some(Status::Unauthorized));
    assert_eq!(status(c.job_info("j")), Some(Status::Unauthorized));

    // A forged token: signed with another secret; or claims changed.
    let other = Secret::new(*b"not the cluster's secret at all.").unwrap();
    let forged =
        Token::issue(&other, "j", None, Rights::ALL, SystemTime::now() + Duration::from_secs(60)).unwrap();
    c.set_token(Some(forged));
    assert_eq!(status(c.register_job("j", JobHints::default())), Some(Status::Unauthorized));
    c.set_token(Some("pt1.garbage.garbage".into()));
    assert_eq!(status(c.job_info("j")), Some(Status::Unauthorized));

    // A valid token for j: everything on j works.
    c.set_token(Some(token("j", Rights::ALL)));
    let job = c.register_job("j", JobHints::default()).unwrap();
    let data = bytes(3 * BS + 5, 1);
    c.put_buffer(&job, "x", &data, PutOptions::default()).unwrap();
    assert_eq!(c.get_buffer(&job, "x").unwrap(), data);
    assert_eq!(c.enumerate(&job, "").unwrap().len(), 1);

    // The same token for another job: refused.
    let mut k = Client::connect(n.addr()).unwrap();
    k.set_token(Some(token("k", Rights::ALL)));
    let kjob = k.register_job("k", JobHints::default()).unwrap();
    assert_eq!(status(c.job_info("k")), Some(Status::Unauthorized));
    assert_eq!(status(c.put_buffer(&kjob, "y", b"1", PutOptions::default())), Some(Status::Unauthorized));
    assert_eq!(status(k.lookup(&job, "x")), Some(Status::Unauthorized));

    // Rights: a read-only token reads but does not write or deregister.
    let mut r = Client::connect(n.addr()).unwrap();
    r.set_token(Some(job_token(&c, &job, Rights::READ)));
    assert_eq!(r.get_buffer(&job, "x").unwrap(), data);
    assert_eq!(status(r.put_buffer(&job, "z", b"1", PutOptions::default())), Some(Status::Unauthorized));
    assert_eq!(status(r.delete(&job, "x")), Some(Status::Unauthorized));
    assert_eq!(status(r.deregister_job(&job)), Some(Status::Unauthorized));
    // Read and write, without admin: no (de)registration.
    let mut w = Client::connect(n.addr()).unwrap();
    w.set_token(Some(job_token(&c, &job, Rights::READ_WRITE)));
    w.put_buffer(&job, "z", b"1", PutOptions::default()).unwrap();
    assert_eq!(status(w.deregister_job(&job)), Some(Status::Unauthorized));
    n.shutdown();
}

fn expired_tokens_are_refused(net: NetBackend) {
    let n = start(net);
    let s = secret();
    let mut c = Client::connect(n.addr()).unwrap();
    c.set_token(Some(token("e", Rights::ALL)));
    let job = c.register_job("e", JobHints::default()).unwrap();
    // Expired before it is presented.
    let past = Token::issue(&s, "e", None, Rights::ALL, SystemTime::now() - Duration::from_secs(1)).unwrap();
    c.set_token(Some(past));
    assert_eq!(status(c.job_info("e")), Some(Status::Unauthorized));
    // Expires while the connection is open: accepted until then, refused after.
    let soon = Token::issue(&s, "e", None, Rights::ALL, SystemTime::now() + Duration::from_secs(3)).unwrap();
    c.set_token(Some(soon));
    c.put_buffer(&job, "a", b"1", PutOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.lookup(&job, "a") {
            Ok(_) => assert!(Instant::now() < deadline, "a token 3 s from expiry still works after 10 s"),
            Err(e) => {
                assert_eq!(e.status(), Some(Status::Unauthorized), "{e}");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    n.shutdown();
}

/// The wire level: `Auth` on the main port (requests forwarded to other
/// cores are checked where the connection is); a refusal leaves the
/// connection open; a failed `Auth` ends the earlier grant.
fn auth_on_the_wire(net: NetBackend) {
    let n = start(net);
    let mut r = Raw::connect(n.addr());
    let st = |r: &mut Raw, op, id, key: &[u8], body: &[u8]| {
        r.send(&Raw::frame(op, 0, id, key, body));
        let resp = r.recv().expect("an answer");
        assert_eq!(resp.header.request_id, id);
        resp.header.status
    };
    // "a" and "job1" have their metadata on cores 0 and 1.
    for (i, job) in ["a", "job1"].into_iter().enumerate() {
        let id = 10 * i as u64;
        assert_eq!(st(&mut r, Opcode::RegisterJob, id + 1, job.as_bytes(), &[]), Status::Unauthorized as u16);
        let t = token(job, Rights::ALL);
        assert_eq!(st(&mut r, Opcode::Auth, id + 2, &[], t.as_bytes()), 0);
        assert_eq!(st(&mut r, Opcode::RegisterJob, id + 3, job.as_bytes(), &[]), 0);
        assert_eq!(st(&mut r, Opcode::JobInfo, id + 4, job.as_bytes(), &[]), 0);
        assert_eq!(st(&mut r, Opcode::Auth, id + 5, &[], b"pt1.forged.token"), Status::Unauthorized as u16);
        assert_eq!(st(&mut r, Opcode::JobInfo, id + 6, job.as_bytes(), &[]), Status::Unauthorized as u16);
    }
    assert_eq!(st(&mut r, Opcode::Auth, 30, b"key", &[]), Status::Malformed as u16);
    assert_eq!(st(&mut r, Opcode::Ping, 31, &[], b"still open"), 0);
    n.shutdown();
}

/// Block requests are served only for blocks of the token's block owner,
/// checked on the core that holds the block: through a connection of that
/// core (the client) and forwarded from another core (the main port). A
/// token without an owner opens no blocks; an ADMIN token opens all.
fn blocks_open_to_their_owners_token_only(net: NetBackend) {
    let n = start(net);
    let mut admin = Client::connect(n.addr()).unwrap();
    admin.set_token(Some(token("j", Rights::ALL)));
    let j = admin.register_job("j", JobHints::default()).unwrap();
    admin.set_token(Some(token("k", Rights::ALL)));
    let k = admin.register_job("k", JobHints::default()).unwrap();
    let (jt, kt) = (job_token(&admin, &j, Rights::READ_WRITE), job_token(&admin, &k, Rights::READ_WRITE));
    let mut jc = Client::connect(n.addr()).unwrap();
    jc.set_token(Some(jt.clone()));
    let mut kc = Client::connect(n.addr()).unwrap();
    kc.set_token(Some(kt.clone()));

    // j's blocks on both cores: j's token allocates, writes, appends and reads them.
    let blocks: Vec<_> = (0..2).map(|core| jc.alloc_block(&j, core).unwrap()).collect();
    for &b in &blocks {
        assert_eq!(jc.write_block(b, 0, b"mine").unwrap(), 4);
        assert_eq!(jc.append_block(b, b"!").unwrap(), 5);
        assert_eq!(jc.read_block(b, 0, BlockKey::TO_END).unwrap(), b"mine!");
    }
    // k's token: neither on the block's core nor forwarded to it from core 0.
    let refused = |e: ClientError| {
        assert_eq!(e.status(), Some(Status::Unauthorized), "{e}");
        assert!(e.to_string().contains("another job"), "{e}");
    };
    for &b in &blocks {
        refused(kc.read_block(b, 0, 4).unwrap_err());
        refused(kc.write_block(b, 0, b"evil").unwrap_err());
        refused(kc.append_block(b, b"evil").unwrap_err());
        refused(kc.free_block(b).unwrap_err());
    }
    // Allocating for j with k's token.
    refused(kc.alloc_block(&j, 0).unwrap_err());
    kc.alloc_block(&k, 0).expect("k allocates its own");
    let mut raw = Raw::connect(n.addr());
    let st = |raw: &mut Raw, op, id, key: &[u8], body: &[u8]| {
        raw.send(&Raw::frame(op, 0, id, key, body));
        let resp = raw.recv().expect("an answer");
        assert_eq!(resp.header.request_id, id);
        (resp.header.status, String::from_utf8_lossy(&resp.body).into_owned())
    };
    let unauthorized = Status::Unauthorized as u16;
    assert_eq!(st(&mut raw, Opcode::Auth, 1, &[], kt.as_bytes()).0, 0);
    let far = blocks[1];
    assert_eq!(far.core(), 1, "forwarded from the main port's core 0");
    let key = |offset, len| BlockKey { block: far, offset, len }.encode();
    for (op, id, k, body) in [
        (Opcode::BlockRead, 2, key(0, 4), &b""[..]),
        (Opcode::BlockWrite, 3, key(0, 4), b"evil"),
        (Opcode::BlockAppend, 4, key(0, 4), b"evil"),
        (Opcode::BlockFree, 5, key(0, 0), b""),
    ] {
        let (code, msg) = st(&mut raw, op, id, &k, body);
        assert_eq!(code, unauthorized, "{op:?}: {msg}");
        assert!(msg.contains("another job"), "{msg}");
    }
    // The same requests with j's token, forwarded: served.
    assert_eq!(st(&mut raw, Opcode::Auth, 6, &[], jt.as_bytes()).0, 0);
    assert_eq!(st(&mut raw, Opcode::BlockRead, 7, &key(0, 5), &[]), (0, "mine!".into()));
    // A token without a block owner (a version-1 token, say) opens no block.
    let ownerless = token("j", Rights::READ_WRITE);
    assert_eq!(st(&mut raw, Opcode::Auth, 8, &[], ownerless.as_bytes()).0, 0);
    let (code, msg) = st(&mut raw, Opcode::BlockRead, 9, &key(0, 4), &[]);
    assert_eq!(code, unauthorized);
    assert!(msg.contains("names no job owner"), "{msg}");
    let mut oc = Client::connect(n.addr()).unwrap();
    oc.set_token(Some(ownerless));
    assert_eq!(status(oc.alloc_block(&j, 0)), Some(Status::Unauthorized));
    assert!(oc.job_info("j").is_ok(), "namespace requests still work");
    // Nothing of j's changed; j's token frees its blocks; ADMIN opens any block.
    assert_eq!(admin.read_block(blocks[0], 0, BlockKey::TO_END).unwrap(), b"mine!");
    jc.free_block(blocks[0]).unwrap();
    admin.free_block(blocks[1]).unwrap();
    n.shutdown();
}

/// A node without a secret accepts `Auth` and checks nothing (the default).
fn no_secret_no_checks(net: NetBackend) {
    let n = pollen_tests::start_node(node_config(1, net, BS, 16));
    let mut c = Client::connect(n.addr()).unwrap();
    c.set_token(Some("anything".into()));
    let job = c.register_job("free", JobHints::default()).unwrap();
    c.put_buffer(&job, "x", b"1", PutOptions::default()).unwrap();
    n.shutdown();
}

/// `pollen node` reads the secret from `--cluster-secret-file` or
/// `$POLLEN_CLUSTER_SECRET_FILE` and checks tokens issued with it.
#[test]
fn pollen_node_takes_its_secret_from_a_file() {
    use pollen_tests::proc::NodeProc;
    let dir = pollen_tests::TierDir::new("secret");
    let path = dir.file("secret");
    std::fs::write(&path, "a cluster secret of 32 bytes....\n").unwrap();
    let p = path.display().to_string();
    let base = ["--cores", "1", "--dram-gb", "0.004", "--block-size", "4KiB"];
    for (args, env) in [
        ([&base[..], &["--cluster-secret-file", &p]].concat(), vec![]),
        (base.to_vec(), vec![("POLLEN_CLUSTER_SECRET_FILE", p.as_str())]),
    ] {
        let node = NodeProc::start_with(&args, None, &env);
        let mut c = Client::connect(node.addr).unwrap();
        assert_eq!(status(c.register_job("f", JobHints::default())), Some(Status::Unauthorized));
        c.set_token(Some(token("f", Rights::ALL)));
        let job = c.register_job("f", JobHints::default()).unwrap();
        c.put_buffer(&job, "x", b"hello", PutOptions::default()).unwrap();
        assert_eq!(c.get_buffer(&job, "x").unwrap(), b"hello");
        node.kill();
    }
    // A secret too short to be one: the node does not start.
    std::fs::write(&path, "short").unwrap();
    let out = std::process::Command::new(pollen_tests::proc::pollen_bin())
        .args(["node", "--port", "0", "--no-pin", "--cluster-secret-file", &p])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));
}

pollen_tests::on_every_backend!(
    tokens_gate_every_job_request,
    expired_tokens_are_refused,
    auth_on_the_wire,
    blocks_open_to_their_owners_token_only,
    no_secret_no_checks
);
