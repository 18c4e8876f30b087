//! The `refresh-ahead` scenario: a hot key set read continuously under a
//! short TTL, with slow loads.
//!
//! With a plain TTL every hot key expires once per TTL, and the next reader
//! misses and waits for the load on its own path: the source sees a load per
//! key per TTL and readers see latency spikes at each expiry. Refresh-ahead
//! (`CacheBuilder::refresh_ahead`) reloads a key read often in the background
//! shortly before it expires, and XFetch (`CacheBuilder::early_refresh`) does so
//! with a probability that rises towards expiry; either way the source sees
//! about as many loads, but readers keep hitting a fresh entry.

use std::time::Duration;

use anyhow::Result;
use cachet::RefreshAhead;
use clap::Args;
use tokio::time::Instant;

use super::report::{Row, find, format_us};
use super::workload::{ReadLoad, fill, lab_cache};
use super::{Entry, Lab};

pub(super) const NAME: &str = "refresh-ahead";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Hot keys under a short TTL: plain expiry vs refresh-ahead and XFetch";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);

/// XFetch's β: 1 is the paper's recommendation.
const XFETCH_BETA: f64 = 1.0;

/// Flags of the `refresh-ahead` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "refresh-ahead")]
pub(super) struct RefreshAheadArgs {
    /// Hot keys read continuously
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    ra_keys: u64,
    /// TTL (fresh life) of the entries, in milliseconds
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    ra_ttl_ms: u64,
    /// How long a load takes on top of its query, in milliseconds
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    ra_load_ms: u64,
    /// How long the read load runs, in milliseconds; at least three TTLs
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(150..=600_000))]
    ra_ms: u64,
    /// Reads per second of the load, started on schedule (open loop)
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    ra_rate: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Plain,
    RefreshAhead,
    XFetch,
}

impl Strategy {
    fn slug(self) -> &'static str {
        match self {
            Strategy::Plain => "plain",
            Strategy::RefreshAhead => "refresh-ahead",
            Strategy::XFetch => "xfetch",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Strategy::Plain => "plain TTL (naive)",
            Strategy::RefreshAhead => "refresh-ahead",
            Strategy::XFetch => "XFetch early refresh (beta 1)",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.refresh_ahead;
    anyhow::ensure!(
        a.ra_ms >= 3 * a.ra_ttl_ms,
        "--ra-ms ({}) must be at least three TTLs (--ra-ttl-ms {}), so that entries expire \
         several times",
        a.ra_ms,
        a.ra_ttl_ms
    );
    lab.source.reset(a.ra_keys).await?;
    let mut rows = Vec::new();
    for strategy in [Strategy::Plain, Strategy::RefreshAhead, Strategy::XFetch] {
        rows.push(run_strategy(lab, strategy).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let figure = |slug, f: fn(&Row) -> Option<String>| {
        find(rows, NAME, slug)
            .and_then(f)
            .unwrap_or_else(|| "?".to_owned())
    };
    let misses = |slug| figure(slug, |r| r.caller_misses.map(|n| n.to_string()));
    let p99 = |slug| figure(slug, |r| r.p99_us.map(format_us));
    let loads = |slug| figure(slug, |r| r.loads.map(|n| n.to_string()));
    format!(
        "refresh-ahead: hot keys read continuously under a short TTL: misses on the caller's \
         path plain TTL {} (p99 {}), refresh-ahead {} (p99 {}), XFetch {} (p99 {}); source \
         loads {}, {} and {} (the protected rows reload in the background before expiry \
         instead of making a reader wait).",
        misses("plain"),
        p99("plain"),
        misses("refresh-ahead"),
        p99("refresh-ahead"),
        misses("xfetch"),
        p99("xfetch"),
        loads("plain"),
        loads("refresh-ahead"),
        loads("xfetch"),
    )
}

async fn run_strategy(lab: &Lab, strategy: Strategy) -> Result<Row> {
    let a = &lab.args.refresh_ahead;
    let keys = 1..=i64::try_from(a.ra_keys)?;
    let ttl = Duration::from_millis(a.ra_ttl_ms);
    let duration = Duration::from_millis(a.ra_ms);
    let db = lab
        .source
        .counted()
        .slowed(Duration::from_millis(a.ra_load_ms));
    let cache = lab_cache(lab, NAME, strategy.slug(), keys.clone(), |b| {
        // No jitter: every key's expiry is one TTL after its load, so the
        // rows differ only by the refresh policy.
        let b = b.ttl(ttl).jitter(0.0);
        match strategy {
            Strategy::Plain => b,
            // Start refreshing in the last third of the fresh life a key read
            // at least twice in one TTL: every hot key of this load.
            Strategy::RefreshAhead => b.refresh_ahead(RefreshAhead::new(ttl / 3, 2, ttl)),
            Strategy::XFetch => b.early_refresh(XFETCH_BETA),
        }
    })?;
    let started = Instant::now();
    fill(&cache, &db, keys.clone()).await?;
    let load = ReadLoad {
        rate: a.ra_rate,
        duration,
        keys,
    };
    let measured = load.measure(lab, NAME, &cache, &db).await?;
    let elapsed = started.elapsed();
    lab.forget(&cache).await;

    let (misses, refreshes) = (measured.stats.misses, measured.stats.refreshes);
    let row = lab.row(NAME, strategy.slug(), strategy.name());
    let mut row = measured.into_row(row, duration);
    row.caller_misses = Some(misses);
    row.refreshes = Some(refreshes);
    Ok(row.elapsed(elapsed))
}
