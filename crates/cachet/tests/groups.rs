//! Group invalidation by generation, on both stores.

mod support;

use cachet::{Cache, ErrorKind};
use support::{Fx, Gate};

type Res<T> = Result<T, std::io::Error>;
type TenantCache = Cache<(u64, u64), String>;

fn tenants(fx: &Fx) -> TenantCache {
    fx.builder("orders")
        .group_by(|k: &(u64, u64)| k.0)
        .build()
        .unwrap()
}

async fn fill(cache: &TenantCache, tenant: u64, ids: std::ops::Range<u64>, tag: &str) {
    for id in ids {
        let v = format!("{tag}-{tenant}-{id}");
        let got = cache
            .get_or_load(&(tenant, id), move || async move { Res::Ok(Some(v)) })
            .await
            .unwrap();
        assert!(got.is_some());
    }
}

on_both_stores!(
    invalidating_a_group_orphans_exactly_its_keys,
    a_group_invalidation_during_a_load_refuses_the_fill,
    first_fills_of_a_new_group_racing_all_land,
);

async fn invalidating_a_group_orphans_exactly_its_keys(fx: Fx) {
    let cache = tenants(&fx);
    fill(&cache, 1, 0..50, "old").await;
    fill(&cache, 2, 0..50, "old").await;
    cache.invalidate_group(&1u64).await.unwrap();
    for id in 0..50 {
        assert_eq!(cache.get(&(1, id)).await.unwrap(), None, "tenant 1, {id}");
        assert_eq!(
            cache.get(&(2, id)).await.unwrap().as_deref(),
            Some(format!("old-2-{id}").as_str())
        );
    }
    fill(&cache, 1, 0..50, "new").await;
    assert_eq!(
        cache.get(&(1, 7)).await.unwrap().as_deref(),
        Some("new-1-7")
    );
    // Plain writes land in the current generation.
    cache.set(&(1, 100), "set".into()).await.unwrap();
    assert_eq!(cache.get(&(1, 100)).await.unwrap().as_deref(), Some("set"));
}

async fn a_group_invalidation_during_a_load_refuses_the_fill(fx: Fx) {
    let cache = tenants(&fx);
    let loading = Gate::default();
    let release = Gate::default();
    let reader = {
        let (cache, loading, release) = (cache.clone(), loading.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&(1, 1), move || async move {
                    loading.open();
                    release.wait().await;
                    Res::Ok(Some("old".to_owned()))
                })
                .await
        })
    };
    loading.wait().await;
    cache.invalidate_group(&1u64).await.unwrap();
    release.open();
    assert_eq!(reader.await.unwrap().unwrap().as_deref(), Some("old"));
    assert_eq!(cache.peek(&(1, 1)).await.unwrap(), None);
    assert_eq!(cache.stats().refused_fills, 1);
}

/// Many keys of groups never seen before are filled at once, from two
/// threads: the first readers of a group must agree on its generation, or the
/// fills of all but one are refused and their entries never appear.
async fn first_fills_of_a_new_group_racing_all_land(fx: Fx) {
    const GROUPS: u64 = 2000;
    const KEYS: u64 = 4;
    let cache = tenants(&fx);
    for tenant in 100..100 + GROUPS {
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(KEYS as usize));
        let fills: Vec<_> = (0..KEYS)
            .map(|id| {
                let (cache, start) = (cache.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    cache
                        .get_or_load(&(tenant, id), move || async move {
                            Res::Ok(Some(format!("v-{tenant}-{id}")))
                        })
                        .await
                })
            })
            .collect();
        for fill in fills {
            assert!(fill.await.unwrap().unwrap().is_some());
        }
    }
    assert_eq!(cache.stats().refused_fills, 0);
    for tenant in 100..100 + GROUPS {
        for id in 0..KEYS {
            assert_eq!(
                cache.get(&(tenant, id)).await.unwrap(),
                Some(format!("v-{tenant}-{id}")),
                "tenant {tenant}, key {id}"
            );
        }
    }
}

/// The generation key is evicted (or lost with a Redis restart): the old
/// entries are still in Redis, but never read again.
/// A generation key holding garbage or a key of another type (planted, or
/// corrupt) is replaced by a new generation: the group's reads, fills and
/// invalidations keep working, and its old entries stay orphaned.
#[tokio::test]
async fn a_planted_generation_is_replaced_not_fatal() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache = tenants(&fx);
    fill(&cache, 1, 0..5, "old").await;
    fill(&cache, 2, 0..5, "old").await;
    let garbage = cache.store_key(&(1, 0)).group_key().unwrap();
    let listed = cache.store_key(&(2, 0)).group_key().unwrap();
    assert_eq!(
        server.command(&["SET", garbage.as_str(), "not a number"]),
        "OK"
    );
    assert_eq!(server.command(&["DEL", listed.as_str()]), "1");
    assert_eq!(server.command(&["RPUSH", listed.as_str(), "x"]), "1");
    for tenant in [1, 2] {
        assert_eq!(cache.get(&(tenant, 0)).await.unwrap(), None, "orphaned");
        fill(&cache, tenant, 0..5, "new").await;
        assert_eq!(
            cache.get(&(tenant, 3)).await.unwrap().as_deref(),
            Some(format!("new-{tenant}-3").as_str())
        );
        cache.invalidate_group(&tenant).await.unwrap();
        assert_eq!(cache.get(&(tenant, 3)).await.unwrap(), None);
    }
    for gen_key in [&garbage, &listed] {
        let g = server.command(&["GET", gen_key.as_str()]);
        assert!(g.parse::<u64>().unwrap() > 1_600_000_000_000_000, "{g}");
    }
    // Invalidating first, before any read, repairs it too.
    let third = cache.store_key(&(3, 0)).group_key().unwrap();
    assert_eq!(server.command(&["SET", third.as_str(), "x1"]), "OK");
    cache.invalidate_group(&3u64).await.unwrap();
    let g = server.command(&["GET", third.as_str()]);
    assert!(g.parse::<u64>().unwrap() > 1_600_000_000_000_000, "{g}");
    assert_eq!(cache.stats().store_errors, 0);
}

#[tokio::test]
async fn a_lost_generation_never_revives_old_entries() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache = tenants(&fx);
    fill(&cache, 1, 0..20, "old").await;
    let gen_key = cache.store_key(&(1, 0)).group_key().unwrap();
    let before = server.command(&["GET", gen_key.as_str()]);
    assert!(
        before.parse::<u64>().unwrap() > 1_600_000_000_000_000,
        "{before}"
    );
    assert_eq!(server.command(&["DEL", gen_key.as_str()]), "1");
    for id in 0..20 {
        assert_eq!(cache.get(&(1, id)).await.unwrap(), None, "{id}");
        let raw = server.command(&["EXISTS", cache.store_key(&(1, id)).as_str()]);
        assert_eq!(raw, "1", "the orphan is still stored, until its TTL");
    }
    let after: u64 = server.command(&["GET", gen_key.as_str()]).parse().unwrap();
    assert!(after > before.parse::<u64>().unwrap());
    fill(&cache, 1, 0..20, "new").await;
    assert_eq!(
        cache.get(&(1, 3)).await.unwrap().as_deref(),
        Some("new-1-3")
    );
    // The bump after a loss still moves forward.
    cache.invalidate_group(&1u64).await.unwrap();
    let bumped: u64 = server.command(&["GET", gen_key.as_str()]).parse().unwrap();
    assert!(bumped > after);
    let pttl = server.command(&["PTTL", cache.store_key(&(1, 3)).as_str()]);
    assert!(pttl.parse::<i64>().unwrap() > 0);
}

#[tokio::test]
async fn grouped_hits_on_redis_are_one_script_call() {
    let fx = Fx::redis().await;
    let server = fx.server().unwrap();
    let cache = tenants(&fx);
    fill(&cache, 1, 0..1, "v").await;
    server.command(&["CONFIG", "RESETSTAT"]);
    for _ in 0..10 {
        assert!(cache.get(&(1, 0)).await.unwrap().is_some());
    }
    let stats = server.command(&["INFO", "commandstats"]);
    // One round trip per hit; the two GETs each script runs (entry and
    // generation) are counted by the server as well.
    assert!(stats.contains("cmdstat_evalsha:calls=10,"), "{stats}");
    assert!(stats.contains("cmdstat_get:calls=20,"), "{stats}");
}

#[tokio::test]
async fn invalidate_group_needs_groups() {
    let fx = Fx::memory();
    let plain: Cache<u64, String> = fx.builder("plain").build().unwrap();
    let e = plain.invalidate_group(&1u64).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("group_by"), "{e}");
}
