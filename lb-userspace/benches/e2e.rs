//! `cargo xtask bench e2e`: Weir side by side with the kernel's NAT (nftables DNAT), HAProxy
//! and NGINX's stream module, with real HTTP traffic through one namespace topology.
//!
//! Topology (namespaces `w<pid>be2e-*`, veth pairs only, no bridge, so that the test's
//! own plumbing adds as little as possible to what is measured):
//!
//! ```text
//!  cli eth0 198.51.100.2/30 ──── eth0 198.51.100.1/30  lb  b1..b3 ──── eth0 of backend N
//!      b1..b3 (unnumbered) ─────────────────────────────────────────── eth1 of backend N
//! ```
//!
//! Backend N (N = 0..2) has 198.51.100.(18 + 4N)/30 on its link to the LB and the VIP
//! 203.0.113.10 on `lo`; its second link goes straight to the client, which is how replies
//! of the DSR modes (and the baseline's traffic) travel. The client routes only the VIP via
//! the LB. Every backend runs Debian's nginx (one worker) with a fixed 11-byte response.
//! The same load, `wrk` with one thread from the client, runs against each configuration:
//!
//! * `direct`: straight to backend 0 over its own link, no LB (the baseline);
//! * `weir-tunnel` / `weir-direct`: `weir agent` on the LB (IP-in-IP with `weir decap` on
//!   the backends / L2 DSR), replies straight from the backends;
//! * `nft-numgen` / `nft-jhash`: nftables DNAT in the LB (`numgen random mod 3`, as
//!   kube-proxy's nftables mode, and `jhash ip saddr . tcp sport mod 3`); replies return
//!   through the LB (for those runs the backends route the client via the LB) for the
//!   reverse NAT;
//! * `haproxy`: HAProxy `mode tcp`, `nbthread 1`; `nginx-stream`: nginx stream proxy,
//!   one worker. Both listen on the VIP (added to the LB's `lo` for their runs);
//! * `weir-nat` / `weir-fullnat`: `weir agent` with `forwarding = "nat"` / `"fullnat"`,
//!   attached to `eth0` and to every backend link (`[agent] interfaces`), so that the
//!   replies cross the balancer in XDP both ways. For `weir-nat` the backends route the
//!   client via the LB (as for nftables); for `weir-fullnat` they answer the SNAT address
//!   `SNAT_V4` (on the LB's `lo`), which only their link to the LB reaches (an on-link
//!   route there: each backend has a subnet of its own with the LB here, where a shared
//!   subnet would need none). The client's `eth0` has GRO on for these runs: a veth without
//!   an XDP program takes frames redirected in XDP only then.
//!
//! Each configuration runs a keep-alive test (requests/s) and a `Connection: close` test
//! (new connections/s); the machine's busy CPU time over each test comes from /proc/stat.
//! Configurations are interleaved (the order alternates every repeat) and repeated; the
//! report gives the median and the min–max, and CPU added over the baseline of the same
//! repeat. Arguments: `--seconds N` (per test, default 5), `--repeats N` (default 3),
//! `--connections N` (default 32), `--only a,b` (configurations; `direct` is always run).
//!
//! Nothing here asserts a time: a configuration that fails is reported as failed.

#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{CLIENT_V4, LB_V4, Netns, VIP_V4, ip, ns_exec, sysctl};
use support::{Spread, show_opt, show_opt_signed};
use weir_testbed::{Backend, ConfigBuilder, ServiceBuilder};

const BACKENDS: usize = 3;
const NODE_IF: &str = "eth0";
/// `weir-fullnat`'s SNAT address, on the LB's `lo` for its runs.
const SNAT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// `weir-fullnat`'s SNAT ports: a pair holds its port through TIME_WAIT (120 s), so the
/// tens of thousands of connections of a `Connection: close` test need a wide range (the
/// pairs of one backend never exceed the range's size in a 5 s test at this machine's
/// rates; the agent refuses a connection when 64 probed ports are taken). The agent adds
/// it to the LB's `ip_local_reserved_ports` (its ephemeral range is all ports here); the run
/// puts the previous value back, so the other configurations keep every ephemeral port.
const SNAT_PORTS: &str = "10000-65535";

/// Backend `i`'s address, on its link to the LB (198.51.100.(16 + 4i)/30).
fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        198,
        51,
        100,
        18 + 4 * u8::try_from(i).expect("few backends"),
    )
}

/// The LB's address on its link to backend `i`.
fn lb_side(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        198,
        51,
        100,
        17 + 4 * u8::try_from(i).expect("few backends"),
    )
}

/// The namespaces and links of the module docs; dropping it stops what runs inside,
/// removes the agent's pins and deletes the namespaces.
struct Lab {
    prefix: String,
    cli: String,
    lb: String,
    backends: Vec<String>,
    workdir: PathBuf,
    namespaces: Vec<Netns>,
}

impl Lab {
    fn build() -> Result<Self> {
        let prefix = common::prefix("be2e");
        let workdir = std::env::temp_dir().join(format!("weir-bench-{prefix}"));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir)?;
        let mut lab = Self {
            cli: format!("{prefix}-cli"),
            lb: format!("{prefix}-lb"),
            backends: (1..=BACKENDS).map(|i| format!("{prefix}-b{i}")).collect(),
            prefix,
            workdir,
            namespaces: Vec::new(),
        };
        lab.setup().context("building the bench topology")?;
        Ok(lab)
    }

    fn names(&self) -> Vec<String> {
        [self.cli.clone(), self.lb.clone()]
            .into_iter()
            .chain(self.backends.iter().cloned())
            .collect()
    }

    fn setup(&mut self) -> Result<()> {
        for ns in self.names() {
            self.namespaces.push(Netns::create(&ns)?);
            sysctl(
                &ns,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
        }
        let (cli, lb) = (self.cli.clone(), self.lb.clone());
        let link = |a: &str, a_if: &str, b: &str, b_if: &str| {
            ip(
                a,
                &[
                    "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
                ],
            )
        };
        link(&lb, NODE_IF, &cli, NODE_IF)?;
        ip(
            &lb,
            &["addr", "add", &format!("{LB_V4}/30"), "dev", NODE_IF],
        )?;
        ip(
            &cli,
            &["addr", "add", &format!("{CLIENT_V4}/30"), "dev", NODE_IF],
        )?;
        for (i, b) in self.backends.iter().enumerate() {
            let port = format!("b{i}");
            link(&lb, &port, b, NODE_IF)?;
            link(&cli, &port, b, "eth1")?;
            ip(
                &lb,
                &["addr", "add", &format!("{}/30", lb_side(i)), "dev", &port],
            )?;
            ip(
                b,
                &[
                    "addr",
                    "add",
                    &format!("{}/30", backend_v4(i)),
                    "dev",
                    NODE_IF,
                ],
            )?;
            ip(b, &["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
            for (ns, dev) in [
                (&lb, port.as_str()),
                (&cli, &port),
                (b, NODE_IF),
                (b, "eth1"),
            ] {
                ip(ns, &["link", "set", dev, "up"])?;
            }
            // Checksum offload breaks TCP through an XDP path on veth; GRO lets the
            // backend's end take frames redirected in XDP when no program is attached.
            ns_exec(b, &["ethtool", "-K", NODE_IF, "tx", "off", "gro", "on"])?;
            ns_exec(b, &["ethtool", "-K", "eth1", "tx", "off"])?;
            ns_exec(&cli, &["ethtool", "-K", &port, "tx", "off"])?;
            // The baseline reaches the backend over its own link; the backend replies to
            // the client over it too.
            ip(
                &cli,
                &[
                    "route",
                    "add",
                    &format!("{}/32", backend_v4(i)),
                    "dev",
                    &port,
                ],
            )?;
            // `src`: the address pick would otherwise be the VIP on `lo`.
            let src = backend_v4(i).to_string();
            let client = format!("{CLIENT_V4}/32");
            ip(b, &["route", "add", &client, "dev", "eth1", "src", &src])?;
            sysctl(
                b,
                &[
                    "net.ipv4.conf.eth0.rp_filter=0",
                    "net.ipv4.conf.eth1.rp_filter=0",
                    "net.ipv4.conf.lo.rp_filter=0",
                ],
            )?;
        }
        ip(&lb, &["link", "set", NODE_IF, "up"])?;
        ip(&cli, &["link", "set", NODE_IF, "up"])?;
        ns_exec(&cli, &["ethtool", "-K", NODE_IF, "tx", "off"])?;
        ip(
            &cli,
            &[
                "route",
                "add",
                &format!("{VIP_V4}/32"),
                "via",
                &LB_V4.to_string(),
            ],
        )?;
        // Neighbour entries before any traffic, and a check of every link.
        let mut pings: Vec<(String, String)> = vec![(cli.clone(), LB_V4.to_string())];
        for (i, b) in self.backends.iter().enumerate() {
            pings.push((lb.clone(), backend_v4(i).to_string()));
            pings.push((cli.clone(), backend_v4(i).to_string()));
            pings.push((b.clone(), CLIENT_V4.to_string()));
        }
        for (ns, dst) in pings {
            ns_exec(
                &ns,
                &["ping", "-q", "-n", "-c", "1", "-w", "3", "-W", "1", &dst],
            )
            .with_context(|| format!("ping {dst} from {ns}"))?;
        }
        Ok(())
    }

    fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let p = self.workdir.join(name);
        fs::write(&p, contents).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }

    fn bpffs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/weir-bench-{}", self.prefix))
    }

    /// The LB's agent config without services: its interface in native mode, and what keeps
    /// this agent apart from any other (socket, state, pins).
    fn agent_config(&self) -> ConfigBuilder {
        ConfigBuilder::new(NODE_IF)
            .xdp_mode("native")
            .api_socket(&self.workdir.join("weir.sock"))
            .state_file(&self.workdir.join("state.json"))
            .audit_log(&self.workdir.join("audit.jsonl"))
            .bpffs(&self.bpffs())
    }

    /// `weir agent` in the LB's namespace (entering only its network namespace, so the
    /// pins go to the host's bpffs); ready once its XDP program is attached, which the
    /// agent does after writing its maps.
    fn start_agent(&self, config: &str) -> Result<common::ChildGuard> {
        self.start_agent_on(config, &[NODE_IF])
    }

    /// As `start_agent`, ready once XDP is attached to every one of `interfaces`.
    fn start_agent_on(&self, config: &str, interfaces: &[&str]) -> Result<common::ChildGuard> {
        let path = self.write_file("agent.toml", config)?;
        let path = path.to_str().context("utf-8 path")?;
        let mut child = common::spawn_nsenter(&self.lb, &["agent", "--config", path])?;
        for ifname in interfaces {
            child.wait_xdp(&self.lb, ifname, Some(Duration::from_secs(15)))?;
        }
        Ok(child)
    }

    /// `weir teardown`: the agent leaves its datapath attached and pinned when it stops.
    fn teardown_datapath(&self) -> Result<()> {
        if self.bpffs().exists() {
            let bpffs = self.bpffs();
            let bpffs = bpffs.to_str().context("utf-8 path")?;
            common::run(&[common::weir_bin(), "teardown", "--bpffs", bpffs])?;
        }
        Ok(())
    }

    /// `weir decap` on every backend's link to the LB.
    fn start_decap(&self) -> Result<Vec<common::ChildGuard>> {
        let vip = VIP_V4.to_string();
        let mut children = Vec::new();
        for b in &self.backends {
            let mut c = common::spawn_in_ns(b, &["decap", "--interface", NODE_IF, "--vip", &vip])?;
            c.wait_xdp(b, NODE_IF, None)?;
            children.push(c);
        }
        Ok(children)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        weir_testbed::stop_processes(&self.names());
        if let Err(e) = self.teardown_datapath() {
            eprintln!("warning: {e:#}");
        }
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}
const RESPONSE: &str = "weir bench\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Direct,
    WeirTunnel,
    WeirDirect,
    WeirNat,
    WeirFullnat,
    NftNumgen,
    NftJhash,
    Haproxy,
    NginxStream,
}

const PEERS: [Peer; 9] = [
    Peer::Direct,
    Peer::WeirTunnel,
    Peer::WeirDirect,
    Peer::WeirNat,
    Peer::WeirFullnat,
    Peer::NftNumgen,
    Peer::NftJhash,
    Peer::Haproxy,
    Peer::NginxStream,
];

impl Peer {
    const fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::WeirTunnel => "weir-tunnel",
            Self::WeirDirect => "weir-direct",
            Self::WeirNat => "weir-nat",
            Self::WeirFullnat => "weir-fullnat",
            Self::NftNumgen => "nft-numgen",
            Self::NftJhash => "nft-jhash",
            Self::Haproxy => "haproxy",
            Self::NginxStream => "nginx-stream",
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to one backend (baseline)",
            Self::WeirTunnel => "Weir, tunnel (IP-in-IP + XDP decap)",
            Self::WeirDirect => "Weir, direct (L2 DSR)",
            Self::WeirNat => "Weir, nat (destination NAT, replies via the LB)",
            Self::WeirFullnat => "Weir, fullnat (destination + source NAT)",
            Self::NftNumgen => "nftables DNAT, numgen random",
            Self::NftJhash => "nftables DNAT, jhash",
            Self::Haproxy => "HAProxy 2.6, mode tcp, 1 thread",
            Self::NginxStream => "nginx 1.22 stream, 1 worker",
        }
    }

    fn url(self) -> String {
        match self {
            Self::Direct => format!("http://{}/", backend_v4(0)),
            _ => format!("http://{VIP_V4}/"),
        }
    }
}

/// What a configuration left behind to undo: processes (stopped first: SIGTERM, then
/// SIGKILL) and then the undo steps, in reverse order, errors reported but not fatal.
#[derive(Default)]
struct Active<'a> {
    children: Vec<common::ChildGuard>,
    undo: Vec<Box<dyn FnOnce() -> Result<()> + 'a>>,
}

impl Active<'_> {
    /// Runs `args` on teardown.
    fn undo_cmd(&mut self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        self.undo.push(Box::new(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            common::run(&args).map(drop)
        }));
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

/// The links of the LB to the backends (`b0`..), where the NAT modes' replies arrive.
fn backend_links() -> Vec<String> {
    (0..BACKENDS).map(|i| format!("b{i}")).collect()
}

/// The NAT modes' agent: on `eth0` and every backend link, the web service over the
/// backends with `forwarding` (`fullnat`: translated to `SNAT_V4`, ports `SNAT_PORTS`).
fn nat_agent_config(t: &Lab, forwarding: &str) -> String {
    let mut web = (0..BACKENDS).fold(
        ServiceBuilder::new("web", VIP_V4, 80, "tcp").forwarding(forwarding),
        |s, i| s.backend(Backend::new(backend_v4(i))),
    );
    let links = backend_links();
    let interfaces: Vec<&str> = [NODE_IF]
        .into_iter()
        .chain(links.iter().map(String::as_str))
        .collect();
    let mut config = t
        .agent_config()
        .interfaces(&interfaces)
        .conntrack_entries(262_144);
    if forwarding == "fullnat" {
        web = web.raw("snat_addresses", &format!("[\"{SNAT_V4}\"]"));
        config = config.raw("snat_ports", &format!("\"{SNAT_PORTS}\""));
    }
    config.service(web).render()
}

fn agent_config(t: &Lab, forwarding: &str) -> String {
    let web = (0..BACKENDS).fold(
        ServiceBuilder::new("web", VIP_V4, 80, "tcp").forwarding(forwarding),
        |s, i| s.backend(Backend::new(backend_v4(i))),
    );
    t.agent_config()
        .tunnel_source(LB_V4)
        .conntrack_entries(262_144)
        .service(web)
        .render()
}

fn nft_ruleset(hash: &str) -> String {
    let map: Vec<String> = (0..BACKENDS)
        .map(|i| format!("{i} : {}", backend_v4(i)))
        .collect();
    format!(
        "table ip weirbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP_V4} tcp dport 80 dnat to {hash} mod {BACKENDS} map {{ {} }}\n  }}\n}}\n",
        map.join(", ")
    )
}

fn haproxy_config(dir: &Path) -> String {
    let mut c = format!(
        "global\n  nbthread 1\n  maxconn 4000\n  pidfile {}/haproxy.pid\n\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n\
         frontend vip\n  bind {VIP_V4}:80\n  default_backend web\n\n\
         backend web\n  balance roundrobin\n",
        dir.display()
    );
    for i in 0..BACKENDS {
        let _ = writeln!(c, "  server b{i} {}:80", backend_v4(i));
    }
    c
}

fn nginx_stream_config(dir: &Path) -> String {
    let servers: String = (0..BACKENDS)
        .map(|i| format!("    server {}:80;\n", backend_v4(i)))
        .collect();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 1;\nworker_rlimit_nofile 16384;\ndaemon off;\n\
         pid {d}/lb-nginx.pid;\nerror_log {d}/lb-nginx-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         stream {{\n  upstream web {{\n{servers}  }}\n  server {{\n    listen {VIP_V4}:80 backlog=4096;\n    proxy_pass web;\n  }}\n}}\n",
        d = dir.display()
    )
}

fn backend_nginx_config(dir: &Path, i: usize) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\nworker_rlimit_nofile 16384;\ndaemon off;\n\
         pid {d}/b{i}-nginx.pid;\nerror_log {d}/b{i}-nginx-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 60s;\n\
         \x20 client_body_temp_path {d}/b{i}-body;\n  proxy_temp_path {d}/b{i}-proxy;\n\
         \x20 fastcgi_temp_path {d}/b{i}-fastcgi;\n  uwsgi_temp_path {d}/b{i}-uwsgi;\n\
         \x20 scgi_temp_path {d}/b{i}-scgi;\n\
         \x20 server {{\n    listen 80 backlog=4096;\n    location / {{\n      default_type text/plain;\n      return 200 \"{}\";\n    }}\n  }}\n}}\n",
        RESPONSE.escape_default()
    )
}

/// Starts nginx in `ns` with `config` (not forking: `daemon off`) and waits until it
/// listens on `addr`:80 (connect from inside the namespace), for up to 10 s.
fn start_nginx(t: &Lab, ns: &str, name: &str, config: &str) -> Result<common::ChildGuard> {
    let path = t.write_file(name, config)?;
    let path = path.to_str().context("utf-8 path")?.to_owned();
    let err = t.workdir.join(format!("{name}.startup.log"));
    let err = err.to_str().context("utf-8 path")?.to_owned();
    let mut child = common::spawn_cmd_in_ns(ns, "/usr/sbin/nginx", &["-e", &err, "-c", &path])?;
    wait_listening(ns, &mut child, "nginx")?;
    Ok(child)
}

/// Waits until something listens on TCP port 80 in `ns` (`ss -ltn`), failing early if
/// `child` exits.
fn wait_listening(ns: &str, child: &mut common::ChildGuard, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_status() {
            bail!("{what} in {ns} exited ({st}); its log:\n{}", child.log());
        }
        let listening = ns_exec(ns, &["ss", "-Hltn", "sport", "= :80"])?;
        if !listening.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} in {ns} does not listen after 10 s; its log:\n{}",
                child.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The reverse NAT (nftables, Weir's `nat`) needs the replies: for the run, the backends
/// route the client via the LB instead of their direct link.
fn route_client_via_lb(t: &Lab, a: &mut Active<'_>) -> Result<()> {
    let client = format!("{CLIENT_V4}/32");
    for (i, b) in t.backends.iter().enumerate() {
        let via = lb_side(i).to_string();
        let src = backend_v4(i).to_string();
        a.undo_cmd(&[
            "ip", "-n", b, "route", "replace", &client, "dev", "eth1", "src", &src,
        ]);
        ip(
            b,
            &["route", "replace", &client, "via", &via, "dev", NODE_IF],
        )?;
    }
    Ok(())
}

fn start(t: &Lab, peer: Peer) -> Result<Active<'_>> {
    let mut a = Active::default();
    let vip_lo = format!("{VIP_V4}/32");
    match peer {
        Peer::Direct => {}
        Peer::WeirTunnel | Peer::WeirDirect => {
            let forwarding = if peer == Peer::WeirTunnel {
                "tunnel"
            } else {
                "direct"
            };
            if peer == Peer::WeirTunnel {
                a.children.extend(t.start_decap()?);
            }
            // The agent leaves its datapath pinned when it stops (restarts keep flows):
            // remove it after the run, so the next configuration starts clean.
            a.undo.push(Box::new(|| t.teardown_datapath()));
            a.children
                .push(t.start_agent(&agent_config(t, forwarding))?);
        }
        Peer::WeirNat | Peer::WeirFullnat => {
            let forwarding = if peer == Peer::WeirNat {
                "nat"
            } else {
                "fullnat"
            };
            // The translated replies are redirected from a backend link to eth0, whose peer
            // (the client's end, without an XDP program) takes them only with GRO on.
            let gro = ns_exec(&t.cli, &["ethtool", "-k", NODE_IF])?;
            let was = if gro.contains("generic-receive-offload: on") {
                "on"
            } else {
                "off"
            };
            a.undo_cmd(&[
                "ip", "netns", "exec", &t.cli, "ethtool", "-K", NODE_IF, "gro", was,
            ]);
            ns_exec(&t.cli, &["ethtool", "-K", NODE_IF, "gro", "on"])?;
            if peer == Peer::WeirNat {
                route_client_via_lb(t, &mut a)?;
            } else {
                let snat = SNAT_V4.to_string();
                let snat_host = format!("{snat}/32");
                a.undo_cmd(&["ip", "-n", &t.lb, "addr", "del", &snat_host, "dev", "lo"]);
                ip(&t.lb, &["addr", "add", &snat_host, "dev", "lo"])?;
                for b in &t.backends {
                    a.undo_cmd(&["ip", "-n", b, "route", "del", &snat_host]);
                    ip(b, &["route", "add", &snat_host, "dev", NODE_IF])?;
                }
                // The agent reserves the SNAT ports in the LB's namespace; the others'
                // runs get them back.
                let reserved = "/proc/sys/net/ipv4/ip_local_reserved_ports";
                let before = ns_exec(&t.lb, &["cat", reserved])?;
                let restore = format!("echo '{}' > {reserved}", before.trim());
                a.undo_cmd(&["ip", "netns", "exec", &t.lb, "sh", "-c", &restore]);
            }
            a.undo.push(Box::new(|| t.teardown_datapath()));
            let links = backend_links();
            let interfaces: Vec<&str> = [NODE_IF]
                .into_iter()
                .chain(links.iter().map(String::as_str))
                .collect();
            a.children
                .push(t.start_agent_on(&nat_agent_config(t, forwarding), &interfaces)?);
        }
        Peer::NftNumgen | Peer::NftJhash => {
            let hash = if peer == Peer::NftNumgen {
                "numgen random".to_owned()
            } else {
                "jhash ip saddr . tcp sport".to_owned()
            };
            let path = t.write_file("nft.conf", &nft_ruleset(&hash))?;
            let path = path.to_str().context("utf-8 path")?;
            a.undo_cmd(&[
                "ip",
                "netns",
                "exec",
                &t.lb,
                "nft",
                "delete",
                "table",
                "ip",
                "weirbench",
            ]);
            ns_exec(&t.lb, &["nft", "-f", path]).context("loading the nftables ruleset")?;
            route_client_via_lb(t, &mut a)?;
        }
        Peer::Haproxy => {
            a.undo_cmd(&["ip", "-n", &t.lb, "addr", "del", &vip_lo, "dev", "lo"]);
            ip(&t.lb, &["addr", "add", &vip_lo, "dev", "lo"])?;
            let path = t.write_file("haproxy.cfg", &haproxy_config(&t.workdir))?;
            let path = path.to_str().context("utf-8 path")?;
            let mut child =
                common::spawn_cmd_in_ns(&t.lb, "/usr/sbin/haproxy", &["-db", "-f", path])?;
            let r = wait_listening(&t.lb, &mut child, "haproxy");
            a.children.push(child);
            r?;
        }
        Peer::NginxStream => {
            a.undo_cmd(&["ip", "-n", &t.lb, "addr", "del", &vip_lo, "dev", "lo"]);
            ip(&t.lb, &["addr", "add", &vip_lo, "dev", "lo"])?;
            a.children.push(start_nginx(
                t,
                &t.lb,
                "lb-nginx.conf",
                &nginx_stream_config(&t.workdir),
            )?);
        }
    }
    Ok(a)
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    requests: f64,
    rate: f64,
    cpu_us: f64,
    /// Time spent in the configuration's BPF programs (Weir's XDP programs), µs.
    bpf_us: f64,
    errors: u64,
}

impl Run {
    fn cpu_per_request(&self) -> f64 {
        self.cpu_us / self.requests.max(1.0)
    }

    fn bpf_per_request(&self) -> f64 {
        self.bpf_us / self.requests.max(1.0)
    }
}

fn parse_wrk(out: &str) -> Result<(f64, f64, u64)> {
    let mut requests = None;
    let mut rate = None;
    let mut errors = 0u64;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rate = rest.trim().parse::<f64>().ok();
        } else if line.contains(" requests in ") {
            requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|kv| kv.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    match (requests, rate) {
        (Some(n), Some(r)) => Ok((n, r, errors)),
        _ => bail!("cannot read wrk's output:\n{out}"),
    }
}

/// Runs wrk (one thread) from the client for `seconds`, measuring the machine's CPU time.
/// `pids`: the configuration's processes, whose BPF programs' run time is counted.
fn wrk(t: &Lab, url: &str, seconds: u64, conns: u32, close: bool, pids: &[u32]) -> Result<Run> {
    let d = format!("{seconds}s");
    let c = format!("-c{conns}");
    let mut args = vec!["-t1", &c, "-d", &d, "--timeout", "2s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let bpf_ns = || {
        pids.iter()
            .map(|&p| support::bpf_run_time_ns(p))
            .sum::<u64>()
    };
    let bpf0 = bpf_ns();
    let cpu0 = support::cpu_busy_us()?;
    let mut child = common::spawn_cmd_in_ns(&t.cli, "wrk", &args)?;
    let deadline = Instant::now() + Duration::from_secs(seconds + 15);
    let status = loop {
        if let Some(st) = child.try_status() {
            break st;
        }
        if Instant::now() > deadline {
            child.stop();
            bail!("wrk did not finish in {} s", seconds + 15);
        }
        thread::sleep(Duration::from_millis(20));
    };
    let cpu_us = support::cpu_busy_us()? - cpu0;
    let bpf_us = bpf_ns().saturating_sub(bpf0) as f64 / 1e3;
    let out = child.log();
    if !status.success() {
        bail!("wrk failed ({status}):\n{out}");
    }
    let (requests, rate, errors) = parse_wrk(&out)?;
    if requests < 1.0 {
        bail!("wrk completed no request:\n{out}");
    }
    Ok(Run {
        requests,
        rate,
        cpu_us,
        bpf_us,
        errors,
    })
}

#[derive(Default)]
struct Samples {
    keepalive: Vec<Option<Run>>,
    close: Vec<Option<Run>>,
    /// Busy CPU without traffic before each repeat, µs per second.
    background: Vec<f64>,
    failures: Vec<String>,
}

fn prepare(t: &Lab) -> Result<Vec<common::ChildGuard>> {
    // Ephemeral ports and TIME_WAIT: tens of thousands of connections per test.
    for ns in [&t.cli, &t.lb] {
        sysctl(
            ns,
            &[
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
                "net.core.somaxconn=4096",
                "net.ipv4.tcp_max_syn_backlog=4096",
            ],
        )?;
    }
    // The LB forwards for nftables (both directions through eth0), without redirects.
    sysctl(
        &t.lb,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            &format!("net.ipv4.conf.{NODE_IF}.send_redirects=0"),
        ],
    )?;
    let mut nginx = Vec::new();
    for (i, b) in t.backends.iter().enumerate() {
        sysctl(
            b,
            &[
                "net.core.somaxconn=4096",
                "net.ipv4.tcp_max_syn_backlog=4096",
            ],
        )?;
        nginx.push(start_nginx(
            t,
            b,
            &format!("b{i}-nginx.conf"),
            &backend_nginx_config(&t.workdir, i),
        )?);
    }
    Ok(nginx)
}

/// Checks that the configuration answers with the backends' response.
fn check_response(t: &Lab, peer: Peer) -> Result<()> {
    let url = peer.url();
    let body = ns_exec(
        &t.cli,
        &["curl", "-sS", "--max-time", "3", "--retry", "2", &url],
    )
    .with_context(|| format!("{}: curl {url}", peer.name()))?;
    if body != RESPONSE {
        bail!("{}: unexpected response {body:?}", peer.name());
    }
    Ok(())
}

/// The measured runs of one configuration, and the machine's busy CPU without traffic
/// just before them (µs per second: what other processes cost meanwhile).
struct Measured {
    keepalive: Result<Run>,
    close: Result<Run>,
    background: f64,
}

fn measure(t: &Lab, peer: Peer, seconds: u64, conns: u32) -> Result<Measured> {
    let active = start(t, peer).with_context(|| format!("starting {}", peer.name()))?;
    let pids: Vec<u32> = active
        .children
        .iter()
        .filter_map(common::ChildGuard::pid)
        .collect();
    check_response(t, peer)?;
    // Warm-up (caches, neighbour and connection tables), not measured.
    wrk(t, &peer.url(), 1, conns, false, &pids).context("warm-up")?;
    let cpu0 = support::cpu_busy_us()?;
    let idle = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let background = (support::cpu_busy_us()? - cpu0) / idle.elapsed().as_secs_f64();
    let keepalive = wrk(t, &peer.url(), seconds, conns, false, &pids);
    let close = wrk(t, &peer.url(), seconds, conns, true, &pids);
    drop(active);
    Ok(Measured {
        keepalive,
        close,
        background,
    })
}

fn main() {
    // A run stopped from outside still removes its namespaces.
    common::remove_on_signal().expect("signal handling");
    if !common::require_root() {
        eprintln!("bench e2e needs root (network namespaces, XDP)");
        std::process::exit(1);
    }
    for tool in ["/usr/sbin/nginx", "/usr/sbin/haproxy", "/usr/sbin/nft"] {
        if !Path::new(tool).exists() {
            eprintln!("bench e2e needs {tool}: run `cargo xtask setup`");
            std::process::exit(1);
        }
    }
    if Command::new("wrk").arg("-v").output().is_err() {
        eprintln!("bench e2e needs wrk: run `cargo xtask setup`");
        std::process::exit(1);
    }
    let seconds: u64 = support::arg("--seconds").unwrap_or(5).clamp(1, 60);
    let repeats: usize = support::arg("--repeats").unwrap_or(3).clamp(1, 20);
    let conns: u32 = support::arg("--connections").unwrap_or(32).clamp(1, 1000);
    let only: Option<String> = support::arg("--only");
    let peers: Vec<Peer> = PEERS
        .into_iter()
        .filter(|p| {
            *p == Peer::Direct
                || only
                    .as_deref()
                    .is_none_or(|o| o.split(',').any(|n| n.trim() == p.name()))
        })
        .collect();

    let started = Instant::now();
    // Run time of Weir's XDP programs (agent and decap), counted by the kernel while this
    // descriptor is open.
    let bpf_stats = support::enable_bpf_stats();
    if bpf_stats.is_none() {
        eprintln!("warning: BPF_ENABLE_STATS refused; the time in Weir's programs is not measured");
    }
    let t = Lab::build().unwrap_or_else(|e| panic!("topology: {e:#}"));
    let backends_nginx = prepare(&t).unwrap_or_else(|e| panic!("preparing the topology: {e:#}"));

    let mut samples: Vec<Samples> = peers.iter().map(|_| Samples::default()).collect();
    let total = repeats * peers.len();
    let mut done = 0;
    for r in 0..repeats {
        let mut order: Vec<usize> = (0..peers.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let peer = peers[i];
            done += 1;
            print!(
                "[{done}/{total}, {:.0} s] repeat {}, {:<13} ",
                started.elapsed().as_secs_f64(),
                r + 1,
                peer.name()
            );
            let s = &mut samples[i];
            match measure(&t, peer, seconds, conns) {
                Ok(m) => {
                    s.background.push(m.background);
                    print!(" idle {:4.1}%", m.background / 1e4);
                    for (what, res, into) in [
                        ("keep-alive", m.keepalive, &mut s.keepalive),
                        ("close", m.close, &mut s.close),
                    ] {
                        match res {
                            Ok(run) => {
                                print!(
                                    " {what}: {:.0}/s {:.1} us/req{}",
                                    run.rate,
                                    run.cpu_per_request(),
                                    if run.errors > 0 {
                                        format!(" ({} errors)", run.errors)
                                    } else {
                                        String::new()
                                    }
                                );
                                into.push(Some(run));
                            }
                            Err(e) => {
                                print!(" {what}: FAILED");
                                s.failures.push(format!("repeat {}: {what}: {e:#}", r + 1));
                                into.push(None);
                            }
                        }
                    }
                    println!();
                }
                Err(e) => {
                    println!(" FAILED: {e:#}");
                    s.failures.push(format!("repeat {}: {e:#}", r + 1));
                    s.keepalive.push(None);
                    s.close.push(None);
                }
            }
        }
    }
    drop(backends_nginx);
    drop(t);
    drop(bpf_stats);

    report(&peers, &samples, seconds, repeats, conns);
    println!("bench e2e took {:.0} s", started.elapsed().as_secs_f64());
}

struct Row {
    peer: Peer,
    rps: Option<Spread>,
    cpu_req: Option<Spread>,
    cpu_req_added: Option<Spread>,
    cps: Option<Spread>,
    cpu_conn: Option<Spread>,
    cpu_conn_added: Option<Spread>,
    errors: u64,
    failures: Vec<String>,
    bpf_req: Option<Spread>,
    bpf_conn: Option<Spread>,
}

fn spread_of(runs: &[Option<Run>], f: impl Fn(&Run) -> f64) -> Option<Spread> {
    let v: Vec<f64> = runs.iter().flatten().map(f).collect();
    Spread::of(&v)
}

/// Per repeat, the configuration's CPU per request minus the baseline's of the same
/// repeat.
fn added(runs: &[Option<Run>], base: &[Option<Run>]) -> Option<Spread> {
    let v: Vec<f64> = runs
        .iter()
        .zip(base)
        .filter_map(|(a, b)| Some(a.as_ref()?.cpu_per_request() - b.as_ref()?.cpu_per_request()))
        .collect();
    Spread::of(&v)
}

fn ratio_line(what: &str, num: Option<Spread>, den: Option<Spread>, target: f64) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d.median > 0.0 => {
            let ratio = n.median / d.median;
            let verdict = if ratio <= target { "met" } else { "MISSED" };
            format!(
                "| {what} | {:+.2} / {:+.2} = {ratio:.3} | at most {target} | {verdict} |",
                n.median, d.median
            )
        }
        // On a busy machine the peer's added CPU can come out at zero or below: no ratio.
        (Some(n), Some(d)) => format!(
            "| {what} | {:+.2} / {:+.2}: no ratio (peer's added CPU not positive) | at most {target} | n/a |",
            n.median, d.median
        ),
        _ => format!("| {what} | not measured | at most {target} | n/a |"),
    }
}

fn report(peers: &[Peer], samples: &[Samples], seconds: u64, repeats: usize, conns: u32) {
    let base = &samples[0];
    let rows: Vec<Row> = peers
        .iter()
        .zip(samples)
        .map(|(&peer, s)| Row {
            peer,
            rps: spread_of(&s.keepalive, |r| r.rate),
            cpu_req: spread_of(&s.keepalive, Run::cpu_per_request),
            cpu_req_added: (peer != Peer::Direct)
                .then(|| added(&s.keepalive, &base.keepalive))
                .flatten(),
            cps: spread_of(&s.close, |r| r.rate),
            cpu_conn: spread_of(&s.close, Run::cpu_per_request),
            cpu_conn_added: (peer != Peer::Direct)
                .then(|| added(&s.close, &base.close))
                .flatten(),
            errors: s
                .keepalive
                .iter()
                .chain(&s.close)
                .flatten()
                .map(|r| r.errors)
                .sum(),
            failures: s.failures.clone(),
            bpf_req: spread_of(&s.keepalive, Run::bpf_per_request),
            bpf_conn: spread_of(&s.close, Run::bpf_per_request),
        })
        .collect();

    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.peer.label().to_owned(),
                show_opt(r.rps, 0),
                show_opt(r.cpu_req, 2),
                show_opt_signed(r.cpu_req_added, 2),
                show_opt(r.cps, 0),
                show_opt(r.cpu_conn, 1),
                show_opt_signed(r.cpu_conn_added, 1),
                r.errors.to_string(),
            ]
        })
        .collect();
    let table = support::table(
        &[
            "configuration",
            "requests/s, keep-alive",
            "CPU µs/request",
            "added over direct",
            "connections/s, close",
            "CPU µs/connection",
            "added over direct",
            "errors",
        ],
        1,
        &table_rows,
    );

    let mut bpf_rows = Vec::new();
    for (&peer, smp) in peers.iter().zip(samples) {
        if matches!(
            peer,
            Peer::WeirTunnel | Peer::WeirDirect | Peer::WeirNat | Peer::WeirFullnat
        ) {
            bpf_rows.push(vec![
                peer.label().to_owned(),
                show_opt(spread_of(&smp.keepalive, Run::bpf_per_request), 3),
                show_opt(spread_of(&smp.close, Run::bpf_per_request), 3),
            ]);
        }
    }
    let bpf_table = support::table(
        &[
            "configuration",
            "in Weir's XDP programs, µs/request (keep-alive)",
            "µs/connection (close)",
        ],
        1,
        &bpf_rows,
    );
    let find = |p: Peer| rows.iter().find(|r| r.peer == p);
    let req_added = |p: Peer| find(p).and_then(|r| r.cpu_req_added);
    let mut targets = String::new();
    let _ = writeln!(
        targets,
        "| target (CPU added per keep-alive request, medians) | Weir / peer | target | verdict |"
    );
    let _ = writeln!(targets, "|---|---:|---:|---|");
    for weir in [Peer::WeirTunnel, Peer::WeirDirect] {
        for (peer, target) in [
            (Peer::NftNumgen, 0.25),
            (Peer::NftJhash, 0.25),
            (Peer::Haproxy, 0.05),
        ] {
            let _ = writeln!(
                targets,
                "{}",
                ratio_line(
                    &format!("{} vs {}", weir.name(), peer.name()),
                    req_added(weir),
                    req_added(peer),
                    target
                )
            );
        }
    }

    // Issue 12: the NAT modes against the kernel's DNAT (numgen, as kube-proxy) and
    // HAProxy.
    for weir in [Peer::WeirNat, Peer::WeirFullnat] {
        for (peer, target) in [(Peer::NftNumgen, 0.5), (Peer::Haproxy, 0.25)] {
            let _ = writeln!(
                targets,
                "{}",
                ratio_line(
                    &format!("{} vs {}", weir.name(), peer.name()),
                    req_added(weir),
                    req_added(peer),
                    target
                )
            );
        }
    }

    let failures: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.failures
                .iter()
                .map(move |f| format!("- {}: {f}", r.peer.name()))
        })
        .collect();
    let mut body = format!(
        "Measured by `cargo xtask bench e2e` on {}: wrk 4.1 with one thread and {conns} \
         connections from the client namespace, {seconds} s per test after a 1 s warm-up, \
         {repeats} interleaved repeats; median (min–max). CPU is the whole machine's busy \
         time from /proc/stat (user, system, irq, softirq) divided by the requests wrk \
         completed; \"added\" is per repeat against the baseline of the same repeat.\n\n{table}\n{targets}\n\
         Of that, the time spent in Weir's own XDP programs (the balancer on the LB, and \
         `weir decap` on the backends in tunnel mode), from the kernel's BPF run-time \
         statistics:\n\n{bpf_table}",
        support::machine()
    );
    let background: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.background.iter().map(|us| us / 1e4))
        .collect();
    if let Some(bg) = Spread::of(&background) {
        let _ = write!(
            body,
            "\nThe machine without traffic (other processes), sampled for 0.5 s before each \
             configuration: busy {:.1}% of one core (median; {:.1}–{:.1}%).{}\n",
            bg.median,
            bg.min,
            bg.max,
            if bg.max > 10.0 {
                " Something else ran during the bench: the CPU figures include some of it."
            } else {
                ""
            }
        );
    }
    if !failures.is_empty() {
        let _ = write!(body, "\nFailures:\n\n{}\n", failures.join("\n"));
    }
    println!("\n{body}");
    support::write_doc_section("e2e", &body);

    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.peer.name(),
                "label": r.peer.label(),
                "rps": support::json_opt(r.rps),
                "cpu_us_per_request": support::json_opt(r.cpu_req),
                "cpu_us_per_request_added": support::json_opt(r.cpu_req_added),
                "cps": support::json_opt(r.cps),
                "cpu_us_per_connection": support::json_opt(r.cpu_conn),
                "cpu_us_per_connection_added": support::json_opt(r.cpu_conn_added),
                "errors": r.errors,
                "bpf_us_per_request": support::json_opt(r.bpf_req),
                "bpf_us_per_connection": support::json_opt(r.bpf_conn),
            })
        })
        .collect();
    support::write_json(&serde_json::json!({
        "bench": "e2e",
        "machine": support::machine(),
        "seconds": seconds,
        "repeats": repeats,
        "connections": conns,
        "rows": json_rows,
    }));
}
