//! Disk full: with the data dir on an 8 MiB tmpfs (root only: CI runs as root), callbus fills
//! it with acknowledged changes up to its free-space reserve; from then on changes get 503 with
//! an error and nothing applied, reads and MQTT relaying go on, nothing panics; when space
//! returns, changes are taken again without a restart; and after a restart every acknowledged
//! change is there.

mod common;

use callbus::auth::Role;
use common::process::{spawn_with, token, Proc};
use common::WAIT;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// A size-limited tmpfs, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let options = format!("size={size}");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(dir.path())
            .status();
        mounted.is_ok_and(|s| s.success()).then_some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Members of conversation `i`: enough of them that each PUT writes about 10 KB.
fn members(i: usize) -> Vec<String> {
    (0..400).map(|m| format!("member-{i:04}-{m:016}")).collect()
}

async fn put(proc: &Proc, i: usize) -> (StatusCode, serde_json::Value) {
    let path = format!("/api/conversations/big{i}/");
    let body = json!({ "members": members(i) });
    proc.call(Method::PUT, &path, ("app", Role::Service), Some(body))
        .await
}

async fn mqtt(proc: &Proc, user: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(format!("{user}-dev"), "127.0.0.1", proc.mqtt);
    options.set_credentials(user, token(user, Role::User));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe("chat/c1", QoS::AtLeastOnce).await.unwrap();
    loop {
        let event = tokio::time::timeout(WAIT, events.poll()).await;
        if let Event::Incoming(Packet::SubAck(_)) = event.expect("SUBACK in time").unwrap() {
            return (client, events);
        }
    }
}

/// Sends a chat message from `a` and waits (bounded) until `b` has it.
async fn relays(a: &AsyncClient, b: &mut EventLoop, text: &str) {
    let body = json!({"type": "chat.message", "text": text}).to_string();
    a.publish("chat/c1", QoS::AtLeastOnce, false, body)
        .await
        .unwrap();
    loop {
        let event = tokio::time::timeout(WAIT, b.poll()).await;
        if let Event::Incoming(Packet::Publish(p)) = event.expect("relayed in time").unwrap() {
            if String::from_utf8_lossy(&p.payload).contains(text) {
                return;
            }
        }
    }
}

/// Writes `path` until the filesystem has no byte left.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![7u8; 4096];
    while file.write_all(&block).is_ok() {}
    while file.write_all(&block[..1]).is_ok() {}
}

async fn poll_quietly(mut events: EventLoop) {
    while events.poll().await.is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_changes_keeps_relaying_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("8m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    // 3 MiB of someone else's data, freed later: the space that returns.
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![1u8; 3 << 20]).unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("callbus.toml");
    let text = callbus::config::DEFAULT_CONFIG
        .replace("min_free_bytes = 67108864", "min_free_bytes = 2097152");
    std::fs::write(&config, text).unwrap();
    let config = config.to_string_lossy().into_owned();
    let data = fs.path().join("data");
    let args = ["--config", config.as_str()];
    let mut proc = spawn_with(&data, &args).await;

    proc.set_members("c1", &["ann", "bob"]).await;
    let (ann, ann_events) = mqtt(&proc, "ann").await;
    tokio::spawn(poll_quietly(ann_events));
    let (_bob, mut bob_events) = mqtt(&proc, "bob").await;

    // callbus's own writes fill the disk up to its reserve, then changes are refused.
    let mut acked = Vec::new();
    let refused = loop {
        assert!(acked.len() < 2000, "the disk never filled");
        let (status, body) = put(&proc, acked.len()).await;
        match status {
            StatusCode::OK | StatusCode::CREATED => acked.push(acked.len()),
            StatusCode::SERVICE_UNAVAILABLE => break body,
            other => panic!("PUT answered {other}: {body}"),
        }
    };
    assert!(acked.len() >= 10, "only {} changes fit", acked.len());
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("full"),
        "{refused}"
    );
    assert_eq!(proc.metric("callbus_storage_full").await, 1);

    // While full: every change is refused and not applied; reads and MQTT go on.
    let next = acked.len();
    let body = json!({"receiver_id": "bob", "call_type": "voice", "conversation_id": "c1"});
    let (status, _) = proc
        .call(
            Method::POST,
            "/api/calls/initiate/",
            ("ann", Role::User),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = proc
        .call(Method::GET, "/api/calls/", ("ann", Role::User), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, history) = proc
        .call(Method::GET, "/api/calls/", ("ann", Role::User), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["results"], json!([]), "a refused call was made");
    let path = format!("/api/conversations/big{next}/");
    let (status, _) = proc
        .call(Method::GET, &path, ("app", Role::Service), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused PUT was applied");
    relays(&ann, &mut bob_events, "while the disk is full").await;
    assert!(proc.metric("callbus_storage_refused_total").await >= 2);

    // Space returns: changes are taken again, with no restart.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = put(&proc, next).await;
    assert!(status.is_success(), "after space returned: {status} {body}");
    acked.push(next);
    assert_eq!(proc.metric("callbus_storage_full").await, 0);
    relays(&ann, &mut bob_events, "after space returned").await;

    // Something else fills the disk to the last byte: the same, and sled never sees it.
    let hog = fs.path().join("hog");
    fill(&hog);
    let (status, body) = put(&proc, next + 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    relays(&ann, &mut bob_events, "with the disk at 100%").await;
    std::fs::remove_file(&hog).unwrap();
    let (status, body) = put(&proc, next + 1).await;
    assert!(status.is_success(), "after the hog left: {status} {body}");
    acked.push(next + 1);
    assert!(proc.child.try_wait().unwrap().is_none(), "callbus exited");

    // After a crash and a restart, every acknowledged change is there.
    drop(proc);
    let proc = spawn_with(&data, &args).await;
    for i in acked {
        let path = format!("/api/conversations/big{i}/");
        let (status, body) = proc
            .call(Method::GET, &path, ("app", Role::Service), None)
            .await;
        assert_eq!(status, StatusCode::OK, "acknowledged conversation {i} lost");
        assert_eq!(body["members"], json!(members(i)), "conversation {i}");
    }
}
