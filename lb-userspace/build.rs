//! Builds the eBPF object (lb-ebpf, for the BPF target) so a plain `cargo build` works; the
//! agent embeds it with `include_bytes_aligned!`.
//!
//! This is `aya_build::build_ebpf` of aya-build 0.2.0 (the crate this script used to call),
//! specialised to the one package lb-ebpf and the `nightly` toolchain, with a single change:
//! the inner cargo's own output (its `Compiling …` progress, about 40 lines on a first
//! build) is held back and relayed only when the eBPF build fails. aya-build relays every
//! line of it as a `cargo:warning`, which a newcomer's first `cargo build` or
//! `cargo xtask demo` then shows as some 40 warnings about nothing (issue 9). rustc's
//! diagnostics for lb-ebpf's own code (warnings and errors) are relayed as before, at once,
//! and so are the inner cargo's `warning:` lines (e.g. lb-ebpf's build script finding no
//! bpf-linker). Everything else is aya-build's: the environment variables and files that
//! rerun this script, the toolchain (`rustup run nightly`), target, flags and target folder
//! of the inner `cargo build`, and the object copied to `OUT_DIR/lb-ebpf`.
use std::{
    env,
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, anyhow};
use cargo_metadata::{Artifact, CompilerMessage, Message, Target};
use rustc_version::Channel;

/// The package built for the BPF target, and where it lives.
const PACKAGE: &str = "lb-ebpf";
const ROOT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
/// aya-build's `Toolchain::default()`.
const TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    const AYA_BUILD_SKIP: &str = "AYA_BUILD_SKIP";
    println!("cargo:rerun-if-env-changed={AYA_BUILD_SKIP}");
    if let Some(skip) = env::var_os(AYA_BUILD_SKIP)
        && (skip.eq("1") || skip.eq_ignore_ascii_case("true"))
    {
        println!(
            "cargo:warning={AYA_BUILD_SKIP}={}; skipping eBPF build",
            skip.display()
        );
        return Ok(());
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let endian =
        env::var_os("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = if endian == "big" {
        "bpfeb-unknown-none"
    } else if endian == "little" {
        "bpfel-unknown-none"
    } else {
        return Err(anyhow!("unsupported endian={}", endian.display()));
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let bpf_target_arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };

    // `rustup run nightly PROGRAM`, or PROGRAM from the current toolchain without rustup.
    let prefix: Vec<OsString> = match which::which("rustup") {
        Ok(rustup) => vec![rustup.into_os_string(), "run".into(), TOOLCHAIN.into()],
        Err(err) => {
            println!("cargo:warning=which(rustup)={err}; proceeding with current toolchain");
            Vec::new()
        }
    };
    let command = |program: &str| match prefix.split_first() {
        None => Command::new(program),
        Some((wrapper, args)) => {
            let mut command = Command::new(wrapper);
            command.args(args).arg(program);
            command
        }
    };

    let channel = rustc_version::VersionMeta::for_command(command("rustc"))
        .context("failed to get rustc version meta")?
        .channel;
    // RUSTC_BOOTSTRAP "1" or the crate's name enables -Z flags, "-1" forbids them even on
    // nightly; otherwise the compiler's channel decides.
    let use_build_std = match env::var_os("RUSTC_BOOTSTRAP") {
        Some(bootstrap) if bootstrap == "1" || bootstrap == PACKAGE => true,
        Some(bootstrap) if bootstrap == "-1" => false,
        _ => channel == Channel::Nightly,
    };

    // The build-dependency on lb-ebpf reruns this script when its library changes; this
    // covers its binary, the XDP programs.
    println!("cargo:rerun-if-changed={ROOT_DIR}");

    let mut cargo = command("cargo");
    cargo.args([
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--message-format=json",
        "--release",
        "--target",
        target,
    ]);
    if use_build_std {
        cargo.args(["-Z", "build-std=core"]);
    }
    cargo.args(["--features", ""]);
    let mut rustflags = OsString::new();
    for flag in [
        "--cfg=bpf_target_arch=\"",
        bpf_target_arch,
        "\"",
        "\x1f",
        "-Cdebuginfo=2",
        "\x1f",
        "-Clink-arg=--btf",
    ] {
        rustflags.push(flag);
    }
    cargo.env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The toolchain of the outer build must not leak into the nightly one.
    cargo
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    // A target folder of its own: the outer cargo holds the lock on the workspace's one.
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    cargo.arg("--target-dir").arg(&target_dir);

    let mut child = cargo
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to spawn {cargo:?}"))?;
    let stderr = BufReader::new(child.stderr.take().context("the inner cargo's stderr")?);
    // Read on a thread of its own so that neither pipe fills up while the other is read.
    let stderr = thread::spawn(move || -> Vec<String> {
        let mut held = Vec::new();
        // Lossy rather than failing on a line that is not UTF-8: the pipe must be drained
        // to the end or the inner cargo blocks. A read error means the pipe is gone.
        for line in stderr.split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.starts_with("warning:") {
                relay(&line);
            } else {
                held.push(line);
            }
        }
        held
    });

    let stdout = BufReader::new(child.stdout.take().context("the inner cargo's stdout")?);
    let mut held_stdout = Vec::new();
    let mut executables = Vec::new();
    for message in Message::parse_stream(stdout) {
        match message.context("cargo stdout stream contains invalid JSON")? {
            Message::CompilerArtifact(Artifact {
                executable: Some(executable),
                target: Target { name, .. },
                ..
            }) => executables.push((name, executable.into_std_path_buf())),
            Message::CompilerMessage(CompilerMessage { message, .. }) => {
                for line in message.rendered.unwrap_or_default().split('\n') {
                    relay(line);
                }
            }
            Message::TextLine(line) => held_stdout.push(line),
            _ => {}
        }
    }

    let status = child
        .wait()
        .with_context(|| format!("failed to wait for {cargo:?}"))?;
    let held_stderr = stderr
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    if !status.success() {
        for line in held_stdout.iter().chain(&held_stderr) {
            relay(line);
        }
        return Err(anyhow!("{cargo:?} failed: {status:?}"));
    }

    for (name, binary) in executables {
        let dst = out_dir.join(name);
        fs::copy(&binary, &dst)
            .with_context(|| format!("failed to copy {} to {}", binary.display(), dst.display()))?;
    }
    Ok(())
}

/// One line of the inner build's output, shown by cargo as a warning of this package.
fn relay(line: &str) {
    println!("cargo:warning={line}");
}
