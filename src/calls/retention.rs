//! Ended calls leave the embedded store once they are older than `[storage] call_history_secs`:
//! sled's memory follows the size of its data, so a history kept for good would make memory
//! grow without end under a steady load.

use std::time::Duration;
use tracing::{info, warn};

use super::Calls;
use crate::metrics;
use crate::model::call::now_ms;

/// Calls removed per batch; the store is committed between batches.
const BATCH: usize = 1000;

/// Sweeps periodically until shutdown.
pub(super) async fn run(calls: Calls, keep: Duration) {
    let period = (keep / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = calls.inner.shutdown.cancelled() => return,
        }
        let before = now_ms().saturating_sub(keep.as_millis() as u64);
        let mut total = 0;
        loop {
            let store = calls.inner.store.clone();
            let swept = tokio::task::spawn_blocking(move || store.calls.prune(before, BATCH)).await;
            let removed = match swept {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot remove old calls");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "the old-call sweep stopped");
                    break;
                }
            };
            total += removed;
            metrics::CALLS_PRUNED.add(removed as u64);
            if removed < BATCH {
                break;
            }
            // Each batch reaches the disk before the next starts (a lost removal is only
            // made again by the next sweep, but the committer's queue stays short).
            if let Err(e) = calls.inner.store.flush().await {
                warn!(error = %e, "cannot commit removed calls");
                break;
            }
        }
        if total > 0 {
            info!(calls = total, "removed ended calls past the history kept");
        }
    }
}
