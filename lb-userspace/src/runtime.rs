//! The running agent: one task owns the datapath (the `Balancer` and its maps), the config,
//! the CLI overlay and the health states; the API server, the health checker, the metrics
//! server and the signal handlers send it messages.
//!
//! Lifecycle: the XDP link and the maps are pinned under `[agent] bpffs`, so stopping or
//! killing the agent leaves the datapath forwarding with its last tables. A new agent adopts
//! the pins (same maps, the link updated atomically to its program), reconciles them with
//! its config and overlay, and resumes health checks without resetting tracked flows.
//! `weir teardown` detaches and removes the pins.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use lb_common::{MAX_BACKENDS, prog_name, stat};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    agent::{Adopted, Balancer, DesiredBackend},
    api::{self, ErrorCode, Request, Response},
    config::{self, Config, HealthKind, MAX_WEIGHT, ServiceConfig},
    datapath::{self, KernelMaps, LINK_PIN, MapWriter as _, StatsReader as _},
    health::{HealthChecker, HealthEvent, Target},
    metrics::Metrics,
    overlay::{Admin, Overlay},
};

/// Messages to the owner task.
enum Command {
    Api(Request, oneshot::Sender<Response>),
    /// A fresh datapath snapshot for a metrics scrape.
    Snapshot(oneshot::Sender<(api::Stats, Vec<api::BackendInfo>)>),
}

/// Health of one backend as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// The service has no health check.
    Unchecked,
    Up,
    Down,
}

impl Health {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Unchecked => "unchecked",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Everything the owner task owns.
struct Agent {
    config: Config,
    config_path: PathBuf,
    overlay: Overlay,
    health: HashMap<(String, IpAddr), Health>,
    balancer: Balancer<KernelMaps>,
    checker: HealthChecker,
    metrics: Arc<Metrics>,
    started: Instant,
    adopted: bool,
    xdp_mode: String,
    last_reload: Option<api::ReloadOutcome>,
    /// When a backend last became eligible for traffic (healthy, enabled, added): the start
    /// of its slow-start ramp.
    up_since: HashMap<(String, IpAddr), Instant>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The port a service's health check probes.
const fn check_port(service: &ServiceConfig) -> u16 {
    match service.health_check.port {
        Some(port) => port,
        None => service.port,
    }
}

impl Agent {
    fn service_config(&self, name: &str) -> Option<&ServiceConfig> {
        self.config.services.iter().find(|s| s.name == name)
    }

    fn health_of(&self, service: &ServiceConfig, address: IpAddr) -> Health {
        if service.health_check.kind == HealthKind::None {
            return Health::Unchecked;
        }
        self.health
            .get(&(service.name.clone(), address))
            .copied()
            .unwrap_or(Health::Down)
    }

    /// Config ⊕ overlay ⊕ health ⊕ backup ⊕ slow start -> what the datapath should do.
    ///
    /// A backend is `up` (tracked flows stay) unless unhealthy or disabled. It takes new
    /// flows if up and enabled (not draining), and, for a backup, only while no primary of
    /// the service takes new flows. During slow start its weight ramps linearly from 1/N.
    fn desired(&self) -> Vec<(ServiceConfig, Vec<DesiredBackend>)> {
        let now = Instant::now();
        self.config
            .services
            .iter()
            .map(|service| {
                let effective = self.overlay.effective(service);
                let up = |b: &crate::overlay::EffectiveBackend| {
                    self.health_of(service, b.address) != Health::Down && b.admin != Admin::Disabled
                };
                let takes_new = |b: &crate::overlay::EffectiveBackend| {
                    up(b) && b.admin == Admin::Enabled && b.weight > 0
                };
                let primary_serving = effective.iter().any(|b| !b.backup && takes_new(b));
                let backends = effective
                    .iter()
                    .map(|b| {
                        let serving = takes_new(b) && (!b.backup || !primary_serving);
                        DesiredBackend {
                            address: b.address,
                            ring_weight: if serving {
                                self.ramped(service, b.address, b.weight, now)
                            } else {
                                0
                            },
                            up: up(b),
                        }
                    })
                    .collect();
                (service.clone(), backends)
            })
            .collect()
    }

    /// A weight during slow start: linear from `weight / 1000` (at least 1) to `weight`.
    fn ramped(&self, service: &ServiceConfig, address: IpAddr, weight: u32, now: Instant) -> u32 {
        if service.slow_start.is_zero() {
            return weight;
        }
        let Some(since) = self.up_since.get(&(service.name.clone(), address)) else {
            return weight;
        };
        let elapsed = now.saturating_duration_since(*since);
        if elapsed >= service.slow_start {
            return weight;
        }
        let share = elapsed.as_secs_f64() / service.slow_start.as_secs_f64();
        ((f64::from(weight) * share).round() as u32).clamp(1, weight.max(1))
    }

    /// One slow-start step (every second): re-applies while any ramp runs, and forgets
    /// ramps only after the step that gave them their full weight.
    fn ramp_step(&mut self) {
        if self.up_since.is_empty() {
            return;
        }
        // Taken before the sync: a ramp is forgotten only if this step's sync, which reads
        // the clock later, gave it its full weight.
        let now = Instant::now();
        if let Err(err) = self.sync() {
            tracing::error!(error = %err, "applying a slow-start step failed");
        }
        let durations: HashMap<String, Duration> = self
            .config
            .services
            .iter()
            .map(|s| (s.name.clone(), s.slow_start))
            .collect();
        self.up_since.retain(|(name, _), since| {
            durations
                .get(name)
                .is_some_and(|d| now.saturating_duration_since(*since) < *d)
        });
    }

    /// Starts a backend's slow-start ramp (it just became eligible for traffic).
    fn start_ramp(&mut self, service: &str, address: IpAddr) {
        if self
            .service_config(service)
            .is_some_and(|s| !s.slow_start.is_zero())
        {
            self.up_since
                .insert((service.to_owned(), address), Instant::now());
        }
    }

    /// Recounts every backend's active connections from the table and writes the counts:
    /// entries the LRU evicted, or that went idle without another packet, never told the
    /// datapath their flow ended.
    fn reconcile_connections(&mut self) {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the struct we pass. CLOCK_MONOTONIC_COARSE is the
        // clock of bpf_ktime_get_coarse_ns, which stamps the table's entries.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut now) };
        let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
        let mut timeouts: HashMap<u32, (u64, u64, u32)> = HashMap::new();
        let mut counts: HashMap<u32, i64> = HashMap::new();
        for state in self.balancer.services() {
            for b in &state.backends {
                timeouts.insert(
                    b.id,
                    (
                        state.config.tcp_idle_timeout.as_nanos() as u64,
                        state.config.udp_idle_timeout.as_nanos() as u64,
                        b.generation,
                    ),
                );
                counts.insert(b.id, 0);
            }
        }
        for (key, value) in self.balancer.maps().conntrack_entries() {
            if value.flags & lb_common::FLOW_COUNTED == 0
                || value.flags & lb_common::FLOW_CLOSED != 0
            {
                continue;
            }
            // An entry of an earlier owner of the id (another generation) is not honoured by
            // the datapath: it is no connection of the current backend.
            let Some((tcp, udp, _)) = timeouts
                .get(&value.backend_id)
                .filter(|(_, _, generation)| *generation == value.generation)
            else {
                continue;
            };
            let timeout = if key.proto == lb_common::PROTO_TCP {
                *tcp
            } else {
                *udp
            };
            if now_ns.saturating_sub(value.last_seen_ns) <= timeout {
                *counts.entry(value.backend_id).or_default() += 1;
            }
        }
        for (id, count) in counts {
            if self.balancer.maps().active_connections(id) != count
                && let Err(err) = self.balancer.maps_mut().set_active_connections(id, count)
            {
                tracing::warn!(backend_id = id, error = %err, "writing a connection count failed");
            }
        }
    }

    /// Writes the difference to the datapath and points the health checker at the current
    /// backends.
    fn sync(&mut self) -> anyhow::Result<crate::agent::ApplyReport> {
        let desired = self.desired();
        let report = self.balancer.apply_desired(&self.config, &desired)?;
        let mut targets = Vec::new();
        for service in &self.config.services {
            if service.health_check.kind == HealthKind::None {
                continue;
            }
            for b in self.overlay.effective(service) {
                let known = self
                    .health
                    .get(&(service.name.clone(), b.address))
                    .map(|h| *h == Health::Up);
                targets.push((
                    Target {
                        service: service.name.clone(),
                        address: b.address,
                        port: check_port(service),
                        spec: service.health_check.clone(),
                    },
                    known,
                ));
            }
        }
        self.checker.set_targets(targets);
        Ok(report)
    }

    fn on_health(&mut self, event: HealthEvent) {
        match event {
            HealthEvent::Checked {
                service,
                address,
                ok,
                duration,
                error,
            } => {
                self.metrics.observe_check(&service, address, ok, duration);
                if let Some(error) = error {
                    tracing::debug!(%service, %address, %error, "health check failed");
                }
            }
            HealthEvent::Transition {
                service,
                address,
                up,
            } => {
                // A task stopped by `set_targets` may still deliver one last event: only
                // backends the agent checks now count.
                let current = self.service_config(&service).is_some_and(|s| {
                    s.health_check.kind != HealthKind::None
                        && self
                            .overlay
                            .effective(s)
                            .iter()
                            .any(|b| b.address == address)
                });
                if !current {
                    tracing::debug!(%service, %address, up, "ignoring a health verdict for a backend no longer checked");
                    return;
                }
                let t = Instant::now();
                if up {
                    // Slow start: a backend that becomes healthy ramps up.
                    self.start_ramp(&service, address);
                }
                self.health.insert(
                    (service.clone(), address),
                    if up { Health::Up } else { Health::Down },
                );
                match self.sync() {
                    Ok(report) => tracing::info!(
                        %service,
                        %address,
                        up,
                        ring_slots_written = report.ring_slots_written,
                        apply_us = t.elapsed().as_micros() as u64,
                        "backend health changed"
                    ),
                    Err(err) => {
                        tracing::error!(%service, %address, error = %err, "applying a health change failed")
                    }
                }
            }
        }
    }

    fn backend_infos(&self, only: Option<&str>) -> Vec<api::BackendInfo> {
        let mut out = Vec::new();
        for service in &self.config.services {
            if only.is_some_and(|o| o != service.name) {
                continue;
            }
            let state = self.balancer.service(&service.name);
            for b in self.overlay.effective(service) {
                let tracked =
                    state.and_then(|s| s.backends.iter().find(|x| x.address == b.address));
                let (slots, counters, up, effective_weight, active_connections) =
                    match (state, tracked) {
                        (Some(s), Some(t)) => (
                            s.ring.iter().filter(|&&id| id == t.id).count() as u32,
                            self.balancer.maps().backend(t.id).unwrap_or_default(),
                            t.up,
                            t.weight,
                            self.balancer.maps().active_connections(t.id),
                        ),
                        _ => (0, Default::default(), false, 0, 0),
                    };
                out.push(api::BackendInfo {
                    service: service.name.clone(),
                    address: b.address,
                    weight: b.weight,
                    admin: b.admin.as_str().to_owned(),
                    health: self.health_of(service, b.address).as_str().to_owned(),
                    up,
                    slots,
                    effective_weight,
                    backup: b.backup,
                    active_connections,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    new_flows: counters.new_flows,
                });
            }
        }
        out
    }

    fn stats(&self) -> api::Stats {
        let global = self
            .balancer
            .maps()
            .global()
            .unwrap_or([0; stat::COUNT as usize]);
        let mut services = Vec::new();
        for state in self.balancer.services() {
            let c = self.balancer.maps().service(state.id).unwrap_or_default();
            services.push(api::TrafficStats {
                service: state.config.name.clone(),
                backend: None,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            });
        }
        let backends = self
            .backend_infos(None)
            .into_iter()
            .map(|b| api::TrafficStats {
                service: b.service,
                backend: Some(b.address),
                packets: b.packets,
                bytes: b.bytes,
                new_flows: b.new_flows,
            })
            .collect();
        api::Stats {
            global: stat::NAMES
                .iter()
                .zip(global)
                .map(|(n, v)| ((*n).to_owned(), v))
                .collect(),
            services,
            backends,
        }
    }

    fn status(&self) -> api::Status {
        let backends = self.backend_infos(None);
        api::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            interface: self.config.agent.interface.clone(),
            xdp_mode: self.xdp_mode.clone(),
            config_file: self.config_path.display().to_string(),
            bpffs: self.config.agent.bpffs.display().to_string(),
            adopted: self.adopted,
            uptime_seconds: self.started.elapsed().as_secs(),
            services: self.config.services.len(),
            backends: backends.len(),
            backends_up: backends.iter().filter(|b| b.up).count(),
            last_reload: self.last_reload.clone(),
        }
    }

    fn reload(&mut self) -> Response {
        let result = config::load(&self.config_path);
        let ok = result.is_ok();
        self.metrics.observe_reload(ok);
        match result {
            Err(err) => {
                tracing::error!(error = %err, "reload rejected: the running config stays in force");
                self.last_reload = Some(api::ReloadOutcome {
                    ok: false,
                    at: now_unix(),
                    error: Some(err.to_string()),
                });
                Response::error(
                    ErrorCode::InvalidConfig,
                    format!("{err} (the running config stays in force)"),
                )
            }
            Ok(new) => {
                if new.agent.interface != self.config.agent.interface
                    || new.agent.bpffs != self.config.agent.bpffs
                    || new.agent.api_socket != self.config.agent.api_socket
                    || new.agent.metrics != self.config.agent.metrics
                {
                    tracing::warn!(
                        "reload: interface, bpffs, api_socket and metrics changes take effect at the next agent start"
                    );
                }
                let old = std::mem::replace(&mut self.config, new);
                // Keep agent-wide settings that need a restart.
                self.config.agent.interface = old.agent.interface.clone();
                self.config.agent.bpffs = old.agent.bpffs.clone();
                self.config.agent.api_socket = old.agent.api_socket.clone();
                self.config.agent.metrics = old.agent.metrics;
                match self.sync() {
                    Ok(report) => {
                        self.forget_removed(&old);
                        self.last_reload = Some(api::ReloadOutcome {
                            ok: true,
                            at: now_unix(),
                            error: None,
                        });
                        tracing::info!(
                            services = self.config.services.len(),
                            ring_slots_written = report.ring_slots_written,
                            "config reloaded"
                        );
                        Response::ok(api::ReloadReport {
                            services: self.config.services.len(),
                            ring_slots_written: report.ring_slots_written,
                            backends_written: report.backends_written,
                        })
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "reload failed while applying; restoring the previous config");
                        self.config = old;
                        let _ = self.sync();
                        Response::error(
                            ErrorCode::Internal,
                            format!("applying the new config failed: {err:#}"),
                        )
                    }
                }
            }
        }
    }

    /// Drops metric series of backends and services that no longer exist.
    fn forget_removed(&self, old: &Config) {
        for service in &old.services {
            match self.service_config(&service.name) {
                None => self.metrics.forget_service(&service.name),
                Some(now) => {
                    let current: Vec<IpAddr> = self
                        .overlay
                        .effective(now)
                        .iter()
                        .map(|b| b.address)
                        .collect();
                    for b in self.overlay.effective(service) {
                        if !current.contains(&b.address) {
                            self.metrics.forget_backend(&service.name, b.address);
                        }
                    }
                }
            }
        }
    }

    /// Applies a change to the overlay: persist first, then apply; on failure nothing
    /// changes.
    fn change(
        &mut self,
        service: &str,
        address: IpAddr,
        edit: impl FnOnce(&mut Overlay),
    ) -> Response {
        let before = self.overlay.clone();
        edit(&mut self.overlay);
        if let Err(err) = self.overlay.save(&self.config.agent.state_file) {
            self.overlay = before;
            return Response::error(ErrorCode::Internal, err.to_string());
        }
        if let Err(err) = self.sync() {
            self.overlay = before;
            let _ = self.overlay.save(&self.config.agent.state_file);
            let _ = self.sync();
            return Response::error(ErrorCode::Internal, format!("{err:#}"));
        }
        match self
            .backend_infos(Some(service))
            .into_iter()
            .find(|b| b.address == address)
        {
            Some(info) => Response::ok(info),
            None => Response::ok(
                serde_json::json!({ "service": service, "address": address, "removed": true }),
            ),
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status {} => Response::ok(self.status()),
            Request::ServiceList {} => {
                let backends = self.backend_infos(None);
                let list: Vec<api::ServiceInfo> = self
                    .config
                    .services
                    .iter()
                    .map(|s| api::ServiceInfo {
                        name: s.name.clone(),
                        vip: s.vip,
                        port: s.port,
                        protocol: s.protocol.as_str().to_owned(),
                        scheduler: s.scheduler.as_str().to_owned(),
                        forwarding: s.forwarding.as_str().to_owned(),
                        ring_size: s.ring_size,
                        health_check: s.health_check.kind.as_str().to_owned(),
                        backends: backends.iter().filter(|b| b.service == s.name).count(),
                        backends_up: backends
                            .iter()
                            .filter(|b| b.service == s.name && b.up)
                            .count(),
                    })
                    .collect();
                Response::ok(list)
            }
            Request::ServiceTable { service } => match self.balancer.service(&service) {
                None => unknown_service(&service),
                Some(state) => {
                    let addresses: Vec<IpAddr> = state.backends.iter().map(|b| b.address).collect();
                    let index: HashMap<u32, i32> = state
                        .backends
                        .iter()
                        .enumerate()
                        .map(|(i, b)| (b.id, i as i32))
                        .collect();
                    let slots: Vec<i32> = state
                        .ring
                        .iter()
                        .map(|id| index.get(id).copied().unwrap_or(-1))
                        .collect();
                    let counts = (0..addresses.len() as i32)
                        .map(|i| slots.iter().filter(|&&s| s == i).count() as u32)
                        .collect();
                    Response::ok(api::ServiceTable {
                        service,
                        ring_size: state.config.ring_size,
                        backends: addresses,
                        counts,
                        slots,
                    })
                }
            },
            Request::BackendList { service } => {
                if let Some(name) = &service
                    && self.service_config(name).is_none()
                {
                    return unknown_service(name);
                }
                Response::ok(self.backend_infos(service.as_deref()))
            }
            Request::BackendAdd {
                service,
                address,
                weight,
            } => {
                let Some(svc) = self.service_config(&service) else {
                    return unknown_service(&service);
                };
                if let Err(reason) = check_backend_address(svc, address) {
                    return Response::error(ErrorCode::InvalidAddress, reason);
                }
                if weight > MAX_WEIGHT {
                    return bad_weight(weight);
                }
                if self
                    .overlay
                    .effective(svc)
                    .iter()
                    .any(|b| b.address == address)
                {
                    return Response::error(
                        ErrorCode::Conflict,
                        format!(
                            "{service} already has backend {address} (use `weir backend weight` to change it)"
                        ),
                    );
                }
                let total: usize = self
                    .config
                    .services
                    .iter()
                    .map(|s| self.overlay.effective(s).len())
                    .sum();
                if total >= MAX_BACKENDS as usize {
                    return Response::error(
                        ErrorCode::Conflict,
                        format!("the datapath holds at most {MAX_BACKENDS} backends"),
                    );
                }
                self.start_ramp(&service, address);
                self.change(&service, address, |o| {
                    let e = o.entry(&service, address);
                    e.added = true;
                    e.removed = false;
                    e.weight = Some(weight);
                    e.admin = None;
                })
            }
            Request::BackendRemove { service, address } => {
                if let Some(resp) = self.require_backend(&service, address) {
                    return resp;
                }
                self.health.remove(&(service.clone(), address));
                self.metrics.forget_backend(&service, address);
                self.change(&service, address, |o| {
                    let e = o.entry(&service, address);
                    e.added = false;
                    e.removed = true;
                })
            }
            Request::BackendWeight {
                service,
                address,
                weight,
            } => {
                if let Some(resp) = self.require_backend(&service, address) {
                    return resp;
                }
                if weight > MAX_WEIGHT {
                    return bad_weight(weight);
                }
                self.change(&service, address, |o| {
                    o.entry(&service, address).weight = Some(weight);
                })
            }
            Request::BackendDrain { service, address } => {
                self.set_admin(service, address, Admin::Draining)
            }
            Request::BackendEnable { service, address } => {
                self.set_admin(service, address, Admin::Enabled)
            }
            Request::BackendDisable { service, address } => {
                self.set_admin(service, address, Admin::Disabled)
            }
            Request::Stats {} => Response::ok(self.stats()),
            Request::Reload {} => self.reload(),
        }
    }

    fn set_admin(&mut self, service: String, address: IpAddr, admin: Admin) -> Response {
        if let Some(resp) = self.require_backend(&service, address) {
            return resp;
        }
        if admin == Admin::Enabled {
            self.start_ramp(&service, address);
        }
        self.change(&service, address, |o| {
            o.entry(&service, address).admin = Some(admin);
        })
    }

    fn require_backend(&self, service: &str, address: IpAddr) -> Option<Response> {
        let Some(svc) = self.service_config(service) else {
            return Some(unknown_service(service));
        };
        if self
            .overlay
            .effective(svc)
            .iter()
            .any(|b| b.address == address)
        {
            None
        } else {
            Some(Response::error(
                ErrorCode::UnknownBackend,
                format!(
                    "service {service} has no backend {address} (see `weir backend list {service}`)"
                ),
            ))
        }
    }
}

fn unknown_service(name: &str) -> Response {
    Response::error(
        ErrorCode::UnknownService,
        format!("unknown service \"{name}\" (see `weir service list`)"),
    )
}

fn bad_weight(weight: u32) -> Response {
    Response::error(
        ErrorCode::BadRequest,
        format!("weight {weight} is out of range (0..={MAX_WEIGHT})"),
    )
}

/// The address rules of the config file, for backends added from the CLI.
fn check_backend_address(service: &ServiceConfig, address: IpAddr) -> Result<(), String> {
    if address.is_unspecified()
        || address.is_multicast()
        || address == IpAddr::V4(Ipv4Addr::BROADCAST)
    {
        return Err(format!(
            "{address} cannot be a backend (unspecified, multicast or broadcast)"
        ));
    }
    if service.forwarding == config::Forwarding::Direct
        && address.is_ipv4() != service.vip.is_ipv4()
    {
        return Err(format!(
            "{address} is not of the VIP's family: direct forwarding (L2 DSR) cannot change the IP header"
        ));
    }
    Ok(())
}

// ----- bpffs, pinning, teardown -----

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` writes into the zeroed struct we pass; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

/// Makes sure `dir` exists on a bpf filesystem, mounting one at `/sys/fs/bpf` if needed
/// (`ip netns exec` hides the host's, for instance).
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: valid C strings; mounting a new bpffs instance has no memory effects.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        anyhow::ensure!(
            rc == 0,
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    anyhow::ensure!(
        is_bpffs(dir),
        "{} is not on a bpf filesystem; set [agent] bpffs to a directory under a bpffs mount",
        dir.display()
    );
    Ok(())
}

/// Detaches the pinned XDP program and removes every pin under `bpffs`.
pub fn teardown(bpffs: &Path) -> anyhow::Result<()> {
    if !bpffs.exists() {
        anyhow::bail!("nothing to tear down: {} does not exist", bpffs.display());
    }
    let link = bpffs.join(LINK_PIN);
    if link.exists() {
        // Unpinning drops the last reference to the link: the program is detached.
        let pinned =
            PinnedLink::from_pin(&link).with_context(|| format!("opening {}", link.display()))?;
        let fd_link = pinned
            .unpin()
            .with_context(|| format!("unpinning {}", link.display()))?;
        drop(fd_link);
    }
    for entry in std::fs::read_dir(bpffs)? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::remove_dir(bpffs).with_context(|| format!("removing {}", bpffs.display()))?;
    Ok(())
}

/// Attaches the balancer: updates the pinned link to this program if an earlier agent left
/// one (atomic replacement, no packet sees no program), otherwise attaches and pins.
fn attach_pinned(program: &mut Xdp, config: &Config) -> anyhow::Result<(String, bool)> {
    let pin = config.agent.bpffs.join(LINK_PIN);
    if pin.exists() {
        // A link left by an earlier agent is adopted only if it still holds our interface.
        let ours = datapath::ifindex(&config.agent.interface)?;
        match datapath::pinned_xdp_link_ifindex(&pin) {
            Ok(Some(index)) if index == ours => {}
            Ok(Some(index)) => anyhow::bail!(
                "{} holds an XDP link on another interface (ifindex {index}, not {});                  run `weir teardown --bpffs {}` or set [agent] bpffs to another directory",
                pin.display(),
                config.agent.interface,
                config.agent.bpffs.display()
            ),
            Ok(None) | Err(_) => {
                tracing::warn!(pin = %pin.display(), "the pinned XDP link is defunct (its interface is gone): replacing it");
                std::fs::remove_file(&pin)
                    .with_context(|| format!("removing {}", pin.display()))?;
            }
        }
    }
    if pin.exists() {
        let pinned =
            PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let link =
            XdpLink::try_from(FdLink::from(pinned)).context("pinned link is not an XDP link")?;
        program
            .attach_to_link(link)
            .context("replacing the program of the pinned XDP link")?;
        return Ok(("adopted".to_owned(), true));
    }
    let (link_id, mode) =
        datapath::attach(program, &config.agent.interface, config.agent.xdp_mode)?;
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP through netlink, which cannot be pinned (needs bpf_link, Linux 5.9+)",
    )?;
    fd_link
        .pin(&pin)
        .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
    Ok((mode.as_str().to_owned(), false))
}

// ----- the API server -----

async fn serve_api(listener: UnixListener, tx: mpsc::Sender<Command>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Err(err) = answer(stream, tx).await {
                        tracing::debug!(error = %err, "API connection failed");
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request (up to a newline or EOF, at most `MAX_REQUEST_BYTES`, within 5 s),
/// gets the owner's answer, writes it.
async fn answer(mut stream: UnixStream, tx: mpsc::Sender<Command>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(true);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > api::MAX_REQUEST_BYTES {
                return Ok(false);
            }
            if buf.contains(&b'\n') {
                return Ok(true);
            }
        }
    })
    .await;
    let response = match read {
        Err(_) => Response::error(ErrorCode::BadRequest, "no complete request within 5 s"),
        Ok(Err(err)) => return Err(err),
        Ok(Ok(false)) => Response::error(
            ErrorCode::BadRequest,
            format!("request larger than {} bytes", api::MAX_REQUEST_BYTES),
        ),
        Ok(Ok(true)) => {
            let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
            match serde_json::from_slice::<Request>(line) {
                Err(err) => {
                    Response::error(ErrorCode::BadRequest, format!("invalid request: {err}"))
                }
                Ok(req) => {
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Command::Api(req, reply)).await.is_err() {
                        Response::error(ErrorCode::Internal, "the agent is shutting down")
                    } else {
                        rx.await.unwrap_or_else(|_| {
                            Response::error(ErrorCode::Internal, "the agent dropped the request")
                        })
                    }
                }
            }
        }
    };
    let mut text = serde_json::to_vec(&response).unwrap_or_default();
    text.push(b'\n');
    stream.write_all(&text).await?;
    stream.shutdown().await
}

fn bind_api(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is answering on {}; stop it first (two agents would fight over the datapath)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

// ----- helpers kept from the first agent -----

/// Interfaces of this network namespace (name, ifindex), from `if_nameindex(3)`.
fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: `if_nameindex` returns a heap array terminated by a zero entry, or NULL; we
    // read it until the terminator and free it once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.push((name, (*entry).if_index));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// `bpf_fib_lookup` answers only for interfaces with forwarding enabled (it reports
/// "forwarding disabled" otherwise), so the agent turns it on for the interface it serves.
fn enable_forwarding(interface: &str, v6: bool) -> anyhow::Result<()> {
    let mut paths = vec![format!("/proc/sys/net/ipv4/conf/{interface}/forwarding")];
    if v6 {
        paths.push(format!("/proc/sys/net/ipv6/conf/{interface}/forwarding"));
    }
    for path in paths {
        std::fs::write(&path, "1").with_context(|| format!("enabling forwarding: {path}"))?;
        tracing::info!(%path, "forwarding enabled (bpf_fib_lookup needs it)");
    }
    Ok(())
}

/// Prompts the kernel to resolve each backend's neighbour entry (ARP/ND), which
/// `bpf_fib_lookup` reads but does not create: an empty datagram to the discard port.
/// Health checks do the same as a side effect; this covers services without them.
fn warm_neighbours(addresses: &[IpAddr]) {
    let v4 = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).ok();
    let v6 = UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).ok();
    for address in addresses {
        let socket = match address {
            IpAddr::V4(_) => v4.as_ref(),
            IpAddr::V6(_) => v6.as_ref(),
        };
        if let Some(socket) = socket {
            // Best effort: an unreachable backend shows up as drop_fib_lookup.
            let _ = socket.send_to(&[], SocketAddr::new(*address, 9));
        }
    }
}

impl Agent {
    fn all_backend_addresses(&self) -> Vec<IpAddr> {
        self.config
            .services
            .iter()
            .flat_map(|s| self.overlay.effective(s))
            .map(|b| b.address)
            .collect()
    }
}

/// Runs the agent until SIGINT or SIGTERM. The datapath stays attached afterwards.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let interface = config.agent.interface.clone();
    tracing::info!(config = %config_path.display(), %interface, services = config.services.len(), "starting");
    // Everything that can be checked before touching the datapath.
    datapath::ifindex(&interface)?;
    let overlay = Overlay::load(&config.agent.state_file)?;
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(Metrics::new(&registry)?);
    let metrics_listener = tokio::net::TcpListener::bind(config.agent.metrics)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", config.agent.metrics))?;
    let api_listener = bind_api(&config.agent.api_socket)?;
    ensure_bpffs(&config.agent.bpffs)?;

    let mut ebpf =
        datapath::load_object_pinned(config.agent.conntrack_entries, &config.agent.bpffs)?;
    datapath::load_program(&mut ebpf, prog_name::BALANCER)?;
    let maps = KernelMaps::take(&mut ebpf)?;
    let adopting = config.agent.bpffs.join(LINK_PIN).exists();
    let mut balancer = Balancer::new(maps);
    let mut health = HashMap::new();
    if adopting {
        let adopted = Adopted {
            vips: balancer.maps().read_vips()?,
            backends: balancer.maps().read_backends()?,
        };
        let known = {
            // The ring reader borrows the maps while `adopt` mutates the balancer's own
            // state: read the rings first.
            let mut rings = HashMap::new();
            for (_, info) in &adopted.vips {
                rings.insert(
                    info.service_id,
                    balancer.maps().read_ring(info.service_id, info.ring_size)?,
                );
            }
            balancer.adopt(&adopted, &config.services, |id, _| {
                Ok(rings.remove(&id).unwrap_or_default())
            })?
        };
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
    }

    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let mut agent = Agent {
        config,
        config_path,
        overlay,
        health,
        balancer,
        checker: HealthChecker::new(health_tx),
        metrics: Arc::clone(&metrics),
        started: Instant::now(),
        adopted: adopting,
        xdp_mode: String::new(),
        last_reload: None,
        up_since: HashMap::new(),
    };
    let report = agent.sync()?;
    tracing::info!(
        ring_slots = report.ring_slots_written,
        backends = report.backends_written,
        vips = report.vips_written,
        "maps written"
    );
    for (name, index) in interfaces() {
        if name != "lo" {
            agent.balancer.maps_mut().set_tx_port(index)?;
        }
    }
    let any_v6 = agent.all_backend_addresses().iter().any(IpAddr::is_ipv6);
    enable_forwarding(&interface, any_v6)?;
    warm_neighbours(&agent.all_backend_addresses());

    let program: &mut Xdp = ebpf
        .program_mut(prog_name::BALANCER)
        .context("balancer program")?
        .try_into()?;
    let (mode, adopted_link) = attach_pinned(program, &agent.config)?;
    agent.xdp_mode = mode.clone();
    tracing::info!(%interface, mode, adopted = adopted_link, bpffs = %agent.config.agent.bpffs.display(), "XDP balancer attached and pinned");

    let (tx, mut rx) = mpsc::channel::<Command>(64);
    let api_task = tokio::spawn(serve_api(api_listener, tx.clone()));
    let refresh = {
        let tx = tx.clone();
        let metrics = Arc::clone(&metrics);
        move || {
            let tx = tx.clone();
            let metrics = Arc::clone(&metrics);
            async move {
                let (reply, answer) = oneshot::channel();
                if tx.send(Command::Snapshot(reply)).await.is_ok()
                    && let Ok((stats, backends)) = answer.await
                {
                    metrics.observe_datapath(&stats, &backends);
                }
            }
        }
    };
    let metrics_task = tokio::spawn(crate::metrics::serve(metrics_listener, registry, refresh));
    tracing::info!(api = %agent.config.agent.api_socket.display(), metrics = %agent.config.agent.metrics, "ready");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut warm = tokio::time::interval(Duration::from_secs(5));
    let mut ramp = tokio::time::interval(Duration::from_secs(1));
    let mut reconcile = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let _ = agent.reload();
            }
            Some(event) = health_rx.recv() => agent.on_health(event),
            Some(cmd) = rx.recv() => match cmd {
                Command::Api(req, reply) => {
                    let _ = reply.send(agent.handle(req));
                }
                Command::Snapshot(reply) => {
                    let _ = reply.send((agent.stats(), agent.backend_infos(None)));
                }
            },
            _ = warm.tick() => warm_neighbours(&agent.all_backend_addresses()),
            _ = ramp.tick() => agent.ramp_step(),
            _ = reconcile.tick() => agent.reconcile_connections(),
        }
    }
    tracing::info!(%interface, "stopping; the datapath stays attached (pinned); `weir teardown` removes it");
    api_task.abort();
    metrics_task.abort();
    let _ = std::fs::remove_file(&agent.config.agent.api_socket);
    Ok(())
}
