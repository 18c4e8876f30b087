//! The `avalanche` scenario: keys filled together expire together.
//!
//! K keys are read into the cache at once, then a steady read load of random
//! keys runs for at least two TTL periods while every query the cache sends to
//! the source is counted per 10 ms (the warm-up fill is not counted). With a
//! fixed TTL every entry expires in the same instant, and the readers' misses
//! reach the database as one wave per period. Jittered TTLs spread the
//! expiries over the jitter's range, and every refill draws a new TTL, so the
//! waves flatten further each period. Stale-while-revalidate on top keeps the
//! same spread but takes the reloads off the readers' path: a reader of an
//! entry past its TTL gets the stale value at once while one background
//! refresh per key reloads it.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use tokio::time::Instant;

use super::report::{Row, find, format_us};
use super::workload::{ReadLoad, fill_at_once, lab_cache};
use super::{Entry, Lab};

pub(super) const NAME: &str = "avalanche";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Many keys filled at once expire at once";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const FIXED: &str = "fixed TTL";
const JITTER: &str = "jittered TTL (±30%)";
const SWR: &str = "jittered + stale-while-revalidate";

/// The jitter of the protected rows: TTLs uniform in `ttl × (1 ± 0.3)`.
const JITTER_SPREAD: f64 = 0.3;

/// Flags of the `avalanche` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "avalanche")]
pub(super) struct AvalancheArgs {
    /// Keys filled at once
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    avalanche_keys: u64,
    /// Base TTL of the entries, in milliseconds
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    avalanche_ttl_ms: u64,
    /// How long the read load runs after the fill, in milliseconds; at least
    /// two TTLs
    #[arg(long, default_value_t = 2_500, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    avalanche_ms: u64,
    /// Reads per second of the load, started on schedule (open loop)
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    avalanche_rate: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Fixed,
    Jitter,
    StaleWhileRevalidate,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Fixed => FIXED,
            Strategy::Jitter => JITTER,
            Strategy::StaleWhileRevalidate => SWR,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Strategy::Fixed => "fixed",
            Strategy::Jitter => "jitter",
            Strategy::StaleWhileRevalidate => "swr",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.avalanche;
    if a.avalanche_ms < 2 * a.avalanche_ttl_ms {
        bail!(
            "--avalanche-ms ({}) must be at least two TTLs (--avalanche-ttl-ms {}), so that \
             entries expire at least twice",
            a.avalanche_ms,
            a.avalanche_ttl_ms
        );
    }
    lab.source.reset(a.avalanche_keys).await?;
    let mut rows = Vec::new();
    for strategy in [
        Strategy::Fixed,
        Strategy::Jitter,
        Strategy::StaleWhileRevalidate,
    ] {
        rows.push(run_strategy(lab, strategy).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let peak = |word| {
        find(rows, NAME, word)
            .and_then(|r| r.peak_db_queries_per_100ms)
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    let p99 = |word| {
        find(rows, NAME, word)
            .and_then(|r| r.p99_us)
            .map_or_else(|| "?".to_owned(), format_us)
    };
    format!(
        "avalanche: most source queries in any 100 ms after many keys were filled at once: fixed \
         TTL {} (they all expire in the same instant), jittered TTL {} (expiries spread over \
         ±30%), jitter + stale-while-revalidate {} (as many reloads, but readers get the stale \
         value instead of waiting: p99 {} vs {}).",
        peak("fixed"),
        peak("jitter"),
        peak("swr"),
        p99("swr"),
        p99("jitter"),
    )
}

async fn run_strategy(lab: &Lab, strategy: Strategy) -> Result<Row> {
    let a = &lab.args.avalanche;
    let keys = 1..=i64::try_from(a.avalanche_keys)?;
    let ttl = Duration::from_millis(a.avalanche_ttl_ms);
    let duration = Duration::from_millis(a.avalanche_ms);
    let db = lab.source.counted();
    let cache = lab_cache(lab, NAME, strategy.slug(), keys.clone(), |b| {
        let b = b.ttl(ttl);
        match strategy {
            Strategy::Fixed => b.jitter(0.0),
            Strategy::Jitter => b.jitter(JITTER_SPREAD),
            // Readers come back to every key well within one TTL, so a window
            // of one TTL keeps every entry servable while it is refreshed.
            Strategy::StaleWhileRevalidate => b.jitter(JITTER_SPREAD).stale_while_revalidate(ttl),
        }
    })?;
    let started = Instant::now();
    fill_at_once(&cache, &db, keys.clone()).await?;
    let load = ReadLoad {
        rate: a.avalanche_rate,
        duration,
        keys,
    };
    let measured = load.measure(lab, NAME, &cache, &db).await?;
    let elapsed = started.elapsed();
    lab.forget(&cache).await;

    let (peak, per_100ms) = (
        measured.timeline.peak_per_100ms(),
        measured.timeline.per_100ms(),
    );
    let row = lab.row(NAME, strategy.slug(), strategy.name());
    let mut row = measured.into_row(row, duration);
    row.peak_db_queries_per_100ms = Some(peak);
    row.db_queries_per_100ms = Some(per_100ms);
    Ok(row.elapsed(elapsed))
}
