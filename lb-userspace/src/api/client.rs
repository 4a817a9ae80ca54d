//! The CLI's side of the management API: one request over the agent's Unix socket, one
//! response, with errors that say what to do.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::{Request, Response};

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
