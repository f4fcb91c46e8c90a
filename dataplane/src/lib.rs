//! Pollen's node: pinned polling cores that serve blocks and namespaces over a
//! binary protocol, and the client library that speaks it.

pub mod proto;
