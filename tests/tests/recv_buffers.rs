//! A connection's receive buffer grows with the bytes that arrive, not with
//! the frame length a header announces. Alone in its test binary: it reads
//! the process's virtual size, which other tests' nodes would disturb.

use std::time::{Duration, Instant};

use dataplane::node::{NetBackend, NodeConfig};
use dataplane::proto::{encode_header, BlockId, BlockKey, Header, Opcode, HEADER_LEN};
use pollen_tests::raw::Raw;
use pollen_tests::{node_config, start_node};

const BS: usize = 4096;

/// The process's virtual memory size, in bytes.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmSize:")).expect("VmSize");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// 16 connections each send the header of a 16 MiB BlockWrite and 100 bytes
/// of its body: the node holds what arrived, not 16 x 16 MiB of buffers
/// (it reserved the whole frame as soon as its header was in).
#[test]
fn a_header_alone_reserves_no_frame_sized_buffer() {
    const BODY: usize = 16 << 20;
    const CONNS: usize = 16;
    let cfg = NodeConfig { max_body: BODY, ..node_config(1, NetBackend::Epoll, BS, 16) };
    let n = start_node(cfg);
    // Let the node's threads settle before the baseline.
    drop(Raw::connect(n.addr()));
    let before = vm_size();
    let key = BlockKey { block: BlockId(0), offset: 0, len: BODY as u32 }.encode();
    let mut frame = vec![0u8; HEADER_LEN];
    encode_header(&Header::request(Opcode::BlockWrite, 0, 1, key.len(), BODY), &mut frame);
    frame.extend_from_slice(&key);
    frame.extend_from_slice(&[7u8; 100]);
    let bytes_in = |n: &dataplane::node::Node| n.report().cores.iter().map(|c| c.bytes_in).sum::<u64>();
    let start_in = bytes_in(&n);
    let conns: Vec<Raw> = (0..CONNS)
        .map(|_| {
            let mut r = Raw::connect(n.addr());
            r.send(&frame);
            r
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bytes_in(&n) < start_in + (CONNS * frame.len()) as u64 {
        assert!(Instant::now() < deadline, "the node did not read the frames");
        std::thread::sleep(Duration::from_millis(5));
    }
    let grown = vm_size().saturating_sub(before);
    eprintln!("virtual size grew by {grown} bytes");
    assert!(grown < (64 << 20), "{CONNS} headers of {BODY}-byte frames grew the process by {grown} bytes");
    drop(conns);
    n.shutdown();
}
