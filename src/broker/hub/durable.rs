//! Persistent sessions that outlive this node (cluster mode): their records and their QoS 1
//! queues live outside the process ([`Durable`]: PostgreSQL and JetStream), so a client resumes
//! on whichever node it reaches next, even after the node it left was killed.
//!
//! While its client is connected here, such a session is an ordinary entry of the hub, except
//! that its QoS 1 subscriptions are fed by its queues ([`Hub::feed`]), each message with a
//! [`Receipt`] the session hands back when the client acknowledges it; the bus's copies are
//! not routed to it. When the connection ends the entry goes: its queues keep what is
//! published meanwhile, and keep what was sent but not acknowledged for the next connection.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::stored::{Queued, Stored};
use super::{Entry, Hub, Link, State};
use crate::auth::{Identity, Role};
use crate::broker::codec::QoS;
use crate::bus::Message;
use crate::model::topic::has_wildcard;
use crate::store::{SessionRecord, StoreError};
use crate::sync::lock;

/// Where persistent sessions live when they must outlive a node.
pub trait Durable: Send + Sync + 'static {
    /// The session stored under broker-side `client_id`, by whichever node, if not expired.
    fn load(&self, client_id: &str) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>>;
    /// Records the session as held by this node. Applied in order with the other writes; does
    /// not block.
    fn save(&self, client_id: &str, record: SessionRecord);
    /// Its client left this node: the session expires after `expiry` unless it comes back.
    fn part(&self, client_id: &str, expiry: std::time::Duration);
    /// Forgets the session and its queues.
    fn discard(&self, client_id: &str);
    /// Drops the queue of one filter.
    fn close(&self, client_id: &str, filter: &str);
    /// Resolves once every write so far is durable.
    fn settled(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Starts feeding `filter`'s queue to session `sid` through [`Hub::feed`] until `stop`:
    /// what it holds that was never acknowledged first, then what is published from now on.
    /// Resolves once the queue exists.
    fn open(
        &self,
        sid: u64,
        client_id: &str,
        filter: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Hands a delivery's acknowledgement back to its queue.
#[derive(Clone)]
pub struct Receipt(Arc<dyn Fn() + Send + Sync>);

impl Receipt {
    pub fn new(acknowledge: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(acknowledge))
    }

    /// The client acknowledged the message (or it is not for this session).
    pub(crate) fn acknowledge(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receipt")
    }
}

/// The queues feeding one session here; dropping it stops them.
pub(super) struct Queues {
    stop: CancellationToken,
    /// Filters whose queue feeds the session.
    open: Vec<String>,
}

impl Drop for Queues {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Queues {
    pub(super) fn new() -> Box<Queues> {
        Box::new(Queues {
            stop: CancellationToken::new(),
            open: Vec::new(),
        })
    }
}

impl Hub {
    /// Keeps persistent sessions in `durable` from now on.
    pub fn set_durable(&self, durable: Arc<dyn Durable>) {
        let _ = self.durable.set(durable);
    }

    /// Makes the session stored under `client_id` by any node resumable here, before its
    /// client registers (nothing when sessions are node-local, when this node holds it
    /// already, or for a clean connection, whose registration discards it).
    pub(crate) async fn fetch(
        &self,
        identity: &Arc<Identity>,
        client_id: &str,
        clean: bool,
    ) -> Result<(), StoreError> {
        let Some(durable) = self.durable.get() else {
            return Ok(());
        };
        if clean {
            durable.discard(client_id);
            return durable.settled().await;
        }
        if lock(&self.state).by_client.contains_key(client_id) {
            return Ok(());
        }
        let Some(record) = durable.load(client_id).await? else {
            return Ok(());
        };
        if record.user_id != identity.user_id() {
            return Ok(()); // broker-side ids start with the user id: never another's
        }
        let mut state = lock(&self.state);
        if state.by_client.contains_key(client_id) {
            return Ok(()); // another connection of it got here first
        }
        let stored = Stored::new(0, Instant::now() + self.sessions.expiry());
        let link = Link::Away(Box::new(stored));
        let sid = self.add(&mut state, identity.clone(), client_id.into(), true, link);
        // Membership is checked again: a conversation left while away is not resumed.
        super::persist::resubscribe(&mut state, sid, &record, true, |filter| {
            let allowed = has_wildcard(filter) || self.may_receive(identity, filter);
            if !allowed {
                info!(client = %client_id, %filter, "subscription no longer allowed; dropped");
                durable.close(client_id, filter);
            }
            allowed
        });
        self.save(&state, sid);
        info!(client = %client_id, "persistent session fetched from the cluster");
        Ok(())
    }

    /// Brings the queues of session `sid` in line with its QoS 1 subscriptions (opening new
    /// ones, closing dropped ones) and its record up to date; resolves once both are durable.
    /// Nothing for a session that is not kept in [`Durable`].
    pub(crate) async fn sync_queues(&self, sid: u64) -> Result<(), StoreError> {
        let Some(durable) = self.durable.get() else {
            return Ok(());
        };
        let (client_id, wanted, stop) = {
            let mut state = lock(&self.state);
            let filters = state.routes.filters_of(sid);
            let Some(entry) = state.sessions.get_mut(&sid) else {
                return Ok(());
            };
            let Some(queues) = entry.queues.as_mut() else {
                return Ok(());
            };
            let qos1 = |f: &String| filters.iter().any(|(g, q)| g == f && *q != QoS::AtMostOnce);
            queues.open.retain(|filter| {
                let keep = qos1(filter);
                if !keep {
                    durable.close(&entry.client_id, filter);
                }
                keep
            });
            let wanted: Vec<String> = filters
                .iter()
                .filter(|(f, q)| *q != QoS::AtMostOnce && !queues.open.contains(f))
                .map(|(f, _)| f.clone())
                .collect();
            (entry.client_id.clone(), wanted, queues.stop.clone())
        };
        if !wanted.is_empty() {
            // Queues closed before (here or by a revocation) are gone before any is opened
            // again under the same name.
            durable.settled().await?;
        }
        for filter in wanted {
            durable
                .open(sid, &client_id, &filter, stop.child_token())
                .await?;
            let mut state = lock(&self.state);
            if let Some(queues) = state.sessions.get_mut(&sid).and_then(|e| e.queues.as_mut()) {
                if !queues.open.contains(&filter) {
                    queues.open.push(filter);
                }
            }
        }
        durable.settled().await
    }

    /// A message from session `sid`'s queue: delivered if the session is here and may receive
    /// it (otherwise acknowledged at once, so the queue moves on). False once the session is
    /// gone from this node.
    pub fn feed(&self, sid: u64, message: Message, receipt: Receipt) -> bool {
        let Some(topic) = message.topic_str() else {
            receipt.acknowledge();
            return true;
        };
        let mut state = lock(&self.state);
        let Some(entry) = state.sessions.get_mut(&sid) else {
            return false;
        };
        let who = &entry.identity;
        let audience = who.role == Role::Admin || message.audience.includes(who.user_id());
        if !audience || !self.may_receive(who, topic) || entry.own_message(&message, topic) {
            receipt.acknowledge();
            return true;
        }
        let queued = Queued {
            receipt: Some(receipt),
            event: None,
            ..Queued::from_bus(&message)
        };
        match &mut entry.link {
            Link::Live { sender, .. } => {
                let delivered = sender.deliver(super::Event::Deliver(QoS::AtLeastOnce, queued));
                if !delivered {
                    warn!(session = sid, "session fell too far behind; dropping it");
                    crate::metrics::SESSIONS_DROPPED_SLOW.inc();
                    self.drop_slow(&mut state, sid);
                    return false;
                }
            }
            // Between a connection and the next one taking the session over.
            Link::Away(stored) => stored.push(queued, &self.sessions),
        }
        true
    }

    /// Tells session `sid` that `dropped` messages of its queue were dropped, oldest first,
    /// at the queue's bound while it was away.
    pub fn overflowed(&self, sid: u64, dropped: u64) {
        crate::metrics::SESSION_QUEUE_DROPPED.add(dropped);
        let state = lock(&self.state);
        let Some(entry) = state.sessions.get(&sid) else {
            return;
        };
        if let Link::Live { sender, .. } = &entry.link {
            let detail = format!(
                "{dropped} messages were dropped while you were away (the session's queue is bounded)"
            );
            let about = crate::bridge::message::ErrorRef::default();
            let code = crate::bridge::message::ErrorCode::QueueOverflow;
            let event = crate::bridge::message::error_event(code, &detail, &about);
            let topic = crate::model::topic::notifications_topic(entry.identity.user_id());
            let queued = Queued::new(topic.into(), event.into());
            sender.deliver(super::Event::Deliver(QoS::AtLeastOnce, queued));
        }
    }

    /// Whether session `sid` is here with `filter`'s queue open (a queue deleted under it was
    /// lost, not closed).
    pub fn queue_open(&self, sid: u64, filter: &str) -> bool {
        let state = lock(&self.state);
        let entry = state.sessions.get(&sid);
        let queues = entry.and_then(|e| e.queues.as_ref());
        queues.is_some_and(|q| q.open.iter().any(|f| f == filter))
    }

    /// A durable session's connection ended: the entry goes (its queues keep the rest).
    pub(super) fn part_durable(&self, state: &mut State, sid: u64) {
        if let (Some(entry), Some(durable)) = (state.remove(sid), self.durable.get()) {
            durable.part(&entry.client_id, entry.expiry);
        }
    }

    /// Closes the queue of `filter` of a durable session (its subscription was dropped).
    pub(super) fn close_queue(&self, entry: &mut Entry, filter: &str) {
        let (Some(queues), Some(durable)) = (entry.queues.as_mut(), self.durable.get()) else {
            return;
        };
        if let Some(i) = queues.open.iter().position(|f| f == filter) {
            queues.open.remove(i);
            durable.close(&entry.client_id, filter);
        }
    }
}
