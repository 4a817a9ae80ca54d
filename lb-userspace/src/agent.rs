//! `weir agent`: turns a validated config into datapath state and keeps the program attached
//! until told to stop.
//!
//! [`Balancer`] owns the desired state and writes only differences through a
//! [`MapWriter`]: Maglev slots that changed, backends that changed, VIPs that appeared or
//! went. It knows nothing of the kernel, so it is tested with a recording writer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use lb_common::{
    BACKEND_DOWN, BACKEND_NONE, BACKEND_UP, BackendInfo, GlobalConfig, MAX_BACKENDS, MAX_SERVICES,
    VipInfo, VipKey, addr_bytes,
    maglev::{self, MaglevBackend},
    prog_name,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Config, ServiceConfig},
    datapath::{self, DatapathError, KernelMaps, MapWriter},
};

/// A backend as the agent tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    pub generation: u32,
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

    /// Brings the datapath to `config`, writing only what differs from the current state.
    /// Order matters for packets in flight: backends are written before the ring slots that
    /// point at them, rings before the VIP that makes them reachable; on removal the VIP goes
    /// first.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, ApplyError> {
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
        let wanted: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
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

        for service in &config.services {
            self.apply_service(service, &mut report)?;
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
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        let key = VipKey::new(service.vip, service.port, service.protocol.number());
        let existing = self.services.remove(&service.name);
        // A changed VIP key is a new service as far as the datapath is concerned.
        let mut state = match existing {
            Some(state) if state.key == key && state.ring.len() == service.ring_size as usize => {
                state
            }
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
                    // The kernel's slots are unknown (a fresh or reused ring): a value no
                    // backend id can take makes `diff` rewrite every slot.
                    ring: vec![BACKEND_NONE - 1; service.ring_size as usize],
                }
            }
        };

        // Backends: keep ids of addresses that stay, retire the others, allocate new ones.
        let old_backends = std::mem::take(&mut state.backends);
        let mut backends = Vec::with_capacity(service.backends.len());
        for wanted in &service.backends {
            let (backend, changed) = match old_backends.iter().find(|b| b.address == wanted.address)
            {
                Some(old) => (
                    BackendState {
                        weight: wanted.weight,
                        ..old.clone()
                    },
                    false,
                ),
                None => {
                    let id = self
                        .free_backend_ids
                        .pop()
                        .ok_or(ApplyError::Exhausted("backend"))?;
                    let generation = self.generations[id as usize].wrapping_add(1);
                    self.generations[id as usize] = generation;
                    (
                        BackendState {
                            id,
                            address: wanted.address,
                            weight: wanted.weight,
                            generation,
                        },
                        true,
                    )
                }
            };
            if changed {
                self.maps
                    .set_backend(backend.id, backend.info(state.id, BACKEND_UP))?;
                report.backends_written += 1;
            }
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
        let ring = maglev::build_ring(&members, service.ring_size);
        for (slot, backend) in maglev::diff(&state.ring, &ring) {
            self.maps.set_ring_slot(state.id, slot, backend)?;
            report.ring_slots_written += 1;
        }
        state.ring = ring;

        // Backends that left the service: after the ring no longer points at them.
        for old in &old_backends {
            if !backends.iter().any(|b| b.address == old.address) {
                self.retire_backend(old, state.id, report)?;
            }
        }
        state.backends = backends;

        let info = VipInfo {
            service_id: state.id,
            ring_size: service.ring_size,
            forwarding: service.forwarding.code(),
            scheduler: service.scheduler.code(),
            _pad: [0; 2],
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

/// Interfaces of this network namespace (name, ifindex), from `if_nameindex(3)`.
fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: `if_nameindex` returns a heap array terminated by a zero entry, or NULL; we
    // read it until the terminator and free it once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.push((name, (*entry).if_index));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// `bpf_fib_lookup` answers only for interfaces with forwarding enabled (it reports
/// "forwarding disabled" otherwise), so the agent turns it on for the interface it serves.
fn enable_forwarding(interface: &str, v6: bool) -> anyhow::Result<()> {
    let mut paths = vec![format!("/proc/sys/net/ipv4/conf/{interface}/forwarding")];
    if v6 {
        paths.push(format!("/proc/sys/net/ipv6/conf/{interface}/forwarding"));
    }
    for path in paths {
        std::fs::write(&path, "1").with_context(|| format!("enabling forwarding: {path}"))?;
        tracing::info!(%path, "forwarding enabled (bpf_fib_lookup needs it)");
    }
    Ok(())
}

/// Prompts the kernel to resolve each backend's neighbour entry (ARP/ND), which
/// `bpf_fib_lookup` reads but does not create: an empty datagram to the discard port.
fn warm_neighbours(config: &Config) {
    let v4 = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).ok();
    let v6 = UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).ok();
    for service in &config.services {
        for backend in &service.backends {
            let socket = match backend.address {
                IpAddr::V4(_) => v4.as_ref(),
                IpAddr::V6(_) => v6.as_ref(),
            };
            if let Some(socket) = socket {
                // Best effort: an unreachable backend shows up as drop_fib_lookup.
                let _ = socket.send_to(&[], SocketAddr::new(backend.address, 9));
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let interface = config.agent.interface.clone();
    tracing::info!(config = %config_path.display(), %interface, services = config.services.len(), "starting");
    // Fail before loading anything if the interface is not here.
    datapath::ifindex(&interface)?;

    let mut ebpf = datapath::load_object(config.agent.conntrack_entries, false)?;
    datapath::load_program(&mut ebpf, prog_name::BALANCER)?;
    let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf)?);
    let report = balancer.apply(&config)?;
    tracing::info!(
        ring_slots = report.ring_slots_written,
        backends = report.backends_written,
        vips = report.vips_written,
        "maps written"
    );
    for (name, index) in interfaces() {
        if name != "lo" {
            balancer.maps_mut().set_tx_port(index)?;
        }
    }
    let any_v6 = config
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .any(|b| b.address.is_ipv6());
    enable_forwarding(&interface, any_v6)?;
    warm_neighbours(&config);

    let program: &mut aya::programs::Xdp = ebpf
        .program_mut(prog_name::BALANCER)
        .context("balancer program")?
        .try_into()?;
    let (link, mode) = datapath::attach(program, &interface, config.agent.xdp_mode)?;
    tracing::info!(%interface, mode = mode.as_str(), "XDP balancer attached");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut warm = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = warm.tick() => warm_neighbours(&config),
        }
    }
    tracing::info!(%interface, "stopping: detaching XDP");
    program.detach(link)?;
    drop(balancer);
    Ok(())
}

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
