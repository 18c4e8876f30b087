//! The in-process store: the lease protocol over a bounded concurrent map.
//!
//! Entries live in a [`quick_cache`] map (bounded by entry count, evicting with
//! its CLOCK-Pro policy) holding decoded values, so a hit clones an `Arc` and
//! never deserializes. TTLs are checked against the store's [`Clock`] on every
//! read; expired entries are ignored and replaced by the next fill or evicted.
//!
//! Leases live in a striped table next to the map. Every operation that must be
//! atomic with respect to a lease (`acquire`, `fill`, `release`, `set`,
//! `invalidate`) holds the key's stripe lock while it touches both; plain reads
//! take no stripe lock.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use cachet_core::{
    Acquire, AcquireMode, Clock, Entry, Fill, LeaseToken, PayloadKind, Read, Store, StoreFuture,
    StoreKey, TokenSource, ttl_millis,
};
use parking_lot::Mutex;

/// Number of lease stripes; a power of two.
const STRIPES: usize = 64;
/// A stripe sweeps its expired leases when it grows past this many.
const SWEEP_AT: usize = 1024;

/// An in-process [`Store`]: the embedded default, no server needed.
///
/// Cloning is cheap and clones share the same entries, so several caches (with
/// different namespaces) can share one store.
///
/// ```
/// use cachet::MemoryStore;
///
/// let store = MemoryStore::new(10_000);
/// assert_eq!(store.capacity(), 10_000);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    entries: quick_cache::sync::Cache<Box<str>, Slot>,
    leases: Box<[Stripe]>,
    hasher: std::collections::hash_map::RandomState,
    tokens: TokenSource,
    clock: Clock,
    capacity: usize,
}

#[derive(Clone)]
struct Slot {
    entry: Entry,
    expires_at_ms: u64,
}

type Stripe = Mutex<HashMap<Box<str>, LeaseSlot>>;

struct LeaseSlot {
    token: LeaseToken,
    expires_at_ms: u64,
}

impl MemoryStore {
    /// The capacity used by [`MemoryStore::default`].
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// A store holding at most `capacity` entries, on the system clock.
    pub fn new(capacity: usize) -> Self {
        Self::with_clock(capacity, Clock::system())
    }

    /// A store holding at most `capacity` entries whose TTLs follow `clock`
    /// (use [`Clock::mock`] in tests to expire entries without sleeping).
    pub fn with_clock(capacity: usize, clock: Clock) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Arc::new(Inner {
                entries: quick_cache::sync::Cache::new(capacity),
                leases: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
                hasher: std::collections::hash_map::RandomState::new(),
                tokens: TokenSource::new(),
                clock,
                capacity,
            }),
        }
    }

    /// The maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// The number of entries held, including expired ones not yet replaced.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    /// The clock this store's TTLs follow.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The remaining TTL of an entry, if it is present and live.
    pub fn ttl(&self, key: &StoreKey) -> Option<Duration> {
        let now = self.inner.clock.now_ms();
        let slot = self.inner.entries.peek(key.as_str())?;
        (slot.expires_at_ms > now).then(|| Duration::from_millis(slot.expires_at_ms - now))
    }

    /// The remaining TTL of a key's lease, if one is held.
    pub fn lease_ttl(&self, key: &StoreKey) -> Option<Duration> {
        let now = self.inner.clock.now_ms();
        let stripe = self.inner.stripe(key).lock();
        let lease = stripe.get(key.as_str())?;
        (lease.expires_at_ms > now).then(|| Duration::from_millis(lease.expires_at_ms - now))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.inner.capacity)
            .field("len", &self.inner.entries.len())
            .field("clock", &self.inner.clock)
            .finish()
    }
}

impl Inner {
    fn stripe(&self, key: &StoreKey) -> &Stripe {
        // Truncation is intended: only the low bits pick the stripe.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.hasher.hash_one(key.as_str()) as usize & (STRIPES - 1);
        &self.leases[i]
    }

    fn read(&self, key: &StoreKey) -> Read {
        match self.entries.get(key.as_str()) {
            Some(slot) if slot.expires_at_ms > self.clock.now_ms() => Read::Hit(slot.entry),
            _ => Read::Miss,
        }
    }

    fn live_entry(&self, key: &StoreKey, now: u64) -> Option<Entry> {
        self.entries
            .get(key.as_str())
            .filter(|slot| slot.expires_at_ms > now)
            .map(|slot| slot.entry)
    }

    fn acquire(&self, key: &StoreKey, mode: AcquireMode, lease_ttl: Duration) -> Acquire {
        let now = self.clock.now_ms();
        let mut stripe = self.stripe(key).lock();
        if mode == AcquireMode::IfAbsent
            && let Some(entry) = self.live_entry(key, now)
        {
            return Acquire::Hit(entry);
        }
        if let Some(lease) = stripe.get(key.as_str())
            && lease.expires_at_ms > now
        {
            return Acquire::Busy {
                expires_in: Some(Duration::from_millis(lease.expires_at_ms - now)),
            };
        }
        if stripe.len() >= SWEEP_AT {
            stripe.retain(|_, l| l.expires_at_ms > now);
        }
        let token = self.tokens.next_token();
        stripe.insert(
            key.as_str().into(),
            LeaseSlot {
                token,
                expires_at_ms: now.saturating_add(ttl_millis(lease_ttl)),
            },
        );
        Acquire::Leased(token)
    }

    fn fill(&self, key: &StoreKey, token: &LeaseToken, entry: Entry, ttl: Duration) -> Fill {
        let now = self.clock.now_ms();
        let mut stripe = self.stripe(key).lock();
        match stripe.get(key.as_str()) {
            Some(lease) if lease.token == *token && lease.expires_at_ms > now => {
                stripe.remove(key.as_str());
                self.insert(key, entry, ttl, now);
                Fill::Filled
            }
            Some(lease) if lease.expires_at_ms <= now => {
                stripe.remove(key.as_str());
                Fill::Refused
            }
            _ => Fill::Refused,
        }
    }

    fn release(&self, key: &StoreKey, token: &LeaseToken) -> bool {
        let mut stripe = self.stripe(key).lock();
        match stripe.get(key.as_str()) {
            Some(lease) if lease.token == *token => {
                stripe.remove(key.as_str());
                true
            }
            _ => false,
        }
    }

    fn set(&self, key: &StoreKey, entry: Entry, ttl: Duration) {
        let now = self.clock.now_ms();
        let mut stripe = self.stripe(key).lock();
        stripe.remove(key.as_str());
        self.insert(key, entry, ttl, now);
    }

    fn invalidate(&self, key: &StoreKey) {
        let mut stripe = self.stripe(key).lock();
        stripe.remove(key.as_str());
        self.entries.remove(key.as_str());
    }

    fn insert(&self, key: &StoreKey, entry: Entry, ttl: Duration, now: u64) {
        self.entries.insert(
            key.as_str().into(),
            Slot {
                entry,
                expires_at_ms: now.saturating_add(ttl_millis(ttl)),
            },
        );
    }
}

impl Store for MemoryStore {
    fn payload_kind(&self) -> PayloadKind {
        PayloadKind::Object
    }

    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        let read = self.inner.read(key);
        Box::pin(async move { Ok(read) })
    }

    #[inline]
    fn get_now(&self, key: &StoreKey) -> Option<Read> {
        Some(self.inner.read(key))
    }

    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        let r = self.inner.acquire(key, mode, lease_ttl);
        Box::pin(async move { Ok(r) })
    }

    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        let r = self.inner.fill(key, lease, entry, ttl);
        Box::pin(async move { Ok(r) })
    }

    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        let r = self.inner.release(key, lease);
        Box::pin(async move { Ok(r) })
    }

    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        self.inner.set(key, entry, ttl);
        Box::pin(async move { Ok(()) })
    }

    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        self.inner.invalidate(key);
        Box::pin(async move { Ok(()) })
    }
}
