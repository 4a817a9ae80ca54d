//! Keeping `fullnat`'s SNAT ports away from the kernel's own sockets (docs/design/nat.md
//! §5): with an SNAT address that is the host's, a local socket on an ephemeral port in the
//! SNAT range (the agent's own health checks) could share a tuple with a pair, and XDP would
//! take its replies. At start the agent reads `net.ipv4.ip_local_port_range` and
//! `net.ipv4.ip_local_reserved_ports` of its network namespace (both are per namespace and
//! cover IPv6 too); the part of the SNAT range inside the ephemeral range and not reserved
//! yet is added to the reserved list (the union: writing replaces the whole list), logged,
//! and recorded in `reserved-ports.json` beside the state file, so that exactly what the
//! agent added is known later. Nothing the agent did not add is ever removed or rewritten.
//! With `reserve_snat_ports = false` such an overlap stops the start instead.
//!
//! `weir teardown` undoes it ([`release`]): it removes from the reserved list exactly the
//! recorded ranges (an operator's own reservations, even overlapping ones made before, stay),
//! then the record. The record names the network namespace it was made in and the datapath
//! (`[agent] bpffs`) it was made for: a teardown from another namespace changes nothing
//! there, and the teardown of another datapath leaves it alone.
//!
//! The range arithmetic is pure and tested on strings; [`reserve`] and [`release`] do the
//! I/O.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Inclusive port ranges, sorted and merged.
pub type Ranges = Vec<(u16, u16)>;

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// The record of what the agent added, beside the state file.
pub const RECORD_FILE: &str = "reserved-ports.json";

/// `ip_local_port_range`: two numbers separated by white space.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// `ip_local_reserved_ports`: comma-separated ports and `lo-hi` ranges, possibly empty.
pub fn parse_reserved(text: &str) -> Option<Ranges> {
    let mut out = Vec::new();
    for item in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let (lo, hi) = (
            lo.trim().parse::<u16>().ok()?,
            hi.trim().parse::<u16>().ok()?,
        );
        if lo > hi {
            return None;
        }
        out.push((lo, hi));
    }
    Some(merge(out))
}

/// The kernel's notation of `ranges`.
#[must_use]
pub fn format_reserved(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sorted, with overlapping and adjacent ranges joined.
#[must_use]
pub fn merge(mut ranges: Ranges) -> Ranges {
    ranges.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// `ranges` without the ports of `remove`, sorted and merged.
#[must_use]
pub fn subtract(ranges: &[(u16, u16)], remove: &[(u16, u16)]) -> Ranges {
    let remove = merge(remove.to_vec());
    let mut out = Vec::new();
    for &(lo, hi) in &merge(ranges.to_vec()) {
        let mut next = u32::from(lo);
        for &(rlo, rhi) in &remove {
            if u32::from(rhi) < next || rlo > hi {
                continue;
            }
            if u32::from(rlo) > next {
                out.push((next as u16, rlo - 1));
            }
            next = u32::from(rhi) + 1;
        }
        if next <= u32::from(hi) {
            out.push((next as u16, hi));
        }
    }
    out
}

/// The ports of `snat` inside `ephemeral` that `reserved` does not hold yet.
#[must_use]
pub fn missing(snat: (u16, u16), ephemeral: (u16, u16), reserved: &[(u16, u16)]) -> Ranges {
    let (lo, hi) = (snat.0.max(ephemeral.0), snat.1.min(ephemeral.1));
    if lo > hi {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut next = u32::from(lo);
    for &(rlo, rhi) in &merge(reserved.to_vec()) {
        if u32::from(rhi) < next || u32::from(rlo) > u32::from(hi) {
            continue;
        }
        if u32::from(rlo) > next {
            out.push((next as u16, rlo - 1));
        }
        next = u32::from(rhi) + 1;
    }
    if next <= u32::from(hi) {
        out.push((next as u16, hi));
    }
    out
}

/// Makes sure the kernel hands out no ephemeral port of `snat` in this namespace: adds
/// the missing part to `ip_local_reserved_ports` (union, logged, recorded in
/// `<state dir>/reserved-ports.json`, with this namespace and the datapath `bpffs`) when
/// `allowed`, else refuses with a message naming the overlap and both ways out.
pub fn reserve(
    snat: (u16, u16),
    allowed: bool,
    state_file: &Path,
    bpffs: &Path,
) -> anyhow::Result<()> {
    let range_text =
        fs::read_to_string(PORT_RANGE).with_context(|| format!("reading {PORT_RANGE}"))?;
    let ephemeral = parse_port_range(&range_text)
        .with_context(|| format!("{PORT_RANGE} holds {:?}, not two ports", range_text.trim()))?;
    let reserved_text =
        fs::read_to_string(RESERVED).with_context(|| format!("reading {RESERVED}"))?;
    let reserved = parse_reserved(&reserved_text).with_context(|| {
        format!(
            "{RESERVED} holds {:?}, not a port list",
            reserved_text.trim()
        )
    })?;
    let add = missing(snat, ephemeral, &reserved);
    if add.is_empty() {
        return Ok(());
    }
    let (snat_text, add_text) = (format!("{}-{}", snat.0, snat.1), format_reserved(&add));
    if !allowed {
        bail!(
            "[agent] snat_ports = \"{snat_text}\" overlaps the kernel's ephemeral ports \
             ({} {}, net.ipv4.ip_local_port_range) in {add_text}, which are not reserved, and \
             reserve_snat_ports = false: local sockets could take those ports from NAT pairs. \
             Choose snat_ports outside {}-{}, or set reserve_snat_ports = true (the agent then \
             adds {add_text} to net.ipv4.ip_local_reserved_ports)",
            ephemeral.0,
            ephemeral.1,
            ephemeral.0,
            ephemeral.1
        );
    }
    let mut union = reserved.clone();
    union.extend(&add);
    let value = format_reserved(&merge(union));
    // The record first: a crash between the two leaves a record of a range not added yet,
    // which a later removal skips (it removes only what it finds), never the reverse.
    let record = record_path(state_file);
    let netns = current_netns()?;
    let mut recorded = match read_record(&record)? {
        Some(r) if r.made_for(&netns, bpffs) => r.added,
        Some(r) => {
            // Another namespace's or datapath's record (a state file shared by agents, or
            // one left by a namespace that is gone): this agent cannot undo it.
            tracing::warn!(
                record = %record.display(),
                recorded_in = ?r.netns,
                recorded_for = ?r.bpffs,
                forgotten = %format_reserved(&r.added),
                "the record of reserved SNAT ports was made in another network namespace or \
                 for another datapath; starting a new one for this agent"
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    recorded.extend(&add);
    write_record(
        &record,
        &Record {
            added: merge(recorded),
            netns: Some(netns),
            bpffs: Some(bpffs.to_owned()),
        },
    )?;
    fs::write(RESERVED, &value).with_context(|| format!("writing {RESERVED}"))?;
    tracing::info!(
        added = %add_text,
        was = %reserved_text.trim(),
        now = %value,
        record = %record.display(),
        "SNAT ports added to net.ipv4.ip_local_reserved_ports"
    );
    Ok(())
}

/// What `weir teardown` did to the reserved ports ([`release`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// No record beside the state file.
    NoRecord,
    /// The record is another datapath's (its `bpffs`): left alone.
    OtherDatapath { record: PathBuf, bpffs: PathBuf },
    /// The recorded ranges were removed (those still there), then the record.
    Released {
        record: PathBuf,
        /// `ip_local_reserved_ports` before and after.
        before: String,
        after: String,
    },
}

/// Where the record of a state file's agent lives: beside the state file.
#[must_use]
pub fn record_path(state_file: &Path) -> PathBuf {
    state_file
        .parent()
        .map_or_else(|| PathBuf::from(RECORD_FILE), |d| d.join(RECORD_FILE))
}

/// Undoes [`reserve`] for the agent of datapath `bpffs` whose state file is `state_file`:
/// removes the recorded ranges still in this namespace's `ip_local_reserved_ports` (nothing
/// else: an operator's ranges stay, even where they overlap the record, as they were never
/// recorded), then the record. A record made for another datapath is left alone; one made
/// in another network namespace is refused, changing nothing. Run only once no agent runs
/// the datapath: an agent's pairs need their ports kept from local sockets.
pub fn release(state_file: &Path, bpffs: &Path) -> anyhow::Result<Release> {
    let record = record_path(state_file);
    let Some(recorded) = read_record(&record)? else {
        return Ok(Release::NoRecord);
    };
    if let Some(theirs) = recorded.bpffs.as_ref().filter(|b| *b != bpffs) {
        return Ok(Release::OtherDatapath {
            record,
            bpffs: theirs.clone(),
        });
    }
    let netns = current_netns()?;
    if let Some(theirs) = recorded.netns.as_ref().filter(|n| **n != netns) {
        bail!(
            "{} records SNAT ports reserved in network namespace {theirs}, not this one \
             ({netns}); run `weir teardown` in that namespace (nsenter --net=...), or remove \
             the record by hand if that namespace is gone; the reserved ports stay as they are",
            record.display()
        );
    }
    let before = fs::read_to_string(RESERVED).with_context(|| format!("reading {RESERVED}"))?;
    let current = parse_reserved(&before)
        .with_context(|| format!("{RESERVED} holds {:?}, not a port list", before.trim()))?;
    let left = subtract(&current, &recorded.added);
    let after = format_reserved(&left);
    if left != current {
        fs::write(RESERVED, &after).with_context(|| format!("writing {RESERVED}"))?;
    }
    // Only once the sysctl is right: a failed write keeps the record for another try.
    match fs::remove_file(&record) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", record.display())),
    }
    Ok(Release::Released {
        record,
        before: before.trim().to_owned(),
        after,
    })
}

/// This process's network namespace, as the kernel names it (`net:[4026531840]`).
fn current_netns() -> anyhow::Result<String> {
    let link = fs::read_link("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    Ok(link.to_string_lossy().into_owned())
}

/// The record (none if there is no file).
pub fn read_record(path: &Path) -> anyhow::Result<Option<Record>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<Record>(&bytes)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `reserved-ports.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Ranges the agent added to `ip_local_reserved_ports`.
    pub added: Ranges,
    /// The network namespace whose sysctl they were added to (`net:[INODE]`); absent in
    /// records of earlier agents, which are taken to be this namespace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The datapath (`[agent] bpffs`) of the agent that added them: its teardown removes
    /// them, another's does not. Absent in records of earlier agents (any datapath's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpffs: Option<PathBuf>,
}

impl Record {
    /// Whether an agent of datapath `bpffs` in namespace `netns` made this record (an
    /// earlier agent's record names neither and is taken for this one's).
    fn made_for(&self, netns: &str, bpffs: &Path) -> bool {
        self.netns.as_deref().is_none_or(|n| n == netns)
            && self.bpffs.as_deref().is_none_or(|b| b == bpffs)
    }
}

/// Writes the record atomically (a temporary of this process, renamed), mode 0600.
fn write_record(path: &Path, record: &Record) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_file_name(format!(".{RECORD_FILE}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_vec_pretty(record)?;
    text.push(b'\n');
    let written = (|| {
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_notations() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("8080,61000-61999,61500,1-3\n"),
            Some(vec![(1, 3), (8080, 8080), (61000, 61999)])
        );
        assert_eq!(parse_reserved("5-1"), None);
        assert_eq!(parse_reserved("x"), None);
        assert_eq!(
            format_reserved(&[(1, 3), (8080, 8080), (61000, 61999)]),
            "1-3,8080,61000-61999"
        );
    }

    #[test]
    fn merge_joins_overlaps_and_neighbours() {
        assert_eq!(
            merge(vec![(10, 20), (21, 30), (5, 12), (40, 40), (65535, 65535)]),
            vec![(5, 30), (40, 40), (65535, 65535)]
        );
    }

    #[test]
    fn only_the_unreserved_overlap_is_missing() {
        // The default SNAT range lies above the default ephemeral range: nothing to do.
        assert_eq!(missing((61000, 65535), (32768, 60999), &[]), vec![]);
        // Overlap, nothing reserved.
        assert_eq!(
            missing((60000, 65535), (32768, 60999), &[]),
            vec![(60000, 60999)]
        );
        // An operator's reservations are holes in what is missing.
        assert_eq!(
            missing(
                (50000, 50100),
                (32768, 60999),
                &[(50010, 50019), (50050, 50200)]
            ),
            vec![(50000, 50009), (50020, 50049)]
        );
        // Already reserved whole.
        assert_eq!(
            missing((50000, 50100), (32768, 60999), &[(40000, 55000)]),
            vec![]
        );
    }

    #[test]
    fn the_union_keeps_every_operator_range() {
        let reserved = parse_reserved("8080,50010-50019").unwrap();
        let add = missing((50000, 50100), (32768, 60999), &reserved);
        let mut union = reserved.clone();
        union.extend(&add);
        let value = format_reserved(&merge(union));
        assert_eq!(value, "8080,50000-50100");
        // Idempotent: a second start adds nothing.
        let again = parse_reserved(&value).unwrap();
        assert_eq!(missing((50000, 50100), (32768, 60999), &again), vec![]);
    }

    #[test]
    fn teardown_removes_only_what_was_recorded() {
        // The operator had 8080 and 50010-50019; the agent added the rest of 50000-50100.
        let operator = parse_reserved("8080,50010-50019").unwrap();
        let added = missing((50000, 50100), (32768, 60999), &operator);
        assert_eq!(added, vec![(50000, 50009), (50020, 50100)]);
        let mut union = operator.clone();
        union.extend(&added);
        let value = format_reserved(&merge(union));
        assert_eq!(value, "8080,50000-50100");
        // Teardown: the union minus the record is the operator's list again.
        let left = subtract(&parse_reserved(&value).unwrap(), &added);
        assert_eq!(format_reserved(&left), "8080,50010-50019");
        // Idempotent: nothing recorded is left to remove.
        assert_eq!(subtract(&left, &added), left);
        // Ranges the operator added later outside the record stay; a recorded range
        // someone already removed is simply not there.
        let later = parse_reserved("8080,40000-40009,50000-50009").unwrap();
        assert_eq!(
            format_reserved(&subtract(&later, &added)),
            "8080,40000-40009"
        );
        assert_eq!(subtract(&[], &added), vec![]);
    }

    #[test]
    fn release_leaves_another_datapaths_record_alone() {
        let dir = std::env::temp_dir().join(format!("weir-release-{}", std::process::id()));
        let state = dir.join("state.json");
        let lab = Path::new("/sys/fs/bpf/lab");
        assert_eq!(release(&state, lab).unwrap(), Release::NoRecord);
        let record = Record {
            added: vec![(50000, 50100)],
            netns: Some("net:[1]".into()),
            bpffs: Some("/sys/fs/bpf/weir".into()),
        };
        write_record(&record_path(&state), &record).unwrap();
        // Returned before the sysctl is read: another datapath's record is not ours.
        assert_eq!(
            release(&state, lab).unwrap(),
            Release::OtherDatapath {
                record: dir.join(RECORD_FILE),
                bpffs: "/sys/fs/bpf/weir".into()
            }
        );
        assert_eq!(read_record(&record_path(&state)).unwrap(), Some(record));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn subtract_cuts_at_every_edge() {
        assert_eq!(
            subtract(&[(1, 100)], &[(1, 1), (10, 20), (100, 100)]),
            vec![(2, 9), (21, 99)]
        );
        assert_eq!(
            subtract(&[(1, 5), (10, 15)], &[(3, 12)]),
            vec![(1, 2), (13, 15)]
        );
        assert_eq!(subtract(&[(65535, 65535)], &[(0, 65535)]), vec![]);
        assert_eq!(subtract(&[(0, 65535)], &[]), vec![(0, 65535)]);
    }

    #[test]
    fn the_record_round_trips_privately() {
        let dir = std::env::temp_dir().join(format!("weir-ports-{}", std::process::id()));
        let path = dir.join(RECORD_FILE);
        assert_eq!(read_record(&path).unwrap(), None);
        let record = Record {
            added: vec![(60000, 60999)],
            netns: Some("net:[4026531840]".into()),
            bpffs: Some("/sys/fs/bpf/weir".into()),
        };
        write_record(&path, &record).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(record.clone()));
        let weir = Path::new("/sys/fs/bpf/weir");
        assert!(record.made_for("net:[4026531840]", weir));
        assert!(!record.made_for("net:[4026532316]", weir));
        assert!(!record.made_for("net:[4026531840]", Path::new("/sys/fs/bpf/lab")));
        // An earlier agent's record names neither: it is taken for anyone's.
        fs::write(&path, r#"{"added":[[61000,61999]]}"#).unwrap();
        let old = read_record(&path).unwrap().unwrap();
        assert_eq!(
            old,
            Record {
                added: vec![(61000, 61999)],
                netns: None,
                bpffs: None
            }
        );
        assert!(old.made_for("net:[4026532316]", Path::new("/sys/fs/bpf/lab")));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }
}
