//! Exporting caches' figures through the [`metrics`](https://docs.rs/metrics)
//! facade, to Prometheus or any other recorder.
//!
//! # How figures reach the recorder
//!
//! Counters are kept in each cache (what [`Cache::stats`](crate::Cache::stats)
//! reads: per-thread stripes on the hit paths, so a hit touches no shared
//! metric) and **published**: [`publish`] hands every live cache's current
//! counts to the recorder installed now, as absolute counter values and
//! gauges. Call it before each scrape (`cachet lab --metrics-addr` does), or
//! let [`spawn_publisher`] call it on a period. Because each publication
//! looks the recorder up afresh, a recorder installed after the caches were
//! built still receives everything, from its first publication on.
//!
//! Histograms are recorded as events happen, against the recorder installed
//! at that moment; they are on paths that wait anyway (a load, a lease wait, a
//! store round trip), never on an in-process or near-cache hit.
//!
//! Caches that share a namespace (several `Cache` values over one store, in
//! one process) are published as one: their counts are summed.
//!
//! # Names
//!
//! Every metric carries the label `cache = <namespace>`.
//!
//! | name | type | meaning ([`Stats`] field) |
//! |---|---|---|
//! | `cachet_hits_total` | counter | `hits` (near-cache hits included) |
//! | `cachet_near_hits_total` | counter | `near_hits` |
//! | `cachet_negative_hits_total` | counter | `negative_hits` |
//! | `cachet_misses_total` | counter | `misses` |
//! | `cachet_loads_total` | counter | `loads` |
//! | `cachet_load_errors_total` | counter | `load_errors` |
//! | `cachet_fills_total` | counter | `fills` |
//! | `cachet_refused_fills_total` | counter | `refused_fills` |
//! | `cachet_lease_waits_total` | counter | `lease_waits` |
//! | `cachet_lease_wait_timeouts_total` | counter | `lease_wait_timeouts` |
//! | `cachet_decode_errors_total` | counter | `decode_errors` |
//! | `cachet_store_errors_total` | counter | `store_errors` |
//! | `cachet_bloom_rejections_total` | counter | `bloom_rejections` |
//! | `cachet_stale_hits_total` | counter | `stale_hits` |
//! | `cachet_refreshes_total` | counter | `refreshes` |
//! | `cachet_fail_safe_serves_total` | counter | `fail_safe_serves` |
//! | `cachet_soft_timeouts_total` | counter | `soft_timeouts` |
//! | `cachet_load_timeouts_total` | counter | `load_timeouts` |
//! | `cachet_coalesced_total` | counter | `coalesced` |
//! | `cachet_stale_writes_total` | counter | `stale_writes` |
//! | `cachet_near_clears_total` | counter | `near_clears` |
//! | `cachet_breaker_opens_total` | counter | `breaker_opens` |
//! | `cachet_short_circuits_total` | counter | `short_circuits` |
//! | `cachet_retried_invalidations_total` | counter | `retried_invalidations` |
//! | `cachet_dropped_invalidations_total` | counter | `dropped_invalidations` |
//! | `cachet_pending_invalidations` | gauge | `pending_invalidations` |
//! | `cachet_breaker_open` | gauge | 1 while the circuit breaker is open, else 0 |
//! | `cachet_load_duration_seconds` | histogram | each loader call, successful or not |
//! | `cachet_lease_wait_duration_seconds` | histogram | each wait for another caller's lease, until its fill was read or the wait gave up |
//! | `cachet_store_hit_duration_seconds` | histogram | each hit read from the shared store (one round trip, decoding included) |
//!
//! The consistency audit's metrics ([`audit`](crate::audit), `cachet_audit_*`)
//! are recorded as they happen, against the recorder installed when the
//! [`Auditor`](crate::audit::Auditor) was built.
//!
//! In-process and near-cache hits are counted, not timed: reading a clock
//! twice would cost more than the hit.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::Stats;

/// Reads one field of [`Stats`].
pub type Field = fn(&Stats) -> u64;

/// Every counter published, with the [`Stats`] field it reports.
pub const COUNTERS: &[(&str, Field)] = &[
    ("cachet_hits_total", |s| s.hits),
    ("cachet_near_hits_total", |s| s.near_hits),
    ("cachet_negative_hits_total", |s| s.negative_hits),
    ("cachet_misses_total", |s| s.misses),
    ("cachet_loads_total", |s| s.loads),
    ("cachet_load_errors_total", |s| s.load_errors),
    ("cachet_fills_total", |s| s.fills),
    ("cachet_refused_fills_total", |s| s.refused_fills),
    ("cachet_lease_waits_total", |s| s.lease_waits),
    ("cachet_lease_wait_timeouts_total", |s| {
        s.lease_wait_timeouts
    }),
    ("cachet_decode_errors_total", |s| s.decode_errors),
    ("cachet_store_errors_total", |s| s.store_errors),
    ("cachet_bloom_rejections_total", |s| s.bloom_rejections),
    ("cachet_stale_hits_total", |s| s.stale_hits),
    ("cachet_refreshes_total", |s| s.refreshes),
    ("cachet_fail_safe_serves_total", |s| s.fail_safe_serves),
    ("cachet_soft_timeouts_total", |s| s.soft_timeouts),
    ("cachet_load_timeouts_total", |s| s.load_timeouts),
    ("cachet_coalesced_total", |s| s.coalesced),
    ("cachet_stale_writes_total", |s| s.stale_writes),
    ("cachet_near_clears_total", |s| s.near_clears),
    ("cachet_breaker_opens_total", |s| s.breaker_opens),
    ("cachet_short_circuits_total", |s| s.short_circuits),
    ("cachet_retried_invalidations_total", |s| {
        s.retried_invalidations
    }),
    ("cachet_dropped_invalidations_total", |s| {
        s.dropped_invalidations
    }),
];

/// Every gauge published.
pub const GAUGES: &[&str] = &["cachet_pending_invalidations", "cachet_breaker_open"];

/// Every histogram recorded.
pub const HISTOGRAMS: &[&str] = &[LOAD_DURATION, LEASE_WAIT_DURATION, STORE_HIT_DURATION];

pub(crate) const LOAD_DURATION: &str = "cachet_load_duration_seconds";
pub(crate) const LEASE_WAIT_DURATION: &str = "cachet_lease_wait_duration_seconds";
pub(crate) const STORE_HIT_DURATION: &str = "cachet_store_hit_duration_seconds";

/// A cache as the registry sees it: its namespace and its figures now.
pub(crate) trait Source: Send + Sync {
    fn namespace(&self) -> &str;
    fn stats(&self) -> Stats;
}

/// The caches of this process, as long as they live.
static CACHES: Mutex<Vec<Weak<dyn Source>>> = Mutex::new(Vec::new());

/// Adds a cache to those [`publish`] reports.
pub(crate) fn register(cache: Weak<dyn Source>) {
    let mut caches = CACHES.lock();
    caches.retain(|c| c.strong_count() > 0);
    caches.push(cache);
}

/// Hands every live cache's counts to the recorder installed now (global, or
/// local to this thread with `metrics::with_local_recorder`): counters as
/// absolute values, gauges as levels; histograms are registered (their
/// observations are recorded as they happen). Cheap enough to call before every
/// scrape: one lock, and a few dozen recorder calls per cache.
pub fn publish() {
    let live: Vec<Arc<dyn Source>> = {
        let mut caches = CACHES.lock();
        caches.retain(|c| c.strong_count() > 0);
        caches.iter().filter_map(Weak::upgrade).collect()
    };
    let mut by_namespace: Vec<(String, Stats)> = Vec::new();
    for cache in &live {
        let stats = cache.stats();
        match by_namespace
            .iter_mut()
            .find(|(ns, _)| ns == cache.namespace())
        {
            Some((_, sum)) => *sum = sum.plus(&stats),
            None => by_namespace.push((cache.namespace().to_owned(), stats)),
        }
    }
    for (ns, stats) in by_namespace {
        for (name, field) in COUNTERS {
            ::metrics::counter!(*name, "cache" => ns.clone()).absolute(field(&stats));
        }
        #[allow(clippy::cast_precision_loss)] // a count of kept invalidations
        let pending = stats.pending_invalidations as f64;
        ::metrics::gauge!(GAUGES[0], "cache" => ns.clone()).set(pending);
        let open = if stats.breaker_open { 1.0 } else { 0.0 };
        ::metrics::gauge!(GAUGES[1], "cache" => ns.clone()).set(open);
        // Registered, so that they are exposed (empty) before their first
        // observation: a dashboard's queries find every name from the start.
        for name in HISTOGRAMS {
            let _ = ::metrics::histogram!(*name, "cache" => ns.clone());
        }
    }
}

/// Calls [`publish`] every `period` on the current tokio runtime, until the
/// task is aborted or the runtime stops.
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn_publisher(period: Duration) -> tokio::task::JoinHandle<()> {
    let period = period.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            publish();
        }
    })
}

/// The histograms of one cache, their keys (name and `cache` label) built
/// once with the cache rather than at each observation.
#[derive(Debug)]
pub(crate) struct Histograms {
    pub(crate) load: Histogram,
    pub(crate) lease_wait: Histogram,
    pub(crate) store_hit: Histogram,
}

impl Histograms {
    pub(crate) fn new(cache: &str) -> Self {
        Self {
            load: Histogram::new(LOAD_DURATION, cache),
            lease_wait: Histogram::new(LEASE_WAIT_DURATION, cache),
            store_hit: Histogram::new(STORE_HIT_DURATION, cache),
        }
    }
}

/// One histogram of one cache.
#[derive(Debug)]
pub(crate) struct Histogram(::metrics::Key);

/// What `metrics::histogram!` would give the recorder, from this module.
static METADATA: ::metrics::Metadata<'static> =
    ::metrics::Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

impl Histogram {
    fn new(name: &'static str, cache: &str) -> Self {
        let labels = vec![::metrics::Label::new("cache", cache.to_owned())];
        Self(::metrics::Key::from_parts(name, labels))
    }

    /// Records one observation, in seconds, against the recorder installed
    /// now.
    pub(crate) fn observe(&self, took: Duration) {
        ::metrics::with_recorder(|recorder| {
            recorder
                .register_histogram(&self.0, &METADATA)
                .record(took.as_secs_f64());
        });
    }
}
