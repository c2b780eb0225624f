//! Durable state in sled (DESIGN "Storage and durability"). Writers call [`Store::flush`] before
//! they acknowledge anything; concurrent writers share one fsync (group commit).

mod calls;
mod commit;
mod conversations;
pub mod pg;
mod push;
mod replica;
mod sessions;
mod space;

pub use calls::CallTrees;
pub use conversations::{Conversation, Conversations};
pub use push::{PushJob, PushTree};
pub use replica::CallReplica;
pub use sessions::{SessionRecord, SessionTrees};

use commit::Committer;
use space::Space;

use std::path::Path;
use std::sync::Arc;

use crate::config::StorageConfig;

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
    /// The data dir's filesystem is at its reserve: nothing was changed; try again later.
    #[error("the data dir is full ({0} bytes free)")]
    Full(u64),
    /// The change was made but cannot be flushed: the data dir's filesystem is past half its
    /// reserve. It reaches the disk once space returns, unless the process stops first.
    #[error("the data dir is full ({0} bytes free): not flushed")]
    Unflushed(u64),
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
    space: Arc<Space>,
    pub conversations: Conversations,
    pub calls: CallTrees,
    pub push: PushTree,
    pub sessions: SessionTrees,
}

impl Store {
    /// Opens (or creates) the database under `dir` as `config` says. Blocks: call from a
    /// blocking context inside a tokio runtime (the commit task is spawned on it).
    pub fn open(dir: &Path, config: &StorageConfig) -> Result<Self, StoreError> {
        // sled's own periodic flush is off: every flush goes through the committer, which
        // checks the reserve first (sled's error on a full disk would stick).
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(config.cache_bytes)
            .flush_every_ms(None)
            .open()?;
        let space = Arc::new(Space::new(dir, config.min_free_bytes));
        let conversations = Conversations::open(&db)?;
        let calls = CallTrees::open(&db)?;
        let push = PushTree::open(&db)?;
        let sessions = SessionTrees::open(&db)?;
        let committer = Committer::start(db, space.clone())
            .map_err(|e| StoreError::Flush(format!("cannot start the committer: {e}")))?;
        Ok(Self {
            push,
            sessions,
            committer,
            space,
            conversations,
            calls,
        })
    }

    /// Returns once everything written so far is on disk. Concurrent callers share one flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.committer.commit().await
    }

    /// What decides whether a change may start (cheap to clone, unlike the store).
    pub fn gate(&self) -> SpaceGate {
        SpaceGate(self.space.clone())
    }
}

/// The data dir's free-space reserve, as checked before a change.
#[derive(Clone)]
pub struct SpaceGate(Arc<Space>);

impl SpaceGate {
    /// `Err(Full)` while the data dir's free space is under its reserve: check before a change,
    /// so that a refused change is not applied at all.
    pub fn admit(&self) -> Result<(), StoreError> {
        self.0.admit().map_err(StoreError::Full)
    }
}
