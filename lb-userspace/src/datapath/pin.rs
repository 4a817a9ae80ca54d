//! Pinning and adoption: the bpffs directory that keeps the datapath alive without an
//! agent, the lock that allows one agent per datapath, attaching (or adopting) the pinned
//! XDP link, undoing a start that failed half way, and `weir teardown`.
//!
//! The agent only ever removes what it recognises as its own: the pins it names in
//! [`PINNED_MAPS`], and the link pins [`LINK_PIN`] and `link:<interface>` ([`link_pin`]),
//! inside a directory that is on a bpffs.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use lb_common::map_name;

use super::AttachedMode;
use crate::{
    config::XdpMode,
    sys::{self, DirLock, LockError},
};

/// The maps the agent pins under `[agent] bpffs` and a restarted agent adopts. Not the
/// benchmark template or the decap program's VIP set.
pub const PINNED_MAPS: [&str; 28] = [
    map_name::VIPS,
    map_name::SERVICES,
    map_name::VIP_ADDRS,
    map_name::VIP_ADDR_BITS,
    map_name::BACKENDS,
    map_name::RING,
    map_name::CONNTRACK,
    // Flows in their handshake: a restart loses none.
    map_name::HALF_OPEN,
    map_name::STATS,
    map_name::VIP_STATS,
    map_name::BACKEND_STATS,
    map_name::TX_PORTS,
    map_name::GLOBAL,
    map_name::NEXT_HOPS,
    map_name::BACKEND_CONNS,
    map_name::RR_COUNTERS,
    map_name::FRAG_SERVICES,
    map_name::SOURCE_RULES,
    map_name::SOURCE_RULE_STATS,
    // The limits the VIPS flags name, and the buckets: a restart neither lifts a limit nor
    // hands every source a fresh burst.
    map_name::RATE_LIMITS,
    map_name::RATE_STATE,
    map_name::RATE_VIP_STATE,
    map_name::RATE_STATS,
    // NAT pairs: a restarted agent (or a SIGKILLed one) loses no NATed connection.
    map_name::NAT_CT,
    // The SNAT addresses the pairs' replies are addressed to: kept with the pairs.
    map_name::SNAT_POOL,
    // Connection limits: the running program keeps enforcing them without an agent.
    map_name::CONN_LIMITS,
    map_name::SPILL_SETS,
    map_name::CONN_LIMIT_STATS,
];

/// Name of the pinned XDP link of the first interface in the bpffs directory.
pub const LINK_PIN: &str = "link";

/// Prefix of the link pins of the other interfaces (`[agent] interfaces`): `link:<name>`.
const LINK_PIN_PREFIX: &str = "link:";

/// The link pin of the `index`-th configured interface: [`LINK_PIN`] for the first (as a
/// one-interface agent has always named it, so an upgrade adopts it), `link:<name>` for the
/// others, with every `.` of the name (a VLAN device's `eth0.100`) written as `:`. A bpffs
/// refuses names with a dot (`EPERM`), and an interface name never holds a `:`, so the
/// mapping is one to one.
#[must_use]
pub fn link_pin(index: usize, interface: &str) -> String {
    if index == 0 {
        LINK_PIN.to_owned()
    } else {
        format!("{LINK_PIN_PREFIX}{}", interface.replace('.', ":"))
    }
}

/// The link pins present in `dir`: [`LINK_PIN`] and every `link:<name>`, sorted.
#[must_use]
pub fn link_pins(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name == LINK_PIN || name.starts_with(LINK_PIN_PREFIX))
        .collect();
    found.sort();
    found
}

/// Unpins (and so detaches, when it is the last reference) the XDP link pinned at `pin`.
fn unpin_link(pin: &Path) -> anyhow::Result<()> {
    let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let fd_link = pinned
        .unpin()
        .with_context(|| format!("unpinning {}", pin.display()))?;
    drop(fd_link);
    Ok(())
}

/// Detaches the links of interfaces no longer configured: the pins in `dir` other than
/// `wanted`. They would otherwise keep running the previous agent's program on an
/// interface the operator took out of the config.
pub fn detach_other_links(dir: &Path, wanted: &[String]) -> anyhow::Result<()> {
    for name in link_pins(dir) {
        if !wanted.contains(&name) {
            tracing::warn!(pin = %dir.join(&name).display(), "detaching the XDP link of an interface no longer in [agent] interfaces");
            unpin_link(&dir.join(&name))?;
        }
    }
    Ok(())
}

/// The host's bpffs mount point.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Where the pins live and what the agent had to do to get there.
#[derive(Debug)]
pub struct PinDir {
    pub dir: PathBuf,
    /// The agent mounted a bpffs itself, in a mount namespace private to it: the pins (and
    /// with them the XDP program) go away when the agent exits.
    pub private_mount: bool,
    /// The directory did not exist before this agent created it.
    pub created_dir: bool,
    /// Pins that existed before this agent loaded its object (empty: a fresh datapath).
    pub existing_pins: Vec<&'static str>,
    /// Link pins ([`link_pins`]) that existed before this agent attached.
    pub existing_links: Vec<String>,
}

impl PinDir {
    /// Makes sure `dir` exists on a bpf filesystem, mounting one at `/sys/fs/bpf` if needed
    /// (`ip netns exec` hides the host's, for instance).
    pub fn prepare(dir: &Path) -> anyhow::Result<Self> {
        let root = Path::new(BPFFS_ROOT);
        let mut private_mount = false;
        if dir.starts_with(root) && !sys::is_bpffs(root) {
            std::fs::create_dir_all(root).ok();
            sys::mount_bpffs(root).context("mounting bpffs at /sys/fs/bpf")?;
            private_mount = sys::alone_in_mount_namespace();
            if private_mount {
                tracing::warn!(
                    bpffs = %dir.display(),
                    "mounted a bpffs in a mount namespace private to this agent (ip netns exec?): \
                     the pins and the XDP program go away when the agent exits, so restarts are \
                     not hitless; run the agent in the host's mount namespace (e.g. nsenter \
                     --net=/run/netns/NAME) to keep the datapath across restarts"
                );
            } else {
                tracing::info!("mounted bpffs at /sys/fs/bpf");
            }
        }
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        anyhow::ensure!(
            sys::is_bpffs(dir),
            "{} is not on a bpf filesystem; set [agent] bpffs to a directory under a bpffs mount",
            dir.display()
        );
        let existing_pins = PINNED_MAPS
            .iter()
            .chain(std::iter::once(&LINK_PIN))
            .copied()
            .filter(|name| dir.join(name).exists())
            .collect();
        Ok(Self {
            dir: dir.to_owned(),
            private_mount,
            created_dir,
            existing_pins,
            existing_links: link_pins(dir),
        })
    }

    /// Takes the datapath's lock: one agent per pinned datapath. Two agents on one datapath
    /// would each rewrite the other's maps.
    pub fn lock(&self) -> anyhow::Result<DirLock> {
        match DirLock::try_lock(&self.dir) {
            Ok(lock) => Ok(lock),
            Err(LockError::Held { pid }) => {
                let who = pid.map_or_else(
                    || "another process".to_owned(),
                    |pid| format!("another weir agent (pid {pid})"),
                );
                anyhow::bail!(
                    "{who} runs the datapath pinned under {}; stop it first, or give this agent \
                     its own [agent] bpffs and interface",
                    self.dir.display()
                )
            }
            Err(LockError::Io(err)) => {
                Err(err).with_context(|| format!("locking {}", self.dir.display()))
            }
        }
    }

    /// Undoes a start that failed before the datapath was attached: removes the pins this
    /// agent created (never those it found) and the directory if it created it.
    pub fn undo_fresh_pins(&self) {
        for name in PINNED_MAPS {
            if self.existing_pins.contains(&name) {
                continue;
            }
            let path = self.dir.join(name);
            if path.exists()
                && let Err(err) = std::fs::remove_file(&path)
            {
                tracing::warn!(path = %path.display(), error = %err, "could not remove a pin this agent created");
            }
        }
        // Links this agent attached to some of its interfaces before another failed.
        for name in link_pins(&self.dir) {
            if self.existing_links.contains(&name) {
                continue;
            }
            let path = self.dir.join(&name);
            if let Err(err) = unpin_link(&path) {
                tracing::warn!(path = %path.display(), error = %err, "could not remove a link pin this agent created");
            }
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// How the balancer got attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// The mode this agent attached in; `None` when an earlier agent's link now runs this
    /// program (adopted), in the mode that agent chose.
    pub mode: Option<AttachedMode>,
}

impl Attached {
    /// Whether an earlier agent's pinned link was adopted.
    #[must_use]
    pub const fn adopted(&self) -> bool {
        self.mode.is_none()
    }

    /// `native`, `generic`, or `adopted`.
    #[must_use]
    pub const fn mode_name(&self) -> &'static str {
        match self.mode {
            Some(mode) => mode.as_str(),
            None => "adopted",
        }
    }
}

/// Attaches the balancer to `interface`: updates its pinned link (`pin_name`, see
/// [`link_pin`]) to this program if an earlier agent left one (atomic replacement, no packet
/// sees no program), otherwise attaches and pins.
pub fn attach_pinned(
    program: &mut Xdp,
    bpffs: &Path,
    interface: &str,
    pin_name: &str,
    xdp_mode: XdpMode,
) -> anyhow::Result<Attached> {
    let pin = bpffs.join(pin_name);
    if pin.exists() {
        // A link left by an earlier agent is adopted only if it still holds our interface.
        let ours = super::ifindex(interface)?;
        match sys::pinned_xdp_link_ifindex(&pin) {
            Ok(Some(index)) if index == ours => {}
            Ok(Some(index)) => anyhow::bail!(
                "{} holds an XDP link on another interface (ifindex {index}, not {interface}); \
                 run `weir teardown --bpffs {}` or set [agent] bpffs to another directory",
                pin.display(),
                bpffs.display()
            ),
            Err(err) => {
                // Not knowing is not "defunct": removing a live link would detach the
                // running datapath.
                return Err(err).with_context(|| {
                    format!(
                        "reading which interface the pinned link {} holds",
                        pin.display()
                    )
                });
            }
            Ok(None) => {
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
        return Ok(Attached { mode: None });
    }
    let (link_id, mode) = super::attach(program, interface, xdp_mode)?;
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP through netlink, which cannot be pinned (needs bpf_link, Linux 5.9+)",
    )?;
    fd_link
        .pin(&pin)
        .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
    Ok(Attached { mode: Some(mode) })
}

/// Detaches the pinned XDP program and removes the pins under `bpffs`. Refuses a directory
/// that is not on a bpffs, and removes only the pins it knows by name: a mistyped path
/// loses nothing.
pub fn teardown(bpffs: &Path) -> anyhow::Result<()> {
    if !bpffs.exists() {
        anyhow::bail!("nothing to tear down: {} does not exist", bpffs.display());
    }
    anyhow::ensure!(
        sys::is_bpffs(bpffs),
        "{} is not on a bpf filesystem, so it holds no weir pins; nothing was removed",
        bpffs.display()
    );
    // A running agent would re-create what is removed under it.
    let _lock = match DirLock::try_lock(bpffs) {
        Ok(lock) => lock,
        Err(LockError::Held { pid }) => anyhow::bail!(
            "an agent{} still runs this datapath; stop it first (systemctl stop weir)",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
        Err(LockError::Io(err)) => {
            return Err(err).with_context(|| format!("locking {}", bpffs.display()));
        }
    };
    // Every interface's link. Unpinning drops the last reference to a link: the program is
    // detached from that interface.
    for name in link_pins(bpffs) {
        unpin_link(&bpffs.join(name))?;
    }
    for name in PINNED_MAPS {
        let path = bpffs.join(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    // Only if empty: anything else in it is not ours.
    match std::fs::remove_dir(bpffs) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::ENOTEMPTY) => {
            tracing::warn!(dir = %bpffs.display(), "left the directory in place: it holds pins weir did not create");
            Ok(())
        }
        Err(err) => Err(err).with_context(|| format!("removing {}", bpffs.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_are_named_one_to_one_without_dots() {
        assert_eq!(link_pin(0, "eth0"), "link");
        assert_eq!(link_pin(1, "eth1"), "link:eth1");
        assert_eq!(link_pin(1, "eth0.100"), "link:eth0:100");
        assert_ne!(link_pin(1, "eth0.1"), link_pin(1, "eth0_1"));
        assert!(!link_pin(2, "a.b.c").contains('.'));
    }
}
