//! Fuzz target: see `callbus::fuzzing::mqtt_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbus::fuzzing::mqtt_stream(data));
