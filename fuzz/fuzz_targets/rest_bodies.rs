//! Fuzz target: see `callbus::fuzzing::rest_bodies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbus::fuzzing::rest_bodies(data));
