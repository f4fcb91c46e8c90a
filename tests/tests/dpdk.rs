//! The DPDK transport beyond the node suite (which runs over DPDK too, in
//! `node.rs`): malformed frames and TCP segments injected on the tap device
//! are dropped or answered without harm, and every mbuf returns to its pool.
//! Needs the `dpdk` feature and root; skipped, saying so, otherwise.
#![cfg(feature = "dpdk")]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dataplane::client::{Client, PutOptions};
use dataplane::node::{NetBackend, Node, NodeConfig, PollMode};
use dataplane::proto::{JobHints, Opcode, Status};
use nix::libc;
use pollen_tests::raw::Raw;
use pollen_tests::{bytes, dpdk, start_node};

fn start() -> Option<Node> {
    if !dpdk::available() {
        eprintln!("skipped: DPDK tests need root and /dev/net/tun");
        return None;
    }
    let cfg = NodeConfig {
        cores: 2,
        pin: false,
        poll_mode: PollMode::Adaptive,
        spin_us: 50,
        net: NetBackend::Dpdk,
        block_size: 64 << 10,
        dram_bytes_per_core: 64 * (64 << 10),
        ..NodeConfig::default()
    };
    let n = start_node(cfg);
    assert_eq!(n.report().net, NetBackend::Dpdk);
    Some(n)
}

/// The CPUs a thread may run on (`Cpus_allowed_list` of /proc/PATH/status).
fn cpus_allowed(path: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{path}/status")).expect("thread status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_string()
}

fn mbufs(n: &Node) -> u64 {
    n.dpdk_counters().expect("a DPDK node has counters").mbufs_in_use
}

/// Polls until the pools hold `want` buffers out again (connections closing
/// and freeing their last frames take a few passes).
fn wait_mbufs(n: &Node, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mbufs(n) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(mbufs(n), want, "mbufs out of their pools after the test (start value {want})");
}

/// Sends raw Ethernet frames into the tap device from the kernel side.
struct Injector {
    fd: i32,
    ifindex: i32,
}

impl Injector {
    fn new() -> Injector {
        let name = std::ffi::CString::new(dpdk::iface()).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "tap interface {} exists", dpdk::iface());
        // SAFETY: plain socket(2) call; protocol 0 means send-only.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        Injector { fd, ifindex }
    }

    /// Sends `frame`; whether the kernel took it whole.
    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: frame and sll are valid for the call's duration.
        let rc = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        // The kernel may refuse a frame itself: the ones it takes are what
        // the node must survive (the test checks that nearly all were taken).
        rc == frame.len() as isize
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(self.fd) };
    }
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet carrying `tcp` from the kernel side to the node, with
/// correct IP and TCP checksums, so the stack's TCP parser sees it.
fn ipv4_tcp(tcp: &[u8]) -> Vec<u8> {
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (dpdk::kernel_ip(), dpdk::node_ip());
    let mut t = tcp.to_vec();
    if t.len() >= 18 {
        t[16] = 0;
        t[17] = 0;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&t);
        let c = checksum(&pseudo, 0);
        t[16..18].copy_from_slice(&c.to_be_bytes());
    }
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&t);
    eth(0x0800, &ip)
}

fn tcp(dst_port: u16, seq: u32, flags: u8, data_offset_words: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&40001u16.to_be_bytes());
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.push(data_offset_words << 4);
    t.push(flags);
    t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(options);
    t.extend_from_slice(payload);
    t
}

/// Frames no correct peer sends: runts, bad IPv4 headers, lengths that lie,
/// fragments, TCP with impossible header lengths, contradictory flags and
/// broken options, truncated ARP, and random bytes.
fn malformed_frames() -> Vec<Vec<u8>> {
    let mut v = vec![
        eth(0x0800, &[]),
        eth(0x0800, &[0x45]),
        eth(0x0806, &[0, 1, 8, 0]),
        eth(0x0806, &[0xff; 28]),
        eth(0x86dd, &[0x60; 40]),
    ];
    // IHL 2, IHL 15 with a short packet, total length past the frame.
    let mut bad_ihl = ipv4_tcp(&tcp(7400, 1, 0x02, 5, &[], &[]));
    bad_ihl[14] = 0x42;
    v.push(bad_ihl);
    let mut long_ihl = ipv4_tcp(&tcp(7400, 1, 0x02, 5, &[], &[]));
    long_ihl[14] = 0x4f;
    v.push(long_ihl);
    let mut lying = ipv4_tcp(&tcp(7400, 1, 0x02, 5, &[], &[]));
    lying[16..18].copy_from_slice(&60000u16.to_be_bytes());
    v.push(lying);
    // A later fragment of nothing, and a first fragment with more to come.
    let mut frag = ipv4_tcp(&tcp(7400, 1, 0x02, 5, &[], &[1; 64]));
    frag[20..22].copy_from_slice(&0x2001u16.to_be_bytes());
    v.push(frag);
    // TCP: header length 4 words (< 5), 15 words in a 20-byte segment,
    // SYN+FIN+RST+URG, an option of length 0, an option running past the
    // header, a SYN with a huge window scale, data to a port nobody serves.
    v.push(ipv4_tcp(&tcp(7400, 7, 0x02, 4, &[], &[])));
    v.push(ipv4_tcp(&tcp(7400, 7, 0x02, 15, &[], &[])));
    v.push(ipv4_tcp(&tcp(7400, 7, 0x2f, 5, &[], b"junk")));
    v.push(ipv4_tcp(&tcp(7400, 7, 0x02, 6, &[2, 0, 0, 0], &[])));
    v.push(ipv4_tcp(&tcp(7400, 7, 0x02, 6, &[2, 40, 5, 0xb4], &[])));
    v.push(ipv4_tcp(&tcp(7400, 7, 0x02, 7, &[3, 3, 200, 1, 2, 4, 0, 0], &[])));
    v.push(ipv4_tcp(&tcp(9, 7, 0x18, 5, &[], &[0xaa; 100])));
    // An ACK with data for a connection that does not exist.
    v.push(ipv4_tcp(&tcp(7401, 0x1234_5678, 0x18, 5, &[], &[0x55; 300])));
    // Random bytes behind IPv4 and ARP ethertypes.
    for i in 0..200u64 {
        let payload = bytes(20 + (i as usize * 37) % 1400, i + 1);
        v.push(eth(if i % 5 == 0 { 0x0806 } else { 0x0800 }, &payload));
    }
    v
}

/// Puts, gets, a pipeline and a large object, then malformed frames and
/// segments, then the same again: every answer is right, the node is up,
/// and the pools hold as many buffers out as they did at the start.
#[test]
fn malformed_input_is_survived_and_no_mbuf_leaks() {
    let before = cpus_allowed("thread-self");
    let Some(n) = start() else { return };
    // The EAL pins the thread that initialises it; the node puts that back,
    // and its unpinned cores may run anywhere the process may.
    assert_eq!(cpus_allowed("thread-self"), before, "the caller's CPU affinity is restored");
    for tid in n.core_thread_ids() {
        assert_eq!(cpus_allowed(&format!("self/task/{tid}")), before, "core thread {tid} is not pinned");
    }
    let start_mbufs = mbufs(&n);
    let c0 = n.dpdk_counters().unwrap();

    let work = |round: u64| {
        let mut c = Client::connect(n.addr()).unwrap();
        let job = c.register_job(&format!("dpdk{round}"), JobHints::default()).unwrap();
        for (i, size) in [0usize, 1, 1500, 64 << 10, 700 << 10].into_iter().enumerate() {
            let data = bytes(size, round * 10 + i as u64);
            c.put_buffer(&job, &format!("o{i}"), &data, PutOptions::default()).unwrap();
            assert_eq!(c.get_buffer(&job, &format!("o{i}")).unwrap(), data, "size {size}");
        }
        // 64 pipelined pings on each core's port.
        for addr in n.core_addrs() {
            let mut raw = Raw::connect(addr);
            let mut batch = Vec::new();
            for id in 0..64u64 {
                batch.extend(Raw::frame(Opcode::Ping, 0, id, &[], &id.to_le_bytes()));
            }
            raw.send(&batch);
            let mut seen: Vec<u64> = (0..64).map(|_| raw.recv().expect("pong").header.request_id).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..64).collect::<Vec<_>>());
        }
        // A malformed protocol frame gets an error and a close.
        let mut raw = Raw::connect(n.addr());
        raw.send(&[0xde; 64]);
        let r = raw.recv().expect("an error response");
        assert_eq!(r.header.status, Status::Malformed as u16);
        assert!(raw.closed());
    };

    work(1);
    let inj = Injector::new();
    let frames = malformed_frames();
    // Alone first: the kernel takes (nearly) every frame, and the port sees
    // at least that many, so the node did receive what it must survive.
    let rx_before = n.dpdk_counters().unwrap().rx_packets;
    let taken = frames.iter().filter(|f| inj.send(f)).count();
    assert!(taken * 10 >= frames.len() * 9, "the kernel took only {taken} of {} frames", frames.len());
    let deadline = Instant::now() + Duration::from_secs(10);
    let arrived = || n.dpdk_counters().unwrap().rx_packets - rx_before;
    while arrived() < taken as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(arrived() >= taken as u64, "the port received {} of the {taken} injected frames", arrived());
    // Interleaved with live traffic too.
    std::thread::scope(|s| {
        s.spawn(|| {
            for f in frames.iter().rev() {
                inj.send(f);
            }
        });
        work(2);
    });
    work(3);
    let c1 = n.dpdk_counters().unwrap();
    assert!(c1.rx_packets > c0.rx_packets);
    assert_eq!(n.report().cores.len(), 2, "both cores still report");
    wait_mbufs(&n, start_mbufs);
    // Every connection the clients closed is closed on the node too.
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = || n.report().cores.iter().map(|c| c.connections).sum::<u64>();
    while open() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(open(), 0, "connections left open on the node");
    n.shutdown();
}

/// A burst of connections at once, more than the listening sockets a port
/// keeps ready: each is accepted (SYNs wait for listeners instead of being
/// reset), answers, and closes.
#[test]
fn a_burst_of_connections_is_accepted() {
    let Some(n) = start() else { return };
    let addr = n.addr();
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..32u64)
            .map(|i| {
                s.spawn(move || {
                    let mut r = Raw::connect(addr);
                    r.send(&Raw::frame(Opcode::Ping, 0, i, &[], &i.to_le_bytes()));
                    let resp = r.recv().expect("a pong");
                    assert_eq!((resp.header.request_id, resp.body), (i, i.to_le_bytes().to_vec()));
                })
            })
            .collect();
        for t in threads {
            t.join().expect("every connection is accepted and answered");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = || n.report().cores.iter().map(|c| c.connections).sum::<u64>();
    while open() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(open(), 0, "connections left open on the node");
    n.shutdown();
}
