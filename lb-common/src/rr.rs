//! Smooth weighted round robin (NGINX's algorithm): the sequence of backends the datapath
//! walks for `scheduler = "round-robin"`. In each step every backend gains its weight, the
//! one with the most credit is picked and pays the total back; over one cycle each backend
//! appears exactly `weight` times, spread out rather than in bursts (weights 5,1,1 give
//! a a b a c a a, not a a a a a b c).

use std::vec::Vec;

use crate::BACKEND_NONE;

/// Greatest common divisor.
const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

/// The sequence for `(backend id, weight)` pairs, never longer than `max_len` (the slots
/// the service owns in `RING`): weights are divided by their greatest common divisor, and
/// scaled down proportionally (each kept at least 1) if their sum still exceeds `max_len`.
/// Backends of weight 0 never appear; with no weight at all the sequence is one
/// `BACKEND_NONE`. Only with more weighted backends than `max_len` are the lightest left
/// out (Weir's `MAX_BACKENDS` is far below its ring size).
#[must_use]
pub fn smooth_sequence(backends: &[(u32, u32)], max_len: u32) -> Vec<u32> {
    let mut members: Vec<(u32, u64)> = backends
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(id, w)| (*id, u64::from(*w)))
        .collect();
    if members.is_empty() || max_len == 0 {
        return std::vec![BACKEND_NONE];
    }
    // Order-independent result.
    members.sort_unstable();
    let g = members.iter().fold(0, |g, (_, w)| gcd(g, *w));
    for m in &mut members {
        m.1 /= g;
    }
    let mut total: u64 = members.iter().map(|(_, w)| w).sum();
    let max = u64::from(max_len);
    if total > max {
        for m in &mut members {
            m.1 = (m.1 * max / total).max(1);
        }
        total = members.iter().map(|(_, w)| w).sum();
        // The floor of 1 can still overshoot (many weight-1 backends next to heavy ones):
        // take the excess from the heaviest, which it distorts least.
        while total > max {
            let Some(heaviest) = members.iter_mut().max_by_key(|m| m.1) else {
                break;
            };
            if heaviest.1 <= 1 {
                break;
            }
            let cut = (total - max).min(heaviest.1 - 1);
            heaviest.1 -= cut;
            total -= cut;
        }
        if total > max {
            // Every weight is 1 and there are more backends than slots.
            members.sort_unstable_by_key(|m| core::cmp::Reverse(m.1));
            members.truncate(max_len as usize);
            members.sort_unstable();
            total = max;
        }
    }
    let mut credit = std::vec![0i64; members.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, (_, w)) in members.iter().enumerate() {
            credit[i] += *w as i64;
            if credit[i] > credit[best] {
                best = i;
            }
        }
        credit[best] -= total as i64;
        out.push(members[best].0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_example_is_smooth() {
        // NGINX's documented example: weights a=5, b=1, c=1 -> a a b a c a a.
        assert_eq!(
            smooth_sequence(&[(0, 5), (1, 1), (2, 1)], 1000),
            [0, 0, 1, 0, 2, 0, 0]
        );
    }

    #[test]
    fn each_backend_appears_weight_times_and_never_in_long_bursts() {
        let seq = smooth_sequence(&[(7, 1), (8, 2), (9, 3)], 1000);
        assert_eq!(seq.len(), 6);
        for (id, w) in [(7, 1), (8, 2), (9, 3)] {
            assert_eq!(seq.iter().filter(|&&x| x == id).count(), w);
        }
        // The heaviest backend (half the weight) never appears twice in a row here.
        assert!(seq.windows(2).all(|p| !(p[0] == 9 && p[1] == 9)), "{seq:?}");
    }

    #[test]
    fn gcd_and_scaling_bound_the_length() {
        assert_eq!(smooth_sequence(&[(0, 100), (1, 200)], 1000).len(), 3);
        let seq = smooth_sequence(&[(0, 60_000), (1, 30_000), (2, 7)], 1000);
        assert!(seq.len() <= 1000, "{}", seq.len());
        assert!(seq.contains(&2), "a small weight keeps at least one turn");
    }

    #[test]
    fn never_longer_than_the_ring_it_is_written_to() {
        // The reported overflow: 65535, 65535 and 100 backends of weight 1 gave 65,586
        // entries for a 65,537-slot ring, written into the next service's slots.
        let mut backends = std::vec![(0, 65_535), (1, 65_535)];
        backends.extend((2..102).map(|id| (id, 1)));
        let seq = smooth_sequence(&backends, 65_537);
        assert!(seq.len() <= 65_537, "{}", seq.len());
        for id in 0..102u32 {
            assert!(seq.contains(&id), "backend {id} keeps at least one turn");
        }
        let heavy = seq.iter().filter(|&&x| x == 0).count();
        assert!((32_700..=32_770).contains(&heavy), "{heavy}");
        // More weighted backends than slots: the sequence still fits.
        let many: Vec<(u32, u32)> = (0..20).map(|id| (id, 1)).collect();
        assert_eq!(smooth_sequence(&many, 7).len(), 7);
    }

    #[test]
    fn zero_weights_and_empty_input() {
        assert_eq!(smooth_sequence(&[], 10), [BACKEND_NONE]);
        assert_eq!(smooth_sequence(&[(1, 0)], 10), [BACKEND_NONE]);
        assert_eq!(smooth_sequence(&[(1, 0), (2, 4)], 10), [2]);
    }
}
