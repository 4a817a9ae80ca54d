//! `cargo xtask setup`: installs what the build and the tests need, idempotently.
//!
//! Each step checks first and prints one line saying what it found or did, so a machine that
//! is already set up costs a handful of quick checks.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Debian packages the tests and the demo use: the packages of the programs they run (the
/// demo's `demo::TOOLS`, the tests' `TEST_TOOLS` in this module's tests, which check that
/// each is here), then the benches' peers.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "util-linux",
    "procps",
    "curl",
    "iputils-ping",
    "python3",
    "prometheus",
    // `cargo xtask bench e2e` and `packets`: the peers Weir is compared with, the load
    // generator, and the font of the charts.
    "nginx",
    "libnginx-mod-stream",
    "haproxy",
    "nftables",
    "wrk",
    "fonts-dejavu-core",
    // tests/e2e_scaleout.rs: the BGP speaker of the router and of each balancer
    // (`weir agent`'s `[announce]` feeds it), and its `birdc`.
    "bird2",
    // `cargo xtask bench paper` (the seed paper's experiment): Flask backends, httperf as the
    // load, and the capture it measures from (tcpdump writes it, tshark dissects it).
    "python3-flask",
    "httperf",
    "tcpdump",
    "tshark",
];

/// The compiler of `bench datapath`'s Katran rows (lb-userspace/benches/katran), and the C
/// headers Katran's balancer includes; installed only when `WEIR_KATRAN_SRC` is set (the
/// checkout those rows are built from), so that CI, which runs no bench, does not pay for
/// an LLVM.
const KATRAN_PACKAGES: &[&str] = &["clang-19", "libc6-dev", "linux-libc-dev"];

/// The packages this run of setup wants: [`DEBIAN_PACKAGES`], and [`KATRAN_PACKAGES`] when
/// `WEIR_KATRAN_SRC` is set.
fn wanted_packages() -> Vec<&'static str> {
    let katran = std::env::var_os("WEIR_KATRAN_SRC").is_some_and(|v| !v.is_empty());
    DEBIAN_PACKAGES
        .iter()
        .chain(if katran { KATRAN_PACKAGES } else { &[] })
        .copied()
        .collect()
}

/// Daemons whose Debian packages start a system-wide service on install; the benches and
/// tests run their own instances inside namespaces, so setup stops these right after
/// installing (a BIRD in the root namespace would speak for this host).
/// (package, service): `bird2` installs the `bird` service.
const SERVICES: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    ("bird2", "bird"),
];

/// The toolchain aya-build compiles lb-ebpf with (`rustup run nightly cargo build -Z build-std`).
pub(crate) const NIGHTLY: &str = "nightly";

pub(crate) fn setup() -> anyhow::Result<()> {
    println!("==> setup");
    debian_packages()?;
    host_components()?;
    nightly_toolchain()?;
    rust_src()?;
    nightly_clippy()?;
    bpf_linker()?;
    crate::fuzz::install_cargo_fuzz()?;
    println!("==> setup: done");
    Ok(())
}

fn step(message: &str) {
    println!("setup: {message}");
}

fn debian_packages() -> anyhow::Result<()> {
    let packages = wanted_packages();
    if cmd::output(Command::new("dpkg-query").arg("--version")).is_none() {
        step(&format!(
            "debian packages: dpkg-query not found (not Debian?); SKIPPED, make sure these are installed: {}",
            packages.join(" ")
        ));
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        step(&format!(
            "debian packages: all installed ({})",
            packages.join(" ")
        ));
        return Ok(());
    }
    let missing = missing.join(" ");
    if !cmd::is_root() {
        bail!(
            "setup: debian packages missing: {missing}; installing them needs root: run \
             `cargo xtask setup` as root, or `sudo apt-get install {missing}`"
        );
    }
    step(&format!("debian packages: missing {missing}; installing"));
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("setup: apt-get update failed")?;
    // tshark's wireshark-common asks whether non-root users may capture; answer it before
    // the install (no, the default: the benches capture as root), so nothing waits for a
    // terminal even where DEBIAN_FRONTEND is ignored.
    if missing.split(' ').any(|p| p == "tshark") {
        cmd::run_with_input(
            &mut Command::new("debconf-set-selections"),
            b"wireshark-common wireshark-common/install-setuid boolean false\n",
        )
        .context("setup: debconf-set-selections failed")?;
    }
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing.split(' '))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("setup: apt-get install failed")?;
    let still_missing: Vec<&str> = missing
        .split(' ')
        .filter(|package| !debian_package_installed(package))
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "setup: debian packages still missing after apt-get install: {}",
            still_missing.join(" ")
        );
    }
    step(&format!("debian packages: installed {missing}"));
    for (package, service) in SERVICES {
        if missing.split(' ').any(|p| p == *package) {
            // Best effort: where no init system runs (containers) there is nothing to stop.
            let stopped = cmd::output(Command::new("invoke-rc.d").args([service, "stop"]));
            step(&format!(
                "debian packages: {service} service {}",
                if stopped.is_some() {
                    "stopped (the benches start their own)"
                } else {
                    "not running"
                }
            ));
        }
    }
    Ok(())
}

fn debian_package_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]))
        .is_some_and(|status| status == "installed")
}

fn rustup_available() -> anyhow::Result<()> {
    if cmd::output(Command::new("rustup").arg("--version")).is_none() {
        bail!(
            "setup: rustup not found on PATH; it is required (aya-build runs `rustup run nightly \
             cargo` to build the eBPF object); install rustup and re-run"
        );
    }
    Ok(())
}

/// rustfmt and clippy for the toolchain that builds the host crates.
fn host_components() -> anyhow::Result<()> {
    let fmt = cmd::output(cmd::cargo().args(["fmt", "--version"]));
    let clippy = cmd::output(cmd::cargo().args(["clippy", "--version"]));
    if let (Some(fmt), Some(clippy)) = (&fmt, &clippy) {
        step(&format!("rustfmt and clippy: present ({fmt}; {clippy})"));
        return Ok(());
    }
    rustup_available()?;
    step("rustfmt and clippy: missing; installing with rustup");
    cmd::run(
        Command::new("rustup")
            .args(["component", "add", "rustfmt", "clippy"])
            .current_dir(cmd::workspace_root()),
    )
    .context("setup: could not add rustfmt and clippy")?;
    Ok(())
}

fn nightly_toolchain() -> anyhow::Result<()> {
    rustup_available()?;
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("setup: `rustup toolchain list` failed")?;
    let installed = toolchains.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or_default();
        name == NIGHTLY || name.starts_with(&format!("{NIGHTLY}-"))
    });
    if installed {
        let version =
            cmd::output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"]))
                .unwrap_or_else(|| "version unknown".to_owned());
        step(&format!("nightly toolchain: present ({version})"));
        return Ok(());
    }
    step("nightly toolchain: missing; installing");
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
    ]))
    .context("setup: could not install the nightly toolchain")?;
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .context("setup: `rustup component list --toolchain nightly --installed` failed")?;
    if components.lines().any(|line| line.trim() == "rust-src") {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("nightly rust-src: missing; installing");
    cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("setup: could not add rust-src to the nightly toolchain")?;
    Ok(())
}

/// Clippy for the nightly toolchain: `cargo xtask test` lints lb-ebpf for the BPF target
/// with it, and the minimal profile `nightly_toolchain` installs comes without it.
fn nightly_clippy() -> anyhow::Result<()> {
    if let Some(version) =
        cmd::output(Command::new("rustup").args(["run", NIGHTLY, "cargo", "clippy", "--version"]))
    {
        step(&format!("nightly clippy: present ({version})"));
        return Ok(());
    }
    step("nightly clippy: missing; installing");
    cmd::run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", NIGHTLY]))
        .context("setup: could not add clippy to the nightly toolchain")?;
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    cmd::output(Command::new("bpf-linker").arg("--version"))
}

/// bpf-linker, built against the nightly toolchain's own LLVM (Debian's LLVM is too old for
/// the bitcode rustc emits).
fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = bpf_linker_version() {
        step(&format!("bpf-linker: works ({version})"));
        return Ok(());
    }
    step("bpf-linker: missing or broken; building it against the nightly toolchain's LLVM");

    let sysroot =
        cmd::output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
            .context("setup: `rustup run nightly rustc --print sysroot` failed")?;
    let lib_dir = Path::new(&sysroot).join("lib");
    let (llvm_lib, major) = find_llvm_lib(&lib_dir)?;
    let soname = llvm_lib
        .file_name()
        .context("setup: libLLVM path has no file name")?
        .to_owned();

    // The linker records this folder as its RUNPATH, so it must outlive the build: keep it
    // under CARGO_HOME, one folder per LLVM library, rather than in a temporary folder.
    let prefix = cmd::cargo_home()?.join("weir-llvm-prefix").join(&soname);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("setup: could not create {}", prefix_lib.display()))?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(&soname)] {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link)
                .with_context(|| format!("setup: could not remove {}", link.display()))?;
        }
        symlink(&llvm_lib, &link).with_context(|| {
            format!(
                "setup: could not link {} -> {}",
                link.display(),
                llvm_lib.display()
            )
        })?;
    }
    step(&format!(
        "bpf-linker: LLVM {major} from {}, prefix {}",
        llvm_lib.display(),
        prefix.display()
    ));

    let feature = format!("llvm-{major}");
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--no-default-features",
                "--features",
                &feature,
            ])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("setup: could not build bpf-linker")?;

    match bpf_linker_version() {
        Some(version) => {
            step(&format!("bpf-linker: installed ({version})"));
            Ok(())
        }
        None => bail!(
            "setup: bpf-linker was installed into {} but `bpf-linker --version` still fails; \
             is that folder on PATH?",
            cmd::cargo_home()?.join("bin").display()
        ),
    }
}

/// Finds the toolchain's `libLLVM.so.<major>.<minor>-rust-<version>` (named by its SONAME) and
/// returns it with its LLVM major version.
fn find_llvm_lib(lib_dir: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let entries = fs::read_dir(lib_dir)
        .with_context(|| format!("setup: could not read {}", lib_dir.display()))?;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("setup: could not read {}", lib_dir.display()))?;
        let name = entry.file_name();
        if let Some(major) = llvm_major(&name.to_string_lossy()) {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "setup: no libLLVM.so.<version>-rust-* in {}; cannot build bpf-linker",
        lib_dir.display()
    )
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    if !version.contains("-rust-") {
        return None;
    }
    version.split(['.', '-']).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs the privileged tests run (tests/common: `ip`, `ip netns exec … ethtool`,
    /// `sysctl`, `ping`, `nsenter`, `/usr/bin/prometheus`), each with the Debian package that
    /// provides it.
    const TEST_TOOLS: &[(&str, &str)] = &[
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("sysctl", "procps"),
        ("ping", "iputils-ping"),
        ("nsenter", "util-linux"),
        ("prometheus", "prometheus"),
    ];

    /// The demo runs setup and then needs its tools: a tool whose package setup does not
    /// install works on a developer's machine and fails on a fresh one (issue 9).
    #[test]
    fn every_tool_of_the_demo_and_the_tests_comes_from_a_package_setup_installs() {
        for (tool, package) in crate::demo::TOOLS.iter().chain(TEST_TOOLS) {
            assert!(
                DEBIAN_PACKAGES.contains(package),
                "{tool} comes from the Debian package {package}, which setup does not install \
                 (add it to DEBIAN_PACKAGES)"
            );
        }
    }

    #[test]
    fn llvm_major_reads_the_soname() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.23.0-rust-1.99.0-nightly"), Some(23));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(llvm_major("libLLVM.so"), None);
        assert_eq!(llvm_major("librustc_driver-b5a965480ee51f9a.so"), None);
    }
}
