//! Fuzz target: see `callbus::fuzzing::bus_envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbus::fuzzing::bus_envelope(data));
