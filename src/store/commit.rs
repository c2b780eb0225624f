//! Group commit: every writer that needs durability asks for a flush; one background task runs
//! one fsync for everyone who asked while the previous flush was running.

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Clone)]
pub(super) struct Committer {
    requests: mpsc::UnboundedSender<Waiter>,
}

impl Committer {
    /// Starts the commit task on the current tokio runtime.
    pub(super) fn start(db: sled::Db) -> Self {
        let (requests, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::runtime::Handle::current().spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let db = db.clone();
                let result = match tokio::task::spawn_blocking(move || db.flush()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Self { requests }
    }

    /// Returns once everything written before the call is on disk.
    pub(super) async fn commit(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .map_err(|_| "commit task stopped".to_owned())?;
        rx.await.map_err(|_| "commit task stopped".to_owned())?
    }
}
