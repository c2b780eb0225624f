//! Persistent sessions survive a SIGKILL of callbus: their subscriptions, and every event the
//! REST layer made for them while they were away, reach them when they come back to the
//! restarted process, in order, before newer ones.

mod common;

use callbus::auth::Role;
use common::process::{mqtt, spawn_with, token, Proc};
use common::raw::{next_v5_says, publish_unechoed, RawConnect, RawMqtt};
use common::WAIT;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

/// mia's phone: a persistent session (client id `phone`) on `proc`.
async fn phone(proc: &Proc) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new("phone", "127.0.0.1", proc.mqtt);
    options
        .set_credentials("mia", token("mia", Role::User))
        .set_clean_session(false);
    AsyncClient::new(options, 10)
}

/// The next packet from the broker, bounded by [`WAIT`].
async fn next(events: &mut EventLoop) -> Packet {
    loop {
        let event = tokio::time::timeout(WAIT, events.poll())
            .await
            .expect("an MQTT event in time")
            .expect("connection alive");
        if let Event::Incoming(packet) = event {
            return packet;
        }
    }
}

async fn next_publish(events: &mut EventLoop) -> Value {
    loop {
        if let Packet::Publish(p) = next(events).await {
            assert_eq!(p.topic, "users/mia/notifications");
            return serde_json::from_slice(&p.payload).expect("JSON");
        }
    }
}

async fn notify(proc: &Proc, n: u64) {
    let body = json!({"user_id": "mia", "payload": {"n": n}});
    let path = "/api/notifications/";
    let service = ("app", Role::Service);
    let (status, _) = proc
        .call(reqwest::Method::POST, path, service, Some(body))
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_stored_session_gets_what_it_missed_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_with(dir.path(), &[]).await;

    // The phone subscribes (the SUBACK means the subscription is on disk) and leaves.
    let (client, mut events) = phone(&first).await;
    assert!(matches!(next(&mut events).await, Packet::ConnAck(a) if !a.session_present));
    client
        .subscribe("users/mia/notifications", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(next(&mut events).await, Packet::SubAck(_)));
    client.disconnect().await.unwrap();
    while events.poll().await.is_ok() {}

    // Two notifications and an incoming call while it is away; each 2xx means on disk.
    notify(&first, 0).await;
    notify(&first, 1).await;
    first.set_members("c1", &["alice", "mia"]).await;
    first.initiate("alice", "mia").await;
    drop(first); // SIGKILL

    let second = spawn_with(dir.path(), &[]).await;
    let (_client, mut events) = phone(&second).await;
    match next(&mut events).await {
        Packet::ConnAck(ack) => assert!(ack.session_present, "the session did not survive"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(next_publish(&mut events).await["payload"]["n"], 0);
    assert_eq!(next_publish(&mut events).await["payload"]["n"], 1);
    let ring = next_publish(&mut events).await;
    assert_eq!(ring["type"], "notification.created");
    assert_eq!(ring["payload"]["verb"], "incoming_voice_call");
    // Live traffic after the replay, without a new SUBSCRIBE.
    notify(&second, 2).await;
    assert_eq!(next_publish(&mut events).await["payload"]["n"], 2);
}

/// mia's MQTT 5 phone (Clean Start 0, an hour's session expiry) on `proc`; whether its
/// session was there.
async fn v5_phone(proc: &Proc) -> (RawMqtt, bool) {
    let mut connect = RawConnect::v5("phone5", "mia", &token("mia", Role::User));
    connect.clean = false;
    connect.session_expiry = Some(3600);
    let mqtt = std::net::SocketAddr::from(([127, 0, 0, 1], proc.mqtt));
    let (raw, (present, code)) = RawMqtt::connect(mqtt, &connect).await;
    assert_eq!(code, 0);
    (raw, present)
}

/// Ends the phone with a normal DISCONNECT, once the server has closed it.
async fn leave(mut phone: RawMqtt) {
    phone.send(&[0xE0, 0x00]).await;
    assert!(phone.closed_silently().await);
}

/// The phone says something on `chat/c1` (packet id `pkid`) and, its No Local subscription
/// holding, does not get it back: the next message it gets is alice's, sent after.
async fn own_message_kept_from(proc: &Proc, phone: &mut RawMqtt, pkid: u16) {
    publish_unechoed(phone, pkid, "mine").await;
    let (alice, mut events) = mqtt(proc, "alice").await.expect("alice connects");
    let said = json!({"type": "message", "text": "from alice"}).to_string();
    alice
        .publish("chat/c1", QoS::AtLeastOnce, false, said)
        .await
        .expect("publish");
    common::process::next(&mut events, |p| {
        matches!(p, Packet::PubAck(_)).then_some(())
    })
    .await;
    assert!(next_v5_says(phone, "from alice").await);
}

/// MQTT 5's No Local is part of the stored session (MQTT-3.8.3-3 holds for as long as the
/// subscription does): resumed on the same process and after a SIGKILL, a phone still does
/// not get its own messages back.
#[tokio::test]
async fn a_stored_sessions_no_local_holds_when_it_resumes_and_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_with(dir.path(), &[]).await;
    first.set_members("c1", &["alice", "mia"]).await;
    let (mut phone, present) = v5_phone(&first).await;
    assert!(!present);
    assert_eq!(phone.subscribe_with("chat/c1", 5, 0x05).await, 1); // QoS 1, No Local
    own_message_kept_from(&first, &mut phone, 1).await;
    leave(phone).await;

    let (mut phone, present) = v5_phone(&first).await;
    assert!(present);
    own_message_kept_from(&first, &mut phone, 2).await;
    leave(phone).await;
    drop(first); // SIGKILL

    let second = spawn_with(dir.path(), &[]).await;
    let (mut phone, present) = v5_phone(&second).await;
    assert!(present, "the session did not survive");
    own_message_kept_from(&second, &mut phone, 3).await;
}
