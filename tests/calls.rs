//! The call REST API end to end: real HTTP, real MQTT subscribers for every event, sled on disk.

mod common;

use callbus::auth::Role;
use common::{granted, TestServer, Via, BOTH};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn server() -> TestServer {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob", "carol"]).await;
    s
}

async fn listener(s: &TestServer, via: Via, user: &str) -> common::Client {
    let mut c = s.connect(via, user).await;
    let topic = format!("users/{user}/notifications");
    assert!(granted(&c.subscribe(&[topic.as_str()]).await[0]));
    c
}

async fn initiate(
    s: &TestServer,
    caller: &str,
    receiver: Value,
    call_type: &str,
) -> (StatusCode, Value) {
    s.post(
        "/api/calls/initiate/",
        &s.token(caller),
        json!({"receiver_id": receiver, "call_type": call_type, "conversation_id": "c1"}),
    )
    .await
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

        let (status, call) = initiate(&s, "alice", json!("bob"), "video").await;
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
    let (_, call) = initiate(&s, "alice", json!("bob"), "voice").await;
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

    let (_, call) = initiate(&s, "alice", json!("bob"), "voice").await;
    let id = call["id"].as_u64().unwrap();
    // Only the receiver may reject; a stranger is not a party.
    let (status, _) = s.act(id, "reject", "alice", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = s.act(id, "reject", "carol", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
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

    let (_, call) = initiate(&s, "alice", json!("bob"), "voice").await;
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
    let (_, call) = initiate(&s, "alice", json!("bob"), "video").await;
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
    let (status, _) = initiate(&s, "alice", json!("bob"), "voice").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = initiate(&s, "carol", json!("bob"), "voice").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].is_string());
    let e = carol.recv_type("call.end").await;
    assert_eq!(e["reason"], "busy");
    assert_eq!(e["receiver_id"], "bob");
    // The caller, ringing someone, is busy for others too.
    let (status, _) = initiate(&s, "carol", json!("alice"), "voice").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn glare_ends_in_one_call() {
    let s = server().await;
    let (status, first) = initiate(&s, "alice", json!("bob"), "video").await;
    assert_eq!(status, StatusCode::CREATED);
    // Bob calls alice at the same moment: the first call wins, bob is pointed at it.
    let (status, body) = initiate(&s, "bob", json!("alice"), "video").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["call"]["id"], first["id"]);
    let (_, history) = s.get("/api/calls/", &s.token("bob")).await;
    assert_eq!(history["results"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let s = server().await;
    s.set_members("c2", &["alice", "dave"]).await;
    let alice = s.token("alice");
    let cases = [
        (
            json!({"call_type": "voice", "conversation_id": "c1"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "bob", "conversation_id": "c1"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "bob", "call_type": "voice"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "bob", "call_type": "fax", "conversation_id": "c1"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "alice", "call_type": "voice", "conversation_id": "c1"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "b/x", "call_type": "voice", "conversation_id": "c1"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": ["bob"], "call_type": "voice", "conversation_id": "c1"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "bob", "call_type": "voice", "conversation_id": "x".repeat(65)}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"receiver_id": "dave", "call_type": "voice", "conversation_id": "c1"}),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"receiver_id": "bob", "call_type": "voice", "conversation_id": "c2"}),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"receiver_id": "bob", "call_type": "voice", "conversation_id": "nope"}),
            StatusCode::FORBIDDEN,
        ),
        (json!([1, 2]), StatusCode::BAD_REQUEST),
    ];
    for (body, expected) in cases {
        let (status, reply) = s.post("/api/calls/initiate/", &alice, body.clone()).await;
        assert_eq!(status, expected, "{body} -> {reply}");
        assert!(reply["error"].is_string(), "{body}");
    }
    // Not JSON, no token, bad token, huge body.
    let resp = s
        .http_client
        .post(s.url("/api/calls/initiate/"))
        .bearer_auth(&alice)
        .body("{{{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = s
        .http_client
        .post(s.url("/api/calls/initiate"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = s.post("/api/calls/initiate/", "garbage", json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = s
        .post("/api/calls/initiate/", &s.expired_token("alice"), json!({}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let huge = json!({"receiver_id": "bob", "call_type": "voice", "conversation_id": "c1", "pad": "x".repeat(100_000)});
    let (status, _) = s.post("/api/calls/initiate/", &alice, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Unknown and malformed call ids.
    for (path, expected) in [
        ("/api/calls/999/", StatusCode::NOT_FOUND),
        ("/api/calls/abc/accept/", StatusCode::NOT_FOUND),
        ("/api/calls/a.b/", StatusCode::BAD_REQUEST),
        ("/api/calls/?limit=0", StatusCode::BAD_REQUEST),
        ("/api/calls/?before=x", StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = if path.contains("accept") {
            s.post(path, &alice, json!({})).await
        } else {
            s.get(path, &alice).await
        };
        assert_eq!(status, expected, "{path}");
        assert!(body["error"].is_string(), "{path}");
    }
    let (_, history) = s.get("/api/calls/", &alice).await;
    assert_eq!(history["results"], json!([]), "bad requests stored a call");
    // Bad hangup reason and device id.
    let (_, call) = initiate(&s, "alice", json!("bob"), "voice").await;
    let id = call["id"].as_u64().unwrap();
    let (status, _) = s
        .act(id, "accept", "bob", json!({"device_id": "a b"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s
        .post(
            &format!("/api/calls/{id}/end/"),
            &alice,
            json!({"reason": "bored"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, got) = s.get(&format!("/api/calls/{id}/"), &alice).await;
    assert_eq!(got["status"], "ringing");
    let (status, _) = s.get(&format!("/api/calls/{id}/"), &s.token("carol")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn history_is_newest_first_and_pages() {
    let s = server().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (_, call) = initiate(&s, "alice", json!("bob"), "voice").await;
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

#[tokio::test]
async fn service_pushes_its_own_notifications() {
    let s = server().await;
    let mut bob = listener(&s, Via::Ws, "bob").await;
    let service = s.token_with("app", Role::Service);
    let payload = json!({"id": 9, "verb": "liked_post", "actor": {"id": "7"}});
    let (status, reply) = s
        .post(
            "/api/notifications/",
            &service,
            json!({"user_id": "bob", "payload": payload}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let n = bob.recv_type("notification.created").await;
    assert_eq!(n["payload"], payload);
    assert_eq!(n["id"], reply["id"]);
    // Users cannot; bad bodies are refused.
    let (status, _) = s
        .post(
            "/api/notifications/",
            &s.token("alice"),
            json!({"user_id": "bob", "payload": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for body in [
        json!({"payload": {}}),
        json!({"user_id": "bob", "payload": "x"}),
        json!({"user_id": "a/b", "payload": {}}),
    ] {
        let (status, _) = s.post("/api/notifications/", &service, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn turn_credentials_when_configured() {
    let plain = server().await;
    let (status, body) = plain.get("/api/turn/", &plain.token("alice")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.turn = Some(callbus::api::turn::TurnConfig {
            secret: "turnsecret".into(),
            uris: vec!["turn:127.0.0.1:3478".into()],
            ttl_secs: 600,
        })
    })
    .await;
    let (status, body) = s.get("/api/turn", &s.token("alice")).await;
    assert_eq!(status, StatusCode::OK);
    let username = body["username"].as_str().unwrap();
    let (expiry, uid) = username.split_once(':').unwrap();
    assert_eq!(uid, "alice");
    let expiry: u64 = expiry.parse().unwrap();
    let now = callbus::auth::unix_now();
    assert!(expiry > now && expiry <= now + 601);
    assert_eq!(
        body["credential"],
        callbus::api::turn::credential("turnsecret", username)
    );
    assert_eq!(body["uris"], json!(["turn:127.0.0.1:3478"]));
    let (status, _) = s.get("/api/turn/", "nope").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn dev_tokens_only_in_dev_mode() {
    let s = server().await;
    let (status, _) = s
        .post("/api/dev/token", "", json!({"user_id": "zed"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let dev = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| st.dev = true).await;
    let (status, body) = dev
        .post(
            "/api/dev/token",
            "",
            json!({"user_id": "zed", "username": "Zed"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = dev.auth.verify(body["token"].as_str().unwrap()).unwrap();
    assert_eq!((id.user_id.as_str(), id.username.as_str()), ("zed", "Zed"));
    let (status, _) = dev
        .post("/api/dev/token/", "", json!({"user_id": "a b"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn cors_preflight_for_configured_origins_only() {
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.cors_origins = vec!["https://app.example".into()]
    })
    .await;
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let resp = s
            .http_client
            .request(reqwest::Method::OPTIONS, s.url("/api/calls/initiate/"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
            .await
            .unwrap();
        let header = resp
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned());
        if allowed {
            assert_eq!(header.as_deref(), Some(origin));
            let methods = resp.headers()["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(methods.contains("POST"), "{methods}");
        } else {
            assert_eq!(header, None, "{origin}");
        }
    }
}
