//! The config file as written: the private `Raw*` serde structs that mirror its tables
//! (unknown keys rejected, numbers as `i64` so that range errors get a clear reason),
//! [`deserialize`], and the line and column of TOML errors.

use super::{Fail, Forwarding, HealthKind, NO_KEY, Protocol, Scheduler, XdpMode, fail};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) agent: Option<RawAgent>,
    pub(super) announce: Option<RawAnnounce>,
    #[serde(default)]
    pub(super) service: Vec<RawService>,
    pub(super) api: Option<RawApi>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) listen: String,
    pub(super) cert: String,
    pub(super) key: String,
    #[serde(default)]
    pub(super) token: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) name: String,
    pub(super) scope: String,
    pub(super) sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub(super) device: Option<String>,
    pub(super) table: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) interface: Option<String>,
    pub(super) interfaces: Option<Vec<String>>,
    #[serde(default)]
    pub(super) xdp_mode: XdpMode,
    pub(super) tunnel_source: Option<String>,
    pub(super) tunnel_source_v6: Option<String>,
    pub(super) tunnel_source_prefix: Option<String>,
    pub(super) conntrack_entries: Option<i64>,
    pub(super) half_open_entries: Option<i64>,
    pub(super) flood_threshold: Option<i64>,
    pub(super) nat_connections: Option<i64>,
    pub(super) api_socket: Option<String>,
    pub(super) metrics: Option<String>,
    pub(super) bpffs: Option<String>,
    pub(super) state_file: Option<String>,
    pub(super) answer_ping: Option<bool>,
    pub(super) snat_ports: Option<String>,
    pub(super) reserve_snat_ports: Option<bool>,
    pub(super) audit_log: Option<String>,
    pub(super) audit_max_bytes: Option<i64>,
    pub(super) audit_keep: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) vip: String,
    pub(super) port: i64,
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) scheduler: Scheduler,
    #[serde(default)]
    pub(super) forwarding: Forwarding,
    pub(super) ring_size: Option<i64>,
    #[serde(default)]
    pub(super) backend: Vec<RawBackend>,
    pub(super) health_check: Option<RawHealthCheck>,
    pub(super) slow_start: Option<String>,
    pub(super) tcp_idle_timeout: Option<String>,
    pub(super) udp_idle_timeout: Option<String>,
    pub(super) snat_addresses: Option<Vec<String>>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) deny: Option<Vec<String>>,
    pub(super) rate_limit: Option<super::rate_limit::RawRateLimit>,
    pub(super) max_connections: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    #[serde(default = "default_health_kind")]
    pub(super) kind: HealthKind,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<i64>,
    pub(super) fall: Option<i64>,
    pub(super) path: Option<String>,
    pub(super) expect_status: Option<i64>,
    pub(super) port: Option<i64>,
    pub(super) payload: Option<String>,
}

/// A `[service.health_check]` table without `kind` checks TCP connects.
const fn default_health_kind() -> HealthKind {
    HealthKind::Tcp
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: String,
    pub(super) weight: Option<i64>,
    #[serde(default)]
    pub(super) backup: bool,
    pub(super) port: Option<i64>,
    pub(super) max_connections: Option<i64>,
}

/// Reads `text` into the `Raw*` structs; the error names the key (or [`NO_KEY`] for a
/// file that is not TOML) and, where TOML says, the line and column.
pub(super) fn deserialize(text: &str) -> Result<RawConfig, Fail> {
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

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn line_column_counts_lines_and_characters() {
        assert_eq!(line_column("ab\ncdé\nx", 7), "line 2, column 4");
    }
}
