//! Cluster mode (DESIGN "Cluster mode"): nodes share a NATS cluster (the bus, and this control
//! plane) and a PostgreSQL database. This module is what one node knows of the others: which
//! nodes are alive (a heartbeat each second), and changes every node must hold in memory before
//! the node that made one answers or announces it: conversations (so a member removed on one
//! node has stopped receiving on all of them when the PUT answers) and calls (so signaling that
//! follows a call event is checked against the state the event announced, on any node).

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Hub;
use crate::store::pg::{Pg, Replaced, Versioned};
use crate::store::{CallReplica, Conversation, Conversations, StoreError};
use crate::sync::lock;

const NODES: &str = "callbus.ctl.node";
const CHANGES: &str = "callbus.ctl.change";
const PRESENCE: &str = "callbus.ctl.presence";
/// How long a presence question waits for the other nodes.
const PRESENCE_TIMEOUT: Duration = Duration::from_millis(500);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is taken as gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a change waits for the other nodes to confirm it.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers to this node's questions (change confirmations, presence) arrive on one
/// subscription, `callbus.reply.<node>.<n>`, and go to whoever asked question `n`: no
/// subscription per question (each would be announced to every NATS server of the cluster).
#[derive(Default)]
struct Replies {
    next: std::sync::atomic::AtomicU64,
    waiting: Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<bytes::Bytes>>>,
}

/// A question waiting for its answers; forgotten when dropped.
struct Asking<'a> {
    replies: &'a Replies,
    n: u64,
    subject: String,
    answers: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        lock(&self.replies.waiting).remove(&self.n);
    }
}

impl Replies {
    fn ask(&self, node: &str) -> Asking<'_> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.waiting).insert(n, tx);
        Asking {
            replies: self,
            n,
            subject: format!("callbus.reply.{node}.{n}"),
            answers,
        }
    }

    fn answer(&self, subject: &str, payload: bytes::Bytes) {
        let n = subject.rsplit('.').next().and_then(|n| n.parse().ok());
        if let Some(tx) = n.and_then(|n| lock(&self.waiting).get(&n).cloned()) {
            let _ = tx.send(payload);
        }
    }
}

/// What `--cluster`, `--database` and `--node-id` say.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nats: Vec<String>,
    pub database: String,
    pub node_id: String,
}

#[derive(Serialize, Deserialize)]
struct ConversationChange {
    id: String,
    members: BTreeSet<String>,
    updated_at: String,
    version: u64,
    removed: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    Conversation(ConversationChange),
    Call(Box<Versioned>),
    /// A client connected to the sending node under this broker-side client id.
    Claim(String),
}

/// How many live connections each of `users` has on the answering node.
#[derive(Serialize, Deserialize)]
struct PresenceReply {
    node: String,
    devices: Vec<usize>,
}

/// A change as it travels: who made it, and what.
#[derive(Serialize, Deserialize)]
struct Notice {
    node: String,
    change: Change,
}

/// One node's view of the cluster.
pub struct Cluster {
    node_id: String,
    client: async_nats::Client,
    pub pg: Arc<Pg>,
    conversations: Conversations,
    calls: CallReplica,
    hub: Arc<Hub>,
    peers: Mutex<HashMap<String, Instant>>,
    replies: Replies,
}

/// What a node shares with the others, in memory.
pub struct Replicas {
    pub conversations: Conversations,
    pub calls: CallReplica,
}

/// A NATS connection and a signal each time it is made (the first signal only causes a
/// catch-up that finds nothing new).
pub struct Nats {
    pub client: async_nats::Client,
    reconnected: Arc<tokio::sync::Notify>,
}

/// Connects to the NATS cluster (any of `urls`), naming the connection after the node. Fails if
/// no server answers; after that the client reconnects by itself, forever.
pub async fn connect_nats(options: &ClusterOptions) -> anyhow::Result<Nats> {
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let signal = reconnected.clone();
    let client = async_nats::ConnectOptions::new()
        .name(format!("callbus-{}", options.node_id))
        .connection_timeout(Duration::from_secs(3))
        .event_callback(move |event| {
            let signal = signal.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        info!("NATS connected");
                        signal.notify_one();
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        crate::metrics::BUS_LOST.inc();
                        warn!(
                            subscription = sid,
                            "NATS dropped messages for a slow subscription"
                        );
                    }
                    other => warn!(event = %other, "NATS"),
                }
            }
        })
        .connect(options.nats.as_slice())
        .await?;
    Ok(Nats {
        client,
        reconnected,
    })
}

impl Cluster {
    /// Joins the control plane, then loads conversations and live calls from the database (in
    /// that order, so no change between the two is missed), and starts the heartbeat.
    pub async fn start(
        options: &ClusterOptions,
        nats: Nats,
        pg: Arc<Pg>,
        replicas: Replicas,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Cluster>> {
        let cluster = Arc::new(Cluster {
            node_id: options.node_id.clone(),
            client: nats.client,
            pg,
            conversations: replicas.conversations,
            calls: replicas.calls,
            hub,
            peers: Mutex::default(),
            replies: Replies::default(),
        });
        let nodes = cluster.client.subscribe(NODES).await?;
        let changes = cluster.client.subscribe(CHANGES).await?;
        let presence = cluster.client.subscribe(PRESENCE).await?;
        let replies = (cluster.client)
            .subscribe(format!("callbus.reply.{}.*", cluster.node_id))
            .await?;
        cluster.client.flush().await?;
        let conversations = cluster.pg.conversations().await?;
        cluster.conversations.load(conversations);
        for call in cluster.pg.live_calls().await? {
            cluster.calls.apply(call);
        }
        tokio::spawn(cluster.clone().hear_nodes(nodes, shutdown.clone()));
        tokio::spawn(cluster.clone().hear_changes(changes, shutdown.clone()));
        tokio::spawn(cluster.clone().answer_presence(presence, shutdown.clone()));
        tokio::spawn(cluster.clone().hear_replies(replies, shutdown.clone()));
        tokio::spawn(cluster.clone().resync(nats.reconnected, shutdown.clone()));
        tokio::spawn(cluster.clone().heartbeat(shutdown));
        // The others hear this node's first heartbeat at once; this node hears each of theirs
        // within a period. Serving before that, a change made here could skip waiting for
        // a node it has not heard of yet.
        tokio::time::sleep(HEARTBEAT + HEARTBEAT / 4).await;
        info!(node = %cluster.node_id, peers = cluster.live_peers().len(), "joined the cluster");
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The calls every node holds in memory.
    pub fn calls(&self) -> &CallReplica {
        &self.calls
    }

    /// Whether this node can serve: NATS connected and the database answering.
    pub async fn ready(&self) -> bool {
        let nats = self.client.connection_state() == async_nats::connection::State::Connected;
        nats && self.pg.ping().await
    }

    /// Live nodes besides this one.
    fn live_peers(&self) -> HashSet<String> {
        let now = Instant::now();
        let peers = lock(&self.peers);
        let live = peers.iter().filter(|(_, seen)| now - **seen < PEER_TIMEOUT);
        live.map(|(node, _)| node.clone()).collect()
    }

    /// After each NATS reconnection, catches up with the conversation changes made while this
    /// node could not hear them (retrying while the database is away).
    async fn resync(
        self: Arc<Self>,
        reconnected: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = reconnected.notified() => {}
                _ = stop.cancelled() => return,
            }
            loop {
                match self.catch_up().await {
                    Ok(()) => {
                        info!("caught up after a NATS reconnection");
                        break;
                    }
                    Err(e) => warn!(error = %e, "cannot catch up yet"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// Takes what the database holds: conversations (cutting off whoever they no longer
    /// list), live calls, and the calls held as live that ended meanwhile.
    async fn catch_up(&self) -> Result<(), StoreError> {
        for conv in self.pg.conversations().await? {
            let before = self.conversations.get(&conv.id);
            let removed = before
                .iter()
                .flat_map(|b| b.members.difference(&conv.members));
            let change = ConversationChange {
                removed: removed.cloned().collect(),
                id: conv.id,
                members: conv.members,
                updated_at: conv.updated_at,
                version: conv.version,
            };
            self.apply(Change::Conversation(change));
        }
        let live = self.pg.live_calls().await?;
        let still: HashSet<u64> = live.iter().map(|v| v.call.id).collect();
        for call in live {
            self.calls.apply(call);
        }
        for held in self.calls.live() {
            if !still.contains(&held.id) {
                if let Some(now) = self.pg.call(held.id).await? {
                    self.calls.apply(now);
                }
            }
        }
        Ok(())
    }

    async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let id = self.node_id.clone().into();
            if let Err(e) = self.client.publish(NODES, id).await {
                warn!(error = %e, "cannot send the heartbeat");
            }
        }
    }

    async fn hear_nodes(
        self: Arc<Self>,
        mut nodes: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let heard = tokio::select! {
                heard = nodes.next() => heard,
                _ = stop.cancelled() => return,
            };
            let Some(heard) = heard else { return };
            let Ok(node) = std::str::from_utf8(&heard.payload) else {
                continue;
            };
            if node != self.node_id {
                let new = lock(&self.peers).insert(node.to_owned(), Instant::now());
                if new.is_none_or(|seen| seen.elapsed() >= PEER_TIMEOUT) {
                    info!(%node, "node joined");
                }
            }
        }
    }

    async fn hear_changes(
        self: Arc<Self>,
        mut changes: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let heard = tokio::select! {
                heard = changes.next() => heard,
                _ = stop.cancelled() => return,
            };
            let Some(heard) = heard else { return };
            let notice: Notice = match serde_json::from_slice(&heard.payload) {
                Ok(notice) => notice,
                Err(e) => {
                    warn!(error = %e, "a change that does not parse");
                    continue;
                }
            };
            if notice.node != self.node_id {
                self.apply(notice.change);
            }
            if let Some(reply) = heard.reply {
                let id = self.node_id.clone().into();
                if let Err(e) = self.client.publish(reply, id).await {
                    warn!(error = %e, "cannot confirm a change");
                }
            }
        }
    }

    async fn hear_replies(
        self: Arc<Self>,
        mut replies: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let heard = tokio::select! {
                heard = replies.next() => heard,
                _ = stop.cancelled() => return,
            };
            let Some(heard) = heard else { return };
            self.replies.answer(heard.subject.as_str(), heard.payload);
        }
    }

    async fn answer_presence(
        self: Arc<Self>,
        mut questions: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        loop {
            let asked = tokio::select! {
                asked = questions.next() => asked,
                _ = stop.cancelled() => return,
            };
            let Some(asked) = asked else { return };
            let (Some(reply), Ok(users)) = (
                asked.reply,
                serde_json::from_slice::<Vec<String>>(&asked.payload),
            ) else {
                continue;
            };
            let answer = PresenceReply {
                node: self.node_id.clone(),
                devices: users.iter().map(|u| self.hub.live_devices(u)).collect(),
            };
            let Ok(payload) = serde_json::to_vec(&answer) else {
                continue;
            };
            if let Err(e) = self.client.publish(reply, payload.into()).await {
                warn!(error = %e, "cannot answer a presence question");
            }
        }
    }

    /// How many live connections each of `users` has on the other nodes (those that answer
    /// within [`PRESENCE_TIMEOUT`]).
    pub async fn remote_devices(&self, users: &[String]) -> Vec<usize> {
        let mut devices = vec![0; users.len()];
        if let Err(e) = self.ask_presence(users, &mut devices).await {
            warn!(error = %e, "cannot ask the other nodes who is connected");
        }
        devices
    }

    async fn ask_presence(&self, users: &[String], devices: &mut [usize]) -> anyhow::Result<()> {
        let mut waiting = self.live_peers();
        if waiting.is_empty() {
            return Ok(());
        }
        let mut asking = self.replies.ask(&self.node_id);
        let question = serde_json::to_vec(users)?;
        (self.client)
            .publish_with_reply(PRESENCE, asking.subject.clone(), question.into())
            .await?;
        let deadline = Instant::now() + PRESENCE_TIMEOUT;
        while !waiting.is_empty() {
            let answer = tokio::time::timeout_at(deadline, asking.answers.recv()).await;
            let Ok(Some(reply)) = answer else {
                break;
            };
            let Ok(reply) = serde_json::from_slice::<PresenceReply>(&reply) else {
                continue;
            };
            if waiting.remove(&reply.node) {
                for (total, n) in devices.iter_mut().zip(reply.devices) {
                    *total += n;
                }
            }
        }
        Ok(())
    }

    /// Takes a change into this node's memory; a conversation's removed members are cut off.
    fn apply(&self, change: Change) {
        let change = match change {
            Change::Call(call) => {
                self.calls.apply(*call);
                return;
            }
            Change::Claim(client_id) => {
                self.hub.release_client(&client_id);
                return;
            }
            Change::Conversation(change) => change,
        };
        let conversation = Conversation {
            id: change.id,
            members: change.members,
            updated_at: change.updated_at,
            version: change.version,
        };
        let cid = conversation.id.clone();
        if self.conversations.apply(conversation) {
            for uid in &change.removed {
                self.hub.revoke_chat(uid, &cid);
            }
        }
    }

    /// Has every live node (this one first) take a call's new state; returns once they all
    /// confirmed or after [`ACK_TIMEOUT`].
    pub async fn call_changed(&self, call: Versioned) {
        let id = call.call.id;
        if let Err(e) = self.share(Change::Call(Box::new(call))).await {
            warn!(call = id, error = %e, "could not tell the other nodes");
        }
    }

    /// Applies `change` here, then everywhere, and waits for the confirmations.
    async fn share(&self, change: Change) -> anyhow::Result<()> {
        let notice = Notice {
            node: self.node_id.clone(),
            change,
        };
        let payload = serde_json::to_vec(&notice)?;
        // A claim is for the others: here the hub hands the session over by itself.
        if !matches!(notice.change, Change::Claim(_)) {
            self.apply(notice.change);
        }
        self.confirm_everywhere(payload).await
    }

    /// Creates or replaces a conversation in the database, then has every live node (this one
    /// first) apply it; returns once they all confirmed, or after [`ACK_TIMEOUT`] for those
    /// that did not (a node that cannot hear the bus cannot deliver from it either).
    pub async fn replace_conversation(
        &self,
        id: &str,
        members: &BTreeSet<String>,
        updated_at: &str,
    ) -> Result<Replaced, StoreError> {
        let replaced = self
            .pg
            .replace_conversation(id, members, updated_at)
            .await?;
        let conv = &replaced.conversation;
        let removed = replaced.previous.iter().flatten();
        let change = ConversationChange {
            id: conv.id.clone(),
            members: conv.members.clone(),
            updated_at: conv.updated_at.clone(),
            version: conv.version,
            removed: (removed.filter(|m| !conv.members.contains(*m)))
                .cloned()
                .collect(),
        };
        if let Err(e) = self.share(Change::Conversation(change)).await {
            warn!(conversation = %id, error = %e, "could not tell the other nodes");
        }
        Ok(replaced)
    }

    async fn confirm_everywhere(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        let mut waiting = self.live_peers();
        let mut asking = self.replies.ask(&self.node_id);
        self.client
            .publish_with_reply(CHANGES, asking.subject.clone(), payload.into())
            .await?;
        let deadline = Instant::now() + ACK_TIMEOUT;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, asking.answers.recv()).await {
                Ok(Some(ack)) => {
                    waiting.remove(String::from_utf8_lossy(&ack).as_ref());
                }
                Ok(None) => break,
                Err(_) => {
                    // Taken as gone until heard from again, so the next change does not
                    // wait for them too.
                    warn!(nodes = ?waiting, "nodes did not confirm a change in time");
                    let mut peers = lock(&self.peers);
                    peers.retain(|node, _| !waiting.contains(node));
                    break;
                }
            }
        }
        Ok(())
    }
}

impl crate::broker::Peers for Cluster {
    fn claim(&self, client_id: &str) -> futures_util::future::BoxFuture<'_, ()> {
        let change = Change::Claim(client_id.to_owned());
        Box::pin(async move {
            if let Err(e) = self.share(change).await {
                warn!(error = %e, "could not claim a client id from the other nodes");
            }
        })
    }
}
