//! Test harness: a real callbus on ephemeral 127.0.0.1 ports with sled in a temp dir, real
//! rumqttc clients over TCP or WebSocket, real HTTP.
#![allow(dead_code)]

use callbus::auth::{Authenticator, Claims, Role};
use callbus::config::{FileConfig, DEFAULT_CONFIG};
use callbus::server::{Server, Settings};
use rumqttc::ConnectionError;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

mod client;
pub mod cluster;
pub mod node;
pub mod process;
pub mod raw;
pub mod webhook;
pub use client::*;

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
        // Tests start calls back to back from the same few users: the default limit on
        // starting calls is raised unless a test set its own.
        let config = config
            .replace(
                "initiate_per_minute = 20\n",
                "initiate_per_minute = 6000000\n",
            )
            .replace("initiate_burst = 10\n", "initiate_burst = 100000\n");
        let settings = Settings::new(
            FileConfig::parse(&config).expect("config"),
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
        Client::connect(self, via, client_id, username, password, |_| {}).await
    }

    /// Connects `user` under `client_id` with options adjusted by `configure`.
    pub async fn connect_with(
        &self,
        via: Via,
        user: &str,
        client_id: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Result<Client, ConnectionError> {
        let token = self.token(user);
        Client::connect(self, via, client_id, user, &token, configure).await
    }

    /// Connects `user` with `clean_session = 0` under `client_id`.
    pub async fn connect_persistent(&self, via: Via, user: &str, client_id: &str) -> Client {
        self.connect_with(via, user, client_id, |o| {
            o.set_clean_session(false);
        })
        .await
        .expect("connect")
    }

    /// The value of a metric in `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self
            .http_client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    }

    /// POST `/api/calls/initiate/` in conversation `c1` as `caller`.
    pub async fn initiate(
        &self,
        caller: &str,
        receiver: Value,
        call_type: &str,
    ) -> (reqwest::StatusCode, Value) {
        let body = serde_json::json!({
            "receiver_id": receiver, "call_type": call_type, "conversation_id": "c1"
        });
        self.post("/api/calls/initiate/", &self.token(caller), body)
            .await
    }

    /// A server with conversation `c1` of alice, bob and carol.
    pub async fn with_c1() -> TestServer {
        let s = TestServer::start().await;
        s.set_members("c1", &["alice", "bob", "carol"]).await;
        s
    }

    /// A client of `user` subscribed to its own notifications.
    pub async fn listener(&self, via: Via, user: &str) -> Client {
        let mut c = self.connect(via, user).await;
        let topic = format!("users/{user}/notifications");
        assert!(granted(&c.subscribe(&[topic.as_str()]).await[0]));
        c
    }
}
