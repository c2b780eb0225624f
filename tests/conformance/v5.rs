//! What only MQTT 5 says: properties callbus does not offer (enhanced authentication,
//! subscription identifiers, topic aliases), what a client asks the server not to send, and
//! the flow and size limits a client sets.

use super::common::raw::{field, packet, publish_v5, RawConnect, RawMqtt};
use super::common::{TestServer, Via};
use super::{
    closed_for, next_delivery, properties, raw_session, replaced, v5_connack, with_listener,
};
use serde_json::json;

#[tokio::test]
async fn mqtt_4_12_0_1_an_authentication_method_gets_0x8c_and_is_closed() {
    // Also MQTT-3.2.2-7 (closed after a refusal) and 4.12.0-7 (no AUTH is sent).
    let s = TestServer::with_c1().await;
    let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
    connect.properties = vec![0x15];
    field(b"SCRAM-SHA-1", &mut connect.properties);
    let (mut raw, flags, code, _) = v5_connack(&s, &connect).await;
    assert_eq!((flags, code), (0, 0x8C));
    assert!(raw.closed_silently().await);
}

#[tokio::test]
async fn mqtt_3_15_1_1_an_auth_packet_is_refused() {
    // With reserved flags set: malformed (0x81). Well-formed: a protocol error (0x82), as
    // callbus offers no enhanced authentication (MQTT-4.12.0-6 is the client's side of it).
    let s = TestServer::with_c1().await;
    for (first, reason) in [(0xF1, 0x81), (0xF0, 0x82)] {
        let mut raw = raw_session(&s, 5).await;
        raw.send(&[first, 0x00]).await;
        assert!(closed_for(&mut raw, 5, reason).await, "{first:#04x}");
    }
}

#[tokio::test]
async fn mqtt_1_5_7_1_both_strings_of_a_user_property_must_be_utf8() {
    let s = TestServer::with_c1().await;
    for (name, value) in [(&b"k\xff"[..], &b"v"[..]), (b"k", b"v\xff")] {
        let mut raw = raw_session(&s, 5).await;
        let mut props = vec![0x26];
        field(name, &mut props);
        field(value, &mut props);
        raw.send(&publish_v5(1, &props, "bad pair")).await;
        assert!(closed_for(&mut raw, 5, 0x81).await);
    }
}

#[tokio::test]
async fn mqtt_4_4_0_2_a_puback_refusing_a_delivery_still_acknowledges_it() {
    // carol's phone answers a delivery with PUBACK 0x80: it is not sent again on resume.
    let s = TestServer::with_c1().await;
    let mut connect = RawConnect::v5("carol-phone", "carol", &s.token("carol"));
    (connect.clean, connect.session_expiry) = (false, Some(600));
    let (mut phone, _) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(phone.subscribe("chat/c1", 5).await, 1);
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": "refused"}))
        .await;
    let got = next_delivery(&mut phone, 5).await;
    let pkid = got.pkid.expect("QoS 1").to_be_bytes();
    phone
        .send(&packet(0x40, &[pkid[0], pkid[1], 0x80, 0]))
        .await;
    phone.send(&[0xE0, 0]).await;
    assert!(phone.closed_silently().await);
    bob.publish_json("chat/c1", json!({"type": "message", "text": "next"}))
        .await;
    let (mut phone, (present, _)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert!(present);
    let next = next_delivery(&mut phone, 5).await;
    assert!(
        String::from_utf8_lossy(&next.payload).contains("next"),
        "sent again"
    );
}

#[tokio::test]
async fn mqtt_3_1_2_22_v5_a_silent_client_is_closed_after_one_and_a_half_keep_alives() {
    // Keep Alive 1 s, kept (no Server Keep Alive in the CONNACK: MQTT-3.2.2-22).
    let s = TestServer::with_c1().await;
    let connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
    let bytes = replaced(&connect.encode(), &[5, 0xC2, 0, 60], &[5, 0xC2, 0, 1]);
    let mut raw = RawMqtt::open(s.mqtt).await;
    raw.send(&bytes).await;
    let (first, body) = raw.next().await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0));
    let props = super::connack_properties(&body);
    assert!(
        props.iter().all(|(id, _)| *id != 0x13),
        "Server Keep Alive: {props:02x?}"
    );
    let start = std::time::Instant::now();
    assert!(
        closed_for(&mut raw, 5, 0x8D).await,
        "DISCONNECT 0x8D, Keep Alive timeout"
    );
    let waited = start.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1400),
        "after {waited:?}"
    );
}

/// The CONNACK reason for carol's v5 CONNECT with a Will and these `flags`, which must be
/// followed by the connection's close.
async fn will_refused(s: &TestServer, flags: u8) -> u8 {
    let mut connect = RawConnect::v5("carol-dev", "carol", &s.token("carol"));
    let will = br#"{"type":"message","text":"x"}"#.to_vec();
    (connect.will, connect.flags) = (Some(("chat/c1".into(), will)), Some(flags));
    let (mut raw, _, code, _) = v5_connack(s, &connect).await;
    assert!(raw.closed_silently().await);
    code
}

#[tokio::test]
async fn mqtt_3_2_2_12_a_will_qos_above_maximum_qos_gets_0x9b() {
    let s = TestServer::with_c1().await;
    assert_eq!(will_refused(&s, 0xC2 | 0x04 | 0x10).await, 0x9B); // Will QoS 2
}

#[tokio::test]
async fn mqtt_3_2_2_13_a_will_to_retain_gets_0x9a() {
    // Retain Available is 0. (3.1.1 has no such code: CONNACK 0x05 there, see will_retain.)
    let s = TestServer::with_c1().await;
    assert_eq!(will_refused(&s, 0xC2 | 0x04 | 0x20).await, 0x9A);
}

#[tokio::test]
async fn mqtt_3_3_2_13_and_14_a_response_topic_must_be_utf8_without_wildcards() {
    let s = TestServer::with_c1().await;
    for (topic, reason) in [
        (&b"chat/#"[..], 0x82),
        (b"chat/+", 0x82),
        (b"chat/\xff", 0x81),
    ] {
        let mut raw = raw_session(&s, 5).await;
        let mut props = vec![0x08];
        field(topic, &mut props);
        raw.send(&publish_v5(1, &props, "respond")).await;
        assert!(closed_for(&mut raw, 5, reason).await, "{topic:02x?}");
    }
}

#[tokio::test]
async fn mqtt_3_3_2_19_a_content_type_must_be_utf8() {
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 5).await;
    let mut props = vec![0x03];
    field(b"text/\xff", &mut props);
    raw.send(&publish_v5(1, &props, "typed")).await;
    assert!(closed_for(&mut raw, 5, 0x81).await);
}

#[tokio::test]
async fn mqtt_3_3_4_6_a_publish_with_a_subscription_identifier_is_a_protocol_error() {
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 5).await;
    raw.send(&publish_v5(1, &[0x0B, 0x01], "identified")).await;
    assert!(closed_for(&mut raw, 5, 0x82).await);
}

#[tokio::test]
async fn section_3_8_2_1_2_a_subscription_identifier_is_not_supported() {
    // CONNACK says Subscription Identifiers Available 0: DISCONNECT 0xA1.
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 5).await;
    let mut body = vec![0, 1, 2, 0x0B, 0x07];
    field(b"chat/c1", &mut body);
    body.push(1);
    raw.send(&packet(0x82, &body)).await;
    assert!(closed_for(&mut raw, 5, 0xA1).await);
}

#[tokio::test]
async fn mqtt_3_3_2_7_and_12_a_topic_alias_is_a_protocol_error() {
    // Topic Alias Maximum is 0: no alias is ever accepted (0x94, Topic Alias invalid).
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 5).await;
    raw.send(&publish_v5(1, &[0x23, 0, 1], "aliased")).await;
    assert!(closed_for(&mut raw, 5, 0x94).await);
}

#[tokio::test]
async fn mqtt_3_1_2_26_and_27_the_server_sends_no_topic_alias() {
    // Even to a client that would take them (its Topic Alias Maximum 10).
    let (s, _listening) = with_listener().await;
    let mut connect = RawConnect::v5("carol-v5", "carol", &s.token("carol"));
    connect.properties = vec![0x22, 0, 10];
    let (mut carol, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    assert_eq!(carol.subscribe("chat/c1", 5).await, 1);
    let mut bob = s.connect(Via::Tcp, "bob").await;
    for n in 0..2 {
        bob.publish_json("chat/c1", json!({"type": "message", "text": n}))
            .await;
        let got = next_delivery(&mut carol, 5).await;
        assert_eq!(got.topic, b"chat/c1");
        let ids: Vec<u8> = properties(&got.properties).iter().map(|p| p.0).collect();
        assert!(!ids.contains(&0x23), "a topic alias: {ids:02x?}");
        super::ack(&mut carol, got.pkid.expect("QoS 1")).await;
    }
}

#[tokio::test]
async fn mqtt_3_1_2_28_and_29_what_a_client_asks_not_to_be_sent_is_not_sent() {
    // Request Response Information 1 gets no Response Information either (callbus has none
    // to give); Request Problem Information 0: a refused PUBLISH's PUBACK 0x87 carries no
    // Reason String. With 1 (the default) it does.
    let s = TestServer::with_c1().await;
    for (asked, reason_string) in [(0u8, false), (1, true)] {
        let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
        connect.properties = vec![0x19, 1, 0x17, asked];
        let (mut raw, _, code, connack) = v5_connack(&s, &connect).await;
        assert_eq!(code, 0);
        // No Response Information, and neither a Reason String nor a User Property
        // (MQTT-3.2.2-19, -20).
        let ids: Vec<u8> = connack.iter().map(|(id, _)| *id).collect();
        assert!(
            !ids.iter().any(|id| [0x1A, 0x1F, 0x26].contains(id)),
            "{ids:02x?}"
        );
        let mut body = Vec::new();
        field(b"chat/c2", &mut body);
        body.extend_from_slice(&[0, 4, 0]);
        body.extend_from_slice(br#"{"type":"message","text":"not a member"}"#);
        raw.send(&packet(0x32, &body)).await;
        let (kind, ack) = raw.next().await.expect("PUBACK");
        assert_eq!((kind, &ack[..3]), (0x40, &[0, 4, 0x87][..]));
        let props = if ack.len() > 3 {
            properties(&ack[4..])
        } else {
            Vec::new()
        };
        let has = props.iter().any(|(id, _)| *id == 0x1F);
        assert_eq!(has, reason_string, "Request Problem Information {asked}");
    }
}

#[tokio::test]
async fn mqtt_3_4_2_2_a_reason_string_never_makes_a_packet_too_large() {
    // A client whose Maximum Packet Size is 16 bytes gets its PUBACK 0x87 without one.
    let s = TestServer::with_c1().await;
    let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
    connect.properties = vec![0x27, 0, 0, 0, 16];
    let (mut raw, _, code, _) = v5_connack(&s, &connect).await;
    assert_eq!(code, 0);
    let mut body = Vec::new();
    field(b"chat/c2", &mut body);
    body.extend_from_slice(&[0, 4, 0]);
    body.extend_from_slice(br#"{"type":"message","text":"not a member"}"#);
    raw.send(&packet(0x32, &body)).await;
    let (kind, ack) = raw.next().await.expect("PUBACK");
    assert_eq!((kind, &ack[..3]), (0x40, &[0, 4, 0x87][..]));
    assert!(2 + ack.len() <= 16, "{} bytes", 2 + ack.len());
}

#[tokio::test]
async fn mqtt_3_3_1_4_v5_both_qos_bits_are_a_malformed_packet() {
    let s = TestServer::with_c1().await;
    let mut raw = raw_session(&s, 5).await;
    let mut bytes = publish_v5(1, &[], "qos 3");
    bytes[0] = 0x36;
    raw.send(&bytes).await;
    assert!(closed_for(&mut raw, 5, 0x81).await);
}

#[tokio::test]
async fn mqtt_3_3_4_10_a_full_receive_maximum_holds_back_only_publishes() {
    // Receive Maximum 1, one delivery unacknowledged: a PINGREQ is still answered, the next
    // PUBLISH waits for the PUBACK (MQTT-3.3.4-9; see also tests/mqtt5.rs).
    let s = TestServer::with_c1().await;
    let mut connect = RawConnect::v5("carol-v5", "carol", &s.token("carol"));
    connect.properties = vec![0x21, 0, 1];
    let (mut carol, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    assert_eq!(carol.subscribe("chat/c1", 5).await, 1);
    let mut bob = s.connect(Via::Tcp, "bob").await;
    for text in ["one", "two"] {
        bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
            .await;
    }
    let first = next_delivery(&mut carol, 5).await;
    carol.send(&[0xC0, 0]).await;
    assert_eq!(
        carol.next().await,
        Some((0xD0, Vec::new())),
        "held behind the quota"
    );
    super::ack(&mut carol, first.pkid.expect("QoS 1")).await;
    let second = next_delivery(&mut carol, 5).await;
    assert!(String::from_utf8_lossy(&second.payload).contains("two"));
}
