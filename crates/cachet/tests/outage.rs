//! A Redis outage during a steady workload: reads fall through to the source
//! with bounded latency, the breaker stops paying timeouts, invalidations that
//! failed are retried, and nothing is stale after recovery.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod support;

use cachet::{Cache, CircuitBreaker, RedisStore};
use cachet_testkit::{RedisServer, RedisServerOptions};
use rand::Rng as _;

const KEYS: u64 = 20;
type Db = Arc<std::sync::Mutex<HashMap<u64, u64>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_an_outage_and_nothing_is_stale_after_it() {
    // Persistence on, so entries written before the outage are still there after it.
    let mut server = RedisServer::start_with(RedisServerOptions {
        append_only: true,
        ..RedisServerOptions::default()
    });
    let store = RedisStore::builder(server.url())
        .response_timeout(Duration::from_millis(100))
        .connection_timeout(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let cache: Cache<u64, u64> = Cache::builder("outage")
        .store(store)
        .circuit_breaker(Some(CircuitBreaker::new(3, Duration::from_millis(300))))
        .build()
        .unwrap();
    let db: Db = Arc::new(std::sync::Mutex::new((0..KEYS).map(|k| (k, 0)).collect()));

    let stop = Arc::new(AtomicBool::new(false));
    let read_errors = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (cache, db, stop, read_errors, reads, slowest_us) = (
            cache.clone(),
            Arc::clone(&db),
            Arc::clone(&stop),
            Arc::clone(&read_errors),
            Arc::clone(&reads),
            Arc::clone(&slowest_us),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = rand::rng().random_range(0..KEYS);
                let db = Arc::clone(&db);
                let started = Instant::now();
                let got = cache
                    .get_or_load(&key, move || async move {
                        Ok::<_, std::io::Error>(db.lock().unwrap().get(&key).copied())
                    })
                    .await;
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                slowest_us.fetch_max(us, Ordering::Relaxed);
                reads.fetch_add(1, Ordering::Relaxed);
                if got.is_err() {
                    read_errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let writer = {
        let (cache, db, stop) = (cache.clone(), Arc::clone(&db), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut failed = 0u64;
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = rand::rng().random_range(0..KEYS);
                *db.lock().unwrap().entry(key).or_default() += 1;
                if cache.invalidate(&key).await.is_err() {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failed
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let during = cache.stats();
    server.restart();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failed_invalidations = writer.await.unwrap();

    // Invalidations that failed during the outage reach the store after it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().pending_invalidations > 0 {
        assert!(Instant::now() < deadline, "invalidations never retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stale = 0;
    for key in 0..KEYS {
        let cached = cache.peek(&key).await.unwrap();
        let truth = db.lock().unwrap().get(&key).copied();
        if cached.is_some() && cached != truth {
            stale += 1;
        }
    }
    let s = cache.stats();
    println!(
        "reads {}, read errors {}, slowest read {} µs, failed invalidations {failed_invalidations}, \
         breaker opens {}, short circuits {}, retried invalidations {}, stale {stale}",
        reads.load(Ordering::Relaxed),
        read_errors.load(Ordering::Relaxed),
        slowest_us.load(Ordering::Relaxed),
        s.breaker_opens,
        s.short_circuits,
        s.retried_invalidations,
    );
    assert_eq!(
        read_errors.load(Ordering::Relaxed),
        0,
        "reads fell through to the source"
    );
    assert!(
        during.breaker_opens >= 1,
        "the breaker opened during the outage"
    );
    assert!(during.short_circuits > 0, "and spared the timeouts");
    assert!(failed_invalidations > 0, "the outage was felt by writers");
    assert!(s.retried_invalidations > 0);
    assert_eq!(stale, 0, "nothing stale after recovery");
    // No read waited much longer than one store timeout (100 ms); the bound is
    // loose for a loaded machine, and catches reads stuck behind a dead server.
    assert!(
        slowest_us.load(Ordering::Relaxed) < 2_000_000,
        "a read took {} µs",
        slowest_us.load(Ordering::Relaxed)
    );
    // Recovered: reads are served by the store again.
    let hits = cache.stats().hits;
    for _ in 0..50 {
        cache
            .get_or_load(&0, || async { Ok::<_, std::io::Error>(Some(0)) })
            .await
            .unwrap();
    }
    assert!(
        cache.stats().hits > hits,
        "the store serves hits after recovery"
    );
}

/// A store that fails every call while it is down, as an unreachable one does.
#[derive(Debug, Default)]
struct Switch {
    down: AtomicBool,
    /// Reads wait for ever, as on a server that stopped answering.
    mute_reads: AtomicBool,
}

impl cachet::store::StoreLayer for Switch {
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: cachet::store::Op<'a>,
        call: cachet::store::StoreFuture<'a, T>,
    ) -> cachet::store::StoreFuture<'a, T> {
        if self.mute_reads.load(Ordering::SeqCst) && matches!(op, cachet::store::Op::Get(_)) {
            return Box::pin(std::future::pending());
        }
        if self.down.load(Ordering::SeqCst) && !matches!(op, cachet::store::Op::Subscribe(_)) {
            let down = cachet::StoreError::unavailable("switched off");
            return Box::pin(std::future::ready(Err(down)));
        }
        call
    }
}

type Switched = cachet::store::Layered<Switch, cachet::MemoryStore>;

fn switched() -> (Arc<Switched>, Cache<u64, String>) {
    let store = Arc::new(cachet::store::Layered::new(
        Switch::default(),
        cachet::MemoryStore::new(100),
    ));
    let cache = Cache::builder("outage")
        .store(Arc::clone(&store))
        // Never open: these tests are about what is kept, not about skipping.
        .circuit_breaker(Some(CircuitBreaker::new(u32::MAX, Duration::ZERO)))
        .group_by(|k: &u64| k % 2)
        .build()
        .unwrap();
    (store, cache)
}

/// Past `max_pending_invalidations`, a failed invalidation is dropped,
/// counted, and said once a second, not once per write.
#[tokio::test]
async fn dropped_invalidations_are_counted_and_logged_once_a_second() {
    let (logs, _guard) = support::capture_logs(tracing::Level::INFO);
    let clock = cachet::Clock::mock();
    let store = Arc::new(cachet::store::Layered::new(
        Switch::default(),
        cachet::MemoryStore::new(100),
    ));
    let mut settings = CircuitBreaker::new(u32::MAX, Duration::ZERO);
    settings.max_pending_invalidations = 5;
    let cache: Cache<u64, String> = Cache::builder("dropped")
        .store(Arc::clone(&store))
        .clock(clock.clock())
        .circuit_breaker(Some(settings))
        .build()
        .unwrap();
    store.layer().down.store(true, Ordering::SeqCst);
    for k in 1..=50 {
        cache.invalidate(&k).await.unwrap_err();
    }
    let stats = cache.stats();
    assert_eq!(stats.pending_invalidations, 5);
    assert_eq!(stats.dropped_invalidations, 45);
    let said = logs.lines_with("too many invalidations waiting");
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(said[0].contains("held_back=0"), "{}", said[0]);

    clock.advance(Duration::from_secs(1));
    cache.invalidate(&51).await.unwrap_err();
    let said = logs.lines_with("too many invalidations waiting");
    assert_eq!(said.len(), 2, "{said:#?}");
    assert!(said[1].contains("held_back=44"), "{}", said[1]);
}

/// The first reads after an outage cannot return a value whose invalidation
/// (of its key or of its group) failed during the outage, even before the
/// retry task gets to it: the read delivers it first.
#[tokio::test]
async fn no_read_after_an_outage_returns_what_the_outage_kept_from_being_invalidated() {
    let (store, cache) = switched();
    cache.set(&1, "old 1".into()).await.unwrap();
    cache.set(&2, "old 2".into()).await.unwrap();

    store.layer().down.store(true, Ordering::SeqCst);
    cache.invalidate(&1).await.unwrap_err();
    cache.invalidate_group(&0u64).await.unwrap_err();
    assert_eq!(cache.stats().pending_invalidations, 2);
    store.layer().down.store(false, Ordering::SeqCst);

    assert_eq!(cache.get(&1).await.unwrap(), None, "key 1 was invalidated");
    assert_eq!(
        cache.get(&2).await.unwrap(),
        None,
        "key 2's group was invalidated"
    );
    assert_eq!(cache.stats().pending_invalidations, 0);
    // A read that cannot deliver what it waits for does not reach the store.
    cache.set(&3, "old 3".into()).await.unwrap();
    store.layer().down.store(true, Ordering::SeqCst);
    cache.invalidate(&3).await.unwrap_err();
    store.layer().down.store(false, Ordering::SeqCst);
    let loaded = cache
        .get_or_load(&3, || async {
            Ok::<_, std::io::Error>(Some("new 3".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("new 3"));
}

/// A tag invalidation that failed during an outage is kept like a key's: the
/// first read of an entry carrying the tag delivers it before it reads the
/// tag's generation, so the entry is not served.
#[tokio::test]
async fn no_read_after_an_outage_returns_an_entry_whose_tag_invalidation_failed() {
    let store = Arc::new(cachet::store::Layered::new(
        Switch::default(),
        cachet::MemoryStore::new(100),
    ));
    let cache: Cache<u64, String> = Cache::builder("outage-tags")
        .store(Arc::clone(&store))
        .circuit_breaker(Some(CircuitBreaker::new(u32::MAX, Duration::ZERO)))
        .tags_by(|k: &u64, _: &String| vec![format!("parity {}", k % 2)])
        .build()
        .unwrap();
    cache.set(&1, "old 1".into()).await.unwrap();
    cache.set(&2, "old 2".into()).await.unwrap();

    store.layer().down.store(true, Ordering::SeqCst);
    cache.invalidate_tag("parity 1").await.unwrap_err();
    assert_eq!(cache.stats().pending_invalidations, 1);
    store.layer().down.store(false, Ordering::SeqCst);

    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "key 1's tag was invalidated"
    );
    assert_eq!(cache.stats().pending_invalidations, 0);
    assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("old 2"));
}

/// Kept invalidations are delivered as soon as a call succeeds, without
/// waiting for a read of their keys.
#[tokio::test]
async fn kept_invalidations_are_delivered_once_the_store_answers() {
    let (store, cache) = switched();
    for k in 1..=50 {
        cache.set(&k, "old".into()).await.unwrap();
    }
    store.layer().down.store(true, Ordering::SeqCst);
    for k in 1..=50 {
        cache.invalidate(&k).await.unwrap_err();
    }
    assert_eq!(cache.stats().pending_invalidations, 50);
    store.layer().down.store(false, Ordering::SeqCst);
    cache.set(&100, "unrelated".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().pending_invalidations > 0 {
        assert!(
            Instant::now() < deadline,
            "kept invalidations never delivered"
        );
        tokio::task::yield_now().await;
    }
    for k in 1..=50 {
        let key = cache.store_key(&k);
        let read = cachet::Store::get(store.inner(), &key).await.unwrap();
        assert!(
            matches!(read, cachet::store::Read::Miss),
            "key {k}: {read:?}"
        );
    }
}

/// Calls already waiting on the store when the breaker opens fail at once
/// (reads fall back to the loader) instead of waiting out their timeout.
#[tokio::test]
async fn calls_in_flight_stop_waiting_when_the_breaker_opens() {
    let store = Arc::new(cachet::store::Layered::new(
        Switch::default(),
        cachet::MemoryStore::new(100),
    ));
    let cache: Cache<u64, String> = Cache::builder("outage")
        .store(Arc::clone(&store))
        .circuit_breaker(Some(CircuitBreaker::new(2, Duration::from_secs(60))))
        .build()
        .unwrap();
    store.layer().mute_reads.store(true, Ordering::SeqCst);
    let waiting: Vec<_> = (0..10u64)
        .map(|k| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load(&k, move || async move {
                        Ok::<_, std::io::Error>(Some(format!("loaded {k}")))
                    })
                    .await
            })
        })
        .collect();
    // Let every read reach the store and wait there.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "the reads wait on the mute store"
    );
    // Two failures elsewhere open the breaker.
    store.layer().down.store(true, Ordering::SeqCst);
    cache.set(&100, "x".into()).await.unwrap_err();
    cache.set(&101, "x".into()).await.unwrap_err();
    assert_eq!(cache.stats().breaker_opens, 1);
    for (k, w) in waiting.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("a read still waits on the store after the breaker opened")
            .unwrap()
            .unwrap();
        assert_eq!(got, Some(format!("loaded {k}")));
    }
}

/// A breaker with nothing kept does not wake its runtime: its retry task
/// sleeps until an invalidation is kept (or the cache is dropped), instead of
/// looking every 100 ms.
#[tokio::test]
async fn an_idle_breaker_leaves_its_runtime_asleep() {
    let metrics = tokio::runtime::Handle::current().metrics();
    // How often the runtime parks in one idle second: once for the sleep, and
    // a few times more as its timer wheel brings the deadline closer.
    let parks_in_an_idle_second = || async {
        let before = metrics.worker_park_count(0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        metrics.worker_park_count(0) - before
    };
    let alone = parks_in_an_idle_second().await;
    let tasks = metrics.num_alive_tasks();

    let cache: Cache<u64, String> = Cache::builder("idle")
        .store(cachet::MemoryStore::new(100))
        .circuit_breaker(Some(CircuitBreaker::default()))
        .build()
        .unwrap();
    cache.set(&1, "x".into()).await.unwrap();
    // The breaker's retry task takes its first look.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let with_cache = parks_in_an_idle_second().await;
    assert!(
        with_cache <= alone + 2,
        "the runtime parked {with_cache} times in an idle second with a cache, {alone} without"
    );
    // Dropping the cache ends its retry task.
    drop(cache);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), tasks);
}

/// A store that stalls once a load has begun: its fill fails (as one that
/// timed out does) and anything after it never answers.
#[derive(Debug, Default)]
struct StallAfterLoad {
    stalled: AtomicBool,
}

impl cachet::store::StoreLayer for StallAfterLoad {
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: cachet::store::Op<'a>,
        call: cachet::store::StoreFuture<'a, T>,
    ) -> cachet::store::StoreFuture<'a, T> {
        if !self.stalled.load(Ordering::SeqCst) {
            return call;
        }
        match op {
            cachet::store::Op::Fill(_) => Box::pin(std::future::ready(Err(
                cachet::StoreError::timeout(Duration::from_millis(500)),
            ))),
            _ => Box::pin(std::future::pending()),
        }
    }
}

/// The loaded value of a fill that failed is returned at once: the lease's
/// release goes on in the background (or the lease expires), the caller does
/// not wait on a store that just failed a second time.
#[tokio::test]
async fn a_failed_fill_returns_the_value_without_waiting_for_the_release() {
    let store = Arc::new(cachet::store::Layered::new(
        StallAfterLoad::default(),
        cachet::MemoryStore::new(100),
    ));
    let cache: Cache<u64, String> = Cache::builder("stall")
        .store(Arc::clone(&store))
        .circuit_breaker(None)
        .build()
        .unwrap();
    let stalling = Arc::clone(&store);
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        cache.get_or_load(&1, move || async move {
            stalling.layer().stalled.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Some("loaded".to_owned()))
        }),
    )
    .await
    .expect("the caller waits on the release of its lease")
    .unwrap();
    assert_eq!(got.as_deref(), Some("loaded"));
    assert_eq!(cache.stats().store_errors, 1);
}
