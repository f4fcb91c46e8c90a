//! Pollen's node: pinned polling cores that serve blocks and namespaces over a
//! binary protocol, and the client library that speaks it.

pub mod auth;
pub mod client;
pub mod core;
pub mod meta;
pub mod node;
pub mod proto;
pub mod report;
pub mod storage;
pub mod transport;

/// Whether this build has the DPDK transport (feature `dpdk`). Builds that
/// must match this one's features (the tests' build of the `pollen`
/// binary) read it.
pub const DPDK: bool = cfg!(feature = "dpdk");
