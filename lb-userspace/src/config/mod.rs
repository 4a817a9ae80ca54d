//! The configuration file of `weir agent`: the public validated types, the constants and
//! defaults of its keys, [`load`] and [`parse`], and [`ConfigError`].
//!
//! Parsing happens in two layers. The private `Raw*` structs of `raw` mirror the file
//! exactly (every table rejects unknown keys, numbers are read as `i64` so range errors get
//! a clear reason) and are deserialised through `serde_path_to_error`, so even a type error
//! names the key it is about. `validate` then turns them into the public types below,
//! which hold only checked values with the defaults filled in: the agent never sees a
//! config it cannot load. [`rules`] holds the value rules the CLI shares.
//!
//! Every error is a [`ConfigError`] naming the file, the key (`service[0].backend[2].weight`)
//! and the reason. Validation stops at the first problem, in file order.
//!
//! New optional keys (health checks, an API socket, a metrics address) go into the `Raw*`
//! struct as `Option<_>`/`#[serde(default)]` fields plus a checked field on the public type,
//! so older files stay valid.

mod rate_limit;
mod raw;
pub mod rules;
mod validate;

#[cfg(test)]
mod tests;

pub use rate_limit::{FlowLimit, RateLimitConfig};
pub use validate::parse_duration;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_common::{
    FORWARD_DIRECT, FORWARD_FULLNAT, FORWARD_NAT, FORWARD_TUNNEL, PROTO_TCP, PROTO_UDP,
    SCHED_IP_HASH, SCHED_MAGLEV,
};
use serde::Deserialize;

/// The largest accepted `agent.conntrack_entries` (2^26 entries).
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 26;

/// The largest accepted `agent.nat_connections` (2^24 pairs: `NAT_CT` holds twice as many
/// entries, about 6 GB when full, allocated as connections come).
pub const MAX_NAT_CONNECTIONS: u32 = 1 << 24;

/// The largest accepted backend `weight`.
pub const MAX_WEIGHT: u32 = 65535;

/// The longest accepted service `name`, in bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 64;

/// Most interfaces one agent attaches to (`[agent] interfaces`): a client arm and a backend
/// arm, with room for bonds of several NICs. Each is also a redirect target of `TX_PORTS`.
pub const MAX_INTERFACES: usize = 8;

/// The longest accepted health-check interval.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// The longest duration any key takes (a week): bounds every duration before it is added
/// to a clock, where an overflow would panic.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

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
    /// The `[announce]` table: `None` when the file has none (the agent announces nothing).
    pub announce: Option<AnnounceConfig>,
    /// The `[[service]]` tables, in file order (at least one, at most `MAX_SERVICES`).
    pub services: Vec<ServiceConfig>,
    /// The `[api]` table: the remote management API (HTTPS only), if configured.
    pub api: Option<RemoteApiConfig>,
}

/// `[api]`: the remote management API. HTTPS only, every request authenticated by a bearer
/// token whose SHA-256 is listed in `[[api.token]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteApiConfig {
    /// `listen`: the TCP address of the TLS listener.
    pub listen: SocketAddr,
    /// `cert`: the server's certificate chain (PEM).
    pub cert: PathBuf,
    /// `key`: the server's private key (PEM).
    pub key: PathBuf,
    /// `[[api.token]]`, at least one.
    pub tokens: Vec<ApiToken>,
}

/// `[[api.token]]`: one bearer token, known by the SHA-256 of its text only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// `name`: who holds it, as the audit log records it.
    pub name: String,
    pub scope: TokenScope,
    /// `sha256`: the SHA-256 of the token's text (64 hex digits in the file).
    pub sha256: [u8; 32],
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    /// `read`: every request that changes nothing (status, lists, stats, `conn list`).
    Read,
    /// `admin`: every request.
    Admin,
}

/// Default `[agent] audit_log`.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/weir/audit.jsonl";
/// Default `[agent] audit_max_bytes` (64 MiB).
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 64 << 20;
/// Smallest accepted `[agent] audit_max_bytes`.
pub const MIN_AUDIT_MAX_BYTES: u64 = 4096;
/// Default `[agent] audit_keep`.
pub const DEFAULT_AUDIT_KEEP: u32 = 5;
/// Largest accepted `[agent] audit_keep`.
pub const MAX_AUDIT_KEEP: u32 = 100;

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
    /// The interfaces the balancer attaches to (`interface`, or `interfaces` for two-arm
    /// and more): 1..=[`MAX_INTERFACES`] valid names, distinct. The first holds the link
    /// pin `link`, the others `link.<name>`.
    pub interfaces: Vec<String>,
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
    /// Capacity of the half-open table (flows before their handshake's ACK or their second
    /// datagram; an LRU): default a quarter of `conntrack_entries`, at least
    /// `lb_common::MIN_HALF_OPEN_ENTRIES`.
    pub half_open_entries: u32,
    /// New flows per second on one CPU above which it schedules new flows by the consistent
    /// hash (flood mode); 0: only a full connection table does. Default: a quarter of
    /// `half_open_entries`, so that half-open entries outlive a handshake under the rate.
    pub flood_threshold: u32,
    /// Capacity of the NAT connection table in connections (1..=`MAX_NAT_CONNECTIONS`);
    /// the map (`NAT_CT`) holds two entries per connection.
    pub nat_connections: u32,
    /// Unix socket of the management API (mode 0600).
    pub api_socket: PathBuf,
    /// Listen address of the Prometheus `/metrics` endpoint.
    pub metrics: SocketAddr,
    /// Directory in a bpffs where the XDP link and the maps are pinned.
    pub bpffs: PathBuf,
    /// File where changes made from the CLI are kept across agent restarts.
    pub state_file: PathBuf,
    /// Whether the balancer answers ICMP / ICMPv6 echo requests to VIP addresses itself
    /// (from XDP). Default on: a VIP answers ping as a host would.
    pub answer_ping: bool,
    /// `fullnat`'s source ports, inclusive, host order (1024..=65535, low <= high). Default
    /// `lb_common::nat::DEFAULT_SNAT_PORTS`, above Linux's default ephemeral range.
    pub snat_ports: (u16, u16),
    /// Whether the agent adds the part of `snat_ports` that overlaps the kernel's
    /// ephemeral range to `net.ipv4.ip_local_reserved_ports` of its namespace (default
    /// on); off, such an overlap stops the agent at start.
    pub reserve_snat_ports: bool,
    /// The audit log (`audit_log`): one JSON line per change to the running state.
    pub audit_log: PathBuf,
    /// `audit_max_bytes`: the size at which the audit log is rotated.
    pub audit_max_bytes: u64,
    /// `audit_keep`: rotated audit files kept (`FILE.1` .. `FILE.N`).
    pub audit_keep: u32,
}

/// `[announce]`: the VIPs become routes on a TUN device of the agent's own, in a routing
/// table of their own, which BIRD imports (`protocol kernel { kernel table N; learn; }`) and
/// announces over BGP (see `crate::announce`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Name of the TUN device the routes are on (not the balancer's interface).
    pub device: String,
    /// The kernel routing table that holds them: not 0 and not one of the kernel's own
    /// (253 default, 254 main, 255 local).
    pub table: u32,
}

/// Default `[announce] device`.
pub const DEFAULT_ANNOUNCE_DEVICE: &str = "weir-vips";
/// Default `[announce] table`.
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 100;

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

impl AgentConfig {
    /// The first of `interfaces`: the one named in messages, whose link pin is `link`.
    #[must_use]
    pub fn interface(&self) -> &str {
        self.interfaces.first().map_or("", String::as_str)
    }
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
    /// `fullnat`: the addresses clients are translated to (1..=`MAX_SNAT_ADDRS`, unique,
    /// of the VIP's family, local to the balancer); empty for the other modes.
    pub snat_addresses: Vec<IpAddr>,
    /// Source rules (`allow`, `deny`), checked before a flow is scheduled: at most
    /// `rules::MAX_RULES_PER_SERVICE` together, each of the VIP's family, no prefix twice.
    pub source_rules: Vec<SourceRule>,
    /// `[service.rate_limit]`: limits on new flows per source (prefix) and per VIP.
    pub rate_limit: RateLimitConfig,
    /// The `max_connections` of backends that do not set their own (those added from the
    /// CLI too); 0: no limit.
    pub max_connections: u32,
}

/// One prefix of a service's `allow` or `deny` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRule {
    /// The network address (host bits zero).
    pub network: IpAddr,
    pub len: u8,
    /// `true`: `allow`; `false`: `deny`.
    pub allow: bool,
}

/// Default `tcp_idle_timeout` (IPVS's TCP established timeout).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(900);
/// Default `tcp_idle_timeout` of a NAT service: 2 h 4 min (RFC 5382 REQ-5). A DSR flow that
/// loses its entry is recovered by the hash; a NATed one is broken, so it is kept longer.
pub const DEFAULT_NAT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(7440);
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
    /// Destination NAT: VIP:port becomes backend:port (`backend.port`), and the backends,
    /// whose gateway the balancer is, send their replies back through it, where the source
    /// becomes VIP:port again. Backends need nothing of the VIP; VIP and backend share a
    /// family.
    Nat,
    /// Destination and source NAT: as `nat`, and the client's address and port become one
    /// of the service's `snat_addresses` and a port of `[agent] snat_ports`. The replies
    /// are addressed to the balancer, so a backend needs nothing at all (no route through
    /// the balancer either). The backend sees the SNAT address, not the client's.
    Fullnat,
}

impl Forwarding {
    /// Whether the balancer rewrites addresses (the NAT modes) rather than delivering the
    /// packet as the client sent it (DSR).
    #[must_use]
    pub const fn is_nat(self) -> bool {
        matches!(self, Self::Nat | Self::Fullnat)
    }
}

impl Forwarding {
    /// The datapath's code for this mode (`FORWARD_*`).
    pub const fn code(self) -> u8 {
        match self {
            Self::Tunnel => FORWARD_TUNNEL,
            Self::Direct => FORWARD_DIRECT,
            Self::Nat => FORWARD_NAT,
            Self::Fullnat => FORWARD_FULLNAT,
        }
    }

    /// The name used in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tunnel => "tunnel",
            Self::Direct => "direct",
            Self::Nat => "nat",
            Self::Fullnat => "fullnat",
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
    /// The port the backend listens on (`nat` only); `None`: the service's port.
    pub port: Option<u16>,
    /// Active connections at which the backend takes no new flow (HAProxy `maxconn`):
    /// its own `max_connections`, else the service's; 0: no limit.
    pub max_connections: u32,
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| ConfigError::new(path, NO_KEY, format!("cannot read the file: {err}")))?;
    parse(&text, path)
}

/// Parses and validates `text`, the contents of `file` (used in errors only).
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    raw::deserialize(text)
        .and_then(validate::validate)
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
