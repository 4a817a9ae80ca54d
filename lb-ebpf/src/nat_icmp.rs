//! ICMP / ICMPv6 errors about NAT connections (RFC 5508, docs/design/nat.md §8): the
//! translation of an error whose quoted packet belongs to a `NAT_CT` pair, so that the
//! endpoint the error reaches recognises the tuple it sent (path-MTU discovery and port
//! unreachable work through the balancer, both ways). `inbound` parses the error and its
//! quote; this module owns the table lookup, the checks and the rewrite.
//!
//! The quote is the packet the error's sender saw, so the quote reversed is the key of the
//! pair member whose rewrite produced it:
//!
//! | arrives | quote | reversed = | translated to |
//! |---|---|---|---|
//! | at the VIP, from the client side | VIP:vp → client:cp | forward key | outer dst → backend, quote → backend:bp → client:cp |
//! | towards the client, from a backend or a router behind the balancer | client:cp → backend:bp | reply key | outer src → VIP, quote → client:cp → VIP:vp |
//!
//! In both rows the quote becomes the found entry's partner tuple (what the receiver sent)
//! and the outer destination its source. Towards a backend the outer source stays the
//! router's (the balancer is the backends' gateway); towards a client it becomes the VIP.
//! The outer TTL / hop limit is decremented as on the NAT path; the quoted TTL stays.
//!
//! Checksums, all incremental (RFC 1624) and computed before the first write: the outer IPv4
//! header (addresses, TTL), the quoted IPv4 header (addresses), the quoted TCP/UDP checksum
//! when it lies inside the quote (pseudo-header addresses and ports; an IPv4 UDP 0 stays 0),
//! and the ICMP checksum over every word changed in its payload, plus the outer
//! pseudo-header for ICMPv6. Nothing relies on the inner changes cancelling out: a wrong
//! inner checksum stays exactly as wrong, and the ICMP checksum is still right.
//!
//! An error that quotes a pair but cannot be translated safely (its outer addresses do not
//! fit the quote, or the quote is of the other direction) is dropped untouched
//! (`drop_nat_icmp_untranslatable`); one quoting a stale pair is dropped (`drop_nat_stale`).
//! NAT never grows a packet, so the balancer sends no Packet Too Big of its own here.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP,
    headers::{ETH_HDR_LEN, IPV4_HDR_LEN, IPV6_HDR_LEN},
    nat::{NAT_REPLY, NatEntry, addr_delta, csum_apply, fold, ttl_delta, word_delta},
    stat,
};

use crate::{
    clock,
    forward::{egress, write_macs},
    maps::{NAT_CT, STATS},
    nat::{HOP_NO_NEIGH, HOP_OK, honoured, partner_of, reply_hop, scratch_fib, write_word},
    parse::ptr_at,
    stats::{Exit, bump, drop},
};

/// Where an ICMP error's parts lie in the frame, as `inbound` found them (every offset from
/// the frame's start): the IP header, the ICMP header, the quoted IP header, the quoted
/// transport header, and the end of the outer IP packet.
pub(crate) struct QuoteAt {
    pub(crate) l2_len: usize,
    pub(crate) icmp: usize,
    pub(crate) q: usize,
    pub(crate) ql4: usize,
    pub(crate) ip_end: usize,
}

/// An ICMP error whose quote, reversed, is `flow` (ports included; its first 8 transport
/// bytes are in the packet): `Ok(())` when no NAT pair has that key (the caller goes on as
/// before), else the exit of the error: translated and sent on (`nat_icmp_translated`), or
/// dropped. `addressed`: the outer destination is the quote's source, as in any genuine
/// error. `from_backend_side`: the error is a NAT reply candidate (its destination is no VIP).
#[inline(always)]
pub(crate) fn translate(
    ctx: &XdpContext,
    flow: &FlowKey,
    at: &QuoteAt,
    addressed: bool,
    from_backend_side: bool,
) -> Result<(), Exit> {
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Ok(());
    }
    let Some(entry) = NAT_CT.get_ptr_mut(flow) else {
        return Ok(());
    };
    Err(
        match rewrite(ctx, flow, at, entry, addressed, from_backend_side) {
            Ok(action) => Exit {
                action,
                reason: stat::NAT_ICMP_TRANSLATED,
            },
            Err(exit) => exit,
        },
    )
}

#[inline(always)]
const fn untranslatable() -> Exit {
    drop(stat::DROP_NAT_ICMP_UNTRANSLATABLE)
}

/// The checks, then the rewrite of an error quoting the pair member `entry` (key `flow`).
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    flow: &FlowKey,
    at: &QuoteAt,
    entry: *mut NatEntry,
    addressed: bool,
    from_backend_side: bool,
) -> Result<u32, Exit> {
    // SAFETY: a value of `NAT_CT`, valid until this program returns (a deleted element is
    // freed only after an RCU grace period); only read here.
    let e = unsafe { &*entry };
    let reply = e.flags & NAT_REPLY != 0;
    // A forward entry's quote comes back from the client side, to the VIP; a reply entry's
    // from the backend side, to the client. Any other mix, or outer addresses that do not
    // fit the quote, would be translated into an error about a connection it is not about.
    if reply != from_backend_side || !addressed {
        return Err(untranslatable());
    }
    // The data path's own judgement of the pair: a stale pair is no connection any more
    // (RFC 5508 REQ-3: silently dropped), and it is never refreshed by an error.
    let (_, backend) = honoured(e).ok_or(drop(stat::DROP_NAT_STALE))?;
    let now = clock::now();
    // SAFETY: as above, for the partner's value.
    if e.idle(now) && partner_of(flow, entry).is_none_or(|p| unsafe { (*p).idle(now) }) {
        return Err(drop(stat::DROP_NAT_STALE));
    }

    let v4 = flow.family == FAMILY_V4;
    let alen = if v4 { 4 } else { 16 };
    let l3 = at.l2_len;
    let ttl: *mut u8 = ptr_at(ctx, l3 + if v4 { 8 } else { 7 }).ok_or(untranslatable())?;
    // SAFETY: `ptr_at` checked the byte is in the packet.
    if unsafe { *ttl } <= 1 {
        return Err(drop(stat::DROP_TTL));
    }
    // The next hop first, before any write (a failed lookup leaves the packet as it came)
    // and before the pointers and sums below, which would otherwise be kept on the stack
    // across the helper calls.
    let mut to_kernel = false;
    let (ifindex, smac, dmac) = if reply {
        match reply_hop(ctx, entry, flow.family, now) {
            HOP_OK => {}
            HOP_NO_NEIGH => to_kernel = true,
            _ => return Err(drop(stat::DROP_FIB)),
        }
        // SAFETY: as above; `reply_hop` wrote the hop fields it just resolved.
        let e = unsafe { &*entry };
        (e.hop_ifindex, e.hop_smac, e.hop_dmac)
    } else {
        // A plain FIB lookup, not the per-backend cache of the NAT path: errors are rare,
        // and a second inlined copy of the cache's code does not fit the stack.
        // SAFETY: as above.
        let e = unsafe { &*entry };
        let params = scratch_fib(ctx, flow.family, &e.new_src_addr, &backend.addr)
            .map_err(|_| drop(stat::DROP_FIB))?;
        // SAFETY: the scratch's parameters, filled by a successful lookup.
        let params = unsafe { &*params };
        (params.ifindex, params.smac, params.dmac)
    };

    // SAFETY: as above (`reply_hop` wrote only the hop fields).
    let e = unsafe { &*entry };
    let icmp_csum: *mut [u8; 2] = ptr_at(ctx, at.icmp + 2).ok_or(untranslatable())?;
    let ports: *mut [u8; 4] = ptr_at(ctx, at.ql4).ok_or(untranslatable())?;
    let udp = flow.proto == PROTO_UDP;
    let csum_at = at.ql4 + if udp { 6 } else { 16 };
    // The quoted transport checksum, if the quote holds it (TCP quotes of 8 to 17 bytes
    // do not): updated, else left as quoted.
    // A flag rather than an `Option` of the pointer: the verifier must see the pointer come
    // from its bounds check where it is used.
    let has_l4_csum = csum_at + 2 <= at.ip_end;

    // The quote becomes the entry's partner tuple: source ← the entry's new destination,
    // destination ← its new source, and the ports alike. The quote's present tuple is
    // `flow` reversed.
    let quote_addrs = fold(addr_delta(
        addr_delta(0, &flow.dst_addr, &e.new_dst_addr, alen),
        &flow.src_addr,
        &e.new_src_addr,
        alen,
    )) as u32;
    let quote_ports = word_delta(flow.dst_port_be, e.new_dst_port_be)
        + word_delta(flow.src_port_be, e.new_src_port_be);
    let mut icmp_delta = quote_addrs + quote_ports;
    let mut l4_new = 0u16;
    if has_l4_csum {
        let c: *const [u8; 2] = ptr_at(ctx, csum_at).ok_or(untranslatable())?;
        // SAFETY: `ptr_at` checked the two bytes are in the packet.
        let old = u16::from_ne_bytes(unsafe { *c });
        l4_new = old;
        // IPv4 UDP 0: the quoted datagram carried no checksum; it still carries none.
        if !(udp && old == 0) {
            l4_new = csum_apply(old, fold(quote_addrs + quote_ports));
            if udp && l4_new == 0 {
                l4_new = 0xffff;
            }
        }
        icmp_delta += word_delta(old, l4_new);
    }

    // The outer header: destination ← the quote's new source; towards a client the source
    // becomes the VIP (the entry's new source), towards a backend it stays the router's.
    // Summed from the packet's words where they lie: copies on the stack would not fit it.
    let outer = if v4 {
        let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l3).ok_or(untranslatable())?;
        // SAFETY: `ptr_at` checked the header is in the packet; read only.
        let ip = unsafe { &*ip };
        let d = hdr_delta(0, ip, 16, &e.new_dst_addr, 4);
        if reply {
            hdr_delta(d, ip, 12, &e.new_src_addr, 4)
        } else {
            d
        }
    } else {
        let ip: *const [u8; IPV6_HDR_LEN] = ptr_at(ctx, l3).ok_or(untranslatable())?;
        // SAFETY: as above.
        let ip = unsafe { &*ip };
        let d = hdr_delta(0, ip, 24, &e.new_dst_addr, 16);
        if reply {
            hdr_delta(d, ip, 8, &e.new_src_addr, 16)
        } else {
            d
        }
    };
    let outer = fold(outer) as u32;
    let mut outer_ip_new = 0u16;
    let mut quote_ip_new = 0u16;
    let outer_ip: *mut [u8; IPV4_HDR_LEN] = ptr_at(ctx, l3).ok_or(untranslatable())?;
    let quote_v4: *mut [u8; IPV4_HDR_LEN] = ptr_at(ctx, at.q).ok_or(untranslatable())?;
    if v4 {
        // SAFETY: `ptr_at` checked both headers are in the packet; read only here.
        let (old_outer, old_quote) = unsafe {
            (
                u16::from_ne_bytes([(*outer_ip)[10], (*outer_ip)[11]]),
                u16::from_ne_bytes([(*quote_v4)[10], (*quote_v4)[11]]),
            )
        };
        outer_ip_new = csum_apply(old_outer, fold(outer + ttl_delta()));
        quote_ip_new = csum_apply(old_quote, quote_addrs as u16);
        icmp_delta += word_delta(old_quote, quote_ip_new);
    } else {
        // ICMPv6 sums the outer pseudo-header too.
        icmp_delta += outer;
    }
    // SAFETY: `ptr_at` checked the two bytes are in the packet.
    let icmp_new = csum_apply(u16::from_ne_bytes(unsafe { *icmp_csum }), fold(icmp_delta));

    // Nothing below can fail: the `ptr_at` checks repeated here (for the verifier, which
    // must see each pointer come from its check) passed once already above.
    // SAFETY: every pointer was checked by `ptr_at` above and the IPv6 headers are in the
    // packet as the IPv4 ones; packet memory is writable in XDP, and no other reference to
    // it is alive (`e` is read only).
    unsafe {
        let e = &*entry;
        if v4 {
            let ip = &mut *outer_ip;
            ip[8] -= 1;
            ip[10..12].copy_from_slice(&outer_ip_new.to_ne_bytes());
            write_word(ip, 16, &e.new_dst_addr, 0);
            if reply {
                write_word(ip, 12, &e.new_src_addr, 0);
            }
            let q = &mut *quote_v4;
            q[10..12].copy_from_slice(&quote_ip_new.to_ne_bytes());
            write_word(q, 12, &e.new_dst_addr, 0);
            write_word(q, 16, &e.new_src_addr, 0);
        } else {
            let ip: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, l3).ok_or(untranslatable())?;
            let q: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, at.q).ok_or(untranslatable())?;
            let (ip, q) = (&mut *ip, &mut *q);
            ip[7] -= 1;
            let mut i = 0;
            while i < 4 {
                write_word(ip, 24 + 4 * i, &e.new_dst_addr, 4 * i);
                if reply {
                    write_word(ip, 8 + 4 * i, &e.new_src_addr, 4 * i);
                }
                write_word(q, 8 + 4 * i, &e.new_dst_addr, 4 * i);
                write_word(q, 24 + 4 * i, &e.new_src_addr, 4 * i);
                i += 1;
            }
        }
        let ports = &mut *ports;
        ports[0..2].copy_from_slice(&e.new_dst_port_be.to_ne_bytes());
        ports[2..4].copy_from_slice(&e.new_src_port_be.to_ne_bytes());
        if has_l4_csum {
            let c: *mut [u8; 2] = ptr_at(ctx, csum_at).ok_or(untranslatable())?;
            *c = l4_new.to_ne_bytes();
        }
        *icmp_csum = icmp_new.to_ne_bytes();
    }
    if to_kernel {
        // As on the NAT reply path: the kernel forwards it and resolves the neighbour.
        bump(STATS.get_ptr_mut(0), stat::NAT_TO_KERNEL);
        return Ok(xdp_action::XDP_PASS);
    }
    write_macs(ctx, &smac, &dmac)?;
    egress(ctx, ifindex, l3 != ETH_HDR_LEN)
}

/// `nat::addr_delta` with the old address read where it lies in a header (`len` bytes from
/// byte `at`): `~m + m'` for each changed 16-bit word, added to `sum`.
#[inline(always)]
fn hdr_delta<const N: usize>(
    mut sum: u32,
    hdr: &[u8; N],
    at: usize,
    new: &[u8; 16],
    len: usize,
) -> u32 {
    let mut i = 0;
    while i < len && i < 16 {
        if let (Some(&a), Some(&b)) = (hdr.get(at + i), hdr.get(at + i + 1)) {
            sum += word_delta(
                u16::from_ne_bytes([a, b]),
                u16::from_ne_bytes([new[i], new[i + 1]]),
            );
        }
        i += 2;
    }
    sum
}
