//! The cluster bus: NATS between callbus nodes. A publish goes to the subject of its topic
//! ([`subject`](super::subject)); a node subscribes only to the filters its own sessions hold
//! (interest, not broadcast), one NATS subscription per filter, and hands each message to the
//! hub for the sessions holding that filter. Order is NATS's: per publishing node and subject.
//!
//! The hub reports interest changes under its lock ([`Interest`]); they are applied in order by
//! one task, and [`Bus::settled`] waits until the local NATS server has processed them (a
//! PING/PONG round trip), which is what a SUBACK waits for.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::subject::{filter_subjects, subject_topic, topic_subject};
use super::{envelope, Bus, BusError, Deliver, Interest, Kept, Message};
use crate::metrics;

/// How long a durable publish waits for JetStream's acknowledgement before sending again.
const DURABLE_ATTEMPT: Duration = Duration::from_secs(1);
/// How long a durable publish keeps trying (a stream elects a new leader in a few seconds).
const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// Subjects of client topics live under this prefix; control traffic under others.
pub const TOPIC_PREFIX: &str = "callbus.t";

enum Command {
    Add(String),
    Remove(String),
    Settle(oneshot::Sender<()>),
}

/// The NATS bus of one node.
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    commands: mpsc::UnboundedSender<Command>,
    seq: AtomicU64,
}

impl NatsBus {
    /// A bus on `client`, delivering to `deliver`; stops when `shutdown` is cancelled.
    pub fn start(
        client: async_nats::Client,
        deliver: Arc<dyn Deliver>,
        shutdown: CancellationToken,
    ) -> Arc<NatsBus> {
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(apply_interest(client.clone(), deliver, rx, shutdown));
        Arc::new(NatsBus {
            jetstream: async_nats::jetstream::ContextBuilder::new()
                .timeout(DURABLE_ATTEMPT)
                .build(client.clone()),
            client,
            commands,
            seq: AtomicU64::new(0),
        })
    }
}

impl Interest for NatsBus {
    fn add(&self, filter: &str) {
        let _ = self.commands.send(Command::Add(filter.to_owned()));
    }

    fn remove(&self, filter: &str) {
        let _ = self.commands.send(Command::Remove(filter.to_owned()));
    }
}

impl NatsBus {
    /// The subject, this bus's sequence number and the payload (with its envelope) of
    /// `message`.
    fn wrap(&self, message: &Message) -> Result<(String, u64, Bytes), BusError> {
        let topic = message.topic_str().ok_or(BusError::Closed)?;
        let subject = topic_subject(TOPIC_PREFIX, topic);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Ok((subject, seq, envelope::encode(seq, message)))
    }
}

impl Bus for NatsBus {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let (subject, _, payload) = self.wrap(&message)?;
            // Waits while the client's outgoing queue is full (backpressure); while NATS is
            // unreachable the client keeps it until it reconnects.
            self.client.publish(subject, payload).await.map_err(|e| {
                warn!(error = %e, "cannot publish on NATS");
                BusError::Closed
            })?;
            metrics::BUS_PUBLISHED.inc();
            Ok(())
        })
    }

    /// Published through JetStream: the stream of the bus (which keeps the queues of
    /// persistent sessions) has stored it when this resolves, and subscribers get it as any
    /// other publish.
    fn publish_durable(&self, message: Message) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move { self.publish_kept(message).await?.await })
    }

    fn keeps_relays(&self) -> bool {
        true
    }

    /// Sent through JetStream (subscribers get it now); what it gives back resolves once the
    /// stream stored it, sending it again while the stream elects a new leader, as it does
    /// when a NATS server is lost. The stream may then have it twice; readers drop the second
    /// copy ([`Recent`]). No Nats-Msg-Id: on nats-server 2.9 (Debian's), a duplicate id that
    /// reaches the stream's replicas is discarded by some and stored by others, and their
    /// sequences drift apart (queues read from a lagging replica skip messages).
    fn publish_kept(&self, message: Message) -> BoxFuture<'_, Result<Kept, BusError>> {
        Box::pin(async move {
            let (subject, _, payload) = self.wrap(&message)?;
            let deadline = tokio::time::Instant::now() + DURABLE_WAIT;
            let jetstream = self.jetstream.clone();
            let first = send_kept(&jetstream, &subject, &payload).await;
            let sent = first.is_ok();
            if sent {
                metrics::BUS_PUBLISHED.inc();
            }
            let kept: Kept = Box::pin(async move {
                let mut attempt = first;
                loop {
                    let stored = match attempt {
                        Ok(ack) => ack.await.map(drop).map_err(async_nats::Error::from),
                        Err(e) => Err(e),
                    };
                    match stored {
                        Ok(()) => {
                            if !sent {
                                metrics::BUS_PUBLISHED.inc(); // on a later attempt
                            }
                            return Ok(());
                        }
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            debug!(error = %e, "JetStream did not store a message yet");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => {
                            warn!(error = %e, "JetStream did not store a message");
                            return Err(BusError::Closed);
                        }
                    }
                    attempt = send_kept(&jetstream, &subject, &payload).await;
                }
            });
            Ok(kept)
        })
    }

    fn settled(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if self.commands.send(Command::Settle(tx)).is_ok() {
                let _ = rx.await;
            }
        })
    }
}

/// Sends `payload` on `subject` through JetStream: what resolves once the stream
/// acknowledged it.
async fn send_kept(
    jetstream: &async_nats::jetstream::Context,
    subject: &str,
    payload: &Bytes,
) -> Result<async_nats::jetstream::context::PublishAckFuture, async_nats::Error> {
    Ok(jetstream
        .publish(subject.to_owned(), payload.clone())
        .await?)
}

/// Applies interest changes in order: one reader task per filter.
async fn apply_interest(
    client: async_nats::Client,
    deliver: Arc<dyn Deliver>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
) {
    let mut readers: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let command = tokio::select! {
            command = commands.recv() => command,
            _ = shutdown.cancelled() => None,
        };
        let Some(command) = command else { break };
        match command {
            Command::Add(filter) => {
                if readers.contains_key(&filter) {
                    continue;
                }
                let mut subscribers = Vec::new();
                for subject in filter_subjects(TOPIC_PREFIX, &filter) {
                    match client.subscribe(subject).await {
                        Ok(subscriber) => subscribers.push(subscriber),
                        Err(e) => warn!(%filter, error = %e, "cannot subscribe on NATS"),
                    }
                }
                let stop = shutdown.child_token();
                readers.insert(filter.clone(), stop.clone());
                metrics::BUS_INTEREST.inc();
                tokio::spawn(read(filter, subscribers, deliver.clone(), stop));
            }
            Command::Remove(filter) => {
                if let Some(stop) = readers.remove(&filter) {
                    stop.cancel();
                    metrics::BUS_INTEREST.dec();
                }
            }
            Command::Settle(done) => {
                if let Err(e) = client.flush().await {
                    warn!(error = %e, "NATS flush failed");
                }
                let _ = done.send(());
            }
        }
    }
    deliver.closed();
}

/// Hands what `filter`'s subscriptions receive to the hub until stopped (dropping the
/// subscribers unsubscribes).
async fn read(
    filter: String,
    subscribers: Vec<async_nats::Subscriber>,
    deliver: Arc<dyn Deliver>,
    stop: CancellationToken,
) {
    let mut messages = futures_util::stream::select_all(subscribers);
    let mut recent = Recent::new();
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        metrics::BUS_RECEIVED.inc();
        if recent.repeated(message.subject.as_str(), &message.payload) {
            debug!(subject = %message.subject, "a publication's second copy");
            continue;
        }
        match decode_delivery(message.subject.as_str(), message.payload) {
            Some(delivered) => deliver.deliver_via(&filter, delivered),
            None => warn!(subject = %message.subject, "not a callbus message"),
        }
    }
    debug!(%filter, "stopped reading");
}

/// How many payloads a reader remembers to tell a second copy from a first.
const RECENT: usize = 256;

/// The last payloads a reader handed on, by hash: a publication JetStream was given twice (a
/// retry after its answer was lost in a failover, [`NatsBus::publish_kept`]) has the same
/// subject and bytes both times, while two publications never do (each carries its node's
/// sequence and its own `id`). The second copy is dropped.
pub(crate) struct Recent(std::collections::VecDeque<u64>);

impl Recent {
    pub(crate) fn new() -> Self {
        Self(std::collections::VecDeque::with_capacity(RECENT))
    }

    /// Whether `subject` and `payload` came among the last [`RECENT`]; remembers them.
    pub(crate) fn repeated(&mut self, subject: &str, payload: &[u8]) -> bool {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (subject, payload).hash(&mut hasher);
        let hash = hasher.finish();
        if self.0.contains(&hash) {
            return true;
        }
        if self.0.len() == RECENT {
            self.0.pop_front();
        }
        self.0.push_back(hash);
        false
    }
}

/// The message a subject of the bus carried (`None` for a subject outside the bus or a payload
/// without a callbus envelope).
pub(crate) fn decode_delivery(subject: &str, payload: Bytes) -> Option<Message> {
    let topic = subject_topic(TOPIC_PREFIX, subject)?;
    envelope::decode(Bytes::from(topic), payload).map(|decoded| decoded.message)
}
