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

#[test]
fn closed_loop_get_pollen_floor_and_redis() {
    let r = bench(&["--op", "get", "--size", "1024", "--conns", "2", "--pipeline", "2", "--rounds", "2"]);
    assert_eq!(r["ok"], true);
    assert_eq!(r["config"]["op"], "get");
    check_measured(&r, "pollen");
    check_measured(&r, "echo");
    // Same frame sizes on the wire for Pollen and its floor.
    assert_eq!(target(&r, "pollen")["response_bytes"], 24 + 1024);
    assert_eq!(target(&r, "echo")["response_bytes"], 24 + 1024);
    let redis = target(&r, "redis");
    match redis["status"].as_str().unwrap() {
        "ok" => check_measured(&r, "redis"),
        "skipped" => assert!(redis["reason"].as_str().unwrap().contains("not found")),
        other => panic!("redis {other}: {redis:#}"),
    }
    let rounds = target(&r, "pollen")["result"]["rounds"].as_array().expect("per-round figures");
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|x| x["requests"].as_u64().unwrap() > 0));
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

#[test]
fn bad_arguments_fail_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-bench"))
        .args(["--mode", "open", "--pollen", "off", "--peers", "echo"])
        .output()
        .expect("the bench binary runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
}
