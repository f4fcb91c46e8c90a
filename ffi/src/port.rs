//! Ethernet ports and their queue pairs: one rx/tx queue pair per polling
//! core, with flows spread over the rx queues by RSS.

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::{sys, DpdkError, Eal, Mbuf, Mempool};

/// How to set a port up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub port_id: u16,
    /// Queue pairs, one per polling core.
    pub queues: u16,
    pub rx_descriptors: u16,
    pub tx_descriptors: u16,
    /// Buffers in each queue's pool: the rx ring's descriptors plus packets
    /// in flight (received and not yet processed, or built and not yet sent).
    pub mbufs_per_queue: u32,
    /// Per-lcore cache of each pool.
    pub mbuf_cache: u32,
}

impl PortConfig {
    pub fn new(port_id: u16, queues: u16) -> PortConfig {
        PortConfig {
            port_id,
            queues,
            rx_descriptors: 1024,
            tx_descriptors: 1024,
            mbufs_per_queue: 8191,
            mbuf_cache: 256,
        }
    }
}

/// What a port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub driver: String,
    pub mac: [u8; 6],
    pub max_rx_queues: u16,
    pub max_tx_queues: u16,
    /// Hash types the port's RSS supports (0: no RSS).
    pub rss_offloads: u64,
    /// Hash types in use (0 with one queue or without RSS).
    pub rss_in_use: u64,
    pub socket: i32,
}

/// A port's counters (from the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_no_mbuf: u64,
}

/// Ports configured by a live `Port` (a port serves one owner at a time).
static IN_USE: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A started port. Its queue pairs are handed out once; the port stops when
/// the `Port` and every queue pair are dropped.
pub struct Port {
    inner: Arc<Started>,
    queues: Vec<QueuePair>,
}

struct Started {
    id: u16,
    info: PortInfo,
    pools: Vec<&'static Mempool>,
}

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: no queue pair is left (each holds an Arc of self), so no
        // thread polls the port while it stops.
        let rc = unsafe { sys::rte_eth_dev_stop(self.id) };
        if rc != 0 {
            eprintln!("pollen: stopping DPDK port {} failed: {}", self.id, crate::strerror(rc.abs()));
        }
        if let Some(s) = IN_USE.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            s.remove(&self.id);
        }
    }
}

impl Port {
    /// Configures and starts port `cfg.port_id` with `cfg.queues` queue pairs.
    pub fn start(eal: &Eal, cfg: &PortConfig) -> Result<Port, DpdkError> {
        let id = cfg.port_id;
        if cfg.queues == 0 {
            return Err(DpdkError::Invalid("a port needs at least one queue".into()));
        }
        // SAFETY: no arguments besides a port number, which is checked.
        let valid = unsafe { sys::rte_eth_dev_is_valid_port(id) } != 0;
        if !valid {
            // SAFETY: no arguments.
            let n = unsafe { sys::rte_eth_dev_count_avail() };
            return Err(DpdkError::Invalid(format!(
                "DPDK port {id} does not exist ({n} ports available: bind a NIC to a DPDK driver or add a --vdev)"
            )));
        }
        {
            let mut g = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
            if !g.get_or_insert_with(HashSet::new).insert(id) {
                return Err(DpdkError::Invalid(format!("DPDK port {id} is already in use in this process")));
            }
        }
        match Self::configure(eal, cfg) {
            Ok(p) => Ok(p),
            Err(e) => {
                if let Some(s) = IN_USE.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    s.remove(&id);
                }
                Err(e)
            }
        }
    }

    fn configure(eal: &Eal, cfg: &PortConfig) -> Result<Port, DpdkError> {
        let id = cfg.port_id;
        let mut raw = sys::pollen_port_info::default();
        // SAFETY: raw is a valid, writable struct of the shim's type.
        let rc = unsafe { sys::pollen_port_info(id, &mut raw) };
        if rc != 0 {
            return Err(DpdkError::call(format!("port {id} info"), rc));
        }
        let driver = raw.driver.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect::<String>();
        if raw.max_rx_queues < cfg.queues || raw.max_tx_queues < cfg.queues {
            return Err(DpdkError::Invalid(format!(
                "DPDK port {id} ({driver}) has {} rx and {} tx queues; {} cores need as many of each",
                raw.max_rx_queues, raw.max_tx_queues, cfg.queues
            )));
        }
        let rss_in_use = if cfg.queues > 1 {
            {
                // SAFETY: no arguments; returns a constant.
                raw.flow_type_rss_offloads & unsafe { sys::pollen_rss_hash_types() }
            }
        } else {
            0
        };
        // SAFETY: plain values; the shim fills rte_eth_conf itself.
        let rc = unsafe { sys::pollen_port_configure(id, cfg.queues, rss_in_use) };
        if rc != 0 {
            return Err(DpdkError::call(format!("configure port {id} with {} queues", cfg.queues), rc));
        }
        let socket = if raw.socket_id < 0 { 0 } else { raw.socket_id };
        let mut pools = Vec::with_capacity(cfg.queues as usize);
        for q in 0..cfg.queues {
            let pool = Mempool::get_or_create(
                eal,
                &format!("pollen_p{id}_q{q}_{}", cfg.mbufs_per_queue),
                cfg.mbufs_per_queue,
                cfg.mbuf_cache,
                socket,
            )?;
            // SAFETY: the port is configured and stopped; a null rxconf means
            // the driver's defaults; the pool outlives the port (it lives
            // until the process exits).
            let rc = unsafe {
                sys::rte_eth_rx_queue_setup(
                    id,
                    q,
                    cfg.rx_descriptors,
                    socket as u32,
                    std::ptr::null(),
                    pool.as_ptr(),
                )
            };
            if rc != 0 {
                return Err(DpdkError::call(format!("set up rx queue {q} of port {id}"), rc));
            }
            // SAFETY: as above; a null txconf means the driver's defaults.
            let rc = unsafe {
                sys::rte_eth_tx_queue_setup(id, q, cfg.tx_descriptors, socket as u32, std::ptr::null())
            };
            if rc != 0 {
                return Err(DpdkError::call(format!("set up tx queue {q} of port {id}"), rc));
            }
            pools.push(pool);
        }
        // SAFETY: every queue is set up.
        let rc = unsafe { sys::rte_eth_dev_start(id) };
        if rc != 0 {
            return Err(DpdkError::call(format!("start port {id}"), rc));
        }
        let info = PortInfo {
            driver,
            mac: raw.mac,
            max_rx_queues: raw.max_rx_queues,
            max_tx_queues: raw.max_tx_queues,
            rss_offloads: raw.flow_type_rss_offloads,
            rss_in_use,
            socket,
        };
        let inner = Arc::new(Started { id, info, pools });
        let queues = (0..cfg.queues)
            .map(|q| QueuePair { port: id, queue: q, pool: inner.pools[q as usize], _port: inner.clone() })
            .collect();
        Ok(Port { inner, queues })
    }

    pub fn id(&self) -> u16 {
        self.inner.id
    }

    pub fn info(&self) -> &PortInfo {
        &self.inner.info
    }

    /// Hands out the queue pairs (once; later calls return none).
    pub fn take_queues(&mut self) -> Vec<QueuePair> {
        std::mem::take(&mut self.queues)
    }

    /// Buffers of the port's pools not in their pools: rx rings, packets in
    /// flight, buffers held by their owners.
    pub fn mbufs_in_use(&self) -> u64 {
        self.inner.pools.iter().map(|p| p.in_use() as u64).sum()
    }

    pub fn stats(&self) -> Result<PortStats, DpdkError> {
        port_stats(self.inner.id)
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> Result<bool, DpdkError> {
        // SAFETY: a port number only.
        let rc = unsafe { sys::pollen_port_link_up(self.inner.id) };
        if rc < 0 {
            return Err(DpdkError::call(format!("link status of port {}", self.inner.id), rc));
        }
        Ok(rc == 1)
    }

    /// A handle to read the port's figures from other threads.
    pub fn monitor(&self) -> PortMonitor {
        PortMonitor { inner: self.inner.clone() }
    }
}

fn port_stats(id: u16) -> Result<PortStats, DpdkError> {
    let mut s = sys::pollen_port_stats::default();
    // SAFETY: s is a valid, writable struct of the shim's type.
    let rc = unsafe { sys::pollen_port_stats(id, &mut s) };
    if rc != 0 {
        return Err(DpdkError::call(format!("stats of port {id}"), rc));
    }
    Ok(PortStats {
        rx_packets: s.ipackets,
        tx_packets: s.opackets,
        rx_bytes: s.ibytes,
        tx_bytes: s.obytes,
        rx_missed: s.imissed,
        rx_errors: s.ierrors,
        tx_errors: s.oerrors,
        rx_no_mbuf: s.rx_nombuf,
    })
}

/// Reads a started port's figures; keeps the port started while it lives.
#[derive(Clone)]
pub struct PortMonitor {
    inner: Arc<Started>,
}

impl PortMonitor {
    pub fn info(&self) -> &PortInfo {
        &self.inner.info
    }

    pub fn mbufs_in_use(&self) -> u64 {
        self.inner.pools.iter().map(|p| p.in_use() as u64).sum()
    }

    pub fn stats(&self) -> Result<PortStats, DpdkError> {
        port_stats(self.inner.id)
    }
}

/// One rx/tx queue pair of a started port, owned by the one thread that
/// polls it (DPDK's burst calls on a queue are not thread safe; the pair is
/// `Send` but not `Sync` or `Clone`).
pub struct QueuePair {
    port: u16,
    queue: u16,
    pool: &'static Mempool,
    _port: Arc<Started>,
}

impl QueuePair {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn queue(&self) -> u16 {
        self.queue
    }

    pub fn pool(&self) -> &'static Mempool {
        self.pool
    }

    /// Receives up to `max` packets into `out`; returns how many.
    pub fn rx_burst(&mut self, out: &mut Vec<Mbuf>, max: usize) -> usize {
        const BURST: usize = 64;
        let mut raw: [*mut sys::rte_mbuf; BURST] = [std::ptr::null_mut(); BURST];
        let want = max.min(BURST) as u16;
        // SAFETY: &mut self means this thread alone polls the queue; raw has
        // room for `want` pointers.
        let n = unsafe { sys::pollen_rx_burst(self.port, self.queue, raw.as_mut_ptr(), want) } as usize;
        debug_assert!(n <= want as usize);
        for &p in &raw[..n] {
            if let Some(p) = NonNull::new(p) {
                // SAFETY: the driver hands each received mbuf to the caller.
                out.push(unsafe { Mbuf::from_raw(p) });
            }
        }
        n
    }

    /// Queues packets from the front of `pkts` for transmission; those
    /// taken are removed from `pkts` (the driver frees them once sent), the
    /// rest stay for a later call. Returns how many were taken.
    pub fn tx_burst(&mut self, pkts: &mut Vec<Mbuf>) -> usize {
        const BURST: usize = 64;
        let mut total = 0;
        while total < pkts.len() {
            let n = (pkts.len() - total).min(BURST);
            let mut raw: [*mut sys::rte_mbuf; BURST] = [std::ptr::null_mut(); BURST];
            for (r, m) in raw.iter_mut().zip(&pkts[total..total + n]) {
                *r = m.as_raw();
            }
            // SAFETY: &mut self means this thread alone uses the queue; raw
            // holds n valid mbufs, still owned by `pkts` until the count
            // comes back.
            let sent =
                unsafe { sys::pollen_tx_burst(self.port, self.queue, raw.as_mut_ptr(), n as u16) } as usize;
            debug_assert!(sent <= n);
            total += sent;
            if sent < n {
                break;
            }
        }
        for m in pkts.drain(..total) {
            // The driver owns the sent buffers now.
            let _ = m.into_raw();
        }
        total
    }

    /// Asks the driver to free buffers of packets it has finished sending
    /// (drivers that free lazily hold them until descriptors are reused).
    pub fn tx_cleanup(&mut self) {
        // SAFETY: &mut self: this thread alone uses the queue; 0 means all.
        let _ = unsafe { sys::rte_eth_tx_done_cleanup(self.port, self.queue, 0) };
    }
}
