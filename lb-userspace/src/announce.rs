//! BGP announcements of the VIPs through BIRD (`[announce]`): which VIPs this balancer
//! announces, why, and since when, and the kernel routes BIRD learns them from.
//!
//! The agent opens a TUN device of its own (not persistent) and, while a VIP can be served,
//! keeps a host route for it on that device in the `[announce] table`:
//! `203.0.113.10/32 dev weir-vips table 100 proto static`. BIRD's kernel protocol imports
//! that table (`kernel table 100; learn;`) and its BGP sessions export what it learned
//! (config/bird-weir.conf). The agent never talks to BIRD, and BIRD never needs to know the
//! agent:
//!
//! - **The agent dies** (SIGKILL, a panic, OOM): the kernel closes the TUN file, deletes
//!   the device and every route on it; BIRD sees the device go, rescans the table and
//!   withdraws at once (measured: milliseconds). No announcement outlives the agent, so
//!   none outlives its health checks; the pinned datapath keeps forwarding what still
//!   reaches it meanwhile.
//! - **BIRD restarts**: it reads the table at start and announces what is there.
//! - **They disagree** (someone deleted or added a route by hand, an `ip` call failed):
//!   every 5 s [`Announcer::verify`] compares the table with what the agent wants and
//!   repairs it; BIRD follows the table.
//!
//! A VIP is wanted while the agent is ready (attached, and at start every checked backend
//! has its first verdict: the agent decides when), the operator has not withdrawn the
//! balancer (`weir announce withdraw`, kept in the state file) and at least one service on
//! the VIP has a backend that takes new flows. SIGTERM withdraws everything before the
//! agent exits.
//!
//! Routes are changed with iproute2's `ip route` (a few a minute at most, each a
//! millisecond): no netlink code of our own, and the commands are the ones an operator
//! types to check (`ip route show table 100`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{config::AnnounceConfig, sys};

/// Why a VIP is or is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Announced: a service on it has a backend that takes new flows.
    Serving,
    /// The agent has not finished starting (the XDP program is not attached yet).
    Starting,
    /// No service on the VIP has a backend that takes new flows.
    NoBackend,
    /// `weir announce withdraw`.
    Operator,
    /// The agent is stopping (SIGTERM, SIGINT).
    Stopping,
}

impl Reason {
    /// The word `weir status` and the API show.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Starting => "starting",
            Self::NoBackend => "no-backend",
            Self::Operator => "withdrawn",
            Self::Stopping => "stopping",
        }
    }
}

/// One VIP as the announcer tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipState {
    /// Whether its route is in the table (as far as the last change or check knows).
    pub announced: bool,
    /// Unix seconds of the last change of `announced` (or when the agent first saw the VIP).
    pub since: u64,
    /// Why it is (not) wanted.
    pub reason: Reason,
}

/// The kernel routes the announcer keeps: host routes of VIPs on its device in its table.
pub trait Routes {
    /// The VIPs that have a host route now.
    fn list(&mut self) -> anyhow::Result<BTreeSet<IpAddr>>;
    /// Adds (or replaces) the host route of `vip`.
    fn add(&mut self, vip: IpAddr) -> anyhow::Result<()>;
    /// Deletes the host route of `vip`; one that is not there is no error.
    fn remove(&mut self, vip: IpAddr) -> anyhow::Result<()>;
}

/// [`Routes`] through iproute2: `ip route replace|del VIP/32 dev DEVICE table N`.
#[derive(Debug)]
pub struct IpRoutes {
    device: String,
    table: String,
}

impl IpRoutes {
    #[must_use]
    pub fn new(device: &str, table: u32) -> Self {
        Self {
            device: device.to_owned(),
            table: table.to_string(),
        }
    }

    fn host_route(vip: IpAddr) -> (&'static str, String) {
        match vip {
            IpAddr::V4(v4) => ("-4", format!("{v4}/32")),
            IpAddr::V6(v6) => ("-6", format!("{v6}/128")),
        }
    }
}

/// Runs `ip ARGS`; a failure carries the command line and what `ip` said.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run `ip {}` (is iproute2 installed?)",
                args.join(" ")
            )
        })?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host routes in `ip -j route show` output: `dst` of every entry that is an address
/// (iproute2 prints a host route without its /32 or /128), others (prefixes) left out.
pub fn parse_route_json(text: &str) -> anyhow::Result<BTreeSet<IpAddr>> {
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
    }
    if text.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let routes: Vec<Route> =
        serde_json::from_str(text).context("reading `ip -j route show` output")?;
    Ok(routes
        .into_iter()
        .filter_map(|r| {
            let dst = r
                .dst
                .strip_suffix("/32")
                .or_else(|| r.dst.strip_suffix("/128"))
                .unwrap_or(&r.dst);
            dst.parse().ok()
        })
        .collect())
}

impl Routes for IpRoutes {
    fn list(&mut self) -> anyhow::Result<BTreeSet<IpAddr>> {
        let mut all = BTreeSet::new();
        for family in ["-4", "-6"] {
            let text = ip(&[
                "-j",
                family,
                "route",
                "show",
                "table",
                &self.table,
                "dev",
                &self.device,
            ])?;
            all.extend(parse_route_json(&text)?);
        }
        Ok(all)
    }

    fn add(&mut self, vip: IpAddr) -> anyhow::Result<()> {
        let (family, dst) = Self::host_route(vip);
        ip(&[
            family,
            "route",
            "replace",
            &dst,
            "dev",
            &self.device,
            "table",
            &self.table,
            "proto",
            "static",
        ])
        .map(drop)
    }

    fn remove(&mut self, vip: IpAddr) -> anyhow::Result<()> {
        let (family, dst) = Self::host_route(vip);
        match ip(&[
            family,
            "route",
            "del",
            &dst,
            "dev",
            &self.device,
            "table",
            &self.table,
        ]) {
            Ok(_) => Ok(()),
            // ESRCH: not there, which is what was asked.
            Err(err) if format!("{err:#}").contains("No such process") => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// The agent's TUN device: its routes live as long as this file is open.
#[derive(Debug)]
pub struct Tun {
    _file: File,
}

impl Tun {
    /// Creates the device and brings it up (routes cannot be added to a device that is
    /// down). The error names the key to change.
    pub fn create(config: &AnnounceConfig) -> anyhow::Result<Self> {
        let file = sys::create_tun(&config.device).with_context(|| {
            format!(
                "creating TUN device {} for the VIP routes ([announce] device; another agent \
                 or program may hold a device of that name)",
                config.device
            )
        })?;
        ip(&["link", "set", "dev", &config.device, "up"])?;
        Ok(Self { _file: file })
    }
}

/// What the agent announces, and the routes that say so.
#[derive(Debug)]
pub struct Announcer<R> {
    routes: R,
    vips: BTreeMap<IpAddr, VipState>,
    /// `weir announce withdraw` is in force.
    withdrawn: bool,
    /// The XDP program is attached: until then nothing is announced.
    ready: bool,
    /// Set at stop: nothing is announced any more.
    stopping: bool,
    /// Held, never read: closing it deletes the device and its routes.
    _tun: Option<Tun>,
}

/// One change [`Announcer::update`] made, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub vip: IpAddr,
    pub announced: bool,
    pub reason: Reason,
}

impl<R: Routes> Announcer<R> {
    /// An announcer over `routes`, not ready yet; `withdrawn` as the state file says.
    pub fn new(routes: R, tun: Option<Tun>, withdrawn: bool) -> Self {
        Self {
            routes,
            vips: BTreeMap::new(),
            withdrawn,
            ready: false,
            stopping: false,
            _tun: tun,
        }
    }

    /// Whether the operator withdrew this balancer.
    #[must_use]
    pub const fn withdrawn(&self) -> bool {
        self.withdrawn
    }

    /// Every VIP with its state, in address order.
    pub fn vips(&self) -> impl Iterator<Item = (IpAddr, VipState)> + '_ {
        self.vips.iter().map(|(vip, state)| (*vip, *state))
    }

    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    pub fn set_withdrawn(&mut self, withdrawn: bool) {
        self.withdrawn = withdrawn;
    }

    pub fn set_stopping(&mut self) {
        self.stopping = true;
    }

    fn reason(&self, usable: bool) -> Reason {
        if self.stopping {
            Reason::Stopping
        } else if !self.ready {
            Reason::Starting
        } else if self.withdrawn {
            Reason::Operator
        } else if usable {
            Reason::Serving
        } else {
            Reason::NoBackend
        }
    }

    /// Brings the routes in line with `usable` (every VIP of the config, and whether any
    /// of its services has a backend that takes new flows) at unix time `now`. A route
    /// that cannot be changed is logged and left for [`Self::verify`] to retry.
    pub fn update(&mut self, usable: &BTreeMap<IpAddr, bool>, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        // VIPs gone from the config are withdrawn and forgotten.
        let gone: Vec<IpAddr> = self
            .vips
            .keys()
            .filter(|vip| !usable.contains_key(vip))
            .copied()
            .collect();
        for vip in gone {
            if self.vips.get(&vip).is_some_and(|s| s.announced) {
                match self.routes.remove(vip) {
                    Ok(()) => changes.push(Change {
                        vip,
                        announced: false,
                        reason: Reason::NoBackend,
                    }),
                    Err(err) => {
                        tracing::error!(%vip, error = %format!("{err:#}"), "withdrawing a VIP no longer configured failed");
                        continue;
                    }
                }
            }
            self.vips.remove(&vip);
        }
        for (&vip, &ok) in usable {
            let reason = self.reason(ok);
            let want = reason == Reason::Serving;
            let state = self.vips.entry(vip).or_insert(VipState {
                announced: false,
                since: now,
                reason,
            });
            state.reason = reason;
            if state.announced == want {
                continue;
            }
            let result = if want {
                self.routes.add(vip)
            } else {
                self.routes.remove(vip)
            };
            match result {
                Ok(()) => {
                    state.announced = want;
                    state.since = now;
                    changes.push(Change {
                        vip,
                        announced: want,
                        reason,
                    });
                }
                Err(err) => {
                    tracing::error!(%vip, announce = want, error = %format!("{err:#}"), "changing the VIP's route failed; retried within 5 s");
                }
            }
        }
        changes
    }

    /// Compares the table with what is wanted and repairs it: a wanted route that is
    /// missing is added again, an unwanted one on the device is deleted. Returns how many
    /// routes it fixed.
    pub fn verify(&mut self, now: u64) -> anyhow::Result<usize> {
        let present = self.routes.list()?;
        let mut fixed = 0;
        for (vip, state) in &mut self.vips {
            let want = state.reason == Reason::Serving;
            let there = present.contains(vip);
            if want != there {
                let result = if want {
                    self.routes.add(*vip)
                } else {
                    self.routes.remove(*vip)
                };
                match result {
                    Ok(()) => {
                        tracing::warn!(%vip, announce = want, "the VIP's route was not as the agent left it; repaired");
                        fixed += 1;
                    }
                    Err(err) => {
                        tracing::error!(%vip, announce = want, error = %format!("{err:#}"), "repairing the VIP's route failed");
                        continue;
                    }
                }
            }
            if state.announced != want {
                state.announced = want;
                state.since = now;
            }
        }
        for vip in present {
            if !self.vips.contains_key(&vip) {
                match self.routes.remove(vip) {
                    Ok(()) => fixed += 1,
                    Err(err) => {
                        tracing::error!(%vip, error = %format!("{err:#}"), "deleting a stray route on the announce device failed");
                    }
                }
            }
        }
        Ok(fixed)
    }
}

impl Announcer<IpRoutes> {
    /// Creates the TUN device of `config` and an announcer over its table.
    pub fn start(config: &AnnounceConfig, withdrawn: bool) -> anyhow::Result<Self> {
        let tun = Tun::create(config)?;
        Ok(Self::new(
            IpRoutes::new(&config.device, config.table),
            Some(tun),
            withdrawn,
        ))
    }
}

/// Each VIP of `services` (VIP, whether the service has a backend that takes new flows)
/// and whether any of its services can serve: a VIP shared by several services (ports) is
/// announced while one of them can, since withdrawing it would take the healthy ones down
/// with the dead one.
pub fn usable_vips(services: impl IntoIterator<Item = (IpAddr, bool)>) -> BTreeMap<IpAddr, bool> {
    let mut out = BTreeMap::new();
    for (vip, usable) in services {
        *out.entry(vip).or_insert(false) |= usable;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A routing table in memory, with a switch to make every change fail.
    #[derive(Debug, Default)]
    struct FakeRoutes {
        table: BTreeSet<IpAddr>,
        broken: bool,
    }

    impl Routes for &mut FakeRoutes {
        fn list(&mut self) -> anyhow::Result<BTreeSet<IpAddr>> {
            Ok(self.table.clone())
        }

        fn add(&mut self, vip: IpAddr) -> anyhow::Result<()> {
            if self.broken {
                bail!("broken");
            }
            self.table.insert(vip);
            Ok(())
        }

        fn remove(&mut self, vip: IpAddr) -> anyhow::Result<()> {
            if self.broken {
                bail!("broken");
            }
            self.table.remove(&vip);
            Ok(())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_vip_is_announced_only_while_ready_serving_and_not_withdrawn() {
        let mut routes = FakeRoutes::default();
        let web = ip("203.0.113.10");
        let dns = ip("2001:db8::53");
        let usable = |w, d| usable_vips([(web, w), (dns, d)]);
        {
            let mut a = Announcer::new(&mut routes, None, false);
            // Not ready: nothing.
            assert!(a.update(&usable(true, true), 1).is_empty());
            assert_eq!(a.vips().next().unwrap().1.reason, Reason::Starting);
            a.set_ready();
            let changes = a.update(&usable(true, false), 2);
            assert_eq!(
                changes,
                [Change {
                    vip: web,
                    announced: true,
                    reason: Reason::Serving
                }]
            );
            let states: BTreeMap<IpAddr, VipState> = a.vips().collect();
            assert_eq!(states[&web].since, 2);
            assert_eq!(states[&dns].reason, Reason::NoBackend);
            assert!(!states[&dns].announced);
            // Nothing changes: nothing written, `since` kept.
            assert!(a.update(&usable(true, false), 3).is_empty());
            assert_eq!(a.vips().next().unwrap().1.since, 2);
            // The operator withdraws: gone, and stays gone while the backends are fine.
            a.set_withdrawn(true);
            assert_eq!(a.update(&usable(true, true), 4).len(), 1);
            assert!(
                a.vips()
                    .all(|(_, s)| !s.announced && s.reason == Reason::Operator)
            );
            a.set_withdrawn(false);
            assert_eq!(a.update(&usable(true, true), 5).len(), 2);
            a.set_stopping();
            assert_eq!(a.update(&usable(true, true), 6).len(), 2);
            assert!(a.vips().all(|(_, s)| s.reason == Reason::Stopping));
        }
        assert!(routes.table.is_empty());
    }

    #[test]
    fn a_vip_removed_from_the_config_is_withdrawn_and_forgotten() {
        let mut routes = FakeRoutes::default();
        let web = ip("203.0.113.10");
        {
            let mut a = Announcer::new(&mut routes, None, false);
            a.set_ready();
            a.update(&usable_vips([(web, true)]), 1);
            let changes = a.update(&BTreeMap::new(), 2);
            assert_eq!(changes.len(), 1);
            assert_eq!(a.vips().count(), 0);
        }
        assert!(routes.table.is_empty());
    }

    #[test]
    fn verify_repairs_what_someone_else_changed_and_retries_what_failed() {
        let mut routes = FakeRoutes {
            broken: true,
            ..FakeRoutes::default()
        };
        let web = ip("203.0.113.10");
        let stray = ip("203.0.113.99");
        let mut a = Announcer::new(&mut routes, None, false);
        a.set_ready();
        // The add fails: not announced, no change reported.
        assert!(a.update(&usable_vips([(web, true)]), 1).is_empty());
        assert!(!a.vips().next().unwrap().1.announced);
        a.routes.broken = false;
        a.routes.table.insert(stray);
        assert_eq!(a.verify(2).unwrap(), 2);
        assert_eq!(a.routes.table, BTreeSet::from([web]));
        assert!(a.vips().next().unwrap().1.announced);
        // Someone deletes the route by hand: put back at the next check.
        a.routes.table.clear();
        assert_eq!(a.verify(3).unwrap(), 1);
        assert_eq!(a.verify(4).unwrap(), 0);
        assert_eq!(a.routes.table, BTreeSet::from([web]));
    }

    #[test]
    fn a_shared_vip_is_usable_while_any_of_its_services_is() {
        let vip = ip("203.0.113.10");
        assert!(usable_vips([(vip, false), (vip, true), (vip, false)])[&vip]);
        assert!(!usable_vips([(vip, false)])[&vip]);
    }

    #[test]
    fn ip_route_json_gives_host_routes() {
        let text = r#"[{"dst":"203.0.113.10","dev":"weir-vips","protocol":"static","scope":"link","flags":[]},
            {"dst":"198.51.100.0/24","dev":"weir-vips"},{"dst":"2001:db8::10","dev":"weir-vips"},
            {"dst":"203.0.113.11/32","dev":"weir-vips"}]"#;
        assert_eq!(
            parse_route_json(text).unwrap(),
            BTreeSet::from([ip("203.0.113.10"), ip("2001:db8::10"), ip("203.0.113.11")])
        );
        assert!(parse_route_json("").unwrap().is_empty());
        assert!(parse_route_json("[]\n").unwrap().is_empty());
        assert!(parse_route_json("not json").is_err());
    }
}
