//! The management API on the agent's Unix socket: one JSON request per connection, one JSON
//! response, then the connection closes. Requests are at most `MAX_REQUEST_BYTES` and are
//! terminated by a newline or by the client shutting down its write side.
//!
//! ```text
//! -> {"cmd":"backend_weight","service":"web","address":"198.51.100.11","weight":3}
//! <- {"ok":true,"data":{...}}
//! <- {"ok":false,"error":{"code":"unknown_backend","message":"..."}}
//! ```
//!
//! The types here are shared by the agent ([`server`]) and the CLI ([`client`]). The `data`
//! of an answer is a [`Reply`], one variant per kind of answer; fields with a fixed set of
//! values are enums that serialize as their lowercase names (`"draining"`, `"ip-hash"`).
//! This module depends on no other part of the agent: the agent converts its own types.

pub mod client;
pub mod http;
pub mod remote;
pub mod server;

pub use client::{ClientError, RemoteTarget, request, request_remote};

use std::net::{IpAddr, SocketAddr};

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Largest request the agent reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request. Unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Empty struct variants rather than unit variants: serde only rejects unknown fields of
    // struct variants in an internally tagged enum.
    Status {},
    ServiceList {},
    ServiceTable {
        service: String,
    },
    BackendList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    BackendAdd {
        service: String,
        address: IpAddr,
        #[serde(default = "default_weight")]
        weight: u32,
    },
    BackendRemove {
        service: String,
        address: IpAddr,
    },
    BackendWeight {
        service: String,
        address: IpAddr,
        weight: u32,
    },
    /// A backend's `max_connections` (0: no limit).
    BackendMaxConns {
        service: String,
        address: IpAddr,
        max_connections: u32,
    },
    /// No new flows; tracked flows stay.
    BackendDrain {
        service: String,
        address: IpAddr,
    },
    BackendEnable {
        service: String,
        address: IpAddr,
    },
    /// No new flows and tracked flows are re-picked.
    BackendDisable {
        service: String,
        address: IpAddr,
    },
    Stats {},
    Reload {},
    /// `weir announce withdraw`: withdraw every VIP of this balancer from BGP (kept in the
    /// state file until `announce_resume`); the datapath keeps forwarding what still comes.
    AnnounceWithdraw {},
    /// `weir announce resume`: announce the VIPs that can be served again.
    AnnounceResume {},
    /// The NAT connections (pairs of `NAT_CT`), optionally of one service, backend and/or
    /// state; at most `limit` (default [`CONN_LIST_DEFAULT_LIMIT`], at most
    /// [`CONN_LIST_MAX_LIMIT`]), with the total that matched.
    ConnList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<IpAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<ConnState>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Deletes the NAT connections (both entries of each pair) of a service and/or a
    /// backend, or every one with `all`. Refused without a filter and without `confirm`:
    /// a flush is never an accident.
    ConnFlush {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<IpAddr>,
        #[serde(default)]
        all: bool,
        #[serde(default)]
        confirm: bool,
    },
}

impl Request {
    /// The request's `cmd`, as the audit log names it.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Status {} => "status",
            Self::ServiceList {} => "service_list",
            Self::ServiceTable { .. } => "service_table",
            Self::BackendList { .. } => "backend_list",
            Self::BackendAdd { .. } => "backend_add",
            Self::BackendRemove { .. } => "backend_remove",
            Self::BackendWeight { .. } => "backend_weight",
            Self::BackendMaxConns { .. } => "backend_max_conns",
            Self::BackendDrain { .. } => "backend_drain",
            Self::BackendEnable { .. } => "backend_enable",
            Self::BackendDisable { .. } => "backend_disable",
            Self::Stats {} => "stats",
            Self::Reload {} => "reload",
            Self::AnnounceWithdraw {} => "announce_withdraw",
            Self::AnnounceResume {} => "announce_resume",
            Self::ConnList { .. } => "conn_list",
            Self::ConnFlush { .. } => "conn_flush",
        }
    }

    /// Whether the request changes the running state: audited, and refused to a read-only
    /// token of the remote API.
    #[must_use]
    pub const fn is_change(&self) -> bool {
        match self {
            Self::Status {}
            | Self::ServiceList {}
            | Self::ServiceTable { .. }
            | Self::BackendList { .. }
            | Self::Stats {}
            | Self::ConnList { .. } => false,
            Self::BackendAdd { .. }
            | Self::BackendRemove { .. }
            | Self::BackendWeight { .. }
            | Self::BackendMaxConns { .. }
            | Self::BackendDrain { .. }
            | Self::BackendEnable { .. }
            | Self::BackendDisable { .. }
            | Self::Reload {}
            | Self::AnnounceWithdraw {}
            | Self::AnnounceResume {}
            | Self::ConnFlush { .. } => true,
        }
    }

    /// What a change is about, for the audit log: `service/address`, `service`, or nothing.
    #[must_use]
    pub fn target(&self) -> Option<String> {
        match self {
            Self::BackendAdd {
                service, address, ..
            }
            | Self::BackendRemove { service, address }
            | Self::BackendWeight {
                service, address, ..
            }
            | Self::BackendMaxConns {
                service, address, ..
            }
            | Self::BackendDrain { service, address }
            | Self::BackendEnable { service, address }
            | Self::BackendDisable { service, address } => Some(format!("{service}/{address}")),
            Self::ConnFlush {
                service, backend, ..
            } => match (service, backend) {
                (Some(s), Some(b)) => Some(format!("{s}/{b}")),
                (Some(s), None) => Some(s.clone()),
                (None, Some(b)) => Some(b.to_string()),
                (None, None) => Some("all".to_owned()),
            },
            _ => None,
        }
    }
}

/// How many connections `conn_list` returns when the request gives no `limit`.
pub const CONN_LIST_DEFAULT_LIMIT: u32 = 1000;
/// The most connections one `conn_list` answer holds (about 250 bytes of JSON each).
pub const CONN_LIST_MAX_LIMIT: u32 = 100_000;

const fn default_weight() -> u32 {
    1
}

/// Machine-readable error codes; the CLI maps them to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, unknown command or field, too large.
    BadRequest,
    UnknownService,
    UnknownBackend,
    InvalidAddress,
    /// The change conflicts with the current state (e.g. the backend already exists).
    Conflict,
    /// `reload`: the config file is invalid; the running config stays in force.
    InvalidConfig,
    Internal,
    /// Remote API: no bearer token, or one that is not configured (HTTP 401).
    Unauthorized,
    /// Remote API: the token's scope does not allow the request (HTTP 403).
    Forbidden,
}

impl ErrorCode {
    /// The HTTP status the remote API answers an error with.
    #[must_use]
    pub const fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::UnknownService | Self::UnknownBackend => 404,
            Self::Conflict => 409,
            Self::InvalidAddress | Self::InvalidConfig => 422,
            Self::Internal => 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// A response: `ok` with `data`, or not `ok` with `error`.
///
/// The agent serializes it; the client reads it with [`Response::from_json`], which needs
/// the request: the `data` of an answer is the bare [`Reply`] (no tag says which), and the
/// request says which one to expect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Reply>,
}

impl Response {
    pub fn ok(data: impl Into<Reply>) -> Self {
        Self {
            ok: true,
            error: None,
            data: Some(data.into()),
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(ApiError {
                code,
                message: message.into(),
            }),
            data: None,
        }
    }

    /// Reads the agent's answer to `request`: its `data`, if any, must be the [`Reply`] that
    /// answers such a request. Unknown fields are ignored, as newer agents may add some.
    pub fn from_json(text: &str, request: &Request) -> serde_json::Result<Self> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let response = ResponseSeed(ReplyKind::of(request)).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(response)
    }
}

/// The `data` of a successful answer, one variant per kind of answer. On the wire it is the
/// payload alone (`untagged`): `{"ok":true,"data":{"version":...}}` for a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
#[expect(
    clippy::large_enum_variant,
    reason = "one reply per API request, serialized at once: its size costs nothing"
)]
pub enum Reply {
    /// `status`.
    Status(Status),
    /// `service_list`.
    ServiceList(Vec<ServiceInfo>),
    /// `service_table`.
    ServiceTable(ServiceTable),
    /// `backend_list`.
    BackendList(Vec<BackendInfo>),
    /// A backend change: the backend as it is now.
    Backend(BackendInfo),
    /// A backend change that left the service without the backend (`backend_remove`).
    Removed(Removed),
    /// `stats`.
    Stats(Stats),
    /// `reload`.
    Reload(ReloadReport),
    /// `conn_list`.
    ConnList(ConnList),
    /// `conn_flush`.
    ConnFlush(ConnFlushed),
    /// `announce_withdraw`, `announce_resume`: the announcements as they are now.
    Announce(AnnounceStatus),
}

/// Conversions between each payload and its [`Reply`] variant: `Response::ok(status)`, and
/// `Status::try_from(reply)` (which hands back any other reply as the error).
macro_rules! reply_payloads {
    ($($variant:ident($payload:ty)),* $(,)?) => {$(
        impl From<$payload> for Reply {
            fn from(payload: $payload) -> Self {
                Self::$variant(payload)
            }
        }

        impl TryFrom<Reply> for $payload {
            type Error = Reply;

            fn try_from(reply: Reply) -> Result<Self, Reply> {
                match reply {
                    Reply::$variant(payload) => Ok(payload),
                    other => Err(other),
                }
            }
        }
    )*};
}
reply_payloads!(
    Status(Status),
    ServiceList(Vec<ServiceInfo>),
    ServiceTable(ServiceTable),
    BackendList(Vec<BackendInfo>),
    Backend(BackendInfo),
    Removed(Removed),
    Stats(Stats),
    Reload(ReloadReport),
    ConnList(ConnList),
    ConnFlush(ConnFlushed),
    Announce(AnnounceStatus),
);

/// Which [`Reply`] answers a request: what the client reads the `data` as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    Status,
    ServiceList,
    ServiceTable,
    BackendList,
    /// [`Reply::Backend`], or [`Reply::Removed`] once the backend is gone.
    BackendChange,
    Stats,
    Reload,
    ConnList,
    ConnFlush,
    Announce,
}

impl ReplyKind {
    const fn of(request: &Request) -> Self {
        match request {
            Request::Status {} => Self::Status,
            Request::ServiceList {} => Self::ServiceList,
            Request::ServiceTable { .. } => Self::ServiceTable,
            Request::BackendList { .. } => Self::BackendList,
            Request::BackendAdd { .. }
            | Request::BackendRemove { .. }
            | Request::BackendWeight { .. }
            | Request::BackendMaxConns { .. }
            | Request::BackendDrain { .. }
            | Request::BackendEnable { .. }
            | Request::BackendDisable { .. } => Self::BackendChange,
            Request::Stats {} => Self::Stats,
            Request::Reload {} => Self::Reload,
            Request::ConnList { .. } => Self::ConnList,
            Request::ConnFlush { .. } => Self::ConnFlush,
            Request::AnnounceWithdraw {} | Request::AnnounceResume {} => Self::Announce,
        }
    }
}

/// The answer to a backend change: tried in this order, and [`Removed`] denies unknown
/// fields, so a [`BackendInfo`] is never taken for one.
#[derive(Deserialize)]
#[serde(untagged)]
enum BackendChange {
    Backend(BackendInfo),
    Removed(Removed),
}

impl<'de> DeserializeSeed<'de> for ReplyKind {
    type Value = Reply;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Reply, D::Error> {
        Ok(match self {
            Self::Status => Reply::Status(Status::deserialize(deserializer)?),
            Self::ServiceList => Reply::ServiceList(Vec::deserialize(deserializer)?),
            Self::ServiceTable => Reply::ServiceTable(ServiceTable::deserialize(deserializer)?),
            Self::BackendList => Reply::BackendList(Vec::deserialize(deserializer)?),
            Self::BackendChange => match BackendChange::deserialize(deserializer)? {
                BackendChange::Backend(backend) => Reply::Backend(backend),
                BackendChange::Removed(removed) => Reply::Removed(removed),
            },
            Self::Stats => Reply::Stats(Stats::deserialize(deserializer)?),
            Self::Reload => Reply::Reload(ReloadReport::deserialize(deserializer)?),
            Self::ConnList => Reply::ConnList(ConnList::deserialize(deserializer)?),
            Self::ConnFlush => Reply::ConnFlush(ConnFlushed::deserialize(deserializer)?),
            Self::Announce => Reply::Announce(AnnounceStatus::deserialize(deserializer)?),
        })
    }
}

/// Reads a [`Response`] whose `data` is of the given kind.
struct ResponseSeed(ReplyKind);

impl<'de> DeserializeSeed<'de> for ResponseSeed {
    type Value = Response;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Response, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ResponseSeed {
    type Value = Response;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with `ok` and `data` or `error`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Response, A::Error> {
        let (mut ok, mut error, mut data) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            let duplicate = match key.as_str() {
                "ok" => ok.replace(map.next_value()?).is_some(),
                "error" => error.replace(map.next_value::<ApiError>()?).is_some(),
                "data" => data.replace(map.next_value_seed(self.0)?).is_some(),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    false
                }
            };
            if duplicate {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
        }
        Ok(Response {
            ok: ok.ok_or_else(|| de::Error::missing_field("ok"))?,
            error,
            data,
        })
    }
}

// ----- payloads of successful responses -----

/// `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    /// The first of `interfaces` (kept for clients of one-interface agents).
    pub interface: String,
    /// Every interface the balancer is attached to (two-arm: more than one).
    #[serde(default)]
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub config_file: String,
    pub bpffs: String,
    /// Whether this agent adopted a datapath left pinned by an earlier agent.
    pub adopted: bool,
    pub uptime_seconds: u64,
    pub services: usize,
    pub backends: usize,
    pub backends_up: usize,
    pub last_reload: Option<ReloadOutcome>,
    /// Set when a failed change could not be rolled back: the datapath may hold a mix of
    /// old and new state until the next successful change or reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<String>,
    /// The VIPs' BGP announcements; `None` without an `[announce]` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceStatus>,
    /// The NAT table as the last walk found it; `None` before the first walk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatStatus>,
    /// The connection tables as the last walk found them; `None` before the first walk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackStatus>,
}

/// The connection tables (README, "Floods") in `weir status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// Established entries and the table's capacity (it never evicts: full, new flows get
    /// no entry).
    pub entries: u64,
    pub capacity: u64,
    /// Half-open entries (an LRU) and its capacity.
    pub half_open: u64,
    pub half_open_capacity: u64,
    /// Packets of flows refused an established entry because the table was full
    /// (`conntrack_full`), and new flows scheduled by the hash in flood mode
    /// (`flood_hashed`), since the datapath was created.
    pub refused: u64,
    pub flood_hashed: u64,
}

/// What the agent hands BIRD to announce (`[announce]`): the routes of its TUN device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The TUN device the routes are on.
    pub device: String,
    /// The kernel routing table BIRD imports.
    pub table: u32,
    /// `weir announce withdraw` is in force.
    pub withdrawn: bool,
    pub vips: Vec<VipAnnouncement>,
}

/// One VIP's announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnouncement {
    pub vip: IpAddr,
    /// Its route is in the table: BIRD announces it.
    pub announced: bool,
    /// Unix seconds since it has been (or not been) announced.
    pub since: u64,
    /// Why: `serving`, `starting`, `no-backend`, `withdrawn` (by the operator), `stopping`.
    pub reason: String,
}

/// [`Status::nat`]: the NAT table's fill and the SNAT port use, from the agent's last table
/// walk (every 5 s), and the SYNs refused for want of a port since the datapath was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    /// Entries in the table (two per connection, expired ones until reclaimed).
    pub entries: u64,
    /// Entries the table holds at most (`2 x nat_connections`); new connections are
    /// refused when it is full.
    pub capacity: u64,
    /// New fullnat connections refused because no SNAT port was free (the datapath's
    /// `drop_snat_exhausted`, every address together).
    pub snat_exhausted: u64,
    /// Every SNAT address of every `fullnat` service, by service then address.
    pub snat: Vec<SnatUse>,
}

/// One SNAT address of one `fullnat` service ([`NatStatus::snat`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatUse {
    pub service: String,
    pub address: IpAddr,
    /// The service's connections whose SNAT source is this address.
    pub ports_in_use: u64,
    /// The connections through this address of the fullest of the service's backend
    /// endpoints (address, port, protocol), every service's together since they share the
    /// ports. Over `port_count` it is `weir_snat_port_use_ratio`: at `port_count`, new
    /// connections to that backend through this address are refused.
    pub fullest_backend: u64,
    /// Ports of `[agent] snat_ports`: how many connections one backend endpoint can have
    /// through this address.
    pub port_count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    /// Unix seconds.
    pub at: u64,
    /// The config error (file: key: reason) when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `service_list` (a list of these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub forwarding: Forwarding,
    pub ring_size: u32,
    pub health_check: HealthCheckKind,
    pub backends: usize,
    pub backends_up: usize,
    /// Fingerprint of the ring and the backend set (16 hex digits): equal on every
    /// balancer that sends a flow where the others do (`weir fleet check`).
    #[serde(default)]
    pub fingerprint: String,
    /// `[service.rate_limit]` (all `None`: no limits).
    #[serde(default)]
    pub rate_limit: RateLimitInfo,
}

/// A service's limits on new flows, as configured (with the default bursts filled in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitInfo {
    pub new_flows_per_source: Option<u64>,
    pub source_burst: Option<u64>,
    /// The prefix length sources are grouped by (only with `new_flows_per_source`).
    pub source_prefix: Option<u8>,
    pub new_flows_per_vip: Option<u64>,
    pub vip_burst: Option<u64>,
}

/// `backend_list` (a list of these), also the data of backend changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    /// Set from the CLI.
    pub admin: Admin,
    pub health: Health,
    /// Whether the datapath honours tracked flows to it.
    pub up: bool,
    /// Ring slots it holds now.
    pub slots: u32,
    /// The weight new flows see now: 0 while draining, disabled, down or a standby backup,
    /// and ramping up during slow start.
    #[serde(default)]
    pub effective_weight: u32,
    /// A standby backend (`backup = true`).
    #[serde(default)]
    pub backup: bool,
    /// Active connections the datapath counts (new flows minus ended or expired ones).
    #[serde(default)]
    pub active_connections: u64,
    /// Active connections at which it takes no new flow; 0: no limit.
    #[serde(default)]
    pub max_connections: u32,
    /// New flows picked for it that it turned away while full (`max_connections`).
    #[serde(default)]
    pub turned_away: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// The answer to a change that removed the backend: which one, and `"removed": true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    pub service: String,
    pub address: IpAddr,
    /// Always true: says what happened to the backend in the JSON for scripts.
    pub removed: bool,
}

impl Removed {
    pub const fn new(service: String, address: IpAddr) -> Self {
        Self {
            service,
            address,
            removed: true,
        }
    }
}

/// `service_table`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTable {
    pub service: String,
    pub ring_size: u32,
    /// Backend addresses; `slots` holds indexes into this list.
    pub backends: Vec<IpAddr>,
    /// Per backend (same order), its slot count.
    pub counts: Vec<u32>,
    /// For every slot, the index of its backend in `backends`, or -1 for none.
    pub slots: Vec<i32>,
}

/// `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Global counters by name (`lb_common::stat::NAMES`).
    pub global: Vec<(String, u64)>,
    pub services: Vec<TrafficStats>,
    pub backends: Vec<TrafficStats>,
    /// Every source rule of every service, with the packets it decided.
    #[serde(default)]
    pub source_rules: Vec<RuleStats>,
    /// The new flows each configured rate limit dropped.
    #[serde(default)]
    pub rate_limited: Vec<RateLimitStats>,
}

/// One rate limit of a service and the new flows it dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitStats {
    pub service: String,
    /// `source` (`new_flows_per_source`) or `vip` (`new_flows_per_vip`).
    pub limit: String,
    pub packets: u64,
}

/// One `allow` / `deny` rule of a service and the packets it decided (new flows admitted
/// by an `allow`, dropped by a `deny`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStats {
    pub service: String,
    /// `allow` or `deny`.
    pub action: String,
    /// The prefix as `ADDR/LEN`.
    pub prefix: String,
    pub packets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficStats {
    pub service: String,
    /// Set for backend rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub services: usize,
    pub ring_slots_written: usize,
    pub backends_written: usize,
}

/// `conn_list`: the matching NAT connections, sorted by service, backend and client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnList {
    /// How many connections matched; more than `connections.len()` when `truncated`.
    pub total: u64,
    /// The limit cut the list short.
    pub truncated: bool,
    pub connections: Vec<ConnInfo>,
}

/// One NAT connection: the client's tuple, the VIP it asked for and the backend it was
/// translated to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    /// The backend's service; `None` for a pair made for an earlier owner of the backend's
    /// id (no longer honoured: the next table walk deletes it).
    pub service: Option<String>,
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// `fullnat`: the SNAT address and port the backend sees as the connection's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<SocketAddr>,
    pub backend: SocketAddr,
    pub state: ConnState,
    /// Seconds since the last packet, either way.
    pub idle_seconds: u64,
    /// Seconds until the pair expires if no packet comes (0: expired, awaiting deletion).
    pub expires_in_seconds: u64,
    /// Made from a mid-flow packet (the table had lost the connection, or it was flushed).
    pub picked_up: bool,
}

/// `conn_flush`: what went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnFlushed {
    /// Connections (pairs) deleted.
    pub connections: u64,
    /// Table entries deleted (two per pair; one for a pair already half gone).
    pub entries: u64,
}

// ----- the values of the payloads' enumerated fields -----
//
// Mirrors of the agent's own types (the config's `Protocol`, the overlay's `Admin`, ...),
// so that this module depends on neither: the conversions live on the agent's side. Each
// serializes as the name the config file and the CLI use.

/// How the XDP program runs ([`Status::xdp_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Attached by this agent in native (driver) mode.
    Native,
    /// Attached by this agent in generic (SKB) mode.
    Generic,
    /// An earlier agent's pinned link now runs this agent's program, in the mode that
    /// agent chose.
    Adopted,
}

/// A service's transport protocol ([`ServiceInfo::protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// How a service picks the backend of a new flow ([`ServiceInfo::scheduler`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    Maglev,
    IpHash,
    RoundRobin,
    LeastConn,
}

/// How a service's packets reach the backend ([`ServiceInfo::forwarding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    Tunnel,
    Direct,
    Nat,
    Fullnat,
}

/// A service's health check ([`ServiceInfo::health_check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    None,
    Tcp,
    Http,
    Udp,
}

/// A backend's admin state, set from the CLI ([`BackendInfo::admin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Takes new flows (when healthy).
    Enabled,
    /// No new flows; flows already tracked to it stay.
    Draining,
    /// No new flows; tracked flows are re-picked.
    Disabled,
}

/// The state of a NAT connection ([`ConnInfo::state`]): the TCP states the datapath
/// follows, or for UDP whether an answer was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnState {
    SynSent,
    SynRecv,
    Established,
    FinWait,
    TimeWait,
    Close,
    /// UDP, no answer yet (the short unreplied timeout applies).
    Unreplied,
    /// UDP, answered.
    Replied,
}

impl ConnState {
    /// Every state, in the order of the TCP state machine, then UDP's.
    pub const ALL: [Self; 8] = [
        Self::SynSent,
        Self::SynRecv,
        Self::Established,
        Self::FinWait,
        Self::TimeWait,
        Self::Close,
        Self::Unreplied,
        Self::Replied,
    ];
}

/// A backend's health as the agent sees it ([`BackendInfo::health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
    /// The service has no health check.
    Unchecked,
}

/// `as_str` (the name on the wire, as serde writes it) and `Display` for the enums above.
macro_rules! wire_names {
    ($($ty:ident { $($variant:ident => $name:literal),* $(,)? })*) => {$(
        impl $ty {
            /// The name on the wire and in the CLI's tables.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
wire_names! {
    XdpMode { Native => "native", Generic => "generic", Adopted => "adopted" }
    Protocol { Tcp => "tcp", Udp => "udp" }
    Scheduler {
        Maglev => "maglev",
        IpHash => "ip-hash",
        RoundRobin => "round-robin",
        LeastConn => "least-conn",
    }
    Forwarding { Tunnel => "tunnel", Direct => "direct", Nat => "nat", Fullnat => "fullnat" }
    HealthCheckKind { None => "none", Tcp => "tcp", Http => "http", Udp => "udp" }
    Admin { Enabled => "enabled", Draining => "draining", Disabled => "disabled" }
    Health { Up => "up", Down => "down", Unchecked => "unchecked" }
    ConnState {
        SynSent => "syn-sent",
        SynRecv => "syn-recv",
        Established => "established",
        FinWait => "fin-wait",
        TimeWait => "time-wait",
        Close => "close",
        Unreplied => "unreplied",
        Replied => "replied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let req = Request::BackendWeight {
            service: "web".into(),
            address: "198.51.100.11".parse().unwrap(),
            weight: 3,
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"backend_weight","service":"web","address":"198.51.100.11","weight":3}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","extra":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(
                r#"{"cmd":"backend_add","service":"web","address":"not-an-ip"}"#
            )
            .is_err()
        );
        let add: Request =
            serde_json::from_str(r#"{"cmd":"backend_add","service":"web","address":"::1"}"#)
                .unwrap();
        assert!(matches!(add, Request::BackendAdd { weight: 1, .. }));
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn backend() -> BackendInfo {
        BackendInfo {
            service: "web".into(),
            address: ip("198.51.100.11"),
            weight: 3,
            admin: Admin::Draining,
            health: Health::Unchecked,
            up: true,
            slots: 7,
            effective_weight: 0,
            backup: false,
            active_connections: 2,
            max_connections: 0,
            turned_away: 0,
            packets: 10,
            bytes: 640,
            new_flows: 1,
        }
    }

    fn service() -> ServiceInfo {
        ServiceInfo {
            name: "web".into(),
            vip: ip("2001:db8::10"),
            port: 443,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::RoundRobin,
            forwarding: Forwarding::Direct,
            ring_size: 251,
            health_check: HealthCheckKind::Http,
            backends: 1,
            backends_up: 0,
            fingerprint: "0123456789abcdef".into(),
            rate_limit: RateLimitInfo::default(),
        }
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            pid: 1,
            interface: "eth0".into(),
            interfaces: vec!["eth0".into()],
            xdp_mode: XdpMode::Adopted,
            config_file: "/etc/weir/weir.toml".into(),
            bpffs: "/sys/fs/bpf/weir".into(),
            adopted: true,
            uptime_seconds: 5,
            services: 1,
            backends: 1,
            backends_up: 0,
            last_reload: None,
            inconsistent: None,
            announce: None,
            nat: None,
            conntrack: None,
        }
    }

    /// The enums serialize as their `as_str`, which is what the agent sent as strings
    /// before they were typed: the wire format did not change.
    #[test]
    fn wire_names_are_the_serde_names() {
        fn check<T>(values: &[T])
        where
            T: Copy + fmt::Debug + fmt::Display + PartialEq + Serialize + for<'de> Deserialize<'de>,
        {
            for &value in values {
                let json = serde_json::to_string(&value).unwrap();
                assert_eq!(json, format!("\"{value}\""), "{value:?}");
                assert_eq!(serde_json::from_str::<T>(&json).unwrap(), value);
            }
        }
        check(&[XdpMode::Native, XdpMode::Generic, XdpMode::Adopted]);
        check(&[Protocol::Tcp, Protocol::Udp]);
        check(&[
            Scheduler::Maglev,
            Scheduler::IpHash,
            Scheduler::RoundRobin,
            Scheduler::LeastConn,
        ]);
        check(&[Forwarding::Tunnel, Forwarding::Direct]);
        check(&[
            HealthCheckKind::None,
            HealthCheckKind::Tcp,
            HealthCheckKind::Http,
            HealthCheckKind::Udp,
        ]);
        check(&[Admin::Enabled, Admin::Draining, Admin::Disabled]);
        check(&[Health::Up, Health::Down, Health::Unchecked]);
        check(&ConnState::ALL);
        assert_eq!(Scheduler::IpHash.as_str(), "ip-hash");
        assert_eq!(Scheduler::LeastConn.to_string(), "least-conn");
    }

    #[test]
    fn responses_keep_their_wire_format() {
        let removed = Response::ok(Removed::new("web".into(), ip("198.51.100.11")));
        assert_eq!(
            serde_json::to_string(&removed).unwrap(),
            r#"{"ok":true,"data":{"service":"web","address":"198.51.100.11","removed":true}}"#
        );
        let error = Response::error(ErrorCode::UnknownBackend, "no such backend");
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"ok":false,"error":{"code":"unknown_backend","message":"no such backend"}}"#
        );
        let list = serde_json::to_value(Response::ok(vec![backend()])).unwrap();
        assert_eq!(list["data"][0]["admin"], "draining");
        assert_eq!(list["data"][0]["health"], "unchecked");
        let services = serde_json::to_value(Response::ok(vec![service()])).unwrap();
        let s = &services["data"][0];
        assert_eq!(
            [
                &s["protocol"],
                &s["scheduler"],
                &s["forwarding"],
                &s["health_check"]
            ],
            ["tcp", "round-robin", "direct", "http"]
        );
        let status = serde_json::to_value(Response::ok(status())).unwrap();
        assert_eq!(status["data"]["xdp_mode"], "adopted");
    }

    #[test]
    fn responses_decode_as_their_request_expects() {
        let web = || "web".to_owned();
        let address = ip("198.51.100.11");
        let cases: Vec<(Request, Reply)> = vec![
            (Request::Status {}, status().into()),
            (Request::ServiceList {}, vec![service()].into()),
            // An empty list is still the list the request asked for.
            (Request::ServiceList {}, Vec::<ServiceInfo>::new().into()),
            (
                Request::BackendList { service: None },
                Vec::<BackendInfo>::new().into(),
            ),
            (
                Request::BackendList { service: None },
                vec![backend()].into(),
            ),
            (
                Request::ServiceTable { service: web() },
                ServiceTable {
                    service: web(),
                    ring_size: 3,
                    backends: vec![address],
                    counts: vec![2],
                    slots: vec![0, -1, 0],
                }
                .into(),
            ),
            (
                Request::BackendDrain {
                    service: web(),
                    address,
                },
                backend().into(),
            ),
            (
                Request::BackendRemove {
                    service: web(),
                    address,
                },
                Removed::new(web(), address).into(),
            ),
            (
                Request::Stats {},
                Stats {
                    global: vec![("xdp_tx".into(), 5)],
                    services: vec![],
                    backends: vec![],
                    source_rules: vec![],
                    rate_limited: vec![],
                }
                .into(),
            ),
            (
                Request::Reload {},
                ReloadReport {
                    services: 1,
                    ring_slots_written: 0,
                    backends_written: 0,
                }
                .into(),
            ),
            (
                Request::AnnounceWithdraw {},
                AnnounceStatus {
                    device: "weir-vips".into(),
                    table: 100,
                    withdrawn: true,
                    vips: vec![VipAnnouncement {
                        vip: address,
                        announced: false,
                        since: 1_700_000_000,
                        reason: "withdrawn".into(),
                    }],
                }
                .into(),
            ),
        ];
        for (request, reply) in cases {
            let response = Response::ok(reply);
            let text = serde_json::to_string(&response).unwrap();
            assert_eq!(
                Response::from_json(&text, &request).unwrap(),
                response,
                "{request:?}"
            );
        }
        let error = Response::error(ErrorCode::Internal, "boom");
        let text = serde_json::to_string(&error).unwrap();
        assert_eq!(
            Response::from_json(&text, &Request::Stats {}).unwrap(),
            error
        );
    }

    fn conn() -> ConnInfo {
        ConnInfo {
            service: Some("web".into()),
            protocol: Protocol::Tcp,
            client: "203.0.113.7:40000".parse().unwrap(),
            vip: "198.51.100.10:80".parse().unwrap(),
            snat: None,
            backend: "198.51.100.11:8080".parse().unwrap(),
            state: ConnState::Established,
            idle_seconds: 3,
            expires_in_seconds: 7437,
            picked_up: false,
        }
    }

    #[test]
    fn conn_requests_and_answers_round_trip() {
        let list = Request::ConnList {
            service: None,
            backend: Some(ip("198.51.100.11")),
            state: Some(ConnState::FinWait),
            limit: Some(5),
        };
        let text = serde_json::to_string(&list).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"conn_list","backend":"198.51.100.11","state":"fin-wait","limit":5}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), list);
        // A bare flush deserializes with neither `all` nor `confirm`: the agent refuses it.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"conn_flush"}"#).unwrap(),
            Request::ConnFlush {
                service: None,
                backend: None,
                all: false,
                confirm: false
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"conn_flush","yes":true}"#).is_err());
        let reply = ConnList {
            total: 2,
            truncated: true,
            connections: vec![conn()],
        };
        let response = Response::ok(reply.clone());
        let text = serde_json::to_string(&response).unwrap();
        assert_eq!(Response::from_json(&text, &list).unwrap(), response);
        let value = serde_json::to_value(&response).unwrap();
        assert_eq!(value["data"]["connections"][0]["state"], "established");
        // A `nat` connection has no SNAT source: the field is left out.
        assert!(value["data"]["connections"][0].get("snat").is_none());
        assert_eq!(
            value["data"]["connections"][0]["client"],
            "203.0.113.7:40000"
        );
        let flush = Request::ConnFlush {
            service: Some("web".into()),
            backend: None,
            all: false,
            confirm: true,
        };
        let flushed = Response::ok(ConnFlushed {
            connections: 3,
            entries: 6,
        });
        let text = serde_json::to_string(&flushed).unwrap();
        assert_eq!(Response::from_json(&text, &flush).unwrap(), flushed);
        // A list is not taken for a flush report, nor the other way round.
        assert!(Response::from_json(&text, &list).is_err());
        let listed = serde_json::to_string(&Response::ok(reply)).unwrap();
        assert!(Response::from_json(&listed, &flush).is_err());
    }

    #[test]
    fn answers_that_do_not_fit_the_request_are_rejected() {
        let status = serde_json::to_string(&Response::ok(status())).unwrap();
        assert!(Response::from_json(&status, &Request::Stats {}).is_err());
        let removal = r#"{"ok":true,"data":{"service":"web","address":"::1","removed":true}}"#;
        assert!(Response::from_json(removal, &Request::BackendList { service: None }).is_err());
        // A backend with a field missing is not taken for a removal.
        let mut partial = serde_json::to_value(backend()).unwrap();
        partial.as_object_mut().unwrap().remove("weight");
        let partial = format!(r#"{{"ok":true,"data":{partial}}}"#);
        assert!(
            Response::from_json(
                &partial,
                &Request::BackendEnable {
                    service: "web".into(),
                    address: ip("198.51.100.11"),
                }
            )
            .is_err()
        );
        for text in [
            r#"{"data":{"services":1,"ring_slots_written":0,"backends_written":0}}"#,
            r#"{"ok":true,"ok":true}"#,
            r#"{"ok":true} trailing"#,
            r#"{"ok":"yes"}"#,
            r#"[true]"#,
        ] {
            assert!(
                Response::from_json(text, &Request::Reload {}).is_err(),
                "{text}"
            );
        }
        // Fields a newer agent may add are ignored.
        let newer = r#"{"ok":true,"data":{"services":1,"ring_slots_written":0,"backends_written":0},"took_ms":3}"#;
        assert!(Response::from_json(newer, &Request::Reload {}).unwrap().ok);
    }
}
