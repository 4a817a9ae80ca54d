//! `cargo xtask test`: every test tier, in order, with a summary at the end.
use std::process::{Command, ExitCode};

use crate::cmd;

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
    let clippy_outcome = run_all(vec![clippy, clippy_docs]);
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
        userspace.args(["test", "-p", "lb-userspace", "--lib", "--bins"]);
        let mut userspace_doc = cmd::cargo();
        userspace_doc.args(["test", "-p", "lb-userspace", "--doc"]);
        let mut testbed = cmd::cargo();
        testbed.args(["test", "-p", "weir-testbed"]);
        let mut xtask = cmd::cargo();
        xtask.args(["test", "-p", "xtask"]);
        stages.push(Stage {
            name: "host unit tests",
            outcome: run_all(vec![common, userspace, userspace_doc, testbed, xtask]),
        });
    }

    // 4. Privileged tests: golden packets (BPF_PROG_TEST_RUN) and network-namespace
    //    end-to-end tests, i.e. lb-userspace's integration test targets. One at a time: they
    //    share the kernel's network state.
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
                // `--tests` runs every integration test target (and the lib/bin unit tests
                // again, which is cheap); unlike `--test '*'` it does not fail when there are
                // none.
                let mut tests = cmd::cargo();
                tests
                    .args([
                        "test",
                        "-p",
                        "lb-userspace",
                        "--tests",
                        "--",
                        "--test-threads=1",
                    ])
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
