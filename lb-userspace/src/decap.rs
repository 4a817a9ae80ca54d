//! `weir decap`: attaches the decapsulation program to a backend's interface so IP-in-IP
//! packets for its VIPs arrive as plain packets (this kernel has no tunnel devices, and
//! backends need none), and the MSS clamp on the same interface's egress so that TCP
//! clients never send a segment too big to be tunnelled.
//!
//! A packet is decapsulated only if its inner destination is one of the given VIPs and its
//! outer destination is one of this host's addresses; the host's addresses are re-read
//! every 5 s.
//!
//! The clamp ([`MssSetting`]) lowers the MSS option of SYN-ACKs sent from a VIP: by default
//! to what fits in the interface's MTU after the tunnel's outer header (re-read every 5 s
//! with the addresses), or to a configured value. The outer header is the balancer's
//! choice, which this host cannot see before the first packet, so the computed clamp assumes
//! the larger, IPv6 one (40 bytes) unless told `--outer-family v4`.

use std::{collections::BTreeSet, fmt, net::IpAddr, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use lb_common::{MSS_SLOT_V4, MSS_SLOT_V6, VipKey, map_name, prog_name, stat};

use crate::{config::XdpMode, datapath};

/// Linux's smallest MSS (`TCP_MIN_MSS`): a clamp below it would be raised by the client's
/// kernel anyway.
pub const MIN_MSS: u16 = 88;
/// IPv4 and TCP headers without options, what an IPv4 segment carries besides its payload.
const INNER_V4_HEADERS: u32 = 20 + 20;
/// IPv6 and TCP headers without options.
const INNER_V6_HEADERS: u32 = 40 + 20;
/// How often the clamp count is logged when it moved.
const COUNT_LOG_PERIOD: Duration = Duration::from_secs(60);

/// The family of the tunnel's outer header: the family of the backend address the balancer
/// sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OuterFamily {
    /// IPv4 outer header (20 bytes).
    V4,
    /// IPv6 outer header (40 bytes), the larger: the safe guess.
    #[default]
    V6,
}

impl OuterFamily {
    /// Bytes of the outer header.
    #[must_use]
    pub const fn header_len(self) -> u32 {
        match self {
            Self::V4 => 20,
            Self::V6 => 40,
        }
    }
}

/// What the clamp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MssSetting {
    /// SYN-ACKs leave untouched.
    Off,
    /// One MSS for IPv4 and IPv6 SYN-ACKs alike.
    Fixed(u16),
    /// What fits in the interface's MTU after an outer header of this family.
    FromMtu(OuterFamily),
}

/// The MSS values the clamp lowers larger MSS options to, by the SYN-ACK's family; 0 leaves
/// that family alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MssClamp {
    pub v4: u16,
    pub v6: u16,
}

impl fmt::Display for MssClamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |mss: u16| {
            if mss == 0 {
                "off".to_owned()
            } else {
                mss.to_string()
            }
        };
        write!(f, "IPv4 {}, IPv6 {}", show(self.v4), show(self.v6))
    }
}

/// The interface's MTU leaves no room for a useful MSS after the tunnel's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "an MTU of {mtu} leaves less than the minimum MSS of {MIN_MSS} bytes inside the tunnel; \
     give --mss or --no-mss-clamp"
)]
pub struct MtuTooSmall {
    pub mtu: u32,
}

impl MssClamp {
    /// What fits through the tunnel on a link of `mtu` bytes: MTU − outer header − inner IP
    /// and TCP headers (e.g. 1500 − 20 − 40 = 1440 for IPv4-in-IPv4).
    pub fn for_mtu(mtu: u32, outer: OuterFamily) -> Result<Self, MtuTooSmall> {
        let room = |inner: u32| {
            mtu.checked_sub(outer.header_len() + inner)
                .filter(|mss| *mss >= u32::from(MIN_MSS))
                .map(|mss| u16::try_from(mss).unwrap_or(u16::MAX))
                .ok_or(MtuTooSmall { mtu })
        };
        Ok(Self {
            v4: room(INNER_V4_HEADERS)?,
            v6: room(INNER_V6_HEADERS)?,
        })
    }

    /// The clamp `setting` asks for on `interface` (whose MTU it may read).
    pub fn for_setting(setting: MssSetting, interface: &str) -> anyhow::Result<Self> {
        Ok(match setting {
            MssSetting::Off => Self::default(),
            MssSetting::Fixed(mss) => Self { v4: mss, v6: mss },
            MssSetting::FromMtu(outer) => {
                let mtu = crate::sys::mtu(interface)
                    .with_context(|| format!("reading the MTU of {interface}"))?;
                Self::for_mtu(mtu, outer)?
            }
        })
    }
}

/// The decap program's maps.
pub struct DecapMaps {
    vips: HashMap<MapData, VipKey, u32>,
    local: HashMap<MapData, VipKey, u32>,
    local_now: BTreeSet<IpAddr>,
    mss: Array<MapData, u32>,
    stats: PerCpuArray<MapData, [u64; stat::COUNT as usize]>,
}

impl DecapMaps {
    /// Makes the set of local addresses exactly `addrs`.
    pub fn set_local(&mut self, addrs: &[IpAddr]) -> Result<(), MapError> {
        let want: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        for gone in self.local_now.difference(&want) {
            match self.local.remove(&VipKey::addr_only(*gone)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        for new in want.difference(&self.local_now) {
            self.local.insert(VipKey::addr_only(*new), 1, 0)?;
        }
        self.local_now = want;
        Ok(())
    }

    /// Adds a VIP.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<(), MapError> {
        self.vips.insert(VipKey::addr_only(vip), 1, 0)
    }

    /// Sets the MSS clamp of SYN-ACKs from the VIPs.
    pub fn set_mss_clamp(&mut self, clamp: MssClamp) -> Result<(), MapError> {
        self.mss.set(MSS_SLOT_V4, u32::from(clamp.v4), 0)?;
        self.mss.set(MSS_SLOT_V6, u32::from(clamp.v6), 0)
    }

    /// The global counters (`stat::NAMES`), summed over the CPUs; the decap and the clamp
    /// move `decap_ok`, `pass_*`, `xdp_pass`, `drop_encap` and `mss_clamped`.
    pub fn counters(&self) -> Result<[u64; stat::COUNT as usize], MapError> {
        let mut sum = [0u64; stat::COUNT as usize];
        for cpu in self.stats.get(&0, 0)?.iter() {
            for (total, value) in sum.iter_mut().zip(cpu.iter()) {
                *total = total.wrapping_add(*value);
            }
        }
        Ok(sum)
    }
}

/// Loads (verifies) the decap and MSS clamp programs and writes the VIPs. The local
/// addresses start empty and the clamp off.
pub fn load(vips: &[IpAddr]) -> anyhow::Result<(Ebpf, DecapMaps)> {
    let mut ebpf = datapath::load_object(1, true)?;
    datapath::load_program(&mut ebpf, prog_name::DECAP)?;
    let clamp: &mut SchedClassifier = ebpf
        .program_mut(prog_name::MSS_CLAMP)
        .context("MSS clamp program missing")?
        .try_into()?;
    clamp.load().context("loading the MSS clamp program")?;
    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .with_context(|| format!("{name} map missing"))
    };
    let mut maps = DecapMaps {
        vips: HashMap::try_from(take(map_name::DECAP_VIPS)?)?,
        local: HashMap::try_from(take(map_name::DECAP_LOCAL)?)?,
        local_now: BTreeSet::new(),
        mss: Array::try_from(take(map_name::DECAP_MSS)?)?,
        stats: PerCpuArray::try_from(take(map_name::STATS)?)?,
    };
    for vip in vips {
        maps.add_vip(*vip)?;
    }
    Ok((ebpf, maps))
}

/// Attaches the MSS clamp to `interface`'s egress: through tcx where the kernel has it
/// (6.6+, aya's choice), else as a clsact filter (the qdisc is added if missing).
fn attach_clamp(
    ebpf: &mut Ebpf,
    interface: &str,
) -> anyhow::Result<aya::programs::tc::SchedClassifierLinkId> {
    if crate::sys::kernel_version().is_some_and(|v| v < (6, 6)) {
        // Fails harmlessly when the qdisc exists; attaching then says what is wrong.
        if let Err(err) = aya::programs::tc::qdisc_add_clsact(interface) {
            tracing::debug!(%interface, error = %err, "adding the clsact qdisc");
        }
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(prog_name::MSS_CLAMP)
        .context("MSS clamp program missing")?
        .try_into()?;
    program
        .attach(interface, TcAttachType::Egress)
        .with_context(|| format!("attaching the MSS clamp to {interface} egress"))
}

/// Logs the clamp count, with the decap count, when it moved since `last`.
fn log_counts(maps: &DecapMaps, last: &mut Option<u64>, stopping: bool) {
    match maps.counters() {
        Ok(c) => {
            let clamped = c[stat::MSS_CLAMPED as usize];
            if stopping || *last != Some(clamped) {
                tracing::info!(
                    decap_ok = c[stat::DECAP_OK as usize],
                    mss_clamped = clamped,
                    "counters"
                );
            }
            *last = Some(clamped);
        }
        Err(err) => tracing::warn!(error = %err, "reading the counters failed"),
    }
}

/// Attaches the decap program for `vips` on `interface` and the MSS clamp `mss` on its
/// egress, and keeps them attached until SIGINT or SIGTERM.
pub fn run(
    interface: String,
    vips: Vec<IpAddr>,
    xdp_mode: XdpMode,
    mss: MssSetting,
) -> anyhow::Result<()> {
    anyhow::ensure!(!vips.is_empty(), "give at least one --vip");
    datapath::ifindex(&interface)?;
    let mut clamp = MssClamp::for_setting(mss, &interface)?;
    let (mut ebpf, mut maps) = load(&vips)?;
    maps.set_local(&crate::sys::local_addresses())?;
    maps.set_mss_clamp(clamp)?;
    // The clamp first: once the decap shows on the interface, tunnelled connections can be
    // made, and their SYN-ACKs must already meet the clamp.
    let clamp_link = if mss == MssSetting::Off {
        tracing::info!(%interface, "MSS clamp off");
        None
    } else {
        let link = attach_clamp(&mut ebpf, &interface)?;
        tracing::info!(%interface, mss = %clamp, "MSS clamp attached (tc egress)");
        Some(link)
    };
    let program: &mut aya::programs::Xdp = ebpf
        .program_mut(prog_name::DECAP)
        .context("decap program missing")?
        .try_into()?;
    let (link, mode) = datapath::attach(program, &interface, xdp_mode)?;
    tracing::info!(%interface, mode = mode.as_str(), vips = ?vips, "XDP decap attached");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Nothing clamped yet: the first log line comes with the first clamp.
    let mut last_count = Some(0);
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut refresh = tokio::time::interval(Duration::from_secs(5));
        let mut count_log = tokio::time::interval(COUNT_LOG_PERIOD);
        // The first tick of an interval is immediate: the start already logged its state.
        count_log.tick().await;
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = refresh.tick() => {
                    if let Err(err) = maps.set_local(&crate::sys::local_addresses()) {
                        tracing::warn!(error = %err, "updating the local addresses failed");
                    }
                    if let MssSetting::FromMtu(_) = mss {
                        match MssClamp::for_setting(mss, &interface) {
                            Ok(now) if now != clamp => match maps.set_mss_clamp(now) {
                                Ok(()) => {
                                    tracing::info!(%interface, mss = %now, "MTU changed: new MSS clamp");
                                    clamp = now;
                                }
                                Err(err) => tracing::warn!(error = %err, "updating the MSS clamp failed"),
                            },
                            Ok(_) => {}
                            Err(err) => tracing::warn!(error = %err, mss = %clamp, "keeping the MSS clamp"),
                        }
                    }
                }
                _ = count_log.tick() => log_counts(&maps, &mut last_count, false),
            }
        }
        anyhow::Ok(())
    })?;
    log_counts(&maps, &mut last_count, true);
    if let Some(link) = clamp_link {
        tracing::info!(%interface, "stopping: detaching the MSS clamp");
        let program: &mut SchedClassifier = ebpf
            .program_mut(prog_name::MSS_CLAMP)
            .context("MSS clamp program missing")?
            .try_into()?;
        program.detach(link)?;
    }
    tracing::info!(%interface, "stopping: detaching XDP decap");
    let program: &mut aya::programs::Xdp = ebpf
        .program_mut(prog_name::DECAP)
        .context("decap program missing")?
        .try_into()?;
    program.detach(link)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_is_what_fits_through_the_tunnel() {
        assert_eq!(
            MssClamp::for_mtu(1500, OuterFamily::V4),
            Ok(MssClamp { v4: 1440, v6: 1420 })
        );
        assert_eq!(
            MssClamp::for_mtu(1500, OuterFamily::V6),
            Ok(MssClamp { v4: 1420, v6: 1400 })
        );
        assert_eq!(
            MssClamp::for_mtu(9000, OuterFamily::V6),
            Ok(MssClamp { v4: 8920, v6: 8900 })
        );
        // A loopback-sized MTU still fits the 16-bit option.
        assert_eq!(
            MssClamp::for_mtu(1 << 20, OuterFamily::V4),
            Ok(MssClamp {
                v4: u16::MAX,
                v6: u16::MAX
            })
        );
    }

    #[test]
    fn clamp_needs_room_for_the_minimum_mss() {
        // 40 + 60 + 88: the smallest MTU with an IPv6 SYN-ACK's minimum MSS inside an IPv6
        // tunnel.
        assert_eq!(
            MssClamp::for_mtu(188, OuterFamily::V6),
            Ok(MssClamp { v4: 108, v6: 88 })
        );
        assert_eq!(
            MssClamp::for_mtu(187, OuterFamily::V6),
            Err(MtuTooSmall { mtu: 187 })
        );
        assert_eq!(
            MssClamp::for_mtu(10, OuterFamily::V4),
            Err(MtuTooSmall { mtu: 10 })
        );
    }

    #[test]
    fn settings_without_an_interface() {
        assert_eq!(
            MssClamp::for_setting(MssSetting::Off, "weir-no-such-if").unwrap(),
            MssClamp { v4: 0, v6: 0 }
        );
        assert_eq!(
            MssClamp::for_setting(MssSetting::Fixed(1200), "weir-no-such-if").unwrap(),
            MssClamp { v4: 1200, v6: 1200 }
        );
        assert!(
            MssClamp::for_setting(MssSetting::FromMtu(OuterFamily::V6), "weir-no-such-if").is_err()
        );
        assert_eq!(
            MssClamp::for_setting(MssSetting::FromMtu(OuterFamily::V4), "lo").unwrap(),
            MssClamp::for_mtu(crate::sys::mtu("lo").unwrap(), OuterFamily::V4).unwrap()
        );
    }

    #[test]
    fn clamp_shows_off_per_family() {
        assert_eq!(
            MssClamp { v4: 1440, v6: 0 }.to_string(),
            "IPv4 1440, IPv6 off"
        );
    }
}
