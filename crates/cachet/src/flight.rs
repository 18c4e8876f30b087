//! In-process single-flight: one load per key at a time within a process.
//!
//! The first caller for a key becomes the *leader* and runs the load in its own
//! task; callers that arrive while it runs become *followers* and wait for the
//! leader's outcome, which they receive as a clone (errors included). If the
//! leader is cancelled before it finishes, its followers wake up and start over,
//! one of them becoming the new leader.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::Error;

const SHARDS: usize = 16;

pub(crate) type Outcome<V> = Result<Option<V>, Error>;

type Slot<V> = watch::Sender<Option<Outcome<V>>>;

type Shard<V> = Mutex<HashMap<Box<str>, Arc<Slot<V>>>>;

pub(crate) struct Flights<V> {
    shards: Box<[Shard<V>]>,
    hasher: std::collections::hash_map::RandomState,
}

pub(crate) enum Role<'a, V> {
    Leader(Leader<'a, V>),
    Follower(watch::Receiver<Option<Outcome<V>>>),
}

/// The leader's handle; dropping it without [`Leader::finish`] wakes the
/// followers so they can start over.
pub(crate) struct Leader<'a, V> {
    flights: &'a Flights<V>,
    key: &'a str,
    slot: Arc<Slot<V>>,
}

impl<V> Flights<V> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key: &str) -> &Shard<V> {
        // Truncation is intended: only the low bits pick the shard.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[i]
    }

    /// Joins the load in flight for `key`, or leads a new one.
    pub(crate) fn join<'a>(&'a self, key: &'a str) -> Role<'a, V> {
        let mut shard = self.shard(key).lock();
        if let Some(slot) = shard.get(key) {
            return Role::Follower(slot.subscribe());
        }
        let slot = Arc::new(watch::Sender::new(None));
        shard.insert(key.into(), Arc::clone(&slot));
        Role::Leader(Leader {
            flights: self,
            key,
            slot,
        })
    }

    /// Detaches the load in flight for `key`, if any: its current followers still
    /// get its outcome, but later callers start a new load. Used after writes, so
    /// that a caller arriving after an invalidation never receives a value read
    /// before it.
    pub(crate) fn detach(&self, key: &str) {
        self.shard(key).lock().remove(key);
    }

    fn remove_if_same(&self, key: &str, slot: &Arc<Slot<V>>) {
        let mut shard = self.shard(key).lock();
        if shard.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            shard.remove(key);
        }
    }

    /// Number of loads in flight (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

impl<V: Clone> Leader<'_, V> {
    /// Publishes the outcome to the followers and ends the flight.
    pub(crate) fn finish(self, outcome: &Outcome<V>) {
        self.slot.send_replace(Some(outcome.clone()));
        // `Drop` removes the flight from the table.
    }
}

impl<V> Drop for Leader<'_, V> {
    fn drop(&mut self) {
        self.flights.remove_if_same(self.key, &self.slot);
    }
}

/// Waits for a leader's outcome; `None` if the leader gave up without one.
pub(crate) async fn follow<V: Clone>(
    mut rx: watch::Receiver<Option<Outcome<V>>>,
) -> Option<Outcome<V>> {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome() {
        let flights = Flights::<u32>::new();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller leads")
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller follows")
        };
        leader.finish(&Ok(Some(7)));
        assert_eq!(follow(rx).await.unwrap().unwrap(), Some(7));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn followers_start_over_when_the_leader_is_dropped() {
        let flights = Flights::<u32>::new();
        let leader = flights.join("k");
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller follows")
        };
        drop(leader);
        assert!(follow(rx).await.is_none());
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn detach_lets_later_callers_lead() {
        let flights = Flights::<u32>::new();
        let Role::Leader(old) = flights.join("k") else {
            panic!("first caller leads")
        };
        let Role::Follower(early) = flights.join("k") else {
            panic!("follows")
        };
        flights.detach("k");
        let Role::Leader(new) = flights.join("k") else {
            panic!("after detach, a new caller leads")
        };
        old.finish(&Ok(Some(1)));
        // The old leader must not remove the new flight.
        assert_eq!(flights.len(), 1);
        assert_eq!(follow(early).await.unwrap().unwrap(), Some(1));
        new.finish(&Ok(Some(2)));
        assert_eq!(flights.len(), 0);
    }
}
