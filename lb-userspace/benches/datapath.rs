//! `cargo xtask bench datapath`: nanoseconds per packet through `BPF_PROG_TEST_RUN`.
//!
//! Every case runs `repeat` = 1,000,000 times in the kernel, five rounds, median reported,
//! next to `weir_pass` (a bare `XDP_PASS`: the floor) measured in the same run. The kernel
//! does not restore the packet between repeats, so the balancer cases run through
//! `weir_bench`, which trims what the previous run prepended and copies the template packet
//! back before running the balancer's own code; the "template copy" row prices that
//! restoration alone (an ARP frame, which the balancer passes after one comparison). Each
//! run's return value is checked, so a case that stopped balancing would fail the bench.
//!
//! The table goes to stdout and to docs/BENCHMARKS.md.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use aya::maps::Array;
use lb_common::{BENCH_TEMPLATE_LEN, BenchTemplate, map_name, prog_name};
use weir::{
    agent::desired::plain,
    config,
    datapath::{self, KernelMaps},
    reconcile::Balancer,
};
use weir_testbed::{Backend, ConfigBuilder, ServiceBuilder};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;
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
    _balancer: Balancer<KernelMaps>,
    template: Array<aya::maps::MapData, BenchTemplate>,
    g0: u32,
}

impl Bench {
    /// Median ns per run of `program` on `input`, checking every round's return value.
    fn measure(&mut self, program: &str, input: &[u8], want: u32) -> f64 {
        if program == prog_name::BENCH {
            let mut t = BenchTemplate {
                len: input.len() as u32,
                data: [0; BENCH_TEMPLATE_LEN],
            };
            t.data[..input.len()].copy_from_slice(input);
            self.template.set(0, t, 0).expect("write template");
        }
        let runner =
            common::test_run::XdpRunner::new(&self.ebpf, program, self.g0).expect("program");
        let mut samples = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let (action, mean) = runner.time(input, REPEAT).expect("BPF_PROG_TEST_RUN");
            assert_eq!(
                action, want,
                "{program}: unexpected XDP action, the case is not measuring what it says"
            );
            // The kernel reports the mean duration of one repeat.
            samples.push(mean);
        }
        samples.sort();
        let median: Duration = samples[ROUNDS / 2];
        median.as_nanos() as f64
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    if !common::require_root() {
        eprintln!("bench datapath needs root (BPF_PROG_TEST_RUN and a network namespace)");
        std::process::exit(1);
    }
    let ns = common::Netns::create(&common::prefix("bdp")).expect("namespace");
    let n = ns.name().to_owned();
    common::lab_namespace(&n).expect("lab namespace");

    let rows = common::in_netns(&n, || {
        let cfg = config::parse(&bench_config().render(), Path::new("bench.toml")).expect("config");
        let mut ebpf = datapath::load_object(cfg.agent.conntrack_entries, false).expect("load");
        for p in [prog_name::PASS, prog_name::BENCH, prog_name::BENCH_FIB] {
            datapath::load_program(&mut ebpf, p).expect("verifier");
        }
        let template = Array::try_from(ebpf.take_map(map_name::BENCH_TEMPLATE).expect("map"))
            .expect("template map");
        let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf).expect("maps"));
        balancer.apply(&plain(&cfg)).expect("apply");
        let g0 = datapath::ifindex("g0").expect("g0");
        let mut b = Bench {
            ebpf,
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
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x06]);
        arp.resize(60, 0);

        let floor = b.measure(prog_name::PASS, &non_vip, XDP_PASS);
        let mut rows = vec![("XDP_PASS program (floor)".to_owned(), floor)];
        let cases: Vec<(&str, &[u8], u32)> = vec![
            ("template copy only (ARP, passed)", &arp, XDP_PASS),
            ("non-VIP IPv4 TCP, passed", &non_vip, XDP_PASS),
            (
                "TCP SYN, new flow, maglev (scheduler + insert), tunnel",
                &syn,
                XDP_TX,
            ),
            ("TCP SYN, new flow, ip-hash", &syn_iphash, XDP_TX),
            ("TCP SYN, new flow, round-robin", &syn_rr, XDP_TX),
            (
                "TCP SYN, new flow, least-conn (two choices)",
                &syn_lc,
                XDP_TX,
            ),
            ("TCP established (table hit), tunnel", &ack, XDP_TX),
            ("UDP (table hit), tunnel", &udp4, XDP_TX),
            ("TCP established, direct (L2 DSR)", &direct, XDP_TX),
            ("IPv6 TCP established, tunnel", &v6, XDP_TX),
        ];
        for (name, input, want) in cases {
            let ns = b.measure(prog_name::BENCH, input, want);
            rows.push((name.to_owned(), ns));
        }
        let fib = b.measure(prog_name::BENCH_FIB, &non_vip, XDP_DROP);
        rows.push(("bpf_fib_lookup alone (next hop)".to_owned(), fib));
        rows
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
    println!("{table}");
    write_doc(&table);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

fn write_doc(table: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let begin = "<!-- datapath:begin -->";
    let end = "<!-- datapath:end -->";
    let section = format!(
        "{begin}\nMeasured by `cargo xtask bench datapath` on {}: `BPF_PROG_TEST_RUN`, repeat {REPEAT}, median of {ROUNDS} rounds.\n\n{table}{end}",
        machine()
    );
    let text = match (existing.find(begin), existing.find(end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ => format!("{existing}\n{section}\n"),
    };
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("warning: cannot write {}: {e}", path.display());
    } else {
        println!("written to {}", path.display());
    }
}
