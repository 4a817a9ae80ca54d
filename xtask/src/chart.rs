//! Charts of the benchmark results: horizontal bars (median) with min–max whiskers, drawn
//! from the JSON file a bench writes (`WEIR_BENCH_JSON`), into docs/*.png.
use std::path::Path;

use anyhow::{Context as _, bail};
use plotters::{prelude::*, style::FontStyle};
use serde_json::Value;

/// The font the charts are drawn with (Debian's fonts-dejavu-core, installed by setup).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const WEIR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const PEER: RGBColor = RGBColor(0x9a, 0x9a, 0x9a);
const REFERENCE: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

/// One bar: a label, the median and the range, and its colour.
struct Bar {
    label: String,
    median: f64,
    min: f64,
    max: f64,
    color: RGBColor,
}

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT)
            .map_err(|e| format!("{FONT}: {e} (install fonts-dejavu-core: cargo xtask setup)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn bars(rows: &[Value], key: &str, color: impl Fn(&str) -> RGBColor) -> Vec<Bar> {
    rows.iter()
        .filter_map(|r| {
            let name = r["name"].as_str()?;
            let v = &r[key];
            Some(Bar {
                label: r["label"].as_str().unwrap_or(name).to_owned(),
                median: v["median"].as_f64()?,
                min: v["min"].as_f64()?,
                max: v["max"].as_f64()?,
                color: color(name),
            })
        })
        .collect()
}

/// Draws one panel of horizontal bars into `area`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    bars: &[Bar],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    if bars.is_empty() {
        return Ok(());
    }
    let n = bars.len();
    let top = bars
        .iter()
        .map(|b| b.max.max(b.median))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.18;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        // About 7 px per character of the longest label at 13 px.
        .y_label_area_size(
            u32::try_from(labels.iter().map(|l| l.chars().count()).max().unwrap_or(10) * 7 + 24)
                .unwrap_or(250),
        )
        // A segmented range `0..k` has the k + 1 segments 0..=k.
        .build_cartesian_2d(0.0..top, (0..n - 1).into_segmented())
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .x_labels(6)
        .y_labels(n)
        .y_label_formatter(&|v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => (n - 1)
                .checked_sub(*i)
                .and_then(|j| labels.get(j))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("chart mesh: {e}"))?;
    // The first bar at the top.
    let row = |i: usize| n - 1 - i;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let y = row(i);
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (b.median, SegmentValue::Exact(y + 1)),
                ],
                b.color.filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            bar
        }))
        .map_err(|e| anyhow::anyhow!("chart bars: {e}"))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let y = row(i);
            PathElement::new(
                vec![
                    (b.min, SegmentValue::CenterOf(y)),
                    (b.max, SegmentValue::CenterOf(y)),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(|e| anyhow::anyhow!("chart whiskers: {e}"))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let y = row(i);
            let decimals = if top < 20.0 { 2 } else { 1 };
            Text::new(
                format!("{:.decimals$}", b.median),
                (b.max.max(b.median) + top * 0.01, SegmentValue::CenterOf(y)),
                ("sans-serif", 13).into_font().color(&BLACK),
            )
        }))
        .map_err(|e| anyhow::anyhow!("chart values: {e}"))?;
    Ok(())
}

fn load(json: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))
}

/// Draws the chart of a bench's results (`e2e`, `packets` or `paper`) into `out`.
pub(crate) fn draw(json: &Path, out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let v = load(json)?;
    let rows = v["rows"].as_array().context("no rows in the results")?;
    let machine = v["machine"].as_str().unwrap_or("");
    // Taller with more rows (the NAT modes added some), so that bars and labels stay legible.
    let height = |base: u32, per_row: u32| {
        let n = u32::try_from(rows.len()).unwrap_or(u32::MAX);
        base.max(per_row.saturating_mul(n).saturating_add(120))
    };
    match v["bench"].as_str() {
        Some("e2e") => {
            let color = |name: &str| {
                if name.starts_with("weir") {
                    WEIR
                } else if name == "direct" {
                    REFERENCE
                } else {
                    PEER
                }
            };
            let root = BitMapBackend::new(out, (1400, height(520, 50))).into_drawing_area();
            root.fill(&WHITE)?;
            let (title, body) = root.split_vertically(36);
            title.titled(
                &format!("bench e2e: machine CPU per request and per connection ({machine})"),
                ("sans-serif", 15),
            )?;
            let (left, right) = body.split_horizontally(700);
            panel(
                &left,
                "keep-alive: CPU per request",
                "CPU µs per request (median, min–max)",
                &bars(rows, "cpu_us_per_request", color),
            )?;
            panel(
                &right,
                "Connection: close: CPU per connection",
                "CPU µs per connection (median, min–max)",
                &bars(rows, "cpu_us_per_connection", color),
            )?;
            root.present()?;
        }
        Some("packets") => {
            let color = |name: &str| {
                if name.starts_with("weir") {
                    WEIR
                } else if name == "xdp-drop" || name.starts_with("xdp-") {
                    REFERENCE
                } else {
                    PEER
                }
            };
            let root = BitMapBackend::new(out, (1100, height(480, 36))).into_drawing_area();
            root.fill(&WHITE)?;
            let (title, body) = root.split_vertically(36);
            title.titled(
                &format!("bench packets: 60-byte UDP, 1,000 flows, one core ({machine})"),
                ("sans-serif", 15),
            )?;
            panel(
                &body,
                "packets per second delivered (at the backends; replies at the client)",
                "Mpps (median, min–max)",
                &bars(rows, "mpps", color),
            )?;
            root.present()?;
        }
        Some("paper") => {
            let color = |name: &str| {
                if name.starts_with("none") {
                    REFERENCE
                } else if name.starts_with("nginx") {
                    PEER
                } else {
                    WEIR
                }
            };
            // One client address and 50: the rows of each mode, in the bench's order.
            let mode = |clients: &str| -> Vec<Value> {
                rows.iter()
                    .filter(|r| r["clients"].as_str() == Some(clients))
                    .cloned()
                    .collect()
            };
            let (one, fifty) = (mode("1"), mode("50"));
            let n = one.len().max(fifty.len()).max(1);
            let height = u32::try_from(n * 26 + 120).unwrap_or(600);
            let root = BitMapBackend::new(out, (2100, height)).into_drawing_area();
            root.fill(&WHITE)?;
            let (title, body) = root.split_vertically(36);
            title.titled(
                &format!(
                    "bench paper: Flask behind each balancer, httperf, capture on the client ({machine})"
                ),
                ("sans-serif", 15),
            )?;
            let (left, rest) = body.split_horizontally(700);
            let (middle, right) = rest.split_horizontally(700);
            panel(
                &left,
                "delay, one client address",
                "mean delay per run, ms (median of runs, min–max)",
                &bars(&one, "delay_ms", color),
            )?;
            panel(
                &middle,
                "delay, 50 client addresses",
                "mean delay per run, ms (median of runs, min–max)",
                &bars(&fifty, "delay_ms", color),
            )?;
            let balancers: Vec<Value> = one
                .iter()
                .filter(|r| r["baseline"].as_bool() != Some(true))
                .cloned()
                .collect();
            panel(
                &right,
                "balancer CPU per request, one client address",
                "CPU µs per request (median of runs, min–max)",
                &bars(&balancers, "cpu_us_per_request", color),
            )?;
            root.present()?;
        }
        other => bail!("no chart for results of bench {other:?}"),
    }
    println!("chart written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(v: f64) -> Value {
        serde_json::json!({ "median": v, "min": v * 0.9, "max": v * 1.1 })
    }

    /// Draws every chart from made-up results (skipped without the font).
    #[test]
    fn draws_every_chart() {
        if !Path::new(FONT).is_file() {
            eprintln!("SKIPPED: {FONT} missing");
            return;
        }
        let dir = std::env::temp_dir().join(format!("weir-chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let e2e = serde_json::json!({
            "bench": "e2e", "machine": "test machine",
            "rows": [
                { "name": "direct", "label": "direct", "cpu_us_per_request": spread(10.0),
                  "cpu_us_per_connection": spread(50.0) },
                { "name": "weir-direct", "label": "Weir", "cpu_us_per_request": spread(10.5),
                  "cpu_us_per_connection": spread(52.0) },
                { "name": "haproxy", "label": "HAProxy", "cpu_us_per_request": spread(18.0),
                  "cpu_us_per_connection": null },
            ]
        });
        let packets = serde_json::json!({
            "bench": "packets", "machine": "test machine",
            "rows": [
                { "name": "xdp-drop", "label": "ceiling", "mpps": spread(12.5) },
                { "name": "weir-tunnel", "label": "Weir", "mpps": spread(8.0) },
                { "name": "nft-numgen", "label": "nftables", "mpps": null },
            ]
        });
        let paper = serde_json::json!({
            "bench": "paper", "machine": "test machine",
            "rows": [
                { "name": "none-a", "label": "no balancer → Flask A", "clients": "1",
                  "baseline": true, "delay_ms": spread(1.0), "cpu_us_per_request": spread(0.0) },
                { "name": "nginx-rr", "label": "NGINX, round robin", "clients": "1",
                  "baseline": false, "delay_ms": spread(1.6), "cpu_us_per_request": spread(170.0) },
                { "name": "fullnat-rr", "label": "Weir fullnat, round robin", "clients": "1",
                  "baseline": false, "delay_ms": spread(0.8), "cpu_us_per_request": spread(10.0) },
                { "name": "fullnat-rr", "label": "Weir fullnat, round robin", "clients": "50",
                  "baseline": false, "delay_ms": spread(0.9), "cpu_us_per_request": null },
            ]
        });
        for (name, value) in [("e2e", e2e), ("packets", packets), ("paper", paper)] {
            let json = dir.join(format!("{name}.json"));
            std::fs::write(&json, value.to_string()).expect("write json");
            let png = dir.join(format!("{name}.png"));
            draw(&json, &png).expect("draw");
            let bytes = std::fs::read(&png).expect("png");
            assert!(bytes.starts_with(b"\x89PNG"), "{name}: not a PNG");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
