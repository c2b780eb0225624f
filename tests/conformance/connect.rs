//! CONNECT, CONNACK and DISCONNECT (sections 3.1, 3.2 and 3.14 of both specifications).

use super::common::raw::{RawConnect, RawMqtt};
use super::common::TestServer;
use super::{
    carol_with_will, closed_for, ending, next_is_marker, replaced, v5_connack, with_listener, WILL,
};

/// Alice's CONNECT at `level`, as `alice-raw`.
fn alice(s: &TestServer, level: u8) -> RawConnect {
    let mut connect = RawConnect::v5("alice-raw", "alice", &s.token("alice"));
    connect.level = level;
    connect
}

/// Sends `bytes` as the first packet; whether the server closed with nothing sent back.
async fn closed_without_connack(s: &TestServer, bytes: &[u8]) -> bool {
    let mut raw = RawMqtt::open(s.mqtt).await;
    raw.send(bytes).await;
    raw.closed_silently().await
}

#[tokio::test]
async fn mqtt_3_1_2_1_a_protocol_name_other_than_mqtt_is_closed() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let connect = alice(&s, level).encode();
        let wrong = replaced(&connect, b"\x00\x04MQTT", b"\x00\x04MQTX");
        assert!(closed_without_connack(&s, &wrong).await, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_1_2_9_a_will_flag_without_its_fields_is_closed() {
    // With the Will Flag, the user name and token are read as the Will: the packet ends early.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = alice(&s, level);
        connect.flags = Some(0xC6);
        assert!(
            closed_without_connack(&s, &connect.encode()).await,
            "level {level}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_1_2_11_13_15_will_qos_or_retain_without_a_will_is_closed() {
    // 3.1.1: MQTT-3.1.2-13 (Will QoS) and -15 (Will Retain); MQTT 5: -11 and -13.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for flags in [0xC2 | 0x08, 0xC2 | 0x10, 0xC2 | 0x20] {
            let mut connect = alice(&s, level);
            connect.flags = Some(flags);
            let closed = closed_without_connack(&s, &connect.encode()).await;
            assert!(closed, "level {level}, flags {flags:#04x}");
        }
    }
}

#[tokio::test]
async fn mqtt_3_1_2_14_v4_and_3_1_2_12_v5_will_qos_3_is_closed() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = alice(&s, level);
        connect.will = Some(("chat/c1".into(), WILL.as_bytes().to_vec()));
        connect.flags = Some(0xC2 | 0x04 | 0x18);
        assert!(
            closed_without_connack(&s, &connect.encode()).await,
            "level {level}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_1_2_12_v4_without_a_will_flag_no_will_is_published() {
    let (s, mut alice_listening) = with_listener().await;
    let connect = RawConnect::v4("carol-dev", "carol", &s.token("carol"));
    let (carol, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    drop(carol);
    next_is_marker(&s, &mut alice_listening, "no will").await;
}

#[tokio::test]
async fn mqtt_3_1_2_19_and_21_v4_a_user_name_or_password_flag_needs_its_field() {
    // MQTT 5: -17 and -19.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for (username, password) in [(false, true), (true, false)] {
            let mut connect = alice(&s, level);
            connect.flags = Some(0xC2); // both flags, one field left out
            if !username {
                connect.username = None;
            }
            if !password {
                connect.password = None;
            }
            let closed = closed_without_connack(&s, &connect.encode()).await;
            assert!(
                closed,
                "level {level}, user name {username}, password {password}"
            );
        }
    }
}

#[tokio::test]
async fn mqtt_3_1_2_18_and_20_v4_a_field_without_its_flag_is_closed() {
    // MQTT 5: -16 and -18. The fields are there, the flags say none: the packet is longer
    // than what it declares.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = alice(&s, level);
        connect.flags = Some(0x02);
        assert!(
            closed_without_connack(&s, &connect.encode()).await,
            "level {level}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_1_3_4_10_11_connect_strings_must_be_utf8() {
    // 3.1.1: client id (-4), Will Topic (-10), user name (-11); MQTT 5: -4, -11, -12.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut connect = alice(&s, level);
        connect.client_id = "id-XX".into();
        connect.will = Some(("chat/c1-YY".into(), WILL.as_bytes().to_vec()));
        connect.username = Some("alice-ZZ".into());
        let bytes = connect.encode();
        for (from, to) in [
            (b"XX", b"\xff\xfe"),
            (b"YY", b"\xc3\x28"),
            (b"ZZ", b"\xed\xa0"),
        ] {
            let bad = replaced(&bytes, from, to);
            assert!(
                closed_without_connack(&s, &bad).await,
                "level {level}, {from:?}"
            );
        }
    }
}

#[tokio::test]
async fn mqtt_3_1_3_5_one_to_23_alphanumerics_are_a_valid_client_id() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for id in [
            "0",
            "0123456789abcdefghijklm",
            "nopqrstuvwxyzABCDEFGHIJ",
            "KLMNOPQRSTUVWXYZ",
        ] {
            let mut connect = alice(&s, level);
            connect.client_id = id.into();
            let (_, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
            assert_eq!(code, 0, "level {level}, {id}");
        }
    }
}

#[tokio::test]
async fn mqtt_3_1_3_9_v4_and_3_1_3_8_v5_a_refused_client_id_is_answered_and_closed() {
    // A client id with a topic separator: CONNACK 0x02 (5: 0x85), session present 0
    // (MQTT-3.2.2-4; 5: -6), then closed (MQTT-3.2.2-5; 5: -7).
    let s = TestServer::with_c1().await;
    for (level, refusal) in [(4, 0x02), (5, 0x85)] {
        let mut connect = alice(&s, level);
        connect.client_id = "a/b".into();
        let (mut raw, (present, code)) = RawMqtt::connect(s.mqtt, &connect).await;
        assert_eq!((present, code), (false, refusal), "level {level}");
        assert!(raw.closed_silently().await, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_1_4_1_and_3_2_2_6_v4_a_malformed_connect_is_closed_without_connack() {
    // MQTT 5: 3.1.4-1, and MQTT-3.14.0-1 (no DISCONNECT before a CONNACK). The client id's
    // length says more than the packet holds.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let connect = alice(&s, level).encode();
        let bad = replaced(&connect, b"\x00\x09alice-raw", b"\x00\xffalice-raw");
        assert!(closed_without_connack(&s, &bad).await, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_1_4_5_v4_and_3_1_4_6_v5_after_a_refused_connect_nothing_is_processed() {
    // Also MQTT-3.2.2-4 and -5 (5: -6 and -7): session present 0, then closed.
    let (s, mut listening) = with_listener().await;
    for (level, refusal) in [(4, 0x05), (5, 0x86)] {
        let mut connect = RawConnect::v5("bob-raw", "bob", "not a token");
        connect.level = level;
        let mut bytes = connect.encode();
        bytes.extend_from_slice(&super::chat_publish(level, 1, "from a refused connection"));
        let mut raw = RawMqtt::open(s.mqtt).await;
        raw.send(&bytes).await;
        let (first, body) = raw.next().await.expect("CONNACK");
        assert_eq!(
            (first, body[0], body[1]),
            (0x20, 0, refusal),
            "level {level}"
        );
        assert!(raw.closed_silently().await, "level {level}");
    }
    next_is_marker(&s, &mut listening, "nothing from the refused").await;
}

#[tokio::test]
async fn mqtt_3_2_2_1_v5_connack_flags_other_than_session_present_are_0() {
    // 3.1.1 has no statement id for it (section 3.2.2.1: bits 7-1 reserved).
    let s = TestServer::with_c1().await;
    for (level, clean) in [(4, true), (4, false), (5, true), (5, false)] {
        let mut connect = alice(&s, level);
        (connect.clean, connect.session_expiry) = (clean, (!clean).then_some(60));
        let mut raw = RawMqtt::open(s.mqtt).await;
        raw.send(&connect.encode()).await;
        let (first, body) = raw.next().await.expect("CONNACK");
        assert_eq!(
            (first, body[0] & 0xFE, body[1]),
            (0x20, 0, 0),
            "level {level}"
        );
    }
}

#[tokio::test]
async fn mqtt_3_14_4_3_v4_a_disconnect_discards_the_will() {
    // Also MQTT-3.1.2-10 (MQTT 5: in the main module's tests), and MQTT-3.14.4-2 (5: -1):
    // nothing after a DISCONNECT is taken, here a PUBLISH in the same write.
    let (s, mut listening) = with_listener().await;
    for level in [4, 5] {
        let mut carol = carol_with_will(&s, level).await;
        let mut bytes = vec![0xE0, 0x00];
        bytes.extend_from_slice(&super::chat_publish(level, 1, "after DISCONNECT"));
        carol.send(&bytes).await;
        assert!(carol.closed_silently().await);
        next_is_marker(&s, &mut listening, "after a normal disconnect").await;
    }
}

#[tokio::test]
async fn mqtt_3_14_1_1_a_disconnect_with_reserved_bits_set_is_an_error_and_the_will_goes_out() {
    let (s, mut listening) = with_listener().await;
    for level in [4, 5] {
        let mut carol = carol_with_will(&s, level).await;
        carol.send(&[0xE1, 0x00]).await;
        assert!(closed_for(&mut carol, level, 0x81).await, "level {level}");
        assert_eq!(listening.recv().await.json()["text"], "carol is gone");
    }
}

#[tokio::test]
async fn mqtt_3_14_2_2_v5_the_servers_disconnect_carries_no_session_expiry() {
    // Also MQTT-3.14.2-1: its reason is one of DISCONNECT's (0x8E, taken over); and
    // MQTT-3.14.4-1, -2: nothing comes after it, the connection is closed.
    let s = TestServer::with_c1().await;
    let mut connect = alice(&s, 5);
    connect.session_expiry = Some(600);
    let (mut first, _) = RawMqtt::connect(s.mqtt, &connect).await;
    let (_second, _) = RawMqtt::connect(s.mqtt, &connect).await;
    let (kind, body) = first.next().await.expect("DISCONNECT");
    assert_eq!((kind, body[0]), (0xE0, 0x8E));
    let props = if body.len() > 1 {
        let (len, used) = super::read_varint(&body[1..]);
        super::properties(&body[1 + used..1 + used + len])
    } else {
        Vec::new()
    };
    // No Session Expiry Interval, nor a Reason String or User Property (MQTT-3.14.2-3, -4).
    assert!(props.is_empty(), "{props:02x?}");
    assert_eq!(ending(&mut first).await, None);
}

#[tokio::test]
async fn mqtt_3_1_3_7_and_3_2_2_16_v5_empty_client_ids_are_assigned_unique_ones() {
    let s = TestServer::with_c1().await;
    let mut assigned = Vec::new();
    for _ in 0..2 {
        let connect = RawConnect::v5("", "alice", &s.token("alice"));
        let (raw, _, code, props) = v5_connack(&s, &connect).await;
        assert_eq!(code, 0);
        let id = props
            .iter()
            .find(|(id, _)| *id == 0x12)
            .expect("Assigned Client Identifier");
        assigned.push((raw, id.1.clone()));
    }
    assert_ne!(assigned[0].1, assigned[1].1);
}
