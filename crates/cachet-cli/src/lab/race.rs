//! The `race` scenario: readers and writers on a few hot rows, with a delay
//! between a loader's database read and its fill, so a writer's invalidation
//! can land inside that window.
//!
//! Naive cache-aside then writes the value it read before the write into the
//! cache after the invalidation, and the cache keeps that stale value until its
//! TTL. The lease-guarded cache refuses such fills. A delayed double-delete keeps
//! the naive readers and deletes a second time, later than the slowest reader's
//! delay. Two more rows let a share of the writers die between COMMIT and their
//! invalidation: with leases and a transactional outbox (the invalidation is
//! recorded in the write's transaction and a relay delivers it), and with
//! leases alone. Their writers pause for a random delay between writes
//! (`--crash-pause-ms`), so that loads fill and entries stay cached for a while:
//! a crashed writer's missing invalidation only matters to an entry that is
//! there. After the run quiesces
//! (second deletes run, outbox drained), the scenario counts the hot rows whose
//! cached value differs from the database.
//!
//! Whatever the random interleavings did, each row ends with the essay's race
//! played once on purpose, after the readers and writers stopped: a reader misses row 1
//! and reads it, a writer updates it and invalidates (it does not crash), and
//! only then does the reader fill. So naive cache-aside always ends with at
//! least one stale entry, on any machine however loaded, and every protected
//! strategy must still end with none.
//!
//! By default writers write for `--race-ms`; `--race-ops` runs a fixed number of
//! operations instead, and with `--lease-ttl-ms` below the loaders' delay leases
//! expire mid-load: the torture configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::{Cache, DeferredWorker};
use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::double_delete::{await_deferred, cache_on_store, deferred_store};
use super::outbox::LabOutbox;
use super::report::{Latency, Row, find};
use super::source::{Db, Item};
use super::workload::CrashShare;
use super::{Entry, LEASE_TTL, Lab};

pub(super) const NAME: &str = "race";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "A slow reader fills an old value after a writer's invalidation";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive cache-aside";
const LEASE: &str = "lease-guarded";
const DOUBLE_DELETE: &str = "delayed double-delete";
const OUTBOX: &str = "lease + outbox (writer crash)";
const NO_OUTBOX: &str = "lease (writer crash, no outbox)";

/// Bounds each reader's and writer's loop on top of the clock.
const MAX_OPS_PER_TASK: u64 = 50_000_000;
/// How long past the planned end a task may run before it is considered stuck.
const GRACE: Duration = Duration::from_secs(30);
/// With `--race-ops`, how long a row may run before its tasks stop short.
const OPS_TIME_LIMIT: Duration = Duration::from_secs(600);
/// How long past their due time the second deletes may take to run.
const DEFERRED_GRACE: Duration = Duration::from_secs(10);
/// How much longer than the slowest reader's delay the second delete waits by default.
const SECOND_DELETE_MARGIN_MS: u64 = 50;

/// Flags of the `race` scenario.
///
/// The defaults are chosen so that naive cache-aside all but surely ends with
/// stale entries, on the in-process store and on Redis + PostgreSQL alike. Its
/// stale entries are bounded by the loads in flight when writes stop (at most one
/// per reader), and such a load is stale only if its row was rewritten during its
/// delay: 32 rows keep the readers spread over many keys, and delays of up to
/// 20 ms are long enough for a rewrite to land in them even on slower backends.
#[derive(Debug, Args)]
#[command(next_help_heading = "race")]
pub(super) struct RaceArgs {
    /// Concurrent readers
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    readers: u32,
    /// Concurrent writers
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    writers: u32,
    /// Rows the readers and writers share
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    hot_rows: u64,
    /// How long writers write, in milliseconds
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    race_ms: u64,
    /// Upper bound of the random delay between a load's read and its fill, in milliseconds
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    max_delay_ms: u64,
    /// Run each row for this many operations (reads and writes) instead of --race-ms
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    race_ops: Option<u64>,
    /// Lease TTL of the lease-guarded rows, in milliseconds; below the loaders'
    /// delay, leases expire mid-load
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    lease_ttl_ms: u64,
    /// Delay of the second delete of the double-delete row, in milliseconds
    /// [default: --max-delay-ms + 50]
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    second_delete_ms: Option<u64>,
    /// Share of writes, in percent, whose writer dies after COMMIT without
    /// invalidating (the writer-crash rows), spread evenly over each writer's
    /// writes
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100))]
    crash_percent: u32,
    /// Upper bound of the random pause of a writer after each write in the
    /// writer-crash rows, in milliseconds [default: --max-delay-ms]
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    crash_pause_ms: Option<u64>,
    /// Row of the race to run; repeat for several [default: all, in the order shown]
    #[arg(long = "race-row", value_name = "ROW", value_enum)]
    race_rows: Vec<Strategy>,
}

impl RaceArgs {
    fn second_delete(&self) -> Duration {
        Duration::from_millis(
            self.second_delete_ms
                .unwrap_or(self.max_delay_ms + SECOND_DELETE_MARGIN_MS),
        )
    }
}

/// The rows of the race.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum Strategy {
    /// Naive cache-aside: get, read the database, set
    Naive,
    /// Lease-guarded fills (get_or_load)
    Lease,
    /// Naive readers, writers invalidate twice (the second after a delay)
    DoubleDelete,
    /// Leases, writes record their invalidation in an outbox; some writers crash
    Outbox,
    /// Leases, some writers crash, no outbox
    #[value(name = "no-outbox")]
    CrashNoOutbox,
}

impl Strategy {
    const ALL: [Strategy; 5] = [
        Strategy::Naive,
        Strategy::Lease,
        Strategy::DoubleDelete,
        Strategy::Outbox,
        Strategy::CrashNoOutbox,
    ];

    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => NAIVE,
            Strategy::Lease => LEASE,
            Strategy::DoubleDelete => DOUBLE_DELETE,
            Strategy::Outbox => OUTBOX,
            Strategy::CrashNoOutbox => NO_OUTBOX,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Lease => "lease",
            Strategy::DoubleDelete => "double-delete",
            Strategy::Outbox => "outbox",
            Strategy::CrashNoOutbox => "no-outbox",
        }
    }

    /// Whether readers fill through `get_or_load` (leases) rather than `set`.
    fn leases(self) -> bool {
        matches!(
            self,
            Strategy::Lease | Strategy::Outbox | Strategy::CrashNoOutbox
        )
    }

    /// Whether some writers die between COMMIT and invalidate.
    fn crashes(self) -> bool {
        matches!(self, Strategy::Outbox | Strategy::CrashNoOutbox)
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let asked = &lab.args.race.race_rows;
    let mut rows = Vec::new();
    for strategy in Strategy::ALL {
        if asked.is_empty() || asked.contains(&strategy) {
            rows.push(run_strategy(lab, strategy).await?);
        }
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let stale = |word| {
        find(rows, NAME, word)
            .and_then(|r| r.stale_entries)
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    let mut out = format!(
        "race: hot rows left holding an old value once writes stopped: naive {} \
         (a slow fill landed after the writer's invalidation), lease-guarded {} \
         (the invalidation revoked the lease, so the late fill was refused).",
        stale("naive"),
        stale("lease")
    );
    if let Some(dd) = find(rows, NAME, "double-delete") {
        out.push_str(&format!(
            "\nrace, delayed double-delete: {} stale with the same naive readers: a second \
             delete, later than the slowest reader's delay, removed what slow readers put back \
             ({} second deletes ran). A probabilistic fix bounded by that delay: a reader \
             slower than it still leaves a stale value, which leases rule out.",
            stale("double-delete"),
            dd.deferred_ran.unwrap_or(0)
        ));
    }
    if let Some(with) = find(rows, NAME, "outbox") {
        out.push_str(&format!(
            "\nrace, lease + outbox: {} of {} writes' writers died after COMMIT without \
             invalidating; {} stale: each invalidation was recorded in its write's transaction \
             and a relay delivered it ({} records; {}).",
            with.crashed_writes.unwrap_or(0),
            with.writes,
            stale("outbox"),
            with.outbox_delivered.unwrap_or(0),
            LabOutbox::describe(with.database),
        ));
    }
    if let Some(without) = find(rows, NAME, "no-outbox") {
        out.push_str(&format!(
            "\nrace, writer crash without outbox: {} of {} writes' writers died after COMMIT \
             without invalidating; {} stale, kept until their TTL (leases cannot help with an \
             invalidation that never comes).",
            without.crashed_writes.unwrap_or(0),
            without.writes,
            stale("no-outbox"),
        ));
    }
    out
}

#[derive(Debug, Default)]
struct TaskOutcome {
    reads: u64,
    writes: u64,
    errors: u64,
    /// Writes whose writer "died" before invalidating.
    crashed: u64,
    /// Second deletes queued.
    queued: u64,
    /// Writes of the scripted race: in `writes` (each has its second delete or
    /// outbox record), not in the row's requests.
    scripted_writes: u64,
    latency: Option<Latency>,
}

async fn run_strategy(lab: &Lab, strategy: Strategy) -> Result<Row> {
    let a = &lab.args.race;
    lab.source.reset(a.hot_rows).await?;
    let hot_rows = i64::try_from(a.hot_rows).context("too many hot rows")?;
    let db = lab.source.counted();
    let (store, lease_ttl) = match strategy {
        Strategy::DoubleDelete => (deferred_store(lab).await?, LEASE_TTL),
        s if s.leases() => (lab.store.clone(), Duration::from_millis(a.lease_ttl_ms)),
        _ => (lab.store.clone(), LEASE_TTL),
    };
    let cache = cache_on_store(lab, NAME, strategy.slug(), 1..=hot_rows, &store, lease_ttl)?;
    let max_delay = Duration::from_millis(a.max_delay_ms);
    let race_for = Duration::from_millis(a.race_ms);
    // Long enough for every fill begun before the last write to land, and for
    // readers to see what the cache kept.
    let settle = (max_delay * 4).max(Duration::from_millis(50));
    let started = Instant::now();
    let (deadline, budget) = match a.race_ops {
        Some(ops) => (
            started + OPS_TIME_LIMIT,
            Some(Arc::new(Budget {
                total: ops,
                claimed: AtomicU64::new(0),
            })),
        ),
        None => (started + race_for + settle + GRACE, None),
    };

    let second_delete = a.second_delete();
    let worker = (strategy == Strategy::DoubleDelete)
        .then(|| DeferredWorker::spawn(Arc::clone(cache.store())));
    let outbox = match strategy {
        Strategy::Outbox => Some(Arc::new(
            LabOutbox::open(&lab.source, &lab.run_id, Arc::clone(cache.store())).await?,
        )),
        _ => None,
    };
    let (stop_relay, relay_stopped) = watch::channel(false);
    let relay = outbox.as_ref().map(|outbox| {
        let outbox = Arc::clone(outbox);
        let limit = deadline.saturating_duration_since(Instant::now());
        // Aborted if this row fails before stopping it.
        AbortOnDrop(Some(tokio::spawn(async move {
            outbox.run_relay(relay_stopped, limit).await;
        })))
    });
    let writer = match strategy {
        Strategy::Naive | Strategy::Lease => Writer::Invalidate,
        Strategy::DoubleDelete => Writer::Twice(second_delete),
        Strategy::Outbox => Writer::Outbox(outbox.clone().context("the outbox is open")?),
        Strategy::CrashNoOutbox => Writer::NoOutbox,
    };
    let crash_percent = if strategy.crashes() {
        a.crash_percent
    } else {
        0
    };

    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_readers = Arc::new(AtomicBool::new(false));
    let task = |role: &str, i: u32, stop: &Arc<AtomicBool>| Task {
        cache: cache.clone(),
        db: db.clone(),
        hot_rows,
        max_delay,
        rng: StdRng::seed_from_u64(lab.seed_for(role, u64::from(i))),
        stop: Arc::clone(stop),
        deadline,
        budget: budget.clone(),
        writer: writer.clone(),
        crashes: CrashShare::new(crash_percent, lab.seed_for("race-crash", u64::from(i))),
        pause: if strategy.crashes() {
            Duration::from_millis(a.crash_pause_ms.unwrap_or(a.max_delay_ms))
        } else {
            Duration::ZERO
        },
        hold: None,
    };
    let mut writers = JoinSet::new();
    for w in 0..a.writers {
        writers.spawn(task("race-writer", w, &stop_writers).write_loop());
    }
    let mut readers = JoinSet::new();
    for r in 0..a.readers {
        readers.spawn(task("race-reader", r, &stop_readers).read_loop(strategy));
    }

    let mut total = TaskOutcome {
        latency: Some(Latency::new()),
        ..TaskOutcome::default()
    };
    let scripted = || {
        let mut reader = task("race-scripted", 0, &Arc::new(AtomicBool::new(false)));
        let writer = task("race-scripted", 1, &Arc::new(AtomicBool::new(false)));
        reader.budget = None;
        scripted_race(reader, writer, strategy)
    };
    if budget.is_some() {
        // Every task stops by itself once the operations are spent.
        collect(&mut writers, &mut total).await?;
        collect(&mut readers, &mut total).await?;
    } else {
        tokio::time::sleep(race_for).await;
        stop_writers.store(true, Ordering::Relaxed);
        collect(&mut writers, &mut total).await?;
        tokio::time::sleep(settle).await;
        stop_readers.store(true, Ordering::Relaxed);
        // Readers finish the operation they are in, so every load in flight has
        // filled (or been refused) once they are all joined.
        collect(&mut readers, &mut total).await?;
    }
    // Alone now: no other load of the row can lead its flight.
    scripted().await.add_to(&mut total);

    if let Some(budget) = &budget
        && total.reads + total.writes < budget.total
    {
        tracing::warn!(
            done = total.reads + total.writes,
            asked = budget.total,
            "the race stopped short of --race-ops at its time limit"
        );
        total.errors += 1;
    }

    // Quiescence: every second delete runs, the outbox is drained.
    let mut deferred_ran = None;
    if let Some(worker) = worker {
        // Every second delete was queued before its writer was joined.
        let due = Instant::now() + second_delete;
        let (ran, complete) = await_deferred(worker, total.queued, due, DEFERRED_GRACE).await;
        if !complete {
            tracing::warn!(
                ran,
                queued = total.queued,
                "not every second delete ran in time"
            );
            total.errors += 1;
        }
        deferred_ran = Some(ran);
    }
    if let Some(mut relay) = relay
        && let Some(task) = relay.0.take()
    {
        stop_relay.send_replace(true);
        task.await.context("the outbox relay panicked")?;
    }
    if let Some(outbox) = &outbox
        && !outbox.drain().await
    {
        total.errors += 1;
    }
    let elapsed = started.elapsed();

    let (stale, unread) = lab.stale_entries(&cache, 1..=hot_rows).await?;
    total.errors += unread;
    lab.forget(&cache).await;

    let stats = cache.stats();
    let mut row = lab.row(NAME, strategy.slug(), strategy.name());
    row.requests = total.reads + total.writes - total.scripted_writes;
    row.writes = total.writes;
    row.db_queries = db.reads();
    row.stale_entries = Some(stale);
    row.errors = total.errors;
    row.hit_rate = Some(stats.hit_rate());
    if strategy.leases() {
        row.loads = Some(stats.loads);
        row.refused_fills = Some(stats.refused_fills);
    }
    if strategy.crashes() {
        row.crashed_writes = Some(total.crashed);
    }
    row.deferred_ran = deferred_ran;
    row.outbox_delivered = outbox.as_ref().map(|o| o.delivered());
    let latency = total.latency.unwrap_or_else(Latency::new);
    let mut row = row.with_latency(&latency);
    // With --race-ops the row runs a fixed number of operations instead.
    if a.race_ops.is_none() {
        row = row.time_boxed(race_for);
    }
    Ok(row.elapsed(elapsed))
}

/// The essay's race, played once on row 1: the reader misses and reads the
/// row, the writer updates it and invalidates (without crashing), and only
/// then may the reader fill. Its operations are not counted in the row's
/// requests, which stay what `--race-ms` or `--race-ops` asked for; its write
/// is in the row's writes.
async fn scripted_race(mut reader: Task, writer: Task, strategy: Strategy) -> TaskOutcome {
    const ROW: i64 = 1;
    let mut out = TaskOutcome::default();
    let hold = Arc::new(Hold {
        row: ROW,
        read: tokio::sync::Notify::new(),
        written: watch::Sender::new(false),
    });
    reader.hold = Some(Arc::clone(&hold));
    // The reader must miss: drop what the cache holds (the database is unchanged).
    if writer.cache.invalidate(&ROW).await.is_err() {
        out.errors += 1;
    }
    let read = tokio::spawn(async move {
        let delay = reader.delay();
        match strategy.leases() {
            true => reader.lease_read(ROW, delay).await,
            false => reader.naive_read(ROW, delay).await,
        }
    });
    let deadline = writer.deadline;
    if tokio::time::timeout_at(deadline, hold.read.notified())
        .await
        .is_err()
    {
        out.errors += 1;
    }
    out.writes += 1;
    out.scripted_writes += 1;
    match writer.write(ROW, false).await {
        Ok(Written::Queued) => out.queued += 1,
        Ok(_) => {}
        Err(_) => out.errors += 1,
    }
    hold.written.send_replace(true);
    if !matches!(read.await, Ok(Ok(_))) {
        out.errors += 1;
    }
    out
}

impl TaskOutcome {
    /// Adds this outcome's counts to `total`.
    fn add_to(self, total: &mut TaskOutcome) {
        total.reads += self.reads;
        total.writes += self.writes;
        total.errors += self.errors;
        total.crashed += self.crashed;
        total.queued += self.queued;
        total.scripted_writes += self.scripted_writes;
        if let (Some(sum), Some(l)) = (&mut total.latency, &self.latency) {
            sum.merge(l);
        }
    }
}

async fn collect(set: &mut JoinSet<TaskOutcome>, total: &mut TaskOutcome) -> Result<()> {
    while let Some(done) = set.join_next().await {
        done.context("a race task panicked")?.add_to(total);
    }
    Ok(())
}

/// A task aborted when dropped.
#[derive(Debug)]
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Operations of a `--race-ops` row, claimed one at a time by every task.
#[derive(Debug)]
struct Budget {
    total: u64,
    claimed: AtomicU64,
}

impl Budget {
    fn claim(&self) -> bool {
        self.claimed.fetch_add(1, Ordering::Relaxed) < self.total
    }
}

/// What a writer does after its UPDATE.
#[derive(Clone, Debug)]
enum Writer {
    /// Invalidate once: the order the library asks for.
    Invalidate,
    /// Invalidate now and again after the delay (queued in the store).
    Twice(Duration),
    /// Record the invalidation in the UPDATE's transaction, then invalidate
    /// unless the writer dies.
    Outbox(Arc<LabOutbox>),
    /// Invalidate unless the writer dies.
    NoOutbox,
}

/// How one write ended.
enum Written {
    Invalidated,
    Queued,
    Crashed,
}

struct Task {
    cache: Cache<i64, Item>,
    db: Db,
    hot_rows: i64,
    max_delay: Duration,
    rng: StdRng,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    budget: Option<Arc<Budget>>,
    writer: Writer,
    crashes: CrashShare,
    /// Upper bound of a writer's random pause after each write.
    pause: Duration,
    /// For the scripted race: hold the load of this row between its read and
    /// its fill until the writer has written.
    hold: Option<Arc<Hold>>,
}

/// The scripted race's two signals: the reader has read the row; the writer
/// has written it.
#[derive(Debug)]
struct Hold {
    row: i64,
    read: tokio::sync::Notify,
    written: watch::Sender<bool>,
}

impl Hold {
    /// Called by a load between its read and its fill.
    async fn after_read(hold: Option<&Arc<Hold>>, id: i64, deadline: Instant) {
        let Some(hold) = hold.filter(|h| h.row == id) else {
            return;
        };
        hold.read.notify_one();
        let mut written = hold.written.subscribe();
        let _ = tokio::time::timeout_at(deadline, written.wait_for(|w| *w)).await;
    }
}

impl Task {
    fn go_on(&self, ops: u64) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && ops < MAX_OPS_PER_TASK
            && Instant::now() < self.deadline
            && self.budget.as_ref().is_none_or(|b| b.claim())
    }

    fn delay(&mut self) -> Duration {
        self.random_up_to(self.max_delay)
    }

    fn random_up_to(&mut self, max: Duration) -> Duration {
        let max = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.rng.random_range(0..=max))
    }

    async fn read_loop(mut self, strategy: Strategy) -> TaskOutcome {
        let mut out = TaskOutcome {
            latency: Some(Latency::new()),
            ..TaskOutcome::default()
        };
        while self.go_on(out.reads) {
            let id = self.rng.random_range(1..=self.hot_rows);
            let delay = self.delay();
            let t = Instant::now();
            let read = if strategy.leases() {
                self.lease_read(id, delay).await
            } else {
                self.naive_read(id, delay).await
            };
            if let Some(l) = &mut out.latency {
                l.record(t.elapsed());
            }
            out.reads += 1;
            if read.is_err() {
                out.errors += 1;
            }
            // In-process hits never wait; yielding lets writers and other
            // readers onto the worker threads.
            tokio::task::yield_now().await;
        }
        out
    }

    /// Cache-aside as commonly written: on a miss, read the database and put
    /// what was read into the cache, unconditionally.
    async fn naive_read(&self, id: i64, delay: Duration) -> Result<Option<Item>> {
        if let Some(item) = self.cache.get(&id).await? {
            return Ok(Some(item));
        }
        let item = self.db.load(id).await?;
        Hold::after_read(self.hold.as_ref(), id, self.deadline).await;
        tokio::time::sleep(delay).await;
        if let Some(item) = &item {
            self.cache.set(&id, item.clone()).await?;
        }
        Ok(item)
    }

    async fn lease_read(&self, id: i64, delay: Duration) -> Result<Option<Item>> {
        let db = self.db.clone();
        let (hold, deadline) = (self.hold.clone(), self.deadline);
        let item = self
            .cache
            .get_or_load(&id, move || async move {
                let item = db.load(id).await?;
                Hold::after_read(hold.as_ref(), id, deadline).await;
                tokio::time::sleep(delay).await;
                Ok::<_, sqlx::Error>(item)
            })
            .await?;
        Ok(item)
    }

    /// Writes the database, then invalidates as the strategy says.
    async fn write_loop(mut self) -> TaskOutcome {
        let mut out = TaskOutcome::default();
        while self.go_on(out.writes) {
            let id = self.rng.random_range(1..=self.hot_rows);
            let crash = self.crashes.next();
            out.writes += 1;
            match self.write(id, crash).await {
                Ok(Written::Invalidated) => {}
                Ok(Written::Queued) => out.queued += 1,
                Ok(Written::Crashed) => out.crashed += 1,
                Err(_) => out.errors += 1,
            }
            if !self.pause.is_zero() {
                let pause = self.random_up_to(self.pause);
                tokio::time::sleep(pause).await;
            } else {
                // Back to back: each hot row is rewritten well within one load's
                // delay, so loads in flight when writes stop are likely to be stale.
                tokio::task::yield_now().await;
            }
        }
        out
    }

    async fn write(&self, id: i64, crash: bool) -> Result<Written> {
        match &self.writer {
            Writer::Invalidate => {
                self.db.bump(id).await?;
                self.cache.invalidate(&id).await?;
                Ok(Written::Invalidated)
            }
            Writer::Twice(delay) => {
                self.db.bump(id).await?;
                self.cache.invalidate_twice(&id, *delay).await?;
                Ok(Written::Queued)
            }
            Writer::Outbox(outbox) => {
                outbox.write(id, &self.cache.store_key(&id)).await?;
                if crash {
                    return Ok(Written::Crashed);
                }
                self.cache.invalidate(&id).await?;
                Ok(Written::Invalidated)
            }
            Writer::NoOutbox => {
                self.db.bump(id).await?;
                if crash {
                    return Ok(Written::Crashed);
                }
                self.cache.invalidate(&id).await?;
                Ok(Written::Invalidated)
            }
        }
    }
}
