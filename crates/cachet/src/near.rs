//! The near cache: decoded values in this process (L1) in front of a shared
//! store (L2), kept coherent by the store's invalidation bus.
//!
//! A hit in L1 costs a typed map lookup and a clone of `V`: no round trip, no
//! decoding. What keeps it right:
//!
//! - **Every invalidation reaches every L1.** The store publishes a notice for
//!   every invalidation, write, group and tag invalidation made through it (batched,
//!   see the Redis store's docs), from any process, and every near cache
//!   subscribes to the notices of its cache. Notices for this process's own
//!   writes come back too; applying them twice is harmless.
//! - **A lost message is a stale L1, so a broken subscription clears L1.** While
//!   the subscription is down, L1 is neither read nor filled; when it is back, L1
//!   starts empty (both counted in `Stats::near_clears`).
//! - **An invalidation that lands while an L1 fill is in flight wins.** A fill
//!   takes a *ticket* (the epoch of its key's stripe, the group epoch and the
//!   subscription session) before it reads L2 or loads; the notice handler bumps
//!   the epoch before it removes the entry; the fill writes only with an
//!   unchanged ticket and checks it again after writing, removing its own write
//!   if a notice slipped in between.
//! - **Every L1 entry has a short TTL** (`max_ttl`, and never past its soft
//!   expiry), which bounds what an undelivered notice could leave behind (a
//!   notice lost on the way while the subscription stays up, or an invalidation
//!   made through a store without the bus).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet_core::{BusEvent, CacheKey, Clock, Meta, Notice, StoreKey};

use crate::memory::{self, LocalTier, Slot, TypedTier};

/// Number of epoch stripes; a power of two.
const STRIPES: usize = 256;

/// Settings of a near cache (L1), for [`CacheBuilder::near_cache`](crate::CacheBuilder::near_cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NearCache {
    /// The most entries L1 holds.
    pub capacity: usize,
    /// The longest an entry stays in L1: the bound on staleness should a notice
    /// not arrive.
    pub max_ttl: Duration,
}

impl NearCache {
    /// A near cache of at most `capacity` entries, each kept at most `max_ttl`.
    pub fn new(capacity: usize, max_ttl: Duration) -> Self {
        Self { capacity, max_ttl }
    }
}

/// A near cache's state.
pub(crate) struct Near<K: ?Sized + ToOwned, V> {
    table: Arc<TypedTier<K, V>>,
    max_ttl: Duration,
    epochs: Box<[AtomicU64]>,
    group_epoch: AtomicU64,
    /// Odd while the subscription is up; moves on every change of state, so a
    /// ticket taken in one session is void in the next.
    session: AtomicU64,
    hasher: RandomState,
    /// L1 clears, for `Stats`.
    pub(crate) clears: AtomicU64,
}

/// What an L1 fill took before reading L2 or loading.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    stripe: usize,
    epoch: u64,
    group_epoch: u64,
    session: u64,
}

impl<K, V> Near<K, V>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new(options: NearCache, clock: Clock) -> Self {
        Self {
            table: memory::standalone::<K, V>(options.capacity.max(1), clock),
            max_ttl: options.max_ttl,
            epochs: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            group_epoch: AtomicU64::new(0),
            session: AtomicU64::new(0),
            hasher: RandomState::new(),
            clears: AtomicU64::new(0),
        }
    }

    fn connected(&self) -> bool {
        !self.session.load(Ordering::SeqCst).is_multiple_of(2)
    }

    fn stripe(&self, user_key: &str) -> usize {
        // Truncation is intended: only the low bits pick the stripe.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.hasher.hash_one(user_key) as usize & (STRIPES - 1);
        i
    }

    /// An L1 hit, if the subscription is up.
    #[inline(always)]
    pub(crate) fn get(&self, key: &K, group: Option<&str>) -> Option<Option<V>> {
        if !self.connected() {
            return None;
        }
        match group {
            // L1 entries carry no soft expiry: a live one is a hit, answered
            // by the table's fast path.
            None => self.table.hit(key),
            Some(_) => self.table.get(key, group).map(Slot::into_value),
        }
    }

    /// A ticket for filling `skey` later; `None` while the subscription is down.
    pub(crate) fn ticket(&self, skey: &StoreKey) -> Option<Ticket> {
        let session = self.session.load(Ordering::SeqCst);
        if session.is_multiple_of(2) {
            return None;
        }
        let stripe = self.stripe(skey.user_key());
        Some(Ticket {
            stripe,
            epoch: self.epochs[stripe].load(Ordering::SeqCst),
            group_epoch: self.group_epoch.load(Ordering::SeqCst),
            session,
        })
    }

    fn valid(&self, t: &Ticket) -> bool {
        self.epochs[t.stripe].load(Ordering::SeqCst) == t.epoch
            && self.group_epoch.load(Ordering::SeqCst) == t.group_epoch
            && self.session.load(Ordering::SeqCst) == t.session
    }

    /// Fills L1 with a value read from L2 or loaded, for at most `ttl` (and
    /// `max_ttl`), unless a notice for its key (or group, or a change of
    /// subscription) came since `ticket` was taken.
    pub(crate) fn put(
        &self,
        key: &K,
        group: Option<&str>,
        ticket: Ticket,
        value: Option<V>,
        ttl: Duration,
    ) {
        if !self.valid(&ticket) {
            return;
        }
        let ttl = ttl.min(self.max_ttl);
        if ttl.is_zero() {
            return;
        }
        let slot = Slot::new(value, Meta::default());
        self.table.set(key, group, slot, ttl);
        if !self.valid(&ticket) {
            // A notice slipped in between the check and the write.
            self.table.invalidate(key);
        }
    }

    /// This process invalidated or rewrote `key`.
    pub(crate) fn invalidate(&self, key: &K, skey: &StoreKey) {
        self.epochs[self.stripe(skey.user_key())].fetch_add(1, Ordering::SeqCst);
        self.table.invalidate(key);
    }

    /// This process invalidated `group` (escaped).
    pub(crate) fn invalidate_group(&self, group: &str) {
        self.group_epoch.fetch_add(1, Ordering::SeqCst);
        self.table.invalidate_group(group);
    }

    /// A tag of the cache was invalidated (here or elsewhere). L1 does not
    /// know which of its entries carry the tag, so it drops them all, and
    /// fills in flight are void as after a group invalidation.
    pub(crate) fn invalidate_tag(&self) {
        self.group_epoch.fetch_add(1, Ordering::SeqCst);
        self.table.clear();
    }

    /// Empties L1 and starts a new session: up (odd) or down (even). Tickets
    /// of earlier sessions are void.
    fn reset(&self, up: bool) {
        let parity = u64::from(up);
        let _ = self
            .session
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                let next = s + 1;
                Some(if next % 2 == parity { next } else { next + 1 })
            });
        self.table.clear();
        self.clears.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies one bus event. Returns the store keys whose in-process loads
    /// should be detached.
    pub(crate) fn apply(&self, event: BusEvent) -> Vec<StoreKey> {
        match event {
            BusEvent::Connected => {
                // Whatever L1 held may have missed notices: start empty.
                self.reset(true);
                Vec::new()
            }
            BusEvent::Lost => {
                self.reset(false);
                Vec::new()
            }
            BusEvent::Notices(notices) => {
                let mut keys = Vec::new();
                for notice in notices {
                    match notice {
                        Notice::Key(skey) => {
                            self.epochs[self.stripe(skey.user_key())]
                                .fetch_add(1, Ordering::SeqCst);
                            if !self.table.invalidate_escaped(skey.user_key()) {
                                // A key type that cannot decode: drop everything.
                                self.reset(self.connected());
                            }
                            keys.push(skey);
                        }
                        Notice::Group(group) => self.invalidate_group(group.group()),
                        Notice::Tag(_) => self.invalidate_tag(),
                        _ => self.reset(self.connected()),
                    }
                }
                keys
            }
            _ => {
                self.reset(self.connected());
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_core::KeyLayout;

    fn near() -> (Near<u64, String>, KeyLayout) {
        let near = Near::new(
            NearCache::new(100, Duration::from_secs(10)),
            Clock::mock().clock(),
        );
        (near, KeyLayout::new("cachet:", "n").unwrap())
    }

    #[test]
    fn nothing_is_cached_until_the_subscription_is_up() {
        let (near, layout) = near();
        let k = layout.key(&1u64);
        assert!(near.ticket(&k).is_none());
        near.apply(BusEvent::Connected);
        let t = near.ticket(&k).unwrap();
        near.put(&1, None, t, Some("v".into()), Duration::from_secs(5));
        assert_eq!(near.get(&1, None), Some(Some("v".into())));
        near.apply(BusEvent::Lost);
        assert_eq!(near.get(&1, None), None, "not read while down");
        near.apply(BusEvent::Connected);
        assert_eq!(near.get(&1, None), None, "cleared on reconnect");
        assert_eq!(near.clears.load(Ordering::Relaxed), 3);
        assert!(near.connected());
    }

    #[test]
    fn a_notice_during_a_fill_wins() {
        let (near, layout) = near();
        near.apply(BusEvent::Connected);
        let k = layout.key(&1u64);
        let t = near.ticket(&k).unwrap();
        // The notice arrives after the ticket, before the fill writes.
        near.apply(BusEvent::Notices(vec![Notice::Key(k.clone())]));
        near.put(&1, None, t, Some("old".into()), Duration::from_secs(5));
        assert_eq!(near.get(&1, None), None);
        // A ticket from an earlier session is void too.
        let t = near.ticket(&k).unwrap();
        near.apply(BusEvent::Lost);
        near.apply(BusEvent::Connected);
        near.put(&1, None, t, Some("old".into()), Duration::from_secs(5));
        assert_eq!(near.get(&1, None), None);
    }

    #[test]
    fn notices_remove_keys_and_groups() {
        let (near, layout) = near();
        near.apply(BusEvent::Connected);
        for id in 1..=3u64 {
            let t = near.ticket(&layout.key(&id)).unwrap();
            let group = (id == 3).then_some("g");
            near.put(
                &id,
                group,
                t,
                Some(format!("v{id}")),
                Duration::from_secs(5),
            );
        }
        let detach = near.apply(BusEvent::Notices(vec![
            Notice::Key(layout.key(&1u64)),
            Notice::Group(layout.group_key("g")),
        ]));
        assert_eq!(detach, vec![layout.key(&1u64)]);
        assert_eq!(near.get(&1, None), None);
        assert_eq!(near.get(&2, None), Some(Some("v2".into())));
        assert_eq!(near.get(&3, Some("g")), None);
    }

    #[test]
    fn l1_ttl_is_capped() {
        let (near, layout) = near();
        near.apply(BusEvent::Connected);
        let t = near.ticket(&layout.key(&1u64)).unwrap();
        near.put(&1, None, t, Some("v".into()), Duration::ZERO);
        assert_eq!(near.get(&1, None), None, "nothing to keep");
        let t = near.ticket(&layout.key(&1u64)).unwrap();
        near.put(&1, None, t, Some("v".into()), Duration::from_secs(3600));
        assert_eq!(near.table.ttls(&1).entry, Some(Duration::from_secs(10)));
    }
}
