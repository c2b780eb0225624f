//! No call outlives its devices: an active call ends by itself (`connection_lost`) once neither
//! party has had a live connection (on any node, in cluster mode) for the grace period, and no call stays active past the
//! maximum duration (`max_duration`). The clock for a call starts when this task first sees it
//! without either party, so after a restart the parties get the whole grace to come back.

use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tracing::{info, warn};

use super::{CallError, Calls};
use crate::model::call::{now_ms, Action, Call, Status, TransitionError};
use crate::sync::lock;

/// Checks live calls periodically until shutdown.
pub(super) async fn run(calls: Calls) {
    let limits = calls.inner.limits;
    let period = (limits.lost_grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    // Per active call: when a party was last seen connected (Unix ms).
    let mut last_seen: HashMap<u64, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = calls.inner.shutdown.cancelled() => return,
        }
        let live = calls.live_calls();
        let elsewhere = online_elsewhere(&calls, &live).await;
        for (id, reason) in overdue(&calls, live, &elsewhere, &mut last_seen, now_ms()) {
            match calls.transition(id, Action::Expire { reason }).await {
                Ok(_) => info!(call = id, reason, "call ended by callbus"),
                Err(CallError::Transition(TransitionError::WrongState(_))) => {}
                Err(e) => warn!(call = id, error = %e, "could not end a call"),
            }
        }
    }
}

/// In cluster mode, the parties of active calls who are not connected here but are on another
/// node (one question to the other nodes per sweep).
async fn online_elsewhere(calls: &Calls, live: &[Call]) -> HashSet<String> {
    let Some(cluster) = &calls.inner.cluster else {
        return HashSet::new();
    };
    let presence = &calls.inner.presence;
    let active = live.iter().filter(|c| c.status == Status::Active);
    let parties = active.flat_map(|c| [&c.caller.id, &c.receiver.id]);
    let away: HashSet<String> = parties.filter(|u| !presence.online(u)).cloned().collect();
    if away.is_empty() {
        return away;
    }
    let away: Vec<String> = away.into_iter().collect();
    let devices = cluster.remote_devices(&away).await;
    let online = away.into_iter().zip(devices).filter(|(_, n)| *n > 0);
    online.map(|(u, _)| u).collect()
}

/// The active calls to end now, and why.
fn overdue(
    calls: &Calls,
    live: Vec<Call>,
    elsewhere: &HashSet<String>,
    last_seen: &mut HashMap<u64, u64>,
    now: u64,
) -> Vec<(u64, &'static str)> {
    let limits = calls.inner.limits;
    let grace = limits.lost_grace.as_millis() as u64;
    let max = limits.max_duration.as_millis() as u64;
    last_seen.retain(|id, _| live.binary_search_by_key(id, |c| c.id).is_ok());
    if calls.inner.cluster.is_some() {
        // Offer records of calls another node ended are forgotten here.
        let mut state = lock(&calls.inner.live);
        let offers = &mut state.last_offer_by;
        offers.retain(|id, _| live.binary_search_by_key(id, |c| c.id).is_ok());
    }
    let mut out = Vec::new();
    for call in live {
        let id = call.id;
        if call.status != Status::Active {
            continue;
        }
        let presence = &calls.inner.presence;
        let seen = last_seen.entry(id).or_insert(now);
        let online = |u: &String| presence.online(u) || elsewhere.contains(u);
        if online(&call.caller.id) || online(&call.receiver.id) {
            *seen = now;
        }
        if now.saturating_sub(*seen) >= grace {
            out.push((id, "connection_lost"));
        } else if now.saturating_sub(call.accepted_ms.unwrap_or(now)) >= max {
            out.push((id, "max_duration"));
        }
    }
    out
}
