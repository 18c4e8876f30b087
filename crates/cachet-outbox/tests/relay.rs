//! Recording and delivery in one process: transactions, batches, concurrent
//! relays, wake-ups, malformed rows and an unreachable store.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet::{KeyLayout, Store, StoreError, StoreKey};

use cachet::store::StoreFuture;
use cachet_core::{Layered, Op, StoreLayer};
use cachet_outbox::{Error, Outbox, Relay};
use cachet_testkit::{RedisServer, RedisServerOptions};
use support::{Fx, Running, eventually};

fn keys(ids: impl IntoIterator<Item = u64>) -> Vec<StoreKey> {
    let layout = KeyLayout::new("cachet:", "users").unwrap();
    ids.into_iter().map(|id| layout.key(&id)).collect()
}

/// Puts an entry under each key through the cache, and checks it is there.
async fn fill(fx: &Fx, ids: impl IntoIterator<Item = u64>) {
    let cache = fx.cache();
    for id in ids {
        cache.set(&id, format!("user {id}")).await.unwrap();
        assert!(fx.exists(&cache.store_key(&id)));
    }
}

#[tokio::test]
async fn rolled_back_records_vanish_committed_ones_are_delivered() {
    let fx = Fx::new().await;
    let keys = keys([1, 2, 3]);
    fill(&fx, [1, 2, 3]).await;

    let mut tx = fx.pool.begin().await.unwrap();
    fx.outbox.record(&mut tx, &keys[0]).await.unwrap();
    fx.outbox.record_all(&mut tx, &keys[1..]).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(fx.rows().await, 0, "a rollback takes the records with it");

    let mut tx = fx.pool.begin().await.unwrap();
    fx.outbox.record(&mut tx, &keys[0]).await.unwrap();
    fx.outbox.record_all(&mut tx, &keys[1..]).await.unwrap();
    fx.outbox.record_all(&mut tx, &[]).await.unwrap();
    tx.commit().await.unwrap();
    let recorded: Vec<String> =
        sqlx::query_scalar("SELECT store_key FROM cachet_outbox ORDER BY id")
            .fetch_all(&fx.pool)
            .await
            .unwrap();
    let expected: Vec<String> = keys.iter().map(ToString::to_string).collect();
    assert_eq!(recorded, expected, "one row per key");

    let relay = fx.relay();
    assert_eq!(relay.deliver_once().await.unwrap(), 3);
    for key in &keys {
        assert!(!fx.exists(key), "{key} invalidated");
    }
    assert_eq!(fx.rows().await, 0);
    assert_eq!(relay.deliver_once().await.unwrap(), 0);
    let stats = relay.stats();
    assert_eq!(
        (stats.delivered, stats.malformed, stats.failed_attempts),
        (3, 0, 0)
    );
}

#[tokio::test]
async fn batches_are_bounded_and_duplicate_keys_are_one_invalidation() {
    let fx = Fx::new().await;
    let counting = Arc::new(Hooked::counting(fx.store_arc()));
    let recorded = keys([1, 1, 2, 1, 2, 3, 3]);
    fx.record_committed(&recorded).await;

    let relay = Relay::new(fx.outbox.clone(), fx.pool.clone(), counting.clone()).batch_size(4);
    let mut batches = Vec::new();
    for _ in 0..10 {
        match relay.deliver_once().await.unwrap() {
            0 => break,
            n => batches.push(n),
        }
    }
    assert_eq!(batches, [4, 3]);
    assert_eq!(relay.stats().delivered, 7);
    // Keys 1, 1, 2, 1 then 2, 3, 3: two distinct keys per batch.
    assert_eq!(
        counting.layer().invalidations.load(Ordering::Relaxed),
        2 + 2
    );
}

/// A relay that invalidated but did not commit (here: the store reports a failure
/// after deleting, as if the relay had died before COMMIT) leaves the row, and
/// the next attempt delivers it again.
#[tokio::test]
async fn invalidated_but_uncommitted_rows_are_delivered_again() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    fill(&fx, [7]).await;
    let key = cache.store_key(&7);
    fx.record_committed(std::slice::from_ref(&key)).await;

    let dying = Relay::new(
        fx.outbox.clone(),
        fx.pool.clone(),
        Arc::new(Hooked::failing_after_invalidate(fx.store_arc())),
    );
    let err = dying.deliver_once().await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    assert!(err.to_string().contains("cachet_outbox"), "{err}");
    assert!(!fx.exists(&key), "the invalidation itself ran");
    assert_eq!(fx.rows().await, 1, "but the row was not deleted");
    assert_eq!(dying.stats().failed_attempts, 1);
    assert_eq!(dying.stats().delivered, 0);

    // A value cached again meanwhile is removed by the re-delivery.
    cache.set(&7, "refilled".into()).await.unwrap();
    let relay = fx.relay();
    assert_eq!(relay.deliver_once().await.unwrap(), 1);
    assert!(!fx.exists(&key));
    assert_eq!(fx.rows().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_one_table() {
    const N: u64 = 300;
    let outbox = Outbox::builder()
        .table("app.cache_outbox")
        .channel("app_cache_outbox")
        .build()
        .unwrap();
    let fx = Fx::with_outbox(outbox, |pool| async move {
        sqlx::query("CREATE SCHEMA app")
            .execute(&pool)
            .await
            .unwrap();
    })
    .await;
    fill(&fx, 0..N).await;
    assert_eq!(fx.redis.command(&["DBSIZE"]), N.to_string());
    let all = keys(0..N);
    for chunk in all.chunks(30) {
        fx.record_committed(chunk).await;
    }
    assert_eq!(fx.rows().await, N as i64);

    let start = |fx: &Fx| {
        Running::start(
            fx.relay()
                .batch_size(10)
                .poll_interval(Duration::from_millis(50)),
        )
    };
    let (a, b) = (start(&fx), start(&fx));
    eventually("the table drains", Duration::from_secs(20), || async {
        fx.rows().await == 0
    })
    .await;
    let (a, b) = (a.stop().await.stats(), b.stop().await.stats());

    assert_eq!(fx.redis.command(&["DBSIZE"]), "0", "every key invalidated");
    assert_eq!(
        a.delivered + b.delivered,
        N,
        "each row delivered once: {a:?} {b:?}"
    );
    assert_eq!(a.failed_attempts + b.failed_attempts, 0, "{a:?} {b:?}");
    assert_eq!(a.malformed + b.malformed, 0);
}

/// With a poll interval of a minute, only notifications can deliver quickly.
///
/// Besides notifications, a relay looks for rows when it starts and when its
/// listener connects. Recording three keys one after the other, each after the
/// previous one was delivered, leaves at least the third to a notification.
#[tokio::test]
async fn notify_wakes_the_relay() {
    let fx = Fx::new().await;
    let running = Running::start(fx.relay().poll_interval(Duration::from_secs(60)));
    for (i, key) in keys([1, 2, 3]).iter().enumerate() {
        fx.record_committed(std::slice::from_ref(key)).await;
        eventually(
            &format!("record {i} delivered"),
            Duration::from_secs(5),
            || async { running.relay.stats().delivered == i as u64 + 1 },
        )
        .await;
    }
    assert_eq!(fx.rows().await, 0);
    assert_eq!(running.stop().await.stats().failed_attempts, 0);
}

/// The backend of the listener's connection, if one is listening.
async fn listener_pid(fx: &Fx) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_optional(&fx.pool)
    .await
    .unwrap()
}

/// A listener whose connection dies reconnects, and notifications wake the relay
/// again (the poll interval is a minute).
#[tokio::test]
async fn the_listener_reconnects_after_its_connection_dies() {
    let fx = Fx::new().await;
    let running = Running::start(fx.relay().poll_interval(Duration::from_secs(60)));
    eventually("the relay listens", Duration::from_secs(5), || async {
        listener_pid(&fx).await.is_some()
    })
    .await;
    let first = listener_pid(&fx).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&fx.pool)
        .await
        .unwrap();
    assert!(killed);
    eventually(
        "the relay listens again",
        Duration::from_secs(5),
        || async {
            listener_pid(&fx)
                .await
                .is_some_and(|pid| Some(pid) != first)
        },
    )
    .await;
    // The first record may be found by the look that follows a reconnection;
    // the second needs a notification.
    for (i, key) in keys([1, 2]).iter().enumerate() {
        fx.record_committed(std::slice::from_ref(key)).await;
        eventually(
            &format!("record {i} delivered"),
            Duration::from_secs(5),
            || async { running.relay.stats().delivered == i as u64 + 1 },
        )
        .await;
    }
    running.stop().await;
}

/// Rows inserted without a notification are found by polling (the same three-row
/// argument as above).
#[tokio::test]
async fn polling_delivers_without_notify() {
    let fx = Fx::new().await;
    let running = Running::start(fx.relay().poll_interval(Duration::from_millis(100)));
    for (i, key) in keys([1, 2, 3]).iter().enumerate() {
        sqlx::query("INSERT INTO cachet_outbox (store_key) VALUES ($1)")
            .bind(key.as_str())
            .execute(&fx.pool)
            .await
            .unwrap();
        eventually(
            &format!("row {i} delivered"),
            Duration::from_secs(5),
            || async { running.relay.stats().delivered == i as u64 + 1 },
        )
        .await;
    }
    running.stop().await;

    // An outbox that never notifies: writers only insert, relays only poll.
    let quiet = Outbox::builder().notify(false).build().unwrap();
    let relay = Relay::new(quiet.clone(), fx.pool.clone(), fx.store_arc())
        .poll_interval(Duration::from_millis(100));
    let running = Running::start(relay);
    for (i, key) in keys([4, 5]).iter().enumerate() {
        let mut tx = fx.pool.begin().await.unwrap();
        quiet.record(&mut tx, key).await.unwrap();
        tx.commit().await.unwrap();
        eventually(
            &format!("quiet record {i} delivered"),
            Duration::from_secs(5),
            || async { running.relay.stats().delivered == i as u64 + 1 },
        )
        .await;
    }
    running.stop().await;
}

#[tokio::test]
async fn malformed_rows_are_deleted_and_counted() {
    let fx = Fx::new().await;
    fill(&fx, [1]).await;
    let good = keys([1]).remove(0);
    for raw in [
        "not a key",
        good.as_str(),
        "cachet:users:l:{1}",
        "cachet:users:v:{}",
    ] {
        sqlx::query("INSERT INTO cachet_outbox (store_key) VALUES ($1)")
            .bind(raw)
            .execute(&fx.pool)
            .await
            .unwrap();
    }
    let relay = fx.relay();
    assert_eq!(relay.deliver_once().await.unwrap(), 4);
    assert!(!fx.exists(&good), "the good row in the batch is delivered");
    assert_eq!(fx.rows().await, 0);
    assert_eq!(
        relay.deliver_once().await.unwrap(),
        0,
        "nothing left to retry"
    );
    let stats = relay.stats();
    assert_eq!(
        (stats.delivered, stats.malformed, stats.failed_attempts),
        (1, 3, 0)
    );
}

#[tokio::test]
async fn rows_wait_for_the_store_to_come_back() {
    // Append-only so that the entries survive the restart and their deletion
    // after it is visible.
    let redis = RedisServer::start_with(RedisServerOptions {
        append_only: true,
        ..Default::default()
    });
    let mut fx = Fx::with_redis(redis, Outbox::new(), |_| async {}).await;
    fill(&fx, [1, 2, 3]).await;
    let keys = keys([1, 2, 3]);
    fx.redis.kill();
    fx.record_committed(&keys).await;

    let relay = fx.relay();
    let err = relay.deliver_once().await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("cachet_outbox") && message.contains("cachet:users:v:{"),
        "{message}"
    );
    assert_eq!(fx.rows().await, 3, "rows stay while the store is down");

    let running = Running::start(
        relay
            .poll_interval(Duration::from_millis(50))
            .max_backoff(Duration::from_millis(200)),
    );
    eventually("the relay retries", Duration::from_secs(10), || async {
        running.relay.stats().failed_attempts >= 3
    })
    .await;
    assert_eq!(fx.rows().await, 3);
    assert_eq!(running.relay.stats().delivered, 0);

    fx.redis.restart();
    for key in &keys {
        assert!(fx.exists(key), "{key} survived the restart");
    }
    eventually(
        "delivered after restart",
        Duration::from_secs(10),
        || async { fx.rows().await == 0 },
    )
    .await;
    for key in &keys {
        assert!(!fx.exists(key), "{key} invalidated");
    }
    let stats = running.stop().await.stats();
    assert_eq!(stats.delivered, 3);
}

/// A hook on `invalidate`, as a layer over another store.
#[derive(Debug)]
struct Hooked {
    /// Report a failure after each invalidation, as a relay that dies between its
    /// invalidations and its COMMIT would leave things.
    fail_after: bool,
    invalidations: AtomicU64,
}

impl Hooked {
    fn counting(inner: Arc<dyn Store>) -> Layered<Self> {
        Layered::new(
            Self {
                fail_after: false,
                invalidations: AtomicU64::new(0),
            },
            inner,
        )
    }

    fn failing_after_invalidate(inner: Arc<dyn Store>) -> Layered<Self> {
        Layered::new(
            Self {
                fail_after: true,
                invalidations: AtomicU64::new(0),
            },
            inner,
        )
    }
}

impl StoreLayer for Hooked {
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
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            if self.fail_after {
                return Err(StoreError::protocol(
                    "simulated: the relay died before COMMIT",
                ));
            }
            Ok(done)
        })
    }
}
