// Side-by-side measurements of cachet against raw redis-rs and three peer crates (cached,
// multi-tier-cache, moka) in one process, each cachet sample interleaved with its baseline so that
// ratios survive a noisy machine. Modes (first argument): all (default), lat, stampede, race, and
// the profiling and memory helpers at the end of this file. PEERS_URL names the Redis to use.
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cached::AsyncRedisCache;
use cached::macros::concurrent_cached;
use cached::prelude::*;
use cachet::{Cache, MemoryStore, NearCache, NoCodec, RedisStore};
use multi_tier_cache::{
    Bytes, CacheManager, CacheStrategy, CacheSystem, CacheSystemBuilder, L1Cache, L2Cache,
    MokaCacheConfig, RedisCache, TierConfig,
};
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;

static URL_CELL: OnceLock<String> = OnceLock::new();
fn url() -> &'static str {
    URL_CELL.get_or_init(|| {
        std::env::var("PEERS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6417/".into())
    })
}
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type Loader = Box<dyn FnOnce() -> BoxFut<String> + Send + 'static>;

fn val100() -> String {
    val_n(100)
}
fn val_n(n: usize) -> String {
    let mut s = String::with_capacity(n);
    s.push_str("value:");
    while s.len() < n {
        s.push('x');
    }
    s.truncate(n);
    s
}

#[derive(Clone)]
enum Imp {
    Cached(Arc<AsyncRedisCache<String, String>>),
    Mtc(Arc<CacheManager>),
    Moka(moka::future::Cache<String, String>),
    Cachet(Cache<str, String>),
}

impl Imp {
    async fn get(&self, k: &str) -> Option<String> {
        match self {
            Imp::Cached(c) => c.async_cache_get(&k.to_string()).await.unwrap(),
            Imp::Mtc(m) => m
                .get(k)
                .await
                .unwrap()
                .map(|b| String::from_utf8(b.to_vec()).unwrap()),
            Imp::Moka(c) => c.get(k).await,
            Imp::Cachet(c) => c.get(k).await.unwrap(),
        }
    }
    async fn set(&self, k: &str, v: String) {
        match self {
            Imp::Cached(c) => {
                let _ = c.async_cache_set(k.to_string(), v).await.unwrap();
            }
            Imp::Mtc(m) => m
                .set_with_strategy(k, Bytes::from(v), CacheStrategy::LongTerm)
                .await
                .unwrap(),
            Imp::Moka(c) => c.insert(k.to_string(), v).await,
            Imp::Cachet(c) => c.set(k, v).await.unwrap(),
        }
    }
    async fn get_or_load(&self, k: &str, loader: Loader) -> String {
        match self {
            Imp::Cached(c) => c
                .async_cache_get_or_set_with(k.to_string(), loader)
                .await
                .unwrap(),
            Imp::Mtc(m) => {
                let b = m
                    .get_or_compute_with(k, CacheStrategy::LongTerm, || async move {
                        Ok(Bytes::from(loader().await))
                    })
                    .await
                    .unwrap();
                String::from_utf8(b.to_vec()).unwrap()
            }
            Imp::Moka(c) => c.get_with(k.to_string(), loader()).await,
            Imp::Cachet(c) => c
                .get_or_load(k, move || async move {
                    Ok::<_, std::io::Error>(Some(loader().await))
                })
                .await
                .unwrap()
                .expect("cachet: a value"),
        }
    }
    async fn invalidate(&self, k: &str) {
        match self {
            Imp::Cached(c) => {
                let _ = c.async_cache_remove(&k.to_string()).await.unwrap();
            }
            Imp::Mtc(m) => m.invalidate(k).await.unwrap(),
            Imp::Moka(c) => c.invalidate(k).await,
            Imp::Cachet(c) => c.invalidate(k).await.unwrap(),
        }
    }
    /// The physical Redis key of `k`, where known.
    fn phys(&self, k: &str) -> Option<String> {
        match self {
            Imp::Cachet(c) => Some(c.store_key(k).as_str().to_owned()),
            _ => None,
        }
    }
}

async fn cached_store(prefix: &str, cm: bool, csc: bool) -> Imp {
    let b = AsyncRedisCache::<String, String>::builder(prefix)
        .connection_string(url())
        .ttl(Duration::from_secs(3600))
        .connection_manager(cm)
        .client_side_caching(csc);
    Imp::Cached(Arc::new(b.build().await.expect("cached build")))
}
async fn mtc_2tier() -> Imp {
    let sys = CacheSystem::with_redis_url(url()).await.expect("mtc build");
    Imp::Mtc(sys.cache_manager().clone())
}
async fn mtc_l2_only() -> Imp {
    let redis = Arc::new(RedisCache::with_url(url()).await.expect("redis"));
    let sys = CacheSystemBuilder::new()
        .with_tier(redis, TierConfig::as_l2())
        .build()
        .await
        .expect("mtc l2-only build");
    Imp::Mtc(sys.cache_manager().clone())
}
fn moka_cache() -> Imp {
    Imp::Moka(
        moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(3600))
            .build(),
    )
}
/// cachet on Redis, default settings (Postcard codec, circuit breaker on, bus on), no L1.
async fn cachet_redis_t<K: cachet::CacheKey + ?Sized + Sync + 'static, V>(ns: &str) -> Cache<K, V>
where
    V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    let store = RedisStore::connect(url())
        .await
        .expect("cachet redis store");
    Cache::builder(ns)
        .ttl(Duration::from_secs(3600))
        .store(store)
        .build()
        .expect("cachet build")
}
/// cachet on Redis with the invalidation bus and/or the circuit breaker switched off.
async fn cachet_redis_opts(ns: &str, bus: bool, breaker: bool) -> Imp {
    let store = RedisStore::builder(url())
        .invalidation_bus(bus)
        .connect()
        .await
        .expect("cachet redis store");
    let mut b = Cache::builder(ns)
        .ttl(Duration::from_secs(3600))
        .store(store);
    if !breaker {
        b = b.circuit_breaker(None);
    }
    Imp::Cachet(b.build().expect("cachet build"))
}
async fn cachet_redis(ns: &str) -> Imp {
    Imp::Cachet(cachet_redis_t::<str, String>(ns).await)
}
/// cachet on Redis with a near cache (L1); waits until the bus is up.
async fn cachet_near_t<K: cachet::CacheKey + ?Sized + Sync + 'static, V>(
    ns: &str,
    cap: usize,
) -> Cache<K, V>
where
    V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    let store = RedisStore::connect(url())
        .await
        .expect("cachet redis store");
    let c: Cache<K, V> = Cache::builder(ns)
        .ttl(Duration::from_secs(3600))
        .store(store)
        .near_cache(NearCache::new(cap, Duration::from_secs(3600)))
        .build()
        .expect("cachet build");
    for _ in 0..1_000 {
        if c.stats().near_clears > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        c.stats().near_clears > 0,
        "cachet near cache: bus never connected"
    );
    c
}
async fn cachet_near(ns: &str) -> Imp {
    Imp::Cachet(cachet_near_t::<str, String>(ns, 100_000).await)
}
fn cachet_mem(ns: &str) -> Imp {
    Imp::Cachet(
        Cache::builder(ns)
            .ttl(Duration::from_secs(3600))
            .build()
            .expect("cachet mem build"),
    )
}

async fn raw_conn() -> MultiplexedConnection {
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}
async fn raw_set(c: &mut MultiplexedConnection, k: &str, v: &str) {
    let _: () = redis::cmd("SET").arg(k).arg(v).query_async(c).await.unwrap();
}
async fn raw_del(c: &mut MultiplexedConnection, keys: &[&str]) {
    let _: i64 = redis::cmd("DEL").arg(keys).query_async(c).await.unwrap();
}
async fn raw_get(c: &mut MultiplexedConnection, k: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(k).query_async(c).await.unwrap()
}
async fn raw_get_b(c: &mut MultiplexedConnection, k: &str) -> Option<bytes::Bytes> {
    redis::cmd("GET").arg(k).query_async(c).await.unwrap()
}
async fn keys(c: &mut MultiplexedConnection, pat: &str) -> Vec<String> {
    redis::cmd("KEYS").arg(pat).query_async(c).await.unwrap()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64) * p / 100.0) as usize;
    v[i.min(v.len() - 1)] as f64 / 1000.0 // ns -> us
}
fn median_f(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---------------- a. latency ----------------
async fn lat_case(
    name: &str,
    imp: &Imp,
    key: &str,
    raw_key: &str,
    raw: &mut MultiplexedConnection,
) {
    let want = val100();
    assert_eq!(
        imp.get(key).await.as_deref(),
        Some(want.as_str()),
        "{name}: value check"
    );
    let rv = raw_get(raw, raw_key).await.expect("raw key present");
    let (warm, n) = (2_000usize, 20_000usize);
    let mut a = Vec::with_capacity(n);
    let mut b = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..(warm + n) {
        if Instant::now() > deadline {
            println!("  {name}: time bound hit at i={i}");
            break;
        }
        let t0 = Instant::now();
        let g = imp.get(key).await;
        let t1 = Instant::now();
        let r = raw_get(raw, raw_key).await;
        let t2 = Instant::now();
        black_box((&g, &r));
        if i >= warm {
            a.push((t1 - t0).as_nanos() as u64);
            b.push((t2 - t1).as_nanos() as u64);
        }
    }
    let (a50, a99) = (pct(&mut a, 50.0), pct(&mut a, 99.0));
    let (b50, b99) = (pct(&mut b, 50.0), pct(&mut b, 99.0));
    println!(
        "LAT | {name:<44} | n={} | crate p50={a50:8.2}us p99={a99:8.2}us | raw GET({raw_key}, {}B) p50={b50:6.2}us p99={b99:6.2}us | ratio p50={:.3} p99={:.3}",
        a.len(),
        rv.len(),
        a50 / b50,
        a99 / b99
    );
}

async fn run_latency() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
    let v = val100();
    let _: () = redis::cmd("SET")
        .arg("raw:k")
        .arg(&v)
        .query_async(&mut raw)
        .await
        .unwrap();

    // cachet first: Redis store without L1 (the L2 hit path)
    {
        let c = cachet_redis("latc").await;
        c.set("k1", v.clone()).await;
        let rk = c.phys("k1").unwrap();
        lat_case(
            "cachet Redis store get() (L2, no L1)",
            &c,
            "k1",
            &rk,
            &mut raw,
        )
        .await;
        // the same, against the 100-byte raw key (different bytes: 131 vs 100)
        lat_case(
            "cachet Redis store get() vs raw:k 100B",
            &c,
            "k1",
            "raw:k",
            &mut raw,
        )
        .await;
        let c2 = cachet_redis_opts("latc", false, false).await;
        lat_case(
            "cachet Redis get(), breaker+bus off (L2)",
            &c2,
            "k1",
            &rk,
            &mut raw,
        )
        .await;
    }
    for (label, prefix, cm, csc) in [
        (
            "cached AsyncRedisCache (multiplexed) L2",
            "latmx",
            false,
            false,
        ),
        (
            "cached AsyncRedisCache (conn-manager) L2",
            "latcm",
            true,
            false,
        ),
    ] {
        let imp = cached_store(prefix, cm, csc).await;
        imp.set("k1", v.clone()).await;
        let ks = keys(&mut raw, &format!("*{prefix}*")).await;
        let rk = ks.first().cloned().expect("cached physical key");
        lat_case(label, &imp, "k1", &rk, &mut raw).await;
    }
    // multi-tier-cache L2-only (single Redis tier)
    let m1 = mtc_l2_only().await;
    m1.set("mtc:k2", v.clone()).await;
    lat_case(
        "multi-tier-cache Redis-only tier get() (L2)",
        &m1,
        "mtc:k2",
        "mtc:k2",
        &mut raw,
    )
    .await;
    // L1 rows, for continuity with the 2026-11-26 table
    {
        let c = cachet_near("latn").await;
        c.set("k1", v.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = c.get("k1").await; // fill L1
        let rk = c.phys("k1").unwrap();
        lat_case("cachet near cache get() (L1 hit)", &c, "k1", &rk, &mut raw).await;
        let c = cachet_mem("latm");
        c.set("k1", v.clone()).await;
        lat_case(
            "cachet MemoryStore get() (in-process)",
            &c,
            "k1",
            "raw:k",
            &mut raw,
        )
        .await;
    }
    let m2 = mtc_2tier().await;
    m2.set("mtc:k1", v.clone()).await;
    lat_case(
        "multi-tier-cache 2-tier get() (L1 hit)",
        &m2,
        "mtc:k1",
        "mtc:k1",
        &mut raw,
    )
    .await;
    let mk = moka_cache();
    mk.set("k1", v.clone()).await;
    lat_case(
        "moka::future get() (in-process)",
        &mk,
        "k1",
        "raw:k",
        &mut raw,
    )
    .await;
}

// ---------------- b. L1 / in-process hit, ns/op over many ops ----------------
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Val(String);

const L1_KEYS: u64 = 10_000;

/// A value shaped like cachet's in-process item `Timed<Slot<Arc<Val>>>`: the value,
/// a 40-byte `Meta` and the expiry (56 bytes, vs 8 for a bare `Arc`).
#[derive(Clone)]
struct Fat {
    value: Option<Arc<Val>>,
    // Never read: its size is what the row measures.
    #[allow(dead_code)]
    meta: [u64; 5],
    expires_at_ms: u64,
}

fn key_stream(n: usize) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..n).map(|_| rng.gen_range(0..L1_KEYS)).collect()
}

async fn run_l1() {
    let ops: usize = std::env::var("L1_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let reps: usize = 5;
    let stream = Arc::new(key_stream(1 << 16));
    let mask = (1usize << 16) - 1;
    let skeys: Arc<Vec<String>> = Arc::new((0..L1_KEYS).map(|k| format!("mtc:l1:{k}")).collect());
    let v = Arc::new(Val(val100()));

    // bare quick_cache, u64 keys and &str keys
    let qc: quick_cache::sync::Cache<u64, Arc<Val>> = quick_cache::sync::Cache::new(20_000);
    let qcs: quick_cache::sync::Cache<String, Arc<Val>> = quick_cache::sync::Cache::new(20_000);
    // cachet MemoryStore (typed fast path), u64 keys and str keys
    let cm: Cache<u64, Arc<Val>> = Cache::builder("l1m")
        .codec(NoCodec)
        .ttl(Duration::from_secs(3600))
        .memory(MemoryStore::new(20_000))
        .build()
        .unwrap();
    let cms: Cache<str, Arc<Val>> = Cache::builder("l1ms")
        .codec(NoCodec)
        .ttl(Duration::from_secs(3600))
        .memory(MemoryStore::new(20_000))
        .build()
        .unwrap();
    // cachet near cache over Redis
    let cn: Cache<u64, Arc<Val>> = cachet_near_t("l1n", 20_000).await;
    // moka future
    let mk: moka::future::Cache<u64, Arc<Val>> = moka::future::Cache::builder()
        .max_capacity(20_000)
        .time_to_live(Duration::from_secs(3600))
        .build();
    let mks: moka::future::Cache<String, Arc<Val>> = moka::future::Cache::builder()
        .max_capacity(20_000)
        .time_to_live(Duration::from_secs(3600))
        .build();
    // multi-tier-cache 2-tier (moka L1 + Redis L2); L1 sized 20,000 (default 5,000 < 10,000 keys)
    let l1 = Arc::new(
        L1Cache::new(MokaCacheConfig {
            max_capacity: 20_000,
            ..MokaCacheConfig::default()
        })
        .expect("mtc l1"),
    );
    let l2 = Arc::new(L2Cache::with_url(url()).await.expect("mtc l2"));
    let mtcm = Arc::new(CacheManager::new(l1, l2).await.expect("mtc manager"));
    let _ = &v;
    for k in 0..L1_KEYS {
        let s = format!("k{k}");
        // one Arc per key (as a decoded near-cache value has), not one shared by all keys
        let v = Arc::new(Val(val100()));
        qc.insert(k, v.clone());
        qcs.insert(s.clone(), v.clone());
        cm.set(&k, v.clone()).await.unwrap();
        cms.set(&s, v.clone()).await.unwrap();
        cn.set(&k, v.clone()).await.unwrap();
        mk.insert(k, v.clone()).await;
        mks.insert(s, v.clone()).await;
        mtcm.set_with_strategy(
            &skeys[k as usize],
            Bytes::from(val100()),
            CacheStrategy::LongTerm,
        )
        .await
        .unwrap();
    }
    mk.run_pending_tasks().await;
    mks.run_pending_tasks().await;
    // near cache: the notices of those writes drop L1 entries; read until every read is an L1 hit.
    let mut warmed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = cn.stats().near_hits;
        for k in 0..L1_KEYS {
            cn.get(&k).await.unwrap();
        }
        if cn.stats().near_hits - before == L1_KEYS {
            warmed = true;
            break;
        }
    }
    println!(
        "L1 | near cache warmed={warmed} near_hits={}",
        cn.stats().near_hits
    );
    let skeys_s: Vec<String> = (0..L1_KEYS).map(|k| format!("k{k}")).collect();
    let st0 = mtcm.get_stats();
    let qcf: quick_cache::sync::Cache<u64, Fat> = quick_cache::sync::Cache::new(20_000);
    let hits = std::sync::atomic::AtomicU64::new(0);
    for k in 0..L1_KEYS {
        let vk = qc.get(&k).unwrap();
        qcf.insert(
            k,
            Fat {
                value: Some(vk),
                meta: [0; 5],
                expires_at_ms: u64::MAX,
            },
        );
    }
    let names = [
        "bare quick_cache get (u64)",
        "cachet MemoryStore get (u64)",
        "cachet near-cache get, L1 hit (u64)",
        "moka::future get_with (u64)",
        "moka::future get (u64)",
        "bare quick_cache get (&str)",
        "cachet MemoryStore get (&str)",
        "moka::future get (&str)",
        "multi-tier-cache 2-tier get, L1 hit (&str)",
        "bare quick_cache get, 56-B cachet-shaped value (u64)",
        "  same + expiry check + atomic hit counter (u64)",
    ];
    let mut res: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _rep in 0..reps {
        for (vi, _) in names.iter().enumerate() {
            let n = if vi == 8 { ops / 4 } else { ops };
            let t = Instant::now();
            let mut acc = 0usize;
            match vi {
                0 => {
                    for i in 0..n {
                        acc += qc.get(&stream[i & mask]).unwrap().0.len();
                    }
                }
                1 => {
                    for i in 0..n {
                        acc += cm.get(&stream[i & mask]).await.unwrap().unwrap().0.len();
                    }
                }
                2 => {
                    for i in 0..n {
                        acc += cn.get(&stream[i & mask]).await.unwrap().unwrap().0.len();
                    }
                }
                3 => {
                    for i in 0..n {
                        acc += mk
                            .get_with(stream[i & mask], async { unreachable!("hit expected") })
                            .await
                            .0
                            .len();
                    }
                }
                4 => {
                    for i in 0..n {
                        acc += mk.get(&stream[i & mask]).await.unwrap().0.len();
                    }
                }
                5 => {
                    for i in 0..n {
                        acc += qcs
                            .get(skeys_s[stream[i & mask] as usize].as_str())
                            .unwrap()
                            .0
                            .len();
                    }
                }
                6 => {
                    for i in 0..n {
                        acc += cms
                            .get(skeys_s[stream[i & mask] as usize].as_str())
                            .await
                            .unwrap()
                            .unwrap()
                            .0
                            .len();
                    }
                }
                7 => {
                    for i in 0..n {
                        acc += mks
                            .get(skeys_s[stream[i & mask] as usize].as_str())
                            .await
                            .unwrap()
                            .0
                            .len();
                    }
                }
                8 => {
                    for i in 0..n {
                        acc += mtcm
                            .get(&skeys[stream[i & mask] as usize])
                            .await
                            .unwrap()
                            .unwrap()
                            .len();
                    }
                }
                9 => {
                    for i in 0..n {
                        acc += qcf.get(&stream[i & mask]).unwrap().value.unwrap().0.len();
                    }
                }
                10 => {
                    for i in 0..n {
                        let f = qcf.get(&stream[i & mask]).unwrap();
                        if f.expires_at_ms > 1 {
                            hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            acc += f.value.unwrap().0.len();
                        }
                    }
                }
                _ => unreachable!(),
            }
            let ns = t.elapsed().as_nanos() as f64 / n as f64;
            assert_eq!(acc, n * 100, "{}: every op a 100-byte hit", names[vi]);
            res[vi].push(ns);
        }
    }
    let st1 = mtcm.get_stats();
    let near_hits = cn.stats().near_hits;
    let qc_med = median_f(&mut res[0].clone());
    let qcs_med = median_f(&mut res[5].clone());
    for (vi, name) in names.iter().enumerate() {
        let mut r = res[vi].clone();
        let med = median_f(&mut r);
        let (lo, hi) = (r[0], r[r.len() - 1]);
        let strk = (5..=8).contains(&vi);
        let base = if strk { qcs_med } else { qc_med };
        // per-rep ratio to the bare quick_cache of the same rep
        let mut pr: Vec<f64> = (0..reps)
            .map(|r| res[vi][r] / res[if strk { 5 } else { 0 }][r])
            .collect();
        let prm = median_f(&mut pr);
        println!(
            "L1 | {name:<52} | ns/op median={med:8.1} [{lo:.1}-{hi:.1}] reps={reps} | ratio_of_medians={:.2} | ratio_per_rep={prm:.2} [{:.2}-{:.2}] vs bare quick_cache {}",
            med / base,
            pr[0],
            pr[pr.len() - 1],
            if strk { "&str" } else { "u64" },
        );
    }
    println!(
        "L1 | check: cachet near hits={near_hits}; mtc l1_hits +{} l2_hits +{}",
        st1.l1_hits - st0.l1_hits,
        st1.l2_hits - st0.l2_hits
    );
}

// ---------------- c. throughput: 64 tasks on one connection, hits ----------------
#[derive(Clone)]
enum TImp {
    Raw(MultiplexedConnection, Arc<Vec<String>>),
    Peer(Imp, Arc<Vec<String>>),
}

async fn tput_once(imp: &TImp, tasks: usize, per: usize, expect_len: usize) -> f64 {
    let start = Instant::now();
    let mut hs = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let imp = imp.clone();
        hs.push(tokio::spawn(async move {
            match imp {
                TImp::Raw(mut c, ks) => {
                    for j in 0..per {
                        let k = &ks[(t * per + j) % ks.len()];
                        let v = raw_get_b(&mut c, k).await.expect("raw hit");
                        assert_eq!(v.len(), expect_len);
                    }
                }
                TImp::Peer(p, ks) => {
                    for j in 0..per {
                        let k = &ks[(t * per + j) % ks.len()];
                        let v = p.get(k).await.expect("hit");
                        black_box(v);
                    }
                }
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    (tasks * per) as f64 / start.elapsed().as_secs_f64()
}

async fn run_tput() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
    let v = val100();
    let nkeys = 1000usize;
    let ukeys: Vec<String> = (0..nkeys).map(|i| format!("t{i}")).collect();
    let mtc_keys: Vec<String> = (0..nkeys).map(|i| format!("mtc:t{i}")).collect();
    let raw_keys: Vec<String> = (0..nkeys).map(|i| format!("raw:t{i}")).collect();
    for k in &raw_keys {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(&v)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    let cachet = cachet_redis("tput").await;
    let cachet_near = cachet_near("tputn").await;
    let cached = cached_store("tputc", false, false).await;
    let mtc1 = mtc_l2_only().await;
    let mtc2 = mtc_2tier().await;
    for (i, k) in ukeys.iter().enumerate() {
        cachet.set(k, v.clone()).await;
        cachet_near.set(k, v.clone()).await;
        cached.set(k, v.clone()).await;
        mtc1.set(&mtc_keys[i], v.clone()).await;
        mtc2.set(&mtc_keys[i], v.clone()).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for k in &ukeys {
        cachet_near.get(k).await; // fill L1
    }
    let cachet_phys: Vec<String> = ukeys.iter().map(|k| cachet.phys(k).unwrap()).collect();
    let variants: Vec<(&str, TImp, usize)> = vec![
        (
            "raw redis-rs GET (100 B, multiplexed)",
            TImp::Raw(raw.clone(), Arc::new(raw_keys.clone())),
            100,
        ),
        (
            "raw GET of cachet's stored bytes (107 B)",
            TImp::Raw(raw.clone(), Arc::new(cachet_phys.clone())),
            107,
        ),
        (
            "cachet get (Redis store, no L1)",
            TImp::Peer(cachet.clone(), Arc::new(ukeys.clone())),
            0,
        ),
        (
            "cached AsyncRedisCache get (multiplexed)",
            TImp::Peer(cached.clone(), Arc::new(ukeys.clone())),
            0,
        ),
        (
            "multi-tier-cache Redis-only get",
            TImp::Peer(mtc1.clone(), Arc::new(mtc_keys.clone())),
            0,
        ),
        (
            "cachet get (near cache, L1 hits)",
            TImp::Peer(cachet_near.clone(), Arc::new(ukeys.clone())),
            0,
        ),
        (
            "multi-tier-cache 2-tier get (L1 hits)",
            TImp::Peer(mtc2.clone(), Arc::new(mtc_keys.clone())),
            0,
        ),
    ];
    let (tasks, per, reps) = (64usize, 1500usize, 7usize);
    // warm-up
    for (_, imp, len) in &variants {
        tput_once(imp, tasks, 50, *len).await;
    }
    let mut res: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for rep in 0..reps {
        let mut this = vec![0.0; variants.len()];
        for j in 0..variants.len() {
            let i = (j + rep) % variants.len();
            let (_, imp, len) = &variants[i];
            this[i] = tput_once(imp, tasks, per, *len).await;
        }
        for i in 0..variants.len() {
            res[i].push(this[i]);
            ratio[i].push(this[i] / this[0]);
        }
    }
    for (i, (name, _, _)) in variants.iter().enumerate() {
        let mut r = res[i].clone();
        let med = median_f(&mut r);
        let mut q = ratio[i].clone();
        let rmed = median_f(&mut q);
        println!(
            "TPUT | {name:<44} | 64 tasks x {per} | ops/s median={:8.0} [{:.0}-{:.0}] | ratio_to_rawGET100={rmed:.3} [{:.3}-{:.3}]",
            med,
            r[0],
            r[r.len() - 1],
            q[0],
            q[q.len() - 1]
        );
    }
}

// ---------------- d. miss path ----------------
async fn slow_val() -> String {
    tokio::time::sleep(Duration::from_millis(1)).await;
    val100()
}
async fn run_miss() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
    let cachet = cachet_redis("miss").await;
    let cached = cached_store("missc", false, false).await;
    let mtc1 = mtc_l2_only().await;
    let n = 400usize;
    let names = [
        "naive GET/load/SET PX (redis-rs)",
        "cachet get_or_load (GET, lease, load, fill)",
        "cached async_cache_get_or_set_with",
        "multi-tier-cache Redis-only get_or_compute_with",
    ];
    let mut lat: Vec<Vec<u64>> = vec![Vec::with_capacity(n); names.len()];
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..(n + 20) {
        if Instant::now() > deadline {
            println!("MISS time bound hit at {i}");
            break;
        }
        for vi in 0..names.len() {
            let key = format!("m{vi}:{i}");
            let t = Instant::now();
            match vi {
                0 => {
                    let hit = raw_get(&mut raw, &key).await;
                    assert!(hit.is_none());
                    let v = slow_val().await;
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(v.as_bytes())
                        .arg("PX")
                        .arg(3_600_000)
                        .query_async(&mut raw)
                        .await
                        .unwrap();
                    black_box(v);
                }
                1 => {
                    let v = cachet
                        .get_or_load(&key, Box::new(|| Box::pin(slow_val())))
                        .await;
                    black_box(v);
                }
                2 => {
                    let v = cached
                        .get_or_load(&key, Box::new(|| Box::pin(slow_val())))
                        .await;
                    black_box(v);
                }
                3 => {
                    let v = mtc1
                        .get_or_load(&key, Box::new(|| Box::pin(slow_val())))
                        .await;
                    black_box(v);
                }
                _ => unreachable!(),
            }
            let el = t.elapsed().as_nanos() as u64;
            if i >= 20 {
                lat[vi].push(el);
            }
        }
    }
    // and a check that each filled: a second read is a hit
    assert!(cachet.get("m1:25").await.is_some(), "cachet filled");
    let base = pct(&mut lat[0].clone(), 50.0);
    for (vi, name) in names.iter().enumerate() {
        let mut l = lat[vi].clone();
        let (p50, p99) = (pct(&mut l, 50.0), pct(&mut l, 99.0));
        let mean = l.iter().sum::<u64>() as f64 / l.len() as f64 / 1000.0;
        println!(
            "MISS | {name:<48} | n={} | p50={p50:8.1}us p99={p99:8.1}us mean={mean:8.1}us | ratio p50 to naive={:.3}",
            l.len(),
            p50 / base
        );
    }
}

// ---------------- e. stampede ----------------
static MACRO_LOADS: AtomicUsize = AtomicUsize::new(0);
#[derive(Debug, Clone)]
struct MErr(#[allow(dead_code)] String);

#[concurrent_cached(
    map_error = r##"|e| MErr(format!("{:?}", e))"##,
    ty = "cached::AsyncRedisCache<String, String>",
    create = r##" {
        cached::AsyncRedisCache::builder("macro_stampede")
            .connection_string(crate::url())
            .ttl(std::time::Duration::from_secs(3600))
            .build()
            .await
            .expect("macro cache build")
    } "##
)]
async fn macro_load(key: String) -> Result<String, MErr> {
    let _ = &key;
    MACRO_LOADS.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(val100())
}

fn slow_loader(counter: Arc<AtomicUsize>) -> Loader {
    Box::new(move || {
        Box::pin(async move {
            counter.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            val100()
        })
    })
}

async fn stampede_case(name: &str, insts: Vec<Imp>, per: usize, key: &str) {
    let counter = Arc::new(AtomicUsize::new(0));
    let total = insts.len() * per;
    let barrier = Arc::new(tokio::sync::Barrier::new(total));
    let mut hs = Vec::with_capacity(total);
    for imp in &insts {
        for _ in 0..per {
            let (imp, counter, barrier, key) = (
                imp.clone(),
                counter.clone(),
                barrier.clone(),
                key.to_string(),
            );
            hs.push(tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let v = imp.get_or_load(&key, slow_loader(counter)).await;
                assert_eq!(v.len(), 100);
                t.elapsed().as_nanos() as u64
            }));
        }
    }
    let mut lat = Vec::with_capacity(total);
    let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(hs)).await;
    match all {
        Ok(rs) => rs.into_iter().for_each(|r| lat.push(r.unwrap())),
        Err(_) => println!("  {name}: TIMEOUT"),
    }
    let max = *lat.iter().max().unwrap_or(&0) as f64 / 1000.0;
    println!(
        "STAMPEDE | {name:<48} | callers={} done={} | loader runs={} | p50={:8.1}ms p99={:8.1}ms max={:8.1}ms",
        total,
        lat.len(),
        counter.load(SeqCst),
        pct(&mut lat, 50.0) / 1000.0,
        pct(&mut lat, 99.0) / 1000.0,
        max / 1000.0
    );
}

async fn run_stampede() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();

    let c = cachet_redis("st1").await;
    stampede_case("cachet get_or_load (Redis) x1000", vec![c], 1000, "k").await;
    let c = cachet_mem("st1m");
    stampede_case("cachet get_or_load (MemoryStore) x1000", vec![c], 1000, "k").await;

    let c = cached_store("st1", false, false).await;
    stampede_case(
        "cached async_cache_get_or_set_with x1000",
        vec![c],
        1000,
        "k",
    )
    .await;

    // macro
    {
        let barrier = Arc::new(tokio::sync::Barrier::new(1000));
        let mut hs = Vec::new();
        for _ in 0..1000 {
            let barrier = barrier.clone();
            hs.push(tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let v = macro_load("k".to_string()).await.unwrap();
                assert_eq!(v.len(), 100);
                t.elapsed().as_nanos() as u64
            }));
        }
        let mut lat: Vec<u64> =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(hs))
                .await
                .expect("macro timeout")
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
        println!(
            "STAMPEDE | {:<48} | callers=1000 done={} | loader runs={} | p50={:8.1}ms p99={:8.1}ms",
            "cached #[concurrent_cached(redis)] async fn x1000",
            lat.len(),
            MACRO_LOADS.load(SeqCst),
            pct(&mut lat, 50.0) / 1000.0,
            pct(&mut lat, 99.0) / 1000.0
        );
    }

    let m = mtc_2tier().await;
    stampede_case(
        "multi-tier-cache get_or_compute_with x1000",
        vec![m],
        1000,
        "mtc:st1",
    )
    .await;
    let m = mtc_l2_only().await;
    stampede_case(
        "multi-tier-cache (Redis-only tier) x1000",
        vec![m],
        1000,
        "mtc:st1b",
    )
    .await;
    let mk = moka_cache();
    stampede_case("moka get_with x1000", vec![mk], 1000, "k").await;

    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(cachet_redis("st4").await);
    }
    stampede_case("cachet get_or_load 4 inst x250 (4 conns)", v, 250, "k").await;
    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(cached_store("st4", false, false).await);
    }
    stampede_case("cached get_or_set_with 4 inst x250", v, 250, "k").await;
    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(mtc_2tier().await);
    }
    stampede_case("multi-tier-cache 4 inst x250", v, 250, "mtc:st4").await;
    let v = (0..4).map(|_| moka_cache()).collect();
    stampede_case("moka 4 inst x250 (no shared store)", v, 250, "k").await;
}

// ---------------- f. cache-aside race ----------------
async fn race_det(
    name: &str,
    imp: &Imp,
    writer: &Imp,
    key: &str,
    raw: &mut MultiplexedConnection,
    raw_key: Option<String>,
) {
    let db = Arc::new(Mutex::new("old".to_string()));
    let loaded = Arc::new(tokio::sync::Notify::new());
    let proceed = Arc::new(tokio::sync::Notify::new());
    let (db2, l2, p2) = (db.clone(), loaded.clone(), proceed.clone());
    let loader: Loader = Box::new(move || {
        Box::pin(async move {
            let v = db2.lock().unwrap().clone();
            l2.notify_one();
            p2.notified().await;
            v
        })
    });
    let r = imp.clone();
    let k = key.to_string();
    let reader = tokio::spawn(async move { r.get_or_load(&k, loader).await });
    tokio::time::timeout(Duration::from_secs(5), loaded.notified())
        .await
        .expect("loader start");
    *db.lock().unwrap() = "new".to_string();
    writer.invalidate(key).await;
    proceed.notify_one();
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after = imp.get(key).await;
    let in_redis = match &raw_key {
        Some(exact) if !exact.is_empty() => raw_get(raw, exact)
            .await
            .map(|b| String::from_utf8_lossy(&b).to_string()),
        Some(_) => {
            let ks = keys(raw, &format!("*{key}*")).await;
            match ks.first() {
                Some(k) => raw_get(raw, k)
                    .await
                    .map(|b| String::from_utf8_lossy(&b).to_string()),
                None => None,
            }
        }
        None => None,
    };
    println!(
        "RACE-DET | {name:<44} | reader returned={got} | DB=new | get after={:?} | STALE={} | redis value contains old={}",
        after,
        after.as_deref() == Some("old"),
        match (&raw_key, in_redis) {
            (None, _) => "n/a".to_string(),
            (Some(_), None) => "false (absent)".to_string(),
            (Some(_), Some(s)) => s.contains("old").to_string(),
        }
    );
}

async fn race_rand(
    name: &str,
    mk: &(dyn Fn(usize) -> String + Sync),
    imp: &Imp,
    writer: &Imp,
    seed: u64,
    phys: Option<&(dyn Fn(&str) -> String + Sync)>,
) {
    let mut raw = raw_conn().await;
    let mut redis_old = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut stale, mut reader_old, mut missing, mut done) = (0, 0, 0, 0);
    let t_all = Instant::now();
    for i in 0..100 {
        if t_all.elapsed() > Duration::from_secs(60) {
            break;
        }
        let key = mk(i);
        let db = Arc::new(Mutex::new("old".to_string()));
        let d1 = Duration::from_micros(rng.gen_range(0..=4000));
        let d2 = Duration::from_micros(rng.gen_range(0..=4000));
        let db2 = db.clone();
        let loader: Loader = Box::new(move || {
            Box::pin(async move {
                let v = db2.lock().unwrap().clone();
                tokio::time::sleep(d1).await;
                v
            })
        });
        let (r, k) = (imp.clone(), key.clone());
        let reader = tokio::spawn(async move { r.get_or_load(&k, loader).await });
        let (w, k2, db3) = (writer.clone(), key.clone(), db.clone());
        let wr = tokio::spawn(async move {
            tokio::time::sleep(d2).await;
            *db3.lock().unwrap() = "new".to_string();
            w.invalidate(&k2).await;
        });
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("reader")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), wr)
            .await
            .expect("writer")
            .unwrap();
        // let the bus deliver (near cache) before reading back
        tokio::time::sleep(Duration::from_millis(5)).await;
        let after = imp.get(&key).await;
        if let Some(f) = phys {
            if let Some(b) = raw_get(&mut raw, &f(&key)).await {
                if String::from_utf8_lossy(&b).contains("old") {
                    redis_old += 1;
                }
            }
        }
        done += 1;
        if got == "old" {
            reader_old += 1;
        }
        match after.as_deref() {
            Some("old") => stale += 1,
            None => missing += 1,
            _ => {}
        }
    }
    println!(
        "RACE-RAND | {name:<44} | trials={done} | reader returned old={reader_old} | cache serves old after (STALE)={stale} | absent after={missing} | redis holds old={}",
        if phys.is_some() {
            redis_old.to_string()
        } else {
            "n/a".to_string()
        }
    );
}

async fn run_race() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
    // cachet
    let cr = cachet_redis("race").await;
    let cr_w = cachet_redis("race").await; // a second instance (own connection) as the writer
    let cn = cachet_near("racen").await;
    let cn_w = cachet_near("racen").await;
    let cmem = cachet_mem("racem");
    let pk = |c: &Imp, k: &str| c.phys(k);
    race_det(
        "cachet Redis (same instance)",
        &cr,
        &cr,
        "ck1",
        &mut raw,
        pk(&cr, "ck1"),
    )
    .await;
    race_det(
        "cachet Redis (reader A, writer B)",
        &cr,
        &cr_w,
        "ck2",
        &mut raw,
        pk(&cr, "ck2"),
    )
    .await;
    race_det(
        "cachet near cache (reader A, writer B)",
        &cn,
        &cn_w,
        "ck3",
        &mut raw,
        pk(&cn, "ck3"),
    )
    .await;
    race_det("cachet MemoryStore", &cmem, &cmem, "ck4", &mut raw, None).await;
    // peers
    let c = cached_store("race", false, false).await;
    race_det(
        "cached AsyncRedisCache",
        &c,
        &c,
        "racekey1",
        &mut raw,
        Some(String::new()),
    )
    .await;
    let m = mtc_2tier().await;
    race_det(
        "multi-tier-cache 2-tier (same instance)",
        &m,
        &m,
        "mtc-racekey3",
        &mut raw,
        Some(String::new()),
    )
    .await;
    let m1 = mtc_l2_only().await;
    race_det(
        "multi-tier-cache Redis-only tier",
        &m1,
        &m1,
        "mtc-racekey4",
        &mut raw,
        Some(String::new()),
    )
    .await;
    let mk = moka_cache();
    race_det(
        "moka get_with / invalidate",
        &mk,
        &mk,
        "racekey5",
        &mut raw,
        None,
    )
    .await;

    let crp = cr.clone();
    let cnp = cn.clone();
    race_rand(
        "cachet Redis (same instance)",
        &|i| format!("cr{i}"),
        &cr,
        &cr,
        1,
        Some(&|k: &str| crp.phys(k).unwrap()),
    )
    .await;
    race_rand(
        "cachet Redis (reader A, writer B)",
        &|i| format!("crx{i}"),
        &cr,
        &cr_w,
        1,
        Some(&|k: &str| crp.phys(k).unwrap()),
    )
    .await;
    race_rand(
        "cachet near cache (reader A, writer B)",
        &|i| format!("cn{i}"),
        &cn,
        &cn_w,
        1,
        Some(&|k: &str| cnp.phys(k).unwrap()),
    )
    .await;
    race_rand(
        "cachet MemoryStore",
        &|i| format!("cm{i}"),
        &cmem,
        &cmem,
        1,
        None,
    )
    .await;
    race_rand(
        "cached AsyncRedisCache",
        &|i| format!("r{i}"),
        &c,
        &c,
        1,
        Some(&|k: &str| format!("cached-redis-store:race:{k}")),
    )
    .await;
    race_rand(
        "multi-tier-cache 2-tier",
        &|i| format!("mtc-r{i}"),
        &m,
        &m,
        1,
        Some(&|k: &str| k.to_string()),
    )
    .await;
    race_rand(
        "multi-tier-cache Redis-only tier",
        &|i| format!("mtc1-r{i}"),
        &m1,
        &m1,
        1,
        Some(&|k: &str| k.to_string()),
    )
    .await;
    race_rand(
        "moka get_with / invalidate",
        &|i| format!("r{i}"),
        &mk,
        &mk,
        1,
        None,
    )
    .await;
    println!(
        "RACE | cachet stats (Redis A): refused_fills={} loads={} | near A: refused_fills={}",
        match &cr {
            Imp::Cachet(c) => c.stats().refused_fills,
            _ => 0,
        },
        match &cr {
            Imp::Cachet(c) => c.stats().loads,
            _ => 0,
        },
        match &cn {
            Imp::Cachet(c) => c.stats().refused_fills,
            _ => 0,
        },
    );
}

// ---------------- g. invalidation cost ----------------
async fn run_inval() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
    let v = val100();
    let cr = cachet_redis("inv").await;
    let cn = cachet_near("invn").await;
    let cached = cached_store("invc", false, false).await;
    let mtc1 = mtc_l2_only().await;
    let mtc2 = mtc_2tier().await;
    let cb = cachet_redis_opts("invb", false, true).await;
    let cbb = cachet_redis_opts("invbb", false, false).await;
    // A raw connection used as rarely as each cache's own: its populate and its DEL.
    let mut own = raw_conn().await;
    let names = [
        "raw DEL (1 key)",
        "cachet invalidate (Redis, no L1)",
        "cachet invalidate (near cache)",
        "cached async_cache_remove",
        "multi-tier-cache Redis-only invalidate",
        "multi-tier-cache 2-tier invalidate",
        "cachet invalidate (Redis, bus off)",
        "cachet invalidate (Redis, bus+breaker off)",
        "raw DEL (2 keys: entry + lease)",
        "raw DEL (1 key), a connection of its own",
    ];
    let (warm, n) = (200usize, 2000usize);
    let mut lat: Vec<Vec<u64>> = vec![Vec::with_capacity(n); names.len()];
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..(warm + n) {
        if Instant::now() > deadline {
            println!("INVAL time bound hit at {i}");
            break;
        }
        // Each iteration starts at another row: what a row's predecessor
        // leaves running (a peer's background work) lands on every row alike.
        for step in 0..names.len() {
            let vi = (step + i) % names.len();
            let key = format!("i{vi}:{i}");
            // populate, untimed
            match vi {
                0 | 8 => raw_set(&mut raw, &key, &v).await,
                1 => cr.set(&key, v.clone()).await,
                2 => cn.set(&key, v.clone()).await,
                3 => cached.set(&key, v.clone()).await,
                4 => mtc1.set(&key, v.clone()).await,
                5 => mtc2.set(&key, v.clone()).await,
                6 => cb.set(&key, v.clone()).await,
                7 => cbb.set(&key, v.clone()).await,
                9 => raw_set(&mut own, &key, &v).await,
                _ => unreachable!(),
            }
            let t = Instant::now();
            match vi {
                0 => raw_del(&mut raw, &[&key]).await,
                1 => cr.invalidate(&key).await,
                2 => cn.invalidate(&key).await,
                3 => cached.invalidate(&key).await,
                4 => mtc1.invalidate(&key).await,
                5 => mtc2.invalidate(&key).await,
                6 => cb.invalidate(&key).await,
                7 => cbb.invalidate(&key).await,
                8 => raw_del(&mut raw, &[&key, &format!("{key}:l")]).await,
                9 => raw_del(&mut own, &[&key]).await,
                _ => unreachable!(),
            }
            let el = t.elapsed().as_nanos() as u64;
            if i >= warm {
                lat[vi].push(el);
            }
        }
    }
    let base = pct(&mut lat[0].clone(), 50.0);
    // The lower quartile: calls answered on a worker still awake. The median
    // can fall between that regime and a parked worker's wake-up, and then
    // swings from run to run (docs/performance.md).
    let base25 = pct(&mut lat[0].clone(), 25.0);
    for (vi, name) in names.iter().enumerate() {
        let mut l = lat[vi].clone();
        let (p25, p50, p75, p99) = (
            pct(&mut l, 25.0),
            pct(&mut l, 50.0),
            pct(&mut l, 75.0),
            pct(&mut l, 99.0),
        );
        println!(
            "INVAL | {name:<44} | n={} | p25={p25:7.2}us p50={p50:7.2}us p75={p75:7.2}us p99={p99:7.2}us | ratio p50 to raw DEL={:.3} | p25 to raw DEL's p25={:.3}",
            l.len(),
            p50 / base,
            p25 / base25
        );
    }
    assert!(cr.get("i1:300").await.is_none());
}

// ---------------- h. scaling: workers x value size ----------------
fn run_scale() {
    for workers in [1usize, 2, 4] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tokio::spawn(async move {
                let mut raw = raw_conn().await;
                let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
                let cachet = cachet_redis("scale").await;
                for (size, per, reps) in [(100usize, 1500usize, 7usize), (10_000, 500, 7), (1_000_000, 8, 7)] {
                    let v = val_n(size);
                    let nkeys = 64usize;
                    let ukeys: Vec<String> = (0..nkeys).map(|i| format!("s{size}:{i}")).collect();
                    for k in &ukeys {
                        cachet.set(k, v.clone()).await;
                    }
                    let phys: Vec<String> = ukeys.iter().map(|k| cachet.phys(k).unwrap()).collect();
                    let stored_len = raw_get(&mut raw, &phys[0]).await.unwrap().len();
                    let rawv = TImp::Raw(raw.clone(), Arc::new(phys.clone()));
                    let cv = TImp::Peer(cachet.clone(), Arc::new(ukeys.clone()));
                    tput_once(&rawv, 64, 1, stored_len).await;
                    tput_once(&cv, 64, 1, 0).await;
                    let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
                    for _ in 0..reps {
                        let x = tput_once(&rawv, 64, per, stored_len).await;
                        let y = tput_once(&cv, 64, per, 0).await;
                        a.push(x);
                        b.push(y);
                        r.push(y / x);
                    }
                    let (ma, mb, mr) = (median_f(&mut a), median_f(&mut b), median_f(&mut r));
                    println!(
                        "SCALE | workers={workers} | value={size:>7}B (stored {stored_len}B) | 64 tasks x {per} | raw GET ops/s={ma:9.0} [{:.0}-{:.0}] | cachet get ops/s={mb:9.0} [{:.0}-{:.0}] | ratio={mr:.3} [{:.3}-{:.3}]",
                        a[0], a[a.len() - 1], b[0], b[b.len() - 1], r[0], r[r.len() - 1]
                    );
                    for k in &phys {
                        let _: i64 = redis::cmd("DEL").arg(k).query_async(&mut raw).await.unwrap();
                    }
                }
            })
            .await
            .unwrap();
        });
    }
}

// ---------------- memory ----------------
async fn run_mem_redis() {
    let mut raw = raw_conn().await;
    let _: () = redis::cmd("FLUSHDB").query_async(&mut raw).await.unwrap();
    let v = val100();
    let c = cachet_redis("users").await;
    c.set("12345", v.clone()).await;
    let ck = c.phys("12345").unwrap();
    let stored: Vec<u8> = raw_get(&mut raw, &ck).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("users:12345")
        .arg(&v)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("users:12345:px")
        .arg(&v)
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&format!("{ck}x"))
        .arg(&v)
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("raw:stored")
        .arg(&stored)
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut raw)
        .await
        .unwrap();
    let cached = cached_store("users", false, false).await;
    cached.set("12345", v.clone()).await;
    let mtc1 = mtc_l2_only().await;
    mtc1.set("users:12345:mtc", v.clone()).await;
    let ck_len = ck.len();
    for (label, k) in [
        (
            "cachet entry (Postcard String 100 B + envelope)",
            ck.clone(),
        ),
        (
            "raw SET users:12345 100 B, no TTL",
            "users:12345".to_string(),
        ),
        (
            "raw SET users:12345:px 100 B, PX",
            "users:12345:px".to_string(),
        ),
        (
            "raw SET 100 B under cachet's key name + 'x', PX",
            format!("{ck}x"),
        ),
        (
            "raw SET of cachet's stored bytes, key raw:stored, PX",
            "raw:stored".to_string(),
        ),
        (
            "cached AsyncRedisCache entry",
            "cached-redis-store:users:12345".to_string(),
        ),
        (
            "multi-tier-cache Redis-only entry",
            "users:12345:mtc".to_string(),
        ),
    ] {
        let mu: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&k)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut raw)
            .await
            .unwrap();
        let sl: i64 = redis::cmd("STRLEN")
            .arg(&k)
            .query_async(&mut raw)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut raw)
            .await
            .unwrap();
        let enc: Option<String> = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(&k)
            .query_async(&mut raw)
            .await
            .unwrap_or(None);
        println!(
            "MEM | {label:<52} | key={k} ({} B) | STRLEN={sl} | MEMORY USAGE={mu:?} | PTTL={ttl} | encoding={enc:?}",
            k.len()
        );
    }
    println!(
        "MEM | cachet key len={ck_len}; stored value len={}; header bytes={:?}",
        stored.len(),
        &stored[..30.min(stored.len())]
    );
    let ks = keys(&mut raw, "*").await;
    println!("MEM | all keys: {ks:?}");
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    for l in s.lines() {
        if let Some(r) = l.strip_prefix("VmRSS:") {
            return r.trim().trim_end_matches("kB").trim().parse().unwrap();
        }
    }
    0
}

fn run_rss(which: &str) {
    const N: u64 = 1_000_000;
    let cap = N as usize;
    let before = rss_kb();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let after_rt = rss_kb();
    let t = Instant::now();
    let (kept, extra) = rt.block_on(async {
        match which {
            "values" => {
                let v: Vec<(u64, String)> = (0..N).map(|k| (k, val100())).collect();
                let kept = v.len();
                let r = rss_kb();
                black_box(&v);
                (kept, r)
            }
            "qc" => {
                let c: quick_cache::sync::Cache<u64, String> = quick_cache::sync::Cache::new(cap);
                for k in 0..N {
                    c.insert(k, val100());
                }
                let kept = (0..N).filter(|k| c.get(k).is_some()).count();
                let r = rss_kb();
                black_box(&c);
                (kept, r)
            }
            "cachet" => {
                let c: Cache<u64, String> = Cache::builder("rss")
                    .ttl(Duration::from_secs(3600))
                    .memory(MemoryStore::new(cap))
                    .build()
                    .unwrap();
                for k in 0..N {
                    c.set(&k, val100()).await.unwrap();
                }
                let mut kept = 0;
                for k in 0..N {
                    if c.get(&k).await.unwrap().is_some() {
                        kept += 1;
                    }
                }
                let r = rss_kb();
                black_box(&c);
                (kept, r)
            }
            "moka" => {
                let c: moka::future::Cache<u64, String> =
                    moka::future::Cache::builder().max_capacity(N).build();
                for k in 0..N {
                    c.insert(k, val100()).await;
                }
                c.run_pending_tasks().await;
                let kept = c.entry_count() as usize;
                let r = rss_kb();
                black_box(&c);
                (kept, r)
            }
            _ => panic!("unknown rss mode"),
        }
    });
    println!(
        "RSS | {which:<8} | entries inserted={N} kept={kept} | RSS before={before} kB after_rt={after_rt} after_fill={extra} kB | delta={} kB = {:.1} B/entry(kept) | fill {:.2}s",
        extra - after_rt,
        (extra - after_rt) as f64 * 1024.0 / kept.max(1) as f64,
        t.elapsed().as_secs_f64()
    );
}

// ---------------- profiling loops ----------------
fn run_prof(which: &str) {
    let secs: u64 = std::env::var("PROF_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let which = which.to_string();
    rt.block_on(async move {
        tokio::spawn(async move {
            let stream = key_stream(1 << 16);
            let mask = (1usize << 16) - 1;
            let v = Arc::new(Val(val100()));
            let end = Instant::now() + Duration::from_secs(secs);
            let mut ops = 0u64;
            match which.as_str() {
                "prof-qc" => {
                    let qc: quick_cache::sync::Cache<u64, Arc<Val>> =
                        quick_cache::sync::Cache::new(20_000);
                    for k in 0..L1_KEYS {
                        qc.insert(k, v.clone());
                    }
                    while Instant::now() < end {
                        for i in 0..100_000 {
                            black_box(qc.get(&stream[i & mask]).unwrap().0.len());
                        }
                        ops += 100_000;
                    }
                }
                "prof-mem" => {
                    let cm: Cache<u64, Arc<Val>> = Cache::builder("pm")
                        .codec(NoCodec)
                        .ttl(Duration::from_secs(3600))
                        .memory(MemoryStore::new(20_000))
                        .build()
                        .unwrap();
                    for k in 0..L1_KEYS {
                        cm.set(&k, v.clone()).await.unwrap();
                    }
                    while Instant::now() < end {
                        for i in 0..100_000 {
                            black_box(cm.get(&stream[i & mask]).await.unwrap().unwrap().0.len());
                        }
                        ops += 100_000;
                    }
                }
                "prof-near" => {
                    let cn: Cache<u64, Arc<Val>> = cachet_near_t("pn", 20_000).await;
                    for k in 0..L1_KEYS {
                        cn.set(&k, v.clone()).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for k in 0..L1_KEYS {
                        cn.get(&k).await.unwrap();
                    }
                    while Instant::now() < end {
                        for i in 0..100_000 {
                            black_box(cn.get(&stream[i & mask]).await.unwrap().unwrap().0.len());
                        }
                        ops += 100_000;
                    }
                }
                // A Redis hit or an invalidation, cachet's or raw, on 1,000 keys.
                "prof-redis" | "prof-rawget" | "prof-inval" | "prof-rawdel" => {
                    let mut raw = raw_conn().await;
                    let c: Cache<u64, String> = cachet_redis_t("pr").await;
                    let reads = matches!(which.as_str(), "prof-redis" | "prof-rawget");
                    for k in (0..1000u64).filter(|_| reads) {
                        c.set(&k, val100()).await.unwrap();
                    }
                    let phys: Vec<String> = (0..1000u64)
                        .map(|k| c.store_key(&k).as_str().to_owned())
                        .collect();
                    let mut i = 0usize;
                    while Instant::now() < end {
                        for _ in 0..1000 {
                            i = (i + 1) % 1000;
                            let k = i as u64;
                            match which.as_str() {
                                "prof-redis" => {
                                    black_box(c.get(&k).await.unwrap().unwrap().len());
                                }
                                "prof-rawget" => {
                                    black_box(raw_get_b(&mut raw, &phys[i]).await.unwrap().len());
                                }
                                "prof-inval" => c.invalidate(&k).await.unwrap(),
                                _ => raw_del(&mut raw, &[&phys[i]]).await,
                            }
                        }
                        ops += 1000;
                    }
                }
                _ => panic!("unknown prof mode"),
            }
            println!(
                "PROF | {which} | ops={ops} in {secs}s = {:.1} ns/op",
                secs as f64 * 1e9 / ops as f64
            );
        })
        .await
        .unwrap();
    });
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    println!("# mode={mode} url={}", url());
    if mode.starts_with("rss-") {
        run_rss(&mode[4..]);
        return;
    }
    if mode.starts_with("prof-") {
        run_prof(&mode);
        return;
    }
    if mode == "scale" {
        run_scale();
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        tokio::spawn(async move {
            let all = mode == "all";
            if mode == "lat" || all {
                run_latency().await;
            }
            if mode == "l1" || all {
                run_l1().await;
            }
            if mode == "tput" || all {
                run_tput().await;
            }
            if mode == "miss" || all {
                run_miss().await;
            }
            if mode == "inval" || all {
                run_inval().await;
            }
            if mode == "stampede" || all {
                run_stampede().await;
            }
            if mode == "race" || all {
                run_race().await;
            }
            if mode == "mem-redis" {
                run_mem_redis().await;
            }
        })
        .await
        .unwrap();
    });
}
