//! Weir's developer and CI entry point: `cargo xtask <command>`.
//!
//! Every command except `setup` runs `setup` first, so a fresh clone (or CI's fresh machine)
//! needs nothing but rustup and this workspace.
mod bench;
mod chart;
mod cmd;
mod demo;
mod dist;
mod fuzz;
// Compiled into the `weir-docs` helper (feature `docs`); here only for its tests.
#[cfg(test)]
mod docs;
mod setup;
mod testing;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Weir's build, test and benchmark tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build and the tests need (idempotent; a fast no-op when done):
    /// Debian packages, rustfmt/clippy, the nightly toolchain with rust-src, bpf-linker,
    /// cargo-fuzz.
    Setup,
    /// Build the host crates (the eBPF object is built by lb-userspace's build script).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run every test tier in order: fmt, clippy, host unit tests, a short fuzz run
    /// (20 s per target), privileged tests.
    ///
    /// The privileged tier (golden-packet and network-namespace tests) needs root. Without
    /// root it is SKIPPED, or FAILS when CI is set.
    Test {
        /// Run only the unprivileged tiers (fmt, clippy, host unit tests).
        #[arg(long)]
        host_only: bool,
        /// Arguments for the privileged tests' harness (a name filter, `--nocapture`, ...),
        /// appended after `--test-threads=1`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run benchmarks: `datapath`, `control`, `agent`, `packets`, `e2e`, `paper` (default: all
    /// of them, in that order). They write docs/BENCHMARKS.md (`paper`: docs/PAPER.md) and the
    /// charts in docs/. All but the Maglev part of `control` need root.
    Bench {
        /// Benchmarks to run; none means all implemented ones.
        names: Vec<String>,
        /// Arguments passed to the benchmark binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the demo: a real `weir agent` balancing 1,000 HTTP requests over three backends,
    /// in network namespaces it creates (`weirdemo-*`) and removes again. Needs root.
    ///
    /// `--clean` does not run setup: it only removes what an earlier demo left.
    Demo {
        /// Leave the namespaces and processes running at the end (and print how to use them).
        #[arg(long)]
        keep: bool,
        /// Remove what a `--keep` (or killed) demo left: stop the processes in `weirdemo-*`
        /// namespaces and delete those namespaces.
        #[arg(long, conflicts_with = "keep")]
        clean: bool,
        /// The same story in `fullnat`: the backends are stock Debian nginx, with nothing of
        /// Weir on them (no VIP, no decap, no route via the balancer).
        #[arg(long, conflicts_with = "clean")]
        nat: bool,
    },
    /// Run the cargo-fuzz targets (`config`, `api_request`, `packet`; default: all) for
    /// `--seconds` each (default 600). A crash stops with the input saved under
    /// fuzz/artifacts/TARGET/.
    Fuzz {
        /// Targets to run; none means all.
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, value_name = "N")]
        seconds: Option<u64>,
    },
    /// Build a release tarball: `weir` (release), its man pages and bash/zsh/fish
    /// completions (generated from its clap definition), the systemd unit, the example
    /// config and the Grafana dashboard, as `<target dir>/dist/weir-VERSION-ARCH-linux.tar.gz`.
    Dist,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Setup => setup::setup().map(|()| ExitCode::SUCCESS),
        Command::Build { release } => {
            setup::setup()?;
            let mut cargo = cmd::cargo();
            cargo.arg("build");
            cmd::host_packages(&mut cargo);
            if release {
                cargo.arg("--release");
            }
            cmd::run(&mut cargo)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { host_only, args } => {
            setup::setup()?;
            testing::test(host_only, &args)
        }
        Command::Bench { names, args } => {
            setup::setup()?;
            bench::bench(&names, &args)
        }
        // Runs setup itself, after its root check (and not for `--clean`).
        Command::Demo { keep, clean, nat } => demo::demo(keep, clean, nat),
        Command::Fuzz { targets, seconds } => {
            setup::setup()?;
            fuzz::fuzz(&targets, seconds).map(|()| ExitCode::SUCCESS)
        }
        Command::Dist => {
            setup::setup()?;
            dist::dist().map(|()| ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_trailing_args() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--host-only",
            "--",
            "golden",
            "--nocapture",
        ])
        .expect("parses");
        match cli.command {
            Command::Test { host_only, args } => {
                assert!(host_only);
                assert_eq!(args, ["golden", "--nocapture"]);
            }
            other => panic!("unexpected command {other:?}"),
        }
    }

    #[test]
    fn demo_flags() {
        let cli = Cli::try_parse_from(["xtask", "demo", "--keep"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Demo {
                keep: true,
                clean: false,
                nat: false
            }
        ));
        assert!(Cli::try_parse_from(["xtask", "demo", "--keep", "--clean"]).is_err());
        let cli = Cli::try_parse_from(["xtask", "demo", "--nat"]).expect("parses");
        assert!(matches!(cli.command, Command::Demo { nat: true, .. }));
        assert!(Cli::try_parse_from(["xtask", "demo", "--nat", "--clean"]).is_err());
    }

    #[test]
    fn bench_takes_names() {
        let cli = Cli::try_parse_from(["xtask", "bench", "datapath", "e2e"]).expect("parses");
        match cli.command {
            Command::Bench { names, args } => {
                assert_eq!(names, ["datapath", "e2e"]);
                assert!(args.is_empty());
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
}
