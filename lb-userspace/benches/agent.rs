//! `cargo xtask bench agent`: the control plane's costs.
//!
//! 1. Time from a health verdict to the datapath maps being updated: what the agent's owner
//!    task does on a health transition (`Balancer::apply_desired` with one backend down,
//!    then up again), on real kernel maps, for services of 10 and 100 backends with a
//!    65537-slot ring. Median and max of 20 verdicts each; map writes counted.
//! 2. The agent's CPU while health-checking 1,000 backends every second: a real `weir agent`
//!    in a namespace, 10 services x 100 backends (1,000 IPv6 addresses on one backend
//!    namespace's interface, one TCP listener answering them all), TCP checks at a 1 s
//!    interval; CPU time from /proc/PID/stat over 20 s.
//!
//! Results go to stdout and to docs/BENCHMARKS.md (between `agent:begin`/`agent:end`).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use weir::{
    agent::{Balancer, DesiredBackend},
    config,
    datapath::{self, KernelMaps},
};
use weir_testbed::{Backend, ConfigBuilder, HealthCheck, ServiceBuilder};

/// IPv6 address `2001:db8:HIGH:..:LOW`, for address `i` (0-based) of a numbered range.
fn numbered(high: u16, low: u16, i: usize) -> Ipv6Addr {
    let last = u16::try_from(i + 1).expect("fewer than 65535 addresses");
    Ipv6Addr::new(0x2001, 0xdb8, high, 0, 0, 0, low, last)
}

fn service_config(backends: usize) -> String {
    let web = (0..backends).fold(
        ServiceBuilder::new("web", Ipv4Addr::new(203, 0, 113, 10), 80, "tcp"),
        |s, i| s.backend(Backend::new(numbered(1, 0, i))),
    );
    ConfigBuilder::new("g0")
        .tunnel_source(Ipv4Addr::new(198, 51, 100, 1))
        .tunnel_source_v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
        .conntrack_entries(4096)
        .service(web)
        .render()
}

/// (median, max) microseconds from a verdict to the maps being written, and the ring slots
/// written per verdict (median).
fn verdict_to_maps(backends: usize) -> (f64, f64, usize) {
    let cfg = config::parse(&service_config(backends), Path::new("bench.toml")).expect("config");
    let mut ebpf = datapath::load_object(cfg.agent.conntrack_entries, false).expect("load");
    let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf).expect("maps"));
    balancer.apply(&cfg).expect("initial apply");
    let svc = cfg.services[0].clone();
    let mut times = Vec::new();
    let mut slots = Vec::new();
    for round in 0..40 {
        // Alternate: backend `round % backends` goes down, then comes back up.
        let victim = (round / 2) % backends;
        let down = round % 2 == 0;
        let desired: Vec<DesiredBackend> = svc
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let up = !(down && i == victim);
                DesiredBackend {
                    address: b.address,
                    ring_weight: if up { b.weight } else { 0 },
                    up,
                }
            })
            .collect();
        let t = Instant::now();
        let report = balancer
            .apply_desired(&cfg, &[(svc.clone(), desired)])
            .expect("apply");
        times.push(t.elapsed().as_secs_f64() * 1e6);
        slots.push(report.ring_slots_written);
    }
    times.sort_by(f64::total_cmp);
    slots.sort_unstable();
    (
        times[times.len() / 2],
        times[times.len() - 1],
        slots[slots.len() / 2],
    )
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12th and 13th after ')'.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Agent CPU (% of one core) while checking `n` backends every second.
fn health_check_cpu(n: usize) -> (f64, f64) {
    let prefix = common::prefix("bag");
    let lb = common::Netns::create(&format!("{prefix}-lb")).expect("ns");
    let be = common::Netns::create(&format!("{prefix}-be")).expect("ns");
    common::run(&[
        "ip",
        "link",
        "add",
        "name",
        "bag0",
        "netns",
        lb.name(),
        "type",
        "veth",
        "peer",
        "name",
        "bag1",
        "netns",
        be.name(),
    ])
    .expect("veth");
    for (ns, dev, addr) in [
        (lb.name(), "bag0", "2001:db8::1/64"),
        (be.name(), "bag1", "2001:db8::2/64"),
    ] {
        common::ip(ns, &["link", "set", dev, "up"]).expect("up");
        common::ip(ns, &["addr", "add", addr, "dev", dev, "nodad"]).expect("addr");
    }
    let batch = std::env::temp_dir().join(format!("{prefix}-addrs"));
    let mut lines = String::new();
    for i in 0..n {
        let _ = writeln!(lines, "addr add 2001:db8::1:{:x}/64 dev bag1 nodad", i + 1);
    }
    std::fs::write(&batch, lines).expect("batch file");
    common::run(&[
        "ip",
        "-n",
        be.name(),
        "-batch",
        batch.to_str().expect("path"),
    ])
    .expect("addresses");
    let _ = std::fs::remove_file(&batch);

    // One listener answers every address: accept and close.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let server = {
        let (stop, accepted) = (Arc::clone(&stop), Arc::clone(&accepted));
        common::spawn_in_netns(be.name(), "listener", move || {
            let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 80)).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
        .expect("listener thread")
    };

    let work = std::env::temp_dir().join(format!("weir-bench-{prefix}"));
    std::fs::create_dir_all(&work).expect("workdir");
    let bpffs = format!("/sys/fs/bpf/weir-bench-{prefix}");
    let mut cfg = ConfigBuilder::new("bag0")
        .tunnel_source_v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
        .conntrack_entries(4096)
        .api_socket(&work.join("weir.sock"))
        .state_file(&work.join("state.json"))
        .bpffs(Path::new(&bpffs));
    let per_service = 100;
    for s in 0..n.div_ceil(per_service) {
        let service = ServiceBuilder::new(&format!("s{s}"), numbered(0x100, 0, s), 80, "tcp")
            .ring_size(1009)
            .health_check(
                HealthCheck::new("tcp")
                    .interval(Duration::from_secs(1))
                    .timeout(Duration::from_millis(500)),
            );
        cfg = cfg.service(
            (s * per_service..((s + 1) * per_service).min(n)).fold(service, |svc, i| {
                svc.backend(Backend::new(numbered(0, 1, i)))
            }),
        );
    }
    let cfg_path = work.join("agent.toml");
    std::fs::write(&cfg_path, cfg.render()).expect("config");
    let mut agent = common::spawn_nsenter(
        lb.name(),
        &["agent", "--config", cfg_path.to_str().expect("path")],
    )
    .expect("agent");
    // Warm up: every backend checked at least once.
    std::thread::sleep(Duration::from_secs(5));
    let pid = agent.pid().expect("pid");
    let before = cpu_ticks(pid).expect("stat");
    let checks_before = accepted.load(Ordering::Relaxed);
    let window = Duration::from_secs(20);
    std::thread::sleep(window);
    let after = cpu_ticks(pid).expect("stat");
    let checks = accepted.load(Ordering::Relaxed) - checks_before;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_s = (after - before) as f64 / hz;
    let percent = cpu_s / window.as_secs_f64() * 100.0;
    let us_per_check = if checks > 0 {
        cpu_s * 1e6 / checks as f64
    } else {
        f64::NAN
    };
    println!("agent pid {pid}: {checks} checks answered in {window:?}, CPU {cpu_s:.2} s");
    let _ = agent.stop();
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    let _ = weir::agent::teardown(Path::new(&bpffs));
    let _ = std::fs::remove_dir_all(&work);
    drop((lb, be));
    (percent, us_per_check)
}

fn main() {
    if !common::require_root() {
        eprintln!("bench agent needs root (namespaces, BPF maps)");
        std::process::exit(1);
    }
    let ns = common::Netns::create(&common::prefix("bav")).expect("namespace");
    common::lab_namespace(ns.name()).expect("lab namespace");
    let rows = common::in_netns(ns.name(), || {
        [10, 100].map(|n| (n, verdict_to_maps(n))).to_vec()
    });
    drop(ns);
    let mut table = String::from(
        "| backends in the service | verdict -> maps, median | max | ring slots written (median) |\n|---:|---:|---:|---:|\n",
    );
    for (n, (median, max, slots)) in &rows {
        let _ = writeln!(table, "| {n} | {median:.0} µs | {max:.0} µs | {slots} |");
    }
    let (percent, us_per_check) = health_check_cpu(1000);
    let _ = writeln!(
        table,
        "\nAgent CPU while health-checking 1,000 backends (TCP, 1 s interval): {percent:.1}% of one core, {us_per_check:.1} µs of CPU per check."
    );
    println!("{table}");
    write_doc(&table);
}

fn write_doc(table: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let (begin, end) = ("<!-- agent:begin -->", "<!-- agent:end -->");
    let section = format!("{begin}\n{table}{end}");
    let text = match (existing.find(begin), existing.find(end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ => format!(
            "{existing}\n## Control plane (`cargo xtask bench agent`)\n\nA health verdict is applied by `Balancer::apply_desired` on the real maps (65537-slot ring, only changed slots written); the agent's CPU is measured from /proc/PID/stat while it checks 1,000 backends.\n\n{section}\n"
        ),
    };
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("warning: cannot write {}: {e}", path.display());
    }
}
