//! Packets too big for the tunnel: the answer to the client (ICMP "fragmentation needed",
//! ICMPv6 Packet Too Big) built in place from the offending packet and sent back with
//! `XDP_TX`, its per-CPU rate limit (`ICMP_BUCKETS`), and the drop of IPv4 packets without
//! DF.
//!
//! The answer is the offending frame rewritten: its tail trimmed to the quote
//! (`lb_common::icmp::quote_len`), room made in front for a new IP and ICMP header, the
//! original Ethernet header (802.1Q tag kept) moved in front of them with its MAC addresses
//! swapped. The quote stays where it was and is summed where it lies by `bpf_csum_diff`.
//! The answer comes from the VIP: the address the client sent to, and the one its PMTU cache
//! and any stateful firewall on its path associate with the flow.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4,
    headers::{ETH_HDR_LEN, IPV4_HDR_LEN, IPV6_HDR_LEN},
    icmp::{
        ICMP_HDR_LEN, ICMP4_QUOTE_MAX, ICMP6_QUOTE_MAX, fold, quote_len, write_icmp4_too_big,
        write_icmp6_too_big,
    },
    stat,
};

use crate::{
    maps::ICMP_BUCKETS,
    parse::{Parsed, ptr_at},
    stats::{Exit, drop},
};

/// The exit for a packet of `p` that does not fit once encapsulated, `fits` being the
/// largest inner packet that does: an answer sent (`XDP_TX`, `icmp_too_big_sent`), or a
/// drop counted by why none was sent.
#[inline(always)]
pub(crate) fn too_big(ctx: &XdpContext, p: &Parsed, fits: u32, now: u64) -> Exit {
    // IPv4 without DF: the sender allows fragmentation, so no error is due (RFC 1191 asks
    // for one only with DF), and the balancer does not fragment: the outer header would
    // need fragments the backend's decap has to reassemble. Dropped, counted.
    if !p.dont_fragment {
        return drop(stat::DROP_TOO_BIG_FRAGMENTABLE);
    }
    if !take_token(now) {
        return drop(stat::DROP_TOO_BIG_RATE_LIMITED);
    }
    match answer(ctx, p, fits) {
        Ok(()) => Exit {
            action: xdp_action::XDP_TX,
            reason: stat::ICMP_TOO_BIG_SENT,
        },
        Err(exit) => exit,
    }
}

/// One token of this CPU's ICMP error budget, if there is one.
#[inline(always)]
fn take_token(now: u64) -> bool {
    match ICMP_BUCKETS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled, so
        // nothing else reads or writes it meanwhile.
        Some(bucket) => unsafe { (*bucket).take(now) },
        None => false,
    }
}

/// Rewrites the packet into the ICMP answer. Errors are drops counted as `drop_encap` (a
/// packet the helpers could not resize).
#[inline(always)]
fn answer(ctx: &XdpContext, p: &Parsed, fits: u32) -> Result<(), Exit> {
    let v4 = p.key.family == FAMILY_V4;
    let (hdr_len, max) = if v4 {
        (IPV4_HDR_LEN + ICMP_HDR_LEN, ICMP4_QUOTE_MAX)
    } else {
        (IPV6_HDR_LEN + ICMP_HDR_LEN, ICMP6_QUOTE_MAX)
    };
    let quote = quote_len(p.ip_len as usize, max);
    let l2 = p.l2_len;
    let frame_len = ctx.data_end() - ctx.data();
    // Through memory, so that LLVM cannot fold the subtraction below into the pointer
    // arithmetic (`(l2 + quote) - data_end`, then `- data`): the verifier refuses any
    // arithmetic on `data_end` ("pointer arithmetic on pkt_end prohibited"). A length read
    // back from the stack is a plain scalar.
    // SAFETY: a read of a live, initialised local.
    let frame_len = unsafe { core::ptr::read_volatile(&raw const frame_len) };
    // The parser checked the IP packet is in the frame, so this is never negative.
    let trim = frame_len - (l2 + quote);
    // SAFETY: the helpers take the context pointer the kernel gave this program.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(trim as i32)) } != 0
        // SAFETY: as above.
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hdr_len as i32)) } != 0
    {
        return Err(drop(stat::DROP_ENCAP));
    }

    // The original Ethernet header now starts at `hdr_len`; the new one goes at 0, with the
    // addresses swapped and the tag and EtherType kept.
    let old: *const [u8; ETH_HDR_LEN + 4] = ptr_at(ctx, hdr_len).ok_or(drop(stat::DROP_ENCAP))?;
    // SAFETY: `ptr_at` checked the 18 bytes are in the packet (a tagged header, or an
    // untagged one and the first bytes of the IP header, which stays in the quote).
    let old = unsafe { *old };
    let eth: *mut [u8; ETH_HDR_LEN + 4] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
    // SAFETY: as above, at offset 0; `hdr_len` (28 or 48) keeps it clear of `old`, which was
    // copied out already; packet memory is writable in XDP.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(&old[6..12]);
    eth[6..12].copy_from_slice(&old[..6]);
    if l2 == ETH_HDR_LEN {
        eth[12..14].copy_from_slice(&old[12..14]);
    } else {
        eth[12..18].copy_from_slice(&old[12..18]);
    }

    let quote_sum = quote_sum(ctx, l2 + hdr_len, quote)?;
    let client = &p.key.src_addr;
    let vip = &p.key.dst_addr;
    if v4 {
        let ip: *mut [u8; IPV4_HDR_LEN] = ptr_at(ctx, l2).ok_or(drop(stat::DROP_ENCAP))?;
        let icmp: *mut [u8; ICMP_HDR_LEN] =
            ptr_at(ctx, l2 + IPV4_HDR_LEN).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: `ptr_at` checked both headers are in the packet; they do not overlap each
        // other or `eth` (0..18 at most, the IP header from `l2`, which for a tagged frame is
        // 18); packet memory is writable in XDP.
        unsafe {
            write_icmp4_too_big(
                &mut *ip,
                &mut *icmp,
                [vip[0], vip[1], vip[2], vip[3]],
                [client[0], client[1], client[2], client[3]],
                quote as u16,
                fits.min(u32::from(u16::MAX)) as u16,
                quote_sum,
            );
        }
    } else {
        let ip: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, l2).ok_or(drop(stat::DROP_ENCAP))?;
        let icmp: *mut [u8; ICMP_HDR_LEN] =
            ptr_at(ctx, l2 + IPV6_HDR_LEN).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: as for IPv4.
        unsafe {
            write_icmp6_too_big(
                &mut *ip,
                &mut *icmp,
                vip,
                client,
                quote as u16,
                fits,
                quote_sum,
            );
        }
    }
    Ok(())
}

/// Adds the one's-complement sum of the `N` bytes at `*off` to `*sum` if at least `N` of
/// `*left` remain, and moves past them. `N` is a multiple of 4 of at most 512, as
/// `bpf_csum_diff` requires.
#[inline(always)]
fn sum_chunk<const N: usize>(
    ctx: &XdpContext,
    off: &mut usize,
    left: &mut usize,
    sum: &mut u32,
) -> Result<(), Exit> {
    if *left < N {
        return Ok(());
    }
    let chunk: *mut [u8; N] = ptr_at(ctx, *off).ok_or(drop(stat::DROP_ENCAP))?;
    // SAFETY: `ptr_at` checked the `N` bytes are in the packet; the helper only reads them.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, chunk.cast(), N as u32, *sum) };
    if s < 0 {
        return Err(drop(stat::DROP_ENCAP));
    }
    *sum = s as u32;
    *off += N;
    *left -= N;
    Ok(())
}

/// The folded one's-complement sum, as big-endian words, of the `len` quoted bytes at
/// `off`: `len` is a multiple of 4 below 1536, taken in constant-size chunks (each one
/// checked against the packet end, which the verifier needs for a helper's memory argument).
#[inline(always)]
fn quote_sum(ctx: &XdpContext, mut off: usize, mut left: usize) -> Result<u16, Exit> {
    let mut sum = 0u32;
    sum_chunk::<512>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<512>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<256>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<128>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<64>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<32>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<16>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<8>(ctx, &mut off, &mut left, &mut sum)?;
    sum_chunk::<4>(ctx, &mut off, &mut left, &mut sum)?;
    // `csum_partial` adds the packet's bytes as native-endian words; on a little-endian
    // machine that is the big-endian sum byte-swapped (one's-complement sums commute with
    // the swap), which `from_be` undoes; on a big-endian one it is the sum itself.
    Ok(u16::from_be(fold(sum)))
}
