//! `cargo xtask bench packets`: packets per second through each balancer, 60-byte UDP
//! frames over 1,000 flows, counted at the backends, against the ceiling of the same
//! generator into `XDP_DROP`.
//!
//! The generator is `weir_bench_gen`, run by `BPF_PROG_TEST_RUN` with live frames
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`) on the LB's `eth0`: the kernel really carries out the
//! action each run returns, as if the frame had been received on that interface. Frame
//! pages are reused without being restored, so every run restores the 60-byte template
//! and writes the next of 1,000 source ports into it, then:
//!
//! * ceiling: returns `XDP_DROP` (the generator alone);
//! * forwarding floor: returns `XDP_TX` (sent back out of `eth0` to the client's end, which
//!   has the sink): the cost of transmitting and receiving a frame, without balancing;
//! * Weir (tunnel, direct, nat, fullnat): runs the balancer's own code (`run_balancer`,
//!   as `weir_balancer`), whose `XDP_REDIRECT` really transmits to the backend's veth;
//! * Katran (`katran-1arm`, given a Katran checkout with `--katran PATH` or
//!   `WEIR_KATRAN_SRC`, as in `bench datapath`): the same generator in front of Katran's
//!   `balancer_ingress` (`katran/bench_wrapper.c`), balancing the one-arm VIP over the
//!   one-arm backends; its `XDP_TX` sends out of `eth0`, like Weir's one-arm rows;
//! * kernel paths (nftables DNAT, nginx stream, plain forwarding): returns `XDP_PASS`, so
//!   the frame enters the LB's network stack as received on `eth0`.
//!
//! In the NAT modes (Weir's `nat` and `fullnat`, and nftables DNAT) the replies cross the
//! balancer too, so they have rows of their own (`*-reply`): forward frames first make
//! `FLOWS` flows to a service (or nftables map) of backend 0 alone, checked in the NAT
//! table (or `/proc/net/nf_conntrack`), then the generator sends backend 0's replies to
//! them, as received on backend 0's link (`b1`): to the client's ports (nat, nftables) or
//! to the SNAT ports (fullnat, with exactly `FLOWS` SNAT ports, so that every one of them
//! is in use). The translated replies leave by `eth0` to the client, counted there. One
//! backend is enough: a reply's cost is one lookup by its tuple, whatever the backends.
//!
//! Topology (namespaces `w<pid>bpk-*`): the LB's `eth0` (peer in a client namespace, only
//! to be up) and one veth per backend (`b1`..`b3`, each its own /30). Each backend's end
//! has `weir_bench_sink` (XDP_DROP) attached, so every balancer's output costs the same to
//! receive; packets are counted from the backends' interface counters (the client's end
//! also has a sink, for the forwarding floor and the replies). Everything runs on
//! one core (the generator is pinned to CPU 0; the receive work of veth runs on the
//! sending CPU), except nginx's worker, which is pinned to CPU 1.
//!
//! Rates are frames over the time the kernel spent in the live-frames loop, as
//! `BPF_PROG_TEST_RUN` reports it (mean ns per frame): each call also costs some 30 ms of
//! setup (the XDP dispatcher is updated twice, with an RCU grace period each), which is the
//! tool's, not the balancer's. Delivery to the backends happens inside that loop (the
//! veth receive runs when the loop re-enables softirqs after each batch of 64 frames).
//!
//! Arguments: `--seconds N` per case (default 2), `--repeats N` (default 3), `--only a,b`
//! (cases by name; the ceiling always runs; docs/BENCHMARKS.md is rewritten only by a run
//! without it), `--katran PATH` (Katran's row).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "katran/mod.rs"]
mod katran;
mod support;

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::XdpMode,
};
use common::{Netns, ip, ns_exec, sysctl};
use lb_common::{BENCH_TEMPLATE_LEN, BenchTemplate, map_name};
use support::Spread;
use weir::{
    agent::desired::plain,
    config,
    datapath::{self, KernelMaps, MapWriter as _},
    reconcile::Balancer,
};
use weir_testbed::{Backend, ConfigBuilder, ServiceBuilder};

const GEN: &str = "weir_bench_gen";
const SINK: &str = "weir_bench_sink";
const BENCH_GEN: &str = "BENCH_GEN";
/// `BENCH_GEN[0]`: run the balancer; otherwise the XDP action to return.
const ACTION_BALANCE: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const FLOWS: u32 = 1000;
const SRC_PORT_BASE: u16 = 10_000;
/// The client's source ports of the reply cases' flows: apart from the forward cases', so
/// that the kernel's conntrack entries of `nft-numgen` (bound to any backend) are not met
/// by `nft-numgen-reply`'s flows (bound to backend 0).
const REPLY_FLOW_BASE: u16 = 20_000;
/// `weir-fullnat-reply`'s SNAT ports: exactly `FLOWS` of them, so that once every flow has
/// a pair the ports in use are exactly `SNAT_PORT_BASE..SNAT_PORT_BASE + FLOWS`, which the
/// generator can address (it writes consecutive values into one field).
const SNAT_PORT_BASE: u16 = 61_000;
/// Offset of the UDP source port in the template (Ethernet 14 + IPv4 20).
const SRC_PORT_OFFSET: u32 = 34;
/// Offset of the UDP destination port: a reply's varying field (the client's port, or
/// fullnat's SNAT port).
const DST_PORT_OFFSET: u32 = 36;
const PORT: u16 = 4000;
const BACKENDS: usize = 3;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const LB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The VIP of the one-arm cases, whose backends are behind `eth0` (`one_arm_backend`).
const ONE_ARM_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// Frames per `BPF_PROG_TEST_RUN` call (about 0.1 to 1 s each).
const REPEAT: u32 = 1 << 20;
/// Frames per batch of the live-frames loop (the kernel's default is 64).
const BATCH: u32 = 64;

/// Backend `i`'s address: its link is 198.51.100.(64 + 4i)/30, LB side .65 + 4i.
fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        198,
        51,
        100,
        66 + 4 * u8::try_from(i).expect("few backends"),
    )
}

/// One-arm backend `i`: on `eth0`'s segment (198.51.100.0/26), behind the client's end,
/// whose sink receives what the balancer sends there with `XDP_TX`, as a switch port would
/// (XDP sees every frame whatever its destination MAC).
fn one_arm_backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 40 + u8::try_from(i).expect("few backends"))
}

/// One-arm backend `i`'s MAC (its permanent neighbour entry on `eth0`): a frame's
/// destination MAC tells which backend it was sent to, in direct mode too.
fn one_arm_mac(i: usize) -> [u8; 6] {
    [
        0x02,
        0,
        0,
        0,
        0,
        0x40 + u8::try_from(i).expect("few backends"),
    ]
}

fn lb_side(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        198,
        51,
        100,
        65 + 4 * u8::try_from(i).expect("few backends"),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Ceiling,
    XdpTx,
    XdpRedirect,
    WeirTunnel,
    WeirDirect,
    WeirTunnelOneArm,
    WeirDirectOneArm,
    KatranOneArm,
    WeirNat,
    WeirFullnat,
    WeirNatReply,
    WeirFullnatReply,
    NftNumgen,
    NftJhash,
    NftNumgenReply,
    NginxStream,
    KernelForward,
}

const CASES: [Case; 17] = [
    Case::Ceiling,
    Case::XdpTx,
    Case::XdpRedirect,
    Case::WeirTunnel,
    Case::WeirDirect,
    Case::WeirTunnelOneArm,
    Case::WeirDirectOneArm,
    Case::KatranOneArm,
    Case::WeirNat,
    Case::WeirFullnat,
    Case::WeirNatReply,
    Case::WeirFullnatReply,
    Case::NftNumgen,
    Case::NftJhash,
    Case::NftNumgenReply,
    Case::NginxStream,
    Case::KernelForward,
];

impl Case {
    const fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "xdp-drop",
            Self::XdpTx => "xdp-tx",
            Self::XdpRedirect => "xdp-redirect",
            Self::WeirTunnel => "weir-tunnel",
            Self::WeirDirect => "weir-direct",
            Self::WeirTunnelOneArm => "weir-tunnel-1arm",
            Self::WeirDirectOneArm => "weir-direct-1arm",
            Self::KatranOneArm => "katran-1arm",
            Self::WeirNat => "weir-nat",
            Self::WeirFullnat => "weir-fullnat",
            Self::WeirNatReply => "weir-nat-reply",
            Self::WeirFullnatReply => "weir-fullnat-reply",
            Self::NftNumgen => "nft-numgen",
            Self::NftJhash => "nft-jhash",
            Self::NftNumgenReply => "nft-numgen-reply",
            Self::NginxStream => "nginx-stream",
            Self::KernelForward => "kernel-forward",
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Ceiling => "generator into XDP_DROP (ceiling)",
            Self::XdpTx => "generator into XDP_TX, no balancing (forwarding floor)",
            Self::XdpRedirect => {
                "generator into XDP_REDIRECT to the backends' links, no balancing (two-arm floor)"
            }
            Self::WeirTunnel => "Weir, tunnel (IP-in-IP), backends' links (XDP_REDIRECT)",
            Self::WeirDirect => "Weir, direct (L2 DSR), backends' links (XDP_REDIRECT)",
            Self::WeirTunnelOneArm => "Weir, tunnel (IP-in-IP), one arm (XDP_TX)",
            Self::WeirDirectOneArm => "Weir, direct (L2 DSR), one arm (XDP_TX)",
            Self::KatranOneArm => "Katran (IP-in-IP, its per-CPU LRUs), one arm (XDP_TX)",
            Self::WeirNat => "Weir, nat (destination NAT), forward",
            Self::WeirFullnat => "Weir, fullnat (destination + source NAT), forward",
            Self::WeirNatReply => "Weir, nat, reply (backend to client)",
            Self::WeirFullnatReply => "Weir, fullnat, reply (backend to client)",
            Self::NftNumgen => "nftables DNAT, numgen random",
            Self::NftJhash => "nftables DNAT, jhash",
            Self::NftNumgenReply => "nftables DNAT, reply (backend to client)",
            Self::NginxStream => "nginx 1.22 stream (UDP), 1 worker",
            Self::KernelForward => "kernel IP forwarding, no NAT (reference)",
        }
    }

    /// Whether the case's frames leave by `eth0` (`XDP_TX`), so that they are counted at
    /// the client's end: the forwarding floor, the one-arm cases and the replies.
    const fn to_client(self) -> bool {
        matches!(
            self,
            Self::XdpTx | Self::WeirTunnelOneArm | Self::WeirDirectOneArm | Self::KatranOneArm
        ) || self.is_reply()
    }

    /// Whether the case sends a backend's replies to the client (counted at the client),
    /// after its flows were made by forward frames.
    const fn is_reply(self) -> bool {
        matches!(
            self,
            Self::WeirNatReply | Self::WeirFullnatReply | Self::NftNumgenReply
        )
    }
}

/// A 60-byte UDP frame `src`:`sport` -> `dst`:`dport`, from `src_mac` to `dst_mac`.
fn template(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, c| s + (u32::from(c[0]) << 8 | u32::from(c[1])));
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let csum = !u16::try_from(sum).expect("folded");
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    // UDP: the ports (one of them varied per flow by the generator), length 26, no
    // checksum.
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 26, 0, 0]);
    f.resize(60, 0);
    f
}

fn mac_of(ns: &str, ifname: &str) -> Result<[u8; 6]> {
    let out = ip(ns, &["-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = v[0]["address"].as_str().context("no address")?;
    let bytes: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
}

/// A permanent neighbour entry in `ns`: `addr` is at `mac` on `dev`.
fn neigh_permanent(ns: &str, addr: Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
    let mac = mac
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ip(
        ns,
        &[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac,
            "nud",
            "permanent",
            "dev",
            dev,
        ],
    )
    .map(drop)
}

fn rx_packets(ns: &str) -> Result<u64> {
    let out = ip(ns, &["-s", "-j", "link", "show", "dev", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet counter")
}

/// The namespaces; deleted (after stopping what runs inside) on drop.
struct Lab {
    lb: String,
    cli: String,
    backends: Vec<String>,
    workdir: PathBuf,
    namespaces: Vec<Netns>,
}

impl Lab {
    fn build() -> Result<Self> {
        let prefix = common::prefix("bpk");
        let workdir = std::env::temp_dir().join(format!("weir-bench-{prefix}"));
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(&workdir)?;
        let mut lab = Self {
            lb: format!("{prefix}-lb"),
            cli: format!("{prefix}-cli"),
            backends: (1..=BACKENDS).map(|i| format!("{prefix}-b{i}")).collect(),
            workdir,
            namespaces: Vec::new(),
        };
        let all: Vec<String> = [lab.lb.clone(), lab.cli.clone()]
            .into_iter()
            .chain(lab.backends.iter().cloned())
            .collect();
        for ns in &all {
            lab.namespaces.push(Netns::create(ns)?);
            sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
        }
        let (lb, cli) = (lab.lb.clone(), lab.cli.clone());
        ip(
            &lb,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &cli,
            ],
        )?;
        ip(&lb, &["addr", "add", &format!("{LB}/26"), "dev", "eth0"])?;
        ip(
            &cli,
            &["addr", "add", &format!("{CLIENT}/26"), "dev", "eth0"],
        )?;
        ip(&lb, &["link", "set", "eth0", "up"])?;
        ip(&cli, &["link", "set", "eth0", "up"])?;
        // The client's sink drops ARP too: the translated replies of the reply cases need
        // its neighbour entry, as do the one-arm backends, behind the client's end.
        neigh_permanent(&lb, CLIENT, mac_of(&cli, "eth0")?, "eth0")?;
        for i in 0..BACKENDS {
            neigh_permanent(&lb, one_arm_backend(i), one_arm_mac(i), "eth0")?;
        }
        for (i, b) in lab.backends.iter().enumerate() {
            let port = format!("b{}", i + 1);
            ip(
                &lb,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", b,
                ],
            )?;
            ip(
                &lb,
                &["addr", "add", &format!("{}/30", lb_side(i)), "dev", &port],
            )?;
            ip(
                b,
                &["addr", "add", &format!("{}/30", backend(i)), "dev", "eth0"],
            )?;
            ip(b, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ip(&lb, &["link", "set", &port, "up"])?;
            ip(b, &["link", "set", "eth0", "up"])?;
            // The sinks drop ARP too: the LB's neighbour entries are permanent.
            neigh_permanent(&lb, backend(i), mac_of(b, "eth0")?, &port)?;
        }
        sysctl(
            &lb,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0",
            ],
        )?;
        Ok(lab)
    }

    fn names(&self) -> Vec<String> {
        [self.lb.clone(), self.cli.clone()]
            .into_iter()
            .chain(self.backends.iter().cloned())
            .collect()
    }

    /// Frames received so far at the backends, or for `XDP_TX` (which sends back out of
    /// the ingress interface) and the replies at the client.
    fn delivered(&self, case: Case) -> Result<u64> {
        if case.to_client() {
            return rx_packets(&self.cli);
        }
        self.backends.iter().map(|b| rx_packets(b)).sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        weir_testbed::stop_processes(&self.names());
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// `weir_bench_sink` attached to a backend's `eth0`, held by a thread inside the backend's
/// namespace (so that the detach on drop happens there too).
struct Sink {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Sink {
    fn attach(ns: &str) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handle = common::spawn_in_netns(ns, "sink", move || {
            let attach = || -> Result<Ebpf> {
                let mut ebpf = datapath::load_object(1, true)?;
                let program = datapath::load_program(&mut ebpf, SINK)?;
                program.attach("eth0", XdpMode::Driver)?;
                Ok(ebpf)
            };
            match attach() {
                Ok(ebpf) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.recv();
                    drop(ebpf);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                }
            }
        })?;
        let mut sink = Self {
            stop: Some(stop_tx),
            handle: Some(handle),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(sink),
            Ok(Err(e)) => {
                sink.shutdown();
                bail!("sink in {ns}: {e}")
            }
            Err(e) => {
                sink.shutdown();
                bail!("sink in {ns}: no answer ({e})")
            }
        }
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The balancer of a Weir case: the UDP service's `forwarding`, over backends
/// `0..backends`, and for `fullnat` the `[agent] snat_ports` (`None`: the default).
#[derive(Debug, Clone, Copy)]
struct WeirSetup {
    forwarding: &'static str,
    backends: usize,
    snat_ports: Option<(u16, u16)>,
    /// The one-arm service (`ONE_ARM_VIP`, backends behind `eth0`) instead of the VIP whose
    /// backends have links of their own.
    one_arm: bool,
}

impl WeirSetup {
    const fn over_all(forwarding: &'static str) -> Self {
        Self {
            forwarding,
            backends: BACKENDS,
            snat_ports: None,
            one_arm: false,
        }
    }

    const fn one_arm(forwarding: &'static str) -> Self {
        Self {
            one_arm: true,
            ..Self::over_all(forwarding)
        }
    }
}

/// One loaded eBPF object with its generator program (and a balancer for Weir's cases).
struct Generator {
    ebpf: Ebpf,
    /// The generator's entry: `weir_bench_gen`, or Katran's `katran_gen`.
    program: &'static str,
    balancer: Option<Balancer<KernelMaps>>,
    /// Katran's per-CPU LRUs, open while its generator runs.
    _lrus: Vec<MapData>,
}

impl Generator {
    /// Loads a generator; with a setup, also configures the balancer (as the agent does:
    /// maps from the config, every interface a redirect target).
    fn load(setup: Option<WeirSetup>) -> Result<Self> {
        let mut ebpf = datapath::load_object(65_536, setup.is_none())?;
        datapath::load_program(&mut ebpf, GEN)?;
        let balancer = match setup {
            None => None,
            Some(setup) => {
                let (vip, address): (Ipv4Addr, fn(usize) -> Ipv4Addr) = if setup.one_arm {
                    (ONE_ARM_VIP, one_arm_backend)
                } else {
                    (VIP, backend)
                };
                let mut udp = (0..setup.backends).fold(
                    ServiceBuilder::new("udp", vip, PORT, "udp").forwarding(setup.forwarding),
                    |s, i| s.backend(Backend::new(address(i))),
                );
                if setup.forwarding == "fullnat" {
                    // The LB's own address (the agent checks that it is assigned; it is).
                    udp = udp.raw("snat_addresses", &format!("[\"{LB}\"]"));
                }
                if matches!(setup.forwarding, "nat" | "fullnat") {
                    // The reply cases' pairs are made once per repeat and must outlive the
                    // repeat's other cases.
                    udp = udp.udp_idle_timeout(Duration::from_secs(600));
                }
                let mut agent = ConfigBuilder::new("eth0")
                    .tunnel_source(LB)
                    .conntrack_entries(65536);
                if let Some((lo, hi)) = setup.snat_ports {
                    agent = agent.raw("snat_ports", &format!("\"{lo}-{hi}\""));
                }
                let text = agent.service(udp).render();
                let cfg = config::parse(&text, Path::new("bench-packets.toml"))?;
                let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf)?);
                balancer.apply(&plain(&cfg))?;
                // eth0 too: the NAT replies leave by it, redirected from a backend's link.
                let names = ["eth0".to_owned()]
                    .into_iter()
                    .chain((1..=BACKENDS).map(|i| format!("b{i}")));
                for name in names {
                    let index = datapath::ifindex(&name)?;
                    balancer.maps_mut().set_tx_port(index)?;
                }
                Some(balancer)
            }
        };
        Ok(Self {
            ebpf,
            program: GEN,
            balancer,
            _lrus: Vec::new(),
        })
    }

    /// Katran's generator (`katran_gen` of `katran/bench_wrapper.c`, built from the checkout
    /// of this run), balancing the one-arm VIP over the one-arm backends, as the Weir one-arm
    /// cases do; Katran sends every frame to its gateway's MAC, out of `eth0`.
    fn katran(object: &[u8]) -> Result<Self> {
        let reals: Vec<std::net::IpAddr> =
            (0..BACKENDS).map(|i| one_arm_backend(i).into()).collect();
        let vip = katran::Vip {
            addr: ONE_ARM_VIP.into(),
            port: PORT,
            proto: 17,
            reals: (1..=u32::try_from(BACKENDS)?).collect(),
        };
        let (ebpf, lrus) =
            katran::Katran::load(object, katran::GEN_PROGRAM, &reals, &[vip])?.into_parts();
        Ok(Self {
            ebpf,
            program: katran::GEN_PROGRAM,
            balancer: None,
            _lrus: lrus,
        })
    }

    /// Entries of the balancer's NAT table (two per connection).
    fn nat_entries(&self) -> Result<usize> {
        let balancer = self.balancer.as_ref().context("no balancer")?;
        Ok(balancer.maps().nat_walker()?.walk(|_, _| {})?)
    }

    /// Sets the frame and the action of the next runs: the generator writes
    /// `base..base + FLOWS` into the 16-bit field at `offset`, one value per frame.
    fn set(&mut self, frame: &[u8], action: u32, offset: u32, base: u16) -> Result<()> {
        let mut t = BenchTemplate {
            len: u32::try_from(frame.len())?,
            data: [0; BENCH_TEMPLATE_LEN],
        };
        t.data[..frame.len()].copy_from_slice(frame);
        let mut template: Array<_, BenchTemplate> = Array::try_from(
            self.ebpf
                .map_mut(map_name::BENCH_TEMPLATE)
                .context("template map")?,
        )?;
        template.set(0, t, 0)?;
        let mut settings: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(BENCH_GEN).context("BENCH_GEN map")?)?;
        for (i, v) in [action, FLOWS, offset, u32::from(base)]
            .into_iter()
            .enumerate()
        {
            settings.set(u32::try_from(i)?, v, 0)?;
        }
        Ok(())
    }

    /// The interfaces the generator's `XDP_REDIRECT` spreads its flows over (flow `n` to
    /// `ports[n % len]`).
    fn set_redirect_ports(&mut self, ports: &[u32]) -> Result<()> {
        let mut settings: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(BENCH_GEN).context("BENCH_GEN map")?)?;
        settings.set(4, u32::try_from(ports.len())?, 0)?;
        for (i, port) in ports.iter().enumerate() {
            settings.set(5 + u32::try_from(i)?, *port, 0)?;
        }
        Ok(())
    }

    /// Runs the generator for `seconds` of wall time (bounded in calls too); returns the
    /// frames generated and the time the kernel spent in its live-frames loop, summed over
    /// the calls (`BPF_PROG_TEST_RUN`'s own timer: it leaves out each call's setup, some
    /// 30 ms here, mostly the XDP dispatcher's update and its RCU grace period).
    fn run(&self, frame_len: usize, ingress: u32, seconds: f64) -> Result<(u64, f64)> {
        let generator = common::test_run::XdpRunner::new(&self.ebpf, self.program, ingress)?;
        let frame = vec![0u8; frame_len];
        let start = Instant::now();
        let mut sent = 0u64;
        let mut busy_ns = 0u128;
        // At most ~100 Mpps for `seconds`: a bound on calls whatever happens.
        let max_calls = (seconds * 100e6 / f64::from(REPEAT)).ceil() as u64 + 1;
        for _ in 0..max_calls {
            if start.elapsed().as_secs_f64() >= seconds {
                break;
            }
            let mean = generator.live_frames(&frame, REPEAT, BATCH)?;
            sent += u64::from(REPEAT);
            // The kernel reports the mean time per frame (whole ns).
            busy_ns += mean.as_nanos() * u128::from(REPEAT);
        }
        if busy_ns == 0 {
            bail!("the generator did not run");
        }
        Ok((sent, busy_ns as f64 / 1e9))
    }
}

/// Before a one-arm case is timed: its frames of the first flows, run one by one (not as live
/// frames), leave by `eth0` (`XDP_TX`) towards the client's end, which stands for the switch
/// in front of the backends, each to one of the one-arm backends (its MAC; for the tunnel,
/// also the outer destination), with the packet intact (IP-in-IP around it, or only the MACs
/// changed), and the flows reach all three: what the timed run then counts at the client is
/// balanced traffic.
fn check_one_arm(g: &Generator, frame: &[u8], case: Case, ingress: u32) -> Result<()> {
    let runner = common::test_run::XdpRunner::new(&g.ebpf, g.program, ingress)?;
    // The packet as generated: the template with its flow's source port.
    let port = usize::try_from(SRC_PORT_OFFSET)?;
    let same = |inner: &[u8]| {
        inner.len() == frame.len() - 14
            && inner[..port - 14] == frame[14..port]
            && inner[port - 12..] == frame[port + 2..]
    };
    let mut seen = [0u32; BACKENDS];
    for _ in 0..3 * FLOWS.min(64) {
        let (action, out) = runner.run(frame)?;
        if action != XDP_TX {
            bail!("{}: action {action}, not XDP_TX", case.name());
        }
        // Katran sends everything to its gateway: the outer destination tells the backend.
        let i = if case == Case::KatranOneArm {
            if out.len() < 34 || out[..6] != katran::GATEWAY_MAC {
                bail!("{}: not sent to Katran's gateway MAC", case.name());
            }
            (0..BACKENDS)
                .find(|i| out[30..34] == one_arm_backend(*i).octets())
                .with_context(|| format!("{}: outer destination is no backend", case.name()))?
        } else {
            (0..BACKENDS)
                .find(|i| out.len() >= 14 && out[..6] == one_arm_mac(*i))
                .with_context(|| format!("{}: sent to no backend's MAC", case.name()))?
        };
        let intact = if matches!(case, Case::WeirTunnelOneArm | Case::KatranOneArm) {
            // Outer IPv4 header to that backend, protocol 4 (IP-in-IP), then the packet.
            out.len() >= 34 + 14
                && out[23] == 4
                && out[30..34] == one_arm_backend(i).octets()
                && same(&out[34..])
        } else {
            out[12..14] == frame[12..14] && same(&out[14..])
        };
        if !intact {
            bail!(
                "{}: the frame to backend {i} is not the packet",
                case.name()
            );
        }
        seen[i] += 1;
    }
    if seen.contains(&0) {
        bail!(
            "{}: flows reached only some backends: {seen:?}",
            case.name()
        );
    }
    Ok(())
}

/// A generator loaded only for the cases selected.
fn loaded(g: &mut Option<Generator>) -> Result<&mut Generator> {
    g.as_mut().context("generator not loaded")
}

/// Makes a reply case's flows before its replies are sent: forward frames from the client
/// (ports `REPLY_FLOW_BASE..+FLOWS`, to the VIP) until every flow has its NAT pair (Weir)
/// or its conntrack entry translated to backend 0 (the kernel), in at most 20 calls of
/// `REPEAT` frames (about a thousand per flow each). A reply without its translation would
/// be forwarded untranslated (nat, the kernel) and counted as delivered, hence the check.
/// fullnat's pairs are FLOWS over FLOWS SNAT ports: its last flows find a free port only
/// when their random start lands near it, which the repeated frames of a flow give them.
fn prime(
    lab: &Lab,
    case: Case,
    g: &mut Generator,
    to_vip: &[u8],
    action: u32,
    ingress: u32,
) -> Result<()> {
    g.set(to_vip, action, SRC_PORT_OFFSET, REPLY_FLOW_BASE)?;
    let want = usize::try_from(FLOWS)?;
    let mut have = 0;
    for _ in 0..20 {
        // Any duration shorter than one call: one call.
        g.run(to_vip.len(), ingress, 0.01)?;
        have = if case == Case::NftNumgenReply {
            kernel_reply_flows(lab)?
        } else {
            g.nat_entries()? / 2
        };
        if have >= want {
            return Ok(());
        }
    }
    bail!("only {have} of {FLOWS} flows have a translation to reply to");
}

/// What a kernel-path case set up; undone on drop.
#[derive(Default)]
struct Active {
    children: Vec<common::ChildGuard>,
    undo: Vec<Vec<String>>,
}

impl Drop for Active {
    fn drop(&mut self) {
        while let Some(mut c) = self.children.pop() {
            c.stop();
        }
        while let Some(cmd) = self.undo.pop() {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let _ = common::run(&args);
        }
    }
}

/// DNAT of VIP:PORT to backends `0..backends` by `hash`.
fn nft_ruleset(hash: &str, backends: usize) -> String {
    let map: Vec<String> = (0..backends)
        .map(|i| format!("{i} : {}", backend(i)))
        .collect();
    format!(
        "table ip weirbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} udp dport {PORT} dnat to {hash} mod {backends} map {{ {} }}\n  }}\n}}\n",
        map.join(", ")
    )
}

/// How many of the reply cases' flows (client ports `REPLY_FLOW_BASE..+FLOWS` to VIP:PORT)
/// the LB's kernel conntrack holds translated to backend 0 (`/proc/net/nf_conntrack`).
fn kernel_reply_flows(lab: &Lab) -> Result<usize> {
    let table = ns_exec(&lab.lb, &["cat", "/proc/net/nf_conntrack"])?;
    let reply = format!("src={} dst={CLIENT} sport={PORT} dport=", backend(0));
    let ports = u32::from(REPLY_FLOW_BASE)..u32::from(REPLY_FLOW_BASE) + FLOWS;
    Ok(table
        .lines()
        .filter(|l| l.contains(&format!("dst={VIP} ")))
        .filter_map(|l| l.split_once(&reply))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|port| ports.contains(port))
        .count())
}

fn nginx_config(dir: &Path) -> String {
    let servers: String = (0..BACKENDS)
        .map(|i| format!("    server {}:{PORT};\n", backend(i)))
        .collect();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 1;\nworker_cpu_affinity 10;\nworker_rlimit_nofile 65536;\ndaemon off;\n\
         pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         stream {{\n  upstream u {{\n{servers}  }}\n  server {{\n    listen {VIP}:{PORT} udp;\n    \
         proxy_pass u;\n    proxy_timeout 60s;\n  }}\n}}\n",
        d = dir.display()
    )
}

fn start_kernel_case(lab: &Lab, case: Case) -> Result<Active> {
    let mut a = Active::default();
    let lb = lab.lb.clone();
    match case {
        Case::NftNumgen | Case::NftJhash | Case::NftNumgenReply => {
            let hash = if case == Case::NftJhash {
                "jhash ip saddr . udp sport"
            } else {
                "numgen random"
            };
            // The reply case's flows all go to backend 0, whose replies it sends (the rule
            // runs for a flow's first packet only; the replies meet the conntrack entry).
            let backends = if case == Case::NftNumgenReply {
                1
            } else {
                BACKENDS
            };
            let path = lab.workdir.join("nft.conf");
            std::fs::write(&path, nft_ruleset(hash, backends))?;
            a.undo.push(
                [
                    "ip",
                    "netns",
                    "exec",
                    &lb,
                    "nft",
                    "delete",
                    "table",
                    "ip",
                    "weirbench",
                ]
                .map(str::to_owned)
                .to_vec(),
            );
            ns_exec(&lb, &["nft", "-f", path.to_str().context("utf-8 path")?])?;
        }
        Case::NginxStream => {
            let vip = format!("{VIP}/32");
            a.undo.push(
                ["ip", "-n", &lb, "addr", "del", &vip, "dev", "lo"]
                    .map(str::to_owned)
                    .to_vec(),
            );
            ip(&lb, &["addr", "add", &vip, "dev", "lo"])?;
            let path = lab.workdir.join("nginx.conf");
            std::fs::write(&path, nginx_config(&lab.workdir))?;
            let err = lab.workdir.join("nginx-startup.log");
            let mut child = common::spawn_cmd_in_ns(
                &lb,
                "/usr/sbin/nginx",
                &[
                    "-e",
                    err.to_str().context("utf-8 path")?,
                    "-c",
                    path.to_str().context("utf-8 path")?,
                ],
            )?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = child.try_status() {
                    bail!("nginx exited ({st}): {}", child.log());
                }
                let bound = ns_exec(&lb, &["ss", "-Hlun", "sport", &format!("= :{PORT}")])?;
                if !bound.trim().is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("nginx does not listen after 10 s: {}", child.log());
                }
                thread::sleep(Duration::from_millis(50));
            }
            a.children.push(child);
        }
        _ => {}
    }
    Ok(a)
}

struct Results {
    /// Per case, per repeat: (Mpps delivered, delivered / generated).
    samples: Vec<Vec<Option<(f64, f64)>>>,
    failures: Vec<String>,
}

fn main() {
    // A run stopped from outside still removes its namespaces.
    common::remove_on_signal().expect("signal handling");
    if !common::require_root() {
        eprintln!("bench packets needs root (BPF_PROG_TEST_RUN, network namespaces)");
        std::process::exit(1);
    }
    for tool in ["/usr/sbin/nginx", "/usr/sbin/nft"] {
        if !Path::new(tool).exists() {
            eprintln!("bench packets needs {tool}: run `cargo xtask setup`");
            std::process::exit(1);
        }
    }
    let seconds: f64 = support::arg("--seconds")
        .unwrap_or(2.0_f64)
        .clamp(0.2, 30.0);
    let repeats: usize = support::arg("--repeats").unwrap_or(3).clamp(1, 20);
    // `--only a,b`: run only these cases (the ceiling always runs: ratios need it).
    let only: Option<String> = support::arg("--only");
    let selected = |case: Case| {
        case == Case::Ceiling
            || only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|n| n.trim() == case.name()))
    };
    // Katran next to Weir's one-arm rows, given a checkout (as `bench datapath`).
    let katran_object = katran::object_for_run("row");
    let selected =
        |case: Case| selected(case) && (case != Case::KatranOneArm || katran_object.is_some());
    let started = Instant::now();
    // What other processes cost while nothing of ours runs (µs per second).
    let background = support::cpu_busy_us().ok().and_then(|cpu0| {
        thread::sleep(Duration::from_secs(1));
        Some((support::cpu_busy_us().ok()? - cpu0) / started.elapsed().as_secs_f64())
    });

    let lab = Lab::build().unwrap_or_else(|e| panic!("building the namespaces: {e:#}"));
    let sinks: Vec<Sink> = lab
        .backends
        .iter()
        .chain([&lab.cli])
        .map(|ns| Sink::attach(ns))
        .collect::<Result<_>>()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let lb_mac = mac_of(&lab.lb, "eth0").expect("LB MAC");
    let cli_mac = mac_of(&lab.cli, "eth0").expect("client MAC");
    let to_vip = template(lb_mac, cli_mac, (CLIENT, SRC_PORT_BASE), (VIP, PORT));
    let to_one_arm_vip = template(
        lb_mac,
        cli_mac,
        (CLIENT, SRC_PORT_BASE),
        (ONE_ARM_VIP, PORT),
    );
    let to_backend = template(lb_mac, cli_mac, (CLIENT, SRC_PORT_BASE), (backend(0), PORT));
    // The replies of backend 0, as they arrive on its link: to the client (nat, the
    // kernel's DNAT) and to the SNAT address (fullnat).
    let lb_link_mac = mac_of(&lab.lb, "b1").expect("LB's MAC on b1");
    let b0_mac = mac_of(&lab.backends[0], "eth0").expect("backend MAC");
    let reply_to_client = template(
        lb_link_mac,
        b0_mac,
        (backend(0), PORT),
        (CLIENT, REPLY_FLOW_BASE),
    );
    let reply_to_snat = template(
        lb_link_mac,
        b0_mac,
        (backend(0), PORT),
        (LB, SNAT_PORT_BASE),
    );

    let results = common::in_netns(&lab.lb, || {
        support::pin_to(0);
        let mut r = Results {
            samples: vec![Vec::new(); CASES.len()],
            failures: Vec::new(),
        };
        let ingress = datapath::ifindex("eth0").expect("eth0");
        let backend_link = datapath::ifindex("b1").expect("b1");
        let mut plain = Generator::load(None).expect("generator");
        let mut tunnel =
            Generator::load(Some(WeirSetup::over_all("tunnel"))).expect("Weir tunnel generator");
        let mut direct =
            Generator::load(Some(WeirSetup::over_all("direct"))).expect("Weir direct generator");
        let mut tunnel_one_arm = Generator::load(Some(WeirSetup::one_arm("tunnel")))
            .expect("Weir one-arm tunnel generator");
        let mut direct_one_arm = Generator::load(Some(WeirSetup::one_arm("direct")))
            .expect("Weir one-arm direct generator");
        let links: Vec<u32> = (1..=BACKENDS)
            .map(|i| datapath::ifindex(&format!("b{i}")))
            .collect::<Result<_, _>>()
            .expect("backend links");
        plain.set_redirect_ports(&links).expect("redirect ports");
        // The NAT modes' objects (each with its own NAT table) only when their case runs.
        // The reply cases balance to backend 0 alone, so that every flow's reply comes from
        // the backend whose frames the generator sends; fullnat's has exactly FLOWS SNAT
        // ports, so that the ports in use are known once every flow has its pair.
        let load_for = |case: Case, setup: WeirSetup| {
            selected(case).then(|| {
                Generator::load(Some(setup))
                    .unwrap_or_else(|e| panic!("{} generator: {e:#}", case.name()))
            })
        };
        let mut katran_one_arm = katran_object
            .as_deref()
            .filter(|_| selected(Case::KatranOneArm))
            .map(|object| {
                Generator::katran(object).unwrap_or_else(|e| panic!("Katran generator: {e:#}"))
            });
        let mut nat = load_for(Case::WeirNat, WeirSetup::over_all("nat"));
        let mut fullnat = load_for(Case::WeirFullnat, WeirSetup::over_all("fullnat"));
        let mut nat_reply = load_for(
            Case::WeirNatReply,
            WeirSetup {
                forwarding: "nat",
                backends: 1,
                snat_ports: None,
                one_arm: false,
            },
        );
        let last_snat_port = SNAT_PORT_BASE + u16::try_from(FLOWS - 1).expect("few flows");
        let mut fullnat_reply = load_for(
            Case::WeirFullnatReply,
            WeirSetup {
                forwarding: "fullnat",
                backends: 1,
                snat_ports: Some((SNAT_PORT_BASE, last_snat_port)),
                one_arm: false,
            },
        );
        let total = repeats * CASES.iter().filter(|c| selected(**c)).count();
        let mut done = 0;
        for rep in 0..repeats {
            let mut order: Vec<usize> = (0..CASES.len()).collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let case = CASES[i];
                if !selected(case) {
                    continue;
                }
                done += 1;
                print!(
                    "[{done}/{total}, {:.0} s] repeat {}, {:<15}",
                    started.elapsed().as_secs_f64(),
                    rep + 1,
                    case.name()
                );
                let outcome = (|| -> Result<(f64, f64)> {
                    let _active = start_kernel_case(&lab, case)?;
                    let (g, frame, action) = match case {
                        Case::Ceiling => (&mut plain, &to_vip, XDP_DROP),
                        Case::XdpTx => (&mut plain, &to_vip, XDP_TX),
                        Case::XdpRedirect => (&mut plain, &to_vip, XDP_REDIRECT),
                        Case::WeirTunnel => (&mut tunnel, &to_vip, ACTION_BALANCE),
                        Case::WeirDirect => (&mut direct, &to_vip, ACTION_BALANCE),
                        Case::WeirTunnelOneArm => {
                            (&mut tunnel_one_arm, &to_one_arm_vip, ACTION_BALANCE)
                        }
                        Case::WeirDirectOneArm => {
                            (&mut direct_one_arm, &to_one_arm_vip, ACTION_BALANCE)
                        }
                        Case::KatranOneArm => (
                            loaded(&mut katran_one_arm)?,
                            &to_one_arm_vip,
                            ACTION_BALANCE,
                        ),
                        Case::WeirNat => (loaded(&mut nat)?, &to_vip, ACTION_BALANCE),
                        Case::WeirFullnat => (loaded(&mut fullnat)?, &to_vip, ACTION_BALANCE),
                        Case::WeirNatReply => {
                            (loaded(&mut nat_reply)?, &reply_to_client, ACTION_BALANCE)
                        }
                        Case::WeirFullnatReply => {
                            (loaded(&mut fullnat_reply)?, &reply_to_snat, ACTION_BALANCE)
                        }
                        Case::NftNumgenReply => (&mut plain, &reply_to_client, XDP_PASS),
                        Case::KernelForward => (&mut plain, &to_backend, XDP_PASS),
                        _ => (&mut plain, &to_vip, XDP_PASS),
                    };
                    // Forward frames vary the client's port and come from the client's
                    // side; replies vary their destination port (the client's, or the
                    // SNAT port) and arrive on backend 0's link.
                    let (offset, base, from) = match case {
                        Case::WeirNatReply | Case::NftNumgenReply => {
                            (DST_PORT_OFFSET, REPLY_FLOW_BASE, backend_link)
                        }
                        Case::WeirFullnatReply => (DST_PORT_OFFSET, SNAT_PORT_BASE, backend_link),
                        _ => (SRC_PORT_OFFSET, SRC_PORT_BASE, ingress),
                    };
                    if case.is_reply() {
                        prime(&lab, case, g, &to_vip, action, ingress)?;
                    }
                    g.set(frame, action, offset, base)?;
                    if matches!(
                        case,
                        Case::WeirTunnelOneArm | Case::WeirDirectOneArm | Case::KatranOneArm
                    ) {
                        check_one_arm(g, frame, case, ingress)?;
                    }
                    // Warm-up: connection tables, nginx's sessions, caches.
                    g.run(frame.len(), from, 0.3)?;
                    let before = lab.delivered(case)?;
                    let (sent, busy) = g.run(frame.len(), from, seconds)?;
                    let delivered = lab.delivered(case)? - before;
                    if delivered == 0 && case != Case::Ceiling {
                        bail!(
                            "no packet reached the {} ({sent} generated)",
                            if case.to_client() {
                                "client"
                            } else {
                                "backends"
                            }
                        );
                    }
                    let rate = if case == Case::Ceiling {
                        sent as f64 / busy
                    } else {
                        delivered as f64 / busy
                    };
                    Ok((rate / 1e6, delivered as f64 / sent as f64))
                })();
                match outcome {
                    Ok((mpps, share)) => {
                        println!(" {mpps:6.2} Mpps ({:.0}% of generated)", share * 100.0);
                        r.samples[i].push(Some((mpps, share)));
                    }
                    Err(e) => {
                        println!(" FAILED: {e:#}");
                        r.failures
                            .push(format!("{}, repeat {}: {e:#}", case.name(), rep + 1));
                        r.samples[i].push(None);
                    }
                }
            }
        }
        r
    });
    drop(sinks);
    drop(lab);
    report(&results, seconds, repeats, background, only.is_none());
    println!(
        "bench packets took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

fn report(r: &Results, seconds: f64, repeats: usize, background: Option<f64>, full: bool) {
    let spread = |i: usize| -> Option<Spread> {
        let v: Vec<f64> = r.samples[i].iter().flatten().map(|s| s.0).collect();
        Spread::of(&v)
    };
    let ceiling = spread(0);
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let s = spread(i);
        // Only the cases that ran (`--only`; Katran's only when a checkout was given). One
        // that ran and failed has its repeats, as `None`, and shows "failed".
        if r.samples[i].is_empty() {
            continue;
        }
        // Per repeat ratio to that repeat's ceiling.
        let ratios: Vec<f64> = r.samples[i]
            .iter()
            .zip(&r.samples[0])
            .filter_map(|(a, c)| Some(a.as_ref()?.0 / c.as_ref()?.0))
            .collect();
        let ratio = Spread::of(&ratios);
        let ns = s.map_or_else(String::new, |s| format!("{:.0}", 1e3 / s.median));
        let over = match (s, ceiling) {
            (Some(s), Some(c)) if *case != Case::Ceiling => {
                format!("{:+.0}", 1e3 / s.median - 1e3 / c.median)
            }
            _ => String::new(),
        };
        rows.push(vec![
            case.label().to_owned(),
            support::show_opt(s, 2),
            ns,
            over,
            if *case == Case::Ceiling {
                "1".to_owned()
            } else {
                support::show_opt(ratio, 3)
            },
        ]);
        json_rows.push(serde_json::json!({
            "name": case.name(),
            "label": case.label(),
            "mpps": support::json_opt(s),
            "ratio_to_ceiling": support::json_opt(ratio),
        }));
    }
    rows.push(vec![
        "HAProxy 2.6".to_owned(),
        "n/a: HAProxy proxies TCP only, not UDP".to_owned(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    let table = support::table(
        &[
            "path",
            "Mpps delivered",
            "ns/packet",
            "ns over ceiling",
            "ratio to ceiling",
        ],
        1,
        &rows,
    );

    let median = |c: Case| {
        CASES
            .iter()
            .position(|x| *x == c)
            .and_then(spread)
            .map(|s| s.median)
    };
    let mut targets = String::new();
    let _ = writeln!(
        targets,
        "| target (medians) | measured | target | verdict |"
    );
    let _ = writeln!(targets, "|---|---:|---:|---|");
    // Issue 10: the balancer next to merely forwarding the frame the same way: one arm
    // (out of the ingress interface, `XDP_TX`) against the XDP_TX floor; backends behind
    // links of their own (`XDP_REDIRECT`) against the redirect floor.
    for (weir, floor) in [
        (Case::WeirTunnelOneArm, Case::XdpTx),
        (Case::WeirDirectOneArm, Case::XdpTx),
        (Case::WeirTunnel, Case::XdpRedirect),
        (Case::WeirDirect, Case::XdpRedirect),
    ] {
        if let (Some(w), Some(f)) = (median(weir), median(floor)) {
            let x = w / f;
            let _ = writeln!(
                targets,
                "| {} / {} | {w:.2} / {f:.2} = {x:.3} | at least 0.8 | {} |",
                weir.name(),
                floor.name(),
                if x >= 0.8 { "met" } else { "MISSED" }
            );
        }
    }
    // Katran in the same place as the one-arm tunnel, for scale: what the reference reaches
    // of the same floor, and Weir against it.
    if let (Some(k), Some(f)) = (median(Case::KatranOneArm), median(Case::XdpTx)) {
        let _ = writeln!(
            targets,
            "| {} / {} (reference) | {k:.2} / {f:.2} = {:.3} | | |",
            Case::KatranOneArm.name(),
            Case::XdpTx.name(),
            k / f
        );
        if let Some(w) = median(Case::WeirTunnelOneArm) {
            let _ = writeln!(
                targets,
                "| {} / {} (reference) | {w:.2} / {k:.2} = {:.3} | | |",
                Case::WeirTunnelOneArm.name(),
                Case::KatranOneArm.name(),
                w / k
            );
        }
    }
    for weir in [Case::WeirTunnel, Case::WeirDirect] {
        if let (Some(w), Some(c)) = (median(weir), ceiling.map(|c| c.median)) {
            let x = w / c;
            let _ = writeln!(
                targets,
                "| {} / ceiling | {w:.2} / {c:.2} = {x:.3} | at least 0.75 | {} |",
                weir.name(),
                if x >= 0.75 { "met" } else { "MISSED" }
            );
        }
        for nft in [Case::NftNumgen, Case::NftJhash] {
            if let (Some(w), Some(n)) = (median(weir), median(nft)) {
                let x = w / n;
                let _ = writeln!(
                    targets,
                    "| {} / {} | {w:.2} / {n:.2} = {x:.2} | at least 5 | {} |",
                    weir.name(),
                    nft.name(),
                    if x >= 5.0 { "met" } else { "MISSED" }
                );
            }
        }
    }
    // Issue 12: the NAT modes at least 3x the kernel's DNAT, each direction against the
    // kernel's same direction.
    for (weir, nft) in [
        (Case::WeirNat, Case::NftNumgen),
        (Case::WeirFullnat, Case::NftNumgen),
        (Case::WeirNatReply, Case::NftNumgenReply),
        (Case::WeirFullnatReply, Case::NftNumgenReply),
    ] {
        let line = match (median(weir), median(nft)) {
            (Some(w), Some(n)) => {
                let x = w / n;
                format!(
                    "| {} / {} | {w:.2} / {n:.2} = {x:.2} | at least 3 | {} |",
                    weir.name(),
                    nft.name(),
                    if x >= 3.0 { "met" } else { "MISSED" }
                )
            }
            _ => format!(
                "| {} / {} | not measured | at least 3 | n/a |",
                weir.name(),
                nft.name()
            ),
        };
        let _ = writeln!(targets, "{line}");
    }
    let mut body = format!(
        "Measured by `cargo xtask bench packets` on {}: 60-byte UDP frames over {FLOWS} flows, \
         {seconds} s per case after a 0.3 s warm-up, {repeats} interleaved repeats, one \
         generator core; median (min–max). The ceiling counts generated frames; the reply \
         rows count frames received at the client, every other row frames received at the \
         backends. The reply rows send backend 0's answers to the flows made just before by \
         forward frames (a service, or nftables map, of backend 0 alone; fullnat with exactly \
         {FLOWS} SNAT ports, all in use), as they arrive on backend 0's link; the balancer \
         translates them back to the VIP and sends them to the client.\n\n{table}\n{targets}",
        support::machine()
    );
    if let Some(bg) = background {
        let bg = bg / 1e4;
        let _ = write!(
            body,
            "\nThe machine before the bench, without traffic (other processes): busy {bg:.1}% \
             of one core.{}\n",
            if bg > 5.0 {
                " Something else ran: the generator's core was shared."
            } else {
                ""
            }
        );
    }
    if !r.failures.is_empty() {
        let _ = write!(body, "\nFailures:\n\n- {}\n", r.failures.join("\n- "));
    }
    println!("\n{body}");
    // A subset (`--only`) is an experiment: docs/BENCHMARKS.md keeps its full table.
    if full {
        support::write_doc_section("packets", &body);
    }
    support::write_json(&serde_json::json!({
        "bench": "packets",
        "machine": support::machine(),
        "seconds": seconds,
        "repeats": repeats,
        "flows": FLOWS,
        "rows": json_rows,
    }));
}
