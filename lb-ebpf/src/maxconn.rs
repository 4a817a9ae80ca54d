//! Connection limits (`max_connections`, lb-common's `limits`): [`room`] decides whether a
//! new flow may go to the scheduler's pick, or to which other backend of its service, or
//! whether it is refused because every one is full. Tracked flows and mid-flow packets
//! never come here, and a service without limits pays one byte test.

use lb_common::{
    BACKEND_NONE, FLOW_CLOSED, FLOW_COUNTED, FlowKey, FlowValue, VipInfo,
    hash::flow_hash,
    limits::{CONN_LIMITS_ANY, find_room},
    stat,
};

use crate::{
    maps::{BACKEND_CONNS, BACKENDS, CONN_LIMIT_STATS, CONN_LIMITS, SPILL_SETS},
    stats::{Exit, Stats, bump, drop},
};

/// The backend a new flow goes to: `pick` (the scheduler's) unless it is full, else the
/// first backend of the service's spill set with room (`backend_full_spilled`). Refused
/// (`drop_backends_full`) when every one is full. `by_hash` (a mid-flow packet of a flow
/// the table lost, sent by the hash to the backend that most likely holds it) is never
/// moved: moving it would break its connection. `stale`: the flow's own earlier entry,
/// whose count, if it is for the backend asked about, does not make that backend full for
/// this flow (a retransmitted SYN takes its old backend again).
#[inline(always)]
pub(crate) fn room(
    vip: &VipInfo,
    key: &FlowKey,
    pick: u32,
    by_hash: bool,
    stale: Option<*mut FlowValue>,
    stats: Stats,
) -> Result<u32, Exit> {
    if vip.conn_limits & CONN_LIMITS_ANY == 0 || by_hash {
        return Ok(pick);
    }
    // The backend (and generation) the stale entry is counted for, if any.
    let counted = stale.map_or((BACKEND_NONE, 0), |flow| {
        // SAFETY: a live value of the connection table (from this run's lookup), only read.
        let f = unsafe { &*flow };
        if f.flags & (FLOW_COUNTED | FLOW_CLOSED) == FLOW_COUNTED {
            (f.backend_id, f.generation)
        } else {
            (BACKEND_NONE, 0)
        }
    });
    let full = |id: u32| -> bool {
        let limit = CONN_LIMITS.get(id).map_or(0, |l| *l);
        if limit == 0 {
            return false;
        }
        let mut conns = BACKEND_CONNS.get(id).map_or(0, |c| *c);
        if id == counted.0 && BACKENDS.get(id).is_some_and(|b| b.generation == counted.1) {
            conns -= 1;
        }
        conns >= i64::from(limit)
    };
    // A missing set (cannot happen: an array slot per service) spills nowhere.
    let set = SPILL_SETS
        .get(vip.service_id)
        .ok_or(drop(stat::DROP_BACKENDS_FULL))?;
    let chosen = find_room(pick, set, || flow_hash(key), full);
    if chosen != Some(pick)
        && let Some(count) = CONN_LIMIT_STATS.get_ptr_mut(pick)
    {
        // SAFETY: this CPU's counter; no concurrent writer (preemption disabled).
        unsafe { *count += 1 };
    }
    match chosen {
        Some(id) if id == pick => Ok(id),
        Some(id) => {
            bump(stats, stat::BACKEND_FULL_SPILLED);
            Ok(id)
        }
        None => Err(drop(stat::DROP_BACKENDS_FULL)),
    }
}
