//! L2 DSR (direct server return): only the MAC addresses change; the backend owns the VIP on
//! a loopback and answers the client itself.
use aya_ebpf::programs::XdpContext;
use lb_common::{BackendInfo, GlobalConfig, headers::ETH_HDR_LEN, stat};

use super::{
    egress,
    nexthop::{next_hop, tunnel_source},
    write_macs,
};
use crate::{
    parse::Parsed,
    stats::{Exit, drop},
};

/// Rewrites the MAC addresses towards the backend's next hop and sends the frame there. The
/// backend must be of the packet's own family: nothing is encapsulated.
#[inline(always)]
pub(super) fn forward_direct(
    ctx: &XdpContext,
    p: &Parsed,
    global: &GlobalConfig,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<u32, Exit> {
    if backend.family != p.key.family {
        return Err(drop(stat::DROP_FAMILY));
    }
    // The next hop towards the backend does not depend on the client, so it is cached per
    // backend; the LB's own address (zero if none is configured) is the lookup's source.
    let src = tunnel_source(global, backend.family);
    // No MTU check: L2 DSR does not grow the frame (only the MACs change), so what fitted
    // the link it came in on fits a link of the same segment. (A redirect to an interface
    // with a smaller MTU is refused by the kernel's `xdp_ok_fwd_dev`, counted by it.)
    let hop = next_hop(ctx, backend_id, backend, &src, now)?;
    write_macs(ctx, &hop.smac, &hop.dmac)?;
    egress(ctx, hop.ifindex, p.l2_len != ETH_HDR_LEN)
}
