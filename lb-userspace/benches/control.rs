//! `cargo xtask bench control`: the control plane's costs.
//!
//! * Maglev ring build time (`lb_common::maglev::build_ring`, what the agent runs for every
//!   service change) for 10, 100 and 1,000 equal-weight backends at ring sizes 65537 and
//!   655373, the sizes of the Maglev paper (which reports 1.8 ms and 22.9 ms for 1,000
//!   backends). Median of repeated builds (at least 3, up to 0.5 s or 51 builds).
//! * Map writes for a one-backend change: ring slots that differ (`maglev::diff`, all the
//!   agent writes) when one backend is removed or added, next to the ideal M/N.
//! * The same changes through the agent's own code (`weir::agent::Balancer` on a loaded
//!   eBPF object, as root): the writes it reports and the wall time of `apply`, at the
//!   agent's ring size 65537.
//!
//! Unprivileged runs skip the last part.

mod support;

use std::{
    hint::black_box,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use lb_common::maglev::{self, MaglevBackend};
use support::Spread;
use weir_testbed::{Backend, ConfigBuilder, ServiceBuilder};

const SIZES: [u32; 2] = [65_537, 655_373];
const COUNTS: [usize; 3] = [10, 100, 1000];

fn keys(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut k = b"web\0".to_vec();
            k.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
            k.extend_from_slice(&u16::try_from(i + 1).expect("few backends").to_be_bytes());
            k
        })
        .collect()
}

fn backends(keys: &[Vec<u8>]) -> Vec<MaglevBackend<'_>> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| MaglevBackend {
            id: u32::try_from(i).expect("few backends"),
            weight: 1,
            key,
        })
        .collect()
}

/// Milliseconds per build: the median of repeated builds.
fn time_build(b: &[MaglevBackend<'_>], size: u32) -> Spread {
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed() < Duration::from_millis(500) && samples.len() < 51)
    {
        let t = Instant::now();
        black_box(maglev::build_ring(black_box(b), size));
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Spread::of(&samples).expect("samples")
}

struct Change {
    n: usize,
    size: u32,
    removed: usize,
    added: usize,
}

fn changes(n: usize, size: u32) -> Change {
    let k = keys(n + 1);
    let all = backends(&k);
    let base = maglev::build_ring(&all[..n], size);
    // Remove a backend from the middle.
    let mut fewer: Vec<MaglevBackend<'_>> = all[..n].to_vec();
    fewer.remove(n / 2);
    let removed = maglev::diff(&base, &maglev::build_ring(&fewer, size)).len();
    let added = maglev::diff(&base, &maglev::build_ring(&all, size)).len();
    Change {
        n,
        size,
        removed,
        added,
    }
}

/// A one-service config with backends 2001:db8:1::(i + 1) for each `i` of `ids`.
fn agent_config(ids: impl IntoIterator<Item = usize>) -> String {
    let web = ids.into_iter().fold(
        ServiceBuilder::new("web", Ipv4Addr::new(203, 0, 113, 10), 80, "tcp"),
        |s, i| {
            let last = u16::try_from(i + 1).expect("fewer than 65535 backends");
            s.backend(Backend::new(Ipv6Addr::new(
                0x2001, 0xdb8, 1, 0, 0, 0, 0, last,
            )))
        },
    );
    ConfigBuilder::new("g0")
        .tunnel_source_v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
        .conntrack_entries(1024)
        .service(web)
        .render()
}

/// (backends, initial writes, remove: writes and ms, add: writes and ms)
type AgentRow = (usize, usize, usize, f64, usize, f64);

/// One-backend changes through the agent's `Balancer` on a loaded object (root only).
fn agent_changes() -> anyhow::Result<Vec<AgentRow>> {
    use weir::{
        agent::desired::plain,
        config,
        datapath::{self, KernelMaps},
        reconcile::Balancer,
    };
    let mut rows = Vec::new();
    for n in COUNTS {
        let parse = |text: &str| config::parse(text, Path::new("bench-control.toml"));
        let base = parse(&agent_config(0..n))?;
        let fewer = parse(&agent_config((0..n).filter(|&i| i != n / 2)))?;
        let more = parse(&agent_config(0..=n))?;

        let mut ebpf = datapath::load_object(1024, false)?;
        let mut balancer = Balancer::new(KernelMaps::take(&mut ebpf)?);
        let initial = balancer.apply(&plain(&base))?;
        let t = Instant::now();
        let removed = balancer.apply(&plain(&fewer))?;
        let removed_ms = t.elapsed().as_secs_f64() * 1e3;
        balancer.apply(&plain(&base))?;
        let t = Instant::now();
        let added = balancer.apply(&plain(&more))?;
        let added_ms = t.elapsed().as_secs_f64() * 1e3;
        let writes = |r: weir::reconcile::ApplyReport| r.ring_slots_written + r.backends_written;
        rows.push((
            n,
            writes(initial),
            writes(removed),
            removed_ms,
            writes(added),
            added_ms,
        ));
    }
    Ok(rows)
}

fn main() {
    let started = Instant::now();
    for size in SIZES {
        assert!(maglev::is_prime(size), "{size} is not prime");
    }
    let mut build_rows = Vec::new();
    let mut json_builds = Vec::new();
    for n in COUNTS {
        let k = keys(n);
        let b = backends(&k);
        let mut row = vec![n.to_string()];
        for size in SIZES {
            let s = time_build(&b, size);
            println!("build: {n:>4} backends, ring {size:>6}: {} ms", s.show(2));
            row.push(s.show(2));
            json_builds.push(serde_json::json!({
                "backends": n, "ring_size": size, "ms": s.json(),
            }));
        }
        build_rows.push(row);
    }
    let build_table = support::table(
        &["backends", "build ms, ring 65537", "build ms, ring 655373"],
        1,
        &build_rows,
    );

    let mut change_rows = Vec::new();
    for size in SIZES {
        for n in COUNTS {
            let c = changes(n, size);
            println!(
                "change: {n:>4} backends, ring {size:>6}: remove one {} slots, add one {} slots",
                c.removed, c.added
            );
            let ideal_remove = f64::from(c.size) / c.n as f64;
            let ideal_add = f64::from(c.size) / (c.n + 1) as f64;
            change_rows.push(vec![
                c.size.to_string(),
                c.n.to_string(),
                format!("{} (ideal {ideal_remove:.0})", c.removed),
                format!("{} (ideal {ideal_add:.0})", c.added),
                c.size.to_string(),
            ]);
        }
    }
    let change_table = support::table(
        &[
            "ring size",
            "backends",
            "slots rewritten, remove one",
            "slots rewritten, add one",
            "a full rewrite",
        ],
        2,
        &change_rows,
    );

    let root = {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    };
    let agent_table = if root {
        match agent_changes() {
            Ok(rows) => {
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|(n, initial, rm, rm_ms, add, add_ms)| {
                        println!(
                            "agent: {n:>4} backends: initial {initial} writes; remove one {rm} writes in {rm_ms:.2} ms; add one {add} writes in {add_ms:.2} ms"
                        );
                        vec![
                            n.to_string(),
                            initial.to_string(),
                            format!("{rm} in {rm_ms:.2} ms"),
                            format!("{add} in {add_ms:.2} ms"),
                        ]
                    })
                    .collect();
                support::table(
                    &[
                        "backends (ring 65537)",
                        "initial apply: writes",
                        "remove one: writes, apply time",
                        "add one: writes, apply time",
                    ],
                    1,
                    &rows,
                )
            }
            Err(e) => format!("The agent's part failed: {e:#}\n"),
        }
    } else {
        "The agent's part needs root (it loads the eBPF object); skipped.\n".to_owned()
    };

    let body = format!(
        "Measured by `cargo xtask bench control` on {}: median (min–max) of repeated builds.\n\n\
         {build_table}\nMaglev paper (its hardware): 1.8 ms at 65537 and 22.9 ms at \
         655373 slots for 1,000 backends.\n\nMap writes for a one-backend change (ring slots \
         that differ; the agent writes only those, plus one backend entry):\n\n{change_table}\n\
         Through the agent's `Balancer` (writes = ring slots + backend entries, as it reports \
         them; apply time includes the map syscalls):\n\n{agent_table}",
        support::machine()
    );
    println!("\n{body}");
    support::write_doc_section("control", &body);
    support::write_json(&serde_json::json!({
        "bench": "control",
        "machine": support::machine(),
        "builds": json_builds,
    }));
    println!(
        "bench control took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
