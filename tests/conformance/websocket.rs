//! MQTT over WebSocket (section 6 of both specifications).

use super::common::raw::{packet, ws_frame, ws_open, ws_read_frame, RawConnect, BINARY};
use super::common::TestServer;
use super::subscribe_packet;

#[tokio::test]
async fn mqtt_6_0_0_2_packets_need_not_align_with_frames() {
    // Also MQTT-6.0.0-4 (the protocol chosen is `mqtt`). A CONNECT in two frames, then a
    // SUBSCRIBE and a PINGREQ in one: a CONNACK, a SUBACK and a PINGRESP come back.
    let s = TestServer::with_c1().await;
    for level in [4, 5] {
        let (mut ws, head) = ws_open(s.http, "mqtt").await;
        assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
        let mut connect = RawConnect::v5("alice-ws", "alice", &s.token("alice"));
        connect.level = level;
        let bytes = connect.encode();
        let (a, b) = bytes.split_at(7);
        let mut two = subscribe_packet(level, 1, &[(b"chat/c1", 1)]);
        two.extend_from_slice(&[0xC0, 0]);
        let frames = [
            ws_frame(BINARY, a),
            ws_frame(BINARY, b),
            ws_frame(BINARY, &two),
        ];
        use tokio::io::AsyncWriteExt;
        ws.write_all(&frames.concat()).await.expect("write");
        let mut got = Vec::new();
        let expected = [0x20, 0x90, 0xD0];
        while got.iter().filter(|b: &&u8| expected.contains(b)).count() < 3 {
            let read = tokio::time::timeout(super::common::WAIT, ws_read_frame(&mut ws)).await;
            let (opcode, payload) = read.expect("in time").expect("a frame");
            assert_eq!(opcode, BINARY);
            let mut at = 0;
            while at < payload.len() {
                got.push(payload[at]);
                let (len, used) = super::read_varint(&payload[at + 1..]);
                at += 1 + used + len;
            }
        }
        assert_eq!(got, expected, "level {level}");
    }
}

#[tokio::test]
async fn mqtt_6_0_0_1_a_text_frame_closes_the_connection() {
    let s = TestServer::with_c1().await;
    let (mut ws, _) = ws_open(s.http, "mqtt").await;
    let connect = RawConnect::v4("alice-ws", "alice", &s.token("alice")).encode();
    use tokio::io::AsyncWriteExt;
    ws.write_all(&ws_frame(BINARY, &connect))
        .await
        .expect("write");
    let (_, connack) = ws_read_frame(&mut ws).await.expect("CONNACK");
    assert_eq!(connack[0], 0x20);
    ws.write_all(&ws_frame(0x1, &packet(0xC0, &[])))
        .await
        .expect("write");
    // A close frame at most, then the end.
    loop {
        let read = tokio::time::timeout(super::common::WAIT, ws_read_frame(&mut ws)).await;
        match read.expect("closed in time") {
            Err(_) => break,
            Ok((0x8, _)) => continue,
            Ok((opcode, payload)) => panic!("answered a text frame: {opcode} {payload:02x?}"),
        }
    }
}
