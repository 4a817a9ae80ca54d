//! `cargo xtask fuzz` and the fuzz stage of `cargo xtask test`: the cargo-fuzz targets of
//! `fuzz/` (a workspace of its own, nightly, libFuzzer), each run for a bounded time,
//! starting from its saved inputs (`tests/fuzz-regressions/TARGET`, which the regression
//! test replays) and its own corpus (`fuzz/corpus/TARGET`, kept between runs, not in git).
//! Also `setup`'s step that installs cargo-fuzz.
use std::process::Command;

use anyhow::Context as _;

use crate::{cmd, setup::NIGHTLY};

/// The targets, `fuzz/fuzz_targets/NAME.rs`.
pub(crate) const TARGETS: &[&str] = &["config", "api_request", "packet"];

/// Seconds per target in `cargo xtask test`.
pub(crate) const TEST_SECONDS: u64 = 20;
/// Seconds per target in `cargo xtask fuzz` without `--seconds`.
pub(crate) const DEFAULT_SECONDS: u64 = 600;

fn cargo_fuzz_version() -> Option<String> {
    cmd::output(Command::new("rustup").args(["run", NIGHTLY, "cargo", "fuzz", "--version"]))
        .map(|v| v.trim().to_owned())
}

/// Installs cargo-fuzz from crates.io unless a working one is there (idempotent).
pub(crate) fn install_cargo_fuzz() -> anyhow::Result<()> {
    if let Some(version) = cargo_fuzz_version() {
        println!("setup: cargo-fuzz: works ({version})");
        return Ok(());
    }
    println!("setup: cargo-fuzz: missing; installing it");
    cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("setup: could not install cargo-fuzz")?;
    cargo_fuzz_version()
        .map(|_| ())
        .context("setup: cargo-fuzz was installed but `cargo fuzz --version` still fails")
}

/// `cargo +nightly fuzz run TARGET` for `seconds`, on its corpus and the saved inputs.
fn run_command(target: &str, seconds: u64) -> Command {
    let root = cmd::workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    let _ = std::fs::create_dir_all(&corpus);
    let mut command = Command::new("rustup");
    command
        .current_dir(root)
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            // No sanitizer: the targets are safe Rust (no `unsafe` on their paths), where
            // AddressSanitizer finds nothing that a panic or libFuzzer's own limits would
            // not, and an ASan build of the agent's dependencies takes about 11 minutes
            // on a fresh 2-core machine, against about 4 without (coverage still guides).
            "--sanitizer",
            "none",
            target,
        ])
        .arg(&corpus)
        .arg(root.join("tests/fuzz-regressions").join(target))
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
        ])
        // The build and the sanitizer libraries use the nightly toolchain, not the stable
        // one that runs xtask; its own target dir, beside the workspace's.
        .env("CARGO_TARGET_DIR", root.join("target/fuzz"));
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "CARGO"] {
        command.env_remove(key);
    }
    command
}

/// The commands that run `targets` (all when empty) for `seconds` each.
pub(crate) fn commands(targets: &[String], seconds: u64) -> anyhow::Result<Vec<Command>> {
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in &chosen {
        anyhow::ensure!(
            TARGETS.contains(target),
            "unknown fuzz target {target:?} (known: {})",
            TARGETS.join(", ")
        );
    }
    Ok(chosen
        .into_iter()
        .map(|target| run_command(target, seconds))
        .collect())
}

/// `cargo xtask fuzz [TARGET...] [--seconds N]`: a crash stops with libFuzzer's report and
/// the input saved under `fuzz/artifacts/TARGET/`; copy it to `tests/fuzz-regressions/TARGET/`
/// with the fix.
pub(crate) fn fuzz(targets: &[String], seconds: Option<u64>) -> anyhow::Result<()> {
    for mut command in commands(targets, seconds.unwrap_or(DEFAULT_SECONDS))? {
        cmd::run(&mut command).context(
            "a fuzz target failed: its input is under fuzz/artifacts/; copy it to \
             tests/fuzz-regressions/TARGET/ with the fix",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_its_source_and_its_saved_inputs() {
        let root = cmd::workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                root.join(format!("fuzz/fuzz_targets/{target}.rs"))
                    .is_file()
            );
            assert!(root.join("tests/fuzz-regressions").join(target).is_dir());
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target}"
            );
        }
        assert!(commands(&["nope".to_owned()], 1).is_err());
        assert_eq!(commands(&[], 1).unwrap().len(), TARGETS.len());
    }
}
