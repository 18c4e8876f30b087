//! The `write-behind` scenario: a burst of writes through write-behind against
//! the same burst written synchronously, with the flusher killed mid-stream.
//!
//! Concurrent writers each own a share of the keys and give every write of a
//! key the next version (the row's `value`) and a payload that names the key
//! and version. The synchronous row writes each one with
//! [`Cache::write_through`]: a transaction on the source of truth, then the
//! version-checked cache entry. The write-behind row writes each one with
//! [`WriteBehind::write_behind`]: the entry and a stream entry in one Redis
//! script; a flusher, in a process of its own (`cachet __child
//! write-behind-flusher`), applies the stream to the source in batches, one
//! transaction each, idempotent by version.
//!
//! Once that flusher has committed a batch and begun another, the lab kills
//! it (SIGKILL) and starts another, which claims what the dead one held once
//! it has been pending for a short while; the writers hold their next share of
//! writes back until then, so that writes keep coming after the restart. When
//! the writes are done and the stream is empty, the last flusher is stopped
//! and every acknowledged write is checked against the source: it is applied
//! when its key's row holds a newer version, or its version and payload.
//!
//! Write-behind needs a single Redis node that keeps what it acknowledged: the
//! lab's `--redis-url`, or a private `redis-server` with an append-only file;
//! without either, or on `--redis-cluster`, the scenario is skipped. Its
//! stream has no TTL (a `:sys:` structure): the scenario deletes it at the end.

use super::LabStore;
use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::write_behind::{WriteBehind, WriteOutcome};
use cachet::{Cache, RedisStore};
use clap::Args;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::child::{APPLIED, APPLYING, ChildProcess, DONE, READY, source_args};
use super::double_delete::namespace;
use super::redis_server::{Persistence, ScenarioRedis};
use super::report::{Latency, Row, find, format_us, times};
use super::source::{Db, Item};
use super::workload::build_cache;
use super::{Entry, Lab, expected, shares};
use crate::target::{ChildEnv, RedisTarget};

pub(super) const NAME: &str = "write-behind";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str =
    "A burst of writes, synchronous vs write-behind with its flusher killed (needs Redis)";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const SYNCHRONOUS: &str = "synchronous writes (write-through)";
const BEHIND: &str = "write-behind (flusher killed and restarted)";

/// How long a flusher's read waits for new writes; also how long it takes to
/// notice it is asked to stop.
pub(super) const FLUSHER_BLOCK: Duration = Duration::from_millis(50);
/// The longest a flusher pauses after a failed round.
pub(super) const FLUSHER_MAX_BACKOFF: Duration = Duration::from_millis(200);
/// How long a killed flusher's writes stay pending before the next one claims
/// them: short, so that the run does not wait, and far above a batch's time.
const MIN_IDLE: Duration = Duration::from_millis(200);
/// Most unflushed writes: more than any burst, so no write is refused.
const MAX_BACKLOG: u64 = 10_000_000;
/// How long a flusher may take to start, to report, or to stop.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);
/// A flusher nobody stops exits by itself after this long.
const CHILD_HANG_LIMIT: Duration = Duration::from_secs(300);
/// How long the writers may take, pauses for the flusher's restarts included.
const WRITERS_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the last flusher may take to empty the stream after the writes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the stream's length is read while it drains.
const DRAIN_STEP: Duration = Duration::from_millis(5);

/// Flags of the `write-behind` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "write-behind")]
pub(super) struct WriteBehindArgs {
    /// Writes of the burst, in each row
    #[arg(long, default_value_t = 4_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    wb_writes: u64,
    /// Keys the writes go to
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    wb_keys: u64,
    /// Concurrent writers (at most one per key: each owns a share of the keys)
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    wb_writers: u32,
    /// Most writes a flusher reads at once and applies in one transaction
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    wb_batch: u64,
    /// Times the flusher is killed (SIGKILL) mid-stream and restarted
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10))]
    wb_kills: u64,
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.write_behind;
    // Each kill waits for a batch to commit and another to begin: the writes of
    // one stretch between kills must fill more than one batch.
    if a.wb_writes / (a.wb_kills + 1) <= a.wb_batch {
        bail!(
            "--wb-writes ({}) must be more than --wb-batch ({}) times --wb-kills + 1 ({}), so \
             that the flusher has more than one batch to apply before each kill",
            a.wb_writes,
            a.wb_batch,
            a.wb_kills + 1
        );
    }
    if let Some(target) = lab.redis.as_ref().filter(|t| t.server_url().is_none()) {
        let why = if target.is_cluster() {
            "its script writes an entry and the stream, in two slots, in one step"
        } else {
            "its flusher, in a process of its own, connects with one server's URL"
        };
        lab.skip(
            NAME,
            &format!(
                "write-behind needs a single Redis node ({why}), and {} is not one; run it \
                 with --redis-url, or without Redis flags on a private redis-server.",
                target.describe()
            ),
        );
        return Ok(Vec::new());
    }
    let Some(redis) = ScenarioRedis::open(lab, Persistence::Aof).await? else {
        lab.skip(
            NAME,
            "write-behind queues writes in Redis, and there is no --redis-url and no \
             redis-server on PATH to start one with an append-only file.",
        );
        return Ok(Vec::new());
    };
    // The durability note about a server of the lab's own, thrown away at the
    // end, is no advice for anyone; on a server given to the lab it is.
    let _expected = redis.is_private().then(|| {
        expected::expect(
            &["cachet::write_behind::durability"],
            "the lab's throwaway redis-server",
        )
    });
    if redis.target.has_tls_files() {
        lab.skip(
            NAME,
            "write-behind's flusher connects with a URL alone and cannot take --redis-ca, \
             --redis-cert or --redis-key; run it without them.",
        );
        return Ok(Vec::new());
    }
    Ok(vec![
        synchronous(lab, &redis).await?,
        behind(lab, &redis).await?,
    ])
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(sync), Some(behind)) = (find(rows, NAME, "synchronous"), find(rows, NAME, "behind"))
    else {
        return format!("{NAME}: no result.");
    };
    let us = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), format_us);
    let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |n| n.to_string());
    format!(
        "{NAME}: the same burst of writes, acknowledged in p50 {} / p99 {} when each is a \
         source transaction and a cache write, and in p50 {} / p99 {} through write-behind \
         (one Redis script: the entry and the queued write). The source got {} transactions \
         synchronously and {} from write-behind's flushers (batches, coalesced per key). \
         The flusher was SIGKILLed mid-stream {} and restarted: of {} acknowledged writes, \
         {} are in the source, lost_writes {}.",
        us(sync.p50_us),
        us(sync.p99_us),
        us(behind.p50_us),
        us(behind.p99_us),
        n(sync.transactions),
        n(behind.transactions),
        times(behind.flusher_kills.unwrap_or(0)),
        n(behind.acknowledged),
        n(behind.applied),
        n(behind.lost_writes),
    )
}

/// A value's version: the row's `value`.
fn version_of(item: &Item) -> u64 {
    u64::try_from(item.value).unwrap_or(0)
}

/// What a write of `key` at `version` puts in the row besides its version.
fn payload(key: i64, version: i64) -> String {
    format!("write-{key}-{version}")
}

/// A cache with versions on `store`, in `namespace`.
fn versioned_cache(namespace: String, store: &RedisStore) -> Result<Cache<i64, Item>> {
    build_cache(namespace, &LabStore::shared(store.clone()), |b| {
        b.version_by(version_of)
    })
}

/// A store on the Redis server of `target` without an invalidation bus: the
/// scenario has no near cache.
async fn store(target: &RedisTarget) -> Result<RedisStore> {
    target
        .connect(target.another().invalidation_bus(false))
        .await
}

/// Write-behind on the cache in `namespace` on the Redis server of `target`,
/// as the lab and its flushers both open it.
pub(super) async fn open(
    target: &RedisTarget,
    namespace: String,
) -> Result<WriteBehind<i64, Item>> {
    let store = store(target).await?;
    let cache = versioned_cache(namespace, &store)?;
    WriteBehind::builder(store, &cache)
        .max_backlog(MAX_BACKLOG)
        .build()
        .await
        .context("cannot set up write-behind")
}

/// Removes what `wb` wrote: its cache's keys, and its streams, which live
/// without a TTL, whatever happened.
pub(super) async fn forget(lab: &Lab, target: &RedisTarget, wb: &WriteBehind<i64, Item>) {
    let deleted = async {
        let mut conn = store(target).await?.connection();
        redis::cmd("DEL")
            .arg(wb.stream())
            .arg(wb.dead_letter_stream())
            .query_async::<()>(&mut conn)
            .await
            .context("DEL failed")
    };
    if let Err(e) = deleted.await {
        tracing::warn!(stream = wb.stream(), error = %format!("{e:#}"),
            "cannot delete the lab's write-behind stream");
    }
    lab.forget(wb.cache()).await;
}

/// The keys of the run: `1..=wb_keys`.
fn keys(lab: &Lab) -> Result<RangeInclusive<i64>> {
    Ok(1..=i64::try_from(lab.args.write_behind.wb_keys).context("too many keys")?)
}

/// Registers `cache` for cleanup at the end of the run, on a Redis that
/// outlives it (a private server takes every key with it).
fn register(lab: &Lab, redis: &ScenarioRedis, cache: &Cache<i64, Item>) -> Result<()> {
    if !redis.is_private() {
        lab.written().push((cache.clone(), keys(lab)?));
    }
    Ok(())
}

async fn synchronous(lab: &Lab, redis: &ScenarioRedis) -> Result<Row> {
    lab.source.reset(lab.args.write_behind.wb_keys).await?;
    let db = lab.source.counted();
    let cache = versioned_cache(namespace(lab, NAME, "sync"), &store(&redis.target).await?)?;
    register(lab, redis, &cache)?;
    let started = Instant::now();
    let writer = Writer::Synchronous(cache.clone(), db.clone());
    let written = Burst::new(lab)?.run(writer, None);
    let written = tokio::time::timeout(WRITERS_TIMEOUT, written)
        .await
        .with_context(|| format!("the writers did not finish within {WRITERS_TIMEOUT:?}"))??;
    let elapsed = started.elapsed();
    let applied = applied(lab, &written.acked).await?;
    lab.forget(&cache).await;
    let mut row = written.row(lab, "synchronous", SYNCHRONOUS, applied);
    row.store = redis.target.kind();
    row.db_queries = db.reads();
    row.transactions = Some(db.transactions());
    Ok(row.elapsed(elapsed))
}

async fn behind(lab: &Lab, redis: &ScenarioRedis) -> Result<Row> {
    lab.source.reset(lab.args.write_behind.wb_keys).await?;
    let wb = open(&redis.target, namespace(lab, NAME, "behind")).await?;
    register(lab, redis, wb.cache())?;
    let outcome = flush_killed(lab, &redis.target, &wb).await;
    forget(lab, &redis.target, &wb).await;
    let mut row = outcome?;
    row.store = redis.target.kind();
    Ok(row)
}

/// The write-behind row: the burst, with the flusher killed `--wb-kills`
/// times and restarted, then the stream drained and the source checked.
async fn flush_killed(lab: &Lab, target: &RedisTarget, wb: &WriteBehind<i64, Item>) -> Result<Row> {
    let a = &lab.args.write_behind;
    let (source, source_env) = source_args(lab)?;
    let mut flushers = Flushers {
        target,
        namespace: wb.cache().namespace(),
        batch: a.wb_batch,
        source,
        env: target.child_env().and(&source_env),
        started: 0,
        transactions: 0,
    };
    let started = Instant::now();
    let mut flusher = flushers.start().await?;
    let (killed, kills_seen) = watch::channel(0_u64);
    let mut writers =
        tokio::spawn(Burst::new(lab)?.run(Writer::Behind(wb.clone()), Some(kills_seen)));
    let writes_deadline = started + WRITERS_TIMEOUT;
    let written = async {
        for kill in 1..=a.wb_kills {
            flushers.mid_batch(&mut flusher).await?;
            flushers.kill(&mut flusher).await?;
            killed.send_replace(kill);
            flusher = flushers.start().await?;
        }
        flushers
            .follow(&mut flusher, &mut writers, writes_deadline)
            .await
    }
    .await;
    if written.is_err() {
        writers.abort();
    }
    let written = written?;
    let drained = flushers.drain(&mut flusher, wb).await?;
    let stats = flushers.stop(&mut flusher).await?;
    let elapsed = started.elapsed();

    let applied = applied(lab, &written.acked).await?;
    let mut row = written.row(lab, "behind", BEHIND, applied);
    row.errors += stats.dead_lettered + stats.sink_errors + u64::from(!drained);
    row.transactions = Some(flushers.transactions);
    row.flusher_kills = Some(a.wb_kills);
    row.reclaimed = Some(stats.reclaimed);
    Ok(row.elapsed(elapsed))
}

/// Acknowledged writes whose effect is in the source: their key's row holds a
/// newer version, or their version and payload.
async fn applied(lab: &Lab, acked: &[(i64, i64)]) -> Result<u64> {
    let rows: HashMap<i64, Item> = lab
        .source
        .items()
        .await?
        .into_iter()
        .map(|i| (i.id, i))
        .collect();
    let applied = acked
        .iter()
        .filter(|&&(key, version)| {
            rows.get(&key).is_some_and(|row| {
                row.value > version
                    || (row.value == version && row.payload == payload(key, version))
            })
        })
        .count();
    Ok(applied as u64)
}

/// How one write is made.
#[derive(Clone, Debug)]
enum Writer {
    /// A transaction on the source, then the cache entry (write-through).
    Synchronous(Cache<i64, Item>, Db),
    /// The cache entry and the queued write, in one Redis script.
    Behind(WriteBehind<i64, Item>),
}

impl Writer {
    /// Writes `item`; whether it was acknowledged.
    async fn write(&self, item: Item) -> bool {
        let key = item.id;
        match self {
            Writer::Synchronous(cache, db) => cache
                .write_through(&key, || db.write_versioned(item))
                .await
                .is_ok(),
            Writer::Behind(wb) => matches!(
                wb.write_behind(&key, item).await,
                Ok(WriteOutcome::Queued { .. })
            ),
        }
    }
}

/// The burst: `wb_writes` writes by `wb_writers` writers, each writing the
/// keys it owns, back to back.
#[derive(Debug)]
struct Burst {
    /// Each writer's keys and writes.
    writers: Vec<(Vec<i64>, u64)>,
    /// Stretches the writes are cut into: the writers wait for a kill
    /// between two.
    stretches: u64,
    seeds: Vec<u64>,
}

/// What a burst did.
#[derive(Debug)]
struct Written {
    /// Acknowledged writes, as (key, version).
    acked: Vec<(i64, i64)>,
    errors: u64,
    latency: Latency,
}

impl Burst {
    fn new(lab: &Lab) -> Result<Self> {
        let a = &lab.args.write_behind;
        let writers = u64::from(a.wb_writers).min(a.wb_keys);
        let parts = u32::try_from(writers).context("too many writers")?;
        let mut owned = vec![Vec::new(); usize::try_from(writers)?];
        for key in keys(lab)? {
            let owner = usize::try_from((key - 1).unsigned_abs() % writers)?;
            owned[owner].push(key);
        }
        let writes = shares(a.wb_writes, parts);
        let seeds = (0..writers).map(|w| lab.seed_for(NAME, w)).collect();
        Ok(Self {
            writers: owned.into_iter().zip(writes).collect(),
            stretches: a.wb_kills + 1,
            seeds,
        })
    }

    /// Runs the writers to the end. With `kills`, each writer writes its share
    /// in stretches and, after stretch `n`, waits until `kills` reaches `n`.
    async fn run(self, writer: Writer, kills: Option<watch::Receiver<u64>>) -> Result<Written> {
        let mut tasks = JoinSet::new();
        for ((keys, writes), seed) in self.writers.into_iter().zip(self.seeds) {
            let writer = writer.clone();
            let (stretches, mut kills) = (self.stretches, kills.clone());
            tasks.spawn(async move {
                use rand::{Rng as _, SeedableRng as _};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut versions: HashMap<i64, i64> = HashMap::new();
                let mut out = Written {
                    acked: Vec::new(),
                    errors: 0,
                    latency: Latency::new(),
                };
                for n in 0..writes {
                    if let Some(kills) = &mut kills {
                        // The stretch `n` starts, once the kill before it happened.
                        let stretch = n * stretches / writes;
                        kills
                            .wait_for(|&k| k >= stretch)
                            .await
                            .context("the flusher's restarts stopped")?;
                    }
                    let key = keys[rng.random_range(0..keys.len())];
                    let version = versions.entry(key).or_insert(0);
                    *version += 1;
                    let item = Item {
                        id: key,
                        value: *version,
                        payload: payload(key, *version),
                    };
                    let t = Instant::now();
                    let acked = writer.write(item).await;
                    out.latency.record(t.elapsed());
                    if acked {
                        out.acked.push((key, *version));
                    } else {
                        out.errors += 1;
                    }
                }
                anyhow::Ok(out)
            });
        }
        let mut all = Written {
            acked: Vec::new(),
            errors: 0,
            latency: Latency::new(),
        };
        while let Some(done) = tasks.join_next().await {
            let one = done.context("a writer panicked")??;
            all.acked.extend(one.acked);
            all.errors += one.errors;
            all.latency.merge(&one.latency);
        }
        Ok(all)
    }
}

impl Written {
    /// The row's counts, given the acknowledged writes found `applied`.
    fn row(&self, lab: &Lab, slug: &'static str, strategy: &'static str, applied: u64) -> Row {
        let acknowledged = self.acked.len() as u64;
        let mut row = lab.row(NAME, slug, strategy);
        row.requests = acknowledged;
        row.writes = acknowledged;
        row.errors = self.errors;
        row.acknowledged = Some(acknowledged);
        row.applied = Some(applied);
        row.lost_writes = Some(acknowledged.saturating_sub(applied));
        row.with_latency(&self.latency)
    }
}

/// What the last flusher counted, from its report.
#[derive(Debug, Default)]
struct FlusherReport {
    reclaimed: u64,
    dead_lettered: u64,
    sink_errors: u64,
}

/// The flusher processes of the write-behind row, one at a time.
#[derive(Debug)]
struct Flushers<'a> {
    target: &'a RedisTarget,
    namespace: &'a str,
    batch: u64,
    source: Vec<String>,
    /// The environment of a flusher: the URLs of the target and the source.
    env: ChildEnv,
    /// Flushers started so far.
    started: u64,
    /// Transactions the flushers began on the source, as they reported.
    transactions: u64,
}

impl Flushers<'_> {
    /// Starts the next flusher and waits until it is connected.
    async fn start(&mut self) -> Result<ChildProcess> {
        let mut args = vec!["write-behind-flusher".to_owned()];
        args.extend(self.target.child_args());
        args.extend(["--namespace".into(), self.namespace.to_owned()]);
        args.extend(["--consumer".into(), format!("lab-flusher-{}", self.started)]);
        args.extend(["--batch-size".into(), self.batch.to_string()]);
        args.extend(["--min-idle-ms".into(), MIN_IDLE.as_millis().to_string()]);
        args.extend(["--hang-ms".into(), CHILD_HANG_LIMIT.as_millis().to_string()]);
        args.extend(self.source.iter().cloned());
        let mut flusher = ChildProcess::spawn(args, &self.env, "the flusher process")?;
        self.started += 1;
        let line = flusher.line(CHILD_TIMEOUT).await?;
        if line != READY {
            bail!("unexpected line from the flusher process: {line:?}");
        }
        Ok(flusher)
    }

    /// Counts a line of the flusher's; whether it says a transaction began.
    fn read(&mut self, line: &str) -> Result<bool> {
        if line.starts_with(APPLYING) {
            self.transactions += 1;
            Ok(true)
        } else if line.starts_with(APPLIED) {
            Ok(false)
        } else {
            bail!("unexpected line from the flusher process: {line:?}")
        }
    }

    /// Returns once the flusher has committed a batch and begun another: the
    /// source has some of the writes, and a batch is in flight.
    async fn mid_batch(&mut self, flusher: &mut ChildProcess) -> Result<()> {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let mut committed = false;
        // Bounded by the deadline: each turn reads a line before it.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = flusher.line(left).await?;
            let began = self.read(&line)?;
            if began && committed {
                return Ok(());
            }
            committed |= !began;
        }
    }

    /// Kills the flusher (SIGKILL) and counts what it said before it died.
    async fn kill(&mut self, flusher: &mut ChildProcess) -> Result<()> {
        flusher.kill().await?;
        let deadline = Instant::now() + CHILD_TIMEOUT;
        // What it wrote before the kill is still in the pipe, then its end.
        while let Some(line) = flusher
            .next_line(deadline.saturating_duration_since(Instant::now()))
            .await?
        {
            self.read(&line)?;
        }
        Ok(())
    }

    /// Waits for the `writers` to finish, reading the flusher meanwhile (its
    /// pipe must not fill up), until `deadline`.
    async fn follow(
        &mut self,
        flusher: &mut ChildProcess,
        writers: &mut JoinHandle<Result<Written>>,
        deadline: Instant,
    ) -> Result<Written> {
        // Bounded by the deadline: each turn reads a line or ends.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                done = &mut *writers => return done.context("the writers panicked")?,
                line = flusher.line(left) => { self.read(&line?)?; }
                () = tokio::time::sleep_until(deadline) => {
                    writers.abort();
                    bail!("the writers did not finish within {WRITERS_TIMEOUT:?}");
                }
            }
        }
    }

    /// Waits until the stream is empty, reading the flusher meanwhile;
    /// `false` if it was not within [`DRAIN_TIMEOUT`]. Nothing signals an
    /// empty stream: its length is polled.
    async fn drain(
        &mut self,
        flusher: &mut ChildProcess,
        wb: &WriteBehind<i64, Item>,
    ) -> Result<bool> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        // Bounded by the deadline: each turn reads a line or sleeps a step.
        while Instant::now() < deadline {
            if wb
                .backlog()
                .await
                .context("cannot read the stream's length")?
                == 0
            {
                return Ok(true);
            }
            tokio::select! {
                line = flusher.line(DRAIN_TIMEOUT) => { self.read(&line?)?; }
                () = tokio::time::sleep(DRAIN_STEP) => {}
            }
        }
        tracing::warn!(
            stream = wb.stream(),
            "the last flusher did not empty the stream in time"
        );
        Ok(false)
    }

    /// Asks the flusher to stop (closing its stdin), and reads what it says
    /// until its report.
    async fn stop(&mut self, flusher: &mut ChildProcess) -> Result<FlusherReport> {
        flusher.close_stdin();
        let deadline = Instant::now() + CHILD_TIMEOUT;
        // Bounded by the deadline: each turn reads a line before it.
        let report = loop {
            let line = flusher
                .line(deadline.saturating_duration_since(Instant::now()))
                .await?;
            if let Some(report) = line.strip_prefix(DONE) {
                break report.to_owned();
            }
            self.read(&line)?;
        };
        let numbers: Vec<u64> = report
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad report from the flusher process: {report:?}"))?;
        let &[_batches, _flushed, reclaimed, dead_lettered, sink_errors] = numbers.as_slice()
        else {
            bail!("bad report from the flusher process: {report:?}");
        };
        let status = flusher.wait(CHILD_TIMEOUT).await?;
        if !status.success() {
            bail!("the flusher process failed ({status})");
        }
        Ok(FlusherReport {
            reclaimed,
            dead_lettered,
            sink_errors,
        })
    }
}
