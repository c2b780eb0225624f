//! Replays, on stable, every input kept under fuzz/regressions/<target>/: the seeds and
//! whatever the fuzzers found (each fixed, then kept here so it stays fixed).

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions dir") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("input");
        run(&data);
        count += 1;
    }
    assert!(count > 0, "no inputs in {}", dir.display());
}

#[test]
fn mqtt_stream_inputs() {
    replay("mqtt_stream", callbus::fuzzing::mqtt_stream);
}

#[test]
fn chat_publish_inputs() {
    replay("chat_publish", callbus::fuzzing::chat_publish);
}

#[test]
fn bus_envelope_inputs() {
    replay("bus_envelope", callbus::fuzzing::bus_envelope);
}

#[test]
fn rest_bodies_inputs() {
    replay("rest_bodies", callbus::fuzzing::rest_bodies);
}
