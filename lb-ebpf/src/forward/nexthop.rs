//! The next hop towards a backend: the kernel's FIB and neighbour lookup (`bpf_fib_lookup`)
//! and this CPU's cache of its answer per backend (`NEXT_HOPS`): egress interface, MTU, MACs.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{BackendInfo, FAMILY_V4, GlobalConfig, NEXT_HOP_TTL_NS, NextHop, stat};

use crate::{
    maps::NEXT_HOPS,
    stats::{Exit, drop},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What the balancer needs of a next hop: the egress interface, its MTU towards the
/// destination (IP bytes), and the MAC addresses of the frame.
#[derive(Clone, Copy)]
pub(crate) struct Hop {
    pub(crate) ifindex: u32,
    pub(crate) mtu: u32,
    pub(crate) smac: [u8; 6],
    pub(crate) dmac: [u8; 6],
}

/// Next hop of `dst` from the kernel's FIB and neighbour table. A non-zero `tot_len` would
/// have the kernel compare it with the egress MTU and fail the lookup; the cached path
/// cannot repeat that per packet, so it is not asked for. The MTU comes back anyway: in XDP
/// the kernel always computes it (`check_mtu`) and on success returns it in `mtu_result`,
/// the union with `tot_len` (`bpf_fib_set_fwd_params`, net/core/filter.c).
#[inline(always)]
pub(crate) fn fib_next_hop(
    ctx: &XdpContext,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    tot_len: u16,
) -> Result<Hop, Exit> {
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
    // SAFETY: the kernel wrote the `mtu_result` variant on success; both variants are a
    // `u16`, so either reads as a valid value.
    let mtu_result = unsafe { params.__bindgen_anon_1.mtu_result };
    Ok(Hop {
        ifindex: params.ifindex,
        mtu: match mtu_result {
            // `mtu_result` is from 5.12, below the datapath's floor (5.17, `bpf_loop`); a
            // kernel that left the zero passed in would give no limit: no check.
            0 => u32::MAX,
            mtu => u32::from(mtu),
        },
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// The LB's own address of `family` (the tunnel source), as the FIB lookup's source.
#[inline(always)]
pub(crate) fn tunnel_source(global: &GlobalConfig, family: u8) -> [u8; 16] {
    let mut src = [0u8; 16];
    if family == FAMILY_V4 {
        src[..4].copy_from_slice(&global.tunnel_source_v4);
    } else {
        src = global.tunnel_source_v6;
    }
    src
}

/// The next hop towards a backend: this CPU's cached answer while fresh and still for this
/// backend (its generation), else a FIB lookup whose answer is cached for
/// `NEXT_HOP_TTL_NS`. Failed lookups are not cached.
#[inline(always)]
pub(crate) fn next_hop(
    ctx: &XdpContext,
    backend_id: u32,
    backend: &BackendInfo,
    src: &[u8; 16],
    now: u64,
) -> Result<Hop, Exit> {
    let cached = NEXT_HOPS.get_ptr_mut(backend_id);
    if let Some(hop) = cached {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        let hop = unsafe { &*hop };
        if hop.expires_ns > now && hop.generation == backend.generation {
            return Ok(Hop {
                ifindex: hop.ifindex,
                mtu: hop.mtu,
                smac: hop.smac,
                dmac: hop.dmac,
            });
        }
    }
    let hop = fib_next_hop(ctx, backend.family, src, &backend.addr, 0)?;
    if let Some(cached) = cached {
        // SAFETY: as above; the value is written whole.
        unsafe {
            *cached = NextHop {
                expires_ns: now + NEXT_HOP_TTL_NS,
                ifindex: hop.ifindex,
                mtu: hop.mtu,
                smac: hop.smac,
                dmac: hop.dmac,
                generation: backend.generation,
            };
        }
    }
    Ok(hop)
}
