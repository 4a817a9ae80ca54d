//! Privileged end-to-end tests of the XDP datapath: a real `weir agent` balancing real TCP and
//! UDP flows from a client namespace to three backend namespaces, over veth pairs and a
//! bridge (see `common/mod.rs` for the topology). The flows come from fixed source ports, so
//! each backend's count must be exactly what lb-common's flow hash and the agent's Maglev
//! ring predict (`common::predict`). Needs root; skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_datapath -- --test-threads=1 --nocapture`

mod common;

use std::{net::IpAddr, time::Duration};

use common::{
    BACKENDS, Backend, CLIENT_V4, CLIENT_V6, ChildGuard, ConfigBuilder, EchoServers,
    ServiceBuilder, Topology, VIP_V4, VIP_V6, backend_v4, backend_v6, predict,
};

const PORT: u16 = 7;
/// Explicit client source ports: the 5-tuple hash decides the backend, so every run sends
/// the same flows to the same backends, and the counts per backend are known in advance.
const TCP_PORTS: std::ops::Range<u16> = 30_000..30_900;
const UDP_PORTS: std::ops::Range<u16> = 40_000..40_900;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self) -> IpAddr {
        match self {
            Self::V4 => VIP_V4.into(),
            Self::V6 => VIP_V6.into(),
        }
    }

    /// The client's address of this family, the flows' source.
    fn client(self) -> IpAddr {
        match self {
            Self::V4 => CLIENT_V4.into(),
            Self::V6 => CLIENT_V6.into(),
        }
    }

    fn backend(self, i: usize) -> IpAddr {
        match self {
            Self::V4 => backend_v4(i).into(),
            Self::V6 => backend_v6(i).into(),
        }
    }
}

/// One service on `family`'s VIP, port 7, maglev, `forwarding`, backends 1..=N with the given
/// weights.
fn service(
    family: Family,
    name: &str,
    protocol: &str,
    forwarding: &str,
    weights: &[u32],
) -> ServiceBuilder {
    weights.iter().enumerate().fold(
        ServiceBuilder::new(name, family.vip(), PORT, protocol)
            .scheduler("maglev")
            .forwarding(forwarding),
        |s, (i, w)| s.backend(Backend::weighted(family.backend(i), *w)),
    )
}

/// An agent config for the LB namespace with `services`.
fn agent_config(topo: &Topology, services: &[ServiceBuilder]) -> ConfigBuilder {
    services
        .iter()
        .cloned()
        .fold(topo.agent_config(), ConfigBuilder::service)
}

/// Asserts the flows per backend are exactly the predicted ones.
fn assert_exact(what: &str, counts: &[u64], predicted: &[u64]) {
    println!("{what}: {counts:?}, predicted {predicted:?}");
    assert_eq!(
        counts, predicted,
        "{what}: flows per backend differ from what the flow hash and the Maglev ring predict"
    );
}

/// Source ports of the negative probes (outside every flow range).
const PROBE_PORT: u16 = 39_000;
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Starts the agent (and, for tunnel mode, `weir decap` on every backend) with two negative
/// controls on the way: before the agent, the VIP must not answer (no kernel path to it, so
/// what answers later is the XDP balancer); in tunnel mode, before decap runs, it must not
/// answer either (the LB really encapsulates: a backend without decap drops IP-in-IP).
/// Resets the servers' counters at the end. Returns (agent, decap processes).
fn start_datapath(
    topo: &Topology,
    servers: &EchoServers,
    family: Family,
    forwarding: &str,
    config: &ConfigBuilder,
) -> (ChildGuard, Vec<ChildGuard>) {
    let vip = family.vip();
    assert!(
        !topo
            .udp_probe(vip, PORT, PROBE_PORT, PROBE_TIMEOUT)
            .expect("probe"),
        "the VIP {vip} answered before the agent started: the topology has a kernel path to it"
    );
    let agent = topo.start_agent(config).expect("weir agent");
    let decap = if forwarding == "tunnel" {
        assert!(
            !topo
                .udp_probe(vip, PORT, PROBE_PORT + 1, PROBE_TIMEOUT)
                .expect("probe"),
            "tunnel mode: the VIP {vip} answered before `weir decap` ran on the backends, so \
             the balancer did not encapsulate"
        );
        topo.start_decap(&[VIP_V4.into(), VIP_V6.into()])
            .expect("weir decap on the backends")
    } else {
        Vec::new()
    };
    servers.reset();
    (agent, decap)
}

/// Stops the agent and the decap processes with SIGTERM: each must exit successfully. The
/// balancer stays attached after the agent stops (pinned) until `weir teardown`; decap
/// detaches when it stops.
fn stop_datapath(topo: &Topology, mut agent: ChildGuard, decap: Vec<ChildGuard>) {
    let st = agent.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "agent exit on SIGTERM: {st:?}; log:\n{}",
        agent.log()
    );
    assert!(
        common::xdp_attached(&topo.lb, common::NODE_IF).expect("ip link"),
        "the balancer must stay attached (pinned) after the agent stops"
    );
    topo.teardown_datapath().expect("weir teardown");
    assert!(
        !common::xdp_attached(&topo.lb, common::NODE_IF).expect("ip link"),
        "XDP still attached to the LB's interface after teardown"
    );
    assert!(!topo.bpffs().exists(), "teardown left the pin directory");
    for (ns, mut d) in topo.backends.iter().zip(decap) {
        let st = d.stop();
        assert!(
            st.is_some_and(|s| s.success()),
            "decap in {ns} exit on SIGTERM: {st:?}; log:\n{}",
            d.log()
        );
        assert!(
            !common::xdp_attached(ns, common::NODE_IF).expect("ip link"),
            "XDP still attached in {ns} after decap stopped"
        );
    }
}

fn print_counts(test: &str, servers: &EchoServers) {
    println!(
        "[{test}] per-backend TCP connections accepted: {:?}; UDP datagrams echoed: {:?} (flows {:?})",
        servers.tcp_counts(),
        servers.udp_counts(),
        servers.udp_flow_counts()
    );
}

/// 900 TCP connections and 900 UDP flows through the balancer in `forwarding` mode for
/// `family`; every flow gets its echo and each backend gets exactly the flows the Maglev
/// ring gives it (about a third).
fn balance_case(tag: &str, family: Family, forwarding: &str) {
    if !common::require_root() {
        return;
    }
    let test = format!("{forwarding}-{family:?}");
    let topo = Topology::build(tag).expect("topology");
    let servers = topo.start_echo_servers(PORT).expect("echo servers");
    let weights = [1; BACKENDS];
    let tcp_service = service(family, "tcp", "tcp", forwarding, &weights);
    let udp_service = service(family, "udp", "udp", forwarding, &weights);
    let config = agent_config(&topo, &[tcp_service.clone(), udp_service.clone()]);
    let (agent, decap) = start_datapath(&topo, &servers, family, forwarding, &config);

    let tcp = topo
        .tcp_flows(family.vip(), PORT, TCP_PORTS, &test)
        .expect("tcp flows");
    println!("[{test}] {}", tcp.summary());
    let udp = topo
        .udp_flows(family.vip(), PORT, UDP_PORTS, &test)
        .expect("udp flows");
    println!("[{test}] {}", udp.summary());
    print_counts(&test, &servers);

    tcp.assert_all_ok();
    udp.assert_all_ok();
    assert_exact(
        &format!("[{test}] TCP connections"),
        &servers.tcp_counts(),
        &predict::maglev_counts(&tcp_service, &weights, family.client(), TCP_PORTS),
    );
    assert_exact(
        &format!("[{test}] UDP flows"),
        &servers.udp_flow_counts(),
        &predict::maglev_counts(&udp_service, &weights, family.client(), UDP_PORTS),
    );
    stop_datapath(&topo, agent, decap);
}

#[test]
fn tunnel_ipv4() {
    balance_case("t4", Family::V4, "tunnel");
}

#[test]
fn tunnel_ipv6() {
    balance_case("t6", Family::V6, "tunnel");
}

#[test]
fn direct_ipv4() {
    balance_case("d4", Family::V4, "direct");
}

#[test]
fn direct_ipv6() {
    balance_case("d6", Family::V6, "direct");
}

/// Weights 1:2:3 (tunnel, IPv4): 3000 UDP flows split about 500/1000/1500, exactly as the
/// weighted Maglev ring predicts.
#[test]
fn weights_tunnel_ipv4() {
    if !common::require_root() {
        return;
    }
    let test = "weights-tunnel-V4";
    let topo = Topology::build("wt").expect("topology");
    let servers = topo.start_echo_servers(PORT).expect("echo servers");
    let weights = [1, 2, 3];
    let udp_service = service(Family::V4, "udp", "udp", "tunnel", &weights);
    let config = agent_config(&topo, std::slice::from_ref(&udp_service));
    let (agent, decap) = start_datapath(&topo, &servers, Family::V4, "tunnel", &config);

    let ports = 40_000..43_000;
    let udp = topo
        .udp_flows(VIP_V4.into(), PORT, ports.clone(), test)
        .expect("udp flows");
    println!("[{test}] {}", udp.summary());
    print_counts(test, &servers);

    udp.assert_all_ok();
    assert_exact(
        &format!("[{test}] UDP flows"),
        &servers.udp_flow_counts(),
        &predict::maglev_counts(&udp_service, &weights, Family::V4.client(), ports),
    );
    stop_datapath(&topo, agent, decap);
}

/// Harness self-check, no agent: the topology carries plain kernel traffic from the client to
/// every backend's real address (TCP echo), and the echo servers count it. If this fails, the
/// harness or the machine is at fault, not the balancer.
#[test]
fn harness_kernel_only() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build_with("hk", false).expect("topology");
    let servers = topo.start_echo_servers(PORT).expect("echo servers");
    for i in 0..BACKENDS {
        for family in [Family::V4, Family::V6] {
            let base = 50_000
                + u16::try_from(i * 100).unwrap()
                + if family == Family::V6 { 50 } else { 0 };
            let r = topo
                .tcp_flows(family.backend(i), PORT, base..base + 10, "kernel")
                .expect("tcp flows");
            println!("[harness] {}", r.summary());
            r.assert_all_ok();
        }
    }
    print_counts("harness", &servers);
    assert_eq!(
        servers.tcp_counts(),
        vec![20; BACKENDS],
        "each backend accepted 10 IPv4 + 10 IPv6 connections"
    );

    // DSR plumbing with the kernel as a one-backend "balancer": the LB namespace forwards the
    // VIPs to backend 3, which answers the client directly from the VIP.
    servers.reset();
    common::sysctl(
        &topo.lb,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ],
    )
    .expect("sysctl");
    common::ip(
        &topo.lb,
        &[
            "route",
            "add",
            &format!("{VIP_V4}/32"),
            "via",
            &backend_v4(2).to_string(),
        ],
    )
    .expect("route");
    common::ip(
        &topo.lb,
        &[
            "-6",
            "route",
            "add",
            &format!("{VIP_V6}/128"),
            "via",
            &backend_v6(2).to_string(),
        ],
    )
    .expect("route");
    for family in [Family::V4, Family::V6] {
        let tcp = topo
            .tcp_flows(family.vip(), PORT, 51_000..51_010, "dsr")
            .expect("tcp flows");
        let udp = topo
            .udp_flows(family.vip(), PORT, 52_000..52_010, "dsr")
            .expect("udp flows");
        println!("[harness] {}\n[harness] {}", tcp.summary(), udp.summary());
        tcp.assert_all_ok();
        udp.assert_all_ok();
    }
    print_counts("harness dsr", &servers);
    assert_eq!(
        servers.tcp_counts(),
        vec![0, 0, 20],
        "kernel-forwarded TCP reaches backend 3 only"
    );
    assert_eq!(
        servers.udp_counts(),
        vec![0, 0, 20],
        "kernel-forwarded UDP reaches backend 3 only"
    );
}
