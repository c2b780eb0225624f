//! Conversation membership: who may read and write `chat/{cid}`. The main app owns it and
//! replaces it through `PUT /api/conversations/{cid}/`. Reads come from an in-memory copy (the
//! hub asks on every chat delivery), which is updated in the same critical section as sled,
//! so a change is visible to the ACL the moment the write returns.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use super::StoreError;
use crate::sync::{read, write};

/// A conversation and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub members: BTreeSet<String>,
    pub updated_at: String,
    /// How many times it was written (cluster mode: a node keeps the newest it has seen).
    #[serde(skip)]
    pub version: u64,
}

#[derive(Clone)]
pub struct Conversations {
    tree: sled::Tree,
    cache: Arc<RwLock<HashMap<String, Arc<Conversation>>>>,
}

impl Conversations {
    pub(super) fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("conversations")?;
        let mut cache = HashMap::new();
        for item in tree.iter() {
            let (key, value) = item?;
            let conv: Conversation = serde_json::from_slice(&value)
                .map_err(|_| StoreError::Corrupt(String::from_utf8_lossy(&key).into_owned()))?;
            cache.insert(conv.id.clone(), Arc::new(conv));
        }
        Ok(Self {
            tree,
            cache: Arc::new(RwLock::new(cache)),
        })
    }

    /// Creates or replaces a conversation; returns the previous one. The caller flushes.
    pub fn put(&self, conv: Conversation) -> Result<Option<Arc<Conversation>>, StoreError> {
        let value = serde_json::to_vec(&conv).map_err(|_| StoreError::Corrupt(conv.id.clone()))?;
        let mut cache = write(&self.cache);
        self.tree.insert(conv.id.as_bytes(), value)?;
        Ok(cache.insert(conv.id.clone(), Arc::new(conv)))
    }

    /// Replaces the in-memory copy with `convs` (cluster mode: the database's).
    pub fn load(&self, convs: Vec<Conversation>) {
        let fresh = convs.into_iter().map(|c| (c.id.clone(), Arc::new(c)));
        *write(&self.cache) = fresh.collect();
    }

    /// Takes `conv` into the in-memory copy if it is newer than what is there (cluster mode:
    /// the database holds conversations and nodes hear of changes in any order). Returns
    /// whether it was taken.
    pub fn apply(&self, conv: Conversation) -> bool {
        let mut cache = write(&self.cache);
        if cache
            .get(&conv.id)
            .is_some_and(|c| c.version >= conv.version)
        {
            return false;
        }
        cache.insert(conv.id.clone(), Arc::new(conv));
        true
    }

    /// The conversation, if known.
    pub fn get(&self, cid: &str) -> Option<Arc<Conversation>> {
        let cache = read(&self.cache);
        cache.get(cid).cloned()
    }

    /// Whether `uid` is a member of `cid`.
    pub fn is_member(&self, cid: &str, uid: &str) -> bool {
        let cache = read(&self.cache);
        cache.get(cid).is_some_and(|c| c.members.contains(uid))
    }
}
