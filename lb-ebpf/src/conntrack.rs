//! The connection tables (`CONNTRACK`, `HALF_OPEN`), flood mode (`FLOOD_STATE`) and the
//! active-connection counts (`BACKEND_CONNS`): which backend a packet's flow keeps, when the
//! scheduler is asked instead, and when a flow starts and stops counting as an active
//! connection.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    BACKEND_UP, BackendInfo, FLOOD_HOLD_NS, FLOW_CLOSED, FLOW_CONFIRMED, FLOW_COUNTED,
    FLOW_VIA_PORT0, FlowKey, FlowValue, HALF_OPEN_TIMEOUT_NS, LAST_SEEN_GRANULARITY_NS, PROTO_TCP,
    VipInfo, stat,
};

use crate::{
    maps::{BACKEND_CONNS, BACKENDS, CONNTRACK, FLOOD_STATE, GLOBAL, HALF_OPEN},
    nat::EEXIST,
    parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    sched::schedule,
    stats::{Exit, Stats, bump, drop},
};

/// The table entry of a flow, if any.
#[inline(always)]
pub(crate) fn lookup(key: &FlowKey) -> Option<*mut FlowValue> {
    CONNTRACK.get_ptr_mut(key)
}

/// The entry of a flow in either table: established, else half-open (for ICMP errors, which
/// may quote a flow still in its handshake).
#[inline(always)]
pub(crate) fn lookup_any(key: &FlowKey) -> Option<*mut FlowValue> {
    CONNTRACK
        .get_ptr_mut(key)
        .or_else(|| HALF_OPEN.get_ptr_mut(key))
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

/// The backend of a packet's flow, and whether the scheduler picked it (a new flow).
///
/// Flows go through two tables, so that a flood of new or spoofed tuples cannot push out an
/// established connection (README, "Floods"):
/// - `CONNTRACK`, the established flows: a plain hash that never evicts. A packet of a flow
///   it holds, fresh and still honoured (and no bare SYN), keeps the entry's backend.
/// - `HALF_OPEN`, an LRU: a bare SYN, a first UDP datagram, or a mid-flow TCP packet of a flow
///   no table knows asks the scheduler, and its pick waits here. The flow's next packet (the
///   handshake's ACK, a second datagram) moves it to `CONNTRACK`, where it counts as an
///   active connection. Spoofed SYNs only churn this table; they are never counted.
///
/// When `CONNTRACK` is full, a flow stays in `HALF_OPEN`, and the CPU enters flood mode, as it
/// does when its new-flow rate passes `GlobalConfig::flood_threshold`: new flows are then
/// scheduled by the service's consistent hash, which every later packet of the flow finds
/// again without an entry.
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

    if let Some(flow) = entry {
        // SAFETY: a value of the table, valid until this program returns: the table is
        // preallocated, so an entry deleted meanwhile is at worst reused, never freed.
        let f = unsafe { &*flow };
        let expired = timeout_ns != 0 && now.saturating_sub(f.last_seen_ns) > timeout_ns;
        if expired {
            bump(stats, stat::CT_IDLE_EXPIRED);
        } else if !is_syn && let Some(b) = tracked_backend.or_else(|| honoured(f, vip.service_id)) {
            bump(stats, stat::CT_HIT);
            // SAFETY: as above. Plain stores: racing CPUs of one flow write nearly the same
            // time (or the same flag), and the granularity keeps busy flows from writing on
            // every packet; the flag is written once.
            unsafe {
                if now.saturating_sub((*flow).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
                    (*flow).last_seen_ns = now;
                }
                if (*flow).flags & FLOW_CONFIRMED == 0 {
                    (*flow).flags |= FLOW_CONFIRMED;
                }
            }
            if is_end {
                release(flow);
            }
            return Ok((f.backend_id, b, false));
        }
        // Stale (expired, no longer honoured) or a SYN reusing the tuple: the entry goes.
        // The flow starts over in the half-open table; left here, it would shadow it.
        release(flow);
        let _ = CONNTRACK.remove(&p.key);
    }
    bump(stats, stat::CT_MISS);

    // The half-open table: the flow's pick, made by its SYN (or first datagram).
    if !is_syn && let Some(half) = HALF_OPEN.get_ptr_mut(&p.key) {
        // SAFETY: a value of the LRU, preallocated: valid until this program returns.
        let h = unsafe { &*half };
        if now.saturating_sub(h.last_seen_ns) <= HALF_OPEN_TIMEOUT_NS
            && let Some(backend) = honoured(h, vip.service_id)
        {
            let id = h.backend_id;
            let value = FlowValue {
                backend_id: id,
                generation: h.generation,
                last_seen_ns: now,
                // A FIN or RST before anything else: the close goes to the same backend,
                // but it is no active connection (the agent deletes the entry in 10 s).
                flags: if is_end { FLOW_CLOSED } else { FLOW_COUNTED } | (h.flags & FLOW_VIA_PORT0),
            };
            // `BPF_NOEXIST`: of two CPUs establishing one flow at once, one counts it; and a
            // close racing the handshake's ACK on another CPU (a client that connects and
            // resets at once) either lands first, so the ACK finds the entry and counts
            // nothing, or finds the ACK's entry and releases it.
            match CONNTRACK.insert(&p.key, &value, u64::from(BPF_NOEXIST)) {
                Ok(()) => {
                    if !is_end {
                        bump(stats, stat::FLOW_ESTABLISHED);
                        add_conns(id, 1);
                    }
                    let _ = HALF_OPEN.remove(&p.key);
                    return Ok((id, backend, false));
                }
                Err(e) if e == -EEXIST => {
                    if is_end && let Some(theirs) = CONNTRACK.get_ptr_mut(&p.key) {
                        release(theirs);
                    }
                    return Ok((id, backend, false));
                }
                Err(_) => {}
            }
            // Full: the flow keeps its backend through this entry (refreshed), and this
            // CPU's new flows go by the hash, which needs no entry.
            bump(stats, stat::CONNTRACK_FULL);
            enter_flood(now);
            // SAFETY: as above; a plain store of the time, as for `CONNTRACK`.
            unsafe { (*half).last_seen_ns = now };
            return Ok((id, backend, false));
        }
    }

    // A TCP packet that is neither a SYN nor known: it belongs to a connection made before
    // an eviction, an idle expiry or an LB restart. It goes by the hash.
    let midflow = is_tcp && !is_syn;
    if midflow {
        bump(stats, stat::UNTRACKED_MIDFLOW);
    }
    // Source rules before the scheduler: a refused flow takes no round-robin turn, no
    // least-conn count and no entry.
    crate::rules::admit(vip, &p.key)?;
    crate::rate::admit(vip, &p.key, midflow)?;
    let flood = !midflow && in_flood(now);
    if flood {
        bump(stats, stat::FLOOD_HASHED);
    }
    let id = schedule(vip, &p.key, midflow || flood)?;
    let id = crate::maxconn::room(vip, &p.key, id, midflow, stats)?;
    let backend = BACKENDS.get(id).ok_or(drop(stat::DROP_NO_BACKEND))?;
    if !is_rst {
        let value = FlowValue {
            backend_id: id,
            generation: backend.generation,
            last_seen_ns: now,
            flags: if via_port0 { FLOW_VIA_PORT0 } else { 0 },
        };
        // An LRU: a full one evicts its oldest half-open entry, never a connection.
        if HALF_OPEN.insert(&p.key, &value, 0).is_ok() {
            bump(stats, stat::HALF_OPEN_CREATED);
        }
    }
    // A new flow for the per-service and per-backend counters: the scheduler's picks.
    Ok((id, backend, !is_rst))
}

/// Counts a new flow on this CPU and says whether the CPU is in flood mode: its new flows
/// this second passed `GlobalConfig::flood_threshold`, or the connection table was full,
/// within the last `FLOOD_HOLD_NS`. Per CPU: no shared cache line on the new-flow path.
#[inline(always)]
fn in_flood(now: u64) -> bool {
    let Some(state) = FLOOD_STATE.get_ptr_mut(0) else {
        return false;
    };
    let threshold = GLOBAL.get(0).map_or(0, |g| u64::from(g.flood_threshold));
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
    unsafe {
        if now.saturating_sub((*state).window_start_ns) >= 1_000_000_000 {
            (*state).window_start_ns = now;
            (*state).new_flows = 0;
        }
        (*state).new_flows += 1;
        if threshold != 0 && (*state).new_flows > threshold {
            (*state).flood_until_ns = now + FLOOD_HOLD_NS;
        }
        now < (*state).flood_until_ns
    }
}

/// Puts this CPU in flood mode for `FLOOD_HOLD_NS` (the connection table is full).
#[inline(always)]
fn enter_flood(now: u64) {
    if let Some(state) = FLOOD_STATE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { (*state).flood_until_ns = now + FLOOD_HOLD_NS };
    }
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
