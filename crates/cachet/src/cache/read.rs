//! The read path of [`Cache::get_or_load`], as named stages:
//!
//! 1. **lookup** across the tiers (`Inner::lookup_tiers`, shared with `get`
//!    and `peek`): near cache, then the cache's own tier;
//! 2. **plan**: serve what was found (starting a background refresh when it is
//!    stale or due early), or load, and how;
//! 3. **admission**: the Bloom filter may rule the key out;
//! 4. **coalesce**: callers of one key in this process join one flight;
//! 5. **load and fill**, in a task of its own under a lease (`load.rs`).

use std::future::Future;

use cachet_core::{AcquireMode, CacheKey, Meta, StoreKey};

use super::inner::{At, Found, Lookup};
use super::load::LoadPlan;
use super::{Cache, LoadOptions};
use crate::Error;
use crate::error::BoxError;
use crate::flight::{self, Role};

/// How many times a caller starts over after the flight it followed ended
/// without an outcome, before it loads on its own.
const MAX_FOLLOW_ROUNDS: usize = 8;

/// Stage 2's decision.
pub(super) enum Plan<V> {
    /// Serve this value.
    Serve(Option<V>),
    /// Serve this value and refresh it in the background; the soft expiry of
    /// the entry seen.
    ServeAndRefresh(Option<V>, u64),
    /// Load.
    Load(LoadPlan<V>),
}

impl<K, V> Cache<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(super) async fn load_path<F, Fut, E>(
        &self,
        key: &K,
        options: LoadOptions,
        loader: F,
    ) -> Result<Option<V>, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(self.no_runtime(key));
        }
        let (mut at, found) = match self.inner.lookup_tiers(key, true).await {
            Found::Near(v) => return Ok(v),
            Found::Tier(at, found) => (at, found),
        };
        let plan = match self.plan(key, &mut at, found, options) {
            Plan::Serve(v) => return Ok(v),
            Plan::ServeAndRefresh(v, seen) => {
                let skey = at.skey(&self.inner, key).clone();
                self.inner.spawn_refresh(key, skey, seen, loader);
                return Ok(v);
            }
            Plan::Load(plan) => plan,
        };
        if let Some(ruled_out) = self.admit(key, &mut at, &plan).await {
            return Ok(ruled_out);
        }
        self.coalesce(key, at, plan, options, loader).await
    }

    /// The error of a load asked for outside a tokio runtime.
    pub(super) fn no_runtime(&self, key: &K) -> Error {
        let skey = self.inner.key_of(key);
        Error::no_runtime(self.inner.namespace(), skey.user_key())
    }

    /// Stage 2: serve, serve and refresh, or load (and how).
    pub(super) fn plan(
        &self,
        key: &K,
        at: &mut At,
        found: Lookup<V>,
        options: LoadOptions,
    ) -> Plan<V> {
        let inner = &*self.inner;
        let (mode, store_up, fallback) = match found {
            Lookup::Fresh(v, meta) if self.refresh_due(at, key, &meta) => {
                return Plan::ServeAndRefresh(v, meta.soft_expiry_ms);
            }
            Lookup::Fresh(v, _) => return Plan::Serve(v),
            Lookup::Stale(v, meta) => return Plan::ServeAndRefresh(v, meta.soft_expiry_ms),
            Lookup::Expired(v, past) => {
                if let Some(v) = inner.throttled_fallback(at.skey(inner, key)) {
                    inner.counters.fail_safe_serves.inc();
                    return Plan::Serve(v);
                }
                (AcquireMode::Replace, true, Some((v, past)))
            }
            Lookup::Missing { corrupt: false } => (AcquireMode::IfAbsent, true, None),
            Lookup::Missing { corrupt: true } => (AcquireMode::Replace, true, None),
            Lookup::Failed(e) => {
                inner.warn_store(
                    "store read failed; loading from the source without caching",
                    at.skey(inner, key),
                    &e,
                );
                (AcquireMode::IfAbsent, false, None)
            }
        };
        Plan::Load(LoadPlan {
            mode,
            store_up,
            hard_timeout: options.hard_timeout.or(inner.s.hard_timeout),
            fallback,
        })
    }

    /// Whether a fresh entry is due for a background refresh (refresh-ahead or
    /// early refresh).
    #[inline]
    fn refresh_due(&self, at: &mut At, key: &K, meta: &Meta) -> bool {
        if meta.soft_expiry_ms == 0 {
            return false;
        }
        let inner = &*self.inner;
        let now = inner.s.clock.coarse_ms();
        let fresh = &inner.s.fresh;
        if fresh.refresh_early(meta, now) {
            return true;
        }
        match &fresh.refresh_ahead {
            Some(ra) if fresh.in_ahead_zone(meta, now) => {
                let skey = at.skey(inner, key);
                inner.ahead_reads.hot(skey.as_str(), ra, now)
            }
            _ => false,
        }
    }

    /// Stage 3: the Bloom filter's verdict on a key about to be loaded;
    /// `Some(None)` when it rules the key out. A key with a fail-safe fallback,
    /// or a store that just failed, is not asked about.
    pub(super) async fn admit(
        &self,
        key: &K,
        at: &mut At,
        plan: &LoadPlan<V>,
    ) -> Option<Option<V>> {
        let inner = &*self.inner;
        let bloom = inner.bloom.as_ref()?;
        if !plan.store_up || plan.fallback.is_some() {
            return None;
        }
        match bloom.might_contain(key).await {
            Ok(true) => None,
            Ok(false) => {
                inner.counters.bloom_rejections.inc();
                Some(None)
            }
            // Unknown: the load goes on.
            Err(e) => {
                inner.counters.store_errors.inc();
                tracing::debug!(cache = self.namespace(), key = at.skey(inner, key).user_key(),
                    error = %crate::Report(&e), "Bloom filter check failed; loading");
                None
            }
        }
    }

    /// Stages 4 and 5: joins the key's flight in this process, leading it (the
    /// load runs in a task of its own) or following it, and waits for its
    /// outcome, serving the stale value after the soft timeout.
    pub(super) async fn coalesce<F, Fut, E>(
        &self,
        key: &K,
        mut at: At,
        mut plan: LoadPlan<V>,
        options: LoadOptions,
        loader: F,
    ) -> Result<Option<V>, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let inner = &self.inner;
        let skey: StoreKey = at.skey(inner, key).clone();
        let soft_timeout = options.soft_timeout.or(inner.s.soft_timeout);
        let stale = plan.fallback.as_ref().map(|(v, _)| v.clone());
        let (mode, store_up, hard_timeout) = (plan.mode, plan.store_up, plan.hard_timeout);
        let mut loader = Some(loader);
        for _ in 0..MAX_FOLLOW_ROUNDS {
            let rx = match inner.flights.join(skey.as_str()) {
                Role::Leader(leader) => {
                    let rx = leader.subscribe();
                    let Some(loader) = loader.take() else {
                        // This caller's own load ended without an outcome (its
                        // task was dropped, as when its runtime shuts down),
                        // and the loader went with it.
                        let e = Error::with_message(
                            crate::ErrorKind::Load,
                            self.namespace(),
                            Some(skey.user_key()),
                            "the load's task was dropped before it ended".into(),
                        );
                        leader.finish(&Err(e.clone()));
                        return Err(e);
                    };
                    let plan = LoadPlan {
                        fallback: plan.fallback.take(),
                        ..plan
                    };
                    inner.spawn_load(key, skey.clone(), plan, loader, leader);
                    rx
                }
                Role::Follower(rx) => {
                    inner.counters.coalesced.inc();
                    rx
                }
            };
            let outcome = match (soft_timeout, &stale) {
                (Some(limit), Some(stale)) => {
                    match tokio::time::timeout(limit, flight::follow(rx)).await {
                        Ok(outcome) => outcome,
                        Err(_) => {
                            inner.counters.soft_timeouts.inc();
                            return Ok(stale.clone());
                        }
                    }
                }
                _ => flight::follow(rx).await,
            };
            if let Some(outcome) = outcome {
                // A fail-safe fallback is not fresh: it stays out of L1.
                if let (Ok(v), None) = (&outcome, &stale) {
                    inner.near_put(key, &skey, at.ticket, v, 0);
                }
                return outcome;
            }
            // The flight ended without an outcome: start over, perhaps as leader.
        }
        match loader {
            Some(loader) => {
                inner
                    .load(key, &skey, mode, store_up, hard_timeout, loader)
                    .await
            }
            None => Err(Error::with_message(
                crate::ErrorKind::Load,
                self.namespace(),
                Some(skey.user_key()),
                "the load was abandoned repeatedly".into(),
            )),
        }
    }
}
