//! A long soak at a steady load against a separate callbus process: whole call flows, chat,
//! notifications, connection churn and a few stuck consumers (clients that stop reading), for
//! `minutes`. Every 10 s: server RSS, open files and CPU, latency percentiles of that interval,
//! errors. Printed as a table and drawn as an SVG chart.

use callbus::auth::Role;
use callbus::sync::lock;
use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::calls::{flow, Party};
use crate::conns::rss_kib;
use crate::util::{cpu_ticks, mqtt_client, percentile, Api, Remote};

const SAMPLE: Duration = Duration::from_secs(10);
/// Caller/callee pairs running whole flows, each starting one every [`FLOW_EVERY`].
const PAIRS: usize = 4;
const FLOW_EVERY: Duration = Duration::from_millis(200);
/// Chat messages per second (one sender, one receiver).
const CHAT_RATE: u64 = 100;
/// Notifications per second, over ten connected users.
const NOTIFY_RATE: u64 = 50;
/// Connections opened and closed per second.
const CHURN_RATE: u64 = 5;
/// Clients that subscribe and never read, fed [`STUCK_RATE`] 4 KB notifications a second each
/// (callbus drops them once their socket buffers and mailbox are full); replaced every
/// [`STUCK_FOR`].
const STUCK: usize = 3;
const STUCK_RATE: u64 = 50;
const STUCK_FOR: Duration = Duration::from_secs(120);

/// What the load saw in the current interval.
#[derive(Default)]
struct Window {
    chat: Vec<f64>,
    notify: Vec<f64>,
    flows: Vec<f64>,
}

struct Shared {
    window: Mutex<Window>,
    errors: AtomicU64,
    churned: AtomicU64,
    chat_sent: AtomicU64,
    chat_received: AtomicU64,
    stop: AtomicBool,
    epoch: Instant,
}

impl Shared {
    /// Microseconds since the soak began, for latency stamps inside payloads.
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn latency_ms(&self, payload: &Value) -> Option<f64> {
        let sent = payload["t"].as_u64()?;
        Some(self.now_us().saturating_sub(sent) as f64 / 1000.0)
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("soak: {what}: {e}");
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

/// One row of the chart.
struct Sample {
    minute: f64,
    rss_mib: f64,
    files: usize,
    cpu_pct: f64,
    chat: (f64, f64),
    notify: (f64, f64),
    flow_p50: f64,
    flows: usize,
    errors: u64,
    dropped_slow: u64,
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits for the next tick of `every`, or returns false once the soak stops.
async fn tick(shared: &Shared, interval: &mut tokio::time::Interval) -> bool {
    interval.tick().await;
    shared.running()
}

async fn calls(cb: Arc<Remote>, shared: Arc<Shared>, i: usize) -> anyhow::Result<()> {
    let (caller, callee, cid) = (format!("sc{i}"), format!("sr{i}"), format!("soak{i}"));
    let members = [caller.as_str(), callee.as_str()];
    let service = ("soak-app", Role::Service);
    let path = format!("/api/conversations/{cid}/");
    cb.send(
        reqwest::Method::PUT,
        &path,
        service,
        json!({ "members": members }),
    )
    .await?;
    let mut a = Party::connect(&*cb, &caller).await?;
    let mut b = Party::connect(&*cb, &callee).await?;
    let mut every = tokio::time::interval(FLOW_EVERY);
    while tick(&shared, &mut every).await {
        match flow(&*cb, (&caller, &mut a), (&callee, &mut b), &cid).await {
            Ok((_, whole)) => lock(&shared.window).flows.push(whole / 1000.0),
            Err(e) => {
                shared.error("call flow", e);
                // Start over with fresh connections (a flow cut halfway leaves stale events).
                a = Party::connect(&*cb, &caller).await?;
                b = Party::connect(&*cb, &callee).await?;
            }
        }
    }
    Ok(())
}

async fn chat(cb: Arc<Remote>, shared: Arc<Shared>) -> anyhow::Result<()> {
    let service = ("soak-app", Role::Service);
    let members = json!({ "members": ["chat-a", "chat-b"] });
    cb.send(
        reqwest::Method::PUT,
        "/api/conversations/soak-chat/",
        service,
        members,
    )
    .await?;
    let token = |u: &str| cb.token(u, Role::User);
    let (a, mut a_events) =
        mqtt_client(cb.mqtt, "chat-a-dev", "chat-a", &token("chat-a"), &[]).await?;
    let topics = ["chat/soak-chat".to_owned()];
    let (_b, mut b_events) =
        mqtt_client(cb.mqtt, "chat-b-dev", "chat-b", &token("chat-b"), &topics).await?;
    let receiver = shared.clone();
    tokio::spawn(async move {
        while let Ok(event) = b_events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                if let Some(ms) = receiver.latency_ms(&v) {
                    receiver.chat_received.fetch_add(1, Ordering::Relaxed);
                    lock(&receiver.window).chat.push(ms);
                }
            }
        }
        if receiver.running() {
            receiver.error("chat receiver", "disconnected");
        }
    });
    let sender = shared.clone();
    tokio::spawn(async move {
        while let Ok(event) = a_events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                sender.error("chat sender", String::from_utf8_lossy(&p.payload));
            }
        }
    });
    let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / CHAT_RATE));
    while tick(&shared, &mut every).await {
        let body = json!({"type": "message", "text": "soak", "t": shared.now_us()});
        match a.try_publish("chat/soak-chat", QoS::AtLeastOnce, false, body.to_string()) {
            Ok(()) => {
                shared.chat_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.error("chat publish", e),
        }
    }
    Ok(())
}

async fn notify(cb: &Remote, shared: &Shared, user: &str, payload: Value) {
    let body = json!({"user_id": user, "payload": payload});
    let service = ("soak-app", Role::Service);
    let path = "/api/notifications/";
    if let Err(e) = cb.send(reqwest::Method::POST, path, service, body).await {
        shared.error("notify", e);
    }
}

async fn notifications(cb: Arc<Remote>, shared: Arc<Shared>) -> anyhow::Result<()> {
    for i in 0..10 {
        let user = format!("sn{i}");
        let topics = [format!("users/{user}/notifications")];
        let token = cb.token(&user, Role::User);
        let (client, mut events) =
            mqtt_client(cb.mqtt, &format!("{user}-dev"), &user, &token, &topics).await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    if let Some(ms) = shared.latency_ms(&v["payload"]) {
                        lock(&shared.window).notify.push(ms);
                    }
                }
            }
            if shared.running() {
                shared.error("notification listener", "disconnected");
            }
        });
    }
    let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / NOTIFY_RATE));
    let mut n = 0u64;
    while tick(&shared, &mut every).await {
        n += 1;
        let (cb, shared) = (cb.clone(), shared.clone());
        tokio::spawn(async move {
            let user = format!("sn{}", n % 10);
            let payload = json!({"verb": "soak", "t": shared.now_us()});
            notify(&cb, &shared, &user, payload).await;
        });
    }
    Ok(())
}

async fn churn(cb: Arc<Remote>, shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / CHURN_RATE));
    let mut n = 0u64;
    while tick(&shared, &mut every).await {
        n += 1;
        let (cb, shared) = (cb.clone(), shared.clone());
        tokio::spawn(async move {
            let user = format!("churn{}", n % 500);
            let topics = [format!("users/{user}/notifications")];
            let token = cb.token(&user, Role::User);
            let id = format!("churn-{n}");
            match mqtt_client(cb.mqtt, &id, &user, &token, &topics).await {
                Ok((client, mut events)) => {
                    let _ = client.disconnect().await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), events.poll()).await;
                    shared.churned.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => shared.error("churn connect", e),
            }
        });
    }
}

/// Clients that subscribe and stop reading, fed 4 KB notifications until callbus drops them.
async fn stuck(cb: Arc<Remote>, shared: Arc<Shared>) {
    let mut round = 0u64;
    while shared.running() {
        round += 1;
        let mut held = Vec::new();
        for i in 0..STUCK {
            let user = format!("stuck{i}");
            let topics = [format!("users/{user}/notifications")];
            let token = cb.token(&user, Role::User);
            let id = format!("stuck{i}-{round}");
            match mqtt_client(cb.mqtt, &id, &user, &token, &topics).await {
                // The event loop is kept but never polled again: nothing is read.
                Ok(client) => held.push(client),
                Err(e) => shared.error("stuck connect", e),
            }
        }
        let until = Instant::now() + STUCK_FOR;
        let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / STUCK_RATE));
        while Instant::now() < until && tick(&shared, &mut every).await {
            for i in 0..STUCK {
                let payload = json!({"verb": "stuck", "blob": "x".repeat(4000)});
                notify(&cb, &shared, &format!("stuck{i}"), payload).await;
            }
        }
        drop(held);
    }
}

pub async fn run(minutes: u64, chart: &Path) -> anyhow::Result<()> {
    // Ended calls are kept this long (a history kept for good grows memory without end:
    // BENCHMARKS.md); CALLBUS_SOAK_HISTORY_SECS=0 keeps them all.
    let history = std::env::var("CALLBUS_SOAK_HISTORY_SECS").unwrap_or_else(|_| "300".into());
    let cb = Arc::new(Remote::start_with(&[("call_history_secs", &history)]).await?);
    let pid = cb.pid();
    let shared = Arc::new(Shared {
        window: Mutex::default(),
        errors: AtomicU64::new(0),
        churned: AtomicU64::new(0),
        chat_sent: AtomicU64::new(0),
        chat_received: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        epoch: Instant::now(),
    });
    // CALLBUS_SOAK_WITHOUT=calls,chat,notify,churn,stuck leaves parts of the load out (to
    // find which one a trend follows).
    let without = std::env::var("CALLBUS_SOAK_WITHOUT").unwrap_or_default();
    let on = |part: &str| !without.split(',').any(|p| p == part);
    let mut tasks = Vec::new();
    for i in (0..PAIRS).filter(|_| on("calls")) {
        tasks.push(tokio::spawn(calls(cb.clone(), shared.clone(), i)));
    }
    if on("chat") {
        tasks.push(tokio::spawn(chat(cb.clone(), shared.clone())));
    }
    if on("notify") {
        tasks.push(tokio::spawn(notifications(cb.clone(), shared.clone())));
    }
    let mut others = Vec::new();
    if on("churn") {
        others.push(tokio::spawn(churn(cb.clone(), shared.clone())));
    }
    if on("stuck") {
        others.push(tokio::spawn(stuck(cb.clone(), shared.clone())));
    }
    println!(
        "\n## soak: {minutes} min at a steady load ({PAIRS} pairs each starting a whole call flow every {FLOW_EVERY:?}, \
         {CHAT_RATE} chat msg/s, {NOTIFY_RATE} notifications/s, {CHURN_RATE} connections/s opened \
         and closed, {STUCK} stuck consumers fed 4 KB notifications at {STUCK_RATE}/s each, replaced every {STUCK_FOR:?}; \
         ended calls kept {history} s)"
    );
    println!("| min | server RSS | open files | server CPU | chat p50 / p99 ms | notify p50 / p99 ms | flows | flow p50 ms | errors | dropped slow |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut samples = Vec::new();
    let mut every = tokio::time::interval(SAMPLE);
    every.tick().await;
    let mut ticks = cpu_ticks(pid);
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    while Instant::now() < end {
        every.tick().await;
        let window = std::mem::take(&mut *lock(&shared.window));
        let now_ticks = cpu_ticks(pid);
        let pct = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (percentile(&v, 50.0), percentile(&v, 99.0))
        };
        let flows = window.flows.len();
        let sample = Sample {
            minute: shared.epoch.elapsed().as_secs_f64() / 60.0,
            rss_mib: rss_kib(pid) as f64 / 1024.0,
            files: open_files(pid),
            cpu_pct: (now_ticks - ticks) as f64 / SAMPLE.as_secs_f64(),
            chat: pct(window.chat),
            notify: pct(window.notify),
            flow_p50: pct(window.flows).0,
            flows,
            errors: shared.errors.swap(0, Ordering::Relaxed),
            dropped_slow: crate::util::metric(cb.http, "callbus_sessions_dropped_slow_total").await,
        };
        ticks = now_ticks;
        println!(
            "| {:.1} | {:.1} MiB | {} | {:.0}% | {:.2} / {:.2} | {:.2} / {:.2} | {} | {:.2} | {} | {} |",
            sample.minute,
            sample.rss_mib,
            sample.files,
            sample.cpu_pct,
            sample.chat.0,
            sample.chat.1,
            sample.notify.0,
            sample.notify.1,
            sample.flows,
            sample.flow_p50,
            sample.errors,
            sample.dropped_slow
        );
        samples.push(sample);
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in others {
        let _ = t.await;
    }
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            shared.error("load task ended", e);
        }
    }
    // Whatever was still on its way has arrived by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (sent, received) = (
        shared.chat_sent.load(Ordering::Relaxed),
        shared.chat_received.load(Ordering::Relaxed),
    );
    let errors: u64 =
        samples.iter().map(|s| s.errors).sum::<u64>() + shared.errors.load(Ordering::Relaxed);
    println!(
        "\nchat: {sent} sent, {received} received ({} lost); connections churned: {}; errors: {errors}",
        sent.saturating_sub(received),
        shared.churned.load(Ordering::Relaxed)
    );
    std::fs::write(chart, svg(&samples, minutes))?;
    println!("chart: {}", chart.display());
    Ok(())
}

/// Four panels over time: server RSS, open files, latency (chat p50 and p99, notification p99,
/// whole flow p50) and errors per interval.
fn svg(samples: &[Sample], minutes: u64) -> String {
    type Series<'a> = (&'a str, &'a str, Vec<f64>);
    let line = |name, color, value: fn(&Sample) -> f64| -> Series {
        (name, color, samples.iter().map(value).collect())
    };
    let panels: [(&str, Vec<Series>); 4] = [
        (
            "server RSS (MiB)",
            vec![line("RSS", "#1f77b4", |s| s.rss_mib)],
        ),
        (
            "open files",
            vec![line("files", "#2ca02c", |s| s.files as f64)],
        ),
        (
            "latency (ms)",
            vec![
                line("chat p50", "#1f77b4", |s| s.chat.0),
                line("chat p99", "#aec7e8", |s| s.chat.1),
                line("notify p99", "#ff7f0e", |s| s.notify.1),
                line("flow p50", "#9467bd", |s| s.flow_p50),
            ],
        ),
        (
            "errors per 10 s",
            vec![line("errors", "#d62728", |s| s.errors as f64)],
        ),
    ];
    let (w, h, left, top, gap) = (900.0, 170.0, 70.0, 30.0, 50.0);
    let total = top + panels.len() as f64 * (h + gap);
    let span = (minutes as f64).max(samples.last().map_or(1.0, |s| s.minute));
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{total}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        w + left + 20.0
    );
    for (p, (title, series)) in panels.iter().enumerate() {
        let y0 = top + p as f64 * (h + gap);
        let max = series
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.15;
        out += &format!(
            "<text x=\"{left}\" y=\"{}\" font-weight=\"bold\">{title}</text>\n",
            y0 - 8.0
        );
        out += &format!("<rect x=\"{left}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\n");
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let y = y0 + h - h * k as f64 / 4.0;
            out += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.1}</text>\n",
                left - 6.0,
                y + 4.0
            );
            out += &format!(
                "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>\n",
                left + w
            );
        }
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{span:.0} min</text>\n",
            left + w,
            y0 + h + 14.0
        );
        for (i, (name, color, values)) in series.iter().enumerate() {
            let points: Vec<String> = samples
                .iter()
                .zip(values)
                .filter(|(_, v)| v.is_finite())
                .map(|(s, v)| {
                    format!(
                        "{:.1},{:.1}",
                        left + w * s.minute / span,
                        y0 + h - h * v / max
                    )
                })
                .collect();
            out += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                points.join(" ")
            );
            out += &format!(
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
                left + 10.0 + 110.0 * i as f64,
                y0 + 14.0
            );
        }
    }
    out + "</svg>\n"
}
