//! Push hand-off (DESIGN "Push hand-off"): when a call starts ringing and when it stops, callbus
//! POSTs ids (never SDP) to the app's backend, which holds the FCM/APNs credentials and wakes
//! sleeping phones. Jobs are queued with the call change that caused them (in sled; in cluster
//! mode in PostgreSQL, where any node's worker takes them) and delivered in order per call,
//! retried with backoff until a 2xx or their deadline; the REST reply and the call flow never
//! wait for them.

mod http;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;
use crate::model::call::{now_ms, rfc3339, Call, Status};
use crate::store::{PushJob, Store};

/// Where pushes go and how they are signed.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: http::Url,
    pub secret: Vec<u8>,
}

impl Webhook {
    /// Checks the URL (`http://host[:port]/path`).
    pub fn new(url: &str, secret: &[u8]) -> Result<Self, String> {
        if secret.is_empty() {
            return Err("--push-secret must not be empty".into());
        }
        Ok(Self {
            url: http::Url::parse(url)?,
            secret: secret.to_vec(),
        })
    }
}

/// `X-Callbus-Signature`: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &[u8], unix: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={unix},v1={hex}")
}

/// The job for a call that starts ringing.
pub fn ringing(call: &Call, receiver_devices: usize) -> PushJob {
    PushJob {
        deadline_ms: call.ring_deadline_ms,
        body: body(call, "call.ringing", receiver_devices, None),
    }
}

/// The job for a call that stopped ringing (answered, rejected, cancelled, missed). Worth
/// delivering a while after the ring deadline too, so phones that rang stop.
pub fn stopped(call: &Call, receiver_devices: usize) -> PushJob {
    let reason = match call.status {
        Status::Active => "accepted",
        _ => call.end_reason.as_deref().unwrap_or("ended"),
    };
    PushJob {
        deadline_ms: call.ring_deadline_ms.max(now_ms()) + 60_000,
        body: body(call, "call.stopped", receiver_devices, Some(reason)),
    }
}

fn body(call: &Call, event: &str, receiver_devices: usize, reason: Option<&str>) -> Value {
    let mut body = json!({
        "event": event,
        "call_id": call.id.to_string(),
        "caller_id": call.caller.id,
        "caller_username": call.caller.username,
        "call_type": call.call_type.as_str(),
        "conversation_id": call.conversation_id,
        "receiver_id": call.receiver.id,
        "ring_deadline": rfc3339(Some(call.ring_deadline_ms)),
        "receiver_devices": receiver_devices,
        "idempotency_key": format!("{}:{event}", call.id),
    });
    if let (Some(reason), Value::Object(map)) = (reason, &mut body) {
        map.insert("reason".into(), reason.into());
    }
    body
}

/// Starts the worker; notify the returned handle after queuing jobs.
pub fn start(store: Store, webhook: Webhook, shutdown: CancellationToken) -> Arc<Notify> {
    let wake = Arc::new(Notify::new());
    tokio::spawn(run(store, webhook, wake.clone(), shutdown));
    wake
}

/// Starts a cluster node's worker, which takes jobs queued by any node from the database;
/// notify the returned handle after queuing jobs here (other nodes' jobs are looked for every
/// [`SHARED_POLL`]).
pub fn start_shared(
    pg: Arc<crate::store::pg::Pg>,
    webhook: Webhook,
    shutdown: CancellationToken,
) -> Arc<Notify> {
    let wake = Arc::new(Notify::new());
    tokio::spawn(run_shared(pg, webhook, wake.clone(), shutdown));
    wake
}

/// How often an idle cluster worker looks for jobs other nodes queued (or left when they died).
const SHARED_POLL: Duration = Duration::from_secs(1);

async fn run_shared(
    pg: Arc<crate::store::pg::Pg>,
    webhook: Webhook,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let lease = match pg.take_push().await {
            Ok(lease) => lease,
            Err(e) => {
                warn!(error = %e, "cannot read the push outbox");
                None
            }
        };
        let Some(lease) = lease else {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(SHARED_POLL) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        };
        tokio::select! {
            _ = deliver(&webhook, &lease.job) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = lease.done().await {
            warn!(error = %e, "cannot remove a push job");
        }
    }
}

async fn run(store: Store, webhook: Webhook, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let next = match store.push.first() {
            Ok(next) => next,
            Err(e) => {
                warn!(error = %e, "cannot read the push outbox");
                None
            }
        };
        let Some((key, job)) = next else {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = shutdown.cancelled() => return,
            }
        };
        tokio::select! {
            _ = deliver(&webhook, &job) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = store.push.remove(key) {
            warn!(error = %e, "cannot remove a push job");
        }
    }
}

/// Delivers one job: retried with backoff until a 2xx or its deadline.
async fn deliver(webhook: &Webhook, job: &PushJob) {
    let body = job.body.to_string();
    let key = job.body["idempotency_key"].as_str().unwrap_or_default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let unix = now_ms() / 1000;
        let signed = signature(&webhook.secret, unix, body.as_bytes());
        match http::post(&webhook.url, &body, &signed, key).await {
            Ok(status) if (200..300).contains(&status) => {
                metrics::PUSHES_DELIVERED.inc();
                return;
            }
            Ok(status) => info!(status, key, "push webhook refused; retrying"),
            Err(e) => info!(error = %e, key, "push webhook unreachable; retrying"),
        }
        metrics::PUSH_RETRIES.inc();
        if now_ms() + backoff.as_millis() as u64 > job.deadline_ms {
            warn!(key, "push given up at its deadline");
            metrics::PUSHES_DROPPED.inc();
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_time_dot_body() {
        // RFC 4231 test case 2 ("what do ya want for nothing?"), split as "<t>.<body>".
        let sig = signature(b"Jefe", 0, b"what do ya want for nothing?");
        assert!(sig.starts_with("t=0,v1="));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sig, format!("t=0,v1={expected}"));
        assert_eq!(sig.len(), "t=0,v1=".len() + 64);
    }
}
