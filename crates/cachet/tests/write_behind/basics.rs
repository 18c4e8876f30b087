//! Writes are cached at once, reach PostgreSQL after a flush, and leave the
//! stream; writes of one key coalesce; the sink is idempotent; the cache stays
//! in line with the flushed versions.

use crate::support;

use std::time::Duration;

use cachet::{Cache, Store};

use cachet::store::{AcquireMode, Entry, Fill};
use cachet::write_behind::{Error, Sink, Write, WriteBehind, WriteOutcome};
use support::{Fx, Item, PgSink, Running, eventually, rows, sink_stats};

#[tokio::test]
async fn writes_are_readable_at_once_and_reach_postgres_after_a_flush() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    let wb = fx.write_behind(|b| b).await;
    assert_eq!(wb.stream(), "cachet:items:sys:wb");
    assert_eq!(wb.dead_letter_stream(), "cachet:items:sys:wb:dead");

    for id in 0..20u64 {
        let queued = wb
            .write_behind(&id, Item::new(1, format!("v{id}")))
            .await
            .unwrap();
        assert!(matches!(queued, WriteOutcome::Queued { .. }), "{queued:?}");
        // Readable from the cache at once, through the cache's own path.
        assert_eq!(
            cache.get(&id).await.unwrap(),
            Some(Item::new(1, format!("v{id}")))
        );
    }
    let ttl = cache.ttl(&3).await.unwrap().unwrap();
    assert!(ttl > Duration::from_secs(3000), "the cache's TTL: {ttl:?}");
    assert_eq!(wb.backlog().await.unwrap(), 20);
    assert!(rows(&fx.pool).await.is_empty(), "nothing flushed yet");

    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 20);
    let rows = rows(&fx.pool).await;
    assert_eq!(rows.len(), 20);
    for id in 0..20u64 {
        assert_eq!(rows[&id], (1, format!("v{id}")));
    }
    assert_eq!(
        wb.backlog().await.unwrap(),
        0,
        "flushed entries are deleted"
    );
    assert_eq!(fx.pending(&wb), 0);
    let stats = flusher.stats();
    assert_eq!(
        (
            stats.flushed,
            stats.batches,
            stats.coalesced,
            stats.sink_errors
        ),
        (20, 1, 0, 0)
    );
    // The flush left the (current) entries alone.
    assert_eq!(cache.get(&7).await.unwrap(), Some(Item::new(1, "v7")));
    assert_eq!(flusher.flush_once().await.unwrap(), 0, "nothing left");
}

#[tokio::test]
async fn many_writes_of_one_key_in_a_batch_become_one_row_with_the_last_version() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    for v in 1..=50u64 {
        let _ = wb
            .write_behind(&1, Item::new(v, format!("value {v}")))
            .await
            .unwrap();
    }
    let _ = wb.write_behind(&2, Item::new(1, "other")).await.unwrap();
    assert_eq!(wb.backlog().await.unwrap(), 51);

    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 51);
    let rows = rows(&fx.pool).await;
    assert_eq!(rows[&1], (50, "value 50".to_owned()));
    assert_eq!(rows[&2], (1, "other".to_owned()));
    let (batches, offered, changed) = sink_stats(&fx.pool).await;
    assert_eq!(
        (batches, offered, changed),
        (1, 2, 2),
        "one sink call, one write per key"
    );
    let stats = flusher.stats();
    assert_eq!((stats.flushed, stats.coalesced), (51, 49));
    assert_eq!(wb.backlog().await.unwrap(), 0);
}

#[tokio::test]
async fn a_write_older_than_the_cached_version_is_not_queued() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    let wb = fx.write_behind(|b| b).await;
    let _ = wb.write_behind(&1, Item::new(5, "five")).await.unwrap();
    assert_eq!(
        wb.write_behind(&1, Item::new(3, "three")).await.unwrap(),
        WriteOutcome::Stale { current: 5 }
    );
    assert_eq!(
        wb.write_behind(&1, Item::new(5, "five again"))
            .await
            .unwrap(),
        WriteOutcome::Stale { current: 5 },
        "the same version is not newer"
    );
    assert_eq!(cache.get(&1).await.unwrap(), Some(Item::new(5, "five")));
    assert_eq!(wb.backlog().await.unwrap(), 1);
    assert!(matches!(
        wb.write_behind(&1, Item::new(6, "six")).await.unwrap(),
        WriteOutcome::Queued { .. }
    ));
}

#[tokio::test]
async fn a_load_that_took_the_lease_before_the_write_cannot_fill_over_it() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    let wb = fx.write_behind(|b| b).await;
    let key = cache.store_key(&9);
    // A reader misses and takes the lease, then reads the old row...
    let cachet::store::Acquire::Leased(lease) = fx
        .store
        .acquire(&key, AcquireMode::IfAbsent, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("expected a lease")
    };
    // ...the write lands...
    let _ = wb.write_behind(&9, Item::new(2, "new")).await.unwrap();
    // ...and the reader's fill of the old row is refused.
    let mut old = Vec::new();
    cachet::Codec::encode(&cachet::Postcard, &Item::new(1, "old"), &mut old).unwrap();
    let entry = Entry {
        meta: cachet::store::Meta {
            version: 1,
            ..cachet::store::Meta::default()
        },
        payload: cachet::store::Payload::Bytes(old.into()),
    };
    let filled = fx
        .store
        .fill(&key, &lease, entry, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(filled, Fill::Refused);
    assert_eq!(cache.get(&9).await.unwrap(), Some(Item::new(2, "new")));
}

#[tokio::test]
async fn a_flush_drops_an_older_entry_refilled_before_it() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    let wb = fx.write_behind(|b| b).await;
    let _ = wb.write_behind(&4, Item::new(2, "new")).await.unwrap();
    let _ = wb.write_behind(&5, Item::new(2, "new")).await.unwrap();
    // Key 4's entry expired before the flush and a reader refilled it from the
    // old row; key 5 has been written again since.
    cache.set(&4, Item::new(1, "old")).await.unwrap();
    let _ = wb.write_behind(&5, Item::new(3, "newer")).await.unwrap();
    let flusher = fx.flusher(&wb, fx.sink(), |f| f.batch_size(2)).await;
    // Only the first two entries (keys 4 and 5 at version 2) in this batch.
    assert_eq!(flusher.flush_once().await.unwrap(), 2);
    assert_eq!(
        cache.get(&4).await.unwrap(),
        None,
        "the old refill is gone: the next read loads the flushed row"
    );
    assert_eq!(
        cache.get(&5).await.unwrap(),
        Some(Item::new(3, "newer")),
        "a newer entry stays"
    );
    assert_eq!(flusher.flush_once().await.unwrap(), 1);
    assert_eq!(rows(&fx.pool).await[&5], (3, "newer".to_owned()));
}

#[tokio::test]
async fn the_sink_is_idempotent_by_version() {
    let fx = Fx::new().await;
    let sink = fx.sink();
    let batch = vec![
        Write::new(1u64, 3, Item::new(3, "c")),
        Write::new(2u64, 1, Item::new(1, "a")),
    ];
    sink.apply(&batch).await.unwrap();
    let after_once = rows(&fx.pool).await;
    sink.apply(&batch).await.unwrap();
    assert_eq!(rows(&fx.pool).await, after_once, "applied twice");
    sink.apply(&[Write::new(1u64, 2, Item::new(2, "b"))])
        .await
        .unwrap();
    assert_eq!(rows(&fx.pool).await, after_once, "an older version");
    assert_eq!(after_once[&1], (3, "c".to_owned()));
    let (_, offered, changed) = sink_stats(&fx.pool).await;
    assert_eq!((offered, changed), (5, 2));
}

#[tokio::test]
async fn a_running_flusher_flushes_as_writes_arrive_and_stops_on_request() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    let running = Running::start(fx.flusher(&wb, fx.sink(), |f| f).await);
    for round in 1..=3u64 {
        for id in 0..10u64 {
            let _ = wb
                .write_behind(&id, Item::new(round, format!("{id}@{round}")))
                .await
                .unwrap();
        }
        eventually("the round is flushed", Duration::from_secs(10), || async {
            let rows = rows(&fx.pool).await;
            (0..10).all(|id| rows.get(&id).is_some_and(|r| r.0 == round))
        })
        .await;
    }
    let flusher = running.stop().await;
    assert_eq!(flusher.stats().flushed, 30);
    assert_eq!(wb.backlog().await.unwrap(), 0);
    assert_eq!(fx.pending(&wb), 0);
}

#[tokio::test]
async fn a_grouped_and_tagged_cache_gets_the_groups_generation_and_the_values_tags() {
    let fx = Fx::new().await;
    let cache: Cache<u64, Item> = Cache::builder(support::NS)
        .store(fx.store.clone())
        .ttl(support::TTL)
        .version_by(|i: &Item| i.version)
        .group_by(|id: &u64| id % 2)
        .tags_by(|_: &u64, i: &Item| vec![format!("version {}", i.version)])
        .build()
        .unwrap();
    let wb = support::builder(fx.store.clone(), &cache)
        .build()
        .await
        .unwrap();
    let _ = wb.write_behind(&3, Item::new(1, "odd")).await.unwrap();
    assert_eq!(cache.get(&3).await.unwrap(), Some(Item::new(1, "odd")));
    // A group invalidation drops it like any entry of the group.
    cache.invalidate_group(&1u64).await.unwrap();
    assert_eq!(cache.get(&3).await.unwrap(), None);
    // And a newer write after it is cached under the new generation.
    let _ = wb.write_behind(&3, Item::new(2, "odd 2")).await.unwrap();
    assert_eq!(cache.get(&3).await.unwrap(), Some(Item::new(2, "odd 2")));
    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 2);
    assert_eq!(rows(&fx.pool).await[&3], (2, "odd 2".to_owned()));
    // A tag invalidation drops the entries carrying the tag, and only them.
    let _ = wb.write_behind(&4, Item::new(1, "even")).await.unwrap();
    cache.invalidate_tag("version 2").await.unwrap();
    assert_eq!(cache.get(&3).await.unwrap(), None);
    assert_eq!(cache.get(&4).await.unwrap(), Some(Item::new(1, "even")));
}

#[tokio::test]
async fn idle_consumers_without_pending_entries_are_pruned() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    let old = fx.flusher(&wb, fx.sink(), |f| f.consumer("old")).await;
    let _ = wb.write_behind(&1, Item::new(1, "x")).await.unwrap();
    assert_eq!(old.flush_once().await.unwrap(), 1);
    // A consumer that still holds entries is kept, whatever its idle time.
    let _ = wb.write_behind(&2, Item::new(1, "y")).await.unwrap();
    fx.redis.command(&[
        "XREADGROUP",
        "GROUP",
        "flushers",
        "keeper",
        "COUNT",
        "1",
        "STREAMS",
        wb.stream(),
        ">",
    ]);
    let consumers = || {
        fx.redis
            .command(&["XINFO", "CONSUMERS", wb.stream(), "flushers"])
    };
    assert!(consumers().contains("old") && consumers().contains("keeper"));
    let new = fx
        .flusher(&wb, fx.sink(), |f| {
            f.consumer("new").prune_idle(Duration::ZERO)
        })
        .await;
    assert_eq!(new.flush_once().await.unwrap(), 0);
    let after = consumers();
    assert!(!after.contains("old"), "{after}");
    assert!(after.contains("keeper"), "{after}");
}

#[tokio::test]
async fn misconfigurations_are_refused_with_a_clear_error() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    let unversioned: Cache<u64, Item> = Cache::builder("unversioned")
        .store(fx.store.clone())
        .build()
        .unwrap();
    let e = WriteBehind::builder(fx.store.clone(), &unversioned)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains("version_by"), "{e}");

    let in_process: Cache<u64, Item> = Cache::builder("local")
        .version_by(|i: &Item| i.version)
        .build()
        .unwrap();
    let e = support::builder(fx.store.clone(), &in_process)
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("in process"), "{e}");

    let e = support::builder(fx.store.clone(), &cache)
        .stream_name("a b")
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid stream name"), "{e}");

    let cluster = cachet_testkit::RedisCluster::start();
    let on_cluster = cachet::RedisStore::connect_cluster(&cluster.urls())
        .await
        .unwrap();
    let e = support::builder(on_cluster.clone(), &support::cache(on_cluster))
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("single Redis node"), "{e}");
}

/// A key type that cannot be read back from its store key.
#[derive(Clone, Hash, PartialEq, Eq)]
struct Opaque(u32);

impl cachet::CacheKey for Opaque {
    fn write_key(&self, out: &mut cachet::store::KeyWriter<'_>) {
        self.0.write_key(out);
    }
    fn decode_key(_: &str) -> Option<Self> {
        None
    }
}

#[tokio::test]
async fn a_key_type_that_does_not_decode_is_refused_at_write_time() {
    let fx = Fx::new().await;
    let cache: Cache<Opaque, Item> = Cache::builder("opaque")
        .store(fx.store.clone())
        .version_by(|i: &Item| i.version)
        .build()
        .unwrap();
    let wb = WriteBehind::builder(fx.store.clone(), &cache)
        .build()
        .await
        .unwrap();
    let e = wb
        .write_behind(&Opaque(1), Item::new(1, "x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::KeyNotDecodable { .. }), "{e:?}");
    assert!(e.to_string().contains("decode_key"), "{e}");
    assert_eq!(wb.backlog().await.unwrap(), 0);
}

/// The sink of the docs' example compiles with `async fn`, and `PgSink`
/// classifies connection failures as transient.
#[tokio::test]
async fn pool_failures_are_transient() {
    let fx = Fx::new().await;
    let sink = PgSink::new(fx.pool.clone());
    fx.pool.close().await;
    let e = sink
        .apply(&[Write::new(1u64, 1, Item::new(1, "x"))])
        .await
        .unwrap_err();
    assert!(sink.is_transient(&e), "{e}");
    assert!(!sink.is_transient(&"a constraint violation".into()));
}

/// Near caches (L1) of other processes hear of write-behind writes, and of
/// the entries a flush deletes, through the invalidation bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_caches_elsewhere_drop_what_write_behind_replaces() {
    let fx = Fx::new().await;
    let elsewhere: Cache<u64, Item> = Cache::builder(support::NS)
        .store(support::store(&fx.redis.url()).await)
        .ttl(support::TTL)
        .version_by(|i: &Item| i.version)
        .near_cache(cachet::NearCache::new(100, Duration::from_secs(600)))
        .build()
        .unwrap();
    eventually("the bus is subscribed", Duration::from_secs(10), || async {
        elsewhere.stats().near_clears > 0
    })
    .await;
    let wb = fx.write_behind(|b| b).await;
    let _ = wb.write_behind(&1, Item::new(1, "one")).await.unwrap();
    let _ = wb.write_behind(&2, Item::new(1, "two")).await.unwrap();
    // Key 2's entry expired before the flush and was refilled from the old row.
    fx.cache().set(&2, Item::new(0, "old")).await.unwrap();
    eventually("L1 holds both", Duration::from_secs(10), || async {
        elsewhere.get(&1).await.unwrap() == Some(Item::new(1, "one"))
            && elsewhere.get(&2).await.unwrap() == Some(Item::new(0, "old"))
    })
    .await;
    let hits = elsewhere.stats().near_hits;
    let _ = elsewhere.get(&1).await.unwrap();
    assert_eq!(elsewhere.stats().near_hits, hits + 1, "served from L1");

    let _ = wb
        .write_behind(&1, Item::new(2, "one, again"))
        .await
        .unwrap();
    eventually(
        "L1 drops the replaced value",
        Duration::from_secs(2),
        || async { elsewhere.get(&1).await.unwrap() == Some(Item::new(2, "one, again")) },
    )
    .await;
    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 3);
    eventually(
        "L1 drops the entry the flush deleted",
        Duration::from_secs(2),
        || async { elsewhere.get(&2).await.unwrap().is_none() },
    )
    .await;
}

/// A cache with stale-while-revalidate: entries live past their fresh life.
fn swr_cache(fx: &Fx, namespace: &str) -> Cache<u64, Item> {
    Cache::builder(namespace)
        .store(fx.store.clone())
        .ttl(Duration::from_secs(100))
        .jitter(0.0)
        .stale_while_revalidate(Duration::from_secs(50))
        .version_by(|i: &Item| i.version)
        .build()
        .unwrap()
}

/// Entries written behind are the cache's own, as `set` writes them: the
/// expiry policy's TTL and soft expiry (so stale-while-revalidate and
/// fail-safe treat them like any other entry), the version, the codec.
#[tokio::test]
async fn entries_written_behind_are_written_as_set_writes_them() {
    let fx = Fx::new().await;
    let cache = swr_cache(&fx, "swr");
    let wb = WriteBehind::builder(fx.store.clone(), &cache)
        .build()
        .await
        .unwrap();
    let before_ms = now_ms();
    let queued = wb.write_behind(&1, Item::new(7, "behind")).await.unwrap();
    assert!(matches!(queued, WriteOutcome::Queued { .. }), "{queued:?}");
    cache.set(&2, Item::new(7, "set")).await.unwrap();

    for key in [1u64, 2] {
        let skey = cache.store_key(&key);
        let pttl: u64 = fx.redis.command(&["PTTL", skey.as_str()]).parse().unwrap();
        // Fresh for 100 s, kept 50 s more to be served stale.
        assert!(
            (100_001..=150_000).contains(&pttl),
            "key {key}: PTTL {pttl}"
        );
        let cachet::store::Read::Hit(entry) = fx.store.get(&skey).await.unwrap() else {
            panic!("key {key}: no entry");
        };
        let soft = entry.meta.soft_expiry_ms;
        assert!(
            (before_ms + 99_000..=now_ms() + 100_000).contains(&soft),
            "key {key}: soft expiry {soft}, written at {before_ms}"
        );
        assert_eq!(entry.meta.version, 7, "key {key}");
    }
    assert_eq!(cache.get(&1).await.unwrap(), Some(Item::new(7, "behind")));
}

/// Keeps values whose text is "skip" out of the cache.
struct SkipPolicy;

impl cachet::Expiry<u64, Item> for SkipPolicy {
    fn fresh_for(&self, _: &u64, value: Option<&Item>) -> Option<Duration> {
        match value {
            Some(item) if item.value == "skip" => None,
            _ => Some(Duration::from_secs(60)),
        }
    }
}

/// A value the cache's expiry policy keeps out of the cache is still queued
/// (and reaches the sink), and the key's old entry goes, as `set` does.
#[tokio::test]
async fn a_value_the_policy_does_not_cache_is_queued_and_its_old_entry_deleted() {
    let fx = Fx::new().await;
    let cache: Cache<u64, Item> = Cache::builder(support::NS)
        .store(fx.store.clone())
        .expiry(SkipPolicy)
        .version_by(|i: &Item| i.version)
        .build()
        .unwrap();
    let wb = WriteBehind::builder(fx.store.clone(), &cache)
        .build()
        .await
        .unwrap();
    let first = wb.write_behind(&1, Item::new(1, "kept")).await.unwrap();
    assert!(matches!(first, WriteOutcome::Queued { .. }), "{first:?}");
    assert_eq!(cache.get(&1).await.unwrap(), Some(Item::new(1, "kept")));

    let second = wb.write_behind(&1, Item::new(2, "skip")).await.unwrap();
    assert!(matches!(second, WriteOutcome::Queued { .. }), "{second:?}");
    let skey = cache.store_key(&1);
    assert_eq!(fx.redis.command(&["EXISTS", skey.as_str()]), "0");
    assert_eq!(wb.backlog().await.unwrap(), 2);

    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 2);
    assert_eq!(
        rows(&fx.pool).await.get(&1).cloned(),
        Some((2, "skip".to_owned()))
    );
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(since.unwrap().as_millis()).unwrap()
}

/// Collects what it is given.
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>);

impl Sink<u64, Item> for Collect {
    async fn apply(&self, batch: &[Write<u64, Item>]) -> Result<(), cachet::BoxError> {
        let mut got = self.0.lock().unwrap();
        got.extend(batch.iter().map(|w| (w.key, w.version)));
        Ok(())
    }
}

/// On a server whose certificate only a private CA vouches for, and that
/// asks for a client certificate, a flusher connects with the store's TLS
/// settings; by URL alone (the system's roots, no client certificate) it
/// cannot.
#[tokio::test]
async fn a_flusher_connects_over_tls_with_the_stores_settings() {
    use cachet_testkit::{ClientAuth, RedisServer, TestPki};
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Required);
    let store = cachet::RedisStore::builder(server.tls_url())
        .tls_ca_pem(pki.ca_pem.as_bytes())
        .tls_client_cert_pem(
            pki.client.cert_pem.as_bytes(),
            pki.client.key_pem.as_bytes(),
        )
        .connect()
        .await
        .unwrap();
    let cache = support::cache(store.clone());
    let wb = support::builder(store, &cache).build().await.unwrap();
    for id in 0..3u64 {
        let queued = wb.write_behind(&id, Item::new(1, "x")).await.unwrap();
        assert!(matches!(queued, WriteOutcome::Queued { .. }), "{queued:?}");
    }

    let by_url = wb
        .flusher(Collect::default())
        .connect(&server.tls_url())
        .await;
    assert!(
        by_url.is_err(),
        "a flusher trusted the private CA by URL alone"
    );

    let sink = Collect::default();
    let flusher = support::quick(wb.flusher(sink.clone()))
        .connect_store()
        .await
        .unwrap();
    assert_eq!(flusher.flush_once().await.unwrap(), 3);
    let mut got = sink.0.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, vec![(0, 1), (1, 1), (2, 1)]);
    assert_eq!(wb.backlog().await.unwrap(), 0);
}

/// A flusher connecting by URL to a server that accepts and never answers
/// gives up within the store's connection timeout, retries included, and the
/// error names that limit.
#[tokio::test]
async fn a_flusher_connecting_by_url_gives_up_within_the_connection_timeout() {
    use cachet_testkit::RedisServer;
    let server = RedisServer::start();
    let limit = Duration::from_millis(400);
    let store = cachet::RedisStore::builder(server.url())
        .connection_timeout(limit)
        .connect()
        .await
        .unwrap();
    let cache = support::cache(store.clone());
    let wb = support::builder(store, &cache).build().await.unwrap();
    // Listening, never accepting: connects succeed, nothing ever answers.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}/", mute.local_addr().unwrap().port());

    let started = std::time::Instant::now();
    let e = match wb.flusher(Collect::default()).connect(&url).await {
        Ok(_) => panic!("a flusher connected to a server that never answers"),
        Err(e) => e,
    };
    let took = started.elapsed();
    let shown = cachet::Report(&e).to_string();
    assert!(
        shown.contains("connection timeout (400ms)"),
        "the error does not name the limit: {shown}"
    );
    // Bounded by the limit, not by retries of it (3 attempts) nor by the
    // flusher's response timeout (its block time + 5 s).
    assert!(took < limit * 2, "took {took:?}");
}

/// A write-behind call that Redis does not answer in time fails with an
/// error that names the response timeout and its value, once.
#[tokio::test]
async fn a_write_redis_does_not_answer_names_the_response_timeout() {
    use cachet_testkit::RedisServer;
    let server = RedisServer::start();
    let store = cachet::RedisStore::builder(server.url())
        .response_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let cache = support::cache(store.clone());
    let wb = support::builder(store, &cache).build().await.unwrap();
    server.command(&["CLIENT", "PAUSE", "2000", "ALL"]);
    let e = wb.write_behind(&1, Item::new(1, "x")).await.unwrap_err();
    let shown = cachet::Report(&e).to_string();
    assert_eq!(
        shown,
        "write-behind stream cachet:items:sys:wb: queueing a write failed for key 1: \
         no reply within the response timeout (300ms)"
    );
}
