//! `cargo xtask bench [NAME...]`: runs benchmarks by name.
//!
//! Each is a `harness = false` bench target of lb-userspace: `datapath` (ns per packet
//! through `BPF_PROG_TEST_RUN`), `e2e` (Weir against nftables, HAProxy and nginx with HTTP
//! traffic), `packets` (packets per second through each balancer), `control` (Maglev
//! build time, map writes per change) and `agent` (health verdict to maps, the agent's CPU). Each writes its section of docs/BENCHMARKS.md;
//! `e2e` and `packets` also leave their results as JSON, from which this draws
//! docs/bench-e2e.png and docs/bench-packets.png. `paper` (the seed paper's experiment:
//! Flask behind NGINX and Weir per method, httperf, per-backend QoS from a capture, about
//! 18 minutes) writes docs/PAPER.md and its chart docs/bench-paper.png.
use std::{path::PathBuf, process::ExitCode};

use crate::{chart, cmd};

/// Benchmarks that exist, run in this order when no name is given.
const IMPLEMENTED: &[&str] = &["datapath", "control", "agent", "packets", "e2e", "paper"];

/// Benchmarks with a chart in docs/.
const CHARTED: &[&str] = &["e2e", "packets", "paper"];

/// Where the benches leave their JSON results: `<target dir>/weir-bench/NAME.json`.
fn results_file(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| cmd::workspace_root().join("target"), PathBuf::from);
    let target = if target.is_relative() {
        cmd::workspace_root().join(target)
    } else {
        target
    };
    target.join("weir-bench").join(format!("{name}.json"))
}

pub(crate) fn bench(names: &[String], bench_args: &[String]) -> anyhow::Result<ExitCode> {
    let names: Vec<&str> = if names.is_empty() {
        IMPLEMENTED.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    // Check every name before running anything.
    for name in &names {
        if !IMPLEMENTED.contains(name) {
            eprintln!(
                "bench {name}: unknown (implemented: {})",
                IMPLEMENTED.join(", ")
            );
            return Ok(ExitCode::from(2));
        }
    }
    for name in names {
        println!();
        println!("==> bench {name}");
        let results = results_file(name);
        let _ = std::fs::remove_file(&results);
        let mut bench = cmd::cargo();
        bench.args(["bench", "-p", "lb-userspace", "--bench", name]);
        bench.env("WEIR_BENCH_JSON", &results);
        if !bench_args.is_empty() {
            bench.arg("--").args(bench_args);
        }
        cmd::run(&mut bench)?;
        if CHARTED.contains(&name) {
            let png = cmd::workspace_root()
                .join("docs")
                .join(format!("bench-{name}.png"));
            if results.is_file() {
                chart::draw(&results, &png)?;
            } else {
                eprintln!(
                    "bench {name}: no results in {}; chart not drawn",
                    results.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_go_under_the_target_dir() {
        let f = results_file("e2e");
        assert!(f.ends_with("weir-bench/e2e.json"), "{}", f.display());
        assert!(f.is_absolute());
    }
}
