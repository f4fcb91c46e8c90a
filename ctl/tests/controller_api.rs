//! The controller's HTTP API, driven by fake heartbeats over real HTTP.

use std::time::{Duration, Instant};

use pollen_ctl::api::{
    CoreReport, CoresResponse, ErrorBody, EventKind, EventsResponse, HeartbeatReply, JobReport, JobsResponse,
    NetBackend, NodeEntry, NodeReport, NodeState, NodesResponse, PollMode, StatusResponse, TierReport,
    TiersResponse,
};
use pollen_ctl::controller::{Controller, ControllerConfig, ControllerHandle};
use pollen_ctl::heartbeat;

/// A controller on an ephemeral port, served by its own runtime; stopped on drop.
struct Running {
    url: String,
    handle: ControllerHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
    served: Option<tokio::task::JoinHandle<Result<(), pollen_ctl::controller::ControllerError>>>,
}

impl Running {
    fn start(heartbeat: Duration) -> Running {
        Self::start_with(ControllerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            heartbeat,
            ..ControllerConfig::default()
        })
    }

    fn start_with(cfg: ControllerConfig) -> Running {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ctl = rt.block_on(Controller::bind(cfg)).unwrap();
        let url = ctl.url();
        let handle = ctl.handle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = rt.spawn(ctl.serve(async {
            let _ = rx.await;
        }));
        Running { url, handle, stop: Some(tx), rt: Some(rt), served: Some(served) }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let mut r = agent().get(format!("{}{path}", self.url)).call().unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.body_mut().read_json().unwrap()
    }

    fn post_report(&self, report: &NodeReport) -> HeartbeatReply {
        let mut r = agent().post(format!("{}/v1/nodes/heartbeat", self.url)).send_json(report).unwrap();
        assert_eq!(r.status(), 200);
        r.body_mut().read_json().unwrap()
    }

    /// Sends a raw request and returns its status and error message.
    fn raw(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        let url = format!("{}{path}", self.url);
        let mut r = match method {
            "GET" => agent().get(&url).call().unwrap(),
            "POST" => agent().post(&url).content_type(content_type).send(body).unwrap(),
            "DELETE" => agent().delete(&url).call().unwrap(),
            _ => unreachable!(),
        };
        let status = r.status().as_u16();
        let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(ct.as_deref(), Some("application/json"), "{method} {path}: errors are JSON");
        let body: ErrorBody = r.body_mut().read_json().unwrap();
        (status, body.error)
    }
}

impl Running {
    /// Writes a raw HTTP request and returns the status and body of the reply.
    fn raw_tcp(&self, request: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the server closes, or until a whole reply is in.
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading the reply: {e}; got {:?}", String::from_utf8_lossy(&reply)),
            }
            let text = String::from_utf8_lossy(&reply);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if len.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&reply).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let (Some(rt), Some(served)) = (self.rt.take(), self.served.take()) {
            let result = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), served).await });
            if !std::thread::panicking() {
                let served = result.expect("controller stops within 5 s").expect("serve task");
                served.expect("controller served without error");
            }
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

fn core(core: usize, busy_ns: u64, total_ns: u64) -> CoreReport {
    CoreReport {
        core,
        cpu: Some(core),
        port: 7401 + core as u16,
        busy_ns,
        total_ns,
        connections: 2,
        requests: 100,
        forwarded: 3,
        bytes_in: 4096,
        bytes_out: 8192,
        parked: false,
        polling: true,
        accepting: true,
    }
}

fn report(node_id: &str, uptime_ms: u64, cores: Vec<CoreReport>) -> NodeReport {
    let tiers = cores
        .iter()
        .map(|c| TierReport {
            tier: "dram".into(),
            core: c.core,
            capacity_bytes: 256 << 20,
            used_bytes: 1 << 20,
            blocks_total: 4096,
            blocks_used: 16,
            huge_pages: false,
            ..TierReport::default()
        })
        .collect();
    NodeReport {
        node_number: 0,
        boot_id: 0,
        role: Default::default(),
        node_id: node_id.into(),
        addr: "127.0.0.1:7400".into(),
        net: NetBackend::Epoll,
        net_fallback_reason: Some("io_uring disabled".into()),
        poll_mode: PollMode::Adaptive,
        block_size: 65536,
        uptime_ms,
        cores,
        tiers,
        jobs: vec![JobReport { name: "j".into(), id: 1, registered: true, objects: 2, bytes: 3 }],
        applied: None,
        frees_done: Vec::new(),
    }
}

#[test]
fn status_reflects_the_latest_heartbeat() {
    let c = Running::start(Duration::from_secs(1));
    let s: StatusResponse = c.get("/v1/status");
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!((s.nodes.len(), s.nodes_up, s.nodes_down, s.jobs), (0, 0, 0, 0));
    assert_eq!(s.heartbeat_ms, 1000);

    let reply = c.post_report(&report("node-0", 10, vec![core(0, 1, 2), core(1, 1, 2)]));
    assert_eq!(
        reply,
        HeartbeatReply {
            node_id: "node-0".into(),
            heartbeat_ms: 1000,
            missed_heartbeats: 3,
            commands: vec![]
        }
    );

    let s: StatusResponse = c.get("/v1/status");
    assert_eq!((s.nodes_up, s.nodes_down, s.jobs), (1, 0, 1));
    let n = &s.nodes[0];
    assert_eq!(n.node_id, "node-0");
    assert_eq!(n.addr, "127.0.0.1:7400");
    assert_eq!(n.state, NodeState::Up);
    assert_eq!(n.cores, 2);
    assert_eq!(n.poll_mode, PollMode::Adaptive);
    assert_eq!(n.net, NetBackend::Epoll);
    assert_eq!(n.net_fallback_reason.as_deref(), Some("io_uring disabled"));
    assert_eq!(n.tiers.len(), 1);
    assert_eq!(n.tiers[0].tier, "dram");
    assert_eq!(n.tiers[0].capacity_bytes, 512 << 20);
    assert_eq!(n.tiers[0].used_bytes, 2 << 20);
    assert_eq!(s.tiers, n.tiers);
    assert!(n.last_heartbeat_ms_ago < 1000);

    // The JSON uses the documented lowercase names.
    let raw: serde_json::Value = c.get("/v1/status");
    assert_eq!(raw["nodes"][0]["poll_mode"], "adaptive");
    assert_eq!(raw["nodes"][0]["net"], "epoll");
    assert_eq!(raw["nodes"][0]["state"], "up");

    let nodes: NodesResponse = c.get("/v1/nodes");
    assert_eq!(nodes.nodes.len(), 1);
    assert_eq!(nodes.nodes[0].heartbeats, 1);
    let one: NodeEntry = c.get("/v1/nodes/node-0");
    assert_eq!(one.report.uptime_ms, 10);

    let tiers: TiersResponse = c.get("/v1/tiers");
    assert_eq!(tiers.tiers.len(), 2);
    assert_eq!((tiers.tiers[1].region.core, tiers.tiers[1].region.blocks_total), (1, 4096));

    let jobs: JobsResponse = c.get("/v1/jobs");
    assert_eq!(jobs.jobs.len(), 1);
    assert_eq!((jobs.jobs[0].name.as_str(), jobs.jobs[0].objects), ("j", 2));
}

#[test]
fn cores_busy_fraction_is_the_delta_of_the_last_two_heartbeats() {
    let c = Running::start(Duration::from_secs(1));
    c.post_report(&report("n", 1_000, vec![core(0, 250_000, 1_000_000), core(1, 0, 1_000_000)]));
    let r: CoresResponse = c.get("/v1/cores");
    assert_eq!(r.cores.iter().map(|c| c.busy).collect::<Vec<_>>(), vec![Some(0.25), Some(0.0)]);

    // Core 0: 750k of the next 1M ns busy; core 1: all of it.
    c.post_report(&report("n", 2_000, vec![core(0, 1_000_000, 2_000_000), core(1, 1_000_000, 2_000_000)]));
    let r: CoresResponse = c.get("/v1/cores");
    assert_eq!(r.cores.len(), 2);
    let c0 = &r.cores[0];
    assert_eq!((c0.node_id.as_str(), c0.core, c0.busy), ("n", 0, Some(0.75)));
    assert_eq!((c0.cpu, c0.port, c0.connections, c0.requests), (Some(0), 7401, 2, 100));
    assert_eq!((c0.bytes_in, c0.bytes_out), (4096, 8192));
    assert_eq!(r.cores[1].busy, Some(1.0));
}

/// Posts `r` and reads the status right after, until the two together took
/// less than `within`: only a read that soon after a heartbeat must show
/// the node up (a stalled test thread may take longer).
fn post_then_status(c: &Running, r: &NodeReport, within: Duration) -> StatusResponse {
    for _ in 0..5 {
        let asked = Instant::now();
        c.post_report(r);
        let s: StatusResponse = c.get("/v1/status");
        if asked.elapsed() < within {
            return s;
        }
    }
    panic!("five heartbeat and status pairs each took {within:?} or more");
}

/// Reads the status until `node` is down, which it must be in any read that
/// starts `limit` after `since`; returns that status.
fn wait_down(c: &Running, node: &str, since: Instant, limit: Duration) -> StatusResponse {
    loop {
        let asked = Instant::now();
        let s: StatusResponse = c.get("/v1/status");
        let n = s.nodes.iter().find(|n| n.node_id == node).expect("the node is listed");
        if n.state == NodeState::Down {
            return s;
        }
        assert!(asked < since + limit, "{node} still up {:?} after {since:?}: {n:?}", asked - since);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn node_is_down_after_three_missed_heartbeats() {
    // 500 ms: down after 1.5 s of silence, and a status read right after a
    // heartbeat has all of that to arrive on a loaded machine.
    let hb = Duration::from_millis(500);
    let down_after = hb * 3;
    let c = Running::start(hb);
    let s = post_then_status(&c, &report("n", 1, vec![core(0, 0, 1)]), down_after);
    assert_eq!(s.nodes[0].state, NodeState::Up);
    let last = Instant::now();

    // Silent: down once 3 intervals passed, and within 5 (a sweep every
    // quarter interval, and slack for a loaded machine).
    let s = wait_down(&c, "n", last, hb * 5);
    assert_eq!((s.nodes_up, s.nodes_down), (0, 1));
    assert!(s.nodes[0].last_heartbeat_ms_ago >= down_after.as_millis() as u64, "{:?}", s.nodes[0]);
    assert!(s.tiers.is_empty(), "a down node's capacity is not counted");
    let r: CoresResponse = c.get("/v1/cores");
    assert_eq!(r.cores[0].node_state, NodeState::Down);

    // One heartbeat brings it back.
    let s = post_then_status(&c, &report("n", 400, vec![core(0, 0, 2)]), down_after);
    assert_eq!((s.nodes_up, s.nodes_down), (1, 0));
}

#[test]
fn a_steady_heartbeat_keeps_a_node_up() {
    // 500 ms: a node is down after 1.5 s of silence, and a heartbeat
    // request may take an interval (its timeout) on a loaded machine.
    let hb = Duration::from_millis(500);
    let down_after = hb * 3;
    let c = Running::start(hb);
    let started = Instant::now();
    let hb_thread = heartbeat::spawn(
        move || report("steady", started.elapsed().as_millis() as u64, vec![core(0, 0, 1)]),
        &c.url,
        hb,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert!(rt.block_on(c.handle.wait_for_node("steady", Duration::from_secs(5))));
    // Four heartbeats span three intervals: a node that sent only the first
    // would be down by the fourth.
    let deadline = Instant::now() + Duration::from_secs(20);
    while hb_thread.stats().sent() < 4 {
        assert!(Instant::now() < deadline, "sent {}", hb_thread.stats().sent());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(started.elapsed() >= down_after, "the heartbeats keep to their interval");
    let s: StatusResponse = c.get("/v1/status");
    assert_eq!(s.nodes[0].state, NodeState::Up);
    let events: EventsResponse = c.get("/v1/events?since=0");
    assert!(!events.events.iter().any(|e| e.kind == EventKind::NodeDown), "never down: {:?}", events.events);
    assert_eq!(hb_thread.stats().failed(), 0);

    let t = Instant::now();
    hb_thread.stop();
    assert!(t.elapsed() < Duration::from_secs(1), "stop is prompt");
    let s = wait_down(&c, "steady", Instant::now(), hb * 5);
    assert_eq!(s.nodes[0].state, NodeState::Down, "a stopped heartbeat lets the node go down");
}

#[test]
fn heartbeat_keeps_trying_without_a_controller() {
    // Held for the whole test, so connections are refused and no other
    // test's server can take the port.
    let (_held, port) = pollen_tests::refusing_port();
    let hb = heartbeat::spawn(
        || report("lonely", 1, vec![core(0, 0, 1)]),
        &format!("http://127.0.0.1:{port}"),
        Duration::from_millis(20),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while hb.stats().failed() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(hb.stats().failed() >= 3, "the thread keeps going after failures");
    assert_eq!(hb.stats().sent(), 0);
    hb.stop();
}

#[test]
fn heartbeat_rejects_bad_arguments() {
    let r = || report("x", 1, vec![]);
    assert!(matches!(
        heartbeat::spawn(r, "127.0.0.1:7070", Duration::from_secs(1)),
        Err(heartbeat::HeartbeatError::BadUrl(_))
    ));
    assert!(matches!(
        heartbeat::spawn(r, "http://127.0.0.1:7070/v1", Duration::from_secs(1)),
        Err(heartbeat::HeartbeatError::BadUrl(_))
    ));
    assert!(matches!(
        heartbeat::spawn(r, "http://127.0.0.1:7070", Duration::ZERO),
        Err(heartbeat::HeartbeatError::ZeroInterval)
    ));
}

#[test]
fn bad_requests_get_json_errors() {
    let c = Running::start_with(ControllerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_body: 64 * 1024,
        ..ControllerConfig::default()
    });
    let json = "application/json";

    let (status, msg) = c.raw("POST", "/v1/nodes/heartbeat", json, b"{not json");
    assert_eq!(status, 400);
    assert!(msg.contains("invalid node report"), "{msg}");

    let (status, _) = c.raw("POST", "/v1/nodes/heartbeat", json, br#"{"node_id": "n"}"#);
    assert_eq!(status, 400, "valid JSON of the wrong shape");

    let mut bad = serde_json::to_value(report("n", 1, vec![core(0, 0, 1)])).unwrap();
    bad["poll_mode"] = "sometimes".into();
    let (status, _) = c.raw("POST", "/v1/nodes/heartbeat", json, bad.to_string().as_bytes());
    assert_eq!(status, 400, "unknown poll mode");

    let bad_id = serde_json::to_vec(&report("has space", 1, vec![])).unwrap();
    let (status, msg) = c.raw("POST", "/v1/nodes/heartbeat", json, &bad_id);
    assert_eq!(status, 400);
    assert!(msg.contains("node_id"), "{msg}");

    let mut bad_addr = report("n", 1, vec![]);
    bad_addr.addr = "nowhere".into();
    let (status, msg) = c.raw("POST", "/v1/nodes/heartbeat", json, &serde_json::to_vec(&bad_addr).unwrap());
    assert_eq!(status, 400);
    assert!(msg.contains("nowhere"), "{msg}");

    let dup = serde_json::to_vec(&report("n", 1, vec![core(0, 0, 1), core(0, 0, 1)])).unwrap();
    assert_eq!(c.raw("POST", "/v1/nodes/heartbeat", json, &dup).0, 400);

    let good = serde_json::to_vec(&report("n", 1, vec![core(0, 0, 1)])).unwrap();
    let (status, _) = c.raw("POST", "/v1/nodes/heartbeat", "text/plain", &good);
    assert_eq!(status, 415);

    // A declared length over the limit is refused before the body is sent.
    let (status, body) = c.raw_tcp(
        "POST /v1/nodes/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100000000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("over the limit"), "{body}");

    let (status, msg) = c.raw("GET", "/v1/nope", json, b"");
    assert_eq!(status, 404);
    assert!(msg.contains("/v1/nope"), "{msg}");
    assert_eq!(c.raw("GET", "/v1/nodes/ghost", json, b"").0, 404);
    assert_eq!(c.raw("GET", "/v1/nodes/heartbeat", json, b"").0, 405);
    assert_eq!(c.raw("DELETE", "/v1/status", json, b"").0, 405);

    // None of the refused reports was stored.
    let s: StatusResponse = c.get("/v1/status");
    assert!(s.nodes.is_empty());
}

#[test]
fn bind_reports_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt
        .block_on(Controller::bind(ControllerConfig {
            listen: taken.local_addr().unwrap(),
            ..ControllerConfig::default()
        }))
        .err()
        .expect("binding a taken port fails");
    assert!(err.to_string().contains("cannot listen on"), "{err}");
}

/// A tier row from a node that predates the flash and disk fields still parses.
#[test]
fn old_tier_reports_parse() {
    let old = r#"{"tier":"dram","core":1,"capacity_bytes":8192,"used_bytes":4096,
        "blocks_total":2,"blocks_used":1,"huge_pages":false}"#;
    let t: TierReport = serde_json::from_str(old).unwrap();
    assert_eq!((t.tier.as_str(), t.core, t.blocks_used), ("dram", 1, 1));
    assert_eq!((t.path, t.mode, t.read_iops, t.write_bytes_per_sec), (None, None, 0, 0));
}

/// A registration whose client goes away while the job's node is being
/// asked (hyper drops the handler's future) still finishes: the planned
/// job is committed or, here, aborted when the node hangs up; it is not
/// left pending (409 on every retry, capacity held).
#[test]
fn a_registration_whose_client_left_is_not_left_pending() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // A "node" that takes connections and hangs up on each after 1 s.
    let node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    node.set_nonblocking(true).unwrap();
    let node_addr = node.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let server = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stopped.load(Ordering::Relaxed) {
            if let Ok((s, _)) = node.accept() {
                held.push((s, Instant::now()));
            }
            held.retain(|(_, at)| at.elapsed() < Duration::from_secs(1));
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    let c = Running::start(Duration::from_secs(10));
    let mut r = report("n", 1000, vec![core(0, 0, 1000)]);
    r.addr = node_addr.to_string();
    r.jobs.clear();
    c.post_report(&r);
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(200)))
        .build()
        .into();
    let url = format!("{}/v1/jobs", c.url);
    let body = serde_json::json!({ "name": "left" });
    assert!(impatient.post(&url).send_json(&body).is_err(), "the client gives up before the node answers");

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = agent().post(&url).send_json(&body).unwrap().status().as_u16();
        if status != 409 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 502, "the job was left pending");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

/// `pollenctl events --since SEQ` lists every event after SEQ however many
/// there are: the controller answers the oldest 1000 with `more`, and
/// pollenctl pages until done (the reply held the newest 1000 and the
/// events between were skipped).
#[test]
fn pollenctl_events_pages_through_every_event() {
    let c = Running::start(Duration::from_secs(60));
    c.post_report(&report("n", 1000, vec![core(0, 0, 1), core(1, 0, 1)]));
    for i in 0..1500 {
        let body = serde_json::json!({ "cores": 1 + i % 2 });
        let r = agent().post(format!("{}/v1/nodes/n/cores", c.url)).send_json(&body).expect("set cores");
        assert_eq!(r.status(), 200);
    }
    let first: EventsResponse = c.get("/v1/events?since=0");
    assert!(first.more, "more than a page");
    assert_eq!(first.events.len(), 1000);
    assert_eq!(first.events[0].seq, 1, "the oldest first");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pollenctl"))
        .args(["--controller", &c.url, "--json", "events", "--since", "5"])
        .env_remove("POLLEN_CONTROLLER")
        .env_remove("POLLEN_ADMIN_TOKEN")
        .output()
        .expect("run pollenctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: EventsResponse = serde_json::from_slice(&out.stdout).expect("events as JSON");
    assert!(all.last_seq > 1500, "{}", all.last_seq);
    assert!(!all.more);
    let seqs: Vec<u64> = all.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (6..=all.last_seq).collect::<Vec<_>>(), "every event after 5, in order");
}
