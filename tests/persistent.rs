//! Persistent sessions (MQTT 3.1.1 `clean_session = 0`) through real clients: what was
//! published while a phone was away arrives when it comes back, in order; unacknowledged
//! messages come again with DUP; the ACL is checked again on replay; the queue is bounded and
//! says so; takeover hands the session over; clean sessions and expiry discard it.

mod common;

use callbus::auth::Role;
use common::{granted, raw_connect_with, raw_subscribe, TestServer, Via, BOTH};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn notify(s: &TestServer, user: &str, n: u64) {
    let service = s.token_with("app", Role::Service);
    let body = json!({"user_id": user, "payload": {"n": n}});
    let (status, _) = s.post("/api/notifications/", &service, body).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
}

/// Connects mia's phone with a persistent session subscribed to her notifications, then leaves.
async fn away(s: &TestServer, via: Via) {
    let mut phone = s.connect_persistent(via, "mia", "phone").await;
    assert!(!phone.session_present);
    assert!(granted(
        &phone.subscribe(&["users/mia/notifications"]).await[0]
    ));
    phone.leave().await;
}

#[tokio::test]
async fn what_was_published_while_away_arrives_on_reconnect_in_order() {
    for via in BOTH {
        let s = TestServer::start().await;
        away(&s, via).await;
        for n in 0..3 {
            notify(&s, "mia", n).await;
        }
        let mut phone = s.connect_persistent(via, "mia", "phone").await;
        assert!(phone.session_present, "{via:?}");
        // No SUBSCRIBE: the session kept it. The queued ones first, then live traffic.
        notify(&s, "mia", 3).await;
        for n in 0..4 {
            let msg = phone.recv().await;
            assert_eq!(msg.qos, rumqttc::QoS::AtLeastOnce);
            assert_eq!(msg.json()["payload"]["n"], n, "{via:?}");
        }
    }
}

#[tokio::test]
async fn a_clean_session_discards_the_stored_one() {
    let s = TestServer::start().await;
    away(&s, Via::Tcp).await;
    notify(&s, "mia", 0).await;
    let token = s.token("mia");
    let clean = s.connect_as(Via::Tcp, "phone", "mia", &token).await;
    let clean = clean.expect("clean connect");
    assert!(!clean.session_present);
    clean.leave().await;
    let phone = s.connect_persistent(Via::Tcp, "mia", "phone").await;
    assert!(!phone.session_present, "the stored session survived");
}

/// Reads one MQTT packet (fixed header, remaining length < 16 KiB) from a raw socket.
async fn read_packet(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("packet header");
    let mut len = usize::from(head[1] & 0x7f);
    if head[1] & 0x80 != 0 {
        let mut more = [0u8; 1];
        stream.read_exact(&mut more).await.expect("length");
        len += usize::from(more[0]) << 7;
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.expect("packet body");
    let mut packet = vec![head[0]];
    packet.extend_from_slice(&body);
    packet
}

/// mia's phone over a raw socket with a persistent session: the socket and its CONNACK.
async fn phone(s: &TestServer) -> (TcpStream, Vec<u8>) {
    let mut raw = TcpStream::connect(s.mqtt).await.unwrap();
    let connect = raw_connect_with(4, 30, &s.token("mia"), "phone", false);
    raw.write_all(&connect).await.unwrap();
    let connack = read_packet(&mut raw).await;
    (raw, connack)
}

#[tokio::test]
async fn unacknowledged_messages_are_sent_again_with_dup_and_their_packet_id() {
    let s = TestServer::start().await;
    let (mut raw, connack) = phone(&s).await;
    assert_eq!(connack, [0x20, 0, 0], "CONNACK, no session");
    raw.write_all(&raw_subscribe("users/mia/notifications"))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut raw).await, [0x90, 0, 1, 1]);
    notify(&s, "mia", 7).await;
    let first = read_packet(&mut raw).await;
    assert_eq!(first[0], 0x32, "QoS 1 PUBLISH without DUP");
    // Never acknowledged: the client leaves (DISCONNECT) and waits for callbus's close.
    raw.write_all(&[0xe0, 0]).await.unwrap();
    let mut rest = Vec::new();
    raw.read_to_end(&mut rest).await.expect("closed");

    let (mut raw, connack) = phone(&s).await;
    assert_eq!(connack, [0x20, 1, 0], "CONNACK, session present");
    let again = read_packet(&mut raw).await;
    assert_eq!(again[0], 0x3a, "QoS 1 PUBLISH with DUP");
    assert_eq!(again[1..], first[1..], "same topic, packet id and payload");
}

#[tokio::test]
async fn membership_is_checked_again_on_replay() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut bob = s.connect_persistent(Via::Tcp, "bob", "phone").await;
    let codes = bob.subscribe(&["chat/c1", "users/bob/notifications"]).await;
    assert!(codes.iter().all(granted));
    bob.leave().await;
    let mut alice = s.connect(Via::Tcp, "alice").await;
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": "secret"}))
        .await;
    // Bob is removed from the conversation while away.
    s.set_members("c1", &["alice"]).await;
    let mut bob = s.connect_persistent(Via::Tcp, "bob", "phone").await;
    assert!(bob.session_present);
    notify(&s, "bob", 1).await;
    let first = bob.recv().await;
    assert_eq!(first.topic, "users/bob/notifications", "got {first:?}");
}

#[tokio::test]
async fn a_newer_connection_takes_the_session_over() {
    let s = TestServer::start().await;
    let mut old = s.connect_persistent(Via::Ws, "mia", "phone").await;
    assert!(granted(
        &old.subscribe(&["users/mia/notifications"]).await[0]
    ));
    let mut new = s.connect_persistent(Via::Tcp, "mia", "phone").await;
    assert!(new.session_present);
    assert!(old.closed().await, "the older connection was not replaced");
    notify(&s, "mia", 1).await;
    assert_eq!(new.recv().await.json()["payload"]["n"], 1);
}

#[tokio::test]
async fn the_queue_bound_drops_the_oldest_and_says_so() {
    let config = format!("{}\n", callbus::config::DEFAULT_CONFIG)
        .replace("queue_messages = 1000", "queue_messages = 5");
    let s = TestServer::start_with(&config).await;
    away(&s, Via::Tcp).await;
    const SENT: u64 = 30;
    for n in 0..SENT {
        notify(&s, "mia", n).await;
    }
    let mut phone = s.connect_persistent(Via::Tcp, "mia", "phone").await;
    let overflow = phone.recv().await.json();
    assert_eq!(overflow["type"], "error");
    assert_eq!(overflow["code"], "queue_overflow", "{overflow}");
    // A 202 means accepted, not yet routed: the last few may still be on the bus when the
    // phone comes back, and then arrive live after the queue. So: the oldest `dropped` went,
    // at most 5 were kept, and everything after them arrives once, in order.
    let detail = overflow["detail"].as_str().expect("detail");
    let dropped: u64 = detail
        .split(' ')
        .next()
        .and_then(|d| d.parse().ok())
        .expect("count");
    assert!(dropped >= SENT - 15, "{detail}");
    for n in dropped..SENT {
        assert_eq!(phone.recv().await.json()["payload"]["n"], n);
    }
    assert_eq!(
        s.metric("callbus_session_queue_dropped_total").await,
        dropped
    );
}

#[tokio::test]
async fn stored_sessions_expire() {
    let config = callbus::config::DEFAULT_CONFIG.replace("expiry_secs = 600", "expiry_secs = 1");
    let s = TestServer::start_with(&config).await;
    away(&s, Via::Tcp).await;
    // Expiry is a deadline: nothing to await but the time itself.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let phone = s.connect_persistent(Via::Tcp, "mia", "phone").await;
    assert!(!phone.session_present, "an expired session was resumed");
}
