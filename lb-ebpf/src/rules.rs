//! Per-service source rules (`allow` / `deny`, lb-common's `rules`): [`admit`] decides
//! whether a flow a service has no entry for may be scheduled. Tracked flows never come
//! here, and a service without rules pays one byte test.

use lb_common::{
    FlowKey, VipInfo,
    rules::{RULE_DENY, SOURCE_RULES_ALLOWLIST, SOURCE_RULES_ANY, source_key},
    stat,
};

use crate::{
    maps::{RULE_SCRATCH, SOURCE_RULE_STATS, SOURCE_RULES},
    stats::{Exit, drop},
};

/// `Ok`: the flow may be scheduled. Otherwise the drop: the most specific rule covering the
/// source is a `deny` (`drop_source_denied`), or the service has `allow` rules and none
/// covers it (`drop_source_not_allowed`). The deciding rule's counter is bumped either way.
#[inline(always)]
pub(crate) fn admit(vip: &VipInfo, key: &FlowKey) -> Result<(), Exit> {
    if vip.source_rules & SOURCE_RULES_ANY == 0 {
        return Ok(());
    }
    // A missing scratch (cannot happen: a one-slot per-CPU array) refuses rather than
    // admits, since the service asked for rules.
    let lookup = RULE_SCRATCH
        .get_ptr_mut(0)
        .ok_or(drop(stat::DROP_SOURCE_NOT_ALLOWED))?;
    let (prefix_len, data) = source_key(vip.service_id, key.family, key.src_addr);
    // SAFETY: this CPU's slot of a per-CPU array; XDP runs with preemption disabled and
    // nothing else holds a reference to it. The key is written whole (it is packed).
    unsafe {
        (*lookup).prefix_len = prefix_len;
        (*lookup).data = data;
    }
    // SAFETY: as above; the lookup only reads the key.
    match SOURCE_RULES.get(unsafe { &*lookup }) {
        Some(rule) => {
            if let Some(count) = SOURCE_RULE_STATS.get_ptr_mut(rule.index) {
                // SAFETY: this CPU's counter; no concurrent writer (preemption disabled).
                unsafe { *count += 1 };
            }
            if rule.action == RULE_DENY {
                return Err(drop(stat::DROP_SOURCE_DENIED));
            }
            Ok(())
        }
        None if vip.source_rules & SOURCE_RULES_ALLOWLIST != 0 => {
            Err(drop(stat::DROP_SOURCE_NOT_ALLOWED))
        }
        None => Ok(()),
    }
}
