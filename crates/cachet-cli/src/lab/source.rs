//! The lab's source of truth: an `items` table in a private SQLite file or in a
//! schema of its own on PostgreSQL, and [`Db`], the counted handle scenarios
//! read and write it through.
//!
//! Every scenario measures `db_queries` by counting the queries its [`Db`]
//! issues, never by asking the database, so the numbers mean the same on both
//! backends.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
use sqlx::{ConnectOptions as _, Connection as _, Executor as _};

pub(crate) use crate::target::redact_url;

/// A row of the source of truth, and the value the lab caches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) id: i64,
    pub(crate) value: i64,
    pub(crate) payload: String,
}

/// The SQLite database's file name, in its temporary directory.
const SQLITE_FILE: &str = "lab.db";
const CREATE_TABLE: &str =
    "CREATE TABLE items (id BIGINT PRIMARY KEY, value BIGINT NOT NULL, payload TEXT NOT NULL)";
const SELECT_ITEM: &str = "SELECT id, value, payload FROM items WHERE id = $1";
const BUMP_ITEM: &str = "UPDATE items SET value = value + 1 WHERE id = $1";
/// A versioned write (`value` is the row's version): it changes the row only
/// if its version is newer, so applying it twice, or after a newer one,
/// changes nothing.
const APPLY_WRITE: &str = "UPDATE items SET value = $2, payload = $3 WHERE id = $1 AND value < $2";
const SELECT_ALL: &str = "SELECT id, value, payload FROM items";
const SEED_SQLITE: &str = "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $1) \
     INSERT INTO items (id, value, payload) SELECT i, 0, 'item-' || i FROM seq";
const SEED_POSTGRES: &str = "INSERT INTO items (id, value, payload) \
     SELECT i, 0, 'item-' || i FROM generate_series(1::bigint, $1::bigint) AS s(i)";

/// Enough connections that readers rarely queue behind each other, few enough
/// that the lab is a polite guest on a shared PostgreSQL.
const PG_CONNECTIONS: u32 = 8;
/// SQLite serialises writers anyway; more connections only add threads.
const SQLITE_CONNECTIONS: u32 = 4;
/// Long enough that two writers never see `SQLITE_BUSY`, bounded so a stuck
/// database still ends the run.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker may wait for a connection. The lab's workers outnumber
/// its connections on purpose, so a wait of seconds on a loaded machine is
/// part of the run (and of its figures), not a warning per acquire: sqlx's
/// slow-acquire warning is set to this limit too.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same expression against whichever pool is in use: the SQL is shared,
/// only the static types differ.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

/// The source of truth of one lab run, torn down by [`Source::close`].
#[derive(Debug)]
pub(crate) struct Source {
    pool: Pool,
    description: String,
    /// The PostgreSQL schema this run created and must drop, and how to connect
    /// to drop it.
    schema: Option<(String, PgConnectOptions)>,
    /// Keeps the SQLite file alive for the run and deletes it afterwards.
    _dir: Option<tempfile::TempDir>,
}

impl Source {
    /// Opens a private SQLite database in a temporary directory, or, given a
    /// `postgres://` URL, a fresh schema on that server.
    pub(crate) async fn open(database_url: Option<&str>, run_id: &str) -> Result<Self> {
        match database_url {
            None => Self::open_sqlite().await,
            Some(url) => Self::open_postgres(url, run_id).await,
        }
    }

    async fn open_sqlite() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cachet-lab-")
            .tempdir()
            .context("cannot create a temporary directory for the SQLite database")?;
        let path = dir.path().join(SQLITE_FILE);
        // WAL lets readers run while a writer commits.
        let options = sqlite_options(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = sqlite_pool(options, SQLITE_CONNECTIONS, &path).await?;
        pool.execute(CREATE_TABLE)
            .await
            .context("cannot create the items table in SQLite")?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
            description: "sqlite (temporary file)".to_owned(),
            schema: None,
            _dir: Some(dir),
        })
    }

    async fn open_postgres(url: &str, run_id: &str) -> Result<Self> {
        let shown = redact_url(url);
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!("unsupported database URL {shown}: expected postgres://…");
        }
        let options = PgConnectOptions::from_str(url)
            .with_context(|| format!("invalid PostgreSQL URL {shown}"))?;
        let schema = format!("cachet_lab_{run_id}");
        let mut admin = options
            .connect()
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {shown}"))?;
        admin
            .execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .with_context(|| format!("cannot create schema {schema} on {shown}"))?;
        let _ = admin.close().await;

        let pool = schema_pool(&schema, PG_CONNECTIONS)
            .connect_with(options.clone())
            .await;
        let created =
            match pool {
                Ok(pool) => pool
                    .execute(CREATE_TABLE)
                    .await
                    .map(|_| pool)
                    .with_context(|| format!("cannot create {schema}.items on {shown}")),
                Err(e) => Err(anyhow::Error::new(e)
                    .context(format!("cannot connect to PostgreSQL at {shown}"))),
            };
        match created {
            Ok(pool) => Ok(Self {
                pool: Pool::Postgres(pool),
                description: format!("postgres ({shown}, schema {schema})"),
                schema: Some((schema, options)),
                _dir: None,
            }),
            Err(e) => {
                // The schema exists already; do not leave it behind.
                if let Ok(mut admin) = options.connect().await {
                    let _ = admin
                        .execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
                        .await;
                    let _ = admin.close().await;
                }
                Err(e)
            }
        }
    }

    /// `sqlite` or `postgres`.
    pub(crate) fn kind(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// What the source is, for the report header.
    pub(crate) fn description(&self) -> &str {
        &self.description
    }

    /// Replaces the table's contents with rows `1..=rows`, each with value 0.
    pub(crate) async fn reset(&self, rows: u64) -> Result<()> {
        let rows = i64::try_from(rows).context("too many rows")?;
        on_pool!(&self.pool, p => {
            p.execute("DELETE FROM items").await.context("cannot empty the items table")?;
        });
        let seeded = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(SEED_SQLITE)
                .bind(rows)
                .execute(p)
                .await
                .map(drop),
            Pool::Postgres(p) => sqlx::query(SEED_POSTGRES)
                .bind(rows)
                .execute(p)
                .await
                .map(drop),
        };
        seeded.with_context(|| format!("cannot insert {rows} rows into the items table"))?;
        Ok(())
    }

    /// Reads a row without counting it: for checking the cache against the
    /// truth, not part of any workload.
    pub(crate) async fn read(&self, id: i64) -> Result<Option<Item>> {
        fetch(&self.pool, id)
            .await
            .with_context(|| format!("cannot read item {id}"))
    }

    /// The PostgreSQL pool, for scenarios that run their own transactions on the
    /// run's schema (the outbox); `None` on SQLite.
    pub(crate) fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Some(p),
            Pool::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, for scenarios that run their own transactions on the
    /// run's file (the outbox); `None` on PostgreSQL.
    pub(crate) fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.pool {
            Pool::Sqlite(p) => Some(p),
            Pool::Postgres(_) => None,
        }
    }

    /// The run's PostgreSQL schema, for processes of the lab's own that read
    /// the source (`None` on SQLite).
    pub(crate) fn schema_name(&self) -> Option<&str> {
        self.schema.as_ref().map(|(name, _)| name.as_str())
    }

    /// The run's SQLite file, for processes of the lab's own that read the
    /// source (`None` on PostgreSQL).
    pub(crate) fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        self._dir.as_ref().map(|dir| dir.path().join(SQLITE_FILE))
    }

    /// A handle whose queries are counted apart from every other handle's.
    pub(crate) fn counted(&self) -> Db {
        Db::new(self.pool.clone())
    }

    /// Every row, uncounted: for checking what writes left in the source.
    pub(crate) async fn items(&self) -> Result<Vec<Item>> {
        let rows: Vec<(i64, i64, String)> = on_pool!(&self.pool, p => {
            sqlx::query_as(SELECT_ALL).fetch_all(p).await
        })
        .context("cannot read the items table")?;
        Ok(rows
            .into_iter()
            .map(|(id, value, payload)| Item { id, value, payload })
            .collect())
    }

    /// Drops what the run created: the PostgreSQL schema, or the SQLite file.
    pub(crate) async fn close(self) -> Result<()> {
        // Closing waits for every connection to come back, so no query of an
        // interrupted scenario runs against a schema that is gone.
        on_pool!(&self.pool, p => p.close().await);
        let Some((schema, options)) = &self.schema else {
            return Ok(());
        };
        let mut conn = options
            .connect()
            .await
            .with_context(|| format!("cannot connect to drop schema {schema}"))?;
        let dropped = conn
            .execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
            .await
            .map(drop)
            .with_context(|| format!("cannot drop schema {schema}"));
        let _ = conn.close().await;
        dropped
    }
}

/// Where a process of the lab's own finds the run's source of truth. Its
/// `Debug` shows no password.
#[derive(Clone, Copy)]
pub(crate) enum Location<'a> {
    /// The run's schema on the PostgreSQL server at `url`.
    Postgres { url: &'a str, schema: &'a str },
    /// The run's SQLite file.
    Sqlite { file: &'a Path, read_only: bool },
}

impl std::fmt::Debug for Location<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Postgres { url, schema } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("schema", schema)
                .finish(),
            Self::Sqlite { file, read_only } => f
                .debug_struct("Sqlite")
                .field("file", file)
                .field("read_only", read_only)
                .finish(),
        }
    }
}

/// Connection options for the run's SQLite file at `path`: synchronous=OFF
/// because the file is thrown away, so durability buys nothing but fsync
/// latency.
fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .synchronous(SqliteSynchronous::Off)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
}

/// A pool of `connections` with `options` on the SQLite file at `path`.
async fn sqlite_pool(
    options: SqliteConnectOptions,
    connections: u32,
    path: &Path,
) -> Result<SqlitePool> {
    pool_options::<sqlx::Sqlite>(connections)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot open SQLite database {}", path.display()))
}

/// Options of a pool of `connections`, bounded waits for one included.
fn pool_options<DB: sqlx::Database>(connections: u32) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .acquire_slow_threshold(ACQUIRE_TIMEOUT)
}

/// Pool options whose every connection works in `schema`. The data is thrown
/// away at the end, so commits need not wait for the WAL flush: the lab
/// measures caching, not the server's disk.
fn schema_pool(schema: &str, connections: u32) -> PgPoolOptions {
    let session: Arc<str> =
        format!("SET search_path TO {schema}; SET synchronous_commit TO off").into();
    pool_options::<sqlx::Postgres>(connections).after_connect(move |conn, _meta| {
        let session = Arc::clone(&session);
        Box::pin(async move {
            conn.execute(&*session).await?;
            Ok(())
        })
    })
}

/// A counted handle on the source of truth. Cheap to clone; clones share
/// counts and the [`set_down`](Self::set_down) switch.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    pool: Pool,
    reads: Arc<AtomicU64>,
    transactions: Arc<AtomicU64>,
    /// While set, [`load`](Self::load) fails without reaching the database:
    /// a source outage the lab stages.
    down: Arc<AtomicBool>,
    /// How long each load takes on top of its query (a slow source).
    delay: Duration,
}

impl Db {
    fn new(pool: Pool) -> Self {
        Self {
            pool,
            reads: Arc::default(),
            transactions: Arc::default(),
            down: Arc::default(),
            delay: Duration::ZERO,
        }
    }

    /// This handle with every load taking `delay` more, as an expensive query
    /// would.
    pub(crate) fn slowed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Takes the source down (every load fails at once, as on a database that
    /// refuses connections) or brings it back, for this handle and its clones.
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Whether [`set_down`](Self::set_down) made the source fail.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Opens the run's source of truth again, from another process of the lab
    /// (`connections` at most).
    pub(crate) async fn attach(at: Location<'_>, connections: u32) -> Result<Self> {
        let pool = match at {
            Location::Postgres { url, schema } => {
                let shown = redact_url(url);
                let options = PgConnectOptions::from_str(url)
                    .with_context(|| format!("invalid PostgreSQL URL {shown}"))?;
                let pool = schema_pool(schema, connections)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("cannot connect to PostgreSQL at {shown}"))?;
                Pool::Postgres(pool)
            }
            Location::Sqlite { file, read_only } => {
                let options = sqlite_options(file).read_only(read_only);
                Pool::Sqlite(sqlite_pool(options, connections, file).await?)
            }
        };
        Ok(Self::new(pool))
    }

    /// `SELECT` one item; counted in [`reads`](Self::reads), also while the
    /// source is down (the query was sent; it failed).
    pub(crate) async fn load(&self, id: i64) -> Result<Option<Item>, sqlx::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("cannot read item {id}: the source of truth is down (staged by the lab)"),
            )));
        }
        let item = fetch(&self.pool, id).await?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(item)
    }

    /// Increments an item's value. Writes are counted by the workloads, which
    /// know which of their operations are writes.
    pub(crate) async fn bump(&self, id: i64) -> Result<(), sqlx::Error> {
        on_pool!(&self.pool, p => sqlx::query(BUMP_ITEM).bind(id).execute(p).await.map(drop))
    }

    /// Read queries issued so far.
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes `item` as a versioned write, its `value` the version (see
    /// [`APPLY_WRITE`]), in a transaction of its own; returns it as written.
    /// Counted in [`transactions`](Self::transactions).
    pub(crate) async fn write_versioned(&self, item: Item) -> Result<Item, sqlx::Error> {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        on_pool!(&self.pool, p => {
            sqlx::query(APPLY_WRITE)
                .bind(item.id)
                .bind(item.value)
                .bind(&item.payload)
                .execute(p)
                .await?;
        });
        Ok(item)
    }

    /// Writes `items` as versioned writes (see
    /// [`write_versioned`](Self::write_versioned)), all in one transaction.
    /// Counted in [`transactions`](Self::transactions).
    pub(crate) async fn write_versioned_batch(&self, items: &[Item]) -> Result<(), sqlx::Error> {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await?;
            for item in items {
                sqlx::query(APPLY_WRITE)
                    .bind(item.id)
                    .bind(item.value)
                    .bind(&item.payload)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
    }

    /// Write transactions begun so far.
    pub(crate) fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }
}

async fn fetch(pool: &Pool, id: i64) -> Result<Option<Item>, sqlx::Error> {
    let row: Option<(i64, i64, String)> = on_pool!(pool, p => {
        sqlx::query_as(SELECT_ITEM).bind(id).fetch_optional(p).await?
    });
    Ok(row.map(|(id, value, payload)| Item { id, value, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait for a connection within the acquire timeout, which a loaded
    /// machine makes common, is not a warning (one per acquire).
    #[test]
    fn slow_acquires_are_not_warned_about_within_the_timeout() {
        let sqlite = pool_options::<sqlx::Sqlite>(SQLITE_CONNECTIONS);
        let pg = schema_pool("lab", PG_CONNECTIONS);
        for threshold in [
            sqlite.get_acquire_slow_threshold(),
            pg.get_acquire_slow_threshold(),
        ] {
            assert_eq!(threshold, ACQUIRE_TIMEOUT);
        }
    }
}
