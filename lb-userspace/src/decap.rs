//! `weir decap`: attaches the decapsulation program to a backend's interface so IP-in-IP
//! packets for its VIPs arrive as plain packets (this kernel has no tunnel devices, and
//! backends need none).
//!
//! A packet is decapsulated only if its inner destination is one of the given VIPs and its
//! outer destination is one of this host's addresses; the host's addresses are re-read
//! every 5 s.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError},
};
use lb_common::{VipKey, map_name, prog_name};

use crate::{config::XdpMode, datapath};

/// The decap program's maps.
pub struct DecapMaps {
    vips: HashMap<MapData, VipKey, u32>,
    local: HashMap<MapData, VipKey, u32>,
    local_now: BTreeSet<IpAddr>,
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
}

/// Loads (verifies) the decap program and writes its VIPs. The local addresses start empty.
pub fn load(vips: &[IpAddr]) -> anyhow::Result<(Ebpf, DecapMaps)> {
    let mut ebpf = datapath::load_object(1, true)?;
    datapath::load_program(&mut ebpf, prog_name::DECAP)?;
    let take =
        |ebpf: &mut Ebpf, name: &'static str| -> anyhow::Result<HashMap<MapData, VipKey, u32>> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("{name} map missing"))?;
            Ok(HashMap::try_from(map)?)
        };
    let mut maps = DecapMaps {
        vips: take(&mut ebpf, map_name::DECAP_VIPS)?,
        local: take(&mut ebpf, map_name::DECAP_LOCAL)?,
        local_now: BTreeSet::new(),
    };
    for vip in vips {
        maps.add_vip(*vip)?;
    }
    Ok((ebpf, maps))
}

/// Attaches the decap program for `vips` on `interface` and keeps it attached until SIGINT
/// or SIGTERM.
pub fn run(interface: String, vips: Vec<IpAddr>, xdp_mode: XdpMode) -> anyhow::Result<()> {
    anyhow::ensure!(!vips.is_empty(), "give at least one --vip");
    datapath::ifindex(&interface)?;
    let (mut ebpf, mut maps) = load(&vips)?;
    maps.set_local(&crate::sys::local_addresses())?;
    let program: &mut aya::programs::Xdp = ebpf
        .program_mut(prog_name::DECAP)
        .context("decap program missing")?
        .try_into()?;
    let (link, mode) = datapath::attach(program, &interface, xdp_mode)?;
    tracing::info!(%interface, mode = mode.as_str(), vips = ?vips, "XDP decap attached");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut refresh = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = refresh.tick() => {
                    if let Err(err) = maps.set_local(&crate::sys::local_addresses()) {
                        tracing::warn!(error = %err, "updating the local addresses failed");
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!(%interface, "stopping: detaching XDP decap");
    program.detach(link)?;
    Ok(())
}
