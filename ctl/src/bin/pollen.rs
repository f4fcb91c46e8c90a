//! `pollen`: runs Pollen's processes — `up` (controller and a node in one
//! process), `node`, and `controller`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dataplane::node::{Node, NodeConfig, NodeFailure, StopHandle};
use pollen_ctl::api::NodeCommand;
use pollen_ctl::config::{node_flags, DownFlags, NodeArgs, SecurityFlags, UpArgs, UpSettings, FILE_HELP};
use pollen_ctl::controller::policy::Policy;
use pollen_ctl::controller::{Controller, ControllerConfig, ControllerError};
use pollen_ctl::heartbeat::ClientAuth;
use pollen_ctl::heartbeat::{self, HeartbeatHandle};
use pollen_ctl::local::{self, LocalCluster};
use pollen_ctl::provision::{LocalConfig, LocalProvisioner, Provisioner};
use pollen_ctl::size::Bytes;
use pollen_ctl::view::ViewApplier;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "pollen",
    version,
    about = "Run Pollen: a kernel-bypass data plane for ephemeral storage",
    long_about = "Run Pollen: a kernel-bypass data plane for ephemeral storage.\n\n\
        Start with `pollen up`: a controller and one node on 127.0.0.1, data under ./pollen-data. \
        Then use `pollenctl` (status, put, get, ls, rm) against it.\n\n\
        Logs go to standard error; set RUST_LOG (e.g. RUST_LOG=debug) to change their level."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a controller and one node in this process, on 127.0.0.1 (the local default)
    #[command(long_about = "Start a controller and one node in this process, on 127.0.0.1.\n\n\
        Waits until the node's first heartbeat reaches the controller, writes <DATA_DIR>/pollen.json \
        (the controller URL and node address, which pollenctl reads), prints how to use it, and runs \
        until Ctrl-C or SIGTERM, then stops the node's cores and exits 0. A core that fails (its \
        network poll errors, or it panics) stops the node and the controller: the process exits 1.\n\n\
        Settings come from the defaults, then the --config file, then the flags given here.",
        after_long_help = FILE_HELP)]
    Up(UpArgs),
    /// Run one node that sends heartbeats to a controller
    #[command(long_about = "Run one node that sends heartbeats to a controller.\n\n\
        Runs until Ctrl-C or SIGTERM, then stops the node's cores and exits 0. A core that fails (its \
        network poll errors, or it panics) stops the whole node: the process exits 1 with the reason \
        on standard error, for a supervisor to restart it.",
        after_long_help = FILE_HELP)]
    Node(NodeArgs),
    /// Run the control daemon alone
    Controller(ControllerArgs),
}

#[derive(Args)]
struct ControllerArgs {
    /// Address of the HTTP/JSON API
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The heartbeat interval nodes use, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_ms: u64,
    #[command(flatten)]
    down: DownFlags,
    /// Allocation and scaling constants, a TOML file (see docs/control-plane.md) [default: built in]
    #[arg(long, value_name = "FILE")]
    policy: Option<std::path::PathBuf>,
    #[command(flatten)]
    security: SecurityFlags,
    /// The cluster secret shared with the nodes (a file): job registration returns a capability
    /// token [default: $POLLEN_CLUSTER_SECRET_FILE, else none: nodes accept any request]
    #[arg(long, value_name = "FILE")]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// How long the capability tokens handed out for jobs are valid, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 86400, value_parser = clap::value_parser!(u64).range(1..))]
    token_ttl_secs: u64,
    /// Where the controller keeps what must survive its restart (the frees it owes nodes
    /// that were away when a job was deregistered) [default: none, kept in memory only]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pollen_ctl::cli::init_tracing("info");
    let result = match cli.cmd {
        Cmd::Up(a) => up(a),
        Cmd::Node(a) => node(a),
        Cmd::Controller(a) => controller(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pollen: error: {}", pollen_ctl::cli::error_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM, registered as early as possible so a signal during
/// start-up is not lost (it ends the wait for readiness instead).
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Must be called inside the runtime.
    fn new() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }

    /// After the first signal, a second one ends the process at once, in
    /// case a clean stop hangs.
    fn exit_on_next(mut self, rt: &tokio::runtime::Runtime) {
        rt.spawn(async move {
            let sig = self.wait().await;
            eprintln!("pollen: second {sig} while stopping: exiting now");
            std::process::exit(130);
        });
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // The controller is light: one worker thread, so it does not compete with
    // the polling cores for CPUs.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pollen-ctl")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A started node, its heartbeat thread, and the way to stop both.
struct RunningNode {
    node: Arc<Node>,
    heartbeat: HeartbeatHandle,
}

impl RunningNode {
    fn start(
        cfg: NodeConfig,
        controller_url: &str,
        interval: Duration,
        auth: &ClientAuth,
    ) -> Result<RunningNode> {
        let addr = SocketAddr::new(cfg.listen, cfg.port);
        let node = Arc::new(Node::start(cfg).with_context(|| format!("starting the node on {addr}"))?);
        let view = Arc::new(ViewApplier::new(node.clone()));
        let reporter = view.clone();
        let commanded = node.clone();
        // Dropped with the heartbeat thread's closures: a panic there stops
        // the node, which would otherwise serve on unseen by the controller.
        let guard = FailOnPanic { node: node.stop_handle(), what: "heartbeat thread" };
        let apply = move |c: &NodeCommand| {
            let _stops_the_node_on_panic = &guard;
            match c {
                NodeCommand::SetPollingCores { cores } => match commanded.set_polling_cores(*cores) {
                    Ok(n) => tracing::info!(polling = n, "the controller set the polling cores"),
                    Err(e) => tracing::warn!(error = %e, "cannot set the polling cores"),
                },
                other => {
                    view.apply(other);
                }
            }
        };
        let heartbeat = match heartbeat::spawn_with_commands(
            move || reporter.report(),
            apply,
            controller_url,
            interval,
            auth,
        ) {
            Ok(h) => h,
            Err(e) => {
                node.stop_handle().stop();
                return Err(e).context("starting heartbeats");
            }
        };
        Ok(RunningNode { node, heartbeat })
    }

    /// Stops heartbeats, then the cores, and waits for the core threads;
    /// returns the failure that stopped the node, if one did.
    fn stop(self) -> Option<NodeFailure> {
        let stop = self.node.stop_handle();
        // Joining the heartbeat thread drops its clone of the node.
        self.heartbeat.stop();
        stop.stop();
        let failure = match Arc::try_unwrap(self.node) {
            Ok(node) => node.join(),
            Err(_) => {
                tracing::warn!("node still shared at shutdown; cores were told to stop");
                stop.failure()
            }
        };
        tracing::info!("node stopped");
        failure
    }

    /// Resolves once the node stops by itself (a core failed: the node's
    /// cores are stopping), with the failure; watched on a thread of its
    /// own, which ends when the node stops either way.
    fn failed(&self) -> Result<tokio::sync::oneshot::Receiver<Option<NodeFailure>>> {
        let handle = self.node.stop_handle();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("pollen-watch".into())
            .spawn(move || {
                let _ = tx.send(handle.wait());
            })
            .context("starting the node's watch thread")?;
        Ok(rx)
    }
}

/// Stops the node when dropped while its thread panics (see `StopHandle::fail`).
struct FailOnPanic {
    node: StopHandle,
    what: &'static str,
}

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.node.fail(self.what, "panicked");
        }
    }
}

/// What ended a running node: a signal, or the node itself (a core failed).
enum Ended {
    Signal(&'static str),
    Failed(Option<NodeFailure>),
}

/// Waits for SIGINT or SIGTERM, or for the node to stop by itself.
async fn until_ended(
    signals: &mut Signals,
    failed: &mut tokio::sync::oneshot::Receiver<Option<NodeFailure>>,
) -> Ended {
    tokio::select! {
        sig = signals.wait() => Ended::Signal(sig),
        f = failed => Ended::Failed(f.ok().flatten()),
    }
}

/// The error a node that stopped by itself ends the process with.
fn node_failed(failure: Option<NodeFailure>) -> anyhow::Error {
    match failure {
        Some(f) => anyhow::anyhow!("the node stopped: {f}"),
        None => anyhow::anyhow!("the node stopped without being told to"),
    }
}

fn describe_node(node: &Node) -> String {
    let r = node.report();
    let cfg = node.config();
    let net = match &r.net_fallback_reason {
        Some(why) => format!("{} (fell back: {why})", r.net),
        None => r.net.to_string(),
    };
    format!(
        "{} at {} ({} core{}, {} polling, {net}, {} DRAM per core, {} blocks)",
        r.node_id,
        r.addr,
        r.cores.len(),
        if r.cores.len() == 1 { "" } else { "s" },
        r.poll_mode,
        Bytes(cfg.dram_bytes_per_core),
        Bytes(r.block_size),
    )
}

/// The controller task of `pollen up` and the way to stop it.
struct ServedController {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), ControllerError>>,
}

impl ServedController {
    fn stop(self, rt: &tokio::runtime::Runtime) -> Result<()> {
        let _ = self.stop.send(());
        match rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), self.server).await }) {
            Ok(Ok(served)) => served.context("controller"),
            Ok(Err(e)) => bail!("controller task failed: {e}"),
            Err(_) => bail!("controller did not stop within 5 s"),
        }
    }
}

fn up(a: UpArgs) -> Result<()> {
    let a = a.settings()?;
    if let Some((n, max)) = a.nodes {
        return up_nodes(a, n, max);
    }
    let node_cfg = a.node;
    let node_id = node_cfg.node_id.clone();
    let interval = a.heartbeat;
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating the data directory {}", a.data_dir.display()))?;

    let rt = runtime()?;
    let mut signals = rt.block_on(async { Signals::new() })?;
    let (admin_token, tls) = a.security.load()?;
    let node_auth = node_auth(a.tls_ca.as_deref(), admin_token.as_deref(), tls.is_some());
    let ctl_cfg = ControllerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], a.ctl_port)),
        heartbeat: interval,
        missed_heartbeats: a.missed_heartbeats,
        policy: load_policy(a.policy.as_deref())?,
        admin_token,
        tls,
        cluster_secret: node_cfg.cluster_secret.clone(),
        data_dir: Some(a.data_dir.join("controller")),
        ..ControllerConfig::default()
    };
    let ctl = rt.block_on(Controller::bind(ctl_cfg)).context("starting the controller")?;
    let url = ctl.url();
    let handle = ctl.handle();
    let (stop_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(ctl.serve(async {
        let _ = stopped.await;
    }));
    let served = ServedController { stop: stop_tx, server };

    let node = match RunningNode::start(node_cfg, &url, interval, &node_auth) {
        Ok(n) => n,
        Err(e) => {
            let _ = served.stop(&rt);
            return Err(e);
        }
    };

    let wait = Duration::from_secs(10).max(interval * 3);
    let ready = rt.block_on(async {
        tokio::select! {
            ok = handle.wait_for_node(&node_id, wait) => Ok(ok),
            sig = signals.wait() => Err(sig),
        }
    });
    match ready {
        Ok(true) => {}
        Ok(false) => {
            node.stop();
            let _ = served.stop(&rt);
            bail!("the node's first heartbeat did not reach the controller within {} s", wait.as_secs());
        }
        Err(sig) => {
            tracing::info!(signal = sig, "stopping before start-up finished");
            node.stop();
            return served.stop(&rt);
        }
    }

    let lc = LocalCluster {
        controller: url.clone(),
        node: node.node.addr().to_string(),
        node_id: node_id.clone(),
        pid: std::process::id(),
        admin_token_file: absolute(a.security.admin_token_file.as_deref()),
        ca_cert: node_auth.ca.clone(),
    };
    if let Err(e) = lc.write(&a.data_dir) {
        node.stop();
        let _ = served.stop(&rt);
        return Err(e).with_context(|| format!("writing {}", LocalCluster::path(&a.data_dir).display()));
    }
    print_ready(&url, &node.node, &a.data_dir);

    let mut failed = match node.failed() {
        Ok(f) => f,
        Err(e) => {
            node.stop();
            LocalCluster::remove_if_ours(&a.data_dir);
            let _ = served.stop(&rt);
            return Err(e);
        }
    };
    let ended = rt.block_on(until_ended(&mut signals, &mut failed));
    let by_itself = matches!(ended, Ended::Failed(_));
    let failure = match ended {
        Ended::Signal(sig) => {
            tracing::info!(signal = sig, "stopping");
            signals.exit_on_next(&rt);
            node.stop()
        }
        // The controller goes too: the process exits non-zero for its
        // supervisor to restart the whole.
        Ended::Failed(f) => f.or(node.stop()),
    };
    LocalCluster::remove_if_ours(&a.data_dir);
    let served = served.stop(&rt);
    if by_itself || failure.is_some() {
        return Err(node_failed(failure));
    }
    served?;
    tracing::info!("pollen stopped");
    Ok(())
}

/// An absolute form of `p` (files named in pollen.json and handed to node
/// processes are read from other directories).
fn absolute(p: Option<&Path>) -> Option<std::path::PathBuf> {
    p.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// How `pollen up`'s nodes reach its controller: its admin token, and with
/// TLS the CA to trust.
fn node_auth(tls_ca: Option<&Path>, token: Option<&str>, tls: bool) -> ClientAuth {
    ClientAuth { token: token.map(str::to_string), ca: if tls { absolute(tls_ca) } else { None } }
}

/// `pollen up --nodes N`: the controller in this process, N storage nodes
/// as `pollen node` processes started by the local provisioner.
fn up_nodes(a: UpSettings, n: usize, max_nodes: usize) -> Result<()> {
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating the data directory {}", a.data_dir.display()))?;
    let pollen = std::env::current_exe().context("finding the pollen binary")?;
    let (admin_token, tls) = a.security.load()?;
    let auth = node_auth(a.tls_ca.as_deref(), admin_token.as_deref(), tls.is_some());
    let mut node_args = node_flags(&a.node);
    if let Some(f) = absolute(a.security.admin_token_file.as_deref()) {
        node_args.extend(["--controller-token-file".to_string(), f.display().to_string()]);
    }
    if let Some(ca) = &auth.ca {
        node_args.extend(["--controller-ca".to_string(), ca.display().to_string()]);
    }
    if let Some(f) = absolute(a.cluster_secret_file.as_deref()) {
        node_args.extend(["--cluster-secret-file".to_string(), f.display().to_string()]);
    }
    let prov = Arc::new(LocalProvisioner::new(LocalConfig {
        pollen,
        dir: a.data_dir.clone(),
        controller_url: String::new(),
        heartbeat_ms: a.heartbeat.as_millis() as u64,
        node_args,
        max_nodes,
        pin: a.node.pin,
        cores: a.node.cores,
        metadata_nodes: a.metadata_nodes,
    }));
    let rt = runtime()?;
    let mut signals = rt.block_on(async { Signals::new() })?;
    let ctl_cfg = ControllerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], a.ctl_port)),
        heartbeat: a.heartbeat,
        missed_heartbeats: a.missed_heartbeats,
        policy: load_policy(a.policy.as_deref())?,
        provisioner: Some(prov.clone()),
        min_nodes: n,
        admin_token,
        tls,
        cluster_secret: a.node.cluster_secret.clone(),
        data_dir: Some(a.data_dir.join("controller")),
        ..ControllerConfig::default()
    };
    let ctl = rt.block_on(Controller::bind(ctl_cfg)).context("starting the controller")?;
    let url = ctl.url();
    prov.set_controller_url(&url);
    let handle = ctl.handle();
    let (stop_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(ctl.serve(async {
        let _ = stopped.await;
    }));
    let served = ServedController { stop: stop_tx, server };
    let stop_all = |served: ServedController| {
        prov.stop_all();
        served.stop(&rt)
    };

    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        match prov.start_node() {
            Ok(node) => ids.push(node.node_id),
            Err(e) => {
                let _ = stop_all(served);
                return Err(e).context("starting the storage nodes");
            }
        }
    }
    // Nodes started from now on (scaling) never reuse an earlier run's ids.
    prov.resume_numbering();
    let wait = Duration::from_secs(20).max(a.heartbeat * 3);
    let ready = rt.block_on(async {
        tokio::select! {
            ok = async {
                for id in &ids {
                    if !handle.wait_for_node(id, wait).await {
                        return Some(id.clone());
                    }
                }
                None
            } => Ok(ok),
            sig = signals.wait() => Err(sig),
        }
    });
    match ready {
        Ok(None) => {}
        Ok(Some(id)) => {
            let _ = stop_all(served);
            bail!(
                "node {id} sent no heartbeat within {} s (its log: {})",
                wait.as_secs(),
                a.data_dir.join("nodes").join(&id).join("node.log").display()
            );
        }
        Err(sig) => {
            tracing::info!(signal = sig, "stopping before start-up finished");
            return stop_all(served);
        }
    }
    let status = handle.status();
    let first = status.nodes.first().cloned();
    let lc = LocalCluster {
        controller: url.clone(),
        node: first.as_ref().map(|n| n.addr.clone()).unwrap_or_default(),
        node_id: first.as_ref().map(|n| n.node_id.clone()).unwrap_or_default(),
        pid: std::process::id(),
        admin_token_file: absolute(a.security.admin_token_file.as_deref()),
        ca_cert: auth.ca.clone(),
    };
    if let Err(e) = lc.write(&a.data_dir) {
        let _ = stop_all(served);
        return Err(e).with_context(|| format!("writing {}", LocalCluster::path(&a.data_dir).display()));
    }
    println!("Pollen is up.");
    println!("  controller  {url}");
    for node in &status.nodes {
        println!("  node        {} at {} ({} cores, {})", node.node_id, node.addr, node.cores, node.role);
    }
    println!(
        "  data dir    {} (wrote {}; node logs under nodes/)",
        a.data_dir.display(),
        LocalCluster::path(&a.data_dir).display()
    );
    println!("  scaling     up to {max_nodes} nodes (pollenctl scale --nodes N, pollenctl drain NODE)");
    println!();
    println!("Ctrl-C stops it and its nodes.");

    let sig = rt.block_on(signals.wait());
    tracing::info!(signal = sig, "stopping");
    signals.exit_on_next(&rt);
    LocalCluster::remove_if_ours(&a.data_dir);
    stop_all(served)?;
    tracing::info!("pollen stopped");
    Ok(())
}

fn print_ready(url: &str, node: &Node, data_dir: &Path) {
    let file = LocalCluster::path(data_dir);
    // pollenctl finds the controller through ./pollen-data/pollen.json; from
    // anywhere else it needs the URL.
    let found_by_default = std::env::current_dir()
        .ok()
        .and_then(|cwd| std::fs::canonicalize(cwd.join(local::DEFAULT_DATA_DIR)).ok())
        .zip(std::fs::canonicalize(data_dir).ok())
        .is_some_and(|(a, b)| a == b);
    let ctl_flag = if found_by_default { String::new() } else { format!(" --controller {url}") };
    println!("Pollen is up.");
    println!("  controller  {url}");
    println!("  node        {}", describe_node(node));
    println!("  data dir    {} (wrote {})", data_dir.display(), file.display());
    println!();
    println!("Try:");
    println!("  pollenctl{ctl_flag} status");
    println!("  pollenctl{ctl_flag} put demo hello.txt ./hello.txt");
    println!();
    println!("Ctrl-C stops it.");
}

fn node(a: NodeArgs) -> Result<()> {
    let a = a.settings()?;
    let url = a.controller;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut signals = rt.block_on(async { Signals::new() })?;
    let node = RunningNode::start(a.node, &url, a.heartbeat, &a.auth)?;
    let mut failed = match node.failed() {
        Ok(f) => f,
        Err(e) => {
            node.stop();
            return Err(e);
        }
    };
    println!("node {}", describe_node(&node.node));
    println!("heartbeats to {url} every {} ms; Ctrl-C stops it.", a.heartbeat.as_millis());
    match rt.block_on(until_ended(&mut signals, &mut failed)) {
        Ended::Signal(sig) => {
            tracing::info!(signal = sig, "stopping");
            signals.exit_on_next(&rt);
            // A current-thread runtime only runs the second-signal task while
            // blocked on it, so stop the node on another thread and wait here.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = done_tx.send(node.stop());
            });
            match rt.block_on(done_rx) {
                Ok(Some(failure)) => Err(node_failed(Some(failure))),
                _ => Ok(()),
            }
        }
        // Every core is stopping: the heartbeats stop, the process exits
        // non-zero, and the controller sees the node go down.
        Ended::Failed(f) => Err(node_failed(f.or(node.stop()))),
    }
}

fn load_policy(path: Option<&Path>) -> Result<Policy> {
    match path {
        Some(p) => Policy::load(p).map_err(anyhow::Error::msg),
        None => Ok(Policy::default()),
    }
}

fn controller(a: ControllerArgs) -> Result<()> {
    let (admin_token, tls) = a.security.load()?;
    let cfg = ControllerConfig {
        listen: a.listen,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        missed_heartbeats: a.down.missed_heartbeats,
        policy: load_policy(a.policy.as_deref())?,
        admin_token,
        tls,
        cluster_secret: pollen_ctl::config::cluster_secret(a.cluster_secret_file.as_deref())?,
        token_ttl: Duration::from_secs(a.token_ttl_secs),
        data_dir: a.data_dir,
        ..ControllerConfig::default()
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let mut signals = Signals::new()?;
        let ctl = Controller::bind(cfg).await.context("starting the controller")?;
        println!("controller listening on {}; Ctrl-C stops it.", ctl.url());
        ctl.serve(async move {
            let sig = signals.wait().await;
            tracing::info!(signal = sig, "stopping");
        })
        .await
        .context("controller")
    })
}
