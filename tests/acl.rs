//! Every ACL row, both ways, over TCP and over WebSocket, with real MQTT clients.

mod common;

use callbus::auth::Role;
use common::{granted, TestServer, Via, BOTH};
use rumqttc::SubscribeReasonCode;
use serde_json::json;

/// alice, bob and mallory are members of c1; carol is not.
async fn server() -> TestServer {
    let server = TestServer::start().await;
    server.set_members("c1", &["alice", "bob", "mallory"]).await;
    server.set_members("c2", &["carol"]).await;
    server
}

#[tokio::test]
async fn own_notifications_allowed_others_refused() {
    let s = server().await;
    for via in BOTH {
        let mut alice = s.connect(via, "alice").await;
        let codes = alice
            .subscribe(&["users/alice/notifications", "users/bob/notifications"])
            .await;
        assert!(granted(&codes[0]), "{via:?}: own notifications");
        assert_eq!(codes[1], SubscribeReasonCode::Failure, "{via:?}: other's");
        // The allowed subscription works: a refused publish yields an error event on it.
        alice.publish("users/bob/notifications", "{}").await;
        let event = alice.recv().await;
        assert_eq!(event.topic, "users/alice/notifications");
        assert_eq!(event.json()["type"], "error");
        assert_eq!(event.json()["code"], "forbidden");
    }
}

#[tokio::test]
async fn mixed_subscribe_gets_per_filter_codes_and_allowed_filters_work() {
    let s = server().await;
    for via in BOTH {
        let mut alice = s.connect(via, "alice").await;
        let codes = alice
            .subscribe(&[
                "users/alice/notifications",
                "users/bob/notifications",
                "chat/c1",
                "chat/c2",
                "#",
                "chat/+",
                "$SYS/#",
                "other/topic",
            ])
            .await;
        let ok: Vec<bool> = codes.iter().map(granted).collect();
        assert_eq!(
            ok,
            [true, false, true, false, false, false, false, false],
            "{via:?}"
        );
        let mut bob = s.connect(via, "bob").await;
        bob.publish_json("chat/c1", json!({"type": "message", "text": "hi"}))
            .await;
        let got = alice.recv().await;
        assert_eq!(got.topic, "chat/c1");
        assert_eq!(got.json()["text"], "hi");
    }
}

#[tokio::test]
async fn chat_members_publish_and_subscribe_non_members_refused() {
    let s = server().await;
    for via in BOTH {
        let mut bob = s.connect(via, "bob").await;
        assert!(bob
            .subscribe(&["chat/c1", "users/bob/notifications"])
            .await
            .iter()
            .all(granted));
        let mut carol = s.connect(via, "carol").await;
        let codes = carol
            .subscribe(&["chat/c1", "users/carol/notifications"])
            .await;
        assert_eq!(
            codes[0],
            SubscribeReasonCode::Failure,
            "{via:?}: non-member"
        );
        assert!(granted(&codes[1]));

        // Refused: carol writes into c1. She gets an error event; bob gets nothing of it.
        carol
            .publish_json("chat/c1", json!({"type": "message", "text": "intrusion"}))
            .await;
        let err = carol.recv().await.json();
        assert_eq!(err["type"], "error");
        assert_eq!(err["code"], "forbidden");
        assert_eq!(err["ref_type"], "message");

        // Allowed: alice writes into c1. Being published after carol's attempt on the same
        // topic, it is the first thing bob sees only if carol's was delivered nowhere.
        let mut alice = s.connect(via, "alice").await;
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": "hello"}))
            .await;
        let got = bob.recv().await;
        assert_eq!(got.topic, "chat/c1");
        assert_eq!(got.json()["text"], "hello", "{via:?}");
        assert_eq!(got.json()["sender_id"], "alice");
    }
}

#[tokio::test]
async fn nobody_publishes_to_notifications_sys_or_other_topics() {
    let s = server().await;
    for via in BOTH {
        let mut bob = s.connect(via, "bob").await;
        assert!(bob
            .subscribe(&["users/bob/notifications", "chat/c1"])
            .await
            .iter()
            .all(granted));
        let mut ops = s
            .connect_as(via, "ops-dev", "ops", &s.token_with("ops", Role::Admin))
            .await
            .expect("admin connects");
        assert!(ops
            .subscribe(&["other/#", "$SYS/#", "chat/c1"])
            .await
            .iter()
            .all(granted));

        let mut alice = s.connect(via, "alice").await;
        let token = s.token("alice");
        let mut alice_phone = s
            .connect_as(via, "alice-phone", "alice", &token)
            .await
            .expect("second device");
        assert!(granted(
            &alice_phone.subscribe(&["users/alice/notifications"]).await[0]
        ));
        let refused = [
            "users/bob/notifications",
            "users/alice/notifications",
            "$SYS/x",
            "other/topic",
        ];
        for topic in refused {
            alice.publish_json(topic, json!({"type": "message"})).await;
        }
        // One error event per refused publish, on alice's own topic (read by her other device).
        for topic in refused {
            let e = alice_phone.recv().await;
            assert_eq!(e.topic, "users/alice/notifications");
            assert_eq!(e.json()["code"], "forbidden", "{via:?}: {topic}");
            assert_eq!(e.json()["topic"], topic);
        }
        // Fence: an allowed chat message after the refused ones. It is the first delivery to bob
        // and to ops only if none of the refused ones was delivered.
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": "fence"}))
            .await;
        let got = bob.recv().await;
        assert_eq!(got.topic, "chat/c1", "{via:?}: refused publish reached bob");
        assert_eq!(got.json()["text"], "fence");
        let got = ops.recv().await;
        assert_eq!(got.topic, "chat/c1", "{via:?}: refused publish reached ops");
    }
}

#[tokio::test]
async fn admin_reads_everything_and_writes_nothing() {
    let s = server().await;
    for via in BOTH {
        let mut ops = s
            .connect_as(via, "console", "", &s.token_with("ops", Role::Admin))
            .await
            .expect("admin connects");
        let codes = ops
            .subscribe(&["#", "users/+/notifications", "$SYS/#", "$share/g/chat/c1"])
            .await;
        let ok: Vec<bool> = codes.iter().map(granted).collect();
        assert_eq!(ok, [true, true, true, false], "{via:?}");

        let mut alice = s.connect(via, "alice").await;
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": "seen by ops"}))
            .await;
        let got = ops.recv().await;
        assert_eq!(got.topic, "chat/c1");
        assert_eq!(got.json()["text"], "seen by ops");

        // Admin is read-only: its publish is refused with an error event (which it sees, as it
        // reads everything) and the message itself reaches nobody.
        ops.publish_json("chat/c1", json!({"type": "message", "text": "from ops"}))
            .await;
        let got = ops.recv().await;
        assert_eq!(got.topic, "users/ops/notifications", "{via:?}");
        assert_eq!(got.json()["code"], "forbidden");
    }
}

#[tokio::test]
async fn chat_payloads_are_validated_and_stamped() {
    let s = server().await;
    for via in BOTH {
        let mut bob = s.connect(via, "bob").await;
        assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
        let mut mallory = s.connect(via, "mallory").await;
        assert!(granted(
            &mallory.subscribe(&["users/mallory/notifications"]).await[0]
        ));

        for bad in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"text":"no type"}"#,
            br#"{"type":5}"#,
        ] {
            mallory.publish("chat/c1", bad.to_vec()).await;
            let err = mallory.recv().await.json();
            assert_eq!(
                err["code"],
                "bad_payload",
                "{via:?}: {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Mallory claims to be alice; bob sees mallory.
        mallory
            .publish_json(
                "chat/c1",
                json!({"type": "message", "text": "I am alice", "sender_id": "alice",
                       "sender_username": "Alice", "id": "forged", "ts": "1970"}),
            )
            .await;
        let got = bob.recv().await.json();
        assert_eq!(
            got["text"], "I am alice",
            "{via:?}: bad payloads reached bob"
        );
        assert_eq!(got["sender_id"], "mallory");
        assert_eq!(got["sender_username"], "mallory-name");
        assert_ne!(got["id"], "forged");
        assert_ne!(got["ts"], "1970");
    }
}

#[tokio::test]
async fn membership_removal_stops_existing_subscription_at_once() {
    let s = server().await;
    for via in BOTH {
        s.set_members("c1", &["alice", "bob", "mallory"]).await;
        let mut bob = s.connect(via, "bob").await;
        assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
        let mut alice = s.connect(via, "alice").await;
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": "m1"}))
            .await;
        assert_eq!(bob.recv().await.json()["text"], "m1");

        s.set_members("c1", &["alice", "mallory"]).await;
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": "m2"}))
            .await;
        // Bob is refused a new subscription while removed...
        assert_eq!(
            bob.subscribe(&["chat/c1"]).await[0],
            SubscribeReasonCode::Failure
        );
        // ...and, re-added and re-subscribed, his next message is m3: m2 never reached him.
        s.set_members("c1", &["alice", "bob", "mallory"]).await;
        assert!(granted(&bob.subscribe(&["chat/c1"]).await[0]));
        alice
            .publish_json("chat/c1", json!({"type": "message", "text": "m3"}))
            .await;
        assert_eq!(bob.recv().await.json()["text"], "m3", "{via:?}");
    }
}

#[tokio::test]
async fn via_enum_is_exercised() {
    // Guard against BOTH silently shrinking: the suite must run over both transports.
    assert_eq!(BOTH, [Via::Tcp, Via::Ws]);
}
