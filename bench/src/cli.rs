//! Command line: what to measure, against which targets, on which CPUs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

/// Largest value size the bench accepts. Pollen's node limits a frame body to
/// its `max_body` (raised to the block size), so a bigger value would need a
/// larger block than the default 64 KiB; 1 MiB keeps every target comfortable.
pub const MAX_SIZE: usize = 1 << 20;

/// Block size of the in-process node for the block workloads (the node's
/// default): a 4 KiB request reads or writes one 4 KiB piece of a 64 KiB block.
pub const BLOCK_SIZE: usize = 64 << 10;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pollen-bench",
    version,
    about = "Measure Pollen side by side with a TCP echo floor and Redis, in one run",
    long_about = "Measure Pollen side by side with a TCP echo floor and Redis, in one run.\n\n\
        Every target (Pollen, the echo floor, redis-server) serves from --server-cpu and is driven by the \
        same load generator on --client-cpu: one epoll (mio) thread per --threads multiplexing all \
        connections. Closed loop (--mode closed) keeps --pipeline requests outstanding per connection \
        and measures peak throughput; open loop (--mode open) sends at a fixed --rate and measures each \
        latency from the request's intended send time, as wrk2 does, so a stalled server cannot hide \
        its queueing delay (coordinated omission).\n\n\
        get = Pollen BlockRead of --size bytes from a pre-written block / Redis GET / echo of a \
        40-byte request answered with 24+size bytes. put = Pollen BlockWrite of --size bytes at offset 0 / \
        Redis SET / echo of 40+size bytes answered with 28 bytes. Each connection has its own block / key.\n\n\
        randread, randwrite, mixed (70/30) = random BlockRead/BlockWrite of --size bytes over a working set \
        of 64 KiB blocks filling --tier-size on --tier, at queue depth QD = --conns x --pipeline; with \
        --tier flash or disk, fio (io_uring, O_DIRECT, iodepth QD) then runs on the same bytes of the same \
        file once the node has stopped, and the report gives Pollen IOPS / fio IOPS and Pollen's p50 \
        against fio's p50 plus the echo floor's.",
    after_help = "Examples:\n  \
        pollen-bench --op get --size 1024 --conns 1 --duration 10s\n  \
        pollen-bench --op get --size 1024 --conns 32 --pipeline 4 --duration 10s --json\n  \
        pollen-bench --mode open --rate 20000 --conns 4 --duration 10s --peers echo\n  \
        pollen-bench --quick --pollen off --peers echo\n  \
        pollen-bench --op randread --size 4k --tier flash --conns 32 --duration 20s --rounds 10"
)]
pub struct Args {
    /// Operation: get (read --size bytes at offset 0 of the connection's block) or put (write them);
    /// randread, randwrite, mixed (70% reads, 30% writes): block workloads over a working set of
    /// blocks on --tier, each request at a random block and a random --size-aligned offset in it.
    #[arg(long, value_enum, default_value_t = Op::Get)]
    pub op: Op,

    /// Value size in bytes (suffixes k/KiB, m/MiB accepted), 1 B ..= 1 MiB; for the block
    /// workloads a multiple of 4 KiB up to the block size (64 KiB), e.g. 4k or 64k.
    #[arg(long, default_value = "1024", value_parser = parse_size)]
    pub size: usize,

    /// Tier Pollen's blocks are allocated on (BlockAlloc's tier byte). flash and disk are
    /// backed by --tier-file in the in-process node.
    #[arg(long, value_enum, default_value_t = TierArg::Dram)]
    pub tier: TierArg,

    /// File (or block device) backing the in-process node's flash or disk tier, and the
    /// file fio measures. Default: pollen-bench-tier/<tier>.img next to the bench binary
    /// (under the target dir; $TMPDIR if that is tmpfs, where O_DIRECT fails), recreated
    /// on every run.
    #[arg(long)]
    pub tier_file: Option<PathBuf>,

    /// Size of the tier file; the block workloads use all of it (as many blocks as fit)
    /// as their working set, and fio uses the same bytes. Suffixes k, m, g.
    #[arg(long, default_value = "256m", value_parser = parse_bytes)]
    pub tier_size: u64,

    /// fio binary (looked up on PATH when it has no '/'), measured after Pollen's rounds
    /// on the same file for the block workloads on flash and disk.
    #[arg(long, default_value = "fio")]
    pub fio: PathBuf,

    /// Number of TCP connections per target.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,

    /// Requests outstanding per connection (closed loop), or the most a connection may
    /// have outstanding before later scheduled requests wait for a response (open loop).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,

    /// closed: peak throughput with --pipeline requests in flight per connection;
    /// open: a fixed --rate, latency from the intended send time.
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    pub mode: Mode,

    /// Requests per second over all connections (open loop only).
    #[arg(long)]
    pub rate: Option<u64>,

    /// Measured time per target (summed over --rounds), e.g. 10s, 500ms, 1m [default: 10s; --quick: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Closed loop: stop after this many measured responses instead of a duration
    /// (still bounded by --max-time).
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<u64>,

    /// Unmeasured warm-up before each measurement (each round) [default: 1s; --quick: 200ms].
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,

    /// Upper bound on one target's measurement when --requests is used.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_time: Duration,

    /// Measure every target this many times, interleaved and in rotating order
    /// (pollen echo redis, echo redis pollen, ...), each time for --duration / rounds
    /// (or --requests / rounds) after its own warm-up. Results are merged; per-round
    /// figures stay in the JSON. Spreads a shared machine's drifts over all targets.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,

    /// Peers measured alongside Pollen, comma separated: echo, redis, fio, or none.
    /// Default: echo,redis for get and put; echo,fio for the block workloads.
    /// Redis and fio are skipped (and said so) when not found or not applicable.
    #[arg(long, value_parser = parse_peers)]
    pub peers: Option<Peers>,

    /// Pollen target: "inproc" starts a one-core node inside the bench, pinned to
    /// --server-cpu; "off" skips Pollen; HOST:PORT uses a running node's main port.
    #[arg(long, default_value = "inproc", value_parser = parse_pollen)]
    pub pollen: PollenTarget,

    /// Network backend of the in-process node (it falls back to epoll when io_uring is unavailable).
    #[arg(long, value_enum, default_value_t = NetArg::Uring)]
    pub pollen_net: NetArg,

    /// CPU every server (Pollen core, echo server, redis-server) is pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,

    /// CPU(s) the load generator threads are pinned to, e.g. 1 or 1,2,3: thread i
    /// runs on the i-th CPU of the list (cycling). On a bigger machine, give the
    /// load more CPUs than the server has, with --threads to match.
    #[arg(long, default_value = "1", value_parser = parse_cpus)]
    pub client_cpu: Cpus,

    /// Load generator threads; connections are spread over them.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Idle spin budget in microseconds before a poller blocks; used by the Pollen
    /// node and the echo server, and by the load generator unless --client-spin-us.
    #[arg(long, default_value_t = 100)]
    pub spin_us: u64,

    /// The load generator's own idle spin budget in microseconds (default: --spin-us).
    /// A load generator that sleeps adds its own wake-ups to every closed-loop round;
    /// a long spin keeps the measuring side out of the servers' figures.
    #[arg(long)]
    pub client_spin_us: Option<u64>,

    /// redis-server binary (looked up on PATH when it has no '/').
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,

    /// Print one JSON document with every result on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Short preset for smoke tests: 1s measurement, 200ms warm-up (explicit flags win).
    #[arg(long)]
    pub quick: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Get,
    Put,
    Randread,
    Randwrite,
    Mixed,
}

impl Op {
    /// A random-access workload over a working set of blocks (vs one block per connection).
    pub fn is_block(self) -> bool {
        matches!(self, Op::Randread | Op::Randwrite | Op::Mixed)
    }

    /// Percentage of requests that read.
    pub fn read_pct(self) -> u32 {
        match self {
            Op::Get | Op::Randread => 100,
            Op::Put | Op::Randwrite => 0,
            Op::Mixed => 70,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Randread => "randread",
            Op::Randwrite => "randwrite",
            Op::Mixed => "mixed",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierArg {
    Dram,
    Flash,
    Disk,
}

impl TierArg {
    /// BlockAlloc's tier byte (docs/protocol.md).
    pub fn byte(self) -> u8 {
        match self {
            TierArg::Dram => dataplane::proto::tier::DRAM,
            TierArg::Flash => dataplane::proto::tier::FLASH,
            TierArg::Disk => dataplane::proto::tier::DISK,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TierArg::Dram => "dram",
            TierArg::Flash => "flash",
            TierArg::Disk => "disk",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Closed,
    Open,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetArg {
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Echo,
    Redis,
    Fio,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers(pub Vec<Peer>);

/// A non-empty list of CPU numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpus(pub Vec<usize>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollenTarget {
    InProc,
    Off,
    Remote(String),
}

/// Everything a run needs, with presets and defaults resolved and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub args: Args,
    /// `--peers`, or the default for the operation.
    pub peers: Vec<Peer>,
    /// Requests in flight at once: conns x pipeline (fio's --iodepth).
    pub queue_depth: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub warmup: Duration,
}

impl Args {
    /// The load generator's idle spin: `--client-spin-us`, else `--spin-us`.
    pub fn client_spin_us(&self) -> u64 {
        self.client_spin_us.unwrap_or(self.spin_us)
    }

    pub fn plan(self) -> anyhow::Result<Plan> {
        let (dflt_duration, dflt_warmup) = if self.quick {
            (Duration::from_secs(1), Duration::from_millis(200))
        } else {
            (Duration::from_secs(10), Duration::from_secs(1))
        };
        if self.conns == 0 {
            bail!("--conns must be at least 1");
        }
        if self.pipeline == 0 {
            bail!("--pipeline must be at least 1");
        }
        if self.threads == 0 || self.threads > self.conns {
            bail!("--threads must be between 1 and --conns ({})", self.conns);
        }
        let cpus = online_cpus();
        let named = std::iter::once(("--server-cpu", self.server_cpu))
            .chain(self.client_cpu.0.iter().map(|&c| ("--client-cpu", c)));
        for (flag, cpu) in named {
            if cpu >= cpus {
                bail!("{flag} {cpu} does not exist: this machine has {cpus} CPU(s) (0..={})", cpus - 1);
            }
        }
        match self.mode {
            Mode::Open => {
                let rate = self
                    .rate
                    .context("--mode open needs --rate (requests per second over all connections)")?;
                if rate == 0 {
                    bail!("--rate must be positive");
                }
                if self.requests.is_some() {
                    bail!("--requests is for the closed loop; an open loop runs for --duration at --rate");
                }
            }
            Mode::Closed => {
                if self.rate.is_some() {
                    bail!("--rate applies to --mode open only");
                }
            }
        }
        if !(1..=100).contains(&self.rounds) {
            bail!("--rounds must be between 1 and 100");
        }
        if let Some(0) = self.requests {
            bail!("--requests must be positive");
        }
        let duration = match (self.requests, self.duration) {
            (Some(_), _) => None,
            (None, Some(d)) => Some(d),
            (None, None) => Some(dflt_duration),
        };
        if duration == Some(Duration::ZERO) {
            bail!("--duration must be positive");
        }
        if self.max_time.is_zero() {
            bail!("--max-time must be positive");
        }
        if self.op.is_block() {
            if !self.size.is_multiple_of(4096) || self.size > BLOCK_SIZE {
                bail!(
                    "--op {} needs a --size that is a multiple of 4 KiB up to {} KiB (4k or 64k)",
                    self.op.name(),
                    BLOCK_SIZE >> 10
                );
            }
            if self.tier_size < BLOCK_SIZE as u64 * 4 || !self.tier_size.is_multiple_of(4096) {
                bail!("--tier-size must be a multiple of 4 KiB and hold a few 64 KiB blocks");
            }
        }
        let peers = match &self.peers {
            Some(p) => p.0.clone(),
            None if self.op.is_block() => vec![Peer::Echo, Peer::Fio],
            None => vec![Peer::Echo, Peer::Redis],
        };
        let warmup = self.warmup.unwrap_or(dflt_warmup);
        let queue_depth = self.conns * self.pipeline;
        Ok(Plan { requests: self.requests, duration, warmup, peers, queue_depth, args: self })
    }
}

pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn parse_peers(s: &str) -> Result<Peers, String> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = match part {
            "echo" | "floor" => Peer::Echo,
            "redis" => Peer::Redis,
            "fio" => Peer::Fio,
            "none" => continue,
            other => return Err(format!("unknown peer {other:?} (expected echo, redis, fio or none)")),
        };
        if !v.contains(&p) {
            v.push(p);
        }
    }
    Ok(Peers(v))
}

fn parse_cpus(s: &str) -> Result<Cpus, String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse().map_err(|_| format!("not a CPU number: {p:?}")))
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err("no CPU given".into());
    }
    Ok(Cpus(v))
}

fn parse_pollen(s: &str) -> Result<PollenTarget, String> {
    match s {
        "inproc" => Ok(PollenTarget::InProc),
        "off" | "none" => Ok(PollenTarget::Off),
        addr if addr.contains(':') => Ok(PollenTarget::Remote(addr.to_string())),
        other => Err(format!("expected inproc, off or HOST:PORT, got {other:?}")),
    }
}

/// `1024`, `4k`, `4KiB`, `1m`, `1MiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("unknown size unit in {s:?} (use k or m)")),
    };
    let v = n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))?;
    if v == 0 || v > MAX_SIZE {
        return Err(format!("size must be between 1 byte and {MAX_SIZE} bytes, got {v}"));
    }
    Ok(v)
}

/// A byte count for files: `256m`, `1g`, `65536` (binary multiples).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("unknown size unit in {s:?} (use k, m or g)")),
    };
    let v = n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))?;
    if v == 0 {
        return Err("size must be positive".into());
    }
    Ok(v)
}

/// `10s`, `500ms`, `250us`, `2m`, `1.5s`. A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("unknown duration unit in {s:?} (use us, ms, s or m)")),
    };
    if !secs.is_finite() || !(0.0..=3600.0).contains(&secs) {
        return Err(format!("duration must be between 0 and 1 hour, got {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("2m").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("3q").is_err());
        assert_eq!(parse_bytes("256m"), Ok(256 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn peers_and_targets() {
        assert_eq!(parse_peers("echo,redis"), Ok(Peers(vec![Peer::Echo, Peer::Redis])));
        assert_eq!(parse_peers("none"), Ok(Peers(vec![])));
        assert_eq!(parse_peers(""), Ok(Peers(vec![])));
        assert_eq!(parse_peers("echo,fio"), Ok(Peers(vec![Peer::Echo, Peer::Fio])));
        assert!(parse_peers("memcached").is_err());
        assert_eq!(parse_pollen("off"), Ok(PollenTarget::Off));
        assert_eq!(parse_pollen("127.0.0.1:7400"), Ok(PollenTarget::Remote("127.0.0.1:7400".into())));
        assert!(parse_pollen("bogus").is_err());
        assert_eq!(parse_cpus("1"), Ok(Cpus(vec![1])));
        assert_eq!(parse_cpus("1, 3"), Ok(Cpus(vec![1, 3])));
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("a").is_err());
    }

    #[test]
    fn open_loop_needs_a_rate() {
        let a = Args::try_parse_from(["pollen-bench", "--mode", "open", "--client-cpu", "0"]).unwrap();
        assert!(a.plan().is_err());
        let a = Args::try_parse_from(["pollen-bench", "--rate", "5", "--client-cpu", "0"]).unwrap();
        assert!(a.plan().is_err());
        let a = Args::try_parse_from(["pollen-bench", "--quick", "--client-cpu", "0"]).unwrap();
        let p = a.plan().unwrap();
        assert_eq!(p.duration, Some(Duration::from_secs(1)));
        assert_eq!(p.warmup, Duration::from_millis(200));
        assert_eq!(p.peers, vec![Peer::Echo, Peer::Redis]);
    }

    #[test]
    fn block_workloads() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["pollen-bench", "--client-cpu", "0"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap().plan()
        };
        let p = parse(&["--op", "randread", "--size", "4k", "--conns", "8", "--pipeline", "4"]).unwrap();
        assert_eq!((p.queue_depth, p.peers.clone()), (32, vec![Peer::Echo, Peer::Fio]));
        assert!(parse(&["--op", "randread", "--size", "1000"]).is_err());
        assert!(parse(&["--op", "mixed", "--size", "128k"]).is_err());
        assert!(parse(&["--op", "randwrite", "--size", "64k", "--tier-size", "64k"]).is_err());
        assert_eq!(Op::Mixed.read_pct(), 70);
    }
}
