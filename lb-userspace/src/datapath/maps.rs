//! The map layer: the writes the agent makes ([`MapWriter`]), the counters it reads
//! ([`StatsReader`]), and [`KernelMaps`], their implementation on the maps of a loaded
//! object. The agent's logic sees only the traits (Katran's approach), so it is tested
//! without a kernel.

use std::os::fd::{AsFd as _, OwnedFd};

use aya::{
    Ebpf,
    maps::{
        Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use lb_common::{
    BackendInfo, FlowKey, FlowValue, GlobalConfig, MAX_RING_SIZE, TrafficCounters, VipAddrBits,
    VipInfo, VipKey,
    limits::SpillSet,
    map_name,
    nat::{MAX_SNAT_ADDRS, NatEntry, SnatSource},
    rate::{RATE_SLOTS, RateLimits},
    rules::{SourceRule, SourceRuleData},
    stat,
};

/// A `SOURCE_RULES` key: the prefix length (of the whole key data) and the data.
pub type RuleKey = (u32, SourceRuleData);

use super::{DatapathError, map_err};

/// The writes the agent makes to the datapath. Values are always written whole, so the
/// datapath never sees a half-updated entry.
pub trait MapWriter {
    fn set_global(&mut self, global: GlobalConfig) -> Result<(), DatapathError>;
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError>;
    fn remove_vip(&mut self, key: VipKey) -> Result<(), DatapathError>;
    /// Writes a service's `SERVICES` entry (its `VIPS` value, by service id).
    fn set_service(&mut self, id: u32, info: VipInfo) -> Result<(), DatapathError>;
    /// Voids a service's `SERVICES` entry: tracked flows no longer find the service
    /// through it.
    fn clear_service(&mut self, id: u32) -> Result<(), DatapathError>;
    fn set_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError>;
    fn remove_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError>;
    /// Writes the VIP address filter (`VIP_ADDR_BITS`), whole.
    fn set_vip_addr_bits(&mut self, bits: &VipAddrBits) -> Result<(), DatapathError>;
    fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError>;
    /// Writes a `fullnat` service's SNAT pool (`SNAT_POOL`): its addresses in slot order,
    /// the slots after them emptied. Written before the `VIPS` entry that names the count.
    fn set_snat_pool(&mut self, service_id: u32, pool: &[SnatSource]) -> Result<(), DatapathError>;
    /// Gives the IPv4 fragments to an (address, protocol) (`lb_common::inbound::fragment_key`)
    /// to a service (`FRAG_SERVICES`).
    fn set_frag_service(&mut self, key: VipKey, service_id: u32) -> Result<(), DatapathError>;
    /// Takes an (address, protocol) out of `FRAG_SERVICES`: its fragments are dropped.
    fn remove_frag_service(&mut self, key: VipKey) -> Result<(), DatapathError>;
    /// Writes one source rule (`SOURCE_RULES`) of the service its key names.
    fn set_source_rule(&mut self, key: RuleKey, rule: SourceRule) -> Result<(), DatapathError>;
    /// Removes one source rule.
    fn remove_source_rule(&mut self, key: RuleKey) -> Result<(), DatapathError>;
    /// Writes a service's rate limits (`RATE_LIMITS[service_id]`), before the `VIPS` entry
    /// whose flags make the datapath read them.
    fn set_rate_limits(&mut self, service_id: u32, limits: RateLimits)
    -> Result<(), DatapathError>;
    /// Writes one ring slot of a service.
    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError>;
    /// Writes ring slots of one service, `(slot, backend id)` each. The kernel maps do it
    /// in one batch; the default writes them one by one.
    fn set_ring_slots(
        &mut self,
        service_id: u32,
        slots: &[(u32, u32)],
    ) -> Result<(), DatapathError> {
        for (slot, backend) in slots {
            self.set_ring_slot(service_id, *slot, *backend)?;
        }
        Ok(())
    }
    /// Registers an interface as a redirect target.
    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Zeroes the traffic counters of a backend id (`backend`) or a service id (with its
    /// rate-limit drops), when the id is given to a new owner: it must not inherit the
    /// previous owner's totals.
    fn reset_traffic(&mut self, backend: bool, id: u32) -> Result<(), DatapathError>;
    /// Overwrites a backend's active-connection count (reconciliation, or 0 when an id is
    /// given to a new backend).
    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError>;
    /// Writes a backend's `max_connections` (`CONN_LIMITS`; 0: no limit).
    fn set_conn_limit(&mut self, backend_id: u32, max: u32) -> Result<(), DatapathError>;
    /// Writes a service's spill set (`SPILL_SETS`), its one slot, whole.
    fn set_spill_set(&mut self, service_id: u32, set: &SpillSet) -> Result<(), DatapathError>;
}

/// Read access to the datapath's counters.
pub trait StatsReader {
    /// Global counters summed over CPUs, indexed by `lb_common::stat`.
    fn global(&self) -> Result<[u64; stat::COUNT as usize], DatapathError>;
    fn service(&self, service_id: u32) -> Result<TrafficCounters, DatapathError>;
    fn backend(&self, backend_id: u32) -> Result<TrafficCounters, DatapathError>;
}

/// The real maps of a loaded object.
pub struct KernelMaps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    services: Array<MapData, VipInfo>,
    vip_addrs: HashMap<MapData, VipKey, u32>,
    vip_addr_bits: Array<MapData, VipAddrBits>,
    frag_services: HashMap<MapData, VipKey, u32>,
    source_rules: LpmTrie<MapData, SourceRuleData, SourceRule>,
    source_rule_stats: PerCpuArray<MapData, u64>,
    rate_limits: Array<MapData, RateLimits>,
    rate_stats: PerCpuArray<MapData, u64>,
    backends: Array<MapData, BackendInfo>,
    ring: Array<MapData, u32>,
    global: Array<MapData, GlobalConfig>,
    tx_ports: DevMapHash<MapData>,
    stats: PerCpuArray<MapData, [u64; stat::COUNT as usize]>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    /// An LRU hash in the kernel; aya reads it through its `HashMap` type.
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    backend_conns: Array<MapData, i64>,
    /// Second handles on `RING` and `CONNTRACK`, for the batch syscalls aya does not wrap
    /// and for walking the table on another thread.
    ring_fd: OwnedFd,
    conntrack_fd: OwnedFd,
    /// `CONNTRACK`'s and `HALF_OPEN`'s `max_entries` as the kernel has them.
    conntrack_capacity: u32,
    half_open_fd: OwnedFd,
    half_open_capacity: u32,
    nat_ct: HashMap<MapData, FlowKey, NatEntry>,
    nat_ct_fd: OwnedFd,
    /// `NAT_CT`'s `max_entries` as the kernel has it (a pinned table keeps its size).
    nat_capacity: u32,
    snat_pool: Array<MapData, SnatSource>,
    conn_limits: Array<MapData, u32>,
    spill_sets: Array<MapData, SpillSet>,
    conn_limit_stats: PerCpuArray<MapData, u64>,
}

/// A handle on the NAT connection table for the agent's periodic walk, on a blocking
/// thread (`agent::owner::Recount`): reads every entry, deletes the pairs it reclaims.
#[derive(Debug)]
pub struct NatWalker {
    fd: OwnedFd,
}

impl NatWalker {
    /// Calls `each` for every entry, 4096 a syscall.
    pub fn walk(&self, each: impl FnMut(&FlowKey, &NatEntry)) -> std::io::Result<usize> {
        // SAFETY: `fd` is the NAT_CT map: `FlowKey` keys, `NatEntry` values.
        unsafe { crate::sys::map_lookup_batch(self.fd.as_fd(), 4096, each) }
    }

    /// Deletes `keys` (those already gone are skipped); returns how many went.
    pub fn delete(&self, keys: &[FlowKey]) -> std::io::Result<usize> {
        // SAFETY: as above.
        unsafe { crate::sys::map_delete_batch(self.fd.as_fd(), keys) }
    }
}

/// A handle on the connection tables that can walk them on another thread: the walk of a
/// million entries takes long enough that the owner task must not wait for it.
#[derive(Debug)]
pub struct ConntrackWalker {
    fd: OwnedFd,
    half_open_fd: OwnedFd,
    /// `CONNTRACK`'s and `HALF_OPEN`'s `max_entries`.
    pub capacity: u32,
    pub half_open_capacity: u32,
}

impl ConntrackWalker {
    /// Calls `each` for every entry, 4096 entries a syscall (`BPF_MAP_LOOKUP_BATCH`).
    pub fn walk(&self, each: impl FnMut(&FlowKey, &FlowValue)) -> std::io::Result<usize> {
        // SAFETY: `fd` is the CONNTRACK map, whose key and value types are `FlowKey` and
        // `FlowValue` (lb-ebpf's maps.rs and lb-common share them).
        unsafe { crate::sys::map_lookup_batch(self.fd.as_fd(), 4096, each) }
    }

    /// Deletes `keys` from the connection table (those already gone are skipped); returns
    /// how many went.
    pub fn delete(&self, keys: &[FlowKey]) -> std::io::Result<usize> {
        // SAFETY: as above.
        unsafe { crate::sys::map_delete_batch(self.fd.as_fd(), keys) }
    }

    /// The entries of the half-open table (an LRU: read, never written here).
    pub fn count_half_open(&self) -> std::io::Result<usize> {
        // SAFETY: `half_open_fd` is the HALF_OPEN map: `FlowKey` keys, `FlowValue` values.
        unsafe {
            crate::sys::map_lookup_batch(
                self.half_open_fd.as_fd(),
                4096,
                |_: &FlowKey, _: &FlowValue| {},
            )
        }
    }
}

/// The `RING` index of a service's slot. Each service owns slots `[id * MAX_RING_SIZE,
/// (id + 1) * MAX_RING_SIZE)`: a slot past its own ring would land in the next service's, so
/// it is refused (by every `MapWriter`, the test recorder included).
pub fn ring_index(service_id: u32, slot: u32) -> Result<u32, DatapathError> {
    if slot >= MAX_RING_SIZE {
        return Err(DatapathError::SlotOutOfRange {
            name: map_name::RING,
            service_id,
            slot,
        });
    }
    Ok(service_id * MAX_RING_SIZE + slot)
}

/// A hash map's `max_entries` as the kernel has it (a pinned map keeps its size).
fn max_entries(map: &Map, name: &'static str) -> Result<u32, DatapathError> {
    match map {
        Map::LruHashMap(data) | Map::HashMap(data) => {
            Ok(data.info().map_err(map_err(name))?.max_entries())
        }
        _ => Err(DatapathError::MissingMap(name)),
    }
}

/// A duplicate of the file descriptor of a map, before the map becomes a typed handle.
fn dup_fd(map: &Map, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let data: &MapData = match map {
        Map::Array(data) | Map::LruHashMap(data) | Map::HashMap(data) => data,
        _ => return Err(DatapathError::MissingMap(name)),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DatapathError::Map {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "dup",
                io_error: source,
            }),
        })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl KernelMaps {
    /// Takes the balancer's maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let ring = ebpf
            .take_map(map_name::RING)
            .ok_or(DatapathError::MissingMap(map_name::RING))?;
        let ring_fd = dup_fd(&ring, map_name::RING)?;
        let conntrack = ebpf
            .take_map(map_name::CONNTRACK)
            .ok_or(DatapathError::MissingMap(map_name::CONNTRACK))?;
        let conntrack_fd = dup_fd(&conntrack, map_name::CONNTRACK)?;
        let conntrack_capacity = max_entries(&conntrack, map_name::CONNTRACK)?;
        let half_open = ebpf
            .take_map(map_name::HALF_OPEN)
            .ok_or(DatapathError::MissingMap(map_name::HALF_OPEN))?;
        let half_open_fd = dup_fd(&half_open, map_name::HALF_OPEN)?;
        let half_open_capacity = max_entries(&half_open, map_name::HALF_OPEN)?;
        let nat_ct = ebpf
            .take_map(map_name::NAT_CT)
            .ok_or(DatapathError::MissingMap(map_name::NAT_CT))?;
        let nat_ct_fd = dup_fd(&nat_ct, map_name::NAT_CT)?;
        let nat_capacity = match &nat_ct {
            Map::HashMap(data) => data
                .info()
                .map_err(map_err(map_name::NAT_CT))?
                .max_entries(),
            _ => return Err(DatapathError::MissingMap(map_name::NAT_CT)),
        };
        Ok(Self {
            vips: take(ebpf, map_name::VIPS)?,
            services: take(ebpf, map_name::SERVICES)?,
            vip_addrs: take(ebpf, map_name::VIP_ADDRS)?,
            vip_addr_bits: take(ebpf, map_name::VIP_ADDR_BITS)?,
            frag_services: take(ebpf, map_name::FRAG_SERVICES)?,
            source_rules: take(ebpf, map_name::SOURCE_RULES)?,
            source_rule_stats: take(ebpf, map_name::SOURCE_RULE_STATS)?,
            rate_limits: take(ebpf, map_name::RATE_LIMITS)?,
            rate_stats: take(ebpf, map_name::RATE_STATS)?,
            backends: take(ebpf, map_name::BACKENDS)?,
            ring: Array::try_from(ring).map_err(map_err(map_name::RING))?,
            global: take(ebpf, map_name::GLOBAL)?,
            tx_ports: take(ebpf, map_name::TX_PORTS)?,
            stats: take(ebpf, map_name::STATS)?,
            vip_stats: take(ebpf, map_name::VIP_STATS)?,
            backend_stats: take(ebpf, map_name::BACKEND_STATS)?,
            conntrack: HashMap::try_from(conntrack).map_err(map_err(map_name::CONNTRACK))?,
            backend_conns: take(ebpf, map_name::BACKEND_CONNS)?,
            ring_fd,
            conntrack_fd,
            conntrack_capacity,
            half_open_fd,
            half_open_capacity,
            nat_ct: HashMap::try_from(nat_ct).map_err(map_err(map_name::NAT_CT))?,
            nat_ct_fd,
            nat_capacity,
            snat_pool: take(ebpf, map_name::SNAT_POOL)?,
            conn_limits: take(ebpf, map_name::CONN_LIMITS)?,
            spill_sets: take(ebpf, map_name::SPILL_SETS)?,
            conn_limit_stats: take(ebpf, map_name::CONN_LIMIT_STATS)?,
        })
    }

    /// How many entries the NAT table holds at most (two per connection).
    #[must_use]
    pub const fn nat_capacity(&self) -> u32 {
        self.nat_capacity
    }

    /// A handle for walking (and reclaiming) the NAT table off the owner task.
    pub fn nat_walker(&self) -> Result<NatWalker, DatapathError> {
        self.nat_ct_fd
            .try_clone()
            .map(|fd| NatWalker { fd })
            .map_err(|source| DatapathError::Map {
                name: map_name::NAT_CT,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: source,
                }),
            })
    }

    /// The NAT table's entry of a tuple, if any.
    pub fn nat_get(&self, key: &FlowKey) -> Result<Option<NatEntry>, DatapathError> {
        match self.nat_ct.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: map_name::NAT_CT,
                source,
            }),
        }
    }

    /// A handle for walking the connection table off the owner task.
    pub fn conntrack_walker(&self) -> Result<ConntrackWalker, DatapathError> {
        let fd = self
            .conntrack_fd
            .try_clone()
            .map_err(|source| DatapathError::Map {
                name: map_name::CONNTRACK,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: source,
                }),
            })?;
        let half_open_fd = self
            .half_open_fd
            .try_clone()
            .map_err(|source| DatapathError::Map {
                name: map_name::HALF_OPEN,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: source,
                }),
            })?;
        Ok(ConntrackWalker {
            fd,
            half_open_fd,
            capacity: self.conntrack_capacity,
            half_open_capacity: self.half_open_capacity,
        })
    }

    /// A backend's active connections as the datapath counts them. The datapath's count
    /// can dip below zero for a moment (two CPUs ending one flow at once, a decrement that
    /// raced the agent's recount); a count of connections never does.
    #[must_use]
    pub fn active_connections(&self, backend_id: u32) -> u64 {
        self.raw_active_connections(backend_id).max(0) as u64
    }

    /// The datapath's counter as stored, possibly negative: for deciding whether the
    /// recount must overwrite it.
    #[must_use]
    pub fn raw_active_connections(&self, backend_id: u32) -> i64 {
        self.backend_conns.get(&backend_id, 0).unwrap_or(0)
    }

    /// A backend's `max_connections` as the datapath holds it (0: no limit).
    #[must_use]
    pub fn conn_limit(&self, backend_id: u32) -> u32 {
        self.conn_limits.get(&backend_id, 0).unwrap_or(0)
    }

    /// New flows a backend turned away because it was full, summed over CPUs.
    #[must_use]
    pub fn turned_away(&self, backend_id: u32) -> u64 {
        self.conn_limit_stats
            .get(&backend_id, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Every VIP entry (for adopting a pinned datapath).
    pub fn read_vips(&self) -> Result<Vec<(VipKey, VipInfo)>, DatapathError> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_name::VIPS))
    }

    /// Every VIP address in the pre-check set (for adopting a pinned datapath: an address
    /// no service claims any more must be removed).
    pub fn read_vip_addrs(&self) -> Result<Vec<VipKey>, DatapathError> {
        self.vip_addrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_name::VIP_ADDRS))
    }

    /// Every `FRAG_SERVICES` entry (for adopting a pinned datapath: an entry no service
    /// claims any more must be removed).
    pub fn read_frag_services(&self) -> Result<Vec<(VipKey, u32)>, DatapathError> {
        self.frag_services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_name::FRAG_SERVICES))
    }

    /// Every `SOURCE_RULES` entry (for adopting a pinned datapath).
    pub fn read_source_rules(&self) -> Result<Vec<(RuleKey, SourceRule)>, DatapathError> {
        self.source_rules
            .iter()
            .map(|entry| entry.map(|(key, rule)| ((key.prefix_len(), key.data()), rule)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_name::SOURCE_RULES))
    }

    /// The packets source rule `index` decided, summed over CPUs.
    pub fn read_source_rule_count(&self, index: u32) -> Result<u64, DatapathError> {
        self.source_rule_stats
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(map_err(map_name::SOURCE_RULE_STATS))
    }

    /// The new flows a service's rate limits dropped, summed over CPUs: by `rate::LIMIT_*`.
    pub fn read_rate_drops(
        &self,
        service_id: u32,
    ) -> Result<[u64; RATE_SLOTS as usize], DatapathError> {
        let mut out = [0; RATE_SLOTS as usize];
        for (limit, slot) in (0..RATE_SLOTS).zip(out.iter_mut()) {
            *slot = self
                .rate_stats
                .get(&(service_id * RATE_SLOTS + limit), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .map_err(map_err(map_name::RATE_STATS))?;
        }
        Ok(out)
    }

    /// The packets each source rule decided, summed over CPUs, by counter index.
    pub fn read_source_rule_counts(&self) -> Result<Vec<u64>, DatapathError> {
        (0..lb_common::rules::MAX_SOURCE_RULES)
            .map(|i| {
                self.source_rule_stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_name::SOURCE_RULE_STATS))
    }

    /// Every backend entry ever written (generation above 0), by id.
    pub fn read_backends(&self) -> Result<Vec<(u32, BackendInfo)>, DatapathError> {
        let mut out = Vec::new();
        for id in 0..lb_common::MAX_BACKENDS {
            let info = self
                .backends
                .get(&id, 0)
                .map_err(map_err(map_name::BACKENDS))?;
            if info.generation > 0 {
                out.push((id, info));
            }
        }
        Ok(out)
    }

    /// A service's ring as the datapath holds it.
    pub fn read_ring(&self, service_id: u32, ring_size: u32) -> Result<Vec<u32>, DatapathError> {
        let base = service_id * MAX_RING_SIZE;
        (0..ring_size.min(MAX_RING_SIZE))
            .map(|slot| {
                self.ring
                    .get(&(base + slot), 0)
                    .map_err(map_err(map_name::RING))
            })
            .collect()
    }

    /// The connection-table entry of a flow, if any.
    pub fn conntrack_get(&self, key: &FlowKey) -> Result<Option<FlowValue>, DatapathError> {
        match self.conntrack.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: map_name::CONNTRACK,
                source,
            }),
        }
    }
}

impl MapWriter for KernelMaps {
    fn set_global(&mut self, global: GlobalConfig) -> Result<(), DatapathError> {
        self.global
            .set(0, global, 0)
            .map_err(map_err(map_name::GLOBAL))
    }

    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
        self.vips
            .insert(key, info, 0)
            .map_err(map_err(map_name::VIPS))
    }

    fn remove_vip(&mut self, key: VipKey) -> Result<(), DatapathError> {
        match self.vips.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: map_name::VIPS,
                source,
            }),
        }
    }

    fn set_service(&mut self, id: u32, info: VipInfo) -> Result<(), DatapathError> {
        self.services
            .set(id, info, 0)
            .map_err(map_err(map_name::SERVICES))
    }

    fn clear_service(&mut self, id: u32) -> Result<(), DatapathError> {
        let void = VipInfo {
            service_id: u32::MAX,
            ..VipInfo::default()
        };
        self.services
            .set(id, void, 0)
            .map_err(map_err(map_name::SERVICES))
    }

    fn set_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
        self.vip_addrs
            .insert(key, 1, 0)
            .map_err(map_err(map_name::VIP_ADDRS))
    }

    fn remove_vip_addr(&mut self, key: VipKey) -> Result<(), DatapathError> {
        match self.vip_addrs.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: map_name::VIP_ADDRS,
                source,
            }),
        }
    }

    fn set_vip_addr_bits(&mut self, bits: &VipAddrBits) -> Result<(), DatapathError> {
        self.vip_addr_bits
            .set(0, bits, 0)
            .map_err(map_err(map_name::VIP_ADDR_BITS))
    }

    fn set_snat_pool(&mut self, service_id: u32, pool: &[SnatSource]) -> Result<(), DatapathError> {
        for slot in 0..MAX_SNAT_ADDRS {
            let source = pool.get(slot as usize).copied().unwrap_or_default();
            self.snat_pool
                .set(service_id * MAX_SNAT_ADDRS + slot, source, 0)
                .map_err(map_err(map_name::SNAT_POOL))?;
        }
        Ok(())
    }

    fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError> {
        self.backends
            .set(id, info, 0)
            .map_err(map_err(map_name::BACKENDS))
    }

    fn set_frag_service(&mut self, key: VipKey, service_id: u32) -> Result<(), DatapathError> {
        self.frag_services
            .insert(key, service_id, 0)
            .map_err(map_err(map_name::FRAG_SERVICES))
    }

    fn remove_frag_service(&mut self, key: VipKey) -> Result<(), DatapathError> {
        match self.frag_services.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: map_name::FRAG_SERVICES,
                source,
            }),
        }
    }

    fn set_source_rule(&mut self, key: RuleKey, rule: SourceRule) -> Result<(), DatapathError> {
        self.source_rules
            .insert(&LpmKey::new(key.0, key.1), rule, 0)
            .map_err(map_err(map_name::SOURCE_RULES))
    }

    fn remove_source_rule(&mut self, key: RuleKey) -> Result<(), DatapathError> {
        match self.source_rules.remove(&LpmKey::new(key.0, key.1)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: map_name::SOURCE_RULES,
                source,
            }),
        }
    }

    fn set_rate_limits(
        &mut self,
        service_id: u32,
        limits: RateLimits,
    ) -> Result<(), DatapathError> {
        self.rate_limits
            .set(service_id, limits, 0)
            .map_err(map_err(map_name::RATE_LIMITS))
    }

    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError> {
        self.ring
            .set(ring_index(service_id, slot)?, backend_id, 0)
            .map_err(map_err(map_name::RING))
    }

    fn set_ring_slots(
        &mut self,
        service_id: u32,
        slots: &[(u32, u32)],
    ) -> Result<(), DatapathError> {
        let keys = slots
            .iter()
            .map(|(slot, _)| ring_index(service_id, *slot))
            .collect::<Result<Vec<u32>, _>>()?;
        let values: Vec<u32> = slots.iter().map(|(_, backend)| *backend).collect();
        // SAFETY: `ring_fd` is the RING array: u32 keys (slot indexes), u32 values (backend
        // ids), as `keys` and `values` are.
        unsafe { crate::sys::map_update_batch(self.ring_fd.as_fd(), &keys, &values) }.map_err(
            |source| DatapathError::Map {
                name: map_name::RING,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: source,
                }),
            },
        )
    }

    fn reset_traffic(&mut self, backend: bool, id: u32) -> Result<(), DatapathError> {
        let (map, name) = if backend {
            (&mut self.backend_stats, map_name::BACKEND_STATS)
        } else {
            (&mut self.vip_stats, map_name::VIP_STATS)
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Map {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: source,
            }),
        })?;
        let per_cpu_error = |name| {
            move |source| DatapathError::Map {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "per-cpu values",
                    io_error: source,
                }),
            }
        };
        let zeros = aya::maps::PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])
            .map_err(per_cpu_error(name))?;
        map.set(id, zeros, 0).map_err(map_err(name))?;
        if !backend {
            // The service's slots of the rate-limit drops, and no other service's.
            for limit in 0..RATE_SLOTS {
                let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                    .map_err(per_cpu_error(map_name::RATE_STATS))?;
                self.rate_stats
                    .set(id * RATE_SLOTS + limit, zeros, 0)
                    .map_err(map_err(map_name::RATE_STATS))?;
            }
        } else {
            // The turned-away count is a traffic total of the backend too.
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                .map_err(per_cpu_error(map_name::CONN_LIMIT_STATS))?;
            self.conn_limit_stats
                .set(id, zeros, 0)
                .map_err(map_err(map_name::CONN_LIMIT_STATS))?;
        }
        Ok(())
    }

    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError> {
        self.backend_conns
            .set(backend_id, count, 0)
            .map_err(map_err(map_name::BACKEND_CONNS))
    }

    fn set_conn_limit(&mut self, backend_id: u32, max: u32) -> Result<(), DatapathError> {
        self.conn_limits
            .set(backend_id, max, 0)
            .map_err(map_err(map_name::CONN_LIMITS))
    }

    fn set_spill_set(&mut self, service_id: u32, set: &SpillSet) -> Result<(), DatapathError> {
        self.spill_sets
            .set(service_id, set, 0)
            .map_err(map_err(map_name::SPILL_SETS))
    }

    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DatapathError::DevMap {
                name: map_name::TX_PORTS,
                source,
            })
    }
}

impl StatsReader for KernelMaps {
    fn global(&self) -> Result<[u64; stat::COUNT as usize], DatapathError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err(map_name::STATS))?;
        let mut sum = [0u64; stat::COUNT as usize];
        for cpu in per_cpu.iter() {
            for (total, value) in sum.iter_mut().zip(cpu.iter()) {
                *total = total.wrapping_add(*value);
            }
        }
        Ok(sum)
    }

    fn service(&self, service_id: u32) -> Result<TrafficCounters, DatapathError> {
        let per_cpu = self
            .vip_stats
            .get(&service_id, 0)
            .map_err(map_err(map_name::VIP_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficCounters::default(), |a, b| a.add(*b)))
    }

    fn backend(&self, backend_id: u32) -> Result<TrafficCounters, DatapathError> {
        let per_cpu = self
            .backend_stats
            .get(&backend_id, 0)
            .map_err(map_err(map_name::BACKEND_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficCounters::default(), |a, b| a.add(*b)))
    }
}
