//! Connection scale: N idle MQTT clients, each subscribed to its own notifications topic,
//! against a separate server process (so its RSS is the server's alone): callbus over
//! WebSocket and over TCP, and Mosquitto over TCP; then one notification per user (callbus:
//! through the REST API; Mosquitto: from one publishing client).

use crate::engines::free_port;
use callbus::auth::{Authenticator, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
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
    /// SIGTERM, up to 10 s to stop (a server under valgrind writes its profile), then SIGKILL.
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) with a pid this process spawned and has not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..500 {
                if self.0.try_wait().is_ok_and(|s| s.is_some()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

/// A callbus process on the given ports with `extra` arguments, not waited for.
pub(crate) fn spawn_callbus_unwaited(
    dir: &std::path::Path,
    http: u16,
    mqtt: u16,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    spawn(&exe()?, dir, http, mqtt, extra)
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
    // CALLBUS_BENCH_SERVER_WRAP: a command to run the server under, split at spaces (for
    // example `valgrind --tool=callgrind` to count the server's instructions).
    let wrap = std::env::var("CALLBUS_BENCH_SERVER_WRAP").unwrap_or_default();
    let mut wrap = wrap.split_whitespace();
    let mut command = match wrap.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(wrap).arg(exe);
            command
        }
        None => Command::new(exe),
    };
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
        // `CALLBUS_NODE_LOG` sets the nodes' own filter (e.g. to follow a chaos run's queues).
        .env(
            "RUST_LOG",
            std::env::var("CALLBUS_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// Debian's Mosquitto on 127.0.0.1:`port` (anonymous, `TCP_NODELAY` on its sockets as on
/// callbus's, no persistence), its config in `dir`; returns once it accepts connections.
pub(crate) async fn spawn_mosquitto(dir: &std::path::Path, port: u16) -> anyhow::Result<Proc> {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
             persistence false\nmax_inflight_messages 200\nmax_queued_messages 10000\n"
        ),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("mosquitto (Debian's mosquitto package): {e}"))?;
    let proc = Proc(child);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(proc);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("mosquitto did not start")
}

/// Waits (bounded) until `proc` answers `/healthz`.
async fn healthy(proc: Proc, http: u16, mqtt: u16) -> anyhow::Result<(Proc, u16, u16)> {
    // Up to 30 s: a server under valgrind starts slowly.
    for _ in 0..1200 {
        let health = reqwest::get(format!("http://127.0.0.1:{http}/healthz")).await;
        if health.is_ok_and(|r| r.status().is_success()) {
            return Ok((proc, http, mqtt));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("callbus did not start")
}

/// What the idle clients connect to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// callbus, MQTT over WebSocket (`/mqtt` on the HTTP port); notified through REST.
    CallbusWs,
    /// callbus, MQTT over TCP; notified through REST.
    CallbusTcp,
    /// Debian's Mosquitto, MQTT over TCP, anonymous; notified by one publishing client.
    Mosquitto,
}

impl Target {
    fn key(self) -> &'static str {
        match self {
            Target::CallbusWs => "ws",
            Target::CallbusTcp => "tcp",
            Target::Mosquitto => "mosquitto",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::CallbusWs => "callbus, WebSocket",
            Target::CallbusTcp => "callbus, TCP",
            Target::Mosquitto => "Mosquitto, TCP",
        }
    }
}

/// The server under test: its process, and where clients and notifications go.
struct Server {
    proc: Proc,
    /// callbus's HTTP port (WebSocket and REST); none for Mosquitto.
    http: Option<u16>,
    mqtt: u16,
    _dir: tempfile::TempDir,
}

async fn start(target: Target) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    if target == Target::Mosquitto {
        let mqtt = free_port()?;
        let proc = spawn_mosquitto(dir.path(), mqtt).await?;
        return Ok(Server {
            proc,
            http: None,
            mqtt,
            _dir: dir,
        });
    }
    let (proc, http, mqtt) = spawn_callbus(dir.path()).await?;
    Ok(Server {
        proc,
        http: Some(http),
        mqtt,
        _dir: dir,
    })
}

async fn level(n: usize, target: Target) -> anyhow::Result<()> {
    let server = start(target).await?;
    let pid = server.proc.0.id();
    let auth = Authenticator::new(SECRET.as_bytes());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss = rss_kib(pid);

    let (tx, mut received) = mpsc::unbounded_channel::<Instant>();
    let gate = Arc::new(Semaphore::new(100));
    let connect_start = Instant::now();
    let mut clients = Vec::with_capacity(n);
    let mut lean = Vec::with_capacity(n);
    let mut waits = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("u{i}");
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        waits.push(ready);
        if let (Target::CallbusWs, Some(http)) = (target, server.http) {
            let token = auth.issue(&user, None, Role::User, 3600)?;
            let (tx, gate) = (tx.clone(), gate.clone());
            lean.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                if let Err(e) = ws_client(http, i, token, tx, ready_tx, permit.ok()).await {
                    eprintln!("client {i}: {e}");
                }
            }));
            continue;
        }
        let mut options = MqttOptions::new(format!("d{i}"), "127.0.0.1", server.mqtt);
        if target != Target::Mosquitto {
            options.set_credentials(&user, auth.issue(&user, None, Role::User, 3600)?);
        }
        options.set_keep_alive(Duration::from_secs(300));
        let (client, mut events) = AsyncClient::new(options, 10);
        client
            .subscribe(format!("users/{user}/notifications"), QoS::AtLeastOnce)
            .await?;
        let (tx, gate) = (tx.clone(), gate.clone());
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
                        // After the measurement, servers stop under their clients: not news.
                        if ready_tx.is_some() {
                            eprintln!("client {i}: {e}");
                        }
                        return;
                    }
                }
            }
        });
        clients.push(client);
    }
    for w in waits {
        tokio::time::timeout(Duration::from_secs(120), w).await??;
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(pid);
    let per_conn = (rss.saturating_sub(base_rss)) as f64 / n as f64;

    // One notification per user, fired at once; twice (the first round once cost more).
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let fired = Instant::now();
        match server.http {
            Some(http) => notify_rest(&auth, http, n)?,
            None => notify_mqtt(server.mqtt, n).await?,
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
        "| {n} | {} | {connect_secs:.1} s ({:.0}/s) | {:.1} MiB | {:.1} MiB | {per_conn:.2} KiB | {}/{n}, {}/{n} | {:.0} ms | {:.0} ms |",
        target.name(),
        n as f64 / connect_secs,
        base_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        rounds[0].0,
        rounds[1].0,
        rounds[0].1,
        rounds[1].1
    );
    drop(clients);
    for client in lean {
        client.abort();
    }
    Ok(())
}

/// One MQTT-over-WebSocket client for user `u{i}`: connects with `token`, subscribes to its
/// notifications topic at QoS 1 (then says `ready` and lets `permit` go), and acknowledges
/// every notification, telling `arrived` when each came. (rumqttc's WebSocket transport reads
/// through tungstenite's default 128 KiB buffer, zeroed on every read: that was a seventh of
/// the bench's CPU while the server, on the same two cores, notified 19,000 clients.)
async fn ws_client(
    port: u16,
    i: usize,
    token: String,
    arrived: mpsc::UnboundedSender<Instant>,
    ready: tokio::sync::oneshot::Sender<()>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use rumqttc::{Connect, PubAck, Subscribe};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    use tokio_tungstenite::tungstenite::Message;

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://127.0.0.1:{port}/mqtt").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    let user = format!("u{i}");
    let mut connect = Connect::new(format!("d{i}"));
    connect.keep_alive = 300;
    connect.set_login(user.as_str(), token);
    let mut subscribe = Subscribe::new(format!("users/{user}/notifications"), QoS::AtLeastOnce);
    subscribe.pkid = 1;
    let mut out = bytes::BytesMut::new();
    Packet::Connect(connect).write(&mut out, usize::MAX)?;
    Packet::Subscribe(subscribe).write(&mut out, usize::MAX)?;
    ws.send(Message::Binary(out.split().freeze())).await?;
    let (mut ready, mut permit) = (Some(ready), permit);
    let mut inbuf = bytes::BytesMut::new();
    while let Some(message) = ws.next().await {
        let Message::Binary(data) = message? else {
            continue;
        };
        inbuf.extend_from_slice(&data);
        loop {
            let packet = match Packet::read(&mut inbuf, usize::MAX) {
                Ok(packet) => packet,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => anyhow::bail!("{e:?}"),
            };
            match packet {
                Packet::SubAck(_) => {
                    permit.take();
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                Packet::Publish(publish) => {
                    let _ = arrived.send(Instant::now());
                    if publish.qos == QoS::AtLeastOnce {
                        Packet::PubAck(PubAck::new(publish.pkid)).write(&mut out, usize::MAX)?;
                        ws.send(Message::Binary(out.split().freeze())).await?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `POST /api/notifications/` for users u0..u{n}: 64 workers, each sending its share one
/// request after another on its own keep-alive connection, as an app backend does. (Each reply
/// is read: a reply dropped unread closes its connection, and every request then paid for a
/// new one, a connect among 19,000 ports in use and an accept.)
fn notify_rest(auth: &Authenticator, http: u16, n: usize) -> anyhow::Result<()> {
    const WORKERS: usize = 64;
    let client = reqwest::Client::new();
    let service = auth.issue("bench-app", None, Role::Service, 3600)?;
    let url = format!("http://127.0.0.1:{http}/api/notifications/");
    for worker in 0..WORKERS {
        let (client, service, url) = (client.clone(), service.clone(), url.clone());
        tokio::spawn(async move {
            for i in (worker..n).step_by(WORKERS) {
                let body = format!(r#"{{"user_id":"u{i}","payload":{{"verb":"bench"}}}}"#);
                let sent = client
                    .post(&url)
                    .bearer_auth(&service)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if let Ok(reply) = sent {
                    let _ = reply.bytes().await;
                }
            }
        });
    }
    Ok(())
}

/// One QoS 1 publish to each of users u0..u{n}'s topics from one MQTT client (the way to
/// notify through a plain broker).
async fn notify_mqtt(port: u16, n: usize) -> anyhow::Result<()> {
    let mut options = MqttOptions::new("bench-notifier", "127.0.0.1", port);
    options.set_inflight(1000);
    let (client, mut events) = AsyncClient::new(options, 1000);
    tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::spawn(async move {
        let payload =
            serde_json::json!({"type": "notification.created", "payload": {"verb": "bench"}});
        let payload = payload.to_string();
        for i in 0..n {
            let topic = format!("users/u{i}/notifications");
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

/// Runs each size against each server; `only` (`ws`, `tcp`, `mosquitto`) narrows the servers.
pub async fn run(sizes: &[usize], only: &[&str]) -> anyhow::Result<()> {
    let targets: Vec<Target> = [Target::CallbusWs, Target::CallbusTcp, Target::Mosquitto]
        .into_iter()
        .filter(|t| only.is_empty() || only.contains(&t.key()))
        .collect();
    anyhow::ensure!(
        !targets.is_empty(),
        "no server named {only:?}: use ws, tcp or mosquitto"
    );
    println!("\n## conns: idle MQTT clients, each subscribed to its own notifications topic");
    println!("| clients | server, transport | connect all (rate) | server RSS idle | server RSS with clients | RSS per connection | notified (round 1, 2) | all notified, round 1 | all notified, round 2 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        for &target in &targets {
            level(n, target).await?;
        }
    }
    Ok(())
}
