//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK (sections 3.8 to 3.11 of both
//! specifications), topic filters (4.7).

use super::common::raw::{RawConnect, RawMqtt};
use super::common::{TestServer, Via};
use super::{ack, closed_for, next_delivery, raw_session, subscribe_packet, unsubscribe_packet};
use serde_json::json;

/// The codes of the SUBACK to packet id 1, which at level 5 carries no properties (no Reason
/// String or User Property: MQTT-3.9.2-1, -2; their length 0: MQTT-2.2.2-1).
async fn suback_codes(raw: &mut RawMqtt, level: u8) -> Vec<u8> {
    let (kind, body) = raw.next().await.expect("SUBACK");
    assert_eq!(
        (kind, &body[..2]),
        (0x90, &[0, 1][..]),
        "SUBACK to packet id 1"
    );
    if level == 5 {
        assert_eq!(body[2], 0, "SUBACK properties");
        return body[3..].to_vec();
    }
    body[2..].to_vec()
}

#[tokio::test]
async fn mqtt_2_3_1_1_v4_subscribe_and_unsubscribe_with_packet_id_0_are_closed() {
    // MQTT 5: section 2.2.1 (a non-zero Packet Identifier), a malformed packet.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(level, 0, &[(b"chat/c1", 1)]))
            .await;
        assert!(
            closed_for(&mut raw, level, 0x81).await,
            "SUBSCRIBE, level {level}"
        );
        let mut raw = raw_session(&s, level).await;
        raw.send(&unsubscribe_packet(level, 0, &[b"chat/c1"])).await;
        assert!(
            closed_for(&mut raw, level, 0x81).await,
            "UNSUBSCRIBE, level {level}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_8_3_1_and_3_10_3_1_filters_must_be_utf8() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for bad in [&b"chat/\xff"[..], b"chat/\xed\xa0\x80"] {
            let mut raw = raw_session(&s, level).await;
            raw.send(&subscribe_packet(level, 1, &[(bad, 1)])).await;
            assert!(
                closed_for(&mut raw, level, 0x81).await,
                "SUBSCRIBE, level {level}"
            );
            let mut raw = raw_session(&s, level).await;
            raw.send(&unsubscribe_packet(level, 1, &[bad])).await;
            assert!(
                closed_for(&mut raw, level, 0x81).await,
                "UNSUBSCRIBE, level {level}"
            );
        }
    }
}

#[tokio::test]
async fn mqtt_3_8_3_4_v4_reserved_bits_in_a_requested_qos_are_closed() {
    // MQTT 5: MQTT-3.8.3-5 (bits 6 and 7 of the options) and Retain Handling 3 (a protocol
    // error, section 3.8.3.1).
    let s = TestServer::with_c1().await;
    for (level, options, reason) in [(4, 0x81, 0), (4, 0x05, 0), (5, 0x41, 0x81), (5, 0x31, 0x82)] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(level, 1, &[(b"chat/c1", options)]))
            .await;
        let closed = closed_for(&mut raw, level, reason).await;
        assert!(closed, "level {level}, options {options:#04x}");
    }
    // The bits MQTT 5 gives meaning to are taken: No Local, Retain As Published, Retain
    // Handling 1 and 2.
    let mut raw = raw_session(&s, 5).await;
    raw.send(&subscribe_packet(5, 1, &[(b"chat/c1", 0x2D)]))
        .await;
    assert_eq!(suback_codes(&mut raw, 5).await, [1]);
}

#[tokio::test]
async fn mqtt_3_8_3_2_v4_wildcards_are_refused_for_users() {
    // callbus offers wildcards to operators only (5: 0xA2, Wildcard Subscription Available 0).
    let s = TestServer::with_c1().await;
    for (level, refusal) in [(4, 0x80), (5, 0xA2)] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(level, 1, &[(b"chat/+", 1), (b"#", 1)]))
            .await;
        assert_eq!(suback_codes(&mut raw, level).await, [refusal, refusal]);
    }
}

#[tokio::test]
async fn mqtt_3_9_3_2_and_3_2_2_10_v5_a_request_for_qos_2_is_granted_qos_1() {
    // 3.1.1: only 0x00, 0x01, 0x02 and 0x80; MQTT 5: a server without QoS 2 still takes a
    // SUBSCRIBE that asks for it.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(
            level,
            1,
            &[(b"chat/c1", 2), (b"chat/c1", 0)],
        ))
        .await;
        assert_eq!(suback_codes(&mut raw, level).await, [1, 0], "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_8_4_3_a_repeated_filter_replaces_the_subscription() {
    // MQTT 5: 3.8.4-3. Once at QoS 0, again at QoS 1: one copy per message, at QoS 1.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        for qos in [0, 1] {
            raw.send(&subscribe_packet(level, 1, &[(b"chat/c1", qos)]))
                .await;
            assert_eq!(suback_codes(&mut raw, level).await, [qos]);
        }
        let mut bob = s.connect(Via::Tcp, "bob").await;
        for text in ["once", "marker"] {
            bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
                .await;
        }
        let first = next_delivery(&mut raw, level).await;
        assert_eq!(first.first & 0x06, 0x02, "level {level}: not at QoS 1");
        assert!(String::from_utf8_lossy(&first.payload).contains("once"));
        ack(&mut raw, first.pkid.expect("QoS 1")).await;
        let next = next_delivery(&mut raw, level).await;
        assert!(
            String::from_utf8_lossy(&next.payload).contains("marker"),
            "level {level}: a second copy"
        );
    }
}

#[tokio::test]
async fn mqtt_3_10_1_1_an_unsubscribe_with_wrong_flags_is_closed() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        let mut bytes = unsubscribe_packet(level, 1, &[b"chat/c1"]);
        bytes[0] = 0xA0;
        raw.send(&bytes).await;
        assert!(closed_for(&mut raw, level, 0x81).await, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_10_4_1_and_2_only_the_identical_filter_unsubscribes_and_then_nothing_comes() {
    // MQTT 5: 3.10.4-1 and -2. Also MQTT 5's UNSUBACK codes, in order (MQTT-3.11.3-1, -2):
    // 0x11 for a filter that matched no subscription, 0x00 for one removed.
    let s = TestServer::with_c1().await;
    s.set_members("c2", &["alice", "bob"]).await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(
            level,
            1,
            &[(b"chat/c1", 1), (b"chat/c2", 1)],
        ))
        .await;
        assert_eq!(suback_codes(&mut raw, level).await, [1, 1]);
        raw.send(&unsubscribe_packet(
            level,
            2,
            &[b"chat/c1/", b"Chat/c1", b"chat/c1"],
        ))
        .await;
        let (kind, body) = raw.next().await.expect("UNSUBACK");
        assert_eq!((kind, &body[..2]), (0xB0, &[0, 2][..]));
        if level == 5 {
            // No properties (MQTT-3.11.2-1, -2), then the reasons.
            assert_eq!(&body[2..], &[0, 0x11, 0x11, 0x00], "UNSUBACK reasons");
        }
        let mut bob = s.connect(Via::Tcp, "bob").await;
        for topic in ["chat/c1", "chat/c2"] {
            bob.publish_json(topic, json!({"type": "message", "text": topic}))
                .await;
        }
        let next = next_delivery(&mut raw, level).await;
        assert_eq!(next.topic, b"chat/c2", "level {level}: chat/c1 still came");
    }
}

#[tokio::test]
async fn mqtt_3_10_4_6_several_filters_get_one_unsuback() {
    // MQTT 5: 3.10.4-6.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&unsubscribe_packet(
            level,
            9,
            &[b"chat/c1", b"chat/c2", b"chat/c3"],
        ))
        .await;
        raw.send(&[0xC0, 0]).await;
        let (kind, body) = raw.next().await.expect("UNSUBACK");
        assert_eq!((kind, &body[..2]), (0xB0, &[0, 9][..]));
        if level == 5 {
            assert_eq!(body.len(), 3 + 3, "a reason per filter");
        }
        assert_eq!(
            raw.next().await,
            Some((0xD0, Vec::new())),
            "a second UNSUBACK"
        );
    }
}

#[tokio::test]
async fn mqtt_3_10_4_3_a_message_in_flight_when_unsubscribing_is_still_delivered() {
    // MQTT 5: 3.10.4-3. Unacknowledged when the subscription goes; the session resumed,
    // it is sent again.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = RawConnect::v5("alice-kept", "alice", &s.token("alice"));
        (connect.level, connect.clean, connect.session_expiry) = (level, false, Some(600));
        let (mut raw, _) = RawMqtt::connect(s.mqtt, &connect).await;
        assert_eq!(raw.subscribe("chat/c1", level).await, 1);
        let mut bob = s.connect(Via::Tcp, "bob").await;
        let text = format!("in flight {level}");
        bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
            .await;
        let first = next_delivery(&mut raw, level).await;
        raw.send(&unsubscribe_packet(level, 2, &[b"chat/c1"])).await;
        let (kind, _) = raw.next().await.expect("UNSUBACK");
        assert_eq!(kind, 0xB0);
        raw.send(&[0xE0, 0]).await;
        assert!(raw.closed_silently().await);
        let (mut back, (present, _)) = RawMqtt::connect(s.mqtt, &connect).await;
        assert!(present);
        let again = next_delivery(&mut back, level).await;
        assert_eq!(
            (again.pkid, again.first & 0x08),
            (first.pkid, 0x08),
            "level {level}"
        );
        assert!(String::from_utf8_lossy(&again.payload).contains(&text));
        ack(&mut back, again.pkid.expect("QoS 1")).await;
        back.send(&[0xE0, 0]).await;
        assert!(back.closed_silently().await);
    }
}

#[tokio::test]
async fn mqtt_4_7_3_1_an_empty_filter_is_refused() {
    // A SUBSCRIBE with an empty filter gets a failure code (5: Topic Filter invalid); an
    // UNSUBSCRIBE with one closes the connection (nothing to answer it with in 3.1.1).
    let s = TestServer::with_c1().await;
    for (level, refusal) in [(4, 0x80), (5, 0x8F)] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(level, 1, &[(b"", 1), (b"chat/c1", 1)]))
            .await;
        assert_eq!(suback_codes(&mut raw, level).await, [refusal, 1]);
    }
}

#[tokio::test]
async fn mqtt_4_7_1_2_and_3_v4_misplaced_wildcards_are_refused() {
    // MQTT 5: 4.7.1-1 and -2 (0x8F). Operators may use wildcards: where they stand is checked.
    let s = TestServer::with_c1().await;
    let token = s.token_with("ops", callbus::auth::Role::Admin);
    for (level, refusal) in [(4, 0x80), (5, 0x8F)] {
        let mut connect = RawConnect::v5("ops-raw", "ops", &token);
        connect.level = level;
        let (mut ops, _) = RawMqtt::connect(s.mqtt, &connect).await;
        let filters: [(&[u8], u8); 5] = [
            (b"chat/#/x", 1),
            (b"chat#", 1),
            (b"chat/c+", 1),
            (b"chat/+", 1),
            (b"#", 1),
        ];
        ops.send(&subscribe_packet(level, 1, &filters)).await;
        let codes = suback_codes(&mut ops, level).await;
        assert_eq!(codes, [refusal, refusal, refusal, 1, 1], "level {level}");
    }
}
