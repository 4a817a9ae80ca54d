//! Privileged end-to-end test of flood-proof flow tracking: spoofed SYN floods and spoofed
//! SYN, ACK pair floods at ten times the connection table's size, under every scheduler,
//! while 20 idle established connections and one long transfer must survive (bytes
//! checked) and new connections of a real client must still succeed. Needs root; skipped
//! otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_flood -- --test-threads=1 --nocapture`

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use common::{BACKENDS, Backend, ServiceBuilder, Topology, VIP_V4, backend_v4};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const PORT: u16 = 7;
/// The connection table's size; the half-open table gets the minimum (1024).
const TABLE: u32 = 4096;
/// Spoofed tuples per flood: more than ten times the table, in `FLOOD` (10,000 a second).
const FLOOD_TUPLES: u32 = 50_000;
const FLOOD: Duration = Duration::from_secs(5);
const IDLE_CONNS: usize = 20;
/// A new connection of the real client every this long while a flood runs.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Socket timeouts of the client: a connect may need its SYN retransmitted (1 s).
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flood {
    /// One SYN per spoofed tuple.
    Syn,
    /// A SYN and then an ACK per spoofed tuple: to a balancer that never sees the backend's
    /// SYN-ACK (DSR), a completed handshake.
    SynAck,
}

/// Echo servers on every backend that keep a connection as long as the test runs (the test
/// bed's own close after 3 s of silence, and these connections must idle through floods).
struct IdleEchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl IdleEchoServers {
    fn start(topo: &Topology) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for ns in &topo.backends {
            let listener = common::in_netns(ns, || common::tcp_listener(PORT))?;
            let stop = stop.clone();
            threads.push(common::spawn_in_netns(ns, "idle-echo", move || {
                common::accept_until_stopped(&listener, &stop, "idle echo", |s| {
                    let stop = stop.clone();
                    thread::spawn(move || common::echo_until_stopped(s, &stop))
                });
            })?);
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for IdleEchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// One echo exchange on `stream`.
fn exchange(stream: &mut TcpStream, msg: &[u8]) -> Result<()> {
    stream.write_all(msg).context("send")?;
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).context("read the echo")?;
    if got != msg {
        bail!("echo mismatch");
    }
    Ok(())
}

/// A connection from the client namespace to `dst`, with the client's timeouts.
fn connect(dst: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, TIMEOUT).context("connect")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// An IPv4 TCP segment of 40 bytes (header included: the socket is `IPPROTO_RAW`).
fn segment(src: Ipv4Addr, src_port: u16, dst: SocketAddrV4, flags: u8, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = common::inet_checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    if flags & 0x10 != 0 {
        tcp[8..12].copy_from_slice(&seq.rotate_left(7).to_be_bytes());
    }
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = common::inet_checksum(&[&src.octets(), &dst.ip().octets(), &[0, 6, 0, 20], tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Sends `FLOOD_TUPLES` spoofed tuples from 203.0.113.128/25 to `dst`, paced evenly over
/// `FLOOD` (and never longer than twice that). Returns the packets sent.
fn flood(ns: &str, dst: SocketAddrV4, kind: Flood, salt: u16) -> Result<u64> {
    common::in_netns(ns, move || {
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context("raw IPv4 socket")?;
        let to = SockAddr::from(SocketAddr::V4(dst));
        let start = Instant::now();
        let per_tuple = FLOOD.as_secs_f64() / f64::from(FLOOD_TUPLES);
        let mut sent = 0u64;
        for i in 0..FLOOD_TUPLES {
            if i % 100 == 0 {
                let due = start + Duration::from_secs_f64(per_tuple * f64::from(i));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                if start.elapsed() > FLOOD * 2 {
                    bail!("the flood fell behind: {i} tuples in {:?}", start.elapsed());
                }
            }
            let src = Ipv4Addr::new(203, 0, 113, 128 + (i % 128) as u8);
            let port = 1024 + salt + u16::try_from(i / 128).expect("port");
            let seq = i.wrapping_mul(2_654_435_761);
            let mut send = |flags: u8| -> Result<()> {
                s.send_to(&segment(src, port, dst, flags, seq), &to)
                    .context("send a spoofed segment")?;
                sent += 1;
                Ok(())
            };
            send(0x02)?;
            if kind == Flood::SynAck {
                send(0x10)?;
            }
        }
        Ok(sent)
    })
}

/// New connections of the real client, one every `PROBE_EVERY` until `stop`, each with
/// one echo exchange: (answered, tried).
fn probe_new_connections(
    ns: &str,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u32, u32)> {
    common::spawn_in_netns(ns, "probe", move || {
        let (mut ok, mut tried) = (0, 0);
        while !stop.load(Ordering::SeqCst) && tried < 1000 {
            tried += 1;
            let msg = format!("weir-flood/probe/{tried}").into_bytes();
            if connect(dst)
                .and_then(|mut s| exchange(&mut s, &msg))
                .is_ok()
            {
                ok += 1;
            } else {
                eprintln!("probe {tried}: failed");
            }
            thread::sleep(PROBE_EVERY);
        }
        (ok, tried)
    })
    .expect("probe thread")
}

/// A long transfer: 16 KiB echoed at a time until `stop` (at most 10 minutes); the bytes
/// that came back intact, or the first error.
fn long_transfer(ns: &str, dst: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<Result<u64>> {
    common::spawn_in_netns(ns, "transfer", move || {
        let mut s = connect(dst)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut total = 0u64;
        let mut n = 0u32;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let chunk: Vec<u8> = (0..16384u32)
                .map(|i| (i.wrapping_mul(31) ^ n) as u8)
                .collect();
            exchange(&mut s, &chunk).with_context(|| format!("chunk {n} after {total} bytes"))?;
            total += chunk.len() as u64;
            n += 1;
            thread::sleep(Duration::from_millis(10));
        }
        Ok(total)
    })
    .expect("transfer thread")
}

fn counters(topo: &Topology) -> impl Fn(&str) -> u64 + '_ {
    move |name| topo.global_counter(name)
}

fn gauge(topo: &Topology, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    common::metric(&topo.metrics().ok()?, name, labels)
}

/// Waits (at most `within`) for the agent's table walk to report `ok` of a gauge.
fn wait_gauge(
    topo: &Topology,
    name: &str,
    labels: &[(&str, &str)],
    within: Duration,
    ok: impl Fn(f64) -> bool,
) -> Option<f64> {
    let deadline = Instant::now() + within;
    loop {
        let v = gauge(topo, name, labels);
        if v.is_some_and(&ok) || Instant::now() > deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Every scheduler, both floods: 20 idle connections (each with one exchange made before)
/// and a long transfer survive both floods, at least 95% of the new connections made
/// during each flood succeed, spoofed SYNs are never counted as active connections, and
/// the pair flood fills the established table without evicting anything, until the agent
/// expires the unconfirmed entries.
#[test]
fn floods_of_spoofed_tuples_evict_no_connection() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("fl").expect("topology");
    let _servers = IdleEchoServers::start(&topo).expect("echo servers");
    let vip = SocketAddr::new(VIP_V4.into(), PORT);
    let vip4 = SocketAddrV4::new(VIP_V4, PORT);
    let mut salt = 0u16;
    for (round, scheduler) in ["round-robin", "least-conn", "maglev", "ip-hash"]
        .into_iter()
        .enumerate()
    {
        let service = (0..BACKENDS).fold(
            ServiceBuilder::new("web", VIP_V4, PORT, "tcp")
                .forwarding("direct")
                .scheduler(scheduler),
            |s, i| s.backend(Backend::new(backend_v4(i))),
        );
        let config = topo
            .agent_config()
            .conntrack_entries(TABLE)
            .service(service);
        let path = topo.write_agent_config(&config).expect("config");
        let mut agent = topo.start_agent_file(&path).expect("weir agent");
        let count = counters(&topo);

        let mut idle: Vec<TcpStream> = common::in_netns(&topo.cli, || {
            (0..IDLE_CONNS)
                .map(|i| {
                    let mut s = connect(vip)?;
                    exchange(&mut s, format!("weir-flood/idle/{i}/hello").as_bytes())?;
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()
        })
        .expect("idle connections");
        let transfer_stop = Arc::new(AtomicBool::new(false));
        let transfer = long_transfer(&topo.cli, vip, transfer_stop.clone());

        for kind in [Flood::Syn, Flood::SynAck] {
            let half_open_before = count("half_open_created");
            let full_before = count("conntrack_full");
            let stop = Arc::new(AtomicBool::new(false));
            let probes = probe_new_connections(&topo.cli, vip, stop.clone());
            let started = Instant::now();
            let sent = flood(&topo.cli, vip4, kind, salt).expect("flood");
            salt += 400;
            let took = started.elapsed();
            stop.store(true, Ordering::SeqCst);
            let (ok, tried) = probes.join().expect("probe thread");
            let half_open = count("half_open_created") - half_open_before;
            let full = count("conntrack_full") - full_before;
            println!(
                "{scheduler} {kind:?}: {sent} packets in {took:?}; half-open created {half_open}, \
                 refused an entry {full}; new connections {ok}/{tried}"
            );
            assert!(
                half_open >= u64::from(FLOOD_TUPLES) * 9 / 10,
                "{scheduler} {kind:?}: the flood reached the balancer ({half_open} half-open flows)"
            );
            assert!(
                tried >= 50 && ok * 100 >= tried * 95,
                "{scheduler} {kind:?}: {ok} of {tried} new connections succeeded during the flood"
            );
            for (i, s) in idle.iter_mut().enumerate() {
                exchange(s, format!("weir-flood/idle/{i}/after-{kind:?}").as_bytes())
                    .unwrap_or_else(|e| {
                        panic!("{scheduler} {kind:?}: idle connection {i} did not survive: {e:#}")
                    });
            }
            // Spoofed SYNs never count as connections: the idle ones, the transfer and the
            // probes still open at most.
            let active: f64 = topo
                .metrics()
                .expect("metrics")
                .iter()
                .filter(|s| s.name == "weir_backend_active_connections")
                .map(|s| s.value)
                .sum();
            if kind == Flood::Syn {
                assert!(
                    active <= (IDLE_CONNS + 1 + 5) as f64,
                    "{scheduler}: {active} active connections after a SYN flood"
                );
            } else {
                assert!(full > 0, "{scheduler}: the pair flood filled the table");
            }
        }
        if round == 0 {
            // The walk sees the table the pair flood filled, then deletes the unconfirmed
            // entries (nothing after their ACK) once idle 10 s: the table empties to the
            // connections that are real.
            let filled = wait_gauge(
                &topo,
                "weir_conntrack_entries",
                &[("table", "established")],
                Duration::from_secs(7),
                |v| v >= f64::from(TABLE) * 0.9,
            );
            assert!(
                filled.is_some_and(|v| v >= f64::from(TABLE) * 0.9),
                "the established table was full after the pair flood: {filled:?}"
            );
            let emptied = wait_gauge(
                &topo,
                "weir_conntrack_entries",
                &[("table", "established")],
                Duration::from_secs(25),
                |v| v <= 100.0,
            );
            assert!(
                emptied.is_some_and(|v| v <= 100.0),
                "the unconfirmed entries expired: {emptied:?}"
            );
            // `weir status` shows the tables as the last walk found them.
            let resp = topo
                .api(&weir::api::Request::Status {})
                .expect("API status");
            let status: weir::api::Status = resp.data.expect("data").try_into().expect("status");
            let ct = status
                .conntrack
                .expect("the connection tables in weir status");
            assert_eq!(
                (ct.capacity, ct.half_open_capacity),
                (u64::from(TABLE), 1024)
            );
            assert!(ct.refused > 0 && ct.entries <= 100, "{ct:?}");
            let expired = gauge(
                &topo,
                "weir_conntrack_expired_total",
                &[("reason", "unconfirmed")],
            );
            assert!(
                expired.is_some_and(|v| v >= f64::from(TABLE) * 0.9),
                "expired as unconfirmed: {expired:?}"
            );
            for (i, s) in idle.iter_mut().enumerate() {
                exchange(s, format!("weir-flood/idle/{i}/after-expiry").as_bytes())
                    .unwrap_or_else(|e| panic!("idle connection {i} after the expiry: {e:#}"));
            }
        }
        transfer_stop.store(true, Ordering::SeqCst);
        let bytes = transfer
            .join()
            .expect("transfer thread")
            .unwrap_or_else(|e| panic!("{scheduler}: the long transfer broke: {e:#}"));
        println!("{scheduler}: the long transfer echoed {bytes} bytes intact");
        assert!(bytes >= 1 << 20, "{scheduler}: {bytes} bytes transferred");
        drop(idle);
        agent.stop();
        topo.teardown_datapath().expect("teardown");
    }
}
