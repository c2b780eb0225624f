//! How the call service announces: every event of a change is written to the durable event
//! log (for users with a persistent session) inside the change's critical section, queued in
//! the outbox, and published through the bus only once the change is on disk, in change order.

use super::live::Logged;
use super::Calls;
use crate::bus::Message;
use crate::model::call::now_ms;
use crate::model::topic::notifications_topic;
use crate::store::StoreError;
use crate::sync::lock;
use tracing::warn;

impl Calls {
    /// Writes an event to the durable event log (the caller flushes), if the user has a
    /// persistent session to replay it to after a restart.
    pub(super) fn log(&self, user_id: &str, event: &str) -> Result<Logged, StoreError> {
        let payload = event.to_owned();
        // Cluster mode keeps no per-node event log (a user's sessions may be on any node).
        let seq = if self.inner.cluster.is_none() && self.inner.presence.keeps_sessions(user_id) {
            let sessions = &self.inner.store.sessions;
            Some(sessions.log_event(user_id, &payload, now_ms())?)
        } else {
            None
        };
        Ok(Logged {
            user_id: user_id.to_owned(),
            payload,
            seq,
            expires_at_ms: None,
        })
    }

    /// Logs an event that no call change carries, makes it durable, and publishes it.
    pub(super) async fn announce_now(&self, user_id: &str, event: &str) -> Result<(), StoreError> {
        let logged = self.log(user_id, event)?;
        if logged.seq.is_some() {
            self.inner.store.flush().await?;
        }
        if !self.publish(&logged).await && self.inner.cluster.is_some() {
            return Err(StoreError::Unavailable(
                "the cluster's stream did not store the event".into(),
            ));
        }
        Ok(())
    }

    /// Logs the events of a change (inside its critical section) and queues them for
    /// [`Calls::commit_and_announce`].
    pub(super) fn enqueue(&self, events: Vec<(String, String)>) -> Result<u64, StoreError> {
        self.enqueue_expiring(events, None)
    }

    /// Like [`Calls::enqueue`], for events not worth delivering after `expires_at_ms`.
    pub(super) fn enqueue_expiring(
        &self,
        events: Vec<(String, String)>,
        expires_at_ms: Option<u64>,
    ) -> Result<u64, StoreError> {
        let logged = events
            .iter()
            .map(|(uid, event)| {
                let logged = self.log(uid, event)?;
                Ok(Logged {
                    expires_at_ms,
                    ..logged
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut outbox = lock(&self.inner.outbox);
        outbox.next_seq += 1;
        let seq = outbox.next_seq;
        outbox.pending.push_back((seq, logged));
        Ok(seq)
    }

    /// Waits for the change numbered `seq` to be durable, then publishes every pending event up
    /// to it, in order.
    pub(super) async fn commit_and_announce(&self, seq: u64) -> Result<(), StoreError> {
        self.inner.store.flush().await?;
        if let Some(push) = &self.inner.push {
            push.notify_one();
        }
        let _turn = self.inner.announcing.lock().await;
        loop {
            let batch = {
                let mut outbox = lock(&self.inner.outbox);
                if outbox.pending.front().is_none_or(|(s, _)| *s > seq) {
                    break;
                }
                outbox.pending.pop_front()
            };
            for event in batch.map(|(_, events)| events).unwrap_or_default() {
                self.publish(&event).await;
            }
        }
        Ok(())
    }

    /// Publishes an event; false if the bus did not take it (in cluster mode: if it is not
    /// stored where persistent sessions' queues are).
    pub(super) async fn publish(&self, event: &Logged) -> bool {
        let topic = notifications_topic(&event.user_id);
        let message = match event.seq {
            Some(seq) => Message::logged(topic, event.payload.clone(), seq),
            None => Message::new(topic, event.payload.clone()),
        };
        let message = message.expiring(event.expires_at_ms);
        let publisher = &self.inner.publisher;
        let published = match self.inner.cluster {
            Some(_) => publisher.publish_durable(message).await,
            None => publisher.publish(message).await,
        };
        if let Err(e) = &published {
            warn!(user = %event.user_id, error = %e, "could not publish an event");
        }
        published.is_ok()
    }
}
