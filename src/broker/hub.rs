//! The hub: the one owner of live sessions, their subscriptions and their mailboxes. The bus
//! hands it every message in bus order; it matches each message once against the subscriptions,
//! applies the ACL and the message's audience once per receiving session, and puts the result
//! in that session's mailbox with the QoS to deliver at. A session reads one stream of
//! [`Event`]s and does no matching, parsing or store reads of its own.
//!
//! Why routing lives here and not in rumqttd (one rumqttd link per session): rumqttd
//! preallocates about 100 KB of queues per link and matches every never-seen topic against every
//! filter, which made idle connections cost 49 KiB each and the first notification to 10k users
//! take 8.6 s (BENCHMARKS.md). Here routing is a hash lookup.
//!
//! A session whose mailbox passes [`MAILBOX_MESSAGES`] messages or [`MAILBOX_BYTES`] bytes is
//! dropped (counted in `callbus_sessions_dropped_slow_total`): a client that stops reading cannot
//! make the server hold more.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::codec::QoS;
use crate::auth::{Identity, Role};
use crate::bridge::acl;
use crate::bus::{Deliver, Message};
use crate::metrics;
use crate::model::topic::{chat_topic, filter_matches, has_wildcard};
use crate::store::Conversations;
use crate::sync::lock;

/// Most messages that may wait in one session's mailbox.
pub(crate) const MAILBOX_MESSAGES: usize = 1024;
/// Most payload bytes that may wait in one session's mailbox.
pub(crate) const MAILBOX_BYTES: usize = 8 * 1024 * 1024;

/// What a session is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// Write this message to the client.
    Deliver {
        topic: Bytes,
        payload: Bytes,
        qos: QoS,
    },
    /// A newer connection of the same user took this client id.
    Replaced,
    /// The session fell too far behind its mailbox and was dropped.
    TooSlow,
    /// The bus is gone.
    BusClosed,
    /// The server is shutting down.
    Shutdown,
}

/// What is waiting in a session's mailbox.
#[derive(Default)]
struct Backlog {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// Set when the hub dropped the session; checked before anything else is written.
    dropped: AtomicBool,
}

/// A session's side of its mailbox.
pub(crate) struct Mailbox {
    rx: mpsc::UnboundedReceiver<Event>,
    backlog: Arc<Backlog>,
}

impl Mailbox {
    /// The next event. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Event {
        if self.backlog.dropped.load(Ordering::Relaxed) {
            return Event::TooSlow;
        }
        let event = self.rx.recv().await;
        self.taken(event)
    }

    /// The next event if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Event> {
        if self.backlog.dropped.load(Ordering::Relaxed) {
            return Some(Event::TooSlow);
        }
        let event = self.rx.try_recv().ok()?;
        Some(self.taken(Some(event)))
    }

    fn taken(&self, event: Option<Event>) -> Event {
        match event {
            Some(event) => {
                if let Event::Deliver { payload, .. } = &event {
                    self.backlog.messages.fetch_sub(1, Ordering::Relaxed);
                    self.backlog
                        .bytes
                        .fetch_sub(payload.len(), Ordering::Relaxed);
                }
                event
            }
            // The hub dropped the session's sender: it is gone from the hub.
            None => Event::Shutdown,
        }
    }
}

struct Entry {
    identity: Arc<Identity>,
    /// Broker-side client id, `<user id>.<client id>`.
    client_id: String,
    /// Wildcard filters (admins only) and their QoS.
    wildcards: Vec<(String, QoS)>,
    /// Exact filters held, for teardown.
    exact: Vec<String>,
    tx: mpsc::UnboundedSender<Event>,
    backlog: Arc<Backlog>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Entry>,
    by_client: HashMap<String, u64>,
    by_user: HashMap<String, Vec<u64>>,
    /// Exact filter to the sessions holding it and their QoS.
    exact: HashMap<String, Vec<(u64, QoS)>>,
    /// Sessions holding at least one wildcard filter.
    wildcard: Vec<u64>,
    /// Set at shutdown or when the bus is gone: new sessions are told at once.
    closed: Option<fn() -> Event>,
}

impl State {
    fn unsubscribe(&mut self, sid: u64, filter: &str) {
        if let Some(entry) = self.sessions.get_mut(&sid) {
            entry.wildcards.retain(|(f, _)| f != filter);
            entry.exact.retain(|f| f != filter);
            if entry.wildcards.is_empty() {
                self.wildcard.retain(|s| *s != sid);
            }
        }
        if let Some(sids) = self.exact.get_mut(filter) {
            sids.retain(|(s, _)| *s != sid);
            if sids.is_empty() {
                self.exact.remove(filter);
            }
        }
    }

    fn remove(&mut self, sid: u64) -> Option<Entry> {
        let entry = self.sessions.remove(&sid)?;
        for filter in &entry.exact {
            if let Some(sids) = self.exact.get_mut(filter) {
                sids.retain(|(s, _)| *s != sid);
                if sids.is_empty() {
                    self.exact.remove(filter);
                }
            }
        }
        self.wildcard.retain(|s| *s != sid);
        if self.by_client.get(&entry.client_id) == Some(&sid) {
            self.by_client.remove(&entry.client_id);
        }
        if let Some(sids) = self.by_user.get_mut(&entry.identity.user_id) {
            sids.retain(|s| *s != sid);
            if sids.is_empty() {
                self.by_user.remove(&entry.identity.user_id);
            }
        }
        Some(entry)
    }

    /// The sessions `topic` reaches, each with the highest QoS of its matching filters.
    fn matches(&self, topic: &str) -> Vec<(u64, QoS)> {
        let mut targets = self.exact.get(topic).cloned().unwrap_or_default();
        for sid in &self.wildcard {
            let Some(entry) = self.sessions.get(sid) else {
                continue;
            };
            let qos = entry
                .wildcards
                .iter()
                .filter(|(f, _)| filter_matches(f, topic))
                .map(|(_, q)| *q)
                .max_by_key(|q| *q as u8);
            let Some(qos) = qos else { continue };
            match targets.iter_mut().find(|(s, _)| s == sid) {
                Some((_, q)) if (*q as u8) < (qos as u8) => *q = qos,
                Some(_) => {}
                None => targets.push((*sid, qos)),
            }
        }
        targets
    }
}

pub struct Hub {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Membership, checked on every chat delivery (no stale ACL cache).
    conversations: Conversations,
}

/// A session's place in the hub; leaving is automatic when it is dropped.
pub(crate) struct Registration {
    hub: Arc<Hub>,
    pub(crate) id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.hub.state).remove(self.id);
    }
}

impl Hub {
    pub fn new(conversations: Conversations) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            conversations,
        })
    }

    /// Adds a session of `identity` under its broker-side `client_id`. An older session with
    /// the same client id is told it was replaced and stops receiving at once, as MQTT requires.
    pub(crate) fn register(
        self: &Arc<Self>,
        identity: Arc<Identity>,
        client_id: String,
    ) -> (Registration, Mailbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        if let Some(closed) = state.closed {
            let _ = tx.send(closed());
        }
        if let Some(old) = state.by_client.insert(client_id.clone(), id) {
            if let Some(old) = state.remove(old) {
                let _ = old.tx.send(Event::Replaced);
            }
        }
        state
            .by_user
            .entry(identity.user_id.clone())
            .or_default()
            .push(id);
        state.sessions.insert(
            id,
            Entry {
                identity,
                client_id,
                wildcards: Vec::new(),
                exact: Vec::new(),
                tx,
                backlog: backlog.clone(),
            },
        );
        let registration = Registration {
            hub: self.clone(),
            id,
        };
        (registration, Mailbox { rx, backlog })
    }

    /// Routes `filter` to the session: effective for every message the bus delivers after this
    /// returns. (Subscribing twice to one filter replaces its QoS.)
    pub(crate) fn subscribe(&self, sid: u64, filter: &str, qos: QoS) {
        let mut state = lock(&self.state);
        state.unsubscribe(sid, filter);
        let Some(entry) = state.sessions.get_mut(&sid) else {
            return; // replaced meanwhile
        };
        if has_wildcard(filter) {
            entry.wildcards.push((filter.to_owned(), qos));
            if !state.wildcard.contains(&sid) {
                state.wildcard.push(sid);
            }
        } else {
            entry.exact.push(filter.to_owned());
            state
                .exact
                .entry(filter.to_owned())
                .or_default()
                .push((sid, qos));
        }
    }

    pub(crate) fn unsubscribe(&self, sid: u64, filter: &str) {
        lock(&self.state).unsubscribe(sid, filter);
    }

    /// Drops every `chat/{cid}` subscription of `user_id`'s sessions (admins keep theirs): a
    /// member removed from a conversation stops receiving it before this returns.
    pub fn revoke_chat(&self, user_id: &str, cid: &str) {
        let topic = chat_topic(cid);
        let mut state = lock(&self.state);
        let sids = state.by_user.get(user_id).cloned().unwrap_or_default();
        for sid in sids {
            let admin = state
                .sessions
                .get(&sid)
                .is_some_and(|e| e.identity.role == Role::Admin);
            if !admin {
                debug!(session = sid, %topic, "membership revoked, dropping the subscription");
                state.unsubscribe(sid, &topic);
            }
        }
    }

    /// Tells every session the server is shutting down.
    pub(crate) fn shutdown(&self) {
        self.close_all(|| Event::Shutdown);
    }

    fn close_all(&self, event: fn() -> Event) {
        let mut state = lock(&self.state);
        state.closed = Some(event);
        for entry in state.sessions.values() {
            let _ = entry.tx.send(event());
        }
    }
}

impl Deliver for Hub {
    fn deliver(&self, message: Message) {
        let Some(topic) = message.topic_str() else {
            return;
        };
        let mut state = lock(&self.state);
        let mut too_slow = Vec::new();
        for (sid, qos) in state.matches(topic) {
            let Some(entry) = state.sessions.get(&sid) else {
                continue;
            };
            let who = &entry.identity;
            if who.role != Role::Admin && !message.audience.includes(&who.user_id) {
                continue;
            }
            let is_member = |cid: &str| self.conversations.is_member(cid, &who.user_id);
            if !acl::may_receive(who, topic, is_member) {
                continue;
            }
            let len = message.payload.len();
            let waiting = entry.backlog.messages.fetch_add(1, Ordering::Relaxed);
            let bytes = entry.backlog.bytes.fetch_add(len, Ordering::Relaxed);
            if waiting >= MAILBOX_MESSAGES || bytes + len > MAILBOX_BYTES {
                too_slow.push(sid);
                continue;
            }
            let _ = entry.tx.send(Event::Deliver {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos,
            });
        }
        for sid in too_slow {
            warn!(session = sid, "session fell too far behind; dropping it");
            metrics::SESSIONS_DROPPED_SLOW.inc();
            if let Some(entry) = state.remove(sid) {
                entry.backlog.dropped.store(true, Ordering::Relaxed);
                let _ = entry.tx.send(Event::TooSlow);
            }
        }
    }

    fn closed(&self) {
        self.close_all(|| Event::BusClosed);
    }
}
