//! `PUT/GET /api/conversations/{cid}/` over real HTTP: roles, validation, durability on disk.

mod common;

use callbus::auth::Role;
use common::TestServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn put(s: &TestServer, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let resp = s
        .http_client
        .put(s.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get(s: &TestServer, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = s.http_client.get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn service_manages_members_members_read() {
    let s = TestServer::start().await;
    let service = s.token_with("app", Role::Service);
    // Integer ids (Django) and strings are both accepted and normalised to strings.
    let (status, body) = put(
        &s,
        "/api/conversations/7/",
        &service,
        json!({"members": [1, "2"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["members"], json!(["1", "2"]));
    // Without the trailing slash too; replacing answers 200.
    let (status, _) = put(
        &s,
        "/api/conversations/7",
        &service,
        json!({"members": [1, 3]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = get(&s, "/api/conversations/7/", Some(&s.token("3"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["members"], json!(["1", "3"]));
    assert_eq!(
        get(&s, "/api/conversations/7", Some(&service)).await.0,
        StatusCode::OK
    );
    // Removed member and outsiders: 404, as for an unknown one (no existence probe). No
    // token: 401.
    let (status, body) = get(&s, "/api/conversations/7/", Some(&s.token("2"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    assert_eq!(
        get(&s, "/api/conversations/8/", Some(&service)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s, "/api/conversations/7/", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&s, "/api/conversations/7/", Some("Bearer-garbage"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn only_the_service_role_writes_and_bad_input_stores_nothing() {
    let s = TestServer::start().await;
    let service = s.token_with("app", Role::Service);
    for token in [s.token("1"), s.token_with("ops", Role::Admin)] {
        let (status, body) = put(
            &s,
            "/api/conversations/9/",
            &token,
            json!({"members": ["1"]}),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body["error"].is_string());
    }
    let bad_bodies = [
        json!({"members": ["a/b"]}),
        json!({"members": [1.5]}),
        json!({"members": [-1]}),
        json!({"members": "1"}),
        json!({}),
        json!({"members": [], "extra": 1}),
    ];
    for body in bad_bodies {
        let (status, reply) = put(&s, "/api/conversations/9/", &service, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(reply["error"].is_string(), "{body}");
    }
    let (status, _) = put(
        &s,
        "/api/conversations/bad.id/",
        &service,
        json!({"members": []}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Not JSON at all, and a body over the limit.
    let resp = s
        .http_client
        .put(s.url("/api/conversations/9/"))
        .bearer_auth(&service)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let huge = json!({"members": vec!["x"; 40_000]});
    let (status, reply) = put(&s, "/api/conversations/9/", &service, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply["error"].is_string());
    // Nothing was stored by any of it.
    assert_eq!(
        get(&s, "/api/conversations/9/", Some(&service)).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn unknown_paths_answer_json_404() {
    let s = TestServer::start().await;
    let (status, body) = get(&s, "/api/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    assert_eq!(get(&s, "/healthz", None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let s = TestServer::start().await;
    let value = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let before = s
        .http_client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut alice = s.connect(common::Via::Tcp, "alice").await;
    alice.publish("users/bob/notifications", "{}").await;
    let resp = s.http_client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let after = resp.text().await.unwrap();
    assert!(after.contains("# TYPE callbus_mqtt_connections_open gauge"));
    for name in [
        "callbus_mqtt_connections_total",
        "callbus_mqtt_publishes_refused_total",
    ] {
        assert!(
            value(&after, name) > value(&before, name),
            "{name} did not grow"
        );
    }
    assert!(value(&after, "callbus_mqtt_connections_open") >= 1);
}
