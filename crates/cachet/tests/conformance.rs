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

    fn ttl(&self, key: &StoreKey, lease: bool) -> BoxFuture<'_, KeyTtl> {
        let ttl = if lease {
            self.store.lease_ttl(key)
        } else {
            self.store.ttl(key)
        };
        Box::pin(async move { ttl.map_or(KeyTtl::Absent, KeyTtl::Expires) })
    }

    fn write_raw<'a>(&'a self, _: &'a StoreKey, _: &'a [u8]) -> Option<BoxFuture<'a, ()>> {
        None
    }
}

cachet_testkit::conformance_tests!(MemoryHarness::new());
