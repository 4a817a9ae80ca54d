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
//! The types here are shared by the agent ([`server`]) and the CLI ([`client`]).

pub mod client;
pub mod server;

pub use client::{ClientError, request};

use std::net::IpAddr;

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
}

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// A response: `ok` with `data`, or not `ok` with `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or(serde_json::Value::Null),
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(ApiError {
                code,
                message: message.into(),
            }),
            data: serde_json::Value::Null,
        }
    }
}

// ----- payloads of successful responses -----

/// `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub interface: String,
    /// "native" or "generic".
    pub xdp_mode: String,
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
    pub protocol: String,
    pub scheduler: String,
    pub forwarding: String,
    pub ring_size: u32,
    pub health_check: String,
    pub backends: usize,
    pub backends_up: usize,
}

/// `backend_list` (a list of these), also the data of backend changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    /// "enabled", "draining" or "disabled" (set from the CLI).
    pub admin: String,
    /// "up", "down" or "unchecked" (no health check).
    pub health: String,
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
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
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
}
