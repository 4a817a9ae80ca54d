//! The desired state: config ⊕ CLI overlay ⊕ health ⊕ backup ⊕ drain ⊕ slow start, as a
//! pure function to the datapath-level [`DatapathSpec`] the reconciler writes. No clock,
//! no maps, no I/O: the owner task passes in what it knows and the time.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{GLOBAL_ANSWER_PING, GlobalConfig, addr_bytes, nat::SnatSource};

use crate::{
    config::{Config, HealthKind, ServiceConfig},
    overlay::{Admin, EffectiveBackend, Overlay},
    reconcile::{BackendSpec, DatapathSpec, RuleSpec, ServiceSpec},
};

/// Health of one backend as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The service has no health check.
    Unchecked,
    Up,
    Down,
}

/// (service name, backend address).
pub type BackendKey = (String, IpAddr);

/// What the owner task knows besides the config and the overlay.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// Health verdicts of checked backends; a checked backend without one is down.
    pub health: HashMap<BackendKey, Health>,
    /// When a backend last became eligible for traffic: the start of its slow-start ramp.
    pub up_since: HashMap<BackendKey, Instant>,
}

impl Observed {
    /// A backend's health: `Unchecked` without a health check, `Down` until a verdict.
    #[must_use]
    pub fn health_of(&self, service: &ServiceConfig, address: IpAddr) -> Health {
        if service.health_check.kind == HealthKind::None {
            return Health::Unchecked;
        }
        self.health
            .get(&(service.name.clone(), address))
            .copied()
            .unwrap_or(Health::Down)
    }
}

/// The agent-wide part of the spec.
#[must_use]
pub fn global(config: &Config) -> GlobalConfig {
    let mut global = GlobalConfig::default();
    if let Some(v4) = config.agent.tunnel_source {
        global.tunnel_source_v4 = v4.octets();
    }
    if let Some(v6) = config.agent.tunnel_source_v6 {
        global.tunnel_source_v6 = v6.octets();
    }
    if let Some(prefix) = config.agent.tunnel_source_prefix {
        global.outer_base_v4 = prefix.network.octets();
        global.outer_spread_v4 = prefix.host_mask().to_be_bytes();
    }
    if config.agent.answer_ping {
        global.flags |= GLOBAL_ANSWER_PING;
    }
    global.flood_threshold = config.agent.flood_threshold;
    global
}

/// The port a backend's packets are sent to, as the datapath holds it (`BackendInfo::port_be`
/// in host order): in `nat` mode the backend's `port`, else the service's; 0 (the packet's
/// own port) in the DSR modes and for a service of every port.
#[must_use]
pub fn backend_port(service: &ServiceConfig, port: Option<u16>) -> u16 {
    if service.forwarding.is_nat() && service.port != 0 {
        port.unwrap_or(service.port)
    } else {
        0
    }
}

/// A service's datapath fields, with the given backends; `snat_ports` is `[agent]
/// snat_ports`, the range of every SNAT address.
#[must_use]
pub fn service_spec(
    service: &ServiceConfig,
    snat_ports: (u16, u16),
    backends: Vec<BackendSpec>,
) -> ServiceSpec {
    let snat = service
        .snat_addresses
        .iter()
        .map(|addr| SnatSource {
            addr: addr_bytes(*addr).0,
            first_port_host: snat_ports.0,
            // Validation keeps 1024 <= low <= high: at most 64,512 ports.
            port_count: snat_ports.1 - snat_ports.0 + 1,
        })
        .collect();
    ServiceSpec {
        name: service.name.clone(),
        vip: service.vip,
        port: service.port,
        proto: service.protocol.number(),
        scheduler: service.scheduler.code(),
        forwarding: service.forwarding.code(),
        ring_size: service.ring_size,
        // Validation keeps both within 1 s ..= 1 day, whole seconds.
        tcp_idle_timeout_s: service.tcp_idle_timeout.as_secs() as u32,
        udp_idle_timeout_s: service.udp_idle_timeout.as_secs() as u32,
        backends,
        snat,
        source_rules: service
            .source_rules
            .iter()
            .map(|r| {
                let (addr, family) = addr_bytes(r.network);
                RuleSpec {
                    family,
                    addr,
                    len: r.len,
                    allow: r.allow,
                }
            })
            .collect(),
        rate_limits: service.rate_limit.datapath(),
    }
}

/// The plain config view: every backend up at its configured weight (no overlay, no
/// health). For tools and tests that drive the datapath from a config file alone.
#[must_use]
pub fn plain(config: &Config) -> DatapathSpec {
    DatapathSpec {
        global: global(config),
        services: config
            .services
            .iter()
            .map(|s| {
                let backends = s
                    .backends
                    .iter()
                    .map(|b| BackendSpec {
                        address: b.address,
                        port: backend_port(s, b.port),
                        ring_weight: b.weight,
                        up: true,
                        max_connections: b.max_connections,
                        standby: b.backup && b.weight > 0,
                    })
                    .collect();
                service_spec(s, config.agent.snat_ports, backends)
            })
            .collect(),
    }
}

/// What the datapath should do.
///
/// A backend is `up` (tracked flows stay) unless unhealthy or disabled. It takes new flows
/// if up, enabled (not draining) and weighted, and, for a backup, only while no primary of
/// the service takes new flows, or when the primaries are full (`max_connections`): a backup
/// that could take new flows stands by for those. During slow start its weight ramps
/// linearly.
#[must_use]
pub fn desired(
    config: &Config,
    overlay: &Overlay,
    observed: &Observed,
    now: Instant,
) -> DatapathSpec {
    let services = config
        .services
        .iter()
        .map(|service| {
            let effective = overlay.effective(service);
            let up = |b: &EffectiveBackend| {
                observed.health_of(service, b.address) != Health::Down && b.admin != Admin::Disabled
            };
            let takes_new =
                |b: &EffectiveBackend| up(b) && b.admin == Admin::Enabled && b.weight > 0;
            let primary_serving = effective.iter().any(|b| !b.backup && takes_new(b));
            let backends = effective
                .iter()
                .map(|b| {
                    let serving = takes_new(b) && (!b.backup || !primary_serving);
                    let since = observed.up_since.get(&(service.name.clone(), b.address));
                    BackendSpec {
                        address: b.address,
                        port: backend_port(service, b.port),
                        ring_weight: if serving {
                            ramped(service.slow_start, since.copied(), b.weight, now)
                        } else {
                            0
                        },
                        up: up(b),
                        max_connections: b.max_connections,
                        // A backup waiting while the primaries serve: it takes what full
                        // primaries turn away (`max_connections`), and nothing else.
                        standby: b.backup && takes_new(b) && primary_serving,
                    }
                })
                .collect();
            service_spec(service, config.agent.snat_ports, backends)
        })
        .collect();
    DatapathSpec {
        global: global(config),
        services,
    }
}

/// A weight during slow start: linear from `weight / 1000` (at least 1) to `weight`.
#[must_use]
pub fn ramped(slow_start: Duration, since: Option<Instant>, weight: u32, now: Instant) -> u32 {
    let Some(since) = since else {
        return weight;
    };
    if slow_start.is_zero() {
        return weight;
    }
    let elapsed = now.saturating_duration_since(since);
    if elapsed >= slow_start {
        return weight;
    }
    let share = elapsed.as_secs_f64() / slow_start.as_secs_f64();
    ((f64::from(weight) * share).round() as u32).clamp(1, weight.max(1))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(extra: &str, backends: &str) -> Config {
        let text = format!(
            "[agent]\ninterface = \"veth0\"\ntunnel_source = \"198.51.100.1\"\n\
             [[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n\
             ring_size = 1009\n{extra}\n{backends}"
        );
        crate::config::parse(&text, Path::new("test.toml")).expect("valid test config")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const THREE: &str = "[[service.backend]]\naddress = \"198.51.100.11\"\n\
                         [[service.backend]]\naddress = \"198.51.100.12\"\nweight = 3\n\
                         [[service.backend]]\naddress = \"198.51.100.13\"\nbackup = true\n";

    fn weights(spec: &DatapathSpec) -> Vec<(u32, bool)> {
        spec.services[0]
            .backends
            .iter()
            .map(|b| (b.ring_weight, b.up))
            .collect()
    }

    #[test]
    fn unchecked_backends_serve_at_their_weight_and_the_backup_waits() {
        let c = config("", THREE);
        let spec = desired(
            &c,
            &Overlay::default(),
            &Observed::default(),
            Instant::now(),
        );
        assert_eq!(weights(&spec), [(1, true), (3, true), (0, true)]);
        assert_eq!(spec, {
            let mut plain = plain(&c);
            plain.services[0].backends[2].ring_weight = 0;
            plain
        });
    }

    #[test]
    fn checked_backends_are_down_until_a_verdict_and_the_backup_takes_over() {
        let c = config("[service.health_check]\nkind = \"tcp\"\n", THREE);
        let mut observed = Observed::default();
        let spec = desired(&c, &Overlay::default(), &observed, Instant::now());
        assert_eq!(weights(&spec), [(0, false), (0, false), (0, false)]);
        observed
            .health
            .insert(("web".to_owned(), ip("198.51.100.13")), Health::Up);
        let spec = desired(&c, &Overlay::default(), &observed, Instant::now());
        assert_eq!(weights(&spec), [(0, false), (0, false), (1, true)]);
        observed
            .health
            .insert(("web".to_owned(), ip("198.51.100.12")), Health::Up);
        let spec = desired(&c, &Overlay::default(), &observed, Instant::now());
        assert_eq!(weights(&spec), [(0, false), (3, true), (0, true)]);
    }

    #[test]
    fn a_waiting_backup_stands_by_for_full_primaries_and_limits_pass_through() {
        let c = config(
            "max_connections = 7",
            &format!("{THREE}max_connections = 2\n"),
        );
        let mut observed = Observed::default();
        let spec = desired(&c, &Overlay::default(), &observed, Instant::now());
        let view = |spec: &DatapathSpec| -> Vec<(u32, bool, u32)> {
            spec.services[0]
                .backends
                .iter()
                .map(|b| (b.ring_weight, b.standby, b.max_connections))
                .collect()
        };
        // The backup (its own limit 2) waits in the ring's stead: standby.
        assert_eq!(view(&spec), [(1, false, 7), (3, false, 7), (0, true, 2)]);
        // Once it serves in the primaries' place it is in the ring, no longer standby.
        let c = config("[service.health_check]\nkind = \"tcp\"\n", THREE);
        observed
            .health
            .insert(("web".to_owned(), ip("198.51.100.13")), Health::Up);
        let spec = desired(&c, &Overlay::default(), &observed, Instant::now());
        assert_eq!(view(&spec), [(0, false, 0), (0, false, 0), (1, false, 0)]);
        // A draining backup stands by for nothing.
        let c = config("", THREE);
        let mut overlay = Overlay::default();
        overlay.entry("web", ip("198.51.100.13")).admin = Some(Admin::Draining);
        overlay.entry("web", ip("198.51.100.11")).max_connections = Some(9);
        let spec = desired(&c, &overlay, &Observed::default(), Instant::now());
        assert_eq!(view(&spec), [(1, false, 9), (3, false, 0), (0, false, 0)]);
    }

    #[test]
    fn drain_keeps_tracked_flows_and_disable_moves_them() {
        let c = config("", THREE);
        let mut overlay = Overlay::default();
        overlay.entry("web", ip("198.51.100.11")).admin = Some(Admin::Draining);
        overlay.entry("web", ip("198.51.100.12")).admin = Some(Admin::Disabled);
        let spec = desired(&c, &overlay, &Observed::default(), Instant::now());
        // No primary takes new flows: the backup does.
        assert_eq!(weights(&spec), [(0, true), (0, false), (1, true)]);
    }

    #[test]
    fn slow_start_ramps_linearly_and_ends_at_the_weight() {
        let c = config(
            "slow_start = \"10s\"",
            "[[service.backend]]\naddress = \"198.51.100.11\"\nweight = 100\n",
        );
        let start = Instant::now();
        let mut observed = Observed::default();
        observed
            .up_since
            .insert(("web".to_owned(), ip("198.51.100.11")), start);
        let at = |secs: u64| {
            desired(
                &c,
                &Overlay::default(),
                &observed,
                start + Duration::from_secs(secs),
            )
            .services[0]
                .backends[0]
                .ring_weight
        };
        assert_eq!(at(0), 1);
        assert_eq!(at(3), 30);
        assert_eq!(at(5), 50);
        assert_eq!(at(10), 100);
        assert_eq!(at(60), 100);
    }

    #[test]
    fn the_overlay_adds_removes_and_reweights() {
        let c = config("", THREE);
        let mut overlay = Overlay::default();
        let added = overlay.entry("web", ip("198.51.100.14"));
        added.added = true;
        added.weight = Some(2);
        overlay.entry("web", ip("198.51.100.11")).removed = true;
        overlay.entry("web", ip("198.51.100.12")).weight = Some(5);
        let spec = desired(&c, &overlay, &Observed::default(), Instant::now());
        let got: Vec<(IpAddr, u32)> = spec.services[0]
            .backends
            .iter()
            .map(|b| (b.address, b.ring_weight))
            .collect();
        assert_eq!(
            got,
            [
                (ip("198.51.100.12"), 5),
                (ip("198.51.100.13"), 0),
                (ip("198.51.100.14"), 2)
            ]
        );
    }
}
