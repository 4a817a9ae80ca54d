//! `weir agent`: turns a validated config into datapath state and keeps the program attached
//! until told to stop.
//!
//! [`Balancer`] owns the desired state and writes only differences through a
//! [`MapWriter`]: Maglev slots that changed, backends that changed, VIPs that appeared or
//! went. It knows nothing of the kernel, so it is tested with a recording writer.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    BACKEND_DOWN, BACKEND_UP, BackendInfo, GlobalConfig, MAX_BACKENDS, MAX_RING_SIZE, MAX_SERVICES,
    VipInfo, VipKey, addr_bytes,
    maglev::{self, MaglevBackend},
};

use crate::{
    config::{Config, Scheduler, ServiceConfig},
    datapath::{DatapathError, MapWriter},
};

/// A backend as the agent tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub address: IpAddr,
    /// Its weight in the ring (0 while draining, disabled or down).
    pub weight: u32,
    pub generation: u32,
    /// Whether the datapath honours flows tracked to it.
    pub up: bool,
}

/// What the agent wants the datapath to do with one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: IpAddr,
    /// Share of new flows (ring weight); 0 means no new flows.
    pub ring_weight: u32,
    /// Whether flows already tracked to it keep going there.
    pub up: bool,
}

impl DesiredBackend {
    /// The plain config view: up, with its configured weight.
    #[must_use]
    pub fn from_config(backend: &crate::config::BackendConfig) -> Self {
        Self {
            address: backend.address,
            ring_weight: backend.weight,
            up: true,
        }
    }
}

/// What `Balancer::adopt` found in pinned maps: the datapath state a previous agent left.
#[derive(Debug, Default, Clone)]
pub struct Adopted {
    pub vips: Vec<(VipKey, VipInfo)>,
    /// Every backend entry ever written (generation above 0), by id.
    pub backends: Vec<(u32, BackendInfo)>,
}

impl BackendState {
    /// The datapath's entry for this backend.
    #[must_use]
    pub fn info(&self, service_id: u32, state: u8) -> BackendInfo {
        let (addr, family) = addr_bytes(self.address);
        BackendInfo {
            addr,
            service_id,
            generation: self.generation,
            family,
            state,
            _pad: [0; 2],
            weight: self.weight,
        }
    }
}

/// A service as the agent tracks it.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub id: u32,
    pub config: ServiceConfig,
    pub key: VipKey,
    pub backends: Vec<BackendState>,
    /// The ring as last written to the datapath.
    pub ring: Vec<u32>,
}

/// What one `apply` wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    pub ring_slots_written: usize,
    pub backends_written: usize,
    pub vips_written: usize,
}

/// Errors of `Balancer::apply`.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("no free {0} id left (limit reached)")]
    Exhausted(&'static str),
}

/// The agent's view of the datapath and the only writer of its maps.
pub struct Balancer<M> {
    maps: M,
    services: BTreeMap<String, ServiceState>,
    /// Generation last given out per backend id; bumped on every reuse.
    generations: Vec<u32>,
    free_backend_ids: Vec<u32>,
    free_service_ids: Vec<u32>,
}

/// A stand-in config for a VIP found in pinned maps that no configured service claims; it
/// exists only so that the next `apply` removes the VIP.
fn orphan_config(key: VipKey, info: &VipInfo) -> ServiceConfig {
    ServiceConfig {
        name: format!("(orphan {})", info.service_id),
        vip: lb_common::addr_from_bytes(key.addr, key.family),
        port: u16::from_be(key.port_be),
        protocol: if key.proto == lb_common::PROTO_UDP {
            crate::config::Protocol::Udp
        } else {
            crate::config::Protocol::Tcp
        },
        scheduler: Scheduler::default(),
        forwarding: crate::config::Forwarding::default(),
        ring_size: info.ring_size,
        backends: Vec::new(),
        health_check: crate::config::HealthCheck::default(),
        slow_start: std::time::Duration::ZERO,
        tcp_idle_timeout: crate::config::DEFAULT_TCP_IDLE_TIMEOUT,
        udp_idle_timeout: crate::config::DEFAULT_UDP_IDLE_TIMEOUT,
    }
}

/// The identity Maglev hashes for a backend: stable across restarts and independent of the
/// other backends, so a backend keeps its preferred slots.
fn maglev_key(service: &str, address: IpAddr) -> Vec<u8> {
    let mut key = service.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&addr_bytes(address).0);
    key
}

impl<M: MapWriter> Balancer<M> {
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            services: BTreeMap::new(),
            generations: vec![0; MAX_BACKENDS as usize],
            // Popped from the end: lowest ids first.
            free_backend_ids: (0..MAX_BACKENDS).rev().collect(),
            free_service_ids: (0..MAX_SERVICES).rev().collect(),
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceState> {
        self.services.values()
    }

    pub fn service(&self, name: &str) -> Option<&ServiceState> {
        self.services.get(name)
    }

    /// Takes over the state a previous agent left in pinned maps, so that the next `apply`
    /// writes only differences and keeps service ids, backend ids and generations: flows
    /// tracked by the datapath stay valid. `read_ring` reads a service's ring from the map.
    /// VIPs no configured service claims are kept under a placeholder name, so the next
    /// `apply` removes them. Returns, per (service, backend), whether it was up.
    pub fn adopt(
        &mut self,
        adopted: &Adopted,
        services: &[ServiceConfig],
        mut read_ring: impl FnMut(u32, u32) -> Result<Vec<u32>, DatapathError>,
    ) -> Result<Vec<(String, IpAddr, bool)>, ApplyError> {
        let mut known = Vec::new();
        for (id, info) in &adopted.backends {
            if let Some(g) = self.generations.get_mut(*id as usize) {
                *g = (*g).max(info.generation);
            }
        }
        let mut used_services = Vec::new();
        let mut used_backends = Vec::new();
        for (key, info) in &adopted.vips {
            let name = services
                .iter()
                .find(|s| VipKey::new(s.vip, s.port, s.protocol.number()) == *key)
                .map_or_else(
                    || format!("(orphan {})", info.service_id),
                    |s| s.name.clone(),
                );
            let config = services
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .unwrap_or_else(|| orphan_config(*key, info));
            let backends: Vec<BackendState> = adopted
                .backends
                .iter()
                .filter(|(_, b)| b.service_id == info.service_id && b.generation > 0)
                .map(|(id, b)| BackendState {
                    id: *id,
                    address: lb_common::addr_from_bytes(b.addr, b.family),
                    weight: 0,
                    generation: b.generation,
                    up: b.state == BACKEND_UP,
                })
                .collect();
            for b in &backends {
                known.push((name.clone(), b.address, b.up));
                used_backends.push(b.id);
            }
            used_services.push(info.service_id);
            let ring = read_ring(info.service_id, info.ring_size)?;
            self.services.insert(
                name,
                ServiceState {
                    id: info.service_id,
                    config,
                    key: *key,
                    backends,
                    ring,
                },
            );
        }
        self.free_service_ids = (0..MAX_SERVICES)
            .rev()
            .filter(|id| !used_services.contains(id))
            .collect();
        self.free_backend_ids = (0..MAX_BACKENDS)
            .rev()
            .filter(|id| !used_backends.contains(id))
            .collect();
        Ok(known)
    }

    /// Brings the datapath to `config` (every backend up, at its configured weight),
    /// writing only what differs from the current state.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, ApplyError> {
        let desired: Vec<(ServiceConfig, Vec<DesiredBackend>)> = config
            .services
            .iter()
            .map(|s| {
                let backends = s.backends.iter().map(DesiredBackend::from_config).collect();
                (s.clone(), backends)
            })
            .collect();
        self.apply_desired(config, &desired)
    }

    /// Brings the datapath to `desired`, writing only what differs from the current state.
    /// Order matters for packets in flight: backends are written before the ring slots that
    /// point at them, rings before the VIP that makes them reachable; on removal the VIP goes
    /// first. `config` supplies the agent-wide settings (tunnel sources).
    pub fn apply_desired(
        &mut self,
        config: &Config,
        desired: &[(ServiceConfig, Vec<DesiredBackend>)],
    ) -> Result<ApplyReport, ApplyError> {
        let mut report = ApplyReport::default();
        let mut global = GlobalConfig::default();
        if let Some(v4) = config.agent.tunnel_source {
            global.tunnel_source_v4 = v4.octets();
        }
        if let Some(v6) = config.agent.tunnel_source_v6 {
            global.tunnel_source_v6 = v6.octets();
        }
        self.maps.set_global(global)?;

        // Services that are gone.
        let wanted: Vec<&str> = desired.iter().map(|(s, _)| s.name.as_str()).collect();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !wanted.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(state) = self.services.remove(&name) {
                self.remove_service(state, &mut report)?;
            }
        }

        for (service, backends) in desired {
            self.apply_service(service, backends, &mut report)?;
        }

        // VIP addresses: one entry per distinct address, kept while any service uses it.
        let mut addrs: Vec<VipKey> = self
            .services
            .values()
            .map(|s| VipKey::addr_only(s.config.vip))
            .collect();
        addrs.sort_by_key(|k| (k.family, k.addr));
        addrs.dedup();
        for addr in addrs {
            self.maps.set_vip_addr(addr)?;
        }
        Ok(report)
    }

    fn remove_service(
        &mut self,
        state: ServiceState,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        self.maps.remove_vip(state.key)?;
        report.vips_written += 1;
        let addr = VipKey::addr_only(state.config.vip);
        if !self
            .services
            .values()
            .any(|s| VipKey::addr_only(s.config.vip) == addr)
        {
            self.maps.remove_vip_addr(addr)?;
        }
        for backend in &state.backends {
            self.retire_backend(backend, state.id, report)?;
        }
        self.free_service_ids.push(state.id);
        tracing::info!(service = %state.config.name, "service removed");
        Ok(())
    }

    fn retire_backend(
        &mut self,
        backend: &BackendState,
        service_id: u32,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        self.maps
            .set_backend(backend.id, backend.info(service_id, BACKEND_DOWN))?;
        report.backends_written += 1;
        self.free_backend_ids.push(backend.id);
        Ok(())
    }

    fn apply_service(
        &mut self,
        service: &ServiceConfig,
        desired: &[DesiredBackend],
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        let key = VipKey::new(service.vip, service.port, service.protocol.number());
        let existing = self.services.remove(&service.name);
        // A changed VIP key is a new service as far as the datapath is concerned.
        let mut state = match existing {
            Some(state) if state.key == key => state,
            other => {
                let id = match other {
                    Some(old) => {
                        let id = old.id;
                        self.maps.remove_vip(old.key)?;
                        for backend in &old.backends {
                            self.retire_backend(backend, id, report)?;
                        }
                        id
                    }
                    None => self
                        .free_service_ids
                        .pop()
                        .ok_or(ApplyError::Exhausted("service"))?,
                };
                ServiceState {
                    id,
                    config: service.clone(),
                    key,
                    backends: Vec::new(),
                    // The kernel's slots are unknown (a fresh or reused ring): an empty ring
                    // makes `diff` write every slot of the new one.
                    ring: Vec::new(),
                }
            }
        };

        // Backends: keep ids of addresses that stay, retire the others, allocate new ones.
        let old_backends = std::mem::take(&mut state.backends);
        let mut backends = Vec::with_capacity(desired.len());
        // Backends going down are marked down after the ring stops pointing at them (or a
        // re-picked tracked flow would land on them again); backends coming up are marked up
        // before the ring points at them.
        let mut going_down = Vec::new();
        for wanted in desired {
            let backend = match old_backends.iter().find(|b| b.address == wanted.address) {
                Some(old) => {
                    let backend = BackendState {
                        weight: wanted.ring_weight,
                        up: wanted.up,
                        ..old.clone()
                    };
                    if old.up && !wanted.up {
                        going_down.push(backend.clone());
                    } else if wanted.up && (!old.up || old.weight != backend.weight) {
                        // Up, or still up with a new weight (least-conn compares by it).
                        self.maps
                            .set_backend(backend.id, backend.info(state.id, BACKEND_UP))?;
                        report.backends_written += 1;
                    }
                    backend
                }
                None => {
                    let id = self
                        .free_backend_ids
                        .pop()
                        .ok_or(ApplyError::Exhausted("backend"))?;
                    let generation = self.generations[id as usize].wrapping_add(1);
                    self.generations[id as usize] = generation;
                    let backend = BackendState {
                        id,
                        address: wanted.address,
                        weight: wanted.ring_weight,
                        generation,
                        up: wanted.up,
                    };
                    // The id's previous owner may have left a connection count behind.
                    self.maps.set_active_connections(id, 0)?;
                    let state_code = if wanted.up { BACKEND_UP } else { BACKEND_DOWN };
                    self.maps
                        .set_backend(backend.id, backend.info(state.id, state_code))?;
                    report.backends_written += 1;
                    backend
                }
            };
            backends.push(backend);
        }

        // The ring, then only the slots that changed.
        let keys: Vec<Vec<u8>> = backends
            .iter()
            .map(|b| maglev_key(&service.name, b.address))
            .collect();
        let members: Vec<MaglevBackend<'_>> = backends
            .iter()
            .zip(&keys)
            .map(|(b, key)| MaglevBackend {
                id: b.id,
                weight: b.weight,
                key,
            })
            .collect();
        let ring = if service.scheduler == Scheduler::RoundRobin {
            let weights: Vec<(u32, u32)> = backends.iter().map(|b| (b.id, b.weight)).collect();
            lb_common::rr::smooth_sequence(&weights, MAX_RING_SIZE)
        } else {
            maglev::build_ring(&members, service.ring_size)
        };
        for (slot, backend) in maglev::diff(&state.ring, &ring) {
            self.maps.set_ring_slot(state.id, slot, backend)?;
            report.ring_slots_written += 1;
        }
        state.ring = ring;

        for backend in &going_down {
            self.maps
                .set_backend(backend.id, backend.info(state.id, BACKEND_DOWN))?;
            report.backends_written += 1;
        }
        // Backends that left the service: after the ring no longer points at them.
        for old in &old_backends {
            if !backends.iter().any(|b| b.address == old.address) {
                self.retire_backend(old, state.id, report)?;
            }
        }
        state.backends = backends;

        let info = VipInfo {
            service_id: state.id,
            ring_size: state.ring.len() as u32,
            forwarding: service.forwarding.code(),
            scheduler: service.scheduler.code(),
            _pad: [0; 2],
            tcp_idle_timeout_s: service.tcp_idle_timeout.as_secs() as u32,
            udp_idle_timeout_s: service.udp_idle_timeout.as_secs() as u32,
        };
        self.maps.set_vip(key, info)?;
        report.vips_written += 1;
        state.config = service.clone();
        tracing::info!(
            service = %service.name,
            vip = %service.vip,
            port = service.port,
            protocol = service.protocol.as_str(),
            backends = state.backends.len(),
            "service configured"
        );
        self.services.insert(service.name.clone(), state);
        Ok(())
    }
}

pub use crate::runtime::{run, teardown};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    /// Records writes instead of making them.
    #[derive(Default)]
    struct Recorder {
        ring: std::collections::HashMap<(u32, u32), u32>,
        backends: std::collections::HashMap<u32, BackendInfo>,
        vips: std::collections::HashMap<VipKey, VipInfo>,
        vip_addrs: std::collections::HashSet<VipKey>,
        slot_writes: usize,
        conns: std::collections::HashMap<u32, i64>,
    }

    impl MapWriter for Recorder {
        fn set_global(&mut self, _: GlobalConfig) -> Result<(), DatapathError> {
            Ok(())
        }
        fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
            self.vips.insert(key, info);
            Ok(())
        }
        fn remove_vip(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.vips.remove(&key);
            Ok(())
        }
        fn set_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.vip_addrs.insert(key);
            Ok(())
        }
        fn remove_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.vip_addrs.remove(&key);
            Ok(())
        }
        fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError> {
            self.backends.insert(id, info);
            Ok(())
        }
        fn set_ring_slot(&mut self, s: u32, slot: u32, b: u32) -> Result<(), DatapathError> {
            self.ring.insert((s, slot), b);
            self.slot_writes += 1;
            Ok(())
        }
        fn set_tx_port(&mut self, _: u32) -> Result<(), DatapathError> {
            Ok(())
        }
        fn set_active_connections(&mut self, id: u32, count: i64) -> Result<(), DatapathError> {
            self.conns.insert(id, count);
            Ok(())
        }
    }

    fn config(backends: &[(&str, u32)]) -> Config {
        let mut text = String::from(
            "[agent]\ninterface = \"veth0\"\ntunnel_source = \"198.51.100.1\"\n\
             [[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\nring_size = 1009\n",
        );
        for (addr, weight) in backends {
            text.push_str(&format!(
                "[[service.backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
            ));
        }
        config::parse(&text, Path::new("test.toml")).expect("valid test config")
    }

    #[test]
    fn first_apply_writes_every_slot_and_the_vip() {
        let mut b = Balancer::new(Recorder::default());
        let report = b
            .apply(&config(&[("198.51.100.11", 1), ("198.51.100.12", 1)]))
            .unwrap();
        assert_eq!(report.ring_slots_written, 1009);
        assert_eq!(report.backends_written, 2);
        let m = b.maps();
        assert_eq!(m.vips.len(), 1);
        assert_eq!(m.vip_addrs.len(), 1);
        let ids: std::collections::HashSet<u32> = m.ring.values().copied().collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|id| m.backends[id].state == BACKEND_UP));
    }

    #[test]
    fn removing_a_backend_writes_only_its_slots_and_marks_it_down() {
        let mut b = Balancer::new(Recorder::default());
        b.apply(&config(&[
            ("198.51.100.11", 1),
            ("198.51.100.12", 1),
            ("198.51.100.13", 1),
        ]))
        .unwrap();
        let removed_id = b.service("web").unwrap().backends[2].id;
        let its_slots = b
            .service("web")
            .unwrap()
            .ring
            .iter()
            .filter(|&&id| id == removed_id)
            .count();
        let report = b
            .apply(&config(&[("198.51.100.11", 1), ("198.51.100.12", 1)]))
            .unwrap();
        // Maglev may move a few other slots; never more than a small fraction.
        assert!(report.ring_slots_written >= its_slots);
        assert!(
            report.ring_slots_written <= its_slots + 1009 / 50,
            "{} slots written for {its_slots} slots owned",
            report.ring_slots_written
        );
        let m = b.maps();
        assert_eq!(m.backends[&removed_id].state, BACKEND_DOWN);
        assert!(m.ring.values().all(|&id| id != removed_id));
    }

    #[test]
    fn reapplying_the_same_config_writes_no_slot() {
        let mut b = Balancer::new(Recorder::default());
        let c = config(&[("198.51.100.11", 1), ("198.51.100.12", 3)]);
        b.apply(&c).unwrap();
        let before = b.maps().slot_writes;
        let report = b.apply(&c).unwrap();
        assert_eq!(report.ring_slots_written, 0);
        assert_eq!(report.backends_written, 0);
        assert_eq!(b.maps().slot_writes, before);
    }

    #[test]
    fn a_reused_backend_id_gets_a_new_generation() {
        let mut b = Balancer::new(Recorder::default());
        b.apply(&config(&[("198.51.100.11", 1), ("198.51.100.12", 1)]))
            .unwrap();
        let old = b.service("web").unwrap().backends[1].clone();
        b.apply(&config(&[("198.51.100.11", 1)])).unwrap();
        b.apply(&config(&[("198.51.100.11", 1), ("198.51.100.13", 1)]))
            .unwrap();
        let new = b.service("web").unwrap().backends[1].clone();
        assert_eq!(new.id, old.id, "the freed id is reused");
        assert_ne!(new.generation, old.generation);
        assert_eq!(b.maps().backends[&new.id].generation, new.generation);
    }
}
