//! `cargo xtask test`: every test tier, in order, with a summary at the end.
use std::process::{Command, ExitCode};

use crate::{cmd, setup::NIGHTLY};

/// lb-userspace's integration test targets (the `[[test]]`s of its Cargo.toml; a test checks
/// that each is in one of these lists). These need no root: stage 3 runs them.
const HOST_TESTS: &[&str] = &["config_files"];
/// These load BPF programs or make network namespaces: stage 4 runs them, as root.
const PRIVILEGED_TESTS: &[&str] = &[
    "golden",
    "e2e_datapath",
    "e2e_agent",
    "e2e_sched",
    "e2e_safety",
    "e2e_mss",
    "e2e_mtu",
    "e2e_nat",
    "e2e_scaleout",
    "e2e_defence",
    "e2e_flood",
    "e2e_dashboard",
];

/// `--test NAME` for each of `names`.
fn test_targets<'a>(names: &[&'a str]) -> Vec<&'a str> {
    names.iter().flat_map(|name| ["--test", name]).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped(String),
    NotRun,
}

struct Stage {
    name: &'static str,
    outcome: Outcome,
}

/// Runs each command (all of them, even after a failure); `Passed` only if all pass.
fn run_all(commands: Vec<Command>) -> Outcome {
    let mut outcome = Outcome::Passed;
    for mut command in commands {
        if let Err(err) = cmd::run(&mut command) {
            eprintln!("xtask: {err:#}");
            outcome = Outcome::Failed;
        }
    }
    outcome
}

fn banner(index: usize, name: &str) {
    println!();
    println!("==> stage {index}: {name}");
}

pub(crate) fn test(host_only: bool, harness_args: &[String]) -> anyhow::Result<ExitCode> {
    let mut stages: Vec<Stage> = Vec::new();

    // 1. Formatting. Independent of everything else, so a failure does not stop the run.
    banner(1, "fmt");
    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--check"]);
    stages.push(Stage {
        name: "fmt",
        outcome: run_all(vec![fmt]),
    });

    // 2. Lints. A failure here is usually a compile error too, so it stops the run.
    banner(2, "clippy");
    let mut clippy = cmd::cargo();
    clippy.arg("clippy");
    cmd::host_packages(&mut clippy);
    clippy.args(["--all-targets", "--", "-D", "warnings"]);
    // xtask's `docs` feature (man pages and completions from the real clap definitions)
    // links the weir crate; lint it too.
    let mut clippy_docs = cmd::cargo();
    clippy_docs.args([
        "clippy",
        "-p",
        "xtask",
        "--features",
        "docs",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    // lb-ebpf is not a host package, so the runs above never see its unsafe code.
    let mut clippy_commands = vec![clippy, clippy_docs];
    clippy_commands.extend(clippy_ebpf());
    let clippy_outcome = run_all(clippy_commands);
    let stop = clippy_outcome == Outcome::Failed;
    stages.push(Stage {
        name: "clippy",
        outcome: clippy_outcome,
    });

    // 3. Host unit tests: no privileges needed.
    if stop {
        stages.push(Stage {
            name: "host unit tests",
            outcome: Outcome::NotRun,
        });
    } else {
        banner(3, "host unit tests");
        let mut common = cmd::cargo();
        common.args(["test", "-p", "lb-common", "--features", "user"]);
        let mut userspace = cmd::cargo();
        userspace
            .args(["test", "-p", "lb-userspace", "--lib", "--bins"])
            .args(test_targets(HOST_TESTS));
        let mut userspace_doc = cmd::cargo();
        userspace_doc.args(["test", "-p", "lb-userspace", "--doc"]);
        let mut testbed = cmd::cargo();
        testbed.args(["test", "-p", "weir-testbed"]);
        let mut xtask = cmd::cargo();
        xtask.args(["test", "-p", "xtask"]);
        let outcome = run_all(vec![common, userspace, userspace_doc, testbed, xtask]);
        stages.push(Stage {
            name: "host unit tests",
            outcome,
        });
    }

    // 3b. Fuzzing: a short bounded run of every cargo-fuzz target (fuzz/).
    if stop {
        stages.push(Stage {
            name: "fuzz",
            outcome: Outcome::NotRun,
        });
    } else {
        banner(3, "fuzz (short run)");
        stages.push(Stage {
            name: "fuzz",
            outcome: run_all(crate::fuzz::commands(&[], crate::fuzz::TEST_SECONDS)?),
        });
    }

    // 4. Privileged tests: golden packets (BPF_PROG_TEST_RUN) and network-namespace
    //    end-to-end tests, i.e. lb-userspace's integration test targets but the host ones.
    //    One at a time: they share the kernel's network state.
    let privileged = "privileged tests";
    let outcome = if stop {
        Outcome::NotRun
    } else {
        match privileged_gate(host_only, cmd::is_root(), cmd::is_ci()) {
            Gate::Skip(reason) => Outcome::Skipped(reason.to_owned()),
            Gate::Fail(reason) => {
                banner(4, privileged);
                eprintln!("xtask: FAILED: {reason}");
                Outcome::Failed
            }
            Gate::Run => {
                banner(4, privileged);
                // By name rather than `--tests`, which would run stage 3's tests again.
                let mut tests = cmd::cargo();
                tests
                    .args(["test", "-p", "lb-userspace"])
                    .args(test_targets(PRIVILEGED_TESTS))
                    .args(["--", "--test-threads=1"])
                    .args(harness_args);
                run_all(vec![tests])
            }
        }
    };
    if let Outcome::Skipped(reason) = &outcome {
        println!();
        println!("==> stage 4: {privileged}: SKIPPED ({reason})");
    }
    stages.push(Stage {
        name: privileged,
        outcome,
    });

    Ok(summary(&stages))
}

/// Clippy on lb-ebpf as aya-build compiles it (lb-userspace/build.rs): the nightly toolchain
/// through `rustup run`, the BPF target of the host's byte order, `-Z build-std=core`, the
/// release profile. aya-ebpf's build script sets `bpf_target_arch` itself when the flag is
/// absent, so no RUSTFLAGS are needed. `cargo xtask setup` adds clippy to nightly.
fn clippy_ebpf() -> Vec<Command> {
    let mut commands = Vec::new();
    let target = if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let mut clippy = Command::new("rustup");
    clippy
        .current_dir(cmd::workspace_root())
        .args([
            "run", NIGHTLY, "cargo", "clippy", "-p", "lb-ebpf", "--lib", "--bins",
        ])
        .args(["--release", "--target", target, "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"]);
    // As aya-build does: the stable rustc that runs xtask must not be used for nightly.
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER"] {
        clippy.env_remove(key);
    }
    commands.push(clippy);
    commands
}

#[derive(Debug, PartialEq, Eq)]
enum Gate {
    Run,
    Skip(&'static str),
    Fail(&'static str),
}

/// Whether the privileged tier runs: it needs root, and CI may not skip it for want of root.
fn privileged_gate(host_only: bool, root: bool, ci: bool) -> Gate {
    if host_only {
        Gate::Skip("--host-only")
    } else if root {
        Gate::Run
    } else if ci {
        Gate::Fail(
            "the privileged tests need root (BPF programs, network namespaces) and CI is set, \
             so they may not be skipped; run as root",
        )
    } else {
        Gate::Skip(
            "not root: they load BPF programs and make network namespaces; run `cargo xtask \
             test` as root to include them",
        )
    }
}

fn summary(stages: &[Stage]) -> ExitCode {
    println!();
    println!("==> summary");
    for (index, stage) in stages.iter().enumerate() {
        let outcome = match &stage.outcome {
            Outcome::Passed => "passed".to_owned(),
            Outcome::Failed => "FAILED".to_owned(),
            Outcome::Skipped(reason) => format!("SKIPPED ({reason})"),
            Outcome::NotRun => "not run (an earlier stage failed)".to_owned(),
        };
        println!("  {}. {:<17} {outcome}", index + 1, stage.name);
    }
    let failed: Vec<&str> = stages
        .iter()
        .filter(|stage| stage.outcome == Outcome::Failed)
        .map(|stage| stage.name)
        .collect();
    if failed.is_empty() {
        println!("xtask test: PASSED");
        ExitCode::SUCCESS
    } else {
        println!("xtask test: FAILED ({})", failed.join(", "));
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `name`s of the `[[test]]` sections of a Cargo.toml.
    fn manifest_test_targets(manifest: &str) -> Vec<&str> {
        let mut names = Vec::new();
        let mut in_test = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_test = line == "[[test]]";
            } else if in_test
                && let Some(value) = line.strip_prefix("name")
                && let Some(value) = value.trim_start().strip_prefix('=')
            {
                names.push(value.trim().trim_matches('"'));
            }
        }
        names
    }

    /// A test target in neither list would be run by no stage.
    #[test]
    fn every_integration_test_target_runs_in_one_stage() {
        let manifest = include_str!("../../lb-userspace/Cargo.toml");
        let mut targets = manifest_test_targets(manifest);
        targets.sort_unstable();
        let mut staged: Vec<&str> = HOST_TESTS.iter().chain(PRIVILEGED_TESTS).copied().collect();
        staged.sort_unstable();
        assert_eq!(
            targets, staged,
            "lb-userspace's [[test]] targets (left) and HOST_TESTS + PRIVILEGED_TESTS of \
             xtask/src/testing.rs (right) differ"
        );
    }

    #[test]
    fn privileged_gate_needs_root_and_ci_may_not_skip() {
        assert_eq!(privileged_gate(false, true, true), Gate::Run);
        assert_eq!(privileged_gate(false, true, false), Gate::Run);
        assert!(matches!(privileged_gate(false, false, true), Gate::Fail(_)));
        assert!(matches!(
            privileged_gate(false, false, false),
            Gate::Skip(_)
        ));
        assert_eq!(privileged_gate(true, true, true), Gate::Skip("--host-only"));
        assert_eq!(
            privileged_gate(true, false, true),
            Gate::Skip("--host-only")
        );
    }

    #[test]
    fn summary_fails_only_on_failed_stages() {
        let stage = |outcome| Stage { name: "x", outcome };
        assert_eq!(
            summary(&[
                stage(Outcome::Passed),
                stage(Outcome::Skipped("why".to_owned()))
            ]),
            ExitCode::SUCCESS
        );
        assert_eq!(
            summary(&[
                stage(Outcome::Passed),
                stage(Outcome::Failed),
                stage(Outcome::NotRun)
            ]),
            ExitCode::FAILURE
        );
    }
}
