//! What `pollen up` and `pollen node` run with: built-in defaults, then an
//! optional TOML config file (`--config FILE`), then the flags given on the
//! command line, each overriding the one before.
//!
//! The flags are `Option`s without clap defaults, so a flag left out never
//! hides the file's value; the defaults (mostly [`NodeConfig::default`]) are
//! applied after the merge.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use dataplane::node::{DpdkConfig, NetBackend, NodeConfig, PollMode, Role, TierSpec};
use dataplane::storage::flash::Reformat;
use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use crate::controller::DEFAULT_MISSED_HEARTBEATS;
use crate::local;
use crate::size::parse_size;

/// DRAM tier per core when neither a flag nor the file sets it: 256 MiB.
pub const DEFAULT_DRAM_GB: f64 = 0.25;
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;
pub const DEFAULT_CTL_PORT: u16 = 7070;
pub const DEFAULT_NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The config file format, shown by `pollen up --help` and `pollen node --help`.
pub const FILE_HELP: &str = "\
Config file (--config FILE): TOML, every key optional. Flags given on the command line
override the file; the file overrides the defaults shown here. An unknown key is an error.

    cores = 1                  # polling cores [default: 1 on <= 2 CPUs, else CPUs - 1]
    poll = \"adaptive\"          # or \"busy\"
    net = \"uring\"              # or \"epoll\", or \"dpdk\" (a build with --features dpdk; docs/dpdk.md)
    port = 7400                # 0 = a free port
    core_port_base = 7401      # [default: port + 1, or free ports when port is 0]
    dram_gb = 0.25             # DRAM tier per core, in GiB (a decimal: 0.0625, 4)
    block_size = \"64KiB\"       # or a number of bytes; a power of two, 4KiB..16MiB
    node_id = \"node-0\"
    node_number = 0            # the node's number in the cluster (0..65535), which object locations
                               # name; kept in DATA_DIR/node-number [default: the kept one, else 0]
    heartbeat_ms = 1000
    pin = true                 # pin core i to CPU (cpu_offset + i) mod CPUs
    cpu_offset = 0
    spin_us = 100              # adaptive polling: spin this long idle before parking
    max_conns_per_core = 4096
    max_body = \"1MiB\"          # largest request body (raised to block_size if smaller)
    flash = \"/mnt/nvme/pollen.flash:64GiB\"  # flash tier: PATH[:SIZE], a file or block device [default: off]
    disk = \"/mnt/hdd/pollen.disk:1TiB\"      # disk tier, same form [default: off]
    sqpoll = false             # a kernel thread polls the flash/disk submission queues
    reformat_tiers = false     # format a flash/disk region made with other settings (block size,
                               # cores, size) instead of refusing to start; loses its blocks
    discard_persist = false    # with reformat_tiers: even where it holds PERSIST blocks
    cluster_secret_file = \"/etc/pollen/secret\"  # require capability tokens, checked with this
                               # secret (also $POLLEN_CLUSTER_SECRET_FILE) [default: none, no checks]
    data_dir = \"pollen-data\"   # pollen.json (pollen up) and the metadata log under DIR/meta,
                               # relative to the current directory [default: pollen-data for
                               # pollen up; none for pollen node: its namespaces are not durable]

    # pollen up only
    ctl_port = 7070

    # pollen node only
    controller = \"http://127.0.0.1:7070\"
    role = \"both\"              # or \"storage\" (blocks only) or \"metadata\" (namespaces only)
    ip = \"127.0.0.1\"          # with net = \"dpdk\": the stack's address and prefix, \"10.0.0.2/24\"
    dpdk_args = \"-l 2-3 -a 0000:03:00.0\"   # DPDK EAL arguments (net = \"dpdk\")
    dpdk_port = 0

An annotated example: docs/pollen.example.toml.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Poll {
    /// Spin for a short idle budget, then park until work arrives (right when cores are shared)
    Adaptive,
    /// Never sleep (dedicated cores only: busy cores starve everything else on them)
    Busy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// io_uring; falls back to epoll where io_uring is unavailable (reported by `pollenctl status`)
    Uring,
    /// mio/epoll
    Epoll,
    /// DPDK poll-mode queues and a user-space TCP/IP stack; needs a build with `--features dpdk`,
    /// --dpdk-args and --ip A.B.C.D/NN (docs/dpdk.md)
    Dpdk,
}

/// `--ip`: an address, with a prefix length for the DPDK transport's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct IpSpec {
    pub addr: IpAddr,
    pub prefix: Option<u8>,
}

impl std::str::FromStr for IpSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<IpSpec, String> {
        let bad = || format!("{s:?}: invalid IP address (A.B.C.D, or A.B.C.D/NN for --net dpdk)");
        match s.split_once('/') {
            None => Ok(IpSpec { addr: s.parse().map_err(|_| bad())?, prefix: None }),
            Some(_) => {
                let (ip, len) = dataplane::node::parse_ipv4_cidr(s).map_err(|e| format!("{}: {e}", bad()))?;
                Ok(IpSpec { addr: IpAddr::V4(ip), prefix: Some(len) })
            }
        }
    }
}

impl TryFrom<String> for IpSpec {
    type Error = String;
    fn try_from(s: String) -> Result<IpSpec, String> {
        s.parse()
    }
}

/// The node's flags, shared by `pollen up` and `pollen node`.
#[derive(Args, Debug, Default)]
pub struct NodeFlags {
    /// Read settings from this TOML file (format: see --help); flags given here override it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Polling cores (one pinned thread each) [default: 1 when the machine has <= 2 CPUs, else CPUs - 1]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// How an idle core waits for work [default: adaptive]
    #[arg(long, value_enum)]
    pub poll: Option<Poll>,
    /// Network backend [default: uring]
    #[arg(long, value_enum)]
    pub net: Option<Net>,
    /// The node's main data port, which accepts any request (0 = a free port) [default: 7400]
    #[arg(long)]
    pub port: Option<u16>,
    /// Core i also listens on BASE + i, for clients that route to the owning core
    /// [default: PORT + 1, or free ports when PORT is 0]
    #[arg(long, value_name = "BASE")]
    pub core_port_base: Option<u16>,
    /// DRAM tier size per core, in GiB: a decimal such as 0.25 or 4 (allocated at start,
    /// rounded down to whole blocks) [default: 0.25]
    #[arg(long, value_name = "GiB", value_parser = parse_gb_arg, allow_negative_numbers = true)]
    pub dram_gb: Option<f64>,
    /// Block size: a power of two from 4KiB to 16MiB (e.g. 64KiB, 1MiB) [default: 64KiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub block_size: Option<u64>,
    /// The node's id in the cluster [default: node-0]
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// The node's number in the cluster (0..=65535), which object locations name; kept in the data
    /// directory, which refuses another number later [default: the kept number, else 0]
    #[arg(long, value_name = "N")]
    pub node_number: Option<u16>,
    /// Interval between heartbeats to the controller, in milliseconds [default: 1000]
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: Option<u64>,
    /// Pin cores to CPUs (the default; overrides `pin = false` in the config file)
    #[arg(long, overrides_with = "no_pin")]
    pub pin: bool,
    /// Do not pin cores to CPUs
    #[arg(long, overrides_with = "pin")]
    pub no_pin: bool,
    /// Pin core i to CPU (OFFSET + i) mod CPUs [default: 0]
    #[arg(long, value_name = "OFFSET")]
    pub cpu_offset: Option<usize>,
    /// Adaptive polling: microseconds an idle core spins before it parks [default: 100]
    #[arg(long, value_name = "US")]
    pub spin_us: Option<u64>,
    /// Connections each core holds open at most [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_conns: Option<usize>,
    /// Largest request body a node accepts (raised to the block size if smaller) [default: 1MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_body: Option<u64>,
    /// Flash tier: a file (created and sized if missing) or a block device, split into one
    /// region per core; SIZE such as 4GiB (a missing file needs one) [default: off]
    #[arg(long, value_name = "PATH[:SIZE]", value_parser = parse_tier_arg)]
    pub flash: Option<TierSpec>,
    /// Disk tier (HDD or SATA SSD; shallow queue, large requests), same form as --flash [default: off]
    #[arg(long, value_name = "PATH[:SIZE]", value_parser = parse_tier_arg)]
    pub disk: Option<TierSpec>,
    /// Ask for a kernel thread that polls the flash and disk submission queues (SQPOLL)
    #[arg(long)]
    pub sqpoll: bool,
    /// Format a flash or disk region that cannot be opened with these settings (made with another
    /// block size, core count or size, or with a corrupt superblock) instead of refusing to
    /// start, destroying the blocks it holds; refused where it holds PERSIST blocks unless
    /// --discard-persist is given too. Regions that open as they are keep their data (docs/tiers.md)
    #[arg(long)]
    pub reformat_tiers: bool,
    /// With --reformat-tiers: reformat even regions that hold PERSIST blocks, destroying them
    #[arg(long)]
    pub discard_persist: bool,
    /// Require a capability token on every connection, checked with the cluster secret in FILE
    /// (also $POLLEN_CLUSTER_SECRET_FILE; at least 16 bytes) [default: none, no token checks]
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// --net dpdk: DPDK EAL arguments, e.g. "-l 2-3 -a 0000:03:00.0", split as a shell would
    /// (quote an argument that holds spaces) (docs/dpdk.md)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub dpdk_args: Option<String>,
    /// --net dpdk: the DPDK port number to use [default: 0]
    #[arg(long, value_name = "N")]
    pub dpdk_port: Option<u16>,
}

/// The controller API's access control, shared by `pollen up` and `pollen controller`.
#[derive(Args, Debug, Default, Clone)]
pub struct SecurityFlags {
    /// Require this admin token (a file holding 16..=4096 printable characters) on every API
    /// request: `Authorization: Bearer TOKEN` (pollenctl: --admin-token-file or
    /// $POLLEN_ADMIN_TOKEN); nodes send it with their heartbeats
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the API over TLS with this PEM certificate chain (needs --tls-key)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl SecurityFlags {
    /// The admin token and the TLS configuration, read and checked.
    pub fn load(
        &self,
    ) -> Result<(Option<String>, Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>)> {
        let token = self.admin_token_file.as_deref().map(crate::auth::read_token_file).transpose()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some(crate::tls::server_config(c, k).map_err(anyhow::Error::msg)?),
            _ => None,
        };
        Ok((token, tls))
    }
}

/// When the controller declares a node down, shared by `pollen up` and `pollen controller`.
#[derive(Args, Debug, Clone, Copy)]
pub struct DownFlags {
    /// Silent heartbeat intervals after which a node is declared down (the
    /// interval times N may be at most a day)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MISSED_HEARTBEATS, value_parser = clap::value_parser!(u32).range(1..))]
    pub missed_heartbeats: u32,
}

impl Default for DownFlags {
    fn default() -> DownFlags {
        DownFlags { missed_heartbeats: DEFAULT_MISSED_HEARTBEATS }
    }
}

/// `pollen up`'s flags.
#[derive(Args, Debug, Default)]
pub struct UpArgs {
    #[command(flatten)]
    pub node: NodeFlags,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub down: DownFlags,
    /// With --tls-cert: the CA certificate the nodes trust [default: the --tls-cert file, right
    /// for a self-signed certificate]
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Directory for Pollen's files: pollen.json, and the metadata log (DIR/meta) that makes the
    /// namespaces survive a restart [default: pollen-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The controller's HTTP port on 127.0.0.1 (0 = a free port) [default: 7070]
    #[arg(long, value_name = "PORT")]
    pub ctl_port: Option<u16>,
    /// The controller's allocation and scaling constants, a TOML file (docs/control-plane.md)
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Run N storage nodes as separate `pollen node` processes on free ports (started and
    /// stopped by the controller's local provisioner, which `scale` and `drain` use) instead
    /// of one node inside this process
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub nodes: Option<u64>,
    /// With --nodes: the most nodes the provisioner runs when scaling up [default: N]
    #[arg(long, value_name = "M", requires = "nodes", value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_nodes: Option<u64>,
    /// With --nodes: the first K of the N nodes run `--role metadata` (job namespaces only) and
    /// the others, and those started later, `--role storage` (blocks only) [default: 0, every
    /// node runs both]; K must leave at least one storage node
    #[arg(long, value_name = "K", requires = "nodes", value_parser = clap::value_parser!(u64).range(1..=63))]
    pub metadata_nodes: Option<u64>,
}

/// `pollen node`'s flags.
#[derive(Args, Debug, Default)]
pub struct NodeArgs {
    #[command(flatten)]
    pub node: NodeFlags,
    /// The controller to send heartbeats to [default: http://127.0.0.1:7070]
    #[arg(long, value_name = "URL")]
    pub controller: Option<String>,
    /// The IP address the node listens on; with --net dpdk, the address and prefix length of
    /// its own TCP/IP stack (A.B.C.D/NN) [default: 127.0.0.1]
    #[arg(long, value_name = "IP[/NN]")]
    pub ip: Option<IpSpec>,
    /// What the node serves: storage (blocks only), metadata (job namespaces only) or both
    /// (docs/control-plane.md, "Node roles") [default: both]
    #[arg(long, value_name = "ROLE", value_parser = ["storage", "metadata", "both"])]
    pub role: Option<String>,
    /// Keep the metadata log in DIR/meta, so jobs, directories and objects survive a restart
    /// [default: none; the namespaces live in memory only]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The controller's admin token, sent with heartbeats (a file)
    #[arg(long, value_name = "FILE")]
    pub controller_token_file: Option<PathBuf>,
    /// The PEM certificate to trust for an https controller [default: the Web PKI roots]
    #[arg(long, value_name = "FILE")]
    pub controller_ca: Option<PathBuf>,
}

/// Which command reads the file: each takes a few keys the other does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Up,
    Node,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::Up => "pollen up",
            Command::Node => "pollen node",
        }
    }
}

/// The contents of a config file. Every key is optional; values are checked
/// while parsing where they can be, so an error carries its line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub cores: Option<usize>,
    pub poll: Option<Poll>,
    pub net: Option<Net>,
    pub port: Option<u16>,
    pub core_port_base: Option<u16>,
    #[serde(default, deserialize_with = "de_gb")]
    pub dram_gb: Option<f64>,
    #[serde(default, deserialize_with = "de_size")]
    pub block_size: Option<u64>,
    pub node_id: Option<String>,
    pub node_number: Option<u16>,
    #[serde(default, deserialize_with = "de_heartbeat_ms")]
    pub heartbeat_ms: Option<u64>,
    pub pin: Option<bool>,
    pub cpu_offset: Option<usize>,
    pub spin_us: Option<u64>,
    pub max_conns_per_core: Option<usize>,
    #[serde(default, deserialize_with = "de_size")]
    pub max_body: Option<u64>,
    #[serde(default, deserialize_with = "de_tier")]
    pub flash: Option<TierSpec>,
    #[serde(default, deserialize_with = "de_tier")]
    pub disk: Option<TierSpec>,
    pub sqpoll: Option<bool>,
    pub reformat_tiers: Option<bool>,
    pub discard_persist: Option<bool>,
    pub cluster_secret_file: Option<PathBuf>,
    pub dpdk_args: Option<String>,
    pub dpdk_port: Option<u16>,
    pub data_dir: Option<Spanned<PathBuf>>,
    // `pollen up` only; spanned to say where a misplaced one is.
    pub ctl_port: Option<Spanned<u16>>,
    // `pollen node` only.
    pub controller: Option<Spanned<String>>,
    pub ip: Option<Spanned<IpSpec>>,
    pub role: Option<Spanned<Role>>,
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {}{}: {message}", path.display(), at(*line))]
    Invalid { path: PathBuf, line: Option<(usize, usize)>, message: String },
    #[error("config file {}, line {line}: `{key}` is a `{owner}` setting; `{cmd}` does not take it", path.display())]
    WrongCommand { path: PathBuf, line: usize, key: &'static str, owner: &'static str, cmd: &'static str },
}

fn at(line: Option<(usize, usize)>) -> String {
    line.map(|(l, c)| format!(", line {l}, column {c}")).unwrap_or_default()
}

/// 1-based line and column of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

impl FileConfig {
    /// Reads and parses `path` for `cmd`.
    pub fn load(path: &Path, cmd: Command) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        FileConfig::parse(&text, path, cmd)
    }

    /// Parses the text of a config file; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path, cmd: Command) -> Result<FileConfig, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: e.span().map(|s| line_col(text, s.start)),
            message: e.message().trim_end().to_string(),
        })?;
        let misplaced = |key, owner: Command, span: Option<Range<usize>>| match span {
            Some(span) if owner != cmd => Err(ConfigError::WrongCommand {
                path: path.to_path_buf(),
                line: line_col(text, span.start).0,
                key,
                owner: owner.name(),
                cmd: cmd.name(),
            }),
            _ => Ok(()),
        };
        misplaced("ctl_port", Command::Up, file.ctl_port.as_ref().map(Spanned::span))?;
        misplaced("controller", Command::Node, file.controller.as_ref().map(Spanned::span))?;
        misplaced("ip", Command::Node, file.ip.as_ref().map(Spanned::span))?;
        misplaced("role", Command::Node, file.role.as_ref().map(Spanned::span))?;
        Ok(file)
    }
}

/// What `pollen up` runs.
#[derive(Debug)]
pub struct UpSettings {
    /// The cluster secret's file, from the flag or the config file (node
    /// processes inherit `$POLLEN_CLUSTER_SECRET_FILE` by themselves).
    pub cluster_secret_file: Option<PathBuf>,
    pub security: SecurityFlags,
    /// What nodes trust for an https controller.
    pub tls_ca: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    /// Separate node processes (`--nodes`), and the provisioner's limit.
    pub nodes: Option<(usize, usize)>,
    /// Of those, how many run `--role metadata` (the rest `storage`); 0:
    /// every node runs `both`.
    pub metadata_nodes: usize,
    pub node: NodeConfig,
    pub heartbeat: Duration,
    /// The controller's `--missed-heartbeats`.
    pub missed_heartbeats: u32,
    pub data_dir: PathBuf,
    pub ctl_port: u16,
}

/// What `pollen node` runs.
#[derive(Debug)]
pub struct NodeSettings {
    pub node: NodeConfig,
    pub heartbeat: Duration,
    pub controller: String,
    pub auth: crate::heartbeat::ClientAuth,
}

impl NodeFlags {
    /// The `--config` file, or an empty one without it.
    pub fn file(&self, cmd: Command) -> Result<FileConfig, ConfigError> {
        match &self.config {
            Some(path) => FileConfig::load(path, cmd),
            None => Ok(FileConfig::default()),
        }
    }

    /// Flags over `file` over the defaults: the node's config and heartbeat
    /// interval, validated.
    pub fn merge(
        &self,
        file: &FileConfig,
        listen: IpAddr,
        prefix: Option<u8>,
    ) -> Result<(NodeConfig, Duration)> {
        let base = NodeConfig::default();
        let port = self.port.or(file.port).unwrap_or(base.port);
        let core_port_base = match self.core_port_base.or(file.core_port_base) {
            Some(base) => base,
            None if port == 0 => 0,
            None => port.checked_add(1).context("port 65535 leaves no room for core ports")?,
        };
        let dram_gb = self.dram_gb.or(file.dram_gb).unwrap_or(DEFAULT_DRAM_GB);
        let block_size = self.block_size.or(file.block_size).map_or(Ok(base.block_size), usize::try_from);
        let max_body = self.max_body.or(file.max_body).map_or(Ok(base.max_body), usize::try_from);
        let pin = match (self.pin, self.no_pin) {
            (true, _) => true,
            (_, true) => false,
            _ => file.pin.unwrap_or(base.pin),
        };
        let cfg = NodeConfig {
            listen,
            port,
            core_port_base,
            cores: self.cores.or(file.cores).unwrap_or(base.cores),
            pin,
            cpu_offset: self.cpu_offset.or(file.cpu_offset).unwrap_or(base.cpu_offset),
            poll_mode: match self.poll.or(file.poll) {
                None => base.poll_mode,
                Some(Poll::Adaptive) => PollMode::Adaptive,
                Some(Poll::Busy) => PollMode::Busy,
            },
            spin_us: self.spin_us.or(file.spin_us).unwrap_or(base.spin_us),
            net: match self.net.or(file.net) {
                None => base.net,
                Some(Net::Uring) => NetBackend::Uring,
                Some(Net::Epoll) => NetBackend::Epoll,
                Some(Net::Dpdk) => NetBackend::Dpdk,
            },
            block_size: block_size.context("the block size is too large")?,
            dram_bytes_per_core: gb_to_bytes(dram_gb).map_err(anyhow::Error::msg).context("DRAM per core")?,
            max_body: max_body.context("the max body is too large")?,
            max_conns_per_core: self.max_conns.or(file.max_conns_per_core).unwrap_or(base.max_conns_per_core),
            node_id: self.node_id.clone().or_else(|| file.node_id.clone()).unwrap_or(base.node_id),
            role: base.role,
            node_number: self.node_number.or(file.node_number),
            // Tiers are off unless a flag or the file names them.
            flash: self.flash.clone().or_else(|| file.flash.clone()),
            disk: self.disk.clone().or_else(|| file.disk.clone()),
            sqpoll: self.sqpoll || file.sqpoll.unwrap_or(base.sqpoll),
            reformat_tiers: reformat_tiers(
                self.reformat_tiers || file.reformat_tiers.unwrap_or(false),
                self.discard_persist || file.discard_persist.unwrap_or(false),
            )?,
            // Set by `pollen up` and `pollen node` (`--data-dir`).
            data_dir: None,
            cluster_secret: cluster_secret(
                self.cluster_secret_file.as_deref().or(file.cluster_secret_file.as_deref()),
            )?,
            dpdk: DpdkConfig {
                eal_args: self
                    .dpdk_args
                    .as_ref()
                    .or(file.dpdk_args.as_ref())
                    .map(|a| {
                        shlex::split(a).ok_or_else(|| {
                            anyhow::anyhow!("--dpdk-args: unbalanced quotes or a trailing \\ in {a:?}")
                        })
                    })
                    .transpose()?
                    .unwrap_or_default(),
                port_id: self.dpdk_port.or(file.dpdk_port).unwrap_or(0),
                ip: match (listen, prefix) {
                    (IpAddr::V4(a), Some(p)) => Some((a, p)),
                    _ => None,
                },
                gateway: None,
            },
            // Tests only: a core that fails on purpose (never set in production).
            test_poll_fault: dataplane::node::PollFault::from_env().map_err(anyhow::Error::msg)?,
        };
        let heartbeat_ms = self.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(DEFAULT_HEARTBEAT_MS);
        anyhow::ensure!(heartbeat_ms >= 1, "the heartbeat interval must be at least 1 ms");
        // Node::validate checks the rest (ranges, powers of two) with clear messages.
        cfg.validate().context("invalid node options")?;
        Ok((cfg, Duration::from_millis(heartbeat_ms)))
    }
}

impl UpArgs {
    /// Reads `--config` if given and merges it with the flags.
    pub fn settings(&self) -> Result<UpSettings> {
        let file = self.node.file(Command::Up)?;
        self.merge(&file)
    }

    pub fn merge(&self, file: &FileConfig) -> Result<UpSettings> {
        let (mut node, heartbeat) = self.node.merge(file, IpAddr::V4(Ipv4Addr::LOCALHOST), None)?;
        let nodes = self.nodes.map(|n| (n as usize, self.max_nodes.unwrap_or(n).max(n) as usize));
        let metadata_nodes = self.metadata_nodes.unwrap_or(0) as usize;
        if let Some((n, _)) = nodes.filter(|&(n, _)| metadata_nodes >= n) {
            anyhow::bail!(
                "--metadata-nodes {metadata_nodes} leaves no storage node of the {n} (--nodes): \
                 give it fewer than {n}"
            );
        }
        let data_dir = self
            .data_dir
            .clone()
            .or_else(|| file.data_dir.clone().map(Spanned::into_inner))
            .unwrap_or_else(|| PathBuf::from(local::DEFAULT_DATA_DIR));
        node.data_dir = Some(data_dir.clone());
        Ok(UpSettings {
            cluster_secret_file: self
                .node
                .cluster_secret_file
                .clone()
                .or_else(|| file.cluster_secret_file.clone()),
            security: self.security.clone(),
            tls_ca: self.tls_ca.clone().or_else(|| self.security.tls_cert.clone()),
            policy: self.policy.clone(),
            nodes,
            metadata_nodes,
            node,
            heartbeat,
            missed_heartbeats: self.down.missed_heartbeats,
            data_dir,
            ctl_port: self
                .ctl_port
                .or(file.ctl_port.as_ref().map(|p| *p.get_ref()))
                .unwrap_or(DEFAULT_CTL_PORT),
        })
    }
}

impl NodeArgs {
    /// Reads `--config` if given and merges it with the flags.
    pub fn settings(&self) -> Result<NodeSettings> {
        let file = self.node.file(Command::Node)?;
        self.merge(&file)
    }

    pub fn merge(&self, file: &FileConfig) -> Result<NodeSettings> {
        let ip = self
            .ip
            .or(file.ip.as_ref().map(|ip| *ip.get_ref()))
            .unwrap_or(IpSpec { addr: DEFAULT_NODE_IP, prefix: None });
        let (mut node, heartbeat) = self.node.merge(file, ip.addr, ip.prefix)?;
        node.data_dir = self.data_dir.clone().or_else(|| file.data_dir.clone().map(Spanned::into_inner));
        node.role = match &self.role {
            Some(r) => r.parse().map_err(|e: String| anyhow::anyhow!("--role {r}: {e}"))?,
            None => file.role.as_ref().map_or(Role::Both, |r| *r.get_ref()),
        };
        let controller = self
            .controller
            .clone()
            .or_else(|| file.controller.clone().map(Spanned::into_inner))
            .unwrap_or_else(|| local::DEFAULT_CONTROLLER.to_string());
        let token = self.controller_token_file.as_deref().map(crate::auth::read_token_file).transpose()?;
        let auth = crate::heartbeat::ClientAuth { token, ca: self.controller_ca.clone() };
        Ok(NodeSettings { node, heartbeat, controller: local::normalize_url(&controller), auth })
    }
}

/// `--reformat-tiers` and `--discard-persist` (flags or file) as the node takes them.
fn reformat_tiers(reformat: bool, discard_persist: bool) -> Result<Reformat> {
    Ok(match (reformat, discard_persist) {
        (false, false) => Reformat::Never,
        (true, false) => Reformat::KeepPersist,
        (true, true) => Reformat::DiscardPersist,
        (false, true) => anyhow::bail!(
            "--discard-persist (discard_persist) only goes with --reformat-tiers (reformat_tiers = true)"
        ),
    })
}

/// The `pollen node` flags that run a node like `cfg` (for nodes a
/// provisioner starts): everything but the id, ports, pinning and controller.
pub fn node_flags(cfg: &NodeConfig) -> Vec<String> {
    let mut v = vec![
        "--cores".to_string(),
        cfg.cores.to_string(),
        "--poll".into(),
        cfg.poll_mode.to_string(),
        "--net".into(),
        cfg.net.to_string(),
        "--spin-us".into(),
        cfg.spin_us.to_string(),
        "--dram-gb".into(),
        format!("{}", cfg.dram_bytes_per_core as f64 / (1u64 << 30) as f64),
        "--block-size".into(),
        cfg.block_size.to_string(),
        "--max-body".into(),
        cfg.max_body.to_string(),
        "--max-conns".into(),
        cfg.max_conns_per_core.to_string(),
        "--ip".into(),
        cfg.listen.to_string(),
    ];
    if cfg.sqpoll {
        v.push("--sqpoll".into());
    }
    v
}

/// The environment variable naming the cluster secret file when neither the
/// flag nor the config file does.
pub const CLUSTER_SECRET_ENV: &str = "POLLEN_CLUSTER_SECRET_FILE";

/// The cluster secret from `path`, else from the file `$POLLEN_CLUSTER_SECRET_FILE` names.
pub fn cluster_secret(path: Option<&Path>) -> Result<Option<dataplane::auth::Secret>> {
    let env = std::env::var_os(CLUSTER_SECRET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    match path.map(Path::to_path_buf).or(env) {
        None => Ok(None),
        Some(p) => Ok(Some(dataplane::auth::Secret::from_file(&p)?)),
    }
}

/// GiB (binary: 0.25 is 256 MiB) to whole bytes, rounded down; the node
/// rounds further down to whole blocks.
pub fn gb_to_bytes(gb: f64) -> Result<u64, String> {
    if !gb.is_finite() {
        return Err(format!("{gb} GiB: the size must be a finite number"));
    }
    if gb <= 0.0 {
        return Err(format!("{gb} GiB: the size must be greater than 0"));
    }
    let bytes = (gb * (1u64 << 30) as f64).floor();
    // 2^64 is exact in f64; anything at or above it does not fit.
    if bytes >= u64::MAX as f64 {
        return Err(format!("{gb} GiB is too large"));
    }
    Ok(bytes as u64)
}

fn parse_gb_arg(s: &str) -> Result<f64, String> {
    let gb: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number of GiB (e.g. 0.25, 4)"))?;
    gb_to_bytes(gb)?;
    Ok(gb)
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `PATH[:SIZE]`, SIZE in the units `--block-size` takes (64GiB, 4G, 4096);
/// a colon whose tail is not a size belongs to the path.
pub fn parse_tier_arg(s: &str) -> Result<TierSpec, String> {
    if let Some((path, tail)) = s.rsplit_once(':') {
        if let Ok(size) = parse_size(tail) {
            if path.is_empty() {
                return Err(format!("{s:?}: no path"));
            }
            return Ok(TierSpec { path: PathBuf::from(path), size: Some(size) });
        }
    }
    TierSpec::parse(s)
}

fn de_tier<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TierSpec>, D::Error> {
    let s = String::deserialize(d)?;
    parse_tier_arg(&s).map(Some).map_err(de::Error::custom)
}

fn de_gb<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    // f64's Deserialize also takes TOML integers: `dram_gb = 4`.
    let gb = f64::deserialize(d)?;
    gb_to_bytes(gb).map_err(de::Error::custom)?;
    Ok(Some(gb))
}

fn de_heartbeat_ms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(de::Error::custom("heartbeat_ms must be at least 1")),
        ms => Ok(Some(ms)),
    }
}

/// A size as a number of bytes (`65536`) or a string with a unit (`"64KiB"`).
pub(crate) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Size;
    impl de::Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size: a number of bytes or a string such as \"64KiB\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("a size cannot be negative, got {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Size).map(Some)
}

/// A required size, in the forms [`de_size`] takes.
pub(crate) fn de_size_req<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    de_size(d).map(|s| s.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Up {
        #[command(flatten)]
        args: UpArgs,
    }

    #[derive(Parser)]
    struct Node {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn up_flags(flags: &[&str]) -> UpArgs {
        Up::try_parse_from(std::iter::once("up").chain(flags.iter().copied())).expect("flags parse").args
    }

    fn node_flags(flags: &[&str]) -> NodeArgs {
        Node::try_parse_from(std::iter::once("node").chain(flags.iter().copied())).expect("flags parse").args
    }

    fn file(text: &str, cmd: Command) -> FileConfig {
        FileConfig::parse(text, Path::new("test.toml"), cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    fn file_err(text: &str, cmd: Command) -> String {
        match FileConfig::parse(text, Path::new("test.toml"), cmd) {
            Ok(f) => panic!("accepted {text:?}: {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    const FULL_FILE: &str = r#"
        cores = 3
        poll = "busy"
        net = "epoll"
        port = 9000
        core_port_base = 9100
        dram_gb = 0.0625
        block_size = "16KiB"
        node_id = "from-file"
        heartbeat_ms = 250
        pin = false
        cpu_offset = 1
        spin_us = 7
        max_conns_per_core = 12
        max_body = 131072
        flash = "/tmp/f.flash:1GiB"
        sqpoll = true
        data_dir = "file-data"
        ctl_port = 9070
    "#;

    #[test]
    fn dpdk_args_split_like_a_shell() {
        let args = |a: &str| {
            up_flags(&["--dpdk-args", a]).merge(&FileConfig::default()).map(|s| s.node.dpdk.eal_args)
        };
        assert_eq!(args("-l 2-3  -a 0000:03:00.0").unwrap(), ["-l", "2-3", "-a", "0000:03:00.0"]);
        assert_eq!(
            args(r#"--vdev "net_pcap0,iface=eth 1" --file-prefix='a b'"#).unwrap(),
            ["--vdev", "net_pcap0,iface=eth 1", "--file-prefix=a b"]
        );
        let e = args(r#"--vdev "net_tap0"#).unwrap_err().to_string();
        assert!(e.contains("--dpdk-args") && e.contains("unbalanced"), "{e}");
        let from_file = file("dpdk_args = \"-l 1 --vdev 'x y'\"", Command::Up);
        assert_eq!(up_flags(&[]).merge(&from_file).unwrap().node.dpdk.eal_args, ["-l", "1", "--vdev", "x y"]);
    }

    #[test]
    fn defaults_when_neither_flag_nor_file() {
        let s = up_flags(&[]).merge(&FileConfig::default()).unwrap();
        let base = NodeConfig::default();
        let n = &s.node;
        assert_eq!((n.port, n.core_port_base, n.cores), (7400, 7401, base.cores));
        assert_eq!((n.poll_mode, n.net), (PollMode::Adaptive, NetBackend::Uring));
        assert_eq!((n.dram_bytes_per_core, n.block_size), (256 << 20, 64 << 10));
        assert_eq!((n.pin, n.cpu_offset, n.spin_us), (true, 0, 100));
        assert_eq!((n.max_conns_per_core, n.max_body), (4096, 1 << 20));
        assert_eq!(n.node_id, "node-0");
        assert_eq!(n.listen, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!((s.heartbeat, s.missed_heartbeats), (Duration::from_millis(1000), 3));
        assert_eq!((s.data_dir, s.ctl_port), (PathBuf::from("pollen-data"), 7070));
        assert_eq!((&n.flash, &n.disk, n.sqpoll), (&None, &None, false), "tiers are off by default");

        let s = node_flags(&[]).merge(&FileConfig::default()).unwrap();
        assert_eq!(s.controller, "http://127.0.0.1:7070");
        assert_eq!(s.node.listen, DEFAULT_NODE_IP);
    }

    /// The defaults `--help` and FILE_HELP print are the node's.
    #[test]
    fn documented_defaults_match_the_node() {
        let base = NodeConfig::default();
        assert_eq!(gb_to_bytes(DEFAULT_DRAM_GB), Ok(base.dram_bytes_per_core));
        assert_eq!((base.port, base.block_size, base.node_id.as_str()), (7400, 64 << 10, "node-0"));
        assert_eq!((base.spin_us, base.max_conns_per_core, base.max_body), (100, 4096, 1 << 20));
        assert_eq!((base.pin, base.cpu_offset), (true, 0));
        assert_eq!((base.poll_mode, base.net), (PollMode::Adaptive, NetBackend::Uring));
        assert!(FILE_HELP.contains("dram_gb = 0.25") && FILE_HELP.contains("block_size = \"64KiB\""));
    }

    #[test]
    fn file_values_apply_when_flags_are_absent() {
        let s = up_flags(&[]).merge(&file(FULL_FILE, Command::Up)).unwrap();
        let n = &s.node;
        assert_eq!((n.port, n.core_port_base, n.cores), (9000, 9100, 3));
        assert_eq!((n.poll_mode, n.net), (PollMode::Busy, NetBackend::Epoll));
        assert_eq!((n.dram_bytes_per_core, n.block_size), (64 << 20, 16 << 10));
        assert_eq!((n.pin, n.cpu_offset, n.spin_us), (false, 1, 7));
        assert_eq!((n.max_conns_per_core, n.max_body), (12, 128 << 10));
        assert_eq!(n.node_id, "from-file");
        assert_eq!(s.heartbeat, Duration::from_millis(250));
        assert_eq!((s.data_dir, s.ctl_port), (PathBuf::from("file-data"), 9070));
        let flash = TierSpec { path: PathBuf::from("/tmp/f.flash"), size: Some(1 << 30) };
        assert_eq!((&n.flash, &n.disk, n.sqpoll), (&Some(flash), &None, true));
    }

    #[test]
    fn reformat_tiers_from_the_flags_or_the_file() {
        let mode = |flags: &[&str], text: &str| {
            node_flags(flags).merge(&file(text, Command::Node)).map(|s| s.node.reformat_tiers)
        };
        assert_eq!(mode(&[], "").unwrap(), Reformat::Never);
        assert_eq!(mode(&["--reformat-tiers"], "").unwrap(), Reformat::KeepPersist);
        assert_eq!(mode(&[], "reformat_tiers = true").unwrap(), Reformat::KeepPersist);
        assert_eq!(mode(&["--reformat-tiers", "--discard-persist"], "").unwrap(), Reformat::DiscardPersist);
        let both = "reformat_tiers = true\ndiscard_persist = true";
        assert_eq!(mode(&[], both).unwrap(), Reformat::DiscardPersist);
        assert_eq!(mode(&["--discard-persist"], "reformat_tiers = true").unwrap(), Reformat::DiscardPersist);
        let e = mode(&["--discard-persist"], "").unwrap_err();
        assert!(format!("{e:#}").contains("--reformat-tiers"), "{e:#}");
        let e = mode(&[], "discard_persist = true").unwrap_err();
        assert!(format!("{e:#}").contains("reformat_tiers = true"), "{e:#}");
    }

    #[test]
    fn cluster_secret_from_the_flag_or_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (good, short) = (dir.path().join("secret"), dir.path().join("short"));
        std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::write(&short, "tiny\n").unwrap();
        let in_file = format!("cluster_secret_file = {:?}", good.display().to_string());
        let s = node_flags(&[]).merge(&file(&in_file, Command::Node)).unwrap();
        assert!(s.node.cluster_secret.is_some());
        let flag = ["--cluster-secret-file", short.to_str().unwrap()];
        let e = node_flags(&flag).merge(&file(&in_file, Command::Node)).unwrap_err();
        assert!(
            format!("{e:#}").contains("at least 16"),
            "the flag wins, and a short secret is refused: {e:#}"
        );
        let missing = ["--cluster-secret-file", "/nonexistent/secret"];
        assert!(node_flags(&missing).merge(&FileConfig::default()).is_err());
    }

    #[test]
    fn tier_specs() {
        let spec = |s| parse_tier_arg(s);
        assert_eq!(spec("/a/b:64GiB"), Ok(TierSpec { path: "/a/b".into(), size: Some(64 << 30) }));
        assert_eq!(spec("/a/b:4G"), Ok(TierSpec { path: "/a/b".into(), size: Some(4 << 30) }));
        assert_eq!(spec("/dev/nvme0n1"), Ok(TierSpec { path: "/dev/nvme0n1".into(), size: None }));
        assert_eq!(spec("/odd:name"), Ok(TierSpec { path: "/odd:name".into(), size: None }));
        assert!(spec(":4G").is_err() && spec("").is_err());
        let s = up_flags(&["--flash", "/x:1MiB", "--disk", "/y", "--sqpoll"])
            .merge(&file("flash = \"/z:2MiB\"\nsqpoll = false", Command::Up))
            .unwrap();
        assert_eq!(s.node.flash, Some(TierSpec { path: "/x".into(), size: Some(1 << 20) }), "the flag wins");
        assert_eq!(s.node.disk, Some(TierSpec { path: "/y".into(), size: None }));
        assert!(s.node.sqpoll);
        let err = file_err("flash = \":1G\"", Command::Node);
        assert!(err.contains("line 1") && err.contains("no path"), "{err}");
    }

    #[test]
    fn flags_given_beat_the_file() {
        let flags = up_flags(&[
            "--cores",
            "2",
            "--poll",
            "adaptive",
            "--net",
            "uring",
            "--port",
            "0",
            "--core-port-base",
            "0",
            "--dram-gb",
            "0.5",
            "--block-size",
            "1MiB",
            "--node-id",
            "from-flag",
            "--heartbeat-ms",
            "40",
            "--pin",
            "--cpu-offset",
            "0",
            "--spin-us",
            "0",
            "--max-conns",
            "3",
            "--max-body",
            "2MiB",
            "--data-dir",
            "flag-data",
            "--ctl-port",
            "0",
            "--missed-heartbeats",
            "10",
        ]);
        let s = flags.merge(&file(FULL_FILE, Command::Up)).unwrap();
        let n = &s.node;
        assert_eq!((n.port, n.core_port_base, n.cores), (0, 0, 2));
        assert_eq!((n.poll_mode, n.net), (PollMode::Adaptive, NetBackend::Uring));
        assert_eq!((n.dram_bytes_per_core, n.block_size), (512 << 20, 1 << 20));
        assert_eq!((n.pin, n.cpu_offset, n.spin_us), (true, 0, 0));
        assert_eq!((n.max_conns_per_core, n.max_body), (3, 2 << 20));
        assert_eq!(n.node_id, "from-flag");
        assert_eq!((s.heartbeat, s.missed_heartbeats), (Duration::from_millis(40), 10));
        assert_eq!((s.data_dir, s.ctl_port), (PathBuf::from("flag-data"), 0));
    }

    #[test]
    fn flags_and_file_mix_key_by_key() {
        let f = file("dram_gb = 1\nport = 0\npin = true", Command::Up);
        let s = up_flags(&["--block-size", "16KiB", "--no-pin"]).merge(&f).unwrap();
        assert_eq!((s.node.dram_bytes_per_core, s.node.block_size), (1 << 30, 16 << 10));
        // A port of 0 from the file also makes the core ports free ones.
        assert_eq!((s.node.port, s.node.core_port_base), (0, 0));
        assert!(!s.node.pin);
        // The default core port base follows the merged port.
        let s = up_flags(&["--port", "8000"]).merge(&file("port = 0", Command::Up)).unwrap();
        assert_eq!((s.node.port, s.node.core_port_base), (8000, 8001));
        // The last of --pin / --no-pin wins.
        assert!(!up_flags(&["--pin", "--no-pin"]).merge(&FileConfig::default()).unwrap().node.pin);
        assert!(up_flags(&["--no-pin", "--pin"]).merge(&file("pin = false", Command::Up)).unwrap().node.pin);
    }

    #[test]
    fn node_keys_merge_for_pollen_node() {
        let f = file("ip = \"0.0.0.0\"\ncontroller = \"10.0.0.1:7070\"\nnode_id = \"n1\"", Command::Node);
        let s = node_flags(&[]).merge(&f).unwrap();
        assert_eq!(s.node.listen, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!((s.controller.as_str(), s.node.node_id.as_str()), ("http://10.0.0.1:7070", "n1"));
        let s = node_flags(&["--ip", "127.0.0.2", "--controller", "http://c:1"]).merge(&f).unwrap();
        assert_eq!((s.node.listen.to_string(), s.controller.as_str()), ("127.0.0.2".into(), "http://c:1"));
    }

    #[test]
    fn role_comes_from_the_flag_or_the_file_and_is_both_by_default() {
        assert_eq!(node_flags(&[]).merge(&FileConfig::default()).unwrap().node.role, Role::Both);
        let f = file("role = \"metadata\"", Command::Node);
        assert_eq!(node_flags(&[]).merge(&f).unwrap().node.role, Role::Metadata);
        assert_eq!(node_flags(&["--role", "storage"]).merge(&f).unwrap().node.role, Role::Storage);
        assert!(file_err("role = \"archive\"", Command::Node).contains("unknown variant"));
        assert!(file_err("role = \"storage\"", Command::Up).contains("pollen node"));
    }

    #[test]
    fn node_number_comes_from_the_flag_or_the_file_and_is_unset_by_default() {
        assert_eq!(node_flags(&[]).merge(&FileConfig::default()).unwrap().node.node_number, None);
        let f = file("node_number = 12", Command::Node);
        assert_eq!(node_flags(&[]).merge(&f).unwrap().node.node_number, Some(12));
        assert_eq!(node_flags(&["--node-number", "65535"]).merge(&f).unwrap().node.node_number, Some(65535));
        assert!(file_err("node_number = 65536", Command::Node).contains("line 1"));
    }

    #[test]
    fn dram_gb_takes_decimals_and_integers() {
        assert_eq!(up_flags(&["--dram-gb", "0.0625"]).node.dram_gb, Some(0.0625));
        assert_eq!(file("dram_gb = 4", Command::Up).dram_gb, Some(4.0));
        assert_eq!(gb_to_bytes(0.0625), Ok(64 << 20));
        assert_eq!(gb_to_bytes(4.0), Ok(4 << 30));
        // Rounded down to whole bytes.
        assert_eq!(gb_to_bytes(0.1), Ok(107_374_182));
    }

    #[test]
    fn bad_dram_gb_flags_are_refused() {
        for (bad, why) in [
            ("0", "greater than 0"),
            ("-1", "greater than 0"),
            ("inf", "finite"),
            ("NaN", "finite"),
            ("lots", "not a number of GiB"),
            ("256MiB", "not a number of GiB"),
            ("1e300", "too large"),
        ] {
            let err = Up::try_parse_from(["up", "--dram-gb", bad]).err().unwrap_or_else(|| panic!("{bad}"));
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        let err = Up::try_parse_from(["up", "--dram-mb", "64"]).err().expect("--dram-mb is gone");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = file_err("port = 0\ndram_mb = 64\n", Command::Up);
        assert!(err.contains("test.toml, line 2, column 1"), "{err}");
        assert!(err.contains("unknown field `dram_mb`"), "{err}");
        // Keys of the other command are refused too, saying whose they are.
        let err = file_err("cores = 1\n\ncontroller = \"http://x:1\"", Command::Up);
        assert!(err.contains("line 3") && err.contains("`controller` is a `pollen node` setting"), "{err}");
        let err = file_err("ctl_port = 1", Command::Node);
        assert!(err.contains("line 1") && err.contains("`ctl_port` is a `pollen up` setting"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_their_line() {
        for (text, why) in [
            ("dram_gb = 0", "greater than 0"),
            ("dram_gb = -0.5", "greater than 0"),
            ("dram_gb = nan", "finite"),
            ("dram_gb = \"1GiB\"", "invalid type"),
            ("block_size = \"lots\"", "expected a whole number"),
            ("block_size = -4096", "cannot be negative"),
            ("block_size = 1.5", "a size"),
            ("max_body = \"1XB\"", "unknown unit"),
            ("poll = \"sometimes\"", "unknown variant `sometimes`"),
            ("net = \"rdma\"", "unknown variant `rdma`"),
            ("port = 70000", "u16"),
            ("cores = -1", "invalid value"),
            ("heartbeat_ms = 0", "at least 1"),
            ("pin = \"yes\"", "invalid type"),
            ("ip = \"localhost\"", "invalid IP address"),
            ("node_id = \"unterminated", "line 2"),
        ] {
            let text = format!("# a comment\n{text}\n");
            let err = file_err(&text, Command::Node);
            assert!(err.contains("line 2"), "{text}: {err}");
            assert!(err.contains(why), "{text}: {err}");
        }
        let err = file_err("port = 1\nport = 2\n", Command::Up);
        assert!(err.contains("line 2") && err.contains("duplicate key"), "{err}");
        // Values only the node can judge fail at the merge, naming the problem.
        let err = up_flags(&[]).merge(&file("block_size = \"3MiB\"", Command::Up)).unwrap_err();
        assert!(format!("{err:#}").contains("power of two"), "{err:#}");
        let err = up_flags(&[]).merge(&file("dram_gb = 0.000001", Command::Up)).unwrap_err();
        assert!(format!("{err:#}").contains("holds no block"), "{err:#}");
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let flags = up_flags(&["--config", "/nonexistent/pollen.toml"]);
        let err = flags.settings().unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("reading the config file /nonexistent/pollen.toml"), "{msg}");
    }

    #[test]
    fn settings_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pollen.toml");
        std::fs::write(&path, "port = 0\ndram_gb = 0.0625\nblock_size = \"16KiB\"\n").unwrap();
        let s = up_flags(&["--config", path.to_str().unwrap()]).settings().unwrap();
        assert_eq!((s.node.port, s.node.dram_bytes_per_core, s.node.block_size), (0, 64 << 20, 16 << 10));
    }

    /// docs/pollen.example.toml parses for both commands and spells out the defaults.
    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/pollen.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let f = FileConfig::parse(&text, &path, Command::Up).unwrap_or_else(|e| panic!("{e}"));
        FileConfig::parse(&text, &path, Command::Node).unwrap_or_else(|e| panic!("{e}"));
        let from_file = up_flags(&[]).merge(&f).unwrap();
        let defaults = up_flags(&[]).merge(&FileConfig::default()).unwrap();
        let key = |s: &UpSettings| {
            let n = &s.node;
            (n.port, n.core_port_base, n.dram_bytes_per_core, n.block_size, n.node_id.clone(), n.pin)
        };
        assert_eq!(key(&from_file), key(&defaults));
        assert_eq!(
            (from_file.node.spin_us, from_file.node.max_conns_per_core, from_file.node.max_body),
            (defaults.node.spin_us, defaults.node.max_conns_per_core, defaults.node.max_body)
        );
        assert_eq!(from_file.heartbeat, defaults.heartbeat);
    }
}
