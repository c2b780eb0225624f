//! Bad input to the call API gets a clear error and changes nothing.

mod common;

use common::TestServer;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let s = TestServer::with_c1().await;
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
    let (_, call) = s.initiate("alice", json!("bob"), "voice").await;
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
    // A stranger is told no such call exists (the same as for an unknown id).
    let (status, _) = s.get(&format!("/api/calls/{id}/"), &s.token("carol")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
