//! The `outage` scenario: Redis becomes unavailable in the middle of a steady
//! read and write load, and comes back.
//!
//! Two caches run the same load at the same time, on two halves of the rows
//! and on connections of their own: one with the circuit breaker turned off
//! (`circuit_breaker(None)`), one with the library's default breaker, which
//! skips the store for a cooldown once it fails repeatedly, and keeps the
//! invalidations that failed and retries them once the store is back. Readers
//! read through `get_or_load` (a store failure falls back to the loader),
//! opened on schedule whether or not earlier reads have finished; the writer
//! updates a row, then invalidates its key.
//!
//! On the embedded default the scenario starts a private `redis-server` with an
//! append-only file, kills it (SIGKILL) mid-run and restarts it: what it had
//! acknowledged comes back, the entries whose invalidation failed during the
//! outage included. On a Redis given with `--redis-url` or `--redis-cluster`
//! it disrupts nothing unless `--allow-disruption` is passed, and then makes
//! every node hang for the outage (`CLIENT PAUSE <ms> ALL`); it never kills a
//! server it did not start.
//!
//! Each row counts failed reads (`errors`), read latency overall and of the
//! reads that started during the outage, failed invalidations, the breaker's
//! openings and skipped calls, and, once the breaker's kept invalidations have
//! drained, the keys whose cached value differs from the database.

use super::LabStore;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::{Cache, CircuitBreaker, Stats};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admin::RedisAdmin;
use super::double_delete::namespace;
use super::redis_server::ScenarioRedis;
use super::report::{Latency, Row, find, format_us};
use super::source::{Db, Item};
use super::workload::{build_cache, fill, join_within, loader};
use super::{Entry, Lab, expected};

pub(super) const NAME: &str = "outage";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Redis unavailable mid-run, with and without the circuit breaker (needs Redis)";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive (no breaker)";
const PROTECTED: &str = "protected (breaker + retried invalidations)";

/// How often the readers start the reads that are due.
const TICK: Duration = Duration::from_millis(1);
/// Operations in flight at most per row; past it, new ones wait for one to finish.
const MAX_IN_FLIGHT: usize = 512;
/// How long past the planned end reads may run before they count as stuck.
const GRACE: Duration = Duration::from_secs(30);
/// How long the breaker's kept invalidations may take to drain after the load.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of the `outage` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "outage")]
pub(super) struct OutageArgs {
    /// Keys each row reads and writes
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    outage_keys: u64,
    /// How long the load runs, in milliseconds
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    outage_ms: u64,
    /// How long Redis is unavailable, in milliseconds (killed, or paused with
    /// --allow-disruption on a Redis given on the command line)
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    outage_down_ms: u64,
    /// Reads per second of each row, started on schedule (open loop)
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    outage_read_rate: u64,
    /// Writes per second of each row (UPDATE, then invalidate)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    outage_write_rate: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    Protected,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => NAIVE,
            Strategy::Protected => PROTECTED,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Protected => "protected",
        }
    }

    fn breaker(self) -> Option<CircuitBreaker> {
        match self {
            Strategy::Naive => None,
            Strategy::Protected => Some(CircuitBreaker::default()),
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.outage;
    if a.outage_down_ms >= a.outage_ms {
        bail!(
            "--outage-ms ({}) must be longer than --outage-down-ms ({}), so that the load sees \
             Redis come back",
            a.outage_ms,
            a.outage_down_ms
        );
    }
    let pause = format!("for {} ms", a.outage_down_ms);
    let Some(mut redis) = ScenarioRedis::open_disruptive(lab, NAME, &pause).await? else {
        return Ok(Vec::new());
    };
    // The store failures, breaker openings and reconnections the library logs
    // meanwhile are this scenario's doing.
    let _expected = expected::expect(OUTAGE_TARGETS, "Redis outage");
    run_rows(lab, &mut redis).await
}

/// Where the library logs what a Redis outage does to it.
const OUTAGE_TARGETS: &[&str] = &["cachet::cache", "cachet::breaker", "cachet_redis"];

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(naive), Some(protected)) = (find(rows, NAME, "naive"), find(rows, NAME, "protected"))
    else {
        return format!("{NAME}: no result.");
    };
    let us = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), format_us);
    let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |n| n.to_string());
    format!(
        "{NAME}: Redis was unavailable for {} mid-run: failed reads without a breaker {}, with it {} \
         (a store failure falls back to the loader); reads during the outage p99 {} vs {}, max \
         {} vs {}; the breaker opened {} times and skipped {} store calls. Entries stale after \
         recovery: without a breaker {} ({} invalidations failed and nothing retried them), \
         with it {} (the invalidations of {} keys kept and retried once Redis was back).",
        us(naive.outage_ms.map(|ms| ms * 1000)),
        naive.errors,
        protected.errors,
        us(naive.outage_p99_us),
        us(protected.outage_p99_us),
        us(naive.outage_max_us),
        us(protected.outage_max_us),
        n(protected.breaker_opens),
        n(protected.short_circuits),
        n(naive.stale_entries),
        n(naive.failed_invalidations),
        n(protected.stale_entries),
        n(protected.retried_invalidations),
    )
}

/// One row's cache, rows and counters.
struct Lane {
    strategy: Strategy,
    cache: Cache<i64, Item>,
    keys: RangeInclusive<i64>,
    db: Db,
    before: Stats,
}

async fn run_rows(lab: &Lab, redis: &mut ScenarioRedis) -> Result<Vec<Row>> {
    let a = &lab.args.outage;
    let per_row = i64::try_from(a.outage_keys).context("too many keys")?;
    let target = redis.target.clone();
    lab.source.reset(2 * a.outage_keys).await?;
    let admin = match redis.server {
        Some(_) => None,
        None => Some(RedisAdmin::connect(&target).await?),
    };
    let started = Instant::now();

    let mut lanes = Vec::new();
    for (i, strategy) in [Strategy::Naive, Strategy::Protected]
        .into_iter()
        .enumerate()
    {
        let first = 1 + per_row * i64::try_from(i)?;
        let keys = first..=first + per_row - 1;
        // No near cache here: the bus would only add warnings while Redis is down.
        let store = LabStore::shared(
            target
                .connect(target.another().invalidation_bus(false))
                .await?,
        );
        let breaker = strategy.breaker();
        let cache = build_cache(namespace(lab, NAME, strategy.slug()), &store, |b| {
            b.circuit_breaker(breaker)
        })?;
        if !redis.is_private() {
            lab.written().push((cache.clone(), keys.clone()));
        }
        fill(&cache, &lab.source.counted(), keys.clone()).await?;
        lanes.push(Lane {
            strategy,
            before: cache.stats(),
            cache,
            keys,
            db: lab.source.counted(),
        });
    }

    let duration = Duration::from_millis(a.outage_ms);
    let down = Duration::from_millis(a.outage_down_ms);
    let start = Instant::now();
    let outage_at = start + (duration - down) / 3;
    let mut tasks = JoinSet::new();
    for (i, lane) in lanes.iter().enumerate() {
        let plan = Plan {
            cache: lane.cache.clone(),
            db: lane.db.clone(),
            keys: lane.keys.clone(),
            start,
            duration,
        };
        let seed = lab.seed_for(NAME, i as u64);
        let (reads, writes) = (a.outage_read_rate, a.outage_write_rate);
        tasks.spawn(async move { (i, plan.run(reads, writes, seed).await) });
    }

    // The outage.
    tokio::time::sleep_until(outage_at).await;
    let down_since = Instant::now();
    match (&mut redis.server, &admin) {
        (Some(server), _) => {
            server.kill();
            tokio::time::sleep(down).await;
            server.restart().await?;
        }
        (None, Some(admin)) => {
            admin
                .pause_all(u64::try_from(down.as_millis()).unwrap_or(u64::MAX))
                .await?;
            tokio::time::sleep(down).await;
        }
        (None, None) => bail!("no way to make Redis unavailable"),
    }
    let back_at = Instant::now();
    let window = (down_since - start)..(back_at - start);

    let mut outcomes: Vec<Option<Outcome>> = lanes.iter().map(|_| None).collect();
    join_within(
        &mut tasks,
        start + duration,
        GRACE,
        "outage loads",
        |done| {
            let (i, outcome) = done.context("an outage load panicked")?;
            outcomes[i] = Some(outcome?);
            Ok(())
        },
    )
    .await?;
    let drained = drain(&lanes).await;

    let mut rows = Vec::new();
    for (lane, outcome) in lanes.iter().zip(outcomes) {
        let outcome = outcome.context("an outage load did not report")?;
        let mut errors = outcome.read_errors;
        let (stale, unread) = lab.stale_entries(&lane.cache, lane.keys.clone()).await?;
        errors += unread;
        if !drained && lane.strategy == Strategy::Protected {
            errors += 1;
        }
        let stats = lane.cache.stats().since(&lane.before);
        let mut all = Latency::new();
        let mut during = Latency::new();
        for (at, took) in &outcome.reads {
            all.record(*took);
            if window.contains(at) {
                during.record(*took);
            }
        }
        let mut row = lab.row(NAME, lane.strategy.slug(), lane.strategy.name());
        row.store = target.kind();
        row.requests = outcome.reads.len() as u64 + outcome.writes;
        row.writes = outcome.writes;
        row.db_queries = lane.db.reads();
        row.loads = Some(stats.loads);
        row.hit_rate = Some(stats.hit_rate());
        row.errors = errors;
        row.stale_entries = Some(stale);
        row.outage_ms = Some(u64::try_from((back_at - down_since).as_millis()).unwrap_or(0));
        row.outage_p50_us = during.quantile_us(0.50);
        row.outage_p99_us = during.quantile_us(0.99);
        row.outage_max_us = during.max_us();
        row.failed_invalidations = Some(outcome.failed_invalidations);
        if lane.strategy == Strategy::Protected {
            row.breaker_opens = Some(stats.breaker_opens);
            row.short_circuits = Some(stats.short_circuits);
            row.retried_invalidations = Some(stats.retried_invalidations);
        }
        rows.push(
            row.with_latency(&all)
                .time_boxed(duration)
                .elapsed(started.elapsed()),
        );
    }
    for lane in &lanes {
        lab.forget(&lane.cache).await;
    }
    Ok(rows)
}

/// Waits until the breaker's kept invalidations have reached the store (its
/// retry runs every 100 ms once the store is back); `false` if they did not
/// within [`DRAIN_TIMEOUT`]. The breaker has no completion signal: its
/// counter is polled.
async fn drain(lanes: &[Lane]) -> bool {
    const STEP: Duration = Duration::from_millis(10);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let pending: u64 = lanes
            .iter()
            .map(|l| l.cache.stats().pending_invalidations)
            .sum();
        if pending == 0 {
            return true;
        }
        if Instant::now() > deadline {
            tracing::warn!(pending, "kept invalidations did not drain in time");
            return false;
        }
        tokio::time::sleep(STEP).await;
    }
}

/// What one row's load does.
#[derive(Clone, Debug)]
struct Plan {
    cache: Cache<i64, Item>,
    db: Db,
    keys: RangeInclusive<i64>,
    start: Instant,
    duration: Duration,
}

/// What one row's load counted.
#[derive(Debug, Default)]
struct Outcome {
    /// Each read's start (from the load's start) and latency.
    reads: Vec<(Duration, Duration)>,
    read_errors: u64,
    writes: u64,
    failed_invalidations: u64,
}

/// How one operation of the load ended.
enum Done {
    Read {
        at: Duration,
        took: Duration,
        ok: bool,
    },
    Write {
        invalidated: bool,
    },
}

impl Outcome {
    fn add(&mut self, done: Result<Result<Done>, tokio::task::JoinError>) -> Result<()> {
        match done.context("an outage operation panicked")?? {
            Done::Read { at, took, ok } => {
                self.reads.push((at, took));
                self.read_errors += u64::from(!ok);
            }
            Done::Write { invalidated } => {
                self.writes += 1;
                self.failed_invalidations += u64::from(!invalidated);
            }
        }
        Ok(())
    }
}

impl Plan {
    fn end(&self) -> Instant {
        self.start + self.duration
    }

    /// Reads and writes of random keys, each in a task of its own started on
    /// schedule (open loop, as a service's traffic is), at `read_rate` and
    /// `write_rate` per second until the end; returns once every operation
    /// finished. A write updates the row, then invalidates its key.
    async fn run(self, read_rate: u64, write_rate: u64, seed: u64) -> Result<Outcome> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Outcome::default();
        let mut ops = JoinSet::new();
        let (mut reads, mut writes) = (0_u64, 0_u64);
        let due = |rate: u64, now: Instant| {
            let elapsed = now.saturating_duration_since(self.start).as_micros();
            u64::try_from(u128::from(rate) * elapsed / 1_000_000).unwrap_or(u64::MAX)
        };
        let ticks = self.duration.as_millis().div_ceil(TICK.as_millis());
        for tick in 1..=ticks {
            let at = self.start + TICK * u32::try_from(tick).unwrap_or(u32::MAX);
            tokio::time::sleep_until(at.min(self.end())).await;
            let now = Instant::now().min(self.end());
            let (reads_due, writes_due) = (due(read_rate, now), due(write_rate, now));
            while reads < reads_due || writes < writes_due {
                while ops.len() >= MAX_IN_FLIGHT {
                    match ops.join_next().await {
                        Some(done) => out.add(done)?,
                        None => break,
                    }
                }
                let id = rng.random_range(self.keys.clone());
                let (cache, db, start) = (self.cache.clone(), self.db.clone(), self.start);
                if writes < writes_due {
                    writes += 1;
                    ops.spawn(async move {
                        db.bump(id)
                            .await
                            .with_context(|| format!("cannot update item {id}"))?;
                        let invalidated = cache.invalidate(&id).await.is_ok();
                        Ok(Done::Write { invalidated })
                    });
                } else {
                    reads += 1;
                    ops.spawn(async move {
                        let t = Instant::now();
                        let read = cache.get_or_load(&id, loader(&db, None, id)).await;
                        Ok(Done::Read {
                            at: t - start,
                            took: t.elapsed(),
                            ok: matches!(read, Ok(Some(_))),
                        })
                    });
                }
            }
            while let Some(done) = ops.try_join_next() {
                out.add(done)?;
            }
            if Instant::now() >= self.end() {
                break;
            }
        }
        join_within(&mut ops, self.end(), GRACE, "operations", |done| {
            out.add(done)
        })
        .await?;
        Ok(out)
    }
}
