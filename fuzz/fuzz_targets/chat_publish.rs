//! Fuzz target: see `callbus::fuzzing::chat_publish`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callbus::fuzzing::chat_publish(data));
