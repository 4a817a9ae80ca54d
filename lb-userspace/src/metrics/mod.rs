//! Prometheus metrics: the agent's counters and gauges ([`Metrics`]), and the HTTP endpoint
//! serving them in the text exposition format ([`http`]).
//!
//! The registry is created by `main` and passed down; nothing here is global. Datapath
//! values (per-CPU sums read from the stats maps) are not pushed continuously: each scrape
//! first asks the agent for a fresh snapshot (the `refresh` callback of [`serve`]), which
//! lands in [`Metrics::observe_datapath`]. The datapath's sums only grow, so they are exposed
//! as counters advanced by the difference; a sum that went down (a backend re-added, a fresh
//! datapath) resets that series, which Prometheus' `rate()` understands as a counter reset.
//!
//! ```text
//! weir_backend_packets_total{backend="198.51.100.11",service="web"} 42
//! weir_packets_dropped_total{reason="fragment"} 0
//! ```

pub mod http;

pub use http::{encode, serve};

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::api;

/// Buckets of `weir_health_check_duration_seconds`: 0.1 ms to 5 s.
const CHECK_DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// `result` label values of `weir_health_checks_total`.
const CHECK_RESULTS: [&str; 2] = ["success", "failure"];
/// `result` label values of `weir_reloads_total`.
const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

/// `BackendInfo::health` of a backend without a health check: it gets no check series.
const HEALTH_UNCHECKED: &str = "unchecked";

/// The agent's metric handles. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    backend_up: IntGaugeVec,
    backend_weight: IntGaugeVec,
    backend_active_connections: IntGaugeVec,
    untracked_midflow: IntCounter,
    conntrack_idle_expired: IntCounter,
    backend_packets: IntCounterVec,
    backend_bytes: IntCounterVec,
    backend_new_flows: IntCounterVec,
    health_checks: IntCounterVec,
    health_check_duration: HistogramVec,
    service_packets: IntCounterVec,
    service_bytes: IntCounterVec,
    service_new_flows: IntCounterVec,
    xdp_actions: IntCounterVec,
    packets_dropped: IntCounterVec,
    packets_passed: IntCounterVec,
    conntrack_hits: IntCounter,
    conntrack_misses: IntCounter,
    decap_packets: IntCounter,
    reloads: IntCounterVec,
    last_reload_successful: IntGauge,
    rollback_failures: IntCounter,
    /// The label sets in use, so series of services and backends that went away are dropped.
    /// Also serialises the read-compare-advance of the datapath counters.
    known: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    services: HashSet<String>,
    backends: HashSet<(String, IpAddr)>,
}

/// Registers a collector and hands it back.
fn register<C>(registry: &Registry, collector: C) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    register(registry, IntCounter::with_opts(Opts::new(name, help))?)
}

/// Moves `counter` to `value`, a monotonic sum read from the datapath: forward by the
/// difference, or, when the sum went down (its source was reset), restart from `value`.
fn advance(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value >= current {
        counter.inc_by(value - current);
    } else {
        counter.reset();
        counter.inc_by(value);
    }
}

/// Removes one label set from a vector; a label set that is not there is not an error.
fn remove<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    labels: &[&str],
) {
    // Only fails when the label set does not exist (or has the wrong arity, which ours
    // cannot): nothing to do either way.
    let _ = vec.remove_label_values(labels);
}

impl Metrics {
    /// Creates and registers every metric, with the series of every known label set at 0.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let sb = &["service", "backend"];
        let metrics = Self {
            backend_up: gauge_vec(
                registry,
                "weir_backend_up",
                "Whether the datapath honours flows tracked to the backend (1) or not (0).",
                sb,
            )?,
            backend_weight: gauge_vec(
                registry,
                "weir_backend_weight",
                "Configured weight of the backend in its service's ring.",
                sb,
            )?,
            backend_active_connections: gauge_vec(
                registry,
                "weir_backend_active_connections",
                "Active connections to the backend as the datapath counts them (new flows minus ended or idle-expired ones).",
                sb,
            )?,
            backend_packets: counter_vec(
                registry,
                "weir_backend_packets_total",
                "Packets the datapath forwarded to the backend.",
                sb,
            )?,
            backend_bytes: counter_vec(
                registry,
                "weir_backend_bytes_total",
                "Bytes (as received) the datapath forwarded to the backend.",
                sb,
            )?,
            backend_new_flows: counter_vec(
                registry,
                "weir_backend_new_flows_total",
                "New flows the scheduler assigned to the backend.",
                sb,
            )?,
            health_checks: counter_vec(
                registry,
                "weir_health_checks_total",
                "Health checks of the backend, by result.",
                &["service", "backend", "result"],
            )?,
            health_check_duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "weir_health_check_duration_seconds",
                        "Time a health check of the backend took, successful or not.",
                    )
                    .buckets(CHECK_DURATION_BUCKETS.to_vec()),
                    sb,
                )?,
            )?,
            service_packets: counter_vec(
                registry,
                "weir_service_packets_total",
                "Packets to the service's VIP that the datapath balanced.",
                &["service"],
            )?,
            service_bytes: counter_vec(
                registry,
                "weir_service_bytes_total",
                "Bytes (as received) to the service's VIP that the datapath balanced.",
                &["service"],
            )?,
            service_new_flows: counter_vec(
                registry,
                "weir_service_new_flows_total",
                "New flows to the service that the scheduler assigned.",
                &["service"],
            )?,
            xdp_actions: counter_vec(
                registry,
                "weir_xdp_actions_total",
                "Packets by the XDP action the datapath returned.",
                &["action"],
            )?,
            packets_dropped: counter_vec(
                registry,
                "weir_packets_dropped_total",
                "Packets the datapath dropped, by reason.",
                &["reason"],
            )?,
            packets_passed: counter_vec(
                registry,
                "weir_packets_passed_total",
                "Packets the datapath passed to the kernel stack, by reason.",
                &["reason"],
            )?,
            conntrack_hits: counter(
                registry,
                "weir_conntrack_hits_total",
                "Packets of a tracked flow whose connection-table entry was honoured.",
            )?,
            conntrack_misses: counter(
                registry,
                "weir_conntrack_misses_total",
                "Packets that asked the scheduler (no entry, a stale entry, or a SYN).",
            )?,
            decap_packets: counter(
                registry,
                "weir_decap_packets_total",
                "Packets whose outer tunnel header the decap program removed.",
            )?,
            untracked_midflow: counter(
                registry,
                "weir_untracked_midflow_packets_total",
                "Non-SYN TCP packets of flows the connection table did not know (evicted, idle-expired, or the LB restarted); sent by the service's hash.",
            )?,
            conntrack_idle_expired: counter(
                registry,
                "weir_conntrack_idle_expired_total",
                "Tracked flows forgotten because they were idle longer than their service's timeout.",
            )?,
            reloads: counter_vec(
                registry,
                "weir_reloads_total",
                "Config reloads, by result.",
                &["result"],
            )?,
            last_reload_successful: register(
                registry,
                IntGauge::with_opts(Opts::new(
                    "weir_config_last_reload_successful",
                    "Whether the last config reload succeeded (1) or failed (0).",
                ))?,
            )?,
            rollback_failures: counter(
                registry,
                "weir_rollback_failures_total",
                "Failed changes whose rollback failed too, leaving the datapath with a mix of old and new state until the next successful apply.",
            )?,
            known: Mutex::new(Known::default()),
        };
        let build_info = gauge_vec(
            registry,
            "weir_build_info",
            "The running agent's version, as a label; the value is always 1.",
            &["version"],
        )?;
        build_info
            .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])?
            .set(1);
        metrics.last_reload_successful.set(1);
        for result in RELOAD_RESULTS {
            metrics.reloads.get_metric_with_label_values(&[result])?;
        }
        for name in lb_common::stat::NAMES {
            // Creates the series at 0; a name no metric takes is caught by a test.
            let _ = metrics.global(name);
        }
        Ok(metrics)
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        // The guarded sets stay consistent even if a holder panicked.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counter of a global datapath counter (`lb_common::stat::NAMES`).
    fn global(&self, name: &str) -> Option<IntCounter> {
        if let Some(action) = name.strip_prefix("xdp_") {
            Some(self.xdp_actions.with_label_values(&[action]))
        } else if let Some(reason) = name.strip_prefix("drop_") {
            Some(self.packets_dropped.with_label_values(&[reason]))
        } else if let Some(reason) = name.strip_prefix("pass_") {
            Some(self.packets_passed.with_label_values(&[reason]))
        } else {
            match name {
                "conntrack_hit" => Some(self.conntrack_hits.clone()),
                "conntrack_miss" => Some(self.conntrack_misses.clone()),
                "decap_ok" => Some(self.decap_packets.clone()),
                "untracked_midflow" => Some(self.untracked_midflow.clone()),
                "conntrack_idle_expired" => Some(self.conntrack_idle_expired.clone()),
                _ => None,
            }
        }
    }

    /// Sets datapath-derived metrics from a fresh snapshot taken at scrape time.
    ///
    /// The snapshot is taken to be complete: series of services and backends in neither
    /// `stats` nor `backends` are dropped (as by [`Self::forget_backend`]). Traffic counters
    /// come from `stats.backends`, or from `backends` for a backend `stats` lacks.
    pub fn observe_datapath(&self, stats: &api::Stats, backends: &[api::BackendInfo]) {
        let mut known = self.known();

        for (name, value) in &stats.global {
            match self.global(name) {
                Some(counter) => advance(&counter, *value),
                None => tracing::debug!(%name, "datapath counter without a metric"),
            }
        }

        let mut traffic: HashMap<(&str, IpAddr), (u64, u64, u64)> = HashMap::new();
        for row in &stats.backends {
            if let Some(address) = row.backend {
                traffic.insert(
                    (row.service.as_str(), address),
                    (row.packets, row.bytes, row.new_flows),
                );
            }
        }
        for backend in backends {
            traffic
                .entry((backend.service.as_str(), backend.address))
                .or_insert((backend.packets, backend.bytes, backend.new_flows));
            let address = backend.address.to_string();
            let labels = [backend.service.as_str(), address.as_str()];
            self.backend_up
                .with_label_values(&labels)
                .set(i64::from(backend.up));
            self.backend_weight
                .with_label_values(&labels)
                .set(i64::from(backend.weight));
            self.backend_active_connections
                .with_label_values(&labels)
                .set(i64::try_from(backend.active_connections).unwrap_or(i64::MAX));
            if backend.health != HEALTH_UNCHECKED {
                self.touch_check_series(&labels);
            }
        }

        let mut services: HashSet<String> = HashSet::new();
        let mut present: HashSet<(String, IpAddr)> = HashSet::new();
        for ((service, address), (packets, bytes, new_flows)) in traffic {
            let address_text = address.to_string();
            let labels = [service, address_text.as_str()];
            advance(&self.backend_packets.with_label_values(&labels), packets);
            advance(&self.backend_bytes.with_label_values(&labels), bytes);
            advance(
                &self.backend_new_flows.with_label_values(&labels),
                new_flows,
            );
            services.insert(service.to_owned());
            present.insert((service.to_owned(), address));
        }
        for row in stats.services.iter().filter(|row| row.backend.is_none()) {
            let labels = [row.service.as_str()];
            advance(
                &self.service_packets.with_label_values(&labels),
                row.packets,
            );
            advance(&self.service_bytes.with_label_values(&labels), row.bytes);
            advance(
                &self.service_new_flows.with_label_values(&labels),
                row.new_flows,
            );
            services.insert(row.service.clone());
        }

        for (service, address) in known.backends.difference(&present) {
            self.remove_backend_series(service, *address);
        }
        for service in known.services.difference(&services) {
            self.remove_service_series(service);
        }
        known.backends = present;
        known.services = services;
    }

    /// Creates a backend's check series (both results, the histogram) at 0.
    fn touch_check_series(&self, labels: &[&str; 2]) {
        for result in CHECK_RESULTS {
            self.health_checks
                .with_label_values(&[labels[0], labels[1], result]);
        }
        self.health_check_duration.with_label_values(labels);
    }

    /// Records one health check of `backend` of `service`.
    pub fn observe_check(&self, service: &str, backend: IpAddr, ok: bool, duration: Duration) {
        let mut known = self.known();
        let address = backend.to_string();
        let labels = [service, address.as_str()];
        self.touch_check_series(&labels);
        let result = if ok {
            CHECK_RESULTS[0]
        } else {
            CHECK_RESULTS[1]
        };
        self.health_checks
            .with_label_values(&[service, address.as_str(), result])
            .inc();
        self.health_check_duration
            .with_label_values(&labels)
            .observe(duration.as_secs_f64());
        known.backends.insert((service.to_owned(), backend));
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

    /// Records a failed change whose rollback failed too.
    pub fn observe_rollback_failure(&self) {
        self.rollback_failures.inc();
    }

    /// Drops every series of a backend that no longer exists (removed from its service, or
    /// its service removed). The next scrape's snapshot would drop them too; this is for
    /// the agent to call at once.
    pub fn forget_backend(&self, service: &str, backend: IpAddr) {
        let mut known = self.known();
        self.remove_backend_series(service, backend);
        known.backends.remove(&(service.to_owned(), backend));
    }

    /// Drops every series of a service that no longer exists, and of its backends.
    pub fn forget_service(&self, service: &str) {
        let mut known = self.known();
        self.remove_service_series(service);
        let gone: Vec<(String, IpAddr)> = known
            .backends
            .iter()
            .filter(|(s, _)| s == service)
            .cloned()
            .collect();
        for (s, address) in gone {
            self.remove_backend_series(&s, address);
            known.backends.remove(&(s, address));
        }
        known.services.remove(service);
    }

    fn remove_backend_series(&self, service: &str, backend: IpAddr) {
        let address = backend.to_string();
        let labels = [service, address.as_str()];
        remove(&self.backend_up, &labels);
        remove(&self.backend_weight, &labels);
        remove(&self.backend_active_connections, &labels);
        remove(&self.backend_packets, &labels);
        remove(&self.backend_bytes, &labels);
        remove(&self.backend_new_flows, &labels);
        remove(&self.health_check_duration, &labels);
        for result in CHECK_RESULTS {
            remove(&self.health_checks, &[service, address.as_str(), result]);
        }
    }

    fn remove_service_series(&self, service: &str) {
        remove(&self.service_packets, &[service]);
        remove(&self.service_bytes, &[service]);
        remove(&self.service_new_flows, &[service]);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        process::{Command, Stdio},
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    const WEB_BACKEND: &str = "198.51.100.11";

    fn backend_info(address: &str, up: bool, packets: u64) -> api::BackendInfo {
        api::BackendInfo {
            service: "web".into(),
            address: address.parse().unwrap(),
            weight: 3,
            admin: "enabled".into(),
            health: "up".into(),
            up,
            slots: 100,
            effective_weight: 3,
            backup: false,
            active_connections: 7,
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
    fn every_datapath_counter_has_a_metric() {
        let metrics = Metrics::new(&Registry::new()).unwrap();
        for name in lb_common::stat::NAMES {
            assert!(metrics.global(name).is_some(), "{name} has no metric");
        }
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
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let packets = backend_series("weir_backend_packets_total");
        let bytes = backend_series("weir_backend_bytes_total");

        let (stats, backends) = snapshot(10, 1);
        metrics.observe_datapath(&stats, &backends);
        let text = encode(&registry);
        assert_eq!(sample(&text, &packets), Some(10.0));
        assert_eq!(sample(&text, &backend_series("weir_backend_up")), Some(1.0));
        assert_eq!(
            sample(&text, &backend_series("weir_backend_weight")),
            Some(3.0)
        );

        let (stats, backends) = snapshot(42, 7);
        metrics.observe_datapath(&stats, &backends);
        let text = encode(&registry);
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
        metrics.observe_datapath(&stats, &backends);
        let text = encode(&registry);
        assert_eq!(sample(&text, &packets), Some(5.0));
        assert_eq!(sample(&text, &bytes), Some(500.0));
        assert_eq!(sample(&text, &backend_series("weir_backend_up")), Some(0.0));
        let (stats, backends) = snapshot(8, 7);
        metrics.observe_datapath(&stats, &backends);
        assert_eq!(sample(&encode(&registry), &packets), Some(8.0));
    }

    #[test]
    fn backends_and_services_that_went_away_are_dropped() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let other = "198.51.100.12";
        let (mut stats, mut backends) = snapshot(10, 0);
        stats.backends.push(traffic(Some(other), 3));
        backends.push(backend_info(other, true, 3));
        metrics.observe_datapath(&stats, &backends);
        let other_packets =
            format!("weir_backend_packets_total{{backend=\"{other}\",service=\"web\"}}");
        assert_eq!(sample(&encode(&registry), &other_packets), Some(3.0));

        metrics.forget_backend("web", other.parse().unwrap());
        let text = encode(&registry);
        assert!(!text.contains(other), "{text}");
        assert!(sample(&text, &backend_series("weir_backend_packets_total")).is_some());

        // A snapshot without the service drops it and its backends.
        metrics.observe_check("web", WEB_BACKEND.parse().unwrap(), true, Duration::ZERO);
        let empty = api::Stats {
            global: Vec::new(),
            services: Vec::new(),
            backends: Vec::new(),
        };
        metrics.observe_datapath(&empty, &[]);
        let text = encode(&registry);
        assert!(!text.contains("service=\"web\""), "{text}");
        // Global series stay.
        assert_eq!(
            sample(&text, r#"weir_packets_dropped_total{reason="fragment"}"#),
            Some(0.0)
        );

        metrics.observe_datapath(&stats, &backends);
        metrics.forget_service("web");
        assert!(!encode(&registry).contains("service=\"web\""));
    }

    #[test]
    fn checks_and_reloads_are_counted() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let backend: IpAddr = WEB_BACKEND.parse().unwrap();
        metrics.observe_check("web", backend, true, Duration::from_micros(300));
        metrics.observe_check("web", backend, true, Duration::from_millis(20));
        metrics.observe_check("web", backend, false, Duration::from_secs(2));
        metrics.observe_reload(false);
        let text = encode(&registry);
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
        let text = encode(&registry);
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
    async fn serve_answers_metrics_after_refreshing_and_404_otherwise() {
        let registry = Registry::new();
        let metrics = Arc::new(Metrics::new(&registry).unwrap());
        let refreshes = Arc::new(AtomicU64::new(0));
        let refresh = {
            let metrics = Arc::clone(&metrics);
            let refreshes = Arc::clone(&refreshes);
            move || {
                let metrics = Arc::clone(&metrics);
                let refreshes = Arc::clone(&refreshes);
                async move {
                    // The snapshot this scrape must show: 100 packets per refresh so far.
                    let n = refreshes.fetch_add(1, Ordering::SeqCst) + 1;
                    let (stats, backends) = snapshot(100 * n, 0);
                    metrics.observe_datapath(&stats, &backends);
                }
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, registry, refresh));
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
        // Only scrapes of /metrics refresh.
        assert_eq!(refreshes.load(Ordering::SeqCst), 3);

        server.abort();
    }

    /// `promtool check metrics` (Debian package `prometheus`, installed by `cargo xtask
    /// setup`) lints names, units, HELP and TYPE lines of a populated registry.
    #[test]
    fn promtool_finds_no_problems() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let (stats, backends) = snapshot(42, 3);
        metrics.observe_datapath(&stats, &backends);
        metrics.observe_check(
            "web",
            WEB_BACKEND.parse().unwrap(),
            true,
            Duration::from_millis(3),
        );
        metrics.observe_reload(true);
        let text = encode(&registry);

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
