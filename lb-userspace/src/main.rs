//! The `weir` binary: parses the command line, sets up logging and dispatches to the
//! library. Exit status: 0 on success (and for `--help`/`--version`), 64 (`EX_USAGE`) for a
//! bad command line or an invalid config file, 1 for a runtime error; the client commands
//! add 65, 67, 69, 77 and 78 (see `weir::cli` and `weir --help`).
use std::io::{self, BufWriter, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use weir::cli::{
    AgentArgs, AuditCommand, AuditTailArgs, Cli, ClientCommand, Command, ConfigCommand, DecapArgs,
    EX_NOPERM, EX_USAGE, EXIT_FAILURE, LogFormat, Streams,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout, errors to stderr; clap knows which.
            let _ = err.print();
            return ExitCode::from(weir::cli::usage_exit_code(&err));
        }
    };
    init_logging(cli.log_format);

    match cli.command {
        Command::Agent(args) => agent(args),
        Command::Decap(args) => decap(args),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Client(command) => client(&command),
        Command::Teardown(args) => teardown(&args.bpffs, &args.audit_log),
        Command::Audit(AuditCommand::Tail(args)) => audit_tail(&args),
    }
}

fn init_logging(format: LogFormat) {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(err) => (
            EnvFilter::new("info"),
            // An unset RUST_LOG is not worth a warning; a malformed one is.
            std::env::var_os(EnvFilter::DEFAULT_ENV).map(|_| err),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(err) = bad_filter {
        tracing::warn!("ignoring invalid RUST_LOG ({err}); logging at level info");
    }
}

fn agent(args: AgentArgs) -> ExitCode {
    // Validate before touching anything: a bad file is a usage error, not a runtime one.
    let config = match weir::config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return runtime_error(&anyhow::Error::new(err).context("starting the tokio runtime"));
        }
    };
    let config_path: PathBuf = args.config;
    match runtime.block_on(weir::agent::run(config, config_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => runtime_error(&err),
    }
}

fn decap(args: DecapArgs) -> ExitCode {
    let mss = args.mss_setting();
    match weir::decap::run(args.interface, args.vips, args.xdp_mode, mss) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => runtime_error(&err),
    }
}

fn config_check(file: &Path) -> ExitCode {
    match weir::cli::config_check(file) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn client(command: &ClientCommand) -> ExitCode {
    let stdout = io::stdout();
    let terminal = stdout.is_terminal();
    // `weir service table` prints a line per slot: buffer them (run_client flushes).
    let mut out = BufWriter::new(stdout.lock());
    let mut err = io::stderr().lock();
    let code = weir::cli::run_client(
        command,
        &mut Streams {
            out: &mut out,
            err: &mut err,
            terminal,
        },
    );
    ExitCode::from(code)
}

fn audit_tail(args: &AuditTailArgs) -> ExitCode {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match weir::cli::audit_tail(args, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => runtime_error(&err),
    }
}

fn teardown(bpffs: &Path, audit_log: &Path) -> ExitCode {
    let result = weir::datapath::teardown(bpffs);
    if let Some(warning) = weir::cli::audit_teardown(audit_log, bpffs, &result) {
        eprintln!("{warning}");
    }
    match result {
        Ok(()) => {
            println!("{}: XDP program detached and pins removed", bpffs.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            let code = weir::cli::teardown_exit_code(&err);
            let hint = if code == EX_NOPERM {
                " (run as root)"
            } else {
                ""
            };
            eprintln!(
                "error: tearing down the datapath pinned under {}: {err:#}{hint}",
                bpffs.display()
            );
            ExitCode::from(code)
        }
    }
}

fn runtime_error(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(EXIT_FAILURE)
}
