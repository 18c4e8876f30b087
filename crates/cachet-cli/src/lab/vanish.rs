//! The `vanish` scenario: entries disappear behind the cache's back during a
//! steady read load, as they do when a store evicts under memory pressure,
//! restarts without persistence, or an operator deletes keys by hand.
//!
//! The cache is warmed up, then readers read random keys while a separate admin
//! path (its own Redis connection `DEL`eting entry keys the scenario wrote, or
//! `Store::invalidate` in process) deletes entries at random and, partway
//! through, all of them at once. A vanished entry is only a miss: the next
//! reader loads it again. The row shows no errors, the extra loads over a
//! baseline without vanishing, and what the refills cost readers (p99) and the
//! database (its peak).

use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::StoreKey;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;

use super::admin::Admin;
use super::report::{Row, find, format_us};
use super::workload::{ReadLoad, Timeline, fill};
use super::{Entry, Lab};

pub(super) const NAME: &str = "vanish";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Entries deleted behind the cache's back during reads";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const BASELINE: &str = "no vanishing (baseline)";
const VANISH: &str = "random + mass vanishing";

/// Reads per second of the load.
const READ_RATE: u64 = 10_000;
/// How often the admin path deletes the random entries due.
const DELETE_TICK: Duration = Duration::from_millis(10);
/// When, as a fraction of the run, every entry is deleted at once.
const MASS_AT: f64 = 0.6;

/// Flags of the `vanish` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "vanish")]
pub(super) struct VanishArgs {
    /// Keys the readers read (all cached before the load starts)
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    vanish_keys: u64,
    /// How long the read load runs, in milliseconds
    #[arg(long, default_value_t = 1_500, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    vanish_ms: u64,
    /// Entries deleted at random per second (all of them go once, at 60% of the run)
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    vanish_rate: u64,
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    lab.source.reset(lab.args.vanish.vanish_keys).await?;
    let admin = Admin::open(lab).await?;
    let mut rows = Vec::new();
    for vanishing in [false, true] {
        rows.push(run_strategy(lab, &admin, vanishing).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(base), Some(vanish)) = (find(rows, NAME, "baseline"), find(rows, NAME, "vanish"))
    else {
        return "vanish: no result.".to_owned();
    };
    let loads = |r: &Row| r.loads.unwrap_or(0);
    let p99 = |r: &Row| r.p99_us.map_or_else(|| "?".to_owned(), format_us);
    let peak = |r: &Row| {
        r.peak_db_queries_per_100ms
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    format!(
        "vanish: {} entries deleted behind the cache's back during {} reads (at random, then all \
         at once): {} errors, {} extra loads (a vanished entry read again is one miss and one \
         load), reader p99 {} vs {} and a peak of {} source queries per 100 ms vs {} without.",
        vanish.vanished.unwrap_or(0),
        vanish.requests,
        vanish.errors,
        loads(vanish).saturating_sub(loads(base)),
        p99(vanish),
        p99(base),
        peak(vanish),
        peak(base),
    )
}

async fn run_strategy(lab: &Lab, admin: &Admin, vanishing: bool) -> Result<Row> {
    let a = &lab.args.vanish;
    let keys = 1..=i64::try_from(a.vanish_keys)?;
    let duration = Duration::from_millis(a.vanish_ms);
    let db = lab.source.counted();
    let (name, slug) = if vanishing {
        (VANISH, "vanish")
    } else {
        (BASELINE, "baseline")
    };
    let cache = lab.cache(NAME, slug, keys.clone())?;
    let started = Instant::now();
    fill(&cache, &db, keys.clone()).await?;
    let before = cache.stats();

    let load = ReadLoad {
        rate: READ_RATE,
        duration,
        keys: keys.clone(),
    };
    let start = Instant::now();
    let timeline = Timeline::new(start, duration);
    let deleter = vanishing.then(|| {
        let plan = Deletions {
            admin: admin.clone(),
            store_keys: keys.clone().map(|k| cache.store_key(&k)).collect(),
            rate: a.vanish_rate,
            start,
            duration,
            rng: StdRng::seed_from_u64(lab.seed_for(NAME, u64::MAX)),
        };
        tokio::spawn(plan.run())
    });
    let reads = load.run(lab, NAME, &cache, &db, &timeline, start).await;
    let vanished = match deleter {
        Some(task) => Some(task.await.context("the admin path panicked")??),
        None => None,
    };
    let outcome = reads?;
    let elapsed = started.elapsed();
    let stats = cache.stats().since(&before);
    lab.forget(&cache).await;

    let mut row = lab.row(NAME, slug, name);
    row.requests = outcome.reads;
    row.db_queries = timeline.total();
    row.loads = Some(stats.loads);
    row.errors = outcome.errors;
    row.hit_rate = Some(stats.hit_rate());
    row.vanished = Some(vanished.unwrap_or(0));
    row.peak_db_queries_per_100ms = Some(timeline.peak_per_100ms());
    row.db_queries_per_100ms = Some(timeline.per_100ms());
    Ok(row
        .with_latency(&outcome.latency)
        .time_boxed(duration)
        .elapsed(elapsed))
}

/// The admin path's plan: random deletions at a steady rate, and all entries
/// at once at [`MASS_AT`] of the run.
struct Deletions {
    admin: Admin,
    store_keys: Vec<StoreKey>,
    rate: u64,
    start: Instant,
    duration: Duration,
    rng: StdRng,
}

impl Deletions {
    /// Runs the plan until the end of the load; returns the entries deleted.
    async fn run(mut self) -> Result<u64> {
        let end = self.start + self.duration;
        let mass_at = self.start + self.duration.mul_f64(MASS_AT);
        let ticks = self.duration.as_millis() / DELETE_TICK.as_millis();
        let (mut deleted, mut due, mut mass_done) = (0_u64, 0_u64, false);
        let mut batch = Vec::new();
        for tick in 1..=ticks {
            let at = self.start + DELETE_TICK * u32::try_from(tick).unwrap_or(u32::MAX);
            tokio::time::sleep_until(at).await;
            if Instant::now() >= end {
                break;
            }
            if !mass_done && Instant::now() >= mass_at {
                self.admin.delete_entries(&self.store_keys).await?;
                deleted += self.store_keys.len() as u64;
                mass_done = true;
                continue;
            }
            // Deletions due by now at the steady rate, less those done.
            let target = u64::try_from(
                u128::from(self.rate) * at.duration_since(self.start).as_millis() / 1000,
            )
            .unwrap_or(u64::MAX);
            batch.clear();
            while due < target && !self.store_keys.is_empty() {
                let i = self.rng.random_range(0..self.store_keys.len());
                batch.push(self.store_keys[i].clone());
                due += 1;
            }
            self.admin.delete_entries(&batch).await?;
            deleted += batch.len() as u64;
        }
        Ok(deleted)
    }
}
