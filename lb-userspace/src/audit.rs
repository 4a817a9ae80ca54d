//! The audit log: one JSON line per change to the running agent (API and CLI changes,
//! reloads with a diff summary, health transitions, announcements, teardown, refusals of the
//! remote API), appended to `[agent] audit_log` (mode 0600) and rotated by size.
//!
//! This module owns the record format ([`Record`], [`Who`]), the files (which ones are the
//! agent's, rotation), and the writer thread. Whoever changes state calls
//! [`AuditLog::record`], which never blocks: records go through a bounded channel to the
//! writer thread, and a full channel or a failed write is counted and logged, never waited
//! on, so neither the owner task nor anything the datapath depends on stalls on a slow disk.
//!
//! The agent never deletes, renames or writes into a file it did not create. Every file it
//! creates starts with an `audit_file_created` record: that first line is how it knows its
//! own files again, across restarts. Rotation renames only such files, with
//! `RENAME_NOREPLACE` (nothing is ever renamed over), and deletes only the oldest of them; a
//! foreign file in the way stops the rotation (counted and logged) and the agent keeps
//! appending to its current file.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::mpsc::{self, SyncSender, TrySendError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Records the channel to the writer holds; past that, records are dropped and counted.
pub const CHANNEL_RECORDS: usize = 4096;

/// The `what` of the first record of every file the agent creates.
pub const FILE_CREATED: &str = "audit_file_created";

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Who {
    /// A peer of the Unix API socket, from `SO_PEERCRED`.
    Unix { uid: u32, pid: Option<i32> },
    /// A remote API client whose bearer token matched the configured token `name`.
    Token { name: String, peer: SocketAddr },
    /// A remote API client without a valid token (only ever on a refusal).
    Anonymous { peer: SocketAddr },
    /// The `weir` command itself (`weir teardown`): its own uid and pid.
    Cli { uid: u32, pid: u32 },
    /// The agent on its own: `source` is what made it act (`health_check`, `sighup`,
    /// `start`, `stop`, or an announcer's name).
    Agent { source: String },
}

impl Who {
    #[must_use]
    pub fn agent(source: &str) -> Self {
        Self::Agent {
            source: source.to_owned(),
        }
    }

    /// The calling process, for records the CLI writes itself.
    #[must_use]
    pub fn this_process() -> Self {
        Self::Cli {
            uid: nix::unistd::getuid().as_raw(),
            pid: std::process::id(),
        }
    }
}

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Tried and failed (the state stayed as `before`).
    Error,
    /// Not tried: the caller may not make it (remote API: 401, 403).
    Refused,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    pub who: Who,
    /// What was asked (`backend_weight`, `reload`, `health`, `teardown`, `announce`, ...).
    pub what: String,
    /// What it was about (`web/198.51.100.11`), when about one thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub before: Value,
    #[serde(default)]
    pub after: Value,
    pub result: Outcome,
    /// The error or the reason of a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `reload`: what the new config changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<Value>,
}

impl Record {
    /// A record stamped now, with no before/after yet.
    #[must_use]
    pub fn new(who: Who, what: &str, result: Outcome) -> Self {
        Self {
            time: rfc3339(SystemTime::now()),
            who,
            what: what.to_owned(),
            target: None,
            before: Value::Null,
            after: Value::Null,
            result,
            error: None,
            diff: None,
        }
    }

    #[must_use]
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    #[must_use]
    pub fn change(mut self, before: Value, after: Value) -> Self {
        self.before = before;
        self.after = after;
        self
    }

    #[must_use]
    pub fn error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }

    #[must_use]
    pub fn diff(mut self, diff: Value) -> Self {
        self.diff = Some(diff);
        self
    }

    fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|err| {
            format!(r#"{{"what":"unserializable","error":"{err}"}}"#).into_bytes()
        });
        line.push(b'\n');
        line
    }
}

/// `t` as `2026-12-01T14:55:17.123Z` (civil date from days: Howard Hinnant's algorithm).
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Where the writer counts what it could not write.
#[derive(Debug, Clone)]
pub struct AuditCounters {
    /// Records dropped because the channel was full (or the writer gone).
    pub dropped: IntCounter,
    /// Records whose write failed, and rotations a foreign file or an error stopped.
    pub failed: IntCounter,
}

impl AuditCounters {
    /// Counters registered nowhere (tests, the CLI).
    #[must_use]
    pub fn unregistered() -> Self {
        let counter = |name: &str| {
            IntCounter::new(name, "unregistered").unwrap_or_else(|_| {
                // Only an invalid name fails, and these are constant.
                unreachable!("constant metric names are valid")
            })
        };
        Self {
            dropped: counter("audit_dropped"),
            failed: counter("audit_failed"),
        }
    }
}

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// A file that reaches this size is rotated.
    pub max_bytes: u64,
    /// Old files kept (`FILE.1` newest .. `FILE.keep` oldest).
    pub keep: u32,
}

enum Message {
    Record(Box<Record>),
    /// Write everything before, then answer and stop.
    Stop(SyncSender<()>),
}

/// The agent's handle on the audit log. Cheap to clone; [`Self::record`] never blocks.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: Option<SyncSender<Message>>,
    dropped: IntCounter,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Message")
    }
}

impl AuditLog {
    /// A log that records nothing (tests of other parts).
    #[must_use]
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: AuditCounters::unregistered().dropped,
        }
    }

    /// Opens (or creates) `path` now, so that a path the agent may not use stops it at
    /// start, and starts the writer thread.
    pub fn start(path: &Path, rotation: Rotation, counters: AuditCounters) -> anyhow::Result<Self> {
        let file = AuditFile::open(path, rotation)?;
        let (tx, rx) = mpsc::sync_channel(CHANNEL_RECORDS);
        let dropped = counters.dropped.clone();
        std::thread::Builder::new()
            .name("weir-audit".into())
            .spawn(move || writer(file, &rx, &counters))
            .context("starting the audit writer thread")?;
        Ok(Self {
            tx: Some(tx),
            dropped,
        })
    }

    /// Queues `record` for the writer; a full channel drops it (counted, logged).
    pub fn record(&self, record: Record) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(Message::Record(record))) => {
                self.dropped.inc();
                tracing::warn!(what = %record.what, "audit log writer is behind: record dropped");
            }
            Err(_) => {
                self.dropped.inc();
                tracing::warn!("audit log writer is gone: record dropped");
            }
        }
    }

    /// The hook for announcements (BGP and the like): `prefix` announced or withdrawn by
    /// `announcer`, from `before` to `after`.
    pub fn announcement(
        &self,
        announcer: &str,
        prefix: &str,
        before: Value,
        after: Value,
        error: Option<String>,
    ) {
        let outcome = if error.is_some() {
            Outcome::Error
        } else {
            Outcome::Ok
        };
        let mut record = Record::new(Who::agent(announcer), "announce", outcome)
            .target(prefix)
            .change(before, after);
        record.error = error;
        self.record(record);
    }

    /// Waits (at most `timeout`) until the writer wrote what was queued before, then stops
    /// it. A writer stuck on a dead disk is left behind rather than waited for.
    pub fn close(&self, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        let mut message = Message::Stop(done_tx);
        loop {
            match tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = done_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

fn writer(mut file: AuditFile, rx: &mpsc::Receiver<Message>, counters: &AuditCounters) {
    // Logged at the first failure and then at every 100th, not once per record.
    let mut failures = 0u64;
    while let Ok(message) = rx.recv() {
        match message {
            Message::Record(record) => {
                if let Err(err) = file.append(&record.line()) {
                    counters.failed.inc();
                    if failures.is_multiple_of(100) {
                        tracing::error!(path = %file.path.display(), error = %err, failures = failures + 1, "writing the audit log failed");
                    }
                    failures += 1;
                }
            }
            Message::Stop(done) => {
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Whether `path` is a file this agent (or the CLI) created: its first line is a
/// [`FILE_CREATED`] record. `Ok(None)`: nothing there.
pub fn is_ours(path: &Path) -> io::Result<Option<bool>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => return Ok(Some(false)),
        Err(err) => return Err(err),
    };
    if !file.metadata()?.is_file() {
        return Ok(Some(false));
    }
    let mut first = String::new();
    BufReader::new(file.take(4096)).read_line(&mut first)?;
    Ok(Some(
        serde_json::from_str::<Record>(first.trim_end())
            .is_ok_and(|record| record.what == FILE_CREATED),
    ))
}

/// The open audit file and its rotation.
#[derive(Debug)]
struct AuditFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    rotation: Rotation,
    /// A rotation that failed is tried again only after this size.
    retry_at: u64,
}

impl AuditFile {
    fn open(path: &Path, rotation: Rotation) -> anyhow::Result<Self> {
        let file = open_own(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
            size,
            rotation,
            retry_at: rotation.max_bytes,
        })
    }

    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            // Reopened after a failed rotation or write: the path may be usable again.
            let file = open_own(&self.path).map_err(io::Error::other)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        let Some(file) = self.file.as_mut() else {
            unreachable!("opened above")
        };
        file.write_all(line)?;
        self.size += line.len() as u64;
        if self.size >= self.retry_at {
            if let Err(err) = self.rotate() {
                tracing::error!(path = %self.path.display(), error = %err, "rotating the audit log failed; appending to the current file");
                self.retry_at = self.size + self.rotation.max_bytes;
                return Err(io::Error::other(format!("rotation: {err}")));
            }
            self.retry_at = self.rotation.max_bytes;
        }
        Ok(())
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// `FILE.keep` (ours) is deleted, `FILE.k` becomes `FILE.k+1`, `FILE` becomes `FILE.1`,
    /// and a new `FILE` is created; only ever files of ours, never renamed over anything.
    fn rotate(&mut self) -> anyhow::Result<()> {
        let names: Vec<PathBuf> = (1..=self.rotation.keep).map(|n| self.numbered(n)).collect();
        // Check every file first: a foreign one anywhere stops the rotation before it
        // moved anything.
        for name in &names {
            if is_ours(name)? == Some(false) {
                anyhow::bail!(
                    "{} was not created by weir; it is left alone (move it away to resume rotation)",
                    name.display()
                );
            }
        }
        if is_ours(&self.path)? != Some(true) {
            anyhow::bail!("{} is no longer weir's audit file", self.path.display());
        }
        self.file = None;
        match names.last() {
            Some(oldest) => {
                if oldest.exists() {
                    std::fs::remove_file(oldest)
                        .with_context(|| format!("removing {}", oldest.display()))?;
                }
                for n in (1..self.rotation.keep).rev() {
                    let (from, to) = (&names[n as usize - 1], &names[n as usize]);
                    if from.exists() {
                        rename_noreplace(from, to)?;
                    }
                }
                rename_noreplace(&self.path, &names[0])?;
            }
            None => std::fs::remove_file(&self.path)
                .with_context(|| format!("removing {}", self.path.display()))?,
        }
        let file = open_own(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> anyhow::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// Opens `path` for appending: creates it (mode 0600, with its [`FILE_CREATED`] line) when
/// nothing is there, reopens it when it is ours, and refuses anything else (a file of
/// someone else, a symlink, a directory).
fn open_own(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let options = |create: bool| {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600);
        if create {
            options.create_new(true);
        }
        options
    };
    match options(true).open(path) {
        Ok(mut file) => {
            let created = Record::new(Who::agent("audit"), FILE_CREATED, Outcome::Ok)
                .change(Value::Null, Value::String(path.display().to_string()));
            file.write_all(&created.line())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(file)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            if is_ours(path).with_context(|| format!("reading {}", path.display()))? != Some(true) {
                anyhow::bail!(
                    "[agent] audit_log: {} exists and was not created by weir; it will not be \
                     written into (choose another path, or move the file away)",
                    path.display()
                );
            }
            let file = options(false)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
            Ok(file)
        }
        Err(err) => Err(anyhow::Error::new(err).context(format!("creating {}", path.display()))),
    }
}

/// Appends one record to `path` at once (no thread, no rotation): for the CLI's own records
/// (`weir teardown`), under the same rules as the agent's writer.
pub fn append_now(path: &Path, record: &Record) -> anyhow::Result<()> {
    let mut file = open_own(path)?;
    file.write_all(&record.line())
        .with_context(|| format!("writing {}", path.display()))
}

/// The last `n` lines of `path` (all of them if fewer), and the offset after the last.
pub fn tail(path: &Path, n: usize) -> io::Result<(Vec<String>, u64)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    // Read backwards in chunks until n + 1 newlines are seen (or the start).
    let mut start = len;
    let mut buf = Vec::new();
    while start > 0 && buf.iter().filter(|&&b| b == b'\n').count() <= n {
        let step = start.min(64 * 1024);
        start -= step;
        let mut chunk = vec![0; step as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    Ok((lines[skip..].iter().map(|l| (*l).to_owned()).collect(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn lines(path: &Path) -> Vec<Record> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn rfc3339_formats_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_600_917_123);
        assert_eq!(rfc3339(t), "2025-12-01T14:55:17.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_are_written_in_order_with_mode_0600() {
        let dir = tempdir("order");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::start(
            &path,
            Rotation {
                max_bytes: 1 << 20,
                keep: 2,
            },
            AuditCounters::unregistered(),
        )
        .unwrap();
        for i in 0..10 {
            log.record(
                Record::new(
                    Who::Unix {
                        uid: 0,
                        pid: Some(i),
                    },
                    "backend_weight",
                    Outcome::Ok,
                )
                .target("web/198.51.100.11")
                .change(
                    serde_json::json!({"weight": i}),
                    serde_json::json!({"weight": i + 1}),
                ),
            );
        }
        log.close(Duration::from_secs(5));
        let records = lines(&path);
        assert_eq!(records.len(), 11);
        assert_eq!(records[0].what, FILE_CREATED);
        assert_eq!(
            records[10].who,
            Who::Unix {
                uid: 0,
                pid: Some(9)
            }
        );
        assert_eq!(records[10].after["weight"], 10);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second agent appends to its own file.
        let log = AuditLog::start(
            &path,
            Rotation {
                max_bytes: 1 << 20,
                keep: 2,
            },
            AuditCounters::unregistered(),
        )
        .unwrap();
        log.record(Record::new(Who::agent("sighup"), "reload", Outcome::Ok));
        log.close(Duration::from_secs(5));
        assert_eq!(lines(&path).len(), 12);
        let (last, _) = tail(&path, 2).unwrap();
        assert_eq!(last.len(), 2);
        assert!(last[1].contains("\"reload\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn foreign_files_are_never_written_renamed_or_deleted() {
        let dir = tempdir("foreign");
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, "someone else's log\n").unwrap();
        let err = AuditLog::start(
            &path,
            Rotation {
                max_bytes: 1 << 20,
                keep: 2,
            },
            AuditCounters::unregistered(),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("not created by weir"),
            "{err:#}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "someone else's log\n"
        );
        // A symlink is not followed.
        std::fs::remove_file(&path).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(
            AuditLog::start(
                &path,
                Rotation {
                    max_bytes: 1 << 20,
                    keep: 2
                },
                AuditCounters::unregistered()
            )
            .is_err()
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
        std::fs::remove_file(&path).unwrap();

        // Rotation stops at a foreign FILE.2 and keeps appending; nothing is lost.
        let foreign = dir.join("audit.jsonl.2");
        std::fs::write(&foreign, "not ours\n").unwrap();
        let counters = AuditCounters::unregistered();
        let log = AuditLog::start(
            &path,
            Rotation {
                max_bytes: 400,
                keep: 2,
            },
            counters.clone(),
        )
        .unwrap();
        for i in 0..20 {
            log.record(Record::new(
                Who::Unix {
                    uid: 0,
                    pid: Some(i),
                },
                "backend_drain",
                Outcome::Ok,
            ));
        }
        log.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "not ours\n");
        assert!(counters.failed.get() > 0);
        assert_eq!(lines(&path).len(), 21);
        assert!(!dir.join("audit.jsonl.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_n_files_of_ours() {
        let dir = tempdir("rotate");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::start(
            &path,
            Rotation {
                max_bytes: 600,
                keep: 2,
            },
            AuditCounters::unregistered(),
        )
        .unwrap();
        for i in 0..60 {
            log.record(Record::new(
                Who::Unix {
                    uid: 0,
                    pid: Some(i),
                },
                "backend_enable",
                Outcome::Ok,
            ));
        }
        log.close(Duration::from_secs(5));
        for name in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"] {
            let file = dir.join(name);
            assert_eq!(is_ours(&file).unwrap(), Some(true), "{name}");
            assert!(
                std::fs::metadata(&file).unwrap().len() <= 600 + 200,
                "{name}"
            );
        }
        assert!(!dir.join("audit.jsonl.3").exists());
        // Oldest to newest, the kept records are a run without gaps that ends with the
        // last one written.
        let pids: Vec<i32> = ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
            .iter()
            .flat_map(|name| lines(&dir.join(name)))
            .filter_map(|r| match r.who {
                Who::Unix { pid, .. } => pid,
                _ => None,
            })
            .collect();
        assert_eq!(pids.last(), Some(&59));
        assert!(pids.len() > 5);
        assert!(pids.windows(2).all(|w| w[1] == w[0] + 1), "{pids:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stuck_writer_never_blocks_the_caller() {
        // No writer thread reads this channel: the caller must still return at once.
        let (tx, _rx) = mpsc::sync_channel(2);
        let counters = AuditCounters::unregistered();
        let log = AuditLog {
            tx: Some(tx),
            dropped: counters.dropped.clone(),
        };
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            log.record(Record::new(
                Who::agent("health_check"),
                "health",
                Outcome::Ok,
            ));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(counters.dropped.get(), 998);
    }
}
