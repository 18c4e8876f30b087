//! The `near-cache` scenario: several cache instances, each with a near cache
//! (L1) in front of one Redis, one of them writing.
//!
//! Every instance has a Redis connection of its own, as separate processes
//! would. The writer updates a row, then invalidates its key; the readers read
//! Zipf-distributed keys through `get_or_load`, answered from their L1 when it
//! holds the key. Three rows:
//!
//! - *without coherence*: the writer's store has the invalidation bus off
//!   (`RedisStoreBuilder::invalidation_bus(false)`), so no notice ever reaches
//!   the readers' L1: an entry stays until its L1 TTL, longer than the run;
//! - *with coherence*: the bus on, every invalidation removes the key from
//!   every L1;
//! - *with coherence, bus disconnected mid-run*: halfway through, the readers'
//!   bus subscriptions are disconnected from the server side (`CLIENT KILL ID`
//!   of exactly the lab's own pub/sub clients: those that appeared when its
//!   readers subscribed). A near cache whose subscription breaks empties
//!   itself and bypasses L1 until it is back, and empties itself again then.
//!
//! A read is *stale* when it returns a version older than the last write that
//! had completed (UPDATE committed and `invalidate` returned) before the read
//! started; reads that overlap a write may return either version. The bus
//! delivers a notice with its `invalidate` (a lone one) or after it returns
//! (in a burst: batched for a millisecond, then one `PUBLISH`), and a reader
//! gets it some time later, so even a coherent near cache can serve the old
//! value for that long: the rows count stale reads, those that began later than a
//! delivery window (`--near-bus-window-ms`) after their write, and the longest
//! such delay. The rows also show read latency, the share of reads L1
//! answered, the bus messages per write (`PUBLISH` calls in `INFO
//! commandstats`, summed over the servers, any client's included) and how
//! often the near caches emptied themselves.
//!
//! The scenario needs Redis: the lab's, or a private `redis-server`; without
//! either it is skipped.

use super::LabStore;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::{Cache, NearCache, Stats};
use clap::Args;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use rand_distr::{Distribution as _, Zipf};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::admin::{PubSubClient, RedisAdmin};
use super::double_delete::{cache_in, cache_on_store, namespace};
use super::redis_server::{Persistence, ScenarioRedis};
use super::report::{Latency, Row, find, format_us};
use super::source::{Db, Item};
use super::workload::{build_cache, fill, join_within, loader};
use super::{Entry, LEASE_TTL, Lab};

pub(super) const NAME: &str = "near-cache";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str =
    "Near caches (L1) in several instances, with and without the invalidation bus (needs Redis)";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "L1 without coherence (naive)";
const COHERENT: &str = "L1 with coherence";
const DISCONNECTED: &str = "L1 with coherence, bus disconnected mid-run";

const ZIPF_EXPONENT: f64 = 0.99;
/// The longest an entry stays in a reader's L1: longer than any row, so that
/// without notices an entry outlives the writes to its key.
const L1_TTL: Duration = Duration::from_secs(60);
/// Concurrent readers in each reading instance.
const WORKERS_PER_READER: u32 = 4;
/// How long the readers' bus subscriptions may take to come up.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past the planned end the load's tasks may run.
const GRACE: Duration = Duration::from_secs(30);

/// Flags of the `near-cache` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "near-cache")]
pub(super) struct NearCacheArgs {
    /// Keys the instances read and write (Zipf-distributed)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    near_keys: u64,
    /// How long each row's load runs, in milliseconds
    #[arg(long, default_value_t = 1_500, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    near_ms: u64,
    /// Instances that read, each with its own connection and near cache (one more writes)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    near_readers: u32,
    /// Reads per second of each reading instance
    #[arg(long, default_value_t = 4_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    near_read_rate: u64,
    /// Writes per second of the writing instance (UPDATE, then invalidate)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    near_write_rate: u64,
    /// How long a notice may take to reach every near cache, in milliseconds:
    /// stale reads that start later than this after the write are counted
    /// apart (`stale_reads_past_window`)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    near_bus_window_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    Coherent,
    Disconnected,
}

impl Strategy {
    const ALL: [Strategy; 3] = [Strategy::Naive, Strategy::Coherent, Strategy::Disconnected];

    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => NAIVE,
            Strategy::Coherent => COHERENT,
            Strategy::Disconnected => DISCONNECTED,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Coherent => "coherent",
            Strategy::Disconnected => "disconnected",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let Some(redis) = ScenarioRedis::open(lab, Persistence::None).await? else {
        lab.skip(
            NAME,
            "the near cache needs Redis for its invalidation bus, and there is no --redis-url, \
             no --redis-cluster and no redis-server on PATH.",
        );
        return Ok(Vec::new());
    };
    let admin = RedisAdmin::connect(&redis.target).await?;
    let mut rows = Vec::new();
    for strategy in Strategy::ALL {
        if strategy == Strategy::Disconnected
            && let Err(e) = admin.pubsub_clients().await
        {
            // ACLs may forbid CLIENT: the row cannot tell its clients apart.
            tracing::warn!(error = %format!("{e:#}"),
                "cannot list the pub/sub clients; skipping the row that disconnects the bus");
            continue;
        }
        rows.push(run_strategy(lab, &redis, &admin, strategy).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(naive), Some(coherent)) = (find(rows, NAME, "naive"), find(rows, NAME, "coherent"))
    else {
        return format!("{NAME}: no result.");
    };
    let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let lag = |r: &Row| {
        r.stale_read_max_lag_us
            .map_or_else(|| "?".to_owned(), format_us)
    };
    let share = |r: &Row| {
        r.near_hit_rate
            .map_or_else(|| "?".to_owned(), |s| format!("{:.0}%", s * 100.0))
    };
    let messages = |r: &Row| {
        r.messages_per_write
            .map_or_else(|| "?".to_owned(), |m| format!("{m:.2}"))
    };
    let mut out = format!(
        "{NAME}: one instance wrote {} times while others read through their near caches \
         (L1 answered {} and {} of reads). Reads that returned a value older than a write \
         completed before they began: without coherence {} ({} of them later than the bus \
         window after the write: no notice ever reached L1); with the invalidation bus {}, \
         {} past the window (notices arrive asynchronously, batched, {} messages per write: \
         invalidate returns before other instances' L1 drop the key, and the last stale read \
         began {} after its write).",
        coherent.writes,
        share(naive),
        share(coherent),
        n(naive.stale_reads),
        n(naive.stale_reads_past_window),
        n(coherent.stale_reads),
        n(coherent.stale_reads_past_window),
        messages(coherent),
        lag(coherent),
    );
    if let Some(cut) = find(rows, NAME, "disconnected") {
        out.push_str(&format!(
            "\n{NAME}, bus disconnected mid-run: {} stale reads, {} past the window; the near \
             caches emptied themselves {} times (on the loss and on the reconnection) and \
             bypassed L1 while their subscription was down.",
            n(cut.stale_reads),
            n(cut.stale_reads_past_window),
            n(cut.near_clears),
        ));
    }
    out
}

async fn run_strategy(
    lab: &Lab,
    redis: &ScenarioRedis,
    admin: &RedisAdmin,
    strategy: Strategy,
) -> Result<Row> {
    let a = &lab.args.near_cache;
    let keys = 1..=i64::try_from(a.near_keys).context("too many keys")?;
    let target = &redis.target;
    lab.source.reset(a.near_keys).await?;
    let started = Instant::now();

    // The writer: no near cache; publishes notices only when coherent.
    let coherent = strategy != Strategy::Naive;
    let writer_store = LabStore::shared(
        target
            .connect(target.another().invalidation_bus(coherent))
            .await?,
    );
    let writer = if redis.is_private() {
        // A private server takes every key with it when it stops.
        cache_in(
            namespace(lab, NAME, strategy.slug()),
            &writer_store,
            LEASE_TTL,
        )?
    } else {
        cache_on_store(
            lab,
            NAME,
            strategy.slug(),
            keys.clone(),
            &writer_store,
            LEASE_TTL,
        )?
    };
    fill(&writer, &lab.source.counted(), keys.clone()).await?;

    // The readers, each on a connection of its own, subscribed to the bus.
    let before = match strategy {
        Strategy::Disconnected => admin.pubsub_clients().await?,
        _ => Vec::new(),
    };
    let mut readers = Vec::new();
    for _ in 0..a.near_readers {
        let store = LabStore::shared(target.connect(target.another()).await?);
        let capacity = usize::try_from(a.near_keys).unwrap_or(usize::MAX);
        readers.push(build_cache(writer.namespace().to_owned(), &store, |b| {
            b.near_cache(NearCache::new(capacity, L1_TTL))
        })?);
    }
    subscribed(&readers).await?;
    let ours: Option<Vec<PubSubClient>> = match strategy {
        Strategy::Disconnected => Some(
            admin
                .pubsub_clients()
                .await?
                .into_iter()
                .filter(|c| !before.contains(c))
                .collect(),
        ),
        _ => None,
    };

    let baseline: Vec<Stats> = readers.iter().map(Cache::stats).collect();
    // `INFO` may be forbidden by ACLs: the column is then empty.
    let published = admin.calls_of("publish").await.ok();
    let db = lab.source.counted();
    let load = Load {
        keys: keys.clone(),
        zipf: zipf(a.near_keys)?,
        done: (0..=*keys.end())
            .map(|_| Mutex::new((0, Instant::now())))
            .collect(),
        start: Instant::now(),
        duration: Duration::from_millis(a.near_ms),
        window: Duration::from_millis(a.near_bus_window_ms),
    };
    let load = Arc::new(load);
    let mut tasks = JoinSet::new();
    {
        let (load, cache, db) = (Arc::clone(&load), writer.clone(), db.clone());
        let seed = lab.seed_for(NAME, 0);
        let rate = a.near_write_rate;
        tasks.spawn(async move { load.write(&cache, &db, rate, seed).await });
    }
    for (r, reader) in readers.iter().enumerate() {
        for w in 0..WORKERS_PER_READER {
            let (load, cache, db) = (Arc::clone(&load), reader.clone(), db.clone());
            let seed = lab.seed_for(NAME, 1 + u64::from(w) + 100 * r as u64);
            let rate = a.near_read_rate.div_ceil(u64::from(WORKERS_PER_READER));
            tasks.spawn(async move { load.read(&cache, &db, rate, seed).await });
        }
    }
    let mut tally = Tally::default();
    if let Some(ours) = &ours {
        tokio::time::sleep_until(load.start + load.duration / 2).await;
        tally.errors += disconnect(admin, ours, readers.len()).await?;
    }
    join_within(
        &mut tasks,
        load.start + load.duration,
        GRACE,
        "near-cache loads",
        |done| {
            tally.add(done.context("a near-cache task panicked")?);
            Ok(())
        },
    )
    .await?;
    let published = match (published, admin.calls_of("publish").await.ok()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let elapsed = started.elapsed();
    let stats: Vec<Stats> = readers
        .iter()
        .zip(&baseline)
        .map(|(c, b)| c.stats().since(b))
        .collect();
    drop(readers);
    lab.forget(&writer).await;

    let sum = |f: fn(&Stats) -> u64| stats.iter().map(f).sum::<u64>();
    let lookups = sum(Stats::lookups);
    let mut row = lab.row(NAME, strategy.slug(), strategy.name());
    row.store = target.kind();
    row.requests = tally.reads + tally.writes;
    row.writes = tally.writes;
    row.db_queries = db.reads();
    row.loads = Some(sum(|s| s.loads));
    row.errors = tally.errors;
    row.stale_reads = Some(tally.stale);
    // Display ratios of counts far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    {
        row.hit_rate =
            (lookups > 0).then(|| sum(|s| s.hits + s.negative_hits) as f64 / lookups as f64);
        row.near_hit_rate =
            (tally.reads > 0).then(|| sum(|s| s.near_hits) as f64 / tally.reads as f64);
        row.messages_per_write = published
            .filter(|_| tally.writes > 0)
            .map(|p| p as f64 / tally.writes as f64);
    }
    row.near_clears = Some(sum(|s| s.near_clears));
    row.stale_reads_past_window = Some(tally.late);
    row.stale_read_max_lag_us = Some(tally.lag.max_us().unwrap_or(0));
    Ok(row
        .with_latency(&tally.latency)
        .time_boxed(Duration::from_millis(lab.args.near_cache.near_ms))
        .elapsed(elapsed))
}

/// Waits until every reader's bus subscription is up: a near cache empties
/// itself when its subscription comes up (counted in `near_clears`), and
/// neither reads nor fills L1 before. There is no signal for it: the counter
/// is polled.
pub(super) async fn subscribed(readers: &[Cache<i64, Item>]) -> Result<()> {
    const STEP: Duration = Duration::from_millis(5);
    let deadline = Instant::now() + SUBSCRIBE_TIMEOUT;
    while !readers.iter().all(|c| c.stats().near_clears > 0) {
        if Instant::now() > deadline {
            bail!("the near caches' bus subscriptions were not up within {SUBSCRIBE_TIMEOUT:?}");
        }
        tokio::time::sleep(STEP).await;
    }
    Ok(())
}

/// Disconnects the readers' subscriptions (`ours`, one per reader); returns the
/// errors to count: 1 if they could not be told apart from other clients.
async fn disconnect(admin: &RedisAdmin, ours: &[PubSubClient], readers: usize) -> Result<u64> {
    if ours.len() != readers {
        tracing::warn!(
            found = ours.len(),
            readers,
            "cannot tell the lab's bus subscriptions from other pub/sub clients; not \
             disconnecting anything"
        );
        return Ok(1);
    }
    let killed = admin.kill_clients(ours).await?;
    if killed == 0 {
        tracing::warn!("the lab's bus subscriptions were gone before they could be disconnected");
        return Ok(1);
    }
    Ok(0)
}

fn zipf(keys: u64) -> Result<Zipf<f64>> {
    // Zipf draws floats in 1..=n; keys fit an f64 exactly up to 2^53.
    #[allow(clippy::cast_precision_loss)]
    Zipf::new(keys as f64, ZIPF_EXPONENT)
        .with_context(|| format!("cannot draw Zipf({ZIPF_EXPONENT}) over {keys} keys"))
}

/// The load of one row, shared by its tasks.
#[derive(Debug)]
struct Load {
    keys: RangeInclusive<i64>,
    zipf: Zipf<f64>,
    /// Per key (indexed by id), the version of the last completed write and
    /// when it completed.
    done: Box<[Mutex<(u64, Instant)>]>,
    start: Instant,
    duration: Duration,
    /// Stale reads that start later than this after the write count as late.
    window: Duration,
}

/// What the tasks of one row counted.
#[derive(Debug)]
struct Tally {
    reads: u64,
    writes: u64,
    stale: u64,
    /// Stale reads that started more than the window after the write.
    late: u64,
    errors: u64,
    latency: Latency,
    /// How long after the write they missed the stale reads started.
    lag: Latency,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            reads: 0,
            writes: 0,
            stale: 0,
            late: 0,
            errors: 0,
            latency: Latency::new(),
            lag: Latency::new(),
        }
    }
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.stale += other.stale;
        self.late += other.late;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
        self.lag.merge(&other.lag);
    }
}

impl Load {
    fn end(&self) -> Instant {
        self.start + self.duration
    }

    /// At most this many operations at `rate` per second: the loops' bound on
    /// top of the clock.
    fn budget(&self, rate: u64) -> u64 {
        let planned = u128::from(rate) * self.duration.as_millis() / 1000;
        u64::try_from(planned).unwrap_or(u64::MAX).saturating_add(1)
    }

    fn key(&self, rng: &mut StdRng) -> i64 {
        // The draw is within 1..=keys, so the cast neither truncates nor wraps.
        #[allow(clippy::cast_possible_truncation)]
        let id = self.zipf.sample(rng) as i64;
        id.clamp(*self.keys.start(), *self.keys.end())
    }

    fn done(&self, id: i64) -> std::sync::MutexGuard<'_, (u64, Instant)> {
        self.done[usize::try_from(id).unwrap_or(0)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ticker(&self, rate: u64) -> tokio::time::Interval {
        let period = Duration::from_secs(1) / u32::try_from(rate.max(1)).unwrap_or(u32::MAX);
        let mut tick = tokio::time::interval_at(self.start, period.max(Duration::from_micros(50)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        tick
    }

    /// Reads at `rate` per second until the end; a read is stale when it returns
    /// a version older than the last write completed before it began.
    async fn read(&self, cache: &Cache<i64, Item>, db: &Db, rate: u64, seed: u64) -> Tally {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = self.ticker(rate);
        let mut out = Tally::default();
        for _ in 0..self.budget(rate) {
            tick.tick().await;
            if Instant::now() >= self.end() {
                break;
            }
            let id = self.key(&mut rng);
            let (floor, completed) = *self.done(id);
            let t = Instant::now();
            let read = cache.get_or_load(&id, loader(db, None, id)).await;
            out.latency.record(t.elapsed());
            out.reads += 1;
            match read {
                Ok(Some(item)) => {
                    if u64::try_from(item.value).unwrap_or(0) < floor {
                        let lag = t.saturating_duration_since(completed);
                        out.stale += 1;
                        out.late += u64::from(lag > self.window);
                        out.lag.record(lag);
                    }
                }
                _ => out.errors += 1,
            }
        }
        out
    }

    /// Writes at `rate` per second until the end: UPDATE, then invalidate; a
    /// write whose invalidation returned is complete.
    async fn write(&self, cache: &Cache<i64, Item>, db: &Db, rate: u64, seed: u64) -> Tally {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = self.ticker(rate);
        let mut out = Tally::default();
        // This task is the only writer, so it knows every row's version.
        let mut versions = vec![0_u64; self.done.len()];
        for _ in 0..self.budget(rate) {
            tick.tick().await;
            if Instant::now() >= self.end() {
                break;
            }
            let id = self.key(&mut rng);
            let i = usize::try_from(id).unwrap_or(0);
            out.writes += 1;
            if db.bump(id).await.is_err() {
                out.errors += 1;
                continue;
            }
            versions[i] += 1;
            match cache.invalidate(&id).await {
                Ok(()) => *self.done(id) = (versions[i], Instant::now()),
                Err(_) => out.errors += 1,
            }
        }
        out
    }
}
