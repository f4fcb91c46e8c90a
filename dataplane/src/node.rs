//! A node: configuration, start-up of its pinned cores, reports, shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use crate::core::pin::{cpu_count, pin_current_thread};
use crate::core::ring::{mesh, Links};
use crate::core::{Core, CoreConfig, CoreShared, MetaStart};
use crate::meta::cluster::{ClusterView, WeightMap};
use crate::meta::log::{self as metalog, LogShape, MetaLog};
use crate::meta::Namespaces;
use crate::proto::{BlockId, Limits, NodeInfo};
use crate::report::{CoreReport, JobReport, NodeReport, TierReport};
use crate::storage::flash::{prepare_backing, Backing, Reformat, Region, RingSlots};
use crate::storage::{DramTier, FlashConfig, FlashEngine};
use crate::transport::epoll::EpollTransport;
use crate::transport::uring::{self, UringTransport, STORAGE_SLOTS};
use crate::transport::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Never sleeps: for dedicated bare-metal cores.
    Busy,
    /// Spins for an idle budget, then parks until work arrives.
    Adaptive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetBackend {
    Uring,
    Epoll,
    /// DPDK with a user-space TCP stack (cargo feature `dpdk`).
    Dpdk,
}

macro_rules! name_enum {
    ($t:ty, $($v:ident => $s:literal),+) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(<$t>::$v),)+
                    _ => Err(format!("expected one of: {}", [$($s),+].join(", "))),
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $(<$t>::$v => $s,)+ })
            }
        }
    };
}
name_enum!(PollMode, Busy => "busy", Adaptive => "adaptive");
name_enum!(NetBackend, Uring => "uring", Epoll => "epoll", Dpdk => "dpdk");

/// What a node serves (docs/control-plane.md, "Node roles"): a `storage`
/// node holds blocks and refuses namespace opcodes; a `metadata` node holds
/// namespaces and refuses `BlockAlloc` (it holds no blocks for others);
/// `both` serves everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Storage,
    Metadata,
    #[default]
    Both,
}

impl Role {
    /// Whether the node serves namespaces (is a metadata server).
    pub fn metadata(self) -> bool {
        self != Role::Storage
    }

    /// Whether the node allocates blocks for jobs (is a storage node).
    pub fn storage(self) -> bool {
        self != Role::Metadata
    }
}

name_enum!(Role, Storage => "storage", Metadata => "metadata", Both => "both");

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: IpAddr,
    /// Main port (every core accepts on it); 0 picks a free port.
    pub port: u16,
    /// Core i also listens on `core_port_base + i`; 0 picks free ports.
    pub core_port_base: u16,
    pub cores: usize,
    /// Pin core i to CPU `(cpu_offset + i) % CPUs`.
    pub pin: bool,
    pub cpu_offset: usize,
    pub poll_mode: PollMode,
    /// Adaptive mode: idle time spent spinning before parking.
    pub spin_us: u64,
    /// Requested backend; io_uring falls back to epoll when unavailable.
    pub net: NetBackend,
    pub block_size: usize,
    pub dram_bytes_per_core: u64,
    pub max_body: usize,
    pub max_conns_per_core: usize,
    pub node_id: String,
    /// What the node serves: blocks, namespaces or both.
    pub role: Role,
    /// The node's 16-bit number in its cluster, which object locations name
    /// (`NodeInfo::node_number`). With a data directory the number is kept
    /// in `<data_dir>/node-number` on first start: `None` then takes the
    /// kept number, and a number that contradicts it is refused. `None`
    /// without a kept number is 0 (the one-machine case).
    pub node_number: Option<u16>,
    /// The flash tier's file or device (off when `None`).
    pub flash: Option<TierSpec>,
    /// The disk tier's file or device (off when `None`).
    pub disk: Option<TierSpec>,
    /// Ask for a submission-polling kernel thread on the flash and disk rings.
    pub sqpoll: bool,
    /// What to do with a flash or disk region formatted with other
    /// settings (`--reformat-tiers`, `--discard-persist`).
    pub reformat_tiers: Reformat,
    /// Where the node keeps its metadata log (`<data_dir>/meta/`), so the
    /// namespaces survive a restart; `None`: they live in memory only.
    pub data_dir: Option<PathBuf>,
    /// The cluster secret capability tokens are checked with
    /// (`crate::auth`). `None`: the node checks no tokens.
    pub cluster_secret: Option<crate::auth::Secret>,
    /// The DPDK transport's settings (used when `net` is `Dpdk`).
    pub dpdk: DpdkConfig,
    /// Tests only: makes one core's network poll fail (`PollFault`).
    /// `None` in every real configuration.
    pub test_poll_fault: Option<PollFault>,
}

/// The environment variable `pollen node` and `pollen up` read a
/// [`PollFault`] from. For tests only: it makes a core fail on purpose.
pub const POLL_FAULT_ENV: &str = "POLLEN_TEST_FAIL_POLL";

/// Tests only: core `core`'s network poll fails once the core has executed
/// `after_requests` requests, with an I/O error (or a panic, with `panic`),
/// as if the transport broke under it: what follows (the node stops) is
/// what a real poll failure does. Given to `pollen` as
/// `POLLEN_TEST_FAIL_POLL=CORE:REQUESTS[:panic]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollFault {
    pub core: usize,
    pub after_requests: u64,
    pub panic: bool,
}

impl PollFault {
    /// Parses `CORE:REQUESTS[:panic]`.
    pub fn parse(s: &str) -> Result<PollFault, String> {
        let bad = || format!("{s:?}: expected CORE:REQUESTS or CORE:REQUESTS:panic");
        let mut parts = s.split(':');
        let core = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let after_requests = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let panic = match parts.next() {
            None => false,
            Some("panic") => true,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(PollFault { core, after_requests, panic })
    }

    /// The fault `POLLEN_TEST_FAIL_POLL` asks for, if set.
    pub fn from_env() -> Result<Option<PollFault>, String> {
        match std::env::var(POLL_FAULT_ENV) {
            Ok(v) => PollFault::parse(&v).map(Some).map_err(|e| format!("{POLL_FAULT_ENV}: {e}")),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(format!("{POLL_FAULT_ENV}: {e}")),
        }
    }

    /// The poll's outcome once the fault is due.
    pub(crate) fn trip(&self) -> std::io::Result<usize> {
        let what = format!("injected by {POLL_FAULT_ENV} (test only)");
        if self.panic {
            panic!("core {}: network poll panic {what}", self.core);
        }
        Err(std::io::Error::other(format!("network poll error {what}")))
    }
}

/// How a node runs on DPDK: the EAL's arguments, which port, and the
/// address its user-space TCP/IP stack answers on (the MAC is the port's).
/// The node listens on `ip` at `port` and the core ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DpdkConfig {
    /// EAL arguments, e.g. `-l 0-1 -a 0000:03:00.0` or, without a NIC,
    /// `--no-huge --no-pci --vdev=net_tap0,iface=pollen0`.
    pub eal_args: Vec<String>,
    /// DPDK port number (the order in which the EAL found the devices).
    pub port_id: u16,
    /// The node's IPv4 address and prefix length.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Next hop for addresses outside the prefix.
    pub gateway: Option<Ipv4Addr>,
}

/// Parses `A.B.C.D/NN`.
pub fn parse_ipv4_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected A.B.C.D/NN"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| format!("{s:?}: {len:?} is not a prefix length"))?;
    if !(1..=32).contains(&len) {
        return Err(format!("{s:?}: the prefix length must be 1..=32"));
    }
    Ok((ip, len))
}

/// Where a flash or disk tier lives: a file (created and sized if missing)
/// or a block device, and how many bytes of it to use (`None`: the whole
/// device, or the existing file's size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSpec {
    pub path: PathBuf,
    pub size: Option<u64>,
}

impl TierSpec {
    /// Parses `PATH[:SIZE]` (see `storage::flash::parse_spec`).
    pub fn parse(spec: &str) -> Result<TierSpec, String> {
        let (path, size) = crate::storage::flash::parse_spec(spec)?;
        Ok(TierSpec { path, size })
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        let cpus = cpu_count();
        NodeConfig {
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 7400,
            core_port_base: 7401,
            cores: if cpus <= 2 { 1 } else { cpus - 1 },
            pin: true,
            cpu_offset: 0,
            poll_mode: PollMode::Adaptive,
            spin_us: 100,
            net: NetBackend::Uring,
            block_size: 64 << 10,
            dram_bytes_per_core: 256 << 20,
            max_body: 1 << 20,
            max_conns_per_core: 4096,
            node_id: "node-0".to_string(),
            role: Role::Both,
            node_number: None,
            flash: None,
            disk: None,
            sqpoll: false,
            reformat_tiers: Reformat::Never,
            data_dir: None,
            cluster_secret: None,
            dpdk: DpdkConfig::default(),
            test_poll_fault: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("core {core} failed to start: {reason}")]
    Core { core: usize, reason: String },
    #[error(transparent)]
    MetaLog(#[from] metalog::LogError),
    #[error(
        "node number {asked} was asked for, but the data directory {} belongs to node number {kept} \
         (start the node with --node-number {kept}, or give it another data directory)",
        dir.display()
    )]
    NodeNumber { asked: u16, kept: u16, dir: PathBuf },
    #[error(
        "role {asked} was asked for, but the data directory {} belongs to a {kept} node (start the \
         node with --role {kept}, or give it another data directory: a metadata node's namespaces or a \
         storage node's blocks would be stranded)",
        dir.display()
    )]
    Role { asked: Role, kept: Role, dir: PathBuf },
}

/// The file in a data directory that keeps the node's number.
pub const NODE_NUMBER_FILE: &str = "node-number";

/// The node number kept in `dir`, if any: the file holds the number in
/// decimal and a newline.
pub fn read_node_number(dir: &std::path::Path) -> Result<Option<u16>, NodeError> {
    let path = dir.join(NODE_NUMBER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u16>().map(Some).map_err(|_| {
            NodeError::Config(format!(
                "{} does not hold a node number (0..=65535): {:?}",
                path.display(),
                text.chars().take(40).collect::<String>()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

/// The node's number: the configured one and the one kept in the data
/// directory must agree; the first start keeps it there (written to a
/// temporary file, synced, renamed, directory synced). Called with the
/// directory's lock held.
fn settle_node_number(cfg: &NodeConfig) -> Result<u16, NodeError> {
    let Some(dir) = &cfg.data_dir else { return Ok(cfg.node_number.unwrap_or(0)) };
    match (read_node_number(dir)?, cfg.node_number) {
        (Some(kept), Some(asked)) if kept != asked => {
            Err(NodeError::NodeNumber { asked, kept, dir: dir.clone() })
        }
        (Some(kept), _) => Ok(kept),
        (None, asked) => {
            let number = asked.unwrap_or(0);
            keep_in_dir(dir, NODE_NUMBER_FILE, &number.to_string())?;
            Ok(number)
        }
    }
}

/// The file in a data directory that keeps the node's role.
pub const ROLE_FILE: &str = "role";

/// The role kept in `dir`, if any: the file holds `storage`, `metadata` or
/// `both` and a newline.
pub fn read_role(dir: &std::path::Path) -> Result<Option<Role>, NodeError> {
    let path = dir.join(ROLE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<Role>().map(Some).map_err(|_| {
            NodeError::Config(format!(
                "{} does not hold a role (storage, metadata or both): {:?}",
                path.display(),
                text.chars().take(40).collect::<String>()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

/// Writes `text` and a newline to `dir/name`: a temporary file, synced,
/// renamed, the directory synced.
fn keep_in_dir(dir: &std::path::Path, name: &str, text: &str) -> Result<(), NodeError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.new"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{text}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(io_err(format!("writing {}", path.display())))
}

/// The node's role must be the one kept in its data directory (a storage
/// node restarted as a metadata node would strand the blocks objects name
/// there, and the reverse the namespaces); the first start keeps it.
/// Called with the directory's lock held.
fn settle_role(cfg: &NodeConfig) -> Result<(), NodeError> {
    let Some(dir) = &cfg.data_dir else { return Ok(()) };
    match read_role(dir)? {
        Some(kept) if kept != cfg.role => Err(NodeError::Role { asked: cfg.role, kept, dir: dir.clone() }),
        Some(_) => Ok(()),
        None => keep_in_dir(dir, ROLE_FILE, &cfg.role.to_string()),
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

impl NodeConfig {
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::Config(m));
        if self.cores == 0 || self.cores > 256 {
            return bad(format!("cores must be 1..=256, got {}", self.cores));
        }
        if !self.block_size.is_power_of_two() || !(4096..=16 << 20).contains(&self.block_size) {
            return bad(format!(
                "block size must be a power of two from 4 KiB to 16 MiB, got {}",
                self.block_size
            ));
        }
        if self.dram_bytes_per_core < self.block_size as u64 {
            return bad(format!("DRAM per core ({} bytes) holds no block", self.dram_bytes_per_core));
        }
        if self.max_body > u32::MAX as usize / 2 {
            return bad("max body is too large".into());
        }
        if self.max_conns_per_core == 0 {
            return bad("max connections per core must be at least 1".into());
        }
        if self.core_port_base != 0 && self.core_port_base as usize + self.cores > u16::MAX as usize + 1 {
            return bad("core ports run past 65535".into());
        }
        if let Some(f) = self.test_poll_fault {
            if f.core >= self.cores {
                return bad(format!(
                    "{POLL_FAULT_ENV}: core {} does not exist ({} cores)",
                    f.core, self.cores
                ));
            }
        }
        if self.net == NetBackend::Dpdk {
            if !cfg!(feature = "dpdk") {
                return bad(
                    "this build has no DPDK support: build with `--features dpdk` (needs libdpdk-dev)".into(),
                );
            }
            if self.dpdk.ip.is_none() {
                return bad("the DPDK transport needs the node's address: --ip A.B.C.D/NN".into());
            }
        }
        Ok(())
    }
}

/// How often one core went to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParkCounts {
    pub parks: u64,
    /// Parks with flash or disk I/O in flight, woken by its completion.
    pub with_io: u64,
}

/// Why a node stopped without being told to: a core thread (or another
/// thread the node cannot serve without, see `StopHandle::fail`) ended.
/// A node never runs on with a core fewer: the first failure stops every
/// core, as `StopHandle::stop` does, and is kept for whoever runs the node
/// (`StopHandle::wait`, `Node::failure`), so the process can exit non-zero
/// and a supervisor restart it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{component} failed: {reason}")]
pub struct NodeFailure {
    /// What ended, e.g. `core 1` or `heartbeat thread`.
    pub component: String,
    pub reason: String,
}

/// Whether the node was stopped, and the first failure, for `StopHandle::wait`.
#[derive(Default)]
struct Fate {
    state: Mutex<FateState>,
    changed: Condvar,
}

#[derive(Default)]
struct FateState {
    stopped: bool,
    failure: Option<NodeFailure>,
}

impl Fate {
    fn state(&self) -> std::sync::MutexGuard<'_, FateState> {
        // The state is two plain fields: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stops a running node from any thread, and tells when it stopped.
#[derive(Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    cores: Arc<Vec<Arc<CoreShared>>>,
    fate: Arc<Fate>,
}

impl StopHandle {
    /// Tells every core to stop (they finish their pass and drain their
    /// storage I/O); `Node::join` waits for them.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.cores.iter() {
            c.waker.wake();
        }
        let mut s = self.fate.state();
        s.stopped = true;
        self.fate.changed.notify_all();
    }

    /// `component` ended and the node cannot serve without it: logs why,
    /// keeps the first failure (`wait`, `Node::failure`) and stops every
    /// core. Called by a core thread whose loop ended on an error or a
    /// panic; a process may call it for its own threads (the heartbeat).
    pub fn fail(&self, component: impl Into<String>, reason: impl Into<String>) {
        let failure = NodeFailure { component: component.into(), reason: reason.into() };
        tracing::error!(component = %failure.component, reason = %failure.reason, "the node stops: it cannot serve without this");
        {
            let mut s = self.fate.state();
            s.failure.get_or_insert(failure);
        }
        self.stop();
    }

    /// Blocks until the node is stopped (`stop`, `fail`, `Node::shutdown`);
    /// returns the failure that stopped it, if one did (or came while it
    /// stopped).
    pub fn wait(&self) -> Option<NodeFailure> {
        let mut s = self.fate.state();
        while !s.stopped {
            s = self.fate.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.failure.clone()
    }

    /// The first failure so far (`None` while the node runs as it should).
    pub fn failure(&self) -> Option<NodeFailure> {
        self.fate.state().failure.clone()
    }
}

pub struct Node {
    cfg: NodeConfig,
    /// Random per start (`Node::boot_id`).
    boot_id: u64,
    addr: SocketAddr,
    core_addrs: Vec<SocketAddr>,
    net: NetBackend,
    net_fallback_reason: Option<String>,
    started: Instant,
    stop: StopHandle,
    threads: Vec<JoinHandle<()>>,
    /// Held while the cores run (dropped after they are joined).
    _meta_lock: Option<metalog::DirLock>,
    /// The DPDK port, kept started while the node runs.
    #[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
    dpdk: Option<DpdkNode>,
    /// What the controller tells the node about the cluster, read by its cores.
    cluster: Arc<ClusterView>,
}

/// A kernel node's listeners, per core (the main port with SO_REUSEPORT,
/// then the core's own), the main address and the core addresses.
type Listeners = (SocketAddr, Vec<Vec<TcpListener>>, Vec<SocketAddr>);

fn kernel_listeners(cfg: &NodeConfig) -> Result<Listeners, NodeError> {
    let n = cfg.cores;
    let first = listener(SocketAddr::new(cfg.listen, cfg.port), true)
        .map_err(io_err(format!("listen on {}:{}", cfg.listen, cfg.port)))?;
    let addr = first.local_addr().map_err(io_err("main port address"))?;
    let mut per_core: Vec<Vec<TcpListener>> = vec![vec![first]];
    for _ in 1..n {
        per_core.push(vec![listener(addr, true).map_err(io_err(format!("listen on {addr}")))?]);
    }
    let mut core_addrs = Vec::with_capacity(n);
    for (i, ls) in per_core.iter_mut().enumerate() {
        let port = if cfg.core_port_base == 0 { 0 } else { cfg.core_port_base + i as u16 };
        let l = listener(SocketAddr::new(cfg.listen, port), false)
            .map_err(io_err(format!("listen on {}:{port} (core {i})", cfg.listen)))?;
        core_addrs.push(l.local_addr().map_err(io_err("core port address"))?);
        ls.push(l);
    }
    Ok((addr, per_core, core_addrs))
}

/// A DPDK node's port and what each core still has to take of it.
#[cfg(feature = "dpdk")]
struct DpdkNode {
    port: ffi::PortMonitor,
    shared: std::sync::Arc<crate::transport::dpdk::Shared>,
    cores: Vec<crate::transport::dpdk::CoreNet>,
}

#[cfg(not(feature = "dpdk"))]
struct DpdkNode {
    cores: Vec<std::convert::Infallible>,
}

/// Initialises the EAL and starts the port with one queue pair per core.
/// DPDK has no ephemeral ports to pick from: port 0 means 7400, core ports
/// 0 mean the ports after the main one.
#[cfg(feature = "dpdk")]
fn dpdk_start(cfg: &NodeConfig) -> Result<(SocketAddr, Vec<SocketAddr>, DpdkNode), NodeError> {
    let fail = |e: ffi::DpdkError| NodeError::Config(format!("DPDK: {e}"));
    let (ip, prefix) = cfg.dpdk.ip.ok_or_else(|| NodeError::Config("DPDK needs --ip A.B.C.D/NN".into()))?;
    // The EAL pins the thread that initialises it to its main lcore, and
    // threads spawned later (the cores, the caller's own) would inherit that:
    // the caller's CPU set is put back.
    let affinity = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
    let eal = ffi::Eal::init(&cfg.dpdk.eal_args);
    if let Some(set) = affinity {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            tracing::warn!(error = %e, "could not restore the CPU affinity the DPDK EAL changed");
        }
    }
    let eal = eal.map_err(fail)?;
    let queues = u16::try_from(cfg.cores).map_err(|_| NodeError::Config("too many cores for DPDK".into()))?;
    let mut port = ffi::Port::start(eal, &ffi::PortConfig::new(cfg.dpdk.port_id, queues)).map_err(fail)?;
    let main_port = if cfg.port == 0 { 7400 } else { cfg.port };
    let base = if cfg.core_port_base == 0 { main_port + 1 } else { cfg.core_port_base };
    if base as usize + cfg.cores > u16::MAX as usize + 1 {
        return Err(NodeError::Config("core ports run past 65535".into()));
    }
    let addr = SocketAddr::new(IpAddr::V4(ip), main_port);
    let core_addrs: Vec<SocketAddr> =
        (0..cfg.cores).map(|i| SocketAddr::new(IpAddr::V4(ip), base + i as u16)).collect();
    let mut ports = vec![main_port];
    ports.extend(core_addrs.iter().map(|a| a.port()));
    // The tap device's queue choice is not stable per flow (see `Shared`).
    let steer_all = port.info().driver == "net_tap";
    let shared = std::sync::Arc::new(crate::transport::dpdk::Shared::new(
        main_port,
        core_addrs.iter().map(|a| a.port()).collect(),
        steer_all,
    ));
    let mac = port.info().mac;
    tracing::info!(port = cfg.dpdk.port_id, driver = %port.info().driver, mac = ?mac, rss = port.info().rss_in_use, "DPDK port started");
    let cores = port
        .take_queues()
        .into_iter()
        .enumerate()
        .map(|(core, queue)| crate::transport::dpdk::CoreNet {
            eal,
            queue,
            core,
            mac,
            ip,
            prefix,
            gateway: cfg.dpdk.gateway,
            ports: ports.clone(),
            shared: shared.clone(),
        })
        .collect();
    Ok((addr, core_addrs, DpdkNode { port: port.monitor(), shared, cores }))
}

#[cfg(not(feature = "dpdk"))]
fn dpdk_start(_: &NodeConfig) -> Result<(SocketAddr, Vec<SocketAddr>, DpdkNode), NodeError> {
    Err(NodeError::Config("this build has no DPDK support: build with `--features dpdk`".into()))
}

/// A DPDK node's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DpdkCounters {
    /// Buffers of the port's pools that are out of them (rx rings included).
    pub mbufs_in_use: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Frames dropped before the TCP/IP stack (malformed, multi-segment).
    pub dropped_rx: u64,
    /// Frames the stack built that found no buffer.
    pub dropped_tx: u64,
}

fn listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(crate::transport::LISTEN_BACKLOG)?;
    Ok(s.into())
}

impl Node {
    /// Starts every core and returns once all of them are listening.
    pub fn start(mut cfg: NodeConfig) -> Result<Node, NodeError> {
        cfg.max_body = cfg.max_body.max(cfg.block_size);
        cfg.validate()?;
        let n = cfg.cores;

        let mut dpdk = None;
        let (addr, mut per_core, core_addrs) = if cfg.net == NetBackend::Dpdk {
            let (addr, core_addrs, queues) = dpdk_start(&cfg)?;
            dpdk = Some(queues);
            (addr, (0..n).map(|_| Vec::new()).collect::<Vec<_>>(), core_addrs)
        } else {
            kernel_listeners(&cfg)?
        };

        // One backing per tier, split into a region per core; each core opens
        // its own engine on its region (engines are not Send).
        let mut tiers: Vec<(u8, Backing, Vec<Region>)> = Vec::new();
        for (t, spec) in [(crate::proto::tier::FLASH, &cfg.flash), (crate::proto::tier::DISK, &cfg.disk)] {
            let Some(spec) = spec else { continue };
            let name = tier_name(t);
            let backing = prepare_backing(&spec.path, spec.size)
                .map_err(io_err(format!("{name} tier {}", spec.path.display())))?;
            let regions =
                backing.regions(n as u32).map_err(io_err(format!("{name} tier {}", spec.path.display())))?;
            // Every region is checked before any core opens (and perhaps
            // formats) its own: a refused region stops the start with the
            // file as it was.
            for r in &regions {
                let mut fc = FlashConfig::new(t, r.index as u8, cfg.block_size as u32);
                fc.reformat = cfg.reformat_tiers;
                FlashEngine::check_open(&backing, *r, &fc)
                    .map_err(io_err(format!("{name} tier {}", spec.path.display())))?;
            }
            tiers.push((t, backing, regions));
        }

        let (net, net_fallback_reason) = match cfg.net {
            NetBackend::Epoll => (NetBackend::Epoll, None),
            NetBackend::Dpdk => (NetBackend::Dpdk, None),
            NetBackend::Uring => match uring::probe() {
                Ok(()) => (NetBackend::Uring, None),
                Err(reason) => {
                    tracing::warn!(%reason, "io_uring unavailable; using epoll");
                    (NetBackend::Epoll, Some(reason))
                }
            },
        };

        let cluster = Arc::new(ClusterView::default());

        // Takes the data directory's lock, then settles the node number.
        let (mut metas, meta_lock, node_number) = replay_meta(&cfg)?;
        cfg.node_number = Some(node_number);

        let info = NodeInfo {
            block_size: cfg.block_size as u32,
            max_body: cfg.max_body as u32,
            main_port: addr.port(),
            node_number,
            core_ports: core_addrs.iter().map(|a| a.port()).collect(),
            tiers: tiers.iter().fold(crate::proto::tier::bit(crate::proto::tier::DRAM), |b, (t, ..)| {
                b | crate::proto::tier::bit(*t)
            }),
        };
        let mut info_body = Vec::new();
        info.encode(&mut info_body);

        let shared: Vec<Arc<CoreShared>> = (0..n)
            .map(|_| CoreShared::new().map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(io_err("eventfd"))?;
        let shared = Arc::new(shared);
        let stop = StopHandle {
            stop: Arc::new(AtomicBool::new(false)),
            cores: shared.clone(),
            fate: Arc::default(),
        };
        let cpus_total = cpu_count();
        let cpus: Vec<Option<usize>> =
            (0..n).map(|i| cfg.pin.then_some((cfg.cpu_offset + i) % cpus_total)).collect();

        #[cfg(feature = "dpdk")]
        if let Some(d) = &dpdk {
            d.shared.set_wakers(shared.iter().map(|c| c.waker.clone()).collect());
        }

        let started = Instant::now();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<Vec<BlockId>, String>)>();
        let mut threads = Vec::with_capacity(n);
        let mut meta_txs = Vec::with_capacity(n);
        let mut dpdk_queues =
            dpdk.as_mut().map(|d| std::mem::take(&mut d.cores)).unwrap_or_default().into_iter();
        for (i, (listeners, links)) in per_core.drain(..).zip(mesh(n, 4096)).enumerate() {
            let (meta_tx, meta_rx) = mpsc::channel::<MetaStart>();
            meta_txs.push(meta_tx);
            let core_cfg = CoreConfig {
                id: i as u8,
                cores: n,
                poll_mode: cfg.poll_mode,
                spin: Duration::from_micros(cfg.spin_us),
                limits: Limits::new(cfg.max_body),
                node_info: info_body.clone(),
                role: cfg.role,
                secret: cfg.cluster_secret.clone().map(Arc::new),
                cluster: cluster.clone(),
            };
            let ctx = CoreStart {
                cfg: core_cfg,
                listeners,
                links,
                cpu: cpus[i],
                net,
                block_size: cfg.block_size as u32,
                dram: cfg.dram_bytes_per_core,
                max_conns: cfg.max_conns_per_core,
                max_frame: crate::proto::HEADER_LEN + crate::proto::MAX_KEY_LEN + cfg.max_body,
                storage: tiers.iter().map(|(t, b, r)| (*t, b.clone(), r[i])).collect(),
                sqpoll: cfg.sqpoll,
                reformat: cfg.reformat_tiers,
                dpdk: dpdk_queues.next(),
                node: stop.clone(),
                poll_fault: cfg.test_poll_fault.filter(|f| f.core == i),
                peers: shared.clone(),
                meta: meta_rx,
            };
            let tx = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("pollen-core-{i}"))
                .spawn(move || ctx.run(tx))
                .map_err(io_err("spawn core thread"))?;
            threads.push(t);
        }
        drop(ready_tx);
        let mut failure = None;
        // Flash and disk blocks that survived the last run, from every core.
        let mut survivors = std::collections::HashSet::new();
        for _ in 0..n {
            match ready_rx.recv() {
                Ok((_, Ok(ids))) => survivors.extend(ids),
                Ok((core, Err(reason))) => failure = failure.or(Some(NodeError::Core { core, reason })),
                Err(_) => {
                    failure = failure
                        .or(Some(NodeError::Core { core: usize::MAX, reason: "core thread died".into() }))
                }
            }
        }
        let failure = match failure {
            None => start_meta(&cfg, &mut metas, &survivors, &shared, meta_txs).err(),
            // Cores waiting for their namespaces return when the senders go.
            Some(e) => {
                drop(meta_txs);
                Some(e)
            }
        };
        let node = Node {
            cfg,
            addr,
            core_addrs,
            net,
            net_fallback_reason,
            started,
            boot_id: new_boot_id(),
            stop,
            threads,
            _meta_lock: meta_lock,
            dpdk,
            cluster,
        };
        if let Some(e) = failure {
            node.shutdown();
            return Err(e);
        }
        tracing::info!(%addr, cores = n, %net, "node listening");
        Ok(node)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn core_addrs(&self) -> Vec<SocketAddr> {
        self.core_addrs.clone()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The DPDK port's figures (`None` on the kernel transports).
    pub fn dpdk_counters(&self) -> Option<DpdkCounters> {
        #[cfg(feature = "dpdk")]
        if let Some(d) = &self.dpdk {
            let stats = d.port.stats().unwrap_or_default();
            let r = Ordering::Relaxed;
            return Some(DpdkCounters {
                mbufs_in_use: d.port.mbufs_in_use(),
                rx_packets: stats.rx_packets,
                tx_packets: stats.tx_packets,
                dropped_rx: d.shared.dropped_rx.load(r),
                dropped_tx: d.shared.dropped_tx.load(r),
            });
        }
        None
    }

    /// A random number drawn at every start, in every report: a report with
    /// another boot id than the last one says the node restarted and lost
    /// its DRAM and non-`PERSIST` blocks (`mark_node_lost`). Never 0.
    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// The node's number in its cluster (settled at start, see
    /// `NodeConfig::node_number`).
    pub fn node_number(&self) -> u16 {
        self.cfg.node_number.unwrap_or(0)
    }

    /// Sets job `job`'s weight map (node number → weight in [0, 1]): from
    /// then on `Place` for the job draws node numbers with probability
    /// proportional to their weights (weight 0: never). It replaces the
    /// job's earlier map; the job need not be registered yet. The
    /// controller calls this on the job's metadata node whenever the job's
    /// allocation changes. Not kept across a restart: the controller sets
    /// it again.
    pub fn set_job_weights(&self, job: &str, weights: &[(u16, f64)]) -> Result<(), NodeError> {
        let map = Arc::new(
            WeightMap::new(weights)
                .map_err(|e| NodeError::Config(format!("weight map of job '{job}': {e}")))?,
        );
        self.cluster.update(|s| {
            s.weights.insert(job.to_string(), map);
        });
        Ok(())
    }

    /// Sets the weight maps of `jobs` and drops those of `gone`, in one
    /// change of the cluster view (each change copies the view: one per
    /// job would take time quadratic in the jobs). A map that is refused is
    /// left as it was and returned with why; the others are set.
    pub fn set_job_weight_maps<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a str, &'a [(u16, f64)])>,
        gone: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(String, NodeError)> {
        let mut refused = Vec::new();
        let mut maps = Vec::new();
        for (job, weights) in jobs {
            match WeightMap::new(weights) {
                Ok(m) => maps.push((job.to_string(), Arc::new(m))),
                Err(e) => refused
                    .push((job.to_string(), NodeError::Config(format!("weight map of job '{job}': {e}")))),
            }
        }
        let gone: Vec<&str> = gone.into_iter().collect();
        if !maps.is_empty() || !gone.is_empty() {
            self.cluster.update(|s| {
                for job in gone {
                    s.weights.remove(job);
                }
                s.weights.extend(maps);
            });
        }
        refused
    }

    /// The number of changes made to the cluster view so far (weight maps,
    /// dead nodes, DRAM shares...).
    pub fn cluster_view_changes(&self) -> u64 {
        self.cluster.version()
    }

    /// Drops job `job`'s weight map: `Place` puts its blocks on this node again.
    pub fn remove_job_weights(&self, job: &str) {
        self.cluster.update(|s| {
            s.weights.remove(job);
        });
    }

    /// The storage nodes the controller declared dead, as of `version`
    /// (a set with a version not newer than the last one applied is
    /// ignored; returns whether this one was applied). From then on, on
    /// this node as a metadata node: `Lookup` of an object with a block on
    /// a dead node answers `data unavailable` (7) at once, `PutObject`
    /// naming a block on one answers 7, and `Place` draws no dead node
    /// (7 when every node with a weight for the job is dead). A node that
    /// leaves the set is used again.
    ///
    /// This node's own number is left out: a node that reads as dead to the
    /// others (it is restarting, see `mark_node_lost`) still serves its own
    /// blocks.
    pub fn set_dead_nodes(&self, version: u64, dead: &[u16]) -> bool {
        let me = self.node_number();
        let dead: Vec<u16> = dead.iter().copied().filter(|&n| n != me).collect();
        self.cluster.update(|s| s.set_dead(version, &dead))
    }

    /// The dead set last applied and its version (`None` before the first).
    pub fn dead_nodes(&self) -> (Option<u64>, Vec<u16>) {
        let s = self.cluster.snapshot();
        let mut v: Vec<u16> = s.dead.iter().copied().collect();
        v.sort_unstable();
        (s.dead_version, v)
    }

    /// The DRAM share of each job on this node as a storage node, as of
    /// `version` (shares with a version not newer than the last applied are
    /// ignored: `Ok(false)`). From then on a put that asks for DRAM with
    /// the rest on the next tier (`tier::DRAM | tier::SPILL`, how clients
    /// place latency-sensitive jobs) goes to the next tier once the job
    /// holds its share of this node's DRAM: each core allows its
    /// 1/cores of the share, rounded up to whole blocks. Jobs not listed
    /// use DRAM while it lasts. The controller sets this on heartbeat
    /// replies (each job's DRAM allocation times its weight for the node).
    pub fn set_dram_shares(
        &self,
        version: u64,
        shares: &[crate::meta::cluster::DramShare],
    ) -> Result<bool, NodeError> {
        self.cluster.update(|s| s.set_dram_shares(version, shares)).map_err(NodeError::Config)
    }

    /// The DRAM shares last applied and their version (`None` before the first).
    pub fn dram_shares(&self) -> (Option<u64>, Vec<crate::meta::cluster::DramShare>) {
        let s = self.cluster.snapshot();
        let mut v: Vec<_> = s
            .dram_shares
            .iter()
            .map(|(&o, &bytes)| {
                let (metadata_node, job) = crate::storage::owner_parts(o);
                crate::meta::cluster::DramShare { metadata_node, job, bytes }
            })
            .collect();
        v.sort_unstable_by_key(|d| (d.metadata_node, d.job));
        (s.dram_shares_version, v)
    }

    /// Job `job`'s weight map, as last set.
    pub fn job_weights(&self, job: &str) -> Option<Vec<(u16, f64)>> {
        self.cluster.snapshot().weights.get(job).map(|w| w.entries().to_vec())
    }

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Waits for every core to stop (after `StopHandle::stop`, or a
    /// failure); returns the failure that stopped the node, if one did.
    pub fn join(mut self) -> Option<NodeFailure> {
        for t in self.threads.drain(..) {
            // A core's panic is caught on its thread and kept as a failure.
            let _ = t.join();
        }
        self.stop.failure()
    }

    /// Stops every core and waits for them (see `join`).
    pub fn shutdown(self) -> Option<NodeFailure> {
        self.stop.stop();
        self.join()
    }

    /// Why the node stopped by itself, if it did: a core failed and every
    /// core was told to stop (`NodeFailure`).
    pub fn failure(&self) -> Option<NodeFailure> {
        self.stop.failure()
    }

    /// Frees every block that job `job_id` of metadata node `meta_node`
    /// allocated on this node, on every core and tier, but the blocks in
    /// `keep` (which pass to no owner): what a `FreeOwner` request does,
    /// applied from outside the data path, for the frees the controller
    /// owed a node that was down or unreachable when the job was
    /// deregistered. Returns once every core has it queued (each applies it
    /// at the start of its next pass; a parked core is woken).
    pub fn free_owner(&self, meta_node: u16, job_id: u32, keep: &[BlockId]) -> Result<(), NodeError> {
        if job_id >= crate::storage::FIRST_RESERVED_JOB_ID {
            return Err(NodeError::Config(format!("job id {job_id:#x} is reserved")));
        }
        let owner = crate::storage::job_owner(meta_node, job_id);
        let keep: Arc<std::collections::HashSet<BlockId>> = Arc::new(keep.iter().copied().collect());
        for c in self.stop.cores.iter() {
            c.send_external(crate::core::External::FreeOwner { owner, keep: keep.clone() });
        }
        Ok(())
    }

    /// Storage node `node` restarted (the controller saw a new boot id in
    /// its reports): its DRAM and non-`PERSIST` blocks of before are gone.
    /// On this node as a metadata node, every object naming a block there
    /// is marked lost from then on (reads answer 7, `data unavailable`,
    /// instead of the storage node's `not found`), and the mark is logged
    /// (a lost `Put` record) so it survives this node's restart. Queued to
    /// every core like `free_owner`. Objects written on `node` after its
    /// restart and before this call are marked too: the controller keeps
    /// the node in the dead set meanwhile, so `Place` does not draw it.
    pub fn mark_node_lost(&self, node: u16) {
        for c in self.stop.cores.iter() {
            c.send_external(crate::core::External::NodeLost { node });
        }
    }

    /// Turns polling on for cores `0..n` and off for the others (an idle
    /// core that does not poll parks at once; it still serves its
    /// connections and blocks). Returns the number of polling cores.
    pub fn set_polling_cores(&self, n: usize) -> Result<usize, NodeError> {
        let total = self.stop.cores.len();
        if n == 0 || n > total {
            return Err(NodeError::Config(format!("polling cores must be 1..={total}, got {n}")));
        }
        for (i, c) in self.stop.cores.iter().enumerate() {
            let on = i < n;
            if c.polling.swap(on, Ordering::SeqCst) != on {
                // A parked core re-reads the flag when it wakes.
                c.waker.wake();
            }
        }
        Ok(n)
    }

    /// Per core: how often it went to sleep, and how often with flash or
    /// disk I/O in flight (see `PollMode::Adaptive`).
    pub fn park_counts(&self) -> Vec<ParkCounts> {
        let r = Ordering::Relaxed;
        self.stop
            .cores
            .iter()
            .map(|c| ParkCounts { parks: c.parks.load(r), with_io: c.parks_with_io.load(r) })
            .collect()
    }

    /// The Linux thread id of each core thread, to read its CPU time in
    /// `/proc/self/task/<tid>/stat`.
    pub fn core_thread_ids(&self) -> Vec<u64> {
        self.stop.cores.iter().map(|c| c.tid.load(Ordering::Relaxed)).collect()
    }

    /// A snapshot of counters, capacity and jobs; lock-free but for the job
    /// lists, which cores publish at most every 50 ms.
    pub fn report(&self) -> NodeReport {
        let r = Ordering::Relaxed;
        let mut cores = Vec::new();
        let mut tiers = Vec::new();
        let mut jobs = Vec::new();
        for (i, c) in self.stop.cores.iter().enumerate() {
            cores.push(CoreReport {
                core: i,
                cpu: match c.pinned_cpu.load(r) {
                    u64::MAX => None,
                    cpu => Some(cpu as usize),
                },
                port: self.core_addrs[i].port(),
                busy_ns: c.busy_ns.load(r),
                total_ns: self.started.elapsed().as_nanos() as u64,
                connections: c.connections.load(r),
                requests: c.requests.load(r),
                forwarded: c.forwarded.load(r),
                bytes_in: c.bytes_in.load(r),
                bytes_out: c.bytes_out.load(r),
                parked: c.parked.load(r),
                polling: c.polling.load(r),
                accepting: c.accepting.load(r),
            });
            let bs = self.cfg.block_size as u64;
            let (total, used) = (c.blocks_total.load(r), c.blocks_used.load(r));
            tiers.push(TierReport {
                tier: "dram".into(),
                core: i,
                capacity_bytes: total * bs,
                used_bytes: used * bs,
                blocks_total: total,
                blocks_used: used,
                huge_pages: c.huge_pages.load(r),
                ..TierReport::default()
            });
            if let Ok(s) = c.storage.lock() {
                let now = std::time::Instant::now();
                tiers.extend(s.iter().map(|f| f.at(now)));
            }
            if let Ok(j) = c.jobs.lock() {
                jobs.extend(j.iter().map(|s| JobReport {
                    name: s.name.clone(),
                    id: s.id,
                    registered: s.registered,
                    objects: s.objects,
                    bytes: s.bytes,
                }));
            }
        }
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        NodeReport {
            node_id: self.cfg.node_id.clone(),
            node_number: self.node_number(),
            boot_id: self.boot_id,
            role: self.cfg.role,
            addr: self.addr.to_string(),
            net: self.net,
            net_fallback_reason: self.net_fallback_reason.clone(),
            poll_mode: self.cfg.poll_mode,
            block_size: self.cfg.block_size as u64,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            cores,
            tiers,
            jobs,
            applied: None,
            frees_done: Vec::new(),
        }
    }
}

impl Drop for Node {
    /// A node dropped without `shutdown` still stops its cores.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop.stop();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

#[cfg(feature = "dpdk")]
type DpdkCore = crate::transport::dpdk::CoreNet;
#[cfg(not(feature = "dpdk"))]
type DpdkCore = std::convert::Infallible;

/// What a core thread needs to build itself.
struct CoreStart {
    cfg: CoreConfig,
    listeners: Vec<TcpListener>,
    links: Links,
    cpu: Option<usize>,
    net: NetBackend,
    block_size: u32,
    dram: u64,
    max_conns: usize,
    max_frame: usize,
    /// (tier, backing, this core's region) of each flash or disk tier.
    storage: Vec<(u8, Backing, Region)>,
    sqpoll: bool,
    reformat: Reformat,
    /// The core's DPDK queue pair and stack settings (DPDK nodes only).
    #[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
    dpdk: Option<DpdkCore>,
    /// The node's stop flag, and where the core reports its failure.
    node: StopHandle,
    /// Tests only: this core's poll fails on purpose (`PollFault`).
    poll_fault: Option<PollFault>,
    peers: Arc<Vec<Arc<CoreShared>>>,
    /// The core's namespaces, sent once every core has opened its storage.
    meta: mpsc::Receiver<MetaStart>,
}

/// What a core thread sends `Node::start` once its storage is open: the
/// flash and disk blocks that survived, or why it cannot start.
type Ready = mpsc::Sender<(usize, Result<Vec<BlockId>, String>)>;

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

impl CoreStart {
    /// The core thread: starts the core and runs it until the node stops.
    /// A core that ends any other way (its loop failed, or it panicked)
    /// stops the whole node (`StopHandle::fail`): a node with a core fewer
    /// would have dropped that core's connections, blocks and namespaces
    /// while still reporting it.
    fn run(self, ready: Ready) {
        let id = self.cfg.id as usize;
        let node = self.node.clone();
        let ready_on_panic = ready.clone();
        let reason = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.start(ready))) {
            Ok(None) => return,
            Ok(Some(reason)) => reason,
            Err(payload) => {
                let reason = format!("panicked: {}", panic_message(&*payload));
                // While the node starts, `Node::start` waits for every core's answer.
                let _ = ready_on_panic.send((id, Err(format!("core thread {reason}"))));
                reason
            }
        };
        node.fail(format!("core {id}"), reason);
    }

    /// Builds the core and runs it. `None`: it stopped as told, or never
    /// ran (a start-up failure, sent on `ready`); else why it failed.
    fn start(self, ready: Ready) -> Option<String> {
        let id = self.cfg.id as usize;
        let tid = nix::unistd::gettid().as_raw() as u64;
        self.peers[id].tid.store(tid, std::sync::atomic::Ordering::Relaxed);
        if let Some(cpu) = self.cpu {
            match pin_current_thread(cpu) {
                Ok(()) => self.peers[id].pinned_cpu.store(cpu as u64, std::sync::atomic::Ordering::Relaxed),
                Err(e) => tracing::warn!(core = id, cpu, error = %e, "could not pin core; it runs unpinned"),
            }
        }
        let dram = match DramTier::new(self.cfg.id, self.block_size, self.dram) {
            Ok(d) => d,
            Err(e) => {
                let _ = ready.send((id, Err(format!("DRAM arena of {} bytes: {e}", self.dram))));
                return None;
            }
        };
        // Capacity is visible in reports from the moment the node is up.
        let usage = dram.usage();
        self.peers[id].blocks_total.store(usage.blocks_total, std::sync::atomic::Ordering::Relaxed);
        self.peers[id].huge_pages.store(usage.huge_pages, std::sync::atomic::Ordering::Relaxed);
        let waker_fd = self.peers[id].waker.fd();
        // Receive buffers hold at least one whole frame.
        let rx = self.max_frame.clamp(256 << 10, 4 << 20);
        let storage = StorageStart {
            tiers: &self.storage,
            block_size: self.block_size,
            sqpoll: self.sqpoll,
            reformat: self.reformat,
        };
        let running = Running { stop: self.node.stop.clone(), poll_fault: self.poll_fault };
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            let _ = ready.send((id, Err(format!("{what}: {e}"))));
            None
        };
        let core = CoreParts {
            cfg: self.cfg,
            links: self.links,
            dram,
            running,
            peers: self.peers,
            ready: ready.clone(),
            meta: self.meta,
        };
        match self.net {
            NetBackend::Epoll => match EpollTransport::new(self.listeners, waker_fd, self.max_conns, rx) {
                Ok(t) => Self::serve(t, storage, core),
                Err(e) => failed("epoll transport", &e),
            },
            NetBackend::Uring => match UringTransport::new(self.listeners, waker_fd, self.max_conns, rx) {
                Ok(t) => Self::serve(t, storage, core),
                Err(e) => failed("io_uring transport", &e),
            },
            #[cfg(feature = "dpdk")]
            NetBackend::Dpdk => {
                match dpdk_transport(self.dpdk, id, core.peers[id].waker.clone(), self.max_conns) {
                    // The lcore registration lasts as long as the core runs.
                    Ok((t, _lcore)) => Self::serve(t, storage, core),
                    Err(e) => failed("DPDK transport", &e),
                }
            }
            #[cfg(not(feature = "dpdk"))]
            NetBackend::Dpdk => failed("DPDK transport", &"this build has no DPDK support"),
        }
    }

    /// Opens the core's flash and disk regions — on the transport's ring
    /// when it can carry them (`FlashEngine::open_for_core`) — then runs
    /// the core until the node stops.
    fn serve<T: Transport>(mut transport: T, storage: StorageStart<'_>, core: CoreParts) -> Option<String> {
        let CoreParts { cfg, links, dram, running, peers, ready, meta } = core;
        let id = cfg.id as usize;
        let mut engines: Vec<FlashEngine> = Vec::new();
        for (i, (t, backing, region)) in storage.tiers.iter().enumerate() {
            let mut fc = FlashConfig::new(*t, cfg.id, storage.block_size);
            fc.sqpoll = storage.sqpoll;
            fc.reformat = storage.reformat;
            let slots = RingSlots { file: i as u32, buf: i as u16 };
            let net = transport.shared_ring().map(|r| (&*r, slots)).filter(|_| i < STORAGE_SLOTS as usize);
            match FlashEngine::open_for_core(backing, *region, &fc, net) {
                Ok(e) => engines.push(e),
                Err(e) => {
                    let what = format!(
                        "{} tier {} (region {})",
                        tier_name(*t),
                        backing.path.display(),
                        region.index
                    );
                    let _ = ready.send((id, Err(format!("{what}: {e}"))));
                    return None;
                }
            }
        }
        if let Ok(mut s) = peers[id].storage.lock() {
            *s = engines.iter().map(|e| crate::core::storage_report(id, e)).collect();
        }
        let survivors: Vec<BlockId> =
            engines.iter().flat_map(|e| e.recovered_persistent().iter().map(|r| r.0)).collect();
        let _ = ready.send((id, Ok(survivors)));
        // The namespaces come once every core has reported what survived.
        let Ok(meta) = meta.recv() else { return None };
        Core::new(cfg, transport, links, dram, engines, running.stop, peers)
            .with_meta(meta)
            .with_poll_fault(running.poll_fault)
            .run()
            .err()
    }
}

/// A core's parts but its transport and storage, for `CoreStart::serve`.
struct CoreParts {
    cfg: CoreConfig,
    links: Links,
    dram: DramTier,
    running: Running,
    peers: Arc<Vec<Arc<CoreShared>>>,
    ready: Ready,
    meta: mpsc::Receiver<MetaStart>,
}

/// How a core runs once started: the node's stop flag, and (tests only) a
/// poll fault to inject.
struct Running {
    stop: Arc<AtomicBool>,
    poll_fault: Option<PollFault>,
}

/// A core's DPDK transport, built on the core's thread, which it registers
/// with DPDK: an lcore id gives the core per-lcore mempool caches (without
/// one, all being taken, it still works through the shared ring).
#[cfg(feature = "dpdk")]
fn dpdk_transport(
    net: Option<DpdkCore>,
    id: usize,
    waker: Arc<crate::core::waker::Waker>,
    max_conns: usize,
) -> Result<(crate::transport::dpdk::DpdkTransport, Option<ffi::ThreadRegistration>), String> {
    let net = net.ok_or("no DPDK queue for this core")?;
    let lcore = match net.eal.register_thread() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(core = id, error = %e, "no DPDK lcore for this core; mbufs bypass the per-lcore cache");
            None
        }
    };
    let t = crate::transport::dpdk::DpdkTransport::new(net, waker, max_conns).map_err(|e| e.to_string())?;
    Ok((t, lcore))
}

/// A core's flash and disk tiers, to open once its transport is up.
struct StorageStart<'a> {
    /// (tier, backing, this core's region) of each flash or disk tier.
    tiers: &'a [(u8, Backing, Region)],
    block_size: u32,
    sqpoll: bool,
    reformat: Reformat,
}

/// The name of a tier number in reports and messages.
/// A boot id: random (std's per-process random hash keys), mixed with the
/// clock and the process id, never 0.
fn new_boot_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

pub fn tier_name(t: u8) -> &'static str {
    match t {
        crate::proto::tier::DRAM => "dram",
        crate::proto::tier::FLASH => "flash",
        crate::proto::tier::DISK => "disk",
        _ => "unknown",
    }
}

/// A core's namespaces before it starts, and its recovered log file.
struct Replayed {
    ns: Namespaces,
    log: Option<(std::fs::File, u64)>,
}

fn log_shape(cfg: &NodeConfig, core: usize) -> LogShape {
    LogShape { core: core as u16, cores: cfg.cores as u16, block_size: cfg.block_size as u32 }
}

/// Each core's namespaces: empty, or replayed from its log under the data
/// directory (whose lock is taken first); and the node's number.
#[allow(clippy::type_complexity)]
fn replay_meta(cfg: &NodeConfig) -> Result<(Vec<Replayed>, Option<metalog::DirLock>, u16), NodeError> {
    let bs = cfg.block_size as u64;
    let Some(dir) = &cfg.data_dir else {
        let node = settle_node_number(cfg)?;
        let empty = (0..cfg.cores).map(|i| Replayed { ns: Namespaces::new(i as u8, bs, node), log: None });
        return Ok((empty.collect(), None, node));
    };
    let dir = dir.join("meta");
    let lock = metalog::lock_dir(&dir)?;
    let node = settle_node_number(cfg)?;
    settle_role(cfg)?;
    let mut out = Vec::with_capacity(cfg.cores);
    for i in 0..cfg.cores {
        let (rec, mut file) = metalog::recover(&dir, log_shape(cfg, i))?;
        let mut ns = Namespaces::new(i as u8, bs, node);
        let mut records = 0u64;
        for r in rec.iter(node) {
            records += 1;
            if let Err(e) = ns.apply(&r) {
                tracing::warn!(core = i, record = records, error = %e, "metadata log record does not apply; skipped");
            }
        }
        tracing::info!(
            core = i,
            records,
            truncated = rec.truncated_bytes,
            jobs = ns.summaries().len(),
            "metadata log replayed"
        );
        let mut len = rec.records.len() as u64;
        if rec.version != metalog::FILE_VERSION {
            // A version 1 log: its blocks are all this node's. Rewritten
            // as a version 2 snapshot before anything is appended to it.
            let mut snap = Vec::new();
            ns.snapshot(&mut snap);
            file = metalog::rewrite(&dir, log_shape(cfg, i), &snap)?;
            len = snap.len() as u64;
            tracing::info!(core = i, node, "metadata log of format version 1 rewritten as version 2");
        }
        out.push(Replayed { ns, log: Some((file, len)) });
    }
    Ok((out, Some(lock), node))
}

/// Settles the replayed namespaces against the blocks that survived
/// (`survivors`, every core's persistent flash and disk blocks), starts each
/// core's log writer and hands every core its namespaces.
fn start_meta(
    cfg: &NodeConfig,
    metas: &mut Vec<Replayed>,
    survivors: &std::collections::HashSet<BlockId>,
    cores: &Arc<Vec<Arc<CoreShared>>>,
    txs: Vec<mpsc::Sender<MetaStart>>,
) -> Result<(), NodeError> {
    let mut orphans: Vec<Vec<BlockId>> = vec![Vec::new(); cfg.cores];
    if cfg.data_dir.is_some() {
        // The log is the truth: a persistent block no object names belongs
        // to a put that was never acknowledged, or a delete that was.
        let mut named = std::collections::HashSet::new();
        for m in metas.iter_mut() {
            named.extend(m.ns.settle_after_restart(|b| survivors.contains(&b)));
            let lost = m.ns.lost_objects();
            if lost > 0 {
                tracing::warn!(
                    lost,
                    "objects whose data did not survive the restart answer `data unavailable`"
                );
            }
        }
        for &b in survivors.iter().filter(|b| !named.contains(*b)) {
            if let Some(v) = orphans.get_mut(b.core() as usize) {
                v.push(b);
            }
        }
    }
    let dir = cfg.data_dir.as_ref().map(|d| d.join("meta"));
    for (i, (tx, m)) in txs.into_iter().zip(metas.drain(..)).enumerate() {
        let log = match (&dir, m.log) {
            (Some(dir), Some((file, len))) => {
                let shared = cores[i].clone();
                let wake = Box::new(move || shared.waker.wake());
                let snap = metalog::DEFAULT_SNAPSHOT_BYTES;
                Some(MetaLog::start(dir, log_shape(cfg, i), file, len, snap, wake)?)
            }
            _ => None,
        };
        let orphans = std::mem::take(&mut orphans[i]);
        if tx.send(MetaStart { ns: m.ns, log, orphans }).is_err() {
            return Err(NodeError::Core { core: i, reason: "core thread died".into() });
        }
    }
    Ok(())
}
