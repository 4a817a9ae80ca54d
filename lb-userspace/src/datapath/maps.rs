//! The map layer: the writes the agent makes ([`MapWriter`]), the counters it reads
//! ([`StatsReader`]), and [`KernelMaps`], their implementation on the maps of a loaded
//! object. The agent's logic sees only the traits (Katran's approach), so it is tested
//! without a kernel.

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray},
};
use lb_common::{
    BackendInfo, FlowKey, FlowValue, GlobalConfig, MAX_RING_SIZE, TrafficCounters, VipAddrBits,
    VipInfo, VipKey, map_name, stat,
};

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
    /// Writes one ring slot of a service.
    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError>;
    /// Registers an interface as a redirect target.
    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Overwrites a backend's active-connection count (reconciliation, or 0 when an id is
    /// given to a new backend).
    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError>;
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
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl KernelMaps {
    /// Takes the balancer's maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            vips: take(ebpf, map_name::VIPS)?,
            services: take(ebpf, map_name::SERVICES)?,
            vip_addrs: take(ebpf, map_name::VIP_ADDRS)?,
            vip_addr_bits: take(ebpf, map_name::VIP_ADDR_BITS)?,
            backends: take(ebpf, map_name::BACKENDS)?,
            ring: take(ebpf, map_name::RING)?,
            global: take(ebpf, map_name::GLOBAL)?,
            tx_ports: take(ebpf, map_name::TX_PORTS)?,
            stats: take(ebpf, map_name::STATS)?,
            vip_stats: take(ebpf, map_name::VIP_STATS)?,
            backend_stats: take(ebpf, map_name::BACKEND_STATS)?,
            conntrack: take(ebpf, map_name::CONNTRACK)?,
            backend_conns: take(ebpf, map_name::BACKEND_CONNS)?,
        })
    }

    /// Number of entries in the connection table (walks it: for tests and the CLI, not for
    /// a hot loop).
    #[must_use]
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
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

    /// Every connection-table entry (a walk of the table: seconds for a million entries;
    /// the agent does it in the background every few seconds).
    #[must_use]
    pub fn conntrack_entries(&self) -> Vec<(FlowKey, FlowValue)> {
        self.conntrack.iter().filter_map(Result::ok).collect()
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

    fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError> {
        self.backends
            .set(id, info, 0)
            .map_err(map_err(map_name::BACKENDS))
    }

    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError> {
        // Each service owns slots [id * MAX_RING_SIZE, (id + 1) * MAX_RING_SIZE): a write
        // past its own ring would land in the next service's.
        if slot >= MAX_RING_SIZE {
            return Err(DatapathError::SlotOutOfRange {
                name: map_name::RING,
                service_id,
                slot,
            });
        }
        self.ring
            .set(service_id * MAX_RING_SIZE + slot, backend_id, 0)
            .map_err(map_err(map_name::RING))
    }

    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError> {
        self.backend_conns
            .set(backend_id, count, 0)
            .map_err(map_err(map_name::BACKEND_CONNS))
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
