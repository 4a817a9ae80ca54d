//! Every BPF map of the programs, shared with the agent (which writes the configuration and
//! reads the counters by these names).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key as LpmKey},
};
use lb_common::{
    BackendInfo, BenchTemplate, DEFAULT_CONNTRACK_ENTRIES, FloodState, FlowKey, FlowValue,
    GlobalConfig, MAX_BACKENDS, MAX_FRAG_SERVICES, MAX_RING_SIZE, MAX_SERVICES, MAX_TX_PORTS,
    MIN_HALF_OPEN_ENTRIES, NextHop, TrafficCounters, VipAddrBits, VipInfo, VipKey,
    icmp::IcmpBucket,
    limits::SpillSet,
    nat::{DEFAULT_NAT_CONNECTIONS, MAX_SNAT_ADDRS, NatEntry, SnatSource},
    rate::{RATE_STATE_ENTRIES, RATE_STATS_ENTRIES, RateKey, RateLimits},
    rules::{MAX_SOURCE_RULES, SourceRule, SourceRuleData},
    stat,
};

use crate::{maxconn::LimitScratch, nat::NatScratch, rate::RateScratch};

#[map]
pub(crate) static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every VIP address (port and protocol zero): the exact test, asked only when a packet whose
/// bit is set in `VIP_ADDR_BITS` is to be dropped or passed before its VIP lookup, so that
/// traffic for an address that merely shares a VIP's bit is never judged.
#[map]
pub(crate) static VIP_ADDRS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The filter of VIP destination addresses (see `VipAddrBits`): the first, cheap test that
/// lets almost all other traffic pass before any further parsing. An array lookup is
/// inlined by the kernel into a few instructions, where a hash lookup hashes the key and
/// walks a bucket: the filter keeps the pre-check's benefit for other traffic without a
/// second hash lookup for VIP packets.
#[map]
pub(crate) static VIP_ADDR_BITS: Array<VipAddrBits> = Array::with_max_entries(1, 0);

/// Each service's `VIPS` value, by service id: how the packets of a tracked flow find their
/// service from their backend (`BackendInfo::service_id`), without the VIP lookup. An entry
/// counts only with its own `service_id` and a non-zero `ring_size` (a service with any
/// backend has a ring); the agent writes it before the service's `VIPS` entry and voids it
/// (`service_id` `u32::MAX`) before removing that.
#[map]
pub(crate) static SERVICES: Array<VipInfo> = Array::with_max_entries(MAX_SERVICES, 0);

/// The service IPv4 fragments to a VIP address belong to, by (address, protocol) with port
/// 0 (`inbound::fragment_key`): the service id, for `SERVICES`. The agent writes an entry
/// only where that address and protocol have exactly one service and it schedules by
/// `ip-hash` (the source address alone, which every fragment has); other fragments are
/// dropped.
#[map]
pub(crate) static FRAG_SERVICES: HashMap<VipKey, u32> =
    HashMap::with_max_entries(MAX_FRAG_SERVICES, 0);

/// Every service's source rules (`allow` / `deny`), keyed by service id, family and prefix
/// (`lb_common::rules`). Written by the agent; looked up only for flows a service has no
/// entry for, and only when its `VipInfo::source_rules` says it has rules. (LPM tries are
/// never preallocated: `LpmTrie` sets `BPF_F_NO_PREALLOC` itself.)
#[map]
pub(crate) static SOURCE_RULES: LpmTrie<SourceRuleData, SourceRule> =
    LpmTrie::with_max_entries(MAX_SOURCE_RULES, 0);

/// Packets each source rule decided (admitted or dropped), per CPU.
#[map]
pub(crate) static SOURCE_RULE_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SOURCE_RULES, 0);

/// This CPU's `SOURCE_RULES` lookup key: built in map memory, not on the balancer's stack,
/// which has no 28 bytes to spare.
#[map]
pub(crate) static RULE_SCRATCH: PerCpuArray<LpmKey<SourceRuleData>> =
    PerCpuArray::with_max_entries(1, 0);

/// Each backend's `max_connections` (0: no limit), by backend id. Read only for new flows
/// of services whose `VipInfo::conn_limits` says some backend has one.
#[map]
pub(crate) static CONN_LIMITS: Array<u32> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Each service's spill set (`SpillSet`): the backends a new flow may go to when the
/// scheduler's pick is full, its backups included even while the primaries serve (the
/// ring then holds none of them). One slot per service, written whole by the agent.
#[map]
pub(crate) static SPILL_SETS: Array<SpillSet> = Array::with_max_entries(MAX_SERVICES, 0);

/// New flows each backend turned away because it was full (sent elsewhere or refused),
/// per CPU, by backend id.
#[map]
pub(crate) static CONN_LIMIT_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// This CPU's state of a connection-limit decision (`maxconn::LimitScratch`): the lookup
/// keys of its `bpf_loop` probes, which may use no stack. Not pinned: nothing survives a
/// packet in it.
#[map]
pub(crate) static LIMIT_SCRATCH: PerCpuArray<LimitScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub(crate) static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// `MAX_SERVICES` Maglev rings of `MAX_RING_SIZE` slots back to back, written by the agent.
#[map]
pub(crate) static RING: Array<u32> = Array::with_max_entries(MAX_SERVICES * MAX_RING_SIZE, 0);

/// The connection table: established flows. A plain hash, not an LRU: a flood of new
/// tuples cannot evict a live connection; when it is full, new flows are refused an entry
/// (and scheduled by the consistent hash, see `FLOOD_STATE`). The agent deletes expired
/// entries on its walk. Resized from `conntrack_entries` at load time.
#[map]
pub(crate) static CONNTRACK: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Flows not established yet: a TCP SYN's pick until the handshake's ACK, a first UDP
/// datagram's until the second. An LRU of its own, so that spoofed SYNs churn only it.
/// Resized from `half_open_entries` at load time.
#[map]
pub(crate) static HALF_OPEN: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(MIN_HALF_OPEN_ENTRIES, 0);

/// This CPU's new-flow rate and flood mode (`lb_common::FloodState`).
#[map]
pub(crate) static FLOOD_STATE: PerCpuArray<FloodState> = PerCpuArray::with_max_entries(1, 0);

/// Global counters, one array of `stat::COUNT` per CPU: one lookup per packet.
#[map]
pub(crate) static STATS: PerCpuArray<[u64; stat::COUNT as usize]> =
    PerCpuArray::with_max_entries(1, 0);

#[map]
pub(crate) static VIP_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub(crate) static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Interfaces other than the ingress one that packets may be redirected to, keyed by ifindex.
#[map]
pub(crate) static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map]
pub(crate) static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Active connections per backend (new flows minus ended ones), for least-conn and for the
/// operator. Shared across CPUs and updated atomically; the agent reconciles it with the
/// table (entries the agent expires never report their end).
#[map]
pub(crate) static BACKEND_CONNS: Array<i64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Round-robin position per service, per CPU.
#[map]
pub(crate) static RR_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub(crate) static GLOBAL: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static BENCH_TEMPLATE: Array<BenchTemplate> = Array::with_max_entries(1, 0);

/// Decap program: the VIPs of this backend (port and protocol zero).
#[map]
pub(crate) static DECAP_VIPS: HashMap<VipKey, u32> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Decap program: this host's own addresses. Only a packet whose outer destination is one
/// of them is decapsulated: a tunnel packet merely passing by (a bridge port, a router) is
/// not ours to open.
#[map]
pub(crate) static DECAP_LOCAL: HashMap<VipKey, u32> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// `weir_bench_gen`'s settings, written by `cargo xtask bench packets`: the action
/// (`BENCH_GEN_BALANCE`, or an XDP action returned as is), the number of flows, the byte
/// offset of the 16-bit field that tells flows apart (a source port), and its first value;
/// for the action `XDP_REDIRECT` (the floor of a balancer with backends behind other
/// interfaces), the number of interfaces and their indexes (`BENCH_GEN[4]`, `[5..]`).
#[map]
pub(crate) static BENCH_GEN: Array<u32> = Array::with_max_entries(4 + 1 + BENCH_GEN_PORTS, 0);

/// The most interfaces `weir_bench_gen`'s redirect floor spreads its frames over.
pub(crate) const BENCH_GEN_PORTS: u32 = 4;

/// `weir_bench_gen`'s flow counter, one per CPU.
#[map]
pub(crate) static BENCH_GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// MSS clamp program: the MSS of SYN-ACKs from a VIP, by family (`MSS_SLOT_V4`,
/// `MSS_SLOT_V6`); 0 turns that family's clamp off. Written by `weir decap`.
#[map]
pub(crate) static DECAP_MSS: Array<u32> = Array::with_max_entries(2, 0);

/// The NAT connection table: both entries of every `nat` pair, keyed by the tuple as the
/// packet carries it (docs/design/nat.md). A plain hash, not LRU: an LRU would evict one half
/// of a pair and break its connection; a full table refuses new pairs instead. Not
/// preallocated: DSR-only users pay nothing for it.
#[map]
pub(crate) static NAT_CT: HashMap<FlowKey, NatEntry> =
    HashMap::with_max_entries(2 * DEFAULT_NAT_CONNECTIONS, BPF_F_NO_PREALLOC);

/// The SNAT addresses of `fullnat` services and their port range: service `s`'s address `i`
/// is `SNAT_POOL[s * MAX_SNAT_ADDRS + i]`, `i < VipInfo::snat_count`. Written by the agent
/// before the service's `VIPS` entry names the count.
#[map]
pub(crate) static SNAT_POOL: Array<SnatSource> =
    Array::with_max_entries(MAX_SERVICES * MAX_SNAT_ADDRS, 0);

/// Per-CPU room for a pair under construction and the reply path's FIB parameters (the
/// balancer's stack is full). Not pinned: nothing survives a packet in it.
#[map]
pub(crate) static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's budget of ICMP errors (`IcmpBucket`). Not pinned: a reloaded datapath starting
/// with a full burst is harmless, and nothing else reads it.
#[map]
pub(crate) static ICMP_BUCKETS: PerCpuArray<IcmpBucket> = PerCpuArray::with_max_entries(1, 0);

/// Each service's rate limits, by service id; read only when its `VipInfo::rate_limits` has
/// a flag. Written by the agent before the flags that make the datapath read them.
#[map]
pub(crate) static RATE_LIMITS: Array<RateLimits> = Array::with_max_entries(MAX_SERVICES, 0);

/// The per-source buckets (GCRA theoretical arrival times, ns) of every service's limit of
/// new flows per source prefix. Shared by every CPU (one source's flows may arrive on any
/// queue), updated by compare-and-exchange. An LRU: a flood of distinct sources evicts the
/// least recently used buckets, which start full again when their source returns.
#[map]
pub(crate) static RATE_STATE: LruHashMap<RateKey, u64> =
    LruHashMap::with_max_entries(RATE_STATE_ENTRIES, 0);

/// Each service's bucket of its service-wide limit (a TAT in ns), by service id: an array,
/// so that no flood of sources can evict it.
#[map]
pub(crate) static RATE_VIP_STATE: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);

/// New flows each limit dropped, per CPU, at `service_id * RATE_SLOTS + LIMIT_*`.
#[map]
pub(crate) static RATE_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(RATE_STATS_ENTRIES, 0);

/// This CPU's `RATE_STATE` key and the value a new bucket is inserted with, in map memory:
/// the balancer's stack has no 32 bytes to spare.
#[map]
pub(crate) static RATE_SCRATCH: PerCpuArray<RateScratch> = PerCpuArray::with_max_entries(1, 0);
