//! Relay latency: callbus (gateway + bridge + router) against a bare rumqttd, same payloads,
//! same rate, same client library, one run.

use callbus::auth::Role;
use rumqttc::{Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::engines::free_port;
use crate::hops::{Hops, Trace};
use crate::util::{mqtt_client, percentile, Api, Remote};

static START: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u128 {
    START.get_or_init(Instant::now).elapsed().as_nanos()
}

/// How B gets A's messages through callbus.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `call.offer` / `call.candidate` on `chat/{cid}`: checked against the call by the
    /// bridge, stamped, and mirrored to `users/B/notifications`, where B takes them.
    Signaling,
    /// `{"type": "message"}` on `chat/{cid}`: the topic ACL, validated and stamped; B takes
    /// them on `chat/{cid}` (no call, no store read).
    Chat,
}

/// Message `seq`: every fifth is 3 KB, the others 300 B (an offer and candidates, or chat
/// messages of those sizes). The send time rides inside the SDP / candidate / text, which is
/// relayed untouched.
fn payload(route: Route, call_id: u64, seq: usize) -> Vec<u8> {
    let stamp = format!("{seq}:{}:", now_ns());
    let size = if seq.is_multiple_of(5) { 3000 } else { 240 };
    let filled = |c: &str| format!("{stamp}{}", c.repeat(size - stamp.len()));
    match route {
        Route::Chat => json!({"type": "message", "text": filled("m")}),
        Route::Signaling if size == 3000 => {
            json!({"type": "call.offer", "call_id": call_id.to_string(), "offer": {"type": "offer", "sdp": filled("a")}})
        }
        Route::Signaling => json!({"type": "call.candidate", "call_id": call_id.to_string(),
               "candidate": {"candidate": filled("c"), "sdpMid": "0", "sdpMLineIndex": 0}}),
    }
    .to_string()
    .into_bytes()
}

fn stamp_of(v: &Value) -> Option<(usize, u128)> {
    let s = v["offer"]["sdp"]
        .as_str()
        .or(v["candidate"]["candidate"].as_str())
        .or(v["text"].as_str())?;
    let mut parts = s.splitn(3, ':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Receives until `count` stamped messages or 3 s of silence; latencies in µs.
async fn receive(mut events: EventLoop, count: usize) -> Vec<f64> {
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        match tokio::time::timeout(Duration::from_secs(3), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let now = now_ns();
                if let Some((_, sent)) = serde_json::from_slice::<Value>(&p.payload)
                    .ok()
                    .as_ref()
                    .and_then(stamp_of)
                {
                    latencies.push((now - sent) as f64 / 1000.0);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                eprintln!("receiver: {e}");
                break;
            }
            Err(_) => break,
        }
    }
    latencies
}

/// Sends `count` messages at `rate`/s on `topic`, driving the sender's event loop until
/// `receiver` has them all (or gave up): its latencies.
async fn send(
    client: rumqttc::AsyncClient,
    mut events: EventLoop,
    topic: String,
    (route, call_id): (Route, u64),
    (rate, count): (usize, usize),
    receiver: tokio::task::JoinHandle<Vec<f64>>,
) -> anyhow::Result<Vec<f64>> {
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    for seq in 0..count {
        tokio::time::sleep_until(start + period * seq as u32).await;
        let payload = payload(route, call_id, seq);
        let sent = client.publish(topic.clone(), QoS::AtLeastOnce, false, payload);
        if sent.await.is_err() {
            break;
        }
    }
    let latencies = receiver.await;
    driver.abort();
    Ok(latencies?)
}

/// A path not run.
const SKIPPED: Figures = Figures {
    p50: f64::NAN,
    p90: f64::NAN,
    p99: f64::NAN,
    max: f64::NAN,
    lost: 0,
    cpu_us: f64::NAN,
    switches: f64::NAN,
};

#[derive(Clone, Copy)]
pub(crate) struct Figures {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    lost: usize,
    /// The server's CPU time per message, µs (user and system, whole run; NaN in process).
    cpu_us: f64,
    /// The server's context switches per message (all its threads).
    switches: f64,
}

fn figures(mut l: Vec<f64>, count: usize) -> Figures {
    l.sort_by(f64::total_cmp);
    Figures {
        p50: percentile(&l, 50.0),
        p90: percentile(&l, 90.0),
        p99: percentile(&l, 99.0),
        max: l.last().copied().unwrap_or(f64::NAN),
        lost: count - l.len(),
        cpu_us: f64::NAN,
        switches: f64::NAN,
    }
}

/// Each figure's median over `runs`, and everything lost in any of them.
fn median(runs: &[Figures]) -> Figures {
    let mid = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 50.0)
    };
    Figures {
        p50: mid(|f| f.p50),
        p90: mid(|f| f.p90),
        p99: mid(|f| f.p99),
        max: mid(|f| f.max),
        lost: runs.iter().map(|f| f.lost).sum(),
        cpu_us: mid(|f| f.cpu_us),
        switches: mid(|f| f.switches),
    }
}

/// Messages from `a` (connected to MQTT port `ports.0`) to `b` (on `ports.1`) through callbus
/// `rest`, along `route`.
pub(crate) async fn through(
    rest: &impl Api,
    ports: (u16, u16),
    (a_id, b_id): (&str, &str),
    route: Route,
    rate: usize,
    count: usize,
) -> anyhow::Result<Figures> {
    let cid = format!("{a_id}-{b_id}");
    rest.set_members(&cid, &[a_id.into(), b_id.into()]).await?;
    let call_id = match route {
        Route::Chat => 0,
        Route::Signaling => {
            let body = json!({"receiver_id": b_id, "call_type": "video", "conversation_id": cid});
            let call = rest.post("/api/calls/initiate/", a_id, body).await?;
            call["id"].as_u64().unwrap_or_default()
        }
    };
    let b_topic = match route {
        Route::Chat => format!("chat/{cid}"),
        Route::Signaling => format!("users/{b_id}/notifications"),
    };
    let b_token = rest.token(b_id, Role::User);
    let (_b, b_events) =
        mqtt_client(ports.1, &format!("{b_id}1"), b_id, &b_token, &[b_topic]).await?;
    let a_token = rest.token(a_id, Role::User);
    let (a, a_events) = mqtt_client(ports.0, &format!("{a_id}1"), a_id, &a_token, &[]).await?;
    let receiver = tokio::spawn(receive(b_events, count));
    let topic = format!("chat/{cid}");
    let latencies = send(
        a,
        a_events,
        topic,
        (route, call_id),
        (rate, count),
        receiver,
    )
    .await?;
    let figures = figures(latencies, count);
    if route == Route::Signaling {
        rest.post(&format!("/api/calls/{call_id}/end/"), a_id, json!({}))
            .await?;
    }
    Ok(figures)
}

/// The same messages (signaling payloads) through a plain broker on `port`, no auth, one topic.
async fn through_broker(port: u16, rate: usize, count: usize) -> anyhow::Result<Figures> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let topic = "users/b/notifications".to_owned();
    let (_b, b_events) = mqtt_client(port, "b1", "", "", std::slice::from_ref(&topic)).await?;
    let (a, a_events) = mqtt_client(port, "a1", "", "", &[]).await?;
    let receiver = tokio::spawn(receive(b_events, count));
    let route = (Route::Signaling, 17);
    let latencies = send(a, a_events, topic, route, (rate, count), receiver).await?;
    Ok(figures(latencies, count))
}

async fn through_raw_rumqttd(rate: usize, count: usize) -> anyhow::Result<Figures> {
    let port = free_port()?;
    let config = format!(
        r#"
id = 0
[router]
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 262144
max_segment_count = 2
[v4.1]
name = "v4"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 5000
max_payload_size = 131072
max_inflight_count = 200
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&config)?;
    std::thread::Builder::new()
        .name("raw-rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        })?;
    through_broker(port, rate, count).await
}

/// Debian's Mosquitto in its own process; with `trace`, its hops too.
async fn through_mosquitto(
    rate: usize,
    count: usize,
    trace: bool,
) -> anyhow::Result<(Figures, Option<Hops>)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let proc = crate::conns::spawn_mosquitto(dir.path(), port).await?;
    let pid = proc.0.id();
    let tracing = trace.then(|| Trace::attach(pid, dir.path())).transpose()?;
    let cost = Cost::start(pid);
    let figures = through_broker(port, rate, count).await?;
    let figures = cost.add_to(figures, count);
    Ok((figures, tracing.map(Trace::finish).transpose()?))
}

/// What a server process spends from a start on: CPU time and context switches.
struct Cost {
    pid: u32,
    ticks: u64,
    switches: u64,
}

impl Cost {
    fn start(pid: u32) -> Cost {
        let ticks = crate::util::cpu_ticks(pid);
        let switches = crate::util::context_switches(pid);
        Cost {
            pid,
            ticks,
            switches,
        }
    }

    /// `figures` with the cost since the start per message of `count`.
    fn add_to(self, figures: Figures, count: usize) -> Figures {
        let ticks = crate::util::cpu_ticks(self.pid) - self.ticks;
        let switches = crate::util::context_switches(self.pid) - self.switches;
        Figures {
            cpu_us: ticks as f64 * 10_000.0 / count as f64,
            switches: switches as f64 / count as f64,
            ..figures
        }
    }
}

/// callbus in its own process, as Mosquitto is, with `engine` as its embedded bus; with
/// `trace`, its hops too.
async fn through_callbus(
    route: Route,
    engine: &str,
    (rate, count): (usize, usize),
    trace: bool,
) -> anyhow::Result<(Figures, Option<Hops>)> {
    // The default per-connection limit (200 publishes/s) is for real clients; this sends
    // `rate` from one connection on purpose.
    let engine = format!("\"{engine}\"");
    let config = [
        ("publish_rate", "100000"),
        ("publish_burst", "100000"),
        ("engine", engine.as_str()),
    ];
    let cb = Remote::start_with(&config).await?;
    let port = cb.mqtt;
    let dir = tempfile::tempdir()?;
    let tracing = trace
        .then(|| Trace::attach(cb.pid(), dir.path()))
        .transpose()?;
    let cost = Cost::start(cb.pid());
    let figures = through(&cb, (port, port), ("a", "b"), route, rate, count).await?;
    let figures = cost.add_to(figures, count);
    Ok((figures, tracing.map(Trace::finish).transpose()?))
}

/// One table row.
pub(crate) fn row(name: &str, f: &Figures) {
    println!(
        "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
        f.p50, f.p90, f.p99, f.max, f.lost
    );
}

/// A table row of `a`'s figures over `b`'s.
pub(crate) fn ratio_row(name: &str, a: &Figures, b: &Figures) {
    println!(
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | |",
        a.p50 / b.p50,
        a.p90 / b.p90,
        a.p99 / b.p99,
        a.max / b.max
    );
}

const PATHS: [&str; 5] = [
    "raw rumqttd (v4 listener, in the bench process)",
    "Mosquitto (own process, TCP_NODELAY)",
    "callbus chat (chat/{cid} → ACL, stamp → chat/{cid})",
    "callbus signaling (chat/{cid} → bridge → users/B/notifications)",
    "callbus signaling, bus engine = \"rumqttd\" (through its router)",
];

pub async fn run(rate: usize, count: usize, runs: usize) -> anyhow::Result<()> {
    println!(
        "\n## relay: {count} messages at {rate} msg/s (1 in 5 of 3 KB, others 300 B), QoS 1, \
         latency in µs; {runs} runs, each path once per run in turn, each run starting one path later"
    );
    println!(
        "| run | {} |",
        PATHS.map(|p| format!("{p} p50 / p99")).join(" | ")
    );
    println!("|---{}|", "|---".repeat(PATHS.len()));
    // CALLBUS_BENCH_RELAY_PATHS: the paths to run, by their 0-based place in the table (for
    // example `1,3` for Mosquitto and callbus signaling); the others print as NaN.
    let only: Option<Vec<usize>> = std::env::var("CALLBUS_BENCH_RELAY_PATHS")
        .ok()
        .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect());
    let mut all: Vec<[Figures; PATHS.len()]> = Vec::new();
    let load = (rate, count);
    let chosen: Vec<usize> = (0..PATHS.len())
        .filter(|i| only.as_ref().is_none_or(|o| o.contains(i)))
        .collect();
    for run in 1..=runs {
        let mut figures = [SKIPPED; PATHS.len()];
        // Each run starts one path later than the one before, so that no path always runs
        // first (or last) while the host's load drifts.
        let mut order = chosen.clone();
        let len = order.len().max(1);
        order.rotate_left((run - 1) % len);
        for i in order {
            figures[i] = match i {
                0 => through_raw_rumqttd(rate, count).await?,
                1 => through_mosquitto(rate, count, false).await?.0,
                2 => through_callbus(Route::Chat, "direct", load, false).await?.0,
                3 => {
                    through_callbus(Route::Signaling, "direct", load, false)
                        .await?
                        .0
                }
                _ => {
                    through_callbus(Route::Signaling, "rumqttd", load, false)
                        .await?
                        .0
                }
            };
        }
        let cells = figures.map(|f| format!("{:.0} / {:.0} (lost {})", f.p50, f.p99, f.lost));
        println!("| {run} | {} |", cells.join(" | "));
        all.push(figures);
    }
    let medians: Vec<Figures> = (0..PATHS.len())
        .map(|i| median(&all.iter().map(|f| f[i]).collect::<Vec<_>>()))
        .collect();
    println!("\nMedians of the {runs} runs (lost: total):\n");
    println!("| path | p50 | p90 | p99 | max | lost |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in PATHS.iter().zip(&medians) {
        row(name, f);
    }
    ratio_row("ratio callbus chat / Mosquitto", &medians[2], &medians[1]);
    ratio_row(
        "ratio callbus signaling / Mosquitto",
        &medians[3],
        &medians[1],
    );
    ratio_row(
        "ratio callbus signaling / raw rumqttd",
        &medians[3],
        &medians[0],
    );
    ratio_row(
        "ratio callbus signaling, direct / rumqttd bus",
        &medians[3],
        &medians[4],
    );
    println!(
        "\nServer cost per message, medians (CPU from /proc over the whole run at 10 ms \
         resolution; the in-process rumqttd is not measured):\n"
    );
    println!("| path | CPU µs/msg | context switches/msg |");
    println!("|---|---|---|");
    for (name, f) in PATHS.iter().zip(&medians).skip(1) {
        println!("| {name} | {:.1} | {:.2} |", f.cpu_us, f.switches);
    }
    Ok(())
}

/// `relay`'s Mosquitto, chat and signaling paths once each under `perf`: each message's hops
/// (see [`crate::hops`]), side by side.
pub async fn hops(rate: usize, count: usize) -> anyhow::Result<()> {
    println!(
        "\n## hops: {count} messages at {rate} msg/s per path (as in relay), system calls \
         traced by perf in the bench and the server"
    );
    let load = (rate, count);
    let traced = |(figures, hops): (Figures, Option<Hops>)| {
        let hops = hops.ok_or_else(|| anyhow::anyhow!("no trace"))?;
        anyhow::Ok((figures, hops))
    };
    let mosquitto = traced(through_mosquitto(rate, count, true).await?)?;
    let chat = traced(through_callbus(Route::Chat, "direct", load, true).await?)?;
    let signaling = traced(through_callbus(Route::Signaling, "direct", load, true).await?)?;
    crate::hops::table(&[
        (PATHS[1], mosquitto.1),
        (PATHS[2], chat.1),
        (PATHS[3], signaling.1),
    ]);
    println!("\nThe same runs as the bench measures them (traced), µs:\n");
    println!("| path | p50 | p90 | p99 | max | lost |");
    println!("|---|---|---|---|---|---|");
    for (name, figures) in [
        (PATHS[1], mosquitto.0),
        (PATHS[2], chat.0),
        (PATHS[3], signaling.0),
    ] {
        row(name, &figures);
    }
    Ok(())
}
