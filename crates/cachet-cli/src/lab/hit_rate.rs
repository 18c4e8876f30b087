//! The `hit-rate` scenario: a skewed (Zipf 0.99) read workload over many keys
//! with a few writes, with and without the cache.
//!
//! Both rows replay the same sequence of operations (same seed), so the
//! queries the cache saves are the reads the uncached row sent minus the loads
//! the cached row needed.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::Cache;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rand_distr::{Distribution as _, Zipf};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::report::{Latency, Row, find};
use super::source::{Db, Item};
use super::{Entry, Lab, shares};

pub(super) const NAME: &str = "hit-rate";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "A skewed read workload with a few writes";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive (no cache)";
const LEASE: &str = "lease-guarded cache";

const ZIPF_EXPONENT: f64 = 0.99;
/// A worker still running after this long stops, and the row says so in errors.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// Flags of the `hit-rate` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "hit-rate")]
pub(super) struct HitRateArgs {
    /// Distinct keys (rows) the workload draws from
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    keys: u64,
    /// Operations in all, reads and writes
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    ops: u64,
    /// Fraction of operations that write (UPDATE, then invalidate)
    #[arg(long, default_value_t = 0.01, value_parser = parse_ratio)]
    write_ratio: f64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is not between 0 and 1"))
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for cached in [false, true] {
        rows.push(run_strategy(lab, cached).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let Some(cached) = find(rows, NAME, "lease") else {
        return "hit-rate: no result.".to_owned();
    };
    let reads = cached.requests - cached.writes;
    format!(
        "hit-rate: Zipf({ZIPF_EXPONENT}) reads with {} writes: the cache answered {:.1}% of \
         lookups and spared the database {} of {reads} queries.",
        cached.writes,
        cached.hit_rate.unwrap_or(0.0) * 100.0,
        cached.db_queries_saved.unwrap_or(0),
    )
}

#[derive(Debug, Default)]
struct Totals {
    reads: u64,
    writes: u64,
    errors: u64,
}

async fn run_strategy(lab: &Lab, cached: bool) -> Result<Row> {
    let a = &lab.args.hit_rate;
    lab.source.reset(a.keys).await?;
    let db = lab.source.counted();
    let keys = i64::try_from(a.keys).context("too many keys")?;
    let cache = if cached {
        Some(lab.cache(NAME, "lease", 1..=keys)?)
    } else {
        None
    };
    // Zipf draws floats in 1..=n; keys fit an f64 exactly up to 2^53.
    #[allow(clippy::cast_precision_loss)]
    let zipf = match Zipf::new(a.keys as f64, ZIPF_EXPONENT) {
        Ok(z) => z,
        Err(e) => bail!(
            "cannot draw Zipf({ZIPF_EXPONENT}) over {} keys: {e}",
            a.keys
        ),
    };
    let write_ratio = a.write_ratio;
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let mut tasks = JoinSet::new();
    for (w, ops) in shares(a.ops, lab.args.concurrency).into_iter().enumerate() {
        let (cache, db) = (cache.clone(), db.clone());
        let mut rng = StdRng::seed_from_u64(lab.seed_for(NAME, w as u64));
        tasks.spawn(async move {
            let mut latency = Latency::new();
            let mut t = Totals::default();
            let mut done = 0;
            while done < ops && Instant::now() < deadline {
                // The draw is within 1..=keys, so the cast neither truncates nor wraps.
                #[allow(clippy::cast_possible_truncation)]
                let id = zipf.sample(&mut rng) as i64;
                let write = rng.random_bool(write_ratio);
                let started = Instant::now();
                let result = if write {
                    t.writes += 1;
                    update(cache.as_ref(), &db, id).await
                } else {
                    t.reads += 1;
                    read(cache.as_ref(), &db, id).await.map(drop)
                };
                latency.record(started.elapsed());
                if result.is_err() {
                    t.errors += 1;
                }
                done += 1;
                if done % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            t.errors += ops - done;
            (latency, t)
        });
    }
    let mut latency = Latency::new();
    let mut total = Totals::default();
    while let Some(joined) = tasks.join_next().await {
        let (l, t) = joined.context("a hit-rate worker panicked")?;
        latency.merge(&l);
        total.reads += t.reads;
        total.writes += t.writes;
        total.errors += t.errors;
    }
    let elapsed = started.elapsed();

    let (slug, name) = if cached {
        ("lease", LEASE)
    } else {
        ("naive", NAIVE)
    };
    let mut row = lab.row(NAME, slug, name);
    row.requests = total.reads + total.writes;
    row.writes = total.writes;
    row.db_queries = db.reads();
    row.errors = total.errors;
    row.db_queries_saved = Some(total.reads.saturating_sub(db.reads()));
    match &cache {
        Some(cache) => {
            lab.forget(cache).await;
            let stats = cache.stats();
            row.hit_rate = Some(stats.hit_rate());
            row.loads = Some(stats.loads);
            row.refused_fills = Some(stats.refused_fills);
        }
        // Without a cache every read is a miss.
        None => row.hit_rate = Some(0.0),
    }
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

async fn read(cache: Option<&Cache<i64, Item>>, db: &Db, id: i64) -> Result<Option<Item>> {
    match cache {
        Some(cache) => Ok(cache
            .get_or_load(&id, {
                let db = db.clone();
                move || async move { db.load(id).await }
            })
            .await?),
        None => Ok(db.load(id).await?),
    }
}

async fn update(cache: Option<&Cache<i64, Item>>, db: &Db, id: i64) -> Result<()> {
    db.bump(id).await?;
    if let Some(cache) = cache {
        cache.invalidate(&id).await?;
    }
    Ok(())
}
