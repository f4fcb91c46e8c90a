//! The durable metadata log, end to end: `pollen node` as a separate
//! process with a data directory, killed with SIGKILL and restarted.

use std::collections::BTreeMap;
use std::io::Write;

use dataplane::client::{Client, Job, PutOptions};
use dataplane::node::NetBackend;
use dataplane::proto::{tier, JobHints, Status};
use pollen_tests::proc::NodeProc;
use pollen_tests::{bytes, TierDir};

const BS: usize = 4096;

fn node_args(dir: &TierDir, net: NetBackend) -> Vec<String> {
    let data = dir.0.display().to_string();
    let flash = format!("{}:8MiB", dir.file("flash.img").display());
    [
        "--cores",
        "2",
        "--net",
        &net.to_string(),
        "--block-size",
        "4KiB",
        "--dram-gb",
        "0.004",
        "--data-dir",
        &data,
        "--flash",
        &flash,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(dir: &TierDir, net: NetBackend) -> NodeProc {
    let args = node_args(dir, net);
    NodeProc::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every object of `dir` in `job`, recursively: path → size.
fn listing(c: &mut Client, job: &Job, dir: &str, out: &mut BTreeMap<String, u64>) {
    for e in c.enumerate(job, dir).unwrap() {
        let path = if dir.is_empty() { e.name.clone() } else { format!("{dir}/{}", e.name) };
        if e.is_dir {
            out.insert(format!("{path}/"), 0);
            listing(c, job, &path, out);
        } else {
            out.insert(path, e.size);
        }
    }
}

fn everything(c: &mut Client, job: &Job) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    listing(c, job, "", &mut m);
    m
}

fn acknowledged_objects_survive_sigkill(net: NetBackend) {
    let dir = TierDir::new("metalog");
    let node = start(&dir, net);
    let mut c = Client::connect(node.addr).unwrap();
    let hints = JobHints { max_workers: 8, capacity: 1 << 20, ..JobHints::default() };
    // Two jobs, which hash to different metadata cores (§10).
    let job = c.register_job("wordcount", hints).unwrap();
    let other = c.register_job("job1", JobHints::default()).unwrap();
    let flash_keep = PutOptions { persist: true, tier: Some(tier::FLASH), ..PutOptions::default() };
    let dram = PutOptions { tier: Some(tier::DRAM), ..PutOptions::default() };
    c.create_dir(&job, "in").unwrap();
    c.create_dir(&job, "in/deep").unwrap();
    let mut kept = BTreeMap::new();
    for (i, size) in [0, 1, BS - 1, BS, 3 * BS + 17].into_iter().enumerate() {
        let name = format!("in/deep/p{i}");
        let data = bytes(size, i as u64 + 1);
        c.put_buffer(&job, &name, &data, flash_keep).unwrap();
        kept.insert(name, data);
    }
    c.put_buffer(&job, "in/dram", &bytes(2 * BS, 9), dram).unwrap();
    c.put_buffer(&job, "gone", &bytes(BS, 10), flash_keep).unwrap();
    c.delete(&job, "gone").unwrap();
    c.put_buffer(&other, "o", &bytes(BS + 1, 11), flash_keep).unwrap();
    let before = everything(&mut c, &job);
    assert_eq!(before.len(), 2 + 5 + 1, "{before:?}");
    let info = c.job_info("wordcount").unwrap();
    drop(c);
    node.kill();

    // A crash in the middle of a batch: a torn record at the end of a log.
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.file("meta/core-0.log")).unwrap();
    f.write_all(&[60, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 4, 1]).unwrap();
    drop(f);

    let node = start(&dir, net);
    assert!(node.wait_for_log("truncating").is_some(), "the node warns that it cut the torn record off");
    let mut c = Client::connect(node.addr).unwrap();
    let info_after = c.job_info("wordcount").unwrap();
    assert_eq!((info_after.id, info_after.hints), (info.id, info.hints), "job id and hints are back");
    assert_eq!((info_after.objects, info_after.bytes), (info.objects, info.bytes));
    let job = c.job("wordcount").unwrap();
    assert_eq!(everything(&mut c, &job), before, "every acknowledged object and directory is listed");
    for (name, data) in &kept {
        assert_eq!(&c.get_buffer(&job, name).unwrap(), data, "PERSIST object {name} on flash reads back");
    }
    let lost = c.lookup(&job, "in/dram").unwrap_err();
    assert_eq!(lost.status(), Some(Status::DataUnavailable), "DRAM blocks died with the process: {lost}");
    assert_eq!(c.lookup(&job, "gone").unwrap_err().status(), Some(Status::NotFound));
    let other = c.job("job1").unwrap();
    assert_eq!(c.get_buffer(&other, "o").unwrap(), bytes(BS + 1, 11));

    // The node goes on: new mutations are logged after the cut, and a
    // second crash keeps them too.
    c.put_buffer(&job, "after", &bytes(BS, 12), flash_keep).unwrap();
    c.delete(&job, "in/dram").unwrap();
    c.deregister_job(&other).unwrap();
    let before = everything(&mut c, &job);
    drop(c);
    node.kill();

    let node = start(&dir, net);
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.job("wordcount").unwrap();
    assert_eq!(everything(&mut c, &job), before);
    assert_eq!(c.get_buffer(&job, "after").unwrap(), bytes(BS, 12));
    assert_eq!(
        c.job("job1").unwrap_err().status(),
        Some(Status::NotFound),
        "a deregistered job stays deregistered"
    );
    let again = c.register_job("job1", JobHints::default()).unwrap();
    assert_eq!(c.get_buffer(&again, "o").unwrap(), bytes(BS + 1, 11), "its PERSIST object came back");
    drop(c);
    node.kill();
}

/// The delete after a read of a DELETE_AFTER_READ object is conditional
/// (only the object read) and logged like a `Delete`: after a SIGKILL the
/// node replays the one that took effect, and the newer object put under the
/// name, which a stale delete left alone, is still there.
fn conditional_deletes_replay(net: NetBackend) {
    let dir = TierDir::new("metalog-dar");
    let node = start(&dir, net);
    let (mut a, mut b) = (Client::connect(node.addr).unwrap(), Client::connect(node.addr).unwrap());
    let job = a.register_job("dar", JobHints::default()).unwrap();
    let once = PutOptions { persist: true, delete_after_read: true, tier: Some(tier::FLASH) };
    a.put_buffer(&job, "msg", &bytes(BS + 3, 1), once).unwrap();
    let read_by_a = a.lookup(&job, "msg").unwrap();
    assert_eq!(b.get_buffer(&job, "msg").unwrap(), bytes(BS + 3, 1));
    let v2 = bytes(2 * BS, 2);
    b.put_buffer(&job, "msg", &v2, once).unwrap();
    a.after_read(&job, "msg", &read_by_a).unwrap();
    a.put_buffer(&job, "other", &bytes(7, 3), once).unwrap();
    assert_eq!(b.get_buffer(&job, "other").unwrap(), bytes(7, 3));
    drop((a, b));
    node.kill();

    let node = start(&dir, net);
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.job("dar").unwrap();
    assert_eq!(c.lookup(&job, "other").unwrap_err().status(), Some(Status::NotFound), "its delete replayed");
    assert_eq!(c.get_buffer(&job, "msg").unwrap(), v2, "the newer object survived the stale delete");
    assert_eq!(c.lookup(&job, "msg").unwrap_err().status(), Some(Status::NotFound));
    drop(c);
    node.kill();
}

/// A PERSIST put with the default placement goes to flash on a node with
/// flash, even for a latency-sensitive job (whose other puts start in DRAM),
/// so it survives a SIGKILL and restart; a PERSIST put that names DRAM is
/// accepted (it survives deregistration) but its data is gone after the
/// restart (status 7).
fn persist_puts_default_to_flash(net: NetBackend) {
    let dir = TierDir::new("metalog-persist");
    let node = start(&dir, net);
    let mut c = Client::connect(node.addr).unwrap();
    let ls = JobHints { latency_sensitive: true, ..JobHints::default() };
    let job = c.register_job("hot", ls).unwrap();
    assert_eq!(c.placement(&job, None), tier::DRAM | tier::SPILL, "a latency-sensitive job starts in DRAM");
    assert_eq!(c.persist_placement(&job, None), tier::FLASH);
    let kept = bytes(3 * BS + 9, 21);
    c.put_buffer(&job, "kept", &kept, PutOptions { persist: true, ..PutOptions::default() }).unwrap();
    let meta = c.lookup(&job, "kept").unwrap();
    assert!(meta.blocks.iter().all(|l| l.block.tier() == tier::FLASH), "{meta:?}");
    c.put_buffer(&job, "hot", &bytes(BS, 22), PutOptions::default()).unwrap();
    assert!(c.lookup(&job, "hot").unwrap().blocks.iter().all(|l| l.block.tier() == tier::DRAM));
    let in_dram = PutOptions { persist: true, tier: Some(tier::DRAM), ..PutOptions::default() };
    c.put_buffer(&job, "dram", &bytes(BS, 23), in_dram).unwrap();
    drop(c);
    node.kill();

    let node = start(&dir, net);
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.job("hot").unwrap();
    assert_eq!(c.get_buffer(&job, "kept").unwrap(), kept, "the PERSIST object on flash survived");
    let e = c.lookup(&job, "dram").unwrap_err();
    assert_eq!(e.status(), Some(Status::DataUnavailable), "PERSIST in DRAM is not restart-durable: {e}");
    drop(c);
    node.kill();
}

/// A node with a data directory refuses a log written by a node of another
/// shape, with a message that says why.
#[test]
fn a_log_from_another_core_count_is_refused() {
    let dir = TierDir::new("metalog-shape");
    let node = start(&dir, NetBackend::Epoll);
    let mut c = Client::connect(node.addr).unwrap();
    c.register_job("j", JobHints::default()).unwrap();
    drop(c);
    node.kill();
    let data = dir.0.display().to_string();
    let out = std::process::Command::new(pollen_tests::proc::pollen_bin())
        .args(["node", "--port", "0", "--no-pin", "--cores", "1", "--dram-gb", "0.004", "--data-dir", &data])
        .args(["--controller", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 cores") && err.contains("this node has 1 cores"), "{err}");
}

/// When the log cannot be written (here: a file size limit, so writes fail
/// with EFBIG), the change whose record failed is answered `internal`, later
/// changes are refused, reads go on; after a restart every change that was
/// answered ok is there, and nothing after it.
#[test]
fn a_failing_log_refuses_changes_and_keeps_what_it_acknowledged() {
    let dir = TierDir::new("metalog-full");
    let data = dir.0.display().to_string();
    let args = ["--cores", "1", "--dram-gb", "0.004", "--block-size", "4KiB", "--data-dir", &data];
    let node = NodeProc::start_limited(&args, Some(4096));
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.register_job("full", JobHints::default()).unwrap();
    let mut acked = Vec::new();
    let mut failed = None;
    for i in 0..1000 {
        match c.create_dir(&job, &format!("dir-{i:04}")) {
            Ok(()) => acked.push(format!("dir-{i:04}/")),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("a 4 KiB log fills up");
    assert_eq!(e.status(), Some(Status::Internal), "{e}");
    assert!(acked.len() > 10, "{} changes fit before the limit", acked.len());
    let refused = c.create_dir(&job, "after").unwrap_err();
    assert_eq!(refused.status(), Some(Status::Internal), "{refused}");
    assert!(refused.to_string().contains("metadata log"), "{refused}");
    assert_eq!(
        c.enumerate(&job, "").unwrap().len(),
        acked.len() + 1,
        "reads go on (the failed change applied)"
    );
    assert!(node.wait_for_log("metadata log write failed").is_some());
    drop(c);
    node.kill();

    let node = NodeProc::start(&args);
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.job("full").unwrap();
    let listed = everything(&mut c, &job);
    for name in &acked {
        assert!(listed.contains_key(name), "acknowledged {name} is missing after the restart");
    }
    assert!(!listed.contains_key("after/"));
    assert!(listed.len() <= acked.len() + 1, "{} listed, {} acknowledged", listed.len(), acked.len());
    c.create_dir(&job, "after").unwrap();
    drop(c);
    node.kill();
}

/// The answer to a change whose log record failed says why, naming the
/// log's path, cut to 256 bytes: cut at a character boundary, so the body
/// stays UTF-8 when the data directory's name is not ASCII.
#[test]
fn a_failed_log_s_answer_is_cut_at_a_character_boundary() {
    use dataplane::proto::Opcode;
    use pollen_tests::raw::Raw;
    let dir = TierDir::new("metalog-utf8");
    // The answer reads "the metadata log failed (metadata log DATA/meta/core-0.log: ...":
    // DATA ends in a run of 2-byte characters that byte 256 falls inside.
    let prefix = "the metadata log failed (metadata log ";
    let base = format!("{}/", dir.0.display());
    let start = prefix.len() + base.len();
    assert!(start + 1 < 256, "the test directory's path is too long: {base}");
    let pad = if (256 - start).is_multiple_of(2) { "x" } else { "" };
    let data = format!("{base}{pad}{}", "é".repeat(100));
    std::fs::create_dir_all(&data).unwrap();
    let args = ["--cores", "1", "--dram-gb", "0.004", "--block-size", "4KiB", "--data-dir", &data];
    let node = NodeProc::start_limited(&args, Some(4096));
    let mut r = Raw::connect(node.addr);
    r.send(&Raw::frame(Opcode::RegisterJob, 0, 1, b"utf8", &[]));
    assert_eq!(r.recv().unwrap().header.status, Status::Ok as u16);
    let mut failed = None;
    for i in 0..1000u64 {
        r.send(&Raw::frame(Opcode::CreateDir, 0, i, format!("utf8/dir-{i:04}").as_bytes(), &[]));
        let resp = r.recv().expect("an answer");
        if resp.header.status != Status::Ok as u16 {
            failed = Some(resp);
            break;
        }
    }
    let resp = failed.expect("a 4 KiB log fills up");
    assert_eq!(resp.header.status, Status::Internal as u16);
    let msg = std::str::from_utf8(&resp.body).expect("the message is UTF-8");
    assert!(msg.starts_with(&format!("{prefix}{base}{pad}éé")), "{msg}");
    assert!((255..=256).contains(&msg.len()), "cut near 256 bytes: {} bytes", msg.len());
    drop(r);
    node.kill();
}

/// Namespace changes pipelined on the main port, so that those of one of
/// the two jobs are forwarded to its metadata core: every one is answered
/// ok once durable, and all are there after a restart (in process).
fn pipelined_forwarded_changes_are_durable(net: NetBackend) {
    use dataplane::proto::Opcode;
    use pollen_tests::raw::Raw;
    let dir = TierDir::new("metalog-pipe");
    let cfg = || dataplane::node::NodeConfig {
        data_dir: Some(dir.0.clone()),
        ..pollen_tests::node_config(2, net, BS, 16)
    };
    let n = pollen_tests::start_node(cfg());
    let mut r = Raw::connect(n.addr());
    // "a" hashes to core 0 and "job1" to core 1 (protocol.md §10).
    let mut frames = Vec::new();
    let mut id = 0;
    for job in ["a", "job1"] {
        id += 1;
        frames.extend(Raw::frame(Opcode::RegisterJob, 0, id, job.as_bytes(), &[]));
    }
    for i in 0..200 {
        for job in ["a", "job1"] {
            id += 1;
            frames.extend(Raw::frame(Opcode::CreateDir, 0, id, format!("{job}/d{i}").as_bytes(), &[]));
        }
    }
    r.send(&frames);
    let mut answered = std::collections::HashSet::new();
    for _ in 0..id {
        let resp = r.recv().expect("every request is answered");
        assert_eq!(resp.header.status, 0, "{}", String::from_utf8_lossy(&resp.body));
        assert!(answered.insert(resp.header.request_id));
    }
    drop(r);
    n.shutdown();
    let n = pollen_tests::start_node(cfg());
    let mut c = Client::connect(n.addr()).unwrap();
    for job in ["a", "job1"] {
        let j = c.job(job).unwrap();
        let names = everything(&mut c, &j);
        assert_eq!(names.len(), 200, "{job}");
        assert!(names.contains_key("d199/"));
    }
    n.shutdown();
}

/// Two nodes on one data directory would corrupt each other's logs: the
/// second is refused while the first runs, and starts once it stopped.
#[test]
fn a_data_directory_serves_one_node_at_a_time() {
    let dir = TierDir::new("metalog-lock");
    let cfg = || dataplane::node::NodeConfig {
        data_dir: Some(dir.0.clone()),
        ..pollen_tests::node_config(1, NetBackend::Epoll, BS, 16)
    };
    let first = dataplane::node::Node::start(cfg()).unwrap();
    let e = dataplane::node::Node::start(cfg()).err().expect("refused").to_string();
    assert!(e.contains("in use by another running node"), "{e}");
    first.shutdown();
    dataplane::node::Node::start(cfg()).unwrap().shutdown();
}

pollen_tests::on_both_backends!(
    acknowledged_objects_survive_sigkill,
    conditional_deletes_replay,
    persist_puts_default_to_flash,
    pipelined_forwarded_changes_are_durable
);

/// The in-process test above over DPDK's tap device and the user-space TCP
/// stack (feature `dpdk`, root only); the others run `pollen` processes,
/// whose durability does not depend on the transport.
#[cfg(feature = "dpdk")]
mod dpdk {
    #[test]
    fn pipelined_forwarded_changes_are_durable() {
        if !pollen_tests::dpdk::available() {
            eprintln!("skipped: DPDK tests need root and /dev/net/tun");
            return;
        }
        super::pipelined_forwarded_changes_are_durable(dataplane::node::NetBackend::Dpdk)
    }
}
