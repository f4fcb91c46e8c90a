//! `pollen node` on a flash file made with other settings: the start is
//! refused with an error naming `--reformat-tiers`, a refused start leaves
//! the file as it was, `--reformat-tiers` alone keeps PERSIST blocks (and
//! so refuses), and with `--discard-persist` the node starts on a fresh
//! tier. Real processes, a real file.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::client::{Client, PutOptions};
use dataplane::proto::{tier, BlockId, JobHints, Status};
use pollen_tests::proc::{pollen_bin, NodeProc};
use pollen_tests::{bytes, TierDir};

/// Runs `pollen node ARGS`, which must exit with an error; returns its stderr.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(pollen_bin())
        .arg("node")
        .args(["--port", "0", "--no-pin", "--controller", "http://127.0.0.1:9"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pollen node");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for pollen node") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pollen node {args:?} did not stop; it should refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("stderr");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success(), "pollen node {args:?} started: {err}");
    err
}

fn with<'a>(common: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    extra.iter().chain(common).copied().collect()
}

#[test]
fn a_tier_made_with_other_settings_needs_reformat_tiers() {
    let dir = TierDir::new("reformat");
    let spec = format!("{}:{}", dir.file("flash").display(), 4 << 20);
    let common = ["--block-size", "16KiB", "--dram-gb", "0.0625", "--flash", spec.as_str()];
    let data = bytes(40 << 10, 7);

    // One core: a PERSIST object on flash, and its block ids.
    let node = NodeProc::start(&with(&common, &["--cores", "1"]));
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.register_job("keep", JobHints::default()).unwrap();
    let opts = PutOptions { tier: Some(tier::FLASH), persist: true, ..PutOptions::default() };
    c.put_buffer(&job, "kept", &data, opts).unwrap();
    let blocks: Vec<BlockId> = c.lookup(&job, "kept").unwrap().blocks.iter().map(|l| l.block).collect();
    assert_eq!(blocks.len(), 3);
    assert!(blocks.iter().all(|b| b.tier() == tier::FLASH));
    drop(c);
    node.kill();
    let read_first = |node: &NodeProc| {
        let mut c = Client::connect(node.addr).unwrap();
        c.read_block(blocks[0], 0, 16 << 10)
    };

    // Two cores: refused, naming the option; the file is left as it was
    // (twice, and the one-core node still reads the PERSIST block).
    for _ in 0..2 {
        let err = refused(&with(&common, &["--cores", "2"]));
        assert!(err.contains("--reformat-tiers"), "{err}");
        assert!(err.contains("flash tier") && err.contains("region"), "{err}");
    }
    let node = NodeProc::start(&with(&common, &["--cores", "1"]));
    assert_eq!(read_first(&node).unwrap(), data[..16 << 10], "a refused start changed nothing");
    node.kill();

    // --reformat-tiers alone keeps PERSIST blocks, so it refuses too.
    let err = refused(&with(&common, &["--cores", "2", "--reformat-tiers"]));
    assert!(err.contains("PERSIST") && err.contains("--discard-persist"), "{err}");
    let err = refused(&with(&common, &["--cores", "2", "--discard-persist"]));
    assert!(err.contains("only goes with --reformat-tiers"), "{err}");

    // With --discard-persist: a fresh tier on both cores; the old blocks are gone.
    let node = NodeProc::start(&with(&common, &["--cores", "2", "--reformat-tiers", "--discard-persist"]));
    let err = read_first(&node).unwrap_err();
    assert_eq!(err.status(), Some(Status::NotFound), "{err}");
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.register_job("fresh", JobHints::default()).unwrap();
    for core in 0..2 {
        let b = c.alloc_block_on(&job, core, tier::FLASH).unwrap();
        c.write_block(b, 0, &data[..5000]).unwrap();
        assert_eq!(c.read_block(b, 0, 5000).unwrap(), data[..5000]);
    }
    drop(c);
    node.kill();

    // The new layout opens as it is, without the option.
    let node = NodeProc::start(&with(&common, &["--cores", "2"]));
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.register_job("again", JobHints::default()).unwrap();
    let b = c.alloc_block_on(&job, 1, tier::FLASH).unwrap();
    c.write_block(b, 0, b"after").unwrap();
    assert_eq!(c.read_block(b, 0, 5).unwrap(), b"after");
    drop(c);
    node.kill();
}

/// A tier file without PERSIST blocks: `--reformat-tiers` alone reformats
/// it (here for another block size), and the ephemeral blocks are gone.
#[test]
fn reformat_tiers_formats_a_tier_without_persist_blocks() {
    let dir = TierDir::new("reformat-eph");
    let spec = format!("{}:{}", dir.file("flash").display(), 4 << 20);
    let common = ["--cores", "1", "--dram-gb", "0.0625", "--flash", spec.as_str()];
    let node = NodeProc::start(&with(&common, &["--block-size", "16KiB"]));
    let mut c = Client::connect(node.addr).unwrap();
    let job = c.register_job("eph", JobHints::default()).unwrap();
    let b = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    c.write_block(b, 0, b"ephemeral").unwrap();
    drop(c);
    node.kill();

    let err = refused(&with(&common, &["--block-size", "32KiB"]));
    assert!(err.contains("block size 16384") && err.contains("--reformat-tiers"), "{err}");
    let node = NodeProc::start(&with(&common, &["--block-size", "32KiB", "--reformat-tiers"]));
    let mut c = Client::connect(node.addr).unwrap();
    assert_eq!(c.read_block(b, 0, 9).unwrap_err().status(), Some(Status::NotFound));
    let job = c.register_job("eph", JobHints::default()).unwrap();
    let nb = c.alloc_block_on(&job, 0, tier::FLASH).unwrap();
    let big = bytes(32 << 10, 3);
    c.write_block(nb, 0, &big).unwrap();
    assert_eq!(c.read_block(nb, 0, 32 << 10).unwrap(), big, "blocks of the new size");
    drop(c);
    node.kill();
}
