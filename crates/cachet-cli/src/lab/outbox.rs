//! The transactional outbox of the `race` scenario's crash rows: a write and
//! the record of its invalidation commit in one database transaction, and a
//! relay delivers the record to the store, so an invalidation survives a
//! writer that dies right after COMMIT.
//!
//! On PostgreSQL this is the library's own outbox (`cachet::outbox`): its table
//! in the run's schema, a notification channel of the run, and its `Relay`. The
//! library's outbox is PostgreSQL-only, so on SQLite the lab does the same with
//! a small table of its own in the run's database file and a polling relay
//! written here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::outbox::{Outbox, Relay};
use cachet::{Store, StoreKey};
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use tokio::sync::watch;
use tokio::time::Instant;

use super::source::Source;

/// The outbox table, in the run's schema (PostgreSQL) or file (SQLite).
const TABLE: &str = "cachet_lab_outbox";
const UPDATE_ITEM: &str = "UPDATE items SET value = value + 1 WHERE id = $1";
const SQLITE_CREATE: &str = "CREATE TABLE IF NOT EXISTS cachet_lab_outbox \
     (id INTEGER PRIMARY KEY AUTOINCREMENT, store_key TEXT NOT NULL)";
const SQLITE_INSERT: &str = "INSERT INTO cachet_lab_outbox (store_key) VALUES ($1)";
const SQLITE_SELECT: &str = "SELECT id, store_key FROM cachet_lab_outbox ORDER BY id LIMIT $1";
const SQLITE_DELETE: &str = "DELETE FROM cachet_lab_outbox WHERE id <= $1";
/// Rows one relay batch takes.
const BATCH: i64 = 100;
/// How often the relays look for rows without being told (PostgreSQL's relay is
/// also woken by `NOTIFY`).
const POLL: Duration = Duration::from_millis(5);
const PG_POLL: Duration = Duration::from_millis(50);
/// A batch still running after this long is abandoned (its rows stay).
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Draining the outbox at quiescence gives up after this many batches or this
/// long; whatever is left shows up as stale entries.
const MAX_DRAIN_BATCHES: usize = 100_000;
const DRAIN_TIME_LIMIT: Duration = Duration::from_secs(30);

/// An outbox and its relay for one lab run.
#[derive(Debug)]
pub(super) struct LabOutbox {
    backend: Backend,
    store: Arc<dyn Store>,
}

#[derive(Debug)]
enum Backend {
    Postgres {
        pool: PgPool,
        outbox: Outbox,
        relay: Relay,
    },
    Sqlite {
        pool: SqlitePool,
        delivered: AtomicU64,
    },
}

impl LabOutbox {
    /// Creates the outbox table (empty) on the run's database; the relay delivers
    /// to `store`.
    pub(super) async fn open(source: &Source, run_id: &str, store: Arc<dyn Store>) -> Result<Self> {
        let backend = if let Some(pool) = source.postgres_pool() {
            // The pool's search path is the run's schema, so the table lands
            // there and goes with it; the channel is the run's own.
            let outbox = Outbox::builder()
                .table(TABLE)
                .channel(format!("cachet_lab_{run_id}"))
                .build()
                .context("cannot configure the outbox")?;
            outbox
                .migrate(pool)
                .await
                .context("cannot create the outbox table")?;
            sqlx::query(&format!("DELETE FROM {TABLE}"))
                .execute(pool)
                .await
                .context("cannot empty the outbox table")?;
            let relay = Relay::new(outbox.clone(), pool.clone(), Arc::clone(&store))
                .poll_interval(PG_POLL)
                .batch_timeout(BATCH_TIMEOUT)
                .max_backoff(Duration::from_secs(1));
            Backend::Postgres {
                pool: pool.clone(),
                outbox,
                relay,
            }
        } else if let Some(pool) = source.sqlite_pool() {
            for sql in [SQLITE_CREATE, "DELETE FROM cachet_lab_outbox"] {
                sqlx::query(sql)
                    .execute(pool)
                    .await
                    .context("cannot create the outbox table in SQLite")?;
            }
            Backend::Sqlite {
                pool: pool.clone(),
                delivered: AtomicU64::new(0),
            }
        } else {
            bail!("the source of truth has no pool for an outbox");
        };
        Ok(Self { backend, store })
    }

    /// Which outbox the lab uses on `database` (`postgres` or `sqlite`), for
    /// the summary.
    pub(super) fn describe(database: &str) -> &'static str {
        if database == "postgres" {
            "cachet::outbox on PostgreSQL"
        } else {
            "on SQLite a lab outbox table and polling relay, as cachet::outbox is PostgreSQL-only"
        }
    }

    /// Increments item `id` and records the invalidation of `key`, in one
    /// transaction: both commit, or neither.
    pub(super) async fn write(&self, id: i64, key: &StoreKey) -> Result<()> {
        match &self.backend {
            Backend::Postgres { pool, outbox, .. } => {
                let mut tx = pool.begin().await?;
                sqlx::query(UPDATE_ITEM).bind(id).execute(&mut *tx).await?;
                outbox.record(&mut tx, key).await?;
                tx.commit().await?;
            }
            Backend::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                sqlx::query(UPDATE_ITEM).bind(id).execute(&mut *tx).await?;
                sqlx::query(SQLITE_INSERT)
                    .bind(key.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Records delivered (their key invalidated, the row deleted).
    pub(super) fn delivered(&self) -> u64 {
        match &self.backend {
            Backend::Postgres { relay, .. } => relay.stats().delivered,
            Backend::Sqlite { delivered, .. } => delivered.load(Ordering::Relaxed),
        }
    }

    /// Delivers one batch; returns the rows it removed (0: nothing to do).
    async fn deliver_once(&self) -> Result<usize> {
        match &self.backend {
            Backend::Postgres { relay, .. } => Ok(relay.deliver_once().await?),
            Backend::Sqlite { pool, delivered } => {
                let batch = tokio::time::timeout(BATCH_TIMEOUT, sqlite_batch(pool, &*self.store))
                    .await
                    .context("an outbox batch timed out")??;
                delivered.fetch_add(batch as u64, Ordering::Relaxed);
                Ok(batch)
            }
        }
    }

    /// Delivers records until `stop` turns true or `limit` passes.
    pub(super) async fn run_relay(&self, mut stop: watch::Receiver<bool>, limit: Duration) {
        let deadline = Instant::now() + limit;
        let stopped = async move {
            // An error means the sender is gone: stop as well.
            let _ = stop.wait_for(|s| *s).await;
        };
        match &self.backend {
            Backend::Postgres { relay, .. } => {
                let _ = tokio::time::timeout_at(deadline, relay.run(stopped)).await;
            }
            Backend::Sqlite { .. } => {
                let mut stopped = std::pin::pin!(stopped);
                let mut pause = Duration::ZERO;
                loop {
                    tokio::select! {
                        biased;
                        () = &mut stopped => break,
                        () = tokio::time::sleep_until(deadline) => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = match self.deliver_once().await {
                        Ok(n) if n as i64 >= BATCH => Duration::ZERO,
                        Ok(_) => POLL,
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "lab outbox delivery failed; retrying");
                            POLL * 10
                        }
                    };
                }
            }
        }
    }

    /// Delivers until the outbox is empty; returns whether it is (gives up
    /// after a bounded number of batches and time).
    pub(super) async fn drain(&self) -> bool {
        let deadline = Instant::now() + DRAIN_TIME_LIMIT;
        for _ in 0..MAX_DRAIN_BATCHES {
            if Instant::now() > deadline {
                break;
            }
            match self.deliver_once().await {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "draining the lab outbox failed; retrying");
                    tokio::time::sleep(POLL * 10).await;
                }
            }
        }
        tracing::warn!("the lab outbox did not drain in time");
        false
    }
}

/// One SQLite relay batch: read the oldest rows, invalidate their keys, delete
/// them. SQLite has one writer at a time and `AUTOINCREMENT` ids only grow, so
/// the rows a reader sees are a prefix of the table in id order, and deleting up
/// to the last id read deletes exactly them.
async fn sqlite_batch(pool: &SqlitePool, store: &dyn Store) -> Result<usize> {
    let rows: Vec<(i64, String)> = sqlx::query_as(SQLITE_SELECT)
        .bind(BATCH)
        .fetch_all(pool)
        .await
        .context("cannot read the outbox")?;
    let Some(&(last, _)) = rows.last() else {
        return Ok(0);
    };
    for (_, raw) in &rows {
        match StoreKey::parse(raw) {
            Some(key) => store
                .invalidate(&key)
                .await
                .with_context(|| format!("cannot invalidate {raw}"))?,
            None => tracing::error!(store_key = raw, "malformed outbox row dropped"),
        }
    }
    sqlx::query(SQLITE_DELETE)
        .bind(last)
        .execute(pool)
        .await
        .context("cannot delete delivered outbox rows")?;
    Ok(rows.len())
}
