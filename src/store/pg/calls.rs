//! Calls in PostgreSQL. Every change to a call happens under that call's advisory lock, held on
//! one connection ([`Locked`]) from the read until its events are announced, so changes to one
//! call are made and announced one at a time in one order, whichever nodes make them. A new
//! call is decided under both parties' locks, so two initiates racing on two nodes cannot both
//! find the receiver free (busy) or both miss each other (glare).

use serde::{Deserialize, Serialize};

use tokio_postgres::Statement;

use super::{unavailable, Conn, Pg};
use crate::model::call::{Call, Status};
use crate::store::{PushJob, StoreError};

pub(super) type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);

const LOCK: &str = "SELECT pg_advisory_lock($1)::text = ''";
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1)";
const UNLOCK: &str = "SELECT pg_advisory_unlock($1)";
const READ_EVENTS: &str =
    "SELECT id, user_id, payload, expires_ms FROM call_events WHERE call_id = $1 ORDER BY id";
const READ_CALL: &str = "SELECT record, version FROM calls WHERE id = $1";
const UPDATE_CALL: &str =
    "UPDATE calls SET live = $2, status = $3, version = $4, record = $5 WHERE id = $1";
const INSERT_EVENTS: &str = "INSERT INTO call_events (call_id, user_id, payload, expires_ms)
     SELECT $1, u, p, x FROM unnest($2::text[], $3::text[], $4::bigint[])
         WITH ORDINALITY AS e(u, p, x, n)
     ORDER BY n
     RETURNING id";
/// Both parties' locks, in the order given (sorted by the caller, so racing initiates cannot
/// deadlock): PostgreSQL evaluates a select list left to right.
const LOCK_USERS: &str =
    "SELECT pg_advisory_xact_lock(1, hashtext($1)), pg_advisory_xact_lock(1, hashtext($2))";
const GLARE: &str = "SELECT record, version FROM calls WHERE live AND status = 'ringing'
     AND caller_id = $1 AND receiver_id = $2 LIMIT 1";
const CALLING: &str = "SELECT record, version FROM calls WHERE live AND status = 'ringing'
     AND caller_id = $1 LIMIT 1";
const BUSY: &str =
    "SELECT 1 FROM calls WHERE live AND (caller_id = $1 OR receiver_id = $1) LIMIT 1";
const INSERT_PUSH: &str = "INSERT INTO push_jobs (call_id, deadline_ms, body) VALUES ($1, $2, $3)";
const NEXT_ID: &str = "SELECT nextval(pg_get_serial_sequence('calls', 'id'))";
const INSERT_CALL: &str = "INSERT INTO calls (id, caller_id, receiver_id, live, status,
                                   ring_deadline_ms, version, record)
     VALUES ($1, $2, $3, true, $4, $5, 1, $6)";

/// A call and how many times it was written (nodes keep the newest they hear of).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versioned {
    pub call: Call,
    pub version: u64,
}

/// An event for `user_id`'s notifications, kept in the outbox (in the same transaction as the
/// change it announces) until it has been published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub user_id: String,
    pub payload: String,
    /// Not worth delivering after this (Unix ms): a call's ring.
    pub expires_ms: Option<u64>,
}

/// What creating a call found (returned once per initiate, never stored).
#[allow(clippy::large_enum_variant)]
pub enum Created<'a> {
    New(Locked<'a>, Versioned),
    /// The receiver is in a ringing or active call.
    Busy,
    /// The receiver is already ringing the caller: that call.
    Glare(Call),
    /// The caller is already ringing someone: that call.
    Calling(Call),
}

/// A connection holding one call's lock, with the call's events not yet announced: any a node
/// left when it died mid-announcement, then this change's, in order. Publish them, then
/// [`Locked::announced`]. Dropped without that, it closes its connection, which releases the
/// lock and leaves the events for the next holder.
pub struct Locked<'a> {
    conn: Conn<'a>,
    id: i64,
    pending: Vec<(i64, Outgoing)>,
    released: bool,
}

impl<'a> Locked<'a> {
    /// Takes the lock on `conn` (waiting, or only if free), then reads the call and what the
    /// outbox holds for it (both queries in one round trip).
    async fn take(
        conn: Conn<'a>,
        id: i64,
        wait: bool,
    ) -> Result<Option<(Self, Option<Versioned>)>, StoreError> {
        let mut locked = Locked {
            conn,
            id,
            pending: Vec::new(),
            released: true, // nothing to release yet
        };
        let lock = locked
            .conn
            .prepare(if wait { LOCK } else { TRY_LOCK })
            .await?;
        let read_events = locked.conn.prepare(READ_EVENTS).await?;
        let read_call = locked.conn.prepare(READ_CALL).await?;
        let params: [Param; 1] = [&id];
        let client = locked.conn.client()?;
        let row = client
            .query_one(&lock, &params)
            .await
            .map_err(unavailable)?;
        // pg_advisory_lock returns void (as text: ''), so both forms answer true when held.
        if !row.try_get::<_, bool>(0).map_err(unavailable)? {
            return Ok(None);
        }
        locked.released = false;
        let (events, call) = tokio::try_join!(
            client.query(&read_events, &params),
            client.query(&read_call, &params),
        )
        .map_err(unavailable)?;
        for row in events {
            let expires: Option<i64> = row.try_get(3).map_err(unavailable)?;
            let event = Outgoing {
                user_id: row.try_get(1).map_err(unavailable)?,
                payload: row.try_get(2).map_err(unavailable)?,
                expires_ms: expires.map(|ms| ms as u64),
            };
            locked
                .pending
                .push((row.try_get(0).map_err(unavailable)?, event));
        }
        let call = rows_to_calls(&call)?.pop();
        Ok(Some((locked, call)))
    }

    /// Writes the call's next state and its events in one transaction (the lock is held:
    /// nobody else writes the call meanwhile).
    pub async fn update(
        &mut self,
        next: &Versioned,
        events: &[Outgoing],
        push: Option<&PushJob>,
    ) -> Result<(), StoreError> {
        let record = encode(&next.call)?;
        let id = self.id;
        let update = self.conn.prepare(UPDATE_CALL).await?;
        let insert = self.conn.prepare(INSERT_EVENTS).await?;
        let insert_push = self.conn.prepare(INSERT_PUSH).await?;
        let tx = self
            .conn
            .client()?
            .transaction()
            .await
            .map_err(unavailable)?;
        let (live, status, version) = (
            !next.call.status.is_terminal(),
            next.call.status.as_str(),
            next.version as i64,
        );
        let params: [Param; 5] = [&id, &live, &status, &version, &record];
        // One round trip for all.
        let (_, ids, _) = tokio::try_join!(
            async { tx.execute(&update, &params).await.map_err(unavailable) },
            insert_events(&tx, &insert, id, events),
            queue_push(&tx, &insert_push, id, push),
        )?;
        tx.commit().await.map_err(unavailable)?;
        self.pending
            .extend(ids.into_iter().zip(events.iter().cloned()));
        Ok(())
    }

    /// The events to publish, in order.
    pub fn pending(&self) -> impl Iterator<Item = &Outgoing> {
        self.pending.iter().map(|(_, e)| e)
    }

    /// The pending events were published: out of the outbox, and the lock goes, in one round
    /// trip. The delete need not wait for the disk: lost in a crash, the events are published
    /// again (at least once), which the outbox allows anyway.
    pub async fn announced(mut self) {
        let ids: Vec<String> = self.pending.iter().map(|(id, _)| id.to_string()).collect();
        let delete = match ids.is_empty() {
            true => String::new(),
            false => format!(
                "BEGIN; SET LOCAL synchronous_commit TO off;
                 DELETE FROM call_events WHERE id IN ({}); COMMIT;",
                ids.join(",")
            ),
        };
        // Ids are integers this code formatted: nothing here comes from a client.
        let batch = format!("{delete} SELECT pg_advisory_unlock({})", self.id);
        if let Ok(client) = self.conn.client() {
            self.released = client.batch_execute(&batch).await.is_ok();
        }
    }

    /// Lets the lock go, leaving any pending events for the next holder.
    pub async fn release(mut self) {
        let id = self.id;
        let Ok(unlock) = self.conn.prepare(UNLOCK).await else {
            return;
        };
        if let Ok(client) = self.conn.client() {
            self.released = client.execute(&unlock, &[&id]).await.is_ok();
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Unlocked, the connection goes back to the pool; otherwise it must not go back
        // holding the lock: closing it releases the lock.
        if !self.released {
            self.conn.discard();
        }
    }
}

/// Inserts `events` in order, in one statement; their ids, ascending.
async fn insert_events(
    tx: &tokio_postgres::Transaction<'_>,
    insert: &Statement,
    call_id: i64,
    events: &[Outgoing],
) -> Result<Vec<i64>, StoreError> {
    let users: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
    let expiries: Vec<Option<i64>> = events
        .iter()
        .map(|e| e.expires_ms.map(|ms| ms as i64))
        .collect();
    let params: [Param; 4] = [&call_id, &users, &payloads, &expiries];
    let rows = tx.query(insert, &params).await.map_err(unavailable)?;
    let mut ids = rows
        .iter()
        .map(|row| row.try_get(0).map_err(unavailable))
        .collect::<Result<Vec<i64>, _>>()?;
    // Ids follow the insertion order, which follows n.
    ids.sort_unstable();
    Ok(ids)
}

/// Queues a push job in the transaction of the change that caused it.
async fn queue_push(
    tx: &tokio_postgres::Transaction<'_>,
    insert: &Statement,
    call_id: i64,
    push: Option<&PushJob>,
) -> Result<(), StoreError> {
    let Some(job) = push else { return Ok(()) };
    let (deadline, body) = (job.deadline_ms as i64, job.body.to_string());
    let params: [Param; 3] = [&call_id, &deadline, &body];
    tx.execute(insert, &params).await.map_err(unavailable)?;
    Ok(())
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
    /// Creates the call `make` builds from a fresh id, with its events, unless the receiver is
    /// busy or already ringing the caller. The new call comes back locked: announce it.
    pub async fn create_call(
        &self,
        caller_id: &str,
        receiver_id: &str,
        make: impl FnOnce(u64) -> (Call, Vec<Outgoing>, Option<PushJob>),
    ) -> Result<Created<'_>, StoreError> {
        let mut conn = self.conn().await?;
        let mut statements = Vec::with_capacity(9);
        for sql in [
            LOCK_USERS,
            GLARE,
            CALLING,
            BUSY,
            NEXT_ID,
            LOCK,
            INSERT_CALL,
            INSERT_EVENTS,
            INSERT_PUSH,
        ] {
            statements.push(conn.prepare(sql).await?);
        }
        let [lock_users, glare, calling, busy, next_id, lock_call, insert_call, insert_events_st, insert_push] =
            <[Statement; 9]>::try_from(statements)
                .map_err(|_| StoreError::Corrupt("prepared statements".into()))?;
        let tx = conn.client()?.transaction().await.map_err(unavailable)?;
        let mut parties = [caller_id, receiver_id];
        parties.sort_unstable();
        let users: [Param; 2] = [&parties[0], &parties[1]];
        let pair: [Param; 2] = [&receiver_id, &caller_id];
        let receiver: [Param; 1] = [&receiver_id];
        let caller: [Param; 1] = [&caller_id];
        // One round trip, run in this order: both parties' locks, then, under them, glare,
        // the caller's own ringing call, busy and a fresh id.
        let (_, glare, calling, busy, next) = tokio::try_join!(
            tx.execute(&lock_users, &users),
            tx.query_opt(&glare, &pair),
            tx.query_opt(&calling, &caller),
            tx.query_opt(&busy, &receiver),
            tx.query_one(&next_id, &[]),
        )
        .map_err(unavailable)?;
        if let Some(row) = glare {
            let existing = rows_to_calls(&[row])?.remove(0);
            return Ok(Created::Glare(existing.call));
        }
        if let Some(row) = calling {
            let existing = rows_to_calls(&[row])?.remove(0);
            return Ok(Created::Calling(existing.call));
        }
        if busy.is_some() {
            return Ok(Created::Busy);
        }
        let id: i64 = next.try_get(0).map_err(unavailable)?;
        let (call, events, push) = make(id as u64);
        let (status, deadline, record) = (
            call.status.as_str(),
            call.ring_deadline_ms as i64,
            encode(&call)?,
        );
        let call_lock: [Param; 1] = [&id];
        let row: [Param; 6] = [&id, &caller_id, &receiver_id, &status, &deadline, &record];
        // One round trip: the call's lock (session-level: held after the commit, until the
        // call is announced), the call and its events; then the commit.
        let written = async {
            tokio::try_join!(
                async {
                    tx.query_one(&lock_call, &call_lock)
                        .await
                        .map_err(unavailable)
                },
                async { tx.execute(&insert_call, &row).await.map_err(unavailable) },
                insert_events(&tx, &insert_events_st, id, &events),
                queue_push(&tx, &insert_push, id, push.as_ref()),
            )
        };
        let committed = match written.await {
            Ok((_, _, event_ids, _)) => tx.commit().await.map_err(unavailable).map(|_| event_ids),
            Err(e) => {
                drop(tx);
                Err(e)
            }
        };
        let event_ids = match committed {
            Ok(ids) => ids,
            Err(e) => {
                // The connection may hold the call's lock: it must not go back to the pool.
                conn.discard();
                return Err(e);
            }
        };
        let versioned = Versioned { call, version: 1 };
        let locked = Locked {
            conn,
            id,
            pending: event_ids.into_iter().zip(events).collect(),
            released: false,
        };
        Ok(Created::New(locked, versioned))
    }

    /// Takes call `id`'s lock and reads it; `None` (and no lock) if there is no such call.
    pub async fn lock_call(&self, id: u64) -> Result<Option<(Locked<'_>, Versioned)>, StoreError> {
        self.lock_call_with(id, true).await
    }

    /// Like [`Pg::lock_call`], but `None` at once if another holds the lock.
    pub async fn try_lock_call(
        &self,
        id: u64,
    ) -> Result<Option<(Locked<'_>, Versioned)>, StoreError> {
        self.lock_call_with(id, false).await
    }

    async fn lock_call_with(
        &self,
        id: u64,
        wait: bool,
    ) -> Result<Option<(Locked<'_>, Versioned)>, StoreError> {
        let id = i64::try_from(id).map_err(|_| StoreError::Corrupt(id.to_string()))?;
        let conn = self.conn().await?;
        match Locked::take(conn, id, wait).await? {
            Some((locked, Some(current))) => Ok(Some((locked, current))),
            Some((locked, None)) => {
                locked.release().await;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Calls with events older than `secs` seconds still in the outbox: their announcer died.
    pub async fn stranded_calls(&self, secs: f64) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.conn().await?;
        let rows = (conn.client()?)
            .query(
                "SELECT DISTINCT call_id FROM call_events
                 WHERE created_at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| Ok(row.try_get::<_, i64>(0).map_err(unavailable)? as u64))
            .collect()
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
