//! The NAT modes (`forwarding = "nat"` and `"fullnat"`, docs/design/nat.md): the value of the
//! NAT connection table (`NatEntry`), its flags, the TCP states and their timeouts, the pure
//! state machine ([`tcp_next`]), the partner rule ([`NatEntry::partner_key`]), the RFC 1624
//! incremental checksum arithmetic ([`csum_delta`], [`csum_apply`]), and fullnat's SNAT pool
//! entry ([`SnatSource`]) with its probe sequence ([`snat_probe`]). Everything here is pure
//! and shared: the datapath makes and follows the pairs, the agent's table walk judges them
//! by the same rules, and the host tests check the rules once.

use crate::{FAMILY_V4, FlowKey};

/// Default number of NAT connections (pairs); `NAT_CT` holds twice as many entries.
pub const DEFAULT_NAT_CONNECTIONS: u32 = 1 << 18;

/// `NatEntry::flags`: this key is the reply direction (backend → client).
pub const NAT_REPLY: u64 = 8;
/// A reply was seen (UDP: the pair gets the full idle timeout).
pub const NAT_REPLIED: u64 = 32;
/// A FIN was seen from the client (forward) / from the backend (reply).
pub const NAT_FIN_FWD: u64 = 64;
pub const NAT_FIN_REPLY: u64 = 128;
/// A RST was seen from the client (forward) / from the backend (reply).
pub const NAT_RST_FWD: u64 = 256;
pub const NAT_RST_REPLY: u64 = 512;
/// The pair was made from a mid-flow packet (the table had lost the connection).
pub const NAT_PICKED_UP: u64 = 1024;
/// The flags the TCP state machine owns (written into both entries of a pair).
pub const NAT_STATE_FLAGS: u64 =
    NAT_REPLIED | NAT_FIN_FWD | NAT_FIN_REPLY | NAT_RST_FWD | NAT_RST_REPLY;

/// `NatEntry::snat_slot` of a `nat` pair (no source translation).
pub const NAT_NO_SNAT: u8 = 0xff;

/// `fullnat`: the most SNAT addresses a service may have (`SNAT_POOL` holds this many per
/// service id).
pub const MAX_SNAT_ADDRS: u32 = 16;
/// `fullnat`: SNAT ports tried for one new connection before it is refused. Bounded so
/// that the verifier sees a small loop; exact (refused only when every port is taken) when
/// addresses x ports is at most this.
pub const SNAT_PROBES: u32 = 64;
/// Default `[agent] snat_ports`: above Linux's default ephemeral range (32768-60999), so
/// that nothing need be reserved.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);

/// Value of `SNAT_POOL`: one SNAT address of a `fullnat` service and its port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatSource {
    /// The address (IPv4 in `[..4]`), of the service's family.
    pub addr: [u8; 16],
    /// First port of the range, host order (a number, not a wire field).
    pub first_port_host: u16,
    /// Ports in the range, from `first_port_host`; 0: the slot is unused.
    pub port_count: u16,
}
const _: () = assert!(size_of::<SnatSource>() == 20);

/// Probe `i` of a new connection's SNAT allocation: the pool slot to try and the port's
/// offset in that slot's range, for a service of `count` addresses of `ports` ports each.
/// The address is spread by the flow's hash `h`, the port walks linearly from the random
/// start `r`: every (address, port) is visited once in the first `count * ports` probes.
#[inline(always)]
#[must_use]
pub const fn snat_probe(h: u32, r: u32, i: u32, count: u32, ports: u32) -> (u32, u32) {
    let count = if count == 0 { 1 } else { count };
    let ports = if ports == 0 { 1 } else { ports };
    (
        (h % count + i % count) % count,
        (r % ports + (i / count) % ports) % ports,
    )
}

/// TCP states of a pair (`NatEntry::tcp_state`); 0 for UDP.
pub const NAT_TCP_NONE: u8 = 0;
pub const NAT_TCP_SYN_SENT: u8 = 1;
pub const NAT_TCP_SYN_RECV: u8 = 2;
pub const NAT_TCP_ESTABLISHED: u8 = 3;
pub const NAT_TCP_FIN_WAIT: u8 = 4;
pub const NAT_TCP_TIME_WAIT: u8 = 5;
pub const NAT_TCP_CLOSE: u8 = 6;

/// Idle timeouts of the transitory TCP states (IPVS's `tcp_timeouts`, collapsed), seconds.
pub const NAT_TIMEOUT_SYN_S: u32 = 60;
pub const NAT_TIMEOUT_FIN_WAIT_S: u32 = 120;
pub const NAT_TIMEOUT_TIME_WAIT_S: u32 = 120;
pub const NAT_TIMEOUT_CLOSE_S: u32 = 10;
/// A UDP pair that has seen no reply yet (as Linux conntrack's unreplied UDP).
pub const NAT_TIMEOUT_UDP_UNREPLIED_S: u32 = 30;

/// Margin the agent's walk adds to an entry's timeout before it reclaims it: the datapath's
/// clock is read once per jiffy and `last_seen_ns` is refreshed once a second.
pub const NAT_RECLAIM_MARGIN_NS: u64 = 2_000_000_000;

/// TCP flag bits as in the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Value of `NAT_CT`: how to rewrite packets whose tuple is the key, and the pair's state.
/// A pair is two entries: the forward key (client → VIP) and the reply key (backend →
/// client), each finding the other by [`NatEntry::partner_key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    /// The packet's new source (IPv4 in `[..4]`).
    pub new_src_addr: [u8; 16],
    /// The packet's new destination.
    pub new_dst_addr: [u8; 16],
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    /// One's-complement sums (RFC 1624 eqn 3, the `~m + m'` part) over the changed 16-bit
    /// words read in native order, applied to a checksum field read in native order. IPv4
    /// header: the changed addresses and the TTL decrement; 0 for IPv6.
    pub ip_csum_delta_ne: u16,
    /// TCP/UDP: the pseudo-header addresses and both ports.
    pub l4_csum_delta_ne: u16,
    pub backend_id: u32,
    /// `BackendInfo::generation` at creation.
    pub generation: u32,
    /// The coarse clock of the last packet, refreshed at `LAST_SEEN_GRANULARITY_NS`.
    pub last_seen_ns: u64,
    /// `NAT_*`, and on forward entries `FLOW_COUNTED` / `FLOW_CLOSED` (u64 for atomics).
    pub flags: u64,
    /// Idle timeout of the current state, seconds.
    pub timeout_s: u32,
    /// Reply entries: the cached next hop towards the client; 0 = not resolved.
    pub hop_ifindex: u32,
    pub hop_expires_ns: u64,
    pub hop_smac: [u8; 6],
    pub hop_dmac: [u8; 6],
    /// Egress MTU from the FIB (0: not known).
    pub hop_mtu: u16,
    /// `NAT_TCP_*`; 0 for UDP.
    pub tcp_state: u8,
    /// Index in the service's SNAT pool; `NAT_NO_SNAT` for `nat`.
    pub snat_slot: u8,
}
const _: () = assert!(size_of::<NatEntry>() == 96);

impl NatEntry {
    /// The key of this entry's partner: the rewritten tuple, reversed.
    #[inline(always)]
    #[must_use]
    pub const fn partner_key(&self, key: &FlowKey) -> FlowKey {
        FlowKey {
            src_addr: self.new_dst_addr,
            dst_addr: self.new_src_addr,
            src_port_be: self.new_dst_port_be,
            dst_port_be: self.new_src_port_be,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        }
    }

    /// Whether the entry is idle past its timeout at `now_ns`.
    #[inline(always)]
    #[must_use]
    pub const fn idle(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_s as u64 * 1_000_000_000
    }
}

/// One's-complement addition of 16-bit words in a 32-bit accumulator, folded.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The native-order 16-bit word at byte `i` of a 16-byte address.
#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u16::from_ne_bytes([a[i], a[i + 1]]) as u32
}

/// Adds `~m + m'` for the words of an address change (`len` bytes: 4 or 16) to `sum`.
#[inline(always)]
#[must_use]
pub const fn addr_delta(mut sum: u32, old: &[u8; 16], new: &[u8; 16], len: usize) -> u32 {
    let mut i = 0;
    while i < len && i < 16 {
        sum += (!word(old, i) & 0xffff) + word(new, i);
        i += 2;
    }
    sum
}

/// `~m + m'` of one 16-bit word (both native order).
#[inline(always)]
#[must_use]
pub const fn word_delta(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// The IPv4 header's TTL decrement as a delta: the word (TTL, protocol) loses 0x0100, i.e.
/// `~0x0100` in network order, whatever the TTL was.
#[inline(always)]
#[must_use]
pub const fn ttl_delta() -> u32 {
    u16::from_ne_bytes([0xfe, 0xff]) as u32
}

/// The checksum deltas (IPv4 header, L4) of rewriting `key`'s tuple to `new_*`, with the
/// TTL decrement in the IPv4 one (`ip` is 0 for IPv6, which has no header checksum).
#[inline(always)]
#[must_use]
pub const fn csum_delta(
    key: &FlowKey,
    new_src: &[u8; 16],
    new_dst: &[u8; 16],
    new_sport_be: u16,
    new_dport_be: u16,
) -> (u16, u16) {
    let len = if key.family == FAMILY_V4 { 4 } else { 16 };
    let mut addrs = addr_delta(0, &key.src_addr, new_src, len);
    addrs = addr_delta(addrs, &key.dst_addr, new_dst, len);
    let addrs = fold(addrs) as u32;
    let ip = if key.family == FAMILY_V4 {
        fold(addrs + ttl_delta())
    } else {
        0
    };
    // Ports as they lie in the packet: `*_port_be` read as native words are exactly the
    // packet's bytes read in native order.
    let l4 = fold(
        addrs
            + word_delta(key.src_port_be, new_sport_be)
            + word_delta(key.dst_port_be, new_dport_be),
    );
    (ip, l4)
}

/// RFC 1624 eqn 3: the checksum `check` (native order, as read from the packet) after the
/// changes whose `~m + m'` sum is `delta`.
#[inline(always)]
#[must_use]
pub const fn csum_apply(check: u16, delta: u16) -> u16 {
    !fold((!check) as u32 + delta as u32)
}

/// Direction of a packet through a pair.
pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// The pair's TCP state after a packet with `tcp_flags` in direction `dir`, and its state
/// flags (`NAT_STATE_FLAGS` part of `flags`). The follow of IPVS, without sequence tracking:
///
/// * RST, either side: CLOSE, recording who sent it.
/// * CLOSE: a non-RST packet from the side that *received* the RST (it kept talking: the RST
///   was not accepted, e.g. spoofed) returns to ESTABLISHED, so a blind RST cannot make a
///   live connection expire in 10 s.
/// * SYN-ACK from the backend in SYN_SENT: SYN_RECV; the client's ACK then: ESTABLISHED.
/// * FIN: FIN_WAIT, recording who; a FIN from the other side then: TIME_WAIT.
#[must_use]
pub const fn tcp_next(state: u8, dir: u8, tcp_flags: u8, flags: u64) -> (u8, u64) {
    let (fin_mine, fin_other, rst_mine, rst_other) = if dir == DIR_FORWARD {
        (NAT_FIN_FWD, NAT_FIN_REPLY, NAT_RST_FWD, NAT_RST_REPLY)
    } else {
        (NAT_FIN_REPLY, NAT_FIN_FWD, NAT_RST_REPLY, NAT_RST_FWD)
    };
    let flags = flags & NAT_STATE_FLAGS;
    if tcp_flags & TCP_RST != 0 {
        return (NAT_TCP_CLOSE, (flags & !(rst_other)) | rst_mine);
    }
    if state == NAT_TCP_CLOSE {
        // The RST's receiver is the side whose RST flag is *not* set.
        if flags & rst_other != 0 {
            return (
                NAT_TCP_ESTABLISHED,
                flags & !(NAT_RST_FWD | NAT_RST_REPLY | NAT_FIN_FWD | NAT_FIN_REPLY),
            );
        }
        return (state, flags);
    }
    if tcp_flags & TCP_FIN != 0 {
        if flags & fin_other != 0 {
            return (NAT_TCP_TIME_WAIT, flags | fin_mine);
        }
        if state == NAT_TCP_TIME_WAIT {
            return (state, flags | fin_mine);
        }
        return (NAT_TCP_FIN_WAIT, flags | fin_mine);
    }
    let syn = tcp_flags & TCP_SYN != 0;
    let ack = tcp_flags & TCP_ACK != 0;
    match state {
        NAT_TCP_SYN_SENT if dir == DIR_REPLY && syn && ack => (NAT_TCP_SYN_RECV, flags),
        NAT_TCP_SYN_RECV if dir == DIR_FORWARD && ack && !syn => (NAT_TCP_ESTABLISHED, flags),
        _ => (state, flags),
    }
}

/// The idle timeout of a TCP state, with `established_s` the service's `tcp_idle_timeout`.
#[must_use]
pub const fn tcp_timeout(state: u8, established_s: u32) -> u32 {
    match state {
        NAT_TCP_SYN_SENT | NAT_TCP_SYN_RECV => NAT_TIMEOUT_SYN_S,
        NAT_TCP_FIN_WAIT => NAT_TIMEOUT_FIN_WAIT_S,
        NAT_TCP_TIME_WAIT => NAT_TIMEOUT_TIME_WAIT_S,
        NAT_TCP_CLOSE => NAT_TIMEOUT_CLOSE_S,
        _ => established_s,
    }
}

/// The idle timeout of a UDP pair: short until a reply was seen.
#[must_use]
pub const fn udp_timeout(flags: u64, idle_s: u32) -> u32 {
    if flags & NAT_REPLIED != 0 || idle_s < NAT_TIMEOUT_UDP_UNREPLIED_S {
        idle_s
    } else {
        NAT_TIMEOUT_UDP_UNREPLIED_S
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{FAMILY_V6, PROTO_TCP};

    fn full_sum(words: &[u16]) -> u16 {
        let mut s: u32 = words.iter().map(|w| u32::from(*w)).sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// A pseudo-header + ports "packet" as network-order words, with a checksum computed in
    /// full, rewritten incrementally, must equal the full recomputation.
    #[test]
    fn incremental_updates_match_full_recomputation() {
        let mut seed = 0x1234_5678u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for family in [FAMILY_V4, FAMILY_V6] {
            let len = if family == FAMILY_V4 { 4 } else { 16 };
            for _ in 0..2000 {
                let mut key = FlowKey {
                    proto: PROTO_TCP,
                    family,
                    ..FlowKey::default()
                };
                let mut new_dst = [0u8; 16];
                for ((s, d), n) in key.src_addr[..len]
                    .iter_mut()
                    .zip(&mut key.dst_addr[..len])
                    .zip(&mut new_dst[..len])
                {
                    *s = rnd() as u8;
                    *d = rnd() as u8;
                    *n = rnd() as u8;
                }
                key.src_port_be = rnd() as u16;
                key.dst_port_be = rnd() as u16;
                let new_dport = rnd() as u16;
                let payload = rnd() as u16;
                let words = |src: &[u8; 16], dst: &[u8; 16], sp: u16, dp: u16| -> Vec<u16> {
                    let mut w = Vec::new();
                    for a in [src, dst] {
                        for i in (0..len).step_by(2) {
                            w.push(u16::from_be_bytes([a[i], a[i + 1]]));
                        }
                    }
                    w.push(u16::from_be(sp));
                    w.push(u16::from_be(dp));
                    w.push(payload);
                    w
                };
                let before = full_sum(&words(
                    &key.src_addr,
                    &key.dst_addr,
                    key.src_port_be,
                    key.dst_port_be,
                ));
                let after = full_sum(&words(&key.src_addr, &new_dst, key.src_port_be, new_dport));
                let (_, l4) = csum_delta(&key, &key.src_addr, &new_dst, key.src_port_be, new_dport);
                // The packet's checksum read in native order, updated, written back.
                let got = u16::from_be(csum_apply(before.to_be(), l4));
                // 0 and 0xffff are the same one's-complement number.
                assert!(
                    got == after || (got == 0 && after == 0xffff) || (got == 0xffff && after == 0),
                    "{got:#x} != {after:#x}"
                );
            }
        }
    }

    #[test]
    fn the_ttl_decrement_is_a_constant_delta() {
        // A 20-byte header: version/IHL, TOS, length, id, frag, TTL/proto, csum, addrs.
        let mut h: [u16; 10] = [
            0x4500, 0x0054, 0x1234, 0x4000, 0x4006, 0, 0xc633, 0x6402, 0xcb00, 0x710a,
        ];
        h[5] = full_sum(&h);
        let mut after = h;
        after[4] -= 0x0100;
        after[5] = 0;
        let want = full_sum(&after);
        let got = u16::from_be(csum_apply(h[5].to_be(), fold(ttl_delta())));
        assert_eq!(got, want);
    }

    #[test]
    fn partner_of_a_forward_entry_is_the_reply_key() {
        let mut key = FlowKey {
            src_port_be: 40000u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        key.src_addr[..4].copy_from_slice(&[198, 51, 100, 2]);
        key.dst_addr[..4].copy_from_slice(&[203, 0, 113, 10]);
        let mut e = NatEntry {
            new_src_addr: key.src_addr,
            new_src_port_be: key.src_port_be,
            new_dst_port_be: 8080u16.to_be(),
            ..NatEntry::default()
        };
        e.new_dst_addr[..4].copy_from_slice(&[198, 51, 100, 11]);
        let reply = e.partner_key(&key);
        assert_eq!(reply.src_addr[..4], [198, 51, 100, 11]);
        assert_eq!(reply.dst_addr[..4], [198, 51, 100, 2]);
        assert_eq!(u16::from_be(reply.src_port_be), 8080);
        assert_eq!(u16::from_be(reply.dst_port_be), 40000);
        let back = NatEntry {
            new_src_addr: key.dst_addr,
            new_dst_addr: key.src_addr,
            new_src_port_be: key.dst_port_be,
            new_dst_port_be: key.src_port_be,
            ..NatEntry::default()
        };
        assert_eq!(back.partner_key(&reply), key);
    }

    #[test]
    fn tcp_states_follow_the_handshake_and_the_close() {
        let f = DIR_FORWARD;
        let r = DIR_REPLY;
        let (s, fl) = tcp_next(NAT_TCP_SYN_SENT, f, TCP_SYN, 0);
        assert_eq!((s, fl), (NAT_TCP_SYN_SENT, 0), "SYN retransmitted");
        let (s, fl) = tcp_next(s, r, TCP_SYN | TCP_ACK, fl);
        assert_eq!(s, NAT_TCP_SYN_RECV);
        let (s, fl) = tcp_next(s, f, TCP_ACK, fl);
        assert_eq!(s, NAT_TCP_ESTABLISHED);
        assert_eq!(tcp_next(s, r, TCP_ACK, fl).0, NAT_TCP_ESTABLISHED);
        let (s, fl) = tcp_next(s, f, TCP_FIN | TCP_ACK, fl);
        assert_eq!((s, fl), (NAT_TCP_FIN_WAIT, NAT_FIN_FWD));
        assert_eq!(
            tcp_next(s, f, TCP_FIN | TCP_ACK, fl).0,
            NAT_TCP_FIN_WAIT,
            "same side again"
        );
        let (s, fl) = tcp_next(s, r, TCP_FIN | TCP_ACK, fl);
        assert_eq!(s, NAT_TCP_TIME_WAIT);
        assert_eq!(fl, NAT_FIN_FWD | NAT_FIN_REPLY);
        assert_eq!(tcp_next(s, f, TCP_ACK, fl).0, NAT_TCP_TIME_WAIT);
        // A SYN-ACK in ESTABLISHED changes nothing; an ACK in SYN_SENT neither.
        assert_eq!(
            tcp_next(NAT_TCP_ESTABLISHED, r, TCP_SYN | TCP_ACK, 0).0,
            NAT_TCP_ESTABLISHED
        );
        assert_eq!(
            tcp_next(NAT_TCP_SYN_SENT, f, TCP_ACK, 0).0,
            NAT_TCP_SYN_SENT
        );
    }

    #[test]
    fn a_rst_closes_and_its_receiver_talking_reopens() {
        let (s, fl) = tcp_next(NAT_TCP_ESTABLISHED, DIR_FORWARD, TCP_RST, 0);
        assert_eq!((s, fl), (NAT_TCP_CLOSE, NAT_RST_FWD));
        // The RST's sender keeps quiet: still closed; more from it: closed.
        assert_eq!(tcp_next(s, DIR_FORWARD, TCP_ACK, fl).0, NAT_TCP_CLOSE);
        // The backend (the receiver) talks on: the RST was not accepted.
        let (s2, fl2) = tcp_next(s, DIR_REPLY, TCP_ACK, fl);
        assert_eq!((s2, fl2), (NAT_TCP_ESTABLISHED, 0));
        let (s, fl) = tcp_next(NAT_TCP_SYN_RECV, DIR_REPLY, TCP_RST | TCP_ACK, NAT_FIN_FWD);
        assert_eq!((s, fl), (NAT_TCP_CLOSE, NAT_FIN_FWD | NAT_RST_REPLY));
        assert_eq!(tcp_next(s, DIR_FORWARD, TCP_ACK, fl).0, NAT_TCP_ESTABLISHED);
    }

    #[test]
    fn timeouts() {
        assert_eq!(tcp_timeout(NAT_TCP_SYN_SENT, 7440), 60);
        assert_eq!(tcp_timeout(NAT_TCP_ESTABLISHED, 7440), 7440);
        assert_eq!(tcp_timeout(NAT_TCP_TIME_WAIT, 7440), 120);
        assert_eq!(tcp_timeout(NAT_TCP_CLOSE, 7440), 10);
        assert_eq!(udp_timeout(0, 300), 30);
        assert_eq!(udp_timeout(NAT_REPLIED, 300), 300);
        assert_eq!(udp_timeout(0, 5), 5);
    }

    #[test]
    fn snat_probes_cover_every_address_and_port_once() {
        for (count, ports) in [(1, 64), (2, 32), (4, 16), (3, 5), (16, 4), (1, 1)] {
            for (h, r) in [(0, 0), (7, 13), (u32::MAX, u32::MAX - 3)] {
                let mut seen = Vec::new();
                for i in 0..count * ports {
                    let (slot, offset) = snat_probe(h, r, i, count, ports);
                    assert!(slot < count && offset < ports);
                    seen.push((slot, offset));
                }
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(
                    seen.len() as u32,
                    count * ports,
                    "{count} x {ports}, h {h} r {r}"
                );
            }
        }
    }
}
