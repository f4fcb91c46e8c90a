//! Pollen's binding of DPDK (behind the `dpdk` feature; without it this crate
//! is empty).
//!
//! `sys` holds what bindgen generated from the system's headers (allowlisted
//! to the calls Pollen makes) and the C shims of `native/` that reach DPDK's
//! static-inline functions. Above it, safe types: [`Eal`] (initialised once
//! per process), [`Port`] with one [`QueuePair`] per polling core (flows are
//! spread over the queues by RSS), [`Mempool`] and [`Mbuf`], an owned packet
//! buffer that goes back to its pool when dropped. `unsafe` stays in this
//! crate; nothing above it sees a raw pointer.

#[cfg(feature = "dpdk")]
mod eal;
#[cfg(feature = "dpdk")]
mod mbuf;
#[cfg(feature = "dpdk")]
mod port;

#[cfg(feature = "dpdk")]
pub use eal::{Eal, ThreadRegistration};
#[cfg(feature = "dpdk")]
pub use mbuf::{Mbuf, Mempool};
#[cfg(feature = "dpdk")]
pub use port::{Port, PortConfig, PortInfo, PortMonitor, PortStats, QueuePair};

/// The generated bindings and the shims' declarations.
#[cfg(feature = "dpdk")]
#[allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, clippy::all)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/dpdk.rs"));
}

/// A DPDK call failed.
#[cfg(feature = "dpdk")]
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("{what}: {reason} (errno {code})")]
    Call { what: String, code: i32, reason: String },
    #[error("{0}")]
    Invalid(String),
}

#[cfg(feature = "dpdk")]
impl DpdkError {
    /// An error from a call that returned a negative errno (or set
    /// `rte_errno` when `code` is 0 or -1 by convention).
    fn call(what: impl Into<String>, code: i32) -> DpdkError {
        let code = if code == -1 || code == 0 {
            // SAFETY: reads the calling thread's rte_errno; no arguments.
            unsafe { sys::pollen_errno() }
        } else {
            code.abs()
        };
        DpdkError::Call { what: what.into(), code, reason: strerror(code) }
    }
}

/// DPDK's message for an errno (its own codes included).
#[cfg(feature = "dpdk")]
fn strerror(code: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local
    // NUL-terminated string, valid until the next call on this thread; it is
    // copied out at once.
    unsafe {
        let p = sys::rte_strerror(code);
        if p.is_null() {
            return format!("error {code}");
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
