//! A reconnect storm: N MQTT-over-TCP clients, each subscribed to its own notifications topic,
//! connected to a callbus process; callbus restarts (SIGTERM, then a new process on the same
//! ports and data dir); every client reconnects as real clients do (after a random 0-1 s, then
//! once a second), subscribes again, and gets one notification. Reported: the time until all
//! are back and all notified, callbus's peak CPU and RSS during the storm, and the latency of a
//! probe pair that came back first and keeps talking while the rest reconnect (accepting
//! sockets must not starve admitted sessions).

use callbus::auth::{Authenticator, Role};
use callbus::sync::lock;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

use crate::conns::{rss_kib, spawn_callbus_at, SECRET};
use crate::util::{cpu_ticks, percentile};

/// What the clients report.
enum Report {
    /// Client `i` is subscribed on a connection made after the restart (generation 2) or
    /// before (1).
    Ready(u8),
    Notified,
}

/// One client: connects, subscribes, and after any disconnect reconnects (first after a
/// random delay up to 1 s, then every second) and subscribes again.
fn client(
    i: usize,
    mqtt: u16,
    token: String,
    restarted: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Report>,
) {
    let user = format!("s{i}");
    let mut options = MqttOptions::new(format!("storm-{i}"), "127.0.0.1", mqtt);
    options
        .set_credentials(&user, token)
        .set_keep_alive(Duration::from_secs(120));
    let (client, mut events) = AsyncClient::new(options, 10);
    let topic = format!("users/{user}/notifications");
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let generation = if restarted.load(Ordering::Relaxed) {
                        2
                    } else {
                        1
                    };
                    let _ = tx.send(Report::Ready(generation));
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    let _ = tx.send(Report::Notified);
                }
                Ok(_) => {}
                Err(_) => {
                    if tx.is_closed() {
                        return;
                    }
                    failures += 1;
                    let jitter = (i as u64 * 7919) % 1000;
                    let wait = if failures == 1 { jitter } else { 1000 };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    });
}

/// Samples `pid` every 100 ms until `stop`: (peak CPU %, peak RSS KiB).
fn sample(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(f64, u64)> {
    tokio::spawn(async move {
        let (mut peak_cpu, mut peak_rss) = (0.0f64, 0u64);
        let mut last = (Instant::now(), cpu_ticks(pid));
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = (Instant::now(), cpu_ticks(pid));
            let secs = now.0.duration_since(last.0).as_secs_f64();
            peak_cpu = peak_cpu.max((now.1 - last.1) as f64 / secs);
            peak_rss = peak_rss.max(rss_kib(pid));
            last = now;
        }
        (peak_cpu, peak_rss)
    })
}

/// Waits until `n` reports that `pick` accepts have come; the time it took.
async fn until(
    rx: &mut mpsc::UnboundedReceiver<Report>,
    n: usize,
    pick: impl Fn(&Report) -> bool,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let report = tokio::time::timeout_at((start + limit).into(), rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {got} of {n} in {limit:?}"))?
            .ok_or_else(|| anyhow::anyhow!("clients gone"))?;
        if pick(&report) {
            got += 1;
        }
    }
    Ok(start.elapsed())
}

/// The probe: two users in one conversation; `a` publishes a chat message every 20 ms with a
/// timestamp and `b` records the latency, from as soon as both are connected.
async fn probe(
    mqtt: u16,
    auth: &Authenticator,
    latencies: Arc<std::sync::Mutex<Vec<f64>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let connect = |user: &str, topics: Vec<String>| {
        let token = auth.issue(user, None, Role::User, 3600);
        let user = user.to_owned();
        async move {
            loop {
                let token = token.clone()?;
                match crate::util::mqtt_client(
                    mqtt,
                    &format!("{user}-probe"),
                    &user,
                    &token,
                    &topics,
                )
                .await
                {
                    Ok(c) => return anyhow::Ok(c),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    };
    let (a, mut a_events) = connect("probe-a", vec![]).await?;
    let (_b, mut b_events) = connect("probe-b", vec!["chat/storm-probe".to_owned()]).await?;
    tokio::spawn(async move { while a_events.poll().await.is_ok() {} });
    let recorder = tokio::spawn(async move {
        while let Ok(event) = b_events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                if let Some(t) = v["t"].as_u64() {
                    let ms = (epoch.elapsed().as_micros() as u64).saturating_sub(t) as f64 / 1000.0;
                    lock(&latencies).push(ms);
                }
            }
        }
    });
    let mut every = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        let body = json!({"type": "message", "t": epoch.elapsed().as_micros() as u64});
        let _ = a.try_publish(
            "chat/storm-probe",
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    recorder.abort();
    Ok(())
}

pub async fn run(n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (http, mqtt) = (crate::engines::free_port()?, crate::engines::free_port()?);
    let proc = spawn_callbus_at(dir.path(), http, mqtt).await?;
    let auth = Authenticator::new(SECRET.as_bytes());
    let service = auth.issue("storm-app", None, Role::Service, 3600)?;
    let rest = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/api/conversations/storm-probe/");
    rest.put(&url)
        .bearer_auth(&service)
        .json(&json!({"members": ["probe-a", "probe-b"]}))
        .send()
        .await?
        .error_for_status()?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let restarted = Arc::new(AtomicBool::new(false));
    let connecting = Instant::now();
    for i in 0..n {
        let token = auth.issue(&format!("s{i}"), None, Role::User, 3600)?;
        client(i, mqtt, token, restarted.clone(), tx.clone());
        // The first connections are paced (100 at a time in flight), as clients arriving over
        // a day would be; the storm after the restart is not.
        if i % 100 == 99 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let ready = |r: &Report| matches!(r, Report::Ready(1));
    until(&mut rx, n, ready, Duration::from_secs(300)).await?;
    let first = connecting.elapsed();
    println!("\n## storm: {n} MQTT-over-TCP clients, each on its own notifications topic; callbus restarts (SIGTERM, new process on the same ports)");
    println!(
        "first connect of all {n}: {:.1} s; server RSS {:.1} MiB",
        first.as_secs_f64(),
        rss_kib(proc.0.id()) as f64 / 1024.0
    );

    // The restart: SIGTERM, wait for the exit, start again on the same ports and data dir.
    let restart = Instant::now();
    restarted.store(true, Ordering::Relaxed);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status();
    let mut proc = proc;
    tokio::task::spawn_blocking(move || {
        let _ = proc.0.wait();
    })
    .await?;
    let down = restart.elapsed();
    let proc = spawn_callbus_at(dir.path(), http, mqtt).await?;
    let up = restart.elapsed();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(proc.0.id(), stop.clone());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe_stop = Arc::new(AtomicBool::new(false));
    let probing = {
        let (auth, latencies, probe_stop) = (
            Authenticator::new(SECRET.as_bytes()),
            latencies.clone(),
            probe_stop.clone(),
        );
        tokio::spawn(async move { probe(mqtt, &auth, latencies, probe_stop).await })
    };
    let back = until(
        &mut rx,
        n,
        |r| matches!(r, Report::Ready(2)),
        Duration::from_secs(300),
    )
    .await?
        + up;
    probe_stop.store(true, Ordering::Relaxed);
    let _ = probing.await;

    // One notification per user, 64 requests in flight.
    let fired = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let (rest, service) = (rest.clone(), service.clone());
        tokio::spawn(async move {
            let _ = rest
                .post(format!("http://127.0.0.1:{http}/api/notifications/"))
                .bearer_auth(service)
                .json(&json!({"user_id": format!("s{i}"), "payload": {"verb": "storm"}}))
                .send()
                .await;
            drop(permit);
        });
    }
    let notified = |r: &Report| matches!(r, Report::Notified);
    until(&mut rx, n, notified, Duration::from_secs(120)).await?;
    let notified = fired.elapsed();
    let all = restart.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak_cpu, peak_rss) = sampler.await?;
    let mut probe_ms = std::mem::take(&mut *lock(&latencies));
    probe_ms.sort_by(f64::total_cmp);
    println!("| step | after the SIGTERM |\n|---|---|");
    println!("| old process gone | {:.2} s |", down.as_secs_f64());
    println!("| new process healthy | {:.2} s |", up.as_secs_f64());
    println!(
        "| all {n} reconnected and subscribed | {:.2} s |",
        back.as_secs_f64()
    );
    println!(
        "| all {n} notified (REST, 64 in flight) | {:.2} s ({:.2} s for the notifications) |",
        all.as_secs_f64(),
        notified.as_secs_f64()
    );
    println!(
        "\nnew process during the storm: peak CPU {peak_cpu:.0}% (of 200%), peak RSS {:.1} MiB; probe pair's chat relay while the others reconnected: {} messages, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        peak_rss as f64 / 1024.0,
        probe_ms.len(),
        percentile(&probe_ms, 50.0),
        percentile(&probe_ms, 99.0),
        probe_ms.last().copied().unwrap_or(f64::NAN)
    );
    drop(rx);
    drop(proc);
    Ok(())
}
