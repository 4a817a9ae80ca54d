//! The flow hash. The datapath indexes a service's Maglev ring with it, and the agent and the
//! tests compute the same value to predict where a flow goes, so it lives here, once.
//!
//! Multiplies over whole words and MurmurHash3's finalisers: no tables, no loops the
//! verifier cannot bound (the word counts are constants), and a good avalanche so nearby
//! source ports spread over the ring.

use crate::{FlowKey, PROTO_TCP};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Seed of every Weir hash. Changing it moves every untracked flow.
pub const SEED: u32 = 0x5745_4952; // "WEIR"

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The 32-bit word at byte `i` (0, 4, 8 or 12), read as one word: assembling it from four
/// byte loads would have the compiler keep the address as sixteen byte values.
#[inline(always)]
const fn word(b: &[u8; 16], i: usize) -> u32 {
    match b.split_at(i).1.first_chunk::<4>() {
        Some(w) => u32::from_ne_bytes(*w),
        None => 0,
    }
}

/// The 64-bit multiplier of `flow_hash`'s chain: 2^64 divided by the golden ratio, odd, so
/// each step is a bijection of the state (no two states meet before the final fold).
const K64: u64 = 0x9e37_79b9_7f4a_7c15;

/// Two 32-bit words of the key as one 64-bit word (`lo` in the low half).
#[inline(always)]
const fn pair(lo: u32, hi: u32) -> u64 {
    (lo as u64) | ((hi as u64) << 32)
}

/// Hash of a whole 5-tuple (the `maglev` scheduler, and the hash every scheduler falls back to
/// for untracked mid-flow packets and in flood mode).
///
/// The 40-byte key as five 64-bit words, each xored into the state, multiplied by an odd
/// constant and folded (`step`), then MurmurHash3's 64-bit finaliser (`fmix64`), which
/// carries the high bits into the low bits the ring index reads. Seven multiplies in all:
/// a SYN pays it on every new flow, and the 32-bit MurmurHash3 body it replaced (ten rounds
/// of two multiplies and two rotates, rotates being three instructions each in BPF) cost a
/// new flow about 50 ns on the CI machine kind. Changing it moves every untracked flow: a
/// fleet behind ECMP agrees on a flow's backend only between balancers of one release.
#[inline(always)]
#[must_use]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED as u64;
    h = step(h, pair(word(&key.src_addr, 0), word(&key.src_addr, 4)));
    h = step(h, pair(word(&key.src_addr, 8), word(&key.src_addr, 12)));
    h = step(h, pair(word(&key.dst_addr, 0), word(&key.dst_addr, 4)));
    h = step(h, pair(word(&key.dst_addr, 8), word(&key.dst_addr, 12)));
    let ports = (key.src_port_be as u32) | ((key.dst_port_be as u32) << 16);
    let kind = (key.proto as u32) | ((key.family as u32) << 8);
    h = step(h, pair(ports, kind));
    // fmix64 (MurmurHash3).
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

/// One word into `flow_hash`'s state: xored in, multiplied, and the high half folded back
/// into the low one. A multiply carries a bit only upwards; without the fold, the low bits
/// of the state would depend on the low bits of each word alone until the finaliser.
#[inline(always)]
const fn step(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(K64);
    h ^ (h >> 32)
}

/// Entropy for a flow's outer header: the IPv6 flow label (RFC 6438) and, with
/// `tunnel_source_prefix`, the IPv4 outer source, which a backend's NIC hashes to pick a
/// receive queue. The 5-tuple is folded into one word and only finalised (two multiplies):
/// paid on every tunnelled packet, where `flow_hash` is paid once per new flow. Nothing
/// predicts a backend from it; it only has to differ between flows.
#[inline(always)]
#[must_use]
pub const fn outer_hash(key: &FlowKey) -> u32 {
    // The source's low 64 bits (an IPv4 address is the first word: `word(_, 0)` would be
    // needed for it) and the ports: what tells a client's flows, and clients, apart.
    let folded = word(&key.src_addr, 0)
        ^ word(&key.src_addr, 8)
        ^ word(&key.src_addr, 12)
        ^ ((key.src_port_be as u32) | ((key.dst_port_be as u32) << 16)).rotate_left(7);
    finish(SEED ^ folded, 40)
}

/// Hash of the source address alone (the `ip-hash` scheduler: every flow of a client goes to
/// the same backend while the ring does not change).
#[inline(always)]
#[must_use]
pub const fn source_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, word(&key.src_addr, 0));
    h = mix(h, word(&key.src_addr, 4));
    h = mix(h, word(&key.src_addr, 8));
    h = mix(h, word(&key.src_addr, 12));
    h = mix(h, key.family as u32);
    finish(h, 20)
}

/// Slot of an address (16-byte map form, either family) in the `VIP_ADDR_BITS` filter:
/// `VIP_ADDR_BITS_LOG2` bits. Multiplicative (Fibonacci) hashing of the four words, chained,
/// keeping the top bits of the last product, which depend on every input bit: a few
/// instructions, where the filter exists to be cheaper than a hash-map lookup.
#[inline(always)]
#[must_use]
pub const fn addr_slot(addr: &[u8; 16]) -> u32 {
    const K: u32 = 0x9e37_79b1;
    let mut h = SEED;
    h = (h ^ word(addr, 0)).wrapping_mul(K);
    h = (h ^ word(addr, 4)).wrapping_mul(K);
    h = (h ^ word(addr, 8)).wrapping_mul(K);
    h = (h ^ word(addr, 12)).wrapping_mul(K);
    h >> (32 - crate::VIP_ADDR_BITS_LOG2)
}

/// Whether the flow is TCP (helper kept next to the hash so callers read alike).
#[inline(always)]
#[must_use]
pub const fn is_tcp(key: &FlowKey) -> bool {
    key.proto == PROTO_TCP
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, PROTO_TCP, PROTO_UDP};

    fn key(src_port: u16) -> FlowKey {
        let mut k = FlowKey {
            src_port_be: src_port.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: PROTO_UDP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        k.src_addr[..4].copy_from_slice(&[198, 51, 100, 2]);
        k.dst_addr[..4].copy_from_slice(&[203, 0, 113, 10]);
        k
    }

    #[test]
    fn murmur3_reference_vector() {
        // MurmurHash3_x86_32 of the 4 bytes 0x00000000 with seed 0 is 0x2362f9de; of
        // "abcd" (one little-endian word 0x64636261) with seed 0 is 0x43ed676a.
        assert_eq!(finish(mix(0, 0), 4), 0x2362_f9de);
        assert_eq!(finish(mix(0, 0x6463_6261), 4), 0x43ed_676a);
    }

    #[test]
    fn flow_hash_spreads_over_a_maglev_ring() {
        // Where Maglev reads it: the slot, `hash % ring_size` (65,537 by default), whose
        // backend depends on the slot only. Consecutive ports of one client, IPv4 clients of
        // a /16 and IPv6 clients of a /64 (fixed ports) into 16 slot classes: each within
        // 10% of even.
        let mut classes = [[0u32; 16]; 3];
        for i in 0..32_000u32 {
            let mut by_port = key(1024 + i as u16);
            by_port.proto = PROTO_TCP;
            let mut v4 = key(40_000);
            v4.src_addr[..4].copy_from_slice(&(0xc633_0000 | i).to_be_bytes());
            let mut v6 = key(40_000);
            v6.family = crate::FAMILY_V6;
            v6.src_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
            v6.src_addr[12..].copy_from_slice(&i.to_be_bytes());
            for (c, k) in classes.iter_mut().zip([by_port, v4, v6]) {
                c[((flow_hash(&k) % 65_537) % 16) as usize] += 1;
            }
        }
        for c in classes {
            for n in c {
                assert!((1_800..=2_200).contains(&n), "{c:?}");
            }
        }
    }

    #[test]
    fn flow_hash_avalanches_every_key_bit() {
        // Flipping any one bit of the key (addresses, ports, protocol, family) flips each of
        // the 16 low output bits in 40–60% of 512 keys: no input bit is ignored or leaks
        // into a few output bits only.
        let base: [FlowKey; 512] = core::array::from_fn(|i| {
            let mut k = key(1024 + (i as u16).wrapping_mul(97));
            k.src_addr[3] = i as u8;
            k.dst_addr[2] = (i >> 3) as u8;
            k
        });
        let flip = |k: &FlowKey, bit: usize| {
            let mut k = *k;
            let byte = bit / 8;
            let m = 1u8 << (bit % 8);
            match byte {
                0..16 => k.src_addr[byte] ^= m,
                16..32 => k.dst_addr[byte - 16] ^= m,
                32..34 => k.src_port_be ^= u16::from(m) << (8 * (byte - 32)),
                34..36 => k.dst_port_be ^= u16::from(m) << (8 * (byte - 34)),
                36 => k.proto ^= m,
                _ => k.family ^= m,
            }
            k
        };
        for bit in 0..38 * 8 {
            let mut flips = [0u32; 16];
            for k in &base {
                let d = flow_hash(k) ^ flow_hash(&flip(k, bit));
                for (o, f) in flips.iter_mut().enumerate() {
                    *f += (d >> o) & 1;
                }
            }
            for f in flips {
                assert!((205..=307).contains(&f), "input bit {bit}: {flips:?}");
            }
        }
    }

    #[test]
    fn ports_spread_evenly_over_buckets() {
        // 60,000 consecutive source ports into 3 buckets: each within 2% of a third.
        let mut buckets = [0u32; 3];
        for port in 1024..61024u16 {
            buckets[(flow_hash(&key(port)) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((19_600..=20_400).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn addr_slots_stay_in_range_and_spread() {
        // Every address of a /16 (v4) and 65,536 consecutive v6 addresses: every slot in
        // range, and no slot holds more than a few (an even spread holds 1 each).
        for v6 in [false, true] {
            let mut counts = [0u16; 1 << crate::VIP_ADDR_BITS_LOG2];
            for i in 0..65_536u32 {
                let mut addr = [0u8; 16];
                if v6 {
                    addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                    addr[12..].copy_from_slice(&i.to_be_bytes());
                } else {
                    addr[..4].copy_from_slice(&(0xcb00_0000 | i).to_be_bytes());
                }
                counts[addr_slot(&addr) as usize] += 1;
            }
            let max = counts.iter().max().copied().unwrap_or(0);
            let empty = counts.iter().filter(|&&c| c == 0).count();
            assert!(max <= 12, "v6={v6}: a slot holds {max} addresses");
            // Random placement leaves 1/e of the slots empty; far more means clustering.
            assert!(empty < 65_536 / 2, "v6={v6}: {empty} empty slots");
        }
    }

    #[test]
    fn outer_hash_spreads_a_clients_flows_and_clients() {
        // What the outer header's entropy is for: a client's flows (its source ports), and
        // IPv6 clients of one /64, over the 16 values of a /28's host bits (a spread IPv4
        // source) or the low bits a NIC's queue choice reads: each within 10% of even.
        let mut by_port = [0u32; 16];
        for port in 1024..33_024u16 {
            by_port[(outer_hash(&key(port)) & 0x0f) as usize] += 1;
        }
        let mut by_client = [0u32; 16];
        for i in 0..32_000u32 {
            let mut k = key(40_000);
            k.family = crate::FAMILY_V6;
            k.src_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
            k.src_addr[12..].copy_from_slice(&i.to_be_bytes());
            by_client[(outer_hash(&k) & 0x0f) as usize] += 1;
        }
        for counts in [by_port, by_client] {
            for c in counts {
                assert!((1_800..=2_200).contains(&c), "{counts:?}");
            }
        }
    }

    #[test]
    fn source_hash_ignores_ports_but_flow_hash_does_not() {
        assert_eq!(source_hash(&key(1000)), source_hash(&key(2000)));
        assert_ne!(flow_hash(&key(1000)), flow_hash(&key(2000)));
        let mut other = key(1000);
        other.src_addr[3] = 3;
        assert_ne!(source_hash(&key(1000)), source_hash(&other));
    }
}
