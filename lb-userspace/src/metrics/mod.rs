//! Prometheus metrics: what the agent exposes and how ([`Metrics`]), and the HTTP endpoint
//! serving them in the text exposition format ([`http`]).
//!
//! The registry is created by the agent and passed down; nothing here is global. Datapath
//! values are not pushed: a [`prometheus::core::Collector`] reads a fresh snapshot at each
//! scrape (per-CPU sums from the stats maps, the backend list), so the series are always the
//! datapath's own totals and those of services and backends that went away are simply not
//! there. A total that went down (a backend re-added, a fresh datapath) is what Prometheus'
//! `rate()` treats as a counter reset. Health checks, reloads and rollbacks are events the
//! agent records as they happen; check series appear only for backends in the snapshot.
//!
//! ```text
//! weir_backend_packets_total{backend="198.51.100.11",service="web"} 42
//! weir_packets_dropped_total{reason="fragment"} 0
//! ```

pub mod http;

pub use http::{encode, serve};

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::api;

/// What a scrape reads: the datapath's totals and the backends with their state.
pub type Snapshot = (api::Stats, Vec<api::BackendInfo>);

/// How the collector gets a snapshot: asks the agent's owner task; `None` if it did not
/// answer in time (the last snapshot is served then).
pub type SnapshotSource = Box<dyn Fn() -> Option<Snapshot> + Send + Sync>;

/// Buckets of `weir_health_check_duration_seconds`: 0.1 ms to 5 s.
const CHECK_DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// `result` label values of `weir_reloads_total`.
const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

/// The families the datapath collector produces: (name, help, type).
const DATAPATH_FAMILIES: [(&str, &str, MetricType); 47] = [
    (
        "weir_rate_limited_packets_total",
        "New flows a service's rate limit dropped: limit=source (new_flows_per_source) or vip (new_flows_per_vip).",
        MetricType::COUNTER,
    ),
    (
        "weir_source_rule_packets_total",
        "Packets of flows without an entry that a service's source rule decided: admitted by an allow, dropped by a deny.",
        MetricType::COUNTER,
    ),
    (
        "weir_backend_up",
        "Whether the datapath honours flows tracked to the backend (1) or not (0).",
        MetricType::GAUGE,
    ),
    (
        "weir_backend_weight",
        "Configured weight of the backend in its service's ring.",
        MetricType::GAUGE,
    ),
    (
        "weir_backend_active_connections",
        "Active connections to the backend as the datapath counts them (new flows minus ended or idle-expired ones).",
        MetricType::GAUGE,
    ),
    (
        "weir_backend_max_connections",
        "The backend's max_connections: at this many active connections it takes no new flow (0: no limit).",
        MetricType::GAUGE,
    ),
    (
        "weir_backend_full",
        "Whether the backend is at its max_connections (1) and turns new flows away, or not (0).",
        MetricType::GAUGE,
    ),
    (
        "weir_backend_turned_away_total",
        "New flows the scheduler picked for the backend that it turned away because it was at its max_connections (sent to another backend, or refused when all were full).",
        MetricType::COUNTER,
    ),
    (
        "weir_backend_packets_total",
        "Packets of the backend's flows the datapath forwarded (in the NAT modes both directions, to the backend and back to the client).",
        MetricType::COUNTER,
    ),
    (
        "weir_backend_bytes_total",
        "Bytes (frames as received) of the backend's flows the datapath forwarded (in the NAT modes both directions).",
        MetricType::COUNTER,
    ),
    (
        "weir_backend_new_flows_total",
        "New flows the scheduler assigned to the backend.",
        MetricType::COUNTER,
    ),
    (
        "weir_health_checks_total",
        "Health checks of the backend, by result.",
        MetricType::COUNTER,
    ),
    (
        "weir_health_check_duration_seconds",
        "Time a health check of the backend took, successful or not.",
        MetricType::HISTOGRAM,
    ),
    (
        "weir_service_packets_total",
        "Packets to the service's VIP that the datapath balanced.",
        MetricType::COUNTER,
    ),
    (
        "weir_service_bytes_total",
        "Bytes (as received) to the service's VIP that the datapath balanced.",
        MetricType::COUNTER,
    ),
    (
        "weir_service_new_flows_total",
        "New flows to the service that the scheduler assigned.",
        MetricType::COUNTER,
    ),
    (
        "weir_xdp_actions_total",
        "Packets by the XDP action the datapath returned.",
        MetricType::COUNTER,
    ),
    (
        "weir_packets_dropped_total",
        "Packets the datapath dropped, by reason.",
        MetricType::COUNTER,
    ),
    (
        "weir_packets_passed_total",
        "Packets the datapath passed to the kernel stack, by reason.",
        MetricType::COUNTER,
    ),
    (
        "weir_conntrack_hits_total",
        "Packets of a tracked flow whose connection-table entry was honoured.",
        MetricType::COUNTER,
    ),
    (
        "weir_conntrack_misses_total",
        "Packets that asked the scheduler (no entry, a stale entry, or a SYN).",
        MetricType::COUNTER,
    ),
    (
        "weir_flows_half_open_total",
        "Flows that entered the half-open table: a SYN, a first UDP datagram, or a mid-flow TCP packet of a flow no table knew.",
        MetricType::COUNTER,
    ),
    (
        "weir_flows_established_total",
        "Half-open flows whose next packet (the handshake's ACK, a second datagram) moved them to the connection table.",
        MetricType::COUNTER,
    ),
    (
        "weir_conntrack_refused_total",
        "Packets of half-open flows refused a connection-table entry because the table was full (entries are never evicted); they keep their backend through the half-open table and the hash.",
        MetricType::COUNTER,
    ),
    (
        "weir_flood_hashed_flows_total",
        "New flows scheduled by the service's consistent hash instead of its scheduler because their CPU was in flood mode (new-flow rate over flood_threshold, or the connection table full).",
        MetricType::COUNTER,
    ),
    (
        "weir_conntrack_entries",
        "Entries of the connection tables (table=established, never evicted; table=half_open, an LRU), from the agent's walk.",
        MetricType::GAUGE,
    ),
    (
        "weir_conntrack_capacity",
        "Entries each connection table holds at most.",
        MetricType::GAUGE,
    ),
    (
        "weir_conntrack_fill_ratio",
        "Entries over capacity per connection table: at 1 for table=established, new flows get no entry (the gauge to alert on).",
        MetricType::GAUGE,
    ),
    (
        "weir_conntrack_expired_total",
        "Established entries the agent's walk deleted, by reason: idle (past the service's timeout), closed, unconfirmed (nothing after the packet that made it), stale (its backend is gone).",
        MetricType::COUNTER,
    ),
    (
        "weir_decap_packets_total",
        "Packets whose outer tunnel header the decap program removed.",
        MetricType::COUNTER,
    ),
    (
        "weir_untracked_midflow_packets_total",
        "Non-SYN TCP packets of flows the connection table did not know (evicted, idle-expired, or the LB restarted); sent by the service's hash.",
        MetricType::COUNTER,
    ),
    (
        "weir_mss_clamped_total",
        "SYN-ACKs from a VIP whose MSS option the backend's clamp lowered.",
        MetricType::COUNTER,
    ),
    (
        "weir_icmp_too_big_sent_total",
        "ICMP fragmentation-needed / ICMPv6 Packet Too Big sent to clients whose packets would not fit the tunnel.",
        MetricType::COUNTER,
    ),
    (
        "weir_icmp_errors_forwarded_total",
        "ICMP errors quoting a VIP flow, forwarded to the backend that owns the flow.",
        MetricType::COUNTER,
    ),
    (
        "weir_icmp_echo_replies_total",
        "ICMP echo requests to a VIP address answered by the balancer.",
        MetricType::COUNTER,
    ),
    (
        "weir_fragments_forwarded_total",
        "IPv4 fragments of ip-hash services forwarded like the rest of their flow.",
        MetricType::COUNTER,
    ),
    (
        "weir_nat_packets_total",
        "Packets of NAT connections translated and forwarded, by direction (forward: client to backend; reply: backend to client).",
        MetricType::COUNTER,
    ),
    (
        "weir_nat_connections_created_total",
        "NAT connections (pairs of table entries) the datapath created.",
        MetricType::COUNTER,
    ),
    (
        "weir_nat_reclaimed_total",
        "Expired NAT connections deleted, by who deleted them (datapath: in line, agent: the table walk).",
        MetricType::COUNTER,
    ),
    (
        "weir_nat_connections",
        "NAT connections in the table that the datapath honours, open or closing, per service and backend (from the agent's table walk, every 5 s).",
        MetricType::GAUGE,
    ),
    (
        "weir_nat_table_entries",
        "Entries in the NAT connection table, two per connection, live or expired (from the agent's table walk).",
        MetricType::GAUGE,
    ),
    (
        "weir_nat_table_capacity",
        "Entries the NAT connection table holds at most (2 x nat_connections when it was created); when full, new connections are refused.",
        MetricType::GAUGE,
    ),
    (
        "weir_snat_ports_in_use",
        "SNAT ports held by the service's fullnat connections whose source is the address (from the agent's table walk).",
        MetricType::GAUGE,
    ),
    (
        "weir_snat_port_use_ratio",
        "The fullest backend endpoint's connections through the SNAT address (every service's) over the snat_ports range's port count; at 1, new connections to that backend through this address are refused (drop_snat_exhausted). The gauge to alert on.",
        MetricType::GAUGE,
    ),
    (
        "weir_nat_to_kernel_total",
        "Translated NAT packets handed to the kernel to forward because the next hop's neighbour was not resolved yet.",
        MetricType::COUNTER,
    ),
    (
        "weir_backend_full_spilled_total",
        "New flows sent to another backend than the scheduler's pick because the pick was at its max_connections.",
        MetricType::COUNTER,
    ),
    (
        "weir_nat_icmp_translated_total",
        "ICMP errors quoting a NAT connection, translated and forwarded (client side to the backend, backend side to the client).",
        MetricType::COUNTER,
    ),
];

/// The idle-expiry family, kept apart so the table above stays one line per family.
const IDLE_EXPIRED: (&str, &str) = (
    "weir_conntrack_idle_expired_total",
    "Tracked flows forgotten because they were idle longer than their service's timeout.",
);

/// Where a global datapath counter (`lb_common::stat::NAMES`) goes: its family and, for the
/// families with a `action`/`reason` label, that label.
#[must_use]
pub fn global_family(name: &str) -> Option<(&'static str, Option<(&'static str, &str)>)> {
    if let Some(action) = name.strip_prefix("xdp_") {
        Some(("weir_xdp_actions_total", Some(("action", action))))
    } else if let Some(reason) = name.strip_prefix("drop_") {
        Some(("weir_packets_dropped_total", Some(("reason", reason))))
    } else if let Some(reason) = name.strip_prefix("pass_") {
        Some(("weir_packets_passed_total", Some(("reason", reason))))
    } else {
        let family = match name {
            "conntrack_hit" => "weir_conntrack_hits_total",
            "conntrack_miss" => "weir_conntrack_misses_total",
            "decap_ok" => "weir_decap_packets_total",
            "untracked_midflow" => "weir_untracked_midflow_packets_total",
            "conntrack_idle_expired" => IDLE_EXPIRED.0,
            "mss_clamped" => "weir_mss_clamped_total",
            "icmp_too_big_sent" => "weir_icmp_too_big_sent_total",
            "icmp_error_forwarded" => "weir_icmp_errors_forwarded_total",
            "icmp_echo_replied" => "weir_icmp_echo_replies_total",
            "fragment_forwarded" => "weir_fragments_forwarded_total",
            "nat_forward" | "nat_reply" => {
                return Some((
                    "weir_nat_packets_total",
                    Some(("direction", &name["nat_".len()..])),
                ));
            }
            "nat_pairs_created" => "weir_nat_connections_created_total",
            "nat_reclaimed_inline" => {
                return Some(("weir_nat_reclaimed_total", Some(("by", "datapath"))));
            }
            "nat_to_kernel" => "weir_nat_to_kernel_total",
            "half_open_created" => "weir_flows_half_open_total",
            "flow_established" => "weir_flows_established_total",
            "conntrack_full" => "weir_conntrack_refused_total",
            "flood_hashed" => "weir_flood_hashed_flows_total",
            "nat_icmp_translated" => "weir_nat_icmp_translated_total",
            "backend_full_spilled" => "weir_backend_full_spilled_total",
            _ => return None,
        };
        Some((family, None))
    }
}

/// One backend's health checks so far.
#[derive(Debug, Clone, Default)]
struct Checks {
    success: u64,
    failure: u64,
    /// Non-cumulative counts per bucket of `CHECK_DURATION_BUCKETS`, then `+Inf`.
    buckets: [u64; CHECK_DURATION_BUCKETS.len() + 1],
    sum: f64,
}

impl Checks {
    fn observe(&mut self, ok: bool, duration: Duration) {
        if ok {
            self.success += 1;
        } else {
            self.failure += 1;
        }
        let seconds = duration.as_secs_f64();
        let index = CHECK_DURATION_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(CHECK_DURATION_BUCKETS.len());
        self.buckets[index] += 1;
        self.sum += seconds;
    }
}

/// State shared by the agent (which records checks and sets the source) and the registry
/// (which calls `collect` at each scrape).
struct Inner {
    source: Mutex<Option<SnapshotSource>>,
    /// The last snapshot, served when the agent does not answer in time.
    last: Mutex<Option<Snapshot>>,
    checks: Mutex<HashMap<(String, IpAddr), Checks>>,
    /// The last NAT table walk's gauges; `None` before the first walk.
    nat: Mutex<Option<NatTableGauges>>,
    /// NAT table entries the agent's walk deleted so far.
    nat_reclaimed: AtomicU64,
    /// The last connection-table walk's gauges, and the entries the walks deleted so far
    /// by reason; `None` before the first walk.
    conntrack: Mutex<Option<(ConntrackGauges, [u64; Expiry::ALL.len()])>>,
    descs: Vec<Desc>,
}

/// What the agent's walk of the NAT table measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatTableGauges {
    pub entries: u64,
    pub capacity: u64,
    /// (service, backend, live connections).
    pub connections: Vec<(String, IpAddr, u64)>,
    /// Every SNAT address of every `fullnat` service.
    pub snat: Vec<api::SnatUse>,
}

/// What a walk of the connection tables measured and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackGauges {
    /// Entries of the established table after the walk's deletes, and its capacity.
    pub entries: u64,
    pub capacity: u64,
    /// Entries of the half-open table (an LRU), and its capacity.
    pub half_open: u64,
    pub half_open_capacity: u64,
    /// Entries this walk deleted, by `Expiry` reason (`Expiry::index`).
    pub expired: [u64; Expiry::ALL.len()],
}

/// Why the agent deletes an established entry (`expiry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Idle longer than its service's timeout.
    Idle,
    /// Closed (a FIN or RST seen) and idle `CLOSED_TIMEOUT_NS`.
    Closed,
    /// Never a packet after the one that made it (`FLOW_CONFIRMED` unset), idle
    /// `UNCONFIRMED_TIMEOUT_NS`: the ACK of a spoofed SYN, ACK pair.
    Unconfirmed,
    /// Made for a backend id that is gone or now means another backend.
    Stale,
}

impl Expiry {
    pub const ALL: [Self; 4] = [Self::Idle, Self::Closed, Self::Unconfirmed, Self::Stale];

    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The `reason` label of `weir_conntrack_expired_total`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Closed => "closed",
            Self::Unconfirmed => "unconfirmed",
            Self::Stale => "stale",
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked (and a panic ends the
    // agent anyway).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The collector of everything read from the datapath at scrape time.
#[derive(Clone)]
struct DatapathCollector(Arc<Inner>);

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    let mut pairs: Vec<(&str, &str)> = pairs.to_vec();
    pairs.sort_unstable();
    pairs
        .into_iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_owned());
            pair.set_value(value.to_owned());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: u64) -> Metric {
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels(pairs));
    m
}

fn histogram(pairs: &[(&str, &str)], checks: &Checks) -> Metric {
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let buckets = CHECK_DURATION_BUCKETS
        .iter()
        .zip(checks.buckets)
        .map(|(le, count)| {
            cumulative += count;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*le);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    h.set_bucket(buckets);
    h.set_sample_count(checks.buckets.iter().sum());
    h.set_sample_sum(checks.sum);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

impl DatapathCollector {
    fn snapshot(&self) -> Option<Snapshot> {
        let fresh = lock(&self.0.source).as_ref().and_then(|source| source());
        let mut last = lock(&self.0.last);
        match fresh {
            Some(snapshot) => {
                *last = Some(snapshot.clone());
                Some(snapshot)
            }
            None => {
                if lock(&self.0.source).is_some() {
                    tracing::warn!(
                        "metrics scrape: no datapath snapshot in time; serving the last one"
                    );
                }
                last.clone()
            }
        }
    }

    /// The families of one snapshot, every family present (those without series empty).
    fn families(&self, snapshot: Option<&Snapshot>) -> Vec<MetricFamily> {
        let mut series: BTreeMap<&'static str, Vec<Metric>> = DATAPATH_FAMILIES
            .iter()
            .map(|(name, _, _)| (*name, Vec::new()))
            .chain(std::iter::once((IDLE_EXPIRED.0, Vec::new())))
            .collect();
        let mut push = |family: &'static str, metric: Metric| {
            series.entry(family).or_default().push(metric);
        };
        // Every global counter appears, at 0 before the first snapshot.
        let zeros: Vec<(String, u64)> = lb_common::stat::NAMES
            .iter()
            .map(|n| ((*n).to_owned(), 0))
            .collect();
        let global = snapshot.map_or(&zeros, |(stats, _)| &stats.global);
        for (name, value) in global {
            match global_family(name) {
                Some((family, Some((label, value_label)))) => {
                    push(family, counter(&[(label, value_label)], *value));
                }
                Some((family, None)) => push(family, counter(&[], *value)),
                None => tracing::debug!(%name, "datapath counter without a metric"),
            }
        }
        // The agent's own reclaims, beside the datapath's in-line ones (a global counter).
        push(
            "weir_nat_reclaimed_total",
            counter(
                &[("by", "agent")],
                self.0.nat_reclaimed.load(Ordering::Relaxed),
            ),
        );
        if let Some((ct, expired)) = lock(&self.0.conntrack).as_ref() {
            for (table, entries, capacity) in [
                ("established", ct.entries, ct.capacity),
                ("half_open", ct.half_open, ct.half_open_capacity),
            ] {
                let labels = [("table", table)];
                push("weir_conntrack_entries", gauge(&labels, entries as f64));
                push("weir_conntrack_capacity", gauge(&labels, capacity as f64));
                let ratio = if capacity == 0 {
                    0.0
                } else {
                    entries as f64 / capacity as f64
                };
                push("weir_conntrack_fill_ratio", gauge(&labels, ratio));
            }
            for why in Expiry::ALL {
                push(
                    "weir_conntrack_expired_total",
                    counter(&[("reason", why.label())], expired[why.index()]),
                );
            }
        }
        if let Some(nat) = lock(&self.0.nat).as_ref() {
            push("weir_nat_table_entries", gauge(&[], nat.entries as f64));
            push("weir_nat_table_capacity", gauge(&[], nat.capacity as f64));
            for (service, backend, count) in &nat.connections {
                let address = backend.to_string();
                push(
                    "weir_nat_connections",
                    gauge(
                        &[("service", service.as_str()), ("backend", address.as_str())],
                        *count as f64,
                    ),
                );
            }
            for s in &nat.snat {
                let address = s.address.to_string();
                let pairs = [
                    ("service", s.service.as_str()),
                    ("address", address.as_str()),
                ];
                push(
                    "weir_snat_ports_in_use",
                    gauge(&pairs, s.ports_in_use as f64),
                );
                // A range has at least one port (config rule); 0 only guards the division.
                let ratio = if s.port_count == 0 {
                    0.0
                } else {
                    s.fullest_backend as f64 / s.port_count as f64
                };
                push("weir_snat_port_use_ratio", gauge(&pairs, ratio));
            }
        }
        if let Some((stats, backends)) = snapshot {
            let checks = lock(&self.0.checks);
            for b in backends {
                let address = b.address.to_string();
                let pairs = [
                    ("service", b.service.as_str()),
                    ("backend", address.as_str()),
                ];
                push("weir_backend_up", gauge(&pairs, f64::from(u8::from(b.up))));
                push("weir_backend_weight", gauge(&pairs, f64::from(b.weight)));
                push(
                    "weir_backend_active_connections",
                    gauge(&pairs, b.active_connections as f64),
                );
                push(
                    "weir_backend_max_connections",
                    gauge(&pairs, f64::from(b.max_connections)),
                );
                let full =
                    b.max_connections > 0 && b.active_connections >= u64::from(b.max_connections);
                push(
                    "weir_backend_full",
                    gauge(&pairs, f64::from(u8::from(full))),
                );
                push(
                    "weir_backend_turned_away_total",
                    counter(&pairs, b.turned_away),
                );
                push("weir_backend_packets_total", counter(&pairs, b.packets));
                push("weir_backend_bytes_total", counter(&pairs, b.bytes));
                push("weir_backend_new_flows_total", counter(&pairs, b.new_flows));
                // A backend without a health check gets no check series.
                if b.health != api::Health::Unchecked {
                    let c = checks
                        .get(&(b.service.clone(), b.address))
                        .cloned()
                        .unwrap_or_default();
                    for (result, count) in [("success", c.success), ("failure", c.failure)] {
                        let mut with_result = pairs.to_vec();
                        with_result.push(("result", result));
                        push("weir_health_checks_total", counter(&with_result, count));
                    }
                    push("weir_health_check_duration_seconds", histogram(&pairs, &c));
                }
            }
            for rule in &stats.source_rules {
                let pairs = [
                    ("service", rule.service.as_str()),
                    ("action", rule.action.as_str()),
                    ("prefix", rule.prefix.as_str()),
                ];
                push(
                    "weir_source_rule_packets_total",
                    counter(&pairs, rule.packets),
                );
            }
            for row in &stats.rate_limited {
                let pairs = [
                    ("service", row.service.as_str()),
                    ("limit", row.limit.as_str()),
                ];
                push(
                    "weir_rate_limited_packets_total",
                    counter(&pairs, row.packets),
                );
            }
            for row in stats.services.iter().filter(|row| row.backend.is_none()) {
                let pairs = [("service", row.service.as_str())];
                push("weir_service_packets_total", counter(&pairs, row.packets));
                push("weir_service_bytes_total", counter(&pairs, row.bytes));
                push(
                    "weir_service_new_flows_total",
                    counter(&pairs, row.new_flows),
                );
            }
        }
        let help_and_type = |name: &str| {
            DATAPATH_FAMILIES
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or((IDLE_EXPIRED.1, MetricType::COUNTER), |(_, help, kind)| {
                    (*help, *kind)
                })
        };
        series
            .into_iter()
            .filter(|(_, metrics)| !metrics.is_empty())
            .map(|(name, metrics)| {
                let (help, kind) = help_and_type(name);
                let mut family = MetricFamily::default();
                family.set_name(name.to_owned());
                family.set_help(help.to_owned());
                family.set_field_type(kind);
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

impl Collector for DatapathCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.snapshot();
        self.families(snapshot.as_ref())
    }
}

/// The agent's metrics. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Metrics {
    datapath: DatapathCollector,
    reloads: IntCounterVec,
    last_reload_successful: IntGauge,
    rollback_failures: IntCounter,
    vip_announced: IntGaugeVec,
    vip_announce_changed: IntGaugeVec,
    announce_withdrawn: IntGauge,
    ring_fingerprint: IntGaugeVec,
    /// The label values set last, so that series of VIPs and services gone are removed
    /// (rather than the whole family reset, which a scrape could catch empty).
    announced_vips: Mutex<Vec<String>>,
    fingerprints: Mutex<Vec<(String, String)>>,
    audit_dropped: IntCounter,
    audit_failed: IntCounter,
}

/// One VIP's announcement for the metrics: (VIP, announced, unix seconds of the last
/// change).
pub type VipAnnouncement = (IpAddr, bool, u64);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers a collector and hands it back.
fn register<C>(registry: &Registry, collector: C) -> Result<C, prometheus::Error>
where
    C: Collector + Clone + 'static,
{
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl Metrics {
    /// Creates and registers every metric. Until [`Self::set_snapshot_source`] the datapath
    /// families hold only the global counters, at 0.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let descs = DATAPATH_FAMILIES
            .iter()
            .map(|(name, help, _)| (*name, *help))
            .chain(std::iter::once(IDLE_EXPIRED))
            .map(|(name, help)| {
                Desc::new(name.to_owned(), help.to_owned(), Vec::new(), HashMap::new())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let datapath = register(
            registry,
            DatapathCollector(Arc::new(Inner {
                source: Mutex::new(None),
                last: Mutex::new(None),
                checks: Mutex::new(HashMap::new()),
                nat: Mutex::new(None),
                nat_reclaimed: AtomicU64::new(0),
                conntrack: Mutex::new(None),
                descs,
            })),
        )?;
        let reloads = register(
            registry,
            IntCounterVec::new(
                Opts::new("weir_reloads_total", "Config reloads, by result."),
                &["result"],
            )?,
        )?;
        for result in RELOAD_RESULTS {
            reloads.get_metric_with_label_values(&[result])?;
        }
        let last_reload_successful = register(
            registry,
            IntGauge::with_opts(Opts::new(
                "weir_config_last_reload_successful",
                "Whether the last config reload succeeded (1) or failed (0).",
            ))?,
        )?;
        last_reload_successful.set(1);
        let rollback_failures = register(
            registry,
            IntCounter::with_opts(Opts::new(
                "weir_rollback_failures_total",
                "Failed changes whose rollback failed too, leaving the datapath with a mix of old and new state until the next successful apply.",
            ))?,
        )?;
        let audit_dropped = register(
            registry,
            IntCounter::with_opts(Opts::new(
                "weir_audit_records_dropped_total",
                "Audit records dropped because the audit writer was behind (its queue full).",
            ))?,
        )?;
        let audit_failed = register(
            registry,
            IntCounter::with_opts(Opts::new(
                "weir_audit_write_failures_total",
                "Audit records whose write failed, and audit log rotations that failed or were stopped by a file weir did not create.",
            ))?,
        )?;
        let build_info = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "weir_build_info",
                    "The running agent's version, as a label; the value is always 1.",
                ),
                &["version"],
            )?,
        )?;
        build_info
            .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])?
            .set(1);
        let vip_announced = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "weir_vip_announced",
                    "Whether the VIP's route is in the [announce] table, for BIRD to announce over BGP (1) or not (0).",
                ),
                &["vip"],
            )?,
        )?;
        let vip_announce_changed = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "weir_vip_announce_changed_timestamp_seconds",
                    "Unix time at which weir_vip_announced last changed (or the agent first saw the VIP).",
                ),
                &["vip"],
            )?,
        )?;
        let announce_withdrawn = register(
            registry,
            IntGauge::with_opts(Opts::new(
                "weir_announce_withdrawn",
                "Whether `weir announce withdraw` is in force: no VIP is announced (1) or not (0).",
            ))?,
        )?;
        let ring_fingerprint = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "weir_service_ring_fingerprint_info",
                    "The fingerprint of the service's ring and backend set, as a label (always 1); every balancer of an ECMP group must show the same.",
                ),
                &["service", "fingerprint"],
            )?,
        )?;
        Ok(Self {
            datapath,
            reloads,
            last_reload_successful,
            rollback_failures,
            audit_dropped,
            audit_failed,
            vip_announced,
            vip_announce_changed,
            announce_withdrawn,
            ring_fingerprint,
            announced_vips: Mutex::new(Vec::new()),
            fingerprints: Mutex::new(Vec::new()),
        })
    }

    /// Records the announcements as they are now (replacing the last ones).
    pub fn set_announcements(&self, vips: &[VipAnnouncement], withdrawn: bool) {
        let mut last = lock(&self.announced_vips);
        let now: Vec<String> = vips.iter().map(|(vip, _, _)| vip.to_string()).collect();
        for gone in last.iter().filter(|v| !now.contains(v)) {
            let _ = self.vip_announced.remove_label_values(&[gone]);
            let _ = self.vip_announce_changed.remove_label_values(&[gone]);
        }
        for ((_, announced, since), label) in vips.iter().zip(&now) {
            self.vip_announced
                .with_label_values(&[label])
                .set(i64::from(*announced));
            self.vip_announce_changed
                .with_label_values(&[label])
                .set(i64::try_from(*since).unwrap_or(i64::MAX));
        }
        self.announce_withdrawn.set(i64::from(withdrawn));
        *last = now;
    }

    /// Records each service's ring fingerprint (replacing the last ones).
    pub fn set_fingerprints(&self, prints: Vec<(String, String)>) {
        let mut last = lock(&self.fingerprints);
        for gone in last.iter().filter(|p| !prints.contains(p)) {
            let _ = self
                .ring_fingerprint
                .remove_label_values(&[&gone.0, &gone.1]);
        }
        for (service, print) in &prints {
            self.ring_fingerprint
                .with_label_values(&[service, print])
                .set(1);
        }
        *last = prints;
    }

    /// The counters the audit writer counts its losses in.
    #[must_use]
    pub fn audit_counters(&self) -> crate::audit::AuditCounters {
        crate::audit::AuditCounters {
            dropped: self.audit_dropped.clone(),
            failed: self.audit_failed.clone(),
        }
    }

    /// Where scrapes get their datapath snapshot from (the agent's owner task).
    pub fn set_snapshot_source(&self, source: SnapshotSource) {
        *lock(&self.datapath.0.source) = Some(source);
    }

    /// Records one health check of `backend` of `service`.
    pub fn observe_check(&self, service: &str, backend: IpAddr, ok: bool, duration: Duration) {
        lock(&self.datapath.0.checks)
            .entry((service.to_owned(), backend))
            .or_default()
            .observe(ok, duration);
    }

    /// Forgets the checks of backends that are no longer checked, so a backend added again
    /// starts from zero (its other series restart with its new datapath id too).
    pub fn retain_checks(&self, keep: impl Fn(&str, IpAddr) -> bool) {
        lock(&self.datapath.0.checks).retain(|(service, address), _| keep(service, *address));
    }

    /// Records one config reload (`weir reload`, SIGHUP) and whether it took effect.
    pub fn observe_reload(&self, ok: bool) {
        let result = if ok {
            RELOAD_RESULTS[0]
        } else {
            RELOAD_RESULTS[1]
        };
        self.reloads.with_label_values(&[result]).inc();
        self.last_reload_successful.set(i64::from(ok));
    }

    /// Records what a walk of the NAT table measured (replacing the last walk's gauges).
    pub fn set_nat_table(&self, gauges: NatTableGauges) {
        *lock(&self.datapath.0.nat) = Some(gauges);
    }

    /// Records a walk of the connection tables: its gauges, and its deletes added to the
    /// totals.
    pub fn set_conntrack(&self, gauges: ConntrackGauges) {
        let mut last = lock(&self.datapath.0.conntrack);
        let mut totals = last.map_or([0; Expiry::ALL.len()], |(_, t)| t);
        for (total, n) in totals.iter_mut().zip(gauges.expired) {
            *total += n;
        }
        *last = Some((gauges, totals));
    }

    /// Records NAT table entries the agent's walk deleted.
    pub fn observe_nat_reclaimed(&self, entries: u64) {
        self.datapath
            .0
            .nat_reclaimed
            .fetch_add(entries, Ordering::Relaxed);
    }

    /// Records a failed change whose rollback failed too.
    pub fn observe_rollback_failure(&self) {
        self.rollback_failures.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        process::{Command, Stdio},
        sync::atomic::{AtomicU64, Ordering},
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A registry whose datapath snapshot the test sets, as the agent's owner would answer.
    struct Fixture {
        registry: Registry,
        metrics: Metrics,
        current: Arc<Mutex<Option<Snapshot>>>,
    }

    impl Fixture {
        fn new() -> Self {
            let registry = Registry::new();
            let metrics = Metrics::new(&registry).unwrap();
            let current: Arc<Mutex<Option<Snapshot>>> = Arc::new(Mutex::new(None));
            let source = Arc::clone(&current);
            metrics.set_snapshot_source(Box::new(move || lock(&source).clone()));
            Self {
                registry,
                metrics,
                current,
            }
        }

        /// A scrape that sees `snapshot`.
        fn scrape(&self, snapshot: &Snapshot) -> String {
            *lock(&self.current) = Some(snapshot.clone());
            encode(&self.registry)
        }
    }

    const WEB_BACKEND: &str = "198.51.100.11";

    fn backend_info(address: &str, up: bool, packets: u64) -> api::BackendInfo {
        api::BackendInfo {
            service: "web".into(),
            address: address.parse().unwrap(),
            weight: 3,
            admin: api::Admin::Enabled,
            health: api::Health::Up,
            up,
            slots: 100,
            effective_weight: 3,
            backup: false,
            active_connections: 7,
            max_connections: 0,
            turned_away: 0,
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
        }
    }

    fn traffic(backend: Option<&str>, packets: u64) -> api::TrafficStats {
        api::TrafficStats {
            service: "web".into(),
            backend: backend.map(|b| b.parse().unwrap()),
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
        }
    }

    fn snapshot(packets: u64, drops: u64) -> (api::Stats, Vec<api::BackendInfo>) {
        let global = lb_common::stat::NAMES
            .iter()
            .map(|name| {
                let value = if *name == "drop_fragment" { drops } else { 0 };
                ((*name).to_owned(), value)
            })
            .collect();
        let stats = api::Stats {
            global,
            services: vec![traffic(None, packets)],
            backends: vec![traffic(Some(WEB_BACKEND), packets)],
            source_rules: vec![api::RuleStats {
                service: "web".into(),
                action: "deny".into(),
                prefix: "198.51.100.0/24".into(),
                packets: drops,
            }],
            rate_limited: vec![api::RateLimitStats {
                service: "web".into(),
                limit: "source".into(),
                packets: drops + 1,
            }],
        };
        (stats, vec![backend_info(WEB_BACKEND, true, packets)])
    }

    /// The value of the sample `series` (name and labels exactly as encoded).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
    }

    fn backend_series(name: &str) -> String {
        format!("{name}{{backend=\"{WEB_BACKEND}\",service=\"web\"}}")
    }

    #[test]
    fn the_nat_table_walk_shows_as_gauges_and_the_agent_reclaims() {
        let f = Fixture::new();
        let text = f.scrape(&snapshot(1, 0));
        // Before the first walk: the agent's reclaims at 0, no table gauges yet.
        assert_eq!(
            sample(&text, r#"weir_nat_reclaimed_total{by="agent"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"weir_nat_reclaimed_total{by="datapath"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "weir_nat_table_entries"), None);
        f.metrics.set_nat_table(NatTableGauges {
            entries: 6,
            capacity: 524_288,
            connections: vec![
                ("web".into(), WEB_BACKEND.parse().unwrap(), 3),
                ("web".into(), "198.51.100.12".parse().unwrap(), 0),
            ],
            snat: vec![
                api::SnatUse {
                    service: "web".into(),
                    address: "198.51.100.1".parse().unwrap(),
                    ports_in_use: 80,
                    fullest_backend: 64,
                    port_count: 64,
                },
                api::SnatUse {
                    service: "web".into(),
                    address: "198.51.100.2".parse().unwrap(),
                    ports_in_use: 0,
                    fullest_backend: 0,
                    port_count: 64,
                },
            ],
        });
        f.metrics.observe_nat_reclaimed(4);
        f.metrics.observe_nat_reclaimed(2);
        let text = f.scrape(&snapshot(1, 0));
        assert_eq!(sample(&text, "weir_nat_table_entries"), Some(6.0));
        assert_eq!(sample(&text, "weir_nat_table_capacity"), Some(524_288.0));
        assert_eq!(
            sample(&text, &backend_series("weir_nat_connections")),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"weir_nat_connections{backend="198.51.100.12",service="web"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"weir_nat_reclaimed_total{by="agent"}"#),
            Some(6.0)
        );
        // The SNAT gauges: a full endpoint is 1.0, an address without pairs a 0 series.
        let snat = |family: &str, address: &str| {
            sample(
                &text,
                &format!("{family}{{address=\"{address}\",service=\"web\"}}"),
            )
        };
        assert_eq!(snat("weir_snat_ports_in_use", "198.51.100.1"), Some(80.0));
        assert_eq!(snat("weir_snat_port_use_ratio", "198.51.100.1"), Some(1.0));
        assert_eq!(snat("weir_snat_ports_in_use", "198.51.100.2"), Some(0.0));
        assert_eq!(snat("weir_snat_port_use_ratio", "198.51.100.2"), Some(0.0));
        assert!(
            text.contains("# TYPE weir_snat_port_use_ratio gauge"),
            "{text}"
        );
        assert!(text.contains("# TYPE weir_nat_connections gauge"), "{text}");
        assert!(
            text.contains("# TYPE weir_nat_reclaimed_total counter"),
            "{text}"
        );
        // Each walk replaces the last one's series: a backend gone is gone.
        f.metrics.set_nat_table(NatTableGauges {
            entries: 0,
            capacity: 524_288,
            connections: vec![],
            snat: vec![],
        });
        let text = f.scrape(&snapshot(1, 0));
        assert_eq!(sample(&text, &backend_series("weir_nat_connections")), None);
        assert!(!text.contains("weir_snat_ports_in_use{"), "{text}");
        assert_eq!(sample(&text, "weir_nat_table_entries"), Some(0.0));
    }

    #[test]
    fn every_datapath_counter_has_a_metric() {
        for name in lb_common::stat::NAMES {
            assert!(global_family(name).is_some(), "{name} has no metric");
        }
    }

    #[test]
    fn announcements_and_fingerprints_replace_the_last_ones() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let web: IpAddr = "203.0.113.10".parse().unwrap();
        let dns: IpAddr = "203.0.113.53".parse().unwrap();
        metrics.set_announcements(&[(web, true, 1_700_000_000), (dns, false, 5)], false);
        metrics.set_fingerprints(vec![("web".into(), "00000000000000aa".into())]);
        let text = encode(&registry);
        assert_eq!(
            sample(&text, r#"weir_vip_announced{vip="203.0.113.10"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"weir_vip_announced{vip="203.0.113.53"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"weir_vip_announce_changed_timestamp_seconds{vip="203.0.113.10"}"#
            ),
            Some(1_700_000_000.0)
        );
        assert_eq!(sample(&text, "weir_announce_withdrawn"), Some(0.0));
        metrics.set_announcements(&[(web, false, 1_700_000_100)], true);
        metrics.set_fingerprints(vec![("web".into(), "00000000000000bb".into())]);
        let text = encode(&registry);
        assert!(!text.contains("203.0.113.53"), "{text}");
        assert_eq!(
            sample(&text, r#"weir_vip_announced{vip="203.0.113.10"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "weir_announce_withdrawn"), Some(1.0));
        assert!(!text.contains("00000000000000aa"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"weir_service_ring_fingerprint_info{fingerprint="00000000000000bb",service="web"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn fresh_registry_has_the_known_series_at_zero() {
        let registry = Registry::new();
        let _metrics = Metrics::new(&registry).unwrap();
        let text = encode(&registry);
        assert_eq!(
            sample(&text, r#"weir_packets_dropped_total{reason="fragment"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"weir_packets_passed_total{reason="not_vip"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"weir_xdp_actions_total{action="redirect"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "weir_conntrack_hits_total"), Some(0.0));
        assert_eq!(sample(&text, "weir_conntrack_misses_total"), Some(0.0));
        assert_eq!(sample(&text, "weir_decap_packets_total"), Some(0.0));
        assert_eq!(
            sample(&text, r#"weir_reloads_total{result="failure"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "weir_config_last_reload_successful"),
            Some(1.0)
        );
        let build_info = format!(
            "weir_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &build_info), Some(1.0));
        assert!(text.contains("# HELP weir_packets_dropped_total "));
        // Per-backend families appear with their first backend.
        assert!(!text.contains("weir_backend_packets_total"));
    }

    #[test]
    fn datapath_sums_become_counters_and_a_decrease_resets() {
        let f = Fixture::new();
        let packets = backend_series("weir_backend_packets_total");
        let bytes = backend_series("weir_backend_bytes_total");

        let text = f.scrape(&snapshot(10, 1));
        assert_eq!(sample(&text, &packets), Some(10.0));
        assert_eq!(sample(&text, &backend_series("weir_backend_up")), Some(1.0));
        assert_eq!(
            sample(&text, &backend_series("weir_backend_weight")),
            Some(3.0)
        );

        let text = f.scrape(&snapshot(42, 7));
        assert!(
            text.lines().any(|line| line
                == r#"weir_backend_packets_total{backend="198.51.100.11",service="web"} 42"#),
            "{text}"
        );
        assert_eq!(sample(&text, &bytes), Some(4200.0));
        assert_eq!(
            sample(&text, &backend_series("weir_backend_new_flows_total")),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, r#"weir_service_packets_total{service="web"}"#),
            Some(42.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"weir_source_rule_packets_total{action="deny",prefix="198.51.100.0/24",service="web"}"#
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"weir_rate_limited_packets_total{limit="source",service="web"}"#
            ),
            Some(8.0)
        );
        assert_eq!(
            sample(&text, r#"weir_service_bytes_total{service="web"}"#),
            Some(4200.0)
        );
        assert_eq!(
            sample(&text, r#"weir_packets_dropped_total{reason="fragment"}"#),
            Some(7.0)
        );
        // Health-checked backends get check series at 0 before their first check.
        assert_eq!(
            sample(
                &text,
                r#"weir_health_checks_total{backend="198.51.100.11",result="failure",service="web"}"#
            ),
            Some(0.0)
        );

        // The backend was re-added: its datapath sums restarted.
        let (stats, mut backends) = snapshot(5, 7);
        backends[0].up = false;
        backends[0].packets = 5;
        backends[0].bytes = 500;
        let text = f.scrape(&(stats, backends));
        assert_eq!(sample(&text, &packets), Some(5.0));
        assert_eq!(sample(&text, &bytes), Some(500.0));
        assert_eq!(sample(&text, &backend_series("weir_backend_up")), Some(0.0));
        assert_eq!(sample(&f.scrape(&snapshot(8, 7)), &packets), Some(8.0));
        // No answer from the agent: the last snapshot is served.
        *lock(&f.current) = None;
        assert_eq!(sample(&encode(&f.registry), &packets), Some(8.0));
    }

    #[test]
    fn backends_and_services_that_went_away_are_dropped() {
        let f = Fixture::new();
        let other = "198.51.100.12";
        let (mut stats, mut backends) = snapshot(10, 0);
        stats.backends.push(traffic(Some(other), 3));
        backends.push(backend_info(other, true, 3));
        let both = (stats, backends);
        let other_packets =
            format!("weir_backend_packets_total{{backend=\"{other}\",service=\"web\"}}");
        assert_eq!(sample(&f.scrape(&both), &other_packets), Some(3.0));

        // A snapshot without the backend has none of its series.
        let text = f.scrape(&snapshot(10, 0));
        assert!(!text.contains(other), "{text}");
        assert!(sample(&text, &backend_series("weir_backend_packets_total")).is_some());

        // A snapshot without the service drops it and its backends, checks included.
        f.metrics
            .observe_check("web", WEB_BACKEND.parse().unwrap(), true, Duration::ZERO);
        let empty = api::Stats {
            global: Vec::new(),
            services: Vec::new(),
            backends: Vec::new(),
            source_rules: Vec::new(),
            rate_limited: Vec::new(),
        };
        let text = f.scrape(&(empty, Vec::new()));
        assert!(!text.contains("service=\"web\""), "{text}");
        assert_eq!(
            sample(&text, "weir_reloads_total{result=\"success\"}"),
            Some(0.0)
        );
    }

    #[test]
    fn checks_and_reloads_are_counted() {
        let f = Fixture::new();
        let metrics = &f.metrics;
        let backend: IpAddr = WEB_BACKEND.parse().unwrap();
        metrics.observe_check("web", backend, true, Duration::from_micros(300));
        metrics.observe_check("web", backend, true, Duration::from_millis(20));
        metrics.observe_check("web", backend, false, Duration::from_secs(2));
        metrics.observe_reload(false);
        let text = f.scrape(&snapshot(1, 0));
        let checks = |result: &str| {
            sample(
                &text,
                &format!(
                    "weir_health_checks_total{{backend=\"{WEB_BACKEND}\",result=\"{result}\",service=\"web\"}}"
                ),
            )
        };
        assert_eq!(checks("success"), Some(2.0));
        assert_eq!(checks("failure"), Some(1.0));
        let bucket = |le: &str| {
            sample(
                &text,
                &format!(
                    "weir_health_check_duration_seconds_bucket{{backend=\"{WEB_BACKEND}\",service=\"web\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(bucket("0.0001"), Some(0.0));
        assert_eq!(bucket("0.0005"), Some(1.0));
        assert_eq!(bucket("0.025"), Some(2.0));
        assert_eq!(bucket("1"), Some(2.0));
        assert_eq!(bucket("2.5"), Some(3.0));
        assert_eq!(bucket("+Inf"), Some(3.0));
        assert_eq!(
            sample(
                &text,
                &backend_series("weir_health_check_duration_seconds_count")
            ),
            Some(3.0)
        );
        let sum = sample(
            &text,
            &backend_series("weir_health_check_duration_seconds_sum"),
        )
        .unwrap();
        assert!((sum - 2.0203).abs() < 1e-9, "{sum}");
        assert_eq!(
            sample(&text, r#"weir_reloads_total{result="failure"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "weir_config_last_reload_successful"),
            Some(0.0)
        );

        metrics.observe_reload(true);
        let text = encode(&f.registry);
        assert_eq!(
            sample(&text, r#"weir_reloads_total{result="success"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "weir_config_last_reload_successful"),
            Some(1.0)
        );
    }

    async fn get(address: std::net::SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn serve_answers_metrics_from_a_fresh_snapshot_and_404_otherwise() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let refreshes = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&refreshes);
        metrics.set_snapshot_source(Box::new(move || {
            // The snapshot this scrape must show: 100 packets per scrape so far.
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            Some(snapshot(100 * n, 0))
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, registry));
        let packets = backend_series("weir_backend_packets_total");

        for n in 1..=2_u32 {
            let answer = get(address, "GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").await;
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(
                head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
                "{head}"
            );
            assert!(
                head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
                "{head}"
            );
            assert_eq!(sample(body, &packets), Some(f64::from(100 * n)), "{body}");
        }
        assert_eq!(refreshes.load(Ordering::SeqCst), 2);

        let answer = get(address, "GET /other HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        let answer = get(address, "POST /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        let answer = get(address, &format!("GET /{} HTTP/1.1\r\n", "x".repeat(9000))).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        let answer = get(address, "HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");
        // Only scrapes of /metrics read the datapath.
        assert_eq!(refreshes.load(Ordering::SeqCst), 3);

        server.abort();
    }

    /// `promtool check metrics` (Debian package `prometheus`, installed by `cargo xtask
    /// setup`) lints names, units, HELP and TYPE lines of a populated registry.
    #[test]
    fn promtool_finds_no_problems() {
        let f = Fixture::new();
        let metrics = &f.metrics;
        metrics.observe_check(
            "web",
            WEB_BACKEND.parse().unwrap(),
            true,
            Duration::from_millis(3),
        );
        metrics.observe_reload(true);
        let text = f.scrape(&snapshot(42, 3));

        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "promtool is not on PATH; `cargo xtask setup` installs it (package prometheus)"
                );
                eprintln!("skipped: promtool is not on PATH (Debian package prometheus)");
                return;
            }
            Err(err) => panic!("running promtool: {err}"),
        };
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
        }
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!(
            "promtool check metrics: {}; stdout: {stdout:?}; stderr: {stderr:?}",
            output.status
        );
        assert!(
            output.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
            "promtool check metrics: {}\n{stdout}{stderr}\n--- input:\n{text}",
            output.status
        );
    }
}
