//! One shared router link for every client session. The link subscribes to `#` once; the hub
//! routes what the router forwards to the sessions whose subscriptions match, and carries every
//! publish (sessions' and callbus's own) into the router, in one order.
//!
//! Why not one rumqttd link per session: rumqttd preallocates about 100 KB of queues per link and
//! matches every never-seen topic against every filter, which made idle connections cost 49 KiB
//! of RSS each and the first notification to 10k users take 8.6 s (BENCHMARKS.md). With one
//! link the router holds one filter and one log, and routing is a hash lookup here. A session
//! whose queue passes [`SESSION_QUEUE`] messages or [`SESSION_QUEUE_BYTES`] is dropped.

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::bridge::acl::{filter_matches, has_wildcard};

/// A routed message: topic and payload.
pub(crate) type Delivery = (Bytes, Bytes);

/// How many deliveries may wait for one session before it counts as too slow and is dropped.
pub(crate) const SESSION_QUEUE: usize = 1024;
/// How many payload bytes may wait for one session before it is dropped: bounds what a client
/// that stops reading can make the server hold.
pub(crate) const SESSION_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// A session's delivery queue and the payload bytes waiting in it.
pub(crate) struct Queue {
    pub(crate) rx: mpsc::Receiver<Delivery>,
    pub(crate) queued_bytes: Arc<AtomicUsize>,
}

impl Queue {
    /// The next delivery; `None` once the hub dropped this session.
    pub(crate) async fn recv(&mut self) -> Option<Delivery> {
        let delivery = self.rx.recv().await?;
        self.queued_bytes
            .fetch_sub(delivery.1.len(), Ordering::Relaxed);
        Some(delivery)
    }
}

#[derive(Default)]
struct Routes {
    /// Sessions' delivery queues and their queued bytes.
    sessions: HashMap<u64, (mpsc::Sender<Delivery>, Arc<AtomicUsize>)>,
    /// Exact filters (every user subscription) to the sessions holding them.
    exact: HashMap<String, HashSet<u64>>,
    /// Wildcard filters (admins only) per session.
    wildcard: HashMap<u64, HashSet<String>>,
}

impl Routes {
    fn remove_session(&mut self, sid: u64) {
        self.sessions.remove(&sid);
        self.wildcard.remove(&sid);
        self.exact.retain(|_, sids| {
            sids.remove(&sid);
            !sids.is_empty()
        });
    }
}

pub(crate) struct Hub {
    tx: Mutex<LinkTx>,
    routes: Mutex<Routes>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// Starts routing for a link already subscribed to `#`.
    pub(crate) fn start(tx: LinkTx, rx: LinkRx) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            tx: Mutex::new(tx),
            routes: Mutex::default(),
        });
        tokio::spawn(hub.clone().dispatch(rx));
        hub
    }

    /// Publishes into the router (QoS 0 on an in-process link: nothing is lost on the way).
    pub(crate) fn publish(&self, topic: String, payload: Bytes) -> Result<(), String> {
        lock(&self.tx)
            .publish(topic, payload)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Registers a session; deliveries arrive on the returned queue until it is unregistered
    /// (or falls [`SESSION_QUEUE`] messages behind, which closes the queue).
    pub(crate) fn register(&self, sid: u64) -> Queue {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        lock(&self.routes)
            .sessions
            .insert(sid, (tx, queued_bytes.clone()));
        Queue { rx, queued_bytes }
    }

    pub(crate) fn unregister(&self, sid: u64) {
        lock(&self.routes).remove_session(sid);
    }

    /// Routes `filter` to the session. Effective for everything the router forwards after this
    /// returns.
    pub(crate) fn subscribe(&self, sid: u64, filter: &str) {
        let mut routes = lock(&self.routes);
        if has_wildcard(filter) {
            routes
                .wildcard
                .entry(sid)
                .or_default()
                .insert(filter.to_owned());
        } else {
            routes
                .exact
                .entry(filter.to_owned())
                .or_default()
                .insert(sid);
        }
    }

    pub(crate) fn unsubscribe(&self, sid: u64, filter: &str) {
        let mut routes = lock(&self.routes);
        if let Some(filters) = routes.wildcard.get_mut(&sid) {
            filters.remove(filter);
        }
        if let Some(sids) = routes.exact.get_mut(filter) {
            sids.remove(&sid);
            if sids.is_empty() {
                routes.exact.remove(filter);
            }
        }
    }

    fn route(&self, topic: Bytes, payload: Bytes) {
        let Ok(name) = std::str::from_utf8(&topic) else {
            return;
        };
        let mut routes = lock(&self.routes);
        let mut targets: Vec<u64> = routes
            .exact
            .get(name)
            .map(|sids| sids.iter().copied().collect())
            .unwrap_or_default();
        for (sid, filters) in &routes.wildcard {
            if filters.iter().any(|f| filter_matches(f, name)) && !targets.contains(sid) {
                targets.push(*sid);
            }
        }
        let mut too_slow = Vec::new();
        for sid in targets {
            if let Some((queue, queued)) = routes.sessions.get(&sid) {
                let waiting = queued.fetch_add(payload.len(), Ordering::Relaxed);
                if waiting + payload.len() > SESSION_QUEUE_BYTES
                    || queue.try_send((topic.clone(), payload.clone())).is_err()
                {
                    too_slow.push(sid);
                }
            }
        }
        for sid in too_slow {
            warn!(session = sid, "session fell too far behind; dropping it");
            routes.remove_session(sid); // closes its queue: the session ends
        }
    }

    async fn dispatch(self: Arc<Self>, mut rx: LinkRx) {
        loop {
            match rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    self.route(f.publish.topic, f.publish.payload)
                }
                Ok(Some(Notification::Unschedule)) => {
                    if rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(Some(Notification::Disconnect(..))) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        error!("the router dropped callbus's link: closing every session");
        let mut routes = lock(&self.routes);
        *routes = Routes::default();
    }
}
