//! A persistent session while its client is away: the QoS 1 messages it was sent but had not
//! acknowledged, and those published for it since, bounded (oldest dropped and counted).

use bytes::Bytes;
use std::collections::VecDeque;
use tokio::time::Instant;

use crate::config::SessionsConfig;
use crate::metrics;

/// A message kept for a session. `pkid` is set once it was sent (it is then resent with DUP and
/// the same packet id, as MQTT 3.1.1 requires).
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub topic: Bytes,
    pub payload: Bytes,
    pub pkid: Option<u16>,
    /// Its sequence in the durable event log, for events the REST layer made.
    pub event: Option<u64>,
    /// Set when it came from a durable queue: handed back once acknowledged.
    pub receipt: Option<super::Receipt>,
    /// Not delivered after this (Unix ms).
    pub expires_at_ms: Option<u64>,
    /// It may have reached the client before a crash: sent with DUP.
    pub dup: bool,
    /// MQTT 5 properties from its publisher, for v5 subscribers.
    pub extras: Option<std::sync::Arc<crate::bus::Extras>>,
}

/// What a session that ends hands back to the hub.
pub(crate) struct Parting {
    /// Sent and not acknowledged, oldest first.
    pub inflight: Vec<Queued>,
    /// The last packet id used, so the resumed session does not reuse one in flight.
    pub last_pkid: u16,
    /// The highest event-log sequence the client acknowledged.
    pub acked_event: u64,
    /// Not sent yet (held back by the client's Receive Maximum), oldest first.
    pub unsent: Vec<Queued>,
}

/// What a resumed session starts from.
#[derive(Default)]
pub(crate) struct Resumed {
    /// Resend these first, with DUP.
    pub inflight: Vec<Queued>,
    /// Then these, in order.
    pub queue: Vec<Queued>,
    /// Messages dropped at the queue's bound while away.
    pub dropped: u64,
    pub last_pkid: u16,
    /// Whether the session holds a filter with No Local.
    pub no_local: bool,
}

pub(super) struct Stored {
    inflight: Vec<Queued>,
    queue: VecDeque<Queued>,
    bytes: usize,
    dropped: u64,
    last_pkid: u16,
    pub expires_at: Instant,
    /// The connection that left it, so its late parting lands here and nowhere else.
    pub conn: u64,
    /// Restored after a restart: durable events after this sequence come from the event log
    /// on resume, so they are not queued here as well.
    pub from_log: Option<u64>,
    /// Restored after a restart: events logged up to this sequence may have reached the client
    /// before (its acknowledgement not yet on disk), so they go again with DUP.
    pub logged_before: u64,
    /// Newer connections waiting for that connection's parting before they resume.
    pub waiting: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Queued {
    /// A message not yet sent.
    pub(crate) fn new(topic: Bytes, payload: Bytes) -> Queued {
        Queued {
            topic,
            payload,
            pkid: None,
            event: None,
            receipt: None,
            expires_at_ms: None,
            dup: false,
            extras: None,
        }
    }

    /// A message the bus delivered.
    pub(crate) fn from_bus(message: &crate::bus::Message) -> Queued {
        Queued {
            event: message.event,
            expires_at_ms: message.expires_at_ms,
            extras: message.extras.clone(),
            ..Queued::new(message.topic.clone(), message.payload.clone())
        }
    }
}

impl Stored {
    pub(super) fn new(conn: u64, expires_at: Instant) -> Self {
        metrics::SESSIONS_STORED.inc();
        Self {
            inflight: Vec::new(),
            queue: VecDeque::new(),
            bytes: 0,
            dropped: 0,
            last_pkid: 0,
            expires_at,
            conn,
            from_log: None,
            logged_before: 0,
            waiting: Vec::new(),
        }
    }

    /// Keeps a message published while the client is away.
    pub(super) fn push(&mut self, message: Queued, limits: &SessionsConfig) {
        if self.from_log.is_some() && message.event.is_some() {
            return; // replayed from the event log on resume
        }
        self.bytes += message.payload.len();
        self.queue.push_back(message);
        while self.queue.len() > limits.queue_messages || self.bytes > limits.queue_bytes {
            let Some(old) = self.queue.pop_front() else {
                break;
            };
            self.bytes -= old.payload.len();
            self.dropped += 1;
            metrics::SESSION_QUEUE_DROPPED.inc();
        }
    }

    /// Payload bytes queued.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the oldest queued messages until `excess` bytes are gone (or nothing is left).
    pub(super) fn shed(&mut self, mut excess: usize) {
        while excess > 0 {
            let Some(old) = self.queue.pop_front() else {
                return;
            };
            let len = old.payload.len();
            self.bytes -= len;
            excess = excess.saturating_sub(len.max(1));
            self.dropped += 1;
            metrics::SESSION_QUEUE_DROPPED.inc();
        }
    }

    /// Takes back what the connection had not finished: its unacknowledged messages, then
    /// what was still in its mailbox, both older than anything queued since.
    pub(super) fn part(&mut self, parting: Parting, unsent: Vec<Queued>, limits: &SessionsConfig) {
        self.inflight = parting.inflight;
        self.last_pkid = parting.last_pkid;
        let newer = std::mem::take(&mut self.queue);
        self.bytes = 0;
        for message in unsent.into_iter().chain(newer) {
            self.push(message, limits);
        }
        for waiter in self.waiting.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// What the session resumes with; `logged` are the durable events a restored session
    /// missed (from the event log), delivered before what was queued since the restart.
    pub(super) fn resume(mut self, logged: Vec<Queued>) -> Resumed {
        let mut queue = logged;
        queue.extend(std::mem::take(&mut self.queue));
        // What expired while the client was away is not delivered.
        let now = crate::model::call::now_ms();
        let live = |m: &Queued| m.expires_at_ms.is_none_or(|at| at > now);
        queue.retain(live);
        self.inflight.retain(live);
        Resumed {
            inflight: std::mem::take(&mut self.inflight),
            queue,
            dropped: self.dropped,
            last_pkid: self.last_pkid,
            no_local: false,
        }
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        metrics::SESSIONS_STORED.dec();
    }
}
