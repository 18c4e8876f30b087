//! The `audit` scenario: the race workload with writer crashes, measured the
//! way a service would measure it in production, with the library's
//! consistency audit (`cachet::audit`): every read the cache served is
//! re-checked against the source of truth 1 s and 10 s later, and counts as
//! inconsistent within that bound only if the cache still holds a value the
//! source no longer has. Three rows, side by side: naive cache-aside, leases,
//! and leases with the transactional outbox.
//!
//! Readers read random rows through the cache; on a miss, naive readers read
//! the database and `set` what they read after a random delay, lease readers
//! use `get_or_load` with the same delay. Writers write in bursts (a row
//! written twice, a few milliseconds apart, so that loads started after the
//! first write are still in flight at the second) and pause between bursts;
//! a share of writes' writers die after COMMIT without invalidating. With the
//! outbox, each write records its invalidation in its transaction and a relay
//! delivers it.
//!
//! Whatever the random interleavings do, each row starts with the two holes
//! played once on purpose on rows the writers never touch: the reader/writer
//! race (a reader reads a row, a writer updates it and invalidates, then the
//! reader fills) and a writer crash (a cached row is updated and its writer
//! dies before invalidating). Naive cache-aside keeps both stale values, leases
//! keep the crash's, the outbox neither; every read of those rows is audited
//! like any other, so naive and leases always show inconsistencies.
//!
//! Each row runs until its readers were served `--audit-reads` values from
//! the cache (at most `--audit-max-ms`), every one audited. The rows' audits
//! then finish together: their last checks are due the largest bound after
//! each row's last read. Rows use distinct rows of the source, so a row's
//! checks are not disturbed by the next row's writes.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use cachet::audit::{AuditOptions, AuditReport, Auditor, bound_label};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::double_delete::cache_on_store;
use super::outbox::LabOutbox;
use super::report::{AuditBound, AuditFigures, Latency, Row, find};
use super::source::{Db, Item};
use super::workload::CrashShare;
use super::{Entry, LEASE_TTL, Lab};

pub(super) const NAME: &str = "audit";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str =
    "Consistency in nines within 1 s and 10 s: the race with writer crashes, audited";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const NAIVE: &str = "naive cache-aside (writer crash)";
const LEASE: &str = "lease-guarded (writer crash)";
const OUTBOX: &str = "lease + outbox (writer crash)";

/// Upper bound of the random delay between a load's read and its fill.
const MAX_DELAY: Duration = Duration::from_millis(20);
/// The gap between the two writes of a burst: inside most loads' delay.
const BURST_GAP: Duration = Duration::from_millis(10);
/// The audit's budget of source reads per second: far above what its shared
/// looks need (about two per hot row every 10 ms), so that none is skipped.
const AUDIT_BUDGET: f64 = 50_000.0;
/// Reads in the audit at once: a second of reads at the fastest rate seen.
const AUDIT_CAPACITY: usize = 4_000_000;
/// How long past the largest bound the audits may take to finish.
const AUDIT_GRACE: Duration = Duration::from_secs(30);
/// How long past the workload's end a reader or writer may take.
const GRACE: Duration = Duration::from_secs(30);

/// Flags of the `audit` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "audit")]
pub(super) struct AuditArgs {
    /// Reads served from the cache per row (each one audited) before its readers stop
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    audit_reads: u64,
    /// Upper bound of each row's workload, in milliseconds
    #[arg(long, default_value_t = 12_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    audit_max_ms: u64,
    /// Rows the readers and writers of one strategy share (2 of them for the scripted holes)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(3..=100_000))]
    audit_keys: u64,
    /// The audit's bounds, in milliseconds, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_u64, 10_000])]
    audit_bounds_ms: Vec<u64>,
    /// Concurrent readers
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    audit_readers: u32,
    /// Concurrent writers
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    audit_writers: u32,
    /// Share of writes, in percent, whose writer dies after COMMIT without
    /// invalidating, spread evenly over each writer's writes
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100))]
    audit_crash_percent: u32,
    /// Upper bound of a writer's random pause between bursts, in milliseconds
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    audit_pause_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    Lease,
    Outbox,
}

impl Strategy {
    const ALL: [Strategy; 3] = [Strategy::Naive, Strategy::Lease, Strategy::Outbox];

    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => NAIVE,
            Strategy::Lease => LEASE,
            Strategy::Outbox => OUTBOX,
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Lease => "lease",
            Strategy::Outbox => "outbox",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.audit;
    let keys = i64::try_from(a.audit_keys).context("too many keys")?;
    lab.source.reset(a.audit_keys * 3).await?;
    let bounds: Vec<Duration> = a
        .audit_bounds_ms
        .iter()
        .map(|&ms| Duration::from_millis(ms))
        .collect();
    let mut running = Vec::new();
    for (i, strategy) in (0_i64..).zip(Strategy::ALL) {
        let first = i * keys + 1;
        running.push(workload(lab, strategy, first..=first + keys - 1, &bounds).await?);
    }
    let largest = bounds.iter().copied().max().unwrap_or_default();
    let mut finishing = Vec::new();
    for r in &running {
        let auditor = r.auditor.clone();
        finishing.push(tokio::spawn(async move {
            tokio::time::timeout(largest + AUDIT_GRACE, auditor.finish()).await
        }));
    }
    let mut rows = Vec::new();
    for (r, finished) in running.into_iter().zip(finishing) {
        let report = finished
            .await
            .context("an audit panicked")?
            .context("an audit did not finish in time")?;
        lab.forget(&r.cache).await;
        rows.push(r.row(lab, &report));
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let within = |word: &str, i: usize| {
        find(rows, NAME, word)
            .and_then(|r| r.audit.as_ref())
            .and_then(|a| a.bounds.get(i))
            .map_or_else(|| "?".to_owned(), AuditBound::describe)
    };
    let bounds: Vec<String> = rows
        .iter()
        .find(|r| r.scenario == NAME)
        .and_then(|r| r.audit.as_ref())
        .map(|a| {
            a.bounds
                .iter()
                .map(|b| bound_label(Duration::from_millis(b.bound_ms)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!(
        "audit: every read the cache served was re-checked against the source of truth {} \
         after it (cachet::audit, sample rate 1); nines of reads whose cache entry still \
         disagreed with the source that long after, by bound:",
        bounds.join(" and ")
    );
    for (word, name) in [
        ("naive", "naive cache-aside"),
        ("lease", "lease-guarded"),
        ("outbox", "lease + outbox"),
    ] {
        let figures: Vec<String> = bounds
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{b} {}", within(word, i)))
            .collect();
        out.push_str(&format!("\naudit, {name}: {}", figures.join(", ")));
    }
    out.push_str(
        "\naudit: naive cache-aside keeps what slow fills put back after a write's \
         invalidation and what crashed writers never invalidated; leases refuse the late \
         fills but cannot replace an invalidation that never comes; the outbox delivers it. \
         Measured: reads answered by the cache (hits), each checked at each bound (source \
         first, then the cache, confirmed 100 ms later), the source read directly (the \
         primary). Not measured: reads that loaded, reads of other processes, staleness \
         healed before the first bound.",
    );
    out
}

/// A row's workload, done, with its audit still running.
struct Running {
    strategy: Strategy,
    cache: Cache<i64, Item>,
    auditor: Auditor<i64, Item>,
    db: Db,
    outbox: Option<Arc<LabOutbox>>,
    started: Instant,
    out: Outcome,
}

impl Running {
    fn row(self, lab: &Lab, report: &AuditReport) -> Row {
        let out = self.out;
        let mut row = lab.row(NAME, self.strategy.slug(), self.strategy.name());
        row.requests = out.reads + out.writes;
        row.writes = out.writes;
        row.db_queries = self.db.reads();
        row.errors = out.errors + report.errors;
        if out.reads > 0 {
            // Counts below 2^53 convert exactly.
            #[allow(clippy::cast_precision_loss)]
            let rate = out.hits as f64 / out.reads as f64;
            row.hit_rate = Some(rate);
        }
        if self.strategy != Strategy::Naive {
            row.loads = Some(self.cache.stats().loads);
        }
        row.crashed_writes = Some(out.crashed);
        row.outbox_delivered = self.outbox.as_ref().map(|o| o.delivered());
        row.audit = Some(AuditFigures::from_report(report));
        let latency = out.latency.unwrap_or_else(Latency::new);
        row.with_latency(&latency).elapsed(self.started.elapsed())
    }
}

#[derive(Debug, Default)]
struct Outcome {
    reads: u64,
    hits: u64,
    writes: u64,
    crashed: u64,
    errors: u64,
    latency: Option<Latency>,
}

impl Outcome {
    fn add(&mut self, other: Outcome) {
        self.reads += other.reads;
        self.hits += other.hits;
        self.writes += other.writes;
        self.crashed += other.crashed;
        self.errors += other.errors;
        match (&mut self.latency, other.latency) {
            (Some(sum), Some(l)) => sum.merge(&l),
            (None, l) => self.latency = l,
            _ => {}
        }
    }
}

/// What a writer does after its UPDATE.
#[derive(Clone, Debug)]
enum Writer {
    /// Invalidate unless the writer dies.
    Invalidate,
    /// Record the invalidation in the UPDATE's transaction, then invalidate
    /// unless the writer dies.
    Outbox(Arc<LabOutbox>),
}

impl Writer {
    /// Writes row `id`; with `crash`, the writer dies after COMMIT.
    async fn write(&self, cache: &Cache<i64, Item>, db: &Db, id: i64, crash: bool) -> Result<()> {
        match self {
            Writer::Invalidate => db.bump(id).await?,
            Writer::Outbox(outbox) => outbox.write(id, &cache.store_key(&id)).await?,
        }
        if !crash {
            cache.invalidate(&id).await?;
        }
        Ok(())
    }
}

async fn workload(
    lab: &Lab,
    strategy: Strategy,
    ids: RangeInclusive<i64>,
    bounds: &[Duration],
) -> Result<Running> {
    let a = &lab.args.audit;
    let cache = cache_on_store(
        lab,
        NAME,
        strategy.slug(),
        ids.clone(),
        &lab.store,
        LEASE_TTL,
    )?;
    let db = lab.source.counted();
    let truth = lab.source.counted();
    let options = AuditOptions::new()
        .sample_rate(1.0)
        .bounds(bounds.iter().copied())
        .budget(AUDIT_BUDGET)
        .capacity(AUDIT_CAPACITY);
    let auditor = Auditor::spawn(&cache, options, move |id: &i64| {
        let (truth, id) = (truth.clone(), *id);
        async move { truth.load(id).await }
    })
    .context("cannot start the audit")?;
    let outbox = match strategy {
        Strategy::Outbox => Some(Arc::new(
            LabOutbox::open(&lab.source, &lab.run_id, Arc::clone(cache.store())).await?,
        )),
        _ => None,
    };
    let writer = match &outbox {
        Some(outbox) => Writer::Outbox(Arc::clone(outbox)),
        None => Writer::Invalidate,
    };
    let max_for = Duration::from_millis(a.audit_max_ms);
    let started = Instant::now();
    let deadline = started + max_for;
    let (stop_relay, relay_stopped) = watch::channel(false);
    let relay = outbox.as_ref().map(|outbox| {
        let outbox = Arc::clone(outbox);
        tokio::spawn(async move {
            outbox.run_relay(relay_stopped, max_for + GRACE).await;
        })
    });

    let (race_key, crash_key) = (*ids.start(), *ids.start() + 1);
    let mut out = Outcome {
        latency: Some(Latency::new()),
        ..Outcome::default()
    };
    if let Err(e) = scripted(strategy, &cache, &db, &writer, race_key, crash_key).await {
        tracing::warn!(error = %format!("{e:#}"), "the scripted holes failed");
        out.errors += 1;
    }
    out.writes += 2;
    out.crashed += 1;

    let hits = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = JoinSet::new();
    for r in 0..a.audit_readers {
        let reader = Reader {
            strategy,
            cache: cache.clone(),
            auditor: auditor.clone(),
            db: db.clone(),
            ids: ids.clone(),
            rng: StdRng::seed_from_u64(lab.seed_for("audit-reader", u64::from(r))),
            hits: Arc::clone(&hits),
            target: a.audit_reads,
            deadline,
        };
        readers.spawn(reader.run());
    }
    let mut writers = JoinSet::new();
    for w in 0..a.audit_writers {
        let task = WriterTask {
            cache: cache.clone(),
            db: db.clone(),
            writer: writer.clone(),
            ids: crash_key + 1..=*ids.end(),
            rng: StdRng::seed_from_u64(lab.seed_for("audit-writer", u64::from(w))),
            crashes: CrashShare::new(
                a.audit_crash_percent,
                lab.seed_for("audit-crash", u64::from(w)),
            ),
            pause: Duration::from_millis(a.audit_pause_ms),
            stop: Arc::clone(&stop),
        };
        writers.spawn(task.run());
    }
    super::workload::join_within(&mut readers, deadline, GRACE, "audit readers", |done| {
        out.add(done.context("an audit reader panicked")?);
        Ok(())
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    super::workload::join_within(&mut writers, deadline, GRACE, "audit writers", |done| {
        out.add(done.context("an audit writer panicked")?);
        Ok(())
    })
    .await?;
    if let Some(relay) = relay {
        stop_relay.send_replace(true);
        relay.await.context("the outbox relay panicked")?;
    }
    if let Some(outbox) = &outbox
        && !outbox.drain().await
    {
        out.errors += 1;
    }
    Ok(Running {
        strategy,
        cache,
        auditor,
        db,
        outbox,
        started,
        out,
    })
}

/// The two holes, played once each on rows the writers never touch: a
/// writer that dies between COMMIT and its invalidation on a cached row, and
/// the reader/writer race (the reader reads, the writer writes and
/// invalidates, then the reader fills).
async fn scripted(
    strategy: Strategy,
    cache: &Cache<i64, Item>,
    db: &Db,
    writer: &Writer,
    race_key: i64,
    crash_key: i64,
) -> Result<()> {
    let load = |id: i64| {
        let db = db.clone();
        move || async move { db.load(id).await }
    };
    match strategy {
        Strategy::Naive => {
            if let Some(item) = db.load(crash_key).await? {
                cache.set(&crash_key, item).await?;
            }
        }
        _ => {
            cache.get_or_load(&crash_key, load(crash_key)).await?;
        }
    }
    writer.write(cache, db, crash_key, true).await?;

    match strategy {
        Strategy::Naive => {
            let old = db.load(race_key).await?;
            writer.write(cache, db, race_key, false).await?;
            if let Some(old) = old {
                cache.set(&race_key, old).await?;
            }
        }
        _ => {
            let (read_tx, read_rx) = oneshot::channel();
            let (go_tx, go_rx) = oneshot::channel::<()>();
            let (reader, db2) = (cache.clone(), db.clone());
            let fill = tokio::spawn(async move {
                reader
                    .get_or_load(&race_key, move || async move {
                        let item = db2.load(race_key).await;
                        let _ = read_tx.send(());
                        let _ = go_rx.await;
                        item
                    })
                    .await
            });
            read_rx.await.context("the scripted reader did not read")?;
            writer.write(cache, db, race_key, false).await?;
            let _ = go_tx.send(());
            fill.await.context("the scripted reader panicked")??;
        }
    }
    Ok(())
}

struct Reader {
    strategy: Strategy,
    cache: Cache<i64, Item>,
    auditor: Auditor<i64, Item>,
    db: Db,
    ids: RangeInclusive<i64>,
    rng: StdRng,
    hits: Arc<AtomicU64>,
    target: u64,
    deadline: Instant,
}

impl Reader {
    async fn run(mut self) -> Outcome {
        let mut out = Outcome {
            latency: Some(Latency::new()),
            ..Outcome::default()
        };
        while self.hits.load(Ordering::Relaxed) < self.target && Instant::now() < self.deadline {
            let id = self.rng.random_range(self.ids.clone());
            let delay = Duration::from_micros(
                self.rng
                    .random_range(0..=u64::try_from(MAX_DELAY.as_micros()).unwrap_or(0)),
            );
            let t = Instant::now();
            match self.read(id, delay).await {
                Ok(true) => {
                    out.hits += 1;
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(_) => out.errors += 1,
            }
            out.reads += 1;
            if let Some(l) = &mut out.latency {
                l.record(t.elapsed());
            }
            tokio::task::yield_now().await;
        }
        out
    }

    /// One read; `true` when the cache served it (and the audit sampled it).
    async fn read(&self, id: i64, delay: Duration) -> Result<bool> {
        if self.auditor.get(&id).await?.is_some() {
            return Ok(true);
        }
        match self.strategy {
            Strategy::Naive => {
                let item = self.db.load(id).await?;
                tokio::time::sleep(delay).await;
                if let Some(item) = item {
                    self.cache.set(&id, item).await?;
                }
            }
            Strategy::Lease | Strategy::Outbox => {
                let db = self.db.clone();
                self.cache
                    .get_or_load(&id, move || async move {
                        let item = db.load(id).await;
                        tokio::time::sleep(delay).await;
                        item
                    })
                    .await?;
            }
        }
        Ok(false)
    }
}

struct WriterTask {
    cache: Cache<i64, Item>,
    db: Db,
    writer: Writer,
    ids: RangeInclusive<i64>,
    rng: StdRng,
    crashes: CrashShare,
    pause: Duration,
    stop: Arc<AtomicBool>,
}

impl WriterTask {
    /// Bursts of two writes of one row, [`BURST_GAP`] apart, with a random
    /// pause after each burst.
    async fn run(mut self) -> Outcome {
        let mut out = Outcome::default();
        while !self.stop.load(Ordering::Relaxed) {
            let id = self.rng.random_range(self.ids.clone());
            for i in 0..2 {
                if i > 0 {
                    tokio::time::sleep(BURST_GAP).await;
                }
                let crash = self.crashes.next();
                out.writes += 1;
                match self.writer.write(&self.cache, &self.db, id, crash).await {
                    Ok(()) if crash => out.crashed += 1,
                    Ok(()) => {}
                    Err(_) => out.errors += 1,
                }
            }
            let max = u64::try_from(self.pause.as_micros()).unwrap_or(u64::MAX);
            let pause = Duration::from_micros(self.rng.random_range(0..=max));
            tokio::time::sleep(pause).await;
        }
        out
    }
}

impl AuditFigures {
    fn from_report(report: &AuditReport) -> Self {
        Self {
            sampled: report.sampled,
            dropped: report.dropped,
            skipped: report.skipped,
            errors: report.errors,
            source_reads: report.source_reads,
            bounds: report
                .bounds
                .iter()
                .map(|b| AuditBound {
                    bound_ms: u64::try_from(b.bound.as_millis()).unwrap_or(u64::MAX),
                    checked: b.checked,
                    inconsistent: b.inconsistent,
                    nines: match b.nines() {
                        cachet::audit::Nines::Measured(n) => Some(n),
                        _ => None,
                    },
                    nines_at_least: b.nines().at_least(),
                })
                .collect(),
        }
    }
}
