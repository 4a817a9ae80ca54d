//! Privileged end-to-end test of the MSS clamp of `weir decap` (issue 11, "no round trip
//! needed for TCP"): with 1500-byte MTUs everywhere, a client connecting to a tunnel-mode VIP
//! gets a SYN-ACK whose MSS fits through the tunnel (captured on the client's interface), and
//! a 4 MiB upload arrives intact; without the clamp the same upload stalls, because the
//! client's full-size segments no longer fit once the balancer adds the outer header.
//!
//! Run: `cargo test -p lb-userspace --test e2e_mss -- --test-threads=1 --nocapture`

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{
    BACKENDS, Backend, ChildGuard, ServiceBuilder, Topology, VIP_V4, VIP_V6, backend_v4, backend_v6,
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

const PORT: u16 = 7;
const UPLOAD: usize = 4 << 20;
/// Long enough for 4 MiB over veth many times over; an upload that stalls fails after it.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(8);
const ETH_P_ALL: u16 = 0x0003;

/// A TCP echo service on `vip`, tunnel mode, backends of the VIP's family (so IPv4-in-IPv4
/// and IPv6-in-IPv6).
fn service(name: &str, vip: IpAddr) -> ServiceBuilder {
    (0..BACKENDS).fold(
        ServiceBuilder::new(name, vip, PORT, "tcp")
            .scheduler("maglev")
            .forwarding("tunnel"),
        |s, i| {
            s.backend(Backend::new(if vip.is_ipv4() {
                IpAddr::from(backend_v4(i))
            } else {
                IpAddr::from(backend_v6(i))
            }))
        },
    )
}

/// The MSS option of a frame if it is a TCP SYN-ACK from `vip` to local port `port`.
fn syn_ack_mss(frame: &[u8], vip: IpAddr, port: u16) -> Option<u16> {
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

/// Connects from the client to `vip` and returns the MSS option of the SYN-ACK it got, read
/// off the wire by a packet socket on the client's side (and, for the log, the MSS the
/// client's kernel then uses, which is smaller by the timestamp option).
fn captured_mss(topo: &Topology, vip: IpAddr) -> Result<u16> {
    common::in_netns(&topo.cli, || -> Result<u16> {
        let capture = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .context("packet socket")?;
        capture.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stream =
            TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), Duration::from_secs(3))
                .with_context(|| format!("connect to {vip}:{PORT}"))?;
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
                    "SYN-ACK from {vip}: MSS option {mss}; client's TCP_MAXSEG {:?}",
                    SockRef::from(&stream).mss()
                );
                return Ok(mss);
            }
        }
        bail!("no SYN-ACK from {vip} to port {port} captured within 3 s")
    })
}

/// Sends `data` to the echo service on `vip` from the client while reading the echo back
/// (the backend echoes exactly what reached it); `Ok` if every byte came back in order
/// within `UPLOAD_TIMEOUT`.
fn upload(topo: &Topology, vip: IpAddr, data: &[u8]) -> Result<()> {
    common::in_netns(&topo.cli, || -> Result<()> {
        let start = Instant::now();
        let stream =
            TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), Duration::from_secs(3))
                .with_context(|| format!("connect to {vip}:{PORT}"))?;
        stream.set_write_timeout(Some(UPLOAD_TIMEOUT))?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut reader = stream.try_clone()?;
        let echoed = thread::scope(|s| {
            let reading = s.spawn(move || {
                let mut got = Vec::with_capacity(data.len());
                let mut buf = vec![0u8; 65536];
                while got.len() < data.len() && start.elapsed() < UPLOAD_TIMEOUT {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
                got
            });
            let mut writer = &stream;
            let wrote = writer.write_all(data);
            let _ = stream.shutdown(Shutdown::Write);
            let got = reading.join().expect("reader thread");
            (wrote, got)
        });
        let (wrote, got) = echoed;
        let took = start.elapsed();
        if let Err(e) = wrote {
            bail!(
                "writing {} bytes stalled after {took:?} ({e}); {} came back",
                data.len(),
                got.len()
            );
        }
        if got.len() != data.len() {
            bail!(
                "{} of {} bytes came back within {UPLOAD_TIMEOUT:?}",
                got.len(),
                data.len()
            );
        }
        if got != data {
            let at = got.iter().zip(data).position(|(a, b)| a != b);
            bail!("the echoed bytes differ from those sent, first at {at:?}");
        }
        println!(
            "uploaded {} bytes to {vip} in {took:?}, echoed intact",
            data.len()
        );
        Ok(())
    })
}

/// Deterministic, not repetitive: a corrupted, lost or reordered segment cannot go unseen.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
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
fn stop_decap(decap: Vec<ChildGuard>) -> u64 {
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

fn mtu(ns: &str) -> String {
    let shown = common::ip(ns, &["-o", "link", "show", "dev", common::NODE_IF]).expect("ip link");
    shown
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .unwrap_or("?")
        .to_owned()
}

#[test]
fn mss_clamp_carries_uploads_through_the_tunnel() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("ms").expect("topology");
    for ns in topo.names().iter().filter(|n| **n != topo.sw) {
        assert_eq!(mtu(ns), "1500", "{ns}: the test is about 1500-byte MTUs");
    }
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let (v4, v6) = (IpAddr::from(VIP_V4), IpAddr::from(VIP_V6));
    let config = topo
        .agent_config()
        .service(service("tcp4", v4))
        .service(service("tcp6", v6));
    let mut agent = topo.start_agent(&config).expect("weir agent");
    let data = payload(UPLOAD);
    let vips = [v4, v6];

    // Default: the outer header is assumed to be IPv6 (40 bytes), safe for both families.
    // IPv4: 1500 - 40 - 20 - 20 = 1420; IPv6: 1500 - 40 - 40 - 20 = 1400.
    let decap = topo.start_decap(&vips).expect("weir decap");
    assert_eq!(captured_mss(&topo, v4).expect("capture"), 1420);
    assert_eq!(captured_mss(&topo, v6).expect("capture"), 1400);
    upload(&topo, v4, &data).expect("IPv4-in-IPv4 upload with the default clamp");
    upload(&topo, v6, &data).expect("IPv6-in-IPv6 upload with the default clamp");
    assert_eq!(
        stop_decap(decap),
        4,
        "SYN-ACKs clamped (2 captures, 2 uploads)"
    );

    // Told the outer header is IPv4: IPv4-in-IPv4 gets exactly what fits, 1500 - 20 - 40.
    let decap = topo
        .start_decap_with(&vips, &["--outer-family", "v4"])
        .expect("weir decap --outer-family v4");
    assert_eq!(captured_mss(&topo, v4).expect("capture"), 1440);
    upload(&topo, v4, &data).expect("IPv4-in-IPv4 upload with a clamp of 1440");
    assert_eq!(
        stop_decap(decap),
        2,
        "SYN-ACKs clamped (1 capture, 1 upload)"
    );

    // A configured value, for both families.
    let decap = topo
        .start_decap_with(&vips, &["--mss", "1300"])
        .expect("weir decap --mss 1300");
    assert_eq!(captured_mss(&topo, v4).expect("capture"), 1300);
    assert_eq!(captured_mss(&topo, v6).expect("capture"), 1300);
    assert_eq!(stop_decap(decap), 2, "SYN-ACKs clamped (2 captures)");

    // Off: the backend's own MSS (1500 - 40) reaches the client, whose full-size segments
    // then exceed the MTU once tunnelled, and the upload stalls. This is what the clamp is
    // for, and shows the uploads above could fail.
    let decap = topo
        .start_decap_with(&vips, &["--no-mss-clamp"])
        .expect("weir decap --no-mss-clamp");
    assert_eq!(captured_mss(&topo, v4).expect("capture"), 1460);
    let stalled = upload(&topo, v4, &data);
    println!("without the clamp: {stalled:?}");
    assert!(
        stalled.is_err(),
        "a 4 MiB upload through the tunnel completed without the clamp: the test topology \
         does not reproduce the problem"
    );
    assert_eq!(stop_decap(decap), 0, "nothing clamped when off");

    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
    topo.teardown_datapath().expect("weir teardown");
}
