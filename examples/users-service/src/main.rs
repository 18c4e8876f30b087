//! `users-service`: users in SQLite (the default) or PostgreSQL, read through
//! a cache, over HTTP.
//!
//! `--cache cachet` reads with `get_or_load` (lease-guarded fills,
//! single-flight, negative caching) and invalidates after each write's commit
//! (on PostgreSQL, the invalidation is also recorded in the write's
//! transaction through the outbox). `--cache naive` is plain cache-aside:
//! `get`, on a miss read the database and `set`; writers update, then delete.
//! `--cache none` reads the database every time.
//!
//! On start it prints `users-service listening on ADDR` on stdout.

mod app;
mod db;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use cachet::outbox::{Outbox, Relay};
use clap::{Parser, ValueEnum};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::app::{App, Mode};
use crate::db::{Db, User, tenant_of};

/// Users over HTTP, from SQLite or PostgreSQL, read through a cache.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0: any free port; the bound address is
    /// printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// PostgreSQL URL; without it, SQLite (see --sqlite).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// The SQLite file (created if missing); default: a temporary file removed
    /// at exit.
    #[arg(long, conflicts_with = "database_url")]
    sqlite: Option<PathBuf>,

    /// Redis URL for a shared cache; without it, the cache is in process.
    #[arg(long, env = "CACHET_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,

    /// Users seeded at start (ids 1..=N, tenant id % 16); existing rows are kept.
    #[arg(long, default_value_t = 10_000)]
    users: u64,

    /// How reads are cached.
    #[arg(long, value_enum, default_value_t = CacheArg::Cachet)]
    cache: CacheArg,

    /// Time to live of cached users, in seconds.
    #[arg(long, default_value_t = 60)]
    ttl_secs: u64,

    /// Time to live of cached "not found", in seconds (0: not cached).
    #[arg(long, default_value_t = 5)]
    negative_ttl_secs: u64,

    /// Milliseconds added after each database read returns, as a remote
    /// database's round trip would.
    #[arg(long, default_value_t = 0)]
    db_latency_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CacheArg {
    /// No cache: every read queries the database.
    None,
    /// Cache-aside without leases: get, on a miss query and set; writes update then delete.
    Naive,
    /// cachet's read-through with lease-guarded fills.
    Cachet,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,users_service=info".into()),
        )
        .init();
    let args = Args::parse();
    let latency = Duration::from_millis(args.db_latency_ms);

    // The temporary directory lives until `main` returns.
    let mut _temp = None;
    let db = match (&args.database_url, &args.sqlite) {
        (Some(url), _) => Db::postgres(url, latency).await?,
        (None, Some(path)) => Db::sqlite(path, latency).await?,
        (None, None) => {
            let dir = tempfile::tempdir().context("a temporary directory for SQLite")?;
            let db = Db::sqlite(&dir.path().join("users.db"), latency).await?;
            _temp = Some(dir);
            db
        }
    };
    db.seed(args.users).await.context("seeding users")?;

    let cache = match args.cache {
        CacheArg::None => None,
        CacheArg::Naive | CacheArg::Cachet => Some(build_cache(&args).await?),
    };

    // On PostgreSQL, the cachet mode records each invalidation in the write's
    // transaction, and a relay delivers it to the cache's store.
    let mut relay = None;
    let outbox = match (db.pg_pool(), &cache, args.cache) {
        (Some(pool), Some(cache), CacheArg::Cachet) => {
            let outbox = Outbox::new();
            outbox.migrate(pool).await.context("the outbox table")?;
            let r = Relay::new(outbox.clone(), pool.clone(), Arc::clone(cache.store()));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn({
                let r = r.clone();
                async move {
                    r.run(async {
                        let _ = stopped.await;
                    })
                    .await;
                }
            });
            relay = Some((r, stop, task));
            Some(outbox)
        }
        _ => None,
    };

    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;

    let mode = match args.cache {
        CacheArg::None => Mode::None,
        CacheArg::Naive => Mode::Naive,
        CacheArg::Cachet => Mode::Cachet,
    };
    let app = App::new(
        db.clone(),
        cache.clone(),
        mode,
        outbox,
        relay.as_ref().map(|(r, ..)| r.clone()),
        prometheus,
    );

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "users-service listening on {addr}")?;
        out.flush()?;
    }
    tracing::info!(%addr, mode = ?args.cache, users = args.users, "serving");

    axum::serve(listener, app.router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server")?;

    tracing::info!("shutting down");
    if let Some((_, stop, task)) = relay {
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(35), task)
            .await
            .is_err()
        {
            tracing::warn!("the outbox relay did not stop in time");
        }
    }
    if let Some(cache) = &cache
        && let Err(e) = cache.close(Duration::from_secs(5)).await
    {
        tracing::warn!(error = %e, "the cache could not deliver everything before exit");
    }
    db.close().await;
    Ok(())
}

async fn build_cache(args: &Args) -> Result<Cache<u64, User>> {
    let builder = Cache::builder("users")
        .ttl(Duration::from_secs(args.ttl_secs))
        .jitter(0.1)
        .negative_ttl(Duration::from_secs(args.negative_ttl_secs))
        .group_by(|id: &u64| tenant_of(*id));
    let builder = match &args.redis_url {
        Some(url) => {
            let store = cachet::RedisStore::connect(url)
                .await
                .context("cannot connect to Redis (--redis-url)")?;
            builder.store(store)
        }
        None => builder,
    };
    Ok(builder.build()?)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
