//! The Bloom filter against cache penetration, on both stores.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use cachet::store::BloomKey;
use cachet::{BloomFilter, BloomOptions, ErrorKind, KeyLayout, MemoryStore, RedisStore, Store};
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::Fx;

fn layout() -> KeyLayout {
    KeyLayout::new("cachet:", "users").unwrap()
}

fn filter(fx: &Fx, n: u64, p: f64) -> BloomFilter {
    BloomFilter::new(&layout(), fx.store(), BloomOptions::new(n, p)).unwrap()
}

fn memory_filter(n: u64, p: f64) -> BloomFilter {
    BloomFilter::new(
        &layout(),
        Arc::new(MemoryStore::default()),
        BloomOptions::new(n, p),
    )
    .unwrap()
}

#[test]
fn sizing_matches_the_formulas() {
    let ln2 = std::f64::consts::LN_2;
    for (n, p) in [
        (1u64, 0.5),
        (100, 0.1),
        (1_000, 0.01),
        (10_000, 0.01),
        (1_000_000, 0.001),
        (50_000_000, 0.0001),
    ] {
        let f = memory_filter(n, p);
        #[allow(clippy::cast_precision_loss)]
        let nf = n as f64;
        let m = (-nf * p.ln() / (ln2 * ln2)).ceil();
        let k = (m / nf * ln2).round().max(1.0);
        #[allow(clippy::cast_precision_loss)]
        let bits = f.bits() as f64;
        assert_eq!(bits, m, "m for n={n} p={p}");
        assert_eq!(f64::from(f.hashes()), k, "k for n={n} p={p}");
        assert_eq!(f.bytes(), f.bits().div_ceil(8));
    }
    // Known values: 9.59 bits and 7 hashes per key at 1%.
    let f = memory_filter(10_000, 0.01);
    assert_eq!((f.bits(), f.hashes()), (95_851, 7));
    let f = memory_filter(1_000_000, 0.001);
    assert_eq!((f.bits(), f.hashes()), (14_377_588, 10));
}

#[test]
fn invalid_options_are_config_errors() {
    for (n, p) in [
        (0, 0.01),
        (10, 0.0),
        (10, 1.0),
        (10, f64::NAN),
        (1 << 40, 0.01),
    ] {
        let e = BloomFilter::new(
            &layout(),
            Arc::new(MemoryStore::default()),
            BloomOptions::new(n, p),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{n} {p}");
        assert!(e.to_string().contains("Bloom filter"), "{e}");
    }
}

/// A fixed key has fixed positions: every process, every build, both stores.
#[test]
fn positions_are_stable() {
    let f = memory_filter(10_000, 0.01);
    assert_eq!(f.key().as_str(), "cachet:users:sys:bloom:{users}:m95851:k7");
    assert_eq!(
        f.positions(&42u64),
        [49_817, 11_949, 69_932, 32_064, 90_047, 52_179, 14_311]
    );
    assert_eq!(
        f.positions("user:42"),
        [64_249, 64_618, 64_987, 65_356, 65_725, 66_094, 66_463]
    );
    // The positions of a key are those of its escaped form (as in store keys),
    // whatever its type; distinct keys have distinct escaped forms.
    assert_eq!(f.positions(&42u64), f.positions("42"));
    assert_ne!(
        f.positions(&("acme".to_owned(), 7u8)),
        f.positions("acme,7")
    );
    let other = BloomFilter::new(
        &KeyLayout::new("app:", "users").unwrap(),
        Arc::new(MemoryStore::default()),
        BloomOptions::new(10_000, 0.01),
    )
    .unwrap();
    assert_eq!(other.positions("user:42"), f.positions("user:42"));
}

on_both_stores!(
    an_unbuilt_filter_rules_nothing_out,
    no_false_negatives,
    false_positive_rate_is_near_the_target,
    a_rebuild_replaces_the_filter,
    checks_during_rebuilds_never_fail,
    a_replace_is_never_seen_half_done,
);

async fn an_unbuilt_filter_rules_nothing_out(fx: Fx) {
    let f = filter(&fx, 1_000, 0.01);
    assert!(f.might_contain("anything").await.unwrap());
    // Insertions into a filter that is not built are dropped: they would make
    // a filter that lacks every other existing key.
    f.insert("early").await.unwrap();
    f.rebuild(["a", "b"].map(String::from)).await.unwrap();
    assert!(f.might_contain("a").await.unwrap());
    assert!(!f.might_contain("early").await.unwrap());
    // Options of another shape are another filter, not built yet.
    let bigger = filter(&fx, 2_000, 0.01);
    assert!(bigger.might_contain("anything").await.unwrap());
}

async fn no_false_negatives(fx: Fx) {
    let f = filter(&fx, 10_000, 0.01);
    let g = filter(&fx, 10_000, 0.01); // another handle, as another process has
    f.rebuild((0..2_000u64).map(|i| format!("rebuilt-{i}")))
        .await
        .unwrap();
    for i in 0..500u64 {
        f.insert(&i).await.unwrap();
    }
    g.insert_many(500..3_000u64).await.unwrap();
    g.insert_many(["", "a b{}", "é"].map(String::from))
        .await
        .unwrap();
    for i in 0..3_000u64 {
        assert!(g.might_contain(&i).await.unwrap(), "{i}");
        assert!(f.might_contain(&i).await.unwrap(), "{i}");
    }
    for i in 0..2_000u64 {
        let key = format!("rebuilt-{i}");
        assert!(g.might_contain(key.as_str()).await.unwrap(), "{key}");
    }
    for key in ["", "a b{}", "é"] {
        assert!(f.might_contain(key).await.unwrap(), "{key:?}");
    }
}

/// Counts the keys of `keys` the filter reports, 8 checks in flight at a time.
async fn count_present(f: &BloomFilter, keys: Vec<u64>) -> u64 {
    let present = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in keys.chunks(keys.len().div_ceil(8)) {
        let (f, chunk, present) = (f.clone(), chunk.to_vec(), Arc::clone(&present));
        tasks.spawn(async move {
            for key in chunk {
                if f.might_contain(&key).await.unwrap() {
                    present.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    present.load(Ordering::Relaxed)
}

async fn false_positive_rate_is_near_the_target(fx: Fx) {
    const N: u64 = 10_000;
    const QUERIES: u64 = 100_000;
    let store = if fx.server().is_some() {
        "redis"
    } else {
        "memory"
    };
    let mut rng = StdRng::seed_from_u64(7);
    // Random keys: inserted ones below 2^63, absent ones above, so none is both.
    let inserted: Vec<u64> = (0..N).map(|_| rng.random_range(0..1 << 63)).collect();
    let absent: Vec<u64> = (0..QUERIES)
        .map(|_| rng.random_range(1 << 63..=u64::MAX))
        .collect();
    // Sequential ids, as a database hands them out and an enumeration probes them.
    let sequential: Vec<u64> = (N..N + QUERIES).collect();
    for (case, members, probes) in [
        ("random", inserted, absent),
        ("sequential", (0..N).collect(), sequential),
    ] {
        let f = BloomFilter::new(
            &KeyLayout::new("cachet:", case).unwrap(),
            fx.store(),
            BloomOptions::new(N, 0.01),
        )
        .unwrap();
        f.rebuild(std::iter::empty::<u64>()).await.unwrap();
        f.insert_many(members.iter().copied()).await.unwrap();
        assert_eq!(count_present(&f, members).await, N, "no false negatives");
        let fp = count_present(&f, probes).await;
        #[allow(clippy::cast_precision_loss)]
        let rate = fp as f64 / QUERIES as f64;
        println!(
            "{store}, {case} keys: {fp} false positives in {QUERIES} absent keys = {:.3}% \
             (target 1%, m = {}, k = {})",
            rate * 100.0,
            f.bits(),
            f.hashes()
        );
        assert!((0.005..=0.02).contains(&rate), "{case}: rate {rate}");
    }
}

async fn a_rebuild_replaces_the_filter(fx: Fx) {
    let f = filter(&fx, 10_000, 0.01);
    f.rebuild((0..5_000u64).map(|i| format!("old-{i}")))
        .await
        .unwrap();
    f.rebuild((0..5_000u64).map(|i| format!("new-{i}")))
        .await
        .unwrap();
    let mut old_present = 0u32;
    for i in 0..5_000u64 {
        let new = format!("new-{i}");
        assert!(f.might_contain(new.as_str()).await.unwrap(), "{new}");
        if f.might_contain(format!("old-{i}").as_str()).await.unwrap() {
            old_present += 1;
        }
    }
    // Half-full at 1%, the rate is about 0.03%: the old keys are gone.
    assert!(
        old_present < 50,
        "{old_present} of 5000 old keys still present"
    );
    if let Some(server) = fx.server() {
        assert_eq!(server.command(&["DBSIZE"]), "1", "no temporary key left");
    }
}

/// Rebuilds alternate between two key sets that share some keys; checks of the
/// shared keys, running meanwhile, must never fail and always find them. The
/// filter spans several MiB, so that on Redis each rebuild is uploaded in
/// several chunks. (That no check sees a replace half done is tested at the
/// store level, in `a_replace_is_never_seen_half_done`.)
async fn checks_during_rebuilds_never_fail(fx: Fx) {
    let f = filter(&fx, 3_000_000, 0.01);
    assert!(f.bytes() > 3 << 20, "{} bytes", f.bytes());
    let shared: Vec<String> = (0..200).map(|i| format!("shared-{i}")).collect();
    let set = |tag: &str| {
        let own = (0..200).map(|i| format!("{tag}-{i}"));
        shared.iter().cloned().chain(own).collect::<Vec<_>>()
    };
    let (a, b) = (set("a"), set("b"));
    f.rebuild(a.clone()).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let mut checkers = tokio::task::JoinSet::new();
    for t in 0..4 {
        let (f, shared, done) = (f.clone(), shared.clone(), Arc::clone(&done));
        checkers.spawn(async move {
            let mut checks = 0u64;
            for round in 0..1_000_000usize {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let key = &shared[(round * 7 + t) % shared.len()];
                let present = f
                    .might_contain(key.as_str())
                    .await
                    .expect("a check during a rebuild failed");
                assert!(present, "{key} missed during a rebuild");
                checks += 1;
                tokio::task::yield_now().await;
            }
            checks
        });
    }
    for round in 0..6 {
        let keys = if round % 2 == 0 { &b } else { &a };
        f.rebuild(keys.clone()).await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut checks = 0;
    while let Some(n) = checkers.join_next().await {
        checks += n.unwrap();
    }
    assert!(checks > 0);
    // The last rebuild was `a`.
    for key in &a {
        assert!(f.might_contain(key.as_str()).await.unwrap(), "{key}");
    }
    let mut b_only = 0;
    for i in 0..200 {
        if f.might_contain(format!("b-{i}").as_str()).await.unwrap() {
            b_only += 1;
        }
    }
    assert!(
        b_only < 5,
        "{b_only} keys of the replaced set still present"
    );
}

/// Replaces alternate between a bitmap set only in its first MiB and one set
/// only after it, and checks of one bit from each part run meanwhile. Each
/// bitmap has one of the two bits clear, so every check must say "absent"; a
/// check that saw the first part of one bitmap with the rest of the other, or a
/// bitmap not yet complete, would not.
async fn a_replace_is_never_seen_half_done(fx: Fx) {
    const SPLIT: usize = 1 << 20;
    let store = fx.store();
    let filter = BloomKey::new(&layout(), (3 * SPLIT as u64 + 1) * 8, 1);
    let len = usize::try_from(filter.byte_len()).unwrap();
    let head: Bytes = (0..len).map(|i| if i < SPLIT { 0xff } else { 0 }).collect();
    let tail: Bytes = (0..len).map(|i| if i < SPLIT { 0 } else { 0xff }).collect();
    let probe = [0, filter.bits() - 1];
    store
        .bloom_bits()
        .unwrap()
        .bloom_replace(&filter, head.clone())
        .await
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let mut checkers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (store, filter, done) = (Arc::clone(&store), filter.clone(), Arc::clone(&done));
        checkers.spawn(async move {
            let mut checks = 0u64;
            for _ in 0..1_000_000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let seen = store
                    .bloom_bits()
                    .unwrap()
                    .bloom_check(&filter, &probe)
                    .await
                    .expect("a check during a replace failed");
                assert!(!seen, "a check saw a half-done replace");
                checks += 1;
                tokio::task::yield_now().await;
            }
            checks
        });
    }
    for round in 0..8 {
        let bitmap = if round % 2 == 0 { &tail } else { &head };
        store
            .bloom_bits()
            .unwrap()
            .bloom_replace(&filter, bitmap.clone())
            .await
            .unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut checks = 0;
    while let Some(n) = checkers.join_next().await {
        checks += n.unwrap();
    }
    assert!(checks > 0);
}

#[tokio::test]
async fn the_filter_lives_under_a_sys_key_without_ttl() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let f = filter(&fx, 10_000, 0.01);
    f.rebuild(0..1_000u64).await.unwrap();
    f.insert(&5_000u64).await.unwrap();
    assert!(f.might_contain(&5_000u64).await.unwrap());
    // With the scripts loaded: one script call per check and per batch of 1024
    // inserted keys.
    server.command(&["CONFIG", "RESETSTAT"]);
    f.insert_many(2_000..5_000u64).await.unwrap();
    let after_insert = server.command(&["INFO", "commandstats"]);
    assert!(
        after_insert.contains("cmdstat_evalsha:calls=3,"),
        "{after_insert}"
    );
    for i in 0..10u64 {
        assert!(f.might_contain(&i).await.unwrap());
    }
    let stats = server.command(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_evalsha:calls=13,"), "{stats}");
    let key = f.key().as_str();
    assert!(key.contains(":sys:"), "{key}");
    assert_eq!(server.command(&["PTTL", key]), "-1", "no TTL");
    assert_eq!(server.command(&["TYPE", key]), "string");
    assert_eq!(server.command(&["STRLEN", key]), f.bytes().to_string());
    assert_eq!(server.command(&["DBSIZE"]), "1");
    for forbidden in [
        "cmdstat_keys:",
        "cmdstat_scan:",
        "cmdstat_flushdb:",
        "cmdstat_flushall:",
    ] {
        assert!(!stats.contains(forbidden), "{forbidden} in\n{stats}");
    }
}

#[tokio::test]
async fn a_lost_or_foreign_filter_rules_nothing_out() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let f = filter(&fx, 1_000, 0.01);
    f.rebuild(["a"].map(String::from)).await.unwrap();
    assert!(!f.might_contain("b").await.unwrap());
    // Lost: a restart without persistence, an eviction, someone's DEL.
    server.command(&["DEL", f.key().as_str()]);
    assert!(f.might_contain("b").await.unwrap());
    f.insert("c").await.unwrap();
    assert_eq!(
        server.command(&["EXISTS", f.key().as_str()]),
        "0",
        "not recreated"
    );
    // Something else under the filter's key is not a filter either.
    server.command(&["SET", f.key().as_str(), "x"]);
    assert!(f.might_contain("b").await.unwrap());
    f.insert("c").await.unwrap();
    assert_eq!(server.command(&["GET", f.key().as_str()]), "x");
}

#[tokio::test]
async fn processes_share_the_filter() {
    let fx = Fx::redis().await;
    let url = fx.server().unwrap().url();
    let other: Arc<dyn Store> = Arc::new(RedisStore::connect(&url).await.unwrap());
    let here = filter(&fx, 1_000, 0.01);
    let there = BloomFilter::new(&layout(), other, BloomOptions::new(1_000, 0.01)).unwrap();
    here.rebuild(["a"].map(String::from)).await.unwrap();
    there.insert("b").await.unwrap();
    assert!(here.might_contain("b").await.unwrap());
    assert!(there.might_contain("a").await.unwrap());
    assert!(!there.might_contain("c").await.unwrap());
}

on_both_stores!(a_cache_with_a_filter_skips_loads_of_keys_that_do_not_exist);

async fn a_cache_with_a_filter_skips_loads_of_keys_that_do_not_exist(fx: Fx) {
    let cache: cachet::Cache<u64, String> = fx
        .builder("users")
        .bloom(BloomOptions::new(1_000, 0.01))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let load = |id: u64| {
        let loads = Arc::clone(&loads);
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>((id < 100).then(|| format!("user {id}")))
        }
    };
    // Not built yet: nothing is ruled out.
    assert_eq!(cache.get_or_load(&5_000, load(5_000)).await.unwrap(), None);
    assert_eq!(loads.load(Ordering::SeqCst), 1);

    cache.bloom().unwrap().rebuild(0..100u64).await.unwrap();
    for id in 0..100u64 {
        assert!(cache.get_or_load(&id, load(id)).await.unwrap().is_some());
    }
    assert_eq!(loads.load(Ordering::SeqCst), 101);
    for id in 10_000..11_000u64 {
        assert_eq!(cache.get_or_load(&id, load(id)).await.unwrap(), None);
    }
    let absent_loads = loads.load(Ordering::SeqCst) - 101;
    assert!(
        absent_loads < 50,
        "{absent_loads} of 1000 absent keys loaded"
    );
    assert_eq!(cache.stats().bloom_rejections, 1000 - absent_loads);

    // A key written through the cache joins the filter.
    cache.set(&20_000, "new".into()).await.unwrap();
    cache.invalidate(&20_000).await.unwrap();
    assert!(
        cache
            .bloom()
            .unwrap()
            .might_contain(&20_000u64)
            .await
            .unwrap()
    );
}
