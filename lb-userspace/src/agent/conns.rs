//! `weir conn list` and `weir conn flush`: the NAT connections as the API shows them, read
//! from a walk of `NAT_CT` and deleted pair by pair. The owner task only checks the request
//! and packs what the walk needs ([`ConnJob`]); the walk and the deletes run on a blocking
//! thread, as the periodic table walk does, so a table of millions never stalls the owner.
//! The rules ([`list`], [`flush_keys`]) are pure and host-tested.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    FlowKey, PROTO_TCP, addr_from_bytes,
    nat::{
        NAT_NO_SNAT, NAT_PICKED_UP, NAT_REPLIED, NAT_REPLY, NAT_TCP_CLOSE, NAT_TCP_ESTABLISHED,
        NAT_TCP_FIN_WAIT, NAT_TCP_SYN_RECV, NAT_TCP_SYN_SENT, NAT_TCP_TIME_WAIT, NatEntry,
    },
};

use crate::{
    api::{self, ConnFlushed, ConnInfo, ConnList, ConnState, ErrorCode, Response},
    datapath::maps::NatWalker,
};

/// What a walk knows of a backend id: whose it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnBackend {
    pub service: String,
    pub address: IpAddr,
    /// A pair of another generation was made for an earlier owner of the id.
    pub generation: u32,
}

/// Which connections a request is about; all `None` means every one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnFilter {
    pub service: Option<String>,
    pub backend: Option<IpAddr>,
    /// Only for a list (a flush takes whole backends or services, never a state).
    pub state: Option<ConnState>,
}

impl ConnFilter {
    /// Whether an entry's pair belongs to the filtered connections.
    fn matches(&self, owner: Option<&ConnBackend>) -> bool {
        if self.service.is_none() && self.backend.is_none() {
            return true;
        }
        owner.is_some_and(|b| {
            self.service.as_ref().is_none_or(|s| *s == b.service)
                && self.backend.is_none_or(|a| a == b.address)
        })
    }
}

/// The backend that owns an entry's pair, if the id still means the backend it was made for.
fn owner<'a>(backends: &'a HashMap<u32, ConnBackend>, e: &NatEntry) -> Option<&'a ConnBackend> {
    backends
        .get(&e.backend_id)
        .filter(|b| b.generation == e.generation)
}

fn socket(addr: [u8; 16], port_be: u16, family: u8) -> SocketAddr {
    SocketAddr::new(addr_from_bytes(addr, family), u16::from_be(port_be))
}

/// The pair's state; the datapath writes it into both entries, so either says (a reply
/// seen is read from both, in case one write has not landed yet).
fn state(key: &FlowKey, e: &NatEntry, partner: Option<&NatEntry>) -> ConnState {
    if key.proto != PROTO_TCP {
        let flags = e.flags | partner.map_or(0, |p| p.flags);
        return if flags & NAT_REPLIED != 0 {
            ConnState::Replied
        } else {
            ConnState::Unreplied
        };
    }
    match e.tcp_state {
        NAT_TCP_SYN_SENT => ConnState::SynSent,
        NAT_TCP_SYN_RECV => ConnState::SynRecv,
        NAT_TCP_ESTABLISHED => ConnState::Established,
        NAT_TCP_FIN_WAIT => ConnState::FinWait,
        NAT_TCP_TIME_WAIT => ConnState::TimeWait,
        NAT_TCP_CLOSE => ConnState::Close,
        // A TCP pair always has one of the states above; the datapath writes nothing else.
        _ => ConnState::Close,
    }
}

/// The forward entries matching `filter` (a state filter by the pair's state, as listed),
/// as the API shows them, sorted by service, backend and client, at most `limit`. A pair's idle time is the shorter of its two entries' (the
/// last packet either way) and it expires when both have: the datapath's pair rule.
#[must_use]
pub fn list(
    entries: &HashMap<FlowKey, NatEntry>,
    backends: &HashMap<u32, ConnBackend>,
    filter: &ConnFilter,
    limit: usize,
    now_ns: u64,
) -> ConnList {
    let mut out: Vec<ConnInfo> = Vec::new();
    for (key, e) in entries {
        if e.flags & NAT_REPLY != 0 {
            continue;
        }
        let b = owner(backends, e);
        if !filter.matches(b) {
            continue;
        }
        let partner = entries.get(&e.partner_key(key));
        let state = state(key, e, partner);
        if filter.state.is_some_and(|want| want != state) {
            continue;
        }
        let idle_ns = |x: &NatEntry| now_ns.saturating_sub(x.last_seen_ns);
        let left_ns =
            |x: &NatEntry| (u64::from(x.timeout_s) * 1_000_000_000).saturating_sub(idle_ns(x));
        let (idle, left) = match partner {
            Some(p) => (idle_ns(e).min(idle_ns(p)), left_ns(e).max(left_ns(p))),
            None => (idle_ns(e), left_ns(e)),
        };
        out.push(ConnInfo {
            service: b.map(|b| b.service.clone()),
            protocol: if key.proto == PROTO_TCP {
                api::Protocol::Tcp
            } else {
                api::Protocol::Udp
            },
            client: socket(key.src_addr, key.src_port_be, key.family),
            vip: socket(key.dst_addr, key.dst_port_be, key.family),
            snat: (e.snat_slot != NAT_NO_SNAT)
                .then(|| socket(e.new_src_addr, e.new_src_port_be, key.family)),
            backend: socket(e.new_dst_addr, e.new_dst_port_be, key.family),
            state,
            idle_seconds: idle / 1_000_000_000,
            expires_in_seconds: left / 1_000_000_000,
            picked_up: e.flags & NAT_PICKED_UP != 0,
        });
    }
    out.sort_by(|a, b| {
        (&a.service, a.backend, a.client, a.vip).cmp(&(&b.service, b.backend, b.client, b.vip))
    });
    let total = out.len() as u64;
    let truncated = out.len() > limit;
    out.truncate(limit);
    ConnList {
        total,
        truncated,
        connections: out,
    }
}

/// The keys to delete for a flush: both entries of every pair whose either entry matches
/// `filter` (a half pair too), and how many pairs that is.
#[must_use]
pub fn flush_keys(
    entries: &HashMap<FlowKey, NatEntry>,
    backends: &HashMap<u32, ConnBackend>,
    filter: &ConnFilter,
) -> (u64, Vec<FlowKey>) {
    let mut pairs = HashSet::new();
    let mut keys = HashSet::new();
    for (key, e) in entries {
        if !filter.matches(owner(backends, e)) {
            continue;
        }
        let partner = e.partner_key(key);
        // A pair is named by its forward key, whichever entry was seen.
        pairs.insert(if e.flags & NAT_REPLY == 0 {
            *key
        } else {
            partner
        });
        keys.insert(*key);
        keys.insert(partner);
    }
    (pairs.len() as u64, keys.into_iter().collect())
}

/// What a `conn_list` or `conn_flush` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnAction {
    List { limit: usize },
    Flush,
}

/// A walk of the NAT table for the API, sent to a blocking thread.
#[derive(Debug)]
pub struct ConnJob {
    pub walker: NatWalker,
    pub backends: HashMap<u32, ConnBackend>,
    pub filter: ConnFilter,
    pub action: ConnAction,
}

impl ConnJob {
    /// Walks the table (and deletes, for a flush); blocking.
    #[must_use]
    pub fn run(self) -> Response {
        let now_ns = crate::sys::monotonic_coarse_ns();
        let mut table = HashMap::new();
        if let Err(err) = self.walker.walk(|key, value| {
            table.insert(*key, *value);
        }) {
            return Response::error(
                ErrorCode::Internal,
                format!("walking the NAT table failed: {err}"),
            );
        }
        match self.action {
            ConnAction::List { limit } => {
                Response::ok(list(&table, &self.backends, &self.filter, limit, now_ns))
            }
            ConnAction::Flush => {
                let (connections, keys) = flush_keys(&table, &self.backends, &self.filter);
                match self.walker.delete(&keys) {
                    Ok(entries) => {
                        tracing::info!(
                            connections,
                            entries,
                            service = ?self.filter.service,
                            backend = ?self.filter.backend,
                            "NAT connections flushed"
                        );
                        Response::ok(ConnFlushed {
                            connections,
                            entries: entries as u64,
                        })
                    }
                    Err(err) => Response::error(
                        ErrorCode::Internal,
                        format!(
                            "deleting the NAT pairs failed: {err} (some may be gone; \
                             `weir conn list` shows what is left)"
                        ),
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{
        FAMILY_V4, PROTO_UDP, addr_bytes,
        nat::{NAT_NO_SNAT, NAT_TCP_ESTABLISHED},
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A `nat` pair: client 203.0.113.7:`cport` → VIP 198.51.100.10:80 ⇒ `backend`:8080,
    /// backend id `id` (generation 1), the forward entry idle `fwd_idle` s and the reply
    /// `reply_idle` s, both with a 100 s timeout.
    fn pair(
        id: u32,
        backend: &str,
        cport: u16,
        proto: u8,
        fwd_idle: u64,
        reply_idle: u64,
        now: u64,
    ) -> [(FlowKey, NatEntry); 2] {
        let addr = |t: &str| addr_bytes(ip(t)).0;
        let (client, vip, be) = (addr("203.0.113.7"), addr("198.51.100.10"), addr(backend));
        let fwd_key = FlowKey {
            src_addr: client,
            dst_addr: vip,
            src_port_be: cport.to_be(),
            dst_port_be: 80u16.to_be(),
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let fwd = NatEntry {
            new_src_addr: client,
            new_dst_addr: be,
            new_src_port_be: cport.to_be(),
            new_dst_port_be: 8080u16.to_be(),
            backend_id: id,
            generation: 1,
            last_seen_ns: now - fwd_idle * S,
            timeout_s: 100,
            tcp_state: if proto == PROTO_TCP {
                NAT_TCP_ESTABLISHED
            } else {
                0
            },
            snat_slot: NAT_NO_SNAT,
            ..NatEntry::default()
        };
        let reply_key = fwd.partner_key(&fwd_key);
        let reply = NatEntry {
            new_src_addr: vip,
            new_dst_addr: client,
            new_src_port_be: 80u16.to_be(),
            new_dst_port_be: cport.to_be(),
            flags: NAT_REPLY | NAT_REPLIED,
            last_seen_ns: now - reply_idle * S,
            ..fwd
        };
        assert_eq!(reply.partner_key(&reply_key), fwd_key);
        [(fwd_key, fwd), (reply_key, reply)]
    }

    fn backends() -> HashMap<u32, ConnBackend> {
        [
            (1, "web", "198.51.100.11"),
            (2, "web", "198.51.100.12"),
            (3, "dns", "198.51.100.13"),
        ]
        .into_iter()
        .map(|(id, service, address)| {
            (
                id,
                ConnBackend {
                    service: service.into(),
                    address: ip(address),
                    generation: 1,
                },
            )
        })
        .collect()
    }

    fn table(now: u64) -> HashMap<FlowKey, NatEntry> {
        [
            pair(2, "198.51.100.12", 40001, PROTO_TCP, 5, 3, now),
            pair(1, "198.51.100.11", 40002, PROTO_TCP, 150, 40, now),
            pair(1, "198.51.100.11", 40000, PROTO_TCP, 1, 1, now),
            pair(3, "198.51.100.13", 40003, PROTO_UDP, 2, 2, now),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn filter(service: Option<&str>, backend: Option<&str>) -> ConnFilter {
        ConnFilter {
            service: service.map(Into::into),
            backend: backend.map(ip),
            state: None,
        }
    }

    #[test]
    fn the_list_shows_forward_entries_sorted_with_the_pair_rule() {
        let now = 10_000 * S;
        let all = list(&table(now), &backends(), &filter(None, None), 100, now);
        assert_eq!((all.total, all.truncated), (4, false));
        let rows: Vec<(Option<&str>, String, u16, ConnState)> = all
            .connections
            .iter()
            .map(|c| {
                (
                    c.service.as_deref(),
                    c.backend.to_string(),
                    c.client.port(),
                    c.state,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    Some("dns"),
                    "198.51.100.13:8080".into(),
                    40003,
                    ConnState::Replied
                ),
                (
                    Some("web"),
                    "198.51.100.11:8080".into(),
                    40000,
                    ConnState::Established
                ),
                (
                    Some("web"),
                    "198.51.100.11:8080".into(),
                    40002,
                    ConnState::Established
                ),
                (
                    Some("web"),
                    "198.51.100.12:8080".into(),
                    40001,
                    ConnState::Established
                ),
            ]
        );
        let c = &all.connections[2];
        assert_eq!(c.client, "203.0.113.7:40002".parse().unwrap());
        assert_eq!(c.vip, "198.51.100.10:80".parse().unwrap());
        // Forward idle 150 s (past its 100 s), reply 40 s: the pair is alive, 60 s left.
        assert_eq!((c.idle_seconds, c.expires_in_seconds), (40, 60));
        assert!(!c.picked_up);
    }

    #[test]
    fn filters_and_the_limit() {
        let now = 10_000 * S;
        let (t, b) = (table(now), backends());
        let ports =
            |l: &ConnList| -> Vec<u16> { l.connections.iter().map(|c| c.client.port()).collect() };
        let web = list(&t, &b, &filter(Some("web"), None), 100, now);
        assert_eq!(ports(&web), [40000, 40002, 40001]);
        let one = list(&t, &b, &filter(None, Some("198.51.100.11")), 100, now);
        assert_eq!(ports(&one), [40000, 40002]);
        let both = list(
            &t,
            &b,
            &filter(Some("dns"), Some("198.51.100.11")),
            100,
            now,
        );
        assert_eq!((both.total, both.connections.len()), (0, 0));
        let cut = list(&t, &b, &filter(Some("web"), None), 2, now);
        assert_eq!(
            (cut.total, cut.truncated, ports(&cut)),
            (3, true, vec![40000, 40002])
        );
        // A pair of an earlier owner of id 1 (another generation) is nobody's now.
        let mut stale = backends();
        stale.get_mut(&1).unwrap().generation = 2;
        let listed = list(&t, &stale, &filter(None, None), 100, now);
        assert_eq!(
            listed
                .connections
                .iter()
                .filter(|c| c.service.is_none())
                .count(),
            2
        );
        assert_eq!(
            list(&t, &stale, &filter(None, Some("198.51.100.11")), 100, now).total,
            0
        );
    }

    #[test]
    fn the_state_filter_and_the_snat_source() {
        let now = 10_000 * S;
        let mut t = table(now);
        // Client port 40001 becomes a fullnat pair in TIME_WAIT: its forward entry's new
        // source is the SNAT address and port.
        let snat = addr_bytes(ip("198.51.100.1")).0;
        for (key, e) in &mut t {
            if e.backend_id == 2 {
                e.tcp_state = NAT_TCP_TIME_WAIT;
                e.snat_slot = 0;
                if e.flags & NAT_REPLY == 0 {
                    e.new_src_addr = snat;
                    e.new_src_port_be = 61_007u16.to_be();
                }
                assert_eq!(key.proto, PROTO_TCP);
            }
        }
        let b = backends();
        let by_state = |state| ConnFilter {
            state: Some(state),
            ..filter(None, None)
        };
        let waiting = list(&t, &b, &by_state(ConnState::TimeWait), 100, now);
        assert_eq!(waiting.total, 1);
        let c = &waiting.connections[0];
        assert_eq!(c.client.port(), 40001);
        assert_eq!(c.snat, Some("198.51.100.1:61007".parse().unwrap()));
        assert_eq!(
            list(&t, &b, &by_state(ConnState::Established), 100, now).total,
            2
        );
        let udp = list(&t, &b, &by_state(ConnState::Replied), 100, now);
        assert_eq!(
            (udp.total, udp.connections[0].protocol),
            (1, api::Protocol::Udp)
        );
        assert_eq!(
            udp.connections[0].snat, None,
            "a nat pair has no SNAT source"
        );
        // The state filter narrows the others.
        let none = ConnFilter {
            state: Some(ConnState::TimeWait),
            ..filter(Some("dns"), None)
        };
        assert_eq!(list(&t, &b, &none, 100, now).total, 0);
    }

    #[test]
    fn a_flush_takes_both_entries_of_each_matching_pair() {
        let now = 10_000 * S;
        let t = table(now);
        let (pairs, keys) = flush_keys(&t, &backends(), &filter(None, Some("198.51.100.11")));
        assert_eq!((pairs, keys.len()), (2, 4));
        for key in &keys {
            let e = &t[key];
            assert_eq!(e.backend_id, 1);
            assert!(keys.contains(&e.partner_key(key)));
        }
        // Half a pair (its forward entry gone): the reply entry goes, counted as one pair.
        let [(fwd_key, _), (reply_key, reply)] =
            pair(2, "198.51.100.12", 40009, PROTO_TCP, 1, 1, now);
        let half: HashMap<FlowKey, NatEntry> = [(reply_key, reply)].into_iter().collect();
        let (pairs, keys) = flush_keys(&half, &backends(), &filter(Some("web"), None));
        assert_eq!(pairs, 1);
        assert_eq!(
            keys.iter().copied().collect::<HashSet<_>>(),
            HashSet::from([reply_key, fwd_key])
        );
        let (pairs, keys) = flush_keys(&t, &backends(), &filter(Some("nothing"), None));
        assert_eq!((pairs, keys.len()), (0, 0));
        let (pairs, keys) = flush_keys(&t, &backends(), &filter(None, None));
        assert_eq!((pairs, keys.len()), (4, 8));
    }
}
