//! Persistent sessions: N phones (MQTT over TCP, `clean_session = 0`) subscribe and go away;
//! M notifications per phone are published while they are away; then all come back at once.
//! Server memory per stored session (with its queue) and the time until every phone has
//! replayed everything, against a separate callbus process.

use callbus::auth::{Authenticator, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

use crate::conns::{rss_kib, spawn_callbus, SECRET};

/// Connects phone `i` with a persistent session; its events go to `tx` until it ends.
async fn phone(
    mqtt: u16,
    auth: &Authenticator,
    i: usize,
    tx: mpsc::UnboundedSender<(usize, Packet)>,
) -> anyhow::Result<AsyncClient> {
    let user = format!("u{i}");
    let mut options = MqttOptions::new(format!("phone{i}"), "127.0.0.1", mqtt);
    options
        .set_credentials(&user, auth.issue(&user, None, Role::User, 3600)?)
        .set_clean_session(false)
        .set_keep_alive(Duration::from_secs(300))
        .set_inflight(100);
    let (client, mut events) = AsyncClient::new(options, 10);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(packet)) => {
                    if tx.send((i, packet)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok(client)
}

async fn level(n: usize, each: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (proc, http, mqtt) = spawn_callbus(dir.path()).await?;
    let pid = proc.0.id();
    let auth = Authenticator::new(SECRET.as_bytes());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss = rss_kib(pid);

    // Every phone subscribes, then leaves with DISCONNECT.
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let client = phone(mqtt, &auth, i, tx.clone()).await?;
        client
            .subscribe(format!("users/u{i}/notifications"), QoS::AtLeastOnce)
            .await?;
        clients.push(client);
    }
    let mut subscribed = 0;
    while subscribed < n {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Some((_, Packet::SubAck(_)))) => subscribed += 1,
            Ok(Some(_)) => {}
            _ => anyhow::bail!("only {subscribed}/{n} subscribed"),
        }
    }
    for client in clients.drain(..) {
        client.disconnect().await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // M notifications per phone while they are away (64 requests in flight).
    let http_client = reqwest::Client::new();
    let service = auth.issue("bench-app", None, Role::Service, 3600)?;
    let fill_start = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut posts = Vec::with_capacity(n * each);
    for k in 0..each {
        for i in 0..n {
            let (c, s, gate) = (http_client.clone(), service.clone(), gate.clone());
            posts.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                c.post(format!("http://127.0.0.1:{http}/api/notifications/"))
                    .bearer_auth(s)
                    .json(&serde_json::json!({"user_id": format!("u{i}"), "payload": {"k": k}}))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            }));
        }
    }
    let mut accepted = 0;
    for p in posts {
        accepted += usize::from(p.await.unwrap_or(false));
    }
    let fill_secs = fill_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored_rss = rss_kib(pid);
    let per_session = stored_rss.saturating_sub(base_rss) as f64 / n as f64;

    // All come back at once; each gets its queue replayed.
    let (tx, mut events) = mpsc::unbounded_channel();
    let back = Instant::now();
    for i in 0..n {
        clients.push(phone(mqtt, &auth, i, tx.clone()).await?);
    }
    let (mut got, mut last) = (0, back);
    while got < n * each {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Some((_, Packet::Publish(_)))) => {
                got += 1;
                last = Instant::now();
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    println!(
        "| {n} | {each} | {accepted}/{} in {fill_secs:.1} s | {:.1} MiB | {per_session:.1} KiB | {got}/{} | {:.0} ms |",
        n * each,
        stored_rss as f64 / 1024.0,
        n * each,
        last.duration_since(back).as_secs_f64() * 1000.0
    );
    drop(clients);
    Ok(())
}

pub async fn run(n: usize, each: usize) -> anyhow::Result<()> {
    println!(
        "\n## sessions: persistent sessions away while messages are queued, then all back at once"
    );
    println!("| sessions | messages each | queued while away | server RSS stored | RSS per stored session | replayed | all replayed in |");
    println!("|---|---|---|---|---|---|---|");
    level(n, each).await
}
