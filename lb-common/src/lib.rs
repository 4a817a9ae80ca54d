//! Types shared by Weir's XDP datapath (`lb-ebpf`) and its agent (`lb-userspace`), and the
//! pure logic both sides must agree on: the flow hash, the IPv4 header checksum, the
//! builders of the outer tunnel headers and of the ICMP "too big" answers.
//!
//! Everything here is `#![no_std]` so the BPF target can use it. Map value types follow one
//! set of rules: `#[repr(C)]`, `Copy`, explicit padding, no `bool`/`enum`/`Option` (the
//! kernel sees raw bytes), a size assertion each, and the byte order in the field name where
//! it matters (`port_be` holds the port exactly as it appears on the wire).
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod csum;
pub mod hash;
pub mod headers;
pub mod icmp;
pub mod inbound;
pub mod limits;
#[cfg(feature = "user")]
pub mod maglev;
pub mod nat;
pub mod rate;
#[cfg(feature = "user")]
pub mod rr;
pub mod rules;

/// Names of the maps in the eBPF object. They are the names of the `static`s in `lb-ebpf`,
/// kept here so the agent and the tests cannot drift from the datapath.
pub mod map_name {
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_ADDR_BITS: &str = "VIP_ADDR_BITS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RING: &str = "RING";
    /// The established flows (a plain hash: never evicts; the agent expires its entries).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Flows not established yet (a TCP SYN seen, or one UDP datagram): an LRU of its own,
    /// so that a flood of new tuples churns only it.
    pub const HALF_OPEN: &str = "HALF_OPEN";
    /// Per CPU: the new-flow rate of the current second and the end of flood mode.
    pub const FLOOD_STATE: &str = "FLOOD_STATE";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const GLOBAL: &str = "GLOBAL";
    pub const BENCH_TEMPLATE: &str = "BENCH_TEMPLATE";
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    pub const DECAP_LOCAL: &str = "DECAP_LOCAL";
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    pub const RR_COUNTERS: &str = "RR_COUNTERS";
    pub const DECAP_MSS: &str = "DECAP_MSS";
    pub const FRAG_SERVICES: &str = "FRAG_SERVICES";
    pub const ICMP_BUCKETS: &str = "ICMP_BUCKETS";
    /// The NAT connection table: both entries of every `nat` pair (`FlowKey` keys,
    /// `nat::NatEntry` values).
    pub const NAT_CT: &str = "NAT_CT";
    /// The SNAT addresses of every `fullnat` service (`nat::SnatSource` values, indexed
    /// `service_id * nat::MAX_SNAT_ADDRS + i`).
    pub const SNAT_POOL: &str = "SNAT_POOL";
    /// Every service's `allow` / `deny` source prefixes (an LPM trie, `rules::SourceRuleData`
    /// keys, `rules::SourceRule` values).
    pub const SOURCE_RULES: &str = "SOURCE_RULES";
    /// Per-CPU packets decided by each source rule, indexed by `rules::SourceRule::index`.
    pub const SOURCE_RULE_STATS: &str = "SOURCE_RULE_STATS";
    /// Each service's rate limits (`rate::RateLimits`, by service id).
    pub const RATE_LIMITS: &str = "RATE_LIMITS";
    /// The per-source buckets of the rate limits (an LRU: `rate::RateKey` keys, TATs in ns).
    pub const RATE_STATE: &str = "RATE_STATE";
    /// Each service's bucket of its service-wide limit (a TAT in ns, by service id).
    pub const RATE_VIP_STATE: &str = "RATE_VIP_STATE";
    /// Per-CPU new flows dropped by each limit, indexed `service_id * rate::RATE_SLOTS +
    /// rate::LIMIT_*`.
    pub const RATE_STATS: &str = "RATE_STATS";
    /// Each backend's `max_connections` (`u32`, 0 = none), by backend id.
    pub const CONN_LIMITS: &str = "CONN_LIMITS";
    /// Each service's `limits::SpillSet`, by service id.
    pub const SPILL_SETS: &str = "SPILL_SETS";
    /// Per-CPU new flows each backend turned away because it was full, by backend id.
    pub const CONN_LIMIT_STATS: &str = "CONN_LIMIT_STATS";
}

/// Names of the programs in the eBPF object.
pub mod prog_name {
    /// The balancer, attached to the LB's NIC.
    pub const BALANCER: &str = "weir_balancer";
    /// The decapsulator, attached to a backend's NIC.
    pub const DECAP: &str = "weir_decap";
    /// `XDP_PASS` and nothing else: the benchmark floor, and the program veth peers need
    /// so that frames sent with `XDP_TX` are picked up.
    pub const PASS: &str = "weir_pass";
    /// Benchmark entry: restores the packet from `BENCH_TEMPLATE`, then balances it.
    pub const BENCH: &str = "weir_bench";
    /// Benchmark of one `bpf_fib_lookup` call, to price the next-hop choice.
    pub const BENCH_FIB: &str = "weir_bench_fib";
    /// Benchmark of one ICMP "too big" answer: as `BENCH`, for packets the balancer answers.
    pub const BENCH_TOO_BIG: &str = "weir_bench_too_big";
    /// The MSS clamp, a tc egress program `weir decap` attaches next to the decapsulator.
    pub const MSS_CLAMP: &str = "weir_mss_clamp";
}

/// Most services (one VIP each) the datapath holds.
pub const MAX_SERVICES: u32 = 64;
/// Most backends across all services.
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev ring a service may have (a prime). `RING` holds `MAX_SERVICES` rings of
/// this size back to back: 64 x 65537 x 4 bytes = 16 MiB, preallocated.
pub const MAX_RING_SIZE: u32 = 65537;
/// Default ring size: the smallest prime above 65536, as in the Maglev paper.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default size of the connection table when the config does not say.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 20;
/// Smallest half-open table: the default is a quarter of the connection table, at least this.
pub const MIN_HALF_OPEN_ENTRIES: u32 = 1024;
/// The half-open table's default size for a connection table of `conntrack_entries`.
#[must_use]
pub const fn default_half_open_entries(conntrack_entries: u32) -> u32 {
    let quarter = conntrack_entries / 4;
    if quarter > MIN_HALF_OPEN_ENTRIES {
        quarter
    } else {
        MIN_HALF_OPEN_ENTRIES
    }
}
/// A half-open entry older than this (since its last packet) is not honoured: the handshake's
/// ACK, or a UDP flow's second datagram, comes well within it.
pub const HALF_OPEN_TIMEOUT_NS: u64 = 10_000_000_000;
/// How long a CPU stays in flood mode (new flows scheduled by the consistent hash) after the
/// last sign of a flood: its new-flow rate over the threshold, or the connection table full.
pub const FLOOD_HOLD_NS: u64 = 1_000_000_000;
/// The agent deletes an established entry that saw no packet after the one that made it
/// (`FLOW_CONFIRMED` unset) once it is idle this long: the handshake's ACK of a spoofed
/// SYN/ACK pair, never followed by anything.
pub const UNCONFIRMED_TIMEOUT_NS: u64 = 10_000_000_000;
/// The agent deletes a closed entry (a FIN or RST seen) idle this long: the rest of the
/// close (retransmitted FINs, the last ACK) is over by then.
pub const CLOSED_TIMEOUT_NS: u64 = 10_000_000_000;
/// Entries of `FRAG_SERVICES`: one per (VIP address, protocol) at most, and each is at least
/// one service.
pub const MAX_FRAG_SERVICES: u32 = MAX_SERVICES;
/// Entries of the devmap used for `XDP_REDIRECT` to other interfaces.
pub const MAX_TX_PORTS: u32 = 64;
/// Ring slot value meaning "no backend" (every backend of the service is down or removed).
pub const BACKEND_NONE: u32 = u32::MAX;
/// TTL / hop limit of the outer header the balancer adds (RFC 2003 leaves it to the
/// encapsulator; 64 is the Linux default).
pub const OUTER_TTL: u8 = 64;
/// How long the datapath reuses a next hop it got from `bpf_fib_lookup` before asking the
/// kernel again (see `NextHop`).
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// Bytes of packet the benchmark template holds.
pub const BENCH_TEMPLATE_LEN: usize = 128;

/// Address family values used in map keys (the kernel's `AF_INET` / `AF_INET6`).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMP (RFC 792) and ICMPv6 (RFC 4443).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv4-in-IP (RFC 2003).
pub const PROTO_IPIP: u8 = 4;
/// IPv6-in-IP (RFC 2473 / RFC 4213).
pub const PROTO_IPV6: u8 = 41;

/// `VipInfo::forwarding` values.
pub const FORWARD_TUNNEL: u8 = 0;
pub const FORWARD_DIRECT: u8 = 1;
/// Destination NAT: VIP:port becomes backend:port, replies cross the balancer back.
pub const FORWARD_NAT: u8 = 2;
/// Destination and source NAT: VIP:port becomes backend:port and the client's address:port
/// one of the service's SNAT addresses and a port of `[agent] snat_ports`; the replies come
/// back to the balancer by themselves (they are addressed to it).
pub const FORWARD_FULLNAT: u8 = 3;

/// Whether a `FORWARD_*` value is one of the NAT modes (the pairs of `NAT_CT`), not DSR.
#[inline(always)]
#[must_use]
pub const fn forwarding_is_nat(forwarding: u8) -> bool {
    forwarding == FORWARD_NAT || forwarding == FORWARD_FULLNAT
}

/// `VipInfo::scheduler` values. For maglev and ip-hash the ring is a Maglev table indexed
/// by a hash; for round-robin it holds the smooth weighted round-robin sequence, walked by a
/// per-CPU counter of each service (each CPU walks the whole sequence, so the shares are
/// exact per CPU); for least-conn it is the Maglev table, from which two candidates are
/// drawn (power of two choices) and the one with fewer active connections per unit of
/// weight wins.
pub const SCHED_MAGLEV: u8 = 0;
pub const SCHED_IP_HASH: u8 = 1;
pub const SCHED_ROUND_ROBIN: u8 = 2;
pub const SCHED_LEAST_CONN: u8 = 3;

/// `FlowValue::flags`: the flow is counted in `BACKEND_CONNS` of its backend.
pub const FLOW_COUNTED: u64 = 1;
/// `FlowValue::flags`: a FIN or RST was seen; the flow no longer counts as active.
pub const FLOW_CLOSED: u64 = 2;
/// `FlowValue::flags`: the flow found its service by the port-0 fallback (a service of the
/// whole address). Its packets keep asking `VIPS`, exact port first, as new flows do: a
/// service for its exact port, configured since, takes it over.
pub const FLOW_VIA_PORT0: u64 = 4;
/// `FlowValue::flags`: the flow sent a packet after the one that made its entry (the
/// handshake's ACK, or a UDP flow's second datagram). An entry without it is expired by the
/// agent after `UNCONFIRMED_TIMEOUT_NS` idle, not the service's timeout.
pub const FLOW_CONFIRMED: u64 = 8;

/// Value of the per-CPU `FLOOD_STATE`: this CPU's new flows in the current one-second window,
/// and until when it schedules new flows by the consistent hash (flood mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodState {
    pub window_start_ns: u64,
    pub new_flows: u64,
    pub flood_until_ns: u64,
}
const _: () = assert!(size_of::<FloodState>() == 24);

/// `BackendInfo::state` values.
pub const BACKEND_DOWN: u8 = 0;
pub const BACKEND_UP: u8 = 1;

/// Slots of `DECAP_MSS`: the MSS the clamp lowers larger MSS options of IPv4 and of IPv6
/// SYN-ACKs to; 0 leaves that family's SYN-ACKs alone.
pub const MSS_SLOT_V4: u32 = 0;
pub const MSS_SLOT_V6: u32 = 1;

/// Index of each counter in the per-CPU `STATS` array. One `u64` per index per CPU.
pub mod stat {
    pub const XDP_ABORTED: u32 = 0;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
    /// A packet of a tracked flow whose entry was honoured.
    pub const CT_HIT: u32 = 5;
    /// A packet that asked the scheduler (no entry, a stale entry, or a SYN).
    pub const CT_MISS: u32 = 6;
    /// Passes by reason.
    pub const PASS_NON_IP: u32 = 7;
    pub const PASS_NOT_VIP: u32 = 8;
    pub const PASS_IPV6_EXT: u32 = 9;
    /// Drops by reason.
    pub const DROP_TRUNC_ETH: u32 = 10;
    pub const DROP_TRUNC_IPV4: u32 = 11;
    /// A bad version, IHL or length field.
    pub const DROP_MALFORMED_IP: u32 = 12;
    pub const DROP_TRUNC_IPV6: u32 = 13;
    pub const DROP_TRUNC_L4: u32 = 14;
    pub const DROP_FRAGMENT: u32 = 15;
    pub const DROP_TTL: u32 = 16;
    pub const DROP_NO_BACKEND: u32 = 17;
    pub const DROP_FIB: u32 = 18;
    pub const DROP_ENCAP: u32 = 19;
    pub const DROP_REDIRECT: u32 = 20;
    pub const DROP_FAMILY: u32 = 21;
    /// Decap program: packets whose outer header it removed.
    pub const DECAP_OK: u32 = 22;
    /// A non-SYN TCP packet of a flow the table does not know (evicted, idle-expired, or the
    /// LB restarted): sent by the service's hash.
    pub const UNTRACKED_MIDFLOW: u32 = 23;
    /// A tracked flow forgotten because it was idle longer than its service's timeout.
    pub const CT_IDLE_EXPIRED: u32 = 24;
    /// MSS clamp (tc egress, next to the decapsulator): SYN-ACKs from a VIP whose MSS option
    /// it lowered.
    pub const MSS_CLAMPED: u32 = 25;
    /// ICMP "fragmentation needed" / ICMPv6 Packet Too Big the balancer sent to a client
    /// whose packet would not fit the egress MTU once encapsulated.
    pub const ICMP_TOO_BIG_SENT: u32 = 26;
    /// A packet too big for the tunnel, dropped without an ICMP error because this CPU's
    /// ICMP error budget was spent (`ICMP_ERRORS_PER_SEC`).
    pub const DROP_TOO_BIG_RATE_LIMITED: u32 = 27;
    /// An IPv4 packet without DF too big for the tunnel: dropped (see the README).
    pub const DROP_TOO_BIG_FRAGMENTABLE: u32 = 28;
    /// ICMP errors quoting a VIP flow, forwarded to the backend that owns the flow.
    pub const ICMP_ERROR_FORWARDED: u32 = 29;
    /// ICMP / ICMPv6 echo requests to a VIP address answered by the balancer.
    pub const ICMP_ECHO_REPLIED: u32 = 30;
    /// ICMP messages to a VIP address too short or malformed to act on safely.
    pub const DROP_ICMP_MALFORMED: u32 = 31;
    /// IPv4 fragments of an `ip-hash` service forwarded like the rest of their flow.
    pub const FRAGMENT_FORWARDED: u32 = 32;
    /// NAT: packets client → backend translated and forwarded.
    pub const NAT_FORWARD: u32 = 33;
    /// NAT: packets backend → client translated and forwarded.
    pub const NAT_REPLY: u32 = 34;
    /// NAT: connections (pairs of table entries) created.
    pub const NAT_PAIRS_CREATED: u32 = 35;
    /// NAT: a new connection refused because `NAT_CT` is full (live pairs are never evicted).
    pub const DROP_NAT_TABLE_FULL: u32 = 36;
    /// NAT: a packet that cannot be translated safely (IPv6 UDP without a checksum).
    pub const DROP_NAT_UNTRANSLATABLE: u32 = 37;
    /// NAT: a reply of a pair that is expired or whose backend is no longer honoured:
    /// passing it would send it untranslated.
    pub const DROP_NAT_STALE: u32 = 38;
    /// NAT: the same client address and port already talk to that backend address and port
    /// through another service (the reply tuples would be one).
    pub const DROP_NAT_COLLISION: u32 = 39;
    /// NAT: a packet from a `nat` backend's address with no table entry: not ours, passed.
    pub const PASS_NAT_NO_ENTRY: u32 = 40;
    /// NAT: expired pairs deleted by the datapath itself, in line.
    pub const NAT_RECLAIMED_INLINE: u32 = 41;
    /// NAT: translated packets handed to the kernel to forward because the next hop's
    /// neighbour is not resolved yet (counted as `nat_reply` / `nat_forward` too).
    pub const NAT_TO_KERNEL: u32 = 42;
    /// NAT: ICMP / ICMPv6 errors quoting a NAT connection, translated (outer and quoted
    /// headers, every checksum) and forwarded: from the client side to the backend, from
    /// the backend side to the client.
    pub const NAT_ICMP_TRANSLATED: u32 = 43;
    /// NAT: ICMP errors quoting a NAT connection that cannot be translated safely (the
    /// outer addresses do not match the quote, or the quote belongs to the other direction):
    /// dropped untouched, never forwarded half-rewritten.
    pub const DROP_NAT_ICMP_UNTRANSLATABLE: u32 = 44;
    /// fullnat: a new connection refused because every SNAT port probed for its backend was
    /// taken by a live pair (the SYN / first datagram is dropped; the client retries).
    pub const DROP_SNAT_EXHAUSTED: u32 = 45;
    /// fullnat: a TCP packet other than a SYN (or a RST) with no pair: its SNAT port is
    /// unknowable, so it cannot be translated for the backend.
    pub const DROP_NAT_UNTRACKED_MIDFLOW: u32 = 46;
    /// A flow the service has no entry for, from a source its most specific rule denies.
    pub const DROP_SOURCE_DENIED: u32 = 47;
    /// A flow the service has no entry for, from a source none of its `allow` rules covers.
    pub const DROP_SOURCE_NOT_ALLOWED: u32 = 48;
    /// A flow entered the half-open table (a SYN, a first UDP datagram, or a mid-flow TCP
    /// packet of a flow no table knows).
    pub const HALF_OPEN_CREATED: u32 = 49;
    /// A half-open flow's next packet moved it to the connection table (established).
    pub const FLOW_ESTABLISHED: u32 = 50;
    /// A half-open flow that could not move to the connection table because it is full (live
    /// entries are never evicted): it keeps its backend through the half-open table and the
    /// consistent hash.
    pub const CONNTRACK_FULL: u32 = 51;
    /// New flows scheduled by the service's consistent hash instead of its scheduler because
    /// this CPU is in flood mode.
    pub const FLOOD_HASHED: u32 = 52;
    /// A new flow over its service's limit of new flows per source (or source prefix).
    pub const DROP_RATE_SOURCE: u32 = 53;
    /// A new flow over its service's limit of new flows, all sources together.
    pub const DROP_RATE_VIP: u32 = 54;
    /// A new flow refused because its backend and every other backend it could go to
    /// (the service's serving backends and its backups) were at their `max_connections`.
    pub const DROP_BACKENDS_FULL: u32 = 55;
    /// A new flow sent to another backend than the scheduler's pick, which was at its
    /// `max_connections`.
    pub const BACKEND_FULL_SPILLED: u32 = 56;
    /// Number of counters; the size of `STATS`.
    pub const COUNT: u32 = 57;

    /// Human and metric names, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "xdp_aborted",
        "xdp_drop",
        "xdp_pass",
        "xdp_tx",
        "xdp_redirect",
        "conntrack_hit",
        "conntrack_miss",
        "pass_non_ip",
        "pass_not_vip",
        "pass_ipv6_ext_header",
        "drop_truncated_ethernet",
        "drop_truncated_ipv4",
        "drop_malformed_ip",
        "drop_truncated_ipv6",
        "drop_truncated_l4",
        "drop_fragment",
        "drop_ttl_expired",
        "drop_no_backend",
        "drop_fib_lookup",
        "drop_encap",
        "drop_redirect",
        "drop_family_mismatch",
        "decap_ok",
        "untracked_midflow",
        "conntrack_idle_expired",
        "mss_clamped",
        "icmp_too_big_sent",
        "drop_too_big_rate_limited",
        "drop_too_big_fragmentable",
        "icmp_error_forwarded",
        "icmp_echo_replied",
        "drop_icmp_malformed",
        "fragment_forwarded",
        "nat_forward",
        "nat_reply",
        "nat_pairs_created",
        "drop_nat_table_full",
        "drop_nat_untranslatable",
        "drop_nat_stale",
        "drop_nat_collision",
        "pass_nat_no_entry",
        "nat_reclaimed_inline",
        "nat_to_kernel",
        "nat_icmp_translated",
        "drop_nat_icmp_untranslatable",
        "drop_snat_exhausted",
        "drop_nat_untracked_midflow",
        "drop_source_denied",
        "drop_source_not_allowed",
        "half_open_created",
        "flow_established",
        "conntrack_full",
        "flood_hashed",
        "drop_rate_source",
        "drop_rate_vip",
        "drop_backends_full",
        "backend_full_spilled",
    ];
}

/// Key of `VIPS` (and, with `port_be = 0, proto = 0`, of `VIP_ADDRS` and `DECAP_VIPS`).
/// An IPv4 address occupies `addr[..4]`, the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Destination port as on the wire; 0 matches every port.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// Bits of the `VIP_ADDR_BITS` filter, as a power of two: 65,536 bits (8 KiB). At most
/// `MAX_SERVICES` addresses set bits, so a destination that is no VIP address finds its bit
/// set with a probability of at most 64 / 65,536 (then it pays for the exact test too).
pub const VIP_ADDR_BITS_LOG2: u32 = 16;
/// 64-bit words of the `VIP_ADDR_BITS` filter.
pub const VIP_ADDR_WORDS: usize = 1 << (VIP_ADDR_BITS_LOG2 - 6);

/// Value of the single-entry `VIP_ADDR_BITS` array: bit `hash::addr_slot(addr)` is set while
/// at least one VIP address has that slot. The balancer's first test of a packet: a clear
/// bit means no VIP has the destination address, and the packet passes before any further
/// parsing. A set bit only means "maybe": the VIP lookup decides. The agent writes the
/// value whole; a reader racing a write can see a word half old, half new, but a bit that
/// the write does not change reads the same in either half, so only a bit that is being
/// set or cleared can read either way.
///
/// The NAT modes add two more filters in the same value (still one array lookup):
/// `nat_words`, the destinations whose packets may belong to a NAT pair (VIPs of `nat`
/// services), and `src_words`, the sources whose packets may be replies of one (the
/// backend addresses of `nat` services). `flags` says whether either is in use, so that
/// without a NAT service a packet pays one load and a branch for them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipAddrBits {
    /// `ADDR_FILTER_NAT_DST`, `ADDR_FILTER_NAT_SRC`.
    pub flags: u32,
    /// `[agent] snat_ports` while some service is `fullnat`, else 0/0.
    pub snat_port_lo_host: u16,
    pub snat_port_hi_host: u16,
    /// Destinations: every VIP address.
    pub words: [u64; VIP_ADDR_WORDS],
    /// Destinations of NAT services (a subset of `words`).
    pub nat_words: [u64; VIP_ADDR_WORDS],
    /// Sources: the backend addresses of `nat` services.
    pub src_words: [u64; VIP_ADDR_WORDS],
}
const _: () = assert!(size_of::<VipAddrBits>() == 8 + 3 * 8 * VIP_ADDR_WORDS);

/// `VipAddrBits::flags`: some bit of `nat_words` is set.
pub const ADDR_FILTER_NAT_DST: u32 = 1;
/// `VipAddrBits::flags`: some bit of `src_words` is set.
pub const ADDR_FILTER_NAT_SRC: u32 = 2;

impl VipAddrBits {
    /// No address.
    pub const EMPTY: Self = Self {
        flags: 0,
        snat_port_lo_host: 0,
        snat_port_hi_host: 0,
        words: [0; VIP_ADDR_WORDS],
        nat_words: [0; VIP_ADDR_WORDS],
        src_words: [0; VIP_ADDR_WORDS],
    };

    /// The word index and bit mask of an address's slot.
    #[inline(always)]
    #[must_use]
    pub const fn position(addr: &[u8; 16]) -> (usize, u64) {
        let slot = hash::addr_slot(addr);
        ((slot >> 6) as usize % VIP_ADDR_WORDS, 1 << (slot & 63))
    }

    /// Whether an address's bit is set.
    #[must_use]
    pub const fn maybe_contains(&self, addr: &[u8; 16]) -> bool {
        let (word, mask) = Self::position(addr);
        self.words[word] & mask != 0
    }

    /// Sets an address's bit.
    pub const fn insert(&mut self, addr: &[u8; 16]) {
        let (word, mask) = Self::position(addr);
        self.words[word] |= mask;
    }

    /// Sets the bit of a NAT service's VIP address (in `words` too).
    pub const fn insert_nat_dst(&mut self, addr: &[u8; 16]) {
        let (word, mask) = Self::position(addr);
        self.words[word] |= mask;
        self.nat_words[word] |= mask;
        self.flags |= ADDR_FILTER_NAT_DST;
    }

    /// Sets the bit of a `nat` backend's address, whose packets may be replies.
    pub const fn insert_nat_src(&mut self, addr: &[u8; 16]) {
        let (word, mask) = Self::position(addr);
        self.src_words[word] |= mask;
        self.flags |= ADDR_FILTER_NAT_SRC;
    }
}

impl Default for VipAddrBits {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Value of `VIPS`, and of `SERVICES` (indexed by `service_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index of the service: its ring is `RING[service_id * MAX_RING_SIZE ..][..ring_size]`,
    /// its counters `VIP_STATS[service_id]`.
    pub service_id: u32,
    pub ring_size: u32,
    /// `FORWARD_TUNNEL`, `FORWARD_DIRECT`, `FORWARD_NAT` or `FORWARD_FULLNAT`.
    pub forwarding: u8,
    /// `SCHED_*`.
    pub scheduler: u8,
    /// `fullnat`: the number of SNAT addresses (`SNAT_POOL[service_id * MAX_SNAT_ADDRS ..]`),
    /// 1..=`MAX_SNAT_ADDRS`; 0 otherwise.
    pub snat_count: u8,
    /// `rules::SOURCE_RULES_ANY` | `rules::SOURCE_RULES_ALLOWLIST`, or 0: no source rules.
    pub source_rules: u8,
    /// A tracked TCP flow idle this long (seconds) is forgotten.
    pub tcp_idle_timeout_s: u32,
    /// A tracked UDP flow idle this long (seconds) is forgotten.
    pub udp_idle_timeout_s: u32,
    /// `rate::RATE_SOURCE_FLOWS` | `rate::RATE_VIP_FLOWS`, or 0: no rate limits.
    pub rate_limits: u8,
    /// `limits::CONN_LIMITS_ANY`, or 0: no backend of the service has a `max_connections`.
    pub conn_limits: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<VipInfo>() == 24);

/// Value of `BACKENDS`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    pub addr: [u8; 16],
    /// Service the backend belongs to; a tracked flow is honoured only if it matches.
    pub service_id: u32,
    /// Bumped by the agent each time the id is given to a new backend, so a tracked flow
    /// that pointed at the id's previous owner is not honoured.
    pub generation: u32,
    pub family: u8,
    /// `BACKEND_UP` or `BACKEND_DOWN`.
    pub state: u8,
    /// The port the backend listens on, as on the wire (`nat`); 0: the packet's own
    /// destination port (the DSR modes, and `nat` without `backend.port`).
    pub port_be: u16,
    /// Weight for least-conn comparisons (connections per unit of weight).
    pub weight: u32,
}
const _: () = assert!(size_of::<BackendInfo>() == 32);

/// Key of the connection table `CONNTRACK`: the 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend_id: u32,
    /// `BackendInfo::generation` when the entry was made.
    pub generation: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet, refreshed at most every `LAST_SEEN_GRANULARITY_NS`
    /// so that busy flows do not write their entry on every packet.
    pub last_seen_ns: u64,
    /// `FLOW_COUNTED`, `FLOW_CLOSED`. 64 bits wide: the BPF backend only has 64-bit
    /// atomic or-with-fetch at the default CPU level.
    pub flags: u64,
}
const _: () = assert!(size_of::<FlowValue>() == 24);

/// How stale `FlowValue::last_seen_ns` may get before a packet refreshes it.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Value of the single-entry `GLOBAL` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalConfig {
    /// The LB's IPv4 address: the source of its next-hop lookups, and of IPv4 outer headers
    /// unless `outer_spread_v4` spreads them.
    pub tunnel_source_v4: [u8; 4],
    /// Source address of IPv6 outer headers (whose flow label varies per flow).
    pub tunnel_source_v6: [u8; 16],
    /// With `outer_spread_v4` non-zero, the IPv4 outer source of a flow is `outer_base_v4`
    /// with the bits set in `outer_spread_v4` taken from the flow hash, so that a backend's
    /// NIC spreads the tunnel over its receive queues (RSS hashes the outer header, which is
    /// otherwise one source/destination pair per backend). Zero: every flow has
    /// `tunnel_source_v4`. Both in network byte order.
    pub outer_base_v4: [u8; 4],
    pub outer_spread_v4: [u8; 4],
    /// `GLOBAL_*` bits.
    pub flags: u32,
    /// New flows per second on one CPU above which that CPU enters flood mode (new flows
    /// scheduled by the consistent hash, see `FLOOD_HOLD_NS`); 0: only a full connection
    /// table does.
    pub flood_threshold: u32,
}
const _: () = assert!(size_of::<GlobalConfig>() == 36);

/// `GlobalConfig::flags`: the balancer answers ICMP / ICMPv6 echo requests to VIP addresses.
pub const GLOBAL_ANSWER_PING: u32 = 1;

/// ICMP errors (Packet Too Big / fragmentation needed) each CPU may send per second, and its
/// burst: the defaults of Linux's `icmp_msgs_per_sec` / `icmp_msgs_burst`, per CPU.
pub const ICMP_ERRORS_PER_SEC: u32 = 1000;
pub const ICMP_ERRORS_BURST: u32 = 50;

impl GlobalConfig {
    /// The IPv4 outer source of a flow; `flow_hash` is asked only if sources are spread.
    #[inline(always)]
    #[must_use]
    pub fn outer_source_v4(&self, flow_hash: impl FnOnce() -> u32) -> [u8; 4] {
        let spread = u32::from_be_bytes(self.outer_spread_v4);
        if spread == 0 {
            return self.tunnel_source_v4;
        }
        let base = u32::from_be_bytes(self.outer_base_v4);
        ((base & !spread) | (flow_hash() & spread)).to_be_bytes()
    }
}

/// Per-CPU traffic counters of one service (`VIP_STATS`) or one backend (`BACKEND_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets: u64,
    /// Bytes of the packets as received (Ethernet frame length).
    pub bytes: u64,
    /// Connection-table entries created.
    pub new_flows: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 24);

impl TrafficCounters {
    /// Sum of two readings (used to fold per-CPU values).
    #[must_use]
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
            new_flows: self.new_flows.wrapping_add(other.new_flows),
        }
    }
}

/// Value of the per-CPU `NEXT_HOPS` cache, indexed by backend id: what `bpf_fib_lookup`
/// answered for the backend's address, reused until `expires_ns` (`bpf_ktime_get_coarse_ns`)
/// while the id still belongs to the same backend (`generation`).
/// The lookup costs about as much as the rest of the balancer (docs/BENCHMARKS.md), so it
/// is paid once per backend per CPU per `NEXT_HOP_TTL_NS`, not per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub expires_ns: u64,
    pub ifindex: u32,
    /// The egress MTU towards the backend (IP bytes), as the lookup reported it in
    /// `mtu_result`: the route's locked MTU metric or PMTU exception, else the device's.
    /// A tunnelled packet must fit it outer header included. `u32::MAX`: the kernel did not
    /// report one (none does from 5.12 on), nothing is checked.
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// `BackendInfo::generation` of the backend the answer is for. A backend id given to
    /// another backend (a new generation, e.g. a service replaced by a reload or a restarted
    /// agent) must not inherit its predecessor's next hop for the rest of the TTL: its
    /// packets would go to the old backend's MAC address.
    pub generation: u32,
}
const _: () = assert!(size_of::<NextHop>() == 32);

/// Value of the single-entry `BENCH_TEMPLATE` array: the packet the benchmark entry point
/// restores before every run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchTemplate {
    pub len: u32,
    pub data: [u8; BENCH_TEMPLATE_LEN],
}
const _: () = assert!(size_of::<BenchTemplate>() == 4 + BENCH_TEMPLATE_LEN);

#[cfg(feature = "user")]
mod pod {
    use super::{
        BackendInfo, BenchTemplate, FlowKey, FlowValue, GlobalConfig, NextHop, TrafficCounters,
        VipAddrBits, VipInfo, VipKey,
    };

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays,
    // with every padding byte an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GlobalConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BenchTemplate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipAddrBits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::icmp::IcmpBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::nat::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::nat::SnatSource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rules::SourceRuleData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rules::SourceRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rate::RateLimits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rate::RateKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::limits::SpillSet {}
}

#[cfg(feature = "user")]
mod convert {
    use core::net::IpAddr;

    use super::{FAMILY_V4, FAMILY_V6, VipKey};

    /// The 16-byte map form of an address and its family.
    #[must_use]
    pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
        match addr {
            IpAddr::V4(v4) => {
                let mut out = [0u8; 16];
                out[..4].copy_from_slice(&v4.octets());
                (out, FAMILY_V4)
            }
            IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
        }
    }

    /// The address a map entry holds.
    #[must_use]
    pub fn addr_from_bytes(addr: [u8; 16], family: u8) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
        } else {
            IpAddr::from(addr)
        }
    }

    impl VipKey {
        /// Key of `VIPS` for a service.
        #[must_use]
        pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
            let (addr, family) = addr_bytes(addr);
            Self {
                addr,
                port_be: port.to_be(),
                proto,
                family,
            }
        }

        /// Key of `VIP_ADDRS` / `DECAP_VIPS` for an address.
        #[must_use]
        pub fn addr_only(addr: IpAddr) -> Self {
            Self::new(addr, 0, 0)
        }
    }
}
#[cfg(feature = "user")]
pub use convert::{addr_bytes, addr_from_bytes};

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    use super::GlobalConfig;

    #[test]
    fn outer_sources_stay_in_their_prefix_and_follow_the_hash() {
        let mut g = GlobalConfig {
            tunnel_source_v4: [198, 51, 100, 1],
            ..GlobalConfig::default()
        };
        // No prefix: the tunnel source, and the hash is not even computed.
        assert_eq!(g.outer_source_v4(|| panic!("hashed")), [198, 51, 100, 1]);
        // 198.51.100.16/28: the low four bits from the hash.
        g.outer_base_v4 = [198, 51, 100, 16];
        g.outer_spread_v4 = [0, 0, 0, 0x0f];
        assert_eq!(g.outer_source_v4(|| 0), [198, 51, 100, 16]);
        assert_eq!(g.outer_source_v4(|| 0xffff_fff5), [198, 51, 100, 21]);
        let all: BTreeSet<[u8; 4]> = (0..64u32)
            .map(|h| g.outer_source_v4(|| h.wrapping_mul(0x9e37_79b1)))
            .collect();
        assert_eq!(all.len(), 16, "every address of the /28: {all:?}");
        assert!(
            all.iter()
                .all(|a| a[..3] == [198, 51, 100] && (16..32).contains(&a[3]))
        );
    }
}
