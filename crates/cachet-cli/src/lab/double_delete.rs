//! The `double-delete` scenario: a delayed double-delete whose writer is killed
//! between its two deletes.
//!
//! A writer commits, deletes the key, and is SIGKILLed; a slow reader that read
//! the row before the write then puts the old value back with a plain `set`
//! (the race a second delete exists for). With a single delete the old value
//! stays until its TTL. With [`Cache::invalidate_twice`] the second delete was
//! queued in Redis before the first ran, so a [`DeferredWorker`] started
//! afterwards (as after a restart) still runs it, and the old value goes.
//!
//! The queue must outlive the writer's process, so the scenario needs Redis:
//! `--redis-url` or `--redis-cluster`, or else a private `redis-server` it
//! starts and stops itself; without either it is skipped. It keeps to its own
//! namespace and to a deferred queue of its own (a `:sys:` prefix with the
//! run's id).

use super::LabStore;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::{Cache, DeferredWorker};
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::child::ChildProcess;
use super::redis_server::{Persistence, ScenarioRedis};
use super::report::{Row, find};
use super::source::{Db, Item};
use super::{ENTRY_TTL, Entry, LEASE_TTL, Lab};
use crate::target::RedisTarget;

pub(super) const NAME: &str = "double-delete";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str =
    "A writer killed between the two deletes of a delayed double-delete (needs Redis)";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive (single delete)";
const DURABLE: &str = "durable double-delete (killed after first delete)";

/// Store calls in flight at once while filling and putting values back.
const CONCURRENCY: usize = 16;
/// How long the child may take to start, connect and report.
const CHILD_REPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// A child nobody kills exits by itself after this long.
const CHILD_HANG_LIMIT: Duration = Duration::from_secs(120);
/// How long past the due time the queued deletes may take to run.
const DEFERRED_GRACE: Duration = Duration::from_secs(10);

/// Flags of the `double-delete` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "double-delete")]
pub(super) struct DoubleDeleteArgs {
    /// Keys the killed writer invalidates
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    double_delete_keys: u64,
    /// Delay of the second delete, in milliseconds
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    double_delete_delay_ms: u64,
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let Some(redis) = LabRedis::open(lab).await? else {
        lab.skip(
            NAME,
            "the scenario needs a Redis that outlives a process, and there is no --redis-url, \
             no --redis-cluster and no redis-server on PATH.",
        );
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for durable in [false, true] {
        rows.push(run_strategy(lab, &redis, durable).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(naive), Some(durable)) = (find(rows, NAME, "naive"), find(rows, NAME, "durable"))
    else {
        return format!("{NAME}: no result.");
    };
    let stale = |r: &Row| {
        r.stale_entries
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    format!(
        "{NAME}: a writer deleted {} keys and was killed, then a slow reader put the old values \
         back: keys still old after the delay: single delete {}, durable double-delete {} (its \
         second deletes, queued in Redis before the kill, were run by a worker started \
         afterwards: {} ran).",
        naive.writes,
        stale(naive),
        stale(durable),
        durable.deferred_ran.unwrap_or(0)
    )
}

/// The Redis the scenario runs on: the lab's, or a private server.
#[derive(Debug)]
struct LabRedis {
    /// The store with the run's own deferred queue.
    store: LabStore,
    system_prefix: String,
    /// The server, stopped when this is dropped if it is private (after the
    /// store's connection, declared before it).
    redis: ScenarioRedis,
}

impl LabRedis {
    /// The lab's Redis, or a private server; `None` when there is neither.
    async fn open(lab: &Lab) -> Result<Option<Self>> {
        let Some(redis) = ScenarioRedis::open(lab, Persistence::None).await? else {
            return Ok(None);
        };
        let system_prefix = queue_prefix(lab);
        let store = queue_store(&redis.target, &system_prefix).await?;
        Ok(Some(Self {
            store,
            system_prefix,
            redis,
        }))
    }
}

/// The `:sys:` prefix of the run's own deferred queue, so the lab never runs
/// (or waits behind) another application's deferred deletes on a shared Redis.
pub(super) fn queue_prefix(lab: &Lab) -> String {
    format!("cachet:lab-{}:", lab.run_id)
}

/// A Redis store whose deferred queue is the run's own.
pub(super) async fn queue_store(target: &RedisTarget, system_prefix: &str) -> Result<LabStore> {
    let store = target
        .connect(target.another().system_prefix(system_prefix))
        .await?;
    Ok(LabStore::shared(store))
}

/// A cache with the lab's settings on `store`, in the namespace of `scenario`
/// and `strategy`, registered so that its keys are invalidated at the end of the
/// run (see [`Lab::forget`]).
pub(super) fn cache_on_store(
    lab: &Lab,
    scenario: &str,
    strategy: &str,
    keys: std::ops::RangeInclusive<i64>,
    store: &LabStore,
    lease_ttl: Duration,
) -> Result<Cache<i64, Item>> {
    let cache = cache_in(namespace(lab, scenario, strategy), store, lease_ttl)?;
    lab.written().push((cache.clone(), keys));
    Ok(cache)
}

/// A cache with the lab's settings in `namespace` on `store`, not registered:
/// for further handles on a registered cache's namespace.
pub(super) fn cache_in(
    namespace: String,
    store: &LabStore,
    lease_ttl: Duration,
) -> Result<Cache<i64, Item>> {
    let builder = Cache::builder(namespace)
        .ttl(ENTRY_TTL)
        .jitter(0.1)
        .negative_ttl(ENTRY_TTL)
        .lease_ttl(lease_ttl);
    store
        .serve(builder)
        .build()
        .context("cannot build the lab's cache")
}

pub(super) fn namespace(lab: &Lab, scenario: &str, strategy: &str) -> String {
    format!("lab-{scenario}-{strategy}-{}", lab.run_id)
}

/// The store for delayed double-deletes: on Redis a connection whose deferred
/// queue is the run's own, in process the lab's store.
pub(super) async fn deferred_store(lab: &Lab) -> Result<LabStore> {
    match &lab.redis {
        Some(target) => queue_store(target, &queue_prefix(lab)).await,
        None => Ok(lab.store.clone()),
    }
}

async fn run_strategy(lab: &Lab, redis: &LabRedis, durable: bool) -> Result<Row> {
    let a = &lab.args.double_delete;
    let n = a.double_delete_keys;
    let delay = Duration::from_millis(a.double_delete_delay_ms);
    let last = i64::try_from(n).context("too many keys")?;
    let (name, slug) = if durable {
        (DURABLE, "durable")
    } else {
        (NAIVE, "naive")
    };
    lab.source.reset(n).await?;
    let db = lab.source.counted();
    let cache = if redis.redis.is_private() {
        // A private server takes every key with it when it stops.
        cache_in(namespace(lab, NAME, slug), &redis.store, LEASE_TTL)?
    } else {
        cache_on_store(lab, NAME, slug, 1..=last, &redis.store, LEASE_TTL)?
    };
    let started = Instant::now();
    let mut errors = 0;

    // A reader caches every row, and keeps what it read: the old values.
    let old = fill(&cache, &db, last, &mut errors).await?;
    // The writer commits...
    for id in 1..=last {
        if db.bump(id).await.is_err() {
            errors += 1;
        }
    }
    // ...deletes in a process of its own (queuing the second delete first when
    // durable), reports, and is killed before it can do anything else.
    let child = ChildRun {
        redis: &redis.redis.target,
        system_prefix: &redis.system_prefix,
        namespace: cache.namespace(),
        keys: n,
        delay,
        twice: durable,
    };
    let reported = child.run_and_kill().await?;
    let due = reported + delay;
    // The slow reader puts back what it read before the write.
    let put_back = put_back(&cache, old).await;
    errors += put_back.errors;
    if put_back.finished > due {
        tracing::warn!(
            "the slow reader finished after the second deletes fell due; \
             raise --double-delete-delay-ms"
        );
    }

    let deferred_ran = if durable {
        // "After a restart": a worker in this process runs what the killed one queued.
        let worker = DeferredWorker::spawn(redis.store.protocol());
        let (ran, complete) = await_deferred(worker, n, due, DEFERRED_GRACE).await;
        if !complete {
            errors += 1;
        }
        Some(ran)
    } else {
        // Nothing is queued; look at the same moment the second delete would have run.
        tokio::time::sleep_until(due).await;
        None
    };
    let elapsed = started.elapsed();

    let (stale, unread) = lab.stale_entries(&cache, 1..=last).await?;
    errors += unread;
    lab.forget(&cache).await;

    let mut row = lab.row(NAME, slug, name);
    row.store = redis.redis.target.kind();
    row.requests = 3 * n;
    row.writes = n;
    row.db_queries = db.reads();
    row.loads = Some(cache.stats().loads);
    row.stale_entries = Some(stale);
    row.errors = errors;
    row.deferred_ran = deferred_ran;
    Ok(row.elapsed(elapsed))
}

/// Loads every key through the cache; returns the values read.
async fn fill(
    cache: &Cache<i64, Item>,
    db: &Db,
    last: i64,
    errors: &mut u64,
) -> Result<Vec<(i64, Item)>> {
    let mut old = Vec::new();
    let mut pending = JoinSet::new();
    let mut next = 1;
    while next <= last || !pending.is_empty() {
        while next <= last && pending.len() < CONCURRENCY {
            let (cache, db, id) = (cache.clone(), db.clone(), next);
            pending.spawn(async move {
                let loaded = cache
                    .get_or_load(&id, move || async move { db.load(id).await })
                    .await;
                (id, loaded)
            });
            next += 1;
        }
        let Some(done) = pending.join_next().await else {
            break;
        };
        match done.context("a reader panicked")? {
            (id, Ok(Some(item))) => old.push((id, item)),
            _ => *errors += 1,
        }
    }
    Ok(old)
}

#[derive(Debug)]
struct PutBack {
    errors: u64,
    finished: Instant,
}

/// Writes each old value back with a plain `set`, as cache-aside without leases
/// does after a slow read.
async fn put_back(cache: &Cache<i64, Item>, old: Vec<(i64, Item)>) -> PutBack {
    let mut errors = 0;
    let mut pending = JoinSet::new();
    let mut old = old.into_iter();
    loop {
        while pending.len() < CONCURRENCY {
            let Some((id, item)) = old.next() else { break };
            let cache = cache.clone();
            pending.spawn(async move { cache.set(&id, item).await });
        }
        match pending.join_next().await {
            Some(Ok(Ok(()))) => {}
            Some(_) => errors += 1,
            None => break,
        }
    }
    PutBack {
        errors,
        finished: Instant::now(),
    }
}

/// Waits until `worker` has run `expected` deferred deletes, which cannot happen
/// before `due`; gives up `grace` after it. Returns what ran and whether that is
/// all. The worker has no completion signal: its counter is polled.
pub(super) async fn await_deferred(
    worker: DeferredWorker,
    expected: u64,
    due: Instant,
    grace: Duration,
) -> (u64, bool) {
    const STEP: Duration = Duration::from_millis(5);
    tokio::time::sleep_until(due).await;
    let give_up = due + grace;
    // At most grace / STEP turns.
    while worker.ran() < expected && Instant::now() < give_up {
        tokio::time::sleep(STEP).await;
    }
    let ran = worker.ran();
    worker.shutdown().await;
    (ran, ran >= expected)
}

/// One run of the writer process.
#[derive(Debug)]
struct ChildRun<'a> {
    redis: &'a RedisTarget,
    system_prefix: &'a str,
    namespace: &'a str,
    keys: u64,
    delay: Duration,
    twice: bool,
}

impl ChildRun<'_> {
    /// Starts `cachet __child double-delete`, waits for its report that every
    /// key is invalidated (and, when `twice`, every second delete queued), then
    /// SIGKILLs it. Returns when it reported.
    async fn run_and_kill(&self) -> Result<Instant> {
        let mut args = vec!["double-delete".to_owned()];
        args.extend(self.redis.child_args());
        args.extend(["--system-prefix".into(), self.system_prefix.to_owned()]);
        args.extend(["--namespace".into(), self.namespace.to_owned()]);
        args.extend(["--keys".into(), self.keys.to_string()]);
        args.extend(["--delay-ms".into(), self.delay.as_millis().to_string()]);
        args.extend(["--hang-ms".into(), CHILD_HANG_LIMIT.as_millis().to_string()]);
        if self.twice {
            args.push("--twice".into());
        }
        // The child exits when its stdin closes, so it never outlives this process.
        let mut child = ChildProcess::spawn(args, &self.redis.child_env(), "the writer process")?;
        let line = child.line(CHILD_REPORT_TIMEOUT).await;
        let reported = Instant::now();
        child.kill().await?;
        let line = line?;
        let done: u64 = line
            .strip_prefix(super::child::DONE)
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("unexpected report from the writer process: {line:?}"))?;
        if done != self.keys {
            bail!(
                "the writer process invalidated {done} of {} keys",
                self.keys
            );
        }
        Ok(reported)
    }
}
