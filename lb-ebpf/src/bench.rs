//! The benchmark programs' own work (`weir_bench`, `weir_bench_fib`, `weir_bench_gen`,
//! `weir_bench_too_big`): restoring the packet template between runs and varying the
//! generator's flows. The balancing they measure is `balance::run`, unchanged.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{
        bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use lb_common::{
    headers::{ETH_P_8021Q, ETH_P_IP, IPV4_HDR_LEN, IPV6_HDR_LEN},
    icmp::{ICMP_HDR_LEN, IcmpBucket},
};

use crate::{
    forward::nexthop::fib_next_hop,
    maps::{BACKENDS, BENCH_GEN, BENCH_GEN_PORTS, BENCH_GEN_SEQ, BENCH_TEMPLATE, ICMP_BUCKETS},
    parse::ptr_at,
};

/// `BENCH_GEN[0]` value: run the balancer.
pub(crate) const BENCH_GEN_BALANCE: u32 = 0;

/// Trims what a previous run prepended and copies `BENCH_TEMPLATE` back over the packet.
#[inline(always)]
pub(crate) fn restore_template(ctx: &XdpContext) -> Result<(), ()> {
    let template = BENCH_TEMPLATE.get_ptr(0).ok_or(())?;
    // SAFETY: a value of a map of this program, alive for the whole run.
    let template = unsafe { &*template };
    let want = template.len as usize;
    let have = ctx.data_end() - ctx.data();
    if have > want {
        // SAFETY: the helper takes the context pointer the kernel gave this program.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, (have - want) as i32) } != 0 {
            return Err(());
        }
    }
    let len = want.min(lb_common::BENCH_TEMPLATE_LEN) as u32;
    if len == 0 {
        return Err(());
    }
    // SAFETY: `len` is at most the template's size; the helper bounds-checks the packet.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, template.data.as_ptr() as *mut _, len) };
    if rc != 0 {
        return Err(());
    }
    Ok(())
}

/// `weir_bench_too_big`'s restoration. The previous run turned the frame into an ICMP
/// answer (headers prepended, the tail trimmed to the quote): this takes the headers off
/// again, grows the frame back to the template's length (the kernel zeroes what it adds;
/// only the template's first bytes matter to the balancer) and copies the template. Then it
/// gives this CPU's ICMP budget one token, frozen (`refilled_ns` ahead of any clock), so that
/// the run takes the token as a real answer does and the repeats never drain the budget.
#[inline(always)]
pub(crate) fn restore_too_big(ctx: &XdpContext) -> Result<(), ()> {
    let template = BENCH_TEMPLATE.get_ptr(0).ok_or(())?;
    // SAFETY: a value of a map of this program, alive for the whole run.
    let want = unsafe { (*template).len } as usize;
    let have = ctx.data_end() - ctx.data();
    if have < want {
        let eth: *const [u8; 18] = ptr_at(ctx, 0).ok_or(())?;
        // SAFETY: `ptr_at` checked the 18 bytes are in the packet.
        let eth = unsafe { *eth };
        let mut ether_type = u16::from_be_bytes([eth[12], eth[13]]);
        if ether_type == ETH_P_8021Q {
            ether_type = u16::from_be_bytes([eth[16], eth[17]]);
        }
        // The answer is of the offending packet's family.
        let added = if ether_type == ETH_P_IP {
            IPV4_HDR_LEN + ICMP_HDR_LEN
        } else {
            IPV6_HDR_LEN + ICMP_HDR_LEN
        };
        // SAFETY: the helpers take the context pointer the kernel gave this program.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, added as i32) } != 0
            // SAFETY: as above.
            || unsafe { bpf_xdp_adjust_tail(ctx.ctx, (want + added - have) as i32) } != 0
        {
            return Err(());
        }
    }
    restore_template(ctx)?;
    let bucket = ICMP_BUCKETS.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled.
    unsafe {
        *bucket = IcmpBucket {
            refilled_ns: u64::MAX,
            tokens: 1,
            _pad: 0,
        };
    }
    Ok(())
}

/// One FIB + neighbour lookup towards the first backend, from source address zero.
#[inline(always)]
pub(crate) fn try_bench_fib(ctx: &XdpContext) -> Result<(), ()> {
    let backend = *BACKENDS.get(0).ok_or(())?;
    let src = [0u8; 16];
    fib_next_hop(ctx, backend.family, &src, &backend.addr, 0)
        .map(|_hop| ())
        .map_err(|_| ())
}

/// Restores the template, then writes the next of `BENCH_GEN[1]` flows into the packet.
/// Returns the configured action: `BENCH_GEN_BALANCE` or an XDP action. `XDP_REDIRECT`
/// sends flow `n` out of interface `n % BENCH_GEN[4]` of `BENCH_GEN[5..]`, as a balancer
/// spreads its flows over backends behind those interfaces, with no balancing.
#[inline(always)]
pub(crate) fn try_bench_gen(ctx: &XdpContext) -> Result<u32, ()> {
    let (Some(action), Some(flows), Some(offset), Some(base)) = (
        BENCH_GEN.get(0),
        BENCH_GEN.get(1),
        BENCH_GEN.get(2),
        BENCH_GEN.get(3),
    ) else {
        return Err(());
    };
    let (action, flows, offset, base) = (*action, *flows, *offset, *base);
    restore_template(ctx)?;
    let seq = BENCH_GEN_SEQ.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled.
    let n = unsafe { *seq };
    let next = if n + 1 >= flows { 0 } else { n + 1 };
    // SAFETY: as above.
    unsafe { *seq = next };
    let mut field = ((base + n) as u16).to_be_bytes();
    // SAFETY: a 2-byte buffer on the stack; the helper bounds-checks the packet.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, offset, field.as_mut_ptr().cast(), 2) };
    if rc != 0 {
        return Err(());
    }
    if action == xdp_action::XDP_REDIRECT {
        let ports = *BENCH_GEN.get(4).ok_or(())?;
        if ports == 0 || ports > BENCH_GEN_PORTS {
            return Err(());
        }
        let ifindex = *BENCH_GEN.get(5 + n % ports).ok_or(())?;
        // SAFETY: a helper without pointer arguments; it only records the target.
        return Ok(unsafe { bpf_redirect(ifindex, 0) } as u32);
    }
    Ok(action)
}
