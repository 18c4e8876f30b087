//! Benchmarks behind the dependency choices recorded in `docs/decisions.md`.
//!
//! Three groups of comparisons:
//!
//! - `redis_client/*` and `redis_client_concurrent/*`: redis-rs
//!   `aio::ConnectionManager` against fred's `Client`, both against a throwaway
//!   `redis-server` on loopback and both on the same tokio runtime;
//! - `local_cache/*`: `quick_cache::sync::Cache` against `moka::sync::Cache`;
//! - `codec/*`: postcard against `serde_json` against `rmp-serde`.
//!
//! Run with `cargo bench -p cachet-bench --bench choices`. Every random input is
//! drawn from a seeded RNG before the timed loop.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use fred::prelude::{ClientLike as _, KeysInterface as _};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

/// Seed for every RNG in this file.
const SEED: u64 = 0x00ca_c4e7_be4c_4001;

// ---------------------------------------------------------------------------
// 1. Redis client
// ---------------------------------------------------------------------------

/// Length of the value read by every GET.
const VALUE_LEN: usize = 64;
/// The key holding that value.
const KEY: &str = "cachet:bench:value";
/// A script that reads one key, so EVALSHA costs one GET plus the script call.
const LUA_GET: &str = "return redis.call('GET', KEYS[1])";
/// Concurrent tasks sharing one client in the throughput benchmark.
const TASKS: usize = 64;
/// Requests each of those tasks issues per iteration.
const GETS_PER_TASK: usize = 100;

/// `iters` rounds of [`TASKS`] tasks sharing one client, each awaiting
/// [`GETS_PER_TASK`] calls of `op` one after the other; the time they took.
async fn fan_out<F, Fut>(iters: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    for _ in 0..iters {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..TASKS {
            let op = op.clone();
            tasks.spawn(async move {
                for _ in 0..GETS_PER_TASK {
                    op().await;
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap();
        }
    }
    start.elapsed()
}

/// The runtime both clients run on: multi-threaded, one worker per core.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime")
}

fn redis_clients(c: &mut Criterion) {
    let server = cachet_testkit::RedisServer::start();
    let url = server.url();
    let rt = runtime();

    let mut rng = StdRng::seed_from_u64(SEED);
    let value: Vec<u8> = (0..VALUE_LEN).map(|_| rng.random()).collect();

    // redis-rs: one multiplexed, reconnecting connection.
    let rs_script = redis::Script::new(LUA_GET);
    let rs = rt.block_on(async {
        let client = redis::Client::open(url.as_str()).expect("redis-rs client");
        let mut con = client
            .get_connection_manager()
            .await
            .expect("redis-rs connection manager");
        redis::cmd("SET")
            .arg(KEY)
            .arg(&value)
            .query_async::<()>(&mut con)
            .await
            .expect("SET");
        // The first invocation loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA);
        // every timed one is a single EVALSHA.
        let got: Bytes = rs_script.key(KEY).invoke_async(&mut con).await.unwrap();
        assert_eq!(got, value);
        con
    });

    // fred: one client, one connection.
    let fred_script = fred::types::scripts::Script::from_lua(LUA_GET);
    let fred = rt.block_on(async {
        let config = fred::prelude::Config::from_url(&url).expect("fred config");
        let client = fred::prelude::Builder::from_config(config)
            .build()
            .expect("fred client");
        client.init().await.expect("fred connect");
        let got: Bytes = fred_script
            .evalsha_with_reload(&client, KEY, ())
            .await
            .expect("fred EVALSHA");
        assert_eq!(got, value);
        let got: Bytes = client.get(KEY).await.expect("fred GET");
        assert_eq!(got, value);
        client
    });

    // (a) and (b): one request at a time.
    let mut group = c.benchmark_group("redis_client");
    group.bench_function("get/redis-rs", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut con = rs.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let v: Bytes = redis::cmd("GET")
                        .arg(KEY)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    black_box(v);
                }
                start.elapsed()
            }
        });
    });
    group.bench_function("get/fred", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let client = fred.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let v: Bytes = client.get(KEY).await.unwrap();
                    black_box(v);
                }
                start.elapsed()
            }
        });
    });
    group.bench_function("evalsha/redis-rs", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut con = rs.clone();
            let script = &rs_script;
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let v: Bytes = script.key(KEY).invoke_async(&mut con).await.unwrap();
                    black_box(v);
                }
                start.elapsed()
            }
        });
    });
    group.bench_function("evalsha/fred", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let client = fred.clone();
            let script = &fred_script;
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let v: Bytes = script.evalsha_with_reload(&client, KEY, ()).await.unwrap();
                    black_box(v);
                }
                start.elapsed()
            }
        });
    });
    group.finish();

    // (c): TASKS tasks sharing one connection, GETS_PER_TASK requests each.
    let mut group = c.benchmark_group("redis_client_concurrent");
    group.throughput(Throughput::Elements((TASKS * GETS_PER_TASK) as u64));
    // One iteration is thousands of round trips: few, equally sized samples.
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    group.bench_function("get_64_tasks/redis-rs", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let con = rs.clone();
            fan_out(iters, move || {
                let mut con = con.clone();
                async move {
                    let v: Bytes = redis::cmd("GET")
                        .arg(KEY)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    black_box(v);
                }
            })
        });
    });
    group.bench_function("get_64_tasks/fred", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let client = fred.clone();
            fan_out(iters, move || {
                let client = client.clone();
                async move {
                    let v: Bytes = client.get(KEY).await.unwrap();
                    black_box(v);
                }
            })
        });
    });
    group.bench_function("evalsha_64_tasks/redis-rs", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (con, script) = (rs.clone(), Arc::new(rs_script.clone()));
            fan_out(iters, move || {
                let (mut con, script) = (con.clone(), Arc::clone(&script));
                async move {
                    let v: Bytes = script.key(KEY).invoke_async(&mut con).await.unwrap();
                    black_box(v);
                }
            })
        });
    });
    group.bench_function("evalsha_64_tasks/fred", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (client, script) = (fred.clone(), Arc::new(fred_script.clone()));
            fan_out(iters, move || {
                let (client, script) = (client.clone(), Arc::clone(&script));
                async move {
                    let v: Bytes = script.evalsha_with_reload(&client, KEY, ()).await.unwrap();
                    black_box(v);
                }
            })
        });
    });
    group.finish();

    rt.block_on(async {
        fred.quit().await.expect("fred QUIT");
    });
    // Drop the connections before the runtime, and the runtime before the server.
    drop(rs);
    drop(fred);
    drop(rt);
    drop(server);
}

// ---------------------------------------------------------------------------
// 2. In-process cache
// ---------------------------------------------------------------------------

/// Entries in the cache while reads are measured.
const ENTRIES: u64 = 10_000;
/// Pre-drawn key sequence length; a power of two so the index is a mask.
const KEY_SEQ: usize = 1 << 16;

/// A cached value of about 100 bytes.
#[derive(Clone, Debug)]
#[allow(dead_code)] // Read only through `black_box`.
struct Payload {
    id: u64,
    version: u32,
    flags: u32,
    body: [u8; 88],
}

impl Payload {
    fn new(id: u64, rng: &mut StdRng) -> Self {
        let mut body = [0u8; 88];
        rng.fill(&mut body[..]);
        Self {
            id,
            version: rng.random(),
            flags: rng.random(),
            body,
        }
    }
}

/// `len` keys in `0..ENTRIES`, uniformly distributed.
fn uniform_keys(rng: &mut StdRng, len: usize) -> Vec<u64> {
    (0..len).map(|_| rng.random_range(0..ENTRIES)).collect()
}

/// `len` keys in `0..ENTRIES` with Zipf(s = 1) popularity: key `k` is drawn with
/// probability proportional to `1 / (k + 1)`.
fn zipf_keys(rng: &mut StdRng, len: usize) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(ENTRIES as usize);
    let mut total = 0.0_f64;
    for k in 0..ENTRIES {
        total += 1.0 / (k + 1) as f64;
        cdf.push(total);
    }
    (0..len)
        .map(|_| {
            let u = rng.random::<f64>() * total;
            let idx = cdf.partition_point(|&c| c < u);
            (idx as u64).min(ENTRIES - 1)
        })
        .collect()
}

fn quick_cache_with(
    capacity: u64,
    values: &[Arc<Payload>],
) -> quick_cache::sync::Cache<u64, Arc<Payload>> {
    let cache = quick_cache::sync::Cache::new(capacity as usize);
    for (k, v) in values.iter().enumerate() {
        cache.insert(k as u64, Arc::clone(v));
    }
    cache
}

fn moka_with(capacity: u64, values: &[Arc<Payload>]) -> moka::sync::Cache<u64, Arc<Payload>> {
    let cache = moka::sync::Cache::builder().max_capacity(capacity).build();
    for (k, v) in values.iter().enumerate() {
        cache.insert(k as u64, Arc::clone(v));
    }
    cache.run_pending_tasks();
    cache
}

fn local_caches(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let values: Vec<Arc<Payload>> = (0..ENTRIES)
        .map(|id| Arc::new(Payload::new(id, &mut rng)))
        .collect();
    eprintln!(
        "local_cache: value size {} bytes, {ENTRIES} entries",
        std::mem::size_of::<Payload>()
    );
    let distributions = [
        ("uniform", uniform_keys(&mut rng, KEY_SEQ)),
        ("zipf", zipf_keys(&mut rng, KEY_SEQ)),
    ];

    // Reads: every key is present. Capacity has headroom so that neither crate
    // evicts while being filled (both shard their capacity).
    let read_capacity = ENTRIES * 2;
    let qc = quick_cache_with(read_capacity, &values);
    let mk = moka_with(read_capacity, &values);
    for k in 0..ENTRIES {
        assert!(qc.get(&k).is_some(), "quick_cache lost key {k}");
        assert!(mk.get(&k).is_some(), "moka lost key {k}");
    }

    let mut group = c.benchmark_group("local_cache");
    for (name, keys) in &distributions {
        group.bench_function(format!("get_{name}/quick_cache"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let k = keys[i & (KEY_SEQ - 1)];
                i = i.wrapping_add(1);
                black_box(qc.get(&k))
            });
        });
        group.bench_function(format!("get_{name}/moka"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let k = keys[i & (KEY_SEQ - 1)];
                i = i.wrapping_add(1);
                black_box(mk.get(&k))
            });
        });
    }

    // Writes (a): replace the value of a present key (uniform keys).
    let (_, uniform) = &distributions[0];
    group.bench_function("insert_replace/quick_cache", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let k = uniform[i & (KEY_SEQ - 1)];
            i = i.wrapping_add(1);
            qc.insert(k, Arc::clone(&values[(k as usize) ^ 1]));
        });
    });
    group.bench_function("insert_replace/moka", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let k = uniform[i & (KEY_SEQ - 1)];
            i = i.wrapping_add(1);
            mk.insert(k, Arc::clone(&values[(k as usize) ^ 1]));
        });
    });
    drop(qc);
    drop(mk);

    // Writes (b): a full cache of capacity ENTRIES; every insert is a new key, so
    // the crate has to admit or reject it and evict.
    let qc = quick_cache_with(ENTRIES, &values);
    let mk = moka_with(ENTRIES, &values);
    let value = Arc::clone(&values[0]);
    group.bench_function("insert_new_full/quick_cache", |b| {
        let mut next = ENTRIES;
        b.iter(|| {
            qc.insert(next, Arc::clone(&value));
            next += 1;
        });
    });
    group.bench_function("insert_new_full/moka", |b| {
        let mut next = ENTRIES;
        b.iter(|| {
            mk.insert(next, Arc::clone(&value));
            next += 1;
        });
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// 3. Value codec
// ---------------------------------------------------------------------------

/// A representative cached value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    created_at_ms: i64,
    roles: Vec<String>,
    active: bool,
    balance_cents: i64,
}

fn sample_user(rng: &mut StdRng) -> User {
    const FIRST: [&str; 4] = ["Ada", "Grace", "Edsger", "Barbara"];
    const LAST: [&str; 4] = ["Lovelace", "Hopper", "Dijkstra", "Liskov"];
    const ROLES: [&str; 4] = ["reader", "editor", "billing", "admin"];
    let first = FIRST[rng.random_range(0..FIRST.len())];
    let last = LAST[rng.random_range(0..LAST.len())];
    let id = rng.random_range(1..10_000_000_u64);
    User {
        id,
        name: format!("{first} {last}"),
        email: format!(
            "{}.{}{id}@example.com",
            first.to_lowercase(),
            last.to_lowercase()
        ),
        created_at_ms: rng.random_range(1_500_000_000_000..1_800_000_000_000_i64),
        roles: ROLES[..rng.random_range(1..=ROLES.len())]
            .iter()
            .map(|r| (*r).to_owned())
            .collect(),
        active: rng.random(),
        balance_cents: rng.random_range(-100_000..10_000_000_i64),
    }
}

fn codecs(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let user = sample_user(&mut rng);

    let postcard_bytes = postcard::to_allocvec(&user).expect("postcard encode");
    let json_bytes = serde_json::to_vec(&user).expect("serde_json encode");
    let rmp_bytes = rmp_serde::to_vec(&user).expect("rmp-serde encode");
    assert_eq!(postcard::from_bytes::<User>(&postcard_bytes).unwrap(), user);
    assert_eq!(serde_json::from_slice::<User>(&json_bytes).unwrap(), user);
    assert_eq!(rmp_serde::from_slice::<User>(&rmp_bytes).unwrap(), user);
    eprintln!("codec: sample value {user:?}");
    eprintln!(
        "codec: encoded sizes: postcard {} B, serde_json {} B, rmp-serde {} B",
        postcard_bytes.len(),
        json_bytes.len(),
        rmp_bytes.len()
    );

    let mut group = c.benchmark_group("codec");
    group.bench_function("encode/postcard", |b| {
        b.iter(|| postcard::to_allocvec(black_box(&user)).unwrap());
    });
    group.bench_function("encode/serde_json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&user)).unwrap());
    });
    group.bench_function("encode/rmp-serde", |b| {
        b.iter(|| rmp_serde::to_vec(black_box(&user)).unwrap());
    });
    group.bench_function("decode/postcard", |b| {
        b.iter(|| postcard::from_bytes::<User>(black_box(&postcard_bytes)).unwrap());
    });
    group.bench_function("decode/serde_json", |b| {
        b.iter(|| serde_json::from_slice::<User>(black_box(&json_bytes)).unwrap());
    });
    group.bench_function("decode/rmp-serde", |b| {
        b.iter(|| rmp_serde::from_slice::<User>(black_box(&rmp_bytes)).unwrap());
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = choices;
    config = config();
    targets = redis_clients, local_caches, codecs
}
criterion_main!(choices);
