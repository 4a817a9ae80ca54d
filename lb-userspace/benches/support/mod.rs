//! Shared by the benches: arguments, statistics, the machine description, CPU time from
//! /proc/stat, pinning a thread to a CPU, and writing results (a section of
//! docs/BENCHMARKS.md between markers, and a JSON file for `cargo xtask bench` to chart).
#![expect(
    dead_code,
    reason = "each bench binary uses a different part of these helpers"
)]

use std::{fmt::Write as _, path::Path};

/// `--name VALUE` from the bench's arguments (cargo adds `--bench`, which is ignored).
pub fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// Whether the bare flag `name` was given.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no samples. The median of an even count is the mean of the middle two.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            f64::midpoint(s[n / 2 - 1], s[n / 2])
        };
        Some(Self {
            median,
            min: s[0],
            max: s[n - 1],
        })
    }

    /// `median (min–max)` with `decimals` decimals.
    pub fn show(&self, decimals: usize) -> String {
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            self.median, self.min, self.max
        )
    }

    /// As `show`, with an explicit sign (for differences).
    pub fn show_signed(&self, decimals: usize) -> String {
        format!(
            "{:+.decimals$} ({:+.decimals$} to {:+.decimals$})",
            self.median, self.min, self.max
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// Shows an optional spread, or `failed`.
pub fn show_opt(s: Option<Spread>, decimals: usize) -> String {
    s.map_or_else(|| "failed".to_owned(), |s| s.show(decimals))
}

/// Shows an optional signed spread, or an empty cell.
pub fn show_opt_signed(s: Option<Spread>, decimals: usize) -> String {
    s.map_or_else(String::new, |s| s.show_signed(decimals))
}

pub fn json_opt(s: Option<Spread>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| s.json())
}

/// CPU model, core count and kernel of this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB RAM", kb / 1024.0 / 1024.0)
        });
    format!("{cpu}, {cores} cores{mem_gib}, Linux {kernel}")
}

/// The machine's busy CPU time so far (all CPUs: user, nice, system, irq, softirq; not
/// idle, iowait or steal), in microseconds, from the first line of /proc/stat.
pub fn cpu_busy_us() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("/proc/stat has no cpu line"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<f64>().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    // already part of user.
    let busy = v.first().copied().unwrap_or(0.0)
        + v.get(1).copied().unwrap_or(0.0)
        + v.get(2).copied().unwrap_or(0.0)
        + v.get(5).copied().unwrap_or(0.0)
        + v.get(6).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(busy * 1e6 / hz)
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in
/// docs/BENCHMARKS.md (appending the block if the markers are missing).
pub fn write_doc_section(name: &str, body: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let section = format!("{begin}\n{body}{end}");
    let text = match (existing.find(&begin), existing.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ => format!("{existing}\n{section}\n"),
    };
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("warning: cannot write {}: {e}", path.display());
    } else {
        println!("written to {}", path.display());
    }
}

/// Writes `value` to `$WEIR_BENCH_JSON` if set (`cargo xtask bench` sets it and draws the
/// chart from the file).
pub fn write_json(value: &serde_json::Value) {
    let Some(path) = std::env::var_os("WEIR_BENCH_JSON") else {
        return;
    };
    let path = Path::new(&path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_string_pretty(value) {
        Ok(text) => match std::fs::write(path, text) {
            Ok(()) => println!("results written to {}", path.display()),
            Err(e) => eprintln!("warning: cannot write {}: {e}", path.display()),
        },
        Err(e) => eprintln!("warning: cannot encode results: {e}"),
    }
}

/// A markdown table from a header and rows.
pub fn table(header: &[&str], align_right_from: usize, rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let seps: Vec<&str> = (0..header.len())
        .map(|i| if i < align_right_from { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", seps.join("|"));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// Turns on the kernel's run-time statistics of BPF programs (`BPF_ENABLE_STATS`) for as
/// long as the returned descriptor is open: each program then counts its runs and the
/// time spent in them (visible in the `fdinfo` of its descriptors). Costs two clock reads
/// per program run while on. `None` if the kernel refuses.
pub fn enable_bpf_stats() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // `union bpf_attr`'s `enable_stats { __u32 type; }`, type 0 = BPF_STATS_RUN_TIME; the
    // rest must be zero.
    let attr = [0u8; 64];
    // SAFETY: bpf(2) reads `attr` (64 valid bytes, as its size argument says) and returns a
    // new descriptor or -1; nothing else is touched.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            attr.len() as libc::c_ulong,
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` is a descriptor the kernel just gave us, owned by nobody else.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Nanoseconds spent so far in the BPF programs held by process `pid` (the sum of
/// `run_time_ns` over its descriptors' fdinfo; only counted while stats are enabled).
pub fn bpf_run_time_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // A program held by several descriptors counts once.
        if let (Some(id), Some(ns)) = (field("prog_id:"), field("run_time_ns:"))
            && seen.insert(id)
        {
            total += ns;
        }
    }
    total
}

/// Pins the calling thread to `cpu` (a warning if it cannot be).
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch that set and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            eprintln!("warning: cannot pin a thread to CPU {cpu}");
        }
    }
}
