//! "2xx means on disk": SIGKILL the real binary during a burst of concurrent initiates, restart
//! it on the same data dir, and find every acknowledged call; ringing calls whose timeout passed
//! while it was down are missed at startup and announced.

mod common;

use callbus::auth::{Authenticator, Role};
use common::process::{spawn_with, token, Proc, SECRET};
use common::{granted, WAIT};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

async fn spawn(dir: &Path, ring_timeout: u64) -> Proc {
    spawn_with(dir, &["--ring-timeout", &ring_timeout.to_string()]).await
}

/// Starts `n` concurrent initiates (caller u{i} → receiver v{i}), SIGKILLs the server as soon as
/// `kill_after` of them were acknowledged, and returns the acknowledged (id, caller) pairs.
async fn burst_then_kill(proc: &mut Proc, n: usize, kill_after: usize) -> Vec<(u64, String)> {
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", proc.http);
    let members: Vec<String> = (0..n)
        .flat_map(|i| [format!("u{i}"), format!("v{i}")])
        .collect();
    let resp = client
        .put(format!("{base}/api/conversations/c1/"))
        .bearer_auth(token("app", Role::Service))
        .json(&json!({ "members": members }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..n {
        let (client, base, tx) = (client.clone(), base.clone(), tx.clone());
        tokio::spawn(async move {
            let caller = format!("u{i}");
            let resp = client
                .post(format!("{base}/api/calls/initiate/"))
                .bearer_auth(token(&caller, Role::User))
                .json(&json!({"receiver_id": format!("v{i}"), "call_type": "voice", "conversation_id": "c1"}))
                .send()
                .await;
            let acked = match resp {
                Ok(r) if r.status() == StatusCode::CREATED => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["id"].as_u64())
                    .map(|id| (id, caller)),
                _ => None,
            };
            let _ = tx.send(acked);
        });
    }
    drop(tx);
    let mut acked = Vec::new();
    let mut killed = false;
    while let Some(result) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("responses")
    {
        if let Some(pair) = result {
            acked.push(pair);
        }
        if !killed && acked.len() >= kill_after {
            proc.child.kill().expect("SIGKILL");
            killed = true;
        }
    }
    assert!(killed, "the burst ended before the kill");
    let _ = proc.child.wait();
    acked
}

#[tokio::test]
async fn every_acknowledged_call_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn(dir.path(), 600).await;
    let acked = burst_then_kill(&mut first, 200, 20).await;
    assert!(acked.len() >= 20);
    drop(first);

    let second = spawn(dir.path(), 600).await;
    let client = reqwest::Client::new();
    for (id, caller) in &acked {
        let resp = client
            .get(format!("http://127.0.0.1:{}/api/calls/{id}/", second.http))
            .bearer_auth(token(caller, Role::User))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "acknowledged call {id} lost");
        let call: Value = resp.json().await.unwrap();
        assert_eq!(call["status"], "ringing");
        assert_eq!(call["caller"]["id"], caller.as_str());
    }
    // The conversation written before the burst survived too.
    let resp = client
        .get(format!(
            "http://127.0.0.1:{}/api/conversations/c1/",
            second.http
        ))
        .bearer_auth(token("app", Role::Service))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn calls_whose_ring_timeout_passed_while_down_are_missed_and_announced() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn(dir.path(), 1).await;
    let acked = burst_then_kill(&mut first, 20, 5).await;
    drop(first);
    // Let every ring deadline pass while the server is down (ring timeout is 1 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let second = spawn(dir.path(), 600).await;
    let (id, caller) = acked[0].clone();
    let receiver = caller.replacen('u', "v", 1);
    // The receiver's device reconnects and resubscribes, as clients do after a restart.
    let mut options = rumqttc::MqttOptions::new("dev", "127.0.0.1", second.mqtt);
    options.set_credentials("", token(&receiver, Role::User));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe(
            format!("users/{receiver}/notifications"),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();

    let http = reqwest::Client::new();
    let call: Value = http
        .get(format!("http://127.0.0.1:{}/api/calls/{id}/", second.http))
        .bearer_auth(token(&caller, Role::User))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(call["status"], "missed", "{call}");

    let announced = tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                    assert!(granted(&ack.return_codes[0]));
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap();
                    if v["type"] == "call.end"
                        && v["call_id"].as_str() == Some(id.to_string().as_str())
                    {
                        return v;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
    })
    .await
    .expect("missed call announced");
    assert_eq!(announced["reason"], "missed");
}

#[tokio::test]
async fn a_call_left_active_when_callbus_dies_ends_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_with(dir.path(), &["--call-lost-grace", "3600"]).await;
    first.set_members("c1", &["alice", "bob"]).await;
    let id = first.initiate("alice", "bob").await["id"]
        .as_u64()
        .expect("call id");
    let accept = format!("/api/calls/{id}/accept/");
    let (status, _) = first
        .call(reqwest::Method::POST, &accept, ("bob", Role::User), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    drop(first); // SIGKILL with the call active; nobody reconnects

    let second = spawn_with(dir.path(), &["--call-lost-grace", "1"]).await;
    let call = second.until_not_active(id, "alice").await;
    assert_eq!(call["status"], "ended");
    assert_eq!(call["end_reason"], "connection_lost");
}

#[test]
fn dev_mode_refuses_non_loopback_addresses_and_serve_needs_a_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_callbus"))
        .args([
            "serve",
            "--dev",
            "--http",
            "0.0.0.0:0",
            "--mqtt",
            "127.0.0.1:0",
        ])
        .env_remove("CALLBUS_JWT_SECRET")
        .output()
        .expect("run callbus");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_callbus"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("CALLBUS_JWT_SECRET")
        .output()
        .expect("run callbus");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CALLBUS_JWT_SECRET"));
}

#[test]
fn token_subcommand_signs_with_the_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_callbus"))
        .args([
            "token",
            "--sub",
            "ops",
            "--role",
            "admin",
            "--username",
            "Ops",
        ])
        .env("CALLBUS_JWT_SECRET", SECRET)
        .output()
        .expect("run callbus");
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let id = Authenticator::new(SECRET.as_bytes())
        .verify(token.trim())
        .unwrap();
    assert_eq!((id.user_id(), id.role), ("ops", Role::Admin));
    assert_eq!(id.username(), "Ops");
}
