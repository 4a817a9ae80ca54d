//! Ring computation and the ring cache. A ring is a pure function of its [`RingInput`]
//! (scheduler, size, and each member's id, weight and identity), so rings are cached by
//! input: a backend that goes down and comes back finds its old ring, and the agent
//! precomputes, off the owner task, the rings each service would need if one of its serving
//! backends failed ([`RingInput::one_down`]). A health verdict then costs a diff and one
//! batch write instead of a Maglev build (about 1.3 ms at 65537 slots here).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    MAX_RING_SIZE, SCHED_ROUND_ROBIN, addr_bytes,
    maglev::{self, MaglevBackend},
};

/// Everything a ring depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RingInput {
    /// The service's name: part of every member's Maglev identity.
    pub service: String,
    pub scheduler: u8,
    pub ring_size: u32,
    /// (backend id, ring weight, address), in the service's backend order.
    pub members: Vec<(u32, u32, IpAddr)>,
}

/// The identity Maglev hashes for a backend: stable across restarts and independent of the
/// other backends, so a backend keeps its preferred slots.
fn maglev_key(service: &str, address: IpAddr) -> Vec<u8> {
    let mut key = service.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&addr_bytes(address).0);
    key
}

impl RingInput {
    /// Computes the ring: the smooth round-robin sequence, or the weighted Maglev ring.
    #[must_use]
    pub fn build(&self) -> Vec<u32> {
        if self.scheduler == SCHED_ROUND_ROBIN {
            let weights: Vec<(u32, u32)> = self.members.iter().map(|m| (m.0, m.1)).collect();
            return lb_common::rr::smooth_sequence(&weights, MAX_RING_SIZE);
        }
        let keys: Vec<Vec<u8>> = self
            .members
            .iter()
            .map(|m| maglev_key(&self.service, m.2))
            .collect();
        let members: Vec<MaglevBackend<'_>> = self
            .members
            .iter()
            .zip(&keys)
            .map(|(m, key)| MaglevBackend {
                id: m.0,
                weight: m.1,
                key,
            })
            .collect();
        maglev::build_ring(&members, self.ring_size.min(MAX_RING_SIZE))
    }

    /// The inputs after one serving member fails, one per serving member. Round robin is
    /// left out: its sequence is cheap to compute.
    #[must_use]
    pub fn one_down(&self) -> Vec<Self> {
        if self.scheduler == SCHED_ROUND_ROBIN {
            return Vec::new();
        }
        (0..self.members.len())
            .filter(|&i| self.members[i].1 > 0)
            .map(|i| {
                let mut input = self.clone();
                input.members[i].1 = 0;
                input
            })
            .collect()
    }
}

/// Rings by input, at most `capacity`, least recently used out first.
#[derive(Debug)]
pub struct RingCache {
    rings: HashMap<RingInput, Arc<Vec<u32>>>,
    order: VecDeque<RingInput>,
    capacity: usize,
    pub hits: u64,
    pub misses: u64,
}

/// 64 rings of 65537 slots are 16 MiB.
pub const RING_CACHE_CAPACITY: usize = 64;

/// At most this many rings are computed ahead at a time: half the cache, so precomputed rings
/// never push out the ones in use.
pub const PRECOMPUTE_MAX_RINGS: usize = RING_CACHE_CAPACITY / 2;

/// Services with more serving backends than this get no precomputed rings: each backend's
/// ring matters less (it holds fewer slots) and there would be too many to keep.
pub const PRECOMPUTE_MAX_BACKENDS: usize = 32;

impl Default for RingCache {
    fn default() -> Self {
        Self::new(RING_CACHE_CAPACITY)
    }
}

impl RingCache {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            rings: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    /// The ring of `input`, built now if it is not cached.
    pub fn get_or_build(&mut self, input: &RingInput) -> Arc<Vec<u32>> {
        if let Some(ring) = self.rings.get(input) {
            self.hits += 1;
            // Least recently used goes first: a ring in use stays.
            if let Some(at) = self.order.iter().position(|i| i == input) {
                let used = self.order.remove(at);
                self.order.extend(used);
            }
            return Arc::clone(ring);
        }
        self.misses += 1;
        let ring = Arc::new(input.build());
        self.insert(input.clone(), Arc::clone(&ring));
        ring
    }

    #[must_use]
    pub fn contains(&self, input: &RingInput) -> bool {
        self.rings.contains_key(input)
    }

    /// Adds a ring computed elsewhere (the precompute thread).
    pub fn insert(&mut self, input: RingInput, ring: Arc<Vec<u32>>) {
        if self.capacity == 0 || self.rings.contains_key(&input) {
            return;
        }
        while self.rings.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.rings.remove(&oldest);
        }
        self.order.push_back(input.clone());
        self.rings.insert(input, ring);
    }
}

#[cfg(test)]
mod tests {
    use lb_common::SCHED_MAGLEV;

    use super::*;

    fn input(weights: &[u32]) -> RingInput {
        RingInput {
            service: "web".to_owned(),
            scheduler: SCHED_MAGLEV,
            ring_size: 1009,
            members: weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    (
                        i as u32,
                        *w,
                        format!("198.51.100.{}", 11 + i).parse().unwrap(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_cached_ring_is_the_ring_a_build_gives() {
        let mut cache = RingCache::new(8);
        let full = input(&[1, 1, 1]);
        for down in full.one_down() {
            let built = down.build();
            cache.insert(down.clone(), Arc::new(built.clone()));
            assert_eq!(*cache.get_or_build(&down), built);
        }
        assert_eq!(cache.hits, 3);
        assert_eq!(full.one_down().len(), 3);
        assert_eq!(input(&[1, 0, 2]).one_down().len(), 2);
        assert!(cache.contains(&input(&[0, 1, 1])));
        assert!(!cache.contains(&full));
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut cache = RingCache::new(2);
        for w in 1..=5 {
            let _ = cache.get_or_build(&input(&[w, 1]));
        }
        assert_eq!(cache.rings.len(), 2);
        assert!(cache.contains(&input(&[5, 1])));
        assert!(!cache.contains(&input(&[1, 1])));
    }
}
