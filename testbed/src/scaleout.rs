//! The scale-out topology: a client behind a router that spreads the VIPs' traffic over
//! several balancers by ECMP, the balancers and the backends on one L2 segment:
//!
//! ```text
//!  ns PREFIX-cli                       ns PREFIX-rt (the router)
//!  eth0 203.0.113.130/25  ───veth───   eth0 203.0.113.129/25
//!       default via .129               eth1 198.51.100.254/24 ───veth─── prt ┐
//!                                                                           │ ns PREFIX-sw
//!  ns PREFIX-lbN (N = 1..): eth0 198.51.100.N/24  ───veth───  plbN ──────── br0
//!  ns PREFIX-bN (N = 1..3): eth0 198.51.100.1N/24 ───veth───  pbN ─────────┘
//!                           VIPs on lo, default via 198.51.100.254
//! ```
//!
//! The router has no route to the VIPs of its own: whoever runs it (BIRD, in the tests)
//! installs them. It forwards with `fib_multipath_hash_policy = 1`, so an ECMP route spreads
//! flows by their ports. The backends answer the client directly (DSR) through the router:
//! VIPs on `lo`, no ARP for them, no reverse-path filter. What the balancers need on top (an
//! XDP program on each switch port `plbN`, which veth needs for `XDP_TX`; the agents; BIRD)
//! is the caller's.
//!
//! Network safety as for [`crate::topology`]: only namespaces created here, only
//! documentation addresses.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{ip, ns_exec, sysctl},
    netns::Netns,
    topology::{BACKENDS, NAT_CLIENT_V4, NODE_IF, VIP_V4, backend_v4},
};

/// The client (on a subnet of its own, behind the router).
pub const SCALEOUT_CLIENT_V4: Ipv4Addr = NAT_CLIENT_V4;
/// The router's address on the client's subnet: the client's default route.
pub const ROUTER_CLIENT_SIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
/// The router's address on the balancers' segment: their BGP peer, the backends' default
/// route.
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// The router's interface on the balancers' segment.
pub const ROUTER_SEGMENT_IF: &str = "eth1";

/// IPv4 address of balancer `i` (0-based): 198.51.100.1, .2, ...
///
/// # Panics
///
/// If `i` would reach the backends' addresses.
#[must_use]
pub fn balancer_v4(i: usize) -> Ipv4Addr {
    let i = u8::try_from(i)
        .ok()
        .filter(|i| *i < 9)
        .expect("balancer index");
    Ipv4Addr::new(198, 51, 100, 1 + i)
}

/// The switch port of balancer `i` (0-based): `plb1`, `plb2`, ...
#[must_use]
pub fn balancer_port(i: usize) -> String {
    format!("plb{}", i + 1)
}

/// The namespaces of the module docs; dropping it deletes them (after stopping what runs
/// inside), which takes every link along.
#[derive(Debug)]
pub struct ScaleOut {
    pub prefix: String,
    pub cli: String,
    pub rt: String,
    pub sw: String,
    /// The balancers' namespaces.
    pub lbs: Vec<String>,
    pub backends: Vec<String>,
    namespaces: Vec<Netns>,
}

impl ScaleOut {
    /// Creates the topology with `balancers` balancers (1..=9) and three backends. If a
    /// step fails, what was created is removed again.
    pub fn build(prefix: &str, balancers: usize) -> Result<Self> {
        if !(1..=9).contains(&balancers) {
            bail!("{balancers} balancers: 1 to 9");
        }
        let name = |node: &str| format!("{prefix}-{node}");
        let mut t = Self {
            prefix: prefix.to_owned(),
            cli: name("cli"),
            rt: name("rt"),
            sw: name("sw"),
            lbs: (1..=balancers).map(|i| name(&format!("lb{i}"))).collect(),
            backends: (1..=BACKENDS).map(|i| name(&format!("b{i}"))).collect(),
            namespaces: Vec::new(),
        };
        t.setup()?;
        Ok(t)
    }

    /// Every namespace name, in creation order.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        [&self.cli, &self.rt, &self.sw]
            .into_iter()
            .chain(&self.lbs)
            .chain(&self.backends)
            .cloned()
            .collect()
    }

    fn setup(&mut self) -> Result<()> {
        for ns in self.names() {
            self.namespaces.push(Netns::create(&ns)?);
        }
        let (cli, rt, sw) = (self.cli.clone(), self.rt.clone(), self.sw.clone());

        // Client and router: one veth pair, created in the client's namespace.
        ip(
            &cli,
            &[
                "link", "add", "name", NODE_IF, "type", "veth", "peer", "name", NODE_IF, "netns",
                &rt,
            ],
        )?;
        ip(
            &cli,
            &[
                "addr",
                "add",
                &format!("{SCALEOUT_CLIENT_V4}/25"),
                "dev",
                NODE_IF,
            ],
        )?;
        ip(&cli, &["link", "set", NODE_IF, "up"])?;
        ip(
            &cli,
            &[
                "route",
                "add",
                "default",
                "via",
                &ROUTER_CLIENT_SIDE_V4.to_string(),
            ],
        )?;
        // Checksum offload off: with it, TCP through an XDP path arrives with bad checksums.
        ns_exec(&cli, &["ethtool", "-K", NODE_IF, "tx", "off"])?;
        ip(
            &rt,
            &[
                "addr",
                "add",
                &format!("{ROUTER_CLIENT_SIDE_V4}/25"),
                "dev",
                NODE_IF,
            ],
        )?;
        ip(&rt, &["link", "set", NODE_IF, "up"])?;

        // The segment: the test bed's switch bridge.
        crate::topology::switch_bridge(&sw)?;
        let mut links: Vec<(String, String, &str)> =
            vec![("prt".to_owned(), rt.clone(), ROUTER_SEGMENT_IF)];
        for (i, lb) in self.lbs.iter().enumerate() {
            links.push((balancer_port(i), lb.clone(), NODE_IF));
        }
        for (i, b) in self.backends.iter().enumerate() {
            links.push((format!("pb{}", i + 1), b.clone(), NODE_IF));
        }
        for (port, node, ifname) in &links {
            ip(
                &sw,
                &[
                    "link", "add", "name", port, "type", "veth", "peer", "name", ifname, "netns",
                    node,
                ],
            )?;
            ip(&sw, &["link", "set", port, "master", "br0"])?;
            // Merged frames and stripped VLAN tags would hide what XDP sees.
            ns_exec(&sw, &["ethtool", "-K", port, "gro", "off", "txvlan", "off"])?;
            ip(&sw, &["link", "set", port, "up"])?;
        }

        // The router: forwards, spreads ECMP routes by ports, no reverse-path filter (the
        // backends' answers come from the VIP, whose route may be gone while they drain).
        ip(
            &rt,
            &[
                "addr",
                "add",
                &format!("{ROUTER_V4}/24"),
                "dev",
                ROUTER_SEGMENT_IF,
            ],
        )?;
        ip(&rt, &["link", "set", ROUTER_SEGMENT_IF, "up"])?;
        for ifname in [NODE_IF, ROUTER_SEGMENT_IF] {
            ns_exec(&rt, &["ethtool", "-K", ifname, "tx", "off"])?;
        }
        sysctl(
            &rt,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                &format!("net.ipv4.conf.{NODE_IF}.rp_filter=0"),
                &format!("net.ipv4.conf.{ROUTER_SEGMENT_IF}.rp_filter=0"),
            ],
        )?;

        for (i, lb) in self.lbs.iter().enumerate() {
            ip(
                lb,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", balancer_v4(i)),
                    "dev",
                    NODE_IF,
                ],
            )?;
            ip(lb, &["link", "set", NODE_IF, "up"])?;
        }

        for (i, b) in self.backends.iter().enumerate() {
            ip(
                b,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", backend_v4(i)),
                    "dev",
                    NODE_IF,
                ],
            )?;
            ip(b, &["link", "set", NODE_IF, "up"])?;
            ns_exec(b, &["ethtool", "-K", NODE_IF, "tx", "off"])?;
            ip(
                b,
                &["route", "add", "default", "via", &ROUTER_V4.to_string()],
            )?;
            ip(b, &["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
            sysctl(
                b,
                &[
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    &format!("net.ipv4.conf.{NODE_IF}.rp_filter=0"),
                    "net.ipv4.conf.lo.rp_filter=0",
                ],
            )?;
        }
        Ok(())
    }

    /// One ping from each balancer to the router and each backend, and from the client to
    /// the router, so neighbour entries exist before traffic starts (run once the caller's
    /// programs are on the switch ports).
    pub fn prime_neighbours(&self) -> Result<()> {
        let mut targets: Vec<(&str, String)> = vec![(&self.cli, ROUTER_CLIENT_SIDE_V4.to_string())];
        for lb in &self.lbs {
            targets.push((lb, ROUTER_V4.to_string()));
            for i in 0..self.backends.len() {
                targets.push((lb, backend_v4(i).to_string()));
            }
        }
        for (ns, dst) in targets {
            ns_exec(
                ns,
                &["ping", "-q", "-n", "-c", "1", "-w", "3", "-W", "1", &dst],
            )
            .with_context(|| format!("no answer to ping from {ns} to {dst}"))?;
        }
        Ok(())
    }

    /// Cuts balancer `i` off the segment (its switch port down), as a dead machine would be.
    pub fn cut_balancer(&self, i: usize) -> Result<()> {
        ip(&self.sw, &["link", "set", &balancer_port(i), "down"]).map(drop)
    }

    /// Deletes every namespace (last created first); all are tried, failures reported
    /// together. Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        while let Some(ns) = self.namespaces.pop() {
            let name = ns.name().to_owned();
            if let Err(e) = ns.delete() {
                problems.push(format!("namespace {name}: {e:#}"));
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }
}

impl Drop for ScaleOut {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("warning: teardown of the {} topology: {e:#}", self.prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_documentation_ranges_and_apart() {
        for a in [SCALEOUT_CLIENT_V4, ROUTER_CLIENT_SIDE_V4, ROUTER_V4]
            .into_iter()
            .chain((0..9).map(balancer_v4))
        {
            let [a0, a1, a2, _] = a.octets();
            assert!(
                (a0, a1, a2) == (198, 51, 100) || (a0, a1, a2) == (203, 0, 113),
                "{a}"
            );
        }
        // No balancer takes a backend's address.
        assert!((0..9).map(balancer_v4).all(|a| a < backend_v4(0)));
        assert_eq!(balancer_port(0), "plb1");
    }
}
