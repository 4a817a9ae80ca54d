//! `weir agent`: the start sequence and the owner loop.
//!
//! Start: everything that can be checked is checked before the datapath is touched (kernel,
//! interface, state file, listen addresses); then the pin directory is locked (one agent per
//! datapath), the object loaded with its maps pinned, an earlier agent's state adopted, the
//! maps written, and the XDP link attached or adopted. A start that fails removes what it
//! created, and nothing else.
//!
//! Run: one task owns the datapath ([`owner::Agent`]); the API server, the health checker,
//! the metrics endpoint, timers and signals send it messages. A panic in any task ends the
//! process loudly (exit 70) rather than leaving a half-working agent: the datapath stays
//! pinned, and the service manager starts a new agent that adopts it.
//!
//! Lifecycle: the XDP link and the maps are pinned under `[agent] bpffs`, so stopping or
//! killing the agent leaves the datapath forwarding with its last tables. Its BGP
//! announcements (`[announce]`, [`crate::announce`]) do not outlive it: SIGTERM withdraws
//! them, and any other end takes their TUN device and routes with the process. A new agent adopts
//! the pins (same maps, the link updated atomically to its program), reconciles them with
//! its config and overlay, and resumes health checks without resetting tracked flows.
//! `weir teardown` detaches and removes the pins.

pub mod conns;
pub mod desired;
pub mod owner;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::programs::Xdp;
use lb_common::prog_name;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use self::{
    desired::{Health, Observed},
    owner::Agent,
};
use crate::{
    announce::Announcer,
    api::server::{ApiCall, ApiSocket},
    audit::{AuditLog, Outcome, Record, Rotation, Who},
    config::Config,
    datapath::{
        self, KernelMaps, MapWriter as _,
        nexthop::{enable_forwarding, warm_neighbours},
        pin::{self, PinDir},
    },
    health::HealthChecker,
    metrics::{self, Metrics},
    overlay::Overlay,
    reconcile::{Adopted, Balancer, RingInput},
    sys,
};

/// The oldest kernel the datapath loads on: `bpf_loop` (fullnat's SNAT probes) came with
/// 5.17 (`bpf_ktime_get_coarse_ns` with 5.11, XDP `bpf_link`, which pinning needs, with 5.9).
pub const MIN_KERNEL: (u32, u32) = (5, 17);

/// Exit status of an agent that stopped because one of its tasks panicked (`EX_SOFTWARE`).
pub const EX_SOFTWARE: i32 = 70;

/// Makes a panic in any thread or task end the process with [`EX_SOFTWARE`] after logging
/// it: tokio would otherwise keep the agent running with the panicked task silently gone
/// (no health checks, say, while everything looks alive).
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(
            panic = %info,
            "a task of the agent panicked: exiting (status 70) so the service manager restarts it; \
             the pinned datapath keeps forwarding meanwhile"
        );
        default(info);
        std::process::exit(EX_SOFTWARE);
    }));
}

fn check_kernel() -> anyhow::Result<()> {
    if let Some(version) = sys::kernel_version() {
        anyhow::ensure!(
            version >= MIN_KERNEL,
            "this kernel is {}.{}; the datapath needs Linux {}.{} or newer (bpf_loop)",
            version.0,
            version.1,
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    Ok(())
}

/// What a failed start must undo: the API socket and the pins it created.
struct StartGuard<'a> {
    pins: &'a PinDir,
    socket: &'a ApiSocket,
    armed: bool,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Pins an earlier agent left stay: they are a datapath someone runs.
            self.pins.undo_fresh_pins();
            self.socket.remove_if_ours();
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. The datapath stays attached afterwards.
/// What `fullnat` needs of the host before the datapath is touched: every SNAT address
/// assigned to an interface of this namespace (or nobody answers ARP/ND for it, and the
/// replies never arrive), and the SNAT ports kept from the kernel's ephemeral ports
/// (`datapath::ports`).
fn check_fullnat(config: &Config) -> anyhow::Result<()> {
    let fullnat: Vec<_> = config
        .services
        .iter()
        .filter(|s| s.forwarding == crate::config::Forwarding::Fullnat)
        .collect();
    if fullnat.is_empty() {
        return Ok(());
    }
    let local = sys::local_addresses();
    for service in &fullnat {
        if let Some(addr) = service.snat_addresses.iter().find(|a| !local.contains(a)) {
            anyhow::bail!(
                "service {:?}: SNAT address {addr} is not assigned to any interface of this \
                 network namespace; the backends' replies to it would not reach the balancer \
                 (add it to an interface, e.g. `ip addr add {addr}/32 dev {}`)",
                service.name,
                config.agent.interface()
            );
        }
    }
    datapath::ports::reserve(
        config.agent.snat_ports,
        config.agent.reserve_snat_ports,
        &config.agent.state_file,
        &config.agent.bpffs,
    )
}

pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    exit_on_panic();
    let interfaces = config.agent.interfaces.clone();
    let interface = config.agent.interface().to_owned();
    tracing::info!(config = %config_path.display(), interfaces = %interfaces.join(","), services = config.services.len(), "starting");
    // Everything that can be checked before touching the datapath.
    check_kernel()?;
    for name in &interfaces {
        datapath::ifindex(name)?;
    }
    let overlay = Overlay::load(&config.agent.state_file)?;
    check_fullnat(&config)?;
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(Metrics::new(&registry)?);
    let metrics_listener = tokio::net::TcpListener::bind(config.agent.metrics)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", config.agent.metrics))?;
    // Opened before the datapath is touched: an audit path the agent may not write (a file
    // it did not create) stops it here.
    let audit = AuditLog::start(
        &config.agent.audit_log,
        Rotation {
            max_bytes: config.agent.audit_max_bytes,
            keep: config.agent.audit_keep,
        },
        metrics.audit_counters(),
    )
    .with_context(|| format!("opening the audit log {}", config.agent.audit_log.display()))?;
    // The remote API's certificate, key and port are checked here too.
    let remote_api = config
        .api
        .as_ref()
        .map(crate::api::remote::RemoteApi::bind)
        .transpose()?;

    let pins = PinDir::prepare(&config.agent.bpffs)?;
    // Held until the process exits: a second agent on this datapath is refused here,
    // before it touches a socket or a map.
    let _lock = pins.lock()?;
    let api_socket = match ApiSocket::bind(&config.agent.api_socket) {
        Ok(socket) => socket,
        Err(err) => {
            pins.undo_fresh_pins();
            return Err(err);
        }
    };
    let mut guard = StartGuard {
        pins: &pins,
        socket: &api_socket,
        armed: true,
    };
    // The announce device before the datapath: a device name another agent holds stops
    // this one here. Its routes come only once the program is attached (`announce_ready`).
    let announcer = config
        .announce
        .as_ref()
        .map(|announce| Announcer::start(announce, overlay.announce_withdrawn))
        .transpose()?;

    let mut ebpf = datapath::load_object_pinned(
        config.agent.conntrack_entries,
        config.agent.half_open_entries,
        config.agent.nat_connections,
        &config.agent.bpffs,
    )
    .with_context(|| {
        if pins.existing_pins.is_empty() {
            "loading the datapath".to_owned()
        } else {
            format!(
                "loading the datapath over the maps pinned under {} (an earlier build whose map                  layout differs cannot be adopted: `weir teardown --bpffs {}` first, a short                  outage)",
                config.agent.bpffs.display(),
                config.agent.bpffs.display()
            )
        }
    })?;
    datapath::load_program(&mut ebpf, prog_name::BALANCER)?;
    let maps = KernelMaps::take(&mut ebpf)?;
    let nat_wanted = datapath::nat_table_entries(config.agent.nat_connections);
    if maps.nat_capacity() != nat_wanted {
        tracing::warn!(
            entries = maps.nat_capacity(),
            configured = nat_wanted,
            "the pinned NAT table keeps its size; nat_connections applies after `weir teardown`"
        );
    }
    // Maps left by an earlier agent are adopted even without its link (a start that died
    // between pinning the maps and the link): a fresh balancer over full maps would leave
    // their VIPs behind.
    let adopting = pins.existing_pins.contains(&lb_common::map_name::VIPS);
    let (balancer, health) = adopt(maps, adopting, &config)?;

    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let mut agent = Agent {
        config,
        config_path,
        overlay,
        observed: Observed {
            health,
            up_since: HashMap::new(),
        },
        balancer,
        checker: HealthChecker::new(health_tx),
        metrics: Arc::clone(&metrics),
        started: Instant::now(),
        adopted: adopting,
        xdp_mode: None,
        last_reload: None,
        inconsistent: None,
        rings_changed: true,
        nat_orphans: std::collections::HashSet::new(),
        announcer,
        fingerprints_published: false,
        unsettled: std::collections::HashSet::new(),
        settle_deadline: None,
        nat_table: None,
        conntrack_table: None,
        audit: audit.clone(),
    };
    let report = agent.sync()?;
    tracing::info!(
        ring_slots = report.ring_slots_written,
        backends = report.backends_written,
        vips = report.vips_written,
        "maps written"
    );
    // Redirect targets: every interface but lo, as far as the devmap holds them (a host
    // with more interfaces than MAX_TX_PORTS still starts; packets that would leave by one
    // left out are dropped and counted as redirect drops).
    for (name, index) in sys::interfaces() {
        if name != "lo"
            && let Err(err) = agent.balancer.maps_mut().set_tx_port(index)
        {
            tracing::warn!(interface = %name, error = %err, "not registered as a redirect target");
        }
    }
    let any_v6 = agent.all_backend_addresses().iter().any(IpAddr::is_ipv6);
    for name in &interfaces {
        enable_forwarding(name, any_v6)?;
    }
    warm_neighbours(&agent.all_backend_addresses());

    let program: &mut Xdp = ebpf
        .program_mut(prog_name::BALANCER)
        .context("balancer program")?
        .try_into()?;
    // The same program on every interface: a packet arriving on one arm leaves by the one
    // its next hop is on (`XDP_TX` or a `TX_PORTS` redirect).
    let mut pin_names = Vec::with_capacity(interfaces.len());
    for (index, name) in interfaces.iter().enumerate() {
        let pin_name = datapath::link_pin(index, name);
        let attached = pin::attach_pinned(
            program,
            &agent.config.agent.bpffs,
            name,
            &pin_name,
            agent.config.agent.xdp_mode,
        )?;
        if index == 0 {
            agent.xdp_mode = attached.mode;
        }
        tracing::info!(interface = %name, pin = %pin_name, mode = attached.mode_name(), adopted = attached.adopted(), bpffs = %agent.config.agent.bpffs.display(), "XDP balancer attached and pinned");
        pin_names.push(pin_name);
    }
    guard.armed = false;
    drop(guard);
    pin::detach_other_links(&agent.config.agent.bpffs, &pin_names)?;

    let (api_tx, mut api_rx) = mpsc::channel::<ApiCall>(64);
    let remote_task = remote_api.map(|remote| {
        let (tx, audit) = (api_tx.clone(), audit.clone());
        tokio::spawn(async move {
            if let Err(err) = remote.serve(tx, audit).await {
                tracing::error!(error = %err, "the remote API stopped");
            }
        })
    });
    let api_task = tokio::spawn(crate::api::server::serve(api_socket.listener()?, api_tx));
    let (snapshot_tx, mut snapshot_rx) = mpsc::channel::<owner::SnapshotReply>(8);
    // Called by the collector on a blocking thread (metrics::http gathers there).
    metrics.set_snapshot_source(Box::new(move || {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        snapshot_tx.blocking_send(reply).ok()?;
        answer
            .recv_timeout(metrics::http::SNAPSHOT_TIMEOUT)
            .ok()
            .flatten()
    }));
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, registry));
    agent.announce_ready();
    tracing::info!(api = %agent.config.agent.api_socket.display(), remote_api = ?agent.config.api.as_ref().map(|a| a.listen), metrics = %agent.config.agent.metrics, "ready");
    audit.record(
        Record::new(Who::agent("start"), "agent_start", Outcome::Ok).change(
            serde_json::Value::Null,
            serde_json::json!({
                "pid": std::process::id(),
                "config": agent.config_path.display().to_string(),
                "adopted": agent.adopted,
                "services": agent.config.services.len(),
            }),
        ),
    );

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut warm = tokio::time::interval(Duration::from_secs(5));
    let mut ramp = tokio::time::interval(Duration::from_secs(1));
    let mut reconcile = tokio::time::interval(Duration::from_secs(5));
    // The connection-table walk runs on a blocking thread; its counts come back here. One
    // at a time: a walk slower than the interval skips ticks rather than piling up.
    let (recount_tx, mut recount_rx) = mpsc::channel::<owner::RecountResult>(1);
    let mut recounting = false;
    // Rings for "one backend down" are computed on a blocking thread after each change, so
    // a health verdict finds its ring ready (reconcile::rings).
    let (rings_tx, mut rings_rx) = mpsc::channel::<Vec<(RingInput, Arc<Vec<u32>>)>>(1);
    let mut precomputing = false;
    loop {
        if agent.rings_changed && !precomputing {
            agent.rings_changed = false;
            let inputs = agent.balancer.rings_to_precompute();
            if !inputs.is_empty() {
                precomputing = true;
                let tx = rings_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let rings = inputs
                        .into_iter()
                        .map(|input| {
                            let ring = Arc::new(input.build());
                            (input, ring)
                        })
                        .collect();
                    let _ = tx.blocking_send(rings);
                });
            }
        }
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let _ = agent.reload(&Who::agent("sighup"));
            }
            Some(event) = health_rx.recv() => agent.on_health(event),
            Some(ApiCall { request, who, reply }) = api_rx.recv() => match agent.conn_job(&request) {
                // `weir conn`: the NAT table is walked on a blocking thread, which answers
                // (and records a flush in the audit log).
                Some(Ok(job)) => {
                    let audit = agent.audit.clone();
                    tokio::task::spawn_blocking(move || {
                        let answer = job.run();
                        if request.is_change() {
                            let after = answer
                                .data
                                .as_ref()
                                .and_then(|d| serde_json::to_value(d).ok())
                                .unwrap_or_default();
                            audit.record(owner::response_record(&who, &request, serde_json::Value::Null, after, &answer));
                        }
                        let _ = reply.send(answer);
                    });
                }
                Some(Err(answer)) => {
                    if request.is_change() {
                        agent.audit.record(owner::response_record(&who, &request, serde_json::Value::Null, serde_json::Value::Null, &answer));
                    }
                    let _ = reply.send(answer);
                }
                None => {
                    let _ = reply.send(agent.handle(request, &who));
                }
            },
            Some(reply) = snapshot_rx.recv() => {
                // Room for one answer: never blocks the owner.
                let _ = reply.try_send(agent.snapshot());
            }
            _ = warm.tick() => {
                warm_neighbours(&agent.all_backend_addresses());
                agent.verify_announcements();
            }
            _ = ramp.tick() => {
                agent.ramp_step();
                agent.settle_step();
            }
            _ = reconcile.tick(), if !recounting => {
                if let Some(job) = agent.recount_job() {
                    recounting = true;
                    let tx = recount_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.blocking_send(job.run());
                    });
                }
            }
            Some(rings) = rings_rx.recv() => {
                precomputing = false;
                agent.balancer.add_rings(rings);
            }
            Some(result) = recount_rx.recv() => {
                recounting = false;
                agent.apply_recount(result);
            }
        }
    }
    agent.announce_stop();
    if pins.private_mount {
        tracing::warn!(%interface, "stopping; the bpffs holding the pins is private to this agent's mount namespace, so the XDP program and its maps go away with it");
    } else {
        tracing::info!(%interface, "stopping; the datapath stays attached (pinned); `weir teardown` removes it");
    }
    api_task.abort();
    if let Some(task) = remote_task {
        task.abort();
    }
    metrics_task.abort();
    api_socket.remove_if_ours();
    audit.record(
        Record::new(Who::agent("stop"), "agent_stop", Outcome::Ok).change(
            serde_json::json!({"pid": std::process::id()}),
            serde_json::Value::Null,
        ),
    );
    // What was queued is written before the process exits, unless the disk hangs.
    audit.close(Duration::from_secs(2));
    Ok(())
}

/// Takes over what an earlier agent left in the pinned maps, if anything: ids, generations
/// and rings stay, so tracked flows do too. Returns the balancer and the health each
/// adopted backend had (up or down) so checks resume from there.
fn adopt(
    maps: KernelMaps,
    adopting: bool,
    config: &Config,
) -> anyhow::Result<(Balancer<KernelMaps>, HashMap<desired::BackendKey, Health>)> {
    let mut balancer = Balancer::new(maps);
    let mut health = HashMap::new();
    if !adopting {
        return Ok((balancer, health));
    }
    let adopted = Adopted {
        vips: balancer.maps().read_vips()?,
        vip_addrs: balancer.maps().read_vip_addrs()?,
        frag_services: balancer.maps().read_frag_services()?,
        source_rules: balancer.maps().read_source_rules()?,
        backends: balancer.maps().read_backends()?,
    };
    // The ring reader borrows the maps while `adopt` mutates the balancer's own state:
    // read the rings first.
    let mut rings = HashMap::new();
    for (_, info) in &adopted.vips {
        rings.insert(
            info.service_id,
            balancer.maps().read_ring(info.service_id, info.ring_size)?,
        );
    }
    let specs = desired::plain(config).services;
    let known = balancer.adopt(&adopted, &specs, |id, _| {
        Ok(rings.remove(&id).unwrap_or_default())
    })?;
    for (service, address, up) in known {
        health.insert(
            (service, address),
            if up { Health::Up } else { Health::Down },
        );
    }
    tracing::info!(
        services = adopted.vips.len(),
        backends = adopted.backends.len(),
        "adopting the pinned datapath"
    );
    Ok((balancer, health))
}
