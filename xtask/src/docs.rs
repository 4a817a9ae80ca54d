//! Man pages and shell completions generated from a clap definition.
//!
//! `cargo xtask dist` runs the `weir-docs` helper (`src/bin/weir-docs.rs`, built with the
//! `docs` feature), which calls [`generate`] on `weir::cli::Cli`: the definition the `weir`
//! binary parses its command line with, so the pages and completions cannot drift from the
//! binary. This module does not depend on `weir`, so its tests run in every
//! `cargo xtask test` (on a small command of their own).
use std::{
    fs::{self, File},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
};

use clap_complete::Shell;

/// Where the man pages go, relative to the install prefix.
pub(crate) const MAN_DIR: &str = "share/man/man1";

/// The shells completions are generated for, and where each file goes relative to the
/// install prefix (the places bash-completion, zsh and fish look under /usr/local/share or
/// /usr/share).
fn completion_files(name: &str) -> [(Shell, String); 3] {
    [
        (
            Shell::Bash,
            format!("share/bash-completion/completions/{name}"),
        ),
        (Shell::Zsh, format!("share/zsh/site-functions/_{name}")),
        (
            Shell::Fish,
            format!("share/fish/vendor_completions.d/{name}.fish"),
        ),
    ]
}

/// Writes under `prefix` one man page per command and visible subcommand (`weir.1`,
/// `weir-agent.1`, `weir-backend-add.1`, ...) and completions for bash, zsh and fish.
/// Returns the files written, relative to `prefix`, sorted.
pub(crate) fn generate(command: clap::Command, prefix: &Path) -> io::Result<Vec<PathBuf>> {
    let name = command.get_name().to_owned();
    let man_dir = prefix.join(MAN_DIR);
    fs::create_dir_all(&man_dir)?;
    clap_mangen::generate_to(command.clone(), &man_dir)?;
    let mut written = Vec::new();
    for entry in fs::read_dir(&man_dir)? {
        let file_name = entry?.file_name();
        if Path::new(&file_name)
            .extension()
            .is_some_and(|ext| ext == "1")
        {
            written.push(Path::new(MAN_DIR).join(file_name));
        }
    }
    for (shell, relative) in completion_files(&name) {
        let path = prefix.join(&relative);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = BufWriter::new(File::create(&path)?);
        clap_complete::generate(shell, &mut command.clone(), &name, &mut file);
        file.flush()?;
        written.push(PathBuf::from(relative));
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    fn command() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .about("A tool.")
            .arg(Arg::new("verbose").long("verbose").num_args(0))
            .subcommand(Command::new("run").about("Runs it."))
            .subcommand(
                Command::new("backend")
                    .about("Backends.")
                    .subcommand(Command::new("add").about("Adds one.")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn writes_a_page_per_visible_command_and_three_completions() {
        let prefix = std::env::temp_dir().join(format!("xtask-docs-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&prefix);
        let written = generate(command(), &prefix).expect("generates");
        let names: Vec<String> = written
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "share/bash-completion/completions/tool",
                "share/fish/vendor_completions.d/tool.fish",
                "share/man/man1/tool-backend-add.1",
                "share/man/man1/tool-backend.1",
                "share/man/man1/tool-run.1",
                "share/man/man1/tool.1",
                "share/zsh/site-functions/_tool",
            ]
        );
        let page = fs::read_to_string(prefix.join("share/man/man1/tool-backend-add.1")).unwrap();
        assert!(page.contains(".TH tool-backend-add 1"), "{page}");
        assert!(page.contains("Adds one."), "{page}");
        let bash = fs::read_to_string(prefix.join(&names[0])).unwrap();
        assert!(
            bash.contains("--verbose") && bash.contains("backend"),
            "{bash}"
        );
        let zsh = fs::read_to_string(prefix.join(&names[6])).unwrap();
        assert!(zsh.starts_with("#compdef tool"), "{zsh}");
        fs::remove_dir_all(&prefix).unwrap();
    }
}
