//! Durable state in sled (DESIGN "Storage and durability"). A write returns only after it is
//! flushed to disk; concurrent writers share flushes (sled's flush covers everything written
//! before it, so callers that wait on the same flush are committed together).

mod conversations;

pub use conversations::{Conversation, Conversations};

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under {0}")]
    Corrupt(String),
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    pub conversations: Conversations,
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let conversations = Conversations::open(&db)?;
        Ok(Self { db, conversations })
    }

    /// Flushes everything written so far to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}
