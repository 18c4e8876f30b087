//! The `fail-safe` scenario: the source of truth goes down mid-run.
//!
//! Readers read a key set under a short TTL while the lab takes the source
//! down for a while (every query fails at once, see `Db::set_down`). Without
//! fail-safe, a reader of an expired key gets the load's error. With fail-safe
//! (`CacheBuilder::fail_safe`), the cache serves the last value instead, as
//! long as it is at most the configured maximum staleness past its TTL
//! (PRODUCT.md promise 3), and retries the source at most once per throttle
//! period per key. Every value the lab loads carries the time it was loaded, so
//! each read knows how far past its TTL the value it got was.

use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::report::{Latency, Row, find, format_ms};
use super::source::{Db, Item};
use super::workload::{Load, join_within, lab_cache};
use super::{Entry, Lab, expected};

pub(super) const NAME: &str = "fail-safe";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "The source of truth down mid-run, with and without fail-safe";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);

/// How long, after a failed load, a process serves the fallback of a key
/// without asking the source again.
const THROTTLE: Duration = Duration::from_millis(50);
/// Concurrent readers.
const READERS: u64 = 8;
/// How long past the planned end reads may run before they count as stuck.
const GRACE: Duration = Duration::from_secs(30);
/// The payload of a value the lab loaded: this prefix, then the milliseconds
/// from the run's origin at which the load read the row.
const LOADED_AT: &str = "loaded@";

/// Flags of the `fail-safe` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "fail-safe")]
pub(super) struct FailSafeArgs {
    /// Keys read
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    fs_keys: u64,
    /// TTL (fresh life) of the entries, in milliseconds
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    fs_ttl_ms: u64,
    /// How long the read load runs, in milliseconds
    #[arg(long, default_value_t = 1_500, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    fs_ms: u64,
    /// How long the source is down, in milliseconds, starting a third of the
    /// way into the rest of the run
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    fs_down_ms: u64,
    /// Fail-safe's maximum staleness: how long past its TTL a value may still
    /// be served when loads fail, in milliseconds
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    fs_max_stale_ms: u64,
    /// Reads per second, spread over the readers
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    fs_rate: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    FailSafe,
}

impl Strategy {
    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::FailSafe => "fail-safe",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive (errors pass through)",
            Strategy::FailSafe => "fail-safe (bounded staleness)",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.fail_safe;
    anyhow::ensure!(
        a.fs_down_ms < a.fs_ms,
        "--fs-ms ({}) must be longer than --fs-down-ms ({}), so that the readers see the \
         source come back",
        a.fs_ms,
        a.fs_down_ms
    );
    lab.source.reset(a.fs_keys).await?;
    // The failed loads the library logs meanwhile (fail-safe serving the last
    // value, in the load stage) are this scenario's doing.
    let _expected = expected::expect(&["cachet::cache::load"], "source of truth outage");
    let mut rows = Vec::new();
    for strategy in [Strategy::Naive, Strategy::FailSafe] {
        rows.push(run_strategy(lab, strategy).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(naive), Some(safe)) = (find(rows, NAME, "naive"), find(rows, NAME, "fail-safe"))
    else {
        return "fail-safe: no rows.".to_owned();
    };
    let ms = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), format_ms);
    format!(
        "fail-safe: the source of truth was down for {} mid-run: failed reads without \
         fail-safe {}, with it {} ({} reads served the last value instead, at most {} past its \
         TTL, within the configured maximum of {}).",
        ms(safe.source_down_ms),
        naive.errors,
        safe.errors,
        safe.fail_safe_serves.unwrap_or(0),
        ms(safe.max_staleness_served_ms),
        ms(safe.max_staleness_ms),
    )
}

/// What the readers of one row saw.
#[derive(Debug)]
struct Tally {
    reads: u64,
    errors: u64,
    /// The most a value read was past its TTL, in milliseconds.
    max_staleness_ms: u64,
    latency: Latency,
}

impl Tally {
    fn new() -> Self {
        Self {
            reads: 0,
            errors: 0,
            max_staleness_ms: 0,
            latency: Latency::new(),
        }
    }

    fn add(&mut self, other: &Tally) {
        self.reads += other.reads;
        self.errors += other.errors;
        self.max_staleness_ms = self.max_staleness_ms.max(other.max_staleness_ms);
        self.latency.merge(&other.latency);
    }
}

/// How one row's readers read.
#[derive(Clone, Debug)]
struct Readers {
    cache: Cache<i64, Item>,
    db: Db,
    keys: RangeInclusive<i64>,
    /// The instant load times are counted from.
    origin: Instant,
    ttl_ms: u64,
    /// Time between two reads of one reader.
    every: Duration,
    end: Instant,
}

async fn run_strategy(lab: &Lab, strategy: Strategy) -> Result<Row> {
    let a = &lab.args.fail_safe;
    let keys = 1..=i64::try_from(a.fs_keys)?;
    let ttl = Duration::from_millis(a.fs_ttl_ms);
    let max_staleness = Duration::from_millis(a.fs_max_stale_ms);
    let duration = Duration::from_millis(a.fs_ms);
    let down_for = Duration::from_millis(a.fs_down_ms);
    let db = lab.source.counted();
    let cache = lab_cache(lab, NAME, strategy.slug(), keys.clone(), |b| {
        // No jitter: a value's fresh life ends exactly one TTL after its load.
        let b = b.ttl(ttl).jitter(0.0);
        match strategy {
            Strategy::Naive => b,
            Strategy::FailSafe => b.fail_safe(max_staleness, THROTTLE),
        }
    })?;
    let origin = Instant::now();
    for id in keys.clone() {
        cache
            .get_or_load(&id, stamped(&db, origin, id))
            .await
            .with_context(|| format!("cannot warm up key {id}"))?;
    }
    let before = cache.stats();

    let start = Instant::now();
    let end = start + duration;
    let readers = Readers {
        cache: cache.clone(),
        db: db.clone(),
        keys,
        origin,
        ttl_ms: a.fs_ttl_ms,
        every: Duration::from_secs(READERS) / u32::try_from(a.fs_rate).unwrap_or(u32::MAX),
        end,
    };
    let mut tasks = JoinSet::new();
    for reader in 0..READERS {
        let rng = StdRng::seed_from_u64(lab.seed_for(NAME, reader));
        tasks.spawn(readers.clone().read(rng));
    }
    // The outage: a third of the way into the time the source is up.
    let down_at = start + (duration - down_for) / 3;
    tokio::time::sleep_until(down_at).await;
    db.set_down(true);
    tokio::time::sleep_until(down_at + down_for).await;
    db.set_down(false);
    let mut tally = Tally::new();
    join_within(&mut tasks, end, GRACE, "fail-safe readers", |done| {
        tally.add(&done.context("a fail-safe reader panicked")?);
        Ok(())
    })
    .await?;
    let elapsed = origin.elapsed();
    let stats = cache.stats().since(&before);
    lab.forget(&cache).await;

    let mut row = lab.row(NAME, strategy.slug(), strategy.name());
    row.requests = tally.reads;
    row.db_queries = db.reads();
    row.loads = Some(stats.loads);
    row.errors = tally.errors;
    row.hit_rate = Some(stats.hit_rate());
    row.source_down_ms = Some(a.fs_down_ms);
    row.max_staleness_served_ms = Some(tally.max_staleness_ms);
    if strategy == Strategy::FailSafe {
        row.fail_safe_serves = Some(stats.fail_safe_serves);
        row.max_staleness_ms = Some(a.fs_max_stale_ms);
    }
    Ok(row
        .with_latency(&tally.latency)
        .time_boxed(duration)
        .elapsed(elapsed))
}

impl Readers {
    /// Reads random keys, one every `every`, until `end`.
    async fn read(self, mut rng: StdRng) -> Tally {
        let mut tally = Tally::new();
        let mut ticks = tokio::time::interval(self.every);
        // A reader that fell behind skips the reads it missed instead of
        // bursting.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            ticks.tick().await;
            if Instant::now() >= self.end {
                return tally;
            }
            let id = rng.random_range(self.keys.clone());
            let t = Instant::now();
            let read = self
                .cache
                .get_or_load(&id, stamped(&self.db, self.origin, id))
                .await;
            tally.latency.record(t.elapsed());
            tally.reads += 1;
            match read {
                Ok(Some(item)) => {
                    let past_ttl = self.past_ttl_ms(&item);
                    tally.max_staleness_ms = tally.max_staleness_ms.max(past_ttl);
                }
                Ok(None) | Err(_) => tally.errors += 1,
            }
        }
    }

    /// How far past its TTL `item` is now, in milliseconds (0 while fresh).
    fn past_ttl_ms(&self, item: &Item) -> u64 {
        let loaded_ms = item
            .payload
            .strip_prefix(LOADED_AT)
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or(0);
        let now_ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(loaded_ms.saturating_add(self.ttl_ms))
    }
}

/// A loader of `id` whose value says when it was read: its payload is
/// replaced by [`LOADED_AT`] and the milliseconds since `origin`. The time is
/// taken before the cache stores the value, that is before its TTL starts, so
/// how far past its TTL a value is is never understated.
fn stamped(db: &Db, origin: Instant, id: i64) -> impl FnOnce() -> Load + Send + 'static {
    let db = db.clone();
    move || {
        Box::pin(async move {
            let item = db.load(id).await?;
            let at = origin.elapsed().as_millis();
            Ok(item.map(|item| Item {
                payload: format!("{LOADED_AT}{at}"),
                ..item
            }))
        })
    }
}
