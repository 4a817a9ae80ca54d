//! Fuzzes lb-common's packet logic (checksums, ICMP rules, quoted flows): the properties are `weir::fuzzing::packet`'s.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::packet(data));
