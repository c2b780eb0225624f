//! MQTT 3.1.1 and 5 normative statements, one test each (or one for a few that go together),
//! named by the statement's id (MQTT-x.y.z-n, or the section where MQTT 5 numbers none), on
//! the wire with hand-written packets where a client library would hide the case. Each test
//! would fail if its rule were broken; `docs/MQTT-CONFORMANCE.md` lists every MUST with its
//! status. This module has the first ones and the helpers; the rest are by section:
//! `connect` (3.1, 3.2, 3.14), `publish` (3.3 to 3.7, 4.3 to 4.6), `subscribe` (3.8 to
//! 3.11, 4.7), `strings` (1.5), `v5` (what only MQTT 5 has), `websocket` (6).

#[path = "../common/mod.rs"]
mod common;
mod connect;
mod publish;
mod strings;
mod subscribe;
mod v5;
mod websocket;

use common::raw::{field, next_v5_publish, packet, publish_v5, RawConnect, RawMqtt};
use common::{granted, Client, TestServer, Via};
use serde_json::json;

const WILL: &str = r#"{"type":"message","text":"carol is gone"}"#;

/// A server with `c1` of alice, bob and carol, and alice listening on `chat/c1`.
async fn with_listener() -> (TestServer, Client) {
    let s = TestServer::with_c1().await;
    let mut alice = s.connect(Via::Tcp, "alice").await;
    assert!(granted(&alice.subscribe(&["chat/c1"]).await[0]));
    (s, alice)
}

/// Bob says `text` on `chat/c1`; alice's next message must be it (so nothing, a Will say,
/// came before it).
async fn next_is_marker(s: &TestServer, alice: &mut Client, text: &str) {
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
        .await;
    assert_eq!(alice.recv().await.json()["text"], text);
}

/// Carol at MQTT `level` (4 or 5) with a Last Will on `chat/c1`.
async fn carol_with_will(s: &TestServer, level: u8) -> RawMqtt {
    let mut connect = RawConnect::v5("carol-dev", "carol", &s.token("carol"));
    connect.level = level;
    connect.will = Some(("chat/c1".into(), WILL.as_bytes().to_vec()));
    let (carol, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    carol
}

#[tokio::test]
async fn mqtt_3_14_2_1_a_disconnect_of_length_0_is_normal_and_discards_the_will() {
    // Also MQTT-3.1.2-10 and MQTT-3.14.4-3: a normal DISCONNECT publishes no Will. `E0 00` is
    // what paho-mqtt, aiomqtt and mosquitto_pub/sub -V 5 send.
    let (s, mut alice) = with_listener().await;
    let mut carol = carol_with_will(&s, 5).await;
    carol.send(&[0xE0, 0x00]).await;
    assert!(
        carol.closed_silently().await,
        "answered a normal DISCONNECT"
    );
    next_is_marker(&s, &mut alice, "after a normal disconnect").await;
    // The same with the reason written out (`E0 01 00`, as MQTT.js sends it).
    let mut carol = carol_with_will(&s, 5).await;
    carol.send(&[0xE0, 0x01, 0x00]).await;
    assert!(carol.closed_silently().await);
    next_is_marker(&s, &mut alice, "after a normal disconnect, again").await;
}

#[tokio::test]
async fn mqtt_3_14_2_1_a_disconnect_with_reason_0x04_publishes_the_will() {
    let (s, mut alice) = with_listener().await;
    let mut carol = carol_with_will(&s, 5).await;
    carol.send(&[0xE0, 0x01, 0x04]).await;
    assert!(carol.closed_silently().await);
    let will = alice.recv().await.json();
    assert_eq!(
        (&will["text"], &will["sender_id"]),
        (&json!("carol is gone"), &json!("carol"))
    );
    // A connection that just drops publishes it too (the allowed case of MQTT-3.1.2-8).
    let carol = carol_with_will(&s, 5).await;
    drop(carol);
    assert_eq!(alice.recv().await.json()["text"], "carol is gone");
}

/// Bob's QoS 1 message on `chat/c1` (while a phone is away).
async fn while_away(s: &TestServer, text: &str) {
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
        .await;
}

/// Carol's phone on MQTT 5: connects with `clean` and `expiry`, subscribed to `chat/c1` if it
/// is a new session; the CONNACK's session present.
async fn phone(s: &TestServer, clean: bool, expiry: Option<u32>) -> (RawMqtt, bool) {
    let mut connect = RawConnect::v5("phone", "carol", &s.token("carol"));
    connect.clean = clean;
    connect.session_expiry = expiry;
    let (mut raw, (present, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    if !present {
        assert_eq!(raw.subscribe("chat/c1", 5).await, 1);
    }
    (raw, present)
}

/// The next PUBLISH's payload text, acknowledged.
async fn next_publish(raw: &mut RawMqtt) -> String {
    loop {
        let (first, body) = raw.next().await.expect("a PUBLISH");
        if first >> 4 != 3 {
            continue;
        }
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let mut at = 2 + topic_len;
        if first & 0b0110 != 0 {
            raw.send(&packet(0x40, &[body[at], body[at + 1], 0, 0]))
                .await;
            at += 2;
        }
        let props = usize::from(body[at]); // short property sections only
        return String::from_utf8_lossy(&body[at + 1 + props..]).into_owned();
    }
}

/// Ends `raw` with a normal DISCONNECT and waits until the server closed it (the hub has the
/// session away by then).
async fn leave(mut raw: RawMqtt) {
    raw.send(&[0xE0, 0x00]).await;
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_1_2_4_clean_start_0_without_an_expiry_resumes_the_stored_session() {
    let s = TestServer::with_c1().await;
    let (first, present) = phone(&s, true, Some(600)).await;
    assert!(!present);
    leave(first).await;
    while_away(&s, "while you were away").await;
    // Clean Start 0 with no Session Expiry Interval: resumed (MQTT-3.1.2-4), what waited comes.
    let (mut second, present) = phone(&s, false, None).await;
    assert!(present, "the stored session was discarded");
    assert!(next_publish(&mut second)
        .await
        .contains("while you were away"));
    // The new expiry (0) governs once this connection ends (MQTT-3.1.2-5): nothing is kept.
    leave(second).await;
    let (_third, present) = phone(&s, false, None).await;
    assert!(!present, "a session with expiry 0 outlived its connection");
}

#[tokio::test]
async fn section_3_1_2_11_clean_start_1_with_an_expiry_keeps_the_new_session() {
    // paho-mqtt 2's and aiomqtt's first connect (MQTT_CLEAN_START_FIRST_ONLY).
    let s = TestServer::with_c1().await;
    let (first, present) = phone(&s, true, Some(600)).await;
    assert!(!present);
    leave(first).await;
    while_away(&s, "kept for you").await;
    let (mut second, present) = phone(&s, false, Some(600)).await;
    assert!(present, "the new session was not kept");
    assert!(next_publish(&mut second).await.contains("kept for you"));
}

/// A v5 DISCONNECT with reason 0 and a Session Expiry Interval.
fn disconnect_with_expiry(secs: u32) -> Vec<u8> {
    let mut body = vec![0x00, 5, 0x11];
    body.extend_from_slice(&secs.to_be_bytes());
    packet(0xE0, &body)
}

#[tokio::test]
async fn section_3_14_2_2_2_a_disconnects_session_expiry_replaces_the_connects() {
    let s = TestServer::with_c1().await;
    let (mut first, _) = phone(&s, false, Some(600)).await;
    first.send(&disconnect_with_expiry(0)).await;
    assert!(first.closed_silently().await);
    let (_second, present) = phone(&s, false, Some(600)).await;
    assert!(!present, "DISCONNECT's expiry of 0 was ignored");
}

#[tokio::test]
async fn section_3_14_2_2_2_a_disconnect_may_not_raise_an_expiry_of_0() {
    let s = TestServer::with_c1().await;
    let (mut first, _) = phone(&s, true, None).await;
    first.send(&disconnect_with_expiry(600)).await;
    let (kind, body) = first.next().await.expect("the server's DISCONNECT");
    assert_eq!((kind, body[0]), (0xE0, 0x82), "protocol error expected");
}

#[tokio::test]
async fn section_3_3_1_2_a_publish_above_maximum_qos_is_disconnect_0x9b() {
    let s = TestServer::with_c1().await;
    let (mut carol, _) = phone(&s, true, None).await;
    let mut body = Vec::new();
    field(b"chat/c1", &mut body);
    body.extend_from_slice(&[0, 7, 0]); // packet id 7, no properties
    body.extend_from_slice(br#"{"type":"message","text":"qos 2"}"#);
    carol.send(&packet(0x34, &body)).await;
    let (kind, body) = carol.next().await.expect("the server's DISCONNECT");
    assert_eq!((kind, body[0]), (0xE0, 0x9B));
}

/// A 3.1.1 connection of alice's, past its CONNACK.
async fn v4_session(s: &TestServer) -> RawMqtt {
    let connect = RawConnect::v4("alice-raw", "alice", &s.token("alice"));
    let (raw, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    raw
}

/// Whether a 3.1.1 CONNECT changed by `change` is closed with no CONNACK.
async fn connect_is_closed(s: &TestServer, change: impl FnOnce(&mut RawConnect)) -> bool {
    let mut connect = RawConnect::v4("alice-raw", "alice", &s.token("alice"));
    change(&mut connect);
    let mut raw = RawMqtt::open(s.mqtt).await;
    raw.send(&connect.encode()).await;
    raw.closed_silently().await
}

#[tokio::test]
async fn mqtt_2_2_2_2_a_connect_with_fixed_header_flags_is_closed() {
    let s = TestServer::with_c1().await;
    assert!(connect_is_closed(&s, |c| c.first_byte = Some(0x12)).await);
    assert!(
        !connect_is_closed(&s, |_| {}).await,
        "the valid CONNECT was refused"
    );
}

#[tokio::test]
async fn mqtt_3_1_2_3_a_connect_with_the_reserved_flag_is_closed() {
    let s = TestServer::with_c1().await;
    // User name, password and clean session (0xC2), plus the reserved bit.
    assert!(connect_is_closed(&s, |c| c.flags = Some(0xC3)).await);
}

#[tokio::test]
async fn mqtt_3_1_2_22_not_enforced_a_password_without_a_user_name_is_taken() {
    // By design (docs/MQTT-CONFORMANCE.md): the token is the whole credential, rumqttc sends
    // it this way when its user name is empty, and MQTT 5 dropped the rule.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
        (connect.level, connect.username) = (level, None);
        let (_, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
        assert_eq!(code, 0, "MQTT level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_8_1_1_a_subscribe_with_wrong_flags_is_closed() {
    let s = TestServer::with_c1().await;
    let mut raw = v4_session(&s).await;
    assert_eq!(
        raw.subscribe("chat/c1", 4).await,
        1,
        "0x82 is the valid form"
    );
    let mut body = vec![0, 2];
    field(b"chat/c1", &mut body);
    body.push(1);
    raw.send(&packet(0x80, &body)).await;
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_2_3_1_1_a_qos_1_publish_with_packet_id_0_is_closed() {
    let s = TestServer::with_c1().await;
    let mut raw = v4_session(&s).await;
    let mut body = Vec::new();
    field(b"chat/c1", &mut body);
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(br#"{"type":"message","text":"id 0"}"#);
    raw.send(&packet(0x32, &body)).await;
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_1_0_1_a_first_packet_that_is_not_connect_is_closed() {
    let s = TestServer::with_c1().await;
    let mut raw = RawMqtt::open(s.mqtt).await;
    raw.send(&[0xC0, 0x00]).await; // PINGREQ
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_1_0_2_a_second_connect_is_closed() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
        connect.level = level;
        let (mut raw, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
        assert_eq!(code, 0);
        raw.send(&connect.encode()).await;
        // Closed; MQTT 5 says why first (DISCONNECT 0x82).
        match raw.next().await {
            None => assert_eq!(level, 4),
            Some((kind, body)) => assert_eq!((level, kind, body[0]), (5, 0xE0, 0x82)),
        }
        if level == 5 {
            assert!(raw.closed_silently().await);
        }
    }
}

/// A v5 connection of `user` subscribed to `chat/c1` with `options`.
async fn subscribed_v5(s: &TestServer, user: &str, options: u8) -> RawMqtt {
    common::raw::subscribed_v5(s.mqtt, user, &s.token(user), options).await
}

#[tokio::test]
async fn mqtt_3_8_3_3_no_local_keeps_a_clients_own_messages_from_it() {
    let (s, mut alice) = with_listener().await;
    // Without No Local, carol gets her own message (the allowed case).
    let mut carol = subscribed_v5(&s, "carol", 0x01).await;
    carol.send(&publish_v5(1, &[], "mine")).await;
    assert!(String::from_utf8_lossy(&next_v5_publish(&mut carol).await.payload).contains("mine"));
    drop(carol);
    // With No Local she does not; alice does, and carol's next message is bob's.
    let mut carol = subscribed_v5(&s, "carol", 0x05).await;
    carol.send(&publish_v5(2, &[], "not for me")).await;
    assert_eq!(alice.recv().await.json()["text"], "mine");
    assert_eq!(alice.recv().await.json()["text"], "not for me");
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": "from bob"}))
        .await;
    let next = next_v5_publish(&mut carol).await;
    assert!(String::from_utf8_lossy(&next.payload).contains("from bob"));
}

#[tokio::test]
async fn mqtt_3_3_2_4_and_15_to_20_publish_properties_reach_v5_subscribers_unaltered() {
    let (s, mut alice) = with_listener().await;
    let mut bob = subscribed_v5(&s, "bob", 0x01).await;
    let mut carol = subscribed_v5(&s, "carol", 0x01).await;
    // Payload Format Indicator 1, Content Type, Response Topic, Correlation Data, two User
    // Properties with the same name (their order is kept: MQTT-3.3.2-18).
    let mut props = vec![0x01, 1, 0x03];
    field(b"application/json", &mut props);
    props.push(0x08);
    field(b"chat/c1", &mut props);
    props.push(0x09);
    field(b"\x00\x07", &mut props);
    for value in [&b"one"[..], b"two"] {
        props.push(0x26);
        field(b"k", &mut props);
        field(value, &mut props);
    }
    carol.send(&publish_v5(1, &props, "with properties")).await;
    let got = next_v5_publish(&mut bob).await;
    let p = got.properties.expect("properties");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.response_topic.as_deref(), Some("chat/c1"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00\x07"[..]));
    let users = [
        ("k".to_owned(), "one".to_owned()),
        ("k".into(), "two".into()),
    ];
    assert_eq!(p.user_properties, users);
    // A 3.1.1 subscriber gets the message, without them.
    assert_eq!(alice.recv().await.json()["text"], "with properties");
}

/// Carol on MQTT 5 with a Will on `chat/c1` whose properties are `properties`, her session kept
/// for 600 s.
async fn carol_with_will_properties(s: &TestServer, properties: Vec<u8>) -> RawMqtt {
    let mut connect = RawConnect::v5("carol-dev", "carol", &s.token("carol"));
    connect.will = Some(("chat/c1".into(), WILL.as_bytes().to_vec()));
    connect.will_properties = properties;
    connect.session_expiry = Some(600);
    let (carol, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    carol
}

/// A Will Delay Interval property of `secs`.
fn will_delay(secs: u32) -> Vec<u8> {
    let mut props = vec![0x18];
    props.extend_from_slice(&secs.to_be_bytes());
    props
}

#[tokio::test]
async fn mqtt_3_1_3_9_the_will_waits_for_its_delay() {
    let (s, mut alice) = with_listener().await;
    let carol = carol_with_will_properties(&s, will_delay(1)).await;
    let dropped = std::time::Instant::now();
    drop(carol); // the network goes
    assert_eq!(alice.recv().await.json()["text"], "carol is gone");
    let waited = dropped.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(950),
        "sent after {waited:?}"
    );
}

#[tokio::test]
async fn mqtt_3_1_3_9_a_client_back_within_the_delay_sends_no_will() {
    let (s, mut alice) = with_listener().await;
    let carol = carol_with_will_properties(&s, will_delay(1)).await;
    drop(carol);
    // Back at once (Clean Start 0, no Will this time), later ending with a normal DISCONNECT.
    let mut connect = RawConnect::v5("carol-dev", "carol", &s.token("carol"));
    (connect.clean, connect.session_expiry) = (false, Some(600));
    let (mut back, (present, _)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert!(present);
    // The first connection's delay passes (the timer under test: nothing to await instead).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    next_is_marker(&s, &mut alice, "no will came").await;
    back.send(&[0xE0, 0x00]).await;
    assert!(back.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_1_3_10_a_wills_properties_go_with_it() {
    let s = TestServer::with_c1().await;
    let mut bob = subscribed_v5(&s, "bob", 0x01).await;
    // Two User Properties of one name: their order is kept. Also MQTT-3.1.2-14 (5; 3.1.1:
    // -16): a Will not to be retained goes out with RETAIN 0.
    let mut props = Vec::new();
    for value in [&b"network"[..], b"battery"] {
        props.push(0x26);
        field(b"why", &mut props);
        field(value, &mut props);
    }
    let carol = carol_with_will_properties(&s, props).await;
    drop(carol);
    let will = next_v5_publish(&mut bob).await;
    assert!(String::from_utf8_lossy(&will.payload).contains("carol is gone"));
    assert!(!will.retain);
    let users = will.properties.expect("properties").user_properties;
    let expected =
        [("why", "network"), ("why", "battery")].map(|(k, v)| (k.to_owned(), v.to_owned()));
    assert_eq!(users, expected);
}

/// A session of alice at MQTT `level` (4 or 5), clean, as `alice-raw`.
async fn raw_session(s: &TestServer, level: u8) -> RawMqtt {
    let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
    connect.level = level;
    let (raw, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0, "MQTT level {level}");
    raw
}

#[tokio::test]
async fn mqtt_3_12_4_1_a_pingreq_is_answered_with_a_pingresp() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&[0xC0, 0x00]).await;
        assert_eq!(raw.next().await, Some((0xD0, Vec::new())), "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_8_4_1_and_2_and_5_a_subscribe_gets_one_suback_with_its_packet_id_and_a_code_per_filter(
) {
    // Also MQTT-3.8.4-4 and MQTT-3.9.3-1: two filters are handled as two SUBSCRIBEs, their
    // codes in order in one SUBACK; alice may not read `chat/c2` (0x80).
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 4).await;
    let mut body = vec![0x12, 0x34];
    for filter in ["chat/c1", "chat/c2"] {
        field(filter.as_bytes(), &mut body);
        body.push(1);
    }
    raw.send(&packet(0x82, &body)).await;
    assert_eq!(raw.next().await, Some((0x90, vec![0x12, 0x34, 1, 0x80])));
}

#[tokio::test]
async fn mqtt_3_10_4_4_and_5_an_unsubscribe_gets_an_unsuback_with_its_packet_id_even_for_nothing() {
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 4).await;
    assert_eq!(raw.subscribe("chat/c1", 4).await, 1);
    for pkid in [[0x43, 0x21], [0x43, 0x22]] {
        // The first removes the subscription, the second finds none.
        let mut body = pkid.to_vec();
        field(b"chat/c1", &mut body);
        raw.send(&packet(0xA2, &body)).await;
        assert_eq!(raw.next().await, Some((0xB0, pkid.to_vec())));
    }
}

#[tokio::test]
async fn mqtt_3_3_1_4_a_publish_with_both_qos_bits_set_is_closed() {
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 4).await;
    let mut body = Vec::new();
    field(b"chat/c1", &mut body);
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(br#"{"type":"message","text":"qos 3"}"#);
    raw.send(&packet(0x36, &body)).await;
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_8_3_4_a_subscribe_asking_for_qos_3_is_closed() {
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 4).await;
    let mut body = vec![0, 1];
    field(b"chat/c1", &mut body);
    body.push(3);
    raw.send(&packet(0x82, &body)).await;
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_8_3_3_and_3_10_3_2_a_subscribe_or_unsubscribe_with_no_filter_is_closed() {
    // MQTT 5: MQTT-3.8.3-2 and MQTT-3.10.3-2 (a protocol error, 0x82).
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for first in [0x82, 0xA2] {
            let mut raw = raw_session(&s, level).await;
            let body: &[u8] = if level == 5 { &[0, 1, 0] } else { &[0, 1] };
            raw.send(&packet(first, body)).await;
            let end = ending(&mut raw).await;
            match level {
                4 => assert_eq!(end, None, "packet {first:#x}"),
                _ => assert!(end.is_some_and(|r| r >= 0x80), "packet {first:#x}: {end:?}"),
            }
        }
    }
}

#[tokio::test]
async fn mqtt_3_1_3_8_an_empty_client_id_without_clean_session_gets_0x02_and_is_closed() {
    let s = TestServer::with_c1().await;
    let mut connect = RawConnect::v4("", "alice", &s.token("alice"));
    connect.clean = false;
    let (mut raw, (present, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!((present, code), (false, 0x02));
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_1_3_6_an_empty_client_id_with_clean_session_is_given_one() {
    let s = TestServer::with_c1().await;
    let connect = RawConnect::v4("", "alice", &s.token("alice"));
    let (mut raw, (present, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!((present, code), (false, 0));
    assert_eq!(raw.subscribe("chat/c1", 4).await, 1, "a working session");
}

#[tokio::test]
async fn mqtt_3_1_2_6_and_3_2_2_1_clean_session_discards_the_stored_one() {
    let s = TestServer::with_c1().await;
    let persistent = |clean| {
        let mut connect = RawConnect::v4("alice-kept", "alice", &s.token("alice"));
        connect.clean = clean;
        connect
    };
    let (mut raw, (present, _)) = RawMqtt::connect(s.mqtt, &persistent(false)).await;
    assert!(!present);
    assert_eq!(raw.subscribe("chat/c1", 4).await, 1);
    leave(raw).await;
    let (raw, (present, _)) = RawMqtt::connect(s.mqtt, &persistent(false)).await;
    assert!(present, "MQTT-3.2.2-2: the stored session is there");
    leave(raw).await;
    let (raw, (present, _)) = RawMqtt::connect(s.mqtt, &persistent(true)).await;
    assert!(
        !present,
        "MQTT-3.2.2-1: session present 0 with clean session"
    );
    leave(raw).await;
    let (_, (present, _)) = RawMqtt::connect(s.mqtt, &persistent(false)).await;
    assert!(
        !present,
        "MQTT-3.1.2-6: the discarded session is not reused"
    );
}

// Helpers for the statement modules (`connect`, `publish`, `subscribe`, `strings`, `v5`,
// `websocket`).

/// A chat message's JSON bytes.
fn chat(text: &str) -> Vec<u8> {
    json!({"type": "message", "text": text})
        .to_string()
        .into_bytes()
}

/// A PUBLISH with first byte `first`, `topic`, a packet id (QoS above 0), v5 `props` (`None`
/// for 3.1.1) and `payload`.
fn publish(
    first: u8,
    topic: &[u8],
    pkid: Option<u16>,
    props: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    field(topic, &mut body);
    if let Some(pkid) = pkid {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if let Some(props) = props {
        common::raw::varint(props.len(), &mut body);
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    packet(first, &body)
}

/// A QoS 1 chat message on `chat/c1` at `level` (packet id `pkid`).
fn chat_publish(level: u8, pkid: u16, text: &str) -> Vec<u8> {
    let props = (level == 5).then_some(&[][..]);
    publish(0x32, b"chat/c1", Some(pkid), props, &chat(text))
}

/// A SUBSCRIBE (packet id `pkid`) of `filters` with their option bytes, at `level`.
fn subscribe_packet(level: u8, pkid: u16, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0);
    }
    for (filter, options) in filters {
        field(filter, &mut body);
        body.push(*options);
    }
    packet(0x82, &body)
}

/// An UNSUBSCRIBE (packet id `pkid`) of `filters`, at `level`.
fn unsubscribe_packet(level: u8, pkid: u16, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0);
    }
    for filter in filters {
        field(filter, &mut body);
    }
    packet(0xA2, &body)
}

/// Reads to the end of the connection: the reason of the server's DISCONNECT if one came
/// first (`None` if it closed without a word); panics on any other answer.
async fn ending(raw: &mut RawMqtt) -> Option<u8> {
    match raw.next().await {
        None => None,
        Some((0xE0, body)) => {
            assert!(raw.closed_silently().await, "not closed after DISCONNECT");
            Some(body.first().copied().unwrap_or(0))
        }
        Some(other) => panic!("answered {other:02x?} instead of closing"),
    }
}

/// Whether the connection was closed as the specifications say for a malformed packet or a
/// protocol error: 3.1.1 without a word, MQTT 5 after a DISCONNECT of reason `v5_reason`.
async fn closed_for(raw: &mut RawMqtt, level: u8, v5_reason: u8) -> bool {
    let end = ending(raw).await;
    match level {
        4 => end.is_none(),
        _ => end == Some(v5_reason),
    }
}

/// A PUBLISH as a 3.1.1 or v5 session receives it: first byte, packet id, payload.
struct Delivery {
    first: u8,
    pkid: Option<u16>,
    topic: Vec<u8>,
    /// MQTT 5: the property section's bytes.
    properties: Vec<u8>,
    payload: Vec<u8>,
}

/// The next PUBLISH to a session at `level`, not acknowledged.
async fn next_delivery(raw: &mut RawMqtt, level: u8) -> Delivery {
    loop {
        let (first, body) = raw.next().await.expect("a PUBLISH");
        if first >> 4 != 3 {
            continue;
        }
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = body[2..2 + topic_len].to_vec();
        let mut at = 2 + topic_len;
        let mut pkid = None;
        if first & 0b0110 != 0 {
            pkid = Some(u16::from_be_bytes([body[at], body[at + 1]]));
            at += 2;
        }
        let mut properties = Vec::new();
        if level == 5 {
            let (len, used) = read_varint(&body[at..]);
            properties = body[at + used..at + used + len].to_vec();
            at += used + len;
        }
        let payload = body[at..].to_vec();
        return Delivery {
            first,
            pkid,
            topic,
            properties,
            payload,
        };
    }
}

/// Acknowledges a QoS 1 delivery.
async fn ack(raw: &mut RawMqtt, pkid: u16) {
    raw.send(&packet(0x40, &pkid.to_be_bytes())).await;
}

/// A variable byte integer at the start of `bytes`: its value and length.
fn read_varint(bytes: &[u8]) -> (usize, usize) {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("a bad variable byte integer: {bytes:02x?}")
}

/// An MQTT 5 property section (without its length) as (identifier, value bytes) pairs.
fn properties(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&id, rest)) = bytes.split_first() {
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => read_varint(rest).1,
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F | 0x09 | 0x16 => {
                2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]))
            }
            0x26 => {
                let first = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                first + 2 + usize::from(u16::from_be_bytes([rest[first], rest[first + 1]]))
            }
            other => panic!("unknown property {other:#04x}"),
        };
        out.push((id, rest[..len].to_vec()));
        bytes = &rest[len..];
    }
    out
}

/// The properties of a v5 CONNACK's body.
fn connack_properties(body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let (len, used) = read_varint(&body[2..]);
    properties(&body[2 + used..2 + used + len])
}

/// A v5 CONNACK for `connect`: (flags byte, reason, properties), the connection open.
async fn v5_connack(s: &TestServer, connect: &RawConnect) -> (RawMqtt, u8, u8, Vec<(u8, Vec<u8>)>) {
    let mut raw = RawMqtt::open(s.mqtt).await;
    raw.send(&connect.encode()).await;
    let (first, body) = raw.next().await.expect("CONNACK");
    assert_eq!(first, 0x20, "expected CONNACK");
    let props = connack_properties(&body);
    (raw, body[0], body[1], props)
}

/// `bytes` with its one occurrence of `from` replaced by `to` (as long): for fields a
/// well-formed encoder will not write.
fn replaced(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the bytes to replace");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}
