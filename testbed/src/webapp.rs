//! The web backend of the paper bench and the dashboard test: a small Flask app (Debian's
//! `python3-flask`, run by Debian's `/usr/bin/python3` with Werkzeug's threaded server) as
//! in the study Weir grew from. `/` answers a small fixed body, the same on every backend,
//! with an [`crate::qos::BACKEND_HEADER`] header naming the backend; `/backend` answers the
//! name itself. Werkzeug closes every connection after its response: one request per
//! connection, which is what lets an L4 balancer's new-connection counters count requests.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// Debian's interpreter, which is the one `python3-flask` installs for (a `python3` earlier
/// on `PATH`, such as a pyenv shim, may lack Flask or carry another version).
pub const PYTHON: &str = "/usr/bin/python3";

/// The body of `/`, on every backend.
pub const BODY: &str = "Hello from Flask\n";

/// The app: `python3 app.py NAME PORT` serves on every address of its namespace.
pub const APP: &str = r#"import logging
import sys

from flask import Flask, Response

NAME, PORT = sys.argv[1], int(sys.argv[2])
BODY = "Hello from Flask\n"
app = Flask(__name__)


@app.route("/")
def index():
    response = Response(BODY, mimetype="text/plain")
    response.headers["X-Backend"] = NAME
    return response


@app.route("/backend")
def backend():
    return Response(NAME + "\n", mimetype="text/plain")


# One line per request on stderr would cost more than the request itself.
logging.getLogger("werkzeug").setLevel(logging.ERROR)
app.run(host="0.0.0.0", port=PORT, threaded=True)
"#;

/// Writes the app into `dir` (as `flask_app.py`) and returns its path.
pub fn write_app(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("flask_app.py");
    std::fs::write(&path, APP).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// The arguments after [`PYTHON`] that run backend `name` on `port`: unbuffered (`-u`), so
/// that its output is in its log at once.
#[must_use]
pub fn args(app: &Path, name: &str, port: u16) -> Vec<String> {
    vec![
        "-u".to_owned(),
        app.display().to_string(),
        name.to_owned(),
        port.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_answers_the_documented_body_and_header() {
        assert!(APP.contains(&format!("BODY = \"{}\"", BODY.escape_default())));
        assert!(APP.contains(&format!(
            "response.headers[\"{}\"] = NAME",
            crate::qos::BACKEND_HEADER
        )));
    }

    /// The app compiles with Debian's Python, where it is installed (skipped elsewhere).
    #[test]
    fn the_app_is_valid_python() {
        if !Path::new(PYTHON).exists() {
            eprintln!("SKIPPED: no {PYTHON}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("weir-webapp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let app = write_app(&dir).expect("write");
        let out = std::process::Command::new(PYTHON)
            .args(["-m", "py_compile"])
            .arg(&app)
            .output()
            .expect("run python");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
