//! The real engines of cluster mode, on loopback ports: `nats-server` processes clustered with
//! each other, a throw-away PostgreSQL (initdb in a temp dir, run as the `postgres` user when
//! the tests run as root, since PostgreSQL refuses root), and callbus nodes on them.

use callbus::auth::Role;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{free_port, spawn_with, token, Proc};
use super::{Client, Via, WAIT};

/// A child process killed when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until something accepts TCP connections on `port`.
async fn until_listening(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// NATS servers in one cluster.
pub struct Nats {
    pub ports: Vec<u16>,
    route_ports: Vec<u16>,
    servers: Vec<Option<Owned>>,
}

impl Nats {
    pub async fn start(count: usize) -> Nats {
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let mut nats = Nats {
            servers: (0..count).map(|_| None).collect(),
            ports,
            route_ports,
        };
        for i in 0..count {
            nats.start_server(i);
        }
        for port in nats.ports.clone() {
            until_listening(port, "nats-server").await;
        }
        nats
    }

    fn start_server(&mut self, i: usize) {
        let routes: Vec<String> = (self.route_ports.iter().enumerate())
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.ports[i].to_string()])
            .args(["-n", &format!("nats-{i}"), "--cluster_name", "callbus"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.route_ports[i]),
            ])
            .args(["--routes", &routes.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server) must be installed");
        self.servers[i] = Some(Owned(child));
    }

    /// Every server's URL, starting with server `first`'s (a node connects to the first one
    /// that answers).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.ports.len();
        let urls = (0..n).map(|k| format!("nats://127.0.0.1:{}", self.ports[(first + k) % n]));
        urls.collect::<Vec<_>>().join(",")
    }

    /// Kills server `i`.
    pub fn kill(&mut self, i: usize) {
        self.servers[i] = None;
    }
}

/// A throw-away PostgreSQL server.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    server: Option<Owned>,
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// PostgreSQL's server programs (Debian keeps them off PATH).
fn pg_bin(program: &str) -> PathBuf {
    let installed = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            let mut found: Vec<PathBuf> = versions
                .flatten()
                .map(|v| v.path().join("bin").join(program))
                .filter(|p| p.exists())
                .collect();
            found.sort();
            found.pop()
        });
    installed.unwrap_or_else(|| PathBuf::from(program))
}

/// `program` run as the `postgres` user when we are root.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub async fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the data dir to postgres");
        }
        let status = as_pg_user(&pg_bin("initdb"))
            .args(["-A", "trust", "-U", "callbus", "-D"])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb (Debian package postgresql) must be installed");
        assert!(status.success(), "initdb failed");
        let mut pg = Postgres {
            port: free_port(),
            dir,
            server: None,
        };
        pg.resume().await;
        pg
    }

    /// (Re)starts the server on the same data and port.
    pub async fn resume(&mut self) {
        let child = as_pg_user(&pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.server = Some(Owned(child));
        until_listening(self.port, "postgres").await;
    }

    /// Stops the server at once (SIGKILL for `runuser`'s child is not ours to send, so stop
    /// it with pg_ctl's immediate mode).
    pub fn stop(&mut self) {
        let status = as_pg_user(&pg_bin("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl stop");
        self.server = None;
    }

    pub fn url(&self) -> String {
        format!("postgres://callbus@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` through psql; what it printed (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(),
                "-c",
                sql,
            ])
            .output()
            .expect("psql (Debian package postgresql-client)");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.server.is_some() {
            self.stop();
        }
    }
}

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
        let nats = Nats::start(3).await;
        let pg = Postgres::start().await;
        let mut cluster = Cluster {
            nats,
            pg,
            nodes: Vec::new(),
            dirs: Vec::new(),
        };
        for i in 0..nodes {
            let dir = tempfile::tempdir().expect("temp dir");
            let nats = cluster.nats.urls_from(i % 3);
            let database = cluster.pg.url();
            let node_id = format!("n{}", i + 1);
            let mut args = vec!["--cluster", &nats, "--database", &database];
            args.extend(["--node-id", &node_id]);
            args.extend(extra);
            cluster.nodes.push(spawn_with(dir.path(), &args).await);
            cluster.dirs.push(dir);
        }
        cluster
    }

    pub fn node(&self, i: usize) -> &Proc {
        &self.nodes[i]
    }
}

impl Proc {
    /// Connects `user` (client id `<user>-dev`) over `via`.
    pub async fn connect(&self, via: Via, user: &str) -> Client {
        let password = token(user, Role::User);
        let client_id = format!("{user}-dev");
        Client::connect_to(
            (self.http, self.mqtt),
            via,
            &client_id,
            user,
            &password,
            |_| {},
        )
        .await
        .expect("connect")
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
