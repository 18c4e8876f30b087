//! Processes killed at the worst moment, for real: a writer SIGKILLed between
//! its COMMIT and its invalidation, and a relay SIGKILLed between its
//! invalidation and its COMMIT.
//!
//! The doomed process is this test binary run again on an ignored test (the
//! child entry point) with an environment variable naming its role; it prints a
//! line when it reaches the fatal moment and waits there to be killed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use cachet::{Cache, RedisStore};
use cachet_core::{Layered, Op, StoreFuture, StoreLayer};
use cachet_outbox::{Outbox, Relay};
use cachet_testkit::{TestChild, child_args, eventually};
use sqlx::postgres::PgPool;
use support::Fx;

/// The ignored test that is the children's entry point.
const ENTRY: &str = "child_entry_point";
/// The line a child prints when it reached the point where it will be killed.
const READY: &str = "CACHET_OUTBOX_CHILD_READY";
/// How long a child waits to be killed before giving up by itself.
const CHILD_PATIENCE: Duration = Duration::from_secs(60);

async fn create_users(pool: PgPool) {
    sqlx::query("CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO users VALUES (1, 'old')")
        .execute(&pool)
        .await
        .unwrap();
}

async fn load_name(pool: &PgPool, id: u64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
        .bind(i64::try_from(id).unwrap())
        .fetch_optional(pool)
        .await
}

fn users(store: RedisStore) -> Cache<u64, String> {
    Cache::builder("users")
        .store(store)
        .ttl(Duration::from_secs(3600))
        .build()
        .unwrap()
}

/// The main scenario: the writer commits its update and its outbox record, then
/// dies before invalidating. The stale entry stays until a relay starts; then it
/// goes, and the next read loads the new row.
#[tokio::test]
async fn a_writer_killed_after_commit_is_covered_by_the_relay() {
    let fx = Fx::with_outbox(Outbox::new(), create_users).await;
    let cache = users(fx.store.clone());
    let loaded = cache
        .get_or_load(&1, {
            let pool = fx.pool.clone();
            move || async move { load_name(&pool, 1).await }
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("old"));
    let key = cache.store_key(&1);
    assert!(fx.exists(&key));

    let mut writer = TestChild::spawn(
        ENTRY,
        "writer",
        &[("pg", fx.db.url()), ("redis", &fx.redis.url())],
    );
    writer.wait_for(READY);
    writer.kill();

    assert_eq!(
        load_name(&fx.pool, 1).await.unwrap().as_deref(),
        Some("new"),
        "the write committed"
    );
    assert_eq!(fx.rows().await, 1, "with its outbox record");
    assert_eq!(
        cache.peek(&1).await.unwrap().as_deref(),
        Some("old"),
        "nobody invalidated: the cache is stale"
    );

    // The service restarts, with its relay.
    let running = support::Running::start(Relay::new(
        fx.outbox.clone(),
        fx.pool.clone(),
        Arc::clone(cache.store()),
    ));
    eventually("the relay invalidates", Duration::from_secs(10), || async {
        !fx.exists(&key)
    })
    .await;
    let fresh = cache
        .get_or_load(&1, {
            let pool = fx.pool.clone();
            move || async move { load_name(&pool, 1).await }
        })
        .await
        .unwrap();
    assert_eq!(fresh.as_deref(), Some("new"));
    assert_eq!(cache.peek(&1).await.unwrap().as_deref(), Some("new"));
    eventually("the row is deleted", Duration::from_secs(5), || async {
        fx.rows().await == 0
    })
    .await;
    let stats = running.stop().await.stats();
    assert_eq!((stats.delivered, stats.failed_attempts), (1, 0));
}

/// A relay killed after invalidating and before committing leaves its row; the
/// next relay delivers it again.
#[tokio::test]
async fn a_relay_killed_before_commit_leaves_the_row_for_the_next() {
    let fx = Fx::new().await;
    let cache = users(fx.store.clone());
    cache.set(&7, "cached".into()).await.unwrap();
    let key = cache.store_key(&7);
    fx.record_committed(std::slice::from_ref(&key)).await;

    let mut relay = TestChild::spawn(
        ENTRY,
        "relay",
        &[("pg", fx.db.url()), ("redis", &fx.redis.url())],
    );
    relay.wait_for(READY);
    assert!(!fx.exists(&key), "the dying relay invalidated");
    // Something fills the entry again before the relay dies: only a re-delivery
    // removes it now.
    cache.set(&7, "cached again".into()).await.unwrap();
    relay.kill();
    assert_eq!(fx.rows().await, 1, "the row outlived its relay");

    // The dead relay's session may take a moment to end on the server and
    // release its row lock; until then SKIP LOCKED skips the row.
    let next = fx.relay();
    eventually(
        "the next relay delivers",
        Duration::from_secs(10),
        || async { next.deliver_once().await.unwrap() == 1 },
    )
    .await;
    assert!(!fx.exists(&key));
    assert_eq!(fx.rows().await, 0);
    assert_eq!(next.stats().delivered, 1);
}

/// The child processes' entry point; does nothing in a normal test run.
#[test]
#[ignore = "entry point of the child processes of the crash tests"]
fn child_entry_point() {
    let Some(args) = child_args() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = PgPool::connect(&args["pg"]).await.unwrap();
        let store = RedisStore::connect(&args["redis"]).await.unwrap();
        match args["role"].as_str() {
            "writer" => writer(pool, store).await,
            "relay" => relay(pool, store).await,
            other => panic!("unknown child role {other}"),
        }
    });
}

/// Prints [`READY`] and waits, without blocking the runtime, for the parent to
/// kill this process (or, if it does not, for [`CHILD_PATIENCE`]).
async fn ready_to_die() {
    println!("{READY}");
    tokio::time::sleep(CHILD_PATIENCE).await;
}

/// Updates the row and records its invalidation in one transaction, commits,
/// and is killed where it would have invalidated.
async fn writer(pool: PgPool, store: RedisStore) {
    let cache = users(store);
    let outbox = Outbox::new();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET name = 'new' WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox.record(&mut tx, &cache.store_key(&1)).await.unwrap();
    tx.commit().await.unwrap();
    ready_to_die().await;
    cache.invalidate(&1).await.unwrap();
    panic!("the writer was not killed in time");
}

/// A relay whose store, once it has invalidated, stalls until the process is
/// killed: the batch never reaches its COMMIT.
async fn relay(pool: PgPool, store: RedisStore) {
    let relay = Relay::new(Outbox::new(), pool, Arc::new(Layered::new(Stalling, store)));
    let outcome = relay.deliver_once().await;
    panic!("the relay was not killed in time: {outcome:?}");
}

/// Once an invalidation went through, stalls until the process is killed.
#[derive(Debug)]
struct Stalling;

impl StoreLayer for Stalling {
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: Op<'a>,
        call: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        let Op::Invalidate(_) = op else {
            return call;
        };
        Box::pin(async move {
            let done = call.await?;
            ready_to_die().await;
            Ok(done)
        })
    }
}
