//! Delayed double-delete: the second delete waits in the store's queue and
//! survives the process that queued it.

mod support;

use std::time::Duration;

use cachet::{Cache, DeferredWorker, MemoryStore, RedisStore, Store as _};
use cachet_testkit::{RedisServer, TestChild, child_args};

/// Entry point of the child processes some tests start; does nothing when run
/// as a test.
#[test]
#[ignore = "started as a child process by the tests of this file"]
fn child_process() {
    let Some(args) = child_args() else {
        return;
    };
    let (role, url) = (&args["role"], &args["url"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = RedisStore::connect(url).await.unwrap();
        let users: Cache<u64, String> = Cache::builder("users").store(store).build().unwrap();
        match role.as_str() {
            "invalidate-twice-then-hang" => {
                users
                    .invalidate_twice(&1, Duration::from_millis(300))
                    .await
                    .unwrap();
                println!("CHILD: queued");
                std::future::pending::<()>().await;
            }
            other => panic!("unknown role {other}"),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_delete_survives_a_killed_process() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let users: Cache<u64, String> = Cache::builder("users")
        .store(store.clone())
        .build()
        .unwrap();
    users.set(&1, "old".into()).await.unwrap();

    let mut child = TestChild::spawn(
        "child_process",
        "invalidate-twice-then-hang",
        &[("url", &server.url())],
    );
    child.wait_for("CHILD: queued");
    child.kill(); // SIGKILL

    // The first delete ran before the kill.
    assert_eq!(users.peek(&1).await.unwrap(), None);
    // A reader without a lease, which read the row before the write, now puts
    // the old value back: the race the second delete is for.
    users.set(&1, "stale".into()).await.unwrap();
    assert_eq!(users.peek(&1).await.unwrap().as_deref(), Some("stale"));

    // After the restart, a worker (in this process) runs the queued delete.
    let worker = DeferredWorker::spawn(store);
    // The worker counts a delete once the store has run it, so wait for the
    // count rather than for the entry to vanish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while worker.ran() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second delete never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(users.peek(&1).await.unwrap(), None);
    assert_eq!(worker.ran(), 1);
    worker.shutdown().await;
}

#[tokio::test]
async fn in_process_double_delete_clobbers_a_stale_refill() {
    let fx = support::Fx::memory();
    let support::Fx::Memory { store, clock } = &fx else {
        unreachable!()
    };
    let users: Cache<u64, String> = Cache::builder("users")
        .store(store.clone())
        .build()
        .unwrap();
    users.set(&1, "old".into()).await.unwrap();
    users
        .invalidate_twice(&1, Duration::from_secs(1))
        .await
        .unwrap();
    users.set(&1, "stale".into()).await.unwrap();
    let not_yet = store
        .deferred_queue()
        .unwrap()
        .run_deferred(10)
        .await
        .unwrap();
    assert_eq!(not_yet.ran, 0);
    assert_eq!(users.peek(&1).await.unwrap().as_deref(), Some("stale"));
    clock.advance(Duration::from_secs(1));
    let done = store
        .deferred_queue()
        .unwrap()
        .run_deferred(10)
        .await
        .unwrap();
    assert_eq!(done.ran, 1);
    assert_eq!(users.peek(&1).await.unwrap(), None);
    assert_eq!(done.next_due_in, None);
}

#[tokio::test]
async fn a_worker_runs_in_process_deferred_deletes() {
    let store = MemoryStore::new(100);
    let worker = DeferredWorker::spawn(store.clone());
    let users: Cache<str, String> = Cache::builder("users")
        .memory(store.clone())
        .build()
        .unwrap();
    users.set("a b", "v".into()).await.unwrap();
    users
        .invalidate_twice("a b", Duration::from_millis(20))
        .await
        .unwrap();
    users.set("a b", "stale".into()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while worker.ran() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(users.peek("a b").await.unwrap(), None);
    assert_eq!(worker.ran(), 1);
}
