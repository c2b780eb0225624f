//! The conversations service: the one place membership changes, behind both REST paths that
//! change it (the main app's `PUT /api/conversations/{cid}/` and the demo's dev sign-in). A
//! change is durable before it returns, and members it removes have already stopped receiving
//! `chat/{cid}`, existing subscriptions included (in cluster mode, on every node).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::broker::Hub;
use crate::cluster::Cluster;
use crate::ids::now_rfc3339;
use crate::store::{Conversation, Store, StoreError};

#[derive(Clone)]
pub struct ConversationService {
    store: Store,
    hub: Arc<Hub>,
    /// Cluster mode: conversations live in PostgreSQL and changes reach every node.
    cluster: Option<Arc<Cluster>>,
}

impl ConversationService {
    pub fn new(store: Store, hub: Arc<Hub>, cluster: Option<Arc<Cluster>>) -> Self {
        Self {
            store,
            hub,
            cluster,
        }
    }

    pub fn get(&self, cid: &str) -> Option<Arc<Conversation>> {
        self.store.conversations.get(cid)
    }

    pub fn is_member(&self, cid: &str, uid: &str) -> bool {
        self.store.conversations.is_member(cid, uid)
    }

    /// Creates or replaces a conversation's members; returns it and whether it existed.
    pub async fn replace(
        &self,
        cid: &str,
        members: BTreeSet<String>,
    ) -> Result<(Conversation, bool), StoreError> {
        if let Some(cluster) = &self.cluster {
            let replaced = (cluster.replace_conversation(cid, &members, &now_rfc3339())).await?;
            return Ok((replaced.conversation, replaced.previous.is_some()));
        }
        let conv = Conversation {
            id: cid.to_owned(),
            members,
            updated_at: now_rfc3339(),
            version: 0,
        };
        let previous = self.store.conversations.put(conv.clone())?;
        self.store.flush().await?;
        if let Some(previous) = &previous {
            for uid in previous.members.difference(&conv.members) {
                self.hub.revoke_chat(uid, cid);
            }
        }
        Ok((conv, previous.is_some()))
    }

    /// Adds `uid` to `cid` (creating it), if not already a member.
    pub async fn join(&self, cid: &str, uid: &str) -> Result<(), StoreError> {
        let mut members = self.get(cid).map(|c| c.members.clone()).unwrap_or_default();
        if members.insert(uid.to_owned()) {
            self.replace(cid, members).await?;
        }
        Ok(())
    }
}
