//! The `/metrics` HTTP endpoint: minimal HTTP/1.1, one request per connection, built so
//! that slow or idle clients cannot blind monitoring (a short head timeout, a connection cap
//! that evicts the oldest client still sending its head rather than refusing new ones).

use std::{
    collections::BTreeMap,
    io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

/// The registry's metrics in the text exposition format.
#[must_use]
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(err) = TextEncoder::new().encode_utf8(&registry.gather(), &mut text) {
        // Only a malformed metric family fails, which the code above does not build.
        tracing::error!(error = %err, "encoding metrics");
    }
    text
}

/// Largest request head the endpoint reads.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request head. A scraper sends it at once; only a
/// slow or idle client needs more, and it would hold a connection slot meanwhile.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to accept the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a scrape waits for the agent's snapshot before serving the last one.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections handled at once. When all are taken, a new client evicts the one that has
/// been sending its request head the longest: idle connections (slowloris) cannot lock
/// scrapers out, however many there are.
const MAX_CONNECTIONS: usize = 256;

/// Serves `GET /metrics` (text format, Content-Type `text/plain; version=0.0.4`) and 404 for
/// other paths on `listener`. Each scrape gathers `registry` on a blocking thread: the
/// datapath collector waits there for the agent's snapshot, never on the runtime.
///
/// Minimal HTTP/1.1: read the request head (at most 8 KiB, within 2 s), answer, close.
/// `HEAD /metrics` is answered too; other methods get 405.
///
/// Runs until the listener fails: transient accept errors (a connection aborted, out of
/// file descriptors) are logged and ridden out, others are returned.
pub async fn serve(listener: TcpListener, registry: Registry) -> io::Result<()> {
    let shared = Arc::new(Shared { registry });
    let slots = Arc::new(Slots::default());
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => match accept_error(&err) {
                AcceptError::Retry => continue,
                AcceptError::Backoff => {
                    tracing::warn!(error = %err, "metrics endpoint: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                AcceptError::Fatal => return Err(err),
            },
        };
        if slots.active.load(Ordering::Relaxed) >= MAX_CONNECTIONS && !slots.evict_oldest() {
            // Every slot is busy answering (none is waiting for a head): drop this one.
            tracing::debug!(%peer, "metrics endpoint: at capacity; connection dropped");
            continue;
        }
        next_id += 1;
        let id = next_id;
        let guard = SlotGuard::new(Arc::clone(&slots), id);
        let shared = Arc::clone(&shared);
        // Registered under the lock, so the task cannot finish its head (and unregister)
        // before it is registered.
        let mut pending = slots.lock();
        let task = tokio::spawn(async move {
            let guard = guard;
            if let Err(err) = handle(stream, &shared, &guard).await {
                tracing::debug!(%peer, error = %err, "metrics endpoint: connection failed");
            }
        });
        pending.insert(id, task.abort_handle());
    }
}

/// The connections in flight, and those still sending their request head, oldest first.
#[derive(Default)]
struct Slots {
    active: AtomicUsize,
    pending: Mutex<BTreeMap<u64, AbortHandle>>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, AbortHandle>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Aborts the connection that has waited longest for its head; false if none waits.
    fn evict_oldest(&self) -> bool {
        let oldest = self.lock().pop_first();
        match oldest {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

/// One connection's slot: counted while alive, even if its task is aborted (dropping the
/// aborted future drops the guard).
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl SlotGuard {
    fn new(slots: Arc<Slots>, id: u64) -> Self {
        slots.active.fetch_add(1, Ordering::Relaxed);
        Self { slots, id }
    }

    /// The head arrived: this connection can no longer be evicted.
    fn head_received(&self) {
        self.slots.lock().remove(&self.id);
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().remove(&self.id);
        self.slots.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shared {
    registry: Registry,
}

enum AcceptError {
    /// That connection failed; the listener is fine.
    Retry,
    /// Out of a resource; wait a little.
    Backoff,
    Fatal,
}

fn accept_error(err: &io::Error) -> AcceptError {
    match err.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock
        | io::ErrorKind::TimedOut => AcceptError::Retry,
        _ => match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                AcceptError::Backoff
            }
            Some(libc::EPROTO | libc::EPERM | libc::ENETDOWN | libc::EHOSTUNREACH) => {
                AcceptError::Retry
            }
            _ => AcceptError::Fatal,
        },
    }
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before finishing its head.
    Truncated,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 1024];
    loop {
        if head.len() >= MAX_HEAD_BYTES {
            return Ok(Head::TooLarge);
        }
        let room = chunk.len().min(MAX_HEAD_BYTES - head.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(Head::Truncated);
        }
        // Re-scan the last 3 bytes before the new ones: the terminator may straddle reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        let tail = &head[from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head::Complete(head));
        }
    }
}

/// A complete response: status line, headers, and (unless `head_only`) the body.
fn response(
    status: &str,
    content_type: &str,
    extra: &str,
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn plain(status: &str, extra: &str, head_only: bool) -> Vec<u8> {
    let body = format!("{status}\n");
    response(
        status,
        "text/plain; charset=utf-8",
        extra,
        body.as_bytes(),
        head_only,
    )
}

async fn handle(mut stream: TcpStream, shared: &Shared, slot: &SlotGuard) -> io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_elapsed) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received in time",
            ));
        }
    };
    slot.head_received();
    let answer = match head {
        Head::Truncated => return Ok(()),
        Head::TooLarge => plain("431 Request Header Fields Too Large", "", false),
        Head::Complete(head) => route(&head, shared).await,
    };
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(written) => written,
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "response not accepted in time",
        )),
    }
}

async fn route(head: &[u8], shared: &Shared) -> Vec<u8> {
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|line| String::from_utf8_lossy(line).trim_end().to_owned())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return plain("400 Bad Request", "", false);
    };
    if !version.starts_with("HTTP/1.") {
        return plain("505 HTTP Version Not Supported", "", false);
    }
    let head_only = method == "HEAD";
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != "/metrics" {
        return plain("404 Not Found", "", head_only);
    }
    if method != "GET" && !head_only {
        return plain("405 Method Not Allowed", "Allow: GET, HEAD\r\n", false);
    }
    let registry = shared.registry.clone();
    let text = match tokio::task::spawn_blocking(move || encode(&registry)).await {
        Ok(text) => text,
        Err(err) => {
            tracing::error!(error = %err, "metrics scrape failed");
            return plain("500 Internal Server Error", "", head_only);
        }
    };
    response(
        "200 OK",
        TextEncoder::new().format_type(),
        "",
        text.as_bytes(),
        head_only,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn scrape(address: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    /// Reported: 16 slowloris connections made scrapes wait up to 9.5 s, and with 100 half
    /// of them failed. Idle clients, however many, now cannot keep a scraper out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_cannot_blind_monitoring() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let registry = Registry::new();
        let gauge = prometheus::IntGauge::new("weir_test_gauge", "A test gauge.").unwrap();
        gauge.set(7);
        registry.register(Box::new(gauge)).unwrap();
        let server = tokio::spawn(serve(listener, registry));

        // Twice the connection cap of clients that connect and send half a request head.
        let mut idle = Vec::new();
        for _ in 0..2 * MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(address).await.expect("connect");
            stream.write_all(b"GET /metr").await.expect("write");
            idle.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for round in 0..10 {
            let started = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(1), scrape(address))
                .await
                .unwrap_or_else(|_| panic!("scrape {round} got no answer within 1 s"));
            assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
            assert!(answer.contains("weir_test_gauge 7"), "{answer}");
            println!("scrape {round}: {:?}", started.elapsed());
        }
        drop(idle);
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_after_the_head_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, Registry::new()));
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(HEAD_TIMEOUT * 3, stream.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "the connection stayed open past the head timeout"
        );
        assert!(started.elapsed() >= HEAD_TIMEOUT.mul_f64(0.9));
        server.abort();
    }
}
