//! The real engines of cluster mode, on loopback ports: `nats-server` processes clustered with
//! each other, a throw-away PostgreSQL (initdb in a temp dir, run as the `postgres` user when
//! the tests run as root, since PostgreSQL refuses root), and callbus nodes on them.

use callbus::auth::Role;

use super::process::{spawn_with, token, Proc};
use super::{Client, Via};

#[path = "../../bench/src/engines.rs"]
mod engines;
pub use engines::{free_port, Nats, Postgres};

/// NATS, PostgreSQL and callbus nodes on them (node `i` prefers NATS server `i`).
pub struct Cluster {
    pub nats: Nats,
    pub pg: Postgres,
    pub nodes: Vec<Proc>,
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    pub async fn start(nodes: usize) -> Cluster {
        Self::start_with(nodes, &[]).await
    }

    /// Nodes started with `extra` arguments besides the cluster's.
    pub async fn start_with(nodes: usize, extra: &[&str]) -> Cluster {
        let nats = Nats::start(3).await.expect("nats-server");
        let pg = Postgres::start().await.expect("postgres");
        let mut cluster = Cluster {
            nats,
            pg,
            nodes: Vec::new(),
            dirs: Vec::new(),
        };
        for _ in 0..nodes {
            cluster.add_node(extra).await;
        }
        cluster
    }

    /// Starts one more node, with `extra` arguments besides the cluster's.
    pub async fn add_node(&mut self, extra: &[&str]) {
        let i = self.dirs.len();
        let dir = tempfile::tempdir().expect("temp dir");
        let nats = self.nats.urls_from(i % 3);
        let database = self.pg.url();
        let node_id = format!("n{}", i + 1);
        let mut args = vec!["--cluster", &nats, "--database", &database];
        args.extend(["--node-id", &node_id]);
        args.extend(extra);
        self.nodes.push(spawn_with(dir.path(), &args).await);
        self.dirs.push(dir);
    }

    pub fn node(&self, i: usize) -> &Proc {
        &self.nodes[i]
    }
}

impl Proc {
    /// Connects `user` (client id `<user>-dev`) over `via`.
    pub async fn connect(&self, via: Via, user: &str) -> Client {
        let client_id = format!("{user}-dev");
        self.connect_with(via, user, &client_id, |_| {}).await
    }

    /// Connects `user` under `client_id` over `via`, with options set by `configure`.
    pub async fn connect_with(
        &self,
        via: Via,
        user: &str,
        client_id: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Client {
        self.try_connect_with(via, user, client_id, configure)
            .await
            .expect("connect")
    }

    /// [`Proc::connect_with`], or why the connection failed.
    pub async fn try_connect_with(
        &self,
        via: Via,
        user: &str,
        client_id: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Result<Client, rumqttc::ConnectionError> {
        let password = token(user, Role::User);
        let ports = (self.http, self.mqtt);
        Client::connect_to(ports, via, client_id, user, &password, configure).await
    }

    /// A metric's value in this process's `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.http);
        let text = reqwest::get(url).await.expect("metrics").text().await;
        let text = text.expect("metrics body");
        let line = text.lines().find(|l| l.split(' ').next() == Some(name));
        let value = line.and_then(|l| l.split(' ').nth(1)).unwrap_or("0");
        value.parse().expect("a number")
    }
}
