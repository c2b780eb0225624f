//! Push hand-off to a real HTTP receiver on loopback: signed, retried with backoff while the
//! receiver fails, in order per call (ringing before stopped), with a stable idempotency key,
//! and durable: a push queued before a SIGKILL is delivered by the restarted callbus.

mod common;

use common::process::spawn_with;
use common::webhook::{next, serve_receiver, PUSH_SECRET};
use common::{TestServer, Via};
use serde_json::{json, Value};

fn valid_signature(signature: &str, body: &str) -> bool {
    let Some((t, v1)) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let unix: u64 = t.parse().unwrap_or(0);
    callbus::push::signature(PUSH_SECRET.as_bytes(), unix, body.as_bytes())
        == format!("t={t},v1={v1}")
}

#[tokio::test]
async fn pushes_are_signed_retried_and_ordered() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let (receiver, mut delivered) = serve_receiver(listener, 2);
    let s = TestServer::start_custom(callbus::config::DEFAULT_CONFIG, |st| {
        st.push = Some(callbus::push::Webhook::new(&url, PUSH_SECRET.as_bytes()).unwrap());
    })
    .await;
    s.set_members("c1", &["alice", "bob"]).await;
    let _bob = s.connect(Via::Tcp, "bob").await;
    let (status, call) = s.initiate("alice", json!("bob"), "video").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{call}");
    assert_eq!(call["push_queued"], true);
    let id = call["id"].as_u64().unwrap();
    let (status, _) = s
        .act(id, "accept", "bob", json!({"device_id": "bob-dev"}))
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);

    let ringing = next(&mut delivered).await;
    assert_eq!(ringing["event"], "call.ringing");
    assert_eq!(ringing["call_id"], id.to_string());
    assert_eq!(ringing["caller_id"], "alice");
    assert_eq!(ringing["receiver_id"], "bob");
    assert_eq!(ringing["call_type"], "video");
    assert_eq!(ringing["conversation_id"], "c1");
    assert_eq!(ringing["receiver_devices"], 1);
    assert!(ringing["ring_deadline"].is_string());
    assert!(ringing.get("offer").is_none() && !ringing.to_string().contains("sdp"));
    let stopped = next(&mut delivered).await;
    assert_eq!(stopped["event"], "call.stopped");
    assert_eq!(stopped["reason"], "accepted");

    let hits = receiver.hits.lock().unwrap().clone();
    let statuses: Vec<u16> = hits.iter().map(|h| h.answered).collect();
    assert_eq!(statuses, [503, 503, 200, 200], "retried, then in order");
    let ringing_key = format!("{id}:call.ringing");
    for hit in &hits[..3] {
        assert_eq!(hit.key, ringing_key, "the same key on every retry");
        assert_eq!(serde_json::from_str::<Value>(&hit.body).unwrap(), ringing);
        assert!(valid_signature(&hit.signature, &hit.body), "{hit:?}");
    }
    assert_eq!(hits[3].key, format!("{id}:call.stopped"));
    assert!(!valid_signature(&hits[3].signature, &hits[0].body));
}

#[tokio::test]
async fn a_push_queued_before_a_crash_is_delivered_after_the_restart() {
    // The receiver is not listening yet: every attempt is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/push");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--push-webhook", &url, "--push-secret", PUSH_SECRET];
    let first = spawn_with(dir.path(), &args).await;
    first.set_members("c1", &["alice", "bob"]).await;
    let call = first.initiate("alice", "bob").await;
    assert_eq!(call["push_queued"], true, "{call}");
    drop(first); // SIGKILL while the push is still undelivered

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (_receiver, mut delivered) = serve_receiver(listener, 0);
    let _second = spawn_with(dir.path(), &args).await;
    let ringing = next(&mut delivered).await;
    assert_eq!(ringing["event"], "call.ringing");
    assert_eq!(ringing["call_id"], call["id"].as_u64().unwrap().to_string());
}
