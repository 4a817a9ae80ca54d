//! `cargo xtask bench datapath`: nanoseconds per packet through `BPF_PROG_TEST_RUN`.
//!
//! Every case runs `repeat` = 1,000,000 times in the kernel per round, seven rounds
//! interleaved over the cases (a slow spell of a shared machine then touches every case
//! alike), median reported, next to `weir_pass` (a bare `XDP_PASS`: the floor) measured in the same run. The kernel
//! does not restore the packet between repeats, so the balancer cases run through
//! `weir_bench`, which trims what the previous run prepended and copies the template packet
//! back before running the balancer's own code; the "template copy" row prices that
//! restoration alone (an ARP frame, which the balancer passes after one comparison). Each
//! run's return value is checked, so a case that stopped balancing would fail the bench.
//!
//! The "too big" rows price the tunnel's MTU check and its answer. A UDP datagram of 1480
//! bytes fits a 1500-byte MTU exactly once tunnelled: it goes the established path, MTU
//! check included, through `weir_bench`. One of 1500 bytes (IPv4) or an IPv6 TCP segment of
//! 1500 bytes does not: the balancer answers with ICMP fragmentation needed / ICMPv6 Packet
//! Too Big. Those run through `weir_bench_too_big`, which undoes the previous run's answer
//! (takes the prepended headers off, grows the frame back) and gives this CPU's ICMP budget
//! one token that never refills, taken by the run as by a real answer: the repeats would
//! otherwise drain the budget in 50 runs and measure the rate-limited drop instead. Its
//! restoration costs more than the template copy (two more helper calls and the budget
//! write), so those rows overstate the answer by a few ns. The established-path cost of
//! the check is the difference of the established rows between two builds (`--object`
//! with an older build, which lacks `weir_bench_too_big`: its rows are skipped).
//!
//! The last balancer row runs on every CPU at once (a thread pinned to each, all on the same
//! maps): new TCP flows from `weir_bench_gen`, each CPU walking its own share of 65,536
//! source ports, so every run inserts into the half-open table (an LRU) as a SYN flood
//! spread by RSS would; it prices the table's shared state (the LRU lists, the bucket
//! locks), which a single CPU never contends for. Its figure is the median over the CPUs of
//! each one's mean: 1e9 over it is the SYN-flood throughput of one core.
//!
//! The rate-limit rows: a service whose limits no bench packet reaches, whose established
//! packets price an idle limiter (tracked packets never reach it) and whose SYNs the limit
//! check with its `cmpxchg`; and a service limited to one new flow a second per source,
//! whose SYNs after the first are dropped by the limit: the cost of a flood it holds.
//!
//! The table goes to stdout and to docs/BENCHMARKS.md.
//!
//! Arguments (after `--`): `--rounds N` (default 7, median reported), `--only a,b` (only the
//! cases whose names contain one of these; the floor and the template copy always run, and
//! the doc is left alone), `--object PATH` (an eBPF object built elsewhere instead of the
//! one embedded, for trying a datapath change without rebuilding the bench; the doc is
//! left alone), `--min` (report the fastest round instead of the median: on a machine
//! shared with other work, the round least disturbed; the doc is left alone), `--katran
//! PATH` (or `WEIR_KATRAN_SRC=PATH`: a Katran checkout, the directory holding `katran/lib`;
//! see below).
//!
//! Katran side by side: given a checkout, the bench builds Katran's balancer behind the same
//! template restoration (`katran/bench_wrapper.c`, `katran/mod.rs`: clang-19, Katran's
//! default switches, IPIP; per-CPU LRUs) and runs Katran's rows in the same rounds as
//! Weir's, on the same frames, each output checked once (XDP_TX, an outer header to a
//! real, the inner packet untouched); then a table of Weir's cost over its template copy
//! divided by Katran's over its own, with issue 10's targets. The Katran rows go to stdout
//! only; the doc's table stays Weir's.

#[path = "katran/mod.rs"]
mod katran;
mod support;

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{BENCH_TEMPLATE_LEN, BenchTemplate, map_name, prog_name};
use weir::{
    agent::desired::plain,
    config,
    datapath::{self, KernelMaps},
    reconcile::Balancer,
};
use weir_testbed::{Backend, ConfigBuilder, ServiceBuilder};

const REPEAT: u32 = 1_000_000;
const DEFAULT_ROUNDS: usize = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// One service per measured case: tunnel and direct, both protocols and families, and every
/// scheduler.
fn bench_config() -> ConfigBuilder {
    let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(198, 51, 100, last));
    let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last));
    let vip = |last: u8| Ipv4Addr::new(203, 0, 113, last);
    let three = [v4(11), v4(12), v4(13)].map(Backend::new);
    let with =
        |s: ServiceBuilder, backends: &[Backend]| backends.iter().fold(s, |s, b| s.backend(*b));
    ConfigBuilder::new("g0")
        .tunnel_source(Ipv4Addr::new(198, 51, 100, 1))
        .tunnel_source_v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
        .conntrack_entries(65536)
        // A million SYNs a round is a flood to the default threshold, and flood mode would
        // schedule every row's SYNs by the hash: off, so that each scheduler row prices its
        // scheduler (a full connection table still starts flood mode).
        .raw("flood_threshold", "0")
        .service(with(
            ServiceBuilder::new("tcp4", vip(10), 80, "tcp"),
            &three,
        ))
        .service(with(
            ServiceBuilder::new("udp4", vip(10), 53, "udp"),
            &three,
        ))
        .service(with(
            ServiceBuilder::new("tcp4-direct", vip(11), 80, "tcp").forwarding("direct"),
            &three[..2],
        ))
        .service(with(
            ServiceBuilder::new("iphash", vip(12), 80, "tcp").scheduler("ip-hash"),
            &three,
        ))
        .service(with(
            ServiceBuilder::new("rr", vip(13), 80, "tcp").scheduler("round-robin"),
            &[
                Backend::new(v4(11)),
                Backend::weighted(v4(12), 2),
                Backend::weighted(v4(13), 3),
            ],
        ))
        .service(with(
            ServiceBuilder::new("lc", vip(14), 80, "tcp").scheduler("least-conn"),
            &three,
        ))
        .service(with(
            ServiceBuilder::new("udp4-big", vip(15), 53, "udp"),
            &three[..1],
        ))
        // Rate limits: one far above any rate the bench makes (its established packets
        // price an idle limiter), one of a flow a second (its SYNs price a flood dropped
        // by the limit).
        .service(
            with(ServiceBuilder::new("limited", vip(16), 80, "tcp"), &three).raw(
                "rate_limit",
                "{ new_flows_per_source = 10000000, new_flows_per_vip = 10000000 }",
            ),
        )
        .service(
            with(ServiceBuilder::new("flooded", vip(17), 80, "tcp"), &three).raw(
                "rate_limit",
                "{ new_flows_per_source = 1, source_burst = 1 }",
            ),
        )
        .service(with(
            ServiceBuilder::new(
                "tcp6",
                Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10),
                80,
                "tcp",
            ),
            &[Backend::new(v6(0x11)), Backend::new(v6(0x12))],
        ))
}

fn frame(ethertype: u16, ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = sport.to_be_bytes().to_vec();
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(&[0u8; 6]);
    h
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = sport.to_be_bytes().to_vec();
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 26, 0, 0]);
    h.extend_from_slice(&[0u8; 18]);
    h
}

/// A UDP header and `payload` bytes of payload.
fn udp_sized(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = sport.to_be_bytes().to_vec();
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend((0..payload).map(|i| i as u8));
    h
}

/// A TCP ACK with `payload` bytes of payload.
fn tcp_sized(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = tcp(sport, dport, 0x10);
    h.extend((0..payload).map(|i| i as u8));
    h
}

fn ipv4(dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0, 198, 51, 100, 2]);
    p.extend_from_slice(&dst);
    let sum = p
        .chunks(2)
        .fold(0u32, |s, c| s + (u32::from(c[0]) << 8 | u32::from(c[1])));
    let sum = (sum & 0xffff) + (sum >> 16);
    let c = !((sum & 0xffff) + (sum >> 16)) as u16;
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

fn ipv6(dst_last: u8, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[proto, 64]);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, dst_last,
    ]);
    p.extend_from_slice(l4);
    p
}

struct Bench {
    ebpf: aya::Ebpf,
    rounds: usize,
    /// Report the fastest round, not the median.
    min: bool,
    _balancer: Balancer<KernelMaps>,
    template: Array<aya::maps::MapData, BenchTemplate>,
    g0: u32,
}

/// `weir_bench_gen`, its settings map and its per-CPU flow counter.
const BENCH_GEN: &str = "weir_bench_gen";
const BENCH_GEN_MAP: &str = "BENCH_GEN";
const BENCH_GEN_SEQ: &str = "BENCH_GEN_SEQ";
/// Flows of the all-CPUs case, and the offset of the TCP source port they differ in.
const PARALLEL_FLOWS: u32 = 65_536;
const SPORT_OFFSET: u32 = 14 + 20;

impl Bench {
    /// New flows on every CPU at once through `weir_bench_gen`: the median over the CPUs
    /// of each one's mean ns per run (see the module documentation).
    fn measure_parallel(&mut self, input: &[u8]) -> f64 {
        self.set_template(input);
        let cpus = nr_cpus().expect("number of CPUs");
        let mut gen_map: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(BENCH_GEN_MAP).expect("BENCH_GEN")).expect("array");
        for (i, v) in [0, PARALLEL_FLOWS, SPORT_OFFSET, 1024]
            .into_iter()
            .enumerate()
        {
            gen_map.set(i as u32, v, 0).expect("BENCH_GEN");
        }
        let mut seq: PerCpuArray<_, u32> =
            PerCpuArray::try_from(self.ebpf.map_mut(BENCH_GEN_SEQ).expect("BENCH_GEN_SEQ"))
                .expect("per-CPU array");
        let starts: Vec<u32> = (0..cpus)
            .map(|cpu| (cpu as u32).wrapping_mul(PARALLEL_FLOWS / cpus.max(1) as u32))
            .collect();
        seq.set(0, PerCpuValues::try_from(starts).expect("values"), 0)
            .expect("BENCH_GEN_SEQ");
        let runner =
            common::test_run::XdpRunner::new(&self.ebpf, BENCH_GEN, self.g0).expect("program");
        let mut samples = Vec::new();
        for _ in 0..self.rounds {
            let per_cpu: Vec<Duration> = std::thread::scope(|s| {
                let runs: Vec<_> = (0..cpus)
                    .map(|cpu| {
                        let runner = &runner;
                        s.spawn(move || {
                            support::pin_to(cpu);
                            let (action, duration) =
                                runner.time(input, REPEAT).expect("BPF_PROG_TEST_RUN");
                            assert_eq!(action, XDP_TX, "{BENCH_GEN}: unexpected XDP action");
                            duration
                        })
                    })
                    .collect();
                runs.into_iter()
                    .map(|r| r.join().expect("bench thread"))
                    .collect()
            });
            let mut per_cpu = per_cpu;
            per_cpu.sort();
            samples.push(per_cpu[per_cpu.len() / 2]);
        }
        self.pick(samples)
    }

    /// The template of a case: the frame's length, and as much of its start as the template
    /// holds (for a larger frame, its headers: all the balancer reads).
    fn set_template(&mut self, input: &[u8]) {
        let mut t = BenchTemplate {
            len: input.len() as u32,
            data: [0; BENCH_TEMPLATE_LEN],
        };
        let head = input.len().min(BENCH_TEMPLATE_LEN);
        t.data[..head].copy_from_slice(&input[..head]);
        self.template.set(0, t, 0).expect("write template");
    }

    /// Median ns per run of `program` on `input`, checking every round's return value.
    /// One round of `program` on `input`: the mean duration of one repeat, as the kernel
    /// reports it, after checking the run's return value.
    fn measure_once(&mut self, program: &str, input: &[u8], want: u32) -> Duration {
        if program == prog_name::BENCH || program == prog_name::BENCH_TOO_BIG {
            self.set_template(input);
        }
        let runner =
            common::test_run::XdpRunner::new(&self.ebpf, program, self.g0).expect("program");
        let (action, duration) = runner.time(input, REPEAT).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            action, want,
            "{program}: unexpected XDP action, the case is not measuring what it says"
        );
        duration
    }

    /// The reported figure of a case's rounds: the median, or with `--min` the fastest.
    fn pick(&self, mut samples: Vec<Duration>) -> f64 {
        samples.sort();
        let pick = if self.min {
            samples[0]
        } else {
            samples[samples.len() / 2]
        };
        pick.as_nanos() as f64
    }
}

fn main() {
    // A run stopped from outside still removes its namespaces.
    common::remove_on_signal().expect("signal handling");
    // `cargo bench` passes `--bench`; nothing else to parse.
    if !common::require_root() {
        eprintln!("bench datapath needs root (BPF_PROG_TEST_RUN and a network namespace)");
        std::process::exit(1);
    }
    let rounds: usize = support::arg::<String>("--rounds")
        .map(|r| r.parse().expect("--rounds N"))
        .unwrap_or(DEFAULT_ROUNDS)
        .clamp(1, 101);
    let only: Option<Vec<String>> = support::arg::<String>("--only")
        .map(|o| o.split(',').map(|s| s.trim().to_owned()).collect());
    let object = support::arg::<String>("--object");
    let min = std::env::args().any(|a| a == "--min");
    let katran_object = katran::object_for_run("rows");
    let ns = common::Netns::create(&common::prefix("bdp")).expect("namespace");
    let n = ns.name().to_owned();
    common::lab_namespace(&n).expect("lab namespace");

    let (rows, katran_rows) = common::in_netns(&n, || {
        let cfg = config::parse(&bench_config().render(), Path::new("bench.toml")).expect("config");
        let mut ebpf = match &object {
            Some(path) => {
                let bytes = std::fs::read(path).expect("reading --object");
                aya::EbpfLoader::new()
                    .map_max_entries(map_name::CONNTRACK, cfg.agent.conntrack_entries)
                    .load(&bytes)
                    .expect("load --object")
            }
            None => datapath::load_object(cfg.agent.conntrack_entries, false).expect("load"),
        };
        for p in [
            prog_name::PASS,
            prog_name::BENCH,
            prog_name::BENCH_FIB,
            BENCH_GEN,
        ] {
            datapath::load_program(&mut ebpf, p).expect("verifier");
        }
        // An object built before the MTU check (`--object`) has no such entry.
        let too_big = ebpf.program(prog_name::BENCH_TOO_BIG).is_some();
        if too_big {
            datapath::load_program(&mut ebpf, prog_name::BENCH_TOO_BIG).expect("verifier");
        }
        let template = Array::try_from(ebpf.take_map(map_name::BENCH_TEMPLATE).expect("map"))
            .expect("template map");
        let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf).expect("maps"));
        balancer.apply(&plain(&cfg)).expect("apply");
        let g0 = datapath::ifindex("g0").expect("g0");
        let mut b = Bench {
            ebpf,
            rounds,
            min,
            _balancer: balancer,
            template,
            g0,
        };

        let vip = [203, 0, 113, 10];
        let syn = frame(0x0800, &ipv4(vip, 6, &tcp(40000, 80, 0x02)));
        let syn_iphash = frame(0x0800, &ipv4([203, 0, 113, 12], 6, &tcp(40010, 80, 0x02)));
        let syn_rr = frame(0x0800, &ipv4([203, 0, 113, 13], 6, &tcp(40011, 80, 0x02)));
        let syn_lc = frame(0x0800, &ipv4([203, 0, 113, 14], 6, &tcp(40012, 80, 0x02)));
        let ack = frame(0x0800, &ipv4(vip, 6, &tcp(40000, 80, 0x10)));
        let udp4 = frame(0x0800, &ipv4(vip, 17, &udp(40001, 53)));
        let direct = frame(0x0800, &ipv4([203, 0, 113, 11], 6, &tcp(40002, 80, 0x10)));
        let v6 = frame(0x86dd, &ipv6(0x10, 6, &tcp(40003, 80, 0x10)));
        let non_vip = frame(0x0800, &ipv4([198, 51, 100, 1], 6, &tcp(40004, 22, 0x10)));
        let big = [203, 0, 113, 15];
        // 1480 bytes: 1500 once tunnelled, the MTU exactly; 1500 bytes: too big.
        let at_mtu = frame(0x0800, &ipv4(big, 17, &udp_sized(40005, 53, 1480 - 28)));
        let too_big4 = frame(0x0800, &ipv4(big, 17, &udp_sized(40006, 53, 1500 - 28)));
        let too_big6 = frame(0x86dd, &ipv6(0x10, 6, &tcp_sized(40007, 80, 1500 - 60)));
        let limited_ack = frame(0x0800, &ipv4([203, 0, 113, 16], 6, &tcp(40008, 80, 0x10)));
        let limited_syn = frame(0x0800, &ipv4([203, 0, 113, 16], 6, &tcp(40009, 80, 0x02)));
        let flooded_syn = frame(0x0800, &ipv4([203, 0, 113, 17], 6, &tcp(40013, 80, 0x02)));
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x06]);
        arp.resize(60, 0);

        // Katran on the same frames: (name, frame, action, whether it is tunnelled).
        let mut katran = katran_object.as_deref().map(|object| {
            katran::Katran::load(object, katran::PROGRAM, &KATRAN_REALS, &katran_vips())
                .expect("Katran")
        });
        let mut katran_cases: Vec<(&str, &[u8], u32, bool)> = vec![
            (KATRAN_COPY, &arp, XDP_PASS, false),
            ("Katran non-VIP IPv4 TCP, passed", &non_vip, XDP_PASS, false),
            (KATRAN_SYN, &syn, XDP_TX, true),
            (KATRAN_ESTABLISHED, &ack, XDP_TX, true),
            (KATRAN_UDP, &udp4, XDP_TX, true),
            (KATRAN_V6, &v6, XDP_TX, true),
        ];
        katran_cases.retain(|(name, ..)| {
            katran.is_some()
                && (*name == KATRAN_COPY
                    || only
                        .as_ref()
                        .is_none_or(|o| o.iter().any(|w| name.contains(w.as_str()))))
        });
        if let Some(k) = katran.as_mut() {
            katran_check(k, &katran_cases, g0);
        }

        let mut cases: Vec<(&str, &str, &[u8], u32)> = vec![
            (
                "XDP_PASS program (floor)",
                prog_name::PASS,
                &non_vip,
                XDP_PASS,
            ),
            (
                "template copy only (ARP, passed)",
                prog_name::BENCH,
                &arp,
                XDP_PASS,
            ),
            (
                "non-VIP IPv4 TCP, passed",
                prog_name::BENCH,
                &non_vip,
                XDP_PASS,
            ),
            (
                "TCP SYN, new flow, maglev (scheduler + insert), tunnel",
                prog_name::BENCH,
                &syn,
                XDP_TX,
            ),
            (
                "TCP SYN, new flow, ip-hash",
                prog_name::BENCH,
                &syn_iphash,
                XDP_TX,
            ),
            (
                "TCP SYN, new flow, round-robin",
                prog_name::BENCH,
                &syn_rr,
                XDP_TX,
            ),
            (
                "TCP SYN, new flow, least-conn (two choices)",
                prog_name::BENCH,
                &syn_lc,
                XDP_TX,
            ),
            (
                "TCP SYN, new flow, rate-limited service (under its limits)",
                prog_name::BENCH,
                &limited_syn,
                XDP_TX,
            ),
            (
                "TCP SYN over a per-source rate limit: dropped",
                prog_name::BENCH,
                &flooded_syn,
                XDP_DROP,
            ),
            (
                "TCP established (table hit), tunnel",
                prog_name::BENCH,
                &ack,
                XDP_TX,
            ),
            (
                "TCP established, tunnel, service with rate limits (idle limiter)",
                prog_name::BENCH,
                &limited_ack,
                XDP_TX,
            ),
            ("UDP (table hit), tunnel", prog_name::BENCH, &udp4, XDP_TX),
            (
                "TCP established, direct (L2 DSR)",
                prog_name::BENCH,
                &direct,
                XDP_TX,
            ),
            (
                "IPv6 TCP established, tunnel",
                prog_name::BENCH,
                &v6,
                XDP_TX,
            ),
            (
                "UDP of 1480 bytes (table hit), tunnel: at the MTU, forwarded",
                prog_name::BENCH,
                &at_mtu,
                XDP_TX,
            ),
            (
                "UDP of 1500 bytes, too big: ICMP fragmentation needed sent",
                prog_name::BENCH_TOO_BIG,
                &too_big4,
                XDP_TX,
            ),
            (
                "IPv6 TCP of 1500 bytes, too big: ICMPv6 Packet Too Big sent",
                prog_name::BENCH_TOO_BIG,
                &too_big6,
                XDP_TX,
            ),
            (
                "bpf_fib_lookup alone (next hop)",
                prog_name::BENCH_FIB,
                &non_vip,
                XDP_DROP,
            ),
        ];
        // The floor and the template copy always run: the other figures are read
        // against them.
        cases.retain(|(name, program, _, _)| {
            (too_big || *program != prog_name::BENCH_TOO_BIG)
                && (*program == prog_name::PASS
                    || name.starts_with("template copy")
                    || only.as_ref().is_none_or(|o| {
                        *program != prog_name::BENCH_FIB
                            && o.iter().any(|w| name.contains(w.as_str()))
                    }))
        });
        // Rounds interleaved over the cases, so that a slow spell of a shared machine
        // spreads over all of them instead of skewing one.
        let mut samples = vec![Vec::with_capacity(rounds); cases.len()];
        let mut katran_samples = vec![Vec::with_capacity(rounds); katran_cases.len()];
        for _ in 0..rounds {
            for (i, (_, program, input, want)) in cases.iter().enumerate() {
                samples[i].push(b.measure_once(program, input, *want));
            }
            if let Some(k) = katran.as_mut() {
                for (i, (name, input, want, _)) in katran_cases.iter().enumerate() {
                    k.set_template(input).expect("Katran template");
                    let runner = common::test_run::XdpRunner::new(&k.ebpf, katran::PROGRAM, g0)
                        .expect("program");
                    let (action, duration) = runner.time(input, REPEAT).expect("BPF_PROG_TEST_RUN");
                    assert_eq!(action, *want, "{name}: unexpected XDP action");
                    katran_samples[i].push(duration);
                }
            }
        }
        let katran_rows: Option<Vec<(String, f64)>> = katran.as_ref().map(|k| {
            let fallback = k.fallback_lru_runs().expect("Katran stats");
            assert_eq!(
                fallback, 0,
                "Katran used fallback_cache instead of its per-CPU LRUs"
            );
            katran_cases
                .iter()
                .zip(std::mem::take(&mut katran_samples))
                .map(|((name, ..), s)| ((*name).to_owned(), b.pick(s)))
                .collect()
        });
        let mut rows: Vec<(String, f64)> = cases
            .iter()
            .zip(samples)
            .map(|((name, ..), s)| ((*name).to_owned(), b.pick(s)))
            .collect();
        let parallel = "TCP SYN, new flows, every CPU at once (maglev, tunnel)";
        if only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| parallel.contains(w.as_str())))
        {
            let ns = b.measure_parallel(&syn);
            rows.push((parallel.to_owned(), ns));
        }
        (rows, katran_rows)
    });

    let floor = rows[0].1;
    let copy = rows[1].1;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| case | ns/packet | over floor | over template copy |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|");
    for (name, ns) in &rows {
        let _ = writeln!(
            table,
            "| {name} | {ns:.1} | {:+.1} | {} |",
            ns - floor,
            if name.contains("floor") || name.contains("fib_lookup") {
                "".to_owned()
            } else {
                format!("{:+.1}", ns - copy)
            }
        );
    }
    // Katran's rows and the ratios of the same run go with Weir's, to stdout and the doc.
    if let Some(k) = &katran_rows {
        let _ = write!(table, "\n{}", katran_tables(&rows, k, floor, copy));
    } else {
        let _ = write!(
            table,
            "\nKatran was not measured in this run (no `--katran PATH` / `WEIR_KATRAN_SRC`).\n"
        );
    }
    println!("{table}");
    if only.is_none() && object.is_none() && !min {
        write_doc(&table, rounds);
    }
}

fn write_doc(table: &str, rounds: usize) {
    support::write_doc_section(
        "datapath",
        &format!(
            "Measured by `cargo xtask bench datapath` on {}: `BPF_PROG_TEST_RUN`, repeat {REPEAT}, median of {rounds} rounds.\n\n{table}",
            support::machine()
        ),
    );
}

/// Katran's rows (see the module documentation).
const KATRAN_COPY: &str = "Katran template copy only (ARP, passed)";
const KATRAN_SYN: &str = "Katran TCP SYN, new flow (CH + LRU update), IPIP";
const KATRAN_ESTABLISHED: &str = "Katran TCP established (LRU hit), IPIP";
const KATRAN_UDP: &str = "Katran UDP (LRU hit), IPIP";
const KATRAN_V6: &str = "Katran IPv6 TCP established (LRU hit), 6in6";

/// Katran's reals, ids 1 to 5: Weir's backends of the `tcp4`/`udp4` and `tcp6` services.
const KATRAN_REALS: [IpAddr; 5] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 12)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 13)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x12)),
];

/// Katran's VIPs: Weir's `tcp4`, `udp4` and `tcp6` services, the addresses of its frames.
fn katran_vips() -> Vec<katran::Vip> {
    let v4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    vec![
        katran::Vip {
            addr: v4,
            port: 80,
            proto: 6,
            reals: vec![1, 2, 3],
        },
        katran::Vip {
            addr: v4,
            port: 53,
            proto: 17,
            reals: vec![1, 2, 3],
        },
        katran::Vip {
            addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10)),
            port: 80,
            proto: 6,
            reals: vec![4, 5],
        },
    ]
}

/// Runs each Katran case once on every CPU (so that each CPU's LRU holds the flows before
/// the timing, as it would in production after the flow's first packet), then checks one
/// output per case: the action, and for tunnelled cases the encapsulation.
fn katran_check(k: &mut katran::Katran, cases: &[(&str, &[u8], u32, bool)], g0: u32) {
    let cpus = nr_cpus().expect("number of CPUs");
    for (name, input, want, tunnelled) in cases {
        k.set_template(input).expect("Katran template");
        let ebpf = &k.ebpf;
        std::thread::scope(|s| {
            for cpu in 0..cpus {
                s.spawn(move || {
                    support::pin_to(cpu);
                    let runner = common::test_run::XdpRunner::new(ebpf, katran::PROGRAM, g0)
                        .expect("program");
                    let (action, _) = runner.run(input).expect("BPF_PROG_TEST_RUN");
                    assert_eq!(action, *want, "{name}: unexpected XDP action on CPU {cpu}");
                });
            }
        });
        let runner =
            common::test_run::XdpRunner::new(&k.ebpf, katran::PROGRAM, g0).expect("program");
        let (action, out) = runner.run(input).expect("BPF_PROG_TEST_RUN");
        assert_eq!(action, *want, "{name}: unexpected XDP action");
        if *tunnelled {
            match katran::check_encap(input, &out, &KATRAN_REALS) {
                Ok(real) => println!("{name}: XDP_TX to {real}, output checked"),
                Err(e) => panic!("{name}: wrong output: {e:#}"),
            }
        } else {
            assert_eq!(out, *input, "{name}: a passed frame was changed");
        }
    }
}

/// Katran's rows against the floor and its own template copy, then Weir's cost over its
/// template copy divided by Katran's over its own, per packet kind, with issue 10's targets.
fn katran_tables(
    weir: &[(String, f64)],
    katran: &[(String, f64)],
    floor: f64,
    copy: f64,
) -> String {
    let find = |rows: &[(String, f64)], name: &str| {
        rows.iter().find(|(n, _)| n == name).map(|(_, ns)| *ns)
    };
    let k_copy = find(katran, KATRAN_COPY).expect("Katran's template copy always runs");
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| Katran case (its per-CPU LRUs) | ns/packet | over floor | over Katran's template copy |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|");
    for (name, ns) in katran {
        let _ = writeln!(
            t,
            "| {name} | {ns:.1} | {:+.1} | {:+.1} |",
            ns - floor,
            ns - k_copy
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| packet | Weir over its copy | Katran over its copy | Weir / Katran | issue 10 target |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---|");
    let kinds = [
        (
            "established IPv4 TCP, tunnel",
            "TCP established (table hit), tunnel",
            KATRAN_ESTABLISHED,
            Some(0.8),
        ),
        (
            "SYN, new flow, tunnel",
            "TCP SYN, new flow, maglev (scheduler + insert), tunnel",
            KATRAN_SYN,
            Some(1.0),
        ),
        ("UDP, tunnel", "UDP (table hit), tunnel", KATRAN_UDP, None),
        (
            "IPv6 TCP established, 6in6",
            "IPv6 TCP established, tunnel",
            KATRAN_V6,
            None,
        ),
        (
            "non-VIP IPv4 TCP, passed",
            "non-VIP IPv4 TCP, passed",
            "Katran non-VIP IPv4 TCP, passed",
            None,
        ),
    ];
    for (kind, w, k, target) in kinds {
        let (Some(w), Some(k)) = (find(weir, w), find(katran, k)) else {
            continue;
        };
        let (w, k) = (w - copy, k - k_copy);
        let ratio = w / k;
        let target = target.map_or_else(String::new, |t: f64| {
            format!("≤ {t:.1}: {}", if ratio <= t { "met" } else { "not met" })
        });
        let _ = writeln!(t, "| {kind} | {w:.1} | {k:.1} | {ratio:.2} | {target} |");
    }
    t
}
