//! PUBLISH and its acknowledgement, QoS 0 and 1 delivery, ordering (sections 2.3 / 2.2.1,
//! 3.3, 3.4, 4.3 to 4.6 of both specifications).

use super::common::raw::RawMqtt;
use super::common::{granted, TestServer, Via};
use super::{
    ack, chat, chat_publish, closed_for, next_delivery, publish, raw_session, with_listener,
};
use serde_json::json;

/// A session of `user` at `level` subscribed to `chat/c1` at `qos`.
async fn subscriber(s: &TestServer, user: &str, level: u8, qos: u8) -> RawMqtt {
    let mut connect =
        super::common::raw::RawConnect::v5(&format!("{user}-sub"), user, &s.token(user));
    connect.level = level;
    let (mut raw, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
    assert_eq!(code, 0);
    assert_eq!(raw.subscribe_with("chat/c1", level, qos).await, qos);
    raw
}

/// Bob says `text` on `chat/c1` at QoS 1.
async fn bob_says(s: &TestServer, text: &str) {
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
        .await;
}

#[tokio::test]
async fn mqtt_2_3_1_4_and_4_3_2_1_to_3_the_servers_qos_1_publishes_have_unused_ids_and_dup_0() {
    // MQTT 5: 2.2.1-4 and 4.3.2-1 to -3. Three messages unacknowledged: three ids, none 0.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut carol = subscriber(&s, "carol", level, 1).await;
        let mut ids = Vec::new();
        for n in 0..3 {
            bob_says(&s, &format!("m{n}")).await;
            let got = next_delivery(&mut carol, level).await;
            assert_eq!(got.first, 0x32, "QoS 1, DUP 0, RETAIN 0");
            ids.push(got.pkid.expect("a packet id"));
        }
        assert!(ids.iter().all(|id| *id != 0), "{ids:?}");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 3, "an id was reused while unacknowledged");
    }
}

#[tokio::test]
async fn mqtt_2_3_1_5_and_3_3_4_1_and_4_3_2_4_a_puback_carries_the_publishs_id() {
    // MQTT 5: 2.2.1-5, 3.3.4-1, 4.3.2-4.
    let (s, mut listening) = with_listener().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&chat_publish(
            level,
            0x1234,
            &format!("acknowledged {level}"),
        ))
        .await;
        let (kind, body) = raw.next().await.expect("PUBACK");
        assert_eq!(
            (kind, &body[..2]),
            (0x40, &[0x12, 0x34][..]),
            "level {level}"
        );
        if level == 5 && body.len() > 2 {
            assert_eq!(body[2], 0, "reason");
        }
        let got = listening.recv().await.json();
        assert_eq!(got["text"], format!("acknowledged {level}"));
    }
}

#[tokio::test]
async fn mqtt_2_3_1_7_and_3_3_1_2_and_3_8_4_6_a_qos_0_delivery_has_no_packet_id_and_dup_0() {
    // MQTT 5: 2.2.1-2, 3.3.1-2, 3.8.4-8 (delivered at the lower of the two QoS), 4.3.1-1.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut carol = subscriber(&s, "carol", level, 0).await;
        bob_says(&s, "at qos 0").await;
        let got = next_delivery(&mut carol, level).await;
        assert_eq!((got.first, got.pkid), (0x30, None), "level {level}");
        assert_eq!(got.topic, b"chat/c1");
        assert!(
            got.payload.starts_with(b"{"),
            "the payload follows the topic"
        );
    }
}

#[tokio::test]
async fn mqtt_3_3_1_3_the_dup_flag_out_is_not_the_dup_flag_in() {
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut carol = subscriber(&s, "carol", level, 1).await;
        let mut bob = raw_session(&s, level).await;
        let props = (level == 5).then_some(&[][..]);
        let text = format!("sent with DUP {level}");
        bob.send(&publish(0x3A, b"chat/c1", Some(9), props, &chat(&text)))
            .await;
        let got = next_delivery(&mut carol, level).await;
        assert!(String::from_utf8_lossy(&got.payload).contains(&text));
        assert_eq!(got.first & 0x08, 0, "a first delivery carried DUP");
    }
}

#[tokio::test]
async fn mqtt_3_3_2_2_and_4_7_0_1_a_topic_name_with_a_wildcard_is_closed() {
    // 3.1.1: MQTT-4.7.1-1; MQTT 5: Topic Name invalid (0x90).
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for topic in [&b"chat/+"[..], b"chat/#", b"#"] {
            let mut raw = raw_session(&s, level).await;
            let props = (level == 5).then_some(&[][..]);
            raw.send(&publish(0x32, topic, Some(1), props, &chat("wild")))
                .await;
            let closed = closed_for(&mut raw, level, 0x90).await;
            assert!(closed, "level {level}, {}", String::from_utf8_lossy(topic));
        }
    }
}

#[tokio::test]
async fn mqtt_4_7_3_1_an_empty_topic_name_is_closed() {
    // MQTT 5: an empty Topic Name with no Topic Alias is a protocol error (section 3.3.2.1).
    let s = TestServer::with_c1().await;
    for (level, reason) in [(4, 0), (5, 0x82)] {
        let mut raw = raw_session(&s, level).await;
        let props = (level == 5).then_some(&[][..]);
        raw.send(&publish(0x32, b"", Some(1), props, &chat("nowhere")))
            .await;
        assert!(closed_for(&mut raw, level, reason).await, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_3_3_5_2_an_unauthorised_publish_is_acknowledged_and_goes_nowhere() {
    // alice is not in `c2`; 3.1.1 gets a PUBACK (and callbus's `error` event), MQTT 5 PUBACK
    // 0x87. bob, in `c2`, gets nothing of it.
    let s = TestServer::with_c1().await;
    s.set_members("c2", &["bob", "carol"]).await;
    let mut bob = s.listener(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&["chat/c2"]).await[0]));
    for level in [4, 5] {
        let mut alice = raw_session(&s, level).await;
        let props = (level == 5).then_some(&[][..]);
        alice
            .send(&publish(
                0x32,
                b"chat/c2",
                Some(7),
                props,
                &chat("not mine"),
            ))
            .await;
        let ack = loop {
            let (kind, body) = alice.next().await.expect("PUBACK");
            if kind == 0x40 {
                break body;
            }
        };
        assert_eq!(&ack[..2], &[0, 7]);
        if level == 5 {
            assert_eq!(ack[2], 0x87);
        }
    }
    let mut carol = s.connect(Via::Tcp, "carol").await;
    carol
        .publish_json("chat/c2", json!({"type": "message", "text": "marker"}))
        .await;
    assert_eq!(bob.recv().await.json()["text"], "marker");
}

#[tokio::test]
async fn mqtt_4_3_2_2_v4_after_its_puback_a_packet_id_is_a_new_message() {
    // MQTT 5: 4.3.2-5, whatever the DUP flag says.
    let (s, mut listening) = with_listener().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        let props = (level == 5).then_some(&[][..]);
        for (first, text) in [(0x32, "first"), (0x3A, "second")] {
            let text = format!("{text} {level}");
            raw.send(&publish(first, b"chat/c1", Some(5), props, &chat(&text)))
                .await;
            let (kind, body) = raw.next().await.expect("PUBACK");
            assert_eq!((kind, &body[..2]), (0x40, &[0, 5][..]));
            assert_eq!(listening.recv().await.json()["text"], text);
        }
    }
}

#[tokio::test]
async fn mqtt_4_6_0_5_and_6_messages_on_a_topic_arrive_in_the_order_sent() {
    // 3.1.1: the topic is ordered; MQTT 5: MQTT-4.6.0-5 and -6. Pipelined, unacknowledged.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut carol = subscriber(&s, "carol", level, 1).await;
        let mut bob = raw_session(&s, level).await;
        let burst: Vec<u8> = (1..=30)
            .flat_map(|n| chat_publish(level, n, &format!("n{n}")))
            .collect();
        bob.send(&burst).await;
        for n in 1..=30 {
            let got = next_delivery(&mut carol, level).await;
            let text = String::from_utf8_lossy(&got.payload).into_owned();
            assert!(
                text.contains(&format!("\"n{n}\"")),
                "expected n{n}, got {text}"
            );
            ack(&mut carol, got.pkid.expect("QoS 1")).await;
        }
    }
}

#[tokio::test]
async fn mqtt_3_3_5_1_overlapping_subscriptions_deliver_at_the_highest_qos() {
    // MQTT 5: 3.3.4-2. An operator (wildcards allowed) holds `chat/#` at QoS 0 and `chat/c1`
    // at QoS 1: at least one copy comes at QoS 1.
    let s = TestServer::with_c1().await;
    let token = s.token_with("ops", callbus::auth::Role::Admin);
    for level in [4, 5] {
        let mut connect = super::common::raw::RawConnect::v5("ops-raw", "ops", &token);
        connect.level = level;
        let (mut ops, (_, code)) = RawMqtt::connect(s.mqtt, &connect).await;
        assert_eq!(code, 0);
        let both = super::subscribe_packet(level, 3, &[(b"chat/#", 0), (b"chat/c1", 1)]);
        ops.send(&both).await;
        let (kind, body) = ops.next().await.expect("SUBACK");
        assert_eq!((kind, &body[body.len() - 2..]), (0x90, &[0, 1][..]));
        bob_says(&s, "overlapping").await;
        let first = next_delivery(&mut ops, level).await;
        let qos_1 = if first.first & 0x06 == 0x02 {
            true
        } else {
            // A second copy, at the other subscription's QoS.
            next_delivery(&mut ops, level).await.first & 0x06 == 0x02
        };
        assert!(qos_1, "level {level}: no copy at QoS 1");
        drop(ops);
    }
}

#[tokio::test]
async fn mqtt_3_6_1_1_a_pubrel_with_wrong_flags_is_closed() {
    // callbus offers no QoS 2, but a PUBREL's flags are checked all the same.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        raw.send(&[0x60, 2, 0, 1]).await;
        assert!(closed_for(&mut raw, level, 0x81).await, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_1_5_5_1_remaining_lengths_take_the_fewest_bytes() {
    // MQTT 5's statement; 3.1.1 section 2.2.3 says the same. Deliveries of 100 to 20,000
    // bytes: one, two and three length bytes.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut carol = subscriber(&s, "carol", level, 0).await;
        for size in [100, 1_000, 20_000] {
            bob_says(&s, &"x".repeat(size)).await;
            let whole = carol.next_whole().await.expect("a PUBLISH");
            let (len, used) = super::read_varint(&whole[1..]);
            assert_eq!(1 + used + len, whole.len());
            let fewest = match len {
                0..=127 => 1,
                128..=16_383 => 2,
                16_384..=2_097_151 => 3,
                _ => 4,
            };
            assert_eq!(used, fewest, "level {level}, remaining length {len}");
        }
    }
}
