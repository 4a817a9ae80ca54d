//! `cargo xtask bench e2e`: Weir side by side with the kernel's NAT (nftables DNAT), HAProxy
//! and NGINX's stream module, with real HTTP traffic through one namespace topology.
//!
//! The topology is the e2e tests' (`tests/common`): a client, a bridge, the LB and three
//! backends, each in its own network namespace, joined by veth pairs. Every backend runs
//! Debian's nginx (one worker) with a fixed 11-byte response. The same load, `wrk` with one
//! thread from the client, runs against each configuration in turn:
//!
//! * `direct`: straight to backend 1, no LB (the baseline);
//! * `weir-tunnel` / `weir-direct`: `weir agent` on the LB (IP-in-IP with `weir decap` on
//!   the backends / L2 DSR), replies straight from the backends;
//! * `nft-numgen` / `nft-jhash`: nftables DNAT in the LB (`numgen random mod 3`, as
//!   kube-proxy's nftables mode, and `jhash ip saddr . tcp sport mod 3`); replies return
//!   through the LB (the backends route the client via the LB) for the reverse NAT;
//! * `haproxy`: HAProxy `mode tcp`, `nbthread 1`; `nginx-stream`: nginx stream proxy,
//!   one worker. Both listen on the VIP (added to the LB's `lo` for their runs).
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
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{NODE_IF, Topology, VIP_V4, backend_v4, ip, ns_exec, sysctl};
use support::{Spread, show_opt, show_opt_signed};

const BACKENDS: usize = common::BACKENDS;
const RESPONSE: &str = "weir bench\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Direct,
    WeirTunnel,
    WeirDirect,
    NftNumgen,
    NftJhash,
    Haproxy,
    NginxStream,
}

const PEERS: [Peer; 7] = [
    Peer::Direct,
    Peer::WeirTunnel,
    Peer::WeirDirect,
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

fn agent_config(t: &Topology, forwarding: &str) -> String {
    let mut c = format!(
        "[agent]\ninterface = \"{NODE_IF}\"\nxdp_mode = \"native\"\ntunnel_source = \"{}\"\n\
         conntrack_entries = 262144\n{}\n[[service]]\nname = \"web\"\nvip = \"{VIP_V4}\"\n\
         port = 80\nprotocol = \"tcp\"\nforwarding = \"{forwarding}\"\n",
        common::LB_V4,
        t.agent_keys()
    );
    for i in 0..BACKENDS {
        let _ = write!(c, "[[service.backend]]\naddress = \"{}\"\n", backend_v4(i));
    }
    c
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
fn start_nginx(t: &Topology, ns: &str, name: &str, config: &str) -> Result<common::ChildGuard> {
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

fn start(t: &Topology, peer: Peer) -> Result<Active<'_>> {
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
                a.children
                    .extend(t.start_decap(&[std::net::IpAddr::V4(VIP_V4)])?);
            }
            // The agent leaves its datapath pinned when it stops (restarts keep flows):
            // remove it after the run, so the next configuration starts clean.
            a.undo.push(Box::new(|| t.teardown_datapath()));
            a.children
                .push(t.start_agent(&agent_config(t, forwarding))?);
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
            // The reverse NAT needs the replies: the backends route the client via the LB.
            let client = format!("{}/32", common::CLIENT_V4);
            let lb = common::LB_V4.to_string();
            for b in &t.backends {
                a.undo_cmd(&["ip", "-n", b, "route", "del", &client]);
                ip(b, &["route", "add", &client, "via", &lb, "dev", NODE_IF])?;
            }
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
    errors: u64,
}

impl Run {
    fn cpu_per_request(&self) -> f64 {
        self.cpu_us / self.requests.max(1.0)
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
fn wrk(t: &Topology, url: &str, seconds: u64, conns: u32, close: bool) -> Result<Run> {
    let d = format!("{seconds}s");
    let c = format!("-c{conns}");
    let mut args = vec!["-t1", &c, "-d", &d, "--timeout", "2s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
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
        errors,
    })
}

#[derive(Default)]
struct Samples {
    keepalive: Vec<Option<Run>>,
    close: Vec<Option<Run>>,
    failures: Vec<String>,
}

fn prepare(t: &Topology) -> Result<Vec<common::ChildGuard>> {
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
fn check_response(t: &Topology, peer: Peer) -> Result<()> {
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

fn measure(
    t: &Topology,
    peer: Peer,
    seconds: u64,
    conns: u32,
) -> Result<(Result<Run>, Result<Run>)> {
    let _active = start(t, peer).with_context(|| format!("starting {}", peer.name()))?;
    check_response(t, peer)?;
    // Warm-up (caches, neighbour and connection tables), not measured.
    wrk(t, &peer.url(), 1, conns, false).context("warm-up")?;
    let keepalive = wrk(t, &peer.url(), seconds, conns, false);
    let close = wrk(t, &peer.url(), seconds, conns, true);
    Ok((keepalive, close))
}

fn main() {
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
    let t = Topology::build("be2e").unwrap_or_else(|e| panic!("topology: {e:#}"));
    let mut all_ns = vec![t.cli.clone(), t.sw.clone(), t.lb.clone()];
    all_ns.extend(t.backends.iter().cloned());
    let reaper = Reaper(all_ns);
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
                Ok((k, c)) => {
                    for (what, res, into) in [
                        ("keep-alive", k, &mut s.keepalive),
                        ("close", c, &mut s.close),
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
    drop(reaper);
    drop(t);

    report(&peers, &samples, seconds, repeats, conns);
    println!("bench e2e took {:.0} s", started.elapsed().as_secs_f64());
}

/// Stops whatever still runs in the namespaces before the topology deletes them.
struct Reaper(Vec<String>);

impl Drop for Reaper {
    fn drop(&mut self) {
        support::kill_namespace_processes(&self.0);
    }
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
         completed; \"added\" is per repeat against the baseline of the same repeat.\n\n{table}\n{targets}",
        support::machine()
    );
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
