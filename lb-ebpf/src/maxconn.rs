//! Connection limits (`max_connections`, lb-common's `limits`): [`room`] decides whether a
//! new flow may go to the scheduler's pick, or to which other backend of its service, or
//! whether it is refused because every one is full. Tracked flows and mid-flow packets
//! never come here, and a service without limits pays one byte test.

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_map_lookup_elem},
};
use lb_common::{
    BACKEND_NONE, FlowKey, VipInfo,
    hash::flow_hash,
    limits::{CONN_LIMITS_ANY, SPILL_PROBES, SpillSet, spill_candidate},
    stat,
};

use crate::{
    maps::{BACKEND_CONNS, CONN_LIMIT_STATS, CONN_LIMITS, LIMIT_SCRATCH, SPILL_SETS},
    stats::{Exit, Stats, bump, drop},
};

/// Per-CPU state of one decision (`LIMIT_SCRATCH`): the lookup key and what the probes of
/// `spill_cb` need, in map memory because the callback may use no stack (see there).
#[repr(C)]
pub(crate) struct LimitScratch {
    /// The key of the lookup at hand: a backend id, or the service id for `SPILL_SETS`.
    key: u32,
    service_id: u32,
    /// The scheduler's pick.
    pick: u32,
    /// The flow hash that chooses where the walk over the primaries starts.
    hash: u32,
    /// The backend with room the probes found, or `BACKEND_NONE`.
    found: u32,
    /// The limit of the backend at hand, kept across the lookup of its count.
    limit: u32,
}

/// The backend a new flow goes to: `pick` (the scheduler's) unless it is full, else the
/// first backend of the service's spill set with room (`backend_full_spilled`). Refused
/// (`drop_backends_full`) when every one is full. `by_hash` (a mid-flow packet of a flow
/// the table lost, sent by the hash to the backend that most likely holds it) is never
/// moved: moving it would break its connection. A flow's own earlier entry was released
/// before this is asked (`conntrack::backend_for`), so its count is not in the way.
#[inline(always)]
pub(crate) fn room(
    vip: &VipInfo,
    key: &FlowKey,
    pick: u32,
    by_hash: bool,
    stats: Stats,
) -> Result<u32, Exit> {
    if vip.conn_limits & CONN_LIMITS_ANY == 0 || by_hash {
        return Ok(pick);
    }
    // A missing scratch (cannot happen: a one-slot per-CPU array) refuses rather than
    // overloads, since the service asked for limits.
    let s = LIMIT_SCRATCH
        .get_ptr_mut(0)
        .ok_or(drop(stat::DROP_BACKENDS_FULL))?;
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled and
    // nothing else holds a reference to it while this decision runs.
    let s = unsafe { &mut *s };
    s.service_id = vip.service_id;
    s.pick = pick;
    s.found = BACKEND_NONE;
    if has_room(s, pick) {
        return Ok(pick);
    }
    if let Some(count) = CONN_LIMIT_STATS.get_ptr_mut(pick) {
        // SAFETY: this CPU's counter; no concurrent writer (preemption disabled).
        unsafe { *count += 1 };
    }
    s.hash = flow_hash(key);
    // `bpf_loop`, not a loop: the verifier checks the callback once, where it would walk an
    // open loop once per probe for every path into it, past its million instructions.
    let mut scratch: *mut LimitScratch = s;
    // SAFETY: the callback has the signature `bpf_loop` requires; its context points to
    // `scratch`, which lives until `bpf_loop` returns, and the callback reads and writes
    // only this CPU's scratch and reads the maps.
    unsafe {
        bpf_loop(
            SPILL_PROBES,
            spill_cb as *const () as *mut c_void,
            (&raw mut scratch).cast(),
            0,
        );
    }
    match s.found {
        BACKEND_NONE => Err(drop(stat::DROP_BACKENDS_FULL)),
        id => {
            bump(stats, stat::BACKEND_FULL_SPILLED);
            Ok(id)
        }
    }
}

/// One probe (`bpf_loop` callback): the candidate of probe `index`, taken if it has room.
/// 0: go on; 1: stop (found, or no probe that far).
///
/// The callback uses no stack at all: the verifier adds its frame, rounded up to 16 bytes,
/// to the balancer's, which leaves nothing of the 512 bytes of BPF stack. Hence the scratch
/// comes through the context and every lookup key lives in the scratch.
#[inline(never)]
extern "C" fn spill_cb(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `room` passes a pointer to its `*mut LimitScratch`, this CPU's scratch, alive
    // for the whole `bpf_loop`; the verifier tracks the spilled map-value pointer through
    // the caller's stack slot.
    let s = unsafe { &mut **ctx.cast::<*mut LimitScratch>() };
    s.key = s.service_id;
    // SAFETY: a lookup in an array of `SpillSet` with a `u32` key in map memory; the value
    // is only read while the program runs. `Array` is a `#[repr(transparent)]` wrapper of
    // its `bpf_map_def` (aya-ebpf 0.2), so its address is the map's.
    let set = unsafe {
        bpf_map_lookup_elem(
            (&raw const SPILL_SETS).cast_mut().cast(),
            (&raw const s.key).cast(),
        )
        .cast::<SpillSet>()
        .as_ref()
    };
    let Some(id) = set.and_then(|set| spill_candidate(set, s.hash, index as u32)) else {
        return 1;
    };
    if id == s.pick {
        return 0;
    }
    if has_room(s, id) {
        s.found = id;
        return 1;
    }
    0
}

/// Whether backend `id` is below its `max_connections` (or has none). Lookups with keys in the scratch, so that `spill_cb` needs no stack.
#[inline(always)]
fn has_room(s: &mut LimitScratch, id: u32) -> bool {
    s.key = id;
    // SAFETY: lookups in arrays of `u32`, `i64` and `BackendInfo` with a `u32` key in map
    // memory; the values are only read while the program runs (see `spill_cb`).
    unsafe {
        let limit = bpf_map_lookup_elem(
            (&raw const CONN_LIMITS).cast_mut().cast(),
            (&raw const s.key).cast(),
        )
        .cast::<u32>();
        if limit.is_null() || *limit == 0 {
            return true;
        }
        // Kept in memory across the next lookup rather than in a register the call would
        // make the callback spill.
        core::ptr::write_volatile(&raw mut s.limit, *limit);
        let conns = bpf_map_lookup_elem(
            (&raw const BACKEND_CONNS).cast_mut().cast(),
            (&raw const s.key).cast(),
        )
        .cast::<i64>();
        let conns = if conns.is_null() { 0 } else { *conns };
        conns < i64::from(core::ptr::read_volatile(&raw const s.limit))
    }
}
