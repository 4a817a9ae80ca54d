//! The shipped Grafana dashboard (`config/grafana/weir-dashboard.json`) as the tests read it:
//! its panels (rows' nested panels included), a panel by title, its PromQL, and Grafana's
//! variables substituted so that Prometheus can evaluate it. The tests take the queries from
//! the file at run time, never a copy, so that a broken panel fails a test.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The dashboard's location in the repository.
pub fn path() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/grafana/weir-dashboard.json")
}

/// The dashboard, parsed.
pub fn load() -> Result<Value> {
    let path = path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// Every panel, rows' nested panels included, in file order.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The panel titled `title` (exactly one must be).
pub fn panel<'a>(dashboard: &'a Value, title: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = panels(dashboard)
        .into_iter()
        .filter(|p| p["title"].as_str() == Some(title))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => bail!("the dashboard has no panel titled {title:?}"),
        _ => bail!("the dashboard has {} panels titled {title:?}", found.len()),
    }
}

/// The non-empty `targets[].expr` of a panel.
pub fn exprs(panel: &Value) -> Vec<String> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str())
        .filter(|e| !e.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// The one PromQL expression of the panel titled `title`, variables substituted
/// ([`substitute`] with `interval`).
pub fn query(dashboard: &Value, title: &str, interval: &str) -> Result<String> {
    match exprs(panel(dashboard, title)?).as_slice() {
        [one] => Ok(substitute(one, interval)),
        other => bail!("panel {title:?} has {} queries, want one", other.len()),
    }
}

/// Every expression of every panel.
pub fn all_exprs(dashboard: &Value) -> Vec<String> {
    panels(dashboard).into_iter().flat_map(exprs).collect()
}

/// Grafana's variables to PromQL: its built-in interval variables (`$__rate_interval`,
/// `${__range}`, ...) become `interval`, every other variable (the dashboard's `$service`,
/// with "All" selected) `.*`.
pub fn substitute(expr: &str, interval: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').map_or(inner.len(), |e| e);
            let name = inner[..end].split(':').next().unwrap_or("");
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(if name.starts_with("__") {
            interval
        } else {
            ".*"
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The values of a Prometheus instant query's result by their `backend` label (NaN for a
/// value that is not a number).
pub fn by_backend(result: &[Value]) -> BTreeMap<String, f64> {
    result
        .iter()
        .map(|s| {
            (
                s["metric"]["backend"].as_str().unwrap_or("").to_owned(),
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            )
        })
        .collect()
}
