//! cachet against the raw baselines it is built on, measured in the same run:
//!
//! - `memory_hit`: a hit through `Cache::get` on the in-process store vs a bare
//!   `quick_cache::sync::Cache::get` of the same values (target ratio ≤ 1.3);
//! - `redis_hit`: a hit through `Cache::get` on Redis vs a bare redis-rs `GET` of
//!   the same bytes on the same kind of connection (target ratio ≤ 1.05), one
//!   request at a time and 64 tasks sharing the connection;
//! - `near_hit`: a hit in the near cache (L1) of a cache over Redis vs a bare
//!   `quick_cache::sync::Cache::get` (target ratio ≤ 1.2);
//! - `redis_miss`: a miss that loads (≈1 ms, like a primary-key query) and fills,
//!   through `get_or_load` (GET, lease script, load, fill script) vs naive
//!   cache-aside (GET, load, SET) (target ratio ≤ 1.15);
//! - `redis_batch_hit_100`, `redis_batch_miss_100`: `get_many` of 100 hits vs a
//!   raw `MGET` (target ≤ 1.2), and a 100-key miss batch through
//!   `get_or_load_many` vs `MGET`, one query and pipelined `SET`s (target ≤ 1.3).
//!
//! `scripts/bench-ratios` prints the ratios from criterion's results.

use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use cachet::{Cache, MemoryStore, NoCodec, RedisStore};
use cachet_testkit::RedisServer;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: u64 = 10_000;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Value {
    id: u64,
    name: String,
    email: String,
    score: i64,
}

fn value(id: u64) -> Value {
    Value {
        id,
        name: format!("user {id}"),
        email: format!("user{id}@example.com"),
        score: -7,
    }
}

/// A pre-drawn, seeded sequence of keys so that drawing is not timed.
fn keys(n: usize) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(42);
    (0..n).map(|_| rng.random_range(0..KEYS)).collect()
}

/// Runs a future that completes without waiting (an in-process hit), without
/// a runtime: the cost measured is the cache's, not an executor's.
fn now<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("an in-process hit never waits"),
    }
}

/// Hits of `keys` in a bare quick_cache map (`quick_cache_get`) and through
/// `cache` (`cachet_get`), in the criterion group `group`.
fn compare_hits(
    c: &mut Criterion,
    group: &str,
    keys: &[u64],
    bare: &quick_cache::sync::Cache<u64, Arc<Value>>,
    cache: &Cache<u64, Arc<Value>>,
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("quick_cache_get", |b| {
        b.iter(|| {
            i = (i + 1) & (keys.len() - 1);
            black_box(bare.get(&keys[i]).unwrap().id)
        });
    });
    g.bench_function("cachet_get", |b| {
        b.iter(|| {
            i = (i + 1) & (keys.len() - 1);
            black_box(now(cache.get(&keys[i])).unwrap().unwrap().id)
        });
    });
    g.finish();
}

fn memory_hit(c: &mut Criterion) {
    let keys = keys(1 << 16);
    let bare: quick_cache::sync::Cache<u64, Arc<Value>> = quick_cache::sync::Cache::new(20_000);
    let cache: Cache<u64, Arc<Value>> = Cache::builder("bench")
        .codec(NoCodec)
        .memory(MemoryStore::new(20_000))
        .build()
        .unwrap();
    // Both maps hold the same values, as in `near_hit`: a value's place in
    // memory is then the same for both, and only the maps differ.
    for k in 0..KEYS {
        let v = Arc::new(value(k));
        bare.insert(k, Arc::clone(&v));
        now(cache.set(&k, v)).unwrap();
    }
    compare_hits(c, "memory_hit", &keys, &bare, &cache);
}

struct Redis {
    _server: RedisServer,
    rt: tokio::runtime::Runtime,
    conn: redis::aio::ConnectionManager,
    cache: Cache<u64, Value>,
}

fn redis() -> Redis {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (conn, cache) = rt.block_on(async {
        let client = redis::Client::open(server.url()).unwrap();
        let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let cache: Cache<u64, Value> = Cache::builder("bench")
            .ttl(Duration::from_secs(3600))
            .store(store)
            .build()
            .unwrap();
        (conn, cache)
    });
    Redis {
        _server: server,
        rt,
        conn,
        cache,
    }
}

fn redis_hit(c: &mut Criterion) {
    let r = redis();
    let keys = keys(1 << 12);
    // The bare baseline reads exactly the bytes cachet stored: the same key, the
    // same envelope and payload.
    r.rt.block_on(async {
        for k in 0..KEYS {
            r.cache.set(&k, value(k)).await.unwrap();
        }
    });
    let raw_keys: Vec<String> = keys
        .iter()
        .map(|k| r.cache.store_key(k).as_str().to_owned())
        .collect();

    let mut g = c.benchmark_group("redis_hit");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("redis_get", |b| {
        b.to_async(&r.rt).iter(|| {
            i = (i + 1) & (keys.len() - 1);
            let key = &raw_keys[i];
            let mut conn = r.conn.clone();
            async move {
                let v: Option<bytes::Bytes> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(v.unwrap().len())
            }
        });
    });
    g.bench_function("cachet_get", |b| {
        b.to_async(&r.rt).iter(|| {
            i = (i + 1) & (keys.len() - 1);
            let key = keys[i];
            let cache = &r.cache;
            async move { black_box(cache.get(&key).await.unwrap().unwrap().id) }
        });
    });
    g.finish();

    // 64 tasks sharing the one connection, 100 reads each.
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 100;
    let mut g = c.benchmark_group("redis_hit_64_tasks");
    g.throughput(Throughput::Elements(TASKS * PER_TASK));
    let raw_keys = Arc::new(raw_keys);
    let keys = Arc::new(keys);
    g.bench_function("redis_get", |b| {
        b.to_async(&r.rt).iter_custom(|iters| {
            let (conn, raw_keys) = (r.conn.clone(), Arc::clone(&raw_keys));
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|t| {
                            let (mut conn, raw_keys) = (conn.clone(), Arc::clone(&raw_keys));
                            tokio::spawn(async move {
                                for j in 0..PER_TASK {
                                    let key =
                                        &raw_keys[((t * PER_TASK + j) as usize) % raw_keys.len()];
                                    let v: Option<bytes::Bytes> = redis::cmd("GET")
                                        .arg(key)
                                        .query_async(&mut conn)
                                        .await
                                        .unwrap();
                                    black_box(v);
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
                start.elapsed()
            }
        });
    });
    g.bench_function("cachet_get", |b| {
        b.to_async(&r.rt).iter_custom(|iters| {
            let (cache, keys) = (r.cache.clone(), Arc::clone(&keys));
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|t| {
                            let (cache, keys) = (cache.clone(), Arc::clone(&keys));
                            tokio::spawn(async move {
                                for j in 0..PER_TASK {
                                    let key = keys[((t * PER_TASK + j) as usize) % keys.len()];
                                    black_box(cache.get(&key).await.unwrap());
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
                start.elapsed()
            }
        });
    });
    g.finish();
}

/// The source of truth: about 1 ms per query, like a primary-key lookup over a
/// network. A sleep, so that it costs the same in both strategies.
async fn load(id: u64) -> Result<Option<Value>, std::io::Error> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(Some(value(id)))
}

fn redis_miss(c: &mut Criterion) {
    let r = redis();
    // Every iteration reads a key never read before: a miss each time.
    let next = AtomicU64::new(1_000_000);
    let mut g = c.benchmark_group("redis_miss");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function(BenchmarkId::new("naive_cache_aside", "1ms_load"), |b| {
        b.to_async(&r.rt).iter(|| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            let key = r.cache.store_key(&id).as_str().to_owned();
            let mut conn = r.conn.clone();
            async move {
                let hit: Option<bytes::Bytes> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(hit.is_none());
                let v = load(id).await.unwrap().unwrap();
                let bytes = postcard::to_allocvec(&v).unwrap();
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg(bytes)
                    .arg("PX")
                    .arg(3_600_000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(v.id)
            }
        });
    });
    g.bench_function(BenchmarkId::new("cachet_get_or_load", "1ms_load"), |b| {
        b.to_async(&r.rt).iter(|| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            let cache = &r.cache;
            async move {
                let v = cache
                    .get_or_load(&id, move || load(id))
                    .await
                    .unwrap()
                    .unwrap();
                black_box(v.id)
            }
        });
    });
    g.finish();
}

fn near_hit(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let keys = keys(1 << 16);
    let bare: quick_cache::sync::Cache<u64, Arc<Value>> = quick_cache::sync::Cache::new(20_000);
    let cache: Cache<u64, Arc<Value>> = rt.block_on(async {
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let cache: Cache<u64, Arc<Value>> = Cache::builder("bench")
            .ttl(Duration::from_secs(3600))
            .store(store)
            .near_cache(cachet::NearCache::new(20_000, Duration::from_secs(3600)))
            .build()
            .unwrap();
        // Wait until the bus subscription is up: L1 is unused before.
        for _ in 0..1_000 {
            if cache.stats().near_clears > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for k in 0..KEYS {
            let v = Arc::new(value(k));
            bare.insert(k, Arc::clone(&v));
            cache.set(&k, v).await.unwrap();
        }
        // The notices of those writes come back through the bus and drop what
        // L1 holds for them; once they are through, reads from Redis fill L1.
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let before = cache.stats().near_hits;
            for k in 0..KEYS {
                cache.get(&k).await.unwrap();
            }
            if cache.stats().near_hits - before == KEYS {
                break;
            }
        }
        cache
    });
    assert!(cache.stats().near_clears > 0, "the bus never connected");
    compare_hits(c, "near_hit", &keys, &bare, &cache);
    let s = cache.stats();
    assert!(s.near_hits > 0, "the bench measured L1 hits");
    drop(rt);
}

/// `invalidate` (one `DEL` of entry and lease, and the bus's notice, sent
/// with it or queued) against a raw `DEL` of the entry key, each of a key that exists.
fn invalidate(c: &mut Criterion) {
    let r = redis();
    let keys = keys(1 << 12);
    let raw_keys: Vec<String> = keys
        .iter()
        .map(|k| r.cache.store_key(k).as_str().to_owned())
        .collect();
    let mut g = c.benchmark_group("invalidate");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("redis_del", |b| {
        b.to_async(&r.rt).iter(|| {
            i = (i + 1) & (keys.len() - 1);
            let key = &raw_keys[i];
            let mut conn = r.conn.clone();
            async move {
                let n: i64 = redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(n)
            }
        });
    });
    g.bench_function("cachet_invalidate", |b| {
        b.to_async(&r.rt).iter(|| {
            i = (i + 1) & (keys.len() - 1);
            let key = keys[i];
            let cache = &r.cache;
            async move { cache.invalidate(&key).await.unwrap() }
        });
    });
    g.finish();
}

/// What the entry checksum costs a hit: decoding a 100-byte payload's entry
/// with its checksum against the same entry without one.
fn envelope_checksum(c: &mut Criterion) {
    use cachet_core::envelope;
    let payload: Vec<u8> = (0..100u8).collect();
    let checked = bytes::Bytes::from(envelope::encode(&Default::default(), &payload));
    let mut plain = checked[..checked.len() - 4].to_vec();
    plain[1] &= !0b10;
    let plain = bytes::Bytes::from(plain);
    let mut g = c.benchmark_group("envelope_decode_100b");
    g.bench_function("without_checksum", |b| {
        b.iter(|| black_box(envelope::decode(black_box(&plain)).unwrap().1.len()));
    });
    g.bench_function("with_checksum", |b| {
        b.iter(|| black_box(envelope::decode(black_box(&checked)).unwrap().1.len()));
    });
    g.finish();
}

/// Keys in one batch of the batch benchmarks.
const BATCH: usize = 100;

/// `get_many` of 100 hits against a raw `MGET` of the same keys (the same
/// bytes), and a 100-key miss batch through `get_or_load_many` against naive
/// batch cache-aside: `MGET`, one query for the missing keys, pipelined `SET`s.
fn redis_batch(c: &mut Criterion) {
    let r = redis();
    r.rt.block_on(async {
        for k in 0..KEYS {
            r.cache.set(&k, value(k)).await.unwrap();
        }
    });
    let batches: Vec<Vec<u64>> = keys(BATCH * 64)
        .chunks(BATCH)
        .map(<[u64]>::to_vec)
        .collect();
    let raw_batches: Vec<Vec<String>> = batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|k| r.cache.store_key(k).as_str().to_owned())
                .collect()
        })
        .collect();
    let mut g = c.benchmark_group("redis_batch_hit_100");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut i = 0;
    g.bench_function("redis_mget", |b| {
        b.to_async(&r.rt).iter(|| {
            i = (i + 1) % raw_batches.len();
            let keys = &raw_batches[i];
            let mut conn = r.conn.clone();
            async move {
                let v: Vec<Option<bytes::Bytes>> = redis::cmd("MGET")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(v.len())
            }
        });
    });
    g.bench_function("cachet_get_many", |b| {
        b.to_async(&r.rt).iter(|| {
            i = (i + 1) % batches.len();
            let (keys, cache) = (&batches[i], &r.cache);
            async move {
                let v = cache.get_many(keys).await.unwrap();
                assert!(v.iter().all(Option::is_some));
                black_box(v.len())
            }
        });
    });
    g.finish();

    // Every iteration reads 100 keys never read before.
    let next = AtomicU64::new(2_000_000);
    let fresh_batch = || -> Vec<u64> {
        let first = next.fetch_add(BATCH as u64, Ordering::Relaxed);
        (first..first + BATCH as u64).collect()
    };
    let mut g = c.benchmark_group("redis_batch_miss_100");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("naive_mget_query_sets", |b| {
        b.to_async(&r.rt).iter(|| {
            let ids = fresh_batch();
            let keys: Vec<String> = ids
                .iter()
                .map(|k| r.cache.store_key(k).as_str().to_owned())
                .collect();
            let mut conn = r.conn.clone();
            async move {
                let hits: Vec<Option<bytes::Bytes>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(hits.iter().all(Option::is_none));
                let values = load_many(ids).await.unwrap();
                let mut pipe = redis::pipe();
                for (key, v) in keys.iter().zip(values.values()) {
                    let bytes = postcard::to_allocvec(v).unwrap();
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(bytes)
                        .arg("PX")
                        .arg(3_600_000)
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
                black_box(values.len())
            }
        });
    });
    g.bench_function("cachet_get_or_load_many", |b| {
        b.to_async(&r.rt).iter(|| {
            let ids = fresh_batch();
            let cache = &r.cache;
            async move {
                let v = cache.get_or_load_many(&ids, load_many).await.unwrap();
                assert!(v.iter().all(Option::is_some));
                black_box(v.len())
            }
        });
    });
    g.finish();
}

/// One query for many rows: about 1 ms, like `WHERE id = ANY($1)`.
async fn load_many(ids: Vec<u64>) -> Result<std::collections::HashMap<u64, Value>, std::io::Error> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(ids.into_iter().map(|id| (id, value(id))).collect())
}

criterion_group!(
    benches,
    memory_hit,
    near_hit,
    redis_hit,
    redis_miss,
    invalidate,
    redis_batch,
    envelope_checksum
);
criterion_main!(benches);
