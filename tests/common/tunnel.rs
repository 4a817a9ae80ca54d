//! What the tunnel tests (e2e_mss, e2e_mtu) share: the MSS option of the SYN-ACK a client
//! gets from a VIP, read off the client's wire by a packet socket; the `mss_clamped` counts
//! `weir decap` logs at exit; a node's link MTU; and deterministic, non-repeating payloads.

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::{ChildGuard, NODE_IF, Topology, in_netns, ip};

const ETH_P_ALL: u16 = 0x0003;

/// The MSS option of a frame if it is a TCP SYN-ACK from `vip` to local port `port`.
pub fn syn_ack_mss(frame: &[u8], vip: IpAddr, port: u16) -> Option<u16> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (src, proto, l4): (IpAddr, u8, usize) = match ether_type {
        0x0800 => {
            let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
            let src: [u8; 4] = frame.get(26..30)?.try_into().ok()?;
            (src.into(), *frame.get(23)?, 14 + ihl)
        }
        0x86dd => {
            let src: [u8; 16] = frame.get(22..38)?.try_into().ok()?;
            (src.into(), *frame.get(20)?, 14 + 40)
        }
        _ => return None,
    };
    let tcp = frame.get(l4..)?;
    if src != vip || proto != 6 || u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]) != port {
        return None;
    }
    if tcp.get(13)? & 0x12 != 0x12 {
        return None;
    }
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let opts = tcp.get(20..doff)?;
    let mut at = 0;
    while at < opts.len() {
        match opts[at] {
            0 => return None,
            1 => at += 1,
            2 => return Some(u16::from_be_bytes([*opts.get(at + 2)?, *opts.get(at + 3)?])),
            _ => at += usize::from((*opts.get(at + 1)?).max(2)),
        }
    }
    None
}

/// Connects from the client to `vip:vip_port` and returns the MSS option of the SYN-ACK it
/// got, read off the wire by a packet socket on the client's side (and, for the log, the
/// MSS the client's kernel then uses, which is smaller by the timestamp option).
pub fn captured_mss(topo: &Topology, vip: IpAddr, vip_port: u16) -> Result<u16> {
    in_netns(&topo.cli, || -> Result<u16> {
        let capture = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .context("packet socket")?;
        capture.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stream =
            TcpStream::connect_timeout(&SocketAddr::new(vip, vip_port), Duration::from_secs(3))
                .with_context(|| format!("connect to {vip}:{vip_port}"))?;
        let port = stream.local_addr()?.port();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let n = match (&capture).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("reading the capture"),
            };
            if let Some(mss) = syn_ack_mss(&buf[..n], vip, port) {
                println!(
                    "SYN-ACK from {vip}:{vip_port}: MSS option {mss}; client's TCP_MAXSEG {:?}",
                    SockRef::from(&stream).mss()
                );
                return Ok(mss);
            }
        }
        bail!("no SYN-ACK from {vip}:{vip_port} to port {port} captured within 3 s")
    })
}

/// `len` bytes that differ for each `seed`; not repetitive, so a corrupted, lost or
/// reordered segment cannot go unseen.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Stops the decap processes; each must exit cleanly. Returns the SYN-ACKs they clamped in
/// all (the `mss_clamped` each logs at exit).
pub fn stop_decap(decap: Vec<ChildGuard>) -> u64 {
    decap
        .into_iter()
        .map(|mut d| -> u64 {
            let st = d.stop();
            let log = d.log();
            assert!(
                st.is_some_and(|s| s.success()),
                "decap exit on SIGTERM: {st:?}; log:\n{log}"
            );
            log.lines()
                .rev()
                .find_map(|l| {
                    let rest = l.split("mss_clamped=").nth(1)?;
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no mss_clamped count in the decap log:\n{log}"))
        })
        .sum()
}

/// The MTU of the node's veth end in namespace `ns`, as `ip link` shows it.
pub fn link_mtu(ns: &str) -> String {
    let shown = ip(ns, &["-o", "link", "show", "dev", NODE_IF]).expect("ip link");
    shown
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .unwrap_or("?")
        .to_owned()
}
