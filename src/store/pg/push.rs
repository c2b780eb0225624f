//! Push jobs of cluster mode: written with the call change that caused them, taken by any
//! node's push worker. A worker holds its job's row lock (in an open transaction) while it
//! delivers; if its node dies the connection closes, the lock goes, and another node's worker
//! takes the job. Only the oldest job of each call is ever offered, so a call's pushes go out
//! in order whichever nodes deliver them.

use super::{unavailable, Conn, Pg};
use crate::store::{PushJob, StoreError};

const TAKE: &str = "SELECT id, deadline_ms, body FROM push_jobs p
     WHERE NOT EXISTS (SELECT 1 FROM push_jobs q WHERE q.call_id = p.call_id AND q.id < p.id)
     ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED";
const DONE: &str = "DELETE FROM push_jobs WHERE id = $1";

/// A job this node's worker holds until it is delivered or given up ([`PushLease::done`]).
/// Dropped without that, its connection closes and the job is offered again.
pub struct PushLease<'a> {
    conn: Conn<'a>,
    id: i64,
    pub job: PushJob,
    done: bool,
}

impl Pg {
    /// The next job no other worker holds, if any.
    pub async fn take_push(&self) -> Result<Option<PushLease<'_>>, StoreError> {
        let mut conn = self.conn().await?;
        let take = conn.prepare(TAKE).await?;
        conn.client()?
            .batch_execute("BEGIN")
            .await
            .map_err(unavailable)?;
        let row = conn.client()?.query_opt(&take, &[]).await;
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => {
                conn.client()?
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(unavailable)?;
                return Ok(None);
            }
            Err(e) => {
                conn.discard();
                return Err(unavailable(e));
            }
        };
        let read = |row: &tokio_postgres::Row| -> Result<(i64, PushJob), tokio_postgres::Error> {
            let body: String = row.try_get(2)?;
            let job = PushJob {
                deadline_ms: row.try_get::<_, i64>(1)? as u64,
                body: serde_json::from_str(&body).unwrap_or_default(),
            };
            Ok((row.try_get(0)?, job))
        };
        let (id, job) = match read(&row) {
            Ok(read) => read,
            Err(e) => {
                conn.discard();
                return Err(unavailable(e));
            }
        };
        Ok(Some(PushLease {
            conn,
            id,
            job,
            done: false,
        }))
    }
}

impl PushLease<'_> {
    /// The job was delivered or given up: it goes.
    pub async fn done(mut self) -> Result<(), StoreError> {
        let done = self.conn.prepare(DONE).await?;
        let client = self.conn.client()?;
        client
            .execute(&done, &[&self.id])
            .await
            .map_err(unavailable)?;
        client.batch_execute("COMMIT").await.map_err(unavailable)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PushLease<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.discard(); // rolls back: the job is offered again
        }
    }
}
