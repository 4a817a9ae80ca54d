//! `cargo xtask demo`: a real `weir agent` balancing HTTP requests over three backends, in
//! network namespaces the demo creates and removes again:
//!
//! ```text
//!  ns weirdemo-cli         ns weirdemo-sw (bridge br0)          ns weirdemo-bN (N = 1..3)
//!  eth0 198.51.100.2 ─veth─ pcli ──┐               ┌── pbN ─veth─ eth0 198.51.100.1N,
//!                                  br0 ── plb ─┐   │              VIP 203.0.113.10/32 on lo,
//!                                              │                  HTTP server, weir decap
//!                                              └─veth─ ns weirdemo-lb: eth0 198.51.100.1,
//!                                                      weir agent (config/demo.toml)
//! ```
//!
//! The agent runs with `nsenter --net` (not `ip netns exec`, whose private mount namespace
//! would take the agent's bpffs pins along when it exits), checks the backends over HTTP,
//! answers on its own API socket (`/run/weir-demo/weir.sock`) and serves Prometheus metrics
//! on 127.0.0.1:9650 inside the namespace weirdemo-lb. The demo sends 1,000 requests, shows
//! the distribution, the metrics and `weir backend list`, then stops one backend, shows the
//! health check taking it out and the traffic moving, and starts it again.
//!
//! The namespaces, the bridge and the veth pairs are the test bed's topology (`weir_testbed`,
//! which the privileged tests build too), IPv4 only. Traffic stays between these namespaces,
//! over veth pairs the demo creates: nothing is added to the root namespace, and only the
//! documentation ranges 198.51.100.0/24 and 203.0.113.0/24 are used. Everything is torn down at the end (the agent's pins with
//! `weir teardown`), on failure and on Ctrl-C, unless `--keep` is given; `--clean` removes
//! what a kept (or killed) demo left behind. Every wait and every loop is bounded in count
//! and time.
//!
//! `--nat` tells the same story in `forwarding = "fullnat"` (config/demo-nat.toml): the
//! backends run Debian's stock nginx on port 8080 and nothing of Weir (no VIP, no decap, no
//! route beyond their own subnet); the client sits on a subnet of its own
//! (203.0.113.130/25) behind the balancer, which translates it to its own address.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use weir_testbed::{
    CLIENT_V4, LB_V4, Layout, Stack, Topology, backend_v4, ip, ns_exec, remove_namespace,
    try_in_netns,
};

use crate::{cmd, setup};

/// Prefix of everything the demo creates: namespaces and the temporary folder.
const PREFIX: &str = "weirdemo-";
/// The prefix of the test bed's topology: its namespaces are `weirdemo-{cli,sw,lb,b1,b2,b3}`.
const TOPOLOGY: &str = "weirdemo";
const NS_CLI: &str = "weirdemo-cli";
const NS_SW: &str = "weirdemo-sw";
const NS_LB: &str = "weirdemo-lb";
const NS_BACKENDS: [&str; 3] = ["weirdemo-b1", "weirdemo-b2", "weirdemo-b3"];

/// Every node's veth end inside its namespace (config/demo.toml names it).
const NODE_IF: &str = weir_testbed::NODE_IF;
/// The switch-side port of the balancer's veth.
const SWITCH_LB_PORT: &str = weir_testbed::SWITCH_LB_PORT;

/// The VIP of config/demo.toml, on the backends' `lo`.
const VIP: Ipv4Addr = weir_testbed::VIP_V4;
const HTTP_PORT: u16 = 80;
/// The VIP of the decap program that serves as the pass program on the switch port: an
/// address no service uses, so that program decapsulates nothing. (Giving it the demo's VIP
/// would unwrap the balancer's tunnelled packets at the switch instead of at the backends.)
const SWITCH_PASS_VIP: &str = "203.0.113.254";

/// The agent's config, relative to the workspace root.
const CONFIG: &str = "config/demo.toml";
/// The agent's config of `--nat`.
const CONFIG_NAT: &str = "config/demo-nat.toml";
/// `--nat`: the port the backends' nginx listens on (`backend.port`; the VIP's is 80).
const NAT_BACKEND_PORT: u16 = 8080;
/// The service of config/demo.toml.
const SERVICE: &str = "web";
/// Where config/demo.toml puts the agent's socket and state file (a test checks that they
/// agree): the demo's own, never a real agent's.
const RUN_DIR: &str = "/run/weir-demo";
const API_SOCKET: &str = "/run/weir-demo/weir.sock";
/// Where config/demo.toml pins the agent's XDP link and maps.
const BPFFS: &str = "/sys/fs/bpf/weir-demo";
/// The agent's metrics endpoint inside the namespace weirdemo-lb.
const METRICS_URL: &str = "http://127.0.0.1:9650/metrics";

/// Requests of the main run, and of each phase of the backend-down run.
const REQUESTS: usize = 1000;
const PHASE_REQUESTS: usize = 300;
/// Allowed deviation of each backend's share from an even split.
const TOLERANCE: f64 = 0.20;
/// Per-request connect/read/write timeout (like `curl --max-time 2`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A batch of requests stops after this long, or when its first `GIVE_UP_AFTER` all fail.
const BATCH_DEADLINE: Duration = Duration::from_secs(45);
const GIVE_UP_AFTER: usize = 20;

/// How long the agent may take to attach its XDP program.
const AGENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the decap programs and the HTTP servers may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the health checks may take to mark a backend up or down (config/demo.toml
/// checks every 500 ms; rise and fall are 2).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

const STEPS: usize = 11;

const NOT_ROOT: &str = "cargo xtask demo needs root (it creates network namespaces and attaches \
                        XDP programs); run it as root";

pub(crate) fn demo(keep: bool, clean: bool, nat: bool) -> anyhow::Result<ExitCode> {
    if !cmd::is_root() {
        eprintln!("{NOT_ROOT}");
        return Ok(ExitCode::FAILURE);
    }
    install_signal_handlers();
    if clean {
        return clean_up().map(|()| ExitCode::SUCCESS);
    }

    let prepared = (|| {
        // Setup first: on a fresh machine it is what installs the tools the checks after it
        // look for (issue 9). Only what no package provides is checked before it.
        step(1, "checking the kernel, running setup, checking the tools");
        kernel_support()?;
        setup::setup()?;
        let tools = prerequisites(nat)?;

        step(2, "building weir");
        let weir = build_weir(false)?;
        println!("      weir: {}", weir.display());
        let config = cmd::workspace_root().join(if nat { CONFIG_NAT } else { CONFIG });
        let checked = run(&[path_str(&weir)?, "config", "check", path_str(&config)?])?;
        println!("      {}", checked.trim());
        check_interrupted()?;
        anyhow::Ok((tools, weir, config))
    })();
    let (tools, weir, config) = match prepared {
        Ok(prepared) => prepared,
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("\ndemo: interrupted (nothing was created yet)");
            return Ok(ExitCode::from(130));
        }
        Err(err) => return Err(err),
    };

    let workdir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
    let _ = fs::remove_dir_all(&workdir);
    fs::create_dir_all(&workdir).with_context(|| format!("create {}", workdir.display()))?;
    let mut demo = Demo {
        weir,
        python: tools.python,
        nginx: tools.nginx,
        nat,
        config,
        workdir,
        topology: None,
        switch_pass: None,
        servers: Vec::new(),
        decaps: Vec::new(),
        agent: None,
        keep: false,
    };
    match demo.run() {
        Ok(()) if keep => {
            demo.keep = true;
            step(STEPS, "leaving everything running (--keep)");
            demo.print_keep_help();
            println!();
            println!("demo: PASSED (left running)");
            Ok(ExitCode::SUCCESS)
        }
        Ok(()) => {
            step(STEPS, "tearing down");
            demo.teardown()?;
            println!();
            println!("demo: PASSED");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let interrupted = INTERRUPTED.load(Ordering::SeqCst);
            if interrupted {
                eprintln!("\ndemo: interrupted; tearing down");
            } else {
                eprintln!("\ndemo: FAILED: {err:#}");
                demo.print_failure_logs();
                eprintln!("demo: tearing down");
            }
            if let Err(teardown) = demo.teardown() {
                eprintln!("demo: teardown: {teardown:#}");
            }
            if interrupted {
                Ok(ExitCode::from(130))
            } else {
                eprintln!("demo: FAILED");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn step(index: usize, what: &str) {
    println!("[{index}/{STEPS}] {what}");
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C
// ---------------------------------------------------------------------------------------------

/// Set by SIGINT, SIGTERM or SIGHUP: every wait and request loop checks it and unwinds, so the
/// teardown runs. The long-running children sit in process groups of their own, so a Ctrl-C
/// on the terminal reaches only this process, which stops them in order.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler) };
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `duration`, waking early (with an error) when interrupted.
fn sleep(duration: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        thread::sleep((deadline - now).min(POLL));
    }
}

// ---------------------------------------------------------------------------------------------
// Prerequisites and build
// ---------------------------------------------------------------------------------------------

/// The programs the demo runs, each with the Debian package that provides it. Every one of
/// these packages is in setup's list (a test checks), and the demo runs setup before it looks
/// for them, so a fresh Debian machine needs nothing but rustup.
pub(crate) const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("sysctl", "procps"),
    ("ping", "iputils-ping"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("nsenter", "util-linux"),
    // `--nat`: the backends' stock web server.
    ("nginx", "nginx"),
];

struct Tools {
    python: PathBuf,
    nginx: PathBuf,
}

/// Root (checked by the caller) and a kernel with BPF: what no package can provide, so the
/// demo says so before setup installs anything.
fn kernel_support() -> anyhow::Result<()> {
    println!("      root: yes");
    let kernel = cmd::output(Command::new("uname").arg("-r")).unwrap_or_else(|| "?".into());
    if !Path::new("/sys/fs/bpf").is_dir() {
        bail!(
            "this kernel ({kernel}) shows no BPF support (/sys/fs/bpf is missing); the demo \
             needs a kernel with BPF and XDP"
        );
    }
    println!("      kernel {kernel} with BPF");
    Ok(())
}

/// The tools (after setup installed their packages), the demo's config, and no leftovers
/// of an earlier demo.
fn prerequisites(nat: bool) -> anyhow::Result<Tools> {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| find_on_path(tool).is_none())
        .map(|(tool, package)| format!("{tool} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        // Setup has just installed the packages, so the usual cause is a PATH without the
        // sbin folders (`su` without `-`).
        bail!(
            "missing tools: {}; setup installs these packages, so check that PATH ({}) has \
             /usr/sbin and /usr/bin",
            missing.join(", "),
            std::env::var("PATH").unwrap_or_default()
        );
    }
    // `ip link help` exits with 255 and prints to stderr.
    let help = Command::new("ip")
        .args(["link", "help"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip link help`")?;
    let help = String::from_utf8_lossy(&help.stderr) + String::from_utf8_lossy(&help.stdout);
    if !help.contains("xdp") {
        bail!("this iproute2 (`ip`) knows nothing about XDP; install a newer iproute2");
    }
    println!("      iproute2 with XDP; ethtool, sysctl, ping, curl, nsenter");
    // The interpreter itself rather than a wrapper script (pyenv's shims), so that the pid
    // the demo stops is the server's.
    let python = run(&[
        "python3",
        "-c",
        "import sys; assert sys.version_info >= (3, 7), 'python >= 3.7 needed'; \
         print(sys.executable); print(sys.version.split()[0])",
    ])
    .context("python3 (for the backends' HTTP servers)")?;
    let mut lines = python.lines();
    let python = PathBuf::from(lines.next().unwrap_or_default().trim());
    if !python.is_file() {
        bail!(
            "python3 reports no usable interpreter path ({})",
            python.display()
        );
    }
    println!(
        "      python {} for the backends' HTTP servers",
        lines.next().unwrap_or("?").trim()
    );
    let leftovers = demo_namespaces()?;
    if !leftovers.is_empty() {
        bail!(
            "namespaces of an earlier demo still exist ({}); remove them with \
             `cargo xtask demo --clean`",
            leftovers.join(", ")
        );
    }
    if Path::new(BPFFS).exists() {
        bail!(
            "the pins of an earlier demo's agent are still in {BPFFS}; remove them with \
             `cargo xtask demo --clean`"
        );
    }
    if UnixStream::connect(API_SOCKET).is_ok() {
        bail!(
            "an agent answers on the demo's socket {API_SOCKET}; stop it with \
             `cargo xtask demo --clean`"
        );
    }
    // Only the demo uses this folder; a killed demo may have left its state file there.
    if Path::new(RUN_DIR).exists() {
        fs::remove_dir_all(RUN_DIR).with_context(|| format!("remove the stale {RUN_DIR}"))?;
    }
    let config = cmd::workspace_root().join(if nat { CONFIG_NAT } else { CONFIG });
    if !config.is_file() {
        bail!("the demo's agent config {} is missing", config.display());
    }
    let nginx = find_on_path("nginx").context("nginx (Debian package nginx)")?;
    Ok(Tools { python, nginx })
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// `cargo build -p lb-userspace --bin weir` (with `--release` if `release`); returns the
/// binary's path as cargo reports it (so `CARGO_TARGET_DIR`, `--target-dir` in cargo config
/// and the like are respected).
pub(crate) fn build_weir(release: bool) -> anyhow::Result<PathBuf> {
    let mut cargo = cmd::cargo();
    cargo.args([
        "build",
        "-p",
        "lb-userspace",
        "--bin",
        "weir",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cargo.arg("--release");
    }
    let line = cmd::display(&cargo);
    println!("$ {line}");
    let output = cargo
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    check_interrupted()?;
    if !output.status.success() {
        bail!("`{line}` failed ({})", output.status);
    }
    weir_executable(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("`{line}` reported no executable for the `weir` binary"))
}

/// The `executable` of the `compiler-artifact` message for the `weir` binary target.
fn weir_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "weir")
        .filter(|message| {
            message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        })
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from))
        .next_back()
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("path is not UTF-8: {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Runs a command to completion; a failure is an error with the command line and its output.
/// Returns stdout.
fn run(args: &[&str]) -> anyhow::Result<String> {
    let (program, rest) = args.split_first().context("empty command")?;
    let output = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", args.join(" ")))?;
    if !output.status.success() {
        check_interrupted()?;
        bail!(
            "`{}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The demo's namespaces that exist now (`ip netns list` prints `NAME` or `NAME (id: N)`).
fn demo_namespaces() -> anyhow::Result<Vec<String>> {
    Ok(run(&["ip", "netns", "list"])?
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// How a process enters its namespace. Both exec the program, so the pid is the program's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enter {
    /// `ip netns exec NS`: the network namespace plus a private mount namespace (with the
    /// namespace's own /sys), for tools that look at /sys/class/net.
    IpNetnsExec,
    /// `nsenter --net=/run/netns/NS`: the network namespace only. The agent runs so: it
    /// pins its XDP link and maps in the host's bpffs, where they outlive it (a private
    /// mount namespace would take them along) and where `weir teardown` finds them.
    Nsenter,
}

/// A long-running process inside a namespace, in a process group of its own, output to a log
/// file.
struct Proc {
    what: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        what: &str,
        (ns, enter): (&str, Enter),
        program: &Path,
        args: &[&str],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = match enter {
            Enter::IpNetnsExec => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]);
                command
            }
            Enter::Nsenter => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{ns}"));
                command
            }
        };
        command
            .arg(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("PYTHONUNBUFFERED", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let line = cmd::display(&command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        println!("      $ {line}   (pid {})", child.id());
        Ok(Self {
            what: what.to_owned(),
            child: Some(child),
            status: None,
            log,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Some(status) once the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.status = Some(status);
        }
        self.status
    }

    fn log_tail(&self, lines: usize) -> String {
        match fs::read_to_string(&self.log) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(err) => format!("<cannot read {}: {err}>", self.log.display()),
        }
    }

    /// `what` exited early (its log is printed with the failure).
    fn died(&self, status: ExitStatus, doing: &str) -> anyhow::Error {
        anyhow::anyhow!("{} exited ({status}) {doing}; see its log below", self.what)
    }

    /// SIGTERM, up to `STOP_GRACE` to exit, then SIGKILL. Returns how it ended.
    fn stop(&mut self) -> Option<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return self.status;
        };
        if self.status.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                self.status = Some(status);
                return self.status;
            }
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still its.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        self.status = Some(status);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => thread::sleep(POLL / 2),
                    _ => {
                        eprintln!("      {} ignored SIGTERM; killing it", self.what);
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

/// Waits until `ip -n NS -d link show dev IF` shows an XDP program; fails if `proc` exits or
/// after `timeout`.
fn wait_xdp(proc: &mut Proc, ns: &str, ifname: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(status) = proc.exited() {
            // Say which step failed; an attach error in the log points at the kernel.
            return Err(proc.died(
                status,
                &format!(
                    "before attaching its XDP program to {ifname} in {ns} (if its log shows an \
                     attach error, this kernel lacks XDP support for veth)"
                ),
            ));
        }
        let link = ip(ns, &["-d", "link", "show", "dev", ifname])?;
        if link.contains("xdp") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} attached no XDP program to {ifname} in {ns} within {timeout:?} (see its \
                 log below); link:\n{}",
                proc.what,
                link.trim(),
            );
        }
        sleep(POLL * 2)?;
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` in `ns`; fails if
/// `proc` exits or after `START_TIMEOUT`.
fn wait_listening(proc: &mut Proc, ns: &str, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        check_interrupted()?;
        if let Some(status) = proc.exited() {
            return Err(proc.died(status, &format!("before listening on port {port} in {ns}")));
        }
        if try_in_netns(ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} does not listen on port {port} in {ns} after {START_TIMEOUT:?} (see its log \
                 below)",
                proc.what,
            );
        }
        sleep(POLL * 2)?;
    }
}

// ---------------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------------

/// Everything the demo started and created; `teardown` (or, as a safety net, `Drop`) stops
/// the processes and deletes the namespaces, which takes their links along.
struct Demo {
    weir: PathBuf,
    python: PathBuf,
    nginx: PathBuf,
    /// `--nat`: fullnat, stock nginx backends, no decap.
    nat: bool,
    config: PathBuf,
    workdir: PathBuf,
    /// The namespaces, bridge and veth pairs, once built.
    topology: Option<Topology>,
    switch_pass: Option<Proc>,
    /// One slot per backend; `None` while that backend's server is stopped.
    servers: Vec<Option<Proc>>,
    decaps: Vec<Proc>,
    agent: Option<Proc>,
    /// Set when `--keep` leaves everything running.
    keep: bool,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.keep {
            // Left running on purpose: the namespaces stay with the processes inside.
            if let Some(topology) = self.topology.take() {
                drop(topology.keep());
            }
        } else if let Err(err) = self.teardown() {
            eprintln!("demo: teardown: {err:#}");
        }
    }
}

fn backend_addr(index: usize) -> String {
    backend_v4(index).to_string()
}

fn backend_name(index: usize) -> String {
    format!("backend-{}", index + 1)
}

impl Demo {
    fn run(&mut self) -> anyhow::Result<()> {
        step(
            3,
            "creating the topology: namespaces weirdemo-{cli,sw,lb,b1,b2,b3}, a bridge, veth pairs",
        );
        self.topology().context("creating the topology")?;

        if self.nat {
            step(
                4,
                &format!(
                    "starting Debian's stock nginx in each backend, on port {NAT_BACKEND_PORT}"
                ),
            );
        } else {
            step(4, "starting an HTTP server in each backend");
        }
        for index in 0..NS_BACKENDS.len() {
            self.start_server(index)?;
        }

        step(
            5,
            &format!(
                "starting weir agent in namespace {NS_LB} with {}",
                if self.nat { CONFIG_NAT } else { CONFIG }
            ),
        );
        self.start_agent()?;

        if self.nat {
            step(
                6,
                "the backends run nothing of Weir: fullnat brings the answers back",
            );
            self.show_stock_backends()?;
        } else {
            step(6, "starting weir decap on the backends");
            self.start_decaps()?;
        }

        step(
            7,
            &format!("sending {REQUESTS} HTTP requests to http://{VIP}/, one connection each"),
        );
        let batch = http_batch(REQUESTS)?;
        batch.print();
        batch.check_even(REQUESTS)?;
        println!("      every request answered; each backend within ±20% of an even share");
        self.show_metrics(&batch)?;
        self.show_backends()?;

        let down = 1;
        let name = backend_name(down);
        step(
            8,
            &format!("stopping {name}'s HTTP server: the health check takes it out, traffic moves"),
        );
        self.backend_down(down)?;

        step(
            9,
            &format!("starting {name}'s HTTP server again: it comes back into the ring"),
        );
        self.backend_up(down)?;

        step(10, "the agent's log");
        if let Some(agent) = &self.agent {
            let log = fs::read_to_string(&agent.log).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|line| {
                    ["XDP balancer attached", "backend health changed", "ready"]
                        .iter()
                        .any(|needle| line.contains(needle))
                })
                .collect();
            for line in &lines[lines.len().saturating_sub(12)..] {
                println!("      | {line}");
            }
        }
        Ok(())
    }

    fn topology(&mut self) -> anyhow::Result<()> {
        // A failed build removes what it created; the built topology is the demo's to tear
        // down.
        if self.nat {
            let topology = Topology::build_fullnat(TOPOLOGY, Stack::Ipv4)?;
            println!(
                "      client {} on a subnet of its own (route to {VIP} via {}), balancer \
                 {LB_V4} on the backends' subnet, backends {}, {}, {} (an address, nothing else)",
                topology.client_v4(),
                weir_testbed::LB_CLIENT_SIDE_V4,
                backend_addr(0),
                backend_addr(1),
                backend_addr(2)
            );
            assert_eq!(topology.layout, Layout::Fullnat);
            self.topology = Some(topology);
        } else {
            self.topology = Some(Topology::build(TOPOLOGY, Stack::Ipv4)?);
            println!(
                "      client {CLIENT_V4} (route to {VIP} via {LB_V4}), balancer {LB_V4}, \
                 backends {}, {}, {} (VIP {VIP} on lo)",
                backend_addr(0),
                backend_addr(1),
                backend_addr(2)
            );
        }

        // On veth, frames sent with XDP_TX reach the peer only when the peer has an XDP
        // program: the balancer's replies to its own veth need one on the switch port. A
        // decap program for an address nothing uses passes every frame unchanged.
        println!(
            "      XDP pass program on the switch port {SWITCH_LB_PORT} (needed for XDP_TX on veth):"
        );
        let mut pass = Proc::spawn(
            &format!("weir decap on {SWITCH_LB_PORT} in {NS_SW}"),
            (NS_SW, Enter::IpNetnsExec),
            &self.weir,
            &[
                "decap",
                "--interface",
                SWITCH_LB_PORT,
                "--vip",
                SWITCH_PASS_VIP,
                // Only the XDP side is wanted here; the bridge port has no SYN-ACKs to clamp.
                "--no-mss-clamp",
            ],
            self.workdir.join("switch-pass.log"),
        )?;
        let attached = wait_xdp(&mut pass, NS_SW, SWITCH_LB_PORT, START_TIMEOUT);
        self.switch_pass = Some(pass);
        attached?;

        // Neighbour entries before traffic (and proof of plain L2/L3 connectivity).
        if let Some(topology) = &self.topology {
            topology.prime_neighbours()?;
        }
        println!(
            "      ping from the balancer to each backend and from the client to the balancer: ok"
        );
        Ok(())
    }

    fn start_server(&mut self, index: usize) -> anyhow::Result<()> {
        if self.nat {
            return self.start_nginx(index);
        }
        let name = backend_name(index);
        let ns = NS_BACKENDS[index];
        let root = self.workdir.join(&name);
        fs::create_dir_all(&root)?;
        fs::write(root.join("index.html"), format!("{name}\n"))?;
        let log = self.workdir.join(format!("{name}-http.log"));
        let mut server = Proc::spawn(
            &format!("the HTTP server of {name}"),
            (ns, Enter::IpNetnsExec),
            &self.python,
            &[
                "-m",
                "http.server",
                "--bind",
                "0.0.0.0",
                "--directory",
                path_str(&root)?,
                &HTTP_PORT.to_string(),
            ],
            log,
        )?;
        let listening = wait_listening(&mut server, ns, HTTP_PORT);
        if self.servers.len() <= index {
            self.servers.resize_with(index + 1, || None);
        }
        self.servers[index] = Some(server);
        listening?;
        println!(
            "      {name} ({ns}, {}) serves \"{name}\" on port {HTTP_PORT}",
            backend_addr(index)
        );
        Ok(())
    }

    /// `--nat`: Debian's nginx on `NAT_BACKEND_PORT`, from a config of the demo's own (it
    /// answers its backend's name, logs into the demo's folder), in the foreground so that
    /// the demo can stop it like any of its processes.
    fn start_nginx(&mut self, index: usize) -> anyhow::Result<()> {
        let name = backend_name(index);
        let ns = NS_BACKENDS[index];
        let dir = self.workdir.join(format!("{name}-nginx"));
        fs::create_dir_all(&dir)?;
        let d = path_str(&dir)?;
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen {NAT_BACKEND_PORT};\n    \
             location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let mut server = Proc::spawn(
            &format!("nginx of {name}"),
            (ns, Enter::IpNetnsExec),
            &self.nginx,
            &[
                "-e",
                path_str(&dir.join("startup.log"))?,
                "-c",
                path_str(&conf_path)?,
            ],
            self.workdir.join(format!("{name}-http.log")),
        )?;
        let listening = wait_listening(&mut server, ns, NAT_BACKEND_PORT);
        if self.servers.len() <= index {
            self.servers.resize_with(index + 1, || None);
        }
        self.servers[index] = Some(server);
        listening?;
        println!(
            "      {name} ({ns}, {}) runs nginx, answering \"{name}\" on port {NAT_BACKEND_PORT}",
            backend_addr(index)
        );
        Ok(())
    }

    /// `--nat`: shows that the backends have nothing of Weir (no XDP program, no route beyond
    /// their subnet), then the first request through the balancer and the address the
    /// answering nginx saw: the balancer's, not the client's.
    fn show_stock_backends(&self) -> anyhow::Result<()> {
        for (index, ns) in NS_BACKENDS.iter().enumerate() {
            let routes = ip(ns, &["route", "show"])?;
            let link = ip(ns, &["-d", "link", "show", "dev", NODE_IF])?;
            if routes.contains("default") || routes.contains("via") || link.contains("xdp") {
                bail!(
                    "{ns} is not a stock backend: routes {routes:?}, link {link:?} (the demo's \
                     fullnat topology must give its backends only an address)"
                );
            }
            println!(
                "      {} ({ns}): `ip route` shows only {}; no XDP program on {NODE_IF}",
                backend_name(index),
                routes.trim()
            );
        }
        let answer = first_request()?;
        let log = self
            .workdir
            .join(format!("{answer}-nginx"))
            .join("access.log");
        let line = fs::read_to_string(&log)
            .with_context(|| format!("reading {}", log.display()))?
            .lines()
            .last()
            .map(str::to_owned)
            .with_context(|| format!("{answer}'s access log is empty"))?;
        println!("      {answer}'s nginx logged: {line}");
        if !line.starts_with(&format!("{LB_V4} ")) {
            bail!(
                "{answer}'s nginx saw the request from someone else than the balancer's SNAT \
                 address {LB_V4}: {line}"
            );
        }
        println!(
            "      it saw the balancer's address {LB_V4} (fullnat's SNAT address), so it \
             answered the balancer, which translated the answer back to the client"
        );
        Ok(())
    }

    fn start_agent(&mut self) -> anyhow::Result<()> {
        let mut agent = Proc::spawn(
            &format!("weir agent in {NS_LB}"),
            (NS_LB, Enter::Nsenter),
            &self.weir,
            &["agent", "--config", path_str(&self.config)?],
            self.workdir.join("agent.log"),
        )?;
        let attached = wait_xdp(&mut agent, NS_LB, NODE_IF, AGENT_TIMEOUT);
        self.agent = Some(agent);
        attached?;
        let link = ip(NS_LB, &["-d", "link", "show", "dev", NODE_IF])?;
        if let Some(line) = link.lines().find(|line| line.contains("xdp")) {
            println!("      {NS_LB} {NODE_IF}: {}", line.trim());
        }

        // The API answers once the agent is ready; the health checks then bring the backends
        // up (a backend of a checked service starts down, and comes up on its first
        // successful check).
        self.wait_backends("the agent's API to answer", AGENT_TIMEOUT, |_| true)?;
        println!("      $ weir status --socket {API_SOCKET}");
        for line in self.weir_cli(&["status"])?.lines() {
            println!("        {line}");
        }
        let took = self.wait_backends(
            "every backend to pass its health check",
            HEALTH_TIMEOUT,
            |backends| backends.len() == NS_BACKENDS.len() && backends.iter().all(|b| b.up),
        )?;
        println!(
            "      all {} backends passed their HTTP health check (GET /) {:.1} s after the \
             agent answered",
            NS_BACKENDS.len(),
            took.as_secs_f64()
        );
        Ok(())
    }

    fn start_decaps(&mut self) -> anyhow::Result<()> {
        // The balancer tunnels (IP-in-IP) to the backends, which drop such packets until
        // weir decap unwraps them: so the VIP must not answer yet.
        match http_get_in(NS_CLI, Duration::from_secs(1))? {
            Err(err) => println!(
                "      before decap, http://{VIP}/ does not answer ({err}), as expected: the \
                 balancer tunnels the packets and the backends cannot unwrap them yet"
            ),
            Ok(name) => bail!(
                "http://{VIP}/ answered ({name}) before weir decap ran on the backends: the \
                 balancer did not tunnel the packets"
            ),
        }
        for (index, ns) in NS_BACKENDS.iter().enumerate() {
            let decap = Proc::spawn(
                &format!("weir decap in {ns}"),
                (ns, Enter::IpNetnsExec),
                &self.weir,
                &["decap", "--interface", NODE_IF, "--vip", &VIP.to_string()],
                self.workdir
                    .join(format!("{}-decap.log", backend_name(index))),
            )?;
            self.decaps.push(decap);
        }
        for (decap, ns) in self.decaps.iter_mut().zip(NS_BACKENDS) {
            wait_xdp(decap, ns, NODE_IF, START_TIMEOUT)?;
        }
        first_request()?;
        Ok(())
    }

    /// `weir ARGS... --socket API_SOCKET`: a command against the demo's agent. The socket is
    /// a file in the host's mount namespace, so no namespace needs entering.
    fn weir_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec![path_str(&self.weir)?];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--socket", API_SOCKET]);
        run(&all)
    }

    /// The backends of the demo's service, as `weir backend list web -o json` reports them.
    fn backends(&self) -> anyhow::Result<Vec<BackendState>> {
        let json = self.weir_cli(&["backend", "list", SERVICE, "--output", "json"])?;
        parse_backends(&json)
    }

    /// Polls `weir backend list` until `done` holds; returns how long that took. Fails if the
    /// agent exits, or after `timeout` (with the last answer).
    fn wait_backends(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[BackendState]) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            check_interrupted()?;
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.exited()
            {
                return Err(agent.died(status, &format!("while waiting for {what}")));
            }
            let last = match self.backends() {
                Ok(backends) if done(&backends) => return Ok(start.elapsed()),
                Ok(backends) => format!("{backends:?}"),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!("waited {timeout:?} for {what}; last answer: {last}");
            }
            sleep(POLL * 2)?;
        }
    }

    /// `weir backend list` as a person would run it.
    fn show_backends(&self) -> anyhow::Result<()> {
        println!("      $ weir backend list --socket {API_SOCKET}");
        for line in self.weir_cli(&["backend", "list"])?.lines() {
            println!("        {line}");
        }
        Ok(())
    }

    /// The agent's Prometheus metrics of the backends, fetched inside the balancer's
    /// namespace; checks that they saw the requests `batch` sent.
    fn show_metrics(&self, batch: &Batch) -> anyhow::Result<()> {
        println!(
            "      $ ip netns exec {NS_LB} curl -s {METRICS_URL} | grep -E \
             '^weir_(backend|service)_'"
        );
        let text = ns_exec(NS_LB, &["curl", "-sS", "--max-time", "5", METRICS_URL])
            .context("fetching the agent's metrics")?;
        let samples: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("weir_backend_") || line.starts_with("weir_service_"))
            .collect();
        if samples.is_empty() {
            bail!("the agent's metrics have no weir_backend_* samples:\n{text}");
        }
        for line in &samples {
            println!("        {line}");
        }
        // Every request was a new connection: a new flow, counted at its backend.
        for index in 0..NS_BACKENDS.len() {
            let name = backend_name(index);
            let answered = batch.answered.get(&name).copied().unwrap_or(0);
            let new_flows = metric_value(
                &text,
                "weir_backend_new_flows_total",
                &[("backend", &backend_addr(index)), ("service", SERVICE)],
            )
            .with_context(|| format!("no weir_backend_new_flows_total sample for {name}"))?;
            if new_flows < answered as f64 {
                bail!(
                    "weir_backend_new_flows_total of {name} is {new_flows}, but {name} \
                     answered {answered} requests"
                );
            }
        }
        println!("      the new-flow counters agree with the responses above");
        Ok(())
    }

    fn backend_down(&mut self, index: usize) -> anyhow::Result<()> {
        let name = backend_name(index);
        let addr = backend_addr(index);
        if let Some(mut server) = self.servers.get_mut(index).and_then(Option::take) {
            server.stop();
        }
        println!("      {name}'s server stopped; waiting for the health check to mark {addr} down");
        let took = self.wait_backends(
            &format!("{name} ({addr}) to be marked down"),
            HEALTH_TIMEOUT,
            |backends| {
                backends
                    .iter()
                    .any(|b| b.address == addr && b.health == "down" && !b.up)
            },
        )?;
        println!(
            "      {name} marked down {:.1} s after its server stopped (fall = 2 failed checks, \
             every 500 ms)",
            took.as_secs_f64()
        );
        self.show_backends()?;
        println!("      sending {PHASE_REQUESTS} requests: all must be answered, none by {name}:");
        let batch = http_batch(PHASE_REQUESTS)?;
        batch.print();
        if batch.failed() > 0 {
            bail!(
                "{} of {PHASE_REQUESTS} requests failed while {name} was down",
                batch.failed()
            );
        }
        if let Some(n) = batch.answered.get(&name) {
            bail!("{name} answered {n} requests while its server was stopped");
        }
        println!("      every request answered by the other backends: the traffic moved");
        Ok(())
    }

    fn backend_up(&mut self, index: usize) -> anyhow::Result<()> {
        let name = backend_name(index);
        let addr = backend_addr(index);
        self.start_server(index)?;
        let took = self.wait_backends(
            &format!("{name} ({addr}) to be marked up"),
            HEALTH_TIMEOUT,
            |backends| {
                backends
                    .iter()
                    .any(|b| b.address == addr && b.health == "up" && b.up)
            },
        )?;
        println!(
            "      {name} marked up {:.1} s after its server started (rise = 2 successful \
             checks)",
            took.as_secs_f64()
        );
        println!("      sending {PHASE_REQUESTS} requests: {name} must get its share again:");
        let batch = http_batch(PHASE_REQUESTS)?;
        batch.print();
        if batch.failed() > 0 {
            bail!(
                "{} of {PHASE_REQUESTS} requests failed after {name} was back",
                batch.failed()
            );
        }
        // An even share is a third; half of that rules out a backend left out of the ring
        // without depending on luck.
        let least = PHASE_REQUESTS / NS_BACKENDS.len() / 2;
        let got = batch.answered.get(&name).copied().unwrap_or(0);
        if got < least {
            bail!("{name} answered only {got} of {PHASE_REQUESTS} requests after it came back");
        }
        println!("      every request answered; {name} receives traffic again");
        Ok(())
    }

    fn print_failure_logs(&self) {
        let procs = self
            .agent
            .iter()
            .chain(&self.decaps)
            .chain(self.servers.iter().flatten())
            .chain(&self.switch_pass);
        for proc in procs {
            eprintln!(
                "----- last lines of the log of {} ({}) -----\n{}",
                proc.what,
                proc.log.display(),
                proc.log_tail(15)
            );
        }
    }

    fn print_keep_help(&self) {
        let weir = self.weir.display();
        let pid = |proc: Option<&Proc>| {
            proc.and_then(Proc::pid)
                .map_or("?".into(), |p| p.to_string())
        };
        let namespaces = self.topology.as_ref().map(Topology::names);
        println!(
            "      everything is still running: namespaces {}",
            namespaces.unwrap_or_default().join(" ")
        );
        println!(
            "      weir agent pid {} (log {}), logs of all processes in {}",
            pid(self.agent.as_ref()),
            self.workdir.join("agent.log").display(),
            self.workdir.display()
        );
        println!("      try:");
        println!("        ip netns exec {NS_CLI} curl http://{VIP}/");
        println!("        {weir} status --socket {API_SOCKET}");
        println!("        {weir} backend list --socket {API_SOCKET}");
        println!("        {weir} stats --watch --socket {API_SOCKET}");
        println!(
            "        {weir} backend drain {SERVICE} {} --socket {API_SOCKET}",
            backend_addr(0)
        );
        println!("        ip netns exec {NS_LB} curl -s {METRICS_URL}");
        println!("        ip -n {NS_LB} -d link show dev {NODE_IF}        # the XDP balancer");
        println!(
            "        ip netns pids {}              # stop one to see its health check fail",
            NS_BACKENDS[1]
        );
        println!("      remove it all with: cargo xtask demo --clean");
    }

    /// Stops every process (SIGTERM, then SIGKILL), removes the agent's pins with
    /// `weir teardown`, deletes the namespaces (their links go with them), the agent's run
    /// folder and the temporary folder, then checks that none of it is left.
    fn teardown(&mut self) -> anyhow::Result<()> {
        let mut stopped = 0;
        // The agent first: it stops health-checking before the servers go.
        let procs = self
            .agent
            .iter_mut()
            .chain(self.servers.iter_mut().flatten())
            .chain(&mut self.decaps)
            .chain(&mut self.switch_pass);
        for proc in procs {
            if proc.child.is_some() {
                proc.stop();
                stopped += 1;
            }
        }
        let mut problems = Vec::new();
        // A stopped agent leaves its XDP link and maps pinned (the datapath keeps
        // forwarding, and a restarted agent takes over): take them out as an operator would.
        if Path::new(BPFFS).exists() {
            let teardown =
                path_str(&self.weir).and_then(|weir| run(&[weir, "teardown", "--bpffs", BPFFS]));
            match teardown {
                Ok(out) => println!(
                    "      $ weir teardown --bpffs {BPFFS}\n        {}",
                    out.trim()
                ),
                Err(err) => {
                    eprintln!("      weir teardown failed ({err:#}); removing the pins directly");
                    if let Err(err) = remove_pins(Path::new(BPFFS)) {
                        problems.push(format!("{err:#}"));
                    }
                }
            }
        }
        // The topology's namespaces, last created first (whatever still runs inside is
        // stopped first).
        let mut deleted = 0;
        if let Some(mut topology) = self.topology.take() {
            deleted += topology.names().len();
            if let Err(err) = topology.teardown() {
                problems.push(format!("{err:#}"));
            }
        }
        // Also any other demo namespace: the demo starts only when none exists, so one left
        // now was created by a topology build interrupted before it could clean up.
        for ns in demo_namespaces().unwrap_or_default() {
            deleted += 1;
            if let Err(err) = remove_namespace(&ns) {
                problems.push(format!("{err:#}"));
            }
        }
        let _ = fs::remove_dir_all(&self.workdir);
        if Path::new(RUN_DIR).exists()
            && let Err(err) = fs::remove_dir_all(RUN_DIR)
        {
            problems.push(format!("remove {RUN_DIR}: {err}"));
        }
        match demo_namespaces() {
            Ok(left) if left.is_empty() => {}
            Ok(left) => problems.push(format!("namespaces left: {}", left.join(" "))),
            Err(err) => problems.push(format!("{err:#}")),
        }
        if Path::new(BPFFS).exists() {
            problems.push(format!("{BPFFS} is still there"));
        }
        if !problems.is_empty() {
            bail!(
                "{}; run `cargo xtask demo --clean` to retry",
                problems.join("; ")
            );
        }
        if deleted > 0 || stopped > 0 {
            println!(
                "      stopped {stopped} process{}, deleted {deleted} namespace{} (and their \
                 links); no {PREFIX}* namespace, no {BPFFS}, no {RUN_DIR} left",
                if stopped == 1 { "" } else { "es" },
                if deleted == 1 { "" } else { "s" }
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Cleaning up
// ---------------------------------------------------------------------------------------------

/// `--clean`: stops every process in a `weirdemo-*` namespace, deletes those namespaces,
/// removes the agent's pins (what `weir teardown` does: unpinning the link detaches the XDP
/// program), its run folder and the demo's temporary folders.
fn clean_up() -> anyhow::Result<()> {
    let namespaces = demo_namespaces()?;
    let mut removed = 0;
    for ns in &namespaces {
        remove_namespace(ns)?;
        println!("demo --clean: deleted namespace {ns}");
        removed += 1;
    }
    if Path::new(BPFFS).exists() {
        remove_pins(Path::new(BPFFS))?;
        println!("demo --clean: removed the agent's pins in {BPFFS}");
        removed += 1;
    }
    if Path::new(RUN_DIR).exists() {
        fs::remove_dir_all(RUN_DIR).with_context(|| format!("remove {RUN_DIR}"))?;
        println!("demo --clean: removed {RUN_DIR}");
        removed += 1;
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(PREFIX) && entry.path().is_dir() {
                let _ = fs::remove_dir_all(entry.path());
                println!("demo --clean: removed {}", entry.path().display());
                removed += 1;
            }
        }
    }
    let left = demo_namespaces()?;
    if !left.is_empty() {
        bail!("namespaces still there: {}", left.join(" "));
    }
    if removed == 0 {
        println!("demo --clean: nothing to remove");
    } else {
        println!("demo --clean: done; no {PREFIX}* namespace, no {BPFFS}, no {RUN_DIR} left");
    }
    Ok(())
}

/// Removes every pin in `dir` (a folder of the host's bpffs) and the folder. Removing the
/// pin of the XDP link drops the last reference to it once the agent is gone: the program
/// is detached.
fn remove_pins(dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("remove {}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// The agent's answers
// ---------------------------------------------------------------------------------------------

/// One backend in `weir backend list -o json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BackendState {
    address: String,
    /// `up`, `down` or `unchecked`.
    health: String,
    /// Whether the datapath sends it traffic.
    up: bool,
}

fn parse_backends(json: &str) -> anyhow::Result<Vec<BackendState>> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("`weir backend list -o json` printed no JSON")?;
    let list = value
        .as_array()
        .context("`weir backend list -o json` printed no list")?;
    list.iter()
        .map(|backend| {
            Ok(BackendState {
                address: backend["address"]
                    .as_str()
                    .context("a backend without an address")?
                    .to_owned(),
                health: backend["health"]
                    .as_str()
                    .context("a backend without a health")?
                    .to_owned(),
                up: backend["up"].as_bool().context("a backend without `up`")?,
            })
        })
        .collect()
}

/// The value of the sample of metric `name` whose labels include `labels`, from the
/// Prometheus text format.
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        let set = match rest {
            "" => "",
            _ => rest.strip_prefix('{')?.strip_suffix('}')?,
        };
        let all = labels.iter().all(|(key, want)| {
            set.split(',')
                .any(|pair| pair == format!("{key}=\"{want}\""))
        });
        all.then(|| value.parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

/// Outcome of a batch of requests.
#[derive(Debug, Default)]
struct Batch {
    /// Responses per answering backend (the body of its page).
    answered: BTreeMap<String, usize>,
    /// Failures per kind of error.
    errors: BTreeMap<String, usize>,
    sent: usize,
    elapsed: Duration,
}

impl Batch {
    fn failed(&self) -> usize {
        self.errors.values().sum()
    }

    fn print(&self) {
        let share = |n: usize| 100.0 * n as f64 / self.sent.max(1) as f64;
        println!(
            "        {:<12} {:>9} {:>7}",
            "backend", "responses", "share"
        );
        let mut names: Vec<String> = (0..NS_BACKENDS.len()).map(backend_name).collect();
        for name in self.answered.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        for name in &names {
            let n = self.answered.get(name).copied().unwrap_or(0);
            println!("        {name:<12} {n:>9} {:>6.1}%", share(n));
        }
        println!(
            "        {:<12} {:>9} {:>6.1}%",
            "failed",
            self.failed(),
            share(self.failed())
        );
        for (error, n) in &self.errors {
            println!("          {n} × {error}");
        }
        println!(
            "        {:<12} {:>9}   in {:.1} s",
            "total",
            self.sent,
            self.elapsed.as_secs_f64()
        );
    }

    /// Every one of `requests` answered, by the known backends only, each within
    /// `TOLERANCE` of an even share.
    fn check_even(&self, requests: usize) -> anyhow::Result<()> {
        if self.sent != requests || self.failed() > 0 {
            bail!(
                "{} of {requests} requests were not answered",
                requests - (self.sent - self.failed()).min(requests)
            );
        }
        let expected = requests as f64 / NS_BACKENDS.len() as f64;
        let mut uneven = Vec::new();
        for name in (0..NS_BACKENDS.len()).map(backend_name) {
            let n = self.answered.get(&name).copied().unwrap_or(0);
            if (n as f64 - expected).abs() > expected * TOLERANCE {
                uneven.push(format!("{name} answered {n}"));
            }
        }
        if self.answered.len() != NS_BACKENDS.len() {
            uneven.push(format!("answers came from {:?}", self.answered.keys()));
        }
        if !uneven.is_empty() {
            bail!(
                "uneven distribution: {} (expected {expected:.0} ±{:.0}% each)",
                uneven.join(", "),
                TOLERANCE * 100.0
            );
        }
        Ok(())
    }
}

/// `requests` HTTP requests from the client namespace to the VIP, one connection each,
/// sequentially; stops early after `BATCH_DEADLINE`, when interrupted, or when the first
/// `GIVE_UP_AFTER` all fail (what was not sent counts as failed).
fn http_batch(requests: usize) -> anyhow::Result<Batch> {
    let batch = try_in_netns(NS_CLI, || {
        let start = Instant::now();
        let mut batch = Batch::default();
        let mut give_up = None;
        for index in 0..requests {
            if INTERRUPTED.load(Ordering::SeqCst) {
                give_up = Some("interrupted".to_owned());
            } else if start.elapsed() > BATCH_DEADLINE {
                give_up = Some(format!("not sent: {BATCH_DEADLINE:?} deadline passed"));
            } else if index == GIVE_UP_AFTER && batch.answered.is_empty() {
                give_up = Some(format!("not sent: the first {GIVE_UP_AFTER} all failed"));
            }
            if let Some(why) = &give_up {
                *batch.errors.entry(why.clone()).or_default() += requests - index;
                break;
            }
            batch.sent += 1;
            match http_get(REQUEST_TIMEOUT) {
                Ok(name) => *batch.answered.entry(name).or_default() += 1,
                Err(err) => *batch.errors.entry(err).or_default() += 1,
            }
        }
        batch.elapsed = start.elapsed();
        batch
    })?;
    check_interrupted()?;
    Ok(batch)
}

/// The first request through the balancer, as a person would send it (curl in the client's
/// namespace), shown with its answer: the name of the backend that served it.
fn first_request() -> anyhow::Result<String> {
    let curl = [
        "ip",
        "netns",
        "exec",
        NS_CLI,
        "curl",
        "-sS",
        "--max-time",
        "2",
        &format!("http://{VIP}/"),
    ];
    println!("      $ {}", curl.join(" "));
    let answer = run(&curl).context("the first request through the balancer")?;
    let answer = answer.trim().to_owned();
    println!("      {answer}");
    Ok(answer)
}

/// One request from namespace `ns` (for single probes).
fn http_get_in(ns: &str, timeout: Duration) -> anyhow::Result<Result<String, String>> {
    try_in_netns(ns, || http_get(timeout))
}

/// `GET /` on the VIP over a new connection; the answering backend's name (the body), or
/// what went wrong.
fn http_get(timeout: Duration) -> Result<String, String> {
    let addr = SocketAddr::V4(SocketAddrV4::new(VIP, HTTP_PORT));
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|err| describe("connect", &err))?;
    let io = |err: io::Error| describe("request", &err);
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(
            format!("GET / HTTP/1.0\r\nHost: {VIP}\r\nUser-Agent: weir-demo\r\n\r\n").as_bytes(),
        )
        .map_err(io)?;
    let mut response = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(|err| describe("response", &err))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| "response: incomplete".to_owned())?;
    let status = head.lines().next().unwrap_or_default();
    if !(status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200")) {
        return Err(format!("response: {status}"));
    }
    Ok(body.trim().to_owned())
}

fn describe(what: &str, err: &io::Error) -> String {
    let kind = match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => err.to_string(),
    };
    format!("{what}: {kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_weir_executable_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"weir","kind":["lib"]},"executable":null}
{"reason":"build-script-executed","package_id":"x"}
{"reason":"compiler-artifact","target":{"name":"weir","kind":["bin"]},"executable":"/t/debug/weir"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            weir_executable(messages),
            Some(PathBuf::from("/t/debug/weir"))
        );
        assert_eq!(weir_executable("not json\n"), None);
    }

    #[test]
    fn even_check_allows_twenty_percent() {
        let batch = |counts: [usize; 3], failed: usize| Batch {
            answered: counts
                .iter()
                .enumerate()
                .map(|(i, &n)| (backend_name(i), n))
                .collect(),
            errors: if failed > 0 {
                BTreeMap::from([("connect: timed out".to_owned(), failed)])
            } else {
                BTreeMap::new()
            },
            sent: counts.iter().sum::<usize>() + failed,
            elapsed: Duration::ZERO,
        };
        assert!(batch([333, 334, 333], 0).check_even(1000).is_ok());
        assert!(batch([270, 331, 399], 0).check_even(1000).is_ok());
        assert!(batch([260, 340, 400], 0).check_even(1000).is_err());
        assert!(batch([333, 333, 333], 1).check_even(1000).is_err());
    }

    #[test]
    fn addresses_stay_in_the_documentation_ranges() {
        for addr in [CLIENT_V4, LB_V4, backend_v4(0), backend_v4(2)] {
            assert_eq!(addr.octets()[..3], [198, 51, 100], "{addr}");
        }
        assert_eq!(VIP.octets()[..3], [203, 0, 113]);
        assert!(SWITCH_PASS_VIP.starts_with("203.0.113."));
        assert_eq!(backend_addr(1), "198.51.100.12");
    }

    #[test]
    fn the_topologys_namespaces_are_the_demos() {
        let names = weir_testbed::namespace_names(TOPOLOGY);
        let demo: Vec<&str> = [NS_CLI, NS_SW, NS_LB]
            .into_iter()
            .chain(NS_BACKENDS)
            .collect();
        assert_eq!(names, demo);
        assert!(names.iter().all(|ns| ns.starts_with(PREFIX)), "{names:?}");
    }

    #[test]
    fn demo_config_uses_the_demos_own_socket_state_and_pins() {
        let config = fs::read_to_string(cmd::workspace_root().join(CONFIG)).expect("readable");
        for line in [
            format!("api_socket = \"{API_SOCKET}\""),
            format!("state_file = \"{RUN_DIR}/state.json\""),
            format!("bpffs = \"{BPFFS}\""),
            format!("name = \"{SERVICE}\""),
            "metrics = \"127.0.0.1:9650\"".to_owned(),
            "kind = \"http\"".to_owned(),
            format!("vip = \"{VIP}\""),
        ] {
            assert!(
                config.lines().any(|l| l.trim() == line),
                "{CONFIG} lacks `{line}`"
            );
        }
        assert!(API_SOCKET.starts_with(RUN_DIR));
        assert!(METRICS_URL.starts_with("http://127.0.0.1:9650/"));
        for index in 0..NS_BACKENDS.len() {
            let line = format!("address = \"{}\"", backend_addr(index));
            assert!(config.lines().any(|l| l.trim() == line), "{line}");
        }
    }

    #[test]
    fn parses_the_backend_list() {
        let json = r#"[
  {"service": "web", "address": "198.51.100.11", "weight": 1, "admin": "enabled",
   "health": "up", "up": true, "slots": 21846, "packets": 9, "bytes": 900, "new_flows": 2},
  {"service": "web", "address": "198.51.100.12", "weight": 1, "admin": "enabled",
   "health": "down", "up": false, "slots": 0, "packets": 0, "bytes": 0, "new_flows": 0}
]"#;
        let backends = parse_backends(json).expect("parses");
        assert_eq!(
            backends,
            [
                BackendState {
                    address: "198.51.100.11".into(),
                    health: "up".into(),
                    up: true
                },
                BackendState {
                    address: "198.51.100.12".into(),
                    health: "down".into(),
                    up: false
                }
            ]
        );
        assert!(parse_backends("error").is_err());
        assert!(parse_backends(r#"[{"address": "198.51.100.11"}]"#).is_err());
    }

    #[test]
    fn reads_metric_samples() {
        let text = "# HELP weir_backend_new_flows_total New flows.\n\
                    # TYPE weir_backend_new_flows_total counter\n\
                    weir_backend_new_flows_total{backend=\"198.51.100.11\",service=\"web\"} 336\n\
                    weir_backend_new_flows_total{backend=\"198.51.100.12\",service=\"web\"} 0\n\
                    weir_backend_new_flows_total_x{backend=\"198.51.100.13\",service=\"web\"} 5\n\
                    weir_conntrack_hits_total 7\n";
        let flows = |backend: &str| {
            metric_value(
                text,
                "weir_backend_new_flows_total",
                &[("backend", backend), ("service", "web")],
            )
        };
        assert_eq!(flows("198.51.100.11"), Some(336.0));
        assert_eq!(flows("198.51.100.12"), Some(0.0));
        assert_eq!(flows("198.51.100.13"), None);
        assert_eq!(
            metric_value(text, "weir_conntrack_hits_total", &[]),
            Some(7.0)
        );
        assert_eq!(metric_value(text, "weir_conntrack", &[]), None);
    }
}
