//! IP-in-IP forwarding: a new outer IPv4 or IPv6 header (the backend's family, from the LB's
//! tunnel source, or for IPv4 from a source per flow within a configured prefix) in front of
//! the untouched inner packet, keeping an 802.1Q tag; a packet that would not fit the egress
//! MTU once encapsulated goes to `icmp::too_big` instead.
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BackendInfo, FAMILY_V4, GlobalConfig, PROTO_IPIP, PROTO_IPV6,
    hash::outer_hash,
    headers::{
        ETH_HDR_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
        write_ipv4_outer, write_ipv6_outer,
    },
    stat,
};

use super::{
    egress,
    nexthop::{next_hop, tunnel_source},
    write_macs,
};
use crate::{
    icmp,
    parse::{Parsed, ptr_at},
    stats::{Exit, drop},
};

/// IP-in-IP: a new outer IPv4 or IPv6 header (the backend's family) in front of the
/// untouched inner packet.
#[inline(always)]
pub(super) fn forward_tunnel(
    ctx: &XdpContext,
    p: &Parsed,
    global: &GlobalConfig,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<u32, Exit> {
    let inner_proto = if p.key.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let outer_v4 = backend.family == FAMILY_V4;
    let outer_len = if outer_v4 { IPV4_HDR_LEN } else { IPV6_HDR_LEN };
    let src = tunnel_source(global, backend.family);
    let hop = next_hop(ctx, backend_id, backend, &src, now)?;
    // The packet as it will leave, outer header included, must fit the egress MTU; if not,
    // the client is told what fits (or the packet is dropped, see `icmp::too_big`).
    if u32::from(p.ip_len) + outer_len as u32 > hop.mtu {
        return Err(icmp::too_big(
            ctx,
            p,
            hop.mtu.saturating_sub(outer_len as u32),
            now,
        ));
    }

    // Keep the 802.1Q tag (TCI) if there was one; read it before the headers move.
    let tagged = p.l2_len != ETH_HDR_LEN;
    let mut tci = [0u8; 2];
    if tagged {
        let vlan: *const [u8; 2] = ptr_at(ctx, ETH_HDR_LEN).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: `ptr_at` checked the 2 TCI bytes are in the packet.
        tci = unsafe { *vlan };
    }
    // SAFETY: the helper takes the context pointer the kernel gave this program.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(drop(stat::DROP_ENCAP));
    }
    let outer_type = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 };
    if tagged {
        let l2: *mut [u8; ETH_HDR_LEN + VLAN_HDR_LEN] =
            ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: `ptr_at` checked (after the head moved) the 18 bytes are in the packet;
        // packet memory is writable in XDP, and no other reference to it is alive.
        let l2 = unsafe { &mut *l2 };
        l2[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        l2[14..16].copy_from_slice(&tci);
        l2[16..18].copy_from_slice(&outer_type.to_be_bytes());
    } else {
        let l2: *mut [u8; ETH_HDR_LEN] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: `ptr_at` checked (after the head moved) the 14 bytes are in the packet;
        // packet memory is writable in XDP, and no other reference to it is alive.
        let l2 = unsafe { &mut *l2 };
        l2[12..14].copy_from_slice(&outer_type.to_be_bytes());
    }
    write_macs(ctx, &hop.smac, &hop.dmac)?;
    if outer_v4 {
        let hdr: *mut [u8; IPV4_HDR_LEN] = ptr_at(ctx, p.l2_len).ok_or(drop(stat::DROP_ENCAP))?;
        let dst = [
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        // One source per flow within the configured prefix, if any: the backend's NIC
        // hashes the outer header to pick a receive queue.
        let outer_src = global.outer_source_v4(|| outer_hash(&p.key));
        // SAFETY: `ptr_at` checked the 20 bytes of the new outer header are in the packet;
        // packet memory is writable in XDP, and no other reference to it is alive.
        write_ipv4_outer(
            unsafe { &mut *hdr },
            outer_src,
            dst,
            inner_proto,
            p.ip_len,
            p.dont_fragment,
        );
    } else {
        let hdr: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, p.l2_len).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: `ptr_at` checked the 40 bytes of the new outer header are in the packet;
        // packet memory is writable in XDP, and no other reference to it is alive.
        write_ipv6_outer(
            unsafe { &mut *hdr },
            &global.tunnel_source_v6,
            &backend.addr,
            inner_proto,
            p.ip_len,
            // Only the IPv6 outer header needs the hash (its flow label).
            outer_hash(&p.key),
        );
    }
    egress(ctx, hop.ifindex, tagged)
}
