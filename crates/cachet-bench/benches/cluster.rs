//! Hits on Redis Cluster against hits on a single Redis, measured in the same run.
//!
//! - `cluster_hit_64_tasks`: 64 tokio tasks sharing one store, 100
//!   `Cache::get` hits each (one iteration is 6,400 hits), on a single
//!   `redis-server` (`RedisStore::connect`) and on a local cluster of three
//!   masters without replicas (`RedisStore::connect_cluster`), every server on
//!   loopback on this machine (`…/cachet_get`); and the same reads as bare
//!   `GET`s of the same bytes on the store's own connection
//!   (`RedisStore::connection`, `…/redis_get`), which tells the cost of the
//!   cluster client apart from cachet's;
//! - `cluster_hit`: one `Cache::get` hit at a time, awaited before the next.
//! - `tags_hit/<server>/tags_<n>`: one `Cache::get` hit at a time of entries
//!   carrying `n` tags (0, 1, 3 and 8, drawn from 64, so that they spread over
//!   slots and, on the cluster, over its nodes). A hit with tags is the
//!   entry's `GET`, then one `MGET` of its tags' generations (on the cluster
//!   one `MGET` per slot, concurrently), so `tags_1` against `tags_0` is the
//!   cost of that second round trip, and `tags_8` against `tags_1` the cost of
//!   the larger `MGET` (or, on the cluster, of waiting for the slowest of
//!   several). What such a hit sends and receives, in bytes, is measured by
//!   the test `a_tagged_hit_costs_one_mget_and_its_tags_bytes`
//!   (`crates/cachet/tests/redis.rs`).
//!
//! The keys are spread over every slot, so the cluster's three nodes share the
//! load. At the end the bench prints the cluster's throughput relative to the
//! single server's (from the median of the per-sample times of each).
//!
//! ```sh
//! cargo bench -p cachet-bench --bench cluster -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cachet::{Cache, RedisStore};
use cachet_redis::RedisConnection;
use cachet_testkit::{RedisCluster, RedisServer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: u64 = 10_000;
const TAG_COUNTS: [usize; 4] = [0, 1, 3, 8];
const TASKS: u64 = 64;
const PER_TASK: u64 = 100;

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
fn keys(n: usize) -> Arc<Vec<u64>> {
    let mut rng = StdRng::seed_from_u64(42);
    Arc::new((0..n).map(|_| rng.random_range(0..KEYS)).collect())
}

/// A cache on `store`, filled with every key.
async fn filled(store: RedisStore) -> Cache<u64, Value> {
    let cache: Cache<u64, Value> = Cache::builder("bench")
        .ttl(Duration::from_secs(3600))
        .store(store)
        .build()
        .unwrap();
    for k in 0..KEYS {
        cache.set(&k, value(k)).await.unwrap();
    }
    cache
}

/// Nanoseconds per iteration of every sample of one benchmark.
#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl Samples {
    fn record(&self, elapsed: Duration, iters: u64) {
        let per_iter = elapsed.as_secs_f64() * 1e9 / iters.max(1) as f64;
        self.0.lock().unwrap().push(per_iter);
    }

    fn median(&self) -> f64 {
        let mut v = self.0.lock().unwrap().clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// What the tasks read with.
#[derive(Clone)]
enum Reader {
    Cache(Cache<u64, Value>),
    /// Bare `GET`s of the cache's keys on the store's connection.
    Get(RedisConnection, Arc<Vec<String>>),
}

impl Reader {
    async fn read(&mut self, keys: &[u64], i: usize) {
        match self {
            Self::Cache(cache) => {
                black_box(cache.get(&keys[i]).await.unwrap().unwrap());
            }
            Self::Get(conn, raw) => {
                let v: Option<bytes::Bytes> = redis::cmd("GET")
                    .arg(&raw[i])
                    .query_async(conn)
                    .await
                    .unwrap();
                black_box(v.unwrap());
            }
        }
    }
}

/// 64 tasks × 100 hits, `iters` times.
async fn hits_64_tasks(reader: &Reader, keys: &Arc<Vec<u64>>, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (mut reader, keys) = (reader.clone(), Arc::clone(keys));
                tokio::spawn(async move {
                    for j in 0..PER_TASK {
                        let i = ((t * PER_TASK + j) as usize) % keys.len();
                        reader.read(&keys, i).await;
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

fn cluster_vs_single(c: &mut Criterion) {
    let server = RedisServer::start();
    let cluster = RedisCluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (single_store, cluster_store) = rt.block_on(async {
        (
            RedisStore::connect(&server.url()).await.unwrap(),
            RedisStore::connect_cluster(&cluster.urls()).await.unwrap(),
        )
    });
    let (single, clustered) = rt.block_on(async {
        (
            filled(single_store.clone()).await,
            filled(cluster_store.clone()).await,
        )
    });
    let keys = keys(1 << 12);
    let raw: Arc<Vec<String>> = Arc::new(
        keys.iter()
            .map(|k| single.store_key(k).as_str().to_owned())
            .collect(),
    );
    let readers = [
        (
            "single_node/redis_get",
            Reader::Get(single_store.connection(), Arc::clone(&raw)),
        ),
        ("single_node/cachet_get", Reader::Cache(single.clone())),
        (
            "cluster_3_masters/redis_get",
            Reader::Get(cluster_store.connection(), raw),
        ),
        (
            "cluster_3_masters/cachet_get",
            Reader::Cache(clustered.clone()),
        ),
    ];

    let mut g = c.benchmark_group("cluster_hit_64_tasks");
    g.throughput(Throughput::Elements(TASKS * PER_TASK));
    let samples: [Samples; 4] = Default::default();
    for ((name, reader), samples) in readers.iter().zip(&samples) {
        let keys = &keys;
        g.bench_function(*name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let elapsed = hits_64_tasks(reader, keys, iters).await;
                samples.record(elapsed, iters);
                elapsed
            });
        });
    }
    g.finish();
    let [get_single, cachet_single, get_cluster, cachet_cluster] = samples.map(|s| s.median());

    let mut g = c.benchmark_group("cluster_hit");
    g.throughput(Throughput::Elements(1));
    let caches = [("single_node", &single), ("cluster_3_masters", &clustered)];
    let latency: [Samples; 2] = Default::default();
    for ((name, cache), samples) in caches.iter().zip(&latency) {
        let keys = &keys;
        g.bench_function(*name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let start = Instant::now();
                for i in 0..iters {
                    let key = keys[(i as usize) % keys.len()];
                    black_box(cache.get(&key).await.unwrap().unwrap());
                }
                let elapsed = start.elapsed();
                samples.record(elapsed, iters);
                elapsed
            });
        });
    }
    g.finish();
    let [one_single, one_cluster] = latency.map(|s| s.median());

    let per_sec = |ns: f64| TASKS as f64 * PER_TASK as f64 / (ns / 1e9);
    eprintln!(
        "\n64 tasks x 100 hits, a cluster of 3 masters vs a single node:\n  \
         Cache::get: single {:.0}/s, cluster {:.0}/s, cluster/single throughput {:.2}\n  \
         bare GET:   single {:.0}/s, cluster {:.0}/s, cluster/single throughput {:.2}\n\
         one Cache::get hit at a time: single {:.1} µs, cluster {:.1} µs, cluster/single {:.2}",
        per_sec(cachet_single),
        per_sec(cachet_cluster),
        cachet_single / cachet_cluster,
        per_sec(get_single),
        per_sec(get_cluster),
        get_single / get_cluster,
        one_single / 1e3,
        one_cluster / 1e3,
        one_cluster / one_single,
    );
    let stores = [
        ("single_node", single_store.clone()),
        ("cluster_3_masters", cluster_store.clone()),
    ];
    tagged_vs_untagged(c, &rt, &stores, &keys);
    drop((readers, single, clustered, single_store, cluster_store));
    drop(rt);
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Tagged {
    id: u64,
    name: String,
    tags: Vec<String>,
}

/// A cache on `store` whose every entry carries `n` tags, filled with every key.
async fn filled_tagged(store: RedisStore, n: usize) -> Cache<u64, Tagged> {
    let cache: Cache<u64, Tagged> = Cache::builder(format!("tags{n}"))
        .ttl(Duration::from_secs(3600))
        .store(store)
        .tags_by(|_: &u64, v: &Tagged| v.tags.clone())
        .build()
        .unwrap();
    for id in 0..KEYS {
        let tags = (0..n as u64)
            .map(|i| format!("tag{}", (id + i * 7) % 64))
            .collect();
        let name = format!("user {id}");
        cache.set(&id, Tagged { id, name, tags }).await.unwrap();
    }
    cache
}

fn tagged_vs_untagged(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    stores: &[(&str, RedisStore)],
    keys: &Arc<Vec<u64>>,
) {
    let mut g = c.benchmark_group("tags_hit");
    g.throughput(Throughput::Elements(1));
    for (server, store) in stores {
        for n in TAG_COUNTS {
            let cache = rt.block_on(filled_tagged(store.clone(), n));
            g.bench_function(format!("{server}/tags_{n}"), |b| {
                let mut i = 0;
                b.to_async(rt).iter(|| {
                    i = (i + 1) % keys.len();
                    let (cache, key) = (&cache, keys[i]);
                    async move { black_box(cache.get(&key).await.unwrap().unwrap()) }
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, cluster_vs_single);
criterion_main!(benches);
