//! Flushers SIGKILLed at random points, for real, while writes pour in: every
//! acknowledged write still reaches PostgreSQL, at the latest acknowledged
//! version of its key.
//!
//! The flusher runs in a child process: this test binary run again on an
//! ignored test (the child entry point), with an environment variable naming
//! its role. The parent kills it (`Child::kill`, SIGKILL) 200–800 ms after it
//! reported being ready, starts another, and so on, while its own tasks write;
//! then a last flusher drains the stream and the table is checked against
//! what was acknowledged. The killer stops once it has killed enough and 80%
//! of the writes are acknowledged; the writers hold the last 10% back until
//! it has, so the last flusher always has writes to drain, besides what the
//! last killed flusher held.
//!
//! The child's sink pauses 10 ms before its COMMIT and 10 ms after it, so
//! that most kills land inside a batch: with its transaction open (rolled
//! back, the batch is claimed again), or committed but not acknowledged (the
//! batch is applied again, changing nothing).

use crate::support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachet::write_behind::{Durability, Sink, Write, WriteOutcome};
use cachet_testkit::{TestChild, child_args};
use rand::{Rng as _, SeedableRng as _};
use support::{Fx, Item, PgSink, Running, eventually, rows, sink_stats};

/// The ignored test that is the children's entry point.
const ENTRY: &str = "crash::flusher_child";
/// The line a child prints once its flusher is connected.
const READY: &str = "CACHET_WRITEBEHIND_CHILD_READY";
/// How long a child flushes before giving up by itself if nobody kills it.
const CHILD_PATIENCE: Duration = Duration::from_secs(60);

const WRITES: usize = 10_000;
const KEYS: u64 = 300;
const WRITERS: u64 = 4;
/// Each writer writes at most once per this period, so that writes flow
/// during the whole kill phase (at most about 1,300 writes per second in all).
const PACE: Duration = Duration::from_millis(3);
/// At least this many kills, even if the writes are done sooner.
const MIN_KILLS: usize = 10;
/// At most this many, whatever happens.
const MAX_KILLS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_flushers_killed_at_random_points() {
    let started = Instant::now();
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b.max_backlog(1_000_000)).await;
    assert_eq!(
        wb.durability(),
        &Durability::Always,
        "the server has AOF on"
    );

    // The killer: a child flusher at a time, each SIGKILLed at a random point.
    let acked_so_far = Arc::new(AtomicUsize::new(0));
    let (killer_done, killed) = tokio::sync::watch::channel(false);
    let killer = std::thread::spawn({
        let (redis, pg) = (fx.redis.url(), fx.db.url().to_owned());
        let stream = wb.stream().to_owned();
        let acked_so_far = Arc::clone(&acked_so_far);
        move || {
            let mut conn = redis::Client::open(redis.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let (mut kills, mut orphaned) = (0, 0);
            let mut rng = rand::rng();
            while kills < MAX_KILLS
                && (kills < MIN_KILLS || acked_so_far.load(Ordering::Relaxed) < WRITES * 8 / 10)
            {
                let consumer = format!("child-{kills}");
                let mut child = TestChild::spawn(
                    ENTRY,
                    "flusher",
                    &[("redis", &redis), ("pg", &pg), ("consumer", &consumer)],
                );
                child.wait_for(READY);
                std::thread::sleep(Duration::from_millis(rng.random_range(200..=800)));
                child.kill();
                kills += 1;
                // What the dead flusher held: read, not acknowledged.
                let held: Vec<redis::Value> = redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg("flushers")
                    .arg("-")
                    .arg("+")
                    .arg(10_000)
                    .arg(&consumer)
                    .query(&mut conn)
                    .unwrap();
                orphaned += held.len();
            }
            let _ = killer_done.send(true);
            (kills, orphaned)
        }
    });

    // The writers: each owns the keys k with k % WRITERS == its number, so the
    // versions of a key increase in the order they are acknowledged.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let wb = wb.clone();
        let acked_so_far = Arc::clone(&acked_so_far);
        let mut killed = killed.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mine: Vec<u64> = (0..KEYS).filter(|k| k % WRITERS == w).collect();
            let mut versions: HashMap<u64, u64> = HashMap::new();
            let mut acked: HashMap<u64, Item> = HashMap::new();
            let share = WRITES / WRITERS as usize;
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0..share {
                pace.tick().await;
                if n == share * 9 / 10 {
                    // The rest is written once no flusher runs.
                    tokio::time::timeout(Duration::from_secs(120), killed.wait_for(|k| *k))
                        .await
                        .expect("the killer stops within 120 s")
                        .unwrap();
                }
                let key = mine[rng.random_range(0..mine.len())];
                let version = versions.entry(key).or_insert(0);
                *version += 1;
                let item = Item::new(*version, format!("{:016x}", rng.random::<u64>()));
                match wb.write_behind(&key, item.clone()).await {
                    Ok(WriteOutcome::Queued { .. }) => {
                        acked.insert(key, item);
                        acked_so_far.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("write of {key} v{version}: {other:?}"),
                }
            }
            acked
        }));
    }
    let mut acked: HashMap<u64, Item> = HashMap::new();
    for writer in writers {
        acked.extend(writer.await.unwrap());
    }
    let writing_took = started.elapsed();
    let (kills, orphaned) = tokio::task::spawn_blocking(move || killer.join().unwrap())
        .await
        .unwrap();
    let backlog_left = wb.backlog().await.unwrap();
    let pending_left = fx.pending(&wb);
    let flushed_by_children = sink_stats(&fx.pool).await;

    // A last flusher drains what the killed ones left, pending entries of dead
    // consumers included.
    let last = Running::start(
        fx.flusher(&wb, fx.sink(), |f| {
            f.consumer("last").min_idle(Duration::from_millis(200))
        })
        .await,
    );
    eventually(
        "the last flusher drains the stream",
        Duration::from_secs(60),
        || async { wb.backlog().await.unwrap() == 0 && fx.pending(&wb) == 0 },
    )
    .await;
    let last_stats = last.stop().await.stats();

    // Every key's row holds exactly its latest acknowledged write.
    let rows = rows(&fx.pool).await;
    assert_eq!(rows.len(), acked.len(), "one row per written key");
    let mut wrong = Vec::new();
    for (key, item) in &acked {
        if rows.get(key) != Some(&(item.version, item.value.clone())) {
            wrong.push((key, item, rows.get(key)));
        }
    }
    assert!(
        wrong.is_empty(),
        "rows that differ from the acknowledged write: {wrong:?}"
    );
    assert_eq!(fx.xlen(wb.stream()), 0);
    assert_eq!(fx.pending(&wb), 0);
    assert_eq!(wb.dead_letters().await.unwrap(), 0, "nothing was poison");

    // Replaying a batch, twice, changes nothing: the latest writes of 50 keys
    // and an older version of each.
    let sink = PgSink::new(fx.pool.clone());
    let mut batch: Vec<Write<u64, Item>> = acked
        .iter()
        .take(50)
        .map(|(k, i)| Write::new(*k, i.version, i.clone()))
        .collect();
    batch.extend(
        acked
            .iter()
            .skip(50)
            .take(50)
            .filter(|(_, i)| i.version > 1)
            .map(|(k, i)| Write::new(*k, i.version - 1, Item::new(i.version - 1, "older"))),
    );
    for _ in 0..2 {
        sink.apply(&batch).await.unwrap();
        assert_eq!(
            support::rows(&fx.pool).await,
            rows,
            "a replay changed a row"
        );
    }

    let (batches, offered, changed) = sink_stats(&fx.pool).await;
    eprintln!(
        "crash test: {WRITES} acknowledged writes to {} keys in {writing_took:?}; {kills} flushers \
         SIGKILLed, holding {orphaned} read but unacknowledged entries in all; left after the last kill: {backlog_left} in the stream, {pending_left} pending; \
         the children's sink calls: {} batches, {} rows offered, {} changed; the last flusher: \
         {last_stats:?}; in all {batches} sink calls, {offered} rows offered, {changed} changed \
         ({} offered rows changed nothing: re-applied or superseded); every row checked; total {:?}",
        acked.len(),
        flushed_by_children.0,
        flushed_by_children.1,
        flushed_by_children.2,
        offered - changed,
        started.elapsed()
    );
    assert!(kills >= MIN_KILLS, "{kills} kills");
    assert!(
        last_stats.flushed >= (WRITES / 10) as u64,
        "the last flusher drained the writes made after the last kill: {last_stats:?}"
    );
}

/// The child processes' entry point; does nothing in a normal test run.
#[test]
#[ignore = "entry point of the child processes of the crash test"]
fn flusher_child() {
    let Some(args) = child_args() else {
        return;
    };
    assert_eq!(args["role"], "flusher");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = support::pool(&args["pg"], 4).await;
        let store = support::store(&args["redis"]).await;
        let cache = support::cache(store.clone());
        let wb = support::builder(store, &cache).build().await.unwrap();
        let flusher = wb
            .flusher(PgSink::slow(pool, Duration::from_millis(10)))
            .consumer(&args["consumer"])
            .min_idle(Duration::from_millis(300))
            .block(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(200))
            .connect(&args["redis"])
            .await
            .unwrap();
        println!("{READY}");
        flusher.run(tokio::time::sleep(CHILD_PATIENCE)).await;
        panic!("the flusher child was not killed in time");
    });
}
