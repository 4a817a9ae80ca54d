//! Per-service rate limits on new flows (lb-common's `rate`): [`admit`] decides whether a
//! flow the service has no entry for may be scheduled, by the service's GCRA buckets: one
//! per source prefix (`RATE_STATE`) and one for the whole service (`RATE_VIP_STATE`).
//! Tracked flows never come here, and a service without limits pays one byte test.
use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use lb_common::{
    FlowKey, VipInfo,
    rate::{
        CAS_ATTEMPTS, Gcra, LIMIT_SOURCE_FLOWS, LIMIT_VIP_FLOWS, RATE_SLOTS, RATE_SOURCE_FLOWS,
        RATE_VIP_FLOWS, RateKey, gcra, mask_source,
    },
    stat,
};

use crate::{
    maps::{RATE_LIMITS, RATE_SCRATCH, RATE_STATE, RATE_STATS, RATE_VIP_STATE},
    stats::{Exit, drop},
};

/// `RATE_SCRATCH`'s value: a bucket's key, and the TAT a new bucket starts with (0: full).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RateScratch {
    key: RateKey,
    fresh: u64,
}

/// `Ok`: the packet is no new flow (`midflow`: a TCP segment other than a SYN that the
/// table lost, which joins an existing connection and is never limited), or the new flow
/// (a SYN, or a UDP datagram without an entry) is within its service's limits. Otherwise it is dropped and counted
/// by the limit it broke, globally (`drop_rate_source`, `drop_rate_vip`) and per
/// service (`RATE_STATS`). The source's bucket is asked first, so that a source over its
/// own limit takes nothing from the service's.
#[inline(always)]
pub(crate) fn admit(vip: &VipInfo, key: &FlowKey, midflow: bool) -> Result<(), Exit> {
    let flags = vip.rate_limits;
    if flags == 0 || midflow {
        return Ok(());
    }
    // Flags without limits (cannot happen: the agent writes the limits first) admit: the
    // zero limits would refuse every flow.
    let Some(limits) = RATE_LIMITS.get(vip.service_id) else {
        return Ok(());
    };
    // The precise clock, not the balancer's per-jiffy one: buckets of a millisecond (1000
    // flows/s) need finer steps than a tick. Only new flows of limited services pay for it.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if flags & RATE_SOURCE_FLOWS != 0
        && !source_admits(vip, key, &limits.source_flows, &limits.source_mask, now)
    {
        return Err(refuse(
            vip.service_id,
            LIMIT_SOURCE_FLOWS,
            stat::DROP_RATE_SOURCE,
        ));
    }
    if flags & RATE_VIP_FLOWS != 0
        && let Some(tat) = RATE_VIP_STATE.get_ptr_mut(vip.service_id)
        && !take(tat, now, &limits.vip_flows)
    {
        return Err(refuse(vip.service_id, LIMIT_VIP_FLOWS, stat::DROP_RATE_VIP));
    }
    Ok(())
}

/// Takes one flow from the bucket of the packet's source prefix, made (full) on its first
/// flow. A bucket that cannot be found or made (the scratch or the LRU failing, which they
/// do not) admits: the limit protects backends, it must not refuse flows on its own failure.
#[inline(always)]
fn source_admits(vip: &VipInfo, key: &FlowKey, limit: &Gcra, mask: &[u8; 16], now: u64) -> bool {
    let Some(s) = RATE_SCRATCH.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled and
    // nothing else holds a reference to it. Every byte of the key is written.
    let s = unsafe { &mut *s };
    s.key.service_id = vip.service_id;
    s.key.limit = LIMIT_SOURCE_FLOWS;
    s.key.family = key.family;
    s.key._pad = [0; 2];
    s.key.addr = key.src_addr;
    mask_source(&mut s.key.addr, mask);
    s.fresh = 0;
    let tat = match RATE_STATE.get_ptr_mut(&s.key) {
        Some(tat) => tat,
        None => {
            // `BPF_NOEXIST`: of CPUs racing to make the bucket, one inserts and every one
            // then takes its flow from that same bucket.
            let _ = RATE_STATE.insert(&s.key, &s.fresh, u64::from(BPF_NOEXIST));
            match RATE_STATE.get_ptr_mut(&s.key) {
                Some(tat) => tat,
                None => return true,
            }
        }
    };
    take(tat, now, limit)
}

/// One GCRA step on a bucket shared by every CPU: read, compute, compare-and-exchange, at
/// most `CAS_ATTEMPTS` times. A refusal writes nothing. Attempts run out only if other CPUs
/// admitted a flow from this very bucket between each read and exchange: then this one is
/// refused, as the bucket was being drained that fast.
#[inline(always)]
fn take(tat: *mut u64, now: u64, limit: &Gcra) -> bool {
    // SAFETY: `tat` points at a map value (8-byte aligned, valid until the program returns:
    // the LRU is preallocated, so an evicted value is at worst reused). Every other writer
    // (other CPUs, the agent's whole-value update) writes it whole, and an aligned 64-bit
    // load is one instruction: never torn. (A volatile load, not an atomic one: LLVM's BPF
    // backend has no atomic load at the default CPU level.) A stale value only makes the
    // exchange below fail and retry with the current one.
    let mut seen = unsafe { core::ptr::read_volatile(tat) };
    for _ in 0..CAS_ATTEMPTS {
        let Some(next) = gcra(seen, now, limit) else {
            return false;
        };
        // SAFETY: as above.
        let (prev, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                tat, seen, next,
            )
        };
        if done {
            return true;
        }
        seen = prev;
    }
    false
}

/// Counts a refused flow by its limit (globally through the returned exit, per service here).
#[inline(always)]
fn refuse(service_id: u32, limit: u8, reason: u32) -> Exit {
    if let Some(count) = RATE_STATS.get_ptr_mut(service_id * RATE_SLOTS + u32::from(limit)) {
        // SAFETY: this CPU's counter; no concurrent writer (preemption disabled).
        unsafe { *count += 1 };
    }
    drop(reason)
}
