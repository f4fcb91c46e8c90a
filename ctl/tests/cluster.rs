//! A controller and several `pollen node` processes of role `both` over
//! 127.0.0.1, driven through `pollenctl`: jobs with hints packed onto active
//! nodes first, data on the job's node, deregistration freeing blocks on
//! every node, a killed node declared dead and its weight spread over the
//! live nodes, metrics, a restarted controller or metadata node, and the
//! node roles' refusals. The "done when" checks over a dedicated
//! metadata node and three storage nodes are in `tests/tests/control_plane.rs`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use pollen_ctl::api::{DeregisterResponse, EventKind, JobEntry, JobsResponse, NodesResponse, PutOutput};
use pollen_tests::control::{spawn_controller, wait_for, Cluster, PATIENT, SMALL_POLICY};

const POLLENCTL: &str = env!("CARGO_BIN_EXE_pollenctl");
const MB: u64 = 1_000_000;
const MIB: u64 = 1 << 20;

/// Every node: one core and 16 MiB of DRAM.
const NODE: &[&str] = &["--cores", "1", "--dram-gb", "0.015625"];

/// A controller (100 ms heartbeats, 3 missed = dead, unless `ctl_args`
/// says otherwise) and `n` nodes `n1..=n{n}` of role `both`, without
/// numbers.
fn start(n: usize, ctl_args: &[&str]) -> Cluster {
    let mut c = Cluster::controller(SMALL_POLICY, ctl_args, NODE);
    for i in 1..=n {
        c.start_node(&format!("n{i}"), &[]);
    }
    c.wait_nodes_up(n);
    c
}

/// As `start`, with node `n{i}` numbered `i` and a data directory, so the
/// controller hands out weight maps by node number and node addresses;
/// `ctl_args` are added to the controller's command line.
fn start_numbered(n: usize, ctl_args: &[&str]) -> Cluster {
    let mut c = Cluster::controller(SMALL_POLICY, ctl_args, NODE);
    c.start_numbered(&vec![None; n], |_| Vec::new());
    c
}

fn weight_sum(j: &JobEntry) -> f64 {
    j.weights.values().sum()
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-6, "{what}: {a} != {b}");
}

#[test]
fn jobs_with_hints_get_allocations_weights_and_survive_a_dead_node() {
    // The default 3 missed heartbeats: a killed node's down event says so.
    let mut c = start(3, &[]);

    // No hints at all: the conservative default (4 workers x 10 MB/s, 8 MiB, DRAM).
    let j: JobEntry = c.json(&["job", "register", "plain"]);
    let a = j.allocation.clone().expect("allocation");
    assert_eq!(
        (a.throughput, a.capacity, a.dram, a.flash, a.latency_sensitive),
        (40 * MB, 8 * MIB, 8 * MIB, 0, true)
    );
    assert_close(weight_sum(&j), 1.0, "weights of plain");
    assert_eq!(j.weights.len(), 3, "every live node is in the map");
    let first =
        j.weights.iter().find(|(_, &w)| w == 1.0).map(|(n, _)| n.clone()).expect("one node takes all");

    // Lambdas: 25 x 10 MB/s = 250 MB/s. The active node (60 MB/s spare)
    // fills first, then the others in order: 0.24 + 0.4 + 0.36.
    let j: JobEntry = c.json(&["job", "register", "wide", "--lambdas", "25"]);
    let a = j.allocation.clone().expect("allocation");
    assert_eq!((a.throughput, a.capacity, a.latency_sensitive), (250 * MB, 8 * MIB, false));
    assert_eq!((a.dram, a.flash), (8 * MIB, 0), "no node has flash: DRAM");
    assert_close(weight_sum(&j), 1.0, "weights of wide");
    assert_close(j.weights[&first], 0.24, "the active node takes its spare throughput first");
    assert!(j.weights.values().all(|&w| w > 0.0), "250 MB/s needs all three nodes: {:?}", j.weights);

    // Latency-sensitive with capacity and peak throughput: the hints win.
    let j: JobEntry = c.json(&[
        "job",
        "register",
        "fast",
        "--latency-sensitive",
        "--capacity",
        "2MiB",
        "--peak-throughput",
        "5MB/s",
    ]);
    let a = j.allocation.clone().expect("allocation");
    assert_eq!(
        (a.throughput, a.capacity, a.dram, a.flash, a.latency_sensitive),
        (5 * MB, 2 * MIB, 2 * MIB, 0, true)
    );
    assert_close(weight_sum(&j), 1.0, "weights of fast");
    let w: serde_json::Value = c.json(&["weights", "fast"]);
    assert_eq!(w["weights"].as_object().map(|m| m.len()), Some(3));

    // A second registration of the same name is refused.
    let out = c.ctl(&["job", "register", "plain"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already registered"));

    // Data goes to the job's node; get returns it.
    let plain = c.registered("plain");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(c.path("in.bin"), &data).unwrap();
    let put: PutOutput = c.json(&["put", "plain", "dir/obj", &c.path("in.bin")]);
    assert_eq!(
        (put.bytes, put.node.as_str(), put.registered_job),
        (300_000, plain.node_addr.as_str(), false)
    );
    c.ok(&["get", "plain", "dir/obj", &c.path("out.bin")]);
    assert_eq!(std::fs::read(c.path("out.bin")).unwrap(), data);
    // put registers an unknown job with the default allocation.
    let put: PutOutput = c.json(&["put", "auto", "x", &c.path("in.bin")]);
    assert!(put.registered_job);
    let auto = c.registered("auto");
    assert_eq!(auto.allocation.map(|a| a.capacity), Some(8 * MIB));

    // Deregistering frees the job's blocks on its node.
    let before = wait_for(Duration::from_secs(10), "the put's blocks in a report", || {
        let u = c.used_dram(&plain.node_id);
        (u >= 300_000).then_some(u)
    });
    let d: DeregisterResponse = c.json(&["job", "deregister", "plain"]);
    assert!(d.freed, "{d:?}");
    wait_for(Duration::from_secs(10), "blocks freed after deregistration", || {
        (c.used_dram(&plain.node_id) + 300_000 <= before).then_some(())
    });
    assert!(!c.ctl(&["get", "plain", "dir/obj", &c.path("gone.bin")]).status.success());

    // Kill a node that holds weight of `wide`: it is declared dead within a
    // few heartbeats, its weight drops to 0 and the rest still sums to 1.
    let victim = "n3";
    c.nodes.get_mut(victim).expect("n3").sigkill();
    let down = wait_for(Duration::from_secs(10), "node_down event", || {
        c.events()
            .events
            .into_iter()
            .find(|e| e.kind == EventKind::NodeDown && e.node.as_deref() == Some(victim))
    });
    assert!(down.message.contains("3 missed"), "{}", down.message);
    let wide = c.registered("wide");
    assert_eq!(wide.weights[victim], 0.0);
    assert_close(weight_sum(&wide), 1.0, "wide's weights after the failure");
    let ev = c.events();
    assert!(ev.events.iter().any(|e| e.kind == EventKind::Weights && e.job.as_deref() == Some("wide")));
    for kind in
        [EventKind::NodeJoined, EventKind::JobRegistered, EventKind::Allocation, EventKind::JobDeregistered]
    {
        assert!(ev.events.iter().any(|e| e.kind == kind), "no {kind} event");
    }
    // The table form shows the same log.
    let text = String::from_utf8_lossy(&c.ok(&["events"]).stdout).to_string();
    assert!(text.contains("node_down") && text.contains(victim), "{text}");

    // The same view as Prometheus metrics.
    let mut resp = ureq::get(format!("{}/metrics", c.url)).call().expect("GET /metrics");
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.body_mut().read_to_string().expect("metrics text");
    for line in [
        "pollen_node_up{node=\"n1\"} 1",
        "pollen_node_up{node=\"n3\"} 0",
        "pollen_job_weight{job=\"wide\",node=\"n3\"} 0",
        "pollen_tier_capacity_bytes{node=\"n1\",tier=\"dram\"} 16777216",
    ] {
        assert!(text.lines().any(|l| l.starts_with(line)), "no `{line}` in\n{text}");
    }
    assert!(text.contains("pollen_core_busy_ratio{"), "{text}");

    // New jobs avoid the dead node.
    let j: JobEntry = c.json(&["job", "register", "late", "--lambdas", "1"]);
    assert_eq!(j.weights[victim], 0.0);
    assert_close(weight_sum(&j), 1.0, "weights of late");
    assert_ne!(j.node_id, victim);

    c.stop();
}

/// A job registered with the controller, from `pollenctl jobs --json`.
/// Once the job's metadata node holds its weight map (sent on a heartbeat
/// reply): a client connected there that knows every node's address, the
/// job, and the block size.
fn client_of(c: &Cluster, j: &JobEntry) -> (dataplane::client::Client, dataplane::client::Job, usize) {
    wait_for(Duration::from_secs(10), "the weight map on the job's metadata node", || {
        c.registered(&j.name).weights_applied.then_some(())
    });
    let mut client =
        dataplane::client::Client::connect(j.node_addr.as_str()).expect("connect to the metadata node");
    client.set_node_addrs(j.node_socket_addrs());
    let job = client.job(&j.name).expect("job");
    let bs = client.block_size() as usize;
    (client, job, bs)
}

#[test]
fn bad_registrations_are_refused_with_clear_errors() {
    let c = start(1, &PATIENT);
    let out = c.ctl(&["job", "register", "a b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("400"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.ctl(&["job", "deregister", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job"));
    let out = c.ctl(&["get", "nope", "x", "-"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job"));

    // A reader that went away (`pollenctl nodes | head -0`) ends pollenctl quietly.
    let mut child = Command::new(POLLENCTL)
        .args(["--controller", &c.url, "nodes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pollenctl");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("pollenctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{}: {err}", out.status);
}

/// A controller killed with SIGKILL and started again on the same port
/// rebuilds its view from the nodes' heartbeats: nodes, and jobs with the
/// hints their nodes kept, allocated and packed again.
#[test]
fn a_restarted_controller_adopts_jobs_from_node_reports() {
    // The default 3 missed heartbeats: adoption waits two down-intervals.
    let mut c = start(2, &[]);
    let before: JobEntry = c.json(&["job", "register", "kept", "--lambdas", "3", "--capacity", "1MiB"]);
    c.ctl.sigkill();
    let listen = c.url.trim_start_matches("http://").to_string();
    let (ctl, url) = spawn_controller(c.dir.path(), &listen, &[]);
    assert_eq!(url, c.url);
    c.ctl = ctl;
    c.wait_nodes_up(2);
    let adopted = wait_for(Duration::from_secs(20), "the job adopted", || {
        let r: JobsResponse = c.json(&["jobs"]);
        r.registered.into_iter().find(|j| j.name == "kept")
    });
    assert_eq!(adopted.node_id, before.node_id, "the namespace stays on its node");
    assert_eq!(adopted.hints.lambdas, Some(3));
    let a = adopted.allocation.clone().expect("allocation");
    assert_eq!((a.throughput, a.capacity), (30 * MB, MIB), "the same hints give the same allocation");
    assert_close(weight_sum(&adopted), 1.0, "weights of the adopted job");
    assert!(c
        .events()
        .events
        .iter()
        .any(|e| e.kind == EventKind::JobRegistered && e.message.contains("adopted")));
    // Deregistering it through the new controller frees it on its node, and
    // it is not adopted again.
    let d: DeregisterResponse = c.json(&["job", "deregister", "kept"]);
    assert!(d.freed);
    wait_for(Duration::from_secs(10), "the node no longer reports the job", || {
        let r: JobsResponse = c.json(&["jobs"]);
        (!r.jobs.iter().any(|j| j.name == "kept" && j.registered)).then_some(())
    });
    let r: JobsResponse = c.json(&["jobs"]);
    assert!(r.registered.iter().all(|j| j.name != "kept"), "a deregistered job came back");
}

/// A metadata node killed with SIGKILL and started again before the
/// controller declares it dead holds no weight maps, though the job's map did
/// not change; its first report says so and the controller sends the map
/// again, so puts spread over the job's nodes once more (without the map
/// every block would stay on the metadata node).
#[test]
fn a_restarted_metadata_node_gets_its_weight_maps_again() {
    use dataplane::client::{Client, PutOptions};

    // 50 missed heartbeats (5 s): the restart is quicker, so nothing is declared dead.
    let mut c = start_numbered(3, &["--missed-heartbeats", "50"]);
    let j: JobEntry = c.json(&["job", "register", "heal", "--lambdas", "25", "--capacity", "16MiB"]);
    assert!(j.weights.values().all(|&w| w >= 0.15), "{:?}", j.weights);
    wait_for(Duration::from_secs(10), "the weight map on the job's metadata node", || {
        c.registered("heal").weights_applied.then_some(())
    });
    let home = j.node_id.clone();
    c.nodes.get_mut(&home).expect("home").sigkill();
    c.restart_node(&home);
    wait_for(Duration::from_secs(10), "the controller seeing the restart", || {
        c.events()
            .events
            .into_iter()
            .find(|e| e.kind == EventKind::NodeRestarted && e.node.as_deref() == Some(home.as_str()))
    });
    // The job replayed from the node's log, and the same map sent again.
    let entry = wait_for(Duration::from_secs(10), "the restarted node holding the job's map", || {
        let e = c.registered("heal");
        e.weights_applied.then_some(e)
    });
    assert_eq!(entry.weights, j.weights, "the map did not change");
    assert!(!c.events().events.iter().any(|e| e.kind == EventKind::NodeDown), "nothing was declared dead");

    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job("heal").expect("the job survived the restart");
    let bs = client.block_size() as usize;
    let mut on: BTreeMap<u16, usize> = BTreeMap::new();
    for k in 0..60 {
        let data: Vec<u8> = (0..bs).map(|b| ((b + k) % 251) as u8).collect();
        let name = format!("obj-{k}");
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put");
        for l in client.lookup(&job, &name).expect("lookup").blocks {
            *on.entry(l.node).or_default() += 1;
        }
        assert_eq!(client.get_buffer(&job, &name).expect("get"), data);
    }
    // Every weight is at least 0.15: a node gets none of 60 blocks with
    // probability at most 0.85^60 < 1e-4.
    assert_eq!(on.len(), 3, "the blocks spread over the job's three nodes: {on:?}");

    c.stop();
}

/// Deregistering through the controller frees the job's blocks on every
/// node, not only on its metadata node: a job spread over three `pollen
/// node` processes by its weight map (objects, a PERSIST object, and a
/// block allocated by a put that never finished) is deregistered with
/// `pollenctl`, and each node's DRAM in use (its reports) returns to what it
/// was before, but for the PERSIST object's blocks.
#[test]
fn deregistering_through_the_controller_frees_blocks_on_every_node() {
    use dataplane::client::{Client, PutOptions};

    let c = start_numbered(3, &PATIENT);
    let ids = ["n1", "n2", "n3"];
    let before: Vec<u64> = ids.iter().map(|id| c.used_dram(id)).collect();
    let j: JobEntry = c.json(&["job", "register", "wide", "--lambdas", "25", "--capacity", "16MiB"]);
    assert!(j.weights.values().all(|&w| w >= 0.15), "{:?}", j.weights);
    let (mut client, job, bs) = client_of(&c, &j);
    let mut on: BTreeMap<u16, u64> = BTreeMap::new();
    for k in 0..40 {
        let data: Vec<u8> = (0..2 * bs).map(|b| ((b + k) % 251) as u8).collect();
        let name = format!("obj-{k}");
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put");
        for l in client.lookup(&job, &name).expect("lookup").blocks {
            *on.entry(l.node).or_default() += 1;
        }
    }
    assert_eq!(on.len(), 3, "the blocks spread over the job's three nodes: {on:?}");
    let kept: Vec<u8> = (0..6 * bs).map(|b| (b % 253) as u8).collect();
    let persist = PutOptions { persist: true, ..PutOptions::default() };
    client.put_buffer(&job, "kept", &kept, persist).expect("PERSIST put");
    let mut kept_on: BTreeMap<u16, u64> = BTreeMap::new();
    for l in client.lookup(&job, "kept").expect("lookup").blocks {
        *kept_on.entry(l.node).or_default() += 1;
    }
    // A block of the job that no object names, on a node other than the metadata node.
    let home: u16 = j.node_id.trim_start_matches('n').parse().expect("node number");
    let other = (1..=3u16).find(|&n| n != home).expect("another node");
    client.alloc_block_at(&job, other, 0, dataplane::proto::tier::DRAM).expect("alloc on another node");
    let after_alloc = before[other as usize - 1]
        + (on.get(&other).copied().unwrap_or(0) + kept_on.get(&other).copied().unwrap_or(0) + 1) * bs as u64;
    wait_for(Duration::from_secs(10), "the stray block in the report", || {
        (c.used_dram(ids[other as usize - 1]) == after_alloc).then_some(())
    });
    let d: DeregisterResponse = c.json(&["job", "deregister", "wide"]);
    assert!(d.freed && d.note.is_none(), "{d:?}");
    for (i, id) in ids.iter().enumerate() {
        let n = i as u16 + 1;
        let want = before[i] + kept_on.get(&n).copied().unwrap_or(0) * bs as u64;
        wait_for(Duration::from_secs(10), "the job's blocks freed on every node", || {
            (c.used_dram(id) == want).then_some(())
        });
    }
    // The PERSIST object survives whole once the job registers again.
    let _: JobEntry = c.json(&["job", "register", "wide", "--lambdas", "25", "--capacity", "16MiB"]);
    let entry = c.registered("wide");
    let mut client = Client::connect(entry.node_addr.as_str()).expect("connect");
    client.set_node_addrs(entry.node_socket_addrs());
    let job = client.job("wide").expect("job");
    assert_eq!(client.get_buffer(&job, "kept").expect("the PERSIST object"), kept);

    c.stop();
}

/// One metadata-only node and two storage-only nodes: the job's namespace
/// goes to the metadata node, its blocks only to the storage nodes; a
/// storage node refuses namespace requests and the metadata node refuses
/// `BlockAlloc`, each with the status docs/protocol.md gives and a message
/// that says why.
#[test]
fn metadata_and_storage_roles_split_namespaces_from_blocks() {
    use dataplane::client::{Client, PutOptions};
    use dataplane::proto::{tier, Status};
    use pollen_ctl::api::Role;

    let c = {
        let mut c = Cluster::controller(SMALL_POLICY, &PATIENT, NODE);
        c.start_numbered(&[Some("metadata"), Some("storage"), Some("storage")], |_| Vec::new());
        c
    };
    let r: NodesResponse = c.json(&["nodes"]);
    let roles: BTreeMap<String, Role> =
        r.nodes.iter().map(|n| (n.report.node_id.clone(), n.report.role)).collect();
    let want = [("n1", Role::Metadata), ("n2", Role::Storage), ("n3", Role::Storage)];
    assert_eq!(roles, want.iter().map(|(id, r)| (id.to_string(), *r)).collect(), "roles in the reports");
    let table = String::from_utf8_lossy(&c.ok(&["nodes"]).stdout).to_string();
    let role_of = |id: &str| -> Option<String> {
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(id))?;
        line.split_whitespace().nth(1).map(str::to_string)
    };
    assert_eq!(role_of("n1").as_deref(), Some("metadata"), "{table}");
    assert_eq!(role_of("n2").as_deref(), Some("storage"), "{table}");
    let before: Vec<u64> = ["n1", "n2", "n3"].iter().map(|id| c.used_dram(id)).collect();

    let j: JobEntry = c.json(&["job", "register", "split", "--lambdas", "15", "--capacity", "8MiB"]);
    assert_eq!(j.node_id, "n1", "the only metadata-capable node holds the namespace");
    assert_eq!(j.weights.get("n1").copied().unwrap_or(0.0), 0.0, "{:?}", j.weights);
    assert!(j.weights["n2"] > 0.0 && j.weights["n3"] > 0.0, "{:?}", j.weights);
    assert_close(weight_sum(&j), 1.0, "weights of split");

    let (mut client, job, bs) = client_of(&c, &j);
    let mut on: BTreeMap<u16, u64> = BTreeMap::new();
    let mut objects = Vec::new();
    for k in 0..30 {
        let data: Vec<u8> = (0..2 * bs).map(|b| ((b * 7 + k) % 251) as u8).collect();
        let name = format!("obj-{k}");
        client.put_buffer(&job, &name, &data, PutOptions::default()).expect("put");
        for l in client.lookup(&job, &name).expect("lookup").blocks {
            *on.entry(l.node).or_default() += 1;
        }
        objects.push((name, data));
    }
    assert_eq!(
        on.keys().copied().collect::<Vec<_>>(),
        vec![2, 3],
        "blocks on the storage nodes only: {on:?}"
    );
    for (name, data) in &objects {
        assert_eq!(&client.get_buffer(&job, name).expect("get"), data, "{name}");
    }
    for (i, id) in ["n1", "n2", "n3"].iter().enumerate() {
        let want = before[i] + on.get(&(i as u16 + 1)).copied().unwrap_or(0) * bs as u64;
        wait_for(Duration::from_secs(10), "each node's DRAM holds its blocks", || {
            (c.used_dram(id) == want).then_some(())
        });
    }

    // The metadata-only node holds no blocks for others.
    let e = client.alloc_block_at(&job, 1, 0, tier::DRAM).expect_err("BlockAlloc on the metadata-only node");
    assert_eq!(e.status(), Some(Status::NoCapacity), "{e}");
    assert!(e.to_string().contains("metadata-only"), "{e}");
    let on_storage = client.alloc_block_at(&job, 2, 0, tier::DRAM).expect("a storage node allocates");
    // Other block opcodes behave as on any node: it holds no block, so 1.
    let e = client.read_block(on_storage, 0, 1).expect_err("BlockRead on the metadata-only node");
    assert_eq!(e.status(), Some(Status::NotFound), "{e}");
    let e = client.write_block(on_storage, 0, b"x").expect_err("BlockWrite on the metadata-only node");
    assert_eq!(e.status(), Some(Status::NotFound), "{e}");

    // A storage-only node serves no namespace: each namespace opcode is refused.
    let storage_addr = r.nodes.iter().find(|n| n.report.node_id == "n2").expect("n2").report.addr.clone();
    let mut storage = Client::connect(storage_addr.as_str()).expect("connect to a storage node");
    let refused = |e: dataplane::client::ClientError, what: &str| {
        assert_eq!(e.status(), Some(Status::Malformed), "{what}: {e}");
        assert!(e.to_string().contains("this node is storage-only"), "{what}: {e}");
    };
    refused(storage.job("split").expect_err("JobInfo"), "JobInfo");
    refused(storage.register_job("other", Default::default()).expect_err("RegisterJob"), "RegisterJob");
    refused(storage.lookup(&job, "obj-0").expect_err("Lookup"), "Lookup");
    refused(storage.enumerate(&job, "").expect_err("Enumerate"), "Enumerate");
    refused(storage.create_dir(&job, "d").expect_err("CreateDir"), "CreateDir");
    refused(storage.delete(&job, "obj-0").expect_err("Delete"), "Delete");
    refused(storage.place(&job, 1).expect_err("Place"), "Place");
    refused(storage.deregister_job(&job).expect_err("DeregisterJob"), "DeregisterJob");
    // Nothing was deleted or deregistered by those: the object still reads.
    assert_eq!(client.get_buffer(&job, "obj-0").expect("get"), objects[0].1);

    // Deregistration frees the job's blocks on the storage nodes (FreeOwner
    // there; the metadata-only node has none to free and answers ok).
    let d: DeregisterResponse = c.json(&["job", "deregister", "split"]);
    assert!(d.freed && d.note.is_none(), "{d:?}");
    for (i, id) in ["n1", "n2", "n3"].iter().enumerate() {
        wait_for(Duration::from_secs(10), "the job's blocks freed", || {
            (c.used_dram(id) == before[i]).then_some(())
        });
    }

    c.stop();
}
