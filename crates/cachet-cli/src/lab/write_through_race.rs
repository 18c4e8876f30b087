//! The `write-through-race` scenario: two writes of one key, the older one's
//! cache write late.
//!
//! For every key, an older write commits version 1 to the source, then a
//! newer write commits version 2; once both have committed, each writes its
//! value to the cache after a random pause (a slow network, a GC pause), so
//! about half the time the older value reaches the cache last. Naive write-through
//! (`set` after the source write) lets the older value land last, and the
//! cache holds it until its TTL although the source has the newer one.
//! cachet's versioned write (`Cache::write_through` on a cache built with
//! `version_by`) refuses a value older than the one cached, so no key is left
//! stale. Stale entries are counted once every write has finished.

use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::Cache;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::report::{Latency, Row, find};
use super::source::{Db, Item};
use super::workload::{join_within, lab_cache};
use super::{Entry, Lab};

pub(super) const NAME: &str = "write-through-race";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "An older write's cache write lands after a newer one's";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);

/// How long the writes may run past their last pause before they count as
/// stuck.
const GRACE: Duration = Duration::from_secs(60);

/// Flags of the `write-through-race` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "write-through-race")]
pub(super) struct WriteThroughRaceArgs {
    /// Keys, each written twice (an older and a newer write)
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    wtr_keys: u64,
    /// Longest pause between a write's commit and its cache write, in
    /// milliseconds (each pause is uniform up to it)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    wtr_max_pause_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Naive,
    Versioned,
}

impl Strategy {
    fn slug(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Versioned => "versioned",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive (SET after the write)",
            Strategy::Versioned => "versioned write_through",
        }
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for strategy in [Strategy::Naive, Strategy::Versioned] {
        rows.push(run_strategy(lab, strategy).await?);
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(naive), Some(versioned)) = (find(rows, NAME, "naive"), find(rows, NAME, "versioned"))
    else {
        return "write-through-race: no rows.".to_owned();
    };
    let stale = |r: &Row| {
        r.stale_entries
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    format!(
        "write-through-race: {} keys each written twice, the older write's cache write \
         sometimes last: keys left holding the older value naive {} (a plain SET overwrote the \
         newer one), versioned write_through {} ({} older writes refused: the cache held a \
         newer version).",
        naive.writes / 2,
        stale(naive),
        stale(versioned),
        versioned.older_writes_refused.unwrap_or(0),
    )
}

/// One write of the race: `item` (its `value` is its version) to the source,
/// then, after `pause`, to the cache.
#[derive(Debug)]
struct Write {
    item: Item,
    pause: Duration,
    /// Waited for before the source write.
    before: Option<oneshot::Receiver<()>>,
    /// Told once the source has the write.
    committed: oneshot::Sender<()>,
    /// Waited for after the source write, before the pause.
    after: Option<oneshot::Receiver<()>>,
}

impl Write {
    async fn run(self, cache: &Cache<i64, Item>, db: &Db, strategy: Strategy) -> Result<()> {
        let id = self.item.id;
        let to_source = async {
            // A failed other write drops its sender; this one then goes on
            // alone, and the failure is counted where it happened.
            if let Some(rx) = self.before {
                let _ = rx.await;
            }
            let item = db.write_versioned(self.item).await?;
            let _ = self.committed.send(());
            if let Some(rx) = self.after {
                let _ = rx.await;
            }
            tokio::time::sleep(self.pause).await;
            Ok::<_, sqlx::Error>(item)
        };
        match strategy {
            Strategy::Naive => {
                let item = to_source
                    .await
                    .with_context(|| format!("cannot write item {id}"))?;
                cache.set(&id, item).await?;
            }
            Strategy::Versioned => {
                cache.write_through(&id, || to_source).await?;
            }
        }
        Ok(())
    }
}

async fn run_strategy(lab: &Lab, strategy: Strategy) -> Result<Row> {
    let a = &lab.args.write_through_race;
    lab.source.reset(a.wtr_keys).await?;
    let last = i64::try_from(a.wtr_keys)?;
    let db = lab.source.counted();
    let cache = lab_cache(lab, NAME, strategy.slug(), 1..=last, |b| {
        // The row's value is its version; a naive cache has none.
        match strategy {
            Strategy::Naive => b,
            Strategy::Versioned => {
                b.version_by(|item: &Item| u64::try_from(item.value).unwrap_or(0))
            }
        }
    })?;
    let mut rng = StdRng::seed_from_u64(lab.seed_for(NAME, 0));
    let max_pause = Duration::from_millis(a.wtr_max_pause_ms);
    let mut pause = || max_pause.mul_f64(rng.random::<f64>());

    let started = Instant::now();
    let mut writes = JoinSet::new();
    for id in 1..=last {
        // The newer write commits once the older one has, so the source
        // always ends with the newer version; the cache writes start once
        // both have committed.
        let (older_done, older_committed) = oneshot::channel();
        let (newer_done, newer_committed) = oneshot::channel();
        let older = Write {
            item: version(id, 1, "older"),
            pause: pause(),
            before: None,
            committed: older_done,
            after: Some(newer_committed),
        };
        let newer = Write {
            item: version(id, 2, "newer"),
            pause: pause(),
            before: Some(older_committed),
            committed: newer_done,
            after: None,
        };
        let (cache, db) = (cache.clone(), db.clone());
        writes.spawn(async move {
            let timed = |write: Write| {
                let (cache, db) = (&cache, &db);
                async move {
                    let t = Instant::now();
                    write.run(cache, db, strategy).await.map(|()| t.elapsed())
                }
            };
            let (older, newer) = tokio::join!(timed(older), timed(newer));
            [older, newer]
        });
    }
    let mut latency = Latency::new();
    let mut errors = 0;
    let last_pause = Instant::now() + max_pause;
    join_within(&mut writes, last_pause, GRACE, "writes", |done| {
        for write in done.context("a write panicked")? {
            match write {
                Ok(elapsed) => latency.record(elapsed),
                Err(_) => errors += 1,
            }
        }
        Ok(())
    })
    .await?;
    let elapsed = started.elapsed();

    let (stale, unread) = lab.stale_entries(&cache, 1..=last).await?;
    errors += unread;
    let stats = cache.stats();
    lab.forget(&cache).await;

    let mut row = lab.row(NAME, strategy.slug(), strategy.name());
    row.requests = 2 * a.wtr_keys;
    row.writes = 2 * a.wtr_keys;
    row.stale_entries = Some(stale);
    row.errors = errors;
    row.transactions = Some(db.transactions());
    if strategy == Strategy::Versioned {
        row.older_writes_refused = Some(stats.stale_writes);
    }
    Ok(row.with_latency(&latency).elapsed(elapsed))
}

/// Item `id` at `version`, its payload naming which write it is.
fn version(id: i64, version: i64, which: &str) -> Item {
    Item {
        id,
        value: version,
        payload: format!("item-{id} ({which} write)"),
    }
}
