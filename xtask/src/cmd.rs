//! Small helpers around `std::process::Command`.
use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The host crates. lb-ebpf is left out: it only builds for the BPF target (lb-userspace's
/// build script does that), so `--workspace` would try to build it for the host.
pub(crate) const HOST_PACKAGES: [&str; 4] = ["lb-common", "lb-userspace", "weir-testbed", "xtask"];

/// The workspace root (the parent of this crate's folder).
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// The cargo that runs us (`$CARGO`, set by `cargo run`), else `cargo` from `PATH`.
pub(crate) fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    command
}

/// Adds `-p <pkg>` for every host package.
pub(crate) fn host_packages(command: &mut Command) {
    for package in HOST_PACKAGES {
        command.args(["-p", package]);
    }
}

/// The command line, for messages.
pub(crate) fn display(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    if let Some(name) = Path::new(&line).file_name() {
        line = name.to_string_lossy().into_owned();
    }
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains([' ', '*', '\'', '"']) {
            line.push_str(&format!(" '{arg}'"));
        } else {
            line.push(' ');
            line.push_str(&arg);
        }
    }
    line
}

/// Prints and runs `command` with inherited stdio; errors unless it exits with 0.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let line = display(command);
    println!("$ {line}");
    let status = command
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// As [`run`], with `input` written to the command's stdin.
pub(crate) fn run_with_input(command: &mut Command, input: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let line = display(command);
    println!("$ {line}");
    let mut child = command
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    // Dropped at the end of the block: the command sees the end of its input.
    {
        let mut stdin = child.stdin.take().context("no stdin pipe")?;
        stdin
            .write_all(input)
            .with_context(|| format!("writing to `{line}`"))?;
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` quietly and returns its stdout, or `None` if it cannot start or fails.
pub(crate) fn output(command: &mut Command) -> Option<String> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Whether the effective user is root (read from `/proc/self/status`).
pub(crate) fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

/// Whether we run under CI (`CI` set to anything but empty, `0` or `false`).
pub(crate) fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| {
        let value = value.trim();
        !value.is_empty() && value != "0" && !value.eq_ignore_ascii_case("false")
    })
}

/// `$CARGO_HOME`, else `~/.cargo`.
pub(crate) fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_globs_and_spaces() {
        let mut command = Command::new("/usr/bin/cargo");
        command.args(["test", "--test", "*", "--", "a b"]);
        assert_eq!(display(&command), "cargo test --test '*' -- 'a b'");
    }

    #[test]
    fn workspace_root_has_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
