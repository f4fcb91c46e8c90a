//! Pollen's control plane: the controller (an async HTTP/JSON daemon that
//! tracks nodes by their heartbeats), the node-side heartbeat thread, and the
//! shared pieces of the `pollen` and `pollenctl` binaries.
//!
//! The control plane never touches a block: data moves between clients and
//! nodes over the binary protocol; the controller only sees reports.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod controller;
pub mod heartbeat;
pub mod local;
pub mod provision;
pub mod size;
pub mod table;
pub mod tls;
pub mod view;
