//! The command line of the `weir` binary: the clap argument definitions, the exit codes, and
//! the dispatch of the commands that do not talk to the agent (`weir config check`, the exit
//! status of `weir teardown`). `main.rs` only dispatches; the definitions live here so that
//! the tests and the man page generator (xtask's `docs`) use them.
//!
//! The commands that talk to the agent (`status`, `service`, `backend`, `stats`, `reload`,
//! `conn`) run through [`run_client`] (in [`client`]), which writes to the given streams and
//! returns the exit status, so the tests drive exactly what the binary runs; [`render`]
//! formats the agent's answers.

pub mod client;
pub mod render;

#[cfg(test)]
mod fixtures;

pub use client::{Streams, run_client};

use std::ffi::OsString;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, ConfigError, MAX_WEIGHT, XdpMode};
use crate::decap::{self, MssSetting, OuterFamily};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: any other error (a change that conflicts with the agent's state, a failure
/// inside the agent, I/O, a datapath that cannot be attached or torn down).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status `EX_USAGE` (sysexits.h): bad command line or invalid config file.
pub const EX_USAGE: u8 = 64;
/// Exit status `EX_DATAERR` (sysexits.h): an invalid IP address, either an `ADDR` argument
/// that does not parse or an address the agent rejected (`invalid_address`).
pub const EX_DATAERR: u8 = 65;
/// Exit status `EX_NOUSER` (sysexits.h): the agent has no such service or backend
/// (`unknown_service`, `unknown_backend`).
pub const EX_NOUSER: u8 = 67;
/// Exit status `EX_UNAVAILABLE` (sysexits.h): the agent is not running (nothing listens on
/// the API socket).
pub const EX_UNAVAILABLE: u8 = 69;
/// Exit status `EX_NOPERM` (sysexits.h): permission denied (the API socket and the bpffs
/// are root-only).
pub const EX_NOPERM: u8 = 77;
/// Exit status `EX_CONFIG` (sysexits.h): `weir reload` found the config file invalid; the
/// agent keeps running with its previous config.
pub const EX_CONFIG: u8 = 78;

/// Environment variable naming the API socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "WEIR_SOCKET";

/// Weir: an XDP layer-4 load balancer.
///
/// `weir agent` balances the traffic of the configured virtual services over their
/// backends; `weir decap` runs on the backends and decapsulates the tunnelled packets.
/// `weir status`, `service`, `backend`, `stats`, `reload`, `conn` and `announce` talk to
/// the running agent over its management socket (`--socket`, default /run/weir/weir.sock
/// or $WEIR_SOCKET), `weir fleet check` to several agents;
/// `weir teardown` removes a datapath an agent left attached after it stopped, and the
/// SNAT ports it reserved.
///
/// Exit status:
///   0   success
///   1   any other error: a change that conflicts with the agent's state, a failure
///       inside the agent, I/O
///   64  bad command line or invalid config file (EX_USAGE)
///   65  invalid IP address (EX_DATAERR)
///   67  unknown service or backend (EX_NOUSER)
///   69  the agent is not running (EX_UNAVAILABLE)
///   77  permission denied: the API socket and the bpffs are root-only (EX_NOPERM)
///   78  `weir reload`: the config file is invalid; the agent keeps its running
///       config (EX_CONFIG)
#[derive(Debug, Parser)]
#[command(name = "weir", version, propagate_version = true, verbatim_doc_comment)]
pub struct Cli {
    /// Format of the log lines on stderr. The level is set with the RUST_LOG environment
    /// variable (e.g. `RUST_LOG=debug`, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer: attach the XDP program to the configured interface and keep
    /// its maps in sync with the config file until SIGINT or SIGTERM.
    ///
    /// The config file is validated before anything is touched; an invalid file exits
    /// with status 64.
    Agent(AgentArgs),

    /// Run on a backend: attach an XDP program that decapsulates tunnelled packets
    /// addressed to the given VIPs, so the backend sees the client's original packet.
    ///
    /// Also attaches a tc egress program (tcx) to the same interface that lowers the MSS
    /// option of SYN-ACKs sent from a VIP to what fits through the tunnel, so TCP clients
    /// never send a segment that no longer fits once encapsulated (see --mss,
    /// --outer-family, --no-mss-clamp). The number of SYN-ACKs clamped is logged every
    /// minute when it moved, and at exit.
    Decap(DecapArgs),

    /// Work with config files without touching the network.
    #[command(subcommand)]
    Config(ConfigCommand),

    /// The commands that talk to the running agent over its API socket.
    #[command(flatten)]
    Client(ClientCommand),

    /// Detach the XDP program an agent left attached and remove its pins.
    ///
    /// The agent pins its XDP link and maps under the bpffs directory so that a restarted
    /// agent takes over without dropping flows. Use this to take the load balancer out of
    /// the path for good after stopping the agent. Works locally (not through the API
    /// socket); needs root.
    Teardown(TeardownArgs),

    /// Read the agent's audit log: one JSON line per change to the running state (API and
    /// CLI changes, reloads, health transitions, teardown, refusals of the remote API).
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// Subcommands of `weir audit`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the last lines of the audit log, and with --follow every line appended after
    /// them (across rotations) until Ctrl-C.
    Tail(AuditTailArgs),
}

/// Options of `weir audit tail`.
#[derive(Debug, Args)]
pub struct AuditTailArgs {
    /// How many of the last lines to print.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 20)]
    pub lines: usize,

    /// Keep printing lines as they are appended.
    #[arg(short, long)]
    pub follow: bool,

    /// The audit log (`[agent] audit_log`).
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_AUDIT_LOG, conflicts_with = "config")]
    pub file: PathBuf,

    /// Read the audit log's path from this config file instead.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Options of `weir agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The TOML config file (see config/example.toml).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Options of `weir decap`.
#[derive(Debug, Args)]
pub struct DecapArgs {
    /// The interface the tunnelled packets arrive on.
    #[arg(short, long, value_name = "IF", value_parser = parse_interface)]
    pub interface: String,

    /// A VIP whose tunnelled packets are decapsulated; repeat for several VIPs (IPv4 or
    /// IPv6). The VIP must also be configured on the backend (e.g. on lo).
    #[arg(long = "vip", value_name = "ADDR", required = true, value_parser = parse_vip)]
    pub vips: Vec<IpAddr>,

    /// How to attach the XDP program: native (driver) mode if available, else generic
    /// (`auto`); driver mode only (`native`); or generic SKB mode (`generic`).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,

    /// Lower the MSS option of SYN-ACKs sent from a VIP to this value (IPv4 and IPv6
    /// alike) instead of the one computed from the interface's MTU. Minimum 88.
    #[arg(
        long,
        value_name = "BYTES",
        value_parser = clap::value_parser!(u16).range(i64::from(decap::MIN_MSS)..),
        conflicts_with_all = ["no_mss_clamp", "outer_family"]
    )]
    pub mss: Option<u16>,

    /// Leave SYN-ACKs alone: no MSS clamp on the interface's egress.
    #[arg(long)]
    pub no_mss_clamp: bool,

    /// The family of the tunnel's outer header, i.e. of this backend's address at the
    /// balancer, for the computed MSS clamp: interface MTU − outer header (v4: 20, v6: 40)
    /// − IP and TCP headers (IPv4: 40, IPv6: 60). The default assumes the larger IPv6
    /// header, which is safe for both; with 1500-byte MTUs IPv4 clients then get 1420
    /// (1440 with `v4`) and IPv6 clients 1400 (1420 with `v4`).
    #[arg(
        long,
        value_enum,
        value_name = "FAMILY",
        default_value_t = OuterFamily::V6,
        conflicts_with = "no_mss_clamp"
    )]
    pub outer_family: OuterFamily,
}

impl DecapArgs {
    /// The MSS clamp the options ask for.
    #[must_use]
    pub fn mss_setting(&self) -> MssSetting {
        match (self.no_mss_clamp, self.mss) {
            (true, _) => MssSetting::Off,
            (false, Some(mss)) => MssSetting::Fixed(mss),
            (false, None) => MssSetting::FromMtu(self.outer_family),
        }
    }
}

/// Subcommands of `weir config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate a config file. Prints `FILE: OK (N services, M backends)` and
    /// exits 0, or prints `FILE: KEY: REASON` to stderr and exits 64.
    Check {
        /// The TOML config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Options of `weir teardown`.
#[derive(Debug, Args)]
pub struct TeardownArgs {
    /// The bpffs directory where the agent pinned its XDP link and maps (`[agent] bpffs`
    /// in its config).
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,

    /// The agent's state file (`[agent] state_file`): beside it, `reserved-ports.json`
    /// records the SNAT ports the agent added to net.ipv4.ip_local_reserved_ports, which
    /// teardown removes again (only those) in the network namespace it runs in.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// The audit log to record the teardown in (`[agent] audit_log`). Written only when
    /// its directory exists; a failure to write it is reported, not fatal.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_AUDIT_LOG)]
    pub audit_log: PathBuf,
}

/// The commands that talk to the running agent.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Show the running agent: version, interface, config file, uptime, how many services
    /// and backends it serves and how the last reload went.
    Status(ClientOpts),

    /// List the virtual services, or dump the lookup ring of one.
    Service(ServiceArgs),

    /// List the backends and change them at run time: add, remove, set the weight,
    /// drain, enable, disable.
    ///
    /// Each change prints one line saying what changed, e.g.
    /// `web 198.51.100.11: weight 1 -> 3`.
    Backend(BackendArgs),

    /// Show the traffic counters: the datapath's global counters by name, then packets,
    /// bytes and new flows per service and per backend.
    Stats(StatsArgs),

    /// Make the agent re-read its config file and apply the differences.
    ///
    /// An invalid file is rejected with its `FILE: KEY: REASON` message and exit status
    /// 78; the agent keeps running with its previous config.
    Reload(ClientOpts),

    /// List or flush the connections of `forwarding = "nat"` services: the pairs of the
    /// NAT table, each a client's tuple, the VIP it asked for and the backend it was
    /// translated to.
    Conn(ConnArgs),

    /// Withdraw this balancer's VIPs from BGP before maintenance, or announce them again
    /// (`[announce]`; `weir status` shows what is announced and since when).
    Announce(AnnounceArgs),

    /// Compare several agents: `weir fleet check SOCKET SOCKET...` names every service whose
    /// ring differs between them.
    Fleet(FleetArgs),
}

/// `weir announce ...`.
#[derive(Debug, Args)]
pub struct AnnounceArgs {
    #[command(flatten)]
    pub opts: ClientOpts,

    /// What to do.
    #[command(subcommand)]
    pub command: AnnounceCommand,
}

/// Subcommands of `weir announce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum AnnounceCommand {
    /// Withdraw every VIP of this balancer: their routes leave the [announce] table, BIRD
    /// withdraws them, and the routers send the flows to the other balancers (which pick
    /// the same backends). The datapath keeps forwarding whatever still arrives. Kept in
    /// the state file, across restarts, until `weir announce resume`.
    Withdraw,

    /// Announce again every VIP that has a backend taking new flows.
    Resume,
}

/// `weir fleet ...`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub opts: ClientOpts,

    /// What to do.
    #[command(subcommand)]
    pub command: FleetCommand,
}

/// Subcommands of `weir fleet`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum FleetCommand {
    /// Ask each agent for its services' ring fingerprints (`weir service list`) and
    /// compare them by service name. Prints one line per service; exits 1 and names the
    /// services whose rings differ (or that some agent lacks), 0 when all agree.
    ///
    /// Balancers behind one ECMP group must agree: a flow that moves to another balancer
    /// finds no connection-table entry there and is sent by the ring alone.
    Check {
        /// The agents' API sockets (at least two; `--socket` is not used here).
        #[arg(value_name = "SOCKET", num_args = 2.., required = true)]
        sockets: Vec<PathBuf>,
    },
}

/// Options of every command that talks to the agent.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The agent's API socket (`[agent] api_socket` in its config). Default: the
    /// WEIR_SOCKET environment variable if set, else /run/weir/weir.sock.
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

    /// Talk to a remote agent's HTTPS API (`[api] listen`) instead of the local socket:
    /// `https://HOST[:PORT]` (default port 9443). Needs --token-file.
    #[arg(
        long,
        value_name = "URL",
        global = true,
        requires = "token_file",
        conflicts_with = "socket"
    )]
    pub server: Option<String>,

    /// The file holding the bearer token for --server (its text; a trailing newline is
    /// ignored). The agent knows only its SHA-256 (`[[api.token]] sha256`).
    #[arg(long, value_name = "FILE", global = true, requires = "server")]
    pub token_file: Option<PathBuf>,

    /// The CA certificates (PEM) to trust for --server, e.g. the agent's own self-signed
    /// certificate. Default: the system bundle /etc/ssl/certs/ca-certificates.crt.
    #[arg(long, value_name = "FILE", global = true, requires = "server")]
    pub ca_file: Option<PathBuf>,

    /// Output format: aligned tables for people (`table`), or the `data` of the agent's
    /// answer as pretty-printed JSON for scripts (`json`).
    #[arg(
        short,
        long,
        value_enum,
        value_name = "FORMAT",
        default_value_t = OutputFormat::Table,
        global = true
    )]
    pub output: OutputFormat,
}

impl ClientOpts {
    /// The socket to connect to: `--socket`, else `$WEIR_SOCKET`, else the default.
    pub fn socket_path(&self) -> PathBuf {
        resolve_socket(self.socket.as_deref(), std::env::var_os(SOCKET_ENV))
    }

    /// The remote agent of `--server`, with the token read from `--token-file`; `None`
    /// for the local socket.
    pub fn remote(&self) -> Result<Option<crate::api::RemoteTarget>, String> {
        let Some(url) = &self.server else {
            return Ok(None);
        };
        let Some(file) = &self.token_file else {
            return Err("--server needs --token-file".to_owned());
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("reading the token file {}: {e}", file.display()))?;
        let token = text.trim_end_matches(['\n', '\r']).to_owned();
        if token.is_empty() || token.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!(
                "the token file {} must hold one token: printable, no spaces",
                file.display()
            ));
        }
        Ok(Some(crate::api::RemoteTarget {
            url: url.clone(),
            token,
            ca_file: self
                .ca_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::api::client::SYSTEM_CA_BUNDLE)),
        }))
    }
}

/// `--socket` if given, else a non-empty `env` (the value of `WEIR_SOCKET`), else
/// [`config::DEFAULT_API_SOCKET`].
pub fn resolve_socket(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    match (flag, env) {
        (Some(path), _) => path.to_owned(),
        (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
        (None, _) => PathBuf::from(config::DEFAULT_API_SOCKET),
    }
}

/// How client commands print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Aligned tables.
    #[default]
    Table,
    /// The `data` of the agent's answer, pretty-printed.
    Json,
}

/// `weir service ...`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub opts: ClientOpts,

    /// What to do.
    #[command(subcommand)]
    pub command: ServiceCommand,
}

/// Subcommands of `weir service`.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// List the services: VIP and port, protocol, scheduler, forwarding method, ring size,
    /// health check, and how many backends they have and how many are up.
    List,

    /// Dump the lookup ring of a service: how many slots each backend holds and its share
    /// of new flows, then every slot as `SLOT  BACKEND` (one line per slot; `-` marks a
    /// slot with no backend).
    Table {
        /// The service's name.
        #[arg(value_name = "SERVICE")]
        service: String,

        /// Print only the slot count and share of each backend, not every slot (with
        /// `-o json`: leave out the `slots` array).
        #[arg(long)]
        summary: bool,
    },
}

/// `weir backend ...`.
#[derive(Debug, Args)]
pub struct BackendArgs {
    #[command(flatten)]
    pub opts: ClientOpts,

    /// What to do.
    #[command(subcommand)]
    pub command: BackendCommand,
}

/// Subcommands of `weir backend`.
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// List the backends of every service, or of one: weight, admin state (enabled,
    /// draining, disabled), health (up, down, unchecked), whether the datapath honours
    /// its tracked flows, ring slots, and its packets, bytes and new flows.
    List {
        /// Only the backends of this service.
        #[arg(value_name = "SERVICE")]
        service: Option<String>,
    },

    /// Add a backend to a service. It takes new flows as soon as it is healthy.
    Add {
        #[command(flatten)]
        target: BackendTarget,

        /// Its weight: its share of new flows relative to the other backends
        /// (0..=65535; 0 means no new flows).
        #[arg(
            long,
            value_name = "N",
            default_value_t = 1,
            value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_WEIGHT))
        )]
        weight: u32,
    },

    /// Remove a backend from a service. Its new and tracked flows move to the other
    /// backends.
    Remove(BackendTarget),

    /// Set the weight of a backend: its share of new flows relative to the other backends.
    Weight {
        #[command(flatten)]
        target: BackendTarget,

        /// The new weight (0..=65535; 0 means no new flows, tracked flows stay).
        #[arg(
            value_name = "N",
            value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_WEIGHT))
        )]
        weight: u32,
    },

    /// Set a backend's connection limit: at this many active connections it takes no new
    /// flow (they go to another backend with room, a backup, or are refused).
    MaxConns {
        #[command(flatten)]
        target: BackendTarget,

        /// The new limit (0..=67108864; 0 means no limit).
        #[arg(
            value_name = "N",
            value_parser = clap::value_parser!(u32).range(0..=i64::from(config::MAX_CONNTRACK_ENTRIES))
        )]
        max_connections: u32,
    },

    /// Drain a backend: no new flows, but the flows it already serves stay with it (for a
    /// graceful shutdown). Undo with `weir backend enable`.
    Drain(BackendTarget),

    /// Enable a drained or disabled backend: it takes new flows again (when healthy).
    Enable(BackendTarget),

    /// Disable a backend: no new flows, and the flows it serves move to the other
    /// backends at their next packet. Undo with `weir backend enable`.
    Disable(BackendTarget),
}

/// The backend a change applies to.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct BackendTarget {
    /// The service's name.
    #[arg(value_name = "SERVICE")]
    pub service: String,

    /// The backend's IP address (IPv4 or IPv6). An invalid address exits with status 65.
    #[arg(value_name = "ADDR", value_parser = parse_address)]
    pub address: IpAddr,
}

/// Options of `weir stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub opts: ClientOpts,

    /// Refresh every `--interval` until Ctrl-C, with per-second rates computed from
    /// consecutive snapshots. On a terminal the screen is redrawn; otherwise snapshots
    /// follow each other (with `-o json`: one JSON document per line).
    #[arg(short, long)]
    pub watch: bool,

    /// Seconds between two snapshots with `--watch` (0.1..=3600, decimals allowed).
    #[arg(
        short = 'n',
        long,
        value_name = "SECS",
        default_value = "1",
        value_parser = parse_interval,
        requires = "watch"
    )]
    pub interval: Duration,
}

/// `weir conn ...`.
#[derive(Debug, Args)]
pub struct ConnArgs {
    #[command(flatten)]
    pub opts: ClientOpts,

    /// What to do.
    #[command(subcommand)]
    pub command: ConnCommand,
}

/// Which connections a `weir conn` command is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct ConnFilterArgs {
    /// Only the connections of this service.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,

    /// Only the connections to this backend (its IP address). An invalid address exits
    /// with status 65.
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    pub backend: Option<IpAddr>,
}

/// Subcommands of `weir conn`.
#[derive(Debug, Subcommand)]
pub enum ConnCommand {
    /// List the NAT connections: protocol, client, VIP, backend, service, TCP state (UDP:
    /// replied or unreplied), seconds since the last packet and until the connection
    /// expires. Sorted by service, backend and client; at most `--limit`, with the total.
    List {
        #[command(flatten)]
        filter: ConnFilterArgs,

        /// Only the connections in this state: syn-sent, syn-recv, established, fin-wait,
        /// time-wait, close (TCP), unreplied, replied (UDP).
        #[arg(long, value_name = "STATE", value_parser = parse_conn_state)]
        state: Option<crate::api::ConnState>,

        /// Show at most this many connections (1..=100000); the total is always given.
        #[arg(
            long,
            value_name = "N",
            default_value_t = crate::api::CONN_LIST_DEFAULT_LIMIT,
            value_parser = clap::value_parser!(u32)
                .range(1..=i64::from(crate::api::CONN_LIST_MAX_LIMIT))
        )]
        limit: u32,
    },

    /// Delete NAT connections (both entries of each pair) of a service or a backend, or
    /// every one with `--all`. Without `--yes` it only says how many would go and exits 1.
    ///
    /// A flushed connection's next packet finds no pair: a TCP segment that is not a SYN is
    /// picked up by the scheduler as a new connection (counted as untracked mid-flow),
    /// which the backend it lands on resets unless it is the one that held it; a UDP
    /// datagram makes a new pair.
    Flush {
        #[command(flatten)]
        filter: ConnFilterArgs,

        /// Every NAT connection of every service.
        #[arg(long, conflicts_with_all = ["service", "backend"])]
        all: bool,

        /// Really delete them.
        #[arg(long)]
        yes: bool,
    },
}

impl ClientCommand {
    /// The options shared by all client commands.
    pub fn opts(&self) -> &ClientOpts {
        match self {
            Self::Status(opts) | Self::Reload(opts) => opts,
            Self::Service(args) => &args.opts,
            Self::Backend(args) => &args.opts,
            Self::Stats(args) => &args.opts,
            Self::Conn(args) => &args.opts,
            Self::Announce(args) => &args.opts,
            Self::Fleet(args) => &args.opts,
        }
    }
}

impl BackendCommand {
    /// The backend a change applies to (`None` for `list`).
    pub fn target(&self) -> Option<&BackendTarget> {
        match self {
            Self::List { .. } => None,
            Self::Add { target, .. }
            | Self::Weight { target, .. }
            | Self::MaxConns { target, .. }
            | Self::Remove(target)
            | Self::Drain(target)
            | Self::Enable(target)
            | Self::Disable(target) => Some(target),
        }
    }
}

/// Format of the log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The exit status for a command line clap rejected: 0 for `--help` and `--version`,
/// [`EX_DATAERR`] for an `ADDR` argument that is not an IP address, [`EX_USAGE`]
/// otherwise (including a bare `weir`, which prints the help to stderr).
pub fn usage_exit_code(err: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => EXIT_OK,
        ErrorKind::ValueValidation if is_invalid_address(err) => EX_DATAERR,
        _ => EX_USAGE,
    }
}

fn is_invalid_address(err: &clap::Error) -> bool {
    std::error::Error::source(err).is_some_and(|source| source.is::<InvalidAddress>())
}

/// The exit status for a failed `weir teardown`: [`EX_NOPERM`] when the cause is a denied
/// permission, [`EXIT_FAILURE`] otherwise.
/// `weir audit tail`: the last `args.lines` lines to `out`, then with `--follow` every new
/// line (polling every 200 ms; a rotation, seen as another file at the path, is followed
/// from its start). Returns only on an error or, without `--follow`, when done.
pub fn audit_tail(args: &AuditTailArgs, out: &mut dyn io::Write) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::{Read as _, Seek as _};
    use std::os::unix::fs::MetadataExt as _;
    let path = match &args.config {
        Some(file) => config::load(file)?.agent.audit_log,
        None => args.file.clone(),
    };
    let (lines, mut offset) = crate::audit::tail(&path, args.lines)
        .with_context(|| format!("reading {}", path.display()))?;
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    let identity = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut current = identity(&path);
    let mut pending = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = identity(&path);
        if now.is_none() {
            continue;
        }
        if now != current {
            // Rotated: the new file is read from its start.
            current = now;
            offset = 0;
            pending.clear();
        }
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let len = file.metadata()?.len();
        if len < offset {
            offset = 0;
        }
        if len == offset {
            continue;
        }
        file.seek(io::SeekFrom::Start(offset))?;
        let mut chunk = Vec::new();
        file.take(len - offset).read_to_end(&mut chunk)?;
        offset = len;
        pending.extend_from_slice(&chunk);
        // Whole lines only: a line being written is printed once complete.
        if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
            out.write_all(&pending[..=end])?;
            out.flush()?;
            pending.drain(..=end);
        }
    }
}

/// The audit record of a `weir teardown` (written by the CLI itself, the agent being gone):
/// to `audit_log` if its directory exists. Returns a warning to print when it could not.
pub fn audit_teardown(
    audit_log: &Path,
    bpffs: &Path,
    result: &anyhow::Result<()>,
) -> Option<String> {
    use crate::audit::{Outcome, Record, Who};
    if !audit_log.parent().is_some_and(Path::is_dir) {
        return None;
    }
    let mut record = Record::new(
        Who::this_process(),
        "teardown",
        if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Error
        },
    )
    .target(bpffs.display().to_string());
    if let Err(err) = result {
        record.error = Some(format!("{err:#}"));
    }
    crate::audit::append_now(audit_log, &record)
        .err()
        .map(|err| format!("warning: the teardown is not in the audit log: {err:#}"))
}

pub fn teardown_exit_code(err: &anyhow::Error) -> u8 {
    let denied = err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    });
    if denied { EX_NOPERM } else { EXIT_FAILURE }
}

/// `weir config check`: loads and validates `file`, returning the line to print on success.
pub fn config_check(file: &Path) -> Result<String, ConfigError> {
    let config = config::load(file)?;
    Ok(render::check_summary(file, &config))
}

fn parse_interface(text: &str) -> Result<String, String> {
    config::rules::check_interface_name(text).map(|()| text.to_owned())
}

fn parse_vip(text: &str) -> Result<IpAddr, String> {
    let addr = text
        .parse::<IpAddr>()
        .map_err(|_| format!("invalid IP address \"{text}\""))?;
    config::rules::check_vip(addr).map(|()| addr)
}

/// Why an `ADDR` argument was rejected; [`usage_exit_code`] recognises it by its type.
#[derive(Debug, thiserror::Error)]
#[error("not an IPv4 or IPv6 address")]
pub struct InvalidAddress;

fn parse_address(text: &str) -> Result<IpAddr, InvalidAddress> {
    text.parse().map_err(|_| InvalidAddress)
}

/// A connection state by its wire name (`weir conn list --state`).
fn parse_conn_state(text: &str) -> Result<crate::api::ConnState, String> {
    crate::api::ConnState::ALL
        .into_iter()
        .find(|s| s.as_str() == text)
        .ok_or_else(|| {
            let names: Vec<&str> = crate::api::ConnState::ALL
                .iter()
                .map(|s| s.as_str())
                .collect();
            format!("\"{text}\" is not a state (one of {})", names.join(", "))
        })
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("\"{text}\" is not a number of seconds"))?;
    if (0.1..=3600.0).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("{text} is out of range (0.1..=3600 seconds)"))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{client, ip, parse};
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_args() {
        let cli = parse(&["agent", "--config", "/etc/weir/weir.toml"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Text);
        let Command::Agent(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.config, Path::new("/etc/weir/weir.toml"));

        let cli = parse(&["agent", "-c", "w.toml", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = parse(&["--log-format", "json", "agent", "-c", "w.toml"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
    }

    #[test]
    fn agent_without_config_is_a_usage_error() {
        let err = parse(&["agent"]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn decap_args() {
        let cli = parse(&[
            "decap",
            "--interface",
            "eth1",
            "--vip",
            "198.51.100.10",
            "--vip",
            "2001:db8::10",
        ])
        .unwrap();
        let Command::Decap(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.interface, "eth1");
        assert_eq!(args.vips, [ip("198.51.100.10"), ip("2001:db8::10")]);
        assert_eq!(args.xdp_mode, XdpMode::Auto);

        let cli = parse(&[
            "decap",
            "-i",
            "eth1",
            "--vip",
            "198.51.100.10",
            "--xdp-mode",
            "generic",
        ])
        .unwrap();
        let Command::Decap(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.xdp_mode, XdpMode::Generic);
    }

    #[test]
    fn decap_mss_clamp_args() {
        let decap = |extra: &[&str]| {
            let mut args = vec!["decap", "-i", "eth1", "--vip", "198.51.100.10"];
            args.extend_from_slice(extra);
            parse(&args).map(|cli| match cli.command {
                Command::Decap(args) => args.mss_setting(),
                other => panic!("{other:?}"),
            })
        };
        // On by default, assuming the larger (IPv6) outer header.
        assert_eq!(decap(&[]).unwrap(), MssSetting::FromMtu(OuterFamily::V6));
        assert_eq!(
            decap(&["--outer-family", "v4"]).unwrap(),
            MssSetting::FromMtu(OuterFamily::V4)
        );
        assert_eq!(decap(&["--mss", "1400"]).unwrap(), MssSetting::Fixed(1400));
        assert_eq!(decap(&["--mss", "88"]).unwrap(), MssSetting::Fixed(88));
        assert_eq!(decap(&["--no-mss-clamp"]).unwrap(), MssSetting::Off);
        for bad in [
            &["--mss", "87"][..],
            &["--mss", "0"],
            &["--mss", "65536"],
            &["--mss", "x"],
            &["--mss", "1400", "--no-mss-clamp"],
            &["--mss", "1400", "--outer-family", "v4"],
            &["--no-mss-clamp", "--outer-family", "v6"],
            &["--outer-family", "v5"],
        ] {
            let err = decap(bad).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{bad:?}: {err}");
        }
    }

    #[test]
    fn decap_rejects_bad_input() {
        for args in [
            &["decap", "--interface", "eth1"][..],
            &["decap", "--interface", "eth1", "--vip", "198.51.100.x"],
            &["decap", "--interface", "eth1", "--vip", "0.0.0.0"],
            &["decap", "--interface", "eth1", "--vip", "ff02::1"],
            &["decap", "--interface", "", "--vip", "198.51.100.10"],
            &[
                "decap",
                "-i",
                "eth1",
                "--vip",
                "198.51.100.10",
                "--xdp-mode",
                "offload",
            ],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}: {err}");
        }
    }

    #[test]
    fn config_check_args() {
        let cli = parse(&["config", "check", "weir.toml"]).unwrap();
        let Command::Config(ConfigCommand::Check { file }) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(file, Path::new("weir.toml"));
        let err = parse(&["config", "check"]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn help_and_version_exit_zero() {
        for args in [
            &["--help"][..],
            &["-h"],
            &["--version"],
            &["agent", "--help"],
            &["backend", "add", "--help"],
            &["stats", "-h"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EXIT_OK, "{args:?}: {}", err.kind());
        }
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        for line in [
            "64  bad command line",
            "65  invalid IP address",
            "67  unknown service or backend",
            "69  the agent is not running",
            "77  permission denied",
            "78  `weir reload`",
        ] {
            assert!(help.contains(line), "{line:?} missing from:\n{help}");
        }
    }

    #[test]
    fn bare_weir_is_a_usage_error() {
        let err = parse(&[]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn unknown_subcommand_and_flag_are_usage_errors() {
        for args in [
            &["balance"][..],
            &["agent", "--config", "w.toml", "--bogus"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}");
        }
    }

    #[test]
    fn config_check_of_the_example() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/example.toml"
        ));
        let line = config_check(path).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            line,
            format!("{}: OK (3 services, 7 backends)", path.display())
        );
    }

    #[test]
    fn config_check_of_a_missing_file() {
        let err = config_check(Path::new("/nonexistent/weir.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/weir.toml: "),
            "{err}"
        );
    }

    // ----- parsing of the client commands -----

    #[test]
    fn status_and_reload_args() {
        let command = client(&["status"]);
        let ClientCommand::Status(opts) = &command else {
            panic!("{command:?}")
        };
        assert_eq!(opts.socket, None);
        assert_eq!(opts.output, OutputFormat::Table);

        let command = client(&["status", "--socket", "/tmp/w.sock", "-o", "json"]);
        assert_eq!(
            command.opts().socket.as_deref(),
            Some(Path::new("/tmp/w.sock"))
        );
        assert_eq!(command.opts().output, OutputFormat::Json);

        let command = client(&["reload", "--output", "json"]);
        assert!(matches!(command, ClientCommand::Reload(_)));
        assert_eq!(command.opts().output, OutputFormat::Json);

        let err = parse(&["status", "-o", "yaml"]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn service_args() {
        let command = client(&["service", "list"]);
        assert!(matches!(
            command,
            ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::List,
                ..
            })
        ));
        // The client options go before or after the subcommand.
        for args in [
            &["service", "-o", "json", "table", "web"][..],
            &["service", "table", "web", "-o", "json"],
        ] {
            let command = client(args);
            let ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::Table { service, summary },
                opts,
            }) = &command
            else {
                panic!("{command:?}")
            };
            assert_eq!(service, "web");
            assert!(!summary);
            assert_eq!(opts.output, OutputFormat::Json, "{args:?}");
        }
        let command = client(&["service", "table", "web", "--summary"]);
        assert!(matches!(
            command,
            ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::Table { summary: true, .. },
                ..
            })
        ));
        for args in [&["service"][..], &["service", "table"]] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}");
        }
    }

    #[test]
    fn invalid_backend_address_exits_65() {
        for args in [
            &["backend", "add", "web", "198.51.100.x"][..],
            &["backend", "add", "web", "web2", "--weight", "3"],
            &["backend", "remove", "web", "::g"],
            &["backend", "weight", "web", "300.1.1.1", "3"],
            &["backend", "drain", "web", ""],
            &["backend", "enable", "web", "198.51.100.11/32"],
            &["backend", "disable", "web", "localhost"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_DATAERR, "{args:?}: {err}");
            assert!(
                err.to_string().contains("not an IPv4 or IPv6 address"),
                "{err}"
            );
        }
    }

    #[test]
    fn other_bad_backend_args_are_usage_errors() {
        for args in [
            &["backend", "add", "web"][..],
            &[
                "backend",
                "add",
                "web",
                "198.51.100.11",
                "--weight",
                "65536",
            ],
            &["backend", "add", "web", "198.51.100.11", "--weight", "-1"],
            &["backend", "weight", "web", "198.51.100.11"],
            &["backend", "weight", "web", "198.51.100.11", "heavy"],
            &["backend", "drain"],
            &["backend", "list", "web", "extra"],
            &["backend", "frobnicate", "web", "198.51.100.11"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}: {err}");
        }
    }

    #[test]
    fn stats_args() {
        let ClientCommand::Stats(args) = client(&["stats"]) else {
            panic!()
        };
        assert!(!args.watch);
        assert_eq!(args.interval, Duration::from_secs(1));
        let ClientCommand::Stats(args) = client(&["stats", "--watch", "--interval", "0.5"]) else {
            panic!()
        };
        assert!(args.watch);
        assert_eq!(args.interval, Duration::from_millis(500));
        let ClientCommand::Stats(args) = client(&["stats", "-w", "-n", "2", "-o", "json"]) else {
            panic!()
        };
        assert_eq!(args.interval, Duration::from_secs(2));
        assert_eq!(args.opts.output, OutputFormat::Json);
        for args in [
            &["stats", "--interval", "2"][..],
            &["stats", "-w", "-n", "0"],
            &["stats", "-w", "-n", "soon"],
            &["stats", "-w", "-n", "NaN"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}: {err}");
        }
    }

    #[test]
    fn teardown_args() {
        let cli = parse(&["teardown"]).unwrap();
        let Command::Teardown(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.bpffs, Path::new("/sys/fs/bpf/weir"));
        assert_eq!(args.state_file, Path::new("/var/lib/weir/state.json"));
        let cli = parse(&[
            "teardown",
            "--bpffs",
            "/sys/fs/bpf/lab",
            "--state-file",
            "/tmp/lab/state.json",
        ])
        .unwrap();
        let Command::Teardown(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.bpffs, Path::new("/sys/fs/bpf/lab"));
        assert_eq!(args.state_file, Path::new("/tmp/lab/state.json"));
        // Not a client command: no socket.
        assert!(parse(&["teardown", "--socket", "/x.sock"]).is_err());
    }

    #[test]
    fn socket_resolution() {
        let default = PathBuf::from("/run/weir/weir.sock");
        assert_eq!(resolve_socket(None, None), default);
        assert_eq!(resolve_socket(None, Some(OsString::new())), default);
        assert_eq!(
            resolve_socket(None, Some("/tmp/env.sock".into())),
            Path::new("/tmp/env.sock")
        );
        assert_eq!(
            resolve_socket(
                Some(Path::new("/tmp/flag.sock")),
                Some("/tmp/env.sock".into())
            ),
            Path::new("/tmp/flag.sock")
        );
    }

    #[test]
    fn teardown_exit_codes() {
        let denied = anyhow::Error::new(io::Error::from(io::ErrorKind::PermissionDenied))
            .context("removing /sys/fs/bpf/weir/link");
        assert_eq!(teardown_exit_code(&denied), EX_NOPERM);
        assert_eq!(
            teardown_exit_code(&anyhow::anyhow!("no XDP program")),
            EXIT_FAILURE
        );
    }
}
