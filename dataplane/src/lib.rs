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
