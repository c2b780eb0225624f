//! `hostile`: what attacks from one client cost a callbus process (its RSS, descriptors and CPU
//! while attacked) and whether a normal client still gets in meanwhile: a WebSocket ping flood
//! that never reads, 1,800 half-sent HTTP requests, 1,000 half-sent CONNECTs of 130 KB each
//! (with a will, the largest allowed), and 2,000 persistent sessions made by one user.

use callbus::auth::Role;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conns::rss_kib;
use crate::util::{cpu_ticks, metric, mqtt_client, mqtt_client_with, Api, Remote};

/// What the server spent while attacked.
struct Cost {
    pid: u32,
    started: Instant,
    rss: u64,
    peak: u64,
    files: usize,
    cpu: u64,
}

impl Cost {
    fn start(pid: u32) -> Self {
        Self {
            pid,
            started: Instant::now(),
            rss: rss_kib(pid),
            peak: rss_kib(pid),
            files: 0,
            cpu: cpu_ticks(pid),
        }
    }

    fn sample(&mut self) {
        self.peak = self.peak.max(rss_kib(self.pid));
        self.files = self.files.max(open_files(self.pid));
    }

    fn print(&self, what: &str, probe: Duration, extra: &str) {
        let cpu = (cpu_ticks(self.pid) - self.cpu) as f64 / 100.0;
        println!(
            "{what:<34} {:>5.1} s  RSS {:>6.1} -> peak {:>6.1} MiB (+{:.1})  files {:>5}  \
             server CPU {cpu:>4.2} s  a new client's CONNACK {:>6.1} ms  {extra}",
            self.started.elapsed().as_secs_f64(),
            self.rss as f64 / 1024.0,
            self.peak as f64 / 1024.0,
            self.peak.saturating_sub(self.rss) as f64 / 1024.0,
            self.files,
            probe.as_secs_f64() * 1000.0,
        );
    }
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// How long a new client takes from connecting to its CONNACK (10 s: gave up).
async fn probe(cb: &Remote, n: usize) -> Duration {
    use rumqttc::{Event, Packet};
    let started = Instant::now();
    let mut options = rumqttc::MqttOptions::new(format!("probe-{n}"), "127.0.0.1", cb.mqtt);
    options.set_credentials("probe", cb.token("probe", Role::User));
    let (_client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let connack = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), connack).await {
        Ok(true) => started.elapsed(),
        _ => Duration::from_secs(10),
    }
}

pub async fn run() -> anyhow::Result<()> {
    println!("hostile: one attacker at a time against a callbus process (defaults)");
    ping_flood().await?;
    slow_http().await?;
    half_connects().await?;
    stored_sessions().await?;
    Ok(())
}

async fn ping_flood() -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;

    let cb = Remote::start().await?;
    let stream = TcpStream::connect(("127.0.0.1", cb.http)).await?;
    let mut request = format!("ws://127.0.0.1:{}/mqtt", cb.http).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    let mut connect = rumqttc::Connect::new("flood");
    connect.set_login("mallory", cb.token("mallory", Role::User));
    let mut out = bytes::BytesMut::new();
    rumqttc::Packet::Connect(connect).write(&mut out, usize::MAX)?;
    ws.send(Message::Binary(out.freeze())).await?;
    anyhow::ensure!(ws.next().await.is_some(), "no CONNACK");
    // 512 masked 125-byte pings a write, straight to the socket, never reading a pong.
    let mut batch = Vec::new();
    for _ in 0..512 {
        let mut ping = Frame::ping(vec![0x55; 125]);
        ping.header_mut().mask = Some([0x37, 0xfa, 0x21, 0x3d]);
        ping.format(&mut batch)?;
    }
    let mut cost = Cost::start(cb.pid());
    let (mut sent, deadline) = (0usize, Instant::now() + Duration::from_secs(8));
    let socket = ws.get_mut();
    let mut cut_off = None;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(_)) => {
                cut_off = Some(cost.started.elapsed());
                break;
            }
            Err(_) => break,
        }
        cost.sample();
    }
    let probed = probe(&cb, 0).await;
    let closed = metric(cb.http, "callbus_ws_control_flood_total").await;
    let extra = format!(
        "{:.1} MB of pings, cut off after {:?} (callbus_ws_control_flood_total {closed})",
        sent as f64 / 1e6,
        cut_off
    );
    cost.print("WebSocket ping flood, 8 s", probed, &extra);
    Ok(())
}

async fn slow_http() -> anyhow::Result<()> {
    let cb = Remote::start().await?;
    let mut cost = Cost::start(cb.pid());
    let mut held = Vec::new();
    for _ in 0..1800 {
        let mut s = TcpStream::connect(("127.0.0.1", cb.http)).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await?;
        held.push(s);
    }
    cost.sample();
    let probed = probe(&cb, 1).await;
    let rest = Instant::now();
    let ok = reqwest::get(format!("http://127.0.0.1:{}/healthz", cb.http))
        .await
        .is_ok_and(|r| r.status().is_success());
    let rest = rest.elapsed();
    // The header timeout (10 s) closes what is left of them.
    while open_files(cb.pid()) > 100 && cost.started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = cost.started.elapsed();
    let timeouts = metric(cb.http, "callbus_http_header_timeouts_total").await;
    let refused = metric(cb.http, "callbus_http_refused_total").await;
    let extra = format!(
        "REST meanwhile {ok} in {:.1} ms; all closed by {:.1} s \
         (header timeouts {timeouts}, closed for room {refused})",
        rest.as_secs_f64() * 1000.0,
        closed.as_secs_f64()
    );
    cost.print("1,800 half-sent HTTP requests", probed, &extra);
    Ok(())
}

async fn half_connects() -> anyhow::Result<()> {
    let cb = Remote::start().await?;
    // A 3.1.1 CONNECT with a will whose remaining length says 131,000 bytes; 130,000 sent.
    let mut body = vec![0x10, 0xb8, 0xff, 0x07]; // 131,000 as a varint
    body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0b0000_0110, 0, 60]);
    body.resize(130_000, b'x');
    let mut cost = Cost::start(cb.pid());
    let mut held = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(("127.0.0.1", cb.mqtt)).await?;
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&body)).await;
        held.push(s);
        cost.sample();
    }
    let probed = probe(&cb, 2).await;
    cost.sample();
    let refused = metric(cb.http, "callbus_mqtt_pending_refused_total").await;
    let extra = format!("closed past the budget {refused}");
    cost.print("1,000 half-sent 130 KB CONNECTs", probed, &extra);
    Ok(())
}

async fn stored_sessions() -> anyhow::Result<()> {
    let cb = Remote::start().await?;
    cb.set_members("c1", &["mallory".into(), "bob".into()])
        .await?;
    let token = cb.token("mallory", Role::User);
    let mut cost = Cost::start(cb.pid());
    let topics = ["chat/c1".to_owned()];
    for n in 0..2000 {
        let id = format!("m{n}");
        let (client, mut events) =
            mqtt_client_with(cb.mqtt, &id, "mallory", &token, &topics, false).await?;
        client.disconnect().await?;
        while events.poll().await.is_ok() {}
        if n % 100 == 0 {
            cost.sample();
        }
    }
    let bob = cb.token("bob", Role::User);
    let (sender, mut events) = mqtt_client(cb.mqtt, "bob-1", "bob", &bob, &[]).await?;
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    for i in 0..100 {
        let text = format!(r#"{{"type":"message","text":"{i}"}}"#);
        sender
            .publish("chat/c1", rumqttc::QoS::AtLeastOnce, false, text)
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // let the queues fill
    cost.sample();
    let probed = probe(&cb, 3).await;
    let stored = metric(cb.http, "callbus_sessions_stored").await;
    let evicted = metric(cb.http, "callbus_sessions_evicted_total").await;
    let extra = format!("then 100 messages to them: stored {stored}, evicted {evicted}");
    cost.print("2,000 stored sessions of one user", probed, &extra);
    Ok(())
}
