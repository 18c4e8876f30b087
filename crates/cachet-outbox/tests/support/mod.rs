//! Fixtures shared by the outbox tests: a fresh database, a throwaway
//! `redis-server`, a cache over it, and a relay running in the background.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cachet::{Cache, RedisStore, Store, StoreKey};
use cachet_outbox::{Outbox, Relay};
use cachet_testkit::{PgDatabase, RedisServer};
use sqlx::postgres::{PgPool, PgPoolOptions};

/// A database with the outbox table, a Redis server, and a store on it.
pub struct Fx {
    pub pool: PgPool,
    pub outbox: Outbox,
    pub store: RedisStore,
    pub redis: RedisServer,
    pub db: PgDatabase,
}

impl Fx {
    pub async fn new() -> Self {
        Self::with_outbox(Outbox::new(), |_| async {}).await
    }

    /// A fixture whose `setup` runs on the database before the outbox is migrated.
    pub async fn with_outbox<F, Fut>(outbox: Outbox, setup: F) -> Self
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = ()>,
    {
        Self::with_redis(RedisServer::start(), outbox, setup).await
    }

    pub async fn with_redis<F, Fut>(redis: RedisServer, outbox: Outbox, setup: F) -> Self
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = ()>,
    {
        let db = PgDatabase::create().await;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(db.url())
            .await
            .unwrap();
        setup(pool.clone()).await;
        outbox.migrate(&pool).await.unwrap();
        // Migrating twice is fine.
        outbox.migrate(&pool).await.unwrap();
        let store = RedisStore::builder(redis.url())
            .response_timeout(Duration::from_millis(300))
            .connection_timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap();
        Self {
            pool,
            outbox,
            store,
            redis,
            db,
        }
    }

    pub fn store_arc(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    /// A cache of user names over the fixture's store.
    pub fn cache(&self) -> Cache<u64, String> {
        Cache::builder("users")
            .store(self.store.clone())
            .ttl(Duration::from_secs(3600))
            .build()
            .unwrap()
    }

    pub fn relay(&self) -> Relay {
        Relay::new(self.outbox.clone(), self.pool.clone(), self.store_arc())
    }

    /// Rows in the outbox table.
    pub async fn rows(&self) -> i64 {
        let sql = format!("SELECT count(*) FROM {}", self.outbox.table());
        sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Whether Redis holds `key`, asked without the client under test.
    pub fn exists(&self, key: &StoreKey) -> bool {
        self.redis.command(&["EXISTS", key.as_str()]) == "1"
    }

    /// Commits one transaction recording `keys`.
    pub async fn record_committed(&self, keys: &[StoreKey]) {
        let mut tx = self.pool.begin().await.unwrap();
        self.outbox.record_all(&mut tx, keys).await.unwrap();
        tx.commit().await.unwrap();
    }
}

#[allow(unused_imports)] // not every test file polls
pub use cachet_testkit::eventually;

/// A relay running [`Relay::run`] in a task until stopped.
pub struct Running {
    pub relay: Relay,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn start(relay: Relay) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let relay = relay.clone();
            async move {
                relay
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await;
            }
        });
        Self {
            relay,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the relay and waits (at most 5 s) for `run` to return.
    pub async fn stop(mut self) -> Relay {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("run returns promptly after shutdown")
            .expect("run does not panic");
        self.relay.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}
