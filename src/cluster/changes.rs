//! Changes every node takes into memory before the node that made one answers or announces
//! it: conversations (a removed member is cut off everywhere) and calls.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{next, Cluster, ACK_TIMEOUT, CHANGES, HEARTBEAT};
use crate::store::pg::{Replaced, Versioned};
use crate::store::{Conversation, StoreError};
use crate::sync::lock;

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
}

/// A change as it travels: who made it, and what.
#[derive(Serialize, Deserialize)]
struct Notice {
    node: String,
    change: Change,
}

impl Cluster {
    /// After each NATS reconnection, catches up with the conversation changes made while this
    /// node could not hear them (retrying while the database is away).
    pub(super) async fn resync(
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

    pub(super) async fn hear_changes(
        self: Arc<Self>,
        mut changes: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        while let Some(heard) = next(&mut changes, &stop).await {
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

    /// Takes a change into this node's memory; a conversation's removed members are cut off.
    fn apply(&self, change: Change) {
        let change = match change {
            Change::Call(call) => {
                self.calls.apply(*call);
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
        self.apply(notice.change);
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
        let removed = change.removed.clone();
        if let Err(e) = self.share(Change::Conversation(change)).await {
            warn!(conversation = %id, error = %e, "could not tell the other nodes");
        }
        // Sessions stored while their clients are away lose the conversation too.
        if let Some(queues) = self.queues.get() {
            let topic = crate::model::topic::chat_topic(id);
            for user in &removed {
                queues.revoke(user, &topic).await?;
            }
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

impl crate::calls::Nodes for Cluster {
    fn call_changed(&self, call: Versioned) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(Cluster::call_changed(self, call))
    }

    fn remote_devices<'a>(
        &'a self,
        users: &'a [String],
    ) -> futures_util::future::BoxFuture<'a, Vec<usize>> {
        Box::pin(Cluster::remote_devices(self, users))
    }

    fn offered(&self, id: u64, by: &str) {
        let client = self.client.clone();
        let payload = format!("{id} {by}").into();
        tokio::spawn(async move {
            if let Err(e) = client.publish(super::OFFERS, payload).await {
                warn!(error = %e, "cannot tell the other nodes about an offer");
            }
        });
    }
}

impl Cluster {
    /// Takes the offers other nodes relayed into this node's copy of the calls.
    pub(super) async fn hear_offers(
        self: Arc<Self>,
        mut offers: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        while let Some(heard) = super::next(&mut offers, &stop).await {
            let text = String::from_utf8_lossy(&heard.payload);
            let Some((id, by)) = text.split_once(' ') else {
                continue;
            };
            if let Ok(id) = id.parse() {
                self.calls.set_offer(id, by);
            }
        }
    }
}
