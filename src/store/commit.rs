//! Group commit: every writer that needs durability asks for a flush; one background task runs
//! one fsync for everyone who asked while the previous flush was running. The same task flushes
//! what needs no acknowledgement every half second. Each flush first checks the data dir's
//! reserve: below it nothing is written, and the waiters hear that the disk is full.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::space::Space;
use super::StoreError;

/// How a flush ended, for every waiter of the batch.
#[derive(Clone)]
enum Flushed {
    Done,
    Full(u64),
    Failed(String),
}

type Waiter = oneshot::Sender<Flushed>;

/// How often writes nobody waits for (session progress) are flushed.
const PERIOD: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub(super) struct Committer {
    requests: mpsc::UnboundedSender<Waiter>,
}

async fn flush(db: &sled::Db, space: &Space) -> Flushed {
    if let Err(free) = space.may_flush() {
        return Flushed::Full(free);
    }
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(Ok(_)) => Flushed::Done,
        Ok(Err(e)) => Flushed::Failed(e.to_string()),
        Err(e) => Flushed::Failed(e.to_string()),
    }
}

impl Committer {
    /// Starts the commit task on the current tokio runtime.
    pub(super) fn start(db: sled::Db, space: Arc<Space>) -> Self {
        let (requests, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::runtime::Handle::current().spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let first = tokio::select! {
                    first = rx.recv() => match first {
                        Some(first) => first,
                        None => break,
                    },
                    _ = tick.tick() => {
                        match flush(&db, &space).await {
                            Flushed::Failed(e) => tracing::error!(error = %e, "periodic flush failed"),
                            Flushed::Full(free) => tracing::warn!(free_bytes = free, "the data dir is full: flushing waits for space"),
                            Flushed::Done => {}
                        }
                        continue;
                    }
                };
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let result = flush(&db, &space).await;
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
            // The store is going away: what was written goes to disk (if it may).
            let _ = flush(&db, &space).await;
        });
        Self { requests }
    }

    /// Returns once everything written before the call is on disk.
    pub(super) async fn commit(&self) -> Result<(), StoreError> {
        let stopped = || StoreError::Flush("commit task stopped".to_owned());
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).map_err(|_| stopped())?;
        match rx.await.map_err(|_| stopped())? {
            Flushed::Done => Ok(()),
            Flushed::Full(free) => Err(StoreError::Unflushed(free)),
            Flushed::Failed(e) => Err(StoreError::Flush(e)),
        }
    }
}
