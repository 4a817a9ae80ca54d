//! Test fixtures shared by the unit tests of [`super`] and its modules: parsing a command
//! line the way the binary does, and sample answers of the agent.

use std::net::IpAddr;

use clap::Parser as _;

use super::{BackendArgs, BackendCommand, Cli, ClientCommand, Command};
use crate::api::{
    Admin, BackendInfo, ConnInfo, ConnList, ConnState, Health, NatStatus, Protocol, ReloadOutcome,
    ServiceTable, SnatUse, Stats, Status, TrafficStats, XdpMode,
};

pub(super) fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("weir").chain(args.iter().copied()))
}

pub(super) fn client(args: &[&str]) -> ClientCommand {
    match parse(args)
        .unwrap_or_else(|err| panic!("{args:?}: {err}"))
        .command
    {
        Command::Client(command) => command,
        other => panic!("{other:?}"),
    }
}

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

pub(super) fn backend(args: &[&str]) -> BackendCommand {
    match client(args) {
        ClientCommand::Backend(BackendArgs { command, .. }) => command,
        other => panic!("{other:?}"),
    }
}

pub(super) fn backend_info(service: &str, address: &str, weight: u32, admin: Admin) -> BackendInfo {
    BackendInfo {
        service: service.into(),
        address: ip(address),
        weight,
        admin,
        health: Health::Up,
        up: true,
        slots: 21846,
        effective_weight: weight,
        backup: false,
        active_connections: 17,
        max_connections: 0,
        turned_away: 0,
        packets: 1_234_567,
        bytes: 987_654_321,
        new_flows: 4321,
    }
}

pub(super) fn sample_ring() -> ServiceTable {
    ServiceTable {
        service: "web".into(),
        ring_size: 7,
        backends: vec![ip("198.51.100.11"), ip("2001:db8::12")],
        counts: vec![4, 2],
        slots: vec![0, 1, 0, 0, -1, 1, 0],
    }
}

pub(super) fn sample_status() -> Status {
    Status {
        version: "0.1.0".into(),
        pid: 4242,
        interface: "eth0".into(),
        interfaces: vec!["eth0".into()],
        xdp_mode: XdpMode::Native,
        config_file: "/etc/weir/weir.toml".into(),
        bpffs: "/sys/fs/bpf/weir".into(),
        adopted: true,
        uptime_seconds: 90_061,
        services: 2,
        backends: 5,
        backends_up: 4,
        last_reload: Some(ReloadOutcome {
            ok: false,
            at: 1_000,
            error: Some("/etc/weir/weir.toml: service[0].port: 70000 is out of range".into()),
        }),
        inconsistent: None,
        announce: None,
        nat: None,
        conntrack: None,
    }
}

/// `sample_status` with a NAT table: one `fullnat` service with two SNAT addresses, one
/// of them full for a backend.
pub(super) fn sample_nat_status() -> Status {
    Status {
        nat: Some(NatStatus {
            entries: 1_200,
            capacity: 524_288,
            snat_exhausted: 17,
            snat: vec![
                SnatUse {
                    service: "web".into(),
                    address: ip("198.51.100.1"),
                    ports_in_use: 96,
                    fullest_backend: 64,
                    port_count: 64,
                },
                SnatUse {
                    service: "web".into(),
                    address: ip("198.51.100.2"),
                    ports_in_use: 3,
                    fullest_backend: 2,
                    port_count: 64,
                },
            ],
        }),
        ..sample_status()
    }
}

pub(super) fn sample_stats(scale: u64) -> Stats {
    Stats {
        global: vec![("xdp_tx".into(), 1000 * scale), ("xdp_pass".into(), 7)],
        services: vec![TrafficStats {
            service: "web".into(),
            backend: None,
            packets: 1000 * scale,
            bytes: 64_000 * scale,
            new_flows: 10 * scale,
        }],
        backends: vec![TrafficStats {
            service: "web".into(),
            backend: Some(ip("198.51.100.11")),
            packets: 1000 * scale,
            bytes: 64_000 * scale,
            new_flows: 10 * scale,
        }],
        source_rules: vec![],
        rate_limited: vec![],
    }
}

/// Two of seven NAT connections (the limit cut the list): an established TCP one, and a
/// UDP one picked up mid-flow for a backend id that changed owner (no service).
pub(super) fn sample_conns() -> ConnList {
    ConnList {
        total: 7,
        truncated: true,
        connections: vec![
            ConnInfo {
                service: Some("web".into()),
                protocol: Protocol::Tcp,
                client: "203.0.113.7:40000".parse().unwrap(),
                vip: "198.51.100.10:80".parse().unwrap(),
                snat: Some("198.51.100.1:61007".parse().unwrap()),
                backend: "198.51.100.11:8080".parse().unwrap(),
                state: ConnState::Established,
                idle_seconds: 3,
                expires_in_seconds: 7437,
                picked_up: false,
            },
            ConnInfo {
                service: None,
                protocol: Protocol::Udp,
                client: "[2001:db8::7]:53000".parse().unwrap(),
                vip: "[2001:db8::10]:53".parse().unwrap(),
                snat: None,
                backend: "[2001:db8::12]:5353".parse().unwrap(),
                state: ConnState::Unreplied,
                idle_seconds: 0,
                expires_in_seconds: 30,
                picked_up: true,
            },
        ],
    }
}
