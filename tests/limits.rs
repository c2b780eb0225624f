//! Per-connection limits: refused publishes past the violation limit disconnect, publishing past
//! the rate is slowed down and loses nothing, and a client that stops reading is dropped without
//! hurting anyone else.

mod common;

use common::{granted, raw_session, raw_subscribe, TestServer, Via, WAIT};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn repeated_violations_disconnect_the_client() {
    let config =
        callbus::config::DEFAULT_CONFIG.replace("violation_limit = 50", "violation_limit = 3");
    let s = TestServer::start_with(&config).await;
    let mut mallory = s.connect(Via::Tcp, "mallory").await;
    for _ in 0..3 {
        mallory
            .client
            .publish(
                "users/bob/notifications",
                rumqttc::QoS::AtMostOnce,
                false,
                "{}",
            )
            .await
            .unwrap();
    }
    assert!(mallory.closed().await);
    still_serving_minimal(&s).await;
}

async fn still_serving_minimal(s: &TestServer) {
    let mut alice = s.connect(Via::Tcp, "alice").await;
    assert!(granted(
        &alice.subscribe(&["users/alice/notifications"]).await[0]
    ));
    alice.publish("users/x/notifications", "{}").await;
    assert_eq!(alice.recv().await.json()["code"], "forbidden");
}

#[tokio::test]
async fn publishing_over_the_rate_is_slowed_not_cut_off() {
    let config = callbus::config::DEFAULT_CONFIG
        .replace("publish_rate = 200", "publish_rate = 20")
        .replace("publish_burst = 500", "publish_burst = 5");
    let s = TestServer::start_with(&config).await;
    s.set_members("c1", &["flood", "bob"]).await;
    let mut bob = s.connect(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
    let mut flood = s.connect(Via::Tcp, "flood").await;
    // 45 QoS 1 publishes at once: far over 20/s after a burst of 5.
    const N: usize = 45;
    let started = std::time::Instant::now();
    let payloads = (0..N).map(|i| json!({"type": "message", "text": i.to_string()}).to_string());
    flood.publish_all("chat/c1", payloads).await;
    let elapsed = started.elapsed();
    // Nothing lost, in order.
    for i in 0..N {
        assert_eq!(bob.recv().await.json()["text"], i.to_string());
    }
    // Slowed to the rate: the 40 publishes past the burst need about 2 s at 20/s.
    assert!(
        elapsed >= Duration::from_millis(1800),
        "not throttled: {N} publishes acknowledged in {elapsed:?}"
    );
    let metrics = s.http_client.get(s.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        !text.contains("callbus_mqtt_publishes_throttled_total 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_others_carry_on() {
    let s = TestServer::start().await;
    // Mallory subscribes and then never reads her socket.
    let mut stalled = raw_session(&s, 600, "mallory").await;
    let subscribe = raw_subscribe("users/mallory/notifications");
    stalled.write_all(&subscribe).await.unwrap();
    let mut suback = [0u8; 5];
    stalled.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 1]);

    let mut bob = s.connect(Via::Tcp, "bob").await;
    assert!(granted(
        &bob.subscribe(&["users/bob/notifications"]).await[0]
    ));
    let service = s.token_with("app", callbus::auth::Role::Service);
    let big = "x".repeat(48 * 1024);
    // Far more than socket buffers plus the session's queue can hold (bounded loop).
    for i in 0..1000 {
        let (status, _) = s
            .post(
                "/api/notifications/",
                &service,
                json!({"user_id": "mallory", "payload": {"n": i, "pad": big}}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED);
        if i % 250 == 249 {
            // Bob is served all along.
            s.post(
                "/api/notifications/",
                &service,
                json!({"user_id": "bob", "payload": {"n": i}}),
            )
            .await;
            assert_eq!(bob.recv().await.json()["payload"]["n"], i);
        }
    }
    // Her session ended while she still reads nothing (it does not wait for her to read what
    // it had left to write): Bob's is the only one open.
    let mut open = 0;
    for _ in 0..200 {
        open = s.metric("callbus_mqtt_connections_open").await;
        if open == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(open, 1, "the stalled session is still open");
    // Mallory's connection was closed: reading drains what was buffered, then ends.
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match tokio::time::timeout(WAIT, stalled.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the stalled connection was never closed ({total} bytes read)"),
        }
    }
    assert!(
        total < 1000 * 48 * 1024,
        "everything was delivered: nothing was dropped"
    );
}

#[tokio::test]
async fn a_connection_holds_at_most_max_subscriptions() {
    let config =
        callbus::config::DEFAULT_CONFIG.replace("max_subscriptions = 100", "max_subscriptions = 2");
    let s = TestServer::start_with(&config).await;
    s.set_members("c1", &["alice"]).await;
    s.set_members("c2", &["alice"]).await;
    let mut alice = s.connect(Via::Tcp, "alice").await;
    let codes = alice
        .subscribe(&["users/alice/notifications", "chat/c1", "chat/c2"])
        .await;
    assert!(granted(&codes[0]) && granted(&codes[1]), "{codes:?}");
    assert!(!granted(&codes[2]), "the third filter was granted");
    // Subscribing again to a held filter takes no room.
    assert!(granted(&alice.subscribe(&["chat/c1"]).await[0]));
    assert_eq!(
        s.metric("callbus_mqtt_subscriptions_over_limit_total")
            .await,
        1
    );
}

#[tokio::test]
async fn a_user_has_at_most_max_connections() {
    let config = callbus::config::DEFAULT_CONFIG.replace(
        "max_connections_per_user = 32",
        "max_connections_per_user = 2",
    );
    let s = TestServer::start_with(&config).await;
    let _phone = s
        .connect_with(Via::Tcp, "alice", "phone", |_| {})
        .await
        .unwrap();
    let _web = s
        .connect_with(Via::Ws, "alice", "web", |_| {})
        .await
        .unwrap();
    let third = s.connect_with(Via::Tcp, "alice", "laptop", |_| {}).await;
    match third {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!(
            "a third connection was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    // Taking over one of the user's own client ids needs no room; others are not affected.
    assert!(s
        .connect_with(Via::Tcp, "alice", "web", |_| {})
        .await
        .is_ok());
    assert!(s
        .connect_with(Via::Tcp, "bob", "phone", |_| {})
        .await
        .is_ok());
    assert_eq!(
        s.metric("callbus_mqtt_connects_over_user_limit_total")
            .await,
        1
    );
}

#[tokio::test]
async fn new_connections_per_address_are_rate_limited_when_configured() {
    let config = callbus::config::DEFAULT_CONFIG.replace(
        "connect_rate_per_address = 0",
        "connect_rate_per_address = 3",
    );
    let s = TestServer::start_with(&config).await;
    let mut refused = 0;
    let mut clients = Vec::new();
    for i in 0..8 {
        match s
            .connect_with(Via::Tcp, &format!("u{i}"), "dev", |_| {})
            .await
        {
            Ok(client) => clients.push(client),
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable);
                refused += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // A burst of 3, then about 3 a second: most of 8 back-to-back connects are refused.
    assert!(
        clients.len() >= 3 && refused >= 3,
        "{} accepted",
        clients.len()
    );
    assert_eq!(
        s.metric("callbus_mqtt_connects_over_rate_total").await,
        refused
    );
}
