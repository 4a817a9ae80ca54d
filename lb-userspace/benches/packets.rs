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
//! * Weir (tunnel, direct): runs the balancer's own code (`run_balancer`, as
//!   `weir_balancer`), whose `XDP_REDIRECT` really transmits to the backend's veth;
//! * kernel paths (nftables DNAT, nginx stream, plain forwarding): returns `XDP_PASS`, so
//!   the frame enters the LB's network stack as received on `eth0`.
//!
//! Topology (namespaces `w<pid>bpk-*`): the LB's `eth0` (peer in a client namespace, only
//! to be up) and one veth per backend (`b1`..`b3`, each its own /30). Each backend's end
//! has `weir_bench_sink` (XDP_DROP) attached, so every balancer's output costs the same to
//! receive; packets are counted from the backends' interface counters (the client's end
//! also has a sink, for the forwarding floor). Everything runs on
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
//! (cases by name; the ceiling always runs).

#[path = "../../tests/common/mod.rs"]
mod common;
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
use aya::{Ebpf, maps::Array, programs::XdpMode};
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

const FLOWS: u32 = 1000;
const SRC_PORT_BASE: u16 = 10_000;
/// Offset of the UDP source port in the template (Ethernet 14 + IPv4 20).
const SRC_PORT_OFFSET: u32 = 34;
const PORT: u16 = 4000;
const BACKENDS: usize = 3;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const LB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
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
    WeirTunnel,
    WeirDirect,
    NftNumgen,
    NftJhash,
    NginxStream,
    KernelForward,
}

const CASES: [Case; 8] = [
    Case::Ceiling,
    Case::XdpTx,
    Case::WeirTunnel,
    Case::WeirDirect,
    Case::NftNumgen,
    Case::NftJhash,
    Case::NginxStream,
    Case::KernelForward,
];

impl Case {
    const fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "xdp-drop",
            Self::XdpTx => "xdp-tx",
            Self::WeirTunnel => "weir-tunnel",
            Self::WeirDirect => "weir-direct",
            Self::NftNumgen => "nft-numgen",
            Self::NftJhash => "nft-jhash",
            Self::NginxStream => "nginx-stream",
            Self::KernelForward => "kernel-forward",
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Ceiling => "generator into XDP_DROP (ceiling)",
            Self::XdpTx => "generator into XDP_TX, no balancing (forwarding floor)",
            Self::WeirTunnel => "Weir, tunnel (IP-in-IP)",
            Self::WeirDirect => "Weir, direct (L2 DSR)",
            Self::NftNumgen => "nftables DNAT, numgen random",
            Self::NftJhash => "nftables DNAT, jhash",
            Self::NginxStream => "nginx 1.22 stream (UDP), 1 worker",
            Self::KernelForward => "kernel IP forwarding, no NAT (reference)",
        }
    }
}

/// The 60-byte UDP frame: client -> `dst`:PORT, from the client's MAC to the LB's.
fn template(lb_mac: [u8; 6], cli_mac: [u8; 6], dst: Ipv4Addr) -> Vec<u8> {
    let mut f = lb_mac.to_vec();
    f.extend_from_slice(&cli_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&CLIENT.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, c| s + (u32::from(c[0]) << 8 | u32::from(c[1])));
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let csum = !u16::try_from(sum).expect("folded");
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    // UDP: source port (varied per flow by the generator), PORT, length 26, no checksum.
    f.extend_from_slice(&SRC_PORT_BASE.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
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
            let mac = mac_of(b, "eth0")?;
            let mac = mac
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            ip(
                &lb,
                &[
                    "neigh",
                    "replace",
                    &backend(i).to_string(),
                    "lladdr",
                    &mac,
                    "nud",
                    "permanent",
                    "dev",
                    &port,
                ],
            )?;
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
    /// the ingress interface) at the client.
    fn delivered(&self, case: Case) -> Result<u64> {
        if case == Case::XdpTx {
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

/// One loaded eBPF object with its generator program (and a balancer for Weir's cases).
struct Generator {
    ebpf: Ebpf,
    _balancer: Option<Balancer<KernelMaps>>,
}

impl Generator {
    /// Loads a generator; with `forwarding`, also configures the balancer (as the agent
    /// does: maps from the config, every interface a redirect target).
    fn load(forwarding: Option<&str>) -> Result<Self> {
        let mut ebpf = datapath::load_object(65_536, forwarding.is_none())?;
        datapath::load_program(&mut ebpf, GEN)?;
        let balancer = match forwarding {
            None => None,
            Some(forwarding) => {
                let udp = (0..BACKENDS).fold(
                    ServiceBuilder::new("udp", VIP, PORT, "udp").forwarding(forwarding),
                    |s, i| s.backend(Backend::new(backend(i))),
                );
                let text = ConfigBuilder::new("eth0")
                    .tunnel_source(LB)
                    .conntrack_entries(65536)
                    .service(udp)
                    .render();
                let cfg = config::parse(&text, Path::new("bench-packets.toml"))?;
                let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf)?);
                balancer.apply(&plain(&cfg))?;
                for i in 1..=BACKENDS {
                    let index = datapath::ifindex(&format!("b{i}"))?;
                    balancer.maps_mut().set_tx_port(index)?;
                }
                Some(balancer)
            }
        };
        Ok(Self {
            ebpf,
            _balancer: balancer,
        })
    }

    /// Sets the frame and the action of the next runs.
    fn set(&mut self, frame: &[u8], action: u32) -> Result<()> {
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
        for (i, v) in [action, FLOWS, SRC_PORT_OFFSET, u32::from(SRC_PORT_BASE)]
            .into_iter()
            .enumerate()
        {
            settings.set(u32::try_from(i)?, v, 0)?;
        }
        Ok(())
    }

    /// Runs the generator for `seconds` of wall time (bounded in calls too); returns the
    /// frames generated and the time the kernel spent in its live-frames loop, summed over
    /// the calls (`BPF_PROG_TEST_RUN`'s own timer: it leaves out each call's setup, some
    /// 30 ms here, mostly the XDP dispatcher's update and its RCU grace period).
    fn run(&self, frame_len: usize, ingress: u32, seconds: f64) -> Result<(u64, f64)> {
        let generator = common::test_run::XdpRunner::new(&self.ebpf, GEN, ingress)?;
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

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch that set and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            eprintln!("warning: cannot pin the generator to CPU {cpu}");
        }
    }
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

fn nft_ruleset(hash: &str) -> String {
    let map: Vec<String> = (0..BACKENDS)
        .map(|i| format!("{i} : {}", backend(i)))
        .collect();
    format!(
        "table ip weirbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} udp dport {PORT} dnat to {hash} mod {BACKENDS} map {{ {} }}\n  }}\n}}\n",
        map.join(", ")
    )
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
        Case::NftNumgen | Case::NftJhash => {
            let hash = if case == Case::NftNumgen {
                "numgen random"
            } else {
                "jhash ip saddr . udp sport"
            };
            let path = lab.workdir.join("nft.conf");
            std::fs::write(&path, nft_ruleset(hash))?;
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
    let to_vip = template(lb_mac, cli_mac, VIP);
    let to_backend = template(lb_mac, cli_mac, backend(0));

    let results = common::in_netns(&lab.lb, || {
        pin_to(0);
        let mut r = Results {
            samples: vec![Vec::new(); CASES.len()],
            failures: Vec::new(),
        };
        let ingress = datapath::ifindex("eth0").expect("eth0");
        let mut plain = Generator::load(None).expect("generator");
        let mut tunnel = Generator::load(Some("tunnel")).expect("Weir tunnel generator");
        let mut direct = Generator::load(Some("direct")).expect("Weir direct generator");
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
                        Case::WeirTunnel => (&mut tunnel, &to_vip, ACTION_BALANCE),
                        Case::WeirDirect => (&mut direct, &to_vip, ACTION_BALANCE),
                        Case::KernelForward => (&mut plain, &to_backend, XDP_PASS),
                        _ => (&mut plain, &to_vip, XDP_PASS),
                    };
                    g.set(frame, action)?;
                    // Warm-up: connection tables, nginx's sessions, caches.
                    g.run(frame.len(), ingress, 0.3)?;
                    let before = lab.delivered(case)?;
                    let (sent, busy) = g.run(frame.len(), ingress, seconds)?;
                    let delivered = lab.delivered(case)? - before;
                    if delivered == 0 && case != Case::Ceiling {
                        bail!("no packet reached the backends ({sent} generated)");
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
    report(&results, seconds, repeats, background);
    println!(
        "bench packets took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

fn report(r: &Results, seconds: f64, repeats: usize, background: Option<f64>) {
    let spread = |i: usize| -> Option<Spread> {
        let v: Vec<f64> = r.samples[i].iter().flatten().map(|s| s.0).collect();
        Spread::of(&v)
    };
    let ceiling = spread(0);
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let s = spread(i);
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
            "Mpps at the backends",
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
        // Issue 10: the balancer's work next to merely forwarding the frame.
        if let (Some(w), Some(f)) = (median(weir), median(Case::XdpTx)) {
            let x = w / f;
            let _ = writeln!(
                targets,
                "| {} / forwarding floor | {w:.2} / {f:.2} = {x:.3} | at least 0.8 | {} |",
                weir.name(),
                if x >= 0.8 { "met" } else { "MISSED" }
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
    let mut body = format!(
        "Measured by `cargo xtask bench packets` on {}: 60-byte UDP frames over {FLOWS} flows, \
         {seconds} s per case after a 0.3 s warm-up, {repeats} interleaved repeats, one \
         generator core; median (min–max). The ceiling counts generated frames; every \
         other row counts frames received at the backends.\n\n{table}\n{targets}",
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
    support::write_doc_section("packets", &body);
    support::write_json(&serde_json::json!({
        "bench": "packets",
        "machine": support::machine(),
        "seconds": seconds,
        "repeats": repeats,
        "flows": FLOWS,
        "rows": json_rows,
    }));
}
