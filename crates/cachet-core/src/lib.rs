//! The store protocol shared by every cachet store.
//!
//! This crate owns the pieces that a store implementation and the typed
//! [`Cache`](https://docs.rs/cachet) front end must agree on, and nothing else:
//!
//! - [`key`]: how a typed key becomes a store key (`prefix + namespace + escaped key`),
//!   including the hash tags that keep one entry's keys in one Redis Cluster slot;
//! - [`envelope`]: the byte layout of an entry (format version, flags, soft expiry,
//!   value version, load time) in front of the payload;
//! - [`store`]: the [`Store`] trait with its atomic primitives (read, read-or-lease,
//!   fill-if-lease-valid, release, set, invalidate) and lease tokens;
//! - [`clock`]: wall-clock time in Unix milliseconds, with a mock for tests;
//! - [`bloom`]: the name and shape of a cache's Bloom filter in a store;
//! - [`retry`]: the backoff and log clipping that the background workers of the
//!   sibling crates (outbox relay, write-behind flusher) share.
//!
//! Users normally depend on the `cachet` facade crate, which re-exports what they need.
#![deny(missing_docs)]

pub mod bloom;
pub mod clock;
pub mod envelope;
pub mod error;
pub mod key;
pub mod layer;
pub mod retry;
pub mod store;

pub use bloom::BloomKey;
pub use clock::{Clock, MockClock};
pub use envelope::{DecodeError, Meta, TagGeneration};
pub use error::{Report, StoreErrorKind};
pub use key::{
    CacheKey, GroupKey, KeyLayout, KeyLayoutError, KeyWriter, StoreKey, TagKey, escape_key,
    unescape,
};
pub use layer::{Layered, Op, StoreLayer};
pub use store::{
    Acquire, AcquireMode, BloomBits, BusEvent, Capability, Deferred, DeferredQueue, Entry, Fill,
    FillOf, Groups, InvalidationBus, LeaseToken, Notice, Payload, PayloadKind, Read, Store,
    StoreError, StoreFuture, Tags, TokenSource, Ttls, Versioned, VersionedSet, ttl_millis,
};
