//! Runs the bench binary in quick mode and checks that its JSON report is
//! well formed and plausible. No performance is asserted here: numbers from
//! a shared machine belong in docs/benchmarks.md, not in a test.

use std::process::Command;

use serde_json::Value;

fn bench(extra: &[&str]) -> Value {
    // Two CPUs: servers on 0, load on 1. One CPU: everything shares it.
    let client_cpu =
        if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) >= 2 { "1" } else { "0" };
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-bench"))
        .args(["--quick", "--json", "--server-cpu", "0", "--client-cpu", client_cpu])
        .args(extra)
        .output()
        .expect("the bench binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pollen-bench {extra:?} failed ({}):\n{stderr}", out.status);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

fn target<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["targets"]
        .as_array()
        .expect("targets is an array")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {report:#}"))
}

/// A measured target: requests completed, no errors, percentiles in order.
fn check_measured(report: &Value, name: &str) {
    let t = target(report, name);
    assert_eq!(t["status"], "ok", "{name}: {t:#}");
    let r = &t["result"];
    assert!(r["requests"].as_u64().unwrap() > 0, "{name}: no requests");
    assert_eq!(r["errors"].as_u64(), Some(0), "{name}: {r:#}");
    assert!(r["throughput_ops"].as_f64().unwrap() > 0.0);
    assert!(r["elapsed_s"].as_f64().unwrap() > 0.0);
    let l = &r["latency_ns"];
    let ps: Vec<u64> =
        ["min", "p50", "p90", "p99", "p99_9", "max"].iter().map(|k| l[*k].as_u64().unwrap()).collect();
    assert!(ps[0] > 0, "{name}: zero latency");
    assert!(ps.windows(2).all(|w| w[0] <= w[1]), "{name}: percentiles out of order: {ps:?}");
    let busy = r["client_busy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&busy));
    assert!(t["request_bytes"].as_u64().unwrap() > 0 && t["response_bytes"].as_u64().unwrap() > 0);
}

/// Each round measures a number of responses, not a length of time: on a
/// loaded machine (builds beside the tests) a round of a fixed half second
/// could pass without a single response, and the figures below would be
/// those of the machine's load, not of the bench. The count is bounded by
/// --max-time (60 s), which only a stalled target reaches.
#[test]
fn closed_loop_get_pollen_floor_and_redis() {
    const REQUESTS: u64 = 4000;
    const ROUNDS: u64 = 2;
    let (requests, rounds) = (REQUESTS.to_string(), ROUNDS.to_string());
    let r = bench(&[
        "--op",
        "get",
        "--size",
        "1024",
        "--conns",
        "2",
        "--pipeline",
        "2",
        "--requests",
        &requests,
        "--rounds",
        &rounds,
    ]);
    assert_eq!(r["ok"], true);
    assert_eq!(r["config"]["op"], "get");
    assert_eq!(r["config"]["requests"], REQUESTS);
    check_measured(&r, "pollen");
    check_measured(&r, "echo");
    // Same frame sizes on the wire for Pollen and its floor.
    assert_eq!(target(&r, "pollen")["response_bytes"], 24 + 1024);
    assert_eq!(target(&r, "echo")["response_bytes"], 24 + 1024);
    let redis = target(&r, "redis");
    let mut measured = vec!["pollen", "echo"];
    match redis["status"].as_str().unwrap() {
        "ok" => {
            check_measured(&r, "redis");
            measured.push("redis");
        }
        "skipped" => assert!(redis["reason"].as_str().unwrap().contains("not found"), "{redis:#}"),
        other => panic!("redis {other}: {redis:#}"),
    }
    // Every round of every measured target got its share of the responses
    // (a round stops at its count, give or take the requests in flight).
    for name in measured {
        let res = &target(&r, name)["result"];
        let rounds = res["rounds"].as_array().unwrap_or_else(|| panic!("{name}: per-round figures"));
        assert_eq!(rounds.len() as u64, ROUNDS, "{name}");
        for (i, x) in rounds.iter().enumerate() {
            let n = x["requests"].as_u64().unwrap();
            assert!(
                n >= REQUESTS / ROUNDS,
                "{name} round {i}: {n} responses, asked for {}",
                REQUESTS / ROUNDS
            );
            assert!(x["throughput_ops"].as_f64().unwrap() > 0.0, "{name} round {i}: {x:#}");
            assert!(
                x["p50_ns"].as_u64().unwrap() > 0 && x["p50_ns"].as_u64() <= x["p99_ns"].as_u64(),
                "{x:#}"
            );
        }
        let total: u64 = rounds.iter().map(|x| x["requests"].as_u64().unwrap()).sum();
        assert_eq!(res["requests"].as_u64(), Some(total), "{name}: the rounds add up to the total");
    }
    let ratios = r["ratios"].as_array().unwrap();
    let echo = ratios.iter().find(|x| x["peer"] == "echo").expect("a ratio to the floor");
    assert!(echo["p50"].as_f64().unwrap() > 0.0 && echo["throughput"].as_f64().unwrap() > 0.0);
}

#[test]
fn open_loop_put_against_the_floor() {
    let r = bench(&[
        "--op", "put", "--size", "4k", "--mode", "open", "--rate", "2000", "--conns", "2", "--peers", "echo",
    ]);
    assert_eq!(r["ok"], true);
    assert_eq!(r["config"]["mode"], "open");
    check_measured(&r, "pollen");
    check_measured(&r, "echo");
    assert_eq!(target(&r, "echo")["request_bytes"], 24 + 16 + 4096);
    assert_eq!(target(&r, "echo")["response_bytes"], 24 + 4);
}

/// fio's result when fio is installed; `None` (and checked to be skipped) when not.
fn check_fio(report: &Value) -> Option<&Value> {
    let fio = target(report, "fio");
    match fio["status"].as_str().unwrap() {
        "ok" => {
            check_measured_peer(fio, "fio");
            let cmd = fio["command"].as_str().expect("fio's command line");
            for flag in
                ["--ioengine=io_uring", "--direct=1", "--numjobs=1", "--time_based", "--cpus_allowed=0"]
            {
                assert!(cmd.contains(flag), "{flag} missing from {cmd}");
            }
            assert_eq!(report["block"]["fio_command"].as_str(), Some(cmd));
            Some(fio)
        }
        "skipped" => {
            assert!(fio["reason"].as_str().unwrap().contains("not found"), "{fio:#}");
            None
        }
        other => panic!("fio {other}: {fio:#}"),
    }
}

/// A peer measured by another program: counts and ordered percentiles only.
fn check_measured_peer(t: &Value, name: &str) {
    let r = &t["result"];
    assert!(r["requests"].as_u64().unwrap() > 0, "{name}: no requests");
    assert_eq!(r["errors"].as_u64(), Some(0), "{name}: {r:#}");
    assert!(r["throughput_ops"].as_f64().unwrap() > 0.0);
    let l = &r["latency_ns"];
    let ps: Vec<u64> =
        ["min", "p50", "p90", "p99", "p99_9", "max"].iter().map(|k| l[*k].as_u64().unwrap()).collect();
    assert!(ps[0] > 0 && ps.windows(2).all(|w| w[0] <= w[1]), "{name}: percentiles {ps:?}");
}

#[test]
fn flash_tier_random_reads_beside_the_floor_and_fio() {
    let r = bench(&[
        "--op",
        "randread",
        "--size",
        "4k",
        "--tier",
        "flash",
        "--tier-size",
        "4m",
        "--conns",
        "2",
        "--pipeline",
        "2",
    ]);
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!((r["config"]["tier"].as_str(), r["config"]["queue_depth"].as_u64()), (Some("flash"), Some(4)));
    check_measured(&r, "pollen");
    check_measured(&r, "echo");
    assert_eq!(target(&r, "pollen")["response_bytes"], 24 + 4096);
    assert!(target(&r, "pollen")["server"].as_str().unwrap().contains("flash tier in"));
    let b = &r["block"];
    let blocks = b["blocks"].as_u64().unwrap();
    assert!(blocks > 0 && blocks <= 64, "{b:#}");
    assert_eq!(b["working_set_bytes"].as_u64(), Some(blocks * b["block_size"].as_u64().unwrap()));
    assert!(b["targets"].as_array().unwrap().iter().all(|t| t["applies"] == false));
    if let Some(fio) = check_fio(&r) {
        assert!(b["iops_ratio"].as_f64().unwrap() > 0.0);
        assert!(b["p50_excess_us"].as_f64().is_some());
        let cmd = fio["command"].as_str().unwrap();
        assert!(cmd.contains("--rw=randread") && cmd.contains("--bs=4096") && cmd.contains("--iodepth=4"));
        assert!(cmd.contains(&format!("--size={}", b["working_set_bytes"])), "{cmd}");
    }
}

#[test]
fn mixed_writes_and_reads_on_flash_and_dram() {
    let r =
        bench(&["--op", "mixed", "--size", "64k", "--tier", "flash", "--tier-size", "4m", "--peers", "fio"]);
    assert_eq!(r["ok"], true, "{r:#}");
    check_measured(&r, "pollen");
    if let Some(fio) = check_fio(&r) {
        assert!(fio["command"].as_str().unwrap().contains("--rw=randrw --rwmixread=70"));
    }
    // The DRAM tier has no file: fio is skipped and said so.
    let r = bench(&["--op", "randwrite", "--size", "4k", "--tier", "dram", "--tier-size", "4m"]);
    assert_eq!(r["ok"], true, "{r:#}");
    check_measured(&r, "pollen");
    check_measured(&r, "echo");
    assert!(target(&r, "fio")["reason"].as_str().unwrap().contains("DRAM"));
}

#[test]
fn bad_arguments_fail_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-bench"))
        .args(["--mode", "open", "--pollen", "off", "--peers", "echo"])
        .output()
        .expect("the bench binary runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
}

/// `pollen-bench` runs unchanged against a node on DPDK (its net_tap test
/// device; feature `dpdk`, root only): the load goes through the kernel's
/// TCP to the node's user-space stack. A smoke test, not a measurement.
#[cfg(feature = "dpdk")]
#[test]
fn closed_loop_get_against_a_dpdk_node() {
    use dataplane::node::NetBackend;
    if !pollen_tests::dpdk::available() {
        eprintln!("skipped: DPDK tests need root and /dev/net/tun");
        return;
    }
    let n = pollen_tests::node(1, NetBackend::Dpdk, 64 << 10, 64);
    assert_eq!(n.report().net, NetBackend::Dpdk);
    let addr = n.addr().to_string();
    let r = bench(&[
        "--pollen", &addr, "--peers", "none", "--op", "get", "--size", "1024", "--conns", "2", "--rounds",
        "1",
    ]);
    assert_eq!(r["ok"], true);
    check_measured(&r, "pollen");
    n.shutdown();
}
