//! Batch reads and loads: [`Cache::get_many`] and [`Cache::get_or_load_many`].
//!
//! A batch runs the read path's stages for each key (lookup, plan, admission);
//! the lookups of keys not in the near cache go to the store as one batch read
//! (on Redis one `MGET`, one per node on a cluster). The keys that are plainly missing then go
//! together: each joins its flight in this process (a key another caller here
//! is loading is followed, not loaded again), the leases of the keys this
//! batch leads are taken concurrently, **one** loader call loads every key
//! leased, and each is filled under its own lease. Every other key (leased
//! elsewhere, stale, expired with a fail-safe fallback, corrupt, or with the
//! store down) takes the single-key path with a loader of that key alone, so
//! every per-key guarantee holds inside a batch.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use cachet_core::{AcquireMode, CacheKey, LeaseToken, StoreError, StoreKey};
use futures::future::join_all;
use tokio::sync::watch;

use super::inner::{At, Claim, Found, Inner, each_failed};
use super::load::{LoadPlan, span};
use super::read::Plan;
use super::{Cache, LoadOptions};
use crate::Error;
use crate::error::BoxError;
use crate::flight::{self, Leader, Outcome, Role};
use tracing::Instrument as _;

/// Where one key of a batch stands after the read stages.
enum Step<V> {
    /// Its outcome is known.
    Done(Outcome<V>),
    /// It is plainly missing: a candidate for the batch load.
    Missing(At),
    /// It takes the single-key path with this plan.
    Single(At, LoadPlan<V>),
}

/// Where a key's outcome will come from: its flight in this process.
type Waiting<V> = (usize, At, watch::Receiver<Option<Outcome<V>>>);

/// A single-key loader's future.
type OneLoad<V, E> = std::pin::Pin<Box<dyn Future<Output = Result<Option<V>, E>> + Send>>;

/// A key of the batch that this call leads in this process.
struct Led<K, V> {
    key: K,
    skey: StoreKey,
    leader: Leader<V>,
}

impl<K, V> Cache<K, V>
where
    K: CacheKey + Clone + Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Reads many values at once: what [`get`](Self::get) would serve for
    /// each key, the near cache first, then the rest in one batch read of the
    /// store (on Redis one `MGET`; one per node on a cluster; keys with groups
    /// are read by one script each, pipelined). Results are in the order of
    /// `keys`.
    ///
    /// # Errors
    /// When the store fails for any key; the error names the first such key.
    pub async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<V>>, Error> {
        let keys: Vec<&K> = keys.iter().collect();
        let found = self.inner.lookup_tiers_many(&keys, true).await;
        keys.into_iter()
            .zip(found)
            .map(|(key, found)| self.served(key, found))
            .collect()
    }

    /// Reads many values, loading the missing ones with **one** call of
    /// `loader`: the N+1 fix. `loader` gets the keys to load and returns the
    /// values it found; a key it leaves out is "not found" (cached as a
    /// negative entry for the negative TTL). Results are in the order of
    /// `keys`; a key given twice is read once.
    ///
    /// Each key keeps the guarantees of [`get_or_load`](Self::get_or_load):
    /// it is filled under its own lease, so a write racing the batch refuses
    /// that key's fill only; a key another caller in this process is loading
    /// is waited for, not loaded again; a key whose lease another process
    /// holds is waited for and, if that wait gives up, loaded alone (`loader`
    /// called with that key only), as are keys served stale and refreshed, or
    /// expired with a fail-safe fallback. So `loader` may be called more than
    /// once, but never twice for one key by one batch.
    ///
    /// Costs on Redis: one batch read (as in [`get_many`](Self::get_many)),
    /// the missing keys' leases in one script per hash slot, the loader, the
    /// fills in one script per hash slot (slots in parallel; one script each
    /// on a single server). Keys with groups take one script each.
    ///
    /// # Errors
    /// When the loader fails or times out for the batch (every key it was
    /// loading fails with the same error), or a single-key load fails.
    ///
    /// Outside a tokio runtime (loads run in tasks of their own), an error of
    /// kind [`Load`](crate::ErrorKind::Load) naming the first key.
    pub async fn get_or_load_many<F, Fut, E>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<V>>, Error>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        if let Some(first) = keys.first()
            && tokio::runtime::Handle::try_current().is_err()
        {
            return Err(self.no_runtime(first));
        }
        let loader = Arc::new(loader);
        let mut distinct: Vec<&K> = Vec::with_capacity(keys.len());
        let mut position: HashMap<&K, usize> = HashMap::with_capacity(keys.len());
        for key in keys {
            position.entry(key).or_insert_with(|| {
                distinct.push(key);
                distinct.len() - 1
            });
        }
        let found = self.inner.lookup_tiers_many(&distinct, true).await;
        let steps = distinct
            .iter()
            .zip(found)
            .map(|(key, found)| self.batch_step(key, found, &loader));
        // Only a Bloom filter's check waits in these stages: without one, the
        // steps run one after the other, without `join_all`'s bookkeeping.
        let steps = if self.inner.bloom.is_some() {
            join_all(steps).await
        } else {
            let mut done = Vec::with_capacity(distinct.len());
            for step in steps {
                done.push(step.await);
            }
            done
        };
        let outcomes = self.batch_load(&distinct, steps, &loader).await;
        keys.iter()
            .map(|key| outcomes[position[key]].clone())
            .collect()
    }

    /// The read stages after the lookup for one key of a batch: plan, admission.
    async fn batch_step<F, Fut, E>(&self, key: &K, found: Found<V>, loader: &Arc<F>) -> Step<V>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let (mut at, found) = match found {
            Found::Near(v) => return Step::Done(Ok(v)),
            Found::Tier(at, found) => (at, found),
        };
        let plan = match self.plan(key, &mut at, found, LoadOptions::default()) {
            Plan::Serve(v) => return Step::Done(Ok(v)),
            Plan::ServeAndRefresh(v, seen) => {
                let skey = at.skey(&self.inner, key).clone();
                self.inner
                    .spawn_refresh(key, skey, seen, alone(loader, key));
                return Step::Done(Ok(v));
            }
            Plan::Load(plan) => plan,
        };
        if let Some(ruled_out) = self.admit(key, &mut at, &plan).await {
            return Step::Done(Ok(ruled_out));
        }
        let plain = plan.mode == AcquireMode::IfAbsent && plan.store_up && plan.fallback.is_none();
        if plain {
            Step::Missing(at)
        } else {
            Step::Single(at, plan)
        }
    }

    /// Loads what the read stages left: the missing keys together, the others
    /// one by one; returns each distinct key's outcome.
    async fn batch_load<F, Fut, E>(
        &self,
        keys: &[&K],
        steps: Vec<Step<V>>,
        loader: &Arc<F>,
    ) -> Vec<Outcome<V>>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let inner = &self.inner;
        let mut led = Vec::new();
        let mut waits: Vec<Waiting<V>> = Vec::new();
        let mut singles = Vec::new();
        let mut outcomes: Vec<Option<Outcome<V>>> = Vec::with_capacity(keys.len());
        for (i, (key, step)) in keys.iter().zip(steps).enumerate() {
            outcomes.push(None);
            match step {
                Step::Done(outcome) => outcomes[i] = Some(outcome),
                Step::Single(at, plan) => singles.push((i, at, plan)),
                Step::Missing(mut at) => {
                    let skey = at.skey(inner, key).clone();
                    match inner.flights.join(skey.as_str()) {
                        Role::Leader(leader) => {
                            waits.push((i, at, leader.subscribe()));
                            led.push(Led {
                                key: (*key).clone(),
                                skey,
                                leader,
                            });
                        }
                        Role::Follower(rx) => {
                            inner.counters.coalesced.inc();
                            waits.push((i, at, rx));
                        }
                    }
                }
            }
        }
        if !led.is_empty() {
            // In a task of its own, like a single load: it completes and fills
            // even if this call is dropped.
            tokio::spawn(load_led(Arc::clone(inner), led, Arc::clone(loader)));
        }
        let followed = async {
            // The flights end about together (a batch's own in one go), so
            // they are waited for one after the other, without `join_all`'s
            // bookkeeping; the keys whose flight ended without an outcome are
            // then loaded alone, afresh, concurrently.
            let mut followed = Vec::with_capacity(waits.len());
            let mut afresh = Vec::new();
            for (i, mut at, rx) in waits {
                let key = keys[i];
                match flight::follow(rx).await {
                    Some(outcome) => {
                        if let Ok(v) = &outcome {
                            let skey = at.skey(inner, key).clone();
                            inner.near_put(key, &skey, at.ticket, v, 0);
                        }
                        followed.push((i, outcome));
                    }
                    None => afresh.push(i),
                }
            }
            let afresh = join_all(afresh.into_iter().map(|i| async move {
                (i, self.get_or_load(keys[i], alone(loader, keys[i])).await)
            }));
            followed.extend(afresh.await);
            followed
        };
        let single = join_all(singles.into_iter().map(|(i, at, plan)| async move {
            let key = keys[i];
            let outcome = self
                .coalesce(key, at, plan, LoadOptions::default(), alone(loader, key))
                .await;
            (i, outcome)
        }));
        let (followed, single) = tokio::join!(followed, single);
        for (i, outcome) in followed.into_iter().chain(single) {
            outcomes[i] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Ok(None)))
            .collect()
    }
}

/// Loads the keys a batch leads: their leases taken together, one loader call
/// for every key leased, each filled under its lease; a key whose lease is
/// held elsewhere (or that turned out corrupt, or with the store failing)
/// takes the single-key load, which waits for the holder's fill.
async fn load_led<K, V, F, Fut, E>(inner: Arc<Inner<K, V>>, led: Vec<Led<K, V>>, loader: Arc<F>)
where
    K: CacheKey + Clone + Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    let inner = &*inner;
    let hard_timeout = inner.s.hard_timeout;
    let keys: Vec<(&K, &StoreKey)> = led.iter().map(|l| (&l.key, &l.skey)).collect();
    let claims: Vec<Result<Claim<V>, StoreError>> =
        match inner.acquire_many(&keys, AcquireMode::IfAbsent).await {
            Ok(claims) => claims.into_iter().map(Ok).collect(),
            Err(e) => each_failed(e, led.len()),
        };
    drop(keys);
    let mut leased: Vec<(Led<K, V>, LeaseToken)> = Vec::new();
    let mut alone_keys = Vec::new();
    for (l, claim) in led.into_iter().zip(claims) {
        match claim {
            Ok(Claim::Hit(v)) => l.leader.finish(&Ok(v)),
            Ok(Claim::Leased(token)) => leased.push((l, token)),
            Ok(Claim::Busy(_)) => alone_keys.push((l, AcquireMode::IfAbsent, true)),
            Ok(Claim::Corrupt) => alone_keys.push((l, AcquireMode::Replace, true)),
            Err(e) => {
                inner.counters.store_errors.inc();
                inner.warn_store(
                    "taking a lease failed; loading without caching",
                    &l.skey,
                    &e,
                );
                alone_keys.push((l, AcquireMode::IfAbsent, false));
            }
        }
    }
    let singles = join_all(alone_keys.into_iter().map(|(l, mode, store_up)| {
        let loader = &loader;
        async move {
            let outcome = inner
                .load(
                    &l.key,
                    &l.skey,
                    mode,
                    store_up,
                    hard_timeout,
                    alone(loader, &l.key),
                )
                .await;
            l.leader.finish(&outcome);
        }
    }));
    let batch = load_leased(inner, leased, &loader, hard_timeout);
    tokio::join!(singles, batch);
}

/// One loader call for every leased key, then each key's fill.
async fn load_leased<K, V, F, Fut, E>(
    inner: &Inner<K, V>,
    leased: Vec<(Led<K, V>, LeaseToken)>,
    loader: &Arc<F>,
    hard_timeout: Option<Duration>,
) where
    K: CacheKey + Clone + Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    let Some((first, _)) = leased.first() else {
        return;
    };
    let keys: Vec<K> = leased.iter().map(|(l, _)| l.key.clone()).collect();
    let span = span("cachet.load", inner.namespace(), &first.skey);
    let loaded = inner
        .call_timed(&first.skey, hard_timeout, || loader(keys))
        .instrument(span.clone())
        .await;
    span.record("outcome", if loaded.is_ok() { "batch" } else { "error" });
    match loaded {
        Ok((mut found, took)) => {
            let (led, tokens): (Vec<_>, Vec<_>) = leased.into_iter().unzip();
            let values: Vec<Option<V>> = led.iter().map(|l| found.remove(&l.key)).collect();
            let fills = led
                .iter()
                .zip(tokens)
                .zip(&values)
                .map(|((l, token), value)| (&l.key, &l.skey, token, value))
                .collect();
            inner.fill_loaded_many(fills, took).await;
            for (l, value) in led.into_iter().zip(values) {
                l.leader.finish(&Ok(value));
            }
        }
        Err(e) => {
            let releases = leased.into_iter().map(|(l, token)| {
                let e = e.clone();
                async move {
                    inner.release(&l.key, &l.skey, &token).await;
                    l.leader.finish(&Err(e));
                }
            });
            join_all(releases.collect::<Vec<_>>()).await;
        }
    }
}

/// The batch loader, for `key` alone, as a single-key loader.
fn alone<K, V, F, Fut, E>(
    loader: &Arc<F>,
    key: &K,
) -> impl FnOnce() -> OneLoad<V, E> + Send + 'static
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    V: Send + 'static,
    F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
    E: Send + 'static,
{
    let (loader, key) = (Arc::clone(loader), key.clone());
    move || {
        Box::pin(async move {
            let mut found = loader(vec![key.clone()]).await?;
            Ok(found.remove(&key))
        })
    }
}
