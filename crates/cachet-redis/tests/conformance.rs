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
