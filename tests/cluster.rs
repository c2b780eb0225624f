//! Cluster mode with the real engines: three `nats-server`s clustered on loopback ports, a
//! throw-away PostgreSQL, and callbus nodes on them, driven by real MQTT and HTTP clients.

mod common;

use callbus::auth::Role;
use common::cluster::Cluster;
use common::process::Proc;
use common::{granted, Client, Via};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use rumqttc::SubscribeReasonCode;
use serde_json::json;
use std::time::Duration;

async fn notify(node: &Proc, user: &str, n: u64) -> StatusCode {
    let body = json!({"user_id": user, "payload": {"n": n}});
    let app = ("app", Role::Service);
    let (status, _) = node
        .call(Method::POST, "/api/notifications/", app, Some(body))
        .await;
    status
}

async fn put_members(node: &Proc, cid: &str, members: &[&str]) -> (StatusCode, serde_json::Value) {
    let path = format!("/api/conversations/{cid}/");
    let body = json!({ "members": members });
    let app = ("app", Role::Service);
    node.call(Method::PUT, &path, app, Some(body)).await
}

async fn health(node: &Proc) -> StatusCode {
    let url = format!("http://127.0.0.1:{}/healthz", node.http);
    reqwest::get(url).await.expect("healthz").status()
}

/// Waits (bounded) until `node`'s `/healthz` answers `want`.
async fn until_health(node: &Proc, want: StatusCode) {
    for _ in 0..200 {
        if health(node).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("healthz never became {want}");
}

#[test]
fn cluster_and_database_go_together() {
    let exe = env!("CARGO_BIN_EXE_callbus");
    for args in [
        &["--cluster", "nats://127.0.0.1:4222"][..],
        &["--database", "postgres://callbus@127.0.0.1/db"][..],
    ] {
        let out = std::process::Command::new(exe)
            .arg("serve")
            .args(args)
            .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--dev"])
            .output()
            .expect("run callbus");
        assert!(!out.status.success(), "{args:?} alone must not start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--cluster") && err.contains("--database"),
            "{args:?}: {err}"
        );
    }
}

/// alice on node 1 over WebSocket, bob on node 2 over TCP, carol on node 1; REST on node 3.
#[tokio::test]
async fn any_node_serves_any_client_and_membership_holds_everywhere() {
    let cluster = Cluster::start(3).await;
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let (status, _) = put_members(n3, "c1", &["alice", "bob", "carol"]).await;
    assert_eq!(status, StatusCode::CREATED);

    let mut alice = n1.connect(Via::Ws, "alice").await;
    let codes = alice
        .subscribe(&["users/alice/notifications", "chat/c1", "chat/c2"])
        .await;
    assert!(granted(&codes[0]) && granted(&codes[1]));
    assert_eq!(codes[2], SubscribeReasonCode::Failure, "not a member of c2");
    let mut bob = n2.connect(Via::Tcp, "bob").await;
    let codes = bob
        .subscribe(&[
            "users/bob/notifications",
            "users/alice/notifications",
            "chat/c1",
        ])
        .await;
    assert!(granted(&codes[0]) && granted(&codes[2]));
    assert_eq!(codes[1], SubscribeReasonCode::Failure, "someone else's");
    let mut carol = n1.connect(Via::Tcp, "carol").await;
    assert!(granted(&carol.subscribe(&["chat/c1"]).await[0]));

    // A notification made on node 3 reaches alice on node 1.
    assert_eq!(notify(n3, "alice", 1).await, StatusCode::ACCEPTED);
    let got = alice.recv().await;
    assert_eq!(got.topic, "users/alice/notifications");
    assert_eq!(got.json()["type"], "notification.created");
    assert_eq!(got.json()["payload"]["n"], 1);

    // Chat from node 2 to node 1, stamped with the sender on node 2.
    let hello = json!({"type": "message", "text": "hello", "sender_id": "alice"});
    bob.publish_json("chat/c1", hello).await;
    for who in [&mut alice, &mut carol] {
        let got = who.recv().await;
        assert_eq!(got.topic, "chat/c1");
        assert_eq!(got.json()["text"], "hello");
        assert_eq!(got.json()["sender_id"], "bob", "stamped, not forged");
    }
    assert_eq!(bob.recv().await.json()["text"], "hello", "own echo");

    // Interest, not broadcast: node 3 has no sessions and received nothing from the bus.
    assert_eq!(n3.metric("callbus_cluster_received_total").await, 0);
    assert_eq!(n3.metric("callbus_cluster_interest").await, 0);
    assert_eq!(n1.metric("callbus_cluster_interest").await, 2);

    // Node 3 removes alice: by the time the PUT answers, node 1 has cut her off.
    let (status, conv) = put_members(n3, "c1", &["bob", "carol"]).await;
    assert_eq!(status, StatusCode::OK, "{conv}");
    bob.publish_json("chat/c1", json!({"type": "message", "text": "after"}))
        .await;
    assert_eq!(carol.recv().await.json()["text"], "after");
    // carol got it on node 1 in the same routing step as alice would have; what alice gets
    // next is the notification sent after, not the chat message.
    assert_eq!(notify(n3, "alice", 2).await, StatusCode::ACCEPTED);
    let next = alice.recv().await;
    assert_eq!(next.topic, "users/alice/notifications");
    assert_eq!(next.json()["payload"]["n"], 2);
    // And node 1 refuses her writes to c1 now.
    alice
        .publish_json("chat/c1", json!({"type": "message", "text": "let me in"}))
        .await;
    let refused = alice.recv_type("error").await;
    assert_eq!(refused["code"], "forbidden");
    // The conversation reads the same from every node.
    for node in [n1, n2, n3] {
        let (status, conv) = node
            .call(
                Method::GET,
                "/api/conversations/c1/",
                ("app", Role::Service),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(conv["members"], json!(["bob", "carol"]));
    }
}

/// Sends notifications to `user` through `node` until `client` receives one (bounded: a
/// message published while a node is between NATS servers may be lost).
async fn until_notified(node: &Proc, user: &str, client: &mut Client) {
    for n in 100..200 {
        assert_eq!(notify(node, user, n).await, StatusCode::ACCEPTED);
        let wait = tokio::time::timeout(Duration::from_millis(200), client.recv());
        if let Ok(got) = wait.await {
            assert_eq!(got.json()["type"], "notification.created");
            return;
        }
    }
    panic!("no notification reached {user}");
}

#[tokio::test]
async fn losing_a_nats_server_or_the_database_for_a_while_is_survived() {
    let mut cluster = Cluster::start(2).await;
    let mut alice = cluster.node(0).connect(Via::Tcp, "alice").await;
    assert!(granted(
        &alice.subscribe(&["users/alice/notifications"]).await[0]
    ));

    // Node 1's NATS server dies: node 1 moves to another and alice keeps getting messages.
    cluster.nats.kill(0);
    until_notified(cluster.node(1), "alice", &mut alice).await;
    until_health(cluster.node(0), StatusCode::OK).await;

    // PostgreSQL stops: changes that need it answer 503 with a clear error, health says not
    // ready, and what does not need it (relaying) goes on.
    cluster.pg.stop().expect("stop postgres");
    let (status, body) = put_members(cluster.node(1), "c9", &["alice"]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("database")));
    until_health(cluster.node(1), StatusCode::SERVICE_UNAVAILABLE).await;
    until_notified(cluster.node(1), "alice", &mut alice).await;

    // It comes back (after its crash recovery): so does everything, by itself.
    cluster.pg.resume().await.expect("restart postgres");
    until_health(cluster.node(1), StatusCode::OK).await;
    let (status, body) = put_members(cluster.node(1), "c9", &["alice"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(granted(&alice.subscribe(&["chat/c9"]).await[0]));
}

async fn act(node: &Proc, id: u64, verb: &str, who: &str) -> (StatusCode, serde_json::Value) {
    let path = format!("/api/calls/{id}/{verb}/");
    let body = Some(json!({}));
    node.call(Method::POST, &path, (who, Role::User), body)
        .await
}

async fn initiate(node: &Proc, caller: &str, receiver: &str) -> (StatusCode, serde_json::Value) {
    let body = json!({"receiver_id": receiver, "call_type": "voice", "conversation_id": "c1"});
    let who = (caller, Role::User);
    let path = "/api/calls/initiate/";
    node.call(Method::POST, path, who, Some(body)).await
}

/// The next message of JSON type `kind` on `topic`.
async fn next_on(client: &mut Client, topic: &str, kind: &str) -> serde_json::Value {
    loop {
        let m = client.recv().await;
        if m.topic == topic && m.json()["type"] == kind {
            return m.json();
        }
    }
}

#[tokio::test]
async fn a_whole_call_with_each_party_and_the_rest_api_on_a_different_node() {
    let cluster = Cluster::start(3).await;
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    put_members(n3, "c1", &["alice", "bob"]).await;
    let (alice_n, bob_n) = ("users/alice/notifications", "users/bob/notifications");
    let mut alice = n1.connect(Via::Ws, "alice").await;
    assert!(granted(&alice.subscribe(&[alice_n]).await[0]));
    let mut bob = n2.connect(Via::Tcp, "bob").await;
    assert!(bob.subscribe(&[bob_n, "chat/c1"]).await.iter().all(granted));

    let (status, call) = initiate(n3, "alice", "bob").await;
    assert_eq!(status, StatusCode::CREATED, "{call}");
    let id = call["id"].as_u64().expect("call id");
    let ring = next_on(&mut bob, bob_n, "notification.created").await;
    assert_eq!(ring["payload"]["verb"], "incoming_voice_call");

    // The offer from node 1 is checked there against the call node 3 created.
    let offer = json!({"type": "call.offer", "call_id": id.to_string(),
                       "offer": {"type": "offer", "sdp": "v=0 offer"}});
    alice.publish_json("chat/c1", offer).await;
    let o = next_on(&mut bob, bob_n, "call.offer").await;
    assert_eq!(o["caller_id"], "alice");
    assert_eq!(o["offer"]["sdp"], "v=0 offer");

    // Accepted on node 2; the answer right after is checked on node 2 against the new state.
    let (status, accepted) = act(n2, id, "accept", "bob").await;
    assert_eq!(status, StatusCode::OK, "{accepted}");
    assert_eq!(accepted["status"], "active");
    next_on(&mut alice, alice_n, "call.accepted").await;
    let answer = json!({"type": "call.answer", "call_id": id,
                        "answer": {"type": "answer", "sdp": "v=0 answer"}});
    bob.publish_json("chat/c1", answer).await;
    let a = next_on(&mut alice, alice_n, "call.answer").await;
    assert_eq!(a["receiver_id"], "bob");
    assert_eq!(a["answer"]["sdp"], "v=0 answer");

    // Trickle ICE both ways.
    let candidate = |n: u64| {
        json!({"type": "call.candidate", "call_id": id.to_string(),
               "candidate": {"candidate": format!("candidate:{n} 1 udp 1 127.0.0.1 4000{n} typ host"),
                             "sdpMid": "0", "sdpMLineIndex": 0}})
    };
    alice.publish_json("chat/c1", candidate(1)).await;
    bob.publish_json("chat/c1", candidate(2)).await;
    assert_eq!(
        next_on(&mut bob, bob_n, "call.candidate").await["sender_id"],
        "alice"
    );
    assert_eq!(
        next_on(&mut alice, alice_n, "call.candidate").await["sender_id"],
        "bob"
    );

    // alice renegotiates from node 1; her tablet on node 3 may not answer her own offer
    // (node 3 heard who sent it), bob on node 2 may.
    let reoffer = json!({"type": "call.offer", "call_id": id.to_string(),
                         "offer": {"type": "offer", "sdp": "v=0 offer 2"}});
    alice.publish_json("chat/c1", reoffer).await;
    assert_eq!(
        next_on(&mut bob, bob_n, "call.offer").await["offer"]["sdp"],
        "v=0 offer 2"
    );
    let mut tablet = n3
        .connect_with(Via::Tcp, "alice", "alice-tablet", |_| {})
        .await;
    assert!(granted(&tablet.subscribe(&[alice_n]).await[0]));
    let reanswer = |sdp: &str| json!({"type": "call.answer", "call_id": id, "answer": {"type": "answer", "sdp": sdp}});
    tablet.publish_json("chat/c1", reanswer("v=0 own")).await;
    let err = next_on(&mut tablet, alice_n, "error").await;
    assert_eq!(err["code"], "wrong_state", "{err}");
    bob.publish_json("chat/c1", reanswer("v=0 answer 2")).await;
    let a = next_on(&mut alice, alice_n, "call.answer").await;
    assert_eq!(a["answer"]["sdp"], "v=0 answer 2");

    // Ended on node 1: bob hears it, every node reads it, node 2 refuses late signaling.
    let (status, ended) = act(n1, id, "end", "alice").await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    let end = next_on(&mut bob, bob_n, "call.end").await;
    assert_eq!(end["reason"], "ended");
    let path = format!("/api/calls/{id}/");
    let (status, got) = n3.call(Method::GET, &path, ("bob", Role::User), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["status"], "ended");
    let (_, history) = n2
        .call(Method::GET, "/api/calls/", ("bob", Role::User), None)
        .await;
    assert_eq!(history["results"][0]["id"], id);
    bob.publish_json("chat/c1", candidate(3)).await;
    let err = next_on(&mut bob, bob_n, "error").await;
    assert_eq!(err["code"], "wrong_state", "{err}");
}

#[tokio::test]
async fn busy_glare_and_the_ring_timeout_hold_across_nodes() {
    let cluster = Cluster::start_with(3, &["--ring-timeout", "1"]).await;
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let everyone = ["alice", "bob", "carol", "dave", "erin", "frank", "gina"];
    put_members(n3, "c1", &everyone).await;

    // Glare: alice and bob call each other at once on two nodes; exactly one call exists.
    for round in 0..5 {
        let (a, b) = tokio::join!(initiate(n1, "alice", "bob"), initiate(n2, "bob", "alice"));
        let created: Vec<_> = [&a, &b]
            .into_iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .collect();
        assert_eq!(created.len(), 1, "round {round}: {a:?} {b:?}");
        let loser = if a.0 == StatusCode::CREATED { &b } else { &a };
        assert_eq!(loser.0, StatusCode::CONFLICT, "round {round}: {loser:?}");
        let call = &created[0].1;
        let id = call["id"].as_u64().expect("id");
        let caller = call["caller"]["id"].as_str().expect("caller").to_owned();
        assert_eq!(act(n3, id, "end", &caller).await.0, StatusCode::OK);
    }

    // Busy: carol and erin call dave at once on two nodes; one rings, one is told busy.
    let (c, e) = tokio::join!(initiate(n3, "carol", "dave"), initiate(n1, "erin", "dave"));
    let statuses = [c.0, e.0];
    assert!(
        statuses.contains(&StatusCode::CREATED) && statuses.contains(&StatusCode::CONFLICT),
        "{c:?} {e:?}"
    );

    // The ring timeout fires once, wherever the call was made.
    let gina_n = "users/gina/notifications";
    let mut gina = n2.connect(Via::Tcp, "gina").await;
    assert!(granted(&gina.subscribe(&[gina_n]).await[0]));
    let (status, call) = initiate(n1, "frank", "gina").await;
    assert_eq!(status, StatusCode::CREATED);
    let id = call["id"].as_u64().expect("id");
    let end = next_on(&mut gina, gina_n, "call.end").await;
    assert_eq!(end["reason"], "missed");
    // After the marker sent now, nothing about the call may come twice.
    assert_eq!(notify(n3, "gina", 7).await, StatusCode::ACCEPTED);
    let mut ends = 1;
    loop {
        let m = gina.recv().await.json();
        if m["payload"]["n"] == 7 {
            break;
        }
        ends += usize::from(m["type"] == "call.end");
    }
    assert_eq!(ends, 1, "one call.end for the missed call");
    let path = format!("/api/calls/{id}/");
    let (_, got) = n3
        .call(Method::GET, &path, ("gina", Role::User), None)
        .await;
    assert_eq!(got["status"], "missed");
}

#[tokio::test]
async fn a_client_id_moves_between_nodes_and_a_call_survives_its_node() {
    let mut cluster = Cluster::start(3).await;
    put_members(cluster.node(2), "c1", &["alice", "bob"]).await;
    let (alice_n, bob_n) = ("users/alice/notifications", "users/bob/notifications");

    // alice's phone moves from node 1 to node 2 under the same client id: node 1 lets go.
    let mut old = cluster.node(0).connect(Via::Tcp, "alice").await;
    assert!(granted(&old.subscribe(&[alice_n]).await[0]));
    let mut alice = cluster.node(1).connect(Via::Ws, "alice").await;
    assert!(old.closed().await, "the older connection is replaced");
    assert!(granted(&alice.subscribe(&[alice_n]).await[0]));
    assert_eq!(
        notify(cluster.node(2), "alice", 1).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        next_on(&mut alice, alice_n, "notification.created").await["payload"]["n"],
        1
    );

    // bob is on node 1 when the call starts; node 1 dies mid-call.
    let mut bob = cluster.node(0).connect(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&[bob_n]).await[0]));
    let (status, call) = initiate(cluster.node(2), "alice", "bob").await;
    assert_eq!(status, StatusCode::CREATED, "{call}");
    let id = call["id"].as_u64().expect("id");
    next_on(&mut bob, bob_n, "notification.created").await;
    assert_eq!(
        act(cluster.node(0), id, "accept", "bob").await.0,
        StatusCode::OK
    );
    next_on(&mut alice, alice_n, "call.accepted").await;
    cluster.nodes[0].child.kill().expect("SIGKILL node 1");
    // (bob's own call.accepted may come first.)
    let mut gone = false;
    for _ in 0..3 {
        gone = bob.closed().await;
        if gone {
            break;
        }
    }
    assert!(gone, "bob's node is gone");

    // bob comes back through node 3: the call is still active and goes on.
    let mut bob = cluster.node(2).connect(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&[bob_n]).await[0]));
    let path = format!("/api/calls/{id}/");
    let (_, got) = cluster
        .node(2)
        .call(Method::GET, &path, ("bob", Role::User), None)
        .await;
    assert_eq!(got["status"], "active");
    let candidate = json!({"type": "call.candidate", "call_id": id.to_string(),
        "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 40001 typ host",
                      "sdpMid": "0", "sdpMLineIndex": 0}});
    alice.publish_json("chat/c1", candidate).await;
    assert_eq!(
        next_on(&mut bob, bob_n, "call.candidate").await["sender_id"],
        "alice"
    );
    assert_eq!(
        act(cluster.node(2), id, "end", "bob").await.0,
        StatusCode::OK
    );
    assert_eq!(
        next_on(&mut alice, alice_n, "call.end").await["reason"],
        "ended"
    );
}

/// A node that dies after a change is committed but before its events are published leaves
/// them in the outbox (what the dead node left is written here as it would be): another node
/// announces them, once.
#[tokio::test]
async fn events_a_dead_node_left_in_the_outbox_are_announced_once() {
    let cluster = Cluster::start(2).await;
    put_members(cluster.node(0), "c1", &["alice", "bob"]).await;
    let bob_n = "users/bob/notifications";
    let mut bob = cluster.node(1).connect(Via::Tcp, "bob").await;
    assert!(granted(&bob.subscribe(&[bob_n]).await[0]));
    let (status, call) = initiate(cluster.node(0), "alice", "bob").await;
    assert_eq!(status, StatusCode::CREATED);
    let id = call["id"].as_u64().expect("id");
    next_on(&mut bob, bob_n, "notification.created").await;
    assert_eq!(sql(&cluster.pg, "SELECT count(*) FROM call_events"), "0");

    let left = r#"{"type":"call.test","id":"left-behind"}"#;
    sql(
        &cluster.pg,
        &format!(
            "INSERT INTO call_events (call_id, user_id, payload, created_at)
         VALUES ({id}, 'bob', '{left}', now() - interval '1 minute')"
        ),
    );
    assert_eq!(
        next_on(&mut bob, bob_n, "call.test").await["id"],
        "left-behind"
    );
    // Published, then deleted under the call's lock: nobody can publish it again.
    for _ in 0..100 {
        if sql(&cluster.pg, "SELECT count(*) FROM call_events") == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sql(&cluster.pg, "SELECT count(*) FROM call_events"), "0");
    assert_eq!(
        notify(cluster.node(0), "bob", 9).await,
        StatusCode::ACCEPTED
    );
    let next = bob.recv().await.json();
    assert_eq!(next["payload"]["n"], 9, "once: {next}");
}

/// Who is connected is asked of every node: the receiver's devices in the 201, and whether an
/// active call has lost both parties.
#[tokio::test]
async fn presence_counts_every_node() {
    let cluster = Cluster::start_with(3, &["--call-lost-grace", "1"]).await;
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    put_members(n3, "c1", &["alice", "bob"]).await;
    let alice = n1.connect(Via::Ws, "alice").await;
    let bob = n2.connect(Via::Tcp, "bob").await;
    let (status, call) = initiate(n3, "alice", "bob").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(call["receiver_devices"], 1, "bob is on node 2: {call}");
    let id = call["id"].as_u64().expect("id");
    assert_eq!(act(n3, id, "accept", "bob").await.0, StatusCode::OK);

    // No node holds both parties, and node 3 neither: three grace periods later the call is
    // still on, since each node asks the others.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let path = format!("/api/calls/{id}/");
    let (_, got) = n3.call(Method::GET, &path, ("bob", Role::User), None).await;
    assert_eq!(got["status"], "active", "{got}");

    // Both leave: the call ends by itself.
    drop((alice, bob));
    for _ in 0..200 {
        let (_, got) = n3.call(Method::GET, &path, ("bob", Role::User), None).await;
        if got["status"] != "active" {
            assert_eq!(got["end_reason"], "connection_lost", "{got}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the call outlived both parties");
}

fn sql(pg: &common::cluster::Postgres, sql: &str) -> String {
    pg.sql(sql).expect("psql")
}

/// Ends a connection with DISCONNECT and waits for callbus to close it.
async fn leave(mut client: Client) {
    client.client.disconnect().await.expect("DISCONNECT");
    assert!(client.closed().await, "a message came instead of the close");
}

fn persistent(options: &mut rumqttc::MqttOptions) {
    options.set_clean_session(false);
}

/// bob's phone: a persistent session subscribed to his notifications through `node`, then
/// away.
async fn phone_away(node: &Proc) {
    let mut phone = node
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(!phone.session_present);
    let topic = "users/bob/notifications";
    assert!(granted(&phone.subscribe(&[topic]).await[0]));
    leave(phone).await;
}

/// Notifies bob of each of `numbers` through `node`.
async fn notify_bob(node: &Proc, numbers: std::ops::Range<u64>) {
    for n in numbers {
        assert_eq!(notify(node, "bob", n).await, StatusCode::ACCEPTED);
    }
}

/// A phone's persistent session (`clean_session = 0`) lives in the cluster, not on a node: it
/// resumes on another node with what was published meanwhile, and a delivery left
/// unacknowledged on a node that is then killed comes again on the next one.
#[tokio::test]
async fn a_persistent_session_resumes_on_another_node_with_nothing_lost() {
    let mut cluster = Cluster::start(3).await;

    // Subscribed through node 1, then away.
    phone_away(cluster.node(0)).await;
    notify_bob(cluster.node(2), 0..3).await;

    // Back through node 2 over WebSocket, with no SUBSCRIBE: what was published meanwhile,
    // in order, then live traffic.
    let mut phone = (cluster.node(1))
        .connect_with(Via::Ws, "bob", "phone", persistent)
        .await;
    assert!(phone.session_present, "the session was not found on node 2");
    assert_eq!(
        notify(cluster.node(2), "bob", 3).await,
        StatusCode::ACCEPTED
    );
    for n in 0..4 {
        let got = phone.recv().await;
        assert_eq!(got.qos, rumqttc::QoS::AtLeastOnce);
        assert_eq!(got.json()["payload"]["n"], n);
    }
    // Its queue brought them; the bus carried no second copy to node 2.
    let carried = cluster
        .node(1)
        .metric("callbus_cluster_received_total")
        .await;
    assert_eq!(carried, 0);
    leave(phone).await;

    // On node 2 a delivery is left unacknowledged; node 2 is killed.
    let mut phone = (cluster.node(1))
        .connect_with(Via::Tcp, "bob", "phone", |o| {
            persistent(o);
            o.set_manual_acks(true);
        })
        .await;
    assert!(phone.session_present);
    assert_eq!(
        notify(cluster.node(2), "bob", 4).await,
        StatusCode::ACCEPTED
    );
    assert_eq!(phone.recv().await.json()["payload"]["n"], 4);
    cluster.nodes[1].child.kill().expect("SIGKILL node 2");
    assert!(phone.closed().await, "node 2 is gone");
    assert_eq!(
        notify(cluster.node(2), "bob", 5).await,
        StatusCode::ACCEPTED
    );

    // Node 3: the unacknowledged one again, then what came while the phone was away.
    let mut phone = (cluster.node(2))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(phone.session_present);
    assert_eq!(phone.recv().await.json()["payload"]["n"], 4);
    assert_eq!(phone.recv().await.json()["payload"]["n"], 5);
    leave(phone).await;

    // A clean connection discards the session, wherever it is next looked for.
    let clean = cluster
        .node(0)
        .connect_with(Via::Tcp, "bob", "phone", |_| {})
        .await;
    assert!(!clean.session_present);
    leave(clean).await;
    let phone = (cluster.node(2))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(!phone.session_present, "the discarded session came back");
}

/// A persistent session resumed on another node is checked against membership again: a
/// conversation its user was removed from while away is not resumed, so nothing queued for it
/// comes, even once the user is a member again and subscribes anew.
#[tokio::test]
async fn a_resumed_session_is_checked_against_membership_again() {
    let cluster = Cluster::start(2).await;
    let (chat, mine) = ("chat/c1", "users/bob/notifications");
    put_members(cluster.node(0), "c1", &["alice", "bob"]).await;
    let mut phone = (cluster.node(0))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    let granted_all = phone.subscribe(&[chat, mine]).await;
    assert!(granted_all.iter().all(granted), "{granted_all:?}");
    leave(phone).await;

    let mut alice = cluster.node(1).connect(Via::Tcp, "alice").await;
    let text = |n: u64| json!({"type": "chat.message", "text": format!("m{n}")});
    alice.publish_json(chat, text(1)).await;
    put_members(cluster.node(1), "c1", &["alice"]).await;
    alice.publish_json(chat, text(2)).await;
    put_members(cluster.node(1), "c1", &["alice", "bob"]).await;
    alice.publish_json(chat, text(3)).await;
    assert_eq!(
        notify(cluster.node(1), "bob", 1).await,
        StatusCode::ACCEPTED
    );

    let mut phone = (cluster.node(1))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(phone.session_present);
    let got = phone.recv().await;
    assert_eq!(
        (got.topic.as_str(), got.json()["payload"]["n"].as_u64()),
        (mine, Some(1))
    );
    // Subscribed anew: only what is published from now on.
    assert!(granted(&phone.subscribe(&[chat]).await[0]));
    alice.publish_json(chat, text(4)).await;
    let got = phone.recv().await;
    assert_eq!(got.topic, chat);
    assert_eq!(got.json()["text"], "m4", "an old message of c1 was resumed");
}

/// Push jobs are written with the call change in PostgreSQL and taken by any node's worker: a
/// job whose node dies while the webhook still refuses it is delivered by another node, before
/// the call's next job.
#[tokio::test]
async fn a_push_job_outlives_its_node() {
    use common::webhook::{next, serve_receiver, PUSH_SECRET};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let (receiver, mut delivered) = serve_receiver(listener, usize::MAX);
    let push = ["--push-webhook", &url, "--push-secret", PUSH_SECRET];
    let mut cluster = Cluster::start_with(1, &push).await;
    put_members(cluster.node(0), "c1", &["alice", "bob"]).await;
    let (status, call) = initiate(cluster.node(0), "alice", "bob").await;
    assert_eq!(status, StatusCode::CREATED, "{call}");
    assert_eq!(call["push_queued"], true);
    let id = call["id"].as_u64().expect("id");
    tokio::time::timeout(common::WAIT, receiver.attempted.notified())
        .await
        .expect("node 1 tries to push");
    cluster.nodes[0].child.kill().expect("SIGKILL node 1");

    cluster.add_node(&push).await;
    let (status, body) = act(cluster.node(1), id, "accept", "bob").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    receiver.fail.store(0, std::sync::atomic::Ordering::SeqCst);
    let ringing = next(&mut delivered).await;
    assert_eq!(ringing["event"], "call.ringing");
    assert_eq!(ringing["call_id"], id.to_string());
    let stopped = next(&mut delivered).await;
    assert_eq!(stopped["event"], "call.stopped");
    assert_eq!(stopped["reason"], "accepted");
}

/// Deletes every consumer of the bus's stream (a NATS server's disk lost, as far as the
/// sessions' queues can tell); how many there were.
async fn lose_every_queue(cluster: &Cluster) -> usize {
    let stream = callbus_stream(cluster).await;
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|name| async move { name.ok() })
        .collect()
        .await;
    for name in &names {
        stream.delete_consumer(name).await.expect("delete");
    }
    names.len()
}

/// A NATS client of the first NATS server.
async fn first_nats(cluster: &Cluster) -> async_nats::Client {
    let url = cluster.nats.urls_from(0);
    let first = url.split(',').next().expect("a NATS URL");
    async_nats::connect(first).await.expect("NATS")
}

/// The cluster's JetStream stream, seen from the first NATS server.
async fn callbus_stream(cluster: &Cluster) -> async_nats::jetstream::stream::Stream {
    let stream = async_nats::jetstream::new(first_nats(cluster).await)
        .get_stream("CALLBUS")
        .await
        .expect("the stream");
    stream
}

/// Waits (at most 30 s) until the stream has `n` consumers: the nodes bound their sessions'
/// queues again.
async fn queues_bound(cluster: &Cluster, n: usize) {
    let stream = callbus_stream(cluster).await;
    for _ in 0..300 {
        let names: Vec<String> = stream
            .consumer_names()
            .filter_map(|name| async move { name.ok() })
            .collect()
            .await;
        if names.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the queues were not bound again within 30 s");
}

/// Waits for notification `n`, skipping older ones sent again (a lost queue is replayed from a
/// little before the loss: duplicates, never a gap).
async fn until_numbered(client: &mut Client, n: u64) {
    for _ in 0..20 {
        let got = client.recv().await.json();
        let k = got["payload"]["n"].as_u64().expect("numbered");
        if k == n {
            return;
        }
        assert!(k < n, "{k} came before {n}");
    }
    panic!("notification {n} never came");
}

/// A persistent session's queues are JetStream consumers; if one is lost (deleted), the
/// session is replayed from the stream instead, whether it is away (from a little before its
/// client left) or live (from a little before the loss).
#[tokio::test]
async fn a_lost_queue_is_replayed_from_the_stream() {
    let cluster = Cluster::start(2).await;
    phone_away(cluster.node(0)).await;
    notify_bob(cluster.node(1), 0..2).await;
    assert_eq!(lose_every_queue(&cluster).await, 1);

    let mut phone = (cluster.node(1))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(phone.session_present);
    until_numbered(&mut phone, 0).await;
    until_numbered(&mut phone, 1).await;

    // Lost while the phone is connected: it goes on receiving. (The node notices at once when
    // NATS tells the pull that the consumer was deleted, and otherwise after two missed idle
    // heartbeats, 10 s: on a loaded machine that is longer than a client's wait, so the test
    // waits for the queue to be bound again before it waits for the message.)
    assert_eq!(lose_every_queue(&cluster).await, 1);
    assert_eq!(
        notify(cluster.node(0), "bob", 2).await,
        StatusCode::ACCEPTED
    );
    queues_bound(&cluster, 1).await;
    until_numbered(&mut phone, 2).await;
}

/// A persistent session's queue in the cluster is bounded as on one node: a phone back after
/// long gets the newest messages, told first how many older ones were dropped.
#[tokio::test]
async fn the_queue_bound_holds_in_the_cluster() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("callbus.toml");
    let config =
        callbus::config::DEFAULT_CONFIG.replace("queue_messages = 1000", "queue_messages = 5");
    std::fs::write(&path, config).expect("config");
    let path = path.to_str().expect("UTF-8 path");
    let cluster = Cluster::start_with(2, &["--config", path]).await;
    phone_away(cluster.node(0)).await;
    const SENT: u64 = 30;
    notify_bob(cluster.node(1), 0..SENT).await; // each answered once the stream holds it
    let mut phone = (cluster.node(1))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    let overflow = phone.recv().await.json();
    assert_eq!(overflow["code"], "queue_overflow", "{overflow}");
    assert!(
        overflow["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("25 ")),
        "{overflow}"
    );
    for n in SENT - 5..SENT {
        assert_eq!(phone.recv().await.json()["payload"]["n"], n);
    }
}

/// A node started while its database is down (or still starting: a fresh container, crash
/// recovery) waits for it instead of exiting.
#[tokio::test]
async fn a_node_waits_for_its_database() {
    let mut cluster = Cluster::start(0).await;
    cluster.pg.stop().expect("stop postgres");
    let dir = tempfile::tempdir().expect("temp dir");
    let (nats, database) = (cluster.nats.urls_from(0), cluster.pg.url());
    let args = [
        "--cluster",
        &nats,
        "--database",
        &database,
        "--node-id",
        "n1",
    ];
    let pg = &mut cluster.pg;
    let (node, resumed) = tokio::join!(common::process::spawn_with(dir.path(), &args), async {
        // The database comes up a second after the node.
        tokio::time::sleep(Duration::from_secs(1)).await;
        pg.resume().await
    });
    resumed.expect("restart postgres");
    let (status, body) = put_members(&node, "c1", &["alice"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A chat message relayed while the stream elects a new leader (the NATS server that led it is
/// lost) is still kept for a phone that is away: a QoS 1 PUBLISH is acknowledged only once the
/// stream has stored it.
#[tokio::test]
async fn relayed_messages_are_kept_through_the_loss_of_the_streams_leader() {
    let mut cluster = Cluster::start(3).await;
    let (status, body) = put_members(cluster.node(0), "c1", &["alice", "bob"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut phone = (cluster.node(0))
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(granted(&phone.subscribe(&["chat/c1"]).await[0]));
    leave(phone).await;

    // The stream's leader is lost, not the server that keeps the phone's queue (that loss is
    // `a_lost_queue_is_replayed_from_the_stream`'s); alice's node prefers another server.
    let lost = stream_leader_apart_from_the_queue(&cluster).await;
    let near = (lost + 1) % 3;
    let mut alice = cluster.node(near).connect(Via::Tcp, "alice").await;
    cluster.nats.kill(lost);
    for n in 0..30 {
        let text = json!({"type": "message", "text": n.to_string()});
        alice.publish_json("chat/c1", text).await;
    }

    // Every one of them waits for the phone, in order. (Resuming needs JetStream's API, which
    // may still be electing its own leader: a phone whose CONNACK does not come in time (5 s)
    // tries again, as phones do.)
    let mut attempts = 0;
    let mut phone = loop {
        let node = cluster.node(near);
        match node
            .try_connect_with(Via::Tcp, "bob", "phone", persistent)
            .await
        {
            Ok(phone) => break phone,
            Err(_) if attempts < 3 => attempts += 1,
            Err(e) => panic!("the phone could not resume: {e:?}"),
        }
    };
    assert!(phone.session_present);
    for n in 0..30 {
        let got = phone.recv().await.json();
        assert_eq!(got["text"], n.to_string(), "{got}");
    }
}

/// The number of the NATS server leading the stream, once that is not the server keeping the
/// (one) consumer: the stream's leader is asked to step down until it is not.
async fn stream_leader_apart_from_the_queue(cluster: &Cluster) -> usize {
    let mut stream = callbus_stream(cluster).await;
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|name| async move { name.ok() })
        .collect()
        .await;
    assert_eq!(names.len(), 1, "one queue: {names:?}");
    let queue = stream
        .consumer_info(&names[0])
        .await
        .expect("consumer info");
    let keeper = queue.cluster.clone().and_then(|c| c.leader);
    let client = first_nats(cluster).await;
    for _ in 0..100 {
        let info = stream.info().await.expect("stream info");
        let leader = info.cluster.clone().and_then(|c| c.leader);
        match leader {
            Some(leader) if Some(&leader) != keeper.as_ref() => {
                return leader.trim_start_matches("nats-").parse().expect("nats-N");
            }
            Some(_) => {
                let stepdown = "$JS.API.STREAM.LEADER.STEPDOWN.CALLBUS";
                client
                    .request(stepdown, "".into())
                    .await
                    .expect("step down");
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the stream's leader stayed with the queue");
}

/// A publication JetStream was given twice (callbus sends one again, without a Nats-Msg-Id,
/// when the stream's answer is lost in a failover) reaches each session once: live, and from
/// a persistent session's queue.
#[tokio::test]
async fn a_publication_stored_twice_reaches_a_session_once() {
    let cluster = Cluster::start(1).await;
    let node = cluster.node(0);
    phone_away(node).await;
    let mut laptop = node.connect(Via::Tcp, "bob").await;
    assert!(granted(
        &laptop.subscribe(&["users/bob/notifications"]).await[0]
    ));
    notify_bob(node, 0..1).await;
    assert_eq!(laptop.recv().await.json()["payload"]["n"], 0);

    // The stream's last message is that notification: it is stored again, byte for byte.
    let jetstream = async_nats::jetstream::new(first_nats(&cluster).await);
    let mut stream = jetstream.get_stream("CALLBUS").await.expect("the stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let copy = stream
        .get_raw_message(last)
        .await
        .expect("the last message");
    assert!(
        copy.payload.windows(5).any(|w| w == br#""n":0"#),
        "not the notification"
    );
    let again = jetstream.publish(copy.subject.clone(), copy.payload.clone());
    again.await.expect("publish").await.expect("stored");
    assert_eq!(
        stream.info().await.expect("info").state.last_sequence,
        last + 1
    );

    notify_bob(node, 1..2).await;
    assert_eq!(
        laptop.recv().await.json()["payload"]["n"],
        1,
        "live: the copy came"
    );
    let mut phone = node
        .connect_with(Via::Tcp, "bob", "phone", persistent)
        .await;
    assert!(phone.session_present);
    assert_eq!(phone.recv().await.json()["payload"]["n"], 0);
    assert_eq!(
        phone.recv().await.json()["payload"]["n"],
        1,
        "queued: the copy came"
    );
}
