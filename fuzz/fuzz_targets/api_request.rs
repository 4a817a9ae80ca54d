//! Fuzzes the remote API's HTTP request parser and the JSON request: the properties are `weir::fuzzing::api_request`'s.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::api_request(data));
