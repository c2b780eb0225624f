//! Out of file descriptors is a defined state: with its limit lowered (prlimit) and more
//! clients than descriptors, the real callbus binary refuses the extra connections without
//! spinning, counts it in /metrics, keeps admitted sessions delivering, and accepts again (MQTT
//! and HTTP) once descriptors are free.

mod common;

use common::process::{mqtt, next, spawn_via, spawn_with};
use common::raw::{cpu_seconds, open_files};
use common::WAIT;
use rumqttc::{Packet, QoS};
use std::process::Command;
use std::time::Duration;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_refuses_calmly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let proc = spawn_with(dir.path(), &[]).await;
    let pid = proc.child.id();
    proc.set_members("c1", &["alice", "bob"]).await;
    let (alice, mut alice_events) = mqtt(&proc, "alice").await.expect("alice connects");
    alice.subscribe("chat/c1", QoS::AtLeastOnce).await.unwrap();
    next(&mut alice_events, |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    let (bob, mut bob_events) = mqtt(&proc, "bob").await.expect("bob connects");
    tokio::spawn(async move { while bob_events.poll().await.is_ok() {} });
    // A kept-alive HTTP connection to read /metrics through while no new one is accepted.
    let http = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{}/metrics", proc.http);
    assert!(http
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .status()
        .is_success());

    // Leave callbus 20 descriptors of headroom, then open far more connections than that.
    let limit = open_files(pid) + 20;
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(TcpStream::connect(("127.0.0.1", proc.mqtt)).await.unwrap());
    }
    let counted = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("callbus_accepts_out_of_files_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if counted(&text) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ran out: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // No busy loop while the limit holds: a second of it costs little CPU.
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_seconds(pid) - before;
    assert!(
        spent < 0.3,
        "spent {spent:.2} s of CPU in one second at the limit"
    );

    // Admitted sessions go on.
    let msg = serde_json::json!({"type": "message", "text": "still here"}).to_string();
    bob.publish("chat/c1", QoS::AtLeastOnce, false, msg)
        .await
        .unwrap();
    let payload = next(&mut alice_events, |p| match p {
        Packet::Publish(p) => Some(p.payload),
        _ => None,
    })
    .await;
    let got: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(got["text"], "still here");

    // Descriptors come back: MQTT and HTTP accept again.
    drop(flood);
    let deadline = tokio::time::Instant::now() + WAIT;
    let carol = loop {
        match mqtt(&proc, "carol").await {
            Ok(carol) => break carol,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "no recovery: {e}"),
        }
    };
    drop(carol);
    let fresh = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{}/healthz", proc.http);
    assert!(fresh
        .get(&health)
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
}

#[tokio::test]
async fn callbus_raises_its_soft_open_file_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = ["prlimit", "--nofile=1024:4096", "--"];
    let proc = spawn_via(&wrapper, dir.path(), &[]).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proc.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
}
