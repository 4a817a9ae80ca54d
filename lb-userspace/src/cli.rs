//! The command line of the `weir` binary (clap derive). `main.rs` only dispatches; the
//! definitions live here so that tests (and later the man page generator) can use them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, Config, ConfigError, XdpMode};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: a runtime error (the agent or decapsulator failed).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status `EX_USAGE` (sysexits.h): bad command line or invalid config file.
pub const EX_USAGE: u8 = 64;

/// Weir: an XDP layer-4 load balancer.
///
/// `weir agent` balances the traffic of the configured virtual services over their backends;
/// `weir decap` runs on the backends and decapsulates the tunnelled packets.
#[derive(Debug, Parser)]
#[command(name = "weir", version, propagate_version = true)]
pub struct Cli {
    /// Format of the log lines on stderr. The level is set with the RUST_LOG environment
    /// variable (e.g. `RUST_LOG=debug`, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer: attach the XDP program to the configured interface and keep
    /// its maps in sync with the config file until SIGINT or SIGTERM.
    ///
    /// The config file is validated before anything is touched; an invalid file exits
    /// with status 64.
    Agent(AgentArgs),

    /// Run on a backend: attach an XDP program that decapsulates tunnelled packets
    /// addressed to the given VIPs, so the backend sees the client's original packet.
    Decap(DecapArgs),

    /// Work with config files without touching the network.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// Options of `weir agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The TOML config file (see config/example.toml).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Options of `weir decap`.
#[derive(Debug, Args)]
pub struct DecapArgs {
    /// The interface the tunnelled packets arrive on.
    #[arg(short, long, value_name = "IF", value_parser = parse_interface)]
    pub interface: String,

    /// A VIP whose tunnelled packets are decapsulated; repeat for several VIPs (IPv4 or
    /// IPv6). The VIP must also be configured on the backend (e.g. on lo).
    #[arg(long = "vip", value_name = "ADDR", required = true, value_parser = parse_vip)]
    pub vips: Vec<IpAddr>,

    /// How to attach the XDP program: native (driver) mode if available, else generic
    /// (`auto`); driver mode only (`native`); or generic SKB mode (`generic`).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,
}

/// Subcommands of `weir config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate a config file. Prints `FILE: OK (N services, M backends)` and
    /// exits 0, or prints `FILE: KEY: REASON` to stderr and exits 64.
    Check {
        /// The TOML config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Format of the log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The exit status for a command line clap rejected: 0 for `--help` and `--version`,
/// [`EX_USAGE`] otherwise (including a bare `weir`, which prints the help to stderr).
pub fn usage_exit_code(err: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => EXIT_OK,
        _ => EX_USAGE,
    }
}

/// `weir config check`: loads and validates `file`, returning the line to print on success.
pub fn config_check(file: &Path) -> Result<String, ConfigError> {
    let config = config::load(file)?;
    Ok(check_summary(file, &config))
}

/// `FILE: OK (N services, M backends)`.
pub fn check_summary(file: &Path, config: &Config) -> String {
    let services = config.services.len();
    let backends = config.backend_count();
    format!(
        "{}: OK ({services} service{}, {backends} backend{})",
        file.display(),
        plural(services),
        plural(backends)
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn parse_interface(text: &str) -> Result<String, String> {
    config::check_interface_name(text).map(|()| text.to_owned())
}

fn parse_vip(text: &str) -> Result<IpAddr, String> {
    let addr = text
        .parse::<IpAddr>()
        .map_err(|_| format!("invalid IP address \"{text}\""))?;
    config::check_vip(addr).map(|()| addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("weir").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_args() {
        let cli = parse(&["agent", "--config", "/etc/weir/weir.toml"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Text);
        let Command::Agent(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.config, Path::new("/etc/weir/weir.toml"));

        let cli = parse(&["agent", "-c", "w.toml", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = parse(&["--log-format", "json", "agent", "-c", "w.toml"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
    }

    #[test]
    fn agent_without_config_is_a_usage_error() {
        let err = parse(&["agent"]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn decap_args() {
        let cli = parse(&[
            "decap",
            "--interface",
            "eth1",
            "--vip",
            "198.51.100.10",
            "--vip",
            "2001:db8::10",
        ])
        .unwrap();
        let Command::Decap(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.interface, "eth1");
        assert_eq!(
            args.vips,
            [
                "198.51.100.10".parse::<IpAddr>().unwrap(),
                "2001:db8::10".parse().unwrap()
            ]
        );
        assert_eq!(args.xdp_mode, XdpMode::Auto);

        let cli = parse(&[
            "decap",
            "-i",
            "eth1",
            "--vip",
            "198.51.100.10",
            "--xdp-mode",
            "generic",
        ])
        .unwrap();
        let Command::Decap(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.xdp_mode, XdpMode::Generic);
    }

    #[test]
    fn decap_rejects_bad_input() {
        for args in [
            &["decap", "--interface", "eth1"][..],
            &["decap", "--interface", "eth1", "--vip", "198.51.100.x"],
            &["decap", "--interface", "eth1", "--vip", "0.0.0.0"],
            &["decap", "--interface", "eth1", "--vip", "ff02::1"],
            &["decap", "--interface", "", "--vip", "198.51.100.10"],
            &[
                "decap",
                "-i",
                "eth1",
                "--vip",
                "198.51.100.10",
                "--xdp-mode",
                "offload",
            ],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}: {err}");
        }
    }

    #[test]
    fn config_check_args() {
        let cli = parse(&["config", "check", "weir.toml"]).unwrap();
        let Command::Config(ConfigCommand::Check { file }) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(file, Path::new("weir.toml"));
        let err = parse(&["config", "check"]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn help_and_version_exit_zero() {
        for args in [
            &["--help"][..],
            &["-h"],
            &["--version"],
            &["agent", "--help"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EXIT_OK, "{args:?}: {}", err.kind());
        }
    }

    #[test]
    fn bare_weir_is_a_usage_error() {
        let err = parse(&[]).unwrap_err();
        assert_eq!(usage_exit_code(&err), EX_USAGE);
    }

    #[test]
    fn unknown_subcommand_and_flag_are_usage_errors() {
        for args in [
            &["balance"][..],
            &["agent", "--config", "w.toml", "--bogus"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(usage_exit_code(&err), EX_USAGE, "{args:?}");
        }
    }

    #[test]
    fn config_check_of_the_example() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/example.toml"
        ));
        let line = config_check(path).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            line,
            format!("{}: OK (2 services, 5 backends)", path.display())
        );
    }

    #[test]
    fn config_check_of_a_missing_file() {
        let err = config_check(Path::new("/nonexistent/weir.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/weir.toml: "),
            "{err}"
        );
    }
}
