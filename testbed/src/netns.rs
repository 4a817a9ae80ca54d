//! Network namespaces: creating them (`ip netns add`), running threads inside them (network
//! namespaces are per thread, so a thread can join one without affecting the process), and
//! removing them again, together with whatever was left running inside.

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicI32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cmd::{ip, run};

/// How long processes left in a namespace get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

/// The namespaces this process created and still owns, for [`remove_on_signal`].
static OWNED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn owned() -> std::sync::MutexGuard<'static, Vec<String>> {
    // A panic elsewhere while holding the list leaves it whole (pushes and removals only).
    OWNED.lock().unwrap_or_else(PoisonError::into_inner)
}

fn disown(name: &str) {
    owned().retain(|n| n != name);
}

/// A network namespace created with `ip netns add`, removed on drop ([`remove_namespace`]:
/// processes left inside are stopped first).
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Cleared by [`Netns::keep`] and once [`Netns::delete`] ran.
    owned: bool,
}

impl Netns {
    /// Creates namespace `name` with its loopback up. A namespace of that name that already
    /// exists is taken for a leftover of an earlier, killed run of the same caller (names
    /// carry the caller's prefix) and removed first.
    pub fn create(name: &str) -> Result<Self> {
        if Path::new(&format!("/run/netns/{name}")).exists() {
            remove_namespace(name)
                .with_context(|| format!("removing the leftover namespace {name}"))?;
        }
        run(&["ip", "netns", "add", name])?;
        owned().push(name.to_owned());
        let ns = Self {
            name: name.to_owned(),
            owned: true,
        };
        ip(name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Removes the namespace now, reporting a failure (dropping only prints it).
    pub fn delete(mut self) -> Result<()> {
        self.owned = false;
        disown(&self.name);
        remove_namespace(&self.name)
    }

    /// Leaves the namespace in place (and whatever runs inside); returns its name.
    #[must_use]
    pub fn keep(mut self) -> String {
        self.owned = false;
        disown(&self.name);
        std::mem::take(&mut self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            disown(&self.name);
            if let Err(e) = remove_namespace(&self.name) {
                eprintln!("warning: cannot delete namespace {}: {e:#}", self.name);
            }
        }
    }
}

/// The write end of [`remove_on_signal`]'s pipe, for its signal handler.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// The signal handler: writes the signal's number to the pipe, which is all it may do
/// (`write(2)` is async-signal-safe).
extern "C" fn on_signal(signal: libc::c_int) {
    let byte = u8::try_from(signal).unwrap_or(u8::MAX);
    // SAFETY: writes one byte from a live local to a pipe this process opened; a failure
    // (the pipe full of earlier signals) loses nothing that matters.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// Makes SIGINT, SIGTERM and SIGHUP remove the namespaces this process still owns (and what
/// runs in them) before it exits with 128 + the signal: a run stopped from outside (Ctrl-C,
/// `timeout`, a cancelled job) runs no destructor, and would leave them behind.
///
/// A handler, not a blocked mask and `sigwait`: a blocked mask is inherited by every
/// process spawned later (servers, agents), which would then ignore the SIGTERM that stops
/// them, while a handler is reset by `exec`. The handler only writes the signal's number to
/// a pipe; a thread of its own reads it and cleans up.
pub fn remove_on_signal() -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", io::Error::last_os_error());
    }
    let [read_end, write_end] = fds;
    SIGNAL_PIPE.store(write_end, Ordering::Relaxed);
    thread::Builder::new()
        .name("netns-signals".to_owned())
        .spawn(move || {
            let mut byte = 0u8;
            // SAFETY: reads one byte into a live local from the pipe opened above.
            let n = unsafe { libc::read(read_end, (&raw mut byte).cast(), 1) };
            if n != 1 {
                eprintln!(
                    "warning: reading the signal pipe: {}",
                    io::Error::last_os_error()
                );
                return;
            }
            let signal = i32::from(byte);
            let names = owned().clone();
            eprintln!("signal {signal}: removing the namespaces {names:?} before exiting");
            for name in &names {
                if let Err(e) = remove_namespace(name) {
                    eprintln!("warning: cannot delete namespace {name}: {e:#}");
                }
            }
            std::process::exit(128 + signal);
        })
        .context("starting the signal thread")?;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: an all-zero `sigaction` is a valid value to fill in; the handler only
        // calls write(2), which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction({signal}): {}", io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The processes inside namespace `ns` (`ip netns pids`), never this process itself.
fn pids_in(ns: &str) -> Vec<libc::pid_t> {
    let own = std::process::id();
    run(&["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
        .filter(|pid| u32::try_from(*pid).is_ok_and(|pid| pid != own))
        .collect()
}

/// Stops every process still inside `namespaces`: SIGTERM, up to 3 s to exit, then SIGKILL.
/// A daemon (or a worker that outlived its master) would otherwise keep a deleted namespace
/// alive. Callers pass only namespaces they created, so these are processes they started.
pub fn stop_processes<S: AsRef<str>>(namespaces: &[S]) {
    let namespaces: Vec<&str> = namespaces.iter().map(AsRef::as_ref).collect();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut any = false;
        for &ns in &namespaces {
            for pid in pids_in(ns) {
                any = true;
                if signal == libc::SIGTERM {
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    eprintln!("stopping process {pid} ({}) left in {ns}", comm.trim());
                }
                // SAFETY: kill(2) has no memory-safety preconditions; the pid was just listed
                // as a process inside one of the caller's own namespaces.
                unsafe { libc::kill(pid, signal) };
            }
        }
        if !any {
            return;
        }
        let deadline = Instant::now() + STOP_GRACE;
        while namespaces.iter().any(|&ns| !pids_in(ns).is_empty()) {
            if Instant::now() >= deadline {
                if signal == libc::SIGTERM {
                    eprintln!("warning: processes in {namespaces:?} ignored SIGTERM; killing them");
                }
                break;
            }
            thread::sleep(POLL);
        }
    }
}

/// Stops whatever still runs in `ns` ([`stop_processes`]), then deletes it; its links go
/// with it.
pub fn remove_namespace(ns: &str) -> Result<()> {
    stop_processes(&[ns]);
    run(&["ip", "netns", "del", ns]).map(drop)
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns with a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns({path}, CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns` and returns its result, or the
/// error of entering the namespace (panics in `f` propagate).
pub fn try_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|s| {
        let h = thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn_scoped(s, move || {
                enter_netns(ns)?;
                Ok(f())
            })
            .context("spawn thread")?;
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// As [`try_in_netns`], panicking if the namespace cannot be entered (for tests, where that
/// is a broken topology).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    try_in_netns(ns, f).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Spawns a long-lived thread inside network namespace `ns`. Returns once the thread is in
/// the namespace (or with the error if it could not enter it).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let ns_owned = ns.to_owned();
    let h = thread::Builder::new()
        .name(format!("{name}@{ns}"))
        .spawn(move || {
            let entered = enter_netns(&ns_owned).map_err(|e| format!("{e:#}"));
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                panic!("thread could not enter namespace {ns_owned}");
            }
            f()
        })
        .context("spawn thread")?;
    match rx.recv() {
        Ok(Ok(())) => Ok(h),
        Ok(Err(e)) => {
            let _ = h.join();
            Err(anyhow!(e))
        }
        Err(_) => Err(anyhow!("thread for namespace {ns} died before entering it")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_a_namespace_that_does_not_exist_is_an_error() {
        let name = "weir-testbed-no-such-namespace";
        assert!(!Path::new(&format!("/run/netns/{name}")).exists());
        let err = try_in_netns(name, || ()).expect_err("no such namespace");
        assert!(format!("{err:#}").contains(name), "{err:#}");
        assert!(spawn_in_netns(name, "t", || ()).is_err());
    }
}
