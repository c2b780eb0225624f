//! Interop with the operators' tools: Debian's mosquitto_sub / mosquitto_pub against callbus.

mod common;

use callbus::auth::Role;
use common::{TestServer, WAIT};
use serde_json::{json, Value};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

struct Sub {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Sub {
    /// Starts `mosquitto_sub -d -v` and waits for its SUBACK.
    async fn start(s: &TestServer, user: &str, password: &str, topics: &[&str]) -> Sub {
        let mut sub = Self::spawn(s, user, password, topics, &[]);
        sub.until(|l| l.contains("received SUBACK")).await;
        sub
    }

    /// Starts `mosquitto_sub -d -v` with more arguments (`-c -i ID` for a persistent session).
    fn spawn(s: &TestServer, user: &str, password: &str, topics: &[&str], extra: &[&str]) -> Sub {
        // mosquitto_sub block-buffers a piped stdout; stdbuf makes it line-buffered.
        let mut cmd = Command::new("stdbuf");
        cmd.args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &s.mqtt.port().to_string(),
        ])
        .args(["-u", user, "-P", password, "-q", "1", "-v", "-d"])
        .args(extra);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let stdout = child.stdout.take().unwrap();
        Sub {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    async fn until(&mut self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .expect("mosquitto_sub output in time")
                .expect("read")
                .expect("mosquitto_sub still running");
            if pred(&line) {
                return line;
            }
        }
    }

    /// The next message line (`topic payload`), as topic and JSON.
    async fn message(&mut self) -> (String, Value) {
        let line = self
            .until(|l| l.starts_with("users/") || l.starts_with("chat/"))
            .await;
        let (topic, payload) = line.split_once(' ').expect("topic payload");
        (
            topic.to_owned(),
            serde_json::from_str(payload).expect("JSON"),
        )
    }
}

async fn mosquitto_pub(
    s: &TestServer,
    user: &str,
    password: &str,
    topic: &str,
    msg: &str,
) -> std::process::Output {
    mosquitto_pub_with(s, &[], user, password, topic, msg).await
}

/// `mosquitto_pub` with `extra` arguments first (`-V 5` for MQTT 5).
async fn mosquitto_pub_with(
    s: &TestServer,
    extra: &[&str],
    user: &str,
    password: &str,
    topic: &str,
    msg: &str,
) -> std::process::Output {
    Command::new("mosquitto_pub")
        .args(extra)
        .args(["-h", "127.0.0.1", "-p", &s.mqtt.port().to_string()])
        .args([
            "-u", user, "-P", password, "-q", "1", "-t", topic, "-m", msg,
        ])
        .output()
        .await
        .expect("mosquitto_pub")
}

/// What a finished mosquitto client printed, both streams.
fn printed(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))
}

/// `mosquitto_pub -V 5` and `mosquitto_sub -V 5` show callbus's reason codes: a publish to a
/// topic only callbus writes fails "Not authorized" with callbus's reason string; a filter
/// outside the ACL is denied (SUBACK 135); a bad token is "Bad User Name or Password"; and a
/// v5 subscriber receives what a v3 publisher sent.
#[tokio::test]
async fn mosquitto_v5_clients_see_reason_codes() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let token = s.token("alice");
    let v5 = ["-V", "5", "-d"];
    let msg = r#"{"type":"message"}"#;
    let out = mosquitto_pub_with(&s, &v5, "alice", &token, "users/bob/notifications", msg).await;
    let text = printed(&out);
    assert!(text.contains("received PUBACK (Mid: 1, RC:135)"), "{text}");
    assert!(text.contains("Publish 1 failed: Not authorized"), "{text}");
    assert!(
        text.contains("forbidden: only callbus publishes to this topic"),
        "{text}"
    );

    let out = mosquitto_pub_with(&s, &v5, "alice", "not-a-token", "chat/c1", msg).await;
    let text = printed(&out);
    assert!(text.contains("received CONNACK (134)"), "{text}");
    assert!(text.contains("Bad User Name or Password"), "{text}");

    let port = s.mqtt.port().to_string();
    let denied = Command::new("mosquitto_sub")
        .args(["-V", "5", "-d", "-h", "127.0.0.1", "-p", &port, "-W", "5"])
        .args([
            "-u",
            "alice",
            "-P",
            &token,
            "-q",
            "1",
            "-t",
            "users/bob/notifications",
        ])
        .output()
        .await
        .expect("mosquitto_sub");
    let text = printed(&denied);
    assert!(text.contains("Subscribed (mid: 1): 135"), "{text}");
    assert!(
        text.contains("All subscription requests were denied"),
        "{text}"
    );

    let mut sub = Sub::spawn(&s, "alice", &token, &["chat/c1"], &["-V", "5"]);
    sub.until(|l| l.contains("received SUBACK")).await;
    let bob = s.token("bob");
    let out = mosquitto_pub(
        &s,
        "bob",
        &bob,
        "chat/c1",
        r#"{"type":"message","text":"v3"}"#,
    )
    .await;
    assert!(out.status.success(), "{}", printed(&out));
    let (topic, message) = sub.message().await;
    assert_eq!(topic, "chat/c1");
    assert_eq!(
        (message["text"].as_str(), message["sender_id"].as_str()),
        (Some("v3"), Some("bob"))
    );
}

#[tokio::test]
async fn mosquitto_clients_interoperate() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut bob = Sub::start(&s, "bob", &s.token("bob"), &["users/bob/notifications"]).await;
    let mut ops = Sub::start(&s, "ops", &s.token_with("ops", Role::Admin), &["#"]).await;

    // A user's mosquitto_sub receives notification.created and call.offer.
    let (_, call) = s
        .post(
            "/api/calls/initiate/",
            &s.token("alice"),
            json!({"receiver_id": "bob", "call_type": "video", "conversation_id": "c1"}),
        )
        .await;
    let id = call["id"].as_u64().unwrap();
    let (topic, n) = bob.message().await;
    assert_eq!(topic, "users/bob/notifications");
    assert_eq!(n["type"], "notification.created");
    assert_eq!(n["payload"]["verb"], "incoming_video_call");

    // mosquitto_pub to another user's notifications topic is delivered nowhere...
    let out = mosquitto_pub(
        &s,
        "alice",
        &s.token("alice"),
        "users/bob/notifications",
        r#"{"type":"spoof"}"#,
    )
    .await;
    assert!(out.status.success());
    // ...while alice's offer, published after it, is the next thing bob sees.
    let offer = json!({"type": "call.offer", "call_id": id.to_string(), "offer": {"type": "offer", "sdp": "v=0"}});
    let out = mosquitto_pub(
        &s,
        "alice",
        &s.token("alice"),
        "chat/c1",
        &offer.to_string(),
    )
    .await;
    assert!(out.status.success());
    let (_, o) = bob.message().await;
    assert_eq!(
        o["type"], "call.offer",
        "the spoofed message reached bob: {o}"
    );
    assert_eq!(o["caller_id"], "alice");

    // The admin's `-t '#' -v` saw the traffic.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(t, v): &(String, Value)| t == "chat/c1" && v["type"] == "call.offer")
    {
        seen.push(ops.message().await);
    }
    assert!(seen
        .iter()
        .any(|(t, v)| t == "users/bob/notifications" && v["type"] == "notification.created"));
    assert!(!seen.iter().any(|(_, v)| v["type"] == "spoof"));

    // A bad password is refused with "not authorised".
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &s.mqtt.port().to_string()])
        .args([
            "-u",
            "bob",
            "-P",
            "wrong",
            "-t",
            "users/bob/notifications",
            "-C",
            "1",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not authorised"), "{stderr}");
    let _ = bob.child.kill().await;
}

#[tokio::test]
async fn mosquitto_sub_with_a_persistent_session_gets_what_came_while_it_was_stopped() {
    let s = TestServer::start().await;
    let token = s.token("mia");
    let topics = ["users/mia/notifications"];
    let persistent = ["-c", "-i", "mia-console"];
    let mut sub = Sub::spawn(&s, "mia", &token, &topics, &persistent);
    sub.until(|l| l.contains("received SUBACK")).await;
    // Killed, as a laptop lid closes: no DISCONNECT.
    sub.child.kill().await.expect("kill mosquitto_sub");
    let service = s.token_with("app", Role::Service);
    for n in 0..2 {
        let body = json!({"user_id": "mia", "payload": {"n": n}});
        let (status, _) = s.post("/api/notifications/", &service, body).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    }
    // What was queued comes right after the CONNACK, before its own SUBSCRIBE is answered.
    let mut sub = Sub::spawn(&s, "mia", &token, &topics, &persistent);
    for n in 0..2 {
        let (topic, msg) = sub.message().await;
        assert_eq!(topic, "users/mia/notifications");
        assert_eq!(msg["payload"]["n"], n);
    }
}
