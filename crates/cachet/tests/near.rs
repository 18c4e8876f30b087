//! The near cache (L1) over Redis: coherent across processes, cleared when its
//! invalidation bus breaks.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet::{Cache, NearCache, RedisStore};
use cachet_testkit::RedisServer;

type Db = Arc<std::sync::Mutex<std::collections::HashMap<u64, String>>>;

async fn instance(server: &RedisServer) -> Cache<u64, String> {
    let store = RedisStore::connect(&server.url()).await.unwrap();
    Cache::builder("near")
        .store(store)
        .near_cache(NearCache::new(1_000, Duration::from_secs(30)))
        .build()
        .unwrap()
}

type Loaded =
    std::pin::Pin<Box<dyn Future<Output = Result<Option<String>, std::io::Error>> + Send>>;

fn loader(db: &Db, key: u64) -> impl FnOnce() -> Loaded + Send + 'static {
    let db = Arc::clone(db);
    move || Box::pin(async move { Ok(db.lock().unwrap().get(&key).cloned()) })
}

/// Waits (bounded) until every instance's bus subscription is up.
async fn connected(caches: &[Cache<u64, String>]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while caches.iter().any(|c| c.stats().near_clears == 0) {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::task::yield_now().await;
    }
}

/// Reads `key` through every instance until all return `want`, within `bound`.
async fn converge(caches: &[Cache<u64, String>], db: &Db, key: u64, want: &str, bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    for c in caches {
        loop {
            let got = c.get_or_load(&key, loader(db, key)).await.unwrap();
            if got.as_deref() == Some(want) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "an instance still serves {got:?} instead of {want:?} after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_near_cache_and_reconnects_clear_them() {
    let server = RedisServer::start();
    let caches = vec![
        instance(&server).await,
        instance(&server).await,
        instance(&server).await,
    ];
    connected(&caches).await;
    let db: Db = Arc::default();
    let writes = AtomicU64::new(0);
    for round in 0..60u64 {
        let key = round % 5;
        let value = format!("v{round}");
        let writer = &caches[(round % 3) as usize];
        // Everyone has the old value in L1.
        for c in &caches {
            c.get_or_load(&key, loader(&db, key)).await.unwrap();
        }
        db.lock().unwrap().insert(key, value.clone());
        writer.invalidate(&key).await.unwrap();
        writes.fetch_add(1, Ordering::Relaxed);
        // After the invalidation completes and a small bounded delay, nobody
        // serves the old value.
        converge(&caches, &db, key, &value, Duration::from_millis(500)).await;
        if round == 30 {
            // Break every subscription: each near cache must clear itself
            // (once on the loss, once on the recovery).
            let before: Vec<u64> = caches.iter().map(|c| c.stats().near_clears).collect();
            server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            for (c, b) in caches.iter().zip(&before) {
                while c.stats().near_clears < b + 2 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no clear after a reconnect"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    let hits: u64 = caches.iter().map(|c| c.stats().near_hits).sum();
    assert!(hits > 100, "L1 answered reads: {hits}");
    println!(
        "near hits {hits}, clears {:?}",
        caches
            .iter()
            .map(|c| c.stats().near_clears)
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_invalidations_and_writes_reach_other_near_caches() {
    let server = RedisServer::start();
    let make = |store: RedisStore| {
        Cache::<(u64, u64), String>::builder("tenants")
            .store(store)
            .group_by(|k: &(u64, u64)| k.0)
            .near_cache(NearCache::new(1_000, Duration::from_secs(30)))
            .build()
            .unwrap()
    };
    let a = make(RedisStore::connect(&server.url()).await.unwrap());
    let b = make(RedisStore::connect(&server.url()).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.stats().near_clears == 0 || b.stats().near_clears == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    for id in 0..10 {
        b.get_or_load(&(1, id), move || async move {
            Ok::<_, std::io::Error>(Some(format!("old {id}")))
        })
        .await
        .unwrap();
    }
    assert!(b.get(&(1, 3)).await.unwrap().is_some());
    let hits = b.stats().near_hits;
    assert!(b.get(&(1, 3)).await.unwrap().is_some());
    assert_eq!(b.stats().near_hits, hits + 1, "served from L1");
    a.invalidate_group(&1u64).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while b.get(&(1, 3)).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group stays in b's L1"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A plain write in one process drops the entry from the other's L1.
    b.get_or_load(&(2, 1), || async {
        Ok::<_, std::io::Error>(Some("old".to_owned()))
    })
    .await
    .unwrap();
    a.set(&(2, 1), "new".into()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while b.get(&(2, 1)).await.unwrap().as_deref() != Some("new") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b still serves the old value"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_near_cache_needs_a_shared_store() {
    let e = Cache::<u64, String>::builder("x")
        .near_cache(NearCache::new(10, Duration::from_secs(1)))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("shared store"), "{e}");
}

/// A burst of writes costs far fewer bus messages than writes (notices are
/// batched), and every notice still arrives: afterwards no reader's L1 serves
/// an old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_batched_into_few_messages() {
    const KEYS: u64 = 2_000;
    const IN_FLIGHT: u64 = 64;
    let server = RedisServer::start();
    let (writer, reader) = (instance(&server).await, instance(&server).await);
    connected(&[writer.clone(), reader.clone()]).await;
    let db: Db = Arc::default();
    for key in 0..KEYS {
        db.lock().unwrap().insert(key, "old".into());
        reader.get_or_load(&key, loader(&db, key)).await.unwrap();
    }
    assert_eq!(
        reader.get(&(KEYS - 1)).await.unwrap().as_deref(),
        Some("old")
    );
    for key in 0..KEYS {
        db.lock().unwrap().insert(key, "new".into());
    }
    server.command(&["CONFIG", "RESETSTAT"]);
    for chunk in 0..KEYS / IN_FLIGHT + 1 {
        let mut writes = tokio::task::JoinSet::new();
        for key in (chunk * IN_FLIGHT..(chunk + 1) * IN_FLIGHT).filter(|k| *k < KEYS) {
            let writer = writer.clone();
            writes.spawn(async move { writer.invalidate(&key).await });
        }
        while let Some(done) = writes.join_next().await {
            done.unwrap().unwrap();
        }
    }
    for key in 0..KEYS {
        converge(
            std::slice::from_ref(&reader),
            &db,
            key,
            "new",
            Duration::from_secs(10),
        )
        .await;
    }
    let stats = server.command(&["INFO", "commandstats"]);
    let publishes: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap());
    assert!(publishes > 0, "no notice was sent: {stats}");
    assert!(
        publishes * 4 <= KEYS,
        "{publishes} PUBLISH for {KEYS} writes: notices are not batched"
    );
    eprintln!(
        "{KEYS} writes, {publishes} PUBLISH ({:.3} messages per write)",
        publishes as f64 / KEYS as f64
    );
}

/// A process that invalidates 200 keys at once and exits right after
/// `close` has delivered every bus notice: another process's near cache
/// drops all 200. (Without `close`, exiting loses the notices still queued.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delivers_every_notice_before_the_process_exits() {
    const KEYS: u64 = 200;
    let server = RedisServer::start();
    let reader = instance(&server).await;
    connected(std::slice::from_ref(&reader)).await;
    let db: Db = Arc::new(std::sync::Mutex::new(
        (0..KEYS).map(|k| (k, "old".to_owned())).collect(),
    ));
    for k in 0..KEYS {
        reader.get_or_load(&k, loader(&db, k)).await.unwrap();
    }
    for v in db.lock().unwrap().values_mut() {
        *v = "new".to_owned();
    }

    // The writer: a runtime of its own, gone the moment `close` returns.
    let url = server.url();
    let closed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let closed = rt.block_on(async {
            let store = RedisStore::connect(&url).await.unwrap();
            let writer: Cache<u64, String> = Cache::builder("near").store(store).build().unwrap();
            let mut all = tokio::task::JoinSet::new();
            for k in 0..KEYS {
                let writer = writer.clone();
                all.spawn(async move { writer.invalidate(&k).await });
            }
            while let Some(done) = all.join_next().await {
                done.unwrap().unwrap();
            }
            writer.close(Duration::from_secs(5)).await
        });
        rt.shutdown_background();
        closed
    })
    .join()
    .unwrap();
    closed.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for k in 0..KEYS {
        loop {
            let got = reader.get_or_load(&k, loader(&db, k)).await.unwrap();
            if got.as_deref() == Some("new") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "key {k}: the near cache still serves {got:?}: its notice was lost"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// `close` says what it could not deliver: invalidations kept while the
/// store is gone, named, within the time it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_names_what_it_could_not_deliver() {
    let mut server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .response_timeout(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let cache: Cache<u64, String> = Cache::builder("close").store(store).build().unwrap();
    cache.close(Duration::from_secs(1)).await.unwrap();
    server.kill();
    cache.invalidate(&7).await.unwrap_err();
    let started = tokio::time::Instant::now();
    let e = cache.close(Duration::from_millis(300)).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "close overran its limit"
    );
    assert_eq!(e.kind(), cachet::ErrorKind::Shutdown);
    let text = e.to_string();
    assert!(
        text.starts_with("cache `close`: closing failed: 1 kept invalidations"),
        "{text}"
    );
    assert!(text.contains("cachet:close:v:{7}"), "{text}");
}
