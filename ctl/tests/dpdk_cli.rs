//! `pollen node --net dpdk` end to end through the binaries, on DPDK's
//! net_tap device: `pollenctl cores` reports the DPDK backend, and `pollenctl
//! put` / `get` move an object through the kernel's TCP to the node's
//! user-space stack; a core turned off by `pollenctl cores set` takes no new
//! connections on the shared port (they open on the core that is on), keeps
//! serving its connections and its own port, and takes new connections
//! again once turned on. Needs the `dpdk` feature and root; skipped
//! otherwise.
#![cfg(feature = "dpdk")]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dataplane::proto::{Opcode, Status};
use pollen_ctl::api::{CoresResponse, NodesResponse};

use pollen_tests::control::{wait_for, Cluster, Pollenctl, Reaper, PATIENT, SMALL_POLICY};
use pollen_tests::raw::Raw;

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
    let (mut ctl, url) = pollen_tests::control::spawn_controller(dir.path(), "127.0.0.1:0", &PATIENT);

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

/// Gives the kernel side of tap `iface` its address once the node's EAL
/// created it, and brings it up.
fn tap_up(iface: &str, kernel_ip: &str, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new("/sys/class/net").join(iface).exists() {
        assert!(Instant::now() < deadline, "no tap {iface} in 30 s\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = format!("{kernel_ip}/24");
    for args in [vec!["addr", "add", &addr, "dev", iface], vec!["link", "set", iface, "up"]] {
        let out = Command::new("ip").args(&args).output().expect("run ip(8)");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Connections each core accepted so far, and whether it takes new ones on
/// the shared port (the core's own report).
fn cores(ctl: &Pollenctl) -> BTreeMap<usize, (u64, bool)> {
    ctl.core_connections()
}

/// Opens `n` connections to `addr` and waits until the node's report counts
/// them; returns them (kept open) and how many each core took.
fn connect_many(ctl: &Pollenctl, addr: SocketAddr, n: u64) -> (Vec<Raw>, Vec<u64>) {
    ctl.connect_many(n, || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw(s)
    })
}

/// A ping on `conn` comes back.
fn ping(conn: &mut Raw, id: u64) {
    conn.send(&Raw::frame(Opcode::Ping, 0, id, &[], &id.to_le_bytes()));
    let r = conn.recv().expect("a pong on an open connection");
    assert_eq!((r.header.status, r.header.request_id), (Status::Ok as u16, id));
}

#[test]
fn an_off_dpdk_core_takes_no_new_connections_on_the_shared_port() {
    if !root() {
        eprintln!("skipped: DPDK tests need root and /dev/net/tun");
        return;
    }
    // A tap and subnet of the benchmarking range apart from the other test's.
    let iface = format!("pcof{}", std::process::id() % 100_000);
    let net = (std::process::id() + 125) % 250;
    let (node_ip, kernel_ip) = (format!("198.19.{net}.2"), format!("198.19.{net}.1"));
    let eal = format!("--no-huge --no-pci --no-shconf --no-telemetry -m 512 -l 0 --log-level=*:error --vdev=net_tap0,iface={iface}");
    let ip_arg = format!("{node_ip}/24");
    let mut c = Cluster::controller(SMALL_POLICY, &PATIENT, &["--cores", "2", "--dram-gb", "0.0625"]);
    c.start_node("n1", &["--net", "dpdk", "--ip", &ip_arg, "--dpdk-args", &eal]);
    let log_path = c.dir.path().join("n1.err");
    tap_up(&iface, &kernel_ip, &|| std::fs::read_to_string(&log_path).unwrap_or_default());
    c.wait_nodes_up(1);
    let mut ctl = c.pollenctl();
    ctl.logs.push(c.dir.path().join("n1.err"));
    let nodes: NodesResponse = ctl.json(&["nodes"]);
    let report = &nodes.nodes[0].report;
    assert_eq!(report.net.to_string(), "dpdk");
    let addr: SocketAddr = report.addr.parse().expect("the node's address");
    let core1: SocketAddr = SocketAddr::new(addr.ip(), report.cores[1].port);

    // Both cores on: flows to the shared port spread over both (the tap's
    // flows are steered by their hash).
    let (_on, spread) = connect_many(&ctl, addr, 64);
    assert!(spread.iter().all(|&n| n > 0), "both cores take connections: {spread:?}");

    // Connections made before core 1 goes off, some of them on core 1: on
    // the shared port, and one on core 1's own port.
    let mut early = Vec::new();
    let mut on_core1 = 0;
    while on_core1 < 2 {
        assert!(early.len() < 256, "core 1 took none of {} connections", early.len());
        let (conns, landed) = connect_many(&ctl, addr, 8);
        early.extend(conns);
        on_core1 += landed[1];
    }
    let (mut own, landed) = connect_many(&ctl, core1, 1);
    assert_eq!(landed, vec![0, 1], "core 1's own port reaches core 1");

    ctl.ok(&["cores", "set", "n1", "1"]);
    wait_for(Duration::from_secs(10), "core 1 off", || (!cores(&ctl)[&1].1).then_some(()));
    let (mut off, landed) = connect_many(&ctl, addr, 64);
    assert_eq!(landed, vec![64, 0], "with core 1 off every new connection lands on core 0");
    for (i, conn) in off.iter_mut().enumerate() {
        ping(conn, i as u64);
    }
    // Its connections from before, on the shared port and its own, work.
    for (i, conn) in early.iter_mut().chain(own.iter_mut()).enumerate() {
        ping(conn, 1000 + i as u64);
    }
    // Its own port still takes new connections.
    let (mut direct, landed) = connect_many(&ctl, core1, 4);
    assert_eq!(landed, vec![0, 4], "an off core's own port still accepts");
    for (i, conn) in direct.iter_mut().enumerate() {
        ping(conn, 2000 + i as u64);
    }

    // On again: core 1 takes new connections on the shared port again; those
    // that opened on core 0 while it was off stay there and work.
    ctl.ok(&["cores", "set", "n1", "2"]);
    wait_for(Duration::from_secs(10), "core 1 on", || cores(&ctl)[&1].1.then_some(()));
    let (mut again, spread) = connect_many(&ctl, addr, 64);
    assert!(spread.iter().all(|&n| n > 0), "core 1 takes connections again: {spread:?}");
    for (i, conn) in off.iter_mut().chain(again.iter_mut()).enumerate() {
        ping(conn, 3000 + i as u64);
    }

    drop((early, own, off, direct, again));
    c.stop();
}
