//! MQTT 5 across nodes: a PUBLISH's properties and its publisher (for No Local) travel on the
//! cluster's bus (NATS) as on one node's; a persistent session's No Local moves with it; a
//! client back on another node within its Will Delay Interval is seen by the node holding the
//! Will.

mod common;

use callbus::auth::Role;
use common::cluster::Cluster;
use common::process::token;
use common::raw::{next_v5_publish, next_v5_says, publish_unechoed, publish_v5, subscribed_v5};
use common::raw::{RawConnect, RawMqtt};
use std::net::SocketAddr;

#[tokio::test]
async fn publish_properties_and_no_local_hold_across_nodes() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.set_members("c1", &["bob", "carol"]).await;
    let at = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };
    let token = |user: &str| token(user, Role::User);
    let mut bob = subscribed_v5(at(b.mqtt), "bob", &token("bob"), 0x01).await;
    // Carol, on the other node, holds chat/c1 with No Local and publishes with a property.
    let mut carol = subscribed_v5(at(a.mqtt), "carol", &token("carol"), 0x05).await;
    let mut props = vec![0x26];
    common::raw::field(b"trace", &mut props);
    common::raw::field(b"42", &mut props);
    carol.send(&publish_v5(1, &props, "across")).await;
    let got = next_v5_publish(&mut bob).await;
    assert!(String::from_utf8_lossy(&got.payload).contains("across"));
    let users = got.properties.expect("properties").user_properties;
    assert_eq!(users, [("trace".to_owned(), "42".to_owned())]);
    // Carol's next message is bob's, not her own.
    bob.send(&publish_v5(1, &[], "from bob")).await;
    let next = next_v5_publish(&mut carol).await;
    assert!(String::from_utf8_lossy(&next.payload).contains("from bob"));
}

/// Carol's MQTT 5 phone (Clean Start 0, an hour's session expiry) at `mqtt`; whether its
/// session was there.
async fn carols_phone(mqtt: SocketAddr) -> (RawMqtt, bool) {
    let mut connect = RawConnect::v5("phone", "carol", &token("carol", Role::User));
    connect.clean = false;
    connect.session_expiry = Some(3600);
    let (raw, (present, code)) = RawMqtt::connect(mqtt, &connect).await;
    assert_eq!(code, 0);
    (raw, present)
}

/// A persistent session's No Local subscription is stored with it: resumed on another node,
/// the phone still does not get its own messages back (from its queue in the cluster).
#[tokio::test]
async fn no_local_moves_with_a_persistent_session_between_nodes() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.set_members("c1", &["bob", "carol"]).await;
    let at = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };
    let (mut phone, present) = carols_phone(at(a.mqtt)).await;
    assert!(!present);
    assert_eq!(phone.subscribe_with("chat/c1", 5, 0x05).await, 1); // QoS 1, No Local
    phone.send(&[0xE0, 0x00]).await;
    assert!(phone.closed_silently().await);

    let (mut phone, present) = carols_phone(at(b.mqtt)).await;
    assert!(present, "the session was not found on node 2");
    publish_unechoed(&mut phone, 1, "mine").await;
    let mut bob = subscribed_v5(at(a.mqtt), "bob", &token("bob", Role::User), 0x01).await;
    bob.send(&publish_v5(1, &[], "from bob")).await;
    assert!(next_v5_says(&mut phone, "from bob").await);
}

/// MQTT-3.1.3-9 across nodes: a client that comes back on another node within its Will Delay
/// Interval claims its client id there, and the node holding the delayed Will does not send it.
#[tokio::test]
async fn a_client_back_on_another_node_within_the_will_delay_sends_no_will() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.set_members("c1", &["alice", "bob", "carol"]).await;
    let at = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };
    let mut alice = b.connect(common::Via::Tcp, "alice").await;
    assert!(common::granted(&alice.subscribe(&["chat/c1"]).await[0]));

    let mut connect = RawConnect::v5("carol-dev", "carol", &token("carol", Role::User));
    let will = r#"{"type":"message","text":"carol is gone"}"#;
    connect.will = Some(("chat/c1".into(), will.as_bytes().to_vec()));
    connect.will_properties = [0x18, 0, 0, 0, 2].to_vec(); // Will Delay Interval 2 s
    connect.session_expiry = Some(600);
    let (carol, (_, code)) = RawMqtt::connect(at(a.mqtt), &connect).await;
    assert_eq!(code, 0);
    drop(carol); // the network goes

    let mut back = RawConnect::v5("carol-dev", "carol", &token("carol", Role::User));
    (back.clean, back.session_expiry) = (false, Some(600));
    let (_back, (present, code)) = RawMqtt::connect(at(b.mqtt), &back).await;
    assert_eq!(code, 0);
    assert!(present);
    // The first connection's delay passes (the timer under test: nothing to await instead).
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
    let mut bob = a.connect(common::Via::Tcp, "bob").await;
    let marker = serde_json::json!({"type": "message", "text": "no will came"});
    bob.publish_json("chat/c1", marker).await;
    assert_eq!(alice.recv().await.json()["text"], "no will came");
}
