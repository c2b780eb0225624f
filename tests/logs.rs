//! A connection's log lines name it (transport, address, client id) from its CONNECT to its
//! end, though an idle session keeps no log span (it makes its context when it writes a line).

mod common;

use callbus::auth::Role;
use common::process::{spawn_logged, token};
use common::WAIT;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc::UnboundedReceiver;

/// The next log line containing `needle` (others skipped), bounded by [`WAIT`].
async fn line_with(lines: &mut UnboundedReceiver<String>, needle: &str) -> String {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("the log ended before a line with {needle:?}"),
        Err(_) => panic!("no log line with {needle:?} in time"),
    }
}

#[tokio::test]
async fn a_connections_log_lines_name_it_from_connect_to_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, mut lines) = spawn_logged(dir.path(), "callbus=debug").await;
    let mut options = MqttOptions::new("phone1", "127.0.0.1", proc.mqtt);
    options.set_credentials("alice", token("alice", Role::User));
    let (client, mut events) = AsyncClient::new(options, 10);
    let (packets, mut received) = tokio::sync::mpsc::unbounded_channel();
    let polling = tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(packet) = event {
                let _ = packets.send(packet);
            }
        }
    });
    let mut next = async || {
        let packet = tokio::time::timeout(WAIT, received.recv()).await;
        packet.expect("in time").expect("connected")
    };
    assert!(matches!(next().await, Packet::ConnAck(_)));
    let context = |line: &str| {
        assert!(line.contains("kind=tcp"), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        assert!(line.contains("client=alice.phone1"), "{line}");
    };
    context(&line_with(&mut lines, "connected").await);

    // Refused while the session runs: a subscription (the hub) and a publish (the bridge).
    client
        .subscribe("users/bob/notifications", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(next().await, Packet::SubAck(_)));
    context(&line_with(&mut lines, "subscription refused").await);
    client
        .publish("users/bob/notifications", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    context(&line_with(&mut lines, "publish refused").await);

    client.disconnect().await.unwrap();
    tokio::time::timeout(WAIT, polling).await.unwrap().unwrap();
    let disconnected = line_with(&mut lines, "disconnected").await;
    context(&disconnected);
    assert!(
        disconnected.contains("client disconnected"),
        "{disconnected}"
    );
}
