//! The pure parts of the balancer's "too big for the tunnel" answer: the one's-complement
//! sums (RFC 1071) over byte slices, the quote lengths, the IPv4 + ICMP "fragmentation
//! needed" (RFC 792, RFC 1191) and IPv6 + ICMPv6 Packet Too Big (RFC 4443) headers, and the
//! per-CPU token bucket that rate-limits them. The datapath writes the headers straight
//! into the packet; the sum over the quoted bytes, which stay in the packet, it gets from
//! `bpf_csum_diff` and hands in folded (`quote_sum`).

use crate::{OUTER_TTL, csum::ipv4_header_checksum, headers::write_ipv6_outer};

/// IP protocol number of ICMP, and next-header value of ICMPv6.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// ICMP destination unreachable, code "fragmentation needed and DF set" (RFC 792).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 Packet Too Big (RFC 4443 §3.2).
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Length of the ICMP and ICMPv6 error headers (type, code, checksum, 4 more bytes).
pub const ICMP_HDR_LEN: usize = 8;

/// Most bytes of the offending IPv4 packet quoted: RFC 1812 §4.3.2.3 asks for as much as
/// fits without the ICMP error's IP packet exceeding 576 bytes (20 header + 8 ICMP + 548).
/// RFC 792's minimum (the IP header and 8 bytes) is always within it.
pub const ICMP4_QUOTE_MAX: usize = 576 - 20 - ICMP_HDR_LEN;
/// Most bytes of the offending IPv6 packet quoted: RFC 4443 §2.4(c), as much as fits without
/// the ICMPv6 packet exceeding the minimum IPv6 MTU of 1280 (40 header + 8 ICMPv6 + 1232).
pub const ICMP6_QUOTE_MAX: usize = 1280 - 40 - ICMP_HDR_LEN;

/// How many bytes of an offending packet of `ip_len` bytes to quote, at most `max`: rounded
/// down to a multiple of 4, so that `bpf_csum_diff` (which takes whole 32-bit words) can sum
/// the quote in place. Still at least the IP header and 8 bytes, as RFC 792 and RFC 4443
/// require: the datapath only sends errors for TCP/UDP packets it parsed, whose IP header
/// (a multiple of 4) and first 8 L4 bytes are all in `ip_len`.
#[inline(always)]
#[must_use]
pub const fn quote_len(ip_len: usize, max: usize) -> usize {
    let len = if ip_len < max { ip_len } else { max };
    len & !3
}

/// One's-complement sum of `bytes` as big-endian 16-bit words (an odd last byte is padded
/// with zero), added to `sum`, not folded. Fine for anything up to 128 KiB at once.
#[must_use]
pub const fn sum_be(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum = sum.wrapping_add(((bytes[i] as u32) << 8) | bytes[i + 1] as u32);
        i += 2;
    }
    if i < bytes.len() {
        sum = sum.wrapping_add((bytes[i] as u32) << 8);
    }
    sum
}

/// A 32-bit one's-complement sum folded to 16 bits (not inverted).
#[inline(always)]
#[must_use]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The Internet checksum (RFC 1071) of `bytes`: what goes into a checksum field that was zero
/// while summing.
#[must_use]
pub const fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_be(0, bytes))
}

/// Writes the IPv4 header and the ICMP "fragmentation needed" header of the balancer's
/// answer to a client whose packet will not fit the tunnel: from the VIP (`vip`, the
/// offending packet's destination) to the client, TTL `OUTER_TTL`, `quote_len` bytes of the
/// offending packet following, `next_hop_mtu` the largest packet that does fit (RFC 1191).
/// `quote_sum` is the folded one's-complement sum of the quoted bytes as big-endian words.
///
/// The IP header: TOS 0xc0 (precedence "internetwork control", RFC 1812 §4.3.2.5), DF set
/// (576 bytes at most, never to be fragmented) with identification 0 (RFC 6864 §4.1).
#[inline(always)]
pub const fn write_icmp4_too_big(
    ip: &mut [u8; 20],
    icmp: &mut [u8; ICMP_HDR_LEN],
    vip: [u8; 4],
    client: [u8; 4],
    quote_len: u16,
    next_hop_mtu: u16,
    quote_sum: u16,
) {
    let total = (20 + ICMP_HDR_LEN as u16 + quote_len).to_be_bytes();
    ip[0] = 0x45;
    ip[1] = 0xc0;
    ip[2] = total[0];
    ip[3] = total[1];
    ip[4] = 0;
    ip[5] = 0;
    ip[6] = 0x40;
    ip[7] = 0;
    ip[8] = OUTER_TTL;
    ip[9] = PROTO_ICMP;
    ip[10] = 0;
    ip[11] = 0;
    let mut i = 0;
    while i < 4 {
        ip[12 + i] = vip[i];
        ip[16 + i] = client[i];
        i += 1;
    }
    let c = ipv4_header_checksum(ip).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];

    let mtu = next_hop_mtu.to_be_bytes();
    *icmp = [
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        0,
        0,
        0,
        0,
        mtu[0],
        mtu[1],
    ];
    let c = (!fold(sum_be(quote_sum as u32, icmp))).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
}

/// Writes the IPv6 header and the ICMPv6 Packet Too Big header of the balancer's answer: from
/// the VIP to the client, hop limit `OUTER_TTL`, `quote_len` bytes of the offending packet
/// following, `mtu` the largest packet that fits. The checksum covers the pseudo-header
/// (RFC 8200 §8.1: both addresses, the upper-layer length, next header 58), the ICMPv6
/// header and the quote (`quote_sum`, as for [`write_icmp4_too_big`]).
#[inline(always)]
pub const fn write_icmp6_too_big(
    ip: &mut [u8; 40],
    icmp: &mut [u8; ICMP_HDR_LEN],
    vip: &[u8; 16],
    client: &[u8; 16],
    quote_len: u16,
    mtu: u32,
    quote_sum: u16,
) {
    let payload = ICMP_HDR_LEN as u16 + quote_len;
    // The same fixed header as a tunnel's outer one, with flow label 0 (no flow to spread).
    write_ipv6_outer(ip, vip, client, PROTO_ICMPV6, payload, 0);
    let m = mtu.to_be_bytes();
    *icmp = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, m[0], m[1], m[2], m[3]];
    // Pseudo-header: the addresses (bytes 8..40 of the IPv6 header), the 32-bit upper-layer
    // length (its high half is zero) and the next header (three zero bytes first).
    let mut sum = quote_sum as u32 + payload as u32 + PROTO_ICMPV6 as u32;
    let mut i = 8;
    while i < 40 {
        sum += ((ip[i] as u32) << 8) | ip[i + 1] as u32;
        i += 2;
    }
    let c = (!fold(sum_be(sum, icmp))).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
}

/// Per-CPU rate limit of the ICMP errors the balancer sends (value of `ICMP_BUCKETS`): a
/// token bucket of `ICMP_ERRORS_BURST` tokens refilled at `ICMP_ERRORS_PER_SEC`. All-zero
/// (a fresh map entry) is a bucket about to be refilled to its burst.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcmpBucket {
    /// When the tokens were last counted (`bpf_ktime_get_coarse_ns`), less the part of a
    /// token's interval that had passed: no fraction of a token is lost between refills.
    pub refilled_ns: u64,
    pub tokens: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<IcmpBucket>() == 16);

/// Nanoseconds per token.
const TOKEN_NS: u64 = 1_000_000_000 / crate::ICMP_ERRORS_PER_SEC as u64;

impl IcmpBucket {
    /// Takes one token at `now_ns` if there is one. A clock behind `refilled_ns` adds
    /// nothing (a test or the benchmark may set `refilled_ns` ahead to freeze the bucket).
    #[inline(always)]
    pub const fn take(&mut self, now_ns: u64) -> bool {
        let burst = crate::ICMP_ERRORS_BURST;
        if now_ns > self.refilled_ns {
            let elapsed = now_ns - self.refilled_ns;
            let earned = elapsed / TOKEN_NS;
            if earned >= burst as u64 {
                self.tokens = burst;
                self.refilled_ns = now_ns;
            } else if earned > 0 {
                let tokens = self.tokens + earned as u32;
                self.tokens = if tokens > burst { burst } else { tokens };
                self.refilled_ns += earned * TOKEN_NS;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{ICMP_ERRORS_BURST, ICMP_ERRORS_PER_SEC, csum::ipv4_header_valid};

    /// An independent RFC 1071 sum: 16-bit big-endian words added in 64 bits, folded at the
    /// end.
    fn reference_sum(bytes: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for c in bytes.chunks(2) {
            s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn sums_agree_with_a_reference_and_odd_lengths_pad() {
        let bytes: Vec<u8> = (0..1233u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in [0, 1, 2, 3, 20, 547, 548, 1232, 1233] {
            assert_eq!(
                fold(sum_be(0, &bytes[..len])),
                reference_sum(&bytes[..len]),
                "len {len}"
            );
        }
        // A checksum written into its zeroed field makes the whole verify (sum 0xffff).
        let mut h = [
            0x45, 0, 0, 0x1c, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = checksum(&h).to_be_bytes();
        h[10..12].copy_from_slice(&c);
        assert_eq!(fold(sum_be(0, &h)), 0xffff);
    }

    #[test]
    fn quotes_are_whole_words_within_the_limits() {
        assert_eq!(ICMP4_QUOTE_MAX, 548);
        assert_eq!(ICMP6_QUOTE_MAX, 1232);
        assert_eq!(quote_len(1500, ICMP4_QUOTE_MAX), 548);
        assert_eq!(quote_len(1500, ICMP6_QUOTE_MAX), 1232);
        assert_eq!(quote_len(547, ICMP4_QUOTE_MAX), 544);
        // A 20-byte header and a UDP header: all of it.
        assert_eq!(quote_len(28, ICMP4_QUOTE_MAX), 28);
        assert_eq!(quote_len(31, ICMP4_QUOTE_MAX), 28);
    }

    #[test]
    fn icmp4_headers_verify_and_carry_the_fields() {
        let quote: Vec<u8> = (0..548u32).map(|i| (i * 7) as u8).collect();
        let mut ip = [0u8; 20];
        let mut icmp = [0u8; 8];
        let vip = [203, 0, 113, 10];
        let client = [198, 51, 100, 2];
        write_icmp4_too_big(
            &mut ip,
            &mut icmp,
            vip,
            client,
            548,
            1480,
            fold(sum_be(0, &quote)),
        );
        assert!(ipv4_header_valid(&ip));
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 576);
        assert_eq!((ip[8], ip[9]), (OUTER_TTL, PROTO_ICMP));
        assert_eq!(&ip[12..16], &vip);
        assert_eq!(&ip[16..20], &client);
        assert_eq!(icmp[..2], [3, 4]);
        assert_eq!(icmp[4..], [0, 0, 0x05, 0xc8]);
        let mut message = icmp.to_vec();
        message.extend_from_slice(&quote);
        assert_eq!(reference_sum(&message), 0xffff, "ICMP checksum verifies");
    }

    #[test]
    fn icmp6_headers_verify_with_the_pseudo_header() {
        let quote: Vec<u8> = (0..1232u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut ip = [0u8; 40];
        let mut icmp = [0u8; 8];
        let vip = [
            0x20, 0x01, 0x0d, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut client = vip;
        client[4] = 0;
        client[15] = 2;
        write_icmp6_too_big(
            &mut ip,
            &mut icmp,
            &vip,
            &client,
            1232,
            1460,
            fold(sum_be(0, &quote)),
        );
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 1240);
        assert_eq!((ip[6], ip[7]), (PROTO_ICMPV6, OUTER_TTL));
        assert_eq!(&ip[8..24], &vip);
        assert_eq!(&ip[24..40], &client);
        assert_eq!(icmp[..2], [2, 0]);
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            1460
        );
        // RFC 8200 §8.1 pseudo-header, built separately.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&vip);
        pseudo.extend_from_slice(&client);
        pseudo.extend_from_slice(&1240u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&icmp);
        pseudo.extend_from_slice(&quote);
        assert_eq!(reference_sum(&pseudo), 0xffff, "ICMPv6 checksum verifies");
    }

    #[test]
    fn bucket_bursts_then_refills_at_the_rate() {
        let mut b = IcmpBucket::default();
        let t0 = 5_000_000_000;
        for i in 0..ICMP_ERRORS_BURST {
            assert!(b.take(t0), "token {i} of the burst");
        }
        assert!(!b.take(t0), "burst spent");
        let token = 1_000_000_000 / u64::from(ICMP_ERRORS_PER_SEC);
        // Less than one token's interval: nothing, and the part is not lost.
        assert!(!b.take(t0 + token / 2));
        assert!(b.take(t0 + token), "one interval, one token");
        assert!(!b.take(t0 + token));
        // Three intervals later, three tokens.
        let t1 = t0 + 4 * token;
        assert!(b.take(t1) && b.take(t1) && b.take(t1));
        assert!(!b.take(t1));
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + 3_600_000_000_000;
        let sent = (0..2 * ICMP_ERRORS_BURST).filter(|_| b.take(t2)).count();
        assert_eq!(sent, ICMP_ERRORS_BURST as usize);
        // A clock behind the bucket's time adds nothing (a frozen bucket).
        let mut frozen = IcmpBucket {
            refilled_ns: u64::MAX,
            tokens: 1,
            _pad: 0,
        };
        assert!(frozen.take(t2));
        assert!(!frozen.take(t2));
    }
}
