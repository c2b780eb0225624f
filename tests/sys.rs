//! `$SYS/#` for operators: an admin sees the broker's figures (version, uptime, clients,
//! messages) and callbus's own (calls ringing and active) published every few seconds; `#`
//! alone does not include them, and users may not subscribe to them.

mod common;

use callbus::auth::Role;
use common::{granted, TestServer, Via};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test]
async fn an_admin_sees_the_broker_figures_on_sys() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.sys_interval = Duration::from_millis(100)
    })
    .await;
    s.set_members("c1", &["alice", "bob"]).await;
    let (status, _) = s.initiate("alice", json!("bob"), "voice").await;
    assert_eq!(status, reqwest::StatusCode::CREATED);
    let token = s.token_with("ops", Role::Admin);
    let mut ops = s
        .connect_as(Via::Tcp, "console", "ops", &token)
        .await
        .unwrap();
    assert!(granted(&ops.subscribe(&["$SYS/#"]).await[0]));
    let mut seen = HashMap::new();
    while seen.len() < 10 {
        let msg = ops.recv().await;
        let value = String::from_utf8(msg.payload).unwrap();
        seen.insert(msg.topic, value);
    }
    assert!(seen["$SYS/broker/version"].starts_with("callbus "));
    assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
    let connected: u64 = seen["$SYS/broker/clients/connected"].parse().unwrap();
    assert!(connected >= 1);
    assert_eq!(seen["$SYS/broker/callbus/calls/ringing"], "1");
    assert_eq!(seen["$SYS/broker/callbus/calls/active"], "0");
    assert!(seen.contains_key("$SYS/broker/messages/sent"));
}

#[tokio::test]
async fn sys_is_for_admins_and_not_part_of_hash() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.sys_interval = Duration::from_millis(50)
    })
    .await;
    let mut alice = s.connect(Via::Tcp, "alice").await;
    assert!(!granted(&alice.subscribe(&["$SYS/#"]).await[0]));
    let token = s.token_with("ops", Role::Admin);
    let mut ops = s
        .connect_as(Via::Tcp, "console", "ops", &token)
        .await
        .unwrap();
    assert!(granted(&ops.subscribe(&["#"]).await[0]));
    // Several $SYS rounds go by; the first thing `#` gets is the notification below.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let service = s.token_with("app", Role::Service);
    let body = json!({"user_id": "alice", "payload": {"n": 1}});
    s.post("/api/notifications/", &service, body).await;
    let first = ops.recv().await;
    assert_eq!(first.topic, "users/alice/notifications");
}
