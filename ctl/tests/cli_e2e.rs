//! End to end through the binaries: `pollen up` in a temporary directory,
//! then `pollenctl` status / put / get / ls / rm against it, then SIGTERM.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pollen_ctl::api::{
    CoresResponse, EventKind, LsOutput, NodeState, PollMode, PutOutput, StatusResponse, TiersResponse,
};
use pollen_ctl::local::{LocalCluster, CONTROLLER_ENV, DEFAULT_DATA_DIR};

use pollen_tests::control::{wait_for, Reaper, Up, HEARTBEAT_MS, PATIENT};

const POLLEN: &str = env!("CARGO_BIN_EXE_pollen");
const POLLENCTL: &str = env!("CARGO_BIN_EXE_pollenctl");

/// A running `pollen up` in its own directory; stopped on drop if the test
/// did not stop it. Its `pollenctl` calls find the controller through
/// `pollen-data/pollen.json`, as an operator's would.
struct PollenUp(Up);

impl std::ops::Deref for PollenUp {
    type Target = Up;
    fn deref(&self) -> &Up {
        &self.0
    }
}

impl std::ops::DerefMut for PollenUp {
    fn deref_mut(&mut self) -> &mut Up {
        &mut self.0
    }
}

impl PollenUp {
    /// Starts `pollen up` with one core on free ports, in a fresh directory
    /// whose `pollen-data/pollen.json` lets `pollenctl` find it.
    fn start() -> (PollenUp, LocalCluster) {
        PollenUp::start_with(&["--cores", "1", "--port", "0", "--ctl-port", "0", "--dram-gb", "0.0625"], None)
    }

    /// Starts `pollen up ARGS` in a fresh directory, with `config` (if any)
    /// written to `pollen.toml` there first; 200 ms heartbeats, and 10 of
    /// them missed before the node is down ([`PATIENT`]: none of these
    /// tests is about failure detection).
    fn start_with(args: &[&str], config: Option<&str>) -> (PollenUp, LocalCluster) {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(text) = config {
            std::fs::write(dir.path().join("pollen.toml"), text).expect("write pollen.toml");
        }
        let mut all = args.to_vec();
        all.extend(["--heartbeat-ms", "200"]);
        all.extend(PATIENT);
        let (up, lc) = Up::spawn(dir, &all);
        (PollenUp(up), lc)
    }

    /// Runs pollenctl in the cluster's directory.
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(POLLENCTL)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove(CONTROLLER_ENV)
            .output()
            .expect("run pollenctl")
    }

    /// Runs pollenctl and requires success.
    fn ctl_ok(&self, args: &[&str]) -> Output {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "pollenctl {args:?} failed with {}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    fn ctl_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let out = self.ctl_ok(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("pollenctl {args:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pollen_up_serves_pollenctl_end_to_end() {
    let (mut up, lc) = PollenUp::start();
    assert_eq!(lc.pid, up.proc.0.as_ref().expect("running").id());
    assert!(lc.controller.starts_with("http://127.0.0.1:"), "{}", lc.controller);
    assert!(lc.node.starts_with("127.0.0.1:"), "{}", lc.node);
    let stdout = std::fs::read_to_string(up.path("up.out")).unwrap();
    assert!(stdout.contains(&lc.controller), "pollen up prints where it listens:\n{stdout}");
    assert!(stdout.contains("pollenctl status") && stdout.contains("pollenctl put"), "{stdout}");

    // status --json, with the controller found through ./pollen-data/pollen.json.
    // A core publishes its tier capacity just after it reports ready, so the
    // first heartbeat can carry capacity 0: wait (a few heartbeats at most)
    // for a report that has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s: StatusResponse = up.ctl_json(&["status", "--json"]);
        let has_capacity = s.tiers.iter().any(|t| t.capacity_bytes > 0);
        if has_capacity || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s.nodes.len(), 1, "{s:?}");
    let n = &s.nodes[0];
    assert_eq!((n.node_id.as_str(), n.addr.as_str(), n.state), ("node-0", lc.node.as_str(), NodeState::Up));
    assert_eq!(n.cores, 1);
    assert_eq!(n.poll_mode, PollMode::Adaptive);
    assert_eq!(n.block_size, 65536);
    let dram = n.tiers.iter().find(|t| t.tier == "dram").expect("a dram tier");
    assert_eq!(dram.capacity_bytes, 64 << 20);
    let raw: serde_json::Value = up.ctl_json(&["status", "--json"]);
    let net = raw["nodes"][0]["net"].as_str().expect("net backend present");
    assert!(net == "uring" || net == "epoll", "{net}");

    // --controller explicitly, on another command.
    let cores: CoresResponse = up.ctl_json(&["--controller", &lc.controller, "cores", "--json"]);
    assert_eq!(cores.cores.len(), 1);
    assert_eq!(cores.cores[0].node_id, "node-0");
    assert_eq!(cores.cores[0].net.to_string(), net, "cores reports the network backend");
    assert_eq!(cores.cores[0].poll_mode, PollMode::Adaptive);
    let table = String::from_utf8_lossy(&up.ctl_ok(&["cores"]).stdout).into_owned();
    assert!(table.contains("NET") && table.contains(net), "{table}");

    // put / get of a 5 MiB random file, byte for byte.
    let data = random_bytes(5 << 20, 0x5eed_cafe_f00d_0001);
    std::fs::write(up.path("input.bin"), &data).unwrap();
    let put: PutOutput = up.ctl_json(&["put", "e2e", "data/input.bin", "input.bin", "--json"]);
    assert_eq!((put.bytes, put.registered_job, put.node.as_str()), (5 << 20, true, lc.node.as_str()));
    up.ctl_ok(&["get", "e2e", "data/input.bin", "output.bin"]);
    let back = std::fs::read(up.path("output.bin")).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the object read back differs from the one written");

    // A second put of the same name is refused: objects are immutable.
    let again = up.ctl(&["put", "e2e", "data/input.bin", "input.bin"]);
    assert!(!again.status.success());
    assert!(stderr_of(&again).contains("already exists"), "{}", stderr_of(&again));

    // ls lists it (and its directory at the root).
    let ls: LsOutput = up.ctl_json(&["ls", "e2e", "data", "--json"]);
    assert_eq!(ls.entries.len(), 1, "{ls:?}");
    let e = &ls.entries[0];
    assert_eq!((e.name.as_str(), e.is_dir, e.size), ("input.bin", false, 5 << 20));
    let root: LsOutput = up.ctl_json(&["ls", "e2e", "--json"]);
    assert!(root.entries.iter().any(|e| e.name == "data" && e.is_dir), "{root:?}");
    let human = up.ctl_ok(&["ls", "e2e", "data"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("input.bin"));

    // rm, after which it is gone.
    up.ctl_ok(&["rm", "e2e", "data/input.bin"]);
    let ls: LsOutput = up.ctl_json(&["ls", "e2e", "data", "--json"]);
    assert!(ls.entries.is_empty(), "{ls:?}");
    let gone = up.ctl(&["get", "e2e", "data/input.bin", "gone.bin"]);
    assert!(!gone.status.success());
    assert!(stderr_of(&gone).contains("not found"), "{}", stderr_of(&gone));
    assert!(!up.path("gone.bin").exists(), "a failed get leaves no file");
    let no_job = up.ctl(&["ls", "nosuchjob"]);
    assert!(!no_job.status.success());
    assert!(stderr_of(&no_job).contains("no job `nosuchjob`"), "{}", stderr_of(&no_job));

    // SIGTERM: a clean stop, exit 0, and the discovery file is removed.
    let status = up.proc.terminate();
    assert!(status.success(), "pollen up exited with {status}\n{}", up.logs());
    assert!(!up.path(DEFAULT_DATA_DIR).join("pollen.json").exists(), "pollen.json removed on stop");
}

fn run(bin: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(bin).args(args).current_dir(cwd).env_remove(CONTROLLER_ENV).output().expect("run")
}

#[test]
fn pollenctl_explains_a_missing_controller() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on, held for the whole test so that no other
    // test's server takes it.
    let (_held, port) = pollen_tests::refusing_port();
    let url = format!("http://127.0.0.1:{port}");
    std::fs::write(dir.path().join("small.txt"), b"hello").unwrap();
    for args in [vec!["status"], vec!["put", "j", "n", "small.txt"], vec!["ls", "j", "--json"]] {
        let mut all = vec!["--controller", url.as_str()];
        all.extend(&args);
        let out = run(POLLENCTL, &all, dir.path());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr_of(&out);
        assert!(err.contains(&format!("no controller at {url}")), "{args:?}: {err}");
        assert!(err.contains("is `pollen up` running?"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_command_lines_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], &str)] = &[
        (POLLENCTL, &["put", "onlyjob"], "required"),
        (POLLENCTL, &["frobnicate"], "unrecognized subcommand"),
        (POLLEN, &["up", "--block-size", "lots"], "expected a whole number"),
        (POLLEN, &["up", "--poll", "sometimes"], "invalid value"),
        (POLLEN, &["up", "--heartbeat-ms", "0"], "invalid value"),
        (POLLEN, &["up", "--missed-heartbeats", "0"], "invalid value"),
        (POLLEN, &["up", "--dram-gb", "0"], "greater than 0"),
        (POLLEN, &["up", "--dram-gb", "64MiB"], "not a number of GiB"),
        (POLLEN, &["up", "--dram-mb", "64"], "unexpected argument"),
    ];
    for (bin, args, expect) in cases {
        let out = run(bin, args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: usage errors exit 2");
        assert!(stderr_of(&out).contains(expect), "{args:?}: {}", stderr_of(&out));
    }
    // Valid syntax, invalid values: refused before anything starts.
    let out = run(POLLEN, &["up", "--block-size", "3MiB", "--port", "0", "--ctl-port", "0"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("power of two"), "{}", stderr_of(&out));
    let out = run(POLLEN, &["up", "--cores", "0", "--port", "0", "--ctl-port", "0"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("cores"), "{}", stderr_of(&out));
    // A down interval that would overflow the controller's timers.
    let absurd = ["--heartbeat-ms", "1000000000000", "--missed-heartbeats", "4000000000"];
    let up: &[&str] = &["up", "--port", "0", "--ctl-port", "0"];
    let controller: &[&str] = &["controller", "--listen", "127.0.0.1:0"];
    for cmd in [up, controller] {
        let out = run(POLLEN, &[cmd, &absurd].concat(), dir.path());
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {}", stderr_of(&out));
        let err = stderr_of(&out);
        assert!(err.contains("declared down after") && !err.contains("panicked"), "{cmd:?}: {err}");
    }

    // Config files: a missing one, an unknown key, a bad value; each names
    // the file (and the line), and nothing starts.
    let out = run(POLLEN, &["up", "--config", "nope.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("reading the config file nope.toml"), "{}", stderr_of(&out));
    std::fs::write(dir.path().join("bad-key.toml"), "port = 0\ndram_mb = 64\n").unwrap();
    let out = run(POLLEN, &["up", "--config", "bad-key.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("bad-key.toml, line 2") && err.contains("unknown field `dram_mb`"), "{err}");
    std::fs::write(dir.path().join("bad-value.toml"), "dram_gb = -1\n").unwrap();
    let out = run(POLLEN, &["node", "--config", "bad-value.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("bad-value.toml, line 1") && err.contains("greater than 0"), "{err}");

    // A put of a missing file names the file, before touching any cluster.
    let out =
        run(POLLENCTL, &["--controller", "http://127.0.0.1:1", "put", "j", "n", "missing.bin"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("missing.bin"), "{}", stderr_of(&out));

    let help = run(POLLENCTL, &["--help"], dir.path());
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("POLLEN_CONTROLLER"));
    // `pollen up --help` documents the config file.
    let help = run(POLLEN, &["up", "--help"], dir.path());
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--config <FILE>") && text.contains("dram_gb = 0.25"), "{text}");
    assert!(text.contains("--dram-gb <GiB>") && !text.contains("dram-mb"), "{text}");
}

/// `pollen up --config FILE`: the file's DRAM size and block size reach the
/// node, and a flag given on the command line beats the file.
#[test]
fn pollen_up_reads_a_config_file() {
    let config = "\
        # 64 MiB of DRAM per core in 16 KiB blocks\n\
        cores = 1\n\
        port = 0\n\
        ctl_port = 0\n\
        dram_gb = 0.0625\n\
        block_size = \"16KiB\"\n\
        node_id = \"from-file\"\n\
        heartbeat_ms = 5000\n";
    // start_with adds --heartbeat-ms 200, which must win over the file's 5000.
    let (mut up, lc) = PollenUp::start_with(&["--config", "pollen.toml"], Some(config));
    assert_eq!(lc.node_id, "from-file");

    let deadline = Instant::now() + Duration::from_secs(5);
    let tiers = loop {
        let t: TiersResponse = up.ctl_json(&["tiers", "--json"]);
        if t.tiers.iter().any(|r| r.region.capacity_bytes > 0) || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dram: Vec<_> = tiers.tiers.iter().filter(|r| r.region.tier == "dram").collect();
    assert_eq!(dram.len(), 1, "one core, one DRAM region: {tiers:?}");
    let (capacity, blocks) = (64u64 << 20, (64u64 << 20) / (16 << 10));
    assert_eq!(
        (dram[0].node_id.as_str(), dram[0].region.capacity_bytes),
        ("from-file", capacity),
        "{tiers:?}"
    );
    assert_eq!(dram[0].region.blocks_total, blocks, "{tiers:?}");

    let s: StatusResponse = up.ctl_json(&["status", "--json"]);
    assert_eq!(s.nodes[0].block_size, 16 << 10);
    assert_eq!(s.heartbeat_ms, 200, "the --heartbeat-ms flag beats the file");

    let status = up.proc.terminate();
    assert!(status.success(), "pollen up exited with {status}\n{}", up.logs());
}

/// `pollen up --missed-heartbeats N` reaches the controller inside it:
/// `status` shows N, and a node process that stops answering (SIGSTOP) is
/// declared down after N silent intervals, by a `node_down` event that says
/// so; resumed (SIGCONT), it is up again.
#[test]
fn pollen_up_missed_heartbeats_reaches_its_controller() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    /// Resumes the stopped node even when an assertion fails, so `pollen
    /// up` can stop it on drop.
    struct Resume(Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }

    const MISSED: u32 = 5;
    let mut up = Up::start(
        "[scaling]\nenabled = false\n",
        &["--nodes", "1", "--cores", "1", "--missed-heartbeats", &MISSED.to_string()],
    );
    up.wait_open_nodes(1, "one node up");
    let s: StatusResponse = up.ctl.json(&["status"]);
    assert_eq!((s.heartbeat_ms, s.missed_heartbeats), (HEARTBEAT_MS, MISSED));

    let pid = Pid::from_raw(up.provisioned()[0].pid.expect("the node's pid") as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let resume = Resume(pid);
    let down = wait_for(Duration::from_secs(10), "node-0 declared down", || {
        up.events()
            .events
            .into_iter()
            .find(|e| e.kind == EventKind::NodeDown && e.node.as_deref() == Some("node-0"))
    });
    drop(resume);
    assert!(down.message.contains(&format!("({MISSED} missed)")), "{}", down.message);
    let silent_ms: u64 = down
        .message
        .split("no heartbeat for ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no silence in {:?}", down.message));
    assert!(
        silent_ms >= u64::from(MISSED) * HEARTBEAT_MS,
        "declared down after {silent_ms} ms: {}",
        down.message
    );

    up.wait_open_nodes(1, "node-0 up again once resumed");
    let status = up.proc.terminate();
    assert!(status.success(), "pollen up exited with {status}\n{}", up.logs());
}

#[test]
fn separate_controller_and_node_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ctl, url) = pollen_tests::control::spawn_controller(dir.path(), "127.0.0.1:0", &[]);

    let mut node = Reaper(Some(
        Command::new(POLLEN)
            .args(["node", "--port", "0", "--cores", "1", "--dram-gb", "0.015625", "--block-size", "16KiB"])
            .args(["--node-id", "solo", "--heartbeat-ms", "100", "--controller", &url])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pollen node"),
    ));
    let status = |want: NodeState| -> StatusResponse {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run(POLLENCTL, &["--controller", &url, "status", "--json"], dir.path());
            if out.status.success() {
                let s: StatusResponse = serde_json::from_slice(&out.stdout).expect("status JSON");
                // As in the test above: wait for a report with the tier capacity published.
                let published =
                    |n: &pollen_ctl::api::NodeSummary| n.tiers.iter().any(|t| t.capacity_bytes > 0);
                if s.nodes.first().is_some_and(|n| n.state == want && published(n)) {
                    return s;
                }
            }
            assert!(Instant::now() < deadline, "node never became {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let s = status(NodeState::Up);
    assert_eq!(s.heartbeat_ms, 100);
    let n = &s.nodes[0];
    assert_eq!((n.node_id.as_str(), n.cores, n.block_size), ("solo", 1, 16 << 10));
    assert_eq!(n.tiers[0].capacity_bytes, 16 << 20);

    // Stopping the node: exit 0, then the controller declares it down.
    let exit = node.terminate();
    assert!(exit.success(), "pollen node exited with {exit}");
    let s = status(NodeState::Down);
    assert_eq!((s.nodes_up, s.nodes_down), (0, 1));

    let exit = ctl.terminate();
    assert!(exit.success(), "pollen controller exited with {exit}");
}

/// `pollen up --flash PATH:SIZE`: the flash tier's region shows in
/// `pollenctl tiers`, with its path and mode.
#[test]
fn pollen_up_with_a_flash_tier() {
    // Under target/ rather than /tmp: O_DIRECT does not work on tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let flash = dir.path().join("pollen.flash");
    let spec = format!("{}:8MiB", flash.display());
    let (mut up, _lc) = PollenUp::start_with(
        &["--cores", "1", "--port", "0", "--ctl-port", "0", "--dram-gb", "0.0625", "--flash", &spec],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let tiers = loop {
        let t: TiersResponse = up.ctl_json(&["tiers", "--json"]);
        if t.tiers.iter().any(|r| r.region.tier == "flash") || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let rows: Vec<_> = tiers.tiers.iter().filter(|r| r.region.tier == "flash").collect();
    assert_eq!(rows.len(), 1, "one core, one flash region: {tiers:?}");
    let f = rows[0];
    assert_eq!(f.region.path.as_deref(), Some(flash.to_str().unwrap()), "{tiers:?}");
    assert!(
        matches!(
            f.region.mode.as_deref(),
            Some("interrupt" | "interrupt, shared ring" | "sqpoll" | "iopoll" | "sqpoll+iopoll")
        ),
        "{tiers:?}"
    );
    assert!(f.region.capacity_bytes > 0 && f.region.capacity_bytes <= 8 << 20, "{tiers:?}");
    assert_eq!(f.region.blocks_used, 0);
    assert_eq!(std::fs::metadata(&flash).unwrap().len(), 8 << 20, "the file is created at its size");
    let table = String::from_utf8(up.ctl_ok(&["tiers"]).stdout).unwrap();
    assert!(table.contains("flash") && table.contains("pollen.flash"), "{table}");

    // An object put on the flash tier comes back byte for byte and uses flash blocks.
    let data = random_bytes(300 << 10, 11);
    std::fs::write(up.path("in.bin"), &data).unwrap();
    up.ctl_ok(&["put", "fj", "obj", "in.bin", "--tier", "flash"]);
    up.ctl_ok(&["get", "fj", "obj", "out.bin"]);
    assert!(std::fs::read(up.path("out.bin")).unwrap() == data, "flash object round-trips");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t: TiersResponse = up.ctl_json(&["tiers", "--json"]);
        let used: u64 =
            t.tiers.iter().filter(|r| r.region.tier == "flash").map(|r| r.region.used_bytes).sum();
        if used >= 300 << 10 {
            break;
        }
        assert!(Instant::now() < deadline, "flash use never showed: {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let no_disk = up.ctl(&["put", "fj", "obj2", "in.bin", "--tier", "disk"]);
    assert!(!no_disk.status.success());
    assert!(stderr_of(&no_disk).contains("no disk tier"), "{}", stderr_of(&no_disk));

    let status = up.proc.terminate();
    assert!(status.success(), "pollen up exited with {status}\n{}", up.logs());
}

/// What a load client did: operations and bytes, counted as they are answered.
#[derive(Default)]
struct LoadCount {
    reads: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

/// `pollenctl tiers` under load: a client writes and reads a flash block
/// (whole sectors, so one device operation per request) for four seconds;
/// the flash row's IOPS and bandwidth are per-second rates close to what
/// the client did (its count divided by its running time),
/// the table shows the I/O error count, and the rates fall to zero once
/// the load stops.
#[test]
fn pollenctl_tiers_rates_follow_the_load() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let flash = dir.path().join("rates.flash");
    let spec = format!("{}:8MiB", flash.display());
    let (mut up, lc) = PollenUp::start_with(
        &[
            "--cores",
            "1",
            "--port",
            "0",
            "--ctl-port",
            "0",
            "--dram-gb",
            "0.0625",
            "--block-size",
            "16KiB",
            "--flash",
            &spec,
        ],
        None,
    );
    let flash_rows = |t: &TiersResponse| -> Vec<dataplane::report::TierReport> {
        t.tiers.iter().filter(|r| r.region.tier == "flash").map(|r| r.region.clone()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while flash_rows(&up.ctl_json(&["tiers", "--json"])).is_empty() {
        assert!(Instant::now() < deadline, "the flash tier never showed\n{}", up.logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    const LEN: usize = 16 << 10;
    const RUN: Duration = Duration::from_secs(4);
    // The node's window: the second before its report (rounded out to
    // 100 ms ticks, 1.1 s at most).
    const WINDOW: Duration = Duration::from_millis(1200);
    // What the controller holds was reported up to a heartbeat ago
    // (PollenUp's --heartbeat-ms).
    const REPORTED: Duration = Duration::from_millis(200);
    let count = Arc::new(LoadCount::default());
    let (began_tx, began) = std::sync::mpsc::channel::<Instant>();
    let load = {
        let (count, addr) = (count.clone(), lc.node.clone());
        std::thread::spawn(move || {
            let mut c = dataplane::client::Client::connect(addr.as_str()).expect("connect");
            let job = c.register_job("rates", dataplane::proto::JobHints::default()).expect("register");
            let b = c.alloc_block_on(&job, 0, dataplane::proto::tier::FLASH).expect("alloc");
            let data = random_bytes(LEN, 5);
            let t0 = Instant::now();
            began_tx.send(t0).expect("the test waits for the load");
            while t0.elapsed() < RUN {
                c.write_block(b, 0, &data).expect("write");
                count.writes.fetch_add(1, Ordering::Relaxed);
                assert_eq!(c.read_block(b, 0, LEN as u32).expect("read"), data);
                count.reads.fetch_add(1, Ordering::Relaxed);
                count.bytes.fetch_add(2 * LEN as u64, Ordering::Relaxed);
            }
            t0.elapsed()
        })
    };
    // A sample once the window of the report lies inside the load (timed
    // from when the load began, not from when its thread started: connect,
    // register and alloc take a while on a loaded machine), before it ends.
    let t0 = began
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the load never began ({e})\n{}", up.logs()));
    let sample_from = t0 + WINDOW + REPORTED;
    let now = Instant::now();
    if sample_from > now {
        std::thread::sleep(sample_from - now);
    }
    let mut sample = None;
    while t0.elapsed() < RUN && !load.is_finished() {
        let rows = flash_rows(&up.ctl_json(&["tiers", "--json"]));
        if rows.iter().all(|r| r.read_iops > 0 && r.write_iops > 0) {
            sample = Some(rows[0].clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let table = String::from_utf8(up.ctl_ok(&["tiers"]).stdout).unwrap();
    let ran = load.join().expect("load client");
    let sample = sample.unwrap_or_else(|| panic!("no non-zero flash rates during the load\n{}", up.logs()));
    let secs = ran.as_secs_f64();
    let (reads, writes) = (count.reads.load(Ordering::Relaxed), count.writes.load(Ordering::Relaxed));
    let bytes = count.bytes.load(Ordering::Relaxed);
    assert!(reads > 0 && ran >= RUN, "{reads} reads in {secs} s");
    eprintln!("client: {reads} reads, {writes} writes, {bytes} bytes in {secs:.2} s; node: {sample:?}");
    // The client's own rates; the node's, over a second of the same steady
    // load, are within a generous factor of them (the machine is shared).
    let near = |got: u64, want: f64, what: &str| {
        assert!(
            (want / 4.0..=want * 4.0).contains(&(got as f64)),
            "{what}: the report says {got}/s, the client did {want:.0}/s: {sample:?}"
        );
    };
    near(sample.read_iops, reads as f64 / secs, "read IOPS");
    near(sample.write_iops, writes as f64 / secs, "write IOPS");
    near(sample.read_bytes_per_sec + sample.write_bytes_per_sec, bytes as f64 / secs, "bandwidth");
    // Bytes per read: the request's length (each rate rounded on its own).
    let per_read = sample.read_bytes_per_sec as f64 / sample.read_iops as f64;
    assert!((per_read - LEN as f64).abs() < LEN as f64 / 100.0, "{per_read}: {sample:?}");
    assert_eq!(sample.io_errors, 0, "{sample:?}");
    // The table has the error count, just before the path.
    assert!(table.lines().next().is_some_and(|h| h.contains("IO ERRORS")), "{table}");
    let row = table.lines().find(|l| l.contains("rates.flash")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().rev().nth(1), Some("0"), "{table}");

    // Once the load stops, the window empties.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = flash_rows(&up.ctl_json(&["tiers", "--json"]));
        if rows
            .iter()
            .all(|r| (r.read_iops, r.write_iops, r.read_bytes_per_sec, r.write_bytes_per_sec) == (0, 0, 0, 0))
        {
            break;
        }
        assert!(Instant::now() < deadline, "rates stay up after the load: {rows:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = up.proc.terminate();
    assert!(status.success(), "pollen up exited with {status}\n{}", up.logs());
}
