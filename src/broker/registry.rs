//! Live sessions by user, so that a membership change can reach the sessions it affects at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// What the rest of callbus can ask of a running session.
pub(crate) enum Command {
    /// Drop any subscription to `chat/{cid}`; answer once the router has been told.
    Revoke {
        cid: String,
        done: oneshot::Sender<()>,
    },
}

type Sessions = HashMap<String, HashMap<u64, mpsc::Sender<Command>>>;

#[derive(Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    sessions: Mutex<Sessions>,
}

/// Removes its session from the registry when dropped.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    user_id: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sessions = self.registry.lock();
        if let Some(by_id) = sessions.get_mut(&self.user_id) {
            by_id.remove(&self.id);
            if by_id.is_empty() {
                sessions.remove(&self.user_id);
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session of `user_id`; it receives commands on the returned channel.
    pub(crate) fn register(
        self: &Arc<Self>,
        user_id: &str,
    ) -> (Registration, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(4);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(user_id.to_owned())
            .or_default()
            .insert(id, tx);
        let registration = Registration {
            registry: self.clone(),
            user_id: user_id.to_owned(),
            id,
        };
        (registration, rx)
    }

    /// The command channels of every session of `user_id`.
    pub(crate) fn sessions_of(&self, user_id: &str) -> Vec<mpsc::Sender<Command>> {
        self.lock()
            .get(user_id)
            .map(|by_id| by_id.values().cloned().collect())
            .unwrap_or_default()
    }
}
