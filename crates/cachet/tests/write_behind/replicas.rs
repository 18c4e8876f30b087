//! `wait_replicas`: each write is followed by `WAIT` on the same connection;
//! too few replicas is reported, with the write queued all the same.

use crate::support;

use std::time::Duration;

use cachet::write_behind::{Error, WriteOutcome};
use cachet_testkit::RedisServer;
use support::{Fx, Item, eventually};

#[tokio::test]
async fn writes_wait_for_replicas_and_report_when_too_few_have_them() {
    let fx = Fx::new().await;
    let replica = RedisServer::start();
    let port = fx.redis.port().to_string();
    // Sync at once rather than after the default 5 s.
    fx.redis
        .command(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"]);
    assert_eq!(replica.command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    eventually(
        "the replica is in sync",
        Duration::from_secs(20),
        || async {
            fx.redis
                .command(&["INFO", "replication"])
                .contains("state=online")
        },
    )
    .await;

    // A fresh write-behind: its first write loads the script inside the
    // WAIT pipeline (NOSCRIPT, SCRIPT LOAD, again).
    let wb = fx
        .write_behind(|b| b.wait_replicas(1, Duration::from_secs(5)))
        .await;
    let queued = wb.write_behind(&1, Item::new(1, "one")).await.unwrap();
    assert!(matches!(queued, WriteOutcome::Queued { .. }), "{queued:?}");
    assert_eq!(
        replica.command(&["XLEN", wb.stream()]),
        "1",
        "the replica had the write when it was acknowledged"
    );

    let greedy = fx
        .write_behind(|b| b.wait_replicas(2, Duration::from_millis(100)))
        .await;
    let e = greedy
        .write_behind(&2, Item::new(1, "two"))
        .await
        .unwrap_err();
    let Error::NotReplicated { acked, wanted, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!((*acked, *wanted), (1, 2));
    assert!(
        e.to_string()
            .contains("the write of key 2 is queued on the primary, but only 1 of 2 replicas"),
        "{e}"
    );
    assert_eq!(wb.backlog().await.unwrap(), 2, "queued nonetheless");
    assert_eq!(fx.cache().get(&2).await.unwrap(), Some(Item::new(1, "two")));
}
