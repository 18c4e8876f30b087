//! The in-process store: the lease protocol over bounded concurrent maps.
//!
//! [`MemTable`] is the protocol, written once and generic over the key and item
//! types. Entries live in a [`quick_cache`] map (bounded by entry count, evicting
//! with its CLOCK-Pro policy); leases live in a striped table beside it. Every
//! operation that must be atomic with respect to a lease (`acquire`, `fill`,
//! `release`, `set`, `invalidate`) holds the key's stripe lock while it touches
//! both; plain reads take no stripe lock. TTLs are checked against the coarse
//! clock on every read; an expired entry is ignored and later replaced or evicted.
//!
//! [`MemoryStore`] holds two kinds of tables:
//!
//! - one *typed* table per cache namespace, `MemTable<K::Owned, Slot<V>>`, used by
//!   a [`Cache`](crate::Cache) built with
//!   [`memory`](crate::CacheBuilder::memory) (or with no store): a hit is a
//!   typed map lookup and a clone of `V`, with no key formatting and no
//!   deserialization;
//! - one table keyed by [`StoreKey`] holding [`Entry`] values, for keys no
//!   typed cache owns (the conformance suite, code of its own speaking the
//!   protocol).
//!
//! Every [`Store`] call is routed: a key whose `{prefix}{namespace}` has a typed
//! table, and that decodes with [`CacheKey::decode_key`], is served by that
//! table (payloads cross as [`Payload::Object`]), so a cache built with
//! [`store`](crate::CacheBuilder::store), an outbox relay and a deferred
//! invalidation see and remove exactly the entries a typed cache holds.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cachet_core::BloomKey;
use cachet_core::{
    Acquire, AcquireMode, BloomBits, CacheKey, Clock, Deferred, DeferredQueue, Entry, Fill,
    GroupKey, Groups, LeaseToken, Meta, Payload, PayloadKind, Read, Store, StoreFuture, StoreKey,
    TagKey, Tags, TokenSource, Ttls, Versioned, VersionedSet, ttl_millis,
};
use parking_lot::{Mutex, RwLock};

mod bloom;
mod tags;

/// Number of lease stripes per table; a power of two.
const STRIPES: usize = 64;
/// A stripe sweeps its expired leases when it grows past this many.
const SWEEP_AT: usize = 1024;

/// One protocol table. See the [module docs](self).
///
/// Groups: each item records the generation of its group when it was written;
/// a read that finds another generation current treats the item as absent. A
/// group's generation is drawn from a counter that never repeats, so a
/// generation evicted from the bounded map comes back as a new value and never
/// revives old items.
pub(crate) struct MemTable<Q, S> {
    entries: quick_cache::sync::Cache<Q, S>,
    leases: Box<[Stripe<Q>]>,
    generations: quick_cache::sync::Cache<String, u64>,
    /// Held while a generation is drawn and stored; see [`Self::generation`].
    drawing: Mutex<()>,
    next_generation: AtomicU64,
    hasher: RandomState,
    tokens: Arc<TokenSource>,
    clock: Clock,
}

/// An item that records its group generation and its source version.
pub(crate) trait Generational {
    fn generation(&self) -> u64;
    fn set_generation(&mut self, generation: u64);
    fn version(&self) -> u64;
}

impl Generational for Entry {
    fn generation(&self) -> u64 {
        self.meta.generation
    }
    fn set_generation(&mut self, generation: u64) {
        self.meta.generation = generation;
    }
    fn version(&self) -> u64 {
        self.meta.version
    }
}

/// What a [`MemTable`]'s map holds: an item with its expiry. The map clones
/// it on every hit, so it stays small (see [`Slot`]).
pub(crate) trait Stored: Clone + Send + Sync + 'static {
    type Item: Generational;
    /// The item stored with its expiry.
    fn stamp(item: Self::Item, expires_at_ms: u64) -> Self;
    fn expires_at_ms(&self) -> u64;
    fn into_item(self) -> Self::Item;
}

/// An item stored beside its expiry.
#[derive(Clone)]
struct Timed<P> {
    expires_at_ms: u64,
    item: P,
}

impl<P: Generational + Clone + Send + Sync + 'static> Stored for Timed<P> {
    type Item = P;
    fn stamp(item: P, expires_at_ms: u64) -> Self {
        Self {
            expires_at_ms,
            item,
        }
    }
    fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }
    fn into_item(self) -> P {
        self.item
    }
}

type Stripe<Q> = Mutex<HashMap<Q, LeaseSlot>>;

struct LeaseSlot {
    token: LeaseToken,
    expires_at_ms: u64,
}

/// The result of [`MemTable::acquire`].
pub(crate) enum Acquired<P> {
    Hit(P),
    Leased(LeaseToken),
    Busy(Duration),
}

impl<Q, S> MemTable<Q, S>
where
    Q: Hash + Eq + Send + Sync + 'static,
    S: Stored,
{
    fn new(capacity: usize, clock: Clock, tokens: Arc<TokenSource>) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
            leases: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            generations: quick_cache::sync::Cache::new(capacity.max(1)),
            drawing: Mutex::new(()),
            next_generation: AtomicU64::new(1),
            hasher: RandomState::new(),
            tokens,
            clock,
        }
    }

    /// The current generation of `group`, or a new one if it has none.
    ///
    /// Concurrent first readers of a group must agree on one generation: were
    /// each to draw and insert its own, all but the last would tag their
    /// leases with a generation already replaced, and their fills would be
    /// refused. Drawing happens under a lock (once per group, or again after
    /// an eviction), and the value is in the map before the lock is released.
    /// (quick_cache's `get_or_insert_with` is not enough: it hands the value
    /// to waiters before the map holds it, so a fill checking the map at once
    /// can miss it.)
    fn generation(&self, group: &str) -> u64 {
        if let Some(g) = self.generations.get(group) {
            return g;
        }
        let _drawing = self.drawing.lock();
        if let Some(g) = self.generations.get(group) {
            return g;
        }
        let g = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations.insert(group.to_owned(), g);
        g
    }

    /// Whether `item` belongs to its group's current generation.
    #[inline]
    fn current(&self, item: &S::Item, group: Option<&str>) -> bool {
        match group {
            None => true,
            Some(group) => self.generations.get(group) == Some(item.generation()),
        }
    }

    /// Gives `group` a generation it never had: its items become absent.
    pub(crate) fn invalidate_group(&self, group: &str) {
        let _drawing = self.drawing.lock();
        let g = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations.insert(group.to_owned(), g);
    }

    fn stripe<B: Hash + ?Sized>(&self, key: &B) -> &Stripe<Q> {
        // Truncation is intended: only the low bits pick the stripe.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.hasher.hash_one(key) as usize & (STRIPES - 1);
        &self.leases[i]
    }

    /// The live item under `key` (of the current generation of `group`).
    #[inline]
    pub(crate) fn get<B>(&self, key: &B, group: Option<&str>) -> Option<S::Item>
    where
        Q: Borrow<B>,
        B: Hash + Eq + ?Sized,
    {
        self.live(key, self.clock.coarse_ms())
            .filter(|item| self.current(item, group))
    }

    #[inline(always)]
    fn live<B>(&self, key: &B, now: u64) -> Option<S::Item>
    where
        Q: Borrow<B>,
        B: Hash + Eq + ?Sized,
    {
        match self.entries.get(key) {
            Some(stored) if stored.expires_at_ms() > now => Some(stored.into_item()),
            _ => None,
        }
    }

    pub(crate) fn acquire<B>(
        &self,
        key: &B,
        group: Option<&str>,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> Acquired<S::Item>
    where
        Q: Borrow<B>,
        B: Hash + Eq + ToOwned<Owned = Q> + ?Sized,
    {
        let now = self.clock.coarse_ms();
        let generation = group.map_or(0, |g| self.generation(g));
        let mut stripe = self.stripe(key).lock();
        if mode == AcquireMode::IfAbsent
            && let Some(item) = self.live(key, now)
            && (group.is_none() || item.generation() == generation)
        {
            return Acquired::Hit(item);
        }
        if let Some(lease) = stripe.get(key)
            && lease.expires_at_ms > now
        {
            return Acquired::Busy(Duration::from_millis(lease.expires_at_ms - now));
        }
        if stripe.len() >= SWEEP_AT {
            stripe.retain(|_, l| l.expires_at_ms > now);
        }
        let token = self.tokens.next_token().with_generation(generation);
        stripe.insert(
            key.to_owned(),
            LeaseSlot {
                token,
                expires_at_ms: now.saturating_add(ttl_millis(lease_ttl)),
            },
        );
        Acquired::Leased(token)
    }

    pub(crate) fn fill<B>(
        &self,
        key: &B,
        group: Option<&str>,
        token: &LeaseToken,
        mut item: S::Item,
        ttl: Duration,
    ) -> Fill
    where
        Q: Borrow<B>,
        B: Hash + Eq + ToOwned<Owned = Q> + ?Sized,
    {
        let now = self.clock.coarse_ms();
        let mut stripe = self.stripe(key).lock();
        let valid = match stripe.get(key) {
            Some(lease) => {
                lease.token == *token
                    && lease.expires_at_ms > now
                    && group.is_none_or(|g| self.generations.get(g) == Some(token.generation()))
            }
            None => return Fill::Refused,
        };
        if valid {
            stripe.remove(key);
            item.set_generation(token.generation());
            self.insert(key.to_owned(), item, ttl, now);
            Fill::Filled
        } else {
            if stripe.get(key).is_some_and(|l| l.expires_at_ms <= now) {
                stripe.remove(key);
            }
            Fill::Refused
        }
    }

    pub(crate) fn release<B>(&self, key: &B, token: &LeaseToken) -> bool
    where
        Q: Borrow<B>,
        B: Hash + Eq + ?Sized,
    {
        let mut stripe = self.stripe(key).lock();
        if stripe.get(key).is_some_and(|l| l.token == *token) {
            stripe.remove(key);
            true
        } else {
            false
        }
    }

    pub(crate) fn set<B>(&self, key: &B, group: Option<&str>, mut item: S::Item, ttl: Duration)
    where
        Q: Borrow<B>,
        B: Hash + Eq + ToOwned<Owned = Q> + ?Sized,
    {
        let now = self.clock.coarse_ms();
        item.set_generation(group.map_or(0, |g| self.generation(g)));
        let mut stripe = self.stripe(key).lock();
        stripe.remove(key);
        self.insert(key.to_owned(), item, ttl, now);
    }

    /// [`set`](Self::set), unless the live item is at least as new.
    pub(crate) fn set_versioned<B>(
        &self,
        key: &B,
        group: Option<&str>,
        mut item: S::Item,
        ttl: Duration,
    ) -> Versioned
    where
        Q: Borrow<B>,
        B: Hash + Eq + ToOwned<Owned = Q> + ?Sized,
    {
        let now = self.clock.coarse_ms();
        let generation = group.map_or(0, |g| self.generation(g));
        let mut stripe = self.stripe(key).lock();
        if let Some(current) = self.live(key, now)
            && (group.is_none() || current.generation() == generation)
            && current.version() >= item.version()
        {
            return Versioned::Stale {
                current: current.version(),
            };
        }
        item.set_generation(generation);
        stripe.remove(key);
        self.insert(key.to_owned(), item, ttl, now);
        Versioned::Written
    }

    pub(crate) fn invalidate<B>(&self, key: &B)
    where
        Q: Borrow<B>,
        B: Hash + Eq + ?Sized,
    {
        let mut stripe = self.stripe(key).lock();
        stripe.remove(key);
        self.entries.remove(key);
    }

    pub(crate) fn ttls<B>(&self, key: &B) -> Ttls
    where
        Q: Borrow<B>,
        B: Hash + Eq + ?Sized,
    {
        let now = self.clock.coarse_ms();
        let left = |at: u64| (at > now).then(|| Duration::from_millis(at - now));
        let entry = self
            .entries
            .peek(key)
            .and_then(|stored| left(stored.expires_at_ms()));
        let lease = self
            .stripe(key)
            .lock()
            .get(key)
            .and_then(|l| left(l.expires_at_ms));
        Ttls { entry, lease }
    }

    /// Drops every entry and lease.
    pub(crate) fn clear(&self) {
        for stripe in &self.leases {
            stripe.lock().clear();
        }
        self.entries.clear();
    }

    fn insert(&self, key: Q, item: S::Item, ttl: Duration, now: u64) {
        self.entries
            .insert(key, S::stamp(item, now.saturating_add(ttl_millis(ttl))));
    }
}

impl<Q, V> MemTable<Q, Slot<V>>
where
    Q: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The value of the live item under `key`, whatever its generation, when
    /// it has no soft expiry: the hit fast path of a cache without groups.
    ///
    /// It matches on the map's answer in place: the slot is taken apart where
    /// it lands, never copied whole.
    #[inline(always)]
    pub(crate) fn plain_hit<B>(&self, key: &B) -> Option<Option<V>>
    where
        Q: Borrow<B>,
        B: Hash + Eq + ?Sized,
    {
        let now = self.clock.coarse_ms();
        match self.entries.get(key) {
            Some(Slot::Plain {
                expires_at_ms,
                value,
            }) if expires_at_ms.get() > now => Some(value),
            Some(Slot::Rich(rich)) if rich.expires_at_ms > now && rich.meta.soft_expiry_ms == 0 => {
                Some(rich.value.clone())
            }
            _ => None,
        }
    }
}

/// An item of a cache's typed table, as the table stores it: the decoded
/// value (`None` for a negative entry), its expiry, and the envelope fields
/// (soft expiry, load time, group generation, version, tags) when any of them
/// is set.
///
/// The table clones its item on every hit, so the item is small: most entries
/// (no soft expiry, version, group or tags) are [`Plain`](Self::Plain), the
/// value beside its expiry, 16 bytes for a `V` of one pointer (the zero that
/// an expiry never is tells the two forms apart); the others keep everything
/// behind one `Arc`. A slot's expiry is set by the table when it stores it.
#[derive(Clone, Debug)]
pub(crate) enum Slot<V> {
    Plain {
        expires_at_ms: NonZeroU64,
        value: Option<V>,
    },
    Rich(Arc<Rich<V>>),
}

/// A [`Slot`] with envelope fields.
#[derive(Clone, Debug)]
pub(crate) struct Rich<V> {
    expires_at_ms: u64,
    value: Option<V>,
    meta: Meta,
}

impl<V: Clone> Slot<V> {
    /// A slot of `value` and its envelope; whether it is negative follows
    /// from `value`.
    pub(crate) fn new(value: Option<V>, meta: Meta) -> Self {
        let plain = meta.soft_expiry_ms == 0
            && meta.version == 0
            && meta.load_time_us == 0
            && meta.generation == 0
            && meta.tags.is_none();
        if plain {
            Self::Plain {
                expires_at_ms: NonZeroU64::MAX,
                value,
            }
        } else {
            Self::Rich(Arc::new(Rich {
                expires_at_ms: u64::MAX,
                value,
                meta,
            }))
        }
    }

    /// The value and its envelope.
    pub(crate) fn into_parts(self) -> (Option<V>, Meta) {
        let (value, meta) = match self {
            Self::Plain { value, .. } => (value, Meta::default()),
            Self::Rich(rich) => {
                let Rich { value, meta, .. } = Arc::unwrap_or_clone(rich);
                (value, meta)
            }
        };
        let negative = value.is_none();
        (value, Meta { negative, ..meta })
    }

    /// The value, whatever the envelope.
    pub(crate) fn into_value(self) -> Option<V> {
        match self {
            Self::Plain { value, .. } => value,
            Self::Rich(rich) => rich.value.clone(),
        }
    }

    fn meta(&self) -> Option<&Meta> {
        match self {
            Self::Plain { .. } => None,
            Self::Rich(rich) => Some(&rich.meta),
        }
    }
}

/// A slot is stored as it is, its expiry inside it.
impl<V: Clone + Send + Sync + 'static> Stored for Slot<V> {
    type Item = Self;

    fn stamp(mut slot: Self, at: u64) -> Self {
        match &mut slot {
            Self::Plain { expires_at_ms, .. } => {
                // An expiry of 0 is long past, as 1 is.
                *expires_at_ms = NonZeroU64::new(at).unwrap_or(NonZeroU64::MIN);
            }
            Self::Rich(rich) => Arc::make_mut(rich).expires_at_ms = at,
        }
        slot
    }
    #[inline(always)]
    fn expires_at_ms(&self) -> u64 {
        match self {
            Self::Plain { expires_at_ms, .. } => expires_at_ms.get(),
            Self::Rich(rich) => rich.expires_at_ms,
        }
    }
    #[inline(always)]
    fn into_item(self) -> Self {
        self
    }
}

impl<V: Clone> Generational for Slot<V> {
    fn generation(&self) -> u64 {
        self.meta().map_or(0, |m| m.generation)
    }
    fn set_generation(&mut self, generation: u64) {
        if generation == self.generation() {
            return;
        }
        match self {
            Self::Plain {
                expires_at_ms,
                value,
            } => {
                *self = Self::Rich(Arc::new(Rich {
                    expires_at_ms: expires_at_ms.get(),
                    value: value.take(),
                    meta: Meta {
                        generation,
                        ..Meta::default()
                    },
                }));
            }
            Self::Rich(rich) => Arc::make_mut(rich).meta.generation = generation,
        }
    }
    fn version(&self) -> u64 {
        self.meta().map_or(0, |m| m.version)
    }
}

/// A cache's typed table, called with the cache's borrowed key type (`&str`
/// for a table of `String`s); implemented by [`TypedTier`], which `Cache`
/// holds by its type, so that these calls are direct.
///
/// `group` is the escaped group of the key, for caches with groups.
pub(crate) trait LocalTier<K: ?Sized, V>: Send + Sync {
    fn get(&self, key: &K, group: Option<&str>) -> Option<Slot<V>>;
    /// The value of a key without a group whose entry needs nothing but its
    /// value (fresh, no soft expiry); `None` for anything else, which the full
    /// read path then looks at.
    fn hit(&self, key: &K) -> Option<Option<V>>;
    fn acquire(
        &self,
        key: &K,
        group: Option<&str>,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> Acquired<Slot<V>>;
    fn fill(
        &self,
        key: &K,
        group: Option<&str>,
        token: &LeaseToken,
        slot: Slot<V>,
        ttl: Duration,
    ) -> Fill;
    fn release(&self, key: &K, token: &LeaseToken) -> bool;
    fn set(&self, key: &K, group: Option<&str>, slot: Slot<V>, ttl: Duration);
    fn set_versioned(
        &self,
        key: &K,
        group: Option<&str>,
        slot: Slot<V>,
        ttl: Duration,
    ) -> Versioned;
    fn invalidate(&self, key: &K);
    fn ttls(&self, key: &K) -> Ttls;
}

/// The typed table of a cache whose keys are `K`, named by the borrowed key
/// type: what `Cache` holds, called directly (no `dyn`), so that a hit is
/// inlined into the read that asks for it.
pub(crate) type TypedTier<K, V> = Typed<<K as ToOwned>::Owned, V>;

/// A typed table of its own, outside any store: a near cache's L1.
pub(crate) fn standalone<K, V>(capacity: usize, clock: Clock) -> Arc<TypedTier<K, V>>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    Arc::new(Typed::<K::Owned, V> {
        table: MemTable::new(capacity, clock, Arc::new(TokenSource::new())),
        decode: K::decode_key,
    })
}

/// A cache's typed table, with the decoder of its keys so that an invalidation
/// by store key can find the typed key.
pub(crate) struct Typed<Q, V> {
    table: MemTable<Q, Slot<V>>,
    decode: fn(&str) -> Option<Q>,
}

/// A cache's typed table seen by store key, without its types: how the
/// [`Store`] protocol of a [`MemoryStore`] reaches the entries its caches hold,
/// so that a cache built with [`CacheBuilder::store`](crate::CacheBuilder::store),
/// a relay and a deferred invalidation all see what a cache built with
/// [`CacheBuilder::memory`](crate::CacheBuilder::memory) holds.
///
/// Each operation returns `None` (or gives the entry back) when the escaped key
/// does not decode into the table's key type; the store then uses its table of
/// entries by store key.
/// Payloads cross as [`Payload::Object`] holding the table's value type.
trait Routable: Send + Sync {
    fn get(&self, key: &StoreKey) -> Option<Read>;
    fn acquire(&self, key: &StoreKey, mode: AcquireMode, lease_ttl: Duration) -> Option<Acquire>;
    fn fill(
        &self,
        key: &StoreKey,
        lease: &LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> Result<Fill, Entry>;
    fn release(&self, key: &StoreKey, lease: &LeaseToken) -> Option<bool>;
    fn set(&self, key: &StoreKey, entry: Entry, ttl: Duration) -> Result<(), Entry>;
    fn set_versioned(
        &self,
        key: &StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> Result<Versioned, Entry>;
    fn invalidate(&self, key: &StoreKey) -> Option<()>;
    fn ttls(&self, key: &StoreKey) -> Option<Ttls>;
    /// Invalidates a group, by its escaped name.
    fn invalidate_group(&self, group: &str);
}

/// The [`Routable`] view of the typed table of a `Cache<K, V>`.
struct Router<K: ?Sized + CacheKey, V> {
    typed: Arc<Typed<K::Owned, V>>,
}

impl<K, V> Router<K, V>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    fn slot(entry: Entry) -> Option<Slot<V>> {
        let value = match entry.payload {
            Payload::Empty if entry.meta.negative => None,
            Payload::Object(obj) => Some(obj.downcast_ref::<V>()?.clone()),
            Payload::Empty | Payload::Bytes(_) => return None,
        };
        Some(Slot::new(value, entry.meta))
    }

    fn entry(slot: Slot<V>) -> Entry {
        let (value, meta) = slot.into_parts();
        Entry {
            payload: match value {
                Some(v) => Payload::Object(Arc::new(v)),
                None => Payload::Empty,
            },
            meta,
        }
    }

    /// Runs `op` on the typed key `key` decodes to and `entry` as a slot
    /// (`None` if its payload is not a `V`); gives `entry` back if `key` does
    /// not decode.
    fn on_entry<T>(
        &self,
        key: &StoreKey,
        entry: Entry,
        op: impl FnOnce(&MemTable<K::Owned, Slot<V>>, &K, Option<Slot<V>>) -> T,
    ) -> Result<T, Entry> {
        let Some(owned) = K::decode_key(key.user_key()) else {
            return Err(entry);
        };
        Ok(op(&self.typed.table, owned.borrow(), Self::slot(entry)))
    }

    /// Runs `op` on the typed key `key` decodes to, if it does.
    fn on<T>(
        &self,
        key: &StoreKey,
        op: impl FnOnce(&MemTable<K::Owned, Slot<V>>, &K) -> T,
    ) -> Option<T> {
        let owned = K::decode_key(key.user_key())?;
        Some(op(&self.typed.table, owned.borrow()))
    }
}

impl<K, V> Routable for Router<K, V>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    fn get(&self, key: &StoreKey) -> Option<Read> {
        self.on(key, |t, k| {
            t.get(k, key.group())
                .map_or(Read::Miss, |slot| Read::Hit(Self::entry(slot)))
        })
    }

    fn acquire(&self, key: &StoreKey, mode: AcquireMode, lease_ttl: Duration) -> Option<Acquire> {
        self.on(key, |t, k| {
            match t.acquire(k, key.group(), mode, lease_ttl) {
                Acquired::Hit(slot) => Acquire::Hit(Self::entry(slot)),
                Acquired::Leased(token) => Acquire::Leased(token),
                Acquired::Busy(left) => Acquire::Busy {
                    expires_in: Some(left),
                },
            }
        })
    }

    /// A payload of another type than the table's is refused, and the lease
    /// given up: nothing is cached.
    fn fill(
        &self,
        key: &StoreKey,
        lease: &LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> Result<Fill, Entry> {
        self.on_entry(key, entry, |t, k, slot| match slot {
            Some(slot) => t.fill(k, key.group(), lease, slot, ttl),
            None => {
                t.release(k, lease);
                Fill::Refused
            }
        })
    }

    fn release(&self, key: &StoreKey, lease: &LeaseToken) -> Option<bool> {
        self.on(key, |t, k| t.release(k, lease))
    }

    /// A payload of another type than the table's removes the entry instead.
    fn set(&self, key: &StoreKey, entry: Entry, ttl: Duration) -> Result<(), Entry> {
        self.on_entry(key, entry, |t, k, slot| match slot {
            Some(slot) => t.set(k, key.group(), slot, ttl),
            None => t.invalidate(k),
        })
    }

    fn set_versioned(
        &self,
        key: &StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> Result<Versioned, Entry> {
        self.on_entry(key, entry, |t, k, slot| match slot {
            Some(slot) => t.set_versioned(k, key.group(), slot, ttl),
            None => {
                t.invalidate(k);
                Versioned::Written
            }
        })
    }

    fn invalidate(&self, key: &StoreKey) -> Option<()> {
        self.on(key, |t, k| t.invalidate(k))
    }

    fn ttls(&self, key: &StoreKey) -> Option<Ttls> {
        self.on(key, |t, k| t.ttls(k))
    }

    fn invalidate_group(&self, group: &str) {
        self.typed.table.invalidate_group(group);
    }
}

impl<K, V> LocalTier<K, V> for Typed<K::Owned, V>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    #[inline]
    fn get(&self, key: &K, group: Option<&str>) -> Option<Slot<V>> {
        self.table.get(key, group)
    }
    #[inline(always)]
    fn hit(&self, key: &K) -> Option<Option<V>> {
        self.table.plain_hit(key)
    }
    fn acquire(
        &self,
        key: &K,
        group: Option<&str>,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> Acquired<Slot<V>> {
        self.table.acquire(key, group, mode, lease_ttl)
    }
    fn fill(
        &self,
        key: &K,
        group: Option<&str>,
        token: &LeaseToken,
        slot: Slot<V>,
        ttl: Duration,
    ) -> Fill {
        self.table.fill(key, group, token, slot, ttl)
    }
    fn release(&self, key: &K, token: &LeaseToken) -> bool {
        self.table.release(key, token)
    }
    fn set(&self, key: &K, group: Option<&str>, slot: Slot<V>, ttl: Duration) {
        self.table.set(key, group, slot, ttl);
    }
    fn set_versioned(
        &self,
        key: &K,
        group: Option<&str>,
        slot: Slot<V>,
        ttl: Duration,
    ) -> Versioned {
        self.table.set_versioned(key, group, slot, ttl)
    }
    fn invalidate(&self, key: &K) {
        self.table.invalidate(key);
    }
    fn ttls(&self, key: &K) -> Ttls {
        self.table.ttls(key)
    }
}

/// What a typed table does without a key of its borrowed type.
impl<Q, V> Typed<Q, V>
where
    Q: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn invalidate_group(&self, group: &str) {
        self.table.invalidate_group(group);
    }

    /// Drops every entry (a near cache whose invalidation bus was interrupted).
    pub(crate) fn clear(&self) {
        self.table.clear();
    }

    /// Invalidates the entry whose escaped key is `escaped`; false if the key
    /// type cannot decode it.
    pub(crate) fn invalidate_escaped(&self, escaped: &str) -> bool {
        match (self.decode)(escaped) {
            Some(owned) => {
                self.table.invalidate::<Q>(&owned);
                true
            }
            None => false,
        }
    }
}

/// An in-process [`Store`]: the embedded default, no server needed.
///
/// Cloning is cheap and clones share the same tables. Each cache built on a
/// `MemoryStore` gets its own typed table for its namespace, bounded by
/// `capacity` entries; two caches with the same namespace and types on one store
/// share their entries (and leases), like two processes sharing one Redis.
///
/// ```
/// use cachet::{Cache, MemoryStore};
///
/// let store = MemoryStore::new(10_000);
/// let users: Cache<u64, String> = Cache::builder("users").memory(store.clone()).build()?;
/// let orders: Cache<u64, Vec<u64>> = Cache::builder("orders").memory(store).build()?;
/// # Ok::<(), cachet::Error>(())
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    capacity: usize,
    clock: Clock,
    tokens: Arc<TokenSource>,
    raw: MemTable<String, Timed<Entry>>,
    /// Typed tables by `{prefix}{namespace}`, as `Typed<K, V>` twice: once to
    /// downcast, once to route invalidations by store key.
    typed: RwLock<HashMap<String, TypedEntry>>,
    /// Deferred invalidations by (due time, sequence number). In memory only:
    /// they are lost with the process, as are the entries they would delete.
    deferred: Mutex<BTreeMap<(u64, u64), StoreKey>>,
    deferred_seq: AtomicU64,
    /// Bloom filters by key.
    blooms: bloom::Blooms,
    /// Tag generations, shared by the typed tables and the protocol.
    tags: tags::TagTable,
}

struct TypedEntry {
    any: Arc<dyn Any + Send + Sync>,
    routable: Arc<dyn Routable>,
}

impl MemoryStore {
    /// The capacity used by [`MemoryStore::default`].
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// A store whose tables hold at most `capacity` entries each, on the system clock.
    pub fn new(capacity: usize) -> Self {
        Self::with_clock(capacity, Clock::system())
    }

    /// A store whose TTLs follow `clock` (use [`Clock::mock`] in tests to expire
    /// entries without sleeping).
    pub fn with_clock(capacity: usize, clock: Clock) -> Self {
        let capacity = capacity.max(1);
        let tokens = Arc::new(TokenSource::new());
        Self {
            inner: Arc::new(StoreInner {
                capacity,
                raw: MemTable::new(capacity, clock.clone(), Arc::clone(&tokens)),
                clock,
                tokens,
                typed: RwLock::new(HashMap::new()),
                deferred: Mutex::new(BTreeMap::new()),
                deferred_seq: AtomicU64::new(0),
                blooms: bloom::Blooms::default(),
                tags: tags::TagTable::new(capacity),
            }),
        }
    }

    /// The maximum number of entries of each table.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// The clock this store's TTLs follow.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The typed table of the cache whose keys start with `head`
    /// (`{prefix}{namespace}`), created on first use.
    pub(crate) fn table<K, V>(&self, head: &str) -> Result<Arc<TypedTier<K, V>>, String>
    where
        K: CacheKey + ?Sized + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let mut typed = self.inner.typed.write();
        if let Some(existing) = typed.get(head) {
            return Arc::clone(&existing.any)
                .downcast::<Typed<K::Owned, V>>()
                .map_err(|_| {
                    format!(
                        "the keys {head:?}... of this MemoryStore already hold another key or value type"
                    )
                });
        }
        let table = Arc::new(Typed::<K::Owned, V> {
            table: MemTable::new(
                self.inner.capacity,
                self.inner.clock.clone(),
                Arc::clone(&self.inner.tokens),
            ),
            decode: K::decode_key,
        });
        typed.insert(
            head.to_owned(),
            TypedEntry {
                any: Arc::clone(&table) as Arc<dyn Any + Send + Sync>,
                routable: Arc::new(Router::<K, V> {
                    typed: Arc::clone(&table),
                }) as Arc<dyn Routable>,
            },
        );
        Ok(table)
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
            .field("namespaces", &self.inner.typed.read().len())
            .field("clock", &self.inner.clock)
            .finish()
    }
}

/// A store call that runs when first polled, as a remote store's would: a
/// layer that drops or fails a call (a fault injected in a test) keeps it from
/// happening.
fn lazy<'a, T: Send + 'a>(op: impl FnOnce() -> T + Send + 'a) -> StoreFuture<'a, T> {
    Box::pin(async move { Ok(op()) })
}

impl Store for MemoryStore {
    fn payload_kind(&self) -> PayloadKind {
        PayloadKind::Object
    }

    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        lazy(move || self.read_now(key))
    }

    fn get_now(&self, key: &StoreKey) -> Option<Read> {
        Some(self.read_now(key))
    }

    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        lazy(move || {
            self.route(
                key,
                |typed| typed.acquire(key, mode, lease_ttl),
                |raw| match raw.acquire(key.as_str(), key.group(), mode, lease_ttl) {
                    Acquired::Hit(entry) => Acquire::Hit(entry),
                    Acquired::Leased(token) => Acquire::Leased(token),
                    Acquired::Busy(left) => Acquire::Busy {
                        expires_in: Some(left),
                    },
                },
            )
        })
    }

    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        lazy(move || {
            let entry = match self.typed(key) {
                Some(typed) => match typed.fill(key, lease, entry, ttl) {
                    Ok(fill) => return fill,
                    Err(entry) => entry,
                },
                None => entry,
            };
            (self.inner.raw).fill(key.as_str(), key.group(), lease, entry, ttl)
        })
    }

    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        lazy(move || {
            self.route(
                key,
                |typed| typed.release(key, lease),
                |raw| raw.release(key.as_str(), lease),
            )
        })
    }

    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        lazy(move || {
            let entry = match self.typed(key) {
                Some(typed) => match typed.set(key, entry, ttl) {
                    Ok(()) => return,
                    Err(entry) => entry,
                },
                None => entry,
            };
            self.inner.raw.set(key.as_str(), key.group(), entry, ttl);
        })
    }

    /// Deletes the entry and lease under `key`, in the typed table of the cache
    /// the key belongs to (see [`CacheKey::decode_key`]) and in the table of
    /// entries by store key.
    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        lazy(move || self.invalidate_now(key))
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls> {
        lazy(move || self.route(key, |typed| typed.ttls(key), |raw| raw.ttls(key.as_str())))
    }

    fn groups(&self) -> Option<&dyn Groups> {
        Some(self)
    }

    fn tags(&self) -> Option<&dyn Tags> {
        Some(self)
    }

    fn versioned_set(&self) -> Option<&dyn VersionedSet> {
        Some(self)
    }

    fn deferred_queue(&self) -> Option<&dyn DeferredQueue> {
        Some(self)
    }

    fn bloom_bits(&self) -> Option<&dyn BloomBits> {
        Some(self)
    }
}

impl Groups for MemoryStore {
    /// Moves the group on both in the table behind this trait and in the typed
    /// table of the cache the group belongs to.
    fn invalidate_group<'a>(&'a self, group: &'a GroupKey) -> StoreFuture<'a, ()> {
        lazy(move || {
            self.inner.raw.invalidate_group(group.group());
            if let Some(table) = self.typed_at(group.head()) {
                table.invalidate_group(group.group());
            }
        })
    }
}

impl Tags for MemoryStore {
    fn tag_clock<'a>(&'a self, _head: &'a str) -> StoreFuture<'a, u64> {
        lazy(move || self.inner.tags.clock())
    }

    fn tag_generations<'a>(&'a self, tags: &'a [TagKey]) -> StoreFuture<'a, Vec<Option<u64>>> {
        lazy(move || self.inner.tags.generations(tags))
    }

    fn claim_tags<'a>(
        &'a self,
        tags: &'a [TagKey],
        since: u64,
    ) -> StoreFuture<'a, Option<Vec<u64>>> {
        lazy(move || self.inner.tags.claim(tags, since))
    }

    fn invalidate_tag<'a>(&'a self, tag: &'a TagKey) -> StoreFuture<'a, ()> {
        lazy(move || self.inner.tags.invalidate(tag))
    }
}

impl VersionedSet for MemoryStore {
    fn set_versioned<'a>(
        &'a self,
        key: &'a StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Versioned> {
        lazy(move || {
            let entry = match self.typed(key) {
                Some(typed) => match typed.set_versioned(key, entry, ttl) {
                    Ok(versioned) => return versioned,
                    Err(entry) => entry,
                },
                None => entry,
            };
            (self.inner.raw).set_versioned(key.as_str(), key.group(), entry, ttl)
        })
    }
}

impl DeferredQueue for MemoryStore {
    /// Queues the invalidation in memory: it does not survive the process (nor
    /// do the entries it would delete).
    fn defer_invalidate<'a>(&'a self, key: &'a StoreKey, delay: Duration) -> StoreFuture<'a, ()> {
        lazy(move || {
            let due = (self.inner.clock.coarse_ms())
                .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            let seq = self.inner.deferred_seq.fetch_add(1, Ordering::Relaxed);
            self.inner.deferred.lock().insert((due, seq), key.clone());
        })
    }

    fn run_deferred(&self, max: usize) -> StoreFuture<'_, Deferred> {
        lazy(move || {
            let now = self.inner.clock.coarse_ms();
            let mut ran = 0;
            let next_due_in = loop {
                let due = {
                    let mut queue = self.inner.deferred.lock();
                    match queue.first_key_value() {
                        Some((&(at, _), _)) if at <= now && ran < max => queue.pop_first(),
                        Some((&(at, _), _)) => {
                            break Some(Duration::from_millis(at.saturating_sub(now)));
                        }
                        None => break None,
                    }
                };
                if let Some((_, key)) = due {
                    self.invalidate_now(&key);
                    ran += 1;
                }
            };
            Deferred { ran, next_due_in }
        })
    }
}

impl BloomBits for MemoryStore {
    fn bloom_check<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move { self.inner.blooms.check(filter, positions) })
    }

    fn bloom_add<'a>(&'a self, filter: &'a BloomKey, positions: &'a [u64]) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.inner.blooms.add(filter, positions) })
    }

    fn bloom_replace<'a>(&'a self, filter: &'a BloomKey, bits: Bytes) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.inner.blooms.replace(filter, &bits) })
    }
}

impl MemoryStore {
    fn read_now(&self, key: &StoreKey) -> Read {
        self.route(
            key,
            |typed| typed.get(key),
            |raw| {
                raw.get(key.as_str(), key.group())
                    .map_or(Read::Miss, Read::Hit)
            },
        )
    }

    /// The typed table of the cache `key` belongs to, if one was made.
    fn typed(&self, key: &StoreKey) -> Option<Arc<dyn Routable>> {
        self.typed_at(key.head())
    }

    fn typed_at(&self, head: &str) -> Option<Arc<dyn Routable>> {
        (self.inner.typed.read().get(head)).map(|t| Arc::clone(&t.routable))
    }

    /// `typed` on the typed table `key` belongs to if there is one and the key
    /// decodes, else `raw` on the table of entries by store key.
    fn route<T>(
        &self,
        key: &StoreKey,
        typed: impl FnOnce(&dyn Routable) -> Option<T>,
        raw: impl FnOnce(&MemTable<String, Timed<Entry>>) -> T,
    ) -> T {
        match self.typed(key).and_then(|t| typed(&*t)) {
            Some(done) => done,
            None => raw(&self.inner.raw),
        }
    }

    fn invalidate_now(&self, key: &StoreKey) {
        self.inner.raw.invalidate(key.as_str());
        if let Some(typed) = self.typed(key)
            && typed.invalidate(key).is_none()
        {
            tracing::warn!(key = %key, "the key does not decode into the key type of the in-process cache it belongs to; its entry stays until its TTL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: Option<u32>, meta: Meta) {
        let (v, m) = Slot::new(value, meta.clone()).into_parts();
        assert_eq!(v, value);
        assert_eq!(m, meta);
    }

    #[test]
    fn a_slot_gives_back_the_envelope_it_was_given() {
        round_trip(Some(7), Meta::default());
        round_trip(
            None,
            Meta {
                negative: true,
                ..Meta::default()
            },
        );
        round_trip(
            Some(7),
            Meta {
                soft_expiry_ms: 10,
                load_time_us: 3,
                ..Meta::default()
            },
        );
        round_trip(
            Some(7),
            Meta {
                version: 4,
                generation: 2,
                tags: Some(Arc::from(vec![])),
                ..Meta::default()
            },
        );
    }

    #[test]
    fn a_plain_slot_of_one_pointer_is_two_words() {
        // The table clones its slot on every hit: a plain one is the value
        // and its expiry, no more.
        assert_eq!(std::mem::size_of::<Slot<Arc<String>>>(), 16);
        assert_eq!(std::mem::size_of::<Slot<u64>>(), 24);
    }

    #[test]
    fn a_table_serves_a_plain_hit_only_without_a_soft_expiry() {
        let clock = Clock::mock();
        let table: MemTable<u64, Slot<u32>> =
            MemTable::new(16, clock.clock(), Arc::new(TokenSource::new()));
        let ttl = Duration::from_secs(1);
        table.set(&1, None, Slot::new(Some(1), Meta::default()), ttl);
        let versioned = Meta {
            version: 9,
            ..Meta::default()
        };
        table.set(&2, None, Slot::new(Some(2), versioned), ttl);
        let soft = Meta {
            soft_expiry_ms: clock.now_ms() + 500,
            ..Meta::default()
        };
        table.set(&3, None, Slot::new(Some(3), soft), ttl);
        let negative = Meta {
            negative: true,
            ..Meta::default()
        };
        table.set(&4, None, Slot::new(None, negative), ttl);
        assert_eq!(table.plain_hit(&1), Some(Some(1)));
        assert_eq!(
            table.plain_hit(&2),
            Some(Some(2)),
            "a version needs no more"
        );
        assert_eq!(
            table.plain_hit(&3),
            None,
            "a soft expiry takes the full path"
        );
        assert_eq!(table.plain_hit(&4), Some(None));
        assert_eq!(table.plain_hit(&5), None);
        clock.advance(ttl);
        for key in 1..=4 {
            assert_eq!(table.plain_hit(&key), None, "{key} expired");
        }
    }

    #[test]
    fn a_slot_keeps_its_generation_and_version() {
        let mut slot = Slot::new(
            Some(1),
            Meta {
                version: 3,
                ..Meta::default()
            },
        );
        assert_eq!((slot.generation(), slot.version()), (0, 3));
        slot.set_generation(6);
        assert_eq!((slot.generation(), slot.version()), (6, 3));
        let mut plain = Slot::new(Some(1), Meta::default());
        plain.set_generation(0);
        assert!(
            matches!(plain, Slot::Plain { .. }),
            "a plain slot stays plain"
        );
        plain.set_generation(2);
        assert_eq!(plain.generation(), 2);
    }
}
