//! A tagged hit against an untagged one, on a single Redis and on a local
//! Redis Cluster of three masters, measured in the same run.
//!
//! - `tags_hit/<server>/tags_<n>`: one `Cache::get` hit at a time, awaited
//!   before the next, of entries carrying `n` tags (0, 1, 3 and 8), the tags
//!   spread over slots (on the cluster, over its nodes). A hit with tags is
//!   the entry's `GET`, then one `MGET` of its tags' generations (on the
//!   cluster one `MGET` per slot, concurrently), so `tags_1` against `tags_0`
//!   is the cost of that second round trip, and `tags_8` against `tags_1`
//!   the cost of the larger `MGET` (or, on the cluster, of waiting for the
//!   slowest of several).
//!
//! What a hit sends and receives, in bytes, is measured by the test
//! `a_tagged_hit_costs_one_mget_and_its_tags_bytes` (`crates/cachet/tests/redis.rs`).
//!
//! ```sh
//! cargo bench -p cachet-bench --bench tags -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use cachet::{Cache, RedisStore};
use cachet_testkit::{RedisCluster, RedisServer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: u64 = 1_000;
const TAG_COUNTS: [usize; 4] = [0, 1, 3, 8];

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Value {
    id: u64,
    name: String,
    tags: Vec<String>,
}

/// A cache on `store` whose every entry carries `n` tags (drawn from 64, so
/// that they spread over slots), filled with every key.
async fn filled(store: RedisStore, n: usize) -> Cache<u64, Value> {
    let cache: Cache<u64, Value> = Cache::builder(format!("tags{n}"))
        .ttl(Duration::from_secs(3600))
        .store(store)
        .tags_by(|_: &u64, v: &Value| v.tags.clone())
        .build()
        .unwrap();
    for id in 0..KEYS {
        let tags = (0..n as u64)
            .map(|i| format!("tag{}", (id + i * 7) % 64))
            .collect();
        let v = Value {
            id,
            name: format!("user {id}"),
            tags,
        };
        cache.set(&id, v).await.unwrap();
    }
    cache
}

/// A pre-drawn, seeded sequence of keys so that drawing is not timed.
fn keys(n: usize) -> Arc<Vec<u64>> {
    let mut rng = StdRng::seed_from_u64(42);
    Arc::new((0..n).map(|_| rng.random_range(0..KEYS)).collect())
}

fn tagged_vs_untagged(c: &mut Criterion) {
    let server = RedisServer::start();
    let cluster = RedisCluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stores = rt.block_on(async {
        [
            (
                "single_node",
                RedisStore::connect(&server.url()).await.unwrap(),
            ),
            (
                "cluster_3_masters",
                RedisStore::connect_cluster(&cluster.urls()).await.unwrap(),
            ),
        ]
    });
    let keys = keys(1 << 12);
    let mut g = c.benchmark_group("tags_hit");
    g.throughput(Throughput::Elements(1));
    for (server, store) in stores {
        for n in TAG_COUNTS {
            let cache = rt.block_on(filled(store.clone(), n));
            let keys = &keys;
            g.bench_function(format!("{server}/tags_{n}"), |b| {
                let mut i = 0;
                b.to_async(&rt).iter(|| {
                    i = (i + 1) % keys.len();
                    let (cache, key) = (&cache, keys[i]);
                    async move { black_box(cache.get(&key).await.unwrap().unwrap()) }
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, tagged_vs_untagged);
criterion_main!(benches);
