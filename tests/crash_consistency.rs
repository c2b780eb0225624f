//! Crash consistency: twenty times in a row on the same data dir, a burst of concurrent REST
//! changes (initiate, accept, end for many pairs at once) is cut by SIGKILL at a different
//! moment; after each restart every change that got a 2xx is there, and no call is half
//! applied (its record, its state's timestamps and both parties' histories agree). Some
//! receivers hold persistent sessions (phones) through the crashes: each event of an
//! acknowledged change reaches them, and no event comes twice unless marked as a possible
//! redelivery (DUP).

mod common;

use callbus::auth::Role;
use common::process::{spawn_with, token, Proc};
use common::WAIT;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How far a call got with a 2xx: 1 initiated, 2 accepted, 3 ended.
type Acked = Arc<Mutex<Vec<(u64, String, String, u8)>>>;

const PAIRS: usize = 24;
/// Receivers of each round that hold a persistent session.
const PHONES: usize = 4;

/// What a phone received: (event, DUP flag), in order.
type Inbox = Arc<Mutex<Vec<(Value, bool)>>>;

/// Connects `user`'s phone (client id `phone-<user>`, persistent) to `proc` and collects what it
/// receives until the connection ends; subscribes on its first connection.
async fn phone(proc: &Proc, user: &str, inbox: Inbox, first: bool) {
    let mut options = MqttOptions::new(format!("phone-{user}"), "127.0.0.1", proc.mqtt);
    options
        .set_credentials(user, token(user, Role::User))
        .set_clean_session(false);
    let (client, mut events) = AsyncClient::new(options, 10);
    if first {
        let topic = format!("users/{user}/notifications");
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    }
    // Wait for the CONNACK (and the SUBACK: the subscription is then on disk).
    let mut waiting = if first { 2 } else { 1 };
    while waiting > 0 {
        let event = tokio::time::timeout(WAIT, events.poll()).await;
        match event
            .expect("phone connects in time")
            .expect("phone connects")
        {
            Event::Incoming(Packet::ConnAck(ack)) => {
                assert_eq!(ack.session_present, !first, "{user}'s session");
                waiting -= 1;
            }
            Event::Incoming(Packet::SubAck(_)) => waiting -= 1,
            Event::Incoming(Packet::Publish(p)) => record(&inbox, &p),
            _ => {}
        }
    }
    tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                record(&inbox, &p);
            }
        }
    });
}

fn record(inbox: &Inbox, p: &rumqttc::Publish) {
    let event = serde_json::from_slice(&p.payload).unwrap_or_default();
    inbox.lock().unwrap().push((event, p.dup));
}

/// The events a receiver gets for a call acknowledged at `step`, as (type, call id).
fn expected(id: u64, step: u8) -> Vec<(&'static str, String)> {
    let all = [("incoming", 1), ("call.accepted", 2), ("call.end", 3)];
    all.iter()
        .filter(|(_, at)| step >= *at)
        .map(|(kind, _)| (*kind, id.to_string()))
        .collect()
}

/// An event's kind and call: `incoming` for the ring notification.
fn kind(event: &Value) -> (String, String) {
    match event["type"].as_str() {
        Some("notification.created") => {
            let verb = event["payload"]["verb"].as_str().unwrap_or_default();
            let kind = if verb.starts_with("incoming_") {
                "incoming"
            } else {
                verb
            };
            (kind.to_owned(), event["payload"]["id"].to_string())
        }
        other => {
            let call = event["call_id"].as_str().unwrap_or_default();
            (other.unwrap_or_default().to_owned(), call.to_owned())
        }
    }
}

async fn flow(proc: Arc<Proc>, round: usize, i: usize, acked: Acked) {
    let (caller, receiver) = (format!("u{round}x{i}"), format!("v{round}x{i}"));
    let body = json!({"receiver_id": receiver, "call_type": "voice", "conversation_id": format!("c{round}")});
    let path = "/api/calls/initiate/";
    let (status, call) = proc
        .call(Method::POST, path, (&caller, Role::User), Some(body))
        .await;
    let Some(id) = call["id"]
        .as_u64()
        .filter(|_| status == StatusCode::CREATED)
    else {
        return;
    };
    let record = |step| {
        acked
            .lock()
            .unwrap()
            .push((id, caller.clone(), receiver.clone(), step))
    };
    record(1);
    let accept = format!("/api/calls/{id}/accept/");
    let (status, _) = proc
        .call(Method::POST, &accept, (&receiver, Role::User), None)
        .await;
    if status != StatusCode::OK {
        return;
    }
    record(2);
    let end = format!("/api/calls/{id}/end/");
    let (status, _) = proc
        .call(Method::POST, &end, (&caller, Role::User), None)
        .await;
    if status == StatusCode::OK {
        record(3);
    }
}

/// Checks one acknowledged call on a restarted server.
async fn check(proc: &Proc, id: u64, caller: &str, receiver: &str, step: u8) {
    let path = format!("/api/calls/{id}/");
    let (status, call) = proc
        .call(Method::GET, &path, (caller, Role::User), None)
        .await;
    assert_eq!(status, StatusCode::OK, "acknowledged call {id} lost");
    let state = call["status"].as_str().unwrap_or_default();
    let allowed: &[&str] = match step {
        1 => &["ringing", "active", "ended", "cancelled"],
        2 => &["active", "ended"],
        _ => &["ended"],
    };
    assert!(
        allowed.contains(&state),
        "call {id} acknowledged at step {step} is {state}"
    );
    // Nothing half-applied: the timestamps match the state.
    let accepted = !call["accepted_at"].is_null();
    let ended = !call["ended_at"].is_null();
    match state {
        "ringing" => assert!(!accepted && !ended, "{call}"),
        "active" => assert!(accepted && !ended, "{call}"),
        "ended" => assert!(accepted && ended && call["end_reason"] == "ended", "{call}"),
        _ => assert!(ended, "{call}"),
    }
    // Both parties' histories hold it.
    for who in [caller, receiver] {
        let (_, history) = proc
            .call(Method::GET, "/api/calls/?limit=5", (who, Role::User), None)
            .await;
        let ids: Vec<u64> = history["results"]
            .as_array()
            .map(|r| r.iter().filter_map(|c| c["id"].as_u64()).collect())
            .unwrap_or_default();
        assert!(ids.contains(&id), "call {id} missing from {who}'s history");
    }
}

/// Checks what the phones received: every event of an acknowledged change, each made once,
/// and none delivered twice without DUP.
fn check_phones(phones: &HashMap<String, Inbox>, acked: &[(u64, String, String, u8)]) {
    let mut last = HashMap::new();
    for (id, _, receiver, step) in acked {
        last.insert(*id, (receiver.clone(), *step));
    }
    let mut events = 0;
    for (user, inbox) in phones {
        let inbox = inbox.lock().unwrap();
        let mut made: HashMap<(String, String), String> = HashMap::new();
        let mut plain: HashMap<String, usize> = HashMap::new();
        for (event, dup) in inbox.iter() {
            let id = event["id"].as_str().unwrap_or_default().to_owned();
            let made_as = made.entry(kind(event)).or_insert_with(|| id.clone());
            assert_eq!(*made_as, id, "{user}: {:?} made twice", kind(event));
            if !dup {
                *plain.entry(id).or_default() += 1;
            }
        }
        if let Some((id, n)) = plain.iter().find(|(_, n)| **n > 1) {
            panic!("{user} got event {id} {n} times without DUP");
        }
        for (id, (_, step)) in last.iter().filter(|(_, (r, _))| r == user) {
            for (kind, call) in expected(*id, *step) {
                assert!(
                    made.contains_key(&(kind.to_owned(), call.clone())),
                    "{user} never got {kind} of call {id} (acknowledged at step {step})"
                );
                events += 1;
            }
        }
    }
    assert!(events >= 20, "too few phone events were checked: {events}");
}

/// Sends each phone a last notification and waits (bounded) until each has it: whatever was
/// queued for it before has arrived then.
async fn settle(proc: &Proc, phones: &HashMap<String, Inbox>) {
    for user in phones.keys() {
        let body = json!({"user_id": user, "payload": {"last": true}});
        let (status, _) = proc
            .call(
                Method::POST,
                "/api/notifications/",
                ("app", Role::Service),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    for (user, inbox) in phones {
        let arrived = || {
            let inbox = inbox.lock().unwrap();
            inbox.iter().any(|(e, _)| e["payload"]["last"] == true)
        };
        while !arrived() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user}'s phone is behind"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_during_bursts_lose_no_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Acked = Arc::default();
    let mut phones: HashMap<String, Inbox> = HashMap::new();
    let mut checked = 0;
    for round in 0..=20 {
        let proc = Arc::new(spawn_with(dir.path(), &[]).await);
        // Everything acknowledged in earlier rounds is still there, and consistent.
        let earlier = acked.lock().unwrap().clone();
        let mut last = std::collections::HashMap::new();
        for (id, caller, receiver, step) in earlier {
            last.insert(id, (caller, receiver, step));
        }
        for (id, (caller, receiver, step)) in &last {
            check(&proc, *id, caller, receiver, *step).await;
        }
        checked = last.len();
        // The phones come back to the restarted process.
        for (user, inbox) in &phones {
            phone(&proc, user, inbox.clone(), false).await;
        }
        if round == 20 {
            settle(&proc, &phones).await;
            check_phones(&phones, &acked.lock().unwrap());
            break;
        }
        let members: Vec<String> = (0..PAIRS)
            .flat_map(|i| [format!("u{round}x{i}"), format!("v{round}x{i}")])
            .collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        proc.set_members(&format!("c{round}"), &members).await;
        for i in 0..PHONES {
            let (user, inbox) = (format!("v{round}x{i}"), Inbox::default());
            phone(&proc, &user, inbox.clone(), true).await;
            phones.insert(user, inbox);
        }
        let before = acked.lock().unwrap().len();
        let flows: Vec<_> = (0..PAIRS)
            .map(|i| tokio::spawn(flow(proc.clone(), round, i, acked.clone())))
            .collect();
        // Kill at a different point each round: after 1 to 40 more acknowledgements.
        let kill_after = before + 1 + (round * 7) % 40;
        let deadline = tokio::time::Instant::now() + common::WAIT;
        while acked.lock().unwrap().len() < kill_after && tokio::time::Instant::now() < deadline {
            if flows.iter().all(|f| f.is_finished()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let pid = proc.child.id();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        for f in flows {
            let _ = f.await;
        }
    }
    assert!(
        checked >= 20,
        "too few acknowledged calls were checked: {checked}"
    );
}
