//! `cargo xtask bench [NAME...]`: runs benchmarks by name.
use std::process::ExitCode;

use crate::cmd;

/// Benchmarks that exist, run in this order when no name is given.
const IMPLEMENTED: &[&str] = &["datapath"];

/// Benchmarks that are planned but not written yet.
const PLANNED: &[&str] = &["e2e", "packets", "control"];

pub(crate) fn bench(names: &[String], bench_args: &[String]) -> anyhow::Result<ExitCode> {
    let names: Vec<&str> = if names.is_empty() {
        IMPLEMENTED.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    // Check every name before running anything.
    for name in &names {
        if !IMPLEMENTED.contains(name) {
            let known = if PLANNED.contains(name) {
                "planned"
            } else {
                "unknown"
            };
            eprintln!(
                "bench {name}: not implemented yet ({known}; implemented: {})",
                IMPLEMENTED.join(", ")
            );
            return Ok(ExitCode::from(2));
        }
    }
    for name in names {
        println!();
        println!("==> bench {name}");
        let mut bench = cmd::cargo();
        bench.args(["bench", "-p", "lb-userspace", "--bench", name]);
        if !bench_args.is_empty() {
            bench.arg("--").args(bench_args);
        }
        cmd::run(&mut bench)?;
    }
    Ok(ExitCode::SUCCESS)
}
