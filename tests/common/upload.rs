//! Real uploads through the balancer (e2e_mtu, e2e_nat): servers on every backend that store
//! each upload in a file of that backend's directory, a client that sends one under a
//! deadline, and the check that each upload was stored whole on exactly one backend (its
//! sha256 compared with the data sent).
//!
//! The protocol is the smallest that shows corruption: a connection sends a name line, then
//! the data; at EOF the server answers `stored N`.

use std::{
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{
    Topology, accept_until_stopped, enter_netns, run_with_input, spawn_in_netns, tcp_listener,
};

/// The upload servers give up on a connection silent this long.
pub const SERVER_IDLE: Duration = Duration::from_secs(3);

/// Upload servers on every backend of a topology, on each of some ports (every address);
/// stop (and are joined) on drop.
pub struct UploadServers {
    /// One directory per backend.
    pub dirs: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl UploadServers {
    pub fn start(topo: &Topology, ports: &[u16]) -> Result<Self> {
        let mut me = Self {
            dirs: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for (i, ns) in topo.backends.iter().enumerate() {
            let dir = topo.workdir.join(format!("uploads-b{}", i + 1));
            fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            me.dirs.push(dir.clone());
            for &port in ports {
                let (tx, rx) = mpsc::channel::<Result<(), String>>();
                let (stop, dir) = (me.stop.clone(), dir.clone());
                me.threads.push(spawn_in_netns(ns, "upload", move || {
                    let listener = match tcp_listener(port) {
                        Ok(l) => {
                            let _ = tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = tx.send(Err(format!("{e:#}")));
                            return;
                        }
                    };
                    accept_until_stopped(&listener, &stop, "upload", |stream| {
                        let dir = dir.clone();
                        thread::spawn(move || {
                            if let Err(e) = store_upload(&stream, &dir) {
                                eprintln!("upload server in {}: {e:#}", dir.display());
                            }
                        })
                    });
                })?);
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => bail!("upload server in {ns}: {e}"),
                    Err(e) => bail!("upload server in {ns}: not ready ({e})"),
                }
            }
        }
        Ok(me)
    }
}

impl Drop for UploadServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// Serves one upload: the name line, then the data into `dir/NAME` until EOF, then the
/// answer. Gives up after `SERVER_IDLE` of silence.
fn store_upload(stream: &TcpStream, dir: &Path) -> Result<u64> {
    stream.set_read_timeout(Some(SERVER_IDLE))?;
    stream.set_write_timeout(Some(SERVER_IDLE))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.by_ref().take(64).read_line(&mut line)?;
    if line.is_empty() {
        // A connection that sent nothing, such as the SYN-ACK captures': not an upload.
        return Ok(0);
    }
    let name = line.strip_suffix('\n').context("no name line")?;
    ensure!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        "bad upload name {name:?}"
    );
    let path = dir.join(name);
    let mut file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let stored = io::copy(&mut reader, &mut file).with_context(|| format!("receive {name}"))?;
    let mut writer = stream;
    writer.write_all(format!("stored {stored}\n").as_bytes())?;
    Ok(stored)
}

/// From the calling thread's namespace: uploads `data` as `name` to `dst` and waits for the
/// server's answer, all before `deadline`.
pub fn upload_one(dst: SocketAddr, name: &str, data: &[u8], deadline: Instant) -> Result<()> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let stream = TcpStream::connect_timeout(&dst, left().min(Duration::from_secs(3)))
        .with_context(|| format!("connect to {dst}"))?;
    let mut writer = &stream;
    writer.write_all(format!("{name}\n").as_bytes())?;
    // One write at a time, each with what is left of the deadline as its timeout: a write
    // that times out after partial progress returns it, so the deadline bounds the whole
    // upload, not each write.
    let mut sent = 0;
    while sent < data.len() {
        ensure!(
            Instant::now() < deadline,
            "the deadline passed after {sent} of {} bytes",
            data.len()
        );
        stream.set_write_timeout(Some(left()))?;
        match writer.write(&data[sent..data.len().min(sent + (64 << 10))]) {
            Ok(0) => bail!("the connection closed after {sent} of {} bytes", data.len()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "writing stalled after {sent} of {} bytes: no progress until the deadline",
                    data.len()
                )
            }
            Err(e) => return Err(e).context(format!("write after {sent} bytes")),
        }
    }
    stream.shutdown(Shutdown::Write)?;
    stream.set_read_timeout(Some(left()))?;
    let mut answer = String::new();
    (&stream)
        .take(64)
        .read_to_string(&mut answer)
        .context("waiting for the server's answer after sending everything")?;
    ensure!(
        answer == format!("stored {}\n", data.len()),
        "the server answered {answer:?}"
    );
    Ok(())
}

/// The sha256 of `data`, in hex (coreutils' `sha256sum`).
pub fn sha256(data: &[u8]) -> String {
    let (code, out, err) = run_with_input(&["sha256sum"], data).expect("sha256sum");
    assert_eq!(code, 0, "sha256sum: {err}");
    out.split_whitespace().next().expect("a hash").to_owned()
}

/// What a batch of concurrent uploads gave.
#[derive(Debug)]
pub struct Uploaded {
    pub took: Duration,
    /// Problems, one line each: failed uploads, missing or corrupted files.
    pub problems: Vec<String>,
    /// Uploads stored and intact, per backend.
    pub per_backend: Vec<usize>,
}

/// From namespace `ns`: every `data[i]` uploaded as `names[i]` to `dst` at once (one thread
/// each), all within `limit`; then each checked where a backend stored it: exactly one
/// backend has the file, and its sha256 is `hashes[i]`. The files are removed afterwards.
pub fn upload_all(
    ns: &str,
    dst: SocketAddr,
    servers: &UploadServers,
    names: &[String],
    data: &[Vec<u8>],
    hashes: &[String],
    limit: Duration,
) -> Uploaded {
    let start = Instant::now();
    let deadline = start + limit;
    let results: Vec<Result<()>> = thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .zip(data)
            .map(|(name, d)| {
                s.spawn(move || {
                    enter_netns(ns)?;
                    upload_one(dst, name, d, deadline)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("upload thread"))
            .collect()
    });
    let took = start.elapsed();
    let mut problems = Vec::new();
    let mut per_backend = vec![0; servers.dirs.len()];
    for ((name, result), hash) in names.iter().zip(results).zip(hashes) {
        if let Err(e) = result {
            problems.push(format!("{name}: {e:#}"));
            continue;
        }
        let stored: Vec<(usize, PathBuf)> = servers
            .dirs
            .iter()
            .enumerate()
            .map(|(i, d)| (i, d.join(name)))
            .filter(|(_, p)| p.exists())
            .collect();
        let [(backend, path)] = stored.as_slice() else {
            problems.push(format!(
                "{name}: stored on {} backends: {stored:?}",
                stored.len()
            ));
            continue;
        };
        let file = fs::read(path).expect("read the stored upload");
        let got = sha256(&file);
        if got == *hash {
            per_backend[*backend] += 1;
        } else {
            problems.push(format!(
                "{name}: backend {} stored {} bytes with sha256 {got}, sent {hash}",
                backend + 1,
                file.len()
            ));
        }
    }
    for dir in &servers.dirs {
        for name in names {
            let _ = fs::remove_file(dir.join(name));
        }
    }
    Uploaded {
        took,
        problems,
        per_backend,
    }
}
