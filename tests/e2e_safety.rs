//! Privileged end-to-end tests of what a running agent must never do (issue 9): delete a
//! file that is not its socket, share a datapath with a second agent, leave pins or a socket
//! behind after a failed start, keep running without its health checks after a panic, claim
//! a datapath survives when it does not, or accept CLI changes the config file would refuse;
//! and what the harness itself must not do: leave its namespaces behind when stopped.
//!
//! Each test builds its own topology (see `common/mod.rs`), torn down by `Drop` guards.
//! Needs root; skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_safety -- --test-threads=1 --nocapture`

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use common::{
    Backend, ConfigBuilder, HealthCheck, NODE_IF, ServiceBuilder, Topology, VIP_V4, backend_v4,
    xdp_attached,
};
use weir::api::Request;

const PORT: u16 = 7;

/// The topology's agent config with a direct-mode TCP service on the IPv4 VIP over the
/// three backends (ring of `ring_size` slots), with an optional health check.
fn config(base: ConfigBuilder, ring_size: u32, health: Option<HealthCheck>) -> ConfigBuilder {
    let mut service = ServiceBuilder::new("web", VIP_V4, PORT, "tcp")
        .forwarding("direct")
        .ring_size(ring_size);
    for i in 0..3 {
        service = service.backend(Backend::new(backend_v4(i)));
    }
    if let Some(check) = health {
        service = service.health_check(check);
    }
    base.service(service)
}

/// Waits for a process that must exit by itself; its status and log.
fn wait_exit(child: &mut common::ChildGuard, within: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_status() {
            return (status.code(), child.log());
        }
        assert!(
            Instant::now() < deadline,
            "`weir agent` still runs after {within:?}; log:\n{}",
            child.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Reported: `api_socket = "/srv/app/notes.txt"`, a regular file with data, was silently
/// replaced by the socket and gone after SIGTERM.
#[test]
fn api_socket_never_replaces_a_file() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sf").expect("topology");
    let notes = topo
        .write_file("notes.txt", "the operator's notes\n")
        .expect("notes");
    let path = topo
        .write_agent_config(&config(topo.agent_config().api_socket(&notes), 1009, None))
        .expect("config");
    let mut agent = common::spawn_nsenter(&topo.lb, &["agent", "--config", path.to_str().unwrap()])
        .expect("spawn");
    let (code, log) = wait_exit(&mut agent, Duration::from_secs(15));
    println!("[socket] agent exited {code:?}:\n{log}");
    assert_eq!(code, Some(1), "the agent must refuse to start");
    assert!(
        log.contains("exists and is not a socket"),
        "the error says why: {log}"
    );
    assert_eq!(
        std::fs::read_to_string(&notes).expect("the file is still there"),
        "the operator's notes\n"
    );
    assert!(
        !xdp_attached(&topo.lb, NODE_IF).expect("ip link"),
        "a refused start attached XDP"
    );
    assert!(
        !topo.bpffs().exists(),
        "a refused start left the pin directory {}",
        topo.bpffs().display()
    );
}

/// Reported: a second agent with its own socket and metrics port but the same bpffs and
/// interface adopted the first agent's link and rewrote its maps. And an agent on the same
/// interface with another bpffs failed to attach (EBUSY) but left pins and a socket behind,
/// with a hint about generic mode.
#[test]
fn one_agent_per_datapath() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sg").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let first = topo
        .start_agent(&config(topo.agent_config(), 1009, None))
        .expect("agent");
    let first_pid = first.pid().expect("pid");
    let table = |topo: &Topology| {
        let resp = topo
            .api(&Request::ServiceTable {
                service: "web".into(),
            })
            .expect("api");
        assert!(resp.ok, "{resp:?}");
        resp.data
    };
    let before = table(&topo);

    // Same bpffs and interface, its own socket, metrics port and a different config.
    let second_socket = topo.workdir.join("second.sock");
    let second_config = config(
        topo.agent_config()
            .api_socket(&second_socket)
            .metrics("127.0.0.1:9651".parse().unwrap())
            .state_file(&topo.workdir.join("second-state.json")),
        1013,
        None,
    );
    let path = topo
        .write_file("second.toml", &second_config.render())
        .expect("config");
    let mut second =
        common::spawn_nsenter(&topo.lb, &["agent", "--config", path.to_str().unwrap()])
            .expect("spawn");
    let (code, log) = wait_exit(&mut second, Duration::from_secs(15));
    println!("[lock] second agent exited {code:?}:\n{log}");
    assert_eq!(code, Some(1));
    assert!(
        log.contains(&format!("pid {first_pid}")),
        "the refusal names the first agent's pid {first_pid}: {log}"
    );
    assert!(!second_socket.exists(), "the refused agent left its socket");
    assert_eq!(table(&topo), before, "the first agent's ring changed");

    // Another bpffs, the same interface: the kernel refuses the attach (EBUSY).
    let other_bpffs = format!("{}-other", topo.bpffs().display());
    let third = config(
        topo.agent_config()
            .api_socket(&topo.workdir.join("third.sock"))
            .metrics("127.0.0.1:9651".parse().unwrap())
            .state_file(&topo.workdir.join("third-state.json"))
            .bpffs(Path::new(&other_bpffs)),
        1009,
        None,
    );
    let path = topo
        .write_file("third.toml", &third.render())
        .expect("config");
    let mut third = common::spawn_nsenter(&topo.lb, &["agent", "--config", path.to_str().unwrap()])
        .expect("spawn");
    let (code, log) = wait_exit(&mut third, Duration::from_secs(15));
    println!("[busy] third agent exited {code:?}:\n{log}");
    assert_eq!(code, Some(1));
    assert!(
        log.contains("another XDP program is attached"),
        "the hint names the cause: {log}"
    );
    assert!(
        !log.contains("xdp_mode = \\\"generic\\\"") && !log.contains("try xdp_mode"),
        "the generic-mode hint is wrong here: {log}"
    );
    assert!(
        !Path::new(&other_bpffs).exists(),
        "the failed start left pins in {other_bpffs}"
    );
    assert!(
        !topo.workdir.join("third.sock").exists(),
        "the failed start left its socket"
    );
    assert_eq!(table(&topo), before, "the first agent's ring changed");
    drop(first);
}

/// Reported: `weir backend weight` 0 on every backend made the VIP dead without a word,
/// and loopback or IPv4-mapped backends were accepted from the CLI. The config file's rules
/// hold for CLI changes too; the state file they are kept in is private (0600).
#[test]
fn cli_changes_follow_the_config_rules() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sr").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let _agent = topo
        .start_agent(&config(topo.agent_config(), 1009, None))
        .expect("agent");
    let socket = topo.api_socket();
    let socket = socket.to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut all = vec![common::weir_bin()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--socket", socket]);
        common::run_status(&all).expect("weir")
    };
    let b = |i: usize| backend_v4(i).to_string();
    for i in 0..2 {
        let (code, out, err) = cli(&["backend", "weight", "web", &b(i), "0"]);
        assert_eq!(code, 0, "weight 0 on one backend is fine: {out}{err}");
    }
    let (code, out, err) = cli(&["backend", "weight", "web", &b(2), "0"]);
    println!("[rules] last weight 0 -> {code}: {err}{out}");
    assert_ne!(code, 0, "the last weighted backend must not go to 0");
    assert!(err.contains("zero total weight"), "{err}");
    let (code, _, err) = cli(&["backend", "remove", "web", &b(2)]);
    assert_ne!(
        code, 0,
        "removing the last weighted backend is refused: {err}"
    );
    for bad in ["127.0.0.1", "::1", "::ffff:198.51.100.14"] {
        let (code, _, err) = cli(&["backend", "add", "web", bad]);
        println!("[rules] add {bad} -> {code}: {err}");
        assert_eq!(code, 65, "{bad}: {err}");
    }
    // Traffic still flows to the one weighted backend.
    let resp = topo
        .api(&Request::BackendList {
            service: Some("web".into()),
        })
        .expect("api");
    let list: Vec<weir::api::BackendInfo> = resp.data.expect("data").try_into().expect("list");
    assert_eq!(list.len(), 3);
    assert_eq!(
        list.iter().map(|b| b.effective_weight).sum::<u32>(),
        1,
        "{list:?}"
    );
    let mode = std::fs::metadata(topo.workdir.join("state.json"))
        .expect("state file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "state file mode {mode:o}");
}

/// Reported: a health task panicked (an unbounded interval) and every backend stayed down
/// with no checks running while the agent looked alive. A panicking task now ends the agent
/// loudly (exit 70) and the pinned datapath keeps forwarding for the next agent.
#[test]
fn a_panicking_task_takes_the_agent_down_loudly() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sp").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let path = topo
        .write_agent_config(&config(
            topo.agent_config(),
            1009,
            Some(
                HealthCheck::new("tcp")
                    .interval(Duration::from_millis(200))
                    .timeout(Duration::from_millis(100)),
            ),
        ))
        .expect("config");
    let failpoint = format!("{}=1", weir::health::PANIC_FAILPOINT);
    let mut agent = common::spawn_cmd_nsenter(
        &topo.lb,
        "env",
        &[
            &failpoint,
            common::weir_bin(),
            "agent",
            "--config",
            path.to_str().unwrap(),
        ],
    )
    .expect("spawn");
    let (code, log) = wait_exit(&mut agent, Duration::from_secs(15));
    println!("[panic] agent exited {code:?}:\n{log}");
    assert_eq!(code, Some(70), "exit status of a panicked agent");
    assert!(log.contains("panicked"), "{log}");
    assert!(log.contains("exiting (status 70)"), "{log}");
    assert!(
        xdp_attached(&topo.lb, NODE_IF).expect("ip link"),
        "the pinned datapath must stay attached for the next agent"
    );
}

/// Reported: under `ip netns exec` the agent mounts a bpffs private to its mount namespace,
/// yet said at SIGTERM that the datapath stays attached, while it went away with the process.
#[test]
fn a_private_bpffs_is_called_what_it_is() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("sm").expect("topology");
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let path = topo
        .write_agent_config(&config(topo.agent_config(), 1009, None))
        .expect("config");
    // `ip netns exec`: a private mount namespace with /sys remounted, so no bpffs.
    let mut agent = common::spawn_in_ns(&topo.lb, &["agent", "--config", path.to_str().unwrap()])
        .expect("spawn");
    agent
        .wait_xdp(&topo.lb, NODE_IF, Some(Duration::from_secs(15)))
        .expect("attached");
    let status = agent.stop();
    let log = agent.log();
    println!("[private] agent stopped {status:?}:\n{log}");
    assert!(log.contains("private to this agent"), "{log}");
    assert!(
        !log.contains("the datapath stays attached"),
        "the stop message must not promise what will not happen: {log}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while xdp_attached(&topo.lb, NODE_IF).expect("ip link") {
        assert!(
            Instant::now() < deadline,
            "the program was expected to go with the private bpffs"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A test or bench stopped from outside (Ctrl-C, `timeout`, a cancelled CI job) runs no
/// destructor: with `remove_on_signal` its namespaces, and what runs in them, still go.
/// This test runs itself again as that process (`WEIR_SIGNAL_CHILD` names its namespace):
/// the child makes the namespace, starts a process inside, and waits to be stopped.
/// What the user cares about: the exit says "killed by SIGTERM" (143), the namespace is
/// gone, and the process inside got its SIGTERM (a blocked signal mask, inherited by every
/// process spawned after it, would have made it ignore that and be killed after 3 s).
#[test]
fn a_stopped_run_removes_its_namespaces() {
    use std::{
        io::{BufRead as _, BufReader, Read as _},
        process::{Command, Stdio},
    };
    const CHILD: &str = "WEIR_SIGNAL_CHILD";
    if let Ok(name) = std::env::var(CHILD) {
        common::remove_on_signal().expect("signal handling");
        let ns = common::Netns::create(&name).expect("namespace");
        #[expect(
            clippy::zombie_processes,
            reason = "never waited for: the signal thread stops it and exits this process"
        )]
        let _sleeper = Command::new("ip")
            .args(["netns", "exec", ns.name(), "sleep", "60"])
            .spawn()
            .expect("a process in the namespace");
        while common::run(&["ip", "netns", "pids", ns.name()])
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            thread::sleep(Duration::from_millis(20));
        }
        // On a line of its own: libtest may have begun one with the test's name.
        println!("\nsignal child ready");
        thread::sleep(Duration::from_secs(30));
        panic!("not stopped within 30 s");
    }
    if !common::require_root() {
        return;
    }
    let name = common::prefix("sig");
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "a_stopped_run_removes_its_namespaces",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child run");
    let stdout = child.stdout.take().expect("stdout");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line == "signal child ready");
    let netns = format!("/run/netns/{name}");
    assert!(ready, "the child never got ready");
    assert!(Path::new(&netns).exists(), "the child made no {netns}");
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on our own, not yet reaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().expect("the child's exit");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("its stderr");
    let gone = !Path::new(&netns).exists();
    if !gone {
        // Not left for the next run either way.
        let _ = common::remove_namespace(&name);
    }
    assert_eq!(
        status.code(),
        Some(143),
        "exit after SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        gone,
        "{netns} is still there after SIGTERM; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("stopping process") && !stderr.contains("ignored SIGTERM"),
        "the process in the namespace was not stopped by its SIGTERM; stderr:\n{stderr}"
    );
}
