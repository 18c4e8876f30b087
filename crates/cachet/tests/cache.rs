//! Behaviour of `Cache` on both stores: read-through, negative caching,
//! single-flight, the reader/writer race, leases, corruption, TTLs, degradation.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet::{Cache, ErrorKind, MemoryStore, NoCodec, Stats};
use support::{Fx, Gate, Row};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
    name: String,
}

fn user(id: u64, name: &str) -> User {
    User {
        id,
        name: name.into(),
    }
}

type Res<T> = Result<T, std::io::Error>;

on_both_stores!(
    a_panicking_loader_fails_every_caller_once_and_leaves_no_lease,
    an_expiry_policy_sets_each_entrys_life_and_can_refuse_one,
    read_through_caches_values_and_negatives,
    negative_caching_can_be_turned_off,
    concurrent_callers_share_one_load,
    concurrent_callers_share_one_error,
    reader_writer_race_leaves_no_stale_entry,
    naive_cache_aside_does_leave_a_stale_entry,
    set_during_a_load_wins,
    invalidate_detaches_a_load_in_flight,
    a_cancelled_caller_does_not_cancel_its_load,
    a_hung_loader_times_out,
    hostile_keys_are_distinct,
    two_connections_share_one_load,
    a_holder_slower_than_its_lease_cannot_touch_the_next_holders_work,
    store_level_invalidate_reaches_the_cache,
);

async fn read_through_caches_values_and_negatives(fx: Fx) {
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let load = |id: u64| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Res::Ok((id == 1).then(|| user(1, "Ada")))
        }
    };
    assert_eq!(
        cache.get_or_load(&1, load(1)).await.unwrap(),
        Some(user(1, "Ada"))
    );
    assert_eq!(
        cache.get_or_load(&1, load(1)).await.unwrap(),
        Some(user(1, "Ada"))
    );
    assert_eq!(cache.get_or_load(&2, load(2)).await.unwrap(), None);
    assert_eq!(cache.get_or_load(&2, load(2)).await.unwrap(), None);
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one load per key");
    // A cached "not found" reads as None, and a real value is never mistaken for one.
    assert_eq!(cache.get(&2).await.unwrap(), None);
    assert_eq!(cache.get(&1).await.unwrap(), Some(user(1, "Ada")));
    let s = cache.stats();
    assert_eq!(
        (s.hits, s.negative_hits, s.misses, s.loads),
        (2, 2, 2, 2),
        "{s:?}"
    );
    assert!((s.hit_rate() - 4.0 / 6.0).abs() < 1e-9);
}

async fn negative_caching_can_be_turned_off(fx: Fx) {
    let cache: Cache<u64, User> = fx
        .builder("users")
        .negative_ttl(Duration::ZERO)
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    for _ in 0..3 {
        let loads = Arc::clone(&loads);
        let v = cache
            .get_or_load(&9, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Res::Ok(None)
            })
            .await
            .unwrap();
        assert_eq!(v, None);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3);
}

async fn concurrent_callers_share_one_load(fx: Fx) {
    const CALLERS: u64 = 500;
    let cache: Cache<str, User> = fx.builder("users").build().unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let gate = Gate::default();
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (cache, loads, started, gate) = (
            cache.clone(),
            Arc::clone(&loads),
            Arc::clone(&started),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if started.fetch_add(1, Ordering::SeqCst) + 1 == CALLERS {
                gate.open();
            }
            cache
                .get_or_load("hot", move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // Hold the load until every caller has started.
                    gate.wait().await;
                    Res::Ok(Some(user(7, "hot")))
                })
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Some(user(7, "hot")));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().loads, 1);
}

async fn concurrent_callers_share_one_error(fx: Fx) {
    const CALLERS: u64 = 50;
    let cache: Cache<str, User> = fx.builder("users").build().unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let gate = Gate::default();
    let started = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (cache, loads, started, gate) = (
            cache.clone(),
            Arc::clone(&loads),
            Arc::clone(&started),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if started.fetch_add(1, Ordering::SeqCst) + 1 == CALLERS {
                gate.open();
            }
            cache
                .get_or_load("k", move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    gate.wait().await;
                    Res::Err(std::io::Error::other("db down"))
                })
                .await
        }));
    }
    let mut errors = 0;
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Load);
        assert_eq!(
            cachet::Report(&e).to_string(),
            "cache `users`: loading key `k` failed: db down"
        );
        errors += 1;
    }
    assert_eq!(errors, CALLERS);
    // Callers that arrived after the failed load finished run their own; the
    // concurrent ones shared it. Nothing is cached after an error.
    assert!(loads.load(Ordering::SeqCst) < CALLERS);
    assert_eq!(cache.peek("k").await.unwrap(), None);
}

/// The essay's race through the public API: the reader's loader reads the old
/// row, the writer commits and invalidates before the reader fills.
async fn reader_writer_race_leaves_no_stale_entry(fx: Fx) {
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let db = Arc::new(Row::new("old"));
    let read_done = Gate::default();
    let write_done = Gate::default();

    let reader = {
        let (cache, db, read_done, write_done) = (
            cache.clone(),
            Arc::clone(&db),
            read_done.clone(),
            write_done.clone(),
        );
        tokio::spawn(async move {
            cache
                .get_or_load(&42, move || async move {
                    let row = db.read();
                    read_done.open();
                    write_done.wait().await;
                    Res::Ok(Some(user(42, &row)))
                })
                .await
        })
    };
    read_done.wait().await;
    db.write("new");
    cache.invalidate(&42).await.unwrap();
    write_done.open();

    // The reader still returns what it read: its read overlapped the write.
    assert_eq!(reader.await.unwrap().unwrap(), Some(user(42, "old")));
    // But the cache did not keep it.
    assert_eq!(cache.peek(&42).await.unwrap(), None);
    assert_eq!(cache.stats().refused_fills, 1);
    let fresh = cache
        .get_or_load(
            &42,
            move || async move { Res::Ok(Some(user(42, &db.read()))) },
        )
        .await
        .unwrap();
    assert_eq!(fresh, Some(user(42, "new")));
    assert_eq!(cache.peek(&42).await.unwrap(), Some(user(42, "new")));
}

/// The same interleaving with plain get/set/invalidate does leave the old value:
/// the test above can tell the difference.
async fn naive_cache_aside_does_leave_a_stale_entry(fx: Fx) {
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let db = Row::new("old");
    assert_eq!(cache.get(&42).await.unwrap(), None);
    let row = db.read();
    db.write("new");
    cache.invalidate(&42).await.unwrap();
    cache.set(&42, user(42, &row)).await.unwrap();
    assert_eq!(cache.peek(&42).await.unwrap(), Some(user(42, "old")));
}

async fn set_during_a_load_wins(fx: Fx) {
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let read_done = Gate::default();
    let write_done = Gate::default();
    let reader = {
        let (cache, read_done, write_done) = (cache.clone(), read_done.clone(), write_done.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    read_done.open();
                    write_done.wait().await;
                    Res::Ok(Some(user(1, "old")))
                })
                .await
        })
    };
    read_done.wait().await;
    cache.set(&1, user(1, "new")).await.unwrap();
    write_done.open();
    reader.await.unwrap().unwrap();
    assert_eq!(cache.peek(&1).await.unwrap(), Some(user(1, "new")));
    assert_eq!(cache.stats().refused_fills, 1);
}

/// A caller arriving after an invalidation does not join a load that started
/// before it: it loads the new row itself.
async fn invalidate_detaches_a_load_in_flight(fx: Fx) {
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let db = Arc::new(Row::new("old"));
    let read_done = Gate::default();
    let release_old = Gate::default();
    let old = {
        let (cache, db, read_done, release_old) = (
            cache.clone(),
            Arc::clone(&db),
            read_done.clone(),
            release_old.clone(),
        );
        tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    let row = db.read();
                    read_done.open();
                    release_old.wait().await;
                    Res::Ok(Some(user(1, &row)))
                })
                .await
        })
    };
    read_done.wait().await;
    db.write("new");
    cache.invalidate(&1).await.unwrap();
    let late = cache
        .get_or_load(
            &1,
            move || async move { Res::Ok(Some(user(1, &db.read()))) },
        )
        .await
        .unwrap();
    assert_eq!(late, Some(user(1, "new")));
    release_old.open();
    assert_eq!(old.await.unwrap().unwrap(), Some(user(1, "old")));
    assert_eq!(cache.peek(&1).await.unwrap(), Some(user(1, "new")));
    assert_eq!(cache.stats().loads, 2);
}

/// A caller that is cancelled does not cancel its load: the load goes on in its
/// task, its followers get its value, and it fills the cache.
async fn a_cancelled_caller_does_not_cancel_its_load(fx: Fx) {
    let cache: Cache<u64, User> = fx.builder("users").build().unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let started = Gate::default();
    let release = Gate::default();
    let leader = {
        let (cache, loads, started, release) = (
            cache.clone(),
            Arc::clone(&loads),
            started.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    started.open();
                    release.wait().await;
                    Res::Ok(Some(user(1, "loaded")))
                })
                .await
        })
    };
    started.wait().await;
    let follower = {
        let (cache, loads) = (cache.clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Res::Ok(Some(user(1, "follower")))
                })
                .await
        })
    };
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    release.open();
    assert_eq!(
        follower.await.unwrap().unwrap(),
        Some(user(1, "loaded")),
        "the follower got the load the cancelled caller started"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.peek(&1).await.unwrap(), Some(user(1, "loaded")));
}

/// A loader that never returns is abandoned at the hard timeout; its lease is
/// released and the next call loads.
async fn a_hung_loader_times_out(fx: Fx) {
    let cache: Cache<u64, User> = fx
        .builder("users")
        .hard_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let e = cache
        .get_or_load(&1, move || async move {
            std::future::pending::<()>().await;
            Res::Ok(Some(user(1, "never")))
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.is_timeout());
    assert_eq!(
        e.to_string(),
        "cache `users`: loading key `1` failed: the loader did not finish within 50ms"
    );
    assert_eq!(cache.stats().load_timeouts, 1);
    let v = cache
        .get_or_load(&1, move || async move { Res::Ok(Some(user(1, "next"))) })
        .await
        .unwrap();
    assert_eq!(v, Some(user(1, "next")));
    assert_eq!(cache.stats().lease_waits, 0, "the lease was released");
}

async fn hostile_keys_are_distinct(fx: Fx) {
    let cache: Cache<str, String> = fx.builder("strings").build().unwrap();
    let keys = [
        "a b", "a\nb", "*", "{", "}", "{x}", "é", "日本", "", "%", "a,b", "a%2Cb",
    ];
    for k in keys {
        cache.set(k, format!("value of {k:?}")).await.unwrap();
    }
    for k in keys {
        assert_eq!(
            cache.get(k).await.unwrap(),
            Some(format!("value of {k:?}")),
            "{k:?}"
        );
    }
    cache.invalidate("{").await.unwrap();
    assert_eq!(cache.get("{").await.unwrap(), None);
    assert_eq!(
        cache.get("{x}").await.unwrap(),
        Some("value of \"{x}\"".into())
    );
}

/// Two caches with their own store handles (their own connections, on Redis)
/// behave like two processes: one loads, the other waits for its fill.
async fn two_connections_share_one_load(fx: Fx) {
    let a: Cache<u64, User> = fx.builder("users").build().unwrap();
    let b: Cache<u64, User> = match &fx {
        // Same store, separate cache: separate in-process single-flight.
        Fx::Memory { store, .. } => Cache::builder("users").memory(store.clone()),
        Fx::Redis { server, .. } => {
            Cache::builder("users").store(cachet::RedisStore::connect(&server.url()).await.unwrap())
        }
    }
    .build()
    .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let a_loading = Gate::default();
    let release = Gate::default();
    let first = {
        let (a, loads, a_loading, release) = (
            a.clone(),
            Arc::clone(&loads),
            a_loading.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            a.get_or_load(&5, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                a_loading.open();
                release.wait().await;
                Res::Ok(Some(user(5, "a")))
            })
            .await
        })
    };
    a_loading.wait().await;
    let second = {
        let (b, loads) = (b.clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            b.get_or_load(&5, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Res::Ok(Some(user(5, "b")))
            })
            .await
        })
    };
    // Let `b` find the lease taken before releasing `a`'s load: wait until it counted a lease wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.stats().lease_waits == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never waited for the lease"
        );
        tokio::task::yield_now().await;
    }
    release.open();
    assert_eq!(first.await.unwrap().unwrap(), Some(user(5, "a")));
    assert_eq!(second.await.unwrap().unwrap(), Some(user(5, "a")));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let s: Stats = b.stats();
    assert_eq!((s.lease_waits, s.lease_wait_timeouts, s.loads), (1, 0, 0));
}

/// A waiter for another process's lease waits as long as its `lease_wait`
/// says, however many times it looks: a holder whose load takes 1.5 s (of
/// the paused runtime's time) fills for both, under a `lease_wait` of 2 s.
#[tokio::test(start_paused = true)]
async fn a_waiter_waits_its_whole_lease_wait_for_a_slow_holder() {
    let fx = Fx::memory();
    let Fx::Memory { store, .. } = &fx else {
        unreachable!()
    };
    let a: Cache<u64, User> = fx.builder("users").build().unwrap();
    let b: Cache<u64, User> = Cache::builder("users")
        .memory(store.clone())
        .lease_wait(Duration::from_secs(2))
        .build()
        .unwrap();
    let (a_loading, release) = (Gate::default(), Gate::default());
    let holder = {
        let (a, a_loading, release) = (a.clone(), a_loading.clone(), release.clone());
        tokio::spawn(async move {
            a.get_or_load(&5, move || async move {
                a_loading.open();
                release.wait().await;
                Res::Ok(Some(user(5, "a")))
            })
            .await
        })
    };
    a_loading.wait().await;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            b.get_or_load(&5, || async { Res::Ok(Some(user(5, "b"))) })
                .await
        })
    };
    // The mock clock stands still, so `a`'s lease does not expire meanwhile;
    // `b` looks for the fill every few milliseconds, some 190 times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    release.open();
    assert_eq!(holder.await.unwrap().unwrap(), Some(user(5, "a")));
    assert_eq!(waiter.await.unwrap().unwrap(), Some(user(5, "a")));
    let s = b.stats();
    assert_eq!(
        (s.lease_waits, s.lease_wait_timeouts, s.loads),
        (1, 0, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn loader_slower_than_its_lease_is_refused() {
    let fx = Fx::memory();
    let Fx::Memory { clock, .. } = &fx else {
        unreachable!()
    };
    let clock = clock.clone();
    let cache: Cache<u64, User> = fx
        .builder("users")
        .lease_ttl(Duration::from_millis(100))
        .build()
        .unwrap();
    let v = cache
        .get_or_load(&1, move || async move {
            clock.advance(Duration::from_millis(250));
            Res::Ok(Some(user(1, "slow")))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(user(1, "slow")), "the caller still gets its value");
    assert_eq!(cache.peek(&1).await.unwrap(), None, "but it is not cached");
    assert_eq!(cache.stats().refused_fills, 1);
}

#[tokio::test]
async fn jitter_spreads_ttls_uniformly_within_bounds() {
    let fx = Fx::memory();
    let ttl = Duration::from_secs(100);
    let jittered: Cache<u64, u64> = fx.builder("j").ttl(ttl).jitter(0.2).build().unwrap();
    let fixed: Cache<u64, u64> = fx.builder("f").ttl(ttl).jitter(0.0).build().unwrap();
    let mut seen = Vec::new();
    for k in 0..500u64 {
        jittered.set(&k, k).await.unwrap();
        fixed.set(&k, k).await.unwrap();
        let t = jittered.ttl(&k).await.unwrap().unwrap();
        assert!(
            t >= Duration::from_secs(80) && t <= Duration::from_secs(120),
            "{t:?}"
        );
        seen.push(t.as_millis());
        assert_eq!(fixed.ttl(&k).await.unwrap(), Some(ttl));
    }
    // Uniform over 80..120 s: both halves are populated.
    let low = seen.iter().filter(|&&ms| ms < 100_000).count();
    assert!((150..350).contains(&low), "{low} of 500 below the base TTL");
}

#[tokio::test]
async fn entries_expire_with_the_clock() {
    let fx = Fx::memory();
    let Fx::Memory { clock, .. } = &fx else {
        unreachable!()
    };
    let cache: Cache<u64, u64> = fx
        .builder("t")
        .ttl(Duration::from_secs(10))
        .jitter(0.0)
        .negative_ttl(Duration::from_secs(2))
        .build()
        .unwrap();
    cache.set(&1, 1).await.unwrap();
    cache
        .get_or_load(&2, move || async move { Res::Ok(None) })
        .await
        .unwrap();
    clock.advance(Duration::from_secs(3));
    assert_eq!(cache.get(&1).await.unwrap(), Some(1));
    let reloaded = cache
        .get_or_load(&2, move || async move { Res::Ok(Some(2)) })
        .await
        .unwrap();
    assert_eq!(
        reloaded,
        Some(2),
        "the negative entry expired after its own TTL"
    );
    clock.advance(Duration::from_secs(8));
    assert_eq!(cache.get(&1).await.unwrap(), None);
}

#[tokio::test]
async fn builder_rejects_bad_settings_with_clear_messages() {
    let e = Cache::<u64, u64>::builder("bad name").build().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(
        e.to_string().contains("invalid namespace \"bad name\""),
        "{e}"
    );
    let e = Cache::<u64, u64>::builder("ok")
        .jitter(1.0)
        .build()
        .unwrap_err();
    assert!(
        e.to_string().contains("jitter must be in [0, 1), got 1"),
        "{e}"
    );
    let e = Cache::<u64, u64>::builder("ok")
        .ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("ttl must be positive"), "{e}");
    let e = Cache::<u64, u64>::builder("ok")
        .prefix("a{b")
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("invalid key prefix"), "{e}");
}

/// A store that offers only the core protocol: every capability is missing.
#[derive(Debug)]
struct CoreOnly;

impl cachet::store::StoreLayer for CoreOnly {}

impl CoreOnly {
    /// The in-process store behind a layer, with its capabilities hidden.
    fn over(store: MemoryStore) -> impl cachet::Store {
        struct Hidden(cachet::store::Layered<CoreOnly, MemoryStore>);
        impl std::fmt::Debug for Hidden {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CoreOnly")
            }
        }
        impl cachet::Store for Hidden {
            fn payload_kind(&self) -> cachet::store::PayloadKind {
                self.0.payload_kind()
            }
            fn get<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
            ) -> cachet::store::StoreFuture<'a, cachet::store::Read> {
                self.0.get(key)
            }
            fn acquire<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
                mode: cachet::store::AcquireMode,
                lease_ttl: Duration,
            ) -> cachet::store::StoreFuture<'a, cachet::store::Acquire> {
                self.0.acquire(key, mode, lease_ttl)
            }
            fn fill<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
                lease: &'a cachet::store::LeaseToken,
                entry: cachet::store::Entry,
                ttl: Duration,
            ) -> cachet::store::StoreFuture<'a, cachet::store::Fill> {
                self.0.fill(key, lease, entry, ttl)
            }
            fn release<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
                lease: &'a cachet::store::LeaseToken,
            ) -> cachet::store::StoreFuture<'a, bool> {
                self.0.release(key, lease)
            }
            fn set<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
                entry: cachet::store::Entry,
                ttl: Duration,
            ) -> cachet::store::StoreFuture<'a, ()> {
                self.0.set(key, entry, ttl)
            }
            fn invalidate<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
            ) -> cachet::store::StoreFuture<'a, ()> {
                self.0.invalidate(key)
            }
            fn ttl<'a>(
                &'a self,
                key: &'a cachet::StoreKey,
            ) -> cachet::store::StoreFuture<'a, cachet::store::Ttls> {
                self.0.ttl(key)
            }
        }
        Hidden(cachet::store::Layered::new(CoreOnly, store))
    }
}

#[tokio::test]
async fn build_rejects_settings_the_store_cannot_serve_naming_both() {
    use cachet::Store as _;
    use cachet::store::Capability;
    // A layer offers exactly the capabilities of the store it wraps.
    let layered = cachet::store::Layered::new(CoreOnly, MemoryStore::new(10));
    for capability in Capability::ALL {
        assert_eq!(
            capability.offered_by(&layered),
            capability.offered_by(&MemoryStore::new(10)),
            "{capability}"
        );
    }
    assert!(layered.groups().is_some() && layered.bus().is_none());

    let core = std::sync::Arc::new(CoreOnly::over(MemoryStore::new(10)));
    let cases: [(&str, cachet::CacheBuilder<u64, u64>); 4] = [
        ("group_by", Cache::builder("caps").group_by(|k: &u64| k % 2)),
        (
            "near_cache",
            Cache::builder("caps").near_cache(cachet::NearCache::new(10, Duration::from_secs(1))),
        ),
        (
            "bloom",
            Cache::builder("caps").bloom(cachet::BloomOptions::new(100, 0.01)),
        ),
        (
            "version_by",
            Cache::builder("caps").version_by(|v: &u64| *v),
        ),
    ];
    for ((setting, builder), capability) in cases.into_iter().zip([
        Capability::Groups,
        Capability::InvalidationBus,
        Capability::BloomBits,
        Capability::VersionedSet,
    ]) {
        let e = builder.store(core.clone()).build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert_eq!(
            e.to_string(),
            format!(
                "cache `caps`: invalid configuration: {setting} needs a store that offers \
                 {capability}, and CoreOnly does not"
            )
        );
    }
    // The same settings build on a store that offers what they need.
    Cache::<u64, u64>::builder("caps")
        .group_by(|k: &u64| k % 2)
        .version_by(|v: &u64| *v)
        .memory(MemoryStore::new(10))
        .build()
        .unwrap();
}

#[tokio::test]
async fn no_codec_works_in_process_and_is_refused_on_redis() {
    #[derive(Clone, Debug, PartialEq)]
    struct NotSerde(u8);
    let cache: Cache<u64, NotSerde> = Cache::builder("objects").codec(NoCodec).build().unwrap();
    cache.set(&1, NotSerde(1)).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), Some(NotSerde(1)));

    let fx = Fx::redis().await;
    let e = fx
        .builder::<u64, NotSerde>("objects")
        .codec(NoCodec)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("needs a codec"), "{e}");
}

/// The counters a `metrics` recorder holds after a publication, for `cache`.
fn published(
    recorder: &metrics_util::debugging::DebuggingRecorder,
    cache: &str,
) -> std::collections::HashMap<String, metrics_util::debugging::DebugValue> {
    metrics::with_local_recorder(recorder, cachet::metrics::publish);
    let mut seen = std::collections::HashMap::new();
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        let labels: Vec<_> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        if labels.iter().any(|(k, v)| k == "cache" && v == cache) {
            assert_eq!(labels, vec![("cache".to_owned(), cache.to_owned())]);
            seen.insert(key.key().name().to_owned(), value);
        }
    }
    seen
}

#[tokio::test]
async fn metrics_facade_receives_the_same_counters() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let cache: Cache<u64, u64> =
        metrics::with_local_recorder(&recorder, || Cache::builder("metered").build().unwrap());
    cache
        .get_or_load(&1, move || async move { Res::Ok(Some(1)) })
        .await
        .unwrap();
    cache
        .get_or_load(&1, move || async move { Res::Ok(Some(1)) })
        .await
        .unwrap();
    cache
        .get_or_load(&2, move || async move { Res::Ok(None) })
        .await
        .unwrap();
    cache.get(&2).await.unwrap();
    let stats = cache.stats();
    let seen: std::collections::HashMap<String, u64> = published(&recorder, "metered")
        .into_iter()
        .filter_map(|(name, v)| match v {
            DebugValue::Counter(n) => Some((name, n)),
            _ => None,
        })
        .collect();
    assert_eq!(seen["cachet_hits_total"], stats.hits);
    assert_eq!(seen["cachet_misses_total"], stats.misses);
    assert_eq!(seen["cachet_negative_hits_total"], stats.negative_hits);
    assert_eq!(seen["cachet_loads_total"], stats.loads);
    assert_eq!(
        (stats.hits, stats.misses, stats.negative_hits, stats.loads),
        (1, 2, 1, 2)
    );
    // Every documented counter and gauge is published.
    for (name, field) in cachet::metrics::COUNTERS {
        assert_eq!(seen.get(*name), Some(&field(&stats)), "{name}");
    }
}

/// A recorder installed after the caches were built receives everything from
/// its first publication on; caches sharing a namespace are summed.
#[tokio::test]
async fn a_recorder_installed_after_the_caches_were_built_receives_their_counts() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let store = MemoryStore::new(1_000);
    let a: Cache<u64, u64> = Cache::builder("late")
        .memory(store.clone())
        .build()
        .unwrap();
    let b: Cache<u64, u64> = Cache::builder("late").memory(store).build().unwrap();
    a.set(&1, 1).await.unwrap();
    for _ in 0..3 {
        assert_eq!(a.get(&1).await.unwrap(), Some(1));
    }
    assert_eq!(b.get(&1).await.unwrap(), Some(1));
    assert_eq!(b.get(&2).await.unwrap(), None);

    let recorder = DebuggingRecorder::new();
    let seen = published(&recorder, "late");
    assert_eq!(seen.get("cachet_hits_total"), Some(&DebugValue::Counter(4)));
    assert_eq!(
        seen.get("cachet_misses_total"),
        Some(&DebugValue::Counter(1))
    );
    for gauge in cachet::metrics::GAUGES {
        assert!(seen.contains_key(*gauge), "{gauge}: {seen:?}");
    }
    // Later counts reach the same recorder at its next publication.
    assert_eq!(a.get(&1).await.unwrap(), Some(1));
    let seen = published(&recorder, "late");
    assert_eq!(seen.get("cachet_hits_total"), Some(&DebugValue::Counter(5)));
    drop((a, b));
}

/// A loader slower than its lease: its lease expires, another process takes a
/// new lease and loads; the slow holder's fill is refused and does not disturb
/// the new holder, whose fill lands.
async fn a_holder_slower_than_its_lease_cannot_touch_the_next_holders_work(fx: Fx) {
    let lease_ttl = Duration::from_millis(100);
    let other_process = |fx: &Fx| match fx {
        Fx::Memory { store, .. } => Cache::builder("users").memory(store.clone()),
        Fx::Redis { store, .. } => Cache::builder("users").store(store.clone()),
    };
    let slow: Cache<u64, User> = fx.builder("users").lease_ttl(lease_ttl).build().unwrap();
    let next: Cache<u64, User> = other_process(&fx).lease_ttl(lease_ttl).build().unwrap();

    let slow_loading = Gate::default();
    let slow_release = Gate::default();
    let slow_task = {
        let (slow, slow_loading, slow_release) =
            (slow.clone(), slow_loading.clone(), slow_release.clone());
        tokio::spawn(async move {
            slow.get_or_load(&1, move || async move {
                slow_loading.open();
                slow_release.wait().await;
                Res::Ok(Some(user(1, "slow")))
            })
            .await
        })
    };
    slow_loading.wait().await;
    // Let the slow holder's lease expire.
    match &fx {
        Fx::Memory { clock, .. } => clock.advance(Duration::from_millis(150)),
        Fx::Redis { .. } => tokio::time::sleep(Duration::from_millis(150)).await,
    }
    let next_loading = Gate::default();
    let next_release = Gate::default();
    let next_task = {
        let (next, next_loading, next_release) =
            (next.clone(), next_loading.clone(), next_release.clone());
        tokio::spawn(async move {
            next.get_or_load(&1, move || async move {
                next_loading.open();
                next_release.wait().await;
                Res::Ok(Some(user(1, "next")))
            })
            .await
        })
    };
    next_loading.wait().await;
    // The slow holder finishes while the next one holds its (new) lease.
    slow_release.open();
    assert_eq!(slow_task.await.unwrap().unwrap(), Some(user(1, "slow")));
    assert_eq!(slow.stats().refused_fills, 1);
    assert_eq!(
        slow.peek(&1).await.unwrap(),
        None,
        "the slow fill wrote nothing"
    );
    next_release.open();
    assert_eq!(next_task.await.unwrap().unwrap(), Some(user(1, "next")));
    assert_eq!(
        next.stats().refused_fills,
        0,
        "the next holder's lease survived"
    );
    assert_eq!(next.peek(&1).await.unwrap(), Some(user(1, "next")));
}

/// An invalidation that knows only the store key (an outbox relay, a deferred
/// delete) removes the entry a cache holds, in process too, and revokes a lease.
async fn store_level_invalidate_reaches_the_cache(fx: Fx) {
    let store = fx.store();
    let users: Cache<(String, u64), User> = fx.builder("users").build().unwrap();
    let key = ("acme,inc".to_owned(), 42);
    users.set(&key, user(42, "Ada")).await.unwrap();
    let other = ("acme,inc".to_owned(), 43);
    users.set(&other, user(43, "Bob")).await.unwrap();
    let parsed = cachet::StoreKey::parse(users.store_key(&key).as_str()).unwrap();
    store.invalidate(&parsed).await.unwrap();
    assert_eq!(users.get(&key).await.unwrap(), None);
    assert_eq!(users.get(&other).await.unwrap(), Some(user(43, "Bob")));

    // A load in flight when the store-level invalidation lands cannot fill.
    let loading = Gate::default();
    let release = Gate::default();
    let reader = {
        let (users, key, loading, release) =
            (users.clone(), key.clone(), loading.clone(), release.clone());
        tokio::spawn(async move {
            users
                .get_or_load(&key, move || async move {
                    loading.open();
                    release.wait().await;
                    Res::Ok(Some(user(42, "old")))
                })
                .await
        })
    };
    loading.wait().await;
    store.invalidate(&parsed).await.unwrap();
    release.open();
    reader.await.unwrap().unwrap();
    assert_eq!(users.peek(&key).await.unwrap(), None);
}

/// Lives by key: key 1 a long one, key 2 a short one; odd values are not cached.
struct ByKey;

impl cachet::Expiry<u64, u64> for ByKey {
    fn fresh_for(&self, key: &u64, value: Option<&u64>) -> Option<Duration> {
        match value {
            Some(v) if v % 2 == 1 => None,
            _ if *key == 1 => Some(Duration::from_secs(600)),
            _ => Some(Duration::from_secs(5)),
        }
    }
}

async fn an_expiry_policy_sets_each_entrys_life_and_can_refuse_one(fx: Fx) {
    let cache: Cache<u64, u64> = fx
        .builder("expiry")
        .ttl(Duration::from_secs(60))
        .expiry(ByKey)
        .build()
        .unwrap();
    for key in [1, 2] {
        let v = cache
            .get_or_load(&key, || async { Res::Ok(Some(10)) })
            .await;
        assert_eq!(v.unwrap(), Some(10));
    }
    let long = cache.ttl(&1).await.unwrap().unwrap();
    let short = cache.ttl(&2).await.unwrap().unwrap();
    assert!(
        long > Duration::from_secs(590) && long <= Duration::from_secs(600),
        "{long:?}"
    );
    assert!(
        short > Duration::ZERO && short <= Duration::from_secs(5),
        "{short:?}"
    );
    // A value the policy refuses is returned but not cached…
    let v = cache.get_or_load(&3, || async { Res::Ok(Some(11)) }).await;
    assert_eq!(v.unwrap(), Some(11));
    assert_eq!(cache.peek(&3).await.unwrap(), None);
    assert_eq!(cache.ttl(&3).await.unwrap(), None);
    // …and writing one removes the value that was there.
    cache.set(&1, 13).await.unwrap();
    assert_eq!(cache.peek(&1).await.unwrap(), None);
    assert_eq!(cache.stats().loads, 3);
}

/// A load whose task is dropped before it ends (its runtime shut down) ends
/// the call with an error naming the key, not a panic: the loader went with
/// the task.
#[test]
fn a_load_dropped_with_its_runtime_ends_the_call_with_an_error() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let loads = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let cache: Cache<u64, u64> = Cache::builder("dropped").build().unwrap();
    let mut call = Box::pin(cache.get_or_load(&1, || async { Res::Ok(Some(1)) }));
    let mut cx = Context::from_waker(Waker::noop());
    {
        // The load is spawned on `loads`, which never runs it.
        let _on = loads.enter();
        assert!(call.as_mut().poll(&mut cx).is_pending());
    }
    drop(loads);
    let Poll::Ready(outcome) = call.as_mut().poll(&mut cx) else {
        panic!("the call still waits for a load that is gone");
    };
    let e = outcome.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Load);
    assert_eq!(e.key(), Some("1"));
    assert!(e.to_string().contains("task was dropped"), "{e}");
}

async fn a_panicking_loader_fails_every_caller_once_and_leaves_no_lease(fx: Fx) {
    let cache: Cache<u64, u64> = fx.builder("panics").build().unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let release = Gate::default();
    let mut callers = Vec::new();
    for i in 0..20 {
        let (cache, runs, release) = (cache.clone(), Arc::clone(&runs), release.clone());
        callers.push(tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    release.wait().await;
                    if i < 100 {
                        panic!("boom in the loader");
                    }
                    Res::Ok(Some(1))
                })
                .await
        }));
    }
    // Every caller has joined the one flight before the loader panics.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().coalesced < 19 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            cache.stats()
        );
        tokio::task::yield_now().await;
    }
    release.open();
    for caller in callers {
        let e = caller
            .await
            .expect("no panic reaches a caller")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Load);
        assert_eq!(e.key(), Some("1"));
        assert!(
            e.to_string()
                .contains("the loader panicked: boom in the loader"),
            "{e}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one load for the flight");
    let ttls = fx.store().ttl(&cache.store_key(&1)).await.unwrap();
    assert_eq!(ttls.lease, None, "the lease was released");
    // A single caller gets the error too, and the next load works.
    let e = cache
        .get_or_load(&2, || async {
            if true {
                panic!("alone");
            }
            Res::Ok(None)
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("the loader panicked: alone"), "{e}");
    let v = cache.get_or_load(&2, || async { Res::Ok(Some(2)) }).await;
    assert_eq!(v.unwrap(), Some(2));
}

/// However caches reach one `MemoryStore` (its typed tier, the `Store`
/// protocol, a shared `Arc<dyn Store>`), one namespace is one set of entries,
/// leases and groups.
#[tokio::test]
async fn every_way_onto_one_memory_store_sees_the_same_entries() {
    let store = MemoryStore::new(100);
    let build =
        |b: cachet::CacheBuilder<str, String>| b.group_by(|k: &str| k.len() % 2).build().unwrap();
    let typed = build(Cache::builder("users").memory(store.clone()));
    let protocol = build(Cache::builder("users").store(store.clone()));
    let shared =
        build(Cache::builder("users").store(Arc::new(store.clone()) as Arc<dyn cachet::Store>));

    typed.set("a b", "1".into()).await.unwrap();
    protocol.set("cd", "2".into()).await.unwrap();
    for cache in [&typed, &protocol, &shared] {
        assert_eq!(cache.get("a b").await.unwrap().as_deref(), Some("1"));
        assert_eq!(cache.get("cd").await.unwrap().as_deref(), Some("2"));
    }
    shared.invalidate("a b").await.unwrap();
    assert_eq!(typed.get("a b").await.unwrap(), None);
    protocol.invalidate_group(&0usize).await.unwrap();
    assert_eq!(typed.get("cd").await.unwrap(), None);

    // A store-level invalidation reaches the typed entry.
    typed.set("e", "3".into()).await.unwrap();
    cachet::Store::invalidate(&store, &typed.store_key("e"))
        .await
        .unwrap();
    assert_eq!(typed.get("e").await.unwrap(), None);

    // One lease: the typed cache loads, the protocol cache waits for its fill.
    let loads = Arc::new(AtomicU64::new(0));
    let (loading, release) = (Gate::default(), Gate::default());
    let first = {
        let (typed, loads, loading, release) = (
            typed.clone(),
            Arc::clone(&loads),
            loading.clone(),
            release.clone(),
        );
        tokio::spawn(async move {
            typed
                .get_or_load("f", move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    loading.open();
                    release.wait().await;
                    Res::Ok(Some("typed".to_owned()))
                })
                .await
        })
    };
    loading.wait().await;
    let second = {
        let (protocol, loads) = (protocol.clone(), Arc::clone(&loads));
        tokio::spawn(async move {
            protocol
                .get_or_load("f", move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Res::Ok(Some("protocol".to_owned()))
                })
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while protocol.stats().lease_waits == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never waited for the lease"
        );
        tokio::task::yield_now().await;
    }
    release.open();
    assert_eq!(first.await.unwrap().unwrap().as_deref(), Some("typed"));
    assert_eq!(second.await.unwrap().unwrap().as_deref(), Some("typed"));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

/// Loads and lease waits are timed into their histograms, against the global
/// recorder (the only test of this binary that installs one), installed after
/// the caches were built.
#[tokio::test]
async fn loads_and_lease_waits_are_timed_into_histograms() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let store = MemoryStore::new(1_000);
    let a: Cache<u64, u64> = Cache::builder("timed")
        .memory(store.clone())
        .build()
        .unwrap();
    let b: Cache<u64, u64> = Cache::builder("timed").memory(store).build().unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).expect("no other global recorder in this process");
    let (a_loading, release) = (Gate::default(), Gate::default());
    let holder = {
        let (a, a_loading, release) = (a.clone(), a_loading.clone(), release.clone());
        tokio::spawn(async move {
            a.get_or_load(&1, move || async move {
                a_loading.open();
                release.wait().await;
                Res::Ok(Some(1))
            })
            .await
        })
    };
    a_loading.wait().await;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.get_or_load(&1, || async { Res::Ok(Some(2)) }).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.stats().lease_waits == 0 {
        assert!(tokio::time::Instant::now() < deadline, "b never waited");
        tokio::task::yield_now().await;
    }
    release.open();
    assert_eq!(holder.await.unwrap().unwrap(), Some(1));
    assert_eq!(waiter.await.unwrap().unwrap(), Some(1));

    let mut observations = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Histogram(values) = value {
            let cache = key.key().labels().find(|l| l.key() == "cache").unwrap();
            assert_eq!(cache.value(), "timed");
            observations.insert(key.key().name().to_owned(), values.len());
        }
    }
    assert_eq!(observations.get("cachet_load_duration_seconds"), Some(&1));
    assert_eq!(
        observations.get("cachet_lease_wait_duration_seconds"),
        Some(&1)
    );
}

/// Loads and fills run in `cachet.load` and `cachet.fill` spans that carry
/// the cache, a hash of the key (never the key) and the outcome.
#[tokio::test]
async fn loads_and_fills_are_traced_with_their_outcome() {
    let (logs, _guard) = support::capture_logs(tracing::Level::DEBUG);

    let cache: Cache<String, u64> = Cache::builder("traced").build().unwrap();
    let secret = "user-4711@example.com".to_owned();
    cache
        .get_or_load(&secret, || async { Res::Ok(Some(1)) })
        .await
        .unwrap();
    cache
        .get_or_load(&"nobody".to_owned(), || async { Res::Ok(None) })
        .await
        .unwrap();
    let text = logs.text();
    let closed = |name: &str, outcome: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("{name}{{")) && l.contains("close"))
            .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
            .filter(|l| l.contains("cache=\"traced\"") && l.contains("key_hash="))
            .count()
    };
    assert_eq!(closed("cachet.load", "found"), 1, "{text}");
    assert_eq!(closed("cachet.load", "not_found"), 1, "{text}");
    assert_eq!(closed("cachet.fill", "filled"), 2, "{text}");
    assert!(!text.contains("4711"), "a key in a span: {text}");
}

/// Outside a tokio runtime a load cannot run (it runs in a task of its own):
/// the call fails with an error that names the key and says why, instead of
/// panicking; a hit in process is still served, and nothing is left behind.
#[test]
fn a_load_outside_a_tokio_runtime_is_an_error_naming_the_key() {
    let cache: Cache<u64, u64> = Cache::builder("no-runtime").build().unwrap();
    let load = || async { Ok::<_, std::io::Error>(Some(1)) };
    let e = futures::executor::block_on(cache.get_or_load(&7, load)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Load);
    let text = e.to_string();
    assert!(
        text.contains("`no-runtime`") && text.contains("key `7`"),
        "{text}"
    );
    assert!(text.contains("tokio runtime"), "{text}");
    let many = futures::executor::block_on(cache.get_or_load_many(&[7, 8], |_keys| async {
        Ok::<_, std::io::Error>(std::collections::HashMap::new())
    }));
    let e = many.unwrap_err();
    assert!(e.to_string().contains("key `7`"), "{e}");

    futures::executor::block_on(cache.set(&7, 70)).unwrap();
    let hit = futures::executor::block_on(cache.get_or_load(&7, load)).unwrap();
    assert_eq!(hit, Some(70));
    assert_eq!(cache.stats().loads, 0);
}

/// Like any future, a read never polled does nothing: a `get` or
/// `get_or_load` dropped unpolled reads nothing and counts nothing, even when
/// the key is in process; polled, the same calls count their hits.
#[tokio::test]
async fn a_read_never_polled_does_nothing() {
    let cache: Cache<u64, u64> = Cache::builder("unpolled").build().unwrap();
    cache.set(&1, 10).await.unwrap();
    drop(cache.get(&1));
    drop(cache.get_or_load(&1, || async { Ok::<_, std::io::Error>(Some(0)) }));
    drop(cache.get(&2));
    assert_eq!(cache.stats().lookups(), 0);

    assert_eq!(cache.get(&1).await.unwrap(), Some(10));
    let loaded = cache
        .get_or_load(&1, || async { Ok::<_, std::io::Error>(Some(0)) })
        .await
        .unwrap();
    assert_eq!(loaded, Some(10));
    assert_eq!(cache.stats().hits, 2);
    assert_eq!(cache.stats().loads, 0);
}

/// A batch that follows another call's load of one of its keys loads that
/// key itself when the followed load ends without an outcome (here, its
/// runtime shut down under it), and the other keys as usual.
#[test]
fn a_batch_loads_a_key_whose_followed_load_ended_without_an_outcome() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let (leader_rt, batch_rt) = (runtime(), runtime());
    let cache: Cache<u64, u64> = Cache::builder("afresh").build().unwrap();
    let (started, on_start) = std::sync::mpsc::channel();
    let leader = cache.clone();
    leader_rt.spawn(async move {
        leader
            .get_or_load(&1, move || async move {
                started.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok::<_, std::io::Error>(Some(0))
            })
            .await
    });
    on_start.recv_timeout(Duration::from_secs(10)).unwrap();

    let batch = cache.clone();
    let loaded = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&loaded);
    let call = batch_rt.spawn(async move {
        batch
            .get_or_load_many(&[1, 2], move |keys: Vec<u64>| {
                seen.lock().unwrap().push(keys.clone());
                async move {
                    Ok::<_, std::io::Error>(keys.into_iter().map(|k| (k, k * 10)).collect())
                }
            })
            .await
    });
    // The batch follows key 1's load, and loads key 2 at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().coalesced == 0 || loaded.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never followed key 1's load"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*loaded.lock().unwrap(), vec![vec![2]]);
    assert!(!call.is_finished(), "the batch waits for key 1's load");

    leader_rt.shutdown_background();
    let got = batch_rt.block_on(call).unwrap().unwrap();
    assert_eq!(got, vec![Some(10), Some(20)]);
    assert_eq!(*loaded.lock().unwrap(), vec![vec![2], vec![1]]);
    assert_eq!(batch_rt.block_on(cache.get(&1)).unwrap(), Some(10));
}
