//! The embedded bus: rumqttd's router, started in process with no listener of its own, behind
//! one in-process link subscribed to `#`. Every publish enters through that link, so the router's
//! log holds one global order; what the router forwards comes back on the same link and goes to
//! the [`Deliver`]er in that order. Every rumqttd type stays in this file.
//!
//! rumqttd keeps a bounded log per filter and, when a reader falls more than the log behind,
//! moves its cursor to the head: older messages are skipped without a word. So publishers hold a
//! permit from a budget smaller than the log until their message has come back; when the hub is
//! behind, publishers wait instead. Each message carries a sequence number in its envelope, and a
//! gap (which the budget should make impossible) is counted in `callbus_bus_lost_total`.

use futures_util::future::BoxFuture;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::Notification;
use serde::Deserialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{error, warn};

use super::{envelope, Bus, BusError, Deliver, Message};
use crate::metrics;
use crate::sync::lock;

/// rumqttd's router settings (the `[router]` table of the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct RouterSettings(rumqttd::RouterConfig);

impl RouterSettings {
    /// Checks what rumqttd would otherwise panic on, and that the log leaves room for a budget.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.0;
        if r.max_segment_size < 1024 * 1024 || r.max_segment_count < 2 {
            return Err(
                "router.max_segment_size must be >= 1048576 and max_segment_count >= 2".into(),
            );
        }
        if r.max_connections == 0 || r.max_outgoing_packet_count == 0 {
            return Err("router.max_connections and max_outgoing_packet_count must be > 0".into());
        }
        if let Some(custom) = &r.custom_segment {
            if custom
                .values()
                .any(|s| s.max_segment_size < 1024 || s.max_segment_count == 0)
            {
                return Err("router.custom_segment sizes must be >= 1024".into());
            }
        }
        Ok(())
    }

    /// Bytes that may be in flight on the router at once: all but one segment of the log, so the
    /// oldest unread message is never in a segment the router drops.
    fn budget(&self) -> usize {
        let budget = self.0.max_segment_size * (self.0.max_segment_count - 1);
        budget.min(u32::MAX as usize) // a publish takes at most u32::MAX permits
    }
}

/// Most messages in flight at once. rumqttd's router queue holds 1,000 events, one per publish,
/// so staying under it means a publish never finds that queue full.
const MAX_IN_FLIGHT: usize = 512;

struct Link {
    tx: LinkTx,
    next_seq: u64,
}

/// The embedded rumqttd router as a [`Bus`].
pub struct EmbeddedBus {
    /// Kept alive: dropping rumqttd's Broker would leave the router without its handle.
    _router: Arc<rumqttd::Broker>,
    link: Mutex<Link>,
    /// Published but not yet delivered back, oldest first, with the budget each one holds.
    in_flight: Arc<Mutex<VecDeque<(u64, OwnedSemaphorePermit)>>>,
    budget: Arc<Semaphore>,
    /// The budget in bytes; a message costs at least `budget / MAX_IN_FLIGHT`.
    budget_bytes: usize,
    /// The router topics messages cross on ([`router_topic`]).
    lanes: Vec<bytes::Bytes>,
}

impl EmbeddedBus {
    /// Starts the router thread and its link; deliveries go to `sink` from now on.
    pub async fn start(settings: RouterSettings, sink: Arc<dyn Deliver>) -> Result<Self, BusError> {
        let budget_bytes = settings.budget();
        let config = rumqttd::Config {
            id: 0,
            router: settings.0,
            ..Default::default()
        };
        let router = tokio::task::spawn_blocking(move || Arc::new(rumqttd::Broker::new(config)))
            .await
            .map_err(|e| BusError::Start(e.to_string()))?;
        let link_router = router.clone();
        // link() blocks until the router answers, so keep it off the async workers.
        let link = move || {
            link_router
                .link("callbus-bus")
                .map_err(|e| BusError::Start(e.to_string()))
        };
        let (mut tx, mut rx) = tokio::task::spawn_blocking(link)
            .await
            .map_err(|e| BusError::Start(e.to_string()))??;
        // Subscribe to everything and wait until the router has it, so nothing published after
        // startup can be missed.
        tx.subscribe("#")
            .map_err(|e| BusError::Start(e.to_string()))?;
        loop {
            match rx.next().await {
                Ok(Some(Notification::DeviceAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(BusError::Start(e.to_string())),
            }
        }
        let in_flight = Arc::new(Mutex::new(VecDeque::new()));
        tokio::spawn(receive(rx, in_flight.clone(), sink));
        Ok(Self {
            _router: router,
            link: Mutex::new(Link { tx, next_seq: 0 }),
            in_flight,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            lanes: (0..LANES).map(|i| format!("callbus/{i}").into()).collect(),
        })
    }

    async fn send(&self, message: Message) -> Result<(), BusError> {
        let size = 2
            + message.topic.len()
            + message.payload.len()
            + envelope::header_len(&message.audience);
        let cost = size
            .max(self.budget_bytes / MAX_IN_FLIGHT)
            .min(self.budget_bytes) as u32;
        let permit = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(permit) => permit,
            Err(_) => {
                metrics::BUS_PUBLISHER_WAITS.inc();
                self.budget
                    .clone()
                    .acquire_many_owned(cost)
                    .await
                    .map_err(|_| BusError::Closed)?
            }
        };
        // Held only for a non-blocking hand-over, so the sequence matches the router's order.
        let mut link = lock(&self.link);
        link.next_seq += 1;
        let seq = link.next_seq;
        let payload = envelope::encode_routed(seq, &message);
        lock(&self.in_flight).push_back((seq, permit));
        let lane = self.lanes[lane(&message.topic)].clone();
        match link.tx.try_publish(lane, payload) {
            Ok(_) => Ok(()),
            // The message is in the link's buffer; the router takes it with the next publish.
            // The in-flight bound keeps the router's queue below full, so this is not expected.
            Err(LinkError::TrySend(_)) => {
                warn!("the router's queue was full; the message waits for the next publish");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "the router refused a publish");
                Err(BusError::Closed)
            }
        }
    }
}

impl Bus for EmbeddedBus {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(self.send(message))
    }
}

/// Hands what the router forwards to `sink`, returning each message's budget.
async fn receive(
    mut rx: LinkRx,
    in_flight: Arc<Mutex<VecDeque<(u64, OwnedSemaphorePermit)>>>,
    sink: Arc<dyn Deliver>,
) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(f))) => {
                let Some(decoded) = envelope::decode_routed(f.publish.payload) else {
                    error!("a message without an envelope on the router: dropped");
                    metrics::BUS_LOST.inc();
                    continue;
                };
                settle(&in_flight, decoded.seq);
                sink.deliver(decoded.message);
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
    error!("the router dropped callbus's link");
    sink.closed();
}

/// How many topics messages cross the router on; a message's own topic travels in the envelope.
/// rumqttd keeps an entry per topic it ever saw (its topic-to-filters cache), so crossing on the
/// message's topic would grow the router with every user ever notified; one topic for all made
/// a 10k fan-out a quarter slower than spreading them (measured). `$SYS` figures stay out of
/// rumqttd's way too (it refuses filters on `$` topics, and `#` does not match them). All lanes
/// share the `#` filter's one log, so the global order holds.
const LANES: usize = 64;

/// The lane of `topic`: FNV-1a of its bytes.
fn lane(topic: &[u8]) -> usize {
    let hash = topic.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    (hash % LANES as u64) as usize
}

/// Releases the budget of message `seq` and of any older one that never came back (lost).
fn settle(in_flight: &Mutex<VecDeque<(u64, OwnedSemaphorePermit)>>, seq: u64) {
    let mut in_flight = lock(in_flight);
    let mut lost = 0;
    while let Some((front, _)) = in_flight.front() {
        if *front > seq {
            break;
        }
        if *front < seq {
            lost += 1;
        }
        in_flight.pop_front();
    }
    if lost > 0 {
        error!(lost, "the router skipped messages");
        metrics::BUS_LOST.add(lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_spread_over_a_fixed_set_of_lanes() {
        let lanes: std::collections::HashSet<usize> = (0..1000)
            .map(|i| lane(format!("users/u{i}/notifications").as_bytes()))
            .collect();
        assert!(lanes.iter().all(|l| *l < LANES));
        assert!(lanes.len() > LANES / 2, "{} lanes used", lanes.len());
        assert_eq!(lane(b"chat/c1"), lane(b"chat/c1"));
    }
}
