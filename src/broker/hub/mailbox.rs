//! A live session's mailbox: one stream of [`Event`]s from the hub. Deliveries are bounded
//! (messages and bytes); control events (replaced, shutdown) always get through.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

use super::stored::Queued;
use crate::broker::codec::QoS;
use crate::sync::lock;

/// Most messages that may wait in one session's mailbox.
pub(crate) const MAILBOX_MESSAGES: usize = 1024;
/// Most payload bytes that may wait in one session's mailbox.
pub(crate) const MAILBOX_BYTES: usize = 8 * 1024 * 1024;

/// What a session is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// Write this message to the client at this QoS.
    Deliver(QoS, Queued),
    /// A newer connection of the same user took this client id.
    Replaced,
    /// The session fell too far behind its mailbox and was dropped.
    TooSlow,
    /// The bus is gone.
    BusClosed,
    /// The server is shutting down.
    Shutdown,
}

/// The queue a hub sender fills and a session empties. A plain deque behind a lock and a
/// `Notify`: an idle session's mailbox allocates nothing (a channel would preallocate a block
/// of 32 events, about 2.5 KiB, per connection).
#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    notify: Notify,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Event>,
    /// Payload bytes of the deliveries waiting.
    bytes: usize,
    /// Set when the hub dropped the session as too slow; nothing more is written.
    dropped: bool,
    /// Set when the hub's sender is gone.
    closed: bool,
}

/// The sending side, kept by the hub.
pub(super) struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues a control event (always accepted).
    pub(super) fn send(&self, event: Event) {
        lock(&self.shared.inner).queue.push_back(event);
        self.shared.notify.notify_one();
    }

    /// Queues a delivery; false if the mailbox is over its bound (the client stopped reading).
    pub(super) fn deliver(&self, event: Event) -> bool {
        let len = match &event {
            Event::Deliver(_, message) => message.payload.len(),
            _ => 0,
        };
        let mut inner = lock(&self.shared.inner);
        if inner.queue.len() >= MAILBOX_MESSAGES || inner.bytes + len > MAILBOX_BYTES {
            return false;
        }
        inner.bytes += len;
        inner.queue.push_back(event);
        drop(inner);
        self.shared.notify.notify_one();
        true
    }

    /// Drops the session: it is told so before anything still waiting is written.
    pub(super) fn drop_session(&self) {
        lock(&self.shared.inner).dropped = true;
        self.shared.notify.notify_one();
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        lock(&self.shared.inner).closed = true;
        self.shared.notify.notify_one();
    }
}

/// A session's side of its mailbox.
pub(crate) struct Mailbox {
    shared: Arc<Shared>,
}

/// A new mailbox and its sender.
pub(super) fn mailbox() -> (Sender, Mailbox) {
    let shared = Arc::new(Shared::default());
    let sender = Sender {
        shared: shared.clone(),
    };
    (sender, Mailbox { shared })
}

impl Mailbox {
    /// The next event. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Event {
        loop {
            if let Some(event) = self.try_recv() {
                return event;
            }
            // A notify_one with nobody waiting leaves a permit: no wake-up is lost.
            self.shared.notify.notified().await;
        }
    }

    /// The next event if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Event> {
        let mut inner = lock(&self.shared.inner);
        if inner.dropped {
            return Some(Event::TooSlow);
        }
        let Some(event) = inner.queue.pop_front() else {
            // The hub's sender is gone: the session is gone from the hub.
            return inner.closed.then_some(Event::Shutdown);
        };
        if let Event::Deliver(_, message) = &event {
            inner.bytes -= message.payload.len();
        }
        if inner.queue.is_empty() && inner.queue.capacity() > 64 {
            inner.queue = VecDeque::new(); // give a burst's memory back
        }
        Some(event)
    }

    /// Every QoS 1 message still waiting, in order (QoS 0 and control events are dropped).
    pub(super) fn drain(&mut self) -> Vec<Queued> {
        let mut inner = lock(&self.shared.inner);
        inner.bytes = 0;
        std::mem::take(&mut inner.queue)
            .into_iter()
            .filter_map(|event| match event {
                Event::Deliver(QoS::AtLeastOnce, message) => Some(message),
                _ => None,
            })
            .collect()
    }
}
