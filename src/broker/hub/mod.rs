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

mod durable;
mod lifecycle;
mod mailbox;
mod persist;
mod routes;
mod stored;
mod wills;

pub use durable::{Durable, Receipt};
pub(crate) use mailbox::{Event, Mailbox, Watch, MAILBOX_MESSAGES};
pub(crate) use stored::{Parting, Queued, Resumed};

use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
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
use crate::store::{Store, StoreError};
use crate::sync::lock;
use mailbox::Sender;
use routes::Routes;
use stored::Stored;

/// What a CONNECT asks of its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asked {
    /// Resume a stored session (3.1.1: `clean_session = 0`; 5: Clean Start 0); otherwise any
    /// stored one is discarded.
    pub resume: bool,
    /// Keep the session after the connection ends (3.1.1: `clean_session = 0`; 5: a Session
    /// Expiry Interval above 0).
    pub keep: bool,
}

/// Where a session's messages go: a live connection's mailbox, or the store of a persistent
/// session whose client is away.
enum Link {
    Live { sender: Sender, conn: u64 },
    Away(Box<Stored>),
}

struct Entry {
    identity: Arc<Identity>,
    /// Broker-side client id, `<user id>.<client id>`.
    client_id: Arc<str>,
    /// `clean_session = 0`: kept after the connection ends (and across restarts).
    persistent: bool,
    link: Link,
    /// The highest event-log sequence the client acknowledged (persistent sessions).
    delivered_through: u64,
    /// When a connection last attached to it (Unix ms), to tell a late claim from another
    /// node from one that is newer than this session.
    attached_ms: u64,
    /// Cluster mode, a persistent session: the queues feeding its QoS 1 subscriptions.
    queues: Option<Box<durable::Queues>>,
    /// How long a persistent session is kept after its connection ends.
    expiry: Duration,
    /// MQTT 5: the exact filters it holds with No Local (its own publishes are not sent to
    /// it through them). Kept for the session's life on this node, not in its stored record.
    no_local: Option<Box<[Box<str>]>>,
}

/// A user's id as a map key, read from the identity of one of the user's sessions (the
/// same text, not a copy of it).
#[derive(Clone)]
struct UserKey(Arc<Identity>);

impl std::borrow::Borrow<str> for UserKey {
    fn borrow(&self) -> &str {
        self.0.user_id()
    }
}

impl std::hash::Hash for UserKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes: lookups by `&str` find it.
        self.0.user_id().hash(state);
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.user_id() == other.0.user_id()
    }
}

impl Eq for UserKey {}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Entry>,
    by_client: HashMap<Arc<str>, u64>,
    /// A user's sessions (most users have one or two devices: kept inline).
    by_user: HashMap<UserKey, SmallVec<[u64; 2]>>,
    routes: Routes,
    /// Set at shutdown or when the bus is gone: new sessions are told at once.
    closed: Option<fn() -> Event>,
    /// Cluster mode: told which client ids are held here.
    peers: Option<Arc<dyn Peers>>,
}

impl State {
    fn remove(&mut self, sid: u64) -> Option<Entry> {
        let entry = self.sessions.remove(&sid)?;
        self.routes.remove_session(sid);
        if self.by_client.get(&entry.client_id) == Some(&sid) {
            self.by_client.remove(&entry.client_id);
            if let Some(peers) = &self.peers {
                peers.held(&entry.client_id, false);
            }
        }
        let user = entry.identity.user_id();
        if let Some(sids) = self.by_user.get_mut(user) {
            sids.retain(|s| *s != sid);
            if sids.is_empty() {
                self.by_user.remove(user);
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
    /// Cluster mode: the other nodes.
    peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// Cluster mode: where persistent sessions are kept.
    durable: std::sync::OnceLock<Arc<dyn Durable>>,
    /// Wills waiting for their delay.
    wills: wills::DelayedWills,
}

/// The other nodes of a cluster, as the hub needs them.
pub trait Peers: Send + Sync + 'static {
    /// Has every other node end its session under broker-side `client_id` (a client that
    /// connects here takes its id over from wherever it was); resolves once they did, or
    /// after a bound.
    fn claim(&self, client_id: &str) -> futures_util::future::BoxFuture<'_, ()>;

    /// A session under `client_id` is held here now (`true`) or no longer. Called under the
    /// hub's lock, in order; must not block.
    fn held(&self, client_id: &str, held: bool);
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
            peers: std::sync::OnceLock::new(),
            durable: std::sync::OnceLock::new(),
            wills: Default::default(),
        });
        hub.restore()?;
        tokio::spawn(expire_sessions(Arc::downgrade(&hub)));
        Ok(hub)
    }

    /// How long a persistent session is kept after its connection ends, at most.
    pub(crate) fn session_expiry(&self) -> Duration {
        self.sessions.expiry()
    }

    /// Keeps session `sid` for `expiry` after its connection ends (at most the configured
    /// expiry): an MQTT 5 client's Session Expiry Interval.
    pub(crate) fn set_expiry(&self, sid: u64, expiry: Duration) {
        if let Some(entry) = lock(&self.state).sessions.get_mut(&sid) {
            entry.expiry = expiry.min(self.sessions.expiry());
        }
    }

    /// How long session `sid` is kept after its connection ends.
    pub(crate) fn expiry_of(&self, sid: u64) -> Duration {
        let state = lock(&self.state);
        state
            .sessions
            .get(&sid)
            .map_or(Duration::ZERO, |e| e.expiry)
    }

    fn may_receive(&self, who: &Identity, topic: &str) -> bool {
        acl::may_receive(who, topic, |cid| {
            self.store.conversations.is_member(cid, who.user_id())
        })
    }

    /// Routes `filter` to the session: effective for every message the bus delivers after this
    /// returns.
    /// `local` false: MQTT 5's No Local (the session's own publishes are not sent to it).
    pub(crate) fn subscribe(&self, sid: u64, filter: &str, qos: QoS, local: bool) {
        let mut state = lock(&self.state);
        if let Some(entry) = state.sessions.get_mut(&sid) {
            entry.set_no_local(filter, !local);
            // A cluster's persistent session gets QoS 1 from its queue, not the bus.
            let fed = entry.queues.is_some() && qos == QoS::AtLeastOnce;
            state.routes.subscribe(sid, filter, qos, fed);
            self.save(&state, sid);
        }
    }

    /// Drops `sid`'s subscription to exactly `filter`; whether it had one.
    pub(crate) fn unsubscribe(&self, sid: u64, filter: &str) -> bool {
        let mut state = lock(&self.state);
        if let Some(entry) = state.sessions.get_mut(&sid) {
            entry.set_no_local(filter, false);
        }
        let removed = state.routes.unsubscribe(sid, filter);
        self.save(&state, sid);
        removed
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
                if let Some(entry) = state.sessions.get_mut(&sid) {
                    self.close_queue(entry, &topic);
                }
                self.save(&state, sid);
            }
        }
    }

    /// How many live connections (devices) `user_id` has.
    pub fn live_devices(&self, user_id: &str) -> usize {
        let state = lock(&self.state);
        let sids = state.by_user.get(user_id).map_or(&[][..], |s| s.as_slice());
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
        let sids = state.by_user.get(user_id).map_or(&[][..], |s| s.as_slice());
        sids.iter()
            .any(|sid| state.sessions.get(sid).is_some_and(|e| e.persistent))
    }
}

impl Entry {
    /// Marks `filter` as held with No Local, or not.
    fn set_no_local(&mut self, filter: &str, no_local: bool) {
        if self.no_local.is_none() && !no_local {
            return;
        }
        let mut held = self.no_local.take().map(Vec::from).unwrap_or_default();
        held.retain(|f| &**f != filter);
        if no_local {
            held.push(filter.into());
        }
        self.no_local = (!held.is_empty()).then(|| held.into_boxed_slice());
    }

    /// Whether `message` on `topic` is this session's own, through a No Local subscription.
    fn own_message(&self, message: &Message, topic: &str) -> bool {
        let (Some(held), Some(extras)) = (&self.no_local, &message.extras) else {
            return false;
        };
        extras.origin.as_deref() == Some(&*self.client_id) && held.iter().any(|f| &**f == topic)
    }

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
        self.route(message, |routes, topic| routes.matches(topic));
    }

    fn deliver_via(&self, filter: &str, message: Message) {
        self.route(message, |routes, _| routes.holders(filter));
    }

    fn closed(&self) {
        self.close_all(|| Event::BusClosed);
    }
}

impl Hub {
    /// Tells the hub about the other nodes of its cluster.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let mut state = lock(&self.state);
        for client_id in state.by_client.keys() {
            peers.held(client_id, true);
        }
        state.peers = Some(peers.clone());
        let _ = self.peers.set(peers);
    }

    /// Takes `client_id` over from any other node (cluster mode; nothing otherwise).
    pub(crate) async fn claim(&self, client_id: &str) {
        if let Some(peers) = self.peers.get() {
            peers.claim(client_id).await;
        }
    }

    /// Ends the session under `client_id` here: its client connected to another node (at
    /// `claimed_ms`, if known: a session attached here after that is newer and stays). A live
    /// connection is told it was replaced; a stored session is dropped.
    pub fn release_client(&self, client_id: &str, claimed_ms: Option<u64>) {
        self.cancel_will(client_id, claimed_ms);
        let mut state = lock(&self.state);
        let Some(sid) = state.by_client.get(client_id).copied() else {
            return;
        };
        let newer = |e: &Entry| claimed_ms.is_some_and(|t| e.attached_ms > t);
        if state.sessions.get(&sid).is_some_and(newer) {
            return;
        }
        if let Some(entry) = state.remove(sid) {
            info!(client = %client_id, "taken over on another node");
            if entry.queues.is_none() {
                self.forget(&entry); // a durable one is the claimer's now
            }
            if let Link::Live { sender, .. } = entry.link {
                sender.send(Event::Replaced);
            }
        }
    }

    /// Whether `sid`'s entry is gone while its connection still runs: the session was taken
    /// over (by a connection here or on another node, [`Self::release_client`]).
    pub(crate) fn released(&self, sid: u64) -> bool {
        !lock(&self.state).sessions.contains_key(&sid)
    }

    /// Tells `interest` which filters the sessions hold, now and after every change.
    pub fn set_interest(&self, interest: Arc<dyn crate::bus::Interest>) {
        lock(&self.state).routes.set_interest(interest);
    }

    /// Hands `message` to the sessions `targets` picks, after the audience and the ACL.
    fn route(&self, message: Message, targets: impl FnOnce(&Routes, &str) -> Vec<(u64, QoS)>) {
        let Some(topic) = message.topic_str() else {
            return;
        };
        let mut state = lock(&self.state);
        let (mut too_slow, mut queued) = (Vec::new(), Vec::new());
        for (sid, qos) in targets(&state.routes, topic) {
            let Some(entry) = state.sessions.get_mut(&sid) else {
                continue;
            };
            if entry.queues.is_some() && qos == QoS::AtLeastOnce {
                continue; // its queue delivers it
            }
            let who = &entry.identity;
            if who.role != Role::Admin && !message.audience.includes(who.user_id()) {
                continue;
            }
            if !self.may_receive(who, topic) || entry.own_message(&message, topic) {
                continue;
            }
            match &mut entry.link {
                Link::Live { sender, .. } => {
                    let delivered = sender.deliver(Event::Deliver(qos, Queued::from_bus(&message)));
                    if !delivered {
                        too_slow.push(sid);
                    }
                }
                // A client that is away gets what it subscribed to at QoS 1 when it is back.
                Link::Away(stored) if qos == QoS::AtLeastOnce => {
                    stored.push(Queued::from_bus(&message), &self.sessions);
                    queued.push(sid);
                }
                Link::Away(_) => {}
            }
        }
        for sid in queued {
            self.keep_user_budget(&mut state, sid);
        }
        for sid in too_slow {
            warn!(session = sid, "session fell too far behind; dropping it");
            metrics::SESSIONS_DROPPED_SLOW.inc();
            self.drop_slow(&mut state, sid);
        }
    }

    /// Keeps what all of session `sid`'s user's stored sessions queue within
    /// `user_queue_bytes`, shedding the oldest of `sid`'s own queue.
    fn keep_user_budget(&self, state: &mut State, sid: u64) {
        let Some(user) = state.sessions.get(&sid).map(|e| e.identity.clone()) else {
            return;
        };
        let sids = state
            .by_user
            .get(user.user_id())
            .map_or(&[][..], |s| s.as_slice());
        let total: usize = (sids.iter())
            .filter_map(|s| match &state.sessions.get(s)?.link {
                Link::Away(stored) => Some(stored.bytes()),
                Link::Live { .. } => None,
            })
            .sum();
        let budget = self.sessions.user_queue_bytes;
        if total <= budget {
            return;
        }
        if let Some(Link::Away(stored)) = state.sessions.get_mut(&sid).map(|e| &mut e.link) {
            stored.shed(total - budget);
        }
    }

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
        if entry.queues.is_some() {
            self.part_durable(state, sid);
        } else if entry.persistent {
            let stored = Stored::new(*conn, Instant::now() + entry.expiry);
            entry.link = Link::Away(Box::new(stored));
        } else {
            state.remove(sid);
        }
    }
}
