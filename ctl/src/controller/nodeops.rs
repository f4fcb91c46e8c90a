//! The controller's calls to a node's data port, over the wire protocol
//! (`dataplane::client`): registering and deregistering a job where its
//! namespace lives. Blocking; the HTTP handlers run them with
//! `spawn_blocking`, never holding the cluster lock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use std::time::SystemTime;

use dataplane::auth::{BlockOwner, Rights, Secret, Token};
use dataplane::client::{Client, Deregistered};
use dataplane::proto::{JobHints, Status};

use super::policy::{Allocation, Hints};

/// How long a node may take to answer one of these calls.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to a node (and its `NodeInfo` answer) may take: a
/// node that is gone must not hold the sweeper's adoption work for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Lifetime of the token the controller presents for its own calls.
const OWN_TOKEN_TTL: Duration = Duration::from_secs(300);

/// A capability token for `job`, whose blocks `owner` holds (`None`: the
/// token opens no blocks unless `rights` has `ADMIN`), valid for `ttl`;
/// with its expiry (Unix seconds).
pub fn mint(
    secret: &Secret,
    job: &str,
    owner: Option<BlockOwner>,
    rights: Rights,
    ttl: Duration,
) -> Result<(String, u64), String> {
    let expiry = SystemTime::now() + ttl;
    let t = Token::issue(secret, job, owner, rights, expiry).map_err(|e| format!("token for {job}: {e}"))?;
    let secs = expiry.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok((t, secs))
}

/// The hints a node keeps for a job: placement within the node follows the
/// allocation's tier choice; a job with both DRAM and flash may spill over.
pub fn node_hints(hints: &Hints, alloc: &Allocation) -> JobHints {
    JobHints {
        latency_sensitive: alloc.latency_sensitive,
        spill_over: alloc.dram > 0 && alloc.flash > 0,
        max_workers: hints.lambdas.unwrap_or(0),
        capacity: hints.capacity.unwrap_or(0),
        peak_throughput: hints.peak_throughput.unwrap_or(0),
    }
}

/// A client for the node at `addr`; with a cluster secret it presents a
/// token with every right on `job`, which registering and deregistering need.
fn connect(addr: &str, job: &str, secret: Option<&Secret>) -> Result<Client, String> {
    let mut c = Client::connect_timeout(addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("cannot reach node at {addr}: {e}"))?;
    c.set_timeout(NODE_TIMEOUT);
    if let Some(s) = secret {
        // ADMIN: not limited to one owner's blocks.
        c.set_token(Some(mint(s, job, None, Rights::ALL, OWN_TOKEN_TTL)?.0));
    }
    Ok(c)
}

/// Registers `name` on the node at `addr`. A job the node already has
/// (registered directly, or holding PERSIST objects) is taken over as is.
/// Returns the owner of the job's blocks: the node's number and the job's
/// id there (what its tokens claim).
pub fn register(
    addr: &str,
    name: &str,
    hints: JobHints,
    secret: Option<&Secret>,
) -> Result<BlockOwner, String> {
    let mut c = connect(addr, name, secret)?;
    let job = match c.register_job(name, hints) {
        Ok(j) => j,
        Err(e) if e.status() == Some(Status::Exists) => {
            c.job(name).map_err(|e| format!("node at {addr}: job {name}: {e}"))?
        }
        Err(e) => return Err(format!("node at {addr} refused job {name}: {e}")),
    };
    Ok(BlockOwner { meta_node: c.node_number(), job_id: job.id })
}

/// The owner of `name`'s blocks, as its metadata node at `addr` has it
/// (for a token minted after the registration).
pub fn block_owner(addr: &str, name: &str, secret: Option<&Secret>) -> Result<BlockOwner, String> {
    let mut c = connect(addr, name, secret)?;
    let job = c.job(name).map_err(|e| format!("node at {addr}: job {name}: {e}"))?;
    Ok(BlockOwner { meta_node: c.node_number(), job_id: job.id })
}

/// Deregisters `name` on its metadata node at `addr`, freeing its blocks
/// except PERSIST ones there and on every other node of `nodes` (node number
/// → address: the live nodes). `Ok(None)` when the node does not know the
/// job; else what was done, with the nodes whose free failed.
pub fn deregister(
    addr: &str,
    name: &str,
    nodes: &BTreeMap<u16, String>,
    secret: Option<&Secret>,
) -> Result<Option<Deregistered>, String> {
    let mut c = connect(addr, name, secret)?;
    let mut addrs = Vec::with_capacity(nodes.len());
    for (&n, a) in nodes {
        let a: SocketAddr = a.parse().map_err(|e| format!("node {n} has a bad address {a}: {e}"))?;
        addrs.push((n, a));
    }
    c.set_node_addrs(addrs);
    let job = match c.job(name) {
        Ok(j) => j,
        Err(e) if e.status() == Some(Status::NotFound) => return Ok(None),
        Err(e) => return Err(format!("node at {addr}: job {name}: {e}")),
    };
    c.deregister_job_detailed(&job).map(Some).map_err(|e| format!("node at {addr}: deregister {name}: {e}"))
}

/// The hints the node at `addr` keeps for `name` (to adopt the job).
pub fn job_hints(addr: &str, name: &str, secret: Option<&Secret>) -> Result<Hints, String> {
    let mut c = connect(addr, name, secret)?;
    let info = c.job_info(name).map_err(|e| format!("node at {addr}: job {name}: {e}"))?;
    let h = info.hints;
    let some = |n: u64| (n > 0).then_some(n);
    Ok(Hints {
        latency_sensitive: Some(h.latency_sensitive),
        lambdas: (h.max_workers > 0).then_some(h.max_workers),
        capacity: some(h.capacity),
        peak_throughput: some(h.peak_throughput),
    })
}
