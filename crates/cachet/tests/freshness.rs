//! Freshness on both stores: stale-while-revalidate, refresh-ahead, early
//! refresh, fail-safe, loader timeouts. Soft expiry follows a mock clock, so no
//! test waits for a TTL.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet::{Cache, CacheBuilder, Clock, ErrorKind, LoadOptions, MockClock, RefreshAhead};
use support::{Fx, Gate};

type Res<T> = Result<T, std::io::Error>;

const TTL: Duration = Duration::from_secs(10);

/// A builder on the fixture's store whose soft expiry follows a mock clock.
fn builder(fx: &Fx) -> (CacheBuilder<u64, String>, MockClock) {
    match fx {
        Fx::Memory { clock, .. } => (fx.builder("fresh").ttl(TTL).jitter(0.0), clock.clone()),
        Fx::Redis { .. } => {
            let clock = Clock::mock();
            let b = fx
                .builder("fresh")
                .ttl(TTL)
                .jitter(0.0)
                .clock(clock.clock());
            (b, clock)
        }
    }
}

/// One of two caches that stand for two processes sharing a store: soft
/// expiry on `clock`, stale values served for a minute.
fn two_processes(b: CacheBuilder<u64, String>, clock: &MockClock) -> Cache<u64, String> {
    b.ttl(TTL)
        .jitter(0.0)
        .clock(clock.clock())
        .stale_while_revalidate(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A loader that counts its calls and returns `value`.
fn counted(
    loads: &Arc<AtomicU64>,
    value: &str,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Res<Option<String>>> + Send>> + Send + 'static
{
    let (loads, value) = (Arc::clone(loads), value.to_owned());
    move || {
        Box::pin(async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Res::Ok(Some(value))
        })
    }
}

/// Waits (bounded) until the cache holds `want` for `key`.
async fn until_cached(cache: &Cache<u64, String>, key: u64, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.peek(&key).await.unwrap().as_deref() != Some(want) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{want:?} never cached"
        );
        tokio::task::yield_now().await;
    }
}

on_both_stores!(
    stale_values_are_served_while_one_refresh_runs,
    past_the_window_callers_wait_for_a_load,
    an_invalidation_wins_over_a_background_refresh,
    fail_safe_serves_the_last_value_and_throttles_the_source,
    the_soft_timeout_serves_stale_and_the_load_still_fills,
    hot_keys_are_refreshed_ahead,
    early_refresh_is_likelier_near_expiry,
);

async fn stale_values_are_served_while_one_refresh_runs(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b
        .stale_while_revalidate(Duration::from_secs(60))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    cache.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));

    let release = Gate::default();
    let mut stale = 0;
    for _ in 0..50 {
        let (loads, release) = (Arc::clone(&loads), release.clone());
        let v = cache
            .get_or_load(&1, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                release.wait().await;
                Res::Ok(Some("v2".to_owned()))
            })
            .await
            .unwrap();
        if v.as_deref() == Some("v1") {
            stale += 1;
        }
    }
    assert_eq!(stale, 50, "every caller got the stale value at once");
    release.open();
    until_cached(&cache, 1, "v2").await;
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one refresh");
    let s = cache.stats();
    assert_eq!((s.stale_hits, s.refreshes), (50, 1), "{s:?}");
    // Fresh again: no more refreshes.
    cache.get_or_load(&1, counted(&loads, "v3")).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

async fn past_the_window_callers_wait_for_a_load(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b
        .stale_while_revalidate(Duration::from_secs(5))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    cache.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(6));
    let v = cache.get_or_load(&1, counted(&loads, "v2")).await.unwrap();
    assert_eq!(v.as_deref(), Some("v2"), "no stale value past the window");
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v2"));
    assert_eq!(cache.stats().stale_hits, 0);
}

async fn an_invalidation_wins_over_a_background_refresh(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b
        .stale_while_revalidate(Duration::from_secs(60))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    cache.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));
    let loading = Gate::default();
    let release = Gate::default();
    let stale = {
        let (loading, release) = (loading.clone(), release.clone());
        cache
            .get_or_load(&1, move || async move {
                loading.open();
                release.wait().await;
                Res::Ok(Some("read before the write".to_owned()))
            })
            .await
            .unwrap()
    };
    assert_eq!(stale.as_deref(), Some("v1"));
    loading.wait().await;
    cache.invalidate(&1).await.unwrap();
    release.open();
    // The refresh ends with a refused fill.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().refused_fills == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refresh never ended"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(cache.peek(&1).await.unwrap(), None, "the invalidation won");
}

async fn fail_safe_serves_the_last_value_and_throttles_the_source(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b
        .fail_safe(Duration::from_secs(60), Duration::from_secs(5))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    cache.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    let failing = |loads: &Arc<AtomicU64>| {
        let loads = Arc::clone(loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Res::<Option<String>>::Err(std::io::Error::other("database down"))
        }
    };
    clock.advance(TTL + Duration::from_secs(10));
    let v = cache.get_or_load(&1, failing(&loads)).await.unwrap();
    assert_eq!(v.as_deref(), Some("v1"), "fail-safe");
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    // Within the throttle, the source is left alone.
    clock.advance(Duration::from_secs(1));
    let v = cache.get_or_load(&1, failing(&loads)).await.unwrap();
    assert_eq!(v.as_deref(), Some("v1"));
    assert_eq!(loads.load(Ordering::SeqCst), 2, "throttled");
    // After it, the source is tried again.
    clock.advance(Duration::from_secs(5));
    let v = cache.get_or_load(&1, failing(&loads)).await.unwrap();
    assert_eq!(v.as_deref(), Some("v1"));
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    assert_eq!(cache.stats().fail_safe_serves, 3);
    // Past the maximum staleness, the error reaches the caller.
    clock.advance(Duration::from_secs(60));
    let e = cache.get_or_load(&1, failing(&loads)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Load);
    assert_eq!(
        cachet::Report(&e).to_string(),
        "cache `fresh`: loading key `1` failed: database down"
    );
    // Without any stale value, too.
    let e = cache.get_or_load(&2, failing(&loads)).await.unwrap_err();
    assert!(e.to_string().contains("key `2`"), "{e}");
    // An invalidation drops the throttled fallback.
    cache.get_or_load(&3, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));
    assert!(cache.get_or_load(&3, failing(&loads)).await.is_ok());
    cache.invalidate(&3).await.unwrap();
    assert!(cache.get_or_load(&3, failing(&loads)).await.is_err());
}

async fn the_soft_timeout_serves_stale_and_the_load_still_fills(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b
        .fail_safe(Duration::from_secs(60), Duration::ZERO)
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    cache.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));
    let release = Gate::default();
    let v = {
        let release = release.clone();
        cache
            .get_or_load_with(
                &1,
                LoadOptions::new().soft_timeout(Duration::from_millis(20)),
                move || async move {
                    release.wait().await;
                    Res::Ok(Some("v2".to_owned()))
                },
            )
            .await
            .unwrap()
    };
    assert_eq!(v.as_deref(), Some("v1"), "stale after the soft timeout");
    assert_eq!(cache.stats().soft_timeouts, 1);
    release.open();
    until_cached(&cache, 1, "v2").await;
}

async fn hot_keys_are_refreshed_ahead(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b
        .refresh_ahead(RefreshAhead::new(
            Duration::from_secs(3),
            3,
            Duration::from_secs(10),
        ))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    cache.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    cache
        .get_or_load(&2, counted(&loads, "cold"))
        .await
        .unwrap();
    // Outside the zone: no refresh however often it is read.
    for _ in 0..10 {
        cache.get_or_load(&1, counted(&loads, "v2")).await.unwrap();
    }
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    clock.advance(TTL - Duration::from_secs(2));
    cache
        .get_or_load(&2, counted(&loads, "cold2"))
        .await
        .unwrap();
    for _ in 0..3 {
        let v = cache.get_or_load(&1, counted(&loads, "v2")).await.unwrap();
        assert_eq!(v.as_deref(), Some("v1"), "served from the cache meanwhile");
    }
    until_cached(&cache, 1, "v2").await;
    assert_eq!(cache.stats().refreshes, 1);
    assert_eq!(
        cache.peek(&2).await.unwrap().as_deref(),
        Some("cold"),
        "read once: not refreshed"
    );
    // The refreshed entry has a new fresh life.
    clock.advance(Duration::from_secs(5));
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("v2"));
}

async fn early_refresh_is_likelier_near_expiry(fx: Fx) {
    let (b, clock) = builder(&fx);
    let cache = b.early_refresh(1.0).build().unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    // A load that takes 50 ms: Δ in the envelope.
    let slow = {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Res::Ok(Some("v1".to_owned()))
        }
    };
    cache.get_or_load(&1, slow).await.unwrap();
    // 5 s before expiry with Δ = 50 ms: probability e^-100 per read.
    clock.advance(TTL - Duration::from_secs(5));
    for _ in 0..200 {
        cache.get_or_load(&1, counted(&loads, "v2")).await.unwrap();
    }
    assert_eq!(cache.stats().refreshes, 0);
    // 20 ms before expiry: e^-0.4 ≈ 0.67 per read.
    clock.advance(Duration::from_millis(4_980));
    for _ in 0..30 {
        cache.get_or_load(&1, counted(&loads, "v2")).await.unwrap();
    }
    // One of those reads started a refresh (the chance that none did is 0.33^30).
    until_cached(&cache, 1, "v2").await;
    assert!(cache.stats().refreshes >= 1);
}

/// Across processes (two connections), a stale key is refreshed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_across_processes() {
    let fx = Fx::redis().await;
    let clock = Clock::mock();
    let second = cachet::RedisStore::connect(&fx.server().unwrap().url())
        .await
        .unwrap();
    let make = |b| two_processes(b, &clock);
    let a = make(fx.builder("fresh"));
    let b = make(Cache::builder("fresh").store(second));
    let loads = Arc::new(AtomicU64::new(0));
    a.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));
    let release = Gate::default();
    let slow = |loads: &Arc<AtomicU64>, release: &Gate| {
        let (loads, release) = (Arc::clone(loads), release.clone());
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            release.wait().await;
            Res::Ok(Some("v2".to_owned()))
        }
    };
    assert_eq!(
        a.get_or_load(&1, slow(&loads, &release))
            .await
            .unwrap()
            .as_deref(),
        Some("v1")
    );
    // Wait until a's refresh holds the lease, then b is served stale too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.stats().refreshes == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        assert_eq!(
            b.get_or_load(&1, slow(&loads, &release))
                .await
                .unwrap()
                .as_deref(),
            Some("v1")
        );
    }
    release.open();
    until_cached(&a, 1, "v2").await;
    assert_eq!(
        loads.load(Ordering::SeqCst),
        2,
        "one initial load, one refresh"
    );
    assert_eq!(b.stats().refreshes, 0, "b found the lease taken");
}

/// A layer over a Redis store whose first lease-taking `acquire` (a refresh's)
/// waits at a gate, and which reports when that refresh gives its lease back
/// or fills.
#[derive(Debug, Default)]
struct HeldRefresh {
    entered: tokio::sync::Notify,
    gate: Gate,
    done: tokio::sync::Notify,
    gated: std::sync::atomic::AtomicBool,
}

impl cachet::store::StoreLayer for HeldRefresh {
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: cachet::store::Op<'a>,
        call: cachet::store::StoreFuture<'a, T>,
    ) -> cachet::store::StoreFuture<'a, T> {
        match op {
            cachet::store::Op::Acquire(_, cachet::store::AcquireMode::Replace)
                if !self.gated.swap(true, Ordering::SeqCst) =>
            {
                Box::pin(async move {
                    self.entered.notify_one();
                    self.gate.wait().await;
                    call.await
                })
            }
            cachet::store::Op::Fill(_) | cachet::store::Op::Release(_) => Box::pin(async move {
                let done = call.await;
                self.done.notify_one();
                done
            }),
            _ => call,
        }
    }
}

/// The interleaving behind a second refresh across processes: b's refresh
/// checks the entry (stale) and only then asks for the lease; meanwhile a's
/// refresh fills and frees the lease. b must then see the fresh entry and give
/// its lease back, not load a second time.
#[tokio::test]
async fn a_refresh_granted_the_lease_after_another_filled_does_not_load() {
    let fx = Fx::redis().await;
    let clock = Clock::mock();
    let second = cachet::RedisStore::connect(&fx.server().unwrap().url())
        .await
        .unwrap();
    let held = Arc::new(cachet::store::Layered::new(HeldRefresh::default(), second));
    let make = |b| two_processes(b, &clock);
    let a = make(fx.builder("fresh"));
    let b = make(Cache::builder("fresh").store(held.clone()));
    let loads = Arc::new(AtomicU64::new(0));
    a.get_or_load(&1, counted(&loads, "v1")).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));

    // b is served stale; its refresh checked the entry and waits to acquire.
    let b_served = b.get_or_load(&1, counted(&loads, "v2 from b")).await;
    assert_eq!(b_served.unwrap().as_deref(), Some("v1"));
    held.layer().entered.notified().await;

    // a refreshes and fills meanwhile.
    let a_served = a.get_or_load(&1, counted(&loads, "v2")).await;
    assert_eq!(a_served.unwrap().as_deref(), Some("v1"));
    until_cached(&a, 1, "v2").await;

    // b's refresh now gets the free lease, and must not load again.
    held.layer().gate.open();
    held.layer().done.notified().await;
    assert_eq!(loads.load(Ordering::SeqCst), 2, "one load, one refresh");
    assert_eq!(
        b.stats().refreshes,
        0,
        "b's refresh found the entry refreshed"
    );
    assert_eq!(a.peek(&1).await.unwrap().as_deref(), Some("v2"));
}

/// A source outage fails over every hot key within one throttle period; the
/// cache says so once a second, with the count of keys it did not name.
#[tokio::test]
async fn fail_safe_warns_once_a_second_per_cache_not_once_per_key() {
    let (logs, _guard) = support::capture_logs(tracing::Level::INFO);

    let clock = Clock::mock();
    let cache: Cache<u64, String> = Cache::builder("failsafe-logs")
        .ttl(TTL)
        .jitter(0.0)
        .clock(clock.clock())
        .fail_safe(Duration::from_secs(60), Duration::from_secs(5))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    for key in 0..100 {
        cache.get_or_load(&key, counted(&loads, "v")).await.unwrap();
    }
    clock.advance(TTL + Duration::from_secs(1));
    let failing = || async { Res::<Option<String>>::Err(std::io::Error::other("database down")) };
    for key in 0..100 {
        let v = cache.get_or_load(&key, failing).await.unwrap();
        assert_eq!(v.as_deref(), Some("v"), "fail-safe for key {key}");
    }
    assert_eq!(cache.stats().fail_safe_serves, 100);
    let warned = logs.lines_with("serving the last value (fail-safe)");
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].contains("held_back=0"), "{}", warned[0]);

    // A second later, past the throttle, the next failure is logged with the
    // count of those held back.
    clock.advance(Duration::from_secs(6));
    cache.get_or_load(&0, failing).await.unwrap();
    let warned = logs.lines_with("serving the last value (fail-safe)");
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(warned[1].contains("held_back=99"), "{}", warned[1]);
}
