//! Group commit: every writer that needs durability asks for a flush; one committer thread runs
//! one fsync for everyone who asked while the previous flush was running. The same thread
//! flushes what needs no acknowledgement every half second. Each flush first checks the data
//! dir's reserve: below it nothing is written, and the waiters hear that the disk is full.
//!
//! The committer is a plain thread, not a task: a flush blocks (sled writes and syncs), and a
//! task would hand each one to tokio's blocking pool and back, two more thread wake-ups per
//! flush. Under load it also waits a moment before flushing (see [`GATHER`]): every sled flush
//! wakes sled's whole I/O thread pool (seven threads, one after another), so fewer, larger
//! groups save more CPU than the wait costs in latency.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::space::Space;
use super::StoreError;
use crate::metrics;

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

/// Under concurrent load (a flush within the last [`SHARED`] served more than one writer, and
/// the previous one ended less than [`BUSY`] ago), how long the committer gathers more waiters
/// before it flushes. A lone writer (one client's requests one after another) never waits:
/// nobody would join it.
const GATHER: Duration = Duration::from_micros(300);
const BUSY: Duration = Duration::from_millis(2);
const SHARED: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub(super) struct Committer {
    requests: std_mpsc::Sender<Waiter>,
}

fn flush(db: &sled::Db, space: &Space) -> Flushed {
    if let Err(free) = space.may_flush() {
        return Flushed::Full(free);
    }
    metrics::STORE_FLUSHES.inc();
    match db.flush() {
        Ok(_) => Flushed::Done,
        Err(e) => Flushed::Failed(e.to_string()),
    }
}

fn log_unwaited(flushed: Flushed) {
    match flushed {
        Flushed::Failed(e) => tracing::error!(error = %e, "periodic flush failed"),
        Flushed::Full(free) => {
            tracing::warn!(
                free_bytes = free,
                "the data dir is full: flushing waits for space"
            )
        }
        Flushed::Done => {}
    }
}

/// The committer thread's loop: ends (after a last flush) once every [`Committer`] is gone.
fn run(db: sled::Db, space: Arc<Space>, requests: std_mpsc::Receiver<Waiter>) {
    let mut last_flush = Instant::now();
    // When a flush last served more than one writer.
    let mut last_shared: Option<Instant> = None;
    let mut next_periodic = Instant::now() + PERIOD;
    loop {
        let wait = next_periodic.saturating_duration_since(Instant::now());
        let first = match requests.recv_timeout(wait) {
            Ok(first) => first,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                log_unwaited(flush(&db, &space));
                next_periodic = Instant::now() + PERIOD;
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        let concurrent = last_shared.is_some_and(|t| t.elapsed() < SHARED);
        if concurrent && last_flush.elapsed() < BUSY {
            let until = Instant::now() + GATHER;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match requests.recv_timeout(left) {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
        }
        batch.extend(requests.try_iter());
        metrics::STORE_COMMITS.add(batch.len() as u64);
        if batch.len() > 1 {
            last_shared = Some(Instant::now());
        }
        let result = flush(&db, &space);
        last_flush = Instant::now();
        next_periodic = last_flush + PERIOD;
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
    // The store is going away: what was written goes to disk (if it may).
    log_unwaited(flush(&db, &space));
}

impl Committer {
    /// Starts the committer thread.
    pub(super) fn start(db: sled::Db, space: Arc<Space>) -> std::io::Result<Self> {
        let (requests, rx) = std_mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("callbus-commit".to_owned())
            .spawn(move || run(db, space, rx))?;
        Ok(Self { requests })
    }

    /// Returns once everything written before the call is on disk.
    pub(super) async fn commit(&self) -> Result<(), StoreError> {
        let stopped = || StoreError::Flush("the committer stopped".to_owned());
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).map_err(|_| stopped())?;
        match rx.await.map_err(|_| stopped())? {
            Flushed::Done => Ok(()),
            Flushed::Full(free) => Err(StoreError::Unflushed(free)),
            Flushed::Failed(e) => Err(StoreError::Flush(e)),
        }
    }
}
