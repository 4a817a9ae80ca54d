//! Per-service source rules (`allow` / `deny` prefix lists): the `SOURCE_RULES` LPM trie's
//! key and value, the `VipInfo::source_rules` flags, and the key of a packet's source
//! ([`source_key`]). One trie holds every service's rules of both families: a key is the
//! service id and the family (always matched whole, [`FIXED_BITS`]) followed by the address,
//! so the longest prefix that matches is the most specific rule of that service.
//!
//! The datapath checks a service's rules before scheduling a flow it has no entry for (a
//! new connection, or a packet of one it lost); tracked flows are not re-checked.

use crate::{FAMILY_V4, MAX_SERVICES};

/// Most rules (allow and deny together) per service; a service's rules use the counter slots
/// `service_id * MAX_RULES_PER_SERVICE ..`.
pub const MAX_RULES_PER_SERVICE: u32 = 64;
/// Size of `SOURCE_RULES` and `SOURCE_RULE_STATS`.
pub const MAX_SOURCE_RULES: u32 = MAX_SERVICES * MAX_RULES_PER_SERVICE;

/// `SourceRule::action`: the source may make new flows.
pub const RULE_ALLOW: u32 = 1;
/// `SourceRule::action`: new flows from the source are dropped (`drop_source_denied`).
pub const RULE_DENY: u32 = 2;

/// `VipInfo::source_rules`: the service has rules (the datapath looks them up).
pub const SOURCE_RULES_ANY: u8 = 1;
/// `VipInfo::source_rules`: the service has `allow` rules, so a source no rule matches is
/// refused (`drop_source_not_allowed`).
pub const SOURCE_RULES_ALLOWLIST: u8 = 2;

/// Bits of [`SourceRuleData`] before the address, always matched whole: the service id, the
/// family and its padding.
pub const FIXED_BITS: u32 = 64;

/// The data of a `SOURCE_RULES` key (after the LPM trie's `prefix_len`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourceRuleData {
    /// The service's id, in host order (only ever compared whole).
    pub service_id: u32,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
    /// The source prefix (IPv4 in the first 4 bytes), host bits zero.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SourceRuleData>() == 24);

/// Value of `SOURCE_RULES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceRule {
    /// `RULE_ALLOW` or `RULE_DENY`.
    pub action: u32,
    /// The rule's counter in `SOURCE_RULE_STATS` (packets it decided).
    pub index: u32,
}
const _: () = assert!(size_of::<SourceRule>() == 8);

/// The address bits of a family.
#[must_use]
pub const fn address_bits(family: u8) -> u32 {
    if family == FAMILY_V4 { 32 } else { 128 }
}

/// The key data and prefix length that look up a packet's source `addr` in `service_id`'s
/// rules: the whole address.
#[must_use]
pub const fn source_key(service_id: u32, family: u8, addr: [u8; 16]) -> (u32, SourceRuleData) {
    (
        FIXED_BITS + address_bits(family),
        SourceRuleData {
            service_id,
            family,
            _pad: [0; 3],
            addr,
        },
    )
}

/// The key data and prefix length of a rule for `prefix_len` bits of `addr` (host bits must
/// already be zero).
#[must_use]
pub const fn rule_key(
    service_id: u32,
    family: u8,
    addr: [u8; 16],
    prefix_len: u8,
) -> (u32, SourceRuleData) {
    let (_, data) = source_key(service_id, family, addr);
    (FIXED_BITS + prefix_len as u32, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FAMILY_V6;

    #[test]
    fn keys_match_the_service_and_family_whole() {
        let (len, data) = source_key(
            3,
            FAMILY_V4,
            [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(len, 96);
        assert_eq!(data.service_id, 3);
        let (len, _) = source_key(3, FAMILY_V6, [0x20; 16]);
        assert_eq!(len, 192);
        let (len, _) = rule_key(
            3,
            FAMILY_V4,
            [198, 51, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            24,
        );
        assert_eq!(len, 88);
        assert_eq!(MAX_SOURCE_RULES, 4096);
    }
}
