//! Persistent sessions across nodes: their records in PostgreSQL, their QoS 1 queues in
//! JetStream, so a session outlives the node its client last used (killed included).
//!
//! One stream ([`STREAM`]) keeps everything published on the bus for one session expiry,
//! replicated over up to three NATS servers (the bus publishes as always; the stream captures
//! its subjects). Each QoS 1 subscription of a persistent session is a durable consumer of
//! that stream filtered on the subscription's subject, replicated like the stream, and
//! acknowledged message by message as the client acknowledges (a [`Receipt`]). A node that
//! takes the session up binds to its consumers (in the background: the CONNACK does not wait);
//! if something was delivered and never acknowledged (its client left, or its node died), or
//! another node's feed still has a pull request waiting on it, it makes the consumer again
//! from the first unacknowledged message, so that comes first and nothing goes to the old feed.
//! Records, queue deletions and expiry are written in order by one task per node.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use async_nats::jetstream::{self, consumer, stream};

use crate::broker::hub::{Durable, Receipt, MAILBOX_MESSAGES};
use crate::broker::Hub;
use crate::bus::nats::{decode_delivery, Recent, TOPIC_PREFIX};
use crate::bus::subject::filter_subjects;
use crate::model::call::now_ms;
use crate::store::pg::Pg;
use crate::store::{SessionRecord, StoreError};

/// The stream of everything published on the bus.
pub const STREAM: &str = "CALLBUS";
/// A delivery not acknowledged for this long is sent again (to the same session).
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Most bytes the stream keeps (oldest dropped first).
const STREAM_BYTES: i64 = 1 << 30;
/// How long starting nodes wait for JetStream (its servers elect a leader and learn of each
/// other first: on a loaded two-core machine a fresh cluster of three took over 30 s).
const JETSTREAM_WAIT: Duration = Duration::from_secs(60);
/// A lost queue is replayed from this long before its session was last known to be fine:
/// anything it had delivered but not had acknowledged is redelivered by then.
const REPLAY_MARGIN: Duration = Duration::from_secs(ACK_WAIT.as_secs() + 5);
/// A queue JetStream has not been able to describe for this long is made again: its consumer's
/// own Raft group has no leader (nats-server 2.9 answers "JetStream system temporarily
/// unavailable" then, and a group can stay so after overlapping faults; seen in
/// `callbus-bench chaos`, the whole two-minute drain long).
const STUCK_QUEUE: Duration = Duration::from_secs(15);
/// Expired sessions deleted per sweep.
const SWEEP_BATCH: i64 = 256;

enum Write {
    Save(String, SessionRecord),
    Part(String, Duration),
    Discard(String),
    Close(String, String),
    Settle(oneshot::Sender<Result<(), StoreError>>),
}

/// This node's side of the cluster's persistent sessions.
pub struct Queues {
    node_id: String,
    stream: stream::Stream,
    client: async_nats::Client,
    pg: Arc<Pg>,
    expiry: Duration,
    /// Most messages a queue keeps for its session; older ones are dropped on resume.
    bound: u64,
    /// Most sessions one user keeps stored, over all nodes.
    max_per_user: usize,
    hub: Weak<Hub>,
    writes: mpsc::UnboundedSender<Write>,
    acks: mpsc::UnboundedSender<async_nats::Subject>,
    /// For the feeds it starts.
    me: Weak<Queues>,
    /// The queues of sessions loaded to resume here, by client id and filter: from when each
    /// is replayed if its consumer was lost (Unix ms). Taken when the queue is opened.
    since: std::sync::Mutex<std::collections::HashMap<(String, String), u64>>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream: {what}: {e}"))
}

/// The durable consumer of `client_id`'s subscription on `subject` (names allow no dots).
fn consumer_name(client_id: &str, subject: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(client_id.as_bytes())
        .chain_update([0])
        .chain_update(subject.as_bytes())
        .finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("s{hex}")
}

/// Creates the stream (or finds it), waiting for JetStream to be ready. `replicas` is capped
/// at three.
async fn ensure_stream(
    js: &jetstream::Context,
    replicas: usize,
    max_age: Duration,
) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{TOPIC_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas.clamp(1, 3),
        max_age,
        max_bytes: STREAM_BYTES,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(60).min(max_age),
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + JETSTREAM_WAIT;
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() < deadline => {
                debug!(error = %e, "JetStream not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                anyhow::bail!(
                    "JetStream is not available ({e}); nats-server must run with JetStream \
                     enabled (-js), clustered for replication"
                )
            }
        }
    }
}

impl Queues {
    /// Sets up the stream and this node's writer, acknowledger and sweeper.
    pub async fn start(
        client: async_nats::Client,
        pg: Arc<Pg>,
        node_id: &str,
        servers: usize,
        sessions: &crate::config::SessionsConfig,
        hub: &Arc<Hub>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Queues>> {
        let expiry = sessions.expiry();
        let js = jetstream::new(client.clone());
        let known = client.server_info().connect_urls.len();
        let replicas = servers.max(known);
        let stream = ensure_stream(&js, replicas, expiry + Duration::from_secs(60)).await?;
        // Sessions a former run of this node held live are away now.
        pg.at_start(|| pg.part_sessions_of(node_id)).await?;
        let (writes, written) = mpsc::unbounded_channel();
        let (acks, acked) = mpsc::unbounded_channel();
        let queues = Arc::new_cyclic(|me| Queues {
            node_id: node_id.to_owned(),
            stream,
            client,
            pg,
            expiry,
            bound: sessions.queue_messages as u64,
            max_per_user: sessions.max_per_user,
            hub: Arc::downgrade(hub),
            writes,
            acks,
            me: me.clone(),
            since: Default::default(),
        });
        tokio::spawn(queues.clone().write(written));
        tokio::spawn(queues.clone().acknowledge(acked, shutdown.clone()));
        tokio::spawn(queues.clone().sweep(shutdown));
        info!(
            replicas = replicas.clamp(1, 3),
            "persistent sessions kept in JetStream"
        );
        Ok(queues)
    }

    fn expires_ms(&self) -> u64 {
        now_ms() + self.expiry.as_millis() as u64
    }

    /// Applies the writes in order.
    async fn write(self: Arc<Self>, mut written: mpsc::UnboundedReceiver<Write>) {
        let mut failed: Option<StoreError> = None;
        while let Some(write) = written.recv().await {
            let result = match write {
                Write::Save(client_id, record) => {
                    let expires = self.expires_ms();
                    let pg = &self.pg;
                    match pg
                        .put_session(&client_id, &record, &self.node_id, expires)
                        .await
                    {
                        Ok(true) => self.evict_over_limit(&record.user_id).await,
                        Ok(false) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Write::Part(client_id, expiry) => {
                    let expires = now_ms() + expiry.min(self.expiry).as_millis() as u64;
                    let pg = &self.pg;
                    pg.part_session(&client_id, &self.node_id, expires).await
                }
                Write::Discard(client_id) => match self.pg.delete_session(&client_id).await {
                    Ok(record) => {
                        let filters = record.map(|r| r.filters).unwrap_or_default();
                        self.delete_queues(&client_id, &filters).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Write::Close(client_id, filter) => {
                    self.delete_queues(&client_id, &[(filter, 1)]).await;
                    Ok(())
                }
                Write::Settle(done) => {
                    let _ = done.send(failed.take().map_or(Ok(()), Err));
                    continue;
                }
            };
            if let Err(e) = result {
                warn!(error = %e, "cannot write a persistent session");
                failed = Some(e);
            }
        }
    }

    /// A new session of `user_id` was stored: while the user keeps more than `max_per_user`
    /// over the cluster, the one whose client has been away longest is expired with its
    /// queues (as on one node; live ones are bounded by the connection limit per user).
    async fn evict_over_limit(&self, user_id: &str) -> Result<(), StoreError> {
        let max = self.max_per_user;
        for (client_id, record) in self.pg.evict_sessions(user_id, max).await? {
            info!(client = %client_id, max, "stored session expired: its user keeps too many");
            crate::metrics::SESSIONS_EVICTED.inc();
            self.delete_queues(&client_id, &record.filters).await;
        }
        Ok(())
    }

    /// Deletes the consumers of a session's QoS 1 `filters`.
    async fn delete_queues(&self, client_id: &str, filters: &[(String, u8)]) {
        for (filter, qos) in filters {
            if *qos == 0 {
                continue;
            }
            for subject in filter_subjects(TOPIC_PREFIX, filter) {
                let name = consumer_name(client_id, &subject);
                if let Err(e) = self.stream.delete_consumer(&name).await {
                    debug!(consumer = %name, error = %e, "consumer not deleted");
                }
            }
        }
    }

    /// Sends the acknowledgements the sessions hand back.
    async fn acknowledge(
        self: Arc<Self>,
        mut acked: mpsc::UnboundedReceiver<async_nats::Subject>,
        stop: CancellationToken,
    ) {
        loop {
            let reply = tokio::select! {
                reply = acked.recv() => reply,
                _ = stop.cancelled() => None,
            };
            let Some(reply) = reply else { return };
            if let Err(e) = self.client.publish(reply, Bytes::new()).await {
                warn!(error = %e, "cannot acknowledge a queued message");
            }
        }
    }

    /// Keeps this node's live sessions from expiring and deletes expired ones (with their
    /// consumers, which JetStream would otherwise delete once inactive for longer).
    fn forget_hints(&self, client_id: &str) {
        crate::sync::lock(&self.since).retain(|(client, _), _| client != client_id);
    }

    /// How often a node pushes its live sessions' expiry forward.
    fn refresh_period(&self) -> Duration {
        (self.expiry / 3).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let period = self.refresh_period();
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let expires = self.expires_ms();
            if let Err(e) = self.pg.refresh_sessions(&self.node_id, expires).await {
                warn!(error = %e, "cannot refresh this node's sessions");
            }
            match self.pg.expire_sessions(now_ms(), SWEEP_BATCH).await {
                Ok(expired) => {
                    for (client_id, record) in expired {
                        info!(client = %client_id, "stored session expired");
                        crate::metrics::SESSIONS_EXPIRED.inc();
                        self.delete_queues(&client_id, &record.filters).await;
                    }
                }
                Err(e) => warn!(error = %e, "cannot expire sessions"),
            }
        }
    }

    /// Drops `filter` from every stored session of `user_id`, with its queue (a member
    /// removed from a conversation; sessions live on a node are revoked there as well).
    pub async fn revoke(&self, user_id: &str, filter: &str) -> Result<(), StoreError> {
        for client_id in self.pg.revoke_filter(user_id, filter).await? {
            self.delete_queues(&client_id, &[(filter.to_owned(), 1)])
                .await;
        }
        Ok(())
    }

    /// The consumer of `name`: as it is if nothing is waiting for an acknowledgement and no
    /// other feed is pulling from it, otherwise made again from the first unacknowledged
    /// message; new if there is none.
    /// One that is gone (deleted, or lost with the servers that held it) is made again from
    /// `replay` when given: what was published since then comes again (duplicates, not
    /// loss). A rewind that deleted the consumer but could not make it again leaves its start
    /// in `replay`, for the next attempt.
    ///
    /// `stuck` (its consumer could not be described for [`STUCK_QUEUE`], since that Unix ms):
    /// it is deleted, whatever its state, and made again from `replay`, or from a little
    /// before the trouble began.
    async fn bind(
        &self,
        name: &str,
        subject: &str,
        replay: &mut Option<Replay>,
        stuck: Option<u64>,
    ) -> Result<consumer::PullConsumer, StoreError> {
        // Replicated like the stream (a Raft group of its own, hundreds of ms to make): a
        // consumer of one replica on a NATS server that is behind the stream (paused, or back
        // from a restart and catching up) skips what that server has not got yet, delivering
        // newer messages first and the skipped ones never (`tests/cluster_faults.rs`).
        let config = |deliver_policy| consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: subject.to_owned(),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAILBOX_MESSAGES as i64,
            inactive_threshold: self.expiry + Duration::from_secs(120),
            num_replicas: 0, // the stream's
            ..Default::default()
        };
        let from = |replay: Option<Replay>| match replay {
            Some(Replay::Since(ms)) => {
                match async_nats::datetime::from_nanos(i128::from(ms) * 1_000_000) {
                    Ok(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
                    Err(_) => consumer::DeliverPolicy::All,
                }
            }
            Some(Replay::From(start_sequence)) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            None => consumer::DeliverPolicy::New,
        };
        if let Some(since) = stuck {
            let start = *replay.get_or_insert(Replay::Since(
                since.saturating_sub(REPLAY_MARGIN.as_millis() as u64),
            ));
            warn!(consumer = %name, ?start, "a session's queue has been unanswerable: making it again");
            match self.stream.delete_consumer(name).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(unavailable("making a stuck queue again", e)),
            }
            let created = self.stream.create_consumer(config(from(Some(start)))).await;
            return created.map_err(|e| unavailable("making a stuck queue again", e));
        }
        let info = self.stream.consumer_info(name).await;
        if let Ok(info) = &info {
            debug!(consumer = %name, waiting = info.num_waiting, ack_pending = info.num_ack_pending, "binding a queue");
        }
        let policy = match info {
            // Nothing delivered and unacknowledged, and no pull request waiting: the feed
            // that had it (on a node that stopped feeding this session, or was paused) would
            // otherwise still be handed new messages, which nobody acknowledges, until its
            // request expires; they would come again only after `ACK_WAIT`, behind newer ones.
            // Made again, the queue drops those requests.
            Ok(info) if info.num_ack_pending == 0 && info.num_waiting == 0 => {
                let existing = self.stream.get_consumer(name).await;
                return existing.map_err(|e| unavailable("binding a queue", e));
            }
            Ok(info) => {
                let start_sequence = info.ack_floor.stream_sequence + 1;
                debug!(consumer = %name, start_sequence, "rewinding to the unacknowledged");
                // Its answer may be lost after the deletion was done: the next attempt then
                // finds no consumer, and starts from here.
                *replay = Some(Replay::From(start_sequence));
                let deleted = self.stream.delete_consumer(name).await;
                deleted.map_err(|e| unavailable("rewinding a queue", e))?;
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                if matches!(replay, Some(Replay::Since(_))) {
                    warn!(consumer = %name, "a session's queue was lost; replaying the stream");
                }
                from(*replay)
            }
            // JetStream cannot answer for it now (electing a leader after losing a server):
            // the queue is replicated, so it is waited for (the feed tries again) rather than
            // made again without what it knows was acknowledged.
            Err(e) => return Err(unavailable("binding a queue", e)),
        };
        let created = self.stream.create_consumer(config(policy)).await;
        created.map_err(|e| unavailable("creating a queue", e))
    }

    /// Feeds `subject`'s queue of `client_id` to session `sid` until `stop`, binding it again
    /// (from a little before the loss) if its NATS server is lost meanwhile. Without a
    /// `consumer` (it could not be bound when the session resumed) it is bound first, from
    /// `replay`, trying every second until it is.
    async fn feed(
        self: Arc<Self>,
        sid: u64,
        (client_id, filter, subject): (String, String, String),
        mut consumer: Option<consumer::PullConsumer>,
        mut replay: Option<Replay>,
        stop: CancellationToken,
    ) {
        let name = consumer_name(&client_id, &subject);
        loop {
            let bound = match consumer.take() {
                Some(bound) => bound,
                None => {
                    // When binding began to fail (Unix ms, and as an instant).
                    let mut failing: Option<(u64, tokio::time::Instant)> = None;
                    loop {
                        let stuck = failing
                            .filter(|(_, at)| at.elapsed() >= STUCK_QUEUE)
                            .map(|(ms, _)| ms);
                        match self.bind(&name, &subject, &mut replay, stuck).await {
                            Ok(again) => break again,
                            Err(e) => {
                                warn!(client = %client_id, error = %e, "cannot bind a session's queue yet");
                                failing.get_or_insert((now_ms(), tokio::time::Instant::now()));
                                tokio::select! {
                                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                    _ = stop.cancelled() => return,
                                }
                            }
                        }
                    }
                }
            };
            match feed(&self.hub, &self.acks, (sid, self.bound), &bound, &stop).await {
                Fed::Done => return,
                // Deleted: by this node (closed), or by the node the session moved to.
                Fed::Deleted => {
                    let open = self
                        .hub
                        .upgrade()
                        .is_some_and(|h| h.queue_open(sid, &filter));
                    if !open || stop.is_cancelled() {
                        return;
                    }
                }
                Fed::Lost => {}
            }
            let since = now_ms().saturating_sub(REPLAY_MARGIN.as_millis() as u64);
            replay = Some(Replay::Since(since));
        }
    }
}

/// Whether a deletion failed because the consumer is not there.
fn is_not_found(e: &stream::ConsumerError) -> bool {
    matches!(e.kind(), stream::ConsumerErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND)
}

/// Where a queue that is gone is made again from.
#[derive(Debug, Clone, Copy)]
enum Replay {
    /// What was published since then (Unix ms).
    Since(u64),
    /// This stream sequence on.
    From(u64),
}

/// How a feed ended.
enum Fed {
    /// The session is gone from this node, or stopped.
    Done,
    /// The consumer was deleted.
    Deleted,
    /// The consumer stopped answering (its NATS server lost).
    Lost,
}

/// Hands what `consumer` delivers to session `sid` until it is gone from this node or `stop`,
/// or the consumer stops answering. A backlog past `bound` messages (a session back after long)
/// loses its oldest, and the session is told how many.
async fn feed(
    hub: &Weak<Hub>,
    acks: &mpsc::UnboundedSender<async_nats::Subject>,
    (sid, bound): (u64, u64),
    consumer: &consumer::PullConsumer,
    stop: &CancellationToken,
) -> Fed {
    let messages = consumer
        .stream()
        .max_messages_per_batch(MAILBOX_MESSAGES / 4)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await;
    let mut messages = match messages {
        Ok(messages) => messages,
        Err(e) => {
            warn!(error = %e, "cannot read a session's queue");
            return Fed::Lost;
        }
    };
    let mut dropped = 0;
    let mut recent = Recent::new();
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = stop.cancelled() => None,
        };
        let message = match next {
            None => return Fed::Done,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                use consumer::pull::MessagesErrorKind as Kind;
                match e.kind() {
                    Kind::ConsumerDeleted => return Fed::Deleted,
                    Kind::MissingHeartbeat | Kind::NoResponders => return Fed::Lost,
                    _ => {
                        debug!(error = %e, "a session's queue");
                        continue;
                    }
                }
            }
        };
        let Some(hub) = hub.upgrade() else {
            return Fed::Done;
        };
        if let Ok(info) = message.info() {
            tracing::trace!(
                queue = %consumer.cached_info().name,
                stream = info.stream_sequence,
                consumer = info.consumer_sequence,
                delivered = info.delivered,
                pending = info.pending,
                "queued message"
            );
        }
        // A publication the stream holds twice (a retry) goes once; one delivered again
        // (not acknowledged in time) is not a copy.
        let first = message.info().map_or(true, |info| info.delivered <= 1);
        if first && recent.repeated(message.subject.as_str(), &message.payload) {
            debug!(queue = %consumer.cached_info().name, "a publication's second copy");
            if let Some(reply) = &message.reply {
                let _ = acks.send(reply.clone());
            }
            continue;
        }
        let behind = message.info().map(|info| info.pending).unwrap_or(0);
        if behind >= bound {
            if dropped == 0 {
                let seq = message.info().map(|info| info.stream_sequence).unwrap_or(0);
                info!(
                    behind,
                    bound,
                    stream_sequence = seq,
                    "a session's queue is over its bound: dropping its oldest"
                );
            }
            dropped += 1;
            if let Some(reply) = &message.reply {
                let _ = acks.send(reply.clone());
            }
            continue;
        }
        if dropped > 0 {
            hub.overflowed(sid, std::mem::take(&mut dropped));
        }
        let reply = message.reply.clone();
        let acks = acks.clone();
        let receipt = Receipt::new(move || {
            if let Some(reply) = &reply {
                let _ = acks.send(reply.clone());
            }
        });
        let payload = message.payload.clone();
        match decode_delivery(message.subject.as_str(), payload) {
            Some(delivered) => {
                if !hub.feed(sid, delivered, receipt) {
                    return Fed::Done;
                }
            }
            None => receipt.acknowledge(),
        }
    }
}

impl Durable for Queues {
    fn load(&self, client_id: &str) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        let client_id = client_id.to_owned();
        Box::pin(async move {
            let Some(stored) = self.pg.session(&client_id, now_ms()).await? else {
                return Ok(None);
            };
            // Were a queue of it lost, it is replayed from a little before its client left
            // (or before its node last said it held it).
            let left = stored.parted_ms.unwrap_or_else(|| {
                let refreshed = stored
                    .expires_ms
                    .saturating_sub(self.expiry.as_millis() as u64);
                refreshed.saturating_sub(self.refresh_period().as_millis() as u64)
            });
            let since = left.saturating_sub(REPLAY_MARGIN.as_millis() as u64);
            let mut hints = crate::sync::lock(&self.since);
            for (filter, _) in stored.record.filters.iter().filter(|(_, qos)| *qos > 0) {
                hints.insert((client_id.clone(), filter.clone()), since);
            }
            Ok(Some(stored.record))
        })
    }

    fn save(&self, client_id: &str, record: SessionRecord) {
        let _ = self.writes.send(Write::Save(client_id.to_owned(), record));
    }

    fn part(&self, client_id: &str, expiry: Duration) {
        self.forget_hints(client_id);
        let _ = self.writes.send(Write::Part(client_id.to_owned(), expiry));
    }

    fn discard(&self, client_id: &str) {
        self.forget_hints(client_id);
        let _ = self.writes.send(Write::Discard(client_id.to_owned()));
    }

    fn close(&self, client_id: &str, filter: &str) {
        let write = Write::Close(client_id.to_owned(), filter.to_owned());
        let _ = self.writes.send(write);
    }

    fn settled(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let (done, settled) = oneshot::channel();
            if self.writes.send(Write::Settle(done)).is_err() {
                return Err(StoreError::Unavailable("shutting down".into()));
            }
            settled
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("shutting down".into())))
        })
    }

    fn open(
        &self,
        sid: u64,
        client_id: &str,
        filter: &str,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let (client_id, filter) = (client_id.to_owned(), filter.to_owned());
        Box::pin(async move {
            // Only a queue the session had when it was stored is replayed; a new
            // subscription starts from now.
            let key = (client_id.clone(), filter.clone());
            let since = crate::sync::lock(&self.since).remove(&key);
            for subject in filter_subjects(TOPIC_PREFIX, &filter) {
                let name = consumer_name(&client_id, &subject);
                // A new subscription has its queue before its SUBACK. A resumed one is bound
                // by its feed, so the CONNACK does not wait for it (binding waits for
                // JetStream, seconds while the NATS server holding the queue is away) and a
                // queue that cannot be bound yet is bound once it can be, not left silent
                // until the client reconnects.
                let mut replay = since.map(Replay::Since);
                let consumer = match replay {
                    Some(_) => None,
                    None => Some(self.bind(&name, &subject, &mut replay, None).await?),
                };
                let Some(me) = self.me.upgrade() else {
                    return Err(StoreError::Unavailable("shutting down".into()));
                };
                let names = (client_id.clone(), filter.clone(), subject);
                tokio::spawn(me.feed(sid, names, consumer, replay, stop.clone()));
            }
            Ok(())
        })
    }
}
