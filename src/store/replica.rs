//! Calls as every cluster node holds them in memory: the live ones, kept current by the node
//! that changes a call before it announces the change, and ended ones for a while, so late
//! signaling about them is refused as `wrong_state` rather than `call_not_found`. Signaling is
//! checked against this copy without a database round trip.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use super::pg::Versioned;
use crate::model::call::Call;
use crate::sync::{read, write};

/// How long an ended call stays in the copy.
const KEEP_ENDED: Duration = Duration::from_secs(120);

struct Held {
    call: Call,
    version: u64,
    ended_at: Option<Instant>,
    /// Who sent the call's latest offer, if any node told.
    offered_by: Option<String>,
}

#[derive(Default)]
struct Inner {
    calls: RwLock<HashMap<u64, Held>>,
    applied: AtomicU64,
}

#[derive(Clone, Default)]
pub struct CallReplica(Arc<Inner>);

impl CallReplica {
    /// Takes `v` if it is newer than what is held; whether it was taken.
    pub fn apply(&self, v: Versioned) -> bool {
        let mut calls = write(&self.0.calls);
        if calls
            .get(&v.call.id)
            .is_some_and(|h| h.version >= v.version)
        {
            return false;
        }
        let ended_at = v.call.status.is_terminal().then(Instant::now);
        let offered_by = calls.get_mut(&v.call.id).and_then(|h| h.offered_by.take());
        let held = Held {
            call: v.call,
            version: v.version,
            ended_at,
            offered_by,
        };
        calls.insert(held.call.id, held);
        // Now and then, forget calls that ended long enough ago.
        if self.0.applied.fetch_add(1, Ordering::Relaxed) % 256 == 255 {
            calls.retain(|_, h| h.ended_at.is_none_or(|t| t.elapsed() < KEEP_ENDED));
        }
        true
    }

    /// Records that `by` sent the latest offer of call `id` (if it is held and live).
    pub fn set_offer(&self, id: u64, by: &str) {
        let mut calls = write(&self.0.calls);
        if let Some(held) = calls.get_mut(&id).filter(|h| h.ended_at.is_none()) {
            held.offered_by = Some(by.to_owned());
        }
    }

    /// Who sent the latest offer of call `id`, if known.
    pub fn offered_by(&self, id: u64) -> Option<String> {
        read(&self.0.calls).get(&id)?.offered_by.clone()
    }

    pub fn get(&self, id: u64) -> Option<Call> {
        read(&self.0.calls).get(&id).map(|h| h.call.clone())
    }

    /// Every ringing or active call, ascending.
    pub fn live(&self) -> Vec<Call> {
        let calls = read(&self.0.calls);
        let mut live: Vec<Call> = (calls.values())
            .filter(|h| !h.call.status.is_terminal())
            .map(|h| h.call.clone())
            .collect();
        live.sort_unstable_by_key(|c| c.id);
        live
    }
}
