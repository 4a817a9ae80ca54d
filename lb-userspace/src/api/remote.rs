//! The remote management API: an HTTPS-only listener (`[api] listen`, rustls, TLS 1.3),
//! where every request carries a bearer token checked against the SHA-256 hashes of
//! `[[api.token]]`. There is no plaintext listener and no unauthenticated access.
//!
//! One request per connection: `POST /v1/request` with the same JSON [`Request`] as the Unix
//! socket, answered with the same JSON [`Response`] and an HTTP status that matches it. A
//! missing or unknown token gets 401, a read-only token asking for a change 403; each
//! refusal is recorded in the audit log with the peer (and the token's name for a 403), and
//! each change the owner makes on a token's behalf is recorded there with the token's name.
//! This module holds no agent state: requests go to the owner task as [`ApiCall`]s.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;

use super::{
    ErrorCode, Request, Response,
    http::{self, HttpRequest, Parsed},
    server::{ApiCall, call},
};
use crate::{
    audit::{AuditLog, Outcome, Record, Who},
    config::{ApiToken, RemoteApiConfig, TokenScope},
};

/// The one path requests go to.
pub const REQUEST_PATH: &str = "/v1/request";
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// The TLS handshake and the whole request must arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS config of a server with the certificate chain and key of these PEM files.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("[api] cert: reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "[api] cert: {} is not a PEM certificate chain",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "[api] cert: {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "[api] key: reading a PEM private key from {}",
            key.display()
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .context("TLS 1.3 with the ring provider")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("[api] cert and key do not make a usable server identity")?;
    Ok(Arc::new(config))
}

/// The SHA-256 of a token's text.
#[must_use]
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Equality of two hashes in time that does not depend on where they differ.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The configured token `presented` is, comparing against every one (no early exit).
#[must_use]
pub fn find_token<'a>(tokens: &'a [ApiToken], presented: &str) -> Option<&'a ApiToken> {
    let hash = token_hash(presented);
    let mut found = None;
    for token in tokens {
        if same_hash(&token.sha256, &hash) {
            found = Some(token);
        }
    }
    found
}

/// The bound listener and what it checks requests with.
pub struct RemoteApi {
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    tokens: Arc<Vec<ApiToken>>,
}

impl std::fmt::Debug for RemoteApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteApi")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl RemoteApi {
    /// Loads the certificate and key and binds `[api] listen`; before the datapath is
    /// touched, so a bad file or a taken port stops the start.
    pub fn bind(config: &RemoteApiConfig) -> anyhow::Result<Self> {
        let tls = tls_config(&config.cert, &config.key)?;
        let listener = std::net::TcpListener::bind(config.listen)
            .with_context(|| format!("[api] listen: binding {}", config.listen))?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            tokens: Arc::new(config.tokens.clone()),
        })
    }

    /// The bound address (the port, when `listen` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until aborted (needs a runtime).
    pub async fn serve(self, tx: mpsc::Sender<ApiCall>, audit: AuditLog) -> anyhow::Result<()> {
        self.listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(self.listener)?;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "remote API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::debug!(%peer, "remote API: every connection slot taken; closed");
                continue;
            };
            let (acceptor, tokens, tx, audit) = (
                self.acceptor.clone(),
                Arc::clone(&self.tokens),
                tx.clone(),
                audit.clone(),
            );
            tokio::spawn(async move {
                let served = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let mut tls = acceptor.accept(stream).await?;
                    let (status, body) = match read_request(&mut tls).await? {
                        Err(err) => (
                            err.status(),
                            json(&Response::error(ErrorCode::BadRequest, err.to_string())),
                        ),
                        Ok(request) => answer(request, peer, &tokens, &tx, &audit).await,
                    };
                    tls.write_all(&http::response(status, &body)).await?;
                    tls.shutdown().await
                })
                .await;
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "remote API connection failed")
                    }
                    Err(_) => tracing::debug!(%peer, "remote API connection timed out"),
                }
                drop(slot);
            });
        }
    }
}

fn json(response: &Response) -> Vec<u8> {
    serde_json::to_vec(response).unwrap_or_default()
}

/// Reads until [`http::parse`] has a whole request or refuses the bytes.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Result<HttpRequest, http::HttpError>> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        match http::parse(&buf) {
            Ok(Parsed::Complete(request)) => return Ok(Ok(request)),
            Err(err) => return Ok(Err(err)),
            Ok(Parsed::Incomplete) => {}
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Authenticates, authorizes and answers one request: the HTTP status and JSON body.
async fn answer(
    request: HttpRequest,
    peer: SocketAddr,
    tokens: &[ApiToken],
    tx: &mpsc::Sender<ApiCall>,
    audit: &AuditLog,
) -> (u16, Vec<u8>) {
    // The command, when the body says one, only to name it in a refusal's record: nothing
    // of the request is acted on before the token is checked.
    let named = serde_json::from_slice::<Request>(&request.body).ok();
    let what = named.as_ref().map_or("remote_request", Request::name);
    let refuse = |who: Who, code: ErrorCode, message: String| {
        let mut record = Record::new(who, what, Outcome::Refused).error(message.clone());
        record.target = named.as_ref().and_then(Request::target);
        audit.record(record);
        (code.http_status(), json(&Response::error(code, message)))
    };
    let Some(token) = request
        .bearer()
        .map(|presented| find_token(tokens, presented))
    else {
        return refuse(
            Who::Anonymous { peer },
            ErrorCode::Unauthorized,
            "no bearer token: send `Authorization: Bearer TOKEN` (weir --token-file)".to_owned(),
        );
    };
    let Some(token) = token else {
        return refuse(
            Who::Anonymous { peer },
            ErrorCode::Unauthorized,
            "the bearer token is not one of [[api.token]]".to_owned(),
        );
    };
    let who = Who::Token {
        name: token.name.clone(),
        peer,
    };
    if request.method != "POST" || request.path != REQUEST_PATH {
        return (
            if request.path == REQUEST_PATH {
                405
            } else {
                404
            },
            json(&Response::error(
                ErrorCode::BadRequest,
                format!("the API answers POST {REQUEST_PATH} only"),
            )),
        );
    }
    let request = match serde_json::from_slice::<Request>(&request.body) {
        Ok(request) => request,
        Err(err) => {
            return (
                400,
                json(&Response::error(
                    ErrorCode::BadRequest,
                    format!("invalid request: {err}"),
                )),
            );
        }
    };
    if request.is_change() && token.scope == TokenScope::Read {
        return refuse(
            who,
            ErrorCode::Forbidden,
            format!(
                "token {:?} is read-only; {} changes the running state and needs an admin token",
                token.name,
                request.name()
            ),
        );
    }
    let response = call(tx, request, who).await;
    let status = match &response.error {
        None => 200,
        Some(error) => error.code.http_status(),
    };
    (status, json(&response))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::api::{self, RemoteTarget, Status};

    const CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/api-test.crt");
    const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/api-test.key");

    #[test]
    fn tokens_are_found_by_hash_only() {
        let tokens = vec![
            ApiToken {
                name: "ro".into(),
                scope: TokenScope::Read,
                sha256: token_hash("read-secret"),
            },
            ApiToken {
                name: "ops".into(),
                scope: TokenScope::Admin,
                sha256: token_hash("admin-secret"),
            },
        ];
        assert_eq!(find_token(&tokens, "admin-secret").unwrap().name, "ops");
        assert_eq!(find_token(&tokens, "read-secret").unwrap().name, "ro");
        assert!(find_token(&tokens, "admin-secre").is_none());
        assert!(find_token(&tokens, "").is_none());
        // `printf %s test | sha256sum`
        assert_eq!(
            token_hash("test")[..4],
            [0x9f, 0x86, 0xd0, 0x81],
            "the hash is plain SHA-256 of the text"
        );
    }

    fn status() -> Status {
        Status {
            version: "0".into(),
            pid: 1,
            interface: "eth0".into(),
            interfaces: vec!["eth0".into()],
            xdp_mode: api::XdpMode::Native,
            config_file: "/etc/weir/weir.toml".into(),
            bpffs: "/sys/fs/bpf/weir".into(),
            adopted: false,
            uptime_seconds: 1,
            services: 1,
            backends: 1,
            backends_up: 1,
            last_reload: None,
            inconsistent: None,
            announce: None,
            nat: None,
            conntrack: None,
        }
    }

    /// The listener on 127.0.0.1 with a read and an admin token, a stand-in owner that
    /// answers every call with a status and reports who asked, and an audit log.
    struct Fixture {
        addr: SocketAddr,
        calls: std::sync::mpsc::Receiver<(String, Who)>,
        audit_path: std::path::PathBuf,
        audit: AuditLog,
        // Kept alive for the listener and the stand-in owner.
        _runtime: tokio::runtime::Runtime,
        dir: std::path::PathBuf,
    }

    impl Fixture {
        fn start(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weir-remote-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let audit_path = dir.join("audit.jsonl");
            let audit = AuditLog::start(
                &audit_path,
                crate::audit::Rotation {
                    max_bytes: 1 << 20,
                    keep: 1,
                },
                crate::audit::AuditCounters::unregistered(),
            )
            .unwrap();
            let config = RemoteApiConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                cert: CERT.into(),
                key: KEY.into(),
                tokens: vec![
                    ApiToken {
                        name: "viewer".into(),
                        scope: TokenScope::Read,
                        sha256: token_hash("read-secret"),
                    },
                    ApiToken {
                        name: "ops".into(),
                        scope: TokenScope::Admin,
                        sha256: token_hash("admin-secret"),
                    },
                ],
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let remote = RemoteApi::bind(&config).unwrap();
            let addr = remote.local_addr().unwrap();
            let (tx, mut rx) = mpsc::channel::<ApiCall>(8);
            let (calls_tx, calls) = std::sync::mpsc::channel();
            runtime.spawn(remote.serve(tx, audit.clone()));
            runtime.spawn(async move {
                while let Some(call) = rx.recv().await {
                    let _ = calls_tx.send((call.request.name().to_owned(), call.who));
                    let answer = if call.request == (Request::Reload {}) {
                        Response::ok(api::ReloadReport {
                            services: 1,
                            ring_slots_written: 0,
                            backends_written: 0,
                        })
                    } else {
                        Response::ok(status())
                    };
                    let _ = call.reply.send(answer);
                }
            });
            Self {
                addr,
                calls,
                audit_path,
                audit,
                _runtime: runtime,
                dir,
            }
        }

        fn target(&self, token: &str) -> RemoteTarget {
            RemoteTarget {
                url: format!("https://127.0.0.1:{}", self.addr.port()),
                token: token.to_owned(),
                ca_file: CERT.into(),
            }
        }

        fn audit_lines(&self) -> Vec<Record> {
            self.audit.close(Duration::from_secs(5));
            std::fs::read_to_string(&self.audit_path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .filter(|r: &Record| r.what != crate::audit::FILE_CREATED)
                .collect()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn reload() -> Request {
        Request::Reload {}
    }

    #[test]
    fn tokens_and_scopes_are_enforced_and_refusals_audited() {
        let fixture = Fixture::start("scopes");
        let code = |response: Response| response.error.map(|e| e.code);

        // A wrong token: 401, nothing reaches the owner.
        let wrong = api::request_remote(&fixture.target("guess"), &reload()).unwrap();
        assert_eq!(code(wrong), Some(ErrorCode::Unauthorized));
        // A read-only token asking for a change: 403.
        let read = api::request_remote(&fixture.target("read-secret"), &reload()).unwrap();
        assert_eq!(code(read), Some(ErrorCode::Forbidden));
        // ... but it may read.
        let status =
            api::request_remote(&fixture.target("read-secret"), &Request::Status {}).unwrap();
        assert!(status.ok);
        // The admin token may change.
        let admin = api::request_remote(&fixture.target("admin-secret"), &reload()).unwrap();
        assert!(admin.ok, "{admin:?}");
        let calls: Vec<(String, Who)> = fixture.calls.try_iter().collect();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].0, "status");
        assert!(matches!(&calls[1].1, Who::Token { name, .. } if name == "ops"));

        // No token at all: 401 (the client always sends one; this is what curl would do).
        let body = br#"{"cmd":"reload"}"#;
        let raw = format!(
            "POST {REQUEST_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        );
        let (status, _) = raw_tls(&fixture, raw.as_bytes());
        assert_eq!(status, 401);
        assert_eq!(fixture.calls.try_iter().count(), 0);

        let lines = fixture.audit_lines();
        let refusals: Vec<&Record> = lines
            .iter()
            .filter(|r| r.result == Outcome::Refused)
            .collect();
        assert_eq!(refusals.len(), 3, "{lines:?}");
        assert!(refusals.iter().all(|r| r.what == "reload"));
        assert!(matches!(refusals[0].who, Who::Anonymous { .. }));
        assert!(matches!(&refusals[1].who, Who::Token { name, .. } if name == "viewer"));
        assert!(matches!(refusals[2].who, Who::Anonymous { .. }));
        assert!(
            refusals[2]
                .error
                .as_deref()
                .unwrap()
                .contains("no bearer token")
        );
    }

    /// Sends `raw` over TLS (trusting the test certificate) and returns the status.
    fn raw_tls(fixture: &Fixture, raw: &[u8]) -> (u16, Vec<u8>) {
        let config = api::client::tls_client_config(Path::new(CERT)).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let tcp = std::net::TcpStream::connect(fixture.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        let (status, body) = http::parse_response(&out).expect("an HTTP answer");
        (status, body.to_vec())
    }

    #[test]
    fn plaintext_http_gets_no_answer() {
        let fixture = Fixture::start("plain");
        let mut tcp = std::net::TcpStream::connect(fixture.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(b"POST /v1/request HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret\r\nContent-Length: 16\r\n\r\n{\"cmd\":\"reload\"}")
            .unwrap();
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out);
        assert!(
            http::parse_response(&out).is_none(),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(!out.starts_with(b"HTTP/"));
        assert_eq!(
            fixture.calls.try_iter().count(),
            0,
            "a plaintext request reached the owner"
        );
        // The client refuses plain http:// URLs itself.
        let mut target = fixture.target("admin-secret");
        target.url = format!("http://127.0.0.1:{}", fixture.addr.port());
        assert!(api::request_remote(&target, &reload()).is_err());
    }
}
