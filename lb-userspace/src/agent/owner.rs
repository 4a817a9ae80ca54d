//! The owner task's state and its handlers: the one place that holds the datapath (the
//! [`Balancer`] and its maps), the config, the CLI overlay and the health states. The API
//! server, the health checker, the metrics endpoint and the signal handlers send it messages
//! (see [`super::run`]); it answers each from memory or with map writes, never waiting on
//! anything else.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::{
    FLOW_CLOSED, FLOW_CONFIRMED, FLOW_COUNTED, FlowKey, FlowValue, MAX_BACKENDS, PROTO_TCP,
    addr_from_bytes,
    nat::{NAT_NO_SNAT, NAT_RECLAIM_MARGIN_NS, NAT_REPLY, NatEntry},
    rate::{LIMIT_SOURCE_FLOWS, LIMIT_VIP_FLOWS},
    rules::MAX_RULES_PER_SERVICE,
    stat,
};

use super::{
    conns::{ConnAction, ConnBackend, ConnFilter, ConnJob},
    desired::{self, Health, Observed},
};
use crate::{
    announce::{Announcer, IpRoutes},
    api::{self, ErrorCode, Request, Response},
    audit::{AuditLog, Outcome, Record, Who},
    config::{self, Config, HealthKind, ServiceConfig, rules},
    datapath::{
        AttachedMode, KernelMaps, MapWriter as _, StatsReader as _,
        maps::{ConntrackWalker, NatWalker},
    },
    health::{HealthChecker, HealthEvent, Target},
    metrics::{ConntrackGauges, Expiry, Metrics, NatTableGauges},
    overlay::{Admin, Overlay},
    reconcile::{ApplyReport, Balancer},
};

/// Where a metrics scrape wants its fresh datapath snapshot (a channel with room for it).
pub type SnapshotReply = std::sync::mpsc::SyncSender<Option<crate::metrics::Snapshot>>;

// ----- the agent's types as the API's wire types (the api module depends on neither) -----

impl From<Health> for api::Health {
    fn from(health: Health) -> Self {
        match health {
            Health::Unchecked => Self::Unchecked,
            Health::Up => Self::Up,
            Health::Down => Self::Down,
        }
    }
}

impl From<Admin> for api::Admin {
    fn from(admin: Admin) -> Self {
        match admin {
            Admin::Enabled => Self::Enabled,
            Admin::Draining => Self::Draining,
            Admin::Disabled => Self::Disabled,
        }
    }
}

/// How the program runs: `None` is an adopted link (see [`Agent::xdp_mode`]).
impl From<Option<AttachedMode>> for api::XdpMode {
    fn from(mode: Option<AttachedMode>) -> Self {
        match mode {
            Some(AttachedMode::Native) => Self::Native,
            Some(AttachedMode::Generic) => Self::Generic,
            None => Self::Adopted,
        }
    }
}

impl From<config::Protocol> for api::Protocol {
    fn from(protocol: config::Protocol) -> Self {
        match protocol {
            config::Protocol::Tcp => Self::Tcp,
            config::Protocol::Udp => Self::Udp,
        }
    }
}

impl From<config::Scheduler> for api::Scheduler {
    fn from(scheduler: config::Scheduler) -> Self {
        match scheduler {
            config::Scheduler::Maglev => Self::Maglev,
            config::Scheduler::IpHash => Self::IpHash,
            config::Scheduler::RoundRobin => Self::RoundRobin,
            config::Scheduler::LeastConn => Self::LeastConn,
        }
    }
}

impl From<config::Forwarding> for api::Forwarding {
    fn from(forwarding: config::Forwarding) -> Self {
        match forwarding {
            config::Forwarding::Tunnel => Self::Tunnel,
            config::Forwarding::Direct => Self::Direct,
            config::Forwarding::Nat => Self::Nat,
            config::Forwarding::Fullnat => Self::Fullnat,
        }
    }
}

impl From<HealthKind> for api::HealthCheckKind {
    fn from(kind: HealthKind) -> Self {
        match kind {
            HealthKind::None => Self::None,
            HealthKind::Tcp => Self::Tcp,
            HealthKind::Http => Self::Http,
            HealthKind::Udp => Self::Udp,
        }
    }
}

/// Everything the owner task owns.
pub struct Agent {
    pub config: Config,
    pub config_path: PathBuf,
    pub overlay: Overlay,
    pub observed: Observed,
    pub balancer: Balancer<KernelMaps>,
    pub checker: HealthChecker,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    pub adopted: bool,
    /// How this agent attached the program; `None` when it adopted an earlier agent's link
    /// (and until it attaches, before the API answers anything).
    pub xdp_mode: Option<AttachedMode>,
    pub last_reload: Option<api::ReloadOutcome>,
    /// Set when a failed change could not be rolled back either: the datapath may hold a
    /// mix of the old and the new state until the next successful apply.
    pub inconsistent: Option<String>,
    /// Set by every apply: the rings to compute ahead may have changed.
    pub rings_changed: bool,
    /// NAT entries whose partner the last walk did not find (`nat_walk`).
    pub nat_orphans: HashSet<FlowKey>,
    /// The VIPs' routes for BIRD (`[announce]`); `None` without the section.
    pub announcer: Option<Announcer<IpRoutes>>,
    /// The ring fingerprints are in the metrics (set by the first `sync`).
    pub fingerprints_published: bool,
    /// Checked backends whose first verdict is still to come at start (see
    /// [`Agent::announce_ready`]); empty once the agent may announce.
    pub unsettled: HashSet<desired::BackendKey>,
    /// When the agent announces even with verdicts missing; `None` until attached.
    pub settle_deadline: Option<Instant>,
    /// What the last walk of the NAT table measured (`weir status`); `None` before it.
    pub nat_table: Option<NatTableGauges>,
    /// What the last walk of the connection tables measured (`weir status`).
    pub conntrack_table: Option<ConntrackGauges>,
    /// Where every change is recorded (never blocks).
    pub audit: AuditLog,
}

/// The audit record of a change answered with `response`: ok, or the error it gave.
#[must_use]
pub fn response_record(
    who: &Who,
    request: &Request,
    before: serde_json::Value,
    after: serde_json::Value,
    response: &Response,
) -> Record {
    let outcome = if response.ok {
        Outcome::Ok
    } else {
        Outcome::Error
    };
    let mut record = Record::new(who.clone(), request.name(), outcome).change(before, after);
    record.target = request.target();
    if let Some(error) = &response.error {
        record.error = Some(error.message.clone());
    }
    record
}

/// What a reload changes, for the audit log: services added, removed or changed (any key
/// but the backends), and backends (`service/address`) added, removed or changed.
#[must_use]
pub fn config_diff(old: &Config, new: &Config) -> serde_json::Value {
    let mut out: std::collections::BTreeMap<&str, Vec<String>> = [
        "services_added",
        "services_removed",
        "services_changed",
        "backends_added",
        "backends_removed",
        "backends_changed",
    ]
    .into_iter()
    .map(|k| (k, Vec::new()))
    .collect();
    let mut push = |key: &'static str, value: String| {
        out.entry(key).or_default().push(value);
    };
    for o in &old.services {
        match new.services.iter().find(|n| n.name == o.name) {
            None => push("services_removed", o.name.clone()),
            Some(n) => {
                let without = |s: &ServiceConfig| ServiceConfig {
                    backends: Vec::new(),
                    ..s.clone()
                };
                if without(o) != without(n) {
                    push("services_changed", o.name.clone());
                }
                for ob in &o.backends {
                    match n.backends.iter().find(|nb| nb.address == ob.address) {
                        None => push("backends_removed", format!("{}/{}", o.name, ob.address)),
                        Some(nb) if nb != ob => {
                            push("backends_changed", format!("{}/{}", o.name, ob.address));
                        }
                        Some(_) => {}
                    }
                }
                for nb in &n.backends {
                    if !o.backends.iter().any(|ob| ob.address == nb.address) {
                        push("backends_added", format!("{}/{}", n.name, nb.address));
                    }
                }
            }
        }
    }
    for n in &new.services {
        if !old.services.iter().any(|o| o.name == n.name) {
            push("services_added", n.name.clone());
            for nb in &n.backends {
                push("backends_added", format!("{}/{}", n.name, nb.address));
            }
        }
    }
    serde_json::json!(out)
}

/// The longest the first health verdicts may hold back the announcements at start.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// What a recount needs to know of one backend id.
#[derive(Debug, Clone, Copy)]
pub struct BackendTimeouts {
    pub generation: u32,
    /// The datapath honours its NAT pairs (up).
    pub up: bool,
    pub tcp_ns: u64,
    pub udp_ns: u64,
}

/// A connection-table walk, sent to a blocking thread.
#[derive(Debug)]
pub struct Recount {
    walker: ConntrackWalker,
    nat: Option<NatWalker>,
    nat_orphans: HashSet<FlowKey>,
    /// `[agent] snat_ports`: the range the datapath allocates from.
    snat_ports: (u16, u16),
    backends: HashMap<u32, BackendTimeouts>,
    /// The datapath's counters when the walk began.
    before: HashMap<u32, i64>,
}

/// Active connections per backend id: (generation counted for, count).
#[derive(Debug, Default)]
pub struct RecountResult {
    pub counts: HashMap<u32, (u32, i64)>,
    /// The datapath's counters when the walk began: what changed during the walk is kept.
    pub before: HashMap<u32, i64>,
    pub entries: usize,
    pub took: Duration,
    /// NAT entries without a partner in this walk, for the next one.
    pub nat_orphans: HashSet<FlowKey>,
    /// NAT entries this walk deleted.
    pub nat_reclaimed: usize,
    /// Entries of the NAT table when walked; `None` when it was not walked.
    pub nat_entries: Option<usize>,
    /// Live NAT connections per backend id (`NatWalkOutcome::pairs`).
    pub nat_pairs: HashMap<u32, u64>,
    /// The SNAT ports the table holds after the walk (`snat_claims`).
    pub snat: HashMap<SnatClaim, u64>,
    /// The connection tables as walked; `None` when the walk failed.
    pub conntrack: Option<ConntrackGauges>,
}

/// Whether the agent deletes an established entry, and why. The datapath already ignores
/// such an entry (idle, stale) or has no more use for it (closed, unconfirmed); deleting it
/// frees its slot in a table that never evicts.
#[must_use]
pub fn expiry(
    key: &FlowKey,
    value: &FlowValue,
    backends: &HashMap<u32, BackendTimeouts>,
    now_ns: u64,
) -> Option<Expiry> {
    let Some(b) = backends
        .get(&value.backend_id)
        .filter(|b| b.generation == value.generation)
    else {
        return Some(Expiry::Stale);
    };
    let idle = now_ns.saturating_sub(value.last_seen_ns);
    let timeout = if key.proto == PROTO_TCP {
        b.tcp_ns
    } else {
        b.udp_ns
    };
    if timeout != 0 && idle > timeout {
        Some(Expiry::Idle)
    } else if value.flags & FLOW_CLOSED != 0 && idle > lb_common::CLOSED_TIMEOUT_NS {
        Some(Expiry::Closed)
    } else if value.flags & (FLOW_CONFIRMED | FLOW_CLOSED) == 0
        && idle > lb_common::UNCONFIRMED_TIMEOUT_NS
    {
        Some(Expiry::Unconfirmed)
    } else {
        None
    }
}

/// What a walk of the NAT table decides (`nat_walk`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NatWalkOutcome {
    /// Active NAT connections per backend id (forward entries, counted as `counts_as_active`
    /// counts the DSR ones).
    pub counts: HashMap<u32, i64>,
    /// Keys to delete: both entries of every pair the datapath itself treats as absent.
    pub reclaim: Vec<FlowKey>,
    /// Entries without a partner, not yet reclaimed (a crash between the two inserts of a
    /// pair, or a pair half deleted while walked): reclaimed if still so at the next walk.
    pub orphans: HashSet<FlowKey>,
    /// Live connections per backend id, open or closing (`weir_nat_connections`): forward
    /// entries of whole pairs that the datapath honours and that have not expired.
    pub pairs: HashMap<u32, u64>,
}

/// Judges every NAT entry by the datapath's own rules (docs/design/nat.md §7): a pair is
/// reclaimed when it is not honoured (its backend down or of another generation) or when
/// both entries are idle past their timeout plus `NAT_RECLAIM_MARGIN_NS`; an entry without a
/// partner for two walks is reclaimed too. The datapath would refuse every pair deleted
/// here, so deleting it can race no live connection.
#[must_use]
pub fn nat_walk(
    entries: &HashMap<FlowKey, NatEntry>,
    backends: &HashMap<u32, BackendTimeouts>,
    now_ns: u64,
    previous_orphans: &HashSet<FlowKey>,
) -> NatWalkOutcome {
    let mut out = NatWalkOutcome::default();
    let idle = |e: &NatEntry| {
        now_ns.saturating_sub(e.last_seen_ns)
            > u64::from(e.timeout_s) * 1_000_000_000 + NAT_RECLAIM_MARGIN_NS
    };
    let mut reclaim = HashSet::new();
    for (key, e) in entries {
        let honoured = backends
            .get(&e.backend_id)
            .is_some_and(|b| b.up && b.generation == e.generation);
        let partner_key = e.partner_key(key);
        let partner = entries.get(&partner_key);
        let fresh = !idle(e) || partner.is_some_and(|p| !idle(p));
        if e.flags & NAT_REPLY == 0
            && honoured
            && fresh
            && e.flags & FLOW_COUNTED != 0
            && e.flags & FLOW_CLOSED == 0
        {
            *out.counts.entry(e.backend_id).or_default() += 1;
        }
        let orphan = partner.is_none();
        if e.flags & NAT_REPLY == 0 && honoured && fresh && !orphan {
            *out.pairs.entry(e.backend_id).or_default() += 1;
        }
        if orphan && fresh && honoured && !previous_orphans.contains(key) {
            out.orphans.insert(*key);
            continue;
        }
        if !honoured || !fresh || orphan {
            reclaim.insert(*key);
            if !orphan {
                reclaim.insert(partner_key);
            }
        }
    }
    out.reclaim = reclaim.into_iter().collect();
    out
}

/// Where SNAT port claims are (`snat_claims`): the backend id a pair was made for, its SNAT
/// address, and the backend endpoint (address, port, protocol) whose port space it takes.
/// The datapath claims a port per reply tuple, so two pairs compete for a port only when
/// they share the SNAT address and the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnatClaim {
    pub backend_id: u32,
    pub address: IpAddr,
    pub endpoint: SocketAddr,
    pub proto: u8,
    /// The port lies in the SNAT range the datapath allocates from now (a pair made before
    /// a restart with another `snat_ports` takes none of its ports).
    pub in_range: bool,
}

/// Counts the SNAT ports the table holds after a walk: every `fullnat` reply entry (its
/// key is the claim: backend:bp → snat:sp) that the walk does not reclaim. Orphans waiting
/// for their second walk still hold their port, so they count.
#[must_use]
pub fn snat_claims(
    entries: &HashMap<FlowKey, NatEntry>,
    reclaimed: &[FlowKey],
    snat_ports: (u16, u16),
) -> HashMap<SnatClaim, u64> {
    let reclaimed: HashSet<&FlowKey> = reclaimed.iter().collect();
    let mut out = HashMap::new();
    for (key, e) in entries {
        if e.flags & NAT_REPLY == 0 || e.snat_slot == NAT_NO_SNAT || reclaimed.contains(key) {
            continue;
        }
        let port = u16::from_be(key.dst_port_be);
        let claim = SnatClaim {
            backend_id: e.backend_id,
            address: addr_from_bytes(key.dst_addr, key.family),
            endpoint: SocketAddr::new(
                addr_from_bytes(key.src_addr, key.family),
                u16::from_be(key.src_port_be),
            ),
            proto: key.proto,
            in_range: (snat_ports.0..=snat_ports.1).contains(&port),
        };
        *out.entry(claim).or_default() += 1;
    }
    out
}

/// The SNAT use of every SNAT address of every `fullnat` service (`services`: name,
/// backend ids, SNAT addresses, in config order) from a walk's claims: the service's pairs
/// on the address, and the fullest of its backend endpoints there, counting every
/// service's in-range pairs on that endpoint (they share its ports).
#[must_use]
pub fn snat_use(
    services: &[(String, HashSet<u32>, Vec<IpAddr>)],
    claims: &HashMap<SnatClaim, u64>,
    port_count: u64,
) -> Vec<api::SnatUse> {
    let mut per_endpoint: HashMap<(IpAddr, SocketAddr, u8), u64> = HashMap::new();
    for (c, n) in claims {
        if c.in_range {
            *per_endpoint
                .entry((c.address, c.endpoint, c.proto))
                .or_default() += n;
        }
    }
    let mut out = Vec::new();
    for (name, ids, addresses) in services {
        for address in addresses {
            let mine = claims
                .iter()
                .filter(|(c, _)| c.address == *address && ids.contains(&c.backend_id));
            let ports_in_use = mine.clone().map(|(_, n)| n).sum();
            let fullest_backend = mine
                .filter_map(|(c, _)| per_endpoint.get(&(c.address, c.endpoint, c.proto)))
                .copied()
                .max()
                .unwrap_or(0);
            out.push(api::SnatUse {
                service: name.clone(),
                address: *address,
                ports_in_use,
                fullest_backend,
                port_count,
            });
        }
    }
    out
}

impl Recount {
    /// Walks the table; blocking (seconds for millions of entries without batches).
    pub fn run(self) -> RecountResult {
        let started = Instant::now();
        let now_ns = crate::sys::monotonic_coarse_ns();
        let mut counts: HashMap<u32, (u32, i64)> = self
            .backends
            .iter()
            .map(|(id, b)| (*id, (b.generation, 0)))
            .collect();
        // The connection table first, right after the owner's snapshot of the datapath's
        // counts (`before`): `apply_recount` adds what changed since the snapshot, so a flow
        // that starts between the snapshot and the walk's visit of its entry is counted
        // (one too many until the next recount). Walking the NAT table first widened
        // that window enough for e2e_sched to see it.
        // Expired entries are deleted (the table never evicts) and not counted.
        let mut expire: Vec<FlowKey> = Vec::new();
        let mut expired = [0u64; Expiry::ALL.len()];
        let entries = match self.walker.walk(|key, value| {
            if let Some(why) = expiry(key, value, &self.backends, now_ns) {
                expire.push(*key);
                expired[why.index()] += 1;
            } else if counts_as_active(key, value, &self.backends, now_ns)
                && let Some((_, count)) = counts.get_mut(&value.backend_id)
            {
                *count += 1;
            }
        }) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::warn!(error = %err, "walking the connection table failed; counts left as they are");
                return RecountResult::default();
            }
        };
        let deleted = match self.walker.delete(&expire) {
            Ok(n) => n,
            Err(err) => {
                tracing::warn!(error = %err, entries = expire.len(), "deleting expired connection-table entries failed");
                expired = [0; Expiry::ALL.len()];
                0
            }
        };
        let half_open = self.walker.count_half_open().unwrap_or_else(|err| {
            tracing::warn!(error = %err, "walking the half-open table failed");
            0
        });
        let conntrack = ConntrackGauges {
            entries: entries.saturating_sub(deleted) as u64,
            capacity: u64::from(self.walker.capacity),
            half_open: half_open as u64,
            half_open_capacity: u64::from(self.walker.half_open_capacity),
            expired,
        };
        let mut nat_counts = HashMap::new();
        let mut nat_orphans = HashSet::new();
        let mut nat_reclaimed = 0;
        let mut nat_entries = None;
        let mut nat_pairs = HashMap::new();
        let mut snat = HashMap::new();
        if let Some(nat) = &self.nat {
            let mut table = HashMap::new();
            match nat.walk(|key, value| {
                table.insert(*key, *value);
            }) {
                Ok(n) => {
                    nat_entries = Some(n);
                    let outcome = nat_walk(&table, &self.backends, now_ns, &self.nat_orphans);
                    nat_counts = outcome.counts;
                    nat_pairs = outcome.pairs;
                    nat_orphans = outcome.orphans;
                    snat = snat_claims(&table, &outcome.reclaim, self.snat_ports);
                    match nat.delete(&outcome.reclaim) {
                        Ok(n) => nat_reclaimed = n,
                        Err(err) => {
                            tracing::warn!(error = %err, "reclaiming expired NAT pairs failed");
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "walking the NAT table failed; counts left as they are");
                    return RecountResult::default();
                }
            }
        }
        for (id, n) in nat_counts {
            if let Some((_, count)) = counts.get_mut(&id) {
                *count += n;
            }
        }
        RecountResult {
            counts,
            before: self.before,
            entries: entries + nat_entries.unwrap_or(0),
            took: started.elapsed(),
            nat_orphans,
            nat_reclaimed,
            nat_entries,
            nat_pairs,
            snat,
            conntrack: Some(conntrack),
        }
    }
}

/// Whether a connection-table entry is an active connection of its backend: counted by the
/// datapath, not closed, made for the backend's current generation (an entry of an earlier
/// owner of the id is not honoured), and not idle past its service's timeout.
#[must_use]
pub fn counts_as_active(
    key: &FlowKey,
    value: &FlowValue,
    backends: &HashMap<u32, BackendTimeouts>,
    now_ns: u64,
) -> bool {
    if value.flags & FLOW_COUNTED == 0 || value.flags & FLOW_CLOSED != 0 {
        return false;
    }
    let Some(b) = backends
        .get(&value.backend_id)
        .filter(|b| b.generation == value.generation)
    else {
        return false;
    };
    let timeout = if key.proto == PROTO_TCP {
        b.tcp_ns
    } else {
        b.udp_ns
    };
    now_ns.saturating_sub(value.last_seen_ns) <= timeout
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The port a backend's health check probes: `health_check.port`, else the port the
/// backend listens on (`backend.port` of the NAT modes), else the service's.
const fn check_port(service: &ServiceConfig, backend_port: Option<u16>) -> u16 {
    match (service.health_check.port, backend_port) {
        (Some(port), _) | (None, Some(port)) => port,
        (None, None) => service.port,
    }
}

impl Agent {
    fn service_config(&self, name: &str) -> Option<&ServiceConfig> {
        self.config.services.iter().find(|s| s.name == name)
    }

    fn health_of(&self, service: &ServiceConfig, address: IpAddr) -> Health {
        self.observed.health_of(service, address)
    }

    /// One slow-start step (every second): re-applies while any ramp runs, and forgets
    /// ramps only after the step that gave them their full weight.
    pub fn ramp_step(&mut self) {
        if self.observed.up_since.is_empty() {
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
        self.observed.up_since.retain(|(name, _), since| {
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
            self.observed
                .up_since
                .insert((service.to_owned(), address), Instant::now());
        }
    }

    /// A recount of every backend's active connections, and the expiry of the connection
    /// table's dead entries, to run off the owner task (a million entries take a while even
    /// in batches): entries that went idle without another packet never told the datapath
    /// their flow ended.
    pub fn recount_job(&self) -> Option<Recount> {
        let walker = match self.balancer.maps().conntrack_walker() {
            Ok(walker) => walker,
            Err(err) => {
                tracing::warn!(error = %err, "cannot walk the connection table");
                return None;
            }
        };
        let mut backends = HashMap::new();
        for state in self.balancer.services() {
            for b in &state.backends {
                backends.insert(
                    b.id,
                    BackendTimeouts {
                        generation: b.generation,
                        up: b.up,
                        tcp_ns: u64::from(state.spec.tcp_idle_timeout_s) * 1_000_000_000,
                        udp_ns: u64::from(state.spec.udp_idle_timeout_s) * 1_000_000_000,
                    },
                );
            }
        }
        let before = backends
            .keys()
            .map(|id| (*id, self.balancer.maps().raw_active_connections(*id)))
            .collect();
        // Always, NAT service or not: the pairs of a NAT service removed by a reload are
        // reclaimed too (an empty table costs one syscall).
        let nat = match self.balancer.maps().nat_walker() {
            Ok(w) => Some(w),
            Err(err) => {
                tracing::warn!(error = %err, "cannot walk the NAT table");
                None
            }
        };
        Some(Recount {
            walker,
            nat,
            nat_orphans: self.nat_orphans.clone(),
            snat_ports: self.config.agent.snat_ports,
            backends,
            before,
        })
    }

    /// Writes the counts of a finished recount, for backend ids still held by the same
    /// backend (an id given to another backend meanwhile keeps its fresh count).
    pub fn apply_recount(&mut self, mut result: RecountResult) {
        self.nat_orphans = std::mem::take(&mut result.nat_orphans);
        if result.nat_reclaimed > 0 {
            tracing::debug!(
                entries = result.nat_reclaimed,
                "reclaimed expired or stale NAT pairs"
            );
        }
        self.metrics
            .observe_nat_reclaimed(result.nat_reclaimed as u64);
        if let Some(conntrack) = result.conntrack {
            if conntrack.expired.iter().any(|n| *n > 0) {
                tracing::debug!(expired = ?conntrack.expired, "expired connection-table entries deleted");
            }
            self.metrics.set_conntrack(conntrack);
            self.conntrack_table = Some(conntrack);
        }
        if let Some(entries) = result.nat_entries {
            let gauges = self.nat_gauges(entries, &result.nat_pairs, &result.snat);
            self.metrics.set_nat_table(gauges.clone());
            self.nat_table = Some(gauges);
        }
        let current: HashMap<u32, u32> = self
            .balancer
            .services()
            .flat_map(|s| s.backends.iter().map(|b| (b.id, b.generation)))
            .collect();
        let mut written = 0;
        for (id, (generation, count)) in result.counts {
            if current.get(&id) != Some(&generation) {
                continue;
            }
            // Flows that began or ended while the table was walked moved the datapath's
            // counter meanwhile: keep that change on top of the count.
            let now = self.balancer.maps().raw_active_connections(id);
            let during = now - result.before.get(&id).copied().unwrap_or(now);
            let count = (count + during).max(0);
            if now != count {
                if let Err(err) = self.balancer.maps_mut().set_active_connections(id, count) {
                    tracing::warn!(backend_id = id, error = %err, "writing a connection count failed");
                } else {
                    written += 1;
                }
            }
        }
        tracing::debug!(
            entries = result.entries,
            walk_ms = result.took.as_millis() as u64,
            written,
            "connection counts recounted"
        );
    }

    /// The NAT gauges of a walk: every backend of a NAT service gets a series (0 without
    /// connections, so an alert sees it), and any other backend a pair still points to;
    /// every SNAT address of a `fullnat` service gets its use.
    fn nat_gauges(
        &self,
        entries: usize,
        pairs: &HashMap<u32, u64>,
        claims: &HashMap<SnatClaim, u64>,
    ) -> NatTableGauges {
        let fullnat: Vec<(String, HashSet<u32>, Vec<IpAddr>)> = self
            .balancer
            .services()
            .filter(|s| s.spec.forwarding == lb_common::FORWARD_FULLNAT)
            .map(|s| {
                (
                    s.spec.name.clone(),
                    s.backends.iter().map(|b| b.id).collect(),
                    s.spec
                        .snat
                        .iter()
                        .map(|source| {
                            addr_from_bytes(source.addr, lb_common::addr_bytes(s.spec.vip).1)
                        })
                        .collect(),
                )
            })
            .collect();
        let (lo, hi) = self.config.agent.snat_ports;
        let snat = snat_use(&fullnat, claims, u64::from(hi - lo) + 1);
        let mut connections = Vec::new();
        for state in self.balancer.services() {
            for b in &state.backends {
                let count = pairs.get(&b.id).copied();
                if lb_common::forwarding_is_nat(state.spec.forwarding) || count.is_some() {
                    connections.push((state.spec.name.clone(), b.address, count.unwrap_or(0)));
                }
            }
        }
        NatTableGauges {
            entries: entries as u64,
            capacity: u64::from(self.balancer.maps().nat_capacity()),
            connections,
            snat,
        }
    }

    /// Checks a `conn_list` or `conn_flush` and packs its walk of the NAT table, which the
    /// caller runs on a blocking thread (never on the owner task). `None`: not such a
    /// request; `Err`: the answer, when there is nothing to walk.
    pub fn conn_job(&self, request: &Request) -> Option<Result<ConnJob, Response>> {
        let refuse = |message: &str| Some(Err(Response::error(ErrorCode::BadRequest, message)));
        let (service, backend, state, action) = match request {
            Request::ConnList {
                service,
                backend,
                state,
                limit,
            } => {
                let limit = limit.unwrap_or(api::CONN_LIST_DEFAULT_LIMIT);
                if !(1..=api::CONN_LIST_MAX_LIMIT).contains(&limit) {
                    return refuse(&format!(
                        "limit {limit} is out of range (1..={}; `weir conn list --limit N`)",
                        api::CONN_LIST_MAX_LIMIT
                    ));
                }
                (
                    service,
                    backend,
                    *state,
                    ConnAction::List {
                        limit: limit as usize,
                    },
                )
            }
            Request::ConnFlush {
                service,
                backend,
                all,
                confirm,
            } => {
                if service.is_none() && backend.is_none() && !all {
                    return refuse(
                        "refused: a flush needs a filter: `weir conn flush --service NAME`, \
                         `--backend ADDR`, or `--all` for every NAT connection",
                    );
                }
                if *all && (service.is_some() || backend.is_some()) {
                    return refuse(
                        "refused: `all` flushes every NAT connection and takes no filter \
                         (`weir conn flush --all --yes`)",
                    );
                }
                if !confirm {
                    return refuse(
                        "refused without confirmation, nothing flushed: add `--yes` to \
                         `weir conn flush`",
                    );
                }
                (service, backend, None, ConnAction::Flush)
            }
            _ => return None,
        };
        if let Some(name) = service
            && self.service_config(name).is_none()
        {
            return Some(Err(unknown_service(name)));
        }
        if let Some(address) = *backend {
            let known = match service {
                Some(name) => self.service_config(name).is_some_and(|s| {
                    self.overlay
                        .effective(s)
                        .iter()
                        .any(|b| b.address == address)
                }),
                None => self.all_backend_addresses().contains(&address),
            };
            if !known {
                let (whose, list) = match service {
                    Some(name) => (
                        format!("service {name} has"),
                        format!("weir backend list {name}"),
                    ),
                    None => ("no service has".to_owned(), "weir backend list".to_owned()),
                };
                return Some(Err(Response::error(
                    ErrorCode::UnknownBackend,
                    format!("{whose} no backend {address} (see `{list}`)"),
                )));
            }
        }
        let walker = match self.balancer.maps().nat_walker() {
            Ok(walker) => walker,
            Err(err) => {
                return Some(Err(Response::error(
                    ErrorCode::Internal,
                    format!("cannot walk the NAT table: {err}"),
                )));
            }
        };
        let backends = self
            .balancer
            .services()
            .flat_map(|s| {
                s.backends.iter().map(|b| {
                    (
                        b.id,
                        ConnBackend {
                            service: s.spec.name.clone(),
                            address: b.address,
                            generation: b.generation,
                        },
                    )
                })
            })
            .collect();
        Some(Ok(ConnJob {
            walker,
            backends,
            filter: ConnFilter {
                service: service.clone(),
                backend: *backend,
                state,
            },
            action,
        }))
    }

    /// Writes the difference to the datapath and points the health checker at the current
    /// backends.
    pub fn sync(&mut self) -> anyhow::Result<ApplyReport> {
        let desired = desired::desired(&self.config, &self.overlay, &self.observed, Instant::now());
        let report = self.balancer.apply(&desired)?;
        self.inconsistent = None;
        let wrote =
            report.ring_slots_written > 0 || report.backends_written > 0 || report.vips_written > 0;
        if wrote {
            self.rings_changed = true;
        }
        // Hashing every ring costs a pass over its slots: only when one may have changed,
        // and once at start (an adopted datapath may need no write at all).
        if wrote || !self.fingerprints_published {
            self.fingerprints_published = true;
            self.metrics.set_fingerprints(
                self.balancer
                    .services()
                    .map(|s| (s.spec.name.clone(), s.fingerprint()))
                    .collect(),
            );
        }
        self.update_announcements();
        let mut targets = Vec::new();
        for service in &self.config.services {
            if service.health_check.kind == HealthKind::None {
                continue;
            }
            for b in self.overlay.effective(service) {
                let known = self
                    .observed
                    .health
                    .get(&(service.name.clone(), b.address))
                    .map(|h| *h == Health::Up);
                targets.push((
                    Target {
                        service: service.name.clone(),
                        address: b.address,
                        port: check_port(service, b.port),
                        spec: service.health_check.clone(),
                    },
                    known,
                ));
            }
        }
        self.metrics.retain_checks(|service, address| {
            targets
                .iter()
                .any(|(t, _)| t.service == service && t.address == address)
        });
        self.checker.set_targets(targets);
        Ok(report)
    }

    pub fn on_health(&mut self, event: HealthEvent) {
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
                // A first failure is a new backend's verdict (it stays down). A first success
                // is not yet: its transition to up follows on the same channel.
                if !ok && self.unsettled.remove(&(service, address)) {
                    self.settle_step();
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
                let before = self
                    .service_config(&service)
                    .map(|s| self.health_of(s, address));
                if up {
                    // Slow start: a backend that becomes healthy ramps up.
                    self.start_ramp(&service, address);
                }
                self.observed.health.insert(
                    (service.clone(), address),
                    if up { Health::Up } else { Health::Down },
                );
                let settles = self.unsettled.remove(&(service.clone(), address));
                let health = |h: Option<Health>| {
                    serde_json::to_value(h.map(api::Health::from)).unwrap_or_default()
                };
                let record = Record::new(Who::agent("health_check"), "health", Outcome::Ok)
                    .target(format!("{service}/{address}"))
                    .change(
                        health(before),
                        health(Some(if up { Health::Up } else { Health::Down })),
                    );
                match self.sync() {
                    Ok(report) => {
                        tracing::info!(
                            %service,
                            %address,
                            up,
                            ring_slots_written = report.ring_slots_written,
                            apply_us = t.elapsed().as_micros() as u64,
                            "backend health changed"
                        );
                        self.audit.record(record);
                    }
                    Err(err) => {
                        tracing::error!(%service, %address, error = %err, "applying a health change failed");
                        self.audit.record(Record {
                            result: Outcome::Error,
                            ..record.error(format!("{err:#}"))
                        });
                        self.roll_back(&err);
                    }
                }
                // After the sync: the first announcement carries this backend's verdict.
                if settles {
                    self.settle_step();
                }
            }
        }
    }

    pub fn backend_infos(&self, only: Option<&str>) -> Vec<api::BackendInfo> {
        // For the CLI: a counter that cannot be read shows as 0.
        self.read_backends(only, false).unwrap_or_default()
    }

    /// The backends as the API shows them. `strict`: fail on a counter that cannot be read
    /// (a metrics snapshot must not show a total of 0, which Prometheus takes for a reset).
    fn read_backends(
        &self,
        only: Option<&str>,
        strict: bool,
    ) -> Result<Vec<api::BackendInfo>, crate::datapath::DatapathError> {
        let mut out = Vec::new();
        for service in &self.config.services {
            if only.is_some_and(|o| o != service.name) {
                continue;
            }
            let state = self.balancer.service(&service.name);
            // Slot counts in one pass over the ring, not one per backend.
            let slots: HashMap<u32, u32> = state
                .map(|s| {
                    lb_common::maglev::slot_counts(&s.ring)
                        .into_iter()
                        .collect()
                })
                .unwrap_or_default();
            for b in self.overlay.effective(service) {
                let tracked =
                    state.and_then(|s| s.backends.iter().find(|x| x.address == b.address));
                let (slots, counters, up, effective_weight, active_connections, turned_away) =
                    match tracked {
                        Some(t) => {
                            let counters = match self.balancer.maps().backend(t.id) {
                                Ok(c) => c,
                                Err(err) if strict => return Err(err),
                                Err(_) => Default::default(),
                            };
                            (
                                slots.get(&t.id).copied().unwrap_or(0),
                                counters,
                                t.up,
                                t.weight,
                                self.balancer.maps().active_connections(t.id),
                                self.balancer.maps().turned_away(t.id),
                            )
                        }
                        None => (0, Default::default(), false, 0, 0, 0),
                    };
                out.push(api::BackendInfo {
                    service: service.name.clone(),
                    address: b.address,
                    weight: b.weight,
                    admin: b.admin.into(),
                    health: self.health_of(service, b.address).into(),
                    up,
                    slots,
                    effective_weight,
                    backup: b.backup,
                    active_connections,
                    max_connections: b.max_connections,
                    turned_away,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    new_flows: counters.new_flows,
                });
            }
        }
        Ok(out)
    }

    /// A fresh datapath snapshot for a metrics scrape; `None` if a counter cannot be read
    /// (the collector then serves the last snapshot rather than totals of 0).
    pub fn snapshot(&self) -> Option<(api::Stats, Vec<api::BackendInfo>)> {
        let backends = self.read_backends(None, true).ok()?;
        let stats = self.read_stats(&backends, true).ok()?;
        Some((stats, backends))
    }

    pub fn stats(&self) -> api::Stats {
        let backends = self.backend_infos(None);
        // Not strict: every read error already became a 0.
        self.read_stats(&backends, false)
            .unwrap_or_else(|_| api::Stats {
                global: Vec::new(),
                services: Vec::new(),
                backends: Vec::new(),
                source_rules: Vec::new(),
                rate_limited: Vec::new(),
            })
    }

    fn read_stats(
        &self,
        backends: &[api::BackendInfo],
        strict: bool,
    ) -> Result<api::Stats, crate::datapath::DatapathError> {
        let global = match self.balancer.maps().global() {
            Ok(global) => global,
            Err(err) if strict => return Err(err),
            Err(_) => [0; stat::COUNT as usize],
        };
        let mut services = Vec::new();
        for state in self.balancer.services() {
            let c = match self.balancer.maps().service(state.id) {
                Ok(c) => c,
                Err(err) if strict => return Err(err),
                Err(_) => Default::default(),
            };
            services.push(api::TrafficStats {
                service: state.spec.name.clone(),
                backend: None,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
            });
        }
        let backends = backends
            .iter()
            .map(|b| api::TrafficStats {
                service: b.service.clone(),
                backend: Some(b.address),
                packets: b.packets,
                bytes: b.bytes,
                new_flows: b.new_flows,
            })
            .collect();
        let mut source_rules = Vec::new();
        for state in self.balancer.services() {
            for (i, rule) in (0..MAX_RULES_PER_SERVICE).zip(&state.spec.source_rules) {
                // Only the slots of configured rules: one read each, bounded by the rules.
                let packets = match self
                    .balancer
                    .maps()
                    .read_source_rule_count(state.id * MAX_RULES_PER_SERVICE + i)
                {
                    Ok(n) => n,
                    Err(err) if strict => return Err(err),
                    Err(_) => 0,
                };
                source_rules.push(api::RuleStats {
                    service: state.spec.name.clone(),
                    action: if rule.allow { "allow" } else { "deny" }.to_owned(),
                    prefix: format!("{}/{}", addr_from_bytes(rule.addr, rule.family), rule.len),
                    packets,
                });
            }
        }
        let mut rate_limited = Vec::new();
        for state in self.balancer.services() {
            let limits = &state.spec.rate_limits;
            let configured = [
                (
                    LIMIT_SOURCE_FLOWS,
                    "source",
                    limits.source_flows.interval_ns != 0,
                ),
                (LIMIT_VIP_FLOWS, "vip", limits.vip_flows.interval_ns != 0),
            ];
            if !configured.iter().any(|(_, _, on)| *on) {
                continue;
            }
            // One read per limited service (its own slots).
            let drops = match self.balancer.maps().read_rate_drops(state.id) {
                Ok(d) => d,
                Err(err) if strict => return Err(err),
                Err(_) => Default::default(),
            };
            for (slot, limit, _) in configured.into_iter().filter(|(_, _, on)| *on) {
                rate_limited.push(api::RateLimitStats {
                    service: state.spec.name.clone(),
                    limit: limit.to_owned(),
                    packets: drops[usize::from(slot)],
                });
            }
        }
        Ok(api::Stats {
            global: stat::NAMES
                .iter()
                .zip(global)
                .map(|(n, v)| ((*n).to_owned(), v))
                .collect(),
            services,
            backends,
            source_rules,
            rate_limited,
        })
    }

    pub fn status(&self) -> api::Status {
        let backends = self.backend_infos(None);
        api::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            interface: self.config.agent.interface().to_owned(),
            interfaces: self.config.agent.interfaces.clone(),
            xdp_mode: self.xdp_mode.into(),
            config_file: self.config_path.display().to_string(),
            bpffs: self.config.agent.bpffs.display().to_string(),
            adopted: self.adopted,
            uptime_seconds: self.started.elapsed().as_secs(),
            services: self.config.services.len(),
            backends: backends.len(),
            backends_up: backends.iter().filter(|b| b.up).count(),
            last_reload: self.last_reload.clone(),
            inconsistent: self.inconsistent.clone(),
            nat: self.nat_table.as_ref().map(|t| api::NatStatus {
                entries: t.entries,
                capacity: t.capacity,
                snat_exhausted: self.balancer.maps().global().map_or(0, |g| {
                    g.get(stat::DROP_SNAT_EXHAUSTED as usize)
                        .copied()
                        .unwrap_or(0)
                }),
                snat: t.snat.clone(),
            }),
            announce: self.announce_status(),
            conntrack: self.conntrack_table.map(|t| {
                let global = self.balancer.maps().global().ok();
                let counter = |i: u32| {
                    global
                        .as_ref()
                        .and_then(|g| g.get(i as usize).copied())
                        .unwrap_or(0)
                };
                api::ConntrackStatus {
                    entries: t.entries,
                    capacity: t.capacity,
                    half_open: t.half_open,
                    half_open_capacity: t.half_open_capacity,
                    refused: counter(stat::CONNTRACK_FULL),
                    flood_hashed: counter(stat::FLOOD_HASHED),
                }
            }),
        }
    }

    /// The announcements as the API shows them.
    fn announce_status(&self) -> Option<api::AnnounceStatus> {
        let (announcer, config) = self.announcer.as_ref().zip(self.config.announce.as_ref())?;
        Some(api::AnnounceStatus {
            device: config.device.clone(),
            table: config.table,
            withdrawn: announcer.withdrawn(),
            vips: announcer
                .vips()
                .map(|(vip, state)| api::VipAnnouncement {
                    vip,
                    announced: state.announced,
                    since: state.since,
                    reason: state.reason.as_str().to_owned(),
                })
                .collect(),
        })
    }

    /// Brings the VIPs' routes in line with the services as written to the datapath: a VIP
    /// is announced while one of its services has a backend that takes new flows.
    pub fn update_announcements(&mut self) {
        let Some(announcer) = self.announcer.as_mut() else {
            return;
        };
        let usable = crate::announce::usable_vips(
            self.balancer
                .services()
                .map(|s| (s.spec.vip, s.backends.iter().any(|b| b.weight > 0))),
        );
        for change in announcer.update(&usable, now_unix()) {
            tracing::info!(
                vip = %change.vip,
                announced = change.announced,
                reason = change.reason.as_str(),
                "VIP route {}",
                if change.announced { "added: BIRD announces it" } else { "deleted: BIRD withdraws it" }
            );
            self.audit.record(
                Record::new(Who::agent("announce"), "announcement", Outcome::Ok)
                    .target(change.vip.to_string())
                    .change(
                        serde_json::json!({"announced": !change.announced}),
                        serde_json::json!({
                            "announced": change.announced,
                            "reason": change.reason.as_str(),
                        }),
                    ),
            );
        }
        self.record_announcements();
    }

    fn record_announcements(&self) {
        if let Some(announcer) = &self.announcer {
            let vips: Vec<_> = announcer
                .vips()
                .map(|(vip, s)| (vip, s.announced, s.since))
                .collect();
            self.metrics.set_announcements(&vips, announcer.withdrawn());
        }
    }

    /// The agent is attached and serving: announcements may begin.
    ///
    /// Announcing waits for the first verdict of every checked backend not known from a
    /// pinned datapath (each comes within one interval plus the timeout: a first check is
    /// jittered over the interval), at most [`SETTLE_LIMIT`]: a balancer that joined the
    /// ECMP group with one backend up of three would place its first flows on a ring the
    /// others do not have, and those flows would break when ECMP moved them.
    pub fn announce_ready(&mut self) {
        let mut wait = Duration::ZERO;
        for service in &self.config.services {
            if service.health_check.kind == HealthKind::None {
                continue;
            }
            for b in self.overlay.effective(service) {
                let key = (service.name.clone(), b.address);
                if !self.observed.health.contains_key(&key) {
                    self.unsettled.insert(key);
                    wait = wait.max(service.health_check.interval + service.health_check.timeout);
                }
            }
        }
        self.settle_deadline = Some(Instant::now() + wait.min(SETTLE_LIMIT));
        self.settle_step();
    }

    /// Lets the announcer start once every first verdict is in, or the wait is over (called
    /// at each verdict and every second).
    pub fn settle_step(&mut self) {
        let Some(deadline) = self.settle_deadline else {
            return;
        };
        if self.announcer.is_none() {
            self.unsettled.clear();
            return;
        }
        // Backends removed meanwhile give no verdict.
        let checked: HashSet<desired::BackendKey> = self
            .config
            .services
            .iter()
            .filter(|s| s.health_check.kind != HealthKind::None)
            .flat_map(|s| {
                self.overlay
                    .effective(s)
                    .into_iter()
                    .map(|b| (s.name.clone(), b.address))
            })
            .collect();
        self.unsettled.retain(|key| checked.contains(key));
        if !self.unsettled.is_empty() && Instant::now() < deadline {
            return;
        }
        if !self.unsettled.is_empty() {
            tracing::warn!(
                missing = self.unsettled.len(),
                "announcing before every backend's first health verdict (waited {SETTLE_LIMIT:?} at most)"
            );
            self.unsettled.clear();
        }
        self.settle_deadline = None;
        if let Some(announcer) = self.announcer.as_mut() {
            announcer.set_ready();
        }
        self.update_announcements();
    }

    /// The agent stops: every VIP is withdrawn before it exits (the device goes with the
    /// process anyway; this makes the withdrawal come first, and logged).
    pub fn announce_stop(&mut self) {
        if let Some(announcer) = self.announcer.as_mut() {
            announcer.set_stopping();
        }
        self.update_announcements();
    }

    /// Every 5 s: the table as the agent wants it, whatever else changed it.
    pub fn verify_announcements(&mut self) {
        if let Some(announcer) = self.announcer.as_mut()
            && let Err(err) = announcer.verify(now_unix())
        {
            tracing::warn!(error = %format!("{err:#}"), "cannot read the announce table");
        }
        self.record_announcements();
    }

    /// `weir announce withdraw|resume`: persisted first, then applied.
    fn set_announce_withdrawn(&mut self, withdrawn: bool) -> Response {
        if self.announcer.is_none() {
            return Response::error(
                ErrorCode::Conflict,
                "this agent announces nothing: its config has no [announce] section",
            );
        }
        let before = self.overlay.clone();
        self.overlay.announce_withdrawn = withdrawn;
        if let Err(err) = self.overlay.save(&self.config.agent.state_file) {
            self.overlay = before;
            return Response::error(ErrorCode::Internal, err.to_string());
        }
        if let Some(announcer) = self.announcer.as_mut() {
            announcer.set_withdrawn(withdrawn);
        }
        tracing::info!(
            withdrawn,
            "announcements {}",
            if withdrawn {
                "withdrawn by the operator"
            } else {
                "resumed by the operator"
            }
        );
        self.update_announcements();
        match self.announce_status() {
            Some(status) => Response::ok(status),
            None => Response::error(ErrorCode::Internal, "no announce status"),
        }
    }

    /// Re-reads the config file and applies it, recording the outcome and what changed in
    /// the audit log.
    pub fn reload(&mut self, who: &Who) -> Response {
        let old = self.config.clone();
        let response = self.reload_inner();
        let mut record = response_record(
            who,
            &Request::Reload {},
            serde_json::json!({"services": old.services.len(), "backends": old.backend_count()}),
            serde_json::json!({"services": self.config.services.len(), "backends": self.config.backend_count()}),
            &response,
        );
        if response.ok {
            record = record.diff(config_diff(&old, &self.config));
        }
        self.audit.record(record);
        response
    }

    fn reload_inner(&mut self) -> Response {
        let result = config::load(&self.config_path);
        match result {
            Err(err) => {
                self.metrics.observe_reload(false);
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
                if new.agent.interfaces != self.config.agent.interfaces
                    || new.agent.bpffs != self.config.agent.bpffs
                    || new.agent.api_socket != self.config.agent.api_socket
                    || new.agent.metrics != self.config.agent.metrics
                    || new.agent.state_file != self.config.agent.state_file
                    || new.agent.audit_log != self.config.agent.audit_log
                    || new.agent.audit_max_bytes != self.config.agent.audit_max_bytes
                    || new.agent.audit_keep != self.config.agent.audit_keep
                    || new.api != self.config.api
                {
                    tracing::warn!(
                        "reload: interface(s), bpffs, api_socket, metrics, state_file, the audit log and [api] changes take effect at the next agent start"
                    );
                }
                if new.agent.xdp_mode != self.config.agent.xdp_mode
                    || new.agent.conntrack_entries != self.config.agent.conntrack_entries
                    || new.agent.half_open_entries != self.config.agent.half_open_entries
                    || new.agent.nat_connections != self.config.agent.nat_connections
                {
                    tracing::warn!(
                        "reload: xdp_mode, conntrack_entries, half_open_entries and nat_connections changes take effect only on a fresh datapath (after weir teardown)"
                    );
                }
                if new.announce != self.config.announce {
                    tracing::warn!(
                        "reload: [announce] changes take effect at the next agent start"
                    );
                }
                if new.agent.snat_ports != self.config.agent.snat_ports
                    || new.agent.reserve_snat_ports != self.config.agent.reserve_snat_ports
                {
                    tracing::warn!(
                        "reload: snat_ports and reserve_snat_ports changes take effect at the next agent start (the ports are reserved there)"
                    );
                }
                let old = std::mem::replace(&mut self.config, new);
                self.config.announce = old.announce.clone();
                // Keep agent-wide settings that need a restart.
                self.config.agent.interfaces = old.agent.interfaces.clone();
                self.config.agent.bpffs = old.agent.bpffs.clone();
                self.config.agent.api_socket = old.agent.api_socket.clone();
                self.config.agent.metrics = old.agent.metrics;
                // The range checked against the kernel's ephemeral ports and reserved at
                // start: a new one written to the SNAT pool now could hand out ports that
                // local sockets may take.
                self.config.agent.snat_ports = old.agent.snat_ports;
                self.config.agent.reserve_snat_ports = old.agent.reserve_snat_ports;
                // The overlay in memory came from this file: keep writing it there.
                self.config.agent.state_file = old.agent.state_file.clone();
                self.config.agent.audit_log = old.agent.audit_log.clone();
                self.config.agent.audit_max_bytes = old.agent.audit_max_bytes;
                self.config.agent.audit_keep = old.agent.audit_keep;
                self.config.api = old.api.clone();
                match self.sync() {
                    Ok(report) => {
                        self.metrics.observe_reload(true);
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
                        self.metrics.observe_reload(false);
                        self.last_reload = Some(api::ReloadOutcome {
                            ok: false,
                            at: now_unix(),
                            error: Some(format!("applying the new config failed: {err:#}")),
                        });
                        self.config = old;
                        self.roll_back(&err);
                        Response::error(
                            ErrorCode::Internal,
                            format!("applying the new config failed: {err:#}"),
                        )
                    }
                }
            }
        }
    }

    /// Re-applies the state in force after a failed apply. If that fails too, the datapath
    /// may hold a mix of both: said loudly in the log, `weir status` and the metrics, until
    /// the next apply succeeds.
    fn roll_back(&mut self, cause: &anyhow::Error) {
        if let Err(err) = self.sync() {
            let message = format!(
                "applying a change failed ({cause:#}) and so did restoring the previous state ({err:#})"
            );
            tracing::error!(error = %message, "the datapath may hold a mix of old and new state");
            self.metrics.observe_rollback_failure();
            self.inconsistent = Some(message);
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
        // The rules of the config file hold for the result too: a change that would leave
        // the service with no weight at all (a dead VIP) is refused, not made.
        if let Some(svc) = self.service_config(service) {
            let effective = self.overlay.effective(svc);
            let weights: Vec<u32> = effective.iter().map(|b| b.weight).collect();
            if let Err(reason) = rules::check_total_weight(&weights) {
                self.overlay = before;
                return Response::error(
                    ErrorCode::Conflict,
                    format!(
                        "refused: service {service} would be left with {reason}; its VIP would answer nobody"
                    ),
                );
            }
        }
        if let Err(err) = self.overlay.save(&self.config.agent.state_file) {
            self.overlay = before;
            return Response::error(ErrorCode::Internal, err.to_string());
        }
        if let Err(err) = self.sync() {
            self.overlay = before;
            if let Err(save) = self.overlay.save(&self.config.agent.state_file) {
                tracing::error!(error = %save, "restoring the state file after a failed change failed");
            }
            self.roll_back(&err);
            return Response::error(ErrorCode::Internal, format!("{err:#}"));
        }
        match self
            .backend_infos(Some(service))
            .into_iter()
            .find(|b| b.address == address)
        {
            Some(info) => Response::ok(info),
            None => Response::ok(api::Removed::new(service.to_owned(), address)),
        }
    }

    /// Answers `req` from `who`; a change is recorded in the audit log with the state of
    /// what it changed before and after.
    pub fn handle(&mut self, req: Request, who: &Who) -> Response {
        if !req.is_change() {
            return self.answer(req);
        }
        if req == (Request::Reload {}) {
            return self.reload(who);
        }
        let before = self.audit_state(&req);
        let request = req.clone();
        let response = self.answer(req);
        let after = self.audit_state(&request);
        self.audit
            .record(response_record(who, &request, before, after, &response));
        response
    }

    /// The part of the state a backend change is about, as the audit log shows it before
    /// and after: `null` when the backend is not there.
    fn audit_state(&self, req: &Request) -> serde_json::Value {
        let (Request::BackendAdd {
            service, address, ..
        }
        | Request::BackendRemove { service, address }
        | Request::BackendWeight {
            service, address, ..
        }
        | Request::BackendMaxConns {
            service, address, ..
        }
        | Request::BackendDrain { service, address }
        | Request::BackendEnable { service, address }
        | Request::BackendDisable { service, address }) = req
        else {
            return serde_json::Value::Null;
        };
        self.backend_infos(Some(service))
            .into_iter()
            .find(|b| b.address == *address)
            .map_or(serde_json::Value::Null, |b| {
                serde_json::json!({
                    "weight": b.weight,
                    "admin": b.admin,
                    "health": b.health,
                    "up": b.up,
                    "effective_weight": b.effective_weight,
                    "max_connections": b.max_connections,
                })
            })
    }

    fn answer(&mut self, req: Request) -> Response {
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
                        protocol: s.protocol.into(),
                        scheduler: s.scheduler.into(),
                        forwarding: s.forwarding.into(),
                        ring_size: s.ring_size,
                        health_check: s.health_check.kind.into(),
                        backends: backends.iter().filter(|b| b.service == s.name).count(),
                        backends_up: backends
                            .iter()
                            .filter(|b| b.service == s.name && b.up)
                            .count(),
                        fingerprint: self
                            .balancer
                            .service(&s.name)
                            .map(crate::reconcile::ServiceState::fingerprint)
                            .unwrap_or_default(),
                        rate_limit: rate_limit_info(&s.rate_limit),
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
                        ring_size: state.spec.ring_size,
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
                if let Err(reason) = rules::check_backend_address(svc.vip, svc.forwarding, address)
                {
                    return Response::error(ErrorCode::InvalidAddress, reason);
                }
                if let Err(reason) = rules::check_weight(i64::from(weight)) {
                    return Response::error(ErrorCode::BadRequest, reason);
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
                let resp = self.change(&service, address, |o| {
                    let e = o.entry(&service, address);
                    e.added = false;
                    e.removed = true;
                });
                if resp.ok {
                    self.observed.health.remove(&(service, address));
                }
                resp
            }
            Request::BackendWeight {
                service,
                address,
                weight,
            } => {
                if let Some(resp) = self.require_backend(&service, address) {
                    return resp;
                }
                if let Err(reason) = rules::check_weight(i64::from(weight)) {
                    return Response::error(ErrorCode::BadRequest, reason);
                }
                self.change(&service, address, |o| {
                    o.entry(&service, address).weight = Some(weight);
                })
            }
            Request::BackendMaxConns {
                service,
                address,
                max_connections,
            } => {
                if let Some(resp) = self.require_backend(&service, address) {
                    return resp;
                }
                if let Err(reason) = rules::check_max_connections(i64::from(max_connections)) {
                    return Response::error(ErrorCode::BadRequest, reason);
                }
                self.change(&service, address, |o| {
                    o.entry(&service, address).max_connections = Some(max_connections);
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
            Request::Reload {} => self.reload(&Who::agent("api")),
            Request::AnnounceWithdraw {} => self.set_announce_withdrawn(true),
            Request::AnnounceResume {} => self.set_announce_withdrawn(false),
            // The agent's loop hands these to `conn_job` first: their walk of the NAT table
            // must not run on the owner task.
            Request::ConnList { .. } | Request::ConnFlush { .. } => Response::error(
                ErrorCode::Internal,
                "conn_list and conn_flush are answered by a walk off the owner task",
            ),
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
        format!(
            "unknown service {} (see `weir service list`)",
            rules::quoted(name)
        ),
    )
}

impl Agent {
    pub fn all_backend_addresses(&self) -> Vec<IpAddr> {
        self.config
            .services
            .iter()
            .flat_map(|s| self.overlay.effective(s))
            .map(|b| b.address)
            .collect()
    }
}

/// `weir service list`'s view of a service's `[service.rate_limit]`.
fn rate_limit_info(limits: &config::RateLimitConfig) -> api::RateLimitInfo {
    api::RateLimitInfo {
        new_flows_per_source: limits.per_source.map(|l| l.rate),
        source_burst: limits.per_source.map(|l| l.burst),
        source_prefix: limits.per_source.map(|_| limits.source_prefix),
        new_flows_per_vip: limits.per_vip.map(|l| l.rate),
        vip_burst: limits.per_vip.map(|l| l.burst),
    }
}

#[cfg(test)]
mod tests {
    use lb_common::PROTO_UDP;

    use super::*;

    #[test]
    fn health_checks_probe_the_port_the_backend_listens_on() {
        let config = |check_port: &str| {
            config::parse(
                &format!(
                    "[agent]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\n\
                     vip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n\
                     forwarding = \"nat\"\n[service.health_check]\nkind = \"tcp\"\n\
                     {check_port}\n[[service.backend]]\naddress = \"198.51.100.11\"\n\
                     port = 8080\n[[service.backend]]\naddress = \"198.51.100.12\"\n"
                ),
                std::path::Path::new("t.toml"),
            )
            .expect("valid config")
        };
        let plain = config("");
        let service = &plain.services[0];
        assert_eq!(check_port(service, service.backends[0].port), 8080);
        assert_eq!(check_port(service, service.backends[1].port), 80);
        let explicit = config("port = 9000");
        let service = &explicit.services[0];
        assert_eq!(check_port(service, service.backends[0].port), 9000);
    }

    /// Backend 3 in generation 2: TCP flows idle out after 900 s, UDP ones after `udp_ns`.
    fn backend_3(udp_ns: u64) -> HashMap<u32, BackendTimeouts> {
        [(
            3,
            BackendTimeouts {
                generation: 2,
                up: true,
                tcp_ns: 900_000_000_000,
                udp_ns,
            },
        )]
        .into_iter()
        .collect()
    }

    fn tcp_and_udp_keys() -> (FlowKey, FlowKey) {
        let key = |proto| FlowKey {
            proto,
            ..FlowKey::default()
        };
        (key(PROTO_TCP), key(PROTO_UDP))
    }

    #[test]
    fn only_live_counted_entries_of_the_current_generation_count() {
        let backends = backend_3(10_000_000_000);
        let now = 1_000_000_000_000;
        let (tcp, udp) = tcp_and_udp_keys();
        let live = FlowValue {
            backend_id: 3,
            generation: 2,
            last_seen_ns: now - 5_000_000_000,
            flags: FLOW_COUNTED,
        };
        assert!(counts_as_active(&tcp, &live, &backends, now));
        assert!(counts_as_active(&udp, &live, &backends, now));
        let idle_udp = FlowValue {
            last_seen_ns: now - 11_000_000_000,
            ..live
        };
        assert!(!counts_as_active(&udp, &idle_udp, &backends, now));
        assert!(counts_as_active(&tcp, &idle_udp, &backends, now));
        for other in [
            FlowValue { flags: 0, ..live },
            FlowValue {
                flags: FLOW_COUNTED | FLOW_CLOSED,
                ..live
            },
            FlowValue {
                generation: 1,
                ..live
            },
            FlowValue {
                backend_id: 4,
                ..live
            },
        ] {
            assert!(!counts_as_active(&tcp, &other, &backends, now), "{other:?}");
        }
    }

    /// The agent's expiry of established entries: idle past the service's timeout, closed
    /// for 10 s, unconfirmed (nothing after the ACK that made it) for 10 s, or stale; a
    /// confirmed, open entry stays however long it idles within its timeout.
    #[test]
    fn expiry_of_established_entries() {
        let backends = backend_3(30_000_000_000);
        let now = 2_000_000_000_000;
        let (tcp, udp) = tcp_and_udp_keys();
        let s = 1_000_000_000;
        let entry = |idle_s: u64, flags: u64| FlowValue {
            backend_id: 3,
            generation: 2,
            last_seen_ns: now - idle_s * s,
            flags,
        };
        let confirmed = FLOW_COUNTED | FLOW_CONFIRMED;
        for (key, value, want) in [
            (tcp, entry(800, confirmed), None),
            (tcp, entry(901, confirmed), Some(Expiry::Idle)),
            (udp, entry(31, confirmed), Some(Expiry::Idle)),
            (tcp, entry(9, FLOW_COUNTED | FLOW_CLOSED), None),
            (
                tcp,
                entry(11, FLOW_COUNTED | FLOW_CLOSED),
                Some(Expiry::Closed),
            ),
            (
                tcp,
                entry(11, FLOW_COUNTED | FLOW_CONFIRMED | FLOW_CLOSED),
                Some(Expiry::Closed),
            ),
            (tcp, entry(9, FLOW_COUNTED), None),
            (tcp, entry(11, FLOW_COUNTED), Some(Expiry::Unconfirmed)),
            (udp, entry(11, FLOW_COUNTED), Some(Expiry::Unconfirmed)),
            (
                tcp,
                FlowValue {
                    generation: 1,
                    ..entry(0, confirmed)
                },
                Some(Expiry::Stale),
            ),
            (
                tcp,
                FlowValue {
                    backend_id: 4,
                    ..entry(0, confirmed)
                },
                Some(Expiry::Stale),
            ),
        ] {
            assert_eq!(expiry(&key, &value, &backends, now), want, "{value:?}");
        }
        assert_eq!(
            Expiry::ALL.map(Expiry::label),
            ["idle", "closed", "unconfirmed", "stale"]
        );
    }

    /// A `nat` pair of backend 3 (generation 2): client 198.51.100.2:40000 → VIP :80 ⇒
    /// backend :8080, both entries seen `idle_s` ago with timeout `timeout_s`.
    fn nat_pair(idle_fwd_s: u64, idle_reply_s: u64, now: u64) -> [(FlowKey, NatEntry); 2] {
        use lb_common::{FAMILY_V4, nat::NAT_NO_SNAT};
        let mut fwd_key = FlowKey {
            src_port_be: 40000u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        fwd_key.src_addr[..4].copy_from_slice(&[198, 51, 100, 2]);
        fwd_key.dst_addr[..4].copy_from_slice(&[203, 0, 113, 10]);
        let mut backend = [0u8; 16];
        backend[..4].copy_from_slice(&[198, 51, 100, 11]);
        let fwd = NatEntry {
            new_src_addr: fwd_key.src_addr,
            new_dst_addr: backend,
            new_src_port_be: fwd_key.src_port_be,
            new_dst_port_be: 8080u16.to_be(),
            backend_id: 3,
            generation: 2,
            last_seen_ns: now - idle_fwd_s * 1_000_000_000,
            flags: FLOW_COUNTED,
            timeout_s: 60,
            snat_slot: NAT_NO_SNAT,
            ..NatEntry::default()
        };
        let reply_key = fwd.partner_key(&fwd_key);
        let reply = NatEntry {
            new_src_addr: fwd_key.dst_addr,
            new_dst_addr: fwd_key.src_addr,
            new_src_port_be: fwd_key.dst_port_be,
            new_dst_port_be: fwd_key.src_port_be,
            last_seen_ns: now - idle_reply_s * 1_000_000_000,
            flags: NAT_REPLY,
            ..fwd
        };
        assert_eq!(reply.partner_key(&reply_key), fwd_key);
        [(fwd_key, fwd), (reply_key, reply)]
    }

    #[test]
    fn the_nat_walk_counts_live_pairs_and_reclaims_only_what_the_datapath_refuses() {
        let mut backends: HashMap<u32, BackendTimeouts> = [(
            3,
            BackendTimeouts {
                generation: 2,
                up: true,
                tcp_ns: 0,
                udp_ns: 0,
            },
        )]
        .into_iter()
        .collect();
        let now = 1_000_000_000_000;
        let none = HashSet::new();
        // Live, and live while only one side talks.
        for (f, r) in [(1, 1), (100, 1), (1, 100)] {
            let table: HashMap<FlowKey, NatEntry> = nat_pair(f, r, now).into_iter().collect();
            let out = nat_walk(&table, &backends, now, &none);
            assert_eq!(out.counts.get(&3), Some(&1), "idle {f}/{r}");
            assert_eq!(out.pairs.get(&3), Some(&1), "idle {f}/{r}");
            assert!(out.reclaim.is_empty() && out.orphans.is_empty());
        }
        // Both idle past 60 s + the margin: reclaimed, both keys. Within the margin: kept.
        let table: HashMap<FlowKey, NatEntry> = nat_pair(63, 63, now).into_iter().collect();
        let mut out = nat_walk(&table, &backends, now, &none);
        out.reclaim.sort_by_key(|k| k.src_port_be);
        assert_eq!(out.reclaim.len(), 2);
        assert!(out.counts.is_empty() && out.pairs.is_empty());
        let table: HashMap<FlowKey, NatEntry> = nat_pair(61, 61, now).into_iter().collect();
        assert!(nat_walk(&table, &backends, now, &none).reclaim.is_empty());
        // An orphan is reclaimed at its second walk, not its first.
        let [(fwd_key, fwd), _] = nat_pair(1, 1, now);
        let table: HashMap<FlowKey, NatEntry> = [(fwd_key, fwd)].into_iter().collect();
        let first = nat_walk(&table, &backends, now, &none);
        assert!(first.reclaim.is_empty());
        assert!(first.orphans.contains(&fwd_key));
        // Half a pair is no connection for the gauge.
        assert!(first.pairs.is_empty());
        let second = nat_walk(&table, &backends, now, &first.orphans);
        assert_eq!(second.reclaim, [fwd_key]);
        // A backend down, or its id given to another generation: not honoured, reclaimed.
        let table: HashMap<FlowKey, NatEntry> = nat_pair(1, 1, now).into_iter().collect();
        backends.get_mut(&3).unwrap().up = false;
        assert_eq!(nat_walk(&table, &backends, now, &none).reclaim.len(), 2);
        backends.get_mut(&3).unwrap().up = true;
        backends.get_mut(&3).unwrap().generation = 3;
        let out = nat_walk(&table, &backends, now, &none);
        assert_eq!(out.reclaim.len(), 2);
        assert!(out.counts.is_empty() && out.pairs.is_empty());
        // A closing connection (FIN seen) no longer counts for least-conn, but is still in
        // the table: the gauge shows it.
        backends.get_mut(&3).unwrap().generation = 2;
        let mut table: HashMap<FlowKey, NatEntry> = nat_pair(1, 1, now).into_iter().collect();
        for e in table.values_mut() {
            e.flags |= FLOW_CLOSED;
        }
        let out = nat_walk(&table, &backends, now, &none);
        assert!(out.counts.is_empty());
        assert_eq!(out.pairs.get(&3), Some(&1));
    }

    /// A `fullnat` pair: `nat_pair`'s client port `cport` to backend id `id` at
    /// `backend`:8080, translated to `snat`:`sport`.
    fn fullnat_pair(
        id: u32,
        backend: [u8; 4],
        cport: u16,
        snat: [u8; 4],
        sport: u16,
        now: u64,
    ) -> [(FlowKey, NatEntry); 2] {
        let [(mut fwd_key, mut fwd), _] = nat_pair(1, 1, now);
        fwd_key.src_port_be = cport.to_be();
        fwd.backend_id = id;
        fwd.new_dst_addr[..4].copy_from_slice(&backend);
        fwd.new_src_addr = [0; 16];
        fwd.new_src_addr[..4].copy_from_slice(&snat);
        fwd.new_src_port_be = sport.to_be();
        fwd.snat_slot = 0;
        let reply_key = fwd.partner_key(&fwd_key);
        let reply = NatEntry {
            new_src_addr: fwd_key.dst_addr,
            new_dst_addr: fwd_key.src_addr,
            new_src_port_be: fwd_key.dst_port_be,
            new_dst_port_be: fwd_key.src_port_be,
            flags: NAT_REPLY,
            ..fwd
        };
        [(fwd_key, fwd), (reply_key, reply)]
    }

    #[test]
    fn snat_use_counts_the_ports_held_per_address_and_the_fullest_backend() {
        let now = 1_000_000_000_000;
        let (b1, b2) = ([198, 51, 100, 11], [198, 51, 100, 12]);
        let (a1, a2) = ([198, 51, 100, 1], [198, 51, 100, 2]);
        let mut table: HashMap<FlowKey, NatEntry> = HashMap::new();
        // Service "web" (backend ids 3 and 4): three pairs to b1 on a1, one to b2 on a1,
        // one to b1 on a2; one of b1's on a1 has a port outside today's range.
        for (id, backend, cport, snat, sport) in [
            (3, b1, 40_000, a1, 61_000),
            (3, b1, 40_001, a1, 61_001),
            (3, b1, 40_002, a1, 50_000),
            (4, b2, 40_003, a1, 61_000),
            (3, b1, 40_004, a2, 61_000),
        ] {
            table.extend(fullnat_pair(id, backend, cport, snat, sport, now));
        }
        // Service "api" (backend id 5) shares b1:8080 and a1: its pair takes b1's ports too.
        table.extend(fullnat_pair(5, b1, 40_005, a1, 61_002, now));
        // A `nat` pair holds no SNAT port.
        table.extend(nat_pair(1, 1, now));
        // A pair the walk reclaims holds none either.
        let gone = fullnat_pair(3, b1, 40_006, a1, 61_003, now);
        let reclaimed: Vec<FlowKey> = gone.iter().map(|(k, _)| *k).collect();
        table.extend(gone);

        let claims = snat_claims(&table, &reclaimed, (61_000, 61_003));
        assert_eq!(claims.values().sum::<u64>(), 6, "{claims:?}");
        let ip = |a: [u8; 4]| IpAddr::from(a);
        let services = [
            (
                "web".to_owned(),
                HashSet::from([3, 4]),
                vec![ip(a1), ip(a2)],
            ),
            ("api".to_owned(), HashSet::from([5]), vec![ip(a1)]),
            ("idle".to_owned(), HashSet::from([9]), vec![ip(a2)]),
        ];
        let rows: Vec<(String, IpAddr, u64, u64)> = snat_use(&services, &claims, 4)
            .into_iter()
            .map(|u| {
                assert_eq!(u.port_count, 4);
                (u.service, u.address, u.ports_in_use, u.fullest_backend)
            })
            .collect();
        assert_eq!(
            rows,
            [
                // web on a1: 4 pairs; b1:8080 holds 3 in-range ports there (2 of web's,
                // 1 of api's), b2 holds 1.
                ("web".to_owned(), ip(a1), 4, 3),
                ("web".to_owned(), ip(a2), 1, 1),
                ("api".to_owned(), ip(a1), 1, 3),
                // An address without pairs still gets its row (a 0 series to alert on).
                ("idle".to_owned(), ip(a2), 0, 0),
            ]
        );
    }
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    fn parse(backends: &str, extra_service: &str) -> Config {
        config::parse(
            &format!(
                "[agent]\ninterface = \"eth0\"\ntunnel_source = \"198.51.100.1\"\n[[service]]\nname = \"web\"\n\
                 vip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n{backends}{extra_service}"
            ),
            std::path::Path::new("t.toml"),
        )
        .expect("valid config")
    }

    #[test]
    fn a_reload_diff_names_what_changed() {
        let old = parse(
            "[[service.backend]]\naddress = \"198.51.100.11\"\n\
             [[service.backend]]\naddress = \"198.51.100.12\"\n",
            "",
        );
        let new = parse(
            "[[service.backend]]\naddress = \"198.51.100.11\"\nweight = 3\n\
             [[service.backend]]\naddress = \"198.51.100.13\"\n",
            "[[service]]\nname = \"dns\"\nvip = \"203.0.113.53\"\nport = 53\n\
             protocol = \"udp\"\n[[service.backend]]\naddress = \"198.51.100.53\"\n",
        );
        let diff = config_diff(&old, &new);
        assert_eq!(diff["services_added"], serde_json::json!(["dns"]));
        assert_eq!(diff["services_removed"], serde_json::json!([]));
        assert_eq!(diff["services_changed"], serde_json::json!([]));
        assert_eq!(
            diff["backends_added"],
            serde_json::json!(["web/198.51.100.13", "dns/198.51.100.53"])
        );
        assert_eq!(
            diff["backends_removed"],
            serde_json::json!(["web/198.51.100.12"])
        );
        assert_eq!(
            diff["backends_changed"],
            serde_json::json!(["web/198.51.100.11"])
        );
        let back = config_diff(&new, &old);
        assert_eq!(back["services_removed"], serde_json::json!(["dns"]));
        assert_eq!(
            config_diff(&old, &old)["backends_changed"],
            serde_json::json!([])
        );
    }

    #[test]
    fn a_change_record_carries_who_target_and_error() {
        let who = Who::Unix {
            uid: 1000,
            pid: Some(42),
        };
        let request = Request::BackendWeight {
            service: "web".into(),
            address: "198.51.100.11".parse().unwrap(),
            weight: 3,
        };
        let refused = Response::error(ErrorCode::UnknownBackend, "no such backend");
        let record = response_record(
            &who,
            &request,
            serde_json::Value::Null,
            serde_json::Value::Null,
            &refused,
        );
        assert_eq!(record.what, "backend_weight");
        assert_eq!(record.target.as_deref(), Some("web/198.51.100.11"));
        assert_eq!(record.result, Outcome::Error);
        assert_eq!(record.error.as_deref(), Some("no such backend"));
        let line = serde_json::to_value(&record).unwrap();
        assert_eq!(
            line["who"],
            serde_json::json!({"kind": "unix", "uid": 1000, "pid": 42})
        );
        assert_eq!(line["result"], "error");
    }
}
