//! `pollenctl`: the command-line client of a Pollen cluster.
//!
//! Cluster views (status, cores, tiers, jobs) come from the controller's
//! HTTP/JSON API. Data commands (put, get, ls, rm) ask the controller for a
//! live node and then talk to that node directly with the client library:
//! the controller never carries data.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use dataplane::client::{Client, ClientError, Job, PutOptions};
use dataplane::proto::{flags, Status};
use pollen_ctl::api::{
    CoresResponse, DeregisterResponse, ErrorBody, EventsResponse, GetOutput, Hints, JobEntry, JobsResponse,
    LsEntry, LsOutput, NodeEntry, NodeState, NodesResponse, PutOutput, RegisterJobRequest, RmOutput, Role,
    ScaleRequest, ScaleResponse, SetCoresRequest, StatusResponse, TiersResponse,
};
use pollen_ctl::auth;
use pollen_ctl::local::{self, LocalCluster, UrlSource};
use pollen_ctl::size::Bytes;
use pollen_ctl::table::Table;
use serde::de::DeserializeOwned;

/// `println!` that returns a closed standard output as an error (so `pollenctl … | head`
/// ends quietly, see `main`) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {
        writeln!(std::io::stdout().lock(), $($t)*).context("writing standard output")?
    };
}

/// `print!` with the same error handling as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {
        write!(std::io::stdout().lock(), $($t)*).context("writing standard output")?
    };
}

#[derive(Parser)]
#[command(
    name = "pollenctl",
    version,
    about = "Inspect and use a Pollen cluster",
    long_about = "Inspect and use a Pollen cluster.\n\n\
        status, nodes, cores, tiers, jobs, job, weights and events ask the controller; put, get, \
        ls and rm ask the controller for the node holding the job and then move data to and from \
        that node directly.\n\n\
        The controller is found through --controller, else $POLLEN_CONTROLLER, \
        else ./pollen-data/pollen.json (written by `pollen up`), else http://127.0.0.1:7070.",
    after_help = "Examples:\n  \
        pollen up &\n  \
        pollenctl status\n  \
        pollenctl put demo results/part-0 ./part-0.bin --persist\n  \
        pollenctl ls demo results\n  \
        pollenctl get demo results/part-0 ./copy.bin\n  \
        pollenctl rm demo results/part-0\n  \
        pollenctl job register sort --lambdas 64 --latency-sensitive\n  \
        pollenctl weights sort\n  \
        pollenctl events\n  \
        pollenctl cores --json"
)]
struct Cli {
    /// Controller URL [default: $POLLEN_CONTROLLER, else ./pollen-data/pollen.json, else http://127.0.0.1:7070]
    #[arg(long, global = true, value_name = "URL")]
    controller: Option<String>,
    /// Print machine-readable JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    /// Capability token for put, get, ls and rm, needed when the nodes have a cluster secret
    /// [default: $POLLEN_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// A file holding the controller's admin token [default: $POLLEN_ADMIN_TOKEN (the token
    /// itself), else the file named in ./pollen-data/pollen.json]
    #[arg(long, global = true, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// The PEM certificate to trust for an https controller [default: $POLLEN_CA_CERT, else the
    /// one named in ./pollen-data/pollen.json, else the Web PKI roots]
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster summary: the controller, its nodes, their cores and capacity
    Status,
    /// Per-core load: busy fraction since the last heartbeat, polling, connections, requests, bytes
    Cores {
        #[command(subcommand)]
        cmd: Option<CoresCmd>,
    },
    /// Capacity and use of every storage tier, per node and core; for flash and disk also the
    /// ring's mode, I/O operations and bytes per second over the last second (as of the node's
    /// last heartbeat), and I/O errors since the node started (docs/tiers.md)
    Tiers,
    /// Jobs: those registered with the controller (allocation, weights) and those the nodes hold
    Jobs,
    /// Register or deregister a job
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// A job's weight map: the share of its new data each node takes
    Weights { job: String },
    /// Storage nodes: state, cores, capacity, jobs
    Nodes,
    /// Start or drain nodes (through the controller's provisioner) until N take new data
    Scale {
        #[arg(long, value_name = "N")]
        nodes: usize,
    },
    /// Drain a node: weight 0 for new data, stopped once its blocks are freed
    Drain { node: String },
    /// The controller's event log: registrations, allocations, node failures, scaling
    Events {
        /// Only events after this sequence number
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        since: u64,
    },
    /// Store a local FILE ('-' = standard input) as object NAME of JOB; registers JOB if needed
    Put {
        /// The job; registered with default hints if it does not exist
        job: String,
        /// Object name; may contain directories (a/b/c), which are created as needed
        name: String,
        /// The local file to store ('-' = standard input)
        file: PathBuf,
        /// Keep the object when its job is deregistered (across a node restart only its flash and
        /// disk blocks on the metadata node: without --tier it goes to flash, else disk, when the
        /// node has one; DRAM blocks are lost on restart)
        #[arg(long)]
        persist: bool,
        /// Delete the object after its first complete read
        #[arg(long)]
        delete_after_read: bool,
        /// The storage tier for the object's blocks (the node must have it) [default: the job's
        /// placement: DRAM then flash for latency-sensitive jobs, else flash if the node has it]
        #[arg(long, value_enum)]
        tier: Option<TierArg>,
    },
    /// Fetch object NAME of JOB into a local FILE ('-' = standard output)
    Get {
        job: String,
        /// Object name, e.g. results/part-0
        name: String,
        /// The local file to write ('-' = standard output); written only once the whole object is read
        file: PathBuf,
    },
    /// List a directory of JOB (the job's root when DIR is omitted)
    Ls {
        job: String,
        /// Directory within the job, e.g. results
        dir: Option<String>,
    },
    /// Delete object NAME (or an empty directory) of JOB
    Rm {
        job: String,
        /// Object or empty directory to delete
        name: String,
    },
}

#[derive(Subcommand)]
enum CoresCmd {
    /// Make N of NODE's cores poll (the others park as soon as they are idle); applied on the
    /// node's next heartbeat
    Set { node: String, cores: usize },
}

#[derive(Subcommand)]
enum JobCmd {
    /// Register a job with Pocket's hints (none at all: a conservative default allocation)
    Register {
        name: String,
        /// The job's data is latency-sensitive: DRAM first, the rest on flash
        #[arg(long)]
        latency_sensitive: bool,
        /// Maximum concurrent workers (lambdas)
        #[arg(long, value_name = "N")]
        lambdas: Option<u32>,
        /// Total capacity, e.g. 10GiB
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        capacity: Option<u64>,
        /// Peak throughput in bytes per second, e.g. 500MB or 500MB/s
        #[arg(long, value_name = "RATE", value_parser = parse_rate_arg)]
        peak_throughput: Option<u64>,
    },
    /// Deregister a job: its blocks are freed except those of PERSIST objects
    Deregister { name: String },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    pollen_ctl::size::parse_size(s).map_err(|e| e.to_string())
}

fn parse_rate_arg(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    pollen_ctl::size::parse_size(t).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pollen_ctl::cli::init_tracing("warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`pollenctl ls … | head`) is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pollenctl: error: {}", pollen_ctl::cli::error_message(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let env = std::env::var(local::CONTROLLER_ENV).ok();
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let (url, source) = local::resolve_controller(cli.controller.as_deref(), env.as_deref(), &cwd)
        .context("finding the controller")?;
    // What `pollen up` wrote, when the URL came from its file.
    let local = match &source {
        UrlSource::File(_) => LocalCluster::read(&cwd.join(local::DEFAULT_DATA_DIR)).ok().flatten(),
        _ => None,
    };
    let admin_token = match (&cli.admin_token_file, std::env::var(auth::TOKEN_ENV).ok()) {
        (Some(f), _) => Some(auth::read_token_file(f)?),
        (None, Some(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
        _ => match local.as_ref().and_then(|l| l.admin_token_file.as_deref()) {
            Some(f) => Some(auth::read_token_file(f)?),
            None => None,
        },
    };
    let ca = cli
        .ca_cert
        .clone()
        .or_else(|| std::env::var_os(CA_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| local.as_ref().and_then(|l| l.ca_cert.clone()));
    let mut ctl = Controller::new(url, source, admin_token, ca.as_deref())?;
    ctl.token = cli.token.or_else(|| std::env::var("POLLEN_TOKEN").ok().filter(|t| !t.is_empty()));
    let json = cli.json;
    match cli.cmd {
        Cmd::Status => status(&ctl, json),
        Cmd::Cores { cmd: None } => cores(&ctl, json),
        Cmd::Cores { cmd: Some(CoresCmd::Set { node, cores }) } => cores_set(&ctl, json, &node, cores),
        Cmd::Tiers => tiers(&ctl, json),
        Cmd::Jobs => jobs(&ctl, json),
        Cmd::Job {
            cmd: JobCmd::Register { name, latency_sensitive, lambdas, capacity, peak_throughput },
        } => {
            let hints = Hints {
                latency_sensitive: latency_sensitive.then_some(true),
                lambdas,
                capacity,
                peak_throughput,
            };
            job_register(&ctl, json, &name, hints)
        }
        Cmd::Job { cmd: JobCmd::Deregister { name } } => job_deregister(&ctl, json, &name),
        Cmd::Weights { job } => weights(&ctl, json, &job),
        Cmd::Nodes => nodes(&ctl, json),
        Cmd::Scale { nodes } => scale(&ctl, json, nodes),
        Cmd::Drain { node } => drain(&ctl, json, &node),
        Cmd::Events { since } => events(&ctl, json, since),
        Cmd::Put { job, name, file, persist, delete_after_read, tier } => {
            let tier = tier.map(TierArg::number);
            put(&ctl, json, &job, &name, &file, PutOptions { persist, delete_after_read, tier })
        }
        Cmd::Get { job, name, file } => get(&ctl, json, &job, &name, &file),
        Cmd::Ls { job, dir } => ls(&ctl, json, &job, dir.as_deref().unwrap_or("")),
        Cmd::Rm { job, name } => rm(&ctl, json, &job, &name),
    }
}

// ---- the controller --------------------------------------------------------

struct Controller {
    url: String,
    source: UrlSource,
    agent: ureq::Agent,
    /// Presented to the nodes by the data commands (`--token`).
    token: Option<String>,
    /// `Bearer TOKEN`, when the controller needs its admin token.
    bearer: Option<String>,
}

/// Environment variable naming the certificate to trust for an https controller.
const CA_ENV: &str = "POLLEN_CA_CERT";

impl Controller {
    fn new(url: String, source: UrlSource, token: Option<String>, ca: Option<&Path>) -> Result<Controller> {
        let tls = pollen_ctl::tls::client_config(ca).map_err(anyhow::Error::msg)?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            // Long enough for a scale-up or a registration waiting for new nodes.
            .timeout_global(Some(Duration::from_secs(45)))
            .tls_config(tls)
            .build()
            .into();
        Ok(Controller { url, source, agent, token: None, bearer: token.as_deref().map(auth::bearer) })
    }

    /// Adds the admin token, when there is one.
    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.bearer {
            Some(b) => req.header("Authorization", b),
            None => req,
        }
    }

    /// GETs an API path and decodes the reply as `T`.
    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.url);
        let mut resp = self.auth(self.agent.get(&url)).call().map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let detail = resp
                .body_mut()
                .read_json::<ErrorBody>()
                .map(|b| b.error)
                .unwrap_or_else(|_| "no error message".into());
            bail!("controller at {} answered {status} for {path}: {detail}", self.url);
        }
        resp.body_mut()
            .read_json::<T>()
            .with_context(|| format!("unexpected reply from {url}: is this a Pollen controller?"))
    }

    /// Sends a request; a success decodes as `T`, an error reply becomes
    /// `Err((status, message))`.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<std::result::Result<T, (u16, String)>> {
        let url = format!("{}{path}", self.url);
        let sent = match (method, body) {
            ("POST", Some(b)) => self.auth(self.agent.post(&url)).send_json(b),
            ("POST", None) => self.auth(self.agent.post(&url)).send_empty(),
            ("DELETE", _) => self.auth(self.agent.delete(&url)).call(),
            _ => self.auth(self.agent.get(&url)).call(),
        };
        let mut resp = sent.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let detail = resp
                .body_mut()
                .read_json::<ErrorBody>()
                .map(|b| b.error)
                .unwrap_or_else(|_| "no error message".into());
            return Ok(Err((status.as_u16(), detail)));
        }
        resp.body_mut()
            .read_json::<T>()
            .map(Ok)
            .with_context(|| format!("unexpected reply from {url}: is this a Pollen controller?"))
    }

    /// A job's entry; `None` when the controller knows no such job.
    fn job(&self, name: &str) -> Result<Option<JobEntry>> {
        match self.call::<JobEntry>("GET", &format!("/v1/jobs/{}", path_segment(name)), None)? {
            Ok(j) => Ok(Some(j)),
            Err((404, _)) => Ok(None),
            Err((code, msg)) => bail!("controller at {} answered {code} for job {name}: {msg}", self.url),
        }
    }

    /// A fresh capability token for `job`; `None` when the cluster has no
    /// secret (its nodes need no token).
    fn job_token(&self, job: &str) -> Result<Option<String>> {
        match self.call::<JobEntry>("POST", &format!("/v1/jobs/{}/token", path_segment(job)), None)? {
            Ok(j) => Ok(j.token),
            Err((409, _)) => Ok(None),
            Err((code, msg)) => bail!("a token for job {job}: the controller answered {code}: {msg}"),
        }
    }

    /// Registers a job; `Ok(None)` when it already exists.
    fn register(&self, name: &str, hints: Hints) -> Result<Option<JobEntry>> {
        let req = serde_json::to_value(RegisterJobRequest { name: name.into(), hints })?;
        match self.call::<JobEntry>("POST", "/v1/jobs", Some(&req))? {
            Ok(j) => Ok(Some(j)),
            Err((409, _)) => Ok(None),
            Err((code, msg)) => bail!("register job {name}: the controller answered {code}: {msg}"),
        }
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        let from = match &self.source {
            UrlSource::Default => String::new(),
            s => format!(" (URL from {s})"),
        };
        match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                anyhow!("no controller at {}{from}: is `pollen up` running?", self.url)
            }
            ureq::Error::ConnectionFailed => {
                anyhow!("no controller at {}{from}: is `pollen up` running?", self.url)
            }
            ureq::Error::Timeout(_) => anyhow!("the controller at {}{from} did not answer in time", self.url),
            ureq::Error::HostNotFound => anyhow!("cannot resolve the controller host in {}{from}", self.url),
            ureq::Error::BadUri(u) => anyhow!("bad controller URL `{u}`{from}"),
            e => anyhow!("cannot reach the controller at {}{from}: {e}", self.url),
        }
    }

    fn status(&self) -> Result<StatusResponse> {
        self.get("/v1/status")
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).context("writing JSON")?;
    writeln!(out).context("writing JSON")?;
    Ok(())
}

// ---- cluster views -----------------------------------------------------------

fn status(ctl: &Controller, json: bool) -> Result<()> {
    if json {
        // Pass the controller's JSON through, fields it added since included.
        return print_json(&ctl.get::<serde_json::Value>("/v1/status")?);
    }
    let s = ctl.status()?;
    outln!(
        "controller  {}  (v{}, up {}, heartbeat every {} ms)",
        ctl.url,
        s.version,
        duration(s.uptime_ms),
        s.heartbeat_ms
    );
    outln!("nodes       {} up, {} down", s.nodes_up, s.nodes_down);
    outln!("jobs        {}", s.jobs);
    for t in &s.tiers {
        outln!(
            "{:<11} {} used of {} ({})",
            t.tier,
            Bytes(t.used_bytes),
            Bytes(t.capacity_bytes),
            percent(t.used_bytes, t.capacity_bytes)
        );
    }
    if s.nodes.is_empty() {
        outln!("\nNo node has sent a heartbeat yet.");
        return Ok(());
    }
    outln!();
    let mut t = Table::new([
        "NODE",
        "ADDR",
        "STATE",
        "NET",
        "POLL",
        "CORES",
        "BLOCK",
        "USED / CAPACITY",
        "LAST HEARTBEAT",
    ]);
    for n in &s.nodes {
        let used: u64 = n.tiers.iter().map(|t| t.used_bytes).fold(0, u64::saturating_add);
        let cap: u64 = n.tiers.iter().map(|t| t.capacity_bytes).fold(0, u64::saturating_add);
        t.row([
            n.node_id.clone(),
            n.addr.clone(),
            n.state.to_string(),
            n.net.to_string(),
            n.poll_mode.to_string(),
            n.cores.to_string(),
            Bytes(n.block_size).to_string(),
            format!("{} / {}", Bytes(used), Bytes(cap)),
            format!("{} ago", duration(n.last_heartbeat_ms_ago)),
        ]);
    }
    out!("{}", t.render());
    for n in &s.nodes {
        if let Some(why) = &n.net_fallback_reason {
            outln!("note: {} runs {} instead of the requested backend: {why}", n.node_id, n.net);
        }
    }
    Ok(())
}

fn cores(ctl: &Controller, json: bool) -> Result<()> {
    if json {
        return print_json(&ctl.get::<serde_json::Value>("/v1/cores")?);
    }
    let r: CoresResponse = ctl.get("/v1/cores")?;
    let mut t = Table::new([
        "NODE",
        "CORE",
        "CPU",
        "PORT",
        "NET",
        "POLL",
        "BUSY",
        "STATE",
        "NEW CONNS",
        "CONNS",
        "REQUESTS",
        "FORWARDED",
        "IN",
        "OUT",
    ]);
    for c in &r.cores {
        let state = match (c.node_state, c.parked, c.polling) {
            (NodeState::Down, _, _) => "node down",
            (NodeState::Up, true, true) => "parked",
            (NodeState::Up, false, true) => "polling",
            (NodeState::Up, true, false) => "off (parked)",
            (NodeState::Up, false, false) => "off (working)",
        };
        t.row([
            c.node_id.clone(),
            c.core.to_string(),
            c.cpu.map_or("-".into(), |x| x.to_string()),
            c.port.to_string(),
            c.net.to_string(),
            c.poll_mode.to_string(),
            c.busy.map_or("-".into(), |b| format!("{:.1}%", b * 100.0)),
            state.to_string(),
            if c.accepting { "taken" } else { "not taken" }.to_string(),
            c.connections.to_string(),
            c.requests.to_string(),
            c.forwarded.to_string(),
            Bytes(c.bytes_in).to_string(),
            Bytes(c.bytes_out).to_string(),
        ]);
    }
    print_table_or(&t, "No cores: no node has sent a heartbeat yet.")?;
    Ok(())
}

/// `pollenctl put --tier`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TierArg {
    Dram,
    Flash,
    Disk,
}

impl TierArg {
    fn number(self) -> u8 {
        match self {
            TierArg::Dram => dataplane::proto::tier::DRAM,
            TierArg::Flash => dataplane::proto::tier::FLASH,
            TierArg::Disk => dataplane::proto::tier::DISK,
        }
    }
}

fn tiers(ctl: &Controller, json: bool) -> Result<()> {
    if json {
        return print_json(&ctl.get::<serde_json::Value>("/v1/tiers")?);
    }
    let r: TiersResponse = ctl.get("/v1/tiers")?;
    let mut t = Table::new([
        "NODE",
        "TIER",
        "CORE",
        "USED",
        "CAPACITY",
        "USE",
        "BLOCKS USED/TOTAL",
        "HUGE PAGES",
        "MODE",
        "IOPS R/W",
        "BW R/W (/s)",
        "IO ERRORS",
        "PATH",
    ]);
    for row in &r.tiers {
        let r = &row.region;
        let (iops, bw, errors) = match r.mode {
            Some(_) => (
                format!("{}/{}", r.read_iops, r.write_iops),
                format!("{}/{}", Bytes(r.read_bytes_per_sec), Bytes(r.write_bytes_per_sec)),
                r.io_errors.to_string(),
            ),
            None => ("-".to_string(), "-".to_string(), "-".to_string()),
        };
        t.row([
            row.node_id.clone(),
            r.tier.clone(),
            r.core.to_string(),
            Bytes(r.used_bytes).to_string(),
            Bytes(r.capacity_bytes).to_string(),
            percent(r.used_bytes, r.capacity_bytes),
            format!("{}/{}", r.blocks_used, r.blocks_total),
            if r.huge_pages { "yes" } else { "no" }.to_string(),
            r.mode.clone().unwrap_or_else(|| "-".into()),
            iops,
            bw,
            errors,
            r.path.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table_or(&t, "No tiers: no node has sent a heartbeat yet.")?;
    Ok(())
}

fn jobs(ctl: &Controller, json: bool) -> Result<()> {
    if json {
        return print_json(&ctl.get::<serde_json::Value>("/v1/jobs")?);
    }
    let r: JobsResponse = ctl.get("/v1/jobs")?;
    let mut t = Table::new([
        "JOB",
        "NODE",
        "REGISTERED",
        "OBJECTS",
        "BYTES",
        "THROUGHPUT",
        "CAPACITY",
        "DRAM",
        "FLASH",
        "NODES",
    ]);
    let mut listed = std::collections::BTreeSet::new();
    for j in &r.registered {
        let on_node = r.jobs.iter().find(|row| row.name == j.name && row.node_id == j.node_id);
        let a = j.allocation.as_ref();
        let spread = j.weights.values().filter(|&&w| w > 0.0).count();
        t.row([
            j.name.clone(),
            j.node_id.clone(),
            "controller".to_string(),
            on_node.map_or("-".into(), |r| r.objects.to_string()),
            on_node.map_or("-".into(), |r| Bytes(r.bytes).to_string()),
            a.map_or("-".into(), |a| format!("{}/s", Bytes(a.throughput))),
            a.map_or("-".into(), |a| Bytes(a.capacity).to_string()),
            a.map_or("-".into(), |a| Bytes(a.dram).to_string()),
            a.map_or("-".into(), |a| Bytes(a.flash).to_string()),
            format!("{spread}{}", if j.overcommitted { " (overcommitted)" } else { "" }),
        ]);
        listed.insert((j.name.as_str(), j.node_id.as_str()));
    }
    for j in r.jobs.iter().filter(|j| !listed.contains(&(j.name.as_str(), j.node_id.as_str()))) {
        t.row([
            j.name.clone(),
            j.node_id.clone(),
            if j.registered { "node only" } else { "no (persisted objects)" }.to_string(),
            j.objects.to_string(),
            Bytes(j.bytes).to_string(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    print_table_or(&t, "No jobs.")?;
    Ok(())
}

fn job_register(ctl: &Controller, json: bool, name: &str, hints: Hints) -> Result<()> {
    let j = ctl.register(name, hints)?.ok_or_else(|| anyhow!("job {name} is already registered"))?;
    if json {
        return print_json(&j);
    }
    outln!("registered job {} on {} ({})", j.name, j.node_id, j.node_addr);
    if let Some(t) = &j.token {
        outln!("token: {t}");
        outln!(
            "  (read and write on the job's data until Unix time {}; pass it with --token or $POLLEN_TOKEN)",
            j.token_expiry_unix.unwrap_or(0)
        );
    }
    if let Some(a) = &j.allocation {
        outln!(
            "allocation: {}/s, {} ({} DRAM, {} flash){}",
            Bytes(a.throughput),
            Bytes(a.capacity),
            Bytes(a.dram),
            Bytes(a.flash),
            if a.latency_sensitive { ", latency-sensitive" } else { "" }
        );
        for b in &a.basis {
            outln!("  {b}");
        }
    }
    if j.overcommitted {
        outln!("note: the live nodes lack room for the whole allocation: it is spread over them anyway");
    }
    print_weights(&j)?;
    Ok(())
}

fn job_deregister(ctl: &Controller, json: bool, name: &str) -> Result<()> {
    let r: DeregisterResponse = match ctl.call("DELETE", &format!("/v1/jobs/{}", path_segment(name)), None)? {
        Ok(r) => r,
        Err((404, _)) => bail!("no job `{name}`"),
        Err((code, msg)) => bail!("deregister job {name}: the controller answered {code}: {msg}"),
    };
    if json {
        return print_json(&r);
    }
    match &r.note {
        None => outln!(
            "deregistered job {name}: blocks freed on {} and every live node (PERSIST objects kept)",
            r.node_id
        ),
        Some(n) => outln!("deregistered job {name}; note: {n}"),
    }
    if !r.owed.is_empty() {
        let list: Vec<String> = r.owed.iter().map(u16::to_string).collect();
        outln!(
            "node(s) {} were away: they free the job's blocks when they report again (pollenctl events)",
            list.join(", ")
        );
    }
    Ok(())
}

fn print_weights(j: &JobEntry) -> Result<()> {
    let mut t = Table::new(["NODE", "WEIGHT"]);
    for (node, w) in &j.weights {
        t.row([node.clone(), format!("{w:.3}")]);
    }
    print_table_or(
        &t,
        "No weights: the controller did not place this job (it was registered on a node directly).",
    )
}

fn weights(ctl: &Controller, json: bool, job: &str) -> Result<()> {
    let j = ctl.job(job)?.ok_or_else(|| anyhow!("no job `{job}`"))?;
    if json {
        return print_json(&serde_json::json!({ "job": j.name, "weights": j.weights }));
    }
    print_weights(&j)?;
    Ok(())
}

fn nodes(ctl: &Controller, json: bool) -> Result<()> {
    if json {
        return print_json(&ctl.get::<serde_json::Value>("/v1/nodes")?);
    }
    let r: NodesResponse = ctl.get("/v1/nodes")?;
    let mut t =
        Table::new(["NODE", "ROLE", "ADDR", "STATE", "CORES", "JOBS", "USED / CAPACITY", "LAST HEARTBEAT"]);
    for n in &r.nodes {
        let used: u64 = n.report.tiers.iter().map(|t| t.used_bytes).fold(0, u64::saturating_add);
        let cap: u64 = n.report.tiers.iter().map(|t| t.capacity_bytes).fold(0, u64::saturating_add);
        t.row([
            n.report.node_id.clone(),
            n.report.role.to_string(),
            n.report.addr.clone(),
            if n.draining { format!("{} (draining)", n.state) } else { n.state.to_string() },
            n.report.cores.len().to_string(),
            n.report.jobs.iter().filter(|j| j.registered).count().to_string(),
            format!("{} / {}", Bytes(used), Bytes(cap)),
            format!("{} ago", duration(n.last_heartbeat_ms_ago)),
        ]);
    }
    print_table_or(&t, "No nodes: none has sent a heartbeat yet.")?;
    Ok(())
}

fn cores_set(ctl: &Controller, json: bool, node: &str, cores: usize) -> Result<()> {
    let body = serde_json::to_value(SetCoresRequest { cores })?;
    let r: serde_json::Value =
        match ctl.call("POST", &format!("/v1/nodes/{}/cores", path_segment(node)), Some(&body))? {
            Ok(r) => r,
            Err((code, msg)) => bail!("cores set {node} {cores}: the controller answered {code}: {msg}"),
        };
    if json {
        return print_json(&r);
    }
    outln!("{node}: {cores} core(s) will poll from its next heartbeat");
    Ok(())
}

/// A scale or drain answer, as JSON or as lines.
fn show_scale(r: &ScaleResponse, json: bool) -> Result<()> {
    if json {
        print_json(r)
    } else {
        print_scale(r)
    }
}

fn print_scale(r: &ScaleResponse) -> Result<()> {
    for id in &r.started {
        outln!("started {id}");
    }
    for id in &r.draining {
        outln!("draining {id}: weight 0 for new data; it stops once its blocks are freed");
    }
    outln!("{} node(s) take new data", r.open_nodes);
    Ok(())
}

fn scale(ctl: &Controller, json: bool, nodes: usize) -> Result<()> {
    let body = serde_json::to_value(ScaleRequest { nodes })?;
    let r: ScaleResponse = match ctl.call("POST", "/v1/scale", Some(&body))? {
        Ok(r) => r,
        Err((code, msg)) => bail!("scale to {nodes} nodes: the controller answered {code}: {msg}"),
    };
    show_scale(&r, json)
}

fn drain(ctl: &Controller, json: bool, node: &str) -> Result<()> {
    let r: ScaleResponse = match ctl.call("POST", &format!("/v1/nodes/{}/drain", path_segment(node)), None)? {
        Ok(r) => r,
        Err((code, msg)) => bail!("drain {node}: the controller answered {code}: {msg}"),
    };
    show_scale(&r, json)
}

fn events(ctl: &Controller, json: bool, since: u64) -> Result<()> {
    let mut r: EventsResponse = ctl.get(&format!("/v1/events?since={since}"))?;
    // The controller answers the oldest events after `since`, a page at a
    // time, saying whether more follow: ask from the last one until none do.
    while r.more {
        let Some(last) = r.events.last().map(|e| e.seq) else { break };
        let next: EventsResponse = ctl.get(&format!("/v1/events?since={last}"))?;
        r.last_seq = next.last_seq;
        r.more = next.more;
        r.events.extend(next.events);
    }
    if json {
        return print_json(&r);
    }
    let mut t = Table::new(["SEQ", "TIME (UTC)", "KIND", "NODE", "JOB", "MESSAGE"]);
    for e in &r.events {
        t.row([
            e.seq.to_string(),
            utc(e.unix_ms),
            e.kind.to_string(),
            e.node.clone().unwrap_or_else(|| "-".into()),
            e.job.clone().unwrap_or_else(|| "-".into()),
            e.message.clone(),
        ]);
    }
    print_table_or(&t, "No events.")?;
    Ok(())
}

/// `HH:MM:SS.mmm` of a Unix time in milliseconds.
fn utc(unix_ms: u64) -> String {
    let day_ms = unix_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn print_table_or(t: &Table, empty: &str) -> Result<()> {
    if t.is_empty() {
        outln!("{empty}");
    } else {
        out!("{}", t.render());
    }
    Ok(())
}

fn percent(used: u64, cap: u64) -> String {
    if cap == 0 {
        "-".into()
    } else {
        format!("{:.1}%", used as f64 * 100.0 / cap as f64)
    }
}

fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m {}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h {}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

// ---- data commands -------------------------------------------------------

/// A client connected to the node that holds `job`'s namespace, and that
/// node's address. With `register`, a job the controller does not know is
/// registered first, without hints; the bool says whether it was.
fn connect_job(ctl: &Controller, job: &str, register: bool) -> Result<(Client, String, bool)> {
    let (entry, registered) = match ctl.job(job)? {
        Some(e) => (e, false),
        None if register => match ctl.register(job, Hints::default())? {
            Some(e) => (e, true),
            // Registered by someone else meanwhile.
            None => (ctl.job(job)?.ok_or_else(|| anyhow!("job {job} vanished while registering it"))?, false),
        },
        None => bail!("no job `{job}` (`pollenctl job register {job}` or `pollenctl put` registers it)"),
    };
    if entry.node_state != Some(NodeState::Up) || entry.node_addr.is_empty() {
        bail!("job {job}: its node {} is down", entry.node_id);
    }
    // A put right after a registration (or a change of weights) on a
    // metadata-only node waits for it to hold the job's weight map, which
    // rides on its next heartbeat reply: without it the node has nowhere to
    // place blocks. (A `both` node keeps them itself meanwhile.)
    let entry = if register && entry.managed && !entry.weights_applied && metadata_only(ctl, &entry.node_id)?
    {
        wait_for_weights(ctl, entry)?
    } else {
        entry
    };
    let mut client = Client::connect(entry.node_addr.as_str())
        .map_err(|e| anyhow!("cannot connect to node {} at {}: {e}", entry.node_id, entry.node_addr))?;
    // Blocks of an object may sit on other nodes: tell the client where they are.
    // With them, puts ask the metadata node where each block goes (`Place`).
    client.set_node_addrs(entry.node_socket_addrs());
    // The token given on the command line, else one the controller mints
    // for the job (when the cluster has a secret).
    let token = match (&ctl.token, &entry.token) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(t)) => Some(t.clone()),
        (None, None) => ctl.job_token(job)?,
    };
    client.set_token(token);
    Ok((client, entry.node_addr, registered))
}

/// Whether node `id` holds namespaces only (role `metadata`).
fn metadata_only(ctl: &Controller, id: &str) -> Result<bool> {
    let n: NodeEntry = ctl.get(&format!("/v1/nodes/{}", path_segment(id)))?;
    Ok(n.report.role == Role::Metadata)
}

/// How long a put waits for a job's weight map to reach its metadata node.
const WEIGHTS_WAIT: Duration = Duration::from_secs(5);

/// `entry` once its metadata node holds its weight map, or as it is after
/// [`WEIGHTS_WAIT`] (the put then goes where the node puts it).
fn wait_for_weights(ctl: &Controller, mut entry: JobEntry) -> Result<JobEntry> {
    let deadline = Instant::now() + WEIGHTS_WAIT;
    while !entry.weights_applied && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let token = entry.token.take();
        entry = ctl.job(&entry.name)?.ok_or_else(|| anyhow!("job {} vanished", entry.name))?;
        entry.token = entry.token.take().or(token);
    }
    Ok(entry)
}

/// Percent-encodes a job name for a URL path segment.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Names a failed data operation in its error: `what` is e.g. "get demo/a".
fn op_error(what: &str, e: ClientError) -> anyhow::Error {
    let hint = match e.status() {
        Some(Status::DataUnavailable) => " (a node holding the data is down)",
        Some(Status::NoCapacity) => " (the cluster is out of capacity)",
        Some(Status::Unauthorized) => " (pass the job's capability token with --token or $POLLEN_TOKEN)",
        _ => "",
    };
    anyhow!("{what}: {e}{hint}")
}

/// An existing job; a clear error when it is not registered.
fn existing_job(client: &mut Client, name: &str) -> Result<Job> {
    client.job(name).map_err(|e| match e.status() {
        Some(Status::NotFound) => anyhow!("no job `{name}` (`pollenctl put` registers a job)"),
        _ => op_error(&format!("job {name}"), e),
    })
}

/// Creates the directories above object `name` (`a/b` for `a/b/c`).
fn create_parents(client: &mut Client, job: &Job, name: &str) -> Result<()> {
    let name = name.trim_start_matches('/');
    let mut end = 0;
    while let Some(i) = name[end..].find('/') {
        end += i;
        let dir = &name[..end];
        end += 1;
        if dir.is_empty() || dir.ends_with('/') {
            continue;
        }
        match client.create_dir(job, dir) {
            Ok(()) => {}
            Err(e) if e.status() == Some(Status::Exists) => {}
            Err(e) => return Err(op_error(&format!("create directory {}/{dir}", job.name), e)),
        }
    }
    Ok(())
}

fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

fn put(ctl: &Controller, json: bool, job: &str, name: &str, file: &Path, opts: PutOptions) -> Result<()> {
    let what = format!("put {job}/{name}");
    // Read standard input, or check the file, before touching the cluster.
    let data = if is_stdio(file) {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("reading standard input")?;
        Some(buf)
    } else {
        let meta = std::fs::metadata(file).with_context(|| format!("{what}: {}", file.display()))?;
        if !meta.is_file() {
            bail!("{what}: {} is not a regular file", file.display());
        }
        None
    };
    let (mut client, node, registered_job) = connect_job(ctl, job, true)?;
    let j = existing_job(&mut client, job)?;
    create_parents(&mut client, &j, name)?;
    let started = Instant::now();
    let result = match &data {
        Some(buf) => client.put_buffer(&j, name, buf, opts).map(|()| buf.len() as u64),
        None => client.put(&j, file, name, opts),
    };
    let bytes = result.map_err(|e| match e.status() {
        Some(Status::Exists) => {
            anyhow!("{what}: the object already exists (objects are immutable; `pollenctl rm {job} {name}` first)")
        }
        _ => op_error(&what, e),
    })?;
    let elapsed = started.elapsed();
    if json {
        return print_json(&PutOutput {
            job: job.into(),
            name: name.into(),
            bytes,
            node,
            registered_job,
            persist: opts.persist,
            delete_after_read: opts.delete_after_read,
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
        });
    }
    if registered_job {
        outln!("registered job {job}");
    }
    outln!("put {job}/{name}: {} in {} ({})", Bytes(bytes), secs(elapsed), rate(bytes, elapsed));
    Ok(())
}

fn get(ctl: &Controller, json: bool, job: &str, name: &str, file: &Path) -> Result<()> {
    let what = format!("get {job}/{name}");
    let (mut client, node, _) = connect_job(ctl, job, false)?;
    let j = existing_job(&mut client, job)?;
    let started = Instant::now();
    let bytes = if is_stdio(file) {
        let data = client.get_buffer(&j, name).map_err(|e| op_error(&what, e))?;
        let mut out = std::io::stdout().lock();
        out.write_all(&data).and_then(|()| out.flush()).context("writing standard output")?;
        data.len() as u64
    } else {
        get_to_file(&mut client, &j, name, file, &what)?
    };
    let elapsed = started.elapsed();
    if json {
        // With `-` the object went to standard output: keep the summary off it.
        let out = GetOutput {
            job: job.into(),
            name: name.into(),
            bytes,
            node,
            file: file.display().to_string(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
        };
        if is_stdio(file) {
            eprintln!("{}", serde_json::to_string(&out)?);
            return Ok(());
        }
        return print_json(&out);
    }
    let summary = format!(
        "got {job}/{name}: {} in {} ({}) -> {}",
        Bytes(bytes),
        secs(elapsed),
        rate(bytes, elapsed),
        file.display()
    );
    if is_stdio(file) {
        eprintln!("{summary}");
    } else {
        outln!("{summary}");
    }
    Ok(())
}

/// Fetches into a temporary file beside `dst` and renames it over `dst`, so
/// a failed get leaves no partial file behind.
fn get_to_file(client: &mut Client, job: &Job, name: &str, dst: &Path, what: &str) -> Result<u64> {
    if dst.is_dir() {
        bail!("{what}: {} is a directory", dst.display());
    }
    let file_name = dst.file_name().ok_or_else(|| anyhow!("{what}: {} is not a file name", dst.display()))?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{}.pollenctl-{}", file_name.to_string_lossy(), std::process::id()));
    let n = match client.get(job, name, &tmp) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(op_error(what, e));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, dst) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{what}: writing {}", dst.display()));
    }
    Ok(n)
}

fn ls(ctl: &Controller, json: bool, job: &str, dir: &str) -> Result<()> {
    let (mut client, node, _) = connect_job(ctl, job, false)?;
    let j = existing_job(&mut client, job)?;
    let dir = dir.trim_matches('/');
    let what = if dir.is_empty() { format!("ls {job}") } else { format!("ls {job}/{dir}") };
    let entries = client.enumerate(&j, dir).map_err(|e| op_error(&what, e))?;
    let entries: Vec<LsEntry> = entries
        .into_iter()
        .map(|e| LsEntry {
            persist: e.flags & flags::PERSIST != 0,
            delete_after_read: e.flags & flags::DELETE_AFTER_READ != 0,
            name: e.name,
            is_dir: e.is_dir,
            size: e.size,
        })
        .collect();
    if json {
        return print_json(&LsOutput { job: job.into(), dir: dir.into(), node, entries });
    }
    let mut t = Table::new(["KIND", "SIZE", "FLAGS", "NAME"]);
    for e in &entries {
        let mut fl = Vec::new();
        if e.persist {
            fl.push("persist");
        }
        if e.delete_after_read {
            fl.push("delete-after-read");
        }
        t.row([
            if e.is_dir { "dir" } else { "object" }.to_string(),
            if e.is_dir { "-".into() } else { Bytes(e.size).to_string() },
            if fl.is_empty() { "-".into() } else { fl.join(",") },
            if e.is_dir { format!("{}/", e.name) } else { e.name.clone() },
        ]);
    }
    print_table_or(&t, "(empty)")?;
    Ok(())
}

fn rm(ctl: &Controller, json: bool, job: &str, name: &str) -> Result<()> {
    let (mut client, node, _) = connect_job(ctl, job, false)?;
    let j = existing_job(&mut client, job)?;
    client.delete(&j, name).map_err(|e| op_error(&format!("rm {job}/{name}"), e))?;
    if json {
        return print_json(&RmOutput { job: job.into(), name: name.into(), node });
    }
    outln!("removed {job}/{name}");
    Ok(())
}

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn rate(bytes: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return "-".into();
    }
    format!("{}/s", Bytes((bytes as f64 / s) as u64))
}
