//! Privileged end-to-end tests of `forwarding = "nat"` (destination NAT, issue 12): the
//! backends are ordinary hosts (an address and a default route via the balancer: no VIP, no
//! decap, default sysctls) listening on another port than the VIP's (`backend.port`), in the
//! test bed's NAT layout (`Layout::Nat`: the client on a subnet of its own, so every answer
//! crosses the balancer on its way back). Real traffic at 1500-byte MTUs: Debian's nginx
//! answering HTTP and logging the client's own address, concurrent 4 MiB uploads stored
//! intact and downloads received intact, 900 TCP connections and 900 UDP flows per family
//! spread as the Maglev ring predicts, UDP answered from VIP:port, a connection across an
//! agent SIGKILL and restart, drain and a failed health check, and the NAT counters against
//! the packets sent.
//!
//! `forwarding = "fullnat"` (destination and source NAT) runs in `Layout::Fullnat`: the
//! backends share a subnet with the balancer and have no route via it at all; nginx answers
//! HTTP through a fullnat VIP and logs the SNAT address, and concurrent 4 MiB uploads arrive
//! intact. A range of 64 SNAT ports under 500 connections refuses the rest cleanly (counted,
//! gauged, never a reused tuple) and recovers as RSTs free ports; `weir teardown` removes
//! exactly the ports the agent reserved.
//!
//! A control test runs the same servers with the balancer's kernel routing instead of the
//! agent: when it passes and a NAT test fails, the fault is the balancer's, not the
//! harness's. Each test builds its own topology (`common`, namespaces `w<pid><tag>-*`) and
//! checks that the root namespace's `ip_local_reserved_ports` is unchanged. Needs root;
//! skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_nat -- --test-threads=1 --nocapture`

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use common::{
    BACKENDS, Backend, CLIENT_ARM_IF, ChildGuard, ConfigBuilder, EchoServers, HealthCheck,
    IdServer, LB_CLIENT_SIDE_V4, LB_CLIENT_SIDE_V6, LB_V4, LB_V6, Layout, NODE_IF, ServiceBuilder,
    Topology, VIP_V4, VIP_V6, backend_v4, backend_v6, predict,
    tunnel::{link_mtu, payload},
    upload::{UploadServers, sha256, upload_all},
};
use weir::api::{BackendInfo, Health, Request, Stats, Status};

/// The MTU of every link: a real LAN's, never raised to hide a problem.
const LAN_MTU: &str = "1500";
/// The VIPs' ports and the backends' (different, so that a reply from the wrong port or a
/// packet whose port was not rewritten cannot pass for a translated one).
const HTTP_PORT: u16 = 80;
const HTTP_BACKEND_PORT: u16 = 8080;
const UDP_PORT: u16 = 53;
const UDP_BACKEND_PORT: u16 = 5353;
/// The health checks' port in the drain test: not the traffic's, so that taking a backend's
/// check down leaves its connections alone.
const HEALTH_PORT: u16 = 9000;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

impl Family {
    fn vip(self) -> IpAddr {
        match self {
            Self::V4 => VIP_V4.into(),
            Self::V6 => VIP_V6.into(),
        }
    }

    fn backend(self, i: usize) -> IpAddr {
        match self {
            Self::V4 => backend_v4(i).into(),
            Self::V6 => backend_v6(i).into(),
        }
    }

    /// The client's address in the NAT layout: what the backends must see.
    fn client(self, topo: &Topology) -> IpAddr {
        match self {
            Self::V4 => topo.client_v4().into(),
            Self::V6 => topo.client_v6().into(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }
}

/// The HTTP service of each family (`web-v4`, `web-v6`) on the VIP's port 80, backends on
/// `HTTP_BACKEND_PORT`, scheduled by `scheduler`.
fn web_services(scheduler: &str) -> [ServiceBuilder; 2] {
    FAMILIES.map(|f| {
        nat_service(
            &format!("web-{}", f.name()),
            f,
            HTTP_PORT,
            "tcp",
            HTTP_BACKEND_PORT,
            scheduler,
        )
    })
}

/// A `nat` service on `family`'s VIP over the three backends, each listening on
/// `backend_port`.
fn nat_service(
    name: &str,
    family: Family,
    port: u16,
    protocol: &str,
    backend_port: u16,
    scheduler: &str,
) -> ServiceBuilder {
    (0..BACKENDS).fold(
        ServiceBuilder::new(name, family.vip(), port, protocol)
            .scheduler(scheduler)
            .forwarding("nat"),
        |s, i| s.backend(Backend::new(family.backend(i)).port(backend_port)),
    )
}

fn agent_config(topo: &Topology, services: &[ServiceBuilder]) -> ConfigBuilder {
    services
        .iter()
        .cloned()
        .fold(topo.agent_config(), ConfigBuilder::service)
}

/// Starts the agent with a NAT config, saying plainly when the agent refused it.
fn start_nat_agent(topo: &Topology, config_path: &std::path::Path) -> ChildGuard {
    topo.start_agent_file(config_path).unwrap_or_else(|e| {
        panic!(
            "the agent did not start with `forwarding = \"nat\"` and `backend.port` in its \
             config (this build does not support them?): {e:#}"
        )
    })
}

/// The NAT topology, with what every test checks first: 1500-byte links and, for the end,
/// the root namespace's `ip_local_reserved_ports`.
struct Bed {
    topo: Topology,
    reserved_ports: String,
}

fn root_reserved_ports() -> String {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .expect("read the root namespace's ip_local_reserved_ports")
}

impl Bed {
    /// None without root (the test is skipped).
    fn build(tag: &str) -> Option<Self> {
        Self::build_layout(tag, false)
    }

    /// As `build`, in the fullnat layout: backends without any route via the balancer.
    fn build_fullnat(tag: &str) -> Option<Self> {
        Self::build_layout(tag, true)
    }

    /// As `build` (`Layout::Nat`) or `build_fullnat` (`Layout::Fullnat`), two-arm: the
    /// client on the balancer's second interface.
    fn build_two_arm(tag: &str, layout: Layout) -> Option<Self> {
        if !common::require_root() {
            return None;
        }
        let topo = Topology::build_two_arm(tag, layout).expect("two-arm topology");
        Some(Self::checked(topo))
    }

    fn build_layout(tag: &str, fullnat: bool) -> Option<Self> {
        if !common::require_root() {
            return None;
        }
        let topo = if fullnat {
            Topology::build_fullnat(tag).expect("fullnat topology")
        } else {
            Topology::build_nat(tag).expect("NAT topology")
        };
        Some(Self::checked(topo))
    }

    /// The bed over `topo`, once its links are checked to be 1500 bytes.
    fn checked(topo: Topology) -> Self {
        let reserved_ports = root_reserved_ports();
        for ns in topo.names().iter().filter(|n| **n != topo.sw) {
            assert_eq!(
                link_mtu(ns),
                LAN_MTU,
                "{ns}: these tests are about 1500-byte MTUs"
            );
        }
        Self {
            topo,
            reserved_ports,
        }
    }

    /// Asserts the root namespace's reserved ports are what they were before the test.
    fn finish(&self) {
        assert_eq!(
            root_reserved_ports(),
            self.reserved_ports,
            "the root namespace's net.ipv4.ip_local_reserved_ports changed during the test"
        );
    }
}

/// Before the agent runs, nothing answers on the VIP (the balancer's kernel has no route
/// to it and forwards nothing): what answers later is the XDP balancer.
fn assert_vip_silent(topo: &Topology, family: Family, port: u16) {
    let dst = SocketAddr::new(family.vip(), port);
    let answered = common::in_netns(&topo.cli, || {
        TcpStream::connect_timeout(&dst, Duration::from_millis(300)).is_ok()
    });
    assert!(
        !answered,
        "{dst} answered before the agent started: the topology has a path to it"
    );
}

/// Pins the test thread to CPU 0 before anything of a round-robin test starts: the servers,
/// nginx and the agent (its health checks) are started from this thread and inherit its CPU.
/// Round-robin positions are per CPU, and XDP on a veth runs where the receive queue is
/// polled, which is the CPU of whoever sent into it: with every sender on one CPU, every
/// pick is that CPU's, and whole cycles give exact shares.
fn all_on_cpu0() {
    common::pin_thread_to_cpu(0).expect("pin to CPU 0");
}

fn backends_of(topo: &Topology, service: &str) -> Vec<BackendInfo> {
    let resp = topo
        .api(&Request::BackendList {
            service: Some(service.to_owned()),
        })
        .expect("API backend_list");
    assert!(resp.ok, "backend_list: {:?}", resp.error);
    Vec::<BackendInfo>::try_from(resp.data.expect("data")).expect("a backend list")
}

fn stats(topo: &Topology) -> Stats {
    let resp = topo.api(&Request::Stats {}).expect("API stats");
    assert!(resp.ok, "stats: {:?}", resp.error);
    Stats::try_from(resp.data.expect("data")).expect("stats")
}

/// Waits up to `limit` until backend `address` of `service` reports `health`.
fn wait_health(topo: &Topology, service: &str, address: IpAddr, health: Health, limit: Duration) {
    let start = Instant::now();
    loop {
        let list = backends_of(topo, service);
        if list
            .iter()
            .any(|b| b.address == address && b.health == health)
        {
            println!(
                "[{service}] {address} {health:?} after {:?}",
                start.elapsed()
            );
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{service}: {address} not {health:?} within {limit:?}: {list:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/// Debian's nginx in one backend namespace, with its config, pid file, logs and temp paths in
/// a directory of the test's own; not forking (`daemon off`), so that dropping the guard
/// stops it. On port `HTTP_BACKEND_PORT` (both families) it serves `/files/blob`
/// ([`DOWNLOAD_LEN`] bytes, the same on every backend) and answers every other request with
/// the backend's number and the address it sees; it logs each request's peer.
struct Nginx {
    _child: ChildGuard,
    access_log: PathBuf,
}

fn nginx_config(dir: &std::path::Path, number: usize) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         \x20 log_format peer '$remote_addr $remote_port $server_port $request_uri $status';\n\
         \x20 access_log {d}/access.log peer;\n\
         \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 server {{\n    listen {HTTP_BACKEND_PORT};\n    listen [::]:{HTTP_BACKEND_PORT};\n\
         \x20   location /files/ {{\n      root {d};\n    }}\n\
         \x20   location / {{\n      default_type text/plain;\n      \
         return 200 \"b{number} $remote_addr\\n\";\n    }}\n  }}\n}}\n"
    )
}

/// Starts nginx in backend `i` and waits (up to 10 s) until it accepts connections on the
/// backend's own addresses, from inside the backend.
fn start_nginx(topo: &Topology, i: usize) -> Result<Nginx> {
    let dir = topo.workdir.join(format!("nginx-b{}", i + 1));
    fs::create_dir_all(&dir)?;
    fs::create_dir_all(dir.join("files"))?;
    fs::write(dir.join("files/blob"), download_blob())?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, nginx_config(&dir, i + 1))?;
    let startup_log = dir.join("startup.log");
    let mut child = common::spawn_cmd_in_ns(
        &topo.backends[i],
        "/usr/sbin/nginx",
        &[
            "-e",
            startup_log.to_str().context("utf-8 path")?,
            "-c",
            conf.to_str().context("utf-8 path")?,
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let addrs = FAMILIES.map(|f| SocketAddr::new(f.backend(i), HTTP_BACKEND_PORT));
    loop {
        if let Some(st) = child.try_status() {
            bail!(
                "nginx in {} exited ({st}); its log:\n{}\n{}",
                topo.backends[i],
                child.log(),
                fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        let up = common::in_netns(&topo.backends[i], || {
            addrs
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
        });
        if up {
            break;
        }
        if Instant::now() > deadline {
            bail!("nginx in {} does not listen after 10 s", topo.backends[i]);
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(Nginx {
        _child: child,
        access_log: dir.join("access.log"),
    })
}

/// One line of an nginx access log in the `peer` format.
#[derive(Debug)]
struct Logged {
    remote: IpAddr,
    server_port: u16,
    uri: String,
    status: u16,
}

fn access_log(n: &Nginx) -> Vec<Logged> {
    let text = fs::read_to_string(&n.access_log).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [remote, _port, server_port, uri, status] = f[..] else {
                panic!("unexpected access log line {l:?}");
            };
            Logged {
                remote: remote
                    .parse()
                    .unwrap_or_else(|_| panic!("address in {l:?}")),
                server_port: server_port.parse().expect("server port"),
                uri: uri.to_owned(),
                status: status.parse().expect("status"),
            }
        })
        .collect()
}

/// From the client: `n` HTTP/1.0 GETs (one connection each) of `/{tag}/{k}` on `dst`; returns
/// the backend number (1-based) that answered each, checking status 200 and that nginx saw
/// `client` as the peer.
fn http_requests(
    topo: &Topology,
    dst: SocketAddr,
    tag: &str,
    n: usize,
    client: IpAddr,
) -> Vec<usize> {
    (0..n)
        .map(|k| {
            let (status, body) =
                common::http_get(&topo.cli, dst, &format!("/{tag}/{k}"), IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("GET /{tag}/{k} from {dst}: {e:#}"));
            assert_eq!(status, 200, "GET /{tag}/{k} from {dst}: {body}");
            let (who, seen) = body
                .trim_end()
                .split_once(' ')
                .unwrap_or_else(|| panic!("unexpected body {body:?}"));
            assert_eq!(
                seen.parse::<IpAddr>().ok(),
                Some(client),
                "GET /{tag}/{k} from {dst}: nginx saw {seen}, not the client's address"
            );
            who.strip_prefix('b')
                .and_then(|b| b.parse().ok())
                .unwrap_or_else(|| panic!("unexpected body {body:?}"))
        })
        .collect()
}

/// Requests per backend (0-based) from backend numbers (1-based).
fn per_backend(numbers: &[usize]) -> Vec<u64> {
    let mut counts = vec![0u64; BACKENDS];
    for &n in numbers {
        counts[n - 1] += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// The control: the same servers, routed by the kernel
// ---------------------------------------------------------------------------------------------

/// The harness without the balancer: with the LB namespace's kernel forwarding between the
/// client's subnet and the backends' (no agent, no XDP), nginx on every backend answers the
/// client on the backend's own address and logs the client's address, a 4 MiB download
/// arrives intact, an upload server stores 4 MiB uploads intact, a UDP echo answers, and
/// the VIP answers nothing. What the NAT tests add to this is the balancer alone.
#[test]
fn control_servers_answer_when_the_kernel_routes() {
    let Some(bed) = Bed::build("nc") else {
        return;
    };
    let topo = &bed.topo;
    let nginx: Vec<Nginx> = (0..BACKENDS)
        .map(|i| start_nginx(topo, i).expect("nginx"))
        .collect();
    let uploads = UploadServers::start(topo, &[UPLOAD_BACKEND_PORT]).expect("upload servers");
    let echo = EchoServers::start(
        &topo.backends,
        UDP_BACKEND_PORT,
        &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
    )
    .expect("UDP echo servers");
    for family in FAMILIES {
        assert_vip_silent(topo, family, HTTP_PORT);
    }
    // The client reaches the backends' subnet through the balancer's kernel.
    common::sysctl(
        &topo.lb,
        &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
    )
    .expect("forwarding in the LB namespace");
    common::ip(
        &topo.cli,
        &[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            &LB_CLIENT_SIDE_V4.to_string(),
        ],
    )
    .expect("client route");
    common::ip(
        &topo.cli,
        &[
            "-6",
            "route",
            "add",
            "2001:db8::/64",
            "via",
            &LB_CLIENT_SIDE_V6.to_string(),
        ],
    )
    .expect("client route");

    for family in FAMILIES {
        let client = family.client(topo);
        for (i, n) in nginx.iter().enumerate() {
            let dst = SocketAddr::new(family.backend(i), HTTP_BACKEND_PORT);
            let who = http_requests(topo, dst, &format!("ctl-{}", family.name()), 2, client);
            assert_eq!(who, [i + 1, i + 1], "{dst} answered as another backend");
            let logged: Vec<Logged> = access_log(n)
                .into_iter()
                .filter(|l| l.uri.starts_with(&format!("/ctl-{}/", family.name())))
                .collect();
            assert_eq!(logged.len(), 2, "{dst}: access log {logged:?}");
            assert!(
                logged.iter().all(|l| l.remote == client && l.status == 200),
                "{dst}: access log {logged:?}"
            );
        }
        let data: Vec<Vec<u8>> = (0..4).map(|s| payload(UPLOAD_LEN, s)).collect();
        let hashes: Vec<String> = data.iter().map(|d| sha256(d)).collect();
        let names: Vec<String> = (0..4)
            .map(|k| format!("ctl-{}-{k}", family.name()))
            .collect();
        let dst = SocketAddr::new(family.backend(1), UPLOAD_BACKEND_PORT);
        let up = upload_all(
            &topo.cli,
            dst,
            &uploads,
            &names,
            &data,
            &hashes,
            Duration::from_secs(10),
        );
        println!("[control] uploads to {dst}: {up:?}");
        assert!(
            up.problems.is_empty(),
            "uploads to {dst}: {:?}",
            up.problems
        );
        assert_eq!(up.per_backend, [0, 4, 0], "uploads to {dst}");
        let dst = SocketAddr::new(family.backend(0), HTTP_BACKEND_PORT);
        let body = common::in_netns(&topo.cli, || {
            download(dst, "/files/blob", Instant::now() + Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("download from {dst}: {e:#}"));
        assert_eq!(
            sha256(&body),
            sha256(&download_blob()),
            "download from {dst}"
        );
        let echo_dst = SocketAddr::new(family.backend(2), UDP_BACKEND_PORT);
        let r = common::udp_flows(
            &topo.cli,
            echo_dst.ip(),
            echo_dst.port(),
            41_000..41_004,
            "ctl",
        )
        .expect("UDP flows");
        r.assert_all_ok();
    }
    assert_eq!(echo.udp_flow_counts(), [0, 0, 8], "UDP flows per backend");
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// 1. nginx behind a NAT VIP
// ---------------------------------------------------------------------------------------------

const HTTP_REQUESTS: usize = 30;

/// Stock nginx on three backends (port 8080) behind a round-robin `nat` VIP on port 80, both
/// families: every request is answered, each backend gets exactly its share (one CPU sends,
/// so one round-robin walk: 30 requests are 10 whole cycles), and nginx — in its answer and
/// in its access log — saw the client's own address (destination NAT keeps it).
#[test]
fn nginx_behind_a_nat_vip_sees_the_client() {
    let Some(bed) = Bed::build("nx") else {
        return;
    };
    let topo = &bed.topo;
    all_on_cpu0();
    let nginx: Vec<Nginx> = (0..BACKENDS)
        .map(|i| start_nginx(topo, i).expect("nginx"))
        .collect();
    for family in FAMILIES {
        assert_vip_silent(topo, family, HTTP_PORT);
    }
    let services = web_services("round-robin");
    let path = topo
        .write_agent_config(&agent_config(topo, &services))
        .expect("config");
    let _agent = start_nat_agent(topo, &path);
    for (family, service) in FAMILIES.iter().zip(&services) {
        let client = family.client(topo);
        let dst = SocketAddr::new(family.vip(), HTTP_PORT);
        let start = Instant::now();
        let who = http_requests(topo, dst, family.name(), HTTP_REQUESTS, client);
        let counts = per_backend(&who);
        println!(
            "[nginx] {HTTP_REQUESTS} requests to {dst} in {:.2?}: per backend {counts:?}",
            start.elapsed()
        );
        let weights = predict::ring_weights(service);
        assert!(
            predict::round_robin_split_possible(&weights, HTTP_REQUESTS, &counts),
            "{dst}: requests per backend {counts:?}, no split per-CPU round-robin gives (on \
             one CPU: {:?})",
            predict::round_robin_counts(&weights, HTTP_REQUESTS)
        );
        for (i, n) in nginx.iter().enumerate() {
            let logged: Vec<Logged> = access_log(n)
                .into_iter()
                .filter(|l| l.uri.starts_with(&format!("/{}/", family.name())))
                .collect();
            assert_eq!(
                u64::try_from(logged.len()).expect("count"),
                counts[i],
                "backend {}: access log lines for {dst}: {logged:?}",
                i + 1
            );
            for l in &logged {
                assert_eq!(
                    (l.remote, l.server_port, l.status),
                    (client, HTTP_BACKEND_PORT, 200),
                    "backend {}: {l:?}: nginx must see the client's address on its own port",
                    i + 1
                );
            }
        }
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. Uploads
// ---------------------------------------------------------------------------------------------

const UPLOADS: usize = 20;
const UPLOAD_LEN: usize = 4 << 20;
const UPLOAD_DEADLINE: Duration = Duration::from_secs(15);
/// The uploads' VIP port and the upload servers' (the downloads use nginx's).
const UPLOAD_PORT: u16 = 81;
const UPLOAD_BACKEND_PORT: u16 = 8081;
const DOWNLOADS: usize = 20;
const DOWNLOAD_LEN: usize = 4 << 20;

/// What nginx serves as `/files/blob` on every backend.
fn download_blob() -> Vec<u8> {
    payload(DOWNLOAD_LEN, 0xd0)
}

/// From the calling thread's namespace: `GET path` on `dst` (HTTP/1.0), all before
/// `deadline`; the body, checked against the status and `Content-Length`.
fn download(dst: SocketAddr, path: &str, deadline: Instant) -> Result<Vec<u8>> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut s = TcpStream::connect_timeout(&dst, left().min(Duration::from_secs(3)))
        .with_context(|| format!("connect to {dst}"))?;
    s.set_write_timeout(Some(left()))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {dst}\r\n\r\n")?;
    let mut raw = Vec::with_capacity(DOWNLOAD_LEN + 1024);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        ensure!(
            Instant::now() < deadline,
            "the deadline passed after {} bytes",
            raw.len()
        );
        s.set_read_timeout(Some(left()))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context(format!("read after {} bytes", raw.len())),
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    ensure!(head.starts_with("HTTP/1.1 200 "), "answer {head:?}");
    let body = raw.split_off(split + 4);
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .context("no Content-Length")?;
    ensure!(
        length == body.len().to_string(),
        "Content-Length {length}, got {} bytes",
        body.len()
    );
    Ok(body)
}

/// 20 concurrent 4 MiB uploads to a `nat` VIP (port 81 → the backends' 8081), each family:
/// every one stored whole on exactly one backend, sha256 equal to what was sent. Then 20
/// concurrent 4 MiB downloads from nginx through a `nat` VIP (port 80 → 8080), each family:
/// every body's sha256 is the file's. Full-size segments in both directions at 1500-byte
/// MTUs (NAT adds no header); the downloads' data crosses the reply path.
#[test]
fn concurrent_uploads_and_downloads_through_nat_arrive_intact() {
    let Some(bed) = Bed::build("nu") else {
        return;
    };
    let topo = &bed.topo;
    let servers = UploadServers::start(topo, &[UPLOAD_BACKEND_PORT]).expect("upload servers");
    let _nginx: Vec<Nginx> = (0..BACKENDS)
        .map(|i| start_nginx(topo, i).expect("nginx"))
        .collect();
    let services: Vec<ServiceBuilder> = FAMILIES
        .iter()
        .flat_map(|&f| {
            [
                nat_service(
                    &format!("up-{}", f.name()),
                    f,
                    UPLOAD_PORT,
                    "tcp",
                    UPLOAD_BACKEND_PORT,
                    "maglev",
                ),
                nat_service(
                    &format!("dl-{}", f.name()),
                    f,
                    HTTP_PORT,
                    "tcp",
                    HTTP_BACKEND_PORT,
                    "round-robin",
                ),
            ]
        })
        .collect();
    let path = topo
        .write_agent_config(&agent_config(topo, &services))
        .expect("config");
    let _agent = start_nat_agent(topo, &path);
    uploads_then_downloads(topo, &servers, "nu");
    bed.finish();
}

/// 20 concurrent 4 MiB uploads to each family's VIP on `UPLOAD_PORT`, each stored whole on
/// exactly one backend with the sha256 sent (files named after `tag`), then 20 concurrent
/// downloads of the backends' 4 MiB blob from the VIP on `HTTP_PORT`, sha256 checked at the
/// client.
fn uploads_then_downloads(topo: &Topology, servers: &UploadServers, tag: &str) {
    let data: Vec<Vec<u8>> = (0..UPLOADS)
        .map(|i| payload(UPLOAD_LEN, u64::try_from(i).expect("index")))
        .collect();
    let hashes: Vec<String> = data.iter().map(|d| sha256(d)).collect();
    let mut failed = Vec::new();
    for family in FAMILIES {
        let dst = SocketAddr::new(family.vip(), UPLOAD_PORT);
        let names: Vec<String> = (0..UPLOADS)
            .map(|i| format!("{tag}-{}-{i}", family.name()))
            .collect();
        let up = upload_all(
            &topo.cli,
            dst,
            servers,
            &names,
            &data,
            &hashes,
            UPLOAD_DEADLINE,
        );
        let intact: usize = up.per_backend.iter().sum();
        println!(
            "[uploads] {dst}: {intact}/{UPLOADS} stored intact in {:.2?} (per backend {:?})",
            up.took, up.per_backend
        );
        if !up.problems.is_empty() || intact != UPLOADS {
            failed.push(format!("{dst}: {:#?}", up.problems));
        }
    }
    assert!(
        failed.is_empty(),
        "{UPLOADS} concurrent uploads of {UPLOAD_LEN} bytes did not all arrive intact within \
         {UPLOAD_DEADLINE:?}:\n{}",
        failed.join("\n")
    );

    let want = sha256(&download_blob());
    for family in FAMILIES {
        let dst = SocketAddr::new(family.vip(), HTTP_PORT);
        let start = Instant::now();
        let deadline = start + UPLOAD_DEADLINE;
        let cli = topo.cli.as_str();
        let bodies: Vec<Result<Vec<u8>>> = thread::scope(|s| {
            let handles: Vec<_> = (0..DOWNLOADS)
                .map(|_| {
                    s.spawn(move || {
                        common::enter_netns(cli)?;
                        download(dst, "/files/blob", deadline)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("download thread"))
                .collect()
        });
        let took = start.elapsed();
        let problems: Vec<String> = bodies
            .iter()
            .enumerate()
            .filter_map(|(k, b)| match b {
                Err(e) => Some(format!("download {k}: {e:#}")),
                Ok(body) => {
                    let got = sha256(body);
                    (got != want).then(|| {
                        format!(
                            "download {k}: {} bytes, sha256 {got}, file {want}",
                            body.len()
                        )
                    })
                }
            })
            .collect();
        println!(
            "[downloads] {dst}: {}/{DOWNLOADS} intact in {took:.2?}",
            DOWNLOADS - problems.len()
        );
        assert!(
            problems.is_empty(),
            "{DOWNLOADS} concurrent downloads of {DOWNLOAD_LEN} bytes from {dst}:\n{}",
            problems.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 900 TCP connections and 900 UDP flows
// ---------------------------------------------------------------------------------------------

const ECHO_PORT: u16 = 7;
const ECHO_BACKEND_PORT: u16 = 7007;
/// Explicit client source ports: the 5-tuple hash decides the backend, so each backend's
/// count is known in advance.
const TCP_PORTS: std::ops::Range<u16> = 30_000..30_900;
const UDP_PORTS: std::ops::Range<u16> = 40_000..40_900;

/// 900 TCP connections and 900 UDP flows per family through Maglev `nat` VIPs (port 7 → the
/// backends' 7007): every one gets its echo, and each backend gets exactly the flows that
/// lb-common's flow hash and the agent's Maglev ring predict (a NAT service schedules as a
/// DSR one does; only what happens after the pick differs).
#[test]
fn nine_hundred_connections_and_flows_are_all_answered() {
    let Some(bed) = Bed::build("n9") else {
        return;
    };
    let topo = &bed.topo;
    let echo = EchoServers::start(
        &topo.backends,
        ECHO_BACKEND_PORT,
        &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
    )
    .expect("echo servers");
    let services: Vec<(Family, ServiceBuilder, ServiceBuilder)> = FAMILIES
        .iter()
        .map(|&f| {
            let svc = |proto: &str| {
                nat_service(
                    &format!("{proto}-{}", f.name()),
                    f,
                    ECHO_PORT,
                    proto,
                    ECHO_BACKEND_PORT,
                    "maglev",
                )
            };
            (f, svc("tcp"), svc("udp"))
        })
        .collect();
    let all: Vec<ServiceBuilder> = services
        .iter()
        .flat_map(|(_, t, u)| [t.clone(), u.clone()])
        .collect();
    let path = topo
        .write_agent_config(&agent_config(topo, &all))
        .expect("config");
    let _agent = start_nat_agent(topo, &path);
    for (family, tcp_service, udp_service) in &services {
        echo.reset();
        let client = family.client(topo);
        let tcp = topo
            .tcp_flows(family.vip(), ECHO_PORT, TCP_PORTS, "nat")
            .expect("TCP flows");
        let udp = topo
            .udp_flows(family.vip(), ECHO_PORT, UDP_PORTS, "nat")
            .expect("UDP flows");
        println!(
            "[900] {}; {}; per backend TCP {:?}, UDP {:?}",
            tcp.summary(),
            udp.summary(),
            echo.tcp_counts(),
            echo.udp_flow_counts()
        );
        tcp.assert_all_ok();
        udp.assert_all_ok();
        let predicted = |s: &ServiceBuilder, ports| {
            predict::maglev_counts(s, &predict::ring_weights(s), client, ports)
        };
        assert_eq!(
            echo.tcp_counts(),
            predicted(tcp_service, TCP_PORTS),
            "{family:?}: TCP connections per backend differ from the Maglev prediction"
        );
        assert_eq!(
            echo.udp_flow_counts(),
            predicted(udp_service, UDP_PORTS),
            "{family:?}: UDP flows per backend differ from the Maglev prediction"
        );
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. UDP
// ---------------------------------------------------------------------------------------------

const UDP_FLOWS: std::ops::Range<u16> = 41_000..41_090;

/// UDP to a round-robin `nat` VIP (port 53 → the backends' 5353), each family: every flow's
/// datagram is answered by the echo on a backend and the answer reaches the client's
/// connected socket (which takes only datagrams from VIP:53); an unconnected socket sees the
/// answer's source is VIP:53 exactly. The backends saw the client's address and ports, each
/// backend exactly a third of the flows.
#[test]
fn udp_answers_come_back_from_the_vip() {
    let Some(bed) = Bed::build("nd") else {
        return;
    };
    let topo = &bed.topo;
    all_on_cpu0();
    let echo = EchoServers::start(
        &topo.backends,
        UDP_BACKEND_PORT,
        &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
    )
    .expect("UDP echo servers");
    let services = FAMILIES.map(|f| {
        nat_service(
            &format!("dns-{}", f.name()),
            f,
            UDP_PORT,
            "udp",
            UDP_BACKEND_PORT,
            "round-robin",
        )
    });
    for family in FAMILIES {
        assert!(
            !topo
                .udp_probe(family.vip(), UDP_PORT, 40_999, Duration::from_millis(300))
                .expect("probe"),
            "{} answered UDP before the agent started",
            family.vip()
        );
    }
    let path = topo
        .write_agent_config(&agent_config(topo, &services))
        .expect("config");
    let _agent = start_nat_agent(topo, &path);
    for (family, service) in FAMILIES.iter().zip(&services) {
        echo.reset();
        let client = family.client(topo);
        let vip = SocketAddr::new(family.vip(), UDP_PORT);
        let r = topo
            .udp_flows(vip.ip(), UDP_PORT, UDP_FLOWS, "nat")
            .expect("UDP flows");
        println!(
            "[udp] {}; per backend {:?}",
            r.summary(),
            echo.udp_flow_counts()
        );
        r.assert_all_ok();
        let weights = predict::ring_weights(service);
        let counts = echo.udp_flow_counts();
        assert!(
            predict::round_robin_split_possible(&weights, UDP_FLOWS.len(), &counts),
            "{vip}: flows per backend {counts:?}, no split per-CPU round-robin gives (on one \
             CPU: {:?})",
            predict::round_robin_counts(&weights, UDP_FLOWS.len())
        );
        let mut ports = BTreeSet::new();
        for c in &echo.counters {
            for peer in c.udp_peers.lock().expect("peers").iter() {
                assert_eq!(
                    peer.ip().to_canonical(),
                    client,
                    "a backend saw {peer}, not the client's address"
                );
                ports.insert(peer.port());
            }
        }
        assert_eq!(
            ports,
            UDP_FLOWS.collect::<BTreeSet<_>>(),
            "{vip}: the backends must see the client's own source ports"
        );

        // An unconnected socket: the answer's source, as the client receives it.
        let (from, echoed) = common::in_netns(&topo.cli, || -> Result<(SocketAddr, bool)> {
            let any: IpAddr = match family {
                Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
                Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
            };
            let sock = UdpSocket::bind(SocketAddr::new(any, 41_500))?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            sock.send_to(b"where-from", vip)?;
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).context("no answer within 1 s")?;
            Ok((from, &buf[..n] == b"where-from"))
        })
        .expect("unconnected UDP probe");
        assert_eq!(
            from, vip,
            "the answer's source must be the VIP and its port"
        );
        assert!(echoed, "the answer is not the echo of the datagram");
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// 4. SIGKILL and restart; drain and health
// ---------------------------------------------------------------------------------------------

/// `IdServer`s (TCP only: the backends have no VIP to bind UDP to) on `port` in every
/// backend.
fn id_servers(topo: &Topology, port: u16) -> Vec<IdServer> {
    (0..BACKENDS)
        .map(|i| {
            IdServer::start(
                &topo.backends[i],
                u8::try_from(i).expect("index"),
                port,
                &[],
            )
            .expect("id server")
        })
        .collect()
}

/// One connection per family through `nat` VIPs, carried across a SIGKILL of the agent and
/// a restart: data sent before the kill, while no agent runs, and after the new agent
/// adopted the pinned datapath comes back whole and in order (the backend echoes it), and
/// new connections work while no agent runs and after the restart. The pinned NAT table is
/// what keeps them.
#[test]
fn a_connection_survives_agent_sigkill_and_restart() {
    let Some(bed) = Bed::build("nk") else {
        return;
    };
    let topo = &bed.topo;
    let _servers = id_servers(topo, HTTP_BACKEND_PORT);
    let services = web_services("maglev");
    let path = topo
        .write_agent_config(&agent_config(topo, &services))
        .expect("config");
    let mut first = start_nat_agent(topo, &path);
    let mut conns: Vec<(Family, TcpStream, u8)> = FAMILIES
        .iter()
        .zip(46_000..)
        .map(|(&f, src)| {
            let (s, id) = common::id_tcp_connect(
                &topo.cli,
                SocketAddr::new(f.vip(), HTTP_PORT),
                src,
                IO_TIMEOUT,
            )
            .expect("connect through the VIP");
            (f, s, id)
        })
        .collect();
    let chunk = |phase: u64, f: Family| payload(32 << 10, phase * 2 + u64::from(f == Family::V6));
    let echo_all = |conns: &mut Vec<(Family, TcpStream, u8)>, phase: u64, when: &str| {
        for (f, s, id) in conns.iter_mut() {
            common::id_tcp_echo(s, &chunk(phase, *f))
                .unwrap_or_else(|e| panic!("{f:?} connection to backend {id}, {when}: {e:#}"));
        }
    };
    echo_all(&mut conns, 0, "before the SIGKILL");
    let st = first.kill();
    println!("[sigkill] agent killed: {st:?}");
    assert!(
        common::xdp_attached(&topo.lb, NODE_IF).expect("ip link"),
        "the balancer must stay attached (pinned) after SIGKILL"
    );
    echo_all(&mut conns, 1, "while no agent runs");
    for f in FAMILIES {
        let (mut s, id) = common::id_tcp_connect(
            &topo.cli,
            SocketAddr::new(f.vip(), HTTP_PORT),
            46_050,
            IO_TIMEOUT,
        )
        .expect("a new connection while no agent runs");
        common::id_tcp_echo(&mut s, b"new without agent")
            .unwrap_or_else(|e| panic!("{f:?}: new connection to backend {id}: {e:#}"));
    }
    let started = Instant::now();
    let _second = start_nat_agent(topo, &path);
    println!(
        "[sigkill] replacement answering after {:?}",
        started.elapsed()
    );
    let resp = topo.api(&Request::Status {}).expect("status");
    let status = Status::try_from(resp.data.expect("data")).expect("status");
    assert!(
        status.adopted,
        "the new agent must adopt the pinned datapath: {status:?}"
    );
    echo_all(&mut conns, 2, "after the restart");
    for f in FAMILIES {
        let (mut s, id) = common::id_tcp_connect(
            &topo.cli,
            SocketAddr::new(f.vip(), HTTP_PORT),
            46_100,
            IO_TIMEOUT,
        )
        .expect("a new connection after the restart");
        common::id_tcp_echo(&mut s, b"new after restart")
            .unwrap_or_else(|e| panic!("{f:?}: new connection to backend {id}: {e:#}"));
    }
    bed.finish();
}

/// A round-robin `nat` service with TCP health checks on their own port. One connection to
/// each backend; then backend 2 drained (`backend_drain`): the next 20 connections go to
/// backends 1 and 3 only (10 each, one CPU's walk), while the connection to backend 2 keeps
/// working. Then backend 3's health check fails: it goes down and the next 10 connections
/// all go to backend 1, while backend 2's connection still works.
#[test]
fn drain_and_a_failed_health_check_take_no_new_connections() {
    let Some(bed) = Bed::build("nh") else {
        return;
    };
    let topo = &bed.topo;
    all_on_cpu0();
    let _servers = id_servers(topo, HTTP_BACKEND_PORT);
    let mut health: Vec<Option<IdServer>> = id_servers(topo, HEALTH_PORT)
        .into_iter()
        .map(Some)
        .collect();
    let service = nat_service(
        "web",
        Family::V4,
        HTTP_PORT,
        "tcp",
        HTTP_BACKEND_PORT,
        "round-robin",
    )
    .health_check(
        HealthCheck::new("tcp")
            .port(HEALTH_PORT)
            .interval(Duration::from_millis(200))
            .timeout(Duration::from_millis(100))
            .rise(1)
            .fall(2),
    );
    let path = topo
        .write_agent_config(&agent_config(topo, std::slice::from_ref(&service)))
        .expect("config");
    let _agent = start_nat_agent(topo, &path);
    for i in 0..BACKENDS {
        wait_health(
            topo,
            "web",
            backend_v4(i).into(),
            Health::Up,
            Duration::from_secs(5),
        );
    }
    let vip = SocketAddr::new(VIP_V4.into(), HTTP_PORT);
    let mut conns: Vec<(TcpStream, u8)> = (47_000..47_003)
        .map(|src| common::id_tcp_connect(&topo.cli, vip, src, IO_TIMEOUT).expect("connect"))
        .collect();
    let ids: HashSet<u8> = conns.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        ids.len(),
        BACKENDS,
        "one round-robin cycle reaches every backend: {ids:?}"
    );
    let drained = conns
        .iter()
        .position(|(_, id)| *id == 1)
        .expect("a connection to backend 2");

    let resp = topo
        .api(&Request::BackendDrain {
            service: "web".into(),
            address: backend_v4(1).into(),
        })
        .expect("API backend_drain");
    assert!(resp.ok, "backend_drain: {:?}", resp.error);
    let r = common::id_tcp_flows(&topo.cli, vip, 47_100..47_120);
    r.assert_all_ok();
    println!(
        "[drain] backend 2 drained: new connections per backend {:?}",
        r.counts(BACKENDS)
    );
    assert!(
        predict::round_robin_split_possible(&[1, 0, 1], 20, &r.counts(BACKENDS)),
        "new connections while backend 2 drains: {:?}, no split per-CPU round-robin gives \
         (on one CPU: {:?})",
        r.counts(BACKENDS),
        predict::round_robin_counts(&[1, 0, 1], 20)
    );
    common::id_tcp_echo(&mut conns[drained].0, b"still here while draining")
        .expect("the drained backend's established connection");

    // Backend 3's check fails from now on: its health server stops.
    drop(health[2].take());
    wait_health(
        topo,
        "web",
        backend_v4(2).into(),
        Health::Down,
        Duration::from_secs(5),
    );
    let r = common::id_tcp_flows(&topo.cli, vip, 47_200..47_210);
    r.assert_all_ok();
    println!(
        "[health] backend 3 down: new connections per backend {:?}",
        r.counts(BACKENDS)
    );
    assert_eq!(
        r.counts(BACKENDS),
        [10, 0, 0],
        "new connections with backend 3 down"
    );
    common::id_tcp_echo(&mut conns[drained].0, b"still here with backend 3 down")
        .expect("the drained backend's established connection");
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// 5. Counters
// ---------------------------------------------------------------------------------------------

const COUNTED_FLOWS: u16 = 30;
const DATAGRAMS_PER_FLOW: u64 = 3;
const DATAGRAM_LEN: usize = 100;

/// A global counter by name, failing with the NAT counters this build has when the name is
/// not among them.
fn nat_counter(stats: &Stats, name: &str) -> u64 {
    stats
        .global
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| {
            let nat: Vec<&str> = lb_common::stat::NAMES
                .iter()
                .copied()
                .filter(|n| n.contains("nat"))
                .collect();
            panic!("no global counter {name}; the NAT counters of this build: {nat:?}")
        })
}

/// Exactly counted UDP through a round-robin `nat` VIP: 30 flows of 3 datagrams, each
/// answered. The datapath counts exactly that: `nat_pairs_created` one per flow, `nat_reply`
/// one per answer, `nat_forward` one per datagram, nothing handed to the kernel; the
/// service's and each backend's traffic rows both directions (every packet crosses the
/// balancer), with the frames' bytes and one new flow per flow; and no NAT drop.
#[test]
fn nat_counters_match_the_packets_sent() {
    let Some(bed) = Bed::build("nn") else {
        return;
    };
    let topo = &bed.topo;
    all_on_cpu0();
    let nat_names: Vec<&str> = lb_common::stat::NAMES
        .iter()
        .copied()
        .filter(|n| n.starts_with("nat_"))
        .collect();
    let _echo = EchoServers::start(
        &topo.backends,
        UDP_BACKEND_PORT,
        &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
    )
    .expect("UDP echo servers");
    let service = nat_service(
        "dns",
        Family::V4,
        UDP_PORT,
        "udp",
        UDP_BACKEND_PORT,
        "round-robin",
    );
    let path = topo
        .write_agent_config(&agent_config(topo, std::slice::from_ref(&service)))
        .expect("config");
    let _agent = start_nat_agent(topo, &path);
    assert!(
        !nat_names.is_empty(),
        "lb_common::stat::NAMES has no nat_* counter: {:?}",
        lb_common::stat::NAMES
    );
    let before = stats(topo);
    let vip = SocketAddr::new(VIP_V4.into(), UDP_PORT);
    common::in_netns(&topo.cli, || {
        for src in 42_000..42_000 + COUNTED_FLOWS {
            let sock =
                UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), src)).expect("bind");
            sock.connect(vip).expect("connect");
            sock.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            for k in 0..DATAGRAMS_PER_FLOW {
                let mut msg = payload(DATAGRAM_LEN, u64::from(src) * 8 + k);
                msg[0] = b'c';
                sock.send(&msg).expect("send");
                let mut buf = [0u8; 256];
                let n = sock
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("flow {src}, datagram {k}: no answer: {e}"));
                assert_eq!(
                    &buf[..n],
                    &msg[..],
                    "flow {src}, datagram {k}: not the echo"
                );
            }
        }
    });
    let after = stats(topo);
    let delta = |name: &str| nat_counter(&after, name) - nat_counter(&before, name);
    let flows = u64::from(COUNTED_FLOWS);
    let sent = flows * DATAGRAMS_PER_FLOW;
    let global: Vec<(String, u64)> = after
        .global
        .iter()
        .filter(|(n, _)| n.contains("nat"))
        .map(|(n, v)| (n.clone(), v - nat_counter(&before, n)))
        .collect();
    println!(
        "[counters] {sent} datagrams in {flows} flows, each answered; NAT counters: {global:?}"
    );
    assert_eq!(delta("nat_pairs_created"), flows, "nat_pairs_created");
    assert_eq!(delta("nat_reply"), sent, "nat_reply: one per answer");
    assert_eq!(delta("nat_forward"), sent, "nat_forward: one per datagram");
    // The balancer resolved the client's neighbour itself (primed): no answer went through
    // the kernel's forwarding, which would count there instead of in nat_reply.
    assert_eq!(delta("nat_to_kernel"), 0, "nat_to_kernel");
    for (name, d) in &global {
        assert!(
            !name.starts_with("drop_") || *d == 0,
            "{name} +{d} while every datagram was answered"
        );
    }

    // Both directions cross the balancer: two frames per datagram, of equal size (an echo).
    let frame = u64::try_from(14 + 20 + 8 + DATAGRAM_LEN).expect("frame length");
    let traffic = |rows: &[weir::api::TrafficStats], backend: Option<IpAddr>| {
        rows.iter()
            .find(|r| r.service == "dns" && r.backend == backend)
            .map(|r| (r.packets, r.bytes, r.new_flows))
            .unwrap_or((0, 0, 0))
    };
    let diff = |a: (u64, u64, u64), b: (u64, u64, u64)| (a.0 - b.0, a.1 - b.1, a.2 - b.2);
    let per_flow =
        predict::round_robin_counts(&predict::ring_weights(&service), usize::from(COUNTED_FLOWS));
    assert_eq!(
        diff(
            traffic(&after.services, None),
            traffic(&before.services, None)
        ),
        (2 * sent, 2 * sent * frame, flows),
        "service dns: (packets, bytes, new flows)"
    );
    for (i, f) in per_flow.iter().enumerate() {
        let b = Some(IpAddr::from(backend_v4(i)));
        let p = 2 * f * DATAGRAMS_PER_FLOW;
        assert_eq!(
            diff(traffic(&after.backends, b), traffic(&before.backends, b)),
            (p, p * frame, *f),
            "backend {}: (packets, bytes, new flows)",
            i + 1
        );
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// 6. `weir conn` and the NAT table gauges
// ---------------------------------------------------------------------------------------------

/// Connections the `weir conn` test opens (two per backend under round robin).
const CONN_COUNT: u16 = 6;
const CONN_PORTS: u16 = 47_000;
/// The test's NAT table size: the capacity gauge must show twice as many entries.
const CONN_TABLE: u32 = 4096;

/// `weir ARGS... --socket SOCKET`: (exit code, stdout, stderr).
fn weir_cli(topo: &Topology, args: &[&str]) -> (i32, String, String) {
    let socket = topo.api_socket();
    let mut v = vec![common::weir_bin()];
    v.extend_from_slice(args);
    v.push("--socket");
    v.push(socket.to_str().expect("utf-8 socket path"));
    let (code, out, err) = common::run_status(&v).expect("run weir");
    println!("$ weir {} -> {code}\n{out}{err}", args.join(" "));
    (code, out, err)
}

fn conn_list(topo: &Topology, args: &[&str]) -> weir::api::ConnList {
    let (code, out, err) = weir_cli(topo, &[&["conn", "list", "-o", "json"], args].concat());
    assert_eq!(code, 0, "weir conn list {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("weir conn list -o json: {e}: {out}"))
}

/// Waits (the agent's table walk runs every 5 s) until the metrics show `want`: each
/// backend's `weir_nat_connections` and the table's entries; returns the last scrape.
fn wait_nat_gauges(topo: &Topology, want: &[(IpAddr, f64)], entries: f64) -> Vec<common::Sample> {
    let start = Instant::now();
    loop {
        let samples = topo.metrics().expect("metrics");
        let got: Vec<Option<f64>> = want
            .iter()
            .map(|(b, _)| {
                common::metric(
                    &samples,
                    "weir_nat_connections",
                    &[("service", "web"), ("backend", &b.to_string())],
                )
            })
            .collect();
        let table = common::metric(&samples, "weir_nat_table_entries", &[]);
        if got.iter().zip(want).all(|(g, (_, w))| *g == Some(*w)) && table == Some(entries) {
            return samples;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "NAT gauges {got:?} (entries {table:?}) not {want:?} (entries {entries}) within 15 s"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// Six TCP connections through a round-robin `nat` VIP (two per backend): `weir conn list
/// -o json` lists exactly them, each with the backend that answered it, and its filters
/// narrow the list; the metrics show the table's entries and capacity (`nat_connections`)
/// and each backend's connections. `weir conn flush --backend B` without `--yes` flushes
/// nothing and says how many would go; with `--yes` it deletes B's pairs, says how many,
/// and leaves the others working; the gauges follow. A flushed connection's next segment
/// finds no pair: the scheduler picks it up as a new connection (`untracked_midflow`, a pair
/// marked picked up), as the design says.
#[test]
fn conn_list_and_flush_show_and_delete_the_nat_pairs() {
    let Some(bed) = Bed::build("nc") else {
        return;
    };
    let topo = &bed.topo;
    all_on_cpu0();
    let _servers = id_servers(topo, HTTP_BACKEND_PORT);
    let service = nat_service(
        "web",
        Family::V4,
        HTTP_PORT,
        "tcp",
        HTTP_BACKEND_PORT,
        "round-robin",
    );
    let config = agent_config(topo, std::slice::from_ref(&service))
        .raw("nat_connections", &CONN_TABLE.to_string());
    let path = topo.write_agent_config(&config).expect("config");
    let _agent = start_nat_agent(topo, &path);
    let vip = SocketAddr::new(VIP_V4.into(), HTTP_PORT);
    let mut conns: Vec<(u16, TcpStream, u8)> = (CONN_PORTS..CONN_PORTS + CONN_COUNT)
        .map(|src| {
            let (mut s, id) =
                common::id_tcp_connect(&topo.cli, vip, src, IO_TIMEOUT).expect("connect");
            common::id_tcp_echo(&mut s, b"hello").expect("echo");
            (src, s, id)
        })
        .collect();
    let backend_of = |id: u8| IpAddr::from(backend_v4(usize::from(id)));
    let client = Family::V4.client(topo);

    // The list: exactly these connections, each to the backend that answered it.
    let list = conn_list(topo, &[]);
    assert_eq!(
        (list.total, list.truncated),
        (u64::from(CONN_COUNT), false),
        "{list:?}"
    );
    let listed: BTreeSet<(u16, SocketAddr)> = list
        .connections
        .iter()
        .map(|c| (c.client.port(), c.backend))
        .collect();
    let expected: BTreeSet<(u16, SocketAddr)> = conns
        .iter()
        .map(|(src, _, id)| (*src, SocketAddr::new(backend_of(*id), HTTP_BACKEND_PORT)))
        .collect();
    assert_eq!(listed, expected, "weir conn list: (client port, backend)");
    for c in &list.connections {
        assert_eq!(c.client.ip(), client, "{c:?}");
        assert_eq!(c.vip, vip, "{c:?}");
        assert_eq!(c.service.as_deref(), Some("web"), "{c:?}");
        assert_eq!(c.state, weir::api::ConnState::Established, "{c:?}");
        assert!(!c.picked_up, "{c:?}");
    }
    let per_backend = |ids: &mut dyn Iterator<Item = u8>| {
        let mut n = [0u64; BACKENDS];
        for id in ids {
            n[usize::from(id)] += 1;
        }
        n
    };
    let counts = per_backend(&mut conns.iter().map(|(_, _, id)| *id));
    assert_eq!(counts, [2, 2, 2], "round robin on one CPU: two each");
    let target = backend_of(0);
    let only = conn_list(topo, &["--backend", &target.to_string()]);
    assert_eq!(only.total, 2, "{only:?}");
    assert!(only.connections.iter().all(|c| c.backend.ip() == target));
    let cut = conn_list(topo, &["--service", "web", "--limit", "4"]);
    assert_eq!(
        (cut.total, cut.truncated, cut.connections.len()),
        (6, true, 4)
    );
    let (code, _, err) = weir_cli(topo, &["conn", "list", "--backend", "198.51.100.99"]);
    assert_eq!(code, 67, "an unknown backend: {err}");

    // The gauges, from the agent's walk.
    let want: Vec<(IpAddr, f64)> = (0..BACKENDS)
        .map(|i| (IpAddr::from(backend_v4(i)), 2.0))
        .collect();
    let samples = wait_nat_gauges(topo, &want, 2.0 * f64::from(CONN_COUNT));
    assert_eq!(
        common::metric(&samples, "weir_nat_table_capacity", &[]),
        Some(2.0 * f64::from(CONN_TABLE)),
        "weir_nat_table_capacity: two entries per nat_connections"
    );
    assert!(
        common::metric(&samples, "weir_nat_reclaimed_total", &[("by", "agent")]).is_some(),
        "weir_nat_reclaimed_total{{by=\"agent\"}} is exported"
    );

    // Flush: refused without a filter, a dry run without --yes, then for real.
    let (code, _, err) = weir_cli(topo, &["conn", "flush", "--yes"]);
    assert_eq!(code, 1, "a flush without a filter: {err}");
    assert!(err.contains("--backend ADDR"), "{err}");
    let (code, _, err) = weir_cli(topo, &["conn", "flush", "--backend", &target.to_string()]);
    assert_eq!(code, 1, "a flush without --yes: {err}");
    assert!(
        err.contains("2 NAT connections of backend") && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(
        conn_list(topo, &[]).total,
        u64::from(CONN_COUNT),
        "nothing flushed"
    );
    let (code, out, err) = weir_cli(
        topo,
        &["conn", "flush", "--backend", &target.to_string(), "--yes"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("flushed 2 NAT connections of backend {target} (4 table entries)\n")
    );
    let left = conn_list(topo, &[]);
    assert_eq!(left.total, u64::from(CONN_COUNT) - 2, "{left:?}");
    assert!(
        left.connections.iter().all(|c| c.backend.ip() != target),
        "{left:?}"
    );
    let mut want = want;
    want[0].1 = 0.0;
    wait_nat_gauges(topo, &want, 2.0 * f64::from(CONN_COUNT - 2));
    // The others still work.
    for (src, s, id) in conns.iter_mut().filter(|(_, _, id)| *id != 0) {
        common::id_tcp_echo(s, b"still here")
            .unwrap_or_else(|e| panic!("connection {src} to backend {id} after the flush: {e:#}"));
    }

    // A flushed connection's next segment goes through the scheduler again.
    let midflow = topo.global_counter("untracked_midflow");
    let (src, s, _) = conns
        .iter_mut()
        .find(|(_, _, id)| *id == 0)
        .expect("a flushed connection");
    let src = *src;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    // Whatever the answer: kept if the pick lands on backend 1 again, reset otherwise.
    let _ = common::id_tcp_echo(s, b"after the flush");
    let picked = conn_list(topo, &[]);
    let again: Vec<&weir::api::ConnInfo> = picked
        .connections
        .iter()
        .filter(|c| c.client.port() == src)
        .collect();
    assert_eq!(
        again.len(),
        1,
        "the flushed connection's next segment: {picked:?}"
    );
    assert!(again[0].picked_up, "a pair made mid-flow: {:?}", again[0]);
    assert!(
        topo.global_counter("untracked_midflow") > midflow,
        "untracked_midflow counts the pick-up"
    );
    bed.finish();
}

/// The round-robin check the tests above use accepts exactly the splits per-CPU positions
/// can give: whole cycles on one CPU, one CPU's extra prefix on top, and nothing skewed.
#[test]
fn round_robin_splits_are_sums_of_per_cpu_prefixes() {
    let even = [1, 1, 1];
    assert!(predict::round_robin_split_possible(
        &even,
        90,
        &[30, 30, 30]
    ));
    if thread::available_parallelism().map_or(1, std::num::NonZero::get) >= 2 {
        assert!(predict::round_robin_split_possible(
            &even,
            90,
            &[31, 30, 29]
        ));
    }
    assert!(!predict::round_robin_split_possible(
        &even,
        90,
        &[40, 30, 20]
    ));
    assert!(!predict::round_robin_split_possible(
        &even,
        90,
        &[30, 30, 29]
    ));
    assert!(!predict::round_robin_split_possible(
        &[1, 0, 1],
        20,
        &[9, 1, 10]
    ));
}

// ---------------------------------------------------------------------------------------------
// fullnat: destination and source NAT
// ---------------------------------------------------------------------------------------------

impl Family {
    /// The balancer's own address on the backends' subnet: the fullnat SNAT address.
    fn snat(self) -> IpAddr {
        match self {
            Self::V4 => LB_V4.into(),
            Self::V6 => LB_V6.into(),
        }
    }
}

/// A `fullnat` service on `family`'s VIP over the three backends, each listening on
/// `backend_port`, translating clients to the balancer's own address.
fn fullnat_service(
    name: &str,
    family: Family,
    port: u16,
    protocol: &str,
    backend_port: u16,
    scheduler: &str,
) -> ServiceBuilder {
    nat_service(name, family, port, protocol, backend_port, scheduler)
        .forwarding("fullnat")
        .raw("snat_addresses", &format!("[\"{}\"]", family.snat()))
}

/// The backends of the fullnat layout know no way to the client: no route but their own
/// subnet's (what makes the replies' return through the balancer fullnat's doing).
fn assert_backends_have_no_route_via_the_balancer(topo: &Topology) {
    for b in &topo.backends {
        for family in ["-4", "-6"] {
            let out = std::process::Command::new("ip")
                .args(["-n", b, family, "route", "show"])
                .output()
                .expect("ip route");
            let routes = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                !routes.contains("default") && !routes.contains("via"),
                "{b}: the fullnat backends must have no route via the balancer: {routes}"
            );
        }
    }
}

/// The balancer namespace's `ip_local_reserved_ports`.
fn lb_reserved_ports(topo: &Topology) -> String {
    common::in_netns(&topo.lb, || {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .expect("read the balancer's ip_local_reserved_ports")
    })
}

/// Stock nginx on three backends that have no route via the balancer, behind a round-robin
/// `fullnat` VIP, both families: every request is answered (the replies come back to the
/// balancer because they are addressed to it), each backend gets its round-robin share, and
/// nginx — in its answer and its access log — saw the SNAT address, never the client's. The
/// default SNAT range lies outside the kernel's ephemeral ports: the balancer's reserved
/// ports are left as they were, and so are the root namespace's.
#[test]
fn nginx_behind_a_fullnat_vip_sees_the_snat_address() {
    let Some(bed) = Bed::build_fullnat("fx") else {
        return;
    };
    let topo = &bed.topo;
    assert_backends_have_no_route_via_the_balancer(topo);
    all_on_cpu0();
    let nginx: Vec<Nginx> = (0..BACKENDS)
        .map(|i| start_nginx(topo, i).expect("nginx"))
        .collect();
    for family in FAMILIES {
        assert_vip_silent(topo, family, HTTP_PORT);
    }
    let services = FAMILIES.map(|f| {
        fullnat_service(
            &format!("web-{}", f.name()),
            f,
            HTTP_PORT,
            "tcp",
            HTTP_BACKEND_PORT,
            "round-robin",
        )
    });
    let lb_reserved = lb_reserved_ports(topo);
    let path = topo
        .write_agent_config(&agent_config(topo, &services))
        .expect("config");
    let _agent = topo
        .start_agent_file(&path)
        .unwrap_or_else(|e| panic!("the agent did not start with a fullnat config: {e:#}"));
    for (family, service) in FAMILIES.iter().zip(&services) {
        let snat = family.snat();
        let dst = SocketAddr::new(family.vip(), HTTP_PORT);
        let start = Instant::now();
        let who = http_requests(topo, dst, family.name(), HTTP_REQUESTS, snat);
        let counts = per_backend(&who);
        println!(
            "[fullnat nginx] {HTTP_REQUESTS} requests to {dst} in {:.2?}: per backend {counts:?}",
            start.elapsed()
        );
        let predicted = predict::round_robin_counts(&predict::ring_weights(service), HTTP_REQUESTS);
        assert_eq!(
            counts, predicted,
            "{dst}: requests per backend (round-robin)"
        );
        for (i, n) in nginx.iter().enumerate() {
            let logged: Vec<Logged> = access_log(n)
                .into_iter()
                .filter(|l| l.uri.starts_with(&format!("/{}/", family.name())))
                .collect();
            assert_eq!(
                u64::try_from(logged.len()).expect("count"),
                counts[i],
                "backend {}: access log lines for {dst}: {logged:?}",
                i + 1
            );
            for l in &logged {
                assert_eq!(
                    (l.remote, l.server_port, l.status),
                    (snat, HTTP_BACKEND_PORT, 200),
                    "backend {}: {l:?}: nginx must see the SNAT address on its own port",
                    i + 1
                );
            }
        }
    }
    let s = stats(topo);
    assert_eq!(
        nat_counter(&s, "drop_snat_exhausted"),
        0,
        "no connection refused for want of a port"
    );
    assert_eq!(
        lb_reserved_ports(topo),
        lb_reserved,
        "the default SNAT range needs no reservation"
    );
    bed.finish();
}

/// 20 concurrent 4 MiB uploads to a `fullnat` VIP (port 81 -> the backends' 8081), each
/// family, with backends that have no route via the balancer: every one stored whole on
/// exactly one backend, sha256 equal to what was sent.
#[test]
fn concurrent_uploads_through_fullnat_arrive_intact() {
    let Some(bed) = Bed::build_fullnat("fu") else {
        return;
    };
    let topo = &bed.topo;
    assert_backends_have_no_route_via_the_balancer(topo);
    let servers = UploadServers::start(topo, &[UPLOAD_BACKEND_PORT]).expect("upload servers");
    let services: Vec<ServiceBuilder> = FAMILIES
        .iter()
        .map(|&f| {
            fullnat_service(
                &format!("up-{}", f.name()),
                f,
                UPLOAD_PORT,
                "tcp",
                UPLOAD_BACKEND_PORT,
                "maglev",
            )
        })
        .collect();
    let path = topo
        .write_agent_config(&agent_config(topo, &services))
        .expect("config");
    let _agent = topo
        .start_agent_file(&path)
        .unwrap_or_else(|e| panic!("the agent did not start with a fullnat config: {e:#}"));
    let data: Vec<Vec<u8>> = (0..UPLOADS)
        .map(|i| payload(UPLOAD_LEN, u64::try_from(i).expect("index")))
        .collect();
    let hashes: Vec<String> = data.iter().map(|d| sha256(d)).collect();
    let mut failed = Vec::new();
    for family in FAMILIES {
        let dst = SocketAddr::new(family.vip(), UPLOAD_PORT);
        let names: Vec<String> = (0..UPLOADS)
            .map(|i| format!("fn-{}-{i}", family.name()))
            .collect();
        let up = upload_all(
            &topo.cli,
            dst,
            &servers,
            &names,
            &data,
            &hashes,
            UPLOAD_DEADLINE,
        );
        let intact: usize = up.per_backend.iter().sum();
        println!(
            "[fullnat uploads] {dst}: {intact}/{UPLOADS} intact in {:.2?} (per backend {:?})",
            up.took, up.per_backend
        );
        if !up.problems.is_empty() || intact != UPLOADS {
            failed.push(format!("{dst}: {:#?}", up.problems));
        }
    }
    assert!(
        failed.is_empty(),
        "{UPLOADS} concurrent uploads of {UPLOAD_LEN} bytes through fullnat did not all arrive \
         intact within {UPLOAD_DEADLINE:?}:\n{}",
        failed.join("\n")
    );
    bed.finish();
}

/// `snat_ports` inside the kernel's ephemeral range of the balancer's namespace: with
/// `reserve_snat_ports = false` the agent refuses to start and says why; by default it adds
/// exactly the overlap to that namespace's `ip_local_reserved_ports` (kept beside an
/// operator's own reservation), records it, and fullnat works on those ports; the root
/// namespace's reserved ports never change.
#[test]
fn fullnat_ports_in_the_ephemeral_range_are_reserved_or_refused() {
    let Some(bed) = Bed::build_fullnat("fr") else {
        return;
    };
    let topo = &bed.topo;
    let range = common::in_netns(&topo.lb, || {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("port range")
    });
    let lo: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("ephemeral low port");
    let (snat_lo, snat_hi) = (lo + 100, lo + 199);
    // An operator's reservation, which must survive.
    common::in_netns(&topo.lb, || {
        fs::write("/proc/sys/net/ipv4/ip_local_reserved_ports", "8080")
            .expect("write the balancer's reserved ports");
    });
    let _nginx: Vec<Nginx> = (0..BACKENDS)
        .map(|i| start_nginx(topo, i).expect("nginx"))
        .collect();
    let services = [fullnat_service(
        "web-v4",
        Family::V4,
        HTTP_PORT,
        "tcp",
        HTTP_BACKEND_PORT,
        "round-robin",
    )];
    let ports = format!("\"{snat_lo}-{snat_hi}\"");
    let refused = agent_config(topo, &services)
        .raw("snat_ports", &ports)
        .raw("reserve_snat_ports", "false");
    let path = topo.write_agent_config(&refused).expect("config");
    let err = topo
        .start_agent_file(&path)
        .err()
        .expect("the agent must refuse snat_ports in the ephemeral range without reserving");
    let text = format!("{err:#}");
    assert!(
        text.contains("reserve_snat_ports = false") && text.contains("ephemeral"),
        "the refusal must say why: {text}"
    );
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        "8080",
        "nothing reserved when refused"
    );

    let reserving = agent_config(topo, &services).raw("snat_ports", &ports);
    let path = topo.write_agent_config(&reserving).expect("config");
    let agent = topo
        .start_agent_file(&path)
        .unwrap_or_else(|e| panic!("the agent did not start reserving its ports: {e:#}"));
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        format!("8080,{snat_lo}-{snat_hi}"),
        "the overlap added beside the operator's reservation"
    );
    let record = fs::read_to_string(topo.workdir.join("reserved-ports.json")).expect("record");
    assert!(
        record.contains(&snat_lo.to_string()) && record.contains(&snat_hi.to_string()),
        "the record names the added range: {record}"
    );
    let dst = SocketAddr::new(Family::V4.vip(), HTTP_PORT);
    let who = http_requests(topo, dst, "v4", 6, Family::V4.snat());
    assert_eq!(who.len(), 6);
    drop(agent);
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Two-arm: the client on one interface of the balancer, the backends on another
// ---------------------------------------------------------------------------------------------

/// Two-arm `nat` or `fullnat` (`layout`): the agent attaches to both interfaces
/// (`interfaces = ["eth0", "eth1"]`), the client reaches the balancer only on `eth1`, the
/// backends only on `eth0`, so every packet crosses from one arm to the other by an XDP
/// redirect. Stock nginx answers every request with the address it must see (the client's
/// for nat, the SNAT address for fullnat), 20 concurrent 4 MiB uploads and downloads per
/// family arrive intact, and `weir status` names both interfaces.
fn two_arm(layout: Layout, tag: &str) {
    let Some(bed) = Bed::build_two_arm(tag, layout) else {
        return;
    };
    let topo = &bed.topo;
    let fullnat = layout == Layout::Fullnat;
    if fullnat {
        assert_backends_have_no_route_via_the_balancer(topo);
    }
    all_on_cpu0();
    let servers = UploadServers::start(topo, &[UPLOAD_BACKEND_PORT]).expect("upload servers");
    let nginx: Vec<Nginx> = (0..BACKENDS)
        .map(|i| start_nginx(topo, i).expect("nginx"))
        .collect();
    let service = |name: &str, f: Family, port, backend_port, scheduler| {
        if fullnat {
            fullnat_service(name, f, port, "tcp", backend_port, scheduler)
        } else {
            nat_service(name, f, port, "tcp", backend_port, scheduler)
        }
    };
    let services: Vec<ServiceBuilder> = FAMILIES
        .iter()
        .flat_map(|&f| {
            [
                service(
                    &format!("web-{}", f.name()),
                    f,
                    HTTP_PORT,
                    HTTP_BACKEND_PORT,
                    "round-robin",
                ),
                service(
                    &format!("up-{}", f.name()),
                    f,
                    UPLOAD_PORT,
                    UPLOAD_BACKEND_PORT,
                    "maglev",
                ),
            ]
        })
        .collect();
    let config = agent_config(topo, &services).interfaces(&[NODE_IF, CLIENT_ARM_IF]);
    let path = topo.write_agent_config(&config).expect("config");
    let _agent = start_nat_agent(topo, &path);
    assert!(
        common::xdp_attached(&topo.lb, CLIENT_ARM_IF).expect("ip link"),
        "the balancer must be attached to its client arm {CLIENT_ARM_IF} too"
    );
    let resp = topo.api(&Request::Status {}).expect("status");
    let status = Status::try_from(resp.data.expect("data")).expect("status");
    assert_eq!(status.interfaces, [NODE_IF, CLIENT_ARM_IF], "weir status");

    for family in FAMILIES {
        let seen = if fullnat {
            family.snat()
        } else {
            family.client(topo)
        };
        let dst = SocketAddr::new(family.vip(), HTTP_PORT);
        let who = http_requests(topo, dst, family.name(), HTTP_REQUESTS, seen);
        let counts = per_backend(&who);
        println!("[two-arm {tag}] {HTTP_REQUESTS} requests to {dst}: per backend {counts:?}");
        assert_eq!(
            counts.iter().sum::<u64>(),
            u64::try_from(HTTP_REQUESTS).expect("count"),
            "{dst}: every request answered"
        );
        for (i, n) in nginx.iter().enumerate() {
            let logged: Vec<Logged> = access_log(n)
                .into_iter()
                .filter(|l| l.uri.starts_with(&format!("/{}/", family.name())))
                .collect();
            assert_eq!(
                u64::try_from(logged.len()).expect("count"),
                counts[i],
                "backend {}: access log lines for {dst}: {logged:?}",
                i + 1
            );
            for l in &logged {
                assert_eq!(
                    (l.remote, l.server_port, l.status),
                    (seen, HTTP_BACKEND_PORT, 200),
                    "backend {}: {l:?}",
                    i + 1
                );
            }
        }
    }
    uploads_then_downloads(topo, &servers, tag);
    let s = stats(topo);
    let (forward, reply, redirected) = (
        nat_counter(&s, "nat_forward"),
        nat_counter(&s, "nat_reply"),
        nat_counter(&s, "xdp_redirect"),
    );
    println!(
        "[two-arm {tag}] nat_forward {forward} nat_reply {reply} xdp_redirect {redirected} \
         nat_to_kernel {}",
        nat_counter(&s, "nat_to_kernel")
    );
    assert!(
        forward > 0 && reply > 0,
        "both directions translated in XDP"
    );
    // Every translated packet crossed to the other arm: none left by the interface it came
    // in on (the kernel's hand-offs, `nat_to_kernel`, are counted as translated too).
    assert_eq!(
        redirected + nat_counter(&s, "nat_to_kernel"),
        forward + reply,
        "translated packets redirected to the other arm"
    );
    assert_eq!(nat_counter(&s, "drop_redirect"), 0, "no redirect failed");
    bed.finish();
}

#[test]
fn two_arm_nat_carries_requests_uploads_and_downloads() {
    two_arm(Layout::Nat, "n2");
}

#[test]
fn two_arm_fullnat_carries_requests_uploads_and_downloads() {
    two_arm(Layout::Fullnat, "f2");
}

// ---------------------------------------------------------------------------------------------
// fullnat: SNAT port exhaustion and recovery; teardown of the reserved ports
// ---------------------------------------------------------------------------------------------

/// The exhaustion test's SNAT range: 64 ports, above the kernel's ephemeral range (nothing
/// reserved), so one backend endpoint can have exactly 64 connections through the one
/// SNAT address.
const SNAT_LO: u16 = 61_000;
const SNAT_PORTS: u16 = 64;
/// Connections the exhaustion test tries to hold open at once.
const EXHAUST_CONNS: usize = 500;
/// How long the refused ones are given: the SYN and its first retransmission (1 s) are
/// both dropped while the range is full.
const EXHAUST_WAIT: Duration = Duration::from_millis(2_500);
/// Closed by RST, then opened again once their ports are free.
const EXHAUST_RECYCLED: usize = 32;
/// A CLOSE pair's 10 s timeout, one table walk (every 5 s, reclaiming 2 s past the
/// timeout), one round of retries (`RECYCLE_ROUND`) and a second of slack. The datapath's
/// in-line reclaim frees some ports from 10 s on (seen: 13 of 32 at 10.6 s, the last at
/// 15.1 s, when a walk took the rest).
const RECYCLE_DEADLINE: Duration = Duration::from_secs(20);
/// How long each round of new connections waits: their SYN and its retransmission (1 s).
const RECYCLE_ROUND: Duration = Duration::from_millis(1_500);

/// Non-blocking TCP connects to `dst` from namespace `ns`, one per socket, all sent at
/// once (ephemeral source ports).
fn start_connects(ns: &str, dst: SocketAddr, n: usize) -> Vec<socket2::Socket> {
    common::in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(dst),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .expect("socket");
                s.set_nonblocking(true).expect("non-blocking");
                match s.connect(&dst.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => panic!("connect to {dst}: {e}"),
                }
                s
            })
            .collect()
    })
}

/// Waits until `wait` has passed or every socket has connected or failed; returns the
/// connected ones and how many failed with an error (the others are still connecting).
fn settle(sockets: Vec<socket2::Socket>, wait: Duration) -> (Vec<socket2::Socket>, usize) {
    let deadline = Instant::now() + wait;
    let mut pending = sockets;
    let mut connected = Vec::new();
    let mut failed = 0;
    loop {
        let mut still = Vec::new();
        for s in pending {
            match s.take_error() {
                Ok(Some(_)) | Err(_) => failed += 1,
                Ok(None) if s.peer_addr().is_ok() => connected.push(s),
                Ok(None) => still.push(s),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            return (connected, failed);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The backend side of every established connection on `port` in namespace `ns`: the
/// peers (`ss`), i.e. the SNAT address and port of each fullnat connection.
fn established_peers(ns: &str, port: u16) -> Vec<SocketAddr> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss");
    assert!(out.status.success(), "ss in {ns}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().last()?.parse::<SocketAddr>().ok())
        // The server's socket is dual-stack: IPv4 peers show as mapped addresses.
        .map(|peer| SocketAddr::new(peer.ip().to_canonical(), peer.port()))
        .collect()
}

/// The SNAT sources of the service's connections as `weir conn list` shows them; every
/// one must have one.
fn listed_snat_sources(topo: &Topology, service: &str) -> Vec<SocketAddr> {
    conn_list(topo, &["--service", service])
        .connections
        .iter()
        .map(|c| {
            c.snat
                .unwrap_or_else(|| panic!("a fullnat connection without SNAT: {c:?}"))
        })
        .collect()
}

/// Asserts `sources` are distinct SNAT ports of the test's range on the balancer's address.
fn assert_distinct_snat_ports(sources: &[SocketAddr], what: &str) {
    let distinct: HashSet<&SocketAddr> = sources.iter().collect();
    assert_eq!(
        distinct.len(),
        sources.len(),
        "{what}: a backend-side tuple is used twice: {sources:?}"
    );
    for s in sources {
        assert!(
            s.ip() == Family::V4.snat() && (SNAT_LO..SNAT_LO + SNAT_PORTS).contains(&s.port()),
            "{what}: {s} is not a port of {}:{SNAT_LO}+{SNAT_PORTS}",
            Family::V4.snat()
        );
    }
}

/// Waits (a walk every 5 s) until the SNAT gauges of `web` on the balancer's address show
/// `in_use` ports and a use ratio of `ratio`.
fn wait_snat_gauges(topo: &Topology, in_use: f64, ratio: f64) {
    let address = Family::V4.snat().to_string();
    let labels = [("service", "web"), ("address", address.as_str())];
    let start = Instant::now();
    loop {
        let samples = topo.metrics().expect("metrics");
        let got = (
            common::metric(&samples, "weir_snat_ports_in_use", &labels),
            common::metric(&samples, "weir_snat_port_use_ratio", &labels),
        );
        if got == (Some(in_use), Some(ratio)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(12),
            "SNAT gauges (in use, ratio) {got:?}, not ({in_use}, {ratio}) within 12 s"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// The design's §16.5: a `fullnat` service with one backend and an SNAT range of 64 ports,
/// 500 connections held open at once. Exactly 64 connect, each on its own backend-side
/// tuple (the backend's `ss` and `weir conn list` show 64 distinct SNAT ports of the
/// range); the other 436 never connect (their SYNs are dropped, `drop_snat_exhausted`
/// counts at least one per connection, in `weir stats` and `/metrics`), and the gauges
/// say the range is full for that backend (`weir_snat_ports_in_use` 64,
/// `weir_snat_port_use_ratio` 1, `weir status` likewise). Then 32 of them are closed by RST
/// (`SO_LINGER` 0): within their 10 s CLOSE timeout and one walk, 32 new connections get
/// exactly their ports, and no 65th connection ever exists.
#[test]
fn fullnat_snat_exhaustion_refuses_cleanly_and_recovers() {
    let Some(bed) = Bed::build_fullnat("fe") else {
        return;
    };
    let topo = &bed.topo;
    all_on_cpu0();
    let _server = IdServer::start(&topo.backends[0], 0, HTTP_BACKEND_PORT, &[]).expect("id server");
    let service = ServiceBuilder::new("web", VIP_V4, HTTP_PORT, "tcp")
        .forwarding("fullnat")
        .raw("snat_addresses", &format!("[\"{}\"]", Family::V4.snat()))
        .backend(Backend::new(backend_v4(0)).port(HTTP_BACKEND_PORT));
    let config = agent_config(topo, std::slice::from_ref(&service)).raw(
        "snat_ports",
        &format!("\"{SNAT_LO}-{}\"", SNAT_LO + SNAT_PORTS - 1),
    );
    let path = topo.write_agent_config(&config).expect("config");
    let _agent = topo
        .start_agent_file(&path)
        .unwrap_or_else(|e| panic!("the agent did not start with a fullnat config: {e:#}"));
    let lb_reserved = lb_reserved_ports(topo);
    let vip = SocketAddr::new(VIP_V4.into(), HTTP_PORT);
    let exhausted_before = topo.global_counter("drop_snat_exhausted");

    let start = Instant::now();
    let sockets = start_connects(&topo.cli, vip, EXHAUST_CONNS);
    let (mut open, failed) = settle(sockets, EXHAUST_WAIT);
    println!(
        "[snat exhaustion] {EXHAUST_CONNS} connects: {} connected, {failed} failed with an \
         error, the rest still connecting after {:.2?}",
        open.len(),
        start.elapsed()
    );
    assert_eq!(
        open.len(),
        usize::from(SNAT_PORTS),
        "exactly as many connections as SNAT ports for the one backend"
    );
    assert_eq!(
        failed, 0,
        "a refused connection's SYN is dropped, never answered with an error"
    );
    let refused = EXHAUST_CONNS - open.len();
    let exhausted = topo.global_counter("drop_snat_exhausted") - exhausted_before;
    assert!(
        exhausted >= u64::try_from(refused).expect("count"),
        "drop_snat_exhausted counted {exhausted} for {refused} refused connections"
    );
    let peers = established_peers(&topo.backends[0], HTTP_BACKEND_PORT);
    assert_eq!(
        peers.len(),
        usize::from(SNAT_PORTS),
        "backend sockets: {peers:?}"
    );
    assert_distinct_snat_ports(&peers, "the backend's established sockets");
    let mut listed = listed_snat_sources(topo, "web");
    assert_distinct_snat_ports(&listed, "weir conn list");
    listed.sort_unstable();
    let mut seen = peers.clone();
    seen.sort_unstable();
    assert_eq!(listed, seen, "the pairs are the backend's connections");

    wait_snat_gauges(topo, f64::from(SNAT_PORTS), 1.0);
    let samples = topo.metrics().expect("metrics");
    let dropped = common::metric(
        &samples,
        "weir_packets_dropped_total",
        &[("reason", "snat_exhausted")],
    )
    .expect("the drop counter is exported");
    assert!(
        dropped >= refused as f64,
        "/metrics: {dropped} exhaustion drops"
    );
    let resp = topo.api(&Request::Status {}).expect("status");
    let status: Status = resp.data.expect("data").try_into().expect("status");
    let nat = status
        .nat
        .expect("weir status shows the NAT table after a walk");
    assert!(nat.snat_exhausted >= u64::try_from(refused).expect("count"));
    let web = nat
        .snat
        .iter()
        .find(|s| s.service == "web")
        .expect("web's SNAT address in the status");
    assert_eq!(
        (
            web.address,
            web.ports_in_use,
            web.fullest_backend,
            web.port_count
        ),
        (Family::V4.snat(), 64, 64, 64)
    );
    assert!(nat.entries >= 128 && nat.capacity > nat.entries, "{nat:?}");

    // 32 closed by RST: their pairs go to CLOSE, expire after 10 s and free their ports.
    let closed_at = Instant::now();
    for s in open.drain(..EXHAUST_RECYCLED) {
        s.set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
        drop(s);
    }
    let mut reopened: Vec<socket2::Socket> = Vec::new();
    while reopened.len() < EXHAUST_RECYCLED {
        assert!(
            closed_at.elapsed() < RECYCLE_DEADLINE,
            "only {} of {EXHAUST_RECYCLED} new connections within {RECYCLE_DEADLINE:?} of the RSTs",
            reopened.len()
        );
        // Never more than the ports freed: a 65th live connection would be a reused tuple.
        let tries = start_connects(&topo.cli, vip, EXHAUST_RECYCLED - reopened.len());
        let (connected, failed) = settle(tries, RECYCLE_ROUND);
        assert_eq!(
            failed, 0,
            "a refused connection is never answered with an error"
        );
        if !connected.is_empty() {
            println!(
                "[snat exhaustion] {:.2?} after the RSTs: {} more",
                closed_at.elapsed(),
                connected.len()
            );
        }
        reopened.extend(connected);
    }
    println!(
        "[snat exhaustion] {EXHAUST_RECYCLED} new connections {:.2?} after the RSTs",
        closed_at.elapsed()
    );
    let peers = established_peers(&topo.backends[0], HTTP_BACKEND_PORT);
    assert_eq!(
        peers.len(),
        usize::from(SNAT_PORTS),
        "after the recycling: {peers:?}"
    );
    assert_distinct_snat_ports(&peers, "after the recycling");
    assert_distinct_snat_ports(&listed_snat_sources(topo, "web"), "weir conn list again");
    // One more still finds the range full.
    let (extra, failed) = settle(start_connects(&topo.cli, vip, 1), RECYCLE_ROUND);
    assert_eq!(
        (extra.len(), failed),
        (0, 0),
        "a 65th connection while 64 are open"
    );
    assert_eq!(
        lb_reserved_ports(topo),
        lb_reserved,
        "no reservation needed"
    );
    drop((open, reopened));
    bed.finish();
}

/// `weir teardown` undoes the agent's reservation: a fullnat range inside the balancer
/// namespace's ephemeral ports, beside (and overlapping) an operator's range, is reserved
/// at start (the union) and kept when the agent stops. Then `weir teardown`: of another
/// datapath, it leaves the record alone; run from another namespace, it removes the pins
/// but refuses the record (the sysctl is per namespace); run in the balancer's namespace,
/// it removes exactly the recorded ranges (the operator's, overlap included, survive) and
/// the record; once more, it finds nothing to do.
#[test]
fn teardown_removes_exactly_the_reserved_snat_ports() {
    let Some(bed) = Bed::build_fullnat("ft") else {
        return;
    };
    let topo = &bed.topo;
    let range = common::in_netns(&topo.lb, || {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("port range")
    });
    let lo: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("ephemeral low port");
    let (snat_lo, snat_hi) = (lo + 100, lo + 199);
    let (op_lo, op_hi) = (lo + 150, lo + 159);
    let operator = format!("8080,{op_lo}-{op_hi}");
    common::in_netns(&topo.lb, || {
        fs::write("/proc/sys/net/ipv4/ip_local_reserved_ports", &operator)
            .expect("write the balancer's reserved ports");
    });
    let _server = IdServer::start(&topo.backends[0], 0, HTTP_BACKEND_PORT, &[]).expect("id server");
    let service = ServiceBuilder::new("web", VIP_V4, HTTP_PORT, "tcp")
        .forwarding("fullnat")
        .raw("snat_addresses", &format!("[\"{}\"]", Family::V4.snat()))
        .backend(Backend::new(backend_v4(0)).port(HTTP_BACKEND_PORT));
    let config = agent_config(topo, std::slice::from_ref(&service))
        .raw("snat_ports", &format!("\"{snat_lo}-{snat_hi}\""));
    let path = topo.write_agent_config(&config).expect("config");
    let mut agent = topo
        .start_agent_file(&path)
        .unwrap_or_else(|e| panic!("the agent did not start reserving its ports: {e:#}"));
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        format!("8080,{snat_lo}-{snat_hi}"),
        "the union of the operator's ranges and the SNAT range"
    );
    let vip = SocketAddr::new(VIP_V4.into(), HTTP_PORT);
    let (mut s, id) = common::id_tcp_connect(&topo.cli, vip, 47_100, IO_TIMEOUT).expect("connect");
    assert_eq!(id, 0);
    common::id_tcp_echo(&mut s, b"through the reserved range").expect("echo");
    drop(s);
    agent.stop();
    // Stopping keeps the datapath and the reservation (the pairs stay served).
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        format!("8080,{snat_lo}-{snat_hi}")
    );
    let record = topo.workdir.join("reserved-ports.json");
    assert!(record.exists(), "the record outlives the agent");

    let state = topo.workdir.join("state.json");
    let bpffs = topo.bpffs();
    let teardown = |ns: &str, bpffs: &std::path::Path| {
        let net = format!("--net=/run/netns/{ns}");
        let args = [
            "nsenter",
            &net,
            common::weir_bin(),
            "teardown",
            "--bpffs",
            bpffs.to_str().expect("utf-8"),
            "--state-file",
            state.to_str().expect("utf-8"),
        ];
        let (code, out, err) = common::run_status(&args).expect("run weir teardown");
        println!("$ weir teardown (in {ns}) -> {code}\n{out}{err}");
        (code, out, err)
    };
    // The teardown of another datapath leaves this one's record alone.
    let (code, _, err) = teardown(&topo.lb, &topo.workdir.join("other-bpffs"));
    assert_eq!(code, 1, "nothing of that datapath to tear down");
    assert!(err.contains("left alone"), "{err}");
    assert!(
        record.exists(),
        "another datapath's teardown kept the record"
    );
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        format!("8080,{snat_lo}-{snat_hi}")
    );
    // From another namespace (the client's): the pins go (they are the mount
    // namespace's), but the record is the balancer namespace's, so no sysctl is touched.
    let cli_reserved = common::in_netns(&topo.cli, || {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").expect("read")
    });
    let (code, out, err) = teardown(&topo.cli, &bpffs);
    assert_eq!(code, 1, "a record of another namespace is refused");
    assert!(out.contains("pins removed"), "{out}");
    assert!(err.contains("network namespace"), "{err}");
    assert!(record.exists(), "the refused teardown kept the record");
    assert!(!bpffs.exists(), "the pins are gone");
    assert_eq!(
        common::in_netns(&topo.cli, || fs::read_to_string(
            "/proc/sys/net/ipv4/ip_local_reserved_ports"
        )
        .expect("read")),
        cli_reserved
    );
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        format!("8080,{snat_lo}-{snat_hi}")
    );

    // In the balancer's namespace: the datapath is gone already, its reservation goes now.
    let (code, out, err) = teardown(&topo.lb, &bpffs);
    assert_eq!(code, 0, "weir teardown: {err}");
    assert!(out.contains("ip_local_reserved_ports"), "{out}");
    assert_eq!(
        lb_reserved_ports(topo).trim(),
        operator,
        "only the recorded ranges went; the operator's, inside the SNAT range, stayed"
    );
    assert!(!record.exists(), "the record is gone with the ranges");
    // Again: nothing left to do, nothing changed.
    let (code, _, err) = teardown(&topo.lb, &bpffs);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to tear down"), "{err}");
    assert_eq!(lb_reserved_ports(topo).trim(), operator);
    bed.finish();
}
