//! The backend side (`weir_decap`): which packets are IP-in-IP tunnel packets for this host
//! and one of its VIPs, and stripping their outer header so the kernel receives the inner
//! packet as if it had come directly.
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6, VipKey,
    headers::{
        ETH_HDR_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
    },
    stat,
};

use crate::{
    maps::{DECAP_LOCAL, DECAP_VIPS},
    parse::ptr_at,
    stats::{Exit, drop, pass},
};

/// Strips the outer IPv4/IPv6 header of an IP-in-IP packet for a local VIP. Anything else,
/// and anything it cannot parse, passes unchanged for the kernel to judge.
#[inline(always)]
pub(crate) fn try_decap(ctx: &XdpContext) -> Result<(), Exit> {
    let eth: *const [u8; ETH_HDR_LEN] = ptr_at(ctx, 0).ok_or(pass(stat::PASS_NON_IP))?;
    let mut l2 = [0u8; ETH_HDR_LEN + VLAN_HDR_LEN];
    // SAFETY: `ptr_at` checked the 14 bytes are in the packet.
    l2[..ETH_HDR_LEN].copy_from_slice(unsafe { &*eth });
    let mut ether_type = u16::from_be_bytes([l2[12], l2[13]]);
    let mut l2_len = ETH_HDR_LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const [u8; VLAN_HDR_LEN] =
            ptr_at(ctx, ETH_HDR_LEN).ok_or(pass(stat::PASS_NON_IP))?;
        // SAFETY: `ptr_at` checked the 4 tag bytes are in the packet.
        l2[ETH_HDR_LEN..].copy_from_slice(unsafe { &*vlan });
        ether_type = u16::from_be_bytes([l2[16], l2[17]]);
        l2_len = ETH_HDR_LEN + VLAN_HDR_LEN;
    }
    let mut local = VipKey::default();
    let (outer_len, inner_proto) = if ether_type == ETH_P_IP {
        let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l2_len).ok_or(pass(stat::PASS_NON_IP))?;
        // SAFETY: `ptr_at` checked the fixed 20-byte header is in the packet; nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ihl < IPV4_HDR_LEN || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return Err(pass(stat::PASS_NOT_VIP));
        }
        local.addr[..4].copy_from_slice(&ip[16..20]);
        local.family = FAMILY_V4;
        (ihl, ip[9])
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const [u8; IPV6_HDR_LEN] = ptr_at(ctx, l2_len).ok_or(pass(stat::PASS_NON_IP))?;
        // SAFETY: `ptr_at` checked the fixed 40-byte header is in the packet; nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        local.addr.copy_from_slice(&ip[24..40]);
        local.family = FAMILY_V6;
        (IPV6_HDR_LEN, ip[6])
    } else {
        return Err(pass(stat::PASS_NON_IP));
    };
    if inner_proto != PROTO_IPIP && inner_proto != PROTO_IPV6 {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    // SAFETY: a presence test: the value is never read.
    if unsafe { DECAP_LOCAL.get(&local) }.is_none() {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    let inner_off = l2_len + outer_len;
    let mut vip = VipKey::default();
    let inner_type = if inner_proto == PROTO_IPIP {
        let inner: *const [u8; IPV4_HDR_LEN] =
            ptr_at(ctx, inner_off).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: `ptr_at` checked the inner 20-byte header is in the packet; nothing writes
        // the packet while this shared borrow lives.
        let inner = unsafe { &*inner };
        vip.addr[..4].copy_from_slice(&inner[16..20]);
        vip.family = FAMILY_V4;
        ETH_P_IP
    } else if inner_proto == PROTO_IPV6 {
        let inner: *const [u8; IPV6_HDR_LEN] =
            ptr_at(ctx, inner_off).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: `ptr_at` checked the inner 40-byte header is in the packet; nothing writes
        // the packet while this shared borrow lives.
        let inner = unsafe { &*inner };
        vip.addr.copy_from_slice(&inner[24..40]);
        vip.family = FAMILY_V6;
        ETH_P_IPV6
    } else {
        return Err(pass(stat::PASS_NOT_VIP));
    };
    // SAFETY: a presence test: the value is never read.
    if unsafe { DECAP_VIPS.get(&vip) }.is_none() {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    // The new L2 header goes right in front of the inner packet, then the head moves to it.
    if l2_len == ETH_HDR_LEN {
        l2[12..14].copy_from_slice(&inner_type.to_be_bytes());
        let dst: *mut [u8; ETH_HDR_LEN] = ptr_at(ctx, outer_len).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: `ptr_at` checked the 14 bytes are in the packet; packet memory is writable
        // in XDP, and the source is the stack copy `l2`, so the two do not overlap.
        unsafe { (*dst).copy_from_slice(&l2[..ETH_HDR_LEN]) };
    } else {
        l2[16..18].copy_from_slice(&inner_type.to_be_bytes());
        let dst: *mut [u8; ETH_HDR_LEN + VLAN_HDR_LEN] =
            ptr_at(ctx, outer_len).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: `ptr_at` checked the 18 bytes are in the packet; packet memory is writable
        // in XDP.
        unsafe { *dst = l2 };
    }
    // SAFETY: the helper takes the context pointer the kernel gave this program.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(drop(stat::DROP_ENCAP));
    }
    Ok(())
}
