//! Connection limits (`max_connections` per backend, HAProxy `maxconn`, IPVS `u_threshold`):
//! the `VipInfo::conn_limits` flag, the per-service [`SpillSet`] of `SPILL_SETS` (where the
//! new flows of a full backend may go instead) and the order of the choice
//! ([`spill_candidate`], which the datapath walks; [`find_room`] is the whole choice), pure
//! so that the datapath and the tests share it.
//!
//! A backend is full while its active connections (`BACKEND_CONNS`) reach its limit
//! (`CONN_LIMITS`, 0 = none). Only a new flow is ever turned away: a tracked flow keeps its
//! backend whatever its count. The scheduler's pick is taken if it has room; otherwise the
//! serving backends of the service (the primaries, or the backups while they serve in their
//! place) are tried in a fixed order from a point that the flow's hash chooses, then the
//! standby backups in config order; if none has room, the flow is refused.

/// `VipInfo::conn_limits`: some backend of the service has a `max_connections`; new flows
/// ask [`find_room`]. Without it the datapath pays one byte test.
pub const CONN_LIMITS_ANY: u8 = 1;

/// Most serving backends of a service the spill set lists (a service with more spills only
/// to the first of them, by backend id).
pub const SPILL_PRIMARIES: usize = 32;
/// Most standby backups of a service the spill set lists (the first, in config order).
pub const SPILL_BACKUPS: usize = 8;

/// Value of `SPILL_SETS`, by service id: written whole by the agent, one slot per service,
/// before the `VIPS` entry whose flag makes the datapath read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillSet {
    /// Entries of `primaries` in use (at most `SPILL_PRIMARIES`).
    pub primary_count: u32,
    /// Entries of `backups` in use (at most `SPILL_BACKUPS`).
    pub backup_count: u32,
    /// The backends that take new flows (ring weight above 0), by id.
    pub primaries: [u32; SPILL_PRIMARIES],
    /// The backups that are up and enabled but stand by (ring weight 0 while a primary
    /// serves), in config order: they take only what full primaries turn away.
    pub backups: [u32; SPILL_BACKUPS],
}
const _: () = assert!(size_of::<SpillSet>() == 8 + 4 * (SPILL_PRIMARIES + SPILL_BACKUPS));

impl SpillSet {
    /// No backend to spill to.
    pub const EMPTY: Self = Self {
        primary_count: 0,
        backup_count: 0,
        primaries: [0; SPILL_PRIMARIES],
        backups: [0; SPILL_BACKUPS],
    };

    /// The set of `primaries` and `backups` (each cut to its capacity).
    #[must_use]
    pub fn new(primaries: &[u32], backups: &[u32]) -> Self {
        let mut set = Self::EMPTY;
        for (slot, id) in set.primaries.iter_mut().zip(primaries) {
            *slot = *id;
            set.primary_count += 1;
        }
        for (slot, id) in set.backups.iter_mut().zip(backups) {
            *slot = *id;
            set.backup_count += 1;
        }
        set
    }
}

impl Default for SpillSet {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Probes after the scheduler's pick: every listed primary, then every listed backup.
pub const SPILL_PROBES: u32 = (SPILL_PRIMARIES + SPILL_BACKUPS) as u32;

/// The backend probe `index` (0-based, after the pick) asks about: the set's primaries
/// walked from position `hash % count` round the list (so that the overflow of one full
/// backend spreads over the others rather than piling onto one), then its backups in
/// order. `None`: no probe that far, the walk is over. Counts beyond the capacities are
/// read as the capacities.
#[inline(always)]
#[must_use]
pub fn spill_candidate(set: &SpillSet, hash: u32, index: u32) -> Option<u32> {
    // Indexes in `usize` from here: on BPF a 32-bit index checked in one register and used
    // zero-extended from another loses the verifier's bound.
    let n = (set.primary_count as usize).min(SPILL_PRIMARIES);
    let index = index as usize;
    if index < n {
        let mut at = (hash as usize).checked_rem(n).unwrap_or(0) + index;
        if at >= n {
            at -= n;
        }
        return set.primaries.get(at).copied();
    }
    let backups = (set.backup_count as usize).min(SPILL_BACKUPS);
    set.backups.get(..backups)?.get(index - n).copied()
}

/// Where a new flow goes under connection limits: `pick` (the scheduler's choice) if it is
/// not `full`, else the first backend with room in [`spill_candidate`]'s order (the pick
/// itself skipped); `None`: every one is full. `hash` is asked only if the pick is full.
/// The datapath walks the same order with `bpf_loop`.
pub fn find_room(
    pick: u32,
    set: &SpillSet,
    hash: impl FnOnce() -> u32,
    mut full: impl FnMut(u32) -> bool,
) -> Option<u32> {
    if !full(pick) {
        return Some(pick);
    }
    let hash = hash();
    (0..SPILL_PROBES)
        .map_while(|i| spill_candidate(set, hash, i))
        .find(|id| *id != pick && !full(*id))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeSet, vec::Vec};

    use super::{SPILL_BACKUPS, SPILL_PRIMARIES, SpillSet, find_room};

    #[test]
    fn a_pick_with_room_is_kept_and_nothing_else_is_asked() {
        let set = SpillSet::new(&[1, 2, 3], &[9]);
        let mut asked = Vec::new();
        let got = find_room(
            2,
            &set,
            || 7,
            |id| {
                asked.push(id);
                false
            },
        );
        assert_eq!((got, asked), (Some(2), std::vec![2]));
    }

    #[test]
    fn a_full_pick_spills_to_a_primary_with_room_from_the_hash() {
        let set = SpillSet::new(&[1, 2, 3, 4], &[9]);
        let full: BTreeSet<u32> = [1, 2].into();
        // Start at position hash % 4: 3 → backend 4; 0 → backend 1 (full), then 2 (the pick
        // itself is skipped), 3.
        assert_eq!(find_room(2, &set, || 3, |id| full.contains(&id)), Some(4));
        assert_eq!(find_room(2, &set, || 4, |id| full.contains(&id)), Some(3));
        // Over many flows, the overflow reaches every primary with room.
        let got: BTreeSet<u32> = (0..64)
            .filter_map(|h| find_room(1, &set, || h, |id| full.contains(&id)))
            .collect();
        assert_eq!(got, [3, 4].into());
    }

    #[test]
    fn full_primaries_spill_to_the_first_backup_with_room_then_refuse() {
        let set = SpillSet::new(&[1, 2, 3], &[7, 8]);
        let mut full: BTreeSet<u32> = [1, 2, 3].into();
        assert_eq!(find_room(1, &set, || 5, |id| full.contains(&id)), Some(7));
        full.insert(7);
        assert_eq!(find_room(1, &set, || 5, |id| full.contains(&id)), Some(8));
        full.insert(8);
        assert_eq!(find_room(1, &set, || 5, |id| full.contains(&id)), None);
        // No set at all (the agent has not written one): a full pick is refused.
        assert_eq!(find_room(1, &SpillSet::EMPTY, || 5, |_| true), None);
    }

    #[test]
    fn the_set_is_cut_to_its_capacity_and_counts_beyond_it_are_clamped() {
        let many: Vec<u32> = (0..100).collect();
        let set = SpillSet::new(&many, &many);
        assert_eq!(set.primary_count as usize, SPILL_PRIMARIES);
        assert_eq!(set.backup_count as usize, SPILL_BACKUPS);
        let corrupt = SpillSet {
            primary_count: u32::MAX,
            backup_count: u32::MAX,
            ..set
        };
        let mut asked = 0;
        assert_eq!(
            find_room(
                1000,
                &corrupt,
                || u32::MAX,
                |_| {
                    asked += 1;
                    true
                }
            ),
            None
        );
        assert_eq!(asked, 1 + SPILL_PRIMARIES + SPILL_BACKUPS);
    }
}
