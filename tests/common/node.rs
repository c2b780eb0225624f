//! Node scripts under tests/e2e (MQTT.js, and playwright-core driving Debian's Chromium), run
//! from the project root with `npm ci`'s packages.

use std::process::Command;

/// Runs `tests/e2e/<script>` with `args` and `env`; asserts it succeeded and returns its
/// standard output.
pub async fn run(script: &str, args: Vec<String>, env: Vec<(&'static str, String)>) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let path = format!("{root}/tests/e2e/{script}");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(path)
            .args(args)
            .envs(env)
            .current_dir(root)
            .output()
    })
    .await
    .expect("join")
    .expect("node runs (npm ci installs its packages)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{stderr}"
    );
    stdout
}
