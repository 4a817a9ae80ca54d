//! The CLI's side of the management API: one request over the agent's Unix socket, or over
//! HTTPS to its remote listener with a bearer token ([`request_remote`]), one response,
//! with errors that say what to do.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

use super::{Request, Response, http};

/// Where the CLI finds the trusted CAs without `--ca-file` (Debian's bundle).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A remote agent: its `https://HOST[:PORT]` URL, the bearer token, the CAs to trust.
#[derive(Debug, Clone)]
pub struct RemoteTarget {
    pub url: String,
    pub token: String,
    pub ca_file: PathBuf,
}

/// The default port of the remote API.
pub const DEFAULT_REMOTE_PORT: u16 = 9443;

/// Splits `https://HOST[:PORT][/]` into the host (without brackets) and the port. Nothing
/// but https is accepted: the API has no plaintext listener.
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "{url:?}: the remote API is HTTPS only; give an https:// URL"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!("{url:?}: give only https://HOST[:PORT]"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let port = match port {
        None => DEFAULT_REMOTE_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| format!("{url:?}: invalid port {p:?}"))?,
    };
    Ok((host.to_owned(), port))
}

/// A TLS 1.3 client config that trusts the certificates of the PEM file `ca_file`.
pub fn tls_client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("reading the CA file {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("the CA file {}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA file {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "the CA file {} holds no certificate",
            ca_file.display()
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends one request to a remote agent over HTTPS and reads its response (an HTTP error
/// status comes with the API's JSON error, which is returned as the response).
pub fn request_remote(target: &RemoteTarget, req: &Request) -> Result<Response, ClientError> {
    let (host, port) = parse_url(&target.url).map_err(ClientError::Remote)?;
    let config = tls_client_config(&target.ca_file).map_err(ClientError::Remote)?;
    let name = ServerName::try_from(host.clone())
        .map_err(|e| ClientError::Remote(format!("{host:?}: {e}")))?;
    let path = format!("{host}:{port}");
    let io_err = |source| ClientError::Io {
        path: target.url.clone(),
        source,
    };
    let tcp = TcpStream::connect((host.as_str(), port)).map_err(|source| {
        if source.kind() == io::ErrorKind::ConnectionRefused {
            ClientError::RemoteUnreachable(path.clone())
        } else {
            io_err(source)
        }
    })?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    tcp.set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| ClientError::Remote(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = serde_json::to_vec(req).map_err(|e| ClientError::BadResponse(e.to_string()))?;
    let mut message = format!(
        "POST {} HTTP/1.1\r\nHost: {path}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        super::remote::REQUEST_PATH,
        target.token,
        body.len()
    )
    .into_bytes();
    message.extend_from_slice(&body);
    tls.write_all(&message).map_err(io_err)?;
    tls.flush().map_err(io_err)?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        // The server closes without close_notify after its answer at worst.
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(err) => return Err(io_err(err)),
    }
    let (_status, body) = http::parse_response(&answer).ok_or_else(|| {
        ClientError::BadResponse(format!(
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ))
    })?;
    let text = String::from_utf8_lossy(body);
    Response::from_json(text.trim_end(), req)
        .map_err(|e| ClientError::BadResponse(format!("{e}: {text:?}")))
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the agent is not running (no socket at {0}); start it with `weir agent --config FILE`"
    )]
    NotRunning(String),
    #[error("permission denied on {0}: the API socket is root-only; run as root")]
    PermissionDenied(String),
    #[error("talking to the agent on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the agent sent an answer that is not valid: {0}")]
    BadResponse(String),
    #[error("remote API: {0}")]
    Remote(String),
    #[error("nothing answers at {0}: is the agent running with [api] listen set to it?")]
    RemoteUnreachable(String),
}

/// Sends one request to the agent at `socket` and reads its response.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(path.clone())
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.clone()),
        _ => ClientError::Io {
            path: path.clone(),
            source,
        },
    })?;
    let io_err = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    Response::from_json(&answer, req)
        .map_err(|e| ClientError::BadResponse(format!("{e}: {answer:?}")))
}
