//! `pollen-bench`: Pollen's block gets and puts, measured in the same run and
//! with the same load generator as a TCP echo floor and Redis; and random
//! block reads and writes on any tier, side by side with fio on the same file.

mod cli;
mod echo;
mod fio;
mod load;
mod pin;
mod pollen;
mod redis;
mod report;
mod wire;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dataplane::node::NetBackend;
use dataplane::proto::BlockId;

use cli::{Args, NetArg, Peer, Plan, PollenTarget, TierArg};
use load::{LoadResult, LoadSpec};
use report::{BlockSummary, Measured, Report, Round, Target};
use wire::{BlockWire, FrameWire, RespWire, Wire};

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pollen-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A target whose server is running and whose requests are ready.
struct Prepared {
    name: &'static str,
    server: String,
    addrs: Vec<SocketAddr>,
    wire: Arc<dyn Wire>,
    request_bytes: usize,
    response_bytes: usize,
    /// Keeps the server alive; dropping it stops the server (and frees Pollen's blocks).
    guard: Guard,
    /// Merged over rounds; `Err` once a round failed (later rounds are skipped).
    result: Option<anyhow::Result<LoadResult>>,
    rounds: Vec<Round>,
    /// The server's busy and wall-clock nanoseconds, summed over measured rounds.
    server_time: Option<(u64, u64)>,
}

/// What must stay alive while a target is measured. Field order is drop order:
/// Pollen's blocks are freed before its node stops.
enum Guard {
    Pollen { _setup: pollen::SetupGuard, node: Option<Box<pollen::InProcNode>> },
    Echo { server: echo::EchoServer },
    Redis { server: redis::RedisServer },
}

/// Runs every target and prints the report. `Ok(false)` when a target failed
/// or answered with errors.
fn run(args: Args) -> anyhow::Result<bool> {
    let plan = args.plan()?;
    let a = &plan.args;
    let rounds = a.rounds;
    let spec = LoadSpec {
        mode: a.mode,
        depth: a.pipeline,
        rate: a.rate,
        warmup: plan.warmup,
        duration: plan.duration.map(|d| d / rounds),
        requests: plan.requests.map(|n| n.div_ceil(rounds as u64)),
        max_time: a.max_time,
        threads: a.threads,
        client_cpus: a.client_cpu.0.clone(),
        spin: Duration::from_micros(a.client_spin_us()),
    };

    // The flash or disk tier's file: the in-process node's, and fio's.
    let tier_file = tier_file(&plan)?;
    let mut block = a.op.is_block().then(|| BlockSummary {
        file: tier_file.as_ref().map(|f| f.display().to_string()),
        queue_depth: plan.queue_depth,
        ..BlockSummary::default()
    });

    // Start every server first; a target that cannot start is reported, not fatal.
    let mut done: Vec<Target> = Vec::new();
    let mut started: Vec<(&'static str, anyhow::Result<Prepared>)> = Vec::new();
    match &a.pollen {
        PollenTarget::Off => {}
        PollenTarget::InProc => {
            started.push(("pollen", prepare_pollen_inproc(&plan, tier_file.clone(), &mut block)))
        }
        PollenTarget::Remote(addr) => {
            started.push(("pollen", prepare_pollen_remote(&plan, addr, &mut block)))
        }
    }
    let mut fio_job = None;
    for peer in &plan.peers {
        match peer {
            Peer::Echo => started.push(("echo", prepare_echo(&plan))),
            Peer::Redis if !a.op.is_block() => match redis::find(&a.redis_server) {
                Some(bin) => started.push(("redis", prepare_redis(&plan, &bin))),
                None => {
                    done.push(Target::skipped("redis", format!("{} not found", a.redis_server.display())))
                }
            },
            Peer::Redis => done.push(Target::skipped("redis", "redis has no block workload (--op get|put)")),
            Peer::Fio => match fio_plan(&plan, tier_file.as_deref(), block.as_ref()) {
                Ok(job) => fio_job = Some(job),
                Err(why) => done.push(Target::skipped("fio", why)),
            },
        }
    }
    let mut ready: Vec<Prepared> = Vec::new();
    for (name, p) in started {
        match p {
            Ok(p) => ready.push(p),
            Err(e) => done.push(Target::failed(name, None, &e)),
        }
    }

    for round in 0..rounds as usize {
        for i in 0..ready.len() {
            let n = ready.len();
            let t = &mut ready[(i + round) % n];
            if matches!(t.result, Some(Err(_))) {
                continue;
            }
            progress(&plan, t.name, round);
            measure(t, &spec, a.size, a.threads);
        }
    }

    // Report in the order the targets were named, Pollen first.
    let mut targets: Vec<Target> = Vec::new();
    // Finishing stops the in-process node, so fio has the file to itself.
    for t in ready {
        targets.push(finish(t, a.size, a.threads));
    }
    if let Some(job) = fio_job {
        eprintln!("pollen-bench: measuring fio ({:.1} s)", (job.ramp + job.runtime).as_secs_f64());
        let command = job.command_line();
        if let Some(b) = block.as_mut() {
            b.fio_command = Some(command.clone());
        }
        let server = format!(
            "fio {} on CPU {}, io_uring + O_DIRECT on the tier's file after the node stopped",
            fio_version(&job.bin),
            a.server_cpu
        );
        let mut t = match job.run() {
            Ok(m) => Target::measured("fio", server, a.size, a.size, m),
            Err(e) => Target::failed("fio", Some(server), &e),
        };
        t.request_bytes = None;
        t.response_bytes = None;
        t.command = Some(command);
        targets.push(t);
    }
    targets.extend(done);
    let order =
        |n: &str| ["pollen", "echo", "fio", "redis"].iter().position(|x| *x == n).unwrap_or(usize::MAX);
    targets.sort_by_key(|t| order(t.name));

    // The bench's own tier file goes with the run (--tier-file stays).
    if let (Some(f), None) = (&tier_file, &a.tier_file) {
        let _ = std::fs::remove_file(f);
    }

    let report = Report::new(&plan, targets, block);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).context("encoding the JSON report")?);
    } else {
        print!("{}", report.human());
    }
    Ok(report.ok)
}

fn progress(plan: &Plan, what: &str, round: usize) {
    let rounds = plan.args.rounds as f64;
    let how_long = match plan.duration {
        Some(d) => format!("{:.1} s", plan.warmup.as_secs_f64() + d.as_secs_f64() / rounds),
        None => format!("up to {:.1} s", (plan.warmup + plan.args.max_time).as_secs_f64()),
    };
    let of = if plan.args.rounds > 1 {
        format!(", round {}/{}", round + 1, plan.args.rounds)
    } else {
        String::new()
    };
    eprintln!("pollen-bench: measuring {what} ({how_long}{of})");
}

/// One round of load against `t`, merged into its result.
fn measure(t: &mut Prepared, spec: &LoadSpec, size: usize, threads: usize) {
    let before = server_ns(&t.guard);
    let r = load::run(&t.addrs, Arc::clone(&t.wire), spec);
    if let (Some(b), Some(a)) = (before, server_ns(&t.guard)) {
        let acc = t.server_time.get_or_insert((0, 0));
        acc.0 += a.0.saturating_sub(b.0);
        acc.1 += a.1.saturating_sub(b.1);
    }
    match r {
        Ok(r) => {
            let m = Measured::from_load(&r, size, threads, None);
            t.rounds.push(Round {
                requests: m.requests,
                throughput_ops: m.throughput_ops,
                p50_ns: m.latency_ns.p50,
                p99_ns: m.latency_ns.p99,
            });
            t.result = Some(match t.result.take() {
                None => Ok(r),
                Some(Ok(mut acc)) => acc.append(r).map(|()| acc),
                Some(Err(e)) => Err(e),
            });
        }
        Err(e) => t.result = Some(Err(e)),
    }
}

fn finish(t: Prepared, size: usize, threads: usize) -> Target {
    let Prepared { name, server, request_bytes, response_bytes, guard, result, rounds, server_time, .. } = t;
    // Stop the server (and free Pollen's blocks) before reporting.
    drop(guard);
    let busy = server_time.filter(|&(_, total)| total > 0).map(|(b, total)| b as f64 / total as f64);
    match result {
        Some(Ok(r)) => {
            let mut m = Measured::from_load(&r, size, threads, busy);
            if rounds.len() > 1 {
                m.rounds = rounds;
            }
            Target::measured(name, server, request_bytes, response_bytes, m)
        }
        Some(Err(e)) => Target::failed(name, Some(server), &e),
        None => Target::failed(name, Some(server), &anyhow::anyhow!("not measured")),
    }
}

/// The server's cumulative (busy, wall-clock) nanoseconds: a Pollen core's
/// busy passes, the echo server's likewise, Redis's CPU time.
fn server_ns(g: &Guard) -> Option<(u64, u64)> {
    match g {
        Guard::Pollen { node: Some(n), .. } => {
            n.node().report().cores.first().map(|c| (c.busy_ns, c.total_ns))
        }
        Guard::Pollen { node: None, .. } => None,
        Guard::Echo { server } => Some(server.busy()),
        Guard::Redis { server } => server.busy(),
    }
}

/// The flash or disk tier's backing file: `--tier-file`, or a file of the
/// bench's own (created for this run and removed at its end) on a file system
/// that supports O_DIRECT.
fn tier_file(plan: &Plan) -> anyhow::Result<Option<std::path::PathBuf>> {
    let a = &plan.args;
    if a.tier == TierArg::Dram {
        return Ok(None);
    }
    if let Some(f) = &a.tier_file {
        return Ok(Some(f.clone()));
    }
    let near_binary = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("pollen-bench-tier")))
        .filter(|d| std::fs::create_dir_all(d).is_ok() && !is_tmpfs(d));
    let dir = match near_binary {
        Some(d) => d,
        None => {
            let t = std::env::temp_dir();
            if is_tmpfs(&t) {
                std::path::PathBuf::from("/var/tmp")
            } else {
                t
            }
        }
    };
    let file = dir.join(format!("{}-{}.img", a.tier.name(), std::process::id()));
    // A left-over file of an earlier run may hold another layout: start afresh.
    let _ = std::fs::remove_file(&file);
    Ok(Some(file))
}

/// O_DIRECT opens fail on tmpfs.
fn is_tmpfs(dir: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// fio's job for this run, or why fio is skipped. The working set's place in
/// the file is filled in once Pollen's set-up has allocated it.
fn fio_plan(
    plan: &Plan,
    file: Option<&std::path::Path>,
    block: Option<&BlockSummary>,
) -> Result<fio::FioJob, String> {
    let a = &plan.args;
    if !a.op.is_block() {
        return Err("fio runs with the block workloads (--op randread|randwrite|mixed)".into());
    }
    let Some(file) = file else {
        return Err("the DRAM tier has no file for fio (use --tier flash or disk)".into());
    };
    if matches!(a.pollen, PollenTarget::Remote(_)) && a.tier_file.is_none() {
        return Err("a running node's tier file is unknown: give it as --tier-file".into());
    }
    let bin = fio::find(&a.fio).ok_or_else(|| format!("{} not found", a.fio.display()))?;
    // The bytes Pollen's blocks occupy: the last blocks x block size bytes of
    // the tier (the block area ends the region; with one core, the file).
    let (offset, size) = match block {
        Some(b) if b.working_set_bytes > 0 => (b.file_offset.unwrap_or(0), b.working_set_bytes),
        _ => (0, a.tier_size),
    };
    let duration = plan.duration.unwrap_or(a.max_time);
    Ok(fio::FioJob {
        bin,
        file: file.to_path_buf(),
        op: a.op,
        bs: a.size,
        iodepth: plan.queue_depth,
        offset,
        size,
        runtime: duration,
        ramp: plan.warmup,
        cpu: a.server_cpu,
    })
}

fn fio_version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("fio-").to_string())
        .unwrap_or_default()
}

fn prepare_pollen_inproc(
    plan: &Plan,
    file: Option<std::path::PathBuf>,
    block: &mut Option<BlockSummary>,
) -> anyhow::Result<Prepared> {
    let a = &plan.args;
    let net = match a.pollen_net {
        NetArg::Uring => NetBackend::Uring,
        NetArg::Epoll => NetBackend::Epoll,
    };
    let tier = pollen::TierPlan { tier: a.tier, file, tier_size: a.tier_size };
    let node = pollen::InProcNode::start(a.server_cpu, net, a.spin_us, a.size, a.conns, &tier)?;
    let r = node.node().report();
    let mut server = format!(
        "in-process node, 1 core on CPU {}, {} backend, {} poll (spin {} µs)",
        a.server_cpu, r.net, r.poll_mode, a.spin_us
    );
    if let Some(t) = r.tiers.iter().find(|t| t.tier == a.tier.name()) {
        if let Some(mode) = &t.mode {
            server.push_str(&format!(", {} tier in {mode} mode", t.tier));
        }
    }
    if let Some(why) = &r.net_fallback_reason {
        server.push_str(&format!(" [io_uring unavailable: {why}]"));
    }
    // The node pins its cores itself and only logs a failure: check.
    if let Some(w) = pin::check_pinned("the Pollen core", pin::thread_dir("pollen-core-0"), a.server_cpu) {
        server.push_str(&format!(" [{w}]"));
    }
    let main = node.node().addr();
    prepare_pollen(plan, main, server, Some(node), block)
}

fn prepare_pollen_remote(
    plan: &Plan,
    addr: &str,
    block: &mut Option<BlockSummary>,
) -> anyhow::Result<Prepared> {
    let main = pollen::resolve(addr)?;
    prepare_pollen(plan, main, format!("running node at {main}, core 0"), None, block)
}

fn prepare_pollen(
    plan: &Plan,
    main: SocketAddr,
    server: String,
    node: Option<pollen::InProcNode>,
    block: &mut Option<BlockSummary>,
) -> anyhow::Result<Prepared> {
    let a = &plan.args;
    if a.op.is_block() {
        eprintln!("pollen-bench: allocating and writing the working set on the {} tier", a.tier.name());
    }
    let setup = pollen::setup(main, 0, a.op, a.size, a.conns, a.tier, a.tier_size)?;
    let server = format!("{server}; direct path via core port {}", setup.core_addr.port());
    let (wire, request_bytes, response_bytes): (Arc<dyn Wire>, usize, usize) = if a.op.is_block() {
        let ws = setup.blocks.len() as u64 * setup.block_size as u64;
        if let Some(b) = block.as_mut() {
            b.block_size = setup.block_size;
            b.blocks = setup.blocks.len();
            b.working_set_bytes = ws;
            b.file_offset = (a.tier != TierArg::Dram).then(|| a.tier_size.saturating_sub(ws) / 4096 * 4096);
        }
        let w = BlockWire::new(a.op, a.size, setup.block_size, setup.blocks.clone());
        let (req, resp) = (w.request_len(), w.response_len());
        (Arc::new(w), req, resp)
    } else {
        let w = FrameWire::new(a.op, a.size, &setup.blocks);
        let (req, resp) = (w.request_len(), w.response_len());
        (Arc::new(w), req, resp)
    };
    Ok(Prepared {
        name: "pollen",
        server,
        addrs: vec![setup.core_addr; a.conns],
        request_bytes,
        response_bytes,
        wire,
        guard: Guard::Pollen { _setup: pollen::SetupGuard(setup), node: node.map(Box::new) },
        result: None,
        rounds: Vec::new(),
        server_time: None,
    })
}

fn prepare_echo(plan: &Plan) -> anyhow::Result<Prepared> {
    let a = &plan.args;
    // The same frames Pollen gets: a 40-byte BlockRead answered with the value,
    // or a BlockWrite carrying the value answered with a 4-byte length.
    let blocks: Vec<BlockId> = (0..a.conns as u64).map(BlockId).collect();
    // For the block workloads, the frames of a read (randread, mixed) or of
    // a write (randwrite): the floor answers every request alike.
    let wire = FrameWire::new(a.op, a.size, &blocks);
    let response_body = if a.op.read_pct() > 0 { a.size } else { 4 };
    let spin = Duration::from_micros(a.spin_us);
    let echo = echo::EchoServer::start(Some(a.server_cpu), response_body, a.size.max(4096), spin)?;
    Ok(Prepared {
        name: "echo",
        server: format!(
            "echo server on CPU {} (epoll via mio, spin {} µs then block)",
            a.server_cpu, a.spin_us
        ),
        addrs: vec![echo.addr(); a.conns],
        request_bytes: wire.request_len(),
        response_bytes: wire.response_len(),
        wire: Arc::new(wire),
        guard: Guard::Echo { server: echo },
        result: None,
        rounds: Vec::new(),
        server_time: None,
    })
}

fn prepare_redis(plan: &Plan, bin: &std::path::Path) -> anyhow::Result<Prepared> {
    let a = &plan.args;
    let redis = redis::RedisServer::start(bin, Some(a.server_cpu))?;
    let mut server = format!("redis-server {} on CPU {} (no persistence)", redis.version, a.server_cpu);
    if let Some(w) = pin::check_pinned("redis-server", Some(redis.proc_dir()), a.server_cpu) {
        server.push_str(&format!(" [{w}]"));
    }
    if a.op.read_pct() > 0 {
        redis.preload(a.conns, &wire::fill(a.size))?;
    }
    let wire = RespWire::new(a.op, a.size, a.conns);
    let mut req = Vec::new();
    wire.encode(0, 0, &mut req);
    let response_bytes =
        if a.op.read_pct() > 0 { format!("${}\r\n", a.size).len() + a.size + 2 } else { "+OK\r\n".len() };
    Ok(Prepared {
        name: "redis",
        server,
        addrs: vec![redis.addr(); a.conns],
        request_bytes: req.len(),
        response_bytes,
        wire: Arc::new(wire),
        guard: Guard::Redis { server: redis },
        result: None,
        rounds: Vec::new(),
        server_time: None,
    })
}
