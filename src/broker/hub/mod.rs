//! The hub: the one owner of sessions, their subscriptions and their mailboxes. The bus hands it
//! every message in bus order; it matches each message once against the subscriptions, applies
//! the ACL and the message's audience once per receiving session, and puts the result in that
//! session's mailbox with the QoS to deliver at. A session reads one stream of [`Event`]s and
//! does no matching, parsing or store reads of its own.
//!
//! A persistent session (`clean_session = 0`) outlives its connection: its subscriptions stay
//! here, QoS 1 messages for it are queued ([`stored`]) until it comes back or expires, and a
//! reconnect with the same client id resumes it.
//!
//! Why routing lives here and not in rumqttd (one rumqttd link per session): rumqttd
//! preallocates about 100 KB of queues per link and matches every never-seen topic against every
//! filter, which made idle connections cost 49 KiB each and the first notification to 10k users
//! take 8.6 s (BENCHMARKS.md). Here routing is a hash lookup.

mod mailbox;
mod routes;
mod stored;

pub(crate) use mailbox::{Event, Mailbox, MAILBOX_MESSAGES};
pub(crate) use stored::{Parting, Queued, Resumed};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::codec::QoS;
use crate::auth::{Identity, Role};
use crate::bridge::acl;
use crate::bus::{Deliver, Message};
use crate::config::SessionsConfig;
use crate::metrics;
use crate::model::topic::chat_topic;
use crate::store::{SessionRecord, Store, StoreError};
use crate::sync::lock;
use mailbox::Sender;
use routes::Routes;
use stored::Stored;

/// Where a session's messages go: a live connection's mailbox, or the store of a persistent
/// session whose client is away.
enum Link {
    Live { sender: Sender, conn: u64 },
    Away(Box<Stored>),
}

struct Entry {
    identity: Arc<Identity>,
    /// Broker-side client id, `<user id>.<client id>`.
    client_id: String,
    /// `clean_session = 0`: kept after the connection ends (and across restarts).
    persistent: bool,
    link: Link,
    /// The highest event-log sequence the client acknowledged (persistent sessions).
    delivered_through: u64,
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Entry>,
    by_client: HashMap<String, u64>,
    by_user: HashMap<String, Vec<u64>>,
    routes: Routes,
    /// Set at shutdown or when the bus is gone: new sessions are told at once.
    closed: Option<fn() -> Event>,
}

impl State {
    fn remove(&mut self, sid: u64) -> Option<Entry> {
        let entry = self.sessions.remove(&sid)?;
        self.routes.remove_session(sid);
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
}

pub struct Hub {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Membership (checked on every chat delivery and replay: no stale ACL cache), persistent
    /// session records and the durable event log.
    store: Store,
    sessions: SessionsConfig,
}

/// A connection's place in the hub. [`Registration::close`] ends it; dropping it without
/// closing ends it as if nothing was in flight.
pub(crate) struct Registration {
    hub: Arc<Hub>,
    pub(crate) id: u64,
    conn: u64,
    closed: bool,
}

impl Registration {
    /// Ends the connection, handing back what it had not finished (a persistent session keeps
    /// it for when the client returns).
    pub(crate) fn close(mut self, mailbox: Mailbox, parting: Parting) {
        self.closed = true;
        self.hub.leave(self.id, self.conn, Some((mailbox, parting)));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.closed {
            self.hub.leave(self.id, self.conn, None);
        }
    }
}

/// What registering gives.
pub(crate) enum Registered {
    Attached(Attached),
    /// The session is live on an older connection, which was told to go: register again once
    /// it has handed the session back (or after a bound, if it never does).
    Handover(tokio::sync::oneshot::Receiver<()>),
}

/// A registered connection.
pub(crate) struct Attached {
    pub registration: Registration,
    pub mailbox: Mailbox,
    /// Set when an existing session was resumed (CONNACK session present).
    pub resumed: Option<Resumed>,
}

impl Hub {
    /// The hub, with the persistent sessions stored before a restart restored as away.
    pub fn new(store: Store, sessions: SessionsConfig) -> Result<Arc<Hub>, StoreError> {
        let hub = Arc::new(Hub {
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            store,
            sessions,
        });
        hub.restore()?;
        tokio::spawn(expire_sessions(Arc::downgrade(&hub)));
        Ok(hub)
    }

    fn restore(&self) -> Result<(), StoreError> {
        let records = self.store.sessions.all()?;
        let mut state = lock(&self.state);
        for (client_id, record) in records {
            let identity = Arc::new(Identity {
                user_id: record.user_id.clone(),
                username: record.user_id.clone(),
                first_name: String::new(),
                last_name: String::new(),
                role: if record.admin {
                    Role::Admin
                } else {
                    Role::User
                },
            });
            let mut stored = Stored::new(0, Instant::now() + self.sessions.expiry());
            stored.from_log = Some(record.delivered_through);
            let link = Link::Away(Box::new(stored));
            let sid = self.add(&mut state, identity, client_id, true, link);
            if let Some(entry) = state.sessions.get_mut(&sid) {
                entry.delivered_through = record.delivered_through;
            }
            for (filter, qos) in &record.filters {
                let qos = if *qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                state.routes.subscribe(sid, filter, qos);
            }
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
    fn save(&self, state: &State, sid: u64) {
        let Some(entry) = state.sessions.get(&sid).filter(|e| e.persistent) else {
            return;
        };
        let record = SessionRecord {
            user_id: entry.identity.user_id.clone(),
            admin: entry.identity.role == Role::Admin,
            filters: state
                .routes
                .filters_of(sid)
                .into_iter()
                .map(|(f, q)| (f, q as u8))
                .collect(),
            delivered_through: entry.delivered_through,
        };
        if let Err(e) = self.store.sessions.put(&entry.client_id, &record) {
            warn!(error = %e, "cannot store a persistent session");
        }
    }

    fn forget(&self, entry: &Entry) {
        if entry.persistent {
            if let Err(e) = self.store.sessions.remove(&entry.client_id) {
                warn!(error = %e, "cannot remove a stored session");
            }
        }
    }

    /// Makes every session record written so far durable (before a persistent SUBACK).
    pub(crate) async fn persist(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    /// The durable events a restored session missed, for its notifications subscription.
    fn logged_since(&self, state: &State, sid: u64, user_id: &str, through: u64) -> Vec<Queued> {
        let topic = crate::model::topic::notifications_topic(user_id);
        let subscribed = state
            .routes
            .filters_of(sid)
            .iter()
            .any(|(f, _)| crate::model::topic::filter_matches(f, &topic));
        if !subscribed {
            return Vec::new();
        }
        match self.store.sessions.events_after(user_id, through) {
            Ok(events) => events
                .into_iter()
                .map(|(seq, payload)| Queued {
                    topic: bytes::Bytes::from(topic.clone()),
                    payload: bytes::Bytes::from(payload),
                    pkid: None,
                    event: Some(seq),
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the event log");
                Vec::new()
            }
        }
    }

    fn may_receive(&self, who: &Identity, topic: &str) -> bool {
        acl::may_receive(who, topic, |cid| {
            self.store.conversations.is_member(cid, &who.user_id)
        })
    }

    /// Attaches a connection of `identity` under its broker-side `client_id`. An older live
    /// connection with the same client id is told it was replaced and stops receiving at once.
    /// With `clean` false an existing session is resumed (what was queued for it is returned,
    /// checked against the ACL again) or a persistent one is made; with `clean` true any stored
    /// session is discarded. A persistent session still live on an older connection is handed
    /// over: with `handover` the caller is told to wait for the older connection to part, so
    /// nothing it had in flight is reordered; without, it is taken at once.
    pub(crate) fn register(
        self: &Arc<Self>,
        identity: Arc<Identity>,
        client_id: &str,
        clean: bool,
        handover: bool,
    ) -> Registered {
        let (sender, mailbox) = mailbox::mailbox();
        let conn = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        if handover && !clean {
            if let Some(wait) = self.hand_over(&mut state, client_id) {
                return Registered::Handover(wait);
            }
        }
        if let Some(closed) = state.closed {
            sender.send(closed());
        }
        let resumable = match state.by_client.get(client_id).copied() {
            Some(old) if !clean && state.sessions.get(&old).is_some_and(Entry::resumable) => {
                Some(old)
            }
            Some(old) => {
                if let Some(entry) = state.remove(old) {
                    self.forget(&entry);
                    if let Link::Live { sender: old, .. } = entry.link {
                        old.send(Event::Replaced);
                    }
                }
                None
            }
            None => None,
        };
        // A session restored after a restart resumes with the durable events it missed.
        let logged = resumable
            .and_then(|sid| match state.sessions.get(&sid) {
                Some(Entry {
                    link: Link::Away(stored),
                    identity,
                    ..
                }) => stored
                    .from_log
                    .map(|through| self.logged_since(&state, sid, &identity.user_id, through)),
                _ => None,
            })
            .unwrap_or_default();
        let resumed_entry =
            resumable.and_then(|sid| state.sessions.get_mut(&sid).map(|e| (sid, e)));
        let (sid, mut resumed) = match resumed_entry {
            Some((sid, entry)) => {
                let previous = std::mem::replace(&mut entry.link, Link::Live { sender, conn });
                entry.identity = identity.clone();
                let resumed = match previous {
                    Link::Live { sender: old, .. } => {
                        old.send(Event::Replaced);
                        Resumed::default()
                    }
                    Link::Away(stored) => stored.resume(logged),
                };
                (sid, Some(resumed))
            }
            None => {
                let link = Link::Live { sender, conn };
                let client_id = client_id.to_owned();
                let sid = self.add(&mut state, identity.clone(), client_id, !clean, link);
                self.save(&state, sid);
                (sid, None)
            }
        };
        drop(state);
        if let Some(resumed) = &mut resumed {
            // The ACL and membership are checked again on replay.
            resumed.inflight.retain(|m| self.replayable(&identity, m));
            resumed.queue.retain(|m| self.replayable(&identity, m));
        }
        let registration = Registration {
            hub: self.clone(),
            id: sid,
            conn,
            closed: false,
        };
        Registered::Attached(Attached {
            registration,
            mailbox,
            resumed,
        })
    }

    /// Tells the live connection of a persistent session to go and keeps the session for it
    /// to part into; returns what resolves once it has.
    fn hand_over(
        &self,
        state: &mut State,
        client_id: &str,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let sid = state.by_client.get(client_id)?;
        let entry = state.sessions.get_mut(sid)?;
        let (done, wait) = tokio::sync::oneshot::channel();
        match &mut entry.link {
            Link::Live { sender, conn } if entry.persistent => {
                sender.send(Event::Replaced);
                let mut stored = Stored::new(*conn, Instant::now() + self.sessions.expiry());
                stored.waiting.push(done);
                entry.link = Link::Away(Box::new(stored));
            }
            // Another connection is already waiting for the same parting.
            Link::Away(stored) if !stored.waiting.is_empty() => stored.waiting.push(done),
            _ => return None,
        }
        Some(wait)
    }

    fn add(
        &self,
        state: &mut State,
        identity: Arc<Identity>,
        client_id: String,
        persistent: bool,
        link: Link,
    ) -> u64 {
        let sid = self.next_id.fetch_add(1, Ordering::Relaxed);
        state.by_client.insert(client_id.clone(), sid);
        state
            .by_user
            .entry(identity.user_id.clone())
            .or_default()
            .push(sid);
        let entry = Entry {
            identity,
            client_id,
            persistent,
            link,
            delivered_through: 0,
        };
        state.sessions.insert(sid, entry);
        sid
    }

    fn replayable(&self, who: &Identity, message: &Queued) -> bool {
        std::str::from_utf8(&message.topic).is_ok_and(|t| self.may_receive(who, t))
    }

    /// A connection ended. A clean session goes; a persistent one is kept with what the
    /// connection had not finished. A connection already taken over hands its leftovers to
    /// the newer one.
    fn leave(&self, sid: u64, conn: u64, parting: Option<(Mailbox, Parting)>) {
        let mut state = lock(&self.state);
        let Some(entry) = state.sessions.get_mut(&sid) else {
            return;
        };
        let (unsent, parting) = match parting {
            Some((mut mailbox, parting)) => (mailbox.drain(), Some(parting)),
            None => (Vec::new(), None),
        };
        match &mut entry.link {
            Link::Live { conn: c, .. } if *c == conn => {
                if !entry.persistent {
                    state.remove(sid);
                    return;
                }
                let mut stored = Stored::new(conn, Instant::now() + self.sessions.expiry());
                if let Some(parting) = parting {
                    entry.delivered_through = entry.delivered_through.max(parting.acked_event);
                    stored.part(parting, unsent, &self.sessions);
                }
                entry.link = Link::Away(Box::new(stored));
                self.save(&state, sid);
            }
            Link::Live { sender, .. } => {
                let inflight = parting.map(|p| p.inflight).unwrap_or_default();
                for m in inflight.into_iter().chain(unsent) {
                    sender.deliver(Event::Deliver {
                        topic: m.topic,
                        payload: m.payload,
                        qos: QoS::AtLeastOnce,
                        event: m.event,
                    });
                }
            }
            Link::Away(stored) if stored.conn == conn => {
                if let Some(parting) = parting {
                    stored.part(parting, unsent, &self.sessions);
                }
            }
            Link::Away(_) => {}
        }
    }

    /// Routes `filter` to the session: effective for every message the bus delivers after this
    /// returns.
    pub(crate) fn subscribe(&self, sid: u64, filter: &str, qos: QoS) {
        let mut state = lock(&self.state);
        if state.sessions.contains_key(&sid) {
            state.routes.subscribe(sid, filter, qos);
            self.save(&state, sid);
        }
    }

    pub(crate) fn unsubscribe(&self, sid: u64, filter: &str) {
        let mut state = lock(&self.state);
        state.routes.unsubscribe(sid, filter);
        self.save(&state, sid);
    }

    /// Drops every `chat/{cid}` subscription of `user_id`'s sessions, stored ones included
    /// (admins keep theirs): a member removed from a conversation stops receiving it before
    /// this returns.
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
                state.routes.unsubscribe(sid, &topic);
                self.save(&state, sid);
            }
        }
    }

    /// How many live connections (devices) `user_id` has.
    pub fn live_devices(&self, user_id: &str) -> usize {
        let state = lock(&self.state);
        let sids = state.by_user.get(user_id).map(Vec::as_slice).unwrap_or(&[]);
        sids.iter()
            .filter(|sid| {
                state
                    .sessions
                    .get(sid)
                    .is_some_and(|e| matches!(e.link, Link::Live { .. }))
            })
            .count()
    }

    /// Whether a live connection holds this broker-side client id.
    pub(crate) fn is_live(&self, client_id: &str) -> bool {
        let state = lock(&self.state);
        let sid = state.by_client.get(client_id);
        sid.and_then(|sid| state.sessions.get(sid))
            .is_some_and(|e| matches!(e.link, Link::Live { .. }))
    }

    /// Whether a session may hold `filter` with at most `max` filters (subscribing again to
    /// one it holds takes no room).
    pub(crate) fn has_room(&self, sid: u64, filter: &str, max: usize) -> bool {
        let held = lock(&self.state).routes.filters_of(sid);
        held.len() < max || held.iter().any(|(f, _)| f == filter)
    }

    /// Tells every session the server is shutting down.
    pub(crate) fn shutdown(&self) {
        self.close_all(|| Event::Shutdown);
    }

    fn close_all(&self, event: fn() -> Event) {
        let mut state = lock(&self.state);
        state.closed = Some(event);
        for entry in state.sessions.values() {
            if let Link::Live { sender, .. } = &entry.link {
                sender.send(event());
            }
        }
    }

    /// Drops stored sessions whose expiry passed.
    fn expire(&self) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let expired: Vec<u64> = state
            .sessions
            .iter()
            .filter(|(_, e)| matches!(&e.link, Link::Away(s) if s.expires_at <= now))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in expired {
            if let Some(entry) = state.remove(sid) {
                info!(client = %entry.client_id, "stored session expired");
                self.forget(&entry);
                metrics::SESSIONS_EXPIRED.inc();
            }
        }
        drop(state);
        // No stored session can need events older than the expiry.
        let horizon = self.sessions.expiry() + Duration::from_secs(60);
        let before = crate::model::call::now_ms().saturating_sub(horizon.as_millis() as u64);
        if let Err(e) = self.store.sessions.trim_events(before) {
            warn!(error = %e, "cannot trim the event log");
        }
    }
}

impl crate::calls::Presence for Hub {
    fn live_devices(&self, user_id: &str) -> usize {
        Hub::live_devices(self, user_id)
    }

    fn keeps_sessions(&self, user_id: &str) -> bool {
        let state = lock(&self.state);
        let sids = state.by_user.get(user_id).map(Vec::as_slice).unwrap_or(&[]);
        sids.iter()
            .any(|sid| state.sessions.get(sid).is_some_and(|e| e.persistent))
    }
}

impl Entry {
    fn resumable(&self) -> bool {
        self.persistent && !matches!(&self.link, Link::Away(s) if s.expires_at <= Instant::now())
    }
}

/// Sweeps expired stored sessions until the hub is gone.
async fn expire_sessions(hub: Weak<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        hub.expire();
    }
}

impl Deliver for Hub {
    fn deliver(&self, message: Message) {
        let Some(topic) = message.topic_str() else {
            return;
        };
        let mut state = lock(&self.state);
        let mut too_slow = Vec::new();
        for (sid, qos) in state.routes.matches(topic) {
            let Some(entry) = state.sessions.get_mut(&sid) else {
                continue;
            };
            let who = &entry.identity;
            if who.role != Role::Admin && !message.audience.includes(&who.user_id) {
                continue;
            }
            if !self.may_receive(who, topic) {
                continue;
            }
            match &mut entry.link {
                Link::Live { sender, .. } => {
                    let delivered = sender.deliver(Event::Deliver {
                        topic: message.topic.clone(),
                        payload: message.payload.clone(),
                        qos,
                        event: message.event,
                    });
                    if !delivered {
                        too_slow.push(sid);
                    }
                }
                // A client that is away gets what it subscribed to at QoS 1 when it is back.
                Link::Away(stored) if qos == QoS::AtLeastOnce => {
                    let queued = Queued {
                        topic: message.topic.clone(),
                        payload: message.payload.clone(),
                        pkid: None,
                        event: message.event,
                    };
                    stored.push(queued, &self.sessions);
                }
                Link::Away(_) => {}
            }
        }
        for sid in too_slow {
            warn!(session = sid, "session fell too far behind; dropping it");
            metrics::SESSIONS_DROPPED_SLOW.inc();
            self.drop_slow(&mut state, sid);
        }
    }

    fn closed(&self) {
        self.close_all(|| Event::BusClosed);
    }
}

impl Hub {
    /// Ends a live connection that stopped reading. A persistent session is kept (what its
    /// connection had not written comes back with its parting); a clean one goes.
    fn drop_slow(&self, state: &mut State, sid: u64) {
        let Some(entry) = state.sessions.get_mut(&sid) else {
            return;
        };
        let Link::Live { sender, conn } = &entry.link else {
            return;
        };
        sender.drop_session();
        if entry.persistent {
            let stored = Stored::new(*conn, Instant::now() + self.sessions.expiry());
            entry.link = Link::Away(Box::new(stored));
        } else {
            state.remove(sid);
        }
    }
}
