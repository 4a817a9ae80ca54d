//! Privileged end-to-end tests of real client traffic through the balancer at 1500-byte MTUs
//! everywhere (issue 11): full-size TCP uploads through the tunnel (with `weir decap`'s MSS
//! clamp, and without it by path-MTU discovery through the balancer's ICMP), the ICMP error
//! a UDP datagram too big for the tunnel gets, ICMP errors from the path forwarded to the
//! backend of the flow they quote, ping to a VIP, and fragmented UDP to an `ip-hash`
//! service. Each test builds its own topology (`common`, namespaces `w<pid><tag>-*`). Needs
//! root; skipped otherwise (fails in CI).
//!
//! Run: `cargo test -p lb-userspace --test e2e_mtu -- --test-threads=1 --nocapture`

mod common;

use std::{
    fs,
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use common::{
    BACKENDS, Backend, CLIENT_V4, CLIENT_V6, ChildGuard, EchoServers, ServiceBuilder, Topology,
    VIP_V4, VIP_V6, backend_v4, backend_v6,
    tunnel::{captured_mss, link_mtu, payload, stop_decap},
    upload::{UploadServers, Uploaded, sha256, upload_all},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// What every test here is about: the MTU of a real LAN, never raised to hide a problem.
const LAN_MTU: u32 = 1500;
const VIPS: [IpAddr; 2] = [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)];

/// Every node's link has the LAN's MTU (the switch has no node link).
fn assert_lan_mtu(topo: &Topology) {
    for ns in topo.names().iter().filter(|n| **n != topo.sw) {
        assert_eq!(
            link_mtu(ns),
            LAN_MTU.to_string(),
            "{ns}: these tests are about {LAN_MTU}-byte MTUs"
        );
    }
}

/// A service on `vip:port` over the three backends, of the VIP's family unless
/// `v6_backends` (IPv4-in-IPv6).
fn service(
    name: &str,
    vip: IpAddr,
    port: u16,
    protocol: &str,
    forwarding: &str,
    v6_backends: bool,
) -> ServiceBuilder {
    (0..BACKENDS).fold(
        ServiceBuilder::new(name, vip, port, protocol)
            .scheduler("maglev")
            .forwarding(forwarding),
        |s, i| {
            s.backend(Backend::new(if vip.is_ipv6() || v6_backends {
                IpAddr::from(backend_v6(i))
            } else {
                IpAddr::from(backend_v4(i))
            }))
        },
    )
}

/// The address of `ip route get DST` in namespace `ns` carries as `mtu N`, if any: the
/// path MTU the kernel learnt towards `dst` (route exceptions show it; plain routes on a
/// 1500-byte link do not).
fn route_mtu(ns: &str, dst: IpAddr) -> Option<u32> {
    let shown = common::ip(ns, &["route", "get", &dst.to_string()]).expect("ip route get");
    shown
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
}

/// Forgets every path MTU namespace `ns` learnt (IPv4: the flush sysctl also drops the
/// next-hop exceptions; IPv6: the cloned routes), so one case's PMTU discovery cannot carry
/// the next.
fn forget_path_mtus(ns: &str, dsts: &[IpAddr]) {
    common::sysctl(ns, &["net.ipv4.route.flush=1"]).expect("flush the IPv4 route cache");
    // "Nothing to flush" is not an error here; the check below is what counts.
    let _ = common::ip(ns, &["-6", "route", "flush", "cache"]);
    for &dst in dsts {
        assert_eq!(
            route_mtu(ns, dst),
            None,
            "{ns} still has a path MTU towards {dst} after flushing its route cache"
        );
    }
}

/// `setsockopt(fd, level, name, &value)` for an int option.
fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Result<()> {
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("int size");
    // SAFETY: the option value points at a live c_int of the given length.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), len) };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {name}, {value}): {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `getsockopt(fd, level, name)` for an int option.
fn get_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("int size");
    // SAFETY: value and len are live and len holds value's size.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if rc != 0 {
        bail!(
            "getsockopt({level}, {name}): {}",
            io::Error::last_os_error()
        );
    }
    Ok(value)
}

/// The text of `/proc/net/FILE` in namespace `ns`.
fn proc_net(ns: &str, file: &str) -> String {
    common::in_netns(ns, || {
        fs::read_to_string(format!("/proc/thread-self/net/{file}"))
    })
    .unwrap_or_else(|e| panic!("read /proc/net/{file} of {ns}: {e}"))
}

/// A line of `/proc/net/snmp` in namespace `ns`: the value of `field` in the `group` table
/// (e.g. "Icmp", "InDestUnreachs").
fn snmp(ns: &str, group: &str, field: &str) -> u64 {
    let text = proc_net(ns, "snmp");
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (rows.next(), rows.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no {group} table in /proc/net/snmp of {ns}:\n{text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {field} in /proc/net/snmp of {ns}"))
}

/// A line of `/proc/net/snmp6` in namespace `ns` (one counter per line): the value of
/// `field` (e.g. "Icmp6InPktTooBigs").
fn snmp6(ns: &str, field: &str) -> u64 {
    proc_net(ns, "snmp6")
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            if words.next() != Some(field) {
                return None;
            }
            words.next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/net/snmp6 of {ns}"))
}

/// A case's outcome for the log: its value, or its error chain on one line (`{:?}` of an
/// anyhow error would print a backtrace).
fn outcome_text<T: std::fmt::Debug>(r: &Result<T>) -> String {
    match r {
        Ok(v) => format!("ok ({v:?})"),
        Err(e) => format!("failed: {e:#}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

/// Concurrent uploads per case, and the size of each.
const UPLOADS: usize = 20;
const UPLOAD_LEN: usize = 4 << 20;
/// All uploads of a case must be stored within this; a stalled path fails a case after it.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(10);
/// One way through the balancer for the uploads.
struct UploadCase {
    name: &'static str,
    vip: IpAddr,
    port: u16,
    forwarding: &'static str,
    v6_backends: bool,
}

const UPLOAD_CASES: [UploadCase; 5] = [
    UploadCase {
        name: "v4-in-v4",
        vip: IpAddr::V4(VIP_V4),
        port: 7001,
        forwarding: "tunnel",
        v6_backends: false,
    },
    UploadCase {
        name: "v6-in-v6",
        vip: IpAddr::V6(VIP_V6),
        port: 7001,
        forwarding: "tunnel",
        v6_backends: true,
    },
    UploadCase {
        name: "v4-in-v6",
        vip: IpAddr::V4(VIP_V4),
        port: 7002,
        forwarding: "tunnel",
        v6_backends: true,
    },
    UploadCase {
        name: "direct-v4",
        vip: IpAddr::V4(VIP_V4),
        port: 7003,
        forwarding: "direct",
        v6_backends: false,
    },
    UploadCase {
        name: "direct-v6",
        vip: IpAddr::V6(VIP_V6),
        port: 7003,
        forwarding: "direct",
        v6_backends: true,
    },
];
const UPLOAD_PORTS: [u16; 3] = [7001, 7002, 7003];

impl UploadCase {
    fn tunnelled(&self) -> bool {
        self.forwarding == "tunnel"
    }

    /// The MSS option the client sees in the SYN-ACK: with the clamp's default (an IPv6
    /// outer header assumed) 1500 − 40 − 40 = 1420 for IPv4 and 1500 − 40 − 60 = 1400 for
    /// IPv6; without it the backend's own, 1500 − 40 and 1500 − 60.
    fn syn_ack_mss(&self, clamp: bool) -> u16 {
        match (self.vip.is_ipv4(), clamp) {
            (true, true) => 1420,
            (false, true) => 1400,
            (true, false) => 1460,
            (false, false) => 1440,
        }
    }
}

/// What one case of uploads gave.
struct UploadOutcome {
    name: &'static str,
    took: Duration,
    /// Problems, one line each: failed uploads, missing or corrupted files.
    problems: Vec<String>,
    /// Uploads stored and intact, per backend.
    per_backend: Vec<usize>,
    /// `icmp_too_big_sent` during the case.
    too_big: u64,
}

impl UploadOutcome {
    fn summary(&self) -> String {
        let intact: usize = self.per_backend.iter().sum();
        let mut s = format!(
            "{}: {intact}/{UPLOADS} stored intact in {:.2?} (per backend {:?}), icmp_too_big_sent +{}",
            self.name, self.took, self.per_backend, self.too_big
        );
        for p in self.problems.iter().take(3) {
            s.push_str("\n    ");
            s.push_str(p);
        }
        if self.problems.len() > 3 {
            s.push_str(&format!(
                "\n    ... {} problems in all",
                self.problems.len()
            ));
        }
        s
    }
}

/// `UPLOADS` concurrent uploads from the client to `case`, then each checked where a
/// backend stored it: exactly one backend has the file, and its sha256 is that of the data
/// sent. The files are removed afterwards.
fn run_uploads(
    topo: &Topology,
    servers: &UploadServers,
    case: &UploadCase,
    data: &[Vec<u8>],
    hashes: &[String],
) -> UploadOutcome {
    forget_path_mtus(&topo.cli, &[case.vip]);
    let too_big_before = topo.global_counter("icmp_too_big_sent");
    let dst = SocketAddr::new(case.vip, case.port);
    let names: Vec<String> = (0..data.len())
        .map(|i| format!("{}-{i}", case.name))
        .collect();
    let Uploaded {
        took,
        problems,
        per_backend,
    } = upload_all(
        &topo.cli,
        dst,
        servers,
        &names,
        data,
        hashes,
        UPLOAD_DEADLINE,
    );
    UploadOutcome {
        name: case.name,
        took,
        problems,
        per_backend,
        too_big: topo.global_counter("icmp_too_big_sent") - too_big_before,
    }
}

/// Every upload case through one agent and `weir decap EXTRA` on the backends: the SYN-ACK
/// MSS each case's client sees, then the uploads. Returns the outcomes and the SYN-ACKs the
/// clamp lowered in all.
fn upload_cases(tag: &str, decap_extra: &[&str]) -> Option<(Vec<UploadOutcome>, u64)> {
    if !common::require_root() {
        return None;
    }
    let clamp = !decap_extra.contains(&"--no-mss-clamp");
    let topo = Topology::build(tag).expect("topology");
    assert_lan_mtu(&topo);
    let servers = UploadServers::start(&topo, &UPLOAD_PORTS).expect("upload servers");
    let config = UPLOAD_CASES.iter().fold(topo.agent_config(), |c, case| {
        c.service(service(
            case.name,
            case.vip,
            case.port,
            "tcp",
            case.forwarding,
            case.v6_backends,
        ))
    });
    let mut agent = topo.start_agent(&config).expect("weir agent");
    let decap = topo
        .start_decap_with(&VIPS, decap_extra)
        .expect("weir decap");
    for case in &UPLOAD_CASES {
        let mss = captured_mss(&topo, case.vip, case.port).expect("SYN-ACK capture");
        assert_eq!(
            mss,
            case.syn_ack_mss(clamp),
            "{}: the MSS option of the SYN-ACK the client got (clamp {})",
            case.name,
            if clamp { "on" } else { "off" }
        );
    }
    let data: Vec<Vec<u8>> = (0..UPLOADS)
        .map(|i| payload(UPLOAD_LEN, u64::try_from(i).expect("index")))
        .collect();
    let hashes: Vec<String> = data.iter().map(|d| sha256(d)).collect();
    let outcomes: Vec<UploadOutcome> = UPLOAD_CASES
        .iter()
        .map(|case| {
            let o = run_uploads(&topo, &servers, case, &data, &hashes);
            println!("[{tag}] {}", o.summary());
            o
        })
        .collect();
    let clamped = stop_decap(decap);
    println!("[{tag}] SYN-ACKs clamped: {clamped}");
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
    Some((outcomes, clamped))
}

/// Panics listing every case that did not store all its uploads intact.
fn assert_all_stored(outcomes: &[UploadOutcome], how: &str) {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.problems.is_empty())
        .map(UploadOutcome::summary)
        .collect();
    assert!(
        failed.is_empty(),
        "{how}: {UPLOADS} concurrent uploads of {UPLOAD_LEN} bytes did not all arrive intact \
         within {UPLOAD_DEADLINE:?}:\n  {}",
        failed.join("\n  ")
    );
}

/// With the MSS clamp (`weir decap`'s default), every client segment fits through the
/// tunnel: all uploads arrive intact in every mode, and the balancer never needs to send a
/// Packet Too Big.
#[test]
fn uploads_with_the_mss_clamp() {
    let Some((outcomes, clamped)) = upload_cases("mc", &[]) else {
        return;
    };
    assert_all_stored(&outcomes, "with the MSS clamp");
    // One SYN-ACK per capture and per upload at least (a retransmitted one counts again).
    let connections = u64::try_from(UPLOAD_CASES.len() * (UPLOADS + 1)).expect("count");
    assert!(
        clamped >= connections,
        "the clamp lowered {clamped} SYN-ACKs, fewer than the {connections} connections"
    );
    for o in &outcomes {
        assert_eq!(
            o.too_big, 0,
            "{}: the balancer sent Packet Too Big although the clamp makes every segment fit",
            o.name
        );
    }
}

/// Without the clamp, the client's full-size segments no longer fit once tunnelled: the
/// balancer's ICMP "fragmentation needed" / Packet Too Big must lower the client's path MTU
/// so that the uploads still arrive intact. Direct mode adds no header and needs none.
#[test]
fn uploads_without_the_mss_clamp_by_path_mtu_discovery() {
    let Some((outcomes, clamped)) = upload_cases("mn", &["--no-mss-clamp"]) else {
        return;
    };
    assert_eq!(clamped, 0, "SYN-ACKs clamped with --no-mss-clamp");
    assert_all_stored(&outcomes, "without the MSS clamp");
    for (o, case) in outcomes.iter().zip(&UPLOAD_CASES) {
        if case.tunnelled() {
            assert!(
                o.too_big > 0,
                "{}: the uploads arrived without any Packet Too Big from the balancer, so \
                 they did not need path-MTU discovery",
                o.name
            );
        } else {
            assert_eq!(o.too_big, 0, "{}: Packet Too Big in direct mode", o.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A UDP datagram too big for the tunnel
// ---------------------------------------------------------------------------------------------

/// An error from a socket's error queue (`IP_RECVERR` / `IPV6_RECVERR`).
#[derive(Debug)]
struct QueuedError {
    errno: i32,
    /// `SO_EE_ORIGIN_ICMP` (2) or `SO_EE_ORIGIN_ICMP6` (3).
    origin: u8,
    icmp_type: u8,
    icmp_code: u8,
    /// For "fragmentation needed" and Packet Too Big: the MTU the error carried.
    info: u32,
    /// Who sent the ICMP error.
    offender: Option<IpAddr>,
}

/// The control buffer of `recvmsg`, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 512]);

/// The next error of the socket's error queue, without waiting; `None` if it is empty.
fn recv_queued_error(fd: RawFd) -> Result<Option<QueuedError>> {
    let mut data = [0u8; 2048];
    let mut control = Control([0; 512]);
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths); the fields that
    // matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    // SAFETY: msg points at live buffers of the lengths it gives.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e).context("recvmsg(MSG_ERRQUEUE)");
    }
    // SAFETY: msg was filled by recvmsg; its control buffer is aligned for cmsghdr.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return headers inside the control buffer.
        let (level, ty) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if (level == libc::SOL_IP && ty == libc::IP_RECVERR)
            || (level == libc::SOL_IPV6 && ty == libc::IPV6_RECVERR)
        {
            // SAFETY: the kernel puts a sock_extended_err at CMSG_DATA, followed by the
            // offender's sockaddr (SO_EE_OFFENDER), both inside the control buffer.
            let (ee, offender) = unsafe {
                let at = libc::CMSG_DATA(cmsg);
                let ee = std::ptr::read_unaligned(at.cast::<libc::sock_extended_err>());
                let addr = at.add(size_of::<libc::sock_extended_err>());
                let family = std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>());
                let offender = match libc::c_int::from(family) {
                    libc::AF_INET => {
                        let sin = std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>());
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>());
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                };
                (ee, offender)
            };
            return Ok(Some(QueuedError {
                errno: i32::try_from(ee.ee_errno).unwrap_or(-1),
                origin: ee.ee_origin,
                icmp_type: ee.ee_type,
                icmp_code: ee.ee_code,
                info: ee.ee_info,
                offender,
            }));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    bail!("an error-queue message without IP_RECVERR data")
}

/// The first error queued on the socket within `wait`, if any.
fn wait_queued_error(fd: RawFd, wait: Duration) -> Result<Option<QueuedError>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(e) = recv_queued_error(fd)? {
            return Ok(Some(e));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// From the calling thread's namespace: a UDP socket connected to `dst` that never lets the
/// kernel fragment (`IP_PMTUDISC_DO`: IPv4 datagrams carry DF) and queues ICMP errors for
/// `recv_queued_error`. Bound to `src_port` (0: any).
fn pmtu_probe_socket(dst: SocketAddr, src_port: u16) -> Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(dst), Type::DGRAM, Some(Protocol::UDP))?;
    let any: IpAddr = if dst.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    s.bind(&SockAddr::from(SocketAddr::new(any, src_port)))?;
    s.connect(&SockAddr::from(dst))?;
    let fd = s.as_raw_fd();
    if dst.is_ipv4() {
        set_int_opt(
            fd,
            libc::SOL_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        set_int_opt(fd, libc::SOL_IP, libc::IP_RECVERR, 1)?;
    } else {
        set_int_opt(
            fd,
            libc::SOL_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )?;
        set_int_opt(fd, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)?;
    }
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(sock)
}

/// The socket's path MTU (`IP_MTU` / `IPV6_MTU` of a connected socket).
fn socket_path_mtu(sock: &UdpSocket, v4: bool) -> Result<u32> {
    let (level, name) = if v4 {
        (libc::SOL_IP, libc::IP_MTU)
    } else {
        (libc::SOL_IPV6, libc::IPV6_MTU)
    };
    Ok(u32::try_from(get_int_opt(sock.as_raw_fd(), level, name)?)?)
}

/// Checks that `err` is the "too big" ICMP error of the socket's family carrying `mtu`.
fn check_too_big(err: &QueuedError, v4: bool, mtu: u32) -> Result<()> {
    let (origin, icmp_type, icmp_code) = if v4 {
        (libc::SO_EE_ORIGIN_ICMP, 3, 4)
    } else {
        (libc::SO_EE_ORIGIN_ICMP6, 2, 0)
    };
    ensure!(
        err.errno == libc::EMSGSIZE
            && err.origin == origin
            && (err.icmp_type, err.icmp_code) == (icmp_type, icmp_code)
            && err.info == mtu,
        "expected EMSGSIZE from ICMP type {icmp_type} code {icmp_code} with MTU {mtu}, got {err:?}"
    );
    Ok(())
}

/// Bytes of the IP and UDP headers of a datagram to `dst`.
fn udp_headers(dst: IpAddr) -> usize {
    if dst.is_ipv4() { 20 + 8 } else { 40 + 8 }
}

/// One way through the tunnel for the too-big datagram, and the MTU its Packet Too Big must
/// carry: 1500 − the outer header.
struct TooBigCase {
    name: &'static str,
    vip: IpAddr,
    port: u16,
    v6_backends: bool,
    mtu: u32,
}

const TOO_BIG_CASES: [TooBigCase; 3] = [
    TooBigCase {
        name: "v4-in-v4",
        vip: IpAddr::V4(VIP_V4),
        port: 7001,
        v6_backends: false,
        mtu: 1480,
    },
    TooBigCase {
        name: "v6-in-v6",
        vip: IpAddr::V6(VIP_V6),
        port: 7001,
        v6_backends: true,
        mtu: 1460,
    },
    TooBigCase {
        name: "v4-in-v6",
        vip: IpAddr::V4(VIP_V4),
        port: 7002,
        v6_backends: true,
        mtu: 1460,
    },
];

/// From the client: one full-size (1500-byte) datagram to the case's VIP, which must get
/// exactly one ICMP error with the tunnel's MTU (and the socket's path MTU must drop to it,
/// and the agent count exactly one); then a datagram of that size must get through and be
/// echoed by the backend.
fn too_big_case(topo: &Topology, case: &TooBigCase) -> Result<()> {
    forget_path_mtus(&topo.cli, &[case.vip]);
    let before = topo.global_counter("icmp_too_big_sent");
    let dst = SocketAddr::new(case.vip, case.port);
    let v4 = case.vip.is_ipv4();
    let full = usize::try_from(LAN_MTU).expect("mtu") - udp_headers(case.vip);
    let reduced = usize::try_from(case.mtu).expect("mtu") - udp_headers(case.vip);
    common::in_netns(&topo.cli, || -> Result<()> {
        let sock = pmtu_probe_socket(dst, 0)?;
        sock.send(&payload(full, 1))
            .context("sending a full-size datagram")?;
        let err =
            wait_queued_error(sock.as_raw_fd(), Duration::from_secs(2))?.with_context(|| {
                format!(
                    "no ICMP error reached the client within 2 s of a {}-byte datagram to \
                     {dst}, too big for the tunnel",
                    full + udp_headers(case.vip)
                )
            })?;
        println!("[{}] queued error: {err:?}", case.name);
        check_too_big(&err, v4, case.mtu)?;
        // One datagram, one error: wait a little for a duplicate.
        if let Some(second) = wait_queued_error(sock.as_raw_fd(), Duration::from_millis(300))? {
            bail!("a second ICMP error for one datagram: {second:?}");
        }
        let path_mtu = socket_path_mtu(&sock, v4)?;
        ensure!(
            path_mtu == case.mtu,
            "the socket's path MTU is {path_mtu} after the error, not {}",
            case.mtu
        );
        let msg = payload(reduced, 2);
        let mut buf = vec![0u8; 4096];
        for _attempt in 0..2 {
            sock.send(&msg)
                .with_context(|| format!("sending a {reduced}-byte datagram"))?;
            if let Ok(n) = sock.recv(&mut buf)
                && buf[..n] == msg[..]
            {
                return Ok(());
            }
        }
        bail!("the {reduced}-byte datagram that fits the path MTU was not echoed (2 attempts)")
    })?;
    let sent = topo.global_counter("icmp_too_big_sent") - before;
    ensure!(
        sent == 1,
        "the agent counts {sent} icmp_too_big_sent for one too-big datagram"
    );
    Ok(())
}

/// A forged "too big" error about the client's own flow, sent to the client by a backend's
/// namespace (as a router on the path would): the client's socket must queue it with its
/// MTU and take it as its path MTU. Checks this test's error-queue reading, independent of
/// the balancer.
fn forged_too_big_reaches_the_client(topo: &Topology, vip: IpAddr, port: u16) -> Result<()> {
    let v4 = vip.is_ipv4();
    let mtu: u32 = if v4 { 1480 } else { 1460 };
    let src_port = 45_500;
    let dst = SocketAddr::new(vip, port);
    let sock = common::in_netns(&topo.cli, || pmtu_probe_socket(dst, src_port))?;
    let client: IpAddr = if v4 {
        CLIENT_V4.into()
    } else {
        CLIENT_V6.into()
    };
    let quoted = quoted_udp(
        SocketAddr::new(client, src_port),
        dst,
        usize::try_from(LAN_MTU).expect("mtu"),
    );
    send_icmp_error(&topo.backends[0], client, v4, mtu, &quoted)?;
    let err = wait_queued_error(sock.as_raw_fd(), Duration::from_secs(2))?
        .context("the forged ICMP error did not reach the client's socket")?;
    check_too_big(&err, v4, mtu)?;
    let forger: IpAddr = if v4 {
        backend_v4(0).into()
    } else {
        backend_v6(0).into()
    };
    ensure!(
        err.offender == Some(forger),
        "the error queue names {:?} as the sender, not {forger}",
        err.offender
    );
    let path_mtu = socket_path_mtu(&sock, v4)?;
    ensure!(path_mtu == mtu, "path MTU {path_mtu} after a forged {mtu}");
    Ok(())
}

/// The start of an IP datagram from `src` to `dst` of `total_len` bytes carrying UDP (IPv4:
/// with DF): its IP header and UDP header, what an ICMP error quotes.
fn quoted_udp(src: SocketAddr, dst: SocketAddr, total_len: usize) -> Vec<u8> {
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let mut out = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let len = u16::try_from(total_len).expect("length");
            udp[4..6].copy_from_slice(&(len - 20).to_be_bytes());
            ipv4_header(s, d, 17, len, true).to_vec()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(total_len - 40).expect("length");
            udp[4..6].copy_from_slice(&len.to_be_bytes());
            ipv6_header(s, d, 17, len).to_vec()
        }
        _ => panic!("mixed families in a quoted packet"),
    };
    out.extend_from_slice(&udp);
    out
}

/// An IPv4 header (no options), with its checksum.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, total_len: u16, df: bool) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[4..6].copy_from_slice(&0x4d54u16.to_be_bytes());
    if df {
        h[6] = 0x40;
    }
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let csum = common::inet_checksum(&[&h]);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h
}

/// An IPv6 header (no extension headers) whose payload of `payload_len` bytes is `next`.
fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: u16) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// ICMP "fragmentation needed" (v4) or ICMPv6 Packet Too Big (v6) with `mtu`, quoting
/// `quoted`; the ICMP checksum is filled in for IPv4 (the kernel fills in ICMPv6's).
fn too_big_message(v4: bool, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut m = if v4 {
        let mut m = vec![3, 4, 0, 0, 0, 0];
        m.extend_from_slice(&u16::try_from(mtu).expect("mtu").to_be_bytes());
        m
    } else {
        let mut m = vec![2, 0, 0, 0];
        m.extend_from_slice(&mtu.to_be_bytes());
        m
    };
    m.extend_from_slice(quoted);
    if v4 {
        let csum = common::inet_checksum(&[&m]);
        m[2..4].copy_from_slice(&csum.to_be_bytes());
    }
    m
}

/// From namespace `ns`: a "too big" ICMP error to `to` quoting `quoted`, through a raw ICMP
/// socket (the kernel adds the IP header with the namespace's own source address).
fn send_icmp_error(ns: &str, to: IpAddr, v4: bool, mtu: u32, quoted: &[u8]) -> Result<()> {
    let message = too_big_message(v4, mtu, quoted);
    common::in_netns(ns, move || -> Result<()> {
        let (domain, proto) = if v4 {
            (Domain::IPV4, Protocol::ICMPV4)
        } else {
            (Domain::IPV6, Protocol::ICMPV6)
        };
        let s = Socket::new(domain, Type::RAW, Some(proto)).context("raw ICMP socket")?;
        s.send_to(&message, &SockAddr::from(SocketAddr::new(to, 0)))
            .with_context(|| format!("send an ICMP error to {to}"))?;
        Ok(())
    })
}

/// A UDP datagram too big for the tunnel gets one "fragmentation needed" / Packet Too Big
/// from the balancer with the tunnel's MTU, and the client's next datagram of that size
/// arrives: IPv4-in-IPv4 (1480), IPv6-in-IPv6 and IPv4-in-IPv6 (1460).
#[test]
fn a_datagram_too_big_for_the_tunnel_gets_one_packet_too_big() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("tb").expect("topology");
    assert_lan_mtu(&topo);
    let _echo = topo.start_echo_servers(7001).expect("echo servers");
    let _echo46 = EchoServers::start(&topo.backends, 7002, &[IpAddr::V4(VIP_V4)])
        .expect("echo servers for IPv4-in-IPv6");
    let config = TOO_BIG_CASES.iter().fold(topo.agent_config(), |c, case| {
        c.service(service(
            case.name,
            case.vip,
            case.port,
            "udp",
            "tunnel",
            case.v6_backends,
        ))
    });
    // Harness check first, without the balancer in the way of the ICMP error: the client's
    // error queue and path MTU take a "too big" error for its flow.
    for vip in VIPS {
        forged_too_big_reaches_the_client(&topo, vip, 7001).unwrap_or_else(|e| {
            panic!("harness: a forged ICMP error to the client ({vip}): {e:#}")
        });
    }
    let mut agent = topo.start_agent(&config).expect("weir agent");
    let decap = topo.start_decap(&VIPS).expect("weir decap");
    let failed: Vec<String> = TOO_BIG_CASES
        .iter()
        .filter_map(|case| {
            let r = too_big_case(&topo, case);
            println!("[{}] {}", case.name, outcome_text(&r));
            r.err().map(|e| format!("{}: {e:#}", case.name))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "too-big datagrams through the tunnel:\n  {}",
        failed.join("\n  ")
    );
    stop_decap(decap);
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
}

// ---------------------------------------------------------------------------------------------
// An ICMP error from the path, for a VIP flow
// ---------------------------------------------------------------------------------------------

/// The path MTU the forged "too big" errors announce.
const FORGED_MTU: u32 = 1400;
/// A router between the backends and the client, per family: addresses nobody in the
/// topology has.
const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);

/// From the client's namespace, spoofing the router of `to`'s family: ICMP "fragmentation
/// needed" / ICMPv6 Packet Too Big with `mtu` to `to`, quoting a full-size datagram of the
/// VIP's reply flow `vip` → `client`, as a router that could not forward that reply would
/// send it (to the reply's source, the VIP).
fn forge_too_big(
    topo: &Topology,
    to: IpAddr,
    mtu: u32,
    vip: SocketAddr,
    client: SocketAddr,
) -> Result<()> {
    let quoted = quoted_udp(vip, client, usize::try_from(LAN_MTU).expect("mtu"));
    let mut icmp = too_big_message(to.is_ipv4(), mtu, &quoted);
    let packet = match to {
        IpAddr::V4(to) => {
            let len = u16::try_from(20 + icmp.len()).expect("length");
            [&ipv4_header(ROUTER_V4, to, 1, len, false)[..], &icmp].concat()
        }
        IpAddr::V6(to) => {
            // Sent with its IP header, the message gets no checksum from the kernel: the
            // ICMPv6 one covers the pseudo-header of the spoofed source (RFC 4443 §2.3).
            let len = u16::try_from(icmp.len()).expect("length");
            let csum = common::inet_checksum(&[
                &ROUTER_V6.octets(),
                &to.octets(),
                &u32::from(len).to_be_bytes(),
                &[0, 0, 0, 58],
                &icmp,
            ]);
            icmp[2..4].copy_from_slice(&csum.to_be_bytes());
            [&ipv6_header(ROUTER_V6, to, 58, len)[..], &icmp].concat()
        }
    };
    let dst = SocketAddr::new(to, 0);
    common::in_netns(&topo.cli, move || -> Result<()> {
        // IPPROTO_RAW (IPv4 and IPv6): the header above goes out as it is, spoofed source
        // included.
        let s = Socket::new(
            Domain::for_address(dst),
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context("raw IP socket")?;
        s.send_to(&packet, &SockAddr::from(dst))
            .with_context(|| format!("send a forged ICMP error to {to}"))?;
        Ok(())
    })
}

/// The "too big" ICMP errors every backend received, as its kernel counts them: IPv4's
/// `Icmp InDestUnreachs` (no counter has the code), IPv6's `Icmp6InPktTooBigs`.
fn too_bigs_received(topo: &Topology, v4: bool) -> Vec<u64> {
    topo.backends
        .iter()
        .map(|ns| {
            if v4 {
                snmp(ns, "Icmp", "InDestUnreachs")
            } else {
                snmp6(ns, "Icmp6InPktTooBigs")
            }
        })
        .collect()
}

/// A forged "too big" ICMP error quoting a UDP flow of `vip_addr` (Linux applies the PMTU
/// to the socket matching the quoted tuple: `udp_err` / `udpv6_err`) reaches the backend
/// that serves the flow, and no other; that backend's route to the client then carries the
/// lower MTU. Tunnel mode, in the VIP's family (a backend bound to the VIP's port).
fn icmp_error_reaches_its_backend_only(tag: &str, vip_addr: IpAddr) {
    let port = 7001;
    let v4 = vip_addr.is_ipv4();
    let (client_addr, error) = if v4 {
        (IpAddr::V4(CLIENT_V4), "\"fragmentation needed\"")
    } else {
        (IpAddr::V6(CLIENT_V6), "Packet Too Big")
    };
    let topo = Topology::build(tag).expect("topology");
    assert_lan_mtu(&topo);
    let servers = topo.start_echo_servers(port).expect("echo servers");
    let name = if v4 { "udp4" } else { "udp6" };
    let config = topo
        .agent_config()
        .service(service(name, vip_addr, port, "udp", "tunnel", false));
    let mut agent = topo.start_agent(&config).expect("weir agent");
    let decap = topo.start_decap(&VIPS).expect("weir decap");
    let client = SocketAddr::new(client_addr, 45_000);
    let vip = SocketAddr::new(vip_addr, port);
    assert!(
        topo.udp_probe(vip_addr, port, client.port(), Duration::from_secs(1))
            .expect("probe"),
        "the flow {client} -> {vip} was not echoed"
    );
    let owner = servers
        .counters
        .iter()
        .position(|c| {
            c.udp_peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&client)
        })
        .expect("a backend echoed the flow");
    let owner_ns = topo.backends[owner].clone();
    println!(
        "the flow {client} -> {vip} is served by backend {}",
        owner + 1
    );
    for ns in &topo.backends {
        assert_eq!(route_mtu(ns, client_addr), None, "{ns}: a path MTU already");
    }

    // Harness check: the forged error, sent straight to the owner's own address, is one the
    // owner's kernel acts on (its UDP socket matches the quoted tuple).
    let owner_addr = if v4 {
        IpAddr::V4(backend_v4(owner))
    } else {
        IpAddr::V6(backend_v6(owner))
    };
    let before = too_bigs_received(&topo, v4);
    forge_too_big(&topo, owner_addr, 1450, vip, client).expect("forge");
    let learnt = common::wait_until(
        "harness: the owner to learn a path MTU from the forged error",
        Duration::from_secs(2),
        || route_mtu(&owner_ns, client_addr),
    );
    assert_eq!(learnt, 1450, "harness: the owner's path MTU to the client");
    assert_eq!(
        too_bigs_received(&topo, v4)[owner],
        before[owner] + 1,
        "harness: ICMP errors received by the owner"
    );
    forget_path_mtus(&owner_ns, &[client_addr]);

    // The real thing: the error goes to the VIP, i.e. to the balancer.
    let before = too_bigs_received(&topo, v4);
    let forwarded_before = topo.global_counter("icmp_error_forwarded");
    let passed_before = topo.global_counter("pass_not_vip");
    forge_too_big(&topo, vip_addr, FORGED_MTU, vip, client).expect("forge");
    let deadline = Instant::now() + Duration::from_secs(2);
    while too_bigs_received(&topo, v4)[owner] == before[owner] && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    // Time for a copy to reach another backend too, if the balancer sent one.
    thread::sleep(Duration::from_millis(200));
    let after = too_bigs_received(&topo, v4);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!(
        "ICMP {error} received per backend: {delta:?}; the agent's pass_not_vip +{}",
        topo.global_counter("pass_not_vip") - passed_before
    );
    let mut want = vec![0; BACKENDS];
    want[owner] = 1;
    assert_eq!(
        delta,
        want,
        "ICMP errors received per backend after one forged {error} to the VIP quoting a flow \
         of backend {}",
        owner + 1
    );
    assert_eq!(
        route_mtu(&owner_ns, client_addr),
        Some(FORGED_MTU),
        "the owner's path MTU towards the client"
    );
    for (i, ns) in topo
        .backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
    {
        assert_eq!(
            route_mtu(ns, client_addr),
            None,
            "backend {}: a path MTU towards the client",
            i + 1
        );
    }
    assert_eq!(
        topo.global_counter("icmp_error_forwarded") - forwarded_before,
        1,
        "the agent's icmp_error_forwarded"
    );
    stop_decap(decap);
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
}

/// IPv4-in-IPv4: a forged ICMP "fragmentation needed" for a VIP flow.
#[test]
fn an_icmp_error_for_a_vip_flow_reaches_its_backend_only() {
    if !common::require_root() {
        return;
    }
    icmp_error_reaches_its_backend_only("ie", VIP_V4.into());
}

/// IPv6-in-IPv6: a forged ICMPv6 Packet Too Big for a VIP flow.
#[test]
fn an_icmpv6_packet_too_big_for_a_vip_flow_reaches_its_backend_only() {
    if !common::require_root() {
        return;
    }
    icmp_error_reaches_its_backend_only("i6", VIP_V6.into());
}

// ---------------------------------------------------------------------------------------------
// Ping
// ---------------------------------------------------------------------------------------------

/// From the client: one ICMP echo request to `vip` (raw socket); whether its reply came back
/// from `vip` within `wait`.
fn ping(topo: &Topology, vip: IpAddr, seq: u16, wait: Duration) -> Result<bool> {
    let id = u16::try_from(std::process::id() & 0xffff).expect("masked");
    let data = payload(48, u64::from(seq));
    common::in_netns(&topo.cli, || -> Result<bool> {
        let v4 = vip.is_ipv4();
        let (domain, proto, request, reply) = if v4 {
            (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8)
        } else {
            (Domain::IPV6, Protocol::ICMPV6, 128, 129)
        };
        let s = Socket::new(domain, Type::RAW, Some(proto)).context("raw ICMP socket")?;
        // Connected, a raw socket receives only what comes from the VIP.
        s.connect(&SockAddr::from(SocketAddr::new(vip, 0)))
            .with_context(|| format!("connect a raw ICMP socket to {vip}"))?;
        let mut m = vec![request, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&data);
        if v4 {
            // The kernel computes ICMPv6 checksums of raw sockets, not ICMP's.
            let csum = common::inet_checksum(&[&m]);
            m[2..4].copy_from_slice(&csum.to_be_bytes());
        }
        s.send(&m)
            .with_context(|| format!("send an echo request to {vip}"))?;
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let n = match (&s).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e).context("recv"),
            };
            // IPv4 raw sockets receive the IP header too; IPv6 ones only the ICMPv6 message.
            let icmp = if v4 {
                &buf[(usize::from(buf[0] & 0x0f) * 4).min(n)..n]
            } else {
                &buf[..n]
            };
            if icmp.len() == 8 + data.len()
                && icmp[0] == reply
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
                && icmp[8..] == data[..]
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
}

/// Ping to a VIP (IPv4 and IPv6) is answered by the balancer, which counts it. The backends
/// cannot answer instead: tunnel mode without `weir decap` on them.
#[test]
fn ping_to_a_vip_is_answered() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build("pg").expect("topology");
    let config = topo
        .agent_config()
        .service(service("p4", VIP_V4.into(), 7001, "udp", "tunnel", false))
        .service(service("p6", VIP_V6.into(), 7001, "udp", "tunnel", true));
    for vip in VIPS {
        assert!(
            !ping(&topo, vip, 1, Duration::from_millis(300)).expect("ping"),
            "{vip} answered ping before the agent started: the topology has a kernel path to it"
        );
    }
    let mut agent = topo.start_agent(&config).expect("weir agent");
    let mut failed = Vec::new();
    for (seq, vip) in (2..).zip(VIPS) {
        let before = topo.global_counter("icmp_echo_replied");
        let answered = ping(&topo, vip, seq, Duration::from_secs(2)).expect("ping");
        let counted = topo.global_counter("icmp_echo_replied") - before;
        println!("ping {vip}: answered {answered}, icmp_echo_replied +{counted}");
        if !answered {
            failed.push(format!("{vip}: no echo reply within 2 s"));
        } else if counted != 1 {
            failed.push(format!("{vip}: answered, icmp_echo_replied +{counted}"));
        }
    }
    assert!(
        failed.is_empty(),
        "ping to the VIPs:\n  {}",
        failed.join("\n  ")
    );
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
}

// ---------------------------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------------------------

const FRAG_DATAGRAMS: usize = 5;
const FRAG_LEN: usize = 4000;

/// What one backend's servers received: (port, datagram), in order.
type Received = Arc<Mutex<Vec<(u16, Vec<u8>)>>>;

/// UDP servers bound to the IPv4 VIP on each backend that keep every datagram they receive
/// whole (up to 64 KiB, unlike the echo servers), by backend and port.
struct DatagramLog {
    /// Per backend.
    got: Vec<Received>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DatagramLog {
    fn start(topo: &Topology, ports: &[u16]) -> Result<Self> {
        let mut me = Self {
            got: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for ns in &topo.backends {
            let got = Arc::new(Mutex::new(Vec::new()));
            me.got.push(got.clone());
            for &port in ports {
                let addr = SocketAddr::new(VIP_V4.into(), port);
                let sock = common::in_netns(ns, || UdpSocket::bind(addr))
                    .with_context(|| format!("bind {addr} in {ns}"))?;
                sock.set_read_timeout(Some(Duration::from_millis(100)))?;
                let (got, stop) = (got.clone(), me.stop.clone());
                me.threads.push(thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(n) = sock.recv(&mut buf) {
                            got.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((port, buf[..n].to_vec()));
                        }
                    }
                }));
            }
        }
        Ok(me)
    }

    /// Datagrams received on `port`, per backend.
    fn on_port(&self, port: u16) -> Vec<Vec<Vec<u8>>> {
        self.got
            .iter()
            .map(|g| {
                g.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|(p, _)| *p == port)
                    .map(|(_, d)| d.clone())
                    .collect()
            })
            .collect()
    }
}

impl Drop for DatagramLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// From the client: `FRAG_DATAGRAMS` datagrams of `FRAG_LEN` bytes to the IPv4 VIP's
/// `port`, which the client's kernel fragments (`IP_PMTUDISC_DONT`); then they must all be
/// received whole and intact, all by one backend (ip-hash: the source address alone picks
/// it, and fragments carry no ports).
fn fragments_case(topo: &Topology, log: &DatagramLog, port: u16) -> Result<usize> {
    let sent: Vec<Vec<u8>> = (0..FRAG_DATAGRAMS)
        .map(|i| payload(FRAG_LEN, 100 + u64::try_from(i).expect("index")))
        .collect();
    let before = topo.global_counter("fragment_forwarded");
    let dropped_before = topo.global_counter("drop_fragment");
    common::in_netns(&topo.cli, || -> Result<()> {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        set_int_opt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )?;
        sock.connect((VIP_V4, port))?;
        for d in &sent {
            sock.send(d).context("send")?;
        }
        Ok(())
    })?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let total = |log: &DatagramLog| log.on_port(port).iter().map(Vec::len).sum::<usize>();
    while total(log) < FRAG_DATAGRAMS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(100));
    let got = log.on_port(port);
    let counts: Vec<usize> = got.iter().map(Vec::len).collect();
    println!(
        "port {port}: datagrams per backend {counts:?}; the agent's fragment_forwarded +{}, \
         drop_fragment +{}",
        topo.global_counter("fragment_forwarded") - before,
        topo.global_counter("drop_fragment") - dropped_before
    );
    let Some(backend) = counts.iter().position(|&c| c > 0) else {
        bail!(
            "none of {FRAG_DATAGRAMS} fragmented {FRAG_LEN}-byte datagrams reached a backend \
             within 2 s"
        );
    };
    ensure!(
        counts.iter().filter(|&&c| c > 0).count() == 1,
        "the datagrams reached several backends: {counts:?}"
    );
    ensure!(
        got[backend] == sent,
        "backend {} received {:?} bytes per datagram, not the {FRAG_DATAGRAMS} datagrams of \
         {FRAG_LEN} bytes sent (or not intact)",
        backend + 1,
        got[backend].iter().map(Vec::len).collect::<Vec<_>>()
    );
    let forwarded = topo.global_counter("fragment_forwarded") - before;
    ensure!(
        forwarded >= u64::try_from(FRAG_DATAGRAMS).expect("count"),
        "the agent counts {forwarded} fragment_forwarded for {FRAG_DATAGRAMS} fragmented datagrams"
    );
    Ok(backend)
}

/// With `ip-hash`, fragmented UDP datagrams of 4000 bytes reach one backend and are
/// reassembled there: in direct mode (at the LAN's MTU), and in tunnel mode from a client
/// whose interface MTU is 1400, so that each fragment still fits once tunnelled.
#[test]
fn fragments_of_an_ip_hash_service_reach_one_backend() {
    if !common::require_root() {
        return;
    }
    let (direct_port, tunnel_port) = (7001, 7002);
    let topo = Topology::build("fg").expect("topology");
    assert_lan_mtu(&topo);
    let log = DatagramLog::start(&topo, &[direct_port, tunnel_port]).expect("UDP servers");
    // One ip-hash service per phase: a non-first fragment carries no port, so the datapath
    // forwards fragments only for an address and protocol with exactly one (ip-hash) service
    // (README, "Fragments"); two on one address would leave them dropped by design.
    let direct_config = topo.agent_config().service(
        service("fd", VIP_V4.into(), direct_port, "udp", "direct", false).scheduler("ip-hash"),
    );
    let tunnel_config = topo.agent_config().service(
        service("ft", VIP_V4.into(), tunnel_port, "udp", "tunnel", false).scheduler("ip-hash"),
    );
    let mut agent = topo.start_agent(&direct_config).expect("weir agent");
    let decap: Vec<ChildGuard> = topo.start_decap(&VIPS).expect("weir decap");
    let direct = fragments_case(&topo, &log, direct_port);
    println!("direct: {}", outcome_text(&direct));
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
    let mut agent = topo.start_agent(&tunnel_config).expect("weir agent");
    common::ip(
        &topo.cli,
        &["link", "set", "dev", common::NODE_IF, "mtu", "1400"],
    )
    .expect("client MTU 1400");
    let tunnel = fragments_case(&topo, &log, tunnel_port);
    println!("tunnel, client MTU 1400: {}", outcome_text(&tunnel));
    let failed: Vec<String> = [("direct", direct), ("tunnel (client MTU 1400)", tunnel)]
        .into_iter()
        .filter_map(|(what, r)| r.err().map(|e| format!("{what}: {e:#}")))
        .collect();
    assert!(
        failed.is_empty(),
        "fragmented datagrams to an ip-hash service:\n  {}",
        failed.join("\n  ")
    );
    stop_decap(decap);
    let st = agent.stop();
    assert!(st.is_some_and(|s| s.success()), "agent exit: {st:?}");
}
