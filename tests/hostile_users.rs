//! Hostile users: one who stores sessions without end, rings people in a loop or several at
//! once, counts other people's calls and conversations by probing ids, or presents tokens
//! that must not pass (an unknown `crit` extension, a `jku` naming a key server) or two
//! `Authorization` headers. Each case asserts the refusal, and that ordinary users carry on.

mod common;

use callbus::auth::Claims;
use common::{granted, TestServer, Via, WAIT};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Alice hears bob on `chat/c1`.
async fn pair_still_talks(s: &TestServer) {
    let mut alice = s.connect(Via::Tcp, "alice").await;
    assert!(granted(&alice.subscribe(&["chat/c1"]).await[0]));
    let mut bob = s.connect(Via::Ws, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": "still here"}))
        .await;
    assert_eq!(alice.recv().await.json()["text"], "still here");
}

#[tokio::test]
async fn one_user_keeps_a_bounded_number_of_stored_sessions() {
    let config = callbus::config::DEFAULT_CONFIG.replace("max_per_user = 32", "max_per_user = 4");
    let s = TestServer::start_with(&config).await;
    s.set_members("c1", &["alice", "bob", "mallory"]).await;
    // Mallory makes ten persistent sessions, each subscribed, one after another.
    for n in 0..10u64 {
        let mut c = s
            .connect_persistent(Via::Tcp, "mallory", &format!("m{n}"))
            .await;
        assert!(granted(&c.subscribe(&["chat/c1"]).await[0]));
        c.leave().await;
    }
    assert_eq!(s.metric("callbus_sessions_evicted_total").await, 6);
    // A message to the conversation is queued four times, not ten.
    let mut bob = s.connect(Via::Tcp, "bob").await;
    bob.publish_json("chat/c1", json!({"type": "message", "text": "queued"}))
        .await;
    // The newest sessions are there; the oldest were expired first.
    let mut newest = s.connect_persistent(Via::Tcp, "mallory", "m9").await;
    assert!(newest.session_present);
    assert_eq!(newest.recv().await.json()["text"], "queued");
    let oldest = s.connect_persistent(Via::Tcp, "mallory", "m0").await;
    assert!(!oldest.session_present);
    pair_still_talks(&s).await;
}

#[tokio::test]
async fn what_one_users_stored_sessions_queue_shares_one_budget() {
    let config = callbus::config::DEFAULT_CONFIG
        .replace("max_per_user = 32", "max_per_user = 4")
        .replace("user_queue_bytes = 16777216", "user_queue_bytes = 8192");
    let s = TestServer::start_with(&config).await;
    s.set_members("c1", &["alice", "bob", "mallory"]).await;
    for n in 0..4u64 {
        let id = format!("m{n}");
        let mut c = s.connect_persistent(Via::Tcp, "mallory", &id).await;
        assert!(granted(&c.subscribe(&["chat/c1"]).await[0]));
        c.leave().await;
    }
    // 20 messages of 1 KB while all four are away: 80 KB queued without the budget.
    let mut bob = s.connect(Via::Tcp, "bob").await;
    let text = "x".repeat(1000);
    for _ in 0..20 {
        bob.publish_json("chat/c1", json!({"type": "message", "text": text}))
            .await;
    }
    let mut kept = 0;
    for n in 0..4 {
        let mut c = s
            .connect_persistent(Via::Tcp, "mallory", &format!("m{n}"))
            .await;
        bob.publish_json("chat/c1", json!({"type": "message", "text": "live"}))
            .await;
        loop {
            let m = c.recv().await.json();
            match (m["type"].as_str(), m["text"].as_str()) {
                (_, Some("live")) => break,
                (Some("message"), _) => kept += 1,
                _ => assert_eq!(m["code"], "queue_overflow", "{m}"),
            }
        }
    }
    // Each message's payload is over 1 KB: at most 8 fit in 8 KiB.
    assert!(kept <= 8, "{kept} messages kept for mallory's sessions");
    assert!(s.metric("callbus_session_queue_dropped_total").await >= 72);
    pair_still_talks(&s).await;
}

async fn initiate(s: &TestServer, caller: &str, receiver: &str) -> reqwest::Response {
    let body = json!({"receiver_id": receiver, "call_type": "voice", "conversation_id": "c1"});
    s.http_client
        .post(s.url("/api/calls/initiate/"))
        .bearer_auth(s.token(caller))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn ringing_is_rate_limited_and_one_at_a_time() {
    let config = callbus::config::DEFAULT_CONFIG
        .replace("initiate_per_minute = 20", "initiate_per_minute = 6")
        .replace("initiate_burst = 10", "initiate_burst = 3");
    let s = TestServer::start_with(&config).await;
    s.set_members("c1", &["alice", "bob", "carol", "dave"])
        .await;
    let first = initiate(&s, "alice", "bob").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // A second ring while the first still rings: 409 with the ringing call; carol is not rung
    // (so not made busy for others).
    let second = initiate(&s, "alice", "carol").await;
    assert_eq!(second.status(), StatusCode::CONFLICT);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["call"]["id"], first["id"], "{second}");
    let dave_rings_carol = initiate(&s, "dave", "carol").await;
    assert_eq!(dave_rings_carol.status(), StatusCode::CREATED);
    // Ring and cancel in a loop: past the burst, 429 with Retry-After.
    let id = first["id"].as_u64().unwrap();
    assert!(s.act(id, "end", "alice", json!({})).await.0.is_success());
    let third = initiate(&s, "alice", "bob").await;
    assert_eq!(third.status(), StatusCode::CREATED);
    let third: Value = third.json().await.unwrap();
    let id = third["id"].as_u64().unwrap();
    assert!(s.act(id, "end", "alice", json!({})).await.0.is_success());
    let refused = initiate(&s, "alice", "bob").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].is_string());
    assert_eq!(s.metric("callbus_calls_rate_limited_total").await, 1);
    // Others are not limited by alice's rate.
    assert_eq!(
        initiate(&s, "bob", "alice").await.status(),
        StatusCode::CREATED
    );
    pair_still_talks(&s).await;
}

#[tokio::test]
async fn who_may_not_see_a_call_or_conversation_is_told_it_does_not_exist() {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob"]).await;
    s.set_members("c2", &["carol"]).await;
    let (_, call) = s.initiate("alice", json!("bob"), "voice").await;
    let id = call["id"].as_u64().unwrap();
    let stranger = s.token("mallory");
    let unknown = s.get("/api/calls/999999/", &stranger).await;
    assert_eq!(unknown.0, StatusCode::NOT_FOUND);
    assert_eq!(
        s.get(&format!("/api/calls/{id}/"), &stranger).await,
        unknown
    );
    for action in ["accept", "reject", "end"] {
        let (status, body) = s.act(id, action, "mallory", json!({})).await;
        assert_eq!((status, &body), (unknown.0, &unknown.1), "{action}");
    }
    let unknown = s.get("/api/conversations/nope/", &stranger).await;
    assert_eq!(unknown.0, StatusCode::NOT_FOUND);
    assert_eq!(s.get("/api/conversations/c2/", &stranger).await, unknown);
    // The parties and members still see them.
    assert_eq!(
        s.get(&format!("/api/calls/{id}/"), &s.token("bob")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.get("/api/conversations/c2/", &s.token("carol")).await.0,
        StatusCode::OK
    );
}

/// A token for `sub` with `header`, signed with `secret`.
fn token_with_header(header: jsonwebtoken::Header, sub: &str, secret: &[u8]) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: callbus::auth::unix_now() + 3600,
        username: None,
        first_name: None,
        last_name: None,
        role: callbus::auth::Role::User,
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn tokens_with_critical_extensions_or_key_urls_do_not_pass() {
    let s = TestServer::with_c1().await;
    // `crit` names an extension callbus does not understand: refused on both interfaces.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["exp".into()]);
    let crit = token_with_header(header, "alice", common::SECRET);
    assert_eq!(
        s.get("/api/calls/", &crit).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(s
        .connect_as(Via::Tcp, "alice-dev", "alice", &crit)
        .await
        .is_err());
    // `jku` naming a key server is never fetched: a token signed with another key fails, and
    // one signed with callbus's own passes; the key server hears from nobody.
    let keys = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.jku = Some(format!("http://{}/jwks.json", keys.local_addr().unwrap()));
    header.kid = Some("k1".into());
    let forged = token_with_header(header.clone(), "alice", b"the attacker's key");
    assert_eq!(
        s.get("/api/calls/", &forged).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(s
        .connect_as(Via::Tcp, "alice-dev", "alice", &forged)
        .await
        .is_err());
    let ours = token_with_header(header, "alice", common::SECRET);
    assert_eq!(s.get("/api/calls/", &ours).await.0, StatusCode::OK);
    let fetched = tokio::time::timeout(Duration::from_millis(300), keys.accept()).await;
    assert!(
        fetched.is_err(),
        "callbus fetched the key URL a token named"
    );
    // The plain token still works.
    assert_eq!(
        s.get("/api/calls/", &s.token("alice")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let s = TestServer::with_c1().await;
    let request = format!(
        "GET /api/calls/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
        s.token("alice"),
        s.token("bob")
    );
    let mut stream = TcpStream::connect(s.http).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .expect("an answer in time")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains(r#"{"error":"#), "{reply}");
    // One header works.
    assert_eq!(
        s.get("/api/calls/", &s.token("alice")).await.0,
        StatusCode::OK
    );
    pair_still_talks(&s).await;
}
