//! The real `callbus` binary as a child process, for tests that kill it (SIGKILL) and start it
//! again on the same data dir.

use callbus::auth::{Authenticator, Role};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const SECRET: &str = "process-test-secret";

pub struct Proc {
    pub child: Child,
    pub http: u16,
    pub mqtt: u16,
}

impl Proc {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// Sends `body` (if any) with `method` to `path` as `who`; the status and JSON reply.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        who: (&str, Role),
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut request = reqwest::Client::new()
            .request(method, self.url(path))
            .bearer_auth(token(who.0, who.1));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("HTTP request");
        let status = response.status();
        (status, response.json().await.unwrap_or_default())
    }

    /// PUT a conversation's members as the main app.
    pub async fn set_members(&self, cid: &str, members: &[&str]) {
        let body = serde_json::json!({ "members": members });
        let path = format!("/api/conversations/{cid}/");
        let (status, _) = self
            .call(
                reqwest::Method::PUT,
                &path,
                ("app", Role::Service),
                Some(body),
            )
            .await;
        assert!(status.is_success(), "PUT conversation: {status}");
    }

    /// A call from `caller` to `receiver` in `c1`; the 201's body.
    pub async fn initiate(&self, caller: &str, receiver: &str) -> serde_json::Value {
        let body = serde_json::json!({
            "receiver_id": receiver, "call_type": "voice", "conversation_id": "c1"
        });
        let (status, call) = self
            .call(
                reqwest::Method::POST,
                "/api/calls/initiate/",
                (caller, Role::User),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{call}");
        call
    }

    /// Waits (bounded) until call `id` is no longer active, as its party `who` sees it.
    pub async fn until_not_active(&self, id: u64, who: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        let path = format!("/api/calls/{id}/");
        loop {
            let (_, call) = self
                .call(reqwest::Method::GET, &path, (who, Role::User), None)
                .await;
            if call["status"] != "active" {
                return call;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still active: {call}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    super::cluster::free_port().expect("free port")
}

/// The shipped configuration with its `section.key` lines set as `set` says.
pub fn configured(set: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = callbus::config::DEFAULT_CONFIG
        .lines()
        .map(str::to_owned)
        .collect();
    for (name, value) in set {
        let (section, key) = name.split_once('.').expect("section.key");
        let start = lines
            .iter()
            .position(|l| *l == format!("[{section}]"))
            .unwrap_or_else(|| panic!("no [{section}] in the shipped config"));
        let at = lines[start..]
            .iter()
            .position(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {name} in the shipped config"));
        lines[start + at] = format!("{key} = {value}");
    }
    lines.join("\n") + "\n"
}

/// Starts callbus (through `wrapper`, if any) with the shipped configuration set as `set`
/// says (`section.key`, value).
pub async fn spawn_configured(wrapper: &[&str], dir: &Path, set: &[(&str, &str)]) -> Proc {
    let text = configured(set);
    std::fs::create_dir_all(dir).expect("data dir");
    let path = dir.join("configured.toml");
    std::fs::write(&path, text).expect("write the config");
    let path = path.to_string_lossy().into_owned();
    spawn_via(wrapper, dir, &["--config", &path]).await
}

pub async fn spawn_with(dir: &Path, args: &[&str]) -> Proc {
    spawn_via(&[], dir, args).await
}

/// Starts callbus through `wrapper` (a command that execs the rest, e.g. `prlimit ... --`).
pub async fn spawn_via(wrapper: &[&str], dir: &Path, args: &[&str]) -> Proc {
    spawn_inner(wrapper, dir, args, None).await
}

/// Starts callbus logging at `filter` (`RUST_LOG`); its log lines come through the receiver.
pub async fn spawn_logged(
    dir: &Path,
    filter: &str,
) -> (Proc, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut proc = spawn_inner(&[], dir, &[], Some(filter)).await;
    let stderr = proc.child.stderr.take().expect("piped stderr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (proc, rx)
}

/// The shipped configuration with the limit on starting calls raised (tests start calls back to
/// back from the same few users), written in the data dir `dir`.
fn test_config(dir: &Path) -> std::path::PathBuf {
    let text = callbus::config::DEFAULT_CONFIG
        .replace(
            "initiate_per_minute = 20\n",
            "initiate_per_minute = 6000000\n",
        )
        .replace("initiate_burst = 10\n", "initiate_burst = 100000\n");
    let path = dir.join("callbus-test.toml");
    std::fs::create_dir_all(dir).expect("data dir");
    std::fs::write(&path, text).expect("write the test config");
    path
}

async fn spawn_inner(wrapper: &[&str], dir: &Path, args: &[&str], log: Option<&str>) -> Proc {
    let (http, mqtt) = (free_port(), free_port());
    let config = test_config(dir);
    let config = match args.contains(&"--config") {
        true => Vec::new(),
        false => vec!["--config".to_owned(), config.to_string_lossy().into_owned()],
    };
    let exe = env!("CARGO_BIN_EXE_callbus");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let child = command
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(&config)
        .args(args)
        .env("CALLBUS_JWT_SECRET", SECRET)
        // CALLBUS_TEST_LOG sets what a node logs when the test reads no lines (to debug one).
        .env("RUST_LOG", log.map_or_else(test_log, str::to_owned))
        .stdout(Stdio::null())
        .stderr(match log {
            Some(_) => Stdio::piped(),
            None => Stdio::inherit(),
        })
        .spawn()
        .expect("spawn callbus");
    let mut proc = Proc { child, http, mqtt };
    let client = reqwest::Client::new();
    // Up to 75 s: a cluster node's start (PostgreSQL, NATS, its streams) on a loaded 2-core
    // machine has taken more than 30 (a node waits up to 60 s for JetStream).
    for _ in 0..3000 {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("callbus exited before it became healthy: {status}");
        }
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{http}/healthz"))
            .send()
            .await
        {
            if r.status() == StatusCode::OK {
                return proc;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("callbus did not become healthy");
}

pub fn token(sub: &str, role: Role) -> String {
    Authenticator::new(SECRET.as_bytes())
        .issue(sub, None, role, 3600)
        .unwrap()
}

/// A rumqttc client of `user` (client id `<user>-dev`) past its CONNACK.
pub async fn mqtt(proc: &Proc, user: &str) -> Result<(AsyncClient, EventLoop), String> {
    let mut options = MqttOptions::new(format!("{user}-dev"), "127.0.0.1", proc.mqtt);
    options.set_credentials(user, token(user, Role::User));
    let (client, mut events) = AsyncClient::new(options, 10);
    match tokio::time::timeout(super::WAIT, events.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok((client, events)),
        other => Err(format!("{other:?}")),
    }
}

/// The next incoming packet that `pick` accepts (others skipped), bounded by [`super::WAIT`].
pub async fn next<T>(events: &mut EventLoop, pick: impl Fn(Packet) -> Option<T>) -> T {
    loop {
        let event = tokio::time::timeout(super::WAIT, events.poll()).await;
        if let Event::Incoming(packet) = event.expect("in time").expect("connected") {
            if let Some(found) = pick(packet) {
                return found;
            }
        }
    }
}

fn test_log() -> String {
    std::env::var("CALLBUS_TEST_LOG").unwrap_or_else(|_| "warn".to_owned())
}
