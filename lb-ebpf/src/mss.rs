//! The backend's egress side (`weir_mss_clamp`, a tc program `weir decap` attaches next to
//! `weir_decap`): lowering the MSS option of SYN-ACKs sent from a VIP, so the client never
//! sends a segment that no longer fits once the balancer puts the tunnel header in front of
//! it.
//!
//! Only a packet that is IPv4 or IPv6 (after at most one 802.1Q tag), TCP with SYN and ACK
//! set and RST clear, from an address in `DECAP_VIPS`, with a well-formed options area that
//! holds an MSS option larger than the clamp for its family (`DECAP_MSS`) is changed: the
//! two bytes of the MSS value and the TCP checksum, nothing else. Everything else, malformed
//! or cut-short packets included, leaves untouched.
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::generated::bpf_skb_load_bytes, programs::TcContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, MSS_SLOT_V4, MSS_SLOT_V6, PROTO_TCP, VipKey,
    headers::{
        ETH_HDR_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
    },
    stat,
};

use crate::{
    maps::{DECAP_MSS, DECAP_VIPS, STATS},
    parse::{TCP_ACK, TCP_RST, TCP_SYN},
    stats::bump,
};

/// Fixed TCP header length; the options follow it.
const TCP_HDR_LEN: usize = 20;
/// Most option bytes a TCP header can carry (data offset 15 words).
const TCP_MAX_OPTIONS: usize = 40;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;
/// Offset of the checksum in the TCP header.
const TCP_CSUM_OFF: usize = 16;
/// `bpf_l4_csum_replace` flags: the low bits give the size of the changed field, a 16-bit
/// word; no pseudo-header field changes.
const CSUM_FIELD_16: u64 = 2;

/// The program's verdict. `TC_ACT_UNSPEC` is "no opinion": with tcx the next program of the
/// interface runs (`TCX_NEXT`), with a legacy clsact filter the packet continues as if no
/// filter had matched. The clamp never drops or redirects.
pub(crate) const VERDICT: i32 = TC_ACT_UNSPEC;

/// The bounds-checked way to the fixed headers, as `parse::ptr_at` for XDP: `None` unless
/// the bytes are in the linear part of the packet. The headers of a SYN-ACK the local TCP
/// stack built always are.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Clamps the MSS option of one packet if it is a SYN-ACK from a VIP; see the module docs.
/// `None` is "left untouched", for any reason.
#[inline(always)]
pub(crate) fn run(ctx: &TcContext) -> Option<()> {
    let eth: *const [u8; ETH_HDR_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the 14 bytes are in the packet.
    let mut ether_type = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    let mut l3_off = ETH_HDR_LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const [u8; VLAN_HDR_LEN] = ptr_at(ctx, ETH_HDR_LEN)?;
        // SAFETY: `ptr_at` checked the 4 tag bytes are in the packet.
        ether_type = unsafe { u16::from_be_bytes([(*vlan)[2], (*vlan)[3]]) };
        l3_off = ETH_HDR_LEN + VLAN_HDR_LEN;
    }
    let mut vip = VipKey::default();
    let l4_off;
    let ip_end;
    let slot;
    if ether_type == ETH_P_IP {
        let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l3_off)?;
        // SAFETY: `ptr_at` checked the fixed 20-byte header is in the packet; nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        // Not TCP, not version 4, a bad IHL, or a fragment (MF or an offset): not ours.
        if ip[9] != PROTO_TCP
            || ip[0] >> 4 != 4
            || ihl < IPV4_HDR_LEN
            || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0
        {
            return None;
        }
        vip.addr[..4].copy_from_slice(&ip[12..16]);
        vip.family = FAMILY_V4;
        l4_off = l3_off + ihl;
        ip_end = l3_off + u16::from_be_bytes([ip[2], ip[3]]) as usize;
        slot = MSS_SLOT_V4;
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const [u8; IPV6_HDR_LEN] = ptr_at(ctx, l3_off)?;
        // SAFETY: `ptr_at` checked the fixed 40-byte header is in the packet; nothing writes
        // the packet while this shared borrow lives.
        let ip = unsafe { &*ip };
        // TCP right after the fixed header only: a SYN-ACK behind extension headers is left
        // alone rather than walked.
        if ip[6] != PROTO_TCP || ip[0] >> 4 != 6 {
            return None;
        }
        vip.addr.copy_from_slice(&ip[8..24]);
        vip.family = FAMILY_V6;
        l4_off = l3_off + IPV6_HDR_LEN;
        ip_end = l4_off + u16::from_be_bytes([ip[4], ip[5]]) as usize;
        slot = MSS_SLOT_V6;
    } else {
        return None;
    }
    let tcp: *const [u8; TCP_HDR_LEN] = ptr_at(ctx, l4_off)?;
    // SAFETY: `ptr_at` checked the fixed 20-byte TCP header is in the packet.
    let (flags, doff) = unsafe { ((*tcp)[13], ((*tcp)[12] >> 4) as usize * 4) };
    if flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN | TCP_ACK {
        return None;
    }
    // SAFETY: a presence test: the value is never read.
    unsafe { DECAP_VIPS.get(&vip) }?;
    let clamp = *DECAP_MSS.get(slot)?;
    if clamp == 0 || doff <= TCP_HDR_LEN || l4_off + doff > ip_end {
        return None;
    }
    let opts_len = doff - TCP_HDR_LEN;
    let opts_off = l4_off + TCP_HDR_LEN;
    let mut opts = [0u8; TCP_MAX_OPTIONS];
    // The verifier needs the length's bounds right at the call: 1..=40 by the data offset
    // (a 4-bit field) and the test above; stated again so they survive optimisation.
    if opts_len > TCP_MAX_OPTIONS {
        return None;
    }
    // SAFETY: `opts` has room for `opts_len` (at most 40) bytes; the helper fails, and the
    // packet is left alone, if they are not all in the packet (a cut-short options area).
    if unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            opts_off as u32,
            opts.as_mut_ptr().cast(),
            opts_len as u32,
        )
    } != 0
    {
        return None;
    }
    let at = find_mss(&opts, opts_len)?;
    let old = u16::from_be_bytes([opts[at], opts[at + 1]]);
    if u32::from(old) <= clamp {
        return None;
    }
    let new = (clamp as u16).to_be_bytes();
    let value_off = opts_off + at;
    ctx.store(value_off, &new, 0).ok()?;
    // RFC 1624 incremental update, by the kernel helper: it also does the right thing for a
    // packet whose checksum the NIC completes (CHECKSUM_PARTIAL: the field then holds only
    // the pseudo-header sum and must not change). The sum is over 16-bit words from the TCP
    // header's start; a value at an odd offset straddles two words and counts byte-swapped.
    let (from, to) = if (TCP_HDR_LEN + at).is_multiple_of(2) {
        ([opts[at], opts[at + 1]], new)
    } else {
        ([opts[at + 1], opts[at]], [new[1], new[0]])
    };
    ctx.l4_csum_replace(
        l4_off + TCP_CSUM_OFF,
        u64::from(u16::from_ne_bytes(from)),
        u64::from(u16::from_ne_bytes(to)),
        CSUM_FIELD_16,
    )
    .ok()?;
    // A plain per-CPU add, as in XDP: tc egress runs with bottom halves off, so no XDP or
    // other tc run on this CPU interrupts it.
    bump(STATS.get_ptr_mut(0), stat::MSS_CLAMPED);
    Some(())
}

/// Where the MSS value (the two bytes after kind and length) is in the first `len` bytes of
/// `opts`, if the options up to it are well formed (RFC 9293 §3.2: EOL ends the list, NOP is
/// one byte, every other option carries its length, at least 2). A malformed list, an MSS
/// option of the wrong length or none at all is `None`.
#[inline(always)]
fn find_mss(opts: &[u8; TCP_MAX_OPTIONS], len: usize) -> Option<usize> {
    let mut at = 0;
    // Each round consumes at least one byte, so 40 rounds reach the end of any list.
    for _ in 0..TCP_MAX_OPTIONS {
        if at >= len || at >= TCP_MAX_OPTIONS {
            return None;
        }
        let kind = opts[at];
        if kind == TCPOPT_EOL {
            return None;
        }
        if kind == TCPOPT_NOP {
            at += 1;
            continue;
        }
        if at + 1 >= len || at + 1 >= TCP_MAX_OPTIONS {
            return None;
        }
        let opt_len = opts[at + 1] as usize;
        if opt_len < 2 || at + opt_len > len {
            return None;
        }
        if kind == TCPOPT_MSS {
            if opt_len != TCPOLEN_MSS as usize || at + 3 >= TCP_MAX_OPTIONS {
                return None;
            }
            return Some(at + 2);
        }
        at += opt_len;
    }
    None
}
