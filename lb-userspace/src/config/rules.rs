//! The rules a value must pass wherever it comes from: the config file, the CLI (through the
//! API), or `weir decap`'s flags. One set, so that what `weir config check` refuses the
//! running agent refuses too. Errors quote what they echo and cut it short.

use std::net::{IpAddr, Ipv4Addr};

use super::{Forwarding, MAX_CONNTRACK_ENTRIES, MAX_SERVICE_NAME_LEN, MAX_WEIGHT};

/// The longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// How much of a rejected value an error message shows.
const QUOTE_CHARS: usize = 64;

/// `text` as a quoted, escaped string of at most [`QUOTE_CHARS`] characters: a newline in
/// the input cannot split an error line, and a megabyte of input does not make a megabyte
/// of log.
#[must_use]
pub fn quoted(text: &str) -> String {
    let count = text.chars().count();
    if count <= QUOTE_CHARS {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(QUOTE_CHARS).collect();
    format!("{head:?}... ({} bytes)", text.len())
}

pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid IP address {}", quoted(text)))
}

#[must_use]
pub fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Why `addr` cannot be a VIP, a backend or a source address, if it cannot.
#[must_use]
pub fn special_address(addr: IpAddr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("the unspecified address")
    } else if addr.is_multicast() {
        Some("a multicast address")
    } else if addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else if addr.is_loopback() {
        // Packets for 127.0.0.0/8 or ::1 never leave a host: a loopback backend or source
        // is a typo, and the datapath would forward into nothing.
        Some("a loopback address")
    } else if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        Some("an IPv4-mapped IPv6 address (write the plain IPv4 address instead)")
    } else {
        None
    }
}

/// A VIP, from the config file or `weir decap --vip`.
pub fn check_vip(addr: IpAddr) -> Result<(), String> {
    match special_address(addr) {
        Some(problem) => Err(format!("{addr} is {problem} and cannot be a VIP")),
        None => Ok(()),
    }
}

/// A tunnel's outer source address.
pub fn check_source(addr: IpAddr) -> Result<(), String> {
    match special_address(addr) {
        Some(problem) => Err(format!(
            "{addr} is {problem} and cannot be a source address"
        )),
        None => Ok(()),
    }
}

/// A backend of a service with this VIP and forwarding mode.
pub fn check_backend_address(
    vip: IpAddr,
    forwarding: Forwarding,
    address: IpAddr,
) -> Result<(), String> {
    if let Some(problem) = special_address(address) {
        return Err(format!("{address} is {problem} and cannot be a backend"));
    }
    if forwarding.is_nat() && address.is_ipv4() != vip.is_ipv4() {
        return Err(format!(
            "{} backend {address} for {} VIP {vip}: forwarding = \"{forwarding}\" translates \
             addresses within one family (no NAT46/64); use a backend of the VIP's family",
            family(address),
            family(vip)
        ));
    }
    if forwarding == Forwarding::Direct && address.is_ipv4() != vip.is_ipv4() {
        return Err(format!(
            "{} backend {address} for {} VIP {vip}: forwarding = \"direct\" (L2 DSR) cannot \
             change the IP header; use a backend of the VIP's family or forwarding = \"tunnel\"",
            family(address),
            family(vip)
        ));
    }
    Ok(())
}

/// A backend's `port`: only where the balancer rewrites the destination (`nat`), and not
/// for a service of every port (`port = 0`), whose packets keep their own port.
pub fn check_backend_port(
    forwarding: Forwarding,
    service_port: u16,
    port: i64,
) -> Result<u16, String> {
    if !forwarding.is_nat() {
        return Err(format!(
            "forwarding = \"{forwarding}\" delivers the packet as the client sent it, so the \
             backend listens on the service's port; a backend port needs forwarding = \"nat\" or \"fullnat\""
        ));
    }
    if service_port == 0 {
        return Err(
            "the service listens on every port (port = 0): its packets keep their own \
             destination port, so a backend port cannot be set"
                .to_owned(),
        );
    }
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port} is out of range (1..=65535)"))
}

/// A backend weight (the file reads numbers as `i64` so a range error gets this reason).
pub fn check_weight(weight: i64) -> Result<u32, String> {
    u32::try_from(weight)
        .ok()
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or_else(|| format!("{weight} is out of range (0..={MAX_WEIGHT}; 0 means no new flows)"))
}

/// A backend's `max_connections` (or a service's default of it): 0 (no limit) up to the
/// largest connection table, which no backend can outgrow.
pub fn check_max_connections(max: i64) -> Result<u32, String> {
    u32::try_from(max)
        .ok()
        .filter(|m| *m <= MAX_CONNTRACK_ENTRIES)
        .ok_or_else(|| {
            format!("{max} is out of range (0..={MAX_CONNTRACK_ENTRIES}; 0 means no limit)")
        })
}

/// A service's backends together: at least one, and some weight to share.
pub fn check_total_weight(weights: &[u32]) -> Result<(), String> {
    if weights.is_empty() {
        Err("no backends: at least one backend is required".to_owned())
    } else if weights.iter().all(|w| *w == 0) {
        Err("zero total weight: at least one backend needs weight > 0".to_owned())
    } else {
        Ok(())
    }
}

/// An interface name (also for `weir decap --interface`).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("must not be empty".to_owned())
    } else if name.len() > MAX_INTERFACE_NAME_LEN {
        Err(format!(
            "{} is longer than {MAX_INTERFACE_NAME_LEN} bytes, the longest interface name \
             Linux allows",
            quoted(name)
        ))
    } else if name.contains(['/', ':']) || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        Err(format!(
            "{} is not a valid interface name (no '/', ':' or whitespace)",
            quoted(name)
        ))
    } else {
        Ok(())
    }
}

pub fn check_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("must not be empty".to_owned())
    } else if name.len() > MAX_SERVICE_NAME_LEN {
        Err(format!(
            "{} is longer than {MAX_SERVICE_NAME_LEN} bytes",
            quoted(name)
        ))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Err(format!(
            "{} contains characters other than A-Z, a-z, 0-9, '-', '_' and '.'",
            quoted(name)
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(quoted("web"), "\"web\"");
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(1 << 20);
        let q = quoted(&long);
        assert!(q.len() < 100, "{}", q.len());
        assert!(q.ends_with("(1048576 bytes)"), "{q}");
        let err = check_service_name(&format!("bad\nname{long}")).unwrap_err();
        assert!(!err.contains('\n') && err.len() < 200, "{err}");
    }

    #[test]
    fn backends_follow_one_set_of_address_rules() {
        let vip = ip("203.0.113.10");
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:198.51.100.11",
        ] {
            assert!(
                check_backend_address(vip, Forwarding::Tunnel, ip(bad)).is_err(),
                "{bad} was accepted"
            );
        }
        assert!(check_backend_address(vip, Forwarding::Tunnel, ip("2001:db8::11")).is_ok());
        assert!(check_backend_address(vip, Forwarding::Direct, ip("2001:db8::11")).is_err());
        assert!(check_backend_address(vip, Forwarding::Direct, ip("198.51.100.11")).is_ok());
        assert!(check_backend_address(vip, Forwarding::Nat, ip("2001:db8::11")).is_err());
        assert!(check_backend_address(vip, Forwarding::Nat, ip("198.51.100.11")).is_ok());
    }

    #[test]
    fn backend_ports_only_with_nat_and_a_service_port() {
        assert_eq!(check_backend_port(Forwarding::Nat, 80, 8080), Ok(8080));
        assert!(check_backend_port(Forwarding::Nat, 80, 0).is_err());
        assert!(check_backend_port(Forwarding::Nat, 80, 65_536).is_err());
        assert!(check_backend_port(Forwarding::Nat, 0, 8080).is_err());
        assert!(check_backend_port(Forwarding::Tunnel, 80, 8080).is_err());
        assert!(check_backend_port(Forwarding::Direct, 80, 8080).is_err());
    }

    #[test]
    fn weights() {
        assert_eq!(check_weight(0), Ok(0));
        assert_eq!(check_weight(65_535), Ok(65_535));
        assert!(check_weight(65_536).is_err());
        assert!(check_weight(-1).is_err());
        assert!(check_total_weight(&[0, 0]).is_err());
        assert!(check_total_weight(&[]).is_err());
        assert!(check_total_weight(&[0, 1]).is_ok());
    }
}
