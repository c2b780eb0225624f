//! Shared helpers: an in-process callbus, MQTT clients, percentiles.

use callbus::auth::{Authenticator, Role};
use callbus::config::{FileConfig, DEFAULT_CONFIG};
use callbus::server::{Server, Settings};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::Duration;
use tokio::net::TcpListener;

pub const SECRET: &[u8] = b"bench-secret";

/// What a scenario needs of a callbus: its MQTT port, tokens, and REST POSTs.
pub trait Api: Send + Sync {
    fn mqtt_port(&self) -> u16;
    fn token(&self, sub: &str, role: Role) -> String;
    /// POSTs `body` to `path` as `user` (a user); the JSON reply of a 2xx, an error otherwise.
    fn post(
        &self,
        path: &str,
        user: &str,
        body: serde_json::Value,
    ) -> impl std::future::Future<Output = anyhow::Result<serde_json::Value>> + Send;
    /// Makes `members` the conversation `cid`'s members (as a service).
    fn set_members(
        &self,
        cid: &str,
        members: &[String],
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

impl Api for Callbus {
    fn mqtt_port(&self) -> u16 {
        self.server.mqtt_addr.port()
    }

    fn token(&self, sub: &str, role: Role) -> String {
        Callbus::token(self, sub, role)
    }

    async fn post(
        &self,
        path: &str,
        user: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.post_as(path, user, Role::User, body).await
    }

    async fn set_members(&self, cid: &str, members: &[String]) -> anyhow::Result<()> {
        Callbus::set_members(self, cid, members).await
    }
}

/// A callbus in its own process (so its RSS, files and CPU time are its own), with the bench's
/// REST client.
pub struct Remote {
    pub proc: crate::conns::Proc,
    pub http: u16,
    pub mqtt: u16,
    auth: Authenticator,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Remote {
    pub async fn start() -> anyhow::Result<Remote> {
        Self::start_with(&[]).await
    }

    /// With the default config's `[section] key = default` lines set as `config` says.
    pub async fn start_with(config: &[(&str, &str)]) -> anyhow::Result<Remote> {
        let dir = tempfile::tempdir()?;
        let mut text = callbus::config::DEFAULT_CONFIG.to_owned();
        // Benches start calls back to back from few users, past what one real user may.
        let unlimited = [
            ("initiate_per_minute", "6000000"),
            ("initiate_burst", "100000"),
        ];
        for (key, value) in unlimited.iter().chain(config) {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{key} = ")))
                .ok_or_else(|| anyhow::anyhow!("{key} is not in the default config"))?
                .to_owned();
            text = text.replace(&line, &format!("{key} = {value}"));
        }
        let path = dir.path().join("callbus.toml");
        std::fs::write(&path, text)?;
        let path = path.to_string_lossy().into_owned();
        let args = ["--config", path.as_str()];
        let data = dir.path().join("data");
        let (proc, http, mqtt) = crate::conns::spawn_callbus_with(&data, &args).await?;
        Ok(Remote {
            proc,
            http,
            mqtt,
            auth: Authenticator::new(crate::conns::SECRET.as_bytes()),
            client: reqwest::Client::new(),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Sends `body` with `method` to `path` as `who`; the JSON reply of a 2xx.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        who: (&str, Role),
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.http);
        let resp = self
            .client
            .request(method, url)
            .bearer_auth(self.token(who.0, who.1))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let value: serde_json::Value = resp.json().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "{path}: {status} {value}");
        Ok(value)
    }
}

impl Api for Remote {
    fn mqtt_port(&self) -> u16 {
        self.mqtt
    }

    fn token(&self, sub: &str, role: Role) -> String {
        self.auth.issue(sub, None, role, 24 * 3600).expect("token")
    }

    async fn post(
        &self,
        path: &str,
        user: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let who = (user, Role::User);
        self.send(reqwest::Method::POST, path, who, body).await
    }

    async fn set_members(&self, cid: &str, members: &[String]) -> anyhow::Result<()> {
        let path = format!("/api/conversations/{cid}/");
        let body = serde_json::json!({ "members": members });
        let who = ("bench-app", Role::Service);
        self.send(reqwest::Method::PUT, &path, who, body).await?;
        Ok(())
    }
}

pub struct Callbus {
    pub server: Server,
    pub auth: Authenticator,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Callbus {
    pub async fn start() -> anyhow::Result<Callbus> {
        Self::start_with(None).await
    }

    /// A node of a cluster (with `Some`), or the embedded mode.
    pub async fn start_with(
        cluster: Option<callbus::cluster::ClusterOptions>,
    ) -> anyhow::Result<Callbus> {
        let dir = tempfile::tempdir()?;
        // The default per-connection limit (200 publishes/s) is for real clients; the relay
        // scenario sends 2,000/s from one connection on purpose.
        // Calls are started back to back from few users too.
        let config = DEFAULT_CONFIG
            .replace("publish_rate = 200", "publish_rate = 100000")
            .replace("publish_burst = 500", "publish_burst = 100000")
            .replace("initiate_per_minute = 20", "initiate_per_minute = 6000000")
            .replace("initiate_burst = 10", "initiate_burst = 100000");
        let mut settings = Settings::new(
            FileConfig::parse(&config)?,
            dir.path().join("data"),
            SECRET.to_vec(),
        );
        settings.cluster = cluster;
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let mqtt = TcpListener::bind("127.0.0.1:0").await?;
        let server = Server::start(settings, http, mqtt).await?;
        Ok(Callbus {
            server,
            auth: Authenticator::new(SECRET),
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    pub fn token(&self, sub: &str, role: Role) -> String {
        self.auth.issue(sub, None, role, 3600).expect("token")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.http_addr, path)
    }

    pub async fn set_members(&self, cid: &str, members: &[String]) -> anyhow::Result<()> {
        let resp = self
            .http
            .put(self.url(&format!("/api/conversations/{cid}/")))
            .bearer_auth(self.token("bench-app", Role::Service))
            .json(&serde_json::json!({ "members": members }))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "PUT conversation: {}",
            resp.status()
        );
        Ok(())
    }

    pub async fn post_as(
        &self,
        path: &str,
        user: &str,
        role: Role,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(self.token(user, role))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let value: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "POST {path}: {status} {value}");
        Ok(value)
    }
}

/// Connects an MQTT client over TCP and subscribes; returns once the SUBACK arrived.
pub async fn mqtt_client(
    port: u16,
    client_id: &str,
    user: &str,
    password: &str,
    topics: &[String],
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    mqtt_client_with(port, client_id, user, password, topics, true).await
}

/// Like [`mqtt_client`], with `clean` as the CONNECT's clean-session flag.
pub async fn mqtt_client_with(
    port: u16,
    client_id: &str,
    user: &str,
    password: &str,
    topics: &[String],
    clean: bool,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_clean_session(clean)
        .set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_inflight(200);
    let (client, mut events) = AsyncClient::new(options, 1000);
    // Real clients (browsers, mobile SDKs) send small messages without Nagle; so does the bench,
    // on both paths, so that the figures measure the servers.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    for t in topics {
        client.subscribe(t.clone(), QoS::AtLeastOnce).await?;
    }
    let mut acks = 0;
    while acks < topics.len() {
        if let Event::Incoming(Packet::SubAck(_)) =
            tokio::time::timeout(Duration::from_secs(10), events.poll()).await??
        {
            acks += 1;
        }
    }
    Ok((client, events))
}

/// utime + stime of process `pid`, in clock ticks (100 per second on Linux).
/// A counter from a callbus's `GET /metrics` (0 if it cannot be read).
pub async fn metric(http: u16, name: &str) -> u64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{http}/metrics")).await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Context switches (voluntary and not) of the live threads of process `pid`.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// CPU time (user + system) of process `pid` in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Locks `mutex`, also one a panicking holder left poisoned.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `p`-th percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// One line about this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    format!("{cpus} cores ({model}), {mem} GiB")
}
