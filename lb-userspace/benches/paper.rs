//! `cargo xtask bench paper`: the experiment of the study Weir grew from, reproduced with real
//! parts: NGINX in front of three Flask web servers, compared per balancing method, with
//! httperf as the load and per-backend throughput, loss, delay and jitter read from a
//! capture; and Weir measured the same way, in the same run.
//!
//! Topology: the test bed's fullnat layout (`common::Topology::build_fullnat`, namespaces
//! `w<pid>bpp-*`): client 203.0.113.130/25, the balancer on a stick at 198.51.100.1 (and
//! 203.0.113.129), three stock backends 198.51.100.11-13 with no route beyond their subnet,
//! each running Debian's Flask (`weir_testbed::webapp`) on port 80. What a configuration
//! needs on top it adds for its runs and removes after them:
//!
//! * `none → Flask A/B/C`: no balancer, the client straight to one backend (the paper's
//!   baseline), over on-link routes both ways;
//! * `NGINX round-robin / least_conn / ip_hash`: Debian's nginx on the balancer, one worker,
//!   the VIP on its `lo`, `proxy_pass` over HTTP/1.0 to the backends, as the paper did;
//! * `Weir fullnat` with `round-robin`, `least-conn`, `ip-hash`, `maglev`: the paper's
//!   topology (the backends see the balancer's address, one per scheduler: `snat_address`);
//! * `Weir nat` with the same four schedulers: the backends route via the balancer;
//! * `Weir tunnel maglev`: IP-in-IP to `weir decap` on the backends, which answer the client
//!   directly (the VIP on their `lo`, an on-link route to the client's subnet).
//!
//! Load: `httperf --rate R --num-conns N --num-calls 1` from the client (one request per
//! connection, as httperf's default and Werkzeug's server both do), `--runs` rounds; in each
//! round every configuration runs once (the order reverses every other round), each with both
//! client modes: one client address (the paper's), and 50 (the client's SNAT over
//! 203.0.113.131-180, round robin per connection, by nftables in the client's namespace).
//! Each run is captured on the client's veth (tcpdump, `tcp port 80`); the captures are
//! dissected by tshark after all runs (so tshark's CPU does not fall into a run) and read by
//! `weir_testbed::qos`, which defines every figure. CPU per request: the balancer's own
//! (the scheduler run time of every thread of the processes in the balancer's namespace, plus
//! the run time of Weir's XDP programs, and `weir decap`'s, from the kernel's BPF
//! statistics); not the whole machine's, which httperf's busy polling fills whatever the
//! balancer.
//!
//! Arguments: `--runs N` (default 10), `--requests N` (default 1000), `--rate R` (requests
//! per second, default 500), `--only a,b` (configuration names, e.g. `nginx-rr,fullnat-rr`),
//! `--keep-captures` (leave the pcap files in `$TMPDIR/weir-paper-captures`).
//! Writes docs/PAPER.md, and the JSON results `cargo xtask bench` draws docs/bench-paper.png
//! from. Nothing here asserts a figure: targets are reported as met or missed.

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{
    BACKENDS, Backend, ChildGuard, LB_V4, NAT_CLIENT_V4, NODE_IF, ServiceBuilder, Topology, VIP_V4,
    backend_v4, ip, ns_exec, sysctl,
};
use support::Spread;
use weir_testbed::{
    qos::{self, CaptureQos, Httperf},
    webapp,
};

/// The backends' names, as their `X-Backend` header says them (the paper's Flask A, B, C).
const NAMES: [&str; BACKENDS] = ["A", "B", "C"];
const HTTP_PORT: u16 = 80;
/// The 50-address client mode: 203.0.113.131..=180, on the client's /25.
const CLIENTS: u8 = 50;
const FIRST_CLIENT: u8 = 131;
/// The client's subnet (its /25), for the routes of the DSR and baseline configurations.
const CLIENT_NET: &str = "203.0.113.128/25";
/// Snap length: every header of a response (the `X-Backend` line is in the headers, which
/// Werkzeug and nginx send in one segment of under 300 bytes).
const SNAPLEN: &str = "512";
/// tcpdump's capture buffer, KiB: room for a whole run's frames, so that a capture thread
/// that the busy machine schedules late loses none (those would read as missing segments).
const CAPTURE_BUFFER_KIB: &str = "65536";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    RoundRobin,
    LeastConn,
    IpHash,
    Maglev,
}

const METHODS: [Method; 4] = [
    Method::RoundRobin,
    Method::LeastConn,
    Method::IpHash,
    Method::Maglev,
];

impl Method {
    const fn short(self) -> &'static str {
        match self {
            Self::RoundRobin => "rr",
            Self::LeastConn => "lc",
            Self::IpHash => "ih",
            Self::Maglev => "maglev",
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::RoundRobin => "round robin",
            Self::LeastConn => "least connection",
            Self::IpHash => "IP hash",
            Self::Maglev => "Maglev",
        }
    }

    /// Weir's `scheduler`.
    const fn weir(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::LeastConn => "least-conn",
            Self::IpHash => "ip-hash",
            Self::Maglev => "maglev",
        }
    }

    /// nginx's upstream directive (round robin is its default: none).
    const fn nginx(self) -> Option<&'static str> {
        match self {
            Self::RoundRobin | Self::Maglev => None,
            Self::LeastConn => Some("least_conn;"),
            Self::IpHash => Some("ip_hash;"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Balancer {
    /// No balancer: straight to backend `i`.
    None(usize),
    Nginx(Method),
    Fullnat(Method),
    Nat(Method),
    Tunnel(Method),
}

impl Balancer {
    fn all() -> Vec<Self> {
        let mut v: Vec<Self> = (0..BACKENDS).map(Self::None).collect();
        v.extend([Method::RoundRobin, Method::LeastConn, Method::IpHash].map(Self::Nginx));
        v.extend(METHODS.map(Self::Fullnat));
        v.extend(METHODS.map(Self::Nat));
        v.push(Self::Tunnel(Method::Maglev));
        v
    }

    fn name(self) -> String {
        match self {
            Self::None(i) => format!("none-{}", NAMES[i].to_lowercase()),
            Self::Nginx(m) => format!("nginx-{}", m.short()),
            Self::Fullnat(m) => format!("fullnat-{}", m.short()),
            Self::Nat(m) => format!("nat-{}", m.short()),
            Self::Tunnel(m) => format!("tunnel-{}", m.short()),
        }
    }

    fn label(self) -> String {
        match self {
            Self::None(i) => format!("no balancer → Flask {}", NAMES[i]),
            Self::Nginx(m) => format!("NGINX, {}", m.label()),
            Self::Fullnat(m) => format!("Weir fullnat, {}", m.label()),
            Self::Nat(m) => format!("Weir nat, {}", m.label()),
            Self::Tunnel(m) => format!("Weir tunnel (DSR), {}", m.label()),
        }
    }

    const fn method(self) -> Option<Method> {
        match self {
            Self::None(_) => None,
            Self::Nginx(m) | Self::Fullnat(m) | Self::Nat(m) | Self::Tunnel(m) => Some(m),
        }
    }

    const fn is_baseline(self) -> bool {
        matches!(self, Self::None(_))
    }

    /// Where httperf sends its requests.
    fn server(self) -> Ipv4Addr {
        match self {
            Self::None(i) => backend_v4(i),
            _ => VIP_V4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clients {
    One,
    Fifty,
}

const CLIENT_MODES: [Clients; 2] = [Clients::One, Clients::Fifty];

impl Clients {
    const fn label(self) -> &'static str {
        match self {
            Self::One => "one client address",
            Self::Fifty => "50 client addresses",
        }
    }

    const fn short(self) -> &'static str {
        match self {
            Self::One => "1",
            Self::Fifty => "50",
        }
    }
}

fn client_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, FIRST_CLIENT + i)
}

/// The bench's namespaces and servers; dropping it stops everything and removes them.
struct Lab {
    /// The Flask servers: stopped (dropped) before the namespaces go.
    _flask: Vec<ChildGuard>,
    topo: Topology,
}

impl Lab {
    fn build() -> Result<Self> {
        let topo = Topology::build_fullnat("bpp").context("the fullnat topology")?;
        let app = webapp::write_app(&topo.workdir)?;
        let mut flask = Vec::new();
        for (i, b) in topo.backends.iter().enumerate() {
            sysctl(b, &["net.core.somaxconn=4096"])?;
            let args = webapp::args(&app, NAMES[i], HTTP_PORT);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut child = common::spawn_cmd_in_ns(b, webapp::PYTHON, &args)?;
            wait_listening(b, &mut child, "flask")?;
            flask.push(child);
        }
        // Ephemeral ports and TIME_WAIT: thousands of connections per run.
        for ns in [&topo.cli, &topo.lb] {
            sysctl(
                ns,
                &[
                    "net.ipv4.ip_local_port_range=1024 60999",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=4096",
                ],
            )?;
        }
        // The fullnat configurations' SNAT addresses, on the backends' subnet.
        for m in METHODS {
            ip(
                &topo.lb,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", snat_address(m)),
                    "dev",
                    NODE_IF,
                ],
            )?;
        }
        // The 50 client addresses, and the balancer's neighbour entries for them (its XDP
        // program sends translated replies to the client's MAC from the kernel's table).
        for i in 0..CLIENTS {
            ip(
                &topo.cli,
                &[
                    "addr",
                    "add",
                    &format!("{}/25", client_addr(i)),
                    "dev",
                    NODE_IF,
                ],
            )?;
        }
        let lab = Self {
            _flask: flask,
            topo,
        };
        lab.prime_clients()?;
        Ok(lab)
    }

    /// One ping from the balancer to each client address.
    fn prime_clients(&self) -> Result<()> {
        for a in std::iter::once(NAT_CLIENT_V4).chain((0..CLIENTS).map(client_addr)) {
            ns_exec(
                &self.topo.lb,
                &[
                    "ping",
                    "-q",
                    "-n",
                    "-c",
                    "1",
                    "-w",
                    "2",
                    "-W",
                    "1",
                    &a.to_string(),
                ],
            )
            .with_context(|| format!("ping {a} from the balancer"))?;
        }
        Ok(())
    }
}

/// Waits until something listens on TCP port 80 in `ns`, failing early if `child` exits.
fn wait_listening(ns: &str, child: &mut ChildGuard, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_status() {
            bail!("{what} in {ns} exited ({st}); its log:\n{}", child.log());
        }
        if !ns_exec(ns, &["ss", "-Hltn", "sport", "= :80"])?
            .trim()
            .is_empty()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} in {ns} does not listen after 15 s:\n{}",
                child.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// What a configuration left behind: processes (stopped first) and undo steps (in reverse).
#[derive(Default)]
struct Active<'a> {
    children: Vec<ChildGuard>,
    /// Processes whose CPU and BPF programs count as the balancer's, besides the ones in
    /// the balancer's namespace.
    extra_pids: Vec<u32>,
    undo: Vec<Box<dyn FnOnce() -> Result<()> + 'a>>,
}

impl Active<'_> {
    /// `ip -n NS ARGS...` now, and `ip -n NS UNDO...` on teardown.
    fn ip_undo(&mut self, ns: &str, args: &[&str], undo: &[&str]) -> Result<()> {
        ip(ns, args)?;
        let (ns, undo): (String, Vec<String>) = (
            ns.to_owned(),
            undo.iter().map(|s| (*s).to_owned()).collect(),
        );
        self.undo.push(Box::new(move || {
            let undo: Vec<&str> = undo.iter().map(String::as_str).collect();
            ip(&ns, &undo).map(drop)
        }));
        Ok(())
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        while let Some(mut c) = self.children.pop() {
            c.stop();
        }
        while let Some(step) = self.undo.pop() {
            if let Err(e) = step() {
                eprintln!("warning: teardown step failed: {e:#}");
            }
        }
    }
}

fn nginx_config(dir: &Path, method: Method) -> String {
    let d = dir.display();
    let servers: String = (0..BACKENDS)
        .map(|i| format!("    server {}:{HTTP_PORT};\n", backend_v4(i)))
        .collect();
    let directive = method
        .nginx()
        .map(|d| format!("    {d}\n"))
        .unwrap_or_default();
    format!(
        "worker_processes 1;\nworker_rlimit_nofile 16384;\ndaemon off;\n\
         pid {d}/lb-nginx.pid;\nerror_log {d}/lb-nginx-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n\
         \x20 client_body_temp_path {d}/lb-body;\n  proxy_temp_path {d}/lb-proxy;\n\
         \x20 fastcgi_temp_path {d}/lb-fastcgi;\n  uwsgi_temp_path {d}/lb-uwsgi;\n\
         \x20 scgi_temp_path {d}/lb-scgi;\n\
         \x20 upstream flask {{\n{directive}{servers}  }}\n\
         \x20 server {{\n    listen {VIP_V4}:{HTTP_PORT} backlog=4096;\n\
         \x20   location / {{ proxy_pass http://flask; }}\n  }}\n}}\n"
    )
}

/// The SNAT address of the fullnat configuration with `method`: one of its own on the
/// balancer (198.51.100.101-104). The bench removes the datapath between configurations, so
/// each starts with an empty NAT table and picks its SNAT ports afresh; from one shared
/// address it would pick ports whose connections the backends still hold in TIME_WAIT (60 s)
/// from the configuration before, which the backends may refuse (a retransmitted SYN, a
/// second of delay). The same configuration comes back only a round later, over a minute on.
fn snat_address(method: Method) -> Ipv4Addr {
    let i = METHODS.iter().position(|m| *m == method).unwrap_or(0);
    Ipv4Addr::new(198, 51, 100, 101 + u8::try_from(i).unwrap_or(0))
}

fn weir_service(forwarding: &str, method: Method) -> ServiceBuilder {
    let mut s = ServiceBuilder::new("web", VIP_V4, HTTP_PORT, "tcp")
        .scheduler(method.weir())
        .forwarding(forwarding);
    if forwarding == "fullnat" {
        s = s.raw("snat_addresses", &format!("[\"{}\"]", snat_address(method)));
    }
    (0..BACKENDS).fold(s, |s, i| s.backend(Backend::new(backend_v4(i))))
}

/// Starts `b` and adds what it needs to the topology.
fn start(lab: &Lab, b: Balancer) -> Result<Active<'_>> {
    let t = &lab.topo;
    let mut a = Active::default();
    let client_net = CLIENT_NET;
    match b {
        Balancer::None(i) => {
            let host = format!("{}/32", backend_v4(i));
            a.ip_undo(
                &t.cli,
                &["route", "add", &host, "dev", NODE_IF],
                &["route", "del", &host, "dev", NODE_IF],
            )?;
            let bn = &t.backends[i];
            a.ip_undo(
                bn,
                &["route", "add", client_net, "dev", NODE_IF],
                &["route", "del", client_net, "dev", NODE_IF],
            )?;
        }
        Balancer::Nginx(m) => {
            let vip = format!("{VIP_V4}/32");
            a.ip_undo(
                &t.lb,
                &["addr", "add", &vip, "dev", "lo"],
                &["addr", "del", &vip, "dev", "lo"],
            )?;
            let path = t.write_file("lb-nginx.conf", &nginx_config(&t.workdir, m))?;
            let path = path.to_str().context("utf-8 path")?;
            let err = t.workdir.join("lb-nginx.startup.log");
            let err = err.to_str().context("utf-8 path")?;
            let mut child =
                common::spawn_cmd_in_ns(&t.lb, "/usr/sbin/nginx", &["-e", err, "-c", path])?;
            let r = wait_listening(&t.lb, &mut child, "nginx");
            a.children.push(child);
            r?;
        }
        Balancer::Fullnat(m) | Balancer::Nat(m) | Balancer::Tunnel(m) => {
            let forwarding = match b {
                Balancer::Fullnat(_) => "fullnat",
                Balancer::Nat(_) => "nat",
                _ => "tunnel",
            };
            if forwarding == "nat" {
                // Destination NAT: the replies must come back through the balancer.
                for bn in &t.backends {
                    a.ip_undo(
                        bn,
                        &["route", "add", "default", "via", &LB_V4.to_string()],
                        &["route", "del", "default"],
                    )?;
                }
            }
            if forwarding == "tunnel" {
                // DSR: the VIP on the backends' lo, not answered for in ARP, replies
                // straight to the client's subnet, decapsulated packets not filtered.
                let vip = format!("{VIP_V4}/32");
                for bn in &t.backends {
                    a.ip_undo(
                        bn,
                        &["addr", "add", &vip, "dev", "lo"],
                        &["addr", "del", &vip, "dev", "lo"],
                    )?;
                    a.ip_undo(
                        bn,
                        &["route", "add", client_net, "dev", NODE_IF],
                        &["route", "del", client_net, "dev", NODE_IF],
                    )?;
                    sysctl(
                        bn,
                        &[
                            "net.ipv4.conf.all.arp_ignore=1",
                            "net.ipv4.conf.all.arp_announce=2",
                            "net.ipv4.conf.all.rp_filter=0",
                            &format!("net.ipv4.conf.{NODE_IF}.rp_filter=0"),
                            "net.ipv4.conf.lo.rp_filter=0",
                        ],
                    )?;
                }
                let decap = t.start_decap(&[VIP_V4.into()])?;
                a.extra_pids
                    .extend(decap.iter().filter_map(ChildGuard::pid));
                a.children.extend(decap);
            }
            // The agent leaves its datapath pinned when it stops: remove it after the
            // configuration, so the next one starts clean.
            a.undo.push(Box::new(|| t.teardown_datapath()));
            let config = t.agent_config().service(weir_service(forwarding, m));
            a.children.push(t.start_agent(&config)?);
        }
    }
    Ok(a)
}

/// The client's SNAT over the 50 addresses (nftables, round robin per new connection).
fn fifty_clients(lab: &Lab) -> Result<Active<'_>> {
    let map: Vec<String> = (0..CLIENTS)
        .map(|i| format!("{i} : {}", client_addr(i)))
        .collect();
    let rules = format!(
        "table ip paperclients {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         tcp dport {HTTP_PORT} snat to numgen inc mod {CLIENTS} map {{ {} }}\n  }}\n}}\n",
        map.join(", ")
    );
    let path = lab.topo.write_file("clients.nft", &rules)?;
    let path = path.to_str().context("utf-8 path")?;
    let cli = lab.topo.cli.clone();
    let mut a = Active::default();
    ns_exec(&cli, &["nft", "-f", path]).context("the client's SNAT rules")?;
    a.undo.push(Box::new(move || {
        ns_exec(&cli, &["nft", "delete", "table", "ip", "paperclients"]).map(drop)
    }));
    Ok(a)
}

/// Checks the configuration answers `/` with the fixed body.
fn check_response(lab: &Lab, b: Balancer) -> Result<()> {
    let url = format!("http://{}/", b.server());
    let body = ns_exec(
        &lab.topo.cli,
        &["curl", "-sS", "--max-time", "3", "--retry", "2", &url],
    )
    .with_context(|| format!("{}: curl {url}", b.name()))?;
    if body != webapp::BODY {
        bail!("{}: unexpected response {body:?}", b.name());
    }
    Ok(())
}

/// Run time on the CPU so far of every thread of process `pid` (schedstat), µs.
fn task_cpu_us(pid: u32) -> f64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e3
}

/// The balancer's CPU so far, µs: its processes' threads and their BPF programs.
fn balancer_cpu_us(lab: &Lab, extra: &[u32]) -> f64 {
    let pids: Vec<u32> = common::run(&["ip", "netns", "pids", &lab.topo.lb])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .chain(extra.iter().copied())
        .collect();
    pids.iter()
        .map(|&p| task_cpu_us(p) + support::bpf_run_time_ns(p) as f64 / 1e3)
        .sum()
}

/// One measured run, before its capture is dissected.
struct Raw {
    httperf: Httperf,
    pcap: PathBuf,
    balancer_us: f64,
    /// Frames the kernel dropped from the capture (not from the network).
    capture_drops: u64,
}

struct Load {
    requests: u32,
    rate: u32,
}

fn run_once(
    lab: &Lab,
    b: Balancer,
    active: &Active<'_>,
    load: &Load,
    pcap: PathBuf,
) -> Result<Raw> {
    let t = &lab.topo;
    let pcap_s = pcap.to_str().context("utf-8 path")?.to_owned();
    let _ = fs::remove_file(&pcap);
    let mut tcpdump = common::spawn_cmd_in_ns(
        &t.cli,
        "tcpdump",
        &[
            "-i",
            NODE_IF,
            "-n",
            "--immediate-mode",
            "-B",
            CAPTURE_BUFFER_KIB,
            "-Z",
            "root",
            "-s",
            SNAPLEN,
            "-U",
            "-w",
            &pcap_s,
            "tcp",
            "port",
            "80",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tcpdump.log().contains("listening on") {
        if tcpdump.try_status().is_some() || Instant::now() > deadline {
            bail!("tcpdump did not start:\n{}", tcpdump.log());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let server = b.server().to_string();
    let (rate, conns) = (load.rate.to_string(), load.requests.to_string());
    let lb0 = balancer_cpu_us(lab, &active.extra_pids);
    let out = ns_exec(
        &t.cli,
        &[
            "httperf",
            "--server",
            &server,
            "--port",
            "80",
            "--uri",
            "/",
            "--rate",
            &rate,
            "--num-conns",
            &conns,
            "--num-calls",
            "1",
            "--timeout",
            "5",
        ],
    )?;
    let balancer_us = balancer_cpu_us(lab, &active.extra_pids) - lb0;
    // The last FIN/ACK exchanges, then the capture's end.
    thread::sleep(Duration::from_millis(200));
    tcpdump.signal(libc::SIGINT)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcpdump.try_status().is_none() {
        if Instant::now() > deadline {
            bail!("tcpdump did not stop on SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let httperf = qos::parse_httperf(&out)?;
    let capture_drops = qos::tcpdump_kernel_drops(&tcpdump.log())
        .with_context(|| format!("tcpdump's summary:\n{}", tcpdump.log()))?;
    Ok(Raw {
        httperf,
        pcap,
        balancer_us,
        capture_drops,
    })
}

/// tshark's dissection of `pcap`, analysed.
fn dissect(pcap: &Path) -> Result<CaptureQos> {
    let pcap = pcap.to_str().context("utf-8 path")?;
    let mut args = vec![
        "tshark",
        "-r",
        pcap,
        "-n",
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=|",
    ];
    for f in qos::TSHARK_FIELDS {
        args.extend(["-e", f]);
    }
    let out = common::run(&args)?;
    qos::analyse(&out)
}

/// One analysed run.
struct RunResult {
    httperf: Httperf,
    qos: CaptureQos,
    balancer_us: f64,
    capture_drops: u64,
}

impl RunResult {
    fn replies(&self) -> f64 {
        (self.httperf.replies as f64).max(1.0)
    }

    fn balancer_per_request(&self) -> f64 {
        self.balancer_us / self.replies()
    }

    /// Mean delay over all responses, ms.
    fn delay_ms(&self) -> Option<f64> {
        weighted(&self.qos, |q| q.delay_ms)
    }

    fn jitter_ms(&self) -> Option<f64> {
        weighted(&self.qos, |q| q.jitter_ms)
    }

    fn lost(&self) -> u64 {
        self.qos
            .backends
            .values()
            .map(|q| q.lost_frames)
            .sum::<u64>()
            + self.qos.unanswered_lost_frames
    }

    fn frames(&self) -> u64 {
        self.qos.backends.values().map(|q| q.frames).sum()
    }
}

/// The per-backend `f`, weighted by the backends' responses.
fn weighted(q: &CaptureQos, f: impl Fn(&qos::BackendQos) -> Option<f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0.0);
    for b in q.backends.values() {
        if let Some(v) = f(b) {
            sum += v * b.responses as f64;
            n += b.responses as f64;
        }
    }
    (n > 0.0).then(|| sum / n)
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn show(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Results by (configuration, client mode).
type Results = BTreeMap<(Balancer, usize), Vec<RunResult>>;

fn main() {
    // A run stopped from outside still removes its namespaces.
    common::remove_on_signal().expect("signal handling");
    if !common::require_root() {
        eprintln!("bench paper needs root (network namespaces, XDP)");
        std::process::exit(1);
    }
    for tool in [
        webapp::PYTHON,
        "/usr/sbin/nginx",
        "/usr/bin/httperf",
        "/usr/bin/tshark",
        "/usr/bin/tcpdump",
        "/usr/sbin/nft",
    ] {
        if !Path::new(tool).exists() {
            eprintln!("bench paper needs {tool}: run `cargo xtask setup`");
            std::process::exit(1);
        }
    }
    let runs: usize = support::arg("--runs").unwrap_or(10).clamp(1, 50);
    let load = Load {
        requests: support::arg("--requests")
            .unwrap_or(1000)
            .clamp(10, 100_000),
        rate: support::arg("--rate").unwrap_or(500).clamp(1, 5000),
    };
    let only: Option<String> = support::arg("--only");
    let balancers: Vec<Balancer> = Balancer::all()
        .into_iter()
        .filter(|b| {
            b.is_baseline()
                || only
                    .as_deref()
                    .is_none_or(|o| o.split(',').any(|n| n.trim() == b.name()))
        })
        .collect();
    let started = Instant::now();
    let per_run = f64::from(load.requests) / f64::from(load.rate);
    println!(
        "bench paper: {} configurations × {} client modes × {runs} runs of {} requests at {}/s \
         (about {:.0} s of load)",
        balancers.len(),
        CLIENT_MODES.len(),
        load.requests,
        load.rate,
        per_run * (balancers.len() * CLIENT_MODES.len() * runs) as f64
    );
    let bpf_stats = support::enable_bpf_stats();
    if bpf_stats.is_none() {
        eprintln!("warning: BPF_ENABLE_STATS refused; Weir's XDP time is not counted");
    }
    let lab = Lab::build().unwrap_or_else(|e| panic!("topology: {e:#}"));
    // `--keep-captures`: the pcap files stay (outside the lab's work directory, which goes
    // with the lab) for a look with tshark or wireshark.
    let keep = support::flag("--keep-captures");
    let captures = if keep {
        std::env::temp_dir().join("weir-paper-captures")
    } else {
        lab.topo.workdir.join("captures")
    };
    fs::create_dir_all(&captures).expect("captures dir");

    let mut raw: BTreeMap<(Balancer, usize), Vec<Raw>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let total = runs * balancers.len();
    let mut done = 0;
    for r in 0..runs {
        if let Err(e) = lab.prime_clients() {
            failures.push(format!("round {}: {e:#}", r + 1));
        }
        let mut order = balancers.clone();
        if r % 2 == 1 {
            order.reverse();
        }
        for b in order {
            done += 1;
            print!(
                "[{done}/{total}, {:.0} s] run {}, {:<12}",
                started.elapsed().as_secs_f64(),
                r + 1,
                b.name()
            );
            let measured = (|| -> Result<Vec<(usize, Raw)>> {
                let active = start(&lab, b).with_context(|| format!("starting {}", b.name()))?;
                check_response(&lab, b)?;
                let mut out = Vec::new();
                for (m, mode) in CLIENT_MODES.iter().enumerate() {
                    let _snat = match mode {
                        Clients::One => None,
                        Clients::Fifty => Some(fifty_clients(&lab)?),
                    };
                    let pcap = captures.join(format!("{}-{}-{r}.pcap", b.name(), mode.short()));
                    out.push((m, run_once(&lab, b, &active, &load, pcap)?));
                }
                Ok(out)
            })();
            match measured {
                Ok(v) => {
                    for (m, raw_run) in v {
                        print!(
                            "  {}: {}/{} replies, {:.1} µs/req",
                            CLIENT_MODES[m].short(),
                            raw_run.httperf.replies,
                            raw_run.httperf.connections,
                            raw_run.balancer_us / (raw_run.httperf.replies as f64).max(1.0)
                        );
                        raw.entry((b, m)).or_default().push(raw_run);
                    }
                    println!();
                }
                Err(e) => {
                    println!("  FAILED: {e:#}");
                    failures.push(format!("{} run {}: {e:#}", b.name(), r + 1));
                }
            }
        }
    }
    drop(bpf_stats);
    println!(
        "runs done in {:.0} s; dissecting {} captures",
        started.elapsed().as_secs_f64(),
        raw.values().map(Vec::len).sum::<usize>()
    );
    // Two tshark processes at a time (the machine's cores), in the runs' order.
    let jobs: Vec<((Balancer, usize), Raw)> = raw
        .into_iter()
        .flat_map(|(key, runs)| runs.into_iter().map(move |r| (key, r)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let dissected: Vec<Vec<(usize, Result<CaptureQos>)>> = thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((_, r)) = jobs.get(i) else {
                            return out;
                        };
                        out.push((i, dissect(&r.pcap)));
                        if !keep {
                            let _ = fs::remove_file(&r.pcap);
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("dissecting thread"))
            .collect()
    });
    let mut dissected: Vec<(usize, Result<CaptureQos>)> = dissected.into_iter().flatten().collect();
    dissected.sort_by_key(|(i, _)| *i);
    let mut results: Results = BTreeMap::new();
    for ((key, r), (_, qos)) in jobs.into_iter().zip(dissected) {
        match qos {
            Ok(qos) => results.entry(key).or_default().push(RunResult {
                httperf: r.httperf,
                qos,
                balancer_us: r.balancer_us,
                capture_drops: r.capture_drops,
            }),
            Err(e) => failures.push(format!("{}: {e:#}", r.pcap.display())),
        }
    }
    drop(lab);
    let elapsed = started.elapsed().as_secs_f64();
    report(&balancers, &results, &failures, runs, &load, elapsed);
    println!("bench paper took {elapsed:.0} s");
}

/// Per backend name, the per-run values of `f` (runs where the backend answered).
fn per_backend(
    runs: &[RunResult],
    f: impl Fn(&qos::BackendQos) -> Option<f64>,
) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (name, q) in &r.qos.backends {
            if let Some(v) = f(q) {
                out.entry(name.clone()).or_default().push(v);
            }
        }
    }
    out
}

/// The paper-shaped table of one configuration and client mode: a row per run, then the
/// mean; per backend throughput, loss, delay, jitter and request share.
fn run_table(runs: &[RunResult]) -> String {
    let mut header = vec!["run".to_owned()];
    for n in NAMES {
        header.extend([
            format!("{n}: Mbps"),
            format!("{n}: loss %"),
            format!("{n}: delay ms"),
            format!("{n}: jitter ms"),
            format!("{n}: share %"),
        ]);
    }
    header.extend(["answered".to_owned(), "balancer CPU µs/req".to_owned()]);
    let cells = |get: &dyn Fn(&str) -> [Option<f64>; 5]| -> Vec<String> {
        NAMES
            .iter()
            .flat_map(|n| {
                let [tp, loss, delay, jitter, share] = get(n);
                [
                    show(tp, 3),
                    show(loss, 2),
                    show(delay, 2),
                    show(jitter, 2),
                    show(share, 1),
                ]
            })
            .collect()
    };
    let mut rows = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let mut row = vec![(i + 1).to_string()];
        row.extend(cells(&|n| match r.qos.backends.get(n) {
            Some(q) => [
                Some(q.throughput_mbps),
                Some(q.loss_percent),
                q.delay_ms,
                q.jitter_ms,
                Some(q.share * 100.0),
            ],
            None => [Some(0.0), None, None, None, Some(0.0)],
        }));
        row.push(format!("{}/{}", r.httperf.replies, r.httperf.connections));
        row.push(format!("{:.1}", r.balancer_per_request()));
        rows.push(row);
    }
    let m = |f: &dyn Fn(&qos::BackendQos) -> Option<f64>, n: &str| {
        // Runs where the backend got nothing count as 0 for throughput and share.
        per_backend(runs, f).get(n).and_then(|v| mean(v))
    };
    let mut row = vec!["**mean**".to_owned()];
    row.extend(cells(&|n| {
        let zero_filled = |f: &dyn Fn(&qos::BackendQos) -> f64| {
            mean(
                &runs
                    .iter()
                    .map(|r| r.qos.backends.get(n).map_or(0.0, f))
                    .collect::<Vec<_>>(),
            )
        };
        [
            zero_filled(&|q| q.throughput_mbps),
            m(&|q| Some(q.loss_percent), n),
            m(&|q| q.delay_ms, n),
            m(&|q| q.jitter_ms, n),
            zero_filled(&|q| q.share * 100.0),
        ]
    }));
    row.push(format!(
        "{}/{}",
        runs.iter().map(|r| r.httperf.replies).sum::<u64>(),
        runs.iter().map(|r| r.httperf.connections).sum::<u64>()
    ));
    row.push(show(
        mean(
            &runs
                .iter()
                .map(RunResult::balancer_per_request)
                .collect::<Vec<_>>(),
        ),
        1,
    ));
    rows.push(row);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    support::table(&header, 1, &rows)
}

/// A configuration's figures over its runs.
#[derive(Default, Clone, Copy)]
struct Summary {
    delay: Option<f64>,
    jitter: Option<f64>,
    loss_percent: f64,
    lost: u64,
    unanswered: u64,
    errors: u64,
    capture_drops: u64,
    /// Connections on a client port used before in the same capture (`qos`).
    reused_ports: u64,
    balancer_us: Option<f64>,
}

fn summarize(results: &Results, b: Balancer, m: usize) -> Option<Summary> {
    let runs = results.get(&(b, m))?;
    let lost: u64 = runs.iter().map(RunResult::lost).sum();
    let frames: u64 = runs.iter().map(RunResult::frames).sum();
    Some(Summary {
        delay: mean(
            &runs
                .iter()
                .filter_map(RunResult::delay_ms)
                .collect::<Vec<_>>(),
        ),
        jitter: mean(
            &runs
                .iter()
                .filter_map(RunResult::jitter_ms)
                .collect::<Vec<_>>(),
        ),
        loss_percent: if frames > 0 {
            lost as f64 * 100.0 / frames as f64
        } else {
            0.0
        },
        lost,
        unanswered: runs.iter().map(|r| r.qos.unanswered).sum(),
        errors: runs.iter().map(|r| r.httperf.errors).sum(),
        capture_drops: runs.iter().map(|r| r.capture_drops).sum(),
        reused_ports: runs
            .iter()
            .flat_map(|r| r.qos.backends.values())
            .map(|q| q.reused_ports)
            .sum(),
        balancer_us: mean(
            &runs
                .iter()
                .map(RunResult::balancer_per_request)
                .collect::<Vec<_>>(),
        ),
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_owned(),
    }
}

/// The per-backend means of delay and jitter of a configuration (backends that answered
/// at least 1% of the requests).
fn backend_means(results: &Results, b: Balancer, m: usize) -> BTreeMap<String, (f64, f64)> {
    let Some(runs) = results.get(&(b, m)) else {
        return BTreeMap::new();
    };
    let delays = per_backend(runs, |q| (q.share >= 0.01).then_some(q.delay_ms).flatten());
    let jitters = per_backend(runs, |q| (q.share >= 0.01).then_some(q.jitter_ms).flatten());
    delays
        .into_iter()
        .filter_map(|(n, d)| {
            let j = jitters.get(&n).and_then(|j| mean(j)).unwrap_or(0.0);
            Some((n, (mean(&d)?, j)))
        })
        .collect()
}

fn report(
    balancers: &[Balancer],
    results: &Results,
    failures: &[String],
    runs: usize,
    load: &Load,
    elapsed: f64,
) {
    let mut doc = String::new();
    let _ = writeln!(
        doc,
        "# The seed paper's experiment, reproduced\n\n\
         <!-- Written by `cargo xtask bench paper` (lb-userspace/benches/paper.rs); do not edit. -->\n\n\
         The study Weir grew from put NGINX in front of three Flask web servers, compared \
         round robin, least connection and IP hash with httperf (10 runs of 1,000 requests), \
         and measured throughput, packet loss, delay and jitter per backend from a capture. \
         Its published results: round robin gave the lowest delay, 5.5–8.0 ms per backend, \
         and jitter of 1.7–4.1 ms; least connection lost the fewest packets, 0.3–0.5%; IP \
         hash sent everything to one backend, 0.571 Mbps on Flask C.\n\n\
         This page is the same experiment with real parts, NGINX and Weir measured in the \
         same run, written by `cargo xtask bench paper` on {} in {:.0} minutes.\n",
        support::machine(),
        elapsed / 60.0
    );
    let _ = writeln!(
        doc,
        "## How it differs from the paper\n\n\
         - **Namespaces on one host, not VMs.** Client, balancer and the three backends are \
         network namespaces on one machine of 2 cores, joined by veth pairs and a bridge: no \
         hypervisor, no physical network, and every process shares the same two cores (so \
         httperf, the balancer and the three Flask servers compete for CPU, and delays are \
         those of a loaded 2-core machine, not of a LAN).\n\
         - **The backends:** Flask (Debian's `python3-flask`, Werkzeug's threaded server) \
         answering `/` with a fixed {}-byte body and an `X-Backend` header naming the backend \
         (which is how the capture attributes each connection).\n\
         - **httperf's settings:** `httperf --rate {} --num-conns {} --num-calls 1 --timeout \
         5`: one request per connection, {} connections per second, {} runs per \
         configuration and client mode. The paper's rate is not known; this one keeps the \
         whole bench near {:.0} minutes. Configurations are interleaved: each round runs \
         each configuration once (the order reversed every other round), both client modes \
         back to back.\n\
         - **Clients:** the paper's clients all came from one address; here each \
         configuration runs with one client address and with 50 (the client namespace \
         translates its connections round robin over 203.0.113.131–180). NGINX's `ip_hash` \
         hashes only the first three octets of an IPv4 address, so 50 addresses of one /24 \
         are still one key to it.\n\
         - **NGINX** (Debian's 1.22, one worker) proxies HTTP (`proxy_pass`, HTTP/1.0 to the \
         backends) as in the paper. **Weir** forwards at L4 in XDP: `fullnat` (the backends \
         see the balancer's address: the paper's topology of stock backends), `nat` \
         (backends route via the balancer) and tunnel DSR (backends answer the client \
         directly). The bench removes Weir's datapath between configurations, so each starts \
         with an empty NAT table; each fullnat scheduler has an SNAT address of its own, \
         lest a fresh table pick SNAT ports whose connections the backends still hold in \
         TIME_WAIT from the configuration before (a balancer that keeps its table, as the \
         agent does across restarts, does not meet this).\n\
         - **Measurements** come from a capture on the client's veth (tcpdump, snap length \
         {SNAPLEN}, dissected by tshark 4.0): delay is request to complete response as the \
         client sees it (`http.time`), jitter the mean absolute difference of consecutive \
         delays of a backend, loss the frames tshark flags as retransmitted or after a \
         missing segment, over the backend's frames; throughput the bits of the backend's \
         connections over the capture's duration. The definitions are in \
         `testbed/src/qos.rs`, with unit tests.\n\
         - **CPU per request** is the balancer's own: the scheduler run time of every thread \
         in the balancer's namespace (nginx's master and worker, or Weir's agent) plus the \
         run time of Weir's XDP programs (and of `weir decap` on the backends in tunnel \
         mode) from the kernel's BPF statistics, over the replies. NGINX's TCP receive \
         processing in softirq is not in its processes' run time, while Weir's XDP time is \
         counted whole, so this favours NGINX. The whole machine's CPU is not a measure \
         here: httperf busy-polls a core for the whole run, whatever the balancer.\n",
        webapp::BODY.len(),
        load.rate,
        load.requests,
        load.rate,
        runs,
        elapsed / 60.0
    );

    // Summary: method × balancer.
    let _ = writeln!(doc, "## Summary: method × balancer\n");
    let _ = writeln!(
        doc,
        "Means over the runs (delay and jitter over all responses of a run, then over the \
         runs). Ratios are Weir fullnat / NGINX.\n"
    );
    let mut rows = Vec::new();
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for method in METHODS {
            let of = |b: Balancer| {
                balancers
                    .contains(&b)
                    .then(|| summarize(results, b, m))
                    .flatten()
            };
            let nginx = of(Balancer::Nginx(method));
            for weir in [
                Balancer::Fullnat(method),
                Balancer::Nat(method),
                Balancer::Tunnel(method),
            ] {
                let Some(w) = of(weir) else { continue };
                let cell = |s: Option<Summary>, f: fn(&Summary) -> Option<f64>, d| {
                    show(s.as_ref().and_then(f), d)
                };
                rows.push(vec![
                    mode.label().to_owned(),
                    method.label().to_owned(),
                    weir.label(),
                    cell(Some(w), |s| s.delay, 2),
                    cell(nginx, |s| s.delay, 2),
                    ratio(w.delay, nginx.and_then(|n| n.delay)),
                    cell(Some(w), |s| s.jitter, 2),
                    cell(nginx, |s| s.jitter, 2),
                    ratio(w.jitter, nginx.and_then(|n| n.jitter)),
                    format!("{:.2}", w.loss_percent),
                    nginx.map_or_else(|| "–".to_owned(), |n| format!("{:.2}", n.loss_percent)),
                    cell(Some(w), |s| s.balancer_us, 1),
                    cell(nginx, |s| s.balancer_us, 1),
                    ratio(w.balancer_us, nginx.and_then(|n| n.balancer_us)),
                ]);
            }
        }
    }
    doc.push_str(&support::table(
        &[
            "clients",
            "method",
            "Weir",
            "Weir delay ms",
            "NGINX delay ms",
            "ratio",
            "Weir jitter ms",
            "NGINX jitter ms",
            "ratio",
            "Weir loss %",
            "NGINX loss %",
            "Weir CPU µs/req",
            "NGINX CPU µs/req",
            "ratio",
        ],
        3,
        &rows,
    ));
    let _ = writeln!(
        doc,
        "\nNGINX has no Maglev; its Maglev cells are empty. The baseline (no balancer, one \
         backend at a time):\n"
    );
    let mut base_rows = Vec::new();
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for i in 0..BACKENDS {
            if let Some(s) = summarize(results, Balancer::None(i), m) {
                base_rows.push(vec![
                    mode.label().to_owned(),
                    Balancer::None(i).label(),
                    show(s.delay, 2),
                    show(s.jitter, 2),
                    format!("{:.2}", s.loss_percent),
                ]);
            }
        }
    }
    doc.push_str(&support::table(
        &[
            "clients",
            "configuration",
            "delay ms",
            "jitter ms",
            "loss %",
        ],
        2,
        &base_rows,
    ));

    // Targets.
    let _ = writeln!(doc, "\n## Targets\n");
    let _ = writeln!(
        doc,
        "Weir is its fullnat configuration (the paper's topology). Delay and jitter are \
         compared per backend, for the backends that answered at least 1% of the requests \
         under both balancers; CPU is the balancer's own per request.\n"
    );
    let mut target_rows = Vec::new();
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for method in [Method::RoundRobin, Method::LeastConn, Method::IpHash] {
            let (w, n) = (Balancer::Fullnat(method), Balancer::Nginx(method));
            if !(balancers.contains(&w) && balancers.contains(&n)) {
                continue;
            }
            let wb = backend_means(results, w, m);
            let nb = backend_means(results, n, m);
            let shared: Vec<&String> = wb.keys().filter(|k| nb.contains_key(*k)).collect();
            let (mut delay_ok, mut jitter_ok) = (true, true);
            let mut detail = Vec::new();
            for k in &shared {
                let (wd, wj) = wb[*k];
                let (nd, nj) = nb[*k];
                delay_ok &= wd <= nd;
                jitter_ok &= wj <= nj;
                detail.push(format!("{k}: {wd:.2}/{nd:.2} ms, jitter {wj:.2}/{nj:.2}"));
            }
            let verdict = |ok: bool| {
                if shared.is_empty() {
                    "n/a (no backend in common)"
                } else if ok {
                    "met"
                } else {
                    "MISSED"
                }
            };
            let (ws, ns) = (summarize(results, w, m), summarize(results, n, m));
            let cpu = ws
                .and_then(|s| s.balancer_us)
                .zip(ns.and_then(|s| s.balancer_us));
            target_rows.push(vec![
                mode.label().to_owned(),
                method.label().to_owned(),
                if detail.is_empty() {
                    "–".to_owned()
                } else {
                    detail.join("; ")
                },
                verdict(delay_ok).to_owned(),
                verdict(jitter_ok).to_owned(),
                cpu.map_or_else(
                    || "–".to_owned(),
                    |(a, b)| format!("{a:.1}/{b:.1} = {:.2}", a / b),
                ),
                cpu.map_or("n/a", |(a, b)| if a <= 0.5 * b { "met" } else { "MISSED" })
                    .to_owned(),
            ]);
        }
    }
    doc.push_str(&support::table(
        &[
            "clients",
            "method",
            "per backend, Weir/NGINX delay and jitter",
            "delay ≤ NGINX",
            "jitter ≤ NGINX",
            "CPU µs/req Weir/NGINX",
            "CPU ≤ 0.5 × NGINX",
        ],
        3,
        &target_rows,
    ));
    let mut lossy = Vec::new();
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for &b in balancers {
            if let Some(s) = summarize(results, b, m)
                && (s.lost > 0 || s.unanswered > 0 || s.errors > 0 || s.capture_drops > 0)
            {
                lossy.push(format!(
                    "{} ({}): {} retransmitted or missing segments, {} connections without a \
                     response in the capture, {} httperf errors, {} frames dropped from the \
                     capture by the kernel",
                    b.label(),
                    mode.label(),
                    s.lost,
                    s.unanswered,
                    s.errors,
                    s.capture_drops
                ));
            }
        }
    }
    let _ = writeln!(
        doc,
        "\nLoss 0 for every configuration at this load: **{}**.{}\n",
        if lossy.is_empty() { "met" } else { "MISSED" },
        if lossy.is_empty() {
            String::new()
        } else {
            format!("\n\n- {}", lossy.join("\n- "))
        }
    );
    let mut reused = Vec::new();
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for &b in balancers {
            if let Some(s) = summarize(results, b, m)
                && s.reused_ports > 0
            {
                reused.push(format!(
                    "{} ({}): {}",
                    b.label(),
                    mode.label(),
                    s.reused_ports
                ));
            }
        }
    }
    if !reused.is_empty() {
        let _ = writeln!(
            doc,
            "Not counted as loss: connections on a client port that an earlier connection of \
             the same capture used, {} in all. The backend may still hold that earlier \
             connection in TIME_WAIT and answer the new SYN with its stale ACK; the client \
             resets it and sends the SYN again (one retransmitted SYN, a few ms). This is a \
             TIME_WAIT met again on one 4-tuple (the client's, or the balancer's own towards \
             the backend), not a network loss:\n\n- {}\n",
            reused
                .iter()
                .map(|r| r
                    .rsplit(": ")
                    .next()
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0))
                .sum::<u64>(),
            reused.join("\n- ")
        );
    }
    let _ = writeln!(
        doc,
        "Where a target is missed, the per-run tables below show by how much; the \
         conditions above say why the figures of one shared 2-core machine swing.\n"
    );

    // Per-configuration tables.
    let _ = writeln!(
        doc,
        "## Per configuration: one row per run, the mean, per backend\n\n\
         Throughput in Mbps (both directions of the backend's connections, as captured), \
         loss in % of the backend's frames, delay and jitter in ms, share in % of the \
         responses. `–`: the backend answered nothing in that run.\n"
    );
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for &b in balancers {
            let Some(runs) = results.get(&(b, m)) else {
                continue;
            };
            let _ = writeln!(doc, "### {} — {}\n", b.label(), mode.label());
            doc.push_str(&run_table(runs));
            doc.push('\n');
        }
    }
    let _ = writeln!(
        doc,
        "## Chart\n\n![delay and CPU per configuration](bench-paper.png)\n"
    );
    if !failures.is_empty() {
        let _ = writeln!(doc, "## Failures\n\n- {}\n", failures.join("\n- "));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PAPER.md");
    match fs::write(&path, &doc) {
        Ok(()) => println!("written to {}", path.display()),
        Err(e) => eprintln!("warning: cannot write {}: {e}", path.display()),
    }

    // The chart's data: per configuration and client mode, the spread over runs.
    let mut rows = Vec::new();
    for (m, mode) in CLIENT_MODES.iter().enumerate() {
        for &b in balancers {
            let Some(runs) = results.get(&(b, m)) else {
                continue;
            };
            let delays: Vec<f64> = runs.iter().filter_map(RunResult::delay_ms).collect();
            let cpu: Vec<f64> = runs.iter().map(RunResult::balancer_per_request).collect();
            rows.push(serde_json::json!({
                "name": b.name(),
                "label": b.label(),
                "clients": mode.short(),
                "baseline": b.is_baseline(),
                "weir": matches!(b, Balancer::Fullnat(_) | Balancer::Nat(_) | Balancer::Tunnel(_)),
                "method": b.method().map(Method::label),
                "delay_ms": support::json_opt(Spread::of(&delays)),
                "cpu_us_per_request": support::json_opt(Spread::of(&cpu)),
            }));
        }
    }
    support::write_json(&serde_json::json!({
        "bench": "paper",
        "machine": support::machine(),
        "runs": runs,
        "requests": load.requests,
        "rate": load.rate,
        "rows": rows,
    }));
}
