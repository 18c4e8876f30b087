//! Cross-process single-flight: many processes (or connections) missing one cold
//! key cause one load in total.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet::{Cache, RedisStore};
use cachet_testkit::RedisServer;

const ROLE: &str = "CACHET_TEST_CHILD_ROLE";
const URL: &str = "CACHET_TEST_REDIS_URL";
const CALLERS: usize = 250;
/// How long the one load takes: long enough for every caller to arrive.
const LOAD_TIME: Duration = Duration::from_millis(300);

type Res<T> = Result<T, std::io::Error>;

/// `CALLERS` concurrent `get_or_load` calls of one key on one cache; returns the
/// number of loads this cache ran and the values seen.
async fn stampede(cache: Cache<str, String>) -> (u64, Vec<String>) {
    let loads = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (cache, loads) = (cache.clone(), Arc::clone(&loads));
            tokio::spawn(async move {
                cache
                    .get_or_load("home", move || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // The expensive query.
                        tokio::time::sleep(LOAD_TIME).await;
                        Res::Ok(Some("config".to_owned()))
                    })
                    .await
                    .unwrap()
                    .unwrap()
            })
        })
        .collect();
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.unwrap());
    }
    (loads.load(Ordering::SeqCst), values)
}

async fn cache_on(url: &str) -> Cache<str, String> {
    let store = RedisStore::connect(url).await.unwrap();
    Cache::builder("config").store(store).build().unwrap()
}

/// Entry point of the child processes; does nothing when run as a test.
#[test]
#[ignore = "started as a child process by the tests of this file"]
fn child_process() {
    let (Ok(role), Ok(url)) = (std::env::var(ROLE), std::env::var(URL)) else {
        return;
    };
    assert_eq!(role, "stampede");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cache = cache_on(&url).await;
        println!("CHILD: ready");
        // Wait for the parent's go, so all processes stampede together.
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        let (loads, values) = stampede(cache.clone()).await;
        assert!(values.iter().all(|v| v == "config"));
        let waits = cache.stats().lease_waits;
        println!(
            "CHILD: loads={loads} values={} lease_waits={waits}",
            values.len()
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_connections_times_250_callers_load_once() {
    let server = RedisServer::start();
    let mut caches = Vec::new();
    for _ in 0..4 {
        caches.push(cache_on(&server.url()).await);
    }
    let runs: Vec<_> = caches
        .iter()
        .map(|c| tokio::spawn(stampede(c.clone())))
        .collect();
    let mut loads = 0;
    for r in runs {
        let (n, values) = r.await.unwrap();
        assert_eq!(values.len(), CALLERS);
        assert!(values.iter().all(|v| v == "config"));
        loads += n;
    }
    assert_eq!(
        loads, 1,
        "one load across 4 connections x {CALLERS} callers"
    );
    let waits: u64 = caches.iter().map(|c| c.stats().lease_waits).sum();
    // The other connections waited for the lease (unless one arrived after the fill).
    assert!(waits <= 3, "{waits} lease waits");
}

#[test]
fn four_processes_times_250_callers_load_once() {
    let server = RedisServer::start();
    let mut children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_process", "--nocapture", "--ignored"])
                .env(ROLE, "stampede")
                .env(URL, server.url())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    for (i, child) in children.iter_mut().enumerate() {
        let stdout = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("CHILD: ") {
                    let _ = tx.send((i, line));
                }
            }
        });
    }
    let next = || {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a child went silent")
    };
    for _ in 0..4 {
        let (_, line) = next();
        assert_eq!(line, "CHILD: ready");
    }
    for child in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    let mut loads = 0;
    let mut waits = 0;
    for _ in 0..4 {
        let (i, line) = next();
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("child {i}: {line}"))
        };
        assert_eq!(field("values="), CALLERS as u64, "child {i}: {line}");
        loads += field("loads=");
        waits += field("lease_waits=");
    }
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(loads, 1, "one load across 4 processes x {CALLERS} callers");
    assert!(waits <= 3, "{waits} lease waits");
}
