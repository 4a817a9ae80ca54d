//! The connection table (`CONNTRACK`) and the active-connection counts (`BACKEND_CONNS`):
//! which backend a packet's flow keeps, when the scheduler is asked instead, and when a
//! flow starts and stops counting as an active connection.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{
    BACKEND_UP, BackendInfo, FLOW_CLOSED, FLOW_COUNTED, FLOW_VIA_PORT0, FlowKey, FlowValue,
    LAST_SEEN_GRANULARITY_NS, PROTO_TCP, VipInfo, stat,
};

use crate::{
    maps::{BACKEND_CONNS, BACKENDS, CONNTRACK},
    parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    sched::schedule,
    stats::{Exit, Stats, bump, drop},
};

/// The table entry of a flow, if any.
#[inline(always)]
pub(crate) fn lookup(key: &FlowKey) -> Option<*mut FlowValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// A packet's service as the pipeline found it.
pub(crate) struct Service<'a> {
    pub(crate) vip: &'a VipInfo,
    /// Matched by the port-0 fallback of the VIP lookup.
    pub(crate) via_port0: bool,
    /// The flow's entry in the table, if any.
    pub(crate) flow: Option<*mut FlowValue>,
    /// The entry's backend, when the service was found through it (then already known to
    /// be honoured for this service).
    pub(crate) tracked: Option<&'static BackendInfo>,
}

/// The backend of a packet's flow: the table's while the entry is fresh and still honoured
/// (and the packet no bare SYN), else the scheduler's pick, which is then recorded. Returns
/// the backend id, the backend, and whether a new table entry was made.
#[inline(always)]
pub(crate) fn backend_for(
    p: &Parsed,
    service: Service<'_>,
    now: u64,
    stats: Stats,
) -> Result<(u32, &'static BackendInfo, bool), Exit> {
    let Service {
        vip,
        via_port0,
        flow: entry,
        tracked: tracked_backend,
    } = service;
    let is_tcp = p.key.proto == PROTO_TCP;
    // A bare SYN always asks the scheduler: a reused 5-tuple is a new connection and may go
    // elsewhere. A RST never creates state.
    let is_syn = is_tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let is_rst = is_tcp && p.tcp_flags & TCP_RST != 0;
    let is_end = is_tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let timeout_s = if is_tcp {
        vip.tcp_idle_timeout_s
    } else {
        vip.udp_idle_timeout_s
    };
    let timeout_ns = u64::from(timeout_s) * 1_000_000_000;

    let mut tracked = None;
    let mut stale = None;
    if let Some(flow) = entry {
        // SAFETY: a value of the table, valid until this program returns: LRU maps are
        // preallocated, so an entry evicted meanwhile is at worst reused, never freed.
        let f = unsafe { &*flow };
        let expired = timeout_ns != 0 && now.saturating_sub(f.last_seen_ns) > timeout_ns;
        if expired {
            bump(stats, stat::CT_IDLE_EXPIRED);
        } else if !is_syn && let Some(b) = tracked_backend.or_else(|| honoured(f, vip.service_id)) {
            tracked = Some((f.backend_id, b, flow));
        }
        if tracked.is_none() {
            stale = Some(flow);
        }
    }
    let mut new_flow = false;
    let (backend_id, backend) = match tracked {
        Some((id, b, flow)) => {
            bump(stats, stat::CT_HIT);
            // SAFETY: as above. A plain store: racing CPUs of one flow write nearly the same
            // time, and the granularity keeps busy flows from writing on every packet.
            unsafe {
                if now.saturating_sub((*flow).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
                    (*flow).last_seen_ns = now;
                }
            }
            if is_end {
                release(flow);
            }
            (id, b)
        }
        None => {
            bump(stats, stat::CT_MISS);
            // A TCP packet that is neither a SYN nor known: it belongs to a connection made
            // before an eviction, an idle expiry or an LB restart. It goes by the hash.
            let midflow = is_tcp && !is_syn;
            if midflow {
                bump(stats, stat::UNTRACKED_MIDFLOW);
            }
            // Source rules before the scheduler: a refused flow takes no round-robin turn,
            // no least-conn count and no entry.
            crate::rules::admit(vip, &p.key)?;
            let picked = schedule(vip, &p.key, midflow)
                .and_then(|id| crate::maxconn::room(vip, &p.key, id, midflow, stale, stats))
                .and_then(|id| {
                    let backend = BACKENDS.get(id).ok_or(drop(stat::DROP_NO_BACKEND))?;
                    Ok((id, backend))
                });
            // A stale entry still counted for the very backend the flow goes to again (a SYN
            // retransmitted, a port reused by the same client) hands its count over to the
            // new entry: releasing it and counting the new one would be two atomic adds
            // that cancel out.
            let hands_over = !is_end
                && !is_rst
                && stale.is_some_and(|flow| {
                    picked
                        .as_ref()
                        .is_ok_and(|(id, backend)| counted_for(flow, *id, backend.generation))
                });
            if let Some(flow) = stale
                && !hands_over
            {
                release(flow);
            }
            let (id, backend) = picked?;
            if !is_rst {
                // A FIN of a flow the table lost (re-picked, evicted, expired) keeps the rest
                // of the close on one backend but is no active connection: it would never be
                // released, so it is not counted.
                let value = FlowValue {
                    backend_id: id,
                    generation: backend.generation,
                    last_seen_ns: now,
                    flags: if is_end { FLOW_CLOSED } else { FLOW_COUNTED }
                        | if via_port0 { FLOW_VIA_PORT0 } else { 0 },
                };
                // A full LRU evicts its oldest entry (the agent reconciles the counts); a
                // failure here only means the next packet asks the scheduler again.
                // Should the insert fail, a handed-over entry stays as it was, counted.
                if CONNTRACK.insert(&p.key, &value, 0).is_ok() && !is_end && !hands_over {
                    add_conns(id, 1);
                }
                new_flow = true;
            }
            (id, backend)
        }
    };
    Ok((backend_id, backend, new_flow))
}

/// Whether an entry counts as an active connection of backend `id` in its `generation`.
#[inline(always)]
fn counted_for(flow: *mut FlowValue, id: u32, generation: u32) -> bool {
    // SAFETY: `flow` points at a live table value (from the lookup in this run).
    let f = unsafe { &*flow };
    f.flags & (FLOW_COUNTED | FLOW_CLOSED) == FLOW_COUNTED
        && f.backend_id == id
        && f.generation == generation
}

/// A backend a tracked flow may keep: still up, still of this service, still the same
/// backend (generation) as when the entry was made.
#[inline(always)]
pub(crate) fn honoured(flow: &FlowValue, service_id: u32) -> Option<&'static BackendInfo> {
    let backend = BACKENDS.get(flow.backend_id)?;
    if backend.state == BACKEND_UP
        && backend.service_id == service_id
        && backend.generation == flow.generation
    {
        Some(backend)
    } else {
        None
    }
}

/// Marks a tracked flow closed and takes it out of its backend's active count. A check then
/// a store, not one atomic step (the default BPF CPU level has no atomic fetch-or): two CPUs
/// ending the same flow at the same instant could both decrement; the agent's periodic
/// reconciliation with the table repairs such drift. A flow of an earlier owner of its
/// backend id (another generation) was never counted for the current owner: only marked.
#[inline(always)]
fn release(flow: *mut FlowValue) {
    // SAFETY: `flow` points at a live table value (from `lookup` in this
    // run); concurrent writers of the same entry are the benign race described above.
    unsafe {
        let flags = (*flow).flags;
        if flags & FLOW_COUNTED != 0 && flags & FLOW_CLOSED == 0 {
            (*flow).flags = flags | FLOW_CLOSED;
            let id = (*flow).backend_id;
            if BACKENDS
                .get(id)
                .is_some_and(|b| b.generation == (*flow).generation)
            {
                add_conns(id, -1);
            }
        }
    }
}

/// Adds to a backend's active-connection count (shared by all CPUs: atomic).
#[inline(always)]
fn add_conns(backend_id: u32, delta: i64) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a value of a shared array, alive while the program runs; updated only with
        // atomic adds (here) or whole writes by the agent's reconciliation.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(c, delta) };
    }
}
