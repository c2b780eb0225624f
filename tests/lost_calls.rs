//! No call outlives its devices: an active call ends by itself (`connection_lost`) once neither
//! party has had a live connection for the grace period (across a restart: tests/durability.rs),
//! and no call lasts past the maximum duration (`max_duration`).

mod common;

use common::{TestServer, Via, WAIT};
use serde_json::{json, Value};
use std::time::Duration;

/// An active call from alice to bob; returns its id.
async fn active_call(s: &TestServer) -> u64 {
    let (status, call) = s.initiate("alice", json!("bob"), "voice").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{call}");
    let id = call["id"].as_u64().expect("id");
    let (status, call) = s.act(id, "accept", "bob", json!({})).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{call}");
    id
}

/// The call once it is no longer active (bounded by [`WAIT`]): the end is a deadline inside
/// callbus that no client of this test is connected to hear.
async fn ended(s: &TestServer, id: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, call) = s.get(&format!("/api/calls/{id}/"), &s.token("alice")).await;
        if call["status"] != "active" {
            return call;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still active: {call}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn grace(secs: u64) -> impl FnOnce(&mut callbus::server::Settings) {
    move |st| st.call_lost_grace = Duration::from_secs(secs)
}

#[tokio::test]
async fn a_call_whose_parties_both_vanish_ends_as_connection_lost() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, grace(1)).await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut phone = s.connect_persistent(Via::Tcp, "alice", "phone").await;
    assert!(common::granted(
        &phone.subscribe(&["users/alice/notifications"]).await[0]
    ));
    let bob = s.connect(Via::Ws, "bob").await;
    let id = active_call(&s).await;
    assert_eq!(
        phone.recv_type("call.accepted").await["call_id"],
        id.to_string()
    );
    // Both vanish without ending the call.
    drop(phone);
    drop(bob);
    let call = ended(&s, id).await;
    assert_eq!(call["status"], "ended");
    assert_eq!(call["end_reason"], "connection_lost");
    // Alice's phone comes back and hears about it.
    let mut phone = s.connect_persistent(Via::Tcp, "alice", "phone").await;
    let end = phone.recv_type("call.end").await;
    assert_eq!(end["reason"], "connection_lost");
    assert_eq!(end["call_id"], id.to_string());
}

#[tokio::test]
async fn a_call_with_a_party_still_connected_goes_on() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, grace(1)).await;
    s.set_members("c1", &["alice", "bob"]).await;
    let _bob = s.connect(Via::Tcp, "bob").await;
    let id = active_call(&s).await;
    // Twice the grace with bob connected all along (nothing to await but time).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, call) = s.get(&format!("/api/calls/{id}/"), &s.token("alice")).await;
    assert_eq!(call["status"], "active", "{call}");
}

#[tokio::test]
async fn no_call_lasts_past_the_maximum() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.max_call_duration = Duration::from_secs(1)
    })
    .await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut bob = s.listener(Via::Tcp, "bob").await;
    let id = active_call(&s).await;
    let end = bob.recv_type("call.end").await;
    assert_eq!(end["reason"], "max_duration");
    assert_eq!(end["call_id"], id.to_string());
    assert!(end["duration_seconds"].as_u64().expect("duration") >= 1);
}
