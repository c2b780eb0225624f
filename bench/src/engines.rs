//! The real engines of cluster mode on loopback ports, for the benchmarks and the tests:
//! `nats-server` processes clustered with each other, and a throw-away PostgreSQL (initdb in a
//! temp dir, run as the `postgres` user when we are root, since PostgreSQL refuses root).
//! (The tests include this file by path.)

#![allow(dead_code)] // shared with the tests, which use other parts

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The loopback ports servers started by this process are given: below the kernel's range
/// for outgoing connections (32768-60999 by default) and for `bind(0)`.
const PORTS: std::ops::Range<u32> = 20_000..32_000;

/// A free loopback port for a server this process starts. No port is handed out twice by one
/// process (until all of [`PORTS`] were), and none is in the kernel's ephemeral range: a
/// server stopped to be restarted on its port finds it still free, since neither another
/// test's server nor an outgoing connection took it meanwhile (a node of one test reconnecting
/// to a server of another would mix two clusters' messages).
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = PORTS.end - PORTS.start;
    // Processes running side by side start at different places.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let Ok(port) = u16::try_from(PORTS.start + (start + n) % span) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port left",
    ))
}

/// Waits (at most 10 s) until something accepts TCP connections on `port`.
async fn until_listening(port: u16, what: &str) -> std::io::Result<()> {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(std::io::Error::other(format!(
        "{what} did not listen on {port}"
    )))
}

/// NATS servers in one cluster, with JetStream.
pub struct Nats {
    pub ports: Vec<u16>,
    route_ports: Vec<u16>,
    servers: Vec<Option<Owned>>,
    /// JetStream's storage, one directory per server.
    store: tempfile::TempDir,
}

impl Nats {
    pub async fn start(count: usize) -> std::io::Result<Nats> {
        let mut nats = Nats {
            ports: (0..count).map(|_| free_port()).collect::<Result<_, _>>()?,
            route_ports: (0..count).map(|_| free_port()).collect::<Result<_, _>>()?,
            servers: (0..count).map(|_| None).collect(),
            store: tempfile::tempdir()?,
        };
        for i in 0..count {
            nats.start_server(i)?;
        }
        for port in nats.ports.clone() {
            until_listening(port, "nats-server").await?;
        }
        Ok(nats)
    }

    /// Starts server `i` (again), on its ports and storage.
    pub fn start_server(&mut self, i: usize) -> std::io::Result<()> {
        let routes: Vec<String> = (self.route_ports.iter().enumerate())
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.ports[i].to_string()])
            // A name of its own: clusters started side by side (tests in parallel) that reach
            // each other's ports through a reused port number refuse to merge.
            .args(["-n", &format!("nats-{i}"), "--cluster_name", &self.name()])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.route_ports[i]),
            ])
            .args(["--routes", &routes.join(",")])
            .arg("-js")
            .arg("-sd")
            .arg(self.store.path().join(format!("nats-{i}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!("nats-server (Debian's nats-server): {e}"))
            })?;
        self.servers[i] = Some(Owned(child));
        Ok(())
    }

    /// The cluster's name, unique among those running (its first server's port).
    fn name(&self) -> String {
        format!("callbus-{}", self.ports[0])
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

    /// The process id of server `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].as_ref().map(|server| server.0.id())
    }
}

/// A throw-away PostgreSQL server.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    server: Option<Owned>,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
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

fn run(mut command: Command, what: &str) -> std::io::Result<()> {
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| std::io::Error::other(format!("{what} (Debian's postgresql): {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{what} failed: {status}")))
    }
}

impl Postgres {
    pub async fn start() -> std::io::Result<Postgres> {
        let dir = tempfile::tempdir()?;
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(dir.path());
            run(chown, "chown the data dir to postgres")?;
        }
        let mut initdb = as_pg_user(&pg_bin("initdb"));
        initdb
            .args(["-A", "trust", "-U", "callbus", "-D"])
            .arg(dir.path().join("data"));
        run(initdb, "initdb")?;
        let mut pg = Postgres {
            port: free_port()?,
            dir,
            server: None,
        };
        pg.resume().await?;
        Ok(pg)
    }

    /// (Re)starts the server on the same data and port.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        let child = as_pg_user(&pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.server = Some(Owned(child));
        until_listening(self.port, "postgres").await
    }

    /// Stops the server at once (immediate mode: like a crash, recovered at the next start).
    pub fn stop(&mut self) -> std::io::Result<()> {
        let mut pg_ctl = as_pg_user(&pg_bin("pg_ctl"));
        pg_ctl
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"));
        run(pg_ctl, "pg_ctl stop")?;
        self.server = None;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("postgres://callbus@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` through psql; what it printed (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> std::io::Result<String> {
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
            .output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(std::io::Error::other(format!("{sql}: {err}")));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.server.is_some() {
            let _ = self.stop();
        }
    }
}
