//! Fuzzes the config parser (`weir::config::parse`): the properties are `weir::fuzzing::config`'s.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::config(data));
