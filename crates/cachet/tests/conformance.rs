//! The store conformance suite on the in-process store, with a mock clock.

use std::sync::Arc;
use std::time::Duration;

use cachet::{Clock, KeyLayout, MemoryStore, MockClock, Store, StoreKey};
use cachet_testkit::conformance::{BoxFuture, Harness, KeyTtl};

struct MemoryHarness {
    store: MemoryStore,
    clock: MockClock,
}

impl MemoryHarness {
    fn new() -> Self {
        let clock = Clock::mock();
        Self {
            store: MemoryStore::with_clock(10_000, clock.clock()),
            clock,
        }
    }
}

impl Harness for MemoryHarness {
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    fn layout(&self) -> KeyLayout {
        KeyLayout::new("cachet:", "conformance").unwrap()
    }

    fn advance(&self, by: Duration) -> BoxFuture<'_, ()> {
        self.clock.advance(by);
        Box::pin(async {})
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey, lease: bool) -> BoxFuture<'a, KeyTtl> {
        Box::pin(async move {
            let ttls = self.store.ttl(key).await.unwrap();
            let ttl = if lease { ttls.lease } else { ttls.entry };
            ttl.map_or(KeyTtl::Absent, KeyTtl::Expires)
        })
    }

    fn write_raw<'a>(&'a self, _: &'a StoreKey, _: &'a [u8]) -> Option<BoxFuture<'a, ()>> {
        None
    }
}

cachet_testkit::conformance_tests!(MemoryHarness::new());
