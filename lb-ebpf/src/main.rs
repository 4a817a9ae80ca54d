//! Weir's XDP programs and its one tc program: the entry points. Each one only calls into the
//! module that owns its logic and turns the outcome into an XDP (or tc) verdict.
//!
//! * `weir_balancer`: on the LB's NIC. Packets for a VIP leave towards a backend (IP-in-IP
//!   tunnel, L2 DSR, destination NAT or full NAT, whose replies it translates back too);
//!   everything else passes to the kernel untouched.
//! * `weir_decap`: on a backend's NIC. Strips the outer header of IP-in-IP packets whose inner
//!   destination is a VIP of that host, so backends need no tunnel device.
//! * `weir_mss_clamp`: tc egress on a backend's NIC, next to `weir_decap`. Lowers the MSS
//!   option of SYN-ACKs sent from a VIP so the client's segments still fit once tunnelled.
//! * `weir_pass`: `XDP_PASS`. The benchmark floor, and the program a veth peer needs so
//!   that frames sent with `XDP_TX` are picked up.
//! * `weir_bench`, `weir_bench_fib`, `weir_bench_too_big`, `weir_bench_gen`, `weir_bench_sink`: benchmark entry
//!   points and the packet generator and sink of `cargo xtask bench packets` (see
//!   `docs/BENCHMARKS.md`).
//!
//! Packet rules (also in the README):
//! * Frames that are not IPv4/IPv6 (after at most one 802.1Q tag) pass.
//! * A frame too short for its Ethernet, VLAN or fixed IP header is dropped: the kernel
//!   would discard it too, and we cannot tell whether it was for a VIP.
//! * A packet whose destination address is not a VIP address passes untouched, before any
//!   further validation, so the balancer never judges traffic that is not its own.
//! * For a VIP address: a bad version/IHL/length is dropped (`drop_malformed_ip`), an IPv4
//!   fragment is forwarded by the source hash when its (address, protocol) has exactly one
//!   service and it is `ip-hash` (`FRAG_SERVICES`, `fragment_forwarded`), otherwise dropped
//!   (`drop_fragment`: without ports it cannot be hashed, as in Katran), TTL/hop limit 0 is
//!   dropped, IPv6 extension headers pass (`pass_ipv6_ext_header`), a TCP/UDP header that
//!   does not fit in the packet is dropped (`drop_truncated_l4`), other protocols and
//!   unmatched ports pass.
//! * ICMP / ICMPv6 for a VIP address (`inbound`): an error quoting a packet the VIP sent to a
//!   client goes, whole, to the backend of that flow (table, else hash; no entry made;
//!   `icmp_error_forwarded`); one too short for its quote, or longer than 576 / 1280 bytes,
//!   is dropped (`drop_icmp_malformed`); one about anything else passes. Echo requests are
//!   answered in place with `GLOBAL_ANSWER_PING` (`icmp_echo_replied`), else pass. Other ICMP
//!   passes. Only these packets pay: the parser hands them over as exits.
//! * Tunnel mode: a packet that would exceed the egress MTU once encapsulated is not sent.
//!   IPv4 with DF and every IPv6 packet get ICMP "fragmentation needed" / ICMPv6 Packet Too
//!   Big back (`XDP_TX`, from the VIP, MTU = egress MTU − outer header), at most
//!   `ICMP_ERRORS_PER_SEC` per CPU with a burst of `ICMP_ERRORS_BURST` (`icmp_too_big_sent`,
//!   else `drop_too_big_rate_limited`); IPv4 without DF is dropped
//!   (`drop_too_big_fragmentable`). Direct mode does not grow the frame: no check.
//! * The LB is not an IP hop for the inner packet (as IPVS-DR and Katran): the inner TTL is
//!   left alone; the outer header gets `OUTER_TTL`.
//! * NAT (`forwarding = "nat"`, `nat`): a packet from a `nat` backend's address (a reply
//!   candidate, by a second filter in the same `VIP_ADDR_BITS` value) is never dropped
//!   before its `NAT_CT` hit: without one it passes (`pass_nat_no_entry`). The LB is an IP
//!   hop in NAT mode: TTL / hop limit decremented, a packet with 1 dropped (`drop_ttl`). A
//!   packet that cannot be translated safely is dropped and counted, never forwarded half
//!   rewritten. The reply of a pair no longer honoured is dropped (`drop_nat_stale`).
//! * fullnat (`forwarding = "fullnat"`): the client's address and port become an SNAT
//!   address of the service and a port of `snat_ports`, claimed atomically (a `BPF_NOEXIST`
//!   insert of the reply tuple, at most `SNAT_PROBES` probes); with none free the packet is
//!   dropped (`drop_snat_exhausted`), never sent with a tuple a live pair holds. A TCP
//!   packet other than a SYN without a pair cannot be translated and is dropped
//!   (`drop_nat_untracked_midflow`). Packets to an SNAT address that belong to no pair pass.
//!
//! The helpers in the modules are `#[inline(always)]`: each program compiles to one BPF
//! function, the code the verifier accepts and the benchmarks measured. A helper left out of
//! line would become a BPF-to-BPF call, verified on its own and paid for on every packet.
#![no_std]
#![no_main]
// Atomic adds on shared map values: `core::sync::atomic` offers no read-modify-write on the
// BPF target; the intrinsic lowers to BPF_XADD (no fetch: the default CPU level has none).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for BPF atomics")]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "aya-ebpf's map methods take `impl Borrow<K>`; a key or value passed by value is \
              copied onto the 512-byte BPF stack first, and the balancer then exceeds it \
              (LLVM: 'BPF stack limit is exceeded'). By reference nothing is copied."
)]

mod balance;
mod bench;
mod clock;
mod conntrack;
mod decap;
mod forward;
mod icmp;
mod inbound;
mod maps;
mod maxconn;
mod mss;
mod nat;
mod nat_icmp;
mod parse;
mod rate;
mod rules;
mod sched;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::stat;

use crate::{
    maps::STATS,
    stats::{Exit, action_stat, bump},
};

#[xdp]
#[inline(always)]
pub fn weir_balancer(ctx: XdpContext) -> u32 {
    balance::run(&ctx)
}

#[xdp]
#[inline(always)]
pub fn weir_decap(ctx: XdpContext) -> u32 {
    let stats = STATS.get_ptr_mut(0);
    let action = match decap::try_decap(&ctx) {
        Ok(()) => {
            bump(stats, stat::DECAP_OK);
            xdp_action::XDP_PASS
        }
        Err(Exit { action, reason }) => {
            bump(stats, reason);
            action
        }
    };
    bump(stats, action_stat(action));
    action
}

#[xdp]
pub fn weir_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark entry: `BPF_PROG_TEST_RUN` with `repeat` does not restore the packet between
/// runs, so a rewritten packet would stop being a VIP packet after the first run. This
/// trims whatever the previous run prepended, copies the template back, then runs exactly
/// the balancer's code.
#[xdp]
#[inline(always)]
pub fn weir_bench(ctx: XdpContext) -> u32 {
    if bench::restore_template(&ctx).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    balance::run(&ctx)
}

/// Benchmark of one ICMP "too big" answer: `weir_bench` for a packet the balancer answers
/// instead of forwarding, whose rewrite (trimmed, headers prepended) the restoration undoes
/// and whose rate limit it lifts for the run (`bench::restore_too_big`).
#[xdp]
#[inline(always)]
pub fn weir_bench_too_big(ctx: XdpContext) -> u32 {
    if bench::restore_too_big(&ctx).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    balance::run(&ctx)
}

/// Benchmark of one FIB + neighbour lookup towards the first backend, to price the
/// next-hop choice against the floor (`weir_pass`).
#[xdp]
pub fn weir_bench_fib(ctx: XdpContext) -> u32 {
    match bench::try_bench_fib(&ctx) {
        Ok(()) => xdp_action::XDP_DROP,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

/// Packet generator of `cargo xtask bench packets`, run by `BPF_PROG_TEST_RUN` with live
/// frames (`BPF_F_TEST_XDP_LIVE_FRAMES`: the kernel really performs the returned action).
/// Frame pages are reused without being restored, so every run restores the template as
/// `weir_bench` does, then gives the packet the next of `BENCH_GEN[1]` flows, then either
/// balances it or returns the configured action (`XDP_DROP`: the generator's ceiling;
/// `XDP_PASS`: the frame enters the kernel's stack as if received on the ingress interface).
#[xdp]
#[inline(always)]
pub fn weir_bench_gen(ctx: XdpContext) -> u32 {
    match bench::try_bench_gen(&ctx) {
        Ok(bench::BENCH_GEN_BALANCE) => balance::run(&ctx),
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

/// Sink of `cargo xtask bench packets` on the backends: drops everything in XDP, so what
/// arrives is counted (interface counters) at the same small cost for every balancer.
#[xdp]
pub fn weir_bench_sink(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// tc egress on a backend, attached by `weir decap` with `weir_decap`: lowers the MSS option
/// of SYN-ACKs from a VIP to what fits through the tunnel. Never drops: the verdict is always
/// "no opinion" (`mss::VERDICT`).
#[classifier]
pub fn weir_mss_clamp(ctx: TcContext) -> i32 {
    let _clamped = mss::run(&ctx);
    mss::VERDICT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
