//! Privileged end-to-end tests of the agent (issue 3): health checks that take backends out
//! and back, SIGKILL and restart without losing a byte (pinning and adoption), draining, hot
//! reload of an invalid config, the CLI against a running agent, the JSON API's answers to
//! malformed requests, and the metrics as a real Prometheus server sees them.
//!
//! Every test builds its own topology (see `common/mod.rs`): client, switch, LB and three
//! backend namespaces on veth pairs, torn down by `Drop` guards even on failure. The agent
//! runs in the LB namespace (`nsenter --net`, so its pins live in the host's bpffs under
//! `/sys/fs/bpf/weir-test-*`, removed by the topology's teardown). Needs root; skipped
//! otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_agent -- --test-threads=1 --nocapture`

mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    Backend, ConfigBuilder, EchoServers, HealthCheck, Prometheus, Servers, ServiceBuilder,
    Topology, VIP_V4, backend_v4, dashboard,
};
use serde_json::Value;
use weir::api::Request;

const PORT: u16 = 7;

/// The health checks of the timing tests: TCP/UDP/HTTP every 200 ms, 100 ms timeout, two
/// results to change state.
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(100);
const RISE: u32 = 2;
const FALL: u32 = 2;
/// The checker scales every interval by a random factor in [0.9, 1.1) (health.rs), so `n`
/// intervals take at most `n × 1.1 × interval`.
const JITTER_MAX: f64 = 1.1;
const JITTER_MIN: f64 = 0.9;
/// Scheduling margin on top of the designed bound: the owner task's sync, the metrics scrape
/// that observes the change (polled every 10 ms), two busy cores.
const MARGIN: Duration = Duration::from_millis(150);

fn health(kind: &str) -> HealthCheck {
    HealthCheck::new(kind)
        .interval(INTERVAL)
        .timeout(TIMEOUT)
        .rise(RISE)
        .fall(FALL)
}

/// Upper bound for `fall` (or `rise`) consecutive results: `n` jittered intervals plus one
/// check timeout plus the margin.
fn transition_bound(n: u32) -> Duration {
    INTERVAL.mul_f64(f64::from(n) * JITTER_MAX) + TIMEOUT + MARGIN
}

/// One service of a test config: direct forwarding (L2 DSR) on the IPv4 VIP, Maglev, with
/// backends 1..=N (198.51.100.11...) of the given weights.
fn service(name: &str, protocol: &str, port: u16, weights: &[u32]) -> ServiceBuilder {
    weights.iter().enumerate().fold(
        ServiceBuilder::new(name, VIP_V4, port, protocol)
            .scheduler("maglev")
            .forwarding("direct"),
        |s, (i, w)| s.backend(Backend::weighted(backend_v4(i), *w)),
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

/// Sends a request to the topology's agent; panics unless it succeeds; returns `data` as
/// JSON (what scripts see).
fn api_ok(topo: &Topology, req: &Request) -> Value {
    let resp = topo
        .api(req)
        .unwrap_or_else(|e| panic!("API {req:?}: {e:#}"));
    assert!(resp.ok, "API {req:?} failed: {:?}", resp.error);
    serde_json::to_value(resp.data.expect("data")).expect("JSON")
}

fn service_table(topo: &Topology, service: &str) -> Value {
    api_ok(
        topo,
        &Request::ServiceTable {
            service: service.to_owned(),
        },
    )
}

/// `backend_list` of a service without the traffic counters and connection counts (which
/// move with any packet).
fn backend_config(topo: &Topology, service: &str) -> Vec<Value> {
    let list = api_ok(
        topo,
        &Request::BackendList {
            service: Some(service.to_owned()),
        },
    );
    list.as_array()
        .expect("backend list")
        .iter()
        .map(|b| {
            let mut b = b.clone();
            if let Some(o) = b.as_object_mut() {
                for k in ["packets", "bytes", "new_flows", "active_connections"] {
                    o.remove(k);
                }
            }
            b
        })
        .collect()
}

/// The `backend_list` entry of one backend.
fn backend_info(topo: &Topology, service: &str, address: IpAddr) -> Value {
    let list = api_ok(
        topo,
        &Request::BackendList {
            service: Some(service.to_owned()),
        },
    );
    list.as_array()
        .expect("backend list")
        .iter()
        .find(|b| b["address"] == address.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no backend {address} in {list}"))
}

fn new_flows(topo: &Topology, service: &str, address: IpAddr) -> u64 {
    backend_info(topo, service, address)["new_flows"]
        .as_u64()
        .expect("new_flows")
}

/// `weir_backend_up{service, backend}` from a fresh scrape of the agent's `/metrics`.
fn backend_up(topo: &Topology, service: &str, backend: IpAddr) -> Option<f64> {
    let samples = topo.metrics().ok()?;
    common::metric(
        &samples,
        "weir_backend_up",
        &[("service", service), ("backend", &backend.to_string())],
    )
}

/// Polls `weir_backend_up` every 10 ms until it equals `want` or `limit` passes; returns
/// when it was first seen (since `since`), or None.
fn wait_backend_up(
    topo: &Topology,
    service: &str,
    backend: IpAddr,
    want: f64,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        if backend_up(topo, service, backend) == Some(want) {
            return Some(since.elapsed());
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Waits (up to 10 s) until every backend of `service` in `backends` reports up.
fn wait_all_up(topo: &Topology, service: &str, backends: &[usize]) {
    for &i in backends {
        let b = IpAddr::V4(backend_v4(i));
        assert!(
            wait_backend_up(
                topo,
                service,
                b,
                1.0,
                Instant::now(),
                Duration::from_secs(10)
            )
            .is_some(),
            "{service} backend {b} did not come up within 10 s: {:?}",
            backend_info(topo, service, b)
        );
    }
}

/// `weir ARGS... --socket SOCKET`: (exit code, stdout, stderr).
fn weir_cli(topo: &Topology, args: &[&str]) -> (i32, String, String) {
    let socket = topo.api_socket();
    let mut v = vec![common::weir_bin()];
    v.extend_from_slice(args);
    v.push("--socket");
    v.push(socket.to_str().expect("utf-8 socket path"));
    common::run_status(&v).expect("run weir")
}

/// `weir ARGS...` that must succeed; returns stdout.
fn weir_cli_ok(topo: &Topology, args: &[&str]) -> String {
    let (code, out, err) = weir_cli(topo, args);
    assert_eq!(
        code,
        0,
        "`weir {}` exited {code}: {err}{out}",
        args.join(" ")
    );
    let shown = if out.len() > 300 {
        format!("({} bytes of output)", out.len())
    } else {
        out.trim_end().to_owned()
    };
    println!("$ weir {}\n{shown}", args.join(" "));
    out
}

/// One finished connection of a `Connector`: when, from which source port, and how.
type ConnResult = (Instant, u16, Result<(), String>);

/// What a `Streamer` reports: bytes sent, bytes echoed intact, and how it ended.
type StreamResult = (u64, u64, Result<(), String>);

/// A client that opens one TCP connection after another to VIP:port from successive source
/// ports until stopped (or 30 s, or the port range ends), recording when each finished and
/// whether it got its echo.
struct Connector {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<ConnResult>>>,
}

impl Connector {
    fn start(topo: &Topology, port: u16, src_ports: std::ops::Range<u16>, tag: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tag = tag.to_owned();
        let handle = common::spawn_in_netns(&topo.cli, "connector", {
            let stop = stop.clone();
            move || {
                let started = Instant::now();
                let mut results = Vec::new();
                for src in src_ports {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                    let r = common::tcp_echo_once(vip(port), src, &tag, Duration::from_secs(2))
                        .map_err(|e| format!("{e:#}"));
                    results.push((Instant::now(), src, r));
                    thread::sleep(Duration::from_millis(2));
                }
                results
            }
        })
        .expect("connector thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<ConnResult> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("connector thread panicked")
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn failures(results: &[ConnResult]) -> Vec<String> {
    results
        .iter()
        .filter_map(|(_, p, r)| r.as_ref().err().map(|e| format!("src port {p}: {e}")))
        .collect()
}

/// Streams data over one long-lived TCP connection through the VIP: writes 4 KiB chunks of a
/// position-dependent pattern and checks every echoed byte, until stopped (or 60 s).
struct Streamer {
    stop: Arc<AtomicBool>,
    /// Bytes sent and echoed back intact so far.
    pub echoed: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<StreamResult>>,
}

impl Streamer {
    fn start(topo: &Topology, port: u16, src_port: u16) -> Self {
        let mut stream =
            common::tcp_connect(&topo.cli, vip(port), src_port, Duration::from_secs(2))
                .expect("long-lived connection");
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let handle = thread::spawn({
            let (stop, echoed) = (stop.clone(), echoed.clone());
            move || {
                let started = Instant::now();
                let mut sent: u64 = 0;
                let mut buf = vec![0u8; 4096];
                let mut got = vec![0u8; 4096];
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = ((sent + i as u64) % 251) as u8;
                    }
                    if let Err(e) = stream.write_all(&buf) {
                        return (
                            sent,
                            echoed.load(Ordering::SeqCst),
                            Err(format!("send: {e}")),
                        );
                    }
                    sent += buf.len() as u64;
                    if let Err(e) = stream.read_exact(&mut got) {
                        return (
                            sent,
                            echoed.load(Ordering::SeqCst),
                            Err(format!("read: {e}")),
                        );
                    }
                    if got != buf {
                        return (
                            sent,
                            echoed.load(Ordering::SeqCst),
                            Err(format!(
                                "corrupted echo after {} bytes",
                                echoed.load(Ordering::SeqCst)
                            )),
                        );
                    }
                    echoed.fetch_add(got.len() as u64, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(2));
                }
                (sent, echoed.load(Ordering::SeqCst), Ok(()))
            }
        });
        Self {
            stop,
            echoed,
            handle: Some(handle),
        }
    }

    /// (bytes sent, bytes echoed intact, error).
    fn finish(mut self) -> StreamResult {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("streamer thread panicked")
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// =============================================================================================
// Health checks
// =============================================================================================

/// TCP health check (200 ms, timeout 100 ms, rise 2, fall 2): stopping backend 1's server
/// takes it down within fall × 1.1 × interval + timeout (+ margin), after which 200 new
/// connections all succeed (on the other two); started again, it is back after rise
/// successes, no sooner than (rise - 1) × 0.9 × interval and within rise × 1.1 × interval
/// (+ margin), and takes new flows again.
#[test]
fn health_tcp_backend_stop_and_start() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("hc").expect("topology");
    let mut echo: Vec<Option<EchoServers>> = (0..common::BACKENDS)
        .map(|i| Some(topo.start_backend_echo(i, PORT).expect("echo server")))
        .collect();
    let config = agent_config(
        &topo,
        [service("web", "tcp", PORT, &[1, 1, 1]).health_check(health("tcp"))],
    );
    let _agent = topo.start_agent(&config).expect("agent");
    wait_all_up(&topo, "web", &[0, 1, 2]);
    let warm = topo
        .tcp_flows(VIP_V4.into(), PORT, 31_000..31_060, "hc-warm")
        .expect("flows");
    println!("[health-tcp] {}", warm.summary());
    warm.assert_all_ok();

    let b1 = IpAddr::V4(backend_v4(0));
    // Stop backend 1: once the drop returns, its listener is closed.
    drop(echo[0].take());
    let stopped = Instant::now();
    let down = wait_backend_up(&topo, "web", b1, 0.0, stopped, Duration::from_secs(5));
    let down_bound = transition_bound(FALL);
    println!(
        "[health-tcp] backend {b1} stopped: weir_backend_up 0 after {down:?} (bound: fall {FALL} × \
         interval {INTERVAL:?} × jitter {JITTER_MAX} + timeout {TIMEOUT:?} + margin {MARGIN:?} = {down_bound:?})"
    );
    let down = down.expect("backend never went down");
    assert!(
        down <= down_bound,
        "down after {down:?}, bound {down_bound:?}"
    );
    let info = backend_info(&topo, "web", b1);
    assert_eq!(info["health"], "down", "{info}");
    assert_eq!(info["up"], false, "{info}");
    assert_eq!(info["slots"], 0, "{info}");

    let flows_before = new_flows(&topo, "web", b1);
    let report = topo
        .tcp_flows(VIP_V4.into(), PORT, 31_100..31_300, "hc-down")
        .expect("flows");
    println!("[health-tcp] with {b1} down: {}", report.summary());
    report.assert_all_ok();
    assert_eq!(report.ok_count(), 200);
    assert_eq!(
        new_flows(&topo, "web", b1),
        flows_before,
        "the down backend got new flows"
    );

    // Start it again: up after `rise` successful checks.
    echo[0] = Some(topo.start_backend_echo(0, PORT).expect("echo server again"));
    let started = Instant::now();
    let up = wait_backend_up(&topo, "web", b1, 1.0, started, Duration::from_secs(5));
    let up_bound = transition_bound(RISE);
    let up_floor = INTERVAL.mul_f64(f64::from(RISE - 1) * JITTER_MIN);
    println!(
        "[health-tcp] backend {b1} started: weir_backend_up 1 after {up:?} (expected {up_floor:?}..={up_bound:?}: \
         rise {RISE} checks, the first within one interval, the rest 0.9..1.1 × interval apart)"
    );
    let up = up.expect("backend never came back");
    assert!(up <= up_bound, "up after {up:?}, bound {up_bound:?}");
    // The scrape that saw it may lag a few ms, never lead: a rise of 2 needs two checks at
    // least 0.9 intervals apart.
    assert!(
        up >= up_floor,
        "up after only {up:?}: rise {RISE} not honoured"
    );
    let flows_before = new_flows(&topo, "web", b1);
    let report = topo
        .tcp_flows(VIP_V4.into(), PORT, 31_400..31_550, "hc-up")
        .expect("flows");
    report.assert_all_ok();
    let got = new_flows(&topo, "web", b1) - flows_before;
    println!(
        "[health-tcp] back up: {}; {b1} got {got} new flows",
        report.summary()
    );
    assert!(got > 0, "the backend is up again but gets no new flows");
}

/// UDP health check against a UDP echo on each backend's own address (port 5300): all come
/// up; stopping backend 1's echo takes it down, starting it brings it back. HTTP check
/// (port 8080, `expect_status = 200`) against a tiny server whose answer can be switched:
/// answering 503 the backend stays down, 200 brings it up, 503 again takes it down.
#[test]
fn health_udp_and_http() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("uh").expect("topology");
    let udp_hc_port = 5300;
    let http_port = 8080;
    let mut udp: Vec<Option<Servers>> = (0..common::BACKENDS)
        .map(|i| {
            Some(
                Servers::udp_echo(
                    &topo.backends[i],
                    SocketAddr::new(backend_v4(i).into(), udp_hc_port),
                )
                .expect("udp echo"),
            )
        })
        .collect();
    let status: Vec<Arc<AtomicU16>> = [503, 200, 200]
        .into_iter()
        .map(|s| Arc::new(AtomicU16::new(s)))
        .collect();
    let _http: Vec<Servers> = (0..common::BACKENDS)
        .map(|i| {
            Servers::http_status(&topo.backends[i], http_port, status[i].clone()).expect("http")
        })
        .collect();
    let udp_health = health("udp").port(udp_hc_port);
    let http_health = health("http")
        .port(http_port)
        .path("/healthz")
        .expect_status(200);
    let config = agent_config(
        &topo,
        [
            service("dns", "udp", 53, &[1, 1, 1]).health_check(udp_health),
            service("web", "tcp", 80, &[1, 1, 1]).health_check(http_health),
        ],
    );
    let _agent = topo.start_agent(&config).expect("agent");
    wait_all_up(&topo, "dns", &[0, 1, 2]);
    wait_all_up(&topo, "web", &[1, 2]);
    let b1 = IpAddr::V4(backend_v4(0));
    let b1_text = b1.to_string();

    // HTTP: backend 1 answers 503 and stays down (a dozen checks, ~2.4 s of them).
    let watch = Instant::now();
    while watch.elapsed() < INTERVAL * 12 {
        assert_eq!(
            backend_up(&topo, "web", b1),
            Some(0.0),
            "backend answering 503 (expect_status 200) counted as up"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let info = backend_info(&topo, "web", b1);
    assert_eq!(info["health"], "down", "{info}");
    let samples = topo.metrics().expect("metrics");
    let failed = common::metric(
        &samples,
        "weir_health_checks_total",
        &[
            ("service", "web"),
            ("backend", &b1_text),
            ("result", "failure"),
        ],
    )
    .unwrap_or(0.0);
    let succeeded = common::metric(
        &samples,
        "weir_health_checks_total",
        &[
            ("service", "web"),
            ("backend", &b1_text),
            ("result", "success"),
        ],
    )
    .unwrap_or(0.0);
    println!(
        "[health-http] {b1} answering 503: down, {failed} failed checks, {succeeded} successful"
    );
    assert!(failed >= 10.0, "only {failed} failed HTTP checks in 2.4 s");
    assert_eq!(succeeded, 0.0);

    // 200: a backend never seen healthy comes up on its first success.
    status[0].store(200, Ordering::SeqCst);
    let t = Instant::now();
    let up = wait_backend_up(&topo, "web", b1, 1.0, t, Duration::from_secs(5));
    let bound = transition_bound(1);
    println!(
        "[health-http] {b1} answering 200: up after {up:?} (bound {bound:?}: first success of a new backend)"
    );
    assert!(up.expect("never came up") <= bound);

    // 503 again: down after `fall` failures.
    status[0].store(503, Ordering::SeqCst);
    let t = Instant::now();
    let down = wait_backend_up(&topo, "web", b1, 0.0, t, Duration::from_secs(5));
    let bound = transition_bound(FALL);
    println!("[health-http] {b1} answering 503 again: down after {down:?} (bound {bound:?})");
    assert!(down.expect("never went down") <= bound);
    assert_eq!(
        backend_up(&topo, "web", IpAddr::V4(backend_v4(1))),
        Some(1.0),
        "the other backends stay up"
    );

    // UDP: stop backend 1's echo: ICMP port unreachable (or silence) fails the checks.
    drop(udp[0].take());
    let t = Instant::now();
    let down = wait_backend_up(&topo, "dns", b1, 0.0, t, Duration::from_secs(5));
    let bound = transition_bound(FALL);
    println!("[health-udp] {b1} echo stopped: down after {down:?} (bound {bound:?})");
    assert!(down.expect("never went down") <= bound);
    assert_eq!(backend_info(&topo, "dns", b1)["health"], "down");

    udp[0] = Some(
        Servers::udp_echo(&topo.backends[0], SocketAddr::new(b1, udp_hc_port)).expect("udp echo"),
    );
    let t = Instant::now();
    let up = wait_backend_up(&topo, "dns", b1, 1.0, t, Duration::from_secs(5));
    let bound = transition_bound(RISE);
    println!("[health-udp] {b1} echo started: up after {up:?} (bound {bound:?})");
    assert!(up.expect("never came up") <= bound);
    assert!(
        udp.iter()
            .flatten()
            .all(|s| s.served.load(Ordering::SeqCst) > 0),
        "every UDP echo answered checks"
    );
}

// =============================================================================================
// SIGKILL and adoption
// =============================================================================================

/// SIGKILL the agent while one long-lived TCP connection streams data and a client opens new
/// connections continuously for 5 s; start a replacement while the traffic flows. Zero failed
/// connections, zero bytes lost, forwarding goes on while no agent runs (the pins), and the
/// new agent adopts: `adopted: true`, the same backends and ring, the backend counters
/// continue from where they were.
#[test]
fn sigkill_restart_adopts_without_loss() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sk").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let health = HealthCheck::new("tcp")
        .interval(Duration::from_millis(500))
        .timeout(Duration::from_millis(200))
        .rise(2)
        .fall(3);
    let config = agent_config(
        &topo,
        [service("web", "tcp", PORT, &[1, 2, 3]).health_check(health)],
    );
    let config_path = topo.write_agent_config(&config).expect("config");
    let mut first = topo.start_agent_file(&config_path).expect("agent");
    wait_all_up(&topo, "web", &[0, 1, 2]);
    let status = api_ok(&topo, &Request::Status {});
    assert_eq!(status["adopted"], false, "{status}");
    let table_before = service_table(&topo, "web");
    let backends_before = backend_config(&topo, "web");

    let streamer = Streamer::start(&topo, PORT, 45_000);
    let connector = Connector::start(&topo, PORT, 20_000..40_000, "sk");
    let traffic_start = Instant::now();
    thread::sleep(Duration::from_secs(1));

    let metrics_before = topo.metrics().expect("metrics");
    let killed_at = Instant::now();
    let bytes_at_kill = streamer.echoed.load(Ordering::SeqCst);
    let st = first.kill();
    println!(
        "[sigkill] agent killed ({st:?}) after {:?} of traffic",
        traffic_start.elapsed()
    );
    assert!(
        common::xdp_attached(&topo.lb, common::NODE_IF).expect("ip link"),
        "the balancer must stay attached (pinned) after SIGKILL"
    );
    // No agent for a second: the pinned datapath forwards on its own.
    thread::sleep(Duration::from_secs(1));
    let bytes_without_agent = streamer.echoed.load(Ordering::SeqCst) - bytes_at_kill;

    let replacement_started = Instant::now();
    let mut second = topo
        .start_agent_file(&config_path)
        .expect("replacement agent");
    let ready_at = Instant::now();
    let gap = ready_at - killed_at;
    println!(
        "[sigkill] replacement answering {:?} after it was started, {gap:?} after the SIGKILL",
        ready_at - replacement_started
    );

    // Keep the traffic going: 5 s in all, and at least 1 s with the new agent.
    while traffic_start.elapsed() < Duration::from_secs(5)
        || ready_at.elapsed() < Duration::from_secs(1)
    {
        thread::sleep(Duration::from_millis(50));
    }
    let results = connector.finish();
    let (sent, echoed, stream_result) = streamer.finish();
    let traffic = traffic_start.elapsed();

    let during_gap = results
        .iter()
        .filter(|(t, _, r)| *t > killed_at && *t < ready_at && r.is_ok())
        .count();
    let fails = failures(&results);
    println!(
        "[sigkill] {} new connections in {traffic:?}, {} failed, {during_gap} completed while no agent answered; \
         long-lived connection: {sent} bytes sent, {echoed} echoed intact ({bytes_without_agent} in the second without agent)",
        results.len(),
        fails.len()
    );
    assert!(fails.is_empty(), "failed connections: {fails:?}");
    assert!(
        results.len() >= 500,
        "only {} connections in 5 s",
        results.len()
    );
    assert!(during_gap > 0, "no connection completed while no agent ran");
    stream_result.expect("the long-lived connection broke");
    assert_eq!(sent, echoed, "bytes lost on the long-lived connection");
    assert!(
        bytes_without_agent > 0,
        "the long-lived connection stalled without agent"
    );

    let status = api_ok(&topo, &Request::Status {});
    assert_eq!(status["adopted"], true, "{status}");
    assert_eq!(status["backends_up"], 3, "{status}");
    assert_eq!(
        service_table(&topo, "web"),
        table_before,
        "the adopted ring differs from the one before the SIGKILL"
    );
    assert_eq!(backend_config(&topo, "web"), backends_before);

    let metrics_after = topo.metrics().expect("metrics");
    for i in 0..common::BACKENDS {
        let b = backend_v4(i).to_string();
        let labels = [("service", "web"), ("backend", b.as_str())];
        for name in [
            "weir_backend_packets_total",
            "weir_backend_bytes_total",
            "weir_backend_new_flows_total",
        ] {
            let before = common::metric(&metrics_before, name, &labels).expect(name);
            let after = common::metric(&metrics_after, name, &labels).expect(name);
            println!(
                "[sigkill] {name}{{backend=\"{b}\"}}: {before} before the SIGKILL, {after} after the restart"
            );
            assert!(
                after > before,
                "{name} of {b} did not continue: {before} before, {after} after"
            );
        }
        assert_eq!(
            common::metric(&metrics_after, "weir_backend_up", &labels),
            Some(1.0)
        );
    }
    let log = second.log();
    let written = log
        .lines()
        .find(|l| l.contains("maps written"))
        .unwrap_or("<no \"maps written\" line>");
    println!("[sigkill] replacement agent: {written}");
    // Adoption rewrites no ring slot: the datapath already holds what the config asks for.
    assert!(
        written.contains("ring_slots=0 "),
        "the replacement rewrote ring slots while adopting: {written}"
    );
    let st = second.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "agent exit on SIGTERM: {st:?}"
    );
}

// =============================================================================================
// Drain
// =============================================================================================

/// `weir backend drain`: the drained backend gets no new flows (300 new connections all go
/// elsewhere) while its established connection keeps working; `enable` brings it back.
#[test]
fn drain_keeps_established_connection() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("dr").expect("topology");
    let servers = topo.start_echo_servers(PORT).expect("echo servers");
    let config = agent_config(&topo, [service("web", "tcp", PORT, &[1, 1, 1])]);
    let _agent = topo.start_agent(&config).expect("agent");
    servers.reset();
    let mut conn =
        common::tcp_connect(&topo.cli, vip(PORT), 46_000, Duration::from_secs(2)).expect("connect");
    let mut exchange = |round: usize| {
        let msg = format!("drain round {round}");
        conn.write_all(msg.as_bytes())
            .expect("send on the established connection");
        let mut got = vec![0u8; msg.len()];
        conn.read_exact(&mut got)
            .expect("echo on the established connection");
        assert_eq!(got, msg.as_bytes());
    };
    exchange(0);
    let counts = servers.tcp_counts();
    let target = counts
        .iter()
        .position(|&c| c == 1)
        .expect("one backend accepted the connection");
    assert_eq!(counts.iter().sum::<u64>(), 1, "{counts:?}");
    let addr = backend_v4(target).to_string();
    println!("[drain] the established connection is on backend {addr}");

    weir_cli_ok(&topo, &["backend", "drain", "web", &addr]);
    let info = backend_info(&topo, "web", addr.parse().unwrap());
    assert_eq!(info["admin"], "draining", "{info}");
    assert_eq!(info["slots"], 0, "{info}");
    assert_eq!(info["up"], true, "{info}");
    let flows_before = info["new_flows"].as_u64().unwrap();

    servers.reset();
    let report = topo
        .tcp_flows(VIP_V4.into(), PORT, 32_000..32_300, "drain")
        .expect("flows");
    for round in 1..=20 {
        exchange(round);
    }
    let counts = servers.tcp_counts();
    println!(
        "[drain] {}; per-backend connections {counts:?}",
        report.summary()
    );
    report.assert_all_ok();
    assert_eq!(
        counts[target], 0,
        "the drained backend got new connections: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<u64>(), 300);
    assert_eq!(new_flows(&topo, "web", addr.parse().unwrap()), flows_before);

    weir_cli_ok(&topo, &["backend", "enable", "web", &addr]);
    servers.reset();
    let report = topo
        .tcp_flows(VIP_V4.into(), PORT, 32_300..32_600, "enabled")
        .expect("flows");
    exchange(21);
    report.assert_all_ok();
    let counts = servers.tcp_counts();
    println!("[drain] enabled again: per-backend connections {counts:?}");
    assert!(
        counts[target] > 50,
        "the re-enabled backend gets too few flows: {counts:?}"
    );
}

// =============================================================================================
// Reload
// =============================================================================================

/// An invalid config on reload is rejected three ways (`weir reload`, the API's `reload`,
/// SIGHUP): the answer names file, key and reason; traffic goes on without a failure; the
/// old config stays in force; `weir_reloads_total{result="failure"}` counts each and
/// `weir_config_last_reload_successful` is 0. A valid file afterwards reloads.
#[test]
fn invalid_reload_is_rejected() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("rl").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let svc = |weights: &[u32]| service("web", "tcp", PORT, weights);
    let good = agent_config(&topo, [svc(&[1, 1, 1])]);
    let path = topo.write_agent_config(&good).expect("config");
    let mut agent = topo.start_agent_file(&path).expect("agent");
    let services_before = api_ok(&topo, &Request::ServiceList {});
    let table_before = service_table(&topo, "web");
    let connector = Connector::start(&topo, PORT, 20_000..40_000, "rl");
    thread::sleep(Duration::from_millis(300));
    let file = path.display().to_string();

    // 1. `weir reload`: a ring size that is not prime.
    std::fs::write(
        &path,
        agent_config(&topo, [svc(&[1, 1, 1]).ring_size(65536)]).render(),
    )
    .expect("write");
    let (code, out, err) = weir_cli(&topo, &["reload"]);
    println!(
        "[reload] weir reload -> {code}: {}{}",
        err.trim(),
        out.trim()
    );
    assert_eq!(
        code, 78,
        "exit status of `weir reload` with an invalid file"
    );
    for part in [file.as_str(), "service[0].ring_size", "not prime"] {
        assert!(
            err.contains(part),
            "`weir reload` error lacks {part:?}: {err}"
        );
    }

    // 2. API `reload`: an unknown key.
    std::fs::write(&path, good.clone().raw("colour", "\"red\"").render()).expect("write");
    let resp = topo.api(&Request::Reload {}).expect("api");
    println!("[reload] API reload -> {resp:?}");
    assert!(!resp.ok);
    let error = resp.error.expect("error");
    assert_eq!(error.code, weir::api::ErrorCode::InvalidConfig);
    for part in [file.as_str(), "agent.colour", "unknown"] {
        assert!(
            error.message.contains(part),
            "API reload error lacks {part:?}: {}",
            error.message
        );
    }

    // 3. SIGHUP: a weight out of range.
    std::fs::write(&path, agent_config(&topo, [svc(&[70000, 1, 1])]).render()).expect("write");
    agent.signal(libc::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let samples = loop {
        let samples = topo.metrics().expect("metrics");
        if common::metric(&samples, "weir_reloads_total", &[("result", "failure")]) == Some(3.0) {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP reload not counted within 5 s"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let status = api_ok(&topo, &Request::Status {});
    let last = &status["last_reload"];
    println!("[reload] after SIGHUP: last_reload {last}");
    assert_eq!(last["ok"], false);
    let message = last["error"].as_str().expect("error text");
    for part in [file.as_str(), "service[0].backend[0].weight", "70000"] {
        assert!(
            message.contains(part),
            "SIGHUP reload error lacks {part:?}: {message}"
        );
    }
    assert_eq!(
        common::metric(&samples, "weir_reloads_total", &[("result", "success")]),
        Some(0.0)
    );
    assert_eq!(
        common::metric(&samples, "weir_config_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(api_ok(&topo, &Request::ServiceList {}), services_before);
    assert_eq!(
        service_table(&topo, "web"),
        table_before,
        "the ring changed"
    );

    // Traffic went on throughout.
    thread::sleep(Duration::from_millis(300));
    let results = connector.finish();
    let fails = failures(&results);
    println!(
        "[reload] {} connections during the reloads, {} failed",
        results.len(),
        fails.len()
    );
    assert!(fails.is_empty(), "{fails:?}");
    assert!(results.len() > 100);

    // A valid file reloads: weights 3:1:1.
    std::fs::write(&path, agent_config(&topo, [svc(&[3, 1, 1])]).render()).expect("write");
    let report = api_ok(&topo, &Request::Reload {});
    println!("[reload] valid file: {report}");
    let samples = topo.metrics().expect("metrics");
    assert_eq!(
        common::metric(&samples, "weir_config_last_reload_successful", &[]),
        Some(1.0)
    );
    assert_eq!(
        common::metric(&samples, "weir_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
    let table = service_table(&topo, "web");
    let counts: Vec<u64> = table["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    println!("[reload] ring slots after the valid reload: {counts:?}");
    assert!(
        counts[0] > 2 * counts[1],
        "weights 3:1:1 not applied: {counts:?}"
    );
}

// =============================================================================================
// CLI round trip
// =============================================================================================

/// The real `weir` CLI against the agent's socket: weight 1:1:1 -> 3:1:1, remove, add, each
/// visible in the traffic shares of 900 UDP flows with fixed source ports (each share within
/// ±25% of its ring share); the changes survive an agent restart on a fresh datapath (they
/// come from the state file).
#[test]
fn cli_round_trip_changes_traffic_shares() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("cl").expect("topology");
    let servers = topo.start_echo_servers(PORT).expect("echo servers");
    let config = agent_config(&topo, [service("udp", "udp", PORT, &[1, 1, 1])]);
    let path = topo.write_agent_config(&config).expect("config");
    let mut agent = topo.start_agent_file(&path).expect("agent");
    let addr = |i: usize| backend_v4(i).to_string();

    // 900 UDP flows from `base..base+900`; returns each backend's share and checks it
    // against the ring share the agent reports.
    let phase = |what: &str, base: u16| -> Vec<f64> {
        let ring: Vec<(String, u64)> = api_ok(
            &topo,
            &Request::BackendList {
                service: Some("udp".into()),
            },
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["slots"].as_u64().unwrap(),
            )
        })
        .collect();
        servers.reset();
        let report = topo
            .udp_flows(VIP_V4.into(), PORT, base..base + 900, what)
            .expect("flows");
        report.assert_all_ok();
        let counts = servers.udp_counts();
        let total: u64 = ring.iter().map(|(_, s)| s).sum();
        let shares: Vec<f64> = counts.iter().map(|&c| c as f64 / 900.0).collect();
        println!("[cli] {what}: per-backend flows {counts:?}, ring slots {ring:?}");
        for (i, &count) in counts.iter().enumerate() {
            let slots = ring
                .iter()
                .find(|(a, _)| *a == addr(i))
                .map_or(0, |(_, s)| *s);
            let expected = 900.0 * slots as f64 / total as f64;
            if slots == 0 {
                assert_eq!(
                    count,
                    0,
                    "{what}: backend {} has no slots but got flows",
                    addr(i)
                );
            } else {
                assert!(
                    (count as f64 - expected).abs() <= expected * 0.25,
                    "{what}: backend {} got {count} flows, ring share says {expected:.0} ±25%",
                    addr(i),
                );
            }
        }
        shares
    };

    let even = phase("weights 1:1:1", 40_000);
    weir_cli_ok(&topo, &["backend", "weight", "udp", &addr(0), "3"]);
    let weighted = phase("weights 3:1:1", 41_000);
    assert!(
        weighted[0] > even[0] * 1.5,
        "weight 3 did not raise the share of {}: {:.2} -> {:.2}",
        addr(0),
        even[0],
        weighted[0]
    );
    weir_cli_ok(&topo, &["backend", "remove", "udp", &addr(2)]);
    let removed = phase("backend 3 removed", 42_000);
    assert_eq!(removed[2], 0.0);
    weir_cli_ok(&topo, &["backend", "add", "udp", &addr(2), "--weight", "2"]);
    let added = phase("backend 3 added with weight 2", 43_000);
    assert!(
        added[2] > 0.2,
        "the added backend gets too few flows: {added:?}"
    );

    let list_json = weir_cli_ok(&topo, &["backend", "list", "udp", "-o", "json"]);
    let weights = |list: &Value| -> BTreeMap<String, u64> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap().to_owned(),
                    b["weight"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before: Value = serde_json::from_str(&list_json).expect("json");
    let want: BTreeMap<String, u64> = [(addr(0), 3), (addr(1), 1), (addr(2), 2)].into();
    assert_eq!(weights(&before), want);

    // Restart on a fresh datapath: only the state file can bring the changes back.
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
    topo.teardown_datapath().expect("teardown");
    let state = std::fs::read_to_string(topo.workdir.join("state.json")).expect("state file");
    println!("[cli] state file: {state}");
    let _agent = topo.start_agent_file(&path).expect("agent again");
    let status: Value =
        serde_json::from_str(&weir_cli_ok(&topo, &["status", "-o", "json"])).expect("json");
    assert_eq!(
        status["adopted"], false,
        "teardown should have left nothing to adopt"
    );
    let after: Value = serde_json::from_str(&weir_cli_ok(
        &topo,
        &["backend", "list", "udp", "-o", "json"],
    ))
    .expect("json");
    assert_eq!(
        weights(&after),
        want,
        "the CLI changes did not survive the restart"
    );
    let restarted = phase("after the restart", 44_000);
    assert!(restarted[0] > restarted[1] * 2.0, "{restarted:?}");
    assert!(restarted[2] > restarted[1], "{restarted:?}");
}

// =============================================================================================
// Malformed API requests
// =============================================================================================

/// Writes raw bytes to the API socket (then shuts the write side unless `keep_open`) and
/// returns the parsed answer.
fn raw_request(socket: &std::path::Path, bytes: &[u8], keep_open: bool) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The agent may answer and close before reading everything of an oversized request.
    let _ = s.write_all(bytes);
    if !keep_open {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    serde_json::from_str(answer.trim()).unwrap_or_else(|e| {
        panic!(
            "answer to {} bytes is not JSON ({e}): {answer:?}",
            bytes.len()
        )
    })
}

/// Malformed requests (not JSON, unknown fields, unknown command, wrong types, more than
/// 64 KiB, a client that never finishes) each get `ok: false`, code `bad_request` and a
/// message, and change nothing: ring, backends and state file stay as they were, and a
/// stalled client does not hold up others.
#[test]
fn api_rejects_malformed_requests() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("ap").expect("topology");
    let config = agent_config(&topo, [service("udp", "udp", PORT, &[1, 1, 1])]);
    let _agent = topo.start_agent(&config).expect("agent");
    let socket = topo.api_socket();
    let table_before = service_table(&topo, "udp");
    let backends_before = backend_config(&topo, "udp");
    let state_file = topo.workdir.join("state.json");
    assert!(!state_file.exists());

    // A client that sends half a request and stalls: the agent gives up on it after 5 s,
    // and answers everyone else meanwhile.
    let stalled = thread::spawn({
        let socket = socket.clone();
        move || {
            let t = Instant::now();
            (raw_request(&socket, b"{\"cmd\":", true), t.elapsed())
        }
    });

    let b1 = backend_v4(0);
    let huge_name = "a".repeat(100 * 1024);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"this is not json\n".to_vec()),
        ("empty line", b"\n".to_vec()),
        ("no cmd", b"{}\n".to_vec()),
        ("unknown cmd", b"{\"cmd\":\"explode\"}\n".to_vec()),
        ("unknown field", b"{\"cmd\":\"status\",\"extra\":1}\n".to_vec()),
        (
            "unknown field on a change",
            format!("{{\"cmd\":\"backend_weight\",\"service\":\"udp\",\"address\":\"{b1}\",\"weight\":3,\"force\":true}}\n").into_bytes(),
        ),
        (
            "wrong type",
            format!("{{\"cmd\":\"backend_weight\",\"service\":\"udp\",\"address\":\"{b1}\",\"weight\":\"heavy\"}}\n").into_bytes(),
        ),
        (
            "bad address",
            b"{\"cmd\":\"backend_add\",\"service\":\"udp\",\"address\":\"not-an-ip\"}\n".to_vec(),
        ),
        (
            "truncated JSON",
            b"{\"cmd\":\"backend_remove\",\"service\":\"udp\"\n".to_vec(),
        ),
        (
            "huge (100 KiB) change",
            format!("{{\"cmd\":\"backend_add\",\"service\":\"{huge_name}\",\"address\":\"198.51.100.14\"}}\n").into_bytes(),
        ),
        (
            "huge valid JSON over 64 KiB",
            format!("{{\"cmd\":\"backend_remove\",\"service\":\"udp\",\"address\":\"{b1}\"{}}}\n", " ".repeat(70 * 1024)).into_bytes(),
        ),
        ("huge without newline", vec![b'x'; 200 * 1024]),
    ];
    for (what, bytes) in &cases {
        let t = Instant::now();
        let answer = raw_request(&socket, bytes, false);
        let message = answer["error"]["message"].as_str().unwrap_or("");
        println!(
            "[api] {what} ({} bytes) -> {answer} in {:?}",
            bytes.len(),
            t.elapsed()
        );
        assert_eq!(answer["ok"], false, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{what}: {answer}");
        assert!(message.len() > 10, "{what}: no useful message: {answer}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{what}: answered slowly"
        );
    }
    assert!(
        api_ok(&topo, &Request::Status {})["pid"].is_u64(),
        "the agent still answers"
    );
    let (answer, took) = stalled.join().expect("stalled client");
    println!("[api] stalled client -> {answer} after {took:?}");
    assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
    assert!(took < Duration::from_secs(8));

    assert_eq!(
        service_table(&topo, "udp"),
        table_before,
        "a malformed request changed the ring"
    );
    assert_eq!(backend_config(&topo, "udp"), backends_before);
    assert!(
        !state_file.exists(),
        "a malformed request wrote the state file"
    );
}

// =============================================================================================
// Prometheus
// =============================================================================================

/// The agent, a UDP service and a TCP service with health checks (so every metric family has
/// series), and a real Prometheus in the LB namespace scraping it every second.
fn prometheus_setup(tag: &str) -> (Topology, EchoServers, common::ChildGuard, Prometheus) {
    let topo = Topology::build(tag).expect("topology");
    let servers = topo.start_echo_servers(PORT).expect("echo servers");
    let config = agent_config(
        &topo,
        [
            service("udp", "udp", PORT, &[1, 1, 1]),
            service("web", "tcp", PORT, &[1, 1, 1]).health_check(health("tcp")),
        ],
    );
    let agent = topo.start_agent(&config).expect("agent");
    let prometheus = Prometheus::start(&topo).expect("prometheus");
    let t = Instant::now();
    prometheus
        .wait_scrapes(1, Duration::from_secs(20))
        .expect("first scrape");
    println!(
        "[prometheus] ready; first scrape of the agent after {:?}",
        t.elapsed()
    );
    (topo, servers, agent, prometheus)
}

/// 600 UDP datagrams over 600 flows: after a scrape, Prometheus' `weir_backend_packets_total`
/// of each backend equals the datagrams its echo server received. `promtool check metrics`
/// finds no problem in a real scrape.
#[test]
fn prometheus_counts_match_traffic() {
    if !common::require_root() {
        return;
    }
    let (topo, servers, _agent, prometheus) = prometheus_setup("pm");
    servers.reset();
    let report = topo
        .udp_flows(VIP_V4.into(), PORT, 40_000..40_600, "prom")
        .expect("flows");
    report.assert_all_ok();
    let counts = servers.udp_counts();
    let sent_by: BTreeMap<String, f64> = (0..common::BACKENDS)
        .map(|i| (backend_v4(i).to_string(), counts[i] as f64))
        .collect();
    let done = common::unix_now();
    prometheus
        .wait_scrape_after(done, Duration::from_secs(10))
        .expect("scrape");
    let packets = dashboard::by_backend(
        &prometheus
            .query("weir_backend_packets_total{service=\"udp\"}")
            .expect("query"),
    );
    let flows = dashboard::by_backend(
        &prometheus
            .query("weir_backend_new_flows_total{service=\"udp\"}")
            .expect("query"),
    );
    let service = prometheus
        .query("weir_service_packets_total{service=\"udp\"}")
        .expect("query");
    println!(
        "[prometheus] {}; sent per backend {sent_by:?}; Prometheus: packets {packets:?}, new flows {flows:?}, service packets {}",
        report.summary(),
        service[0]["value"][1]
    );
    assert_eq!(
        packets, sent_by,
        "weir_backend_packets_total vs datagrams sent"
    );
    assert_eq!(flows, sent_by, "weir_backend_new_flows_total vs flows sent");
    assert_eq!(service[0]["value"][1], "600");

    let text = topo.metrics_text().expect("scrape");
    let (code, out, err) =
        common::run_with_input(&["promtool", "check", "metrics"], text.as_bytes())
            .expect("promtool");
    println!(
        "[prometheus] promtool check metrics on {} bytes -> {code} {out}{err}",
        text.len()
    );
    assert_eq!(code, 0, "promtool: {out}{err}");
    assert!(
        out.trim().is_empty() && err.trim().is_empty(),
        "promtool: {out}{err}"
    );
}

/// Every PromQL expression of `config/grafana/weir-dashboard.json`, variables substituted
/// (`$service` etc. -> `.*`, `$__rate_interval` etc. -> `1m`), returns data from a real
/// Prometheus scraping a real agent with traffic.
#[test]
fn grafana_dashboard_queries_return_data() {
    if !common::require_root() {
        return;
    }
    let path = dashboard::path();
    if !path.exists() {
        eprintln!("SKIPPED: no dashboard at {}", path.display());
        return;
    }
    let dashboard = dashboard::load().expect("dashboard JSON");
    let exprs = dashboard::all_exprs(&dashboard);
    assert!(!exprs.is_empty(), "no targets[].expr in {}", path.display());

    let (topo, _servers, _agent, prometheus) = prometheus_setup("gd");
    // Traffic over a few scrapes, so that rate() over 1m has samples to work with.
    for round in 0..3_u16 {
        topo.udp_flows(
            VIP_V4.into(),
            PORT,
            40_000 + round * 200..40_200 + round * 200,
            "gd",
        )
        .expect("udp")
        .assert_all_ok();
        topo.tcp_flows(
            VIP_V4.into(),
            PORT,
            30_000 + round * 100..30_100 + round * 100,
            "gd",
        )
        .expect("tcp")
        .assert_all_ok();
        thread::sleep(Duration::from_millis(1100));
    }
    prometheus
        .wait_scrape_after(common::unix_now(), Duration::from_secs(10))
        .expect("scrape");
    prometheus
        .wait_scrapes(4, Duration::from_secs(10))
        .expect("scrapes for rate()");

    let mut empty = Vec::new();
    for expr in &exprs {
        let promql = dashboard::substitute(expr, "1m");
        match prometheus.query(&promql) {
            Ok(result) if !result.is_empty() => {
                println!("[dashboard] {} series: {promql}", result.len());
            }
            Ok(_) => empty.push(format!("no data: {expr}\n    (as evaluated: {promql})")),
            Err(e) => empty.push(format!("error: {expr}\n    ({e:#})")),
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} dashboard expressions return nothing:\n  {}",
        empty.len(),
        exprs.len(),
        empty.join("\n  ")
    );
}

#[test]
fn grafana_variable_substitution() {
    assert_eq!(
        dashboard::substitute(
            "rate(x{service=~\"$service\",b=~\"${backend}\"}[$__rate_interval])",
            "1m"
        ),
        "rate(x{service=~\".*\",b=~\".*\"}[1m])"
    );
    assert_eq!(
        dashboard::substitute("a[${__range}] $ 1", "1m"),
        "a[1m] $ 1"
    );
}

/// The audit records of the topology's agent, without the file-created marker.
fn audit_records(topo: &Topology) -> Vec<Value> {
    std::fs::read_to_string(topo.audit_log())
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .filter(|r| r["what"] != "audit_file_created")
        .collect()
}

/// Waits (up to 5 s: the writer thread is asynchronous) for a record matching `pred`.
fn wait_record(topo: &Topology, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Some(r) = audit_records(topo)
            .into_iter()
            .find(|r| r["what"] == what && pred(r))
        {
            return r;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("no {what} record in {:#?}", audit_records(topo));
}

#[test]
fn audit_log_records_each_change_kind() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("au").expect("topology");
    let _servers: Vec<EchoServers> = (0..common::BACKENDS)
        .map(|i| topo.start_backend_echo(i, PORT).expect("echo server"))
        .collect();
    let svc = |weights: &[u32]| service("web", "tcp", PORT, weights).health_check(health("tcp"));
    let config = agent_config(&topo, [svc(&[1, 1, 1])]);
    let path = topo.write_agent_config(&config).expect("config");
    let mut agent = topo.start_agent_file(&path).expect("agent");
    wait_all_up(&topo, "web", &[0, 1, 2]);
    let b0 = backend_v4(0).to_string();
    let uid = nix_uid();

    // Start, and the health transitions that brought the backends up.
    let start = wait_record(&topo, "agent_start", |_| true);
    assert_eq!(start["who"]["kind"], "agent");
    let health = wait_record(&topo, "health", |r| r["target"] == format!("web/{b0}"));
    assert_eq!(health["who"]["source"], "health_check");
    assert_eq!(health["after"], "up");

    // A CLI change over the Unix socket: who is the CLI's uid (SO_PEERCRED), with a pid.
    weir_cli_ok(&topo, &["backend", "weight", "web", &b0, "3"]);
    let change = wait_record(&topo, "backend_weight", |_| true);
    assert_eq!(change["who"]["kind"], "unix");
    assert_eq!(change["who"]["uid"], uid);
    assert!(
        change["who"]["pid"].as_u64().is_some_and(|p| p > 0),
        "{change}"
    );
    assert_eq!(change["target"], format!("web/{b0}"));
    assert_eq!(change["before"]["weight"], 1);
    assert_eq!(change["after"]["weight"], 3);
    assert_eq!(change["result"], "ok");

    // A refused change is recorded as an error with the agent's message.
    let (code, _, _) = weir_cli(&topo, &["backend", "drain", "web", "198.51.100.99"]);
    assert_eq!(code, 67);
    let refused = wait_record(&topo, "backend_drain", |_| true);
    assert_eq!(refused["result"], "error");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("no backend"))
    );

    // A reload through the CLI, with its diff summary; and one by SIGHUP.
    std::fs::write(&path, agent_config(&topo, [svc(&[1, 2])]).render()).expect("write");
    weir_cli_ok(&topo, &["reload"]);
    let reload = wait_record(&topo, "reload", |r| r["who"]["kind"] == "unix");
    assert_eq!(reload["who"]["uid"], uid);
    assert_eq!(
        reload["diff"]["backends_removed"],
        serde_json::json!([format!("web/{}", backend_v4(2))])
    );
    assert_eq!(
        reload["diff"]["backends_changed"],
        serde_json::json!([format!("web/{}", backend_v4(1))])
    );
    agent.signal(libc::SIGHUP).expect("SIGHUP");
    let hup = wait_record(&topo, "reload", |r| r["who"]["source"] == "sighup");
    assert_eq!(hup["result"], "ok");

    // Stop, then teardown: the CLI records its own line.
    agent.stop();
    wait_record(&topo, "agent_stop", |_| true);
    let bpffs = topo.bpffs();
    let log = topo.audit_log();
    let (code, out, err) = common::run_status(&[
        common::weir_bin(),
        "teardown",
        "--bpffs",
        bpffs.to_str().unwrap(),
        "--audit-log",
        log.to_str().unwrap(),
    ])
    .expect("run weir teardown");
    assert_eq!(code, 0, "{out}{err}");
    let teardown = wait_record(&topo, "teardown", |_| true);
    assert_eq!(teardown["who"]["kind"], "cli");
    assert_eq!(teardown["who"]["uid"], uid);
    assert_eq!(teardown["result"], "ok");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&log).expect("audit log").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

fn nix_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// SHA-256 of a token's text, as `[[api.token]] sha256` wants it.
fn sha256_hex(text: &str) -> String {
    weir::api::remote::token_hash(text)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `ip netns exec LB weir ARGS... --server https://127.0.0.1:9443 --token-file FILE
/// --ca-file CERT`: (exit code, stdout, stderr).
fn weir_remote(
    topo: &Topology,
    token_file: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let cert = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/api-test.crt");
    let mut v = vec!["ip", "netns", "exec", topo.lb.as_str(), common::weir_bin()];
    v.extend_from_slice(args);
    v.extend_from_slice(&[
        "--server",
        "https://127.0.0.1:9443",
        "--token-file",
        token_file.to_str().unwrap(),
        "--ca-file",
        cert,
    ]);
    common::run_status(&v).expect("run weir")
}

#[test]
fn remote_api_refuses_bad_tokens_and_plaintext() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("ra").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data");
    let mut text = agent_config(&topo, [service("web", "tcp", PORT, &[1, 1, 1])]).render();
    text.push_str(&format!(
        "\n[api]\nlisten = \"127.0.0.1:9443\"\ncert = \"{data}/api-test.crt\"\n\
         key = \"{data}/api-test.key\"\n\
         [[api.token]]\nname = \"viewer\"\nscope = \"read\"\nsha256 = \"{}\"\n\
         [[api.token]]\nname = \"ops\"\nscope = \"admin\"\nsha256 = \"{}\"\n",
        sha256_hex("read-secret"),
        sha256_hex("admin-secret")
    ));
    let path = topo.write_file("remote.toml", &text).expect("config");
    let _agent = topo.start_agent_file(&path).expect("agent");
    let token = |name: &str, secret: &str| {
        topo.write_file(name, &format!("{secret}\n"))
            .expect("token")
    };
    let (admin, read, wrong) = (
        token("admin.token", "admin-secret"),
        token("read.token", "read-secret"),
        token("wrong.token", "guess"),
    );
    let b0 = backend_v4(0).to_string();
    let change = ["backend", "weight", "web", b0.as_str(), "4"];

    // A wrong token: 401, exit 77; a read-only token asking for a change: 403, exit 77.
    let (code, _, err) = weir_remote(&topo, &wrong, &change);
    assert_eq!(code, 77, "{err}");
    let (code, _, err) = weir_remote(&topo, &read, &change);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("read-only"), "{err}");
    // The read-only token may read; the admin token may change.
    let (code, out, err) = weir_remote(&topo, &read, &["backend", "list", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&b0), "{out}");
    let (code, _, err) = weir_remote(&topo, &admin, &change);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        backend_info(&topo, "web", backend_v4(0).into())["weight"],
        4
    );

    // No token at all, and plaintext HTTP to the TLS port.
    let curl = |args: &[&str]| {
        let mut v = vec![
            "ip",
            "netns",
            "exec",
            topo.lb.as_str(),
            "curl",
            "-sS",
            "--max-time",
            "5",
        ];
        v.extend_from_slice(args);
        common::run_status(&v).expect("run curl")
    };
    let (_, status, _) = curl(&[
        "--cacert",
        &format!("{data}/api-test.crt"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "--data",
        "{\"cmd\":\"reload\"}",
        "https://127.0.0.1:9443/v1/request",
    ]);
    assert_eq!(status, "401");
    let (code, out, err) = curl(&[
        "-H",
        "Authorization: Bearer admin-secret",
        "-X",
        "POST",
        "--data",
        "{\"cmd\":\"reload\"}",
        "http://127.0.0.1:9443/v1/request",
    ]);
    assert_ne!(code, 0, "plaintext HTTP got an answer: {out}{err}");
    assert!(!out.contains("\"ok\""), "{out}");

    // Every refusal and the change are in the audit log with who asked.
    let refused = |pred: &dyn Fn(&Value) -> bool| {
        wait_record(&topo, "backend_weight", |r| {
            r["result"] == "refused" && pred(r)
        })
    };
    refused(&|r| r["who"]["kind"] == "anonymous");
    let forbidden = refused(&|r| r["who"]["name"] == "viewer");
    assert_eq!(forbidden["who"]["kind"], "token");
    wait_record(&topo, "reload", |r| {
        r["result"] == "refused" && r["who"]["kind"] == "anonymous"
    });
    let made = wait_record(&topo, "backend_weight", |r| r["result"] == "ok");
    assert_eq!(made["who"]["kind"], "token");
    assert_eq!(made["who"]["name"], "ops");
    assert_eq!(made["after"]["weight"], 4);
    assert!(
        !audit_records(&topo)
            .iter()
            .any(|r| r["what"] == "reload" && r["result"] == "ok"),
        "the plaintext reload was made"
    );
}
