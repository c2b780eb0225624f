//! PostgreSQL, for what cluster nodes share. A few connections are kept and replaced when they
//! break, so the database going away makes requests fail fast with
//! [`StoreError::Unavailable`] (503) and coming back heals by itself. The schema is versioned:
//! [`MIGRATIONS`] run in order at startup, once per database, under an advisory lock so nodes
//! starting together do not race.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::{Client, NoTls, Statement};
use tracing::{info, warn};

mod calls;
mod push;
mod sessions;

pub use calls::{Created, Locked, Outgoing, Versioned};
pub use push::PushLease;
pub use sessions::StoredSession;

use super::{Conversation, StoreError};
use crate::sync::lock;

/// How long a starting node waits for PostgreSQL to accept it.
const START_WAIT: Duration = Duration::from_secs(30);

/// The schema, one step per version. Never edit a step that has shipped: add one.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE conversations (
            id text PRIMARY KEY,
            members text[] NOT NULL,
            updated_at text NOT NULL,
            version bigint NOT NULL
        )",
    ),
    (
        2,
        "CREATE TABLE calls (
            id bigserial PRIMARY KEY,
            caller_id text NOT NULL,
            receiver_id text NOT NULL,
            live boolean NOT NULL,
            status text NOT NULL,
            ring_deadline_ms bigint NOT NULL,
            version bigint NOT NULL,
            record text NOT NULL
        );
        CREATE INDEX calls_by_caller ON calls (caller_id, id);
        CREATE INDEX calls_by_receiver ON calls (receiver_id, id);
        CREATE INDEX calls_live ON calls (id) WHERE live;",
    ),
    (
        3,
        "CREATE TABLE call_events (
            id bigserial PRIMARY KEY,
            call_id bigint NOT NULL,
            user_id text NOT NULL,
            payload text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX call_events_by_call ON call_events (call_id, id);",
    ),
    (
        4,
        "CREATE TABLE sessions (
            client_id text PRIMARY KEY,
            record text NOT NULL,
            node text,
            expires_ms bigint NOT NULL,
            parted_ms bigint
        );
        CREATE INDEX sessions_by_node ON sessions (node);
        CREATE INDEX sessions_by_expiry ON sessions (expires_ms);",
    ),
    (
        5,
        "CREATE TABLE push_jobs (
            id bigserial PRIMARY KEY,
            call_id bigint NOT NULL,
            deadline_ms bigint NOT NULL,
            body text NOT NULL
        );
        CREATE INDEX push_jobs_by_call ON push_jobs (call_id, id);",
    ),
    (6, "ALTER TABLE call_events ADD COLUMN expires_ms bigint"),
    (
        7,
        // Broker-side client ids are `<user id>.<client id>`, and user ids have no dot.
        "ALTER TABLE sessions ADD COLUMN user_id text
            GENERATED ALWAYS AS (split_part(client_id, '.', 1)) STORED;
        CREATE INDEX sessions_by_user ON sessions (user_id, parted_ms);",
    ),
];

/// Advisory locks: calls take their id (the one-bigint form), users `(1, hash)` and
/// conversations `(2, hash)` (the two-int form, which never meets the other), and migrations
/// this fixed number, far past any call id.
const MIGRATION_LOCK: i64 = 0x6361_6c6c_6275_7301;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections a node opens at most (PostgreSQL's default `max_connections` is 100: room for
/// six nodes); requests beyond wait for one, up to [`POOL_WAIT`].
pub const MAX_CONNECTIONS: usize = 16;
const POOL_WAIT: Duration = Duration::from_secs(5);

/// A database error as the API reports it (503): with the server's own words when it gave
/// any (tokio-postgres's summary alone says only "db error").
fn unavailable(e: tokio_postgres::Error) -> StoreError {
    let detail = match std::error::Error::source(&e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    };
    StoreError::Unavailable(detail)
}

/// The database behind a cluster.
pub struct Pg {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Pooled>>,
    slots: tokio::sync::Semaphore,
}

/// A connection and the statements prepared on it (parsed and planned once per connection;
/// prepared statements also keep pipelined queries in the order they are polled).
struct Pooled {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

/// A connection, back to the pool when dropped unless it broke or was discarded.
struct Conn<'a> {
    pg: &'a Pg,
    pooled: Option<Pooled>,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            let mut idle = lock(&self.pg.idle);
            if !pooled.client.is_closed() {
                idle.push(pooled);
            }
        }
    }
}

impl Conn<'_> {
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        let pooled = self.pooled.as_mut();
        let pooled = pooled.ok_or_else(|| StoreError::Unavailable("no connection".into()))?;
        Ok(&mut pooled.client)
    }

    /// `sql` prepared on this connection (once).
    async fn prepare(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        let pooled = self.pooled.as_mut();
        let pooled = pooled.ok_or_else(|| StoreError::Unavailable("no connection".into()))?;
        if let Some(statement) = pooled.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = pooled.client.prepare(sql).await.map_err(unavailable)?;
        pooled.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Closes the connection instead of returning it (it may hold a lock).
    fn discard(&mut self) {
        self.pooled = None;
    }
}

/// A conversation as written, with what it replaced.
pub struct Replaced {
    pub conversation: Conversation,
    pub previous: Option<BTreeSet<String>>,
}

impl Pg {
    /// Connects to `url` and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Arc<Pg>, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("bad --database URL: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("callbus");
        let pg = Arc::new(Pg {
            config,
            idle: Mutex::default(),
            slots: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
        });
        // PostgreSQL may be starting too (a fresh container, crash recovery): wait for it.
        pg.at_start(|| pg.migrate()).await?;
        Ok(pg)
    }

    /// Runs `step`, a starting node's read or idempotent write, until the database answers
    /// it, for up to [`START_WAIT`]: a node that starts while PostgreSQL is starting or
    /// restarting waits for it at every step, not only the first.
    pub async fn at_start<T, F>(&self, mut step: impl FnMut() -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let mut told = false;
        loop {
            match step().await {
                Ok(done) => return Ok(done),
                Err(StoreError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                    if !told {
                        warn!(error = %e, "PostgreSQL is not ready yet; waiting for it");
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn conn(&self) -> Result<Conn<'_>, StoreError> {
        let slot = tokio::time::timeout(POOL_WAIT, self.slots.acquire())
            .await
            .map_err(|_| StoreError::Unavailable("every database connection is busy".into()))?
            .map_err(|_| StoreError::Unavailable("the pool is closed".into()))?;
        let reused = {
            let mut idle = lock(&self.idle);
            std::iter::from_fn(|| idle.pop()).find(|c| !c.client.is_closed())
        };
        let pooled = match reused {
            Some(pooled) => pooled,
            None => {
                let connecting = self.config.connect(NoTls);
                let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable("timed out connecting to PostgreSQL".into())
                    })?
                    .map_err(unavailable)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        warn!(error = %e, "PostgreSQL connection ended");
                    }
                });
                Pooled {
                    client,
                    prepared: HashMap::new(),
                }
            }
        };
        Ok(Conn {
            pg: self,
            pooled: Some(pooled),
            _slot: slot,
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.client()?.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(unavailable)?;
        let row = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let current: i32 = row.try_get(0).map_err(unavailable)?;
        if let Some((newest, _)) = MIGRATIONS.last() {
            if current > *newest {
                return Err(StoreError::Config(format!(
                    "the database schema is version {current}, newer than this build's {newest}"
                )));
            }
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(unavailable)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(unavailable)?;
            info!(version, "database schema migrated");
        }
        tx.commit().await.map_err(unavailable)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.conn().await else {
            return false;
        };
        let Ok(client) = conn.client() else {
            return false;
        };
        let query = client.simple_query("SELECT 1");
        matches!(
            tokio::time::timeout(CONNECT_TIMEOUT, query).await,
            Ok(Ok(_))
        )
    }

    /// Every conversation with its version.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let mut conn = self.conn().await?;
        let rows = conn
            .client()?
            .query(
                "SELECT id, members, updated_at, version FROM conversations",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let read = |row: &tokio_postgres::Row| -> Result<Conversation, tokio_postgres::Error> {
            Ok(Conversation {
                id: row.try_get(0)?,
                members: row.try_get::<_, Vec<String>>(1)?.into_iter().collect(),
                updated_at: row.try_get(2)?,
                version: row.try_get::<_, i64>(3)? as u64,
            })
        };
        rows.iter()
            .map(|row| read(row).map_err(|e| StoreError::Corrupt(format!("conversations: {e}"))))
            .collect()
    }

    /// Creates or replaces a conversation's members (committed when this returns).
    pub async fn replace_conversation(
        &self,
        id: &str,
        members: &BTreeSet<String>,
        updated_at: &str,
    ) -> Result<Replaced, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.client()?.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock(2, hashtext($1))", &[&id])
            .await
            .map_err(unavailable)?;
        let previous = tx
            .query_opt("SELECT members FROM conversations WHERE id = $1", &[&id])
            .await
            .map_err(unavailable)?
            .map(|row| row.try_get::<_, Vec<String>>(0))
            .transpose()
            .map_err(unavailable)?
            .map(|members| members.into_iter().collect());
        let list: Vec<&String> = members.iter().collect();
        let row = tx
            .query_one(
                "INSERT INTO conversations (id, members, updated_at, version)
                 VALUES ($1, $2, $3, 1)
                 ON CONFLICT (id) DO UPDATE
                 SET members = $2, updated_at = $3, version = conversations.version + 1
                 RETURNING version",
                &[&id, &list, &updated_at],
            )
            .await
            .map_err(unavailable)?;
        let version: i64 = row.try_get(0).map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Replaced {
            conversation: Conversation {
                id: id.to_owned(),
                members: members.clone(),
                updated_at: updated_at.to_owned(),
                version: version as u64,
            },
            previous,
        })
    }
}
