//! Durable state in sled (DESIGN "Storage and durability"). Writers call [`Store::flush`] before
//! they acknowledge anything; concurrent writers share one fsync (group commit).

mod calls;
mod commit;
mod conversations;
pub mod pg;
mod push;
mod replica;
mod sessions;

pub use calls::CallTrees;
pub use conversations::{Conversation, Conversations};
pub use push::{PushJob, PushTree};
pub use replica::CallReplica;
pub use sessions::{SessionRecord, SessionTrees};

use commit::Committer;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("flush failed: {0}")]
    Flush(String),
    #[error("corrupt record under {0}")]
    Corrupt(String),
    /// The shared database (cluster mode) cannot be reached: try again later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Config(String),
}

/// A key `<user id>/<id as 8 big-endian bytes>`: a user's entries sort together, by id.
fn user_key(uid: &str, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(uid.len() + 9);
    key.extend_from_slice(uid.as_bytes());
    key.push(b'/'); // never part of a user id
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Store {
    committer: Committer,
    pub conversations: Conversations,
    pub calls: CallTrees,
    pub push: PushTree,
    pub sessions: SessionTrees,
}

impl Store {
    /// Opens (or creates) the database under `dir`, with at most `cache_bytes` of it cached in
    /// memory. Blocks: call from a blocking context inside a tokio runtime (the commit task is
    /// spawned on it).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(cache_bytes)
            .open()?;
        let conversations = Conversations::open(&db)?;
        let calls = CallTrees::open(&db)?;
        let push = PushTree::open(&db)?;
        let sessions = SessionTrees::open(&db)?;
        Ok(Self {
            push,
            sessions,
            committer: Committer::start(db),
            conversations,
            calls,
        })
    }

    /// Returns once everything written so far is on disk. Concurrent callers share one flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.committer.commit().await.map_err(StoreError::Flush)
    }
}
