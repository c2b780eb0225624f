//! Relay latency: callbus (gateway + bridge + router) against a bare rumqttd, same payloads,
//! same rate, same client library, one run.

use callbus::auth::Role;
use rumqttc::{Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::util::{mqtt_client, percentile, Callbus};

static START: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u128 {
    START.get_or_init(Instant::now).elapsed().as_nanos()
}

/// Message `seq`: every fifth is a 3 KB offer, the others 300 B candidates. The send time rides
/// inside the SDP / candidate string, which the bridge relays untouched.
fn payload(call_id: u64, seq: usize) -> Vec<u8> {
    let stamp = format!("{seq}:{}:", now_ns());
    if seq.is_multiple_of(5) {
        let sdp = format!("{stamp}{}", "a".repeat(3000 - stamp.len()));
        json!({"type": "call.offer", "call_id": call_id.to_string(), "offer": {"type": "offer", "sdp": sdp}})
    } else {
        let cand = format!("{stamp}{}", "c".repeat(240 - stamp.len()));
        json!({"type": "call.candidate", "call_id": call_id.to_string(),
               "candidate": {"candidate": cand, "sdpMid": "0", "sdpMLineIndex": 0}})
    }
    .to_string()
    .into_bytes()
}

fn stamp_of(v: &Value) -> Option<(usize, u128)> {
    let s = v["offer"]["sdp"]
        .as_str()
        .or(v["candidate"]["candidate"].as_str())?;
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

/// Sends `count` messages at `rate`/s on `topic`; drives the sender's event loop meanwhile.
async fn send(
    client: rumqttc::AsyncClient,
    mut events: EventLoop,
    topic: String,
    call_id: u64,
    rate: usize,
    count: usize,
) {
    let driver = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    for seq in 0..count {
        tokio::time::sleep_until(start + period * seq as u32).await;
        if client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload(call_id, seq),
            )
            .await
            .is_err()
        {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    driver.abort();
}

pub(crate) struct Figures {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    lost: usize,
}

fn figures(mut l: Vec<f64>, count: usize) -> Figures {
    l.sort_by(f64::total_cmp);
    Figures {
        p50: percentile(&l, 50.0),
        p90: percentile(&l, 90.0),
        p99: percentile(&l, 99.0),
        max: l.last().copied().unwrap_or(f64::NAN),
        lost: count - l.len(),
    }
}

async fn through_callbus(rate: usize, count: usize) -> anyhow::Result<Figures> {
    let cb = Callbus::start().await?;
    let port = cb.server.mqtt_addr.port();
    let figures = through(&cb, (port, port), ("a", "b"), rate, count).await?;
    cb.server.stop().await;
    Ok(figures)
}

/// Signaling from `a` (connected to MQTT port `ports.0`) to `b` (on `ports.1`) in a call made
/// through `rest`.
pub(crate) async fn through(
    rest: &Callbus,
    ports: (u16, u16),
    (a_id, b_id): (&str, &str),
    rate: usize,
    count: usize,
) -> anyhow::Result<Figures> {
    let cid = format!("{a_id}-{b_id}");
    rest.set_members(&cid, &[a_id.into(), b_id.into()]).await?;
    let call = rest
        .post(
            "/api/calls/initiate/",
            a_id,
            json!({"receiver_id": b_id, "call_type": "video", "conversation_id": cid}),
        )
        .await?;
    let call_id = call["id"].as_u64().unwrap_or_default();
    let (_b, b_events) = mqtt_client(
        ports.1,
        &format!("{b_id}1"),
        b_id,
        &rest.token(b_id, Role::User),
        &[format!("users/{b_id}/notifications")],
    )
    .await?;
    let a_token = rest.token(a_id, Role::User);
    let (a, a_events) = mqtt_client(ports.0, &format!("{a_id}1"), a_id, &a_token, &[]).await?;
    let receiver = tokio::spawn(receive(b_events, count));
    send(a, a_events, format!("chat/{cid}"), call_id, rate, count).await;
    let figures = figures(receiver.await?, count);
    rest.post(&format!("/api/calls/{call_id}/end/"), a_id, json!({}))
        .await?;
    Ok(figures)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
    send(a, a_events, topic, 17, rate, count).await;
    Ok(figures(receiver.await?, count))
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

pub async fn run(rate: usize, count: usize) -> anyhow::Result<()> {
    println!("\n## relay: {count} messages at {rate} msg/s (1 in 5 a 3 KB offer, others 300 B candidates), QoS 1, latency in µs");
    let raw = through_raw_rumqttd(rate, count).await?;
    let cb = through_callbus(rate, count).await?;
    println!("| path | p50 | p90 | p99 | max | lost |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in [
        ("raw rumqttd (v4 listener)", &raw),
        ("callbus (chat/{cid} → bridge → users/B/notifications)", &cb),
    ] {
        row(name, f);
    }
    ratio_row("ratio callbus/raw", &cb, &raw);
    Ok(())
}
