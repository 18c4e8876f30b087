//! Wrapping a store: a [`StoreLayer`] sees every call of the store it wraps,
//! in the spirit of tower's `Layer`, and [`Layered`] is the one place that
//! forwards the [`Store`] trait and its capabilities.
//!
//! A layer overrides only what it changes. The circuit breaker is one; tests
//! and benchmarks use others to count, delay or fail calls.
//!
//! ```
//! use cachet_core::{Layered, Op, StoreFuture, StoreLayer};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! /// Counts the invalidations that reach the store.
//! #[derive(Debug, Default)]
//! struct CountInvalidations(AtomicU64);
//!
//! impl StoreLayer for CountInvalidations {
//!     fn call<'a, T: Send + 'a>(&'a self, op: Op<'a>, call: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
//!         if let Op::Invalidate(_) = op {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!         }
//!         call
//!     }
//! }
//! # fn wrap(store: std::sync::Arc<dyn cachet_core::Store>) -> Layered<CountInvalidations> {
//! Layered::new(CountInvalidations::default(), store)
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::bloom::BloomKey;
use crate::key::{GroupKey, StoreKey, TagKey};
use crate::store::{
    Acquire, AcquireMode, BloomBits, BusEvent, Capability, Deferred, DeferredQueue, Entry, Fill,
    FillOf, Groups, InvalidationBus, LeaseToken, PayloadKind, Read, Store, StoreFuture, Tags, Ttls,
    Versioned, VersionedSet,
};

/// One call of a store: which primitive, on what.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Op<'a> {
    /// [`Store::get`].
    Get(&'a StoreKey),
    /// [`Store::get_many`].
    GetMany(&'a [StoreKey]),
    /// [`Store::acquire`].
    Acquire(&'a StoreKey, AcquireMode),
    /// [`Store::acquire_many`].
    AcquireMany(&'a [StoreKey], AcquireMode),
    /// [`Store::fill`].
    Fill(&'a StoreKey),
    /// [`Store::fill_many`].
    FillMany(&'a [FillOf<'a>]),
    /// [`Store::release`].
    Release(&'a StoreKey),
    /// [`Store::set`].
    Set(&'a StoreKey),
    /// [`Store::invalidate`].
    Invalidate(&'a StoreKey),
    /// [`Store::ttl`].
    Ttl(&'a StoreKey),
    /// [`VersionedSet::set_versioned`].
    SetVersioned(&'a StoreKey),
    /// [`Groups::invalidate_group`].
    InvalidateGroup(&'a GroupKey),
    /// [`Tags::tag_clock`], with the cache's key head.
    TagClock(&'a str),
    /// [`Tags::tag_generations`] and [`Tags::claim_tags`].
    ReadTags(&'a [TagKey]),
    /// [`Tags::invalidate_tag`].
    InvalidateTag(&'a TagKey),
    /// [`InvalidationBus::subscribe_invalidations`], with the cache's key head.
    Subscribe(&'a str),
    /// [`DeferredQueue::defer_invalidate`].
    DeferInvalidate(&'a StoreKey),
    /// [`DeferredQueue::run_deferred`].
    RunDeferred,
    /// [`BloomBits::bloom_check`].
    BloomCheck(&'a BloomKey),
    /// [`BloomBits::bloom_add`].
    BloomAdd(&'a BloomKey),
    /// [`BloomBits::bloom_replace`].
    BloomReplace(&'a BloomKey),
}

impl<'a> Op<'a> {
    /// The entry key the call is about, if it is about one.
    pub fn key(&self) -> Option<&'a StoreKey> {
        match *self {
            Op::Get(k)
            | Op::Acquire(k, _)
            | Op::Fill(k)
            | Op::Release(k)
            | Op::Set(k)
            | Op::Invalidate(k)
            | Op::Ttl(k)
            | Op::SetVersioned(k)
            | Op::DeferInvalidate(k) => Some(k),
            _ => None,
        }
    }
}

/// What a wrapper does around each call of the store it wraps.
pub trait StoreLayer: Send + Sync + fmt::Debug + 'static {
    /// Runs `call`, the wrapped store's future for `op`. The future does
    /// nothing until it is polled, so a layer may also drop it and answer on
    /// its own. The default runs it as it is.
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: Op<'a>,
        call: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        let _ = op;
        call
    }
}

/// A store wrapped in a [`StoreLayer`]: every call of the wrapped store,
/// capabilities included, goes through the layer. It offers exactly the
/// capabilities of the store it wraps.
///
/// [`Store::get_now`], the synchronous read of in-process stores, bypasses
/// the layer: it cannot fail or wait.
pub struct Layered<L, S = Arc<dyn Store>> {
    layer: L,
    inner: S,
}

impl<L, S> Layered<L, S> {
    /// `inner`, wrapped in `layer`.
    pub fn new(layer: L, inner: S) -> Self {
        Self { layer, inner }
    }

    /// The layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<L: fmt::Debug, S: fmt::Debug> fmt::Debug for Layered<L, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered")
            .field("layer", &self.layer)
            .field("inner", &self.inner)
            .finish()
    }
}

impl<L: StoreLayer, S: Store> Store for Layered<L, S> {
    fn payload_kind(&self) -> PayloadKind {
        self.inner.payload_kind()
    }
    fn max_payload_bytes(&self) -> Option<usize> {
        self.inner.max_payload_bytes()
    }
    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        self.layer.call(Op::Get(key), self.inner.get(key))
    }
    fn get_many<'a>(&'a self, keys: &'a [StoreKey]) -> StoreFuture<'a, Vec<Read>> {
        self.layer
            .call(Op::GetMany(keys), self.inner.get_many(keys))
    }
    /// `None`: a read through a layer is a call the layer sees.
    fn get_now(&self, _key: &StoreKey) -> Option<Read> {
        None
    }
    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        let call = self.inner.acquire(key, mode, lease_ttl);
        self.layer.call(Op::Acquire(key, mode), call)
    }
    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        let call = self.inner.fill(key, lease, entry, ttl);
        self.layer.call(Op::Fill(key), call)
    }
    fn acquire_many<'a>(
        &'a self,
        keys: &'a [StoreKey],
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Vec<Acquire>> {
        self.layer.call(
            Op::AcquireMany(keys, mode),
            self.inner.acquire_many(keys, mode, lease_ttl),
        )
    }
    fn fill_many<'a>(&'a self, fills: &'a [FillOf<'a>]) -> StoreFuture<'a, Vec<Fill>> {
        self.layer
            .call(Op::FillMany(fills), self.inner.fill_many(fills))
    }
    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        self.layer
            .call(Op::Release(key), self.inner.release(key, lease))
    }
    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        self.layer
            .call(Op::Set(key), self.inner.set(key, entry, ttl))
    }
    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        self.layer
            .call(Op::Invalidate(key), self.inner.invalidate(key))
    }
    fn flush(&self) -> StoreFuture<'_, u64> {
        self.inner.flush()
    }
    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls> {
        self.layer.call(Op::Ttl(key), self.inner.ttl(key))
    }
    fn groups(&self) -> Option<&dyn Groups> {
        self.inner.groups().map(|_| self as &dyn Groups)
    }
    fn tags(&self) -> Option<&dyn Tags> {
        self.inner.tags().map(|_| self as &dyn Tags)
    }
    fn versioned_set(&self) -> Option<&dyn VersionedSet> {
        self.inner
            .versioned_set()
            .map(|_| self as &dyn VersionedSet)
    }
    fn bus(&self) -> Option<&dyn InvalidationBus> {
        self.inner.bus().map(|_| self as &dyn InvalidationBus)
    }
    fn deferred_queue(&self) -> Option<&dyn DeferredQueue> {
        self.inner
            .deferred_queue()
            .map(|_| self as &dyn DeferredQueue)
    }
    fn bloom_bits(&self) -> Option<&dyn BloomBits> {
        self.inner.bloom_bits().map(|_| self as &dyn BloomBits)
    }
}

/// `call` on the wrapped store's capability, or a future failing because the
/// store lacks it.
fn through<'a, C: ?Sized + 'a, T: Send + 'a>(
    capability: Option<&'a C>,
    missing: Capability,
    call: impl FnOnce(&'a C) -> StoreFuture<'a, T>,
) -> StoreFuture<'a, T> {
    match capability {
        Some(c) => call(c),
        None => Box::pin(std::future::ready(Err(missing.missing()))),
    }
}

impl<L: StoreLayer, S: Store> Groups for Layered<L, S> {
    fn invalidate_group<'a>(&'a self, group: &'a GroupKey) -> StoreFuture<'a, ()> {
        let call = through(self.inner.groups(), Capability::Groups, |g| {
            g.invalidate_group(group)
        });
        self.layer.call(Op::InvalidateGroup(group), call)
    }
}

impl<L: StoreLayer, S: Store> Tags for Layered<L, S> {
    fn tag_clock<'a>(&'a self, head: &'a str) -> StoreFuture<'a, u64> {
        let call = through(self.inner.tags(), Capability::Tags, |t| t.tag_clock(head));
        self.layer.call(Op::TagClock(head), call)
    }
    fn tag_generations<'a>(&'a self, tags: &'a [TagKey]) -> StoreFuture<'a, Vec<Option<u64>>> {
        let call = through(self.inner.tags(), Capability::Tags, |t| {
            t.tag_generations(tags)
        });
        self.layer.call(Op::ReadTags(tags), call)
    }
    fn claim_tags<'a>(
        &'a self,
        tags: &'a [TagKey],
        since: u64,
    ) -> StoreFuture<'a, Option<Vec<u64>>> {
        let call = through(self.inner.tags(), Capability::Tags, |t| {
            t.claim_tags(tags, since)
        });
        self.layer.call(Op::ReadTags(tags), call)
    }
    fn invalidate_tag<'a>(&'a self, tag: &'a TagKey) -> StoreFuture<'a, ()> {
        let call = through(self.inner.tags(), Capability::Tags, |t| {
            t.invalidate_tag(tag)
        });
        self.layer.call(Op::InvalidateTag(tag), call)
    }
}

impl<L: StoreLayer, S: Store> VersionedSet for Layered<L, S> {
    fn set_versioned<'a>(
        &'a self,
        key: &'a StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Versioned> {
        let call = through(self.inner.versioned_set(), Capability::VersionedSet, |v| {
            v.set_versioned(key, entry, ttl)
        });
        self.layer.call(Op::SetVersioned(key), call)
    }
}

impl<L: StoreLayer, S: Store> InvalidationBus for Layered<L, S> {
    fn subscribe_invalidations<'a>(
        &'a self,
        head: &'a str,
    ) -> StoreFuture<'a, tokio::sync::mpsc::Receiver<BusEvent>> {
        let call = through(self.inner.bus(), Capability::InvalidationBus, |b| {
            b.subscribe_invalidations(head)
        });
        self.layer.call(Op::Subscribe(head), call)
    }
}

impl<L: StoreLayer, S: Store> DeferredQueue for Layered<L, S> {
    fn defer_invalidate<'a>(&'a self, key: &'a StoreKey, delay: Duration) -> StoreFuture<'a, ()> {
        let call = through(
            self.inner.deferred_queue(),
            Capability::DeferredQueue,
            |q| q.defer_invalidate(key, delay),
        );
        self.layer.call(Op::DeferInvalidate(key), call)
    }
    fn run_deferred(&self, max: usize) -> StoreFuture<'_, Deferred> {
        let call = through(
            self.inner.deferred_queue(),
            Capability::DeferredQueue,
            |q| q.run_deferred(max),
        );
        self.layer.call(Op::RunDeferred, call)
    }
}

impl<L: StoreLayer, S: Store> BloomBits for Layered<L, S> {
    fn bloom_check<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, bool> {
        let call = through(self.inner.bloom_bits(), Capability::BloomBits, |b| {
            b.bloom_check(filter, positions)
        });
        self.layer.call(Op::BloomCheck(filter), call)
    }
    fn bloom_add<'a>(&'a self, filter: &'a BloomKey, positions: &'a [u64]) -> StoreFuture<'a, ()> {
        let call = through(self.inner.bloom_bits(), Capability::BloomBits, |b| {
            b.bloom_add(filter, positions)
        });
        self.layer.call(Op::BloomAdd(filter), call)
    }
    fn bloom_replace<'a>(&'a self, filter: &'a BloomKey, bits: Bytes) -> StoreFuture<'a, ()> {
        let call = through(self.inner.bloom_bits(), Capability::BloomBits, |b| {
            b.bloom_replace(filter, bits)
        });
        self.layer.call(Op::BloomReplace(filter), call)
    }
}
