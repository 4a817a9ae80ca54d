//! The Grafana dashboard's seven checks, as in the study Weir grew from (three VMs behind a
//! balancer, a Grafana dashboard over Prometheus, seven black-box tests), in one privileged
//! test: the shipped dashboard's own queries, read from `config/grafana/weir-dashboard.json`
//! at run time, against a real Prometheus (Debian's, in the balancer's namespace, scraping the
//! agent every second) and a real agent balancing three Flask backends (`nat`, round robin,
//! HTTP health checks) in the test bed's NAT layout.
//!
//! * **Traffic per backend (3 checks):** after N requests, one connection each, the panel
//!   "Total traffic per backend (bytes, since start)" rises, for each backend, by exactly the
//!   HTTP traffic that backend exchanged with the client. In the NAT modes the datapath counts
//!   both directions of a backend's connections under that backend (it translates both), as
//!   Ethernet frames as received. "Exactly": nftables counters on the backend's interface
//!   count the client's packets to port 80 at ingress (netdev hook, before anything else in
//!   the backend sees them; IP bytes, so 14 bytes of Ethernet header are added per packet)
//!   and the backend's packets to the client at egress (netdev hook, after the Ethernet
//!   header is built: frame bytes); the panel must rise by the sum, and
//!   `weir_backend_packets_total` by the packets of both. And the backend's new flows
//!   (`weir_backend_new_flows_total`) rise by exactly the requests it answered (the answers
//!   name the backend).
//! * **Requests per second (1 check):** requests paced at a steady rate: the panel "Requests
//!   per second, all backends" reads that rate within 10%, evaluated inside the sending period.
//! * **UP/DOWN per backend (3 checks):** each backend's Flask stopped in turn: its series of
//!   "Backend state (UP/DOWN)" reads 0 within a scrape plus a health fall (the others stay
//!   1), and 1 again within a scrape plus a health rise once Flask is back.
//!
//! Grafana's `$service` is "All" (`.*`) and `$__rate_interval` is 4s, what Grafana makes of
//! it for a data source scraped every second (four scrape intervals) at dashboard ranges up
//! to about 50 minutes. Needs root; skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_dashboard -- --test-threads=1 --nocapture`

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{
    BACKENDS, Backend, ChildGuard, HealthCheck, Prometheus, ServiceBuilder, Topology, VIP_V4,
    backend_v4, dashboard, ns_exec,
};
use weir_testbed::webapp;

const HTTP_PORT: u16 = 80;
/// The backends' names (their answers to `/backend`).
const NAMES: [&str; BACKENDS] = ["A", "B", "C"];
const SCRAPE: Duration = Duration::from_secs(1);
const HC_INTERVAL: Duration = Duration::from_millis(500);
const HC_TIMEOUT: Duration = Duration::from_millis(400);
const FALL: u32 = 2;
const RISE: u32 = 2;
/// Grafana's `$__rate_interval` for a 1 s scrape interval.
const RATE_INTERVAL: &str = "4s";
/// The Ethernet header the datapath counts in a frame's bytes and the backend's IP-layer
/// counter does not (no VLAN tags in the test bed).
const ETHERNET_HEADER: u64 = 14;
/// Requests of the traffic check, and the paced rate and duration of the requests/s check.
const REQUESTS: usize = 150;
const RATE: f64 = 40.0;
const RATE_SECONDS: f64 = 12.0;

const UP_PANEL: &str = "Backend state (UP/DOWN)";
const TRAFFIC_PANEL: &str = "Total traffic per backend (bytes, since start)";
const RATE_PANEL: &str = "Requests per second, all backends";

/// Starts Flask as backend `i` and waits until it listens.
fn start_flask(topo: &Topology, app: &Path, i: usize) -> Result<ChildGuard> {
    let ns = &topo.backends[i];
    let args = webapp::args(app, NAMES[i], HTTP_PORT);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = common::spawn_cmd_in_ns(ns, webapp::PYTHON, &args)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_status() {
            bail!("flask in {ns} exited ({st}):\n{}", child.log());
        }
        if !ns_exec(ns, &["ss", "-Hltn", "sport", "= :80"])?
            .trim()
            .is_empty()
        {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!("flask in {ns} does not listen after 15 s:\n{}", child.log());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// nftables counters on backend `ns`'s interface: the client's TCP packets to port 80 at
/// ingress, the backend's to the client at egress.
fn add_counters(topo: &Topology, ns: &str) -> Result<()> {
    let (dev, client) = (common::NODE_IF, topo.client_v4());
    let rules = format!(
        "table netdev weirdash {{\n  chain ingress {{\n    type filter hook ingress device \"{dev}\" priority 0; policy accept;\n    \
         ip saddr {client} tcp dport {HTTP_PORT} counter\n  }}\n  \
         chain egress {{\n    type filter hook egress device \"{dev}\" priority 0; policy accept;\n    \
         ip daddr {client} tcp sport {HTTP_PORT} counter\n  }}\n}}\n"
    );
    let path = topo.write_file(&format!("{ns}.nft"), &rules)?;
    ns_exec(ns, &["nft", "-f", path.to_str().context("utf-8 path")?]).map(drop)
}

/// The (packets, bytes) of the counter in `chain` (`ingress` or `egress`).
fn counter(ns: &str, chain: &str) -> Result<(u64, u64)> {
    let out = ns_exec(ns, &["nft", "list", "chain", "netdev", "weirdash", chain])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    let after = |key: &str| -> Result<u64> {
        let i = words
            .iter()
            .position(|w| *w == key)
            .with_context(|| format!("no {key} in {out}"))?;
        words
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{key} in {out}"))
    };
    Ok((after("packets")?, after("bytes")?))
}

fn up_states(prom: &Prometheus, up_query: &str) -> BTreeMap<String, f64> {
    dashboard::by_backend(&prom.query(up_query).expect("UP/DOWN panel query"))
}

/// Polls the UP/DOWN panel until backend `i` reads `want`; returns how long that took.
fn wait_state(prom: &Prometheus, up_query: &str, i: usize, want: f64, bound: Duration) -> Duration {
    let key = backend_v4(i).to_string();
    let t = Instant::now();
    loop {
        let states = up_states(prom, up_query);
        if states.get(&key) == Some(&want) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < bound,
            "backend {} ({key}) did not read {want} in the UP/DOWN panel within {bound:?}: {states:?}",
            NAMES[i]
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// One `GET /backend` from the client through the VIP: the backend that answered.
fn ask(topo: &Topology) -> Result<usize> {
    let vip = SocketAddr::new(VIP_V4.into(), HTTP_PORT);
    let (status, body) = common::http_get(&topo.cli, vip, "/backend", Duration::from_secs(3))?;
    if status != 200 {
        bail!("status {status}: {body}");
    }
    NAMES
        .iter()
        .position(|n| *n == body.trim())
        .with_context(|| format!("answer {body:?} names no backend"))
}

#[test]
fn dashboard_panels_show_each_backend_state_traffic_and_the_request_rate() {
    if !common::require_root() {
        return;
    }
    let board = dashboard::load().expect("the dashboard");
    let up_query = dashboard::query(&board, UP_PANEL, RATE_INTERVAL).expect("UP/DOWN panel");
    let traffic_query =
        dashboard::query(&board, TRAFFIC_PANEL, RATE_INTERVAL).expect("traffic panel");
    let rate_query = dashboard::query(&board, RATE_PANEL, RATE_INTERVAL).expect("requests/s panel");
    println!(
        "[dashboard] UP/DOWN: {up_query}\n[dashboard] traffic: {traffic_query}\n[dashboard] requests/s: {rate_query}"
    );

    let topo = Topology::build_nat("db").expect("NAT topology");
    let app = webapp::write_app(&topo.workdir).expect("the Flask app");
    let mut flask: Vec<Option<ChildGuard>> = (0..BACKENDS)
        .map(|i| Some(start_flask(&topo, &app, i).expect("flask")))
        .collect();
    for b in &topo.backends {
        add_counters(&topo, b).expect("nft counters");
    }
    let service = (0..BACKENDS).fold(
        ServiceBuilder::new("web", VIP_V4, HTTP_PORT, "tcp")
            .scheduler("round-robin")
            .forwarding("nat")
            .health_check(
                HealthCheck::new("http")
                    .path("/backend")
                    .interval(HC_INTERVAL)
                    .timeout(HC_TIMEOUT)
                    .rise(RISE)
                    .fall(FALL),
            ),
        |s, i| s.backend(Backend::new(backend_v4(i))),
    );
    let _agent = topo
        .start_agent(&topo.agent_config().service(service))
        .expect("agent");
    let prom = Prometheus::start(&topo).expect("prometheus");
    prom.wait_scrapes(2, Duration::from_secs(30))
        .expect("scrapes");
    // Every backend up (the first checks pass), in the panel.
    let all_up = Duration::from_secs(10);
    for i in 0..BACKENDS {
        wait_state(&prom, &up_query, i, 1.0, all_up);
    }

    // Traffic per backend: N requests, one connection each.
    let traffic_before = dashboard::by_backend(&prom.query(&traffic_query).expect("traffic query"));
    let packets_query = "weir_backend_packets_total{service=\"web\"}";
    let flows_query = "weir_backend_new_flows_total{service=\"web\"}";
    let packets_before = dashboard::by_backend(&prom.query(packets_query).expect("query"));
    let flows_before = dashboard::by_backend(&prom.query(flows_query).expect("query"));
    let counters = || -> Vec<[(u64, u64); 2]> {
        topo.backends
            .iter()
            .map(|b| ["ingress", "egress"].map(|c| counter(b, c).expect("nft counter")))
            .collect()
    };
    let counters_before = counters();
    let mut answered = [0u64; BACKENDS];
    for _ in 0..REQUESTS {
        answered[ask(&topo).expect("request through the VIP")] += 1;
    }
    // The closing segments of the last connection, then a scrape after them.
    thread::sleep(Duration::from_millis(500));
    let counters_after = counters();
    prom.wait_scrape_after(common::unix_now(), Duration::from_secs(10))
        .expect("scrape");
    let traffic_after = dashboard::by_backend(&prom.query(&traffic_query).expect("traffic query"));
    let packets_after = dashboard::by_backend(&prom.query(packets_query).expect("query"));
    let flows_after = dashboard::by_backend(&prom.query(flows_query).expect("query"));
    let delta = |after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, key: &str| {
        after.get(key).copied().unwrap_or(f64::NAN) - before.get(key).copied().unwrap_or(0.0)
    };
    for i in 0..BACKENDS {
        let key = backend_v4(i).to_string();
        let [(in_packets, in_ip_bytes), (out_packets, out_bytes)] = [0, 1].map(|d| {
            (
                counters_after[i][d].0 - counters_before[i][d].0,
                counters_after[i][d].1 - counters_before[i][d].1,
            )
        });
        let received = in_ip_bytes + ETHERNET_HEADER * in_packets;
        let exchanged = received + out_bytes;
        let packets = in_packets + out_packets;
        let panel = delta(&traffic_after, &traffic_before, &key);
        println!(
            "[traffic] backend {} ({key}): answered {}, received {in_packets} packets ({received} \
             bytes), sent {out_packets} ({out_bytes} bytes); panel +{panel}, packets +{}, new \
             flows +{}",
            NAMES[i],
            answered[i],
            delta(&packets_after, &packets_before, &key),
            delta(&flows_after, &flows_before, &key)
        );
        assert!(answered[i] > 0, "backend {} answered nothing", NAMES[i]);
        assert_eq!(
            panel, exchanged as f64,
            "backend {}: the traffic panel rose by {panel} bytes, the backend exchanged \
             {exchanged} with the client",
            NAMES[i]
        );
        assert_eq!(
            delta(&packets_after, &packets_before, &key),
            packets as f64,
            "backend {}: packets",
            NAMES[i]
        );
        assert_eq!(
            delta(&flows_after, &flows_before, &key),
            answered[i] as f64,
            "backend {}: new flows vs requests answered",
            NAMES[i]
        );
    }

    // Requests per second: paced at RATE for RATE_SECONDS.
    let n = (RATE * RATE_SECONDS) as usize;
    let start = Instant::now();
    let first = common::unix_now();
    for k in 0..n {
        let due = start + Duration::from_secs_f64(k as f64 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        ask(&topo).expect("paced request");
    }
    let last = common::unix_now();
    let sent_rate = (n - 1) as f64 / (last - first);
    prom.wait_scrape_after(last, Duration::from_secs(10))
        .expect("scrape");
    // Inside the sending period: the window [at - 4s, at] holds only paced requests.
    let at = last - 1.0;
    let result = prom.query_at(&rate_query, at).expect("requests/s query");
    let shown: f64 = result
        .first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the requests/s panel shows nothing: {result:?}"));
    println!("[requests/s] sent {n} at {sent_rate:.2}/s; the panel shows {shown:.2}/s");
    assert!(
        (shown - sent_rate).abs() <= 0.1 * sent_rate,
        "the requests/s panel shows {shown:.2}, {sent_rate:.2} were sent per second"
    );

    // UP/DOWN per backend: stop each Flask in turn, then start it again.
    let jitter = HC_INTERVAL.mul_f64(1.1);
    let slack = Duration::from_secs(1);
    let down_bound = SCRAPE + jitter * FALL + HC_TIMEOUT + slack;
    let up_bound = SCRAPE + jitter * RISE + HC_TIMEOUT + slack;
    for i in 0..BACKENDS {
        drop(flask[i].take());
        let took = wait_state(&prom, &up_query, i, 0.0, down_bound);
        let states = up_states(&prom, &up_query);
        for j in (0..BACKENDS).filter(|j| *j != i) {
            assert_eq!(
                states.get(&backend_v4(j).to_string()),
                Some(&1.0),
                "backend {} went down with {}: {states:?}",
                NAMES[j],
                NAMES[i]
            );
        }
        flask[i] = Some(start_flask(&topo, &app, i).expect("flask again"));
        let back = wait_state(&prom, &up_query, i, 1.0, up_bound);
        println!(
            "[up/down] backend {}: DOWN in the panel {took:.2?} after its server stopped (bound \
             {down_bound:?}), UP {back:.2?} after it listened again (bound {up_bound:?})",
            NAMES[i]
        );
    }
}
