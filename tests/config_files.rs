//! The config files shipped in `config/` pass `weir config check`, run as the real binary;
//! a broken copy fails with exit status 64 and a message naming the file, the key and the
//! reason. No root needed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const EX_USAGE: i32 = 64;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

fn check(file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["config", "check"])
        .arg(file)
        .env_remove("RUST_LOG")
        .output()
        .expect("run weir config check")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every `config/*.toml`, sorted.
fn shipped_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(config_dir())
        .expect("config/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_passes_config_check() {
    let files = shipped_configs();
    let names: Vec<String> = files
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for expected in ["demo.toml", "demo-nat.toml", "example.toml", "weir.toml"] {
        assert!(
            names.iter().any(|name| name == expected),
            "config/{expected} is missing (found {names:?})"
        );
    }
    for file in &files {
        let output = check(file);
        let stdout = text(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(0),
            "weir config check {}: {}{}",
            file.display(),
            stdout,
            text(&output.stderr)
        );
        assert!(
            stdout.contains(": OK ("),
            "{}: unexpected output {stdout:?}",
            file.display()
        );
    }
}

/// A copy of config/weir.toml with `from` replaced by `to` (exactly once).
fn broken_copy(case: &str, from: &str, to: &str) -> (PathBuf, PathBuf) {
    let original = fs::read_to_string(config_dir().join("weir.toml")).expect("weir.toml");
    assert_eq!(
        original.matches(from).count(),
        1,
        "config/weir.toml should contain {from:?} exactly once"
    );
    let dir = std::env::temp_dir().join(format!("weir-config-files-{}-{case}", std::process::id()));
    fs::create_dir_all(&dir).expect("create the temporary folder");
    let file = dir.join("weir.toml");
    fs::write(&file, original.replacen(from, to, 1)).expect("write the broken copy");
    (dir, file)
}

#[test]
fn a_broken_copy_fails_with_file_key_and_reason() {
    let cases = [
        (
            "ring",
            "ring_size = 65537\n",
            "ring_size = 65536\n",
            "service[0].ring_size",
            "65536 is not prime",
        ),
        (
            "typo",
            "interval = \"2s\"\n",
            "intervall = \"2s\"\n",
            "service[0].health_check.intervall",
            "unknown field",
        ),
        (
            "timeout",
            "timeout = \"1s\"\n",
            "timeout = \"3s\"\n",
            "service[0].health_check.timeout",
            "at most the interval",
        ),
        (
            "metrics",
            "metrics = \"127.0.0.1:9650\"\n",
            "metrics = \"localhost:9650\"\n",
            "agent.metrics",
            "invalid listen address",
        ),
        (
            "socket",
            "api_socket = \"/run/weir/weir.sock\"\n",
            "api_socket = \"weir.sock\"\n",
            "agent.api_socket",
            "must be an absolute path",
        ),
    ];
    for (case, from, to, key, reason) in cases {
        let (dir, file) = broken_copy(case, from, to);
        let output = check(&file);
        let stderr = text(&output.stderr);
        fs::remove_dir_all(&dir).expect("remove the temporary folder");
        assert_eq!(
            output.status.code(),
            Some(EX_USAGE),
            "{case}: expected exit status 64; stderr: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "{case}: nothing on stdout, got {:?}",
            text(&output.stdout)
        );
        let line = stderr.trim_end();
        let prefix = format!("{}: {key}: ", file.display());
        assert!(
            line.starts_with(&prefix),
            "{case}: stderr should start with {prefix:?}: {line:?}"
        );
        assert!(
            line.contains(reason),
            "{case}: stderr should say {reason:?}: {line:?}"
        );
    }
}

/// `bird -p` (parse only) on `config/bird-weir.conf` included the way its header says. BIRD
/// comes with `cargo xtask setup`; without it the check is skipped, except in CI.
#[test]
fn the_bird_snippet_parses() {
    if Command::new("bird").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "bird is not installed (cargo xtask setup installs bird2)"
        );
        eprintln!("SKIPPED the_bird_snippet_parses: bird is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("weir-bird-parse-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let parse = |snippet: &Path| -> Output {
        let main = dir.join("bird.conf");
        fs::write(
            &main,
            format!(
                "define WEIR_TABLE = 100;\nrouter id 198.51.100.1;\ninclude \"{}\";\n\
                 protocol bgp uplink1 from weir_uplink {{\n  local 198.51.100.1 as 65001;\n  \
                 neighbor 198.51.100.254 as 65000;\n}}\n",
                snippet.display()
            ),
        )
        .expect("write bird.conf");
        Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&main)
            .output()
            .expect("run bird -p")
    };
    let shipped = config_dir().join("bird-weir.conf");
    let output = parse(&shipped);
    assert!(
        output.status.success(),
        "bird -p rejects config/bird-weir.conf: {}{}",
        text(&output.stderr),
        text(&output.stdout)
    );
    // The check can fail: a copy with a typo in a protocol option does.
    let broken = dir.join("broken.conf");
    let snippet = fs::read_to_string(&shipped).expect("read the snippet");
    fs::write(&broken, snippet.replace("hold time 3;", "hold tme 3;")).expect("write copy");
    let output = parse(&broken);
    assert!(!output.status.success(), "a broken copy parses");
    let _ = fs::remove_dir_all(&dir);
}
