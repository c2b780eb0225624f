//! Last Will and retained publishes are explicit: a will is checked against the ACL at CONNECT
//! and published, stamped, when a connection drops without DISCONNECT; a retained publish is
//! refused with an `unsupported` error event and reaches nobody.

mod common;

use common::{granted, TestServer, Via};
use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, QoS};
use serde_json::json;

fn will(topic: &str, text: &str) -> LastWill {
    let payload = json!({"type": "message", "text": text}).to_string();
    LastWill::new(topic, payload, QoS::AtLeastOnce, false)
}

async fn server_with_bob_listening() -> (TestServer, common::Client) {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut bob = s.connect(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
    (s, bob)
}

#[tokio::test]
async fn a_will_is_published_stamped_when_the_connection_drops() {
    let (s, mut bob) = server_with_bob_listening().await;
    let alice = s
        .connect_with(Via::Ws, "alice", "laptop", |o| {
            o.set_last_will(will("chat/c1", "gone"));
        })
        .await
        .expect("connect with a will");
    drop(alice); // the socket goes without DISCONNECT
    let msg = bob.recv().await.json();
    assert_eq!(msg["text"], "gone");
    assert_eq!(msg["sender_id"], "alice");
    assert!(msg["id"].is_string() && msg["ts"].is_string());
}

#[tokio::test]
async fn a_will_is_not_published_after_disconnect() {
    let (s, mut bob) = server_with_bob_listening().await;
    let mut alice = s
        .connect_with(Via::Tcp, "alice", "laptop", |o| {
            o.set_last_will(will("chat/c1", "gone"));
        })
        .await
        .expect("connect with a will");
    alice.client.disconnect().await.expect("DISCONNECT");
    assert!(alice.closed().await);
    let mut again = s.connect(Via::Tcp, "alice").await;
    again
        .publish_json("chat/c1", json!({"type": "message", "text": "after"}))
        .await;
    assert_eq!(bob.recv().await.json()["text"], "after");
}

#[tokio::test]
async fn a_will_outside_the_acl_is_refused_at_connect() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    for (topic, retain) in [
        ("users/bob/notifications", false),
        ("chat/c2", false),
        ("chat/c1", true),
    ] {
        let result = s
            .connect_with(Via::Tcp, "alice", "laptop", |o| {
                let mut w = will(topic, "x");
                w.retain = retain;
                o.set_last_will(w);
            })
            .await;
        match result {
            Err(ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::NotAuthorized, "{topic}")
            }
            Err(e) => panic!("{topic}: {e:?}"),
            Ok(_) => panic!("{topic}: a will outside the ACL was accepted"),
        }
    }
    // Allowed: a chat the client is a member of.
    let ok = s
        .connect_with(Via::Tcp, "alice", "laptop", |o| {
            o.set_last_will(will("chat/c1", "x"));
        })
        .await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn retained_publishes_are_refused_and_reach_nobody() {
    let (s, mut bob) = server_with_bob_listening().await;
    let mut alice = s.connect(Via::Tcp, "alice").await;
    assert!(granted(
        &alice.subscribe(&["users/alice/notifications"]).await[0]
    ));
    let retained = json!({"type": "message", "text": "kept"}).to_string();
    alice
        .client
        .publish("chat/c1", QoS::AtLeastOnce, true, retained)
        .await
        .expect("publish");
    let error = alice.recv().await.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "unsupported");
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": "plain"}))
        .await;
    assert_eq!(bob.recv().await.json()["text"], "plain");
}
