//! Store outages: a circuit breaker in front of a shared store, and
//! invalidations kept for retry while the store is unreachable.
//!
//! When the store stops answering, every operation would pay the response
//! timeout before falling back to the source of truth. After a few consecutive
//! failures the breaker *opens*: operations fail at once (reads fall through to
//! the loader immediately) until a cooldown has passed; then one operation probes
//! the store, and its success closes the breaker. Recovery therefore takes at
//! most a cooldown after the store is back. Calls already waiting on the store
//! when the breaker opens fail at once too, instead of each waiting out its
//! response timeout.
//!
//! An invalidation (of a key, a group or a tag) that cannot reach the store is
//! reported to its caller, and also kept in this process (up to a bound) and
//! retried until it goes through: an entry that the store still holds after the
//! outage must not outlive the write that invalidated it. Retries start as soon
//! as a call succeeds again, and until a kept invalidation is delivered, a read
//! of its key (or of a key of its group, or of the tag's generation, which
//! every read of an entry carrying the tag makes) delivers it first, and fails
//! (falling back to the loader) if it cannot: this process never reads back a
//! value it failed to invalidate. Other processes may, until it is delivered.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use cachet_core::{
    Capability, Clock, GroupKey, Layered, Op, Store, StoreError, StoreFuture, StoreKey, StoreLayer,
    TagKey,
};
use parking_lot::Mutex;

use crate::log_limit::LogLimit;

/// Settings of the circuit breaker, for [`CacheBuilder::circuit_breaker`](crate::CacheBuilder::circuit_breaker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreaker {
    /// Consecutive failures (unreachable or timed out) that open the breaker.
    pub failures: u32,
    /// How long the breaker stays open before a probe.
    pub cooldown: Duration,
    /// The most invalidations kept for retry; beyond it, each further one is
    /// left to its entries' TTL, counted in `Stats::dropped_invalidations`
    /// and logged (at most once a second, with the count held back).
    pub max_pending_invalidations: usize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_millis(500),
            max_pending_invalidations: 10_000,
        }
    }
}

impl CircuitBreaker {
    /// A breaker that opens after `failures` consecutive failures for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures: failures.max(1),
            cooldown,
            ..Self::default()
        }
    }
}

/// What the breaker counted, for `Stats`.
#[derive(Debug, Default)]
pub(crate) struct BreakerCounts {
    pub(crate) opens: AtomicU64,
    pub(crate) short_circuits: AtomicU64,
    pub(crate) retried_invalidations: AtomicU64,
    pub(crate) dropped_invalidations: AtomicU64,
}

/// A [`Store`] behind a circuit breaker.
pub(crate) type Guarded = Layered<Breaker>;

/// The circuit breaker: a [`StoreLayer`] that fails calls at once while the
/// store is out, and keeps the invalidations that failed.
#[derive(Debug)]
pub(crate) struct Breaker {
    /// The guarded store, for logs.
    store: String,
    /// The guarded store itself, to deliver a kept invalidation before a read.
    inner: Arc<dyn Store>,
    settings: CircuitBreaker,
    clock: Clock,
    failures: AtomicU32,
    /// 0 when closed; else the Unix ms after which one probe may pass.
    open_until: AtomicU64,
    pending: Mutex<Pending>,
    /// How many invalidations `pending` holds, so that reads look at it only
    /// when it holds some.
    pending_len: AtomicUsize,
    /// Wakes the retry task: an invalidation was kept, a call succeeded
    /// while some are kept, or the breaker is gone.
    wake: Arc<tokio::sync::Notify>,
    /// Wakes every call in flight when the breaker opens.
    opened: tokio::sync::Notify,
    /// Rate limit of the error logged when an invalidation is dropped.
    dropped_log: LogLimit,
    pub(crate) counts: BreakerCounts,
}

/// Invalidations kept until the store takes them.
#[derive(Debug, Default)]
struct Pending {
    keys: HashSet<StoreKey>,
    /// By (`{prefix}{namespace}`, escaped group), to match a key's.
    groups: HashMap<(String, String), GroupKey>,
    tags: HashSet<TagKey>,
}

impl Pending {
    fn len(&self) -> usize {
        self.keys.len() + self.groups.len() + self.tags.len()
    }
}

/// Kept invalidations taken for delivery: groups and tags first.
struct Batch {
    groups: Vec<GroupKey>,
    tags: Vec<TagKey>,
    keys: Vec<StoreKey>,
}

impl Batch {
    fn kept(&self) -> impl Iterator<Item = Kept<'_>> {
        (self.groups.iter().map(Kept::Group))
            .chain(self.tags.iter().map(Kept::Tag))
            .chain(self.keys.iter().map(Kept::Key))
    }
}

/// Wraps `inner` in a circuit breaker, and starts the retry of kept
/// invalidations on the current tokio runtime (if there is one).
pub(crate) fn guard(inner: Arc<dyn Store>, settings: CircuitBreaker, clock: Clock) -> Arc<Guarded> {
    let breaker = Breaker {
        store: format!("{inner:?}"),
        inner: Arc::clone(&inner),
        settings,
        clock,
        failures: AtomicU32::new(0),
        open_until: AtomicU64::new(0),
        pending: Mutex::new(Pending::default()),
        pending_len: AtomicUsize::new(0),
        wake: Arc::new(tokio::sync::Notify::new()),
        opened: tokio::sync::Notify::new(),
        dropped_log: LogLimit::default(),
        counts: BreakerCounts::default(),
    };
    let wake = Arc::clone(&breaker.wake);
    let guarded = Arc::new(Layered::new(breaker, inner));
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(retry_invalidations(Arc::downgrade(&guarded), wake));
    }
    guarded
}

impl Breaker {
    /// Whether an operation may go to the store now.
    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.clock.coarse_ms();
        if now < until {
            return false;
        }
        // Half open: one caller probes; the others wait another cooldown.
        let next = now.saturating_add(millis(self.settings.cooldown));
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn record<T>(&self, result: &Result<T, StoreError>) {
        match result {
            // Stores only what changes: every call records, and a store to
            // a line shared by every thread costs far more than a load.
            Ok(_) => {
                self.clear_failures();
                if self.open_until.load(Ordering::Acquire) != 0 {
                    self.open_until.store(0, Ordering::Release);
                }
                if self.pending_len.load(Ordering::Acquire) > 0 {
                    self.wake.notify_one();
                }
            }
            Err(e) if e.is_outage() => {
                let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= self.settings.failures {
                    let until = self
                        .clock
                        .coarse_ms()
                        .saturating_add(millis(self.settings.cooldown));
                    if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                        self.counts.opens.fetch_add(1, Ordering::Relaxed);
                        self.opened.notify_waiters();
                        tracing::warn!(store = %self.store, "store unreachable; skipping it for {:?} at a time",
                            self.settings.cooldown);
                    }
                }
            }
            // The store answered: it is up, even if the answer is an error.
            Err(_) => self.clear_failures(),
        }
    }

    fn clear_failures(&self) {
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
    }

    fn open_error(&self) -> StoreError {
        self.counts.short_circuits.fetch_add(1, Ordering::Relaxed);
        StoreError::new(
            cachet_core::StoreErrorKind::Unavailable,
            "circuit breaker open: the store failed repeatedly",
        )
    }

    /// Keeps a failed invalidation (of a key, a group or a tag) for retry.
    fn keep(&self, what: Kept<'_>) {
        let mut pending = self.pending.lock();
        if pending.len() >= self.settings.max_pending_invalidations {
            self.counts
                .dropped_invalidations
                .fetch_add(1, Ordering::Relaxed);
            // Once a second: past the cap, an outage drops every write's.
            if let Some(held_back) = self.dropped_log.allow(self.clock.coarse_ms()) {
                tracing::error!(key = %what, held_back,
                    "too many invalidations waiting for the store; this one is left to the entries' TTL");
            }
            return;
        }
        let was_empty = pending.len() == 0;
        match what {
            Kept::Key(key) => {
                pending.keys.insert(key.clone());
            }
            Kept::Group(group) => {
                let by = (group.head().to_owned(), group.group().to_owned());
                pending.groups.insert(by, group.clone());
            }
            Kept::Tag(tag) => {
                pending.tags.insert(tag.clone());
            }
        }
        self.pending_len.store(pending.len(), Ordering::Release);
        drop(pending);
        // The retry task sleeps while nothing is kept; from the first kept
        // invalidation on, it looks every period (not at every one kept).
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Whether the breaker is open (or half open: one caller probing).
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    /// Invalidations waiting for the store.
    pub(crate) fn pending(&self) -> usize {
        self.pending_len.load(Ordering::Acquire)
    }

    /// The kept invalidations a read of `key` must wait for: its own, and its
    /// group's.
    fn kept_for(&self, key: &StoreKey) -> (bool, Option<GroupKey>) {
        let pending = self.pending.lock();
        let group = key.group().and_then(|g| {
            pending
                .groups
                .get(&(key.head().to_owned(), g.to_owned()))
                .cloned()
        });
        (pending.keys.contains(key), group)
    }

    /// Delivers what [`kept_for`](Self::kept_for) `key`; an error if the
    /// store does not take it (the read must not go to the store then).
    async fn deliver_before_read(&self, key: &StoreKey) -> Result<(), StoreError> {
        let (own, group) = self.kept_for(key);
        if let Some(group) = group {
            self.deliver(Kept::Group(&group)).await?;
        }
        if own {
            self.deliver(Kept::Key(key)).await?;
        }
        Ok(())
    }

    /// Delivers the kept invalidations of `tags` before their generations are
    /// read; an error if the store does not take one.
    async fn deliver_before_tag_read(&self, tags: &[TagKey]) -> Result<(), StoreError> {
        let kept: Vec<TagKey> = {
            let pending = self.pending.lock();
            (tags.iter().filter(|t| pending.tags.contains(*t)))
                .cloned()
                .collect()
        };
        for tag in &kept {
            self.deliver(Kept::Tag(tag)).await?;
        }
        Ok(())
    }

    /// Sends one kept invalidation; forgets it once the store took it.
    async fn deliver(&self, what: Kept<'_>) -> Result<(), StoreError> {
        let done = match what {
            Kept::Key(key) => self.inner.invalidate(key).await,
            Kept::Group(group) => match self.inner.groups() {
                Some(groups) => groups.invalidate_group(group).await,
                None => Err(Capability::Groups.missing()),
            },
            Kept::Tag(tag) => match self.inner.tags() {
                Some(tags) => tags.invalidate_tag(tag).await,
                None => Err(Capability::Tags.missing()),
            },
        };
        self.record(&done);
        done?;
        if self.forget(what) {
            self.counts
                .retried_invalidations
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Drops a kept invalidation; false if it was not kept.
    fn forget(&self, what: Kept<'_>) -> bool {
        let mut pending = self.pending.lock();
        let removed = match what {
            Kept::Key(key) => pending.keys.remove(key),
            Kept::Group(group) => pending
                .groups
                .remove(&(group.head().to_owned(), group.group().to_owned()))
                .is_some(),
            Kept::Tag(tag) => pending.tags.remove(tag),
        };
        self.pending_len.store(pending.len(), Ordering::Release);
        removed
    }

    /// Delivers every kept invalidation it can before `deadline`, retrying
    /// while the store fails; the keys (and group keys) still kept then.
    pub(crate) async fn drain(&self, deadline: tokio::time::Instant) -> Vec<String> {
        const BATCH: usize = 256;
        const PAUSE: Duration = Duration::from_millis(20);
        let delivering = async {
            for _ in 0..u32::MAX {
                if self.pending() == 0 {
                    return;
                }
                let batch = self.batch(BATCH);
                for what in batch.kept() {
                    if self.deliver(what).await.is_err() {
                        tokio::time::sleep(PAUSE).await;
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, delivering).await;
        let pending = self.pending.lock();
        (pending.groups.values().map(|g| g.as_str().to_owned()))
            .chain(pending.tags.iter().map(|t| t.as_str().to_owned()))
            .chain(pending.keys.iter().map(|k| k.as_str().to_owned()))
            .collect()
    }

    /// Up to `max` kept invalidations, groups and tags first.
    fn batch(&self, max: usize) -> Batch {
        let pending = self.pending.lock();
        let groups: Vec<GroupKey> = pending.groups.values().take(max).cloned().collect();
        let tags: Vec<TagKey> = (pending.tags.iter())
            .take(max - groups.len())
            .cloned()
            .collect();
        let keys = (pending.keys.iter())
            .take(max - groups.len() - tags.len())
            .cloned()
            .collect();
        Batch { groups, tags, keys }
    }
}

/// A kept invalidation.
#[derive(Clone, Copy)]
enum Kept<'a> {
    Key(&'a StoreKey),
    Group(&'a GroupKey),
    Tag(&'a TagKey),
}

impl std::fmt::Display for Kept<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kept::Key(key) => key.fmt(f),
            Kept::Group(group) => f.write_str(group.as_str()),
            Kept::Tag(tag) => f.write_str(tag.as_str()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Retries kept invalidations as soon as a call succeeds (and every 100 ms),
/// all of them while the store takes them, until the store wrapper is
/// dropped. With nothing kept it sleeps until something is: an idle cache
/// does not wake its runtime.
async fn retry_invalidations(guarded: Weak<Guarded>, wake: Arc<tokio::sync::Notify>) {
    const PERIOD: Duration = Duration::from_millis(100);
    const BATCH: usize = 256;
    loop {
        // Not held while waiting: a dropped cache wakes the task, which ends.
        let Some(pending) = guarded.upgrade().map(|g| g.layer().pending()) else {
            return;
        };
        if pending == 0 {
            // A wake-up sent since the look above is kept for this wait.
            wake.notified().await;
            continue;
        }
        let _ = tokio::time::timeout(PERIOD, wake.notified()).await;
        let Some(strong) = guarded.upgrade() else {
            return;
        };
        let g = strong.layer();
        'drain: while g.pending() > 0 {
            let batch = g.batch(BATCH);
            for what in batch.kept() {
                if !g.allow() || g.deliver(what).await.is_err() {
                    break 'drain;
                }
            }
        }
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        // The retry task waits for this to end.
        self.wake.notify_one();
    }
}

impl StoreLayer for Breaker {
    /// Fails at once while the breaker is open, records every outcome, and
    /// keeps the key of a write that failed (its old value may still be there:
    /// it must go). Subscriptions to the bus keep their own reconnection.
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: Op<'a>,
        call: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        if let Op::Subscribe(_) = op {
            return call;
        }
        let write = match op {
            Op::Set(key) | Op::SetVersioned(key) | Op::Invalidate(key) => Some(Kept::Key(key)),
            Op::InvalidateGroup(group) => Some(Kept::Group(group)),
            Op::InvalidateTag(tag) => Some(Kept::Tag(tag)),
            _ => None,
        };

        if !self.allow() {
            if let Some(what) = write {
                self.keep(what);
            }
            return Box::pin(std::future::ready(Err(self.open_error())));
        }
        Box::pin(Guard {
            breaker: self,
            op,
            write,
            deliver: None,
            started: false,
            call,
            opened: None,
        })
    }
}

impl Breaker {
    /// Delivers the kept invalidations a call must wait for: those of the
    /// keys it reads, and of the tags whose generations it reads.
    async fn deliver_before(&self, op: Op<'_>) -> Result<(), StoreError> {
        for key in read_keys(op) {
            if self.pending() == 0 {
                break;
            }
            self.deliver_before_read(key).await?;
        }
        if let Op::ReadTags(tags) = op
            && self.pending() > 0
        {
            self.deliver_before_tag_read(tags).await?;
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A call the breaker let through. At its first poll, it delivers what
    /// the call must wait for (only while invalidations are kept); then it
    /// runs the call, records its outcome and keeps a failed write's key;
    /// once the call waits, the breaker's opening wakes it to fail at once.
    struct Guard<'a, T> {
        breaker: &'a Breaker,
        op: Op<'a>,
        write: Option<Kept<'a>>,
        deliver: Option<StoreFuture<'a, ()>>,
        started: bool,
        call: StoreFuture<'a, T>,
        // Made before the call's first poll; registered only once the call
        // waits, so a call answered at once (an in-process store) registers
        // nothing.
        #[pin]
        opened: Option<tokio::sync::futures::Notified<'a>>,
    }
}

impl<T> Future for Guard<'_, T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let breaker = *this.breaker;
        if !*this.started {
            *this.started = true;
            if breaker.pending() > 0 {
                *this.deliver = Some(Box::pin(breaker.deliver_before(*this.op)));
            }
        }
        if let Some(deliver) = this.deliver {
            // The call must not reach the store before these are delivered.
            std::task::ready!(deliver.as_mut().poll(cx))?;
            *this.deliver = None;
        }
        if this.opened.is_none() {
            // Made before the call's first poll, so that an opening from then
            // on is seen; it registers only if the call waits.
            this.opened.set(Some(breaker.opened.notified()));
        }
        let result = match this.call.as_mut().poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                let opened = this.opened.as_pin_mut().expect("made above");
                // A call still waiting when the breaker opens stops waiting.
                match opened.poll(cx) {
                    Poll::Ready(()) => Err(breaker.open_error()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        };
        breaker.record(&result);
        match (&result, *this.write) {
            (Err(_), Some(what)) => breaker.keep(what),
            // Written or invalidated since: nothing older is left to remove.
            (Ok(_), Some(what)) if breaker.pending() > 0 => {
                breaker.forget(what);
            }
            _ => {}
        }
        Poll::Ready(result)
    }
}

/// The entry keys a call reads (or fills, which reads the lease): a kept
/// invalidation of any of them is delivered first.
fn read_keys<'a>(op: Op<'a>) -> Vec<&'a StoreKey> {
    match op {
        Op::Get(key) | Op::Acquire(key, _) | Op::Fill(key) | Op::Ttl(key) => vec![key],
        Op::GetMany(keys) | Op::AcquireMany(keys, _) => keys.iter().collect(),
        Op::FillMany(fills) => fills.iter().map(|f| f.key).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn opens_after_failures_and_probes_after_the_cooldown() {
        let mock = Clock::mock();
        let guarded = guard(
            Arc::new(MemoryStore::new(10)),
            CircuitBreaker::new(2, Duration::from_millis(500)),
            mock.clock(),
        );
        let g = guarded.layer();
        let fail = || Err::<(), _>(StoreError::timeout(Duration::from_millis(1)));
        g.record(&fail());
        assert!(g.allow());
        g.record(&fail());
        assert!(!g.allow(), "open after two failures");
        assert_eq!(g.counts.opens.load(Ordering::Relaxed), 1);
        mock.advance(Duration::from_millis(500));
        assert!(g.allow(), "one probe");
        assert!(!g.allow(), "only one");
        g.record(&Ok(()));
        assert!(g.allow(), "closed after a success");
        // Errors that come from a store that answered do not count.
        for _ in 0..5 {
            g.record(&Err::<(), _>(StoreError::protocol("odd")));
        }
        assert!(g.allow());
    }
}
