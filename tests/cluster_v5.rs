//! MQTT 5 across nodes: a PUBLISH's properties and its publisher (for No Local) travel on the
//! cluster's bus (NATS) as on one node's.

mod common;

use callbus::auth::Role;
use common::cluster::Cluster;
use common::process::token;
use common::raw::{next_v5_publish, publish_v5, subscribed_v5};
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
