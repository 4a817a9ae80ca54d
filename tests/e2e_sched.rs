//! Privileged end-to-end tests of the schedulers and of the flow lifecycle, with real TCP and
//! UDP traffic between network namespaces (see `common/mod.rs` for the topology): the shares
//! each scheduler gives, least-conn steering away from a loaded backend and its connection
//! counts returning to zero, backup activation and return, slow start, and idle expiry of
//! tracked flows. The backends run `IdServer`s, whose answers name the backend, so every flow
//! is attributed exactly; where the scheduler is deterministic (Maglev and ip-hash over the
//! flow hash, round robin on one CPU) the counts must be exactly what `common::predict`
//! computes with the datapath's and the agent's code. Needs root; skipped otherwise (fails in
//! CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_sched -- --nocapture`

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use common::{
    Backend, CLIENT_V4, ConfigBuilder, HealthCheck, ServiceBuilder, Topology, VIP_V4, backend_v4,
    predict, wait_until,
};
use weir::api::{BackendInfo, Health, Request};

/// TCP health checks of the backup and slow-start tests.
fn health() -> HealthCheck {
    HealthCheck::new("tcp")
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_millis(100))
        .rise(2)
        .fall(2)
}

/// Backends 1..=3 of weight 1, none a backup.
const EVEN: &[(u32, bool)] = &[(1, false), (1, false), (1, false)];

/// One service of a test config: IPv4 VIP, direct forwarding (L2 DSR: no decap needed),
/// backends 1..=N with the given (weight, backup).
fn service(
    name: &str,
    port: u16,
    protocol: &str,
    scheduler: &str,
    backends: &[(u32, bool)],
) -> ServiceBuilder {
    backends.iter().enumerate().fold(
        ServiceBuilder::new(name, VIP_V4, port, protocol)
            .scheduler(scheduler)
            .forwarding("direct"),
        |s, (i, (weight, backup))| {
            s.backend(Backend::weighted(backend_v4(i), *weight).backup(*backup))
        },
    )
}

fn agent_config(
    topo: &Topology,
    services: impl IntoIterator<Item = ServiceBuilder>,
) -> ConfigBuilder {
    services
        .into_iter()
        .fold(topo.agent_config(), ConfigBuilder::service)
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), port)
}

/// `backend_list` of one service.
fn backend_list(topo: &Topology, service: &str) -> Vec<BackendInfo> {
    let req = Request::BackendList {
        service: Some(service.to_owned()),
    };
    let resp = topo
        .api(&req)
        .unwrap_or_else(|e| panic!("API {req:?}: {e:#}"));
    assert!(resp.ok, "API {req:?} failed: {:?}", resp.error);
    resp.data.expect("data").try_into().expect("backend list")
}

/// The `backend_list` entry of backend `i` (0-based) of a service.
fn backend(topo: &Topology, service: &str, i: usize) -> BackendInfo {
    let address = IpAddr::V4(backend_v4(i));
    backend_list(topo, service)
        .into_iter()
        .find(|b| b.address == address)
        .unwrap_or_else(|| panic!("no backend {address} in service {service}"))
}

/// Waits until the health of every backend of `service` is as given ("up"/"down").
fn wait_health(topo: &Topology, service: &str, want: &[&str], timeout: Duration) {
    wait_until(&format!("{service} health {want:?}"), timeout, || {
        let list = backend_list(topo, service);
        (0..want.len())
            .all(|i| {
                let address = IpAddr::V4(backend_v4(i));
                list.iter()
                    .any(|b| b.address == address && b.health.as_str() == want[i])
            })
            .then_some(())
    });
}

/// Opens TCP connections to `dst` from successive ports of `ports` until `count` of them
/// landed on backend `index` (0-based); keeps those open and closes the others at once.
/// Returns the kept connections, the attempts, and how many landed on each backend.
fn hold_on(
    topo: &Topology,
    dst: SocketAddr,
    index: u8,
    count: usize,
    ports: std::ops::Range<u16>,
) -> (Vec<TcpStream>, u32, Vec<u64>) {
    let (held, attempts, landed) = common::in_netns(&topo.cli, move || {
        let mut held = Vec::new();
        let mut landed = vec![0u64; common::BACKENDS];
        let mut attempts = 0u32;
        let deadline = Instant::now() + Duration::from_secs(30);
        for src in ports {
            if held.len() == count || Instant::now() > deadline {
                break;
            }
            attempts += 1;
            let (stream, id) = common::id_tcp_connect_here(dst, src, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connection from port {src}: {e:#}"));
            if let Some(n) = landed.get_mut(usize::from(id)) {
                *n += 1;
            }
            if id == index {
                held.push(stream);
            }
        }
        (held, attempts, landed)
    });
    assert_eq!(
        held.len(),
        count,
        "could not hold {count} connections on backend {} ({attempts} attempts: {landed:?})",
        index + 1
    );
    (held, attempts, landed)
}

/// Sends a request to the topology's agent; panics unless it succeeds.
fn api_ok(topo: &Topology, req: &Request) {
    let resp = topo
        .api(req)
        .unwrap_or_else(|e| panic!("API {req:?}: {e:#}"));
    assert!(resp.ok, "API {req:?} failed: {:?}", resp.error);
}

/// `active_connections` of every backend of a service, by address.
fn active(topo: &Topology, service: &str) -> Vec<(IpAddr, u64)> {
    backend_list(topo, service)
        .iter()
        .map(|b| (b.address, b.active_connections))
        .collect()
}

/// Asserts the flows per backend are exactly the predicted ones, printing both with the
/// shares.
fn assert_exact(what: &str, counts: &[u64], predicted: &[u64]) {
    let total: u64 = counts.iter().sum();
    let shares: Vec<String> = counts
        .iter()
        .map(|&c| format!("{:.1}%", c as f64 * 100.0 / total.max(1) as f64))
        .collect();
    println!("[shares] {what}: counts {counts:?} of {total} = {shares:?}, predicted {predicted:?}");
    assert_eq!(
        counts, predicted,
        "{what}: flows per backend differ from the prediction"
    );
}

/// Shares of every scheduler over UDP flows from one client address, all services on one
/// agent: Maglev 1:1:2 and round robin 1:2:3 exactly as predicted, least-conn 1:1:1 within
/// bounds (its two choices are random draws), and ip-hash's affinity to the predicted backend.
#[test]
fn shares_per_scheduler() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sh").expect("topology");
    const MAGLEV: u16 = 7001;
    const IP_HASH: u16 = 7002;
    const RR: u16 = 7003;
    const LEAST: u16 = 7004;
    let mg = service(
        "mg",
        MAGLEV,
        "udp",
        "maglev",
        &[(1, false), (1, false), (2, false)],
    );
    let iph = service("iph", IP_HASH, "udp", "ip-hash", EVEN);
    let rr = service(
        "rr",
        RR,
        "udp",
        "round-robin",
        &[(1, false), (2, false), (3, false)],
    );
    let config = agent_config(
        &topo,
        [
            mg.clone(),
            iph.clone(),
            rr.clone(),
            service("lc", LEAST, "udp", "least-conn", EVEN),
        ],
    );
    let client = IpAddr::V4(CLIENT_V4);
    let _servers: Vec<_> = [MAGLEV, IP_HASH, RR, LEAST]
        .iter()
        .map(|p| topo.start_id_servers(*p).expect("id servers"))
        .collect();
    let _agent = topo.start_agent(&config).expect("agent");
    let n = common::BACKENDS;

    // Maglev: 1200 flows. The ring holds exactly 1:1:2 of its slots (16384/16384/32769);
    // the flow hash and the ring are deterministic, so these ports always give the counts
    // lb-common's hash and the agent's ring predict (about 1:1:2, within the binomial spread
    // of a sample).
    let ports = 20_000..21_200;
    let r = common::id_udp_flows(&topo.cli, vip(MAGLEV), ports.clone());
    r.assert_all_ok();
    let predicted = predict::maglev_counts(&mg, &predict::ring_weights(&mg), client, ports);
    assert_exact("maglev 1:1:2", &r.counts(n), &predicted);

    // Round robin: the ring is the smooth sequence 1:2:3 (length 6) and each CPU walks it
    // with its own position. Sent from one CPU (XDP on veth runs on the sending CPU), 600
    // flows are 100 whole cycles from wherever that CPU's walk stands: exactly 100/200/300.
    common::pin_thread_to_cpu(0).expect("pin to CPU 0");
    let r = common::id_udp_flows(&topo.cli, vip(RR), 22_000..22_600);
    r.assert_all_ok();
    let predicted = predict::round_robin_counts(&predict::ring_weights(&rr), r.results.len());
    assert_exact("round-robin 1:2:3", &r.counts(n), &predicted);

    // Least-conn over UDP flows of one datagram each, equal weights: such a flow stays
    // half-open (README, "Floods") and never counts as a connection, so the two choices
    // are two weighted random draws; ±25% of the mean.
    let r = common::id_udp_flows(&topo.cli, vip(LEAST), 23_000..23_600);
    r.assert_all_ok();
    let lc = r.counts(n);
    println!("[shares] least-conn 1:1:1 over 600 UDP flows: {lc:?}");
    for (i, c) in lc.iter().enumerate() {
        assert!(
            (150..=250).contains(c),
            "least-conn: backend {} got {c} of 600 flows, expected 200 ±25% ({lc:?})",
            i + 1
        );
    }
    let active: Vec<u64> = backend_list(&topo, "lc")
        .iter()
        .map(|b| b.active_connections)
        .collect();
    println!("[shares] least-conn active_connections after the UDP flows: {active:?}");
    assert_eq!(
        active.iter().sum::<u64>(),
        0,
        "a one-datagram UDP flow is no active connection: {active:?}"
    );

    // ip-hash: one client address, so every flow goes to one backend, and again later.
    let first = common::id_udp_flows(&topo.cli, vip(IP_HASH), 21_000..21_200);
    first.assert_all_ok();
    let c1 = first.counts(n);
    let chosen = c1.iter().position(|c| *c > 0).expect("some backend");
    let predicted = predict::maglev_backend(&iph, &predict::ring_weights(&iph), client, 21_000);
    println!(
        "[shares] ip-hash, 200 flows from {CLIENT_V4}: {c1:?} (all on backend {}, predicted {})",
        chosen + 1,
        predicted + 1
    );
    assert_eq!(
        chosen, predicted,
        "ip-hash: the client's flows went to another backend than its source hash predicts"
    );
    assert_eq!(
        c1[chosen], 200,
        "ip-hash: the flows of one client went to several backends: {c1:?}"
    );
    let second = common::id_udp_flows(&topo.cli, vip(IP_HASH), 21_200..21_400);
    second.assert_all_ok();
    let c2 = second.counts(n);
    println!("[shares] ip-hash, 200 more flows, nothing changed: {c2:?}");
    assert_eq!(
        c2[chosen], 200,
        "ip-hash: with nothing changed, the client moved: first {c1:?}, then {c2:?}"
    );
}

/// Least-conn: a backend holding 20 long-lived TCP connections gets clearly fewer of the next
/// 100 new connections than its idle peers; after every connection closes (FIN), every
/// backend's active count returns to 0 (no drift).
#[test]
fn least_conn_avoids_the_loaded_backend_and_counts_return_to_zero() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("lc").expect("topology");
    const PORT: u16 = 7300;
    const HELD: usize = 20;
    let config = agent_config(&topo, [service("lc", PORT, "tcp", "least-conn", EVEN)]);
    let _servers = topo.start_id_servers(PORT).expect("id servers");
    let _agent = topo.start_agent(&config).expect("agent");
    let dst = vip(PORT);

    // Pin 20 connections to backend 1: connect from successive source ports, keep those that
    // land on it, close the others at once.
    let (mut held, attempts, landed) = hold_on(&topo, dst, 0, HELD, 24_000..25_000);
    println!(
        "[least-conn] {HELD} connections held on backend 1 after {attempts} attempts (landed per backend: {landed:?})"
    );
    let counts = wait_until(
        "backend 1 counting the held connections",
        Duration::from_secs(3),
        || {
            let c: Vec<u64> = backend_list(&topo, "lc")
                .iter()
                .map(|b| b.active_connections)
                .collect();
            (c == [HELD as u64, 0, 0]).then_some(c)
        },
    );
    println!("[least-conn] active_connections with {HELD} held: {counts:?}");

    // 100 new short connections (each closed before the next).
    let r = common::id_tcp_flows(&topo.cli, dst, 25_000..25_100);
    r.assert_all_ok();
    let got = r.counts(common::BACKENDS);
    let others_mean = (got[1] + got[2]) as f64 / 2.0;
    // Power of two choices: backend 1 wins only when both draws are backend 1 (1/3 × 1/3),
    // since its 20 connections exceed the others' 0 or 1.
    println!(
        "[least-conn] next 100 connections: measured {got:?}; power of two choices expects \
         about [11.1, 44.4, 44.4] (backend 1 only when both draws pick it, 1/9); an exact \
         minimum would give [0, 50, 50]"
    );
    assert!(
        (got[0] as f64) < others_mean / 2.0,
        "least-conn: the loaded backend got {} of 100, not clearly fewer than its peers' mean {others_mean} ({got:?})",
        got[0]
    );

    // Held connections still work, then close them all (FIN) and watch the counts.
    for (i, s) in held.iter_mut().enumerate() {
        common::id_tcp_echo(s, format!("held-{i}").as_bytes())
            .unwrap_or_else(|e| panic!("held connection {i}: {e:#}"));
    }
    drop(held);
    let closed = Instant::now();
    let zero_after = wait_until(
        "every active_connections count back to 0",
        Duration::from_secs(12),
        || {
            backend_list(&topo, "lc")
                .iter()
                .all(|b| b.active_connections == 0)
                .then(|| closed.elapsed())
        },
    );
    println!("[least-conn] all counts 0 {zero_after:.2?} after closing every connection");
    // And they stay there across a reconciliation (every 5 s).
    thread::sleep(Duration::from_millis(5_500));
    let after: Vec<u64> = backend_list(&topo, "lc")
        .iter()
        .map(|b| b.active_connections)
        .collect();
    println!("[least-conn] counts after a reconciliation period: {after:?}");
    assert_eq!(after, [0, 0, 0], "connection counts drifted");
}

/// A backup takes new flows only when every primary is down, and yields to the first
/// primary that recovers, while a flow established on it continues.
#[test]
fn backup_takes_over_when_primaries_fail_and_yields_on_recovery() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("bk").expect("topology");
    const PORT: u16 = 7100;
    let web = service(
        "web",
        PORT,
        "tcp",
        "maglev",
        &[(1, false), (1, false), (1, true)],
    )
    .health_check(health());
    let config = agent_config(&topo, [web.clone()]);
    let mut primary1 = Some(topo.start_id_server(0, PORT).expect("server 1"));
    let mut primary2 = Some(topo.start_id_server(1, PORT).expect("server 2"));
    let _backup = topo.start_id_server(2, PORT).expect("server 3");
    let _agent = topo.start_agent(&config).expect("agent");
    let dst = vip(PORT);
    let n = common::BACKENDS;
    wait_health(&topo, "web", &["up", "up", "up"], Duration::from_secs(5));
    let weights: Vec<u32> = backend_list(&topo, "web")
        .iter()
        .map(|b| b.effective_weight)
        .collect();
    println!("[backup] all healthy: effective weights {weights:?}");
    assert_eq!(weights, [1, 1, 0], "the backup must take no new flows");

    let ports = 26_000..26_060;
    let r = common::id_tcp_flows(&topo.cli, dst, ports.clone());
    r.assert_all_ok();
    let c = r.counts(n);
    // The ring of the two primaries (the backup at weight 0), as the agent builds it.
    let predicted = predict::maglev_counts(&web, &weights, IpAddr::V4(CLIENT_V4), ports);
    println!("[backup] primaries up: 60 new flows -> {c:?}, predicted {predicted:?}");
    assert_eq!(c[2], 0, "the backup got new flows while primaries were up");
    assert_eq!(
        c, predicted,
        "the primaries' flows differ from what their Maglev ring predicts"
    );

    // Both primaries fail.
    let stopped = Instant::now();
    drop(primary1.take());
    drop(primary2.take());
    wait_health(
        &topo,
        "web",
        &["down", "down", "up"],
        Duration::from_secs(5),
    );
    println!(
        "[backup] both primaries reported down {:.2?} after their servers stopped",
        stopped.elapsed()
    );
    let r = common::id_tcp_flows(&topo.cli, dst, 26_100..26_160);
    r.assert_all_ok();
    let c = r.counts(n);
    println!("[backup] primaries down: 60 new flows -> {c:?}");
    assert_eq!(
        c,
        [0, 0, 60],
        "with every primary down, the backup takes all"
    );
    // A connection established on the backup, kept across the recovery.
    let (mut on_backup, id) =
        common::id_tcp_connect(&topo.cli, dst, 26_500, Duration::from_secs(2)).expect("connect");
    assert_eq!(id, 2, "with every primary down, the backup takes all");
    common::id_tcp_echo(&mut on_backup, b"before recovery").expect("echo on the backup");

    // Primary 1 recovers.
    let restarted = Instant::now();
    let _primary1_again = topo.start_id_server(0, PORT).expect("server 1 again");
    wait_health(&topo, "web", &["up", "down", "up"], Duration::from_secs(5));
    println!(
        "[backup] primary 1 reported up {:.2?} after its server restarted",
        restarted.elapsed()
    );
    let r = common::id_tcp_flows(&topo.cli, dst, 26_200..26_260);
    r.assert_all_ok();
    let c = r.counts(n);
    println!("[backup] primary 1 back: 60 new flows -> {c:?}");
    assert_eq!(
        c,
        [60, 0, 0],
        "new flows must go to the recovered primary only"
    );
    common::id_tcp_echo(&mut on_backup, b"after recovery")
        .expect("the flow established on the backup must continue after the recovery");
    println!("[backup] the connection established on the backup still echoes");
    let weights: Vec<u32> = backend_list(&topo, "web")
        .iter()
        .map(|b| b.effective_weight)
        .collect();
    assert_eq!(weights, [1, 0, 0], "effective weights after the recovery");
}

/// Slow start: a backend that comes up ramps its effective weight from 1 to its configured
/// weight over `slow_start`.
#[test]
fn slow_start_ramps_the_effective_weight() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("ss").expect("topology");
    const PORT: u16 = 7200;
    const WEIGHT: u32 = 100;
    const RAMP: Duration = Duration::from_secs(6);
    let config = agent_config(
        &topo,
        [service(
            "web",
            PORT,
            "tcp",
            "maglev",
            &[(WEIGHT, false), (WEIGHT, false), (WEIGHT, false)],
        )
        .slow_start(RAMP)
        .health_check(health())],
    );
    let _others: Vec<_> = (1..3)
        .map(|i| topo.start_id_server(i, PORT).expect("server"))
        .collect();
    let _agent = topo.start_agent(&config).expect("agent");
    wait_health(&topo, "web", &["down", "up", "up"], Duration::from_secs(5));
    assert_eq!(
        backend(&topo, "web", 0).effective_weight,
        0,
        "down: weight 0"
    );

    let _first = topo.start_id_server(0, PORT).expect("server 1");
    let up_at = wait_until("backend 1 up", Duration::from_secs(5), || {
        (backend(&topo, "web", 0).health == Health::Up).then(Instant::now)
    });
    let at_up = backend(&topo, "web", 0).effective_weight;
    let mut samples = Vec::new();
    for t in [1.5, 3.0, 4.5] {
        let when = up_at + Duration::from_secs_f64(t);
        thread::sleep(when.saturating_duration_since(Instant::now()));
        let b = backend(&topo, "web", 0);
        samples.push((up_at.elapsed(), b.effective_weight));
    }
    let full_after = wait_until(
        "backend 1 at its full weight",
        RAMP + Duration::from_secs(3),
        || (backend(&topo, "web", 0).effective_weight == WEIGHT).then(|| up_at.elapsed()),
    );
    println!(
        "[slow-start] weight {WEIGHT}, slow_start {RAMP:?}: effective weight {at_up} when seen up; {}; {WEIGHT} (full) {full_after:.2?} after up",
        samples
            .iter()
            .map(|(t, w)| format!("{w} at {t:.2?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (t, w) in &samples {
        assert!(
            *w > 0 && *w < WEIGHT,
            "at {t:.2?} after coming up the effective weight is {w}, expected within the ramp (0 < w < {WEIGHT}): {samples:?}"
        );
    }
    assert!(
        samples.windows(2).all(|p| p[0].1 < p[1].1),
        "the effective weight must rise: {samples:?}"
    );
    assert!(
        full_after >= RAMP - Duration::from_millis(500),
        "full weight after {full_after:.2?}, before the {RAMP:?} ramp ended"
    );
}

/// A tracked UDP flow is forgotten after `udp_idle_timeout` and scheduled again: on a
/// round-robin service the same 5-tuple then goes to the next backend of the sequence. Also
/// a mid-flow TCP segment of a flow no one tracks counts as `untracked_midflow`.
#[test]
fn idle_udp_flow_expires_and_is_rescheduled() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("it").expect("topology");
    const UDP_PORT: u16 = 7400;
    const TCP_PORT: u16 = 7401;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let config = agent_config(
        &topo,
        [
            service("rr", UDP_PORT, "udp", "round-robin", EVEN).udp_idle_timeout(TIMEOUT),
            service("tcp", TCP_PORT, "tcp", "maglev", EVEN),
        ],
    );
    let _udp_servers = topo.start_id_servers(UDP_PORT).expect("id servers");
    let _tcp_servers = topo.start_id_servers(TCP_PORT).expect("id servers");
    let _agent = topo.start_agent(&config).expect("agent");
    // Round-robin positions are per CPU: send every datagram from one CPU, so each new
    // schedule takes the next position of one sequence.
    common::pin_thread_to_cpu(0).expect("pin to CPU 0");
    let expired_before = topo.global_counter("conntrack_idle_expired");

    let sock = common::id_udp_socket(&topo.cli, vip(UDP_PORT), 27_000).expect("socket");
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(common::id_udp_ask(&sock, format!("a{i}").as_bytes()).expect("answer"));
        thread::sleep(Duration::from_millis(200));
    }
    println!("[idle] 5 datagrams within 1 s from one source port -> backends {first:?}");
    assert!(
        first.iter().all(|b| *b == first[0]),
        "a tracked flow changed backend: {first:?}"
    );
    // The datapath refreshes `last_seen` at most once a second, so the entry can be up to
    // 1 s older than the last datagram: wait the timeout plus that plus a margin.
    let idle = TIMEOUT + Duration::from_millis(1_500);
    thread::sleep(idle);
    let again = common::id_udp_ask(&sock, b"after idle").expect("answer");
    let then = common::id_udp_ask(&sock, b"after idle 2").expect("answer");
    println!(
        "[idle] after {idle:?} idle (timeout {TIMEOUT:?}): the same 5-tuple -> backend {again}, then {then}"
    );
    assert_ne!(
        again, first[0],
        "after the idle timeout the flow should have been re-scheduled to the next backend"
    );
    assert_eq!(then, again, "the re-scheduled flow is tracked again");
    assert_eq!(
        usize::from(again),
        (usize::from(first[0]) + 1) % common::BACKENDS,
        "round robin 1:1:1 on one CPU: the next backend of the sequence"
    );
    let expired_after = topo.global_counter("conntrack_idle_expired");
    println!("[idle] conntrack_idle_expired {expired_before} -> {expired_after}");
    assert!(
        expired_after > expired_before,
        "conntrack_idle_expired did not rise"
    );
    let samples = topo.metrics().expect("metrics");
    let metric = common::metric(&samples, "weir_conntrack_idle_expired_total", &[])
        .expect("weir_conntrack_idle_expired_total");
    println!("[idle] weir_conntrack_idle_expired_total = {metric}");
    assert!(metric >= 1.0, "the metric did not count the expiry");

    // A lone ACK of a TCP connection no one made: the balancer does not know the flow.
    let midflow_before = topo.global_counter("untracked_midflow");
    common::send_raw_tcp_v4(
        &topo.cli,
        CLIENT_V4,
        27_100,
        SocketAddrV4::new(VIP_V4, TCP_PORT),
        0x10,
    )
    .expect("raw ACK");
    let midflow_after = wait_until("untracked_midflow to rise", Duration::from_secs(3), || {
        let v = topo.global_counter("untracked_midflow");
        (v > midflow_before).then_some(v)
    });
    println!("[idle] untracked_midflow {midflow_before} -> {midflow_after} after one lone ACK");
}

/// Connection counts stay exact when flows lose their table entry: the FIN of a connection
/// whose backend was disabled (the flow is re-picked) must not leave a phantom connection on
/// the backend it is re-picked to, and when a removed backend's id is given to a new backend,
/// the old backend's flows must neither count for the new one (agent reconciliation) nor be
/// subtracted from it when they close (datapath).
#[test]
fn counts_stay_exact_for_repicked_flows_and_reused_backend_ids() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("rc").expect("topology");
    const PORT: u16 = 7500;
    let config = agent_config(&topo, [service("lc", PORT, "tcp", "least-conn", EVEN)]);
    let _servers = topo.start_id_servers(PORT).expect("id servers");
    let _agent = topo.start_agent(&config).expect("agent");
    let dst = vip(PORT);
    let b = |i: usize| IpAddr::V4(backend_v4(i));
    let service = || "lc".to_owned();

    // 1. Five connections on backend 1; disable it (tracked flows are re-picked); close them.
    let (held, _, _) = hold_on(&topo, dst, 0, 5, 28_000..28_500);
    api_ok(
        &topo,
        &Request::BackendDisable {
            service: service(),
            address: b(0),
        },
    );
    drop(held);
    thread::sleep(Duration::from_millis(300));
    let after_disable = active(&topo, "lc");
    println!("[counts] 5 connections closed after their backend 1 was disabled: {after_disable:?}");
    assert!(
        after_disable.iter().all(|(_, c)| *c == 0),
        "closing re-picked flows left connections counted: {after_disable:?}"
    );

    // 2. Four connections on backend 2; remove it and add a new backend, which gets its id.
    let (held, _, _) = hold_on(&topo, dst, 1, 4, 28_500..29_000);
    let newcomer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 14));
    api_ok(
        &topo,
        &Request::BackendRemove {
            service: service(),
            address: b(1),
        },
    );
    api_ok(
        &topo,
        &Request::BackendAdd {
            service: service(),
            address: newcomer,
            weight: 1,
        },
    );
    let count_of = |address: IpAddr| {
        active(&topo, "lc")
            .into_iter()
            .find(|(a, _)| *a == address)
            .map_or(0, |(_, c)| c)
    };
    let inherited = count_of(newcomer);
    let added = Instant::now();
    // The agent recounts from the table every 5 s.
    let settled = wait_until(
        "the new backend's count to leave out the old backend's flows",
        Duration::from_secs(7),
        || (count_of(newcomer) == 0).then(|| added.elapsed()),
    );
    println!(
        "[counts] new backend {newcomer} on the removed backend's id: {inherited} right after the add, 0 after {settled:.2?} (reconciliation)"
    );
    drop(held);
    thread::sleep(Duration::from_millis(300));
    let after_close = active(&topo, "lc");
    println!("[counts] the old backend's 4 connections closed: {after_close:?}");
    assert!(
        after_close.iter().all(|(_, c)| *c == 0),
        "closing flows of a removed backend changed other counts: {after_close:?}"
    );
    thread::sleep(Duration::from_millis(5_500));
    let later = active(&topo, "lc");
    println!("[counts] after a reconciliation period: {later:?}");
    assert!(
        later.iter().all(|(_, c)| *c == 0),
        "connection counts drifted: {later:?}"
    );
}
