//! The `penetration` scenario: lookups of IDs that do not exist.
//!
//! Naive cache-aside has nothing to cache for a "not found", so every lookup
//! reaches the database; negative caching stores the "not found" and answers
//! repeats from the cache. Lookups of ever new IDs (enumeration, a scraper) never
//! repeat, so negative caching cannot help them: the last two rows look up
//! random IDs that never repeat, with negative caching and with a Bloom filter
//! of the IDs that exist (rebuilt from the source first), which answers all but
//! its false positives (about 1%) without a query.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::{BloomOptions, Cache};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admin::Admin;
use super::report::{Latency, Row, find};
use super::source::{Db, Item};
use super::workload::lab_cache;
use super::{Entry, Lab, shares};

pub(super) const NAME: &str = "penetration";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Lookups of IDs that do not exist";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive cache-aside";
const NEGATIVE: &str = "negative caching";
const NEGATIVE_RANDOM: &str = "negative caching, random IDs";
const BLOOM: &str = "bloom filter, random IDs";

/// Rows that do exist, so the missing IDs are missing from a real table.
const EXISTING_ROWS: u64 = 1_000;
/// Missing IDs start far above the existing ones.
const FIRST_MISSING_ID: i64 = 1_000_000_001;
/// The never-repeating random IDs start above every repeated one.
const FIRST_RANDOM_ID: i64 = 2_000_000_001;
/// The false-positive rate the Bloom filter is sized for.
const BLOOM_FP_RATE: f64 = 0.01;
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
    for bloom in [false, true] {
        rows.push(run_random(lab, bloom).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let queries =
        |word| find(rows, NAME, word).map_or_else(|| "?".to_owned(), |r| r.db_queries.to_string());
    let lookups = find(rows, NAME, "naive").map_or(0, |r| r.requests);
    let mut out = format!(
        "penetration: {lookups} lookups of IDs that do not exist: naive queried the database {} \
         times, negative caching {} (once per missing ID, then the cached \"not found\").",
        queries("naive"),
        queries("negative")
    );
    if let (Some(negative), Some(bloom)) = (
        find(rows, NAME, "negative-random"),
        find(rows, NAME, "bloom"),
    ) {
        #[allow(clippy::cast_precision_loss)]
        let share = bloom.db_queries as f64 / bloom.requests.max(1) as f64 * 100.0;
        out.push_str(&format!(
            " Over {} random IDs that never repeat, negative caching queried {} times (no ID \
             came twice), the Bloom filter {} ({share:.1}% of lookups, its false positives).",
            bloom.requests, negative.db_queries, bloom.db_queries
        ));
    }
    out
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
    let seed = |w: usize| lab.seed_for(NAME, w as u64);
    let (latency, requests, errors) = run_lookups(lab, &cache, &db, negative, |w| {
        let mut rng = StdRng::seed_from_u64(seed(w));
        move || FIRST_MISSING_ID + rng.random_range(0..missing)
    })
    .await?;
    let elapsed = started.elapsed();
    lab.forget(&cache).await;

    let stats = cache.stats();
    let mut row = lab.row(NAME, slug, name);
    row.requests = requests;
    row.db_queries = db.reads();
    row.errors = errors;
    row.hit_rate = Some(stats.hit_rate());
    if negative {
        row.loads = Some(stats.loads);
    }
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

/// Runs the scenario's lookups on `lab.args.concurrency` workers, worker `w`
/// looking up the IDs `ids(w)` yields, until done or [`TIME_LIMIT`]; lookups
/// cut short by the time limit count as failed. Returns the latencies, the
/// lookups made and the failed ones.
async fn run_lookups<I>(
    lab: &Lab,
    cache: &Cache<i64, Item>,
    db: &Db,
    negative: bool,
    mut ids: impl FnMut(usize) -> I,
) -> Result<(Latency, u64, u64)>
where
    I: FnMut() -> i64 + Send + 'static,
{
    let deadline = Instant::now() + TIME_LIMIT;
    let mut tasks = JoinSet::new();
    for (w, lookups) in shares(lab.args.penetration.lookups, lab.args.concurrency)
        .into_iter()
        .enumerate()
    {
        let (cache, db, mut next_id) = (cache.clone(), db.clone(), ids(w));
        tasks.spawn(async move {
            let mut latency = Latency::new();
            let (mut done, mut errors) = (0, 0);
            while done < lookups && Instant::now() < deadline {
                let id = next_id();
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
    Ok((latency, requests, errors))
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

/// Lookups of IDs that never repeat, drawn in a random order from a range of
/// missing IDs, through `get_or_load` with negative caching, and with a Bloom
/// filter in front when `bloom`.
async fn run_random(lab: &Lab, bloom: bool) -> Result<Row> {
    let a = &lab.args.penetration;
    lab.source.reset(EXISTING_ROWS).await?;
    let db = lab.source.counted();
    let lookups = i64::try_from(a.lookups).context("too many lookups")?;
    let ids = FIRST_RANDOM_ID..=FIRST_RANDOM_ID + lookups - 1;
    let (name, slug) = if bloom {
        (BLOOM, "bloom")
    } else {
        (NEGATIVE_RANDOM, "negative-random")
    };
    let admin = Admin::open(lab).await?;
    let cache = lab_cache(lab, NAME, slug, ids, |b| {
        if bloom {
            b.bloom(BloomOptions::new(EXISTING_ROWS, BLOOM_FP_RATE))
        } else {
            b
        }
    })?;
    if let Some(filter) = cache.bloom() {
        // Setup, not workload: not counted in the row's queries.
        let ids = existing_ids(lab).await?;
        filter
            .rebuild(ids)
            .await
            .context("cannot build the Bloom filter")?;
    }
    let order = Permutation::new(a.lookups, lab.seed_for("penetration-random", 0));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (latency, requests, errors) = run_lookups(lab, &cache, &db, true, |_| {
        let next = Arc::clone(&next);
        move || {
            let i = next.fetch_add(1, Ordering::Relaxed);
            FIRST_RANDOM_ID + i64::try_from(order.at(i)).unwrap_or(0)
        }
    })
    .await?;
    let elapsed = started.elapsed();
    lab.forget(&cache).await;
    if let Some(filter) = cache.bloom() {
        // A `:sys:` key without a TTL: the run removes its own.
        admin
            .forget_sys_keys(&[filter.key().as_str().to_owned()])
            .await;
    }

    let stats = cache.stats();
    let mut row = lab.row(NAME, slug, name);
    row.requests = requests;
    row.db_queries = db.reads();
    row.errors = errors;
    row.hit_rate = Some(stats.hit_rate());
    row.loads = Some(stats.loads);
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

/// Every ID in the source of truth (`SELECT id FROM items`), which the Bloom
/// filter is built from.
async fn existing_ids(lab: &Lab) -> Result<Vec<i64>> {
    const SELECT_IDS: &str = "SELECT id FROM items";
    let rows: Vec<(i64,)> = if let Some(pool) = lab.source.postgres_pool() {
        sqlx::query_as(SELECT_IDS).fetch_all(pool).await
    } else if let Some(pool) = lab.source.sqlite_pool() {
        sqlx::query_as(SELECT_IDS).fetch_all(pool).await
    } else {
        bail!("the source of truth is neither PostgreSQL nor SQLite")
    }
    .context("cannot read the IDs that exist")?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// A bijection of `0..n` that looks random: `i ↦ (i·step + offset) mod n` with
/// `step` coprime to `n`, so that every index maps to a different ID.
#[derive(Clone, Copy, Debug)]
struct Permutation {
    n: u64,
    step: u64,
    offset: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let n = n.max(1);
        let mut rng = StdRng::seed_from_u64(seed);
        let offset = rng.random_range(0..n);
        // Coprime steps are dense (about 6 in 10 numbers): a few tries find one;
        // 1 is the bounded fallback.
        let step = (0..64)
            .map(|_| rng.random_range(1..n.max(2)))
            .find(|&s| gcd(s, n) == 1)
            .unwrap_or(1);
        Self { n, step, offset }
    }

    fn at(self, i: u64) -> u64 {
        let n = u128::from(self.n);
        let v = (u128::from(i % self.n) * u128::from(self.step) + u128::from(self.offset)) % n;
        // Below n, a u64.
        u64::try_from(v).unwrap_or(0)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_never_repeats() {
        for n in [1, 2, 7, 100, 1_000, 4_096] {
            let p = Permutation::new(n, n * 31);
            let mut seen: Vec<u64> = (0..n).map(|i| p.at(i)).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, n, "{p:?}");
            assert!(seen.iter().all(|&v| v < n));
        }
    }
}
