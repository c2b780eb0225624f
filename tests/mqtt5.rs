//! MQTT 5 on the same listeners as 3.1.1, through rumqttc's v5 client: v5 and v3 clients
//! talk to each other; refusals are reason codes (SUBACK 0x87 / 0x8F, PUBACK 0x87 / 0x99 with
//! a reason string, no `error` event); CONNACK announces callbus's limits; a session taken
//! over is told so (DISCONNECT 0x8E); a Session Expiry Interval makes a session persistent.

mod common;

use bytes::Bytes;
use callbus::auth::Role;
use common::{granted, TestServer, Via, WAIT};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, DisconnectReasonCode, Packet, PubAckReason, Publish, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A real MQTT 5 client (rumqttc v5) with its event loop on a task.
struct V5 {
    client: AsyncClient,
    connack: ConnAck,
    events: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V5 {
    async fn connect(
        s: &TestServer,
        user: &str,
        client_id: &str,
        configure: impl FnOnce(&mut MqttOptions),
    ) -> V5 {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", s.mqtt.port());
        options.set_credentials(user, s.token(user));
        configure(&mut options);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, events.recv()).await;
        let connack = match first.expect("CONNACK in time").expect("event loop alive") {
            Ok(Packet::ConnAck(connack)) => connack,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        V5 {
            client,
            connack,
            events,
            task,
        }
    }

    /// The next packet from callbus (or the connection's end), bounded.
    async fn next(&mut self) -> Result<Packet, ConnectionError> {
        let next = tokio::time::timeout(WAIT, self.events.recv()).await;
        next.expect("a packet in time").expect("event loop alive")
    }

    /// The reason of the DISCONNECT callbus ends the connection with (rumqttc reports it as
    /// the connection's end).
    async fn until_disconnected(&mut self) -> DisconnectReasonCode {
        loop {
            match self.next().await {
                Ok(_) => {}
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    ..
                })) => return reason_code,
                Err(e) => panic!("closed without DISCONNECT: {e:?}"),
            }
        }
    }

    async fn publish_received(&mut self) -> Publish {
        loop {
            match self.next().await {
                Ok(Packet::Publish(p)) => return p,
                Ok(_) => {}
                Err(e) => panic!("connection ended: {e:?}"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        let client = self.client.clone();
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("SUBSCRIBE");
        loop {
            if let Packet::SubAck(ack) = self.next().await.expect("SUBACK") {
                return ack.return_codes[0];
            }
        }
    }

    async fn publish_acked(&mut self, topic: &str, payload: Value) -> (PubAckReason, String) {
        let client = self.client.clone();
        let payload = payload.to_string();
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("PUBLISH");
        loop {
            // Its own chat message may come back first.
            if let Packet::PubAck(ack) = self.next().await.expect("PUBACK") {
                let reason = ack.properties.and_then(|p| p.reason_string);
                return (ack.reason, reason.unwrap_or_default());
            }
        }
    }
}

fn json_of(publish: &Publish) -> Value {
    serde_json::from_slice(&publish.payload).expect("JSON payload")
}

#[tokio::test]
async fn v5_and_v3_clients_talk_to_each_other() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut alice = V5::connect(&s, "alice", "alice-v5", |_| {}).await;
    assert_eq!(
        alice.subscribe("chat/c1").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut bob = s.connect(Via::Ws, "bob").await;
    assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));

    bob.publish_json("chat/c1", json!({"type": "message", "text": "from v3"}))
        .await;
    let got = alice.publish_received().await;
    assert_eq!(got.topic, Bytes::from_static(b"chat/c1"));
    let got = json_of(&got);
    assert_eq!(
        (got["text"].as_str(), got["sender_id"].as_str()),
        (Some("from v3"), Some("bob"))
    );

    let sent = json!({"type": "message", "text": "from v5", "sender_id": "mallory"});
    let (reason, _) = alice.publish_acked("chat/c1", sent).await;
    assert_eq!(reason, PubAckReason::Success);
    assert_eq!(bob.recv().await.json()["text"], "from v3", "its own, first");
    let got = bob.recv().await.json();
    assert_eq!(got["text"], "from v5");
    assert_eq!(
        got["sender_id"], "alice",
        "stamped whatever the client claims"
    );
}

#[tokio::test]
async fn refusals_are_reason_codes() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut alice = V5::connect(&s, "alice", "alice-v5", |_| {}).await;
    assert_eq!(
        alice.subscribe("users/alice/notifications").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    // Someone else's notifications: not authorized. A shared subscription, or a user's
    // wildcard: not offered.
    assert_eq!(
        alice.subscribe("users/bob/notifications").await,
        SubscribeReasonCode::NotAuthorized
    );
    assert_eq!(
        alice.subscribe("$share/group/chat/c1").await,
        SubscribeReasonCode::SharedSubscriptionsNotSupported
    );
    assert_eq!(
        alice.subscribe("chat/+").await,
        SubscribeReasonCode::WildcardSubscriptionsNotSupported
    );
    // A topic only callbus publishes to; a chat payload the bridge rejects.
    let (reason, text) = alice
        .publish_acked("users/bob/notifications", json!({"type": "message"}))
        .await;
    assert_eq!(reason, PubAckReason::NotAuthorized, "{text}");
    assert!(text.starts_with("forbidden: "), "{text}");
    let (reason, text) = alice.publish_acked("chat/c1", json!([1, 2])).await;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid, "{text}");
    assert!(text.starts_with("bad_payload: "), "{text}");
    // A v5 client learns from the PUBACK, not from an `error` event: the next thing on its
    // notifications topic is what callbus sends it next.
    let service = s.token_with("app", Role::Service);
    let body = json!({"user_id": "alice", "payload": {"n": 1}});
    let (status, _) = s.post("/api/notifications/", &service, body).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    let next = json_of(&alice.publish_received().await);
    assert_eq!(next["type"], "notification.created", "{next}");
}

#[tokio::test]
async fn connack_announces_the_limits() {
    let s = TestServer::start().await;
    let alice = V5::connect(&s, "alice", "", |_| {}).await;
    let props = alice
        .connack
        .properties
        .clone()
        .expect("CONNACK properties");
    assert_eq!(props.retain_available, Some(0));
    assert_eq!(props.topic_alias_max, Some(0));
    assert_eq!(props.wildcard_subscription_available, Some(0));
    assert_eq!(props.shared_subscription_available, Some(0));
    assert_eq!(props.max_qos, Some(1));
    assert!(props.max_packet_size.is_some_and(|m| m >= 64 * 1024));
    let assigned = props.assigned_client_identifier.expect("an assigned id");
    assert!(assigned.starts_with("auto-"), "{assigned}");
    // An admin may use wildcards.
    let token = s.token_with("ops", Role::Admin);
    let mut options = MqttOptions::new("console", "127.0.0.1", s.mqtt.port());
    options.set_credentials("ops", token);
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    let connack = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(connack)))) => break connack,
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    };
    let props = connack.properties.expect("CONNACK properties");
    assert_eq!(props.wildcard_subscription_available, Some(1));
}

#[tokio::test]
async fn a_session_taken_over_is_told_so() {
    let s = TestServer::start().await;
    let mut old = V5::connect(&s, "alice", "phone", |_| {}).await;
    let _new = V5::connect(&s, "alice", "phone", |_| {}).await;
    assert_eq!(
        old.until_disconnected().await,
        DisconnectReasonCode::SessionTakenOver
    );
}

#[tokio::test]
async fn a_session_expiry_interval_keeps_the_session() {
    let s = TestServer::start().await;
    let persistent = |o: &mut MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
    };
    let mut phone = V5::connect(&s, "mia", "phone", persistent).await;
    assert!(!phone.connack.session_present);
    let expiry = phone.connack.properties.as_ref();
    // Capped by the configured expiry (600 s by default).
    assert_eq!(expiry.and_then(|p| p.session_expiry_interval), Some(600));
    assert_eq!(
        phone.subscribe("users/mia/notifications").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    phone.client.disconnect().await.expect("DISCONNECT");
    loop {
        if phone.next().await.is_err() {
            break; // closed once the session is stored
        }
    }
    let service = s.token_with("app", Role::Service);
    let body = json!({"user_id": "mia", "payload": {"n": 7}});
    let (status, _) = s.post("/api/notifications/", &service, body).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);

    let mut phone = V5::connect(&s, "mia", "phone", persistent).await;
    assert!(phone.connack.session_present);
    assert_eq!(json_of(&phone.publish_received().await)["payload"]["n"], 7);

    // Without an expiry interval a v5 session ends with its connection.
    let clean = V5::connect(&s, "mia", "tablet", |o| {
        o.set_clean_start(false);
    })
    .await;
    assert!(!clean.connack.session_present);
}

/// A Session Expiry Interval shorter than the configured expiry is honoured: the session is
/// dropped that long after its connection ends.
#[tokio::test]
async fn a_short_session_expiry_interval_is_honoured() {
    let s = TestServer::start().await;
    let short = |o: &mut MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(1));
    };
    let phone = V5::connect(&s, "mia", "phone", short).await;
    let granted = phone.connack.properties.as_ref();
    assert_eq!(granted.and_then(|p| p.session_expiry_interval), Some(1));
    phone.client.disconnect().await.expect("DISCONNECT");
    drop(phone);
    // The hub sweeps stored sessions every few seconds; wait (bounded) until it drops it.
    let mut expired = 0;
    for _ in 0..150 {
        expired = s.metric("callbus_sessions_expired_total").await;
        if expired > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(expired, 1, "the session was not dropped");
    let phone = V5::connect(&s, "mia", "phone", short).await;
    assert!(!phone.connack.session_present);
}

/// Message Expiry: a v5 publisher's interval reaches v5 subscribers (counting down), and
/// callbus sets one on a call's ring, so a phone back after the call stopped ringing is not
/// rung for it (it gets the missed call instead).
#[tokio::test]
async fn expired_messages_are_not_delivered() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.ring_timeout = std::time::Duration::from_secs(1)
    })
    .await;
    s.set_members("c1", &["alice", "bob", "mia"]).await;
    let mut bob = V5::connect(&s, "bob", "bob-v5", |_| {}).await;
    assert_eq!(
        bob.subscribe("chat/c1").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let alice = V5::connect(&s, "alice", "alice-v5", |_| {}).await;
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    let text = json!({"type": "message", "text": "soon stale"}).to_string();
    alice
        .client
        .publish_with_properties("chat/c1", QoS::AtLeastOnce, false, text, properties)
        .await
        .expect("PUBLISH");
    let got = bob.publish_received().await;
    let left = got
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(left.is_some_and(|l| (58..=60).contains(&l)), "{left:?}");

    // mia's phone is away when alice calls her; it is back after the ring timed out.
    let persistent = |o: &mut MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    };
    let mut phone = V5::connect(&s, "mia", "phone", persistent).await;
    assert_eq!(
        phone.subscribe("users/mia/notifications").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    phone.client.disconnect().await.expect("DISCONNECT");
    while phone.next().await.is_ok() {} // closed once the session is stored
    let (status, call) = s.initiate("alice", json!("mia"), "voice").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{call}");
    let id = call["id"].as_u64().expect("id");
    let (path, token) = (format!("/api/calls/{id}/"), s.token("mia"));
    let mut status = Value::Null;
    for _ in 0..100 {
        status = s.get(&path, &token).await.1["status"].clone();
        if status != "ringing" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, "missed");
    let mut phone = V5::connect(&s, "mia", "phone", persistent).await;
    assert!(phone.connack.session_present);
    let first = json_of(&phone.publish_received().await);
    assert_ne!(
        first["payload"]["verb"], "incoming_voice_call",
        "rang for a call that is over: {first}"
    );
}

/// A server shutting down tells its v5 clients so (DISCONNECT 0x8B).
#[tokio::test]
async fn shutting_down_is_said() {
    let mut s = TestServer::start().await;
    let mut alice = V5::connect(&s, "alice", "alice-v5", |_| {}).await;
    let server = s.server.take().expect("the server");
    let stopping = tokio::spawn(server.stop());
    assert_eq!(
        alice.until_disconnected().await,
        DisconnectReasonCode::ServerShuttingDown
    );
    stopping.await.expect("stopped");
}

/// Raw MQTT 5 bytes, for what a well-behaved client library will not send: a malformed filter
/// gets SUBACK 0x8F, the session goes on.
#[tokio::test]
async fn a_malformed_filter_gets_0x8f() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let mut stream = tokio::net::TcpStream::connect(s.mqtt).await.expect("TCP");
    let connect = common::raw_connect(5, 30, &s.token("alice"));
    stream.write_all(&connect).await.expect("CONNECT");
    // SUBSCRIBE, packet id 1, no properties, filter "a/#/b" at QoS 1.
    let filter = b"a/#/b";
    let mut subscribe = vec![0x82, (2 + 1 + 2 + filter.len() + 1) as u8, 0, 1, 0];
    subscribe.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(filter);
    subscribe.push(1);
    stream.write_all(&subscribe).await.expect("SUBSCRIBE");
    // CONNACK (with properties), then SUBACK: 0x90, length 4, packet id 1, no properties,
    // reason 0x8F.
    let mut read = Vec::new();
    let suback = [0x90, 4, 0, 1, 0, 0x8F];
    let mut buf = [0u8; 512];
    while !read.windows(suback.len()).any(|w| w == suback) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("SUBACK in time")
            .expect("read");
        assert!(n > 0, "closed; got {read:02x?}");
        read.extend_from_slice(&buf[..n]);
    }
}

/// A message larger than the v5 client's Maximum Packet Size is not sent to it; what fits is.
#[tokio::test]
async fn deliveries_respect_the_clients_maximum_packet_size() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut bob = V5::connect(&s, "bob", "bob-v5", |o| {
        o.set_max_packet_size(Some(2048));
    })
    .await;
    assert_eq!(
        bob.subscribe("chat/c1").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut alice = s.connect(Via::Tcp, "alice").await;
    let big = "x".repeat(4096);
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": big}))
        .await;
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": "small"}))
        .await;
    let got = json_of(&bob.publish_received().await);
    assert_eq!(got["text"], "small", "the large one was sent");
    assert_eq!(s.metric("callbus_mqtt_deliveries_too_large_total").await, 1);
}

/// A v5 client's Receive Maximum bounds what callbus sends it unacknowledged: the rest waits
/// (counted) and follows, in order, as acknowledgements come.
#[tokio::test]
async fn the_clients_receive_maximum_is_respected() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut bob = V5::connect(&s, "bob", "bob-v5", |o| {
        o.set_receive_maximum(Some(2));
        o.set_manual_acks(true);
    })
    .await;
    assert_eq!(
        bob.subscribe("chat/c1").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut alice = s.connect(Via::Tcp, "alice").await;
    let texts: Vec<String> = (0..5)
        .map(|n| json!({"type": "message", "n": n}).to_string())
        .collect();
    alice.publish_all("chat/c1", texts).await;
    let mut got = vec![bob.publish_received().await, bob.publish_received().await];
    // Two unacknowledged: the other three wait.
    let mut held = 0;
    for _ in 0..100 {
        held = s.metric("callbus_mqtt_deliveries_held_total").await;
        if held >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(held, 3);
    while got.len() < 5 {
        let oldest = got.len() - 2;
        bob.client.ack(&got[oldest]).await.expect("PUBACK");
        got.push(bob.publish_received().await);
    }
    let order: Vec<u64> = got
        .iter()
        .map(|p| json_of(p)["n"].as_u64().unwrap_or(99))
        .collect();
    assert_eq!(order, [0, 1, 2, 3, 4]);
}

/// A v5 packet over the server's Maximum Packet Size ends the session with DISCONNECT 0x95.
#[tokio::test]
async fn a_packet_too_large_is_said() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let mut stream = tokio::net::TcpStream::connect(s.mqtt).await.expect("TCP");
    let connect = common::raw_connect(5, 30, &s.token("alice"));
    stream.write_all(&connect).await.expect("CONNECT");
    // A QoS 0 PUBLISH announcing 16 MiB (the varint 0x80 0x80 0x80 0x08): the header is
    // enough for callbus to refuse it.
    stream
        .write_all(&[0x30, 0x80, 0x80, 0x80, 0x08])
        .await
        .expect("PUBLISH header");
    let mut read = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
        read.extend_from_slice(&buf[..n]);
    }
    assert!(read.ends_with(&[0xE0, 2, 0x95, 0]), "{read:02x?}");
}

/// Past `violation_limit` refused publishes a v5 client is disconnected with 0x96.
#[tokio::test]
async fn too_many_refused_publishes_are_said() {
    let s = TestServer::start().await;
    let mut alice = V5::connect(&s, "alice", "alice-v5", |_| {}).await;
    let client = alice.client.clone();
    tokio::spawn(async move {
        for _ in 0..200 {
            let refused = client
                .publish("users/bob/notifications", QoS::AtMostOnce, false, "{}")
                .await;
            if refused.is_err() {
                return;
            }
        }
    });
    assert_eq!(
        alice.until_disconnected().await,
        DisconnectReasonCode::MessageRateTooHigh
    );
}
