//! `cargo xtask bench agent`: the control plane's costs.
//!
//! 1. Time from a health verdict to the datapath maps being updated: what the agent's owner
//!    task does on a health transition (`Balancer::apply` with one backend down,
//!    then up again), on real kernel maps, for services of 10 and 100 backends with a
//!    65537-slot ring. Median and max of 20 verdicts each; map writes counted.
//! 2. The agent's CPU while health-checking 1,000 backends every second: a real `weir agent`
//!    in a namespace, 10 services x 100 backends (1,000 IPv6 addresses on one backend
//!    namespace's interface, one TCP listener answering them all), TCP checks at a 1 s
//!    interval; CPU time from /proc/PID/stat over 20 s.
//! 3. `weir status` latency while the connection table holds 1,000,000 entries: a real agent
//!    whose pinned `CONNTRACK` is filled from here (batch updates), asked for its status every
//!    50 ms for 20 s (four of its 5 s table walks); median, p99 and max round trip.
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

use lb_common::{FlowKey, FlowValue};
use weir::{
    agent::desired::plain,
    config,
    datapath::{self, KernelMaps, MapWriter},
    reconcile::{BackendSpec, Balancer},
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
/// A verdict's cost in µs: (down median, down max, up median), and the slots a down verdict
/// writes (median).
#[derive(Clone, Copy)]
struct Verdicts {
    down_median: f64,
    down_max: f64,
    up_median: f64,
    slots: usize,
}

fn verdict_to_maps(backends: usize) -> (Verdicts, Verdicts) {
    let cfg = config::parse(&service_config(backends), Path::new("bench.toml")).expect("config");
    let mut ebpf = datapath::load_object(cfg.agent.conntrack_entries, false).expect("load");
    let ahead = verdicts(
        Balancer::new(KernelMaps::take(&mut ebpf).expect("maps")),
        &cfg,
        true,
    );
    // Without rings computed ahead: a down verdict builds its ring on the spot.
    let mut ebpf = datapath::load_object(cfg.agent.conntrack_entries, false).expect("load");
    let building = verdicts(
        Balancer::new(KernelMaps::take(&mut ebpf).expect("maps")),
        &cfg,
        false,
    );
    (ahead, building)
}

/// 40 verdicts, alternately one backend down and up again (the up verdict finds the ring it
/// had before in the cache). With `ahead`, the rings the agent computes on its blocking
/// thread between changes are computed between verdicts, outside the timing, as the agent
/// does.
fn verdicts<M: MapWriter>(
    mut balancer: Balancer<M>,
    cfg: &config::Config,
    ahead: bool,
) -> Verdicts {
    balancer.apply(&plain(cfg)).expect("initial apply");
    let mut spec = plain(cfg);
    let svc = cfg.services[0].clone();
    let backends = svc.backends.len();
    let (mut down_times, mut up_times, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..40 {
        // Alternate: backend `round % backends` goes down, then comes back up.
        let victim = (round / 2) % backends;
        let down = round % 2 == 0;
        spec.services[0].backends = svc
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let up = !(down && i == victim);
                BackendSpec {
                    address: b.address,
                    port: 0,
                    ring_weight: if up { b.weight } else { 0 },
                    up,
                    max_connections: 0,
                    standby: false,
                }
            })
            .collect();
        if ahead {
            let rings = balancer
                .rings_to_precompute()
                .into_iter()
                .map(|input| {
                    let ring = Arc::new(input.build());
                    (input, ring)
                })
                .collect();
            balancer.add_rings(rings);
        }
        let t = Instant::now();
        let report = balancer.apply(&spec).expect("apply");
        let us = t.elapsed().as_secs_f64() * 1e6;
        if down {
            down_times.push(us);
            slots.push(report.ring_slots_written);
        } else {
            up_times.push(us);
        }
    }
    for v in [&mut down_times, &mut up_times] {
        v.sort_by(f64::total_cmp);
    }
    slots.sort_unstable();
    Verdicts {
        down_median: down_times[down_times.len() / 2],
        down_max: down_times[down_times.len() - 1],
        up_median: up_times[up_times.len() / 2],
        slots: slots[slots.len() / 2],
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12th and 13th after ')'.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Two namespaces of a bench, an LB and a backend, joined by the veth pair `{tag}0`/`{tag}1`
/// with the given addresses (no DAD); their prefix and guards.
fn lb_and_backend(tag: &str, addresses: [&str; 2]) -> (String, common::Netns, common::Netns) {
    let prefix = common::prefix(tag);
    let lb = common::Netns::create(&format!("{prefix}-lb")).expect("ns");
    let be = common::Netns::create(&format!("{prefix}-be")).expect("ns");
    let (lb_if, be_if) = (format!("{tag}0"), format!("{tag}1"));
    common::run(&[
        "ip",
        "link",
        "add",
        "name",
        &lb_if,
        "netns",
        lb.name(),
        "type",
        "veth",
        "peer",
        "name",
        &be_if,
        "netns",
        be.name(),
    ])
    .expect("veth");
    for (ns, dev, addr) in [
        (lb.name(), &lb_if, addresses[0]),
        (be.name(), &be_if, addresses[1]),
    ] {
        common::ip(ns, &["link", "set", dev, "up"]).expect("up");
        common::ip(ns, &["addr", "add", addr, "dev", dev, "nodad"]).expect("addr");
    }
    (prefix, lb, be)
}

/// Agent CPU (% of one core) while checking `n` backends every second.
fn health_check_cpu(n: usize) -> (f64, f64) {
    let (prefix, lb, be) = lb_and_backend("bag", ["2001:db8::1/64", "2001:db8::2/64"]);
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
        .audit_log(&work.join("audit.jsonl"))
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
    let _ = datapath::teardown(Path::new(&bpffs));
    let _ = std::fs::remove_dir_all(&work);
    drop((lb, be));
    (percent, us_per_check)
}

/// Round trips of the status request (median, p99, max, in ms) while the agent's connection
/// table holds `entries` entries.
fn status_latency(entries: u32) -> (f64, f64, f64, String) {
    let (prefix, lb, be) = lb_and_backend("bst", ["198.51.100.1/24", "198.51.100.11/24"]);
    let work = std::env::temp_dir().join(format!("weir-bench-{prefix}"));
    std::fs::create_dir_all(&work).expect("workdir");
    let bpffs = format!("/sys/fs/bpf/weir-bench-{prefix}");
    let socket = work.join("weir.sock");
    let mut cfg = format!(
        "[agent]\ninterface = \"bst0\"\ntunnel_source = \"198.51.100.1\"\nconntrack_entries = {}\n\
         api_socket = \"{}\"\nstate_file = \"{}\"\nbpffs = \"{bpffs}\"\nmetrics = \"127.0.0.1:9652\"\n\
         [[service]]\nname = \"web\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n",
        entries * 2,
        socket.display(),
        work.join("state.json").display()
    );
    for i in 0..10 {
        let _ = write!(
            cfg,
            "[[service.backend]]\naddress = \"198.51.100.{}\"\n",
            11 + i
        );
    }
    let cfg_path = work.join("agent.toml");
    std::fs::write(&cfg_path, cfg).expect("config");
    // The owner's debug log says when each walk finished and how long it took.
    let mut agent = common::spawn_cmd_nsenter(
        lb.name(),
        "env",
        &[
            "RUST_LOG=info,weir::agent::owner=debug",
            common::weir_bin(),
            "agent",
            "--config",
            cfg_path.to_str().expect("path"),
        ],
    )
    .expect("agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while weir::api::request(&socket, &weir::api::Request::Status {}).is_err() {
        assert!(
            Instant::now() < deadline,
            "agent did not start:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Fill the table: counted TCP flows of backend id 0 (the first backend), seen now.
    let table = aya::maps::MapData::from_pin(format!("{bpffs}/CONNTRACK")).expect("pinned table");
    let now = weir::sys::monotonic_coarse_ns();
    let keys: Vec<FlowKey> = (0..entries)
        .map(|i| FlowKey {
            src_addr: {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&(0xc633_6400u32 | (i >> 16)).to_be_bytes());
                a
            },
            dst_addr: {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&[203, 0, 113, 10]);
                a
            },
            src_port_be: ((i & 0xffff) as u16).to_be(),
            dst_port_be: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            family: lb_common::FAMILY_V4,
            _pad: [0; 2],
        })
        .collect();
    let values = vec![
        FlowValue {
            backend_id: 0,
            generation: 1,
            last_seen_ns: now,
            flags: lb_common::FLOW_COUNTED,
        };
        keys.len()
    ];
    let filled = Instant::now();
    // SAFETY: the pinned CONNTRACK map's key and value types are FlowKey and FlowValue.
    unsafe { weir::sys::map_update_batch(std::os::fd::AsFd::as_fd(table.fd()), &keys, &values) }
        .expect("fill the table");
    println!("filled {entries} entries in {:?}", filled.elapsed());
    let mut times = Vec::new();
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(20) {
        let t = Instant::now();
        let resp = weir::api::request(&socket, &weir::api::Request::Status {}).expect("status");
        assert!(resp.ok);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = agent.stop();
    let log = agent.log();
    let walks: Vec<String> = log
        .lines()
        .filter(|l| l.contains("connection counts recounted") && l.contains("entries=1000000"))
        .filter_map(|l| {
            l.split("walk_ms=")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .collect();
    println!("table walks (ms): {walks:?}");
    let walks = walks.join(", ");
    let _ = datapath::teardown(Path::new(&bpffs));
    let _ = std::fs::remove_dir_all(&work);
    drop((lb, be));
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.99), times[times.len() - 1], walks)
}

fn main() {
    // A run stopped from outside still removes its namespaces.
    common::remove_on_signal().expect("signal handling");
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
        "| backends in the service | backend down -> maps, median | max | back up, median | down, ring built on the spot (no precompute), median | ring slots a down verdict writes (one batch) |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, (ahead, building)) in &rows {
        let _ = writeln!(
            table,
            "| {n} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {} |",
            ahead.down_median, ahead.down_max, ahead.up_median, building.down_median, ahead.slots
        );
    }
    let _ = writeln!(
        table,
        "\nServices of up to {} serving backends get their one-backend-down rings computed ahead on a blocking thread; larger ones build on the spot.",
        weir::reconcile::rings::PRECOMPUTE_MAX_BACKENDS
    );
    // `cargo bench --bench agent -- verdict`: only the first part (no namespaces, seconds).
    if std::env::args().any(|a| a == "verdict") {
        println!("{table}");
        return;
    }
    let (median, p99, max, walks) = status_latency(1_000_000);
    let _ = writeln!(
        table,
        "\n`weir status` round trip with 1,000,000 connection-table entries, every 50 ms for 20 s: median {median:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (the agent's table walks meanwhile took {walks} ms each, on a blocking thread)."
    );
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
            "{existing}\n## Control plane (`cargo xtask bench agent`)\n\nA health verdict is applied by `Balancer::apply` on the real maps (65537-slot ring, only changed slots written); the agent's CPU is measured from /proc/PID/stat while it checks 1,000 backends.\n\n{section}\n"
        ),
    };
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("warning: cannot write {}: {e}", path.display());
    }
}
