//! A cache with a near cache over `rediss://` (mutual TLS): coherent across
//! instances through the invalidation bus, which runs over TLS too.

use std::time::Duration;

use cachet::{Cache, NearCache, RedisStore};
use cachet_testkit::{ClientAuth, RedisServer, TestPki};

async fn store(server: &RedisServer, pki: &TestPki, bus: bool) -> RedisStore {
    RedisStore::builder(server.tls_url())
        .tls_ca_pem(pki.ca_pem.as_bytes())
        .tls_client_cert_pem(
            pki.client.cert_pem.as_bytes(),
            pki.client.key_pem.as_bytes(),
        )
        .invalidation_bus(bus)
        .connect()
        .await
        .unwrap()
}

async fn near_instance(server: &RedisServer, pki: &TestPki) -> Cache<u64, String> {
    Cache::builder("near-tls")
        .store(store(server, pki, true).await)
        .near_cache(NearCache::new(1_000, Duration::from_secs(30)))
        .build()
        .unwrap()
}

async fn read(cache: &Cache<u64, String>) -> Option<String> {
    cache
        .get_or_load(&1, || async { Ok::<_, std::io::Error>(None) })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_sees_another_instances_invalidation_over_tls() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Required);
    let (a, b) = (
        near_instance(&server, &pki).await,
        near_instance(&server, &pki).await,
    );
    // Writes that send no notice, so that none is in flight below.
    let quiet: Cache<u64, String> = Cache::builder("near-tls")
        .store(store(&server, &pki, false).await)
        .build()
        .unwrap();
    // Both subscriptions are up once each near cache has cleared on connect.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.stats().near_clears == 0 || b.stats().near_clears == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    quiet.set(&1, "old".to_owned()).await.unwrap();
    assert_eq!(read(&b).await.as_deref(), Some("old"));
    assert_eq!(read(&b).await.as_deref(), Some("old"));
    assert_eq!(b.stats().near_hits, 1, "{:?}", b.stats());

    // Only the bus can take "old" out of `b`'s near cache (its TTL is 30 s).
    a.set(&1, "new".to_owned()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = read(&b).await;
        if got.as_deref() == Some("new") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the near cache still serves {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
