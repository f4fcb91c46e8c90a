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
use dataplane::proto::{flags, JobHints, Status};
use pollen_ctl::api::{
    CoresResponse, ErrorBody, GetOutput, JobsResponse, LsEntry, LsOutput, NodeState, NodeSummary, PutOutput,
    RmOutput, StatusResponse, TiersResponse,
};
use pollen_ctl::local::{self, UrlSource};
use pollen_ctl::size::Bytes;
use pollen_ctl::table::Table;
use serde::de::DeserializeOwned;

#[derive(Parser)]
#[command(
    name = "pollenctl",
    version,
    about = "Inspect and use a Pollen cluster",
    long_about = "Inspect and use a Pollen cluster.\n\n\
        status, cores, tiers and jobs ask the controller; put, get, ls and rm ask the controller \
        for a live node and then move data to and from that node directly.\n\n\
        The controller is found through --controller, else $POLLEN_CONTROLLER, \
        else ./pollen-data/pollen.json (written by `pollen up`), else http://127.0.0.1:7070.",
    after_help = "Examples:\n  \
        pollen up &\n  \
        pollenctl status\n  \
        pollenctl put demo results/part-0 ./part-0.bin --persist\n  \
        pollenctl ls demo results\n  \
        pollenctl get demo results/part-0 ./copy.bin\n  \
        pollenctl rm demo results/part-0\n  \
        pollenctl cores --json"
)]
struct Cli {
    /// Controller URL [default: $POLLEN_CONTROLLER, else ./pollen-data/pollen.json, else http://127.0.0.1:7070]
    #[arg(long, global = true, value_name = "URL")]
    controller: Option<String>,
    /// Print machine-readable JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster summary: the controller, its nodes, their cores and capacity
    Status,
    /// Per-core load: busy fraction since the last heartbeat, connections, requests, bytes
    Cores,
    /// Capacity and use of every storage tier, per node and core
    Tiers,
    /// Jobs known to the nodes, with their objects and bytes
    Jobs,
    /// Store a local FILE ('-' = standard input) as object NAME of JOB; registers JOB if needed
    Put {
        /// The job; registered with default hints if it does not exist
        job: String,
        /// Object name; may contain directories (a/b/c), which are created as needed
        name: String,
        /// The local file to store ('-' = standard input)
        file: PathBuf,
        /// Keep the object when its job is deregistered
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
    let ctl = Controller::new(url, source);
    let json = cli.json;
    match cli.cmd {
        Cmd::Status => status(&ctl, json),
        Cmd::Cores => cores(&ctl, json),
        Cmd::Tiers => tiers(&ctl, json),
        Cmd::Jobs => jobs(&ctl, json),
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
}

impl Controller {
    fn new(url: String, source: UrlSource) -> Controller {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Controller { url, source, agent }
    }

    /// GETs an API path and decodes the reply as `T`.
    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.url);
        let mut resp = self.agent.get(&url).call().map_err(|e| self.unreachable(e))?;
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

    /// A live node to send data commands to.
    fn data_node(&self) -> Result<NodeSummary> {
        let s = self.status()?;
        let total = s.nodes.len();
        s.nodes.into_iter().find(|n| n.state == NodeState::Up).ok_or_else(|| {
            if total == 0 {
                anyhow!("the controller at {} knows no nodes yet", self.url)
            } else {
                anyhow!("none of the {total} node(s) known to the controller at {} is up", self.url)
            }
        })
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
    println!(
        "controller  {}  (v{}, up {}, heartbeat every {} ms)",
        ctl.url,
        s.version,
        duration(s.uptime_ms),
        s.heartbeat_ms
    );
    println!("nodes       {} up, {} down", s.nodes_up, s.nodes_down);
    println!("jobs        {}", s.jobs);
    for t in &s.tiers {
        println!(
            "{:<11} {} used of {} ({})",
            t.tier,
            Bytes(t.used_bytes),
            Bytes(t.capacity_bytes),
            percent(t.used_bytes, t.capacity_bytes)
        );
    }
    if s.nodes.is_empty() {
        println!("\nNo node has sent a heartbeat yet.");
        return Ok(());
    }
    println!();
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
        let used: u64 = n.tiers.iter().map(|t| t.used_bytes).sum();
        let cap: u64 = n.tiers.iter().map(|t| t.capacity_bytes).sum();
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
    print!("{}", t.render());
    for n in &s.nodes {
        if let Some(why) = &n.net_fallback_reason {
            println!("note: {} runs {} instead of the requested backend: {why}", n.node_id, n.net);
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
        "CONNS",
        "REQUESTS",
        "FORWARDED",
        "IN",
        "OUT",
    ]);
    for c in &r.cores {
        let state = match (c.node_state, c.parked) {
            (NodeState::Down, _) => "node down",
            (NodeState::Up, true) => "parked",
            (NodeState::Up, false) => "polling",
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
            c.connections.to_string(),
            c.requests.to_string(),
            c.forwarded.to_string(),
            Bytes(c.bytes_in).to_string(),
            Bytes(c.bytes_out).to_string(),
        ]);
    }
    print_table_or(&t, "No cores: no node has sent a heartbeat yet.");
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
        "PATH",
    ]);
    for row in &r.tiers {
        let r = &row.region;
        let (iops, bw) = match r.mode {
            Some(_) => (
                format!("{}/{}", r.read_ops, r.write_ops),
                format!("{}/{}", Bytes(r.read_bytes), Bytes(r.write_bytes)),
            ),
            None => ("-".to_string(), "-".to_string()),
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
            r.path.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table_or(&t, "No tiers: no node has sent a heartbeat yet.");
    Ok(())
}

fn jobs(ctl: &Controller, json: bool) -> Result<()> {
    if json {
        return print_json(&ctl.get::<serde_json::Value>("/v1/jobs")?);
    }
    let r: JobsResponse = ctl.get("/v1/jobs")?;
    let mut t = Table::new(["JOB", "ID", "NODE", "REGISTERED", "OBJECTS", "BYTES"]);
    for j in &r.jobs {
        t.row([
            j.name.clone(),
            j.id.to_string(),
            j.node_id.clone(),
            if j.registered { "yes" } else { "no (persisted objects)" }.to_string(),
            j.objects.to_string(),
            Bytes(j.bytes).to_string(),
        ]);
    }
    print_table_or(&t, "No jobs.");
    Ok(())
}

fn print_table_or(t: &Table, empty: &str) {
    if t.is_empty() {
        println!("{empty}");
    } else {
        print!("{}", t.render());
    }
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

/// A client connected to a live node.
fn connect(ctl: &Controller) -> Result<(Client, String)> {
    let node = ctl.data_node()?;
    let client = Client::connect(node.addr.as_str())
        .map_err(|e| anyhow!("cannot connect to node {} at {}: {e}", node.node_id, node.addr))?;
    Ok((client, node.addr))
}

/// Names a failed data operation in its error: `what` is e.g. "get demo/a".
fn op_error(what: &str, e: ClientError) -> anyhow::Error {
    let hint = match e.status() {
        Some(Status::DataUnavailable) => " (a node holding the data is down)",
        Some(Status::NoCapacity) => " (the cluster is out of capacity)",
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

/// The job, registered with default hints when it does not exist yet.
/// Returns whether this call registered it.
fn job_or_register(client: &mut Client, name: &str) -> Result<(Job, bool)> {
    match client.job(name) {
        Ok(j) => return Ok((j, false)),
        Err(e) if e.status() == Some(Status::NotFound) => {}
        Err(e) => return Err(op_error(&format!("job {name}"), e)),
    }
    match client.register_job(name, JobHints::default()) {
        Ok(j) => Ok((j, true)),
        // Registered by someone else between the two calls.
        Err(e) if e.status() == Some(Status::Exists) => {
            Ok((client.job(name).map_err(|e| op_error(&format!("job {name}"), e))?, false))
        }
        Err(e) => Err(op_error(&format!("register job {name}"), e)),
    }
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
    let (mut client, node) = connect(ctl)?;
    let (j, registered_job) = job_or_register(&mut client, job)?;
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
        println!("registered job {job}");
    }
    println!("put {job}/{name}: {} in {} ({})", Bytes(bytes), secs(elapsed), rate(bytes, elapsed));
    Ok(())
}

fn get(ctl: &Controller, json: bool, job: &str, name: &str, file: &Path) -> Result<()> {
    let what = format!("get {job}/{name}");
    let (mut client, node) = connect(ctl)?;
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
        println!("{summary}");
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
    let (mut client, node) = connect(ctl)?;
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
    print_table_or(&t, "(empty)");
    Ok(())
}

fn rm(ctl: &Controller, json: bool, job: &str, name: &str) -> Result<()> {
    let (mut client, node) = connect(ctl)?;
    let j = existing_job(&mut client, job)?;
    client.delete(&j, name).map_err(|e| op_error(&format!("rm {job}/{name}"), e))?;
    if json {
        return print_json(&RmOutput { job: job.into(), name: name.into(), node });
    }
    println!("removed {job}/{name}");
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
