//! The call REST API end to end: real HTTP, real MQTT subscribers for every event, sled on disk.

mod common;

use common::{granted, TestServer, Via, BOTH};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

async fn server() -> TestServer {
    TestServer::with_c1().await
}

async fn listener(s: &TestServer, via: Via, user: &str) -> common::Client {
    s.listener(via, user).await
}

#[tokio::test]
async fn ring_accept_end_with_events_to_both_parties() {
    let s = server().await;
    for via in BOTH {
        let mut alice = listener(&s, via, "alice").await;
        let mut bob = listener(&s, via, "bob").await;
        let mut bob_tablet = s
            .connect_as(via, "tablet", "bob", &s.token("bob"))
            .await
            .unwrap();
        assert!(granted(
            &bob_tablet.subscribe(&["users/bob/notifications"]).await[0]
        ));

        let (status, call) = s.initiate("alice", json!("bob"), "video").await;
        assert_eq!(status, StatusCode::CREATED, "{call}");
        assert_eq!(call["status"], "ringing");
        assert_eq!(call["caller"]["id"], "alice");
        assert_eq!(call["caller"]["username"], "alice-name");
        assert_eq!(call["receiver"]["id"], "bob");
        let id = call["id"].as_u64().expect("integer id");

        // Both of bob's devices ring, with the seed's payload.
        for device in [&mut bob, &mut bob_tablet] {
            let n = device.recv_type("notification.created").await;
            let p = &n["payload"];
            assert_eq!(p["verb"], "incoming_video_call");
            assert_eq!(p["id"], id);
            assert_eq!(p["object_id"], id);
            assert_eq!(p["conversation_id"], "c1");
            assert_eq!(p["actor"]["id"], "alice");
            assert_eq!(p["actor"]["username"], "alice-name");
            assert!(p["timestamp"].is_string());
            assert!(n["id"].is_string() && n["ts"].is_string());
        }

        // Accept from the phone; everyone learns, so the tablet stops ringing.
        let (status, call) = s
            .act(id, "accept", "bob", json!({"device_id": "phone"}))
            .await;
        assert_eq!(status, StatusCode::OK, "{call}");
        assert_eq!(call["status"], "active");
        assert!(call["accepted_at"].is_string());
        for device in [&mut alice, &mut bob, &mut bob_tablet] {
            let e = device.recv_type("call.accepted").await;
            assert_eq!(e["call_id"], id.to_string());
            assert_eq!(e["accepted_by"], "bob");
            assert_eq!(e["device_id"], "phone");
        }

        // End, with a client-sent duration that is ignored.
        let (status, call) = s
            .post(&format!("/api/calls/{id}"), &s.token("alice"), json!({}))
            .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{call}");
        let (status, call) = s
            .act(
                id,
                "end",
                "alice",
                json!({"duration_seconds": 9999, "reason": "user_hangup"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{call}");
        assert_eq!(call["status"], "ended");
        assert_eq!(call["end_reason"], "ended");
        assert_eq!(call["hangup_reason"], "user_hangup");
        assert!(call["duration_seconds"].as_u64().unwrap() < 60);
        for device in [&mut alice, &mut bob] {
            let e = device.recv_type("call.end").await;
            assert_eq!(e["call_id"], id.to_string());
            assert_eq!(e["reason"], "ended");
            assert_eq!(e["hangup_reason"], "user_hangup");
            assert_eq!(e["duration_seconds"], call["duration_seconds"]);
        }
        // Terminal: nothing changes any more.
        for (path, who) in [
            ("accept", "bob"),
            ("reject", "bob"),
            ("end", "alice"),
            ("end", "bob"),
        ] {
            let (status, body) = s
                .post(
                    &format!("/api/calls/{id}/{path}/"),
                    &s.token(who),
                    json!({}),
                )
                .await;
            assert_eq!(status, StatusCode::CONFLICT, "{path} by {who}: {body}");
            assert!(body["error"].is_string());
        }
        let (status, got) = s.get(&format!("/api/calls/{id}/"), &s.token("bob")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got["status"], "ended");
        assert_eq!(got["receiver"]["username"], "bob-name");
    }
}

#[tokio::test]
async fn duration_is_computed_by_the_server() {
    let s = server().await;
    let (_, call) = s.initiate("alice", json!("bob"), "voice").await;
    let id = call["id"].as_u64().unwrap();
    s.act(id, "accept", "bob", json!({})).await;
    // A real, bounded wait: the duration must reflect time actually spent in the call.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, call) = s
        .act(id, "end", "bob", json!({"duration_seconds": 0}))
        .await;
    assert_eq!(call["duration_seconds"], 2);
}

#[tokio::test]
async fn reject_and_cancel_reach_the_other_party() {
    let s = server().await;
    let mut alice = listener(&s, Via::Tcp, "alice").await;
    let mut bob = listener(&s, Via::Ws, "bob").await;

    let (_, call) = s.initiate("alice", json!("bob"), "voice").await;
    let id = call["id"].as_u64().unwrap();
    // Only the receiver may reject; to a stranger the call does not exist.
    let (status, _) = s.act(id, "reject", "alice", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = s.act(id, "reject", "carol", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A bodiless POST works (frontends often send none).
    let resp = s
        .http_client
        .post(s.url(&format!("/api/calls/{id}/reject/")))
        .bearer_auth(s.token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let e = alice.recv_type("call.end").await;
    assert_eq!(e["reason"], "rejected");
    assert_eq!(e["call_id"], id.to_string());
    assert_eq!(bob.recv_type("call.end").await["reason"], "rejected");

    let (_, call) = s.initiate("alice", json!("bob"), "voice").await;
    let id = call["id"].as_u64().unwrap();
    let (status, call) = s.act(id, "end", "alice", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(call["status"], "cancelled");
    assert_eq!(bob.recv_type("call.end").await["reason"], "cancelled");
}

#[tokio::test]
async fn unanswered_calls_are_missed_after_the_ring_timeout() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.ring_timeout = Duration::from_millis(500)
    })
    .await;
    s.set_members("c1", &["alice", "bob"]).await;
    let mut alice = listener(&s, Via::Tcp, "alice").await;
    let mut bob = listener(&s, Via::Tcp, "bob").await;
    let (_, call) = s.initiate("alice", json!("bob"), "video").await;
    let id = call["id"].as_u64().unwrap();
    assert_eq!(alice.recv_type("call.end").await["reason"], "missed");
    // Bob's events, in order: incoming, call.end missed, missed-call notification.
    let n = bob.recv().await.json();
    assert_eq!(n["payload"]["verb"], "incoming_video_call");
    assert_eq!(bob.recv().await.json()["reason"], "missed");
    let n = bob.recv().await.json();
    assert_eq!(n["payload"]["verb"], "missed_video_call");
    let (_, got) = s.get(&format!("/api/calls/{id}/"), &s.token("alice")).await;
    assert_eq!(got["status"], "missed");
    let (status, _) = s.act(id, "accept", "bob", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn busy_receiver_gets_409_and_the_caller_a_busy_end() {
    let s = server().await;
    let mut carol = listener(&s, Via::Tcp, "carol").await;
    let (status, _) = s.initiate("alice", json!("bob"), "voice").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = s.initiate("carol", json!("bob"), "voice").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].is_string());
    let e = carol.recv_type("call.end").await;
    assert_eq!(e["reason"], "busy");
    assert_eq!(e["receiver_id"], "bob");
    // The caller, ringing someone, is busy for others too.
    let (status, _) = s.initiate("carol", json!("alice"), "voice").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn glare_ends_in_one_call() {
    let s = server().await;
    let (status, first) = s.initiate("alice", json!("bob"), "video").await;
    assert_eq!(status, StatusCode::CREATED);
    // Bob calls alice at the same moment: the first call wins, bob is pointed at it.
    let (status, body) = s.initiate("bob", json!("alice"), "video").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["call"]["id"], first["id"]);
    let (_, history) = s.get("/api/calls/", &s.token("bob")).await;
    assert_eq!(history["results"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn history_is_newest_first_and_pages() {
    let s = server().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (_, call) = s.initiate("alice", json!("bob"), "voice").await;
        let id = call["id"].as_u64().unwrap();
        s.act(id, "end", "alice", json!({})).await;
        ids.push(id);
    }
    let (_, page) = s.get("/api/calls/?limit=3", &s.token("bob")).await;
    let got: Vec<u64> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [ids[4], ids[3], ids[2]]);
    let before = page["next_before"].as_u64().unwrap();
    let (_, page) = s
        .get(
            &format!("/api/calls?limit=3&before={before}"),
            &s.token("bob"),
        )
        .await;
    let got: Vec<u64> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [ids[1], ids[0]]);
    assert!(page["next_before"].is_null());
    let (_, carol) = s.get("/api/calls/", &s.token("carol")).await;
    assert_eq!(carol["results"], json!([]));
}

#[tokio::test]
async fn integer_ids_from_django_frontends_work() {
    let s = TestServer::start().await;
    s.set_members("5", &["1", "2"]).await;
    let (status, call) = s
        .post(
            "/api/calls/initiate/",
            &s.token("1"),
            json!({"receiver_id": 2, "call_type": "voice", "conversation_id": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{call}");
    assert_eq!(call["receiver"]["id"], "2");
    assert_eq!(call["conversation_id"], "5");
}
