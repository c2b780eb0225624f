//! A live session's mailbox: one stream of [`Event`]s from the hub. Deliveries are bounded
//! (messages and bytes); control events (replaced, shutdown) always get through.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

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
    /// The keepalive wheel found the client silent past its limit.
    Silent,
}

/// The queue a hub sender fills and a session empties: a plain deque and the session's waker
/// behind one lock. An idle session's mailbox allocates nothing (a channel would preallocate a
/// block of 32 events, about 2.5 KiB, per connection), and waiting on it is a 16-byte future.
#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// When the client was last heard, on the keepalive clock (ms).
    heard: AtomicU64,
    /// How long the client may stay silent (ms); 0 once the session is gone.
    limit: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// The session waiting for an event, if it is.
    waiter: Option<Waker>,
    queue: VecDeque<Event>,
    /// Payload bytes of the deliveries waiting.
    bytes: usize,
    /// Set when the hub dropped the session as too slow; nothing more is written.
    dropped: bool,
    /// Set when the hub's sender is gone.
    closed: bool,
    /// Set by the keepalive wheel: the client was silent past its limit.
    silent: bool,
}

/// The sending side, kept by the hub.
pub(super) struct Sender {
    shared: Arc<Shared>,
}

impl Shared {
    /// Changes the mailbox; when the change says so (true), wakes the session if it waits.
    fn update(&self, change: impl FnOnce(&mut Inner) -> bool) -> bool {
        let mut inner = lock(&self.inner);
        let changed = change(&mut inner);
        let waiter = changed.then(|| inner.waiter.take()).flatten();
        drop(inner);
        if let Some(waker) = waiter {
            waker.wake();
        }
        changed
    }
}

impl Sender {
    /// Queues a control event (always accepted).
    pub(super) fn send(&self, event: Event) {
        self.shared.update(|inner| {
            inner.queue.push_back(event);
            true
        });
    }

    /// Queues a delivery; false if the mailbox is over its bound (the client stopped reading).
    pub(super) fn deliver(&self, event: Event) -> bool {
        let len = match &event {
            Event::Deliver(_, message) => message.payload.len(),
            _ => 0,
        };
        self.shared.update(|inner| {
            if inner.queue.len() >= MAILBOX_MESSAGES || inner.bytes + len > MAILBOX_BYTES {
                return false;
            }
            inner.bytes += len;
            inner.queue.push_back(event);
            true
        })
    }

    /// Drops the session: it is told so before anything still waiting is written.
    pub(super) fn drop_session(&self) {
        self.shared.update(|inner| {
            inner.dropped = true;
            true
        });
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.update(|inner| {
            inner.closed = true;
            true
        });
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
    /// The next event, or `Pending` and the session is woken when there is one (senders
    /// change the mailbox and take the waker under the same lock: no wake-up is lost).
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let mut inner = lock(&self.shared.inner);
        if let Some(event) = Self::take(&mut inner) {
            return Poll::Ready(event);
        }
        Self::wait(&mut inner, cx)
    }

    /// Leaves the session's waker for the next sender.
    fn wait<T>(inner: &mut Inner, cx: &mut Context<'_>) -> Poll<T> {
        match &mut inner.waiter {
            Some(waker) => waker.clone_from(cx.waker()),
            waiter => *waiter = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Ready once the hub dropped the session for falling behind (the session is woken then,
    /// even while it waits for its client to take a write).
    pub(crate) fn poll_dropped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = lock(&self.shared.inner);
        if inner.dropped {
            return Poll::Ready(());
        }
        Self::wait(&mut inner, cx)
    }

    /// The next event if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Event> {
        Self::take(&mut lock(&self.shared.inner))
    }

    fn take(inner: &mut Inner) -> Option<Event> {
        if inner.dropped {
            return Some(Event::TooSlow);
        }
        if std::mem::take(&mut inner.silent) {
            return Some(Event::Silent);
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

    /// The client was heard at `now` (keepalive clock, ms).
    pub(crate) fn heard(&self, now: u64) {
        self.shared.heard.store(now, Ordering::Relaxed);
    }

    /// Whether the client has been silent for its limit by `now` (keepalive clock, ms).
    pub(crate) fn is_silent(&self, now: u64) -> bool {
        let shared = &self.shared;
        shared.heard.load(Ordering::Relaxed) + shared.limit.load(Ordering::Relaxed) <= now
    }

    /// Starts watching the client's silence: heard at `now`, it may stay silent `limit` ms.
    /// The handle is for the keepalive wheel; it keeps no session alive.
    pub(crate) fn watch(&self, now: u64, limit: u64) -> Watch {
        self.shared.heard.store(now, Ordering::Relaxed);
        self.shared.limit.store(limit.max(1), Ordering::Relaxed);
        Watch(Arc::downgrade(&self.shared))
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

impl Drop for Mailbox {
    fn drop(&mut self) {
        // The session is over: the keepalive wheel lets go of it.
        self.shared.limit.store(0, Ordering::Relaxed);
    }
}

/// The keepalive wheel's handle on a session's mailbox (see [`Mailbox::watch`]).
pub(crate) struct Watch(Weak<Shared>);

impl Watch {
    /// When the client's silence runs out (keepalive clock, ms), or `None` once the session
    /// is gone.
    pub(crate) fn deadline(&self) -> Option<u64> {
        let shared = self.0.upgrade()?;
        let limit = shared.limit.load(Ordering::Relaxed);
        (limit > 0).then(|| shared.heard.load(Ordering::Relaxed) + limit)
    }

    /// Tells the session its client was silent too long (it checks again: it may have heard
    /// from the client since, or not be reading on purpose).
    pub(crate) fn tell_silent(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.update(|inner| {
                inner.silent = true;
                true
            });
        }
    }
}
