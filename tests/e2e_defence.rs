//! Privileged end-to-end tests of the balancer's defences: per-service source rules (`allow`
//! / `deny`), IPv4 and IPv6, with real TCP connections from several client addresses of the
//! test bed's client namespace, counted in the datapath and in `/metrics`, and changed by a
//! reload; rate limits on new flows (per source and per VIP), offered UDP flows at ten
//! times the limit from a raw socket, measured per second, and changed by a reload; and
//! connection limits (`max_connections` with a backup), with idle connections held open and
//! attributed to the backend that accepted them. Needs root; skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_defence -- --test-threads=1 --nocapture`

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{
    BACKENDS, Backend, ConfigBuilder, ServiceBuilder, Topology, VIP_V4, VIP_V6, backend_v4,
    backend_v6, ip,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const PORT: u16 = 7;
/// Connections per client address and case.
const TRIES: u16 = 5;
/// Shorter than Linux's first SYN retransmission (1 s): a refused connection sends exactly
/// one SYN, so the drop counters can be compared with the connections tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Client addresses beside the test bed's own (198.51.100.2, 2001:db8::2), on the same
/// veth: inside the allowed /25, outside it, and a second IPv6 address.
const OTHER_V4: &str = "198.51.100.3";
const OUTSIDE_V4: &str = "198.51.100.200";
const OTHER_V6: &str = "2001:db8::3";

/// A direct-mode (L2 DSR) TCP service on `vip`:7 over the three backends.
fn service(name: &str, vip: IpAddr, v4: bool) -> ServiceBuilder {
    (0..BACKENDS).fold(
        ServiceBuilder::new(name, vip, PORT, "tcp").forwarding("direct"),
        |s, i| {
            let addr: IpAddr = if v4 {
                backend_v4(i).into()
            } else {
                backend_v6(i).into()
            };
            s.backend(Backend::new(addr))
        },
    )
}

/// The rules under test: `web4` allows 198.51.100.0/25 and denies `deny4` (the client's
/// /32, more specific, when given); `web6` denies 2001:db8::2.
fn config(topo: &Topology, deny4: &[&str]) -> ConfigBuilder {
    let deny4: Vec<String> = deny4.iter().map(|d| format!("\"{d}\"")).collect();
    let mut web4 = service("web4", VIP_V4.into(), true).raw("allow", "[\"198.51.100.0/25\"]");
    if !deny4.is_empty() {
        web4 = web4.raw("deny", &format!("[{}]", deny4.join(", ")));
    }
    let web6 = service("web6", VIP_V6.into(), false).raw("deny", "[\"2001:db8::2\"]");
    topo.agent_config().service(web4).service(web6)
}

/// One echo exchange over a new connection from `src`:`port` to `dst` (run inside the client
/// namespace).
fn echo_from(src: IpAddr, port: u16, dst: SocketAddr) -> Result<()> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::new(src, port)))
        .with_context(|| format!("bind {src}:{port}"))?;
    s.connect_timeout(&SockAddr::from(dst), CONNECT_TIMEOUT)
        .context("connect")?;
    let mut stream: TcpStream = s.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let msg = format!("weir-rules/{src}/{port}").into_bytes();
    stream.write_all(&msg)?;
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).context("echo")?;
    if got != msg {
        bail!("echo mismatch");
    }
    Ok(())
}

/// Connections from `src` to `dst` that got their echo, of `TRIES` (source ports from
/// `first_port`).
fn answered(topo: &Topology, src: &str, dst: SocketAddr, first_port: u16) -> u16 {
    let src: IpAddr = src.parse().expect("address");
    common::in_netns(&topo.cli, || {
        (first_port..first_port + TRIES)
            .filter(|port| echo_from(src, *port, dst).is_ok())
            .count()
    })
    .try_into()
    .expect("count")
}

fn rule_packets(topo: &Topology, service: &str, action: &str, prefix: &str) -> f64 {
    let samples = topo.metrics().expect("metrics");
    common::metric(
        &samples,
        "weir_source_rule_packets_total",
        &[("service", service), ("action", action), ("prefix", prefix)],
    )
    .unwrap_or_else(|| panic!("no weir_source_rule_packets_total for {service} {action} {prefix}"))
}

/// IPv4: the client's own address is denied (its /32 beats the allowed /25), another address
/// of the /25 is answered, one outside it is refused. IPv6: the denied address is refused,
/// another is answered. Each refusal is one dropped SYN, counted by reason and by rule; the
/// admitted connections count once each at their allow rule (only the first packet of a
/// flow is judged). A reload without the deny admits the client.
#[test]
fn source_rules_allow_and_deny_v4_and_v6() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sr").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    for (addr, v6) in [(OTHER_V4, false), (OUTSIDE_V4, false), (OTHER_V6, true)] {
        let mut args = Vec::new();
        if v6 {
            args.push("-6");
        }
        let with_len = format!("{addr}/{}", if v6 { 64 } else { 24 });
        args.extend(["addr", "add", with_len.as_str(), "dev", common::NODE_IF]);
        if v6 {
            args.push("nodad");
        }
        ip(&topo.cli, &args).expect("client address");
    }
    let path = topo
        .write_agent_config(&config(&topo, &["198.51.100.2"]))
        .expect("config");
    let _agent = topo.start_agent_file(&path).expect("weir agent");
    let vip4 = SocketAddr::new(VIP_V4.into(), PORT);
    let vip6 = SocketAddr::new(VIP_V6.into(), PORT);

    let client4 = topo.client_v4().to_string();
    let client6 = topo.client_v6().to_string();
    let results = [
        (
            "v4 client (denied /32)",
            answered(&topo, &client4, vip4, 31_000),
        ),
        (
            "v4 other of the /25",
            answered(&topo, OTHER_V4, vip4, 31_100),
        ),
        (
            "v4 outside the /25",
            answered(&topo, OUTSIDE_V4, vip4, 31_200),
        ),
        (
            "v6 client (denied)",
            answered(&topo, &client6, vip6, 31_300),
        ),
        ("v6 other", answered(&topo, OTHER_V6, vip6, 31_400)),
    ];
    println!("[rules] answered of {TRIES}: {results:?}");
    assert_eq!(
        results.map(|(_, n)| n),
        [0, TRIES, 0, 0, TRIES],
        "connections answered per source: {results:?}"
    );
    let tries = u64::from(TRIES);
    assert_eq!(
        topo.global_counter("drop_source_denied"),
        2 * tries,
        "one dropped SYN per denied connection (v4 and v6)"
    );
    assert_eq!(
        topo.global_counter("drop_source_not_allowed"),
        tries,
        "one dropped SYN per connection from outside the allow list"
    );
    let per_rule = [
        rule_packets(&topo, "web4", "deny", "198.51.100.2/32"),
        rule_packets(&topo, "web4", "allow", "198.51.100.0/25"),
        rule_packets(&topo, "web6", "deny", "2001:db8::2/128"),
    ];
    println!("[rules] packets per rule (deny4, allow4, deny6): {per_rule:?}");
    assert_eq!(per_rule, [f64::from(TRIES); 3], "packets decided per rule");

    // Changed live: without the deny, the client's /25 admits it.
    let path = topo
        .write_agent_config(&config(&topo, &[]))
        .expect("config");
    assert_eq!(path, topo.workdir.join("agent.toml"));
    let resp = topo.api(&weir::api::Request::Reload {}).expect("reload");
    assert!(resp.ok, "reload: {:?}", resp.error);
    let after = answered(&topo, &client4, vip4, 31_500);
    println!("[rules] after the reload, the v4 client: {after} of {TRIES}");
    assert_eq!(after, TRIES, "the reload lifted the deny");
}

/// The rate-limited UDP services: `rl-src` on port 9 (per source, `source`), `rl-vip` on
/// port 10 (per VIP: 500 new flows/s with bursts of 25).
const RL_SRC_PORT: u16 = 9;
const RL_VIP_PORT: u16 = 10;
/// Offered new flows per second: ten times `rl-src`'s first limit.
const OFFERED: u64 = 10_000;

/// A direct-mode UDP service on `VIP_V4`:`port` over the three IPv4 backends, with `limit`
/// as its `[service.rate_limit]` table (TOML inline table text).
fn udp_service(name: &str, port: u16, limit: &str) -> ServiceBuilder {
    (0..BACKENDS)
        .fold(
            ServiceBuilder::new(name, VIP_V4, port, "udp").forwarding("direct"),
            |s, i| s.backend(Backend::new(backend_v4(i))),
        )
        .raw("rate_limit", limit)
}

/// `rl-src` limited to `per_source` new flows/s per source with bursts of `burst` (a
/// twentieth of a second's flows: the first second admits at most 5% more than the rate,
/// and a sender stalled for up to 50 ms loses nothing), and `rl-vip`.
fn rate_config(topo: &Topology, per_source: u64, burst: u64) -> ConfigBuilder {
    topo.agent_config()
        .service(udp_service(
            "rl-src",
            RL_SRC_PORT,
            &format!("{{ new_flows_per_source = {per_source}, source_burst = {burst} }}"),
        ))
        .service(udp_service(
            "rl-vip",
            RL_VIP_PORT,
            "{ new_flows_per_vip = 500, vip_burst = 25 }",
        ))
}

/// An IPv4 + UDP datagram from `src`:`sport` to `dst` with an 8-byte payload (UDP checksum
/// 0: none, which IPv4 allows).
fn udp_datagram(src: Ipv4Addr, sport: u16, dst: SocketAddrV4) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&36u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let sum = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&16u16.to_be_bytes());
    p[28..36].copy_from_slice(b"weir-rl!");
    p
}

/// Sends `OFFERED` datagrams a second for `duration` to `dst` through a raw socket (run in
/// the client namespace), each from a source port not used before by its source: every one
/// a new flow. The sources take turns. Paced against the clock (a late sender catches up),
/// and bounded: it gives up 2 s after `duration`. Tells `started` the instant it begins;
/// returns the datagrams sent.
fn offer_new_flows(
    sources: &[Ipv4Addr],
    dst: SocketAddrV4,
    duration: Duration,
    started: &std::sync::mpsc::Sender<Instant>,
) -> Result<u64> {
    let s = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let to = SockAddr::from(SocketAddr::V4(dst));
    let total = OFFERED * duration.as_secs();
    let start = Instant::now();
    started.send(start).context("the sampler is gone")?;
    let mut sent = 0u64;
    while sent < total && start.elapsed() < duration + Duration::from_secs(2) {
        let due = (start.elapsed().as_nanos() * u128::from(OFFERED) / 1_000_000_000)
            .min(u128::from(total)) as u64;
        while sent < due {
            let src = sources[(sent % sources.len() as u64) as usize];
            // 1024.. : at most 64,512 flows per source and run (a run sends at most 50,000).
            let sport = 1024 + (sent / sources.len() as u64 % 64_512) as u16;
            s.send_to(&udp_datagram(src, sport, dst), &to)
                .context("raw send")?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(sent)
}

/// (new flows admitted, new flows dropped by `limit`) of `service`, from the agent's stats.
fn rate_sample(topo: &Topology, service: &str, limit: &str) -> (u64, u64) {
    let resp = topo.api(&weir::api::Request::Stats {}).expect("API stats");
    assert!(resp.ok, "stats failed: {:?}", resp.error);
    let stats: weir::api::Stats = resp.data.expect("data").try_into().expect("stats");
    let admitted = stats
        .services
        .iter()
        .find(|s| s.service == service && s.backend.is_none())
        .map_or(0, |s| s.new_flows);
    let dropped = stats
        .rate_limited
        .iter()
        .find(|r| r.service == service && r.limit == limit)
        .map_or(0, |r| r.packets);
    (admitted, dropped)
}

/// Offers `OFFERED` new flows/s from `sources` to `service` for `secs` seconds and samples
/// its counters every second: the admitted new flows per second (normalised by each
/// window's measured length), and the totals (sent, admitted, dropped). A window runs from
/// the sender's first datagram, then between samples, each sample timed at the middle of
/// its API call (which takes some milliseconds).
fn measure(
    topo: &Topology,
    service: &str,
    limit: &str,
    sources: &'static [Ipv4Addr],
    port: u16,
    secs: u64,
) -> (Vec<f64>, u64, u64, u64) {
    let dst = SocketAddrV4::new(VIP_V4, port);
    let (a0, d0) = rate_sample(topo, service, limit);
    let duration = Duration::from_secs(secs);
    let (tx, rx) = std::sync::mpsc::channel();
    let sender = common::spawn_in_netns(&topo.cli, "rl-sender", move || {
        offer_new_flows(sources, dst, duration, &tx)
    })
    .expect("sender");
    let start = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the sender started");
    let mut last = (start, a0);
    let mut per_second = Vec::new();
    for i in 1..=secs {
        let at = start + Duration::from_secs(i);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let before = Instant::now();
        let (admitted, _) = rate_sample(topo, service, limit);
        let now = before + before.elapsed() / 2;
        let window = now.duration_since(last.0).as_secs_f64();
        per_second.push((admitted - last.1) as f64 / window);
        last = (now, admitted);
    }
    let sent = sender.join().expect("sender thread").expect("sender");
    // The last datagrams in flight reach the counters.
    std::thread::sleep(Duration::from_millis(300));
    let (a1, d1) = rate_sample(topo, service, limit);
    (per_second, sent, a1 - a0, d1 - d0)
}

fn assert_rate(what: &str, per_second: &[f64], lo: f64, hi: f64) {
    let shown: Vec<String> = per_second.iter().map(|r| format!("{r:.0}")).collect();
    println!("[rate] {what}: admitted per second {}", shown.join(", "));
    assert!(
        per_second.iter().all(|r| (lo..=hi).contains(r)),
        "{what}: admitted per second {shown:?}, not all within {lo}..={hi}"
    );
}

/// Sources the raw sender writes into its datagrams (inside the client namespace only; no
/// address is configured for them: the answers, ICMP port unreachables, go nowhere).
static SOURCE_A: [Ipv4Addr; 1] = [Ipv4Addr::new(198, 51, 100, 2)];
static SOURCE_B: [Ipv4Addr; 1] = [Ipv4Addr::new(198, 51, 100, 4)];
static SOURCES_CD: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 5),
    Ipv4Addr::new(198, 51, 100, 6),
];

/// The accuracy test: 1,000 new flows/s per source offered at 10,000/s for 5 s:
/// every second admits 900 to 1,100, and every flow not admitted is counted as dropped by
/// the per-source limit (globally, per service and in `/metrics`). A reload raises the limit
/// to 2,000/s with the agent running: the next flood from another source admits 1,800 to
/// 2,200 a second. The per-VIP limit (500/s) holds two sources at 10,000/s together to 450
/// to 550 a second.
#[test]
fn rate_limits_hold_at_ten_times_the_rate() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("rl").expect("topology");
    let path = topo
        .write_agent_config(&rate_config(&topo, 1000, 50))
        .expect("config");
    let _agent = topo.start_agent_file(&path).expect("weir agent");

    // 1. Per source, 10x.
    let (per_second, sent, admitted, dropped) =
        measure(&topo, "rl-src", "source", &SOURCE_A, RL_SRC_PORT, 5);
    println!("[rate] per source 1000/s: sent {sent}, admitted {admitted}, dropped {dropped}");
    assert_rate("per source 1000/s at 10x", &per_second, 900.0, 1100.0);
    assert_eq!(sent, 5 * OFFERED, "the sender kept its rate");
    assert_eq!(
        admitted + dropped,
        sent,
        "every flow not admitted is counted as dropped"
    );
    assert_eq!(
        topo.global_counter("drop_rate_source"),
        dropped,
        "the global counter agrees"
    );
    let samples = topo.metrics().expect("metrics");
    assert_eq!(
        common::metric(
            &samples,
            "weir_rate_limited_packets_total",
            &[("service", "rl-src"), ("limit", "source")],
        ),
        Some(dropped as f64),
        "weir_rate_limited_packets_total"
    );

    // 2. Changed live: 2000/s.
    topo.write_agent_config(&rate_config(&topo, 2000, 100))
        .expect("config");
    let resp = topo.api(&weir::api::Request::Reload {}).expect("reload");
    assert!(resp.ok, "reload: {:?}", resp.error);
    let list = topo
        .api(&weir::api::Request::ServiceList {})
        .expect("service list");
    let list = serde_json::to_value(list.data.expect("data")).expect("json");
    let shown = list
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "rl-src"))
        .map(|s| s["rate_limit"]["new_flows_per_source"].clone());
    assert_eq!(shown, Some(serde_json::json!(2000)), "service list: {list}");
    let (per_second, sent, admitted, dropped) =
        measure(&topo, "rl-src", "source", &SOURCE_B, RL_SRC_PORT, 3);
    println!(
        "[rate] per source 2000/s after the reload: sent {sent}, admitted {admitted}, dropped {dropped}"
    );
    assert_rate(
        "per source 2000/s after a reload",
        &per_second,
        1800.0,
        2200.0,
    );
    assert_eq!(admitted + dropped, sent);

    // 3. Per VIP: two sources together.
    let (per_second, sent, admitted, dropped) =
        measure(&topo, "rl-vip", "vip", &SOURCES_CD, RL_VIP_PORT, 3);
    println!(
        "[rate] per VIP 500/s, two sources: sent {sent}, admitted {admitted}, dropped {dropped}"
    );
    assert_rate("per VIP 500/s at 20x", &per_second, 450.0, 550.0);
    assert_eq!(admitted + dropped, sent);
    assert_eq!(topo.global_counter("drop_rate_vip"), dropped);
}

/// The connection-limit test's backup: a second address of the third backend's namespace
/// (the test bed has three), served by the same identifying server, told apart from the
/// third primary by the datapath's per-backend counts.
const BACKUP_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 14);
/// `max_connections` of every backend of the connection-limit test.
const MAX_CONNS: u32 = 3;

/// `backend_list` of one service: (address, active connections, max, turned away).
fn limits(topo: &Topology, service: &str) -> Vec<(IpAddr, u64, u32, u64)> {
    let req = weir::api::Request::BackendList {
        service: Some(service.to_owned()),
    };
    let resp = topo.api(&req).expect("API backend_list");
    assert!(resp.ok, "backend_list failed: {:?}", resp.error);
    let list: Vec<weir::api::BackendInfo> =
        resp.data.expect("data").try_into().expect("backend list");
    list.into_iter()
        .map(|b| {
            (
                b.address,
                b.active_connections,
                b.max_connections,
                b.turned_away,
            )
        })
        .collect()
}

/// Active connections per backend, in config order (.11, .12, .13, backup .14).
fn active(topo: &Topology) -> Vec<u64> {
    limits(topo, "mc").iter().map(|b| b.1).collect()
}

/// `max_connections = 3` on three primaries and a backup (direct mode, maglev): nine idle
/// connections fill the primaries, three each (counted by the identifying servers and by
/// the datapath); the next three go to the backup; the next ones are refused, one dropped
/// SYN each (`drop_backends_full`); every flow a full pick turned away is counted at that
/// pick. Two connections closed on the first primary make room there for exactly two, and
/// `weir backend max-conns` raising its limit by one for one more.
#[test]
fn max_connections_fill_primaries_then_the_backup_then_refuse() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("mc").expect("topology");
    let with_len = format!("{BACKUP_V4}/24");
    ip(
        &topo.backends[2],
        &["addr", "add", with_len.as_str(), "dev", common::NODE_IF],
    )
    .expect("backup address");
    common::ns_exec(
        &topo.lb,
        &[
            "ping",
            "-q",
            "-n",
            "-c",
            "1",
            "-w",
            "3",
            "-W",
            "1",
            &BACKUP_V4.to_string(),
        ],
    )
    .expect("the balancer resolves the backup's neighbour");
    let _servers = topo.start_id_servers(PORT).expect("id servers");
    let service = (0..BACKENDS)
        .fold(
            ServiceBuilder::new("mc", VIP_V4, PORT, "tcp").forwarding("direct"),
            |s, i| s.backend(Backend::new(backend_v4(i)).max_connections(MAX_CONNS)),
        )
        .backend(
            Backend::new(BACKUP_V4)
                .backup(true)
                .max_connections(MAX_CONNS),
        );
    let _agent = topo
        .start_agent(&topo.agent_config().service(service))
        .expect("weir agent");
    let vip = SocketAddr::new(VIP_V4.into(), PORT);
    let open = |port: u16| common::id_tcp_connect(&topo.cli, vip, port, CONNECT_TIMEOUT);
    let spilled0 = topo.global_counter("backend_full_spilled");
    let refused0 = topo.global_counter("drop_backends_full");

    // Nine: the primaries fill, three each, the backup takes none.
    let mut held = Vec::new();
    let mut by_server = [0u64; BACKENDS];
    for port in 46_000..46_009 {
        let (stream, index) = open(port).unwrap_or_else(|e| panic!("connection {port}: {e:#}"));
        by_server[usize::from(index)] += 1;
        held.push((stream, index));
    }
    let spilled_among_nine = topo.global_counter("backend_full_spilled") - spilled0;
    println!(
        "[maxconn] 9 connections: per server {by_server:?}, datapath {:?}, {spilled_among_nine} spilled from a full pick",
        active(&topo)
    );
    assert_eq!(by_server, [3, 3, 3], "servers' peers");
    assert_eq!(active(&topo), [3, 3, 3, 0], "datapath counts");

    // Three more: the backup (the third server's namespace, the backup's count).
    for port in 46_009..46_012 {
        let (stream, index) = open(port).unwrap_or_else(|e| panic!("connection {port}: {e:#}"));
        assert_eq!(index, 2, "connection {port} lands on the backup's host");
        held.push((stream, index));
    }
    println!("[maxconn] 12 connections: datapath {:?}", active(&topo));
    assert_eq!(active(&topo), [3, 3, 3, 3]);

    // Everything full: refused, one SYN dropped and counted each.
    let refused: Vec<u16> = (46_012..46_015).filter(|p| open(*p).is_err()).collect();
    let dropped = topo.global_counter("drop_backends_full") - refused0;
    println!(
        "[maxconn] all full: {} of 3 refused, drop_backends_full +{dropped}",
        refused.len()
    );
    assert_eq!(refused.len(), 3, "every connection refused");
    assert_eq!(dropped, 3, "one dropped SYN per refused connection");
    let spilled = topo.global_counter("backend_full_spilled") - spilled0;
    assert_eq!(
        spilled,
        spilled_among_nine + 3,
        "the backup's three were spilled"
    );
    let turned_away: u64 = limits(&topo, "mc").iter().map(|b| b.3).sum();
    assert_eq!(
        turned_away,
        spilled + dropped,
        "every flow a full pick turned away is counted at the pick"
    );
    let samples = topo.metrics().expect("metrics");
    let gauge = |name: &str, backend: IpAddr| {
        let backend = backend.to_string();
        common::metric(&samples, name, &[("service", "mc"), ("backend", &backend)])
            .unwrap_or_else(|| panic!("no {name} for {backend}"))
    };
    assert_eq!(gauge("weir_backend_full", BACKUP_V4.into()), 1.0);
    assert_eq!(
        gauge("weir_backend_max_connections", BACKUP_V4.into()),
        f64::from(MAX_CONNS)
    );

    // Two closed on the first primary: room for two there, and only there.
    let mut closed = 0;
    held.retain(|(_, index)| {
        let close = *index == 0 && closed < 2;
        closed += usize::from(close);
        !close
    });
    common::wait_until(
        "the first primary's count drops",
        Duration::from_secs(5),
        || (active(&topo) == [1, 3, 3, 3]).then_some(()),
    );
    let mut again = Vec::new();
    for port in 46_015..46_017 {
        let (stream, index) = open(port).unwrap_or_else(|e| panic!("connection {port}: {e:#}"));
        again.push(index);
        held.push((stream, index));
    }
    let last = open(46_017);
    println!(
        "[maxconn] after closing 2 on the first primary: new ones on servers {again:?}, then {}; datapath {:?}",
        if last.is_err() { "refused" } else { "accepted" },
        active(&topo)
    );
    assert_eq!(again, [0, 0], "the room is on the first primary");
    assert!(last.is_err(), "full again");
    assert_eq!(active(&topo), [3, 3, 3, 3]);
    assert_eq!(topo.global_counter("drop_backends_full") - refused0, 4);

    // `weir backend max-conns` raises the first primary's limit: one more fits there.
    let resp = topo
        .api(&weir::api::Request::BackendMaxConns {
            service: "mc".to_owned(),
            address: backend_v4(0).into(),
            max_connections: MAX_CONNS + 1,
        })
        .expect("API backend_max_conns");
    assert!(resp.ok, "backend_max_conns failed: {:?}", resp.error);
    let (stream, index) = open(46_018).expect("a connection under the raised limit");
    held.push((stream, index));
    println!(
        "[maxconn] first primary's limit raised to {}: the next one on server {index}; datapath {:?}",
        MAX_CONNS + 1,
        active(&topo)
    );
    assert_eq!(index, 0);
    assert_eq!(active(&topo), [4, 3, 3, 3]);
    assert!(open(46_019).is_err(), "full again");
    // Held open until here: every count above is of live connections.
    drop(held);
}
