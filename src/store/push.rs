//! The push outbox in sled: webhook jobs written with the call change that caused them (so a
//! 2xx for that change means the push is queued durably), taken in order by the push worker.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;

/// One webhook delivery to make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushJob {
    /// Give up after this (Unix ms): a push about a call that stopped ringing long ago helps
    /// nobody.
    pub deadline_ms: u64,
    /// The JSON body to POST.
    pub body: Value,
}

#[derive(Clone)]
pub struct PushTree {
    db: sled::Db,
    tree: sled::Tree,
}

impl PushTree {
    pub(super) fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("push_outbox")?,
        })
    }

    /// Queues a job after every job queued before it. The caller commits.
    pub fn enqueue(&self, job: &PushJob) -> Result<(), StoreError> {
        let key = self.db.generate_id()?.to_be_bytes();
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.tree.insert(key, value)?;
        Ok(())
    }

    /// The oldest queued job and its key.
    pub fn first(&self) -> Result<Option<(u64, PushJob)>, StoreError> {
        let Some((key, value)) = self.tree.first()? else {
            return Ok(None);
        };
        let key: [u8; 8] = key
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Corrupt("push_outbox key".into()))?;
        let job = serde_json::from_slice(&value)
            .map_err(|_| StoreError::Corrupt("push_outbox job".into()))?;
        Ok(Some((u64::from_be_bytes(key), job)))
    }

    /// How many jobs are waiting.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Removes a job once it is delivered or given up.
    pub fn remove(&self, key: u64) -> Result<(), StoreError> {
        self.tree.remove(key.to_be_bytes())?;
        Ok(())
    }
}
