//! The store conformance suite: the protocol tests every [`Store`] must pass.
//!
//! A store's test crate implements [`Harness`] and expands
//! [`conformance_tests!`](crate::conformance_tests) with an expression that makes
//! a fresh harness; each test below becomes one `#[tokio::test]`.
//!
//! ```ignore
//! cachet_testkit::conformance_tests!(MyHarness::new().await);
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachet_core::{
    Acquire, AcquireMode, Entry, Fill, FillOf, KeyLayout, LeaseToken, Meta, Payload, Read, Store,
    StoreKey, TagGeneration,
};

/// A boxed future, as harness methods return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The remaining lifetime of a raw key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyTtl {
    /// The key does not exist.
    Absent,
    /// The key exists without a TTL.
    Persistent,
    /// The key expires after this long.
    Expires(Duration),
}

/// What the suite needs from a store under test.
pub trait Harness: Send + Sync {
    /// The store under test.
    fn store(&self) -> Arc<dyn Store>;

    /// A key layout with a namespace no other test uses.
    fn layout(&self) -> KeyLayout;

    /// Lets `by` pass for TTLs (a mock clock advances; a real server waits).
    fn advance(&self, by: Duration) -> BoxFuture<'_, ()>;

    /// The remaining TTL of an entry key, or of its lease key when `lease` is set.
    fn ttl<'a>(&'a self, key: &'a StoreKey, lease: bool) -> BoxFuture<'a, KeyTtl>;

    /// Writes raw bytes under an entry key, bypassing the protocol, to simulate
    /// corruption; `None` for stores that keep decoded objects.
    fn write_raw<'a>(&'a self, key: &'a StoreKey, bytes: &'a [u8]) -> Option<BoxFuture<'a, ()>>;
}

/// Generates one `#[tokio::test]` per conformance test. The argument is an
/// expression (it may `.await`) that evaluates to a [`Harness`].
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            miss_lease_fill_hit,
            second_acquire_is_busy,
            reader_writer_race_leaves_no_entry,
            set_revokes_lease,
            only_the_holder_fills_or_releases,
            expired_lease_is_replaced_and_refused,
            fill_after_lease_expiry_is_refused,
            entries_expire_by_ttl,
            every_written_key_has_a_ttl,
            negative_entries_round_trip,
            replace_mode_takes_a_lease_over_a_present_entry,
            invalidate_is_idempotent,
            corrupt_bytes_are_reported_and_replaceable,
            concurrent_acquires_grant_one_lease,
            hostile_keys_are_distinct,
            deferred_invalidations_run_when_due,
            groups_orphan_old_entries_and_refuse_old_leases,
            tags_refuse_claims_after_an_invalidation_and_keep_entries_round_trip,
            versioned_sets_keep_the_newest,
            batches_keep_each_keys_protocol
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $make;
                $crate::conformance::$name(&harness).await;
            }
        )*
    };
}

const LEASE_TTL: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_secs(60);

fn entry(payload: &'static [u8]) -> Entry {
    Entry {
        meta: Meta {
            version: 7,
            load_time_us: 1234,
            ..Meta::default()
        },
        payload: Payload::Bytes(Bytes::from_static(payload)),
    }
}

fn payload_of(read: &Read) -> Option<Vec<u8>> {
    match read {
        Read::Hit(Entry {
            payload: Payload::Bytes(b),
            ..
        }) => Some(b.to_vec()),
        _ => None,
    }
}

async fn lease(store: &dyn Store, key: &StoreKey, ttl: Duration) -> LeaseToken {
    match store
        .acquire(key, AcquireMode::IfAbsent, ttl)
        .await
        .unwrap()
    {
        Acquire::Leased(t) => t,
        other => panic!("expected a lease on {key}, got {other:?}"),
    }
}

/// A miss grants a lease; the fill is then served, with its metadata intact.
pub async fn miss_lease_fill_hit(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("user:1");
    assert!(matches!(store.get(&key).await.unwrap(), Read::Miss));
    let t = lease(&*store, &key, LEASE_TTL).await;
    assert_eq!(
        store.fill(&key, &t, entry(b"v1"), TTL).await.unwrap(),
        Fill::Filled
    );
    let read = store.get(&key).await.unwrap();
    assert_eq!(payload_of(&read).as_deref(), Some(&b"v1"[..]));
    let Read::Hit(e) = read else { unreachable!() };
    assert_eq!(e.meta.version, 7);
    assert_eq!(e.meta.load_time_us, 1234);
    // The lease was consumed by the fill; a read-or-lease now finds the entry.
    assert!(matches!(
        store
            .acquire(&key, AcquireMode::IfAbsent, LEASE_TTL)
            .await
            .unwrap(),
        Acquire::Hit(_)
    ));
    assert_eq!(h.ttl(&key, true).await, KeyTtl::Absent);
}

/// While one caller holds the lease, others are told so, with its remaining TTL.
pub async fn second_acquire_is_busy(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    let _t = lease(&*store, &key, LEASE_TTL).await;
    match store
        .acquire(&key, AcquireMode::IfAbsent, LEASE_TTL)
        .await
        .unwrap()
    {
        Acquire::Busy {
            expires_in: Some(left),
        } => {
            assert!(left <= LEASE_TTL && left > Duration::ZERO, "{left:?}");
        }
        other => panic!("expected Busy, got {other:?}"),
    }
}

/// The essay's race: reader takes a lease, reads the OLD row; writer updates
/// and invalidates; the reader's fill must be refused and leave no entry.
pub async fn reader_writer_race_leaves_no_entry(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("user:42");
    let reader = lease(&*store, &key, LEASE_TTL).await;
    // ... reader reads the old row here; the writer commits, then invalidates:
    store.invalidate(&key).await.unwrap();
    assert_eq!(
        store.fill(&key, &reader, entry(b"OLD"), TTL).await.unwrap(),
        Fill::Refused
    );
    assert!(matches!(store.get(&key).await.unwrap(), Read::Miss));
    // A reader that starts after the write gets a fresh lease and may fill.
    let fresh = lease(&*store, &key, LEASE_TTL).await;
    assert_ne!(fresh, reader);
    assert_eq!(
        store.fill(&key, &reader, entry(b"OLD"), TTL).await.unwrap(),
        Fill::Refused,
        "the old token stays refused while a new lease is held"
    );
    assert_eq!(
        store.fill(&key, &fresh, entry(b"NEW"), TTL).await.unwrap(),
        Fill::Filled
    );
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"NEW"[..])
    );
}

/// An unconditional set revokes the lease, so a slower load cannot overwrite it.
pub async fn set_revokes_lease(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    let reader = lease(&*store, &key, LEASE_TTL).await;
    store.set(&key, entry(b"NEW"), TTL).await.unwrap();
    assert_eq!(h.ttl(&key, true).await, KeyTtl::Absent);
    assert_eq!(
        store.fill(&key, &reader, entry(b"OLD"), TTL).await.unwrap(),
        Fill::Refused
    );
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"NEW"[..])
    );
}

/// Only the holder's token fills or releases.
pub async fn only_the_holder_fills_or_releases(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    let holder = lease(&*store, &key, LEASE_TTL).await;
    let forged = LeaseToken::from_bytes([0xAB; 16]);
    assert!(!store.release(&key, &forged).await.unwrap());
    assert_eq!(
        store.fill(&key, &forged, entry(b"x"), TTL).await.unwrap(),
        Fill::Refused
    );
    assert!(matches!(store.get(&key).await.unwrap(), Read::Miss));
    assert!(store.release(&key, &holder).await.unwrap());
    assert!(
        !store.release(&key, &holder).await.unwrap(),
        "released twice"
    );
    let next = lease(&*store, &key, LEASE_TTL).await;
    assert_ne!(next, holder);
}

/// A lease expires by its own TTL; the next caller gets a new token and the old
/// holder, slower than its lease, can neither fill nor release the new lease.
pub async fn expired_lease_is_replaced_and_refused(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    let short = Duration::from_millis(50);
    let slow = lease(&*store, &key, short).await;
    h.advance(Duration::from_millis(120)).await;
    let next = lease(&*store, &key, LEASE_TTL).await;
    assert_ne!(next, slow);
    assert!(!store.release(&key, &slow).await.unwrap());
    assert_eq!(
        store.fill(&key, &slow, entry(b"slow"), TTL).await.unwrap(),
        Fill::Refused
    );
    assert_eq!(
        store.fill(&key, &next, entry(b"next"), TTL).await.unwrap(),
        Fill::Filled
    );
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"next"[..])
    );
}

/// A fill whose lease expired (nobody else took one) is refused: an invalidation
/// may have happened while the lease was gone.
pub async fn fill_after_lease_expiry_is_refused(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    let slow = lease(&*store, &key, Duration::from_millis(50)).await;
    h.advance(Duration::from_millis(120)).await;
    assert_eq!(
        store.fill(&key, &slow, entry(b"slow"), TTL).await.unwrap(),
        Fill::Refused
    );
    assert!(matches!(store.get(&key).await.unwrap(), Read::Miss));
}

/// Entries vanish when their TTL passes.
pub async fn entries_expire_by_ttl(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    store
        .set(&key, entry(b"v"), Duration::from_millis(50))
        .await
        .unwrap();
    assert!(matches!(store.get(&key).await.unwrap(), Read::Hit(_)));
    h.advance(Duration::from_millis(120)).await;
    assert!(matches!(store.get(&key).await.unwrap(), Read::Miss));
    let t = lease(&*store, &key, LEASE_TTL).await;
    assert_eq!(
        store.fill(&key, &t, entry(b"w"), TTL).await.unwrap(),
        Fill::Filled
    );
}

/// Entries and leases carry the TTL they were given.
pub async fn every_written_key_has_a_ttl(h: &dyn Harness) {
    let store = h.store();
    let layout = h.layout();
    let within = |ttl: KeyTtl, max: Duration| match ttl {
        KeyTtl::Expires(left) => left <= max && left > max / 2,
        _ => false,
    };
    let filled = layout.key("filled");
    let t = lease(&*store, &filled, LEASE_TTL).await;
    let lease_ttl = h.ttl(&filled, true).await;
    assert!(within(lease_ttl, LEASE_TTL), "lease TTL {lease_ttl:?}");
    store.fill(&filled, &t, entry(b"v"), TTL).await.unwrap();
    let ttl = h.ttl(&filled, false).await;
    assert!(within(ttl, TTL), "filled entry TTL {ttl:?}");

    let set = layout.key("set");
    store.set(&set, entry(b"v"), TTL).await.unwrap();
    let ttl = h.ttl(&set, false).await;
    assert!(within(ttl, TTL), "set entry TTL {ttl:?}");

    let negative = layout.key("negative");
    let t = lease(&*store, &negative, LEASE_TTL).await;
    store
        .fill(&negative, &t, Entry::negative(), Duration::from_secs(10))
        .await
        .unwrap();
    let ttl = h.ttl(&negative, false).await;
    assert!(
        within(ttl, Duration::from_secs(10)),
        "negative entry TTL {ttl:?}"
    );
}

/// A negative entry is stored and read back as negative, without a payload.
pub async fn negative_entries_round_trip(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("missing");
    let t = lease(&*store, &key, LEASE_TTL).await;
    store.fill(&key, &t, Entry::negative(), TTL).await.unwrap();
    match store.get(&key).await.unwrap() {
        Read::Hit(e) => {
            assert!(e.meta.negative);
            assert!(matches!(e.payload, Payload::Empty));
        }
        other => panic!("expected a negative hit, got {other:?}"),
    }
    // A value with an empty payload is not a negative entry.
    let empty = h.layout().key("empty");
    store.set(&empty, entry(b""), TTL).await.unwrap();
    match store.get(&empty).await.unwrap() {
        Read::Hit(e) => assert!(!e.meta.negative),
        other => panic!("expected a hit, got {other:?}"),
    }
}

/// `Replace` takes a lease even when an entry is present, and the fill replaces it.
pub async fn replace_mode_takes_a_lease_over_a_present_entry(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    store.set(&key, entry(b"old"), TTL).await.unwrap();
    let Acquire::Leased(t) = store
        .acquire(&key, AcquireMode::Replace, LEASE_TTL)
        .await
        .unwrap()
    else {
        panic!("Replace must grant a lease over a present entry")
    };
    // The entry stays readable while the replacement loads.
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"old"[..])
    );
    assert_eq!(
        store.fill(&key, &t, entry(b"new"), TTL).await.unwrap(),
        Fill::Filled
    );
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"new"[..])
    );
}

/// Invalidating a key that is not there is not an error.
pub async fn invalidate_is_idempotent(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("never-written");
    store.invalidate(&key).await.unwrap();
    store.invalidate(&key).await.unwrap();
    assert!(matches!(store.get(&key).await.unwrap(), Read::Miss));
}

/// Bytes that are not an entry read as corrupt, block no lease in `Replace`
/// mode, and are replaced by the fill.
pub async fn corrupt_bytes_are_reported_and_replaceable(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("k");
    let Some(write) = h.write_raw(&key, b"\x00not an entry") else {
        return; // This store keeps decoded objects; nothing can corrupt them.
    };
    write.await;
    assert!(matches!(store.get(&key).await.unwrap(), Read::Corrupt));
    assert!(matches!(
        store
            .acquire(&key, AcquireMode::IfAbsent, LEASE_TTL)
            .await
            .unwrap(),
        Acquire::Corrupt
    ));
    let Acquire::Leased(t) = store
        .acquire(&key, AcquireMode::Replace, LEASE_TTL)
        .await
        .unwrap()
    else {
        panic!("Replace must grant a lease over corrupt bytes")
    };
    assert_eq!(
        store.fill(&key, &t, entry(b"good"), TTL).await.unwrap(),
        Fill::Filled
    );
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"good"[..])
    );
}

/// Many concurrent read-or-lease calls on one key grant exactly one lease.
pub async fn concurrent_acquires_grant_one_lease(h: &dyn Harness) {
    let store = h.store();
    let key = h.layout().key("hot");
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = Arc::clone(&store);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store
                .acquire(&key, AcquireMode::IfAbsent, LEASE_TTL)
                .await
                .unwrap()
        }));
    }
    let mut leased = 0;
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            Acquire::Leased(_) => leased += 1,
            Acquire::Busy { .. } => busy += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((leased, busy), (1, 63));
}

/// Keys with spaces, newlines, globs, braces and Unicode are distinct entries
/// whose lease lives beside them.
pub async fn hostile_keys_are_distinct(h: &dyn Harness) {
    let store = h.store();
    let layout = h.layout();
    let keys = [
        "a b", "a\nb", "a*b", "{a}", "a}b{", "é", "日本", "", "%", "a,b", "\u{0}",
    ];
    for (i, k) in keys.iter().enumerate() {
        let key = layout.key(*k);
        let t = lease(&*store, &key, LEASE_TTL).await;
        let value: &'static [u8] = Box::leak(format!("v{i}").into_bytes().into_boxed_slice());
        assert_eq!(
            store.fill(&key, &t, entry(value), TTL).await.unwrap(),
            Fill::Filled
        );
    }
    for (i, k) in keys.iter().enumerate() {
        let read = store.get(&layout.key(*k)).await.unwrap();
        assert_eq!(
            payload_of(&read),
            Some(format!("v{i}").into_bytes()),
            "key {k:?}"
        );
    }
}

/// A deferred invalidation waits for its due time, then deletes the entry and
/// revokes the lease; each runs once and the queue is then empty.
pub async fn deferred_invalidations_run_when_due(h: &dyn Harness) {
    let store = h.store();
    let layout = h.layout();
    let soon = layout.key("soon");
    let later = layout.key("later");
    store.set(&soon, entry(b"v"), TTL).await.unwrap();
    store.set(&later, entry(b"v"), TTL).await.unwrap();
    store
        .deferred_queue()
        .unwrap()
        .defer_invalidate(&soon, Duration::from_millis(100))
        .await
        .unwrap();
    store
        .deferred_queue()
        .unwrap()
        .defer_invalidate(&later, Duration::from_secs(30))
        .await
        .unwrap();
    let nothing_due = store
        .deferred_queue()
        .unwrap()
        .run_deferred(10)
        .await
        .unwrap();
    assert_eq!(nothing_due.ran, 0);
    let next = nothing_due.next_due_in.expect("two items are queued");
    assert!(next <= Duration::from_millis(100), "{next:?}");
    assert!(matches!(store.get(&soon).await.unwrap(), Read::Hit(_)));

    h.advance(Duration::from_millis(150)).await;
    // A lease taken meanwhile is revoked by the deferred invalidation too.
    let reader = store
        .acquire(&soon, AcquireMode::Replace, LEASE_TTL)
        .await
        .unwrap();
    let done = store
        .deferred_queue()
        .unwrap()
        .run_deferred(10)
        .await
        .unwrap();
    assert_eq!(done.ran, 1);
    assert!(matches!(store.get(&soon).await.unwrap(), Read::Miss));
    if let Acquire::Leased(t) = reader {
        assert_eq!(
            store.fill(&soon, &t, entry(b"old"), TTL).await.unwrap(),
            Fill::Refused
        );
    }
    assert!(matches!(store.get(&later).await.unwrap(), Read::Hit(_)));
    let left = done.next_due_in.expect("the later item is still queued");
    assert!(
        left > Duration::from_secs(20) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    assert_eq!(
        store
            .deferred_queue()
            .unwrap()
            .run_deferred(10)
            .await
            .unwrap()
            .ran,
        0,
        "ran once"
    );
}

/// Group invalidation: entries filled under an older generation read as
/// misses, a lease granted before cannot fill, other groups are untouched, and
/// a new entry in the group works as usual.
pub async fn groups_orphan_old_entries_and_refuse_old_leases(h: &dyn Harness) {
    let store = h.store();
    let layout = h.layout();
    let a1 = layout.grouped_key("tenant a", "1");
    let a2 = layout.grouped_key("tenant a", "2");
    let b1 = layout.grouped_key("tenant b", "1");
    let t = lease(&*store, &a1, LEASE_TTL).await;
    assert_eq!(
        store.fill(&a1, &t, entry(b"a1"), TTL).await.unwrap(),
        Fill::Filled
    );
    store.set(&b1, entry(b"b1"), TTL).await.unwrap();
    assert!(matches!(store.get(&a1).await.unwrap(), Read::Hit(_)));
    let slow = lease(&*store, &a2, LEASE_TTL).await;

    store
        .groups()
        .unwrap()
        .invalidate_group(&a1.group_key().unwrap())
        .await
        .unwrap();
    assert!(
        matches!(store.get(&a1).await.unwrap(), Read::Miss),
        "orphaned"
    );
    assert_eq!(
        store.fill(&a2, &slow, entry(b"old"), TTL).await.unwrap(),
        Fill::Refused,
        "a lease granted before the invalidation"
    );
    assert!(matches!(store.get(&a2).await.unwrap(), Read::Miss));
    assert_eq!(
        payload_of(&store.get(&b1).await.unwrap()).as_deref(),
        Some(&b"b1"[..]),
        "another group"
    );
    // The orphan is replaced by a normal load.
    let t = lease(&*store, &a1, LEASE_TTL).await;
    assert_eq!(
        store.fill(&a1, &t, entry(b"new"), TTL).await.unwrap(),
        Fill::Filled
    );
    assert_eq!(
        payload_of(&store.get(&a1).await.unwrap()).as_deref(),
        Some(&b"new"[..])
    );
    // An unconditional set lands in the current generation.
    store
        .groups()
        .unwrap()
        .invalidate_group(&a1.group_key().unwrap())
        .await
        .unwrap();
    store.set(&a2, entry(b"set"), TTL).await.unwrap();
    assert_eq!(
        payload_of(&store.get(&a2).await.unwrap()).as_deref(),
        Some(&b"set"[..])
    );
}

/// The tag primitives: a claim records generations that stay current until
/// the tag is invalidated; a claim for a load that began before an
/// invalidation of one of its tags is refused, one that began after is not;
/// a write's claim (`u64::MAX`) never is; an entry's tags round-trip.
pub async fn tags_refuse_claims_after_an_invalidation_and_keep_entries_round_trip(h: &dyn Harness) {
    let store = h.store();
    let layout = h.layout();
    let tags = store.tags().expect("the store offers tags");
    let head = format!("{}{}", layout.prefix(), layout.namespace());
    let (a, b, c) = (
        layout.tag_key("a"),
        layout.tag_key("b"),
        layout.tag_key("c"),
    );
    assert_eq!(
        tags.tag_generations(&[a.clone(), b.clone()]).await.unwrap(),
        [None, None],
        "tags never used have no generation"
    );
    let since = tags.tag_clock(&head).await.unwrap();
    assert_eq!(
        tags.tag_clock(&head).await.unwrap(),
        since,
        "reads do not move it"
    );
    let first = tags
        .claim_tags(&[a.clone(), b.clone()], since)
        .await
        .unwrap()
        .expect("nothing was invalidated");
    assert_eq!(
        tags.tag_generations(&[a.clone(), b.clone(), c.clone()])
            .await
            .unwrap(),
        [Some(first[0]), Some(first[1]), None]
    );
    assert_eq!(
        tags.claim_tags(&[b.clone(), a.clone()], since)
            .await
            .unwrap(),
        Some(vec![first[1], first[0]]),
        "a second claim agrees"
    );

    // The entry keeps the generations it was written with.
    let key = layout.key("tagged");
    let mut tagged = entry(b"t");
    tagged.meta.tags = Some(
        [("a", first[0]), ("b", first[1])]
            .iter()
            .map(|&(tag, generation)| TagGeneration {
                tag: tag.into(),
                generation,
            })
            .collect(),
    );
    store.set(&key, tagged.clone(), TTL).await.unwrap();
    let Read::Hit(read) = store.get(&key).await.unwrap() else {
        panic!("the tagged entry is not read back");
    };
    assert_eq!(read.meta.tags, tagged.meta.tags);

    tags.invalidate_tag(&b).await.unwrap();
    let now = tags.tag_generations(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(now[0], Some(first[0]), "another tag is untouched");
    assert!(
        now[1].is_some_and(|g| g != first[1]),
        "the invalidated tag has a new generation: {now:?}"
    );
    assert_eq!(
        tags.claim_tags(&[a.clone(), b.clone()], since)
            .await
            .unwrap(),
        None,
        "a load that began before the invalidation"
    );
    assert_eq!(
        tags.claim_tags(std::slice::from_ref(&a), since)
            .await
            .unwrap(),
        Some(vec![first[0]]),
        "a load whose tags were not invalidated"
    );
    let later = tags.tag_clock(&head).await.unwrap();
    assert!(
        later > since,
        "an invalidation moves the clock: {since} {later}"
    );
    assert_eq!(
        tags.claim_tags(&[a.clone(), b.clone()], later)
            .await
            .unwrap(),
        Some(vec![first[0], now[1].unwrap()]),
        "a load that began after it"
    );
    assert_eq!(
        tags.claim_tags(&[b.clone(), c.clone()], u64::MAX)
            .await
            .unwrap()
            .map(|g| g.len()),
        Some(2),
        "a write's claim"
    );
    // A tag invalidated twice keeps the later generation.
    tags.invalidate_tag(&c).await.unwrap();
    let c1 = tags
        .tag_generations(std::slice::from_ref(&c))
        .await
        .unwrap()[0];
    tags.invalidate_tag(&c).await.unwrap();
    let c2 = tags
        .tag_generations(std::slice::from_ref(&c))
        .await
        .unwrap()[0];
    assert!(c2 > c1, "{c1:?} then {c2:?}");
}

fn versioned(payload: &'static [u8], version: u64) -> Entry {
    Entry {
        meta: Meta {
            version,
            ..Meta::default()
        },
        payload: Payload::Bytes(Bytes::from_static(payload)),
    }
}

/// A version-checked set writes only over an older (or no, or orphaned)
/// entry, and revokes the lease like `set`.
pub async fn versioned_sets_keep_the_newest(h: &dyn Harness) {
    use cachet_core::Versioned;
    let store = h.store();
    let layout = h.layout();
    let key = layout.key("row");
    let reader = lease(&*store, &key, LEASE_TTL).await;
    assert_eq!(
        store
            .versioned_set()
            .unwrap()
            .set_versioned(&key, versioned(b"v5", 5), TTL)
            .await
            .unwrap(),
        Versioned::Written
    );
    assert_eq!(
        store.fill(&key, &reader, entry(b"old"), TTL).await.unwrap(),
        Fill::Refused,
        "the lease was revoked"
    );
    assert_eq!(
        store
            .versioned_set()
            .unwrap()
            .set_versioned(&key, versioned(b"v3", 3), TTL)
            .await
            .unwrap(),
        Versioned::Stale { current: 5 }
    );
    assert_eq!(
        store
            .versioned_set()
            .unwrap()
            .set_versioned(&key, versioned(b"v5b", 5), TTL)
            .await
            .unwrap(),
        Versioned::Stale { current: 5 },
        "an equal version is not newer"
    );
    assert_eq!(
        payload_of(&store.get(&key).await.unwrap()).as_deref(),
        Some(&b"v5"[..])
    );
    // Versions are compared whole, beyond 2^32 and 2^53.
    let big = (1u64 << 60) + 1;
    assert_eq!(
        store
            .versioned_set()
            .unwrap()
            .set_versioned(&key, versioned(b"big", big), TTL)
            .await
            .unwrap(),
        Versioned::Written
    );
    assert_eq!(
        store
            .versioned_set()
            .unwrap()
            .set_versioned(&key, versioned(b"big-1", big - 1), TTL)
            .await
            .unwrap(),
        Versioned::Stale { current: big }
    );
    assert!(matches!(h.ttl(&key, false).await, KeyTtl::Expires(_)));
    // In a group, an orphaned entry does not block an older version.
    let g = layout.grouped_key("tenant", "row");
    store
        .versioned_set()
        .unwrap()
        .set_versioned(&g, versioned(b"g9", 9), TTL)
        .await
        .unwrap();
    store
        .groups()
        .unwrap()
        .invalidate_group(&g.group_key().unwrap())
        .await
        .unwrap();
    assert_eq!(
        store
            .versioned_set()
            .unwrap()
            .set_versioned(&g, versioned(b"g2", 2), TTL)
            .await
            .unwrap(),
        Versioned::Written
    );
    assert_eq!(
        payload_of(&store.get(&g).await.unwrap()).as_deref(),
        Some(&b"g2"[..])
    );
}

/// The batch calls keep each key's protocol: a batch read-or-lease finds the
/// entry, grants a lease or reports the holder, key by key; a batch fill
/// writes only under leases still valid (an invalidation since revokes its
/// key's only); a batch read returns each key's entry, in the keys' order.
/// Enough keys that, on a cluster, they span several slots.
pub async fn batches_keep_each_keys_protocol(h: &dyn Harness) {
    let store = h.store();
    let layout = h.layout();
    let keys: Vec<StoreKey> = (0..12).map(|i| layout.key(&format!("batch:{i}"))).collect();
    // Key 0 holds an entry, key 1's lease is held elsewhere, the rest are absent.
    store.set(&keys[0], entry(b"present"), TTL).await.unwrap();
    let _held = lease(&*store, &keys[1], LEASE_TTL).await;
    let claims = store
        .acquire_many(&keys, AcquireMode::IfAbsent, LEASE_TTL)
        .await
        .unwrap();
    assert_eq!(claims.len(), keys.len());
    assert!(
        matches!(&claims[0], Acquire::Hit(Entry { payload: Payload::Bytes(b), .. }) if b.as_ref() == b"present"),
        "{:?}",
        claims[0]
    );
    assert!(matches!(claims[1], Acquire::Busy { .. }), "{:?}", claims[1]);
    let tokens: Vec<(usize, LeaseToken)> = claims
        .into_iter()
        .enumerate()
        .skip(2)
        .map(|(i, c)| match c {
            Acquire::Leased(t) => (i, t),
            other => panic!("key {i}: expected a lease, got {other:?}"),
        })
        .collect();
    // A writer invalidates key 2 while the batch loads.
    store.invalidate(&keys[2]).await.unwrap();
    let fills: Vec<FillOf<'_>> = tokens
        .iter()
        .map(|(i, t)| FillOf {
            key: &keys[*i],
            lease: t,
            entry: entry(b"loaded"),
            ttl: TTL,
        })
        .collect();
    let filled = store.fill_many(&fills).await.unwrap();
    assert_eq!(filled[0], Fill::Refused, "key 2 was invalidated");
    assert!(filled[1..].iter().all(|f| *f == Fill::Filled), "{filled:?}");

    let reads = store.get_many(&keys).await.unwrap();
    let payloads: Vec<Option<Vec<u8>>> = reads.iter().map(payload_of).collect();
    assert_eq!(payloads[0].as_deref(), Some(&b"present"[..]));
    assert_eq!(payloads[1], None, "leased elsewhere, never filled");
    assert_eq!(payloads[2], None, "the refused fill wrote nothing");
    for (i, p) in payloads.iter().enumerate().skip(3) {
        assert_eq!(p.as_deref(), Some(&b"loaded"[..]), "key {i}");
        assert_eq!(
            h.ttl(&keys[i], true).await,
            KeyTtl::Absent,
            "key {i}'s lease consumed"
        );
        assert!(
            matches!(h.ttl(&keys[i], false).await, KeyTtl::Expires(_)),
            "key {i} has a TTL"
        );
    }
}
