//! `cachet bench`: throughput and latency of cachet's hits, misses and
//! invalidations, each against its raw baseline, measured in the same run.
//!
//! Every row is a pair: cachet's operation and the baseline it is built on,
//! on the same keys and values of the same size. The two sides are measured in
//! alternating slices ([`ROUNDS`] each), so that whatever else the machine
//! does weighs on both alike. Each operation is timed on its own (the clock
//! reads are part of every latency, on both sides) into an HDR histogram;
//! throughput is the operations completed over the wall time of the slices.
//!
//! Rows: `memory_hit` (in-process store vs a bare quick_cache map),
//! `near_hit` (the near cache of a cache over Redis vs the same bare map),
//! `redis_hit` (a hit on Redis vs a raw `GET` of the same bytes on a
//! connection of its own), `redis_miss` (`get_or_load` with a loader that
//! sleeps `--load-latency` vs naive `GET`, load, `SET`) and `invalidate`
//! (`Cache::invalidate` vs a raw `DEL`). The Redis rows run on `--redis-url`
//! (or `--redis-cluster`, or `--redis-sentinel`), or else on a private
//! `redis-server` started for the run, and are skipped (with the reason) when
//! there is neither. On a cluster the baselines use a redis-rs cluster
//! connection.
//!
//! On a given Redis the bench keeps to namespaces of its own (`bench-<run>-…`),
//! every key it writes has a TTL, and at the end it deletes the keys it wrote
//! by their exact names.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::hint::black_box;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use cachet::{Cache, Codec, KeyLayout, MemoryStore, NearCache, RedisStore, Store};
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::lab::redis_server::{Persistence, PrivateRedis};
use crate::target::{RedisArgs, RedisTarget, parse_duration};
use crate::write_stdout;

/// Flags of `cachet bench`.
#[derive(Debug, Args)]
#[command(
    mut_group("RedisUrlArgs", |g| g.required(false)),
    mut_arg("redis_url", |a| a.help("The Redis server the Redis rows run on (rediss:// for TLS) \
        [default: a private redis-server, if one is installed]")),
    about = "Measure cachet's hits, misses and invalidations against raw baselines",
    long_about = "Measure throughput and latency of cachet's hits, misses and invalidations, \
        each against its raw baseline in the same run, and print one table.\n\n\
        Rows (cachet vs baseline, same keys, same value size):\n  \
        memory_hit   Cache::get on the in-process store vs a bare quick_cache get\n  \
        near_hit     Cache::get answered by the near cache (L1) vs a bare quick_cache get\n  \
        redis_hit    Cache::get on Redis vs a raw GET of the same bytes\n  \
        redis_miss   get_or_load (loader sleeping --load-latency) vs naive GET, load, SET\n  \
        invalidate   Cache::invalidate vs a raw DEL\n\n\
        Hit rows run at each --tasks count; misses and invalidations at the smallest and the \
        largest. The two sides of a row alternate in slices of --duration/4 each. The Redis \
        rows use --redis-url (or --redis-cluster, or --redis-sentinel), or else a private \
        redis-server started for the run (they are skipped, saying why, when none is \
        installed). On a cluster, the baselines send their commands through a redis-rs \
        cluster connection, which routes each by its key. On a given Redis the bench writes only \
        under namespaces of its own (bench-<run>-…), every key with a TTL, and deletes the keys \
        it wrote by name at the end; it never sends KEYS, SCAN or FLUSH*.\n\n\
        Latencies include the two clock reads around each operation, on both sides.\n\n\
        --json prints one JSON object per row on stdout, and nothing else:\n  \
        row               memory_hit, near_hit, redis_hit, redis_miss or invalidate\n  \
        tasks             concurrent tasks\n  \
        store             memory or redis\n  \
        cachet_op         what the cachet side does\n  \
        baseline_op       what the baseline side does\n  \
        cachet, baseline  each {ops, ops_per_sec, p50_ns, p99_ns, p999_ns}: operations \
        completed, per second of wall time, and latency percentiles in nanoseconds\n  \
        p50_ratio         cachet p50 / baseline p50 (above 1: cachet is slower)\n  \
        throughput_ratio  cachet ops_per_sec / baseline ops_per_sec (below 1: cachet is slower)\n  \
        value_size, keys  the --value-size and --keys of the run\n\
        A skipped row is one line on stderr: `<row>: skipped: <reason>`."
)]
pub(crate) struct BenchArgs {
    // Where the Redis rows run; by default on a private redis-server.
    #[command(flatten)]
    redis: RedisArgs,

    /// How long each side of each row is measured (e.g. 500ms, 2s)
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse_measure_time)]
    duration: Duration,

    /// Concurrent tasks of the hit rows, comma-separated
    #[arg(
        long,
        value_name = "N,…",
        value_delimiter = ',',
        default_value = "1,4,16,64",
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    tasks: Vec<u32>,

    /// Distinct keys the hit rows read
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    keys: u64,

    /// Bytes per value
    #[arg(long, value_name = "BYTES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    value_size: u32,

    /// How long the loader of the miss rows takes (a sleep; e.g. 1ms, 0ms)
    #[arg(long, value_name = "TIME", default_value = "1ms", value_parser = parse_load_latency)]
    load_latency: Duration,

    /// Print one JSON object per row on stdout, and nothing else
    #[arg(long)]
    json: bool,

    /// Serve Prometheus metrics of the bench's caches at http://ADDR/metrics
    /// while it runs (e.g. 127.0.0.1:9464)
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Slices per side of a row: the sides alternate, so drift weighs on both.
const ROUNDS: u32 = 4;
/// TTL of every key the bench writes: longer than any run, so nothing expires
/// mid-row, and still a bound on what a killed run leaves behind.
const ENTRY_TTL: Duration = Duration::from_secs(3600);
/// The most keys one side of a writing row (miss, invalidate) writes in a run.
const MAX_WRITES: u64 = 300_000;
/// The most operations one task does in one slice.
const MAX_OPS_PER_TASK: u64 = 100_000_000;
/// Writes in flight at once while filling the Redis hit rows.
const FILL_CONCURRENCY: usize = 64;
/// Commands per pipeline while preparing and cleaning up.
const BATCH: usize = 500;
/// Entries whose `DEL`s are built at once while cleaning up.
const CLEANUP_CHUNK: usize = 10_000;
/// How long deleting the run's keys may take.
const CLEANUP_TIME_LIMIT: Duration = Duration::from_secs(30);
/// How long the near cache's bus subscription may take to come up.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rows, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    MemoryHit,
    NearHit,
    RedisHit,
    RedisMiss,
    Invalidate,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::MemoryHit,
        Kind::NearHit,
        Kind::RedisHit,
        Kind::RedisMiss,
        Kind::Invalidate,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::MemoryHit => "memory_hit",
            Kind::NearHit => "near_hit",
            Kind::RedisHit => "redis_hit",
            Kind::RedisMiss => "redis_miss",
            Kind::Invalidate => "invalidate",
        }
    }

    /// What each side does: (cachet, baseline).
    fn ops(self) -> (&'static str, &'static str) {
        match self {
            Kind::MemoryHit => ("Cache::get, in-process store", "quick_cache get"),
            Kind::NearHit => ("Cache::get, near cache (L1) over Redis", "quick_cache get"),
            Kind::RedisHit => ("Cache::get on Redis", "raw GET of the same bytes"),
            Kind::RedisMiss => ("get_or_load: lease, load, fill", "naive GET, load, SET"),
            Kind::Invalidate => ("Cache::invalidate", "raw DEL"),
        }
    }

    fn needs_redis(self) -> bool {
        self != Kind::MemoryHit
    }

    fn is_hit(self) -> bool {
        matches!(self, Kind::MemoryHit | Kind::NearHit | Kind::RedisHit)
    }
}

/// One side of a row.
#[derive(Debug, Serialize)]
struct SideStats {
    ops: u64,
    ops_per_sec: f64,
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
}

/// One row of the report.
#[derive(Debug, Serialize)]
struct Row {
    row: &'static str,
    tasks: u32,
    store: &'static str,
    cachet_op: &'static str,
    baseline_op: &'static str,
    cachet: SideStats,
    baseline: SideStats,
    p50_ratio: f64,
    throughput_ratio: f64,
    value_size: u32,
    keys: u64,
}

/// What one side measured: its histogram, operations and wall time.
struct Sample {
    hist: Histogram<u64>,
    ops: u64,
    elapsed: Duration,
}

impl Sample {
    fn new() -> Result<Self> {
        Ok(Self {
            hist: new_histogram()?,
            ops: 0,
            elapsed: Duration::ZERO,
        })
    }

    fn add(&mut self, other: &Sample) -> Result<()> {
        self.hist
            .add(&other.hist)
            .map_err(|e| anyhow!("cannot merge latency histograms: {e:?}"))?;
        self.ops += other.ops;
        self.elapsed += other.elapsed;
        Ok(())
    }

    fn stats(&self) -> SideStats {
        let secs = self.elapsed.as_secs_f64();
        SideStats {
            ops: self.ops,
            ops_per_sec: if secs > 0.0 {
                self.ops as f64 / secs
            } else {
                0.0
            },
            p50_ns: self.hist.value_at_quantile(0.5),
            p99_ns: self.hist.value_at_quantile(0.99),
            p999_ns: self.hist.value_at_quantile(0.999),
        }
    }
}

/// Nanoseconds from 1 ns to 10 min, 3 significant digits.
fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| anyhow!("cannot create a latency histogram: {e:?}"))
}

/// One side of a row: an operation that the tasks of a slice repeat.
trait Op: Send + Sync + 'static {
    /// Does the `n`-th operation of task `task`; `Ok(false)` when there is
    /// nothing left to do (a writing row's keys are used up).
    fn call(&self, task: u32, n: u64) -> impl Future<Output = Result<bool>> + Send;

    /// Gets ready for a slice, untimed; `last_ops` is what this side did in its
    /// previous slice, if any.
    fn prepare(&self, last_ops: Option<u64>) -> impl Future<Output = Result<()>> + Send {
        let _ = last_ops;
        async { Ok(()) }
    }
}

/// Runs `op` on `tasks` tasks for `time` (bounded by [`MAX_OPS_PER_TASK`]).
async fn slice<O: Op>(op: &Arc<O>, tasks: u32, time: Duration) -> Result<Sample> {
    let start = Instant::now();
    let deadline = start + time;
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let op = Arc::clone(op);
        set.spawn(async move {
            let mut hist = new_histogram()?;
            let mut n = 0;
            while n < MAX_OPS_PER_TASK {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                if !op.call(task, n).await? {
                    break;
                }
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1));
                n += 1;
                // In-process operations never wait: give the other tasks of
                // this worker their turn now and then.
                tokio::task::coop::consume_budget().await;
            }
            Ok::<_, anyhow::Error>((hist, n))
        });
    }
    let mut sample = Sample::new()?;
    while let Some(done) = set.join_next().await {
        let (hist, n) = done.context("a benchmark task panicked")??;
        sample
            .hist
            .add(&hist)
            .map_err(|e| anyhow!("cannot merge latency histograms: {e:?}"))?;
        sample.ops += n;
    }
    sample.elapsed = start.elapsed();
    Ok(sample)
}

/// The run's settings, its progress bar, and where rows go.
struct Run {
    args: BenchArgs,
    /// Random, so that a run never touches another run's keys.
    run_id: String,
    slice_time: Duration,
    value: Bytes,
    /// `--keys` keys drawn at random, for the hit rows (a power of two long).
    draws: Arc<[u64]>,
    progress: ProgressBar,
    rows: Vec<Row>,
    skipped: Vec<String>,
}

impl Run {
    /// Measures the pair `cachet` / `baseline` at `tasks` tasks, alternating
    /// slices, and reports the row.
    async fn measure<A: Op, B: Op>(
        &mut self,
        kind: Kind,
        tasks: u32,
        cachet: &Arc<A>,
        baseline: &Arc<B>,
    ) -> Result<()> {
        self.progress
            .set_message(format!("{} at {tasks} task(s)", kind.name()));
        let (mut ours, mut theirs) = (Sample::new()?, Sample::new()?);
        let (mut ours_last, mut theirs_last) = (None, None);
        for round in 0..ROUNDS {
            for side in 0..2 {
                // Who goes first alternates too.
                if (side + round) % 2 == 0 {
                    cachet.prepare(ours_last).await?;
                    let s = slice(cachet, tasks, self.slice_time).await?;
                    ours_last = Some(s.ops);
                    ours.add(&s)?;
                } else {
                    baseline.prepare(theirs_last).await?;
                    let s = slice(baseline, tasks, self.slice_time).await?;
                    theirs_last = Some(s.ops);
                    theirs.add(&s)?;
                }
                self.progress.inc(1);
            }
        }
        let (cachet_op, baseline_op) = kind.ops();
        let (ours, theirs) = (ours.stats(), theirs.stats());
        let row = Row {
            row: kind.name(),
            tasks,
            store: if kind.needs_redis() {
                "redis"
            } else {
                "memory"
            },
            cachet_op,
            baseline_op,
            p50_ratio: ratio(ours.p50_ns as f64, theirs.p50_ns as f64),
            throughput_ratio: ratio(ours.ops_per_sec, theirs.ops_per_sec),
            cachet: ours,
            baseline: theirs,
            value_size: self.args.value_size,
            keys: self.args.keys,
        };
        if self.args.json {
            let line = serde_json::to_string(&row).context("cannot encode a row as JSON")?;
            self.progress
                .suspend(|| write_stdout(&format!("{line}\n")))?;
        }
        self.rows.push(row);
        Ok(())
    }

    fn skip(&mut self, kind: Kind, why: &str) {
        let line = format!("{}: skipped: {why}", kind.name());
        if self.args.json {
            self.progress.suspend(|| eprintln!("{line}"));
        }
        self.progress
            .inc(u64::from(ROUNDS) * 2 * self.task_counts(kind).len() as u64);
        self.skipped.push(line);
    }

    /// The task counts a row runs at.
    fn task_counts(&self, kind: Kind) -> Vec<u32> {
        let tasks = &self.args.tasks;
        if kind.is_hit() {
            return tasks.clone();
        }
        let (lo, hi) = (
            tasks.iter().copied().min().unwrap_or(1),
            tasks.iter().copied().max().unwrap_or(1),
        );
        if lo == hi { vec![lo] } else { vec![lo, hi] }
    }

    fn namespace(&self, what: &str) -> String {
        format!("bench-{}-{what}", self.run_id)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Runs `cachet bench`.
pub(crate) async fn run(mut args: BenchArgs) -> Result<()> {
    // The order given, each count once.
    let mut tasks = Vec::new();
    for t in std::mem::take(&mut args.tasks) {
        if !tasks.contains(&t) {
            tasks.push(t);
        }
    }
    if tasks.is_empty() {
        tasks.push(1);
    }
    args.tasks = tasks;

    let _metrics =
        crate::metrics_server::MetricsServer::start_if(args.metrics_addr, "bench").await?;
    let given = args.redis.given()?;
    // Connect first: a wrong URL fails before anything is measured.
    let (redis, private, redis_line) = match given {
        Some(target) => {
            let store = target.connect_checked().await?;
            let line = format!("Redis: {} (given)", target.describe());
            (Some((target, store)), None, line)
        }
        None => match PrivateRedis::start(Persistence::None).await? {
            Some(server) => {
                let target = RedisTarget::server(server.url());
                // Its settings are the run's own: no eviction warning.
                let store = target.connect(target.another()).await?;
                let line = format!(
                    "Redis: a private redis-server at {}, started for this run",
                    target.describe()
                );
                (Some((target, store)), Some(server), line)
            }
            None => (
                None,
                None,
                "Redis: none (no redis-server on PATH and no --redis-url)".to_owned(),
            ),
        },
    };

    let json = args.json;
    let value = Bytes::from(
        (0..args.value_size)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut rng = StdRng::seed_from_u64(42);
    let draws: Arc<[u64]> = (0..1 << 16)
        .map(|_| rng.random_range(0..args.keys))
        .collect();
    let slice_time = args.duration / ROUNDS;
    let mut run = Run {
        run_id: format!("{:08x}", rand::random::<u32>()),
        slice_time,
        value,
        draws,
        progress: ProgressBar::hidden(),
        rows: Vec::new(),
        skipped: Vec::new(),
        args,
    };
    let slices: u64 = Kind::ALL
        .iter()
        .map(|&k| run.task_counts(k).len() as u64 * u64::from(ROUNDS) * 2)
        .sum();
    if !json && std::io::stderr().is_terminal() {
        let style = ProgressStyle::with_template("{bar:30} {pos}/{len} slices, {msg} (eta {eta})")
            .context("bad progress template")?;
        run.progress = ProgressBar::with_draw_target(Some(slices), ProgressDrawTarget::stderr())
            .with_style(style);
    }
    if !json {
        write_stdout(&format!(
            "cachet bench: {} keys, {}-byte values, {:?} per side of each row, loader {:?}\n{redis_line}\n\n",
            run.args.keys, run.args.value_size, run.args.duration, run.args.load_latency
        ))?;
    }

    let raw = match &redis {
        Some((target, store)) => Some(Raw::connect(target, store).await?),
        None => None,
    };
    let written = Written::default();
    let outcome = tokio::select! {
        r = run_rows(&mut run, redis.as_ref().zip(raw.as_ref()), &written) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    run.progress.finish_and_clear();
    // A private server takes its keys with it; on a given one, delete them.
    if let (Some(raw), None) = (&raw, &private) {
        let cleaned = tokio::select! {
            r = tokio::time::timeout(CLEANUP_TIME_LIMIT, cleanup(raw, &written)) => r,
            _ = tokio::signal::ctrl_c() => Ok(Err(anyhow!("interrupted"))),
        };
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %crate::error_chain(&e),
                "cannot delete the bench's keys; they expire by their TTL"),
            Err(_) => tracing::warn!(
                "deleting the bench's keys took too long; the rest expire by their TTL"
            ),
        }
    }
    drop(private);
    outcome?;

    if !json {
        let mut out = table(&run.rows);
        out.push('\n');
        for kind in Kind::ALL {
            let (ours, theirs) = kind.ops();
            let _ = writeln!(out, "{:<11} {ours} vs {theirs}", kind.name());
        }
        out.push_str(
            "×p50: cachet p50 / baseline p50 (above 1: slower); ×ops/s: cachet throughput / \
             baseline throughput (below 1: slower).\n",
        );
        for line in &run.skipped {
            out.push_str(line);
            out.push('\n');
        }
        write_stdout(&out)?;
    }
    Ok(())
}

/// The keys the bench may have written on a given Redis, by namespace: the
/// entry keys of ids `0..upto` (read at cleanup, so that a row cut short by
/// Ctrl-C is covered too), and for cachet's namespaces their lease keys.
#[derive(Default)]
struct Written(std::sync::Mutex<Vec<(KeyLayout, bool, Arc<AtomicU64>)>>);

impl Written {
    /// Records a namespace, before anything is written in it.
    fn push(&self, layout: KeyLayout, leases: bool, upto: &Arc<AtomicU64>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((layout, leases, Arc::clone(upto)));
    }
}

async fn run_rows(
    run: &mut Run,
    redis: Option<(&(RedisTarget, RedisStore), &Raw)>,
    written: &Written,
) -> Result<()> {
    memory_hit(run).await.context("row memory_hit failed")?;
    let Some(((target, store), raw)) = redis else {
        let why =
            "no redis-server is installed to start a private one, and no --redis-url was given";
        for kind in Kind::ALL.into_iter().filter(|k| k.needs_redis()) {
            run.skip(kind, why);
        }
        return Ok(());
    };
    let store: Arc<dyn Store> = Arc::new(store.clone());
    let ctx = RedisCtx {
        target,
        store,
        raw: raw.clone(),
        written,
    };
    near_hit(run, &ctx).await.context("row near_hit failed")?;
    redis_hit(run, &ctx).await.context("row redis_hit failed")?;
    redis_miss(run, &ctx)
        .await
        .context("row redis_miss failed")?;
    invalidate(run, &ctx)
        .await
        .context("row invalidate failed")?;
    // The invalidations' bus notices still queued go out before the server
    // may stop (a private one does at the end of the run).
    let _ = tokio::time::timeout(Duration::from_secs(5), ctx.store.flush()).await;
    Ok(())
}

/// What the Redis rows share.
struct RedisCtx<'a> {
    target: &'a RedisTarget,
    store: Arc<dyn Store>,
    /// The baselines' connection.
    raw: Raw,
    written: &'a Written,
}

/// Bytes stored as they are: the cheapest codec, so that a Redis row measures
/// the cache rather than a serialisation format.
#[derive(Clone, Copy, Debug)]
struct RawBytes;

impl Codec<Bytes> for RawBytes {
    fn encode(&self, value: &Bytes, out: &mut Vec<u8>) -> Result<(), cachet::codec::CodecError> {
        out.extend_from_slice(value);
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Bytes, cachet::codec::CodecError> {
        Ok(Bytes::copy_from_slice(bytes))
    }
}

/// A hit through `Cache::get` of a drawn key.
struct CacheGet {
    cache: Cache<u64, Bytes>,
    draws: Arc<[u64]>,
}

impl Op for CacheGet {
    async fn call(&self, task: u32, n: u64) -> Result<bool> {
        let k = draw(&self.draws, task, n);
        match self.cache.get(&k).await? {
            Some(v) => {
                black_box(v.len());
                Ok(true)
            }
            None => bail!("key {k} missed in a hit row"),
        }
    }
}

/// A hit in a bare quick_cache map.
struct BareGet {
    map: quick_cache::sync::Cache<u64, Bytes>,
    draws: Arc<[u64]>,
}

impl Op for BareGet {
    async fn call(&self, task: u32, n: u64) -> Result<bool> {
        let k = draw(&self.draws, task, n);
        match self.map.get(&k) {
            Some(v) => {
                black_box(v.len());
                Ok(true)
            }
            None => bail!("key {k} missed in the bare map"),
        }
    }
}

/// The key of task `task`'s `n`-th read: tasks start at different places of
/// the same drawn sequence.
fn draw(draws: &[u64], task: u32, n: u64) -> u64 {
    let i = u64::from(task).wrapping_mul(7_919).wrapping_add(n);
    draws[(i as usize) & (draws.len() - 1)]
}

fn bare_map(run: &Run) -> Arc<BareGet> {
    let map = quick_cache::sync::Cache::new((run.args.keys as usize).saturating_mul(2));
    for k in 0..run.args.keys {
        map.insert(k, run.value.clone());
    }
    Arc::new(BareGet {
        map,
        draws: Arc::clone(&run.draws),
    })
}

async fn memory_hit(run: &mut Run) -> Result<()> {
    let capacity = (run.args.keys as usize).saturating_mul(2);
    let cache: Cache<u64, Bytes> = Cache::builder(run.namespace("memory"))
        .ttl(ENTRY_TTL)
        .codec(cachet::NoCodec)
        .memory(MemoryStore::new(capacity))
        .build()
        .context("cannot build the in-process cache")?;
    for k in 0..run.args.keys {
        cache.set(&k, run.value.clone()).await?;
    }
    let ours = Arc::new(CacheGet {
        cache,
        draws: Arc::clone(&run.draws),
    });
    let theirs = bare_map(run);
    for tasks in run.task_counts(Kind::MemoryHit) {
        run.measure(Kind::MemoryHit, tasks, &ours, &theirs).await?;
    }
    Ok(())
}

/// A cache over the Redis store, in the namespace `bench-<run>-<what>`.
fn redis_cache(
    run: &Run,
    ctx: &RedisCtx<'_>,
    what: &str,
    near: Option<NearCache>,
) -> Result<Cache<u64, Bytes>> {
    let mut builder = Cache::builder(run.namespace(what))
        .ttl(ENTRY_TTL)
        .codec(RawBytes)
        .store(Arc::clone(&ctx.store));
    if let Some(near) = near {
        builder = builder.near_cache(near);
    }
    builder.build().context("cannot build the cache over Redis")
}

/// Writes every hit key through `cache`, a few at a time.
async fn fill(run: &Run, ctx: &RedisCtx<'_>, cache: &Cache<u64, Bytes>) -> Result<()> {
    let keys = Arc::new(AtomicU64::new(run.args.keys));
    ctx.written.push(cache.layout().clone(), true, &keys);
    let mut pending = JoinSet::new();
    for k in 0..run.args.keys {
        if pending.len() >= FILL_CONCURRENCY
            && let Some(done) = pending.join_next().await
        {
            done.context("a fill task panicked")??;
        }
        let (cache, value) = (cache.clone(), run.value.clone());
        pending.spawn(async move { cache.set(&k, value).await });
    }
    while let Some(done) = pending.join_next().await {
        done.context("a fill task panicked")??;
    }
    Ok(())
}

async fn near_hit(run: &mut Run, ctx: &RedisCtx<'_>) -> Result<()> {
    let capacity = (run.args.keys as usize).saturating_mul(2);
    // The bus needs a store of its own: one with the invalidation bus on.
    let store = ctx.target.connect(ctx.target.another()).await?;
    let cache: Cache<u64, Bytes> = Cache::builder(run.namespace("near"))
        .ttl(ENTRY_TTL)
        .codec(RawBytes)
        .store(store)
        .near_cache(NearCache::new(capacity, ENTRY_TTL))
        .build()
        .context("cannot build the cache with a near cache")?;
    // L1 is bypassed until the bus subscription is up (counted as a clear).
    let deadline = Instant::now() + SUBSCRIBE_TIMEOUT;
    while cache.stats().near_clears == 0 {
        if Instant::now() > deadline {
            run.skip(
                Kind::NearHit,
                &format!(
                    "the near cache's bus subscription was not up within {SUBSCRIBE_TIMEOUT:?}"
                ),
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fill(run, ctx, &cache).await?;
    // The notices of those writes come back through the bus and drop what L1
    // holds; once they are through, reads from Redis fill L1 for good.
    let mut warm = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = cache.stats().near_hits;
        for k in 0..run.args.keys {
            cache.get(&k).await?;
        }
        if cache.stats().near_hits - before == run.args.keys {
            warm = true;
            break;
        }
    }
    if !warm {
        run.skip(
            Kind::NearHit,
            "the near cache did not hold every key after 100 passes",
        );
        return Ok(());
    }
    let ours = Arc::new(CacheGet {
        cache,
        draws: Arc::clone(&run.draws),
    });
    let theirs = bare_map(run);
    for tasks in run.task_counts(Kind::NearHit) {
        let before = ours.cache.stats();
        run.measure(Kind::NearHit, tasks, &ours, &theirs).await?;
        let after = ours.cache.stats();
        let (near, all) = (after.near_hits - before.near_hits, after.hits - before.hits);
        if near < all {
            tracing::warn!(
                tasks,
                near_hits = near,
                hits = all,
                "some near_hit reads went to Redis"
            );
        }
    }
    Ok(())
}

/// A raw `GET` of the entry a cache wrote.
struct RawGet {
    conn: Raw,
    names: Arc<[String]>,
    draws: Arc<[u64]>,
}

impl Op for RawGet {
    async fn call(&self, task: u32, n: u64) -> Result<bool> {
        let k = draw(&self.draws, task, n);
        let mut conn = self.conn.clone();
        let v: Option<Bytes> = redis::cmd("GET")
            .arg(&self.names[k as usize])
            .query_async(&mut conn)
            .await
            .context("GET failed")?;
        match v {
            Some(v) => {
                black_box(v.len());
                Ok(true)
            }
            None => bail!("key {} missed in the raw GET", self.names[k as usize]),
        }
    }
}

async fn redis_hit(run: &mut Run, ctx: &RedisCtx<'_>) -> Result<()> {
    let cache = redis_cache(run, ctx, "hit", None)?;
    fill(run, ctx, &cache).await?;
    let names: Arc<[String]> = (0..run.args.keys)
        .map(|k| cache.store_key(&k).as_str().to_owned())
        .collect();
    let ours = Arc::new(CacheGet {
        cache,
        draws: Arc::clone(&run.draws),
    });
    let theirs = Arc::new(RawGet {
        conn: ctx.raw.clone(),
        names,
        draws: Arc::clone(&run.draws),
    });
    for tasks in run.task_counts(Kind::RedisHit) {
        run.measure(Kind::RedisHit, tasks, &ours, &theirs).await?;
    }
    Ok(())
}

/// Ids handed out once each, below `end`: `next` never passes `end`, so
/// every id below it was handed out.
struct Ids {
    next: Arc<AtomicU64>,
    end: AtomicU64,
}

impl Ids {
    fn new(end: u64) -> Self {
        Self {
            next: Arc::new(AtomicU64::new(0)),
            end: AtomicU64::new(end),
        }
    }

    fn take(&self) -> Option<u64> {
        let end = self.end.load(Ordering::Acquire);
        self.next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| {
                (id < end).then_some(id + 1)
            })
            .ok()
    }
}

/// A miss through `get_or_load`, each of a key never read before.
struct CacheLoad {
    cache: Cache<u64, Bytes>,
    ids: Ids,
    value: Bytes,
    latency: Duration,
}

impl Op for CacheLoad {
    async fn call(&self, _: u32, _: u64) -> Result<bool> {
        let Some(id) = self.ids.take() else {
            return Ok(false);
        };
        let (value, latency) = (self.value.clone(), self.latency);
        let v = self
            .cache
            .get_or_load(&id, move || async move {
                tokio::time::sleep(latency).await;
                Ok::<_, Infallible>(Some(value))
            })
            .await?;
        match v {
            Some(v) => {
                black_box(v.len());
                Ok(true)
            }
            None => bail!("get_or_load returned nothing for key {id}"),
        }
    }
}

/// Naive cache-aside: `GET`, on a miss load, `SET` with a TTL.
struct NaiveLoad {
    conn: Raw,
    layout: KeyLayout,
    ids: Ids,
    value: Bytes,
    latency: Duration,
}

impl Op for NaiveLoad {
    async fn call(&self, _: u32, _: u64) -> Result<bool> {
        let Some(id) = self.ids.take() else {
            return Ok(false);
        };
        let name = self.layout.key(&id);
        let mut conn = self.conn.clone();
        let hit: Option<Bytes> = redis::cmd("GET")
            .arg(name.as_str())
            .query_async(&mut conn)
            .await
            .context("GET failed")?;
        if hit.is_some() {
            bail!("{} was there before its first read", name.as_str());
        }
        tokio::time::sleep(self.latency).await;
        let () = redis::cmd("SET")
            .arg(name.as_str())
            .arg(self.value.as_ref())
            .arg("PX")
            .arg(ttl_ms())
            .query_async(&mut conn)
            .await
            .context("SET failed")?;
        Ok(true)
    }
}

fn ttl_ms() -> u64 {
    ENTRY_TTL.as_millis() as u64
}

async fn redis_miss(run: &mut Run, ctx: &RedisCtx<'_>) -> Result<()> {
    let cache = redis_cache(run, ctx, "miss", None)?;
    let naive = KeyLayout::new(KeyLayout::DEFAULT_PREFIX, &run.namespace("miss-naive"))
        .context("bad namespace")?;
    let ours = Arc::new(CacheLoad {
        cache,
        ids: Ids::new(MAX_WRITES),
        value: run.value.clone(),
        latency: run.args.load_latency,
    });
    let theirs = Arc::new(NaiveLoad {
        conn: ctx.raw.clone(),
        layout: naive,
        ids: Ids::new(MAX_WRITES),
        value: run.value.clone(),
        latency: run.args.load_latency,
    });
    // Whatever was handed out may have been written.
    ctx.written
        .push(ours.cache.layout().clone(), true, &ours.ids.next);
    ctx.written
        .push(theirs.layout.clone(), false, &theirs.ids.next);
    for tasks in run.task_counts(Kind::RedisMiss) {
        run.measure(Kind::RedisMiss, tasks, &ours, &theirs).await?;
    }
    Ok(())
}

/// Deletes keys written beforehand ([`Op::prepare`] writes them), one per
/// operation: through `Cache::invalidate` (`cache`) or a raw `DEL`.
struct Delete {
    cache: Option<Cache<u64, Bytes>>,
    layout: KeyLayout,
    conn: Raw,
    ids: Ids,
    value: Bytes,
    /// The end of the ids written, raised before each batch is written.
    written: Arc<AtomicU64>,
}

impl Op for Delete {
    async fn call(&self, _: u32, _: u64) -> Result<bool> {
        let Some(id) = self.ids.take() else {
            return Ok(false);
        };
        match &self.cache {
            Some(cache) => cache.invalidate(&id).await?,
            None => {
                let mut conn = self.conn.clone();
                let n: i64 = redis::cmd("DEL")
                    .arg(self.layout.key(&id).as_str())
                    .query_async(&mut conn)
                    .await
                    .context("DEL failed")?;
                black_box(n);
            }
        }
        Ok(true)
    }

    /// Writes twice as many keys as the previous slice deleted (10,000 for
    /// the first), within [`MAX_WRITES`], with a pipelined raw `SET` of the
    /// value on both sides: a delete does not read what it deletes.
    async fn prepare(&self, last_ops: Option<u64>) -> Result<()> {
        let end = self.ids.end.load(Ordering::Acquire);
        let next = self.ids.next.load(Ordering::Relaxed);
        let want = last_ops.map_or(10_000, |n| n.saturating_mul(2).max(1_000));
        let ready = end - next;
        let new_end = (end + want.saturating_sub(ready)).min(MAX_WRITES);
        if new_end <= end {
            return Ok(());
        }
        self.written.store(new_end, Ordering::Release);
        let sets: Vec<Cmd> = (end..new_end)
            .map(|id| {
                let mut set = redis::cmd("SET");
                set.arg(self.layout.key(&id).as_str())
                    .arg(self.value.as_ref())
                    .arg("PX")
                    .arg(ttl_ms());
                set
            })
            .collect();
        self.conn
            .send_all(sets)
            .await
            .context("cannot write the keys to invalidate")?;
        self.ids.end.store(new_end, Ordering::Release);
        Ok(())
    }
}

async fn invalidate(run: &mut Run, ctx: &RedisCtx<'_>) -> Result<()> {
    let cache = redis_cache(run, ctx, "inv", None)?;
    let naive = KeyLayout::new(KeyLayout::DEFAULT_PREFIX, &run.namespace("inv-naive"))
        .context("bad namespace")?;
    let side = |cache: Option<Cache<u64, Bytes>>, layout: KeyLayout| {
        let written = Arc::new(AtomicU64::new(0));
        ctx.written.push(layout.clone(), cache.is_some(), &written);
        Arc::new(Delete {
            cache,
            layout,
            conn: ctx.raw.clone(),
            ids: Ids::new(0),
            value: run.value.clone(),
            written,
        })
    };
    let ours = side(Some(cache.clone()), cache.layout().clone());
    let theirs = side(None, naive);
    for tasks in run.task_counts(Kind::Invalidate) {
        run.measure(Kind::Invalidate, tasks, &ours, &theirs).await?;
    }
    Ok(())
}

/// Deletes every key the run wrote on a given Redis, by name: entry keys,
/// and with each the lease key of cachet's namespaces (in the same slot), one
/// `DEL` per entry.
async fn cleanup(raw: &Raw, written: &Written) -> Result<()> {
    let all = std::mem::take(
        &mut *written
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for (layout, leases, upto) in all {
        let ids: Vec<u64> = (0..upto.load(Ordering::Acquire)).collect();
        for chunk in ids.chunks(CLEANUP_CHUNK) {
            let dels = chunk
                .iter()
                .map(|id| {
                    let key = layout.key(id);
                    let mut del = redis::cmd("DEL");
                    del.arg(key.as_str());
                    if leases {
                        del.arg(key.lease_key());
                    }
                    del
                })
                .collect();
            raw.send_all(dels).await.context("DEL failed")?;
        }
    }
    Ok(())
}

/// The baselines' connection: a plain one to the server, or on a cluster a
/// redis-rs cluster connection, which routes each command by its key.
#[derive(Clone)]
enum Raw {
    Server(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn connect(target: &RedisTarget, store: &RedisStore) -> Result<Self> {
        if target.is_cluster() {
            return Ok(Self::Cluster(target.cluster_connection().await?));
        }
        let node = target
            .masters(&store.connection())
            .await?
            .into_iter()
            .next()
            .context("no Redis server to connect to")?;
        Ok(Self::Server(node.connect().await?))
    }

    /// Sends `cmds`, each of whose keys share a slot, and checks every reply:
    /// [`BATCH`] to a pipeline on a server; on a cluster, where a pipeline
    /// must keep to one slot, each on its own, [`FILL_CONCURRENCY`] at once.
    async fn send_all(&self, cmds: Vec<Cmd>) -> Result<()> {
        if let Self::Server(conn) = self {
            let mut conn = conn.clone();
            for chunk in cmds.chunks(BATCH) {
                let mut pipe = redis::pipe();
                for cmd in chunk {
                    pipe.add_command(cmd.clone()).ignore();
                }
                let () = pipe.query_async(&mut conn).await?;
            }
            return Ok(());
        }
        let mut pending = JoinSet::new();
        for cmd in cmds {
            if pending.len() >= FILL_CONCURRENCY
                && let Some(done) = pending.join_next().await
            {
                done.context("a Redis command's task panicked")??;
            }
            let mut conn = self.clone();
            pending.spawn(async move { cmd.query_async::<Value>(&mut conn).await });
        }
        while let Some(done) = pending.join_next().await {
            done.context("a Redis command's task panicked")??;
        }
        Ok(())
    }
}

impl ConnectionLike for Raw {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The table of `rows`, within 120 columns.
fn table(rows: &[Row]) -> String {
    const HEADERS: [&str; 12] = [
        "row", "tasks", "ops/s", "p50", "p99", "p99.9", "ops/s", "p50", "p99", "p99.9", "×p50",
        "×ops/s",
    ];
    let cells: Vec<[String; 12]> = rows
        .iter()
        .map(|r| {
            [
                r.row.to_owned(),
                r.tasks.to_string(),
                format_rate(r.cachet.ops_per_sec),
                format_ns(r.cachet.p50_ns),
                format_ns(r.cachet.p99_ns),
                format_ns(r.cachet.p999_ns),
                format_rate(r.baseline.ops_per_sec),
                format_ns(r.baseline.p50_ns),
                format_ns(r.baseline.p99_ns),
                format_ns(r.baseline.p999_ns),
                format!("{:.2}", r.p50_ratio),
                format!("{:.2}", r.throughput_ratio),
            ]
        })
        .collect();
    let width = |s: &str| s.chars().count();
    let mut widths = HEADERS.map(width);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let line = |cells: &[String; 12]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w - width(cell));
            let sep = match i {
                0 => "",
                2 | 6 | 10 => " │ ",
                _ => "  ",
            };
            out.push_str(sep);
            if i == 0 {
                out.push_str(cell);
                out.push_str(&pad);
            } else {
                out.push_str(&pad);
                out.push_str(cell);
            }
        }
        out.push('\n');
        out
    };
    // The group line: cachet's and the baseline's columns, and the ratios.
    let span =
        |from: usize, to: usize| widths[from..to].iter().sum::<usize>() + 2 * (to - from - 1);
    let mut out = format!(
        "{:<w0$} │ {:<w1$} │ {:<w2$} │ {}\n",
        "",
        "cachet",
        "baseline",
        "cachet/baseline",
        w0 = span(0, 2),
        w1 = span(2, 6),
        w2 = span(6, 10),
    );
    out.push_str(&line(&HEADERS.map(str::to_owned)));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// Operations per second, short: `850`, `12.3k`, `1.23M`.
fn format_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else if r >= 1e3 {
        format!("{:.2}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// A latency in nanoseconds, short: `85ns`, `1.23µs`, `350µs`, `1.23ms`.
fn format_ns(ns: u64) -> String {
    let ns = ns as f64;
    let (v, unit) = match ns {
        n if n < 1e3 => return format!("{n:.0}ns"),
        n if n < 1e6 => (n / 1e3, "µs"),
        n if n < 1e9 => (n / 1e6, "ms"),
        n => (n / 1e9, "s"),
    };
    if v < 10.0 {
        format!("{v:.2}{unit}")
    } else if v < 100.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

fn parse_measure_time(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(20)..=Duration::from_secs(600)).contains(&d) {
        return Err("give 20ms to 10m".to_owned());
    }
    Ok(d)
}

fn parse_load_latency(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_secs(10) {
        return Err("give at most 10s".to_owned());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_measure_time("1ms").is_err());
        assert!(parse_load_latency("0ms").is_ok());
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(format_ns(85), "85ns");
        assert_eq!(format_ns(1_234), "1.23µs");
        assert_eq!(format_ns(350_000), "350µs");
        assert_eq!(format_ns(1_234_567), "1.23ms");
        assert_eq!(format_rate(850.0), "850");
        assert_eq!(format_rate(12_345.0), "12.3k");
        assert_eq!(format_rate(1_234_567.0), "1.23M");
    }

    #[test]
    fn the_table_fits_120_columns() {
        let side = || SideStats {
            ops: 123_456_789,
            ops_per_sec: 123_456_789.0,
            p50_ns: 999_999_999,
            p99_ns: 999_999_999,
            p999_ns: 999_999_999,
        };
        let row = Row {
            row: "redis_miss",
            tasks: 1024,
            store: "redis",
            cachet_op: "",
            baseline_op: "",
            cachet: side(),
            baseline: side(),
            p50_ratio: 123.456,
            throughput_ratio: 0.001,
            value_size: 100,
            keys: 10,
        };
        let out = table(&[row]);
        for line in out.lines() {
            assert!(line.chars().count() <= 120, "{line}");
        }
    }
}
