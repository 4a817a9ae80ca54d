//! What arrives at a VIP address besides TCP and UDP that the balancer acts on, off the
//! TCP/UDP path (the parser hands these packets over, `parse::TO_ICMP` / `TO_FRAGMENT`):
//!
//! * ICMP / ICMPv6 errors quoting a packet a VIP sent: forwarded, whole, to the backend of
//!   the quoted flow (its tracked backend, else the service's hash), so that the backend's
//!   own path-MTU discovery and error handling work across DSR. Never tracked, never a new
//!   flow, never answered with an ICMP error. An error quoting a NAT connection, in either
//!   direction (to a VIP, or a NAT reply candidate towards a client), is translated by
//!   `nat_icmp` instead.
//! * ICMP / ICMPv6 echo requests: answered in place (`XDP_TX`) when `GLOBAL_ANSWER_PING`.
//! * IPv4 fragments of an `ip-hash` service (`FRAG_SERVICES`): forwarded by the source
//!   hash, like the rest of the client's packets; other fragments are dropped.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FORWARD_NAT, FlowKey, GLOBAL_ANSWER_PING, PROTO_TCP, PROTO_UDP,
    SCHED_IP_HASH,
    csum::ipv4_header_checksum,
    headers::{ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN},
    inbound::{
        ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HDR_LEN, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST,
        IcmpKind, QUOTED_L4_LEN, REPLY_TTL, echo_reply_checksum, fragment_key, icmp_kind,
    },
    stat,
};

use crate::{
    balance::{Job, lookup_vip},
    clock, conntrack,
    maps::{BACKENDS, FRAG_SERVICES, GLOBAL, SERVICES},
    nat,
    nat_icmp::{self, QuoteAt},
    parse::{Parsed, copy_words, l2, ptr_at},
    sched::schedule,
    stats::{Exit, drop, pass},
};

/// The largest ICMP error forwarded, IP header included: what RFC 1812 §4.3.2.3 (IPv4) and
/// RFC 4443 §2.4 (IPv6) allow a router to send. A larger one is no conforming error; refusing
/// it also means a forwarded error always fits the tunnel, so it can never itself need a
/// "too big" answer (RFC 1122 §3.2.2: no ICMP error about an ICMP error).
const MAX_ICMP_ERROR_V4: usize = 576;
const MAX_ICMP_ERROR_V6: usize = 1280;

/// An ICMP / ICMPv6 packet for a VIP address, or (`candidate`) a NAT reply candidate: one
/// for another destination that may be an error about a NAT connection (the parser checked
/// the IP header: version, lengths, TTL). A candidate is not ours until `NAT_CT` says so:
/// every refusal before that is a pass.
#[inline(always)]
pub(crate) fn icmp(ctx: &XdpContext, candidate: bool) -> Result<Job, Exit> {
    let (l2_len, ether_type) = l2(ctx).ok_or(refuse(candidate, stat::DROP_TRUNC_ETH))?;
    // Each family parses its error; what follows is one call site for both (each inlined
    // copy of the translation takes its own stack slots).
    let error = if ether_type == ETH_P_IP {
        icmp_v4(ctx, l2_len, candidate)?
    } else if ether_type == ETH_P_IPV6 {
        icmp_v6(ctx, l2_len, candidate)?
    } else {
        return Err(pass(stat::PASS_NON_IP));
    };
    // SAFETY: this CPU's scratch, written by the family's parser just now; nothing else
    // writes its `icmp_flow` while this program runs.
    let flow = unsafe { &*error.flow };
    nat_icmp::translate(ctx, flow, &error.at, error.addressed, candidate)?;
    if candidate {
        return Err(pass(stat::PASS_NAT_NO_ENTRY));
    }
    if !error.addressed {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    forward_error(*flow, l2_len, error.ip_len, error.dont_fragment)
}

/// An ICMP error and its quote, as the family's parser found them.
struct IcmpError {
    /// The quoted flow reversed (ports included), as the tables key it: client to VIP, or
    /// for a NAT reply candidate, backend to client. In this CPU's NAT scratch: a key on
    /// the stack here would not fit it.
    flow: *mut FlowKey,
    at: QuoteAt,
    /// The outer destination is the quote's source, as in any error about that packet.
    addressed: bool,
    ip_len: u16,
    dont_fragment: bool,
}

/// The refusal of an ICMP packet: dropped for `reason` if it is for a VIP address, passed
/// if it is a NAT reply candidate (`pass_nat_no_entry`: nothing says it is ours).
#[inline(always)]
const fn refuse(candidate: bool, reason: u32) -> Exit {
    if candidate {
        pass(stat::PASS_NAT_NO_ENTRY)
    } else {
        drop(reason)
    }
}

#[inline(always)]
fn icmp_v4(ctx: &XdpContext, l2_len: usize, candidate: bool) -> Result<IcmpError, Exit> {
    let ip: *mut [u8; IPV4_HDR_LEN] =
        ptr_at(ctx, l2_len).ok_or(refuse(candidate, stat::DROP_TRUNC_IPV4))?;
    // SAFETY: `ptr_at` checked the fixed header is in the packet; read only here.
    let (ihl, ip_len, df) = unsafe {
        (
            (((*ip)[0] & 0x0f) as usize) * 4,
            u16::from_be_bytes([(*ip)[2], (*ip)[3]]),
            (*ip)[6] & 0x40 != 0,
        )
    };
    let ip_end = l2_len + ip_len as usize;
    let l4 = l2_len + ihl;
    let hdr: *mut [u8; ICMP_HDR_LEN] =
        ptr_at(ctx, l4).ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?;
    if l4 + ICMP_HDR_LEN > ip_end {
        return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
    }
    // SAFETY: `ptr_at` checked the 8 bytes are in the packet.
    let (ty, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    match icmp_kind(FAMILY_V4, ty, code) {
        // Echo and the rest are for VIP addresses only; a candidate's are not ours.
        IcmpKind::EchoRequest | IcmpKind::Other if candidate => Err(pass(stat::PASS_NOT_VIP)),
        IcmpKind::EchoRequest => {
            answering()?;
            // Options (record route, timestamps) would ask for more than a swap; the
            // kernel sees those as before.
            if ihl != IPV4_HDR_LEN {
                return Err(pass(stat::PASS_NOT_VIP));
            }
            swap_macs(ctx)?;
            // SAFETY: both headers are in the packet (`ptr_at` above); packet memory is
            // writable in XDP and nothing else refers to it now.
            let (ip, hdr) = unsafe { (&mut *ip, &mut *hdr) };
            let mut addr = [0u8; 4];
            addr.copy_from_slice(&ip[12..16]);
            ip.copy_within(16..20, 12);
            ip[16..20].copy_from_slice(&addr);
            ip[8] = REPLY_TTL;
            ip[10] = 0;
            ip[11] = 0;
            let c = ipv4_header_checksum(ip).to_be_bytes();
            ip[10] = c[0];
            ip[11] = c[1];
            echo_reply(hdr, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY);
            Err(answered())
        }
        IcmpKind::Error => {
            if ip_len as usize > MAX_ICMP_ERROR_V4 {
                return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
            }
            let q = l4 + ICMP_HDR_LEN;
            let quoted: *const [u8; IPV4_HDR_LEN] =
                ptr_at(ctx, q).ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?;
            // SAFETY: `ptr_at` checked the quoted fixed header is in the packet.
            let quoted = unsafe { &*quoted };
            let qihl = ((quoted[0] & 0x0f) as usize) * 4;
            if quoted[0] >> 4 != 4 || qihl < IPV4_HDR_LEN {
                return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
            }
            let ql4 = q + qihl;
            let ports: *const [u8; QUOTED_L4_LEN] =
                ptr_at(ctx, ql4).ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?;
            if ql4 + QUOTED_L4_LEN > ip_end {
                return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
            }
            // The quoted flow reversed: client to VIP (or, for a candidate, backend to
            // client), as the tables key it.
            let flow = &mut nat::scratch()
                .ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?
                .icmp_flow;
            flow.family = FAMILY_V4;
            flow.proto = quoted[9];
            flow._pad = [0; 2];
            flow.src_addr = [0; 16];
            flow.dst_addr = [0; 16];
            copy_words(&mut flow.src_addr, quoted, 16, 1);
            copy_words(&mut flow.dst_addr, quoted, 12, 1);
            // SAFETY: `ptr_at` checked the quoted ports are in the packet.
            let ports = unsafe { &*ports };
            flow.src_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
            flow.dst_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
            // SAFETY: the outer header is in the packet (`ptr_at` above); read only.
            let outer_dst = unsafe { [(*ip)[16], (*ip)[17], (*ip)[18], (*ip)[19]] };
            let addressed = flow.dst_addr[..4] == outer_dst;
            Ok(IcmpError {
                flow: core::ptr::from_mut(flow),
                at: QuoteAt {
                    l2_len,
                    icmp: l4,
                    q,
                    ql4,
                    ip_end,
                },
                addressed,
                ip_len,
                dont_fragment: df,
            })
        }
        IcmpKind::Other => Err(pass(stat::PASS_NOT_VIP)),
    }
}

#[inline(always)]
fn icmp_v6(ctx: &XdpContext, l2_len: usize, candidate: bool) -> Result<IcmpError, Exit> {
    let ip: *mut [u8; IPV6_HDR_LEN] =
        ptr_at(ctx, l2_len).ok_or(refuse(candidate, stat::DROP_TRUNC_IPV6))?;
    // SAFETY: `ptr_at` checked the fixed header is in the packet; read only here.
    let payload_len = unsafe { u16::from_be_bytes([(*ip)[4], (*ip)[5]]) };
    let ip_len = payload_len.wrapping_add(IPV6_HDR_LEN as u16);
    let ip_end = l2_len + IPV6_HDR_LEN + payload_len as usize;
    let l4 = l2_len + IPV6_HDR_LEN;
    let hdr: *mut [u8; ICMP_HDR_LEN] =
        ptr_at(ctx, l4).ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?;
    if l4 + ICMP_HDR_LEN > ip_end {
        return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
    }
    // SAFETY: `ptr_at` checked the 8 bytes are in the packet.
    let (ty, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    match icmp_kind(FAMILY_V6, ty, code) {
        // Echo and the rest are for VIP addresses only; a candidate's are not ours.
        IcmpKind::EchoRequest | IcmpKind::Other if candidate => Err(pass(stat::PASS_NOT_VIP)),
        IcmpKind::EchoRequest => {
            answering()?;
            swap_macs(ctx)?;
            // SAFETY: both headers are in the packet (`ptr_at` above); packet memory is
            // writable in XDP and nothing else refers to it now.
            let (ip, hdr) = unsafe { (&mut *ip, &mut *hdr) };
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&ip[8..24]);
            ip.copy_within(24..40, 8);
            ip[24..40].copy_from_slice(&addr);
            ip[7] = REPLY_TTL;
            echo_reply(hdr, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
            Err(answered())
        }
        IcmpKind::Error => {
            if ip_len as usize > MAX_ICMP_ERROR_V6 {
                return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
            }
            let q = l4 + ICMP_HDR_LEN;
            let quoted: *const [u8; IPV6_HDR_LEN] =
                ptr_at(ctx, q).ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?;
            let ql4 = q + IPV6_HDR_LEN;
            let ports: *const [u8; QUOTED_L4_LEN] =
                ptr_at(ctx, ql4).ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?;
            if ql4 + QUOTED_L4_LEN > ip_end {
                return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
            }
            // SAFETY: `ptr_at` checked the quoted fixed header is in the packet.
            let quoted = unsafe { &*quoted };
            if quoted[0] >> 4 != 6 {
                return Err(refuse(candidate, stat::DROP_ICMP_MALFORMED));
            }
            // A quote with extension headers is about no TCP/UDP flow the balancer made
            // (VIP flows have none): `forward_error` lets it pass.
            let flow = &mut nat::scratch()
                .ok_or(refuse(candidate, stat::DROP_ICMP_MALFORMED))?
                .icmp_flow;
            flow.family = FAMILY_V6;
            flow.proto = quoted[6];
            flow._pad = [0; 2];
            copy_words(&mut flow.src_addr, quoted, 24, 4);
            copy_words(&mut flow.dst_addr, quoted, 8, 4);
            // SAFETY: `ptr_at` checked the quoted ports are in the packet.
            let ports = unsafe { &*ports };
            flow.src_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
            flow.dst_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
            let mut outer_dst = [0u8; 16];
            // SAFETY: the outer header is in the packet (`ptr_at` above); read only.
            copy_words(&mut outer_dst, unsafe { &*ip }, 24, 4);
            let addressed = flow.dst_addr == outer_dst;
            Ok(IcmpError {
                flow: core::ptr::from_mut(flow),
                at: QuoteAt {
                    l2_len,
                    icmp: l4,
                    q,
                    ql4,
                    ip_end,
                },
                addressed,
                ip_len,
                dont_fragment: true,
            })
        }
        IcmpKind::Other => Err(pass(stat::PASS_NOT_VIP)),
    }
}

/// The exit of an answered echo request: the rewritten packet goes back out (`XDP_TX`),
/// counted as `icmp_echo_replied`.
#[inline(always)]
const fn answered() -> Exit {
    Exit {
        action: xdp_action::XDP_TX,
        reason: stat::ICMP_ECHO_REPLIED,
    }
}

/// Echo requests are answered only with `GLOBAL_ANSWER_PING`; otherwise they pass.
#[inline(always)]
fn answering() -> Result<(), Exit> {
    match GLOBAL.get(0) {
        Some(g) if g.flags & GLOBAL_ANSWER_PING != 0 => Ok(()),
        _ => Err(pass(stat::PASS_NOT_VIP)),
    }
}

/// The frame goes back where it came from.
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), Exit> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_TRUNC_ETH))?;
    // SAFETY: `ptr_at` checked the 12 address bytes are in the packet; packet memory is
    // writable in XDP, and no other reference to it is alive.
    let eth = unsafe { &mut *eth };
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&eth[..6]);
    eth.copy_within(6..12, 0);
    eth[6..12].copy_from_slice(&dst);
    Ok(())
}

/// Turns an echo request's header into the reply's: type, and the checksum updated for it.
#[inline(always)]
fn echo_reply(hdr: &mut [u8; ICMP_HDR_LEN], request: u8, reply: u8) {
    let check = u16::from_be_bytes([hdr[2], hdr[3]]);
    let c = echo_reply_checksum(check, request, reply).to_be_bytes();
    hdr[0] = reply;
    hdr[2] = c[0];
    hdr[3] = c[1];
}

/// Forwards an ICMP error whose quoted packet went from a VIP to a client (`key`: that
/// flow reversed, client to VIP, as the tables key it), to the backend of that flow: its
/// tracked backend while the entry is fresh and honoured, as the TCP/UDP path decides, else
/// the service's hash, as for an untracked mid-flow packet. Nothing is tracked or refreshed.
/// A NAT service's flow has no pair here (`nat_icmp` found none): it is dropped
/// (`drop_nat_stale`, RFC 5508 REQ-3), as its backend knows no such tuple.
#[inline(always)]
fn forward_error(
    key: FlowKey,
    l2_len: usize,
    ip_len: u16,
    dont_fragment: bool,
) -> Result<Job, Exit> {
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    let (vip, _) = lookup_vip(&key).ok_or(pass(stat::PASS_NOT_VIP))?;
    if vip.forwarding == FORWARD_NAT {
        return Err(drop(stat::DROP_NAT_STALE));
    }
    let now = clock::now();
    let timeout_s = if key.proto == PROTO_TCP {
        vip.tcp_idle_timeout_s
    } else {
        vip.udp_idle_timeout_s
    };
    let timeout_ns = u64::from(timeout_s) * 1_000_000_000;
    // SAFETY: a value of a connection table, valid until this program returns (both are
    // preallocated); only read.
    let tracked = conntrack::lookup_any(&key)
        .map(|f| unsafe { &*f })
        .and_then(|f| {
            let fresh = timeout_ns == 0 || now.saturating_sub(f.last_seen_ns) <= timeout_ns;
            fresh
                .then(|| conntrack::honoured(f, vip.service_id).map(|b| (f.backend_id, b)))
                .flatten()
        });
    let (backend_id, backend) = match tracked {
        Some(found) => found,
        None => {
            let id = schedule(vip, &key, true)?;
            (id, BACKENDS.get(id).ok_or(drop(stat::DROP_NO_BACKEND))?)
        }
    };
    Ok(Job {
        p: Parsed {
            key,
            l2_len,
            ip_len,
            dont_fragment,
            tcp_flags: 0,
            nat: 0,
        },
        vip,
        backend_id,
        backend,
        new_flow: false,
        now,
        counter: stat::ICMP_ERROR_FORWARDED,
        nat: core::ptr::null_mut(),
    })
}

/// An IPv4 fragment for a VIP address (the parser checked the header's version, lengths).
/// Forwarded when its (address, protocol) belongs to one `ip-hash` service: by the source
/// hash, which all its fragments and the client's unfragmented packets share. Otherwise it
/// is dropped, as without ports it cannot be matched to a service or a flow.
#[inline(always)]
pub(crate) fn fragment(ctx: &XdpContext) -> Result<Job, Exit> {
    let (l2_len, _) = l2(ctx).ok_or(drop(stat::DROP_TRUNC_ETH))?;
    let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
    // SAFETY: `ptr_at` checked the fixed header is in the packet; nothing writes the packet
    // while this shared borrow lives (it ends before `forward`).
    let ip = unsafe { &*ip };
    let mut key = FlowKey {
        family: FAMILY_V4,
        proto: ip[9],
        ..FlowKey::default()
    };
    copy_words(&mut key.dst_addr, ip, 16, 1);
    let ip_len = u16::from_be_bytes([ip[2], ip[3]]);
    let dont_fragment = ip[6] & 0x40 != 0;
    let ttl = ip[8];
    let frag_key = fragment_key(key.dst_addr, FAMILY_V4, key.proto);
    // SAFETY: the value is copied out at once.
    let service_id = unsafe { FRAG_SERVICES.get(&frag_key) }
        .copied()
        .ok_or(drop(stat::DROP_FRAGMENT))?;
    let vip = SERVICES.get(service_id).ok_or(drop(stat::DROP_FRAGMENT))?;
    // The entry is the agent's word that the service is the address's only one for this
    // protocol; the service's own entry must still agree (a voided or reused id does not).
    if vip.service_id != service_id || vip.ring_size == 0 || vip.scheduler != SCHED_IP_HASH {
        return Err(drop(stat::DROP_FRAGMENT));
    }
    if ttl == 0 {
        return Err(drop(stat::DROP_TTL));
    }
    copy_words(&mut key.src_addr, ip, 12, 1);
    let backend_id = schedule(vip, &key, true)?;
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(drop(stat::DROP_NO_BACKEND))?;
    Ok(Job {
        p: Parsed {
            key,
            l2_len,
            ip_len,
            dont_fragment,
            tcp_flags: 0,
            nat: 0,
        },
        vip,
        backend_id,
        backend,
        new_flow: false,
        now: clock::now(),
        counter: stat::FRAGMENT_FORWARDED,
        nat: core::ptr::null_mut(),
    })
}
