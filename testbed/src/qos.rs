//! The paper bench's measurements, as pure functions: per-backend quality of service from a
//! capture dissected by tshark ([`TSHARK_FIELDS`] → [`analyse`]), and httperf's summary
//! ([`parse_httperf`]). `cargo xtask bench paper` runs the tools; this only reads their output,
//! so its rules are unit-tested on the host.
//!
//! Definitions (what docs/PAPER.md reports, per backend of one run):
//!
//! * **backend**: the `X-Backend` header of the HTTP response; a connection without a
//!   response belongs to no backend and counts as unanswered;
//! * **request share**: the backend's responses over all responses;
//! * **throughput**: the bits of every captured frame of the backend's connections (both
//!   directions, Ethernet frames as captured) over the whole capture's duration;
//! * **loss**: frames tshark flags as retransmitted (`tcp.analysis.retransmission`, fast and
//!   spurious ones included) plus gaps it detects (`tcp.analysis.lost_segment`), over the
//!   backend's frames, in percent; except on a connection whose client port was used before in
//!   the capture (`tcp.analysis.reused_ports`): there the backend may still hold the old
//!   connection in TIME_WAIT and answer the new SYN with a stale ACK (the client resets it
//!   and sends its SYN again), and tshark, taking both for one stream, flags the new
//!   connection's segments as retransmissions. Such connections are counted apart
//!   ([`BackendQos::reused_ports`]), their flags not as loss;
//! * **delay**: from the request to its response (`http.time`: the frame that completes the
//!   response, minus the request's), mean in ms;
//! * **jitter**: the mean of |d(i) − d(i−1)| over the backend's delays in the order the
//!   responses arrived (the mean variation of delay, without RFC 3550's smoothing), in ms.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};

/// The fields `tshark -T fields -E separator=/t -E occurrence=a -E aggregator='|'` must print,
/// in this order, for [`analyse`].
pub const TSHARK_FIELDS: [&str; 10] = [
    "frame.time_epoch",
    "tcp.stream",
    "frame.len",
    "http.request",
    "http.response.code",
    "http.time",
    "http.response.line",
    "tcp.analysis.retransmission",
    "tcp.analysis.lost_segment",
    "tcp.analysis.reused_ports",
];

/// The response header that names the backend which answered.
pub const BACKEND_HEADER: &str = "X-Backend";

/// What one backend did in one capture.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendQos {
    pub responses: u64,
    /// Share of all responses, 0..=1.
    pub share: f64,
    pub frames: u64,
    pub bytes: u64,
    pub throughput_mbps: f64,
    /// Retransmitted or missing segments, percent of `frames`.
    pub loss_percent: f64,
    pub lost_frames: u64,
    /// Connections on a client port used before in the capture (see the module docs).
    pub reused_ports: u64,
    /// Mean request-to-response time, ms (`None` without responses).
    pub delay_ms: Option<f64>,
    /// Mean absolute difference of consecutive delays, ms (`None` below two responses).
    pub jitter_ms: Option<f64>,
}

/// One capture's analysis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptureQos {
    /// By the `X-Backend` value.
    pub backends: BTreeMap<String, BackendQos>,
    /// HTTP requests seen.
    pub requests: u64,
    /// Connections with a request and no response.
    pub unanswered: u64,
    /// Responses whose status is not 2xx.
    pub non_2xx: u64,
    /// Retransmitted or missing segments on connections that got no response.
    pub unanswered_lost_frames: u64,
    /// First to last captured frame, seconds.
    pub duration_s: f64,
}

#[derive(Default)]
struct Stream {
    frames: u64,
    bytes: u64,
    lost: u64,
    reused: bool,
    requests: u64,
    /// (arrival time, delay in s, backend) of each response.
    responses: Vec<(f64, f64, Option<String>)>,
}

/// The `X-Backend` value among a response's header lines (as tshark prints
/// `http.response.line`: `|`-separated, each ending in a literal `\r\n`).
fn backend_of(lines: &str) -> Option<String> {
    lines.split('|').find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case(BACKEND_HEADER)
            .then(|| value.trim().trim_end_matches("\\r\\n").trim().to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// Analyses tshark's output (one line per frame, [`TSHARK_FIELDS`] separated by tabs).
/// Frames without a TCP stream (none with a `tcp port` capture filter) are ignored.
pub fn analyse(tshark: &str) -> Result<CaptureQos> {
    let mut streams: BTreeMap<u64, Stream> = BTreeMap::new();
    let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut non_2xx = 0;
    for (n, line) in tshark.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < TSHARK_FIELDS.len() {
            bail!(
                "line {}: {} fields, want {}: {line:?}",
                n + 1,
                f.len(),
                TSHARK_FIELDS.len()
            );
        }
        let Ok(stream) = f[1].parse::<u64>() else {
            continue;
        };
        let ts: f64 = f[0]
            .parse()
            .with_context(|| format!("line {}: time {:?}", n + 1, f[0]))?;
        let len: u64 = f[2]
            .parse()
            .with_context(|| format!("line {}: length {:?}", n + 1, f[2]))?;
        first = first.min(ts);
        last = last.max(ts);
        let s = streams.entry(stream).or_default();
        s.frames += 1;
        s.bytes += len;
        if !f[7].is_empty() || !f[8].is_empty() {
            s.lost += 1;
        }
        if !f[9].is_empty() {
            s.reused = true;
        }
        if !f[3].is_empty() {
            s.requests += 1;
        }
        if !f[4].is_empty() {
            // Several responses in one frame are not possible with one request per
            // connection; the first code and time describe the frame's response.
            let code: u16 = f[4]
                .split(',')
                .next()
                .unwrap_or("")
                .parse()
                .with_context(|| format!("line {}: status {:?}", n + 1, f[4]))?;
            if !(200..300).contains(&code) {
                non_2xx += 1;
            }
            let delay: f64 = f[5]
                .split(',')
                .next()
                .unwrap_or("")
                .parse()
                .with_context(|| format!("line {}: http.time {:?}", n + 1, f[5]))?;
            s.responses.push((ts, delay, backend_of(f[6])));
        }
    }

    let mut out = CaptureQos {
        non_2xx,
        duration_s: if last > first { last - first } else { 0.0 },
        ..CaptureQos::default()
    };
    // Per backend, its responses (arrival, delay) for the jitter's order.
    let mut delays: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in streams.values() {
        out.requests += s.requests;
        let backend = s.responses.iter().find_map(|(_, _, b)| b.clone());
        match backend {
            Some(b) => {
                let q = out.backends.entry(b.clone()).or_default();
                q.frames += s.frames;
                q.bytes += s.bytes;
                if s.reused {
                    q.reused_ports += 1;
                } else {
                    q.lost_frames += s.lost;
                }
                q.responses += s.responses.len() as u64;
                delays
                    .entry(b)
                    .or_default()
                    .extend(s.responses.iter().map(|(t, d, _)| (*t, *d)));
            }
            None => {
                if s.requests > 0 && s.responses.is_empty() {
                    out.unanswered += 1;
                }
                if !s.reused {
                    out.unanswered_lost_frames += s.lost;
                }
            }
        }
    }
    let total: u64 = out.backends.values().map(|q| q.responses).sum();
    for (b, q) in &mut out.backends {
        q.share = if total > 0 {
            q.responses as f64 / total as f64
        } else {
            0.0
        };
        q.throughput_mbps = if out.duration_s > 0.0 {
            q.bytes as f64 * 8.0 / out.duration_s / 1e6
        } else {
            0.0
        };
        q.loss_percent = if q.frames > 0 {
            q.lost_frames as f64 * 100.0 / q.frames as f64
        } else {
            0.0
        };
        let mut d = delays.remove(b).unwrap_or_default();
        d.sort_by(|a, b| a.0.total_cmp(&b.0));
        let ms: Vec<f64> = d.iter().map(|(_, d)| d * 1e3).collect();
        (q.delay_ms, q.jitter_ms) = delay_and_jitter(&ms);
    }
    Ok(out)
}

/// The mean of `delays` and the mean absolute difference of consecutive ones.
pub fn delay_and_jitter(delays: &[f64]) -> (Option<f64>, Option<f64>) {
    if delays.is_empty() {
        return (None, None);
    }
    let mean = delays.iter().sum::<f64>() / delays.len() as f64;
    let jitter = (delays.len() > 1).then(|| {
        delays.windows(2).map(|w| (w[1] - w[0]).abs()).sum::<f64>() / (delays.len() - 1) as f64
    });
    (Some(mean), jitter)
}

/// httperf's summary of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Httperf {
    pub connections: u64,
    pub requests: u64,
    pub replies: u64,
    pub duration_s: f64,
    /// Mean time to the first byte of the reply, ms (`Reply time [ms]: response`).
    pub response_ms: f64,
    /// `Errors: total`.
    pub errors: u64,
}

/// Reads httperf's summary (`Total: connections ... requests ... replies ... test-duration
/// ... s`, `Reply time [ms]: response ...`, `Errors: total ...`).
pub fn parse_httperf(out: &str) -> Result<Httperf> {
    /// The number after `key` (whitespace-separated words).
    fn after(line: &str, key: &str) -> Option<f64> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key)?;
        words.next()?.parse().ok()
    }
    let mut h = Httperf::default();
    let (mut total, mut errors) = (false, false);
    for line in out.lines().map(str::trim) {
        if line.starts_with("Total: connections") {
            let get = |k| after(line, k).with_context(|| format!("{k} in {line:?}"));
            h.connections = get("connections")? as u64;
            h.requests = get("requests")? as u64;
            h.replies = get("replies")? as u64;
            h.duration_s = get("test-duration")?;
            total = true;
        } else if line.starts_with("Reply time [ms]:") {
            h.response_ms = after(line, "response").unwrap_or(0.0);
        } else if line.starts_with("Errors: total") {
            h.errors = after(line, "total").context("Errors: total")? as u64;
            errors = true;
        }
    }
    if !(total && errors) {
        bail!("not httperf's summary:\n{out}");
    }
    Ok(h)
}

/// The packets tcpdump says the kernel dropped from its capture (`N packets dropped by
/// kernel`, printed when it stops): segments missing from a capture for that reason were not
/// lost on the network.
pub fn tcpdump_kernel_drops(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.trim().strip_suffix("packets dropped by kernel"))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame line as tshark prints it.
    fn frame(ts: f64, stream: u64, len: u64, extra: [&str; 7]) -> String {
        format!(
            "{ts:.6}\t{stream}\t{len}\t{}",
            extra.join("\t").trim_end_matches('\n')
        )
    }

    fn headers(backend: &str) -> String {
        format!(
            "Server: Werkzeug/2.2.2 Python/3.11.2\\r\\n|Date: Tue, 01 Dec 2026 14:27:37 GMT\\r\\n|\
             Content-Length: 17\\r\\n|X-Backend: {backend}\\r\\n|Connection: close\\r\\n"
        )
    }

    /// One connection: SYN, request, response (after `delay` s), with `retrans` frames
    /// flagged as retransmissions.
    fn connection(t0: f64, stream: u64, backend: &str, delay: f64, retrans: usize) -> Vec<String> {
        let h = headers(backend);
        let mut v = vec![
            frame(t0, stream, 74, ["", "", "", "", "", "", ""]),
            frame(t0 + 0.0001, stream, 128, ["1", "", "", "", "", "", ""]),
            frame(
                t0 + 0.0001 + delay,
                stream,
                255,
                ["", "200", &format!("{delay:.9}"), &h, "", "", ""],
            ),
        ];
        for i in 0..retrans {
            v.push(frame(
                t0 + 0.01 + i as f64 * 1e-4,
                stream,
                66,
                ["", "", "", "", "1", "", ""],
            ));
        }
        v
    }

    #[test]
    fn per_backend_share_delay_jitter_loss_and_throughput() {
        let mut lines = Vec::new();
        // Backend a: delays 2, 4, 3 ms (jitter (2 + 1) / 2 = 1.5 ms); b: 10 ms once, one
        // retransmission.
        lines.extend(connection(0.0, 0, "a", 0.002, 0));
        lines.extend(connection(0.1, 1, "b", 0.010, 1));
        lines.extend(connection(0.2, 2, "a", 0.004, 0));
        lines.extend(connection(0.3, 3, "a", 0.003, 0));
        // A request without an answer, and its missing segment.
        lines.push(frame(0.4, 4, 74, ["", "", "", "", "", "", ""]));
        lines.push(frame(0.4001, 4, 128, ["1", "", "", "", "", "", ""]));
        lines.push(frame(1.0, 4, 66, ["", "", "", "", "", "1", ""]));
        let q = analyse(&lines.join("\n")).expect("parses");
        assert_eq!(q.requests, 5);
        assert_eq!(q.unanswered, 1);
        assert_eq!(q.unanswered_lost_frames, 1);
        assert_eq!(q.non_2xx, 0);
        assert!((q.duration_s - 1.0).abs() < 1e-9);
        let a = &q.backends["a"];
        assert_eq!(a.responses, 3);
        assert!((a.share - 0.75).abs() < 1e-9);
        assert!((a.delay_ms.expect("delay") - 3.0).abs() < 1e-6);
        assert!((a.jitter_ms.expect("jitter") - 1.5).abs() < 1e-6);
        assert_eq!(a.lost_frames, 0);
        assert_eq!(a.bytes, 3 * (74 + 128 + 255));
        assert!((a.throughput_mbps - a.bytes as f64 * 8.0 / 1e6).abs() < 1e-9);
        let b = &q.backends["b"];
        assert_eq!((b.responses, b.frames, b.lost_frames), (1, 4, 1));
        assert!((b.loss_percent - 25.0).abs() < 1e-9);
        assert_eq!(b.jitter_ms, None, "one response has no variation");
    }

    /// A SYN the backend's TIME_WAIT answered with a stale ACK, then the connection again on
    /// the same port: tshark's retransmission flags there are not loss.
    #[test]
    fn reused_ports_are_counted_apart_from_loss() {
        let mut lines = connection(0.0, 0, "a", 0.002, 3);
        lines.push(frame(0.02, 0, 74, ["", "", "", "", "1", "", "1"]));
        lines.extend(connection(0.1, 1, "a", 0.002, 1));
        let q = analyse(&lines.join("\n")).expect("parses");
        let a = &q.backends["a"];
        assert_eq!(a.reused_ports, 1);
        assert_eq!(
            a.lost_frames, 1,
            "only the other connection's retransmission"
        );
    }

    #[test]
    fn jitter_follows_arrival_order_not_stream_order() {
        // Stream 1 answers first: delays in arrival order are 1, 5, 2 (jitter 3.5), in
        // stream order 5, 1, 2 (jitter 2.5).
        let mut lines = connection(0.0, 0, "a", 0.005, 0);
        lines.extend(connection(0.001, 1, "a", 0.001, 0));
        lines.extend(connection(0.1, 2, "a", 0.002, 0));
        let q = analyse(&lines.join("\n")).expect("parses");
        assert!((q.backends["a"].jitter_ms.expect("jitter") - 3.5).abs() < 1e-6);
    }

    #[test]
    fn non_2xx_and_bad_lines() {
        let h = headers("c");
        let line = frame(0.0, 0, 100, ["", "503", "0.001", &h, "", "", ""]);
        let q = analyse(&line).expect("parses");
        assert_eq!(q.non_2xx, 1);
        assert_eq!(q.backends["c"].responses, 1);
        assert!(analyse("1.0\t0\t60").is_err(), "too few fields");
        assert!(analyse(&frame(0.0, 0, 1, ["", "abc", "", "", "", "", ""])).is_err());
        // Not TCP (no stream): ignored.
        let q = analyse("1.0\t\t60\t\t\t\t\t\t\t").expect("parses");
        assert_eq!(q, CaptureQos::default());
    }

    #[test]
    fn backend_header_is_found_case_insensitively() {
        assert_eq!(backend_of(&headers("b2")).as_deref(), Some("b2"));
        assert_eq!(
            backend_of("x-backend: Flask C\\r\\n").as_deref(),
            Some("Flask C")
        );
        assert_eq!(backend_of("Server: x\\r\\n"), None);
        assert_eq!(backend_of("X-Backend: \\r\\n"), None);
    }

    #[test]
    fn delay_and_jitter_of_few_samples() {
        assert_eq!(delay_and_jitter(&[]), (None, None));
        assert_eq!(delay_and_jitter(&[4.0]), (Some(4.0), None));
        assert_eq!(delay_and_jitter(&[1.0, 3.0, 2.0]), (Some(2.0), Some(1.5)));
    }

    #[test]
    fn tcpdump_drops() {
        let log = "tcpdump: listening on eth0, link-type EN10MB (Ethernet), snapshot length \
                   512 bytes\n20114 packets captured\n20131 packets received by filter\n\
                   17 packets dropped by kernel\n";
        assert_eq!(tcpdump_kernel_drops(log), Some(17));
        assert_eq!(tcpdump_kernel_drops("tcpdump: listening on eth0\n"), None);
    }

    #[test]
    fn httperf_summary() {
        let out = "httperf --client=0/1 --server=203.0.113.10 --port=80 --uri=/ --rate=500 \
                   --send-buffer=4096 --recv-buffer=16384 --num-conns=1000 --num-calls=1\n\
                   Maximum connect burst length: 1\n\n\
                   Total: connections 1000 requests 998 replies 997 test-duration 1.999 s\n\n\
                   Reply time [ms]: response 0.6 transfer 0.0\n\
                   Errors: total 3 client-timo 1 socket-timo 0 connrefused 2 connreset 0\n\
                   Errors: fd-unavail 0 addrunavail 0 ftab-full 0 other 0\n";
        let h = parse_httperf(out).expect("parses");
        assert_eq!(
            h,
            Httperf {
                connections: 1000,
                requests: 998,
                replies: 997,
                duration_s: 1.999,
                response_ms: 0.6,
                errors: 3,
            }
        );
        assert!(parse_httperf("httperf: connection refused\n").is_err());
    }
}
