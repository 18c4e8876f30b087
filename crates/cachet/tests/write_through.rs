//! Write-through: concurrent writers of one key leave the newest version in the
//! cache, on both stores.

mod support;

use std::sync::Arc;
use std::time::Duration;

use cachet::{Cache, ErrorKind};
use rand::Rng as _;
use support::Fx;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Row {
    id: u64,
    version: u64,
    body: String,
}

on_both_stores!(concurrent_writers_leave_the_newest_version);

async fn concurrent_writers_leave_the_newest_version(fx: Fx) {
    let cache: Cache<u64, Row> = fx
        .builder("rows")
        .version_by(|r: &Row| r.version)
        .build()
        .unwrap();
    // The source of truth: one row, its version bumped by every write.
    let db = Arc::new(std::sync::Mutex::new(Row {
        id: 1,
        version: 0,
        body: String::new(),
    }));
    let mut writers = Vec::new();
    for w in 0..64u64 {
        let (cache, db) = (cache.clone(), Arc::clone(&db));
        writers.push(tokio::spawn(async move {
            cache
                .write_through(&1, || async move {
                    let row = {
                        let mut row = db.lock().unwrap();
                        row.version += 1;
                        row.body = format!("written by {w}");
                        row.clone()
                    };
                    // Commit acknowledged late: writers reach the cache out of order.
                    let delay = rand::rng().random_range(0..3_000);
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                    Ok::<_, std::io::Error>(row)
                })
                .await
        }));
    }
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let newest = db.lock().unwrap().clone();
    assert_eq!(newest.version, 64);
    assert_eq!(cache.get(&1).await.unwrap(), Some(newest));
    let s = cache.stats();
    println!("stale writes refused: {}", s.stale_writes);
}

#[tokio::test]
async fn write_through_needs_a_version_and_reports_writer_errors() {
    let fx = Fx::memory();
    let plain: Cache<u64, Row> = fx.builder("plain").build().unwrap();
    let e = plain
        .write_through(&1, || async {
            Ok::<_, std::io::Error>(Row {
                id: 1,
                version: 1,
                body: String::new(),
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let versioned: Cache<u64, Row> = fx
        .builder("versioned")
        .version_by(|r: &Row| r.version)
        .build()
        .unwrap();
    let e = versioned
        .write_through(&7, || async {
            Err::<Row, _>(std::io::Error::other("unique violation"))
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Write);
    assert_eq!(
        cachet::Report(&e).to_string(),
        "cache `versioned`: writing key `7` failed: unique violation"
    );
    assert_eq!(versioned.peek(&7).await.unwrap(), None, "nothing cached");
}
