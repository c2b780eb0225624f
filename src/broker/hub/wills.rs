//! Delayed Wills (MQTT 5's Will Delay Interval) waiting on this node. A Will is not sent if a
//! connection comes back to its session within the delay (MQTT-3.1.3-9): back on this node,
//! the hub's own state shows it; back on another node (cluster mode), that node claims the
//! client id and the claim reaches this one ([`Hub::release_client`]), which cancels the Will.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use super::{Hub, Link};
use crate::sync::lock;

/// A Will waiting here: when its connection began and ended (Unix ms), and what cancels it.
struct Delayed {
    attached_ms: u64,
    ended_ms: u64,
    cancel: CancellationToken,
}

/// The Wills waiting here, by broker-side client id.
#[derive(Default)]
pub(super) struct DelayedWills(Mutex<HashMap<Arc<str>, Delayed>>);

impl Hub {
    /// A Will of `client_id`'s connection (session `sid`) that ended at `ended_ms` waits for
    /// its delay; what is cancelled if the client comes back on another node first. (A newer
    /// Will of the same client id means it came back: the older one is cancelled.)
    pub(crate) fn delay_will(
        &self,
        client_id: &Arc<str>,
        sid: u64,
        ended_ms: u64,
    ) -> CancellationToken {
        let attached_ms = lock(&self.state)
            .sessions
            .get(&sid)
            .map_or(ended_ms, |e| e.attached_ms);
        let cancel = CancellationToken::new();
        let delayed = Delayed {
            attached_ms,
            ended_ms,
            cancel: cancel.clone(),
        };
        let older = lock(&self.wills.0).insert(client_id.clone(), delayed);
        if let Some(older) = older {
            older.cancel.cancel();
        }
        cancel
    }

    /// The delay of the Will that `delay_will(client_id, ended_ms)` made is over (or the
    /// server is going): whether it goes out, that is, no connection came back to its session.
    pub(crate) fn will_due(
        &self,
        client_id: &str,
        ended_ms: u64,
        cancel: &CancellationToken,
    ) -> bool {
        let mut wills = lock(&self.wills.0);
        if wills.get(client_id).is_some_and(|d| d.ended_ms == ended_ms) {
            wills.remove(client_id);
        }
        drop(wills);
        !cancel.is_cancelled() && !self.came_back(client_id, ended_ms)
    }

    /// Another node claimed `client_id` (at `claimed_ms`, or just now): a Will waiting here
    /// for a connection that began before that is not sent. (Not "ended": a node may notice
    /// a dropped connection only after the client is back elsewhere.)
    pub(super) fn cancel_will(&self, client_id: &str, claimed_ms: Option<u64>) {
        let mut wills = lock(&self.wills.0);
        let Some(delayed) = wills.get(client_id) else {
            return;
        };
        if claimed_ms.is_none_or(|at| at >= delayed.attached_ms) {
            delayed.cancel.cancel();
            wills.remove(client_id);
        }
    }

    /// Whether a connection attached to `client_id`'s session here after `since_ms` (Unix
    /// ms), or one is attached now.
    fn came_back(&self, client_id: &str, since_ms: u64) -> bool {
        let state = lock(&self.state);
        let entry = state
            .by_client
            .get(client_id)
            .and_then(|sid| state.sessions.get(sid));
        entry.is_some_and(|e| matches!(e.link, Link::Live { .. }) || e.attached_ms > since_ms)
    }
}
