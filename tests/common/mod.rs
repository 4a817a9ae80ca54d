//! Privileged end-to-end test harness: the balancer in the test bed's topology (the agent,
//! decap, the XDP pass program on the switch port), servers and clients that count where
//! every flow went, metrics and Prometheus, and the one-namespace lab of the
//! `BPF_PROG_TEST_RUN` tests.
//!
//! The namespaces, veth pairs and bridge come from `weir_testbed` (shared with the demo;
//! re-exported here): client, switch, LB and three backends, dual-stack, see
//! `weir_testbed::topology`. Everything runs inside namespaces the harness creates, linked by
//! veth pairs it creates, and is torn down by `Drop` guards even when a test panics.
//! Addresses: only 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32, and only inside these
//! namespaces. Nothing is ever added to the root namespace.
#![expect(
    dead_code,
    reason = "each test binary (golden, e2e, the datapath bench) uses a different part of the harness"
)]

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    ops::{Deref, Range},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
// The test bed shared with the benches and the demo: namespaces, commands, the topology's
// names and addresses, the config builder. A glob, so each test binary takes what it needs
// without unused imports; `Topology` below (the test bed's plus the balancer) shadows its
// namesake.
pub use weir_testbed::*;

pub mod dashboard;
pub mod predict;
pub mod test_run;
pub mod tunnel;
pub mod upload;

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// Path of the `weir` binary built for this test run.
pub fn weir_bin() -> &'static str {
    env!("CARGO_BIN_EXE_weir")
}

/// A per-process, per-test namespace prefix: `w{pid % 10000}{tag}`. Keep `tag` short.
pub fn prefix(tag: &str) -> String {
    format!("w{}{}", std::process::id() % 10_000, tag)
}

// ---------------------------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------------------------

/// True when the test may run. Without root: panics in CI (`CI=true`), otherwise prints a
/// SKIPPED line and returns false so the test returns early.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("privileged test needs root; CI must run as root (euid is {euid})");
    }
    let test = thread::current().name().unwrap_or("?").to_owned();
    eprintln!("SKIPPED {test}: privileged end-to-end test needs root (euid is {euid})");
    false
}

// ---------------------------------------------------------------------------------------------
// XDP pass program on the switch port (keeps XDP_TX frames flowing on veth)
// ---------------------------------------------------------------------------------------------

/// Holds `weir::datapath::attach_pass`'s guard on a thread inside the namespace that owns the
/// interface; dropping this detaches it (from the same namespace) and joins the thread.
pub struct PassHolder {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl PassHolder {
    pub fn attach(ns: &str, ifname: &str) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let ifname_owned = ifname.to_owned();
        let handle = spawn_in_netns(ns, "xdp-pass", move || {
            match weir::datapath::attach_pass(&ifname_owned) {
                Ok(guard) => {
                    let _ = ready_tx.send(Ok(()));
                    // Returns when the sender is dropped.
                    let _ = stop_rx.recv();
                    drop(guard);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                }
            }
        })?;
        let mut holder = Self {
            stop: Some(stop_tx),
            handle: Some(handle),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(holder),
            Ok(Err(e)) => {
                holder.shutdown();
                bail!("attach_pass({ifname}) in {ns}: {e}")
            }
            Err(e) => {
                holder.shutdown();
                bail!("attach_pass({ifname}) in {ns}: no answer ({e})")
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

impl Drop for PassHolder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A child process in a namespace, with stdout/stderr captured to a log file. Drop sends
/// SIGTERM, waits up to 3 s, then SIGKILLs; the log is printed if the test is panicking.
pub struct ChildGuard {
    what: String,
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

/// Runs `ip netns exec NS <weir> ARGS...` in the background.
pub fn spawn_in_ns(ns: &str, args: &[&str]) -> Result<ChildGuard> {
    spawn_cmd_in_ns(ns, weir_bin(), args)
}

/// Runs `ip netns exec NS PROGRAM ARGS...` in the background.
pub fn spawn_cmd_in_ns(ns: &str, program: &str, args: &[&str]) -> Result<ChildGuard> {
    spawn_with(&["ip", "netns", "exec", ns], ns, program, args)
}

/// Runs `nsenter --net=/run/netns/NS <weir> ARGS...` in the background: only the network
/// namespace changes, so the process sees the host's bpffs and its pins outlive it (as the
/// agent's do in production). `ip netns exec` would give it a private mount namespace whose
/// bpffs vanishes with the process.
pub fn spawn_nsenter(ns: &str, args: &[&str]) -> Result<ChildGuard> {
    let net = format!("--net=/run/netns/{ns}");
    spawn_with(&["nsenter", &net], ns, weir_bin(), args)
}

fn spawn_with(launcher: &[&str], ns: &str, program: &str, args: &[&str]) -> Result<ChildGuard> {
    let seq = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
    let base = program.rsplit('/').next().unwrap_or(program);
    let sub = args.first().copied().unwrap_or("");
    let log = std::env::temp_dir().join(format!("{ns}-{base}-{sub}-{seq}.log"));
    let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let what = format!("{} {program} {}", launcher.join(" "), args.join(" "));
    let child = Command::new(launcher[0])
        .args(&launcher[1..])
        .arg(program)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn `{what}`"))?;
    Ok(ChildGuard {
        what,
        child: Some(child),
        log,
        status: None,
    })
}

impl ChildGuard {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The captured stdout+stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    /// Some(status) once the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.status = Some(st);
        }
        self.status
    }

    /// Waits until `ip -n NS -d link show dev IF` shows an XDP program, failing early if the
    /// process exits, and after `timeout` (10 s if None).
    pub fn wait_xdp(&mut self, ns: &str, ifname: &str, timeout: Option<Duration>) -> Result<()> {
        let deadline = Instant::now() + timeout.unwrap_or(Duration::from_secs(10));
        loop {
            if let Some(st) = self.try_status() {
                bail!(
                    "`{}` exited ({st}) before attaching XDP to {ifname} in {ns}; its log:\n{}",
                    self.what,
                    self.log()
                );
            }
            let shown = ip(ns, &["-d", "link", "show", "dev", ifname])?;
            if shown.contains(" xdp") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no XDP program on {ifname} in {ns} after waiting for `{}`; link:\n{}\nits log:\n{}",
                    self.what,
                    shown.trim(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, wait up to 3 s, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return self.status;
        };
        if self.status.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                self.status = Some(st);
                return self.status;
            }
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
            // SAFETY: kill(2) on our own, not yet reaped child (so the pid cannot be reused).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        self.status = Some(st);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        eprintln!(
                            "warning: `{}` ignored SIGTERM for 3 s; killing it",
                            self.what
                        );
                        let _ = child.kill();
                        self.status = child.wait().ok();
                        break;
                    }
                }
            }
        }
        self.status
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let st = self.stop();
        if thread::panicking() {
            eprintln!(
                "----- log of `{}` (exit: {st:?}) -----\n{}\n----- end of log -----",
                self.what,
                self.log()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------------------------

/// Topologies run one at a time inside a test process (2 cores, timing-sensitive traffic).
static SERIAL: Mutex<()> = Mutex::new(());

/// The test bed's topology (`weir_testbed::Topology`, dual-stack, namespaces `PREFIX-*`,
/// reached through `Deref`: `topo.cli`, `topo.lb`, `topo.backends`, ...) with what the
/// balancer needs on top: the XDP pass program on the switch port, a work directory, the
/// agent's socket, state file and pins. Dropping it tears everything down (pass program,
/// pins, namespaces, temp files).
pub struct Topology {
    net: weir_testbed::Topology,
    pub workdir: PathBuf,
    pass: Option<PassHolder>,
    _serial: MutexGuard<'static, ()>,
}

impl Deref for Topology {
    type Target = weir_testbed::Topology;

    fn deref(&self) -> &Self::Target {
        &self.net
    }
}

impl Topology {
    /// Builds the standard topology with 3 backends, the XDP pass program on the switch
    /// port and neighbour entries primed (LB→backends, client→LB).
    pub fn build(tag: &str) -> Result<Self> {
        Self::build_with(tag, true)
    }

    /// As `build`; `switch_pass` false leaves the switch port without an XDP program
    /// (only kernel forwarding is checked then).
    pub fn build_with(tag: &str, switch_pass: bool) -> Result<Self> {
        Self::build_layout(tag, Layout::Dsr, switch_pass)
    }

    /// As `build`, in the test bed's NAT layout: the client on a subnet of its own, backends
    /// with only an address and a default route via the balancer (`Layout::Nat`).
    pub fn build_nat(tag: &str) -> Result<Self> {
        Self::build_layout(tag, Layout::Nat, true)
    }

    /// As `build_nat`, with backends that have no route via the balancer
    /// (`Layout::Fullnat`).
    pub fn build_fullnat(tag: &str) -> Result<Self> {
        Self::build_layout(tag, Layout::Fullnat, true)
    }

    /// As `build_nat` (`Layout::Nat`) or `build_fullnat` (`Layout::Fullnat`), with the client
    /// on the balancer's second interface (`CLIENT_ARM_IF`): two-arm.
    pub fn build_two_arm(tag: &str, layout: Layout) -> Result<Self> {
        Self::build_inner(tag, layout, true, true)
    }

    fn build_layout(tag: &str, layout: Layout, switch_pass: bool) -> Result<Self> {
        Self::build_inner(tag, layout, switch_pass, false)
    }

    fn build_inner(tag: &str, layout: Layout, switch_pass: bool, two_arm: bool) -> Result<Self> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = prefix(tag);
        let net = match layout {
            _ if two_arm => weir_testbed::Topology::build_two_arm(&prefix, Stack::Dual, layout),
            Layout::Dsr => weir_testbed::Topology::build(&prefix, Stack::Dual),
            Layout::Nat => weir_testbed::Topology::build_nat(&prefix, Stack::Dual),
            Layout::Fullnat => weir_testbed::Topology::build_fullnat(&prefix, Stack::Dual),
        }
        .context("building the test topology")?;
        let workdir = std::env::temp_dir().join(format!("weir-e2e-{prefix}"));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir)?;
        let mut t = Self {
            net,
            workdir,
            pass: None,
            _serial: serial,
        };
        if switch_pass {
            t.pass = Some(PassHolder::attach(&t.sw, SWITCH_LB_PORT).context(
                "attaching an XDP_PASS program to the switch port of the LB (needed for XDP_TX on veth)",
            )?);
        }
        t.prime_neighbours().context("priming neighbour entries")?;
        Ok(t)
    }

    /// Writes `contents` to a file in this topology's temp directory and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let p = self.workdir.join(name);
        fs::write(&p, contents).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }

    /// The agent config of this topology's LB, services still to add: its interface in
    /// native mode, tunnel sources, a small connection table, and what keeps this agent
    /// apart from any other (its API socket and state file in the work directory, its pins
    /// in its own bpffs directory).
    pub fn agent_config(&self) -> ConfigBuilder {
        ConfigBuilder::new(NODE_IF)
            .xdp_mode("native")
            .tunnel_source(LB_V4)
            .tunnel_source_v6(LB_V6)
            .conntrack_entries(65536)
            .api_socket(&self.api_socket())
            .state_file(&self.workdir.join("state.json"))
            .audit_log(&self.audit_log())
            .bpffs(&self.bpffs())
    }

    /// The agent's audit log, in the work directory.
    pub fn audit_log(&self) -> PathBuf {
        self.workdir.join("audit.jsonl")
    }

    pub fn api_socket(&self) -> PathBuf {
        self.workdir.join("weir.sock")
    }

    pub fn bpffs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/weir-test-{}", self.prefix))
    }

    /// Writes the agent's config (`agent.toml` in the work directory) and returns its path.
    pub fn write_agent_config(&self, config: &ConfigBuilder) -> Result<PathBuf> {
        self.write_file("agent.toml", &config.render())
    }

    /// Starts `weir agent --config FILE` in the LB namespace (see `spawn_nsenter`) and waits
    /// until its API answers, which it does once the program is attached and the maps are
    /// written.
    pub fn start_agent(&self, config: &ConfigBuilder) -> Result<ChildGuard> {
        let path = self.write_agent_config(config)?;
        self.start_agent_file(&path)
    }

    /// As `start_agent`, with the config already written at `path`.
    pub fn start_agent_file(&self, path: &std::path::Path) -> Result<ChildGuard> {
        let path = path.to_str().context("utf-8 path")?;
        let mut child = spawn_nsenter(&self.lb, &["agent", "--config", path])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(resp) = weir::api::request(&self.api_socket(), &weir::api::Request::Status {})
                && resp.ok
            {
                break;
            }
            if let Some(st) = child.try_status() {
                bail!(
                    "the agent exited ({st}) before answering; log:\n{}",
                    child.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not answer on {} within 15 s; log:\n{}",
                    self.api_socket().display(),
                    child.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        if !xdp_attached(&self.lb, NODE_IF)? {
            bail!(
                "the agent answers but no XDP program is attached; log:\n{}",
                child.log()
            );
        }
        Ok(child)
    }

    /// Sends one API request to this topology's agent.
    pub fn api(&self, req: &weir::api::Request) -> Result<weir::api::Response> {
        Ok(weir::api::request(&self.api_socket(), req)?)
    }

    /// `weir teardown` for this topology's pins.
    pub fn teardown_datapath(&self) -> Result<()> {
        weir::datapath::teardown(&self.bpffs())
    }

    /// Starts `weir decap --interface eth0 --vip ...` on every backend and waits for each.
    pub fn start_decap(&self, vips: &[IpAddr]) -> Result<Vec<ChildGuard>> {
        self.start_decap_with(vips, &[])
    }

    /// As `start_decap`, with `extra` options (e.g. `--mss 1300`).
    pub fn start_decap_with(&self, vips: &[IpAddr], extra: &[&str]) -> Result<Vec<ChildGuard>> {
        let vips: Vec<String> = vips.iter().map(ToString::to_string).collect();
        let mut args = vec!["decap", "--interface", NODE_IF];
        for v in &vips {
            args.push("--vip");
            args.push(v);
        }
        args.extend_from_slice(extra);
        let mut children = Vec::new();
        for b in &self.backends {
            children.push(spawn_in_ns(b, &args)?);
        }
        for (b, c) in self.backends.iter().zip(children.iter_mut()) {
            c.wait_xdp(b, NODE_IF, None)
                .with_context(|| format!("waiting for decap in {b}"))?;
        }
        Ok(children)
    }

    /// TCP echo (dual-stack, every address) and UDP echo (bound to each VIP) on `port` in
    /// every backend.
    pub fn start_echo_servers(&self, port: u16) -> Result<EchoServers> {
        EchoServers::start(
            &self.backends,
            port,
            &[IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)],
        )
    }

    pub fn tcp_flows(
        &self,
        vip: IpAddr,
        port: u16,
        src_ports: Range<u16>,
        payload: &str,
    ) -> Result<FlowReport> {
        tcp_flows(&self.cli, vip, port, src_ports, payload)
    }

    pub fn udp_flows(
        &self,
        vip: IpAddr,
        port: u16,
        src_ports: Range<u16>,
        payload: &str,
    ) -> Result<FlowReport> {
        udp_flows(&self.cli, vip, port, src_ports, payload)
    }

    /// One UDP datagram from the client to `vip:port` from `src_port`: true if its echo came
    /// back within `timeout`. For negative checks (traffic that must not get through).
    pub fn udp_probe(
        &self,
        vip: IpAddr,
        port: u16,
        src_port: u16,
        timeout: Duration,
    ) -> Result<bool> {
        udp_probe(&self.cli, vip, port, src_port, timeout)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Detach the pass program from inside the switch namespace, then delete namespaces,
        // then temp files.
        drop(self.pass.take());
        // Pins live in the host's bpffs: remove them even when the test failed.
        if self.bpffs().exists()
            && let Err(e) = weir::datapath::teardown(&self.bpffs())
        {
            eprintln!("warning: teardown of {}: {e:#}", self.bpffs().display());
        }
        if let Err(e) = self.net.teardown() {
            eprintln!("warning: {e:#}");
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

// ---------------------------------------------------------------------------------------------
// Echo servers
// ---------------------------------------------------------------------------------------------

/// Per-backend counters kept by the echo servers.
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub tcp_accepted: AtomicU64,
    pub udp_echoed: AtomicU64,
    /// Peers whose datagrams were echoed: one per UDP flow, however often a client resent.
    pub udp_peers: Mutex<HashSet<SocketAddr>>,
}

/// Echo servers in every backend namespace; stop (and are joined) on drop.
pub struct EchoServers {
    pub counters: Vec<Arc<BackendCounters>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(100);

impl EchoServers {
    pub fn start(backends: &[String], port: u16, udp_addrs: &[IpAddr]) -> Result<Self> {
        let mut me = Self {
            counters: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for ns in backends {
            let c = Arc::new(BackendCounters::default());
            me.counters.push(c.clone());
            me.spawn_server(ns, "tcp-echo", {
                let (c, stop) = (c.clone(), me.stop.clone());
                move || -> Result<Box<dyn FnOnce() + Send>> {
                    let listener = tcp_listener(port)?;
                    Ok(Box::new(move || tcp_accept_loop(listener, &c, &stop)))
                }
            })?;
            for &addr in udp_addrs {
                me.spawn_server(ns, "udp-echo", {
                    let (c, stop) = (c.clone(), me.stop.clone());
                    move || -> Result<Box<dyn FnOnce() + Send>> {
                        let sock = UdpSocket::bind(SocketAddr::new(addr, port))
                            .with_context(|| format!("bind UDP {}", SocketAddr::new(addr, port)))?;
                        sock.set_read_timeout(Some(POLL))?;
                        Ok(Box::new(move || udp_echo_loop(&sock, &c, &stop)))
                    }
                })?;
            }
        }
        Ok(me)
    }

    /// Spawns a thread in `ns` that runs `bind` (reporting its error) and then the loop it
    /// returns; returns once bound.
    fn spawn_server(
        &mut self,
        ns: &str,
        name: &str,
        bind: impl FnOnce() -> Result<Box<dyn FnOnce() + Send>> + Send + 'static,
    ) -> Result<()> {
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let h = spawn_in_netns(ns, name, move || match bind() {
            Ok(serve) => {
                let _ = tx.send(Ok(()));
                serve();
            }
            Err(e) => {
                let _ = tx.send(Err(format!("{e:#}")));
            }
        })?;
        self.threads.push(h);
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("{name} server in {ns}: {e}"),
            Err(e) => bail!("{name} server in {ns}: not ready ({e})"),
        }
    }

    pub fn tcp_counts(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.tcp_accepted.load(Ordering::SeqCst))
            .collect()
    }

    pub fn udp_counts(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.udp_echoed.load(Ordering::SeqCst))
            .collect()
    }

    /// UDP flows (distinct client address and port) echoed per backend: unlike
    /// `udp_counts`, a datagram the client sent again after a lost echo does not count twice.
    pub fn udp_flow_counts(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| {
                let peers = c.udp_peers.lock().unwrap_or_else(|e| e.into_inner());
                u64::try_from(peers.len()).expect("peer count")
            })
            .collect()
    }

    pub fn reset(&self) {
        for c in &self.counters {
            c.tcp_accepted.store(0, Ordering::SeqCst);
            c.udp_echoed.store(0, Ordering::SeqCst);
            c.udp_peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// A dual-stack TCP listener on `port` (every address) whose `accept` returns every 100 ms
/// (for `accept_until_stopped`).
pub fn tcp_listener(port: u16) -> Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    s.bind(&SockAddr::from(addr))
        .with_context(|| format!("bind TCP {addr}"))?;
    s.listen(1024)?;
    // accept(2) honours SO_RCVTIMEO: lets the loop notice the stop flag.
    s.set_read_timeout(Some(POLL))?;
    Ok(s.into())
}

fn tcp_accept_loop(listener: TcpListener, c: &BackendCounters, stop: &AtomicBool) {
    accept_until_stopped(&listener, stop, "tcp echo", |stream| {
        c.tcp_accepted.fetch_add(1, Ordering::SeqCst);
        thread::spawn(move || tcp_echo_conn(stream))
    });
}

/// Accepts connections until `stop`, handing each to `serve` (which returns the thread
/// serving it), then joins those threads. The listener's read timeout paces the checks.
pub fn accept_until_stopped(
    listener: &TcpListener,
    stop: &AtomicBool,
    what: &str,
    mut serve: impl FnMut(TcpStream) -> JoinHandle<()>,
) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                conns.push(serve(stream));
                conns.retain(|h| !h.is_finished());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("{what}: accept: {e}");
                thread::sleep(POLL);
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

/// Echoes until EOF, an error, or 3 s of silence.
fn tcp_echo_conn(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

fn udp_echo_loop(sock: &UdpSocket, c: &BackendCounters, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                // Counted before the echo leaves: once the client has its answer, the test
                // may read or reset the counts, and a count made after that would land in
                // the next case (seen: an earlier case's datagram counted as a flow of the
                // next family's). A failed echo fails the client's flow, which it reports.
                c.udp_echoed.fetch_add(1, Ordering::SeqCst);
                c.udp_peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(peer);
                if let Err(e) = sock.send_to(&buf[..n], peer) {
                    eprintln!("udp echo: send to {peer}: {e}");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("udp echo: recv: {e}");
                thread::sleep(POLL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Outcome of a batch of flows, one entry per source port.
#[derive(Debug)]
pub struct FlowReport {
    pub what: String,
    pub results: Vec<(u16, Result<(), String>)>,
    pub elapsed: Duration,
}

impl FlowReport {
    pub fn ok_count(&self) -> usize {
        self.results.iter().filter(|(_, r)| r.is_ok()).count()
    }

    pub fn failures(&self) -> Vec<&(u16, Result<(), String>)> {
        self.results.iter().filter(|(_, r)| r.is_err()).collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {}/{} ok in {:.2?}",
            self.what,
            self.ok_count(),
            self.results.len(),
            self.elapsed
        )
    }

    /// Panics with the first few failures unless every flow got its echo.
    pub fn assert_all_ok(&self) {
        let f = self.failures();
        if !f.is_empty() {
            let sample: Vec<String> = f
                .iter()
                .take(8)
                .map(|(p, r)| {
                    format!(
                        "  src port {p}: {}",
                        r.as_ref().err().map_or("", String::as_str)
                    )
                })
                .collect();
            panic!(
                "{}; {} failed, first ones:\n{}",
                self.summary(),
                f.len(),
                sample.join("\n")
            );
        }
    }
}

/// Whole-batch time limit, and the early give-up: when the first `GIVE_UP_AFTER` flows all
/// fail the datapath is clearly down and the rest are recorded as not attempted.
const BATCH_DEADLINE: Duration = Duration::from_secs(30);
const GIVE_UP_AFTER: usize = 16;

fn run_flows(
    what: String,
    src_ports: Range<u16>,
    mut one: impl FnMut(u16) -> Result<()>,
) -> FlowReport {
    let start = Instant::now();
    let mut results = Vec::with_capacity(src_ports.len());
    let mut give_up: Option<String> = None;
    for (i, port) in src_ports.enumerate() {
        if let Some(why) = &give_up {
            results.push((port, Err(format!("not attempted: {why}"))));
            continue;
        }
        let r = one(port).map_err(|e| format!("{e:#}"));
        results.push((port, r));
        if i + 1 == GIVE_UP_AFTER && results.iter().all(|(_, r)| r.is_err()) {
            give_up = Some(format!("the first {GIVE_UP_AFTER} flows all failed"));
        } else if start.elapsed() > BATCH_DEADLINE {
            give_up = Some(format!("batch deadline of {BATCH_DEADLINE:?} passed"));
        }
    }
    FlowReport {
        what,
        results,
        elapsed: start.elapsed(),
    }
}

fn flow_payload(tag: &str, proto: &str, port: u16) -> Vec<u8> {
    format!("{tag}/{proto}/src={port}/weir-e2e-payload").into_bytes()
}

fn bind_src(domain: Domain, ty: Type, proto: Protocol, src_port: u16) -> Result<Socket> {
    let s = Socket::new(domain, ty, Some(proto))?;
    s.set_reuse_address(true)?;
    let ip: IpAddr = if domain == Domain::IPV6 {
        s.set_only_v6(true)?;
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    s.bind(&SockAddr::from(SocketAddr::new(ip, src_port)))
        .with_context(|| format!("bind source port {src_port}"))?;
    Ok(s)
}

/// From namespace `ns`: one TCP connection per source port to VIP:port (2 s timeouts),
/// sending a per-flow payload and checking its echo.
pub fn tcp_flows(
    ns: &str,
    vip: IpAddr,
    port: u16,
    src_ports: Range<u16>,
    payload: &str,
) -> Result<FlowReport> {
    let dst = SocketAddr::new(vip, port);
    let domain = Domain::for_address(dst);
    let what = format!("TCP {dst} from ports {src_ports:?}");
    let t = Duration::from_secs(2);
    Ok(in_netns(ns, move || {
        run_flows(what, src_ports, |src| {
            let s = bind_src(domain, Type::STREAM, Protocol::TCP, src)?;
            s.connect_timeout(&SockAddr::from(dst), t)
                .context("connect")?;
            let mut stream: TcpStream = s.into();
            stream.set_read_timeout(Some(t))?;
            stream.set_write_timeout(Some(t))?;
            let msg = flow_payload(payload, "tcp", src);
            stream.write_all(&msg).context("send")?;
            let mut got = vec![0u8; msg.len()];
            stream.read_exact(&mut got).context("read echo")?;
            if got != msg {
                bail!(
                    "echo mismatch: sent {:?}, got {:?}",
                    String::from_utf8_lossy(&msg),
                    String::from_utf8_lossy(&got)
                );
            }
            Ok(())
        })
    }))
}

/// From namespace `ns`: one UDP socket per source port, connected to VIP:port, sending a
/// per-flow datagram and waiting 1 s for its echo (one retry).
pub fn udp_flows(
    ns: &str,
    vip: IpAddr,
    port: u16,
    src_ports: Range<u16>,
    payload: &str,
) -> Result<FlowReport> {
    let dst = SocketAddr::new(vip, port);
    let domain = Domain::for_address(dst);
    let what = format!("UDP {dst} from ports {src_ports:?}");
    Ok(in_netns(ns, move || {
        run_flows(what, src_ports, |src| {
            let s = bind_src(domain, Type::DGRAM, Protocol::UDP, src)?;
            s.connect(&SockAddr::from(dst)).context("connect")?;
            let sock: UdpSocket = s.into();
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            sock.set_write_timeout(Some(Duration::from_secs(1)))?;
            let msg = flow_payload(payload, "udp", src);
            let mut buf = [0u8; 2048];
            let mut last = String::new();
            for _attempt in 0..2 {
                sock.send(&msg).context("send")?;
                match sock.recv(&mut buf) {
                    Ok(n) if buf[..n] == msg[..] => return Ok(()),
                    Ok(n) => {
                        last = format!(
                            "echo mismatch: got {:?}",
                            String::from_utf8_lossy(&buf[..n])
                        )
                    }
                    Err(e) => last = format!("recv: {e}"),
                }
            }
            Err(anyhow!("no echo after 2 attempts ({last})"))
        })
    }))
}

/// From namespace `ns`: one datagram to VIP:port from `src_port`; true if echoed in `timeout`.
pub fn udp_probe(
    ns: &str,
    vip: IpAddr,
    port: u16,
    src_port: u16,
    timeout: Duration,
) -> Result<bool> {
    let dst = SocketAddr::new(vip, port);
    in_netns(ns, move || {
        let s = bind_src(
            Domain::for_address(dst),
            Type::DGRAM,
            Protocol::UDP,
            src_port,
        )?;
        s.connect(&SockAddr::from(dst)).context("connect")?;
        let sock: UdpSocket = s.into();
        sock.set_read_timeout(Some(timeout))?;
        let msg = flow_payload("probe", "udp", src_port);
        sock.send(&msg).context("send")?;
        let mut buf = [0u8; 2048];
        Ok(matches!(sock.recv(&mut buf), Ok(n) if buf[..n] == msg[..]))
    })
}

// ---------------------------------------------------------------------------------------------
// A one-namespace lab for BPF_PROG_TEST_RUN (golden packets, datapath bench)
// ---------------------------------------------------------------------------------------------

/// Prepares namespace `ns` for running the balancer with `BPF_PROG_TEST_RUN`:
/// `bpf_fib_lookup` reads this namespace's routes and neighbours. Interface `g0`
/// (02:00:00:00:00:01) has 198.51.100.1/24 and 2001:db8::1/64 and permanent neighbours for
/// the backends 198.51.100.11..13 (MAC 02:00:00:00:be:0b..0d) and 2001:db8::11..13 (MAC
/// 02:00:00:00:be:11..13); `h0` (02:00:00:00:00:81) has 203.0.113.129/25 and a neighbour
/// 203.0.113.150 (02:00:00:00:be:96), for the redirect path. Forwarding is on, as
/// `bpf_fib_lookup` needs.
pub fn lab_namespace(ns: &str) -> Result<()> {
    ip(
        ns,
        &[
            "link",
            "add",
            "g0",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "g1",
        ],
    )?;
    ip(
        ns,
        &[
            "link",
            "add",
            "h0",
            "address",
            "02:00:00:00:00:81",
            "type",
            "veth",
            "peer",
            "h1",
        ],
    )?;
    for dev in ["g0", "g1", "h0", "h1"] {
        ip(ns, &["link", "set", dev, "up"])?;
    }
    ip(ns, &["addr", "add", "198.51.100.1/24", "dev", "g0"])?;
    ip(ns, &["addr", "add", "2001:db8::1/64", "dev", "g0", "nodad"])?;
    ip(ns, &["addr", "add", "203.0.113.129/25", "dev", "h0"])?;
    // Backend MACs end in the address's last byte (`backend_mac`): 198.51.100.11 -> be:0b,
    // 2001:db8::11 -> be:11.
    for last in [11u8, 12, 13] {
        let a4 = format!("198.51.100.{last}");
        let mac4 = format!("02:00:00:00:be:{last:02x}");
        ip(
            ns,
            &[
                "neigh",
                "replace",
                &a4,
                "lladdr",
                &mac4,
                "nud",
                "permanent",
                "dev",
                "g0",
            ],
        )?;
        let a6 = format!("2001:db8::{last}");
        let mac6 = format!("02:00:00:00:be:{last}");
        ip(
            ns,
            &[
                "neigh",
                "replace",
                &a6,
                "lladdr",
                &mac6,
                "nud",
                "permanent",
                "dev",
                "g0",
            ],
        )?;
    }
    let mac150 = "02:00:00:00:be:96";
    ip(
        ns,
        &[
            "neigh",
            "replace",
            "203.0.113.150",
            "lladdr",
            mac150,
            "nud",
            "permanent",
            "dev",
            "h0",
        ],
    )?;
    sysctl(
        ns,
        &[
            "net.ipv4.conf.g0.forwarding=1",
            "net.ipv4.conf.h0.forwarding=1",
            "net.ipv6.conf.g0.forwarding=1",
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Agent-level helpers: signals, HTTP, metrics text, switchable backend servers, Prometheus
// ---------------------------------------------------------------------------------------------

impl ChildGuard {
    /// SIGKILL (no chance to clean up: the socket file and the pins stay), then reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take()
            && self.status.is_none()
        {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
        self.status
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the running process.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if self.try_status().is_some() {
            bail!("`{}` has exited; cannot signal it", self.what);
        }
        let child = self.child.as_ref().context("no child")?;
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) on our own, not yet reaped child (so the pid cannot be reused).
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Runs `nsenter --net=/run/netns/NS PROGRAM ARGS...` in the background (see `spawn_nsenter`).
pub fn spawn_cmd_nsenter(ns: &str, program: &str, args: &[&str]) -> Result<ChildGuard> {
    let net = format!("--net=/run/netns/{ns}");
    spawn_with(&["nsenter", &net], ns, program, args)
}

/// Runs a program to completion and returns (exit code, stdout, stderr); unlike `run`, a
/// non-zero exit is not an error (for CLI tests that check exit codes).
pub fn run_status(args: &[&str]) -> Result<(i32, String, String)> {
    let (prog, rest) = args.split_first().context("empty command")?;
    let out = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", args.join(" ")))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a program with `input` on its stdin; returns (exit code, stdout, stderr).
pub fn run_with_input(args: &[&str], input: &[u8]) -> Result<(i32, String, String)> {
    let (prog, rest) = args.split_first().context("empty command")?;
    let mut child = Command::new(prog)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", args.join(" ")))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..1_000_000 {
        let end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_text = String::from_utf8_lossy(&body[..end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_owned();
        let size = usize::from_str_radix(&size_text, 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        body = &body[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
    bail!("too many chunks")
}

/// From namespace `ns`: an HTTP/1.0 GET of `target` (path and query) on `addr`; returns the
/// status code and the body.
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    target: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let target = target.to_owned();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect to {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {target} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: weir-e2e\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("read the answer of {addr}{target}"))?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of the response head")?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let body = &raw[split + 4..];
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line in {head:?}"))?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        };
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (no escapes beyond `\"`, `\\`, `\n`).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().with_context(|| format!("value in {line:?}"))?,
        };
        let mut labels = std::collections::BTreeMap::new();
        let name = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .with_context(|| format!("labels in {line:?}"))?;
                let mut chars = rest.chars().peekable();
                loop {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    if key.is_empty() {
                        break;
                    }
                    if chars.next() != Some('"') {
                        bail!("label value of {key} in {line:?}");
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(c) => val.push(c),
                                None => bail!("escape at the end of {line:?}"),
                            },
                            Some('"') => break,
                            Some(c) => val.push(c),
                            None => bail!("unterminated label value in {line:?}"),
                        }
                    }
                    labels.insert(key.trim_start_matches(',').to_owned(), val);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                name.to_owned()
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Where the agent serves `/metrics` by default, inside the LB namespace.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9650);

impl Topology {
    /// The agent's `/metrics` text (a real scrape from inside the LB namespace).
    pub fn metrics_text(&self) -> Result<String> {
        let (status, body) = http_get(&self.lb, METRICS_ADDR, "/metrics", Duration::from_secs(5))?;
        if status != 200 {
            bail!("GET /metrics answered {status}: {body}");
        }
        Ok(body)
    }

    /// The agent's metrics, parsed.
    pub fn metrics(&self) -> Result<Vec<Sample>> {
        parse_metrics(&self.metrics_text()?)
    }

    /// A global datapath counter (`lb_common::stat::NAMES`) from the agent's `stats`.
    pub fn global_counter(&self, name: &str) -> u64 {
        let resp = self.api(&weir::api::Request::Stats {}).expect("API stats");
        assert!(resp.ok, "stats failed: {:?}", resp.error);
        let stats: weir::api::Stats = resp.data.expect("data").try_into().expect("stats");
        stats
            .global
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no global counter {name}"))
    }

    /// TCP and UDP echo servers on `port` in backend `i` only (as `start_echo_servers`);
    /// dropping the result stops them, which is how a test stops one backend.
    pub fn start_backend_echo(&self, i: usize, port: u16) -> Result<EchoServers> {
        EchoServers::start(
            std::slice::from_ref(&self.backends[i]),
            port,
            &[IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)],
        )
    }
}

/// Small servers in a namespace that stop (and are joined) on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Requests answered (UDP datagrams echoed, HTTP requests answered).
    pub served: Arc<AtomicU64>,
}

impl Servers {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            served: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A UDP echo server bound to `addr` in namespace `ns` (e.g. a backend's own address,
    /// for UDP health checks).
    pub fn udp_echo(ns: &str, addr: SocketAddr) -> Result<Self> {
        let mut me = Self::new();
        let (c, stop) = (me.served.clone(), me.stop.clone());
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let h = spawn_in_netns(ns, "udp-echo-hc", move || {
            let sock = match UdpSocket::bind(addr).and_then(|s| {
                s.set_read_timeout(Some(POLL))?;
                Ok(s)
            }) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("bind UDP {addr}: {e}")));
                    return;
                }
            };
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf)
                    && sock.send_to(&buf[..n], peer).is_ok()
                {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
        })?;
        me.threads.push(h);
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(me),
            Ok(Err(e)) => bail!("{e}"),
            Err(e) => bail!("UDP echo in {ns}: not ready ({e})"),
        }
    }

    /// A minimal HTTP server on `port` (all addresses) in namespace `ns` answering every
    /// request with the status code currently in `status` (switchable while it runs).
    pub fn http_status(
        ns: &str,
        port: u16,
        status: Arc<std::sync::atomic::AtomicU16>,
    ) -> Result<Self> {
        let mut me = Self::new();
        let (c, stop) = (me.served.clone(), me.stop.clone());
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let h = spawn_in_netns(ns, "http-status", move || {
            let listener = match tcp_listener(port) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            while !stop.load(Ordering::SeqCst) {
                let Ok((mut s, _)) = listener.accept() else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let code = status.load(Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 {code} Status\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{code}"
                );
                if s.write_all(answer.as_bytes()).is_ok() {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
        })?;
        me.threads.push(h);
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(me),
            Ok(Err(e)) => bail!("HTTP server in {ns}: {e}"),
            Err(e) => bail!("HTTP server in {ns}: not ready ({e})"),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// From namespace `ns`: a TCP connection from `src_port` to `dst` (the socket belongs to `ns`
/// and can then be used from any thread).
pub fn tcp_connect(
    ns: &str,
    dst: SocketAddr,
    src_port: u16,
    timeout: Duration,
) -> Result<TcpStream> {
    in_netns(ns, move || {
        let s = bind_src(
            Domain::for_address(dst),
            Type::STREAM,
            Protocol::TCP,
            src_port,
        )?;
        s.connect_timeout(&SockAddr::from(dst), timeout)
            .with_context(|| format!("connect to {dst} from port {src_port}"))?;
        let stream: TcpStream = s.into();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    })
}

/// One TCP flow from the current thread's namespace: connect from `src_port`, send a
/// payload, check its echo (as `tcp_flows` does per flow).
pub fn tcp_echo_once(dst: SocketAddr, src_port: u16, tag: &str, timeout: Duration) -> Result<()> {
    let s = bind_src(
        Domain::for_address(dst),
        Type::STREAM,
        Protocol::TCP,
        src_port,
    )?;
    s.connect_timeout(&SockAddr::from(dst), timeout)
        .context("connect")?;
    let mut stream: TcpStream = s.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let msg = flow_payload(tag, "tcp", src_port);
    stream.write_all(&msg).context("send")?;
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).context("read echo")?;
    if got != msg {
        bail!("echo mismatch");
    }
    Ok(())
}

/// Percent-encodes a URL query value.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A real Prometheus server inside the LB namespace, scraping the agent's `/metrics` every
/// second, with its config and data in the topology's work directory. Killed on drop.
pub struct Prometheus {
    ns: String,
    pub addr: SocketAddr,
    child: ChildGuard,
}

/// Prometheus' listen address inside the LB namespace.
pub const PROMETHEUS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9090);

impl Prometheus {
    pub fn start(topo: &Topology) -> Result<Self> {
        let dir = topo.workdir.join("prometheus");
        fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: weir\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n\
                 \x20   static_configs:\n      - targets: ['{METRICS_ADDR}']\n"
            ),
        )?;
        let config_arg = format!("--config.file={}", config.display());
        let data_arg = format!("--storage.tsdb.path={}", dir.join("data").display());
        let listen_arg = format!("--web.listen-address={PROMETHEUS_ADDR}");
        let mut child = spawn_cmd_nsenter(
            &topo.lb,
            "/usr/bin/prometheus",
            // The first argument names the log file: no slashes there.
            &[
                "--log.level=warn",
                &config_arg,
                &data_arg,
                &listen_arg,
                "--storage.tsdb.retention.time=1h",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(
                &topo.lb,
                PROMETHEUS_ADDR,
                "/-/ready",
                Duration::from_secs(1),
            ) {
                break;
            }
            if let Some(st) = child.try_status() {
                bail!("prometheus exited ({st}); log:\n{}", child.log());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready within 20 s; log:\n{}", child.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            ns: topo.lb.clone(),
            addr: PROMETHEUS_ADDR,
            child,
        })
    }

    /// An instant query through the HTTP API: the `data.result` array.
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>> {
        self.query_target(expr, format!("/api/v1/query?query={}", url_encode(expr)))
    }

    /// As `query`, evaluated at `time` (Unix seconds) instead of now.
    pub fn query_at(&self, expr: &str, time: f64) -> Result<Vec<serde_json::Value>> {
        self.query_target(
            expr,
            format!("/api/v1/query?query={}&time={time:.3}", url_encode(expr)),
        )
    }

    fn query_target(&self, expr: &str, target: String) -> Result<Vec<serde_json::Value>> {
        let (status, body) = http_get(&self.ns, self.addr, &target, Duration::from_secs(5))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("query {expr:?}: answer {status} is not JSON: {body}"))?;
        if status != 200 || v["status"] != "success" {
            bail!("query {expr:?} failed ({status}): {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until Prometheus holds a scrape of the agent that started after `after` (Unix
    /// seconds), i.e. the traffic before `after` is in its counters.
    pub fn wait_scrape_after(&self, after: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // A plain selector: timestamp() of anything else (`up == 1`) is the evaluation time.
            let r = self.query("timestamp(up{job=\"weir\"})")?;
            let ts = r
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok());
            if ts.is_some_and(|ts| ts > after) {
                let up = self.query("up{job=\"weir\"}")?;
                if up.first().and_then(|s| s["value"][1].as_str()) != Some("1") {
                    bail!("Prometheus' scrape of the agent failed: {up:?}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no successful scrape of the agent after {after} within {timeout:?} (last: {ts:?}); log:\n{}",
                    self.child.log()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until Prometheus holds at least `n` scrapes of the agent in the last minute
    /// (enough for `rate(...[1m])`). Its first scrape comes a few seconds after it is ready
    /// (target discovery hands out targets at most every 5 s).
    pub fn wait_scrapes(&self, n: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query("count_over_time(up{job=\"weir\"}[1m])")?;
            let count = r
                .first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if count >= f64::from(n) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {count} scrapes of the agent within {timeout:?}; log:\n{}",
                    self.child.log()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        self.child.log()
    }
}

/// Polls `f` every 50 ms until it returns `Some`, panicking after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Unix time in seconds, as Prometheus uses it.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Identifying servers (scheduler tests): every answer names the backend that gave it
// ---------------------------------------------------------------------------------------------

/// TCP and UDP servers on `port` in one backend's namespace whose answers name the backend:
/// a TCP connection first receives one byte, the backend's index, then has its data echoed,
/// with no idle limit (it lives until the client closes it or the server stops); a UDP
/// datagram is answered with the index byte followed by the datagram. Dropping it closes the
/// listener, every connection and the UDP sockets: that is how a test takes one backend down
/// (its TCP health check then fails) and, with a new `IdServer`, brings it back.
pub struct IdServer {
    pub index: u8,
    /// TCP connections accepted (health-check connections included).
    pub tcp_accepted: Arc<AtomicU64>,
    /// UDP datagrams answered.
    pub udp_answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl IdServer {
    /// Starts the servers in `ns`: TCP on every address, UDP bound to each of `udp_addrs`.
    /// Returns once all of them are bound.
    pub fn start(ns: &str, index: u8, port: u16, udp_addrs: &[IpAddr]) -> Result<Self> {
        let mut me = Self {
            index,
            tcp_accepted: Arc::default(),
            udp_answered: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        {
            let (tx, stop, count) = (tx.clone(), me.stop.clone(), me.tcp_accepted.clone());
            me.threads.push(spawn_in_netns(ns, "id-tcp", move || {
                let listener = match tcp_listener(port) {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                id_tcp_accept_loop(&listener, index, &count, &stop);
            })?);
        }
        for &addr in udp_addrs {
            let (tx, stop, count) = (tx.clone(), me.stop.clone(), me.udp_answered.clone());
            me.threads.push(spawn_in_netns(ns, "id-udp", move || {
                let bound = UdpSocket::bind(SocketAddr::new(addr, port)).and_then(|s| {
                    s.set_read_timeout(Some(POLL))?;
                    Ok(s)
                });
                let sock = match bound {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!(
                            "bind UDP {}: {e}",
                            SocketAddr::new(addr, port)
                        )));
                        return;
                    }
                };
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf[1..]) {
                        buf[0] = index;
                        if sock.send_to(&buf[..=n], peer).is_ok() {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })?);
        }
        drop(tx);
        for _ in 0..=udp_addrs.len() {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("id server in {ns}: {e}"),
                Err(e) => bail!("id server in {ns}: not ready ({e})"),
            }
        }
        Ok(me)
    }
}

impl Drop for IdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn id_tcp_accept_loop(
    listener: &TcpListener,
    index: u8,
    count: &AtomicU64,
    stop: &Arc<AtomicBool>,
) {
    accept_until_stopped(listener, stop, "id server", |stream| {
        count.fetch_add(1, Ordering::SeqCst);
        let stop = Arc::clone(stop);
        thread::spawn(move || id_tcp_conn(stream, index, &stop))
    });
}

/// Sends the index, then echoes until EOF, an error, or the stop flag.
fn id_tcp_conn(mut s: TcpStream, index: u8, stop: &AtomicBool) {
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    if s.write_all(&[index]).is_err() {
        return;
    }
    echo_until_stopped(s, stop);
}

/// Echoes until EOF, an error, or the stop flag, however long the connection idles (the
/// stop flag is looked at every `POLL`).
pub fn echo_until_stopped(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

impl Topology {
    /// An `IdServer` on `port` in backend `i` (index byte `i`), UDP bound to the IPv4 VIP.
    pub fn start_id_server(&self, i: usize, port: u16) -> Result<IdServer> {
        IdServer::start(
            &self.backends[i],
            u8::try_from(i).context("backend index")?,
            port,
            &[IpAddr::V4(VIP_V4)],
        )
    }

    /// `start_id_server` for every backend.
    pub fn start_id_servers(&self, port: u16) -> Result<Vec<IdServer>> {
        (0..self.backends.len())
            .map(|i| self.start_id_server(i, port))
            .collect()
    }
}

/// Outcome of a batch of flows to `IdServer`s: per source port, the index of the backend
/// that answered.
#[derive(Debug)]
pub struct IdReport {
    pub what: String,
    pub results: Vec<(u16, Result<u8, String>)>,
    pub elapsed: Duration,
}

impl IdReport {
    /// Flows per backend index (`n` backends); failed flows are not counted.
    pub fn counts(&self, n: usize) -> Vec<u64> {
        let mut out = vec![0u64; n];
        for (_, r) in &self.results {
            if let Ok(i) = r
                && let Some(c) = out.get_mut(usize::from(*i))
            {
                *c += 1;
            }
        }
        out
    }

    pub fn ok_count(&self) -> usize {
        self.results.iter().filter(|(_, r)| r.is_ok()).count()
    }

    /// Panics with the first few failures unless every flow was answered.
    pub fn assert_all_ok(&self) {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter_map(|(p, r)| r.as_ref().err().map(|e| format!("  src port {p}: {e}")))
            .collect();
        assert!(
            failed.is_empty(),
            "{}: {}/{} answered in {:.2?}; {} failed, first ones:\n{}",
            self.what,
            self.ok_count(),
            self.results.len(),
            self.elapsed,
            failed.len(),
            failed
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

fn run_id_flows(
    what: String,
    src_ports: Range<u16>,
    mut one: impl FnMut(u16) -> Result<u8>,
) -> IdReport {
    let start = Instant::now();
    let mut results = Vec::with_capacity(src_ports.len());
    let mut give_up: Option<String> = None;
    for (i, port) in src_ports.enumerate() {
        if let Some(why) = &give_up {
            results.push((port, Err(format!("not attempted: {why}"))));
            continue;
        }
        results.push((port, one(port).map_err(|e| format!("{e:#}"))));
        if i + 1 == GIVE_UP_AFTER && results.iter().all(|(_, r)| r.is_err()) {
            give_up = Some(format!("the first {GIVE_UP_AFTER} flows all failed"));
        } else if start.elapsed() > BATCH_DEADLINE {
            give_up = Some(format!("batch deadline of {BATCH_DEADLINE:?} passed"));
        }
    }
    IdReport {
        what,
        results,
        elapsed: start.elapsed(),
    }
}

/// From the current thread's namespace: a TCP connection from `src_port` to `dst` (served
/// by `IdServer`s); returns it with the index of the backend that accepted it.
pub fn id_tcp_connect_here(
    dst: SocketAddr,
    src_port: u16,
    timeout: Duration,
) -> Result<(TcpStream, u8)> {
    let s = bind_src(
        Domain::for_address(dst),
        Type::STREAM,
        Protocol::TCP,
        src_port,
    )?;
    s.connect_timeout(&SockAddr::from(dst), timeout)
        .with_context(|| format!("connect to {dst} from port {src_port}"))?;
    let mut stream: TcpStream = s.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut id = [0u8; 1];
    stream
        .read_exact(&mut id)
        .with_context(|| format!("read the backend index (src port {src_port})"))?;
    Ok((stream, id[0]))
}

/// From namespace `ns`: as `id_tcp_connect_here`. The stream can be used from any thread.
pub fn id_tcp_connect(
    ns: &str,
    dst: SocketAddr,
    src_port: u16,
    timeout: Duration,
) -> Result<(TcpStream, u8)> {
    in_netns(ns, move || id_tcp_connect_here(dst, src_port, timeout))
}

/// Sends `payload` on a connection to an `IdServer` and checks its echo.
pub fn id_tcp_echo(stream: &mut TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload).context("send")?;
    let mut got = vec![0u8; payload.len()];
    stream.read_exact(&mut got).context("read echo")?;
    if got != payload {
        bail!(
            "echo mismatch: sent {:?}, got {:?}",
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&got)
        );
    }
    Ok(())
}

/// From namespace `ns`: one short TCP connection per source port to `dst` (connect, read the
/// backend index, echo a payload, close with FIN).
pub fn id_tcp_flows(ns: &str, dst: SocketAddr, src_ports: Range<u16>) -> IdReport {
    let what = format!("TCP {dst} from ports {src_ports:?}");
    in_netns(ns, move || {
        run_id_flows(what, src_ports, |src| {
            let (mut stream, id) = id_tcp_connect_here(dst, src, Duration::from_secs(2))?;
            id_tcp_echo(&mut stream, &flow_payload("id", "tcp", src))?;
            Ok(id)
        })
    })
}

/// From the current thread's namespace: a UDP socket bound to `src_port`, connected to `dst`.
pub fn id_udp_socket_here(dst: SocketAddr, src_port: u16) -> Result<UdpSocket> {
    let s = bind_src(
        Domain::for_address(dst),
        Type::DGRAM,
        Protocol::UDP,
        src_port,
    )?;
    s.connect(&SockAddr::from(dst)).context("connect")?;
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(sock)
}

/// From namespace `ns`: as `id_udp_socket_here`. The socket can be used from any thread.
pub fn id_udp_socket(ns: &str, dst: SocketAddr, src_port: u16) -> Result<UdpSocket> {
    in_netns(ns, move || id_udp_socket_here(dst, src_port))
}

/// One datagram to an `IdServer` (one retry after 1 s of silence): the answering backend.
pub fn id_udp_ask(sock: &UdpSocket, payload: &[u8]) -> Result<u8> {
    let mut buf = [0u8; 2048];
    let mut last = String::new();
    for _attempt in 0..2 {
        sock.send(payload).context("send")?;
        match sock.recv(&mut buf) {
            Ok(n) if n == payload.len() + 1 && buf[1..n] == *payload => return Ok(buf[0]),
            Ok(n) => {
                last = format!("unexpected answer {:?}", String::from_utf8_lossy(&buf[..n]));
            }
            Err(e) => last = format!("recv: {e}"),
        }
    }
    Err(anyhow!("no answer after 2 attempts ({last})"))
}

/// From namespace `ns`: one UDP flow per source port to `dst` (one datagram and its answer).
pub fn id_udp_flows(ns: &str, dst: SocketAddr, src_ports: Range<u16>) -> IdReport {
    let what = format!("UDP {dst} from ports {src_ports:?}");
    in_netns(ns, move || {
        run_id_flows(what, src_ports, |src| {
            let sock = id_udp_socket_here(dst, src)?;
            id_udp_ask(&sock, &flow_payload("id", "udp", src))
        })
    })
}

/// The Internet checksum (RFC 1071) of `parts` laid end to end, each of even length but
/// the last: what goes into an IPv4, ICMP, TCP or UDP checksum field (over a pseudo-header
/// where the protocol has one).
pub fn inet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for bytes in parts {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |b| u32::from(*b));
            sum += hi | lo;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

/// From namespace `ns`: one bare TCP segment with `flags` (0x10: a lone ACK) from
/// `src:src_port` to `dst`, through a raw socket (the kernel adds the IPv4 header). For
/// segments no connection of this host would send, such as a mid-flow ACK of a flow no
/// one tracks; the receiver answers with a RST, which the client's kernel ignores.
pub fn send_raw_tcp_v4(
    ns: &str,
    src: Ipv4Addr,
    src_port: u16,
    dst: std::net::SocketAddrV4,
    flags: u8,
) -> Result<()> {
    let mut seg = [0u8; 20];
    seg[0..2].copy_from_slice(&src_port.to_be_bytes());
    seg[2..4].copy_from_slice(&dst.port().to_be_bytes());
    seg[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    seg[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&8192u16.to_be_bytes());
    // Checksum over the pseudo-header and the segment.
    let csum = inet_checksum(&[&src.octets(), &dst.ip().octets(), &[0, 6, 0, 20], &seg]);
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    in_netns(ns, move || {
        let s =
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).context("raw TCP socket")?;
        let to = SocketAddr::new(IpAddr::V4(*dst.ip()), 0);
        s.send_to(&seg, &SockAddr::from(to))
            .with_context(|| format!("send a raw TCP segment to {dst}"))?;
        Ok(())
    })
}

/// Pins the calling thread (and the threads it spawns afterwards) to CPU `cpu`: XDP on a
/// veth runs on the CPU that sent the frame, so per-CPU datapath state (round-robin
/// positions) then sees one CPU only.
pub fn pin_thread_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it; sched_setaffinity
    // with pid 0 only changes the calling thread's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            bail!(
                "sched_setaffinity(cpu {cpu}): {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(())
}
