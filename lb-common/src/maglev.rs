//! Weighted Maglev ring building (agent side).
//!
//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4) maps a flow to a backend with one array lookup:
//! the datapath indexes a prime-sized ring with the flow hash (`crate::hash`). This module
//! fills that ring. Every backend derives, from its own identity alone, a permutation of the
//! slots (`offset`, `skip`), and the backends take turns claiming their next preferred slot
//! that is still free until the ring is full. Because a backend's preferences do not depend
//! on the other backends, adding or removing one moves few slots between the others, and
//! every backend ends up with almost the same number of slots.
//!
//! Weights follow the scheme of Katran's `MaglevHashV2`: the turns are handed out in
//! proportion to the weights (a backend accumulates credit each round and claims a slot each
//! time its credit reaches the largest weight), so slot shares are proportional to weights
//! while the claiming order, and therefore the low disruption, stays Maglev's. See
//! [`build_ring`].
//!
//! The agent keeps the ring it last wrote and writes only [`diff`] to the kernel map, as
//! Katran does: an update touches the changed slots, not 65537 of them.

use std::collections::BTreeMap;
use std::vec;
use std::vec::Vec;

use crate::BACKEND_NONE;

/// One backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// The backend id written into the ring slots the backend wins.
    pub id: u32,
    /// Relative weight; its share of the slots is `weight / sum of weights`. 0 means no slot
    /// (the backend is drained or down).
    pub weight: u32,
    /// Stable identity bytes (for instance the address bytes plus the service name). They
    /// alone decide the backend's permutation, so a backend keeps its preferences whatever
    /// the other backends are, which is what keeps disruption low.
    pub key: &'a [u8],
}

/// Whether `n` is prime. Maglev needs a prime ring size: with `M` prime every `skip` in
/// `1..M` is coprime with `M`, so `offset + j * skip (mod M)` visits every slot exactly once
/// (the paper, section 3.4).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // Every prime above 3 is 6k +/- 1; u64 so that `d * d` cannot overflow near u32::MAX.
    let n = u64::from(n);
    let mut d: u64 = 5;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Seeds of the two hashes the paper asks for (`h1` for the offset, `h2` for the skip). Two
/// seeds rather than two algorithms: what matters is that offset and skip are not
/// correlated. Changing either reshuffles every ring on the next agent start.
const SEED_OFFSET: u64 = 0x5745_4952_4f46_4653; // "WEIROFFS"
const SEED_SKIP: u64 = 0x5745_4952_534b_4950; // "WEIRSKIP"

/// 64-bit hash of `key` under `seed`: FNV-1a 64 over the bytes, then MurmurHash3's `fmix64`
/// finaliser. FNV-1a alone mixes the last bytes poorly into the high bits, and keys that
/// differ only in their last address byte are the common case; the finaliser gives every
/// input bit an effect on every output bit before we reduce modulo the ring size.
fn hash64(key: &[u8], seed: u64) -> u64 {
    let mut h = FNV_OFFSET_BASIS ^ seed;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= key.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Build state of one backend that takes part (weight > 0).
struct Contender {
    id: u32,
    weight: u64,
    skip: u32,
    /// The slot this backend prefers next: `offset + next * skip (mod M)`, kept as a slot
    /// index and advanced by `skip`, so the walk needs no multiplication or division.
    cursor: u32,
    /// Accumulated turns not yet used (Katran V2's cumulative weight), below `max_weight`
    /// between rounds.
    credit: u64,
}

/// Builds a Maglev ring of `ring_size` slots holding backend ids.
///
/// Backends with weight 0 (and any whose id is [`BACKEND_NONE`], which the datapath could not
/// tell from an empty slot) get no slot. If no backend takes part, every slot is
/// [`BACKEND_NONE`]. The result depends only on the set of backends, not on their order in
/// `backends`: they are sorted by `(key, id, weight)` first.
///
/// # Algorithm
///
/// The population loop of the paper (Pseudocode 1): each backend walks its own permutation
/// (`offset = h1(key) mod M`, `skip = h2(key) mod (M - 1) + 1`) and, on each of its turns,
/// claims the first slot of that walk still free. Weights decide how often a backend gets a
/// turn, as in Katran's `MaglevHashV2`: in every round each backend adds its weight to its
/// credit and takes a turn when the credit reaches the largest weight, paying the largest
/// weight back. So the heaviest backends claim a slot every round and a backend of half
/// their weight every second round; shares match the weights to within a slot or so, and with
/// equal weights this is exactly the unweighted algorithm. A backend whose share is below
/// one slot (weight under `sum_weights / M`) may get no slot at all.
///
/// Cost: the walks visit `O(M log M)` slots in total (the paper's bound), plus one credit
/// update per backend per round; the number of rounds is about `M * max_weight /
/// sum_weights`, which is `M / N` for equal weights and at most `M` (one backend far
/// heavier than all the others: `N * M` credit updates, some 20 ms for 1,000 backends at
/// 65537 slots, still fine for a control plane).
///
/// # Panics
///
/// If `ring_size` is not prime: the walks would then not cover the ring and the loop would
/// never end. Callers check a configured size with [`is_prime`] before building.
#[must_use]
pub fn build_ring(backends: &[MaglevBackend<'_>], ring_size: u32) -> Vec<u32> {
    assert!(
        is_prime(ring_size),
        "Maglev ring size {ring_size} is not prime"
    );
    let m = ring_size;
    let mut ring = vec![BACKEND_NONE; m as usize];

    // Order independence: the turn order inside a round is part of the result (it decides
    // who wins a slot both prefer), so fix it by the backends' identities, never by the
    // caller's order. `id` and `weight` break ties between equal keys.
    let mut sorted: Vec<&MaglevBackend<'_>> = backends
        .iter()
        .filter(|b| b.weight > 0 && b.id != BACKEND_NONE)
        .collect();
    sorted.sort_unstable_by(|a, b| (a.key, a.id, a.weight).cmp(&(b.key, b.id, b.weight)));

    let mut contenders: Vec<Contender> = sorted
        .iter()
        .map(|b| {
            // `m` is at most u32::MAX, so both reductions fit in u32; for m == 2 the skip is
            // always 1, which still visits both slots.
            let offset = (hash64(b.key, SEED_OFFSET) % u64::from(m)) as u32;
            let skip = if m > 1 {
                (hash64(b.key, SEED_SKIP) % u64::from(m - 1)) as u32 + 1
            } else {
                0
            };
            Contender {
                id: b.id,
                weight: u64::from(b.weight),
                skip,
                cursor: offset,
                credit: 0,
            }
        })
        .collect();

    let Some(max_weight) = contenders.iter().map(|c| c.weight).max() else {
        return ring;
    };

    let mut filled: u32 = 0;
    loop {
        for c in &mut contenders {
            c.credit += c.weight;
            if c.credit < max_weight {
                continue;
            }
            c.credit -= max_weight;
            // A free slot exists (filled < m) and the walk is a full cycle of the ring, so
            // this finds one within m steps.
            while ring[c.cursor as usize] != BACKEND_NONE {
                c.cursor = advance(c.cursor, c.skip, m);
            }
            ring[c.cursor as usize] = c.id;
            c.cursor = advance(c.cursor, c.skip, m);
            filled += 1;
            if filled == m {
                return ring;
            }
        }
    }
}

/// `(cursor + skip) mod m` for `cursor < m`, `skip < m`, without overflow (m may approach
/// u32::MAX) and without a division.
#[inline]
fn advance(cursor: u32, skip: u32, m: u32) -> u32 {
    let room = m - cursor;
    if skip < room {
        cursor + skip
    } else {
        skip - room
    }
}

/// The slots whose value differs between `old` and `new`, as `(slot index, new value)` in
/// slot order: what the agent writes to the kernel ring, so that an update touches only the
/// slots that changed (Katran does the same).
///
/// The rings are meant to be of equal length. If `new` is longer, its extra slots are all
/// reported (the kernel copy holds nothing valid there); slots past the end of `new` are
/// ignored, as there is nothing to write for them.
#[must_use]
pub fn diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    new.iter()
        .enumerate()
        .filter(|&(i, &v)| old.get(i) != Some(&v))
        .map(|(i, &v)| (i as u32, v))
        .collect()
}

/// Number of slots of each backend id in `ring`, sorted by id. Empty slots
/// ([`BACKEND_NONE`]) are not counted, so the counts add up to the ring size exactly when
/// every slot has a backend.
#[must_use]
pub fn slot_counts(ring: &[u32]) -> Vec<(u32, u32)> {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for &id in ring.iter().filter(|&&id| id != BACKEND_NONE) {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::println;
    use std::string::String;
    use std::time::Instant;

    const M: u32 = 65537;

    /// Identity keys like the agent's: an address and a service name.
    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080/web", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    /// Backends with ids 0..n, the given weights, and keys from `keys`.
    fn backends<'a>(keys: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, &w))| MaglevBackend {
                id: i as u32,
                weight: w,
                key: k.as_bytes(),
            })
            .collect()
    }

    /// Asserts every backend's share is within 1% (relative) of weight / total and that no
    /// slot is empty. Returns the largest relative error seen.
    fn check_shares(weights: &[u32], ring_size: u32) -> f64 {
        let k = keys(weights.len());
        let ring = build_ring(&backends(&k, weights), ring_size);
        assert_eq!(ring.len(), ring_size as usize);
        assert!(!ring.contains(&BACKEND_NONE), "ring has an empty slot");
        let counts = slot_counts(&ring);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut worst: f64 = 0.0;
        for (id, &w) in weights.iter().enumerate() {
            let got = counts
                .iter()
                .find(|&&(i, _)| i == id as u32)
                .map_or(0, |&(_, c)| c);
            let share = f64::from(got) / f64::from(ring_size);
            let expected = w as f64 / total as f64;
            let err = (share - expected).abs() / expected;
            assert!(
                err <= 0.01,
                "backend {id} (weight {w}): share {share:.5}, expected {expected:.5}, error {err:.4}"
            );
            worst = worst.max(err);
        }
        worst
    }

    #[test]
    fn primes() {
        for p in [
            2,
            3,
            5,
            7,
            11,
            13,
            251,
            65521,
            65537,
            655_373,
            4_294_967_291,
        ] {
            assert!(is_prime(p), "{p} is prime");
        }
        for n in [
            0,
            1,
            4,
            9,
            15,
            25,
            49,
            65535,
            65536,
            655_371,
            1_000_000,
            4_294_967_295,
        ] {
            assert!(!is_prime(n), "{n} is not prime");
        }
        // 65537 = 2^16 + 1 is the default ring size; 65539 is the next prime but 65538 is
        // even and 65541 = 3 * 21847.
        assert!(is_prime(65539));
        assert!(!is_prime(65541));
    }

    #[test]
    fn equal_weights_share_evenly() {
        for n in [3, 10, 100] {
            let worst = check_shares(&vec![1; n], M);
            println!(
                "equal weights, {n} backends, ring {M}: worst relative share error {worst:.5}"
            );
        }
    }

    #[test]
    fn weighted_shares_follow_weights() {
        for weights in [&[1, 2, 3][..], &[1, 1, 5, 10, 3], &[100, 200, 300]] {
            let worst = check_shares(weights, M);
            println!("weights {weights:?}, ring {M}: worst relative share error {worst:.5}");
        }
    }

    #[test]
    fn weight_zero_gets_nothing() {
        let k = keys(4);
        let ring = build_ring(&backends(&k, &[1, 0, 2, 0]), M);
        let counts = slot_counts(&ring);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[0].0, 0);
        assert_eq!(counts[1].0, 2);
        assert_eq!(counts[0].1 + counts[1].1, M);
        // A weight-0 backend is the same as an absent one.
        let without = build_ring(&backends(&k, &[1, 0, 2]), M);
        assert_eq!(ring, without);
    }

    #[test]
    fn removing_one_of_100_moves_little() {
        let k = keys(100);
        let before = build_ring(&backends(&k, &[1; 100]), M);
        let removed: u32 = 42;
        let mut weights = [1; 100];
        weights[removed as usize] = 0;
        let after = build_ring(&backends(&k, &weights), M);

        assert!(!after.contains(&BACKEND_NONE), "a slot was left empty");
        assert!(!after.contains(&removed), "the removed backend kept a slot");

        let own = before.iter().filter(|&&b| b == removed).count();
        let survivor_moves = before
            .iter()
            .zip(&after)
            .filter(|&(&b, &a)| b != removed && b != a)
            .count();
        let fraction = survivor_moves as f64 / f64::from(M);
        println!(
            "remove 1 of 100 (ring {M}): {own} slots of the removed backend reassigned; \
             {survivor_moves} slots moved between survivors = {:.4}% of the ring",
            fraction * 100.0
        );
        assert!(fraction < 0.02, "disruption {fraction} too high");
    }

    #[test]
    fn re_adding_restores_and_order_does_not_matter() {
        let k = keys(50);
        let full = backends(&k, &[1; 50]);
        let ring = build_ring(&full, M);

        let mut fewer = full.clone();
        fewer.remove(17);
        let smaller = build_ring(&fewer, M);
        assert_ne!(ring, smaller);

        // Add it back, at the end this time: the ring is the original again.
        fewer.push(full[17]);
        assert_eq!(build_ring(&fewer, M), ring);

        // Any order of the input gives the same ring.
        let mut reversed = full.clone();
        reversed.reverse();
        assert_eq!(build_ring(&reversed, M), ring);
        let mut shuffled = full.clone();
        for i in 0..shuffled.len() {
            let j = (i * 31 + 7) % shuffled.len();
            shuffled.swap(i, j);
        }
        assert_eq!(build_ring(&shuffled, M), ring);

        // Weighted too.
        let weights: Vec<u32> = (0..50).map(|i| i % 7 + 1).collect();
        let weighted = backends(&k, &weights);
        let mut weighted_rev = weighted.clone();
        weighted_rev.reverse();
        assert_eq!(build_ring(&weighted, M), build_ring(&weighted_rev, M));
    }

    #[test]
    fn empty_and_single() {
        assert!(build_ring(&[], M).iter().all(|&s| s == BACKEND_NONE));
        assert_eq!(build_ring(&[], M).len(), M as usize);
        let k = keys(3);
        assert!(
            build_ring(&backends(&k, &[0, 0, 0]), M)
                .iter()
                .all(|&s| s == BACKEND_NONE)
        );
        assert!(slot_counts(&build_ring(&[], M)).is_empty());

        let single = build_ring(&backends(&k, &[0, 7, 0]), M);
        assert!(single.iter().all(|&s| s == 1));
        assert_eq!(slot_counts(&single), vec![(1, M)]);
    }

    #[test]
    fn tiny_rings_fill() {
        let k = keys(5);
        for m in [2, 3, 5, 7, 13] {
            let ring = build_ring(&backends(&k, &[1, 2, 1, 1, 3]), m);
            assert_eq!(ring.len(), m as usize);
            assert!(!ring.contains(&BACKEND_NONE));
        }
    }

    #[test]
    #[should_panic(expected = "not prime")]
    fn non_prime_size_panics() {
        let k = keys(2);
        let _ = build_ring(&backends(&k, &[1, 1]), 65536);
    }

    #[test]
    fn diff_and_counts() {
        let old = [1, 2, 3, 4, 5];
        let new = [1, 9, 3, 4, 7];
        assert_eq!(diff(&old, &new), vec![(1, 9), (4, 7)]);
        assert!(diff(&old, &old).is_empty());
        // A longer new ring reports its extra slots.
        assert_eq!(diff(&old[..3], &new), vec![(1, 9), (3, 4), (4, 7)]);

        // On real rings, applying the diff to the old ring gives the new one.
        let k = keys(20);
        let a = build_ring(&backends(&k, &[1; 20]), M);
        let mut weights = [1; 20];
        weights[3] = 0;
        weights[11] = 4;
        let b = build_ring(&backends(&k, &weights), M);
        let d = diff(&a, &b);
        let changed = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(d.len(), changed);
        let mut patched = a.clone();
        for &(slot, v) in &d {
            assert_ne!(a[slot as usize], v);
            patched[slot as usize] = v;
        }
        assert_eq!(patched, b);

        let counts = slot_counts(&b);
        assert_eq!(counts.iter().map(|&(_, c)| c).sum::<u32>(), M);
        assert!(counts.windows(2).all(|w| w[0].0 < w[1].0), "sorted by id");
        assert!(counts.iter().all(|&(id, _)| id != 3));
        assert_eq!(slot_counts(&[5, 1, BACKEND_NONE, 5]), vec![(1, 1), (5, 2)]);
    }

    #[test]
    fn weight_change_moves_about_the_minimum() {
        let k = keys(10);
        let before = build_ring(&backends(&k, &[1; 10]), M);
        let mut weights = [1; 10];
        weights[4] = 2;
        let after = build_ring(&backends(&k, &weights), M);

        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let fraction = changed as f64 / f64::from(M);
        // Backend 4 goes from 1/10 to 2/11 of the ring; at least that difference must move.
        let minimum = 2.0 / 11.0 - 1.0 / 10.0;
        println!(
            "weight 1 -> 2 for 1 of 10 (ring {M}): {changed} slots changed = {:.4}% \
             (theoretical minimum {:.4}%, ratio {:.3})",
            fraction * 100.0,
            minimum * 100.0,
            fraction / minimum
        );
        assert!(fraction >= minimum * 0.99);
        assert!(
            fraction <= 2.0 * minimum,
            "moved {fraction}, minimum {minimum}"
        );
    }

    /// Correctness at the sizes the agent uses, with the build time printed (not asserted:
    /// it depends on the machine and the profile).
    #[test]
    fn thousand_backends_build() {
        let k = keys(1000);
        let weights: Vec<u32> = (0..1000).map(|i| i % 3 + 1).collect();
        for m in [M, 655_373] {
            for (label, w) in [("equal", vec![1; 1000]), ("weights 1..3", weights.clone())] {
                let b = backends(&k, &w);
                let start = Instant::now();
                let ring = build_ring(&b, m);
                let elapsed = start.elapsed();
                println!("1000 backends ({label}), ring {m}: built in {elapsed:?}");
                assert!(!ring.contains(&BACKEND_NONE));
                let counts = slot_counts(&ring);
                assert_eq!(counts.len(), 1000);
                assert_eq!(counts.iter().map(|&(_, c)| c).sum::<u32>(), m);
            }
        }
    }
}
