//! Memory bounded by live state: N distinct users, none connected, each notified once through
//! `POST /api/notifications/` against a separate callbus process; its RSS along the way and
//! after, against its RSS at start.

use callbus::auth::{Authenticator, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use crate::conns::{rss_kib, spawn_callbus, SECRET};

/// Requests in flight at once.
const IN_FLIGHT: usize = 64;

pub async fn run(n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (proc, http, _) = spawn_callbus(dir.path()).await?;
    let pid = proc.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start_rss = rss_kib(pid);
    let auth = Authenticator::new(SECRET.as_bytes());
    let service = auth.issue("bench-app", None, Role::Service, 24 * 3600)?;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/api/notifications/");
    println!("\n## notified: {n} distinct users notified once, none connected");
    println!("| users notified | elapsed | rate | server RSS | RSS above start |");
    println!("|---|---|---|---|---|");
    println!("| 0 | 0 s | | {:.1} MiB | |", start_rss as f64 / 1024.0);
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let step = (n / 10).max(1);
    let mut peak = start_rss;
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let (client, url, service, failed) =
            (client.clone(), url.clone(), service.clone(), failed.clone());
        tokio::spawn(async move {
            let body =
                serde_json::json!({"user_id": format!("user{i}"), "payload": {"verb": "bench"}});
            let sent = client
                .post(&url)
                .bearer_auth(service)
                .json(&body)
                .send()
                .await;
            if !sent.is_ok_and(|r| r.status().is_success()) {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
        if (i + 1) % step == 0 {
            let rss = rss_kib(pid);
            peak = peak.max(rss);
            let secs = started.elapsed().as_secs_f64();
            println!(
                "| {} | {secs:.0} s | {:.0}/s | {:.1} MiB | {:.1} MiB |",
                i + 1,
                (i + 1) as f64 / secs,
                rss as f64 / 1024.0,
                rss.saturating_sub(start_rss) as f64 / 1024.0
            );
        }
    }
    let _ = gate.acquire_many(IN_FLIGHT as u32).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = rss_kib(pid);
    println!(
        "| {n}, 5 s later | | | {:.1} MiB | {:.1} MiB |",
        rss as f64 / 1024.0,
        rss.saturating_sub(start_rss) as f64 / 1024.0
    );
    let failed = failed.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "\nper user ever notified: {:.3} KiB at the end; peak RSS {:.1} MiB; failed requests: {failed}",
        rss.saturating_sub(start_rss) as f64 / n as f64,
        peak as f64 / 1024.0
    );
    Ok(())
}
