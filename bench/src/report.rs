//! Results: one JSON document, or a side-by-side table with Pollen's ratios to each peer.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::{Mode, Op, Plan, TierArg};
use crate::load::LoadResult;

#[derive(Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub version: &'static str,
    pub machine: Machine,
    pub config: Config,
    pub targets: Vec<Target>,
    /// Pollen's numbers divided by each peer's, keyed by peer name.
    pub ratios: Vec<Ratios>,
    /// The block workloads: working set, fio's command, and the issue's two targets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockSummary>,
    /// Every requested target that could run finished without errors.
    pub ok: bool,
}

#[derive(Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

#[derive(Serialize)]
pub struct Config {
    pub op: Op,
    pub size: usize,
    pub tier: TierArg,
    pub mode: Mode,
    pub conns: usize,
    pub pipeline: usize,
    /// conns x pipeline: requests in flight (fio's --iodepth).
    pub queue_depth: usize,
    pub rate: Option<u64>,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub warmup_s: f64,
    pub threads: usize,
    pub rounds: u32,
    pub server_cpu: usize,
    pub client_cpus: Vec<usize>,
    /// Idle spin of the servers (Pollen's core, the echo server).
    pub spin_us: u64,
    /// Idle spin of the load generator's threads.
    pub client_spin_us: u64,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Measured, no errors.
    Ok,
    /// Measured, but some responses were errors (see `first_error`).
    Errors,
    /// Could not be measured (see `reason`).
    Failed,
    /// Not run, by choice or because it is not installed (see `reason`).
    Skipped,
}

#[derive(Serialize)]
pub struct Target {
    pub name: &'static str,
    pub status: Status,
    pub reason: Option<String>,
    /// What served the requests, and how.
    pub server: Option<String>,
    pub request_bytes: Option<usize>,
    pub response_bytes: Option<usize>,
    /// The exact command line, for a peer run as a program (fio).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub result: Option<Measured>,
}

/// What the block workloads add to the report.
#[derive(Serialize, Clone, Default)]
pub struct BlockSummary {
    /// The file (or device) behind the tier, when there is one.
    pub file: Option<String>,
    pub block_size: usize,
    /// Blocks of the working set (allocated and written during set-up).
    pub blocks: usize,
    pub working_set_bytes: u64,
    /// The bytes of the file the working set occupies, as given to fio.
    pub file_offset: Option<u64>,
    pub queue_depth: usize,
    pub fio_command: Option<String>,
    /// Pollen IOPS / fio IOPS.
    pub iops_ratio: Option<f64>,
    pub pollen_p50_ns: Option<u64>,
    pub fio_p50_ns: Option<u64>,
    pub echo_p50_ns: Option<u64>,
    /// Pollen p50 - (fio p50 + echo floor p50), in µs: what the network
    /// path adds beyond moving the bytes through an epoll server and the
    /// device's own latency.
    pub p50_excess_us: Option<f64>,
    /// The issue's targets; `met` is set when the run's configuration is the
    /// one a target is stated for and every figure it needs was measured.
    pub targets: Vec<IssueTarget>,
}

#[derive(Serialize, Clone)]
pub struct IssueTarget {
    pub name: &'static str,
    pub applies: bool,
    pub value: Option<f64>,
    pub limit: f64,
    pub met: Option<bool>,
}
#[derive(Serialize, Clone)]
pub struct Measured {
    /// Successful responses in the measured window.
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub throughput_ops: f64,
    /// Value bytes moved per second (requests x size), MiB/s.
    pub throughput_mib: f64,
    pub latency_ns: Latency,
    /// Share of the load threads' time spent handling events (1.0 = the
    /// generator itself may be the bottleneck).
    pub client_busy: f64,
    /// Share of the server's CPU time spent working, over warm-up and measurement:
    /// a Pollen core's busy passes (idle spinning excluded), the echo server's
    /// likewise, Redis's process CPU time. Near 1.0 the server is saturated.
    pub server_busy: Option<f64>,
    /// Open loop: requests whose turn came but that were never sent.
    pub unsent_at_end: u64,
    /// Open loop: requests still unanswered after the drain.
    pub unanswered_at_end: u64,
    /// With `--rounds` > 1: each round's figures, in the order measured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Round>,
}

#[derive(Serialize, Clone)]
pub struct Round {
    pub requests: u64,
    pub throughput_ops: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

#[derive(Serialize, Clone, Copy)]
pub struct Latency {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

#[derive(Serialize)]
pub struct Ratios {
    /// "pollen / <peer>"
    pub peer: &'static str,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub throughput: f64,
    /// With `--rounds` > 1: the same ratios taken round by round (Pollen's round
    /// i against the peer's round i, measured back to back), which a slow drift
    /// of the machine moves far less than the merged figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_round: Option<PerRound>,
}

#[derive(Serialize)]
pub struct PerRound {
    pub p50: Spread,
    pub throughput: Spread,
}

#[derive(Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Option<Spread> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Spread { median, min: v[0], max: v[n - 1] })
    }
}

fn per_round(p: &[Round], m: &[Round]) -> Option<PerRound> {
    if p.len() < 2 || p.len() != m.len() {
        return None;
    }
    let pairs = || p.iter().zip(m);
    Some(PerRound {
        p50: Spread::of(pairs().map(|(a, b)| ratio(a.p50_ns as f64, b.p50_ns as f64)).collect())?,
        throughput: Spread::of(pairs().map(|(a, b)| ratio(a.throughput_ops, b.throughput_ops)).collect())?,
    })
}

impl Target {
    pub fn skipped(name: &'static str, reason: impl Into<String>) -> Self {
        Target {
            name,
            status: Status::Skipped,
            reason: Some(reason.into()),
            server: None,
            request_bytes: None,
            response_bytes: None,
            command: None,
            result: None,
        }
    }

    pub fn failed(name: &'static str, server: Option<String>, err: &anyhow::Error) -> Self {
        Target {
            name,
            status: Status::Failed,
            reason: Some(format!("{err:#}")),
            server,
            request_bytes: None,
            response_bytes: None,
            command: None,
            result: None,
        }
    }

    pub fn measured(
        name: &'static str,
        server: String,
        request_bytes: usize,
        response_bytes: usize,
        m: Measured,
    ) -> Self {
        let status = if m.errors > 0 || m.requests == 0 { Status::Errors } else { Status::Ok };
        let reason = match status {
            Status::Errors if m.requests == 0 && m.errors == 0 => Some("no response completed".into()),
            Status::Errors => Some(format!("{} error response(s)", m.errors)),
            _ => None,
        };
        Target {
            name,
            status,
            reason,
            server: Some(server),
            request_bytes: Some(request_bytes),
            response_bytes: Some(response_bytes),
            command: None,
            result: Some(m),
        }
    }
}

impl Measured {
    pub fn from_load(r: &LoadResult, size: usize, threads: usize, server_busy: Option<f64>) -> Self {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let h = &r.hist;
        let q = |x: f64| if h.is_empty() { 0 } else { h.value_at_quantile(x) };
        Measured {
            requests: r.ok,
            errors: r.errors,
            first_error: r.first_error.clone(),
            elapsed_s: r.elapsed.as_secs_f64(),
            throughput_ops: r.ok as f64 / secs,
            throughput_mib: r.ok as f64 * size as f64 / secs / (1 << 20) as f64,
            latency_ns: Latency {
                min: if h.is_empty() { 0 } else { h.min() },
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p99_9: q(0.999),
                max: if h.is_empty() { 0 } else { h.max() },
            },
            client_busy: (r.client_busy.as_secs_f64() / (secs * threads as f64)).min(1.0),
            server_busy,
            unsent_at_end: r.unsent_at_end,
            unanswered_at_end: r.unanswered_at_end,
            rounds: Vec::new(),
        }
    }
}

impl Report {
    pub fn new(plan: &Plan, targets: Vec<Target>, block: Option<BlockSummary>) -> Report {
        let a = &plan.args;
        let pollen = targets.iter().find(|t| t.name == "pollen").and_then(|t| usable(t));
        let ratios = match pollen {
            None => Vec::new(),
            Some(p) => targets
                .iter()
                .filter(|t| t.name != "pollen")
                .filter_map(|t| usable(t).map(|m| (t.name, m)))
                .map(|(peer, m)| {
                    let r = |a: u64, b: u64| ratio(a as f64, b as f64);
                    Ratios {
                        peer,
                        p50: r(p.latency_ns.p50, m.latency_ns.p50),
                        p90: r(p.latency_ns.p90, m.latency_ns.p90),
                        p99: r(p.latency_ns.p99, m.latency_ns.p99),
                        p99_9: r(p.latency_ns.p99_9, m.latency_ns.p99_9),
                        max: r(p.latency_ns.max, m.latency_ns.max),
                        throughput: ratio(p.throughput_ops, m.throughput_ops),
                        per_round: per_round(&p.rounds, &m.rounds),
                    }
                })
                .collect(),
        };
        let ok = targets.iter().all(|t| matches!(t.status, Status::Ok | Status::Skipped));
        let block = block.map(|b| b.complete(plan, &targets));
        Report {
            bench: "pollen-bench",
            version: env!("CARGO_PKG_VERSION"),
            machine: Machine::probe(),
            config: Config {
                op: a.op,
                size: a.size,
                tier: a.tier,
                mode: a.mode,
                conns: a.conns,
                pipeline: a.pipeline,
                queue_depth: plan.queue_depth,
                rate: a.rate,
                duration_s: plan.duration.map(|d| d.as_secs_f64()),
                requests: plan.requests,
                warmup_s: plan.warmup.as_secs_f64(),
                threads: a.threads,
                rounds: a.rounds,
                server_cpu: a.server_cpu,
                client_cpus: a.client_cpu.0.clone(),
                spin_us: a.spin_us,
                client_spin_us: a.client_spin_us(),
            },
            targets,
            ratios,
            block,
            ok,
        }
    }

    /// The side-by-side table.
    pub fn human(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let what = if c.op.is_block() {
            format!("{} on the {} tier (QD {})", c.op.name(), c.tier.name(), c.queue_depth)
        } else {
            c.op.name().to_string()
        };
        let mode = match (c.mode, c.rate) {
            (Mode::Open, Some(r)) => format!("open loop at {r} req/s"),
            _ => "closed loop".to_string(),
        };
        let mut length = match (c.duration_s, c.requests) {
            (Some(d), _) => format!("{d} s"),
            (None, Some(n)) => format!("{n} requests"),
            (None, None) => "?".into(),
        };
        length.push_str(" measured");
        if c.rounds > 1 {
            length.push_str(&format!(" in {} interleaved rounds, each", c.rounds));
        }
        let _ = writeln!(
            s,
            "pollen-bench {}: {what} of {} B, {mode}, {} connection(s) x pipeline {}, {} load thread(s); {length} after {} s warm-up",
            self.version, c.size, c.conns, c.pipeline, c.threads, c.warmup_s
        );
        let _ = writeln!(
            s,
            "servers on CPU {} (spin {} µs), load on CPU {} (spin {} µs); {} CPU(s), {}, Linux {}\n",
            c.server_cpu,
            c.spin_us,
            c.client_cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
            c.client_spin_us,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel
        );
        let _ = writeln!(
            s,
            "{:<8} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
            "target",
            "requests",
            "ops/s",
            "MiB/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "errors",
            "load%"
        );
        let us = |ns: u64| format!("{:.1}", ns as f64 / 1e3);
        for t in &self.targets {
            match &t.result {
                Some(m) => {
                    let l = &m.latency_ns;
                    let _ = writeln!(
                        s,
                        "{:<8} {:>10} {:>11.0} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6.0}%",
                        t.name,
                        m.requests,
                        m.throughput_ops,
                        m.throughput_mib,
                        us(l.p50),
                        us(l.p90),
                        us(l.p99),
                        us(l.p99_9),
                        us(l.max),
                        m.errors,
                        m.client_busy * 100.0
                    );
                }
                None => {
                    let status = match t.status {
                        Status::Skipped => "skipped",
                        _ => "FAILED",
                    };
                    let _ = writeln!(s, "{:<8} {status}: {}", t.name, t.reason.as_deref().unwrap_or(""));
                }
            }
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<16} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11}",
                "pollen / peer", "p50", "p90", "p99", "p99.9", "max", "throughput"
            );
            for r in &self.ratios {
                let _ = writeln!(
                    s,
                    "{:<16} {:>6.2}x {:>6.2}x {:>6.2}x {:>6.2}x {:>6.2}x {:>10.2}x",
                    format!("vs {}", r.peer),
                    r.p50,
                    r.p90,
                    r.p99,
                    r.p99_9,
                    r.max,
                    r.throughput
                );
            }
            for r in &self.ratios {
                if let Some(pr) = &r.per_round {
                    let _ = writeln!(
                        s,
                        "{:<16} round by round, median (min .. max): p50 {:.2}x ({:.2} .. {:.2}), throughput {:.2}x ({:.2} .. {:.2})",
                        format!("vs {}", r.peer),
                        pr.p50.median,
                        pr.p50.min,
                        pr.p50.max,
                        pr.throughput.median,
                        pr.throughput.min,
                        pr.throughput.max
                    );
                }
            }
            let _ = writeln!(s, "(latency ratio < 1 and throughput ratio > 1 favour Pollen)");
        }
        if let Some(b) = &self.block {
            let _ = writeln!(s);
            let file = match (&b.file, b.file_offset) {
                (Some(f), Some(o)) => format!(" of {f} at offset {o}"),
                (Some(f), None) => format!(" of {f}"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "working set: {} blocks of {} KiB = {:.1} MiB{file}",
                b.blocks,
                b.block_size >> 10,
                b.working_set_bytes as f64 / (1 << 20) as f64
            );
            if let Some(r) = b.iops_ratio {
                let _ = writeln!(s, "Pollen IOPS / fio IOPS: {r:.2}");
            }
            if let (Some(p), Some(f), Some(e), Some(x)) =
                (b.pollen_p50_ns, b.fio_p50_ns, b.echo_p50_ns, b.p50_excess_us)
            {
                let _ = writeln!(
                    s,
                    "p50: Pollen {:.1} µs vs fio {:.1} + echo floor {:.1} = {:.1} µs: Pollen {x:+.1} µs",
                    p as f64 / 1e3,
                    f as f64 / 1e3,
                    e as f64 / 1e3,
                    (f + e) as f64 / 1e3
                );
            }
            for t in b.targets.iter().filter(|t| t.applies) {
                let verdict = match t.met {
                    Some(true) => "MET",
                    Some(false) => "NOT MET",
                    None => "not measured",
                };
                let v = t.value.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
                let _ = writeln!(s, "issue target: {} ({v}, limit {}): {verdict}", t.name, t.limit);
            }
        }
        let _ = writeln!(s);
        for t in &self.targets {
            if let Some(srv) = &t.server {
                let sizes = match (t.request_bytes, t.response_bytes) {
                    (Some(a), Some(b)) => format!("; request {a} B, response {b} B"),
                    _ => String::new(),
                };
                let _ = writeln!(s, "{}: {srv}{sizes}", t.name);
            }
            if let Some(cmd) = &t.command {
                let _ = writeln!(s, "  command: {cmd}");
            }
            if let Some(m) = &t.result {
                if let Some(b) = m.server_busy {
                    let _ = writeln!(s, "  server busy {:.0}% (warm-up + measurement)", b * 100.0);
                }
                if m.rounds.len() > 1 {
                    let (lo, hi) = spread(m.rounds.iter().map(|r| r.throughput_ops));
                    let (p_lo, p_hi) = spread(m.rounds.iter().map(|r| r.p50_ns as f64 / 1e3));
                    let _ = writeln!(
                        s,
                        "  across {} rounds: {lo:.0} .. {hi:.0} ops/s, p50 {p_lo:.1} .. {p_hi:.1} µs",
                        m.rounds.len()
                    );
                }
                if let Some(e) = &m.first_error {
                    let _ = writeln!(s, "  first error: {e}");
                }
                if m.unsent_at_end > 0 || m.unanswered_at_end > 0 {
                    let _ = writeln!(
                        s,
                        "  fell behind the schedule: {} request(s) never sent, {} unanswered at the end",
                        m.unsent_at_end, m.unanswered_at_end
                    );
                }
                if m.client_busy > 0.9 {
                    let _ = writeln!(
                        s,
                        "  warning: the load generator was busy {:.0}% of the time and may be (part of) the bottleneck",
                        m.client_busy * 100.0
                    );
                }
            }
        }
        s
    }
}

impl BlockSummary {
    /// Fills in the comparison with fio and the echo floor from the results.
    fn complete(mut self, plan: &Plan, targets: &[Target]) -> BlockSummary {
        let a = &plan.args;
        let get = |name: &str| targets.iter().find(|t| t.name == name).and_then(usable);
        let (p, f, e) = (get("pollen"), get("fio"), get("echo"));
        self.iops_ratio = p.zip(f).map(|(p, f)| ratio(p.throughput_ops, f.throughput_ops));
        self.pollen_p50_ns = p.map(|m| m.latency_ns.p50);
        self.fio_p50_ns = f.map(|m| m.latency_ns.p50);
        self.echo_p50_ns = e.map(|m| m.latency_ns.p50);
        self.p50_excess_us = match (self.pollen_p50_ns, self.fio_p50_ns, self.echo_p50_ns) {
            (Some(p), Some(f), Some(e)) => Some((p as f64 - (f + e) as f64) / 1e3),
            _ => None,
        };
        let randread_4k = a.op == Op::Randread && a.size == 4096 && a.tier != TierArg::Dram;
        let iops_applies = randread_4k && plan.queue_depth == 32 && a.mode == Mode::Closed;
        let lat_applies = randread_4k && plan.queue_depth == 1 && a.mode == Mode::Closed;
        self.targets = vec![
            IssueTarget {
                name: "4 KiB randread at QD 32: Pollen IOPS >= 0.8 x fio IOPS",
                applies: iops_applies,
                value: self.iops_ratio,
                limit: 0.8,
                met: iops_applies.then_some(self.iops_ratio.map(|r| r >= 0.8)).flatten(),
            },
            IssueTarget {
                name: "4 KiB randread at QD 1: Pollen p50 <= fio p50 + echo floor p50 + 30 µs",
                applies: lat_applies,
                value: self.p50_excess_us,
                limit: 30.0,
                met: lat_applies.then_some(self.p50_excess_us.map(|x| x <= 30.0)).flatten(),
            },
        ];
        self
    }
}

fn spread(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

fn usable(t: &Target) -> Option<&Measured> {
    t.result.as_ref().filter(|m| m.requests > 0)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl Machine {
    pub fn probe() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine { cpus: crate::cli::online_cpus(), cpu_model, kernel }
    }
}
