//! The schedulers: which backend of a service a new flow goes to (Maglev, source-IP hash,
//! smooth weighted round-robin, least connections), all reading the service's ring in `RING`.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id};
use lb_common::{
    BACKEND_NONE, FlowKey, MAX_RING_SIZE, MAX_SERVICES, SCHED_IP_HASH, SCHED_MAGLEV,
    SCHED_ROUND_ROBIN, VipInfo,
    hash::{flow_hash, source_hash},
    stat,
};

use crate::{
    maps::{BACKEND_CONNS, BACKENDS, RING, RR_COUNTERS},
    stats::{Exit, drop},
};

/// Picks a backend for a flow the table does not hold. `by_hash` forces the service's hash
/// (for mid-flow TCP packets of unknown flows, whatever the scheduler).
#[inline(always)]
pub(crate) fn schedule(vip: &VipInfo, key: &FlowKey, by_hash: bool) -> Result<u32, Exit> {
    if vip.ring_size == 0 || vip.service_id >= MAX_SERVICES {
        return Err(drop(stat::DROP_NO_BACKEND));
    }
    let base = vip.service_id * MAX_RING_SIZE;
    let ring_size = vip.ring_size;
    // `checked_rem`: LLVM cannot always carry the zero check above into the closure, and a
    // division that could panic leaves the program ending in `unreachable`, which the
    // verifier rejects.
    let ring = |n: u32| -> Result<u32, Exit> {
        let slot = base
            + n.checked_rem(ring_size)
                .ok_or(drop(stat::DROP_NO_BACKEND))?;
        let id = *RING.get(slot).ok_or(drop(stat::DROP_NO_BACKEND))?;
        if id == BACKEND_NONE {
            return Err(drop(stat::DROP_NO_BACKEND));
        }
        Ok(id)
    };
    if vip.scheduler == SCHED_IP_HASH {
        return ring(source_hash(key));
    }
    if by_hash || vip.scheduler == SCHED_MAGLEV {
        return ring(flow_hash(key));
    }
    if vip.scheduler == SCHED_ROUND_ROBIN {
        // The ring holds the smooth weighted round-robin sequence. Each CPU walks it with
        // its own position (a per-CPU counter: no shared cache line, no atomics, which the
        // default BPF CPU level lacks for fetch-and-add), starting a slice apart, so every
        // CPU's picks are exactly weighted per cycle, never bursty, and so is their sum.
        let counter = RR_COUNTERS
            .get_ptr_mut(vip.service_id)
            .ok_or(drop(stat::DROP_NO_BACKEND))?;
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        let n = unsafe {
            let n = *counter;
            *counter = n.wrapping_add(1);
            n
        };
        // SAFETY: a helper without arguments.
        let cpu = u64::from(unsafe { bpf_get_smp_processor_id() });
        let len = u64::from(ring_size);
        let start = cpu.wrapping_mul(len / 8 + 1);
        let pos = n
            .wrapping_add(start)
            .checked_rem(len)
            .ok_or(drop(stat::DROP_NO_BACKEND))?;
        return ring(pos as u32);
    }
    // Least connections, power of two choices: two random draws from the weighted Maglev
    // table, the one with fewer active connections per unit of weight wins.
    // SAFETY: helpers without arguments.
    let (ra, rb) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let a = ring(ra)?;
    let b = ring(rb)?;
    let load = |id: u32| -> (u64, u64) {
        let conns = BACKEND_CONNS.get(id).map_or(0, |c| (*c).max(0) as u64);
        let weight = BACKENDS.get(id).map_or(1, |b| u64::from(b.weight.max(1)));
        (conns, weight)
    };
    let (ca, wa) = load(a);
    let (cb, wb) = load(b);
    // ca/wa <= cb/wb without division.
    Ok(if ca * wb <= cb * wa { a } else { b })
}
