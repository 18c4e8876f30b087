//! What the later scenarios share: a [`Timeline`] of the source queries a run
//! sends, a steady read load ([`ReadLoad`]), warming a cache up ([`fill`],
//! [`fill_at_once`]), and lab caches with settings of their own ([`lab_cache`]).

use super::LabStore;
use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::{Cache, CacheBuilder, Stats};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::report::{Latency, Row};
use super::source::{Db, Item};
use super::{ENTRY_TTL, LEASE_TTL, Lab};

/// The resolution of a [`Timeline`].
const SLOT: Duration = Duration::from_millis(10);
/// Slots in the window the peak is taken over: 100 ms.
const SLOTS_PER_WINDOW: usize = 10;
/// Reads in flight while warming a cache up.
const FILL_CONCURRENCY: usize = 32;
/// A fill that takes longer than this fails the scenario.
const FILL_TIME_LIMIT: Duration = Duration::from_secs(120);
/// How often a read load starts the reads that are due.
const TICK: Duration = Duration::from_millis(1);
/// A load that falls further behind its schedule (a stalled process) drops the
/// reads it missed, as callers that gave up would, instead of bursting.
const MAX_LAG: Duration = Duration::from_millis(50);
/// Reads in flight at most, like a service's bounded request concurrency; past
/// it, new reads wait for one to finish. High enough that a wave of misses is
/// not throttled by it, low enough that a slow moment cannot pile up thousands
/// of requests on the store's one connection (and time them out).
const MAX_IN_FLIGHT: usize = 256;
/// How long past the planned end reads may run before they are considered stuck.
const GRACE: Duration = Duration::from_secs(30);

/// A lab cache in a namespace of its own, like [`Lab::cache`], with the
/// scenario's settings applied by `configure` on top of the lab's defaults.
/// `keys` are invalidated by [`Lab::forget`] or at the end of the run.
pub(super) fn lab_cache(
    lab: &Lab,
    scenario: &str,
    strategy: &str,
    keys: RangeInclusive<i64>,
    configure: impl FnOnce(CacheBuilder<i64, Item>) -> CacheBuilder<i64, Item>,
) -> Result<Cache<i64, Item>> {
    let namespace = format!("lab-{scenario}-{strategy}-{}", lab.run_id);
    let cache = build_cache(namespace, &lab.store, configure)?;
    lab.written().push((cache.clone(), keys));
    Ok(cache)
}

/// A cache in `namespace` on `store` with the lab's defaults, then the
/// scenario's settings applied by `configure`; not registered for cleanup (see
/// [`Lab::forget`]).
pub(super) fn build_cache(
    namespace: String,
    store: &LabStore,
    configure: impl FnOnce(CacheBuilder<i64, Item>) -> CacheBuilder<i64, Item>,
) -> Result<Cache<i64, Item>> {
    let builder = Cache::builder(namespace)
        .ttl(ENTRY_TTL)
        .jitter(0.1)
        .negative_ttl(ENTRY_TTL)
        .lease_ttl(LEASE_TTL);
    configure(store.serve(builder))
        .build()
        .context("cannot build the lab's cache")
}

/// Source queries counted per 10 ms from a start instant, over a fixed span;
/// queries outside the span are not counted.
#[derive(Debug)]
pub(super) struct Timeline {
    start: Instant,
    slots: Box<[AtomicU64]>,
}

impl Timeline {
    /// A timeline of `span` from `start`.
    pub(super) fn new(start: Instant, span: Duration) -> Arc<Self> {
        let n = usize::try_from(span.as_millis().div_ceil(SLOT.as_millis())).unwrap_or(0);
        Arc::new(Self {
            start,
            slots: (0..n.max(1)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Counts one query now.
    pub(super) fn record(&self) {
        self.record_at(Instant::now().saturating_duration_since(self.start));
    }

    /// Counts one query `at` after the start.
    fn record_at(&self, at: Duration) {
        let i = usize::try_from(at.as_millis() / SLOT.as_millis()).unwrap_or(usize::MAX);
        if let Some(slot) = self.slots.get(i) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> Vec<u64> {
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }

    /// Queries counted in the span.
    pub(super) fn total(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// The most queries in any 100 ms window of the span (windows slide by
    /// 10 ms, so a burst split by a bucket boundary still counts whole).
    pub(super) fn peak_per_100ms(&self) -> u64 {
        let counts = self.counts();
        if counts.len() <= SLOTS_PER_WINDOW {
            return counts.iter().sum();
        }
        counts
            .windows(SLOTS_PER_WINDOW)
            .map(|w| w.iter().sum())
            .max()
            .unwrap_or(0)
    }

    /// Queries per consecutive 100 ms, for the JSON rows and the plots.
    pub(super) fn per_100ms(&self) -> Vec<u64> {
        self.counts()
            .chunks(SLOTS_PER_WINDOW)
            .map(|c| c.iter().sum())
            .collect()
    }
}

/// The future of a [`loader`].
pub(super) type Load = Pin<Box<dyn Future<Output = Result<Option<Item>, sqlx::Error>> + Send>>;

/// A loader that counts its query on `timeline` (if any) and reads `id`.
pub(super) fn loader(
    db: &Db,
    timeline: Option<&Arc<Timeline>>,
    id: i64,
) -> impl FnOnce() -> Load + Send + 'static {
    let db = db.clone();
    let timeline = timeline.cloned();
    move || {
        Box::pin(async move {
            if let Some(t) = &timeline {
                t.record();
            }
            db.load(id).await
        })
    }
}

/// Reads every key of `keys` through the cache (a load each when cold), a few
/// at a time, without counting on any timeline.
pub(super) async fn fill(
    cache: &Cache<i64, Item>,
    db: &Db,
    keys: RangeInclusive<i64>,
) -> Result<()> {
    let work = async {
        let mut pending = JoinSet::new();
        let mut failed = 0_u64;
        for id in keys {
            if pending.len() >= FILL_CONCURRENCY
                && let Some(done) = pending.join_next().await
                && !matches!(done, Ok(Ok(Some(_))))
            {
                failed += 1;
            }
            let cache = cache.clone();
            let load = loader(db, None, id);
            pending.spawn(async move { cache.get_or_load(&id, load).await });
        }
        while let Some(done) = pending.join_next().await {
            if !matches!(done, Ok(Ok(Some(_)))) {
                failed += 1;
            }
        }
        failed
    };
    let failed = tokio::time::timeout(FILL_TIME_LIMIT, work)
        .await
        .context("filling the cache took too long")?;
    anyhow::ensure!(failed == 0, "{failed} reads failed while filling the cache");
    Ok(())
}

/// Fills every key of `keys` at once: reads the rows first (a few at a time),
/// then writes them all into the cache together with `set`, so that their TTLs
/// start within a few milliseconds of each other, as after a warm-up job or a
/// deploy that fills the cache in one go.
pub(super) async fn fill_at_once(
    cache: &Cache<i64, Item>,
    db: &Db,
    keys: RangeInclusive<i64>,
) -> Result<()> {
    let work = async {
        let mut rows = Vec::new();
        let mut pending = JoinSet::new();
        let mut collect = |done: Option<Result<Result<Option<Item>, sqlx::Error>, _>>| {
            if let Some(Ok(Ok(Some(item)))) = done {
                rows.push(item);
            }
        };
        for id in keys.clone() {
            if pending.len() >= FILL_CONCURRENCY {
                collect(pending.join_next().await);
            }
            let db = db.clone();
            pending.spawn(async move { db.load(id).await });
        }
        while let Some(done) = pending.join_next().await {
            collect(Some(done));
        }
        let expected = usize::try_from(keys.end() - keys.start() + 1).unwrap_or(usize::MAX);
        anyhow::ensure!(
            rows.len() == expected,
            "read {} of {expected} rows to fill the cache",
            rows.len()
        );
        let mut writes = JoinSet::new();
        for item in rows {
            let cache = cache.clone();
            writes.spawn(async move { cache.set(&{ item.id }, item).await });
        }
        let mut failed = 0_u64;
        while let Some(done) = writes.join_next().await {
            if !matches!(done, Ok(Ok(()))) {
                failed += 1;
            }
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} writes failed while filling the cache"
        );
        Ok(())
    };
    tokio::time::timeout(FILL_TIME_LIMIT, work)
        .await
        .context("filling the cache took too long")?
}

/// A steady read load, open-loop as a service's traffic is: `rate` reads per
/// second of random keys through `get_or_load`, each in a task of its own
/// started on schedule whether or not earlier reads have finished, for
/// `duration`. So a wave of misses reaches the source at the rate requests
/// arrive, not at the pace of a few readers waiting for their loads.
#[derive(Clone, Debug)]
pub(super) struct ReadLoad {
    pub(super) rate: u64,
    pub(super) duration: Duration,
    pub(super) keys: RangeInclusive<i64>,
}

/// What a [`ReadLoad`] did.
#[derive(Debug)]
pub(super) struct ReadOutcome {
    pub(super) reads: u64,
    pub(super) errors: u64,
    pub(super) latency: Latency,
}

impl ReadOutcome {
    fn add(&mut self, done: Result<(Duration, bool), tokio::task::JoinError>) -> Result<()> {
        let (elapsed, ok) = done.context("a read panicked")?;
        self.reads += 1;
        self.latency.record(elapsed);
        if !ok {
            self.errors += 1;
        }
        Ok(())
    }
}

impl ReadLoad {
    /// Runs the load from `start`, counting every query its loads send on
    /// `timeline`. Returns when every read has finished.
    pub(super) async fn run(
        &self,
        lab: &Lab,
        scenario: &str,
        cache: &Cache<i64, Item>,
        db: &Db,
        timeline: &Arc<Timeline>,
        start: Instant,
    ) -> Result<ReadOutcome> {
        let mut rng = StdRng::seed_from_u64(lab.seed_for(scenario, 0));
        let end = start + self.duration;
        let mut out = ReadOutcome {
            reads: 0,
            errors: 0,
            latency: Latency::new(),
        };
        let mut reads = JoinSet::new();
        // Reads started so far, and the ticks' schedule.
        let mut started = 0_u64;
        let ticks = self.duration.as_millis().div_ceil(TICK.as_millis());
        for tick in 1..=ticks {
            let at = start + TICK * u32::try_from(tick).unwrap_or(u32::MAX);
            tokio::time::sleep_until(at.min(end)).await;
            // Reads due by now at the steady rate; a backlog older than
            // MAX_LAG is dropped, as callers that gave up would be.
            let now = Instant::now().min(end);
            let due = |t: Duration| {
                u64::try_from(u128::from(self.rate) * t.as_micros() / 1_000_000).unwrap_or(u64::MAX)
            };
            let due_now = due(now.saturating_duration_since(start));
            let floor = due(now.saturating_duration_since(start).saturating_sub(MAX_LAG));
            started = started.max(floor);
            while started < due_now {
                while reads.len() >= MAX_IN_FLIGHT {
                    match reads.join_next().await {
                        Some(done) => out.add(done)?,
                        None => break,
                    }
                }
                let id = rng.random_range(self.keys.clone());
                let (cache, load) = (cache.clone(), loader(db, Some(timeline), id));
                reads.spawn(async move {
                    let t = Instant::now();
                    let ok = matches!(cache.get_or_load(&id, load).await, Ok(Some(_)));
                    (t.elapsed(), ok)
                });
                started += 1;
            }
            while let Some(done) = reads.try_join_next() {
                out.add(done)?;
            }
            if Instant::now() >= end {
                break;
            }
        }
        join_within(&mut reads, end, GRACE, "reads", |done| out.add(done)).await?;
        Ok(out)
    }
}

/// What [`ReadLoad::measure`] saw.
#[derive(Debug)]
pub(super) struct Measured {
    pub(super) outcome: ReadOutcome,
    /// The source queries the load's loads sent.
    pub(super) timeline: Arc<Timeline>,
    /// The cache's counters over the load alone.
    pub(super) stats: Stats,
}

impl ReadLoad {
    /// Runs the load from now on `cache` (already warmed up), and measures it.
    pub(super) async fn measure(
        &self,
        lab: &Lab,
        scenario: &str,
        cache: &Cache<i64, Item>,
        db: &Db,
    ) -> Result<Measured> {
        let before = cache.stats();
        let start = Instant::now();
        let timeline = Timeline::new(start, self.duration);
        let outcome = self.run(lab, scenario, cache, db, &timeline, start).await?;
        Ok(Measured {
            outcome,
            timeline,
            stats: cache.stats().since(&before),
        })
    }
}

impl Measured {
    /// `row` with the figures every read-load row has: reads, source
    /// queries and loads, errors, hit rate, latency, and the time box.
    pub(super) fn into_row(self, mut row: Row, duration: Duration) -> Row {
        row.requests = self.outcome.reads;
        row.db_queries = self.timeline.total();
        row.loads = Some(self.stats.loads);
        row.errors = self.outcome.errors;
        row.hit_rate = Some(self.stats.hit_rate());
        row.with_latency(&self.outcome.latency).time_boxed(duration)
    }
}

/// Waits for the `what` still in `tasks`, handing each to `add`, for at most
/// `grace` past `end`; past it, aborts them and fails.
pub(super) async fn join_within<T: 'static>(
    tasks: &mut JoinSet<T>,
    end: Instant,
    grace: Duration,
    what: &str,
    mut add: impl FnMut(Result<T, tokio::task::JoinError>) -> Result<()>,
) -> Result<()> {
    let drained = tokio::time::timeout_at(end + grace, async {
        while let Some(done) = tasks.join_next().await {
            add(done)?;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result,
        Err(_) => {
            tasks.abort_all();
            anyhow::bail!("{what} were still running {grace:?} after the end of the load");
        }
    }
}

/// Which of a writer's writes crash: `percent` of them, one every
/// `100 / percent` from a start drawn from the seed. Even a row of a few
/// writes has its share of crashes, which a draw per write would not promise.
#[derive(Clone, Copy, Debug)]
pub(super) struct CrashShare {
    percent: u32,
    /// Hundredths of a crash owed; one is due at 100.
    owed: u32,
}

impl CrashShare {
    pub(super) fn new(percent: u32, seed: u64) -> Self {
        Self {
            percent: percent.min(100),
            // Below 100: the remainder fits.
            owed: (seed % 100) as u32,
        }
    }

    /// Whether the next write crashes.
    pub(super) fn next(&mut self) -> bool {
        self.owed += self.percent;
        if self.owed < 100 {
            return false;
        }
        self.owed -= 100;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn timeline_peak_slides_over_bucket_boundaries() {
        let t = Timeline::new(Instant::now(), Duration::from_millis(500));
        // 5 queries at 90 ms and 5 at 110 ms: split by the 100 ms boundary,
        // but within one 100 ms window.
        for _ in 0..5 {
            t.record_at(Duration::from_millis(90));
            t.record_at(Duration::from_millis(110));
        }
        t.record_at(Duration::from_millis(450));
        // Past the span: not counted.
        t.record_at(Duration::from_secs(1));
        assert_eq!(t.total(), 11);
        assert_eq!(t.peak_per_100ms(), 10);
        assert_eq!(t.per_100ms(), vec![5, 5, 0, 0, 1]);
    }

    /// Crashes among the first `n` writes, and the index of the first.
    fn crashes(percent: u32, seed: u64, n: usize) -> (usize, Option<usize>) {
        let mut share = CrashShare::new(percent, seed);
        let outcomes: Vec<bool> = (0..n).map(|_| share.next()).collect();
        (
            outcomes.iter().filter(|&&c| c).count(),
            outcomes.iter().position(|&c| c),
        )
    }

    #[test]
    fn a_share_of_crashes_is_exact_and_starts_within_one_period() {
        for seed in 0..300 {
            // One in five, the first among the first five.
            let (count, first) = crashes(20, seed, 100);
            assert_eq!(count, 20, "seed {seed}");
            assert!(first.unwrap() < 5, "seed {seed}: {first:?}");
            let (count, _) = crashes(20, seed, 5);
            assert_eq!(count, 1, "seed {seed}");
            assert_eq!(crashes(0, seed, 100).0, 0);
            assert_eq!(crashes(100, seed, 100).0, 100);
            let (count, first) = crashes(33, seed, 300);
            assert_eq!(count, 99, "seed {seed}");
            assert!(first.unwrap() < 4, "seed {seed}: {first:?}");
        }
    }
}
