//! The `stampede` scenario: many callers miss one cold key at the same moment,
//! and its load is slow.
//!
//! Naive cache-aside sends every caller to the database; the single-flight
//! cache lets one caller load while the others wait for its result. A third row
//! splits the callers over several independent caches on the same namespace,
//! each with its own store handle (its own Redis connection; in process, its own
//! cache over the shared store), as separate service instances would be: each
//! cache's in-process single-flight lets one of its callers through, and the
//! store's lease then lets only one of those load. On Redis (the lab's, or a
//! private `redis-server` on the embedded default), a fourth row runs
//! the callers in separate processes (`cachet __child stampede`), each reading
//! the source of truth itself.

use super::LabStore;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::Cache;
use clap::Args;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::child::{ChildProcess, DONE, READY, source_args};
use super::double_delete::cache_in;
use super::redis_server::{Persistence, ScenarioRedis};
use super::report::{Latency, Row, find};
use super::source::{Db, Item};
use super::{Entry, LEASE_TTL, Lab, shares};
use crate::target::RedisTarget;

pub(super) const NAME: &str = "stampede";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Many callers miss one cold key at once";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive cache-aside";
const SINGLE_FLIGHT: &str = "single-flight (lease)";
const CONNECTIONS: &str = "single-flight across 4 connections";
const PROCESSES: &str = "single-flight across 4 processes";
/// Independent caches of the connections row, and processes of the processes row.
const INSTANCES: usize = 4;
/// How long a caller process may take to start and connect.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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

/// How callers reach the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Naive,
    SingleFlight,
    /// Single-flight, callers split over [`INSTANCES`] independent caches.
    Connections,
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for mode in [Mode::Naive, Mode::SingleFlight, Mode::Connections] {
        rows.push(run_strategy(lab, mode).await?);
    }
    // Across processes the lease needs a shared store: the lab's Redis, or
    // else a private server; without either the summary says why the row
    // is missing.
    if let Some(redis) = ScenarioRedis::open(lab, Persistence::None).await? {
        rows.push(run_processes(lab, &redis.target).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let queries =
        |word| find(rows, NAME, word).map_or_else(|| "?".to_owned(), |r| r.db_queries.to_string());
    let callers = find(rows, NAME, "naive").map_or(0, |r| r.requests);
    let mut out = format!(
        "stampede: {callers} callers missed one cold key at once: naive sent {} queries to the \
         database, single-flight {} (the others waited for that one load).",
        queries("naive"),
        queries("single-flight")
    );
    if find(rows, NAME, "connections").is_some() {
        out.push_str(&format!(
            "\nstampede, {INSTANCES} connections: the same callers split over {INSTANCES} \
             independent caches, each with its own store handle and its own in-process \
             single-flight: database queries {} (one cache took the store's lease, the others \
             waited for its fill).",
            queries("connections")
        ));
    }
    if find(rows, NAME, "processes").is_none() {
        out.push_str(&format!(
            "\nstampede, {INSTANCES} processes: not run: callers in several processes need \
             Redis, and there is no --redis-url, no --redis-cluster and no redis-server on PATH."
        ));
    }
    if find(rows, NAME, "processes").is_some() {
        out.push_str(&format!(
            "\nstampede, {INSTANCES} processes: the callers in {INSTANCES} processes sharing \
             Redis, each reading the database itself: database queries {} (the lease works \
             across processes).",
            queries("processes")
        ));
    }
    out
}

async fn run_strategy(lab: &Lab, mode: Mode) -> Result<Row> {
    let a = &lab.args.stampede;
    lab.source.reset(1).await?;
    let db = lab.source.counted();
    let (name, slug) = match mode {
        Mode::Naive => (NAIVE, "naive"),
        Mode::SingleFlight => (SINGLE_FLIGHT, "single-flight"),
        Mode::Connections => (CONNECTIONS, "connections"),
    };
    let single_flight = mode != Mode::Naive;
    let cache = lab.cache(NAME, slug, KEY..=KEY)?;
    let mut caches = vec![cache.clone()];
    if mode == Mode::Connections {
        for _ in 1..INSTANCES {
            let store = instance_store(lab).await?;
            caches.push(cache_in(cache.namespace().to_owned(), &store, LEASE_TTL)?);
        }
    }
    let load_time = Duration::from_millis(a.load_ms);
    let callers = usize::try_from(a.callers).context("too many callers")?;
    // Everyone starts together, or the first fill would turn late callers into hits.
    let barrier = Arc::new(Barrier::new(callers));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..callers {
        let (cache, db, barrier) = (
            caches[i % caches.len()].clone(),
            db.clone(),
            Arc::clone(&barrier),
        );
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

    let mut row = lab.row(NAME, slug, name);
    row.requests = u64::from(a.callers);
    row.db_queries = db.reads();
    row.errors = errors;
    if single_flight {
        row.loads = Some(caches.iter().map(|c| c.stats().loads).sum());
    }
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

/// A store handle of its own for one more cache instance: a new Redis
/// connection, or in process the lab's store (the cache is what is separate).
async fn instance_store(lab: &Lab) -> Result<LabStore> {
    match &lab.redis {
        Some(target) => Ok(LabStore::shared(target.connect(target.another()).await?)),
        None => Ok(lab.store.clone()),
    }
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

/// The callers split over [`INSTANCES`] processes of `cachet __child stampede`,
/// started together once all have connected.
async fn run_processes(lab: &Lab, target: &RedisTarget) -> Result<Row> {
    let a = &lab.args.stampede;
    lab.source.reset(1).await?;
    let cache = lab.cache(NAME, "processes", KEY..=KEY)?;
    let (source, source_env) = source_args(lab)?;
    let env = target.child_env().and(&source_env);
    let parts = u32::try_from(INSTANCES).unwrap_or(1);
    let mut callers = Vec::new();
    for n in shares(u64::from(a.callers), parts) {
        let mut args = vec!["stampede".to_owned()];
        args.extend(target.child_args());
        args.extend(["--namespace".into(), cache.namespace().to_owned()]);
        args.extend(["--key".into(), KEY.to_string()]);
        args.extend(["--callers".into(), n.to_string()]);
        args.extend(["--load-ms".into(), a.load_ms.to_string()]);
        args.extend(["--timeout-ms".into(), CALL_TIMEOUT.as_millis().to_string()]);
        args.extend(source.iter().cloned());
        callers.push(ChildProcess::spawn(args, &env, "a caller process")?);
    }
    for c in &mut callers {
        let line = c.line(START_TIMEOUT).await?;
        if line != READY {
            bail!("unexpected line from a caller process: {line:?}");
        }
    }
    let started = Instant::now();
    for c in &mut callers {
        c.send("go").await?;
    }
    let (mut queries, mut loads, mut errors) = (0, 0, 0);
    let mut latency = Latency::new();
    for c in &mut callers {
        let line = c.line(CALL_TIMEOUT + START_TIMEOUT).await?;
        let report = line
            .strip_prefix(DONE)
            .with_context(|| format!("unexpected line from a caller process: {line:?}"))?;
        let mut fields = report.split(' ').map(str::parse::<u64>);
        let mut next = || -> Result<u64> {
            fields
                .next()
                .context("short report from a caller process")?
                .context("bad number in a caller process's report")
        };
        queries += next()?;
        loads += next()?;
        errors += next()?;
        while let Ok(us) = next() {
            latency.record(Duration::from_micros(us));
        }
    }
    let elapsed = started.elapsed();
    for mut c in callers {
        c.close_stdin();
        if !matches!(c.wait(START_TIMEOUT).await, Ok(s) if s.success()) {
            errors += 1;
        }
    }
    lab.forget(&cache).await;

    let mut row = lab.row(NAME, "processes", PROCESSES);
    row.store = target.kind();
    row.requests = u64::from(a.callers);
    row.db_queries = queries;
    row.loads = Some(loads);
    row.errors = errors;
    Ok(row.with_latency(&latency).elapsed(elapsed))
}
