//! The [`Store`] trait: the atomic primitives every cachet store provides.
//!
//! A fill is guarded by a *lease*, the idea of memcache at Facebook ("Scaling
//! Memcache at Facebook", NSDI 2013):
//!
//! 1. a reader that misses calls [`Store::acquire`], which atomically either
//!    returns the entry that is there now, or grants a lease token, or reports that
//!    another caller holds the lease;
//! 2. the lease holder reads the source of truth and calls [`Store::fill`], which
//!    writes the entry (value and TTL in one command) only if the lease is still the
//!    one it was granted, and consumes the lease;
//! 3. a writer, after committing to the source of truth, calls
//!    [`Store::invalidate`], which deletes the entry and revokes the lease.
//!
//! So a reader whose source read raced a writer's commit finds its lease revoked
//! and its fill refused: the old value cannot come back. [`Store::set`] writes a
//! value unconditionally and revokes the lease as well, for the same reason.
//!
//! Every key these primitives write carries a TTL: the entry its own, the lease
//! the lease TTL. Tokens are unique per grant and are never derived from a clock,
//! and only the holder's token can fill or release.
//!
//! Keys of a cache with groups ([`StoreKey::group`]) follow the same protocol,
//! and in addition every primitive checks the group's *generation*: a read
//! ignores an entry filled under an older generation, `acquire` records the
//! current generation in the token, and `fill` is refused if the generation
//! changed. [`Groups::invalidate_group`] moves the generation on.
//!
//! Tags ([`Tags`]) are checked by the cache rather than inside these
//! primitives, since an entry's tags depend on its value: the entry records
//! each tag's generation ([`Meta::tags`]), a read is current only while every
//! one is still its tag's generation, and a fill is refused when a tag was
//! invalidated after the lease's load began ([`LeaseToken::tag_clock`]).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::bloom::BloomKey;
use crate::envelope::Meta;
pub use crate::error::{BoxError, StoreError};
use crate::key::{GroupKey, StoreKey, TagKey};

/// The future returned by [`Store`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// How a store keeps payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// Encoded bytes (a remote store such as Redis).
    Bytes,
    /// Decoded values shared by reference, so that a hit does not deserialize
    /// (an in-process store).
    Object,
}

/// A value's payload, in the representation its store keeps.
#[derive(Clone)]
pub enum Payload {
    /// No payload: negative entries.
    Empty,
    /// Encoded bytes.
    Bytes(Bytes),
    /// A decoded value, type-erased.
    Object(Arc<dyn Any + Send + Sync>),
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Empty => f.write_str("Empty"),
            Payload::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Payload::Object(_) => f.write_str("Object(..)"),
        }
    }
}

/// An entry: envelope metadata and payload.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The envelope fields.
    pub meta: Meta,
    /// The value, absent for negative entries.
    pub payload: Payload,
}

impl Entry {
    /// A negative entry: the source of truth has no value for the key.
    pub fn negative() -> Self {
        Self {
            meta: Meta {
                negative: true,
                ..Meta::default()
            },
            payload: Payload::Empty,
        }
    }
}

/// The result of a plain read.
#[derive(Clone, Debug)]
pub enum Read {
    /// An entry is present.
    Hit(Entry),
    /// No entry.
    Miss,
    /// Bytes are present but are not a valid entry; treat as a miss and replace.
    Corrupt,
}

/// What [`Store::acquire`] should do when an entry is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcquireMode {
    /// Return the entry if there is one; take a lease only when there is none.
    IfAbsent,
    /// Take a lease even if an entry is present, to replace it (a corrupt entry,
    /// or a refresh of a stale one).
    Replace,
}

/// The result of [`Store::acquire`].
#[derive(Clone, Debug)]
pub enum Acquire {
    /// An entry is present ([`AcquireMode::IfAbsent`] only).
    Hit(Entry),
    /// Bytes are present but not a valid entry ([`AcquireMode::IfAbsent`] only).
    Corrupt,
    /// The caller now holds the lease and should load and [`Store::fill`].
    Leased(LeaseToken),
    /// Another caller holds the lease; it expires after at most this long.
    Busy {
        /// Remaining lifetime of the other caller's lease, if the store knows it.
        expires_in: Option<Duration>,
    },
}

/// The result of [`Store::fill`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The lease was valid; the entry is written and the lease consumed.
    Filled,
    /// The lease was revoked, expired or replaced; nothing was written.
    Refused,
}

/// One fill of [`Store::fill_many`]: what [`Store::fill`] takes.
#[derive(Clone, Debug)]
pub struct FillOf<'a> {
    /// The entry's key.
    pub key: &'a StoreKey,
    /// The lease the fill is made under.
    pub lease: &'a LeaseToken,
    /// The entry to write.
    pub entry: Entry,
    /// Its TTL.
    pub ttl: Duration,
}

/// The remaining lifetimes of an entry and of its lease, from [`Store::ttl`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ttls {
    /// The entry's remaining TTL; `None` when there is no entry (or, for a key
    /// written by something else without a TTL, [`Duration::MAX`]).
    pub entry: Option<Duration>,
    /// The lease's remaining TTL; `None` when no lease is held (or, for a
    /// lease key written by something else without a TTL, [`Duration::MAX`]).
    pub lease: Option<Duration>,
}

/// The result of [`VersionedSet::set_versioned`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versioned {
    /// The entry was written.
    Written,
    /// An entry with this version, not older than the one offered, was kept.
    Stale {
        /// The version of the entry that stays.
        current: u64,
    },
}

/// What one [`DeferredQueue::run_deferred`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deferred {
    /// Deferred invalidations executed (and acknowledged) by this call.
    pub ran: usize,
    /// When the next queued invalidation falls due, if any is queued.
    pub next_due_in: Option<Duration>,
}

/// What a store's invalidation bus tells the near caches of one cache.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// The entry under this key was invalidated or rewritten.
    Key(StoreKey),
    /// This group was invalidated.
    Group(GroupKey),
    /// This tag was invalidated.
    Tag(TagKey),
}

/// An event of an invalidation bus subscription, from
/// [`InvalidationBus::subscribe_invalidations`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusEvent {
    /// The subscription is (again) in place: notices from now on arrive. Any
    /// notice sent before may have been missed.
    Connected,
    /// Notices, in the order they were published.
    Notices(Vec<Notice>),
    /// The subscription broke: notices are being missed until the next
    /// [`BusEvent::Connected`].
    Lost,
}

/// A lease token: 16 bytes, unique per grant, and, for a grouped key, the
/// group's generation when the lease was granted (a fill is refused if the group
/// was invalidated since).
///
/// Two tokens are equal when their bytes are: the generation and the tag clock
/// a token carries are what its holder noted, not part of the lease.
#[derive(Clone, Copy)]
pub struct LeaseToken {
    bytes: [u8; 16],
    generation: u64,
    tag_clock: u64,
}

impl LeaseToken {
    /// A token from its bytes, for an ungrouped key.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self {
            bytes,
            generation: 0,
            tag_clock: 0,
        }
    }

    /// The same token, carrying the group generation it was granted under.
    #[must_use]
    pub const fn with_generation(self, generation: u64) -> Self {
        Self {
            bytes: self.bytes,
            generation,
            tag_clock: self.tag_clock,
        }
    }

    /// The same token, carrying the cache's tag clock ([`Tags::tag_clock`])
    /// read after the lease was granted and before its load began.
    #[must_use]
    pub const fn with_tag_clock(self, tag_clock: u64) -> Self {
        Self { tag_clock, ..self }
    }

    /// The tag clock the lease's load began at; `0` for caches without tags.
    pub const fn tag_clock(&self) -> u64 {
        self.tag_clock
    }

    /// The token's bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.bytes
    }

    /// The group generation the lease was granted under; `0` for ungrouped keys.
    pub const fn generation(&self) -> u64 {
        self.generation
    }
}

impl PartialEq for LeaseToken {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for LeaseToken {}

impl std::hash::Hash for LeaseToken {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state);
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(")?;
        for b in self.bytes {
            write!(f, "{b:02x}")?;
        }
        if self.generation != 0 {
            write!(f, " @{}", self.generation)?;
        }
        f.write_str(")")
    }
}

/// Hands out unique lease tokens: a random 64-bit source id (from the operating
/// system's entropy) followed by a 64-bit counter.
///
/// Two sources collide with probability 2⁻⁶⁴; one source never repeats a token.
#[derive(Debug)]
pub struct TokenSource {
    source: [u8; 8],
    next: AtomicU64,
}

impl TokenSource {
    /// A source with a fresh random id.
    pub fn new() -> Self {
        Self {
            source: rand::random(),
            next: AtomicU64::new(1),
        }
    }

    /// The next token.
    pub fn next_token(&self) -> LeaseToken {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut t = [0; 16];
        t[..8].copy_from_slice(&self.source);
        t[8..].copy_from_slice(&n.to_be_bytes());
        LeaseToken::from_bytes(t)
    }
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::new()
    }
}

/// A shared cache tier that speaks the lease protocol. See the [module docs](self).
///
/// The required methods are the core protocol: read, read-or-lease, fill,
/// release, set, invalidate, TTLs. Each is one atomic step on the store (one
/// Redis command or script). TTLs are whole milliseconds, at least one.
///
/// Everything else is a [`Capability`], offered through an accessor that
/// returns `None` by default: [`groups`](Store::groups),
/// [`versioned_set`](Store::versioned_set), [`bus`](Store::bus),
/// [`deferred_queue`](Store::deferred_queue), [`bloom_bits`](Store::bloom_bits).
/// A cache checks the capabilities its configuration needs when it is built.
/// To wrap a store (to count, delay or guard its calls), write a
/// [`StoreLayer`](crate::layer::StoreLayer) rather than forwarding by hand.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// How this store keeps payloads.
    fn payload_kind(&self) -> PayloadKind;

    /// The largest payload (encoded value bytes) the store accepts in one
    /// entry, if it has a limit. A cache refuses a larger value before sending
    /// it (a server that receives one may close the connection every other
    /// call shares).
    fn max_payload_bytes(&self) -> Option<usize> {
        None
    }

    /// Reads an entry.
    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read>;

    /// Reads an entry without waiting, for stores that never do IO; `None` for the
    /// others, which the caller then asks through [`Store::get`].
    fn get_now(&self, key: &StoreKey) -> Option<Read> {
        let _ = key;
        None
    }

    /// Reads many entries, in the order of `keys`, in as few round trips as
    /// the store can (Redis: one `MGET`, split by hash slot on a cluster). The
    /// default reads them one after the other; a store with a batch read
    /// overrides it.
    fn get_many<'a>(&'a self, keys: &'a [StoreKey]) -> StoreFuture<'a, Vec<Read>> {
        Box::pin(async move {
            let mut reads = Vec::with_capacity(keys.len());
            for key in keys {
                reads.push(match self.get_now(key) {
                    Some(read) => read,
                    None => self.get(key).await?,
                });
            }
            Ok(reads)
        })
    }

    /// Atomically returns the entry, or grants a lease with TTL `lease_ttl`, or
    /// reports that another caller holds the lease.
    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire>;

    /// Writes `entry` with TTL `ttl` if `lease` is still the key's valid lease, and
    /// consumes the lease.
    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill>;

    /// [`acquire`](Self::acquire) for many keys, in the order of `keys`, in
    /// as few round trips as the store can (Redis: one script per hash slot).
    /// Each key's read-or-lease is atomic, the batch as a whole is not. The
    /// default calls `acquire` for each key in turn.
    fn acquire_many<'a>(
        &'a self,
        keys: &'a [StoreKey],
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Vec<Acquire>> {
        Box::pin(async move {
            let mut claims = Vec::with_capacity(keys.len());
            for key in keys {
                claims.push(self.acquire(key, mode, lease_ttl).await?);
            }
            Ok(claims)
        })
    }

    /// [`fill`](Self::fill) for many keys, each under its own lease, in the
    /// order of `fills`, in as few round trips as the store can (Redis: one
    /// script per hash slot). The default fills each in turn.
    fn fill_many<'a>(&'a self, fills: &'a [FillOf<'a>]) -> StoreFuture<'a, Vec<Fill>> {
        Box::pin(async move {
            let mut filled = Vec::with_capacity(fills.len());
            for f in fills {
                filled.push(self.fill(f.key, f.lease, f.entry.clone(), f.ttl).await?);
            }
            Ok(filled)
        })
    }

    /// Gives the lease up if `lease` still holds it; returns whether it did.
    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool>;

    /// Writes `entry` with TTL `ttl` unconditionally and revokes any lease.
    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()>;

    /// Deletes the entry and revokes any lease.
    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()>;

    /// Sends what this handle still holds for later in this process (notices
    /// for the invalidation bus), for a clean shutdown; the number of items
    /// that could not be sent since the previous flush. The default has
    /// nothing to send.
    fn flush(&self) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(0)))
    }

    /// The remaining TTLs of the entry and its lease, for inspection.
    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls>;

    /// The store's group invalidation, if it offers it.
    fn groups(&self) -> Option<&dyn Groups> {
        None
    }

    /// The store's tag invalidation, if it offers it.
    fn tags(&self) -> Option<&dyn Tags> {
        None
    }

    /// The store's version-checked set, if it offers it.
    fn versioned_set(&self) -> Option<&dyn VersionedSet> {
        None
    }

    /// The store's invalidation bus, if it offers one.
    fn bus(&self) -> Option<&dyn InvalidationBus> {
        None
    }

    /// The store's deferred-invalidation queue, if it offers one.
    fn deferred_queue(&self) -> Option<&dyn DeferredQueue> {
        None
    }

    /// The store's Bloom filter bits, if it offers them.
    fn bloom_bits(&self) -> Option<&dyn BloomBits> {
        None
    }
}

/// What a store may offer beyond the core protocol, each through an accessor
/// of [`Store`] that returns `None` when the store lacks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// [`Groups`], from [`Store::groups`].
    Groups,
    /// [`Tags`], from [`Store::tags`].
    Tags,
    /// [`VersionedSet`], from [`Store::versioned_set`].
    VersionedSet,
    /// [`InvalidationBus`], from [`Store::bus`].
    InvalidationBus,
    /// [`DeferredQueue`], from [`Store::deferred_queue`].
    DeferredQueue,
    /// [`BloomBits`], from [`Store::bloom_bits`].
    BloomBits,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 6] = [
        Capability::Groups,
        Capability::Tags,
        Capability::VersionedSet,
        Capability::InvalidationBus,
        Capability::DeferredQueue,
        Capability::BloomBits,
    ];

    /// Whether `store` offers this capability.
    pub fn offered_by(self, store: &dyn Store) -> bool {
        match self {
            Capability::Groups => store.groups().is_some(),
            Capability::Tags => store.tags().is_some(),
            Capability::VersionedSet => store.versioned_set().is_some(),
            Capability::InvalidationBus => store.bus().is_some(),
            Capability::DeferredQueue => store.deferred_queue().is_some(),
            Capability::BloomBits => store.bloom_bits().is_some(),
        }
    }

    /// The error of a call that needs this capability on a store without it.
    pub fn missing(self) -> StoreError {
        StoreError::unsupported(format!("the store does not offer {self}"))
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Capability::Groups => "group invalidation",
            Capability::Tags => "tag invalidation",
            Capability::VersionedSet => "version-checked sets",
            Capability::InvalidationBus => "an invalidation bus",
            Capability::DeferredQueue => "a deferred-invalidation queue",
            Capability::BloomBits => "Bloom filter bits",
        })
    }
}

/// Group invalidation: a capability of a [`Store`] ([`Store::groups`]).
pub trait Groups: Send + Sync {
    /// Invalidates a whole group of keys in O(1): gives the group a new
    /// generation, which no earlier generation of it had, so every entry filled
    /// under an older one reads as a miss (and expires by its TTL), and leases
    /// granted before cannot fill.
    fn invalidate_group<'a>(&'a self, group: &'a GroupKey) -> StoreFuture<'a, ()>;
}

/// Tag invalidation: a capability of a [`Store`] ([`Store::tags`]).
///
/// Each tag has a generation, drawn from its cache's *tag clock*, a number
/// that only moves forward (and, once lost, comes back larger than before).
/// An entry records the generations of its tags when it is filled; it is
/// current while each is still its tag's generation. All tags of one call
/// belong to one cache.
pub trait Tags: Send + Sync {
    /// The tag clock of the cache whose keys start with `head`
    /// (`{prefix}{namespace}`), started if it is missing. A load reads it
    /// after its lease is granted and before it reads the source of truth.
    fn tag_clock<'a>(&'a self, head: &'a str) -> StoreFuture<'a, u64>;

    /// The current generation of each of `tags`, in order; `None` for a tag
    /// that has none (never invalidated nor claimed, or lost), which no entry
    /// recorded, so an entry that recorded one for it is not current.
    fn tag_generations<'a>(&'a self, tags: &'a [TagKey]) -> StoreFuture<'a, Vec<Option<u64>>>;

    /// The generations an entry carrying `tags` records, for a fill whose load
    /// began at tag clock `since` (or for an unconditional write, with
    /// `u64::MAX`). `None` when one of `tags` was invalidated after `since`:
    /// the fill must be refused. A tag without a generation is given one from
    /// the clock; if the clock moved past `since` meanwhile, an invalidation of
    /// that tag may have been lost with it, and the answer is `None` too.
    fn claim_tags<'a>(
        &'a self,
        tags: &'a [TagKey],
        since: u64,
    ) -> StoreFuture<'a, Option<Vec<u64>>>;

    /// Invalidates every entry carrying `tag` in O(1): the tag's generation
    /// moves to a new value of the clock, which no entry recorded, and fills
    /// whose load began before cannot record the tag.
    fn invalidate_tag<'a>(&'a self, tag: &'a TagKey) -> StoreFuture<'a, ()>;
}

/// Version-checked writes: a capability of a [`Store`] ([`Store::versioned_set`]).
pub trait VersionedSet: Send + Sync {
    /// Writes `entry` like [`Store::set`] (revoking any lease), unless the
    /// entry already there has a version (`Meta::version`) at least as new as
    /// `entry`'s: then nothing is written. Versions come from the source of
    /// truth, so a writer that lost a race to a newer write cannot put its older
    /// value in the cache. An absent entry is always written.
    fn set_versioned<'a>(
        &'a self,
        key: &'a StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Versioned>;
}

/// Invalidation notices between processes: a capability of a [`Store`]
/// ([`Store::bus`]), which near caches need.
pub trait InvalidationBus: Send + Sync {
    /// Subscribes to the invalidation notices of the cache whose keys start with
    /// `head` (`{prefix}{namespace}`): every invalidation, write and group
    /// invalidation made through a store with the bus enabled, in any process.
    /// The store keeps the subscription up (reconnecting) until the receiver is
    /// dropped, and reports each loss and recovery.
    fn subscribe_invalidations<'a>(
        &'a self,
        head: &'a str,
    ) -> StoreFuture<'a, tokio::sync::mpsc::Receiver<BusEvent>>;
}

/// A durable queue of delayed invalidations (delayed double-delete): a
/// capability of a [`Store`] ([`Store::deferred_queue`]).
pub trait DeferredQueue: Send + Sync {
    /// Queues an [`invalidate`](Store::invalidate) of `key` to run after `delay`,
    /// in a queue kept by the store itself: it survives the caller's process on a
    /// store that outlives it (Redis), not on an in-process store. Executed by
    /// [`run_deferred`](DeferredQueue::run_deferred), at least once.
    fn defer_invalidate<'a>(&'a self, key: &'a StoreKey, delay: Duration) -> StoreFuture<'a, ()>;

    /// Claims up to `max` due deferred invalidations, runs them and acknowledges
    /// them. A claimed item that is not acknowledged (its worker died) becomes due
    /// again after a visibility timeout, so each runs at least once.
    fn run_deferred(&self, max: usize) -> StoreFuture<'_, Deferred>;
}

/// The bits of shared Bloom filters: a capability of a [`Store`]
/// ([`Store::bloom_bits`]).
pub trait BloomBits: Send + Sync {
    /// Whether every bit at `positions` of the Bloom filter `filter` is set.
    ///
    /// A filter that is not built (see [`crate::bloom`]) rules nothing out: the
    /// answer is then `true`. Positions at or past [`BloomKey::bits`] are an error.
    fn bloom_check<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, bool>;

    /// Sets the bits at `positions` of the Bloom filter `filter`, in one atomic
    /// step. A filter that is not built is left alone (it is not created).
    fn bloom_add<'a>(&'a self, filter: &'a BloomKey, positions: &'a [u64]) -> StoreFuture<'a, ()>;

    /// Replaces the whole bitmap of the Bloom filter `filter` with `bits`
    /// ([`BloomKey::byte_len`] bytes; bit `i` is bit `7 - i % 8` of byte `i / 8`,
    /// as Redis's `SETBIT`/`GETBIT` number them), atomically: a concurrent check
    /// sees the old filter or the new one, never a mix. The filter is then built,
    /// and has no TTL.
    fn bloom_replace<'a>(&'a self, filter: &'a BloomKey, bits: Bytes) -> StoreFuture<'a, ()>;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn payload_kind(&self) -> PayloadKind {
        (**self).payload_kind()
    }
    fn max_payload_bytes(&self) -> Option<usize> {
        (**self).max_payload_bytes()
    }
    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        (**self).get(key)
    }
    fn get_now(&self, key: &StoreKey) -> Option<Read> {
        (**self).get_now(key)
    }
    fn get_many<'a>(&'a self, keys: &'a [StoreKey]) -> StoreFuture<'a, Vec<Read>> {
        (**self).get_many(keys)
    }
    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        (**self).acquire(key, mode, lease_ttl)
    }
    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        (**self).fill(key, lease, entry, ttl)
    }
    fn acquire_many<'a>(
        &'a self,
        keys: &'a [StoreKey],
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Vec<Acquire>> {
        (**self).acquire_many(keys, mode, lease_ttl)
    }
    fn fill_many<'a>(&'a self, fills: &'a [FillOf<'a>]) -> StoreFuture<'a, Vec<Fill>> {
        (**self).fill_many(fills)
    }
    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        (**self).release(key, lease)
    }
    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        (**self).set(key, entry, ttl)
    }
    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        (**self).invalidate(key)
    }
    fn flush(&self) -> StoreFuture<'_, u64> {
        (**self).flush()
    }
    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls> {
        (**self).ttl(key)
    }
    fn groups(&self) -> Option<&dyn Groups> {
        (**self).groups()
    }
    fn tags(&self) -> Option<&dyn Tags> {
        (**self).tags()
    }
    fn versioned_set(&self) -> Option<&dyn VersionedSet> {
        (**self).versioned_set()
    }
    fn bus(&self) -> Option<&dyn InvalidationBus> {
        (**self).bus()
    }
    fn deferred_queue(&self) -> Option<&dyn DeferredQueue> {
        (**self).deferred_queue()
    }
    fn bloom_bits(&self) -> Option<&dyn BloomBits> {
        (**self).bloom_bits()
    }
}

/// Whole milliseconds of a TTL, at least one (stores reject a zero TTL).
pub fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique() {
        let a = TokenSource::new();
        let b = TokenSource::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(a.next_token()));
            assert!(seen.insert(b.next_token()));
        }
    }

    #[test]
    fn ttl_is_at_least_one_ms() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 1);
        assert_eq!(ttl_millis(Duration::from_secs(2)), 2000);
    }
}
