//! The store conformance suite, and what else touches several keys, on a local
//! Redis Cluster of three masters.
//!
//! Forming a cluster takes two to three seconds. Tests running in one process
//! share one cluster (each in its own namespace and system prefix); it is
//! stopped when the last test using it ends. Under nextest, which runs every
//! test in its own process, each test starts its own. Tests that disturb a
//! cluster (`SCRIPT FLUSH`, a paused node) always start their own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use cachet_core::{
    Acquire, AcquireMode, BloomKey, Entry, Fill, KeyLayout, Meta, Payload, Read, Store, StoreKey,
};
use cachet_redis::RedisStore;
use cachet_testkit::conformance::{BoxFuture, Harness, KeyTtl};
use cachet_testkit::{RedisCluster, RedisServer};

/// The cluster the tests of this process share while any of them runs.
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

/// A name no other test of this process or of another process uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{what}-{}-{n}", std::process::id())
}

struct ClusterHarness {
    store: RedisStore,
    system_prefix: String,
    layout: KeyLayout,
    cluster: Arc<RedisCluster>,
}

impl ClusterHarness {
    /// A harness on the cluster this process's tests share.
    async fn new() -> Self {
        Self::on(tokio::task::spawn_blocking(shared_cluster).await.unwrap()).await
    }

    /// A harness on a cluster of its own, for a test that disturbs it.
    async fn alone() -> Self {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start);
        Self::on(Arc::new(cluster.await.unwrap())).await
    }

    async fn on(cluster: Arc<RedisCluster>) -> Self {
        let system_prefix = format!("{}:", unique("cachet"));
        let store = RedisStore::cluster_builder(cluster.urls())
            .system_prefix(&system_prefix)
            .connect()
            .await
            .unwrap();
        let layout = KeyLayout::new("cachet:", &unique("conformance")).unwrap();
        Self {
            store,
            system_prefix,
            layout,
            cluster,
        }
    }
}

impl Harness for ClusterHarness {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    fn layout(&self) -> KeyLayout {
        self.layout.clone()
    }

    fn advance(&self, by: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(by))
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey, lease: bool) -> BoxFuture<'a, KeyTtl> {
        let name = if lease {
            key.lease_key()
        } else {
            key.as_str().to_owned()
        };
        // Straight to the node serving the key's slot, not through the client
        // under test.
        let reply = self.cluster.command_for_key(&name, &["PTTL", &name]);
        Box::pin(async move {
            match reply.parse::<i64>() {
                Ok(-2) => KeyTtl::Absent,
                Ok(-1) => KeyTtl::Persistent,
                Ok(ms) => KeyTtl::Expires(Duration::from_millis(ms.unsigned_abs())),
                Err(_) => panic!("PTTL {name}: {reply}"),
            }
        })
    }

    fn write_raw<'a>(&'a self, key: &'a StoreKey, bytes: &'a [u8]) -> Option<BoxFuture<'a, ()>> {
        let reply = self
            .cluster
            .command_bytes_for_key(key.as_str(), &[b"SET", key.as_str().as_bytes(), bytes]);
        assert_eq!(reply, "OK");
        Some(Box::pin(async {}))
    }
}

cachet_testkit::conformance_tests!(ClusterHarness::new().await);

const TTL: Duration = Duration::from_secs(60);

fn entry(payload: &'static [u8]) -> Entry {
    Entry {
        meta: Meta::default(),
        payload: Payload::Bytes(Bytes::from_static(payload)),
    }
}

/// One key of `layout` served by each node, in node order.
fn key_per_node(cluster: &RedisCluster, layout: &KeyLayout) -> Vec<StoreKey> {
    per_node(cluster, |i| layout.key(&i))
}

/// One grouped key of `layout` served by each node, in node order.
fn grouped_key_per_node(cluster: &RedisCluster, layout: &KeyLayout) -> Vec<StoreKey> {
    per_node(cluster, |i| layout.grouped_key(&i, "k"))
}

fn per_node(cluster: &RedisCluster, key: impl Fn(u32) -> StoreKey) -> Vec<StoreKey> {
    let mut found: Vec<Option<StoreKey>> = vec![None; cluster.nodes().len()];
    for i in 0.. {
        let key = key(i);
        let node = cluster.node_of(key.as_str());
        found[node].get_or_insert(key);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().flatten().collect()
}

/// Every primitive that runs a script, on each key: the full read-through
/// cycle and an unconditional set, or for a grouped key a set, a read and a
/// group invalidation.
async fn exercise_scripts(store: &RedisStore, keys: &[StoreKey]) {
    for key in keys {
        if let Some(group) = key.group_key() {
            store.set(key, entry(b"g"), TTL).await.unwrap();
            assert!(matches!(store.get(key).await.unwrap(), Read::Hit(_)));
            store
                .groups()
                .unwrap()
                .invalidate_group(&group)
                .await
                .unwrap();
            assert!(matches!(store.get(key).await.unwrap(), Read::Miss));
            continue;
        }
        store.invalidate(key).await.unwrap();
        let Acquire::Leased(t) = store
            .acquire(key, AcquireMode::IfAbsent, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("no lease on {key}");
        };
        assert_eq!(
            store.fill(key, &t, entry(b"filled"), TTL).await.unwrap(),
            Fill::Filled,
            "{key}"
        );
        assert!(matches!(store.get(key).await.unwrap(), Read::Hit(_)));
        store.set(key, entry(b"set"), TTL).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_survive_script_flush_on_every_node() {
    // Its own cluster: a flush between another test's reload and its retry
    // would fail that test.
    let h = ClusterHarness::alone().await;
    let mut keys = key_per_node(&h.cluster, &h.layout);
    keys.extend(grouped_key_per_node(&h.cluster, &h.layout));
    assert_eq!(keys.len(), 6);
    exercise_scripts(&h.store, &keys).await;
    for reply in h.cluster.command_all(&["SCRIPT", "FLUSH"]) {
        assert_eq!(reply, "OK");
    }
    // Each node answers NOSCRIPT once per script and gets it loaded.
    exercise_scripts(&h.store, &keys).await;
    exercise_scripts(&h.store, &keys).await;
}

/// A script whose node lost it is reloaded there even while another node does
/// not answer: the reload does not wait for every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_reload_needs_only_the_keys_node() {
    let h = ClusterHarness::alone().await;
    let keys = key_per_node(&h.cluster, &h.layout);
    let grouped = grouped_key_per_node(&h.cluster, &h.layout);
    exercise_scripts(&h.store, &keys).await;
    exercise_scripts(&h.store, &grouped).await;
    for reply in h.cluster.command_all(&["SCRIPT", "FLUSH"]) {
        assert_eq!(reply, "OK");
    }
    // Node 2 stops answering until it is resumed below: however slow the
    // machine, the other nodes' scripts run while it is stopped.
    h.cluster.nodes()[2].pause();
    exercise_scripts(&h.store, &keys[..2]).await;
    exercise_scripts(&h.store, &grouped[..2]).await;
    let e = h.store.get(&keys[2]).await.unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    h.cluster.nodes()[2].resume();
    exercise_scripts(&h.store, &keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deferred_queue_is_sharded_over_the_nodes_and_runs() {
    let h = ClusterHarness::new().await;
    let shards = h.store.deferred_queue_keys();
    assert_eq!(shards.len(), 16, "the default on a cluster");
    let mut nodes = std::collections::BTreeSet::new();
    for (due, claimed) in &shards {
        assert_eq!(h.cluster.slot_of(due), h.cluster.slot_of(claimed));
        nodes.insert(h.cluster.node_of(due));
    }
    assert_eq!(nodes.len(), 3, "every node holds some shards");

    let keys: Vec<StoreKey> = (0..200).map(|i| h.layout.key(&i)).collect();
    for key in &keys {
        h.store.set(key, entry(b"v"), TTL).await.unwrap();
        h.store
            .deferred_queue()
            .unwrap()
            .defer_invalidate(key, Duration::ZERO)
            .await
            .unwrap();
    }
    // Two workers share the queue; each item runs once.
    let other = RedisStore::cluster_builder(h.cluster.urls())
        .system_prefix(&h.system_prefix)
        .connect()
        .await
        .unwrap();
    let work = |store: RedisStore| async move {
        let mut ran = 0;
        for _ in 0..40 {
            ran += store
                .deferred_queue()
                .unwrap()
                .run_deferred(13)
                .await
                .unwrap()
                .ran;
        }
        ran
    };
    let (a, b) = tokio::join!(work(h.store.clone()), work(other));
    assert_eq!(a + b, 200, "{a} + {b}");
    for key in &keys {
        assert!(
            matches!(h.store.get(key).await.unwrap(), Read::Miss),
            "{key}"
        );
    }
    for (due, claimed) in &shards {
        assert_eq!(
            h.cluster.command_for_key(due, &["EXISTS", due, claimed]),
            "0"
        );
    }
    let done = h
        .store
        .deferred_queue()
        .unwrap()
        .run_deferred(10)
        .await
        .unwrap();
    assert_eq!((done.ran, done.next_due_in), (0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bloom_filter_builds_checks_and_adds_on_the_cluster() {
    let h = ClusterHarness::new().await;
    // Three chunks: two uploads into the temporary key, then the commit.
    let bits = (2 * (1 << 20) + 5) * 8;
    let filter = BloomKey::new(&h.layout, bits, 2);
    let node = h.cluster.node_of(filter.as_str());
    assert_eq!(
        h.cluster.slot_of(filter.as_str()),
        h.cluster.slot_of(&filter.temp_key("x"))
    );
    assert!(
        h.store
            .bloom_bits()
            .unwrap()
            .bloom_check(&filter, &[1, 2])
            .await
            .unwrap(),
        "a filter not built rules nothing out"
    );
    h.store
        .bloom_bits()
        .unwrap()
        .bloom_add(&filter, &[1, 2])
        .await
        .unwrap();
    assert_eq!(
        h.cluster.command(node, &["EXISTS", filter.as_str()]),
        "0",
        "no insertion into a filter not built"
    );

    let mut bitmap = vec![0u8; usize::try_from(filter.byte_len()).unwrap()];
    let set = [0, 9, (1 << 23) + 1, bits - 1];
    for p in set {
        bitmap[usize::try_from(p / 8).unwrap()] |= 0x80 >> (p % 8);
    }
    h.store
        .bloom_bits()
        .unwrap()
        .bloom_replace(&filter, Bytes::from(bitmap))
        .await
        .unwrap();
    assert!(
        h.store
            .bloom_bits()
            .unwrap()
            .bloom_check(&filter, &set)
            .await
            .unwrap()
    );
    assert!(
        !h.store
            .bloom_bits()
            .unwrap()
            .bloom_check(&filter, &[0, 10])
            .await
            .unwrap()
    );
    h.store
        .bloom_bits()
        .unwrap()
        .bloom_add(&filter, &[10, 11])
        .await
        .unwrap();
    assert!(
        h.store
            .bloom_bits()
            .unwrap()
            .bloom_check(&filter, &[0, 10, 11])
            .await
            .unwrap()
    );
    assert_eq!(
        h.cluster.command(node, &["GETBIT", filter.as_str(), "10"]),
        "1"
    );
    assert_eq!(h.cluster.command(node, &["PTTL", filter.as_str()]), "-1");
    let pattern = format!("{}*", filter.as_str());
    assert_eq!(
        h.cluster.command(node, &["KEYS", &pattern]),
        filter.as_str(),
        "no temporary key left"
    );
}

/// `ttl` is a pipeline of two `PTTL`s (entry and lease, one slot): routed to the
/// key's node as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_one_slot_runs_on_the_keys_node() {
    let h = ClusterHarness::new().await;
    assert!(h.store.is_cluster());
    let shown = format!("{:?}", h.store);
    assert!(shown.starts_with("RedisStore { cluster: ["), "{shown}");
    assert!(shown.contains(&h.cluster.urls()[2]), "{shown}");
    for key in key_per_node(&h.cluster, &h.layout) {
        let ttls = h.store.ttl(&key).await.unwrap();
        assert_eq!((ttls.entry, ttls.lease), (None, None));
        let _lease = h
            .store
            .acquire(&key, AcquireMode::IfAbsent, Duration::from_secs(5))
            .await
            .unwrap();
        h.store.set(&key, entry(b"v"), TTL).await.unwrap();
        let _lease = h
            .store
            .acquire(&key, AcquireMode::Replace, Duration::from_secs(5))
            .await
            .unwrap();
        let ttls = h.store.ttl(&key).await.unwrap();
        assert!(
            ttls.entry.is_some_and(|t| t > TTL / 2 && t <= TTL),
            "{ttls:?}"
        );
        assert!(
            ttls.lease
                .is_some_and(|t| t > Duration::ZERO && t <= Duration::from_secs(5)),
            "{ttls:?}"
        );
    }
}

#[tokio::test]
async fn a_plain_server_is_not_a_cluster() {
    let server = RedisServer::start();
    let e = RedisStore::connect_cluster(&[server.url()])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), cachet_core::StoreErrorKind::Config, "{e:?}");
    assert!(e.to_string().contains("not a Redis Cluster node"), "{e}");
}
