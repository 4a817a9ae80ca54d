//! `weir-docs PREFIX`: writes weir's man pages (`PREFIX/share/man/man1/weir*.1`) and its
//! bash, zsh and fish completions (`PREFIX/share/...`), generated from `weir::cli::Cli`, the
//! clap definition the `weir` binary parses its command line with. Prints each file written,
//! relative to `PREFIX`.
//!
//! A helper of `cargo xtask dist`, which runs it as
//! `cargo run -p xtask --features docs --bin weir-docs -- PREFIX` once setup has installed
//! what the `weir` crate's build script needs.
use std::{path::Path, process::ExitCode};

use clap::CommandFactory as _;

#[path = "../docs.rs"]
mod docs;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(prefix), None) = (args.next(), args.next()) else {
        eprintln!("usage: weir-docs PREFIX");
        return ExitCode::from(64);
    };
    match docs::generate(weir::cli::Cli::command(), Path::new(&prefix)) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "weir-docs: writing under {}: {err}",
                Path::new(&prefix).display()
            );
            ExitCode::FAILURE
        }
    }
}
