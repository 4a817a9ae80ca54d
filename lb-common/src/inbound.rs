//! The pure rules for what arrives at a VIP address besides TCP and UDP: which ICMP /
//! ICMPv6 messages the balancer acts on ([`icmp_kind`]), the flow an ICMP error quotes
//! ([`quoted_flow`]), the checksum update of an echo reply ([`csum_replace16`],
//! [`echo_reply_checksum`]) and the `FRAG_SERVICES` key of a fragment ([`fragment_key`]).
//! The datapath and the golden tests share them; they are tested here on the host.

use crate::{FAMILY_V4, FlowKey, VipKey};

/// ICMP echo request / reply (RFC 792).
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMPv6 echo request / reply (RFC 4443 §4).
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Bytes of an ICMP / ICMPv6 header: type, code, checksum, and four bytes whose meaning
/// depends on the type (identifier and sequence, the next-hop MTU, unused).
pub const ICMP_HDR_LEN: usize = 8;
/// Bytes of the quoted transport header an ICMP error must carry for the balancer to act on
/// it: the ports, and what RFC 792 guarantees of the original datagram.
pub const QUOTED_L4_LEN: usize = 8;
/// Hop limit of the balancer's echo replies (the Linux default).
pub const REPLY_TTL: u8 = 64;

/// What the balancer does with an ICMP / ICMPv6 message to a VIP address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// Echo request (code 0): answered when `GLOBAL_ANSWER_PING` is set.
    EchoRequest,
    /// An error that quotes the packet it is about: forwarded to the backend of the quoted
    /// flow. IPv4: destination unreachable (3, every code, fragmentation needed included),
    /// time exceeded (11). ICMPv6: destination unreachable (1), Packet Too Big (2), time
    /// exceeded (3), parameter problem (4).
    Error,
    /// Anything else (echo replies, redirects, router and neighbour discovery, ...): not the
    /// balancer's business; it passes to the kernel as before.
    Other,
}

/// The kind of an ICMP (`family` IPv4) or ICMPv6 message of type `ty` and code `code`.
#[inline(always)]
#[must_use]
pub const fn icmp_kind(family: u8, ty: u8, code: u8) -> IcmpKind {
    if family == FAMILY_V4 {
        match ty {
            ICMP_ECHO_REQUEST if code == 0 => IcmpKind::EchoRequest,
            3 | 11 => IcmpKind::Error,
            _ => IcmpKind::Other,
        }
    } else {
        match ty {
            ICMPV6_ECHO_REQUEST if code == 0 => IcmpKind::EchoRequest,
            1..=4 => IcmpKind::Error,
            _ => IcmpKind::Other,
        }
    }
}

/// The flow an ICMP error is about, as the balancer keys it: the quoted packet went from the
/// VIP to the client, so its reverse (client to VIP, ports swapped) is the flow's key in
/// `CONNTRACK` and what the scheduler hashes.
#[inline(always)]
#[must_use]
pub const fn quoted_flow(quoted: &FlowKey) -> FlowKey {
    FlowKey {
        src_addr: quoted.dst_addr,
        dst_addr: quoted.src_addr,
        src_port_be: quoted.dst_port_be,
        dst_port_be: quoted.src_port_be,
        proto: quoted.proto,
        family: quoted.family,
        _pad: [0; 2],
    }
}

/// An Internet checksum after one 16-bit word it covers changed from `old` to `new`
/// (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`), all in host order.
#[inline(always)]
#[must_use]
pub const fn csum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum of an echo reply made in place from a request with checksum `check`: only
/// the type changes (its word is `type << 8 | code`, the code stays 0). For ICMPv6 the
/// pseudo-header's sum does not change either: swapping source and destination keeps it.
#[inline(always)]
#[must_use]
pub const fn echo_reply_checksum(check: u16, request_type: u8, reply_type: u8) -> u16 {
    csum_replace16(check, (request_type as u16) << 8, (reply_type as u16) << 8)
}

/// The `FRAG_SERVICES` key of an IPv4 fragment to `addr` (16-byte map form) of protocol
/// `proto`: the only fields a fragment without its transport header still has.
#[inline(always)]
#[must_use]
pub const fn fragment_key(addr: [u8; 16], family: u8, proto: u8) -> VipKey {
    VipKey {
        addr,
        port_be: 0,
        proto,
        family,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;
    use crate::{FAMILY_V6, PROTO_TCP};

    /// The Internet checksum of `bytes`, computed from scratch.
    fn full(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0)))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn the_kinds_of_icmp() {
        assert_eq!(icmp_kind(FAMILY_V4, 8, 0), IcmpKind::EchoRequest);
        assert_eq!(icmp_kind(FAMILY_V4, 8, 1), IcmpKind::Other);
        assert_eq!(icmp_kind(FAMILY_V4, 0, 0), IcmpKind::Other);
        for code in 0..16 {
            assert_eq!(icmp_kind(FAMILY_V4, 3, code), IcmpKind::Error);
        }
        assert_eq!(icmp_kind(FAMILY_V4, 11, 0), IcmpKind::Error);
        assert_eq!(icmp_kind(FAMILY_V4, 5, 0), IcmpKind::Other, "redirect");
        assert_eq!(icmp_kind(FAMILY_V6, 128, 0), IcmpKind::EchoRequest);
        assert_eq!(icmp_kind(FAMILY_V6, 129, 0), IcmpKind::Other);
        for ty in 1..=4 {
            assert_eq!(icmp_kind(FAMILY_V6, ty, 0), IcmpKind::Error);
        }
        // Neighbour discovery is the kernel's.
        assert_eq!(icmp_kind(FAMILY_V6, 135, 0), IcmpKind::Other);
        assert_eq!(icmp_kind(FAMILY_V6, 8, 0), IcmpKind::Other);
    }

    #[test]
    fn the_quoted_flow_is_the_reverse() {
        let quoted = FlowKey {
            src_addr: [203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [198, 51, 100, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port_be: 80u16.to_be(),
            dst_port_be: 40000u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let flow = quoted_flow(&quoted);
        assert_eq!(flow.src_addr, quoted.dst_addr);
        assert_eq!(flow.dst_addr, quoted.src_addr);
        assert_eq!(u16::from_be(flow.src_port_be), 40000);
        assert_eq!(u16::from_be(flow.dst_port_be), 80);
        assert_eq!((flow.proto, flow.family), (PROTO_TCP, FAMILY_V4));
        assert_eq!(quoted_flow(&flow), quoted);
    }

    #[test]
    fn incremental_update_matches_a_full_recount() {
        // An echo request with some payload; its checksum from scratch.
        let mut msg = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 7];
        msg.extend_from_slice(b"weir ping payload!");
        let c = full(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(full(&msg), 0);
        // Turned into a reply in place, with the incremental update.
        msg[0] = 0;
        let updated = echo_reply_checksum(c, 8, 0);
        msg[2..4].copy_from_slice(&updated.to_be_bytes());
        assert_eq!(full(&msg), 0, "the reply verifies");
        msg[2..4].copy_from_slice(&[0, 0]);
        assert_eq!(updated, full(&msg), "the same as a recount");
    }

    #[test]
    fn incremental_update_agrees_with_a_recount_for_any_word() {
        // Pseudo-random messages and word changes (carries, all-ones words, zero words): the
        // updated checksum always verifies the changed message.
        let mut x: u32 = 0x1234_5678;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..2000 {
            let mut msg: Vec<u8> = (0..16).map(|_| next() as u8).collect();
            if round % 3 == 0 {
                msg[4..8].copy_from_slice(&[0xff; 4]);
            }
            msg[2..4].copy_from_slice(&[0, 0]);
            let c = full(&msg);
            msg[2..4].copy_from_slice(&c.to_be_bytes());
            let at = 2 * (4 + (next() as usize % 4));
            let old = u16::from_be_bytes([msg[at], msg[at + 1]]);
            let new = match round % 4 {
                0 => 0,
                1 => 0xffff,
                _ => next() as u16,
            };
            msg[at..at + 2].copy_from_slice(&new.to_be_bytes());
            msg[2..4].copy_from_slice(&csum_replace16(c, old, new).to_be_bytes());
            assert_eq!(full(&msg), 0, "round {round}: {msg:02x?}");
        }
    }

    #[test]
    fn a_fragment_key_has_no_port() {
        let k = fragment_key([1; 16], FAMILY_V6, 17);
        assert_eq!((k.port_be, k.proto, k.family), (0, 17, FAMILY_V6));
    }
}
