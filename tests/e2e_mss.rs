//! Privileged end-to-end test of the MSS clamp of `weir decap` (issue 11, "no round trip
//! needed for TCP"): with 1500-byte MTUs everywhere, a client connecting to a tunnel-mode VIP
//! gets a SYN-ACK whose MSS fits through the tunnel (captured on the client's interface), and
//! a 4 MiB upload arrives intact; without the clamp the client's full-size segments no
//! longer fit once the balancer adds the outer header, and the same upload stalls (or needs
//! the balancer's Packet Too Big, see e2e_mtu).
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
    BACKENDS, Backend, ServiceBuilder, Topology, VIP_V4, VIP_V6, backend_v4, backend_v6,
    tunnel::{captured_mss, link_mtu, payload, stop_decap},
};

const PORT: u16 = 7;
const UPLOAD: usize = 4 << 20;
/// Long enough for 4 MiB over veth many times over; an upload that stalls fails after it.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(8);

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

#[test]
fn mss_clamp_carries_uploads_through_the_tunnel() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("ms").expect("topology");
    for ns in topo.names().iter().filter(|n| **n != topo.sw) {
        assert_eq!(
            link_mtu(ns),
            "1500",
            "{ns}: the test is about 1500-byte MTUs"
        );
    }
    let _servers = topo.start_echo_servers(PORT).expect("echo servers");
    let (v4, v6) = (IpAddr::from(VIP_V4), IpAddr::from(VIP_V6));
    let config = topo
        .agent_config()
        .service(service("tcp4", v4))
        .service(service("tcp6", v6));
    let mut agent = topo.start_agent(&config).expect("weir agent");
    let data = payload(UPLOAD, 0);
    let vips = [v4, v6];

    // Default: the outer header is assumed to be IPv6 (40 bytes), safe for both families.
    // IPv4: 1500 - 40 - 20 - 20 = 1420; IPv6: 1500 - 40 - 40 - 20 = 1400.
    let decap = topo.start_decap(&vips).expect("weir decap");
    assert_eq!(captured_mss(&topo, v4, PORT).expect("capture"), 1420);
    assert_eq!(captured_mss(&topo, v6, PORT).expect("capture"), 1400);
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
    assert_eq!(captured_mss(&topo, v4, PORT).expect("capture"), 1440);
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
    assert_eq!(captured_mss(&topo, v4, PORT).expect("capture"), 1300);
    assert_eq!(captured_mss(&topo, v6, PORT).expect("capture"), 1300);
    assert_eq!(stop_decap(decap), 2, "SYN-ACKs clamped (2 captures)");

    // Off: the backend's own MSS (1500 - 40) reaches the client, whose full-size segments
    // then exceed the MTU once tunnelled. The upload stalls, or, where the balancer answers
    // such segments with "fragmentation needed", gets through by path-MTU discovery
    // (e2e_mtu tests that): either way the clamp is what makes the uploads above fit, and
    // they could have failed.
    let decap = topo
        .start_decap_with(&vips, &["--no-mss-clamp"])
        .expect("weir decap --no-mss-clamp");
    assert_eq!(captured_mss(&topo, v4, PORT).expect("capture"), 1460);
    let too_big_before = topo.global_counter("icmp_too_big_sent");
    let unclamped = upload(&topo, v4, &data);
    let too_big = topo.global_counter("icmp_too_big_sent") - too_big_before;
    println!("without the clamp: {unclamped:?}; icmp_too_big_sent +{too_big}");
    assert!(
        unclamped.is_err() || too_big > 0,
        "a 4 MiB upload through the tunnel completed without the clamp and without any \
         Packet Too Big from the balancer: the test topology does not reproduce the problem"
    );
    assert_eq!(stop_decap(decap), 0, "nothing clamped when off");

    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
    topo.teardown_datapath().expect("weir teardown");
}
