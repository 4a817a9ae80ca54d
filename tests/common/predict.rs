//! Where the datapath sends new flows, computed with the code it runs: lb-common's flow hash
//! over the 5-tuple as lb-ebpf keys it, indexing the Maglev ring as the agent builds it
//! (`maglev::build_ring` over the keys service name, 0, address), and the smooth round-robin
//! sequence the agent writes for `round-robin`. With fixed source ports the end-to-end tests
//! can then expect exact counts per backend.
//!
//! Backend ids do not matter here: the ring's slots depend only on the backends' keys and
//! weights (`build_ring` orders backends by key, which is unique per backend; ids only break
//! ties between equal keys), and a round-robin cycle holds each backend `weight` times
//! whatever its id, so ids are stood in for by the backends' positions in the config.

use std::{
    net::{IpAddr, SocketAddr},
    ops::Range,
};

use lb_common::{
    DEFAULT_RING_SIZE, FlowKey, MAX_RING_SIZE, PROTO_TCP, PROTO_UDP, addr_bytes,
    hash::{flow_hash, source_hash},
    maglev::{self, MaglevBackend},
    rr,
};
use weir_testbed::ServiceBuilder;

/// The connection-table key of a packet from `src` to `dst`, as the datapath fills it in:
/// addresses in 16 bytes (IPv4 in the first four), ports in network byte order.
pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    let (src_addr, family) = addr_bytes(src.ip());
    let (dst_addr, _) = addr_bytes(dst.ip());
    FlowKey {
        src_addr,
        dst_addr,
        src_port_be: src.port().to_be(),
        dst_port_be: dst.port().to_be(),
        proto,
        family,
        ..FlowKey::default()
    }
}

fn protocol(service: &ServiceBuilder) -> u8 {
    match service.protocol() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        other => panic!("service {}: protocol {other:?}", service.name()),
    }
}

/// The ring weights the agent gives the backends of `service` while every one is healthy and
/// enabled and no slow start runs: its configured weight (default 1), except a backup's,
/// which is 0 while some primary takes new flows.
pub fn ring_weights(service: &ServiceBuilder) -> Vec<u32> {
    let weight = |b: &weir_testbed::Backend| b.weight.unwrap_or(1);
    let primary_serving = service
        .backends()
        .iter()
        .any(|b| b.backup != Some(true) && weight(b) > 0);
    service
        .backends()
        .iter()
        .map(|b| {
            if b.backup == Some(true) && primary_serving {
                0
            } else {
                weight(b)
            }
        })
        .collect()
}

/// The Maglev ring of `service` with the given ring weights (one per backend, in config
/// order): for each slot, the index of the backend in the config, or None for an empty slot.
pub fn maglev_ring(service: &ServiceBuilder, weights: &[u32]) -> Vec<Option<usize>> {
    assert_eq!(
        weights.len(),
        service.backends().len(),
        "one weight per backend of {}",
        service.name()
    );
    // The agent's `maglev_key`: the service's name, a zero byte, the address's map bytes.
    let keys: Vec<Vec<u8>> = service
        .backends()
        .iter()
        .map(|b| {
            let mut key = service.name().as_bytes().to_vec();
            key.push(0);
            key.extend_from_slice(&addr_bytes(b.address).0);
            key
        })
        .collect();
    let members: Vec<MaglevBackend<'_>> = keys
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (key, &weight))| MaglevBackend {
            id: u32::try_from(i).expect("backend index"),
            weight,
            key,
        })
        .collect();
    let size = service.ring_slots().unwrap_or(DEFAULT_RING_SIZE);
    maglev::build_ring(&members, size)
        .into_iter()
        .map(|id| usize::try_from(id).ok().filter(|&i| i < weights.len()))
        .collect()
}

/// The backend (index in the config) of each flow from `client` and `src_ports`, in port
/// order, over one ring built with `weights`.
pub fn maglev_backends(
    service: &ServiceBuilder,
    weights: &[u32],
    client: IpAddr,
    src_ports: Range<u16>,
) -> Vec<usize> {
    let ring = maglev_ring(service, weights);
    src_ports
        .map(|port| pick(service, &ring, client, port))
        .collect()
}

/// The backend (index in the config) a new flow from `client:src_port` to the service's VIP
/// and port gets: the ring slot of the flow hash, or of the source hash for `ip-hash`.
fn pick(service: &ServiceBuilder, ring: &[Option<usize>], client: IpAddr, src_port: u16) -> usize {
    let key = flow_key(
        SocketAddr::new(client, src_port),
        SocketAddr::new(service.vip(), service.port()),
        protocol(service),
    );
    let hash = if service.scheduler_name() == Some("ip-hash") {
        source_hash(&key)
    } else {
        flow_hash(&key)
    };
    let len = u32::try_from(ring.len()).expect("ring size");
    let slot = usize::try_from(hash % len).expect("slot");
    ring[slot].unwrap_or_else(|| panic!("{}: empty ring slot {slot}", service.name()))
}

/// New flows per backend (config order) from `client` with one flow per source port of
/// `src_ports`, on a Maglev or ip-hash `service` whose ring has `weights`.
pub fn maglev_counts(
    service: &ServiceBuilder,
    weights: &[u32],
    client: IpAddr,
    src_ports: Range<u16>,
) -> Vec<u64> {
    let ring = maglev_ring(service, weights);
    let mut counts = vec![0u64; weights.len()];
    for port in src_ports {
        counts[pick(service, &ring, client, port)] += 1;
    }
    counts
}

/// The backend (index in the config) of a flow from `client:src_port` on a Maglev or
/// ip-hash `service` whose ring has `weights`.
pub fn maglev_backend(
    service: &ServiceBuilder,
    weights: &[u32],
    client: IpAddr,
    src_port: u16,
) -> usize {
    pick(service, &maglev_ring(service, weights), client, src_port)
}

/// New flows per backend for `flows` new flows of a round-robin service with `weights`, all
/// scheduled on one CPU: each CPU walks the agent's sequence from a position of its own, so
/// only whole cycles give counts that do not depend on where the walk started.
///
/// # Panics
///
/// If `flows` is not a whole number of cycles of the sequence.
pub fn round_robin_counts(weights: &[u32], flows: usize) -> Vec<u64> {
    let members: Vec<(u32, u32)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (u32::try_from(i).expect("backend index"), w))
        .collect();
    let sequence = rr::smooth_sequence(&members, MAX_RING_SIZE);
    assert!(
        flows.is_multiple_of(sequence.len()),
        "{flows} flows are not whole cycles of the {}-step sequence {sequence:?}",
        sequence.len()
    );
    let cycles = u64::try_from(flows / sequence.len()).expect("cycles");
    let mut counts = vec![0u64; weights.len()];
    for id in sequence {
        counts[usize::try_from(id).expect("backend id")] += cycles;
    }
    counts
}

/// Whether `observed` (flows per backend, in ring order) is a split that round-robin can
/// give for `flows` new flows: each CPU walks the smooth weighted sequence from its own
/// position (`RR_COUNTERS` is per CPU, as NGINX's position is per worker), so the counts are
/// the sum of one prefix of the sequence per CPU, whatever share of the flows each CPU saw.
/// On one CPU that is exactly `round_robin_counts`; a flow whose packets the kernel handed to
/// another CPU moves the split by that CPU's prefix, and nothing else may.
#[must_use]
pub fn round_robin_split_possible(weights: &[u32], flows: usize, observed: &[u64]) -> bool {
    let members: Vec<(u32, u32)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (u32::try_from(i).expect("backend index"), w))
        .collect();
    let sequence = rr::smooth_sequence(&members, MAX_RING_SIZE);
    if sequence.is_empty() || observed.iter().sum::<u64>() != flows as u64 {
        return false;
    }
    // The counts of the first n steps, for every n up to `flows`.
    let mut prefixes = vec![vec![0u64; weights.len()]];
    for n in 0..flows {
        let mut next = prefixes[n].clone();
        next[usize::try_from(sequence[n % sequence.len()]).expect("backend id")] += 1;
        prefixes.push(next);
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // Sums of one prefix per CPU that stay within `observed` (a sum that exceeds it in any
    // backend cannot grow back), by the flows they account for.
    let mut sums: std::collections::BTreeSet<Vec<u64>> = [vec![0u64; weights.len()]].into();
    for _ in 0..cpus {
        let mut next = std::collections::BTreeSet::new();
        for sum in &sums {
            let used = usize::try_from(sum.iter().sum::<u64>()).expect("flows");
            for prefix in &prefixes[..=flows - used] {
                let s: Vec<u64> = sum.iter().zip(prefix).map(|(a, b)| a + b).collect();
                if s.iter().zip(observed).all(|(a, b)| a <= b) {
                    next.insert(s);
                }
            }
        }
        sums = next;
    }
    sums.contains(observed)
}
