//! The NAT modes (`forwarding = "nat"` and `"fullnat"`, docs/design/nat.md): the NAT
//! connection table `NAT_CT` as the datapath uses it, and fullnat's SNAT port allocation
//! ([`snat_claim`]). A connection is a pair of entries made together (the
//! client's tuple and the backend's reply tuple), each holding the rewrite of its direction:
//! [`established`] finds a packet's entry, whichever way it travels, judges it (honoured,
//! expired) and follows the TCP state in both entries; [`new_flow`] schedules a new
//! connection and makes its pair; [`forward`] rewrites the packet (addresses, ports, TTL,
//! RFC 1624 checksum updates), after every check that could refuse it, and sends it on.
//!
//! Rules (also in the crate documentation and the README): a reply candidate (a packet from
//! a `nat` backend's address) is never dropped before its table hit; the balancer is an IP
//! hop (TTL / hop limit decremented, a packet that would leave with 0 dropped); a packet that
//! cannot be translated safely is dropped and counted, never forwarded half-rewritten; live
//! pairs are never evicted (a full table refuses new connections).
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32,
        generated::{bpf_fib_lookup, bpf_loop, bpf_map_lookup_elem},
    },
    programs::XdpContext,
};
use lb_common::{
    BACKEND_UP, BackendInfo, FAMILY_V4, FLOW_CLOSED, FLOW_COUNTED, FORWARD_FULLNAT, FlowKey,
    GlobalConfig, LAST_SEEN_GRANULARITY_NS, NEXT_HOP_TTL_NS, NextHop, PROTO_TCP, PROTO_UDP,
    VipInfo, forwarding_is_nat,
    headers::{ETH_HDR_LEN, IPV4_HDR_LEN, IPV6_HDR_LEN},
    nat::{
        DIR_FORWARD, DIR_REPLY, MAX_SNAT_ADDRS, NAT_NO_SNAT, NAT_PICKED_UP, NAT_REPLIED, NAT_REPLY,
        NAT_STATE_FLAGS, NAT_TCP_CLOSE, NAT_TCP_ESTABLISHED, NAT_TCP_NONE, NAT_TCP_SYN_SENT,
        NAT_TCP_TIME_WAIT, NatEntry, SNAT_PROBES, SnatSource, addr_delta, csum_apply, csum_delta,
        fold, snat_probe, tcp_next, tcp_timeout, ttl_delta, udp_timeout, word_delta,
    },
    stat,
};

use crate::{
    forward::{egress, nexthop::tunnel_source, write_macs},
    maps::{BACKEND_CONNS, BACKENDS, NAT_CT, NAT_SCRATCH, NEXT_HOPS, SERVICES, SNAT_POOL, STATS},
    parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    sched::schedule,
    stats::{Exit, Stats, bump, drop},
};

/// `Parsed::nat`: the destination may be a NAT service's VIP (`NAT_CT` is asked first).
pub(crate) const NAT_DST: u8 = 1;
/// `Parsed::nat`: the source may be a `nat` backend (a reply candidate; not ours unless
/// `NAT_CT` says so).
pub(crate) const NAT_SRC: u8 = 2;

/// `EEXIST`: a `BPF_NOEXIST` insert whose key another CPU inserted first.
pub(crate) const EEXIST: i32 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Per-CPU room for what does not fit the balancer's 512-byte stack: the two entries and
/// the reply key of a pair under construction, and the FIB lookup's parameters of the
/// reply path (`bpf_fib_lookup` takes any memory, map values included).
#[repr(C)]
pub(crate) struct NatScratch {
    fwd: NatEntry,
    reply: NatEntry,
    reply_key: FlowKey,
    /// The key of the partner being looked up or deleted.
    partner: FlowKey,
    fib: FibParams,
    /// The flow an ICMP error quotes, reversed (`inbound`, `nat_icmp`).
    pub(crate) icmp_flow: FlowKey,
    probe: SnatProbe,
}

/// What `established` and `new_flow` found: the packet's service, backend and rewrite. The
/// caller makes the one `Job` of the packet from it (each `Job` built elsewhere would take
/// its own stack slots).
pub(crate) struct Pick {
    pub(crate) vip: &'static VipInfo,
    pub(crate) backend_id: u32,
    pub(crate) backend: &'static BackendInfo,
    pub(crate) new_flow: bool,
    pub(crate) counter: u32,
    pub(crate) nat: *mut NatEntry,
}

/// This CPU's scratch.
#[inline(always)]
pub(crate) fn scratch() -> Option<&'static mut NatScratch> {
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled, and
    // no two references to it are used at once (each user takes its own fields).
    NAT_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// The partner of `key`'s entry `e`, looked up with its key built in the scratch (a
/// 40-byte key per lookup site would not fit the stack).
#[inline(always)]
pub(crate) fn partner_of(key: &FlowKey, e: *const NatEntry) -> Option<*mut NatEntry> {
    let s = scratch()?;
    // SAFETY: a live value of `NAT_CT` or the scratch's forward entry.
    write_partner(&mut s.partner, key, unsafe { &*e });
    NAT_CT.get_ptr_mut(&s.partner)
}

/// `NatEntry::partner_key`, written field by field into `out`.
#[inline(always)]
fn write_partner(out: &mut FlowKey, key: &FlowKey, e: &NatEntry) {
    out.src_addr = e.new_dst_addr;
    out.dst_addr = e.new_src_addr;
    out.src_port_be = e.new_dst_port_be;
    out.dst_port_be = e.new_src_port_be;
    out.proto = key.proto;
    out.family = key.family;
    out._pad = [0; 2];
}

/// The entry of a packet's tuple in either direction, judged: `Ok(Some(job))` to translate
/// and forward, `Ok(None)` for a forward packet with no usable pair (the caller treats it
/// as new; a pair that was found but expired or not honoured is deleted first), `Err` for a
/// reply that must not go on (its pair is stale: it would reach the client untranslated).
#[inline(always)]
pub(crate) fn established(p: &Parsed, now: u64, stats: Stats) -> Result<Option<Pick>, Exit> {
    let Some(entry) = NAT_CT.get_ptr_mut(&p.key) else {
        return Ok(None);
    };
    // SAFETY: a value of `NAT_CT`, valid until this program returns: a deleted element's
    // memory is freed only after an RCU grace period, never while the program runs.
    let e = unsafe { &mut *entry };
    let reply = e.flags & NAT_REPLY != 0;
    let gone = || {
        if reply {
            Err(drop(stat::DROP_NAT_STALE))
        } else {
            Ok(None)
        }
    };
    let Some((vip, backend)) = honoured(e) else {
        delete_pair(&p.key, entry);
        return gone();
    };
    if e.idle(now) {
        // The pair lives while either direction is fresh (one side may be silent for long).
        let partner = partner_of(&p.key, entry);
        // SAFETY: as above.
        if partner.is_some_and(|q| unsafe { !(*q).idle(now) }) {
            e.last_seen_ns = now;
        } else {
            delete_pair(&p.key, entry);
            bump(stats, stat::NAT_RECLAIMED_INLINE);
            return gone();
        }
    }
    let dir = if reply { DIR_REPLY } else { DIR_FORWARD };
    if p.key.proto == PROTO_TCP {
        let flags = p.tcp_flags;
        // A bare SYN on a closed pair: the client reuses its port for a new connection.
        if !reply
            && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && (e.tcp_state == NAT_TCP_TIME_WAIT || e.tcp_state == NAT_TCP_CLOSE)
        {
            delete_pair(&p.key, entry);
            return Ok(None);
        }
        if flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || e.tcp_state != NAT_TCP_ESTABLISHED {
            let (state, state_flags) = tcp_next(e.tcp_state, dir, flags, e.flags);
            let partner = partner_of(&p.key, entry);
            if state != e.tcp_state || state_flags != e.flags & NAT_STATE_FLAGS {
                let timeout_s = tcp_timeout(state, vip.tcp_idle_timeout_s);
                set_state(entry, state, state_flags, timeout_s);
                if let Some(q) = partner {
                    set_state(q, state, state_flags, timeout_s);
                }
            }
            if flags & (TCP_FIN | TCP_RST) != 0 {
                if !reply {
                    release(entry);
                } else if let Some(q) = partner {
                    release(q);
                }
            }
        }
    } else if reply && e.flags & NAT_REPLIED == 0 {
        let state_flags = (e.flags & NAT_STATE_FLAGS) | NAT_REPLIED;
        let timeout_s = udp_timeout(state_flags, vip.udp_idle_timeout_s);
        set_state(entry, NAT_TCP_NONE, state_flags, timeout_s);
        if let Some(q) = partner_of(&p.key, entry) {
            set_state(q, NAT_TCP_NONE, state_flags, timeout_s);
        }
    }
    // A plain store, as for the DSR table: racing CPUs write nearly the same time.
    if now.saturating_sub(e.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        e.last_seen_ns = now;
    }
    Ok(Some(Pick {
        vip,
        backend_id: e.backend_id,
        backend,
        new_flow: false,
        counter: if reply {
            stat::NAT_REPLY
        } else {
            stat::NAT_FORWARD
        },
        nat: entry,
    }))
}

/// The service and backend of a pair the datapath still honours: the backend up, of the
/// same generation, its service present and still a NAT one (`nat` and `fullnat` never
/// share a service: a change between them gives the backends new generations).
#[inline(always)]
pub(crate) fn honoured(e: &NatEntry) -> Option<(&'static VipInfo, &'static BackendInfo)> {
    let backend = BACKENDS.get(e.backend_id)?;
    if backend.state != BACKEND_UP || backend.generation != e.generation {
        return None;
    }
    let vip = SERVICES.get(backend.service_id)?;
    (vip.service_id == backend.service_id
        && vip.ring_size != 0
        && forwarding_is_nat(vip.forwarding))
    .then_some((vip, backend))
}

/// Writes a pair member's TCP state, state flags and timeout (plain stores: two CPUs racing
/// on one pair leave it at worst one step behind, corrected by the next such packet).
#[inline(always)]
fn set_state(entry: *mut NatEntry, state: u8, state_flags: u64, timeout_s: u32) {
    // SAFETY: a live value of `NAT_CT` (see `established`).
    unsafe {
        (*entry).tcp_state = state;
        (*entry).flags = ((*entry).flags & !NAT_STATE_FLAGS) | state_flags;
        (*entry).timeout_s = timeout_s;
    }
}

/// Deletes both entries of the pair of `key` (whose entry is `entry`), releasing the pair's
/// active-connection count first.
#[inline(always)]
fn delete_pair(key: &FlowKey, entry: *mut NatEntry) {
    // SAFETY: a live value of `NAT_CT` (see `established`).
    let reply = unsafe { (*entry).flags } & NAT_REPLY != 0;
    let partner = partner_of(key, entry);
    if !reply {
        release(entry);
    } else if let Some(q) = partner {
        release(q);
    }
    if let Some(s) = scratch() {
        let _ = NAT_CT.remove(&s.partner);
    }
    let _ = NAT_CT.remove(key);
}

/// Marks a forward entry closed and takes it out of its backend's active count (the same
/// rules and the same benign race as `conntrack::release`).
#[inline(always)]
fn release(entry: *mut NatEntry) {
    // SAFETY: a live value of `NAT_CT`.
    unsafe {
        let flags = (*entry).flags;
        if flags & FLOW_COUNTED != 0 && flags & FLOW_CLOSED == 0 {
            (*entry).flags = flags | FLOW_CLOSED;
            let id = (*entry).backend_id;
            if BACKENDS
                .get(id)
                .is_some_and(|b| b.generation == (*entry).generation)
            {
                add_conns(id, -1);
            }
        }
    }
}

#[inline(always)]
fn add_conns(backend_id: u32, delta: i64) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a value of a shared array; updated only atomically or whole by the agent.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(c, delta) };
    }
}

/// Fills `out` with the rewrite of packets whose tuple is `key` to `new_src:sport →
/// new_dst:dport`, its checksum deltas included. Field by field into per-CPU memory:
/// a whole value built on the stack would not fit there.
#[inline(always)]
fn fill(
    out: &mut NatEntry,
    key: &FlowKey,
    new_src: &[u8; 16],
    new_dst: &[u8; 16],
    new_sport_be: u16,
    new_dport_be: u16,
) {
    out.new_src_addr = *new_src;
    out.new_dst_addr = *new_dst;
    out.new_src_port_be = new_sport_be;
    out.new_dst_port_be = new_dport_be;
    set_deltas(out, key);
    out.hop_ifindex = 0;
    out.hop_expires_ns = 0;
    out.hop_smac = [0; 6];
    out.hop_dmac = [0; 6];
    out.hop_mtu = 0;
    out.snat_slot = NAT_NO_SNAT;
}

/// Computes `out`'s checksum deltas from its rewrite fields, for packets whose tuple is `key`.
#[inline(always)]
fn set_deltas(out: &mut NatEntry, key: &FlowKey) {
    let (ip, l4) = csum_delta(
        key,
        &out.new_src_addr,
        &out.new_dst_addr,
        out.new_src_port_be,
        out.new_dst_port_be,
    );
    out.ip_csum_delta_ne = ip;
    out.l4_csum_delta_ne = l4;
}

/// A packet for a NAT service that has no pair: the scheduler's pick (every scheduler,
/// weights, backup, slow start and drain as for DSR), and a new pair, inserted reply key
/// first (the claim of the reply tuple), then the forward key. A RST never makes state: it
/// is translated by the service's hash without a pair. A TCP packet that is no SYN is picked
/// up by the hash, as DSR does (the pair is made ESTABLISHED, `NAT_PICKED_UP`). In
/// `fullnat` both are dropped instead (`drop_nat_untracked_midflow`): the SNAT port the
/// backend knows the connection by cannot be known, and the source of a new pair is the
/// SNAT port [`snat_claim`] finds.
#[inline(always)]
pub(crate) fn new_flow(
    p: &Parsed,
    vip: &'static VipInfo,
    now: u64,
    stats: Stats,
) -> Result<Pick, Exit> {
    let is_tcp = p.key.proto == PROTO_TCP;
    let flags = p.tcp_flags;
    let is_syn = is_tcp && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let is_rst = is_tcp && flags & TCP_RST != 0;
    let is_end = is_tcp && flags & (TCP_FIN | TCP_RST) != 0;
    let midflow = is_tcp && !is_syn;
    let full = vip.forwarding == FORWARD_FULLNAT;
    if full && midflow {
        return Err(drop(stat::DROP_NAT_UNTRACKED_MIDFLOW));
    }
    if midflow {
        bump(stats, stat::UNTRACKED_MIDFLOW);
    }
    crate::rules::admit(vip, &p.key)?;
    crate::rate::admit(vip, &p.key, midflow)?;
    let id = schedule(vip, &p.key, midflow)?;
    let id = crate::maxconn::room(vip, &p.key, id, midflow, stats)?;
    let backend = BACKENDS.get(id).ok_or(drop(stat::DROP_NO_BACKEND))?;
    if backend.family != p.key.family {
        return Err(drop(stat::DROP_FAMILY));
    }
    let s = scratch().ok_or(drop(stat::DROP_NAT_TABLE_FULL))?;
    let dport = if backend.port_be != 0 {
        backend.port_be
    } else {
        p.key.dst_port_be
    };
    let (state, state_flags) = if is_syn {
        (NAT_TCP_SYN_SENT, 0)
    } else if is_tcp {
        tcp_next(NAT_TCP_ESTABLISHED, DIR_FORWARD, flags, 0)
    } else {
        (NAT_TCP_NONE, 0)
    };
    let timeout_s = if is_tcp {
        tcp_timeout(state, vip.tcp_idle_timeout_s)
    } else {
        udp_timeout(0, vip.udp_idle_timeout_s)
    };
    let common = state_flags | if midflow { NAT_PICKED_UP } else { 0 };

    fill(
        &mut s.fwd,
        &p.key,
        &p.key.src_addr,
        &backend.addr,
        p.key.src_port_be,
        dport,
    );
    s.fwd.backend_id = id;
    s.fwd.generation = backend.generation;
    s.fwd.last_seen_ns = now;
    s.fwd.flags = common | if is_end { FLOW_CLOSED } else { FLOW_COUNTED };
    s.fwd.timeout_s = timeout_s;
    s.fwd.tcp_state = state;

    let mut job = Pick {
        vip,
        backend_id: id,
        backend,
        new_flow: false,
        counter: stat::NAT_FORWARD,
        nat: &raw mut s.fwd,
    };
    if is_rst {
        return Ok(job);
    }

    s.reply.backend_id = id;
    s.reply.generation = backend.generation;
    s.reply.last_seen_ns = now;
    s.reply.flags = common | NAT_REPLY;
    s.reply.timeout_s = timeout_s;
    s.reply.tcp_state = state;
    if full {
        snat_claim(p, vip, s, now, stats)?;
    } else {
        claim(p, s, now, stats)?;
    }
    match NAT_CT.insert(&p.key, &s.fwd, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            bump(stats, stat::NAT_PAIRS_CREATED);
            if !is_end {
                add_conns(id, 1);
            }
            job.new_flow = true;
            Ok(job)
        }
        Err(e) => {
            let _ = NAT_CT.remove(&s.reply_key);
            if e != -EEXIST {
                return Err(drop(stat::DROP_NAT_TABLE_FULL));
            }
            // The same first packet on another CPU made the pair first: use that one.
            let theirs = NAT_CT
                .get_ptr_mut(&p.key)
                .ok_or(drop(stat::DROP_NAT_TABLE_FULL))?;
            // SAFETY: a live value of `NAT_CT`.
            let (their_id, their_backend) = honoured(unsafe { &*theirs })
                .map(|(_, b)| (unsafe { (*theirs).backend_id }, b))
                .ok_or(drop(stat::DROP_NAT_STALE))?;
            job.backend_id = their_id;
            job.backend = their_backend;
            job.nat = theirs;
            Ok(job)
        }
    }
}

/// `nat`: claims the reply tuple of the pair in the scratch (backend → client, fixed by the
/// forward rewrite): the reply key inserted if absent, after at most one in-line reclaim of
/// an expired pair holding it.
#[inline(always)]
fn claim(p: &Parsed, s: &mut NatScratch, now: u64, stats: Stats) -> Result<(), Exit> {
    write_partner(&mut s.reply_key, &p.key, &s.fwd);
    reply_rewrite(p, s);
    let mut claimed = NAT_CT.insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST));
    if claimed == Err(-EEXIST)
        && let Some(old) = NAT_CT.get_ptr_mut(&s.reply_key)
        && pair_expired(&s.reply_key, old, now)
    {
        // One in-line reclaim: a table of expired pairs recovers without the agent.
        delete_pair(&s.reply_key, old);
        bump(stats, stat::NAT_RECLAIMED_INLINE);
        claimed = NAT_CT.insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST));
    }
    match claimed {
        Ok(()) => Ok(()),
        // The same client address and port already talk to this backend address and port,
        // through another service: the two pairs would share a reply tuple.
        Err(e) if e == -EEXIST => Err(drop(stat::DROP_NAT_COLLISION)),
        Err(_) => Err(drop(stat::DROP_NAT_TABLE_FULL)),
    }
}

/// The reply entry's rewrite (to VIP:port → client:port) for the reply key in the scratch.
#[inline(always)]
fn reply_rewrite(p: &Parsed, s: &mut NatScratch) {
    fill(
        &mut s.reply,
        &s.reply_key,
        &p.key.dst_addr,
        &p.key.src_addr,
        p.key.dst_port_be,
        p.key.src_port_be,
    );
}

/// `fullnat`: finds a free SNAT source for the pair in the scratch and claims it. Probe `i`
/// tries the pool slot and port of `snat_probe` (addresses spread from a random start,
/// ports linear from another); the claim of a (SNAT address, port) towards this backend
/// endpoint is the `BPF_NOEXIST` insert of its reply key, atomic under the table's bucket
/// lock, so two CPUs can never take one tuple: the loser moves on to its next probe. Every
/// slot of a service carries the agent's one range; slot 0's is read. After `SNAT_PROBES`
/// taken ports (every port, when the pool is that small) one expired pair on the first
/// probe's tuple is reclaimed in line; else the connection is refused
/// (`drop_snat_exhausted`). A live tuple is never reused: its reply key exists until its
/// pair is deleted, and only expired or no longer honoured pairs are. On success the
/// forward entry's source (address, port, slot) and checksum deltas are set.
#[inline(always)]
fn snat_claim(
    p: &Parsed,
    vip: &VipInfo,
    s: &mut NatScratch,
    now: u64,
    stats: Stats,
) -> Result<(), Exit> {
    let base = vip.service_id.wrapping_mul(MAX_SNAT_ADDRS);
    let range = SNAT_POOL.get(base).ok_or(drop(stat::DROP_SNAT_EXHAUSTED))?;
    let first = u32::from(range.first_port_host);
    let ports = u32::from(range.port_count);
    let count = u32::from(vip.snat_count);
    if count == 0 || count > MAX_SNAT_ADDRS || ports == 0 {
        return Err(drop(stat::DROP_SNAT_EXHAUSTED));
    }
    // SAFETY: a helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    // The reply key and entry whole, once; each probe then writes only what depends on the
    // SNAT source (the key's destination, the entry's checksum deltas, its slot).
    write_partner(&mut s.reply_key, &p.key, &s.fwd);
    reply_rewrite(p, s);
    s.probe = SnatProbe {
        base,
        h: r.rotate_left(16),
        r,
        count,
        ports,
        first,
        // The reply's source change (backend -> VIP), the same for every probe.
        fixed: if p.key.family == FAMILY_V4 {
            addr_delta(0, &s.reply_key.src_addr, &p.key.dst_addr, 4)
        } else {
            addr_delta(0, &s.reply_key.src_addr, &p.key.dst_addr, 16)
        },
        outcome: -EEXIST,
        slot: 0,
        offset: 0,
        pool_index: 0,
    };
    let probes = if count * ports < SNAT_PROBES {
        count * ports
    } else {
        SNAT_PROBES
    };
    // `bpf_loop`, not a loop: the verifier checks the callback once for any probe number,
    // where it walks an open loop once per probe for every path into it, far past its
    // limit of a million instructions.
    // The callback's context is the scratch pointer, so that the callback needs no lookup
    // of its own, whose key would take its stack (see `snat_probe_cb`).
    let mut scratch_ptr: *mut NatScratch = s;
    // SAFETY: the callback has the signature `bpf_loop` requires; its context points to
    // `scratch_ptr`, which lives until `bpf_loop` returns, and the callback reads and writes
    // only this CPU's scratch and the maps.
    unsafe {
        bpf_loop(
            probes,
            snat_probe_cb as *const () as *mut c_void,
            (&raw mut scratch_ptr).cast(),
            0,
        );
    }
    match s.probe.outcome {
        0 => {
            snat_won(p, s);
            return Ok(());
        }
        e if e == -EEXIST => {}
        _ => return Err(drop(stat::DROP_NAT_TABLE_FULL)),
    }
    // Every probe taken: one expired pair on the first probe's tuple is reclaimed in line.
    if snat_candidate(s, 0).is_some()
        && let Some(old) = NAT_CT.get_ptr_mut(&s.reply_key)
        && pair_expired(&s.reply_key, old, now)
    {
        delete_pair(&s.reply_key, old);
        bump(stats, stat::NAT_RECLAIMED_INLINE);
        if NAT_CT
            .insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            snat_won(p, s);
            return Ok(());
        }
    }
    Err(drop(stat::DROP_SNAT_EXHAUSTED))
}

/// The parameters of a pair's SNAT probes (`snat_claim`), in the scratch for the `bpf_loop`
/// callback, which sees nothing of its caller.
#[repr(C)]
pub(crate) struct SnatProbe {
    /// The service's first `SNAT_POOL` index.
    base: u32,
    /// Random starts of the address and the port walks.
    h: u32,
    r: u32,
    /// SNAT addresses, ports per address, first port (host order).
    count: u32,
    ports: u32,
    first: u32,
    /// The unfolded checksum sum of the reply's source rewrite (backend -> VIP).
    fixed: u32,
    /// The last claim's result: 0 claimed, `-EEXIST` taken, another error: stop.
    outcome: i32,
    /// The probe under way: its pool slot and port offset.
    slot: u32,
    offset: u32,
    /// The probe's `SNAT_POOL` index: the key of its lookup, which must not be on the
    /// callback's stack (see `snat_candidate`).
    pool_index: u32,
}

/// One SNAT probe (`bpf_loop` callback): the candidate of probe `index` claimed by the
/// `BPF_NOEXIST` insert of its reply key. 0: go on (taken); 1: stop (claimed or failed).
///
/// The callback uses no stack at all: the verifier adds its frame, rounded up to 16 bytes,
/// to the balancer's (rounded likewise), and the balancer's own 504 bytes leave nothing for
/// it within the 512 bytes of BPF stack. Hence the scratch comes through the context (a
/// lookup would put its key on the stack), and every map key lives in the scratch.
#[inline(never)]
extern "C" fn snat_probe_cb(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `snat_claim` passes a pointer to its `*mut NatScratch`, this CPU's scratch
    // (checked non-null there), alive for the whole `bpf_loop`; the verifier tracks the
    // spilled map-value pointer through the caller's stack slot.
    let s = unsafe { &mut **ctx.cast::<*mut NatScratch>() };
    if snat_candidate(s, index as u32).is_none() {
        s.probe.outcome = -EEXIST;
        return 1;
    }
    let outcome = match NAT_CT.insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST)) {
        Ok(()) => 0,
        Err(e) => e,
    };
    s.probe.outcome = outcome;
    i64::from(outcome != -EEXIST)
}

/// Writes probe `i`'s SNAT source into the scratch's reply key (its destination) and reply
/// entry (its checksum deltas, as `csum_delta` computes them, and its pool slot). `None`:
/// the pool slot is missing.
#[inline(always)]
fn snat_candidate(s: &mut NatScratch, i: u32) -> Option<()> {
    // Fields read one by one: a copy of the whole would take the callback's stack, which
    // adds to the balancer's own (at most 512 bytes together).
    let (slot, offset) = snat_probe(s.probe.h, s.probe.r, i, s.probe.count, s.probe.ports);
    // Kept in memory across the pool lookup rather than in registers the call would make
    // the callback spill: the balancer leaves it at most 16 bytes of stack.
    // SAFETY: plain stores to and loads from this CPU's scratch.
    unsafe {
        core::ptr::write_volatile(&raw mut s.probe.slot, slot);
        core::ptr::write_volatile(&raw mut s.probe.offset, offset);
    }
    s.probe.pool_index = s.probe.base + slot;
    // The key from the scratch, not the stack (see `snat_probe_cb`). `Array` is a
    // `#[repr(transparent)]` wrapper of its `bpf_map_def` (aya-ebpf 0.2), so its address is
    // the map's, which the loader relocates.
    // SAFETY: a lookup in an array of `SnatSource` with a `u32` key in map memory; the
    // value is read only while the program runs.
    let src = unsafe {
        bpf_map_lookup_elem(
            (&raw const SNAT_POOL).cast_mut().cast(),
            (&raw const s.probe.pool_index).cast(),
        )
        .cast::<SnatSource>()
        .as_ref()
    }?;
    // SAFETY: as above.
    let (slot, offset) = unsafe {
        (
            core::ptr::read_volatile(&raw const s.probe.slot),
            core::ptr::read_volatile(&raw const s.probe.offset),
        )
    };
    // Aligned 32-bit words, read one at a time: byte-wise copies and sums (the fields are
    // byte arrays) keep so many values alive that the callback spills past the stack the
    // balancer leaves it.
    let (addr, client) = (
        src.addr.as_ptr().cast::<u32>(),
        s.reply.new_dst_addr.as_ptr().cast::<u32>(),
    );
    let key_addr = s.reply_key.dst_addr.as_mut_ptr().cast::<u32>();
    let v4 = s.reply_key.family == FAMILY_V4;
    // SAFETY: the addresses are at offsets that are multiples of 4 in map values (8-byte
    // aligned): `SnatSource::addr` at 0, `NatScratch::reply.new_dst_addr` at 112,
    // `NatScratch::reply_key.dst_addr` at 208; 4 words each.
    let sum = unsafe {
        let mut w = 0;
        while w < 4 {
            key_addr.add(w).write_volatile(addr.add(w).read_volatile());
            w += 1;
        }
        if v4 {
            addr_sum32(addr, client, 1)
        } else {
            addr_sum32(addr, client, 4)
        }
    };
    s.reply_key.dst_port_be = ((s.probe.first + offset) as u16).to_be();
    let addrs = u32::from(fold(s.probe.fixed + u32::from(fold64(sum))));
    s.reply.ip_csum_delta_ne = if v4 { fold(addrs + ttl_delta()) } else { 0 };
    s.reply.l4_csum_delta_ne = fold(
        addrs
            + word_delta(s.reply_key.src_port_be, s.reply.new_src_port_be)
            + word_delta(s.reply_key.dst_port_be, s.reply.new_dst_port_be),
    );
    s.reply.snat_slot = slot as u8;
    Some(())
}

/// `~old + new` over the first `words` 32-bit words of two addresses (native order), as an
/// unfolded one's-complement sum: the same sum as over their 16-bit words (RFC 1071 §2).
///
/// # Safety
/// Both pointers are valid and 4-byte aligned for `words` words.
#[inline(always)]
unsafe fn addr_sum32(old: *const u32, new: *const u32, words: usize) -> u64 {
    let mut sum = 0u64;
    let mut w = 0;
    while w < words && w < 4 {
        // SAFETY: as the caller promises.
        unsafe {
            sum += u64::from(!old.add(w).read_volatile()) + u64::from(new.add(w).read_volatile());
        }
        w += 1;
    }
    sum
}

/// A 64-bit one's-complement sum folded to 16 bits.
#[inline(always)]
fn fold64(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    fold(s as u32)
}

/// The claimed source into the forward entry: its new source, checksum deltas and slot.
#[inline(always)]
fn snat_won(p: &Parsed, s: &mut NatScratch) {
    s.fwd.new_src_addr = s.reply_key.dst_addr;
    s.fwd.new_src_port_be = s.reply_key.dst_port_be;
    set_deltas(&mut s.fwd, &p.key);
    s.fwd.snat_slot = s.reply.snat_slot;
}

/// Whether the pair of an existing entry is expired: the entry idle past its timeout, and
/// its partner too (or absent).
#[inline(always)]
fn pair_expired(key: &FlowKey, entry: *mut NatEntry, now: u64) -> bool {
    // SAFETY: a live value of `NAT_CT`.
    if unsafe { !(*entry).idle(now) } {
        return false;
    }
    // SAFETY: as above.
    partner_of(key, entry).is_none_or(|q| unsafe { (*q).idle(now) })
}

/// Rewrites a packet of a NAT pair (`entry`: the rewrite of its direction) and sends it
/// towards its new destination: forward packets by the backend's cached next hop (as DSR),
/// replies by the hop cached in their entry. Every check comes before the first write.
#[inline(always)]
pub(crate) fn forward(
    ctx: &XdpContext,
    p: &Parsed,
    entry: *mut NatEntry,
    global: &GlobalConfig,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<u32, Exit> {
    // SAFETY: a live value of `NAT_CT` or this CPU's scratch entry.
    let e = unsafe { &*entry };
    let v4 = p.key.family == FAMILY_V4;
    let l3 = p.l2_len;
    let (ip_hdr_len, ttl_at) = if v4 {
        let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l3).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
        // SAFETY: `ptr_at` checked the fixed header is in the packet.
        ((unsafe { ((*ip)[0] & 0x0f) as usize } * 4), 8)
    } else {
        (IPV6_HDR_LEN, 7)
    };
    let ttl: *mut u8 = ptr_at(ctx, l3 + ttl_at).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
    // SAFETY: `ptr_at` checked the byte is in the packet.
    if unsafe { *ttl } <= 1 {
        return Err(drop(stat::DROP_TTL));
    }
    let l4 = l3 + ip_hdr_len;
    let csum_at = if p.key.proto == PROTO_UDP { 6 } else { 16 };
    let l4_csum: *mut [u8; 2] = ptr_at(ctx, l4 + csum_at).ok_or(drop(stat::DROP_TRUNC_L4))?;
    // SAFETY: `ptr_at` checked the two bytes are in the packet.
    let old_l4 = u16::from_ne_bytes(unsafe { *l4_csum });
    let udp = p.key.proto == PROTO_UDP;
    if udp && old_l4 == 0 && !v4 {
        // IPv6 UDP must carry a checksum (RFC 8200 §8.1): nothing sound to update.
        return Err(drop(stat::DROP_NAT_UNTRANSLATABLE));
    }
    let ports: *mut [u8; 4] = ptr_at(ctx, l4).ok_or(drop(stat::DROP_TRUNC_L4))?;

    // The next hop, before any write: a failed lookup leaves the packet as it came.
    let reply = e.flags & NAT_REPLY != 0;
    let mut to_kernel = false;
    let (ifindex, smac, dmac) = if reply {
        match reply_hop(ctx, entry, p.key.family, now) {
            HOP_OK => {}
            HOP_NO_NEIGH => to_kernel = true,
            _ => return Err(drop(stat::DROP_FIB)),
        }
        (e.hop_ifindex, e.hop_smac, e.hop_dmac)
    } else {
        backend_hop(ctx, global, backend_id, backend, now)?
    };

    // Nothing below can fail: the packet is rewritten whole or not at all.
    // SAFETY: every pointer was checked by `ptr_at` above; packet memory is writable in
    // XDP, and no other reference to it is alive.
    unsafe {
        if v4 {
            let ip: *mut [u8; IPV4_HDR_LEN] = ptr_at(ctx, l3).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
            let ip = &mut *ip;
            ip[8] -= 1;
            let check = u16::from_ne_bytes([ip[10], ip[11]]);
            ip[10..12].copy_from_slice(&csum_apply(check, e.ip_csum_delta_ne).to_ne_bytes());
            write_word(ip, 12, &e.new_src_addr, 0);
            write_word(ip, 16, &e.new_dst_addr, 0);
        } else {
            let ip: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, l3).ok_or(drop(stat::DROP_TRUNC_IPV6))?;
            let ip = &mut *ip;
            ip[7] -= 1;
            let mut i = 0;
            while i < 4 {
                write_word(ip, 8 + 4 * i, &e.new_src_addr, 4 * i);
                write_word(ip, 24 + 4 * i, &e.new_dst_addr, 4 * i);
                i += 1;
            }
        }
        let ports = &mut *ports;
        ports[0..2].copy_from_slice(&e.new_src_port_be.to_ne_bytes());
        ports[2..4].copy_from_slice(&e.new_dst_port_be.to_ne_bytes());
        // IPv4 UDP without a checksum (0) keeps none; a computed UDP 0 is sent as 0xffff
        // (RFC 768: 0 means "no checksum").
        if !(udp && old_l4 == 0) {
            let mut c = csum_apply(old_l4, e.l4_csum_delta_ne);
            if udp && c == 0 {
                c = 0xffff;
            }
            *l4_csum = c.to_ne_bytes();
        }
    }
    if to_kernel {
        // The frame keeps its MAC addresses (to this host): the kernel forwards it, with
        // its own TTL decrement on top, and resolves the neighbour for the next packets.
        // Translated all the same: counted as such (`Job::counter`) and as handed over.
        bump(STATS.get_ptr_mut(0), stat::NAT_TO_KERNEL);
        return Ok(xdp_action::XDP_PASS);
    }
    write_macs(ctx, &smac, &dmac)?;
    egress(ctx, ifindex, p.l2_len != ETH_HDR_LEN)
}

/// Writes the 32-bit word at `from` of `addr` to byte `at` of a header, as one word.
#[inline(always)]
pub(crate) fn write_word<const N: usize>(
    hdr: &mut [u8; N],
    at: usize,
    addr: &[u8; 16],
    from: usize,
) {
    if let (Some(dst), Some(src)) = (hdr.get_mut(at..at + 4), addr.get(from..from + 4))
        && let Ok(w) = <[u8; 4]>::try_from(src)
    {
        dst.copy_from_slice(&u32::from_ne_bytes(w).to_ne_bytes());
    }
}

/// The next hop towards a backend: this CPU's `NEXT_HOPS` entry while fresh and for this
/// backend (as `forward::nexthop::next_hop`, which shares the cache), else a FIB lookup
/// through the scratch, cached. Not `next_hop` itself: its lookup parameters live on the
/// stack, and a third inlined copy of them does not fit there.
#[inline(always)]
fn backend_hop(
    ctx: &XdpContext,
    global: &GlobalConfig,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<(u32, [u8; 6], [u8; 6]), Exit> {
    let cached = NEXT_HOPS.get_ptr_mut(backend_id);
    if let Some(hop) = cached {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        let hop = unsafe { &*hop };
        if hop.expires_ns > now && hop.generation == backend.generation {
            return Ok((hop.ifindex, hop.smac, hop.dmac));
        }
    }
    let src = tunnel_source(global, backend.family);
    let params =
        scratch_fib(ctx, backend.family, &src, &backend.addr).map_err(|_| drop(stat::DROP_FIB))?;
    // SAFETY: the scratch's parameters, filled by a successful lookup.
    let params = unsafe { &*params };
    if let Some(cached) = cached {
        // SAFETY: as above; the value is written whole.
        unsafe {
            *cached = NextHop {
                expires_ns: now + NEXT_HOP_TTL_NS,
                ifindex: params.ifindex,
                // SAFETY: the kernel wrote `mtu_result` on success; both variants are u16.
                mtu: match params.__bindgen_anon_1.mtu_result {
                    0 => u32::MAX,
                    mtu => u32::from(mtu),
                },
                smac: params.smac,
                dmac: params.dmac,
                generation: backend.generation,
            };
        }
    }
    Ok((params.ifindex, params.smac, params.dmac))
}

/// `bpf_fib_lookup` from `src` to `dst` with its parameters in the scratch: the filled
/// parameters on success, else the lookup's return code.
#[inline(always)]
pub(crate) fn scratch_fib(
    ctx: &XdpContext,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> Result<*const FibParams, i64> {
    let Some(s) = scratch() else {
        return Err(-1);
    };
    let params = &mut s.fib;
    // SAFETY: plain old data; all-zero is its documented "no input".
    *params = unsafe { core::mem::zeroed() };
    params.ifindex = ctx.ingress_ifindex() as u32;
    let w = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = w(src, 0);
        params.__bindgen_anon_4.ipv4_dst = w(dst, 0);
    } else {
        params.family = AF_INET6;
        // SAFETY: writing the IPv6 variant of the unions, which the kernel reads for
        // AF_INET6.
        unsafe {
            let mut i = 0;
            while i < 4 {
                params.__bindgen_anon_3.ipv6_src[i] = w(src, 4 * i);
                params.__bindgen_anon_4.ipv6_dst[i] = w(dst, 4 * i);
                i += 1;
            }
        }
    }
    // SAFETY: `params` is a fully initialised struct of the size passed, in map memory.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            core::ptr::from_mut(params),
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Ok(core::ptr::from_ref(params))
    } else {
        Err(rc)
    }
}

pub(crate) const HOP_OK: u32 = 0;
pub(crate) const HOP_NO_NEIGH: u32 = 1;
const HOP_FAILED: u32 = 2;

/// The next hop of a reply towards its client: the one cached in the reply entry while
/// fresh, else a FIB lookup (source the VIP, destination the client) stored back for
/// `NEXT_HOP_TTL_NS` (a torn read of a concurrently refreshed hop mixes two valid answers
/// for one destination: at worst one packet with a stale MAC). `HOP_NO_NEIGH`: the route is
/// known but not the neighbour; the translated packet then goes to the kernel, which
/// resolves it.
#[inline(always)]
pub(crate) fn reply_hop(ctx: &XdpContext, entry: *mut NatEntry, family: u8, now: u64) -> u32 {
    // SAFETY: a live value of `NAT_CT` (replies always have one: no scratch entry).
    let e = unsafe { &mut *entry };
    if e.hop_ifindex != 0 && e.hop_expires_ns > now {
        return HOP_OK;
    }
    let params = match scratch_fib(ctx, family, &e.new_src_addr, &e.new_dst_addr) {
        Ok(params) => params,
        Err(rc) if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 => return HOP_NO_NEIGH,
        Err(_) => return HOP_FAILED,
    };
    // SAFETY: the scratch's parameters, filled by a successful lookup.
    let params = unsafe { &*params };
    e.hop_ifindex = params.ifindex;
    e.hop_smac = params.smac;
    e.hop_dmac = params.dmac;
    // SAFETY: the kernel wrote the `mtu_result` variant on success; both are a `u16`.
    e.hop_mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    e.hop_expires_ns = now + NEXT_HOP_TTL_NS;
    HOP_OK
}
