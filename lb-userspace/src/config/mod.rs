//! The configuration file of `weir agent`: TOML parsing and validation.
//!
//! Parsing happens in two layers. The private `Raw*` structs mirror the file exactly (every
//! table rejects unknown keys, numbers are read as `i64` so range errors get a clear reason)
//! and are deserialised through `serde_path_to_error`, so even a type error names the key it
//! is about. Validation then turns them into the public types below, which hold only
//! checked values with the defaults filled in: the agent never sees a config it cannot load.
//!
//! Every error is a [`ConfigError`] naming the file, the key (`service[0].backend[2].weight`)
//! and the reason. Validation stops at the first problem, in file order.
//!
//! New optional keys (health checks, an API socket, a metrics address) go into the `Raw*`
//! struct as `Option<_>`/`#[serde(default)]` fields plus a checked field on the public type,
//! so older files stay valid.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_common::maglev::is_prime;
use lb_common::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_SIZE, FORWARD_DIRECT, FORWARD_TUNNEL, MAX_BACKENDS,
    MAX_RING_SIZE, MAX_SERVICES, PROTO_TCP, PROTO_UDP, SCHED_IP_HASH, SCHED_MAGLEV,
};
use serde::Deserialize;

pub mod rules;

use rules::{
    check_interface_name, check_service_name, check_source, family, parse_ip, quoted,
    special_address,
};

/// The largest accepted `agent.conntrack_entries` (2^26 entries).
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 26;

/// The largest accepted backend `weight`.
pub const MAX_WEIGHT: u32 = 65535;

/// The longest accepted service `name`, in bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 64;

/// The longest accepted health-check interval.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// The key reported for errors that belong to no key (the file cannot be read, or is not
/// TOML at all).
pub const NO_KEY: &str = "-";

/// A config file that cannot be loaded. Displays as `{file}: {key}: {reason}`, e.g.
/// `weir.toml: service[1].backend[0].address: invalid IP address "203.0.113.x"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {reason}", .file.display())]
pub struct ConfigError {
    /// The file, as given to [`load`] or [`parse`].
    pub file: PathBuf,
    /// The key the error is about, as a path (`agent.interface`, `service[0].backend[2]`),
    /// or [`NO_KEY`] when the file could not be read or is not valid TOML.
    pub key: String,
    /// What is wrong, in words; includes the line and column when TOML reported them.
    pub reason: String,
}

impl ConfigError {
    /// An error about `key` of `file`.
    pub fn new(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The `[agent]` table.
    pub agent: AgentConfig,
    /// The `[[service]]` tables, in file order (at least one, at most `MAX_SERVICES`).
    pub services: Vec<ServiceConfig>,
}

impl Config {
    /// The number of backends over all services (a backend listed by two services counts
    /// twice).
    pub fn backend_count(&self) -> usize {
        self.services.iter().map(|s| s.backends.len()).sum()
    }
}

/// The `[agent]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The interface the balancer attaches to (non-empty, at most 15 bytes).
    pub interface: String,
    /// How to attach the XDP program.
    pub xdp_mode: XdpMode,
    /// Outer IPv4 source address of tunnelled packets; set whenever a tunnel-mode service
    /// has an IPv4 backend.
    pub tunnel_source: Option<Ipv4Addr>,
    /// Outer IPv6 source address of tunnelled packets; set whenever a tunnel-mode service
    /// has an IPv6 backend.
    pub tunnel_source_v6: Option<Ipv6Addr>,
    /// IPv4 prefix whose addresses become the outer sources of IPv4 tunnel packets, one per
    /// flow (from the flow hash), so that a backend's NIC spreads the tunnel over its
    /// receive queues. `None`: every packet has `tunnel_source`.
    pub tunnel_source_prefix: Option<SourcePrefix>,
    /// Capacity of the connection-tracking map (1..=`MAX_CONNTRACK_ENTRIES`).
    pub conntrack_entries: u32,
    /// Unix socket of the management API (mode 0600).
    pub api_socket: PathBuf,
    /// Listen address of the Prometheus `/metrics` endpoint.
    pub metrics: SocketAddr,
    /// Directory in a bpffs where the XDP link and the maps are pinned.
    pub bpffs: PathBuf,
    /// File where changes made from the CLI are kept across agent restarts.
    pub state_file: PathBuf,
}

/// `[agent] tunnel_source_prefix`: an IPv4 network address (host bits zero) and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePrefix {
    pub network: Ipv4Addr,
    /// 16..=32: at most 65,536 sources.
    pub len: u8,
}

impl SourcePrefix {
    /// The host bits of the prefix.
    #[must_use]
    pub fn host_mask(self) -> u32 {
        u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0)
    }
}

/// Parses and checks `tunnel_source_prefix`.
fn parse_source_prefix(text: &str) -> Result<SourcePrefix, String> {
    let (addr, len) = text.split_once('/').ok_or_else(|| {
        format!(
            "invalid prefix {}: expected an IPv4 prefix such as \"198.51.100.16/28\"",
            quoted(text)
        )
    })?;
    let network = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(network)) => network,
        Ok(IpAddr::V6(_)) => {
            return Err(format!(
                "{} is an IPv6 prefix; only IPv4 outer sources are spread (the IPv6 outer \
                 header varies its flow label per flow instead)",
                quoted(text)
            ));
        }
        Err(_) => return Err(format!("invalid IPv4 address in {}", quoted(text))),
    };
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|len| (16..=32).contains(len))
        .ok_or_else(|| {
            format!(
                "prefix length of {} must be 16..=32 (at most 65,536 sources)",
                quoted(text)
            )
        })?;
    let prefix = SourcePrefix { network, len };
    let host = u32::from(network) & prefix.host_mask();
    if host != 0 {
        return Err(format!(
            "{} has host bits set; the prefix is {}/{len}",
            quoted(text),
            Ipv4Addr::from(u32::from(network) & !prefix.host_mask())
        ));
    }
    let last = Ipv4Addr::from(u32::from(network) | prefix.host_mask());
    check_source(IpAddr::V4(network))?;
    check_source(IpAddr::V4(last))?;
    Ok(prefix)
}

/// Default `[agent] api_socket`.
pub const DEFAULT_API_SOCKET: &str = "/run/weir/weir.sock";
/// Default `[agent] metrics`.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9650";
/// Default `[agent] bpffs`.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/weir";
/// Default `[agent] state_file`.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/weir/state.json";

/// `[service.health_check]`: active checks with keepalived/HAProxy semantics: a backend
/// goes down after `fall` consecutive failures and up after `rise` consecutive successes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Time between two checks of one backend (jittered by up to 10%).
    pub interval: Duration,
    /// Time a check may take; at most `interval`.
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// `http`: the path requested.
    pub path: String,
    /// `http`: the status that counts as healthy.
    pub expect_status: u16,
    /// Port to check; `None` means the service's port.
    pub port: Option<u16>,
    /// `udp`: the datagram sent; any reply counts as healthy.
    pub payload: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthKind::None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            path: "/".to_owned(),
            expect_status: 200,
            port: None,
            payload: "weir-health-check".to_owned(),
        }
    }
}

/// `health_check.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// No checks: backends are up unless disabled.
    #[default]
    None,
    /// A TCP connect succeeds.
    Tcp,
    /// An HTTP/1.1 GET of `path` answers `expect_status`.
    Http,
    /// A UDP datagram gets any reply.
    Udp,
}

impl HealthKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Udp => "udp",
        }
    }
}

/// How the XDP program is attached (`xdp_mode`, `--xdp-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode if the driver supports it, generic (SKB) mode otherwise.
    #[default]
    Auto,
    /// Native (driver) mode only; attaching fails if the driver lacks XDP support.
    Native,
    /// Generic (SKB) mode: works on every interface, slower.
    Generic,
}

impl XdpMode {
    /// The name used in the config file and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// A `[[service]]` table: one virtual service (VIP, port, protocol) and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique name (1..=64 bytes of `A-Z a-z 0-9 . _ -`).
    pub name: String,
    /// The virtual IP address (never unspecified, loopback, multicast or broadcast).
    pub vip: IpAddr,
    /// Destination port; 0 means every port (a service with a specific port on the same
    /// VIP and protocol takes precedence).
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// How a backend is picked for a new flow.
    pub scheduler: Scheduler,
    /// How packets reach the backend.
    pub forwarding: Forwarding,
    /// Maglev lookup table size: prime, at most `MAX_RING_SIZE`, and at least the number of
    /// backends.
    pub ring_size: u32,
    /// The backends, in file order (at least one; at least one has weight > 0).
    pub backends: Vec<BackendConfig>,
    /// Active health checks of the backends.
    pub health_check: HealthCheck,
    /// A backend that becomes healthy ramps its weight up linearly over this time (HAProxy
    /// `slowstart`); zero: at once.
    pub slow_start: Duration,
    /// A tracked TCP flow idle this long is forgotten.
    pub tcp_idle_timeout: Duration,
    /// A tracked UDP flow idle this long is forgotten.
    pub udp_idle_timeout: Duration,
}

/// Default `tcp_idle_timeout` (IPVS's TCP established timeout).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(900);
/// Default `udp_idle_timeout` (IPVS's UDP timeout).
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A service's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number (6 or 17).
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    /// The name used in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// How a service picks the backend of a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Maglev consistent hashing over the 5-tuple.
    #[default]
    Maglev,
    /// Hash of the client address only: a client sticks to one backend.
    IpHash,
    /// Smooth weighted round robin, per new flow.
    RoundRobin,
    /// Fewest active connections per unit of weight (power of two choices).
    LeastConn,
}

impl Scheduler {
    /// The datapath's code for this scheduler (`SCHED_*`).
    pub const fn code(self) -> u8 {
        match self {
            Self::Maglev => SCHED_MAGLEV,
            Self::IpHash => SCHED_IP_HASH,
            Self::RoundRobin => lb_common::SCHED_ROUND_ROBIN,
            Self::LeastConn => lb_common::SCHED_LEAST_CONN,
        }
    }

    /// The name used in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::IpHash => "ip-hash",
            Self::RoundRobin => "round-robin",
            Self::LeastConn => "least-conn",
        }
    }
}

/// How a service's packets reach the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Encapsulated in an outer IP header (IPIP / IP6IP6 / mixed) addressed to the backend.
    #[default]
    Tunnel,
    /// L2 direct server return: only the destination MAC changes, so the backend must be
    /// on the local link and have the VIP configured; VIP and backend share a family.
    Direct,
}

impl Forwarding {
    /// The datapath's code for this mode (`FORWARD_*`).
    pub const fn code(self) -> u8 {
        match self {
            Self::Tunnel => FORWARD_TUNNEL,
            Self::Direct => FORWARD_DIRECT,
        }
    }

    /// The name used in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tunnel => "tunnel",
            Self::Direct => "direct",
        }
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(XdpMode, Protocol, Scheduler, Forwarding);

/// A `[[service.backend]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The backend's address (never unspecified, multicast or broadcast; unique within the
    /// service).
    pub address: IpAddr,
    /// Relative share of new flows, 0..=65535; 0 means no new flows (draining).
    pub weight: u32,
    /// A standby (NGINX `backup`): new flows only while every primary of the service is down.
    pub backup: bool,
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| ConfigError::new(path, NO_KEY, format!("cannot read the file: {err}")))?;
    parse(&text, path)
}

/// Parses and validates `text`, the contents of `file` (used in errors only).
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    deserialize(text)
        .and_then(validate)
        .map_err(|Fail { key, reason }| ConfigError::new(file, key, reason))
}

/// An error before the file name is attached.
#[derive(Debug)]
struct Fail {
    key: String,
    reason: String,
}

fn fail(key: impl Into<String>, reason: impl Into<String>) -> Fail {
    Fail {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<RawAgent>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpMode,
    tunnel_source: Option<String>,
    tunnel_source_v6: Option<String>,
    tunnel_source_prefix: Option<String>,
    conntrack_entries: Option<i64>,
    api_socket: Option<String>,
    metrics: Option<String>,
    bpffs: Option<String>,
    state_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: i64,
    protocol: Protocol,
    #[serde(default)]
    scheduler: Scheduler,
    #[serde(default)]
    forwarding: Forwarding,
    ring_size: Option<i64>,
    #[serde(default)]
    backend: Vec<RawBackend>,
    health_check: Option<RawHealthCheck>,
    slow_start: Option<String>,
    tcp_idle_timeout: Option<String>,
    udp_idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(default = "default_health_kind")]
    kind: HealthKind,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
    path: Option<String>,
    expect_status: Option<i64>,
    port: Option<i64>,
    payload: Option<String>,
}

/// A `[service.health_check]` table without `kind` checks TCP connects.
const fn default_health_kind() -> HealthKind {
    HealthKind::Tcp
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    weight: Option<i64>,
    #[serde(default)]
    backup: bool,
}

fn deserialize(text: &str) -> Result<RawConfig, Fail> {
    // Syntax first, so that a broken file is reported as such rather than as whatever the
    // serde layer happened to be looking at.
    if let Err(err) = text.parse::<toml::Table>() {
        return Err(fail(
            NO_KEY,
            format!(
                "invalid TOML{}: {}",
                location(text, err.span()),
                one_line(err.message())
            ),
        ));
    }
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|err| {
        let mut key = match err.path().to_string() {
            root if root == "." => String::new(),
            path => path,
        };
        let inner = err.into_inner();
        let message = one_line(inner.message());
        // serde reports a missing key at the enclosing table; name the key itself.
        let field = message
            .strip_prefix("missing field `")
            .or_else(|| message.strip_prefix("unknown field `"))
            .and_then(|rest| rest.split('`').next());
        if let Some(field) = field
            && key != field
            && !key.ends_with(&format!(".{field}"))
        {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(field);
        }
        if key.is_empty() {
            key.push_str(NO_KEY);
        }
        let reason = match inner.span() {
            Some(span) => format!("{message} ({})", line_column(text, span.start)),
            None => message,
        };
        fail(key, reason)
    })
}

/// ` at line L, column C` for a span, or nothing.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|span| format!(" at {}", line_column(text, span.start)))
        .unwrap_or_default()
}

/// `line L, column C` (both 1-based, columns in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> String {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    format!("line {line}, column {column}")
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

// ---------------------------------------------------------------------------------------
// Validation.

fn validate(raw: RawConfig) -> Result<Config, Fail> {
    let Some(raw_agent) = raw.agent else {
        return Err(fail(
            "agent",
            "the [agent] table is missing (it needs at least `interface`)",
        ));
    };
    let agent = validate_agent(raw_agent)?;

    if raw.service.is_empty() {
        return Err(fail("service", "at least one [[service]] is required"));
    }
    if raw.service.len() > MAX_SERVICES as usize {
        return Err(fail(
            "service",
            format!(
                "{} services, but at most {MAX_SERVICES} are supported",
                raw.service.len()
            ),
        ));
    }
    let total_backends: usize = raw.service.iter().map(|s| s.backend.len()).sum();
    if total_backends > MAX_BACKENDS as usize {
        return Err(fail(
            "service",
            format!(
                "{total_backends} backends in total over all services, but at most \
                 {MAX_BACKENDS} are supported"
            ),
        ));
    }

    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listeners: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
    let mut services = Vec::with_capacity(raw.service.len());
    for (index, raw_service) in raw.service.into_iter().enumerate() {
        let service = validate_service(index, raw_service)?;
        let prefix = format!("service[{index}]");

        if let Some(&other) = names.get(&service.name) {
            return Err(fail(
                format!("{prefix}.name"),
                format!(
                    "duplicate service name {} (also service[{other}])",
                    quoted(&service.name)
                ),
            ));
        }
        names.insert(service.name.clone(), index);

        let listener = (service.vip, service.port, service.protocol);
        if let Some(&other) = listeners.get(&listener) {
            let port = match service.port {
                0 => "every port (0)".to_owned(),
                port => format!("port {port}"),
            };
            return Err(fail(
                format!("{prefix}.vip"),
                format!(
                    "duplicate VIP: {} {port}/{} is already used by service \"{}\" \
                     (service[{other}])",
                    service.vip,
                    service.protocol,
                    services_name(&services, other)
                ),
            ));
        }
        listeners.insert(listener, index);

        check_tunnel_sources(&agent, index, &service)?;
        services.push(service);
    }

    Ok(Config { agent, services })
}

fn services_name(services: &[ServiceConfig], index: usize) -> &str {
    services.get(index).map_or("?", |s| s.name.as_str())
}

fn validate_agent(raw: RawAgent) -> Result<AgentConfig, Fail> {
    check_interface_name(&raw.interface).map_err(|reason| fail("agent.interface", reason))?;

    let tunnel_source = raw
        .tunnel_source
        .as_deref()
        .map(|text| match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) => check_source(IpAddr::V4(addr)).map(|()| addr),
            Ok(IpAddr::V6(_)) => Err(format!(
                "{} is an IPv6 address; tunnel_source must be IPv4 (IPv6 goes into \
                 tunnel_source_v6)",
                quoted(text)
            )),
            Err(_) => Err(format!("invalid IPv4 address {}", quoted(text))),
        })
        .transpose()
        .map_err(|reason| fail("agent.tunnel_source", reason))?;

    let tunnel_source_v6 = raw
        .tunnel_source_v6
        .as_deref()
        .map(|text| match text.parse::<IpAddr>() {
            Ok(IpAddr::V6(addr)) => check_source(IpAddr::V6(addr)).map(|()| addr),
            Ok(IpAddr::V4(_)) => Err(format!(
                "{} is an IPv4 address; tunnel_source_v6 must be IPv6 (IPv4 goes into \
                 tunnel_source)",
                quoted(text)
            )),
            Err(_) => Err(format!("invalid IPv6 address {}", quoted(text))),
        })
        .transpose()
        .map_err(|reason| fail("agent.tunnel_source_v6", reason))?;

    let tunnel_source_prefix = raw
        .tunnel_source_prefix
        .as_deref()
        .map(parse_source_prefix)
        .transpose()
        .map_err(|reason| fail("agent.tunnel_source_prefix", reason))?;
    if tunnel_source_prefix.is_some() && tunnel_source.is_none() {
        return Err(fail(
            "agent.tunnel_source_prefix",
            "needs tunnel_source: the LB's own IPv4 address, the source of its route lookups",
        ));
    }

    let conntrack_entries = match raw.conntrack_entries {
        None => DEFAULT_CONNTRACK_ENTRIES,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_CONNTRACK_ENTRIES).contains(n))
            .ok_or_else(|| {
                fail(
                    "agent.conntrack_entries",
                    format!("{n} is out of range (1..={MAX_CONNTRACK_ENTRIES})"),
                )
            })?,
    };

    let path = |value: Option<String>, default: &str, key: &str| -> Result<PathBuf, Fail> {
        let value = value.unwrap_or_else(|| default.to_owned());
        if !value.starts_with('/') {
            return Err(fail(
                key,
                format!("{} must be an absolute path", quoted(&value)),
            ));
        }
        Ok(PathBuf::from(value))
    };
    let api_socket = path(raw.api_socket, DEFAULT_API_SOCKET, "agent.api_socket")?;
    let bpffs = path(raw.bpffs, DEFAULT_BPFFS, "agent.bpffs")?;
    let state_file = path(raw.state_file, DEFAULT_STATE_FILE, "agent.state_file")?;
    let metrics_text = raw.metrics.unwrap_or_else(|| DEFAULT_METRICS.to_owned());
    let metrics = metrics_text.parse::<SocketAddr>().map_err(|_| {
        fail(
            "agent.metrics",
            format!(
                "invalid listen address {} (expected IP:PORT, e.g. {DEFAULT_METRICS})",
                quoted(&metrics_text)
            ),
        )
    })?;

    Ok(AgentConfig {
        interface: raw.interface,
        xdp_mode: raw.xdp_mode,
        tunnel_source,
        tunnel_source_v6,
        tunnel_source_prefix,
        conntrack_entries,
        api_socket,
        metrics,
        bpffs,
        state_file,
    })
}

fn validate_service(index: usize, raw: RawService) -> Result<ServiceConfig, Fail> {
    let prefix = format!("service[{index}]");
    let key = |field: &str| format!("{prefix}.{field}");

    check_service_name(&raw.name).map_err(|reason| fail(key("name"), reason))?;

    let vip = parse_ip(&raw.vip).map_err(|reason| fail(key("vip"), reason))?;
    if let Some(problem) = special_address(vip) {
        return Err(fail(
            key("vip"),
            format!("{vip} is {problem} and cannot be a VIP"),
        ));
    }

    let port = u16::try_from(raw.port).map_err(|_| {
        fail(
            key("port"),
            format!(
                "{} is out of range (0..=65535; 0 means every port)",
                raw.port
            ),
        )
    })?;

    let ring_size = match raw.ring_size {
        None => DEFAULT_RING_SIZE,
        Some(n) if n <= 0 => {
            return Err(fail(
                key("ring_size"),
                format!("{n} is out of range (the Maglev ring size must be a prime, e.g. 65537)"),
            ));
        }
        Some(n) if n > i64::from(MAX_RING_SIZE) => {
            return Err(fail(
                key("ring_size"),
                format!("{n} is too large (at most {MAX_RING_SIZE})"),
            ));
        }
        Some(n) => {
            let n = u32::try_from(n).map_err(|_| fail(key("ring_size"), "out of range"))?;
            if !is_prime(n) {
                return Err(fail(
                    key("ring_size"),
                    format!("{n} is not prime (the Maglev ring size must be a prime, e.g. 65537)"),
                ));
            }
            n
        }
    };

    if raw.backend.is_empty() {
        return Err(fail(
            key("backend"),
            "no backends: at least one [[service.backend]] is required",
        ));
    }
    if raw.backend.len() > ring_size as usize {
        return Err(fail(
            key("ring_size"),
            format!(
                "{ring_size} is smaller than the number of backends ({}); every backend needs \
                 at least one ring slot",
                raw.backend.len()
            ),
        ));
    }

    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    let mut backends = Vec::with_capacity(raw.backend.len());
    for (b, raw_backend) in raw.backend.into_iter().enumerate() {
        let bkey = |field: &str| format!("{prefix}.backend[{b}].{field}");

        let address =
            parse_ip(&raw_backend.address).map_err(|reason| fail(bkey("address"), reason))?;

        if let Some(&other) = seen.get(&address) {
            return Err(fail(
                bkey("address"),
                format!("duplicate backend {address} (also {prefix}.backend[{other}])"),
            ));
        }
        seen.insert(address, b);
        rules::check_backend_address(vip, raw.forwarding, address)
            .map_err(|reason| fail(bkey("address"), reason))?;

        let weight = match raw_backend.weight {
            None => 1,
            Some(w) => rules::check_weight(w).map_err(|reason| fail(bkey("weight"), reason))?,
        };
        backends.push(BackendConfig {
            address,
            weight,
            backup: raw_backend.backup,
        });
    }
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    rules::check_total_weight(&weights).map_err(|reason| fail(key("backend"), reason))?;

    let duration_key = |value: Option<String>,
                        default: Duration,
                        field: &str,
                        min: Duration,
                        max: Duration|
     -> Result<Duration, Fail> {
        let Some(text) = value else {
            return Ok(default);
        };
        let d = parse_duration(&text).map_err(|r| fail(key(field), r))?;
        if d < min || d > max {
            return Err(fail(
                key(field),
                format!("{text} is out of range ({min:?}..={max:?})"),
            ));
        }
        Ok(d)
    };
    let slow_start = duration_key(
        raw.slow_start,
        Duration::ZERO,
        "slow_start",
        Duration::ZERO,
        Duration::from_secs(3600),
    )?;
    let tcp_idle_timeout = duration_key(
        raw.tcp_idle_timeout,
        DEFAULT_TCP_IDLE_TIMEOUT,
        "tcp_idle_timeout",
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    )?;
    let udp_idle_timeout = duration_key(
        raw.udp_idle_timeout,
        DEFAULT_UDP_IDLE_TIMEOUT,
        "udp_idle_timeout",
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    )?;
    // The datapath keeps idle timeouts in whole seconds; so must the file.
    for (d, field) in [
        (tcp_idle_timeout, "tcp_idle_timeout"),
        (udp_idle_timeout, "udp_idle_timeout"),
    ] {
        if d.subsec_nanos() != 0 {
            return Err(fail(
                key(field),
                format!("{d:?} is not a whole number of seconds (the datapath keeps seconds)"),
            ));
        }
    }
    let health_check = match raw.health_check {
        None => HealthCheck::default(),
        Some(hc) => validate_health_check(&prefix, port, hc)?,
    };

    Ok(ServiceConfig {
        name: raw.name,
        vip,
        port,
        protocol: raw.protocol,
        scheduler: raw.scheduler,
        forwarding: raw.forwarding,
        ring_size,
        backends,
        health_check,
        slow_start,
        tcp_idle_timeout,
        udp_idle_timeout,
    })
}

/// The longest duration any key takes (a week): bounds every duration before it is added
/// to a clock, where an overflow would panic.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

/// Parses a duration such as `500ms`, `2s` or `1m`, at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{} has no unit (use ms, s or m, e.g. \"2s\")", quoted(text)))?;
    let (number, unit) = text.split_at(split);
    let too_long = || {
        format!(
            "{} is too long (at most {}s)",
            quoted(text),
            MAX_DURATION.as_secs()
        )
    };
    let n: u64 = number.parse().map_err(|_| {
        if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
            too_long()
        } else {
            format!(
                "{} is not a duration (e.g. \"500ms\", \"2s\")",
                quoted(text)
            )
        }
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(format!(
                "{}: unknown unit {} (use ms, s or m)",
                quoted(text),
                quoted(unit)
            ));
        }
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

fn validate_health_check(
    prefix: &str,
    service_port: u16,
    raw: RawHealthCheck,
) -> Result<HealthCheck, Fail> {
    let key = |field: &str| format!("{prefix}.health_check.{field}");
    let mut hc = HealthCheck {
        kind: raw.kind,
        ..HealthCheck::default()
    };
    if let Some(text) = raw.interval {
        hc.interval = parse_duration(&text).map_err(|r| fail(key("interval"), r))?;
    }
    if let Some(text) = raw.timeout {
        hc.timeout = parse_duration(&text).map_err(|r| fail(key("timeout"), r))?;
    }
    if hc.interval < Duration::from_millis(100) || hc.interval > MAX_CHECK_INTERVAL {
        return Err(fail(
            key("interval"),
            format!(
                "{:?} is out of range (at least 100ms, at most {}s)",
                hc.interval,
                MAX_CHECK_INTERVAL.as_secs()
            ),
        ));
    }
    if hc.timeout.is_zero() || hc.timeout > hc.interval {
        return Err(fail(
            key("timeout"),
            format!(
                "must be above 0 and at most the interval ({:?})",
                hc.interval
            ),
        ));
    }
    let count = |value: Option<i64>, default: u32, field: &str| -> Result<u32, Fail> {
        match value {
            None => Ok(default),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| fail(key(field), format!("{n} is out of range (1..=100)"))),
        }
    };
    hc.rise = count(raw.rise, hc.rise, "rise")?;
    hc.fall = count(raw.fall, hc.fall, "fall")?;
    if let Some(path) = raw.path {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail(
                key("path"),
                format!("{} must start with / and contain no spaces", quoted(&path)),
            ));
        }
        hc.path = path;
    }
    if let Some(status) = raw.expect_status {
        hc.expect_status = u16::try_from(status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| {
                fail(
                    key("expect_status"),
                    format!("{status} is not an HTTP status (100..=599)"),
                )
            })?;
    }
    if let Some(port) = raw.port {
        hc.port = Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| fail(key("port"), format!("{port} is out of range (1..=65535)")))?,
        );
    }
    if let Some(payload) = raw.payload {
        if payload.is_empty() || payload.len() > 1024 {
            return Err(fail(key("payload"), "must be 1 to 1024 bytes"));
        }
        hc.payload = payload;
    }
    if hc.kind != HealthKind::None && hc.port.is_none() && service_port == 0 {
        return Err(fail(
            key("port"),
            "the service listens on every port (port = 0): say which port to check",
        ));
    }
    Ok(hc)
}

/// Tunnel mode needs an outer source address of each backend family it sends to.
fn check_tunnel_sources(
    agent: &AgentConfig,
    index: usize,
    service: &ServiceConfig,
) -> Result<(), Fail> {
    if service.forwarding != Forwarding::Tunnel {
        return Ok(());
    }
    let needs = |v4: bool| {
        service
            .backends
            .iter()
            .enumerate()
            .find(|(_, b)| b.address.is_ipv4() == v4)
    };
    let missing = |key: &str, b: usize, backend: &BackendConfig| {
        fail(
            format!("agent.{key}"),
            format!(
                "missing, but service \"{}\" (service[{index}]) tunnels to {} backend {} \
                 (service[{index}].backend[{b}]); set it to an {} address of this host",
                service.name,
                family(backend.address),
                backend.address,
                family(backend.address),
            ),
        )
    };
    if agent.tunnel_source.is_none()
        && let Some((b, backend)) = needs(true)
    {
        return Err(missing("tunnel_source", b, backend));
    }
    if agent.tunnel_source_v6.is_none()
        && let Some((b, backend)) = needs(false)
    {
        return Err(missing("tunnel_source_v6", b, backend));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "weir.toml";

    const AGENT: &str = r#"
[agent]
interface = "eth0"
tunnel_source = "198.51.100.1"
tunnel_source_v6 = "2001:db8::1"
"#;

    /// An `[[service]]` table (TCP) with `extra` lines before its backends.
    fn service(name: &str, vip: &str, port: u16, extra: &str, backends: &[String]) -> String {
        let mut text = format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\n\
             protocol = \"tcp\"\n{extra}\n"
        );
        for backend in backends {
            text.push_str("[[service.backend]]\n");
            text.push_str(backend);
            text.push('\n');
        }
        text
    }

    fn backend(address: &str) -> String {
        format!("address = \"{address}\"")
    }

    fn weighted(address: &str, weight: i64) -> String {
        format!("address = \"{address}\"\nweight = {weight}")
    }

    /// The standard agent plus service "web" on 198.51.100.10:80/tcp.
    fn web(extra: &str, backends: &[String]) -> String {
        format!(
            "{AGENT}{}",
            service("web", "198.51.100.10", 80, extra, backends)
        )
    }

    fn ok(text: &str) -> Config {
        parse(text, Path::new(FILE)).unwrap_or_else(|err| panic!("{err}\n---\n{text}"))
    }

    /// Asserts that `text` is rejected at `key` with a reason containing `needle`.
    #[track_caller]
    fn rejects(text: &str, key: &str, needle: &str) -> ConfigError {
        let err = match parse(text, Path::new(FILE)) {
            Ok(config) => panic!("accepted: {config:?}\n---\n{text}"),
            Err(err) => err,
        };
        assert_eq!(err.file, Path::new(FILE));
        assert_eq!(err.key, key, "wrong key in: {err}");
        assert!(
            err.reason.contains(needle),
            "reason of `{err}` does not mention {needle:?}"
        );
        err
    }

    // --- accepted files -------------------------------------------------------------

    /// A web service whose `[service.health_check]` table holds `hc` (TOML lines).
    fn with_health(hc: &str) -> String {
        format!(
            "{}\n[service.health_check]\n{hc}\n",
            web("", &[backend("203.0.113.11")])
        )
    }

    #[test]
    fn health_check_defaults_and_values() {
        let none = ok(&web("", &[backend("203.0.113.11")]));
        assert_eq!(none.services[0].health_check.kind, HealthKind::None);
        let c = ok(&with_health(
            "kind = \"http\"\ninterval = \"500ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2\npath = \"/healthz\"\nexpect_status = 204",
        ));
        let hc = &c.services[0].health_check;
        assert_eq!(hc.kind, HealthKind::Http);
        assert_eq!(hc.interval, Duration::from_millis(500));
        assert_eq!(hc.timeout, Duration::from_millis(200));
        assert_eq!((hc.rise, hc.fall, hc.expect_status), (1, 2, 204));
        assert_eq!(hc.path, "/healthz");
        let tcp = ok(&with_health(""));
        assert_eq!(
            tcp.services[0].health_check.kind,
            HealthKind::Tcp,
            "kind defaults to tcp"
        );
    }

    /// Reported: `interval = "18446744073709551615s"` passed `weir config check`, and a
    /// health task then panicked adding it to a clock. Every duration is bounded.
    #[test]
    fn huge_durations_are_rejected_before_anything_runs() {
        for (hc, key) in [
            ("interval = \"18446744073709551615s\"", "interval"),
            ("interval = \"99999999999999999999999s\"", "interval"),
            ("interval = \"61m\"", "interval"),
            (
                "interval = \"1s\"\ntimeout = \"18446744073709551615ms\"",
                "timeout",
            ),
        ] {
            let err = rejects(
                &with_health(hc),
                &format!("service[0].health_check.{key}"),
                "",
            );
            assert!(
                err.reason.contains("too long") || err.reason.contains("out of range"),
                "{err}"
            );
        }
        for field in ["slow_start", "tcp_idle_timeout", "udp_idle_timeout"] {
            rejects(
                &web(
                    &format!("{field} = \"18446744073709551615m\""),
                    &[backend("203.0.113.11")],
                ),
                &format!("service[0].{field}"),
                "",
            );
        }
        assert!(parse_duration("18446744073709551615s").is_err());
        assert_eq!(parse_duration("7m"), Ok(Duration::from_secs(420)));
    }

    #[test]
    fn health_check_rejections() {
        rejects(
            &with_health("interval = \"2\""),
            "service[0].health_check.interval",
            "no unit",
        );
        rejects(
            &with_health("interval = \"2h\""),
            "service[0].health_check.interval",
            "unknown unit",
        );
        rejects(
            &with_health("interval = \"50ms\""),
            "service[0].health_check.interval",
            "at least 100ms",
        );
        rejects(
            &with_health("interval = \"1s\"\ntimeout = \"2s\""),
            "service[0].health_check.timeout",
            "at most the interval",
        );
        rejects(
            &with_health("rise = 0"),
            "service[0].health_check.rise",
            "out of range",
        );
        rejects(
            &with_health("path = \"healthz\""),
            "service[0].health_check.path",
            "must start with /",
        );
        rejects(
            &with_health("expect_status = 700"),
            "service[0].health_check.expect_status",
            "not an HTTP status",
        );
        rejects(
            &with_health("kind = \"icmp\""),
            "service[0].health_check.kind",
            "unknown variant",
        );
        rejects(
            &with_health("bogus = 1"),
            "service[0].health_check.bogus",
            "unknown field",
        );
        let every_port = format!(
            "{AGENT}{}\n[service.health_check]\nkind = \"tcp\"\n",
            service("all", "198.51.100.10", 0, "", &[backend("203.0.113.11")])
        );
        rejects(
            &every_port,
            "service[0].health_check.port",
            "say which port",
        );
    }

    #[test]
    fn schedulers_backup_slow_start_and_idle_timeouts() {
        for (name, s) in [
            ("maglev", Scheduler::Maglev),
            ("ip-hash", Scheduler::IpHash),
            ("round-robin", Scheduler::RoundRobin),
            ("least-conn", Scheduler::LeastConn),
        ] {
            let c = ok(&web(
                &format!("scheduler = \"{name}\""),
                &[backend("203.0.113.11")],
            ));
            assert_eq!(c.services[0].scheduler, s);
        }
        let c = ok(&web(
            "slow_start = \"30s\"\ntcp_idle_timeout = \"10m\"\nudp_idle_timeout = \"5s\"",
            &[
                backend("203.0.113.11"),
                format!("{}\nbackup = true", backend("203.0.113.12")),
            ],
        ));
        let s = &c.services[0];
        assert_eq!(s.slow_start, Duration::from_secs(30));
        assert_eq!(s.tcp_idle_timeout, Duration::from_secs(600));
        assert_eq!(s.udp_idle_timeout, Duration::from_secs(5));
        assert!(!s.backends[0].backup && s.backends[1].backup);
        let d = ok(&web("", &[backend("203.0.113.11")]));
        assert_eq!(d.services[0].tcp_idle_timeout, DEFAULT_TCP_IDLE_TIMEOUT);
        assert_eq!(d.services[0].udp_idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        assert!(d.services[0].slow_start.is_zero());
        rejects(
            &web("udp_idle_timeout = \"0s\"", &[backend("203.0.113.11")]),
            "service[0].udp_idle_timeout",
            "out of range",
        );
        rejects(
            &web("slow_start = \"2h\"", &[backend("203.0.113.11")]),
            "service[0].slow_start",
            "unknown unit",
        );
        rejects(
            &web("slow_start = \"90m\"", &[backend("203.0.113.11")]),
            "service[0].slow_start",
            "out of range",
        );
        rejects(
            &web("tcp_idle_timeout = \"1500ms\"", &[backend("203.0.113.11")]),
            "service[0].tcp_idle_timeout",
            "whole number of seconds",
        );
    }

    #[test]
    fn agent_paths_and_metrics_address() {
        let c = ok(&web("", &[backend("203.0.113.11")]));
        assert_eq!(c.agent.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
        assert_eq!(
            c.agent.metrics,
            DEFAULT_METRICS.parse::<SocketAddr>().unwrap()
        );
        let text = web("", &[backend("203.0.113.11")]).replacen(
            "[agent]\n",
            "[agent]\nmetrics = \"localhost:9650\"\n",
            1,
        );
        rejects(&text, "agent.metrics", "invalid listen address");
        let text = web("", &[backend("203.0.113.11")]).replacen(
            "[agent]\n",
            "[agent]\napi_socket = \"weir.sock\"\n",
            1,
        );
        rejects(&text, "agent.api_socket", "absolute path");
    }

    #[test]
    fn valid_full_config_round_trip() {
        let text = r#"
[agent]
interface = "ens5"
xdp_mode = "native"
tunnel_source = "198.51.100.1"
tunnel_source_v6 = "2001:db8::1"
conntrack_entries = 4096

[[service]]
name = "web"
vip = "198.51.100.10"
port = 443
protocol = "tcp"
scheduler = "maglev"
forwarding = "tunnel"
ring_size = 251

[[service.backend]]
address = "203.0.113.11"
weight = 3

[[service.backend]]
address = "2001:db8:1::11"
weight = 0

[[service]]
name = "dns.v6"
vip = "2001:db8::53"
port = 0
protocol = "udp"
scheduler = "ip-hash"
forwarding = "direct"
ring_size = 65537

[[service.backend]]
address = "2001:db8:2::53"
weight = 65535
"#;
        let expected = Config {
            agent: AgentConfig {
                interface: "ens5".to_owned(),
                xdp_mode: XdpMode::Native,
                tunnel_source: Some(Ipv4Addr::new(198, 51, 100, 1)),
                tunnel_source_v6: Some("2001:db8::1".parse().unwrap()),
                tunnel_source_prefix: None,
                conntrack_entries: 4096,
                api_socket: PathBuf::from(DEFAULT_API_SOCKET),
                metrics: DEFAULT_METRICS.parse().unwrap(),
                bpffs: PathBuf::from(DEFAULT_BPFFS),
                state_file: PathBuf::from(DEFAULT_STATE_FILE),
            },
            services: vec![
                ServiceConfig {
                    name: "web".to_owned(),
                    vip: "198.51.100.10".parse().unwrap(),
                    port: 443,
                    protocol: Protocol::Tcp,
                    scheduler: Scheduler::Maglev,
                    forwarding: Forwarding::Tunnel,
                    ring_size: 251,
                    backends: vec![
                        BackendConfig {
                            address: "203.0.113.11".parse().unwrap(),
                            weight: 3,
                            backup: false,
                        },
                        BackendConfig {
                            address: "2001:db8:1::11".parse().unwrap(),
                            weight: 0,
                            backup: false,
                        },
                    ],
                    health_check: HealthCheck::default(),
                    slow_start: Duration::ZERO,
                    tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
                    udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
                },
                ServiceConfig {
                    name: "dns.v6".to_owned(),
                    vip: "2001:db8::53".parse().unwrap(),
                    port: 0,
                    protocol: Protocol::Udp,
                    scheduler: Scheduler::IpHash,
                    forwarding: Forwarding::Direct,
                    ring_size: 65537,
                    backends: vec![BackendConfig {
                        address: "2001:db8:2::53".parse().unwrap(),
                        weight: 65535,
                        backup: false,
                    }],
                    health_check: HealthCheck::default(),
                    slow_start: Duration::ZERO,
                    tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
                    udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
                },
            ],
        };
        let config = ok(text);
        assert_eq!(config, expected);
        assert_eq!(config.backend_count(), 3);
        assert_eq!(config.services[0].protocol.number(), 6);
        assert_eq!(config.services[1].protocol.number(), 17);
        assert_eq!(config.services[0].scheduler.code(), SCHED_MAGLEV);
        assert_eq!(config.services[1].scheduler.code(), SCHED_IP_HASH);
        assert_eq!(config.services[0].forwarding.code(), FORWARD_TUNNEL);
        assert_eq!(config.services[1].forwarding.code(), FORWARD_DIRECT);
    }

    #[test]
    fn defaults_are_applied() {
        let text = r#"
[agent]
interface = "eth0"
tunnel_source = "198.51.100.1"

[[service]]
name = "web"
vip = "198.51.100.10"
port = 80
protocol = "tcp"

[[service.backend]]
address = "203.0.113.11"
"#;
        let config = ok(text);
        assert_eq!(config.agent.xdp_mode, XdpMode::Auto);
        assert_eq!(config.agent.tunnel_source_v6, None);
        assert_eq!(config.agent.conntrack_entries, DEFAULT_CONNTRACK_ENTRIES);
        assert_eq!(config.agent.conntrack_entries, 1 << 20);
        let service = &config.services[0];
        assert_eq!(service.scheduler, Scheduler::Maglev);
        assert_eq!(service.forwarding, Forwarding::Tunnel);
        assert_eq!(service.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(service.backends[0].weight, 1);
    }

    #[test]
    fn repo_config_files_parse() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config"));
        let mut count = 0;
        for entry in std::fs::read_dir(dir).expect("config/ exists") {
            let path = entry.expect("readable config/").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                if let Err(err) = load(&path) {
                    panic!("{err}");
                }
                count += 1;
            }
        }
        assert!(count >= 1, "no config/*.toml found in {}", dir.display());
    }

    #[test]
    fn example_config_has_the_documented_shape() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/example.toml"
        ));
        let config = load(path).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.services.len(), 2);
        let [tcp, udp] = &config.services[..] else {
            unreachable!()
        };
        assert_eq!(
            (
                tcp.protocol,
                tcp.scheduler,
                tcp.forwarding,
                tcp.backends.len()
            ),
            (Protocol::Tcp, Scheduler::Maglev, Forwarding::Tunnel, 3)
        );
        assert!(tcp.backends.windows(2).any(|w| w[0].weight != w[1].weight));
        assert_eq!(
            (udp.protocol, udp.scheduler, udp.forwarding),
            (Protocol::Udp, Scheduler::IpHash, Forwarding::Direct)
        );
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            !text.contains("192.0.2."),
            "example.toml must not use 192.0.2.0/24"
        );
    }

    #[test]
    fn same_vip_with_port_zero_and_specific_port_is_allowed() {
        let text = format!(
            "{}{}{}",
            web("", &[backend("203.0.113.11")]),
            service("any", "198.51.100.10", 0, "", &[backend("203.0.113.12")]),
            service("udp", "198.51.100.10", 80, "", &[backend("203.0.113.13")])
                .replace("\"tcp\"", "\"udp\""),
        );
        assert_eq!(ok(&text).services.len(), 3);
    }

    #[test]
    fn same_backend_in_two_services_is_allowed() {
        let text = format!(
            "{}{}",
            web("", &[backend("203.0.113.11")]),
            service("tls", "198.51.100.10", 443, "", &[backend("203.0.113.11")]),
        );
        assert_eq!(ok(&text).backend_count(), 2);
    }

    #[test]
    fn direct_forwarding_needs_no_tunnel_source() {
        let text = format!(
            "[agent]\ninterface = \"eth0\"\n{}",
            service(
                "web",
                "198.51.100.10",
                80,
                "forwarding = \"direct\"",
                &[backend("198.51.100.21")]
            )
        );
        assert_eq!(ok(&text).agent.tunnel_source, None);
    }

    #[test]
    fn zero_weight_backend_is_allowed_next_to_a_weighted_one() {
        let config = ok(&web(
            "",
            &[weighted("203.0.113.11", 0), weighted("203.0.113.12", 2)],
        ));
        assert_eq!(config.services[0].backends[0].weight, 0);
    }

    #[test]
    fn smallest_and_largest_ring_sizes_are_accepted() {
        assert_eq!(
            ok(&web("ring_size = 2", &[backend("203.0.113.11")])).services[0].ring_size,
            2
        );
        assert_eq!(
            ok(&web("ring_size = 65537", &[backend("203.0.113.11")])).services[0].ring_size,
            65537
        );
    }

    // --- error format ---------------------------------------------------------------

    #[test]
    fn error_display_is_file_key_reason() {
        let text = format!(
            "{}{}",
            web("", &[backend("203.0.113.11")]),
            service("tls", "198.51.100.10", 443, "", &[backend("203.0.113.x")]),
        );
        let err = rejects(&text, "service[1].backend[0].address", "203.0.113.x");
        assert_eq!(
            err.to_string(),
            "weir.toml: service[1].backend[0].address: invalid IP address \"203.0.113.x\""
        );
    }

    #[test]
    fn load_of_a_missing_file_is_a_config_error() {
        let path = Path::new("/nonexistent/weir.toml");
        let err = load(path).expect_err("no such file");
        assert_eq!(err.file, path);
        assert_eq!(err.key, NO_KEY);
        assert!(err.reason.contains("cannot read"), "{err}");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/weir.toml: -: cannot read")
        );
    }

    #[test]
    fn toml_syntax_error_has_line_and_column() {
        let text = format!("{AGENT}\n[[service]\nname = \"web\"\n");
        let err = rejects(&text, NO_KEY, "invalid TOML at line 7, column");
        assert!(!err.reason.contains('\n'), "{err}");
    }

    #[test]
    fn duplicate_toml_key_is_a_syntax_error() {
        rejects(
            "[agent]\ninterface = \"eth0\"\ninterface = \"eth1\"\n",
            NO_KEY,
            "line 3",
        );
    }

    #[test]
    fn type_error_names_key_and_line() {
        let err = rejects(
            &web(
                "",
                &[weighted("203.0.113.11", 1).replace("= 1", "= \"heavy\"")],
            ),
            "service[0].backend[0].weight",
            "invalid type",
        );
        assert!(err.reason.contains("(line 15, column 10)"), "{err}");
    }

    // --- unknown keys ---------------------------------------------------------------

    #[test]
    fn unknown_top_level_key() {
        let text = format!(
            "{}\n[metrics]\naddress = \"x\"\n",
            web("", &[backend("203.0.113.11")])
        );
        rejects(&text, "metrics", "unknown field");
    }

    #[test]
    fn unknown_agent_key() {
        let text = web("", &[backend("203.0.113.11")])
            .replace("[agent]\n", "[agent]\ninterfaces = \"eth1\"\n");
        rejects(&text, "agent.interfaces", "unknown field `interfaces`");
    }

    #[test]
    fn unknown_service_key() {
        rejects(
            &web("weight = 3", &[backend("203.0.113.11")]),
            "service[0].weight",
            "unknown field `weight`",
        );
    }

    #[test]
    fn unknown_backend_key() {
        let text = format!(
            "{}{}",
            web("", &[backend("203.0.113.11")]),
            service(
                "tls",
                "198.51.100.10",
                443,
                "",
                &[
                    backend("203.0.113.11"),
                    format!("{}\nport = 8443", backend("203.0.113.12"))
                ]
            ),
        );
        rejects(&text, "service[1].backend[1].port", "unknown field `port`");
    }

    #[test]
    fn plural_services_table_is_an_unknown_key() {
        let text = web("", &[backend("203.0.113.11")]).replace("[[service]]", "[[services]]");
        rejects(&text, "services", "unknown field");
    }

    #[test]
    fn unknown_enum_value() {
        let text = web("", &[backend("203.0.113.11")])
            .replace("[agent]\n", "[agent]\nxdp_mode = \"offload\"\n");
        rejects(&text, "agent.xdp_mode", "unknown variant `offload`");
        rejects(
            &web("scheduler = \"random\"", &[backend("203.0.113.11")]),
            "service[0].scheduler",
            "unknown variant",
        );
        rejects(
            &web("forwarding = \"nat\"", &[backend("203.0.113.11")]),
            "service[0].forwarding",
            "unknown variant",
        );
        rejects(
            &web("", &[backend("203.0.113.11")]).replace("\"tcp\"", "\"sctp\""),
            "service[0].protocol",
            "unknown variant",
        );
    }

    #[test]
    fn missing_required_key() {
        let text = web("", &[backend("203.0.113.11")]).replace("port = 80\n", "");
        rejects(&text, "service[0].port", "missing field");
        let text = web("", &["weight = 1".to_owned()]);
        rejects(&text, "service[0].backend[0].address", "missing field");
    }

    // --- [agent] --------------------------------------------------------------------

    #[test]
    fn missing_agent_table() {
        let text = service("web", "198.51.100.10", 80, "", &[backend("203.0.113.11")]);
        rejects(&text, "agent", "[agent] table is missing");
    }

    #[test]
    fn missing_interface() {
        let text = web("", &[backend("203.0.113.11")]).replace("interface = \"eth0\"\n", "");
        rejects(&text, "agent.interface", "missing field");
    }

    #[test]
    fn empty_interface() {
        let text = web("", &[backend("203.0.113.11")]).replace("\"eth0\"", "\"\"");
        rejects(&text, "agent.interface", "must not be empty");
    }

    #[test]
    fn invalid_interface_name() {
        let text = web("", &[backend("203.0.113.11")]).replace("\"eth0\"", "\"a-very-long-name0\"");
        rejects(&text, "agent.interface", "longer than 15 bytes");
        let text = web("", &[backend("203.0.113.11")]).replace("\"eth0\"", "\"eth 0\"");
        rejects(&text, "agent.interface", "not a valid interface name");
    }

    #[test]
    fn conntrack_entries_zero() {
        let text = web("", &[backend("203.0.113.11")])
            .replace("[agent]\n", "[agent]\nconntrack_entries = 0\n");
        rejects(
            &text,
            "agent.conntrack_entries",
            "0 is out of range (1..=67108864)",
        );
    }

    #[test]
    fn conntrack_entries_too_large() {
        let text = web("", &[backend("203.0.113.11")])
            .replace("[agent]\n", "[agent]\nconntrack_entries = 67108865\n");
        rejects(&text, "agent.conntrack_entries", "67108865 is out of range");
        let text = web("", &[backend("203.0.113.11")])
            .replace("[agent]\n", "[agent]\nconntrack_entries = 67108864\n");
        assert_eq!(ok(&text).agent.conntrack_entries, MAX_CONNTRACK_ENTRIES);
    }

    #[test]
    fn invalid_tunnel_source() {
        let base = web("", &[backend("203.0.113.11")]);
        rejects(
            &base.replace("\"198.51.100.1\"", "\"198.51.100\""),
            "agent.tunnel_source",
            "invalid IPv4 address \"198.51.100\"",
        );
        rejects(
            &base.replace("\"198.51.100.1\"", "\"2001:db8::2\""),
            "agent.tunnel_source",
            "is an IPv6 address",
        );
        rejects(
            &base.replace("\"2001:db8::1\"", "\"198.51.100.2\""),
            "agent.tunnel_source_v6",
            "is an IPv4 address",
        );
        rejects(
            &base.replace("\"198.51.100.1\"", "\"0.0.0.0\""),
            "agent.tunnel_source",
            "unspecified",
        );
    }

    #[test]
    fn tunnel_source_prefix() {
        let base = web("", &[backend("203.0.113.11")]);
        assert_eq!(ok(&base).agent.tunnel_source_prefix, None);
        let with = |prefix: &str| {
            base.replace(
                "tunnel_source = \"198.51.100.1\"\n",
                &format!("tunnel_source = \"198.51.100.1\"\ntunnel_source_prefix = \"{prefix}\"\n"),
            )
        };
        let prefix = ok(&with("198.51.100.16/28"))
            .agent
            .tunnel_source_prefix
            .unwrap();
        assert_eq!(
            prefix,
            SourcePrefix {
                network: Ipv4Addr::new(198, 51, 100, 16),
                len: 28
            }
        );
        assert_eq!(prefix.host_mask(), 0x0f);
        let one = ok(&with("198.51.100.1/32"))
            .agent
            .tunnel_source_prefix
            .unwrap();
        assert_eq!(one.host_mask(), 0);
        let key = "agent.tunnel_source_prefix";
        rejects(
            &with("198.51.100.17/28"),
            key,
            "host bits set; the prefix is 198.51.100.16/28",
        );
        rejects(&with("198.51.100.0/8"), key, "must be 16..=32");
        rejects(&with("198.51.100.0/33"), key, "must be 16..=32");
        rejects(&with("198.51.100.0"), key, "expected an IPv4 prefix");
        rejects(&with("2001:db8::/64"), key, "IPv6 prefix");
        rejects(&with("198.51.100/24"), key, "invalid IPv4 address");
        rejects(&with("127.0.0.0/24"), key, "cannot be a source address");
        rejects(
            &with("198.51.100.16/28").replace("tunnel_source = \"198.51.100.1\"\n", ""),
            key,
            "needs tunnel_source",
        );
    }

    #[test]
    fn tunnel_ipv4_backend_needs_tunnel_source() {
        let text = web("", &[backend("2001:db8:1::11"), backend("203.0.113.11")])
            .replace("tunnel_source = \"198.51.100.1\"\n", "");
        let err = rejects(&text, "agent.tunnel_source", "service \"web\" (service[0])");
        assert!(err.reason.contains("IPv4 backend 203.0.113.11"), "{err}");
        assert!(err.reason.contains("service[0].backend[1]"), "{err}");
    }

    #[test]
    fn tunnel_ipv6_backend_needs_tunnel_source_v6() {
        let text = web("", &[backend("203.0.113.11"), backend("2001:db8:1::11")])
            .replace("tunnel_source_v6 = \"2001:db8::1\"\n", "");
        let err = rejects(
            &text,
            "agent.tunnel_source_v6",
            "service \"web\" (service[0])",
        );
        assert!(err.reason.contains("IPv6 backend 2001:db8:1::11"), "{err}");
    }

    // --- [[service]] ----------------------------------------------------------------

    #[test]
    fn no_services() {
        rejects(AGENT, "service", "at least one [[service]] is required");
    }

    #[test]
    fn too_many_services() {
        let mut text = AGENT.to_owned();
        for i in 0..=MAX_SERVICES {
            let port = u16::try_from(i + 1).unwrap();
            text.push_str(&service(
                &format!("s{i}"),
                "198.51.100.10",
                port,
                "",
                &[backend("203.0.113.11")],
            ));
        }
        rejects(&text, "service", "65 services, but at most 64");
    }

    #[test]
    fn too_many_backends_in_total() {
        let backends = |base: u32| -> Vec<String> {
            (0..2049)
                .map(|i| backend(&format!("2001:db8:1::{:x}", base + i)))
                .collect()
        };
        let text = format!(
            "{AGENT}{}{}",
            service("a", "198.51.100.10", 80, "", &backends(1)),
            service("b", "198.51.100.10", 81, "", &backends(1)),
        );
        rejects(&text, "service", "4098 backends in total");
    }

    #[test]
    fn duplicate_service_name() {
        let text = format!(
            "{}{}",
            web("", &[backend("203.0.113.11")]),
            service("web", "198.51.100.11", 80, "", &[backend("203.0.113.11")]),
        );
        rejects(
            &text,
            "service[1].name",
            "duplicate service name \"web\" (also service[0])",
        );
    }

    #[test]
    fn invalid_service_name() {
        let text = web("", &[backend("203.0.113.11")]).replace("\"web\"", "\"\"");
        rejects(&text, "service[0].name", "must not be empty");
        let text = web("", &[backend("203.0.113.11")]).replace("\"web\"", "\"my web\"");
        rejects(&text, "service[0].name", "contains characters");
        let long = "x".repeat(MAX_SERVICE_NAME_LEN + 1);
        let text = web("", &[backend("203.0.113.11")]).replace("\"web\"", &format!("\"{long}\""));
        rejects(&text, "service[0].name", "longer than 64 bytes");
    }

    #[test]
    fn duplicate_vip_port_protocol() {
        let text = format!(
            "{}{}",
            web("", &[backend("203.0.113.11")]),
            service("web2", "198.51.100.10", 80, "", &[backend("203.0.113.12")]),
        );
        rejects(
            &text,
            "service[1].vip",
            "duplicate VIP: 198.51.100.10 port 80/tcp is already used by service \"web\" (service[0])",
        );
        let text = format!(
            "{}{}{}",
            web("", &[backend("203.0.113.11")]),
            service("all", "198.51.100.10", 0, "", &[backend("203.0.113.12")]),
            service("all2", "198.51.100.10", 0, "", &[backend("203.0.113.12")]),
        );
        rejects(&text, "service[2].vip", "every port (0)/tcp");
    }

    #[test]
    fn invalid_vip_address() {
        let text =
            web("", &[backend("203.0.113.11")]).replace("\"198.51.100.10\"", "\"vip.example\"");
        rejects(
            &text,
            "service[0].vip",
            "invalid IP address \"vip.example\"",
        );
    }

    #[test]
    fn special_vip_addresses_are_rejected() {
        for (vip, what) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("::1", "loopback"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::ffff:198.51.100.10", "IPv4-mapped"),
        ] {
            let text = format!(
                "{AGENT}{}",
                service("web", vip, 80, "", &[backend("203.0.113.11")])
            );
            rejects(&text, "service[0].vip", what);
        }
    }

    #[test]
    fn port_out_of_range() {
        let text = web("", &[backend("203.0.113.11")]).replace("port = 80", "port = 65536");
        rejects(&text, "service[0].port", "65536 is out of range");
        let text = web("", &[backend("203.0.113.11")]).replace("port = 80", "port = -1");
        rejects(&text, "service[0].port", "-1 is out of range");
    }

    #[test]
    fn ring_size_not_prime() {
        let err = rejects(
            &web("ring_size = 65536", &[backend("203.0.113.11")]),
            "service[0].ring_size",
            "not prime",
        );
        assert_eq!(
            err.to_string(),
            "weir.toml: service[0].ring_size: 65536 is not prime (the Maglev ring size must be \
             a prime, e.g. 65537)"
        );
        rejects(
            &web("ring_size = 1", &[backend("203.0.113.11")]),
            "service[0].ring_size",
            "1 is not prime",
        );
    }

    #[test]
    fn ring_size_zero() {
        rejects(
            &web("ring_size = 0", &[backend("203.0.113.11")]),
            "service[0].ring_size",
            "0 is out of range",
        );
    }

    #[test]
    fn ring_size_too_large() {
        rejects(
            &web("ring_size = 65539", &[backend("203.0.113.11")]),
            "service[0].ring_size",
            "65539 is too large (at most 65537)",
        );
    }

    #[test]
    fn ring_size_smaller_than_backend_count() {
        rejects(
            &web(
                "ring_size = 2",
                &[
                    backend("203.0.113.11"),
                    backend("203.0.113.12"),
                    backend("203.0.113.13"),
                ],
            ),
            "service[0].ring_size",
            "smaller than the number of backends (3)",
        );
    }

    // --- [[service.backend]] --------------------------------------------------------

    #[test]
    fn no_backends() {
        rejects(&web("", &[]), "service[0].backend", "no backends");
    }

    #[test]
    fn zero_total_weight() {
        rejects(
            &web(
                "",
                &[weighted("203.0.113.11", 0), weighted("203.0.113.12", 0)],
            ),
            "service[0].backend",
            "zero total weight: at least one backend needs weight > 0",
        );
    }

    #[test]
    fn duplicate_backend_address() {
        rejects(
            &web(
                "",
                &[
                    backend("203.0.113.11"),
                    backend("203.0.113.12"),
                    backend("203.0.113.11"),
                ],
            ),
            "service[0].backend[2].address",
            "duplicate backend 203.0.113.11 (also service[0].backend[0])",
        );
        // Same address, different spelling.
        rejects(
            &web(
                "",
                &[backend("2001:db8:1::11"), backend("2001:db8:1:0:0:0:0:11")],
            ),
            "service[0].backend[1].address",
            "duplicate backend",
        );
    }

    #[test]
    fn weight_out_of_range() {
        rejects(
            &web("", &[weighted("203.0.113.11", 65536)]),
            "service[0].backend[0].weight",
            "65536 is out of range (0..=65535",
        );
        rejects(
            &web("", &[weighted("203.0.113.11", -1)]),
            "service[0].backend[0].weight",
            "-1 is out of range",
        );
    }

    #[test]
    fn invalid_backend_address() {
        rejects(
            &web("", &[backend("203.0.113.11/32")]),
            "service[0].backend[0].address",
            "invalid IP address \"203.0.113.11/32\"",
        );
    }

    #[test]
    fn special_backend_addresses_are_rejected() {
        for (address, what) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("239.1.1.1", "multicast"),
            ("ff05::2", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            rejects(
                &web("", &[backend("203.0.113.11"), backend(address)]),
                "service[0].backend[1].address",
                what,
            );
        }
    }

    #[test]
    fn direct_forwarding_with_other_family_backend() {
        let err = rejects(
            &web(
                "forwarding = \"direct\"",
                &[backend("198.51.100.21"), backend("2001:db8:1::21")],
            ),
            "service[0].backend[1].address",
            "forwarding = \"direct\"",
        );
        assert!(
            err.reason
                .contains("IPv6 backend 2001:db8:1::21 for IPv4 VIP"),
            "{err}"
        );
        let text = format!(
            "{AGENT}{}",
            service(
                "v6",
                "2001:db8::10",
                80,
                "forwarding = \"direct\"",
                &[backend("198.51.100.21")]
            )
        );
        rejects(
            &text,
            "service[0].backend[0].address",
            "IPv4 backend 198.51.100.21 for IPv6 VIP",
        );
    }

    #[test]
    fn tunnel_forwarding_allows_mixed_families() {
        let config = ok(&web(
            "",
            &[backend("203.0.113.11"), backend("2001:db8:1::11")],
        ));
        assert_eq!(config.services[0].backends.len(), 2);
    }

    #[test]
    fn helpers() {
        let primes: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(65537));
        assert!(!is_prime(65536));
        assert!(!is_prime(65535));
        assert!(is_prime(4_294_967_291));
        assert_eq!(line_column("ab\ncdé\nx", 7), "line 2, column 4");
        assert!(rules::check_vip("198.51.100.1".parse().unwrap()).is_ok());
        assert!(rules::check_vip("127.0.0.1".parse().unwrap()).is_err());
        for mode in [XdpMode::Auto, XdpMode::Native, XdpMode::Generic] {
            assert_eq!(mode.to_string(), mode.as_str());
        }
        assert_eq!(Scheduler::IpHash.to_string(), "ip-hash");
    }
}
