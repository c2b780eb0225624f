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
    /// A newer connection of the same user took this client id.
    Replaced,
}

#[derive(Default)]
struct Sessions {
    by_user: HashMap<String, HashMap<u64, mpsc::Sender<Command>>>,
    /// Broker-side client id (`<user>.<client id>`) to the session holding it.
    by_client: HashMap<String, u64>,
}

#[derive(Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    sessions: Mutex<Sessions>,
}

/// Removes its session from the registry when dropped.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    user_id: String,
    client_id: String,
    pub(crate) id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sessions = self.registry.lock();
        if let Some(by_id) = sessions.by_user.get_mut(&self.user_id) {
            by_id.remove(&self.id);
            if by_id.is_empty() {
                sessions.by_user.remove(&self.user_id);
            }
        }
        if sessions.by_client.get(&self.client_id) == Some(&self.id) {
            sessions.by_client.remove(&self.client_id);
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session of `user_id` under its broker-side `client_id`; it receives commands
    /// on the returned channel. An older session with the same client id is told it was
    /// replaced, as MQTT requires.
    pub(crate) fn register(
        self: &Arc<Self>,
        user_id: &str,
        client_id: &str,
    ) -> (Registration, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(4);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = {
            let mut sessions = self.lock();
            let previous = sessions.by_client.insert(client_id.to_owned(), id);
            let by_id = sessions.by_user.entry(user_id.to_owned()).or_default();
            by_id.insert(id, tx);
            previous.and_then(|old| by_id.get(&old).cloned())
        };
        if let Some(old) = previous {
            // A full queue means the old session is busy with commands; it will still see the
            // Replaced after them.
            tokio::spawn(async move {
                let _ = old.send(Command::Replaced).await;
            });
        }
        let registration = Registration {
            registry: self.clone(),
            user_id: user_id.to_owned(),
            client_id: client_id.to_owned(),
            id,
        };
        (registration, rx)
    }

    /// The command channels of every session of `user_id`.
    pub(crate) fn sessions_of(&self, user_id: &str) -> Vec<mpsc::Sender<Command>> {
        self.lock()
            .by_user
            .get(user_id)
            .map(|by_id| by_id.values().cloned().collect())
            .unwrap_or_default()
    }
}
