//! The `chaos` scenario: a mixed load while Redis is killed and restarted,
//! paused, and the source of truth restarted, at times drawn from the seed.
//!
//! Two lanes run the same load at the same time, through the same faults, each
//! in a namespace of its own: several reading instances and one writing
//! instance, every one on a Redis connection of its own, as separate processes
//! would. Readers read uniformly drawn keys; writers UPDATE a row, then
//! invalidate it (every fourth write through its group instead).
//!
//! - *naive*: plain cache-aside (`get`, on a miss read the source and `set`),
//!   no circuit breaker, no near cache, no invalidation bus; a store error
//!   reaches the caller;
//! - *protected*: `get_or_load` (leases), the default circuit breaker, a near
//!   cache in every reader with the invalidation bus, groups and fail-safe.
//!
//! The faults, one at a time, each in its own share of the run: the private
//! `redis-server` killed (SIGKILL) and restarted on its port with its
//! append-only file (on a Redis given on the command line, with
//! `--allow-disruption`, not killed: only paused), Redis paused (`CLIENT
//! PAUSE`), and the source down (`Db::set_down`) as during a restart. Writers
//! hold their writes from shortly before the source goes down until it is back,
//! as before a planned database restart; once the writes in progress complete,
//! each lane reads every key back into its cache, so that no read meets a key
//! just invalidated that cannot be loaded, however slow the machine.
//!
//! A read is stale past the window when it returns a version older than a write
//! whose invalidation returned more than the bus window before the read began
//! (the near-cache scenario's measure). A write is lost when the UPDATE was
//! acknowledged but the row does not hold it at the end.
//!
//! A third lane writes through write-behind (on a single Redis node): one
//! writer queues versioned writes of keys of its own, without holding them
//! while the source is down, and a flusher in this process applies the queue
//! to the source, retrying while it is down. Once the load ends and the queue
//! is drained, a write acknowledged by write-behind is lost when its key's row
//! holds an older version.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::write_behind::{Sink, Write, WriteBehind, WriteOutcome};
use cachet::{BoxError, Cache, CircuitBreaker, NearCache, Stats};
use clap::Args;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::admin::{Admin, RedisAdmin};
use super::double_delete::namespace;
use super::near_cache::subscribed;
use super::redis_server::ScenarioRedis;
use super::report::{Latency, Row, find, format_us};
use super::source::{Db, Item};
use super::workload::{build_cache, fill, join_within, loader};
use super::write_behind::{self, FLUSHER_BLOCK, FLUSHER_MAX_BACKOFF};
use super::{Entry, Lab, LabStore, expected};

pub(super) const NAME: &str = "chaos";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str =
    "Redis killed, paused and the source restarted under a mixed load (needs Redis)";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);

/// Keys each lane reads and writes (uniformly drawn).
const KEYS: i64 = 50;
/// Reading instances per lane, each with its own connection (and near cache).
const READERS: u32 = 3;
/// Concurrent readers in each reading instance.
const WORKERS_PER_READER: u32 = 2;
/// Reads per second of each reading instance.
const READ_RATE: u64 = 600;
/// Writer tasks per lane, each owning its share of the keys.
const WRITERS: i64 = 2;
/// Writes per second of each writer task.
const WRITE_RATE: u64 = 10;
/// Writes per second of the write-behind lane's writer.
const BEHIND_RATE: u64 = 40;
/// Every this many writes, the invalidation goes through the key's group.
const GROUP_EVERY: u64 = 4;
/// Groups (tenants) the protected lane's keys fall into.
const TENANTS: i64 = 10;
/// How long an invalidation notice may take to reach every near cache.
const BUS_WINDOW: Duration = Duration::from_millis(100);
/// The protected lane's bus heartbeat: while Redis is paused no notice
/// arrives, and the readers' near caches empty themselves within two
/// heartbeats of the pause, inside [`BUS_WINDOW`].
const BUS_HEARTBEAT: Duration = Duration::from_millis(25);
/// How long an entry stays in a near cache: longer than any run.
const L1_TTL: Duration = Duration::from_secs(60);
const FAIL_SAFE_MAX_STALENESS: Duration = Duration::from_secs(5);
const FAIL_SAFE_THROTTLE: Duration = Duration::from_millis(50);
/// How long past the planned end the load may run before it counts as stuck.
const GRACE: Duration = Duration::from_secs(30);
/// Where the library logs what the staged faults do to it.
const FAULT_TARGETS: &[&str] = &["cachet", "cachet_redis"];

/// Flags of the `chaos` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "chaos")]
pub(super) struct ChaosArgs {
    /// How long the mixed load runs, in milliseconds (the faults fall within it)
    #[arg(long, default_value_t = 8_000, value_parser = clap::value_parser!(u64).range(3_000..=600_000))]
    chaos_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    Protected,
}

impl Strategy {
    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Protected => "protected",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive (GET/SET, no breaker, no bus)",
            Strategy::Protected => "protected (leases, breaker, near cache + bus, fail-safe)",
        }
    }
}

/// A staged fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The private redis-server killed (SIGKILL), then restarted.
    Kill,
    /// Every Redis node paused (`CLIENT PAUSE`).
    Pause,
    /// The source of truth down.
    SourceDown,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Pause => "pause",
            Kind::SourceDown => "db-down",
        }
    }

    /// How long the fault lasts, at most.
    fn nominal(self) -> Duration {
        match self {
            Kind::Kill => Duration::from_millis(300),
            Kind::Pause => Duration::from_millis(1_000),
            Kind::SourceDown => Duration::from_millis(500),
        }
    }
}

/// A fault as planned: when from the load's start, and for how long; writes
/// are held for `lead` before it (source restarts only).
#[derive(Clone, Copy, Debug)]
struct Fault {
    kind: Kind,
    at: Duration,
    lead: Duration,
    length: Duration,
}

/// The faults of a run of `duration`, drawn from `seed`: each kind once, in a
/// drawn order, each at a drawn time within its own equal share of the run
/// (past a 5% start, before the last 10%), so they never overlap and Redis has
/// a fifth of its share to come back before the next.
fn schedule(seed: u64, duration: Duration, kinds: &[Kind]) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds = kinds.to_vec();
    kinds.shuffle(&mut rng);
    let first = duration / 20;
    let slot = (duration - first - duration / 10) / u32::try_from(kinds.len().max(1)).unwrap_or(1);
    let mut at = first;
    let mut out = Vec::new();
    for kind in kinds {
        let length = kind.nominal().min(slot * 9 / 20);
        let lead = match kind {
            Kind::SourceDown => Duration::from_millis(500).min(slot / 4),
            Kind::Kill | Kind::Pause => Duration::ZERO,
        };
        let room = slot.saturating_sub(lead + length + slot / 5);
        let jitter = rng.random_range(0..=room.as_millis().try_into().unwrap_or(0_u64));
        out.push(Fault {
            kind,
            at: at + lead + Duration::from_millis(jitter),
            lead,
            length,
        });
        at += slot;
    }
    out
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let Some(mut redis) = ScenarioRedis::open_disruptive(lab, NAME, "for about a second").await?
    else {
        return Ok(Vec::new());
    };
    let _expected = expected::expect(FAULT_TARGETS, "chaos: Redis and source faults");
    run_lanes(lab, &mut redis).await
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(naive), Some(protected)) = (find(rows, NAME, "naive"), find(rows, NAME, "protected"))
    else {
        return format!("{NAME}: no result.");
    };
    let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let us = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), format_us);
    let behind = find(rows, NAME, "write-behind").map_or_else(
        || " Write-behind was not part of the load (it needs a single Redis node).".to_owned(),
        |b| {
            format!(
                " Write-behind: {} writes acknowledged ({} while the source was down), {} \
                 lost, {} failed while Redis was away.",
                n(b.acknowledged),
                n(b.acknowledged_while_source_down),
                n(b.lost_writes),
                b.errors,
            )
        },
    );
    format!(
        "{NAME}: {}; errors surfaced to readers naive {} vs protected {}; stale reads past \
         the bus window {} vs {}; lost writes {} vs {}; read p99 during faults {} vs {} (outside \
         {} vs {}).{behind}",
        protected
            .strategy
            .split_once("; ")
            .map_or("no faults", |(_, faults)| faults),
        naive.errors,
        protected.errors,
        n(naive.stale_reads_past_window),
        n(protected.stale_reads_past_window),
        n(naive.lost_writes),
        n(protected.lost_writes),
        us(naive.outage_p99_us),
        us(protected.outage_p99_us),
        us(naive.p99_us),
        us(protected.p99_us),
    )
}

/// What one lane's tasks share.
#[derive(Debug)]
struct Lane {
    strategy: Strategy,
    db: Db,
    /// The lane's keys are `base + 1..=base + KEYS`, its rows of the source.
    base: i64,
    start: Instant,
    end: Instant,
    /// Per key (indexed by id less `base`), the version of the last completed write (its
    /// invalidation returned) and when it completed.
    done: Box<[Mutex<(u64, Instant)>]>,
    /// Per key, the UPDATEs acknowledged to the writers.
    acknowledged: Box<[Mutex<u64>]>,
    /// Holds writes around a source restart.
    hold: Arc<Hold>,
}

/// Holds the cache-aside writers around a source restart.
#[derive(Debug, Default)]
struct Hold {
    held: AtomicBool,
    /// Shared by each write in progress, taken by [`hold`](Self::hold) to
    /// wait for them.
    writes: tokio::sync::RwLock<()>,
}

impl Hold {
    /// Starts a write, unless writes are held: the guard keeps
    /// [`hold`](Self::hold) waiting until the write completes.
    async fn write(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let writing = self.writes.read().await;
        (!self.held.load(Ordering::SeqCst)).then_some(writing)
    }

    /// Holds writes, and returns once those in progress completed.
    async fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
        drop(self.writes.write().await);
    }

    fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

/// What a lane's tasks counted.
#[derive(Debug)]
struct Tally {
    /// Each read's start (from the load's start) and latency.
    reads: Vec<(Duration, Duration)>,
    read_errors: u64,
    writes: u64,
    failed_writes: u64,
    failed_invalidations: u64,
    stale: u64,
    late: u64,
    lag: Latency,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            reads: Vec::new(),
            read_errors: 0,
            writes: 0,
            failed_writes: 0,
            failed_invalidations: 0,
            stale: 0,
            late: 0,
            lag: Latency::new(),
        }
    }
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.reads.extend(other.reads);
        self.read_errors += other.read_errors;
        self.writes += other.writes;
        self.failed_writes += other.failed_writes;
        self.failed_invalidations += other.failed_invalidations;
        self.stale += other.stale;
        self.late += other.late;
        self.lag.merge(&other.lag);
    }
}

/// The settings of the protected lane's caches, readers and writer alike (the
/// near cache is the readers' own).
fn protected(b: cachet::CacheBuilder<i64, Item>) -> cachet::CacheBuilder<i64, Item> {
    b.circuit_breaker(Some(CircuitBreaker::default()))
        .group_by(|id: &i64| id % TENANTS)
        .fail_safe(FAIL_SAFE_MAX_STALENESS, FAIL_SAFE_THROTTLE)
}

/// One lane's caches: its writer and its readers, each on a connection of its own.
async fn caches(
    lab: &Lab,
    redis: &ScenarioRedis,
    strategy: Strategy,
) -> Result<(Cache<i64, Item>, Vec<Cache<i64, Item>>)> {
    let target = &redis.target;
    let ns = namespace(lab, NAME, strategy.slug());
    let bus = strategy == Strategy::Protected;
    let build = |store: &LabStore, near: bool| {
        build_cache(ns.clone(), store, |b| match strategy {
            Strategy::Naive => b.circuit_breaker(None),
            Strategy::Protected if near => {
                protected(b).near_cache(NearCache::new(KEYS as usize, L1_TTL))
            }
            Strategy::Protected => protected(b),
        })
    };
    let mut caches = Vec::new();
    for i in 0..=READERS {
        let store = target
            .connect(
                target
                    .another()
                    .invalidation_bus(bus)
                    .bus_heartbeat(BUS_HEARTBEAT),
            )
            .await?;
        caches.push(build(&LabStore::shared(store), i > 0)?);
    }
    let writer = caches.remove(0);
    if !redis.is_private() {
        let base = lane_base(strategy);
        lab.written().push((writer.clone(), base + 1..=base + KEYS));
    }
    if bus {
        subscribed(&caches).await?;
    }
    Ok((writer, caches))
}

/// The lane's keys start past this one: the lanes write rows of their own.
fn lane_base(strategy: Strategy) -> i64 {
    match strategy {
        Strategy::Naive => 0,
        Strategy::Protected => KEYS,
    }
}

/// A lane as built: its strategy, writer, readers and their stats before the load.
type Built = (
    Strategy,
    Cache<i64, Item>,
    Vec<Cache<i64, Item>>,
    Vec<Stats>,
);

async fn run_lanes(lab: &Lab, redis: &mut ScenarioRedis) -> Result<Vec<Row>> {
    let duration = Duration::from_millis(lab.args.chaos.chaos_ms);
    let kinds: &[Kind] = if redis.is_private() {
        &[Kind::Kill, Kind::Pause, Kind::SourceDown]
    } else {
        &[Kind::Pause, Kind::SourceDown]
    };
    let faults = schedule(lab.seed_for(NAME, u64::MAX), duration, kinds);
    lab.source.reset(3 * u64::try_from(KEYS)?).await?;
    let started = Instant::now();
    let hold = Arc::new(Hold::default());
    let mut built: Vec<Built> = Vec::new();
    for strategy in [Strategy::Naive, Strategy::Protected] {
        let (writer, readers) = caches(lab, redis, strategy).await?;
        let base = lane_base(strategy);
        fill(&writer, &lab.source.counted(), base + 1..=base + KEYS).await?;
        let before = readers.iter().map(Cache::stats).collect();
        built.push((strategy, writer, readers, before));
    }

    let behind = Behind::open(lab, redis).await?;

    let start = Instant::now();
    let behind_writer = behind.as_ref().map(|b| {
        let writer = b.writer(start, duration);
        let seed = lab.seed_for(NAME, 9_999);
        tokio::spawn(async move { writer.write(seed).await })
    });
    let mut tasks = JoinSet::new();
    let mut lanes = Vec::new();
    for (l, (strategy, writer, readers, _)) in built.iter().enumerate() {
        let lane = Arc::new(Lane {
            strategy: *strategy,
            db: lab.source.counted(),
            base: lane_base(*strategy),
            start,
            end: start + duration,
            done: (0..=KEYS).map(|_| Mutex::new((0, start))).collect(),
            acknowledged: (0..=KEYS).map(|_| Mutex::new(0)).collect(),
            hold: Arc::clone(&hold),
        });
        let seed = |task: u64| lab.seed_for(NAME, task + 1000 * l as u64);
        for w in 0..WRITERS {
            let (lane, cache) = (Arc::clone(&lane), writer.clone());
            let seed = seed(w.unsigned_abs());
            tasks.spawn(async move { (l, lane.write(&cache, w, seed).await) });
        }
        for (r, reader) in readers.iter().enumerate() {
            for w in 0..WORKERS_PER_READER {
                let (lane, cache) = (Arc::clone(&lane), reader.clone());
                let seed = seed(100 + u64::from(w) + 10 * r as u64);
                tasks.spawn(async move { (l, lane.read(&cache, seed).await) });
            }
        }
        lanes.push(lane);
    }

    let mut sources: Vec<&Db> = lanes.iter().map(|l| &l.db).collect();
    sources.extend(behind.as_ref().map(|b| &b.db));
    let writers: Vec<(&Lane, &Cache<i64, Item>)> = lanes
        .iter()
        .zip(&built)
        .map(|(lane, (_, writer, _, _))| (&**lane, writer))
        .collect();
    let windows = stage(redis, &faults, &hold, &writers, &sources, start).await?;
    let mut tallies: Vec<Tally> = built.iter().map(|_| Tally::default()).collect();
    join_within(&mut tasks, start + duration, GRACE, "chaos loads", |done| {
        let (l, tally) = done.context("a chaos task panicked")?;
        tallies[l].add(tally);
        Ok(())
    })
    .await?;
    let behind_tally = match behind_writer {
        Some(task) => Some(
            tokio::time::timeout_at(start + duration + GRACE, task)
                .await
                .context("the write-behind writer is stuck")?
                .context("the write-behind writer panicked")?,
        ),
        None => None,
    };
    if let Some(behind) = &behind {
        behind.drain().await?;
    }

    let plan = faults
        .iter()
        .map(|f| format!("{}@{:.1}s", f.kind.label(), f.at.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" ");
    let items = lab.source.items().await?;
    let mut rows = Vec::new();
    for ((lane, built), tally) in lanes.iter().zip(&built).zip(&tallies) {
        let mut row = lane.row(lab, built, tally, &windows, &plan, &items);
        row.store = redis.target.kind();
        rows.push(row.time_boxed(duration).elapsed(started.elapsed()));
    }
    if let Some(behind) = behind {
        if let Some(tally) = &behind_tally {
            let mut row = behind.row(lab, tally, &windows, &plan, &items);
            row.store = redis.target.kind();
            rows.push(row.time_boxed(duration).elapsed(started.elapsed()));
        }
        behind.close(lab, redis).await;
    }
    for (strategy, writer, _, _) in &built {
        lab.forget(writer).await;
        // Group generations are `:sys:` keys without a TTL: the run removes
        // its own from a Redis it was given.
        if *strategy == Strategy::Protected && !redis.is_private() {
            let generations: Vec<String> = (0..TENANTS)
                .map(|t| writer.layout().group_key(&t).as_str().to_owned())
                .collect();
            Admin::open(lab).await?.forget_sys_keys(&generations).await;
        }
    }
    Ok(rows)
}

/// A fault as it happened: its kind, and when it made Redis or the source
/// unavailable, from the load's start.
type Window = (Kind, Range<Duration>);

/// Stages `faults` in order, from `start`, one at a time.
/// `hold` holds the writers of the invalidating lanes, `writers`; `sources`
/// are the lanes' handles on the source of truth, all taken down together.
async fn stage(
    redis: &mut ScenarioRedis,
    faults: &[Fault],
    hold: &Hold,
    writers: &[(&Lane, &Cache<i64, Item>)],
    sources: &[&Db],
    start: Instant,
) -> Result<Vec<Window>> {
    let mut windows = Vec::new();
    for fault in faults {
        tokio::time::sleep_until(start + fault.at.saturating_sub(fault.lead)).await;
        if fault.kind == Kind::SourceDown {
            hold.hold().await;
            for (lane, writer) in writers {
                lane.warm(writer).await;
            }
            tokio::time::sleep_until(start + fault.at).await;
        }
        let from = start.elapsed();
        match fault.kind {
            Kind::Kill => {
                let server = redis
                    .server
                    .as_mut()
                    .context("only a private redis-server is killed")?;
                server.kill();
                tokio::time::sleep(fault.length).await;
                server.restart().await?;
            }
            Kind::Pause => {
                let admin = RedisAdmin::connect(&redis.target).await?;
                let ms = u64::try_from(fault.length.as_millis()).unwrap_or(u64::MAX);
                admin.pause_all(ms).await?;
                tokio::time::sleep(fault.length).await;
            }
            Kind::SourceDown => {
                sources.iter().for_each(|db| db.set_down(true));
                tokio::time::sleep(fault.length).await;
                sources.iter().for_each(|db| db.set_down(false));
                hold.release();
            }
        }
        windows.push((fault.kind, from..start.elapsed()));
    }
    Ok(windows)
}

impl Lane {
    /// The lane's row. Its label names the run's faults, so it is made once
    /// per run.
    fn row(
        &self,
        lab: &Lab,
        (strategy, writer, readers, before): &Built,
        tally: &Tally,
        windows: &[Window],
        plan: &str,
        items: &[Item],
    ) -> Row {
        let label: &'static str =
            Box::leak(format!("{}; faults {plan}", strategy.name()).into_boxed_str());
        let mut row = lab.row(NAME, strategy.slug(), label);
        row.requests = tally.reads.len() as u64 + tally.writes;
        row.writes = tally.writes;
        row.db_queries = self.db.reads();
        row.errors = tally.read_errors + tally.failed_writes;
        row.failed_invalidations = Some(tally.failed_invalidations);
        row.stale_reads = Some(tally.stale);
        row.stale_reads_past_window = Some(tally.late);
        row.stale_read_max_lag_us = Some(tally.lag.max_us().unwrap_or(0));
        let (acknowledged, lost) = self.lost_writes(items);
        row.acknowledged = Some(acknowledged);
        row.applied = Some(acknowledged - lost);
        row.lost_writes = Some(lost);
        let outside = with_faults(&mut row, windows, &tally.reads);
        if *strategy == Strategy::Protected {
            let stats: Vec<Stats> = readers
                .iter()
                .zip(before)
                .map(|(c, b)| c.stats().since(b))
                .collect();
            let sum = |f: fn(&Stats) -> u64| stats.iter().map(f).sum::<u64>();
            let writer = writer.stats();
            row.loads = Some(sum(|s| s.loads));
            row.near_clears = Some(sum(|s| s.near_clears));
            row.breaker_opens = Some(sum(|s| s.breaker_opens) + writer.breaker_opens);
            row.short_circuits = Some(sum(|s| s.short_circuits) + writer.short_circuits);
            row.retried_invalidations = Some(writer.retried_invalidations);
        }
        row.with_latency(&outside)
    }

    fn ticker(&self, rate: u64) -> tokio::time::Interval {
        ticker(self.start, rate)
    }

    fn budget(&self, rate: u64) -> u64 {
        budget(self.end - self.start, rate)
    }

    fn done(&self, id: i64) -> std::sync::MutexGuard<'_, (u64, Instant)> {
        self.done[usize::try_from(id - self.base).unwrap_or(0)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn acknowledged(&self, id: i64) -> std::sync::MutexGuard<'_, u64> {
        self.acknowledged[usize::try_from(id - self.base).unwrap_or(0)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads random keys at a worker's share of its instance's rate until the
    /// end, the lane's way; a read is stale when it returns a version older
    /// than the last write completed before it began.
    async fn read(&self, cache: &Cache<i64, Item>, seed: u64) -> Tally {
        let mut rng = StdRng::seed_from_u64(seed);
        let rate = READ_RATE.div_ceil(u64::from(WORKERS_PER_READER));
        let mut tick = self.ticker(rate);
        let mut out = Tally::default();
        for _ in 0..self.budget(rate) {
            tick.tick().await;
            if Instant::now() >= self.end {
                break;
            }
            let id = self.base + rng.random_range(1..=KEYS);
            let (floor, completed) = *self.done(id);
            let t = Instant::now();
            let read = self.get(cache, id).await;
            out.reads.push((t - self.start, t.elapsed()));
            match read {
                Ok(Some(item)) if u64::try_from(item.value).unwrap_or(0) < floor => {
                    let lag = t.saturating_duration_since(completed);
                    out.stale += 1;
                    out.late += u64::from(lag > BUS_WINDOW);
                    out.lag.record(lag);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => out.read_errors += 1,
            }
        }
        out
    }

    /// Reads `id` the lane's way.
    async fn get(&self, cache: &Cache<i64, Item>, id: i64) -> Result<Option<Item>> {
        match self.strategy {
            Strategy::Naive => self.naive_read(cache, id).await,
            Strategy::Protected => cache
                .get_or_load(&id, loader(&self.db, None, id))
                .await
                .map_err(anyhow::Error::from),
        }
    }

    /// Cache-aside as commonly written: on a miss, read the source and put what
    /// was read into the cache; a store error reaches the caller.
    async fn naive_read(&self, cache: &Cache<i64, Item>, id: i64) -> Result<Option<Item>> {
        if let Some(item) = cache.get(&id).await? {
            return Ok(Some(item));
        }
        let item = self.db.load(id).await?;
        if let Some(item) = &item {
            cache.set(&id, item.clone()).await?;
        }
        Ok(item)
    }

    /// Reads every key of the lane into its cache, the lane's way, through
    /// `cache`. A read that fails leaves its key out; the run's reads of it
    /// show it.
    async fn warm(&self, cache: &Cache<i64, Item>) {
        for id in self.base + 1..=self.base + KEYS {
            let _ = self.get(cache, id).await;
        }
    }

    /// Writes the keys writer `w` owns (`id % WRITERS == w`, less one) until
    /// the end, unless writes are held: UPDATE, then invalidate the key, or
    /// every [`GROUP_EVERY`] writes its group (protected). A write whose
    /// invalidation returned is complete.
    async fn write(&self, cache: &Cache<i64, Item>, w: i64, seed: u64) -> Tally {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = self.ticker(WRITE_RATE);
        let mut out = Tally::default();
        // The only writer of its keys, so it knows their versions.
        let mut versions = vec![0_u64; self.done.len()];
        for _ in 0..self.budget(WRITE_RATE) {
            tick.tick().await;
            if Instant::now() >= self.end {
                break;
            }
            let Some(_writing) = self.hold.write().await else {
                continue;
            };
            let id = self.base + WRITERS * rng.random_range(0..KEYS / WRITERS) + w + 1;
            let i = usize::try_from(id - self.base).unwrap_or(0);
            out.writes += 1;
            if self.db.bump(id).await.is_err() {
                out.failed_writes += 1;
                continue;
            }
            versions[i] += 1;
            *self.acknowledged(id) += 1;
            let grouped = self.strategy == Strategy::Protected && out.writes % GROUP_EVERY == 0;
            let invalidated = match grouped {
                true => cache.invalidate_group(&(id % TENANTS)).await,
                false => cache.invalidate(&id).await,
            };
            match invalidated {
                Ok(()) => *self.done(id) = (versions[i], Instant::now()),
                Err(_) => out.failed_invalidations += 1,
            }
        }
        out
    }

    /// The writes acknowledged, and of them those the source does not hold at
    /// the end (a row's value counts the UPDATEs applied to it).
    fn lost_writes(&self, items: &[Item]) -> (u64, u64) {
        let (mut acknowledged, mut lost) = (0, 0);
        for id in self.base + 1..=self.base + KEYS {
            let acked = *self.acknowledged(id);
            let value = items
                .iter()
                .find(|item| item.id == id)
                .map_or(0, |item| u64::try_from(item.value).unwrap_or(0));
            acknowledged += acked;
            lost += acked.saturating_sub(value);
        }
        (acknowledged, lost)
    }
}

/// A tick `rate` times a second from `start`, skipping missed ticks.
fn ticker(start: Instant, rate: u64) -> tokio::time::Interval {
    let period = Duration::from_secs(1) / u32::try_from(rate.max(1)).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval_at(start, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    tick
}

/// At most this many operations at `rate` per second in `run`: the loops'
/// bound on top of the clock.
fn budget(run: Duration, rate: u64) -> u64 {
    u64::try_from(u128::from(rate) * run.as_millis() / 1000)
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Fills `row`'s fault figures: how long each kind of fault lasted, and the
/// latency of the `calls` (start from the load's start, latency) made during
/// one; returns the latency of the others.
fn with_faults(row: &mut Row, windows: &[Window], calls: &[(Duration, Duration)]) -> Latency {
    let (mut during, mut outside) = (Latency::new(), Latency::new());
    for (at, took) in calls {
        match windows.iter().any(|(_, w)| w.contains(at)) {
            true => during.record(*took),
            false => outside.record(*took),
        }
    }
    let ms = |kinds: &[Kind]| {
        let total: Duration = windows
            .iter()
            .filter(|(k, _)| kinds.contains(k))
            .map(|(_, w)| w.end - w.start)
            .sum();
        Some(u64::try_from(total.as_millis()).unwrap_or(u64::MAX))
    };
    row.outage_ms = ms(&[Kind::Kill, Kind::Pause]);
    row.source_down_ms = ms(&[Kind::SourceDown]);
    row.outage_p50_us = during.quantile_us(0.50);
    row.outage_p99_us = during.quantile_us(0.99);
    row.outage_max_us = during.max_us();
    outside
}

/// The write-behind lane: write-behind over a cache of its own keys
/// (`BEHIND_BASE + 1..=BEHIND_BASE + KEYS`), and its flusher, in this process.
struct Behind {
    wb: WriteBehind<i64, Item>,
    /// The flusher's handle on the source, taken down with the others.
    db: Db,
    flusher: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// The write-behind lane's keys start past this one.
const BEHIND_BASE: i64 = 2 * KEYS;

/// What the write-behind writer saw.
#[derive(Debug, Default)]
struct BehindTally {
    /// Each write's start (from the load's start) and latency.
    writes: Vec<(Duration, Duration)>,
    /// The writes write-behind acknowledged: key, version and start.
    acknowledged: Vec<(i64, u64, Duration)>,
    /// Writes that failed (Redis away), not acknowledged.
    failed: u64,
}

impl Behind {
    /// Write-behind on the scenario's Redis, and a flusher applying its queue to
    /// the source; `None` on a Redis Cluster (write-behind needs one node).
    async fn open(lab: &Lab, redis: &ScenarioRedis) -> Result<Option<Self>> {
        if redis.target.server_url().is_none() {
            return Ok(None);
        }
        let wb = write_behind::open(&redis.target, namespace(lab, NAME, "write-behind")).await?;
        let db = lab.source.counted();
        let flusher = wb
            .flusher(SourceSink(db.clone()))
            .consumer("chaos")
            .block(FLUSHER_BLOCK)
            .max_backoff(FLUSHER_MAX_BACKOFF)
            .connect_store()
            .await
            .context("cannot start the write-behind flusher")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let flusher = tokio::spawn(async move {
            flusher
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Some(Self {
            wb,
            db,
            flusher,
            stop,
        }))
    }

    fn writer(&self, start: Instant, run: Duration) -> BehindWriter {
        BehindWriter {
            wb: self.wb.clone(),
            start,
            end: start + run,
        }
    }

    /// Waits until the flusher has emptied the queue (within [`GRACE`]).
    async fn drain(&self) -> Result<()> {
        let deadline = Instant::now() + GRACE;
        let rounds = GRACE.as_millis() / FLUSHER_BLOCK.as_millis() + 1;
        for _ in 0..rounds {
            if self.wb.backlog().await.is_ok_and(|n| n == 0) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(FLUSHER_BLOCK).await;
        }
        anyhow::bail!("write-behind's queue was not flushed within {GRACE:?} of the load's end")
    }

    /// The lane's row: writes acknowledged, and those the source lacks.
    fn row(
        &self,
        lab: &Lab,
        tally: &BehindTally,
        windows: &[Window],
        plan: &str,
        items: &[Item],
    ) -> Row {
        let label: &'static str = Box::leak(
            format!("write-behind (queue in Redis, flusher in process); faults {plan}")
                .into_boxed_str(),
        );
        let mut row = lab.row(NAME, "write-behind", label);
        row.requests = tally.writes.len() as u64;
        row.writes = row.requests;
        row.errors = tally.failed;
        let held = |id: i64| {
            items
                .iter()
                .find(|item| item.id == id)
                .map_or(0, |item| u64::try_from(item.value).unwrap_or(0))
        };
        let lost = tally
            .acknowledged
            .iter()
            .filter(|(id, version, _)| held(*id) < *version)
            .count() as u64;
        let acknowledged = tally.acknowledged.len() as u64;
        row.acknowledged = Some(acknowledged);
        row.applied = Some(acknowledged - lost);
        row.lost_writes = Some(lost);
        row.acknowledged_while_source_down = Some(
            tally
                .acknowledged
                .iter()
                .filter(|(_, _, at)| {
                    windows
                        .iter()
                        .any(|(kind, w)| *kind == Kind::SourceDown && w.contains(at))
                })
                .count() as u64,
        );
        row.transactions = Some(self.db.transactions());
        let outside = with_faults(&mut row, windows, &tally.writes);
        row.with_latency(&outside)
    }

    /// Stops the flusher, and removes what the lane wrote.
    async fn close(self, lab: &Lab, redis: &ScenarioRedis) {
        let _ = self.stop.send(());
        if tokio::time::timeout(GRACE, self.flusher).await.is_err() {
            tracing::warn!("the chaos scenario's write-behind flusher did not stop");
        }
        write_behind::forget(lab, &redis.target, &self.wb).await;
    }
}

/// The write-behind lane's writer.
struct BehindWriter {
    wb: WriteBehind<i64, Item>,
    start: Instant,
    end: Instant,
}

impl BehindWriter {
    /// Writes random keys of the lane, each at its next version, until the end;
    /// never held: write-behind does not need the source.
    async fn write(self, seed: u64) -> BehindTally {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = ticker(self.start, BEHIND_RATE);
        let mut versions = vec![0_u64; usize::try_from(KEYS).unwrap_or(0) + 1];
        let mut out = BehindTally::default();
        for _ in 0..budget(self.end - self.start, BEHIND_RATE) {
            tick.tick().await;
            if Instant::now() >= self.end {
                break;
            }
            let k = rng.random_range(1..=KEYS);
            let i = usize::try_from(k).unwrap_or(0);
            versions[i] += 1;
            let (id, version) = (BEHIND_BASE + k, versions[i]);
            let item = Item {
                id,
                value: i64::try_from(version).unwrap_or(i64::MAX),
                payload: format!("item-{id} v{version}"),
            };
            let t = Instant::now();
            let written = self.wb.write_behind(&id, item).await;
            out.writes.push((t - self.start, t.elapsed()));
            match written {
                Ok(WriteOutcome::Queued { .. }) => {
                    out.acknowledged.push((id, version, t - self.start));
                }
                Ok(_) | Err(_) => out.failed += 1,
            }
        }
        out
    }
}

/// Applies write-behind's writes to the source, idempotently by version; while
/// the source is down, fails with [`SourceDown`], a transient failure.
struct SourceSink(Db);

/// The source was down (staged by the lab).
#[derive(Debug)]
struct SourceDown;

impl std::fmt::Display for SourceDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the source of truth is down (staged by the lab)")
    }
}

impl std::error::Error for SourceDown {}

impl Sink<i64, Item> for SourceSink {
    async fn apply(&self, batch: &[Write<i64, Item>]) -> Result<(), BoxError> {
        if self.0.is_down() {
            return Err(Box::new(SourceDown));
        }
        let items: Vec<Item> = batch.iter().map(|w| w.value.clone()).collect();
        self.0.write_versioned_batch(&items).await?;
        Ok(())
    }

    fn is_transient(&self, error: &BoxError) -> bool {
        error.is::<SourceDown>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Kind; 3] = [Kind::Kill, Kind::Pause, Kind::SourceDown];

    #[tokio::test(start_paused = true)]
    async fn a_hold_waits_for_the_write_in_progress_then_stops_new_ones() {
        let hold = Arc::new(Hold::default());
        let writing = hold.write().await.expect("writes are not held yet");
        let holding = tokio::spawn({
            let hold = Arc::clone(&hold);
            async move { hold.hold().await }
        });
        // The clock is paused: it moves on once every task is waiting.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !holding.is_finished(),
            "the hold did not wait for the write"
        );
        drop(writing);
        holding.await.unwrap();
        assert!(hold.write().await.is_none(), "a write started while held");
        hold.release();
        assert!(hold.write().await.is_some());
    }

    #[test]
    fn faults_are_drawn_from_the_seed_within_the_run_and_never_overlap() {
        for ms in [3_000, 8_000, 60_000] {
            let duration = Duration::from_millis(ms);
            for seed in 0..200 {
                let faults = schedule(seed, duration, &ALL);
                assert_eq!(faults.len(), 3);
                for kind in ALL {
                    assert!(faults.iter().any(|f| f.kind == kind), "{faults:?}");
                }
                let mut free_from = duration / 20;
                for f in &faults {
                    // Writes are held for the lead, then the fault lasts its length,
                    // and Redis has room to come back before the last tenth.
                    assert!(
                        f.at - f.lead >= free_from,
                        "{ms} ms, seed {seed}: {faults:?}"
                    );
                    assert!(f.length > Duration::ZERO && f.length <= f.kind.nominal());
                    free_from = f.at + f.length;
                }
                assert!(free_from <= duration - duration / 10, "{faults:?}");
                let again = schedule(seed, duration, &ALL);
                assert_eq!(format!("{faults:?}"), format!("{again:?}"));
            }
        }
    }

    #[test]
    fn a_given_redis_is_only_paused() {
        let faults = schedule(7, Duration::from_secs(8), &[Kind::Pause, Kind::SourceDown]);
        assert!(faults.iter().all(|f| f.kind != Kind::Kill), "{faults:?}");
        assert_eq!(faults.len(), 2);
    }
}
