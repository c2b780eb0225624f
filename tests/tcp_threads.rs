//! MQTT over TCP runs on threads of its own (`[gateway] mqtt_tcp_threads`), each a
//! single-threaded runtime accepting from the same socket: clients, wherever they landed,
//! reach each other and WebSocket clients, and the threads end when the server stops.

mod common;

use common::{granted, TestServer, Via, WAIT};
use serde_json::json;
use std::time::Duration;

/// The names of this process's threads that run MQTT over TCP.
fn tcp_threads() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("mqtt-tcp-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn tcp_clients_on_the_listener_threads_reach_each_other_and_the_threads_end_at_stop() {
    let config =
        callbus::config::DEFAULT_CONFIG.replace("mqtt_tcp_threads = 0", "mqtt_tcp_threads = 3");
    let mut s = TestServer::start_with(&config).await;
    assert_eq!(tcp_threads(), ["mqtt-tcp-0", "mqtt-tcp-1", "mqtt-tcp-2"]);
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    s.set_members("c1", &members).await;
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        // One WebSocket client among them: it shares the hub with the TCP threads.
        let via = if i == 0 { Via::Ws } else { Via::Tcp };
        let mut c = s.connect(via, user).await;
        assert!(granted(&c.subscribe(&["chat/c1"]).await[0]));
        clients.push(c);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.publish_json(
            "chat/c1",
            json!({"type": "message", "text": format!("from {i}")}),
        )
        .await;
    }
    // Every client hears all eight, each stamped with its sender.
    for c in &mut clients {
        let mut senders = Vec::new();
        for _ in 0..users.len() {
            let m = tokio::time::timeout(WAIT, c.recv_type("message"))
                .await
                .expect("message");
            senders.push(m["sender_id"].as_str().unwrap_or_default().to_owned());
        }
        senders.sort();
        assert_eq!(senders, users);
    }
    let mqtt = s.mqtt;
    s.server.take().expect("server").stop().await;
    // The listener is closed and its threads are gone (bounded wait).
    assert!(tokio::net::TcpStream::connect(mqtt).await.is_err());
    for _ in 0..200 {
        if tcp_threads().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("MQTT threads still running: {:?}", tcp_threads());
}
