//! The safe wrappers against a real DPDK port: the `net_tap` virtual device,
//! without huge pages or PCI. Needs the `dpdk` feature and root (a tap
//! device is created); skipped, saying so, otherwise.
#![cfg(feature = "dpdk")]

use ffi::{Eal, Port, PortConfig};

fn root() -> bool {
    // SAFETY-free: reading the effective uid through std's metadata is not
    // available, so /proc is read.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn port_queues_and_mbufs_on_a_tap_device() {
    if !root() {
        eprintln!("skipped: creating a tap device needs root");
        return;
    }
    let iface = format!("pfftap{}", std::process::id() % 100_000);
    let args: Vec<String> = [
        "--no-huge",
        "--no-pci",
        "--no-shconf",
        "-m",
        "128",
        "-l",
        "0",
        "--log-level=lib.eal:error",
        &format!("--vdev=net_tap0,iface={iface}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let eal = Eal::init(&args).expect("EAL initialises");
    assert!(Eal::init(&args).is_ok(), "the same arguments return the same EAL");
    assert!(Eal::init(&["--no-pci".to_string()]).is_err(), "other arguments are refused");
    let _reg = eal.register_thread().expect("thread registers");

    let mut cfg = PortConfig::new(0, 1);
    cfg.rx_descriptors = 256;
    cfg.mbufs_per_queue = 1023;
    cfg.mbuf_cache = 32;
    let mut port = Port::start(eal, &cfg).expect("tap port starts");
    assert_eq!(port.info().driver, "net_tap");
    assert_ne!(port.info().mac, [0; 6]);
    assert!(Port::start(eal, &cfg).is_err(), "a port serves one owner");
    let mut qs = port.take_queues();
    assert_eq!(qs.len(), 1);
    let q = &mut qs[0];

    let start = port.mbufs_in_use();
    let mut m = q.pool().alloc().expect("an mbuf");
    assert_eq!(port.mbufs_in_use(), start + 1);
    // A broadcast frame of an unused ethertype: the kernel drops it.
    let frame = m.append(60).expect("room for a minimum frame");
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&port.info().mac);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    assert_eq!(m.packet_len(), 60);
    assert_eq!(m.data().len(), 60);
    m.truncate(50);
    assert_eq!(m.data().len(), 50);
    assert!(m.append(1 << 16).is_none(), "more than the data room is refused");
    drop(m);
    assert_eq!(port.mbufs_in_use(), start, "a dropped mbuf returns to its pool");

    let mut out: Vec<_> = (0..4)
        .map(|_| {
            let mut m = q.pool().alloc().expect("mbuf");
            let f = m.append(60).expect("room");
            f[..6].copy_from_slice(&[0xff; 6]);
            f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            m
        })
        .collect();
    let sent = q.tx_burst(&mut out);
    assert_eq!(sent + out.len(), 4);
    out.clear();
    q.tx_cleanup();
    let mut rx = Vec::new();
    q.rx_burst(&mut rx, 64);
    rx.clear();
    assert_eq!(port.mbufs_in_use(), start, "sent and received buffers are all back");

    // The port stops once it and its queues are gone, and can start again.
    drop(qs);
    drop(port);
    let mut again = Port::start(eal, &cfg).expect("the port restarts");
    assert_eq!(again.take_queues().len(), 1);
}
