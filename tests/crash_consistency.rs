//! Crash consistency: twenty times in a row on the same data dir, a burst of concurrent REST
//! changes (initiate, accept, end for many pairs at once) is cut by SIGKILL at a different
//! moment; after each restart every change that got a 2xx is there, and no call is half
//! applied (its record, its state's timestamps and both parties' histories agree).

mod common;

use callbus::auth::Role;
use common::process::{spawn_with, Proc};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::{Arc, Mutex};

/// How far a call got with a 2xx: 1 initiated, 2 accepted, 3 ended.
type Acked = Arc<Mutex<Vec<(u64, String, String, u8)>>>;

const PAIRS: usize = 24;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_during_bursts_lose_no_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Acked = Arc::default();
    let mut checked = 0;
    for round in 0..20 {
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
        let members: Vec<String> = (0..PAIRS)
            .flat_map(|i| [format!("u{round}x{i}"), format!("v{round}x{i}")])
            .collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        proc.set_members(&format!("c{round}"), &members).await;
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
