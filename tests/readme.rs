//! The README's mosquitto walkthrough, run as written against a real callbus process (only the
//! ports and the binary's path are substituted).

use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn mosquitto_block(readme: &str) -> String {
    let section = readme
        .split("## Trying it with mosquitto")
        .nth(1)
        .expect("mosquitto section");
    let start = section.find("```sh\n").expect("sh block") + "```sh\n".len();
    let end = section[start..].find("```").expect("block end") + start;
    section[start..end].to_owned()
}

#[tokio::test]
async fn readme_mosquitto_walkthrough_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (http, mqtt) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_callbus"))
        .args(["serve", "--dev", "--data-dir"])
        .arg(dir.path())
        .args([
            "--http",
            &format!("127.0.0.1:{http}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
        ])
        .env_remove("CALLBUS_JWT_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let mut healthy = false;
    for _ in 0..200 {
        if client
            .get(format!("http://127.0.0.1:{http}/healthz"))
            .send()
            .await
            .is_ok()
        {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(healthy);

    let script = mosquitto_block(&readme)
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("-p 1883", &format!("-p {mqtt}"))
        .replace("./target/release/callbus", env!("CARGO_BIN_EXE_callbus"));
    let run = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["30", "bash", "-euo", "pipefail", "-c", &script])
            .output()
    });
    let out = run.await.unwrap().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The PUT's reply, then bob's and the operator's copy of alice's stamped message.
    assert!(stdout.contains(r#""members":["alice","bob"]"#), "{stdout}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("chat/c1 "))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for line in lines {
        assert!(
            line.contains(r#""sender_id":"alice""#) && line.contains(r#""text":"hi""#),
            "{line}"
        );
    }
}
