//! `weir decap`: attaches the decapsulation program to a backend's interface so IP-in-IP
//! packets for its VIPs arrive as plain packets (this kernel has no tunnel devices, and
//! backends need none).

use std::net::IpAddr;

use anyhow::Context as _;
use aya::maps::HashMap;
use lb_common::{VipKey, map_name, prog_name};

use crate::{config::XdpMode, datapath};

/// Attaches the decap program for `vips` on `interface` and keeps it attached until SIGINT
/// or SIGTERM.
pub fn run(interface: String, vips: Vec<IpAddr>, xdp_mode: XdpMode) -> anyhow::Result<()> {
    anyhow::ensure!(!vips.is_empty(), "give at least one --vip");
    datapath::ifindex(&interface)?;
    let mut ebpf = datapath::load_object(1, true)?;
    datapath::load_program(&mut ebpf, prog_name::DECAP)?;
    {
        let map = ebpf
            .map_mut(map_name::DECAP_VIPS)
            .context("DECAP_VIPS map missing")?;
        let mut decap_vips: HashMap<_, VipKey, u32> = HashMap::try_from(map)?;
        for vip in &vips {
            decap_vips.insert(VipKey::addr_only(*vip), 1, 0)?;
        }
    }
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
        tokio::select! {
            _ = sigint.recv() => {},
            _ = sigterm.recv() => {},
        }
        anyhow::Ok(())
    })?;
    tracing::info!(%interface, "stopping: detaching XDP decap");
    program.detach(link)?;
    Ok(())
}
