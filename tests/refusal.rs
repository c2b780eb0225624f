//! Refused CONNECTs over WebSocket reach MQTT.js (in Node) as their reason code, even when the
//! client writes its CONNECT in several frames (tests/e2e/refusal.mjs). Needs `npm ci`.

mod common;

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_sees_the_refusal_not_a_broken_pipe() {
    let s = common::TestServer::start().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let url = format!("ws://{}/mqtt", s.http);
    let token = s.token("alice");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{root}/tests/e2e/refusal.mjs"))
            .env("CALLBUS_URL", url)
            .env("CALLBUS_TOKEN", token)
            .current_dir(root)
            .output()
    })
    .await
    .expect("join")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("ok: ").count(), 2, "{stdout}");
}
