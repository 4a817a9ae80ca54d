//! [`Recorder`]: a [`MapWriter`] that keeps the datapath's state in memory instead of the
//! kernel, with the same bounds as the real maps, so the agent's writes are tested (and the
//! golden tests compute rings) without loading anything.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    BackendInfo, GlobalConfig, MAX_BACKENDS, MAX_RING_SIZE, MAX_SERVICES, VipAddrBits, VipInfo,
    VipKey,
    nat::{MAX_SNAT_ADDRS, SnatSource},
};

use super::{DatapathError, MapWriter};

/// The maps' contents as written, and how many writes it took.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    pub global: GlobalConfig,
    /// (service id, slot) -> backend id.
    pub ring: BTreeMap<(u32, u32), u32>,
    pub backends: BTreeMap<u32, BackendInfo>,
    pub vips: BTreeMap<VipKey, VipInfo>,
    /// `SERVICES`: service id -> info (a voided entry is absent).
    pub services: BTreeMap<u32, VipInfo>,
    pub vip_addrs: BTreeSet<VipKey>,
    pub vip_addr_bits: VipAddrBits,
    /// Writes of `vip_addr_bits`.
    pub vip_addr_bits_writes: usize,
    /// `FRAG_SERVICES`: (address, protocol) -> service id.
    pub frag_services: BTreeMap<VipKey, u32>,
    pub source_rules: BTreeMap<super::maps::RuleKey, lb_common::rules::SourceRule>,
    /// `RATE_LIMITS`: service id -> its limits (every write).
    pub rate_limits: BTreeMap<u32, lb_common::rate::RateLimits>,
    pub conns: BTreeMap<u32, i64>,
    /// `SNAT_POOL`: service id -> its addresses (the slots written non-empty).
    pub snat_pools: BTreeMap<u32, Vec<SnatSource>>,
    pub tx_ports: BTreeSet<u32>,
    pub slot_writes: usize,
    pub backend_writes: usize,
    /// `reset_traffic` calls: (backend?, id).
    pub traffic_resets: Vec<(bool, u32)>,
    /// `CONN_LIMITS`: backend id -> `max_connections`.
    pub conn_limits: BTreeMap<u32, u32>,
    /// `SPILL_SETS`: service id -> set.
    pub spill_sets: BTreeMap<u32, lb_common::limits::SpillSet>,
}

impl Recorder {
    /// The ring slots of one service, in slot order.
    #[must_use]
    pub fn ring_of(&self, service_id: u32) -> Vec<(u32, u32)> {
        self.ring
            .range((service_id, 0)..(service_id, MAX_RING_SIZE))
            .map(|(&(_, slot), &backend)| (slot, backend))
            .collect()
    }
}

impl MapWriter for Recorder {
    fn set_global(&mut self, global: GlobalConfig) -> Result<(), DatapathError> {
        self.global = global;
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
    fn set_service(&mut self, id: u32, info: VipInfo) -> Result<(), DatapathError> {
        self.services.insert(id, info);
        Ok(())
    }
    fn clear_service(&mut self, id: u32) -> Result<(), DatapathError> {
        self.services.remove(&id);
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
    fn set_vip_addr_bits(&mut self, bits: &VipAddrBits) -> Result<(), DatapathError> {
        self.vip_addr_bits = *bits;
        self.vip_addr_bits_writes += 1;
        Ok(())
    }
    fn set_backend(&mut self, id: u32, info: BackendInfo) -> Result<(), DatapathError> {
        assert!(
            id < MAX_BACKENDS,
            "backend id {id} outside the BACKENDS array"
        );
        self.backends.insert(id, info);
        self.backend_writes += 1;
        Ok(())
    }
    fn set_snat_pool(&mut self, service_id: u32, pool: &[SnatSource]) -> Result<(), DatapathError> {
        assert!(
            service_id < MAX_SERVICES && pool.len() <= MAX_SNAT_ADDRS as usize,
            "SNAT pool of service {service_id} ({} addresses) outside SNAT_POOL",
            pool.len()
        );
        self.snat_pools.insert(service_id, pool.to_vec());
        Ok(())
    }
    fn set_frag_service(&mut self, key: VipKey, service_id: u32) -> Result<(), DatapathError> {
        self.frag_services.insert(key, service_id);
        Ok(())
    }
    fn set_source_rule(
        &mut self,
        key: super::maps::RuleKey,
        rule: lb_common::rules::SourceRule,
    ) -> Result<(), DatapathError> {
        self.source_rules.insert(key, rule);
        Ok(())
    }

    fn remove_source_rule(&mut self, key: super::maps::RuleKey) -> Result<(), DatapathError> {
        self.source_rules.remove(&key);
        Ok(())
    }

    fn set_rate_limits(
        &mut self,
        service_id: u32,
        limits: lb_common::rate::RateLimits,
    ) -> Result<(), DatapathError> {
        self.rate_limits.insert(service_id, limits);
        Ok(())
    }

    fn remove_frag_service(&mut self, key: VipKey) -> Result<(), DatapathError> {
        self.frag_services.remove(&key);
        Ok(())
    }
    fn set_ring_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<(), DatapathError> {
        // The same bound as `KernelMaps`: a service's slots end where the next one's begin.
        super::maps::ring_index(service_id, slot)?;
        self.ring.insert((service_id, slot), backend_id);
        self.slot_writes += 1;
        Ok(())
    }
    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.tx_ports.insert(ifindex);
        Ok(())
    }
    fn reset_traffic(&mut self, backend: bool, id: u32) -> Result<(), DatapathError> {
        self.traffic_resets.push((backend, id));
        Ok(())
    }
    fn set_active_connections(&mut self, backend_id: u32, count: i64) -> Result<(), DatapathError> {
        self.conns.insert(backend_id, count);
        Ok(())
    }
    fn set_conn_limit(&mut self, backend_id: u32, max: u32) -> Result<(), DatapathError> {
        assert!(
            backend_id < MAX_BACKENDS,
            "backend id {backend_id} outside the CONN_LIMITS array"
        );
        self.conn_limits.insert(backend_id, max);
        Ok(())
    }
    fn set_spill_set(
        &mut self,
        service_id: u32,
        set: &lb_common::limits::SpillSet,
    ) -> Result<(), DatapathError> {
        assert!(
            service_id < MAX_SERVICES,
            "service id {service_id} outside the SPILL_SETS array"
        );
        self.spill_sets.insert(service_id, *set);
        Ok(())
    }
}
