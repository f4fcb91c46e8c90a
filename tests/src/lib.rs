//! Helpers shared by the integration tests: nodes on ephemeral loopback ports.

use dataplane::node::{NetBackend, Node, NodeConfig, PollMode};

/// A small node for tests: adaptive polling, no pinning (tests share 2 CPUs),
/// ephemeral ports, `dram_blocks` blocks of `block_size` per core.
pub fn node(cores: usize, net: NetBackend, block_size: usize, dram_blocks: u64) -> Node {
    let cfg = NodeConfig {
        port: 0,
        core_port_base: 0,
        cores,
        pin: false,
        poll_mode: PollMode::Adaptive,
        spin_us: 50,
        net,
        block_size,
        dram_bytes_per_core: dram_blocks * block_size as u64,
        max_body: block_size.max(64 << 10),
        ..NodeConfig::default()
    };
    Node::start(cfg).expect("node starts")
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
