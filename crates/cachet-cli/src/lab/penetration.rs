//! The `penetration` scenario: repeated lookups of IDs that do not exist.
//!
//! Naive cache-aside has nothing to cache for a "not found", so every lookup
//! reaches the database; negative caching stores the "not found" and answers
//! repeats from the cache.

use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::report::{Latency, Row, find};
use super::source::{Db, Item};
use super::{Lab, shares};

pub(super) const NAME: &str = "penetration";
const NAIVE: &str = "naive cache-aside";
const NEGATIVE: &str = "negative caching";

/// Rows that do exist, so the missing IDs are missing from a real table.
const EXISTING_ROWS: u64 = 1_000;
/// Missing IDs start far above the existing ones.
const FIRST_MISSING_ID: i64 = 1_000_000_001;
/// A worker still running after this long stops, and the row says so in errors.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// Flags of the `penetration` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "penetration")]
pub(super) struct PenetrationArgs {
    /// Lookups of missing IDs
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    lookups: u64,
    /// Distinct missing IDs the lookups draw from
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    missing_ids: u64,
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for negative in [false, true] {
        rows.push(run_strategy(lab, negative).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let queries =
        |word| find(rows, NAME, word).map_or_else(|| "?".to_owned(), |r| r.db_queries.to_string());
    let lookups = find(rows, NAME, "naive").map_or(0, |r| r.requests);
    format!(
        "penetration: {lookups} lookups of IDs that do not exist: naive queried the database {} \
         times, negative caching {} (once per missing ID, then the cached \"not found\").",
        queries("naive"),
        queries("negative")
    )
}

async fn run_strategy(lab: &Lab, negative: bool) -> Result<Row> {
    let a = &lab.args.penetration;
    lab.source.reset(EXISTING_ROWS).await?;
    let db = lab.source.counted();
    let (name, slug) = if negative {
        (NEGATIVE, "negative")
    } else {
        (NAIVE, "naive")
    };
    let missing = i64::try_from(a.missing_ids).context("too many missing IDs")?;
    let cache = lab.cache(
        NAME,
        slug,
        FIRST_MISSING_ID..=FIRST_MISSING_ID + missing - 1,
    )?;
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let mut tasks = JoinSet::new();
    for (w, lookups) in shares(a.lookups, lab.args.concurrency)
        .into_iter()
        .enumerate()
    {
        let (cache, db) = (cache.clone(), db.clone());
        let mut rng = StdRng::seed_from_u64(lab.seed_for(NAME, w as u64));
        tasks.spawn(async move {
            let mut latency = Latency::new();
            let (mut done, mut errors) = (0, 0);
            while done < lookups && Instant::now() < deadline {
                let id = FIRST_MISSING_ID + rng.random_range(0..missing);
                let t = Instant::now();
                if lookup(&cache, &db, id, negative).await.is_err() {
                    errors += 1;
                }
                latency.record(t.elapsed());
                done += 1;
                if done % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            // Lookups cut short by the time limit count as failed.
            (latency, done, errors + (lookups - done))
        });
    }
    let mut latency = Latency::new();
    let (mut requests, mut errors) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (l, done, e) = joined.context("a penetration worker panicked")?;
        latency.merge(&l);
        requests += done;
        errors += e;
    }
    let elapsed = started.elapsed();
    lab.forget(&cache).await;

    let stats = cache.stats();
    let mut row = lab.row(NAME, name);
    row.requests = requests;
    row.db_queries = db.reads();
    row.errors = errors;
    row.hit_rate = Some(stats.hit_rate());
    if negative {
        row.loads = Some(stats.loads);
    }
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

async fn lookup(
    cache: &Cache<i64, Item>,
    db: &Db,
    id: i64,
    negative: bool,
) -> Result<Option<Item>> {
    if negative {
        return Ok(cache
            .get_or_load(&id, {
                let db = db.clone();
                move || async move { db.load(id).await }
            })
            .await?);
    }
    if let Some(item) = cache.get(&id).await? {
        return Ok(Some(item));
    }
    // Only found rows are cached; a "not found" has no value to set.
    let item = db.load(id).await?;
    if let Some(item) = &item {
        cache.set(&id, item.clone()).await?;
    }
    Ok(item)
}
