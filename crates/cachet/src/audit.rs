//! The consistency audit: how often, and for how long, a cache serves values
//! its source of truth no longer holds, in nines within a time bound.
//!
//! An [`Auditor`] samples reads that a [`Cache`] answered, and later, off the
//! caller's path, compares the cache with the source of truth through a check
//! the user supplies (typically the loader). A read counts as *inconsistent
//! within M* only if the cache still disagrees with the source M after the
//! read. The figures are reported as nines at each bound (`-log10` of the
//! inconsistent share: 3 nines is one read in a thousand), after Meta's Polaris,
//! which reports TAO's consistency the same way.
//!
//! ```
//! use std::time::Duration;
//! use cachet::Cache;
//! use cachet::audit::{AuditOptions, Auditor};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), cachet::Error> {
//! let users: Cache<u64, String> = Cache::builder("users").build()?;
//! users.set(&1, "Ada".to_owned()).await?;
//!
//! let options = AuditOptions::new()
//!     .sample_rate(0.01)
//!     .bounds([Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)])
//!     .budget(50.0);
//! // The check reads the source of truth, as the loader does (from the primary).
//! let auditor = Auditor::spawn(&users, options, |id: &u64| {
//!     let id = *id;
//!     async move { Ok::<_, std::io::Error>((id == 1).then(|| "Ada".to_owned())) }
//! })?;
//!
//! // Reads through the auditor are the cache's `get`, sampled.
//! assert_eq!(auditor.get(&1).await?, Some("Ada".to_owned()));
//!
//! let report = auditor.finish().await;
//! for bound in &report.bounds {
//!     println!("within {:?}: {}", bound.bound, bound.nines());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # What is measured
//!
//! - **Reads the cache served, sampled.** A read enters the audit through
//!   [`Auditor::get`] (the cache's [`get`](Cache::get), which never loads:
//!   whatever it returns was a hit, a stale serve within the
//!   stale-while-revalidate window, or a near-cache hit) or
//!   [`Auditor::observe`], for a value the caller knows came from the cache.
//!   Each such read is sampled with probability
//!   [`sample_rate`](AuditOptions::sample_rate). Not every read is audited,
//!   and the figures are estimates from the sample.
//! - **Checks at each bound.** For a sampled read of key `k` that returned `v`
//!   at time `t`, the auditor checks at `t + M` for each bound `M`, in
//!   increasing order. A check reads the source through the check function
//!   (giving `s`), *then* the cache's current entry for `k` through
//!   [`Cache::peek`] (giving `c`). The check *agrees* if `v == s` (the served
//!   value is still the source's), or `c` is `None` (nothing cached: the next
//!   read loads), or `c == s`. A check that does not agree is looked at again
//!   [`confirm`](AuditOptions::confirm) later (both reads again): the check
//!   disagrees only if the cache still holds the same value `c` and that second
//!   look does not agree either. So a write whose invalidation is on its way
//!   when the check runs does not count, as long as the invalidation lands
//!   within `confirm`.
//! - **Shared looks.** Checks of one key due within
//!   [`batch`](AuditOptions::batch) of each other share one look (one source
//!   read and one cache read, and one more each for the second look), run at
//!   the earliest due time among them: a check may run up to `batch` early,
//!   never late. Each read is still judged with the value it served.
//! - **The verdict.** A read is *consistent within M* if some check at or
//!   before `t + M` agreed; once one agrees, the read leaves the audit (later
//!   disagreements belong to later writes, and to the reads that see them).
//!   It is *inconsistent within M* if every check up to and including the one
//!   at `t + M` disagreed: the cache still disagreed with the source M after
//!   the read (and `confirm` after that). So the inconsistent counts shrink as
//!   the bound grows.
//! - **Nines.** At each bound, `checked` is the number of reads with a
//!   verdict there and `inconsistent` those inconsistent within it;
//!   [`BoundReport::nines`] is `-log10(inconsistent / checked)`. With no
//!   inconsistency seen, there is no measured figure: [`Nines::NoneSeen`]
//!   says "0 of N", which shows at least `log10(N)` nines and nothing more.
//! - **A bounded overhead.** At most [`capacity`](AuditOptions::capacity)
//!   reads are in the audit at once (more are dropped and counted in
//!   [`AuditReport::dropped`]); source reads are limited by a token bucket of
//!   [`budget`](AuditOptions::budget) reads per second (a second's worth of
//!   burst). A check that finds the bucket empty is not run: the read leaves
//!   the audit, counted in [`AuditReport::skipped`], and has no verdict at
//!   that bound or later ones. It never counts as consistent. A check whose
//!   source or cache read fails is treated the same way, counted in
//!   [`AuditReport::errors`]. The caller's path costs one random draw per read
//!   (none at a sample rate of 1) and, for a sampled read, clones of the key
//!   and value and a channel send.
//!
//! # What is not measured
//!
//! - Reads that were not sampled, reads that loaded (a miss served from the
//!   loader is the source's value, not the cache's), and values served by
//!   [`get_or_load`](Cache::get_or_load) unless the caller hands them to
//!   [`observe`](Auditor::observe) knowing they were hits.
//! - Cached "not found" entries: [`Cache::get`] and [`Cache::peek`] answer
//!   `None` for them as for a missing entry, so they are neither sampled nor
//!   told apart from an empty cache at a check.
//! - Staleness shorter than the checks can see: a read that served an old
//!   value but whose entry was replaced before the first bound is consistent
//!   within it, as the definition says; a value served once and never again is
//!   not an inconsistency the cache keeps.
//! - What the source itself gets wrong: the check is compared as the truth. It
//!   must read the primary (or a replica known to have applied every write),
//!   like the loader; a lagging replica makes the audit report the lag.
//! - Other processes' caches: the cache is read through this process's
//!   [`Cache`], its near cache included.
//!
//! # Metrics
//!
//! Through the [`metrics`] facade, labelled `cache = <namespace>`, and
//! `bound = <bound>` (`"1s"`, `"250ms"`) where it says so: counters
//! `cachet_audit_reads_total` (reads offered), `cachet_audit_samples_total`,
//! `cachet_audit_dropped_total`, `cachet_audit_skipped_total`,
//! `cachet_audit_errors_total`, `cachet_audit_source_reads_total`,
//! `cachet_audit_checked_total{bound}`, `cachet_audit_inconsistent_total{bound}`;
//! gauges `cachet_audit_pending` (reads in the audit) and
//! `cachet_audit_nines{bound}`, which with no inconsistency seen holds
//! `log10(checked)`, the most nines the reads checked can show.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cachet_core::CacheKey;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::BoxError;
use crate::{Cache, Error};

/// Settings of an [`Auditor`].
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`sample_rate`](Self::sample_rate) | 0.01 | share of the reads offered that are audited, 0 to 1 |
/// | [`bounds`](Self::bounds) | 1 s, 10 s, 60 s | the M of "inconsistent within M"; a check runs at each |
/// | [`confirm`](Self::confirm) | 100 ms | how long after a disagreeing look the second look runs |
/// | [`budget`](Self::budget) | 100 | source reads per second, at most (a second's worth of burst) |
/// | [`capacity`](Self::capacity) | 10 000 | reads in the audit at once, at most |
/// | [`batch`](Self::batch) | 10 ms | checks of one key due within this span share their looks |
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AuditOptions {
    /// Share of the reads offered that are audited, 0 to 1.
    pub sample_rate: f64,
    /// The bounds, in increasing order.
    pub bounds: Vec<Duration>,
    /// Delay of the second look at a check that disagreed; below the first
    /// bound and the gaps between bounds.
    pub confirm: Duration,
    /// Source reads per second, at most; `f64::INFINITY` for no limit.
    pub budget: f64,
    /// Reads in the audit at once, at most.
    pub capacity: usize,
    /// Checks of one key due within this span share their looks, run at the
    /// earliest due time among them (so never later than a check's own).
    pub batch: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            sample_rate: 0.01,
            bounds: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ],
            confirm: Duration::from_millis(100),
            budget: 100.0,
            capacity: 10_000,
            batch: Duration::from_millis(10),
        }
    }
}

impl AuditOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the share of reads audited.
    #[must_use]
    pub fn sample_rate(mut self, rate: f64) -> Self {
        self.sample_rate = rate;
        self
    }

    /// Sets the bounds (sorted, repeats dropped).
    #[must_use]
    pub fn bounds(mut self, bounds: impl IntoIterator<Item = Duration>) -> Self {
        let mut bounds: Vec<Duration> = bounds.into_iter().collect();
        bounds.sort_unstable();
        bounds.dedup();
        self.bounds = bounds;
        self
    }

    /// Sets the delay of the second look.
    #[must_use]
    pub fn confirm(mut self, confirm: Duration) -> Self {
        self.confirm = confirm;
        self
    }

    /// Sets the budget of source reads per second.
    #[must_use]
    pub fn budget(mut self, reads_per_second: f64) -> Self {
        self.budget = reads_per_second;
        self
    }

    /// Sets how many reads may be in the audit at once.
    #[must_use]
    pub fn capacity(mut self, reads: usize) -> Self {
        self.capacity = reads;
        self
    }

    /// Sets the span within which checks of one key share their looks.
    #[must_use]
    pub fn batch(mut self, batch: Duration) -> Self {
        self.batch = batch;
        self
    }

    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(format!(
                "the audit's sample rate must be between 0 and 1, not {}",
                self.sample_rate
            ));
        }
        let Some(&first) = self.bounds.first() else {
            return Err("the audit needs at least one bound".to_owned());
        };
        if self.bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err("the audit's bounds must increase".to_owned());
        }
        let smallest_gap = self
            .bounds
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(first, Duration::min);
        if self.confirm + self.batch >= smallest_gap {
            return Err(format!(
                "the audit's confirm delay and batch span ({:?} + {:?}) must be below the first \
                 bound and the gaps between bounds ({smallest_gap:?})",
                self.confirm, self.batch
            ));
        }
        if self.budget.is_nan() || self.budget <= 0.0 {
            return Err(format!(
                "the audit's budget must be above 0 reads per second, not {}",
                self.budget
            ));
        }
        if self.capacity == 0 {
            return Err("the audit's capacity must be at least 1 read".to_owned());
        }
        Ok(())
    }
}

/// The figures of an audit, from [`Auditor::report`] or [`Auditor::finish`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AuditReport {
    /// Reads offered to the auditor (through `get` when it returned a value,
    /// or `observe`).
    pub observed: u64,
    /// Of which those sampled.
    pub sampled: u64,
    /// Sampled reads not audited because [`capacity`](AuditOptions::capacity)
    /// reads were in the audit already, or the audit had finished.
    pub dropped: u64,
    /// Reads that left the audit because the budget had no source read left
    /// for a check: no verdict at that bound or later.
    pub skipped: u64,
    /// Reads that left the audit because a check's source or cache read
    /// failed: no verdict at that bound or later.
    pub errors: u64,
    /// Reads still in the audit.
    pub pending: u64,
    /// Source reads the checks made.
    pub source_reads: u64,
    /// The figures at each bound, in increasing order.
    pub bounds: Vec<BoundReport>,
}

impl AuditReport {
    /// The figures at `bound`, if it is one of the audit's.
    pub fn at(&self, bound: Duration) -> Option<&BoundReport> {
        self.bounds.iter().find(|b| b.bound == bound)
    }
}

/// The figures at one bound M.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BoundReport {
    /// The bound.
    pub bound: Duration,
    /// Reads with a verdict within the bound.
    pub checked: u64,
    /// Of which those inconsistent within it: every check up to M after the
    /// read disagreed.
    pub inconsistent: u64,
}

impl BoundReport {
    /// The reads consistent within the bound.
    pub fn consistent(&self) -> u64 {
        self.checked - self.inconsistent
    }

    /// The nines of consistency within the bound.
    pub fn nines(&self) -> Nines {
        match (self.checked, self.inconsistent) {
            (0, _) => Nines::NoData,
            (checked, 0) => Nines::NoneSeen { checked },
            (checked, inconsistent) => {
                // Counts below 2^53 convert exactly.
                #[allow(clippy::cast_precision_loss)]
                let share = inconsistent as f64 / checked as f64;
                Nines::Measured(-share.log10())
            }
        }
    }
}

/// Nines of consistency: `-log10` of the inconsistent share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Nines {
    /// No read was checked.
    NoData,
    /// No inconsistency among `checked` reads: no figure was measured; the
    /// reads show at least `log10(checked)` nines.
    NoneSeen {
        /// Reads checked.
        checked: u64,
    },
    /// `-log10(inconsistent / checked)`.
    Measured(f64),
}

impl Nines {
    /// The measured nines, or with no inconsistency seen the most the reads
    /// checked can show (`log10(checked)`); `None` without data.
    pub fn at_least(&self) -> Option<f64> {
        match *self {
            Nines::NoData => None,
            // Counts below 2^53 convert exactly.
            #[allow(clippy::cast_precision_loss)]
            Nines::NoneSeen { checked } => Some((checked as f64).log10()),
            Nines::Measured(n) => Some(n),
        }
    }
}

impl fmt::Display for Nines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nines::NoData => f.write_str("no data"),
            // Rounded down: 0 of 999 999 does not show 6 nines.
            Nines::NoneSeen { checked } => write!(
                f,
                "≥ {:.1} (none inconsistent of {checked})",
                (self.at_least().unwrap_or(0.0) * 10.0).floor() / 10.0
            ),
            Nines::Measured(n) => write!(f, "{n:.2}"),
        }
    }
}

/// A bound as a metric label: `1s`, `250ms`.
pub fn bound_label(bound: Duration) -> String {
    let ms = bound.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms > 0 {
        format!("{ms}ms")
    } else {
        format!("{}us", bound.as_micros())
    }
}

type CheckFuture<V> = Pin<Box<dyn Future<Output = Result<Option<V>, BoxError>> + Send>>;
type CheckFn<K, V> = Arc<dyn Fn(&K) -> CheckFuture<V> + Send + Sync>;
type EqFn<V> = Arc<dyn Fn(&V, &V) -> bool + Send + Sync>;

/// Samples reads a [`Cache`] served and reports, off the caller's path, how
/// often the cache still disagreed with the source of truth a bound after the
/// read. See the [module docs](self) for exactly what is measured.
///
/// Cloning is cheap; clones share the audit. The audit runs in a task of its
/// own, stopped when the last clone is dropped.
pub struct Auditor<K: CacheKey + ?Sized, V> {
    handle: Arc<Handle<K, V>>,
}

impl<K: CacheKey + ?Sized, V> Clone for Auditor<K, V> {
    fn clone(&self) -> Self {
        Self {
            handle: Arc::clone(&self.handle),
        }
    }
}

impl<K: CacheKey + ?Sized, V> fmt::Debug for Auditor<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auditor")
            .field("cache", &self.handle.shared.namespace)
            .field("sample_rate", &self.handle.sample_rate)
            .field("bounds", &self.handle.shared.bounds)
            .finish_non_exhaustive()
    }
}

struct Handle<K: CacheKey + ?Sized, V> {
    cache: Cache<K, V>,
    sample_rate: f64,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Msg<K::Owned, V>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K: CacheKey + ?Sized, V> Drop for Handle<K, V> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Msg<O, V> {
    Sample(Read<O, V>),
    Finish(oneshot::Sender<()>),
}

/// A sampled read in the audit.
struct Read<O, V> {
    key: O,
    served: V,
    at: Instant,
    /// The bound whose check is next.
    bound: usize,
}

/// A read waiting for its next check, ordered by due time (then arrival).
struct Due<O, V> {
    due: Instant,
    seq: u64,
    read: Read<O, V>,
}

impl<O, V> PartialEq for Due<O, V> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl<O, V> Eq for Due<O, V> {}
impl<O, V> PartialOrd for Due<O, V> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<O, V> Ord for Due<O, V> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The reads of one check, each with its verdict.
type Verdicts<O, V> = Vec<(Read<O, V>, Verdict)>;

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Agree,
    Disagree,
    /// No budget left for a source read.
    Skipped,
    /// The source or the cache could not be read.
    Failed,
}

/// The source-read budget: a token bucket holding a second's worth of reads.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: rate.max(1.0),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.rate.is_infinite() {
            return true;
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the callers' side and the audit task share: settings, counts, metrics.
struct Shared {
    namespace: String,
    bounds: Vec<Duration>,
    capacity: u64,
    closed: AtomicBool,
    observed: AtomicU64,
    sampled: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    errors: AtomicU64,
    pending: AtomicU64,
    source_reads: AtomicU64,
    checked: Vec<AtomicU64>,
    inconsistent: Vec<AtomicU64>,
    bucket: Mutex<Bucket>,
    metrics: Metrics,
}

struct Metrics {
    observed: metrics::Counter,
    sampled: metrics::Counter,
    dropped: metrics::Counter,
    skipped: metrics::Counter,
    errors: metrics::Counter,
    source_reads: metrics::Counter,
    pending: metrics::Gauge,
    checked: Vec<metrics::Counter>,
    inconsistent: Vec<metrics::Counter>,
    nines: Vec<metrics::Gauge>,
}

impl Metrics {
    fn new(cache: &str, bounds: &[Duration]) -> Self {
        let counter = |name: &'static str| metrics::counter!(name, "cache" => cache.to_owned());
        let per_bound = |name: &'static str| {
            bounds
                .iter()
                .map(|&b| {
                    metrics::counter!(name, "cache" => cache.to_owned(), "bound" => bound_label(b))
                })
                .collect()
        };
        Self {
            observed: counter("cachet_audit_reads_total"),
            sampled: counter("cachet_audit_samples_total"),
            dropped: counter("cachet_audit_dropped_total"),
            skipped: counter("cachet_audit_skipped_total"),
            errors: counter("cachet_audit_errors_total"),
            source_reads: counter("cachet_audit_source_reads_total"),
            pending: metrics::gauge!("cachet_audit_pending", "cache" => cache.to_owned()),
            checked: per_bound("cachet_audit_checked_total"),
            inconsistent: per_bound("cachet_audit_inconsistent_total"),
            nines: bounds
                .iter()
                .map(|&b| {
                    metrics::gauge!("cachet_audit_nines", "cache" => cache.to_owned(), "bound" => bound_label(b))
                })
                .collect(),
        }
    }
}

fn bump(count: &AtomicU64, metric: &metrics::Counter, n: u64) {
    count.fetch_add(n, Ordering::Relaxed);
    metric.increment(n);
}

impl Shared {
    fn leave(&self) {
        let left = self.pending.fetch_sub(1, Ordering::Relaxed) - 1;
        #[allow(clippy::cast_precision_loss)]
        self.metrics.pending.set(left as f64);
    }

    fn checked(&self, bound: usize, inconsistent: bool) {
        bump(&self.checked[bound], &self.metrics.checked[bound], 1);
        if inconsistent {
            bump(
                &self.inconsistent[bound],
                &self.metrics.inconsistent[bound],
                1,
            );
        }
        if let Some(n) = self.bound_report(bound).nines().at_least() {
            self.metrics.nines[bound].set(n);
        }
    }

    fn bound_report(&self, i: usize) -> BoundReport {
        BoundReport {
            bound: self.bounds[i],
            checked: self.checked[i].load(Ordering::Relaxed),
            inconsistent: self.inconsistent[i].load(Ordering::Relaxed),
        }
    }

    fn report(&self) -> AuditReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AuditReport {
            observed: get(&self.observed),
            sampled: get(&self.sampled),
            dropped: get(&self.dropped),
            skipped: get(&self.skipped),
            errors: get(&self.errors),
            pending: get(&self.pending),
            source_reads: get(&self.source_reads),
            bounds: (0..self.bounds.len())
                .map(|i| self.bound_report(i))
                .collect(),
        }
    }

    /// Takes one source read from the budget.
    fn take_read(&self) -> bool {
        let ok = self.bucket.lock().take();
        if ok {
            bump(&self.source_reads, &self.metrics.source_reads, 1);
        }
        ok
    }
}

impl<K, V> Auditor<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + PartialEq + Send + Sync + 'static,
{
    /// Starts auditing reads of `cache`; `check` reads a key's value from the
    /// source of truth (`Ok(None)` for "not found"), as the loader does.
    ///
    /// # Errors
    /// A [`Config`](crate::ErrorKind::Config) error when `options` are out of
    /// range (see [`AuditOptions`]).
    ///
    /// # Panics
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn spawn<F, Fut, E>(
        cache: &Cache<K, V>,
        options: AuditOptions,
        check: F,
    ) -> Result<Self, Error>
    where
        F: Fn(&K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        Self::spawn_with_eq(cache, options, check, V::eq)
    }
}

impl<K, V> Auditor<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// [`spawn`](Self::spawn) with `eq` deciding whether two values agree
    /// (for values without `PartialEq`, or to ignore fields such as a fetch
    /// time).
    ///
    /// # Errors
    /// As [`spawn`](Self::spawn).
    ///
    /// # Panics
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn spawn_with_eq<F, Fut, E>(
        cache: &Cache<K, V>,
        options: AuditOptions,
        check: F,
        eq: impl Fn(&V, &V) -> bool + Send + Sync + 'static,
    ) -> Result<Self, Error>
    where
        F: Fn(&K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        options
            .validate()
            .map_err(|m| Error::config(cache.namespace(), m))?;
        let namespace = cache.namespace().to_owned();
        let bounds = options.bounds.clone();
        let zeros = || bounds.iter().map(|_| AtomicU64::new(0)).collect();
        let shared = Arc::new(Shared {
            metrics: Metrics::new(&namespace, &bounds),
            namespace,
            capacity: u64::try_from(options.capacity).unwrap_or(u64::MAX),
            closed: AtomicBool::new(false),
            observed: AtomicU64::new(0),
            sampled: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            source_reads: AtomicU64::new(0),
            checked: zeros(),
            inconsistent: zeros(),
            bucket: Mutex::new(Bucket::new(options.budget)),
            bounds,
        });
        let check: CheckFn<K, V> = Arc::new(move |key: &K| {
            let fut = check(key);
            Box::pin(async move { fut.await.map_err(Into::into) })
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            cache: cache.clone(),
            shared: Arc::clone(&shared),
            check,
            eq: Arc::new(eq),
            confirm: options.confirm,
            batch: options.batch,
        };
        let task = tokio::spawn(task.run(rx));
        Ok(Self {
            handle: Arc::new(Handle {
                cache: cache.clone(),
                sample_rate: options.sample_rate,
                shared,
                tx,
                task,
            }),
        })
    }

    /// Reads `key` through the cache's [`get`](Cache::get) (which never
    /// loads) and offers the value, if any, to the audit.
    ///
    /// # Errors
    /// As [`Cache::get`].
    pub async fn get(&self, key: &K) -> Result<Option<V>, Error> {
        let value = self.handle.cache.get(key).await?;
        if let Some(v) = &value {
            self.observe(key, v);
        }
        Ok(value)
    }

    /// Offers a read to the audit: `served` is what the cache answered for
    /// `key` just now. Only values the cache served belong here (a hit, a
    /// stale serve, a near-cache hit), not values a loader returned.
    pub fn observe(&self, key: &K, served: &V) {
        let h = &*self.handle;
        let s = &*h.shared;
        bump(&s.observed, &s.metrics.observed, 1);
        if h.sample_rate < 1.0 && (h.sample_rate <= 0.0 || rand::random::<f64>() >= h.sample_rate) {
            return;
        }
        if s.closed.load(Ordering::Relaxed) {
            return;
        }
        bump(&s.sampled, &s.metrics.sampled, 1);
        let pending = s.pending.fetch_add(1, Ordering::Relaxed);
        if pending >= s.capacity {
            s.pending.fetch_sub(1, Ordering::Relaxed);
            bump(&s.dropped, &s.metrics.dropped, 1);
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        s.metrics.pending.set((pending + 1) as f64);
        let read = Read {
            key: key.to_owned(),
            served: served.clone(),
            at: Instant::now(),
            bound: 0,
        };
        if h.tx.send(Msg::Sample(read)).is_err() {
            s.leave();
            bump(&s.dropped, &s.metrics.dropped, 1);
        }
    }

    /// The figures so far.
    pub fn report(&self) -> AuditReport {
        self.handle.shared.report()
    }

    /// Stops sampling, waits until every read in the audit has its last
    /// verdict (up to the largest bound after the last read, plus `confirm`),
    /// and returns the final figures. Reads offered afterwards are ignored.
    pub async fn finish(&self) -> AuditReport {
        let h = &*self.handle;
        h.shared.closed.store(true, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if h.tx.send(Msg::Finish(tx)).is_ok() {
            // An error: the task is gone, and with it any read to wait for.
            let _ = rx.await;
        }
        h.shared.report()
    }
}

/// The audit's task: schedules each read's checks and counts their verdicts.
struct Task<K: ?Sized + ToOwned, V> {
    cache: Cache<K, V>,
    shared: Arc<Shared>,
    check: CheckFn<K, V>,
    eq: EqFn<V>,
    confirm: Duration,
    batch: Duration,
}

impl<K, V> Task<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg<K::Owned, V>>) {
        let mut due: BinaryHeap<Reverse<Due<K::Owned, V>>> = BinaryHeap::new();
        let mut checks: JoinSet<Verdicts<K::Owned, V>> = JoinSet::new();
        let mut seq = 0_u64;
        let mut waiters = Vec::new();
        let mut open = true;
        loop {
            if !open && due.is_empty() && checks.is_empty() {
                break;
            }
            let next = due.peek().map(|d| d.0.due);
            tokio::select! {
                biased;
                Some(done) = checks.join_next(), if !checks.is_empty() => {
                    // A check that panicked (the check function or a
                    // comparison) loses its reads: they stay pending.
                    let Ok(verdicts) = done else { continue };
                    for (read, verdict) in verdicts {
                        if let Some(read) = self.count(read, verdict) {
                            let at = read.at + self.shared.bounds[read.bound];
                            seq += 1;
                            due.push(Reverse(Due { due: at, seq, read }));
                        }
                    }
                }
                () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    let until = Instant::now() + self.batch;
                    let mut by_key: HashMap<K::Owned, Vec<Read<K::Owned, V>>> = HashMap::new();
                    while due.peek().is_some_and(|d| d.0.due <= until) {
                        let Some(Reverse(Due { read, .. })) = due.pop() else { break };
                        let key: &K = std::borrow::Borrow::borrow(&read.key);
                        by_key.entry(key.to_owned()).or_default().push(read);
                    }
                    for (_, reads) in by_key {
                        checks.spawn(self.check_group(reads));
                    }
                }
                msg = rx.recv(), if open => match msg {
                    Some(Msg::Sample(read)) => {
                        let at = read.at + self.shared.bounds[0];
                        seq += 1;
                        due.push(Reverse(Due { due: at, seq, read }));
                    }
                    Some(Msg::Finish(waiter)) => {
                        waiters.push(waiter);
                        open = false;
                    }
                    None => open = false,
                },
            }
        }
        // Samples sent after `finish` are not audited; later `finish` calls
        // find the channel closed.
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Sample(_) => {
                    self.shared.leave();
                    bump(&self.shared.dropped, &self.shared.metrics.dropped, 1);
                }
                Msg::Finish(waiter) => waiters.push(waiter),
            }
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }

    /// Counts a check's verdict; returns the read if it has a later check.
    fn count(&self, mut read: Read<K::Owned, V>, verdict: Verdict) -> Option<Read<K::Owned, V>> {
        let s = &*self.shared;
        match verdict {
            Verdict::Agree => {
                // Consistent within this bound and every later one.
                for b in read.bound..s.bounds.len() {
                    s.checked(b, false);
                }
            }
            Verdict::Disagree => {
                s.checked(read.bound, true);
                if read.bound + 1 < s.bounds.len() {
                    read.bound += 1;
                    return Some(read);
                }
            }
            Verdict::Skipped => bump(&s.skipped, &s.metrics.skipped, 1),
            Verdict::Failed => bump(&s.errors, &s.metrics.errors, 1),
        }
        s.leave();
        None
    }

    /// One check of `reads` (all of one key), with a second look for those
    /// the first one disagrees with.
    fn check_group(
        &self,
        reads: Vec<Read<K::Owned, V>>,
    ) -> impl Future<Output = Verdicts<K::Owned, V>> + Send + 'static {
        let (cache, shared, check, eq) = (
            self.cache.clone(),
            Arc::clone(&self.shared),
            Arc::clone(&self.check),
            Arc::clone(&self.eq),
        );
        let confirm = self.confirm;
        async move {
            let look = Look {
                cache: &cache,
                shared: &shared,
                check: &check,
                eq: &*eq,
            };
            let mut done = Vec::with_capacity(reads.len());
            let first = look.once(&reads[0].key).await;
            let Ok((source, cached)) = first else {
                let verdict = first.err().unwrap_or(Verdict::Failed);
                return reads.into_iter().map(|r| (r, verdict)).collect();
            };
            let mut again = Vec::new();
            for read in reads {
                if look.agrees(&read.served, source.as_ref(), cached.as_ref()) {
                    done.push((read, Verdict::Agree));
                } else {
                    again.push(read);
                }
            }
            if again.is_empty() {
                return done;
            }
            tokio::time::sleep(confirm).await;
            match look.once(&again[0].key).await {
                Err(verdict) => done.extend(again.into_iter().map(|r| (r, verdict))),
                Ok((source2, cached2)) => {
                    // The disagreement stands only if the cache still holds the
                    // value it held at the first look: a cache that moved on
                    // meanwhile (an invalidation landed) healed it.
                    let same = match (&cached, &cached2) {
                        (Some(c1), Some(c2)) => eq(c1, c2),
                        _ => false,
                    };
                    for read in again {
                        let agrees =
                            !same || look.agrees(&read.served, source2.as_ref(), cached2.as_ref());
                        let verdict = if agrees {
                            Verdict::Agree
                        } else {
                            Verdict::Disagree
                        };
                        done.push((read, verdict));
                    }
                }
            }
            done
        }
    }
}

/// What one look at a key needs.
struct Look<'a, K: ?Sized + ToOwned, V> {
    cache: &'a Cache<K, V>,
    shared: &'a Shared,
    check: &'a CheckFn<K, V>,
    eq: &'a (dyn Fn(&V, &V) -> bool + Send + Sync),
}

impl<K, V> Look<'_, K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Reads the source, then the cache: a write that lands in between finds
    /// the cache at least as far along as the source.
    async fn once(&self, key: &K::Owned) -> Result<(Option<V>, Option<V>), Verdict> {
        if !self.shared.take_read() {
            return Err(Verdict::Skipped);
        }
        let key: &K = std::borrow::Borrow::borrow(key);
        let source = (self.check)(key).await.map_err(|_| Verdict::Failed)?;
        let cached = self.cache.peek(key).await.map_err(|_| Verdict::Failed)?;
        Ok((source, cached))
    }

    /// Whether a look agrees with a read that served `served`: the source
    /// still holds it, or the cache holds nothing, or what the source holds.
    fn agrees(&self, served: &V, source: Option<&V>, cached: Option<&V>) -> bool {
        let eq = self.eq;
        source.is_some_and(|s| eq(served, s))
            || match (cached, source) {
                (None, _) => true,
                (Some(c), Some(s)) => eq(c, s),
                (Some(_), None) => false,
            }
    }
}
