//! Reading packets: the one bounds-checked way to a header ([`ptr_at`]) and the balancer's
//! parser of Ethernet, 802.1Q, IPv4/IPv6 and the TCP/UDP ports ([`parse`]), which also applies
//! the packet rules of the crate documentation.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, VipKey,
    headers::{
        ETH_HDR_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
    },
    stat,
};

use crate::{
    maps::VIP_ADDRS,
    stats::{Exit, drop, pass},
};

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// The one bounds-checked way to a header: `None` unless `offset + size_of::<T>()` bytes
/// are inside the packet. The verifier needs this comparison against `data_end` before any
/// access.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the parser learnt of a packet for a VIP address.
pub(crate) struct Parsed {
    pub(crate) key: FlowKey,
    /// Ethernet header length: 14, or 18 with an 802.1Q tag.
    pub(crate) l2_len: usize,
    /// Length of the IP packet (header included) as its header states.
    pub(crate) ip_len: u16,
    /// The inner IPv4 header's DF bit (always set for IPv6, which routers never fragment).
    pub(crate) dont_fragment: bool,
    pub(crate) tcp_flags: u8,
}

#[inline(always)]
fn vip_addr_known(addr: &[u8; 16], family: u8) -> bool {
    let key = VipKey {
        addr: *addr,
        port_be: 0,
        proto: 0,
        family,
    };
    // SAFETY: the value is only tested for presence, never read.
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

/// Parses up to the L4 ports. `Err` is an early exit (pass or drop) with its reason.
#[inline(always)]
pub(crate) fn parse(ctx: &XdpContext) -> Result<Parsed, Exit> {
    let eth: *const [u8; ETH_HDR_LEN] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_TRUNC_ETH))?;
    // SAFETY: `ptr_at` checked the 14 bytes are in the packet.
    let mut ether_type = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    let mut l2_len = ETH_HDR_LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const [u8; VLAN_HDR_LEN] =
            ptr_at(ctx, ETH_HDR_LEN).ok_or(drop(stat::DROP_TRUNC_ETH))?;
        // SAFETY: `ptr_at` checked the 4 tag bytes are in the packet.
        ether_type = unsafe { u16::from_be_bytes([(*vlan)[2], (*vlan)[3]]) };
        l2_len = ETH_HDR_LEN + VLAN_HDR_LEN;
    }
    let frame_len = ctx.data_end() - ctx.data();
    let mut key = FlowKey::default();
    let l4_off;
    let ip_len;
    let dont_fragment;
    if ether_type == ETH_P_IP {
        let ip: *const [u8; IPV4_HDR_LEN] =
            ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
        // SAFETY: the fixed 20-byte header is in the packet (`ptr_at`), and nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        key.dst_addr[..4].copy_from_slice(&ip[16..20]);
        if !vip_addr_known(&key.dst_addr, FAMILY_V4) {
            return Err(pass(stat::PASS_NOT_VIP));
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        ip_len = u16::from_be_bytes([ip[2], ip[3]]);
        if ip[0] >> 4 != 4 || ihl < IPV4_HDR_LEN || (ip_len as usize) < ihl {
            return Err(drop(stat::DROP_MALFORMED_IP));
        }
        // Ethernet may pad short frames, so the IP length may be less than the frame's.
        if l2_len + ip_len as usize > frame_len {
            return Err(drop(stat::DROP_TRUNC_IPV4));
        }
        // MF set or a non-zero offset.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return Err(drop(stat::DROP_FRAGMENT));
        }
        if ip[8] == 0 {
            return Err(drop(stat::DROP_TTL));
        }
        key.src_addr[..4].copy_from_slice(&ip[12..16]);
        key.proto = ip[9];
        key.family = FAMILY_V4;
        dont_fragment = ip[6] & 0x40 != 0;
        l4_off = l2_len + ihl;
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const [u8; IPV6_HDR_LEN] =
            ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV6))?;
        // SAFETY: the fixed 40-byte header is in the packet (`ptr_at`), and nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        key.dst_addr.copy_from_slice(&ip[24..40]);
        if !vip_addr_known(&key.dst_addr, FAMILY_V6) {
            return Err(pass(stat::PASS_NOT_VIP));
        }
        if ip[0] >> 4 != 6 {
            return Err(drop(stat::DROP_MALFORMED_IP));
        }
        let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
        if l2_len + IPV6_HDR_LEN + payload_len as usize > frame_len {
            return Err(drop(stat::DROP_TRUNC_IPV6));
        }
        match ip[6] {
            PROTO_TCP | PROTO_UDP => {}
            // Hop-by-hop, routing, fragment, ESP, AH, destination options, mobility, HIP,
            // shim6, experimental (RFC 8200 §4, IANA "IPv6 Extension Header Types").
            0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => {
                return Err(pass(stat::PASS_IPV6_EXT));
            }
            _ => return Err(pass(stat::PASS_NOT_VIP)),
        }
        if ip[7] == 0 {
            return Err(drop(stat::DROP_TTL));
        }
        key.src_addr.copy_from_slice(&ip[8..24]);
        key.proto = ip[6];
        key.family = FAMILY_V6;
        ip_len = payload_len.wrapping_add(IPV6_HDR_LEN as u16);
        dont_fragment = true;
        l4_off = l2_len + IPV6_HDR_LEN;
    } else {
        return Err(pass(stat::PASS_NON_IP));
    }

    let ip_end = l2_len + ip_len as usize;
    let mut tcp_flags = 0;
    if key.proto == PROTO_TCP {
        let tcp: *const [u8; 20] = ptr_at(ctx, l4_off).ok_or(drop(stat::DROP_TRUNC_L4))?;
        // SAFETY: `ptr_at` checked the fixed 20-byte TCP header is in the packet.
        let tcp = unsafe { &*tcp };
        if l4_off + 20 > ip_end || (tcp[12] >> 4) < 5 {
            return Err(drop(stat::DROP_TRUNC_L4));
        }
        key.src_port_be = u16::from_ne_bytes([tcp[0], tcp[1]]);
        key.dst_port_be = u16::from_ne_bytes([tcp[2], tcp[3]]);
        tcp_flags = tcp[13];
    } else if key.proto == PROTO_UDP {
        let udp: *const [u8; 8] = ptr_at(ctx, l4_off).ok_or(drop(stat::DROP_TRUNC_L4))?;
        // SAFETY: `ptr_at` checked the 8-byte UDP header is in the packet.
        let udp = unsafe { &*udp };
        if l4_off + 8 > ip_end {
            return Err(drop(stat::DROP_TRUNC_L4));
        }
        key.src_port_be = u16::from_ne_bytes([udp[0], udp[1]]);
        key.dst_port_be = u16::from_ne_bytes([udp[2], udp[3]]);
    } else {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    Ok(Parsed {
        key,
        l2_len,
        ip_len,
        dont_fragment,
        tcp_flags,
    })
}
