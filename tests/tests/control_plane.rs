//! The control plane's "done when" (issue 4), end to end: every test runs
//! `pollen controller`, one `pollen node --role metadata` and three `pollen
//! node --role storage` processes on loopback (numbered nodes, adaptive
//! polling, 100 ms heartbeats, small nodes), drives them through the real
//! `pollenctl --json` and the real dataplane client, and checks:
//!
//! - each kind of hint (and none) → the allocation of the hint table in
//!   docs/control-plane.md, computed here from the policy's constants, and a
//!   weight map over the live storage nodes that sums to 1;
//! - a job's blocks spread over the storage nodes by its weights;
//! - a storage node killed with SIGKILL → `data unavailable` for its blocks
//!   within a few heartbeats, other objects still read, new puts succeed;
//! - the metadata node killed with SIGKILL during puts and started again
//!   lists every object it acknowledged;
//! - a missing or forged token (admin or capability) is refused;
//! - under load rightsizing turns a core on, and back to the minimum after;
//! - a latency-sensitive job given no DRAM puts its blocks on flash.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dataplane::auth::{Rights, Secret, Token};
use dataplane::client::{Client, ClientError, Job, PutOptions, DEFAULT_CONNECT_TIMEOUT};
use dataplane::proto::{tier, Status};
use pollen_ctl::api::{EventKind, JobEntry, LsOutput, NodeState, NodesResponse, PutOutput, Role};
use pollen_ctl::controller::policy::{AllocTable, Policy};
use pollen_ctl::size::parse_size;
use pollen_tests::control::{
    wait_for, Cluster, ReadLoad, HEARTBEAT_MS, PATIENT, RIGHTSIZING_POLICY, SMALL_POLICY,
};
use pollen_tests::{bytes, TierDir};

/// Every node's DRAM: 16 MiB per core (256 blocks of 64 KiB).
const DRAM: &[&str] = &["--dram-gb", "0.015625"];

/// Node n1 holds the namespaces; n2..n4 hold the blocks.
const ROLES: [Option<&str>; 4] = [Some("metadata"), Some("storage"), Some("storage"), Some("storage")];
const STORAGE: [&str; 3] = ["n2", "n3", "n4"];

/// The done-when cluster: a controller with `policy` and `ctl_args`, the
/// metadata node and three storage nodes, each with `extra(i)` (node `nI`).
fn cluster(policy: &str, ctl_args: &[&str], extra: impl Fn(usize) -> Vec<String>) -> Cluster {
    let mut c = Cluster::controller(policy, ctl_args, DRAM);
    c.start_numbered(&ROLES, extra);
    let r: NodesResponse = c.json(&["nodes"]);
    let roles: BTreeMap<String, Role> =
        r.nodes.iter().map(|n| (n.report.node_id.clone(), n.report.role)).collect();
    let want = [("n1", Role::Metadata), ("n2", Role::Storage), ("n3", Role::Storage), ("n4", Role::Storage)];
    assert_eq!(roles, want.iter().map(|(id, r)| (id.to_string(), *r)).collect(), "roles in the reports");
    c
}

/// Objects by name, with their data.
type Objects = Vec<(String, Vec<u8>)>;

fn one_core(_: usize) -> Vec<String> {
    vec!["--cores".into(), "1".into()]
}

fn number(id: &str) -> u16 {
    id.trim_start_matches('n').parse().expect("node number")
}

fn weight_sum(j: &JobEntry) -> f64 {
    j.weights.values().sum()
}

/// The map gives every live storage node a weight in [0, 1], summing to
/// 1; the metadata-only node and dead nodes, if listed, have weight 0.
fn assert_weight_map(j: &JobEntry, live: &[&str]) {
    for id in live {
        assert!(j.weights.contains_key(*id), "{}: live node {id} missing: {:?}", j.name, j.weights);
    }
    for (id, w) in &j.weights {
        assert!((0.0..=1.0).contains(w), "{}: {:?}", j.name, j.weights);
        assert!(live.contains(&id.as_str()) || *w == 0.0, "{}: {id} has weight {w}", j.name);
    }
    assert!(
        (weight_sum(j) - 1.0).abs() < 1e-6,
        "{}: weights sum to {}: {:?}",
        j.name,
        weight_sum(j),
        j.weights
    );
}

/// A client of the job's metadata node once it holds the job's weight map,
/// with every node's address and the job's token (if any).
fn client_of(c: &Cluster, name: &str) -> (Client, Job, JobEntry) {
    let entry = wait_for(Duration::from_secs(10), "the weight map on the metadata node", || {
        let e = c.registered(name);
        e.weights_applied.then_some(e)
    });
    assert_eq!(entry.node_id, "n1", "the only metadata node holds {name}'s namespace");
    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect to the metadata node");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job(name).expect("job");
    (client, job, entry)
}

/// The done-when cluster of one-core nodes with job `name` registered for
/// 25 lambdas (250 MB/s: more than two 100 MB/s nodes, so its weights span
/// all three storage nodes) and 16 MiB, and a client of it. No node has
/// flash, so the job, not latency-sensitive, gets DRAM (the table's last row).
fn with_wide_job(name: &str) -> (Cluster, Client, Job, JobEntry) {
    with_wide_job_and(name, &[])
}

/// [`with_wide_job`] with `ctl_args` for the controller.
fn with_wide_job_and(name: &str, ctl_args: &[&str]) -> (Cluster, Client, Job, JobEntry) {
    let c = cluster(SMALL_POLICY, ctl_args, one_core);
    let args = ["--lambdas", "25", "--capacity", "16MiB"];
    let j: JobEntry = c.json(&[&["job", "register", name][..], &args].concat());
    let table = Policy::parse(SMALL_POLICY).expect("the test policy").allocation;
    let a = j.allocation.expect("an allocation");
    let want = Hinted::parse(&args).documented(&table, 3 * (16 << 20), false);
    assert_eq!((a.throughput, a.capacity, a.dram, a.flash, a.latency_sensitive), want, "{:?}", a.basis);
    let (client, job, entry) = client_of(&c, name);
    (c, client, job, entry)
}

/// One core, and on storage nodes a 32 MiB flash tier on a file in `dir`.
fn with_flash(dir: &TierDir, i: usize) -> Vec<String> {
    let mut a = one_core(i);
    if i > 1 {
        a.extend(["--flash".to_string(), format!("{}:32MiB", dir.file(&format!("n{i}.img")).display())]);
    }
    a
}

/// Answered "at once": well under the client's connect timeout, which a
/// request stalled on a dead or unreachable node would take.
const AT_ONCE: Duration = DEFAULT_CONNECT_TIMEOUT.saturating_sub(Duration::from_millis(200));

/// The nodes holding the blocks of `name`.
fn located(client: &mut Client, job: &Job, name: &str) -> Vec<u16> {
    client.lookup(job, name).expect("lookup").blocks.iter().map(|l| l.node).collect()
}

/// Puts `count` objects `o-0`.. of one block and a few bytes (two blocks
/// each; data from `seed`); returns each with its data and the
/// nodes holding its blocks.
fn put_two_block_objects(
    client: &mut Client,
    job: &Job,
    count: usize,
    seed: u64,
) -> Vec<(String, Vec<u8>, Vec<u16>)> {
    let bs = client.block_size() as usize;
    (0..count)
        .map(|i| {
            let (name, data) = (format!("o-{i}"), bytes(bs + i, seed + i as u64));
            client.put_buffer(job, &name, &data, PutOptions::default()).expect("put");
            let on = located(client, job, &name);
            (name, data, on)
        })
        .collect()
}

/// What docs/control-plane.md's hint table gives, from the policy's
/// constants: (throughput, capacity, dram, flash, latency-sensitive).
struct Hinted<'a> {
    args: &'a [&'a str],
    latency_sensitive: bool,
    lambdas: Option<u64>,
    capacity: Option<u64>,
    peak: Option<u64>,
}

impl Hinted<'_> {
    fn parse<'a>(args: &'a [&'a str]) -> Hinted<'a> {
        let value = |flag: &str| -> Option<&str> {
            args.iter().position(|a| *a == flag).map(|i| args[i + 1].trim_end_matches("/s"))
        };
        Hinted {
            args,
            latency_sensitive: args.contains(&"--latency-sensitive"),
            lambdas: value("--lambdas").map(|v| v.parse().expect("lambdas")),
            capacity: value("--capacity").map(|v| parse_size(v).expect("capacity")),
            peak: value("--peak-throughput").map(|v| parse_size(v).expect("peak throughput")),
        }
    }

    fn none(&self) -> bool {
        !self.latency_sensitive && self.lambdas.is_none() && self.capacity.is_none() && self.peak.is_none()
    }

    /// The table's rows, in its order.
    fn documented(&self, t: &AllocTable, dram_free: u64, has_flash: bool) -> (u64, u64, u64, u64, bool) {
        let throughput = match (self.peak, self.lambdas) {
            (Some(r), _) => r,
            (None, Some(n)) => n * t.per_worker_throughput,
            (None, None) => t.default_workers as u64 * t.per_worker_throughput,
        };
        let capacity = self.capacity.unwrap_or(t.default_capacity);
        // No hints at all: the conservative default, as latency-sensitive.
        let ls = self.latency_sensitive || self.none();
        let (dram, flash) = match (ls, has_flash) {
            (true, true) => (capacity.min(dram_free), capacity - capacity.min(dram_free)),
            (true, false) | (false, false) => (capacity, 0),
            (false, true) => (0, capacity),
        };
        (throughput, capacity, dram, flash, ls)
    }
}

/// Registration with each kind of hint, and none, on storage nodes with
/// DRAM and flash: the allocation is the documented one; the weight map
/// covers the live storage nodes, sums to 1, never asks a node for more than
/// it has, and packs node after node (spare throughput first).
#[test]
fn each_kind_of_hint_gets_the_documented_allocation_and_weights() {
    let flash = TierDir::new("control-plane-flash");
    let c = cluster(SMALL_POLICY, &PATIENT, |i| with_flash(&flash, i));
    let table = Policy::parse(SMALL_POLICY).expect("the test policy").allocation;

    // What the storage nodes report: each one's throughput, DRAM and flash.
    let r: NodesResponse = c.json(&["nodes"]);
    let mut cap: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for n in r.nodes.iter().filter(|n| n.report.role == Role::Storage) {
        let tier = |name: &str| -> u64 {
            n.report.tiers.iter().filter(|t| t.tier == name).map(|t| t.capacity_bytes).sum()
        };
        let tp = table.core_throughput * n.report.cores.len() as u64;
        cap.insert(n.report.node_id.clone(), (tp, tier("dram"), tier("flash")));
    }
    assert_eq!(cap.len(), 3);
    // 16 MiB of DRAM; the flash file less its region header.
    assert!(cap.values().all(|&(_, d, f)| d == 16 << 20 && f > 16 << 20), "{cap:?}");
    let dram_total: u64 = cap.values().map(|c| c.1).sum();

    let cases: &[&[&str]] = &[
        &[],
        &["--latency-sensitive"],
        &["--lambdas", "25"],
        &["--peak-throughput", "50MB/s"],
        &["--lambdas", "3", "--peak-throughput", "20MB/s"],
        &["--capacity", "4MiB"],
        &["--latency-sensitive", "--capacity", "64MiB"],
        &["--latency-sensitive", "--lambdas", "2", "--capacity", "1MiB", "--peak-throughput", "5MB/s"],
    ];
    for (k, args) in cases.iter().enumerate() {
        let h = Hinted::parse(args);
        let name = format!("hints-{k}");
        let mut cmd = vec!["job", "register", name.as_str()];
        cmd.extend_from_slice(h.args);
        // One job at a time on an empty cluster: all the DRAM is free.
        let j: JobEntry = c.json(&cmd);
        let a = j.allocation.clone().expect("an allocation");
        let want = h.documented(&table, dram_total, true);
        assert_eq!(
            (a.throughput, a.capacity, a.dram, a.flash, a.latency_sensitive),
            want,
            "{args:?}: {:?}",
            a.basis
        );
        assert_weight_map(&j, &STORAGE);
        assert!(!j.overcommitted, "{args:?}: {j:?}");
        for id in STORAGE {
            let (w, (tp, dram, fl)) = (j.weights[id], cap[id]);
            let over = |need: u64, have: u64| w * need as f64 > have as f64 + 1.0;
            assert!(
                !over(a.throughput, tp) && !over(a.dram, dram) && !over(a.flash, fl),
                "{args:?}: {id} asked for more than it has: {:?}",
                j.weights
            );
        }
        // Node after node in order, each as much as it can take: the first
        // limiting resource decides, so at most one node is partly used.
        let frac = |id: &str| -> f64 {
            let (tp, dram, fl) = cap[id];
            [(a.throughput, tp), (a.dram, dram), (a.flash, fl)]
                .iter()
                .filter(|(need, _)| *need > 0)
                .map(|&(need, have)| have as f64 / need as f64)
                .fold(f64::INFINITY, f64::min)
        };
        let mut left = 1.0f64;
        for id in STORAGE {
            let want = frac(id).min(left);
            assert!((j.weights[id] - want).abs() < 1e-6, "{args:?}: {id}: {:?}", j.weights);
            left -= want;
        }
        // The same map from `pollenctl weights`, and the job on the metadata node.
        let w: serde_json::Value = c.json(&["weights", &name]);
        let listed: BTreeMap<String, f64> = serde_json::from_value(w["weights"].clone()).expect("weights");
        assert_eq!(listed, j.weights);
        assert_eq!(j.node_id, "n1");
        c.ok(&["job", "deregister", &name]);
    }
    c.stop();
}

/// Pocket's DRAM share: a latency-sensitive job keeps what DRAM it was
/// given and puts the rest on flash. A first job reserves all the DRAM; a
/// second, latency-sensitive, gets none, so once the controller's shares
/// reach the storage nodes (on heartbeat replies) its blocks go to flash
/// on every node although their DRAM is still free.
#[test]
fn a_latency_sensitive_job_past_its_dram_share_goes_to_flash() {
    let flash = TierDir::new("control-plane-share");
    let c = cluster(SMALL_POLICY, &PATIENT, |i| with_flash(&flash, i));
    let big: JobEntry = c.json(&["job", "register", "big", "--latency-sensitive", "--capacity", "64MiB"]);
    let a = big.allocation.expect("an allocation");
    assert_eq!((a.dram, a.flash), (48 << 20, 16 << 20), "all of the DRAM, the rest on flash");
    let late: JobEntry = c.json(&["job", "register", "late", "--latency-sensitive", "--capacity", "8MiB"]);
    let a = late.allocation.expect("an allocation");
    assert_eq!((a.dram, a.flash), (0, 8 << 20), "no DRAM left for it");
    let (mut client, job, _) = client_of(&c, "late");
    let data = bytes(6 * 65536, 61);
    wait_for(Duration::from_secs(10), "late's blocks on flash", || {
        client.put_buffer(&job, "probe", &data, PutOptions::default()).expect("put");
        let tiers: Vec<u8> =
            client.lookup(&job, "probe").expect("lookup").blocks.iter().map(|l| l.block.tier()).collect();
        if tiers.iter().all(|&t| t == tier::FLASH) {
            return Some(());
        }
        client.delete(&job, "probe").expect("delete");
        None
    });
    assert_eq!(client.get_buffer(&job, "probe").expect("get"), data);
    let on: BTreeSet<u16> = located(&mut client, &job, "probe").into_iter().collect();
    assert!(on.iter().all(|n| (2..=4).contains(n)), "blocks on storage nodes only: {on:?}");
    c.stop();
}

/// 300 blocks of one job: each storage node holds its weight's share
/// within statistical bounds, the nodes' reports agree, and the metadata
/// node holds none.
#[test]
fn data_of_one_job_spreads_by_its_weights() {
    let (c, mut client, job, j) = with_wide_job_and("spread", &PATIENT);
    assert_weight_map(&j, &STORAGE);
    assert!(STORAGE.iter().all(|id| j.weights[*id] >= 0.15), "250 MB/s needs all three: {:?}", j.weights);
    let bs = client.block_size() as usize;
    let mut per_node: BTreeMap<u16, usize> = BTreeMap::new();
    let mut objects = Vec::new();
    // 200 one-block objects and 5 of 20 blocks.
    for i in 0..205 {
        let len = if i < 200 { bs / 2 + i } else { 20 * bs };
        let (name, data) = (format!("o-{i}"), bytes(len, i as u64 + 1));
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put");
        for n in located(&mut client, &job, &name) {
            *per_node.entry(n).or_default() += 1;
        }
        objects.push((name, data));
    }
    let total: usize = per_node.values().sum();
    assert_eq!(total, 300);
    assert!(!per_node.contains_key(&1), "blocks on the metadata node: {per_node:?}");
    // Each node's count is Binomial(300, w): within 5 standard deviations.
    for (id, &w) in &j.weights {
        let got = per_node.get(&number(id)).copied().unwrap_or(0) as f64;
        let (want, sd) = (w * total as f64, (total as f64 * w * (1.0 - w)).sqrt());
        assert!((got - want).abs() <= 5.0 * sd + 1.0, "{id}: {got} blocks, weight {w}: {per_node:?}");
    }
    // The nodes' own reports: DRAM in use is their blocks, and none on n1.
    for id in ["n1", "n2", "n3", "n4"] {
        let blocks = per_node.get(&number(id)).copied().unwrap_or(0) as u64;
        wait_for(Duration::from_secs(10), "blocks in the nodes' reports", || {
            (c.used_dram(id) == blocks * bs as u64).then_some(())
        });
    }
    for (name, data) in objects.iter().step_by(17) {
        assert_eq!(&client.get_buffer(&job, name).expect("get"), data, "{name}");
    }
    // pollenctl reads an object whose 20 blocks are on all three nodes. Any
    // one of the five misses a node of weight w with probability (1 - w)^20
    // (4% at w = 0.15); that all five do is negligible.
    let spans: Vec<BTreeSet<u16>> = objects[200..]
        .iter()
        .map(|(name, _)| located(&mut client, &job, name).into_iter().collect())
        .collect();
    let k = spans
        .iter()
        .position(|on| on.len() == 3)
        .unwrap_or_else(|| panic!("no 20-block object on all three: {spans:?}"));
    let (big, data) = &objects[200 + k];
    c.ok(&["get", "spread", big, &c.path("big.out")]);
    assert_eq!(&std::fs::read(c.path("big.out")).unwrap(), data);
    c.stop();
}

/// A storage node killed with SIGKILL: within a few heartbeats the
/// metadata node answers lookups of objects with a block there with `data
/// unavailable` at once; objects
/// on the live nodes still read; the job's weights drop it and still sum to
/// 1; new puts (client and pollenctl) succeed, on live nodes only.
#[test]
fn a_killed_storage_node_reads_as_unavailable_and_the_rest_goes_on() {
    let (mut c, mut client, job, _) = with_wide_job("failing");
    let bs = client.block_size() as usize;
    let objects = put_two_block_objects(&mut client, &job, 60, 100);
    let victim = "n2";
    let dead = number(victim);
    let (lost, kept): (Vec<_>, Vec<_>) = objects.iter().partition(|(_, _, on)| on.contains(&dead));
    assert!(!lost.is_empty() && !kept.is_empty(), "two-block objects over three nodes");

    let killed = Instant::now();
    c.sigkill(victim);
    let (first, _, _) = lost[0];
    // The metadata node's own answer (Lookup alone): the client answers 7
    // for the unreachable node from the start (the next test).
    wait_for(Duration::from_secs(10), "data unavailable from the metadata node", || {
        let e = client.lookup(&job, first).err()?;
        (e.status() == Some(Status::DataUnavailable)).then_some(())
    });
    let after = killed.elapsed();
    // Declared dead after 3 missed heartbeats, told to the metadata node on
    // its next one; a loaded machine may add a few more.
    assert!(after < Duration::from_millis(50 * HEARTBEAT_MS), "data unavailable only after {after:?}");
    eprintln!("data unavailable {after:?} after the SIGKILL ({HEARTBEAT_MS} ms heartbeats)");
    for (name, _, _) in &lost {
        let t = Instant::now();
        let e = client.get_buffer(&job, name).expect_err("a block is on the dead node");
        assert_eq!(e.status(), Some(Status::DataUnavailable), "{name}: {e}");
        assert!(t.elapsed() < AT_ONCE, "{name}: answered after {:?}", t.elapsed());
    }
    let err =
        String::from_utf8_lossy(&c.ctl(&["get", "failing", first, &c.path("lost.out")]).stderr).into_owned();
    assert!(err.contains("data unavailable"), "{err}");
    for (name, data, _) in &kept {
        assert_eq!(&client.get_buffer(&job, name).expect("an object on live nodes"), data, "{name}");
    }

    // The controller's view: the node is down, its weight 0, the rest sums to 1.
    let r: NodesResponse = c.json(&["nodes"]);
    let state = r.nodes.iter().find(|n| n.report.node_id == victim).map(|n| n.state);
    assert_eq!(state, Some(NodeState::Down));
    assert!(c
        .events()
        .events
        .iter()
        .any(|e| e.kind == EventKind::NodeDown && e.node.as_deref() == Some(victim)));
    let entry = c.registered("failing");
    assert_weight_map(&entry, &["n3", "n4"]);
    assert_eq!(entry.weights[victim], 0.0);

    // New puts succeed, on live nodes only.
    let (mut client, job, _) = client_of(&c, "failing");
    for i in 0..20 {
        let (name, data) = (format!("after-{i}"), bytes(2 * bs, 500 + i));
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put after the failure");
        assert!(!located(&mut client, &job, &name).contains(&dead), "{name} has a block on the dead node");
        assert_eq!(client.get_buffer(&job, &name).expect("get"), data);
    }
    let file = c.path("new.in");
    std::fs::write(&file, bytes(3 * bs, 7)).unwrap();
    let put: PutOutput = c.json(&["put", "failing", "after-cli", &file]);
    assert_eq!(put.bytes, 3 * bs as u64);
    c.ok(&["get", "failing", "after-cli", &c.path("new.out")]);
    assert_eq!(std::fs::read(c.path("new.out")).unwrap(), bytes(3 * bs, 7));
    // A new job avoids the dead node too.
    let late: JobEntry = c.json(&["job", "register", "late", "--lambdas", "1"]);
    assert_weight_map(&late, &["n3", "n4"]);
    c.stop();
}

/// A storage node that stops answering (SIGSTOP), then dies (SIGKILL),
/// before the controller declares it dead (it waits 1000 heartbeats here,
/// so the dead set never reaches the metadata node during the test): a
/// read of an object with a block there fails with `data unavailable` from
/// the client itself, naming the node and its address, within the connect
/// timeout (a fresh client, the node stopped), the request timeout (open
/// connections, the node stopped) or at once (the node killed), not as an
/// I/O error; objects on the live nodes still read, and the node's blocks
/// read again once it resumes; the client's own errors stay its own.
#[test]
fn an_unreachable_storage_node_reads_as_unavailable_before_it_is_declared_dead() {
    let (mut c, mut client, job, entry) = with_wide_job_and("reach", &["--missed-heartbeats", "1000"]);
    let objects = put_two_block_objects(&mut client, &job, 30, 300);
    let (victim, dead) = ("n2", number("n2"));
    let (lost, kept): (Vec<_>, Vec<_>) = objects.iter().partition(|(_, _, on)| on.contains(&dead));
    assert!(!lost.is_empty() && !kept.is_empty(), "two-block objects over three nodes");
    let (first, first_data, _) = lost[0];
    let named = format!("is on node {dead} at 127.0.0.1:");
    let unavailable = |e: &ClientError, what: &str| {
        assert_eq!(e.status(), Some(Status::DataUnavailable), "{what}: {e}");
        let text = e.to_string();
        assert!(text.contains(&named) && text.contains("which cannot be reached"), "{what}: {text}");
    };
    let controller_sees_up = |c: &Cluster| {
        let r: NodesResponse = c.json(&["nodes"]);
        let state = r.nodes.iter().find(|n| n.report.node_id == victim).map(|n| n.state);
        assert_eq!(state, Some(NodeState::Up), "the controller must not have declared {victim} dead yet");
    };
    let pid = nix::unistd::Pid::from_raw(c.nodes[victim].0.as_ref().expect("n2 runs").id() as i32);

    // Stopped: the kernel still accepts connections to it, nothing answers.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let (mut fresh, _, _) = client_of(&c, "reach");
    let t = Instant::now();
    let e = fresh.get_buffer(&job, first).expect_err("the node holding a block is stopped");
    unavailable(&e, "fresh client, node stopped");
    let bound = DEFAULT_CONNECT_TIMEOUT + Duration::from_secs(2);
    assert!(t.elapsed() < bound, "answered after {:?}, past {bound:?}", t.elapsed());
    // A client with connections open to it waits its request timeout.
    client.set_timeout(Duration::from_millis(500));
    let t = Instant::now();
    let e = client.get_buffer(&job, first).expect_err("the node holding a block is stopped");
    unavailable(&e, "open connections, node stopped");
    assert!(t.elapsed() < Duration::from_secs(3), "answered after {:?}", t.elapsed());
    for (name, data, _) in &kept {
        assert_eq!(&fresh.get_buffer(&job, name).expect("an object on live nodes"), data, "{name}");
    }
    controller_sees_up(&c);
    // Resumed: its blocks read again, on both clients.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    client.set_timeout(Duration::from_secs(30));
    assert_eq!(&fresh.get_buffer(&job, first).expect("the node resumed"), first_data);
    assert_eq!(&client.get_buffer(&job, first).expect("the node resumed"), first_data);

    // Killed: connections reset, new ones refused, both at once.
    c.sigkill(victim);
    let (mut fresh, _, _) = client_of(&c, "reach");
    for (name, _, _) in &lost {
        for (who, cl) in [("open connections", &mut client), ("fresh client", &mut fresh)] {
            let t = Instant::now();
            let e = cl.get_buffer(&job, name).expect_err("a block is on the killed node");
            unavailable(&e, &format!("{who}, node killed, {name}"));
            assert!(t.elapsed() < AT_ONCE, "{name}: answered after {:?}", t.elapsed());
        }
    }
    let err =
        String::from_utf8_lossy(&c.ctl(&["get", "reach", first, &c.path("lost.out")]).stderr).into_owned();
    assert!(err.contains("data unavailable") && err.contains("cannot be reached"), "{err}");
    for (name, data, _) in &kept {
        assert_eq!(&fresh.get_buffer(&job, name).expect("an object on live nodes"), data, "{name}");
    }
    controller_sees_up(&c);

    // The client's own errors are not the node's: an unknown address, a
    // destination it cannot create.
    let mut blind = Client::connect(entry.node_addr.as_str()).expect("connect to the metadata node");
    let e = blind.get_buffer(&job, first).expect_err("node 2's address is unknown to this client");
    assert!(matches!(e, ClientError::Local(_)), "{e}");
    let e =
        fresh.get(&job, first, std::path::Path::new("/nonexistent-pollen-dir/o")).expect_err("no such dir");
    assert!(matches!(e, ClientError::Local(_)), "{e}");
    c.stop();
}

/// The metadata node killed with SIGKILL while a client puts objects, then
/// started again on its data directory: `pollenctl ls` lists every object
/// it acknowledged, each reads back byte for byte, and new puts spread over
/// the storage nodes again.
#[test]
fn a_killed_and_restarted_metadata_node_lists_every_acknowledged_object() {
    let (mut c, mut client, job, _) = with_wide_job("durable");
    client.create_dir(&job, "out").expect("mkdir");
    let acked: Arc<Mutex<Objects>> = Arc::default();
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            // Until the node dies under it: every put answered ok is recorded.
            for i in 0u64.. {
                let name = if i % 4 == 0 { format!("top-{i}") } else { format!("out/o-{i}") };
                let data = bytes(1000 + (i as usize * 613) % 150_000, i + 1);
                match client.put_buffer(&job, &name, &data, PutOptions::default()) {
                    Ok(()) => acked.lock().unwrap().push((name, data)),
                    Err(_) => return i,
                }
            }
            unreachable!()
        })
    };
    wait_for(Duration::from_secs(20), "puts acknowledged", || {
        (acked.lock().unwrap().len() >= 60).then_some(())
    });
    let killed_at = c.events().last_seq;
    c.sigkill("n1");
    let tried = writer.join().expect("writer");
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(tried as usize >= acked.len() && acked.len() >= 60, "{tried} puts, {} acknowledged", acked.len());

    c.restart_node("n1");
    // Until the controller has a report of the new process (the last one
    // of the killed process may still count as up for 3 heartbeats).
    wait_for(Duration::from_secs(20), "the controller seeing the restarted node", || {
        c.events().events.into_iter().find(|e| {
            e.seq > killed_at
                && e.node.as_deref() == Some("n1")
                && matches!(e.kind, EventKind::NodeRestarted | EventKind::NodeRecovered)
        })
    });
    let entry = wait_for(Duration::from_secs(20), "the metadata node back with the job's map", || {
        let e = c.registered("durable");
        (e.node_state == Some(NodeState::Up) && e.weights_applied).then_some(e)
    });
    // Every acknowledged object is listed by pollenctl, with its size.
    let mut listed: BTreeMap<String, u64> = BTreeMap::new();
    for dir in ["", "out"] {
        let mut args = vec!["ls", "durable"];
        if !dir.is_empty() {
            args.push(dir);
        }
        let ls: LsOutput = c.json(&args);
        for e in ls.entries.iter().filter(|e| !e.is_dir) {
            let path = if dir.is_empty() { e.name.clone() } else { format!("{dir}/{}", e.name) };
            listed.insert(path, e.size);
        }
    }
    for (name, data) in &acked {
        assert_eq!(listed.get(name), Some(&(data.len() as u64)), "{name} was acknowledged");
    }
    // At most the put in flight at the kill was made durable unanswered.
    assert!(listed.len() <= acked.len() + 1, "{} listed, {} acknowledged", listed.len(), acked.len());
    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job("durable").expect("the job replayed from the log");
    for (name, data) in &acked {
        assert_eq!(&client.get_buffer(&job, name).expect("an acknowledged object"), data, "{name}");
    }
    let (name, data) = &acked[acked.len() / 2];
    c.ok(&["get", "durable", name, &c.path("mid.out")]);
    assert_eq!(&std::fs::read(c.path("mid.out")).unwrap(), data);
    // Placement is random by weight (0.4/0.4/0.2 here): put until every
    // storage node got a block; 300 puts miss one with odds of 0.8^300.
    let mut on = BTreeSet::new();
    for i in 0..300 {
        let name = format!("again-{i}");
        client
            .put_buffer(&job, &name, &bytes(1000, i), PutOptions::default())
            .expect("put after the restart");
        on.extend(located(&mut client, &job, &name));
        if on.len() == 3 {
            break;
        }
    }
    assert_eq!(on, BTreeSet::from([2, 3, 4]), "new blocks spread over the storage nodes");
    c.stop();
}

/// A cluster with an admin token and a cluster secret: the controller API
/// refuses a missing or wrong admin token; the metadata node and a storage
/// node refuse a job's requests without a token or with a forged one, and
/// serve them with the token registration returned.
#[test]
fn a_missing_or_forged_token_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("secret");
    std::fs::write(&secret, "the-cluster-secret-of-this-test\n").unwrap();
    let admin = keys.path().join("admin");
    std::fs::write(&admin, "admin-token-of-the-control-plane-test\n").unwrap();
    let (secret_s, admin_s) = (secret.display().to_string(), admin.display().to_string());
    let ctl_args =
        ["--cluster-secret-file", &secret_s, "--admin-token-file", &admin_s, PATIENT[0], PATIENT[1]];
    let mut c = Cluster::controller(SMALL_POLICY, &ctl_args, DRAM);
    c.admin_token_file = Some(admin.clone());
    c.start_numbered(&ROLES, |i| {
        let mut a = one_core(i);
        a.extend(["--cluster-secret-file", &secret_s, "--controller-token-file", &admin_s].map(String::from));
        a
    });

    // The controller: no admin token, or a wrong one, is 401.
    let mut bare = c.pollenctl();
    bare.admin_token_file = None;
    let err = bare.fails(&["nodes"]);
    assert!(err.contains("401"), "{err}");
    let wrong = keys.path().join("wrong");
    std::fs::write(&wrong, "not-the-admin-token-at-all-000\n").unwrap();
    bare.admin_token_file = Some(wrong);
    assert!(bare.fails(&["job", "register", "sneaky"]).contains("401"));

    let j: JobEntry = c.json(&["job", "register", "guarded", "--lambdas", "25", "--capacity", "16MiB"]);
    let token = j.token.clone().expect("registration returns a token");
    let claims = Token::inspect(&token).expect("a Pollen token");
    assert_eq!((claims.job.as_str(), claims.rights), ("guarded", Rights::READ_WRITE));
    let j = wait_for(Duration::from_secs(10), "the weight map on the metadata node", || {
        let e = c.registered("guarded");
        e.weights_applied.then_some(e)
    });
    let expiry = SystemTime::now() + Duration::from_secs(600);
    let other = Secret::new(b"some-other-secret-not-the-clusters".to_vec()).unwrap();
    let forged = Token::issue(&other, "guarded", None, Rights::ALL, expiry).unwrap();
    // A valid token of another job does not open this one either.
    let _: JobEntry = c.json(&["job", "register", "neighbour"]);
    let neighbours = c.json::<JobEntry>(&["job", "register", "neighbour2"]).token.expect("token");

    let connect = |addr: &str, token: Option<&str>| -> Client {
        let mut cl = Client::connect(addr).expect("connect");
        cl.set_node_addrs(j.node_socket_addrs());
        cl.set_token(token.map(str::to_string));
        cl
    };
    // The metadata node.
    for (what, t) in
        [("no token", None), ("a forged token", Some(forged.as_str())), ("another job's", Some(&*neighbours))]
    {
        let e = connect(&j.node_addr, t).job("guarded").expect_err(what);
        assert_eq!(e.status(), Some(Status::Unauthorized), "{what}: {e}");
    }
    let mut client = connect(&j.node_addr, Some(&token));
    let job = client.job("guarded").expect("the job with its token");
    let data = bytes(3 * client.block_size() as usize, 3);
    client.put_buffer(&job, "secret-obj", &data, PutOptions::default()).expect("put with the token");
    assert_eq!(client.get_buffer(&job, "secret-obj").expect("get"), data);

    // A storage node holding one of its blocks.
    let loc = client.lookup(&job, "secret-obj").expect("lookup").blocks[0];
    let r: NodesResponse = c.json(&["nodes"]);
    let node = r.nodes.iter().find(|n| n.report.node_number == loc.node).expect("the block's node");
    assert_eq!(node.report.role, Role::Storage);
    for (what, t) in [("no token", None), ("a forged token", Some(forged.as_str()))] {
        let e = connect(&node.report.addr, t).read_block(loc.block, 0, 16).expect_err(what);
        assert_eq!(e.status(), Some(Status::Unauthorized), "storage node, {what}: {e}");
    }
    let got = connect(&node.report.addr, Some(&token)).read_block(loc.block, 0, 16).expect("with the token");
    assert_eq!(got, data[..16]);
    // Another job's valid token does not open this job's block there:
    // neither read, write nor free (the block belongs to this job's owner).
    let mut theirs = connect(&node.report.addr, Some(&neighbours));
    for (what, r) in [
        ("read", theirs.read_block(loc.block, 0, 16).map(drop)),
        ("write", theirs.write_block(loc.block, 0, b"overwritten by a neighbour").map(drop)),
        ("free", theirs.free_block(loc.block)),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.status(), Some(Status::Unauthorized), "another job's token, {what}: {e}");
        assert!(e.to_string().contains("another job"), "{e}");
    }
    // This job's token writes (the same bytes) and frees its blocks there.
    let mut ours = connect(&node.report.addr, Some(&token));
    ours.write_block(loc.block, 0, &data[..16]).expect("write with the token");
    let spare = client.alloc_block_at(&job, loc.node, 0, tier::DRAM).expect("alloc there");
    ours.free_block(spare).expect("free with the token");
    assert_eq!(client.get_buffer(&job, "secret-obj").expect("get after the refusals"), data);

    // pollenctl: a forged --token is refused; without one it asks the controller.
    let out = c.ctl(&["--token", &forged, "get", "guarded", "secret-obj", "-"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    assert_eq!(c.ok(&["get", "guarded", "secret-obj", "-"]).stdout, data);
    c.stop();
}

/// Two cores per node. Idle, rightsizing brings every node down to one
/// polling core (the minimum: a hand-started cluster has no provisioner, so
/// no node is added or drained); a client's sustained reads turn a core back
/// on; when they stop, every node is back to one polling core. Each step is
/// an event and shows in the nodes' own reports.
#[test]
fn load_turns_a_core_on_and_idle_drains_back_to_the_minimum() {
    let c = cluster(RIGHTSIZING_POLICY, &PATIENT, |_| vec!["--cores".into(), "2".into()]);
    let minimum: BTreeMap<String, usize> =
        ["n1", "n2", "n3", "n4"].iter().map(|id| (id.to_string(), 1)).collect();
    wait_for(Duration::from_secs(30), "idle nodes down to one polling core", || {
        (c.pollenctl().polling() == minimum).then_some(())
    });
    let ev = c.events();
    let offs =
        ev.events.iter().filter(|e| e.kind == EventKind::Cores && e.message.contains("rightsizing")).count();
    assert!(offs >= 4, "one rightsizing event per core turned off: {offs}");

    let _: JobEntry = c.json(&["job", "register", "load"]);
    let (mut client, job, _) = client_of(&c, "load");
    client.put_buffer(&job, "obj", &bytes(256 << 10, 1), PutOptions::default()).expect("put");
    let before = c.events().last_seq;
    let load = ReadLoad::start(client, job, "obj", 256 << 10);
    let on = wait_for(Duration::from_secs(30), "a core turned on under load", || {
        c.events().events.into_iter().find(|e| {
            e.kind == EventKind::Cores
                && e.seq > before
                && e.message.contains("2 of 2 cores polling")
                && e.message.contains("rightsizing")
        })
    });
    let node = on.node.clone().expect("the node of the core");
    wait_for(Duration::from_secs(10), "the node reporting two polling cores", || {
        (c.pollenctl().polling().get(&node) == Some(&2)).then_some(())
    });
    assert!(load.stop() > 0);

    wait_for(Duration::from_secs(30), "back to one polling core per node", || {
        (c.pollenctl().polling() == minimum).then_some(())
    });
    let ev = c.events();
    assert!(
        ev.events.iter().any(|e| e.kind == EventKind::Cores
            && e.seq > on.seq
            && e.message.contains("1 of 2 cores polling")
            && e.message.contains("rightsizing")),
        "a rightsizing event turned the core off again"
    );
    assert!(!ev.events.iter().any(|e| e.kind == EventKind::NodeDown), "no node died under load");
    c.stop();
}
