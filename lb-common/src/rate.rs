//! Per-service rate limits on new flows (per source or source prefix, and per service): the
//! maps' types (`RATE_LIMITS` values, `RATE_STATE` keys), the `VipInfo::rate_limits` flags,
//! and the pure logic both sides must agree on: the GCRA step ([`gcra`]), the mask of a
//! source prefix ([`prefix_mask`], applied by [`mask_source`]) and the conversion of a configured rate and burst
//! into the datapath's nanoseconds ([`Gcra::new`]).
//!
//! Each limit is a GCRA (generic cell rate algorithm, the virtual-scheduling form of a token
//! bucket): one `u64` per bucket, its theoretical arrival time (TAT). A flow is admitted
//! when, after adding one emission interval `T = 1 s / rate` to `max(TAT, now)`, the TAT is
//! at most `tolerance = burst * T` ahead of `now`; a refused flow leaves the TAT unchanged.
//! One value per bucket makes the update a single 64-bit compare-and-exchange, so buckets
//! shared by every CPU stay exact without a lock.

use crate::{FAMILY_V4, MAX_SERVICES};

/// `VipInfo::rate_limits`: the service limits new flows per source (or source prefix).
pub const RATE_SOURCE_FLOWS: u8 = 1;
/// `VipInfo::rate_limits`: the service limits its new flows, all sources together.
pub const RATE_VIP_FLOWS: u8 = 2;

/// `RateKey::limit` and the offset of a limit's counter in `RATE_STATS`: new flows per source.
pub const LIMIT_SOURCE_FLOWS: u8 = 0;
/// As [`LIMIT_SOURCE_FLOWS`]: new flows of the service.
pub const LIMIT_VIP_FLOWS: u8 = 1;
/// Counter slots per service in `RATE_STATS` (service `id` uses `id * RATE_SLOTS ..`).
pub const RATE_SLOTS: u32 = 2;
/// Size of `RATE_STATS`.
pub const RATE_STATS_ENTRIES: u32 = MAX_SERVICES * RATE_SLOTS;
/// Size of the `RATE_STATE` LRU: the per-source buckets of every service. A full table
/// evicts its least recently used bucket, which then starts again full (with its burst).
pub const RATE_STATE_ENTRIES: u32 = 65_536;
/// Compare-and-exchange attempts on one bucket before a new flow is refused: each failed
/// attempt means another CPU admitted a flow from the same bucket in that instant.
pub const CAS_ATTEMPTS: u32 = 4;

/// Highest configurable rate (per second): the interval is whole nanoseconds, so this keeps
/// its rounding error below 1%.
pub const MAX_RATE: u64 = 10_000_000;
/// Highest configurable burst.
pub const MAX_BURST: u64 = 10_000_000;

const NS_PER_S: u64 = 1_000_000_000;

/// One limit as the datapath applies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Gcra {
    /// One flow's share of a second: `1 s / rate`, in ns. 0: no limit.
    pub interval_ns: u64,
    /// How far ahead of now a bucket's TAT may be after admitting: `burst * interval_ns`.
    pub tolerance_ns: u64,
}
const _: () = assert!(size_of::<Gcra>() == 16);

impl Gcra {
    /// `rate` flows per second with bursts of `burst` (both at least 1; validated by the
    /// agent against [`MAX_RATE`] and [`MAX_BURST`]).
    #[must_use]
    pub const fn new(rate: u64, burst: u64) -> Self {
        let rate = if rate == 0 { 1 } else { rate };
        let interval_ns = NS_PER_S / rate;
        Self {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst),
        }
    }
}

/// Value of `RATE_LIMITS`, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateLimits {
    /// New flows per source prefix ([`RATE_SOURCE_FLOWS`]).
    pub source_flows: Gcra,
    /// New flows of the service ([`RATE_VIP_FLOWS`]).
    pub vip_flows: Gcra,
    /// The mask of the source prefix that makes a bucket ([`prefix_mask`]): the agent
    /// computes it, so that the datapath masks without a branch per byte (each would split
    /// the verifier's states by the prefix length).
    pub source_mask: [u8; 16],
}
const _: () = assert!(size_of::<RateLimits>() == 48);

/// Key of `RATE_STATE`: one bucket per service, limit and source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RateKey {
    /// The service's id, in host order.
    pub service_id: u32,
    /// `LIMIT_*`.
    pub limit: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
    /// The source with its host bits zeroed ([`mask_source`]); IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<RateKey>() == 24);

/// One GCRA step at `now_ns` for a bucket whose TAT is `tat_ns` (0: never used): the new
/// TAT if the flow is admitted, `None` if it is over the limit (the TAT stays as it is).
#[inline(always)]
#[must_use]
pub const fn gcra(tat_ns: u64, now_ns: u64, limit: &Gcra) -> Option<u64> {
    let base = if tat_ns > now_ns { tat_ns } else { now_ns };
    let next = base.saturating_add(limit.interval_ns);
    if next - now_ns <= limit.tolerance_ns {
        Some(next)
    } else {
        None
    }
}

/// The mask of a prefix of `len` bits: its first `len` bits set (an IPv4 address, in the
/// first 4 bytes, takes at most 32: its other bytes are zero anyway).
#[must_use]
pub const fn prefix_mask(len: u8) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let start = (i * 8) as u32;
        let len = len as u32;
        mask[i] = if len >= start + 8 {
            0xff
        } else if len <= start {
            0
        } else {
            // 1..=7 leading bits of this byte.
            !(0xffu8 >> (len - start))
        };
        i += 1;
    }
    mask
}

/// Zeroes the bits of `addr` that `mask` ([`prefix_mask`]) does not keep. Byte by byte with
/// constant bounds and no branch: the BPF verifier sees straight-line code.
#[inline(always)]
pub fn mask_source(addr: &mut [u8; 16], mask: &[u8; 16]) {
    let mut i = 0;
    while i < 16 {
        addr[i] &= mask[i];
        i += 1;
    }
}

/// The default prefix of a family: the whole address.
#[must_use]
pub const fn full_prefix(family: u8) -> u8 {
    if family == FAMILY_V4 { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        // 1000 flows/s, bursts of 10: ten flows at one instant, then one per millisecond.
        let limit = Gcra::new(1000, 10);
        assert_eq!(limit.interval_ns, MS);
        assert_eq!(limit.tolerance_ns, 10 * MS);
        let now = 5_000 * MS;
        let mut tat = 0;
        for _ in 0..10 {
            tat = gcra(tat, now, &limit).expect("within the burst");
        }
        assert_eq!(gcra(tat, now, &limit), None, "the 11th at the same instant");
        assert_eq!(
            gcra(tat, now + MS / 2, &limit),
            None,
            "half an interval later"
        );
        let later = gcra(tat, now + MS, &limit).expect("one interval later");
        assert_eq!(later, now + 11 * MS);
    }

    #[test]
    fn gcra_at_ten_times_the_rate_admits_the_rate() {
        // Offered every 100 us (10,000/s) for 3 s against 1000/s, burst 100: every second
        // after the first admits exactly 1000; the first adds at most the burst.
        let limit = Gcra::new(1000, 100);
        let mut tat = 0;
        let mut per_second = [0u64; 3];
        let start = 1_000 * MS;
        for i in 0..30_000u64 {
            let now = start + i * 100_000;
            if let Some(next) = gcra(tat, now, &limit) {
                tat = next;
                per_second[(i / 10_000) as usize] += 1;
            }
        }
        assert_eq!(per_second, [1099, 1000, 1000]);
    }

    #[test]
    fn gcra_forgets_idle_time_beyond_the_burst() {
        let limit = Gcra::new(10, 2);
        let tat = gcra(0, 1_000 * MS, &limit).unwrap();
        // An hour later the bucket holds its burst again, no more.
        let now = 3_600_000 * MS;
        let t1 = gcra(tat, now, &limit).unwrap();
        let t2 = gcra(t1, now, &limit).unwrap();
        assert_eq!(gcra(t2, now, &limit), None);
    }

    #[test]
    fn masks_prefixes() {
        let mask = |addr: [u8; 16], len| {
            let mut out = addr;
            mask_source(&mut out, &prefix_mask(len));
            out
        };
        assert_eq!(
            mask([0xff; 16], 64),
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        let host = [198, 51, 100, 77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(mask(host, 24)[..4], [198, 51, 100, 0]);
        assert_eq!(mask(host, 27)[..4], [198, 51, 100, 64]);
        assert_eq!(mask(host, 32), host);
        assert_eq!(mask(host, 0), [0; 16]);
        assert_eq!(mask([0xff; 16], 128), [0xff; 16]);
        assert_eq!(prefix_mask(33)[..5], [0xff, 0xff, 0xff, 0xff, 0x80]);
        assert_eq!(full_prefix(FAMILY_V4), 32);
        assert_eq!(full_prefix(crate::FAMILY_V6), 128);
    }
}
