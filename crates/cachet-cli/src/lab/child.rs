//! `cachet __child …`: work the lab runs in a process of its own so that it can
//! kill that process at a chosen point. Hidden from `--help`; only the lab
//! starts it.
//!
//! A child reports on stdout with one line starting with [`DONE`]. The
//! double-delete writer then waits to be killed; it exits by itself when its
//! stdin closes (the lab is gone) or after `--hang-ms`, so it never outlives the
//! lab for long. A stampede caller first says [`READY`] and waits for a line on
//! stdin, so that the lab can start every process's callers at once.

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::Cache;
use clap::{Args, Subcommand};
use sqlx::Executor as _;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::source::Item;
use super::{ENTRY_TTL, LEASE_TTL, double_delete};
use crate::target::RedisArgs;

/// The start of a child's report line.
pub(super) const DONE: &str = "done ";
/// A stampede caller's line once it is connected and waiting for the start.
pub(super) const READY: &str = "ready";

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
    /// The source of truth on PostgreSQL
    #[arg(long, requires = "schema")]
    database_url: Option<String>,
    /// The run's schema on PostgreSQL
    #[arg(long)]
    schema: Option<String>,
    /// The source of truth in SQLite
    #[arg(long, conflicts_with = "database_url")]
    sqlite_file: Option<PathBuf>,
    /// Give up on a caller after this long, in milliseconds
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
}

/// Runs `cachet __child`.
pub(crate) async fn run(args: ChildArgs) -> Result<()> {
    match args.task {
        ChildTask::DoubleDelete(a) => double_delete_child(a).await,
        ChildTask::Stampede(a) => stampede_child(a).await,
    }
}

async fn double_delete_child(a: DoubleDeleteChild) -> Result<()> {
    let store = double_delete::queue_store(&a.redis.target()?, &a.system_prefix).await?;
    let cache: Cache<i64, Item> = Cache::builder(a.namespace)
        .ttl(ENTRY_TTL)
        .negative_ttl(ENTRY_TTL)
        .lease_ttl(LEASE_TTL)
        .store_arc(store)
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

const SELECT_ITEM: &str = "SELECT id, value, payload FROM items WHERE id = $1";

/// The source of truth, read-only, as this process sees it.
#[derive(Clone, Debug)]
enum ChildSource {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl ChildSource {
    async fn open(a: &StampedeChild) -> Result<Self> {
        match (&a.database_url, &a.schema, &a.sqlite_file) {
            (Some(url), Some(schema), None) => {
                let options = sqlx::postgres::PgConnectOptions::from_str(url)
                    .context("invalid PostgreSQL URL")?;
                let search_path: Arc<str> = format!("SET search_path TO {schema}").into();
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .after_connect(move |conn, _meta| {
                        let search_path = Arc::clone(&search_path);
                        Box::pin(async move {
                            conn.execute(&*search_path).await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await
                    .context("cannot connect to PostgreSQL")?;
                Ok(Self::Postgres(pool))
            }
            (None, None, Some(file)) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(file)
                    .read_only(true);
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("cannot open {}", file.display()))?;
                Ok(Self::Sqlite(pool))
            }
            _ => bail!("give either --database-url and --schema, or --sqlite-file"),
        }
    }

    async fn load(&self, id: i64) -> Result<Option<Item>, sqlx::Error> {
        let row: Option<(i64, i64, String)> = match self {
            Self::Postgres(p) => {
                sqlx::query_as(SELECT_ITEM)
                    .bind(id)
                    .fetch_optional(p)
                    .await?
            }
            Self::Sqlite(p) => {
                sqlx::query_as(SELECT_ITEM)
                    .bind(id)
                    .fetch_optional(p)
                    .await?
            }
        };
        Ok(row.map(|(id, value, payload)| Item { id, value, payload }))
    }
}

/// Connects, says [`READY`], waits for a line on stdin, then lets every caller
/// ask for the key at once; reports `done <queries> <loads> <errors>` followed
/// by each caller's latency in microseconds.
async fn stampede_child(a: StampedeChild) -> Result<()> {
    let source = ChildSource::open(&a).await?;
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

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}
