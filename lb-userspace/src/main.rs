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
    EX_NOPERM, EX_USAGE, EXIT_FAILURE, LogFormat, Streams, TeardownArgs,
};
use weir::datapath::ports::Release;

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
        Command::Teardown(args) => teardown(&args),
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

/// `weir teardown`: the pinned datapath first (recorded in the audit log), then the SNAT
/// ports the agent reserved (only once the datapath's lock showed that no agent runs it: a
/// running agent's pairs need their ports kept from local sockets). A datapath already gone
/// (its bpffs directory absent) still has its reservations undone; another datapath's
/// record is left alone.
fn teardown(args: &TeardownArgs) -> ExitCode {
    let bpffs = &args.bpffs;
    let pinned = bpffs.exists();
    if pinned {
        let result = weir::datapath::teardown(bpffs);
        if let Some(warning) = weir::cli::audit_teardown(&args.audit_log, bpffs, &result) {
            eprintln!("{warning}");
        }
        if let Err(err) = result {
            return teardown_failed(
                &err,
                &format!("tearing down the datapath pinned under {}", bpffs.display()),
            );
        }
        println!("{}: XDP program detached and pins removed", bpffs.display());
    }
    match weir::datapath::ports::release(&args.state_file, bpffs) {
        Ok(Release::Released {
            record,
            before,
            after,
        }) => {
            println!(
                "{}: removed the SNAT ports the agent reserved from \
                 net.ipv4.ip_local_reserved_ports (was '{before}', now '{after}')",
                record.display()
            );
        }
        Ok(Release::OtherDatapath {
            record,
            bpffs: theirs,
        }) => {
            // Not an error: the state file's default is shared by every datapath's teardown.
            eprintln!(
                "note: {} records SNAT ports of the datapath under {}, not {}: left alone",
                record.display(),
                theirs.display(),
                bpffs.display()
            );
            if !pinned {
                return nothing_to_tear_down(args);
            }
        }
        Ok(Release::NoRecord) if !pinned => return nothing_to_tear_down(args),
        Ok(Release::NoRecord) => {}
        Err(err) => return teardown_failed(&err, "removing the reserved SNAT ports"),
    }
    ExitCode::SUCCESS
}

fn nothing_to_tear_down(args: &TeardownArgs) -> ExitCode {
    eprintln!(
        "error: nothing to tear down: {} does not exist and {} records no reserved ports of it",
        args.bpffs.display(),
        weir::datapath::ports::record_path(&args.state_file).display()
    );
    ExitCode::from(EXIT_FAILURE)
}

fn teardown_failed(err: &anyhow::Error, what: &str) -> ExitCode {
    let code = weir::cli::teardown_exit_code(err);
    let hint = if code == EX_NOPERM {
        " (run as root)"
    } else {
        ""
    };
    eprintln!("error: {what}: {err:#}{hint}");
    ExitCode::from(code)
}

fn runtime_error(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(EXIT_FAILURE)
}
