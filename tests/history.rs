//! `[storage] call_history_secs`: ended calls leave the store (record and both parties' history)
//! that long after they ended; ringing and active calls stay however old they are.

mod common;

use callbus::config::DEFAULT_CONFIG;
use common::TestServer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const KEEP_SECS: u64 = 3;

/// The call ids in `user`'s history.
async fn history(s: &TestServer, user: &str) -> Vec<u64> {
    let (status, body) = s.get("/api/calls/?limit=50", &s.token(user)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let calls = body["results"].as_array().expect("a list of calls");
    calls.iter().filter_map(|c| c["id"].as_u64()).collect()
}

async fn call(s: &TestServer, caller: &str, receiver: &str, cid: &str) -> u64 {
    let body = json!({"receiver_id": receiver, "call_type": "voice", "conversation_id": cid});
    let (status, call) = s.post("/api/calls/initiate/", &s.token(caller), body).await;
    assert_eq!(status, StatusCode::CREATED, "{call}");
    call["id"].as_u64().expect("id")
}

/// Waits (bounded) until `who` gets 404 for call `id`.
async fn until_gone(s: &TestServer, id: u64, who: &str) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(KEEP_SECS * 5);
    loop {
        let (status, _) = s.get(&format!("/api/calls/{id}/"), &s.token(who)).await;
        if status == StatusCode::NOT_FOUND {
            return started.elapsed();
        }
        assert_eq!(status, StatusCode::OK);
        assert!(Instant::now() < deadline, "call {id} was never removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn ended_calls_leave_after_the_history_kept_and_live_calls_stay() {
    let config = DEFAULT_CONFIG.replace(
        "call_history_secs = 0",
        &format!("call_history_secs = {KEEP_SECS}"),
    );
    assert_ne!(
        config, DEFAULT_CONFIG,
        "the default config sets call_history_secs"
    );
    let s = TestServer::start_with(&config).await;
    s.set_members("c1", &["carol", "bob"]).await;
    s.set_members("c2", &["dave", "erin"]).await;

    // An active call, older than the history kept by the time the next one goes.
    let active = call(&s, "carol", "bob", "c1").await;
    let (status, _) = s.act(active, "accept", "bob", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    // A rejected call: kept for KEEP_SECS after it ended, then gone.
    let rejected = call(&s, "dave", "erin", "c2").await;
    let (status, _) = s.act(rejected, "reject", "erin", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(history(&s, "dave").await.contains(&rejected));

    let waited = until_gone(&s, rejected, "dave").await;
    assert!(
        waited >= Duration::from_secs(KEEP_SECS - 1),
        "removed after {waited:?}, before the history kept"
    );
    assert!(!history(&s, "dave").await.contains(&rejected));
    assert!(!history(&s, "erin").await.contains(&rejected));
    assert!(s.metric("callbus_calls_pruned_total").await >= 1);

    // The active call is older than the history kept, and stays.
    let (status, body): (StatusCode, Value) = s
        .get(&format!("/api/calls/{active}/"), &s.token("carol"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "active");
    assert!(history(&s, "bob").await.contains(&active));

    // Ended now, it is kept for the history's length from now (not from when it began).
    let (status, _) = s.act(active, "end", "bob", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s
        .get(&format!("/api/calls/{active}/"), &s.token("carol"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ended");
    until_gone(&s, active, "carol").await;
    assert!(!history(&s, "carol").await.contains(&active));
    assert!(!history(&s, "bob").await.contains(&active));
}
