//! Near-cache coherence, measured: cachet's invalidation bus (Redis pub/sub)
//! against Redis client tracking (RESP3 `invalidate` pushes), in its default
//! mode and in broadcast mode with a prefix. The numbers are recorded in
//! `docs/decisions.md`, section 4.
//!
//! The same scenario runs for each mechanism, each on a throwaway
//! `redis-server` of its own (`cachet_testkit::RedisServer`):
//!
//! 1. a writer stores `KEYS` keys (values of `VALUE_LEN` bytes);
//! 2. `READERS` readers, each on connections of its own, read every key once, so
//!    that each would cache all of them: through a `Cache` with a near cache
//!    (bus), or with `GET` on the tracking connection (tracking);
//! 3. *burst*: the writer does `BURST_WRITES` writes to random keys, `IN_FLIGHT`
//!    at a time, as fast as it can;
//! 4. the readers read every key again (re-arming default-mode tracking, and
//!    refilling the near caches);
//! 5. *paced*: the writer writes every key once, in random order, one write per
//!    millisecond.
//!
//! After each write phase the run waits until nothing has arrived for a while.
//! Measured: messages (pub/sub messages or pushes) and invalidated keys received
//! per reader per write, `PUBLISH` calls and bytes the server sent (`INFO`
//! deltas), the server's tracking table (`tracking_total_keys`,
//! `tracking_total_items`) and `used_memory` growth over the readers' first
//! read, and, in the paced phase, the delay from the writer's reply to a
//! reader's receipt of the key's invalidation.
//!
//! The bus readers are real near caches; the notices they receive are counted
//! by a store wrapped around their `RedisStore` that sees every event of the
//! subscription on its way to the near cache.
//!
//! ```sh
//! cargo run --release -p cachet-bench --example coherence -- --runs 3
//! ```

use std::error::Error;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cachet::{Cache, NearCache, RedisStore, Store, StoreKey};

use cachet::store::{
    Acquire, AcquireMode, Entry, Fill, LeaseToken, PayloadKind, Read, StoreFuture, Ttls,
};
use cachet_core::{BusEvent, InvalidationBus, Notice};
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

type BoxError = Box<dyn Error + Send + Sync>;

/// Reader connections (processes, in a deployment).
const READERS: usize = 4;
/// Keys every reader reads.
const KEYS: u32 = 2_000;
/// Length of every value.
const VALUE_LEN: usize = 100;
/// Writes of the burst phase.
const BURST_WRITES: usize = 10_000;
/// Writes in flight during the burst.
const IN_FLIGHT: usize = 64;
/// Time between two writes of the paced phase (1,000 writes/s).
const PACE: Duration = Duration::from_millis(1);
/// Writes of the paced phase: every key once.
const PACED_WRITES: usize = KEYS as usize;
/// Longest a write phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Longest one command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(2);
/// A phase is over once nothing has arrived at any reader for this long.
const QUIET: Duration = Duration::from_millis(300);
/// Longest wait for the last notices of a phase.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the readers' bus subscriptions.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(10);
/// Arrivals kept per reader and phase (a bound; the counters go on).
const ARRIVALS_CAP: usize = 200_000;
/// Key prefix of the tracking runs, and the broadcast-mode prefix.
const PREFIX: &str = "coh:";
/// Namespace of the bus runs' cache.
const NAMESPACE: &str = "coh";
/// Most runs one invocation does.
const MAX_RUNS: usize = 20;
/// Seed of every random draw: each mechanism sees the same writes.
const SEED: u64 = 0x00ca_c4e7_c0e4_e5ce;

fn main() {
    let runs = match parse_runs(std::env::args().skip(1)) {
        Ok(runs) => runs,
        Err(message) => {
            eprintln!("{message}\nusage: coherence [--runs N]   (1 ≤ N ≤ {MAX_RUNS}, default 1)");
            std::process::exit(2);
        }
    };
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("coherence: redis-server is not on PATH");
        std::process::exit(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coherence: cannot build the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(measure(runs)) {
        eprintln!("coherence: {e}");
        std::process::exit(1);
    }
}

fn parse_runs(mut args: impl Iterator<Item = String>) -> Result<usize, String> {
    let mut runs = 1;
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--runs") {
            Some("") => args.next().ok_or("--runs needs a value")?,
            Some(rest) => match rest.strip_prefix('=') {
                Some(v) => v.to_owned(),
                None => return Err(format!("unknown argument {arg:?}")),
            },
            None => return Err(format!("unknown argument {arg:?}")),
        };
        runs = value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_RUNS).contains(n))
            .ok_or_else(|| format!("--runs: {value:?} is not a number from 1 to {MAX_RUNS}"))?;
    }
    Ok(runs)
}

// ---------------------------------------------------------------------------
// The mechanisms
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mechanism {
    /// cachet's invalidation bus: batched `PUBLISH` on the cache's channel.
    Bus,
    /// `CLIENT TRACKING ON`: the server remembers the keys each client read.
    Tracking,
    /// `CLIENT TRACKING ON BCAST PREFIX coh:`: every key of the prefix.
    Broadcast,
}

const MECHANISMS: [Mechanism; 3] = [Mechanism::Bus, Mechanism::Tracking, Mechanism::Broadcast];

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bus => "pub/sub bus",
            Self::Tracking => "tracking",
            Self::Broadcast => "tracking BCAST",
        })
    }
}

/// What one reader received: messages (a pub/sub message or a push), the keys
/// they invalidated, and when each key arrived.
#[derive(Debug, Default)]
struct Inbox {
    messages: AtomicU64,
    keys: AtomicU64,
    arrivals: Mutex<Vec<(Instant, u32)>>,
}

impl Inbox {
    /// One message naming these keys (`None`: a key not of this scenario).
    fn record(&self, keys: impl Iterator<Item = Option<u32>>) {
        let now = Instant::now();
        self.messages.fetch_add(1, Ordering::Relaxed);
        let mut arrivals = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            self.keys.fetch_add(1, Ordering::Relaxed);
            if let Some(key) = key
                && arrivals.len() < ARRIVALS_CAP
            {
                arrivals.push((now, key));
            }
        }
    }

    /// Empties the inbox, returning messages, keys and arrivals.
    fn take(&self) -> (u64, u64, Vec<(Instant, u32)>) {
        let arrivals =
            std::mem::take(&mut *self.arrivals.lock().unwrap_or_else(PoisonError::into_inner));
        (
            self.messages.swap(0, Ordering::Relaxed),
            self.keys.swap(0, Ordering::Relaxed),
            arrivals,
        )
    }
}

/// A `RedisStore` whose bus subscription passes through an [`Inbox`].
#[derive(Debug)]
struct Tapped {
    inner: RedisStore,
    inbox: Arc<Inbox>,
    subscribed: Arc<AtomicBool>,
}

impl Store for Tapped {
    fn payload_kind(&self) -> PayloadKind {
        self.inner.payload_kind()
    }
    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        self.inner.get(key)
    }
    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        self.inner.acquire(key, mode, lease_ttl)
    }
    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        self.inner.fill(key, lease, entry, ttl)
    }
    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        self.inner.release(key, lease)
    }
    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        self.inner.set(key, entry, ttl)
    }
    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        self.inner.invalidate(key)
    }
    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls> {
        self.inner.ttl(key)
    }
    fn bus(&self) -> Option<&dyn InvalidationBus> {
        Some(self)
    }
}

/// The tap itself: the bus subscription is the one call `Tapped` changes.
impl InvalidationBus for Tapped {
    fn subscribe_invalidations<'a>(
        &'a self,
        head: &'a str,
    ) -> StoreFuture<'a, mpsc::Receiver<BusEvent>> {
        Box::pin(async move {
            let mut events = self
                .inner
                .bus()
                .unwrap()
                .subscribe_invalidations(head)
                .await?;
            let (tx, rx) = mpsc::channel(1024);
            let inbox = Arc::clone(&self.inbox);
            let subscribed = Arc::clone(&self.subscribed);
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match &event {
                        BusEvent::Connected => subscribed.store(true, Ordering::SeqCst),
                        BusEvent::Lost => subscribed.store(false, Ordering::SeqCst),
                        BusEvent::Notices(notices) => {
                            inbox.record(notices.iter().map(|n| match n {
                                Notice::Key(key) => key.user_key().parse().ok(),
                                _ => None,
                            }))
                        }
                        _ => {}
                    }
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        })
    }
}

/// The keys of an `invalidate` push: `[keys]`, or nil after a flush.
fn pushed_keys(data: &[Value]) -> Vec<Option<u32>> {
    let mut keys = Vec::new();
    for value in data {
        let items = match value {
            Value::Array(items) | Value::Set(items) => items.as_slice(),
            other => std::slice::from_ref(other),
        };
        for item in items {
            if let Value::BulkString(bytes) = item {
                keys.push(
                    std::str::from_utf8(bytes)
                        .ok()
                        .and_then(|k| k.strip_prefix(PREFIX))
                        .and_then(|k| k.parse().ok()),
                );
            }
        }
    }
    keys
}

fn value(rng: &mut StdRng) -> String {
    (0..VALUE_LEN)
        .map(|_| char::from(rng.random_range(b'a'..=b'z')))
        .collect()
}

/// The writing side.
#[derive(Clone)]
enum Writer {
    Bus(Cache<u32, String>),
    Plain(MultiplexedConnection),
}

impl Writer {
    async fn connect(mechanism: Mechanism, url: &str) -> Result<Self, BoxError> {
        Ok(match mechanism {
            Mechanism::Bus => Self::Bus(
                Cache::builder(NAMESPACE)
                    .store(RedisStore::connect(url).await?)
                    .build()?,
            ),
            Mechanism::Tracking | Mechanism::Broadcast => Self::Plain(
                redis::Client::open(url)?
                    .get_multiplexed_async_connection()
                    .await?,
            ),
        })
    }

    async fn write(&self, key: u32, value: &str) -> Result<(), BoxError> {
        let write = async {
            match self {
                Self::Bus(cache) => cache.set(&key, value.to_owned()).await?,
                Self::Plain(conn) => {
                    redis::cmd("SET")
                        .arg(format!("{PREFIX}{key}"))
                        .arg(value)
                        .query_async::<()>(&mut conn.clone())
                        .await?;
                }
            }
            Ok::<_, BoxError>(())
        };
        tokio::time::timeout(COMMAND_LIMIT, write).await?
    }
}

/// One reading process.
enum Reader {
    Bus {
        cache: Cache<u32, String>,
        subscribed: Arc<AtomicBool>,
    },
    Tracking(MultiplexedConnection),
}

impl Reader {
    async fn connect(mechanism: Mechanism, url: &str, inbox: Arc<Inbox>) -> Result<Self, BoxError> {
        if mechanism == Mechanism::Bus {
            let subscribed = Arc::new(AtomicBool::new(false));
            let store = Tapped {
                inner: RedisStore::connect(url).await?,
                inbox,
                subscribed: Arc::clone(&subscribed),
            };
            let cache = Cache::builder(NAMESPACE)
                .store(store)
                .near_cache(NearCache::new(2 * KEYS as usize, Duration::from_secs(600)))
                .build()?;
            return Ok(Self::Bus { cache, subscribed });
        }
        let client = redis::Client::open(format!("{url}?protocol=resp3"))?;
        let config = AsyncConnectionConfig::new().set_push_sender(move |push: PushInfo| {
            if push.kind == PushKind::Invalidate {
                inbox.record(pushed_keys(&push.data).into_iter());
            }
            Ok::<(), std::convert::Infallible>(())
        });
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("ON");
        if mechanism == Mechanism::Broadcast {
            tracking.arg("BCAST").arg("PREFIX").arg(PREFIX);
        }
        tracking.query_async::<()>(&mut conn).await?;
        Ok(Self::Tracking(conn))
    }

    /// Hits of the near cache so far (bus readers only).
    fn near_hits(&self) -> Option<u64> {
        match self {
            Self::Bus { cache, .. } => Some(cache.stats().near_hits),
            Self::Tracking(_) => None,
        }
    }

    fn subscribed(&self) -> bool {
        match self {
            Self::Bus { subscribed, .. } => subscribed.load(Ordering::SeqCst),
            Self::Tracking(_) => true,
        }
    }

    /// Reads every key once: into the near cache, or tracked by the server.
    async fn read_all(&self) -> Result<(), BoxError> {
        match self {
            Self::Bus { cache, .. } => {
                for key in 0..KEYS {
                    let found = tokio::time::timeout(COMMAND_LIMIT, cache.get(&key)).await??;
                    if found.is_none() {
                        return Err(format!("key {key} is missing").into());
                    }
                }
            }
            Self::Tracking(conn) => {
                let mut conn = conn.clone();
                for chunk in (0..KEYS).collect::<Vec<_>>().chunks(100) {
                    let mut pipe = redis::pipe();
                    for key in chunk {
                        pipe.cmd("GET").arg(format!("{PREFIX}{key}"));
                    }
                    let values: Vec<Value> =
                        tokio::time::timeout(COMMAND_LIMIT, pipe.query_async(&mut conn)).await??;
                    if values.iter().any(|v| matches!(v, Value::Nil)) {
                        return Err("a key is missing".into());
                    }
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// One run of one mechanism
// ---------------------------------------------------------------------------

/// `INFO` fields, read with a connection of the run's own.
struct Info(String);

impl Info {
    async fn read(admin: &mut MultiplexedConnection) -> Result<Self, BoxError> {
        let text: String = tokio::time::timeout(
            COMMAND_LIMIT,
            redis::cmd("INFO")
                .arg("stats")
                .arg("memory")
                .arg("commandstats")
                .query_async(admin),
        )
        .await??;
        Ok(Self(text))
    }

    /// A numeric field (`name:value`), or `calls` of a `cmdstat_*` line; 0 if absent.
    fn get(&self, name: &str) -> u64 {
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| {
                let v = v.trim();
                let v = v
                    .strip_prefix("calls=")
                    .map_or(v, |rest| rest.split(',').next().unwrap_or_default());
                v.parse().ok()
            })
            .unwrap_or(0)
    }
}

/// What one write phase delivered.
#[derive(Clone, Copy, Debug, Default)]
struct Phase {
    writes: usize,
    /// From the first write to the last reply.
    elapsed: Duration,
    /// Messages received by all readers (pub/sub messages, or pushes).
    messages: u64,
    /// Keys those messages named, summed over the readers.
    keys: u64,
    /// `PUBLISH` calls the server executed.
    publishes: u64,
    /// Bytes the server wrote to all its clients.
    out_bytes: u64,
}

impl Phase {
    /// A phase of `writes` that took `elapsed`, in which the readers received
    /// `(messages, keys)`, between two `INFO` readings.
    fn new(
        writes: usize,
        elapsed: Duration,
        (messages, keys): (u64, u64),
        before: &Info,
        after: &Info,
    ) -> Self {
        let delta = |field: &str| after.get(field).saturating_sub(before.get(field));
        Self {
            writes,
            elapsed,
            messages,
            keys,
            publishes: delta("cmdstat_publish"),
            out_bytes: delta("total_net_output_bytes"),
        }
    }

    fn rate(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn per_reader_write(&self, n: u64) -> f64 {
        ratio(n, (READERS * self.writes.max(1)) as u64)
    }
}

/// Everything measured in one run of one mechanism.
#[derive(Clone, Debug, Default)]
struct Outcome {
    burst: Phase,
    paced: Phase,
    tracking_keys: u64,
    tracking_items: u64,
    tracking_prefixes: u64,
    /// Growth of `used_memory` over the readers' first read, in bytes.
    memory_growth: i64,
    /// The same, without the clients' buffers (`mem_clients_normal`).
    memory_growth_no_clients: i64,
    /// Delays from a paced write's reply to a reader's receipt, in µs (negative:
    /// the notice came first), sorted.
    delays_us: Vec<i64>,
    /// (reader, key) pairs of the paced phase that never received a notice.
    missed: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    // Counts stay far below 2^52: exact as f64.
    a as f64 / b.max(1) as f64
}

async fn run(mechanism: Mechanism) -> Result<Outcome, BoxError> {
    let server = cachet_testkit::RedisServer::start();
    let url = server.url();
    let mut admin = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut rng = StdRng::seed_from_u64(SEED);
    let values: Vec<String> = (0..8).map(|_| value(&mut rng)).collect();

    let writer = Writer::connect(mechanism, &url).await?;
    let fill: Vec<u32> = (0..KEYS).collect();
    write_burst(&writer, &fill, &values).await?;

    let inboxes: Vec<Arc<Inbox>> = (0..READERS).map(|_| Arc::default()).collect();
    let mut readers = Vec::with_capacity(READERS);
    for inbox in &inboxes {
        readers.push(Arc::new(
            Reader::connect(mechanism, &url, Arc::clone(inbox)).await?,
        ));
    }
    let since = Instant::now();
    while !readers.iter().all(|r| r.subscribed()) {
        if since.elapsed() > SUBSCRIBE_LIMIT {
            return Err("the readers' bus subscriptions did not come up".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Notices of the fill, if any are still on their way.
    drain(&inboxes).await;
    take_all(&inboxes);

    let mut outcome = Outcome::default();
    let before = Info::read(&mut admin).await?;
    read_all(&readers).await?;
    let after = Info::read(&mut admin).await?;
    outcome.tracking_keys = after.get("tracking_total_keys");
    outcome.tracking_items = after.get("tracking_total_items");
    outcome.tracking_prefixes = after.get("tracking_total_prefixes");
    let growth = |field: &str| signed(after.get(field)) - signed(before.get(field));
    outcome.memory_growth = growth("used_memory");
    outcome.memory_growth_no_clients = outcome.memory_growth - growth("mem_clients_normal");
    if mechanism == Mechanism::Bus {
        // Every key is in every near cache now: a second read never leaves L1.
        read_all(&readers).await?;
        if readers
            .iter()
            .any(|r| r.near_hits() < Some(u64::from(KEYS)))
        {
            return Err("the near caches did not keep the keys read".into());
        }
    }

    // Burst.
    let keys: Vec<u32> = (0..BURST_WRITES)
        .map(|_| rng.random_range(0..KEYS))
        .collect();
    let before = Info::read(&mut admin).await?;
    let started = Instant::now();
    write_burst(&writer, &keys, &values).await?;
    let elapsed = started.elapsed();
    drain(&inboxes).await;
    let after = Info::read(&mut admin).await?;
    let (messages, received, _) = take_all(&inboxes);
    outcome.burst = Phase::new(keys.len(), elapsed, (messages, received), &before, &after);

    // Paced: every key once, after the readers cached them again.
    read_all(&readers).await?;
    drain(&inboxes).await;
    take_all(&inboxes);
    let mut order: Vec<u32> = (0..KEYS).collect();
    order.shuffle(&mut rng);
    let before = Info::read(&mut admin).await?;
    let started = Instant::now();
    let replies = write_paced(&writer, &order, &values).await?;
    let elapsed = started.elapsed();
    drain(&inboxes).await;
    let after = Info::read(&mut admin).await?;
    let mut messages = 0;
    let mut received = 0;
    for inbox in &inboxes {
        let (m, k, arrivals) = inbox.take();
        messages += m;
        received += k;
        let mut seen = vec![false; KEYS as usize];
        for (at, key) in arrivals {
            let (Some(Some(reply)), Some(seen)) =
                (replies.get(key as usize), seen.get_mut(key as usize))
            else {
                continue;
            };
            if std::mem::replace(seen, true) {
                continue;
            }
            outcome.delays_us.push(signed_micros(at, *reply));
        }
        outcome.missed += replies
            .iter()
            .zip(&seen)
            .filter(|(reply, seen)| reply.is_some() && !**seen)
            .count() as u64;
    }
    outcome.delays_us.sort_unstable();
    let writes = replies.iter().flatten().count();
    outcome.paced = Phase::new(writes, elapsed, (messages, received), &before, &after);
    drop(readers);
    drop(server);
    Ok(outcome)
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `at - since` in µs, negative when `at` came first.
fn signed_micros(at: Instant, since: Instant) -> i64 {
    let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    match at.checked_duration_since(since) {
        Some(d) => us(d),
        None => -us(since.duration_since(at)),
    }
}

fn take_all(inboxes: &[Arc<Inbox>]) -> (u64, u64, usize) {
    inboxes.iter().fold((0, 0, 0), |(m, k, a), inbox| {
        let (messages, keys, arrivals) = inbox.take();
        (m + messages, k + keys, a + arrivals.len())
    })
}

/// Waits until no reader has received anything for `QUIET` (at most `DRAIN_LIMIT`).
async fn drain(inboxes: &[Arc<Inbox>]) {
    let total = || -> u64 {
        inboxes
            .iter()
            .map(|i| i.messages.load(Ordering::Relaxed))
            .sum()
    };
    let start = Instant::now();
    let mut last = total();
    let mut quiet_since = Instant::now();
    while start.elapsed() < DRAIN_LIMIT && quiet_since.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = total();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

/// Every reader reads every key, the readers concurrently.
async fn read_all(readers: &[Arc<Reader>]) -> Result<(), BoxError> {
    let mut tasks = JoinSet::new();
    for reader in readers {
        let reader = Arc::clone(reader);
        tasks.spawn(async move { reader.read_all().await });
    }
    join(tasks).await
}

/// Writes `keys`, `IN_FLIGHT` at a time.
async fn write_burst(writer: &Writer, keys: &[u32], values: &[String]) -> Result<(), BoxError> {
    let mut tasks = JoinSet::new();
    let per_task = keys.len().div_ceil(IN_FLIGHT).max(1);
    for (t, chunk) in keys.chunks(per_task).enumerate() {
        let writer = writer.clone();
        let chunk = chunk.to_vec();
        let values = values.to_vec();
        tasks.spawn(async move {
            for (i, key) in chunk.into_iter().enumerate() {
                writer.write(key, &values[(t + i) % values.len()]).await?;
            }
            Ok(())
        });
    }
    join(tasks).await
}

/// Writes `keys` one per `PACE`; returns each key's reply time.
async fn write_paced(
    writer: &Writer,
    keys: &[u32],
    values: &[String],
) -> Result<Vec<Option<Instant>>, BoxError> {
    let mut replies = vec![None; KEYS as usize];
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    for (i, &key) in keys.iter().take(PACED_WRITES).enumerate() {
        if start.elapsed() > PHASE_LIMIT {
            break;
        }
        tick.tick().await;
        writer.write(key, &values[i % values.len()]).await?;
        if let Some(slot) = replies.get_mut(key as usize) {
            *slot = Some(Instant::now());
        }
    }
    Ok(replies)
}

async fn join(mut tasks: JoinSet<Result<(), BoxError>>) -> Result<(), BoxError> {
    let joined = tokio::time::timeout(PHASE_LIMIT, async {
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok::<_, BoxError>(())
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(_) => {
            tasks.abort_all();
            Err("a phase took longer than its limit".into())
        }
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// Percentile `p` (0–100) of sorted values: nearest rank.
fn percentile(sorted: &[i64], p: usize) -> Option<i64> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((last * p).div_ceil(100)).copied()
}

/// Rows shown for each write phase.
type PhaseMetric = (&'static str, fn(&Phase) -> f64);
type RunMetric = (&'static str, fn(&Outcome) -> Option<f64>);

const PHASE_METRICS: &[PhaseMetric] = &[
    ("writes/s", Phase::rate),
    ("messages / reader / write", |p| {
        p.per_reader_write(p.messages)
    }),
    ("keys named / reader / write", |p| {
        p.per_reader_write(p.keys)
    }),
    ("messages received, all readers", |p| p.messages as f64),
    ("PUBLISH calls (INFO)", |p| p.publishes as f64),
    ("server bytes out / write", |p| {
        ratio(p.out_bytes, p.writes as u64)
    }),
];

/// Rows shown once per run.
const RUN_METRICS: &[RunMetric] = &[
    ("paced: notice delay p50 (µs)", |o| {
        percentile(&o.delays_us, 50).map(|v| v as f64)
    }),
    ("paced: notice delay p99 (µs)", |o| {
        percentile(&o.delays_us, 99).map(|v| v as f64)
    }),
    ("paced: (reader, key) never noticed", |o| {
        Some(o.missed as f64)
    }),
    ("tracking_total_keys after reads", |o| {
        Some(o.tracking_keys as f64)
    }),
    ("tracking_total_items after reads", |o| {
        Some(o.tracking_items as f64)
    }),
    ("tracking_total_prefixes after reads", |o| {
        Some(o.tracking_prefixes as f64)
    }),
    ("used_memory growth over reads (KiB)", |o| {
        Some(o.memory_growth as f64 / 1024.0)
    }),
    ("… without client buffers (KiB)", |o| {
        Some(o.memory_growth_no_clients as f64 / 1024.0)
    }),
];

fn format_number(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Median and range of one metric over the runs.
fn summarize(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    let Some((&low, &high)) = values.first().zip(values.last()) else {
        return "n/a".to_owned();
    };
    let mid = values.len() / 2;
    let median = if values.len().is_multiple_of(2) {
        f64::midpoint(values[mid - 1], values[mid])
    } else {
        values[mid]
    };
    if values.len() == 1 || low == high {
        format_number(median)
    } else {
        // "–" would read as a minus sign next to a negative bound.
        let to = if low < 0.0 { " to " } else { "–" };
        format!(
            "{} ({}{to}{})",
            format_number(median),
            format_number(low),
            format_number(high)
        )
    }
}

fn report(outcomes: &[(Mechanism, Vec<Outcome>)], runs: usize) {
    println!(
        "\nR = {READERS} readers, K = {KEYS} keys of {VALUE_LEN} B; burst: {BURST_WRITES} writes, \
         {IN_FLIGHT} in flight; paced: {PACED_WRITES} writes, one per {} ms.",
        PACE.as_millis()
    );
    if runs > 1 {
        println!("Median of {runs} runs (lowest–highest).");
    }
    let mut header = format!("| {:<40} |", "");
    let mut rule = format!("| {} |", "-".repeat(40));
    for (mechanism, _) in outcomes {
        header.push_str(&format!(" {:<22} |", mechanism.to_string()));
        rule.push_str(&format!(" {} |", "-".repeat(22)));
    }
    println!("{header}\n{rule}");
    let row = |name: &str, metric: &dyn Fn(&Outcome) -> Option<f64>| {
        let mut line = format!("| {name:<40} |");
        for (_, runs) in outcomes {
            let mut values: Vec<f64> = runs.iter().filter_map(metric).collect();
            line.push_str(&format!(" {:<22} |", summarize(&mut values)));
        }
        println!("{line}");
    };
    for (name, metric) in PHASE_METRICS {
        row(&format!("burst: {name}"), &|o| Some(metric(&o.burst)));
    }
    for (name, metric) in PHASE_METRICS {
        row(&format!("paced: {name}"), &|o| Some(metric(&o.paced)));
    }
    for (name, metric) in RUN_METRICS {
        row(name, metric);
    }
}

async fn measure(runs: usize) -> Result<(), BoxError> {
    let mut outcomes: Vec<(Mechanism, Vec<Outcome>)> =
        MECHANISMS.iter().map(|&m| (m, Vec::new())).collect();
    for run_index in 0..runs {
        // A different mechanism goes first in each run.
        for offset in 0..MECHANISMS.len() {
            let slot = (run_index + offset) % MECHANISMS.len();
            let mechanism = MECHANISMS[slot];
            let started = Instant::now();
            let outcome = run(mechanism)
                .await
                .map_err(|e| format!("{mechanism}: {e}"))?;
            eprintln!(
                "run {}/{runs}: {mechanism} done in {:.1} s",
                run_index + 1,
                started.elapsed().as_secs_f64()
            );
            outcomes[slot].1.push(outcome);
        }
    }
    report(&outcomes, runs);
    Ok(())
}
