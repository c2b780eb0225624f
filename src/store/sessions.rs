//! What persistent sessions need to survive a restart: a record per session (its user, its
//! subscriptions, how far it has received the durable event log, when it expires) and the
//! durable event log itself: every event the REST layer makes for a user's notifications,
//! written with the change that made it, so a session that was away during a crash gets it
//! after the restart.

use serde::{Deserialize, Serialize};

use super::{user_key, StoreError};

/// A persistent session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user_id: String,
    pub admin: bool,
    /// Filters and their QoS (0 or 1).
    pub filters: Vec<(String, u8)>,
    /// The highest event-log sequence the session has acknowledged.
    pub delivered_through: u64,
    /// Filters held with MQTT 5's No Local (the session's own publishes are not sent to it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_local: Vec<String>,
}

/// One durable event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LoggedEvent {
    ts_ms: u64,
    payload: String,
}

#[derive(Clone)]
pub struct SessionTrees {
    db: sled::Db,
    sessions: sled::Tree,
    events: sled::Tree,
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

impl SessionTrees {
    pub(super) fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            sessions: db.open_tree("sessions")?,
            events: db.open_tree("user_events")?,
        })
    }

    /// Every stored session record, by broker-side client id.
    pub fn all(&self) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.sessions.iter() {
            let (key, value) = item?;
            let client = String::from_utf8(key.to_vec()).map_err(|_| corrupt("session key"))?;
            let record = serde_json::from_slice(&value).map_err(|_| corrupt("session"))?;
            out.push((client, record));
        }
        Ok(out)
    }

    /// Writes a session record (the caller flushes when it must be durable at once).
    pub fn put(&self, client_id: &str, record: &SessionRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(|_| corrupt("session"))?;
        self.sessions.insert(client_id.as_bytes(), value)?;
        Ok(())
    }

    pub fn remove(&self, client_id: &str) -> Result<(), StoreError> {
        self.sessions.remove(client_id.as_bytes())?;
        Ok(())
    }

    /// Appends an event for `user_id`; returns its sequence (increasing across restarts). The
    /// caller flushes it with the change that made it.
    pub fn log_event(&self, user_id: &str, payload: &str, ts_ms: u64) -> Result<u64, StoreError> {
        let seq = self.db.generate_id()? + 1;
        let event = LoggedEvent {
            ts_ms,
            payload: payload.to_owned(),
        };
        let value = serde_json::to_vec(&event).map_err(|_| corrupt("event"))?;
        self.events.insert(user_key(user_id, seq), value)?;
        Ok(seq)
    }

    /// The highest sequence given to an event so far (or a little higher).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// `user_id`'s events after `seq`, oldest first: (sequence, payload).
    pub fn events_after(&self, user_id: &str, seq: u64) -> Result<Vec<(u64, String)>, StoreError> {
        let start = user_key(user_id, seq.saturating_add(1));
        let end = user_key(user_id, u64::MAX);
        let mut out = Vec::new();
        for item in self.events.range(start..end) {
            let (key, value) = item?;
            let seq_bytes: [u8; 8] = key[key.len() - 8..]
                .try_into()
                .map_err(|_| corrupt("event key"))?;
            let event: LoggedEvent =
                serde_json::from_slice(&value).map_err(|_| corrupt("event"))?;
            out.push((u64::from_be_bytes(seq_bytes), event.payload));
        }
        Ok(out)
    }

    /// Drops events older than `before_ms`: no stored session can still need them.
    pub fn trim_events(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut old = Vec::new();
        for item in self.events.iter() {
            let (key, value) = item?;
            match serde_json::from_slice::<LoggedEvent>(&value) {
                Ok(event) if event.ts_ms >= before_ms => {}
                _ => old.push(key),
            }
        }
        for key in &old {
            self.events.remove(key)?;
        }
        Ok(old.len())
    }
}
