//! Privileged end-to-end test of scale-out: three balancers behind a router's ECMP, each
//! running BIRD 2 and `weir agent` with the same services, announcing the VIP over BGP
//! through `[announce]` and config/bird-weir.conf (included as shipped); the router runs
//! BIRD 2 with `merge paths on` and forwards with `fib_multipath_hash_policy = 1`. The
//! backends decapsulate (`weir decap`) and answer the client directly through the router
//! (topology: `weir_testbed::scaleout`). In order:
//!
//! 1. the router's route for the VIP is learned over BGP and grows one next hop per agent,
//!    only once that agent is ready (BGP sessions up before, no route);
//! 2. 300 flows reach the backends through all three balancers (each balancer's metrics);
//! 3. `weir fleet check` finds the three rings equal, and names the service once one
//!    agent's weight is changed on its own;
//! 4. a balancer whose backends all fail its health checks withdraws the VIP within one
//!    fall plus the BGP update, and announces it again when they come back;
//! 5. 100 long-lived TCP connections; one balancer is SIGKILLed with its BIRD and its link
//!    cut: the router drops it when the BGP hold time (3 s) runs out, and every
//!    connection, moved or not, keeps working with its bytes echoed intact;
//! 6. `weir announce withdraw` on a balancer: its flows move and keep working, and new
//!    connections opened throughout the drain all succeed; `resume` brings it back, and
//!    SIGTERM withdraws it again before the agent exits.
//!
//! The figures (time to withdraw and to re-announce, connections kept) are printed. Needs
//! root and BIRD (`cargo xtask setup`); skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_scaleout -- --nocapture`

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{
    Backend, ChildGuard, ConfigBuilder, HealthCheck, IdServer, METRICS_ADDR, NODE_IF, PassHolder,
    ROUTER_V4, SCALEOUT_CLIENT_V4, ScaleOut, ServiceBuilder, VIP_V4, backend_v4, balancer_port,
    balancer_v4, http_get, id_tcp_connect, id_tcp_connect_here, id_tcp_echo, id_tcp_flows, ip,
    metric, parse_metrics, predict, prefix, require_root, run, run_status, spawn_cmd_in_ns,
    spawn_in_ns, spawn_nsenter, wait_until, weir_bin, xdp_attached,
};
use weir::api::{AnnounceStatus, Request, Status};

const BALANCERS: usize = 3;
const PORT: u16 = 80;
/// The `[announce]` table and device of every agent, and `WEIR_TABLE` of their BIRDs.
const TABLE: u32 = 100;
const DEVICE: &str = "weir-vips";
const ROUTER_AS: u32 = 65000;
const BALANCER_AS: u32 = 65001;
/// The BGP hold time of both sides (config/bird-weir.conf and the router's template).
const HOLD: Duration = Duration::from_secs(3);

/// The health check of every agent: fall 2 of 300 ms, each at most 200 ms.
const CHECK_INTERVAL: Duration = Duration::from_millis(300);
const CHECK_TIMEOUT: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
const RISE: u32 = 2;

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP_V4), PORT)
}

/// A BIRD 2 in a namespace, in the foreground (`-f`) so that it is our child, with its
/// own control socket and pid file. Drop stops it, and kills whatever the pid file still
/// names if that outlived it.
struct Bird {
    child: ChildGuard,
    ctl: PathBuf,
    pid_file: PathBuf,
}

impl Bird {
    fn start(ns: &str, dir: &Path, name: &str, config: &str) -> Result<Self> {
        let conf = dir.join(format!("{name}.conf"));
        let ctl = dir.join(format!("{name}.ctl"));
        let pid_file = dir.join(format!("{name}.pid"));
        fs::write(&conf, config)?;
        let [conf_s, ctl_s, pid_s] = [&conf, &ctl, &pid_file].map(|p| p.display().to_string());
        let child = spawn_cmd_in_ns(
            ns,
            "bird",
            &["-f", "-c", &conf_s, "-s", &ctl_s, "-P", &pid_s],
        )?;
        let mut bird = Self {
            child,
            ctl,
            pid_file,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bird.birdc(&["show", "status"]).is_err() {
            if let Some(st) = bird.child.try_status() {
                bail!("bird in {ns} exited ({st}); log:\n{}", bird.child.log());
            }
            if Instant::now() > deadline {
                bail!("bird in {ns} does not answer; log:\n{}", bird.child.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(bird)
    }

    fn birdc(&self, args: &[&str]) -> Result<String> {
        let ctl = self.ctl.display().to_string();
        let mut all = vec!["birdc", "-s", &ctl];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Whether BGP protocol `name` is established.
    fn established(&self, name: &str) -> bool {
        self.birdc(&["show", "protocols", name])
            .is_ok_and(|text| text.contains("Established"))
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.child.stop();
        if let Some(pid) = fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<libc::pid_t>().ok())
            && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "bird")
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid file is this
            // BIRD's own and the process still runs as bird.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The router's BIRD: a BGP session per balancer, ECMP into the kernel.
fn router_bird_config() -> String {
    let mut text = format!(
        "log stderr all;\nrouter id {ROUTER_V4};\nprotocol device {{ scan time 10; }}\n\
         protocol kernel {{\n  merge paths on;\n  ipv4 {{ import none; export all; }};\n}}\n\
         template bgp balancer {{\n  local {ROUTER_V4} as {ROUTER_AS};\n  hold time {};\n  \
         keepalive time 1;\n  connect delay time 1;\n  connect retry time 1;\n  \
         error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n",
        HOLD.as_secs()
    );
    for i in 0..BALANCERS {
        text.push_str(&format!(
            "protocol bgp lb{} from balancer {{ neighbor {} as {BALANCER_AS}; }}\n",
            i + 1,
            balancer_v4(i)
        ));
    }
    text
}

/// A balancer's BIRD: the shipped snippet, included as its header says.
fn balancer_bird_config(i: usize) -> String {
    let snippet = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bird-weir.conf");
    let me = balancer_v4(i);
    format!(
        "log stderr all;\ndefine WEIR_TABLE = {TABLE};\nrouter id {me};\ninclude \"{}\";\n\
         protocol bgp uplink from weir_uplink {{\n  local {me} as {BALANCER_AS};\n  \
         neighbor {ROUTER_V4} as {ROUTER_AS};\n}}\n",
        snippet.display()
    )
}

/// One balancer: its namespace, its agent's files, the agent and its BIRD.
struct Balancer {
    index: usize,
    ns: String,
    socket: PathBuf,
    bpffs: PathBuf,
    config: PathBuf,
    /// The agent's audit log, in the test's directory (never the host's default).
    audit: PathBuf,
    agent: Option<ChildGuard>,
    bird: Option<Bird>,
}

impl Balancer {
    fn socket(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    fn start_agent(&mut self) -> Result<()> {
        let config = self.config.to_str().context("utf-8 path")?;
        let mut child = spawn_nsenter(&self.ns, &["agent", "--config", config])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !weir::api::request(&self.socket, &Request::Status {}).is_ok_and(|r| r.ok) {
            if let Some(st) = child.try_status() {
                bail!("agent {} exited ({st}); log:\n{}", self.index, child.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {} does not answer; log:\n{}",
                    self.index,
                    child.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        if !xdp_attached(&self.ns, NODE_IF)? {
            bail!(
                "agent {} answers without XDP; log:\n{}",
                self.index,
                child.log()
            );
        }
        self.agent = Some(child);
        Ok(())
    }

    fn status(&self) -> Status {
        let response = weir::api::request(&self.socket, &Request::Status {}).expect("status");
        assert!(response.ok, "{:?}", response.error);
        response.data.expect("data").try_into().expect("a status")
    }

    fn announce(&self) -> AnnounceStatus {
        self.status().announce.expect("the agent announces")
    }

    /// A counter or gauge of this agent's `/metrics`.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (code, body) =
            http_get(&self.ns, METRICS_ADDR, "/metrics", Duration::from_secs(5)).expect("scrape");
        assert_eq!(code, 200, "{body}");
        metric(&parse_metrics(&body).expect("metrics"), name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} at balancer {}", self.index))
    }

    fn new_flows(&self) -> f64 {
        self.metric("weir_service_new_flows_total", &[("service", "web")])
    }
}

/// The whole test bed; Drop stops agents and BIRDs, removes the pins, then the namespaces.
struct Fleet {
    balancers: Vec<Balancer>,
    router: Option<Bird>,
    decaps: Vec<ChildGuard>,
    servers: Vec<IdServer>,
    passes: Vec<PassHolder>,
    workdir: PathBuf,
    net: ScaleOut,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for b in &mut self.balancers {
            drop(b.agent.take());
            drop(b.bird.take());
            if b.bpffs.exists()
                && let Err(e) = weir::datapath::teardown(&b.bpffs)
            {
                eprintln!("warning: teardown of {}: {e:#}", b.bpffs.display());
            }
        }
        drop(self.router.take());
        self.decaps.clear();
        self.servers.clear();
        self.passes.clear();
        if let Err(e) = self.net.teardown() {
            eprintln!("warning: {e:#}");
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

impl Fleet {
    fn build() -> Result<Self> {
        let prefix = prefix("so");
        let net = ScaleOut::build(&prefix, BALANCERS).context("building the topology")?;
        let workdir = std::env::temp_dir().join(format!("weir-e2e-{prefix}"));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir)?;
        let mut fleet = Self {
            balancers: Vec::new(),
            router: None,
            decaps: Vec::new(),
            servers: Vec::new(),
            passes: Vec::new(),
            workdir,
            net,
        };
        for i in 0..BALANCERS {
            // veth hands XDP_TX frames only to a peer with an XDP program.
            fleet
                .passes
                .push(PassHolder::attach(&fleet.net.sw, &balancer_port(i))?);
        }
        fleet.net.prime_neighbours()?;
        for (i, b) in fleet.net.backends.clone().iter().enumerate() {
            fleet
                .servers
                .push(IdServer::start(b, u8::try_from(i)?, PORT, &[])?);
            fleet.decaps.push(spawn_in_ns(
                b,
                &[
                    "decap",
                    "--interface",
                    NODE_IF,
                    "--vip",
                    &VIP_V4.to_string(),
                ],
            )?);
        }
        for (b, decap) in fleet.net.backends.clone().iter().zip(&mut fleet.decaps) {
            decap.wait_xdp(b, NODE_IF, None)?;
        }
        for i in 0..BALANCERS {
            let ns = fleet.net.lbs[i].clone();
            let dir = fleet.workdir.join(format!("lb{}", i + 1));
            fs::create_dir_all(&dir)?;
            let socket = dir.join("weir.sock");
            let bpffs = PathBuf::from(format!("/sys/fs/bpf/weir-test-{prefix}-lb{}", i + 1));
            // The same services everywhere; only what is the balancer's own differs.
            let config = ConfigBuilder::new(NODE_IF)
                .xdp_mode("native")
                .tunnel_source(balancer_v4(i))
                .conntrack_entries(65536)
                .api_socket(&socket)
                .state_file(&dir.join("state.json"))
                .audit_log(&dir.join("audit.jsonl"))
                .bpffs(&bpffs)
                .announce(DEVICE, TABLE)
                .service(web_service());
            let config_path = dir.join("agent.toml");
            fs::write(&config_path, config.render())?;
            let bird = Bird::start(&ns, &dir, "bird", &balancer_bird_config(i))?;
            fleet.balancers.push(Balancer {
                index: i,
                ns,
                socket,
                bpffs,
                config: config_path,
                audit: dir.join("audit.jsonl"),
                agent: None,
                bird: Some(bird),
            });
        }
        fleet.router = Some(Bird::start(
            &fleet.net.rt,
            &fleet.workdir,
            "router",
            &router_bird_config(),
        )?);
        Ok(fleet)
    }

    fn router(&self) -> &Bird {
        self.router.as_ref().expect("router BIRD")
    }

    /// The router's next hops for the VIP, from the kernel route BIRD installed (a route
    /// of another origin fails the test).
    fn next_hops(&self) -> BTreeSet<Ipv4Addr> {
        let text = ip(
            &self.net.rt,
            &["-j", "route", "show", &format!("{VIP_V4}/32")],
        )
        .expect("ip route show");
        let routes: Vec<serde_json::Value> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&text).expect("ip -j output")
        };
        let mut hops = BTreeSet::new();
        for route in routes {
            assert_eq!(
                route["protocol"].as_str(),
                Some("bird"),
                "the VIP's route must come from BGP: {route}"
            );
            let gateways: Vec<&serde_json::Value> = match route["nexthops"].as_array() {
                Some(list) => list.iter().map(|h| &h["gateway"]).collect(),
                None => vec![&route["gateway"]],
            };
            for g in gateways {
                hops.insert(g.as_str().and_then(|g| g.parse().ok()).expect("a gateway"));
            }
        }
        hops
    }

    /// Waits until the router's next hops are those of `balancers`; returns how long it
    /// took.
    fn wait_next_hops(&self, balancers: &[usize], timeout: Duration) -> Duration {
        let want: BTreeSet<Ipv4Addr> = balancers.iter().map(|&i| balancer_v4(i)).collect();
        let start = Instant::now();
        wait_until(&format!("next hops {want:?}"), timeout, || {
            (self.next_hops() == want).then_some(())
        });
        start.elapsed()
    }

    fn weir(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec![weir_bin()];
        all.extend_from_slice(args);
        run_status(&all).expect("run weir")
    }

    fn fleet_check(&self, balancers: &[usize]) -> (i32, String, String) {
        let mut args = vec!["fleet", "check"];
        args.extend(balancers.iter().map(|&i| self.balancers[i].socket()));
        self.weir(&args)
    }

    /// Prohibits (or allows again) traffic from balancer `i` to the backends' own stacks:
    /// its health checks fail, the others' do not. Tunnelled traffic is decapsulated
    /// before routing and unaffected.
    fn block_checks_of(&self, i: usize, blocked: bool) {
        let host = format!("{}/32", balancer_v4(i));
        for b in &self.net.backends {
            let verb = if blocked { "add" } else { "del" };
            ip(b, &["route", verb, "prohibit", &host]).expect("prohibit route");
        }
    }
}

fn web_service() -> ServiceBuilder {
    let mut service = ServiceBuilder::new("web", VIP_V4, PORT, "tcp").health_check(
        HealthCheck::new("tcp")
            .interval(CHECK_INTERVAL)
            .timeout(CHECK_TIMEOUT)
            .rise(RISE)
            .fall(FALL),
    );
    for i in 0..3 {
        service = service.backend(Backend::new(backend_v4(i)));
    }
    service
}

/// A long-lived connection: its source port, stream and backend.
struct Conn {
    sport: u16,
    stream: TcpStream,
    backend: u8,
}

/// A payload of `len` bytes that names the connection and the round.
fn payload(sport: u16, round: u32, len: usize) -> Vec<u8> {
    let tag = format!("conn {sport} round {round} ");
    tag.bytes().cycle().take(len).collect()
}

/// Sends a payload on every connection, then reads every echo (within `timeout` each) and
/// compares it; returns the source ports whose echo failed or differed.
fn echo_all(conns: &mut [Conn], round: u32, timeout: Duration) -> Vec<(u16, String)> {
    const LEN: usize = 4096;
    let mut failed = Vec::new();
    for c in conns.iter_mut() {
        let p = payload(c.sport, round, LEN);
        if let Err(e) = c.stream.write_all(&p) {
            failed.push((c.sport, format!("send: {e}")));
        }
    }
    for c in conns.iter_mut() {
        if failed.iter().any(|(s, _)| *s == c.sport) {
            continue;
        }
        let _ = c.stream.set_read_timeout(Some(timeout));
        let mut got = vec![0u8; LEN];
        match c.stream.read_exact(&mut got) {
            Ok(()) if got == payload(c.sport, round, LEN) => {}
            Ok(()) => failed.push((c.sport, "echo differs".to_owned())),
            Err(e) => failed.push((c.sport, format!("read: {e}"))),
        }
    }
    failed
}

/// Opens a new connection every few milliseconds from `ports` until `stop`: (opened,
/// failed with their errors).
fn churn(
    cli: String,
    ports: std::ops::Range<u16>,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        common::in_netns(&cli, || {
            let mut failures = Vec::new();
            for sport in ports {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let result = id_tcp_connect_here(vip(), sport, Duration::from_secs(3))
                    .and_then(|(mut s, _)| id_tcp_echo(&mut s, &payload(sport, 0, 64)));
                opened.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = result {
                    failures.push(format!("port {sport}: {e:#}"));
                }
                thread::sleep(Duration::from_millis(10));
            }
            failures
        })
    })
}

#[test]
fn balancers_behind_ecmp_announce_withdraw_and_keep_flows() {
    if !require_root() {
        return;
    }
    if run(&["bird", "--version"]).is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "bird is not installed (cargo xtask setup installs bird2)"
        );
        eprintln!("SKIPPED: bird is not installed (cargo xtask setup)");
        return;
    }
    let started = Instant::now();
    let mut fleet = Fleet::build().expect("test bed");
    let mut figures: Vec<String> = Vec::new();

    // 1. Sessions up first, with nothing announced: no agent runs.
    wait_until("BGP sessions established", Duration::from_secs(20), || {
        (0..BALANCERS)
            .all(|i| fleet.router().established(&format!("lb{}", i + 1)))
            .then_some(())
    });
    assert!(fleet.next_hops().is_empty(), "a route before any agent");
    // Each agent adds its next hop once ready (its backends checked up), not before.
    let mut up: Vec<usize> = Vec::new();
    for i in 0..BALANCERS {
        fleet.balancers[i].start_agent().expect("agent");
        up.push(i);
        let took = fleet.wait_next_hops(&up, Duration::from_secs(10));
        let announce = fleet.balancers[i].announce();
        assert_eq!(announce.device, DEVICE);
        assert_eq!(announce.table, TABLE);
        assert!(
            announce
                .vips
                .iter()
                .all(|v| v.announced && v.reason == "serving"),
            "{announce:?}"
        );
        eprintln!(
            "balancer {}: announced {took:?} after its API answered",
            i + 1
        );
    }
    let first = fleet
        .router()
        .birdc(&["show", "route", "all"])
        .expect("birdc");
    assert!(first.contains("BGP.as_path: 65001"), "{first}");

    // 2. 300 flows, spread by ECMP over the three balancers.
    let before: Vec<f64> = fleet.balancers.iter().map(Balancer::new_flows).collect();
    let report = id_tcp_flows(&fleet.net.cli, vip(), 20_000..20_300);
    report.assert_all_ok();
    // Whichever balancer a flow went through, it got the ring's backend: one ring for all.
    let client = IpAddr::V4(SCALEOUT_CLIENT_V4);
    assert_eq!(
        report.counts(3),
        predict::maglev_counts(&web_service(), &[1, 1, 1], client, 20_000..20_300)
    );
    let per_balancer: Vec<f64> = fleet
        .balancers
        .iter()
        .zip(&before)
        .map(|(b, before)| b.new_flows() - before)
        .collect();
    eprintln!("300 flows per balancer (new flows in their metrics): {per_balancer:?}");
    assert!(
        per_balancer.iter().all(|n| *n > 0.0),
        "every balancer carries flows: {per_balancer:?}"
    );
    assert!(
        per_balancer.iter().sum::<f64>() >= 300.0,
        "{per_balancer:?}"
    );
    // 3. The same rings everywhere; a weight changed on one agent alone shows.
    let (code, out, err) = fleet.fleet_check(&[0, 1, 2]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("web") && out.contains("equal"), "{out}");
    let prints: BTreeSet<String> = fleet
        .balancers
        .iter()
        .map(|b| {
            let print = b.weir_service_list();
            let info = b.metric(
                "weir_service_ring_fingerprint_info",
                &[("service", "web"), ("fingerprint", &print)],
            );
            assert_eq!(info, 1.0);
            print
        })
        .collect();
    assert_eq!(prints.len(), 1, "{prints:?}");
    let s0 = fleet.balancers[0].socket().to_owned();
    let backend2 = backend_v4(1).to_string();
    let (code, out, err) =
        fleet.weir(&["backend", "weight", "web", &backend2, "3", "--socket", &s0]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = fleet.fleet_check(&[0, 1, 2]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("DIFFERS"), "{out}");
    assert!(err.contains("the rings of web differ"), "{err}");
    let (code, out, err) =
        fleet.weir(&["backend", "weight", "web", &backend2, "1", "--socket", &s0]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = fleet.fleet_check(&[0, 1, 2]);
    assert_eq!(code, 0, "{out}{err}");

    // 4. Balancer 1 loses every backend (its checks fail, the others' do not): it
    // withdraws within one fall plus the BGP update, and comes back.
    let t = Instant::now();
    fleet.block_checks_of(0, true);
    fleet.wait_next_hops(&[1, 2], Duration::from_secs(10));
    let withdraw = t.elapsed();
    let bound = CHECK_INTERVAL * FALL + CHECK_TIMEOUT + Duration::from_millis(1500);
    assert!(
        withdraw < bound,
        "withdrawn after {withdraw:?}, bound {bound:?}"
    );
    let announce = fleet.balancers[0].announce();
    assert!(
        announce
            .vips
            .iter()
            .all(|v| !v.announced && v.reason == "no-backend"),
        "{announce:?}"
    );
    assert_eq!(
        fleet.balancers[0].metric("weir_vip_announced", &[("vip", "203.0.113.10")]),
        0.0
    );
    let t = Instant::now();
    fleet.block_checks_of(0, false);
    fleet.wait_next_hops(&[0, 1, 2], Duration::from_secs(10));
    let reannounce = t.elapsed();
    // The VIP comes back with the first healthy backend; the others follow within their own
    // `rise`. Until they have, balancer 1's ring is not the others', and a flow it places
    // meanwhile may reach another backend once ECMP moves it (README, "what breaks it"):
    // the long-lived connections below start once the rings agree again.
    wait_until(
        "every backend up at every balancer",
        Duration::from_secs(10),
        || {
            fleet
                .balancers
                .iter()
                .all(|b| b.status().backends_up == 3)
                .then_some(())
        },
    );
    let (code, out, err) = fleet.fleet_check(&[0, 1, 2]);
    assert_eq!(code, 0, "{out}{err}");
    figures.push(format!(
        "health: withdrawn {withdraw:?} after the backends failed (fall {FALL} x {CHECK_INTERVAL:?}, \
         timeout {CHECK_TIMEOUT:?}), re-announced {reannounce:?} after they came back (rise {RISE})"
    ));

    // 5. 100 long-lived connections; balancer 3 dies with its BIRD and its link.
    let before: Vec<f64> = fleet.balancers.iter().map(Balancer::new_flows).collect();
    let mut conns: Vec<Conn> = (30_000..30_100)
        .map(|sport| {
            let (stream, backend) =
                id_tcp_connect(&fleet.net.cli, vip(), sport, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("connect from {sport}: {e:#}"));
            Conn {
                sport,
                stream,
                backend,
            }
        })
        .collect();
    assert_eq!(echo_all(&mut conns, 1, Duration::from_secs(3)), []);
    // Each on the backend the common ring gives it, whichever balancer placed it: the
    // condition for surviving a move.
    let expected = predict::maglev_backends(&web_service(), &[1, 1, 1], client, 30_000..30_100);
    for (c, want) in conns.iter().zip(&expected) {
        assert_eq!(
            usize::from(c.backend),
            *want,
            "connection from port {}",
            c.sport
        );
    }
    let on: Vec<f64> = fleet
        .balancers
        .iter()
        .zip(&before)
        .map(|(b, before)| b.new_flows() - before)
        .collect();
    assert_eq!(on.iter().sum::<f64>(), 100.0, "{on:?}");
    let on_dead = on[2];
    assert!(on_dead > 0.0, "no connection on balancer 3: {on:?}");
    // The link first: a machine that dies sends no FIN for its BGP session, so the router
    // has only the hold time to go by.
    let t = Instant::now();
    fleet.net.cut_balancer(2).expect("cut the link");
    {
        let dead = &mut fleet.balancers[2];
        dead.agent.as_mut().expect("agent 3").kill();
        dead.bird.as_mut().expect("bird 3").child.kill();
    }
    // Traffic right away, while the router still sends a third of it into the void.
    let echoes = thread::scope(|s| {
        let echo = s.spawn(|| echo_all(&mut conns, 2, Duration::from_secs(20)));
        let noticed = fleet.wait_next_hops(&[0, 1], HOLD + Duration::from_secs(5));
        (noticed, echo.join().expect("echo thread"))
    });
    let (noticed, lost) = echoes;
    let recovered = t.elapsed();
    assert_eq!(lost, [], "connections lost when balancer 3 died");
    assert!(
        noticed > HOLD - Duration::from_secs(2) && noticed <= HOLD + Duration::from_secs(2),
        "the router dropped balancer 3 after {noticed:?}, hold time {HOLD:?}"
    );
    assert_eq!(echo_all(&mut conns, 3, Duration::from_secs(3)), []);
    let backends_kept = conns.iter().all(|c| c.backend < 3);
    assert!(backends_kept);
    figures.push(format!(
        "SIGKILL of balancer 3 + BIRD + link: router dropped it after {noticed:?} (hold time \
         {HOLD:?}); 100 of 100 connections kept (per balancer {on:?}: the {on_dead} on balancer 3 \
         moved), all echoed within {recovered:?} of the cut, 0 lost"
    ));

    // 6. Drain balancer 2 with `weir announce withdraw`: its flows move to balancer 1,
    // new connections keep succeeding throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let churner = churn(
        fleet.net.cli.clone(),
        40_000..41_000,
        Arc::clone(&stop),
        Arc::clone(&opened),
    );
    thread::sleep(Duration::from_millis(500));
    let s1 = fleet.balancers[1].socket().to_owned();
    let t = Instant::now();
    let (code, out, err) = fleet.weir(&["announce", "withdraw", "--socket", &s1]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("WITHDRAWN"), "{out}");
    fleet.wait_next_hops(&[0], Duration::from_secs(5));
    let drained = t.elapsed();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(echo_all(&mut conns, 4, Duration::from_secs(5)), []);
    let (code, out, err) = fleet.weir(&["status", "--socket", &s1]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("WITHDRAWN by the operator"), "{out}");
    assert_eq!(
        fleet.balancers[1].metric("weir_announce_withdrawn", &[]),
        1.0
    );
    // And back.
    let t = Instant::now();
    let (code, out, err) = fleet.weir(&["announce", "resume", "--socket", &s1]);
    assert_eq!(code, 0, "{out}{err}");
    fleet.wait_next_hops(&[0, 1], Duration::from_secs(5));
    let resumed = t.elapsed();
    thread::sleep(Duration::from_millis(300));
    // Both commands and the route changes they made are in the balancer's audit log.
    let audit = fs::read_to_string(&fleet.balancers[1].audit).expect("audit log");
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect();
    let what = |w: &str| lines.iter().filter(|l| l["what"] == w).collect::<Vec<_>>();
    assert_eq!(what("announce_withdraw").len(), 1, "{audit}");
    assert_eq!(what("announce_resume").len(), 1, "{audit}");
    let vip = VIP_V4.to_string();
    let routes: Vec<bool> = what("announcement")
        .iter()
        .filter(|l| l["target"] == vip.as_str())
        .map(|l| l["after"]["announced"].as_bool().expect("announced"))
        .collect();
    assert!(
        routes.ends_with(&[false, true]),
        "the withdrawal and the return of the VIP's route: {routes:?}\n{audit}"
    );
    // SIGTERM withdraws before the agent exits.
    let t = Instant::now();
    let status = fleet.balancers[1]
        .agent
        .as_mut()
        .expect("agent 2")
        .stop()
        .expect("exit status");
    assert!(status.success(), "{status}");
    fleet.wait_next_hops(&[0], Duration::from_secs(5));
    let stopped = t.elapsed();
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let failures = churner.join().expect("churn thread");
    let opened = opened.load(Ordering::SeqCst);
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "of {opened} new connections"
    );
    assert!(
        opened > 50,
        "only {opened} new connections during the drain"
    );
    assert_eq!(echo_all(&mut conns, 5, Duration::from_secs(5)), []);
    figures.push(format!(
        "weir announce withdraw: route gone {drained:?} after the command, resume back in \
         {resumed:?}, SIGTERM gone in {stopped:?}; {opened} new connections during it, 0 \
         failed; 100 of 100 long-lived connections kept"
    ));

    drop(conns);
    eprintln!("FIGURES (test took {:?}):", started.elapsed());
    for f in &figures {
        eprintln!("  {f}");
    }
    drop(fleet);
}

impl Balancer {
    /// The fingerprint of service web in `weir service list -o json`.
    fn weir_service_list(&self) -> String {
        let (code, out, err) = run_status(&[
            weir_bin(),
            "service",
            "list",
            "-o",
            "json",
            "--socket",
            self.socket(),
        ])
        .expect("weir service list");
        assert_eq!(code, 0, "{err}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
        let print = list[0]["fingerprint"].as_str().expect("a fingerprint");
        assert_eq!(print.len(), 16, "{out}");
        print.to_owned()
    }
}
