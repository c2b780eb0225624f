//! CONNECT authentication, client-id namespacing, limits and bad input over real sockets.

mod common;

use bytes::BytesMut;
use common::{granted, raw_connect, raw_session, TestServer, Via, BOTH, WAIT};
use rumqttc::{ConnectReturnCode, ConnectionError};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn refused(result: Result<common::Client, ConnectionError>) -> Option<ConnectReturnCode> {
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => Some(code),
        Err(_) => None,
        Ok(_) => panic!("connection was accepted"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_not_authorized() {
    let s = TestServer::start().await;
    let forged = callbus::auth::Authenticator::new(b"another secret")
        .issue("alice", None, callbus::auth::Role::User, 60)
        .unwrap();
    let cases = [
        ("garbage", "alice", "not-a-jwt".to_owned()),
        ("expired", "alice", s.expired_token("alice")),
        ("wrong signature", "alice", forged),
        ("username is not sub", "bob", s.token("alice")),
        ("no password", "alice", String::new()),
    ];
    for via in BOTH {
        for (what, username, password) in &cases {
            let result = s.connect_as(via, "dev1", username, password).await;
            assert_eq!(
                refused(result),
                Some(ConnectReturnCode::NotAuthorized),
                "{via:?}: {what}"
            );
        }
        // The good token works, with the username empty or equal to sub.
        assert!(s
            .connect_as(via, "dev1", "", &s.token("alice"))
            .await
            .is_ok());
        assert!(s
            .connect_as(via, "dev2", "alice", &s.token("alice"))
            .await
            .is_ok());
    }
}

#[tokio::test]
async fn bad_client_ids_are_refused() {
    let s = TestServer::start().await;
    for id in ["a/b", "a.b", "a+b", "$x", &"x".repeat(65)] {
        let result = s.connect_as(Via::Tcp, id, "", &s.token("alice")).await;
        assert_eq!(
            refused(result),
            Some(ConnectReturnCode::BadClientId),
            "{id}"
        );
    }
}

#[tokio::test]
async fn another_user_reusing_a_client_id_takes_nothing_over() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    for via in BOTH {
        let mut alice = s
            .connect_as(via, "phone", "", &s.token("alice"))
            .await
            .expect("alice");
        assert!(granted(&alice.subscribe(&["chat/c1"]).await[0]));
        // Bob connects with alice's client id; alice keeps her session and her subscription.
        let mut bob = s
            .connect_as(via, "phone", "", &s.token("bob"))
            .await
            .expect("bob");
        bob.publish_json(
            "chat/c1",
            json!({"type": "message", "text": "still there?"}),
        )
        .await;
        let got = alice.recv().await;
        assert_eq!(got.json()["text"], "still there?", "{via:?}");

        // The same user reusing its own client id replaces the older session, as MQTT says.
        let _alice2 = s
            .connect_as(via, "phone", "", &s.token("alice"))
            .await
            .expect("alice again");
        assert!(
            alice.closed().await,
            "{via:?}: older session of the same id kept"
        );
    }
}

/// Reads until the server closes; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server did not close the connection"),
        }
    }
}

/// A round trip between two fresh clients proves the service is still up for everyone.
async fn still_serving(s: &TestServer) {
    let mut bob = s.connect(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
    let mut alice = s.connect(Via::Tcp, "alice").await;
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": "alive"}))
        .await;
    assert_eq!(bob.recv().await.json()["text"], "alive");
}

#[tokio::test]
async fn refusals_answer_in_the_clients_protocol() {
    let s = TestServer::start().await;
    // MQTT 3.1 (and any level but 4 and 5): CONNACK return code 1 (unacceptable protocol
    // version). A bad token: 3.1.1 return code 5 (not authorized); MQTT 5 reason 0x86 (bad
    // user name or password) with no properties. Then the socket closes.
    let good = s.token("alice");
    let answers: [(u8, &str, &[u8]); 4] = [
        (3, &good, &[0x20, 2, 0, 1]),
        (6, &good, &[0x20, 2, 0, 1]),
        (4, "nope", &[0x20, 2, 0, 5]),
        (5, "nope", &[0x20, 3, 0, 0x86, 0]),
    ];
    for (level, password, answer) in answers {
        let mut stream = TcpStream::connect(s.mqtt).await.unwrap();
        stream
            .write_all(&raw_connect(level, 30, password))
            .await
            .unwrap();
        assert_eq!(read_to_close(&mut stream).await, answer, "level {level}");
    }
}

#[tokio::test]
async fn a_refusal_waits_for_the_whole_connect() {
    let s = TestServer::start().await;
    let connect = raw_connect(5, 30, "not-a-token");
    let mut stream = TcpStream::connect(s.mqtt).await.unwrap();
    // The fixed header and protocol level first, as a client writing field by field does.
    stream.write_all(&connect[..10]).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "answered before the CONNECT was whole: {early:?}"
    );
    // The rest still goes through, and the refusal follows it.
    stream.write_all(&connect[10..]).await.unwrap();
    assert_eq!(read_to_close(&mut stream).await, [0x20, 3, 0, 0x86, 0]);
}

#[tokio::test]
async fn garbage_malformed_and_oversized_input_close_only_that_connection() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    // A bystander connected throughout must keep working.
    let mut carol = s.connect(Via::Ws, "carol").await;
    assert!(granted(
        &carol.subscribe(&["users/carol/notifications"]).await[0]
    ));

    // Garbage instead of CONNECT.
    let mut stream = TcpStream::connect(s.mqtt).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut stream).await.is_empty());

    // A malformed PUBLISH after a good CONNECT: topic length beyond the packet.
    let mut stream = raw_session(&s, 30, "alice").await;
    stream
        .write_all(&[0x30, 0x03, 0xff, 0xff, b'x'])
        .await
        .unwrap();
    assert!(read_to_close(&mut stream).await.is_empty());

    // A packet over the size limit (declared length alone is enough to refuse it).
    let mut stream = raw_session(&s, 30, "alice").await;
    stream
        .write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f])
        .await
        .unwrap();
    assert!(read_to_close(&mut stream).await.is_empty());

    // An oversized publish from a real client over WebSocket.
    let mut big = s.connect(Via::Ws, "alice").await;
    let payload = json!({"type": "message", "text": "x".repeat(200 * 1024)}).to_string();
    big.client
        .publish("chat/c1", rumqttc::QoS::AtMostOnce, false, payload)
        .await
        .unwrap();
    assert!(big.closed().await, "oversized publish was accepted");

    still_serving(&s).await;
    // The bystander's connection survived all of it.
    carol.publish("users/bob/notifications", "{}").await;
    assert_eq!(carol.recv().await.json()["code"], "forbidden");
}

#[tokio::test]
async fn sdp_sized_messages_pass_over_both_transports() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    for via in BOTH {
        let mut bob = s.connect(via, "bob").await;
        assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
        let mut alice = s.connect(via, "alice").await;
        let text = "a=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host\r\n".repeat(1100);
        assert!(text.len() > 60 * 1024);
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": text}))
            .await;
        assert_eq!(bob.recv().await.json()["text"], text, "{via:?}");
    }
}

/// A raw MQTT 3.1.1 client of alice's that sent its CONNECT with a 1 s keepalive.
async fn connected_with_keepalive_1s(s: &TestServer) -> TcpStream {
    let mut stream = TcpStream::connect(s.mqtt).await.unwrap();
    stream
        .write_all(&raw_connect(4, 1, &s.token("alice")))
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn silent_clients_are_dropped_after_one_and_a_half_keepalives() {
    let s = TestServer::start().await;
    let mut stream = connected_with_keepalive_1s(&s).await;
    let started = std::time::Instant::now();
    let got = read_to_close(&mut stream).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x00], "only a CONNACK, then close");
    let waited = started.elapsed();
    assert!(waited.as_millis() >= 1400, "closed after {waited:?}");
}

#[tokio::test]
async fn a_client_heard_within_its_keepalive_stays_connected() {
    let s = TestServer::start().await;
    let mut stream = connected_with_keepalive_1s(&s).await;
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    // Pinging every 0.6 s for 3 s (twice the 1.5 s limit): every ping answered.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut pong = [0u8; 2];
        tokio::time::timeout(WAIT, stream.read_exact(&mut pong))
            .await
            .expect("PINGRESP in time")
            .expect("still connected");
        assert_eq!(pong, [0xD0, 0x00]);
    }
    // Silent from here: dropped one and a half keepalives after the last ping.
    let last = std::time::Instant::now();
    assert!(read_to_close(&mut stream).await.is_empty());
    let waited = last.elapsed();
    assert!(waited.as_millis() >= 1400, "closed after {waited:?}");
}

#[tokio::test]
async fn no_connect_in_time_is_dropped() {
    let config = format!(
        "{}\n",
        callbus::config::DEFAULT_CONFIG
            .replace("connect_timeout_ms = 5000", "connect_timeout_ms = 300")
    );
    let s = TestServer::start_with(&config).await;
    let mut stream = TcpStream::connect(s.mqtt).await.unwrap();
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn connection_limit_answers_server_unavailable() {
    let config =
        callbus::config::DEFAULT_CONFIG.replace("max_connections = 20000", "max_connections = 2");
    let s = TestServer::start_with(&config).await;
    let _a = s.connect(Via::Tcp, "a").await;
    let _b = s.connect(Via::Ws, "b").await;
    let third = s.connect_as(Via::Tcp, "c-dev", "", &s.token("c")).await;
    assert_eq!(refused(third), Some(ConnectReturnCode::ServiceUnavailable));
    drop(_a);
    // Once a slot frees up, connections are accepted again (bounded retries: the server
    // notices the closed socket asynchronously).
    let mut accepted = false;
    for _ in 0..50 {
        if s.connect_as(Via::Tcp, "c-dev", "", &s.token("c"))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(accepted);
}

#[test]
fn raw_connect_encoding_matches_the_codec() {
    // The hand-made CONNECT used above parses as MQTT 3.1.1 with rumqttc's codec.
    let mut buf = BytesMut::from(&raw_connect(4, 30, "pw")[..]);
    match rumqttc::mqttbytes::v4::Packet::read(&mut buf, 1024) {
        Ok(rumqttc::mqttbytes::v4::Packet::Connect(c)) => {
            assert_eq!(c.client_id, "raw1");
            assert_eq!(c.keep_alive, 30);
        }
        other => panic!("{other:?}"),
    }
}

/// Opens a WebSocket handshake offering `protocols`; returns the response head.
async fn ws_handshake(s: &TestServer, protocols: &str) -> String {
    common::raw::ws_open(s.http, protocols).await.1
}

#[tokio::test]
async fn websocket_answers_the_subprotocol_the_client_offered() {
    let s = TestServer::start().await;
    for (offered, answered) in [
        ("mqtt", "mqtt"),
        ("mqttv3.1", "mqttv3.1"),
        ("mqttv3.1, mqtt", "mqtt"),
    ] {
        let head = ws_handshake(&s, offered).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains(&format!("sec-websocket-protocol: {answered}\r\n")),
            "offered {offered}: {head}"
        );
    }
}
