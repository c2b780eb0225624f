//! Where the specification meets clients' defaults, with clients callbus did not write:
//! paho-mqtt 2 (Python) on its default Clean Start resumes its session across a lost network
//! (section 3.1.2.11), and `mosquitto_sub -V 5` that ends normally publishes no Will
//! (MQTT-3.1.2-10). Needs `pip install paho-mqtt` and `apt-get install mosquitto-clients`
//! (`.ci/run` installs both).

mod common;

use common::{granted, TestServer, Via, WAIT};
use serde_json::json;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// The next line of a child's output, bounded.
async fn line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("output in time")
        .expect("read")
        .expect("the client ended early")
}

#[tokio::test]
async fn paho_on_its_default_clean_start_resumes_across_a_lost_network() {
    let s = TestServer::with_c1().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/paho_resume.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([&s.mqtt.port().to_string(), "carol", &s.token("carol")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with paho-mqtt (pip install paho-mqtt)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first connect is Clean Start 1 with an expiry: a new session, kept (MQTT 5 3.1.2.11).
    assert_eq!(line(&mut lines).await, "connected False");
    assert_eq!(line(&mut lines).await, "subscribed");
    let deadline = tokio::time::Instant::now() + WAIT;
    while s.metric("callbus_sessions_stored").await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session was not kept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json(
        "chat/c1",
        json!({"type": "message", "text": "while offline"}),
    )
    .await;
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .await
        .unwrap();
    // Its reconnect is Clean Start 0: resumed, with what came meanwhile.
    assert_eq!(line(&mut lines).await, "connected True");
    let message = line(&mut lines).await;
    assert!(message.contains("while offline"), "{message}");
}

#[tokio::test]
async fn mosquitto_sub_v5_ending_normally_publishes_no_will() {
    let s = TestServer::with_c1().await;
    let mut alice = s.connect(Via::Tcp, "alice").await;
    assert!(granted(&alice.subscribe(&["chat/c1"]).await[0]));
    let will = r#"{"type":"message","text":"carol is gone"}"#;
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-V", "5", "-h", "127.0.0.1"])
        .args(["-p", &s.mqtt.port().to_string(), "-u", "carol"])
        .args(["-P", &s.token("carol"), "-i", "carol-sub", "-d", "-C", "1"])
        .args([
            "-t",
            "chat/c1",
            "--will-topic",
            "chat/c1",
            "--will-payload",
            will,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while !line(&mut lines).await.contains("received SUBACK") {}
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": "one"}))
        .await;
    // mosquitto_sub takes its one message and ends with DISCONNECT (E0 00).
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("mosquitto_sub ends")
        .unwrap();
    assert!(status.success());
    assert_eq!(alice.recv().await.json()["text"], "one");
    // Nothing (no Will) comes between the message and this one.
    bob.publish_json("chat/c1", json!({"type": "message", "text": "after"}))
        .await;
    assert_eq!(alice.recv().await.json()["text"], "after");
}
