//! What of the hub survives a restart: persistent sessions' records (their filters and
//! progress in the durable event log) in sled, restored as away sessions at startup, and the
//! logged events a restored session missed.

use std::sync::Arc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::stored::{Queued, Stored};
use super::{Entry, Hub, Link, State};
use crate::auth::{Identity, Role};
use crate::broker::codec::QoS;
use crate::model::topic::{filter_matches, notifications_topic};
use crate::store::{SessionRecord, StoreError};
use crate::sync::lock;

impl Hub {
    pub(super) fn restore(&self) -> Result<(), StoreError> {
        let records = self.store.sessions.all()?;
        let logged_before = self.store.sessions.last_seq()?;
        let mut state = lock(&self.state);
        for (client_id, record) in records {
            let role = if record.admin {
                Role::Admin
            } else {
                Role::User
            };
            let id = &record.user_id;
            let identity = Arc::new(Identity::new(id, id, "", "", role));
            let mut stored = Stored::new(0, Instant::now() + self.sessions.expiry());
            stored.from_log = Some(record.delivered_through);
            stored.logged_before = logged_before;
            let link = Link::Away(Box::new(stored));
            let sid = self.add(&mut state, identity, client_id.into(), true, link);
            if let Some(entry) = state.sessions.get_mut(&sid) {
                entry.delivered_through = record.delivered_through;
            }
            resubscribe(&mut state, sid, &record, false, |_| true);
        }
        if !state.sessions.is_empty() {
            info!(
                sessions = state.sessions.len(),
                "persistent sessions restored"
            );
        }
        Ok(())
    }

    /// Writes a persistent session's record (its filters and progress in the event log).
    pub(super) fn save(&self, state: &State, sid: u64) {
        let Some(entry) = state.sessions.get(&sid).filter(|e| e.persistent) else {
            return;
        };
        let record = SessionRecord {
            user_id: entry.identity.user_id().to_owned(),
            admin: entry.identity.role == Role::Admin,
            filters: state
                .routes
                .filters_of(sid)
                .into_iter()
                .map(|(f, q)| (f, q as u8))
                .collect(),
            delivered_through: entry.delivered_through,
            no_local: entry
                .no_local
                .iter()
                .flatten()
                .map(|f| f.to_string())
                .collect(),
        };
        if let (Some(durable), Some(_)) = (self.durable.get(), &entry.queues) {
            durable.save(&entry.client_id, record);
        } else if let Err(e) = self.store.sessions.put(&entry.client_id, &record) {
            warn!(error = %e, "cannot store a persistent session");
        }
    }

    pub(super) fn forget(&self, entry: &Entry) {
        if let (Some(durable), Some(_)) = (self.durable.get(), &entry.queues) {
            durable.discard(&entry.client_id);
        } else if entry.persistent {
            if let Err(e) = self.store.sessions.remove(&entry.client_id) {
                warn!(error = %e, "cannot remove a stored session");
            }
        }
    }

    /// Makes session `sid`'s record durable, with every other written so far, and (cluster
    /// mode) its queues follow its subscriptions (before a persistent SUBACK or UNSUBACK).
    pub(crate) async fn persist(&self, sid: u64) -> Result<(), StoreError> {
        match self.durable.get() {
            Some(_) => self.sync_queues(sid).await,
            None => self.store.flush().await,
        }
    }

    /// A persistent session's client acknowledged durable event `seq`: its record says so at
    /// once (on disk with the next flush), so a crash later does not send the event again.
    pub(crate) fn acked_event(&self, sid: u64, seq: u64) {
        let mut state = lock(&self.state);
        let Some(entry) = state.sessions.get_mut(&sid) else {
            return;
        };
        if !entry.persistent || entry.queues.is_some() || seq <= entry.delivered_through {
            return;
        }
        entry.delivered_through = seq;
        self.save(&state, sid);
    }

    /// The durable events a restored session missed, for its notifications subscription;
    /// those logged up to `logged_before` (before the restart) are marked as possibly sent.
    pub(super) fn logged_since(
        &self,
        state: &State,
        sid: u64,
        user_id: &str,
        (through, logged_before): (u64, u64),
    ) -> Vec<Queued> {
        let topic = notifications_topic(user_id);
        let subscribed = state
            .routes
            .filters_of(sid)
            .iter()
            .any(|(f, _)| filter_matches(f, &topic));
        if !subscribed {
            return Vec::new();
        }
        match self.store.sessions.events_after(user_id, through) {
            Ok(events) => events
                .into_iter()
                .map(|(seq, payload)| Queued {
                    event: Some(seq),
                    dup: seq <= logged_before,
                    ..Queued::new(topic.clone().into(), payload.into())
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the event log");
                Vec::new()
            }
        }
    }
}

/// Routes stored session `sid`'s filters again, each that `keep` allows, with No Local where
/// it had it; `fed`: its QoS 1 filters are fed by its queues, not the bus.
pub(super) fn resubscribe(
    state: &mut State,
    sid: u64,
    record: &SessionRecord,
    fed: bool,
    mut keep: impl FnMut(&str) -> bool,
) {
    for (filter, qos) in &record.filters {
        if !keep(filter) {
            continue;
        }
        let qos = if *qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        state
            .routes
            .subscribe(sid, filter, qos, fed && qos == QoS::AtLeastOnce);
        if record.no_local.contains(filter) {
            if let Some(entry) = state.sessions.get_mut(&sid) {
                entry.set_no_local(filter, true);
            }
        }
    }
}
