//! `cachet lab`: runs failure modes of caching side by side, naive vs
//! protected, and reports them as one table.
//!
//! This module owns the command's flags, the run's shared context ([`Lab`]: the
//! store, the source of truth, the run id that keeps keys and schemas apart) and
//! the registry of scenarios, [`SCENARIOS`], in their default order. Each
//! scenario lives in a module of its own with the same entry points,
//! `run(&Lab) -> Vec<Row>` and `summary(&[Row]) -> String`, which its
//! `SCENARIO` constant (an [`Entry`], a [`Scenario`]) registers under its name.
//!
//! Adding a scenario touches exactly these places: its own module (its rows,
//! its summary, its flags as a clap `Args` struct), its `mod` line and its
//! line in [`SCENARIOS`] here, and, when it has flags, one
//! `#[command(flatten)]` field of [`LabArgs`]. `--scenario` takes its values
//! from the registry. Rows carry a stable strategy slug ([`Row::slug`]) that
//! summaries, tests and `--json` consumers find them by.

mod admin;
mod audit;
mod avalanche;
mod chaos;
pub(crate) mod child;
mod double_delete;
pub(crate) mod expected;
mod fail_safe;
mod groups;
mod hit_rate;
mod near_cache;
mod outage;
mod outbox;
mod penetration;
mod plot;
mod race;
pub(crate) mod redis_server;
mod refresh_ahead;
mod report;
mod source;
mod stampede;
mod vanish;
mod workload;
mod write_behind;
mod write_through_race;

use std::io::IsTerminal as _;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use cachet::{Cache, MemoryStore, Store};
use clap::Args;
use tokio::task::JoinSet;

use crate::target::{DATABASE_URL_ENV, RedisArgs, RedisTarget, SecretUrl};
use crate::write_stdout;
use report::{Row, RowContext};
use source::{Item, Source};

/// Flags of `cachet lab`.
#[derive(Debug, Args)]
#[command(
    mut_group("RedisUrlArgs", |g| g.required(false)),
    mut_arg("redis_url", |a| a.help("Use the Redis server at URL as the cache store instead of \
        the in-process one (rediss:// for TLS)")),
    about = "Run caching failure modes side by side, naive vs protected",
    long_about = "Run caching failure modes side by side, naive vs protected, and print one table.\n\n\
        Without flags the lab runs embedded: an in-process store and a temporary SQLite \
        database (the scenarios that need Redis start a private redis-server). --redis-url, \
        --redis-cluster or --redis-sentinel, and --database-url, run it against real servers; \
        it then keeps to a namespace (Redis) and a schema (PostgreSQL) of its own, and removes \
        them at the end. \
        It never sends KEYS, SCAN or FLUSH*, and disrupts a server it was given (outage, chaos) only \
        with --allow-disruption."
)]
pub(crate) struct LabArgs {
    /// Scenario to run; repeat for several [default: all, in the order shown]
    #[arg(long = "scenario", value_name = "NAME", value_parser = scenario_names())]
    scenarios: Vec<String>,

    // The Redis the caches use; by default the in-process store.
    #[command(flatten)]
    redis: RedisArgs,

    /// Let the outage and chaos scenarios make the Redis given with --redis-url,
    /// --redis-cluster or --redis-sentinel hang for a moment (CLIENT PAUSE on
    /// every node; behind Sentinel, the primary); without it, they are skipped
    /// there
    #[arg(long)]
    allow_disruption: bool,

    /// Use the PostgreSQL database at URL as the source of truth instead of SQLite
    #[arg(long, value_name = "URL", env = DATABASE_URL_ENV, hide_env_values = true)]
    database_url: Option<SecretUrl>,

    /// Print one JSON object per row on stdout, and nothing else
    #[arg(long)]
    json: bool,

    /// Write one SVG per scenario with database queries per 100 ms over time
    /// (avalanche, vanish) into DIR
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,

    /// Serve Prometheus metrics of the lab's caches at http://ADDR/metrics
    /// while it runs (e.g. 127.0.0.1:9091)
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,

    /// Seed of the workloads' random choices [default: random]
    #[arg(long)]
    seed: Option<u64>,

    /// Count-based scenarios (penetration, hit-rate): concurrent workers
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,

    #[command(flatten)]
    race: race::RaceArgs,
    #[command(flatten)]
    double_delete: double_delete::DoubleDeleteArgs,
    #[command(flatten)]
    stampede: stampede::StampedeArgs,
    #[command(flatten)]
    penetration: penetration::PenetrationArgs,
    #[command(flatten)]
    hit_rate: hit_rate::HitRateArgs,
    #[command(flatten)]
    avalanche: avalanche::AvalancheArgs,
    #[command(flatten)]
    vanish: vanish::VanishArgs,
    #[command(flatten)]
    groups: groups::GroupsArgs,
    #[command(flatten)]
    near_cache: near_cache::NearCacheArgs,
    #[command(flatten)]
    outage: outage::OutageArgs,
    #[command(flatten)]
    write_behind: write_behind::WriteBehindArgs,
    #[command(flatten)]
    audit: audit::AuditArgs,
    #[command(flatten)]
    refresh_ahead: refresh_ahead::RefreshAheadArgs,
    #[command(flatten)]
    fail_safe: fail_safe::FailSafeArgs,
    #[command(flatten)]
    write_through_race: write_through_race::WriteThroughRaceArgs,
    #[command(flatten)]
    chaos: chaos::ChaosArgs,
}

/// A failure mode the lab runs, naive vs protected: one module of its own.
///
/// `run` measures the strategies and returns their rows; `summary` states, on
/// one line, what those rows show (it is found by its first words, the name).
pub(crate) trait Scenario: Sync {
    /// The value of `--scenario`, and the first column of its rows.
    fn name(&self) -> &'static str;
    /// What it stages, in a few words (`--help`, the progress line).
    fn about(&self) -> &'static str;
    /// Runs every strategy of the scenario.
    fn run<'a>(&'a self, lab: &'a Lab) -> RunFuture<'a>;
    /// One line (or one per extra row group) on what the rows show.
    fn summary(&self, rows: &[Row]) -> String;
}

/// What [`Scenario::run`] returns.
pub(crate) type RunFuture<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Vec<Row>>> + 'a>>;

/// A scenario module's entry points as a [`Scenario`]: its `NAME`, a few
/// words on what it stages, its `run` and its `summary`. Each module declares
/// one as `SCENARIO`; a scenario with state of its own may implement the trait
/// itself instead.
pub(crate) struct Entry {
    name: &'static str,
    about: &'static str,
    run: for<'a> fn(&'a Lab) -> RunFuture<'a>,
    summary: fn(&[Row]) -> String,
}

impl Entry {
    pub(crate) const fn new(
        name: &'static str,
        about: &'static str,
        run: for<'a> fn(&'a Lab) -> RunFuture<'a>,
        summary: fn(&[Row]) -> String,
    ) -> Self {
        Self {
            name,
            about,
            run,
            summary,
        }
    }
}

impl Scenario for Entry {
    fn name(&self) -> &'static str {
        self.name
    }

    fn about(&self) -> &'static str {
        self.about
    }

    fn run<'a>(&'a self, lab: &'a Lab) -> RunFuture<'a> {
        (self.run)(lab)
    }

    fn summary(&self, rows: &[Row]) -> String {
        (self.summary)(rows)
    }
}

/// Every scenario, in the default order. A new scenario is a module of its
/// own, its `mod` line above, and one line here (plus, if it has flags of its
/// own, a `#[command(flatten)]` field of [`LabArgs`]).
const SCENARIOS: &[&dyn Scenario] = &[
    &race::SCENARIO,
    &double_delete::SCENARIO,
    &stampede::SCENARIO,
    &penetration::SCENARIO,
    &hit_rate::SCENARIO,
    &avalanche::SCENARIO,
    &vanish::SCENARIO,
    &groups::SCENARIO,
    &near_cache::SCENARIO,
    &outage::SCENARIO,
    &write_behind::SCENARIO,
    &audit::SCENARIO,
    &refresh_ahead::SCENARIO,
    &fail_safe::SCENARIO,
    &write_through_race::SCENARIO,
    &chaos::SCENARIO,
];

/// The scenario called `name`, if any.
fn scenario(name: &str) -> Option<&'static dyn Scenario> {
    SCENARIOS.iter().copied().find(|s| s.name() == name)
}

/// `--scenario`'s values: the registry's names, each with its `about`.
fn scenario_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        SCENARIOS
            .iter()
            .map(|s| clap::builder::PossibleValue::new(s.name()).help(s.about())),
    )
}

/// The store a lab cache lives in, handed to the builder the way a user
/// would: the embedded default as the typed in-process tier
/// ([`CacheBuilder::memory`]), Redis through the protocol
/// ([`CacheBuilder::store`]).
#[derive(Clone, Debug)]
pub(crate) enum LabStore {
    Memory(MemoryStore),
    Shared(Arc<dyn Store>),
}

impl LabStore {
    pub(crate) fn shared(store: impl Store) -> Self {
        Self::Shared(Arc::new(store))
    }

    /// `builder` with this store as its back end.
    pub(crate) fn serve<K: ?Sized, V, C>(
        &self,
        builder: cachet::CacheBuilder<K, V, C>,
    ) -> cachet::CacheBuilder<K, V, C> {
        match self {
            Self::Memory(memory) => builder.memory(memory.clone()),
            Self::Shared(store) => builder.store(Arc::clone(store)),
        }
    }

    /// The store through its protocol, for what is not a cache (a deferred
    /// worker, a relay, the lab's back door): it reaches the same entries.
    pub(crate) fn protocol(&self) -> Arc<dyn Store> {
        match self {
            Self::Memory(memory) => Arc::new(memory.clone()),
            Self::Shared(store) => Arc::clone(store),
        }
    }
}

/// What every scenario of one run shares.
#[derive(Debug)]
pub(crate) struct Lab {
    args: LabArgs,
    /// The Redis given on the command line, if any.
    redis: Option<RedisTarget>,
    store: LabStore,
    store_kind: &'static str,
    source: Source,
    /// Random, so that a run never touches another run's keys or schema.
    run_id: String,
    seed: u64,
    /// Caches whose keys are still to be invalidated.
    written: std::sync::Mutex<Vec<Written>>,
    /// Scenarios that were skipped, and the line that says why.
    skipped: std::sync::Mutex<Vec<(&'static str, String)>>,
}

/// Entry TTLs outlast any run, so nothing expires mid-scenario and skews it;
/// they still bound what a killed run leaves in a shared Redis.
const ENTRY_TTL: Duration = Duration::from_secs(120);
const LEASE_TTL: Duration = Duration::from_secs(5);
/// Invalidations in flight at once while cleaning up a Redis namespace.
const CLEANUP_CONCURRENCY: usize = 64;
/// How long cleaning up one cache may take.
const CLEANUP_TIME_LIMIT: Duration = Duration::from_secs(15);

impl Lab {
    /// The lab's cache for one scenario and strategy, in a namespace of its own.
    /// `keys` are all the keys the scenario may write; they are invalidated by
    /// [`forget`](Self::forget), or at the end of the run if the scenario does not
    /// get that far.
    fn cache(
        &self,
        scenario: &str,
        strategy: &str,
        keys: RangeInclusive<i64>,
    ) -> Result<Cache<i64, Item>> {
        let namespace = format!("lab-{scenario}-{strategy}-{}", self.run_id);
        let builder = Cache::builder(namespace)
            .ttl(ENTRY_TTL)
            .jitter(0.1)
            .negative_ttl(ENTRY_TTL)
            .lease_ttl(LEASE_TTL);
        let cache = self
            .store
            .serve(builder)
            .build()
            .context("cannot build the lab's cache")?;
        self.written().push((cache.clone(), keys));
        Ok(cache)
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Vec<Written>> {
        // The list stays consistent even if a holder panicked: pushes and
        // removals are single operations.
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `scenario` was skipped and why: one line on stderr under
    /// `--json`, in place of the scenario's summary otherwise.
    fn skip(&self, scenario: &'static str, why: &str) {
        let line = format!("{scenario}: skipped: {why}");
        if self.args.json {
            eprintln!("{line}");
        }
        self.skipped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((scenario, line));
    }

    /// A row of `scenario` for the strategy found by `slug` and shown as `label`.
    fn row(&self, scenario: &'static str, slug: &'static str, label: &'static str) -> Row {
        Row::new(
            scenario,
            slug,
            label,
            RowContext {
                store: self.store_kind,
                database: self.source.kind(),
                seed: self.seed,
            },
        )
    }

    /// Compares what `cache` holds of each of `keys` with the source, once
    /// writes have stopped: the entries holding another value than the
    /// source's row, and the keys the cache could not be read for.
    async fn stale_entries(
        &self,
        cache: &Cache<i64, Item>,
        keys: RangeInclusive<i64>,
    ) -> Result<(u64, u64)> {
        let (mut stale, mut unread) = (0, 0);
        for id in keys {
            let truth = self.source.read(id).await?;
            match cache.peek(&id).await {
                Ok(Some(cached)) if Some(&cached) != truth.as_ref() => stale += 1,
                Ok(_) => {}
                Err(_) => unread += 1,
            }
        }
        Ok((stale, unread))
    }

    /// A per-task seed derived from the run's seed, so tasks draw different but
    /// reproducible sequences.
    fn seed_for(&self, scenario: &str, task: u64) -> u64 {
        let mut h = self.seed ^ 0x9E37_79B9_7F4A_7C15;
        for b in scenario.bytes().chain(task.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
        h
    }

    /// Invalidates every key the lab may have written under `cache`, so a shared
    /// Redis keeps nothing of the run (entry TTLs cover what a failure here leaves).
    async fn forget(&self, cache: &Cache<i64, Item>) {
        let keys = {
            let mut written = self.written();
            let Some(i) = written
                .iter()
                .position(|(c, _)| c.namespace() == cache.namespace())
            else {
                return;
            };
            written.swap_remove(i).1
        };
        forget_keys(cache, keys).await;
    }

    /// Forgets the caches of scenarios that ended early (an error, Ctrl-C).
    async fn forget_remaining(&self) {
        let remaining = std::mem::take(&mut *self.written());
        for (cache, keys) in remaining {
            forget_keys(&cache, keys).await;
        }
    }
}

/// A cache and the keys a scenario may have written under it.
type Written = (Cache<i64, Item>, RangeInclusive<i64>);

async fn forget_keys(cache: &Cache<i64, Item>, keys: RangeInclusive<i64>) {
    // A store that stopped answering must not hold the run hostage; the TTLs
    // remove whatever is left.
    if tokio::time::timeout(CLEANUP_TIME_LIMIT, invalidate_all(cache, keys))
        .await
        .is_err()
    {
        tracing::warn!(
            cache = cache.namespace(),
            "invalidating the lab's keys took too long; the rest expire by their TTL"
        );
    }
}

async fn invalidate_all(cache: &Cache<i64, Item>, keys: RangeInclusive<i64>) {
    let mut failed = 0_u64;
    let mut first_error = None;
    let mut pending = JoinSet::new();
    for id in keys {
        if pending.len() >= CLEANUP_CONCURRENCY
            && let Some(Ok(Err(e))) = pending.join_next().await
        {
            failed += 1;
            first_error.get_or_insert(e);
        }
        let cache = cache.clone();
        pending.spawn(async move { cache.invalidate(&id).await });
    }
    while let Some(done) = pending.join_next().await {
        if let Ok(Err(e)) = done {
            failed += 1;
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        tracing::warn!(cache = cache.namespace(), failed, error = %cachet::Report(&e),
            "some lab keys could not be invalidated; they expire by their TTL");
    }
}

/// Runs `cachet lab`.
pub(crate) async fn run(args: LabArgs) -> Result<()> {
    let run_id = format!("{:08x}", rand::random::<u32>());
    let seed = args.seed.unwrap_or_else(rand::random);
    let scenarios = selected(&args.scenarios);

    let redis = args.redis.given()?;
    let (store, store_kind, store_description) = match &redis {
        None => (
            LabStore::Memory(MemoryStore::new(1_000_000)),
            "memory",
            "memory (in-process)".to_owned(),
        ),
        Some(target) => {
            let store = target.connect_checked().await?;
            (
                LabStore::shared(store),
                target.kind(),
                format!("{} ({})", target.kind(), target.describe()),
            )
        }
    };
    let source = Source::open(args.database_url.as_deref(), &run_id).await?;

    let _metrics = crate::metrics_server::MetricsServer::start_if(args.metrics_addr, "lab").await?;
    let json = args.json;
    let plot_dir = args.plot.clone();
    let progress = !json && std::io::stderr().is_terminal();
    if !json {
        write_stdout(&format!(
            "cachet lab: store {store_description}, source of truth {}, seed {seed}\n\n",
            source.description()
        ))?;
    }
    let lab = Lab {
        args,
        redis,
        store,
        store_kind,
        source,
        run_id,
        seed,
        written: std::sync::Mutex::default(),
        skipped: std::sync::Mutex::default(),
    };

    let outcome = tokio::select! {
        r = run_scenarios(&lab, &scenarios, json, progress) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let skipped = std::mem::take(
        &mut *lab
            .skipped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    // Tear down also after a failure: neither keys nor schema may outlive the run.
    let teardown = async {
        lab.forget_remaining().await;
        lab.source.close().await
    };
    let closed = tokio::select! {
        r = teardown => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted again; the lab's schema may remain")),
    };
    let rows = outcome?;
    closed?;
    let plots = match &plot_dir {
        Some(dir) => plot::write(dir, &rows)?,
        None => Vec::new(),
    };

    if !json {
        let mut out = report::table(&rows);
        out.push('\n');
        for scenario in &scenarios {
            let summary = match skipped.iter().find(|(name, _)| *name == scenario.name()) {
                Some((_, line)) => line.clone(),
                None => scenario.summary(&rows),
            };
            // One line each, however long: a summary is found by its first words.
            out.push_str(&summary);
            out.push('\n');
        }
        for path in &plots {
            out.push_str(&format!("plot: {}\n", path.display()));
        }
        write_stdout(&out)?;
    }
    Ok(())
}

async fn run_scenarios(
    lab: &Lab,
    scenarios: &[&dyn Scenario],
    json: bool,
    progress: bool,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(scenarios.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{pos}/{len}] {elapsed:>4} {wide_msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    for scenario in scenarios {
        bar.set_message(format!("{}: {}", scenario.name(), scenario.about()));
        let started = std::time::Instant::now();
        let new = scenario
            .run(lab)
            .await
            .with_context(|| format!("scenario {} failed", scenario.name()))?;
        bar.inc(1);
        bar.println(format!(
            "{} done in {:.1}s ({})",
            scenario.name(),
            started.elapsed().as_secs_f64(),
            report::count(new.len() as u64, "row")
        ));
        if json {
            let mut out = String::new();
            for row in &new {
                out.push_str(&report::json_line(row));
                out.push('\n');
            }
            write_stdout(&out)?;
        }
        rows.extend(new);
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// The scenarios asked for, each once, in the order first asked; all by default.
/// Names come from the registry through clap, so every one is found.
fn selected(asked: &[String]) -> Vec<&'static dyn Scenario> {
    if asked.is_empty() {
        return SCENARIOS.to_vec();
    }
    let mut out: Vec<&'static dyn Scenario> = Vec::new();
    for s in asked.iter().filter_map(|name| scenario(name)) {
        if !out.iter().any(|o| o.name() == s.name()) {
            out.push(s);
        }
    }
    out
}

/// Splits `total` operations among `parts` workers, as evenly as possible.
fn shares(total: u64, parts: u32) -> Vec<u64> {
    let parts = u64::from(parts.max(1));
    (0..parts)
        .map(|i| total / parts + u64::from(i < total % parts))
        .filter(|&n| n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(scenarios: &[&dyn Scenario]) -> Vec<&'static str> {
        scenarios.iter().map(|s| s.name()).collect()
    }

    #[test]
    fn selection_keeps_order_and_drops_repeats() {
        assert_eq!(names(&selected(&[])), names(SCENARIOS));
        let asked = ["hit-rate", "race", "hit-rate"].map(String::from);
        assert_eq!(names(&selected(&asked)), ["hit-rate", "race"]);
    }

    #[test]
    fn shares_add_up() {
        assert_eq!(shares(10, 3), vec![4, 3, 3]);
        assert_eq!(shares(2, 8), vec![1, 1]);
        assert_eq!(shares(0, 4), Vec::<u64>::new());
    }

    #[test]
    fn scenario_names_are_unique_flag_values() {
        let mut seen = std::collections::HashSet::new();
        for s in SCENARIOS {
            assert!(seen.insert(s.name()), "{} registered twice", s.name());
            assert_eq!(scenario(s.name()).map(|f| f.name()), Some(s.name()));
            assert!(!s.about().is_empty());
        }
    }
}
