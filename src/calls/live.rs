//! The call service's in-memory state: who is in a ringing or active call (for busy and glare),
//! the signaling state of live calls, and the outbox of events waiting for their change to be
//! durable.

use std::collections::{HashMap, VecDeque};

use crate::model::call::Call;

/// An event for a user's notifications, written to the durable event log.
#[derive(Debug, Clone)]
pub(super) struct Logged {
    pub user_id: String,
    pub payload: String,
    /// Its sequence in the event log; none when the user had no persistent session (nobody
    /// to replay it to after a restart, so it was not logged).
    pub seq: Option<u64>,
    /// Not worth delivering after this (Unix ms): a call's ring.
    pub expires_at_ms: Option<u64>,
}

/// Events waiting for their change to be durable; published strictly in sequence.
#[derive(Default)]
pub(super) struct Outbox {
    pub next_seq: u64,
    pub pending: VecDeque<(u64, Vec<Logged>)>,
}

#[derive(Default)]
pub(super) struct Live {
    /// Ringing or active call ids per user.
    pub by_user: HashMap<String, Vec<u64>>,
    /// Who sent the latest offer of each live call (signaling state: an answer must come from
    /// the other party). Forgotten when the call ends; not kept across restarts, where the
    /// state-based rule applies until the next offer.
    pub last_offer_by: HashMap<u64, String>,
    /// Each live call as last written (written under the same lock as the store), so that
    /// signaling checks and transitions read it without a store read and a parse.
    calls: HashMap<u64, Call>,
}

impl Live {
    /// Takes `call` (new, or changed and still live) as the current record.
    pub(super) fn add(&mut self, call: &Call) {
        self.calls.insert(call.id, call.clone());
        for uid in [&call.caller.id, &call.receiver.id] {
            let ids = self.by_user.entry(uid.clone()).or_default();
            if !ids.contains(&call.id) {
                ids.push(call.id);
            }
        }
    }

    pub(super) fn remove(&mut self, call: &Call) {
        self.calls.remove(&call.id);
        self.last_offer_by.remove(&call.id);
        for uid in [&call.caller.id, &call.receiver.id] {
            if let Some(ids) = self.by_user.get_mut(uid) {
                ids.retain(|id| *id != call.id);
                if ids.is_empty() {
                    self.by_user.remove(uid);
                }
            }
        }
    }

    /// A ringing or active call.
    pub(super) fn call(&self, id: u64) -> Option<&Call> {
        self.calls.get(&id)
    }

    /// Every ringing or active call, ascending by id.
    pub(super) fn calls(&self) -> Vec<Call> {
        let mut calls: Vec<Call> = self.calls.values().cloned().collect();
        calls.sort_unstable_by_key(|c| c.id);
        calls
    }

    pub(super) fn calls_of(&self, uid: &str) -> &[u64] {
        self.by_user.get(uid).map(Vec::as_slice).unwrap_or(&[])
    }
}
