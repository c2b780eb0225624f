//! `$SYS/#` for operators: what Mosquitto users expect to see with
//! `mosquitto_sub -u ops -P "$(callbus token --sub ops --role admin)" -t '$SYS/#' -v`, plus
//! callbus's own figures, published on the bus every few seconds. Only admins may subscribe.

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::bus::{Message, Publisher};
use crate::calls::Calls;
use crate::metrics;
use crate::store::Store;

/// Every topic and its value, now.
fn figures(started: Instant, calls: &Calls, store: &Store) -> Vec<(&'static str, String)> {
    let (ringing, active) = calls.live_counts();
    let pushes = store.push.len();
    vec![
        (
            "$SYS/broker/version",
            format!("callbus {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", started.elapsed().as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            metrics::CONNECTIONS_OPEN.get().to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            metrics::CONNECTIONS_TOTAL.get().to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            (metrics::PUBLISHES_RELAYED.get() + metrics::PUBLISHES_REFUSED.get()).to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            metrics::MESSAGES_SENT.get().to_string(),
        ),
        ("$SYS/broker/callbus/calls/ringing", ringing.to_string()),
        ("$SYS/broker/callbus/calls/active", active.to_string()),
        (
            "$SYS/broker/callbus/sessions/stored",
            metrics::SESSIONS_STORED.get().to_string(),
        ),
        ("$SYS/broker/callbus/pushes/queued", pushes.to_string()),
    ]
}

/// Publishes the figures every `interval` until shutdown.
pub async fn run(
    publisher: Publisher,
    calls: Calls,
    store: Store,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for (topic, value) in figures(started, &calls, &store) {
            if let Err(e) = publisher.publish(Message::new(topic, value)).await {
                warn!(error = %e, "cannot publish $SYS");
                return;
            }
        }
    }
}
