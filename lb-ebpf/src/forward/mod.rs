//! Sending a balanced packet to its backend: the choice between the two forwarding modes
//! (`tunnel`: IP-in-IP, `direct`: L2 DSR), and what both share: the next hop (`nexthop`), the
//! new MAC addresses and the way out (`XDP_TX` or a devmap redirect).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    BackendInfo, FORWARD_DIRECT, GlobalConfig, VipInfo, forwarding_is_nat, nat::NatEntry, stat,
};

use crate::{
    maps::TX_PORTS,
    parse::{Parsed, ptr_at},
    stats::{Exit, drop},
};

mod direct;
pub(crate) mod nexthop;
mod tunnel;

/// Forwards the packet to `backend` the way its service is configured to; a packet of a NAT
/// pair (`nat` non-null: the rewrite of its direction) is translated and sent on, whichever
/// way it travels.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the one forwarding entry, inlined once"
)]
pub(crate) fn forward(
    ctx: &XdpContext,
    p: &Parsed,
    vip: &VipInfo,
    global: &GlobalConfig,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
    nat: *mut NatEntry,
) -> Result<u32, Exit> {
    if !nat.is_null() {
        return crate::nat::forward(ctx, p, nat, global, backend_id, backend, now);
    }
    if forwarding_is_nat(vip.forwarding) {
        // A NAT service's packet always comes with its pair (`balance`); never sent
        // untranslated.
        return Err(drop(stat::DROP_NAT_UNTRANSLATABLE));
    }
    if vip.forwarding == FORWARD_DIRECT {
        direct::forward_direct(ctx, p, global, backend_id, backend, now)
    } else {
        tunnel::forward_tunnel(ctx, p, global, backend_id, backend, now)
    }
}

/// `XDP_TX` when the next hop is behind the ingress interface (or the frame is tagged: the
/// tag names the segment), otherwise `XDP_REDIRECT` through the devmap.
#[inline(always)]
pub(crate) fn egress(ctx: &XdpContext, ifindex: u32, tagged: bool) -> Result<u32, Exit> {
    if tagged || ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS
        .redirect(ifindex, 0)
        .map_err(|_| drop(stat::DROP_REDIRECT))
}

#[inline(always)]
pub(crate) fn write_macs(ctx: &XdpContext, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), Exit> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
    // SAFETY: `ptr_at` checked the 12 address bytes are in the packet; packet memory is
    // writable in XDP, and no other reference to it is alive.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(dmac);
    eth[6..12].copy_from_slice(smac);
    Ok(())
}
