//! A live session's mailbox: one stream of [`Event`]s from the hub, bounded by the hub (messages
//! and bytes), so control events (replaced, shutdown) always get through.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

use super::stored::Queued;
use crate::broker::codec::QoS;

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
        /// The durable event-log sequence, for events the REST layer made.
        event: Option<u64>,
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
pub(super) struct Backlog {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// Set when the hub dropped the session; checked before anything else is written.
    dropped: AtomicBool,
}

impl Backlog {
    /// Counts a message in; false if the mailbox is over its bound.
    pub(super) fn admit(&self, len: usize) -> bool {
        let waiting = self.messages.fetch_add(1, Ordering::Relaxed);
        let bytes = self.bytes.fetch_add(len, Ordering::Relaxed);
        waiting < MAILBOX_MESSAGES && bytes + len <= MAILBOX_BYTES
    }

    pub(super) fn drop_session(&self) {
        self.dropped.store(true, Ordering::Relaxed);
    }
}

/// The sending side, kept by the hub.
pub(super) struct Sender {
    pub tx: mpsc::UnboundedSender<Event>,
    pub backlog: Arc<Backlog>,
}

impl Sender {
    pub(super) fn send(&self, event: Event) {
        let _ = self.tx.send(event);
    }
}

/// A session's side of its mailbox.
pub(crate) struct Mailbox {
    rx: mpsc::UnboundedReceiver<Event>,
    backlog: Arc<Backlog>,
}

/// A new mailbox and its sender.
pub(super) fn mailbox() -> (Sender, Mailbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let sender = Sender {
        tx,
        backlog: backlog.clone(),
    };
    (sender, Mailbox { rx, backlog })
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

    /// Every QoS 1 message still waiting, in order (QoS 0 and control events are dropped).
    pub(super) fn drain(&mut self) -> Vec<Queued> {
        let mut out = Vec::new();
        while let Ok(event) = self.rx.try_recv() {
            if let Event::Deliver {
                topic,
                payload,
                qos: QoS::AtLeastOnce,
                event,
            } = event
            {
                out.push(Queued {
                    topic,
                    payload,
                    pkid: None,
                    event,
                });
            }
        }
        out
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
