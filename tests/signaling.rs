//! The signaling bridge with real MQTT clients: the seed's checklist, identity, privacy,
//! renegotiation, ordering and refusals.

mod common;

use common::{granted, Client, TestServer, Via, BOTH};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn server() -> TestServer {
    let s = TestServer::start().await;
    s.set_members("c1", &["alice", "bob", "carol", "mallory"])
        .await;
    s
}

async fn client(s: &TestServer, via: Via, user: &str, topics: &[&str]) -> Client {
    let mut c = s.connect(via, user).await;
    if !topics.is_empty() {
        assert!(
            c.subscribe(topics).await.iter().all(granted),
            "{user} {topics:?}"
        );
    }
    c
}

async fn ring(s: &TestServer, caller: &str, receiver: &str, call_type: &str) -> u64 {
    let (status, call) = s
        .post(
            "/api/calls/initiate/",
            &s.token(caller),
            json!({"receiver_id": receiver, "call_type": call_type, "conversation_id": "c1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{call}");
    call["id"].as_u64().unwrap()
}

fn offer(call: u64, sdp: &str) -> Value {
    json!({"type": "call.offer", "call_id": call.to_string(), "offer": {"type": "offer", "sdp": sdp}})
}

fn answer(call: u64, sdp: &str) -> Value {
    json!({"type": "call.answer", "call_id": call, "answer": {"type": "answer", "sdp": sdp}})
}

fn candidate(call: u64, n: usize) -> Value {
    json!({"type": "call.candidate", "call_id": call.to_string(),
           "candidate": {"candidate": format!("candidate:{n} 1 udp 1 127.0.0.1 {} typ host", 40000 + n),
                         "sdpMid": "0", "sdpMLineIndex": 0}})
}

/// Next message on `topic` (others skipped).
async fn on(c: &mut Client, topic: &str) -> Value {
    loop {
        let m = c.recv().await;
        if m.topic == topic {
            return m.json();
        }
    }
}

/// The whole flow for one placement of the two parties. `alice_chat`/`bob_chat`: whether each
/// is on the chat page (subscribed to chat/c1) besides their notifications.
async fn whole_call(s: &TestServer, via: Via, call_type: &str, alice_chat: bool, bob_chat: bool) {
    let topics = |user: &'static str, chat: bool| -> Vec<&'static str> {
        let n = if user == "alice" {
            "users/alice/notifications"
        } else {
            "users/bob/notifications"
        };
        if chat {
            vec![n, "chat/c1"]
        } else {
            vec![n]
        }
    };
    let mut alice = client(s, via, "alice", &topics("alice", alice_chat)).await;
    let mut bob = client(s, via, "bob", &topics("bob", bob_chat)).await;
    let call = ring(s, "alice", "bob", call_type).await;
    let n = on(&mut bob, "users/bob/notifications").await;
    assert_eq!(n["payload"]["verb"], format!("incoming_{call_type}_call"));

    alice
        .publish_json("chat/c1", offer(call, "v=0 offer"))
        .await;
    // The offer reaches bob on his notifications topic and, if he is on the chat page, on
    // chat/c1 too, with the same id.
    let mut copies = Vec::new();
    while copies.len() < 1 + usize::from(bob_chat) {
        let m = bob.recv().await;
        if m.json()["type"] == "call.offer" {
            copies.push((m.topic.clone(), m.json()));
        }
    }
    let o = copies
        .iter()
        .find(|(t, _)| t == "users/bob/notifications")
        .expect("notification copy")
        .1
        .clone();
    assert_eq!(o["call_id"], call.to_string());
    assert_eq!(o["caller_id"], "alice");
    assert_eq!(o["caller_username"], "alice-name");
    assert_eq!(o["call_type"], call_type);
    assert_eq!(o["conversation_id"], "c1");
    assert_eq!(o["offer"]["sdp"], "v=0 offer");
    if bob_chat {
        let copy = &copies
            .iter()
            .find(|(t, _)| t == "chat/c1")
            .expect("chat copy")
            .1;
        assert_eq!(copy["id"], o["id"], "same id on both copies");
    }

    let (status, _) = s.act(call, "accept", "bob", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    bob.publish_json("chat/c1", answer(call, "v=0 answer"))
        .await;
    let a = loop {
        let v = on(&mut alice, "users/alice/notifications").await;
        if v["type"] == "call.answer" {
            break v;
        }
    };
    assert_eq!(a["receiver_id"], "bob");
    assert_eq!(a["answer"]["sdp"], "v=0 answer");

    // Trickle ICE both ways.
    alice.publish_json("chat/c1", candidate(call, 1)).await;
    bob.publish_json("chat/c1", candidate(call, 2)).await;
    let c = loop {
        let v = on(&mut bob, "users/bob/notifications").await;
        if v["type"] == "call.candidate" {
            break v;
        }
    };
    assert_eq!(c["sender_id"], "alice");
    assert!(c["candidate"]["candidate"]
        .as_str()
        .unwrap()
        .starts_with("candidate:1 "));
    let c = on(&mut alice, "users/alice/notifications").await;
    assert_eq!(c["type"], "call.candidate");
    assert_eq!(c["sender_id"], "bob");

    // Ending reaches the other party wherever they are, with the duration recorded.
    let (status, ended) = s.act(call, "end", "bob", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ended["duration_seconds"].is_u64());
    let e = on(&mut alice, "users/alice/notifications").await;
    assert_eq!(e["type"], "call.end");
    assert_eq!(e["reason"], "ended");
    assert_eq!(e["duration_seconds"], ended["duration_seconds"]);

    // Signaling for an ended call is refused.
    alice.publish_json("chat/c1", candidate(call, 3)).await;
    let err = on(&mut alice, "users/alice/notifications").await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "wrong_state");
    assert_eq!(err["ref_type"], "call.candidate");
    assert_eq!(err["call_id"], call.to_string());
}

#[tokio::test]
async fn seed_checklist_over_both_transports() {
    let s = server().await;
    for via in BOTH {
        for call_type in ["voice", "video"] {
            whole_call(&s, via, call_type, true, true).await; // both on the chat page
            whole_call(&s, via, call_type, true, false).await; // callee elsewhere
            whole_call(&s, via, call_type, false, false).await; // both elsewhere
        }
    }
}

#[tokio::test]
async fn mallory_cannot_pose_as_alice() {
    let s = server().await;
    let mut bob = client(&s, Via::Tcp, "bob", &["users/bob/notifications"]).await;
    let mut mallory = client(&s, Via::Ws, "mallory", &["users/mallory/notifications"]).await;
    let call = ring(&s, "mallory", "bob", "voice").await;
    let mut forged = offer(call, "sdp");
    forged["caller_id"] = json!("alice");
    forged["caller_username"] = json!("Alice");
    forged["sender_id"] = json!("alice");
    mallory.publish_json("chat/c1", forged).await;
    let o = loop {
        let v = on(&mut bob, "users/bob/notifications").await;
        if v["type"] == "call.offer" {
            break v;
        }
    };
    assert_eq!(o["caller_id"], "mallory");
    assert_eq!(o["sender_id"], "mallory");
    assert_eq!(o["caller_username"], "mallory-name");
    // Mallory cannot signal into alice's call either.
    let alices = ring(&s, "alice", "carol", "voice").await;
    mallory.publish_json("chat/c1", offer(alices, "evil")).await;
    let err = on(&mut mallory, "users/mallory/notifications").await;
    assert_eq!(err["code"], "not_a_party");
}

#[tokio::test]
async fn a_third_member_can_neither_inject_into_nor_read_a_call() {
    let s = server().await;
    let mut alice = client(
        &s,
        Via::Tcp,
        "alice",
        &["users/alice/notifications", "chat/c1"],
    )
    .await;
    let mut bob = client(&s, Via::Ws, "bob", &["users/bob/notifications", "chat/c1"]).await;
    let mut carol = client(
        &s,
        Via::Tcp,
        "carol",
        &["users/carol/notifications", "chat/c1"],
    )
    .await;
    let call = ring(&s, "alice", "bob", "video").await;

    // Carol injects: refused with not_a_party, delivered nowhere.
    carol.publish_json("chat/c1", offer(call, "evil")).await;
    carol.publish_json("chat/c1", candidate(call, 9)).await;
    for _ in 0..2 {
        let err = on(&mut carol, "users/carol/notifications").await;
        assert_eq!(err["code"], "not_a_party");
    }
    // Alice's real offer and a plain chat message after it: carol, on chat/c1, sees only the
    // message; bob sees the offer first.
    alice.publish_json("chat/c1", offer(call, "real")).await;
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": "calling you"}))
        .await;
    let first = on(&mut carol, "chat/c1").await;
    assert_eq!(
        first["type"], "message",
        "carol read the call's signaling: {first}"
    );
    let first = on(&mut bob, "chat/c1").await;
    assert_eq!(first["type"], "call.offer");
    assert_eq!(
        first["offer"]["sdp"], "real",
        "carol's injection reached bob"
    );
    let _ = alice.recv().await;
}

#[tokio::test]
async fn refusals_carry_their_codes() {
    let s = server().await;
    s.set_members("c2", &["alice", "bob"]).await;
    let mut alice = client(&s, Via::Tcp, "alice", &["users/alice/notifications"]).await;
    let mut bob = client(&s, Via::Tcp, "bob", &["users/bob/notifications"]).await;
    let call = ring(&s, "alice", "bob", "voice").await;
    let _incoming = on(&mut bob, "users/bob/notifications").await;
    let cases = [
        ("chat/c1", offer(999_999, "x"), "call_not_found"),
        (
            "chat/c1",
            json!({"type": "call.offer", "call_id": "nope", "offer": {"type": "offer", "sdp": "x"}}),
            "call_not_found",
        ),
        ("chat/c2", offer(call, "x"), "call_not_found"),
        (
            "chat/c1",
            json!({"type": "call.offer", "call_id": call}),
            "bad_payload",
        ),
        (
            "chat/c1",
            json!({"type": "call.answer", "call_id": call, "answer": {"type": "offer", "sdp": "x"}}),
            "bad_payload",
        ),
        (
            "chat/c1",
            json!({"type": "call.candidate", "call_id": call, "candidate": "x"}),
            "bad_payload",
        ),
        (
            "chat/c1",
            json!({"type": "call.hangup", "call_id": call}),
            "bad_payload",
        ),
        ("chat/c1", answer(call, "x"), "wrong_state"), // the caller cannot answer its own offer
    ];
    for (topic, msg, code) in cases {
        alice.publish_json(topic, msg.clone()).await;
        let err = on(&mut alice, "users/alice/notifications").await;
        assert_eq!(err["code"], code, "{msg}");
        assert_eq!(err["type"], "error");
    }
    // Bob offering before accepting is refused too; none of the above reached him: his next
    // message is the valid offer.
    bob.publish_json("chat/c1", offer(call, "early")).await;
    assert_eq!(
        on(&mut bob, "users/bob/notifications").await["code"],
        "wrong_state"
    );
    alice.publish_json("chat/c1", offer(call, "valid")).await;
    let next = on(&mut bob, "users/bob/notifications").await;
    assert_eq!(next["offer"]["sdp"], "valid");
}

#[tokio::test]
async fn renegotiation_during_an_active_call() {
    let s = server().await;
    let mut alice = client(&s, Via::Ws, "alice", &["users/alice/notifications"]).await;
    let mut bob = client(&s, Via::Tcp, "bob", &["users/bob/notifications"]).await;
    let call = ring(&s, "alice", "bob", "video").await;
    alice.publish_json("chat/c1", offer(call, "o1")).await;
    s.act(call, "accept", "bob", json!({})).await;
    bob.publish_json("chat/c1", answer(call, "a1")).await;
    // Bob starts screen sharing: he offers, alice answers.
    bob.publish_json("chat/c1", offer(call, "o2-screen")).await;
    let o = loop {
        let v = on(&mut alice, "users/alice/notifications").await;
        if v["type"] == "call.offer" {
            break v;
        }
    };
    assert_eq!(o["offer"]["sdp"], "o2-screen");
    assert_eq!(o["caller_id"], "bob");
    alice.publish_json("chat/c1", answer(call, "a2")).await;
    let a = loop {
        let v = on(&mut bob, "users/bob/notifications").await;
        if v["type"] == "call.answer" {
            break v;
        }
    };
    assert_eq!(a["answer"]["sdp"], "a2");
    assert_eq!(a["receiver_id"], "alice");
}

#[tokio::test]
async fn qos1_signaling_arrives_in_order_on_both_copies() {
    let s = server().await;
    let alice = client(&s, Via::Tcp, "alice", &[]).await;
    let mut bob = client(&s, Via::Ws, "bob", &["users/bob/notifications", "chat/c1"]).await;
    let call = ring(&s, "alice", "bob", "video").await;
    const N: usize = 100;
    // Publish without waiting for each PUBACK, as a browser trickling candidates does.
    for n in 0..N {
        alice
            .client
            .publish(
                "chat/c1",
                rumqttc::QoS::AtLeastOnce,
                false,
                candidate(call, n).to_string(),
            )
            .await
            .unwrap();
    }
    let (mut on_chat, mut on_notes) = (Vec::new(), Vec::new());
    while on_chat.len() < N || on_notes.len() < N {
        let m = bob.recv().await;
        let v = m.json();
        if v["type"] != "call.candidate" {
            continue;
        }
        let text = v["candidate"]["candidate"].as_str().unwrap().to_owned();
        let n: usize = text["candidate:".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if m.topic == "chat/c1" {
            on_chat.push(n)
        } else {
            on_notes.push(n)
        }
    }
    let expected: Vec<usize> = (0..N).collect();
    assert_eq!(on_chat, expected);
    assert_eq!(on_notes, expected);
}
