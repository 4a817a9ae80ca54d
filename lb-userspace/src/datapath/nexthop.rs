//! What `bpf_fib_lookup` needs from the kernel, which the datapath reads but cannot create:
//! forwarding enabled on the balancer's interface, and a neighbour entry per backend.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use anyhow::Context as _;

/// `bpf_fib_lookup` answers only for interfaces with forwarding enabled (it reports
/// "forwarding disabled" otherwise), so the agent turns it on for the interface it serves.
pub fn enable_forwarding(interface: &str, v6: bool) -> anyhow::Result<()> {
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
pub fn warm_neighbours(addresses: &[IpAddr]) {
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
