//! `cargo xtask dist`: a release tarball of weir.
//!
//! Builds `weir` with the release profile, generates its man pages and shell completions
//! from its clap definition (the `weir-docs` helper, see `docs.rs`), and packs
//! `<target dir>/dist/weir-<version>-<arch>-linux.tar.gz` (the target directory as
//! `cargo metadata` reports it, so `CARGO_TARGET_DIR` is respected), with a `.sha256` beside
//! it:
//!
//! ```text
//! weir-0.1.0-x86_64-linux/
//!   bin/weir
//!   share/man/man1/weir.1, weir-agent.1, weir-backend-add.1, ...
//!   share/bash-completion/completions/weir
//!   share/zsh/site-functions/_weir
//!   share/fish/vendor_completions.d/weir.fish
//!   config/weir.service                   systemd unit
//!   config/weir.toml                      commented example config
//!   config/grafana/weir-dashboard.json    Grafana dashboard
//!   config/bird-weir.conf                 BIRD 2 snippet for [announce]
//!   README.md
//! ```
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{cmd, demo};

/// Where weir-docs writes the man pages (`docs::MAN_DIR`).
const MAN_DIR: &str = "share/man/man1";

/// Files copied from the workspace, to the same path inside the tarball.
const FILES: [&str; 5] = [
    "config/weir.service",
    "config/weir.toml",
    "config/grafana/weir-dashboard.json",
    "config/bird-weir.conf",
    "README.md",
];

pub(crate) fn dist() -> anyhow::Result<()> {
    for tool in ["tar", "sha256sum"] {
        if cmd::output(Command::new(tool).arg("--version")).is_none() {
            bail!("`{tool}` not found (Debian: tar, coreutils)");
        }
    }
    let (target_dir, version) = metadata()?;
    let name = format!("weir-{version}-{}-linux", std::env::consts::ARCH);
    let dist_dir = target_dir.join("dist");
    let stage = dist_dir.join(&name);
    let tarball = dist_dir.join(format!("{name}.tar.gz"));

    println!("==> dist: building weir {version} (release)");
    let weir = demo::build_weir(true)?;

    println!("==> dist: staging {}", stage.display());
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("remove {}", stage.display()))?;
    }
    let bin = stage.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    let installed = bin.join("weir");
    fs::copy(&weir, &installed)
        .with_context(|| format!("copy {} to {}", weir.display(), installed.display()))?;
    fs::set_permissions(&installed, fs::Permissions::from_mode(0o755))?;
    for file in FILES {
        let from = cmd::workspace_root().join(file);
        let to = stage.join(file);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        fs::copy(&from, &to).with_context(|| format!("copy {}", from.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))?;
    }

    println!("==> dist: man pages and shell completions from weir's clap definition");
    let mut generate = cmd::cargo();
    generate
        .args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--features",
            "docs",
            "--bin",
            "weir-docs",
            "--",
        ])
        .arg(&stage);
    cmd::run(&mut generate)?;
    let pages = fs::read_dir(stage.join(MAN_DIR))
        .map(|entries| entries.count())
        .unwrap_or(0);
    if pages < 2 {
        bail!("weir-docs wrote {pages} man pages; expected one per subcommand");
    }

    println!("==> dist: packing {}", tarball.display());
    let _ = fs::remove_file(&tarball);
    let file_name = tarball
        .file_name()
        .context("tarball without a file name")?
        .to_owned();
    // Sorted, owned by root: the same tree gives the same listing wherever it is built.
    cmd::run(
        Command::new("tar")
            .current_dir(&dist_dir)
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-czf",
            ])
            .arg(&file_name)
            .arg(&name),
    )?;
    let checksum = Command::new("sha256sum")
        .current_dir(&dist_dir)
        .arg(&file_name)
        .stdin(Stdio::null())
        .output()
        .context("run sha256sum")?;
    if !checksum.status.success() {
        bail!("sha256sum {} failed", tarball.display());
    }
    let sha_file = dist_dir.join(format!("{name}.tar.gz.sha256"));
    fs::write(&sha_file, &checksum.stdout)
        .with_context(|| format!("write {}", sha_file.display()))?;

    let listing = cmd::output(Command::new("tar").arg("-tzvf").arg(&tarball))
        .with_context(|| format!("cannot list {}", tarball.display()))?;
    println!("{listing}");
    let size = fs::metadata(&tarball)?.len();
    println!(
        "==> dist: {} ({:.1} MiB), checksum in {}",
        tarball.display(),
        size as f64 / (1024.0 * 1024.0),
        sha_file.display()
    );
    Ok(())
}

/// Cargo's target directory and the version of the `weir` package (lb-userspace), from
/// `cargo metadata`.
fn metadata() -> anyhow::Result<(PathBuf, String)> {
    let output = cmd::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed ({})", output.status);
    }
    parse_metadata(&String::from_utf8_lossy(&output.stdout))
}

fn parse_metadata(json: &str) -> anyhow::Result<(PathBuf, String)> {
    let metadata: serde_json::Value =
        serde_json::from_str(json).context("cargo metadata printed no JSON")?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata without target_directory")?;
    let version = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "lb-userspace")
        .and_then(|package| package["version"].as_str())
        .context("cargo metadata without the lb-userspace package")?;
    Ok((Path::new(target_dir).to_owned(), version.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_target_dir_and_version() {
        let json = r#"{"packages":[{"name":"lb-common","version":"9.9.9"},
            {"name":"lb-userspace","version":"0.1.0"}],"target_directory":"/tmp/t"}"#;
        let (dir, version) = parse_metadata(json).unwrap();
        assert_eq!(dir, Path::new("/tmp/t"));
        assert_eq!(version, "0.1.0");
        assert!(parse_metadata(r#"{"packages":[],"target_directory":"/t"}"#).is_err());
    }

    #[test]
    fn man_dir_is_where_weir_docs_writes() {
        assert_eq!(MAN_DIR, crate::docs::MAN_DIR);
    }

    #[test]
    fn packed_files_exist() {
        for file in FILES {
            assert!(
                cmd::workspace_root().join(file).is_file(),
                "{file} is missing"
            );
        }
    }
}
