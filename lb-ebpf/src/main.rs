//! Weir's XDP programs.
//!
//! * `weir_balancer`: on the LB's NIC. Packets for a VIP leave towards a backend (IP-in-IP
//!   tunnel or L2 DSR); everything else passes to the kernel untouched.
//! * `weir_decap`: on a backend's NIC. Strips the outer header of IP-in-IP packets whose inner
//!   destination is a VIP of that host, so backends need no tunnel device.
//! * `weir_pass`: `XDP_PASS`. The benchmark floor, and the program a veth peer needs so
//!   that frames sent with `XDP_TX` are picked up.
//! * `weir_bench`, `weir_bench_fib`, `weir_bench_gen`, `weir_bench_sink`: benchmark entry
//!   points and the packet generator and sink of `cargo xtask bench packets` (see
//!   `docs/BENCHMARKS.md`).
//!
//! Packet rules (also in the README):
//! * Frames that are not IPv4/IPv6 (after at most one 802.1Q tag) pass.
//! * A frame too short for its Ethernet, VLAN or fixed IP header is dropped: the kernel
//!   would discard it too, and we cannot tell whether it was for a VIP.
//! * A packet whose destination address is not a VIP address passes untouched, before any
//!   further validation, so the balancer never judges traffic that is not its own.
//! * For a VIP address: a bad version/IHL/length is dropped (`drop_malformed_ip`), a
//!   fragment is dropped (`drop_fragment`: without ports it cannot be hashed, as in
//!   Katran), TTL/hop limit 0 is dropped, IPv6 extension headers pass (`pass_ipv6_ext_header`),
//!   a TCP/UDP header that does not fit in the packet is dropped (`drop_truncated_l4`),
//!   other protocols and unmatched ports pass.
//! * The LB is not an IP hop for the inner packet (as IPVS-DR and Katran): the inner TTL is
//!   left alone; the outer header gets `OUTER_TTL`.
#![no_std]
#![no_main]
// Atomic adds on shared map values: `core::sync::atomic` offers no read-modify-write on the
// BPF target; the intrinsic lowers to BPF_XADD (no fetch: the default CPU level has none).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for BPF atomics")]

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{
        bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns,
        generated::{bpf_fib_lookup, bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    },
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{
    BACKEND_NONE, BACKEND_UP, BackendInfo, BenchTemplate, DEFAULT_CONNTRACK_ENTRIES, FAMILY_V4,
    FAMILY_V6, FLOW_CLOSED, FLOW_COUNTED, FORWARD_DIRECT, FlowKey, FlowValue, GlobalConfig,
    LAST_SEEN_GRANULARITY_NS, MAX_BACKENDS, MAX_RING_SIZE, MAX_SERVICES, MAX_TX_PORTS,
    NEXT_HOP_TTL_NS, NextHop, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP, SCHED_IP_HASH,
    SCHED_MAGLEV, SCHED_ROUND_ROBIN, TrafficCounters, VipInfo, VipKey,
    hash::{flow_hash, source_hash},
    headers::{
        ETH_HDR_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
        write_ipv4_outer, write_ipv6_outer,
    },
    stat,
};

#[map]
static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every VIP address (port and protocol zero): the first, cheap test that lets all other
/// traffic pass before any further parsing.
#[map]
static VIP_ADDRS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// `MAX_SERVICES` Maglev rings of `MAX_RING_SIZE` slots back to back, written by the agent.
#[map]
static RING: Array<u32> = Array::with_max_entries(MAX_SERVICES * MAX_RING_SIZE, 0);

/// The connection table. The agent resizes it from `conntrack_entries` at load time.
#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Global counters, one array of `stat::COUNT` per CPU: one lookup per packet.
#[map]
static STATS: PerCpuArray<[u64; stat::COUNT as usize]> = PerCpuArray::with_max_entries(1, 0);

#[map]
static VIP_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
static BACKEND_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Interfaces other than the ingress one that packets may be redirected to, keyed by ifindex.
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map]
static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Active connections per backend (new flows minus ended ones), for least-conn and for the
/// operator. Shared across CPUs and updated atomically; the agent reconciles it with the
/// table (entries the LRU evicted never report their end).
#[map]
static BACKEND_CONNS: Array<i64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Round-robin position per service, per CPU.
#[map]
static RR_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
static GLOBAL: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map]
static BENCH_TEMPLATE: Array<BenchTemplate> = Array::with_max_entries(1, 0);

/// Decap program: the VIPs of this backend (port and protocol zero).
#[map]
static DECAP_VIPS: HashMap<VipKey, u32> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Decap program: this host's own addresses. Only a packet whose outer destination is one
/// of them is decapsulated: a tunnel packet merely passing by (a bridge port, a router) is
/// not ours to open.
#[map]
static DECAP_LOCAL: HashMap<VipKey, u32> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// An early exit: the action to return and the counter that says why.
struct Exit {
    action: u32,
    reason: u32,
}

#[inline(always)]
const fn drop(reason: u32) -> Exit {
    Exit {
        action: xdp_action::XDP_DROP,
        reason,
    }
}

#[inline(always)]
const fn pass(reason: u32) -> Exit {
    Exit {
        action: xdp_action::XDP_PASS,
        reason,
    }
}

/// The one bounds-checked way to a header: `None` unless `offset + size_of::<T>()` bytes
/// are inside the packet. The verifier needs this comparison against `data_end` before any
/// access.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn bump(stats: Option<*mut [u64; stat::COUNT as usize]>, index: u32) {
    if let Some(stats) = stats
        && index < stat::COUNT
    {
        // SAFETY: a per-CPU array value of this CPU; XDP runs with preemption disabled, so
        // nothing else writes it concurrently. `index` is checked against the array length.
        unsafe { (*stats)[index as usize] += 1 };
    }
}

#[inline(always)]
const fn action_stat(action: u32) -> u32 {
    match action {
        xdp_action::XDP_DROP => stat::XDP_DROP,
        xdp_action::XDP_PASS => stat::XDP_PASS,
        xdp_action::XDP_TX => stat::XDP_TX,
        xdp_action::XDP_REDIRECT => stat::XDP_REDIRECT,
        _ => stat::XDP_ABORTED,
    }
}

#[xdp]
pub fn weir_balancer(ctx: XdpContext) -> u32 {
    run_balancer(&ctx)
}

/// Balances one packet and counts its fate. Shared by `weir_balancer` and `weir_bench`.
#[inline(always)]
fn run_balancer(ctx: &XdpContext) -> u32 {
    let stats = STATS.get_ptr_mut(0);
    let action = match try_balance(ctx, stats) {
        Ok(action) => action,
        Err(Exit { action, reason }) => {
            bump(stats, reason);
            action
        }
    };
    bump(stats, action_stat(action));
    action
}

/// What the parser learnt of a packet for a VIP address.
struct Parsed {
    key: FlowKey,
    /// Ethernet header length: 14, or 18 with an 802.1Q tag.
    l2_len: usize,
    /// Length of the IP packet (header included) as its header states.
    ip_len: u16,
    /// The inner IPv4 header's DF bit (always set for IPv6, which routers never fragment).
    dont_fragment: bool,
    tcp_flags: u8,
}

#[inline(always)]
fn vip_addr_known(addr: &[u8; 16], family: u8) -> bool {
    let key = VipKey {
        addr: *addr,
        port_be: 0,
        proto: 0,
        family,
    };
    // SAFETY: the value is only tested for presence.
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

/// Parses up to the L4 ports. `Err` is an early exit (pass or drop) with its reason.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Parsed, Exit> {
    let eth: *const [u8; ETH_HDR_LEN] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_TRUNC_ETH))?;
    // SAFETY: `ptr_at` checked the 14 bytes are in the packet.
    let mut ether_type = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    let mut l2_len = ETH_HDR_LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const [u8; VLAN_HDR_LEN] =
            ptr_at(ctx, ETH_HDR_LEN).ok_or(drop(stat::DROP_TRUNC_ETH))?;
        // SAFETY: checked by `ptr_at`.
        ether_type = unsafe { u16::from_be_bytes([(*vlan)[2], (*vlan)[3]]) };
        l2_len = ETH_HDR_LEN + VLAN_HDR_LEN;
    }
    let frame_len = ctx.data_end() - ctx.data();
    let mut key = FlowKey::default();
    let l4_off;
    let ip_len;
    let dont_fragment;
    if ether_type == ETH_P_IP {
        let ip: *const [u8; IPV4_HDR_LEN] =
            ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV4))?;
        // SAFETY: the fixed 20-byte header is in the packet (`ptr_at`).
        let ip = unsafe { &*ip };
        key.dst_addr[..4].copy_from_slice(&ip[16..20]);
        if !vip_addr_known(&key.dst_addr, FAMILY_V4) {
            return Err(pass(stat::PASS_NOT_VIP));
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        ip_len = u16::from_be_bytes([ip[2], ip[3]]);
        if ip[0] >> 4 != 4 || ihl < IPV4_HDR_LEN || (ip_len as usize) < ihl {
            return Err(drop(stat::DROP_MALFORMED_IP));
        }
        // Ethernet may pad short frames, so the IP length may be less than the frame's.
        if l2_len + ip_len as usize > frame_len {
            return Err(drop(stat::DROP_TRUNC_IPV4));
        }
        // MF set or a non-zero offset.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return Err(drop(stat::DROP_FRAGMENT));
        }
        if ip[8] == 0 {
            return Err(drop(stat::DROP_TTL));
        }
        key.src_addr[..4].copy_from_slice(&ip[12..16]);
        key.proto = ip[9];
        key.family = FAMILY_V4;
        dont_fragment = ip[6] & 0x40 != 0;
        l4_off = l2_len + ihl;
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const [u8; IPV6_HDR_LEN] =
            ptr_at(ctx, l2_len).ok_or(drop(stat::DROP_TRUNC_IPV6))?;
        // SAFETY: the fixed 40-byte header is in the packet (`ptr_at`).
        let ip = unsafe { &*ip };
        key.dst_addr.copy_from_slice(&ip[24..40]);
        if !vip_addr_known(&key.dst_addr, FAMILY_V6) {
            return Err(pass(stat::PASS_NOT_VIP));
        }
        if ip[0] >> 4 != 6 {
            return Err(drop(stat::DROP_MALFORMED_IP));
        }
        let payload_len = u16::from_be_bytes([ip[4], ip[5]]);
        if l2_len + IPV6_HDR_LEN + payload_len as usize > frame_len {
            return Err(drop(stat::DROP_TRUNC_IPV6));
        }
        match ip[6] {
            PROTO_TCP | PROTO_UDP => {}
            // Hop-by-hop, routing, fragment, ESP, AH, destination options, mobility, HIP,
            // shim6, experimental (RFC 8200 §4, IANA "IPv6 Extension Header Types").
            0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => {
                return Err(pass(stat::PASS_IPV6_EXT));
            }
            _ => return Err(pass(stat::PASS_NOT_VIP)),
        }
        if ip[7] == 0 {
            return Err(drop(stat::DROP_TTL));
        }
        key.src_addr.copy_from_slice(&ip[8..24]);
        key.proto = ip[6];
        key.family = FAMILY_V6;
        ip_len = payload_len.wrapping_add(IPV6_HDR_LEN as u16);
        dont_fragment = true;
        l4_off = l2_len + IPV6_HDR_LEN;
    } else {
        return Err(pass(stat::PASS_NON_IP));
    }

    let ip_end = l2_len + ip_len as usize;
    let mut tcp_flags = 0;
    if key.proto == PROTO_TCP {
        let tcp: *const [u8; 20] = ptr_at(ctx, l4_off).ok_or(drop(stat::DROP_TRUNC_L4))?;
        // SAFETY: checked by `ptr_at`.
        let tcp = unsafe { &*tcp };
        if l4_off + 20 > ip_end || (tcp[12] >> 4) < 5 {
            return Err(drop(stat::DROP_TRUNC_L4));
        }
        key.src_port_be = u16::from_ne_bytes([tcp[0], tcp[1]]);
        key.dst_port_be = u16::from_ne_bytes([tcp[2], tcp[3]]);
        tcp_flags = tcp[13];
    } else if key.proto == PROTO_UDP {
        let udp: *const [u8; 8] = ptr_at(ctx, l4_off).ok_or(drop(stat::DROP_TRUNC_L4))?;
        // SAFETY: checked by `ptr_at`.
        let udp = unsafe { &*udp };
        if l4_off + 8 > ip_end {
            return Err(drop(stat::DROP_TRUNC_L4));
        }
        key.src_port_be = u16::from_ne_bytes([udp[0], udp[1]]);
        key.dst_port_be = u16::from_ne_bytes([udp[2], udp[3]]);
    } else {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    Ok(Parsed {
        key,
        l2_len,
        ip_len,
        dont_fragment,
        tcp_flags,
    })
}

#[inline(always)]
fn lookup_vip(key: &FlowKey) -> Option<&'static VipInfo> {
    let mut vip_key = VipKey {
        addr: key.dst_addr,
        port_be: key.dst_port_be,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    if let Some(vip) = unsafe { VIPS.get(&vip_key) } {
        return Some(vip);
    }
    vip_key.port_be = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&vip_key) }
}

/// A backend a tracked flow may keep: still up, still of this service, still the same
/// backend (generation) as when the entry was made.
#[inline(always)]
fn honoured(flow: &FlowValue, service_id: u32) -> Option<&'static BackendInfo> {
    let backend = BACKENDS.get(flow.backend_id)?;
    if backend.state == BACKEND_UP
        && backend.service_id == service_id
        && backend.generation == flow.generation
    {
        Some(backend)
    } else {
        None
    }
}

#[inline(always)]
fn try_balance(
    ctx: &XdpContext,
    stats: Option<*mut [u64; stat::COUNT as usize]>,
) -> Result<u32, Exit> {
    let p = parse(ctx)?;
    let vip = lookup_vip(&p.key).ok_or(pass(stat::PASS_NOT_VIP))?;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;

    let is_tcp = p.key.proto == PROTO_TCP;
    // A bare SYN always asks the scheduler: a reused 5-tuple is a new connection and may go
    // elsewhere. A RST never creates state.
    let is_syn = is_tcp && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let is_rst = is_tcp && p.tcp_flags & TCP_RST != 0;
    let is_end = is_tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // One clock read per packet, and the coarse clock (jiffies): timestamps here only need
    // second precision, and the precise clock measured at about 45 ns per read in a VM.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let timeout_s = if is_tcp {
        vip.tcp_idle_timeout_s
    } else {
        vip.udp_idle_timeout_s
    };
    let timeout_ns = u64::from(timeout_s) * 1_000_000_000;

    let mut tracked = None;
    let mut stale = None;
    if let Some(flow) = CONNTRACK.get_ptr_mut(&p.key) {
        // SAFETY: a value of the table, valid until this program returns.
        let f = unsafe { &*flow };
        let expired = timeout_ns != 0 && now.saturating_sub(f.last_seen_ns) > timeout_ns;
        if expired {
            bump(stats, stat::CT_IDLE_EXPIRED);
        } else if !is_syn && let Some(b) = honoured(f, vip.service_id) {
            tracked = Some((f.backend_id, b, flow));
        }
        if tracked.is_none() {
            stale = Some(flow);
        }
    }
    let mut new_flow = false;
    let (backend_id, backend) = match tracked {
        Some((id, b, flow)) => {
            bump(stats, stat::CT_HIT);
            // SAFETY: as above. A plain store: racing CPUs of one flow write nearly the same
            // time, and the granularity keeps busy flows from writing on every packet.
            unsafe {
                if now.saturating_sub((*flow).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
                    (*flow).last_seen_ns = now;
                }
            }
            if is_end {
                release(flow);
            }
            (id, b)
        }
        None => {
            bump(stats, stat::CT_MISS);
            if let Some(flow) = stale {
                release(flow);
            }
            // A TCP packet that is neither a SYN nor known: it belongs to a connection made
            // before an eviction, an idle expiry or an LB restart. It goes by the hash.
            let midflow = is_tcp && !is_syn;
            if midflow {
                bump(stats, stat::UNTRACKED_MIDFLOW);
            }
            let id = schedule(&vip, &p.key, midflow)?;
            let backend = BACKENDS.get(id).ok_or(drop(stat::DROP_NO_BACKEND))?;
            if !is_rst {
                // A FIN of a flow the table lost (re-picked, evicted, expired) keeps the rest
                // of the close on one backend but is no active connection: it would never be
                // released, so it is not counted.
                let value = FlowValue {
                    backend_id: id,
                    generation: backend.generation,
                    last_seen_ns: now,
                    flags: if is_end { FLOW_CLOSED } else { FLOW_COUNTED },
                };
                // A full LRU evicts its oldest entry (the agent reconciles the counts); a
                // failure here only means the next packet asks the scheduler again.
                if CONNTRACK.insert(&p.key, &value, 0).is_ok() && !is_end {
                    add_conns(id, 1);
                }
                new_flow = true;
            }
            (id, backend)
        }
    };

    if let Some(c) = VIP_STATS.get_ptr_mut(vip.service_id) {
        // SAFETY: this CPU's slot of a per-CPU array; no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += frame_len;
            (*c).new_flows += u64::from(new_flow);
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += frame_len;
            (*c).new_flows += u64::from(new_flow);
        }
    }

    if vip.forwarding == FORWARD_DIRECT {
        forward_direct(ctx, &p, backend_id, backend, now)
    } else {
        forward_tunnel(ctx, &p, backend_id, backend, now)
    }
}

/// Picks a backend for a flow the table does not hold. `by_hash` forces the service's hash
/// (for mid-flow TCP packets of unknown flows, whatever the scheduler).
#[inline(always)]
fn schedule(vip: &VipInfo, key: &FlowKey, by_hash: bool) -> Result<u32, Exit> {
    if vip.ring_size == 0 || vip.service_id >= MAX_SERVICES {
        return Err(drop(stat::DROP_NO_BACKEND));
    }
    let base = vip.service_id * MAX_RING_SIZE;
    let ring_size = vip.ring_size;
    // `checked_rem`: LLVM cannot always carry the zero check above into the closure, and a
    // division that could panic leaves the program ending in `unreachable`, which the
    // verifier rejects.
    let ring = |n: u32| -> Result<u32, Exit> {
        let slot = base
            + n.checked_rem(ring_size)
                .ok_or(drop(stat::DROP_NO_BACKEND))?;
        let id = *RING.get(slot).ok_or(drop(stat::DROP_NO_BACKEND))?;
        if id == BACKEND_NONE {
            return Err(drop(stat::DROP_NO_BACKEND));
        }
        Ok(id)
    };
    if vip.scheduler == SCHED_IP_HASH {
        return ring(source_hash(key));
    }
    if by_hash || vip.scheduler == SCHED_MAGLEV {
        return ring(flow_hash(key));
    }
    if vip.scheduler == SCHED_ROUND_ROBIN {
        // The ring holds the smooth weighted round-robin sequence. Each CPU walks it with
        // its own position (a per-CPU counter: no shared cache line, no atomics, which the
        // default BPF CPU level lacks for fetch-and-add), starting a slice apart, so every
        // CPU's picks are exactly weighted per cycle, never bursty, and so is their sum.
        let counter = RR_COUNTERS
            .get_ptr_mut(vip.service_id)
            .ok_or(drop(stat::DROP_NO_BACKEND))?;
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        let n = unsafe {
            let n = *counter;
            *counter = n.wrapping_add(1);
            n
        };
        // SAFETY: a helper without arguments.
        let cpu = u64::from(unsafe { bpf_get_smp_processor_id() });
        let len = u64::from(ring_size);
        let start = cpu.wrapping_mul(len / 8 + 1);
        let pos = n
            .wrapping_add(start)
            .checked_rem(len)
            .ok_or(drop(stat::DROP_NO_BACKEND))?;
        return ring(pos as u32);
    }
    // Least connections, power of two choices: two random draws from the weighted Maglev
    // table, the one with fewer active connections per unit of weight wins.
    // SAFETY: helpers without arguments.
    let (ra, rb) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let a = ring(ra)?;
    let b = ring(rb)?;
    let load = |id: u32| -> (u64, u64) {
        let conns = BACKEND_CONNS.get(id).map_or(0, |c| (*c).max(0) as u64);
        let weight = BACKENDS.get(id).map_or(1, |b| u64::from(b.weight.max(1)));
        (conns, weight)
    };
    let (ca, wa) = load(a);
    let (cb, wb) = load(b);
    // ca/wa <= cb/wb without division.
    Ok(if ca * wb <= cb * wa { a } else { b })
}

/// Marks a tracked flow closed and takes it out of its backend's active count. A check then
/// a store, not one atomic step (the default BPF CPU level has no atomic fetch-or): two CPUs
/// ending the same flow at the same instant could both decrement; the agent's periodic
/// reconciliation with the table repairs such drift. A flow of an earlier owner of its
/// backend id (another generation) was never counted for the current owner: only marked.
#[inline(always)]
fn release(flow: *mut FlowValue) {
    // SAFETY: `flow` points at a live table value.
    unsafe {
        let flags = (*flow).flags;
        if flags & FLOW_COUNTED != 0 && flags & FLOW_CLOSED == 0 {
            (*flow).flags = flags | FLOW_CLOSED;
            let id = (*flow).backend_id;
            if BACKENDS
                .get(id)
                .is_some_and(|b| b.generation == (*flow).generation)
            {
                add_conns(id, -1);
            }
        }
    }
}

/// Adds to a backend's active-connection count (shared by all CPUs: atomic).
#[inline(always)]
fn add_conns(backend_id: u32, delta: i64) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a value of a shared array, alive while the program runs; updated only with
        // atomic adds (here) or whole writes by the agent's reconciliation.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(c, delta) };
    }
}

/// Next hop of `dst` from the kernel's FIB and neighbour table: (egress ifindex, source
/// MAC, destination MAC). A non-zero `tot_len` would have the kernel check the egress MTU;
/// the cached path cannot repeat that check per packet, so it is not asked for.
#[inline(always)]
fn fib_next_hop(
    ctx: &XdpContext,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    tot_len: u16,
) -> Result<(u32, [u8; 6], [u8; 6]), Exit> {
    // SAFETY: `bpf_fib_lookup` is plain old data; all-zero is its documented "no input".
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_1.tot_len = tot_len;
    if family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    } else {
        params.family = AF_INET6;
        // SAFETY: writing the IPv6 variant of the unions; the kernel reads that variant
        // because `family` is AF_INET6.
        unsafe {
            let mut i = 0;
            while i < 4 {
                params.__bindgen_anon_3.ipv6_src[i] = u32::from_ne_bytes([
                    src[4 * i],
                    src[4 * i + 1],
                    src[4 * i + 2],
                    src[4 * i + 3],
                ]);
                params.__bindgen_anon_4.ipv6_dst[i] = u32::from_ne_bytes([
                    dst[4 * i],
                    dst[4 * i + 1],
                    dst[4 * i + 2],
                    dst[4 * i + 3],
                ]);
                i += 1;
            }
        }
    }
    // SAFETY: `params` is a valid, fully initialised struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &raw mut params,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(drop(stat::DROP_FIB));
    }
    Ok((params.ifindex, params.smac, params.dmac))
}

/// The LB's own address of `family` (the tunnel source), as the FIB lookup's source.
#[inline(always)]
fn tunnel_source(family: u8) -> Result<[u8; 16], Exit> {
    let global = GLOBAL.get(0).ok_or(drop(stat::DROP_ENCAP))?;
    let mut src = [0u8; 16];
    if family == FAMILY_V4 {
        src[..4].copy_from_slice(&global.tunnel_source_v4);
    } else {
        src = global.tunnel_source_v6;
    }
    Ok(src)
}

/// The next hop towards a backend: this CPU's cached answer while fresh, else a FIB lookup
/// whose answer is cached for `NEXT_HOP_TTL_NS`. Failed lookups are not cached.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    backend_id: u32,
    backend: &BackendInfo,
    src: &[u8; 16],
    now: u64,
) -> Result<(u32, [u8; 6], [u8; 6]), Exit> {
    let cached = NEXT_HOPS.get_ptr_mut(backend_id);
    if let Some(hop) = cached {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        let hop = unsafe { &*hop };
        if hop.expires_ns > now {
            return Ok((hop.ifindex, hop.smac, hop.dmac));
        }
    }
    let (ifindex, smac, dmac) = fib_next_hop(ctx, backend.family, src, &backend.addr, 0)?;
    if let Some(hop) = cached {
        // SAFETY: as above; the value is written whole.
        unsafe {
            *hop = NextHop {
                expires_ns: now + NEXT_HOP_TTL_NS,
                ifindex,
                smac,
                dmac,
            };
        }
    }
    Ok((ifindex, smac, dmac))
}

/// `XDP_TX` when the next hop is behind the ingress interface (or the frame is tagged: the
/// tag names the segment), otherwise `XDP_REDIRECT` through the devmap.
#[inline(always)]
fn egress(ctx: &XdpContext, ifindex: u32, tagged: bool) -> Result<u32, Exit> {
    if tagged || ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS
        .redirect(ifindex, 0)
        .map_err(|_| drop(stat::DROP_REDIRECT))
}

#[inline(always)]
fn write_macs(ctx: &XdpContext, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), Exit> {
    let eth: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
    // SAFETY: checked by `ptr_at`.
    let eth = unsafe { &mut *eth };
    eth[..6].copy_from_slice(dmac);
    eth[6..12].copy_from_slice(smac);
    Ok(())
}

/// L2 DSR: only the MAC addresses change; the backend owns the VIP on a loopback.
#[inline(always)]
fn forward_direct(
    ctx: &XdpContext,
    p: &Parsed,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<u32, Exit> {
    if backend.family != p.key.family {
        return Err(drop(stat::DROP_FAMILY));
    }
    // The next hop towards the backend does not depend on the client, so it is cached per
    // backend; the LB's own address (zero if none is configured) is the lookup's source.
    let src = tunnel_source(backend.family)?;
    let (ifindex, smac, dmac) = next_hop(ctx, backend_id, backend, &src, now)?;
    write_macs(ctx, &smac, &dmac)?;
    egress(ctx, ifindex, p.l2_len != ETH_HDR_LEN)
}

/// IP-in-IP: a new outer IPv4 or IPv6 header (the backend's family) in front of the
/// untouched inner packet.
#[inline(always)]
fn forward_tunnel(
    ctx: &XdpContext,
    p: &Parsed,
    backend_id: u32,
    backend: &BackendInfo,
    now: u64,
) -> Result<u32, Exit> {
    let global = GLOBAL.get(0).ok_or(drop(stat::DROP_ENCAP))?;
    let inner_proto = if p.key.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let outer_v4 = backend.family == FAMILY_V4;
    let outer_len = if outer_v4 { IPV4_HDR_LEN } else { IPV6_HDR_LEN };
    let src = tunnel_source(backend.family)?;
    let (ifindex, smac, dmac) = next_hop(ctx, backend_id, backend, &src, now)?;

    // Keep the 802.1Q tag (TCI) if there was one; read it before the headers move.
    let tagged = p.l2_len != ETH_HDR_LEN;
    let mut tci = [0u8; 2];
    if tagged {
        let vlan: *const [u8; 2] = ptr_at(ctx, ETH_HDR_LEN).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: checked by `ptr_at`.
        tci = unsafe { *vlan };
    }
    // SAFETY: the helper takes the context pointer the kernel gave this program.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(drop(stat::DROP_ENCAP));
    }
    let outer_type = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 };
    if tagged {
        let l2: *mut [u8; ETH_HDR_LEN + VLAN_HDR_LEN] =
            ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: checked by `ptr_at`.
        let l2 = unsafe { &mut *l2 };
        l2[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        l2[14..16].copy_from_slice(&tci);
        l2[16..18].copy_from_slice(&outer_type.to_be_bytes());
    } else {
        let l2: *mut [u8; ETH_HDR_LEN] = ptr_at(ctx, 0).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: checked by `ptr_at`.
        let l2 = unsafe { &mut *l2 };
        l2[12..14].copy_from_slice(&outer_type.to_be_bytes());
    }
    write_macs(ctx, &smac, &dmac)?;
    if outer_v4 {
        let hdr: *mut [u8; IPV4_HDR_LEN] = ptr_at(ctx, p.l2_len).ok_or(drop(stat::DROP_ENCAP))?;
        let dst = [
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        // SAFETY: checked by `ptr_at`.
        write_ipv4_outer(
            unsafe { &mut *hdr },
            global.tunnel_source_v4,
            dst,
            inner_proto,
            p.ip_len,
            p.dont_fragment,
        );
    } else {
        let hdr: *mut [u8; IPV6_HDR_LEN] = ptr_at(ctx, p.l2_len).ok_or(drop(stat::DROP_ENCAP))?;
        // SAFETY: checked by `ptr_at`.
        write_ipv6_outer(
            unsafe { &mut *hdr },
            &global.tunnel_source_v6,
            &backend.addr,
            inner_proto,
            p.ip_len,
            // Only the IPv6 outer header needs the hash (its flow label).
            flow_hash(&p.key),
        );
    }
    egress(ctx, ifindex, tagged)
}

#[xdp]
pub fn weir_decap(ctx: XdpContext) -> u32 {
    let stats = STATS.get_ptr_mut(0);
    let action = match try_decap(&ctx) {
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

/// Strips the outer IPv4/IPv6 header of an IP-in-IP packet for a local VIP. Anything else,
/// and anything it cannot parse, passes unchanged for the kernel to judge.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<(), Exit> {
    let eth: *const [u8; ETH_HDR_LEN] = ptr_at(ctx, 0).ok_or(pass(stat::PASS_NON_IP))?;
    // SAFETY: checked by `ptr_at`.
    let mut l2 = [0u8; ETH_HDR_LEN + VLAN_HDR_LEN];
    // SAFETY: checked by `ptr_at`.
    l2[..ETH_HDR_LEN].copy_from_slice(unsafe { &*eth });
    let mut ether_type = u16::from_be_bytes([l2[12], l2[13]]);
    let mut l2_len = ETH_HDR_LEN;
    if ether_type == ETH_P_8021Q {
        let vlan: *const [u8; VLAN_HDR_LEN] =
            ptr_at(ctx, ETH_HDR_LEN).ok_or(pass(stat::PASS_NON_IP))?;
        // SAFETY: checked by `ptr_at`.
        l2[ETH_HDR_LEN..].copy_from_slice(unsafe { &*vlan });
        ether_type = u16::from_be_bytes([l2[16], l2[17]]);
        l2_len = ETH_HDR_LEN + VLAN_HDR_LEN;
    }
    let mut local = VipKey::default();
    let (outer_len, inner_proto) = if ether_type == ETH_P_IP {
        let ip: *const [u8; IPV4_HDR_LEN] = ptr_at(ctx, l2_len).ok_or(pass(stat::PASS_NON_IP))?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &*ip };
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ihl < IPV4_HDR_LEN || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return Err(pass(stat::PASS_NOT_VIP));
        }
        local.addr[..4].copy_from_slice(&ip[16..20]);
        local.family = FAMILY_V4;
        (ihl, ip[9])
    } else if ether_type == ETH_P_IPV6 {
        let ip: *const [u8; IPV6_HDR_LEN] = ptr_at(ctx, l2_len).ok_or(pass(stat::PASS_NON_IP))?;
        // SAFETY: checked by `ptr_at`.
        let ip = unsafe { &*ip };
        local.addr.copy_from_slice(&ip[24..40]);
        local.family = FAMILY_V6;
        (IPV6_HDR_LEN, ip[6])
    } else {
        return Err(pass(stat::PASS_NON_IP));
    };
    if inner_proto != PROTO_IPIP && inner_proto != PROTO_IPV6 {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    // SAFETY: presence test only.
    if unsafe { DECAP_LOCAL.get(&local) }.is_none() {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    let inner_off = l2_len + outer_len;
    let mut vip = VipKey::default();
    let inner_type = if inner_proto == PROTO_IPIP {
        let inner: *const [u8; IPV4_HDR_LEN] =
            ptr_at(ctx, inner_off).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: checked by `ptr_at`.
        let inner = unsafe { &*inner };
        vip.addr[..4].copy_from_slice(&inner[16..20]);
        vip.family = FAMILY_V4;
        ETH_P_IP
    } else if inner_proto == PROTO_IPV6 {
        let inner: *const [u8; IPV6_HDR_LEN] =
            ptr_at(ctx, inner_off).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: checked by `ptr_at`.
        let inner = unsafe { &*inner };
        vip.addr.copy_from_slice(&inner[24..40]);
        vip.family = FAMILY_V6;
        ETH_P_IPV6
    } else {
        return Err(pass(stat::PASS_NOT_VIP));
    };
    // SAFETY: presence test only.
    if unsafe { DECAP_VIPS.get(&vip) }.is_none() {
        return Err(pass(stat::PASS_NOT_VIP));
    }
    // The new L2 header goes right in front of the inner packet, then the head moves to it.
    if l2_len == ETH_HDR_LEN {
        l2[12..14].copy_from_slice(&inner_type.to_be_bytes());
        let dst: *mut [u8; ETH_HDR_LEN] = ptr_at(ctx, outer_len).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: checked by `ptr_at`.
        unsafe { (*dst).copy_from_slice(&l2[..ETH_HDR_LEN]) };
    } else {
        l2[16..18].copy_from_slice(&inner_type.to_be_bytes());
        let dst: *mut [u8; ETH_HDR_LEN + VLAN_HDR_LEN] =
            ptr_at(ctx, outer_len).ok_or(pass(stat::PASS_NOT_VIP))?;
        // SAFETY: checked by `ptr_at`.
        unsafe { *dst = l2 };
    }
    // SAFETY: the helper takes the context pointer the kernel gave this program.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(drop(stat::DROP_ENCAP));
    }
    Ok(())
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
pub fn weir_bench(ctx: XdpContext) -> u32 {
    if restore_template(&ctx).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    run_balancer(&ctx)
}

/// Trims what a previous run prepended and copies `BENCH_TEMPLATE` back over the packet.
#[inline(always)]
fn restore_template(ctx: &XdpContext) -> Result<(), ()> {
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

/// Benchmark of one FIB + neighbour lookup towards the first backend, to price the
/// next-hop choice against the floor (`weir_pass`).
#[xdp]
pub fn weir_bench_fib(ctx: XdpContext) -> u32 {
    let Some(backend) = BACKENDS.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let backend = *backend;
    let src = [0u8; 16];
    match fib_next_hop(&ctx, backend.family, &src, &backend.addr, 0) {
        Ok(_) => xdp_action::XDP_DROP,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// `weir_bench_gen`'s settings, written by `cargo xtask bench packets`: the action
/// (`BENCH_GEN_BALANCE`, or an XDP action returned as is), the number of flows, the byte
/// offset of the 16-bit field that tells flows apart (a source port), and its first value.
#[map]
static BENCH_GEN: Array<u32> = Array::with_max_entries(4, 0);

/// `weir_bench_gen`'s flow counter, one per CPU.
#[map]
static BENCH_GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `BENCH_GEN[0]` value: run the balancer.
const BENCH_GEN_BALANCE: u32 = 0;

/// Packet generator of `cargo xtask bench packets`, run by `BPF_PROG_TEST_RUN` with live
/// frames (`BPF_F_TEST_XDP_LIVE_FRAMES`: the kernel really performs the returned action).
/// Frame pages are reused without being restored, so every run restores the template as
/// `weir_bench` does, then gives the packet the next of `BENCH_GEN[1]` flows, then either
/// balances it or returns the configured action (`XDP_DROP`: the generator's ceiling;
/// `XDP_PASS`: the frame enters the kernel's stack as if received on the ingress interface).
#[xdp]
pub fn weir_bench_gen(ctx: XdpContext) -> u32 {
    let (Some(action), Some(flows), Some(offset), Some(base)) = (
        BENCH_GEN.get(0),
        BENCH_GEN.get(1),
        BENCH_GEN.get(2),
        BENCH_GEN.get(3),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    let (action, flows, offset, base) = (*action, *flows, *offset, *base);
    if restore_template(&ctx).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(seq) = BENCH_GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled.
    let n = unsafe { *seq };
    let next = if n + 1 >= flows { 0 } else { n + 1 };
    // SAFETY: as above.
    unsafe { *seq = next };
    let mut field = ((base + n) as u16).to_be_bytes();
    // SAFETY: a 2-byte buffer on the stack; the helper bounds-checks the packet.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, offset, field.as_mut_ptr().cast(), 2) };
    if rc != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if action == BENCH_GEN_BALANCE {
        return run_balancer(&ctx);
    }
    action
}

/// Sink of `cargo xtask bench packets` on the backends: drops everything in XDP, so what
/// arrives is counted (interface counters) at the same small cost for every balancer.
#[xdp]
pub fn weir_bench_sink(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}
