//! The source of truth: a `users` table in SQLite or PostgreSQL, and a count
//! of every statement the service sends it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::StoreKey;
use cachet::outbox::Outbox;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Postgres, QueryBuilder, Sqlite};

/// Users are spread over this many tenants: user `id` belongs to tenant
/// `id % TENANTS`, in the seed and in the cache's groups alike.
pub(crate) const TENANTS: u64 = 16;

/// The tenant of user `id`.
pub(crate) fn tenant_of(id: u64) -> u64 {
    id % TENANTS
}

/// A row of `users`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct User {
    pub(crate) id: u64,
    pub(crate) tenant: u64,
    pub(crate) name: String,
    pub(crate) email: String,
}

type Row = (i64, i64, String, String);

impl User {
    fn from_row((id, tenant, name, email): Row) -> Self {
        Self {
            id: id as u64,
            tenant: tenant as u64,
            name,
            email,
        }
    }
}

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Statement counters.
#[derive(Debug, Default)]
struct Counters {
    /// Every statement sent after startup (transaction control included).
    queries: AtomicU64,
    /// The `SELECT`s of users among them.
    reads: AtomicU64,
}

/// The database: a pool and the counters of what went through it.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    pool: Pool,
    counters: Arc<Counters>,
    /// Added after each read returns (a remote database's round trip).
    read_latency: Duration,
}

const COLUMNS: &str = "id, tenant, name, email";

impl Db {
    /// A SQLite database in the file `path` (created if missing), in WAL mode
    /// so that readers do not wait for the writer.
    pub(crate) async fn sqlite(path: &Path, read_latency: Duration) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
        Ok(Self::new(Pool::Sqlite(pool), read_latency))
    }

    /// A PostgreSQL database.
    pub(crate) async fn postgres(url: &str, read_latency: Duration) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .context("cannot connect to PostgreSQL (--database-url)")?;
        Ok(Self::new(Pool::Postgres(pool), read_latency))
    }

    fn new(pool: Pool, read_latency: Duration) -> Self {
        Self {
            pool,
            counters: Arc::default(),
            read_latency,
        }
    }

    /// The PostgreSQL pool, if that is the database.
    pub(crate) fn pg_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            Pool::Sqlite(_) => None,
        }
    }

    /// Statements sent since startup.
    pub(crate) fn queries(&self) -> u64 {
        self.counters.queries.load(Ordering::Relaxed)
    }

    /// User `SELECT`s sent since startup.
    pub(crate) fn reads(&self) -> u64 {
        self.counters.reads.load(Ordering::Relaxed)
    }

    fn count(&self, statements: u64) {
        self.counters
            .queries
            .fetch_add(statements, Ordering::Relaxed);
    }

    async fn after_read(&self) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.count(1);
        if !self.read_latency.is_zero() {
            tokio::time::sleep(self.read_latency).await;
        }
    }

    /// Creates `users` if missing and inserts users `1..=n` that are not there
    /// (existing rows are kept). Not counted.
    pub(crate) async fn seed(&self, n: u64) -> Result<()> {
        let n = i64::try_from(n).context("--users")?;
        let create = "CREATE TABLE IF NOT EXISTS users (\
                      id BIGINT PRIMARY KEY, \
                      tenant BIGINT NOT NULL, \
                      name TEXT NOT NULL, \
                      email TEXT NOT NULL)";
        let tenants = TENANTS as i64;
        match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query(create).execute(pool).await?;
                sqlx::query(
                    "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?1) \
                     INSERT OR IGNORE INTO users (id, tenant, name, email) \
                     SELECT n, n % ?2, 'user ' || n, 'user' || n || '@example.com' FROM seq",
                )
                .bind(n)
                .bind(tenants)
                .execute(pool)
                .await?;
            }
            Pool::Postgres(pool) => {
                sqlx::query(create).execute(pool).await?;
                sqlx::query(
                    "INSERT INTO users (id, tenant, name, email) \
                     SELECT g, g % $2, 'user ' || g, 'user' || g || '@example.com' \
                     FROM generate_series(1, $1::bigint) AS g \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(n)
                .bind(tenants)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// One user, by id.
    pub(crate) async fn user(&self, id: u64) -> Result<Option<User>, sqlx::Error> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
        let row: Option<Row> = match &self.pool {
            Pool::Sqlite(pool) => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?,
            Pool::Postgres(pool) => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?,
        };
        self.after_read().await;
        Ok(row.map(User::from_row))
    }

    /// The users among `ids` that exist, in one `SELECT … WHERE id IN (…)`.
    pub(crate) async fn users(&self, ids: &[u64]) -> Result<HashMap<u64, User>, sqlx::Error> {
        let ids: Vec<i64> = ids
            .iter()
            .filter_map(|&id| i64::try_from(id).ok())
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let head = format!("SELECT {COLUMNS} FROM users WHERE id IN (");
        let rows: Vec<Row> = match &self.pool {
            Pool::Sqlite(pool) => {
                let mut q = QueryBuilder::<Sqlite>::new(head);
                let mut list = q.separated(", ");
                for id in &ids {
                    list.push_bind(*id);
                }
                q.push(")");
                q.build_query_as().fetch_all(pool).await?
            }
            Pool::Postgres(pool) => {
                let mut q = QueryBuilder::<Postgres>::new(head);
                let mut list = q.separated(", ");
                for id in &ids {
                    list.push_bind(*id);
                }
                q.push(")");
                q.build_query_as().fetch_all(pool).await?
            }
        };
        self.after_read().await;
        Ok(rows
            .into_iter()
            .map(|row| {
                let user = User::from_row(row);
                (user.id, user)
            })
            .collect())
    }

    /// Sets user `id`'s email; returns the updated row, `None` if there is no
    /// such user. On PostgreSQL with `outbox`, the invalidation of `key` is
    /// recorded in the same transaction as the `UPDATE`.
    pub(crate) async fn set_email(
        &self,
        id: u64,
        email: &str,
        outbox: Option<(&Outbox, &StoreKey)>,
    ) -> Result<Option<User>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let sql = format!("UPDATE users SET email = $1 WHERE id = $2 RETURNING {COLUMNS}");
        let row: Option<Row> = match (&self.pool, outbox) {
            (Pool::Sqlite(pool), _) => {
                self.count(1);
                sqlx::query_as(&sql)
                    .bind(email)
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
            }
            (Pool::Postgres(pool), None) => {
                self.count(1);
                sqlx::query_as(&sql)
                    .bind(email)
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
            }
            (Pool::Postgres(pool), Some((outbox, key))) => {
                // BEGIN, UPDATE, the outbox's INSERT, COMMIT or ROLLBACK.
                self.count(4);
                let mut tx = pool.begin().await?;
                let row: Option<Row> = sqlx::query_as(&sql)
                    .bind(email)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if row.is_some() {
                    outbox.record(&mut tx, key).await?;
                    tx.commit().await?;
                } else {
                    self.counters.queries.fetch_sub(1, Ordering::Relaxed);
                    tx.rollback().await?;
                }
                row
            }
        };
        Ok(row.map(User::from_row))
    }

    /// Closes the pool.
    pub(crate) async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }
}
