//! Agent config text as the tests and benches write it: one `[agent]` table and
//! `[[service]]` tables with their `[[service.backend]]` entries and
//! `[service.health_check]`, set through typed setters (addresses, ports, counts and
//! durations come out as the TOML types the agent expects). The vocabulary of the agent's
//! config (key names, `scheduler = "maglev"`, ...) is the agent's; this only writes it.
//!
//! Keys come out in the order they were first set; setting a key again replaces its value.
//! [`ConfigBuilder::raw`] and [`ServiceBuilder::raw`] write a key as given, for tests of what
//! the agent rejects.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

/// Keys of one table with their values as TOML text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Keys(Vec<(String, String)>);

impl Keys {
    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn write(&self, out: &mut String) {
        for (key, value) in &self.0 {
            out.push_str(key);
            out.push_str(" = ");
            out.push_str(value);
            out.push('\n');
        }
    }
}

/// `text` as a TOML basic string.
fn string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a TOML string (lossy for paths that are not UTF-8, which the tests never use).
fn path(p: &Path) -> String {
    string(&p.to_string_lossy())
}

/// A duration as the agent's config writes it: `"2s"` when whole seconds, else `"500ms"`.
///
/// # Panics
///
/// If `d` is not a whole number of milliseconds (the config cannot say it).
fn duration(d: Duration) -> String {
    assert!(
        d.subsec_nanos().is_multiple_of(1_000_000),
        "{d:?} is not a whole number of milliseconds"
    );
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        string(&format!("{}s", ms / 1000))
    } else {
        string(&format!("{ms}ms"))
    }
}

/// A whole agent config: the `[agent]` table and the services, in order (the agent names a
/// service's keys `service[N]` in its errors by this order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigBuilder {
    agent: Keys,
    /// The `[announce]` table, once a key of it was set.
    announce: Option<Keys>,
    services: Vec<ServiceBuilder>,
}

impl ConfigBuilder {
    /// A config whose agent attaches to `interface`.
    #[must_use]
    pub fn new(interface: &str) -> Self {
        let mut agent = Keys::default();
        agent.set("interface", string(interface));
        Self {
            agent,
            announce: None,
            services: Vec::new(),
        }
    }

    /// `interfaces = [...]` in place of `interface` (a balancer with several arms).
    #[must_use]
    pub fn interfaces(mut self, names: &[&str]) -> Self {
        self.agent.remove("interface");
        let list: Vec<String> = names.iter().map(|n| string(n)).collect();
        self.agent
            .set("interfaces", format!("[{}]", list.join(", ")));
        self
    }

    /// An `[announce]` table: the VIPs' routes on TUN device `device` in routing table
    /// `table`, for BIRD.
    #[must_use]
    pub fn announce(mut self, device: &str, table: u32) -> Self {
        let keys = self.announce.get_or_insert_with(Keys::default);
        keys.set("device", string(device));
        keys.set("table", table.to_string());
        self
    }

    /// `xdp_mode` (`"native"`, `"skb"`, ...).
    #[must_use]
    pub fn xdp_mode(mut self, mode: &str) -> Self {
        self.agent.set("xdp_mode", string(mode));
        self
    }

    #[must_use]
    pub fn tunnel_source(mut self, address: Ipv4Addr) -> Self {
        self.agent
            .set("tunnel_source", string(&address.to_string()));
        self
    }

    #[must_use]
    pub fn tunnel_source_v6(mut self, address: Ipv6Addr) -> Self {
        self.agent
            .set("tunnel_source_v6", string(&address.to_string()));
        self
    }

    #[must_use]
    pub fn conntrack_entries(mut self, entries: u32) -> Self {
        self.agent.set("conntrack_entries", entries.to_string());
        self
    }

    #[must_use]
    pub fn api_socket(mut self, socket: &Path) -> Self {
        self.agent.set("api_socket", path(socket));
        self
    }

    #[must_use]
    pub fn state_file(mut self, file: &Path) -> Self {
        self.agent.set("state_file", path(file));
        self
    }

    /// `audit_log`: the agent's audit file (tests keep theirs in their work directory).
    #[must_use]
    pub fn audit_log(mut self, file: &Path) -> Self {
        self.agent.set("audit_log", path(file));
        self
    }

    #[must_use]
    pub fn bpffs(mut self, dir: &Path) -> Self {
        self.agent.set("bpffs", path(dir));
        self
    }

    /// The metrics listener's address.
    #[must_use]
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.agent.set("metrics", string(&addr.to_string()));
        self
    }

    /// An `[agent]` key with `value` written as given (TOML text, quotes included): for keys
    /// and values the agent must reject.
    #[must_use]
    pub fn raw(mut self, key: &str, value: &str) -> Self {
        self.agent.set(key, value.to_owned());
        self
    }

    /// Appends a `[[service]]`.
    #[must_use]
    pub fn service(mut self, service: ServiceBuilder) -> Self {
        self.services.push(service);
        self
    }

    /// The services, in order.
    #[must_use]
    pub fn services(&self) -> &[ServiceBuilder] {
        &self.services
    }

    /// The config file's text.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::from("[agent]\n");
        self.agent.write(&mut out);
        if let Some(announce) = &self.announce {
            out.push_str("\n[announce]\n");
            announce.write(&mut out);
        }
        for service in &self.services {
            service.write(&mut out);
        }
        out
    }
}

impl fmt::Display for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// One `[[service]]`: its VIP, port and protocol, scheduling and forwarding keys, backends and
/// health check. Keys not set are left to the agent's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBuilder {
    name: String,
    vip: IpAddr,
    port: u16,
    protocol: String,
    scheduler: Option<String>,
    ring_size: Option<u32>,
    keys: Keys,
    backends: Vec<Backend>,
    health_check: Option<HealthCheck>,
}

impl ServiceBuilder {
    /// Service `name` on `vip:port` for `protocol` (`"tcp"` or `"udp"`); port 0 is every port.
    #[must_use]
    pub fn new(name: &str, vip: impl Into<IpAddr>, port: u16, protocol: &str) -> Self {
        Self {
            name: name.to_owned(),
            vip: vip.into(),
            port,
            protocol: protocol.to_owned(),
            scheduler: None,
            ring_size: None,
            keys: Keys::default(),
            backends: Vec::new(),
            health_check: None,
        }
    }

    /// `scheduler` (`"maglev"`, `"round-robin"`, `"least-conn"`, `"ip-hash"`).
    #[must_use]
    pub fn scheduler(mut self, scheduler: &str) -> Self {
        self.scheduler = Some(scheduler.to_owned());
        self
    }

    /// `forwarding` (`"tunnel"`, `"direct"`, `"nat"`, ...).
    #[must_use]
    pub fn forwarding(mut self, forwarding: &str) -> Self {
        self.keys.set("forwarding", string(forwarding));
        self
    }

    /// `ring_size` (the agent rejects sizes that are not prime).
    #[must_use]
    pub fn ring_size(mut self, slots: u32) -> Self {
        self.ring_size = Some(slots);
        self
    }

    #[must_use]
    pub fn slow_start(mut self, ramp: Duration) -> Self {
        self.keys.set("slow_start", duration(ramp));
        self
    }

    #[must_use]
    pub fn tcp_idle_timeout(mut self, timeout: Duration) -> Self {
        self.keys.set("tcp_idle_timeout", duration(timeout));
        self
    }

    #[must_use]
    pub fn udp_idle_timeout(mut self, timeout: Duration) -> Self {
        self.keys.set("udp_idle_timeout", duration(timeout));
        self
    }

    /// A service key with `value` written as given (TOML text): for keys and values the agent
    /// must reject.
    #[must_use]
    pub fn raw(mut self, key: &str, value: &str) -> Self {
        self.keys.set(key, value.to_owned());
        self
    }

    /// Appends a `[[service.backend]]`.
    #[must_use]
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backends.push(backend);
        self
    }

    /// `[service.health_check]`.
    #[must_use]
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.health_check = Some(check);
        self
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn vip(&self) -> IpAddr {
        self.vip
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    #[must_use]
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// The scheduler, if set (the agent's default otherwise).
    #[must_use]
    pub fn scheduler_name(&self) -> Option<&str> {
        self.scheduler.as_deref()
    }

    /// The ring size, if set (the agent's default otherwise).
    #[must_use]
    pub fn ring_slots(&self) -> Option<u32> {
        self.ring_size
    }

    /// The backends, in order.
    #[must_use]
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    fn write(&self, out: &mut String) {
        let mut keys = Keys::default();
        keys.set("name", string(&self.name));
        keys.set("vip", string(&self.vip.to_string()));
        keys.set("port", self.port.to_string());
        keys.set("protocol", string(&self.protocol));
        if let Some(scheduler) = &self.scheduler {
            keys.set("scheduler", string(scheduler));
        }
        if let Some(slots) = self.ring_size {
            keys.set("ring_size", slots.to_string());
        }
        for (key, value) in &self.keys.0 {
            keys.set(key, value.clone());
        }
        out.push_str("\n[[service]]\n");
        keys.write(out);
        for backend in &self.backends {
            out.push_str("[[service.backend]]\n");
            out.push_str(&format!(
                "address = {}\n",
                string(&backend.address.to_string())
            ));
            if let Some(weight) = backend.weight {
                out.push_str(&format!("weight = {weight}\n"));
            }
            if let Some(backup) = backend.backup {
                out.push_str(&format!("backup = {backup}\n"));
            }
            if let Some(port) = backend.port {
                out.push_str(&format!("port = {port}\n"));
            }
            if let Some(max) = backend.max_connections {
                out.push_str(&format!("max_connections = {max}\n"));
            }
        }
        if let Some(check) = &self.health_check {
            out.push_str("[service.health_check]\n");
            check.0.write(out);
        }
    }
}

/// One `[[service.backend]]`; weight, backup and port are left to the agent's defaults (1,
/// not a backup, the service's port) unless set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    pub weight: Option<u32>,
    pub backup: Option<bool>,
    /// The port the backend listens on when it is not the service's (NAT modes).
    pub port: Option<u16>,
    /// `max_connections = N`.
    pub max_connections: Option<u32>,
}

impl Backend {
    #[must_use]
    pub fn new(address: impl Into<IpAddr>) -> Self {
        Self {
            address: address.into(),
            weight: None,
            backup: None,
            port: None,
            max_connections: None,
        }
    }

    /// A backend with `weight = N`.
    #[must_use]
    pub fn weighted(address: impl Into<IpAddr>, weight: u32) -> Self {
        Self {
            weight: Some(weight),
            ..Self::new(address)
        }
    }

    /// `backup = true|false`.
    #[must_use]
    pub fn backup(self, backup: bool) -> Self {
        Self {
            backup: Some(backup),
            ..self
        }
    }

    /// `max_connections = N`: at N active connections it takes no new flow.
    #[must_use]
    pub fn max_connections(self, max: u32) -> Self {
        Self {
            max_connections: Some(max),
            ..self
        }
    }

    /// `port = N`: the port the backend listens on (the NAT modes rewrite the destination
    /// port to it).
    #[must_use]
    pub fn port(self, port: u16) -> Self {
        Self {
            port: Some(port),
            ..self
        }
    }
}

/// `[service.health_check]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck(Keys);

impl HealthCheck {
    /// A check of `kind` (`"tcp"`, `"udp"`, `"http"`).
    #[must_use]
    pub fn new(kind: &str) -> Self {
        let mut keys = Keys::default();
        keys.set("kind", string(kind));
        Self(keys)
    }

    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.0.set("interval", duration(interval));
        self
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.0.set("timeout", duration(timeout));
        self
    }

    /// Successes that bring a backend up.
    #[must_use]
    pub fn rise(mut self, n: u32) -> Self {
        self.0.set("rise", n.to_string());
        self
    }

    /// Failures that take a backend down.
    #[must_use]
    pub fn fall(mut self, n: u32) -> Self {
        self.0.set("fall", n.to_string());
        self
    }

    /// The port checked, when not the service's.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.0.set("port", port.to_string());
        self
    }

    /// The HTTP check's path.
    #[must_use]
    pub fn path(mut self, path: &str) -> Self {
        self.0.set("path", string(path));
        self
    }

    /// The HTTP status a healthy backend answers.
    #[must_use]
    pub fn expect_status(mut self, status: u16) -> Self {
        self.0.set("expect_status", status.to_string());
        self
    }

    /// The UDP check's datagram.
    #[must_use]
    pub fn payload(mut self, payload: &str) -> Self {
        self.0.set("payload", string(payload));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> toml::Table {
        text.parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("not TOML ({e}):\n{text}"))
    }

    fn example() -> ConfigBuilder {
        ConfigBuilder::new("eth0")
            .xdp_mode("native")
            .tunnel_source(Ipv4Addr::new(198, 51, 100, 1))
            .tunnel_source_v6("2001:db8::1".parse().unwrap())
            .conntrack_entries(65536)
            .api_socket(Path::new("/tmp/weir \"test\"/weir.sock"))
            .metrics("127.0.0.1:9650".parse().unwrap())
            .service(
                ServiceBuilder::new("web", Ipv4Addr::new(203, 0, 113, 10), 80, "tcp")
                    .scheduler("maglev")
                    .forwarding("direct")
                    .ring_size(1009)
                    .slow_start(Duration::from_secs(6))
                    .backend(Backend::new(Ipv4Addr::new(198, 51, 100, 11)))
                    .backend(Backend::weighted(Ipv4Addr::new(198, 51, 100, 12), 2).backup(true))
                    .backend(Backend::new(Ipv4Addr::new(198, 51, 100, 13)).port(8080))
                    .health_check(
                        HealthCheck::new("http")
                            .interval(Duration::from_millis(200))
                            .timeout(Duration::from_millis(100))
                            .rise(2)
                            .fall(3)
                            .port(8080)
                            .path("/healthz")
                            .expect_status(200),
                    ),
            )
            .service(
                ServiceBuilder::new(
                    "dns",
                    "2001:db8:100::10".parse::<IpAddr>().unwrap(),
                    53,
                    "udp",
                )
                .udp_idle_timeout(Duration::from_millis(1500)),
            )
    }

    #[test]
    fn writes_the_tables_and_types_the_agent_reads() {
        let text = example().render();
        let t = parse(&text);
        let agent = t["agent"].as_table().expect("[agent]");
        assert_eq!(agent["interface"].as_str(), Some("eth0"));
        assert_eq!(agent["xdp_mode"].as_str(), Some("native"));
        assert_eq!(agent["tunnel_source"].as_str(), Some("198.51.100.1"));
        assert_eq!(agent["tunnel_source_v6"].as_str(), Some("2001:db8::1"));
        assert_eq!(agent["conntrack_entries"].as_integer(), Some(65536));
        assert_eq!(
            agent["api_socket"].as_str(),
            Some("/tmp/weir \"test\"/weir.sock")
        );
        assert_eq!(agent["metrics"].as_str(), Some("127.0.0.1:9650"));
        assert!(t.get("announce").is_none());
        let announced = parse(&example().announce("weir-vips", 4242).render());
        let announce = announced["announce"].as_table().expect("[announce]");
        assert_eq!(announce["device"].as_str(), Some("weir-vips"));
        assert_eq!(announce["table"].as_integer(), Some(4242));
        assert_eq!(announced["service"].as_array().map(Vec::len), Some(2));

        let services = t["service"].as_array().expect("[[service]]");
        assert_eq!(services.len(), 2);
        let web = services[0].as_table().unwrap();
        assert_eq!(web["name"].as_str(), Some("web"));
        assert_eq!(web["vip"].as_str(), Some("203.0.113.10"));
        assert_eq!(web["port"].as_integer(), Some(80));
        assert_eq!(web["protocol"].as_str(), Some("tcp"));
        assert_eq!(web["scheduler"].as_str(), Some("maglev"));
        assert_eq!(web["forwarding"].as_str(), Some("direct"));
        assert_eq!(web["ring_size"].as_integer(), Some(1009));
        assert_eq!(web["slow_start"].as_str(), Some("6s"));
        let backends = web["backend"].as_array().unwrap();
        assert_eq!(backends.len(), 3);
        assert_eq!(backends[0]["address"].as_str(), Some("198.51.100.11"));
        assert!(backends[0].get("weight").is_none());
        assert!(backends[0].get("backup").is_none());
        assert!(backends[0].get("port").is_none());
        assert_eq!(backends[1]["weight"].as_integer(), Some(2));
        assert_eq!(backends[1]["backup"].as_bool(), Some(true));
        assert_eq!(backends[2]["port"].as_integer(), Some(8080));
        assert!(backends[2].get("weight").is_none());
        let hc = web["health_check"].as_table().expect("health check of web");
        assert_eq!(hc["kind"].as_str(), Some("http"));
        assert_eq!(hc["interval"].as_str(), Some("200ms"));
        assert_eq!(hc["timeout"].as_str(), Some("100ms"));
        assert_eq!(hc["rise"].as_integer(), Some(2));
        assert_eq!(hc["fall"].as_integer(), Some(3));
        assert_eq!(hc["port"].as_integer(), Some(8080));
        assert_eq!(hc["path"].as_str(), Some("/healthz"));
        assert_eq!(hc["expect_status"].as_integer(), Some(200));

        let dns = services[1].as_table().unwrap();
        assert_eq!(dns["vip"].as_str(), Some("2001:db8:100::10"));
        assert_eq!(dns["udp_idle_timeout"].as_str(), Some("1500ms"));
        assert!(dns.get("backend").is_none());
        assert!(dns.get("health_check").is_none(), "web's check stays web's");
    }

    #[test]
    fn setting_a_key_again_replaces_it_and_raw_keys_are_written_as_given() {
        let text = ConfigBuilder::new("g0")
            .conntrack_entries(1)
            .conntrack_entries(4096)
            .raw("colour", "\"red\"")
            .service(
                ServiceBuilder::new("s", Ipv4Addr::new(203, 0, 113, 10), 80, "tcp")
                    .ring_size(65536)
                    .raw("port", "70000"),
            )
            .render();
        assert_eq!(text.matches("conntrack_entries").count(), 1, "{text}");
        assert_eq!(text.matches("port =").count(), 1, "{text}");
        let t = parse(&text);
        assert_eq!(t["agent"]["conntrack_entries"].as_integer(), Some(4096));
        assert_eq!(t["agent"]["colour"].as_str(), Some("red"));
        assert_eq!(t["service"][0]["ring_size"].as_integer(), Some(65536));
        assert_eq!(t["service"][0]["port"].as_integer(), Some(70000));
        assert!(text.starts_with("[agent]\ninterface = \"g0\"\n"), "{text}");
    }

    #[test]
    fn accessors_report_what_was_set() {
        let config = example();
        let web = &config.services()[0];
        assert_eq!(web.name(), "web");
        assert_eq!(web.vip(), IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)));
        assert_eq!((web.port(), web.protocol()), (80, "tcp"));
        assert_eq!(web.scheduler_name(), Some("maglev"));
        assert_eq!(web.ring_slots(), Some(1009));
        assert_eq!(web.backends()[1].weight, Some(2));
        assert_eq!(config.services()[1].scheduler_name(), None);
        assert_eq!(config.to_string(), config.render());
    }

    #[test]
    fn strings_and_durations() {
        assert_eq!(string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        assert_eq!(duration(Duration::from_secs(2)), "\"2s\"");
        assert_eq!(duration(Duration::from_millis(500)), "\"500ms\"");
        assert_eq!(duration(Duration::from_millis(2500)), "\"2500ms\"");
        assert!(std::panic::catch_unwind(|| duration(Duration::from_micros(1500))).is_err());
    }
}
