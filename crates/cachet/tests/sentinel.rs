//! A cache on Redis Sentinel, its primary failed over in the middle of a
//! workload of reads, loads and invalidations: once the sentinels name the new
//! primary and the store has reached it, no call fails, and an invalidation is
//! honoured there. The errors while the failover runs are counted and printed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachet::{Cache, RedisStore};
use cachet_testkit::{RedisSentinels, eventually};
use rand::Rng as _;

const KEYS: u64 = 50;
type Db = Arc<std::sync::Mutex<HashMap<u64, u64>>>;

/// How the primary goes away.
#[derive(Clone, Copy, Debug)]
enum Failover {
    /// `SENTINEL FAILOVER`: the primary is demoted to a replica.
    Requested,
    /// SIGKILL of the primary; it is restarted after the failover (and made a
    /// replica of the new one by the sentinels, later).
    Killed,
}

/// The phases of a run; every call is counted in the phase it started in.
const BEFORE: usize = 0;
const FAILING_OVER: usize = 1;
const SETTLED: usize = 2;
const PHASES: [&str; 3] = ["before", "failing over", "settled"];
/// The longest wait for a state the test brings about.
const LIMIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Counts {
    reads: [AtomicU64; 3],
    read_errors: [AtomicU64; 3],
    invalidations: [AtomicU64; 3],
    invalidation_errors: [AtomicU64; 3],
}

impl Counts {
    fn count(&self, calls: &[AtomicU64; 3], errors: &[AtomicU64; 3], phase: usize, ok: bool) {
        calls[phase].fetch_add(1, Ordering::Relaxed);
        if !ok {
            errors[phase].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get(of: &[AtomicU64; 3], phase: usize) -> u64 {
        of[phase].load(Ordering::Relaxed)
    }
}

/// The cache, the source of truth and the counters that the workload's
/// tasks share.
#[derive(Clone)]
struct Workload {
    cache: Cache<u64, u64>,
    db: Db,
    phase: Arc<AtomicUsize>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl Workload {
    /// Runs `step` on a random key and the current phase, again and again
    /// until stopped, in a task of its own.
    fn spawn<F, Fut>(&self, step: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Self, u64, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let w = self.clone();
        tokio::spawn(async move {
            for _ in 0..1_000_000 {
                if w.stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = rand::rng().random_range(0..KEYS);
                let at = w.phase.load(Ordering::Acquire);
                step(w.clone(), key, at).await;
            }
        })
    }

    /// Reads `key`, loading it from the source of truth on a miss.
    async fn load(&self, key: u64) -> Result<Option<u64>, cachet::Error> {
        let db = Arc::clone(&self.db);
        self.cache
            .get_or_load(&key, move || async move {
                Ok::<_, std::io::Error>(db.lock().unwrap().get(&key).copied())
            })
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_failover_costs_no_errors_once_settled() {
    failover_under_load(Failover::Requested).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_costs_no_errors_once_settled() {
    failover_under_load(Failover::Killed).await;
}

async fn failover_under_load(how: Failover) {
    let started = Instant::now();
    let mut sentinels = RedisSentinels::start();
    let store = RedisStore::sentinel_builder(sentinels.sentinel_urls(), RedisSentinels::MASTER)
        .response_timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let cache: Cache<u64, u64> = Cache::builder("sentinel").store(store).build().unwrap();
    let w = Workload {
        cache: cache.clone(),
        db: Arc::new(std::sync::Mutex::new((0..KEYS).map(|k| (k, 0)).collect())),
        phase: Arc::new(AtomicUsize::new(BEFORE)),
        counts: Arc::new(Counts::default()),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let (db, phase, counts) = (&w.db, &w.phase, &w.counts);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(w.spawn(|w, key, at| async move {
            // A plain read surfaces store errors; a miss then loads and fills.
            let read = match w.cache.get(&key).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => w.load(key).await.map(drop),
                Err(e) => Err(e),
            };
            w.counts
                .count(&w.counts.reads, &w.counts.read_errors, at, read.is_ok());
            tokio::task::yield_now().await;
        }));
    }
    tasks.push(w.spawn(|w, key, at| async move {
        *w.db.lock().unwrap().entry(key).or_default() += 1;
        let ok = w.cache.invalidate(&key).await.is_ok();
        let c = &w.counts;
        c.count(&c.invalidations, &c.invalidation_errors, at, ok);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }));

    // Some traffic on the first primary, then the failover.
    let traffic = |phase: usize| Counts::get(&counts.reads, phase) > 200;
    eventually("reads on the first primary", LIMIT, || {
        std::future::ready(traffic(BEFORE))
    })
    .await;
    assert_eq!(sentinels.primary(), Some(0));
    phase.store(FAILING_OVER, Ordering::Release);
    let failing_over = Instant::now();
    match how {
        Failover::Requested => sentinels.failover(),
        Failover::Killed => sentinels.node_mut(0).kill(),
    }
    let new = tokio::task::block_in_place(|| sentinels.wait_for_new_primary(0));
    let reported = failing_over.elapsed();

    // Settled: the store's first successful call since, a write (a script,
    // refused by a replica), seen on the new primary.
    let probe = u64::MAX;
    let probe_key = cache.store_key(&probe);
    let new_primary = &sentinels.nodes()[new];
    let mut reached = false;
    for _ in 0..100 {
        if cache.set(&probe, 1).await.is_ok()
            && new_primary.command(&["EXISTS", probe_key.as_str()]) == "1"
        {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reached, "the store did not reach the new primary");
    phase.store(SETTLED, Ordering::Release);
    let settled = failing_over.elapsed();

    if let Failover::Killed = how {
        // The old primary comes back, empty and calling itself a primary,
        // until the sentinels make it a replica of the new one (seconds
        // later): the store stays on the primary the sentinels name.
        tokio::task::block_in_place(|| sentinels.node_mut(0).restart());
    }
    let base = Counts::get(&counts.reads, SETTLED);
    eventually("reads after the failover", LIMIT, || {
        std::future::ready(Counts::get(&counts.reads, SETTLED) > base + 5_000)
    })
    .await;

    // An invalidation after the failover is honoured: no stale read. The key
    // is one the workload leaves alone: its writer, still running, would
    // otherwise bump the value between this write and the read below.
    let key = KEYS;
    db.lock().unwrap().insert(key, 1);
    let loaded = w.load(key).await.unwrap();
    let updated = {
        let mut db = db.lock().unwrap();
        let v = db.entry(key).or_default();
        *v += 1_000;
        *v
    };
    cache.invalidate(&key).await.unwrap();
    let fresh = w.load(key).await.unwrap();
    assert!(loaded.is_some());
    assert_eq!(fresh, Some(updated), "a stale read after an invalidation");

    w.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for (p, name) in PHASES.iter().enumerate() {
        println!(
            "{how:?} failover, {name}: {} reads, {} failed; {} invalidations, {} failed",
            Counts::get(&counts.reads, p),
            Counts::get(&counts.read_errors, p),
            Counts::get(&counts.invalidations, p),
            Counts::get(&counts.invalidation_errors, p),
        );
    }
    println!(
        "{how:?} failover: new primary reported after {reported:?}, store settled after \
         {settled:?}; whole test {:?}",
        started.elapsed()
    );
    assert_eq!(Counts::get(&counts.read_errors, SETTLED), 0);
    assert_eq!(Counts::get(&counts.invalidation_errors, SETTLED), 0);
    assert!(Counts::get(&counts.invalidations, SETTLED) > 0);
}
