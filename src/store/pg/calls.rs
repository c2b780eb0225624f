//! Calls in PostgreSQL. Every change to a call happens under that call's advisory lock, held on
//! one connection ([`Locked`]) from the read until its events are announced, so changes to one
//! call are made and announced one at a time in one order, whichever nodes make them. A new
//! call is decided under both parties' locks, so two initiates racing on two nodes cannot both
//! find the receiver free (busy) or both miss each other (glare).

use serde::{Deserialize, Serialize};

use super::{unavailable, Conn, Pg};
use crate::model::call::{Call, Status};
use crate::store::StoreError;

/// A call and how many times it was written (nodes keep the newest they hear of).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versioned {
    pub call: Call,
    pub version: u64,
}

/// What creating a call found.
pub enum Created<'a> {
    New(Locked<'a>, Versioned),
    /// The receiver is in a ringing or active call.
    Busy,
    /// The receiver is already ringing the caller: that call.
    Glare(Call),
}

/// A connection holding one call's lock; release it once the change is announced. Dropped
/// without [`Locked::release`], it closes its connection, which releases the lock too.
pub struct Locked<'a> {
    conn: Conn<'a>,
    id: i64,
    released: bool,
}

impl Locked<'_> {
    /// Writes the call's next state (the lock is held: nobody else writes it meanwhile).
    pub async fn update(&mut self, next: &Versioned) -> Result<(), StoreError> {
        let record = encode(&next.call)?;
        let client = self.conn.client()?;
        client
            .execute(
                "UPDATE calls SET live = $2, status = $3, version = $4, record = $5 WHERE id = $1",
                &[
                    &self.id,
                    &!next.call.status.is_terminal(),
                    &next.call.status.as_str(),
                    &(next.version as i64),
                    &record,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn release(mut self) {
        let id = self.id;
        if let Ok(client) = self.conn.client() {
            let unlock = client
                .execute("SELECT pg_advisory_unlock($1)", &[&id])
                .await;
            self.released = unlock.is_ok();
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Unlocked, the connection goes back to the pool; otherwise it must not go back
        // holding the lock: closing it releases the lock.
        if !self.released {
            self.conn.client = None;
        }
    }
}

fn encode(call: &Call) -> Result<String, StoreError> {
    serde_json::to_string(call).map_err(|_| StoreError::Corrupt(call.id.to_string()))
}

fn decode(record: &str, version: i64) -> Result<Versioned, StoreError> {
    let call =
        serde_json::from_str(record).map_err(|e| StoreError::Corrupt(format!("calls: {e}")))?;
    Ok(Versioned {
        call,
        version: version as u64,
    })
}

fn rows_to_calls(rows: &[tokio_postgres::Row]) -> Result<Vec<Versioned>, StoreError> {
    rows.iter()
        .map(|row| {
            let record: String = row.try_get("record").map_err(unavailable)?;
            let version: i64 = row.try_get("version").map_err(unavailable)?;
            decode(&record, version)
        })
        .collect()
}

impl Pg {
    /// Creates the call `make` builds from a fresh id, unless the receiver is busy or already
    /// ringing the caller. The new call comes back locked: announce it, then release.
    pub async fn create_call(
        &self,
        caller_id: &str,
        receiver_id: &str,
        make: impl FnOnce(u64) -> Call,
    ) -> Result<Created<'_>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.client()?.transaction().await.map_err(unavailable)?;
        let mut parties = [caller_id, receiver_id];
        parties.sort_unstable();
        for uid in parties {
            tx.execute("SELECT pg_advisory_xact_lock(1, hashtext($1))", &[&uid])
                .await
                .map_err(unavailable)?;
        }
        let glare = tx
            .query_opt(
                "SELECT record, version FROM calls WHERE live AND status = 'ringing'
                 AND caller_id = $1 AND receiver_id = $2 LIMIT 1",
                &[&receiver_id, &caller_id],
            )
            .await
            .map_err(unavailable)?;
        if let Some(row) = glare {
            let existing = rows_to_calls(&[row])?.remove(0);
            return Ok(Created::Glare(existing.call));
        }
        let busy = tx
            .query_opt(
                "SELECT 1 FROM calls WHERE live AND (caller_id = $1 OR receiver_id = $1) LIMIT 1",
                &[&receiver_id],
            )
            .await
            .map_err(unavailable)?;
        if busy.is_some() {
            return Ok(Created::Busy);
        }
        let row = tx
            .query_one("SELECT nextval(pg_get_serial_sequence('calls', 'id'))", &[])
            .await
            .map_err(unavailable)?;
        let id: i64 = row.try_get(0).map_err(unavailable)?;
        let call = make(id as u64);
        // Session-level: still held after the commit, until the call is announced.
        tx.execute("SELECT pg_advisory_lock($1)", &[&id])
            .await
            .map_err(unavailable)?;
        tx.execute(
            "INSERT INTO calls (id, caller_id, receiver_id, live, status, ring_deadline_ms,
                                version, record)
             VALUES ($1, $2, $3, true, $4, $5, 1, $6)",
            &[
                &id,
                &caller_id,
                &receiver_id,
                &call.status.as_str(),
                &(call.ring_deadline_ms as i64),
                &encode(&call)?,
            ],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let versioned = Versioned { call, version: 1 };
        let locked = Locked {
            conn,
            id,
            released: false,
        };
        Ok(Created::New(locked, versioned))
    }

    /// Takes call `id`'s lock and reads it; `None` (and no lock) if there is no such call.
    pub async fn lock_call(&self, id: u64) -> Result<Option<(Locked<'_>, Versioned)>, StoreError> {
        let id = i64::try_from(id).map_err(|_| StoreError::Corrupt(id.to_string()))?;
        let mut conn = self.conn().await?;
        let client = conn.client()?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&id])
            .await
            .map_err(unavailable)?;
        let mut locked = Locked {
            conn,
            id,
            released: false,
        };
        let rows = locked
            .conn
            .client()?
            .query("SELECT record, version FROM calls WHERE id = $1", &[&id])
            .await
            .map_err(unavailable)?;
        match rows_to_calls(&rows)?.pop() {
            Some(current) => Ok(Some((locked, current))),
            None => {
                locked.release().await;
                Ok(None)
            }
        }
    }

    pub async fn call(&self, id: u64) -> Result<Option<Versioned>, StoreError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let mut conn = self.conn().await?;
        let rows = conn
            .client()?
            .query("SELECT record, version FROM calls WHERE id = $1", &[&id])
            .await
            .map_err(unavailable)?;
        Ok(rows_to_calls(&rows)?.pop())
    }

    /// Every ringing or active call.
    pub async fn live_calls(&self) -> Result<Vec<Versioned>, StoreError> {
        let mut conn = self.conn().await?;
        let rows = conn
            .client()?
            .query("SELECT record, version FROM calls WHERE live", &[])
            .await
            .map_err(unavailable)?;
        rows_to_calls(&rows)
    }

    /// Ringing calls whose ring deadline is at or before `now_ms`.
    pub async fn overdue_ringing(&self, now_ms: u64) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.conn().await?;
        let rows = conn
            .client()?
            .query(
                "SELECT id FROM calls WHERE live AND status = $1 AND ring_deadline_ms <= $2",
                &[&Status::Ringing.as_str(), &(now_ms as i64)],
            )
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| Ok(row.try_get::<_, i64>(0).map_err(unavailable)? as u64))
            .collect()
    }

    /// A user's calls, newest first, with ids below `before` if given.
    pub async fn call_history(
        &self,
        uid: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Call>, StoreError> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = limit as i64;
        let mut conn = self.conn().await?;
        let rows = conn
            .client()?
            .query(
                "SELECT record, version FROM (
                    (SELECT id, record, version FROM calls
                     WHERE caller_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3)
                    UNION
                    (SELECT id, record, version FROM calls
                     WHERE receiver_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3)
                 ) AS mine ORDER BY id DESC LIMIT $3",
                &[&uid, &before, &limit],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows_to_calls(&rows)?.into_iter().map(|v| v.call).collect())
    }
}
