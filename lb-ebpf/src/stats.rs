//! Counting what happens to packets: the early-exit type that carries its counter
//! ([`Exit`]), the global counters of `STATS` ([`bump`], [`action_stat`]) and the per-VIP and
//! per-backend traffic counters ([`count_traffic`]).
use aya_ebpf::bindings::xdp_action;
use lb_common::stat;

use crate::maps::{BACKEND_STATS, VIP_STATS};

/// This CPU's `STATS` value, as `STATS.get_ptr_mut(0)` returns it: looked up once per packet.
pub(crate) type Stats = Option<*mut [u64; stat::COUNT as usize]>;

/// An early exit: the action to return and the counter that says why.
pub(crate) struct Exit {
    pub(crate) action: u32,
    pub(crate) reason: u32,
}

#[inline(always)]
pub(crate) const fn drop(reason: u32) -> Exit {
    Exit {
        action: xdp_action::XDP_DROP,
        reason,
    }
}

#[inline(always)]
pub(crate) const fn pass(reason: u32) -> Exit {
    Exit {
        action: xdp_action::XDP_PASS,
        reason,
    }
}

#[inline(always)]
pub(crate) fn bump(stats: Stats, index: u32) {
    if let Some(stats) = stats
        && index < stat::COUNT
    {
        // SAFETY: a per-CPU array value of this CPU; XDP runs with preemption disabled, so
        // nothing else writes it concurrently. `index` is checked against the array length.
        unsafe { (*stats)[index as usize] += 1 };
    }
}

#[inline(always)]
pub(crate) const fn action_stat(action: u32) -> u32 {
    match action {
        xdp_action::XDP_DROP => stat::XDP_DROP,
        xdp_action::XDP_PASS => stat::XDP_PASS,
        xdp_action::XDP_TX => stat::XDP_TX,
        xdp_action::XDP_REDIRECT => stat::XDP_REDIRECT,
        _ => stat::XDP_ABORTED,
    }
}

/// Adds one packet of `frame_len` bytes (and a new flow if `new_flow`) to the counters of
/// its service and of its backend.
#[inline(always)]
pub(crate) fn count_traffic(service_id: u32, backend_id: u32, frame_len: u64, new_flow: bool) {
    if let Some(c) = VIP_STATS.get_ptr_mut(service_id) {
        // SAFETY: this CPU's slot of a per-CPU array; no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += frame_len;
            (*c).new_flows += u64::from(new_flow);
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += frame_len;
            (*c).new_flows += u64::from(new_flow);
        }
    }
}
