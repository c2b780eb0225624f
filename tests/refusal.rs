//! Refused CONNECTs over WebSocket reach MQTT.js (in Node) as their reason code (MQTT 5 and
//! 3.1.1; a good MQTT 5 CONNECT connects), even when the
//! client writes its CONNECT in several frames (tests/e2e/refusal.mjs). Needs `npm ci`.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_sees_the_refusal_not_a_broken_pipe() {
    let s = common::TestServer::start().await;
    let env = vec![
        ("CALLBUS_URL", format!("ws://{}/mqtt", s.http)),
        ("CALLBUS_TOKEN", s.token("alice")),
    ];
    let stdout = common::node::run("refusal.mjs", vec![], env).await;
    assert_eq!(stdout.matches("ok: ").count(), 4, "{stdout}");
}
