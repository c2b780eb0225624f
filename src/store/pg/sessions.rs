//! Persistent sessions of cluster mode: one row per broker-side client id with its record
//! (filters), the node holding it live (none while its client is away) and when it expires.
//! A node pushes its live sessions' expiry forward while it runs, so the sessions of a node
//! that died expire one expiry after it stopped doing so.

use super::{unavailable, Pg};
use crate::model::call::now_ms;
use crate::store::{SessionRecord, StoreError};

/// A session as stored, with when its client left (if it did while its node ran) and when it
/// expires.
pub struct StoredSession {
    pub record: SessionRecord,
    pub parted_ms: Option<u64>,
    pub expires_ms: u64,
}

fn encode(record: &SessionRecord) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError::Corrupt(format!("session: {e}")))
}

fn decode(text: &str) -> Result<SessionRecord, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("session: {e}")))
}

/// Rows of `(client_id, record)`.
fn rows_of_sessions(
    rows: Vec<tokio_postgres::Row>,
) -> Result<Vec<(String, SessionRecord)>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let client_id: String = row.try_get(0).map_err(unavailable)?;
        let text: String = row.try_get(1).map_err(unavailable)?;
        out.push((client_id, decode(&text)?));
    }
    Ok(out)
}

impl Pg {
    /// The session stored under `client_id`, unless it expired before `now_ms`.
    pub async fn session(
        &self,
        client_id: &str,
        now_ms: u64,
    ) -> Result<Option<StoredSession>, StoreError> {
        let mut conn = self.conn().await?;
        let sql = "SELECT record, parted_ms, expires_ms FROM sessions
                   WHERE client_id = $1 AND expires_ms > $2";
        let statement = conn.prepare(sql).await?;
        let row = (conn.client()?)
            .query_opt(&statement, &[&client_id, &(now_ms as i64)])
            .await
            .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.try_get(0).map_err(unavailable)?;
        let parted: Option<i64> = row.try_get(1).map_err(unavailable)?;
        let expires: i64 = row.try_get(2).map_err(unavailable)?;
        Ok(Some(StoredSession {
            record: decode(&text)?,
            parted_ms: parted.map(|ms| ms as u64),
            expires_ms: expires as u64,
        }))
    }

    /// Writes a session held live by `node`; whether it is new (was not stored before).
    pub async fn put_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
        node: &str,
        expires_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        // `xmax` is 0 in a row version an INSERT made, and set in one the UPDATE made.
        let sql = "INSERT INTO sessions (client_id, record, node, expires_ms)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (client_id) DO UPDATE
                   SET record = $2, node = $3, expires_ms = $4, parted_ms = NULL
                   RETURNING xmax = 0";
        let statement = conn.prepare(sql).await?;
        let params: [super::calls::Param; 4] =
            [&client_id, &encode(record)?, &node, &(expires_ms as i64)];
        let row = (conn.client()?)
            .query_one(&statement, &params)
            .await
            .map_err(unavailable)?;
        row.try_get(0).map_err(unavailable)
    }

    /// Deletes the sessions of `user_id` beyond the newest `max`, those away longest first
    /// (sessions held live on a node are never among them); what they held.
    pub async fn evict_sessions(
        &self,
        user_id: &str,
        max: usize,
    ) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        let mut conn = self.conn().await?;
        let sql = "DELETE FROM sessions WHERE client_id IN (
                       SELECT client_id FROM sessions
                       WHERE user_id = $1 AND node IS NULL
                       ORDER BY parted_ms NULLS FIRST
                       LIMIT greatest((SELECT count(*) FROM sessions WHERE user_id = $1) - $2, 0)
                       FOR UPDATE SKIP LOCKED)
                   RETURNING client_id, record";
        let statement = conn.prepare(sql).await?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = (conn.client()?)
            .query(&statement, &[&user_id, &max])
            .await
            .map_err(unavailable)?;
        rows_of_sessions(rows)
    }

    /// The session's client left `node`: it expires at `expires_ms` unless another node holds
    /// it by now.
    pub async fn part_session(
        &self,
        client_id: &str,
        node: &str,
        expires_ms: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let sql = "UPDATE sessions SET node = NULL, expires_ms = $3, parted_ms = $4
                   WHERE client_id = $1 AND node = $2";
        let statement = conn.prepare(sql).await?;
        (conn.client()?)
            .execute(
                &statement,
                &[&client_id, &node, &(expires_ms as i64), &(now_ms() as i64)],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes a session; what it held, if it was there.
    pub async fn delete_session(
        &self,
        client_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let sql = "DELETE FROM sessions WHERE client_id = $1 RETURNING record";
        let statement = conn.prepare(sql).await?;
        let row = (conn.client()?)
            .query_opt(&statement, &[&client_id])
            .await
            .map_err(unavailable)?;
        let text = row.map(|r| r.try_get::<_, String>(0)).transpose();
        text.map_err(unavailable)?
            .as_deref()
            .map(decode)
            .transpose()
    }

    /// Pushes the expiry of every session `node` holds live to `expires_ms`.
    pub async fn refresh_sessions(&self, node: &str, expires_ms: u64) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let sql = "UPDATE sessions SET expires_ms = $2 WHERE node = $1";
        let statement = conn.prepare(sql).await?;
        (conn.client()?)
            .execute(&statement, &[&node, &(expires_ms as i64)])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes the sessions that expired before `now_ms` (at most `limit`); what they held.
    pub async fn expire_sessions(
        &self,
        now_ms: u64,
        limit: i64,
    ) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        let mut conn = self.conn().await?;
        let sql = "DELETE FROM sessions WHERE client_id IN (
                       SELECT client_id FROM sessions WHERE expires_ms <= $1 LIMIT $2
                       FOR UPDATE SKIP LOCKED)
                   RETURNING client_id, record";
        let statement = conn.prepare(sql).await?;
        let rows = (conn.client()?)
            .query(&statement, &[&(now_ms as i64), &limit])
            .await
            .map_err(unavailable)?;
        rows_of_sessions(rows)
    }

    /// Marks every session `node` held live as away (a former run of it held them).
    pub async fn part_sessions_of(&self, node: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let sql = "UPDATE sessions SET node = NULL WHERE node = $1";
        (conn.client()?)
            .execute(sql, &[&node])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Drops `filter` from every stored session of `user_id` (broker-side ids are
    /// `<user id>.<client id>`); the client ids that held it.
    pub async fn revoke_filter(
        &self,
        user_id: &str,
        filter: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        let sql = "UPDATE sessions SET record = jsonb_set(record::jsonb, '{filters}',
                       COALESCE((SELECT jsonb_agg(f)
                                 FROM jsonb_array_elements(record::jsonb -> 'filters') f
                                 WHERE f ->> 0 <> $2), '[]'::jsonb))::text
                   WHERE starts_with(client_id, $1 || '.')
                     AND EXISTS (SELECT 1 FROM jsonb_array_elements(record::jsonb -> 'filters') f
                                 WHERE f ->> 0 = $2)
                   RETURNING client_id";
        let statement = conn.prepare(sql).await?;
        let rows = (conn.client()?)
            .query(&statement, &[&user_id, &filter])
            .await
            .map_err(unavailable)?;
        let ids = rows.iter().map(|row| row.try_get::<_, String>(0));
        ids.collect::<Result<_, _>>().map_err(unavailable)
    }
}
