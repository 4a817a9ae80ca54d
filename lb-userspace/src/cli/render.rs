//! Formatting the agent's answers for people: aligned tables, the `weir status` facts,
//! per-second rates of `weir stats --watch`, human durations, and the one-line
//! confirmations of changes; and for scripts (`-o json`), the answers as JSON.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::BackendCommand;
use crate::api::{
    Admin, AnnounceStatus, BackendInfo, ConnList, NatStatus, RateLimitInfo, ReloadReport,
    ServiceInfo, ServiceTable, Stats, Status, TrafficStats,
};
use crate::config::Config;

/// `-o json`: an answer of the agent (its `data`), pretty-printed.
pub fn render_json(payload: &impl Serialize, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, payload)?;
    writeln!(out)
}

/// `weir stats --watch -o json`: one answer per line.
pub fn render_json_line(payload: &impl Serialize, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer(&mut *out, payload)?;
    writeln!(out)
}

/// `weir service table --summary -o json`: the table without its `slots`.
#[derive(Debug, Serialize)]
pub struct TableSummary<'a> {
    pub service: &'a str,
    pub ring_size: u32,
    pub backends: &'a [IpAddr],
    pub counts: &'a [u32],
}

impl<'a> TableSummary<'a> {
    pub fn of(table: &'a ServiceTable) -> Self {
        Self {
            service: &table.service,
            ring_size: table.ring_size,
            backends: &table.backends,
            counts: &table.counts,
        }
    }
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

/// `HH:MM:SS` of a Unix time, in UTC.
fn time_of_day(unix: u64) -> String {
    let secs = unix % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The first line of a `weir stats --watch` frame, then an empty line.
pub fn render_watch_header(interval: Duration, now: u64, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "weir stats every {}s at {} UTC (Ctrl-C to stop)\n",
        interval.as_secs_f64(),
        time_of_day(now)
    )
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
            format!(
                "{} (XDP {} mode)",
                if status.interfaces.is_empty() {
                    status.interface.clone()
                } else {
                    status.interfaces.join(", ")
                },
                status.xdp_mode
            ),
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
    let mut lines = Vec::from(lines);
    if let Some(ct) = &status.conntrack {
        lines.push((
            "connections",
            format!(
                "{} of {} established ({}), {} of {} half-open; {} refused an entry (table \
                 full), {} new flows by the hash (flood mode)",
                ct.entries,
                ct.capacity,
                percent(ct.entries, ct.capacity),
                ct.half_open,
                ct.half_open_capacity,
                ct.refused,
                ct.flood_hashed,
            ),
        ));
    }
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
    if let Some(announce) = &status.announce {
        writeln!(out)?;
        render_announce(announce, now, out)?;
    }
    if let Some(nat) = &status.nat {
        render_nat_status(nat, out)?;
    }
    Ok(())
}

/// The announcements (`weir status`, `weir announce withdraw|resume`): where the routes
/// are, whether the operator withdrew them, then each VIP since when.
pub fn render_announce(announce: &AnnounceStatus, now: u64, out: &mut dyn Write) -> io::Result<()> {
    use Align::Left;
    writeln!(
        out,
        "announce: routes on {} in table {} for BIRD{}",
        announce.device,
        announce.table,
        if announce.withdrawn {
            "; WITHDRAWN by the operator (`weir announce resume` to undo)"
        } else {
            ""
        }
    )?;
    let mut table = Table::new(&[
        ("VIP", Left),
        ("ANNOUNCED", Left),
        ("REASON", Left),
        ("SINCE", Left),
    ]);
    for vip in &announce.vips {
        table.row(vec![
            vip.vip.to_string(),
            if vip.announced { "yes" } else { "no" }.to_owned(),
            vip.reason.clone(),
            format!("{} ago", human_duration(now.saturating_sub(vip.since))),
        ]);
    }
    table.write(out)
}

/// One service of `weir fleet check`: its fingerprint at each agent (`None`: the agent has
/// no such service), and whether they all agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetService {
    pub service: String,
    pub equal: bool,
    pub fingerprints: Vec<FleetPrint>,
}

/// A service's fingerprint at one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetPrint {
    pub socket: String,
    pub fingerprint: Option<String>,
}

/// Compares the services of several agents (socket, its `service list`), by name: a
/// service is equal when every agent has it with the same fingerprint. In name order.
#[must_use]
pub fn fleet_compare(agents: &[(String, Vec<ServiceInfo>)]) -> Vec<FleetService> {
    let mut names: Vec<&str> = agents
        .iter()
        .flat_map(|(_, services)| services.iter().map(|s| s.name.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let fingerprints: Vec<FleetPrint> = agents
                .iter()
                .map(|(socket, services)| FleetPrint {
                    socket: socket.clone(),
                    fingerprint: services
                        .iter()
                        .find(|s| s.name == name)
                        .map(|s| s.fingerprint.clone()),
                })
                .collect();
            let first = &fingerprints[0].fingerprint;
            let equal = first.as_ref().is_some_and(|f| !f.is_empty())
                && fingerprints.iter().all(|p| &p.fingerprint == first);
            FleetService {
                service: name.to_owned(),
                equal,
                fingerprints,
            }
        })
        .collect()
}

/// `weir fleet check`: one line per service, `equal` with the fingerprint, or `DIFFERS`
/// with each agent's.
pub fn render_fleet(services: &[FleetService], out: &mut dyn Write) -> io::Result<()> {
    use Align::Left;
    let mut table = Table::new(&[("SERVICE", Left), ("RINGS", Left), ("FINGERPRINTS", Left)]);
    for s in services {
        let prints = if s.equal {
            format!(
                "{} at all {}",
                s.fingerprints[0].fingerprint.as_deref().unwrap_or("-"),
                s.fingerprints.len()
            )
        } else {
            s.fingerprints
                .iter()
                .map(|p| {
                    format!(
                        "{} {}",
                        p.socket,
                        p.fingerprint.as_deref().unwrap_or("missing")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        table.row(vec![
            s.service.clone(),
            if s.equal { "equal" } else { "DIFFERS" }.to_owned(),
            prints,
        ]);
    }
    table.write(out)
}

/// The NAT part of `weir status`: the table's fill, then one line per SNAT address.
fn render_nat_status(nat: &NatStatus, out: &mut dyn Write) -> io::Result<()> {
    use Align::{Left, Right};
    writeln!(
        out,
        "\nNAT table  {} of {} entries ({}), {} new connection{} refused for want of an SNAT port",
        nat.entries,
        nat.capacity,
        percent(nat.entries, nat.capacity),
        nat.snat_exhausted,
        plural(usize::try_from(nat.snat_exhausted).unwrap_or(usize::MAX)),
    )?;
    if nat.snat.is_empty() {
        return Ok(());
    }
    let mut table = Table::new(&[
        ("SERVICE", Left),
        ("SNAT ADDRESS", Left),
        ("CONNS", Right),
        ("FULLEST BACKEND", Right),
        ("PORTS", Right),
        ("USE", Right),
    ]);
    for s in &nat.snat {
        table.row(vec![
            s.service.clone(),
            s.address.to_string(),
            s.ports_in_use.to_string(),
            s.fullest_backend.to_string(),
            s.port_count.to_string(),
            percent(s.fullest_backend, s.port_count),
        ]);
    }
    writeln!(out)?;
    table.write(out)
}

/// `part` of `whole` as a percentage with one decimal (`-` of nothing).
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_owned();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
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
        ("RATE LIMIT", Left),
        ("FINGERPRINT", Left),
    ]);
    for s in services {
        table.row(vec![
            s.name.clone(),
            listener(s.vip, s.port),
            s.protocol.to_string(),
            s.scheduler.to_string(),
            s.forwarding.to_string(),
            s.ring_size.to_string(),
            s.health_check.to_string(),
            s.backends.to_string(),
            s.backends_up.to_string(),
            rate_limit(&s.rate_limit),
            s.fingerprint.clone(),
        ]);
    }
    table.write(out)
}

/// A service's rate limits in a cell: `1000/s+100 per /24`, `5000/s+500 per vip`, both
/// separated by `, `, or `-`.
fn rate_limit(r: &RateLimitInfo) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = r.new_flows_per_source {
        parts.push(format!(
            "{rate}/s+{} per /{}",
            r.source_burst.unwrap_or(0),
            r.source_prefix.unwrap_or(0)
        ));
    }
    if let Some(rate) = r.new_flows_per_vip {
        parts.push(format!("{rate}/s+{} per vip", r.vip_burst.unwrap_or(0)));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
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
            b.admin.to_string(),
            b.health.to_string(),
            yes_no(b.up),
            // With a limit: active/max, the backend's headroom at a glance.
            if b.max_connections > 0 {
                format!("{}/{}", b.active_connections, b.max_connections)
            } else {
                b.active_connections.to_string()
            },
            b.slots.to_string(),
            b.packets.to_string(),
            b.bytes.to_string(),
            b.new_flows.to_string(),
        ]);
    }
    table.write(out)
}

/// `weir conn list`: one row per connection, then how many there are (and how many are
/// not shown when the limit cut the list).
pub fn render_conns(list: &ConnList, out: &mut dyn Write) -> io::Result<()> {
    use Align::{Left, Right};
    let mut table = Table::new(&[
        ("PROTO", Left),
        ("CLIENT", Left),
        ("VIP", Left),
        ("SNAT", Left),
        ("BACKEND", Left),
        ("SERVICE", Left),
        ("STATE", Left),
        ("IDLE", Right),
        ("EXPIRES IN", Right),
    ]);
    for c in &list.connections {
        table.row(vec![
            c.protocol.to_string(),
            c.client.to_string(),
            c.vip.to_string(),
            c.snat.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            c.backend.to_string(),
            c.service.clone().unwrap_or_else(|| "-".to_owned()),
            if c.picked_up {
                format!("{} (picked up)", c.state)
            } else {
                c.state.to_string()
            },
            format!("{}s", c.idle_seconds),
            format!("{}s", c.expires_in_seconds),
        ]);
    }
    table.write(out)?;
    let total = list.total;
    let noun = if total == 1 {
        "connection"
    } else {
        "connections"
    };
    if list.truncated {
        writeln!(
            out,
            "{} of {total} {noun} shown (--limit N shows more)",
            list.connections.len()
        )
    } else {
        writeln!(out, "{total} {noun}")
    }
}

/// Checks that the slots of a ring name backends of its list.
pub fn check_service_table(table: &ServiceTable) -> Result<(), String> {
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
        BackendCommand::MaxConns {
            max_connections, ..
        } => {
            let shown = |max: u32| {
                if max == 0 {
                    "none".to_owned()
                } else {
                    max.to_string()
                }
            };
            let new = shown(after.map_or(*max_connections, |a| a.max_connections));
            match before {
                Some(before) => {
                    format!("max_connections {} -> {new}", shown(before.max_connections))
                }
                None => format!("max_connections set to {new}"),
            }
        }
        BackendCommand::Drain(_) | BackendCommand::Enable(_) | BackendCommand::Disable(_) => {
            let (expected, note) = match command {
                BackendCommand::Drain(_) => {
                    (Admin::Draining, " (no new flows; tracked flows stay)")
                }
                BackendCommand::Disable(_) => (
                    Admin::Disabled,
                    " (no new flows; tracked flows move to other backends)",
                ),
                _ => (Admin::Enabled, ""),
            };
            let new = after.map_or(expected, |a| a.admin);
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
    use super::super::fixtures::{
        backend, backend_info, ip, sample_conns, sample_nat_status, sample_ring, sample_stats,
        sample_status,
    };
    use super::*;
    use crate::api::{Forwarding, Health, HealthCheckKind, Protocol, Scheduler, ServiceInfo};

    fn render(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn backend_table_is_aligned() {
        let mut backends = vec![
            backend_info("web", "198.51.100.11", 1, Admin::Enabled),
            backend_info("web", "2001:db8::12", 100, Admin::Draining),
            backend_info("dns-long-name", "203.0.113.5", 0, Admin::Disabled),
        ];
        backends[1].health = Health::Unchecked;
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
    fn conn_list_rendering() {
        let mut list = sample_conns();
        let text = render(|out| render_conns(&list, out));
        assert_eq!(
            text,
            "\
PROTO  CLIENT               VIP                SNAT                BACKEND              SERVICE  STATE                  IDLE  EXPIRES IN
tcp    203.0.113.7:40000    198.51.100.10:80   198.51.100.1:61007  198.51.100.11:8080   web      established              3s       7437s
udp    [2001:db8::7]:53000  [2001:db8::10]:53  -                   [2001:db8::12]:5353  -        unreplied (picked up)    0s         30s
2 of 7 connections shown (--limit N shows more)
"
        );
        list.truncated = false;
        list.total = 1;
        list.connections.truncate(1);
        let text = render(|out| render_conns(&list, out));
        assert!(text.ends_with("\n1 connection\n"), "{text}");
        list.connections.clear();
        list.total = 0;
        let text = render(|out| render_conns(&list, out));
        assert_eq!(
            text,
            "PROTO  CLIENT  VIP  SNAT  BACKEND  SERVICE  STATE  IDLE  EXPIRES IN\n0 connections\n"
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
        let mut status = sample_status();
        status.announce = Some(AnnounceStatus {
            device: "weir-vips".into(),
            table: 100,
            withdrawn: true,
            vips: vec![crate::api::VipAnnouncement {
                vip: ip("203.0.113.10"),
                announced: false,
                since: 1_000,
                reason: "withdrawn".into(),
            }],
        });
        let text = render(|out| render_status(&status, 1_065, out));
        assert!(
            text.ends_with(
                "\n\
announce: routes on weir-vips in table 100 for BIRD; WITHDRAWN by the operator (`weir announce resume` to undo)
VIP           ANNOUNCED  REASON     SINCE
203.0.113.10  no         withdrawn  1m 5s ago
"
            ),
            "{text}"
        );
    }

    #[test]
    fn status_rendering_with_the_connection_tables() {
        let status = Status {
            conntrack: Some(crate::api::ConntrackStatus {
                entries: 4096,
                capacity: 4096,
                half_open: 512,
                half_open_capacity: 1024,
                refused: 46_475,
                flood_hashed: 3,
            }),
            ..sample_status()
        };
        let text = render(|out| render_status(&status, 1_065, out));
        assert!(
            text.lines().any(|l| l.starts_with("connections")
                && l.ends_with(
                    "4096 of 4096 established (100.0%), 512 of 1024 half-open; 46475 refused \
                     an entry (table full), 3 new flows by the hash (flood mode)"
                )),
            "{text}"
        );
    }

    #[test]
    fn status_rendering_with_nat() {
        let text = render(|out| render_status(&sample_nat_status(), 1_065, out));
        let nat = text
            .split_once("\n\n")
            .map(|(_, nat)| nat)
            .unwrap_or_else(|| panic!("no NAT part: {text}"));
        assert_eq!(
            nat,
            "\
NAT table  1200 of 524288 entries (0.2%), 17 new connections refused for want of an SNAT port

SERVICE  SNAT ADDRESS  CONNS  FULLEST BACKEND  PORTS     USE
web      198.51.100.1     96               64     64  100.0%
web      198.51.100.2      3                2     64    3.1%
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
                protocol: Protocol::Tcp,
                scheduler: Scheduler::Maglev,
                forwarding: Forwarding::Tunnel,
                ring_size: 65537,
                health_check: HealthCheckKind::Tcp,
                backends: 3,
                backends_up: 3,
                fingerprint: "00000000000000aa".into(),
                rate_limit: RateLimitInfo {
                    new_flows_per_source: Some(1000),
                    source_burst: Some(100),
                    source_prefix: Some(24),
                    new_flows_per_vip: Some(50_000),
                    vip_burst: Some(5000),
                },
            },
            ServiceInfo {
                name: "dns".into(),
                vip: ip("2001:db8::53"),
                port: 0,
                protocol: Protocol::Udp,
                scheduler: Scheduler::Maglev,
                forwarding: Forwarding::Direct,
                ring_size: 251,
                health_check: HealthCheckKind::None,
                backends: 2,
                backends_up: 1,
                fingerprint: "00000000000000bb".into(),
                rate_limit: RateLimitInfo::default(),
            },
        ];
        let text = render(|out| render_services(&services, out));
        assert_eq!(
            text,
            "\
SERVICE  LISTENER          PROTO  SCHEDULER  FORWARDING   RING  HEALTH CHECK  BACKENDS  UP  RATE LIMIT                                FINGERPRINT
web      198.51.100.10:80  tcp    maglev     tunnel      65537  tcp                  3   3  1000/s+100 per /24, 50000/s+5000 per vip  00000000000000aa
dns      [2001:db8::53]:*  udp    maglev     direct        251  none                 2   1  -                                         00000000000000bb
"
        );
        // Three agents: web the same everywhere, dns changed on one and missing on another.
        let mut changed = services.clone();
        changed[1].fingerprint = "00000000000000cc".into();
        let agents = vec![
            ("/run/a.sock".to_owned(), services.clone()),
            ("/run/b.sock".to_owned(), changed),
            ("/run/c.sock".to_owned(), services[..1].to_vec()),
        ];
        let fleet = fleet_compare(&agents);
        assert_eq!(
            fleet
                .iter()
                .map(|s| (s.service.as_str(), s.equal))
                .collect::<Vec<_>>(),
            [("dns", false), ("web", true)]
        );
        let text = render(|out| render_fleet(&fleet, out));
        assert_eq!(
            text,
            "\
SERVICE  RINGS    FINGERPRINTS
dns      DIFFERS  /run/a.sock 00000000000000bb, /run/b.sock 00000000000000cc, /run/c.sock missing
web      equal    00000000000000aa at all 3
"
        );
        // Agents that agree on nothing but the name do not agree.
        assert!(
            !fleet_compare(&[("a".into(), services[..1].to_vec()), ("b".into(), vec![])])[0].equal
        );
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
        let before = backend_info("web", "198.51.100.11", 1, Admin::Enabled);
        let after = backend_info("web", "198.51.100.11", 3, Admin::Enabled);
        let weight = backend(&["backend", "weight", "web", "198.51.100.11", "3"]);
        assert_eq!(
            change_line(&weight, Some(&before), Some(&after)),
            "web 198.51.100.11: weight 1 -> 3"
        );
        assert_eq!(
            change_line(&weight, None, None),
            "web 198.51.100.11: weight set to 3"
        );
        let limited = BackendInfo {
            max_connections: 100,
            ..after.clone()
        };
        let max = backend(&["backend", "max-conns", "web", "198.51.100.11", "100"]);
        assert_eq!(
            change_line(&max, Some(&before), Some(&limited)),
            "web 198.51.100.11: max_connections none -> 100"
        );
        let lifted = backend(&["backend", "max-conns", "web", "198.51.100.11", "0"]);
        assert_eq!(
            change_line(&lifted, Some(&limited), None),
            "web 198.51.100.11: max_connections 100 -> none"
        );
        let mut full = limited.clone();
        full.active_connections = 100;
        let mut out = Vec::new();
        render_backends(&[full], &mut out).unwrap();
        assert!(
            String::from_utf8(out).unwrap().contains(" 100/100 "),
            "CONNS shows active/max"
        );
        let drained = backend_info("web", "198.51.100.11", 1, Admin::Draining);
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
}
