//! The command line of the `weir` binary (clap derive) and the client side of the
//! management API. `main.rs` only dispatches; the definitions live here so that tests (and
//! later the man page generator) can use them.
//!
//! The client commands (`status`, `service`, `backend`, `stats`, `reload`) run through
//! [`run_client`], which writes to the given streams and returns the exit status, so the
//! tests drive exactly what the binary runs.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use crate::api::{
    self, ApiError, BackendInfo, ClientError, ErrorCode, ReloadReport, Request, ServiceInfo,
    ServiceTable, Stats, Status, TrafficStats,
};
use crate::config::{self, Config, ConfigError, MAX_WEIGHT, XdpMode};

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
/// `weir status`, `service`, `backend`, `stats` and `reload` talk to the running agent
/// over its management socket (`--socket`, default /run/weir/weir.sock or $WEIR_SOCKET);
/// `weir teardown` removes a datapath an agent left attached after it stopped.
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
}

/// Options of every command that talks to the agent.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The agent's API socket (`[agent] api_socket` in its config). Default: the
    /// WEIR_SOCKET environment variable if set, else /run/weir/weir.sock.
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

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

impl ClientCommand {
    /// The options shared by all client commands.
    pub fn opts(&self) -> &ClientOpts {
        match self {
            Self::Status(opts) | Self::Reload(opts) => opts,
            Self::Service(args) => &args.opts,
            Self::Backend(args) => &args.opts,
            Self::Stats(args) => &args.opts,
        }
    }

    /// The service the command names, for hints in error messages.
    fn service(&self) -> Option<&str> {
        match self {
            Self::Service(ServiceArgs {
                command: ServiceCommand::Table { service, .. },
                ..
            })
            | Self::Backend(BackendArgs {
                command:
                    BackendCommand::List {
                        service: Some(service),
                    },
                ..
            }) => Some(service),
            Self::Backend(BackendArgs { command, .. }) => {
                command.target().map(|t| t.service.as_str())
            }
            _ => None,
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
            | Self::Remove(target)
            | Self::Drain(target)
            | Self::Enable(target)
            | Self::Disable(target) => Some(target),
        }
    }

    /// The API request that performs this command.
    pub fn request(&self) -> Request {
        let parts = |t: &BackendTarget| (t.service.clone(), t.address);
        match self {
            Self::List { service } => Request::BackendList {
                service: service.clone(),
            },
            Self::Add { target, weight } => {
                let (service, address) = parts(target);
                Request::BackendAdd {
                    service,
                    address,
                    weight: *weight,
                }
            }
            Self::Remove(target) => {
                let (service, address) = parts(target);
                Request::BackendRemove { service, address }
            }
            Self::Weight { target, weight } => {
                let (service, address) = parts(target);
                Request::BackendWeight {
                    service,
                    address,
                    weight: *weight,
                }
            }
            Self::Drain(target) => {
                let (service, address) = parts(target);
                Request::BackendDrain { service, address }
            }
            Self::Enable(target) => {
                let (service, address) = parts(target);
                Request::BackendEnable { service, address }
            }
            Self::Disable(target) => {
                let (service, address) = parts(target);
                Request::BackendDisable { service, address }
            }
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

/// The exit status for an error the agent answered with.
pub fn api_exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::InvalidAddress => EX_DATAERR,
        ErrorCode::UnknownService | ErrorCode::UnknownBackend => EX_NOUSER,
        ErrorCode::InvalidConfig => EX_CONFIG,
        ErrorCode::BadRequest | ErrorCode::Conflict | ErrorCode::Internal => EXIT_FAILURE,
    }
}

/// The exit status for a failure to get an answer from the agent.
pub fn client_exit_code(err: &ClientError) -> u8 {
    match err {
        ClientError::NotRunning(_) => EX_UNAVAILABLE,
        ClientError::PermissionDenied(_) => EX_NOPERM,
        ClientError::Io { .. } | ClientError::BadResponse(_) => EXIT_FAILURE,
    }
}

/// The exit status for a failed `weir teardown`: [`EX_NOPERM`] when the cause is a denied
/// permission, [`EXIT_FAILURE`] otherwise.
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
    Ok(check_summary(file, &config))
}

/// `FILE: OK (N services, M backends)`.
pub fn check_summary(file: &Path, config: &Config) -> String {
    let services = config.services.len();
    let backends = config.backend_count();
    format!(
        "{}: OK ({services} service{}, {backends} backend{})",
        file.display(),
        plural(services),
        plural(backends)
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
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

// ----- running the client commands -----

/// Where a client command writes: its results to `out`, its errors to `err`. `terminal`
/// says whether `out` is a terminal (`weir stats --watch` then redraws the screen).
pub struct Streams<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    pub terminal: bool,
}

/// Runs a client command against the agent and returns its exit status. Results go to
/// `streams.out`; an error goes to `streams.err` as one `error: ...` line that says what
/// to do. `weir stats --watch` returns only on an error.
pub fn run_client(command: &ClientCommand, streams: &mut Streams<'_>) -> u8 {
    run_client_frames(command, streams, None)
}

/// [`run_client`], with `weir stats --watch` stopping after `frames` snapshots if given.
fn run_client_frames(
    command: &ClientCommand,
    streams: &mut Streams<'_>,
    frames: Option<u64>,
) -> u8 {
    let mut client = Client {
        socket: command.opts().socket_path(),
        output: command.opts().output,
        out: &mut *streams.out,
        terminal: streams.terminal,
    };
    let result = client
        .run(command, frames)
        .and_then(|()| streams.out.flush().map_err(Failure::Output));
    match result {
        Ok(()) => EXIT_OK,
        // The reader went away (`weir service table web | head`): not worth a word.
        Err(Failure::Output(err)) if err.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(failure) => {
            // Whatever was printed goes out before the error, in order.
            let _ = streams.out.flush();
            let _ = writeln!(streams.err, "error: {}", failure.message(command));
            let _ = streams.err.flush();
            failure.exit_code()
        }
    }
}

/// Why a client command failed.
#[derive(Debug)]
enum Failure {
    /// No answer from the agent (or one that makes no sense).
    Client(ClientError),
    /// The agent refused.
    Api(ApiError),
    /// Writing the results failed.
    Output(io::Error),
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Self::Output(err)
    }
}

impl Failure {
    fn bad_response(what: impl std::fmt::Display) -> Self {
        Self::Client(ClientError::BadResponse(what.to_string()))
    }

    fn exit_code(&self) -> u8 {
        match self {
            Self::Client(err) => client_exit_code(err),
            Self::Api(err) => api_exit_code(err.code),
            Self::Output(_) => EXIT_FAILURE,
        }
    }

    /// The error line after `error: `.
    fn message(&self, command: &ClientCommand) -> String {
        match self {
            Self::Client(err) => err.to_string(),
            Self::Output(err) => format!("writing the output: {err}"),
            Self::Api(ApiError { code, message }) => {
                let hint = match code {
                    ErrorCode::UnknownService => Some("see `weir service list`".to_owned()),
                    ErrorCode::UnknownBackend => Some(match command.service() {
                        Some(service) => format!("see `weir backend list {service}`"),
                        None => "see `weir backend list`".to_owned(),
                    }),
                    ErrorCode::InvalidConfig => Some(
                        "the agent keeps its running config; fix the file, check it with \
                         `weir config check FILE`, then run `weir reload` again"
                            .to_owned(),
                    ),
                    ErrorCode::BadRequest => Some(
                        "the agent did not understand the request; is it the same version \
                         as this CLI? (see `weir status`)"
                            .to_owned(),
                    ),
                    ErrorCode::Internal => Some("see the agent's log".to_owned()),
                    ErrorCode::InvalidAddress | ErrorCode::Conflict => None,
                };
                match hint {
                    // The agent's message may already say what to do.
                    Some(hint) if !message.contains("`weir ") => format!("{message} ({hint})"),
                    _ => message.clone(),
                }
            }
        }
    }
}

struct Client<'a> {
    socket: PathBuf,
    output: OutputFormat,
    out: &'a mut dyn Write,
    terminal: bool,
}

impl Client<'_> {
    /// Sends `request` and returns the `data` of a successful answer.
    fn call(&self, request: &Request) -> Result<serde_json::Value, Failure> {
        let response = api::request(&self.socket, request).map_err(Failure::Client)?;
        match (response.ok, response.error) {
            (true, _) => Ok(response.data),
            (false, Some(error)) => Err(Failure::Api(error)),
            (false, None) => Err(Failure::bad_response("not ok, but no error given")),
        }
    }

    fn json(&mut self, data: &serde_json::Value) -> Result<(), Failure> {
        serde_json::to_writer_pretty(&mut *self.out, data).map_err(io::Error::from)?;
        writeln!(self.out)?;
        Ok(())
    }

    fn run(&mut self, command: &ClientCommand, frames: Option<u64>) -> Result<(), Failure> {
        match command {
            ClientCommand::Status(_) => {
                let data = self.call(&Request::Status {})?;
                if self.output == OutputFormat::Json {
                    return self.json(&data);
                }
                let status: Status = decode(&data)?;
                render_status(&status, unix_now(), self.out)?;
            }
            ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::List,
                ..
            }) => {
                let data = self.call(&Request::ServiceList {})?;
                if self.output == OutputFormat::Json {
                    return self.json(&data);
                }
                let services: Vec<ServiceInfo> = decode(&data)?;
                render_services(&services, self.out)?;
            }
            ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::Table { service, summary },
                ..
            }) => {
                let mut data = self.call(&Request::ServiceTable {
                    service: service.clone(),
                })?;
                if self.output == OutputFormat::Json {
                    if *summary && let Some(object) = data.as_object_mut() {
                        object.remove("slots");
                    }
                    return self.json(&data);
                }
                let table: ServiceTable = decode(&data)?;
                check_service_table(&table).map_err(Failure::bad_response)?;
                render_table_summary(&table, self.out)?;
                if !summary {
                    writeln!(self.out)?;
                    render_table_slots(&table, self.out)?;
                }
            }
            ClientCommand::Backend(BackendArgs { command, .. }) => self.backend(command)?,
            ClientCommand::Stats(args) => {
                if args.watch {
                    self.stats_watch(args.interval, frames)?;
                } else {
                    let data = self.call(&Request::Stats {})?;
                    if self.output == OutputFormat::Json {
                        return self.json(&data);
                    }
                    let stats: Stats = decode(&data)?;
                    render_stats(&stats, self.out)?;
                }
            }
            ClientCommand::Reload(_) => {
                let data = self.call(&Request::Reload {})?;
                if self.output == OutputFormat::Json {
                    return self.json(&data);
                }
                let report: ReloadReport = decode(&data)?;
                writeln!(self.out, "{}", reload_line(&report))?;
            }
        }
        Ok(())
    }

    fn backend(&mut self, command: &BackendCommand) -> Result<(), Failure> {
        let request = command.request();
        if let BackendCommand::List { .. } = command {
            let data = self.call(&request)?;
            if self.output == OutputFormat::Json {
                return self.json(&data);
            }
            let backends: Vec<BackendInfo> = decode(&data)?;
            return render_backends(&backends, self.out).map_err(Failure::from);
        }
        // Changes report the state before and after; the answer holds only the after.
        let before = match command {
            BackendCommand::Weight { target, .. }
            | BackendCommand::Drain(target)
            | BackendCommand::Enable(target)
            | BackendCommand::Disable(target)
                if self.output == OutputFormat::Table =>
            {
                self.lookup(target)
            }
            _ => None,
        };
        let data = self.call(&request)?;
        if self.output == OutputFormat::Json {
            return self.json(&data);
        }
        let after: Option<BackendInfo> = decode(&data).ok();
        writeln!(
            self.out,
            "{}",
            change_line(command, before.as_ref(), after.as_ref())
        )?;
        Ok(())
    }

    /// The current state of a backend, if the agent tells (errors surface in the change).
    fn lookup(&self, target: &BackendTarget) -> Option<BackendInfo> {
        let data = self
            .call(&Request::BackendList {
                service: Some(target.service.clone()),
            })
            .ok()?;
        let backends: Vec<BackendInfo> = decode(&data).ok()?;
        backends
            .into_iter()
            .find(|b| b.service == target.service && b.address == target.address)
    }

    fn stats_watch(&mut self, interval: Duration, frames: Option<u64>) -> Result<(), Failure> {
        let mut previous: Option<(Stats, Instant)> = None;
        let mut next = Instant::now();
        let mut shown = 0_u64;
        loop {
            let data = self.call(&Request::Stats {})?;
            let taken = Instant::now();
            if self.output == OutputFormat::Json {
                serde_json::to_writer(&mut *self.out, &data).map_err(io::Error::from)?;
                writeln!(self.out)?;
            } else {
                let stats: Stats = decode(&data)?;
                if self.terminal {
                    // Cursor home, clear the screen.
                    write!(self.out, "\x1b[H\x1b[2J")?;
                } else if shown > 0 {
                    writeln!(self.out)?;
                }
                writeln!(
                    self.out,
                    "weir stats every {}s at {} UTC (Ctrl-C to stop)\n",
                    interval.as_secs_f64(),
                    time_of_day(unix_now())
                )?;
                let rates = previous
                    .as_ref()
                    .map(|(stats, at)| (stats, taken.duration_since(*at).as_secs_f64()));
                render_stats_with_rates(&stats, rates, self.out)?;
                previous = Some((stats, taken));
            }
            self.out.flush()?;
            shown += 1;
            if frames.is_some_and(|frames| shown >= frames) {
                return Ok(());
            }
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                // Fell behind (a slow agent): start counting again from now.
                next = now;
            }
        }
    }
}

fn decode<T: DeserializeOwned>(data: &serde_json::Value) -> Result<T, Failure> {
    T::deserialize(data).map_err(|err| Failure::bad_response(format!("{err}: {data}")))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `HH:MM:SS` of a Unix time, in UTC.
fn time_of_day(unix: u64) -> String {
    let secs = unix % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// `3d 4h 5m 6s`, from the largest non-zero unit down to seconds.
pub fn human_duration(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m")];
    let mut text = String::new();
    let mut rest = secs;
    for (size, unit) in units {
        if rest >= size || !text.is_empty() {
            text.push_str(&format!("{}{unit} ", rest / size));
            rest %= size;
        }
    }
    text.push_str(&format!("{rest}s"));
    text
}

// ----- rendering -----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table with a header line; columns are separated by two spaces and padded to their
/// widest cell, text to the left and numbers to the right.
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, ((cell, width), (_, align))) in
                row.iter().zip(&widths).zip(&self.columns).enumerate()
            {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(width - cell.chars().count());
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// `198.51.100.10:80`, `[2001:db8::10]:443`, or `...:*` for a service on every port.
fn listener(vip: IpAddr, port: u16) -> String {
    match port {
        0 => match vip {
            IpAddr::V4(v4) => format!("{v4}:*"),
            IpAddr::V6(v6) => format!("[{v6}]:*"),
        },
        port => SocketAddr::new(vip, port).to_string(),
    }
}

/// `weir status`: one `key  value` line per fact.
pub fn render_status(status: &Status, now: u64, out: &mut dyn Write) -> io::Result<()> {
    let last_reload = match &status.last_reload {
        None => "none since the agent started".to_owned(),
        Some(reload) => {
            let ago = human_duration(now.saturating_sub(reload.at));
            match (&reload.ok, &reload.error) {
                (true, _) => format!("ok, {ago} ago"),
                (false, Some(error)) => format!("FAILED {ago} ago: {error}"),
                (false, None) => format!("FAILED {ago} ago"),
            }
        }
    };
    let adopted = if status.adopted {
        " (datapath adopted from an earlier agent)"
    } else {
        ""
    };
    let lines = [
        (
            "agent",
            format!(
                "weir {}, pid {}, up {}",
                status.version,
                status.pid,
                human_duration(status.uptime_seconds)
            ),
        ),
        (
            "interface",
            format!("{} (XDP {} mode)", status.interface, status.xdp_mode),
        ),
        ("config", status.config_file.clone()),
        ("bpffs", format!("{}{adopted}", status.bpffs)),
        ("services", status.services.to_string()),
        (
            "backends",
            format!("{} ({} up)", status.backends, status.backends_up),
        ),
        ("last reload", last_reload),
    ];
    let width = lines.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    for (key, value) in lines {
        writeln!(out, "{key:<width$}  {value}")?;
    }
    if let Some(problem) = &status.inconsistent {
        writeln!(
            out,
            "{:<width$}  INCONSISTENT: {problem}; `weir reload` re-applies the config",
            "datapath"
        )?;
    }
    Ok(())
}

/// `weir service list`.
pub fn render_services(services: &[ServiceInfo], out: &mut dyn Write) -> io::Result<()> {
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("SERVICE", Left),
        ("LISTENER", Left),
        ("PROTO", Left),
        ("SCHEDULER", Left),
        ("FORWARDING", Left),
        ("RING", Right),
        ("HEALTH CHECK", Left),
        ("BACKENDS", Right),
        ("UP", Right),
    ]);
    for s in services {
        table.row(vec![
            s.name.clone(),
            listener(s.vip, s.port),
            s.protocol.clone(),
            s.scheduler.clone(),
            s.forwarding.clone(),
            s.ring_size.to_string(),
            s.health_check.clone(),
            s.backends.to_string(),
            s.backends_up.to_string(),
        ]);
    }
    table.write(out)
}

/// `weir backend list`.
pub fn render_backends(backends: &[BackendInfo], out: &mut dyn Write) -> io::Result<()> {
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("SERVICE", Left),
        ("BACKEND", Left),
        ("WEIGHT", Right),
        ("EFFECTIVE", Right),
        ("ADMIN", Left),
        ("HEALTH", Left),
        ("UP", Left),
        ("CONNS", Right),
        ("SLOTS", Right),
        ("PACKETS", Right),
        ("BYTES", Right),
        ("NEW FLOWS", Right),
    ]);
    for b in backends {
        table.row(vec![
            b.service.clone(),
            b.address.to_string(),
            if b.backup {
                format!("{} (backup)", b.weight)
            } else {
                b.weight.to_string()
            },
            b.effective_weight.to_string(),
            b.admin.clone(),
            b.health.clone(),
            yes_no(b.up),
            b.active_connections.to_string(),
            b.slots.to_string(),
            b.packets.to_string(),
            b.bytes.to_string(),
            b.new_flows.to_string(),
        ]);
    }
    table.write(out)
}

/// Checks that the slots of a ring name backends of its list.
fn check_service_table(table: &ServiceTable) -> Result<(), String> {
    if table.counts.len() != table.backends.len() {
        return Err(format!(
            "service table of {:?}: {} backends but {} counts",
            table.service,
            table.backends.len(),
            table.counts.len()
        ));
    }
    let backends = table.backends.len();
    if let Some((slot, index)) = table
        .slots
        .iter()
        .enumerate()
        .find(|&(_, &index)| index < -1 || usize::try_from(index).is_ok_and(|i| i >= backends))
    {
        return Err(format!(
            "service table of {:?}: slot {slot} names backend {index} of {backends}",
            table.service
        ));
    }
    Ok(())
}

/// `weir service table SERVICE --summary`: each backend's slot count and share of the ring.
pub fn render_table_summary(table: &ServiceTable, out: &mut dyn Write) -> io::Result<()> {
    use Align::{Left, Right};
    writeln!(
        out,
        "{}: ring of {} slots, {} backend{}",
        table.service,
        table.ring_size,
        table.backends.len(),
        plural(table.backends.len())
    )?;
    let share = |count: u64| {
        if table.ring_size == 0 {
            "-".to_owned()
        } else {
            // Precision is no concern for a percentage with two decimals.
            let percent = count as f64 * 100.0 / f64::from(table.ring_size);
            format!("{percent:.2}%")
        }
    };
    let mut summary = Table::new(&[("BACKEND", Left), ("SLOTS", Right), ("SHARE", Right)]);
    for (address, &count) in table.backends.iter().zip(&table.counts) {
        summary.row(vec![
            address.to_string(),
            count.to_string(),
            share(u64::from(count)),
        ]);
    }
    let assigned: u64 = table.counts.iter().copied().map(u64::from).sum();
    let unassigned = u64::from(table.ring_size).saturating_sub(assigned);
    if unassigned > 0 {
        summary.row(vec![
            "(none)".to_owned(),
            unassigned.to_string(),
            share(unassigned),
        ]);
    }
    summary.write(out)
}

/// `weir service table SERVICE`: one `SLOT  BACKEND` line per slot, `-` for no backend.
/// The table must have passed [`check_service_table`].
pub fn render_table_slots(table: &ServiceTable, out: &mut dyn Write) -> io::Result<()> {
    let width = table
        .slots
        .len()
        .saturating_sub(1)
        .to_string()
        .len()
        .max("SLOT".len());
    writeln!(out, "{:>width$}  BACKEND", "SLOT")?;
    for (slot, &index) in table.slots.iter().enumerate() {
        match usize::try_from(index)
            .ok()
            .and_then(|i| table.backends.get(i))
        {
            Some(address) => writeln!(out, "{slot:>width$}  {address}")?,
            None => writeln!(out, "{slot:>width$}  -")?,
        }
    }
    Ok(())
}

/// Per-second rate of a counter between two snapshots `secs` apart; `-` without a previous
/// snapshot or when the counter went backwards (the agent restarted).
fn rate(now: u64, before: Option<u64>, secs: f64) -> String {
    match before {
        Some(before) if now >= before && secs > 0.0 => {
            let per_second = (now - before) as f64 / secs;
            format!("{per_second:.0}")
        }
        _ => "-".to_owned(),
    }
}

/// `weir stats`: the global counters, then per service and per backend traffic.
pub fn render_stats(stats: &Stats, out: &mut dyn Write) -> io::Result<()> {
    render_stats_frame(stats, false, None, out)
}

/// `weir stats --watch`: [`render_stats`] with a rate for every counter, computed from
/// `previous` (the last snapshot and the seconds since); `-` on the first frame.
pub fn render_stats_with_rates(
    stats: &Stats,
    previous: Option<(&Stats, f64)>,
    out: &mut dyn Write,
) -> io::Result<()> {
    render_stats_frame(stats, true, previous, out)
}

fn render_stats_frame(
    stats: &Stats,
    rates: bool,
    previous: Option<(&Stats, f64)>,
    out: &mut dyn Write,
) -> io::Result<()> {
    use Align::{Left, Right};
    let secs = previous.map_or(0.0, |(_, secs)| secs);

    let before_global: HashMap<&str, u64> = previous
        .map(|(p, _)| p.global.iter().map(|(n, v)| (n.as_str(), *v)).collect())
        .unwrap_or_default();
    let mut columns = vec![("COUNTER", Left), ("VALUE", Right)];
    if rates {
        columns.push(("PER SEC", Right));
    }
    let mut global = Table::new(&columns);
    for (name, value) in &stats.global {
        let mut row = vec![name.clone(), value.to_string()];
        if rates {
            row.push(rate(
                *value,
                before_global.get(name.as_str()).copied(),
                secs,
            ));
        }
        global.row(row);
    }
    global.write(out)?;

    type Key<'a> = (&'a str, Option<IpAddr>);
    let traffic = |rows: &[TrafficStats], before: Option<&[TrafficStats]>, backend: bool| {
        let before: HashMap<Key<'_>, &TrafficStats> = before
            .unwrap_or_default()
            .iter()
            .map(|t| ((t.service.as_str(), t.backend), t))
            .collect();
        let mut columns = vec![("SERVICE", Left)];
        if backend {
            columns.push(("BACKEND", Left));
        }
        if rates {
            columns.extend([
                ("PACKETS", Right),
                ("PKT/S", Right),
                ("BYTES", Right),
                ("BYTES/S", Right),
                ("NEW FLOWS", Right),
                ("FLOWS/S", Right),
            ]);
        } else {
            columns.extend([("PACKETS", Right), ("BYTES", Right), ("NEW FLOWS", Right)]);
        }
        let mut table = Table::new(&columns);
        for t in rows {
            let mut row = vec![t.service.clone()];
            if backend {
                row.push(t.backend.map_or_else(|| "-".to_owned(), |a| a.to_string()));
            }
            let old = before.get(&(t.service.as_str(), t.backend));
            for (value, old) in [
                (t.packets, old.map(|o| o.packets)),
                (t.bytes, old.map(|o| o.bytes)),
                (t.new_flows, old.map(|o| o.new_flows)),
            ] {
                row.push(value.to_string());
                if rates {
                    row.push(rate(value, old, secs));
                }
            }
            table.row(row);
        }
        table
    };
    writeln!(out)?;
    traffic(
        &stats.services,
        previous.map(|(p, _)| p.services.as_slice()),
        false,
    )
    .write(out)?;
    writeln!(out)?;
    traffic(
        &stats.backends,
        previous.map(|(p, _)| p.backends.as_slice()),
        true,
    )
    .write(out)
}

/// The confirmation of a backend change, e.g. `web 198.51.100.11: weight 1 -> 3`. `before`
/// is the backend's state before the change if known, `after` the agent's answer.
pub fn change_line(
    command: &BackendCommand,
    before: Option<&BackendInfo>,
    after: Option<&BackendInfo>,
) -> String {
    let Some(target) = command.target() else {
        return String::new();
    };
    let what = match command {
        BackendCommand::List { .. } => String::new(),
        BackendCommand::Add { weight, .. } => {
            format!("added with weight {}", after.map_or(*weight, |a| a.weight))
        }
        BackendCommand::Remove(_) => "removed".to_owned(),
        BackendCommand::Weight { weight, .. } => {
            let new = after.map_or(*weight, |a| a.weight);
            match before {
                Some(before) => format!("weight {} -> {new}", before.weight),
                None => format!("weight set to {new}"),
            }
        }
        BackendCommand::Drain(_) | BackendCommand::Enable(_) | BackendCommand::Disable(_) => {
            let (expected, note) = match command {
                BackendCommand::Drain(_) => ("draining", " (no new flows; tracked flows stay)"),
                BackendCommand::Disable(_) => (
                    "disabled",
                    " (no new flows; tracked flows move to other backends)",
                ),
                _ => ("enabled", ""),
            };
            let new = after.map_or(expected, |a| a.admin.as_str());
            match before {
                Some(before) => format!("admin {} -> {new}{note}", before.admin),
                None => format!("admin {new}{note}"),
            }
        }
    };
    format!("{} {}: {what}", target.service, target.address)
}

/// The confirmation of `weir reload`.
pub fn reload_line(report: &ReloadReport) -> String {
    format!(
        "reloaded: {} service{}; {} ring slot{} and {} backend{} rewritten",
        report.services,
        plural(report.services),
        report.ring_slots_written,
        plural(report.ring_slots_written),
        report.backends_written,
        plural(report.backends_written)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ReloadOutcome, Response};
    use clap::CommandFactory as _;
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("weir").chain(args.iter().copied()))
    }

    fn client(args: &[&str]) -> ClientCommand {
        match parse(args)
            .unwrap_or_else(|err| panic!("{args:?}: {err}"))
            .command
        {
            Command::Client(command) => command,
            other => panic!("{other:?}"),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

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
            format!("{}: OK (2 services, 5 backends)", path.display())
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

    fn backend(args: &[&str]) -> BackendCommand {
        match client(args) {
            ClientCommand::Backend(BackendArgs { command, .. }) => command,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backend_args() {
        let service = "web".to_owned();
        let address = ip("198.51.100.11");
        assert_eq!(
            backend(&["backend", "list"]).request(),
            Request::BackendList { service: None }
        );
        assert_eq!(
            backend(&["backend", "list", "web"]).request(),
            Request::BackendList {
                service: Some(service.clone())
            }
        );
        assert_eq!(
            backend(&["backend", "add", "web", "198.51.100.11"]).request(),
            Request::BackendAdd {
                service: service.clone(),
                address,
                weight: 1
            }
        );
        assert_eq!(
            backend(&["backend", "add", "web", "2001:db8::11", "--weight", "0"]).request(),
            Request::BackendAdd {
                service: service.clone(),
                address: ip("2001:db8::11"),
                weight: 0
            }
        );
        assert_eq!(
            backend(&["backend", "remove", "web", "198.51.100.11"]).request(),
            Request::BackendRemove {
                service: service.clone(),
                address
            }
        );
        assert_eq!(
            backend(&["backend", "weight", "web", "198.51.100.11", "65535"]).request(),
            Request::BackendWeight {
                service: service.clone(),
                address,
                weight: 65535
            }
        );
        assert_eq!(
            backend(&["backend", "drain", "web", "198.51.100.11"]).request(),
            Request::BackendDrain {
                service: service.clone(),
                address
            }
        );
        assert_eq!(
            backend(&["backend", "enable", "web", "198.51.100.11"]).request(),
            Request::BackendEnable {
                service: service.clone(),
                address
            }
        );
        assert_eq!(
            backend(&["backend", "disable", "web", "198.51.100.11"]).request(),
            Request::BackendDisable { service, address }
        );
        let command = client(&["backend", "--socket", "/x.sock", "drain", "web", "::1"]);
        assert_eq!(command.opts().socket.as_deref(), Some(Path::new("/x.sock")));
        assert_eq!(command.service(), Some("web"));
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
        let cli = parse(&["teardown", "--bpffs", "/sys/fs/bpf/lab"]).unwrap();
        let Command::Teardown(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.bpffs, Path::new("/sys/fs/bpf/lab"));
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

    // ----- exit codes -----

    #[test]
    fn api_error_exit_codes() {
        for (code, exit) in [
            (ErrorCode::BadRequest, EXIT_FAILURE),
            (ErrorCode::UnknownService, EX_NOUSER),
            (ErrorCode::UnknownBackend, EX_NOUSER),
            (ErrorCode::InvalidAddress, EX_DATAERR),
            (ErrorCode::Conflict, EXIT_FAILURE),
            (ErrorCode::InvalidConfig, EX_CONFIG),
            (ErrorCode::Internal, EXIT_FAILURE),
        ] {
            assert_eq!(api_exit_code(code), exit, "{code:?}");
        }
        assert_eq!(
            [
                EX_USAGE,
                EX_DATAERR,
                EX_NOUSER,
                EX_UNAVAILABLE,
                EX_NOPERM,
                EX_CONFIG
            ],
            [64, 65, 67, 69, 77, 78]
        );
    }

    #[test]
    fn client_error_exit_codes() {
        let path = "/run/weir/weir.sock".to_owned();
        for (err, exit) in [
            (ClientError::NotRunning(path.clone()), EX_UNAVAILABLE),
            (ClientError::PermissionDenied(path.clone()), EX_NOPERM),
            (
                ClientError::Io {
                    path,
                    source: io::Error::other("reset"),
                },
                EXIT_FAILURE,
            ),
            (ClientError::BadResponse("{".into()), EXIT_FAILURE),
        ] {
            assert_eq!(client_exit_code(&err), exit, "{err:?}");
        }
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

    // ----- rendering -----

    fn backend_info(service: &str, address: &str, weight: u32, admin: &str) -> BackendInfo {
        BackendInfo {
            service: service.into(),
            address: ip(address),
            weight,
            admin: admin.into(),
            health: "up".into(),
            up: true,
            slots: 21846,
            effective_weight: weight,
            backup: false,
            active_connections: 17,
            packets: 1_234_567,
            bytes: 987_654_321,
            new_flows: 4321,
        }
    }

    fn render(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn backend_table_is_aligned() {
        let mut backends = vec![
            backend_info("web", "198.51.100.11", 1, "enabled"),
            backend_info("web", "2001:db8::12", 100, "draining"),
            backend_info("dns-long-name", "203.0.113.5", 0, "disabled"),
        ];
        backends[1].health = "unchecked".into();
        backends[2].up = false;
        backends[2].slots = 0;
        backends[2].packets = 0;
        backends[2].bytes = 0;
        backends[2].new_flows = 0;
        let text = render(|out| render_backends(&backends, out));
        assert_eq!(
            text,
            "\
SERVICE        BACKEND        WEIGHT  EFFECTIVE  ADMIN     HEALTH     UP   CONNS  SLOTS  PACKETS      BYTES  NEW FLOWS
web            198.51.100.11       1          1  enabled   up         yes     17  21846  1234567  987654321       4321
web            2001:db8::12      100        100  draining  unchecked  yes     17  21846  1234567  987654321       4321
dns-long-name  203.0.113.5         0          0  disabled  up         no      17      0        0          0          0
"
        );
    }

    #[test]
    fn empty_backend_table_is_just_the_header() {
        let text = render(|out| render_backends(&[], out));
        assert_eq!(
            text,
            "SERVICE  BACKEND  WEIGHT  EFFECTIVE  ADMIN  HEALTH  UP  CONNS  SLOTS  PACKETS  BYTES  NEW FLOWS\n"
        );
    }

    fn sample_ring() -> ServiceTable {
        ServiceTable {
            service: "web".into(),
            ring_size: 7,
            backends: vec![ip("198.51.100.11"), ip("2001:db8::12")],
            counts: vec![4, 2],
            slots: vec![0, 1, 0, 0, -1, 1, 0],
        }
    }

    #[test]
    fn service_table_summary() {
        let table = sample_ring();
        check_service_table(&table).unwrap();
        let text = render(|out| render_table_summary(&table, out));
        assert_eq!(
            text,
            "\
web: ring of 7 slots, 2 backends
BACKEND        SLOTS   SHARE
198.51.100.11      4  57.14%
2001:db8::12       2  28.57%
(none)             1  14.29%
"
        );
    }

    #[test]
    fn service_table_slots() {
        let table = sample_ring();
        let text = render(|out| render_table_slots(&table, out));
        assert_eq!(
            text,
            "\
SLOT  BACKEND
   0  198.51.100.11
   1  2001:db8::12
   2  198.51.100.11
   3  198.51.100.11
   4  -
   5  2001:db8::12
   6  198.51.100.11
"
        );
    }

    #[test]
    fn inconsistent_service_tables_are_rejected() {
        let mut table = sample_ring();
        table.slots[3] = 2;
        assert!(check_service_table(&table).is_err());
        table.slots[3] = -2;
        assert!(check_service_table(&table).is_err());
        let mut table = sample_ring();
        table.counts.pop();
        assert!(check_service_table(&table).is_err());
    }

    fn sample_status() -> Status {
        Status {
            version: "0.1.0".into(),
            pid: 4242,
            interface: "eth0".into(),
            xdp_mode: "native".into(),
            config_file: "/etc/weir/weir.toml".into(),
            bpffs: "/sys/fs/bpf/weir".into(),
            adopted: true,
            uptime_seconds: 90_061,
            services: 2,
            backends: 5,
            backends_up: 4,
            last_reload: Some(ReloadOutcome {
                ok: false,
                at: 1_000,
                error: Some("/etc/weir/weir.toml: service[0].port: 70000 is out of range".into()),
            }),
            inconsistent: None,
        }
    }

    #[test]
    fn status_rendering() {
        let text = render(|out| render_status(&sample_status(), 1_065, out));
        assert_eq!(
            text,
            "\
agent        weir 0.1.0, pid 4242, up 1d 1h 1m 1s
interface    eth0 (XDP native mode)
config       /etc/weir/weir.toml
bpffs        /sys/fs/bpf/weir (datapath adopted from an earlier agent)
services     2
backends     5 (4 up)
last reload  FAILED 1m 5s ago: /etc/weir/weir.toml: service[0].port: 70000 is out of range
"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3600), "1h 0m 0s");
        assert_eq!(human_duration(90_061), "1d 1h 1m 1s");
        assert_eq!(time_of_day(86_400 + 3723), "01:02:03");
    }

    #[test]
    fn service_list_rendering() {
        let services = vec![
            ServiceInfo {
                name: "web".into(),
                vip: ip("198.51.100.10"),
                port: 80,
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                forwarding: "tunnel".into(),
                ring_size: 65537,
                health_check: "tcp".into(),
                backends: 3,
                backends_up: 3,
            },
            ServiceInfo {
                name: "dns".into(),
                vip: ip("2001:db8::53"),
                port: 0,
                protocol: "udp".into(),
                scheduler: "maglev".into(),
                forwarding: "direct".into(),
                ring_size: 251,
                health_check: "none".into(),
                backends: 2,
                backends_up: 1,
            },
        ];
        let text = render(|out| render_services(&services, out));
        assert_eq!(
            text,
            "\
SERVICE  LISTENER          PROTO  SCHEDULER  FORWARDING   RING  HEALTH CHECK  BACKENDS  UP
web      198.51.100.10:80  tcp    maglev     tunnel      65537  tcp                  3   3
dns      [2001:db8::53]:*  udp    maglev     direct        251  none                 2   1
"
        );
    }

    fn sample_stats(scale: u64) -> Stats {
        Stats {
            global: vec![("xdp_tx".into(), 1000 * scale), ("xdp_pass".into(), 7)],
            services: vec![TrafficStats {
                service: "web".into(),
                backend: None,
                packets: 1000 * scale,
                bytes: 64_000 * scale,
                new_flows: 10 * scale,
            }],
            backends: vec![TrafficStats {
                service: "web".into(),
                backend: Some(ip("198.51.100.11")),
                packets: 1000 * scale,
                bytes: 64_000 * scale,
                new_flows: 10 * scale,
            }],
        }
    }

    #[test]
    fn stats_rendering() {
        let text = render(|out| render_stats(&sample_stats(1), out));
        assert_eq!(
            text,
            "\
COUNTER   VALUE
xdp_tx     1000
xdp_pass      7

SERVICE  PACKETS  BYTES  NEW FLOWS
web         1000  64000         10

SERVICE  BACKEND        PACKETS  BYTES  NEW FLOWS
web      198.51.100.11     1000  64000         10
"
        );
        let before = sample_stats(1);
        let text =
            render(|out| render_stats_with_rates(&sample_stats(3), Some((&before, 2.0)), out));
        assert_eq!(
            text,
            "\
COUNTER   VALUE  PER SEC
xdp_tx     3000     1000
xdp_pass      7        0

SERVICE  PACKETS  PKT/S   BYTES  BYTES/S  NEW FLOWS  FLOWS/S
web         3000   1000  192000    64000         30       10

SERVICE  BACKEND        PACKETS  PKT/S   BYTES  BYTES/S  NEW FLOWS  FLOWS/S
web      198.51.100.11     3000   1000  192000    64000         30       10
"
        );
        assert_eq!(rate(5, Some(10), 1.0), "-", "a counter that went backwards");
        assert_eq!(rate(5, None, 1.0), "-");
    }

    #[test]
    fn change_lines() {
        let before = backend_info("web", "198.51.100.11", 1, "enabled");
        let after = backend_info("web", "198.51.100.11", 3, "enabled");
        let weight = backend(&["backend", "weight", "web", "198.51.100.11", "3"]);
        assert_eq!(
            change_line(&weight, Some(&before), Some(&after)),
            "web 198.51.100.11: weight 1 -> 3"
        );
        assert_eq!(
            change_line(&weight, None, None),
            "web 198.51.100.11: weight set to 3"
        );
        let drained = backend_info("web", "198.51.100.11", 1, "draining");
        let drain = backend(&["backend", "drain", "web", "198.51.100.11"]);
        assert_eq!(
            change_line(&drain, Some(&before), Some(&drained)),
            "web 198.51.100.11: admin enabled -> draining (no new flows; tracked flows stay)"
        );
        let enable = backend(&["backend", "enable", "web", "198.51.100.11"]);
        assert_eq!(
            change_line(&enable, Some(&drained), Some(&before)),
            "web 198.51.100.11: admin draining -> enabled"
        );
        let add = backend(&["backend", "add", "web", "2001:db8::9", "--weight", "5"]);
        assert_eq!(
            change_line(&add, None, None),
            "web 2001:db8::9: added with weight 5"
        );
        let remove = backend(&["backend", "remove", "web", "2001:db8::9"]);
        assert_eq!(change_line(&remove, None, None), "web 2001:db8::9: removed");
        assert_eq!(
            reload_line(&ReloadReport {
                services: 1,
                ring_slots_written: 0,
                backends_written: 2
            }),
            "reloaded: 1 service; 0 ring slots and 2 backends rewritten"
        );
    }

    // ----- against a fake agent -----

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "weir-cli-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An agent that answers `answers.len()` connections in order and returns what it was
    /// asked.
    struct FakeAgent {
        dir: TempDir,
        thread: JoinHandle<Vec<Request>>,
    }

    impl FakeAgent {
        fn start(answers: Vec<Response>) -> Self {
            let dir = TempDir::new();
            let listener = UnixListener::bind(dir.0.join("weir.sock")).unwrap();
            let thread = std::thread::spawn(move || {
                let mut requests = Vec::new();
                for answer in answers {
                    let (stream, _) = listener.accept().unwrap();
                    let mut line = String::new();
                    BufReader::new(&stream).read_line(&mut line).unwrap();
                    requests.push(serde_json::from_str(&line).unwrap());
                    let mut text = serde_json::to_string(&answer).unwrap();
                    text.push('\n');
                    (&stream).write_all(text.as_bytes()).unwrap();
                }
                requests
            });
            Self { dir, thread }
        }

        fn socket(&self) -> String {
            self.dir.0.join("weir.sock").display().to_string()
        }

        fn requests(self) -> Vec<Request> {
            self.thread.join().unwrap()
        }
    }

    struct Run {
        code: u8,
        out: String,
        err: String,
    }

    fn run_with(args: &[&str], terminal: bool, frames: Option<u64>) -> Run {
        let command = client(args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_client_frames(
            &command,
            &mut Streams {
                out: &mut out,
                err: &mut err,
                terminal,
            },
            frames,
        );
        Run {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn run(args: &[&str]) -> Run {
        run_with(args, false, None)
    }

    #[test]
    fn weight_change_against_a_fake_agent() {
        let before = backend_info("web", "198.51.100.11", 1, "enabled");
        let other = backend_info("web", "198.51.100.12", 7, "enabled");
        let after = backend_info("web", "198.51.100.11", 3, "enabled");
        let agent = FakeAgent::start(vec![
            Response::ok(vec![other, before]),
            Response::ok(&after),
        ]);
        let socket = agent.socket();
        let run = run(&[
            "backend",
            "weight",
            "web",
            "198.51.100.11",
            "3",
            "--socket",
            &socket,
        ]);
        assert_eq!((run.code, run.err.as_str()), (EXIT_OK, ""));
        assert_eq!(run.out, "web 198.51.100.11: weight 1 -> 3\n");
        assert_eq!(
            agent.requests(),
            [
                Request::BackendList {
                    service: Some("web".into())
                },
                Request::BackendWeight {
                    service: "web".into(),
                    address: ip("198.51.100.11"),
                    weight: 3
                }
            ]
        );
    }

    #[test]
    fn json_output_is_the_data() {
        let backends = vec![backend_info("web", "198.51.100.11", 1, "enabled")];
        let agent = FakeAgent::start(vec![Response::ok(&backends)]);
        let socket = agent.socket();
        let run = run(&["backend", "list", "web", "-o", "json", "--socket", &socket]);
        assert_eq!((run.code, run.err.as_str()), (EXIT_OK, ""));
        let printed: Vec<BackendInfo> = serde_json::from_str(&run.out).unwrap();
        assert_eq!(printed, backends);
        assert!(run.out.contains("\n  "), "pretty-printed: {}", run.out);
        assert_eq!(
            agent.requests(),
            [Request::BackendList {
                service: Some("web".into())
            }]
        );
    }

    #[test]
    fn service_table_against_a_fake_agent() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_ring()),
            Response::ok(sample_ring()),
        ]);
        let socket = agent.socket();
        let full = run(&["service", "table", "web", "--socket", &socket]);
        assert_eq!((full.code, full.err.as_str()), (EXIT_OK, ""));
        assert!(full.out.starts_with("web: ring of 7 slots, 2 backends\n"));
        assert!(
            full.out
                .contains("\n\nSLOT  BACKEND\n   0  198.51.100.11\n")
        );
        assert_eq!(full.out.lines().count(), 1 + 4 + 1 + 1 + 7);
        let json = run(&[
            "service",
            "table",
            "web",
            "--summary",
            "-o",
            "json",
            "--socket",
            &socket,
        ]);
        assert_eq!(json.code, EXIT_OK);
        let value: serde_json::Value = serde_json::from_str(&json.out).unwrap();
        assert!(value.get("slots").is_none() && value.get("counts").is_some());
        agent.requests();
    }

    #[test]
    fn api_errors_against_a_fake_agent() {
        let cases = [
            (
                &["backend", "list", "foo"][..],
                Response::error(ErrorCode::UnknownService, "unknown service \"foo\""),
                EX_NOUSER,
                "error: unknown service \"foo\" (see `weir service list`)\n",
            ),
            (
                &["backend", "remove", "web", "198.51.100.99"],
                Response::error(
                    ErrorCode::UnknownBackend,
                    "service \"web\" has no backend 198.51.100.99",
                ),
                EX_NOUSER,
                "error: service \"web\" has no backend 198.51.100.99 \
                 (see `weir backend list web`)\n",
            ),
            (
                &["backend", "add", "web", "0.0.0.0"],
                Response::error(
                    ErrorCode::InvalidAddress,
                    "0.0.0.0 is not a unicast address",
                ),
                EX_DATAERR,
                "error: 0.0.0.0 is not a unicast address\n",
            ),
            (
                &["backend", "add", "web", "198.51.100.11"],
                Response::error(ErrorCode::Conflict, "web already has backend 198.51.100.11"),
                EXIT_FAILURE,
                "error: web already has backend 198.51.100.11\n",
            ),
            (
                &["reload"],
                Response::error(
                    ErrorCode::InvalidConfig,
                    "/etc/weir/weir.toml: service[0].ring_size: 65536 is not prime",
                ),
                EX_CONFIG,
                "error: /etc/weir/weir.toml: service[0].ring_size: 65536 is not prime \
                 (the agent keeps its running config; fix the file, check it with \
                 `weir config check FILE`, then run `weir reload` again)\n",
            ),
            (
                &["stats"],
                Response::error(ErrorCode::Internal, "reading STATS: EPERM"),
                EXIT_FAILURE,
                "error: reading STATS: EPERM (see the agent's log)\n",
            ),
        ];
        for (args, answer, code, err) in cases {
            let agent = FakeAgent::start(vec![answer]);
            let socket = agent.socket();
            let mut args = args.to_vec();
            args.extend(["--socket", &socket]);
            let run = run(&args);
            assert_eq!(
                (run.code, run.err.as_str(), run.out.as_str()),
                (code, err, ""),
                "{args:?}"
            );
            agent.requests();
        }
    }

    #[test]
    fn a_bad_answer_is_a_failure() {
        let agent = FakeAgent::start(vec![Response::ok("not a status")]);
        let socket = agent.socket();
        let run = run(&["status", "--socket", &socket]);
        assert_eq!(run.code, EXIT_FAILURE);
        assert!(
            run.err
                .starts_with("error: the agent sent an answer that is not valid: "),
            "{}",
            run.err
        );
        agent.requests();
    }

    #[test]
    fn agent_not_running() {
        let dir = TempDir::new();
        let socket = dir.0.join("weir.sock").display().to_string();
        let run = run(&["status", "--socket", &socket]);
        assert_eq!(run.code, EX_UNAVAILABLE);
        assert_eq!(
            run.err,
            format!(
                "error: the agent is not running (no socket at {socket}); \
                 start it with `weir agent --config FILE`\n"
            )
        );
        assert_eq!(run.out, "");
    }

    #[test]
    fn status_and_reload_against_a_fake_agent() {
        let mut status = sample_status();
        status.last_reload = None;
        let agent = FakeAgent::start(vec![
            Response::ok(&status),
            Response::ok(ReloadReport {
                services: 2,
                ring_slots_written: 12,
                backends_written: 1,
            }),
        ]);
        let socket = agent.socket();
        let first = run(&["status", "--socket", &socket]);
        assert_eq!(first.code, EXIT_OK, "{}", first.err);
        assert!(
            first
                .out
                .contains("last reload  none since the agent started\n")
        );
        let second = run(&["reload", "--socket", &socket]);
        assert_eq!(second.code, EXIT_OK, "{}", second.err);
        assert_eq!(
            second.out,
            "reloaded: 2 services; 12 ring slots and 1 backend rewritten\n"
        );
        assert_eq!(agent.requests(), [Request::Status {}, Request::Reload {}]);
    }

    #[test]
    fn stats_watch_shows_rates() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_stats(1)),
            Response::ok(sample_stats(2)),
        ]);
        let socket = agent.socket();
        let run = run_with(
            &["stats", "--watch", "--interval", "0.1", "--socket", &socket],
            false,
            Some(2),
        );
        assert_eq!((run.code, run.err.as_str()), (EXIT_OK, ""));
        assert!(!run.out.contains('\x1b'), "no escapes off a terminal");
        let frames: Vec<&str> = run.out.split("weir stats every 0.1s").collect();
        assert_eq!(frames.len(), 3, "{}", run.out);
        // The first frame has no rates yet; the second does (1000 packets in ~0.1 s).
        assert!(
            frames[1].contains("PKT/S") && frames[1].contains(" - "),
            "{}",
            frames[1]
        );
        let web = frames[2].lines().find(|l| l.starts_with("web ")).unwrap();
        let pps: f64 = web.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!((5_000.0..=20_000.0).contains(&pps), "{web}");
        agent.requests();
    }

    #[test]
    fn stats_watch_clears_a_terminal() {
        let agent = FakeAgent::start(vec![Response::ok(sample_stats(1))]);
        let socket = agent.socket();
        let run = run_with(&["stats", "-w", "--socket", &socket], true, Some(1));
        assert_eq!(run.code, EXIT_OK, "{}", run.err);
        assert!(run.out.starts_with("\x1b[H\x1b[2Jweir stats every 1s at "));
        agent.requests();
    }

    #[test]
    fn stats_watch_json_is_one_line_per_snapshot() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_stats(1)),
            Response::ok(sample_stats(2)),
        ]);
        let socket = agent.socket();
        let run = run_with(
            &[
                "stats", "-w", "-n", "0.1", "-o", "json", "--socket", &socket,
            ],
            true,
            Some(2),
        );
        assert_eq!(run.code, EXIT_OK, "{}", run.err);
        let snapshots: Vec<Stats> = run
            .out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(snapshots, [sample_stats(1), sample_stats(2)]);
        agent.requests();
    }

    #[test]
    fn an_error_stops_the_watch() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_stats(1)),
            Response::error(ErrorCode::Internal, "reading STATS: EPERM"),
        ]);
        let socket = agent.socket();
        let run = run_with(
            &["stats", "-w", "-n", "0.1", "--socket", &socket],
            false,
            None,
        );
        assert_eq!(run.code, EXIT_FAILURE);
        assert_eq!(
            run.out.matches("weir stats every").count(),
            1,
            "{}",
            run.out
        );
        assert_eq!(
            run.err,
            "error: reading STATS: EPERM (see the agent's log)\n"
        );
        agent.requests();
    }
}
