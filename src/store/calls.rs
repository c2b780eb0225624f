//! Calls in sled: `calls` (id → record), `user_calls` (user id, call id → ()) for history, and
//! `live_calls` (ids of ringing or active calls) so startup only looks at what can still change.

use crate::model::call::Call;

use super::{user_key, StoreError};

#[derive(Clone)]
pub struct CallTrees {
    db: sled::Db,
    calls: sled::Tree,
    by_user: sled::Tree,
    live: sled::Tree,
}

impl CallTrees {
    pub(super) fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            calls: db.open_tree("calls")?,
            by_user: db.open_tree("user_calls")?,
            live: db.open_tree("live_calls")?,
        })
    }

    /// A fresh call id (monotonic across restarts, starting at 1).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()? + 1)
    }

    /// Writes a new call and its indexes. The caller commits.
    pub fn create(&self, call: &Call) -> Result<(), StoreError> {
        self.write(call)?;
        self.by_user
            .insert(user_key(&call.caller.id, call.id), &[])?;
        self.by_user
            .insert(user_key(&call.receiver.id, call.id), &[])?;
        if !call.status.is_terminal() {
            self.live.insert(call.id.to_be_bytes(), &[])?;
        }
        Ok(())
    }

    /// Writes a call that changed state (its parties, and so its history entries, never
    /// change); it leaves the live index once it ends. The caller commits.
    pub fn update(&self, call: &Call) -> Result<(), StoreError> {
        self.write(call)?;
        if call.status.is_terminal() {
            self.live.remove(call.id.to_be_bytes())?;
        }
        Ok(())
    }

    fn write(&self, call: &Call) -> Result<(), StoreError> {
        let value =
            serde_json::to_vec(call).map_err(|_| StoreError::Corrupt(call.id.to_string()))?;
        self.calls.insert(call.id.to_be_bytes(), value)?;
        Ok(())
    }

    pub fn get(&self, id: u64) -> Result<Option<Call>, StoreError> {
        match self.calls.get(id.to_be_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| StoreError::Corrupt(id.to_string())),
            None => Ok(None),
        }
    }

    /// A user's calls, newest first, with ids below `before` if given.
    pub fn history(
        &self,
        uid: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Call>, StoreError> {
        let start = user_key(uid, 0);
        let end = user_key(uid, before.unwrap_or(u64::MAX));
        let mut out = Vec::new();
        for item in self.by_user.range(start..end).rev() {
            let (key, _) = item?;
            let id_bytes: [u8; 8] = key[key.len() - 8..]
                .try_into()
                .map_err(|_| StoreError::Corrupt(uid.to_owned()))?;
            if let Some(call) = self.get(u64::from_be_bytes(id_bytes))? {
                out.push(call);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Removes calls that ended before `before_ms`, with their history entries, oldest first
    /// and at most `max` of them; returns how many went. Ringing and active calls stay. A call
    /// created after `before_ms` cannot have ended before it, so the scan stops at the first.
    /// The caller commits (a removal lost to a crash is made again by the next sweep).
    pub fn prune(&self, before_ms: u64, max: usize) -> Result<usize, StoreError> {
        let mut removed = 0;
        for item in self.calls.iter() {
            let (key, value) = item?;
            let call: Call = serde_json::from_slice(&value)
                .map_err(|_| StoreError::Corrupt(format!("calls/{key:?}")))?;
            if call.created_ms >= before_ms || removed >= max {
                break;
            }
            if !call.status.is_terminal() || call.ended_ms.is_none_or(|t| t >= before_ms) {
                continue;
            }
            self.calls.remove(key)?;
            self.by_user.remove(user_key(&call.caller.id, call.id))?;
            self.by_user.remove(user_key(&call.receiver.id, call.id))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Every ringing or active call.
    pub fn live(&self) -> Result<Vec<Call>, StoreError> {
        let mut out = Vec::new();
        for item in self.live.iter() {
            let (key, _) = item?;
            let id_bytes: [u8; 8] = key
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("live_calls".into()))?;
            if let Some(call) = self.get(u64::from_be_bytes(id_bytes))? {
                out.push(call);
            }
        }
        Ok(out)
    }
}
