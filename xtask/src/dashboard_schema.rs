//! The Grafana dashboard (`config/grafana/weir-dashboard.json`) checked against Grafana's
//! published dashboard schema: the `Dashboard` type of `@grafana/schema` (Grafana's schema
//! library on npm, generated from its CUE schema; the classic JSON model), checked by the
//! TypeScript compiler. The Grafana server itself is not installable here, and no JSON Schema
//! of the dashboard is published; the TypeScript types are the schema Grafana ships.
//!
//! `cargo xtask setup` installs the two npm packages ([`PACKAGES`], pinned) into a folder of
//! their own under `CARGO_HOME` ([`tools_dir`]); `cargo xtask test` writes the dashboard as a
//! TypeScript constant of type `Dashboard` ([`check_source`]) and runs `tsc --noEmit --strict`
//! on it: a missing required field, a wrong type, or a field the schema does not know (an
//! object literal's excess property) fails the check.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cmd;

/// The npm packages of the check, pinned.
pub(crate) const PACKAGES: [&str; 2] = ["typescript@5.9.3", "@grafana/schema@13.2.3"];

/// The `Dashboard` type inside `@grafana/schema`.
const DASHBOARD_TYPES: &str = "@grafana/schema/dist/types/raw/dashboard/x/types.gen";

/// Where setup installs [`PACKAGES`]: one folder per set of pins, so a change of pin
/// installs afresh.
pub(crate) fn tools_dir() -> anyhow::Result<PathBuf> {
    let pins = PACKAGES.join("+").replace(['@', '/'], "_");
    Ok(cmd::cargo_home()?.join("weir-npm").join(pins))
}

/// The compiler inside [`tools_dir`].
fn tsc(dir: &Path) -> PathBuf {
    dir.join("node_modules/typescript/bin/tsc")
}

/// Whether setup has installed the packages into `dir`.
pub(crate) fn installed(dir: &Path) -> bool {
    tsc(dir).is_file()
        && dir
            .join("node_modules")
            .join(format!("{DASHBOARD_TYPES}.d.ts"))
            .is_file()
}

/// The TypeScript that type-checks `dashboard` (the file's JSON) against `Dashboard`.
///
/// `__inputs` is left out: it is the wrapper Grafana adds when it exports a dashboard for
/// sharing (data sources to ask for on import), not part of the dashboard model. The schema's
/// string enums (`MappingType`, `ThresholdsMode`, ...) are TypeScript enums, which a JSON
/// string cannot be assigned to; `Loose` turns each into the union of its values, which is
/// what the JSON model holds.
pub(crate) fn check_source(dashboard: &Value, types: &Path) -> anyhow::Result<String> {
    let mut model = dashboard.clone();
    let object = model
        .as_object_mut()
        .context("the dashboard is not a JSON object")?;
    object.remove("__inputs");
    let json = serde_json::to_string_pretty(&model)?;
    Ok(format!(
        "import type {{ Dashboard }} from {types:?};\n\n\
         type Loose<T> = T extends string\n  ? `${{T}}`\n  : T extends Array<infer U>\n    \
         ? Array<Loose<U>>\n    : T extends object\n      ? {{ [K in keyof T]: Loose<T[K]> }}\n      : T;\n\n\
         const board: Loose<Dashboard> = {json};\n\nexport default board;\n",
        types = types.display().to_string()
    ))
}

/// `node tsc --noEmit --strict` on the check of the repository's dashboard, written into a
/// temporary folder.
pub(crate) fn command() -> anyhow::Result<Command> {
    let dir = tools_dir()?;
    if !installed(&dir) {
        bail!(
            "dashboard schema check: {} not installed in {}; run `cargo xtask setup`",
            PACKAGES.join(" "),
            dir.display()
        );
    }
    let path = cmd::workspace_root().join("config/grafana/weir-dashboard.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let work = std::env::temp_dir().join(format!("weir-dashboard-schema-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let check = work.join("weir-dashboard.ts");
    let types = dir.join("node_modules").join(DASHBOARD_TYPES);
    std::fs::write(&check, check_source(&dashboard, &types)?)
        .with_context(|| format!("writing {}", check.display()))?;
    let mut tsc_run = Command::new("node");
    tsc_run
        .arg(tsc(&dir))
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2020",
            "--moduleResolution",
            "node",
        ])
        .arg(&check);
    Ok(tsc_run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_types_the_model_without_the_export_wrapper() {
        let board = serde_json::json!({
            "__inputs": [{ "name": "DS_PROMETHEUS" }],
            "title": "t",
            "schemaVersion": 39,
        });
        let ts = check_source(&board, Path::new("/x/types.gen")).expect("source");
        assert!(ts.starts_with("import type { Dashboard } from \"/x/types.gen\";"));
        assert!(ts.contains("const board: Loose<Dashboard> = {"));
        assert!(ts.contains("\"schemaVersion\": 39"));
        assert!(!ts.contains("__inputs"), "{ts}");
        assert!(check_source(&serde_json::json!([1]), Path::new("/x")).is_err());
    }

    #[test]
    fn tools_dir_names_the_pins() {
        let dir = tools_dir().expect("CARGO_HOME or HOME");
        let name = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.contains("typescript_5.9.3"), "{name}");
        assert!(!name.contains('/'));
    }
}
