//! Reading packets: the one bounds-checked way to a header ([`ptr_at`]) and the balancer's
//! parser of Ethernet, 802.1Q, IPv4/IPv6 and the TCP/UDP ports ([`parse`]), which also applies
//! the packet rules of the crate documentation and hands ICMP and IPv4 fragments for a VIP
//! address (or a NAT reply candidate) to `inbound` ([`TO_ICMP`], [`TO_NAT_ICMP`],
//! [`TO_FRAGMENT`]).
use aya_ebpf::programs::XdpContext;
use lb_common::{
    ADDR_FILTER_NAT_DST, ADDR_FILTER_NAT_SRC, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VipAddrBits, VipKey,
    headers::{
        ETH_HDR_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
    },
    stat,
};

use crate::{
    maps::{VIP_ADDR_BITS, VIP_ADDRS},
    nat::{NAT_DST, NAT_SRC},
    stats::{Exit, drop, pass},
};

/// `Exit::reason` of an ICMP / ICMPv6 packet for a VIP address: not a counter (outside
/// `stat::COUNT`, so `bump` would ignore it), a hand-over to `inbound::icmp`, which re-reads
/// the packet. A marker rather than a field of `Parsed`: the TCP/UDP path carries nothing
/// for it. Its action is what the packet gets should nobody take it over: it passes.
pub(crate) const TO_ICMP: u32 = u32::MAX - 1;
/// `Exit::reason` of an IPv4 fragment for a VIP address: a hand-over to `inbound::fragment`
/// (as [`TO_ICMP`]). Its action, should nobody take it over, is the drop it always was.
pub(crate) const TO_FRAGMENT: u32 = u32::MAX - 2;
/// `Exit::reason` of an ICMP / ICMPv6 packet that is a NAT reply candidate (its destination
/// is no VIP address): a hand-over to `inbound::icmp` as [`TO_ICMP`], which looks for an
/// error quoting a NAT connection and passes everything else. Not confirmed against
/// `VIP_ADDRS` (it is for no VIP address by construction). Its action is a pass.
pub(crate) const TO_NAT_ICMP: u32 = u32::MAX - 3;

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

/// Copies `words` 32-bit words of a header, from byte `at`, into an address field, as
/// words. Why not `copy_from_slice`: a byte-wise copy lets LLVM keep an address as 4 or 16
/// separate byte values, spilled to the stack one 8-byte slot each and stored back byte by
/// byte into each key built from it, whose word-sized reads (the map's hash, `memcmp`)
/// then cannot be forwarded from the stores and stall. Word-sized stores avoid both.
#[inline(always)]
pub(crate) fn copy_words<const N: usize>(
    dst: &mut [u8; 16],
    hdr: &[u8; N],
    at: usize,
    words: usize,
) {
    let mut i = 0;
    while i < words && i < 4 {
        let o = at + 4 * i;
        if let Some(w) = hdr.get(o..o + 4).and_then(|w| <[u8; 4]>::try_from(w).ok()) {
            let word = u32::from_ne_bytes(w);
            dst[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        i += 1;
    }
}

/// What the parser learnt of a packet for a VIP address (or a NAT reply candidate).
#[derive(Clone, Copy)]
pub(crate) struct Parsed {
    pub(crate) key: FlowKey,
    /// Ethernet header length: 14, or 18 with an 802.1Q tag.
    pub(crate) l2_len: usize,
    /// Length of the IP packet (header included) as its header states.
    pub(crate) ip_len: u16,
    /// The inner IPv4 header's DF bit (always set for IPv6, which routers never fragment).
    pub(crate) dont_fragment: bool,
    pub(crate) tcp_flags: u8,
    /// `nat::NAT_DST` (the destination may be a NAT service's VIP), `nat::NAT_SRC` (the
    /// source may be a `nat` backend: a reply candidate), or 0.
    pub(crate) nat: u8,
}

/// The VIP address filter. Looked up before the packet's address is read: a map lookup is
/// a call to LLVM, and values read before it would be kept across it on the stack.
#[inline(always)]
fn vip_addr_bits() -> Result<&'static VipAddrBits, Exit> {
    VIP_ADDR_BITS.get(0).ok_or(pass(stat::PASS_NOT_VIP))
}

/// Whether some VIP address may be `addr`: its bit in the filter.
#[inline(always)]
fn vip_addr_maybe(bits: &VipAddrBits, addr: &[u8; 16]) -> bool {
    let (word, mask) = VipAddrBits::position(addr);
    bits.words.get(word).is_some_and(|w| w & mask != 0)
}

/// The NAT side of the filter for a packet whose destination passed `vip_addr_maybe`:
/// `NAT_DST` if the address may be a NAT service's VIP. Without a NAT service, one load and
/// a branch on the value already fetched.
#[inline(always)]
fn nat_dst(bits: &VipAddrBits, addr: &[u8; 16]) -> u8 {
    if bits.flags & ADDR_FILTER_NAT_DST == 0 {
        return 0;
    }
    let (word, mask) = VipAddrBits::position(addr);
    if bits.nat_words.get(word).is_some_and(|w| w & mask != 0) {
        NAT_DST
    } else {
        0
    }
}

/// Whether a packet whose destination is no VIP address may be a NAT reply: its source's
/// bit among the `nat` backends. Only asked when some `nat` service exists.
#[inline(always)]
fn nat_src_maybe(bits: &VipAddrBits, addr: &[u8; 16]) -> bool {
    let (word, mask) = VipAddrBits::position(addr);
    bits.src_words.get(word).is_some_and(|w| w & mask != 0)
}

/// Whether the packet's destination is a VIP address (the exact set), read again from the
/// packet: for the rare exits past the filter, so that the fast path keeps nothing of the
/// address alive for them. `None` if the frame holds no fixed IP header, i.e. the exit came
/// before the filter.
#[inline(always)]
fn dst_is_vip_addr(ctx: &XdpContext) -> Option<bool> {
    let mut key = VipKey::default();
    let (l2_len, ether_type) = l2(ctx)?;
    if ether_type == ETH_P_IP {
        let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l2_len)?;
        // SAFETY: `ptr_at` checked the fixed header is in the packet.
        copy_words(&mut key.addr, unsafe { &*ip }, 16, 1);
        key.family = FAMILY_V4;
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const [u8; IPV6_HDR_LEN] = ptr_at(ctx, l2_len)?;
        // SAFETY: `ptr_at` checked the fixed header is in the packet.
        copy_words(&mut key.addr, unsafe { &*ip }, 24, 4);
        key.family = FAMILY_V6;
    } else {
        return None;
    }
    // SAFETY: the value is only tested for presence, never read.
    Some(unsafe { VIP_ADDRS.get(&key) }.is_some())
}

/// The Ethernet header's length (14, or 18 with an 802.1Q tag) and the EtherType after it,
/// read again from the packet: for the rare paths past the parser (`inbound`, the
/// confirmation of exits), which do not keep what the parser read.
#[inline(always)]
pub(crate) fn l2(ctx: &XdpContext) -> Option<(usize, u16)> {
    let eth: *const [u8; ETH_HDR_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are in the packet.
    let ether_type = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    if ether_type != ETH_P_8021Q {
        return Some((ETH_HDR_LEN, ether_type));
    }
    let vlan: *const [u8; VLAN_HDR_LEN] = ptr_at(ctx, ETH_HDR_LEN)?;
    // SAFETY: `ptr_at` checked the 4 tag bytes are in the packet.
    let ether_type = unsafe { u16::from_be_bytes([(*vlan)[2], (*vlan)[3]]) };
    Some((ETH_HDR_LEN + VLAN_HDR_LEN, ether_type))
}

/// Parses up to the L4 ports. `Err` is an early exit (pass or drop) with its reason.
///
/// A packet whose destination's bit is clear in `VIP_ADDR_BITS` passes at once
/// (`pass_not_vip`). Past the filter, the address is only probably a VIP's: a well-formed
/// packet goes on to the VIP lookup, which decides (one hash lookup for a VIP packet); an
/// early exit is first confirmed with the exact set `VIP_ADDRS`, and becomes
/// `pass_not_vip` for an address of no VIP, as the packet rules require. Those exits are
/// the rare packets, so they pay for the second lookup. ICMP and IPv4 fragments for a VIP
/// address leave as exits too ([`TO_ICMP`], [`TO_FRAGMENT`]), confirmed alike.
#[inline(always)]
pub(crate) fn parse(ctx: &XdpContext) -> Result<Parsed, Exit> {
    match parse_unconfirmed(ctx) {
        // The filter's own exit stands, and so do the exits before it: the frame is no IP
        // packet or holds no fixed IP header, there is no address to confirm (the reasons
        // that only occur there are not even asked about; `None` for the others).
        Err(exit)
            if !matches!(
                exit.reason,
                stat::PASS_NOT_VIP | stat::PASS_NON_IP | stat::DROP_TRUNC_ETH | TO_NAT_ICMP
            ) && dst_is_vip_addr(ctx) == Some(false) =>
        {
            Err(pass(stat::PASS_NOT_VIP))
        }
        other => other,
    }
}

/// `parse` without the confirmation of its exits.
#[inline(always)]
fn parse_unconfirmed(ctx: &XdpContext) -> Result<Parsed, Exit> {
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
    let nat;
    if ether_type == ETH_P_IP {
        let bits = vip_addr_bits()?;
        let ip: *const [u8; IPV4_HDR_LEN] =
            ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
        // SAFETY: the fixed 20-byte header is in the packet (`ptr_at`), and nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        copy_words(&mut key.dst_addr, ip, 16, 1);
        if vip_addr_maybe(bits, &key.dst_addr) {
            nat = nat_dst(bits, &key.dst_addr);
        } else {
            if bits.flags & ADDR_FILTER_NAT_SRC == 0 {
                return Err(pass(stat::PASS_NOT_VIP));
            }
            copy_words(&mut key.src_addr, ip, 12, 1);
            // ICMP from anywhere: an error about a NAT connection may come from a router
            // between the balancer and the backend, not only from the backend.
            if !nat_src_maybe(bits, &key.src_addr) && ip[9] != PROTO_ICMP {
                return Err(pass(stat::PASS_NOT_VIP));
            }
            nat = NAT_SRC;
        }
        key.family = FAMILY_V4;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        ip_len = u16::from_be_bytes([ip[2], ip[3]]);
        if ip[0] >> 4 != 4 || ihl < IPV4_HDR_LEN || (ip_len as usize) < ihl {
            return Err(drop(stat::DROP_MALFORMED_IP));
        }
        // Ethernet may pad short frames, so the IP length may be less than the frame's.
        if l2_len + ip_len as usize > frame_len {
            return Err(drop(stat::DROP_TRUNC_IPV4));
        }
        // MF set or a non-zero offset: no ports (or not for every fragment), so not this
        // parser's; `inbound::fragment` decides.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return Err(drop(TO_FRAGMENT));
        }
        if ip[8] == 0 {
            return Err(drop(stat::DROP_TTL));
        }
        copy_words(&mut key.src_addr, ip, 12, 1);
        key.proto = ip[9];
        dont_fragment = ip[6] & 0x40 != 0;
        l4_off = l2_len + ihl;
    } else if ether_type == ETH_P_IPV6 {
        let bits = vip_addr_bits()?;
        let ip: *const [u8; IPV6_HDR_LEN] =
            ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV6))?;
        // SAFETY: the fixed 40-byte header is in the packet (`ptr_at`), and nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        copy_words(&mut key.dst_addr, ip, 24, 4);
        if vip_addr_maybe(bits, &key.dst_addr) {
            nat = nat_dst(bits, &key.dst_addr);
        } else {
            if bits.flags & ADDR_FILTER_NAT_SRC == 0 {
                return Err(pass(stat::PASS_NOT_VIP));
            }
            copy_words(&mut key.src_addr, ip, 8, 4);
            // As for IPv4 (an ICMPv6 error quoting a NAT connection, from a router).
            if !nat_src_maybe(bits, &key.src_addr) && ip[6] != PROTO_ICMPV6 {
                return Err(pass(stat::PASS_NOT_VIP));
            }
            nat = NAT_SRC;
        }
        key.family = FAMILY_V6;
        if ip[0] >> 4 != 6 {
            return Err(drop(stat::DROP_MALFORMED_IP));
        }
        let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
        if l2_len + IPV6_HDR_LEN + payload_len as usize > frame_len {
            return Err(drop(stat::DROP_TRUNC_IPV6));
        }
        match ip[6] {
            PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {}
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
        copy_words(&mut key.src_addr, ip, 8, 4);
        key.proto = ip[6];
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
    } else if key.proto == PROTO_ICMP && key.family == FAMILY_V4
        || key.proto == PROTO_ICMPV6 && key.family == FAMILY_V6
    {
        return Err(pass(if nat == NAT_SRC { TO_NAT_ICMP } else { TO_ICMP }));
    } else {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    Ok(Parsed {
        key,
        l2_len,
        ip_len,
        dont_fragment,
        tcp_flags,
        nat,
    })
}
