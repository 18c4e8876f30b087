//! The store conformance suite on a real `redis-server`, one per test.

use std::sync::Arc;
use std::time::Duration;

use cachet_core::{KeyLayout, Store, StoreKey};
use cachet_redis::RedisStore;
use cachet_testkit::RedisServer;
use cachet_testkit::conformance::{BoxFuture, Harness, KeyTtl};

struct RedisHarness {
    store: RedisStore,
    server: RedisServer,
}

impl RedisHarness {
    async fn new() -> Self {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        Self { store, server }
    }
}

impl Harness for RedisHarness {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    fn layout(&self) -> KeyLayout {
        KeyLayout::new("cachet:", "conformance").unwrap()
    }

    fn advance(&self, by: Duration) -> BoxFuture<'_, ()> {
        // Redis expires keys on its own clock; the only way to let time pass is to wait.
        Box::pin(tokio::time::sleep(by))
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey, lease: bool) -> BoxFuture<'a, KeyTtl> {
        let name = if lease {
            key.lease_key()
        } else {
            key.as_str().to_owned()
        };
        let reply = self.server.command(&["PTTL", &name]);
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
        let text = std::str::from_utf8(bytes).expect("raw test bytes are UTF-8");
        assert_eq!(self.server.command(&["SET", key.as_str(), text]), "OK");
        Some(Box::pin(async {}))
    }
}

cachet_testkit::conformance_tests!(RedisHarness::new().await);

/// A stalled server delivers no notice: a subscription whose ping goes
/// unanswered for a heartbeat reports the loss while the server is still
/// paused, so that near caches stop serving what they hold.
#[tokio::test]
async fn a_paused_server_is_a_lost_subscription_within_two_heartbeats() {
    use cachet_core::BusEvent;

    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .eviction_check(false)
        .bus_heartbeat(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let layout = KeyLayout::new("cachet:", "heartbeat").unwrap();
    let bus = store.bus().expect("RedisStore has a bus");
    let mut events = bus
        .subscribe_invalidations(layout.key("k").head())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    assert!(matches!(first, Ok(Some(BusEvent::Connected))), "{first:?}");

    const PAUSE: Duration = Duration::from_millis(1500);
    let paused_at = tokio::time::Instant::now();
    server.command(&["CLIENT", "PAUSE", &PAUSE.as_millis().to_string(), "ALL"]);
    let next = tokio::time::timeout(PAUSE * 4, events.recv()).await;
    assert!(matches!(next, Ok(Some(BusEvent::Lost))), "{next:?}");
    // Two heartbeats are 100 ms; the pause is fifteen times that.
    let took = paused_at.elapsed();
    assert!(
        took < PAUSE,
        "the loss was reported after the pause ended: {took:?}"
    );
}
