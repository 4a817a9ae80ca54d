//! The properties the fuzz targets (`fuzz/`, cargo-fuzz) check, one function per target, in
//! the library so that the regression test replays every saved input through exactly what
//! the fuzzer ran: the config parser, the remote API's request parser, and lb-common's
//! packet logic (checksums, ICMP classification, quoted flows). Each panics when a property
//! fails; any input must otherwise be handled without a panic.

use std::path::Path;

use lb_common::{FlowKey, csum, icmp, inbound};

use crate::api::{MAX_REQUEST_BYTES, Request, http};

/// The config parser: any text is accepted or refused with an error naming the file, never a
/// panic; an accepted config satisfies the limits validation promises.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            assert!(!config.services.is_empty());
            assert!(config.services.len() <= lb_common::MAX_SERVICES as usize);
            assert!(config.backend_count() <= lb_common::MAX_BACKENDS as usize);
            assert!(config.agent.audit_max_bytes >= crate::config::MIN_AUDIT_MAX_BYTES);
        }
        Err(err) => assert!(err.to_string().starts_with("fuzz.toml: ")),
    }
}

/// The remote API's request parser: a whole request never claims more body than it holds or
/// than the limit; a request JSON that parses serializes back to itself.
pub fn api_request(data: &[u8]) {
    match http::parse(data) {
        Ok(http::Parsed::Complete(request)) => {
            assert!(request.body.len() <= MAX_REQUEST_BYTES);
            assert!(request.body.len() <= data.len());
            assert!(request.path.starts_with('/'));
            let _ = request.bearer();
            request_round_trip(&request.body);
        }
        Ok(http::Parsed::Incomplete) => {
            assert!(data.len() <= http::MAX_HEAD_BYTES + MAX_REQUEST_BYTES + 4)
        }
        Err(err) => assert!((400..600).contains(&err.status())),
    }
    request_round_trip(data);
}

fn request_round_trip(body: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<Request>(body) {
        let text = serde_json::to_vec(&request).expect("a request serializes");
        let again: Request = serde_json::from_slice(&text).expect("a serialized request parses");
        assert_eq!(again, request);
        let _ = (request.name(), request.is_change(), request.target());
    }
}

/// lb-common's packet logic: checksums verify after they are written, an incremental update
/// (RFC 1624) equals a recomputation, and the ICMP rules are total and symmetric.
pub fn packet(data: &[u8]) {
    // An IPv4 header with its checksum written verifies; one flipped bit does not.
    if data.len() >= 20 {
        let mut hdr = [0u8; 20];
        hdr.copy_from_slice(&data[..20]);
        hdr[10] = 0;
        hdr[11] = 0;
        let check = csum::ipv4_header_checksum(&hdr);
        hdr[10..12].copy_from_slice(&check.to_be_bytes());
        assert!(csum::ipv4_header_valid(&hdr));
        let bit = usize::from(data[0]) % 160;
        hdr[bit / 8] ^= 1 << (bit % 8);
        // A flipped bit changes the sum unless it turns 0x0000 into 0xffff or back, the
        // one's complement's two zeros; that needs a word of all ones or zeros.
        let word = bit / 16 * 2;
        let w = u16::from_be_bytes([hdr[word], hdr[word + 1]]);
        if w != 0 && w != 0xffff {
            assert!(!csum::ipv4_header_valid(&hdr));
        }
    }
    // Replacing one 16-bit word: the incremental checksum equals the recomputed one (both
    // in one's complement, where 0x0000 and 0xffff are the same number).
    if data.len() >= 6 && data.len().is_multiple_of(2) {
        let mut bytes = data[2..].to_vec();
        let check = icmp::checksum(&bytes);
        let at = usize::from(data[0]) % (bytes.len() / 2) * 2;
        let old = u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let new = u16::from_be_bytes([data[1], data[0]]);
        bytes[at..at + 2].copy_from_slice(&new.to_be_bytes());
        let updated = inbound::csum_replace16(check, old, new);
        let recomputed = icmp::checksum(&bytes);
        let norm = |c: u16| if c == 0xffff { 0 } else { c };
        assert_eq!(
            norm(updated),
            norm(recomputed),
            "old {old:#x} new {new:#x} at {at}"
        );
    }
    // Every (family, type, code) has a kind; the quoted flow of a quoted flow is the flow.
    if data.len() >= 3 {
        let _ = inbound::icmp_kind(data[0] & 1, data[1], data[2]);
    }
    if data.len() >= 38 {
        let mut key = FlowKey::default();
        key.src_addr.copy_from_slice(&data[..16]);
        key.dst_addr.copy_from_slice(&data[16..32]);
        key.src_port_be = u16::from_ne_bytes([data[32], data[33]]);
        key.dst_port_be = u16::from_ne_bytes([data[34], data[35]]);
        key.proto = data[36];
        key.family = data[37];
        assert_eq!(inbound::quoted_flow(&inbound::quoted_flow(&key)), key);
        let _ = inbound::fragment_key(key.dst_addr, key.family, key.proto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzers found (or that was worth keeping), replayed:
    /// `tests/fuzz-regressions/TARGET/*`.
    #[test]
    fn saved_fuzz_inputs_still_pass() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz-regressions");
        let mut replayed = 0;
        for (target, check) in [
            ("config", config as fn(&[u8])),
            ("api_request", api_request),
            ("packet", packet),
        ] {
            let dir = root.join(target);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "md") {
                    continue;
                }
                check(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed >= 3, "the seeds are missing");
    }

    #[test]
    fn the_properties_hold_for_ordinary_inputs() {
        packet(&[0x45; 64]);
        packet(&(0..=255).collect::<Vec<u8>>());
        api_request(b"POST /v1/request HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"cmd\":\"reload\"}");
        config(include_bytes!("../../config/weir.toml"));
    }
}
