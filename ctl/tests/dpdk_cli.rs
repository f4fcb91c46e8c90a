//! `pollen node --net dpdk` end to end through the binaries, on DPDK's
//! net_tap device: `pollenctl cores` reports the DPDK backend, and `pollenctl
//! put` / `get` move an object through the kernel's TCP to the node's
//! user-space stack. Needs the `dpdk` feature and root; skipped otherwise.
#![cfg(feature = "dpdk")]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pollen_ctl::api::CoresResponse;

use pollen_tests::control::Reaper;

const POLLEN: &str = env!("CARGO_BIN_EXE_pollen");
const POLLENCTL: &str = env!("CARGO_BIN_EXE_pollenctl");

fn root() -> bool {
    let uid0 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    uid0 && Path::new("/dev/net/tun").exists()
}

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(POLLENCTL).args(args).current_dir(cwd).output().expect("run pollenctl")
}

#[test]
fn pollen_node_on_dpdk_serves_pollenctl() {
    if !root() {
        eprintln!("skipped: DPDK tests need root and /dev/net/tun");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, url) = pollen_tests::control::spawn_controller(dir.path(), "127.0.0.1:0", &[]);

    // A per-process tap and subnet of the benchmarking range (198.19.0.0/16).
    let iface = format!("pcli{}", std::process::id() % 100_000);
    let net = std::process::id() % 250;
    let (node_ip, kernel_ip) = (format!("198.19.{net}.2"), format!("198.19.{net}.1"));
    let eal = format!("--no-huge --no-pci --no-shconf --no-telemetry -m 512 -l 0 --log-level=*:error --vdev=net_tap0,iface={iface}");
    let ip_arg = format!("{node_ip}/24");
    let mut node = Reaper(Some(
        Command::new(POLLEN)
            .args(["node", "--net", "dpdk", "--cores", "2", "--no-pin", "--dram-gb", "0.0625"])
            .args(["--ip", &ip_arg, "--dpdk-args", &eal])
            .args(["--node-id", "dpdk", "--heartbeat-ms", "100", "--controller", &url])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("node.err")).unwrap())
            .spawn()
            .expect("spawn pollen node"),
    ));
    let node_log = || std::fs::read_to_string(dir.path().join("node.err")).unwrap_or_default();

    // The tap appears once the node's EAL is up; then the kernel side gets
    // its address.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new("/sys/class/net").join(&iface).exists() {
        assert!(Instant::now() < deadline, "no tap {iface} in 30 s\n{}", node_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = format!("{kernel_ip}/24");
    for args in [vec!["addr", "add", &addr, "dev", &iface], vec!["link", "set", &iface, "up"]] {
        let out = Command::new("ip").args(&args).output().expect("run ip(8)");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Both cores report, on the DPDK backend.
    let deadline = Instant::now() + Duration::from_secs(30);
    let cores = loop {
        let out = run(&["--controller", &url, "cores", "--json"], dir.path());
        if out.status.success() {
            let r: CoresResponse = serde_json::from_slice(&out.stdout).expect("cores JSON");
            if r.cores.len() == 2 {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the node's cores never reported\n{}", node_log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(cores.cores.iter().all(|c| c.net.to_string() == "dpdk"), "{cores:?}");
    let table = run(&["--controller", &url, "cores"], dir.path());
    assert!(String::from_utf8_lossy(&table.stdout).contains("dpdk"));

    // An object of 40 blocks through pollenctl, byte for byte.
    let data: Vec<u8> = (0..(2600u32 << 10)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(dir.path().join("in"), &data).unwrap();
    let put = run(&["--controller", &url, "put", "demo", "obj", "in"], dir.path());
    assert!(put.status.success(), "put: {}\n{}", String::from_utf8_lossy(&put.stderr), node_log());
    let get = run(&["--controller", &url, "get", "demo", "obj", "out"], dir.path());
    assert!(get.status.success(), "get: {}", String::from_utf8_lossy(&get.stderr));
    assert!(std::fs::read(dir.path().join("out")).unwrap() == data, "the object round-trips");

    let exit = node.terminate();
    assert!(exit.success(), "pollen node exited with {exit}\n{}", node_log());
    let exit = ctl.terminate();
    assert!(exit.success(), "pollen controller exited with {exit}");
}
