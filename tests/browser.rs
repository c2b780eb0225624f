//! The demo page in Debian's headless Chromium (npm playwright-core): two pages complete a real
//! WebRTC video call over callbus with MQTT.js speaking MQTT 5, then a reject and an end path (tests/e2e/call.mjs); and a
//! page that loses its connection while called resumes its session and completes the call
//! (tests/e2e/resume.mjs). Needs `/usr/bin/chromium` and `npm ci`; `.ci/run` installs both.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_complete_a_video_call() {
    let s =
        common::TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| st.dev = true).await;
    let root = env!("CARGO_MANIFEST_DIR");
    // The README's screenshot: refreshed with UPDATE_SCREENSHOT=1, otherwise kept under target/.
    let screenshot = if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        format!("{root}/docs/demo.png")
    } else {
        format!("{root}/target/demo.png")
    };
    let env = vec![("CALLBUS_URL", format!("http://{}", s.http))];
    let stdout = common::node::run("call.mjs", vec![screenshot], env).await;
    println!("{stdout}");
    assert!(stdout.contains("bob decodes video frames"));
    assert!(stdout.contains("e2e: all checks passed"));
    // The demo page speaks MQTT 5 (MQTT.js `protocolVersion: 5`).
    assert!(s.metric("callbus_mqtt5_connections_total").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_blinks_while_called_resumes_and_completes_the_call() {
    let s =
        common::TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| st.dev = true).await;
    let env = vec![("CALLBUS_URL", format!("http://{}", s.http))];
    let stdout = common::node::run("resume.mjs", vec![], env).await;
    assert!(stdout.contains("back online, bob's page rings for Alice"));
    assert!(stdout.contains("e2e resume: all checks passed"));
}
