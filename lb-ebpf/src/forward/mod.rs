//! Sending a balanced packet to its backend: the choice between the two forwarding modes
//! (`tunnel`: IP-in-IP, `direct`: L2 DSR), and what both share: the next hop (`nexthop`), the
//! new MAC addresses and the way out (`XDP_TX` or a devmap redirect).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{BackendInfo, FORWARD_DIRECT, GlobalConfig, VipInfo, stat};

use crate::{
    maps::TX_PORTS,
    parse::{Parsed, ptr_at},
    stats::{Exit, drop},
};

mod direct;
pub(crate) mod nexthop;
mod tunnel;

/// Forwards the packet to `backend` the way its service is configured to.
#[inline(always)]
pub(crate) fn forward(
    ctx: &XdpContext,
    p: &Parsed,
    vip: &VipInfo,
    global: &GlobalConfig,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<u32, Exit> {
    if vip.forwarding == FORWARD_DIRECT {
        direct::forward_direct(ctx, p, global, backend_id, backend, now)
    } else {
        tunnel::forward_tunnel(ctx, p, global, backend_id, backend, now)
    }
}

/// `XDP_TX` when the next hop is behind the ingress interface (or the frame is tagged: the
/// tag names the segment), otherwise `XDP_REDIRECT` through the devmap.
#[inline(always)]
fn egress(ctx: &XdpContext, ifindex: u32, tagged: bool) -> Result<u32, Exit> {
    if tagged || ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS
        .redirect(ifindex, 0)
        .map_err(|_| drop(stat::DROP_REDIRECT))
}

#[inline(always)]
fn write_macs(ctx: &XdpContext, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), Exit> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
    // SAFETY: `ptr_at` checked the 12 address bytes are in the packet; packet memory is
    // writable in XDP, and no other reference to it is alive.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(dmac);
    eth[6..12].copy_from_slice(smac);
    Ok(())
}
