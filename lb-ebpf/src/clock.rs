//! The balancer's clock: `bpf_ktime_get_coarse_ns` read at most once per jiffy per CPU
//! (`CLOCK`), so that a packet pays for one load of `jiffies` instead of a helper call.
//!
//! Why this is the coarse clock, not an approximation of it: the coarse clock
//! (`CLOCK_MONOTONIC_COARSE`, which the agent reads too) is the timekeeper's time as of its
//! last update, and the timekeeper is updated by the tick that also advances `jiffies`
//! (`tick_do_update_jiffies64`, then `update_wall_time`; a CPU leaving NOHZ idle catches
//! both up on interrupt entry, before XDP runs). So within one jiffy the coarse clock reads
//! the same value, and the value cached with a jiffy is what the helper would return. The
//! one exception is a read in the instant between the two steps of one tick (`jiffies`
//! already advanced, the timekeeper not yet): that reading is one tick old and is reused
//! for that jiffy, so `now` lags the helper's answer by at most one tick (1 to 10 ms by
//! `CONFIG_HZ`). Idle timeouts are whole seconds and `last_seen_ns` is refreshed at
//! `LAST_SEEN_GRANULARITY_NS` (1 s) already, so expiry, the refresh and the agent's recount
//! (`now - last_seen_ns <= timeout`) keep their meaning; the next-hop cache expires at
//! most one tick later. `now` never goes backwards on a CPU: each cached reading is a later
//! reading of a monotonic clock.
//!
//! The kernel inlines `bpf_jiffies64` into a load of `jiffies_64` (JIT, 64-bit) and the
//! per-CPU array lookup into a few instructions: no call on the per-packet path.
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

/// This CPU's last clock reading and the jiffy it was taken in.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ClockCache {
    jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` during `jiffies`; 0: nothing cached yet.
    now_ns: u64,
}

#[map]
static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// The coarse monotonic clock in ns (see the module documentation for its precision).
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled, so
    // nothing else reads or writes it meanwhile.
    unsafe {
        if (*cache).jiffies == jiffies && (*cache).now_ns != 0 {
            return (*cache).now_ns;
        }
        let now_ns = bpf_ktime_get_coarse_ns();
        *cache = ClockCache { jiffies, now_ns };
        now_ns
    }
}
