//! The REST API's service endpoints end to end: the main app's notifications, TURN credentials,
//! development tokens and CORS.

mod common;

use callbus::auth::Role;
use common::{TestServer, Via};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn service_pushes_its_own_notifications() {
    let s = TestServer::with_c1().await;
    let mut bob = s.listener(Via::Ws, "bob").await;
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
    let plain = TestServer::with_c1().await;
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
    let s = TestServer::with_c1().await;
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
    assert_eq!((id.user_id(), id.username()), ("zed", "Zed"));
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
