//! Validation: turns the `Raw*` structs of [`super::raw`] into the checked public types,
//! filling in the defaults, stopping at the first problem in file order with the key it is
//! about. Also [`parse_duration`], which the CLI and the health checks share.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use lb_common::maglev::is_prime;
use lb_common::nat::{DEFAULT_SNAT_PORTS, MAX_SNAT_ADDRS};
use lb_common::rules::MAX_RULES_PER_SERVICE;
use lb_common::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_RING_SIZE, MAX_SERVICES,
    nat::DEFAULT_NAT_CONNECTIONS,
};

use super::raw::{RawAgent, RawAnnounce, RawApi, RawConfig, RawHealthCheck, RawService};
use super::rules::{
    self, check_interface_name, check_service_name, check_source, family, parse_ip, quoted,
    special_address,
};
use super::{
    AgentConfig, AnnounceConfig, ApiToken, BackendConfig, Config, DEFAULT_ANNOUNCE_DEVICE,
    DEFAULT_ANNOUNCE_TABLE, DEFAULT_API_SOCKET, DEFAULT_AUDIT_KEEP, DEFAULT_AUDIT_LOG,
    DEFAULT_AUDIT_MAX_BYTES, DEFAULT_BPFFS, DEFAULT_METRICS, DEFAULT_NAT_TCP_IDLE_TIMEOUT,
    DEFAULT_STATE_FILE, DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_UDP_IDLE_TIMEOUT, Fail, Forwarding,
    HealthCheck, HealthKind, MAX_AUDIT_KEEP, MAX_CHECK_INTERVAL, MAX_CONNTRACK_ENTRIES,
    MAX_DURATION, MAX_INTERFACES, MAX_NAT_CONNECTIONS, MIN_AUDIT_MAX_BYTES, Protocol,
    RemoteApiConfig, ServiceConfig, SourcePrefix, SourceRule, TokenScope, fail,
};

/// The whole file: the `[agent]` table, then every service in order, then what only the
/// services together can break (names, listeners, tunnel sources).
pub(super) fn validate(raw: RawConfig) -> Result<Config, Fail> {
    let Some(raw_agent) = raw.agent else {
        return Err(fail(
            "agent",
            "the [agent] table is missing (it needs at least `interface`)",
        ));
    };
    let agent = validate_agent(raw_agent)?;
    let announce = raw
        .announce
        .map(|raw| validate_announce(&agent, raw))
        .transpose()?;

    if raw.service.is_empty() {
        return Err(fail("service", "at least one [[service]] is required"));
    }
    if raw.service.len() > MAX_SERVICES as usize {
        return Err(fail(
            "service",
            format!(
                "{} services, but at most {MAX_SERVICES} are supported",
                raw.service.len()
            ),
        ));
    }
    let total_backends: usize = raw.service.iter().map(|s| s.backend.len()).sum();
    if total_backends > MAX_BACKENDS as usize {
        return Err(fail(
            "service",
            format!(
                "{total_backends} backends in total over all services, but at most \
                 {MAX_BACKENDS} are supported"
            ),
        ));
    }

    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listeners: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
    let mut services = Vec::with_capacity(raw.service.len());
    for (index, raw_service) in raw.service.into_iter().enumerate() {
        let service = validate_service(index, raw_service)?;
        let prefix = format!("service[{index}]");

        if let Some(&other) = names.get(&service.name) {
            return Err(fail(
                format!("{prefix}.name"),
                format!(
                    "duplicate service name {} (also service[{other}])",
                    quoted(&service.name)
                ),
            ));
        }
        names.insert(service.name.clone(), index);

        let listener = (service.vip, service.port, service.protocol);
        if let Some(&other) = listeners.get(&listener) {
            let port = match service.port {
                0 => "every port (0)".to_owned(),
                port => format!("port {port}"),
            };
            return Err(fail(
                format!("{prefix}.vip"),
                format!(
                    "duplicate VIP: {} {port}/{} is already used by service \"{}\" \
                     (service[{other}])",
                    service.vip,
                    service.protocol,
                    services_name(&services, other)
                ),
            ));
        }
        listeners.insert(listener, index);

        check_tunnel_sources(&agent, index, &service)?;
        services.push(service);
    }
    check_snat_addresses(&services)?;
    let api = raw.api.map(validate_api).transpose()?;

    Ok(Config {
        agent,
        announce,
        services,
        api,
    })
}

/// `[announce]`: a device name of its own and a routing table the kernel does not use.
fn validate_announce(agent: &AgentConfig, raw: RawAnnounce) -> Result<AnnounceConfig, Fail> {
    let device = raw
        .device
        .unwrap_or_else(|| DEFAULT_ANNOUNCE_DEVICE.to_owned());
    check_interface_name(&device).map_err(|reason| fail("announce.device", reason))?;
    if agent.interfaces.contains(&device) {
        return Err(fail(
            "announce.device",
            format!(
                "{} is one of the balancer's interfaces (agent.interface(s)); the agent \
                 creates a TUN device of its own by this name",
                quoted(&device)
            ),
        ));
    }
    let table = match raw.table {
        None => DEFAULT_ANNOUNCE_TABLE,
        Some(n) => u32::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
            fail(
                "announce.table",
                format!("{n} is out of range (1..={})", u32::MAX),
            )
        })?,
    };
    if let Some(name) = match table {
        253 => Some("default"),
        254 => Some("main"),
        255 => Some("local"),
        _ => None,
    } {
        return Err(fail(
            "announce.table",
            format!(
                "{table} is the kernel's {name} table; the VIP routes need a table of their \
                 own, which only BIRD reads (e.g. {DEFAULT_ANNOUNCE_TABLE})"
            ),
        ));
    }
    Ok(AnnounceConfig { device, table })
}

/// `[api]`: a listen address, absolute cert and key paths, and at least one token with a
/// distinct name, a known scope and a 64-hex-digit SHA-256.
fn validate_api(raw: RawApi) -> Result<RemoteApiConfig, Fail> {
    let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
        fail(
            "api.listen",
            format!(
                "invalid listen address {} (expected IP:PORT, e.g. \"198.51.100.1:9443\")",
                quoted(&raw.listen)
            ),
        )
    })?;
    let absolute = |value: String, key: &str| -> Result<PathBuf, Fail> {
        if value.starts_with('/') {
            Ok(PathBuf::from(value))
        } else {
            Err(fail(
                key,
                format!("{} must be an absolute path", quoted(&value)),
            ))
        }
    };
    let cert = absolute(raw.cert, "api.cert")?;
    let key = absolute(raw.key, "api.key")?;
    if raw.token.is_empty() {
        return Err(fail(
            "api.token",
            "at least one [[api.token]] is required: the remote API has no unauthenticated access",
        ));
    }
    let mut tokens: Vec<ApiToken> = Vec::with_capacity(raw.token.len());
    for (index, token) in raw.token.into_iter().enumerate() {
        let prefix = format!("api.token[{index}]");
        if token.name.is_empty()
            || token.name.len() > 64
            || !token
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(fail(
                format!("{prefix}.name"),
                format!(
                    "invalid token name {} (1 to 64 of A-Z a-z 0-9 - _ . @)",
                    quoted(&token.name)
                ),
            ));
        }
        if tokens.iter().any(|t| t.name == token.name) {
            return Err(fail(
                format!("{prefix}.name"),
                format!("duplicate token name {}", quoted(&token.name)),
            ));
        }
        let scope = match token.scope.as_str() {
            "read" => TokenScope::Read,
            "admin" => TokenScope::Admin,
            other => {
                return Err(fail(
                    format!("{prefix}.scope"),
                    format!(
                        "unknown scope {} (expected \"read\" or \"admin\")",
                        quoted(other)
                    ),
                ));
            }
        };
        let sha256 = parse_sha256(&token.sha256).ok_or_else(|| {
            fail(
                format!("{prefix}.sha256"),
                "expected the SHA-256 of the token as 64 hex digits (`printf %s TOKEN | sha256sum`)",
            )
        })?;
        if tokens.iter().any(|t| t.sha256 == sha256) {
            return Err(fail(
                format!("{prefix}.sha256"),
                "the same token is listed twice: each token must be unique",
            ));
        }
        tokens.push(ApiToken {
            name: token.name,
            scope,
            sha256,
        });
    }
    Ok(RemoteApiConfig {
        listen,
        cert,
        key,
        tokens,
    })
}

/// 64 hex digits as 32 bytes.
fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// What only the services together can break for `fullnat`: an SNAT address is no VIP and
/// no backend of any service (the replies to it must be recognised as replies, and a
/// `nat` backend's packets as replies of its own pairs).
fn check_snat_addresses(services: &[ServiceConfig]) -> Result<(), Fail> {
    for (index, service) in services.iter().enumerate() {
        for (a, addr) in service.snat_addresses.iter().enumerate() {
            let key = format!("service[{index}].snat_addresses[{a}]");
            for (other, s) in services.iter().enumerate() {
                if s.vip == *addr {
                    return Err(fail(
                        key,
                        format!(
                            "{addr} is the VIP of service {} (service[{other}]); an SNAT \
                             address must be an address of its own",
                            quoted(&s.name)
                        ),
                    ));
                }
                if s.backends.iter().any(|b| b.address == *addr) {
                    return Err(fail(
                        key,
                        format!(
                            "{addr} is a backend of service {} (service[{other}]); an SNAT \
                             address must be an address of the balancer",
                            quoted(&s.name)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `[agent] snat_ports`: `"LOW-HIGH"` (or one port), both 1024..=65535, low <= high.
fn parse_snat_ports(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "{} is not a port range (expected \"LOW-HIGH\" within 1024..=65535, e.g. \
             \"61000-65535\")",
            quoted(text)
        )
    };
    let (lo, hi) = text
        .trim()
        .split_once('-')
        .unwrap_or((text.trim(), text.trim()));
    let port = |t: &str| t.trim().parse::<u16>().ok().filter(|p| *p >= 1024);
    let (Some(lo), Some(hi)) = (port(lo), port(hi)) else {
        return Err(bad());
    };
    if lo > hi {
        return Err(format!(
            "{} is an empty range: the low port {lo} is above the high port {hi}",
            quoted(text)
        ));
    }
    Ok((lo, hi))
}

fn services_name(services: &[ServiceConfig], index: usize) -> &str {
    services.get(index).map_or("?", |s| s.name.as_str())
}

/// `interface = "IF"` or `interfaces = ["IF", ...]` (two-arm and more), exactly one of them.
fn validate_interfaces(
    interface: Option<String>,
    interfaces: Option<Vec<String>>,
) -> Result<Vec<String>, Fail> {
    let list = match (interface, interfaces) {
        (Some(_), Some(_)) => {
            return Err(fail(
                "agent.interfaces",
                "set either `interface` or `interfaces`, not both",
            ));
        }
        (None, None) => {
            return Err(fail(
                "agent.interface",
                "missing: set `interface = \"IF\"` (the NIC the balancer attaches to), or \
                 `interfaces = [\"IF1\", \"IF2\"]` for a balancer with more than one arm",
            ));
        }
        (Some(one), None) => {
            check_interface_name(&one).map_err(|reason| fail("agent.interface", reason))?;
            return Ok(vec![one]);
        }
        (None, Some(list)) => list,
    };
    if list.is_empty() {
        return Err(fail("agent.interfaces", "must name at least one interface"));
    }
    if list.len() > MAX_INTERFACES {
        return Err(fail(
            "agent.interfaces",
            format!(
                "{} interfaces; at most {MAX_INTERFACES} are supported",
                list.len()
            ),
        ));
    }
    for (i, name) in list.iter().enumerate() {
        let key = format!("agent.interfaces[{i}]");
        check_interface_name(name).map_err(|reason| fail(&key, reason))?;
        if list[..i].contains(name) {
            return Err(fail(&key, format!("{} is listed twice", quoted(name))));
        }
    }
    Ok(list)
}

fn validate_agent(raw: RawAgent) -> Result<AgentConfig, Fail> {
    let interfaces = validate_interfaces(raw.interface, raw.interfaces)?;

    let tunnel_source = raw
        .tunnel_source
        .as_deref()
        .map(|text| match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) => check_source(IpAddr::V4(addr)).map(|()| addr),
            Ok(IpAddr::V6(_)) => Err(format!(
                "{} is an IPv6 address; tunnel_source must be IPv4 (IPv6 goes into \
                 tunnel_source_v6)",
                quoted(text)
            )),
            Err(_) => Err(format!("invalid IPv4 address {}", quoted(text))),
        })
        .transpose()
        .map_err(|reason| fail("agent.tunnel_source", reason))?;

    let tunnel_source_v6 = raw
        .tunnel_source_v6
        .as_deref()
        .map(|text| match text.parse::<IpAddr>() {
            Ok(IpAddr::V6(addr)) => check_source(IpAddr::V6(addr)).map(|()| addr),
            Ok(IpAddr::V4(_)) => Err(format!(
                "{} is an IPv4 address; tunnel_source_v6 must be IPv6 (IPv4 goes into \
                 tunnel_source)",
                quoted(text)
            )),
            Err(_) => Err(format!("invalid IPv6 address {}", quoted(text))),
        })
        .transpose()
        .map_err(|reason| fail("agent.tunnel_source_v6", reason))?;

    let tunnel_source_prefix = raw
        .tunnel_source_prefix
        .as_deref()
        .map(parse_source_prefix)
        .transpose()
        .map_err(|reason| fail("agent.tunnel_source_prefix", reason))?;
    if tunnel_source_prefix.is_some() && tunnel_source.is_none() {
        return Err(fail(
            "agent.tunnel_source_prefix",
            "needs tunnel_source: the LB's own IPv4 address, the source of its route lookups",
        ));
    }

    let conntrack_entries = match raw.conntrack_entries {
        None => DEFAULT_CONNTRACK_ENTRIES,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_CONNTRACK_ENTRIES).contains(n))
            .ok_or_else(|| {
                fail(
                    "agent.conntrack_entries",
                    format!("{n} is out of range (1..={MAX_CONNTRACK_ENTRIES})"),
                )
            })?,
    };

    let nat_connections = match raw.nat_connections {
        None => DEFAULT_NAT_CONNECTIONS,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_NAT_CONNECTIONS).contains(n))
            .ok_or_else(|| {
                fail(
                    "agent.nat_connections",
                    format!("{n} is out of range (1..={MAX_NAT_CONNECTIONS})"),
                )
            })?,
    };

    let path = |value: Option<String>, default: &str, key: &str| -> Result<PathBuf, Fail> {
        let value = value.unwrap_or_else(|| default.to_owned());
        if !value.starts_with('/') {
            return Err(fail(
                key,
                format!("{} must be an absolute path", quoted(&value)),
            ));
        }
        Ok(PathBuf::from(value))
    };
    let api_socket = path(raw.api_socket, DEFAULT_API_SOCKET, "agent.api_socket")?;
    let bpffs = path(raw.bpffs, DEFAULT_BPFFS, "agent.bpffs")?;
    let state_file = path(raw.state_file, DEFAULT_STATE_FILE, "agent.state_file")?;
    let audit_log = path(raw.audit_log, DEFAULT_AUDIT_LOG, "agent.audit_log")?;
    let audit_max_bytes = match raw.audit_max_bytes {
        None => DEFAULT_AUDIT_MAX_BYTES,
        Some(n) => u64::try_from(n)
            .ok()
            .filter(|n| *n >= MIN_AUDIT_MAX_BYTES)
            .ok_or_else(|| {
                fail(
                    "agent.audit_max_bytes",
                    format!("{n} is too small (at least {MIN_AUDIT_MAX_BYTES})"),
                )
            })?,
    };
    let audit_keep = match raw.audit_keep {
        None => DEFAULT_AUDIT_KEEP,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_AUDIT_KEEP)
            .ok_or_else(|| {
                fail(
                    "agent.audit_keep",
                    format!("{n} is out of range (0..={MAX_AUDIT_KEEP})"),
                )
            })?,
    };
    let metrics_text = raw.metrics.unwrap_or_else(|| DEFAULT_METRICS.to_owned());
    let metrics = metrics_text.parse::<SocketAddr>().map_err(|_| {
        fail(
            "agent.metrics",
            format!(
                "invalid listen address {} (expected IP:PORT, e.g. {DEFAULT_METRICS})",
                quoted(&metrics_text)
            ),
        )
    })?;

    let snat_ports = raw
        .snat_ports
        .as_deref()
        .map(parse_snat_ports)
        .transpose()
        .map_err(|reason| fail("agent.snat_ports", reason))?
        .unwrap_or(DEFAULT_SNAT_PORTS);

    let half_open_entries = match raw.half_open_entries {
        None => lb_common::default_half_open_entries(conntrack_entries),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_CONNTRACK_ENTRIES).contains(n))
            .ok_or_else(|| {
                fail(
                    "agent.half_open_entries",
                    format!("{n} is out of range (1..={MAX_CONNTRACK_ENTRIES})"),
                )
            })?,
    };
    let flood_threshold = match raw.flood_threshold {
        None => (half_open_entries / 4).max(1),
        Some(n) => u32::try_from(n).map_err(|_| {
            fail(
                "agent.flood_threshold",
                format!(
                    "{n} is out of range (0..={}; new flows per second per CPU, 0: only a \
                     full connection table starts flood mode)",
                    u32::MAX
                ),
            )
        })?,
    };

    Ok(AgentConfig {
        interfaces,
        xdp_mode: raw.xdp_mode,
        tunnel_source,
        tunnel_source_v6,
        tunnel_source_prefix,
        conntrack_entries,
        half_open_entries,
        flood_threshold,
        nat_connections,
        api_socket,
        metrics,
        bpffs,
        state_file,
        answer_ping: raw.answer_ping.unwrap_or(true),
        snat_ports,
        reserve_snat_ports: raw.reserve_snat_ports.unwrap_or(true),
        audit_log,
        audit_max_bytes,
        audit_keep,
    })
}

fn validate_service(index: usize, raw: RawService) -> Result<ServiceConfig, Fail> {
    let prefix = format!("service[{index}]");
    let key = |field: &str| format!("{prefix}.{field}");

    check_service_name(&raw.name).map_err(|reason| fail(key("name"), reason))?;

    let vip = parse_ip(&raw.vip).map_err(|reason| fail(key("vip"), reason))?;
    if let Some(problem) = special_address(vip) {
        return Err(fail(
            key("vip"),
            format!("{vip} is {problem} and cannot be a VIP"),
        ));
    }

    let port = u16::try_from(raw.port).map_err(|_| {
        fail(
            key("port"),
            format!(
                "{} is out of range (0..=65535; 0 means every port)",
                raw.port
            ),
        )
    })?;

    let ring_size = match raw.ring_size {
        None => DEFAULT_RING_SIZE,
        Some(n) if n <= 0 => {
            return Err(fail(
                key("ring_size"),
                format!("{n} is out of range (the Maglev ring size must be a prime, e.g. 65537)"),
            ));
        }
        Some(n) if n > i64::from(MAX_RING_SIZE) => {
            return Err(fail(
                key("ring_size"),
                format!("{n} is too large (at most {MAX_RING_SIZE})"),
            ));
        }
        Some(n) => {
            let n = u32::try_from(n).map_err(|_| fail(key("ring_size"), "out of range"))?;
            if !is_prime(n) {
                return Err(fail(
                    key("ring_size"),
                    format!("{n} is not prime (the Maglev ring size must be a prime, e.g. 65537)"),
                ));
            }
            n
        }
    };

    if raw.backend.is_empty() {
        return Err(fail(
            key("backend"),
            "no backends: at least one [[service.backend]] is required",
        ));
    }
    if raw.backend.len() > ring_size as usize {
        return Err(fail(
            key("ring_size"),
            format!(
                "{ring_size} is smaller than the number of backends ({}); every backend needs \
                 at least one ring slot",
                raw.backend.len()
            ),
        ));
    }

    let max_connections = raw
        .max_connections
        .map(rules::check_max_connections)
        .transpose()
        .map_err(|reason| fail(key("max_connections"), reason))?
        .unwrap_or(0);
    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    let mut backends = Vec::with_capacity(raw.backend.len());
    for (b, raw_backend) in raw.backend.into_iter().enumerate() {
        let bkey = |field: &str| format!("{prefix}.backend[{b}].{field}");

        let address =
            parse_ip(&raw_backend.address).map_err(|reason| fail(bkey("address"), reason))?;

        if let Some(&other) = seen.get(&address) {
            return Err(fail(
                bkey("address"),
                format!("duplicate backend {address} (also {prefix}.backend[{other}])"),
            ));
        }
        seen.insert(address, b);
        rules::check_backend_address(vip, raw.forwarding, address)
            .map_err(|reason| fail(bkey("address"), reason))?;

        let weight = match raw_backend.weight {
            None => 1,
            Some(w) => rules::check_weight(w).map_err(|reason| fail(bkey("weight"), reason))?,
        };
        let backend_port = raw_backend
            .port
            .map(|p| rules::check_backend_port(raw.forwarding, port, p))
            .transpose()
            .map_err(|reason| fail(bkey("port"), reason))?;
        let backend_max = raw_backend
            .max_connections
            .map(rules::check_max_connections)
            .transpose()
            .map_err(|reason| fail(bkey("max_connections"), reason))?
            .unwrap_or(max_connections);
        backends.push(BackendConfig {
            address,
            weight,
            backup: raw_backend.backup,
            port: backend_port,
            max_connections: backend_max,
        });
    }
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    rules::check_total_weight(&weights).map_err(|reason| fail(key("backend"), reason))?;

    let duration_key = |value: Option<String>,
                        default: Duration,
                        field: &str,
                        min: Duration,
                        max: Duration|
     -> Result<Duration, Fail> {
        let Some(text) = value else {
            return Ok(default);
        };
        let d = parse_duration(&text).map_err(|r| fail(key(field), r))?;
        if d < min || d > max {
            return Err(fail(
                key(field),
                format!("{text} is out of range ({min:?}..={max:?})"),
            ));
        }
        Ok(d)
    };
    let slow_start = duration_key(
        raw.slow_start,
        Duration::ZERO,
        "slow_start",
        Duration::ZERO,
        Duration::from_secs(3600),
    )?;
    let tcp_idle_timeout = duration_key(
        raw.tcp_idle_timeout,
        if raw.forwarding.is_nat() {
            DEFAULT_NAT_TCP_IDLE_TIMEOUT
        } else {
            DEFAULT_TCP_IDLE_TIMEOUT
        },
        "tcp_idle_timeout",
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    )?;
    let udp_idle_timeout = duration_key(
        raw.udp_idle_timeout,
        DEFAULT_UDP_IDLE_TIMEOUT,
        "udp_idle_timeout",
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    )?;
    // The datapath keeps idle timeouts in whole seconds; so must the file.
    for (d, field) in [
        (tcp_idle_timeout, "tcp_idle_timeout"),
        (udp_idle_timeout, "udp_idle_timeout"),
    ] {
        if d.subsec_nanos() != 0 {
            return Err(fail(
                key(field),
                format!("{d:?} is not a whole number of seconds (the datapath keeps seconds)"),
            ));
        }
    }
    let health_check = match raw.health_check {
        None => HealthCheck::default(),
        Some(hc) => validate_health_check(&prefix, port, hc)?,
    };
    let snat_addresses = validate_snat_addresses(&prefix, vip, raw.forwarding, raw.snat_addresses)?;
    let source_rules = validate_source_rules(&prefix, vip, raw.allow, raw.deny)?;
    let rate_limit = super::rate_limit::validate(&prefix, vip, raw.rate_limit)?;

    Ok(ServiceConfig {
        name: raw.name,
        vip,
        port,
        protocol: raw.protocol,
        scheduler: raw.scheduler,
        forwarding: raw.forwarding,
        ring_size,
        backends,
        health_check,
        slow_start,
        tcp_idle_timeout,
        udp_idle_timeout,
        snat_addresses,
        source_rules,
        rate_limit,
        max_connections,
    })
}

/// A service's `allow` and `deny` lists: prefixes (`ADDR/LEN`, or an address alone: a host)
/// of the VIP's family, host bits zero, each at most once over both lists, at most
/// `MAX_RULES_PER_SERVICE` together.
fn validate_source_rules(
    prefix: &str,
    vip: IpAddr,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
) -> Result<Vec<SourceRule>, Fail> {
    let mut out: Vec<SourceRule> = Vec::new();
    for (list, is_allow) in [(allow, true), (deny, false)] {
        let name = if is_allow { "allow" } else { "deny" };
        for (i, text) in list.unwrap_or_default().iter().enumerate() {
            let key = format!("{prefix}.{name}[{i}]");
            let rule =
                parse_rule_prefix(text, vip, is_allow).map_err(|reason| fail(&key, reason))?;
            if let Some(other) = out
                .iter()
                .find(|r| r.network == rule.network && r.len == rule.len)
            {
                return Err(fail(
                    key,
                    format!(
                        "{}/{} is already in {}: a prefix may appear once over both lists",
                        rule.network,
                        rule.len,
                        if other.allow { "allow" } else { "deny" }
                    ),
                ));
            }
            out.push(rule);
        }
    }
    if out.len() > MAX_RULES_PER_SERVICE as usize {
        return Err(fail(
            format!("{prefix}.allow"),
            format!(
                "{} allow and deny prefixes; at most {MAX_RULES_PER_SERVICE} per service",
                out.len()
            ),
        ));
    }
    Ok(out)
}

fn parse_rule_prefix(text: &str, vip: IpAddr, allow: bool) -> Result<SourceRule, String> {
    let (addr_text, len_text) = text
        .split_once('/')
        .map_or((text, None), |(a, l)| (a, Some(l)));
    let network = parse_ip(addr_text)?;
    let bits: u8 = if network.is_ipv4() { 32 } else { 128 };
    let len =
        match len_text {
            None => bits,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= bits).ok_or_else(|| {
                format!("{}: the prefix length must be 0 to {bits}", quoted(text))
            })?,
        };
    if network.is_ipv4() != vip.is_ipv4() {
        return Err(format!(
            "{} is not of the VIP's family ({vip}): it could never match",
            quoted(text)
        ));
    }
    let host_bits_zero = match network {
        IpAddr::V4(a) => u32::from(a) & u32::MAX.checked_shr(u32::from(len)).unwrap_or(0) == 0,
        IpAddr::V6(a) => u128::from(a) & u128::MAX.checked_shr(u32::from(len)).unwrap_or(0) == 0,
    };
    if !host_bits_zero {
        return Err(format!(
            "{} has host bits set (write the network address of the /{len})",
            quoted(text)
        ));
    }
    Ok(SourceRule {
        network,
        len,
        allow,
    })
}

/// A service's `snat_addresses`: required by `fullnat` and only there; 1..=16 unique
/// addresses of the VIP's family, none special, none the VIP.
fn validate_snat_addresses(
    prefix: &str,
    vip: IpAddr,
    forwarding: Forwarding,
    raw: Option<Vec<String>>,
) -> Result<Vec<IpAddr>, Fail> {
    let key = format!("{prefix}.snat_addresses");
    let Some(raw) = raw else {
        if forwarding == Forwarding::Fullnat {
            return Err(fail(
                key,
                "forwarding = \"fullnat\" needs snat_addresses: the balancer's own addresses \
                 that clients are translated to (e.g. [\"198.51.100.1\"])",
            ));
        }
        return Ok(Vec::new());
    };
    if forwarding != Forwarding::Fullnat {
        return Err(fail(
            key,
            format!(
                "forwarding = \"{forwarding}\" does not translate the source; snat_addresses \
                 needs forwarding = \"fullnat\""
            ),
        ));
    }
    if raw.is_empty() || raw.len() > MAX_SNAT_ADDRS as usize {
        return Err(fail(
            key,
            format!(
                "{} addresses, but 1..={MAX_SNAT_ADDRS} are needed",
                raw.len()
            ),
        ));
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(raw.len());
    for (a, text) in raw.iter().enumerate() {
        let akey = format!("{key}[{a}]");
        let addr = parse_ip(text).map_err(|reason| fail(akey.clone(), reason))?;
        if let Some(problem) = special_address(addr) {
            return Err(fail(
                akey,
                format!("{addr} is {problem} and cannot be an SNAT address"),
            ));
        }
        if addr.is_ipv4() != vip.is_ipv4() {
            return Err(fail(
                akey,
                format!(
                    "{} SNAT address {addr} for {} VIP {vip}: fullnat translates within one \
                     family (no NAT46/64)",
                    family(addr),
                    family(vip)
                ),
            ));
        }
        if let Some(other) = out.iter().position(|o| *o == addr) {
            return Err(fail(
                akey,
                format!("duplicate SNAT address {addr} (also {key}[{other}])"),
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// Parses a duration such as `500ms`, `2s` or `1m`, at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{} has no unit (use ms, s or m, e.g. \"2s\")", quoted(text)))?;
    let (number, unit) = text.split_at(split);
    let too_long = || {
        format!(
            "{} is too long (at most {}s)",
            quoted(text),
            MAX_DURATION.as_secs()
        )
    };
    let n: u64 = number.parse().map_err(|_| {
        if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
            too_long()
        } else {
            format!(
                "{} is not a duration (e.g. \"500ms\", \"2s\")",
                quoted(text)
            )
        }
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return Err(format!(
                "{}: unknown unit {} (use ms, s or m)",
                quoted(text),
                quoted(unit)
            ));
        }
    };
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

fn validate_health_check(
    prefix: &str,
    service_port: u16,
    raw: RawHealthCheck,
) -> Result<HealthCheck, Fail> {
    let key = |field: &str| format!("{prefix}.health_check.{field}");
    let mut hc = HealthCheck {
        kind: raw.kind,
        ..HealthCheck::default()
    };
    if let Some(text) = raw.interval {
        hc.interval = parse_duration(&text).map_err(|r| fail(key("interval"), r))?;
    }
    if let Some(text) = raw.timeout {
        hc.timeout = parse_duration(&text).map_err(|r| fail(key("timeout"), r))?;
    }
    if hc.interval < Duration::from_millis(100) || hc.interval > MAX_CHECK_INTERVAL {
        return Err(fail(
            key("interval"),
            format!(
                "{:?} is out of range (at least 100ms, at most {}s)",
                hc.interval,
                MAX_CHECK_INTERVAL.as_secs()
            ),
        ));
    }
    if hc.timeout.is_zero() || hc.timeout > hc.interval {
        return Err(fail(
            key("timeout"),
            format!(
                "must be above 0 and at most the interval ({:?})",
                hc.interval
            ),
        ));
    }
    let count = |value: Option<i64>, default: u32, field: &str| -> Result<u32, Fail> {
        match value {
            None => Ok(default),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| fail(key(field), format!("{n} is out of range (1..=100)"))),
        }
    };
    hc.rise = count(raw.rise, hc.rise, "rise")?;
    hc.fall = count(raw.fall, hc.fall, "fall")?;
    if let Some(path) = raw.path {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail(
                key("path"),
                format!("{} must start with / and contain no spaces", quoted(&path)),
            ));
        }
        hc.path = path;
    }
    if let Some(status) = raw.expect_status {
        hc.expect_status = u16::try_from(status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .ok_or_else(|| {
                fail(
                    key("expect_status"),
                    format!("{status} is not an HTTP status (100..=599)"),
                )
            })?;
    }
    if let Some(port) = raw.port {
        hc.port = Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| fail(key("port"), format!("{port} is out of range (1..=65535)")))?,
        );
    }
    if let Some(payload) = raw.payload {
        if payload.is_empty() || payload.len() > 1024 {
            return Err(fail(key("payload"), "must be 1 to 1024 bytes"));
        }
        hc.payload = payload;
    }
    if hc.kind != HealthKind::None && hc.port.is_none() && service_port == 0 {
        return Err(fail(
            key("port"),
            "the service listens on every port (port = 0): say which port to check",
        ));
    }
    Ok(hc)
}

/// Tunnel mode needs an outer source address of each backend family it sends to.
fn check_tunnel_sources(
    agent: &AgentConfig,
    index: usize,
    service: &ServiceConfig,
) -> Result<(), Fail> {
    if service.forwarding != Forwarding::Tunnel {
        return Ok(());
    }
    let needs = |v4: bool| {
        service
            .backends
            .iter()
            .enumerate()
            .find(|(_, b)| b.address.is_ipv4() == v4)
    };
    let missing = |key: &str, b: usize, backend: &BackendConfig| {
        fail(
            format!("agent.{key}"),
            format!(
                "missing, but service \"{}\" (service[{index}]) tunnels to {} backend {} \
                 (service[{index}].backend[{b}]); set it to an {} address of this host",
                service.name,
                family(backend.address),
                backend.address,
                family(backend.address),
            ),
        )
    };
    if agent.tunnel_source.is_none()
        && let Some((b, backend)) = needs(true)
    {
        return Err(missing("tunnel_source", b, backend));
    }
    if agent.tunnel_source_v6.is_none()
        && let Some((b, backend)) = needs(false)
    {
        return Err(missing("tunnel_source_v6", b, backend));
    }
    Ok(())
}

/// Parses and checks `tunnel_source_prefix`.
fn parse_source_prefix(text: &str) -> Result<SourcePrefix, String> {
    let (addr, len) = text.split_once('/').ok_or_else(|| {
        format!(
            "invalid prefix {}: expected an IPv4 prefix such as \"198.51.100.16/28\"",
            quoted(text)
        )
    })?;
    let network = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(network)) => network,
        Ok(IpAddr::V6(_)) => {
            return Err(format!(
                "{} is an IPv6 prefix; only IPv4 outer sources are spread (the IPv6 outer \
                 header varies its flow label per flow instead)",
                quoted(text)
            ));
        }
        Err(_) => return Err(format!("invalid IPv4 address in {}", quoted(text))),
    };
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|len| (16..=32).contains(len))
        .ok_or_else(|| {
            format!(
                "prefix length of {} must be 16..=32 (at most 65,536 sources)",
                quoted(text)
            )
        })?;
    let prefix = SourcePrefix { network, len };
    let host = u32::from(network) & prefix.host_mask();
    if host != 0 {
        return Err(format!(
            "{} has host bits set; the prefix is {}/{len}",
            quoted(text),
            Ipv4Addr::from(u32::from(network) & !prefix.host_mask())
        ));
    }
    let last = Ipv4Addr::from(u32::from(network) | prefix.host_mask());
    check_source(IpAddr::V4(network))?;
    check_source(IpAddr::V4(last))?;
    Ok(prefix)
}
