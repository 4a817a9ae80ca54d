//! Builders of the outer header the balancer puts in front of a packet in tunnel mode. The
//! datapath writes them straight into the packet; the golden tests build the expected bytes
//! with the same functions and check them independently (checksum verification).

use crate::{OUTER_TTL, csum::ipv4_header_checksum};

pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const ETH_HDR_LEN: usize = 14;
pub const VLAN_HDR_LEN: usize = 4;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_ARP: u16 = 0x0806;

/// Writes an outer IPv4 header (no options, TTL `OUTER_TTL`, identification 0, valid checksum).
///
/// `dont_fragment` is copied from the inner IPv4 header (RFC 2003 §3.1), and set for an
/// inner IPv6 packet (IPv6 is never fragmented on path).
#[inline(always)]
pub const fn write_ipv4_outer(
    out: &mut [u8; IPV4_HDR_LEN],
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    inner_len: u16,
    dont_fragment: bool,
) {
    let total = inner_len.wrapping_add(IPV4_HDR_LEN as u16).to_be_bytes();
    out[0] = 0x45;
    out[1] = 0;
    out[2] = total[0];
    out[3] = total[1];
    out[4] = 0;
    out[5] = 0;
    out[6] = if dont_fragment { 0x40 } else { 0 };
    out[7] = 0;
    out[8] = OUTER_TTL;
    out[9] = protocol;
    out[10] = 0;
    out[11] = 0;
    out[12] = src[0];
    out[13] = src[1];
    out[14] = src[2];
    out[15] = src[3];
    out[16] = dst[0];
    out[17] = dst[1];
    out[18] = dst[2];
    out[19] = dst[3];
    let c = ipv4_header_checksum(out).to_be_bytes();
    out[10] = c[0];
    out[11] = c[1];
}

/// Writes an outer IPv6 header (hop limit `OUTER_TTL`). The flow label carries 20 bits of the
/// flow hash so routers between the LB and the backend can spread tunnels over ECMP paths
/// (RFC 6438).
#[inline(always)]
pub const fn write_ipv6_outer(
    out: &mut [u8; IPV6_HDR_LEN],
    src: &[u8; 16],
    dst: &[u8; 16],
    next_header: u8,
    inner_len: u16,
    flow_hash: u32,
) {
    let label = flow_hash & 0x000f_ffff;
    out[0] = 0x60;
    out[1] = (label >> 16) as u8;
    out[2] = (label >> 8) as u8;
    out[3] = label as u8;
    let len = inner_len.to_be_bytes();
    out[4] = len[0];
    out[5] = len[1];
    out[6] = next_header;
    out[7] = OUTER_TTL;
    let mut i = 0;
    while i < 16 {
        out[8 + i] = src[i];
        out[24 + i] = dst[i];
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PROTO_IPIP, PROTO_IPV6, csum::ipv4_header_valid};

    #[test]
    fn ipv4_outer_is_valid_and_complete() {
        let mut h = [0u8; 20];
        write_ipv4_outer(
            &mut h,
            [198, 51, 100, 1],
            [198, 51, 100, 11],
            PROTO_IPIP,
            60,
            true,
        );
        assert!(ipv4_header_valid(&h));
        assert_eq!(h[0], 0x45);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 80);
        assert_eq!(h[6], 0x40);
        assert_eq!(h[8], OUTER_TTL);
        assert_eq!(h[9], PROTO_IPIP);
        assert_eq!(&h[12..16], &[198, 51, 100, 1]);
        assert_eq!(&h[16..20], &[198, 51, 100, 11]);
        write_ipv4_outer(&mut h, [1, 2, 3, 4], [5, 6, 7, 8], PROTO_IPV6, 1000, false);
        assert!(ipv4_header_valid(&h));
        assert_eq!(h[6], 0);
    }

    #[test]
    fn ipv6_outer_fields() {
        let mut h = [0u8; 40];
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut dst = src;
        dst[15] = 0x11;
        write_ipv6_outer(&mut h, &src, &dst, PROTO_IPV6, 72, 0xabcd_ef12);
        assert_eq!(h[0] >> 4, 6);
        assert_eq!(u32::from_be_bytes([0, h[1], h[2], h[3]]), 0xd_ef12);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 72);
        assert_eq!(h[6], PROTO_IPV6);
        assert_eq!(h[7], OUTER_TTL);
        assert_eq!(&h[8..24], &src);
        assert_eq!(&h[24..40], &dst);
    }
}
