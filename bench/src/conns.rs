//! Connection scale: N idle MQTT-over-WebSocket clients, each subscribed to its own
//! notifications topic, against a separate callbus process (so its RSS is the server's alone);
//! then one notification per user, fired at once through the REST API.

use callbus::auth::{Authenticator, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

pub(crate) const SECRET: &str = "bench-secret";

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn spawn_callbus(dir: &std::path::Path) -> anyhow::Result<(Proc, u16, u16)> {
    spawn_callbus_with(dir, &[]).await
}

/// A callbus process with `extra` arguments.
pub(crate) async fn spawn_callbus_with(
    dir: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(Proc, u16, u16)> {
    let (http, mqtt) = (free_port()?, free_port()?);
    let proc = spawn(&exe()?, dir, http, mqtt, extra)?;
    healthy(proc, http, mqtt).await
}

/// A callbus process on the given ports.
pub(crate) async fn spawn_callbus_at(
    dir: &std::path::Path,
    http: u16,
    mqtt: u16,
) -> anyhow::Result<Proc> {
    let proc = spawn(&exe()?, dir, http, mqtt, &[])?;
    Ok(healthy(proc, http, mqtt).await?.0)
}

fn exe() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|d| d.join("callbus"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("build the server first: cargo build --release"))
}

fn spawn(
    exe: &std::path::Path,
    dir: &std::path::Path,
    http: u16,
    mqtt: u16,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let mut command = Command::new(exe);
    // CALLBUS_BENCH_SERVER_WORKERS: the server's tokio worker threads (the bench's own stay).
    if let Ok(workers) = std::env::var("CALLBUS_BENCH_SERVER_WORKERS") {
        command.env("TOKIO_WORKER_THREADS", workers);
    }
    let child = command
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args([
            "--http",
            &format!("127.0.0.1:{http}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
        ])
        .args(extra)
        .env("CALLBUS_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// Waits (bounded) until `proc` answers `/healthz`.
async fn healthy(proc: Proc, http: u16, mqtt: u16) -> anyhow::Result<(Proc, u16, u16)> {
    for _ in 0..200 {
        let health = reqwest::get(format!("http://127.0.0.1:{http}/healthz")).await;
        if health.is_ok_and(|r| r.status().is_success()) {
            return Ok((proc, http, mqtt));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("callbus did not start")
}

async fn level(n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (proc, http, _) = spawn_callbus(dir.path()).await?;
    let pid = proc.0.id();
    let auth = Authenticator::new(SECRET.as_bytes());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss = rss_kib(pid);

    let (tx, mut received) = mpsc::unbounded_channel::<Instant>();
    let gate = Arc::new(Semaphore::new(100));
    let connect_start = Instant::now();
    let mut clients = Vec::with_capacity(n);
    let mut waits = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("u{i}");
        let mut options =
            MqttOptions::new(format!("d{i}"), format!("ws://127.0.0.1:{http}/mqtt"), http);
        options
            .set_transport(Transport::Ws)
            .set_credentials(&user, auth.issue(&user, None, Role::User, 3600)?)
            .set_keep_alive(Duration::from_secs(300));
        let (client, mut events) = AsyncClient::new(options, 10);
        client
            .subscribe(format!("users/{user}/notifications"), QoS::AtLeastOnce)
            .await?;
        let (tx, gate) = (tx.clone(), gate.clone());
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let mut ready_tx = Some(ready_tx);
            let mut permit = permit.ok();
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        permit.take();
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        let _ = tx.send(Instant::now());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("client {i}: {e}");
                        return;
                    }
                }
            }
        });
        clients.push(client);
        waits.push(ready);
    }
    for w in waits {
        tokio::time::timeout(Duration::from_secs(120), w).await??;
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(pid);
    let per_conn = (rss.saturating_sub(base_rss)) as f64 / n as f64;

    // One notification per user, fired at once (64 requests in flight); twice, because the
    // router's first publish to a topic costs more than later ones.
    let http_client = reqwest::Client::new();
    let service = auth.issue("bench-app", None, Role::Service, 3600)?;
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let fired = Instant::now();
        let gate = Arc::new(Semaphore::new(64));
        for i in 0..n {
            let (c, s, gate) = (http_client.clone(), service.clone(), gate.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                let _ = c
                    .post(format!("http://127.0.0.1:{http}/api/notifications/"))
                    .bearer_auth(s)
                    .json(&serde_json::json!({"user_id": format!("u{i}"), "payload": {"verb": "bench"}}))
                    .send()
                    .await;
            });
        }
        let mut got = 0;
        let mut last = fired;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(20), received.recv()).await {
                Ok(Some(t)) => {
                    got += 1;
                    last = t;
                }
                _ => break,
            }
        }
        rounds.push((got, last.duration_since(fired).as_secs_f64() * 1000.0));
    }
    println!(
        "| {n} | {connect_secs:.1} s | {:.1} MiB | {:.1} MiB | {per_conn:.1} KiB | {}/{n}, {}/{n} | {:.0} ms | {:.0} ms |",
        base_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        rounds[0].0,
        rounds[1].0,
        rounds[0].1,
        rounds[1].1
    );
    drop(clients);
    Ok(())
}

pub async fn run(sizes: &[usize]) -> anyhow::Result<()> {
    println!("\n## conns: idle MQTT-over-WebSocket clients, each on its own notifications topic");
    println!("| clients | connect all | server RSS idle | server RSS with clients | RSS per connection | notified (round 1, 2) | all notified, round 1 | all notified, round 2 |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        level(n).await?;
    }
    Ok(())
}
