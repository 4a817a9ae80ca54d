//! The config module's tests: whole files through [`super::parse`], valid and not.

use super::*;
use lb_common::maglev::is_prime;
use lb_common::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_SIZE, MAX_SERVICES, nat::DEFAULT_NAT_CONNECTIONS,
};

const FILE: &str = "weir.toml";

const AGENT: &str = r#"
[agent]
interface = "eth0"
tunnel_source = "198.51.100.1"
tunnel_source_v6 = "2001:db8::1"
"#;

/// An `[[service]]` table (TCP) with `extra` lines before its backends.
fn service(name: &str, vip: &str, port: u16, extra: &str, backends: &[String]) -> String {
    let mut text = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\n\
         protocol = \"tcp\"\n{extra}\n"
    );
    for backend in backends {
        text.push_str("[[service.backend]]\n");
        text.push_str(backend);
        text.push('\n');
    }
    text
}

fn backend(address: &str) -> String {
    format!("address = \"{address}\"")
}

fn weighted(address: &str, weight: i64) -> String {
    format!("address = \"{address}\"\nweight = {weight}")
}

/// The standard agent plus service "web" on 198.51.100.10:80/tcp.
fn web(extra: &str, backends: &[String]) -> String {
    format!(
        "{AGENT}{}",
        service("web", "198.51.100.10", 80, extra, backends)
    )
}

fn ok(text: &str) -> Config {
    parse(text, Path::new(FILE)).unwrap_or_else(|err| panic!("{err}\n---\n{text}"))
}

/// Asserts that `text` is rejected at `key` with a reason containing `needle`.
#[track_caller]
fn rejects(text: &str, key: &str, needle: &str) -> ConfigError {
    let err = match parse(text, Path::new(FILE)) {
        Ok(config) => panic!("accepted: {config:?}\n---\n{text}"),
        Err(err) => err,
    };
    assert_eq!(err.file, Path::new(FILE));
    assert_eq!(err.key, key, "wrong key in: {err}");
    assert!(
        err.reason.contains(needle),
        "reason of `{err}` does not mention {needle:?}"
    );
    err
}

// --- accepted files -------------------------------------------------------------

/// A web service whose `[service.health_check]` table holds `hc` (TOML lines).
fn with_health(hc: &str) -> String {
    format!(
        "{}\n[service.health_check]\n{hc}\n",
        web("", &[backend("203.0.113.11")])
    )
}

#[test]
fn health_check_defaults_and_values() {
    let none = ok(&web("", &[backend("203.0.113.11")]));
    assert_eq!(none.services[0].health_check.kind, HealthKind::None);
    let c = ok(&with_health(
        "kind = \"http\"\ninterval = \"500ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2\npath = \"/healthz\"\nexpect_status = 204",
    ));
    let hc = &c.services[0].health_check;
    assert_eq!(hc.kind, HealthKind::Http);
    assert_eq!(hc.interval, Duration::from_millis(500));
    assert_eq!(hc.timeout, Duration::from_millis(200));
    assert_eq!((hc.rise, hc.fall, hc.expect_status), (1, 2, 204));
    assert_eq!(hc.path, "/healthz");
    let tcp = ok(&with_health(""));
    assert_eq!(
        tcp.services[0].health_check.kind,
        HealthKind::Tcp,
        "kind defaults to tcp"
    );
}

/// Reported: `interval = "18446744073709551615s"` passed `weir config check`, and a
/// health task then panicked adding it to a clock. Every duration is bounded.
#[test]
fn huge_durations_are_rejected_before_anything_runs() {
    for (hc, key) in [
        ("interval = \"18446744073709551615s\"", "interval"),
        ("interval = \"99999999999999999999999s\"", "interval"),
        ("interval = \"61m\"", "interval"),
        (
            "interval = \"1s\"\ntimeout = \"18446744073709551615ms\"",
            "timeout",
        ),
    ] {
        let err = rejects(
            &with_health(hc),
            &format!("service[0].health_check.{key}"),
            "",
        );
        assert!(
            err.reason.contains("too long") || err.reason.contains("out of range"),
            "{err}"
        );
    }
    for field in ["slow_start", "tcp_idle_timeout", "udp_idle_timeout"] {
        rejects(
            &web(
                &format!("{field} = \"18446744073709551615m\""),
                &[backend("203.0.113.11")],
            ),
            &format!("service[0].{field}"),
            "",
        );
    }
    assert!(parse_duration("18446744073709551615s").is_err());
    assert_eq!(parse_duration("7m"), Ok(Duration::from_secs(420)));
}

#[test]
fn health_check_rejections() {
    rejects(
        &with_health("interval = \"2\""),
        "service[0].health_check.interval",
        "no unit",
    );
    rejects(
        &with_health("interval = \"2h\""),
        "service[0].health_check.interval",
        "unknown unit",
    );
    rejects(
        &with_health("interval = \"50ms\""),
        "service[0].health_check.interval",
        "at least 100ms",
    );
    rejects(
        &with_health("interval = \"1s\"\ntimeout = \"2s\""),
        "service[0].health_check.timeout",
        "at most the interval",
    );
    rejects(
        &with_health("rise = 0"),
        "service[0].health_check.rise",
        "out of range",
    );
    rejects(
        &with_health("path = \"healthz\""),
        "service[0].health_check.path",
        "must start with /",
    );
    rejects(
        &with_health("expect_status = 700"),
        "service[0].health_check.expect_status",
        "not an HTTP status",
    );
    rejects(
        &with_health("kind = \"icmp\""),
        "service[0].health_check.kind",
        "unknown variant",
    );
    rejects(
        &with_health("bogus = 1"),
        "service[0].health_check.bogus",
        "unknown field",
    );
    let every_port = format!(
        "{AGENT}{}\n[service.health_check]\nkind = \"tcp\"\n",
        service("all", "198.51.100.10", 0, "", &[backend("203.0.113.11")])
    );
    rejects(
        &every_port,
        "service[0].health_check.port",
        "say which port",
    );
}

#[test]
fn schedulers_backup_slow_start_and_idle_timeouts() {
    for (name, s) in [
        ("maglev", Scheduler::Maglev),
        ("ip-hash", Scheduler::IpHash),
        ("round-robin", Scheduler::RoundRobin),
        ("least-conn", Scheduler::LeastConn),
    ] {
        let c = ok(&web(
            &format!("scheduler = \"{name}\""),
            &[backend("203.0.113.11")],
        ));
        assert_eq!(c.services[0].scheduler, s);
    }
    let c = ok(&web(
        "slow_start = \"30s\"\ntcp_idle_timeout = \"10m\"\nudp_idle_timeout = \"5s\"",
        &[
            backend("203.0.113.11"),
            format!("{}\nbackup = true", backend("203.0.113.12")),
        ],
    ));
    let s = &c.services[0];
    assert_eq!(s.slow_start, Duration::from_secs(30));
    assert_eq!(s.tcp_idle_timeout, Duration::from_secs(600));
    assert_eq!(s.udp_idle_timeout, Duration::from_secs(5));
    assert!(!s.backends[0].backup && s.backends[1].backup);
    let d = ok(&web("", &[backend("203.0.113.11")]));
    assert_eq!(d.services[0].tcp_idle_timeout, DEFAULT_TCP_IDLE_TIMEOUT);
    assert_eq!(d.services[0].udp_idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
    assert!(d.services[0].slow_start.is_zero());
    rejects(
        &web("udp_idle_timeout = \"0s\"", &[backend("203.0.113.11")]),
        "service[0].udp_idle_timeout",
        "out of range",
    );
    rejects(
        &web("slow_start = \"2h\"", &[backend("203.0.113.11")]),
        "service[0].slow_start",
        "unknown unit",
    );
    rejects(
        &web("slow_start = \"90m\"", &[backend("203.0.113.11")]),
        "service[0].slow_start",
        "out of range",
    );
    rejects(
        &web("tcp_idle_timeout = \"1500ms\"", &[backend("203.0.113.11")]),
        "service[0].tcp_idle_timeout",
        "whole number of seconds",
    );
}

#[test]
fn agent_paths_and_metrics_address() {
    let c = ok(&web("", &[backend("203.0.113.11")]));
    assert_eq!(c.agent.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
    assert_eq!(
        c.agent.metrics,
        DEFAULT_METRICS.parse::<SocketAddr>().unwrap()
    );
    let text = web("", &[backend("203.0.113.11")]).replacen(
        "[agent]\n",
        "[agent]\nmetrics = \"localhost:9650\"\n",
        1,
    );
    rejects(&text, "agent.metrics", "invalid listen address");
    let text = web("", &[backend("203.0.113.11")]).replacen(
        "[agent]\n",
        "[agent]\napi_socket = \"weir.sock\"\n",
        1,
    );
    rejects(&text, "agent.api_socket", "absolute path");
}

#[test]
fn valid_full_config_round_trip() {
    let text = r#"
[agent]
interface = "ens5"
xdp_mode = "native"
tunnel_source = "198.51.100.1"
tunnel_source_v6 = "2001:db8::1"
conntrack_entries = 4096
nat_connections = 1024

[[service]]
name = "web"
vip = "198.51.100.10"
port = 443
protocol = "tcp"
scheduler = "maglev"
forwarding = "tunnel"
ring_size = 251

[[service.backend]]
address = "203.0.113.11"
weight = 3

[[service.backend]]
address = "2001:db8:1::11"
weight = 0

[[service]]
name = "dns.v6"
vip = "2001:db8::53"
port = 0
protocol = "udp"
scheduler = "ip-hash"
forwarding = "direct"
ring_size = 65537

[[service.backend]]
address = "2001:db8:2::53"
weight = 65535
"#;
    let expected = Config {
        agent: AgentConfig {
            interfaces: vec!["ens5".to_owned()],
            xdp_mode: XdpMode::Native,
            tunnel_source: Some(Ipv4Addr::new(198, 51, 100, 1)),
            tunnel_source_v6: Some("2001:db8::1".parse().unwrap()),
            tunnel_source_prefix: None,
            conntrack_entries: 4096,
            half_open_entries: 1024,
            flood_threshold: 256,
            nat_connections: 1024,
            api_socket: PathBuf::from(DEFAULT_API_SOCKET),
            metrics: DEFAULT_METRICS.parse().unwrap(),
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            answer_ping: true,
            snat_ports: lb_common::nat::DEFAULT_SNAT_PORTS,
            reserve_snat_ports: true,
            audit_log: PathBuf::from(DEFAULT_AUDIT_LOG),
            audit_max_bytes: DEFAULT_AUDIT_MAX_BYTES,
            audit_keep: DEFAULT_AUDIT_KEEP,
        },
        announce: None,
        services: vec![
            ServiceConfig {
                name: "web".to_owned(),
                vip: "198.51.100.10".parse().unwrap(),
                port: 443,
                protocol: Protocol::Tcp,
                scheduler: Scheduler::Maglev,
                forwarding: Forwarding::Tunnel,
                ring_size: 251,
                backends: vec![
                    BackendConfig {
                        address: "203.0.113.11".parse().unwrap(),
                        weight: 3,
                        backup: false,
                        port: None,
                        max_connections: 0,
                    },
                    BackendConfig {
                        address: "2001:db8:1::11".parse().unwrap(),
                        weight: 0,
                        backup: false,
                        port: None,
                        max_connections: 0,
                    },
                ],
                health_check: HealthCheck::default(),
                slow_start: Duration::ZERO,
                tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
                udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
                snat_addresses: Vec::new(),
                source_rules: Vec::new(),
                rate_limit: RateLimitConfig {
                    source_prefix: 32,
                    ..RateLimitConfig::default()
                },
                max_connections: 0,
            },
            ServiceConfig {
                name: "dns.v6".to_owned(),
                vip: "2001:db8::53".parse().unwrap(),
                port: 0,
                protocol: Protocol::Udp,
                scheduler: Scheduler::IpHash,
                forwarding: Forwarding::Direct,
                ring_size: 65537,
                backends: vec![BackendConfig {
                    address: "2001:db8:2::53".parse().unwrap(),
                    weight: 65535,
                    backup: false,
                    port: None,
                    max_connections: 0,
                }],
                health_check: HealthCheck::default(),
                slow_start: Duration::ZERO,
                tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
                udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
                snat_addresses: Vec::new(),
                source_rules: Vec::new(),
                rate_limit: RateLimitConfig {
                    source_prefix: 128,
                    ..RateLimitConfig::default()
                },
                max_connections: 0,
            },
        ],
        api: None,
    };
    let config = ok(text);
    assert_eq!(config, expected);
    assert_eq!(config.backend_count(), 3);
    assert_eq!(config.services[0].protocol.number(), 6);
    assert_eq!(config.services[1].protocol.number(), 17);
    assert_eq!(config.services[0].scheduler.code(), SCHED_MAGLEV);
    assert_eq!(config.services[1].scheduler.code(), SCHED_IP_HASH);
    assert_eq!(config.services[0].forwarding.code(), FORWARD_TUNNEL);
    assert_eq!(config.services[1].forwarding.code(), FORWARD_DIRECT);
}

#[test]
fn defaults_are_applied() {
    let text = r#"
[agent]
interface = "eth0"
tunnel_source = "198.51.100.1"

[[service]]
name = "web"
vip = "198.51.100.10"
port = 80
protocol = "tcp"

[[service.backend]]
address = "203.0.113.11"
"#;
    let config = ok(text);
    assert_eq!(config.agent.xdp_mode, XdpMode::Auto);
    assert_eq!(config.agent.tunnel_source_v6, None);
    assert_eq!(config.agent.conntrack_entries, DEFAULT_CONNTRACK_ENTRIES);
    assert_eq!(config.agent.conntrack_entries, 1 << 20);
    assert_eq!(config.agent.nat_connections, DEFAULT_NAT_CONNECTIONS);
    assert_eq!(config.agent.nat_connections, 1 << 18);
    let service = &config.services[0];
    assert_eq!(service.scheduler, Scheduler::Maglev);
    assert_eq!(service.forwarding, Forwarding::Tunnel);
    assert_eq!(service.ring_size, DEFAULT_RING_SIZE);
    assert_eq!(service.backends[0].weight, 1);
}

#[test]
fn repo_config_files_parse() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config"));
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("config/ exists") {
        let path = entry.expect("readable config/").path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            if let Err(err) = load(&path) {
                panic!("{err}");
            }
            count += 1;
        }
    }
    assert!(count >= 1, "no config/*.toml found in {}", dir.display());
}

#[test]
fn example_config_has_the_documented_shape() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/example.toml"
    ));
    let config = load(path).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.services.len(), 3);
    let [tcp, nat, udp] = &config.services[..] else {
        unreachable!()
    };
    assert_eq!(nat.forwarding, Forwarding::Nat);
    assert!(nat.backends.iter().all(|b| b.port == Some(8080)));
    assert_eq!(
        (
            tcp.protocol,
            tcp.scheduler,
            tcp.forwarding,
            tcp.backends.len()
        ),
        (Protocol::Tcp, Scheduler::Maglev, Forwarding::Tunnel, 3)
    );
    assert!(tcp.backends.windows(2).any(|w| w[0].weight != w[1].weight));
    assert_eq!(
        (udp.protocol, udp.scheduler, udp.forwarding),
        (Protocol::Udp, Scheduler::IpHash, Forwarding::Direct)
    );
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        !text.contains("192.0.2."),
        "example.toml must not use 192.0.2.0/24"
    );
}

#[test]
fn same_vip_with_port_zero_and_specific_port_is_allowed() {
    let text = format!(
        "{}{}{}",
        web("", &[backend("203.0.113.11")]),
        service("any", "198.51.100.10", 0, "", &[backend("203.0.113.12")]),
        service("udp", "198.51.100.10", 80, "", &[backend("203.0.113.13")])
            .replace("\"tcp\"", "\"udp\""),
    );
    assert_eq!(ok(&text).services.len(), 3);
}

#[test]
fn same_backend_in_two_services_is_allowed() {
    let text = format!(
        "{}{}",
        web("", &[backend("203.0.113.11")]),
        service("tls", "198.51.100.10", 443, "", &[backend("203.0.113.11")]),
    );
    assert_eq!(ok(&text).backend_count(), 2);
}

#[test]
fn direct_forwarding_needs_no_tunnel_source() {
    let text = format!(
        "[agent]\ninterface = \"eth0\"\n{}",
        service(
            "web",
            "198.51.100.10",
            80,
            "forwarding = \"direct\"",
            &[backend("198.51.100.21")]
        )
    );
    assert_eq!(ok(&text).agent.tunnel_source, None);
}

#[test]
fn zero_weight_backend_is_allowed_next_to_a_weighted_one() {
    let config = ok(&web(
        "",
        &[weighted("203.0.113.11", 0), weighted("203.0.113.12", 2)],
    ));
    assert_eq!(config.services[0].backends[0].weight, 0);
}

#[test]
fn smallest_and_largest_ring_sizes_are_accepted() {
    assert_eq!(
        ok(&web("ring_size = 2", &[backend("203.0.113.11")])).services[0].ring_size,
        2
    );
    assert_eq!(
        ok(&web("ring_size = 65537", &[backend("203.0.113.11")])).services[0].ring_size,
        65537
    );
}

// --- error format ---------------------------------------------------------------

#[test]
fn error_display_is_file_key_reason() {
    let text = format!(
        "{}{}",
        web("", &[backend("203.0.113.11")]),
        service("tls", "198.51.100.10", 443, "", &[backend("203.0.113.x")]),
    );
    let err = rejects(&text, "service[1].backend[0].address", "203.0.113.x");
    assert_eq!(
        err.to_string(),
        "weir.toml: service[1].backend[0].address: invalid IP address \"203.0.113.x\""
    );
}

#[test]
fn load_of_a_missing_file_is_a_config_error() {
    let path = Path::new("/nonexistent/weir.toml");
    let err = load(path).expect_err("no such file");
    assert_eq!(err.file, path);
    assert_eq!(err.key, NO_KEY);
    assert!(err.reason.contains("cannot read"), "{err}");
    assert!(
        err.to_string()
            .starts_with("/nonexistent/weir.toml: -: cannot read")
    );
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    let text = format!("{AGENT}\n[[service]\nname = \"web\"\n");
    let err = rejects(&text, NO_KEY, "invalid TOML at line 7, column");
    assert!(!err.reason.contains('\n'), "{err}");
}

#[test]
fn duplicate_toml_key_is_a_syntax_error() {
    rejects(
        "[agent]\ninterface = \"eth0\"\ninterface = \"eth1\"\n",
        NO_KEY,
        "line 3",
    );
}

#[test]
fn type_error_names_key_and_line() {
    let err = rejects(
        &web(
            "",
            &[weighted("203.0.113.11", 1).replace("= 1", "= \"heavy\"")],
        ),
        "service[0].backend[0].weight",
        "invalid type",
    );
    assert!(err.reason.contains("(line 15, column 10)"), "{err}");
}

// --- unknown keys ---------------------------------------------------------------

#[test]
fn unknown_top_level_key() {
    let text = format!(
        "{}\n[metrics]\naddress = \"x\"\n",
        web("", &[backend("203.0.113.11")])
    );
    rejects(&text, "metrics", "unknown field");
}

#[test]
fn unknown_agent_key() {
    let text = web("", &[backend("203.0.113.11")])
        .replace("[agent]\n", "[agent]\ninterface_name = \"eth1\"\n");
    rejects(
        &text,
        "agent.interface_name",
        "unknown field `interface_name`",
    );
}

#[test]
fn unknown_service_key() {
    rejects(
        &web("weight = 3", &[backend("203.0.113.11")]),
        "service[0].weight",
        "unknown field `weight`",
    );
}

#[test]
fn unknown_backend_key() {
    let text = format!(
        "{}{}",
        web("", &[backend("203.0.113.11")]),
        service(
            "tls",
            "198.51.100.10",
            443,
            "",
            &[
                backend("203.0.113.11"),
                format!("{}\npriority = 2", backend("203.0.113.12"))
            ]
        ),
    );
    rejects(
        &text,
        "service[1].backend[1].priority",
        "unknown field `priority`",
    );
}

#[test]
fn nat_services_and_backend_ports() {
    let nat = |extra: &str, port: u16| {
        AGENT.to_owned()
            + &service(
                "web",
                "198.51.100.10",
                port,
                "forwarding = \"nat\"",
                &[
                    backend("203.0.113.11"),
                    format!("{}\n{extra}", backend("203.0.113.12")),
                ],
            )
    };
    let config = ok(&nat("port = 8080", 80));
    let s = &config.services[0];
    assert_eq!(s.forwarding, Forwarding::Nat);
    assert_eq!(s.backends[0].port, None);
    assert_eq!(s.backends[1].port, Some(8080));
    // A NATed connection that loses its entry is broken: kept 2 h 4 min by default.
    assert_eq!(s.tcp_idle_timeout, Duration::from_secs(7440));
    rejects(
        &nat("port = 0", 80),
        "service[0].backend[1].port",
        "out of range (1..=65535)",
    );
    rejects(
        &nat("port = 65536", 80),
        "service[0].backend[1].port",
        "out of range",
    );
    rejects(
        &nat("port = 8080", 0),
        "service[0].backend[1].port",
        "every port (port = 0)",
    );
    // DSR modes deliver the packet as sent: no port to rewrite.
    rejects(
        &(AGENT.to_owned()
            + &service(
                "web",
                "198.51.100.10",
                80,
                "",
                &[format!("{}\nport = 8080", backend("203.0.113.11"))],
            )),
        "service[0].backend[0].port",
        "needs forwarding = \"nat\"",
    );
    // No NAT46/64.
    rejects(
        &(AGENT.to_owned()
            + &service(
                "web",
                "198.51.100.10",
                80,
                "forwarding = \"nat\"",
                &[backend("2001:db8::11")],
            )),
        "service[0].backend[0].address",
        "forwarding = \"nat\" translates addresses within one family",
    );
}

#[test]
fn fullnat_services_snat_addresses_and_ports() {
    let fullnat = |agent_extra: &str, extra: &str, backend_addr: &str| {
        AGENT.replace("[agent]\n", &format!("[agent]\n{agent_extra}"))
            + &service(
                "web",
                "198.51.100.10",
                80,
                &format!("forwarding = \"fullnat\"\n{extra}"),
                &[format!("{}\nport = 8080", backend(backend_addr))],
            )
    };
    let config = ok(&fullnat(
        "",
        "snat_addresses = [\"203.0.113.1\"]",
        "203.0.113.11",
    ));
    let s = &config.services[0];
    assert_eq!(s.forwarding, Forwarding::Fullnat);
    assert_eq!(
        s.snat_addresses,
        vec!["203.0.113.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(s.backends[0].port, Some(8080));
    assert_eq!(s.tcp_idle_timeout, Duration::from_secs(7440));
    assert_eq!(config.agent.snat_ports, (61000, 65535));
    assert!(config.agent.reserve_snat_ports);
    let config = ok(&fullnat(
        "snat_ports = \"40000-40063\"\nreserve_snat_ports = false\n",
        "snat_addresses = [\"203.0.113.1\", \"203.0.113.2\"]",
        "203.0.113.11",
    ));
    assert_eq!(config.agent.snat_ports, (40000, 40063));
    assert!(!config.agent.reserve_snat_ports);
    assert_eq!(config.services[0].snat_addresses.len(), 2);

    let snat1 = "snat_addresses = [\"203.0.113.1\"]";
    rejects(
        &fullnat("", "", "203.0.113.11"),
        "service[0].snat_addresses",
        "needs snat_addresses",
    );
    rejects(
        &fullnat("", "snat_addresses = []", "203.0.113.11"),
        "service[0].snat_addresses",
        "1..=16 are needed",
    );
    rejects(
        &fullnat("", "snat_addresses = [\"2001:db8::1\"]", "203.0.113.11"),
        "service[0].snat_addresses[0]",
        "within one family",
    );
    rejects(
        &fullnat("", "snat_addresses = [\"127.0.0.1\"]", "203.0.113.11"),
        "service[0].snat_addresses[0]",
        "cannot be an SNAT address",
    );
    rejects(
        &fullnat(
            "",
            "snat_addresses = [\"203.0.113.1\", \"203.0.113.1\"]",
            "203.0.113.11",
        ),
        "service[0].snat_addresses[1]",
        "duplicate SNAT address",
    );
    rejects(
        &fullnat("", "snat_addresses = [\"198.51.100.10\"]", "203.0.113.11"),
        "service[0].snat_addresses[0]",
        "is the VIP of service \"web\"",
    );
    rejects(
        &fullnat("", "snat_addresses = [\"203.0.113.11\"]", "203.0.113.11"),
        "service[0].snat_addresses[0]",
        "is a backend of service \"web\"",
    );
    rejects(
        &fullnat("", snat1, "2001:db8::11"),
        "service[0].backend[0].address",
        "forwarding = \"fullnat\" translates addresses within one family",
    );
    rejects(
        &web(snat1, &[backend("203.0.113.11")]),
        "service[0].snat_addresses",
        "needs forwarding = \"fullnat\"",
    );
    for (ports, needle) in [
        ("\"1000-2000\"", "not a port range"),
        ("\"61000-70000\"", "not a port range"),
        ("\"62000-61000\"", "empty range"),
        ("\"sixty\"", "not a port range"),
    ] {
        rejects(
            &fullnat(&format!("snat_ports = {ports}\n"), snat1, "203.0.113.11"),
            "agent.snat_ports",
            needle,
        );
    }
}

#[test]
fn plural_services_table_is_an_unknown_key() {
    let text = web("", &[backend("203.0.113.11")]).replace("[[service]]", "[[services]]");
    rejects(&text, "services", "unknown field");
}

#[test]
fn unknown_enum_value() {
    let text = web("", &[backend("203.0.113.11")])
        .replace("[agent]\n", "[agent]\nxdp_mode = \"offload\"\n");
    rejects(&text, "agent.xdp_mode", "unknown variant `offload`");
    rejects(
        &web("scheduler = \"random\"", &[backend("203.0.113.11")]),
        "service[0].scheduler",
        "unknown variant",
    );
    rejects(
        &web("forwarding = \"snat\"", &[backend("203.0.113.11")]),
        "service[0].forwarding",
        "unknown variant",
    );
    rejects(
        &web("", &[backend("203.0.113.11")]).replace("\"tcp\"", "\"sctp\""),
        "service[0].protocol",
        "unknown variant",
    );
}

#[test]
fn missing_required_key() {
    let text = web("", &[backend("203.0.113.11")]).replace("port = 80\n", "");
    rejects(&text, "service[0].port", "missing field");
    let text = web("", &["weight = 1".to_owned()]);
    rejects(&text, "service[0].backend[0].address", "missing field");
}

// --- [agent] --------------------------------------------------------------------

#[test]
fn missing_agent_table() {
    let text = service("web", "198.51.100.10", 80, "", &[backend("203.0.113.11")]);
    rejects(&text, "agent", "[agent] table is missing");
}

#[test]
fn missing_interface() {
    let text = web("", &[backend("203.0.113.11")]).replace("interface = \"eth0\"\n", "");
    rejects(&text, "agent.interface", "missing: set `interface");
}

#[test]
fn interfaces_for_two_arms() {
    let two = |list: &str| {
        web("", &[backend("203.0.113.11")])
            .replace("interface = \"eth0\"\n", &format!("interfaces = {list}\n"))
    };
    let config = ok(&two("[\"eth0\", \"eth1\"]"));
    assert_eq!(config.agent.interfaces, ["eth0", "eth1"]);
    assert_eq!(config.agent.interface(), "eth0");
    let one = ok(&web("", &[backend("203.0.113.11")]));
    assert_eq!(one.agent.interfaces, ["eth0"]);
    rejects(&two("[]"), "agent.interfaces", "at least one");
    rejects(
        &two("[\"eth0\", \"eth0\"]"),
        "agent.interfaces[1]",
        "listed twice",
    );
    rejects(
        &two("[\"eth0\", \"eth 1\"]"),
        "agent.interfaces[1]",
        "not a valid interface name",
    );
    let nine: Vec<String> = (0..9).map(|i| format!("\"e{i}\"")).collect();
    rejects(
        &two(&format!("[{}]", nine.join(", "))),
        "agent.interfaces",
        "at most 8",
    );
    let both = web("", &[backend("203.0.113.11")])
        .replace("[agent]\n", "[agent]\ninterfaces = [\"eth1\"]\n");
    rejects(&both, "agent.interfaces", "not both");
}

#[test]
fn empty_interface() {
    let text = web("", &[backend("203.0.113.11")]).replace("\"eth0\"", "\"\"");
    rejects(&text, "agent.interface", "must not be empty");
}

#[test]
fn invalid_interface_name() {
    let text = web("", &[backend("203.0.113.11")]).replace("\"eth0\"", "\"a-very-long-name0\"");
    rejects(&text, "agent.interface", "longer than 15 bytes");
    let text = web("", &[backend("203.0.113.11")]).replace("\"eth0\"", "\"eth 0\"");
    rejects(&text, "agent.interface", "not a valid interface name");
}

#[test]
fn conntrack_entries_zero() {
    let text = web("", &[backend("203.0.113.11")])
        .replace("[agent]\n", "[agent]\nconntrack_entries = 0\n");
    rejects(
        &text,
        "agent.conntrack_entries",
        "0 is out of range (1..=67108864)",
    );
}

#[test]
fn conntrack_entries_too_large() {
    let text = web("", &[backend("203.0.113.11")])
        .replace("[agent]\n", "[agent]\nconntrack_entries = 67108865\n");
    rejects(&text, "agent.conntrack_entries", "67108865 is out of range");
    let text = web("", &[backend("203.0.113.11")])
        .replace("[agent]\n", "[agent]\nconntrack_entries = 67108864\n");
    assert_eq!(ok(&text).agent.conntrack_entries, MAX_CONNTRACK_ENTRIES);
}

#[test]
fn nat_connections_out_of_range() {
    let with = |n: &str| {
        web("", &[backend("203.0.113.11")])
            .replace("[agent]\n", &format!("[agent]\nnat_connections = {n}\n"))
    };
    rejects(
        &with("0"),
        "agent.nat_connections",
        "0 is out of range (1..=16777216)",
    );
    rejects(&with("-1"), "agent.nat_connections", "-1 is out of range");
    rejects(
        &with("16777217"),
        "agent.nat_connections",
        "16777217 is out of range",
    );
    assert_eq!(
        ok(&with("16777216")).agent.nat_connections,
        MAX_NAT_CONNECTIONS
    );
    assert_eq!(ok(&with("1")).agent.nat_connections, 1);
}

#[test]
fn invalid_tunnel_source() {
    let base = web("", &[backend("203.0.113.11")]);
    rejects(
        &base.replace("\"198.51.100.1\"", "\"198.51.100\""),
        "agent.tunnel_source",
        "invalid IPv4 address \"198.51.100\"",
    );
    rejects(
        &base.replace("\"198.51.100.1\"", "\"2001:db8::2\""),
        "agent.tunnel_source",
        "is an IPv6 address",
    );
    rejects(
        &base.replace("\"2001:db8::1\"", "\"198.51.100.2\""),
        "agent.tunnel_source_v6",
        "is an IPv4 address",
    );
    rejects(
        &base.replace("\"198.51.100.1\"", "\"0.0.0.0\""),
        "agent.tunnel_source",
        "unspecified",
    );
}

#[test]
fn tunnel_ipv4_backend_needs_tunnel_source() {
    let text = web("", &[backend("2001:db8:1::11"), backend("203.0.113.11")])
        .replace("tunnel_source = \"198.51.100.1\"\n", "");
    let err = rejects(&text, "agent.tunnel_source", "service \"web\" (service[0])");
    assert!(err.reason.contains("IPv4 backend 203.0.113.11"), "{err}");
    assert!(err.reason.contains("service[0].backend[1]"), "{err}");
}

#[test]
fn tunnel_ipv6_backend_needs_tunnel_source_v6() {
    let text = web("", &[backend("203.0.113.11"), backend("2001:db8:1::11")])
        .replace("tunnel_source_v6 = \"2001:db8::1\"\n", "");
    let err = rejects(
        &text,
        "agent.tunnel_source_v6",
        "service \"web\" (service[0])",
    );
    assert!(err.reason.contains("IPv6 backend 2001:db8:1::11"), "{err}");
}

// --- [[service]] ----------------------------------------------------------------

#[test]
fn no_services() {
    rejects(AGENT, "service", "at least one [[service]] is required");
}

#[test]
fn too_many_services() {
    let mut text = AGENT.to_owned();
    for i in 0..=MAX_SERVICES {
        let port = u16::try_from(i + 1).unwrap();
        text.push_str(&service(
            &format!("s{i}"),
            "198.51.100.10",
            port,
            "",
            &[backend("203.0.113.11")],
        ));
    }
    rejects(&text, "service", "65 services, but at most 64");
}

#[test]
fn too_many_backends_in_total() {
    let backends = |base: u32| -> Vec<String> {
        (0..2049)
            .map(|i| backend(&format!("2001:db8:1::{:x}", base + i)))
            .collect()
    };
    let text = format!(
        "{AGENT}{}{}",
        service("a", "198.51.100.10", 80, "", &backends(1)),
        service("b", "198.51.100.10", 81, "", &backends(1)),
    );
    rejects(&text, "service", "4098 backends in total");
}

#[test]
fn duplicate_service_name() {
    let text = format!(
        "{}{}",
        web("", &[backend("203.0.113.11")]),
        service("web", "198.51.100.11", 80, "", &[backend("203.0.113.11")]),
    );
    rejects(
        &text,
        "service[1].name",
        "duplicate service name \"web\" (also service[0])",
    );
}

#[test]
fn invalid_service_name() {
    let text = web("", &[backend("203.0.113.11")]).replace("\"web\"", "\"\"");
    rejects(&text, "service[0].name", "must not be empty");
    let text = web("", &[backend("203.0.113.11")]).replace("\"web\"", "\"my web\"");
    rejects(&text, "service[0].name", "contains characters");
    let long = "x".repeat(MAX_SERVICE_NAME_LEN + 1);
    let text = web("", &[backend("203.0.113.11")]).replace("\"web\"", &format!("\"{long}\""));
    rejects(&text, "service[0].name", "longer than 64 bytes");
}

#[test]
fn duplicate_vip_port_protocol() {
    let text = format!(
        "{}{}",
        web("", &[backend("203.0.113.11")]),
        service("web2", "198.51.100.10", 80, "", &[backend("203.0.113.12")]),
    );
    rejects(
        &text,
        "service[1].vip",
        "duplicate VIP: 198.51.100.10 port 80/tcp is already used by service \"web\" (service[0])",
    );
    let text = format!(
        "{}{}{}",
        web("", &[backend("203.0.113.11")]),
        service("all", "198.51.100.10", 0, "", &[backend("203.0.113.12")]),
        service("all2", "198.51.100.10", 0, "", &[backend("203.0.113.12")]),
    );
    rejects(&text, "service[2].vip", "every port (0)/tcp");
}

#[test]
fn invalid_vip_address() {
    let text = web("", &[backend("203.0.113.11")]).replace("\"198.51.100.10\"", "\"vip.example\"");
    rejects(
        &text,
        "service[0].vip",
        "invalid IP address \"vip.example\"",
    );
}

#[test]
fn special_vip_addresses_are_rejected() {
    for (vip, what) in [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:198.51.100.10", "IPv4-mapped"),
    ] {
        let text = format!(
            "{AGENT}{}",
            service("web", vip, 80, "", &[backend("203.0.113.11")])
        );
        rejects(&text, "service[0].vip", what);
    }
}

#[test]
fn port_out_of_range() {
    let text = web("", &[backend("203.0.113.11")]).replace("port = 80", "port = 65536");
    rejects(&text, "service[0].port", "65536 is out of range");
    let text = web("", &[backend("203.0.113.11")]).replace("port = 80", "port = -1");
    rejects(&text, "service[0].port", "-1 is out of range");
}

#[test]
fn ring_size_not_prime() {
    let err = rejects(
        &web("ring_size = 65536", &[backend("203.0.113.11")]),
        "service[0].ring_size",
        "not prime",
    );
    assert_eq!(
        err.to_string(),
        "weir.toml: service[0].ring_size: 65536 is not prime (the Maglev ring size must be \
         a prime, e.g. 65537)"
    );
    rejects(
        &web("ring_size = 1", &[backend("203.0.113.11")]),
        "service[0].ring_size",
        "1 is not prime",
    );
}

#[test]
fn ring_size_zero() {
    rejects(
        &web("ring_size = 0", &[backend("203.0.113.11")]),
        "service[0].ring_size",
        "0 is out of range",
    );
}

#[test]
fn ring_size_too_large() {
    rejects(
        &web("ring_size = 65539", &[backend("203.0.113.11")]),
        "service[0].ring_size",
        "65539 is too large (at most 65537)",
    );
}

#[test]
fn ring_size_smaller_than_backend_count() {
    rejects(
        &web(
            "ring_size = 2",
            &[
                backend("203.0.113.11"),
                backend("203.0.113.12"),
                backend("203.0.113.13"),
            ],
        ),
        "service[0].ring_size",
        "smaller than the number of backends (3)",
    );
}

// --- [[service.backend]] --------------------------------------------------------

#[test]
fn no_backends() {
    rejects(&web("", &[]), "service[0].backend", "no backends");
}

#[test]
fn zero_total_weight() {
    rejects(
        &web(
            "",
            &[weighted("203.0.113.11", 0), weighted("203.0.113.12", 0)],
        ),
        "service[0].backend",
        "zero total weight: at least one backend needs weight > 0",
    );
}

#[test]
fn duplicate_backend_address() {
    rejects(
        &web(
            "",
            &[
                backend("203.0.113.11"),
                backend("203.0.113.12"),
                backend("203.0.113.11"),
            ],
        ),
        "service[0].backend[2].address",
        "duplicate backend 203.0.113.11 (also service[0].backend[0])",
    );
    // Same address, different spelling.
    rejects(
        &web(
            "",
            &[backend("2001:db8:1::11"), backend("2001:db8:1:0:0:0:0:11")],
        ),
        "service[0].backend[1].address",
        "duplicate backend",
    );
}

#[test]
fn weight_out_of_range() {
    rejects(
        &web("", &[weighted("203.0.113.11", 65536)]),
        "service[0].backend[0].weight",
        "65536 is out of range (0..=65535",
    );
    rejects(
        &web("", &[weighted("203.0.113.11", -1)]),
        "service[0].backend[0].weight",
        "-1 is out of range",
    );
}

#[test]
fn invalid_backend_address() {
    rejects(
        &web("", &[backend("203.0.113.11/32")]),
        "service[0].backend[0].address",
        "invalid IP address \"203.0.113.11/32\"",
    );
}

#[test]
fn special_backend_addresses_are_rejected() {
    for (address, what) in [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("239.1.1.1", "multicast"),
        ("ff05::2", "multicast"),
        ("255.255.255.255", "broadcast"),
    ] {
        rejects(
            &web("", &[backend("203.0.113.11"), backend(address)]),
            "service[0].backend[1].address",
            what,
        );
    }
}

#[test]
fn direct_forwarding_with_other_family_backend() {
    let err = rejects(
        &web(
            "forwarding = \"direct\"",
            &[backend("198.51.100.21"), backend("2001:db8:1::21")],
        ),
        "service[0].backend[1].address",
        "forwarding = \"direct\"",
    );
    assert!(
        err.reason
            .contains("IPv6 backend 2001:db8:1::21 for IPv4 VIP"),
        "{err}"
    );
    let text = format!(
        "{AGENT}{}",
        service(
            "v6",
            "2001:db8::10",
            80,
            "forwarding = \"direct\"",
            &[backend("198.51.100.21")]
        )
    );
    rejects(
        &text,
        "service[0].backend[0].address",
        "IPv4 backend 198.51.100.21 for IPv6 VIP",
    );
}

#[test]
fn tunnel_forwarding_allows_mixed_families() {
    let config = ok(&web(
        "",
        &[backend("203.0.113.11"), backend("2001:db8:1::11")],
    ));
    assert_eq!(config.services[0].backends.len(), 2);
}

#[test]
fn helpers() {
    let primes: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
    assert!(is_prime(65537));
    assert!(!is_prime(65536));
    assert!(!is_prime(65535));
    assert!(is_prime(4_294_967_291));
    assert!(rules::check_vip("198.51.100.1".parse().unwrap()).is_ok());
    assert!(rules::check_vip("127.0.0.1".parse().unwrap()).is_err());
    for mode in [XdpMode::Auto, XdpMode::Native, XdpMode::Generic] {
        assert_eq!(mode.to_string(), mode.as_str());
    }
    assert_eq!(Scheduler::IpHash.to_string(), "ip-hash");
}

#[test]
fn tunnel_source_prefix() {
    let base = web("", &[backend("203.0.113.11")]);
    assert_eq!(ok(&base).agent.tunnel_source_prefix, None);
    let with = |prefix: &str| {
        base.replace(
            "tunnel_source = \"198.51.100.1\"\n",
            &format!("tunnel_source = \"198.51.100.1\"\ntunnel_source_prefix = \"{prefix}\"\n"),
        )
    };
    let prefix = ok(&with("198.51.100.16/28"))
        .agent
        .tunnel_source_prefix
        .unwrap();
    assert_eq!(
        prefix,
        SourcePrefix {
            network: Ipv4Addr::new(198, 51, 100, 16),
            len: 28
        }
    );
    assert_eq!(prefix.host_mask(), 0x0f);
    let one = ok(&with("198.51.100.1/32"))
        .agent
        .tunnel_source_prefix
        .unwrap();
    assert_eq!(one.host_mask(), 0);
    let key = "agent.tunnel_source_prefix";
    rejects(
        &with("198.51.100.17/28"),
        key,
        "host bits set; the prefix is 198.51.100.16/28",
    );
    rejects(&with("198.51.100.0/8"), key, "must be 16..=32");
    rejects(&with("198.51.100.0/33"), key, "must be 16..=32");
    rejects(&with("198.51.100.0"), key, "expected an IPv4 prefix");
    rejects(&with("2001:db8::/64"), key, "IPv6 prefix");
    rejects(&with("198.51.100/24"), key, "invalid IPv4 address");
    rejects(&with("127.0.0.0/24"), key, "cannot be a source address");
    rejects(
        &with("198.51.100.16/28").replace("tunnel_source = \"198.51.100.1\"\n", ""),
        key,
        "needs tunnel_source",
    );
}

#[test]
fn answer_ping() {
    let base = web("", &[backend("203.0.113.11")]);
    let with = |value: &str| {
        base.replace(
            "tunnel_source = \"198.51.100.1\"\n",
            &format!("tunnel_source = \"198.51.100.1\"\nanswer_ping = {value}\n"),
        )
    };
    assert!(ok(&base).agent.answer_ping, "on by default");
    assert!(ok(&with("true")).agent.answer_ping);
    let off = ok(&with("false"));
    assert!(!off.agent.answer_ping);
    // The datapath's flag follows.
    let flags = |cfg: &Config| crate::agent::desired::global(cfg).flags;
    assert_eq!(
        flags(&ok(&base)) & lb_common::GLOBAL_ANSWER_PING,
        lb_common::GLOBAL_ANSWER_PING
    );
    assert_eq!(flags(&off) & lb_common::GLOBAL_ANSWER_PING, 0);
    rejects(&with("\"yes\""), "agent.answer_ping", "expected a boolean");
    rejects(&with("1"), "agent.answer_ping", "expected a boolean");
}

#[test]
fn source_rules() {
    let with = |extra: &str| web(extra, &[backend("203.0.113.11")]);
    let config = ok(&with(
        "allow = [\"198.51.100.0/24\", \"203.0.113.7\"]\ndeny = [\"198.51.100.128/25\"]\n",
    ));
    let rules = &config.services[0].source_rules;
    assert_eq!(rules.len(), 3);
    assert_eq!(
        (rules[1].network, rules[1].len, rules[1].allow),
        ("203.0.113.7".parse().unwrap(), 32, true)
    );
    assert!(!rules[2].allow);
    rejects(
        &with("allow = [\"198.51.100.1/24\"]\n"),
        "service[0].allow[0]",
        "host bits set",
    );
    rejects(
        &with("deny = [\"2001:db8::/32\"]\n"),
        "service[0].deny[0]",
        "not of the VIP's family",
    );
    rejects(
        &with("allow = [\"198.51.100.0/33\"]\n"),
        "service[0].allow[0]",
        "prefix length must be 0 to 32",
    );
    rejects(
        &with("allow = [\"198.51.100.0/24\"]\ndeny = [\"198.51.100.0/24\"]\n"),
        "service[0].deny[0]",
        "already in allow",
    );
    let many: Vec<String> = (0..65).map(|i| format!("\"10.0.{i}.0/24\"")).collect();
    rejects(
        &with(&format!("deny = [{}]\n", many.join(", "))),
        "service[0].allow",
        "at most 64 per service",
    );
}

#[test]
fn max_connections_per_backend_with_a_service_default() {
    let limited =
        |address: &str, max: &str| format!("address = \"{address}\"\nmax_connections = {max}");
    // No key: no limit anywhere.
    let config = ok(&web("", &[backend("203.0.113.11")]));
    assert_eq!(config.services[0].max_connections, 0);
    assert_eq!(config.services[0].backends[0].max_connections, 0);
    // The service's default for backends without their own; a backend's 0 lifts it.
    let config = ok(&web(
        "max_connections = 100\n",
        &[
            backend("203.0.113.11"),
            limited("203.0.113.12", "3"),
            limited("203.0.113.13", "0"),
        ],
    ));
    let service = &config.services[0];
    assert_eq!(service.max_connections, 100);
    let maxes: Vec<u32> = service.backends.iter().map(|b| b.max_connections).collect();
    assert_eq!(maxes, [100, 3, 0]);
    // The largest connection table is the largest limit.
    let top = MAX_CONNTRACK_ENTRIES.to_string();
    assert_eq!(
        ok(&web("", &[limited("203.0.113.11", &top)])).services[0].backends[0].max_connections,
        MAX_CONNTRACK_ENTRIES
    );
    rejects(
        &web("", &[limited("203.0.113.11", "-1")]),
        "service[0].backend[0].max_connections",
        "out of range (0..=67108864; 0 means no limit)",
    );
    rejects(
        &web(
            "",
            &[
                backend("203.0.113.11"),
                limited(
                    "203.0.113.12",
                    &(u64::from(MAX_CONNTRACK_ENTRIES) + 1).to_string(),
                ),
            ],
        ),
        "service[0].backend[1].max_connections",
        "out of range",
    );
    rejects(
        &web("max_connections = -5\n", &[backend("203.0.113.11")]),
        "service[0].max_connections",
        "out of range",
    );
    rejects(
        &web("", &[limited("203.0.113.11", "\"ten\"")]),
        "service[0].backend[0].max_connections",
        "invalid type",
    );
}

#[test]
fn announce_defaults_and_rejects_tables_and_devices_it_cannot_own() {
    let base = web("", &[backend("198.51.100.11")]);
    assert_eq!(ok(&base).announce, None);
    let config = ok(&format!("{base}\n[announce]\n"));
    assert_eq!(
        config.announce,
        Some(AnnounceConfig {
            device: DEFAULT_ANNOUNCE_DEVICE.to_owned(),
            table: DEFAULT_ANNOUNCE_TABLE,
        })
    );
    let config = ok(&format!(
        "{base}\n[announce]\ndevice = \"weir-bgp\"\ntable = 4242\n"
    ));
    assert_eq!(
        config.announce,
        Some(AnnounceConfig {
            device: "weir-bgp".to_owned(),
            table: 4242,
        })
    );
    for (table, needle) in [
        ("0", "out of range"),
        ("-1", "out of range"),
        ("4294967296", "out of range"),
        ("254", "the kernel's main table"),
        ("255", "the kernel's local table"),
        ("253", "the kernel's default table"),
    ] {
        rejects(
            &format!("{base}\n[announce]\ntable = {table}\n"),
            "announce.table",
            needle,
        );
    }
    rejects(
        &format!("{base}\n[announce]\ndevice = \"eth0\"\n"),
        "announce.device",
        "the balancer's interface",
    );
    rejects(
        &format!("{base}\n[announce]\ndevice = \"a-name-far-too-long\"\n"),
        "announce.device",
        "longer than",
    );
    rejects(
        &format!("{base}\n[announce]\npeer = \"198.51.100.254\"\n"),
        "announce.peer",
        "unknown field",
    );
}

#[test]
fn audit_log_keys() {
    let text = web("", &[backend("203.0.113.11")]).replacen(
        "[agent]\n",
        "[agent]\naudit_log = \"/var/tmp/a.jsonl\"\naudit_max_bytes = 8192\naudit_keep = 0\n",
        1,
    );
    let agent = ok(&text).agent;
    assert_eq!(agent.audit_log, Path::new("/var/tmp/a.jsonl"));
    assert_eq!((agent.audit_max_bytes, agent.audit_keep), (8192, 0));
    for (key, value, needle) in [
        ("audit_log", "\"rel.jsonl\"", "absolute"),
        ("audit_max_bytes", "100", "too small"),
        ("audit_keep", "101", "out of range"),
    ] {
        let text = web("", &[backend("203.0.113.11")]).replacen(
            "[agent]\n",
            &format!("[agent]\n{key} = {value}\n"),
            1,
        );
        rejects(&text, &format!("agent.{key}"), needle);
    }
}

#[test]
fn remote_api_table() {
    let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let api = |tokens: &str| {
        format!(
            "{}\n[api]\nlisten = \"198.51.100.1:9443\"\ncert = \"/etc/weir/api.crt\"\n\
             key = \"/etc/weir/api.key\"\n{tokens}",
            web("", &[backend("203.0.113.11")])
        )
    };
    let token = |name: &str, scope: &str, sha: &str| {
        format!("[[api.token]]\nname = \"{name}\"\nscope = \"{scope}\"\nsha256 = \"{sha}\"\n")
    };
    let config = ok(&api(&token("ops", "admin", hash)));
    let remote = config.api.expect("[api]");
    assert_eq!(remote.listen, "198.51.100.1:9443".parse().unwrap());
    assert_eq!(remote.tokens[0].name, "ops");
    assert_eq!(remote.tokens[0].scope, TokenScope::Admin);
    assert_eq!(remote.tokens[0].sha256[0], 0x9f);
    assert_eq!(remote.tokens[0].sha256[31], 0x08);
    assert!(ok(&web("", &[backend("203.0.113.11")])).api.is_none());
    rejects(&api(""), "api.token", "at least one");
    rejects(
        &api(&token("ops", "write", hash)),
        "api.token[0].scope",
        "unknown scope",
    );
    rejects(
        &api(&token("ops", "read", "abc")),
        "api.token[0].sha256",
        "64 hex",
    );
    rejects(
        &api(&token("ops", "read", &"g".repeat(64))),
        "api.token[0].sha256",
        "64 hex",
    );
    rejects(
        &api(&token("a b", "read", hash)),
        "api.token[0].name",
        "invalid token name",
    );
    let other = "0".repeat(64);
    rejects(
        &api(&(token("ops", "read", hash) + &token("ops", "admin", &other))),
        "api.token[1].name",
        "duplicate",
    );
    rejects(
        &api(&(token("ops", "read", hash) + &token("dev", "admin", hash))),
        "api.token[1].sha256",
        "twice",
    );
    let plain = api(&token("ops", "read", hash)).replace("198.51.100.1:9443", "9443");
    rejects(&plain, "api.listen", "invalid listen address");
}

#[test]
fn rate_limits() {
    let with = |table: &str| {
        web(
            &format!("[service.rate_limit]\n{table}"),
            &[backend("203.0.113.11")],
        )
    };
    let config = ok(&with(
        "new_flows_per_source = 1000\nsource_prefix = 24\nnew_flows_per_vip = 50000\nvip_burst = 7\n",
    ));
    let limits = config.services[0].rate_limit;
    assert_eq!(
        limits.per_source,
        Some(FlowLimit {
            rate: 1000,
            burst: 100
        }),
        "the default burst is a tenth of a second's flows"
    );
    assert_eq!(limits.source_prefix, 24);
    assert_eq!(
        limits.per_vip,
        Some(FlowLimit {
            rate: 50_000,
            burst: 7
        })
    );
    let datapath = limits.datapath();
    assert_eq!(datapath.source_flows.interval_ns, 1_000_000);
    assert_eq!(datapath.source_flows.tolerance_ns, 100_000_000);
    assert_eq!(datapath.vip_flows.interval_ns, 20_000);
    assert_eq!(datapath.source_mask[..4], [0xff, 0xff, 0xff, 0]);

    // No table: no limits, and the datapath value is all zero but the prefix.
    let none = ok(&web("", &[backend("203.0.113.11")])).services[0].rate_limit;
    assert!(!none.any());
    assert_eq!(none.datapath().source_flows.interval_ns, 0);
    // A slow rate still gets a burst of one.
    let slow = ok(&with("new_flows_per_vip = 3\n")).services[0].rate_limit;
    assert_eq!(slow.per_vip.map(|l| l.burst), Some(1));

    rejects(
        &with("new_flows_per_source = 0\n"),
        "service[0].rate_limit.new_flows_per_source",
        "out of range",
    );
    rejects(
        &with("new_flows_per_source = 10000001\n"),
        "service[0].rate_limit.new_flows_per_source",
        "1 to 10000000",
    );
    rejects(
        &with("new_flows_per_vip = 10\nvip_burst = -1\n"),
        "service[0].rate_limit.vip_burst",
        "out of range",
    );
    rejects(
        &with("source_burst = 5\n"),
        "service[0].rate_limit.source_burst",
        "`new_flows_per_source` is not set",
    );
    rejects(
        &with("new_flows_per_vip = 10\nsource_prefix = 24\n"),
        "service[0].rate_limit.source_prefix",
        "not set",
    );
    rejects(
        &with("new_flows_per_source = 10\nsource_prefix = 33\n"),
        "service[0].rate_limit.source_prefix",
        "0 to 32",
    );
    rejects(
        &with("new_flows = 10\n"),
        "service[0].rate_limit.new_flows",
        "unknown field",
    );
    rejects(
        &with("new_flows_per_source = \"fast\"\n"),
        "service[0].rate_limit.new_flows_per_source",
        "",
    );
    // IPv6: a /64 groups one site's addresses.
    let v6 = format!(
        "{AGENT}{}",
        service(
            "web6",
            "2001:db8::10",
            80,
            "[service.rate_limit]\nnew_flows_per_source = 100\nsource_prefix = 64\n",
            &[backend("2001:db8:1::11")]
        )
    );
    assert_eq!(ok(&v6).services[0].rate_limit.source_prefix, 64);
}
