//! In-process single-flight: one load per key at a time within a process.
//!
//! The first caller for a key becomes the *leader*: it owns the flight and
//! hands it to the task that runs the load. Callers that arrive while it runs
//! become *followers* and wait for the outcome, which they receive as a clone
//! (errors included). If the flight ends without an outcome (the load task
//! panicked, or a background refresh gave up), its followers wake up and start
//! over, one of them becoming the new leader.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// Flights in the table, changed under their shard's lock: with none,
    /// [`detach`](Self::detach) (after every write) hashes nothing.
    len: AtomicUsize,
}

pub(crate) enum Role<V> {
    Leader(Leader<V>),
    Follower(watch::Receiver<Option<Outcome<V>>>),
}

/// The leader's handle; dropping it without [`Leader::finish`] wakes the
/// followers so they can start over.
pub(crate) struct Leader<V> {
    flights: Arc<Flights<V>>,
    key: Box<str>,
    slot: Arc<Slot<V>>,
    /// Whether [`Leader::finish`] ran: the flight has left the table.
    finished: bool,
}

impl<V> Flights<V> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            len: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &str) -> &Shard<V> {
        // Truncation is intended: only the low bits pick the shard.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[i]
    }

    /// Joins the load in flight for `key`, or leads a new one.
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Role<V> {
        let mut shard = self.shard(key).lock();
        if let Some(slot) = shard.get(key) {
            return Role::Follower(slot.subscribe());
        }
        let slot = Arc::new(watch::Sender::new(None));
        shard.insert(key.into(), Arc::clone(&slot));
        self.len.fetch_add(1, Ordering::SeqCst);
        Role::Leader(Leader {
            flights: Arc::clone(self),
            key: key.into(),
            slot,
            finished: false,
        })
    }

    /// Detaches the load in flight for `key`, if any: its current followers still
    /// get its outcome, but later callers start a new load. Used after writes, so
    /// that a caller arriving after an invalidation never receives a value read
    /// before it.
    ///
    /// With no flight in the table it returns at once. A flight that joins
    /// after that check began its load after it, so after the write.
    pub(crate) fn detach(&self, key: &str) {
        if self.len.load(Ordering::SeqCst) == 0 {
            return;
        }
        if self.shard(key).lock().remove(key).is_some() {
            self.len.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Removes the flight of `key` if it is still the one of `slot` (a write
    /// may have detached it, and another caller started the next one).
    fn remove_if_same(&self, key: &str, slot: &Arc<Slot<V>>) {
        let mut shard = self.shard(key).lock();
        // One lookup: almost always it is the same flight; otherwise it goes
        // back in.
        match shard.remove_entry(key) {
            Some((_, s)) if Arc::ptr_eq(&s, slot) => {
                self.len.fetch_sub(1, Ordering::SeqCst);
            }
            Some((k, s)) => {
                shard.insert(k, s);
            }
            None => {}
        }
    }

    /// Number of loads in flight (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let len = self.shards.iter().map(|s| s.lock().len()).sum();
        assert_eq!(len, self.len.load(Ordering::SeqCst));
        len
    }
}

impl<V: Clone> Leader<V> {
    /// A receiver of this flight's outcome, for the leader's own caller.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Outcome<V>>> {
        self.slot.subscribe()
    }

    /// Ends the flight and publishes the outcome to its followers. The flight
    /// leaves the table first, so that no caller arriving later joins a load
    /// that is already over.
    pub(crate) fn finish(mut self, outcome: &Outcome<V>) {
        self.flights.remove_if_same(&self.key, &self.slot);
        self.finished = true;
        self.slot.send_replace(Some(outcome.clone()));
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        // After `finish` the flight is gone already; a flight in the table
        // under this key now is a later caller's.
        if !self.finished {
            self.flights.remove_if_same(&self.key, &self.slot);
        }
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
        let flights = Arc::new(Flights::<u32>::new());
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
        let flights = Arc::new(Flights::<u32>::new());
        let leader = flights.join("k");
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller follows")
        };
        drop(leader);
        assert!(follow(rx).await.is_none());
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_finished_flight_is_not_joined() {
        let flights = Arc::new(Flights::<u32>::new());
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller leads")
        };
        let rx = leader.subscribe();
        leader.finish(&Ok(Some(1)));
        assert_eq!(follow(rx).await.unwrap().unwrap(), Some(1));
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn detach_lets_later_callers_lead() {
        let flights = Arc::new(Flights::<u32>::new());
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
