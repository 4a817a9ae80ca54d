//! Internet checksum (RFC 1071) of an IPv4 header.

/// The one's-complement sum of a 20-byte header's ten 16-bit words, carries folded.
#[inline(always)]
const fn folded_sum(hdr: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    // The verifier sees a constant trip count of 10; LLVM unrolls it.
    while i < 20 {
        sum += ((hdr[i] as u32) << 8) | hdr[i + 1] as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum of a 20-byte IPv4 header (options are never added to the outer header). The
/// checksum field must be zero on input; the result goes into bytes 10..12 big-endian.
#[inline(always)]
#[must_use]
pub const fn ipv4_header_checksum(hdr: &[u8; 20]) -> u16 {
    !folded_sum(hdr)
}

/// Whether a 20-byte IPv4 header, checksum included, verifies.
#[must_use]
pub const fn ipv4_header_valid(hdr: &[u8; 20]) -> bool {
    folded_sum(hdr) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikipedia_example() {
        // The worked example of the IPv4 header checksum article: 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&hdr), 0xb861);
        assert!(!ipv4_header_valid(&hdr));
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(ipv4_header_valid(&hdr));
    }

    #[test]
    fn carries_fold_twice() {
        let hdr = [0xff; 20];
        // 10 x 0xffff = 0x9fff6 -> 0xfff6 + 9 = 0xffff -> !0xffff = 0.
        assert_eq!(ipv4_header_checksum(&hdr), 0);
    }
}
