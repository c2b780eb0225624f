//! The real `callbus` binary as a child process, for tests that kill it (SIGKILL) and start it
//! again on the same data dir.

use callbus::auth::{Authenticator, Role};
use reqwest::StatusCode;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const SECRET: &str = "process-test-secret";

pub struct Proc {
    pub child: Child,
    pub http: u16,
    pub mqtt: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub async fn spawn_with(dir: &Path, args: &[&str]) -> Proc {
    let (http, mqtt) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_callbus"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(args)
        .env("CALLBUS_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn callbus");
    let proc = Proc { child, http, mqtt };
    let client = reqwest::Client::new();
    for _ in 0..200 {
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
