//! The agent's side of the management API: the Unix socket (created only where nothing but
//! a stale socket of ours stands, removed only while it is still ours) and the per-connection
//! framing. Requests go to the owner task as [`ApiCall`]s; this module holds no agent state.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{ErrorCode, MAX_REQUEST_BYTES, Request, Response};
use crate::audit::Who;
use crate::sys::{self, SocketPath};

/// A request, who sent it (for the audit log) and where its answer goes.
#[derive(Debug)]
pub struct ApiCall {
    pub request: Request,
    pub who: Who,
    pub reply: oneshot::Sender<Response>,
}

/// Hands `request` to the owner task and waits for its answer.
pub async fn call(tx: &mpsc::Sender<ApiCall>, request: Request, who: Who) -> Response {
    let (reply, rx) = oneshot::channel();
    if tx
        .send(ApiCall {
            request,
            who,
            reply,
        })
        .await
        .is_err()
    {
        Response::error(ErrorCode::Internal, "the agent is shutting down")
    } else {
        rx.await.unwrap_or_else(|_| {
            Response::error(ErrorCode::Internal, "the agent dropped the request")
        })
    }
}

/// The bound API socket. The agent never deletes or replaces a file it did not create:
/// binding refuses anything but a free path or a stale socket, and removal checks that the
/// path is still the socket this agent bound.
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    identity: Option<(u64, u64)>,
}

impl ApiSocket {
    /// Binds `path` (mode 0600), creating its directory if needed.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match sys::socket_path_state(path)
            .with_context(|| format!("looking at the API socket path {}", path.display()))?
        {
            SocketPath::Free => {}
            SocketPath::Stale => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
                tracing::info!(path = %path.display(), "removed a stale API socket");
            }
            SocketPath::Live => anyhow::bail!(
                "another agent is answering on {}; stop it first (two agents would fight over the datapath)",
                path.display()
            ),
            SocketPath::NotASocket => anyhow::bail!(
                "[agent] api_socket: {} exists and is not a socket; the agent will not replace it \
                 (choose another path, e.g. /run/weir/weir.sock)",
                path.display()
            ),
        }
        // Created with mode 0600 from the start (umask), not chmod-ed after: no window in
        // which another local user could connect.
        let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(path);
        nix::sys::stat::umask(previous);
        let listener =
            bound.with_context(|| format!("binding the API socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            identity: sys::file_identity(path),
            listener,
        })
    }

    /// The listener for tokio (needs a runtime).
    pub fn listener(&self) -> std::io::Result<UnixListener> {
        let listener = self.listener.try_clone()?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    }

    /// Removes the socket file if it is still the one this agent bound.
    pub fn remove_if_ours(&self) {
        if self.identity.is_some() && sys::file_identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Accepts connections until aborted; each gets its own task.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<ApiCall>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Err(err) = answer(stream, tx).await {
                        tracing::debug!(error = %err, "API connection failed");
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request (up to a newline or EOF, at most `MAX_REQUEST_BYTES`, within 5 s),
/// gets the owner's answer, writes it.
async fn answer(mut stream: UnixStream, tx: mpsc::Sender<ApiCall>) -> std::io::Result<()> {
    // SO_PEERCRED: the peer's uid and pid at connect time, as the kernel saw them.
    let cred = stream.peer_cred()?;
    let who = Who::Unix {
        uid: cred.uid(),
        pid: cred.pid(),
    };
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(true);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_REQUEST_BYTES {
                return Ok(false);
            }
            if buf.contains(&b'\n') {
                return Ok(true);
            }
        }
    })
    .await;
    let response = match read {
        Err(_) => Response::error(ErrorCode::BadRequest, "no complete request within 5 s"),
        Ok(Err(err)) => return Err(err),
        Ok(Ok(false)) => Response::error(
            ErrorCode::BadRequest,
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        ),
        Ok(Ok(true)) => {
            let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
            match serde_json::from_slice::<Request>(line) {
                Err(err) => {
                    Response::error(ErrorCode::BadRequest, format!("invalid request: {err}"))
                }
                Ok(request) => call(&tx, request, who).await,
            }
        }
    };
    let mut text = serde_json::to_vec(&response).unwrap_or_default();
    text.push(b'\n');
    stream.write_all(&text).await?;
    stream.shutdown().await
}
