//! The conformance suite over the typed path: the guarantees of the store
//! conformance suite, and one test per store capability, checked through the
//! public `Cache<K, V>` API on every back end:
//!
//! - `memory_typed`: the cache's typed table of a `MemoryStore` (`memory`), on
//!   a mock clock;
//! - `memory_protocol`: the same kind of `MemoryStore` reached through the
//!   `Store` protocol (`store`), on a mock clock;
//! - `redis`: a real `redis-server`;
//! - `cluster`: a local Redis Cluster of three masters.
//!
//! Each test body below is one `async fn(Fx)`; `typed_conformance!` expands it
//! into one `#[tokio::test]` per back end, as `<back end>::<test>`.
//!
//! On the mock clock TTLs are crossed by advancing the clock; on Redis they
//! are short real TTLs, waited for with a bounded poll.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use cachet::store::{Layered, Op, StoreFuture, StoreLayer};
use cachet::{
    BloomOptions, Cache, CacheBuilder, CacheKey, Clock, DeferredWorker, ErrorKind, MemoryStore,
    MockClock, NearCache, RedisStore, Store,
};
use cachet_testkit::{RedisCluster, RedisServer, eventually};
use tokio::sync::{Barrier, Notify, oneshot};

type Res<T> = Result<T, std::io::Error>;

/// How long a bounded poll waits for something that takes real time (a
/// notice on the bus, a short Redis TTL, a deferred worker's poll).
const BOUND: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Back ends
// ---------------------------------------------------------------------------

/// The back end a test runs on.
enum Fx {
    /// The cache's typed table of a `MemoryStore`.
    MemoryTyped {
        store: MemoryStore,
        clock: MockClock,
    },
    /// A `MemoryStore` spoken to through the `Store` protocol.
    MemoryProtocol {
        store: MemoryStore,
        clock: MockClock,
    },
    /// One `redis-server` of the test's own.
    Redis {
        store: RedisStore,
        server: RedisServer,
    },
    /// A Redis Cluster, shared by the tests of this process; each test has
    /// its own namespaces and system prefix on it.
    Cluster {
        store: RedisStore,
        cluster: Arc<RedisCluster>,
        system_prefix: String,
    },
}

/// A name no other test of this process or of another process uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{what}-{}-{n}", std::process::id())
}

/// The cluster the tests of this process share while any of them runs (under
/// nextest, which runs each test in a process of its own, each test starts one).
fn shared_cluster() -> Arc<RedisCluster> {
    static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(RedisCluster::start());
    *shared = Arc::downgrade(&cluster);
    cluster
}

impl Fx {
    fn mock_store() -> (MemoryStore, MockClock) {
        let clock = Clock::mock();
        (MemoryStore::with_clock(100_000, clock.clock()), clock)
    }

    async fn memory_typed() -> Self {
        let (store, clock) = Self::mock_store();
        Fx::MemoryTyped { store, clock }
    }

    async fn memory_protocol() -> Self {
        let (store, clock) = Self::mock_store();
        Fx::MemoryProtocol { store, clock }
    }

    async fn redis() -> Self {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        Fx::Redis { store, server }
    }

    async fn cluster() -> Self {
        let cluster = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
        let system_prefix = format!("{}:", unique("cachet"));
        let store = Self::cluster_store(&cluster, &system_prefix).await;
        Fx::Cluster {
            store,
            cluster,
            system_prefix,
        }
    }

    async fn cluster_store(cluster: &RedisCluster, system_prefix: &str) -> RedisStore {
        RedisStore::cluster_builder(cluster.urls())
            .system_prefix(system_prefix)
            .connect()
            .await
            .unwrap()
    }

    fn name(&self) -> &'static str {
        match self {
            Fx::MemoryTyped { .. } => "memory_typed",
            Fx::MemoryProtocol { .. } => "memory_protocol",
            Fx::Redis { .. } => "redis",
            Fx::Cluster { .. } => "cluster",
        }
    }

    /// The mock clock of the in-process back ends; `None` on Redis.
    fn clock(&self) -> Option<&MockClock> {
        match self {
            Fx::MemoryTyped { clock, .. } | Fx::MemoryProtocol { clock, .. } => Some(clock),
            Fx::Redis { .. } | Fx::Cluster { .. } => None,
        }
    }

    /// A namespace of this test's own (the cluster is shared).
    fn ns(&self, what: &str) -> String {
        unique(what)
    }

    /// A builder for a cache in `ns` on this back end.
    fn builder<K, V>(&self, ns: &str) -> CacheBuilder<K, V>
    where
        K: CacheKey + ?Sized + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        match self {
            Fx::MemoryTyped { store, .. } => Cache::builder(ns).memory(store.clone()),
            Fx::MemoryProtocol { store, clock } => {
                Cache::builder(ns).store(store.clone()).clock(clock.clock())
            }
            Fx::Redis { store, .. } | Fx::Cluster { store, .. } => {
                Cache::builder(ns).store(store.clone())
            }
        }
    }

    /// A builder for a cache in `ns` on the same data as [`builder`], as
    /// another process sees it: on Redis over a connection of its own.
    async fn other_builder<K, V>(&self, ns: &str) -> CacheBuilder<K, V>
    where
        K: CacheKey + ?Sized + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        match self {
            Fx::MemoryTyped { .. } | Fx::MemoryProtocol { .. } => self.builder(ns),
            Fx::Redis { server, .. } => {
                Cache::builder(ns).store(RedisStore::connect(&server.url()).await.unwrap())
            }
            Fx::Cluster {
                cluster,
                system_prefix,
                ..
            } => Cache::builder(ns).store(Self::cluster_store(cluster, system_prefix).await),
        }
    }

    /// The store as a protocol handle.
    fn store(&self) -> Arc<dyn Store> {
        match self {
            Fx::MemoryTyped { store, .. } | Fx::MemoryProtocol { store, .. } => {
                Arc::new(store.clone())
            }
            Fx::Redis { store, .. } | Fx::Cluster { store, .. } => Arc::new(store.clone()),
        }
    }

    /// A deferred-invalidation worker on this back end's store.
    fn worker(&self) -> DeferredWorker {
        match self {
            Fx::MemoryTyped { store, .. } | Fx::MemoryProtocol { store, .. } => {
                DeferredWorker::spawn(store.clone())
            }
            Fx::Redis { store, .. } | Fx::Cluster { store, .. } => {
                DeferredWorker::spawn(store.clone())
            }
        }
    }

    /// A command about `key`, sent straight to the server (or cluster node)
    /// that holds it, not through the client under test. Redis only.
    fn command_for_key(&self, key: &str, args: &[&str]) -> String {
        match self {
            Fx::Redis { server, .. } => server.command(args),
            Fx::Cluster { cluster, .. } => cluster.command_for_key(key, args),
            Fx::MemoryTyped { .. } | Fx::MemoryProtocol { .. } => {
                panic!("{}: no server to send {args:?} to", self.name())
            }
        }
    }

    /// Every key matching `pattern` with its `PTTL`, by `SCAN` on every server
    /// (every node of a cluster). Redis only.
    fn scan_pttl(&self, pattern: &str) -> Vec<(String, i64)> {
        let servers: Vec<&RedisServer> = match self {
            Fx::Redis { server, .. } => vec![server],
            Fx::Cluster { cluster, .. } => cluster.nodes().iter().collect(),
            Fx::MemoryTyped { .. } | Fx::MemoryProtocol { .. } => {
                panic!("{}: no server to scan", self.name())
            }
        };
        let mut found = Vec::new();
        for server in servers {
            let mut cursor = "0".to_owned();
            let mut rounds = 0;
            loop {
                let reply = server.command(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"]);
                let mut lines = reply.lines();
                cursor = lines.next().unwrap().to_owned();
                for key in lines {
                    let pttl = server.command(&["PTTL", key]);
                    let pttl = pttl
                        .parse::<i64>()
                        .unwrap_or_else(|_| panic!("PTTL {key}: {pttl}"));
                    found.push((key.to_owned(), pttl));
                }
                rounds += 1;
                if cursor == "0" {
                    break;
                }
                assert!(rounds < 10_000, "SCAN did not finish");
            }
        }
        found
    }
}

/// Expands each test body into one `#[tokio::test]` per back end:
/// `memory_typed::<test>`, `memory_protocol::<test>`, `redis::<test>` and
/// `cluster::<test>`. Attributes before a test's name (`#[ignore = "…"]`)
/// go onto each of its four tests.
macro_rules! typed_conformance {
    ($($(#[$attr:meta])* $test:ident),* $(,)?) => {
        typed_conformance!(@backend memory_typed, [$($(#[$attr])* $test),*]);
        typed_conformance!(@backend memory_protocol, [$($(#[$attr])* $test),*]);
        typed_conformance!(@backend redis, [$($(#[$attr])* $test),*]);
        typed_conformance!(@backend cluster, [$($(#[$attr])* $test),*]);
    };
    (@backend $backend:ident, [$($(#[$attr:meta])* $test:ident),*]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$attr])*
                async fn $test() {
                    super::$test(super::Fx::$backend().await).await;
                }
            )*
        }
    };
}

typed_conformance!(
    miss_load_fill_hit,
    a_load_that_read_the_old_row_cannot_fill_after_invalidate,
    a_load_that_read_the_old_row_cannot_fill_after_set,
    set_then_get_and_invalidate_is_idempotent,
    not_found_is_cached_for_the_negative_ttl,
    every_key_written_has_a_ttl,
    entries_expire_after_their_ttl,
    concurrent_loads_of_one_key_run_one_loader,
    capability_groups,
    capability_groups_a_refused_fill_leaves_no_lease,
    capability_tags,
    capability_tags_a_load_that_began_before_invalidate_tag_cannot_fill,
    capability_tags_a_lost_generation_never_brings_entries_back,
    capability_tags_three_tags_in_three_slots,
    capability_tags_reach_near_caches,
    capability_versioned_set,
    capability_deferred_queue,
    capability_bloom,
    capability_invalidation_bus,
    a_batch_loads_its_missing_keys_in_one_call,
    a_batch_whose_loader_panics_fails_and_leaves_nothing_behind,
    a_write_racing_a_batch_refuses_that_keys_fill_only,
    a_key_leased_elsewhere_is_waited_for_not_loaded_again_by_a_batch,
    overlapping_batches_from_four_processes_load_each_key_once,
    a_batch_reads_the_store_in_one_call,
);

// ---------------------------------------------------------------------------
// A pretend source of truth
// ---------------------------------------------------------------------------

/// Rows by id, and how many times a loader read them.
#[derive(Clone, Default)]
struct Source {
    rows: Arc<Mutex<HashMap<u64, String>>>,
    loads: Arc<AtomicU64>,
}

impl Source {
    fn with(rows: &[(u64, &str)]) -> Self {
        let source = Self::default();
        for &(id, v) in rows {
            source.write(id, v);
        }
        source
    }

    fn write(&self, id: u64, v: &str) {
        self.rows.lock().unwrap().insert(id, v.to_owned());
    }

    fn read(&self, id: u64) -> Option<String> {
        self.rows.lock().unwrap().get(&id).cloned()
    }

    fn loads(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    /// A loader of row `id`: counts the load and reads the row when called.
    fn loader(&self, id: u64) -> impl FnOnce() -> Ready<Res<Option<String>>> + Send + 'static {
        let source = self.clone();
        move || {
            source.loads.fetch_add(1, Ordering::SeqCst);
            ready(Ok(source.read(id)))
        }
    }
}

/// A loader that must not run.
fn no_loader<V: Send + 'static>() -> impl FnOnce() -> Ready<Res<Option<V>>> + Send + 'static {
    || -> Ready<Res<Option<V>>> { panic!("the loader ran on a hit") }
}

// ---------------------------------------------------------------------------
// The read path
// ---------------------------------------------------------------------------

/// A miss loads and fills; the next read is a hit that calls no loader; the
/// counters say so.
async fn miss_load_fill_hit(fx: Fx) {
    let cache: Cache<u64, String> = fx.builder(&fx.ns("users")).build().unwrap();
    let source = Source::with(&[(1, "Ada")]);
    assert_eq!(cache.get(&1).await.unwrap(), None, "nothing cached yet");
    assert_eq!(
        cache.get_or_load(&1, source.loader(1)).await.unwrap(),
        Some("Ada".to_owned())
    );
    assert_eq!(source.loads(), 1);
    assert!(
        cache.ttl(&1).await.unwrap().is_some(),
        "{}: the load filled the store",
        fx.name()
    );
    assert_eq!(
        cache.get_or_load(&1, no_loader()).await.unwrap(),
        Some("Ada".to_owned())
    );
    assert_eq!(cache.get(&1).await.unwrap(), Some("Ada".to_owned()));
    assert_eq!(source.loads(), 1, "hits call no loader");
    // `peek` is not counted.
    assert_eq!(cache.peek(&1).await.unwrap(), Some("Ada".to_owned()));
    let s = cache.stats();
    assert_eq!(
        (
            s.misses,
            s.loads,
            s.hits,
            s.negative_hits,
            s.refused_fills,
            s.coalesced
        ),
        (2, 1, 2, 0, 0, 0),
        "{}: {s:?}",
        fx.name()
    );
    assert_eq!(s.lookups(), 4);
    assert!((s.hit_rate() - 0.5).abs() < 1e-9, "{s:?}");
}

/// What a racing reader's loader does: reads the row, says so, waits for the
/// writer, returns what it read.
fn racing_loader(
    source: &Source,
    id: u64,
    read: oneshot::Sender<()>,
    release: Arc<Notify>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Res<Option<String>>> + Send>> + Send + 'static
{
    let source = source.clone();
    move || {
        let row = source.read(id);
        Box::pin(async move {
            read.send(()).unwrap();
            release.notified().await;
            Ok(row)
        })
    }
}

/// The essay's race: the reader's loader reads the old row; the writer
/// commits and invalidates while the loader is blocked; the loader then
/// returns the old row, which must not be cached.
async fn a_load_that_read_the_old_row_cannot_fill_after_invalidate(fx: Fx) {
    let cache: Cache<u64, String> = fx.builder(&fx.ns("race")).build().unwrap();
    let source = Source::with(&[(1, "old")]);
    let (read_tx, read_rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    let reader = {
        let loader = racing_loader(&source, 1, read_tx, Arc::clone(&release));
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_load(&1, loader).await })
    };
    read_rx.await.unwrap();
    source.write(1, "new");
    cache.invalidate(&1).await.unwrap();
    release.notify_one();

    assert_eq!(
        reader.await.unwrap().unwrap().as_deref(),
        Some("old"),
        "the reader returns what it read"
    );
    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "{}: the old row was cached after the invalidation",
        fx.name()
    );
    assert_eq!(cache.stats().refused_fills, 1);
    assert_eq!(
        cache.get_or_load(&1, source.loader(1)).await.unwrap(),
        Some("new".to_owned())
    );
    assert_eq!(source.loads(), 1, "the next read loaded the new row");
    assert_eq!(cache.get(&1).await.unwrap(), Some("new".to_owned()));
}

/// The same race with `set` as the write: the set value stays.
async fn a_load_that_read_the_old_row_cannot_fill_after_set(fx: Fx) {
    let cache: Cache<u64, String> = fx.builder(&fx.ns("race")).build().unwrap();
    let source = Source::with(&[(1, "old")]);
    let (read_tx, read_rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    let reader = {
        let loader = racing_loader(&source, 1, read_tx, Arc::clone(&release));
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_load(&1, loader).await })
    };
    read_rx.await.unwrap();
    source.write(1, "new");
    cache.set(&1, "new".to_owned()).await.unwrap();
    release.notify_one();

    assert_eq!(reader.await.unwrap().unwrap().as_deref(), Some("old"));
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("new"),
        "{}: the old row replaced the set value",
        fx.name()
    );
    assert_eq!(cache.stats().refused_fills, 1);
    assert_eq!(
        cache.get_or_load(&1, no_loader()).await.unwrap().as_deref(),
        Some("new")
    );
}

async fn set_then_get_and_invalidate_is_idempotent(fx: Fx) {
    let cache: Cache<str, String> = fx.builder(&fx.ns("kv")).build().unwrap();
    // Keys that need escaping in store keys, and one never written.
    let keys = ["plain", "a b:{c}*", ""];
    for (i, key) in keys.iter().enumerate() {
        cache.set(key, format!("v{i}")).await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            cache.get(key).await.unwrap(),
            Some(format!("v{i}")),
            "{key:?}"
        );
    }
    cache.set("plain", "again".to_owned()).await.unwrap();
    assert_eq!(cache.get("plain").await.unwrap().as_deref(), Some("again"));
    for _ in 0..3 {
        cache.invalidate("plain").await.unwrap();
        assert_eq!(cache.get("plain").await.unwrap(), None);
    }
    cache.invalidate("never written").await.unwrap();
    cache.invalidate("never written").await.unwrap();
    assert_eq!(cache.get("never written").await.unwrap(), None);
    assert_eq!(cache.ttl("plain").await.unwrap(), None, "no entry is left");
    // The other keys are untouched.
    assert_eq!(cache.get("a b:{c}*").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(cache.get("").await.unwrap().as_deref(), Some("v2"));
    // After invalidating, a load runs and fills again.
    let source = Source::with(&[(0, "loaded")]);
    let loader = source.loader(0);
    assert_eq!(
        cache.get_or_load("plain", loader).await.unwrap().as_deref(),
        Some("loaded")
    );
    assert_eq!(cache.get("plain").await.unwrap().as_deref(), Some("loaded"));
}

/// "Not found" is cached for the negative TTL: no load within it, a load after.
async fn not_found_is_cached_for_the_negative_ttl(fx: Fx) {
    // On the mock clock, the negative TTL is crossed by advancing it; on
    // Redis it is a short real one.
    let negative_ttl = if fx.clock().is_some() {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    let cache: Cache<u64, String> = fx
        .builder(&fx.ns("neg"))
        .negative_ttl(negative_ttl)
        .build()
        .unwrap();
    let source = Source::default();
    for _ in 0..3 {
        assert_eq!(cache.get_or_load(&7, source.loader(7)).await.unwrap(), None);
    }
    assert_eq!(source.loads(), 1, "{}: the absence was cached", fx.name());
    assert_eq!(cache.get(&7).await.unwrap(), None);
    let s = cache.stats();
    assert_eq!((s.misses, s.loads, s.negative_hits), (1, 1, 3), "{s:?}");
    let left = cache.ttl(&7).await.unwrap().expect("a negative entry");
    assert!(left <= negative_ttl, "{left:?}");

    // Once the row exists and the negative TTL has passed, it is loaded.
    source.write(7, "created");
    match fx.clock() {
        Some(clock) => {
            clock.advance(negative_ttl - Duration::from_secs(1));
            assert_eq!(cache.get_or_load(&7, source.loader(7)).await.unwrap(), None);
            assert_eq!(source.loads(), 1, "still within the negative TTL");
            clock.advance(Duration::from_secs(2));
            assert_eq!(
                cache.get_or_load(&7, source.loader(7)).await.unwrap(),
                Some("created".to_owned())
            );
        }
        None => {
            eventually("the negative entry expires", BOUND, || {
                let cache = cache.clone();
                async move { cache.ttl(&7).await.unwrap().is_none() }
            })
            .await;
            assert_eq!(
                cache.get_or_load(&7, source.loader(7)).await.unwrap(),
                Some("created".to_owned())
            );
        }
    }
    assert_eq!(source.loads(), 2);
}

/// Every entry, negative entry, lease, group entry and versioned entry the
/// library writes has a TTL; only `:sys:` structures may live without one.
async fn every_key_written_has_a_ttl(fx: Fx) {
    const TTL: Duration = Duration::from_secs(60);
    const LEASE_TTL: Duration = Duration::from_secs(5);
    let plain: Cache<u64, String> = fx
        .builder(&fx.ns("ttl"))
        .ttl(TTL)
        .lease_ttl(LEASE_TTL)
        .build()
        .unwrap();
    let grouped: Cache<(u64, u64), String> = fx
        .builder(&fx.ns("ttl-g"))
        .ttl(TTL)
        .group_by(|k: &(u64, u64)| k.0)
        .build()
        .unwrap();
    let versioned: Cache<u64, Versioned> = fx
        .builder(&fx.ns("ttl-v"))
        .ttl(TTL)
        .version_by(|r: &Versioned| r.version)
        .build()
        .unwrap();
    let source = Source::default();
    for id in 0..40u64 {
        if id % 3 != 0 {
            source.write(id, &format!("row {id}"));
        }
    }
    for id in 0..40u64 {
        plain.get_or_load(&id, source.loader(id)).await.unwrap();
        match id % 10 {
            1 => plain.set(&id, "set".to_owned()).await.unwrap(),
            2 => plain.invalidate(&id).await.unwrap(),
            3 => plain
                .invalidate_twice(&id, Duration::from_secs(60))
                .await
                .unwrap(),
            _ => {}
        }
        let g = (id % 4, id);
        grouped.get_or_load(&g, source.loader(id)).await.unwrap();
        if id == 20 {
            grouped.invalidate_group(&1u64).await.unwrap();
        }
        if id % 5 == 0 {
            grouped
                .set(&(id % 4, 1000 + id), "set".into())
                .await
                .unwrap();
        }
        versioned
            .write_through(&(id % 7), || ready(Res::Ok(row(id, &format!("v{id}")))))
            .await
            .unwrap();
    }
    // A lease left behind: a load that is still running.
    let stuck = {
        let plain = plain.clone();
        tokio::spawn(async move {
            plain
                .get_or_load(&9999, || async {
                    std::future::pending::<()>().await;
                    Res::Ok(None)
                })
                .await
        })
    };

    let bound = TTL.mul_f64(1.1);
    match fx.clock() {
        Some(_) => {
            for id in 0..40u64 {
                let left = plain.ttl(&id).await.unwrap();
                if id % 10 == 2 || id % 10 == 3 {
                    assert_eq!(left, None, "{id} was invalidated");
                } else {
                    assert!(left.is_some_and(|t| t <= bound), "{id}: {left:?}");
                }
                let left = versioned.ttl(&(id % 7)).await.unwrap();
                assert!(left.is_some_and(|t| t <= bound), "{id}: {left:?}");
                let g = (id % 4, id);
                if id > 20 || g.0 != 1 {
                    let left = grouped.ttl(&g).await.unwrap();
                    assert!(left.is_some_and(|t| t <= bound), "{g:?}: {left:?}");
                }
            }
            eventually("the stuck load takes its lease", BOUND, || {
                let (store, key) = (plain.store().clone(), plain.store_key(&9999));
                async move { store.ttl(&key).await.unwrap().lease.is_some() }
            })
            .await;
            let lease = plain.store().ttl(&plain.store_key(&9999)).await.unwrap();
            assert!(
                lease.lease.is_some_and(|t| t <= LEASE_TTL),
                "{:?}",
                lease.lease
            );
        }
        None => {
            let lease_key = plain.store_key(&9999).lease_key();
            eventually("the stuck load takes its lease", BOUND, || {
                let found = fx.command_for_key(&lease_key, &["EXISTS", &lease_key]) == "1";
                ready(found)
            })
            .await;
            let mut all = Vec::new();
            for cache in [plain.layout(), grouped.layout(), versioned.layout()] {
                let pattern = format!("{}{}:*", cache.prefix(), cache.namespace());
                all.extend(fx.scan_pttl(&pattern));
            }
            let mut checked = 0;
            let mut system = 0;
            for (key, pttl) in &all {
                if key.contains(":sys:") {
                    system += 1;
                    continue;
                }
                assert!(
                    *pttl > 0,
                    "{}: {key} has PTTL {pttl}; every key: {all:?}",
                    fx.name()
                );
                let bound = if *key == lease_key { LEASE_TTL } else { bound };
                assert!(
                    u128::try_from(*pttl).unwrap() <= bound.as_millis(),
                    "{key} has PTTL {pttl}"
                );
                checked += 1;
            }
            assert!(
                all.iter().any(|(key, _)| *key == lease_key),
                "the lease is among the keys scanned"
            );
            // Plain: 40 less 8 invalidated, plus the lease; grouped: 40 and 8
            // sets, some orphaned; versioned: 7.
            assert!(checked >= 32 + 1 + 48 + 7, "{checked} keys: {all:?}");
            assert!(
                system >= 4,
                "the group generations are `:sys:` keys: {all:?}"
            );
        }
    }
    stuck.abort();
}

/// An entry is gone after its TTL (and not before).
async fn entries_expire_after_their_ttl(fx: Fx) {
    let ttl = if fx.clock().is_some() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(1)
    };
    let cache: Cache<u64, String> = fx
        .builder(&fx.ns("expire"))
        .ttl(ttl)
        .jitter(0.0)
        .build()
        .unwrap();
    let source = Source::with(&[(1, "loaded")]);
    cache.set(&2, "set".to_owned()).await.unwrap();
    assert_eq!(
        cache.get_or_load(&1, source.loader(1)).await.unwrap(),
        Some("loaded".to_owned())
    );
    for id in [1, 2] {
        let left = cache.ttl(&id).await.unwrap();
        assert!(left.is_some_and(|t| t <= ttl), "{id}: {left:?}");
    }
    match fx.clock() {
        Some(clock) => {
            clock.advance(ttl - Duration::from_secs(1));
            assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("loaded"));
            assert_eq!(cache.get(&2).await.unwrap().as_deref(), Some("set"));
            clock.advance(Duration::from_secs(2));
        }
        None => {
            eventually("both entries expire", BOUND, || {
                let cache = cache.clone();
                async move {
                    cache.ttl(&1).await.unwrap().is_none() && cache.ttl(&2).await.unwrap().is_none()
                }
            })
            .await;
        }
    }
    assert_eq!(cache.get(&1).await.unwrap(), None, "{}", fx.name());
    assert_eq!(cache.get(&2).await.unwrap(), None, "{}", fx.name());
    assert_eq!(cache.ttl(&1).await.unwrap(), None);
    source.write(1, "reloaded");
    assert_eq!(
        cache.get_or_load(&1, source.loader(1)).await.unwrap(),
        Some("reloaded".to_owned())
    );
    assert_eq!(source.loads(), 2);
}

/// 50 concurrent `get_or_load` calls of one key run one loader: the loader is
/// held until the 49 others have joined it.
async fn concurrent_loads_of_one_key_run_one_loader(fx: Fx) {
    const CALLERS: usize = 50;
    let cache: Cache<str, String> = fx.builder(&fx.ns("flight")).build().unwrap();
    let loads = Arc::new(AtomicU64::new(0));
    let release = Arc::new(Notify::new());
    let start = Arc::new(Barrier::new(CALLERS));
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (cache, loads, release, start) = (
            cache.clone(),
            Arc::clone(&loads),
            Arc::clone(&release),
            Arc::clone(&start),
        );
        callers.push(tokio::spawn(async move {
            start.wait().await;
            cache
                .get_or_load("hot", move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                    Res::Ok(Some("value".to_owned()))
                })
                .await
        }));
    }
    eventually("every caller joins the load", BOUND, || {
        ready(cache.stats().coalesced == CALLERS as u64 - 1)
    })
    .await;
    release.notify_one();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().as_deref(), Some("value"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "{}", fx.name());
    let s = cache.stats();
    assert_eq!(
        (s.loads, s.misses, s.coalesced, s.refused_fills),
        (1, CALLERS as u64, CALLERS as u64 - 1, 0),
        "{s:?}"
    );
    assert_eq!(
        cache
            .get_or_load("hot", no_loader())
            .await
            .unwrap()
            .as_deref(),
        Some("value")
    );
}

// ---------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------

/// Groups: `invalidate_group` orphans the group's entries and only them, and a
/// load that started before the bump cannot fill.
async fn capability_groups(fx: Fx) {
    type Key = (u64, u64);
    let cache: Cache<Key, String> = fx
        .builder(&fx.ns("groups"))
        .group_by(|k: &Key| k.0)
        .build()
        .unwrap();
    for key in [(1, 1), (1, 2), (2, 1)] {
        let v = format!("old {key:?}");
        cache
            .get_or_load(&key, move || async move { Res::Ok(Some(v)) })
            .await
            .unwrap();
    }
    assert!(cache.get(&(1, 1)).await.unwrap().is_some());
    cache.invalidate_group(&1u64).await.unwrap();
    assert_eq!(cache.get(&(1, 1)).await.unwrap(), None, "{}", fx.name());
    assert_eq!(cache.get(&(1, 2)).await.unwrap(), None);
    assert_eq!(
        cache.get(&(2, 1)).await.unwrap().as_deref(),
        Some("old (2, 1)"),
        "another group is untouched"
    );

    // A load that read before the bump cannot fill after it.
    let (read_tx, read_rx) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let reader = {
        let (cache, release) = (cache.clone(), Arc::clone(&release));
        tokio::spawn(async move {
            cache
                .get_or_load(&(1, 3), move || async move {
                    read_tx.send(()).unwrap();
                    release.notified().await;
                    Res::Ok(Some("old".to_owned()))
                })
                .await
        })
    };
    read_rx.await.unwrap();
    cache.invalidate_group(&1u64).await.unwrap();
    release.notify_one();
    assert_eq!(reader.await.unwrap().unwrap().as_deref(), Some("old"));
    assert_eq!(cache.get(&(1, 3)).await.unwrap(), None, "{}", fx.name());
    assert_eq!(cache.stats().refused_fills, 1);

    // The group's new generation fills and serves as usual (for a key whose
    // old lease is not left behind: see the next test).
    assert_eq!(
        cache
            .get_or_load(&(1, 1), || async { Res::Ok(Some("new".to_owned())) })
            .await
            .unwrap()
            .as_deref(),
        Some("new")
    );
    assert_eq!(cache.get(&(1, 1)).await.unwrap().as_deref(), Some("new"));
    cache.set(&(1, 2), "set".to_owned()).await.unwrap();
    assert_eq!(cache.get(&(1, 1)).await.unwrap().as_deref(), Some("new"));
    assert_eq!(cache.get(&(1, 2)).await.unwrap().as_deref(), Some("set"));
    assert_eq!(
        cache.get(&(2, 1)).await.unwrap().as_deref(),
        Some("old (2, 1)")
    );
    assert_eq!(cache.stats().refused_fills, 1);
    // Invalidating a group that was never used is fine.
    cache.invalidate_group(&77u64).await.unwrap();
}

/// After a group invalidation refused a load's fill, the key is free: the
/// next load of it (in the new generation) takes the lease at once and fills,
/// as after `invalidate`.
async fn capability_groups_a_refused_fill_leaves_no_lease(fx: Fx) {
    type Key = (u64, u64);
    let cache: Cache<Key, String> = fx
        .builder(&fx.ns("groups"))
        .group_by(|k: &Key| k.0)
        .build()
        .unwrap();
    let (read_tx, read_rx) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let reader = {
        let (cache, release) = (cache.clone(), Arc::clone(&release));
        tokio::spawn(async move {
            cache
                .get_or_load(&(1, 3), move || async move {
                    read_tx.send(()).unwrap();
                    release.notified().await;
                    Res::Ok(Some("old".to_owned()))
                })
                .await
        })
    };
    read_rx.await.unwrap();
    cache.invalidate_group(&1u64).await.unwrap();
    release.notify_one();
    assert_eq!(reader.await.unwrap().unwrap().as_deref(), Some("old"));
    assert_eq!(cache.stats().refused_fills, 1);
    let ttls = cache.store().ttl(&cache.store_key(&(1, 3))).await.unwrap();
    assert_eq!(
        ttls.lease,
        None,
        "{}: the refused load's lease outlives its refusal",
        fx.name()
    );
    assert_eq!(
        cache
            .get_or_load(&(1, 3), || async { Res::Ok(Some("new".to_owned())) })
            .await
            .unwrap()
            .as_deref(),
        Some("new")
    );
    assert_eq!(cache.stats().lease_waits, 0, "{:?}", cache.stats());
    assert_eq!(
        cache.get(&(1, 3)).await.unwrap().as_deref(),
        Some("new"),
        "{}: the first load after the group invalidation was not cached",
        fx.name()
    );
}

/// A value that names its own tags.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Tagged {
    body: String,
    tags: Vec<String>,
}

fn tagged(body: &str, tags: &[&str]) -> Tagged {
    Tagged {
        body: body.to_owned(),
        tags: tags.iter().map(|&t| t.to_owned()).collect(),
    }
}

fn tagged_cache(fx: &Fx) -> Cache<u64, Tagged> {
    fx.builder(&fx.ns("tags"))
        .tags_by(|_: &u64, v: &Tagged| v.tags.clone())
        .build()
        .unwrap()
}

fn tagged_loader(v: Tagged) -> impl FnOnce() -> Ready<Res<Option<Tagged>>> + Send + 'static {
    move || ready(Ok(Some(v)))
}

/// The bodies `cache` holds for `ids`, `None` where it holds nothing.
async fn bodies(cache: &Cache<u64, Tagged>, ids: &[u64]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for id in ids {
        out.push(cache.get(id).await.unwrap().map(|v| v.body));
    }
    out
}

/// Tags: `invalidate_tag` drops every entry carrying the tag and none other,
/// whatever else they carry; writes carry tags like fills.
async fn capability_tags(fx: Fx) {
    let cache = tagged_cache(&fx);
    let values = [
        (1, tagged("one", &["red", "round", "big"])),
        (2, tagged("two", &["round"])),
        (3, tagged("three", &[])),
        (4, tagged("four", &["blue", "big"])),
    ];
    for (id, v) in &values {
        cache
            .get_or_load(id, tagged_loader(v.clone()))
            .await
            .unwrap();
    }
    let ids = [1, 2, 3, 4];
    let all: Vec<Option<String>> = values.iter().map(|(_, v)| Some(v.body.clone())).collect();
    assert_eq!(bodies(&cache, &ids).await, all, "{}", fx.name());

    cache.invalidate_tag("round").await.unwrap();
    assert_eq!(
        bodies(&cache, &ids).await,
        [None, None, Some("three".into()), Some("four".into())],
        "{}: the entries tagged round, and only them",
        fx.name()
    );
    // A batch read checks each entry's tags too.
    let many: Vec<Option<String>> = (cache.get_many(&ids).await.unwrap().into_iter())
        .map(|v| v.map(|v| v.body))
        .collect();
    assert_eq!(
        many,
        [None, None, Some("three".into()), Some("four".into())],
        "{}: get_many",
        fx.name()
    );
    cache.invalidate_tag("never used").await.unwrap();
    assert_eq!(cache.get(&4).await.unwrap().unwrap().body, "four");

    // Loaded again, they carry the tag's new generation and serve.
    for (id, v) in &values[..2] {
        cache
            .get_or_load(id, tagged_loader(v.clone()))
            .await
            .unwrap();
    }
    assert_eq!(bodies(&cache, &ids).await, all, "{}", fx.name());
    cache.invalidate_tag("big").await.unwrap();
    assert_eq!(
        bodies(&cache, &ids).await,
        [None, Some("two".into()), Some("three".into()), None]
    );

    // `set` tags its value too.
    cache.set(&5, tagged("five", &["green"])).await.unwrap();
    cache.set(&6, tagged("six", &["big"])).await.unwrap();
    assert_eq!(
        bodies(&cache, &[5, 6]).await,
        [Some("five".into()), Some("six".into())]
    );
    cache.invalidate_tag("green").await.unwrap();
    assert_eq!(bodies(&cache, &[5, 6]).await, [None, Some("six".into())]);
    assert_eq!(cache.stats().refused_fills, 0, "{:?}", cache.stats());

    // A cache without tags has no invalidate_tag.
    let plain: Cache<u64, String> = fx.builder(&fx.ns("plain")).build().unwrap();
    assert_eq!(
        plain.invalidate_tag("red").await.unwrap_err().kind(),
        ErrorKind::Config
    );
}

/// A load that began before `invalidate_tag` of one of its value's tags cannot
/// fill, and leaves no lease behind; a load of a value without the tag fills.
async fn capability_tags_a_load_that_began_before_invalidate_tag_cannot_fill(fx: Fx) {
    let cache = tagged_cache(&fx);
    let slow_load = |id: u64, v: Tagged| {
        let (read_tx, read_rx) = oneshot::channel::<()>();
        let release = Arc::new(Notify::new());
        let task = {
            let (cache, release) = (cache.clone(), Arc::clone(&release));
            tokio::spawn(async move {
                cache
                    .get_or_load(&id, move || async move {
                        read_tx.send(()).unwrap();
                        release.notified().await;
                        Res::Ok(Some(v))
                    })
                    .await
            })
        };
        (read_rx, release, task)
    };
    // `w` has a generation before the loads begin. (A tag seen for the first
    // time by a fill is refused if any tag was invalidated during its load:
    // a new tag cannot be told from one whose generation was lost.)
    cache.set(&9, tagged("w", &["w"])).await.unwrap();
    let (read_a, release_a, a) = slow_load(1, tagged("old", &["x", "y", "z"]));
    let (read_b, release_b, b) = slow_load(2, tagged("other", &["w"]));
    read_a.await.unwrap();
    read_b.await.unwrap();
    cache.invalidate_tag("y").await.unwrap();
    release_a.notify_one();
    release_b.notify_one();
    assert_eq!(a.await.unwrap().unwrap().unwrap().body, "old");
    assert_eq!(b.await.unwrap().unwrap().unwrap().body, "other");
    assert_eq!(
        bodies(&cache, &[1, 2]).await,
        [None, Some("other".into())],
        "{}: the load that read before the invalidation of its tag filled",
        fx.name()
    );
    assert_eq!(cache.stats().refused_fills, 1, "{:?}", cache.stats());
    let ttls = cache.store().ttl(&cache.store_key(&1)).await.unwrap();
    assert_eq!(
        ttls.lease,
        None,
        "{}: the refused load's lease is left",
        fx.name()
    );

    // The next load takes the lease at once and fills.
    cache
        .get_or_load(&1, tagged_loader(tagged("new", &["x", "y", "z"])))
        .await
        .unwrap();
    assert_eq!(bodies(&cache, &[1]).await, [Some("new".into())]);
    assert_eq!(cache.stats().lease_waits, 0, "{:?}", cache.stats());
}

/// A tag generation that is lost (a `:sys:` key deleted or evicted on Redis)
/// never makes the entries it orphaned current again; later loads fill and
/// serve as usual.
async fn capability_tags_a_lost_generation_never_brings_entries_back(fx: Fx) {
    let cache = tagged_cache(&fx);
    cache
        .get_or_load(&1, tagged_loader(tagged("old", &["t", "u"])))
        .await
        .unwrap();
    cache.invalidate_tag("t").await.unwrap();
    assert_eq!(bodies(&cache, &[1]).await, [None]);
    let lose = |key: &str| {
        if fx.clock().is_none() {
            assert_eq!(fx.command_for_key(key, &["DEL", key]), "1", "{key}");
        }
    };
    let layout = cache.layout();
    let (t, u) = (layout.tag_key("t"), layout.tag_key("u"));
    lose(t.as_str());
    assert_eq!(
        bodies(&cache, &[1]).await,
        [None],
        "{}: back after losing t",
        fx.name()
    );
    lose(u.as_str());
    lose(&t.clock_key());
    assert_eq!(
        bodies(&cache, &[1]).await,
        [None],
        "{}: back after losing u and the clock",
        fx.name()
    );
    cache
        .get_or_load(&1, tagged_loader(tagged("new", &["t", "u"])))
        .await
        .unwrap();
    assert_eq!(
        bodies(&cache, &[1]).await,
        [Some("new".into())],
        "{}",
        fx.name()
    );
    cache.invalidate_tag("u").await.unwrap();
    assert_eq!(bodies(&cache, &[1]).await, [None], "{}", fx.name());
}

/// An entry with three tags in three slots (three nodes of the cluster):
/// each tag's invalidation reaches it, and the tag generations are `:sys:`
/// keys of their own slots.
async fn capability_tags_three_tags_in_three_slots(fx: Fx) {
    let cache = tagged_cache(&fx);
    let layout = cache.layout();
    let tags = ["a", "b", "c"];
    if let Fx::Cluster { cluster, .. } = &fx {
        let mut slots: Vec<u16> = tags
            .iter()
            .map(|t| cluster.slot_of(layout.tag_key(*t).as_str()))
            .collect();
        slots.push(cluster.slot_of(cache.store_key(&7).as_str()));
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(
            slots.len(),
            4,
            "the entry and its tags share a slot: {slots:?}"
        );
        let mut nodes: Vec<usize> = tags
            .iter()
            .map(|t| cluster.node_of(layout.tag_key(*t).as_str()))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes.len(), 3, "the tags are not on three nodes: {nodes:?}");
    }
    for gone in tags {
        cache
            .get_or_load(&7, tagged_loader(tagged("v", &tags)))
            .await
            .unwrap();
        assert_eq!(
            bodies(&cache, &[7]).await,
            [Some("v".into())],
            "{}",
            fx.name()
        );
        cache.invalidate_tag(gone).await.unwrap();
        assert_eq!(
            bodies(&cache, &[7]).await,
            [None],
            "{}: invalidating {gone}",
            fx.name()
        );
    }
    if fx.clock().is_none() {
        for t in tags {
            let key = layout.tag_key(t);
            let pttl = fx.command_for_key(key.as_str(), &["PTTL", key.as_str()]);
            assert_eq!(pttl, "-1", "{key:?} is a `:sys:` key, without a TTL");
        }
    }
    assert_eq!(cache.stats().refused_fills, 0, "{:?}", cache.stats());
}

/// A tag invalidation reaches the near caches in front of the store: this
/// process's at once, another process's through the bus. (The in-process
/// back ends have no bus, hence no near cache.)
async fn capability_tags_reach_near_caches(fx: Fx) {
    if fx.clock().is_some() {
        return;
    }
    let ns = fx.ns("near-tags");
    let near = NearCache::new(1_000, Duration::from_secs(60));
    let tags = |_: &u64, v: &Tagged| v.tags.clone();
    let a: Cache<u64, Tagged> = fx
        .builder(&ns)
        .near_cache(near)
        .tags_by(tags)
        .build()
        .unwrap();
    let b: Cache<u64, Tagged> = (fx.other_builder(&ns).await)
        .near_cache(near)
        .tags_by(tags)
        .build()
        .unwrap();
    eventually("both near caches subscribe", BOUND, || {
        ready(a.stats().near_clears >= 1 && b.stats().near_clears >= 1)
    })
    .await;
    for cache in [&a, &b] {
        for (id, tag) in [(1, "t"), (2, "u")] {
            let v = tagged(&format!("v{id}"), &[tag]);
            cache.get_or_load(&id, tagged_loader(v)).await.unwrap();
        }
        let before = cache.stats().near_hits;
        assert_eq!(
            bodies(cache, &[1, 2]).await,
            [Some("v1".into()), Some("v2".into())]
        );
        assert_eq!(cache.stats().near_hits, before + 2, "served from L1");
    }

    a.invalidate_tag("t").await.unwrap();
    assert_eq!(
        bodies(&a, &[1, 2]).await,
        [None, Some("v2".into())],
        "{}: the invalidating process's L1",
        fx.name()
    );
    eventually("b's L1 drops the entry carrying the tag", BOUND, || {
        let b = b.clone();
        async move { b.get(&1).await.unwrap().is_none() }
    })
    .await;
    assert_eq!(bodies(&b, &[2]).await, [Some("v2".into())]);
    assert_eq!(a.stats().store_errors + b.stats().store_errors, 0);
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Versioned {
    version: u64,
    body: String,
}

fn row(version: u64, body: &str) -> Versioned {
    Versioned {
        version,
        body: body.to_owned(),
    }
}

/// Versioned sets: `write_through` keeps the newest version; an older (or
/// equal) one is refused and counted in `stale_writes`.
async fn capability_versioned_set(fx: Fx) {
    let cache: Cache<u64, Versioned> = fx
        .builder(&fx.ns("versions"))
        .version_by(|r: &Versioned| r.version)
        .build()
        .unwrap();
    let write = |v: Versioned| move || ready(Res::Ok(v));
    assert_eq!(
        cache.write_through(&1, write(row(2, "two"))).await.unwrap(),
        row(2, "two")
    );
    assert_eq!(cache.get(&1).await.unwrap(), Some(row(2, "two")));
    assert_eq!(cache.stats().stale_writes, 0);

    // An older write reaches the cache late: refused, and it says what it wrote.
    assert_eq!(
        cache.write_through(&1, write(row(1, "one"))).await.unwrap(),
        row(1, "one")
    );
    assert_eq!(
        cache.get(&1).await.unwrap(),
        Some(row(2, "two")),
        "{}: an older write replaced a newer one",
        fx.name()
    );
    assert_eq!(cache.stats().stale_writes, 1);

    // The same version again is not newer.
    cache
        .write_through(&1, write(row(2, "two again")))
        .await
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), Some(row(2, "two")));
    assert_eq!(cache.stats().stale_writes, 2);

    cache
        .write_through(&1, write(row(3, "three")))
        .await
        .unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), Some(row(3, "three")));
    assert_eq!(cache.stats().stale_writes, 2);

    // A load that read version 3 before a write of version 4 cannot fill.
    cache.invalidate(&1).await.unwrap();
    let (read_tx, read_rx) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let reader = {
        let (cache, release) = (cache.clone(), Arc::clone(&release));
        tokio::spawn(async move {
            cache
                .get_or_load(&1, move || async move {
                    read_tx.send(()).unwrap();
                    release.notified().await;
                    Res::Ok(Some(row(3, "three")))
                })
                .await
        })
    };
    read_rx.await.unwrap();
    cache
        .write_through(&1, write(row(4, "four")))
        .await
        .unwrap();
    release.notify_one();
    assert_eq!(reader.await.unwrap().unwrap(), Some(row(3, "three")));
    assert_eq!(cache.get(&1).await.unwrap(), Some(row(4, "four")));

    // Keys are versioned independently.
    cache.write_through(&2, write(row(1, "b"))).await.unwrap();
    assert_eq!(cache.get(&2).await.unwrap(), Some(row(1, "b")));
    assert_eq!(cache.stats().stale_writes, 2);
}

/// The deferred queue: `invalidate_twice` deletes now and queues a second
/// delete; a value put back without a lease in between is gone once a
/// `DeferredWorker` has run it.
async fn capability_deferred_queue(fx: Fx) {
    let cache: Cache<u64, String> = fx.builder(&fx.ns("deferred")).build().unwrap();
    let untouched = 2;
    cache.set(&1, "old".to_owned()).await.unwrap();
    cache.set(&untouched, "other".to_owned()).await.unwrap();
    let delay = if fx.clock().is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(300)
    };
    cache.invalidate_twice(&1, delay).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap(), None, "the first delete ran");
    // A writer without a lease (a plain set after a stale read) puts the old
    // value back between the two deletes.
    cache.set(&1, "stale".to_owned()).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("stale"));
    if let Some(clock) = fx.clock() {
        // Not due yet: nothing runs.
        let queue = fx.store();
        let queue = queue.deferred_queue().unwrap();
        let done = queue.run_deferred(10).await.unwrap();
        assert_eq!(done.ran, 0);
        assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("stale"));
        clock.advance(delay);
    }
    let worker = fx.worker();
    eventually("the worker runs the second delete", BOUND, || {
        ready(worker.ran() >= 1)
    })
    .await;
    assert_eq!(worker.ran(), 1, "{}", fx.name());
    assert_eq!(worker.errors(), 0);
    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "{}: the value put back survived the second delete",
        fx.name()
    );
    assert_eq!(
        cache.get(&untouched).await.unwrap().as_deref(),
        Some("other")
    );
    worker.shutdown().await;
    let done = fx
        .store()
        .deferred_queue()
        .unwrap()
        .run_deferred(10)
        .await
        .unwrap();
    assert_eq!(
        (done.ran, done.next_due_in),
        (0, None),
        "the queue is empty"
    );
}

/// Bloom admission: once the filter is built, a key never inserted is answered
/// absent without a load; after `set` the key is admitted.
async fn capability_bloom(fx: Fx) {
    let cache: Cache<u64, String> = fx
        .builder(&fx.ns("bloom"))
        .bloom(BloomOptions::new(1_000, 0.001))
        .build()
        .unwrap();
    let source = Source::default();
    for id in 0..100u64 {
        source.write(id, &format!("row {id}"));
    }
    // Not built yet: nothing is ruled out.
    assert_eq!(
        cache
            .get_or_load(&5_000, source.loader(5_000))
            .await
            .unwrap(),
        None
    );
    assert_eq!(source.loads(), 1);
    cache.invalidate(&5_000).await.unwrap();

    cache.bloom().unwrap().rebuild(0..100u64).await.unwrap();
    for id in 0..10u64 {
        assert_eq!(
            cache.get_or_load(&id, source.loader(id)).await.unwrap(),
            Some(format!("row {id}"))
        );
    }
    assert_eq!(source.loads(), 11);
    for id in 10_000..10_020u64 {
        assert_eq!(
            cache.get_or_load(&id, source.loader(id)).await.unwrap(),
            None
        );
    }
    assert_eq!(
        source.loads(),
        11,
        "{}: keys never inserted reached the loader",
        fx.name()
    );
    assert_eq!(cache.stats().bloom_rejections, 20);
    assert_eq!(
        cache
            .get_or_load(&5_000, source.loader(5_000))
            .await
            .unwrap(),
        None
    );
    assert_eq!(source.loads(), 11);

    // A key written through the cache is admitted, also once its entry is gone.
    cache.set(&10_005, "new".to_owned()).await.unwrap();
    assert!(
        cache
            .bloom()
            .unwrap()
            .might_contain(&10_005u64)
            .await
            .unwrap()
    );
    assert_eq!(cache.get(&10_005).await.unwrap().as_deref(), Some("new"));
    cache.invalidate(&10_005).await.unwrap();
    source.write(10_005, "from the source");
    assert_eq!(
        cache
            .get_or_load(&10_005, source.loader(10_005))
            .await
            .unwrap()
            .as_deref(),
        Some("from the source")
    );
    assert_eq!(source.loads(), 12);
    assert_eq!(cache.stats().bloom_rejections, 21);
}

/// The invalidation bus: two caches on the same data and namespace, each with
/// a near cache; after one invalidates or sets, the other's L1 stops serving
/// the old value. The in-process store has no bus, and the builder refuses a
/// near cache on it.
async fn capability_invalidation_bus(fx: Fx) {
    let ns = fx.ns("near");
    let near = NearCache::new(1_000, Duration::from_secs(60));
    if fx.clock().is_some() {
        let refused = fx
            .builder::<u64, String>(&ns)
            .near_cache(near)
            .build()
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Config);
        let why = match fx {
            Fx::MemoryTyped { .. } => "near_cache is for a shared store",
            _ => "near_cache needs a store that offers an invalidation bus",
        };
        assert!(
            refused.to_string().contains(why),
            "{}: {refused}",
            fx.name()
        );
        assert!(fx.store().bus().is_none());
        return;
    }
    let a: Cache<u64, String> = fx.builder(&ns).near_cache(near).build().unwrap();
    let b: Cache<u64, String> = fx
        .other_builder(&ns)
        .await
        .near_cache(near)
        .build()
        .unwrap();
    // A near cache is used once its subscription is up, which clears it once.
    eventually("both near caches subscribe", BOUND, || {
        ready(a.stats().near_clears >= 1 && b.stats().near_clears >= 1)
    })
    .await;
    let source = Source::with(&[(1, "old")]);
    assert_eq!(
        b.get_or_load(&1, source.loader(1))
            .await
            .unwrap()
            .as_deref(),
        Some("old")
    );
    let before = b.stats().near_hits;
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("old"));
    assert_eq!(b.stats().near_hits, before + 1, "served from b's L1");

    // a invalidates after the source changed: b stops serving the old value.
    source.write(1, "new");
    a.invalidate(&1).await.unwrap();
    eventually("b's L1 drops the invalidated value", BOUND, || {
        let b = b.clone();
        async move { b.get(&1).await.unwrap().as_deref() != Some("old") }
    })
    .await;
    assert_eq!(
        b.get_or_load(&1, source.loader(1))
            .await
            .unwrap()
            .as_deref(),
        Some("new")
    );
    let before = b.stats().near_hits;
    assert_eq!(b.get(&1).await.unwrap().as_deref(), Some("new"));
    assert_eq!(b.stats().near_hits, before + 1, "served from b's L1");

    // a sets: b serves the set value.
    a.set(&1, "newer".to_owned()).await.unwrap();
    eventually("b's L1 drops the overwritten value", BOUND, || {
        let b = b.clone();
        async move { b.get(&1).await.unwrap().as_deref() == Some("newer") }
    })
    .await;
    // And the other way round.
    assert_eq!(
        a.get_or_load(&2, || ready(Res::Ok(Some("a's".to_owned()))))
            .await
            .unwrap()
            .as_deref(),
        Some("a's")
    );
    assert_eq!(a.get(&2).await.unwrap().as_deref(), Some("a's"));
    b.set(&2, "b's".to_owned()).await.unwrap();
    eventually("a's L1 drops the overwritten value", BOUND, || {
        let a = a.clone();
        async move { a.get(&2).await.unwrap().as_deref() == Some("b's") }
    })
    .await;
    assert_eq!(a.stats().store_errors + b.stats().store_errors, 0);
}

// ---------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------

/// A batch loader over `source`: counts each call and each key it loads.
fn batch_loader(
    source: &Source,
    calls: &Arc<Mutex<Vec<Vec<u64>>>>,
) -> impl Fn(Vec<u64>) -> Ready<Res<HashMap<u64, String>>> + Send + Sync + 'static {
    let (source, calls) = (source.clone(), Arc::clone(calls));
    move |ids: Vec<u64>| {
        let mut ids_sorted = ids.clone();
        ids_sorted.sort_unstable();
        calls.lock().unwrap().push(ids_sorted);
        source.loads.fetch_add(ids.len() as u64, Ordering::SeqCst);
        let found = ids
            .into_iter()
            .filter_map(|id| source.read(id).map(|v| (id, v)))
            .collect();
        ready(Ok(found))
    }
}

/// Hits are served, the missing keys load in one loader call, a key the
/// loader leaves out is cached as "not found", results keep the keys' order
/// (a key given twice included), and the next batch calls no loader.
async fn a_batch_loads_its_missing_keys_in_one_call(fx: Fx) {
    let cache: Cache<u64, String> = fx
        .builder(&fx.ns("batch"))
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let source = Source::with(&[(1, "a"), (2, "b"), (3, "c")]);
    cache.set(&1, "a".to_owned()).await.unwrap();
    cache.set(&2, "b".to_owned()).await.unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let got = cache
        .get_or_load_many(&[1, 2, 3, 4, 3], batch_loader(&source, &calls))
        .await
        .unwrap();
    let some = |v: &str| Some(v.to_owned());
    assert_eq!(got, vec![some("a"), some("b"), some("c"), None, some("c")]);
    assert_eq!(*calls.lock().unwrap(), vec![vec![3, 4]], "{}", fx.name());

    let again = cache
        .get_or_load_many(&[4, 3, 2, 1], batch_loader(&source, &calls))
        .await
        .unwrap();
    assert_eq!(again, vec![None, some("c"), some("b"), some("a")]);
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "{}: the second batch loaded",
        fx.name()
    );
    assert_eq!(
        cache.get_many(&[3, 4, 5]).await.unwrap(),
        vec![some("c"), None, None]
    );
    let s = cache.stats();
    assert_eq!(
        (s.loads, s.fills, s.refused_fills),
        (1, 2, 0),
        "{}: {s:?}",
        fx.name()
    );
}

/// A batch whose loader panics fails, with an error that names a key and the
/// panic, for each key it was loading; it leaves no lease and no flight
/// behind: the next batch loads those keys again.
async fn a_batch_whose_loader_panics_fails_and_leaves_nothing_behind(fx: Fx) {
    let cache: Cache<u64, String> = fx.builder(&fx.ns("batch-panic")).build().unwrap();
    /// Panics on the first call over `calls`, loads every key afterwards.
    fn loader(
        calls: &Arc<Mutex<u32>>,
    ) -> impl Fn(Vec<u64>) -> Ready<Res<HashMap<u64, String>>> + Send + Sync + 'static {
        let calls = Arc::clone(calls);
        move |ids: Vec<u64>| {
            let first = {
                let mut calls = calls.lock().unwrap();
                *calls += 1;
                *calls == 1
            };
            assert!(!first, "the first batch's loader panics");
            ready(Ok(ids
                .into_iter()
                .map(|id| (id, format!("v{id}")))
                .collect()))
        }
    }
    let calls = Arc::new(Mutex::new(0));
    let e = cache
        .get_or_load_many(&[1, 2, 3], loader(&calls))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Load, "{}: {e:?}", fx.name());
    assert!(e.to_string().contains("panicked"), "{e}");
    let got = cache
        .get_or_load_many(&[1, 2, 3], loader(&calls))
        .await
        .unwrap();
    let some = |v: &str| Some(v.to_owned());
    assert_eq!(
        got,
        vec![some("v1"), some("v2"), some("v3")],
        "{}",
        fx.name()
    );
    assert_eq!(
        *calls.lock().unwrap(),
        2,
        "{}: one call per batch",
        fx.name()
    );
}

/// The essay's race inside a batch: the loader reads rows 1 and 2, the
/// writer updates row 1 and invalidates it; key 1's fill is refused, key 2's
/// lands.
async fn a_write_racing_a_batch_refuses_that_keys_fill_only(fx: Fx) {
    let cache: Cache<u64, String> = fx.builder(&fx.ns("batch-race")).build().unwrap();
    let source = Source::with(&[(1, "old"), (2, "two")]);
    let (read_tx, read_rx) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let read_tx = Arc::new(Mutex::new(Some(read_tx)));
    let loader = {
        let (source, release) = (source.clone(), Arc::clone(&release));
        move |ids: Vec<u64>| {
            let rows: HashMap<u64, String> = ids
                .iter()
                .filter_map(|id| source.read(*id).map(|v| (*id, v)))
                .collect();
            let (release, read_tx) = (Arc::clone(&release), read_tx.lock().unwrap().take());
            async move {
                if let Some(tx) = read_tx {
                    tx.send(()).unwrap();
                }
                release.notified().await;
                Res::Ok(rows)
            }
        }
    };
    let batch = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_load_many(&[1, 2], loader).await })
    };
    read_rx.await.unwrap();
    source.write(1, "new");
    cache.invalidate(&1).await.unwrap();
    release.notify_one();
    assert_eq!(
        batch.await.unwrap().unwrap(),
        vec![Some("old".to_owned()), Some("two".to_owned())],
        "the batch returns what it read"
    );
    assert_eq!(
        cache.get(&1).await.unwrap(),
        None,
        "{}: the old row was cached",
        fx.name()
    );
    assert_eq!(cache.get(&2).await.unwrap(), Some("two".to_owned()));
    assert_eq!(cache.stats().refused_fills, 1, "{}", fx.name());
}

/// A key whose lease another process holds is waited for: the batch loads
/// the other keys and takes the holder's value for that one.
async fn a_key_leased_elsewhere_is_waited_for_not_loaded_again_by_a_batch(fx: Fx) {
    let ns = fx.ns("batch-wait");
    let holder_cache: Cache<u64, String> = fx.other_builder(&ns).await.build().unwrap();
    let cache: Cache<u64, String> = fx.builder(&ns).build().unwrap();
    let source = Source::with(&[(1, "one"), (2, "two")]);
    let (read_tx, read_rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    let holder = {
        let loader = racing_loader(&source, 1, read_tx, Arc::clone(&release));
        tokio::spawn(async move { holder_cache.get_or_load(&1, loader).await })
    };
    read_rx.await.unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let batch = {
        let (cache, loader) = (cache.clone(), batch_loader(&source, &calls));
        tokio::spawn(async move { cache.get_or_load_many(&[1, 2], loader).await })
    };
    // The batch loads key 2, and waits on key 1's lease.
    eventually("the batch waits on the lease", BOUND, || {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        async move { cache.stats().lease_waits == 1 && calls.lock().unwrap().len() == 1 }
    })
    .await;
    release.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), Some("one".to_owned()));
    assert_eq!(
        batch.await.unwrap().unwrap(),
        vec![Some("one".to_owned()), Some("two".to_owned())]
    );
    assert_eq!(*calls.lock().unwrap(), vec![vec![2]], "{}", fx.name());
    // The holder's loader reads the row without counting: only key 2 counts.
    assert_eq!(source.loads(), 1, "{}: the batch loaded key 1", fx.name());
}

/// Four processes run overlapping batches at once: each key is loaded once.
async fn overlapping_batches_from_four_processes_load_each_key_once(fx: Fx) {
    let ns = fx.ns("batch-stampede");
    let rows: Vec<(u64, String)> = (0..100).map(|id| (id, format!("row {id}"))).collect();
    let source = Source::default();
    for (id, v) in &rows {
        source.write(*id, v);
    }
    let per_key = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let barrier = Arc::new(Barrier::new(4));
    let ranges = [(0u64, 50u64), (25, 75), (50, 100), (0, 100)];
    let mut tasks = Vec::new();
    for (from, to) in ranges {
        let cache: Cache<u64, String> = fx.other_builder(&ns).await.build().unwrap();
        let (source, per_key, barrier) =
            (source.clone(), Arc::clone(&per_key), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            let keys: Vec<u64> = (from..to).collect();
            barrier.wait().await;
            let loader = move |ids: Vec<u64>| {
                let (source, per_key) = (source.clone(), Arc::clone(&per_key));
                async move {
                    for id in &ids {
                        *per_key.lock().unwrap().entry(*id).or_default() += 1;
                    }
                    // Long enough for the other batches to meet its leases.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Res::Ok(
                        ids.iter()
                            .filter_map(|id| source.read(*id).map(|v| (*id, v)))
                            .collect(),
                    )
                }
            };
            let got = cache.get_or_load_many(&keys, loader).await.unwrap();
            (keys, got)
        }));
    }
    for task in tasks {
        let (keys, got) = task.await.unwrap();
        for (id, v) in keys.iter().zip(got) {
            assert_eq!(v, Some(format!("row {id}")), "{}", fx.name());
        }
    }
    let per_key = per_key.lock().unwrap();
    assert_eq!(per_key.len(), 100, "{}", fx.name());
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{}: loaded more than once: {twice:?}",
        fx.name()
    );
}

/// Counts the reads that reach a store.
#[derive(Debug, Default)]
struct CountReads {
    gets: AtomicU64,
    batches: AtomicU64,
    /// Single acquires and fills, then batch ones.
    singles: AtomicU64,
    batch_writes: AtomicU64,
}

impl StoreLayer for CountReads {
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: Op<'a>,
        call: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        match op {
            Op::Get(_) => self.gets.fetch_add(1, Ordering::SeqCst),
            Op::GetMany(_) => self.batches.fetch_add(1, Ordering::SeqCst),
            Op::Acquire(..) | Op::Fill(_) => self.singles.fetch_add(1, Ordering::SeqCst),
            Op::AcquireMany(..) | Op::FillMany(_) => {
                self.batch_writes.fetch_add(1, Ordering::SeqCst)
            }
            _ => 0,
        };
        call
    }
}

/// `get_many` and the lookups of `get_or_load_many` reach the store as one
/// batch read, never a read per key, and the missing keys' leases and fills
/// as one batch call each; hits and misses come back in the keys' order.
async fn a_batch_reads_the_store_in_one_call(fx: Fx) {
    let counted = Arc::new(Layered::new(CountReads::default(), fx.store()));
    let mut builder: CacheBuilder<u64, String> =
        Cache::builder(fx.ns("batch-read")).store(Arc::clone(&counted) as Arc<dyn Store>);
    if let Some(clock) = fx.clock() {
        builder = builder.clock(clock.clock());
    }
    let cache = builder.build().unwrap();
    for id in [1, 3, 5] {
        cache.set(&id, format!("v{id}")).await.unwrap();
    }
    let reads = |c: &CountReads| {
        (
            c.gets.load(Ordering::SeqCst),
            c.batches.load(Ordering::SeqCst),
        )
    };
    let got = cache.get_many(&[5, 4, 3, 2, 1]).await.unwrap();
    let some = |id: u64| Some(format!("v{id}"));
    assert_eq!(got, vec![some(5), None, some(3), None, some(1)]);
    assert_eq!(reads(counted.layer()), (0, 1), "{}", fx.name());

    let source = Source::with(&[(2, "v2"), (4, "v4")]);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let got = cache
        .get_or_load_many(&[1, 2, 3, 4], batch_loader(&source, &calls))
        .await
        .unwrap();
    assert_eq!(got, vec![some(1), some(2), some(3), some(4)]);
    assert_eq!(*calls.lock().unwrap(), vec![vec![2, 4]], "{}", fx.name());
    assert_eq!(reads(counted.layer()), (0, 2), "{}", fx.name());
    let c = counted.layer();
    assert_eq!(
        (
            c.singles.load(Ordering::SeqCst),
            c.batch_writes.load(Ordering::SeqCst)
        ),
        (0, 2),
        "{}: one batch acquire, one batch fill",
        fx.name()
    );
    let s = cache.stats();
    assert_eq!((s.hits, s.misses), (5, 4), "{}: {s:?}", fx.name());
}
