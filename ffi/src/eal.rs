//! The Environment Abstraction Layer: initialised once per process (DPDK
//! cannot initialise it twice, even after cleanup), and kept until exit.

use std::ffi::CString;
use std::sync::Mutex;

use crate::{sys, DpdkError};

/// Proof that the EAL is initialised; obtained from [`Eal::init`].
#[derive(Debug)]
pub struct Eal {
    args: Vec<String>,
}

/// The EAL of this process, once initialised.
static EAL: Mutex<Option<&'static Eal>> = Mutex::new(None);

impl Eal {
    /// Initialises the EAL with `args` (as on DPDK's command line, without
    /// the program name). A later call with the same arguments returns the
    /// same EAL; with different ones it fails, since the EAL of a process
    /// cannot change.
    pub fn init(args: &[String]) -> Result<&'static Eal, DpdkError> {
        let mut g = EAL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(eal) = *g {
            if eal.args == args {
                return Ok(eal);
            }
            return Err(DpdkError::Invalid(format!(
                "DPDK's EAL is already initialised in this process with {:?}; it cannot be re-initialised with {args:?}",
                eal.args
            )));
        }
        let mut owned = Vec::with_capacity(args.len() + 1);
        for a in std::iter::once("pollen").chain(args.iter().map(String::as_str)) {
            owned.push(
                CString::new(a)
                    .map_err(|_| DpdkError::Invalid(format!("EAL argument {a:?} contains NUL")))?,
            );
        }
        // The EAL may keep pointers into argv and reorders it: the strings
        // and the array live for the rest of the process.
        let owned: &'static [CString] = Vec::leak(owned);
        let argv: &'static mut [*mut std::ffi::c_char] =
            Vec::leak(owned.iter().map(|s| s.as_ptr().cast_mut()).collect());
        let argc = argv.len() as i32;
        // SAFETY: argv holds argc valid NUL-terminated strings that are never
        // freed; the EAL lock ensures a single initialisation per process.
        let rc = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if rc < 0 {
            return Err(DpdkError::call(format!("rte_eal_init({args:?})"), rc));
        }
        let eal: &'static Eal = Box::leak(Box::new(Eal { args: args.to_vec() }));
        *g = Some(eal);
        Ok(eal)
    }

    /// The arguments the EAL was initialised with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Registers the calling (non-EAL) thread with DPDK, so it gets an lcore
    /// id and with it per-lcore mempool caches. The registration ends when
    /// the returned guard is dropped, which must happen on the same thread
    /// (the guard is neither `Send` nor `Sync`).
    pub fn register_thread(&self) -> Result<ThreadRegistration, DpdkError> {
        // SAFETY: no arguments; registers the calling thread only.
        let rc = unsafe { sys::rte_thread_register() };
        if rc < 0 {
            return Err(DpdkError::call("rte_thread_register", rc));
        }
        Ok(ThreadRegistration { _not_send: std::marker::PhantomData })
    }
}

/// A registered thread; unregisters it when dropped.
pub struct ThreadRegistration {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for ThreadRegistration {
    fn drop(&mut self) {
        // SAFETY: the guard is !Send, so this runs on the thread that
        // registered; unregistering releases its lcore id.
        unsafe { sys::rte_thread_unregister() };
    }
}
