//! Cluster mode (DESIGN "Cluster mode"): nodes share a NATS cluster (the bus, and this control
//! plane) and a PostgreSQL database. This module is what one node knows of the others: which
//! nodes are alive (a heartbeat each second), and changes every node must hold in memory before
//! the node that made one answers or announces it: conversations (so a member removed on one
//! node has stopped receiving on all of them when the PUT answers) and calls (so signaling that
//! follows a call event is checked against the state the event announced, on any node).

mod changes;
mod claims;
mod presence;
mod queues;

pub use queues::Queues;

use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Hub;
use crate::store::pg::Pg;
use crate::store::{CallReplica, Conversations};
use crate::sync::lock;
use presence::Replies;

const NODES: &str = "callbus.ctl.node";
const CHANGES: &str = "callbus.ctl.change";
const PRESENCE: &str = "callbus.ctl.presence";
/// Who sent each call's latest offer (`<call id> <user id>`).
const OFFERS: &str = "callbus.ctl.offer";
/// How long a presence question waits for the other nodes.
const PRESENCE_TIMEOUT: Duration = Duration::from_millis(500);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is taken as gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a change waits for the other nodes to confirm it.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The next message of `sub`, or `None` once it ends or `stop` is cancelled.
async fn next(
    sub: &mut async_nats::Subscriber,
    stop: &CancellationToken,
) -> Option<async_nats::Message> {
    tokio::select! {
        message = sub.next() => message,
        _ = stop.cancelled() => None,
    }
}

/// What `--cluster`, `--database` and `--node-id` say.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nats: Vec<String>,
    pub database: String,
    pub node_id: String,
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
    /// Client ids whose sessions this node holds (held or let go), for [`claims`].
    holding: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
    /// The persistent sessions' records and queues.
    queues: std::sync::OnceLock<Arc<Queues>>,
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
        let (holding, held) = tokio::sync::mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            node_id: options.node_id.clone(),
            client: nats.client,
            pg,
            conversations: replicas.conversations,
            calls: replicas.calls,
            hub,
            peers: Mutex::default(),
            replies: Replies::default(),
            holding,
            queues: std::sync::OnceLock::new(),
        });
        let nodes = cluster.client.subscribe(NODES).await?;
        let changes = cluster.client.subscribe(CHANGES).await?;
        let presence = cluster.client.subscribe(PRESENCE).await?;
        let offers = cluster.client.subscribe(OFFERS).await?;
        let claims = cluster.client.subscribe(claims::CLAIMS).await?;
        let replies = (cluster.client)
            .subscribe(format!("callbus.reply.{}.*", cluster.node_id))
            .await?;
        cluster.client.flush().await?;
        let pg = &cluster.pg;
        let conversations = pg.at_start(|| pg.conversations()).await?;
        cluster.conversations.load(conversations);
        for call in pg.at_start(|| pg.live_calls()).await? {
            cluster.calls.apply(call);
        }
        tokio::spawn(cluster.clone().hear_nodes(nodes, shutdown.clone()));
        tokio::spawn(cluster.clone().hear_changes(changes, shutdown.clone()));
        tokio::spawn(cluster.clone().answer_presence(presence, shutdown.clone()));
        tokio::spawn(cluster.clone().hear_offers(offers, shutdown.clone()));
        tokio::spawn(cluster.clone().hear_replies(replies, shutdown.clone()));
        tokio::spawn(cluster.clone().hold_claims(held, shutdown.clone()));
        tokio::spawn(cluster.clone().hear_claims(claims, shutdown.clone()));
        tokio::spawn(cluster.clone().resync(nats.reconnected, shutdown.clone()));
        tokio::spawn(cluster.clone().heartbeat(shutdown));
        // The others hear this node's first heartbeat at once; this node hears each of theirs
        // within a period. Serving before that, a change made here could skip waiting for
        // a node it has not heard of yet.
        tokio::time::sleep(HEARTBEAT + HEARTBEAT / 4).await;
        info!(node = %cluster.node_id, peers = cluster.live_peers().len(), "joined the cluster");
        Ok(cluster)
    }

    /// Where persistent sessions are kept (set once, after [`Cluster::start`]).
    pub fn keep_sessions(&self, queues: Arc<Queues>) {
        let _ = self.queues.set(queues);
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
    pub(super) fn live_peers(&self) -> HashSet<String> {
        let now = Instant::now();
        let peers = lock(&self.peers);
        let live = peers.iter().filter(|(_, seen)| now - **seen < PEER_TIMEOUT);
        live.map(|(node, _)| node.clone()).collect()
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
        while let Some(heard) = next(&mut nodes, &stop).await {
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
}
