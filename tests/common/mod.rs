//! Test harness: a real callbus on ephemeral 127.0.0.1 ports with sled in a temp dir, real
//! rumqttc clients over TCP or WebSocket, real HTTP.
#![allow(dead_code)]

use callbus::auth::{Authenticator, Claims, Role};
use callbus::config::{FileConfig, DEFAULT_CONFIG};
use callbus::server::{Server, Settings};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode, Transport,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub const SECRET: &[u8] = b"test-secret";
/// Upper bound for any single awaited event; tests never wait this long when they pass.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub server: Option<Server>,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub auth: Authenticator,
    pub http_client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(DEFAULT_CONFIG).await
    }

    pub async fn start_with(config: &str) -> TestServer {
        Self::start_custom(config, |_| {}).await
    }

    /// Starts with the settings adjusted by `adjust` (ring timeout, TURN, CORS, dev mode).
    pub async fn start_custom(config: &str, adjust: impl FnOnce(&mut Settings)) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings::new(
            FileConfig::parse(config).expect("config"),
            dir.path().join("data"),
            SECRET.to_vec(),
        );
        let mut settings = settings;
        adjust(&mut settings);
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let mqtt = TcpListener::bind("127.0.0.1:0").await.expect("bind mqtt");
        let server = Server::start(settings, http, mqtt).await.expect("start");
        TestServer {
            http: server.http_addr,
            mqtt: server.mqtt_addr,
            server: Some(server),
            auth: Authenticator::new(SECRET),
            http_client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn token(&self, sub: &str) -> String {
        self.token_with(sub, Role::User)
    }

    pub fn token_with(&self, sub: &str, role: Role) -> String {
        self.auth
            .issue(sub, Some(&format!("{sub}-name")), role, 3600)
            .expect("token")
    }

    pub fn expired_token(&self, sub: &str) -> String {
        self.auth
            .sign(&Claims {
                sub: sub.into(),
                exp: callbus::auth::unix_now() - 3600,
                username: None,
                first_name: None,
                last_name: None,
                role: Role::User,
            })
            .expect("token")
    }

    /// POST JSON as `token`; returns the status and JSON body (null if none).
    pub async fn post(&self, path: &str, token: &str, body: Value) -> (reqwest::StatusCode, Value) {
        let resp = self
            .http_client
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// POST `/api/calls/{id}/{action}/` as user `who`.
    pub async fn act(
        &self,
        id: u64,
        action: &str,
        who: &str,
        body: Value,
    ) -> (reqwest::StatusCode, Value) {
        self.post(
            &format!("/api/calls/{id}/{action}/"),
            &self.token(who),
            body,
        )
        .await
    }

    /// GET as `token`; returns the status and JSON body.
    pub async fn get(&self, path: &str, token: &str) -> (reqwest::StatusCode, Value) {
        let resp = self
            .http_client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// PUT a conversation's members as the main app's backend.
    pub async fn set_members(&self, cid: &str, members: &[&str]) {
        let resp = self
            .http_client
            .put(self.url(&format!("/api/conversations/{cid}/")))
            .bearer_auth(self.token_with("app", Role::Service))
            .json(&serde_json::json!({ "members": members }))
            .send()
            .await
            .expect("PUT conversation");
        assert!(
            resp.status().is_success(),
            "PUT conversation: {}",
            resp.status()
        );
    }

    pub async fn connect(&self, via: Via, user: &str) -> Client {
        let token = self.token(user);
        self.connect_as(via, &format!("{user}-dev"), user, &token)
            .await
            .expect("connect")
    }

    pub async fn connect_as(
        &self,
        via: Via,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Client, ConnectionError> {
        Client::connect(self, via, client_id, username, password).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Ws,
}

pub const BOTH: [Via; 2] = [Via::Tcp, Via::Ws];

/// A message a client received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("JSON payload")
    }
}

/// A real MQTT client (rumqttc) with its event loop on a task.
pub struct Client {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
    /// Messages that arrived while waiting for an acknowledgement; `recv` returns them first.
    held: std::collections::VecDeque<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn connect(
        server: &TestServer,
        via: Via,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Client, ConnectionError> {
        let mut options = match via {
            Via::Tcp => MqttOptions::new(client_id, "127.0.0.1", server.mqtt.port()),
            Via::Ws => {
                let url = format!("ws://127.0.0.1:{}/mqtt", server.http.port());
                let mut o = MqttOptions::new(client_id, url, server.http.port());
                o.set_transport(Transport::Ws);
                o
            }
        };
        options
            .set_credentials(username, password)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return; // no reconnects: tests see every disconnect
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("CONNACK in time")
            .expect("event loop alive");
        match first {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(Client {
                client,
                events,
                held: Default::default(),
                task,
            }),
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(e) => {
                task.abort();
                Err(e)
            }
        }
    }

    /// Next packet (or the connection's end), bounded by [`WAIT`].
    pub async fn next_packet(&mut self) -> Result<Packet, ConnectionError> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an MQTT event in time")
            .unwrap_or(Err(ConnectionError::RequestsDone))
    }

    /// Subscribes and waits for the SUBACK's return codes.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let topics: Vec<_> = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce))
            .collect();
        self.client.subscribe_many(topics).await.expect("subscribe");
        loop {
            match self.next_packet().await {
                Ok(Packet::SubAck(ack)) => return ack.return_codes,
                Ok(Packet::Publish(p)) => self.hold(p),
                Ok(_) => {}
                Err(e) => panic!("connection ended before SUBACK: {e:?}"),
            }
        }
    }

    /// Publishes with QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
        loop {
            match self.next_packet().await {
                Ok(Packet::PubAck(_)) => return,
                Ok(Packet::Publish(p)) => self.hold(p),
                Ok(_) => {}
                Err(e) => panic!("connection ended before PUBACK: {e:?}"),
            }
        }
    }

    /// Publishes JSON with QoS 1 and waits for the PUBACK.
    pub async fn publish_json(&mut self, topic: &str, value: Value) {
        self.publish(topic, value.to_string()).await;
    }

    fn hold(&mut self, p: rumqttc::Publish) {
        self.held.push_back(Received {
            topic: p.topic,
            payload: p.payload.to_vec(),
            qos: p.qos,
        });
    }

    /// The next message delivered to this client (skipping acks).
    pub async fn recv(&mut self) -> Received {
        if let Some(held) = self.held.pop_front() {
            return held;
        }
        loop {
            match self.next_packet().await {
                Ok(Packet::Publish(p)) => {
                    return Received {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: p.qos,
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("connection ended while waiting for a message: {e:?}"),
            }
        }
    }

    /// The next message whose JSON `type` is `kind` (other messages are skipped).
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let msg = self.recv().await;
            let v = msg.json();
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Waits until the server closes this connection; returns false if a message came first.
    pub async fn closed(&mut self) -> bool {
        if !self.held.is_empty() {
            return false;
        }
        loop {
            match self.next_packet().await {
                Err(_) => return true,
                Ok(Packet::Publish(_)) => return false,
                Ok(_) => {}
            }
        }
    }
}

/// Whether a SUBACK return code granted the subscription.
pub fn granted(code: &SubscribeReasonCode) -> bool {
    matches!(code, SubscribeReasonCode::Success(_))
}

/// Encodes a CONNECT by hand (with an arbitrary protocol level).
pub fn raw_connect(level: u8, keep_alive: u16, password: &str) -> Vec<u8> {
    let name: &[u8] = if level == 3 { b"MQIsdp" } else { b"MQTT" };
    let mut var = Vec::new();
    var.extend_from_slice(&(name.len() as u16).to_be_bytes());
    var.extend_from_slice(name);
    var.push(level);
    var.push(0b0100_0010); // password flag + clean session
    var.extend_from_slice(&keep_alive.to_be_bytes());
    var.extend_from_slice(&4u16.to_be_bytes());
    var.extend_from_slice(b"raw1");
    var.extend_from_slice(&(password.len() as u16).to_be_bytes());
    var.extend_from_slice(password.as_bytes());
    let mut out = vec![0x10];
    let mut len = var.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&var);
    out
}
