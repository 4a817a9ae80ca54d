//! Privileged end-to-end tests of the balancer's defences: per-service source rules (`allow`
//! / `deny`), IPv4 and IPv6, with real TCP connections from several client addresses of the
//! test bed's client namespace, counted in the datapath and in `/metrics`, and changed by a
//! reload. Needs root; skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_defence -- --test-threads=1 --nocapture`

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
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
