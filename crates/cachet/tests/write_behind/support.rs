//! Fixtures shared by the write-behind tests: a throwaway `redis-server` (with
//! the append-only file), a fresh database with an `items` table, a cache over
//! the server, the PostgreSQL sink, and a flusher running in the background.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::time::Duration;

use cachet::write_behind::{Flusher, FlusherBuilder, Sink, Write, WriteBehind, WriteBehindBuilder};
use cachet::{BoxError, Cache, RedisStore};
use cachet_testkit::{PgDatabase, RedisServer, RedisServerOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};

/// The cached value: a row of `items`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    pub version: u64,
    pub value: String,
}

impl Item {
    pub fn new(version: u64, value: impl Into<String>) -> Self {
        Self {
            version,
            value: value.into(),
        }
    }
}

/// Namespace of the tests' cache.
pub const NS: &str = "items";
/// The tests' cache TTL.
pub const TTL: Duration = Duration::from_secs(3600);

/// A Redis server, a database with the `items` table, and a store.
pub struct Fx {
    pub pool: PgPool,
    pub store: RedisStore,
    pub redis: RedisServer,
    pub db: PgDatabase,
}

impl Fx {
    /// With the append-only file on (`appendfsync always`).
    pub async fn new() -> Self {
        Self::with_redis(RedisServer::start_with(RedisServerOptions {
            append_only: true,
            ..RedisServerOptions::default()
        }))
        .await
    }

    pub async fn with_redis(redis: RedisServer) -> Self {
        let db = PgDatabase::create().await;
        let pool = pool(db.url(), 8).await;
        create_items(&pool).await;
        let store = store(&redis.url()).await;
        Self {
            pool,
            store,
            redis,
            db,
        }
    }

    pub fn cache(&self) -> Cache<u64, Item> {
        cache(self.store.clone())
    }

    /// A write-behind on [`Fx::cache`], as configured by `configure`.
    pub async fn write_behind(
        &self,
        configure: impl FnOnce(WriteBehindBuilder<u64, Item>) -> WriteBehindBuilder<u64, Item>,
    ) -> WriteBehind<u64, Item> {
        configure(builder(self.store.clone(), &self.cache()))
            .build()
            .await
            .unwrap()
    }

    pub fn sink(&self) -> PgSink {
        PgSink::new(self.pool.clone())
    }

    /// A flusher with quick retries, as configured by `configure`.
    pub async fn flusher<S: Sink<u64, Item>>(
        &self,
        wb: &WriteBehind<u64, Item>,
        sink: S,
        configure: impl FnOnce(FlusherBuilder<u64, Item, S>) -> FlusherBuilder<u64, Item, S>,
    ) -> Flusher<u64, Item, S> {
        configure(quick(wb.flusher(sink)))
            .connect(&self.redis.url())
            .await
            .unwrap()
    }

    /// Entries pending in the group `flushers` (`XPENDING` summary count).
    pub fn pending(&self, wb: &WriteBehind<u64, Item>) -> u64 {
        let summary = self.redis.command(&["XPENDING", wb.stream(), "flushers"]);
        summary.lines().next().unwrap().parse().unwrap()
    }

    /// The stream's length, asked without the client under test.
    pub fn xlen(&self, stream: &str) -> u64 {
        self.redis.command(&["XLEN", stream]).parse().unwrap()
    }
}

pub async fn pool(url: &str, connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap()
}

pub async fn store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .response_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

pub fn cache(store: RedisStore) -> Cache<u64, Item> {
    Cache::builder(NS)
        .store(store)
        .ttl(TTL)
        .version_by(|i: &Item| i.version)
        .build()
        .unwrap()
}

/// The write-behind builder matching [`cache`].
pub fn builder(store: RedisStore, cache: &Cache<u64, Item>) -> WriteBehindBuilder<u64, Item> {
    WriteBehind::builder(store, cache)
}

/// Short idle times and backoffs, for tests.
pub fn quick<S>(b: FlusherBuilder<u64, Item, S>) -> FlusherBuilder<u64, Item, S> {
    b.min_idle(Duration::from_millis(100))
        .block(Duration::from_millis(50))
        .max_backoff(Duration::from_millis(200))
        .sink_timeout(Duration::from_secs(10))
}

pub async fn create_items(pool: &PgPool) {
    for sql in [
        "CREATE TABLE items (id BIGINT PRIMARY KEY, version BIGINT NOT NULL, value TEXT NOT NULL)",
        "CREATE TABLE sink_stats (batches BIGINT NOT NULL, rows BIGINT NOT NULL, changed BIGINT NOT NULL)",
        "INSERT INTO sink_stats VALUES (0, 0, 0)",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
}

/// Every row of `items`: id → (version, value).
pub async fn rows(pool: &PgPool) -> HashMap<u64, (u64, String)> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as("SELECT id, version, value FROM items")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(id, v, value)| (id as u64, (v as u64, value)))
        .collect()
}

/// What the sink did: (batches, rows offered, rows changed).
pub async fn sink_stats(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as("SELECT batches, rows, changed FROM sink_stats")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The sink of the crate docs: one transaction per batch, an upsert that only
/// moves a row to a newer version. It also counts, in the same transaction,
/// the rows it was given and the rows it changed.
#[derive(Clone, Debug)]
pub struct PgSink {
    pool: PgPool,
    /// A pause before COMMIT and another after it, to widen the windows in
    /// which a crash test's kills land.
    pause: Duration,
}

impl PgSink {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            pause: Duration::ZERO,
        }
    }

    pub fn slow(pool: PgPool, pause: Duration) -> Self {
        Self { pool, pause }
    }
}

pub const UPSERT: &str = "
WITH up AS (
  INSERT INTO items AS t (id, version, value)
  SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])
  ON CONFLICT (id) DO UPDATE SET version = excluded.version, value = excluded.value
  WHERE t.version < excluded.version
  RETURNING 1
)
SELECT count(*) FROM up";

impl Sink<u64, Item> for PgSink {
    async fn apply(&self, batch: &[Write<u64, Item>]) -> Result<(), BoxError> {
        let ids: Vec<i64> = batch.iter().map(|w| w.key as i64).collect();
        let versions: Vec<i64> = batch.iter().map(|w| w.version as i64).collect();
        let values: Vec<&str> = batch.iter().map(|w| w.value.value.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        let changed: i64 = sqlx::query_scalar(UPSERT)
            .bind(&ids)
            .bind(&versions)
            .bind(&values)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE sink_stats SET batches = batches + 1, rows = rows + $1, changed = changed + $2",
        )
        .bind(batch.len() as i64)
        .bind(changed)
        .execute(&mut *tx)
        .await?;
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        tx.commit().await?;
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        Ok(())
    }

    fn is_transient(&self, error: &BoxError) -> bool {
        matches!(
            error.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
        )
    }
}

#[allow(unused_imports)] // not every test file polls
pub use cachet_testkit::eventually;

/// A flusher running [`Flusher::run`] in a task until stopped.
pub struct Running<S: Sink<u64, Item>> {
    pub flusher: Flusher<u64, Item, S>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Sink<u64, Item>> Running<S> {
    pub fn start(flusher: Flusher<u64, Item, S>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let flusher = flusher.clone();
            async move {
                flusher
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await;
            }
        });
        Self {
            flusher,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the loop and waits (at most 10 s) for it to end.
    pub async fn stop(mut self) -> Flusher<u64, Item, S> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the flusher stops within 10 s")
            .unwrap();
        self.flusher.clone()
    }
}

impl<S: Sink<u64, Item>> Drop for Running<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
