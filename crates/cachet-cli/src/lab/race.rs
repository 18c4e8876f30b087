//! The `race` scenario: readers and writers on a few hot rows, with a delay
//! between a loader's database read and its fill, so a writer's invalidation
//! can land inside that window.
//!
//! Naive cache-aside then writes the value it read before the write into the
//! cache after the invalidation, and the cache keeps that stale value until its
//! TTL. The lease-guarded cache refuses such fills. After the run quiesces, the
//! scenario counts the hot rows whose cached value differs from the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Lab;
use super::report::{Latency, Row, find};
use super::source::{Db, Item};

pub(super) const NAME: &str = "race";
const NAIVE: &str = "naive cache-aside";
const LEASE: &str = "lease-guarded";

/// Bounds each reader's and writer's loop on top of the clock.
const MAX_OPS_PER_TASK: u64 = 50_000_000;
/// How long past the planned end a task may run before it is considered stuck.
const GRACE: Duration = Duration::from_secs(30);

/// Flags of the `race` scenario.
///
/// The defaults are chosen so that naive cache-aside all but surely ends with
/// stale entries, on the in-process store and on Redis + PostgreSQL alike. Its
/// stale entries are bounded by the loads in flight when writes stop (at most one
/// per reader), and such a load is stale only if its row was rewritten during its
/// delay: 32 rows keep the readers spread over many keys, and delays of up to
/// 20 ms are long enough for a rewrite to land in them even on slower backends.
#[derive(Debug, Args)]
#[command(next_help_heading = "race")]
pub(super) struct RaceArgs {
    /// Concurrent readers
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    readers: u32,
    /// Concurrent writers
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    writers: u32,
    /// Rows the readers and writers share
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    hot_rows: u64,
    /// How long writers write, in milliseconds
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    race_ms: u64,
    /// Upper bound of the random delay between a load's read and its fill, in milliseconds
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    max_delay_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    Lease,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => NAIVE,
            Strategy::Lease => LEASE,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Lease => "lease",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for strategy in [Strategy::Naive, Strategy::Lease] {
        rows.push(run_strategy(lab, strategy).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let stale = |word| {
        find(rows, NAME, word)
            .and_then(|r| r.stale_entries)
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    format!(
        "race: hot rows left holding an old value once writes stopped: naive {} \
         (a slow fill landed after the writer's invalidation), lease-guarded {} \
         (the invalidation revoked the lease, so the late fill was refused).",
        stale(NAIVE),
        stale(LEASE)
    )
}

#[derive(Debug, Default)]
struct TaskOutcome {
    reads: u64,
    writes: u64,
    errors: u64,
    latency: Option<Latency>,
}

async fn run_strategy(lab: &Lab, strategy: Strategy) -> Result<Row> {
    let a = &lab.args.race;
    lab.source.reset(a.hot_rows).await?;
    let hot_rows = i64::try_from(a.hot_rows).context("too many hot rows")?;
    let db = lab.source.counted();
    let cache = lab.cache(NAME, strategy.slug(), 1..=hot_rows)?;
    let max_delay = Duration::from_millis(a.max_delay_ms);
    let race_for = Duration::from_millis(a.race_ms);
    // Long enough for every fill begun before the last write to land, and for
    // readers to see what the cache kept.
    let settle = (max_delay * 4).max(Duration::from_millis(50));
    let started = Instant::now();
    let deadline = started + race_for + settle + GRACE;

    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_readers = Arc::new(AtomicBool::new(false));
    let mut writers = JoinSet::new();
    for w in 0..a.writers {
        let task = Task {
            cache: cache.clone(),
            db: db.clone(),
            hot_rows,
            max_delay,
            rng: StdRng::seed_from_u64(lab.seed_for("race-writer", u64::from(w))),
            stop: Arc::clone(&stop_writers),
            deadline,
        };
        writers.spawn(task.write_loop());
    }
    let mut readers = JoinSet::new();
    for r in 0..a.readers {
        let task = Task {
            cache: cache.clone(),
            db: db.clone(),
            hot_rows,
            max_delay,
            rng: StdRng::seed_from_u64(lab.seed_for("race-reader", u64::from(r))),
            stop: Arc::clone(&stop_readers),
            deadline,
        };
        readers.spawn(task.read_loop(strategy));
    }

    tokio::time::sleep(race_for).await;
    stop_writers.store(true, Ordering::Relaxed);
    let mut total = TaskOutcome {
        latency: Some(Latency::new()),
        ..TaskOutcome::default()
    };
    collect(&mut writers, &mut total).await?;
    tokio::time::sleep(settle).await;
    stop_readers.store(true, Ordering::Relaxed);
    // Readers finish the operation they are in, so every load in flight has
    // filled (or been refused) once they are all joined.
    collect(&mut readers, &mut total).await?;
    let elapsed = started.elapsed();

    let mut stale = 0;
    for id in 1..=hot_rows {
        let truth = lab.source.read(id).await?;
        match cache.peek(&id).await {
            Ok(Some(cached)) if Some(&cached) != truth.as_ref() => stale += 1,
            Ok(_) => {}
            Err(_) => total.errors += 1,
        }
    }
    lab.forget(&cache).await;

    let stats = cache.stats();
    let mut row = lab.row(NAME, strategy.name());
    row.requests = total.reads + total.writes;
    row.writes = total.writes;
    row.db_queries = db.reads();
    row.stale_entries = Some(stale);
    row.errors = total.errors;
    row.hit_rate = Some(stats.hit_rate());
    if strategy == Strategy::Lease {
        row.loads = Some(stats.loads);
        row.refused_fills = Some(stats.refused_fills);
    }
    let latency = total.latency.unwrap_or_else(Latency::new);
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

async fn collect(set: &mut JoinSet<TaskOutcome>, total: &mut TaskOutcome) -> Result<()> {
    while let Some(done) = set.join_next().await {
        let t = done.context("a race task panicked")?;
        total.reads += t.reads;
        total.writes += t.writes;
        total.errors += t.errors;
        if let (Some(sum), Some(l)) = (&mut total.latency, &t.latency) {
            sum.merge(l);
        }
    }
    Ok(())
}

struct Task {
    cache: Cache<i64, Item>,
    db: Db,
    hot_rows: i64,
    max_delay: Duration,
    rng: StdRng,
    stop: Arc<AtomicBool>,
    deadline: Instant,
}

impl Task {
    fn go_on(&self, ops: u64) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && ops < MAX_OPS_PER_TASK
            && Instant::now() < self.deadline
    }

    fn delay(&mut self) -> Duration {
        let max = u64::try_from(self.max_delay.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.rng.random_range(0..=max))
    }

    async fn read_loop(mut self, strategy: Strategy) -> TaskOutcome {
        let mut out = TaskOutcome {
            latency: Some(Latency::new()),
            ..TaskOutcome::default()
        };
        while self.go_on(out.reads) {
            let id = self.rng.random_range(1..=self.hot_rows);
            let delay = self.delay();
            let t = Instant::now();
            let read = match strategy {
                Strategy::Naive => self.naive_read(id, delay).await,
                Strategy::Lease => self.lease_read(id, delay).await,
            };
            if let Some(l) = &mut out.latency {
                l.record(t.elapsed());
            }
            out.reads += 1;
            if read.is_err() {
                out.errors += 1;
            }
            // In-process hits never wait; yielding lets writers and other
            // readers onto the worker threads.
            tokio::task::yield_now().await;
        }
        out
    }

    /// Cache-aside as commonly written: on a miss, read the database and put
    /// what was read into the cache, unconditionally.
    async fn naive_read(&self, id: i64, delay: Duration) -> Result<Option<Item>> {
        if let Some(item) = self.cache.get(&id).await? {
            return Ok(Some(item));
        }
        let item = self.db.load(id).await?;
        tokio::time::sleep(delay).await;
        if let Some(item) = &item {
            self.cache.set(&id, item.clone()).await?;
        }
        Ok(item)
    }

    async fn lease_read(&self, id: i64, delay: Duration) -> Result<Option<Item>> {
        let db = self.db.clone();
        let item = self
            .cache
            .get_or_load(&id, move || async move {
                let item = db.load(id).await?;
                tokio::time::sleep(delay).await;
                Ok::<_, sqlx::Error>(item)
            })
            .await?;
        Ok(item)
    }

    /// Writes the database, then invalidates: the order the library asks for.
    async fn write_loop(mut self) -> TaskOutcome {
        let mut out = TaskOutcome::default();
        while self.go_on(out.writes) {
            let id = self.rng.random_range(1..=self.hot_rows);
            out.writes += 1;
            let written = match self.db.bump(id).await {
                Ok(()) => self
                    .cache
                    .invalidate(&id)
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            };
            if written.is_err() {
                out.errors += 1;
            }
            // Back to back: each hot row is rewritten well within one load's
            // delay, so loads in flight when writes stop are likely to be stale.
            tokio::task::yield_now().await;
        }
        out
    }
}
