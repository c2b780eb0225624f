//! UTF-8 strings and topics as the specifications define them (3.1.1 section 1.5.3, MQTT 5
//! section 1.5.4, both sections 4.7.3).

use super::common::TestServer;
use super::{chat, closed_for, publish, raw_session, subscribe_packet};

#[tokio::test]
async fn mqtt_1_5_3_1_ill_formed_utf8_in_a_topic_closes_the_connection() {
    // MQTT 5: 1.5.4-1 (a malformed packet, 0x81); also MQTT-3.3.2-1. 0xFF is never UTF-8,
    // ED A0 80 encodes a surrogate.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        for topic in [&b"chat/\xff"[..], b"chat/\xed\xa0\x80"] {
            let mut raw = raw_session(&s, level).await;
            let props = (level == 5).then_some(&[][..]);
            raw.send(&publish(0x32, topic, Some(1), props, &chat("bad")))
                .await;
            assert!(
                closed_for(&mut raw, level, 0x81).await,
                "level {level}, {topic:02x?}"
            );
        }
    }
}

#[tokio::test]
async fn mqtt_1_5_3_2_and_4_7_3_2_a_null_character_closes_the_connection() {
    // MQTT 5: 1.5.4-2, 4.7.3-2. In a topic name, a filter, a client id.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let mut raw = raw_session(&s, level).await;
        let props = (level == 5).then_some(&[][..]);
        raw.send(&publish(0x32, b"chat/c1\0", Some(1), props, &chat("null")))
            .await;
        assert!(
            closed_for(&mut raw, level, 0x81).await,
            "PUBLISH, level {level}"
        );
        let mut raw = raw_session(&s, level).await;
        raw.send(&subscribe_packet(level, 1, &[(b"chat/c1\0", 1)]))
            .await;
        assert!(
            closed_for(&mut raw, level, 0x81).await,
            "SUBSCRIBE, level {level}"
        );
        let mut connect = super::common::raw::RawConnect::v5("a\0b", "alice", &s.token("alice"));
        connect.level = level;
        let mut raw = super::common::raw::RawMqtt::open(s.mqtt).await;
        raw.send(&connect.encode()).await;
        let answer = raw.next().await;
        // Closed, at most after a refusing CONNACK.
        assert!(
            answer
                .as_ref()
                .is_none_or(|(kind, body)| *kind == 0x20 && body[1] != 0),
            "level {level}: {answer:02x?}"
        );
        assert!(raw.closed_silently().await);
    }
}

#[tokio::test]
async fn mqtt_1_5_3_3_and_4_7_3_4_topics_are_neither_stripped_nor_normalised() {
    // MQTT 5: 1.5.4-3, 4.7.3-4. A leading BOM, another case, a trailing level: other topics
    // (alice is in `chat/c1` only, so they are refused), the plain one is granted.
    let s = TestServer::with_c1().await;
    for (level, refusal) in [(4, 0x80), (5, 0x87)] {
        let mut raw = raw_session(&s, level).await;
        let filters: [(&[u8], u8); 4] = [
            ("\u{feff}chat/c1".as_bytes(), 1),
            (b"Chat/c1", 1),
            (b"chat/c1/", 1),
            (b"chat/c1", 1),
        ];
        raw.send(&subscribe_packet(level, 1, &filters)).await;
        let (kind, body) = raw.next().await.expect("SUBACK");
        let skip = if level == 5 { 3 } else { 2 };
        assert_eq!(
            (kind, &body[skip..]),
            (0x90, &[refusal, refusal, refusal, 1][..])
        );
    }
}
