//! The `groups` scenario: dropping everything cached for one tenant.
//!
//! T tenants of M keys each are cached, then one tenant is invalidated: by
//! moving its group's generation on (`invalidate_group`, one step whatever M),
//! or, in a cache without groups, by deleting its keys one by one (M steps, and
//! the caller must know every key). The rows show what the invalidation cost
//! (time, store commands, round trips), how many of the tenant's entries were
//! still readable afterwards (must be 0), and that no other tenant lost any.
//!
//! On Redis a further step fills the tenant again and then deletes its
//! generation key outright, as an eviction or a lost key would: no entry filled
//! before may come back. In process the generation lives in the store's own map
//! and no API removes it from outside, so that step is skipped.

use std::future::Future;
use std::ops::RangeInclusive;

use anyhow::{Context as _, Result, bail};
use cachet::Cache;
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admin::Admin;
use super::report::{Row, count, find, format_us};
use super::source::Item;
use super::workload::{fill, lab_cache};
use super::{Entry, Lab};

pub(super) const NAME: &str = "groups";
/// What it stages, for `--help` and the progress line.
const ABOUT: &str = "Invalidating every key of one tenant";
/// Its entry in the lab's registry.
pub(super) const SCENARIO: Entry = Entry::new(NAME, ABOUT, |lab| Box::pin(run(lab)), summary);
const GENERATION: &str = "generation bump (invalidate_group)";
const ONE_BY_ONE: &str = "delete one by one (naive)";
const EVICTED: &str = "generation key evicted (DEL)";

/// The tenant that is invalidated.
const TARGET: i64 = 1;
/// A tenant without keys, invalidated once before measuring, so that the
/// measurement does not include loading the script into a fresh Redis.
const WARM_UP: i64 = 0;
/// Reads in flight while checking what is readable.
const CHECK_CONCURRENCY: usize = 32;

/// Flags of the `groups` scenario.
#[derive(Debug, Args)]
#[command(next_help_heading = "groups")]
pub(super) struct GroupsArgs {
    /// Tenants (groups) cached
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=10_000))]
    tenants: u64,
    /// Keys cached per tenant
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    keys_per_tenant: u64,
}

/// The tenant of item `id` when each tenant has `per_tenant` consecutive ids.
fn tenant_of(id: i64, per_tenant: i64) -> i64 {
    (id - 1) / per_tenant + 1
}

/// The shape of one run: tenants `1..=tenants`, `per_tenant` keys each.
#[derive(Clone, Copy, Debug)]
struct Shape {
    tenants: i64,
    per_tenant: i64,
}

impl Shape {
    fn all(self) -> RangeInclusive<i64> {
        1..=self.tenants * self.per_tenant
    }

    fn keys_of(self, tenant: i64) -> RangeInclusive<i64> {
        (tenant - 1) * self.per_tenant + 1..=tenant * self.per_tenant
    }
}

pub(super) async fn run(lab: &Lab) -> Result<Vec<Row>> {
    let a = &lab.args.groups;
    let shape = Shape {
        tenants: i64::try_from(a.tenants)?,
        per_tenant: i64::try_from(a.keys_per_tenant)?,
    };
    lab.source.reset(a.tenants * a.keys_per_tenant).await?;
    let admin = Admin::open(lab).await?;
    let per_tenant = shape.per_tenant;
    let grouped = lab_cache(lab, NAME, "generation", shape.all(), move |b| {
        b.group_by(move |id: &i64| tenant_of(*id, per_tenant))
    })?;
    // Generations are `:sys:` keys without a TTL: the run removes its own.
    let generations: Vec<String> = (WARM_UP..=shape.tenants)
        .map(|t| grouped.layout().group_key(&t).as_str().to_owned())
        .collect();
    let rows = run_rows(lab, &admin, &grouped, shape).await;
    lab.forget(&grouped).await;
    admin.forget_sys_keys(&generations).await;
    rows
}

async fn run_rows(
    lab: &Lab,
    admin: &Admin,
    grouped: &Cache<i64, Item>,
    shape: Shape,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();

    // By generation.
    let db = lab.source.counted();
    let started = Instant::now();
    fill(grouped, &db, shape.all()).await?;
    let per_tenant = u64::try_from(shape.per_tenant)?;
    ensure_filled(grouped, shape, per_tenant).await?;
    grouped.invalidate_group(&WARM_UP).await?;
    let cost = measure(admin, 1, async {
        grouped.invalidate_group(&TARGET).await?;
        Ok(())
    })
    .await?;
    let seen = check(grouped, shape).await?;
    rows.push(row(
        lab,
        "generation",
        GENERATION,
        &cost,
        &seen,
        db.reads(),
        started,
    ));

    // One by one, in a cache without groups.
    let plain = lab.cache(NAME, "one-by-one", shape.all())?;
    let db = lab.source.counted();
    let started = Instant::now();
    fill(&plain, &db, shape.all()).await?;
    ensure_filled(&plain, shape, per_tenant).await?;
    let keys = shape.keys_of(TARGET);
    let cost = measure(admin, per_tenant, async {
        for id in keys {
            plain.invalidate(&id).await?;
        }
        Ok(())
    })
    .await?;
    let seen = check(&plain, shape).await?;
    lab.forget(&plain).await;
    rows.push(row(
        lab,
        "one-by-one",
        ONE_BY_ONE,
        &cost,
        &seen,
        db.reads(),
        started,
    ));

    // The generation key itself lost: only Redis lets it be deleted from outside.
    if admin.is_redis() {
        let db = lab.source.counted();
        let started = Instant::now();
        fill(grouped, &db, shape.keys_of(TARGET)).await?;
        ensure_filled(grouped, shape, per_tenant).await?;
        let first = *shape.keys_of(TARGET).start();
        let generation = grouped
            .store_key(&first)
            .group_key()
            .context("a grouped cache's key has no generation key")?;
        let cost = measure(admin, 1, async {
            if !admin.delete_key(generation.as_str()).await? {
                bail!("the generation key {} was not there", generation.as_str());
            }
            Ok(())
        })
        .await?;
        let seen = check(grouped, shape).await?;
        rows.push(row(
            lab,
            "evicted",
            EVICTED,
            &cost,
            &seen,
            db.reads(),
            started,
        ));
    }
    Ok(rows)
}

pub(super) fn summary(rows: &[Row]) -> String {
    let (Some(generation), Some(naive)) = (
        find(rows, NAME, "generation"),
        find(rows, NAME, "one-by-one"),
    ) else {
        return "groups: no result.".to_owned();
    };
    let cost = |r: &Row| {
        let round_trips = r.round_trips.unwrap_or(0);
        let commands = r.store_commands.unwrap_or(0);
        let mut s = format!(
            "{} in {}",
            r.invalidate_us.map_or_else(|| "?".to_owned(), format_us),
            count(round_trips, "round trip"),
        );
        if commands != round_trips {
            s.push_str(&format!(" ({} run by Redis)", count(commands, "command")));
        }
        s
    };
    let stale = |r: &Row| {
        r.stale_entries
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    let lost = |r: &Row| {
        r.other_groups_lost
            .map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    let evicted = match find(rows, NAME, "evicted") {
        Some(r) => format!(
            "; after a refill and a DEL of its generation key (as an eviction would), {} old \
             entries readable, {} lost elsewhere",
            stale(r),
            lost(r)
        ),
        None => " (the in-process generation cannot be deleted from outside; on Redis the lab \
                 also deletes it and checks that nothing old comes back)"
            .to_owned(),
    };
    format!(
        "groups: dropping one tenant's {} entries took {} by generation, {} one by one (which \
         also needs every key); its entries readable afterwards {} and {}, other tenants' \
         entries lost {} and {}{evicted}.",
        naive.round_trips.unwrap_or(0),
        cost(generation),
        cost(naive),
        stale(generation),
        stale(naive),
        lost(generation),
        lost(naive),
    )
}

/// Fails unless every entry of the tenant to invalidate is readable: a check
/// that finds none afterwards must not pass because none were there.
async fn ensure_filled(cache: &Cache<i64, Item>, shape: Shape, per_tenant: u64) -> Result<()> {
    let found = readable(cache, shape.keys_of(TARGET)).await?;
    if found != per_tenant {
        bail!("after the fill, {found} of tenant {TARGET}'s {per_tenant} entries are readable");
    }
    Ok(())
}

/// What one invalidation cost.
#[derive(Debug)]
struct Cost {
    micros: u64,
    commands: u64,
    round_trips: u64,
}

/// Runs `op`, `round_trips` calls to the store, and measures it: its time and,
/// on Redis, the commands the server executed meanwhile (in process, the calls).
async fn measure(
    admin: &Admin,
    round_trips: u64,
    op: impl Future<Output = Result<()>>,
) -> Result<Cost> {
    let before = admin.commands().await?;
    let t = Instant::now();
    op.await?;
    let micros = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
    let after = admin.commands().await?;
    let commands = match (before, after) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => round_trips,
    };
    Ok(Cost {
        micros,
        commands,
        round_trips,
    })
}

/// What was readable after an invalidation.
#[derive(Debug)]
struct Check {
    /// Reads made.
    reads: u64,
    /// Entries of the invalidated tenant still readable.
    stale: u64,
    /// Entries of other tenants no longer readable.
    lost: u64,
}

async fn check(cache: &Cache<i64, Item>, shape: Shape) -> Result<Check> {
    let stale = readable(cache, shape.keys_of(TARGET)).await?;
    let mut lost = 0;
    let mut reads = u64::try_from(shape.per_tenant)?;
    for tenant in (1..=shape.tenants).filter(|&t| t != TARGET) {
        let keys = shape.keys_of(tenant);
        let n = u64::try_from(keys.end() - keys.start() + 1)?;
        lost += n - readable(cache, keys).await?;
        reads += n;
    }
    Ok(Check { reads, stale, lost })
}

/// A check read, as joined.
type Joined = Result<Result<Option<Item>, cachet::Error>, tokio::task::JoinError>;

/// How many of `keys` the cache returns a value for (`get`, never loading).
async fn readable(cache: &Cache<i64, Item>, keys: RangeInclusive<i64>) -> Result<u64> {
    let mut found = 0;
    let mut pending = JoinSet::new();
    let mut tally = |done: Option<Joined>| -> Result<()> {
        if let Some(done) = done
            && done
                .context("a check panicked")?
                .context("a check read failed")?
                .is_some()
        {
            found += 1;
        }
        Ok(())
    };
    for id in keys {
        if pending.len() >= CHECK_CONCURRENCY {
            tally(pending.join_next().await)?;
        }
        let cache = cache.clone();
        pending.spawn(async move { cache.get(&id).await });
    }
    while let Some(done) = pending.join_next().await {
        tally(Some(done))?;
    }
    Ok(found)
}

fn row(
    lab: &Lab,
    slug: &'static str,
    strategy: &'static str,
    cost: &Cost,
    check: &Check,
    db_queries: u64,
    started: Instant,
) -> Row {
    let mut row = lab.row(NAME, slug, strategy);
    row.requests = check.reads;
    row.db_queries = db_queries;
    row.stale_entries = Some(check.stale);
    row.other_groups_lost = Some(check.lost);
    row.invalidate_us = Some(cost.micros);
    row.store_commands = Some(cost.commands);
    row.round_trips = Some(cost.round_trips);
    row.elapsed(started.elapsed())
}
