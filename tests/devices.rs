//! Calls bound to the answering device, and reachability: the receiver's live devices in the
//! 201 from `initiate`; once accepted with a `device_id`, the receiver's other devices may no
//! longer signal for the call (`answered_elsewhere`), and mirrored signaling names the device.

mod common;

use common::{granted, TestServer, Via};
use serde_json::json;

#[tokio::test]
async fn a_call_accepted_on_the_phone_refuses_the_web_tab() {
    let s = TestServer::with_c1().await;
    let mut alice = s.listener(Via::Tcp, "alice").await;
    let subscribe = |mut c: common::Client| async move {
        assert!(granted(&c.subscribe(&["users/bob/notifications"]).await[0]));
        c
    };
    let phone = s.connect_with(Via::Tcp, "bob", "bob-phone", |_| {}).await;
    let mut phone = subscribe(phone.expect("phone")).await;
    let web = s.connect_with(Via::Ws, "bob", "bob-web", |_| {}).await;
    let mut web = subscribe(web.expect("web")).await;

    let (status, call) = s.initiate("alice", json!("bob"), "video").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{call}");
    assert_eq!(call["receiver_devices"], 2);
    assert_eq!(call["push_queued"], false);
    let id = call["id"].as_u64().expect("call id");
    let call_id = id.to_string();

    let offer = json!({"type": "call.offer", "call_id": call_id,
                       "offer": {"type": "offer", "sdp": "v=0"}});
    alice.publish_json("chat/c1", offer).await;
    for device in [&mut phone, &mut web] {
        let offered = device.recv_type("call.offer").await;
        assert_eq!(offered["device_id"], serde_json::Value::Null);
    }

    let (status, accepted) = s
        .act(id, "accept", "bob", json!({"device_id": "bob-phone"}))
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{accepted}");
    assert_eq!(accepted["device_id"], "bob-phone");
    for device in [&mut phone, &mut web] {
        assert_eq!(
            device.recv_type("call.accepted").await["device_id"],
            "bob-phone"
        );
    }

    // The web tab answers too late: refused, and the caller never sees it.
    let answer = |sdp: &str| {
        json!({"type": "call.answer", "call_id": call_id,
               "answer": {"type": "answer", "sdp": sdp}})
    };
    web.publish_json("chat/c1", answer("from-web")).await;
    let refused = web.recv_type("error").await;
    assert_eq!(refused["code"], "answered_elsewhere");
    phone.publish_json("chat/c1", answer("from-phone")).await;
    let answered = alice.recv_type("call.answer").await;
    assert_eq!(answered["answer"]["sdp"], "from-phone");
    assert_eq!(answered["device_id"], "bob-phone");

    // What the caller sends names the device it is for.
    let candidate = json!({"type": "call.candidate", "call_id": call_id,
                           "candidate": {"candidate": "candidate:1", "sdpMid": "0"}});
    alice.publish_json("chat/c1", candidate).await;
    let relayed = phone.recv_type("call.candidate").await;
    assert_eq!(relayed["device_id"], "bob-phone");
}

#[tokio::test]
async fn a_receiver_with_no_live_device_is_reported() {
    let s = TestServer::with_c1().await;
    let (status, call) = s.initiate("alice", json!("carol"), "voice").await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{call}");
    assert_eq!(call["receiver_devices"], 0);
}
