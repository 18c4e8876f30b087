//! The `stampede` scenario: many callers miss one cold key at the same moment,
//! and its load is slow.
//!
//! Naive cache-aside sends every caller to the database; the single-flight
//! cache lets one caller load while the others wait for its result.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use clap::Args;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Lab;
use super::report::{Latency, Row, find};
use super::source::{Db, Item};

pub(super) const NAME: &str = "stampede";
const NAIVE: &str = "naive cache-aside";
const SINGLE_FLIGHT: &str = "single-flight (lease)";

/// The one key every caller asks for.
const KEY: i64 = 1;
/// A caller still waiting after this long counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of the `stampede` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "stampede")]
pub(super) struct StampedeArgs {
    /// Concurrent callers of the cold key
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    callers: u32,
    /// How long a load takes on top of its query, in milliseconds
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    load_ms: u64,
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for single_flight in [false, true] {
        rows.push(run_strategy(lab, single_flight).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let queries =
        |word| find(rows, NAME, word).map_or_else(|| "?".to_owned(), |r| r.db_queries.to_string());
    let callers = find(rows, NAME, "naive").map_or(0, |r| r.requests);
    format!(
        "stampede: {callers} callers missed one cold key at once: naive sent {} queries to the \
         database, single-flight {} (the others waited for that one load).",
        queries("naive"),
        queries("single-flight")
    )
}

async fn run_strategy(lab: &Lab, single_flight: bool) -> Result<Row> {
    let a = &lab.args.stampede;
    lab.source.reset(1).await?;
    let db = lab.source.counted();
    let (name, slug) = if single_flight {
        (SINGLE_FLIGHT, "single-flight")
    } else {
        (NAIVE, "naive")
    };
    let cache = lab.cache(NAME, slug, KEY..=KEY)?;
    let load_time = Duration::from_millis(a.load_ms);
    let callers = usize::try_from(a.callers).context("too many callers")?;
    // Everyone starts together, or the first fill would turn late callers into hits.
    let barrier = Arc::new(Barrier::new(callers));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let (cache, db, barrier) = (cache.clone(), db.clone(), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            let t = Instant::now();
            let call = call(&cache, &db, load_time, single_flight);
            let ok = matches!(tokio::time::timeout(CALL_TIMEOUT, call).await, Ok(Ok(_)));
            (t.elapsed(), ok)
        });
    }
    let mut latency = Latency::new();
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (elapsed, ok) = done.context("a stampede caller panicked")?;
        latency.record(elapsed);
        if !ok {
            errors += 1;
        }
    }
    let elapsed = started.elapsed();
    lab.forget(&cache).await;

    let mut row = lab.row(NAME, name);
    row.requests = u64::from(a.callers);
    row.db_queries = db.reads();
    row.errors = errors;
    if single_flight {
        row.loads = Some(cache.stats().loads);
    }
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

async fn call(
    cache: &Cache<i64, Item>,
    db: &Db,
    load_time: Duration,
    single_flight: bool,
) -> Result<Option<Item>> {
    let db = db.clone();
    let load = move || async move {
        let item = db.load(KEY).await?;
        tokio::time::sleep(load_time).await;
        Ok::<_, sqlx::Error>(item)
    };
    if single_flight {
        return Ok(cache.get_or_load(&KEY, load).await?);
    }
    if let Some(item) = cache.get(&KEY).await? {
        return Ok(Some(item));
    }
    let item = load().await?;
    if let Some(item) = &item {
        cache.set(&KEY, item.clone()).await?;
    }
    Ok(item)
}
