//! Running the system's network tools (`ip`, `sysctl`, `ethtool`, `ping`): to completion,
//! with a failure reported as an error that carries the command line and its output.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Runs a command to completion; a non-zero exit is an error carrying the command line and
/// its stderr and stdout. Returns stdout.
pub fn run(args: &[&str]) -> Result<String> {
    let (program, rest) = args.split_first().context("empty command")?;
    let out = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "-n", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// `ip netns exec NS ARGS...`, for tools without a namespace option (sysctl, ethtool, ping,
/// curl).
pub fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// Sets sysctls inside a namespace (`sysctl -q -w k=v ...`).
pub fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut all = vec!["sysctl", "-q", "-w"];
    all.extend_from_slice(settings);
    ns_exec(ns, &all).map(drop)
}

/// Whether `ip -n NS -d link show dev IF` shows an XDP program attached.
pub fn xdp_attached(ns: &str, ifname: &str) -> Result<bool> {
    Ok(ip(ns, &["-d", "link", "show", "dev", ifname])?.contains(" xdp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_stdout_and_reports_failures_with_the_command() {
        assert_eq!(run(&["echo", "weir"]).expect("echo runs"), "weir\n");
        let err = run(&["sh", "-c", "echo broken >&2; exit 3"]).expect_err("exit 3 fails");
        let text = format!("{err:#}");
        assert!(
            text.contains("`sh -c echo broken >&2; exit 3` failed"),
            "{text}"
        );
        assert!(text.contains("broken"), "{text}");
        assert!(run(&[]).is_err());
    }
}
