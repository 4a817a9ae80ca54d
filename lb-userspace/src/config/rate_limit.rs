//! A service's `[service.rate_limit]` table: the validated [`RateLimitConfig`], its raw form,
//! its validation (file order, key and reason in every error), and the datapath value it
//! becomes ([`RateLimitConfig::datapath`]).

use std::net::IpAddr;

use lb_common::rate::{Gcra, MAX_BURST, MAX_RATE, RateLimits, prefix_mask};
use serde::Deserialize;

use super::{Fail, fail};

/// `[service.rate_limit]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) new_flows_per_source: Option<i64>,
    pub(super) source_burst: Option<i64>,
    pub(super) source_prefix: Option<i64>,
    pub(super) new_flows_per_vip: Option<i64>,
    pub(super) vip_burst: Option<i64>,
}

/// One limit: `rate` new flows per second, in bursts of at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimit {
    pub rate: u64,
    pub burst: u64,
}

impl FlowLimit {
    /// The default burst of a rate: a tenth of a second's flows (at least 1), so that no
    /// one-second window admits more than 110% of the rate.
    #[must_use]
    pub const fn default_burst(rate: u64) -> u64 {
        if rate < 10 { 1 } else { rate / 10 }
    }
}

/// A service's limits on new flows (TCP SYNs, UDP datagrams without an entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitConfig {
    /// Per source, or per source prefix of `source_prefix` bits.
    pub per_source: Option<FlowLimit>,
    /// The leading bits of a source that share a bucket: the whole address by default.
    pub source_prefix: u8,
    /// The service's VIP (its address, port and protocol), all sources together.
    pub per_vip: Option<FlowLimit>,
}

impl RateLimitConfig {
    /// Whether any limit is set.
    #[must_use]
    pub const fn any(&self) -> bool {
        self.per_source.is_some() || self.per_vip.is_some()
    }

    /// The datapath's `RATE_LIMITS` value (all zero: no limits).
    #[must_use]
    pub fn datapath(&self) -> RateLimits {
        let gcra = |limit: Option<FlowLimit>| {
            limit.map_or(Gcra::default(), |l| Gcra::new(l.rate, l.burst))
        };
        RateLimits {
            source_flows: gcra(self.per_source),
            vip_flows: gcra(self.per_vip),
            source_mask: prefix_mask(self.source_prefix),
        }
    }
}

/// Validates `raw` for a service whose VIP is `vip`; `prefix` is the service's key
/// (`service[0]`).
pub(super) fn validate(
    prefix: &str,
    vip: IpAddr,
    raw: Option<RawRateLimit>,
) -> Result<RateLimitConfig, Fail> {
    let bits: u8 = if vip.is_ipv4() { 32 } else { 128 };
    let Some(raw) = raw else {
        return Ok(RateLimitConfig {
            source_prefix: bits,
            ..RateLimitConfig::default()
        });
    };
    let key = |field: &str| format!("{prefix}.rate_limit.{field}");
    let count = |value: i64, field: &str, what: &str, max: u64| -> Result<u64, Fail> {
        u64::try_from(value)
            .ok()
            .filter(|v| (1..=max).contains(v))
            .ok_or_else(|| {
                fail(
                    key(field),
                    format!("{value} is out of range ({what}: 1 to {max})"),
                )
            })
    };
    let limit = |rate: Option<i64>,
                 rate_field: &str,
                 burst: Option<i64>,
                 burst_field: &str|
     -> Result<Option<FlowLimit>, Fail> {
        let Some(rate) = rate else {
            if burst.is_some() {
                return Err(fail(
                    key(burst_field),
                    format!("a burst needs its rate: `{rate_field}` is not set"),
                ));
            }
            return Ok(None);
        };
        let rate = count(rate, rate_field, "new flows per second", MAX_RATE)?;
        let burst = match burst {
            None => FlowLimit::default_burst(rate),
            Some(b) => count(b, burst_field, "new flows", MAX_BURST)?,
        };
        Ok(Some(FlowLimit { rate, burst }))
    };
    let per_source = limit(
        raw.new_flows_per_source,
        "new_flows_per_source",
        raw.source_burst,
        "source_burst",
    )?;
    let source_prefix = match raw.source_prefix {
        None => bits,
        Some(_) if per_source.is_none() => {
            return Err(fail(
                key("source_prefix"),
                "groups the sources of `new_flows_per_source`, which is not set",
            ));
        }
        Some(len) => u8::try_from(len)
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| {
                fail(
                    key("source_prefix"),
                    format!("{len} is out of range (0 to {bits} for the VIP's family)"),
                )
            })?,
    };
    let per_vip = limit(
        raw.new_flows_per_vip,
        "new_flows_per_vip",
        raw.vip_burst,
        "vip_burst",
    )?;
    Ok(RateLimitConfig {
        per_source,
        source_prefix,
        per_vip,
    })
}
