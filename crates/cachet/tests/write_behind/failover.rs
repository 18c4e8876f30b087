//! Write-behind on Redis Sentinel: a flusher connected with the store's
//! settings follows the primary across a failover, so writes queued on the new
//! primary are flushed.

use crate::support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachet::write_behind::{Sink, Write};
use cachet::{BoxError, RedisStore};
use cachet_testkit::{RedisSentinels, eventually};
use support::{Item, Running};

/// The longest wait for a state the test brings about.
const LIMIT: Duration = Duration::from_secs(20);

/// Keeps the highest version applied per key.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<HashMap<u64, u64>>>);

impl Applied {
    fn version(&self, key: u64) -> Option<u64> {
        self.0.lock().unwrap().get(&key).copied()
    }
}

impl Sink<u64, Item> for Applied {
    async fn apply(&self, batch: &[Write<u64, Item>]) -> Result<(), BoxError> {
        let mut applied = self.0.lock().unwrap();
        for w in batch {
            let v = applied.entry(w.key).or_default();
            *v = (*v).max(w.version);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flusher_follows_the_primary_across_a_failover() {
    let sentinels = RedisSentinels::start();
    let store = RedisStore::sentinel_builder(sentinels.sentinel_urls(), RedisSentinels::MASTER)
        .response_timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let cache = support::cache(store.clone());
    let wb = support::builder(store, &cache).build().await.unwrap();
    let applied = Applied::default();
    let flusher = support::quick(wb.flusher(applied.clone()))
        .connect_store()
        .await
        .unwrap();
    let running = Running::start(flusher);

    let _ = wb.write_behind(&1, Item::new(1, "before")).await.unwrap();
    eventually("the write before the failover is flushed", LIMIT, || {
        std::future::ready(applied.version(1) == Some(1))
    })
    .await;

    assert_eq!(sentinels.primary(), Some(0));
    sentinels.failover();
    let new = tokio::task::block_in_place(|| sentinels.wait_for_new_primary(0));
    assert_ne!(new, 0);
    // Writes fail while the store looks for the new primary; one goes through.
    let mut queued = false;
    for _ in 0..200 {
        if wb.write_behind(&2, Item::new(1, "after")).await.is_ok() {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(queued, "no write went through after the failover");
    eventually("the write after the failover is flushed", LIMIT, || {
        std::future::ready(applied.version(2) == Some(1))
    })
    .await;
    // The queue drains. It may hold one more entry for a while: a write that
    // failed by timeout during the failover but was queued (and then queued
    // again), or a write flushed on the old primary whose acknowledgement the
    // new one never received; each is applied again, at least once.
    eventually("the queue drains", LIMIT, || async {
        wb.backlog().await.unwrap() == 0
    })
    .await;
    let flusher = running.stop().await;
    assert_eq!(applied.version(1), Some(1));
    assert_eq!(applied.version(2), Some(1));
    println!("flusher after the failover: {:?}", flusher.stats());
}
