//! Writes the sink always refuses go to the dead-letter stream after
//! `max_attempts` deliveries, without holding back the others; transient
//! failures never do; malformed entries go at once; dead letters replay.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use cachet::BoxError;
use cachet::write_behind::{Sink, Write};
use support::{Fx, Item, PgSink, Running, eventually, rows};

/// Refuses every batch holding key 13 while `refuse` is set.
#[derive(Clone)]
struct Picky {
    inner: PgSink,
    refuse: Arc<AtomicBool>,
}

impl Sink<u64, Item> for Picky {
    async fn apply(&self, batch: &[Write<u64, Item>]) -> Result<(), BoxError> {
        if self.refuse.load(Ordering::Relaxed) && batch.iter().any(|w| w.key == 13) {
            return Err("check constraint violated by key 13".into());
        }
        self.inner.apply(batch).await
    }
}

#[tokio::test]
async fn a_write_the_sink_always_refuses_is_dead_lettered_and_the_others_flush() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    for id in 1..=20u64 {
        let _ = wb
            .write_behind(&id, Item::new(7, format!("v{id}")))
            .await
            .unwrap();
    }
    let refuse = Arc::new(AtomicBool::new(true));
    let sink = Picky {
        inner: fx.sink(),
        refuse: Arc::clone(&refuse),
    };
    let running = Running::start(
        fx.flusher(&wb, sink, |f| {
            f.max_attempts(3).min_idle(Duration::from_millis(50))
        })
        .await,
    );
    eventually(
        "the poison write is dead-lettered",
        Duration::from_secs(20),
        || async { wb.dead_letters().await.unwrap() == 1 },
    )
    .await;
    eventually("the stream empties", Duration::from_secs(10), || async {
        wb.backlog().await.unwrap() == 0
    })
    .await;
    let flusher = running.stop().await;

    let rows = rows(&fx.pool).await;
    assert_eq!(rows.len(), 19, "every other write flushed");
    assert!(!rows.contains_key(&13));
    assert_eq!(fx.pending(&wb), 0);
    let stats = flusher.stats();
    // Delivery 1: the batch of 20 fails, then each write alone: the 19 others
    // go through, key 13 fails. Deliveries 2 and 3 (claimed after min_idle):
    // key 13 fails again, and on the third (max_attempts) it is dead-lettered.
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.sink_errors, 4, "{stats:?}");
    assert_eq!(stats.flushed, 19, "{stats:?}");
    assert_eq!(stats.batches, 19, "{stats:?}");
    assert_eq!(stats.reclaimed, 2, "{stats:?}");

    let dead = fx
        .redis
        .command(&["XRANGE", wb.dead_letter_stream(), "-", "+"]);
    let lines: Vec<&str> = dead.lines().collect();
    let field = |name: &str| {
        let at = lines.iter().position(|l| *l == name).unwrap();
        lines[at + 1].to_owned()
    };
    assert_eq!(field("key"), "cachet:items:v:{13}");
    assert_eq!(field("version"), "7");
    assert_eq!(field("deliveries"), "3");
    assert_eq!(
        field("reason"),
        "poison: refused by the sink on delivery 3 (max_attempts 3): check constraint violated \
         by key 13"
    );

    // Once the cause is fixed, dead letters can be replayed.
    refuse.store(false, Ordering::Relaxed);
    assert_eq!(wb.replay_dead_letters(10).await.unwrap(), 1);
    assert_eq!(wb.dead_letters().await.unwrap(), 0);
    assert_eq!(flusher.flush_once().await.unwrap(), 1);
    assert_eq!(support::rows(&fx.pool).await[&13], (7, "v13".to_owned()));
}

/// Fails its first `failures` calls with an error it calls transient.
struct Flaky {
    inner: PgSink,
    failures: AtomicU32,
}

impl Sink<u64, Item> for Flaky {
    async fn apply(&self, batch: &[Write<u64, Item>]) -> Result<(), BoxError> {
        let left = self.failures.load(Ordering::Relaxed);
        if left > 0 {
            self.failures.store(left - 1, Ordering::Relaxed);
            return Err("connection refused".into());
        }
        self.inner.apply(batch).await
    }

    fn is_transient(&self, error: &BoxError) -> bool {
        error.to_string() == "connection refused"
    }
}

#[tokio::test]
async fn transient_failures_do_not_count_as_attempts() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    for id in 1..=5u64 {
        let _ = wb.write_behind(&id, Item::new(1, "x")).await.unwrap();
    }
    let sink = Flaky {
        inner: fx.sink(),
        failures: AtomicU32::new(6),
    };
    let running = Running::start(
        fx.flusher(&wb, sink, |f| {
            f.max_attempts(1).min_idle(Duration::from_millis(30))
        })
        .await,
    );
    eventually("everything flushes", Duration::from_secs(20), || async {
        rows(&fx.pool).await.len() == 5
    })
    .await;
    eventually("the stream empties", Duration::from_secs(10), || async {
        wb.backlog().await.unwrap() == 0
    })
    .await;
    let stats = running.stop().await.stats();
    assert_eq!(wb.dead_letters().await.unwrap(), 0);
    assert_eq!(
        (stats.dead_lettered, stats.sink_errors),
        (0, 6),
        "{stats:?}"
    );
    assert_eq!(fx.pending(&wb), 0);
}

#[tokio::test]
async fn a_batch_the_sink_failed_transiently_is_retried_at_the_next_round() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    for id in 1..=3u64 {
        let _ = wb.write_behind(&id, Item::new(1, "x")).await.unwrap();
    }
    let sink = Flaky {
        inner: fx.sink(),
        failures: AtomicU32::new(1),
    };
    // A minimum idle time longer than the test: no claim can flush the batch,
    // only this flusher taking its own entries again.
    let flusher = fx
        .flusher(&wb, sink, |f| f.min_idle(Duration::from_secs(3600)))
        .await;
    assert!(flusher.flush_once().await.is_err());
    assert_eq!(fx.pending(&wb), 3);
    assert_eq!(flusher.flush_once().await.unwrap(), 3);
    assert_eq!(rows(&fx.pool).await.len(), 3);
    assert_eq!((wb.backlog().await.unwrap(), fx.pending(&wb)), (0, 0));
    let stats = flusher.stats();
    assert_eq!(
        (stats.flushed, stats.sink_errors, stats.reclaimed),
        (3, 1, 0),
        "{stats:?}"
    );
    // Nothing left to take again: the next round reads new entries only.
    assert_eq!(flusher.flush_once().await.unwrap(), 0);
}

#[tokio::test]
async fn a_malformed_entry_is_dead_lettered_at_once() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    let _ = wb.write_behind(&1, Item::new(1, "good")).await.unwrap();
    fx.redis.command(&[
        "XADD",
        wb.stream(),
        "*",
        "key",
        "cachet:items:v:{2}",
        "version",
        "1",
        "value",
        "\u{ff}\u{ff}\u{ff}",
    ]);
    fx.redis.command(&["XADD", wb.stream(), "*", "junk", "1"]);
    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 3);
    assert_eq!(rows(&fx.pool).await.len(), 1);
    assert_eq!(wb.dead_letters().await.unwrap(), 2);
    let dead = fx
        .redis
        .command(&["XRANGE", wb.dead_letter_stream(), "-", "+"]);
    assert!(
        dead.contains("malformed: the value does not decode"),
        "{dead}"
    );
    assert!(dead.contains("malformed: no key field"), "{dead}");
    let stats = flusher.stats();
    assert_eq!((stats.flushed, stats.dead_lettered), (1, 2));
    assert_eq!((wb.backlog().await.unwrap(), fx.pending(&wb)), (0, 0));
}

/// Counts the calls it gets.
#[derive(Default)]
struct Counting(AtomicU32);

impl Sink<u64, Item> for Counting {
    async fn apply(&self, _: &[Write<u64, Item>]) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test]
async fn an_entry_that_keeps_losing_its_flushers_is_dead_lettered_untried() {
    let fx = Fx::new().await;
    let wb = fx.write_behind(|b| b).await;
    let _ = wb
        .write_behind(&1, Item::new(1, "crashes its flushers"))
        .await
        .unwrap();
    let _ = wb.write_behind(&2, Item::new(1, "fine")).await.unwrap();
    let flusher = fx
        .flusher(&wb, Counting::default(), |f| {
            f.max_attempts(2)
                .max_deliveries(10)
                .min_idle(Duration::ZERO)
        })
        .await;
    // Flushers that took entry 1 died, again and again: ten deliveries, never
    // acknowledged. Entry 2 was delivered once, to a flusher that died.
    fx.redis.command(&[
        "XREADGROUP",
        "GROUP",
        "flushers",
        "dead",
        "COUNT",
        "2",
        "STREAMS",
        wb.stream(),
        ">",
    ]);
    let ids = fx.redis.command(&["XRANGE", wb.stream(), "-", "+"]);
    let first = ids.lines().next().unwrap();
    fx.redis.command(&[
        "XCLAIM",
        wb.stream(),
        "flushers",
        "dead",
        "0",
        first,
        "RETRYCOUNT",
        "10",
        "JUSTID",
    ]);
    assert_eq!(flusher.flush_once().await.unwrap(), 2);
    assert_eq!(
        flusher.sink().0.load(Ordering::Relaxed),
        1,
        "only entry 2 was tried"
    );
    let stats = flusher.stats();
    assert_eq!(
        (stats.dead_lettered, stats.flushed, stats.reclaimed),
        (1, 1, 2)
    );
    let dead = fx
        .redis
        .command(&["XRANGE", wb.dead_letter_stream(), "-", "+"]);
    assert!(dead.contains("cachet:items:v:{1}"), "{dead}");
    assert!(dead.contains("more than max_deliveries 10"), "{dead}");
    assert_eq!((wb.backlog().await.unwrap(), fx.pending(&wb)), (0, 0));
}
