//! The backlog bound: a write beyond it is refused with a clear error, or
//! waits for a flusher to make room; nothing is ever trimmed.

use crate::support;

use std::time::Duration;

use cachet::write_behind::{Error, OnFull};
use support::{Fx, Item, rows};

#[tokio::test]
async fn a_write_beyond_the_backlog_is_refused_and_nothing_is_trimmed() {
    let fx = Fx::new().await;
    let cache = fx.cache();
    let wb = fx.write_behind(|b| b.max_backlog(3)).await;
    for id in 1..=3u64 {
        let _ = wb.write_behind(&id, Item::new(1, "ok")).await.unwrap();
    }
    let e = wb
        .write_behind(&4, Item::new(1, "too many"))
        .await
        .unwrap_err();
    assert!(e.is_full(), "{e:?}");
    let Error::Full {
        backlog,
        max_backlog,
        waited,
        ref key,
        ..
    } = e
    else {
        unreachable!()
    };
    assert_eq!(
        (backlog, max_backlog, waited, key.as_str()),
        (3, 3, None, "4")
    );
    assert_eq!(
        e.to_string(),
        "write-behind stream cachet:items:sys:wb is full: 3 unflushed writes (max_backlog 3); \
         the write of key 4 was refused"
    );
    // A refused write wrote nothing, and the queued ones are all still there.
    assert_eq!(cache.get(&4).await.unwrap(), None);
    assert_eq!(fx.xlen(wb.stream()), 3);
    let ids = fx.redis.command(&["XRANGE", wb.stream(), "-", "+"]);
    for key in ["{1}", "{2}", "{3}"] {
        assert!(ids.contains(key), "{key} is still queued: {ids}");
    }
    // Rewriting a queued key is a new write too: refused as well.
    assert!(
        wb.write_behind(&1, Item::new(2, "again"))
            .await
            .unwrap_err()
            .is_full()
    );
    assert_eq!(cache.get(&1).await.unwrap(), Some(Item::new(1, "ok")));

    // Once flushed, there is room again.
    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 3);
    let _ = wb.write_behind(&4, Item::new(1, "now")).await.unwrap();
}

#[tokio::test]
async fn a_blocked_write_goes_through_once_a_flusher_drains_the_stream() {
    let fx = Fx::new().await;
    let wb = fx
        .write_behind(|b| {
            b.max_backlog(3).on_full(OnFull::Block {
                timeout: Duration::from_secs(20),
            })
        })
        .await;
    for id in 1..=3u64 {
        let _ = wb.write_behind(&id, Item::new(1, "ok")).await.unwrap();
    }
    let mut blocked = tokio::spawn({
        let wb = wb.clone();
        async move { wb.write_behind(&4, Item::new(1, "waited")).await }
    });
    // It waits: not done while the stream is full.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut blocked)
            .await
            .is_err(),
        "the write waits for room"
    );
    assert_eq!(fx.xlen(wb.stream()), 3);

    let flusher = fx.flusher(&wb, fx.sink(), |f| f).await;
    assert_eq!(flusher.flush_once().await.unwrap(), 3);
    let done = tokio::time::timeout(Duration::from_secs(10), blocked)
        .await
        .expect("the write goes through once there is room")
        .unwrap();
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(flusher.flush_once().await.unwrap(), 1);
    assert_eq!(rows(&fx.pool).await[&4], (1, "waited".to_owned()));
}

#[tokio::test]
async fn a_blocked_write_gives_up_after_its_timeout() {
    let fx = Fx::new().await;
    let wb = fx
        .write_behind(|b| {
            b.max_backlog(1).on_full(OnFull::Block {
                timeout: Duration::from_millis(150),
            })
        })
        .await;
    let _ = wb.write_behind(&1, Item::new(1, "ok")).await.unwrap();
    let started = std::time::Instant::now();
    let e = wb.write_behind(&2, Item::new(1, "late")).await.unwrap_err();
    let elapsed = started.elapsed();
    let Error::Full {
        waited: Some(waited),
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert!(*waited >= Duration::from_millis(150), "{waited:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(e.to_string().contains("after waiting"), "{e}");
    assert_eq!(fx.xlen(wb.stream()), 1);
}
