//! The bus: the one way a publish travels. Sessions and services hand every accepted publish to
//! a [`Bus`]; it carries them in one order and hands them back, in that order, to a
//! [`Deliver`] (the broker's hub), which routes each to the local sessions that subscribed.
//!
//! The embedded implementation ([`embedded`]) is the rumqttd router behind one in-process link.
//! A bus that cannot keep up makes publishers wait (backpressure) instead of dropping; any loss
//! that can still happen is counted (`callbus_bus_lost_total`) and logged.

pub mod direct;
pub mod embedded;
mod envelope;
mod extras;
pub mod nats;
pub(crate) mod subject;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::sync::Arc;

pub use extras::Extras;

/// Who may receive a message, besides matching a subscription and passing the ACL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Audience {
    /// Every subscriber the ACL allows.
    #[default]
    Subscribers,
    /// Only these users' sessions (and admins'): the `chat/{cid}` copy of call signaling is for
    /// the call's two parties. Decided once, by the publisher.
    Users(Arc<[String]>),
}

impl Audience {
    /// Whether `user_id` is in the audience (admins are checked by the caller).
    pub fn includes(&self, user_id: &str) -> bool {
        match self {
            Audience::Subscribers => true,
            Audience::Users(users) => users.iter().any(|u| u == user_id),
        }
    }
}

/// One publish on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    pub audience: Audience,
    /// Set on events the REST layer made and logged durably: their sequence in the event log,
    /// so a persistent session can be replayed from the log after a restart.
    pub event: Option<u64>,
    /// When it stops being worth delivering (Unix ms): MQTT 5's Message Expiry Interval, and
    /// callbus's own on a call's ring (not rung once the call stopped ringing).
    pub expires_at_ms: Option<u64>,
    /// MQTT 5 properties for v5 subscribers, and the publisher for No Local.
    pub extras: Option<Arc<Extras>>,
}

impl Message {
    /// A message for every subscriber of `topic`.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: Bytes::from(topic.into()),
            payload: payload.into(),
            audience: Audience::Subscribers,
            event: None,
            expires_at_ms: None,
            extras: None,
        }
    }

    /// The same message, expiring at `expires_at_ms` (Unix ms).
    pub fn expiring(self, expires_at_ms: Option<u64>) -> Self {
        Self {
            expires_at_ms,
            ..self
        }
    }

    /// The same message, with `extras` (none if empty).
    pub fn with_extras(self, extras: Option<Arc<Extras>>) -> Self {
        Self {
            extras: extras.filter(|e| !e.is_empty()),
            ..self
        }
    }

    /// Whether it expired by `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// A durable event (logged under sequence `event`) for every subscriber of `topic`.
    pub fn logged(topic: impl Into<String>, payload: impl Into<Bytes>, event: u64) -> Self {
        Self {
            event: Some(event),
            ..Self::new(topic, payload)
        }
    }

    /// A message for `users` only (and admins).
    pub fn to_users(topic: impl Into<String>, payload: impl Into<Bytes>, users: &[&str]) -> Self {
        Self {
            audience: Audience::Users(users.iter().map(|u| u.to_string()).collect()),
            ..Self::new(topic, payload)
        }
    }

    /// The topic as text (always UTF-8 when it came through [`Message::new`]).
    pub fn topic_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.topic).ok()
    }
}

/// Decodes a delivered envelope and encodes it again (for the fuzz targets).
#[doc(hidden)]
pub fn fuzz_envelope(raw: Bytes) {
    if let Some(decoded) = envelope::decode(Bytes::from_static(b"chat/c1"), raw) {
        let again = envelope::encode(decoded.seq, &decoded.message);
        let round = envelope::decode(decoded.message.topic.clone(), again);
        assert!(
            round.is_some_and(|r| r.message == decoded.message),
            "envelope round trip"
        );
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("the bus is closed")]
    Closed,
    #[error("the bus could not start: {0}")]
    Start(String),
}

/// Where a bus hands its deliveries, in bus order.
pub trait Deliver: Send + Sync + 'static {
    /// Routes `message` to every local subscription it matches.
    fn deliver(&self, message: Message);
    /// Routes `message` to the local subscriptions made with exactly `filter` (a bus that
    /// routes by interest receives one copy per filter it was asked for).
    fn deliver_via(&self, filter: &str, message: Message);
    /// The bus is gone: nothing will be delivered any more.
    fn closed(&self);
}

/// Which filters the local sessions hold, for a bus that carries only what a node's sessions
/// subscribe to. The hub calls it under its lock, in order; it must not block.
pub trait Interest: Send + Sync + 'static {
    /// The first local subscription with `filter` was made.
    fn add(&self, filter: &str);
    /// The last local subscription with `filter` is gone.
    fn remove(&self, filter: &str);
}

/// Resolves once a published message is stored ([`Bus::publish_kept`]).
pub type Kept = BoxFuture<'static, Result<(), BusError>>;

/// Carries publishes in one order to every [`Deliver`]er.
pub trait Bus: Send + Sync + 'static {
    /// Hands `message` to the bus after everything published before it. Waits while the bus is
    /// full (backpressure); an error means the bus is gone.
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BusError>>;

    /// Like [`Bus::publish`], but resolves only once the message is stored where it outlives
    /// any one node (cluster mode: JetStream has it, replicated). The same as `publish` for a
    /// bus whose store is the node's own disk (its callers make that durable themselves).
    fn publish_durable(&self, message: Message) -> BoxFuture<'_, Result<(), BusError>> {
        self.publish(message)
    }

    /// Whether a client's QoS 1 PUBLISH is acknowledged only once the bus stored it
    /// ([`Bus::publish_kept`]): true for a bus whose store outlives any one node (cluster
    /// mode). A bus whose store is the node's own keeps nothing for relays to wait for.
    fn keeps_relays(&self) -> bool {
        false
    }

    /// Publishes `message` as [`Bus::publish`] does (subscribers get it now) and gives back
    /// what resolves once the bus stored it where it outlives any one node; see
    /// [`Bus::keeps_relays`]. The returned future owns what it needs: a session keeps it
    /// while it reads on.
    fn publish_kept(&self, message: Message) -> BoxFuture<'_, Result<Kept, BusError>> {
        Box::pin(async move {
            self.publish(message).await?;
            let kept: Kept = Box::pin(std::future::ready(Ok(())));
            Ok(kept)
        })
    }

    /// Resolves once every interest change made so far is in effect, so that a subscription
    /// acknowledged after it receives whatever is published next. Immediate for a bus that
    /// carries everything to everyone.
    fn settled(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// A cloneable handle for publishing: what sessions and services hold.
#[derive(Clone)]
pub struct Publisher(Arc<dyn Bus>);

impl Publisher {
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Self(bus)
    }

    pub async fn publish(&self, message: Message) -> Result<(), BusError> {
        self.0.publish(message).await
    }

    /// See [`Bus::publish_durable`].
    pub async fn publish_durable(&self, message: Message) -> Result<(), BusError> {
        self.0.publish_durable(message).await
    }

    /// See [`Bus::keeps_relays`].
    pub fn keeps_relays(&self) -> bool {
        self.0.keeps_relays()
    }

    /// See [`Bus::publish_kept`].
    pub async fn publish_kept(&self, message: Message) -> Result<Kept, BusError> {
        self.0.publish_kept(message).await
    }

    /// See [`Bus::settled`].
    pub async fn settled(&self) {
        self.0.settled().await
    }
}
