//! The balancer's per-packet pipeline: parse, find the service, find or pick the backend,
//! count, forward. Shared by `weir_balancer` and the benchmark programs, so that they run
//! exactly the same code.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    BACKEND_UP, BackendInfo, FLOW_VIA_PORT0, FlowKey, FlowValue, VipInfo, VipKey,
    forwarding_is_nat, nat::NatEntry, stat,
};

use crate::{
    clock, conntrack, forward, inbound,
    maps::{BACKENDS, GLOBAL, SERVICES, STATS, VIPS},
    nat,
    parse::{Parsed, TO_FRAGMENT, TO_ICMP, TO_NAT_ICMP, parse},
    stats::{Exit, Stats, action_stat, bump, count_traffic, drop, pass},
};

/// Balances one packet and counts its fate.
#[inline(always)]
pub(crate) fn run(ctx: &XdpContext) -> u32 {
    let stats = STATS.get_ptr_mut(0);
    let action = match try_balance(ctx, stats) {
        Ok(action) => action,
        Err(Exit { action, reason }) => {
            bump(stats, reason);
            action
        }
    };
    bump(stats, action_stat(action));
    action
}

/// The service of a flow: its exact port, else the whole-address service (port zero, then
/// `true`).
#[inline(always)]
pub(crate) fn lookup_vip(key: &FlowKey) -> Option<(&'static VipInfo, bool)> {
    let mut vip_key = VipKey {
        addr: key.dst_addr,
        port_be: key.dst_port_be,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: the reference points into map memory that stays allocated while the program
    // runs; the agent changes values only by whole-element map updates, never in place.
    if let Some(vip) = unsafe { VIPS.get(&vip_key) } {
        return Some((vip, false));
    }
    vip_key.port_be = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&vip_key) }.map(|vip| (vip, true))
}

/// The service and backend of a tracked flow whose backend the datapath still honours (up,
/// the same generation), found from the backend without the VIP lookup. Why that is the
/// service the VIP lookup would find: the entry was made for a packet that the lookup
/// matched to this service by its exact port (flows matched by the port-0 fallback are
/// marked and not taken here), and the agent gives a VIP key to another service, or a
/// service another key, only through a new service, whose backends are new ones: every
/// backend of the old one is retired (down, or its id reused under a new generation)
/// first. Changed settings of a service reach `SERVICES` before `VIPS`.
#[inline(always)]
fn tracked_service(flow: *mut FlowValue) -> Option<(&'static VipInfo, &'static BackendInfo)> {
    // SAFETY: a value of the connection table, valid until this program returns (the table
    // is preallocated: an entry deleted meanwhile is at worst reused, never freed).
    let f = unsafe { &*flow };
    if f.flags & FLOW_VIA_PORT0 != 0 {
        return None;
    }
    let backend = BACKENDS.get(f.backend_id)?;
    if backend.state != BACKEND_UP || backend.generation != f.generation {
        return None;
    }
    let vip = SERVICES.get(backend.service_id)?;
    (vip.service_id == backend.service_id && vip.ring_size != 0).then_some((vip, backend))
}

/// A packet on its way to a backend: what `forward` needs, and what to count. Every path
/// that forwards (tracked and new TCP/UDP flows, ICMP errors, fragments) ends in this one
/// value, so that the forwarding code (next hop, MTU check, too-big answer, encapsulation) is
/// inlined once: each inlined copy has its own stack slots, and two copies exceed the 512-byte
/// BPF stack.
pub(crate) struct Job {
    pub(crate) p: Parsed,
    pub(crate) vip: &'static VipInfo,
    pub(crate) backend_id: u32,
    pub(crate) backend: &'static BackendInfo,
    /// A connection-table entry was made for it.
    pub(crate) new_flow: bool,
    pub(crate) now: u64,
    /// Counted once forwarded (`stat::COUNT`: nothing more).
    pub(crate) counter: u32,
    /// A NAT pair's entry for the packet's direction (the rewrite to apply), or null: the
    /// packet goes as the DSR modes send it.
    pub(crate) nat: *mut NatEntry,
}

#[inline(always)]
fn try_balance(ctx: &XdpContext, stats: Stats) -> Result<u32, Exit> {
    // ICMP and fragments for a VIP address leave the parser as exits, so that only they pay
    // for their handling; it re-reads the packet.
    let job = match parse(ctx) {
        Ok(p) => balance_flow(p, stats)?,
        // One call site for both: each inlined copy of the ICMP path takes its own stack.
        Err(Exit { reason, .. }) if reason == TO_ICMP || reason == TO_NAT_ICMP => {
            inbound::icmp(ctx, reason == TO_NAT_ICMP)?
        }
        Err(Exit {
            reason: TO_FRAGMENT,
            ..
        }) => inbound::fragment(ctx)?,
        Err(exit) => return Err(exit),
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    // Read once per packet and handed down: the tunnel sources, for the next-hop lookup and
    // the outer header.
    let global = GLOBAL.get(0).ok_or(drop(stat::DROP_ENCAP))?;
    count_traffic(job.vip.service_id, job.backend_id, frame_len, job.new_flow);
    let action = forward::forward(
        ctx,
        &job.p,
        job.vip,
        global,
        job.backend_id,
        job.backend,
        job.now,
        job.nat,
    )?;
    bump(stats, job.counter);
    Ok(action)
}

/// The `Job` of a packet of a NAT pair.
#[inline(always)]
fn nat_job(p: Parsed, pick: nat::Pick, now: u64) -> Job {
    Job {
        p,
        vip: pick.vip,
        backend_id: pick.backend_id,
        backend: pick.backend,
        new_flow: pick.new_flow,
        now,
        counter: pick.counter,
        nat: pick.nat,
    }
}

/// The backend of a TCP/UDP packet for a VIP address: its tracked flow's, else the
/// scheduler's (and then recorded).
#[inline(always)]
fn balance_flow(p: Parsed, stats: Stats) -> Result<Job, Exit> {
    // A packet that may belong to a NAT pair asks `NAT_CT` first: one lookup for either
    // direction of an established pair. A reply candidate without an entry is not ours.
    if p.nat != 0 {
        let now = clock::now();
        if let Some(pick) = nat::established(&p, now, stats)? {
            return Ok(nat_job(p, pick, now));
        }
        if p.nat & nat::NAT_SRC != 0 {
            return Err(pass(stat::PASS_NAT_NO_ENTRY));
        }
    }
    // The connection table first: the packets of a tracked flow find their service through
    // it (`tracked_service`), so a packet pays for one hash lookup, the table's. Others ask
    // `VIPS`, which decides whether the packet is for a VIP at all.
    let flow = conntrack::lookup(&p.key);
    let (vip, via_port0, tracked) = match flow.and_then(tracked_service) {
        Some((vip, backend)) => (vip, false, Some(backend)),
        None => {
            let (vip, via_port0) = lookup_vip(&p.key).ok_or(pass(stat::PASS_NOT_VIP))?;
            (vip, via_port0, None)
        }
    };
    // The coarse clock: timestamps here only need second precision, and the precise clock
    // measured at about 45 ns per read in a VM. Read through the per-jiffy cache: no helper
    // call on almost every packet.
    let now = clock::now();
    if forwarding_is_nat(vip.forwarding) {
        let pick = nat::new_flow(&p, vip, now, stats)?;
        return Ok(nat_job(p, pick, now));
    }
    let (backend_id, backend, new_flow) = conntrack::backend_for(
        &p,
        conntrack::Service {
            vip,
            via_port0,
            flow,
            tracked,
        },
        now,
        stats,
    )?;
    Ok(Job {
        p,
        vip,
        backend_id,
        backend,
        new_flow,
        now,
        counter: stat::COUNT,
        nat: core::ptr::null_mut(),
    })
}
