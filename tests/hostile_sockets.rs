//! Hostile clients at the socket level, against the real binary (so its memory, descriptors and
//! CPU are the server's alone): a WebSocket ping flood from a client that never reads, slow
//! HTTP requests, sockets that never CONNECT, and half-sent CONNECTs. Each flood is bounded,
//! asserts the bound the server keeps, and ends with a normal pair of users still exchanging a
//! message.

mod common;

use callbus::auth::Role;
use common::process::{mqtt, next, spawn_configured, token, Proc};
use common::raw::{open_files, rss_kib, ws_frame, ws_open, ws_read_frame, BINARY, PING};
use common::{raw_connect, WAIT};
use rumqttc::{Packet, QoS};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Alice and bob, on fresh connections, exchange a chat message through the server.
async fn pair_still_talks(proc: &Proc) {
    proc.set_members("c1", &["alice", "bob"]).await;
    let (alice, mut alice_events) = mqtt(proc, "alice").await.expect("alice connects");
    alice.subscribe("chat/c1", QoS::AtLeastOnce).await.unwrap();
    next(&mut alice_events, |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    let (bob, mut bob_events) = mqtt(proc, "bob").await.expect("bob connects");
    tokio::spawn(async move { while bob_events.poll().await.is_ok() {} });
    let message = r#"{"type":"message","text":"still here"}"#;
    bob.publish("chat/c1", QoS::AtLeastOnce, false, message)
        .await
        .unwrap();
    let got = next(&mut alice_events, |p| match p {
        Packet::Publish(p) => Some(p.payload),
        _ => None,
    })
    .await;
    assert!(String::from_utf8_lossy(&got).contains("still here"));
}

/// Whether the server closed `stream` within `within` (EOF or an error on read).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ping_flood_is_cut_off_with_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let proc = spawn_configured(&[], dir.path(), &[]).await;
    let pid = proc.child.id();
    let http = format!("127.0.0.1:{}", proc.http).parse().unwrap();
    let (mut ws, head) = ws_open(http, "mqtt").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let connect = raw_connect(4, 60, &token("mallory", Role::User));
    ws.write_all(&ws_frame(BINARY, &connect)).await.unwrap();
    let (opcode, connack) = timeout(WAIT, ws_read_frame(&mut ws))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!((opcode, connack), (BINARY, vec![0x20, 2, 0, 0]));
    // 125-byte pings as fast as the socket takes them, never reading a pong, for up to 8 s.
    let batch = ws_frame(PING, &[0x55; 125]).repeat(512);
    let before = rss_kib(pid);
    let (mut peak, mut sent, mut cut_off) = (before, 0usize, false);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, ws.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            // The server stopped reading without closing: not what is asserted below.
            Err(_) => break,
        }
        peak = peak.max(rss_kib(pid));
    }
    assert!(cut_off, "still connected after {sent} bytes of pings");
    let grown = peak.saturating_sub(before);
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB during the flood");
    assert!(proc.metric("callbus_ws_control_flood_total").await >= 1);
    pair_still_talks(&proc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_requests_are_timed_out_and_lock_no_one_out() {
    let dir = tempfile::tempdir().unwrap();
    // 400 descriptors: HTTP may hold a quarter of them, so 380 half-sent requests cannot.
    let wrapper = ["prlimit", "--nofile=400:400", "--"];
    let proc = spawn_configured(&wrapper, dir.path(), &[("http.header_timeout_ms", "1500")]).await;
    let pid = proc.child.id();
    proc.set_members("c1", &["alice", "bob"]).await;
    // A finished request on a kept-alive connection: it is closed once idle for the timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", proc.http)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut half_sent = Vec::new();
    for _ in 0..380 {
        let mut s = TcpStream::connect(("127.0.0.1", proc.http)).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        half_sent.push(s);
    }
    let held = open_files(pid);
    assert!(held < 300, "the server holds {held} descriptors");
    // MQTT over TCP is admitted while HTTP is full.
    let (alice, mut events) = timeout(Duration::from_secs(3), mqtt(&proc, "alice"))
        .await
        .expect("CONNACK within 3 s while HTTP is flooded")
        .expect("alice connects");
    alice.subscribe("chat/c1", QoS::AtLeastOnce).await.unwrap();
    next(&mut events, |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    // And so is a REST request that is sent whole: the oldest half-sent one makes room.
    let health = format!("http://127.0.0.1:{}/healthz", proc.http);
    let status = timeout(Duration::from_secs(3), reqwest::get(&health))
        .await
        .expect("HTTP answers a whole request during the flood")
        .unwrap()
        .status();
    assert!(status.is_success());
    // Every half-sent request is closed by the header timeout (or was closed at accept).
    for s in &mut half_sent {
        assert!(closed_within(s, WAIT).await, "a half-sent request was kept");
    }
    assert!(
        closed_within(&mut idle, WAIT).await,
        "an idle connection was kept"
    );
    drop(half_sent);
    assert!(proc.metric("callbus_http_header_timeouts_total").await >= 1);
    assert!(proc.metric("callbus_http_refused_total").await >= 1);
    pair_still_talks(&proc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_connect_leave_http_and_real_clients_room() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = ["prlimit", "--nofile=400:400", "--"];
    let set = [("gateway.connect_timeout_ms", "1500")];
    let proc = spawn_configured(&wrapper, dir.path(), &set).await;
    let pid = proc.child.id();
    // 380 MQTT sockets that never send a CONNECT.
    let mut silent = Vec::new();
    for _ in 0..380 {
        silent.push(TcpStream::connect(("127.0.0.1", proc.mqtt)).await.unwrap());
    }
    let held = open_files(pid);
    assert!(held < 300, "the server holds {held} descriptors");
    // HTTP is admitted meanwhile.
    let health = format!("http://127.0.0.1:{}/healthz", proc.http);
    let status = timeout(Duration::from_secs(3), reqwest::get(&health))
        .await
        .expect("HTTP answers while MQTT is flooded")
        .unwrap()
        .status();
    assert!(status.is_success());
    // So is a real MQTT client, which CONNECTs at once: the oldest silent socket makes room.
    let connected = timeout(Duration::from_secs(3), mqtt(&proc, "alice")).await;
    assert!(matches!(connected, Ok(Ok(_))), "{:?}", connected.err());
    for s in &mut silent {
        assert!(closed_within(s, WAIT).await, "a silent socket was kept");
    }
    drop(silent);
    // A WebSocket that upgrades and never CONNECTs is closed like a TCP socket.
    let http = format!("127.0.0.1:{}", proc.http).parse().unwrap();
    let (mut ws, head) = ws_open(http, "mqtt").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let started = Instant::now();
    assert!(
        closed_within(&mut ws, WAIT).await,
        "a silent WebSocket was kept"
    );
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert!(proc.metric("callbus_mqtt_pending_refused_total").await >= 1);
    pair_still_talks(&proc).await;
}

/// A CONNECT of 3.1.1 whose remaining length says `declared` bytes, with the will flag as given;
/// only its first `send` bytes.
fn half_connect(declared: usize, will: bool, send: usize) -> Vec<u8> {
    let mut out = vec![0x10];
    common::raw::varint(declared, &mut out);
    let flags = if will { 0b0000_0110 } else { 0b0000_0010 };
    out.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60]);
    out.resize(send, b'x');
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_connects_cost_a_bounded_amount() {
    let dir = tempfile::tempdir().unwrap();
    let proc = spawn_configured(&[], dir.path(), &[]).await;
    let pid = proc.child.id();
    let before = rss_kib(pid);
    // 500 sockets, each 130 KB into a CONNECT (with a will, so it may be that large) that says
    // 131 KB: the server holds at most pending_connect_bytes of them in all.
    let mut sockets = Vec::new();
    let (mut peak, body) = (before, half_connect(131_000, true, 130_000));
    for _ in 0..500 {
        let mut s = TcpStream::connect(("127.0.0.1", proc.mqtt)).await.unwrap();
        let _ = timeout(Duration::from_millis(200), s.write_all(&body)).await;
        sockets.push(s);
        peak = peak.max(rss_kib(pid));
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "RSS grew {grown} KiB for 500 half-sent CONNECTs"
    );
    assert!(proc.metric("callbus_mqtt_pending_refused_total").await >= 1);
    // A real client is admitted meanwhile.
    let connected = timeout(Duration::from_secs(3), mqtt(&proc, "alice")).await;
    assert!(matches!(connected, Ok(Ok(_))), "{:?}", connected.err());
    drop(sockets);
    // Without a will, a CONNECT that says it is past max_connect_size is closed at once.
    let mut large = TcpStream::connect(("127.0.0.1", proc.mqtt)).await.unwrap();
    large
        .write_all(&half_connect(20_000, false, 64))
        .await
        .unwrap();
    assert!(closed_within(&mut large, Duration::from_secs(1)).await);
    pair_still_talks(&proc).await;
}
