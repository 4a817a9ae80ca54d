//! The balancer's per-packet pipeline: parse, find the service, find or pick the backend,
//! count, forward. Shared by `weir_balancer` and the benchmark programs, so that they run
//! exactly the same code.
use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, VipInfo, VipKey, stat};

use crate::{
    clock, conntrack, forward,
    maps::{GLOBAL, STATS, VIPS},
    parse::parse,
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

/// The service of a flow: its exact port, else the whole-address service (port zero).
#[inline(always)]
fn lookup_vip(key: &FlowKey) -> Option<&'static VipInfo> {
    let mut vip_key = VipKey {
        addr: key.dst_addr,
        port_be: key.dst_port_be,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: the reference points into map memory that stays allocated while the program
    // runs; the agent changes values only by whole-element map updates, never in place.
    if let Some(vip) = unsafe { VIPS.get(&vip_key) } {
        return Some(vip);
    }
    vip_key.port_be = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&vip_key) }
}

#[inline(always)]
fn try_balance(ctx: &XdpContext, stats: Stats) -> Result<u32, Exit> {
    let p = parse(ctx)?;
    let vip = lookup_vip(&p.key).ok_or(pass(stat::PASS_NOT_VIP))?;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    // Read once per packet and handed down: the tunnel sources, for the next-hop lookup and
    // the outer header.
    let global = GLOBAL.get(0).ok_or(drop(stat::DROP_ENCAP))?;

    // The coarse clock: timestamps here only need second precision, and the precise clock
    // measured at about 45 ns per read in a VM. Read through the per-jiffy cache: no helper
    // call on almost every packet.
    let now = clock::now();
    let (backend_id, backend, new_flow) = conntrack::backend_for(&p, vip, now, stats)?;
    count_traffic(vip.service_id, backend_id, frame_len, new_flow);
    forward::forward(ctx, &p, vip, global, backend_id, backend, now)
}
