//! The datapath-level model of what the maps should hold, and the diff that writes it.
//!
//! [`Balancer`] takes a [`DatapathSpec`] (services by VIP key with scheduler and forwarding
//! codes, backends with ring weights and up/down: no config types, no health, no overlay;
//! `agent::desired` computes it) and writes only differences through a [`MapWriter`]:
//! Maglev slots that changed, backends that changed, VIPs that appeared or went. Every
//! write is bounded to the service's own ring. It knows nothing of the kernel, so it is
//! tested with the [`Recorder`](crate::datapath::recorder::Recorder).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    BACKEND_DOWN, BACKEND_UP, BackendInfo, FORWARD_FULLNAT, FORWARD_NAT, GlobalConfig,
    MAX_BACKENDS, MAX_RING_SIZE, MAX_SERVICES, SCHED_IP_HASH, VipAddrBits, VipInfo, VipKey,
    addr_bytes, forwarding_is_nat,
    inbound::fragment_key,
    limits::{CONN_LIMITS_ANY, SpillSet},
    maglev,
    nat::SnatSource,
    rate::{RATE_SOURCE_FLOWS, RATE_VIP_FLOWS, RateLimits},
    rules::{
        MAX_RULES_PER_SERVICE, RULE_ALLOW, RULE_DENY, SOURCE_RULES_ALLOWLIST, SOURCE_RULES_ANY,
        SourceRule, rule_key,
    },
};

use crate::datapath::{DatapathError, MapWriter, maps::RuleKey};

pub mod rings;

pub use rings::{RingCache, RingInput};

/// Everything the datapath should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathSpec {
    /// Agent-wide settings (the tunnels' outer sources).
    pub global: GlobalConfig,
    pub services: Vec<ServiceSpec>,
}

/// One service as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The service's name: the identity Maglev hashes backends under.
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `lb_common::PROTO_*`.
    pub proto: u8,
    /// `lb_common::SCHED_*`.
    pub scheduler: u8,
    /// `lb_common::FORWARD_*`.
    pub forwarding: u8,
    /// Maglev ring size (a prime, at most `MAX_RING_SIZE`); round robin sizes its ring by
    /// its sequence instead.
    pub ring_size: u32,
    pub tcp_idle_timeout_s: u32,
    pub udp_idle_timeout_s: u32,
    pub backends: Vec<BackendSpec>,
    /// `fullnat`: the SNAT pool (addresses and the agent's port range); empty otherwise.
    pub snat: Vec<SnatSource>,
    /// Source rules, in config order (allow list, then deny list): rule `i` counts in
    /// `SOURCE_RULE_STATS[id * MAX_RULES_PER_SERVICE + i]`.
    pub source_rules: Vec<RuleSpec>,
    /// Rate limits on new flows, as the datapath applies them (`RATE_LIMITS[id]`); a limit
    /// whose `interval_ns` is 0 is off, all zero: none.
    pub rate_limits: RateLimits,
}

/// One source rule of a service, as the datapath keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSpec {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// The network address (host bits zero; IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    pub len: u8,
    pub allow: bool,
}

impl ServiceSpec {
    /// `VipInfo::rate_limits` of the service.
    fn rate_limit_flags(&self) -> u8 {
        let mut flags = 0;
        if self.rate_limits.source_flows.interval_ns != 0 {
            flags |= RATE_SOURCE_FLOWS;
        }
        if self.rate_limits.vip_flows.interval_ns != 0 {
            flags |= RATE_VIP_FLOWS;
        }
        flags
    }

    /// `VipInfo::source_rules` of the service.
    fn source_rule_flags(&self) -> u8 {
        let mut flags = 0;
        if !self.source_rules.is_empty() {
            flags |= SOURCE_RULES_ANY;
        }
        if self.source_rules.iter().any(|r| r.allow) {
            flags |= SOURCE_RULES_ALLOWLIST;
        }
        flags
    }

    /// The service's `SOURCE_RULES` entries under service id `id`.
    fn rule_entries(&self, id: u32) -> Vec<(RuleKey, SourceRule)> {
        self.source_rules
            .iter()
            .zip(0..MAX_RULES_PER_SERVICE)
            .map(|(r, i)| {
                (
                    rule_key(id, r.family, r.addr, r.len),
                    SourceRule {
                        action: if r.allow { RULE_ALLOW } else { RULE_DENY },
                        index: id * MAX_RULES_PER_SERVICE + i,
                    },
                )
            })
            .collect()
    }
}

impl ServiceSpec {
    /// The key of the service's `VIPS` entry.
    #[must_use]
    pub fn key(&self) -> VipKey {
        VipKey::new(self.vip, self.port, self.proto)
    }
}

/// What the datapath should do with one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: IpAddr,
    /// The port packets go to (`nat`, host order); 0: the packet's own. With the address,
    /// the backend's identity: another port is another backend.
    pub port: u16,
    /// Share of new flows (ring weight); 0 means no new flows.
    pub ring_weight: u32,
    /// Whether flows already tracked to it keep going there.
    pub up: bool,
    /// Active connections at which it takes no new flow; 0: no limit.
    pub max_connections: u32,
    /// A backup standing by while primaries serve (ring weight 0): it takes the new flows
    /// that full primaries turn away.
    pub standby: bool,
}

/// A backend as the agent tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub address: IpAddr,
    /// `BackendSpec::port`.
    pub port: u16,
    /// Its weight in the ring (0 while draining, disabled or down).
    pub weight: u32,
    pub generation: u32,
    /// Whether the datapath honours flows tracked to it.
    pub up: bool,
}

/// What `Balancer::adopt` found in pinned maps: the datapath state a previous agent left.
#[derive(Debug, Default, Clone)]
pub struct Adopted {
    pub vips: Vec<(VipKey, VipInfo)>,
    /// The VIP address pre-check set.
    pub vip_addrs: Vec<VipKey>,
    /// `FRAG_SERVICES`: (address, protocol) -> service id.
    pub frag_services: Vec<(VipKey, u32)>,
    /// `SOURCE_RULES`, every service's.
    pub source_rules: Vec<(RuleKey, SourceRule)>,
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
            port_be: self.port.to_be(),
            weight: self.weight,
        }
    }
}

/// A service as the agent tracks it.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub id: u32,
    pub spec: ServiceSpec,
    pub key: VipKey,
    pub backends: Vec<BackendState>,
    /// The ring as last written to the datapath.
    pub ring: Vec<u32>,
    /// What that ring was computed from (none for a ring adopted from pinned maps).
    pub input: Option<RingInput>,
}

impl ServiceState {
    /// A fingerprint of what decides where this service's new and untracked flows go: the
    /// service's listener and scheduling, its backends (address, port, ring weight, up) and
    /// every ring slot, by backend address rather than by id (ids depend on each agent's
    /// history). Balancers behind one ECMP group must agree on it, or a flow that moves
    /// between them may land on another backend. FNV-1a, 64 bits, as 16 hex digits.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        let spec = &self.spec;
        feed(spec.name.as_bytes());
        feed(&[0]);
        let (vip, family) = addr_bytes(spec.vip);
        feed(&vip);
        feed(&[family, spec.proto, spec.scheduler, spec.forwarding]);
        feed(&spec.port.to_be_bytes());
        feed(&spec.ring_size.to_be_bytes());
        let mut backends: Vec<&BackendState> = self.backends.iter().collect();
        backends.sort_by_key(|b| (b.address, b.port));
        let mut index = BTreeMap::new();
        for (i, b) in backends.iter().enumerate() {
            index.insert(b.id, u32::try_from(i).unwrap_or(u32::MAX));
            let (addr, family) = addr_bytes(b.address);
            feed(&addr);
            feed(&[family, u8::from(b.up)]);
            feed(&b.port.to_be_bytes());
            feed(&b.weight.to_be_bytes());
        }
        feed(
            &u32::try_from(self.ring.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for id in &self.ring {
            feed(&index.get(id).copied().unwrap_or(u32::MAX).to_be_bytes());
        }
        format!("{hash:016x}")
    }
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
    #[error(
        "service {service}: its ring would have {len} slots, more than the {max} it owns in the datapath"
    )]
    RingTooLarge {
        service: String,
        len: usize,
        max: u32,
    },
}

/// The agent's view of the datapath and the only writer of its maps.
pub struct Balancer<M> {
    maps: M,
    services: BTreeMap<String, ServiceState>,
    /// Generation last given out per backend id; bumped on every reuse.
    generations: Vec<u32>,
    free_backend_ids: Vec<u32>,
    free_service_ids: Vec<u32>,
    /// The VIP address pre-check set as written.
    vip_addrs: BTreeSet<VipKey>,
    rings: RingCache,
    /// `FRAG_SERVICES` as written: (address, protocol) -> service id.
    frag_services: BTreeMap<VipKey, u32>,
    /// `SOURCE_RULES` as written.
    source_rules: BTreeMap<RuleKey, SourceRule>,
    /// `RATE_LIMITS` as this balancer wrote it, by service id.
    rate_limits: BTreeMap<u32, RateLimits>,
    /// The VIP address filter as written; `None` until this balancer first wrote it (after
    /// adoption too: the first `apply` writes it whole, replacing whatever was pinned).
    vip_addr_bits: Option<Box<VipAddrBits>>,
    /// `CONN_LIMITS` as written, by backend id (after adoption empty: each service's next
    /// write writes its backends' limits whole).
    conn_limits: BTreeMap<u32, u32>,
    /// `SPILL_SETS` as written, by service id (likewise).
    spill_sets: BTreeMap<u32, SpillSet>,
}

/// The service that IPv4 fragments to each (address, protocol) belong to, by name: where
/// that address and protocol have exactly one service and it schedules by `ip-hash`. A
/// fragment has no ports (a later one has no transport header at all), so a second service
/// on the pair would leave it ambiguous; any scheduler but `ip-hash` needs the ports.
#[must_use]
pub fn fragment_owners(services: &[ServiceSpec]) -> BTreeMap<VipKey, String> {
    let mut by_pair: BTreeMap<VipKey, Vec<&ServiceSpec>> = BTreeMap::new();
    for s in services.iter().filter(|s| s.vip.is_ipv4()) {
        let (addr, family) = addr_bytes(s.vip);
        by_pair
            .entry(fragment_key(addr, family, s.proto))
            .or_default()
            .push(s);
    }
    by_pair
        .into_iter()
        .filter_map(|(key, list)| match list.as_slice() {
            [one] if one.scheduler == SCHED_IP_HASH => Some((key, one.name.clone())),
            _ => None,
        })
        .collect()
}

/// `BackendInfo::service_id` of a backend entry no service owns any more.
pub const RETIRED: u32 = u32::MAX;

/// A stand-in for a VIP found in pinned maps that no configured service claims; it exists
/// only so that the next `apply` removes the VIP.
fn orphan_spec(key: VipKey, info: &VipInfo) -> ServiceSpec {
    ServiceSpec {
        name: format!("(orphan {})", info.service_id),
        vip: lb_common::addr_from_bytes(key.addr, key.family),
        port: u16::from_be(key.port_be),
        proto: key.proto,
        scheduler: info.scheduler,
        forwarding: info.forwarding,
        ring_size: info.ring_size,
        tcp_idle_timeout_s: info.tcp_idle_timeout_s,
        udp_idle_timeout_s: info.udp_idle_timeout_s,
        backends: Vec::new(),
        snat: Vec::new(),
        source_rules: Vec::new(),
        rate_limits: RateLimits::default(),
    }
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
            vip_addrs: BTreeSet::new(),
            frag_services: BTreeMap::new(),
            source_rules: BTreeMap::new(),
            rate_limits: BTreeMap::new(),
            rings: RingCache::default(),
            vip_addr_bits: None,
            conn_limits: BTreeMap::new(),
            spill_sets: BTreeMap::new(),
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Ring inputs worth computing ahead (off the owner task): for each service with a few
    /// serving backends, its ring after any one of them fails, unless already cached.
    #[must_use]
    pub fn rings_to_precompute(&self) -> Vec<RingInput> {
        self.services
            .values()
            .filter_map(|s| s.input.as_ref())
            .filter(|input| {
                input.members.iter().filter(|m| m.1 > 0).count() <= rings::PRECOMPUTE_MAX_BACKENDS
            })
            .flat_map(RingInput::one_down)
            .filter(|input| !self.rings.contains(input))
            .take(rings::PRECOMPUTE_MAX_RINGS)
            .collect()
    }

    /// Adds rings computed ahead.
    pub fn add_rings(&mut self, rings: Vec<(RingInput, std::sync::Arc<Vec<u32>>)>) {
        for (input, ring) in rings {
            self.rings.insert(input, ring);
        }
    }

    /// (hits, misses) of the ring cache.
    #[must_use]
    pub fn ring_cache_stats(&self) -> (u64, u64) {
        (self.rings.hits, self.rings.misses)
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
        services: &[ServiceSpec],
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
            // Values from the kernel are checked like any input: an id or size out of range
            // would index past the service's own slots.
            if info.service_id >= MAX_SERVICES || info.ring_size > MAX_RING_SIZE {
                tracing::warn!(
                    service_id = info.service_id,
                    ring_size = info.ring_size,
                    "ignoring a pinned VIP entry out of range"
                );
                continue;
            }
            let mut spec = services
                .iter()
                .find(|s| s.key() == *key)
                .cloned()
                .unwrap_or_else(|| orphan_spec(*key, info));
            // What the adopted maps hold is not this spec: without its backends it never
            // equals a desired one, so the first apply compares backend by backend.
            spec.backends.clear();
            let name = spec.name.clone();
            let ring = read_ring(info.service_id, info.ring_size)?;
            // One member per address: the entry the ring points at, else the newest (pins
            // written before retired entries were marked may hold an address twice).
            let mut backends: Vec<BackendState> = Vec::new();
            for (id, b) in adopted
                .backends
                .iter()
                .filter(|(_, b)| b.service_id == info.service_id && b.generation > 0)
            {
                let candidate = BackendState {
                    id: *id,
                    address: lb_common::addr_from_bytes(b.addr, b.family),
                    port: u16::from_be(b.port_be),
                    weight: 0,
                    generation: b.generation,
                    up: b.state == BACKEND_UP,
                };
                match backends.iter_mut().find(|x| x.address == candidate.address) {
                    None => backends.push(candidate),
                    Some(existing) => {
                        let in_ring = |id: u32| ring.contains(&id);
                        if !in_ring(existing.id)
                            && (in_ring(candidate.id) || candidate.generation > existing.generation)
                        {
                            *existing = candidate;
                        }
                    }
                }
            }
            for b in &backends {
                known.push((name.clone(), b.address, b.up));
                used_backends.push(b.id);
            }
            used_services.push(info.service_id);
            self.services.insert(
                name,
                ServiceState {
                    id: info.service_id,
                    spec,
                    key: *key,
                    backends,
                    ring,
                    input: None,
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
        // Everything found counts as written: the next `apply` removes what no service
        // claims (an address a reload moved away from, before a restart).
        self.vip_addrs = adopted.vip_addrs.iter().copied().collect();
        self.frag_services = adopted.frag_services.iter().copied().collect();
        self.source_rules = adopted.source_rules.iter().copied().collect();
        Ok(known)
    }

    /// Brings the datapath to `desired`, writing only what differs from the current state.
    /// Order matters for packets in flight: backends are written before the ring slots that
    /// point at them, rings before the VIP that makes them reachable (its `SERVICES` entry
    /// just before); on removal the `SERVICES` entry and the VIP go first, and an address
    /// leaves the VIP address filter and set after its last service.
    pub fn apply(&mut self, desired: &DatapathSpec) -> Result<ApplyReport, ApplyError> {
        let mut report = ApplyReport::default();
        self.maps.set_global(desired.global)?;

        // Fragments stop going to a service before anything of it changes: an entry stays
        // only if the same service (name and id) is still its address's only one.
        let owners = fragment_owners(&desired.services);
        let stale: Vec<VipKey> = self
            .frag_services
            .iter()
            .filter(|(key, id)| {
                owners
                    .get(key)
                    .and_then(|name| self.services.get(name))
                    .is_none_or(|state| state.id != **id)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.maps.remove_frag_service(key)?;
            self.frag_services.remove(&key);
        }

        // Services that are gone.
        let wanted: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
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

        for service in &desired.services {
            self.apply_service(service, &mut report)?;
        }

        // VIP addresses: one entry per distinct address, kept while any service uses it, and
        // the filter recomputed from them, so a bit stays set exactly while some address
        // has it. New addresses join the exact set before the filter lets their packets
        // through; gone ones leave it after.
        let addrs: BTreeSet<VipKey> = self
            .services
            .values()
            .map(|s| VipKey::addr_only(s.spec.vip))
            .collect();
        for addr in addrs.difference(&self.vip_addrs) {
            self.maps.set_vip_addr(*addr)?;
        }
        let mut bits = Box::new(VipAddrBits::EMPTY);
        for addr in &addrs {
            bits.insert(&addr.addr);
        }
        // NAT services: their VIPs ask the NAT table first, and their backends' packets may
        // be replies (every backend the service still has, down ones too: the datapath must
        // recognise a reply of a pair it no longer honours, to drop it rather than let it
        // reach the client untranslated).
        for s in self
            .services
            .values()
            .filter(|s| s.spec.forwarding == FORWARD_NAT)
        {
            bits.insert_nat_dst(&VipKey::addr_only(s.spec.vip).addr);
            for b in &s.backends {
                bits.insert_nat_src(&addr_bytes(b.address).0);
            }
        }
        // fullnat: the replies are addressed to the SNAT addresses, so those are NAT
        // destinations (not VIP addresses: `VIP_ADDRS` leaves them out, and whatever else
        // reaches them, the host's own traffic included, passes). The backends send
        // nothing to a client directly: no source bits.
        for s in self
            .services
            .values()
            .filter(|s| s.spec.forwarding == FORWARD_FULLNAT)
        {
            bits.insert_nat_dst(&VipKey::addr_only(s.spec.vip).addr);
            for source in &s.spec.snat {
                bits.insert_nat_dst(&source.addr);
                let hi = source
                    .first_port_host
                    .saturating_add(source.port_count.saturating_sub(1));
                bits.snat_port_lo_host = source.first_port_host;
                bits.snat_port_hi_host = hi;
            }
        }
        if self.vip_addr_bits.as_ref() != Some(&bits) {
            self.maps.set_vip_addr_bits(&bits)?;
            self.vip_addr_bits = Some(bits);
        }
        for addr in self.vip_addrs.difference(&addrs) {
            self.maps.remove_vip_addr(*addr)?;
        }
        self.vip_addrs = addrs;

        // Fragments go to a service once it is complete (ring, `SERVICES`, `VIPS`).
        for (key, name) in &owners {
            let Some(id) = self.services.get(name).map(|s| s.id) else {
                continue;
            };
            if self.frag_services.get(key) != Some(&id) {
                self.maps.set_frag_service(*key, id)?;
                self.frag_services.insert(*key, id);
            }
        }

        // Source rules no service has any more: after the services' entries, which no
        // longer name them (their flags were rewritten, or the service is gone).
        let wanted: BTreeSet<RuleKey> = self
            .services
            .values()
            .flat_map(|s| s.spec.rule_entries(s.id))
            .map(|(key, _)| key)
            .collect();
        let stale: Vec<RuleKey> = self
            .source_rules
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        for key in stale {
            self.maps.remove_source_rule(key)?;
            self.source_rules.remove(&key);
        }
        Ok(report)
    }

    /// Writes the `CONN_LIMITS` of a service's backends (`backends[i]` is `desired[i]`) and
    /// its `SPILL_SETS` slot, where they differ from what was written: the spill set lists
    /// the backends that take new flows, then the standby backups, in config order.
    fn write_limits(
        &mut self,
        service_id: u32,
        backends: &[BackendState],
        desired: &[BackendSpec],
    ) -> Result<(), ApplyError> {
        for (backend, wanted) in backends.iter().zip(desired) {
            if self.conn_limits.get(&backend.id) != Some(&wanted.max_connections) {
                self.maps
                    .set_conn_limit(backend.id, wanted.max_connections)?;
                self.conn_limits.insert(backend.id, wanted.max_connections);
            }
        }
        let pairs = || backends.iter().zip(desired);
        let primaries: Vec<u32> = pairs()
            .filter(|(b, _)| b.weight > 0)
            .map(|(b, _)| b.id)
            .collect();
        let backups: Vec<u32> = pairs()
            .filter(|(b, w)| w.standby && w.up && b.weight == 0)
            .map(|(b, _)| b.id)
            .collect();
        let set = SpillSet::new(&primaries, &backups);
        if self.spill_sets.get(&service_id) != Some(&set) {
            self.maps.set_spill_set(service_id, &set)?;
            self.spill_sets.insert(service_id, set);
        }
        Ok(())
    }

    fn remove_service(
        &mut self,
        state: ServiceState,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        // Tracked flows stop finding the service before its VIP goes.
        self.maps.clear_service(state.id)?;
        self.maps.remove_vip(state.key)?;
        report.vips_written += 1;
        for backend in &state.backends {
            self.retire_backend(backend, report)?;
        }
        self.free_service_ids.push(state.id);
        tracing::info!(service = %state.spec.name, "service removed");
        Ok(())
    }

    fn retire_backend(
        &mut self,
        backend: &BackendState,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        // Marked as no service's: the datapath honours no flow to it, and an agent adopting
        // the pins does not take it for a member.
        self.maps
            .set_backend(backend.id, backend.info(RETIRED, BACKEND_DOWN))?;
        report.backends_written += 1;
        self.free_backend_ids.push(backend.id);
        Ok(())
    }

    fn apply_service(
        &mut self,
        service: &ServiceSpec,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        let key = service.key();
        // Nothing changed for this service (the common case when a health verdict, a weight
        // or a slow-start step touches another one): no ring to build, nothing to write.
        if self
            .services
            .get(&service.name)
            .is_some_and(|state| state.key == key && state.spec == *service)
        {
            return Ok(());
        }
        // A failed write must not lose what the agent knows: the service's state and the ids
        // go back as they were, with the ring marked unknown (the kernel may hold part of
        // the new one), so the next apply, a rollback, rewrites it whole. Generations are
        // not restored: they only ever grow, which is always safe.
        let saved = self.services.get(&service.name).cloned();
        let free = (self.free_backend_ids.clone(), self.free_service_ids.clone());
        let result = self.write_service(service, report);
        if result.is_err() {
            self.free_backend_ids = free.0;
            self.free_service_ids = free.1;
            if let Some(mut state) = saved {
                state.ring.clear();
                state.input = None;
                state.spec.backends.clear();
                self.services.insert(service.name.clone(), state);
            } else {
                self.services.remove(&service.name);
            }
        }
        result
    }

    fn write_service(
        &mut self,
        service: &ServiceSpec,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        let desired = &service.backends;
        let key = service.key();
        let existing = self.services.remove(&service.name);
        // A changed VIP key is a new service as far as the datapath is concerned.
        // So is a change between the DSR and the NAT modes: their flows live in different
        // tables, and new backend generations make sure neither kind is honoured under the
        // other's rules.
        // Between `nat` and `fullnat`, or to other SNAT addresses, likewise: a pair made
        // under the old translation must not be honoured under the new one.
        let mut state = match existing {
            Some(state)
                if state.key == key
                    && forwarding_is_nat(state.spec.forwarding)
                        == forwarding_is_nat(service.forwarding)
                    && (!forwarding_is_nat(service.forwarding)
                        || (state.spec.forwarding == service.forwarding
                            && state.spec.snat == service.snat)) =>
            {
                state
            }
            other => {
                let id = match other {
                    Some(old) => {
                        let id = old.id;
                        self.maps.clear_service(id)?;
                        self.maps.remove_vip(old.key)?;
                        for backend in &old.backends {
                            self.retire_backend(backend, report)?;
                        }
                        id
                    }
                    None => {
                        let id = self
                            .free_service_ids
                            .pop()
                            .ok_or(ApplyError::Exhausted("service"))?;
                        // A new service does not inherit an earlier one's totals.
                        self.maps.reset_traffic(false, id)?;
                        id
                    }
                };
                ServiceState {
                    id,
                    spec: service.clone(),
                    key,
                    backends: Vec::new(),
                    // The kernel's slots are unknown (a fresh or reused ring): an empty ring
                    // makes `diff` write every slot of the new one.
                    ring: Vec::new(),
                    input: None,
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
            let backend = match old_backends
                .iter()
                .find(|b| b.address == wanted.address && b.port == wanted.port)
            {
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
                        port: wanted.port,
                        weight: wanted.ring_weight,
                        generation,
                        up: wanted.up,
                    };
                    // The id's previous owner may have left a connection count and traffic
                    // totals behind.
                    self.maps.set_active_connections(id, 0)?;
                    self.maps.reset_traffic(true, id)?;
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
        let input = RingInput {
            service: service.name.clone(),
            scheduler: service.scheduler,
            ring_size: service.ring_size,
            members: backends
                .iter()
                .map(|b| (b.id, b.weight, b.address))
                .collect(),
        };
        let ring = self.rings.get_or_build(&input);
        // The service owns MAX_RING_SIZE slots of RING and no more: a longer ring would
        // overwrite the next service's. Checked before anything of this service is written
        // further (the maps check each slot too).
        if ring.len() > MAX_RING_SIZE as usize {
            return Err(ApplyError::RingTooLarge {
                service: service.name.clone(),
                len: ring.len(),
                max: MAX_RING_SIZE,
            });
        }
        let changed = maglev::diff(&state.ring, &ring);
        self.maps.set_ring_slots(state.id, &changed)?;
        report.ring_slots_written += changed.len();
        state.ring = ring.as_ref().clone();
        state.input = Some(input);
        // The VIP (with the ring's length) right after the ring and before any backend is
        // marked down or retired: a ring that got shorter stops being read past its end
        // before the backends its old tail points at go.
        let info = VipInfo {
            service_id: state.id,
            ring_size: state.ring.len() as u32,
            forwarding: service.forwarding,
            scheduler: service.scheduler,
            // At most `MAX_SNAT_ADDRS` (validation).
            snat_count: service.snat.len() as u8,
            source_rules: service.source_rule_flags(),
            tcp_idle_timeout_s: service.tcp_idle_timeout_s,
            udp_idle_timeout_s: service.udp_idle_timeout_s,
            rate_limits: service.rate_limit_flags(),
            conn_limits: if desired.iter().any(|b| b.max_connections > 0) {
                CONN_LIMITS_ANY
            } else {
                0
            },
            _pad: [0; 2],
        };
        // `SERVICES` mirrors `VIPS` by id (tracked flows find their service there): written
        // before the VIP entry, voided before it goes, so it never names a service that
        // `VIPS` does not hold.
        // The pool before the entries that name its size: a new connection never reads a
        // slot not yet written.
        if !service.snat.is_empty() {
            self.maps.set_snat_pool(state.id, &service.snat)?;
        }
        // The rules likewise, before the flags that make the datapath look them up (those
        // no longer wanted go at the end of `apply`). Keys carry the service id and counter
        // indexes stay within the service's slots, so nothing here touches another service.
        for (key, rule) in service.rule_entries(state.id) {
            if self.source_rules.get(&key) != Some(&rule) {
                self.maps.set_source_rule(key, rule)?;
                self.source_rules.insert(key, rule);
            }
        }
        // The limits likewise, into the service's own slot. A service that drops its limits
        // keeps the old values there, unread once its flags are 0.
        if info.rate_limits != 0 && self.rate_limits.get(&state.id) != Some(&service.rate_limits) {
            self.maps.set_rate_limits(state.id, service.rate_limits)?;
            self.rate_limits.insert(state.id, service.rate_limits);
        }
        // The limits and the spill set likewise, before the flag that makes the datapath
        // read them: backends joined above, and the set names no backend that goes below.
        self.write_limits(state.id, &backends, desired)?;
        self.maps.set_service(state.id, info)?;
        self.maps.set_vip(key, info)?;
        report.vips_written += 1;

        for backend in &going_down {
            self.maps
                .set_backend(backend.id, backend.info(state.id, BACKEND_DOWN))?;
            report.backends_written += 1;
        }
        // Backends that left the service: after the ring no longer points at them.
        for old in &old_backends {
            if !backends.iter().any(|b| b.id == old.id) {
                self.retire_backend(old, report)?;
            }
        }
        state.backends = backends;

        state.spec = service.clone();
        tracing::debug!(
            service = %service.name,
            vip = %service.vip,
            port = service.port,
            protocol = service.proto,
            backends = state.backends.len(),
            "service configured"
        );
        self.services.insert(service.name.clone(), state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::recorder::Recorder;
    use lb_common::{FORWARD_TUNNEL, PROTO_TCP, SCHED_MAGLEV, SCHED_ROUND_ROBIN};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn service(name: &str, vip: &str, scheduler: u8, backends: &[(&str, u32)]) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            vip: ip(vip),
            port: 80,
            proto: PROTO_TCP,
            scheduler,
            forwarding: FORWARD_TUNNEL,
            ring_size: 1009,
            tcp_idle_timeout_s: 900,
            udp_idle_timeout_s: 300,
            snat: Vec::new(),
            source_rules: Vec::new(),
            rate_limits: RateLimits::default(),
            backends: backends
                .iter()
                .map(|(address, weight)| BackendSpec {
                    address: ip(address),
                    port: 0,
                    ring_weight: *weight,
                    up: true,
                    max_connections: 0,
                    standby: false,
                })
                .collect(),
        }
    }

    /// A second balancer adopting what `maps` holds, as a restarted agent adopts pins.
    fn readopt(
        maps: Recorder,
        services: &[ServiceSpec],
    ) -> (Balancer<Recorder>, Vec<(String, IpAddr, bool)>) {
        let adopted = Adopted {
            vips: maps.vips.iter().map(|(k, v)| (*k, *v)).collect(),
            vip_addrs: maps.vip_addrs.iter().copied().collect(),
            frag_services: maps.frag_services.iter().map(|(k, v)| (*k, *v)).collect(),
            source_rules: maps.source_rules.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: maps.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        };
        let rings = maps.clone();
        let mut balancer = Balancer::new(maps);
        let known = balancer
            .adopt(&adopted, services, |id, size| {
                Ok((0..size)
                    .map(|slot| rings.ring.get(&(id, slot)).copied().unwrap_or(0))
                    .collect())
            })
            .unwrap();
        (balancer, known)
    }

    fn spec(backends: &[(&str, u32)]) -> DatapathSpec {
        DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![service("web", "203.0.113.10", SCHED_MAGLEV, backends)],
        }
    }

    #[test]
    fn rate_limits_reach_their_service_slot_and_flags() {
        use lb_common::rate::{Gcra, prefix_mask};
        let limits = RateLimits {
            source_flows: Gcra::new(1000, 100),
            vip_flows: Gcra::default(),
            source_mask: prefix_mask(24),
        };
        let with = |limits: RateLimits| {
            let mut spec = spec(&[("198.51.100.11", 1)]);
            spec.services[0].rate_limits = limits;
            spec
        };
        let mut b = Balancer::new(Recorder::default());
        b.apply(&with(limits)).unwrap();
        let id = b.service("web").unwrap().id;
        let vip = |b: &Balancer<Recorder>| b.maps().vips.values().next().copied().unwrap();
        assert_eq!(b.maps().rate_limits.get(&id), Some(&limits));
        assert_eq!(vip(&b).rate_limits, RATE_SOURCE_FLOWS);
        // A reload that adds the VIP's limit rewrites the slot and the flags.
        let both = RateLimits {
            vip_flows: Gcra::new(50_000, 5000),
            ..limits
        };
        b.apply(&with(both)).unwrap();
        assert_eq!(b.maps().rate_limits.get(&id), Some(&both));
        assert_eq!(vip(&b).rate_limits, RATE_SOURCE_FLOWS | RATE_VIP_FLOWS);
        // Without limits the flags go to 0 (the slot is left, unread).
        b.apply(&with(RateLimits::default())).unwrap();
        assert_eq!(vip(&b).rate_limits, 0);
        assert_eq!(b.maps().rate_limits.len(), 1);
    }

    #[test]
    fn fingerprints_agree_across_id_histories_and_differ_with_weights() {
        let three = [
            ("198.51.100.11", 1),
            ("198.51.100.12", 1),
            ("198.51.100.13", 1),
        ];
        let mut a = Balancer::new(Recorder::default());
        a.apply(&spec(&three)).unwrap();
        // Another balancer whose ids came out otherwise: it saw .13 alone first.
        let mut b = Balancer::new(Recorder::default());
        b.apply(&spec(&[("198.51.100.13", 1)])).unwrap();
        b.apply(&spec(&three)).unwrap();
        let ids = |x: &Balancer<Recorder>| -> Vec<u32> {
            x.service("web")
                .unwrap()
                .backends
                .iter()
                .map(|b| b.id)
                .collect()
        };
        assert_ne!(ids(&a), ids(&b), "the test needs different ids");
        let print = |x: &Balancer<Recorder>| x.service("web").unwrap().fingerprint();
        assert_eq!(print(&a), print(&b));
        assert_eq!(print(&a).len(), 16);
        b.apply(&spec(&[
            ("198.51.100.11", 1),
            ("198.51.100.12", 2),
            ("198.51.100.13", 1),
        ]))
        .unwrap();
        assert_ne!(print(&a), print(&b));
        // A backend down (weight 0 in the ring) differs too.
        b.apply(&spec(&[
            ("198.51.100.11", 1),
            ("198.51.100.12", 0),
            ("198.51.100.13", 1),
        ]))
        .unwrap();
        assert_ne!(print(&a), print(&b));
    }

    #[test]
    fn first_apply_writes_every_slot_and_the_vip() {
        let mut b = Balancer::new(Recorder::default());
        let report = b
            .apply(&spec(&[("198.51.100.11", 1), ("198.51.100.12", 1)]))
            .unwrap();
        assert_eq!(report.ring_slots_written, 1009);
        assert_eq!(report.backends_written, 2);
        let m = b.maps();
        assert_eq!(m.vips.len(), 1);
        assert_eq!(m.vip_addrs.len(), 1);
        let ids: BTreeSet<u32> = m.ring.values().copied().collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|id| m.backends[id].state == BACKEND_UP));
    }

    #[test]
    fn removing_a_backend_writes_only_its_slots_and_marks_it_down() {
        let mut b = Balancer::new(Recorder::default());
        b.apply(&spec(&[
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
            .apply(&spec(&[("198.51.100.11", 1), ("198.51.100.12", 1)]))
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
    fn reapplying_the_same_spec_writes_no_slot() {
        let mut b = Balancer::new(Recorder::default());
        let c = spec(&[("198.51.100.11", 1), ("198.51.100.12", 3)]);
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
        b.apply(&spec(&[("198.51.100.11", 1), ("198.51.100.12", 1)]))
            .unwrap();
        let old = b.service("web").unwrap().backends[1].clone();
        b.apply(&spec(&[("198.51.100.11", 1)])).unwrap();
        b.apply(&spec(&[("198.51.100.11", 1), ("198.51.100.13", 1)]))
            .unwrap();
        let new = b.service("web").unwrap().backends[1].clone();
        assert_eq!(new.id, old.id, "the freed id is reused");
        assert_ne!(new.generation, old.generation);
        assert_eq!(b.maps().backends[&new.id].generation, new.generation);
    }

    /// The reported overflow: a round-robin service with weights 65535, 65535 and 100 × 1
    /// wrote a 65,586-entry sequence past its 65,537 slots into the next service's ring.
    #[test]
    fn a_round_robin_sequence_stays_inside_its_own_ring() {
        let mut heavy: Vec<(String, u32)> = vec![
            ("198.51.100.11".to_owned(), 65_535),
            ("198.51.100.12".to_owned(), 65_535),
        ];
        heavy.extend((0..100).map(|i| (format!("2001:db8:1::{:x}", i + 1), 1)));
        let heavy: Vec<(&str, u32)> = heavy.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let first = service("rr", "203.0.113.10", SCHED_ROUND_ROBIN, &heavy);
        let second = service(
            "next",
            "203.0.113.20",
            SCHED_MAGLEV,
            &[("198.51.100.21", 1), ("198.51.100.22", 1)],
        );
        let mut b = Balancer::new(Recorder::default());
        b.apply(&DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![first, second],
        })
        .unwrap();
        let rr_id = b.service("rr").unwrap().id;
        let next = b.service("next").unwrap();
        let next_ids: BTreeSet<u32> = next.backends.iter().map(|b| b.id).collect();
        let m = b.maps();
        // Every slot of the second service still points at its own backends.
        let slots = m.ring_of(next.id);
        assert_eq!(slots.len(), 1009);
        assert!(slots.iter().all(|(_, id)| next_ids.contains(id)));
        // And the first wrote nothing beyond its own slots.
        let rr_slots = m.ring_of(rr_id);
        assert!(
            rr_slots.len() <= MAX_RING_SIZE as usize,
            "{}",
            rr_slots.len()
        );
        assert!(
            m.ring.keys().all(|(service, slot)| *slot < MAX_RING_SIZE
                && (*service == rr_id || *service == next.id))
        );
        assert_eq!(
            m.vips[&b.service("rr").unwrap().key].ring_size as usize,
            rr_slots.len()
        );
    }

    #[test]
    fn a_slot_outside_the_ring_is_refused_by_the_map_layer() {
        let mut m = Recorder::default();
        assert!(matches!(
            m.set_ring_slot(0, MAX_RING_SIZE, 1),
            Err(DatapathError::SlotOutOfRange { .. })
        ));
        assert!(m.ring.is_empty());
    }

    /// Reported: a reload that changes a service's VIP left the old address in VIP_ADDRS.
    #[test]
    fn a_changed_vip_takes_its_old_address_out_of_the_pre_check_set() {
        let mut b = Balancer::new(Recorder::default());
        b.apply(&spec(&[("198.51.100.11", 1)])).unwrap();
        let mut moved = spec(&[("198.51.100.11", 1)]);
        moved.services[0].vip = ip("203.0.113.99");
        b.apply(&moved).unwrap();
        let addrs: Vec<VipKey> = b.maps().vip_addrs.iter().copied().collect();
        assert_eq!(addrs, [VipKey::addr_only(ip("203.0.113.99"))]);
        assert_eq!(b.maps().vips.len(), 1);
    }

    /// `SERVICES` holds each service's VIP value under its id, and nothing for a service
    /// that is gone or moved to another VIP key.
    #[test]
    fn services_mirror_the_vips_by_id() {
        let mut b = Balancer::new(Recorder::default());
        let mut two = spec(&[("198.51.100.11", 1)]);
        two.services.push(service(
            "other",
            "203.0.113.20",
            SCHED_MAGLEV,
            &[("198.51.100.12", 1)],
        ));
        b.apply(&two).unwrap();
        let mirror = |b: &Balancer<Recorder>| {
            let by_key: BTreeMap<u32, VipInfo> =
                b.maps().vips.values().map(|v| (v.service_id, *v)).collect();
            assert_eq!(b.maps().services, by_key);
        };
        mirror(&b);
        assert_eq!(b.maps().services.len(), 2);
        let other_id = b.service("other").unwrap().id;
        // A changed VIP key keeps the id; the entry follows the new key's value.
        let mut moved = two.clone();
        moved.services[1].port = 8080;
        b.apply(&moved).unwrap();
        mirror(&b);
        assert_eq!(b.service("other").unwrap().id, other_id);
        b.apply(&spec(&[("198.51.100.11", 1)])).unwrap();
        mirror(&b);
        assert!(!b.maps().services.contains_key(&other_id));
    }

    /// The filter holds exactly the bits of the current addresses, and is written only when
    /// it changes.
    #[test]
    fn the_address_filter_follows_the_vip_addresses() {
        let mut b = Balancer::new(Recorder::default());
        let one = spec(&[("198.51.100.11", 1)]);
        let mut two = one.clone();
        let mut other = service(
            "dns",
            "2001:db8:100::53",
            SCHED_MAGLEV,
            &[("2001:db8::11", 1)],
        );
        other.port = 53;
        two.services.push(other);
        let bits_of = |addrs: &[&str]| {
            let mut bits = VipAddrBits::EMPTY;
            for a in addrs {
                bits.insert(&VipKey::addr_only(ip(a)).addr);
            }
            bits
        };
        b.apply(&one).unwrap();
        assert_eq!(b.maps().vip_addr_bits, bits_of(&["203.0.113.10"]));
        assert_eq!(b.maps().vip_addr_bits_writes, 1);
        b.apply(&one).unwrap();
        assert_eq!(b.maps().vip_addr_bits_writes, 1, "unchanged: not rewritten");
        b.apply(&two).unwrap();
        assert_eq!(
            b.maps().vip_addr_bits,
            bits_of(&["203.0.113.10", "2001:db8:100::53"])
        );
        // A second service on an address already present changes nothing.
        let mut three = two.clone();
        let mut udp = service(
            "web-udp",
            "203.0.113.10",
            SCHED_MAGLEV,
            &[("198.51.100.11", 1)],
        );
        udp.proto = lb_common::PROTO_UDP;
        three.services.push(udp);
        b.apply(&three).unwrap();
        assert_eq!(b.maps().vip_addr_bits_writes, 2);
        // Removing one of the two services of an address keeps its bit; removing the
        // address's last service clears it.
        b.apply(&two).unwrap();
        assert!(
            b.maps()
                .vip_addr_bits
                .maybe_contains(&VipKey::addr_only(ip("203.0.113.10")).addr)
        );
        b.apply(&one).unwrap();
        assert_eq!(b.maps().vip_addr_bits, bits_of(&["203.0.113.10"]));
        b.apply(&DatapathSpec::default()).unwrap();
        assert_eq!(b.maps().vip_addr_bits, VipAddrBits::EMPTY);
    }

    /// Two addresses of one slot: the bit stays while either remains.
    #[test]
    fn a_shared_filter_bit_stays_while_one_of_its_addresses_does() {
        let first = ip("2001:db8:100::10");
        let slot = lb_common::hash::addr_slot(&VipKey::addr_only(first).addr);
        let second = (1..u32::MAX)
            .map(|i| {
                let mut octets = [0u8; 16];
                octets[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                octets[12..].copy_from_slice(&i.to_be_bytes());
                IpAddr::from(octets)
            })
            .find(|a| lb_common::hash::addr_slot(&VipKey::addr_only(*a).addr) == slot)
            .unwrap();
        let both = DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![
                service(
                    "a",
                    &first.to_string(),
                    SCHED_MAGLEV,
                    &[("2001:db8::11", 1)],
                ),
                service(
                    "b",
                    &second.to_string(),
                    SCHED_MAGLEV,
                    &[("2001:db8::12", 1)],
                ),
            ],
        };
        let mut b = Balancer::new(Recorder::default());
        b.apply(&both).unwrap();
        let mut only_second = both.clone();
        only_second.services.remove(0);
        b.apply(&only_second).unwrap();
        let bits = &b.maps().vip_addr_bits;
        assert!(
            bits.maybe_contains(&VipKey::addr_only(first).addr),
            "shared bit kept"
        );
        assert!(!b.maps().vip_addrs.contains(&VipKey::addr_only(first)));
        b.apply(&DatapathSpec::default()).unwrap();
        assert_eq!(b.maps().vip_addr_bits, VipAddrBits::EMPTY);
    }

    /// ... and a stale address found in the pins at adoption goes at the first apply.
    /// Limits reach `CONN_LIMITS` and the VIP's flag; the spill set lists the serving
    /// backends, then the standby backups that are up; a change rewrites only what changed,
    /// and a restarted agent rewrites them whole (it cannot know what the pins hold).
    #[test]
    fn limits_and_the_spill_set_follow_the_spec() {
        let limited = |max_b1: u32| {
            let mut d = spec(&[
                ("198.51.100.11", 1),
                ("198.51.100.12", 2),
                ("198.51.100.13", 0),
                ("198.51.100.14", 0),
            ]);
            let b = &mut d.services[0].backends;
            b[0].max_connections = max_b1;
            b[1].max_connections = 3;
            b[2].standby = true;
            b[2].max_connections = 3;
            // A standby backup that is down stands by for nothing.
            b[3].standby = true;
            b[3].up = false;
            d
        };
        let mut b = Balancer::new(Recorder::default());
        b.apply(&spec(&[("198.51.100.11", 1)])).unwrap();
        assert_eq!(b.maps().vips.values().next().unwrap().conn_limits, 0);
        b.apply(&limited(3)).unwrap();
        let ids: Vec<u32> = b
            .service("web")
            .unwrap()
            .backends
            .iter()
            .map(|x| x.id)
            .collect();
        let m = b.maps();
        let info = m.vips.values().next().unwrap();
        assert_eq!(info.conn_limits, CONN_LIMITS_ANY);
        assert_eq!(m.services[&info.service_id], *info);
        let maxes: Vec<u32> = ids.iter().map(|id| m.conn_limits[id]).collect();
        assert_eq!(maxes, [3, 3, 3, 0]);
        assert_eq!(
            m.spill_sets[&info.service_id],
            SpillSet::new(&ids[..2], &ids[2..3])
        );
        // One limit changes: one write.
        let before = b.maps().clone();
        b.apply(&limited(5)).unwrap();
        let changed: Vec<_> = b
            .maps()
            .conn_limits
            .iter()
            .filter(|(id, max)| before.conn_limits.get(id) != Some(max))
            .collect();
        assert_eq!(changed, [(&ids[0], &5)]);
        // Adopted: the next apply writes every limit and the set again.
        let mut maps = b.maps().clone();
        maps.conn_limits.clear();
        maps.spill_sets.clear();
        let desired = limited(5);
        let (mut second, _) = readopt(maps, &desired.services);
        second.apply(&desired).unwrap();
        assert_eq!(second.maps().conn_limits, b.maps().conn_limits);
        assert_eq!(second.maps().spill_sets, b.maps().spill_sets);
    }

    #[test]
    fn adoption_removes_a_stale_pre_check_address() {
        let mut first = Balancer::new(Recorder::default());
        first.apply(&spec(&[("198.51.100.11", 1)])).unwrap();
        let mut maps = first.maps().clone();
        let stale = VipKey::addr_only(ip("203.0.113.77"));
        maps.vip_addrs.insert(stale);
        maps.vip_addr_bits.insert(&stale.addr);
        let desired = spec(&[("198.51.100.11", 1)]);
        let (mut second, _) = readopt(maps, &desired.services);
        let report = second.apply(&desired).unwrap();
        assert_eq!(report.ring_slots_written, 0, "adoption keeps the ring");
        assert!(!second.maps().vip_addrs.contains(&stale));
        // The filter is rewritten whole at the first apply after adoption: a stale bit
        // left in the pins goes too.
        assert_eq!(
            second.maps().vip_addr_bits,
            first.maps().vip_addr_bits,
            "the filter holds the configured address only"
        );
        assert!(
            second
                .maps()
                .vip_addrs
                .contains(&VipKey::addr_only(ip("203.0.113.10")))
        );
    }

    /// A verdict whose ring was computed ahead builds nothing, and writes what a build
    /// would have written.
    #[test]
    fn a_precomputed_ring_serves_the_verdict() {
        let three = [
            ("198.51.100.11", 1),
            ("198.51.100.12", 1),
            ("198.51.100.13", 1),
        ];
        let mut b = Balancer::new(Recorder::default());
        b.apply(&spec(&three)).unwrap();
        let ahead: Vec<(RingInput, std::sync::Arc<Vec<u32>>)> = b
            .rings_to_precompute()
            .into_iter()
            .map(|input| {
                let ring = std::sync::Arc::new(input.build());
                (input, ring)
            })
            .collect();
        assert_eq!(ahead.len(), 3);
        b.add_rings(ahead);
        assert!(b.rings_to_precompute().is_empty());
        let (_, misses) = b.ring_cache_stats();
        let mut down = spec(&three);
        down.services[0].backends[1].ring_weight = 0;
        b.apply(&down).unwrap();
        assert_eq!(b.ring_cache_stats().1, misses, "the verdict built a ring");
        let mut fresh = Balancer::new(Recorder::default());
        fresh.apply(&down).unwrap();
        assert_eq!(b.maps().ring, fresh.maps().ring);
        // And back up: the first ring is still cached.
        b.apply(&spec(&three)).unwrap();
        assert_eq!(b.ring_cache_stats().1, misses);
    }

    fn frag_key(vip: &str, proto: u8) -> VipKey {
        let (addr, family) = addr_bytes(ip(vip));
        fragment_key(addr, family, proto)
    }

    #[test]
    fn fragments_belong_to_the_only_ip_hash_service_of_their_address_and_protocol() {
        let hashed = |name: &str, vip: &str, port: u16| {
            let mut s = service(name, vip, SCHED_IP_HASH, &[("198.51.100.11", 1)]);
            s.port = port;
            s
        };
        let mut udp = hashed("dns", "203.0.113.10", 53);
        udp.proto = lb_common::PROTO_UDP;
        let services = vec![
            // Alone on its address and protocol: the owner (TCP and UDP are separate pairs).
            hashed("web", "203.0.113.10", 80),
            udp,
            // Two services on one pair: ambiguous without ports.
            hashed("a", "203.0.113.11", 80),
            hashed("b", "203.0.113.11", 443),
            // Alone but not ip-hash: its hash needs the ports.
            service(
                "maglev",
                "203.0.113.12",
                SCHED_MAGLEV,
                &[("198.51.100.11", 1)],
            ),
            // A whole-address ip-hash service, alone: the owner.
            hashed("all", "203.0.113.13", 0),
            // IPv6: the datapath forwards IPv4 fragments only.
            hashed("v6", "2001:db8:100::10", 80),
        ];
        let owners = fragment_owners(&services);
        let want: BTreeMap<VipKey, String> = [
            (frag_key("203.0.113.10", PROTO_TCP), "web"),
            (frag_key("203.0.113.10", lb_common::PROTO_UDP), "dns"),
            (frag_key("203.0.113.13", PROTO_TCP), "all"),
        ]
        .into_iter()
        .map(|(k, n)| (k, n.to_owned()))
        .collect();
        assert_eq!(owners, want);
    }

    #[test]
    fn the_fragment_map_follows_the_services() {
        let mut b = Balancer::new(Recorder::default());
        let web = service(
            "web",
            "203.0.113.10",
            SCHED_IP_HASH,
            &[("198.51.100.11", 1)],
        );
        let key = frag_key("203.0.113.10", PROTO_TCP);
        let one = DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![web.clone()],
        };
        b.apply(&one).unwrap();
        let id = b.service("web").unwrap().id;
        assert_eq!(b.maps().frag_services, BTreeMap::from([(key, id)]));

        // A second service on the pair: fragments are ambiguous, the entry goes.
        let mut api = service(
            "api",
            "203.0.113.10",
            SCHED_IP_HASH,
            &[("198.51.100.12", 1)],
        );
        api.port = 443;
        let two = DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![web.clone(), api],
        };
        b.apply(&two).unwrap();
        assert!(b.maps().frag_services.is_empty());
        b.apply(&one).unwrap();
        assert_eq!(b.maps().frag_services, BTreeMap::from([(key, id)]));

        // The service changes scheduler: no entry.
        let mut maglev = web.clone();
        maglev.scheduler = SCHED_MAGLEV;
        b.apply(&DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![maglev],
        })
        .unwrap();
        assert!(b.maps().frag_services.is_empty());

        // Another service takes the address: the entry names the new id.
        b.apply(&one).unwrap();
        let mut other = web.clone();
        other.name = "other".to_owned();
        b.apply(&DatapathSpec {
            global: GlobalConfig::default(),
            services: vec![other],
        })
        .unwrap();
        let other_id = b.service("other").unwrap().id;
        assert_eq!(b.maps().frag_services, BTreeMap::from([(key, other_id)]));

        // A restarted agent adopting the pins removes an entry no service claims.
        let maps = b.maps().clone();
        let (mut again, _) = readopt(maps, &[]);
        again
            .apply(&DatapathSpec {
                global: GlobalConfig::default(),
                services: Vec::new(),
            })
            .unwrap();
        assert!(again.maps().frag_services.is_empty());
    }

    /// A writer whose ring writes fail while `fail` is set.
    #[derive(Default)]
    struct Flaky {
        inner: Recorder,
        fail: bool,
    }

    impl MapWriter for Flaky {
        fn set_global(&mut self, g: GlobalConfig) -> Result<(), DatapathError> {
            self.inner.set_global(g)
        }
        fn set_source_rule(&mut self, key: RuleKey, rule: SourceRule) -> Result<(), DatapathError> {
            self.inner.set_source_rule(key, rule)
        }
        fn remove_source_rule(&mut self, key: RuleKey) -> Result<(), DatapathError> {
            self.inner.remove_source_rule(key)
        }
        fn set_rate_limits(
            &mut self,
            service_id: u32,
            limits: RateLimits,
        ) -> Result<(), DatapathError> {
            self.inner.set_rate_limits(service_id, limits)
        }
        fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
            self.inner.set_vip(key, info)
        }
        fn remove_vip(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.inner.remove_vip(key)
        }
        fn set_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.inner.set_vip_addr(key)
        }
        fn set_service(&mut self, id: u32, info: VipInfo) -> Result<(), DatapathError> {
            self.inner.set_service(id, info)
        }
        fn clear_service(&mut self, id: u32) -> Result<(), DatapathError> {
            self.inner.clear_service(id)
        }
        fn set_vip_addr_bits(&mut self, bits: &VipAddrBits) -> Result<(), DatapathError> {
            self.inner.set_vip_addr_bits(bits)
        }
        fn remove_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.inner.remove_vip_addr(key)
        }
        fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError> {
            self.inner.set_backend(id, info)
        }
        fn set_frag_service(&mut self, key: VipKey, id: u32) -> Result<(), DatapathError> {
            self.inner.set_frag_service(key, id)
        }
        fn set_snat_pool(&mut self, id: u32, pool: &[SnatSource]) -> Result<(), DatapathError> {
            self.inner.set_snat_pool(id, pool)
        }
        fn remove_frag_service(&mut self, key: VipKey) -> Result<(), DatapathError> {
            self.inner.remove_frag_service(key)
        }
        fn set_ring_slot(&mut self, s: u32, slot: u32, b: u32) -> Result<(), DatapathError> {
            if self.fail {
                return Err(DatapathError::MissingMap("RING (test failure)"));
            }
            self.inner.set_ring_slot(s, slot, b)
        }
        fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
            self.inner.set_tx_port(ifindex)
        }
        fn reset_traffic(&mut self, backend: bool, id: u32) -> Result<(), DatapathError> {
            self.inner.reset_traffic(backend, id)
        }
        fn set_active_connections(&mut self, id: u32, count: i64) -> Result<(), DatapathError> {
            self.inner.set_active_connections(id, count)
        }
        fn set_conn_limit(&mut self, id: u32, max: u32) -> Result<(), DatapathError> {
            self.inner.set_conn_limit(id, max)
        }
        fn set_spill_set(&mut self, id: u32, set: &SpillSet) -> Result<(), DatapathError> {
            self.inner.set_spill_set(id, set)
        }
    }

    /// Review finding: a failed write dropped the service's state, leaking its ids, and the
    /// rollback rebuilt it under a new id with new generations (every tracked flow moved).
    #[test]
    fn a_failed_write_keeps_the_service_and_its_ids() {
        let three = [
            ("198.51.100.11", 1),
            ("198.51.100.12", 1),
            ("198.51.100.13", 1),
        ];
        let mut b = Balancer::new(Flaky::default());
        b.apply(&spec(&three)).unwrap();
        let before = b.service("web").unwrap().clone();
        let free_before = b.free_backend_ids.len();
        b.maps_mut().fail = true;
        let mut four = spec(&three);
        four.services[0].backends.push(BackendSpec {
            address: ip("198.51.100.14"),
            port: 0,
            ring_weight: 1,
            up: true,
            max_connections: 0,
            standby: false,
        });
        assert!(b.apply(&four).is_err());
        let kept = b.service("web").expect("the service is still known");
        assert_eq!(kept.id, before.id);
        assert_eq!(kept.backends, before.backends);
        assert_eq!(b.free_backend_ids.len(), free_before, "no id leaked");
        // The rollback: the old spec again, with the ring rewritten whole.
        b.maps_mut().fail = false;
        let report = b.apply(&spec(&three)).unwrap();
        assert_eq!(report.ring_slots_written, 1009);
        assert_eq!(b.service("web").unwrap().id, before.id);
        assert_eq!(b.service("web").unwrap().backends, before.backends);
    }

    /// Review finding: retired backend entries kept their service id, so an adopting agent
    /// took them for members again.
    #[test]
    fn a_retired_backend_is_not_adopted_again() {
        let three = [
            ("198.51.100.11", 1),
            ("198.51.100.12", 1),
            ("198.51.100.13", 1),
        ];
        let two = [("198.51.100.11", 1), ("198.51.100.12", 1)];
        let mut first = Balancer::new(Recorder::default());
        first.apply(&spec(&three)).unwrap();
        first.apply(&spec(&two)).unwrap();
        let maps = first.maps().clone();
        let retired: Vec<u32> = maps
            .backends
            .iter()
            .filter(|(_, b)| b.service_id == RETIRED)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(retired.len(), 1);
        let (second, known) = readopt(maps, &spec(&two).services);
        assert_eq!(known.len(), 2, "{known:?}");
        assert_eq!(second.service("web").unwrap().backends.len(), 2);
        assert!(second.free_backend_ids.contains(&retired[0]));
    }
}
