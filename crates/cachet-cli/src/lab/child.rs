//! `cachet __child …`: work the lab runs in a process of its own so that it can
//! kill that process at a chosen point. Hidden from `--help`; only the lab
//! starts it.
//!
//! A child reports on stdout with one line starting with [`DONE`]. The
//! double-delete writer then waits to be killed; it exits by itself when its
//! stdin closes (the lab is gone) or after `--hang-ms`, so it never outlives the
//! lab for long. A stampede caller first says [`READY`] and waits for a line on
//! stdin, so that the lab can start every process's callers at once. A
//! write-behind flusher says [`READY`] once connected, a line before and after
//! each transaction it runs on the source ([`APPLYING`], [`APPLIED`]), and its
//! counters once its stdin closes, when it stops.

use std::ffi::OsStr;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::write_behind::{Sink, Write};
use cachet::{BoxError, Cache};
use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::source::{Db, Item, Location};
use super::{ENTRY_TTL, LEASE_TTL, Lab, double_delete, write_behind};
use crate::target::{ChildEnv, DATABASE_URL_ENV, RedisArgs, SecretUrl};

/// The start of a child's report line.
pub(super) const DONE: &str = "done ";
/// A child's line once it is connected (and, for a stampede caller, waiting
/// for the start).
pub(super) const READY: &str = "ready";
/// A flusher's line before a transaction on the source, with its rows.
pub(super) const APPLYING: &str = "applying ";
/// A flusher's line after that transaction committed.
pub(super) const APPLIED: &str = "applied ";

/// Flags of `cachet __child`.
#[derive(Debug, Args)]
pub(crate) struct ChildArgs {
    #[command(subcommand)]
    task: ChildTask,
}

#[derive(Debug, Subcommand)]
enum ChildTask {
    /// Invalidate keys (with --twice, queue a second delete first), report, hang
    DoubleDelete(DoubleDeleteChild),
    /// Callers of one cold key through a cache of this process, on Redis
    Stampede(StampedeChild),
    /// A write-behind flusher of a lab cache's stream, until stdin closes
    WriteBehindFlusher(FlusherChild),
}

/// Where the run's source of truth is, for a child that opens it again.
#[derive(Debug, Args)]
struct SourceArgs {
    /// The source of truth on PostgreSQL
    #[arg(long, requires = "schema", env = DATABASE_URL_ENV, hide_env_values = true)]
    database_url: Option<SecretUrl>,
    /// The run's schema on PostgreSQL
    #[arg(long)]
    schema: Option<String>,
    /// The source of truth in SQLite
    #[arg(long, conflicts_with = "database_url")]
    sqlite_file: Option<PathBuf>,
}

impl SourceArgs {
    async fn open(&self, read_only: bool) -> Result<Db> {
        let at = match (&self.database_url, &self.schema, &self.sqlite_file) {
            (Some(url), Some(schema), None) => Location::Postgres { url, schema },
            (None, None, Some(file)) => Location::Sqlite { file, read_only },
            _ => bail!("give either --database-url and --schema, or --sqlite-file"),
        };
        Db::attach(at, 2).await
    }
}

/// The flags and the environment that give a child process the run's source
/// of truth (see [`SourceArgs`]): the database URL, which may hold a password,
/// goes in the environment (`DATABASE_URL`), never on the command line.
pub(super) fn source_args(lab: &Lab) -> Result<(Vec<String>, ChildEnv)> {
    match (lab.source.schema_name(), &lab.args.database_url) {
        (Some(schema), Some(url)) => Ok((
            vec!["--schema".into(), schema.into()],
            ChildEnv(vec![(DATABASE_URL_ENV, Some(url.to_string()))]),
        )),
        _ => match lab.source.sqlite_file() {
            Some(file) => Ok((
                vec!["--sqlite-file".into(), file.display().to_string()],
                ChildEnv(vec![(DATABASE_URL_ENV, None)]),
            )),
            None => bail!("the source of truth cannot be shared with other processes"),
        },
    }
}

#[derive(Debug, Args)]
struct DoubleDeleteChild {
    #[command(flatten)]
    redis: RedisArgs,
    /// The `:sys:` prefix of the deferred queue
    #[arg(long)]
    system_prefix: String,
    /// The cache's namespace
    #[arg(long)]
    namespace: String,
    /// Keys 1..=N to invalidate
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    keys: u64,
    /// Delay of the second delete, in milliseconds
    #[arg(long, default_value_t = 1_000)]
    delay_ms: u64,
    /// Delayed double-delete instead of a single delete
    #[arg(long)]
    twice: bool,
    /// Exit by itself after this long, in milliseconds
    #[arg(long, default_value_t = 120_000)]
    hang_ms: u64,
}

#[derive(Debug, Args)]
struct StampedeChild {
    #[command(flatten)]
    redis: RedisArgs,
    /// The cache's namespace
    #[arg(long)]
    namespace: String,
    /// The key every caller asks for
    #[arg(long)]
    key: i64,
    /// Concurrent callers in this process
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    callers: u32,
    /// How long a load takes on top of its query, in milliseconds
    #[arg(long)]
    load_ms: u64,
    #[command(flatten)]
    source: SourceArgs,
    /// Give up on a caller after this long, in milliseconds
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
}

#[derive(Debug, Args)]
struct FlusherChild {
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// The cache's namespace, whose stream the flusher reads
    #[arg(long)]
    namespace: String,
    /// The flusher's consumer name
    #[arg(long)]
    consumer: String,
    /// Most writes read at once
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    batch_size: u64,
    /// How long a write stays pending before it is claimed again, in milliseconds
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    min_idle_ms: u64,
    /// Stop by itself after this long, in milliseconds
    #[arg(long, default_value_t = 120_000)]
    hang_ms: u64,
}

/// Runs `cachet __child`.
pub(crate) async fn run(args: ChildArgs) -> Result<()> {
    match args.task {
        ChildTask::DoubleDelete(a) => double_delete_child(a).await,
        ChildTask::Stampede(a) => stampede_child(a).await,
        ChildTask::WriteBehindFlusher(a) => flusher_child(a).await,
    }
}

async fn double_delete_child(a: DoubleDeleteChild) -> Result<()> {
    let store = double_delete::queue_store(&a.redis.target()?, &a.system_prefix).await?;
    let cache: Cache<i64, Item> = store
        .serve(Cache::builder(a.namespace))
        .ttl(ENTRY_TTL)
        .negative_ttl(ENTRY_TTL)
        .lease_ttl(LEASE_TTL)
        .build()
        .context("cannot build the cache")?;
    let last = i64::try_from(a.keys).context("too many keys")?;
    let delay = Duration::from_millis(a.delay_ms);
    for id in 1..=last {
        if a.twice {
            cache.invalidate_twice(&id, delay).await?;
        } else {
            cache.invalidate(&id).await?;
        }
    }
    say(&format!("{DONE}{}", a.keys))?;
    hang(Duration::from_millis(a.hang_ms)).await;
    Ok(())
}

/// Waits until stdin closes or `limit` passes.
async fn hang(limit: Duration) {
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut buf = [0; 256];
        let mut stdin = std::io::stdin().lock();
        // Nobody writes to it: the first read returns at EOF. Bounded anyway.
        for _ in 0..1_000 {
            if matches!(stdin.read(&mut buf), Ok(0) | Err(_)) {
                break;
            }
        }
    });
    tokio::select! {
        _ = stdin_closed => {}
        () = tokio::time::sleep(limit) => {}
    }
}

/// Connects, says [`READY`], waits for a line on stdin, then lets every caller
/// ask for the key at once; reports `done <queries> <loads> <errors>` followed
/// by each caller's latency in microseconds.
async fn stampede_child(a: StampedeChild) -> Result<()> {
    let source = a.source.open(true).await?;
    let target = a.redis.target()?;
    let store = target.connect(target.another()).await?;
    let cache: Cache<i64, Item> = Cache::builder(a.namespace.clone())
        .ttl(ENTRY_TTL)
        .negative_ttl(ENTRY_TTL)
        .lease_ttl(LEASE_TTL)
        .store(store)
        .build()
        .context("cannot build the cache")?;
    let queries = Arc::new(AtomicU64::new(0));
    let load_time = Duration::from_millis(a.load_ms);
    let timeout = Duration::from_millis(a.timeout_ms);
    let callers = usize::try_from(a.callers).context("too many callers")?;
    // The callers and the start signal meet here.
    let barrier = Arc::new(Barrier::new(callers + 1));
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let (cache, source, queries, barrier) = (
            cache.clone(),
            source.clone(),
            Arc::clone(&queries),
            Arc::clone(&barrier),
        );
        let key = a.key;
        tasks.spawn(async move {
            barrier.wait().await;
            let t = Instant::now();
            let call = cache.get_or_load(&key, move || async move {
                queries.fetch_add(1, Ordering::Relaxed);
                let item = source.load(key).await?;
                tokio::time::sleep(load_time).await;
                Ok::<_, sqlx::Error>(item)
            });
            let ok = matches!(tokio::time::timeout(timeout, call).await, Ok(Ok(Some(_))));
            (t.elapsed(), ok)
        });
    }
    say(READY)?;
    let started = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|n| n > 0)
    })
    .await
    .context("waiting for the start failed")?
    .context("cannot read stdin")?;
    if !started {
        bail!("the lab went away before the start");
    }
    barrier.wait().await;
    let mut latencies = Vec::with_capacity(callers);
    let mut errors = 0_u64;
    while let Some(done) = tasks.join_next().await {
        let (elapsed, ok) = done.context("a caller panicked")?;
        latencies.push(elapsed.as_micros().to_string());
        if !ok {
            errors += 1;
        }
    }
    say(&format!(
        "{DONE}{} {} {errors} {}",
        queries.load(Ordering::Relaxed),
        cache.stats().loads,
        latencies.join(" ")
    ))
}

/// Applies batches to the source of truth, one transaction each, saying so
/// before and after.
#[derive(Debug)]
struct LabSink {
    db: Db,
}

impl Sink<i64, Item> for LabSink {
    async fn apply(&self, batch: &[Write<i64, Item>]) -> Result<(), BoxError> {
        let items = batch
            .iter()
            .map(|w| {
                let version = i64::try_from(w.version)?;
                Ok(Item {
                    id: w.key,
                    value: version,
                    payload: w.value.payload.clone(),
                })
            })
            .collect::<Result<Vec<Item>, std::num::TryFromIntError>>()?;
        say(&format!("{APPLYING}{}", items.len()))?;
        self.db.write_versioned_batch(&items).await?;
        say(&format!("{APPLIED}{}", items.len()))?;
        Ok(())
    }
}

/// Flushes the stream of the cache in `--namespace` into the source of truth
/// until stdin closes; reports `done <batches> <flushed> <reclaimed>
/// <dead-lettered> <sink errors>`.
async fn flusher_child(a: FlusherChild) -> Result<()> {
    let target = a.redis.target()?;
    let Some(url) = target.server_url() else {
        bail!("write-behind needs a single Redis server, not a Redis Cluster");
    };
    let db = a.source.open(false).await?;
    let wb = write_behind::open(&target, a.namespace).await?;
    let flusher = wb
        .flusher(LabSink { db })
        .consumer(a.consumer)
        .batch_size(usize::try_from(a.batch_size).context("batch too large")?)
        .min_idle(Duration::from_millis(a.min_idle_ms))
        .block(write_behind::FLUSHER_BLOCK)
        .max_backoff(write_behind::FLUSHER_MAX_BACKOFF)
        .connect(url)
        .await
        .context("cannot start the flusher")?;
    say(READY)?;
    flusher.run(hang(Duration::from_millis(a.hang_ms))).await;
    let s = flusher.stats();
    say(&format!(
        "{DONE}{} {} {} {} {}",
        s.batches, s.flushed, s.reclaimed, s.dead_lettered, s.sink_errors
    ))
}

/// A process of `cachet __child …` and its pipes, killed if dropped. It exits
/// by itself when its stdin closes.
#[derive(Debug)]
pub(super) struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    /// What it is, for messages: "a caller process".
    what: &'static str,
}

impl ChildProcess {
    /// Starts `cachet __child` with `args`, and `env` set (or removed) in
    /// its environment.
    pub(super) fn spawn<S: AsRef<OsStr>>(
        args: impl IntoIterator<Item = S>,
        env: &ChildEnv,
        what: &'static str,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the cachet executable")?;
        let mut command = tokio::process::Command::new(exe);
        for (name, value) in &env.0 {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let mut child = command
            .arg("__child")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", what))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .with_context(|| format!("no stdout from {what}"))?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            what,
        })
    }

    /// The next line it prints; an error if it exits first or says nothing
    /// within `timeout`.
    pub(super) async fn line(&mut self, timeout: Duration) -> Result<String> {
        self.next_line(timeout)
            .await?
            .with_context(|| format!("{} exited without reporting", self.what))
    }

    /// The next line it prints, or `None` once it has exited; an error if it
    /// says nothing within `timeout`.
    pub(super) async fn next_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("cannot read {}", self.what))),
            Err(_) => bail!("{} did not answer within {timeout:?}", self.what),
        }
    }

    /// Writes `line` to its stdin.
    pub(super) async fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("the stdin of {} is closed", self.what))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("cannot write to {}", self.what))
    }

    /// Closes its stdin, which tells it to finish.
    pub(super) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Kills it (SIGKILL) and reaps it.
    pub(super) async fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {}", self.what))
    }

    /// Waits at most `timeout` for it to exit.
    pub(super) async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("cannot reap {}", self.what)),
            Err(_) => bail!("{} did not exit within {timeout:?}", self.what),
        }
    }
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}
