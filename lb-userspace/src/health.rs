//! Active health checks with keepalived/HAProxy semantics.
//!
//! [`HealthChecker`] runs one lightweight tokio task per checked backend: the task sleeps,
//! runs [`check_once`], reports every result as [`HealthEvent::Checked`] and every change of
//! state as [`HealthEvent::Transition`]. The state itself is the pure [`RiseFall`] machine: a
//! backend goes down after `fall` consecutive failures and up after `rise` consecutive
//! successes, except that a new backend (never checked) starts down and comes up on its first
//! successful check.
//!
//! Checks are jittered so that a thousand backends configured at once do not all get checked
//! in the same millisecond: a target's first check happens after a random delay in
//! `[0, interval)` and every later interval is scaled by a random factor in `[0.9, 1.1)`.
//!
//! TCP and HTTP check connections are closed with `SO_LINGER` 0 (a reset, as HAProxy does),
//! so that the agent does not accumulate `TIME_WAIT` sockets at one check per backend per
//! second.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::mpsc::Sender,
    task::JoinHandle,
    time::Instant,
};

use crate::config::{HealthCheck, HealthKind};

/// The most of an HTTP response read while looking for the status line.
const HTTP_READ_LIMIT: usize = 4096;

/// Room for the reply to a UDP check; anything longer is truncated (and still counts).
const UDP_READ_LIMIT: usize = 512;

/// Environment variable that makes every health task panic at its first check (tests only).
pub const PANIC_FAILPOINT: &str = "WEIR_TEST_HEALTH_TASK_PANIC";

/// The shortest interval a task sleeps, whatever it is given: guards against a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// One backend of one service to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub address: IpAddr,
    /// The port checked, already resolved by the caller (`spec.port` or the service port).
    pub port: u16,
    pub spec: HealthCheck,
}

/// What the checker reports on its channel.
#[derive(Debug, Clone, PartialEq)]
pub enum HealthEvent {
    /// Every finished check.
    Checked {
        service: String,
        address: IpAddr,
        ok: bool,
        duration: Duration,
        error: Option<String>,
    },
    /// A state change after rise/fall (or the first success of a new backend).
    Transition {
        service: String,
        address: IpAddr,
        up: bool,
    },
}

/// The rise/fall state machine of one backend.
///
/// A backend goes down after `fall` consecutive failures and up after `rise` consecutive
/// successes. A new backend ([`RiseFall::new_unchecked`]) starts down and goes up on its first
/// success, even if failures came before it; from then on `rise`/`fall` apply. A `rise` or
/// `fall` of 0 counts as 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiseFall {
    up: bool,
    /// Whether the backend has ever been seen healthy (or its state was known at the start);
    /// until then one success is enough.
    proven: bool,
    successes: u32,
    failures: u32,
}

impl RiseFall {
    /// A new backend: down until its first successful check.
    #[must_use]
    pub const fn new_unchecked() -> Self {
        Self {
            up: false,
            proven: false,
            successes: 0,
            failures: 0,
        }
    }

    /// A backend whose state is already known (e.g. adopted from a running datapath), with
    /// both streaks at zero.
    #[must_use]
    pub const fn with_state(up: bool) -> Self {
        Self {
            up,
            proven: true,
            successes: 0,
            failures: 0,
        }
    }

    /// Whether the backend currently counts as up.
    #[must_use]
    pub const fn is_up(&self) -> bool {
        self.up
    }

    /// Records a result; returns `Some(new_state)` on a transition.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            let rises = !self.up && (!self.proven || self.successes >= rise.max(1));
            self.proven = true;
            if rises {
                self.up = true;
                self.successes = 0;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall.max(1) {
                self.up = false;
                self.failures = 0;
                return Some(false);
            }
        }
        None
    }
}

/// What identifies a running task; a target whose spec changed gets a new task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TaskKey {
    service: String,
    address: IpAddr,
    port: u16,
}

#[derive(Debug)]
struct Running {
    spec: HealthCheck,
    handle: JoinHandle<()>,
}

/// Runs one tokio task per checked target and reports on a channel.
///
/// Targets whose kind is [`HealthKind::None`] get no task: such backends are always up, and
/// the checker says nothing about them.
#[derive(Debug)]
pub struct HealthChecker {
    events: Sender<HealthEvent>,
    tasks: HashMap<TaskKey, Running>,
}

impl HealthChecker {
    /// A checker with no targets, which will report on `events`.
    ///
    /// A task stops by itself once the receiver is dropped.
    #[must_use]
    pub fn new(events: Sender<HealthEvent>) -> Self {
        Self {
            events,
            tasks: HashMap::new(),
        }
    }

    /// Makes the running checks match `targets`: starts tasks for new
    /// (service, address, port, spec) keys, stops tasks whose key vanished (abort), keeps
    /// unchanged ones running (their rise/fall state continues).
    ///
    /// `initial` gives the known state of a target when its task starts: `Some(up)`, or `None`
    /// for a new backend (unchecked, down until its first success). It is ignored for a target
    /// whose task keeps running. Of two entries with the same (service, address, port), the
    /// first counts.
    ///
    /// An aborted task stops at its next await; an event it was already sending may still
    /// arrive, so the consumer should ignore events about targets it no longer has.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime while a task has to start.
    pub fn set_targets(&mut self, targets: Vec<(Target, Option<bool>)>) {
        let mut wanted: HashMap<TaskKey, (Target, Option<bool>)> =
            HashMap::with_capacity(targets.len());
        for (target, initial) in targets {
            if target.spec.kind == HealthKind::None {
                continue;
            }
            let key = TaskKey {
                service: target.service.clone(),
                address: target.address,
                port: target.port,
            };
            wanted.entry(key).or_insert((target, initial));
        }

        self.tasks.retain(|key, running| {
            let keep = wanted
                .get(key)
                .is_some_and(|(target, _)| target.spec == running.spec);
            if !keep {
                running.handle.abort();
            }
            keep
        });

        for (key, (target, initial)) in wanted {
            if let Entry::Vacant(slot) = self.tasks.entry(key) {
                let spec = target.spec.clone();
                let handle = tokio::spawn(run(target, initial, self.events.clone()));
                slot.insert(Running { spec, handle });
            }
        }
    }

    /// The number of targets being checked (those of kind `none` do not count).
    #[must_use]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no target is being checked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for running in self.tasks.values() {
            running.handle.abort();
        }
    }
}

/// The loop of one target's task: jittered sleeps, checks, events.
async fn run(target: Target, initial: Option<bool>, events: Sender<HealthEvent>) {
    let mut state = initial.map_or_else(RiseFall::new_unchecked, RiseFall::with_state);
    let mut rng = Xorshift::seeded(&target);
    let interval = target.spec.interval.max(MIN_INTERVAL);
    let mut next = Instant::now() + scale(interval, rng.unit());
    // A test hook: the agent's end-to-end tests make a health task panic to check that a
    // panicking task takes the agent down loudly instead of silently ending health checks.
    let panic_for_test = std::env::var_os(PANIC_FAILPOINT).is_some();
    loop {
        tokio::time::sleep_until(next).await;
        assert!(
            !panic_for_test,
            "{PANIC_FAILPOINT} is set: a health task panics (test hook)"
        );
        let started = Instant::now();
        next = started + scale(interval, 0.9 + 0.2 * rng.unit());

        let result = check_once(&target).await;
        let ok = result.is_ok();
        let checked = HealthEvent::Checked {
            service: target.service.clone(),
            address: target.address,
            ok,
            duration: started.elapsed(),
            error: result.err(),
        };
        if events.send(checked).await.is_err() {
            return;
        }
        if let Some(up) = state.record(ok, target.spec.rise, target.spec.fall) {
            let transition = HealthEvent::Transition {
                service: target.service.clone(),
                address: target.address,
                up,
            };
            if events.send(transition).await.is_err() {
                return;
            }
        }
    }
}

/// `duration * factor`, or `duration` if that is not a valid duration.
fn scale(duration: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(duration.as_secs_f64() * factor).unwrap_or(duration)
}

/// A tiny xorshift64 generator for jitter: nothing here needs to be unpredictable, only
/// different between targets and runs.
#[derive(Debug, Clone)]
struct Xorshift(u64);

impl Xorshift {
    /// Seeded from the clock, the target and a process-wide counter.
    fn seeded(target: &Target) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut hasher = DefaultHasher::new();
        (&target.service, target.address, target.port).hash(&mut hasher);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self::from_seed(nanos ^ hasher.finish().rotate_left(29) ^ count)
    }

    fn from_seed(seed: u64) -> Self {
        // splitmix64 spreads similar seeds apart; xorshift must not start at zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }
}

/// Runs one check of `target` with `spec.timeout` as the overall deadline; the error text
/// says why it failed. A target of kind `none` always passes.
pub async fn check_once(target: &Target) -> Result<(), String> {
    let timeout = target.spec.timeout;
    let check = async {
        match target.spec.kind {
            HealthKind::None => Ok(()),
            HealthKind::Tcp => check_tcp(target).await,
            HealthKind::Http => check_http(target).await,
            HealthKind::Udp => check_udp(target).await,
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

fn socket_addr(target: &Target) -> SocketAddr {
    SocketAddr::new(target.address, target.port)
}

/// Connects; the stream is set to reset on drop rather than linger in `TIME_WAIT`.
async fn connect(target: &Target) -> Result<TcpStream, String> {
    let addr = socket_addr(target);
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect to {addr}: {err}"))?;
    // Failing to set it only costs a TIME_WAIT socket; the check itself passed.
    let _ = stream.set_zero_linger();
    Ok(stream)
}

async fn check_tcp(target: &Target) -> Result<(), String> {
    connect(target).await.map(drop)
}

async fn check_http(target: &Target) -> Result<(), String> {
    let mut stream = connect(target).await?;
    stream
        .write_all(http_request(target).as_bytes())
        .await
        .map_err(|err| format!("send request: {err}"))?;

    let mut buf = [0_u8; HTTP_READ_LIMIT];
    let mut len = 0;
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        let read = stream
            .read(&mut buf[len..])
            .await
            .map_err(|err| format!("read response: {err}"))?;
        if read == 0 {
            break;
        }
        len += read;
    }
    if len == 0 {
        return Err("connection closed without a response".to_owned());
    }
    let status = parse_status_line(&buf[..len])?;
    if status == target.spec.expect_status {
        Ok(())
    } else {
        Err(format!(
            "HTTP status {status}, expected {}",
            target.spec.expect_status
        ))
    }
}

/// The request an HTTP check sends.
fn http_request(target: &Target) -> String {
    let host = match target.address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: weir-health\r\n\r\n",
        target.spec.path
    )
}

/// The status code of an `HTTP/1.x NNN reason` line at the start of `response`.
fn parse_status_line(response: &[u8]) -> Result<u16, String> {
    let end = response
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(response.len());
    let line = response[..end]
        .strip_suffix(b"\r")
        .unwrap_or(&response[..end]);
    let malformed = || {
        let shown: String = String::from_utf8_lossy(line).chars().take(64).collect();
        format!("malformed status line {shown:?}")
    };
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(malformed)?;
    match rest {
        [minor, b' ', a, b, c, tail @ ..]
            if minor.is_ascii_digit()
                && [a, b, c].iter().all(|d| d.is_ascii_digit())
                && (tail.is_empty() || tail[0] == b' ') =>
        {
            Ok([a, b, c]
                .iter()
                .fold(0_u16, |n, &&d| n * 10 + u16::from(d - b'0')))
        }
        _ => Err(malformed()),
    }
}

async fn check_udp(target: &Target) -> Result<(), String> {
    let addr = socket_addr(target);
    let local = match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|err| format!("bind {local}: {err}"))?;
    // Connected, so that an ICMP port unreachable surfaces as an error on recv.
    socket
        .connect(addr)
        .await
        .map_err(|err| format!("connect to {addr}: {err}"))?;
    socket
        .send(target.spec.payload.as_bytes())
        .await
        .map_err(|err| format!("send to {addr}: {err}"))?;
    let mut buf = [0_u8; UDP_READ_LIMIT];
    socket
        .recv(&mut buf)
        .await
        .map(drop)
        .map_err(|err| format!("receive from {addr}: {err}"))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, UdpSocket},
        sync::mpsc,
        time::timeout,
    };

    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn spec(kind: HealthKind, interval_ms: u64, timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            kind,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            rise: 2,
            fall: 2,
            ..HealthCheck::default()
        }
    }

    fn target(port: u16, spec: HealthCheck) -> Target {
        Target {
            service: "web".to_owned(),
            address: LOCALHOST,
            port,
            spec,
        }
    }

    /// A port on loopback where nothing listens (bound, then released).
    async fn closed_tcp_port() -> u16 {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap().port()
    }

    async fn closed_udp_port() -> u16 {
        let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
        socket.local_addr().unwrap().port()
    }

    /// An HTTP server answering each connection with `status` after reading the request;
    /// the requests it saw come back on the channel.
    async fn http_server(status: &'static str) -> (u16, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0_u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        (port, rx)
    }

    // ---- RiseFall ----

    #[test]
    fn new_backend_is_down_until_its_first_success() {
        let mut state = RiseFall::new_unchecked();
        assert!(!state.is_up());
        assert_eq!(state.record(true, 5, 3), Some(true));
        assert!(state.is_up());
    }

    #[test]
    fn new_backend_comes_up_on_first_success_even_after_failures() {
        let mut state = RiseFall::new_unchecked();
        for _ in 0..10 {
            assert_eq!(state.record(false, 3, 3), None);
            assert!(!state.is_up());
        }
        assert_eq!(state.record(true, 3, 3), Some(true));
        assert!(state.is_up());
    }

    #[test]
    fn after_first_success_rise_and_fall_apply() {
        let mut state = RiseFall::new_unchecked();
        assert_eq!(state.record(true, 3, 2), Some(true));
        assert_eq!(state.record(false, 3, 2), None);
        assert_eq!(state.record(false, 3, 2), Some(false));
        // Down again: the new-backend shortcut no longer applies.
        assert_eq!(state.record(true, 3, 2), None);
        assert_eq!(state.record(true, 3, 2), None);
        assert_eq!(state.record(true, 3, 2), Some(true));
    }

    #[test]
    fn goes_down_after_exactly_fall_failures() {
        for fall in 1..=6 {
            let mut state = RiseFall::with_state(true);
            for _ in 1..fall {
                assert_eq!(state.record(false, 2, fall), None, "fall {fall}");
                assert!(state.is_up());
            }
            assert_eq!(state.record(false, 2, fall), Some(false), "fall {fall}");
            assert!(!state.is_up());
            // Further failures change nothing.
            assert_eq!(state.record(false, 2, fall), None);
        }
    }

    #[test]
    fn goes_up_after_exactly_rise_successes() {
        for rise in 1..=6 {
            let mut state = RiseFall::with_state(false);
            for _ in 1..rise {
                assert_eq!(state.record(true, rise, 2), None, "rise {rise}");
                assert!(!state.is_up());
            }
            assert_eq!(state.record(true, rise, 2), Some(true), "rise {rise}");
            assert!(state.is_up());
            assert_eq!(state.record(true, rise, 2), None);
        }
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut state = RiseFall::with_state(true);
        for _ in 0..5 {
            assert_eq!(state.record(false, 2, 3), None);
            assert_eq!(state.record(false, 2, 3), None);
            assert_eq!(state.record(true, 2, 3), None);
        }
        assert!(state.is_up());
        assert_eq!(state.record(false, 2, 3), None);
        assert_eq!(state.record(false, 2, 3), None);
        assert_eq!(state.record(false, 2, 3), Some(false));
    }

    #[test]
    fn a_failure_resets_the_success_streak() {
        let mut state = RiseFall::with_state(false);
        for _ in 0..5 {
            assert_eq!(state.record(true, 3, 2), None);
            assert_eq!(state.record(true, 3, 2), None);
            assert_eq!(state.record(false, 3, 2), None);
        }
        assert!(!state.is_up());
        assert_eq!(state.record(true, 3, 2), None);
        assert_eq!(state.record(true, 3, 2), None);
        assert_eq!(state.record(true, 3, 2), Some(true));
    }

    #[test]
    fn known_state_starts_there_with_counters_at_zero() {
        let up = RiseFall::with_state(true);
        assert!(up.is_up());
        let down = RiseFall::with_state(false);
        assert!(!down.is_up());
        // Known-down needs the full rise, not the new-backend shortcut.
        let mut down = down;
        assert_eq!(down.record(true, 2, 2), None);
        assert_eq!(down.record(true, 2, 2), Some(true));
        // Known-up stays up through successes and needs the full fall.
        let mut up = up;
        assert_eq!(up.record(true, 2, 2), None);
        assert_eq!(up.record(false, 2, 2), None);
        assert_eq!(up.record(false, 2, 2), Some(false));
    }

    #[test]
    fn zero_rise_or_fall_counts_as_one() {
        let mut state = RiseFall::with_state(true);
        assert_eq!(state.record(false, 0, 0), Some(false));
        assert_eq!(state.record(true, 0, 0), Some(true));
    }

    // ---- helpers ----

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Unavailable\r\nX: y"),
            Ok(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        for bad in [
            &b"HTTP/2 200 OK\r\n"[..],
            b"HTTP/1.1 20 OK\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 abc OK\r\n",
            b"SSH-2.0-OpenSSH\r\n",
            b"",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn http_request_brackets_ipv6_hosts() {
        let mut t = target(80, spec(HealthKind::Http, 1000, 500));
        t.spec.path = "/healthz".to_owned();
        assert_eq!(
            http_request(&t),
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nUser-Agent: weir-health\r\n\r\n"
        );
        t.address = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(http_request(&t).contains("\r\nHost: [::1]\r\n"));
    }

    #[test]
    fn jitter_stays_in_range_and_differs_between_seeds() {
        let mut rng = Xorshift::from_seed(0);
        for _ in 0..10_000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
        let a = Xorshift::from_seed(1).next_u64();
        let b = Xorshift::from_seed(2).next_u64();
        assert_ne!(a, b);
        let t = target(80, spec(HealthKind::Tcp, 1000, 500));
        assert_ne!(Xorshift::seeded(&t).0, Xorshift::seeded(&t).0);
        let second = Duration::from_secs(1);
        assert_eq!(scale(second, 0.9), Duration::from_millis(900));
        assert_eq!(scale(second, f64::NAN), second);
    }

    // ---- check_once against local servers ----

    #[tokio::test]
    async fn tcp_connect_succeeds() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = target(port, spec(HealthKind::Tcp, 1000, 500));
        assert_eq!(check_once(&t).await, Ok(()));
    }

    #[tokio::test]
    async fn tcp_connect_refused_fails() {
        let t = target(closed_tcp_port().await, spec(HealthKind::Tcp, 1000, 500));
        let err = check_once(&t).await.unwrap_err();
        assert!(err.contains("connect to 127.0.0.1:"), "{err}");
    }

    #[tokio::test]
    async fn http_200_passes_and_sends_the_request() {
        let (port, mut requests) = http_server("200 OK").await;
        let mut t = target(port, spec(HealthKind::Http, 1000, 500));
        t.spec.path = "/healthz".to_owned();
        assert_eq!(check_once(&t).await, Ok(()));
        let request = timeout(Duration::from_secs(1), requests.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            request,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nUser-Agent: weir-health\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn http_503_fails_when_expecting_200() {
        let (port, _requests) = http_server("503 Service Unavailable").await;
        let t = target(port, spec(HealthKind::Http, 1000, 500));
        assert_eq!(
            check_once(&t).await,
            Err("HTTP status 503, expected 200".to_owned())
        );
    }

    #[tokio::test]
    async fn http_expect_status_204_passes() {
        let (port, _requests) = http_server("204 No Content").await;
        let mut t = target(port, spec(HealthKind::Http, 1000, 500));
        t.spec.expect_status = 204;
        assert_eq!(check_once(&t).await, Ok(()));
    }

    #[tokio::test]
    async fn http_server_that_never_answers_times_out() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accept and hold every connection without a word.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let t = target(port, spec(HealthKind::Http, 1000, 200));
        let started = std::time::Instant::now();
        let result = timeout(Duration::from_secs(2), check_once(&t))
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(result, Err("timed out after 200ms".to_owned()));
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(700), "{elapsed:?}");
        server.abort();
    }

    #[tokio::test]
    async fn http_connection_closed_without_response_fails() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0_u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.shutdown().await;
            }
        });
        let t = target(port, spec(HealthKind::Http, 1000, 500));
        let err = check_once(&t).await.unwrap_err();
        assert!(
            err.contains("closed without a response") || err.contains("read response"),
            "{err}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_echo_passes() {
        let server = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let mut buf = [0_u8; 1500];
            let (n, peer) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(&buf[..n], peer).await.unwrap();
            buf[..n].to_vec()
        });
        let t = target(port, spec(HealthKind::Udp, 1000, 500));
        assert_eq!(check_once(&t).await, Ok(()));
        let payload = timeout(Duration::from_secs(1), echo)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(payload, b"weir-health-check");
    }

    #[tokio::test]
    async fn udp_to_a_closed_port_fails() {
        let t = target(closed_udp_port().await, spec(HealthKind::Udp, 1000, 500));
        let err = check_once(&t).await.unwrap_err();
        // Loopback answers with ICMP port unreachable right away: a refusal, not a timeout.
        assert!(err.contains("receive from 127.0.0.1:"), "{err}");
    }

    #[tokio::test]
    async fn kind_none_always_passes() {
        let t = target(closed_tcp_port().await, spec(HealthKind::None, 1000, 500));
        assert_eq!(check_once(&t).await, Ok(()));
    }

    // ---- HealthChecker end to end ----

    /// The next transition on `rx`, skipping `Checked` events, within `limit`.
    async fn next_transition(
        rx: &mut mpsc::Receiver<HealthEvent>,
        limit: Duration,
    ) -> Option<(IpAddr, bool)> {
        timeout(limit, async {
            while let Some(event) = rx.recv().await {
                if let HealthEvent::Transition { address, up, .. } = event {
                    return Some((address, up));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    #[tokio::test]
    async fn checker_reports_up_then_down_then_stops() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = mpsc::channel(64);
        let mut checker = HealthChecker::new(tx);
        assert!(checker.is_empty());
        let t = target(port, spec(HealthKind::Tcp, 100, 100));
        checker.set_targets(vec![(t.clone(), None)]);
        assert_eq!(checker.len(), 1);

        // New backend: up on its first success, within the first (jittered) interval.
        let started = std::time::Instant::now();
        let up = next_transition(&mut rx, Duration::from_millis(500)).await;
        assert_eq!(up, Some((LOCALHOST, true)));
        assert!(started.elapsed() < Duration::from_millis(300));

        // The same target again keeps its task (and its state).
        let id = checker.tasks.values().next().unwrap().handle.id();
        checker.set_targets(vec![(t.clone(), Some(false))]);
        assert_eq!(checker.len(), 1);
        assert_eq!(checker.tasks.values().next().unwrap().handle.id(), id);

        // Gone: down after fall (2) failures, ~2 × 110 ms.
        drop(listener);
        let started = std::time::Instant::now();
        let down = next_transition(&mut rx, Duration::from_millis(800)).await;
        assert_eq!(down, Some((LOCALHOST, false)));
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(2 * 110 + 100 + 150),
            "{elapsed:?}"
        );

        // No targets: the task ends (dropping its sender) and nothing more arrives.
        checker.set_targets(Vec::new());
        assert!(checker.is_empty());
        timeout(Duration::from_secs(1), async {
            while rx.sender_strong_count() > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        while rx.try_recv().is_ok() {}
        assert!(
            timeout(Duration::from_millis(250), rx.recv())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn checker_known_up_needs_full_fall_and_restarts_on_spec_change() {
        let port = closed_tcp_port().await;
        let (tx, mut rx) = mpsc::channel(64);
        let mut checker = HealthChecker::new(tx);
        let t = target(port, spec(HealthKind::Tcp, 100, 100));
        checker.set_targets(vec![(t.clone(), Some(true))]);

        // Two failed checks before the transition, not one.
        let mut failures = 0;
        let down = timeout(Duration::from_millis(800), async {
            while let Some(event) = rx.recv().await {
                match event {
                    HealthEvent::Checked { ok, error, .. } => {
                        assert!(!ok);
                        assert!(error.is_some());
                        failures += 1;
                    }
                    HealthEvent::Transition { up, .. } => return up,
                }
            }
            panic!("channel closed");
        })
        .await
        .unwrap();
        assert!(!down);
        assert_eq!(failures, 2);

        // A changed spec means a new task.
        let id = checker.tasks.values().next().unwrap().handle.id();
        let mut changed = t.clone();
        changed.spec.fall = 3;
        checker.set_targets(vec![(changed, Some(false))]);
        assert_eq!(checker.len(), 1);
        assert_ne!(checker.tasks.values().next().unwrap().handle.id(), id);

        // Kind none: no task at all.
        let mut none = t;
        none.spec.kind = HealthKind::None;
        checker.set_targets(vec![(none, None)]);
        assert!(checker.is_empty());
    }

    #[tokio::test]
    async fn dropping_the_checker_stops_every_task() {
        let port = closed_tcp_port().await;
        let (tx, mut rx) = mpsc::channel(1024);
        let mut checker = HealthChecker::new(tx);
        let targets = (0..50_u8)
            .map(|i| {
                let mut t = target(port, spec(HealthKind::Tcp, 100, 100));
                t.service = format!("svc-{i}");
                (t, None)
            })
            .collect();
        checker.set_targets(targets);
        assert_eq!(checker.len(), 50);
        drop(checker);
        // Every sender gone: recv ends once the queue is drained.
        timeout(Duration::from_secs(1), async {
            while rx.recv().await.is_some() {}
        })
        .await
        .unwrap();
    }
}
