//! The client / switch / balancer / backends topology, in namespaces named after a prefix:
//!
//! ```text
//!  ns PREFIX-cli            ns PREFIX-sw (bridge br0)           ns PREFIX-bN (N = 1..3)
//!  eth0 198.51.100.2  ─veth─ pcli ──┐              ┌── pbN ─veth─ eth0 198.51.100.1N
//!       2001:db8::2                 br0 ── plb ─┐  │              2001:db8::1N, VIPs on lo
//!                                               └─veth─ ns PREFIX-lb: eth0 198.51.100.1,
//!                                                       2001:db8::1 (the balancer's veth)
//! ```
//!
//! (IPv6 only with [`Stack::Dual`].) One L2 segment: the balancer is "on a stick", packets
//! for a VIP arrive on its veth and leave the same way. The client routes only the VIPs via
//! the balancer; the backends answer it directly (DSR), with the VIPs on `lo`, no ARP for
//! them and no reverse-path filter. The quirks this works around (checksum offload, GRO and
//! VLAN offload on the bridge ports, bridge netfilter, duplicate address detection) are
//! described in the shared notes on the test topology, and next to each setting below.
//!
//! What the balancer needs on top is the caller's: an XDP program on the switch port
//! [`SWITCH_LB_PORT`] (on veth, frames sent with `XDP_TX` are only picked up by a peer that
//! has one), attached before [`Topology::prime_neighbours`], and the agent itself.
//!
//! [`Layout::Nat`] (the NAT modes, [`Topology::build_nat`]) changes the client and the
//! backends, on the same segment:
//!
//! ```text
//!  ns PREFIX-cli                                      ns PREFIX-bN
//!  eth0 203.0.113.130/25, 2001:db8:2::2/64            eth0 198.51.100.1N, 2001:db8::1N,
//!       VIPs via 203.0.113.129 / 2001:db8:2::1             default via 198.51.100.1 / 2001:db8::1
//!  ns PREFIX-lb: eth0 198.51.100.1, 2001:db8::1 and 203.0.113.129/25, 2001:db8:2::1
//! ```
//!
//! The client is on a subnet of its own, which the backends do not have on-link: their
//! answers go to their default router, the balancer, which translates them back (a backend
//! that had the client on-link would answer it directly, from its own address). The
//! backends are ordinary hosts: an address, a default route, no VIP, default sysctls.
//!
//! [`Layout::Fullnat`] ([`Topology::build_fullnat`]) is [`Layout::Nat`] with backends that
//! have no route at all beyond their own subnet, which they share with the balancer: the
//! balancer's `fullnat` translates clients to its own address there, so the backends answer
//! it on-link and know nothing of the client's subnet (a stock host: an address, nothing
//! else).
//!
//! Two-arm ([`Topology::build_two_arm`], either NAT layout): the client is not on the switch
//! but on a veth of its own to the balancer, whose end there is [`CLIENT_ARM_IF`] with the
//! client-side addresses; the balancer's `eth0` keeps only the backends' subnet. Packets
//! cross from one arm to the other by `XDP_REDIRECT`:
//!
//! ```text
//!  ns PREFIX-cli                         ns PREFIX-lb                        ns PREFIX-sw ...
//!  eth0 203.0.113.130/25  ─veth─  eth1 203.0.113.129/25   eth0 198.51.100.1 ─veth─ plb ── br0
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{ip, ns_exec, sysctl},
    netns::Netns,
};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x2);
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x1);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// [`Layout::Nat`]: the client, on a subnet (/25, /64) the backends do not have on-link.
pub const NAT_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 130);
pub const NAT_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x2);
/// [`Layout::Nat`]: the balancer's address on the client's subnet, the client's router for
/// the VIPs.
pub const LB_CLIENT_SIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
pub const LB_CLIENT_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x1);
/// Number of backends.
pub const BACKENDS: usize = 3;
/// Interface name of every node's (client, balancer, backends) veth end inside its
/// namespace.
pub const NODE_IF: &str = "eth0";
/// Switch-side port of the balancer's veth.
pub const SWITCH_LB_PORT: &str = "plb";
/// Switch-side port of the client's veth.
const SWITCH_CLIENT_PORT: &str = "pcli";
/// Two-arm: the balancer's end of the client's veth.
pub const CLIENT_ARM_IF: &str = "eth1";

/// The switch of a topology: bridge `br0` in namespace `sw`, up, without STP or multicast
/// snooping and without bridge netfilter. A new namespace starts with bridge-nf-call-* on
/// when br_netfilter is loaded: the bridge would then run netfilter and silently drop
/// malformed IP, hiding what the balancer forwards. The keys exist only then (`-e`: ignore
/// unknown keys).
pub(crate) fn switch_bridge(sw: &str) -> Result<()> {
    ip(
        sw,
        &[
            "link",
            "add",
            "name",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ],
    )?;
    ip(sw, &["link", "set", "br0", "up"])?;
    ns_exec(
        sw,
        &[
            "sysctl",
            "-q",
            "-e",
            "-w",
            "net.bridge.bridge-nf-call-iptables=0",
            "net.bridge.bridge-nf-call-ip6tables=0",
            "net.bridge.bridge-nf-call-arptables=0",
        ],
    )?;
    Ok(())
}

/// IPv4 address of backend `i` (0-based): 198.51.100.11, .12, .13.
///
/// # Panics
///
/// If `i` is beyond the documentation range's room (far more than [`BACKENDS`]).
#[must_use]
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 11 + u8::try_from(i).expect("backend index"))
}

/// IPv6 address of backend `i` (0-based): 2001:db8::11, ::12, ::13.
///
/// # Panics
///
/// If `i` does not fit the last group.
#[must_use]
pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        0,
        0,
        0x11 + u16::try_from(i).expect("backend index"),
    )
}

/// The namespaces of the topology with `prefix`, in the order they are created: client,
/// switch, balancer, backends 1..=N.
#[must_use]
pub fn namespace_names(prefix: &str) -> Vec<String> {
    ["cli", "sw", "lb"]
        .into_iter()
        .map(str::to_owned)
        .chain((1..=BACKENDS).map(|i| format!("b{i}")))
        .map(|node| format!("{prefix}-{node}"))
        .collect()
}

/// The address families the topology carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 only (the demo).
    Ipv4,
    /// IPv4 and IPv6 on every node, VIPs of both families on the backends.
    Dual,
}

/// Where the client is and what the backends are (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Direct server return: the client on the backends' subnet, the VIPs on the backends'
    /// `lo`, no ARP for them, no reverse-path filter.
    Dsr,
    /// The NAT modes: the client on a subnet of its own behind the balancer; backends with
    /// an address and a default route via the balancer, nothing else.
    Nat,
    /// `fullnat`: as `Nat`, but the backends have no route via the balancer (only their
    /// subnet, the balancer's too).
    Fullnat,
}

/// The namespaces and links of the module docs. Dropping it deletes the namespaces (after
/// stopping anything left inside), which takes every link along; [`Topology::teardown`] does
/// the same and reports failures.
#[derive(Debug)]
pub struct Topology {
    pub prefix: String,
    pub cli: String,
    pub sw: String,
    pub lb: String,
    pub backends: Vec<String>,
    pub stack: Stack,
    pub layout: Layout,
    /// The client on an arm of its own ([`CLIENT_ARM_IF`]), not on the switch.
    pub two_arm: bool,
    /// Created so far, in creation order; removed in reverse.
    namespaces: Vec<Netns>,
}

impl Topology {
    /// Creates the namespaces `PREFIX-{cli,sw,lb,b1,b2,b3}`, the bridge, the veth pairs and
    /// every address and route of [`Layout::Dsr`]. If a step fails, what was created is
    /// removed again.
    pub fn build(prefix: &str, stack: Stack) -> Result<Self> {
        Self::build_layout(prefix, stack, Layout::Dsr)
    }

    /// As [`Topology::build`], with the client and backends of [`Layout::Nat`].
    pub fn build_nat(prefix: &str, stack: Stack) -> Result<Self> {
        Self::build_layout(prefix, stack, Layout::Nat)
    }

    /// As [`Topology::build`], with the client and backends of [`Layout::Fullnat`].
    pub fn build_fullnat(prefix: &str, stack: Stack) -> Result<Self> {
        Self::build_layout(prefix, stack, Layout::Fullnat)
    }

    /// As [`Topology::build_nat`] or [`Topology::build_fullnat`] (`layout`), with the
    /// client on the balancer's second interface (see the module docs).
    pub fn build_two_arm(prefix: &str, stack: Stack, layout: Layout) -> Result<Self> {
        if layout == Layout::Dsr {
            bail!("two-arm is a NAT layout: DSR backends answer the client directly");
        }
        Self::build_with(prefix, stack, layout, true)
    }

    fn build_layout(prefix: &str, stack: Stack, layout: Layout) -> Result<Self> {
        Self::build_with(prefix, stack, layout, false)
    }

    fn build_with(prefix: &str, stack: Stack, layout: Layout, two_arm: bool) -> Result<Self> {
        let mut names = namespace_names(prefix).into_iter();
        let mut next = || names.next().context("namespace names");
        let mut t = Self {
            prefix: prefix.to_owned(),
            cli: next()?,
            sw: next()?,
            lb: next()?,
            backends: (0..BACKENDS).map(|_| next()).collect::<Result<_>>()?,
            stack,
            layout,
            two_arm,
            namespaces: Vec::new(),
        };
        t.setup()?;
        Ok(t)
    }

    /// The client's IPv4 address (the flows' source).
    #[must_use]
    pub fn client_v4(&self) -> Ipv4Addr {
        match self.layout {
            Layout::Dsr => CLIENT_V4,
            Layout::Nat | Layout::Fullnat => NAT_CLIENT_V4,
        }
    }

    /// The client's IPv6 address.
    #[must_use]
    pub fn client_v6(&self) -> Ipv6Addr {
        match self.layout {
            Layout::Dsr => CLIENT_V6,
            Layout::Nat | Layout::Fullnat => NAT_CLIENT_V6,
        }
    }

    /// The client's next hop towards the VIPs: the balancer's address on the client's
    /// subnet.
    fn client_router(&self) -> (Ipv4Addr, Ipv6Addr) {
        match self.layout {
            Layout::Dsr => (LB_V4, LB_V6),
            Layout::Nat | Layout::Fullnat => (LB_CLIENT_SIDE_V4, LB_CLIENT_SIDE_V6),
        }
    }

    /// Every namespace name, in creation order.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        [&self.cli, &self.sw, &self.lb]
            .into_iter()
            .chain(&self.backends)
            .cloned()
            .collect()
    }

    fn setup(&mut self) -> Result<()> {
        let dual = self.stack == Stack::Dual;
        for ns in self.names() {
            self.namespaces.push(Netns::create(&ns)?);
            // No duplicate address detection anywhere (link-local addresses included):
            // tentative addresses silently drop traffic for a second or two.
            sysctl(
                &ns,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
        }

        let sw = self.sw.clone();
        switch_bridge(&sw)?;
        let mut links: Vec<(String, String)> = vec![(SWITCH_LB_PORT.to_owned(), self.lb.clone())];
        if !self.two_arm {
            links.push((SWITCH_CLIENT_PORT.to_owned(), self.cli.clone()));
        }
        for (i, b) in self.backends.iter().enumerate() {
            links.push((format!("pb{}", i + 1), b.clone()));
        }
        for (port, node) in &links {
            // Both ends are created inside namespaces of this topology, never in the root one.
            ip(
                &sw,
                &[
                    "link", "add", "name", port, "type", "veth", "peer", "name", NODE_IF, "netns",
                    node,
                ],
            )?;
            ip(&sw, &["link", "set", port, "master", "br0"])?;
            // Merged frames and stripped VLAN tags would hide what XDP sees.
            ns_exec(&sw, &["ethtool", "-K", port, "gro", "off", "txvlan", "off"])?;
            ip(&sw, &["link", "set", port, "up"])?;
        }

        // The client routes only the VIPs via the balancer. Checksum offload off: with it,
        // TCP through an XDP path arrives with bad checksums.
        let cli = self.cli.clone();
        let nat = self.layout != Layout::Dsr;
        if self.two_arm {
            // Created inside the client's namespace, its peer moved into the balancer's.
            ip(
                &cli,
                &[
                    "link",
                    "add",
                    "name",
                    NODE_IF,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    CLIENT_ARM_IF,
                    "netns",
                    &self.lb,
                ],
            )?;
            // What the balancer redirects from its other arm arrives here as XDP frames,
            // which a veth without an XDP program takes only with GRO on.
            ns_exec(&cli, &["ethtool", "-K", NODE_IF, "gro", "on"])?;
        }
        if nat {
            self.node_addrs(&cli, (NAT_CLIENT_V4, 25), NAT_CLIENT_V6)?;
        } else {
            self.node_addrs(&cli, (CLIENT_V4, 24), CLIENT_V6)?;
        }
        ns_exec(&cli, &["ethtool", "-K", NODE_IF, "tx", "off"])?;
        let (router_v4, router_v6) = self.client_router();
        ip(
            &cli,
            &[
                "route",
                "add",
                &format!("{VIP_V4}/32"),
                "via",
                &router_v4.to_string(),
            ],
        )?;
        if dual {
            ip(
                &cli,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("{VIP_V6}/128"),
                    "via",
                    &router_v6.to_string(),
                ],
            )?;
        }

        // The balancer: addresses on the veth its XDP program attaches to; the backends are
        // on-link.
        let lb = self.lb.clone();
        self.node_addrs(&lb, (LB_V4, 24), LB_V6)?;
        if nat {
            // The client's subnet too: on the same veth (one arm), or on the client's own
            // (two-arm). No ICMP redirects: in one arm whatever the kernel forwards here
            // leaves by the interface it came in on, and a redirect would teach a backend
            // to reach the client around the balancer.
            let arm = if self.two_arm { CLIENT_ARM_IF } else { NODE_IF };
            ip(
                &lb,
                &[
                    "addr",
                    "add",
                    &format!("{LB_CLIENT_SIDE_V4}/25"),
                    "dev",
                    arm,
                ],
            )?;
            if dual {
                ip(
                    &lb,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{LB_CLIENT_SIDE_V6}/64"),
                        "dev",
                        arm,
                        "nodad",
                    ],
                )?;
            }
            if self.two_arm {
                ip(&lb, &["link", "set", CLIENT_ARM_IF, "up"])?;
            }
            sysctl(
                &lb,
                &[
                    "net.ipv4.conf.all.send_redirects=0",
                    &format!("net.ipv4.conf.{NODE_IF}.send_redirects=0"),
                ],
            )?;
        }

        for (i, b) in self.backends.clone().iter().enumerate() {
            self.node_addrs(b, (backend_v4(i), 24), backend_v6(i))?;
            ns_exec(b, &["ethtool", "-K", NODE_IF, "tx", "off"])?;
            if self.layout == Layout::Fullnat {
                // A stock host: its address and its subnet's route, nothing else.
                continue;
            }
            if nat {
                // An ordinary host whose router is the balancer: nothing else.
                ip(b, &["route", "add", "default", "via", &LB_V4.to_string()])?;
                if dual {
                    ip(
                        b,
                        &["-6", "route", "add", "default", "via", &LB_V6.to_string()],
                    )?;
                }
                continue;
            }
            // DSR: the VIPs on lo, no ARP answers or announcements for them, no reverse-path
            // filter (decapsulated packets carry the client's source address).
            ip(b, &["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
            if dual {
                ip(
                    b,
                    &[
                        "-6",
                        "addr",
                        "add",
                        &format!("{VIP_V6}/128"),
                        "dev",
                        "lo",
                        "nodad",
                    ],
                )?;
            }
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

    /// The node's addresses on its veth end (IPv4 with its prefix length; IPv6 a /64,
    /// without duplicate address detection), and the link up.
    fn node_addrs(&self, ns: &str, (v4, len): (Ipv4Addr, u8), v6: Ipv6Addr) -> Result<()> {
        ip(ns, &["addr", "add", &format!("{v4}/{len}"), "dev", NODE_IF])?;
        if self.stack == Stack::Dual {
            ip(
                ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    NODE_IF,
                    "nodad",
                ],
            )?;
        }
        ip(ns, &["link", "set", NODE_IF, "up"])?;
        Ok(())
    }

    /// One ping from the balancer to each backend and from the client to the balancer (each
    /// family of the stack), so neighbour entries exist before traffic starts. Also proves
    /// plain L2/L3 connectivity; run once the caller's program is on the switch port, it
    /// checks the path the traffic will take.
    pub fn prime_neighbours(&self) -> Result<()> {
        let dual = self.stack == Stack::Dual;
        let mut targets: Vec<(&str, String)> = Vec::new();
        for i in 0..self.backends.len() {
            targets.push((&self.lb, backend_v4(i).to_string()));
            if dual {
                targets.push((&self.lb, backend_v6(i).to_string()));
            }
        }
        let (router_v4, router_v6) = self.client_router();
        targets.push((&self.cli, router_v4.to_string()));
        if dual {
            targets.push((&self.cli, router_v6.to_string()));
        }
        if self.layout != Layout::Dsr {
            // The balancer sends the translated answers to the client itself.
            targets.push((&self.lb, NAT_CLIENT_V4.to_string()));
            if dual {
                targets.push((&self.lb, NAT_CLIENT_V6.to_string()));
            }
        }
        for (ns, dst) in targets {
            // Up to 3 one-second attempts (the first may wait for address resolution).
            ns_exec(
                ns,
                &["ping", "-q", "-n", "-c", "1", "-w", "3", "-W", "1", &dst],
            )
            .with_context(|| format!("no answer to ping from {ns} to {dst}"))?;
        }
        Ok(())
    }

    /// Deletes every namespace (last created first), after stopping whatever still runs in
    /// it; all of them are tried, and the failures are reported together. Idempotent.
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

    /// Leaves every namespace in place (for a demo left running); returns their names.
    #[must_use]
    pub fn keep(mut self) -> Vec<String> {
        self.namespaces.drain(..).map(Netns::keep).collect()
    }
}

impl Drop for Topology {
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
    fn names_and_addresses() {
        assert_eq!(
            namespace_names("weirdemo"),
            [
                "weirdemo-cli",
                "weirdemo-sw",
                "weirdemo-lb",
                "weirdemo-b1",
                "weirdemo-b2",
                "weirdemo-b3"
            ]
        );
        assert_eq!(backend_v4(0), Ipv4Addr::new(198, 51, 100, 11));
        assert_eq!(backend_v4(2), Ipv4Addr::new(198, 51, 100, 13));
        assert_eq!(backend_v6(1).to_string(), "2001:db8::12");
    }

    #[test]
    fn addresses_stay_in_the_documentation_ranges() {
        let doc_v4 = |a: Ipv4Addr| {
            let [a0, a1, a2, _] = a.octets();
            (a0, a1, a2) == (198, 51, 100) || (a0, a1, a2) == (203, 0, 113)
        };
        let doc_v6 = |a: Ipv6Addr| a.segments()[..2] == [0x2001, 0xdb8];
        for a in [CLIENT_V4, LB_V4, VIP_V4, NAT_CLIENT_V4, LB_CLIENT_SIDE_V4]
            .into_iter()
            .chain((0..BACKENDS).map(backend_v4))
        {
            assert!(doc_v4(a), "{a}");
        }
        for a in [CLIENT_V6, LB_V6, VIP_V6, NAT_CLIENT_V6, LB_CLIENT_SIDE_V6]
            .into_iter()
            .chain((0..BACKENDS).map(backend_v6))
        {
            assert!(doc_v6(a), "{a}");
        }
    }
}
